#!/usr/bin/env bash
# Scaling of `tsa serve` over server cores, on a machine with many (the lent 16-core one): the
# software P-256 signer and the development clock on 1, 2, 4 and 8 cores, wrk on cores 8-15
# sending another random SHA-256 imprint in every request, and per run: requests/s, p50 and p99
# latency, the server's user+sys CPU per token, replies that are not HTTP 200 with a granted
# PKIStatus, and the peak RSS.
#
# The machine has no network, so everything travels in one folder (the "kit"): this script,
# hsm-scaling.sh, the release binary (`tsa`), a query (`q.tsq`, from `openssl ts -query -sha256
# -cert`), Debian's packages it unpacks (`apt-get download wrk libluajit-5.1-2
# libluajit-5.1-common softhsm2 libsofthsm2 softhsm2-common libsqlite3-0 libcivetweb1`), the
# `oha` binary for the overload and below parts, and for the comparison a folder `uts/` holding
# a build of uts-server (kakwa/uts-server) with its `uts.cnf` and `pki/` (its `dir` set to
# /tmp/uts-server/pki). Carry the kit there and run `kit/scaling.sh`.
#
# Parts (PARTS, space-separated, in this order by default):
#   tsa       archive off, CORE_SETS × CONNS
#   uts       uts-server, the same runs (its 128 threads pinned to the same cores)
#   pinned    the issue's pinning: each server on core 0, wrk with one thread on core 1, 32
#             connections, tsa and uts-server taking turns twice (PINNED_DURATION s each)
#   archive   archive on (token log + SQLite imprint index, group commit), CORE_SETS × CONNS
#   hsm       hsm-scaling.sh: the key in SoftHSM2, raw PKCS#11 rate beside the server's
#   overload  slow signers (P-384, RSA-3072) on one core driven open-loop at 3 × capacity
#   below     latency below saturation: P-256 on core 0, oha on LOAD_CPUS, 32 connections, its
#             capacity closed-loop, then open loop at BELOW_FRACTIONS of it, archive off and on
# Settings: CORE_SETS ("0 0-1 0-3 0-7"), CONNS ("64 256"), DURATION (6), PINNED_DURATION (8),
# LOAD_CPUS ("8-15"), LOAD_THREADS (8), OVERLOAD_ALGS ("p384 rsa3072"), QUEUE_WAIT_MS,
# COMMIT_DELAYS (the archive's commit_delay_us values to run, "default" the configuration's),
# BELOW_FRACTIONS ("0.3 0.5 0.7 0.9"), BELOW_ARCHIVE ("off on"), TSA (the binary to measure;
# default the kit's `tsa`), MAX_QUEUE (the tsa, pinned and archive parts; see below).
# On a 2-core machine, to try the script: CORE_SETS=0 LOAD_CPUS=1 LOAD_THREADS=1 DURATION=2.
set -u
cd "$(dirname "$0")"
KIT=$PWD
# Without the query every request would be refused, and measured as if it were a token.
[ -f q.tsq ] || { echo "no q.tsq in $KIT: the kit carries the query (openssl ts -query -data FILE -sha256 -cert -out q.tsq)" >&2; exit 2; }
T=${TSA:-$KIT/tsa}; W=/tmp/scale; rm -rf $W; mkdir -p $W
CORE_SETS=${CORE_SETS:-0 0-1 0-3 0-7}; CONNS=${CONNS:-64 256}; DURATION=${DURATION:-6}
LOAD_CPUS=${LOAD_CPUS:-8-15}; LOAD_THREADS=${LOAD_THREADS:-8}
PARTS=" ${PARTS:-tsa uts pinned archive hsm overload below} "
export LOAD_CPUS

# Debian's packages, unpacked over /: SQLite's only where the machine has none.
shopt -s nullglob
for f in *.deb; do
  case "$f" in libsqlite3-0_*) ldconfig -p | grep -q 'libsqlite3.so.0 ' && continue ;; esac
  dpkg -x "$f" /
