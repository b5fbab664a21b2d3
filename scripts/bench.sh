#!/usr/bin/env bash
# Burrow's benchmark suite, run on demand (not by CI, which runs `--smoke`). Release builds, all on
# 127.0.0.1. Every figure is printed beside a baseline measured in the same run, and the results
# are appended to BENCHMARKS.md with the machine, the command and the date.
#
# Usage: scripts/bench.sh [--agents N[,N...]] [--mib M] [--smoke] [--no-write]
#   --agents   fleet sizes for memory, idle CPU, dial latency, restart and joins (default 1000;
#              0: no fleet)
#   --mib      MiB per SSH bulk transfer (default 256)
#   --smoke    seconds-long run: 20 agents, 8 MiB, nothing written (what CI runs)
#   --no-write print only; do not append to BENCHMARKS.md
# Needs: openssh-client and openssh-server (sshd for the OpenSSH baseline; run as root for it).
# AGENT_BIN=PATH runs the SSH bulk rows with that agent binary (a static cross build, say);
# PROXY_BIN=PATH runs every row with that proxy binary (an A/B against another build).
# The SSH rows' hop to the jump host (Burrow's proxy and the OpenSSH baseline's alike) uses the
# ciphers `burrowctl ssh-config` sets for the hop on this machine (AES-GCM first with AES
# instructions); BENCH_HOP_DEFAULTS=1 keeps OpenSSH's default order on both.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
root=$PWD

command="scripts/bench.sh $*"
sizes=1000
mib=256
settle=10  # seconds after a fleet is up before measuring
window=20  # seconds of idle CPU measured
write=true
smoke=false
while [ $# -gt 0 ]; do
  case $1 in
    --agents) sizes=$2; shift 2 ;;
    --mib) mib=$2; shift 2 ;;
    --smoke) smoke=true; sizes=20; mib=8; write=false; settle=1; window=2; shift ;;
    --no-write) write=false; shift ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

if $smoke; then
  # The smoke run checks that the suite works, not how fast: a debug build is enough.
  cargo build --quiet --bins
  bin=$root/target/debug
else
  cargo build --quiet --release --bins
  bin=$root/target/release
fi

scratch_dir burrow-bench

results=()
row() { # NAME VALUE BASELINE RATIO
  results+=("| $1 | $2 | $3 | $4 |")
  printf '%-58s %-18s %-26s %s\n' "$1" "$2" "$3" "$4"
}

now_ms() { date +%s%3N; }

# Percent of one core used by PID over SECS seconds.
cpu_pct() {
  local t0 t1 hz
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "$1")
  sleep "$2"
  t1=$(cpu_ticks "$1")
  awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$2" 'BEGIN { printf "%.2f", 100 * d / hz / s }'
}

proxy_port=$(free_port)
ssh_port=$(free_port)
proxy_dir=$work/proxy
load_test_config "$work/proxy.yaml"
start_proxy() {
  start_load_proxy "${PROXY_BIN:-$bin/burrow-proxy}" "$proxy_dir" bench \
    --web-listen "127.0.0.1:$proxy_port" --ssh-listen "127.0.0.1:$ssh_port"
}
ctl() { "$bin/burrowctl" --data-dir "$proxy_dir" "$@"; }

: >"$work/proxy.log"
start_proxy
wait_for "$work/proxy.log" "web API listening" 30
node_token_and_pin 2h

echo "== Burrow benchmarks ($(date -u +%F), $(nproc) cores, binaries: $bin)"
printf '%-58s %-18s %-26s %s\n' measure burrow baseline ratio

login=$(id -un)
user_ssh_config "$login" "$login"
# The OpenSSH baseline: two sshd on loopback, one as the jump host, one as the target.
openssh_servers=false
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/sshd ]; then
  openssh_pair
  openssh_servers=true
fi

