#!/usr/bin/env bash
# Fuzzes the decoders of peer input with cargo fuzz (libFuzzer), each target for a bounded time
# or a bounded number of inputs.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]          (default 60 s each; decode web_json)
#        RUNS=10000000 scripts/fuzz.sh 0 decode          (a fixed number of inputs instead)
# Targets: decode (tunnel frames), web_json (the web API's JSON request bodies).
set -euo pipefail
cd "$(dirname "$0")/../tunnel-proto"
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode web_json)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in "${targets[@]}"; do
  limit=(-max_total_time="$secs")
  [ -n "${RUNS:-}" ] && limit=(-runs="$RUNS")
  echo "==> fuzzing $target (${limit[*]})"
  # cargo fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP.
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- "${limit[@]}" -max_len=70000 -print_final_stats=1
done
