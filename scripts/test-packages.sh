#!/usr/bin/env bash
# Builds the deb and rpm packages, inspects them, and installs, upgrades, removes and purges the
# .debs on this machine, checking files, modes, the unit and what is left behind at each step.
# Needs root (or sudo) for dpkg. Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
command -v cargo-generate-rpm >/dev/null 2>&1 || cargo install cargo-generate-rpm --locked

fail() { echo "test-packages: FAIL: $*" >&2; exit 1; }
# Checks read a command's whole output first: with pipefail, `cmd | grep -q` fails whenever grep
# exits before cmd has written everything (cmd dies of SIGPIPE).
check() { "$@" || fail "$*"; }
mode() { stat -c %a "$1"; }

x86=x86_64-unknown-linux-musl
echo "==> static x86_64 binaries"
./cross/build.sh "$x86" >/dev/null

# DESIGN.md's budget for the agent: a static binary under 5 MB (the one the packages carry).
agent_bytes=$(stat -c %s "target/$x86/release/burrow-agent")
[ "$agent_bytes" -lt 5000000 ] || fail "the x86_64 agent is $agent_bytes bytes, over its 5 MB budget"
echo "the x86_64 agent: $agent_bytes bytes"

echo "==> building packages"
deb_dir=target/$x86/debian
# Only this run's packages: earlier ones may have other names.
rm -rf target/*/debian target/*/generate-rpm
cargo deb --no-build --no-strip -p burrow-agent --target "$x86" >/dev/null
cargo deb --no-build --no-strip -p burrow-proxy --target "$x86" >/dev/null
cargo generate-rpm -p agent --target "$x86"
cargo generate-rpm -p proxy --target "$x86"
agent_deb=$(ls "$deb_dir"/burrow-agent_*_amd64.deb)
proxy_deb=$(ls "$deb_dir"/burrow-proxy_*_amd64.deb)
agent_rpm=$(ls target/$x86/generate-rpm/burrow-agent-*.x86_64.rpm)
proxy_rpm=$(ls target/$x86/generate-rpm/burrow-proxy-*.x86_64.rpm)
# ARM agent packages from the cross-built agents, when present.
for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf; do
  if [ -f "target/$t/release/burrow-agent" ]; then
    cargo deb --no-build --no-strip -p burrow-agent --target "$t" >/dev/null
    # RPM calls 32-bit hard-float ARM armv7hl.
    rpm_arch=()
    [ "$t" = armv7-unknown-linux-musleabihf ] && rpm_arch=(--arch armv7hl)
    cargo generate-rpm -p agent --target "$t" "${rpm_arch[@]}"
  fi
done

echo "==> inspecting"
contents=$(dpkg-deb -c "$agent_deb")
for f in ./usr/bin/burrow-agent ./etc/burrow/agent.yaml ./lib/systemd/system/burrow-agent.service; do
  grep -q " $f\$" <<<"$contents" || fail "$agent_deb lacks $f"
done
info=$(dpkg-deb -I "$agent_deb")
grep -q "Package: burrow-agent" <<<"$info" || fail "package name"
grep -q "Architecture: amd64" <<<"$info" || fail "architecture"
grep -qx "/etc/burrow/agent.yaml" <<<"$(dpkg-deb -I "$agent_deb" conffiles)" || fail "agent.yaml is not a conffile"
proxy_contents=$(dpkg-deb -c "$proxy_deb")
grep -q " ./usr/bin/burrowctl$" <<<"$proxy_contents" || fail "the proxy package lacks burrowctl"
grep -q " ./usr/lib/sysctl.d/50-burrow-proxy.conf$" <<<"$proxy_contents" ||
  fail "the proxy package lacks its sysctl drop-in (QUIC socket buffers)"
