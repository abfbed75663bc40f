#!/bin/sh
# shellcheck disable=SC2154 # _b, _len, _item are assigned by eval
# procd_shim.sh INIT_SCRIPT UCI_FILE: run the init script's start_service and
# service_triggers with procd_*/config_* stubs; print what procd would receive:
#   command <argv...>, env <K=V...>, param <name> <values...>, trigger <...>
# config_load parses UCI_FILE the way OpenWrt's functions.sh does: the UCI format
# (config/option/list lines) is evaluated as shell with these three functions.
set -eu
init=$1 uci=$2
_sec=
config() { _sec=${2:-$1}; }
option() { eval "CONFIG_${_sec}_$1=\$2"; }
list() {
	eval "_n=\${CONFIG_${_sec}_$1_LENGTH:-0}"
	_n=$((_n + 1))
	eval "CONFIG_${_sec}_$1_LENGTH=$_n; CONFIG_${_sec}_$1_ITEM$_n=\$2"
}
# shellcheck disable=SC1090
config_load() { . "$uci"; }
config_get() {
	eval "_v=\${CONFIG_$2_$3-__unset__}"
	# shellcheck disable=SC2154
	if [ "$_v" = __unset__ ]; then _v=${4-}; fi
	eval "$1=\$_v"
}
config_get_bool() {
	config_get "$@"
	eval "_b=\$$1"
	case $_b in 1|on|true|yes|enabled) eval "$1=1" ;; *) eval "$1=0" ;; esac
}
config_list_foreach() {
	eval "_len=\${CONFIG_$1_$2_LENGTH:-0}"
	_i=1
	while [ "$_i" -le "$_len" ]; do
		eval "_item=\$CONFIG_$1_$2_ITEM$_i"
		"$3" "$_item"
		_i=$((_i + 1))
	done
}
procd_open_instance() { echo "open_instance"; }
procd_close_instance() { echo "close_instance"; }
procd_set_param() { _p=$1; shift; echo "$_p $*"; }
procd_add_reload_trigger() { echo "trigger $*"; }
# the init script's side effects go to a scratch root
PROG=true
# shellcheck disable=SC1090
. "$init"
# shellcheck disable=SC2034 # used by the sourced start_service
PROG=${QPC_SHIM_PROG:-true}
start_service
service_triggers
