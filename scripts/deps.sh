#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test cascade: cmake, OpenSSL
# headers and pkg-config (Pingora), python3 with boto3 (the tests drive cascade with the AWS
# SDK), the wasm32-wasip1 target (plugins), redis-server (for the Redis tests) and promtool
# (Debian's prometheus package: tests/ops_rules.rs checks conf/prometheus). Idempotent and quiet
# when everything is already there.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
if [ "${1:-}" = "--bench" ]; then
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
  command -v strace >/dev/null 2>&1 || need+=(strace) # load.sh STRACE=1
fi
# Packages that come with a system daemon: only their binaries are used.
daemons=()
if [ "${1:-}" = "--bench" ]; then
  command -v iperf3 >/dev/null 2>&1 || daemons+=(iperf3) # load.sh: the loopback reference
fi
command -v redis-server >/dev/null 2>&1 || daemons+=(redis-server)
command -v promtool >/dev/null 2>&1 || daemons+=(prometheus)
if [ ${#need[@]} -gt 0 ] || [ ${#daemons[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing: ${need[*]} ${daemons[*]}" >&2
  $SUDO apt-get update -qq
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
if [ ${#daemons[@]} -gt 0 ]; then
  # Keep their postinst from starting (or failing to start) a system redis or prometheus:
  # policy-rc.d exit 101 ("forbidden") is honoured by invoke-rc.d and deb-systemd-invoke.
  # Without recommends: prometheus would pull in prometheus-node-exporter, another daemon.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    trap "$SUDO rm -f $policy" EXIT
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq --no-install-recommends "${daemons[@]}" >/dev/null
  # Under systemd the units were still enabled (for the next boot): undo that.
  if [ -d /run/systemd/system ]; then
    for unit in "${daemons[@]}"; do
      $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi
fi
# boto3 from PyPI (Debian's python3-boto3 is older and only for Debian's own python3).
if ! python3 -c "import boto3" >/dev/null 2>&1; then
  echo "installing: boto3 (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check boto3 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages boto3
fi