done
ldconfig
export KIT_UNPACKED=1 # for hsm-scaling.sh
if [ -x uts/uts-server ] && [ ! -x /tmp/uts-server/uts-server ]; then cp -r uts /tmp/uts-server; fi
echo "cores: $(nproc); $($T --version); $(wrk -v 2>&1 | head -1)"
hz=$(getconf CLK_TCK)

# Every request another random SHA-256 imprint (as real clients send, and so that the archive
# pays for its imprint index): the 32 octets after 05 00 04 20 in q.tsq are replaced. Every
# reply is checked: HTTP 200 and PKIStatus granted (0) or grantedWithMods (1).
cat > $W/post.lua <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/timestamp-query"
local f = io.open("$KIT/q.tsq", "rb"); wrk.body = f:read("*a"); f:close()
local at = assert(wrk.body:find("\\5\\0\\4\\32", 1, true))
local head, tail, bytes = wrk.body:sub(1, at + 3), wrk.body:sub(at + 36), {}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  bad = 0
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
end
function request()
  for i = 1, 32 do bytes[i] = math.random(0, 255) end
  return wrk.format(nil, nil, nil, head .. string.char(unpack(bytes)) .. tail)
end
-- TimeStampResp ::= SEQUENCE { status PKIStatusInfo ::= SEQUENCE { status INTEGER, ... }, ... }
local function granted(body)
  if #body < 8 or body:byte(1) ~= 0x30 then return false end
  local l, i = body:byte(2), 3
  if l >= 0x80 then i = 3 + (l - 0x80) end
  if body:byte(i) ~= 0x30 or body:byte(i + 2) ~= 0x02 or body:byte(i + 3) ~= 0x01 then
    return false
  end
  return body:byte(i + 4) <= 1
end
function response(status, headers, body)
  if status ~= 200 or not granted(body) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("bad") end
  io.write(string.format("BAD %d\n", n))
end
LUA

