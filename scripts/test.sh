#!/usr/bin/env bash
# Runs the whole test suite: unit, property and integration tests against real openssl, curl
# and HTTP on loopback. Installs the system packages the tests use when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo test --locked --all-targets
