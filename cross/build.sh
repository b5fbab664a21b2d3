#!/usr/bin/env bash
# Builds static (musl) release binaries of burrow-agent, burrow-proxy and burrowctl for x86_64,
# aarch64 and armv7 (hard float) with cargo-zigbuild, and prints their sizes.
# Usage: cross/build.sh [--agent-only] [TARGET...]
#        (default: all three binaries for all three targets; output in target/TARGET/release)
# Installs what it needs: cargo-zigbuild (PyPI, brings zig), the rustup targets, rust-src.
set -euo pipefail
cd "$(dirname "$0")/.."

# The agent is built on its own, never with the proxy: Cargo turns on, for every crate a build
# shares, the union of the features its packages ask for, and the proxy's etcd client (tonic)
# turns on more of the crates the agent shares with it (rustls' logging among them): built with
# the proxy, the x86_64 agent was 5,034,896 bytes, alone 4,977,848. The packages ship the agent
# the README measures.
groups=("-p burrow-agent" "-p burrow-proxy -p burrowctl")
if [ "${1:-}" = "--agent-only" ]; then
  groups=("-p burrow-agent")
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf)

command -v cargo-zigbuild >/dev/null 2>&1 || pip install --quiet cargo-zigbuild
for t in "${targets[@]}"; do
  case "$t" in
    armv7-unknown-linux-musleabihf)
      # No prebuilt std for this target: build it from rust-src.
      rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src
      echo "==> $t (std from source)"
      for g in "${groups[@]}"; do
        # shellcheck disable=SC2086 # a group is a list of -p options
        RUSTFLAGS="-C link-self-contained=no" RUSTC_BOOTSTRAP=1 \
          cargo zigbuild --release --locked $g --target "$t" -Zbuild-std=std,panic_abort
      done
      ;;
    *)
      rustup target list --installed | grep -qx "$t" || rustup target add "$t"
      echo "==> $t"
      for g in "${groups[@]}"; do
        # shellcheck disable=SC2086
        cargo zigbuild --release --locked $g --target "$t"
      done
      ;;
  esac
done

echo
printf '%-34s %-14s %10s\n' TARGET BINARY BYTES
for t in "${targets[@]}"; do
  for b in burrow-agent burrow-proxy burrowctl; do
    f="target/$t/release/$b"
    if [ -f "$f" ]; then
      printf '%-34s %-14s %10s\n' "$t" "$b" "$(stat -c %s "$f")"
    fi
  done
done
