#!/usr/bin/env bash
# Builds cascade and serves conf/demo.yaml on 127.0.0.1:8080 (two local directory origins,
# no external service). Try: curl -i localhost:8080/hello.txt ; curl -i localhost:8080/only-in-prod.txt
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cascade-target}"
exec cargo run --release -- run -c conf/demo.yaml "$@"