# The hop to the jump host, Burrow's proxy or OpenSSH's, with the ciphers `burrowctl ssh-config`
# sets for the hop to the proxy on this machine (AES-GCM first where the CPU has AES
# instructions), the sessions to the nodes inside with OpenSSH's order: like for like.
# BENCH_HOP_DEFAULTS=1 keeps OpenSSH's order on both hops, for an A/B.
hop_ciphers=$(ctl ssh-config --user "$login" --key "$work/key" \
  --known-hosts "$work/generated_known_hosts" | awk '$1 == "Ciphers" { print $2 }')
openssh_jump=127.0.0.1
if [ -n "$hop_ciphers" ] && [ -z "${BENCH_HOP_DEFAULTS:-}" ]; then
  # Burrow's nodes are reached by name: 127.0.0.1 is the proxy only.
  printf 'Host 127.0.0.1\n  Ciphers %s\n' "$hop_ciphers" | cat - "$work/ssh_config" >"$work/ssh_config.new"
  mv "$work/ssh_config.new" "$work/ssh_config"
  # OpenSSH's target is 127.0.0.1 too: its jump host goes by another name.
  if $openssh_servers; then
    printf 'Host bench-jump\n  HostName 127.0.0.1\n  Ciphers %s\n' "$hop_ciphers" >>"$work/ssh_config_openssh"
    openssh_jump=bench-jump
  fi
  hop="hop: ${hop_ciphers%%,*} both"
else
  hop="hop: OpenSSH's default both"
fi

# p50 and p99, in ms, of $dials dials through a jump host over one SSH connection (ControlMaster):
# each `ssh -W` opens a channel to TARGET (a command printing a host:port) and waits for its banner.
dials=200
$smoke && dials=10
dial_latency() { # SSH_CONFIG JUMP(user@host) PORT TARGET_COMMAND
  local sock=$work/mux.sock times=$work/dial-times
  ssh -F "$1" -o ControlMaster=yes -o ControlPath="$sock" -o ControlPersist=no -f -N -p "$3" "$2"
  : >"$times"
  for _ in $(seq 1 "$dials"); do
    local target t0 t1
    target=$($4)
    t0=$(date +%s%N)
    ssh -F "$1" -S "$sock" -W "$target" "$2" </dev/null 2>/dev/null | head -c 4 >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000)) >>"$times"
  done
  ssh -F "$1" -S "$sock" -O exit "$2" 2>/dev/null || true
  sort -n "$times" | awk '{ v[NR] = $1 } END {
    printf "%.1f %.1f", v[int(NR * 0.5 + 0.5)] / 1000, v[int(NR * 0.99 + 0.5)] / 1000 }'
}

# ---- fleet: joins, memory per tunnel, idle CPU, restart -----------------------------------------
# Starts the proxy again after its process ended; returns once it is listening.
start_proxy_again() {
  local mark
  mark=$(wc -l <"$work/proxy.log")
  start_proxy
  local deadline=$((SECONDS + 30))
  until tail -n +"$((mark + 1))" "$work/proxy.log" | grep -q "web API listening"; do
    [ $SECONDS -lt $deadline ] || { echo "the proxy did not restart" >&2; exit 1; }
    sleep 0.02
  done
}

# Stops the proxy (SIGTERM) and starts it again: a fresh process for the next baseline.
restart_proxy() {
  kill "$proxy_pid"
  wait "$proxy_pid" 2>/dev/null || true
  start_proxy_again
  sleep 1
}

