#!/usr/bin/env bash
# Load test of `tsa serve` on loopback: the server pinned to one core, the load generator on
# another, and the server's CPU time per token compared with the raw signing cost of the same
# algorithm: the signature as the server makes it (`tsa check --signatures`, aws-lc-rs, single
# core), with `openssl speed`'s beside it for a comparison with OpenSSL-based TSAs.
#
#   ./scripts/load.sh                                  # ALG=p256, concurrency 1 8 32 128, 10 s each
#   ALG=rsa2048 DURATION=5 CONCURRENCY="1 16" ./scripts/load.sh
#   LOAD_TOOL=wrk ./scripts/load.sh                    # force wrk (Debian's `wrk`)
#   ARCHIVE=both DURATION=5 ./scripts/load.sh          # the archive's cost: off vs on
#
# Settings (environment):
#   ALG          p256 | p384 | rsa2048 | rsa3072 | rsa4096, with "-pss" for RSA-PSS (rsa2048-pss)
#   HSM=1        the TSU key in SoftHSM2 (`tsa init --hsm`); the raw rate is then the token's own
#                single-process cryptoki rate (`tsa hsm check`), and the ratio is tokens/s to it
#   ARCHIVE      0 (default): no archive; 1: the token archive on (`tsa init --archive`: the
#                token log beside SQLite, group commit); both: the same runs with it off, then on,
#                and the on/off ratios of req/s and of CPU per token per concurrency. Under each
#                run with it on: the CPU per token of the archive's threads (writer, the
#                token log's syncer and next-segment writer, imprint indexer, checkpointer)
#                and the commits (records each, time each: from the writer's append to the
#                records durable).
#                After the runs with it on: the tokens archived, how far the imprint index was
#                behind, and how many commits took over 6.4, 25.6 and 102 ms (each one delays
#                every token waiting for it)
#   ARCHIVE_LAYOUT  log | rows: where the archive keeps its tokens ([archive] layout; default
#                the configuration's: log)
#   CONCURRENCY  connections per run, space-separated               (default "1 8 32 128")
#   DURATION     seconds per run                                     (default 10)
#   IMPRINTS     same | distinct: every request stamps the same imprint, or each another random
#                one, as real clients' do (default: distinct with the archive on, else same).
#                The archive indexes imprints, so only distinct ones show its cost; they need wrk
#   LOAD_TOOL    oha | wrk; default: oha when installed, else wrk (installed with apt when
#                missing; `cargo install oha` takes minutes, so it is never installed here);
#                wrk with IMPRINTS=distinct
#   SERVER_CPU   the core(s) `tsa serve` is pinned to, as taskset takes them ("0", "0-3")  (default 0)
#   CLIENT_CPU   the core(s) the load generator is pinned to            (default 1)
#   SPEED_SECONDS  seconds for `openssl speed`, and about as long for `tsa check` (default 3)
#   NO_BUILD=1   use target/release/tsa as it is
#   TSA_BIN      measure this tsa binary instead (an earlier build, for a comparison)
#   COMMIT_DELAY_US  the archive's [archive] commit_delay_us (group commit window)
#   TRANSPORT    http (default) | https: the requests over the HTTPS listener (`tsa init
#                --tls`: TLS 1.3, the development server certificate, keep-alive connections, so
#                a handshake per connection) | http-new | https-new: a new connection for every
#                request (oha --disable-keepalive), so each token pays for a TCP accept and, over
#                TLS, a full handshake. The -new ones need LOAD_TOOL=oha. (`tsa init --tls` also
#                writes an [auth] section: anonymous access beside one client certificate.)
#   BELOW="0.5 0.8"  after the runs, drive the server open-loop (oha -q, latency corrected for
#                coordinated omission) at each of these fractions of the best rate they reached,
#                over BELOW_CONNECTIONS (default 32) connections: latency below saturation, where
#                a closed loop's p99 is the queue it builds itself. Open-loop runs use oha
#                whatever LOAD_TOOL is, so they send one imprint
#   OVERLOAD=3   after the runs, drive the server open-loop (oha -q) at 3 × the best rate they
#                reached, over OVERLOAD_CONNECTIONS (default 1024: more than the default
#                server.max_queue of 256, so that requests wait for a place or are refused)
#                connections, and print the goodput (granted tokens/s) as a share of that
#                capacity, and the 503s (admission control: server.max_queue and
#                server.queue_wait_ms, MAX_QUEUE and QUEUE_WAIT_MS to set them)
#   OTHER="CMD"  also measure another RFC 3161 server under the same pinning, for a comparison:
#                after this server's runs, CMD (a shell command that serves in the foreground on
#                loopback; stopped with SIGTERM) is started on SERVER_CPU, its reply to the
#                sample request must be granted (and verify, with OTHER_CA=its CA certificate),
#                and it is loaded the same way at OTHER_URL (default http://127.0.0.1:2020/).
#                The summary gives both servers' tokens/s and CPU per token, and their ratios.
#                Run the script a few times and compare the ratios: the servers take turns,
#                so a machine that slows down between runs weighs on both
#
# Per run it prints tokens/s (the server's own count, tsa_tokens_issued_total, read before and
# after the run; for OTHER its HTTP 200 replies, with wrk only those granted), p50/p99
# latency, the replies that were no token (wrk also checks every reply's PKIStatus in Lua; oha
# reads only HTTP status codes) and the server's CPU time (utime+stime of the whole process,
# from /proc/PID/stat) per token, and the
# server's peak RSS (VmHWM) after the run, and how busy the server's cores were (/proc/stat:
# below 100 % they waited, for the clients or for the archive's commits). One reply is
# also checked with `openssl ts -reply -text` and `openssl ts -verify` before the runs start.
# Everything talks to 127.0.0.1 only; the server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ALG=${ALG:-p256}
CONCURRENCY=${CONCURRENCY:-"1 8 32 128"}
DURATION=${DURATION:-10}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
SPEED_SECONDS=${SPEED_SECONDS:-3}
HOST=127.0.0.1

