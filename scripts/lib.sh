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
  rm -rf "$work"
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
  token=$(ctl --format json tokens add --type node --ttl 1h | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
  pin=$(ctl --format json status | sed -n 's/.*"ca_pin": "\(.*\)".*/\1/p')
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
