#!/usr/bin/env bash
# Builds the proxy-wasm plugins in plugins/ (their own cargo workspace) for wasm32-wasip1 and
# copies them to plugins/dist/<name>.wasm. Idempotent; works from any directory.
# Extra arguments go to cargo build (e.g. --locked, --offline).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins="$root/plugins"
target=wasm32-wasip1

if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
    echo "build-plugins: installing the $target target" >&2
    if ! out="$(rustup target add "$target" 2>&1)"; then
      echo "$out" >&2
      echo "build-plugins: rustup target add $target failed" >&2
      exit 1
    fi
  fi
fi

# Explicit, so an exported CARGO_TARGET_DIR (or a build.target-dir setting) can't move it.
export CARGO_TARGET_DIR="$plugins/target"
# cargo reads .cargo/config.toml from the working directory up: build from plugins/ so the
# result doesn't depend on where the script is run from.
cd "$plugins"
cargo build --release --target "$target" --manifest-path "$plugins/Cargo.toml" "$@"

# <dist name>:<cargo artifact name>
mkdir -p "$plugins/dist"
for pair in auth:auth ext-auth:ext_auth tenant-router:tenant_router headers:headers chaos:chaos probe:probe rewrite:rewrite noop:noop hog:hog; do
  name="${pair%%:*}"
  artifact="$CARGO_TARGET_DIR/$target/release/${pair#*:}.wasm"
  if [ ! -f "$artifact" ]; then
    echo "build-plugins: missing $artifact" >&2
    exit 1
  fi
  cp -f "$artifact" "$plugins/dist/$name.wasm.tmp"
  mv -f "$plugins/dist/$name.wasm.tmp" "$plugins/dist/$name.wasm"
done
ls -l "$plugins/dist"/*.wasm >&2