die() {
  printf 'load.sh: %b\n' "$*" >&2
  exit 1
}

case "$ALG" in
  p256) init_args=(--algorithm p256) speed_alg=ecdsap256 ;;
  p384) init_args=(--algorithm p384) speed_alg=ecdsap384 ;;
  rsa2048 | rsa3072 | rsa4096) init_args=(--algorithm "$ALG") speed_alg=$ALG ;;
  rsa2048-pss | rsa3072-pss | rsa4096-pss)
    # openssl speed has no PSS test; the private-key operation, which dominates, is the same.
    init_args=(--algorithm "${ALG%-pss}" --pss) speed_alg=${ALG%-pss} ;;
  *) die "unknown ALG=$ALG (p256, p384, rsa2048, rsa3072, rsa4096, rsaNNNN-pss)" ;;
esac
[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -gt 0 && "$DURATION" -le 600 ]] ||
  die "DURATION must be 1 to 600 seconds"
for c in $CONCURRENCY; do
  [[ "$c" =~ ^[0-9]+$ && "$c" -gt 0 && "$c" -le 4096 ]] || die "bad concurrency '$c'"
done

# Tools.
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v taskset >/dev/null || need+=(util-linux)
if [ "${HSM:-0}" = 1 ]; then
  command -v softhsm2-util >/dev/null || need+=(softhsm2)
fi
if [ -z "${IMPRINTS:-}" ]; then
  if [ "${ARCHIVE:-0}" = 0 ]; then IMPRINTS=same; else IMPRINTS=distinct; fi
fi
case "$IMPRINTS" in
  same) ;;
  distinct) LOAD_TOOL=${LOAD_TOOL:-wrk} ;;
  *) die "IMPRINTS must be same or distinct" ;;
esac
if [ -z "${LOAD_TOOL:-}" ]; then
  if command -v oha >/dev/null; then LOAD_TOOL=oha; else LOAD_TOOL=wrk; fi
fi
[ "$IMPRINTS" = same ] || [ "$LOAD_TOOL" = wrk ] || die "IMPRINTS=distinct needs LOAD_TOOL=wrk"
case "$LOAD_TOOL" in
  oha) command -v oha >/dev/null || die "oha is not installed (cargo install oha --locked)" ;;
  wrk) command -v wrk >/dev/null || need+=(wrk) ;;
  *) die "LOAD_TOOL must be oha or wrk" ;;
esac
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$LOAD_TOOL" = oha ] && { command -v python3 >/dev/null || die "oha's JSON is read with python3"; }
if [ -n "${BELOW:-}${OVERLOAD:-}" ]; then
  command -v oha >/dev/null && command -v python3 >/dev/null ||
    die "BELOW and OVERLOAD need oha (-q; cargo install oha --locked) and python3"
fi

TRANSPORT=${TRANSPORT:-http}
case "$TRANSPORT" in
  http | https) ;;
  http-new | https-new) [ "$LOAD_TOOL" = oha ] || die "TRANSPORT=$TRANSPORT needs LOAD_TOOL=oha" ;;
  *) die "TRANSPORT must be http, https, http-new or https-new" ;;
esac
scheme=${TRANSPORT%-new}
[ "$scheme" = http ] || [ -z "${OTHER:-}" ] || die "OTHER is measured over plain HTTP only"
# oha's connections: new for every request with -new; over TLS, trusting the development CA's
# server certificate (as curl and wrk, which checks none, do).
oha_transport=()
case "$TRANSPORT" in *-new) oha_transport+=(--disable-keepalive) ;; esac
[ "$scheme" = https ] && oha_transport+=(--insecure)

