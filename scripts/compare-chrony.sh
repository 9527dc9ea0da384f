#!/usr/bin/env bash
# Runs loopback scenarios with a known truth through this TSA's clock and through `chronyd -Q`
# (which measures once and never touches the clock) and prints both offset errors side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chronyd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chrony; }
cargo test --locked --test clock_chrony compare_with_chronyd -- --ignored --nocapture 2>/dev/null \
  | sed -n '/^scenario\|^ *scenario/,/^test /p' | grep -v '^test '
