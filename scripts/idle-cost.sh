#!/usr/bin/env bash
# What an idle tunnel costs on the wire, as a metered link bills it: every IP packet between an
# agent and its proxy, IP and transport headers included, counted by tcpdump on loopback while
# nothing else happens, scaled to one hour.
#
# One proxy and four agents at once: QUIC and TCP with the default keep-alives, and QUIC and TCP
# with a 5 s keep-alive (the baseline: the tunnels' keep-alive interval before issue 17, without
# the 3 s pings and 10 s heartbeats that came on top of it). Each agent's packets are told apart
# by its socket's port (ss). Results are appended to BENCHMARKS.md.
#
# Usage: scripts/idle-cost.sh [--minutes M] [--no-write]
#   --minutes  how long to capture once every tunnel is up (default 10)
#   --no-write print only
# Needs: tcpdump and ss (run as root for the capture); python3.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root=$PWD
command="scripts/idle-cost.sh $*"
minutes=10
write=true
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) minutes=$2; shift 2 ;;
    --no-write) write=false; shift ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
command -v tcpdump >/dev/null || { echo "tcpdump is not installed: run ./scripts/install-deps.sh" >&2; exit 1; }

# Bytes on the wire do not depend on the build profile.
cargo build --quiet --bins
bin=$root/target/debug

scratch_dir burrow-idle

start_scratch_proxy idle

# name transport keepalive (empty: the default)
agents=("quic-default quic " "tcp-default tcp " "quic-5s quic 5s" "tcp-5s tcp 5s")
declare -A agent_pid
for spec in "${agents[@]}"; do
  read -r name transport keepalive <<<"$spec"
  extra=()
  [ -n "$keepalive" ] && extra=(--keepalive "$keepalive")
  "$bin/burrow-agent" start --proxy "127.0.0.1:$port" --token "$token" --ca-pin "$pin" \
    --data-dir "$work/$name" --nodename "$name" --transport "$transport" "${extra[@]}" \
    2>"$work/$name.log" &
  agent_pid[$name]=$!
  pids+=($!)
done
for spec in "${agents[@]}"; do
  read -r name _ <<<"$spec"
  wait_for "$work/$name.log" "tunnel up" 60
done
sleep 2 # the joins' web connections close

# Each agent's port towards the proxy, from its own sockets.
declare -A agent_port
for spec in "${agents[@]}"; do
  read -r name transport _ <<<"$spec"
  if [ "$transport" = quic ]; then
    # The agent's one UDP socket (unconnected: it has no peer to match).
    agent_port[$name]=$(ss -Hunap | grep "pid=${agent_pid[$name]}," | awk '{print $4}' |
      sed 's/.*://' | head -1)
  else
    agent_port[$name]=$(ss -Htnp | grep "pid=${agent_pid[$name]}," |
      awk -v p=":$port" '$5 ~ p"$" {print $4}' | sed 's/.*://' | head -1)
  fi
  [ -n "${agent_port[$name]}" ] || { echo "cannot find $name's socket" >&2; exit 1; }
done

seconds=$((minutes * 60))
echo "capturing $seconds s of idle tunnels on 127.0.0.1:$port ..."
timeout "$seconds" tcpdump -i lo -nn -s 96 -w "$work/idle.pcap" "port $port" 2>"$work/tcpdump.log" || true

summary=$(python3 - "$work/idle.pcap" "$port" "$seconds" "${!agent_port[@]}" -- "${agent_port[@]}" <<'PY'
import struct, sys
path, proxy, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rest = sys.argv[4:]
cut = rest.index("--")
names, ports = rest[:cut], [int(p) for p in rest[cut + 1:]]
by_port = dict(zip(ports, names))
data = open(path, "rb").read()
magic = struct.unpack("<I", data[:4])[0]
endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
linktype = struct.unpack(endian + "I", data[20:24])[0]
link = {1: 14, 113: 16, 276: 20}.get(linktype, 14)  # Ethernet on lo, Linux cooked captures
off, totals = 24, {n: [0, 0] for n in names}
while off + 16 <= len(data):
    _, _, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
    pkt = data[off + 16:off + 16 + incl]
    off += 16 + incl
    ip = pkt[link:]
    if len(ip) < 20:
        continue
    if ip[0] >> 4 == 4:
        ihl, length, proto = (ip[0] & 15) * 4, struct.unpack("!H", ip[2:4])[0], ip[9]
    else:
        ihl, length, proto = 40, 40 + struct.unpack("!H", ip[4:6])[0], ip[6]
    sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
    agent = sport if dport == proxy else dport
    if agent in by_port:
        totals[by_port[agent]][0] += length
        totals[by_port[agent]][1] += 1
for n in names:
    b, p = totals[n]
    print(f"{n} {b} {p} {b * 3600 / seconds / 1000:.1f}")
PY
)

declare -A per_hour packets
while read -r name bytes count kb; do
  per_hour[$name]=$kb
  packets[$name]=$count
done <<<"$summary"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
rows=()
for t in quic tcp; do
  rows+=("| idle tunnel, $t, default keep-alive | ${per_hour[$t-default]} KB/h (${packets[$t-default]} packets) | 5 s keep-alive: ${per_hour[$t-5s]} KB/h (${packets[$t-5s]} packets) | $(ratio "${per_hour[$t-default]}" "${per_hour[$t-5s]}") |")
done
printf '%-40s %-28s %-40s %s\n' measure burrow baseline ratio
for r in "${rows[@]}"; do
  IFS='|' read -r _ m v b x _ <<<"$r"
  printf '%-40s %-28s %-40s %s\n' "$(echo $m)" "$(echo $v)" "$(echo $b)" "$(echo $x)"
done

if $write; then
  {
    echo
    echo "## Idle cost on the wire, $(date -u '+%F %H:%M') UTC"
    echo
    echo "Machine: $(nproc) cores, $(uname -sr). Command: \`$command\` ($minutes min of capture;"
    echo "IP and transport headers counted, as a carrier bills them; target <= 50 KB/h)."
    echo
    echo "| measure | burrow | baseline | ratio |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
  } >>"$root/BENCHMARKS.md"
  echo "appended to BENCHMARKS.md"
fi