other_url=${OTHER_URL:-http://$HOST:2020/}
case "$other_url" in "http://$HOST:"*) ;; *) die "OTHER_URL must be on http://$HOST ($other_url)" ;; esac

# Core lists as taskset takes them ("0", "2-5", "0,1"); every core named must exist.
cores=$(nproc --all)
for list in "$SERVER_CPU" "$CLIENT_CPU"; do
  [[ "$list" =~ ^[0-9]+([,-][0-9]+)*$ ]] || die "bad core list '$list'"
  for n in ${list//[,-]/ }; do
    [ "$n" -lt "$cores" ] || die "core $n named in '$list': this machine has $cores cores"
  done
done
[ "$SERVER_CPU" != "$CLIENT_CPU" ] || echo "load.sh: warning: server and client share cores $SERVER_CPU" >&2

if [ -n "${TSA_BIN:-}" ]; then
  TSA=$(realpath "$TSA_BIN")
else
  [ "${NO_BUILD:-0}" = 1 ] || cargo build --release --locked --bin tsa
  TSA=$PWD/target/release/tsa
fi
[ -x "$TSA" ] || die "$TSA is missing"

work=$(mktemp -d "${TMPDIR:-/tmp}/tsa-load.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "${HSM:-0}" = 1 ]; then
  init_args+=(--hsm)
fi

# The raw single-core signing rate of the same algorithm, before the server takes the core.
echo "== openssl speed -seconds $SPEED_SECONDS $speed_alg (core $SERVER_CPU)"
speed_out=$(taskset -c "$SERVER_CPU" timeout $((SPEED_SECONDS * 4 + 30)) \
  openssl speed -seconds "$SPEED_SECONDS" "$speed_alg" 2>/dev/null)
# The header names the columns ("sign verify sign/s verify/s", more for RSA); the result line
# is a label followed by one value per column.
sign_per_s=$(awk '
  /sign\/s/ { n = NF; for (i = 1; i <= NF; i++) if ($i == "sign/s") col = i; next }
  col && NF > n { v = $(NF - n + col) }
  END { if (v != "") print v }' <<<"$speed_out")
[ -n "$sign_per_s" ] || die "cannot read sign/s from openssl speed:\n$speed_out"
raw_sign_us=$(awk -v r="$sign_per_s" 'BEGIN { printf "%.2f", 1e6 / r }')
echo "raw sign: $sign_per_s sign/s = $raw_sign_us µs per signature (OpenSSL $(openssl version | awk '{print $2}'))"
openssl_sign_us=$raw_sign_us
raw_source="openssl's"
# The same signature as the server makes it (aws-lc-rs), on the server's core, for about as
# long: what the server's CPU per token is compared with. (With HSM=1 the token's own rate is
# measured below, and OpenSSL's software signature stays the CPU baseline; so it does with a
# TSA_BIN built before `tsa check`.)
if [ "${HSM:-0}" != 1 ] && "$TSA" check --help >/dev/null 2>&1; then
  "$TSA" init --dir "$work/state-raw" "${init_args[@]}" >/dev/null
  raw_signatures=$(awk -v r="$sign_per_s" -v s="$SPEED_SECONDS" 'BEGIN { printf "%d", r * s + 100 }')
  check_out=$(taskset -c "$SERVER_CPU" "$TSA" check --config "$work/state-raw/tsa.toml" \
    --signatures "$raw_signatures" 2>&1) || die "tsa check failed:\n$check_out"
  raw_sign_us=$(awk '/^rate:/ { print $(NF - 2) }' <<<"$check_out")
  [ -n "$raw_sign_us" ] || die "cannot read the rate from tsa check:\n$check_out"
  raw_source="the server's own (tsa check)"
  echo "raw sign as the server signs (tsa check, aws-lc-rs, core $SERVER_CPU): $raw_sign_us µs per signature; OpenSSL's: $openssl_sign_us µs"
fi

# wrk: POST the request and check every reply's PKIStatus (granted = 0 or 1).
cat >"$work/post.lua" <<'LUA'
local f = assert(io.open(os.getenv("TSQ"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/timestamp-query"

-- IMPRINTS=distinct: every request another (random) SHA-256 imprint, in place of the one
-- after the AlgorithmIdentifier's NULL parameters (05 00) and the OCTET STRING's header (04 20).
if os.getenv("IMPRINTS") == "distinct" then
  local at = assert(wrk.body:find("\5\0\4\32", 1, true), "no SHA-256 imprint in the query")
  local head, tail = wrk.body:sub(1, at + 3), wrk.body:sub(at + 36)
  local bytes = {}
  function request()
    for i = 1, 32 do bytes[i] = math.random(0, 255) end
    return wrk.format(nil, nil, nil, head .. string.char(unpack(bytes)) .. tail)
  end
end

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  non200 = 0; notgranted = 0
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end

-- TimeStampResp ::= SEQUENCE { status PKIStatusInfo ::= SEQUENCE { status INTEGER, ... }, ... }
local function granted(body)
  if #body < 8 or body:byte(1) ~= 0x30 then return false end
  local l = body:byte(2)
  local i = 3
  if l >= 0x80 then i = 3 + (l - 0x80) end
  if body:byte(i) ~= 0x30 or body:byte(i + 2) ~= 0x02 or body:byte(i + 3) ~= 0x01 then
    return false
  end
  local status = body:byte(i + 4)
  return status == 0 or status == 1
end

function response(status, headers, body)
  if status ~= 200 then non200 = non200 + 1
  elseif not granted(body) then notgranted = notgranted + 1 end
end

function done(summary, latency, requests)
  local n, g = 0, 0
  for _, t in ipairs(threads) do n = n + t:get("non200"); g = g + t:get("notgranted") end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f p50_ms=%.3f p99_ms=%.3f non200=%d notgranted=%d errors=%d\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, n, g, e.connect + e.read + e.write + e.timeout))
end
LUA

# oha: its JSON summary, in the same RESULT form (it cannot look into bodies).
oha_result() {
  python3 -c '
import json, sys
d = json.load(sys.stdin)
s, p = d["summary"], d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
ok = int(codes.get("200", 0))
n = sum(int(v) for v in codes.values())
# Requests cut off when the duration ends are not failures of the server.
errors = sum(int(v) for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
ms = lambda v: (v or 0) * 1e3
print("RESULT requests=%d seconds=%.3f p50_ms=%.3f p99_ms=%.3f non200=%d notgranted=-1 errors=%d"
      % (n, s["total"], ms(p.get("p50")), ms(p.get("p99")), n - ok, errors))'
}

ticks() { # utime + stime in clock ticks, from a /proc stat file (after the comm field)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$1" 2>/dev/null
}
stat_ticks() { # of the server process
  ticks "/proc/$server_pid/stat"
}
hz=$(getconf CLK_TCK)
# The server's cores, one number each ("0-2,5" -> "0 1 2 5").
server_cores=$(tr , '\n' <<<"$SERVER_CPU" | while IFS=- read -r from to; do seq "$from" "${to:-$from}"; done | tr '\n' ' ')
core_ticks() { # "busy total" ticks of the server's cores so far (/proc/stat; steal left out)
  awk -v want=" $server_cores " '$1 ~ /^cpu[0-9]+$/ && index(want, " " substr($1, 4) " ") {
    busy += $2 + $3 + $4 + $7 + $8; all += $2 + $3 + $4 + $5 + $6 + $7 + $8 }
    END { print busy + 0, all + 0 }' /proc/stat
}
thread_ticks() { # "name ticks" for each of the archive's threads of the server, summed by name
  # The next segment's thread ends with each segment it writes, and a thread that ended is
  # no longer listed: its ticks are the process's less its live threads' (read first), and
  # counted with the live one's, so that one that ends during a run is counted once.
  { echo "process $(stat_ticks)"
    for t in /proc/"$server_pid"/task/*; do
      echo "$(cat "$t/comm" 2>/dev/null) $(ticks "$t/stat")"
    done
  } | awk '$1 == "process" { ended += $2; next } NF == 2 { ended -= $2 }
    $1 ~ /^tsa-(archive|log-sync|imprints|checkpoint)$/ { n[$1] += $2 }
    $1 == "tsa-log-spare" { ended += $2 }
    END { for (k in n) print k, n[k]; print "tsa-log-spare", ended }'
}

# Tokens the server has issued so far (tsa_tokens_issued_total), or -1 without its metrics
# (the other server): a reply counts as a token only where the server says it issued one,
# whatever the load tool could see (oha reads no bodies: a refusal is an HTTP 200 too).
tokens_issued() {
  [ -n "${admin:-}" ] || { echo -1; return; }
  curl -s --max-time 5 "$admin/metrics" | awk '/^tsa_tokens_issued_total / { t = $2 } END { printf "%d", (t == "" ? -1 : t) }'
}

# "commits records seconds" so far, from the server's metrics (the archive's commit histograms).
commit_sums() {
  curl -s --max-time 5 "$admin/metrics" | awk '
    /^tsa_archive_commit_duration_seconds_count / { n = $2 }
    /^tsa_archive_commit_records_sum / { r = $2 }
    /^tsa_archive_commit_duration_seconds_sum / { d = $2 }
    END { print n + 0, r + 0, d + 0 }'
}

declare -A rate cpu
# One server per archive mode: started, checked with one request, loaded at each concurrency,
# stopped.
start_server() { # mode: off | on | other
  local mode=$1
  [ "$mode" = other ] && { start_other; return; }
  # A development PKI and a server on free loopback ports.
  mode_args=()
  [ "$mode" = on ] && mode_args=(--archive)
  [ "$scheme" = https ] && mode_args+=(--tls)
  "$TSA" init --dir "$work/state-$mode" "${init_args[@]}" "${mode_args[@]}" >/dev/null
  sed -i "s/^https_listen = .*/https_listen = \"$HOST:0\"/" "$work/state-$mode/tsa.toml"
  if [ -n "${COMMIT_DELAY_US:-}" ]; then
    sed -i "s/^commit_delay_us = .*/commit_delay_us = $COMMIT_DELAY_US/" "$work/state-$mode/tsa.toml"
    grep -q '^commit_delay_us' "$work/state-$mode/tsa.toml" ||
      sed -i "s/^\[archive\]$/[archive]\ncommit_delay_us = $COMMIT_DELAY_US/" "$work/state-$mode/tsa.toml"
  fi
  if [ -n "${ARCHIVE_LAYOUT:-}" ]; then
    sed -i "s/^\[archive\]$/[archive]\nlayout = \"$ARCHIVE_LAYOUT\"/" "$work/state-$mode/tsa.toml"
  fi
  if [ -n "${MAX_QUEUE:-}" ]; then
    sed -i "s/^\[server\]$/[server]\nmax_queue = $MAX_QUEUE/" "$work/state-$mode/tsa.toml"
  fi
  if [ -n "${QUEUE_WAIT_MS:-}" ]; then
    sed -i "s/^\[server\]$/[server]\nqueue_wait_ms = $QUEUE_WAIT_MS/" "$work/state-$mode/tsa.toml"
  fi
  if [ "${HSM:-0}" = 1 ]; then
    # The token's raw rate through cryptoki in one process, on the server's core.
    hsm_rate=$(taskset -c "$SERVER_CPU" "$TSA" hsm check --config "$work/state-$mode/tsa.toml" \
      --signatures 30000 --threads 1 2>/dev/null | awk -F'= ' '/^rate:/ { sub("/s", "", $2); print $2 }')
    [ -n "$hsm_rate" ] || die "tsa hsm check gave no rate"
    echo "raw HSM rate (SoftHSM2 via cryptoki, each signature checked on the host as the server does, 1 process, 1 thread, core $SERVER_CPU): $hsm_rate sign/s"
  fi
  taskset -c "$SERVER_CPU" "$TSA" serve --config "$work/state-$mode/tsa.toml" \
    --listen "$HOST:0" --admin-listen "$HOST:0" >"$work/serve-$mode.out" 2>"$work/serve-$mode.err" &
  server_pid=$!
  url=
  for _ in $(seq 100); do
    url=$(grep -o "$scheme://$HOST:[0-9]*/" "$work/serve-$mode.out" 2>/dev/null | head -n1 || true)
    [ -n "$url" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve-$mode.err" >&2; die "tsa serve exited"; }
    sleep 0.1
  done
  [ -n "$url" ] || die "tsa serve did not announce its address"
  admin=$(grep -o "admin http://$HOST:[0-9]*" "$work/serve-$mode.out" | head -n1 | cut -d' ' -f2)
  case "$url" in "$scheme://$HOST:"*) ;; *) die "refusing to load anything but $HOST ($url)" ;; esac
  echo "== tsa serve ($ALG, archive $mode) pid $server_pid on core $SERVER_CPU at $url; load: $LOAD_TOOL on core $CLIENT_CPU, $IMPRINTS imprints, $TRANSPORT"

  # The request (what a client sends) and one checked reply.
  [ -e "$work/req.tsq" ] || {
    head -c 4096 /dev/urandom >"$work/data"
    openssl ts -query -data "$work/data" -sha256 -cert -out "$work/req.tsq" 2>/dev/null
  }
  curl -sS --max-time 10 --cacert "$work/state-$mode/ca-cert.pem" \
    -H 'Content-Type: application/timestamp-query' \
    --data-binary @"$work/req.tsq" -o "$work/reply.tsr" -w '%{http_code}' "$url" >"$work/code"
  [ "$(cat "$work/code")" = 200 ] || die "sample request: HTTP $(cat "$work/code")"
  openssl ts -reply -in "$work/reply.tsr" -text >"$work/reply.txt" 2>&1 || true
  grep -q '^Status: Granted' "$work/reply.txt" || { cat "$work/reply.txt" >&2; die "sample reply not granted"; }
  openssl ts -verify -in "$work/reply.tsr" -queryfile "$work/req.tsq" \
    -CAfile "$work/state-$mode/ca-cert.pem" >/dev/null 2>&1 || die "sample reply does not verify"
  echo "sample reply: $(grep '^Status:' "$work/reply.txt"), $(wc -c <"$work/reply.tsr") octets, verified by openssl ts -verify"
}

# The comparison server (OTHER): started on the server's cores, checked with the sample
# request.
start_other() {
  url=$other_url
  admin= # no metrics: its tokens are its HTTP 200 replies (wrk also checks their PKIStatus)
  taskset -c "$SERVER_CPU" bash -c "exec $OTHER" >"$work/serve-other.out" 2>&1 &
  server_pid=$!
  local code=000
  for _ in $(seq 100); do
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve-other.out" >&2; die "OTHER exited"; }
    code=$(curl -sS --max-time 5 -H 'Content-Type: application/timestamp-query' \
      --data-binary @"$work/req.tsq" -o "$work/reply-other.tsr" -w '%{http_code}' "$url" 2>/dev/null) &&
      break
    sleep 0.1
  done
  [ "$code" = 200 ] || die "OTHER's reply to the sample request: HTTP $code"
  openssl ts -reply -in "$work/reply-other.tsr" -text >"$work/reply-other.txt" 2>&1 || true
  grep -q '^Status: Granted' "$work/reply-other.txt" ||
    { cat "$work/reply-other.txt" >&2; die "OTHER's sample reply is not granted"; }
  local checked="granted"
  if [ -n "${OTHER_CA:-}" ]; then
    openssl ts -verify -in "$work/reply-other.tsr" -queryfile "$work/req.tsq" \
      -CAfile "$OTHER_CA" >/dev/null 2>&1 || die "OTHER's sample reply does not verify with $OTHER_CA"
    checked="verified by openssl ts -verify"
  fi
  echo "== other server ($OTHER) pid $server_pid on core $SERVER_CPU at $url; load: $LOAD_TOOL on core $CLIENT_CPU, $IMPRINTS imprints"
  echo "sample reply: $(wc -c <"$work/reply-other.tsr") octets, $checked"
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

run_loads() { # mode
  local mode=$1 c out line before after
  run=0 # runs so far in this mode (rate[] is keyed by it; open_loop reads it)
  printf '\n%-6s %10s %10s %10s %9s %10s %9s %12s %14s %9s %9s%s\n' conc tokens/s p50_ms p99_ms requests bad_frac errors cpu_us/token cpu/raw_sign rss_MiB core_busy \
    "$([ -n "${hsm_rate:-}" ] && printf ' %12s' 'of_hsm_rate')"
  for c in $CONCURRENCY; do
    kill -0 "$server_pid" 2>/dev/null || die "the server died"
    # The metrics scrape costs the server CPU: before the run's CPU is read, not inside it.
    [ "$mode" = on ] && commits_before=$(commit_sums)
    tokens_before=$(tokens_issued)
    before=$(stat_ticks)
    cores_before=$(core_ticks)
    [ "$mode" = on ] && threads_before=$(thread_ticks)
    case "$LOAD_TOOL" in
      wrk)
        out=$(TSQ="$work/req.tsq" IMPRINTS="$IMPRINTS" taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) \
          wrk -t 1 -c "$c" -d "${DURATION}s" --timeout 10s -s "$work/post.lua" "$url")
        ;;
      oha)
        out=$(taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) \
          oha -z "${DURATION}s" -c "$c" -m POST -H 'Content-Type: application/timestamp-query' \
          ${oha_transport[@]+"${oha_transport[@]}"} -D "$work/req.tsq" --no-tui \
          --output-format json "$url" | oha_result)
        ;;
    esac
    after=$(stat_ticks)
    cores_after=$(core_ticks)
    [ "$mode" = on ] && { threads_after=$(thread_ticks); commits_after=$(commit_sums); }
    tokens_after=$(tokens_issued)
    tokens=-1
    [ "$tokens_before" -ge 0 ] && [ "$tokens_after" -ge 0 ] && tokens=$((tokens_after - tokens_before))
    line=$(grep '^RESULT ' <<<"$out") || { echo "$out" >&2; die "no result from $LOAD_TOOL at c=$c"; }
    # The server's peak RSS so far (VmHWM): runs go up in concurrency, so it is this run's.
    rss=$(awk '/^VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$server_pid/status")
    awk -v c="$c" -v ticks=$((after - before)) -v hz="$hz" -v raw="$raw_sign_us" -v hsm="${hsm_rate:-0}" -v rss="$rss" \
      -v cores="$cores_before $cores_after" -v tokens="$tokens" '
      { for (i = 2; i <= NF; i++) { split($i, kv, "="); r[kv[1]] = kv[2] } }
      END {
        # Tokens: what the server issued (its counter; replies cut off at the end of the
        # run aside), else the replies that were 200 and, with wrk, granted.
        n = r["requests"]; bad = r["non200"] + (r["notgranted"] > 0 ? r["notgranted"] : 0)
        if (tokens >= 0) { bad = n > tokens ? n - tokens : 0; t = tokens } else t = n - bad
        cpu = t > 0 ? ticks / hz * 1e6 / t : 0
        printf "%-6d %10.0f %10.3f %10.3f %9d %10s %9d %12.1f %14.2f %9.1f", c, t / r["seconds"],
          r["p50_ms"], r["p99_ms"], n, (n > 0 ? sprintf("%.4f", bad / n) : "-"), r["errors"],
          cpu, cpu / raw, rss
        split(cores, k, " ")
        printf " %8s", (k[4] > k[2] ? sprintf("%.0f%%", 100 * (k[3] - k[1]) / (k[4] - k[2])) : "-")
        if (hsm > 0) printf " %11.0f%%", 100 * t / r["seconds"] / hsm
        printf "\n"
      }' <<<"$line" | tee "$work/line"
    if [ "$mode" = on ]; then
      # The archive's own threads, per token: the rest of cpu_us/token is the request path.
      awk -v n="$([ "$tokens" -ge 0 ] && echo "$tokens" || awk '{ print $5 }' "$work/line")" -v hz="$hz" '
        FNR == NR { before[$1] = $2; next }
        { us[$1] = n > 0 ? ($2 - before[$1]) / hz * 1e6 / n : 0 }
        END {
          printf "       archive threads, µs per token: writer %.1f, its syncer %.1f, next segment %.1f, imprint indexer %.1f, checkpointer %.1f\n",
            us["tsa-archive"], us["tsa-log-sync"], us["tsa-log-spare"], us["tsa-imprints"], us["tsa-checkpoint"]
        }' <(echo "$threads_before") <(echo "$threads_after")
      # The group commit: how many records each commit took, and how long it took.
      read -r n0 r0 d0 <<<"$commits_before"
      read -r n1 r1 d1 <<<"$commits_after"
      awk -v n=$((n1 - n0)) -v r="$r0 $r1" -v d="$d0 $d1" 'BEGIN {
            split(r, rr, " "); split(d, dd, " ")
            if (n > 0) printf "       commits: %d, %.1f records each, %.0f µs each (write and sync)\n",
              n, (rr[2] - rr[1]) / n, (dd[2] - dd[1]) * 1e6 / n }'
    fi
    # By run, so that a concurrency given twice (a growing archive) keeps both.
    rate["$mode-$run"]=$(awk '{ print $2 }' "$work/line")
    cpu["$mode-$run"]=$(awk '{ print $8 }' "$work/line")
    run=$((run + 1))
  done
  for fraction in ${BELOW:-}; do open_loop "$mode" "$fraction" "${BELOW_CONNECTIONS:-32}"; done
  [ -n "${OVERLOAD:-}" ] && open_loop "$mode" "$OVERLOAD" "${OVERLOAD_CONNECTIONS:-1024}"
  echo "peak RSS of the server: $(awk '/^VmHWM/ { print $2 / 1024 " MiB" }' "/proc/$server_pid/status")"
}

# Open loop at a multiple of the best closed-loop rate (the capacity): below it (BELOW), the
# latency a client sees when the server is not saturated; above it (OVERLOAD), what share of
# the capacity is still served as granted tokens while the excess is refused with 503.
open_loop() { # mode multiple connections
  local mode=$1 multiple=$2 connections=$3 cap=0 q before tokens_before tokens
  for ((k = 0; k < run; k++)); do
    cap=$(awk -v a="$cap" -v b="${rate[$mode-$k]}" 'BEGIN { print (b > a ? b : a) }')
  done
  q=$(awk -v c="$cap" -v m="$multiple" 'BEGIN { printf "%d", c * m }')
  echo "== open loop: $q req/s ($multiple × $cap) over $connections connections, ${DURATION} s"
  tokens_before=$(tokens_issued)
  before=$(stat_ticks)
  taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) \
    oha -z "${DURATION}s" -q "$q" --latency-correction -c "$connections" -m POST \
    -H 'Content-Type: application/timestamp-query' ${oha_transport[@]+"${oha_transport[@]}"} \
    -D "$work/req.tsq" --no-tui \
    --output-format json "$url" >"$work/open.json"
  local ticks=$(($(stat_ticks) - before))
  tokens=$(tokens_issued)
  [ "$tokens_before" -ge 0 ] && [ "$tokens" -ge 0 ] && tokens=$((tokens - tokens_before)) || tokens=-1
  python3 - "$cap" "$ticks" "$hz" "$work/open.json" "$tokens" <<'PY'
import json, sys
cap, ticks, hz = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
d = json.load(open(sys.argv[4]))
tokens = int(sys.argv[5])
codes = {k: int(v) for k, v in d.get("statusCodeDistribution", {}).items()}
seconds = d["summary"]["total"]
p = d.get("latencyPercentiles", {})
# Granted: the server's own count of tokens where it has one, else its HTTP 200 replies.
good = (tokens if tokens >= 0 else codes.get("200", 0)) / seconds
replies = sum(codes.values())
print("answered %.0f/s  granted %.0f/s = %.1f%% of capacity  503: %d  other: %s  "
      "p50 %.2f ms  p99 %.2f ms  p99.9 %.2f ms (all replies, from when each was due)"
      % (replies / seconds, good, 100 * good / cap, codes.get("503", 0),
         {k: v for k, v in codes.items() if k not in ("200", "503")} or 0,
         (p.get("p50") or 0) * 1e3, (p.get("p99") or 0) * 1e3, (p.get("p99.9") or 0) * 1e3))
# The server's core: how busy, and its CPU per reply; a core far from busy at a goodput
# below 100 % means the load tool, not the server, set the pace.
cpu_s = ticks / hz
print("server core %.0f%% busy, %.1f µs of CPU per reply"
      % (100 * cpu_s / seconds, cpu_s * 1e6 / replies if replies else 0))
PY
}

