#!/usr/bin/env bash
# Builds the TSA, makes a development PKI and configuration in ./state the first time, and
# serves RFC 3161 on http://127.0.0.1:3180/ (admin on 127.0.0.1:3181) with the development
# clock. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || {
  echo "run-dev.sh: needs Rust 1.85 or later (cargo), from https://rustup.rs" >&2
  exit 1
}
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
# The linker, and the C code of aws-lc and SQLite that the build compiles.
command -v cc >/dev/null || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

cargo build --release --locked
./target/release/tsa init --dir state
exec ./target/release/tsa serve --config state/tsa.toml
