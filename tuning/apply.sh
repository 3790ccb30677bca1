#!/usr/bin/env bash
# ringgate: apply the host settings a million concurrent sockets need (the
# same table tuning/check.sh reports, defined in tuning/settings.sh).
# Idempotent: a setting already at/above the recommendation is left alone,
# and a better existing value is never made worse.
# Exit status: 0 done (or dry run), 1 not root or a setting/file could not be
# written, 2 usage error.
set -u
export LC_ALL=C

RG_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd) || exit 2
# shellcheck source-path=SCRIPTDIR source=settings.sh
. "$RG_DIR/settings.sh" || exit 2

usage() {
	cat <<'EOF'
Usage: tuning/apply.sh [--dry-run] [--persist] [--help]

Raises the kernel settings that ~1,000,000 concurrent sockets need to
ringgate's recommendations (see tuning/check.sh and tuning/README.md).
Settings already at or beyond the recommendation are reported as
"already ok" and left alone; an existing better value is never made worse.

  --dry-run   print every command that would run (and, with --persist, the
              files that would be written) without changing anything;
              does not need root
  --persist   also write /etc/sysctl.d/90-ringgate.conf (loaded at boot) and
              /etc/security/limits.d/90-ringgate.conf (nofile for PAM
              logins), and print the LimitNOFILE= line for a systemd unit
  --help      show this help

Without --dry-run this must run as root. The open-file limit of the calling
shell cannot be raised by a script: apply.sh prints the ulimit commands to
run in the shell that starts ringgate (or use --persist / LimitNOFILE=).

Test hooks (environment):
  RINGGATE_TUNING_SYSCTL_ROOT  read current values from this directory
                               instead of /proc/sys; without --dry-run the
                               new values are written into it (never to the
                               real kernel)
  RINGGATE_TUNING_NOFILE_SOFT  use instead of `ulimit -n`  (number|unlimited)
  RINGGATE_TUNING_NOFILE_HARD  use instead of `ulimit -Hn` (number|unlimited)
  RINGGATE_TUNING_ETC_DIR      --persist writes below this instead of /etc
                               (required for a real --persist when
                               RINGGATE_TUNING_SYSCTL_ROOT is set)
EOF
}

dry_run=0 persist=0
for arg in "$@"; do
	case $arg in
	--dry-run | -n) dry_run=1 ;;
	--persist) persist=1 ;;
	--help | -h)
		usage
		exit 0
		;;
	*)
		printf 'apply.sh: unknown argument: %s\n\n' "$arg" >&2
		usage >&2
		exit 2
		;;
	esac
done

rg_validate_env

RG_ETC=${RINGGATE_TUNING_ETC_DIR:-/etc}
SYSCTL_FILE=$RG_ETC/sysctl.d/90-ringgate.conf
LIMITS_FILE=$RG_ETC/security/limits.d/90-ringgate.conf
fake_root=0
[[ $RG_SYSCTL_ROOT != /proc/sys ]] && fake_root=1

if ((!dry_run)); then
	if ((EUID != 0)); then
		printf 'apply.sh: must be run as root to change kernel settings (uid %d).\n' "$EUID" >&2
		printf 'apply.sh: use "sudo tuning/apply.sh", or "tuning/apply.sh --dry-run" to preview.\n' >&2
		exit 1
	fi
	if ((persist && fake_root)) && [[ -z ${RINGGATE_TUNING_ETC_DIR:-} ]]; then
		printf 'apply.sh: RINGGATE_TUNING_SYSCTL_ROOT is set: refusing to write real %s files from fake values; set RINGGATE_TUNING_ETC_DIR too\n' "$RG_ETC" >&2
		exit 2
	fi
fi

failures=0
sysctl_conf=() # lines of the sysctl.d file
nofile_soft="" nofile_hard=""

# show_cmd NAME VALUE: the sysctl command line, quoted when VALUE has spaces.
show_cmd() {
	if [[ $2 == *" "* ]]; then
		printf 'sysctl -w "%s=%s"' "$1" "$2"
	else
		printf 'sysctl -w %s=%s' "$1" "$2"
	fi
}

# set_sysctl NAME VALUE: really write it (real mode only).
set_sysctl() {
	local name=$1 value=$2 path
	path=$(rg_sysctl_path "$name")
	if ((fake_root)); then
		printf '+ printf "%%s\\n" "%s" > %s\n' "$value" "$path"
		printf '%s\n' "$value" 2>/dev/null >"$path"
	elif command -v sysctl >/dev/null 2>&1; then
		printf '+ %s\n' "$(show_cmd "$name" "$value")"
		sysctl -q -w "$name=$value"
	else
		printf '+ printf "%%s\\n" "%s" > %s\n' "$value" "$path"
		printf '%s\n' "$value" 2>/dev/null >"$path"
	fi
}

# write_file PATH: content from stdin, written atomically (real mode only).
write_file() {
	local path=$1 tmp
	if ! mkdir -p -- "$(dirname -- "$path")"; then
		return 1
	fi
	tmp=$path.tmp.$$
	if cat >"$tmp" && chmod 0644 "$tmp" && mv -f -- "$tmp" "$path"; then
		return 0
	fi
	rm -f -- "$tmp"
	return 1
}

if ((dry_run)); then
	printf '# ringgate tuning/apply.sh --dry-run: nothing is changed; the commands below are what would run\n'
fi
if ((fake_root)); then
	printf '# reading current values from %s (RINGGATE_TUNING_SYSCTL_ROOT)\n' "$RG_SYSCTL_ROOT"
fi

