#!/usr/bin/env bash
# Runs every test Burrow has: formatting, lints, unit tests and the end-to-end tests that start
# the real binaries on loopback. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build (binaries for the end-to-end tests)"
cargo build --workspace --bins --locked
echo "==> cross-building the ARM agents for the qemu tests"
./cross/build.sh --agent-only aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads "${BURROW_TEST_THREADS:-4}"
echo "==> benchmark suite, smoke run (scripts/bench.sh --smoke: works, not how fast)"
./scripts/bench.sh --smoke
echo "==> packages: build, inspect, install, upgrade, remove, purge"
./scripts/test-packages.sh
