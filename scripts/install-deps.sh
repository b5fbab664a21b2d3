#!/usr/bin/env bash
# Installs what building and testing Burrow needs, idempotently: safe to run on every CI run.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages the build and the tests use: real peers instead of mocks.
have cc || need_apt+=(build-essential)           # ring's C parts
have protoc || need_apt+=(protobuf-compiler)     # etcd-client's build
have etcd || need_apt+=(etcd-server)             # the HA backend in tests
have haproxy || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)  # the round-robin balancer in tests
have ssh || need_apt+=(openssh-client)           # the real SSH client in tests
have curl || need_apt+=(curl)                    # raw HTTP in tests (slow bodies, etcd's gateway)
have openssl || need_apt+=(openssl)              # a rogue TLS server in tests (s_server)
[ -x /usr/lib/openssh/sftp-server ] || need_apt+=(openssh-sftp-server)  # scp/sftp on nodes
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)  # the OpenSSH jump-host baseline in scripts/bench.sh
have qemu-aarch64-static || need_apt+=(qemu-user-static)  # the ARM agents in tests
have systemd-analyze || need_apt+=(systemd)          # verifying the units in tests
have rpm || need_apt+=(rpm)                          # inspecting the .rpm packages
have adduser || need_apt+=(adduser)                  # the proxy package's system user
have ip && have ss || need_apt+=(iproute2)           # network namespaces for the NAT test bed
have nft || need_apt+=(nftables)                     # the NAT router in the test bed
have conntrack || need_apt+=(conntrack)              # the router forgetting its mappings
have tcpdump || need_apt+=(tcpdump)                  # bytes on the wire (scripts/idle-cost.sh)
have heaptrack || need_apt+=(heaptrack)              # heap by allocation site (scripts/heap-profile.sh)
[ -x /usr/sbin/squid ] || need_apt+=(squid)          # the HTTP proxy an agent goes out through in tests

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
  # Packages may start their own service; the tests start their own instances on free ports.
  for svc in etcd haproxy ssh squid; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

# Cross builds: zig as the C compiler and linker for every target (PyPI).
have cargo-zigbuild || python3 -m pip install --quiet cargo-zigbuild

# ansible-core from PyPI in a virtualenv of its own (tests/tests/openssh.rs drives it through the
# proxy); beside the build, so that nothing else on the machine changes.
ansible_venv="$(cd "$(dirname "$0")/.." && pwd)/target/tools/ansible"
if [ ! -x "$ansible_venv/bin/ansible-playbook" ]; then
  echo "install-deps: installing ansible-core into $ansible_venv"
  rm -rf "$ansible_venv"
  if ! python3 -m venv "$ansible_venv" >/dev/null 2>&1; then
    # Debian's own python3 makes virtualenvs only with python3-venv.
    rm -rf "$ansible_venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    python3 -m venv "$ansible_venv"
  fi
  "$ansible_venv/bin/pip" install --quiet 'ansible-core>=2.16,<2.18'
fi

# Rust components for the lint steps.
if have rustup; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