for i in "${!RG_SETTINGS[@]}"; do
	rg_row "$i"
	rg_read_current
	rg_judge
	rule=$(rg_recommended_text)

	# Value to persist: the current one when it is already good enough,
	# otherwise the recommended one merged with the current one.
	if [[ $RG_STATUS == OK && $RG_STATE == ok-data ]]; then
		target=$RG_CUR
	else
		target=$(rg_merged_value)
	fi

	if [[ $RG_SOURCE == nofile_* ]]; then
		if [[ $RG_STATE == ok-data && $RG_CUR == unlimited ]] ||
			[[ $RG_STATE != ok-data ]]; then
			target=$RG_VALUE
		fi
		if [[ $RG_SOURCE == nofile_soft ]]; then
			nofile_soft=$target
			flag=-n
		else
			nofile_hard=$target
			flag=-Hn
		fi
		if [[ $RG_STATUS == OK ]]; then
			printf '# already ok: %s = %s [recommended: %s]\n' "$RG_NAME" "$RG_SHOW" "$rule"
		else
			printf '# not changed: %s = %s [recommended: %s]. A script cannot raise the limits of the shell that\n' \
				"$RG_NAME" "$RG_SHOW" "$rule"
			printf '#   started it: as root, run "ulimit %s %s" in the shell that starts ringgate,\n' "$flag" "$RG_VALUE"
			printf '#   or use --persist (PAM logins) / LimitNOFILE=%s (systemd units).\n' "$RG_VALUE"
		fi
		continue
	fi

	# Persisted line; "-" makes systemd-sysctl and sysctl --system ignore a
	# key that does not exist at boot (conntrack module not loaded yet).
	if [[ $RG_FLAGS == *optional* || $RG_STATE == absent ]]; then
		sysctl_conf+=("-$RG_NAME = $target")
	else
		sysctl_conf+=("$RG_NAME = $target")
	fi

	if [[ $RG_STATUS == OK ]]; then
		printf '# already ok: %s = %s [recommended: %s]\n' "$RG_NAME" "$RG_SHOW" "$rule"
		continue
	fi
	if [[ $RG_STATE == absent ]]; then
		printf '# cannot set: %s does not exist under %s [recommended: %s]\n' "$RG_NAME" "$RG_SYSCTL_ROOT" "$rule"
		((dry_run)) || failures=$((failures + 1))
		continue
	fi

	if ((dry_run)); then
		printf '%s\n' "$(show_cmd "$RG_NAME" "$target")"
		continue
	fi
	if set_sysctl "$RG_NAME" "$target"; then
		# Re-read: the kernel may clamp a value or the file may be read-only.
		rg_read_current
		rg_judge
		if [[ $RG_STATUS == OK ]]; then
			printf '# applied: %s = %s\n' "$RG_NAME" "$RG_SHOW"
			continue
		fi
		printf 'apply.sh: %s is %s after writing %s [recommended: %s]\n' "$RG_NAME" "$RG_SHOW" "$target" "$rule" >&2
	else
		printf 'apply.sh: failed to set %s=%s (read-only in this container/namespace?)\n' "$RG_NAME" "$target" >&2
	fi
	failures=$((failures + 1))
done

if ((persist)); then
	# Soft may not exceed hard.
	if [[ $(rg_cmp "$(rg_num "$nofile_soft")" "$(rg_num "$nofile_hard")") == 1 ]]; then
		nofile_soft=$nofile_hard
	fi
	sysctl_text=$(
		printf '# ringgate: kernel settings for ~1,000,000 concurrent sockets.\n'
		printf '# Written by tuning/apply.sh --persist; see tuning/README.md for the reasons.\n'
		printf '# A leading "-" means: ignore if the key does not exist (module not loaded).\n'
		printf '%s\n' "${sysctl_conf[@]}"
	)
	limits_text=$(
		printf '# ringgate: open-file limits for ~1,000,000 sockets (PAM login sessions only;\n'
		printf '# systemd services need LimitNOFILE= in their unit). Must stay <= fs.nr_open.\n'
		printf '# "*" does not match root, hence the explicit root lines.\n'
		printf '*    soft nofile %s\n' "$nofile_soft"
		printf '*    hard nofile %s\n' "$nofile_hard"
		printf 'root soft nofile %s\n' "$nofile_soft"
		printf 'root hard nofile %s\n' "$nofile_hard"
	)
	if ((dry_run)); then
		printf '# --persist: would write %s\n' "$SYSCTL_FILE"
		printf "cat > %s <<'EOF'\n%s\nEOF\n" "$SYSCTL_FILE" "$sysctl_text"
		printf '# --persist: would write %s\n' "$LIMITS_FILE"
		printf "cat > %s <<'EOF'\n%s\nEOF\n" "$LIMITS_FILE" "$limits_text"
	else
		for pair in "$SYSCTL_FILE:sysctl_text" "$LIMITS_FILE:limits_text"; do
			file=${pair%:*} var=${pair##*:}
			if printf '%s\n' "${!var}" | write_file "$file"; then
				printf '# wrote %s\n' "$file"
			else
				printf 'apply.sh: could not write %s\n' "$file" >&2
				failures=$((failures + 1))
			fi
		done
	fi
	printf '# systemd unit running ringgate: add to its [Service] section:\n'
	printf '#   LimitNOFILE=%s\n' "$nofile_hard"
fi

if ((dry_run)); then
	printf '# dry run: nothing was changed\n'
	exit 0
fi
if ((failures)); then
	printf 'apply.sh: %d setting(s) or file(s) could not be applied; run tuning/check.sh\n' "$failures" >&2
	exit 1
fi
printf '# done; verify with tuning/check.sh (open-file limits apply to new sessions/units)\n'
exit 0
