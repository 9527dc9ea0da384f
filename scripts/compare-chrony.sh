#!/usr/bin/env bash
# Runs loopback scenarios with a known truth through this TSA's clock and through `chronyd -Q`
# (which measures once and never touches the clock) and prints both offset errors side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v chronyd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chrony; }
# cargo's own output (a build that fails, a test that panics) goes to a log, shown on failure.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --test clock_chrony compare_with_chronyd -- --ignored --nocapture 2>"$log" \
  | sed -n '/^scenario\|^ *scenario/,/^test /p' | grep -v '^test ' ||
  { cat "$log" >&2; exit 1; }
