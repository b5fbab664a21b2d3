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
