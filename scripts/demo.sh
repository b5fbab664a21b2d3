#!/usr/bin/env bash
# The main job, end to end on this machine: a local cluster on the embedded backend, a join
# token written to a file, an agent that joins with it through the proxy's web port and holds
# its tunnel, and a plain OpenSSH session into the node through the tunnel.
# Everything runs on 127.0.0.1 in a temporary directory and is stopped at the end
# (pass --keep to leave the cluster running until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

keep=false
[ "${1:-}" = "--keep" ] && keep=true

./scripts/install-deps.sh >/dev/null
echo "==> building"
cargo build --quiet --bins
bin=$PWD/target/debug
work=$(mktemp -d /tmp/burrow-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "==> stopped; logs and state are in $work"
}
trap cleanup EXIT

echo "==> starting a proxy (cluster 'demo', data in $work/proxy)"
"$bin/burrow-proxy" start --data-dir "$work/proxy" --web-listen 127.0.0.1:0 --cluster-name demo \
  --ssh-listen 127.0.0.1:0 2>"$work/proxy.log" &
pids+=($!)
wait_for "$work/proxy.log" "web API listening" 10 || { cat "$work/proxy.log"; echo "the proxy did not start"; exit 1; }
ctl() { "$bin/burrowctl" --data-dir "$work/proxy" "$@"; }

echo "==> burrowctl status"
ctl status
echo "==> burrowctl tokens add --type node --ttl 5m"
ctl tokens add --type node --ttl 5m --labels env=demo | tee "$work/token.txt"
token=$(sed -n 's/^The invite token: //p' "$work/token.txt")
pin=$(ctl --format json status | sed -n 's/.*"ca_pin": "\(.*\)".*/\1/p')
proxy_addr=$(cat "$work/proxy/web-addr")
mkdir -p "$work/agent" && chmod 700 "$work/agent"
printf '%s\n' "$token" >"$work/agent/token"
chmod 600 "$work/agent/token"

echo "==> burrow-agent start --token $work/agent/token --proxy $proxy_addr --ca-pin $pin"
"$bin/burrow-agent" start --token "$work/agent/token" --proxy "$proxy_addr" --ca-pin "$pin" \
  --data-dir "$work/agent" --nodename demo-node 2>"$work/agent.log" &
pids+=($!)
wait_for "$work/agent.log" "tunnel up" 10 || true
cat "$work/agent.log"
grep -q "joined the cluster" "$work/agent.log" || { echo "the agent did not join"; exit 1; }
grep -q "tunnel up" "$work/agent.log" || { echo "the agent opened no tunnel"; exit 1; }
echo "==> the node's identity: $(ls -l "$work/agent/identity.json")"
echo "==> burrowctl nodes ls"
ctl nodes ls

login=$(id -un)
ssh_addr=$(sed -n 's/.*SSH jump host listening on \([0-9.:]*\).*/\1/p' "$work/proxy.log" | head -1)
echo "==> burrowctl auth sign --user $login --logins $login --ttl 1h --out $work/key"
user_ssh_config "$login" "$login"
echo "==> ssh -F $work/ssh_config -J $login@$ssh_addr $login@demo-node"
ssh -F "$work/ssh_config" -J "$login@$ssh_addr" "$login@demo-node" \
  'echo "hello from $(hostname) as $(whoami), through the tunnel"'

# As a user sets it up once: a key where ssh-config looks for it, then a generated config block
# (a scratch HOME stands for the user's; the block goes to its own file instead of ~/.ssh/config).
home="$work/home"
mkdir -p "$home/.ssh" && chmod 700 "$home/.ssh"
echo "==> burrowctl auth sign --user $login --logins $login --out ~/.ssh/burrow-demo"
HOME=$home ctl auth sign --user "$login" --logins "$login" --ttl 1h --out "$home/.ssh/burrow-demo" >/dev/null
echo "==> burrowctl ssh-config --user $login"
HOME=$home ctl ssh-config --user "$login" | tee "$home/ssh_config"
echo "==> ssh demo-node.demo"
ssh -F "$home/ssh_config" -o BatchMode=yes demo-node.demo \
  'echo "hello again from $(hostname), through a generated config"'

if $keep; then
  echo "==> the cluster keeps running; try the ssh command above; Ctrl-C stops it"
  wait
fi
echo "==> demo OK"
