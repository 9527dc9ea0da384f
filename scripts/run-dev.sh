#!/usr/bin/env bash
# Builds the TSA, makes a development PKI and configuration in ./state the first time, and
# serves RFC 3161 on http://127.0.0.1:3180/ (admin on 127.0.0.1:3181) with the development
# clock. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo build --release --locked
./target/release/tsa init --dir state
exec ./target/release/tsa serve --config state/tsa.toml
