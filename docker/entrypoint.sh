#!/usr/bin/env bash
# lioncub-entrypoint: container set-up steps, then `exec "$@"` (normally `lioncub-peer ...`).
# Installed in the image as /usr/local/bin/lioncub-entrypoint; used by docker/compose*.yml and the
# Kubernetes manifests. Every step is off unless its variable is set:
#
#   LIONCUB_SHAPE_UP_MBIT=N        egress (upload) shaping: `tc qdisc replace dev $LIONCUB_SHAPE_DEV
#                                  root tbf rate Nmbit`; `join` also gets `--bandwidth N`.
#                                  Needs root and CAP_NET_ADMIN (compose: user: root, cap_add: [NET_ADMIN]).
#   LIONCUB_SHAPE_DOWN_MBIT=N      ingress (download) shaping. tc cannot queue ingress traffic, so it
#                                  is redirected to an ifb device shaped at N Mbit/s. That needs the
#                                  host's ifb module (`sudo modprobe ifb`); without it a warning is
#                                  printed and download is only limited by the other peers' upload.
#   LIONCUB_SHAPE_DEV=DEV          the interface to shape (default eth0)
#   LIONCUB_RUN_AS=USER            when started as root: drop to USER after shaping (default lioncub;
#                                  empty = stay root)
#   LIONCUB_WAIT_FOR=HOST:PORT     wait until a TCP connection to HOST:PORT succeeds
#   LIONCUB_BOOTSTRAP_ADDR_FILE=F  join: wait for the bootstrap node's multiaddr in F, add `--dht` it
#   LIONCUB_ADVERTISE_HOST=ADDR    join: add `--advertise-host ADDR`; `auto` = this container's first
#                                  non-loopback IPv4 address
#   LIONCUB_SLOTS_DIR=D            join: claim the first free slot D/slot-K (an flock held while the
#                                  peer runs) and add `--checkpoint-dir D/slot-K/checkpoints
#                                  --identity D/slot-K/peer.key --resume`, so that `--scale peer=N`
#                                  replicas sharing one volume keep their own checkpoints and peer ids
#   LIONCUB_WAIT_TIMEOUT=S         seconds each wait may take (default 300)
#
# `lioncub-peer dht ... --addr-file F`: F is removed first, so that peers never read an address left
# over from an earlier start.
set -euo pipefail

