#!/usr/bin/env bash
# Fuzzes the tunnel frame decoder with cargo fuzz (libFuzzer) for a bounded time.
# Usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/../tunnel-proto"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
RUSTC_BOOTSTRAP=1 cargo fuzz run decode -- -max_total_time="$secs" -max_len=70000
