#!/usr/bin/env bash
# Where a proxy's CPU goes, by function: `perf record` of a proxy (release build with symbols,
# target/profiling) while the load tool holds N tunnels, either idle or coming back after the
# proxy was killed with SIGKILL and started again.
#
# Usage: scripts/profile-proxy.sh [--agents N] [--transport tcp|quic] [--phase idle|restart]
#                                  [--seconds S] [--top K]
#   --agents     tunnels held (default 3000)
#   --transport  the agents' transport (default quic)
#   --phase      idle: S seconds of a settled fleet (40 s after the last came up);
#                restart: the first S seconds after kill -9 and restart (default idle)
#   --seconds    how long perf records (default 20)
#   --top        functions printed (default 25)
# Prints the proxy's CPU over the window (idle) or how long the fleet took to come back and the
# handshakes the proxy refused or timed out (restart), then perf's top functions. The recording
# stays in target/profile-proxy-PHASE-TRANSPORT-N.data for `perf report -i`.
# Needs: perf (linux-perf), run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root=$PWD
n=3000
transport=quic
phase=idle
secs=20
top=25
while [ $# -gt 0 ]; do
  case $1 in
    --agents) n=$2; shift 2 ;;
    --transport) transport=$2; shift 2 ;;
    --phase) phase=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }

cargo build --quiet --release --locked -p burrow-bench -p burrowctl
CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --quiet --release --locked -p burrow-proxy --target-dir target/profiling
pbin=$root/target/profiling/release
bin=$root/target/release
data=$root/target/profile-proxy-$phase-$transport-$n.data

scratch_dir burrow-profile
port=$(free_port)
ssh_port=$(free_port)
load_test_config "$work/proxy.yaml"
start_proxy() {
  start_load_proxy "$pbin/burrow-proxy" "$work/proxy" profile \
    --web-listen "127.0.0.1:$port" --ssh-listen "127.0.0.1:$ssh_port"
}
: >"$work/proxy.log"
start_proxy
wait_for "$work/proxy.log" "web API listening" 30
ctl() { "$bin/burrowctl" --data-dir "$work/proxy" "$@"; }
node_token_and_pin 1h
start_fleet "$bin/burrow-bench" "$port" "$n" "$transport" 1s "$work/fleet.out" 900

if [ "$phase" = idle ]; then
  sleep 40
  t0=$(cpu_ticks "$proxy_pid")
  perf record -F 999 -g -o "$data" -p "$proxy_pid" -- sleep "$secs" >/dev/null 2>&1
  t1=$(cpu_ticks "$proxy_pid")
  awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$secs" -v n="$n" 'BEGIN {
    c = 100 * d / hz / s
    printf "proxy CPU over %d s with %d idle tunnels: %.2f %% of a core (%.2f %% per 1,000)\n", s, n, c, c * 1000 / n }'
else
  sleep 15
  kill -9 "$proxy_pid"
  wait "$proxy_pid" 2>/dev/null || true
  mark=$(wc -l <"$work/proxy.log")
  drops0=$(udp_rcvbuf_errors)
  start_proxy
  perf record -F 499 -g -o "$data" -p "$proxy_pid" -- sleep "$secs" >/dev/null 2>&1 &
  perf_pid=$!
  wait_for "$work/proxy.log" "web API listening" 30
  t0=$(date +%s%3N)
  deadline=$((SECONDS + 120))
  count=0
  while [ $SECONDS -lt $deadline ]; do
    count=$(tail -n +"$((mark + 1))" "$work/proxy.log" | grep -c "tunnel up" || true)
    [ "$count" -ge "$n" ] && break
    sleep 0.25
  done
  refused=$(tail -n +"$((mark + 1))" "$work/proxy.log" |
    grep -ciE "refused: too many|dropped: too many|overload|timed out" || true)
  echo "after kill -9 and restart: $count of $n tunnels back in $(($(date +%s%3N) - t0)) ms;" \
    "proxy log lines refused/timed out: $refused;" \
    "UDP datagrams dropped for a full buffer: $(($(udp_rcvbuf_errors) - drops0))"
  wait "$perf_pid" || true
fi
perf report -i "$data" --no-children --sort dso,symbol -g none 2>/dev/null |
  grep -v '^#' | grep -v '^$' | head -n "$top" | cut -c1-140 || true
echo "recording: $data (perf report -i ...)"
