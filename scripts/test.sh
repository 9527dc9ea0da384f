#!/usr/bin/env bash
# Runs the whole test suite: unit, property and integration tests against real openssl, curl,
# HTTP on loopback, and the Python (rfc3161-client) and Java (BouncyCastle) clients. Installs
# the system packages and the Python package the tests use when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Some tests mount a tmpfs (tests/disk_full.rs), run PostgreSQL as a user of their own and
# make network namespaces: they need root.
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the tests need root (sudo ./scripts/test.sh)" >&2
  exit 1
fi
command -v cargo >/dev/null || {
  echo "test.sh: needs Rust 1.85 or later (cargo), from https://rustup.rs" >&2
  exit 1
}
need=()
updated= # set once apt-get update has run
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v timeout >/dev/null || need+=(coreutils)
# tests/clock_chrony.rs, tests/clock_kernel.rs: real chronyd on loopback (-x: never touching
# the clock).
command -v chronyd >/dev/null || [ -x /usr/sbin/chronyd ] || need+=(chrony)
# tests/systemd.rs: systemd-analyze verify / security --offline on the unit files.
command -v systemd-analyze >/dev/null || need+=(systemd)
# tests/clock_gps.rs: the real gpsd, reading NMEA from a pseudo-terminal on a loopback port.
[ -x /usr/sbin/gpsd ] || command -v gpsd >/dev/null || need+=(gpsd)
# tests/interop_java.rs: the JDK and BouncyCastle from Debian. Newer releases drop
# openjdk-17: the first of these JDKs that the package lists know (updated first).
if ! command -v javac >/dev/null; then
  apt-get update -qq && updated=1
  jdk=
  for candidate in openjdk-17-jdk-headless openjdk-21-jdk-headless default-jdk-headless; do
    if apt-cache show "$candidate" >/dev/null 2>&1; then jdk=$candidate && break; fi
  done
  [ -n "$jdk" ] || echo "test.sh: no openjdk-17, openjdk-21 or default JDK package found" >&2
  need+=("${jdk:-openjdk-17-jdk-headless}")
fi
[ -e /usr/share/java/bcprov.jar ] || need+=(libbcprov-java)
[ -e /usr/share/java/bcpkix.jar ] || need+=(libbcpkix-java)
[ -e /usr/share/java/bcutil.jar ] || need+=(libbcutil-java)
# tests/hsm.rs, benches/hsm.rs: SoftHSM2 tokens through PKCS#11, and OpenSC's pkcs11-tool.
command -v softhsm2-util >/dev/null || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
# tests/archive_postgres.rs: private PostgreSQL clusters (initdb/pg_ctl; Debian keeps them in
# /usr/lib/postgresql/<version>/bin). As root, the tests run them as the system user tsa-test.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  need+=(postgresql)
fi
# tests/fleet.rs: two instances behind a real HAProxy (round robin, checks on /health/ready).
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
# tests/adversarial.rs: the example firewall rules, in a network namespace of the test's own.
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
# tests/hsm.rs signals servers with kill(1) (not the shell's builtin).
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || need+=(procps)
# tests/status.rs: the status page rendered by headless Chromium.
command -v chromium >/dev/null || need+=(chromium)
# tests/power_loss.rs, tests/clock_kernel.rs: libraries for LD_PRELOAD, built with the C compiler.
command -v cc >/dev/null || need+=(gcc libc6-dev)
# tests/interop_python.rs: a Python 3 that can make a virtual environment.
command -v python3 >/dev/null || need+=(python3)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
if [ ${#need[@]} -gt 0 ]; then
  { [ -n "$updated" ] || apt-get update -qq; } &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# Trail of Bits' rfc3161-client from PyPI, in target/pyenv (tests/interop_python.rs).
pyenv=target/pyenv
if ! "$pyenv/bin/python" -c 'import rfc3161_client' >/dev/null 2>&1; then
  rm -rf "$pyenv"
  python3 -m venv "$pyenv"
  "$pyenv/bin/python" -m pip install -q --disable-pip-version-check 'rfc3161-client>=1,<2'
fi

cargo test --locked --all-targets