for t in aarch64-unknown-linux-musl:arm64 armv7-unknown-linux-musleabihf:armhf; do
  triple=${t%%:*}; arch=${t##*:}
  if [ -f "target/$triple/release/burrow-agent" ]; then
    deb=$(ls target/$triple/debian/burrow-agent_*_"$arch".deb)
    grep -q "Architecture: $arch" <<<"$(dpkg-deb -I "$deb")" || fail "$deb architecture"
    if command -v rpm >/dev/null 2>&1; then
      want=$([ "$arch" = armhf ] && echo armv7hl || echo aarch64)
      rpm_file=$(ls target/$triple/generate-rpm/burrow-agent-*."$want".rpm)
      grep -qx "$want" <<<"$(rpm -qp --queryformat '%{ARCH}\n' "$rpm_file")" || fail "$rpm_file arch"
    fi
  fi
done
if command -v rpm >/dev/null 2>&1; then
  grep -qx /usr/bin/burrow-agent <<<"$(rpm -qlp "$agent_rpm")" || fail "rpm file list"
  grep -qx /usr/bin/burrowctl <<<"$(rpm -qlp "$proxy_rpm")" || fail "proxy rpm file list"
  grep -q "postinstall scriptlet" <<<"$(rpm -qp --scripts "$agent_rpm")" || fail "rpm scripts"
  grep -qx x86_64 <<<"$(rpm -qp --queryformat '%{ARCH}\n' "$agent_rpm")" || fail "rpm arch"
fi

echo "==> installing the agent package"
$SUDO dpkg -P burrow-agent >/dev/null 2>&1 || true
$SUDO dpkg -i "$agent_deb" >/dev/null
check test "$(mode /usr/bin/burrow-agent)" = 755
check test "$(mode /etc/burrow/agent.yaml)" = 600
check test -d /var/lib/burrow
check test "$(mode /var/lib/burrow)" = 700
check test -f /lib/systemd/system/burrow-agent.service
check test -L /etc/systemd/system/multi-user.target.wants/burrow-agent.service
systemd-analyze verify /lib/systemd/system/burrow-agent.service || fail "systemd-analyze verify"
grep -q "burrow-agent " <<<"$(/usr/bin/burrow-agent version)" || fail "the installed agent runs"
# Not configured yet: the agent refuses with a configuration error (exit 2), so the unit
# (RestartPreventExitStatus=2) would not loop.
set +e
/usr/bin/burrow-agent start --config /etc/burrow/agent.yaml 2>/dev/null
rc=$?
set -e
check test "$rc" = 2

echo "==> upgrade keeps the identity and the config"
echo '{"kept": true}' | $SUDO tee /var/lib/burrow/identity.json >/dev/null
echo "# local edit" | $SUDO tee -a /etc/burrow/agent.yaml >/dev/null
$SUDO dpkg -i --force-confold "$agent_deb" >/dev/null
grep -q kept /var/lib/burrow/identity.json || fail "the identity was lost on upgrade"
grep -q "local edit" /etc/burrow/agent.yaml || fail "the config was replaced on upgrade"

echo "==> remove keeps state, purge removes what the package created"
$SUDO dpkg -r burrow-agent >/dev/null
check test ! -e /usr/bin/burrow-agent
check test -f /etc/burrow/agent.yaml
check test -f /var/lib/burrow/identity.json
$SUDO dpkg -P burrow-agent >/dev/null
check test ! -e /etc/burrow/agent.yaml
check test ! -e /var/lib/burrow
check test ! -e /etc/systemd/system/multi-user.target.wants/burrow-agent.service

echo "==> the proxy package"
$SUDO dpkg -P burrow-proxy >/dev/null 2>&1 || true
$SUDO dpkg -i "$proxy_deb" >/dev/null
check getent passwd burrow >/dev/null
check test "$(stat -c %U:%a /var/lib/burrow-proxy)" = burrow:700
check test "$(stat -c %U:%G:%a /etc/burrow/proxy.yaml)" = root:burrow:640
grep -q "burrowctl " <<<"$(/usr/bin/burrowctl version)" || fail "burrowctl runs"
systemd-analyze verify /lib/systemd/system/burrow-proxy.service || fail "systemd-analyze verify proxy"
$SUDO dpkg -P burrow-proxy >/dev/null
check test ! -e /var/lib/burrow-proxy
if getent passwd burrow >/dev/null; then fail "the burrow user outlived the purge"; fi

echo "==> packages OK"
ls -l "$deb_dir"/*.deb target/*/debian/*.deb target/*/generate-rpm/*.rpm 2>/dev/null | awk '{print $5, $9}' | sort -u
