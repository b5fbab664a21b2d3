# Shell helpers shared by the benchmark scripts (sourced, not run).

# Waits until FILE contains PATTERN, for at most SECONDS; prints FILE's end if it never does.
wait_for() { # FILE PATTERN SECONDS
  local deadline=$((SECONDS + $3))
  while [ $SECONDS -lt "$deadline" ]; do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "timed out waiting for '$2' in $1:" >&2
  tail -20 "$1" >&2
  return 1
}

# A free loopback port (TCP and UDP) below the kernel's ephemeral range, so that no outgoing
# connection takes it as a source port before a daemon binds it (or while a proxy restarts).
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(2000):
    port = random.randrange(10000, max(low, 11000))
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("no free loopback port below the ephemeral range")
PY
}

# A scratch directory $work, removed on exit, and $pids, the background processes killed then.
scratch_dir() { # PREFIX
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap scratch_cleanup EXIT
}
scratch_cleanup() {
  {
    for p in "${pids[@]}"; do kill -9 "$p" || true; done
    wait || true
  } 2>/dev/null
  # BURROW_KEEP_SCRATCH=1 keeps the logs and data for a look afterwards.
  if [ -n "${BURROW_KEEP_SCRATCH:-}" ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
}

# What /proc says of process PID: its resident memory in KB, its CPU time (user + system) in
# clock ticks and in ms.
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cpu_ms() { echo $(($(cpu_ticks "$1") * 1000 / $(getconf CLK_TCK))); }

# A proxy for a load test, in the background, with the config in $work/proxy.yaml: appends its
# log to $work/proxy.log, sets $proxy_pid. Handshakes refused for load are logged (at debug), so
# that a restart's figures can count them.
start_load_proxy() { # BINARY DATA_DIR CLUSTER_NAME LISTEN_FLAGS...
  local binary=$1 data=$2 cluster=$3
  shift 3
  RUST_LOG=info,burrow_proxy::tunnel::listen=debug,burrow_proxy::web=debug \
    "$binary" start --config "$work/proxy.yaml" --data-dir "$data" --cluster-name "$cluster" \
    "$@" 2>>"$work/proxy.log" &
  proxy_pid=$!
  pids+=("$proxy_pid")
}

# A multi-use node $token valid for TTL and the cluster's CA $pin, from `ctl`.
node_token_and_pin() { # TTL
  token=$(ctl --format json tokens add --type node --ttl "$1" | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
  pin=$(ctl --format json status | sed -n 's/.*"ca_pin": "\(.*\)".*/\1/p')
}

# COUNT simulated agents of the load tool in the background, joined with $token and $pin to the
# proxy at 127.0.0.1:PORT (identities in $work/agents), answering dials with a banner; its report
# every REPORT in OUT (errors in OUT.err). Sets $bench_pid; returns once all are up.
start_fleet() { # BENCH_BINARY PORT COUNT TRANSPORT REPORT OUT SECONDS
  "$1" agents --proxy "127.0.0.1:$2" --token "$token" --ca-pin "$pin" --count "$3" \
    --transport "$4" --data-dir "$work/agents" --join-parallel 16 --serve banner \
    --report-every "$5" >"$6" 2>"$6.err" &
  bench_pid=$!
  pids+=("$bench_pid")
  wait_for "$6" "all $3 agents up" "$7"
}

# A proxy from $bin on free loopback ports with its data in $work/proxy; sets $port (web and
# tunnels), $ssh_port, a one-hour node $token, the cluster's $pin, and `ctl` (burrowctl on it).
start_scratch_proxy() { # CLUSTER_NAME
  port=$(free_port)
  ssh_port=$(free_port)
  "$bin/burrow-proxy" start --data-dir "$work/proxy" --web-listen "127.0.0.1:$port" \
    --ssh-listen "127.0.0.1:$ssh_port" --cluster-name "$1" 2>"$work/proxy.log" &
  pids+=($!)
  wait_for "$work/proxy.log" "web API listening" 30
  ctl() { "$bin/burrowctl" --data-dir "$work/proxy" "$@"; }
  node_token_and_pin 1h
}

# A user key with a certificate for LOGINS ($work/key), the cluster's host CA as
# $work/known_hosts, and $work/ssh_config using both, strictly and without prompts. Needs `ctl`.
user_ssh_config() { # USER LOGINS
  ctl auth sign --user "$1" --logins "$2" --ttl 1h --out "$work/key" >/dev/null
  ctl auth export --type host >"$work/known_hosts"
  cat >"$work/ssh_config" <<CONFIG
Host *
  UserKnownHostsFile $work/known_hosts
  StrictHostKeyChecking yes
  IdentityFile $work/key
  IdentitiesOnly yes
  BatchMode yes
  LogLevel ERROR
CONFIG
}

# COUNT proxies from $bin on one etcd, behind a haproxy round-robin balancer at $lb (their public
# address), as a fleet's agents see a cluster; their data in $work/proxyN. Sets $lb, $ssh_port
# (proxy 0's jump host), a one-hour node $token, the cluster's $pin, and `ctl` (on proxy 0).
# Needs etcd and haproxy (./scripts/install-deps.sh).
start_scratch_cluster() { # CLUSTER_NAME COUNT
  local client peer i haproxy_cfg
  client=$(free_port); peer=$(free_port)
  etcd --name scratch --data-dir "$work/etcd" --listen-metrics-urls '' \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "scratch=http://127.0.0.1:$peer" 2>"$work/etcd.log" &
  pids+=($!)
  wait_for "$work/etcd.log" "ready to serve client requests" 30
  lb=127.0.0.1:$(free_port)
  haproxy_cfg=$work/haproxy.cfg
  printf 'global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  retries 3\n  option redispatch\nfrontend tunnels\n  bind %s\n  default_backend proxies\nbackend proxies\n  balance roundrobin\n' "$lb" >"$haproxy_cfg"
  local web=()
  for i in $(seq 0 $(($2 - 1))); do
    web[i]=127.0.0.1:$(free_port)
    printf '  server p%s %s check inter 500ms fall 1 rise 1\n' "$i" "${web[i]}" >>"$haproxy_cfg"
  done
  haproxy -db -f "$haproxy_cfg" 2>"$work/haproxy.log" &
  pids+=($!)
  for i in $(seq 0 $(($2 - 1))); do
    local jump=$(free_port)
    [ "$i" = 0 ] && ssh_port=$jump
    "$bin/burrow-proxy" start --data-dir "$work/proxy$i" --web-listen "${web[i]}" \
      --ssh-listen "127.0.0.1:$jump" --cluster-name "$1" --storage etcd \
      --etcd-endpoint "http://127.0.0.1:$client" --public-addr "$lb" 2>"$work/proxy$i.log" &
    pids+=($!)
    # The first creates the cluster; the others then find it in etcd.
    wait_for "$work/proxy$i.log" "web API listening" 30
  done
  # Until the balancer's health checks see them all: readiness probes through it reach each.
  local seen=""
  for i in $(seq 200); do
    seen=$(printf '%s\n%s\n' "$seen" "$(curl -sk --max-time 2 "https://$lb/readyz" |
      sed -n 's/.*"proxy_id": *"\([^"]*\)".*/\1/p')" | sort -u | grep . || true)
    [ "$(printf '%s\n' "$seen" | grep -c .)" -ge "$2" ] && break
    sleep 0.1
  done
  [ "$(printf '%s\n' "$seen" | grep -c .)" -ge "$2" ] || { echo "the balancer does not reach all $2 proxies" >&2; return 1; }
  ctl() { "$bin/burrowctl" --data-dir "$work/proxy0" "$@"; }
  node_token_and_pin 1h
}

# The OpenSSH baseline: two sshd on loopback, $jump_port (a jump host) and $target_port, that let
# in $work/sshd/user_key, and $work/ssh_config_openssh using that key without host checks (a
# config file, not -o options: `-J` hands only the file to the jump host's ssh). Needs root.
openssh_pair() {
  mkdir -p /run/sshd "$work/sshd"
  ssh-keygen -q -t ed25519 -N '' -f "$work/sshd/host_key"
  ssh-keygen -q -t ed25519 -N '' -f "$work/sshd/user_key"
  cp "$work/sshd/user_key.pub" "$work/sshd/authorized_keys"
  jump_port=$(free_port)
  target_port=$(free_port)
  local p
  for p in "$jump_port" "$target_port"; do
    /usr/sbin/sshd -D -e -f /dev/null -p "$p" -o ListenAddress=127.0.0.1 \
      -o HostKey="$work/sshd/host_key" -o AuthorizedKeysFile="$work/sshd/authorized_keys" \
      -o PermitRootLogin=prohibit-password -o StrictModes=no -o UsePAM=no \
      -o PidFile=none 2>>"$work/sshd.log" &
    pids+=($!)
  done
  sleep 0.5
  cat >"$work/ssh_config_openssh" <<CONFIG
Host *
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  IdentityFile $work/sshd/user_key
  IdentitiesOnly yes
  BatchMode yes
  LogLevel ERROR
CONFIG
}

# A proxy config file for a load test: every simulated agent comes from 127.0.0.1, so the
# per-source connection limit is raised (a real fleet comes from many addresses).
load_test_config() { # FILE
  cat >"$1" <<YAML
limits:
  web_max_connections: 100000
  web_max_connections_per_source: 100000
YAML
}

# Datagrams the kernel dropped, machine-wide, because a UDP socket's receive buffer was full.
udp_rcvbuf_errors() {
  awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") c = i; h = 1 } else print $c }' /proc/net/snmp
}