cpu_ticks() { awk '{print $14+$15}' /proc/$1/stat; }
peak_rss() { awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$1/status; }
wait_port() {
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
# A port something already listens on would be measured in place of the server started.
port_free() {
  ! (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null || { echo "port $1 is taken: stop what listens there"; return 1; }
}

# One wrk run against the server PID at URL: one line of results.
#   measure LABEL PID URL CONNECTIONS SECONDS LOAD_CPUS THREADS
measure() {
  local label=$1 pid=$2 url=$3 c=$4 secs=$5 cpus=$6 threads=$7 t0 t1 out
  t0=$(cpu_ticks $pid)
  out=$(taskset -c $cpus wrk -t$threads -c$c -d${secs}s --timeout 10s --latency -s $W/post.lua $url)
  t1=$(cpu_ticks $pid)
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  awk -v label="$label" -v c=$c -v ticks=$((t1 - t0)) -v hz=$hz '
    /Requests\/sec/ { rps = $2 }
    /requests in/ { n = $1 }
    $1 == "50%" { p50 = $2 }
    $1 == "99%" { p99 = $2 }
    /Socket errors/ { errors = $0; sub(/^ *Socket errors: */, "", errors) }
    $1 == "BAD" { bad = $2 }
    END {
      # No BAD line: wrk failed before its summary; its replies were not checked.
      printf "%s c=%d req/s=%.0f p50=%s p99=%s cpu_us/token=%.1f bad_replies=%s%s\n", label, c,
        rps, p50, p99, (n > 0 ? ticks / hz * 1e6 / n : 0), (bad == "" ? "?" : bad),
        (errors ? " socket_errors=[" errors "]" : "")
    }' <<<"$out"
}

# The archive's figures so far: "commits records seconds writer_ticks indexer_ticks
# syncer_ticks spare_ticks", from the admin listener's metrics (read without curl, which the lent machine
# lacks) and the ticks of the writer's, the imprint indexer's and the token log's sync threads.
archive_stats() {
  local commits
  commits=$(exec 3<>/dev/tcp/127.0.0.1/3991
    printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    awk '/^tsa_archive_commit_duration_seconds_count / { n = $2 }
      /^tsa_archive_commit_records_sum / { r = $2 }
      /^tsa_archive_commit_duration_seconds_sum / { d = $2 }
      END { print n + 0, r + 0, d + 0 }' <&3)
  # The next segment's thread ends with each segment it writes: the threads that ended took
  # the process's ticks less its live threads' (the process read first).
  echo "$commits" $({ echo "process $(cpu_ticks $pid)"
      for t in /proc/$pid/task/*; do echo "$(cat $t/comm) $(cpu_ticks $pid/task/${t##*/})"; done; } |
    awk '$1 == "process" { ended += $2; next } { ended -= $2; n[$1] += $2 }
      END { print n["tsa-archive"] + 0, n["tsa-imprints"] + 0, n["tsa-log-sync"] + 0, n["tsa-log-spare"] + ended }')
}
# archive_report BEFORE AFTER: per run, the commits and the archive threads' CPU per token.
archive_report() {
  awk -v n=$requests -v hz=$hz -v b="$1" -v a="$2" 'BEGIN {
    split(b, x, " "); split(a, y, " "); c = y[1] - x[1]
    if (c > 0 && n > 0) printf "    commits: %d, %.1f records each, %.2f ms each (write + fsync); writer %.1f µs/token, its syncer %.1f, next segment %.1f, imprint indexer %.1f µs/token\n",
      c, (y[2] - x[2]) / c, (y[3] - x[3]) * 1e3 / c, (y[4] - x[4]) / hz * 1e6 / n, (y[6] - x[6]) / hz * 1e6 / n, (y[7] - x[7]) / hz * 1e6 / n, (y[5] - x[5]) / hz * 1e6 / n }'
}

# serve_tsa CORES CONFIG: starts `tsa serve` on CORES, sets $pid; fails (and says why) when
# it does not listen.
serve_tsa() {
  port_free 3990 && port_free 3991 || return 1
  taskset -c $1 $T serve --config $2 --listen 127.0.0.1:3990 --admin-listen 127.0.0.1:3991 \
    > $W/out 2> $W/err &
  pid=$!
  wait_port 3990 && kill -0 $pid 2>/dev/null ||
    { echo "tsa serve did not start:"; tail -5 $W/err; stop; return 1; }
}
serve_uts() {
  port_free 2020 || return 1
  taskset -c $1 /tmp/uts-server/uts-server -c /tmp/uts-server/uts.cnf > $W/uts.out 2>&1 &
  pid=$!
  wait_port 2020 && kill -0 $pid 2>/dev/null ||
    { echo "uts-server did not start:"; tail -5 $W/uts.out; stop; return 1; }
}
# SIGTERM, then SIGKILL after 15 s: a server whose shutdown hangs does not hang the script.
stop() {
  [ -n "${pid:-}" ] || return 0
  kill $pid 2>/dev/null
  for _ in $(seq 150); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  kill -KILL $pid 2>/dev/null
  wait $pid 2>/dev/null
  pid=
  sleep 0.5
}
# Interrupted or failed, the script leaves no server behind.
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# The cores in a set as CORE_SETS names them: "N" or "0-N".
ncores() { echo $(( ${1##*-} + 1 )); }

# scale LABEL SERVE CONFIG_OR_EMPTY URL: every core set, every connection count
scale() {
  local label=$1 serve=$2 config=$3 url=$4 cores n c
  for cores in $CORE_SETS; do
    n=$(ncores $cores)
    $serve $cores $config || continue
    for c in $CONNS; do
      [ -n "${stats:-}" ] && before=$(archive_stats)
      measure "$label server_cores=$n" $pid $url $c $DURATION $LOAD_CPUS $LOAD_THREADS
      [ -n "${stats:-}" ] && archive_report "$before" "$(archive_stats)"
    done
    echo "$label server_cores=$n peak_rss=$(peak_rss $pid)"
    stop
  done
}

rm -rf $W/st; $T init --dir $W/st --algorithm p256 > /dev/null 2>&1
# MAX_QUEUE: the servers' [server] max_queue in the tsa, pinned and archive parts (default the
# configuration's, 256), which bounds the requests in flight and so, with the archive, the commits.
set_max_queue() {
  [ -z "${MAX_QUEUE:-}" ] || sed -i "s/^\[server\]$/[server]\nmax_queue = $MAX_QUEUE/" $1
}
set_max_queue $W/st/tsa.toml
have_uts() { [ -x /tmp/uts-server/uts-server ] || { echo "uts: no build in the kit, skipped"; return 1; }; }

case "$PARTS" in *" tsa "*)
  echo "== tsa, P-256, archive off: server on cores ${CORE_SETS// /, }; wrk -t$LOAD_THREADS on $LOAD_CPUS"
  scale "tsa archive=off" serve_tsa $W/st/tsa.toml http://127.0.0.1:3990/ ;;
esac
case "$PARTS" in *" uts "*) if have_uts; then
  echo "== uts-server, P-256 (OpenSSL), same runs"
  scale "uts-server" serve_uts "" http://127.0.0.1:2020/
fi ;; esac
case "$PARTS" in *" pinned "*)
  echo "== pinned: server on core 0, wrk -t1 on core 1, 32 connections, ${PINNED_DURATION:-8} s, taking turns"
  for round in 1 2; do
    if serve_tsa 0 $W/st/tsa.toml; then
      measure "pinned round=$round tsa" $pid http://127.0.0.1:3990/ 32 ${PINNED_DURATION:-8} 1 1
      stop
    fi
    if have_uts && serve_uts 0; then
      measure "pinned round=$round uts-server" $pid http://127.0.0.1:2020/ 32 ${PINNED_DURATION:-8} 1 1
      stop
    fi
  done ;;
esac
case "$PARTS" in *" archive "*)
  echo "== tsa, P-256, archive on (token log + SQLite imprint index, group commit)"
  echo "disk: $(dd if=/dev/zero of=$W/dsync bs=4k count=2000 oflag=dsync 2>&1 | awk '/copied/ {printf "%.0f µs per 4 KiB O_DSYNC write", $(NF-3) / 2000 * 1e6}')"
  for delay in ${COMMIT_DELAYS:-default}; do
    rm -rf $W/sta; $T init --dir $W/sta --algorithm p256 --archive > /dev/null 2>&1
    [ "$delay" = default ] || sed -i "s/^\[archive\]$/[archive]\ncommit_delay_us = $delay/" $W/sta/tsa.toml
    set_max_queue $W/sta/tsa.toml
    stats=1 scale "tsa archive=on commit_delay_us=$delay" serve_tsa $W/sta/tsa.toml http://127.0.0.1:3990/
    echo "tokens archived: $(du -sh $W/sta 2>/dev/null | cut -f1) in $W/sta"
  done ;;
esac
case "$PARTS" in *" hsm "*)
  echo "== HSM (SoftHSM2 through PKCS#11)"
  ./hsm-scaling.sh ;;
esac

# oha, from the kit, against the server on 3990: its text summary in $W/oha.txt, every time in
# ms (oha otherwise picks one unit for the whole summary from its slowest reply).
PATH=$KIT:$PATH
oha_run() { taskset -c $LOAD_CPUS oha --no-tui --time-unit ms -m POST -H 'Content-Type: application/timestamp-query' -D q.tsq "$@" http://127.0.0.1:3990/ > $W/oha.txt; }
codes() { awk -v k="[$1]" '$1 == k {print $2}' $W/oha.txt; }
seconds() { awk '/Total:/ {print $2 / 1000; exit}' $W/oha.txt; }
rate() { awk '/Requests\/sec/ {printf "%d", $2}' $W/oha.txt; }

# Goodput past capacity: slow signers on one server core with max_queue 64 (and queue_wait_ms
# QUEUE_WAIT_MS, default the server's), their capacity measured closed-loop, then driven
# open-loop at 3 × that rate over 1024 connections from LOAD_CPUS: granted tokens/s as a share
# of capacity, and the 503s.
case "$PARTS" in *" overload "*)
  echo "== overload: one server core, open loop at 3 × capacity"
  for alg in ${OVERLOAD_ALGS:-p384 rsa3072}; do
    rm -rf $W/ov; $T init --dir $W/ov --algorithm $alg > /dev/null 2>&1
    sed -i 's/^\[server\]$/[server]\nmax_queue = 64/' $W/ov/tsa.toml
    [ -n "${QUEUE_WAIT_MS:-}" ] && sed -i "s/^\[server\]$/[server]\nqueue_wait_ms = $QUEUE_WAIT_MS/" $W/ov/tsa.toml
    serve_tsa 0 $W/ov/tsa.toml || continue
    oha_run -z 6s -c 64
    cap=$(rate)
    [ "${cap:-0}" -gt 0 ] || { echo "overload alg=$alg: no capacity measured"; stop; continue; }
    q=$((cap * 3))
    oha_run -z 10s -q $q -c 1024
    ok=$(codes 200); refused=$(codes 503); secs=$(seconds)
    echo "overload alg=$alg capacity=$cap/s offered=$q/s granted=$(awk -v n=${ok:-0} -v s=$secs -v c=$cap 'BEGIN {printf "%.0f/s = %.1f%% of capacity", n/s, 100*n/s/c}') 503=${refused:-0} peak_rss=$(peak_rss $pid)"
    stop
  done ;;
esac
# Latency below saturation: P-256 on core 0 with 32 connections from LOAD_CPUS, its capacity
# closed-loop, then open loop at each of BELOW_FRACTIONS of it (oha -q --latency-correction:
# a request that could not be sent when it was due counts from then). Per run: p50, p99 and
# p99.9 of every reply, replies that were not 200, and how busy the server's core was.
case "$PARTS" in *" below "*)
  echo "== below saturation: one server core, 32 connections, open loop"
  for archive in ${BELOW_ARCHIVE:-off on}; do
    dir=$W/below-$archive; rm -rf $dir
    $T init --dir $dir --algorithm p256 $([ $archive = on ] && echo --archive) > /dev/null 2>&1
    serve_tsa 0 $dir/tsa.toml || continue
    oha_run -z 6s -c 32
    cap=$(rate)
    echo "below archive=$archive capacity=$cap/s (closed loop, 32 connections)"
    for f in ${BELOW_FRACTIONS:-0.3 0.5 0.7 0.9}; do
      q=$(awk -v c=${cap:-0} -v f=$f 'BEGIN {printf "%d", c * f}')
      [ "$q" -gt 0 ] || break
      t0=$(cpu_ticks $pid)
      oha_run -z ${DURATION}s -q $q --latency-correction -c 32
      t1=$(cpu_ticks $pid)
      awk -v f=$f -v q=$q -v ok=$(codes 200) -v s=$(seconds) -v ticks=$((t1 - t0)) -v hz=$hz '
        $1 == "50.00%" { p50 = $3 }
        $1 == "99.00%" { p99 = $3 }
        $1 == "99.90%" { p999 = $3 }
        /\[[0-9]+\] [0-9]+ responses/ { n += $2 }
        END {
          printf "  offered %d/s (%s): p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms; not 200: %d; server core %.0f%% busy\n",
            q, f, p50, p99, p999, n - ok, 100 * ticks / hz / s
        }' $W/oha.txt
    done
    echo "below archive=$archive peak_rss=$(peak_rss $pid)"
    stop
  done ;;
esac
echo "== done"
