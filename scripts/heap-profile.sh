#!/usr/bin/env bash
# Where a proxy's memory per idle tunnel goes: a proxy run under heaptrack while N simulated
# agents (burrow-bench) hold a tunnel each, then heaptrack's peak heap by allocation site.
#
# The proxy is a release build with symbols (target/profiling, built here); the agents are the
# release load tool. Besides heaptrack's report, the script prints the proxy's VmRSS before and
# with the fleet, so the heap figure stands beside the RSS figure of scripts/bench.sh.
#
# Usage: scripts/heap-profile.sh [--agents N] [--transport tcp|quic] [--top K]
#   --agents     tunnels held during the profile (default 1000)
#   --transport  the agents' transport (default tcp)
#   --top        allocation sites printed (default 25)
# Needs: heaptrack (scripts/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root=$PWD
n=1000
transport=tcp
top=25
while [ $# -gt 0 ]; do
  case $1 in
    --agents) n=$2; shift 2 ;;
    --transport) transport=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
command -v heaptrack >/dev/null || { echo "heaptrack is not installed: run ./scripts/install-deps.sh" >&2; exit 1; }

cargo build --quiet --release --locked -p burrow-bench
CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
  cargo build --quiet --release --locked -p burrow-proxy -p burrowctl --target-dir target/profiling
bin=$root/target/profiling/release

scratch_dir burrow-heap

port=$(free_port)
ssh_port=$(free_port)
load_test_config "$work/proxy.yaml"
heaptrack -o "$work/proxy" "$bin/burrow-proxy" start --config "$work/proxy.yaml" \
  --data-dir "$work/proxy-data" --web-listen "127.0.0.1:$port" --ssh-listen "127.0.0.1:$ssh_port" \
  --cluster-name heap >"$work/heaptrack.out" 2>"$work/proxy.log" &
pids+=($!)
wait_for "$work/proxy.log" "web API listening" 60
proxy_pid=$(pgrep -f "^$bin/burrow-proxy start --config $work/proxy.yaml" | head -1)
ctl() { "$bin/burrowctl" --data-dir "$work/proxy-data" "$@"; }
node_token_and_pin 1h
base_rss=$(rss_kb "$proxy_pid")

start_fleet "$root/target/release/burrow-bench" "$port" "$n" "$transport" 1s "$work/fleet.out" 900
sleep 10
rss=$(rss_kb "$proxy_pid")
echo "proxy VmRSS under heaptrack: alone $base_rss KB, with $n $transport tunnels $rss KB:" \
  "$(((rss - base_rss) / n)) KB per tunnel"

# The profile ends with the proxy, while the fleet is still up: its peak is the fleet's heap.
kill -TERM "$proxy_pid"
wait_for "$work/heaptrack.out" "Heaptrack finished" 300
data=$(sed -n 's/^heaptrack output will be written to "\(.*\)"$/\1/p' "$work/heaptrack.out")
out=$root/target/heap-profile-$transport-$n
cp "$data" "$out.zst"
heaptrack_print --print-peaks 1 --print-allocators 0 --print-temporary 0 --print-leaks 0 \
  --peak-limit "$top" --sub-peak-limit 4 --shorten-templates 1 "$data" >"$out.txt"
grep -m1 -i "peak heap memory consumption" "$out.txt" || true
# Each peak consumer with the first frames outside the allocator and the standard library.
python3 - "$out.txt" <<'PY'
import re, sys
skip = re.compile(r"rustlib/src/rust/library|/alloc\.rs|^malloc|^alloc$|^realloc|^calloc|in /")
lines = open(sys.argv[1]).read().split("PEAK MEMORY CONSUMERS", 1)[-1].split("MOST TEMPORARY")[0]
for line in lines.splitlines():
    text = line.strip()
    if re.match(r"^[0-9.]+[KMG]? (peak memory consumed|consumed over)", text):
        print(text)
        shown = 0
    elif text and not skip.search(text) and not text.startswith("at /root/.rustup") and shown < 6:
        print("    " + text)
        shown += 1
PY
echo "full report: $out.txt (data: $out.zst, for heaptrack_gui or heaptrack_print)"
