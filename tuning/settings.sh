# shellcheck shell=bash disable=SC2034 # RG_* globals are read by check.sh/apply.sh
# ringgate host tuning: the single table of recommended settings, plus the
# helpers that read and judge them. Sourced by tuning/check.sh and
# tuning/apply.sh so the values and the OK/SHORT rules are defined once.
# See tuning/README.md for the reasoning and arithmetic behind each value.
#
# Test hooks (environment):
#   RINGGATE_TUNING_SYSCTL_ROOT  directory read instead of /proc/sys
#                                (same layout: $ROOT/fs/nr_open, ...)
#   RINGGATE_TUNING_NOFILE_SOFT  used instead of `ulimit -n`  (number|unlimited)
#   RINGGATE_TUNING_NOFILE_HARD  used instead of `ulimit -Hn` (number|unlimited)
#   RINGGATE_TUNING_ETC_DIR      apply.sh --persist writes under this instead
#                                of /etc

# One row per setting, fields separated by '|':
#   name       sysctl name (dotted), or "ulimit -n" / "ulimit -Hn"
#   source     sysctl | nofile_soft | nofile_hard
#   field      which field is judged: 1, 2, 3 (1-based) or "width" (hi-lo+1)
#   label      human name of that field ("" for single-valued settings)
#   op         ge (current >= threshold is OK), le (<= is OK), eq (== is OK)
#   threshold  the number the judged field is compared with
#   value      full recommended value (space separated for multi-valued)
#   merge      per field, how apply.sh combines current and recommended:
#              max (never lower), min (never raise), set (take recommended)
#   flags      "optional": a missing /proc/sys file is "n/a" and OK
RG_SETTINGS=(
	"fs.nr_open|sysctl|1||ge|1100000|1100000|max|"
	"fs.file-max|sysctl|1||ge|2200000|2200000|max|"
	"ulimit -n|nofile_soft|1||ge|1100000|1100000|max|"
	"ulimit -Hn|nofile_hard|1||ge|1100000|1100000|max|"
	"net.core.somaxconn|sysctl|1||ge|65535|65535|max|"
	"net.ipv4.tcp_max_syn_backlog|sysctl|1||ge|65535|65535|max|"
	"net.ipv4.ip_local_port_range|sysctl|width|width|ge|64512|1024 65535|min max|"
	"net.ipv4.tcp_mem|sysctl|3|max|ge|1572864|786432 1048576 1572864|max max max|"
	"net.ipv4.tcp_rmem|sysctl|2|default|le|4096|4096 4096 16777216|min min max|"
	"net.ipv4.tcp_wmem|sysctl|2|default|le|4096|4096 4096 16777216|min min max|"
	"net.core.netdev_max_backlog|sysctl|1||ge|16384|16384|max|"
	"net.netfilter.nf_conntrack_max|sysctl|1||ge|2097152|2097152|max|optional"
	"net.ipv4.tcp_fin_timeout|sysctl|1||le|15|15|min|"
	"net.ipv4.tcp_tw_reuse|sysctl|1||ge|1|1|max|"
)

# Stands in for "unlimited" in numeric comparisons (longer than any rlimit).
RG_UNLIMITED=999999999999999999999

RG_SYSCTL_ROOT=${RINGGATE_TUNING_SYSCTL_ROOT:-/proc/sys}

# rg_validate_env: complain (exit 2) about malformed test hooks.
rg_validate_env() {
	local var val
	if [[ ! -d $RG_SYSCTL_ROOT ]]; then
		printf '%s: sysctl root %s is not a directory (RINGGATE_TUNING_SYSCTL_ROOT)\n' \
			"${0##*/}" "$RG_SYSCTL_ROOT" >&2
		exit 2
	fi
	for var in RINGGATE_TUNING_NOFILE_SOFT RINGGATE_TUNING_NOFILE_HARD; do
		val=${!var-}
		if [[ -n $val && ! $val =~ ^([0-9]+|unlimited)$ ]]; then
			printf '%s: %s must be a number or "unlimited", got "%s"\n' \
				"${0##*/}" "$var" "$val" >&2
			exit 2
		fi
	done
}

# rg_row INDEX: split RG_SETTINGS[INDEX] into RG_NAME, RG_SOURCE, RG_FIELD,
# RG_LABEL, RG_OP, RG_THRESHOLD, RG_VALUE, RG_MERGE, RG_FLAGS.
rg_row() {
	IFS='|' read -r RG_NAME RG_SOURCE RG_FIELD RG_LABEL RG_OP RG_THRESHOLD \
		RG_VALUE RG_MERGE RG_FLAGS <<<"${RG_SETTINGS[$1]}"
}

# rg_sysctl_path NAME: the file holding sysctl NAME under the sysctl root.
rg_sysctl_path() {
	printf '%s/%s' "$RG_SYSCTL_ROOT" "${1//.//}"
}