case "${ARCHIVE:-0}" in
  0) modes=off ;;
  1) modes=on ;;
  both) modes="off on" ;;
  *) die "ARCHIVE must be 0, 1 or both" ;;
esac
[ -z "${OTHER:-}" ] || modes="$modes other"
for mode in $modes; do
  start_server "$mode"
  run_loads "$mode"
  if [ "$mode" = on ]; then
    # The imprint index (filled beside the writer, at a lower priority) right after the load.
    metrics=$(curl -s --max-time 5 "$admin/metrics")
    behind=$(awk '/^tsa_archive_imprint_index_behind / { print $2 }' <<<"$metrics")
    records=$(awk '/^tsa_archive_commit_records_sum / { printf "%d", $2 }' <<<"$metrics")
    echo "archive: $records tokens recorded; the imprint index was ${behind:-?} records behind at the end of the load"
    # The slow commits, over all runs: every token waiting for the next commit waits for them.
    awk '/^tsa_archive_commit_duration_seconds_bucket/ {
           split($1, a, "\""); b[a[2]] = $2 }
         /^tsa_archive_commit_duration_seconds_count/ { n = $2 }
         END { printf "archive commits: %d, of which %d took over 6.4 ms, %d over 25.6 ms, %d over 102 ms\n",
               n, n - b["0.0064"], n - b["0.0256"], n - b["0.1024"] }' <<<"$metrics"
  fi
  stop_server
