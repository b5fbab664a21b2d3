#!/usr/bin/env bash
# How a fleet comes back to a proxy killed with SIGKILL and started again, alone (the suite's
# restart row, without the rest of the suite), and how much of it resumed its TLS sessions.
#
# Usage: scripts/fleet-return.sh [--agents N] [--transport quic|tcp] [--rounds R]
#   --agents     agents the load tool runs (default 3000)
#   --transport  their transport (default quic)
#   --rounds     kill and restart this many times in a row, the same fleet (default 1)
# PROXY_BIN=PATH runs another proxy build (an A/B against this one, in the same hour);
# BIN_DIR=PATH takes every binary (proxy, load tool, burrowctl) from there, built by nobody.
# Prints, per round: time from the proxy listening again until every agent is back, datagrams
# the kernel dropped for a full socket buffer, handshakes the proxy refused or timed out, the CPU
# each side spent (proxy since its start, the load tool's agents since the kill), and the
# proxy's tunnels and resumptions from its /metrics.
set -euo pipefail
# Paths given relative to where the script was started from.
[ -z "${BIN_DIR:-}" ] || BIN_DIR=$(realpath "$BIN_DIR")
[ -z "${PROXY_BIN:-}" ] || PROXY_BIN=$(realpath "$PROXY_BIN")
cd "$(dirname "$0")/.."
. scripts/lib.sh

n=3000
transport=quic
rounds=1
while [ $# -gt 0 ]; do
  case $1 in
    --agents) n=$2; shift 2 ;;
    --transport) transport=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

if [ -n "${BIN_DIR:-}" ]; then
  bin=$BIN_DIR
else
  cargo build --quiet --release --bins
  bin=$PWD/target/release
fi
proxy_bin=${PROXY_BIN:-$bin/burrow-proxy}
scratch_dir burrow-fleet-return

port=$(free_port)
diag=$(free_port)
load_test_config "$work/proxy.yaml"
: >"$work/proxy.log"
start_proxy() {
  start_load_proxy "$proxy_bin" "$work/proxy" bench \
    --web-listen "127.0.0.1:$port" --diag-listen "127.0.0.1:$diag"
}
metric() { curl -s "http://127.0.0.1:$diag/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

start_proxy
wait_for "$work/proxy.log" "web API listening" 30
ctl() { "$bin/burrowctl" --data-dir "$work/proxy" "$@"; }
node_token_and_pin 2h
start_fleet "$bin/burrow-bench" "$port" "$n" "$transport" 1s "$work/fleet.out" 600
echo "== $n $transport agents up; proxy: $proxy_bin"

for round in $(seq "$rounds"); do
  sleep 8 # the proxy writes QUIC's sessions every 5 s
  kill -9 "$proxy_pid"
  wait "$proxy_pid" 2>/dev/null || true
  mark=$(wc -l <"$work/proxy.log")
  drops0=$(udp_rcvbuf_errors)
  bench0=$(cpu_ms "$bench_pid")
  start_proxy
  deadline=$((SECONDS + 30))
  until tail -n +"$((mark + 1))" "$work/proxy.log" | grep -q "web API listening"; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 "$proxy_pid" 2>/dev/null; then
      echo "the proxy did not start again; its log:" >&2
      tail -n 20 "$work/proxy.log" >&2
      exit 1
    fi
    sleep 0.02
  done
  t0=$(date +%s%3N)
  back=""
  deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    if [ "$(tail -n +"$((mark + 1))" "$work/proxy.log" | grep -c 'tunnel up host_id=' || true)" -ge "$n" ]; then
      back=$(($(date +%s%3N) - t0))
      break
    fi
    sleep 0.1
  done
  refused=$(tail -n +"$((mark + 1))" "$work/proxy.log" |
    grep -ciE "refused: too many|dropped: too many|overload|timed out" || true)
  label="transport=\"$transport\""
  printf 'round %d: back in %s ms; datagrams dropped %d; refused/timed out %d; CPU proxy %.1f s, agents %.1f s; tunnels %s, resumed %s\n' \
    "$round" "${back:-never (120 s)}" "$(($(udp_rcvbuf_errors) - drops0))" "$refused" \
    "$(awk -v m="$(cpu_ms "$proxy_pid")" 'BEGIN { print m / 1000 }')" \
    "$(awk -v m="$(($(cpu_ms "$bench_pid") - bench0))" 'BEGIN { print m / 1000 }')" \
    "$(metric "burrow_proxy_tunnel_connects_total{$label}")" \
    "$(metric "burrow_proxy_tunnel_resumptions_total{$label}")"
done