log() { echo "lioncub-entrypoint: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

WAIT_TIMEOUT="${LIONCUB_WAIT_TIMEOUT:-300}"
[[ "$WAIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "LIONCUB_WAIT_TIMEOUT must be whole seconds, got '$WAIT_TIMEOUT'"

mbit() { # validate a Mbit/s setting: a whole number >= 1
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number of Mbit/s >= 1, got '$2'"
}

burst_bytes() { # tbf bucket: 10 ms at the rate, at least ten 1500-byte packets
  local bytes=$(($1 * 1250))
  echo $((bytes > 15000 ? bytes : 15000))
}

shape() {
  local dev="${LIONCUB_SHAPE_DEV:-eth0}" up="${LIONCUB_SHAPE_UP_MBIT:-}" down="${LIONCUB_SHAPE_DOWN_MBIT:-}"
  [ -n "$up$down" ] || return 0
  [ -z "$up" ] || mbit LIONCUB_SHAPE_UP_MBIT "$up"
  [ -z "$down" ] || mbit LIONCUB_SHAPE_DOWN_MBIT "$down"
  [ "$(id -u)" = 0 ] || die "traffic shaping needs root and CAP_NET_ADMIN (compose: user: root, cap_add: [NET_ADMIN])"
  if [ -n "$up" ]; then
    tc qdisc replace dev "$dev" root tbf rate "${up}mbit" burst "$(burst_bytes "$up")" latency 50ms
    log "$dev upload shaped to $up Mbit/s"
  fi
  if [ -n "$down" ]; then
    if ip link show ifb0 >/dev/null 2>&1 || ip link add ifb0 type ifb 2>/dev/null; then
      ip link set ifb0 up
      tc qdisc del dev "$dev" ingress 2>/dev/null || true
      tc qdisc add dev "$dev" handle ffff: ingress
      tc filter add dev "$dev" parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev ifb0
      tc qdisc replace dev ifb0 root tbf rate "${down}mbit" burst "$(burst_bytes "$down")" latency 50ms
      log "$dev download shaped to $down Mbit/s (via ifb0)"
    else
      log "warning: no ifb device (run 'sudo modprobe ifb' on the host): download is not shaped"
    fi
  fi
}

wait_for_tcp() {
  local host="${1%:*}" port="${1##*:}" deadline=$((SECONDS + WAIT_TIMEOUT))
  [[ -n "$host" && "$port" =~ ^[0-9]+$ ]] || die "LIONCUB_WAIT_FOR must be HOST:PORT, got '$1'"
  # shellcheck disable=SC2016 # $0 and $1 expand in the child bash, not here
  until timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$host" "$port" 2>/dev/null; do
    ((SECONDS < deadline)) || die "nothing accepts connections at $1 after ${WAIT_TIMEOUT}s"
    sleep 1
  done
}

read_bootstrap_addr() {
  local file="$1" deadline=$((SECONDS + WAIT_TIMEOUT)) addr=""
  until [ -s "$file" ]; do
    ((SECONDS < deadline)) || die "no bootstrap address in $file after ${WAIT_TIMEOUT}s; is the dht service up?"
    sleep 1
  done
  read -r addr <"$file" || true
  [[ "$addr" == /*/p2p/* ]] || die "$file does not hold a multiaddr (/ip4/HOST/tcp/PORT/p2p/ID): '$addr'"
  echo "$addr"
}

detect_ip() {
  local ip
  for ip in $(hostname -I 2>/dev/null); do
    case "$ip" in
      127.* | *:*) continue ;;
    esac
    echo "$ip"
    return 0
  done
  die "LIONCUB_ADVERTISE_HOST=auto found no non-loopback IPv4 address; set it to the address peers dial"
}

claim_slot() { # sets SLOT; the lock stays held by an fd of this shell, inherited across exec
  local dir="$1" k fd
  mkdir -p "$dir"
  for ((k = 0; k < 1024; k++)); do
    exec {fd}>"$dir/slot-$k.lock"
    if flock -n "$fd"; then
      mkdir -p "$dir/slot-$k/checkpoints"
      SLOT="$dir/slot-$k"
      return 0
    fi
    exec {fd}>&-
  done
  die "no free slot in $dir (1024 in use)"
}

subcommand() { # the first argument after the program that is not an option
  local arg
  for arg in "${@:2}"; do
    case "$arg" in
      -*) continue ;;
      *)
        echo "$arg"
        return 0
        ;;
    esac
  done
}

[ $# -gt 0 ] || die "usage: lioncub-entrypoint COMMAND [ARGS...]"

# 1. As root: shape, then continue as the unprivileged user (this script again, shaping done).
if [ "${LIONCUB_SHAPED:-}" != 1 ]; then
  shape
  export LIONCUB_SHAPED=1
  run_as="${LIONCUB_RUN_AS-lioncub}"
  if [ "$(id -u)" = 0 ] && [ -n "$run_as" ]; then
    id -u "$run_as" >/dev/null 2>&1 || die "user '$run_as' does not exist (LIONCUB_RUN_AS= stays root)"
    exec setpriv --reuid="$run_as" --regid="$run_as" --init-groups --inh-caps=-all -- "$0" "$@"
  fi
fi

# 2. Waits and the arguments that only exist at run time.
[ -z "${LIONCUB_WAIT_FOR:-}" ] || wait_for_tcp "$LIONCUB_WAIT_FOR"

program="$(basename -- "$1")"
if [ "$program" = lioncub-peer ]; then
  case "$(subcommand "$@")" in
    dht)
      prev=""
      for arg in "$@"; do
        if [ "$prev" = --addr-file ]; then
          rm -f -- "$arg"
        elif [[ "$arg" == --addr-file=* ]]; then
          rm -f -- "${arg#--addr-file=}"
        fi
        prev="$arg"
      done
      ;;
    join)
      # (Plain assignments, so that a failed lookup stops the script under set -e.)
      if [ -n "${LIONCUB_BOOTSTRAP_ADDR_FILE:-}" ]; then
        addr="$(read_bootstrap_addr "$LIONCUB_BOOTSTRAP_ADDR_FILE")"
        set -- "$@" --dht "$addr"
      fi
      case "${LIONCUB_ADVERTISE_HOST:-}" in
        "") ;;
        auto)
          ip="$(detect_ip)"
          set -- "$@" --advertise-host "$ip"
          ;;
        *) set -- "$@" --advertise-host "$LIONCUB_ADVERTISE_HOST" ;;
      esac
      if [ -n "${LIONCUB_SLOTS_DIR:-}" ]; then
        claim_slot "$LIONCUB_SLOTS_DIR"
        log "using $SLOT (checkpoints and peer identity)"
        set -- "$@" --checkpoint-dir "$SLOT/checkpoints" --identity "$SLOT/peer.key" --resume
      fi
      if [ -n "${LIONCUB_SHAPE_UP_MBIT:-}" ]; then
        set -- "$@" --bandwidth "$LIONCUB_SHAPE_UP_MBIT"
      fi
      ;;
  esac
fi

exec "$@"