fleet() { # TRANSPORT N
  local transport=$1 n=$2 out=$work/fleet-$1-$2.out base_rss base_cpu rss cpu up_ms back_ms
  restart_proxy # memory a process freed stays in its heap: each fleet gets a fresh proxy
  base_rss=$(rss_kb "$proxy_pid")
  base_cpu=$(cpu_pct "$proxy_pid" "$window")
  local bench_pid
  start_fleet "$bin/burrow-bench" "$proxy_port" "$n" "$transport" 250ms "$out" 600
  if grep -q "^joined [1-9]" "$out"; then
    local joined rate
    joined=$(sed -n 's/^joined \([0-9]*\) agents in \([0-9.]*\)s (\([0-9.]*\)\/s).*/\1 in \2 s/p' "$out")
    rate=$(sed -n 's/^joined .*(\([0-9.]*\)\/s).*/\1/p' "$out")
    row "joins per second, one proxy ($joined, 16 at once)" "$rate/s" "-" "-"
  fi
  sleep "$settle" # let handshakes and first presence writes settle
  rss=$(rss_kb "$proxy_pid")
  cpu=$(cpu_pct "$proxy_pid" "$window")
  row "proxy memory per idle tunnel, $transport, $n tunnels" \
    "$(((rss - base_rss) / n)) KB" "proxy alone: $((base_rss / 1024)) MB" "target <= 20 KB"
  row "proxy idle CPU, $transport, $n tunnels" "$cpu % of a core" "no tunnels: $base_cpu %" \
    "$(awk -v c="$cpu" -v n="$n" 'BEGIN { printf "%.2f %% per 1,000", c * 1000 / n }')"

  local dial base
  random_agent() { echo "bench-$((RANDOM % n)):3022"; }
  dial=$(dial_latency "$work/ssh_config" "$login@127.0.0.1" "$ssh_port" random_agent)
  base="-"
  if $openssh_servers; then
    openssh_target() { echo "127.0.0.1:$target_port"; }
    base=$(dial_latency "$work/ssh_config_openssh" "$login@$openssh_jump" "$jump_port" openssh_target)
    base="OpenSSH jump: ${base% *} / ${base#* } ms"
  fi
  row "dial to the node's banner p50 / p99, $transport, $n tunnels" "${dial% *} / ${dial#* } ms" \
    "$base" "$dials dials, one SSH connection"

  # kill -9 and restart: time from the proxy accepting again until every agent is back, counted
  # on the proxy (a new "tunnel up" per agent): an agent that has not yet noticed the crash (QUIC
  # learns of it at its next keep-alive) still counts itself up.
  kill -9 "$proxy_pid"
  wait "$proxy_pid" 2>/dev/null || true
  local mark count
  mark=$(wc -l <"$work/proxy.log")
  local drops0 bench_cpu0 proxy_cpu="" bench_cpu=""
  drops0=$(udp_rcvbuf_errors)
  bench_cpu0=$(cpu_ms "$bench_pid")
  start_proxy_again
  up_ms=$(now_ms)
  back_ms=""
  local deadline=$((SECONDS + 120))
  while [ $SECONDS -lt $deadline ]; do
    count=$(tail -n +"$((mark + 1))" "$work/proxy.log" | grep -c "tunnel up" || true)
    if [ "$count" -ge "$n" ]; then
      back_ms=$(($(now_ms) - up_ms))
      # What the return cost each side (the proxy since it started, the load tool's agents since
      # the kill): on this one machine both share its cores.
      proxy_cpu=$(cpu_ms "$proxy_pid" || true)
      bench_cpu=$(($(cpu_ms "$bench_pid" || echo "$bench_cpu0") - bench_cpu0))
      break
    fi
    sleep 0.25
  done
  local refused cost="-"
  [ -z "$proxy_cpu" ] ||
    cost=$(awk -v p="$proxy_cpu" -v a="$bench_cpu" 'BEGIN { printf "CPU: proxy %.1f s, agents %.1f s", p / 1000, a / 1000 }')
  refused=$(tail -n +"$((mark + 1))" "$work/proxy.log" |
    grep -ciE "refused: too many|dropped: too many|overload|timed out" || true)
  row "every agent back after kill -9 + restart, $transport, $n" \
    "${back_ms:-never (120 s)} ms" \
    "$cost" \
    "proxy log lines refused/timed out: $refused; UDP datagrams dropped (full buffer): $(($(udp_rcvbuf_errors) - drops0))"
  kill "$bench_pid" 2>/dev/null || true
  wait "$bench_pid" 2>/dev/null || true
}