done
# Two modes' runs side by side at each concurrency, and the second's tokens/s and CPU per
# token to the first's, in percent (unit %) or as factors (unit x).
side_by_side() { # mode_a mode_b name_a name_b unit
  local a=$1 b=$2 k=0 c
  printf '\n%-6s %12s %12s %12s %14s %14s %14s\n' conc "$3_tokens/s" "$4_tokens/s" "$4/$3" \
    "$3_cpu_us" "$4_cpu_us" "cpu_$4/$3"
  for c in $CONCURRENCY; do
    awk -v c="$c" -v ra="${rate[$a-$k]}" -v rb="${rate[$b-$k]}" -v ca="${cpu[$a-$k]}" \
      -v cb="${cpu[$b-$k]}" -v unit="$5" '
      function ratio(x) { return unit == "%" ? sprintf("%.1f%%", 100 * x) : sprintf("%.2fx", x) }
      BEGIN { printf "%-6d %12.0f %12.0f %12s %14.1f %14.1f %14s\n", c, ra, rb, ratio(rb / ra),
                ca, cb, ratio(cb / ca) }'
    k=$((k + 1))
  done
}
if [[ "$modes" == "off on"* ]]; then
  side_by_side off on off on %
  echo "on/off: tokens/s with the archive to tokens/s without; cpu_on/off: the server's CPU per"
  echo "token with the archive to without (what the archive costs where the core, not the disk,"
  echo "sets the pace)."
