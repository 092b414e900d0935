#!/usr/bin/env bash
# Runs every test of cascade: unit tests, and integration tests that start real origins
# (an in-process SigV4-verifying S3 server, plain HTTP origins, directory origins) and the
# real cascade binary on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cascade-target}"
cargo fmt --all -- --check
# The Wasm plugins (plugins/dist/*.wasm) are used by tests/plugins.rs, unit tests and benches.
if [ -x scripts/build-plugins.sh ]; then
  scripts/build-plugins.sh
fi
# The plugins' own unit tests, natively (hog uses wasm32-only intrinsics: it is exercised in
# tests/plugins.rs instead).
(cd plugins && cargo test --quiet --workspace --exclude hog)
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
  cargo test --doc
else
  cargo test --no-fail-fast "$@"
fi