for n in ${sizes//,/ }; do
  [ "$n" -gt 0 ] || continue
  fleet tcp "$n"
  fleet quic "$n"
done

# ---- SSH bulk: Burrow (proxy + tunnel) vs an OpenSSH jump host ----------------------------------
# One agent per transport; then rounds of one transfer each way through each path (OpenSSH first),
# so that a machine that slows down or speeds up during the run does so for all of them; each
# figure is the median of its rounds.
bulk_agent() { # TRANSPORT
  "${AGENT_BIN:-$bin/burrow-agent}" start --proxy "127.0.0.1:$proxy_port" --ca-pin "$pin" --token "$token" \
    --nodename "bulk-$1" --data-dir "$work/node-$1" --transport "$1" 2>"$work/agent-$1.log" &
  pids+=("$!")
  wait_for "$work/agent-$1.log" "tunnel up" 30
}

# MiB/s of MIB MiB sent to (up) or read from (down) the target of an ssh command line.
transfer_up() {
  local t0 t1
  t0=$(now_ms)
  head -c "$((mib * 1048576))" /dev/zero | $1 'cat >/dev/null'
  t1=$(now_ms)
  awk -v m="$mib" -v ms=$((t1 - t0)) 'BEGIN { printf "%.1f", m * 1000 / ms }'
}
transfer_down() {
  local t0 t1 got
  t0=$(now_ms)
  got=$($1 "head -c $((mib * 1048576)) /dev/zero" | wc -c)
  t1=$(now_ms)
  [ "$got" -eq $((mib * 1048576)) ] || { echo "short read: $got bytes" >&2; exit 1; }
  awk -v m="$mib" -v ms=$((t1 - t0)) 'BEGIN { printf "%.1f", m * 1000 / ms }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

rounds=3
$smoke && rounds=1
kinds=(quic tcp)
$openssh_servers && kinds=(openssh quic tcp)
bulk_agent quic
bulk_agent tcp
declare -A ups downs
for ((round = 1; round <= rounds; round++)); do
  for kind in "${kinds[@]}"; do
    if [ "$kind" = openssh ]; then
      target="ssh -F $work/ssh_config_openssh -J $login@$openssh_jump:$jump_port -p $target_port $login@127.0.0.1"
    else
      target="ssh -F $work/ssh_config -J $login@127.0.0.1:$ssh_port -p 3022 $login@bulk-$kind"
    fi
    ups[$kind]+="$(transfer_up "$target") "
    downs[$kind]+="$(transfer_down "$target") "
  done
done
of="median of $rounds"
[ "$rounds" -gt 1 ] || of="one run"
for transport in quic tcp; do
  # shellcheck disable=SC2086 # a list of figures
  up=$(median ${ups[$transport]}); down=$(median ${downs[$transport]})
  if $openssh_servers; then
    # shellcheck disable=SC2086
    o_up=$(median ${ups[openssh]}); o_down=$(median ${downs[openssh]})
    ratio_up=$(awk -v a="$up" -v b="$o_up" 'BEGIN { printf "%.2fx", a / b }')
    ratio_down=$(awk -v a="$down" -v b="$o_down" 'BEGIN { printf "%.2fx", a / b }')
  else
    o_up="(needs root)"; o_down="(needs root)"; ratio_up="-"; ratio_down="-"
  fi
  row "SSH bulk client->node, $transport, $mib MiB ($of; $hop)" "$up MiB/s" "OpenSSH jump: $o_up MiB/s" "$ratio_up (target >= 0.9x)"
  row "SSH bulk node->client, $transport, $mib MiB ($of; $hop)" "$down MiB/s" "OpenSSH jump: $o_down MiB/s" "$ratio_down (target >= 0.9x)"
done

if $write; then
  {
    echo
    echo "## $(date -u '+%F %H:%M UTC'): \`$command\`"
    echo
    echo "Machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r); commit $(git rev-parse --short HEAD)."
    echo
    echo "| measure | burrow | baseline | ratio |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${results[@]}"
  } >>BENCHMARKS.md
  echo "== appended to BENCHMARKS.md"
fi