fi
if [ -n "${OTHER:-}" ]; then
  side_by_side other "${modes%% *}" other this x # with ARCHIVE=both, this server without it
  echo "this/other: this server's tokens/s to the other's, both pinned to core(s) $SERVER_CPU;"
  echo "cpu_this/other: this server's CPU per token to the other's. The other's replies are not"
  echo "read (oha) or checked for PKIStatus only (wrk)."
fi
echo
echo "cpu_us/token: utime+stime of the server (tsa serve${OTHER:+, or OTHER}) per token: those its"
echo "tsa_tokens_issued_total counted${OTHER:+ (OTHER: its HTTP 200 replies, with wrk those granted)}"
echo "(CLK_TCK=$hz, so ±$((1000000 / hz)) µs over the run); cpu/raw_sign: that divided by $raw_source"
echo "$raw_sign_us µs per $ALG signature (OpenSSL's: $openssl_sign_us µs). core_busy: the share of the time the server's"
echo "cores ($SERVER_CPU) ran anything (/proc/stat): below 100 % they waited for the clients or for"
echo "the archive's commits, and tokens/s is then set by latency, not by CPU."
[ "$LOAD_TOOL" = oha ] && echo "bad_frac: replies that were no token by the server's count (oha does not read bodies)."
exit 0
