#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time each (default 60 s; first
# argument overrides), with libFuzzer. Needs cargo-fuzz (`cargo install cargo-fuzz`); the
# stable toolchain is enough (RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags). Corpora stay
# in fuzz/corpus/ (not committed); a crash leaves its input in fuzz/artifacts/<target>/ and
# fails the script.
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 10 canonical_path s3_policy
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
# Its own target dir: instrumented builds must not mix with the test build.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/cascade-fuzz-target}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs}s" >&2
  cargo fuzz run --sanitizer none "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096
done
