#!/usr/bin/env bash
# ringgate: read-only check of the host settings a million concurrent sockets
# need. Prints one row per setting (name, current, recommended, OK/SHORT).
# Exit status: 0 all OK, 1 at least one SHORT, 2 usage error.
# Values and rules live in tuning/settings.sh; reasoning in tuning/README.md.
set -u
export LC_ALL=C

RG_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd) || exit 2
# shellcheck source-path=SCRIPTDIR source=settings.sh
. "$RG_DIR/settings.sh" || exit 2

usage() {
	cat <<'EOF'
Usage: tuning/check.sh [--quiet] [--help]

Read-only: compares the kernel settings and open-file limits that ~1,000,000
concurrent sockets need with ringgate's recommendations. One row per setting:
name, current value, recommended value, status (OK or SHORT).

  --quiet   print only the SHORT rows (no header, no summary)
  --help    show this help

Exit status: 0 every row OK, 1 at least one row SHORT, 2 usage error.
The open-file limits shown are those of the shell that runs this script.
Fix with: sudo tuning/apply.sh [--dry-run] [--persist]   (see tuning/README.md)

Test hooks (environment):
  RINGGATE_TUNING_SYSCTL_ROOT  read sysctls from this directory instead of
                               /proc/sys (same layout, e.g. $ROOT/fs/nr_open)
  RINGGATE_TUNING_NOFILE_SOFT  use instead of `ulimit -n`  (number|unlimited)
  RINGGATE_TUNING_NOFILE_HARD  use instead of `ulimit -Hn` (number|unlimited)
EOF
}

quiet=0
for arg in "$@"; do
	case $arg in
	--quiet | -q) quiet=1 ;;
	--help | -h)
		usage
		exit 0
		;;
	*)
		printf 'check.sh: unknown argument: %s\n\n' "$arg" >&2
		usage >&2
		exit 2
		;;
	esac
done

rg_validate_env

names=() currents=() recs=() statuses=()
short=0
for i in "${!RG_SETTINGS[@]}"; do
	rg_row "$i"
	rg_read_current
	rg_judge
	names+=("$RG_NAME")
	currents+=("$RG_SHOW")
	recs+=("$(rg_recommended_text)")
	statuses+=("$RG_STATUS")
	[[ $RG_STATUS == SHORT ]] && short=$((short + 1))
done

# Column widths from the longest cell (header included).
wn=7 wc=7 wr=11
for i in "${!names[@]}"; do
	((${#names[i]} > wn)) && wn=${#names[i]}
	((${#currents[i]} > wc)) && wc=${#currents[i]}
	((${#recs[i]} > wr)) && wr=${#recs[i]}
done

if ((!quiet)); then
	printf "%-${wn}s  %-${wc}s  %-${wr}s  %s\n" SETTING CURRENT RECOMMENDED STATUS
fi
for i in "${!names[@]}"; do
	if ((quiet)) && [[ ${statuses[i]} != SHORT ]]; then
		continue
	fi
	printf "%-${wn}s  %-${wc}s  %-${wr}s  %s\n" \
		"${names[i]}" "${currents[i]}" "${recs[i]}" "${statuses[i]}"
done

if ((!quiet)); then
	if ((short)); then
		printf '\n%d of %d settings below recommendation; preview fixes with tuning/apply.sh --dry-run (see tuning/README.md)\n' \
			"$short" "${#names[@]}"
	else
		printf '\nall %d settings meet the recommendation\n' "${#names[@]}"
	fi
fi

((short)) && exit 1
exit 0
