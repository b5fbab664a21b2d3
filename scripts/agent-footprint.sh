#!/usr/bin/env bash
# The agent's footprint on a small device: resident memory idle and at its peak during SSH bulk
# transfers (256 MiB each way), and CPU while idle, for one agent per transport holding a tunnel
# to one proxy on 127.0.0.1; then the idle RSS of one agent holding three tunnels (TCP) to three
# proxies on etcd behind a haproxy round-robin balancer.
#
# Usage: scripts/agent-footprint.sh [AGENT_BINARY] [--idle-seconds N]
#   AGENT_BINARY  default: the static x86_64 build (./cross/build.sh --agent-only
#                 x86_64-unknown-linux-musl), as shipped
# Needs: openssh-client, etcd, haproxy; run as root (the sessions log in as root).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
agent=target/x86_64-unknown-linux-musl/release/burrow-agent
idle=60
while [ $# -gt 0 ]; do
  case $1 in
    --idle-seconds) idle=$2; shift 2 ;;
    *) agent=$1; shift ;;
  esac
done
[ -x "$agent" ] || { echo "no agent at $agent: run ./cross/build.sh --agent-only x86_64-unknown-linux-musl" >&2; exit 1; }
cargo build --quiet -p burrow-proxy -p burrowctl
bin=target/debug

scratch_dir burrow-footprint

start_scratch_proxy footprint
user_ssh_config alice root

declare -A pid
for t in quic tcp; do
  "$agent" start --proxy "127.0.0.1:$port" --token "$token" --ca-pin "$pin" \
    --data-dir "$work/agent-$t" --nodename "fp-$t" --transport "$t" 2>"$work/agent-$t.log" &
  pid[$t]=$!
  pids+=($!)
done
for t in quic tcp; do wait_for "$work/agent-$t.log" "tunnel up" 30; done
sleep 5

kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
declare -A rss t0
for t in quic tcp; do rss[$t]=$(kb "${pid[$t]}" VmRSS); t0[$t]=$(cpu_ticks "${pid[$t]}"); done
sleep "$idle"
hz=$(getconf CLK_TCK)
printf '%-6s %-16s %-22s %-20s %s\n' agent "idle RSS" "idle CPU ($idle s)" "peak RSS (bulk)" "binary"
for t in quic tcp; do
  cpu=$(awk -v d=$(($(cpu_ticks "${pid[$t]}") - ${t0[$t]})) -v hz="$hz" -v s="$idle" \
    'BEGIN { printf "%.3f %% of a core", 100 * d / hz / s }')
  ssh_to="ssh -F $work/ssh_config -J alice@127.0.0.1:$ssh_port -p 3022 root@fp-$t"
  head -c 268435456 /dev/zero | $ssh_to 'cat > /dev/null'
  got=$($ssh_to 'head -c 268435456 /dev/zero' | wc -c)
  [ "$got" -eq 268435456 ] || { echo "bulk through $t lost bytes: $got" >&2; exit 1; }
  printf '%-6s %-16s %-22s %-20s %s\n' "$t" "${rss[$t]} kB" "$cpu" "$(kb "${pid[$t]}" VmHWM) kB" "$agent ($(stat -c %s "$agent") bytes)"
done

# Three tunnels: one agent given only a round-robin balancer in front of three proxies on etcd,
# as a fleet runs. Over TCP only: the balancer (haproxy) carries no UDP.
start_scratch_cluster footprint3 3
"$agent" start --proxy "$lb" --token "$token" --ca-pin "$pin" --data-dir "$work/agent-3" \
  --nodename fp-3 --transport tcp 2>"$work/agent-3.log" &
three=$!
pids+=($three)
for _ in $(seq 600); do
  [ "$(grep -c 'tunnel up' "$work/agent-3.log")" -ge 3 ] && break
  sleep 0.1
done
[ "$(grep -c 'tunnel up' "$work/agent-3.log")" -ge 3 ] || { echo "the agent holds fewer than three tunnels:" >&2; tail "$work/agent-3.log" >&2; exit 1; }
sleep "$idle"
printf '%-6s %-16s (three tunnels, behind a balancer, after %s s idle)\n' tcp "$(kb "$three" VmRSS) kB" "$idle"