# rg_num VALUE: VALUE as a comparable digit string ("unlimited" -> huge),
# leading zeros removed; returns 1 if VALUE is not a non-negative integer.
rg_num() {
	local v=$1
	[[ $v == unlimited ]] && v=$RG_UNLIMITED
	[[ $v =~ ^[0-9]+$ ]] || return 1
	while [[ ${#v} -gt 1 && $v == 0* ]]; do v=${v#0}; done
	printf '%s' "$v"
}

# rg_cmp A B: prints -1, 0 or 1. A and B are digit strings from rg_num.
# Compares by length, then lexically, so values beyond 2^63 cannot overflow.
rg_cmp() {
	local a=$1 b=$2
	if ((${#a} != ${#b})); then
		((${#a} < ${#b})) && echo -1 || echo 1
	elif [[ $a == "$b" ]]; then
		echo 0
	elif [[ $a < "$b" ]]; then
		echo -1
	else
		echo 1
	fi
}

# rg_read_current: for the current row, sets
#   RG_STATE   ok-data | absent | invalid
#   RG_CUR     current value, fields joined by single spaces
#   RG_JUDGED  the judged number (field / width), if RG_STATE=ok-data
rg_read_current() {
	local raw="" path f n lo hi
	local -a fields=()
	RG_STATE=invalid RG_CUR="" RG_JUDGED=""
	case $RG_SOURCE in
	nofile_soft) raw=${RINGGATE_TUNING_NOFILE_SOFT:-$(ulimit -Sn)} ;;
	nofile_hard) raw=${RINGGATE_TUNING_NOFILE_HARD:-$(ulimit -Hn)} ;;
	sysctl)
		path=$(rg_sysctl_path "$RG_NAME")
		if [[ ! -e $path ]]; then
			RG_STATE=absent
			return
		fi
		if ! raw=$(cat -- "$path" 2>/dev/null); then
			RG_CUR="(unreadable)"
			return
		fi
		;;
	esac
	read -r -a fields <<<"$raw"
	RG_CUR="${fields[*]}"
	for f in "${fields[@]}"; do
		rg_num "$f" >/dev/null || return
	done
	if [[ $RG_FIELD == width ]]; then
		((${#fields[@]} == 2)) || return
		lo=$(rg_num "${fields[0]}") hi=$(rg_num "${fields[1]}")
		((${#lo} <= 6 && ${#hi} <= 6)) || return
		n=$((hi - lo + 1))
		((n < 0)) && n=0
		RG_JUDGED=$n
	else
		((${#fields[@]} >= RG_FIELD)) || return
		RG_JUDGED=$(rg_num "${fields[RG_FIELD - 1]}")
	fi
	RG_STATE=ok-data
}

# rg_judge: after rg_read_current, sets RG_STATUS (OK|SHORT) and RG_SHOW
# (current value as displayed in the table).
rg_judge() {
	local c
	RG_SHOW=$RG_CUR
	case $RG_STATE in
	absent)
		if [[ $RG_FLAGS == *optional* ]]; then
			RG_SHOW="n/a (conntrack not loaded)"
			RG_STATUS=OK
		else
			RG_SHOW="n/a (missing)"
			RG_STATUS=SHORT
		fi
		return
		;;
	invalid)
		RG_SHOW="invalid: ${RG_CUR:-(empty)}"
		RG_STATUS=SHORT
		return
		;;
	esac
	[[ $RG_FIELD == width ]] && RG_SHOW="$RG_CUR ($RG_JUDGED ports)"
	c=$(rg_cmp "$RG_JUDGED" "$(rg_num "$RG_THRESHOLD")")
	case $RG_OP in
	ge) ((c >= 0)) && RG_STATUS=OK || RG_STATUS=SHORT ;;
	le) ((c <= 0)) && RG_STATUS=OK || RG_STATUS=SHORT ;;
	eq) ((c == 0)) && RG_STATUS=OK || RG_STATUS=SHORT ;;
	esac
}

# rg_recommended_text: the "recommended" column for the current row.
rg_recommended_text() {
	local sym
	case $RG_OP in
	ge) sym=">=" ;;
	le) sym="<=" ;;
	eq) sym="=" ;;
	esac
	if [[ -z $RG_LABEL ]]; then
		printf '%s %s' "$sym" "$RG_THRESHOLD"
	else
		printf '%s %s %s (%s)' "$RG_LABEL" "$sym" "$RG_THRESHOLD" "$RG_VALUE"
	fi
}

# rg_merged_value: the value apply.sh writes for the current row: the
# recommended value combined field by field with the current one according
# to RG_MERGE, so a better existing value is never made worse.
rg_merged_value() {
	local -a cur rec ops out=()
	local i c a b
	read -r -a rec <<<"$RG_VALUE"
	read -r -a ops <<<"$RG_MERGE"
	if [[ $RG_STATE == ok-data ]]; then
		read -r -a cur <<<"$RG_CUR"
	else
		cur=()
	fi
	for i in "${!rec[@]}"; do
		if ((${#cur[@]} != ${#rec[@]})) || [[ ${ops[i]} == set ]]; then
			out+=("${rec[i]}")
			continue
		fi
		a=$(rg_num "${cur[i]}") b=$(rg_num "${rec[i]}")
		c=$(rg_cmp "$a" "$b")
		case ${ops[i]} in
		max) ((c > 0)) && out+=("$a") || out+=("$b") ;;
		min) ((c < 0)) && out+=("$a") || out+=("$b") ;;
		esac
	done
	printf '%s' "${out[*]}"
}
