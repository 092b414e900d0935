#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test cascade: cmake, OpenSSL
# headers and pkg-config (Pingora), python3 with boto3 (the tests drive cascade with the AWS
# SDK), the wasm32-wasip1 target (plugins). Idempotent and quiet when everything is already
# there.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
if [ "${1:-}" = "--bench" ]; then
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# boto3 from PyPI (Debian's python3-boto3 is older and only for Debian's own python3).
if ! python3 -c "import boto3" >/dev/null 2>&1; then
  echo "installing: boto3 (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check boto3 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages boto3
fi
