#!/usr/bin/env bash
# Where SSH bulk node->client loses to OpenSSH: the same transfer through the proxy's jump host
# and a tunnel (against an OpenSSH jump host to sshd), and straight to the agent's SSH server
# (against straight to sshd), then the whole machine's CPU during one transfer of each kind,
# split by process (`perf record -a`).
#
# Usage: scripts/profile-bulk.sh [--mib M] [--transport tcp|quic]
#   --mib        MiB per transfer (default 256)
#   --transport  the agent's tunnel (default tcp)
# Needs: perf (linux-perf) and sshd (openssh-server); run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root=$PWD
mib=256
transport=tcp
while [ $# -gt 0 ]; do
  case $1 in
    --mib) mib=$2; shift 2 ;;
    --transport) transport=$2; shift 2 ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done
command -v perf >/dev/null || { echo "perf is not installed (Debian: linux-perf)" >&2; exit 1; }
[ -x /usr/sbin/sshd ] || { echo "sshd is not installed: run ./scripts/install-deps.sh" >&2; exit 1; }

cargo build --quiet --release --locked --bins
bin=$root/target/release
scratch_dir burrow-bulk
start_scratch_proxy bulk
login=$(id -un)
user_ssh_config "$login" "$login"
agent_port=$(free_port)
"$bin/burrow-agent" start --proxy "127.0.0.1:$port" --ca-pin "$pin" --token "$token" \
  --nodename edge --data-dir "$work/node" --transport "$transport" \
  --ssh-listen "127.0.0.1:$agent_port" 2>"$work/agent.log" &
pids+=($!)
wait_for "$work/agent.log" "tunnel up" 30

openssh_pair
openssh="ssh -F $work/ssh_config_openssh"

n=$((mib * 1048576))
down() { # SSH_COMMAND: MiB/s of n bytes read from the target's `head -c`
  local t0 t1 got
  t0=$(date +%s%3N)
  got=$($1 "head -c $n /dev/zero" | wc -c)
  t1=$(date +%s%3N)
  [ "$got" -eq "$n" ] || { echo "short read: $got bytes through: $1" >&2; exit 1; }
  awk -v m="$mib" -v ms=$((t1 - t0)) 'BEGIN { printf "%.1f", m * 1000 / ms }'
}
through_burrow="ssh -F $work/ssh_config -J $login@127.0.0.1:$ssh_port -p 3022 $login@edge"
through_openssh="$openssh -J $login@127.0.0.1:$jump_port -p $target_port $login@127.0.0.1"
# The agent's own host certificate names the node, not 127.0.0.1: no host check on this hop.
agent_alone="ssh -F $work/ssh_config -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p $agent_port $login@127.0.0.1"
sshd_alone="$openssh -p $target_port $login@127.0.0.1"

echo "== SSH node->client, $mib MiB, MiB/s (two runs each, alternating)"
for run in 1 2; do
  b=$(down "$through_burrow"); o=$(down "$through_openssh")
  a=$(down "$agent_alone"); s=$(down "$sshd_alone")
  echo "run $run: through the proxy ($transport tunnel) $b vs OpenSSH jump host $o" \
    "($(awk -v a="$b" -v b="$o" 'BEGIN { printf "%.2fx", a / b }'));" \
    "agent's SSH server alone $a vs sshd alone $s ($(awk -v a="$a" -v b="$s" 'BEGIN { printf "%.2fx", a / b }'))"
done

echo "== the machine's CPU during one transfer, by process (perf record -a; swapper is idle time)"
for kind in burrow openssh; do
  cmd=$through_burrow
  [ "$kind" = openssh ] && cmd=$through_openssh
  perf record -a -F 499 -o "$work/$kind.data" -- bash -c "$(declare -f down); mib=$mib n=$n; down '$cmd' >/dev/null" >/dev/null 2>&1
  echo "-- through the $kind jump host:"
  perf report -i "$work/$kind.data" --no-children --sort comm 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -6 || true
done
