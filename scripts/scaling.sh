#!/usr/bin/env bash
# Scaling of `tsa serve` (software P-256, development clock) from 1 to 8 server cores, with wrk
# on cores 8-15: req/s, mean and p99 latency and server CPU per token, with the archive off
# and on (SQLite, group commit; ARCHIVE=off|on|both|none, default both). HSM=1 then runs
# hsm-scaling.sh, OVERLOAD=1 the goodput runs at the end. Used on the lent 16-core machine,
# which has no network: put this script in a folder with the release binary (`tsa`), a query
# (`q.tsq`), Debian's wrk packages (`apt-get download wrk libluajit-5.1-2
# libluajit-5.1-common`) and, for OVERLOAD, the `oha` binary; carry that folder there and run
# it.
set -u
cd "$(dirname "$0")"
for f in *.deb; do dpkg -x "$f" /; done; ldconfig
T=$PWD/tsa; W=/tmp/scale; rm -rf $W; mkdir -p $W
nproc; $T --version
# Every request another random SHA-256 imprint (as real clients send), so that the archive
# pays for its imprint index: the 32 octets after 05 00 04 20 in q.tsq are replaced.
cat > $W/post.lua <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/timestamp-query"
local f = io.open("$PWD/q.tsq", "rb"); wrk.body = f:read("*a"); f:close()
local at = assert(wrk.body:find("\\5\\0\\4\\32", 1, true))
local head, tail, bytes = wrk.body:sub(1, at + 3), wrk.body:sub(at + 36), {}
function init(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16)) end
function request()
  for i = 1, 32 do bytes[i] = math.random(0, 255) end
  return wrk.format(nil, nil, nil, head .. string.char(unpack(bytes)) .. tail)
end
LUA
hz=$(getconf CLK_TCK)
case "${ARCHIVE:-both}" in none) modes="" ;; off) modes=off ;; on) modes=on ;; *) modes="off on" ;; esac
for mode in $modes; do
  flag=""; [ "$mode" = on ] && flag=--archive
  rm -rf $W/st; $T init --dir $W/st --algorithm p256 $flag > /dev/null 2>&1
  for cores in 0 0-1 0-3 0-7; do
    n=$(( $(echo $cores | sed 's/.*-//') + 1 ))
    taskset -c $cores $T serve --config $W/st/tsa.toml --listen 127.0.0.1:3990 --admin-listen 127.0.0.1:3991 > $W/out 2> $W/err &
    pid=$!; sleep 1.5
    for c in 64 256; do
      t0=$(awk '{print $14+$15}' /proc/$pid/stat)
      out=$(taskset -c 8-15 wrk -t8 -c$c -d6s --latency -s $W/post.lua http://127.0.0.1:3990/)
      t1=$(awk '{print $14+$15}' /proc/$pid/stat)
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      total=$(echo "$out" | awk '/requests in/ {print $1}')
      lat=$(echo "$out" | awk '/Latency/ && !/Distribution/ {print $2; exit}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      bad=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
      cpu=$(awk -v t=$((t1-t0)) -v hz=$hz -v n=$total 'BEGIN {printf "%.1f", t/hz*1e6/n}')
      echo "archive=$mode server_cores=$n c=$c req/s=$rps mean=$lat p99=$p99 cpu_us_per_token=$cpu non2xx=${bad:-0}"
    done
    rss=$(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$pid/status)
    echo "archive=$mode server_cores=$n peak_rss=$rss"
    kill $pid; wait $pid 2>/dev/null; sleep 0.5
  done
done
if [ -n "${HSM:-}" ] && [ -x ./hsm-scaling.sh ]; then ./hsm-scaling.sh; fi

# Goodput past capacity (OVERLOAD=1; needs `oha` beside this script or on PATH): slow signers on
# one server core with max_queue 64 (and queue_wait_ms QUEUE_WAIT_MS, default the server's),
# their capacity measured closed-loop, then driven open-loop at 3 × that rate over 1024
# connections from cores 8-15: granted tokens/s as a share of capacity, and the 503s.
if [ -n "${OVERLOAD:-}" ]; then
  PATH=$PWD:$PATH
  oha_run() { taskset -c ${LOAD_CPUS:-8-15} oha --no-tui -m POST -H 'Content-Type: application/timestamp-query' -D q.tsq "$@" http://127.0.0.1:3990/; }
  codes() { awk -v k="[$1]" '$1 == k {print $2}' $W/oha.txt; }
  for alg in ${OVERLOAD_ALGS:-p384 rsa3072}; do
    rm -rf $W/ov; $T init --dir $W/ov --algorithm $alg > /dev/null 2>&1
    sed -i 's/^\[server\]$/[server]\nmax_queue = 64/' $W/ov/tsa.toml
    [ -n "${QUEUE_WAIT_MS:-}" ] && sed -i "s/^\[server\]$/[server]\nqueue_wait_ms = $QUEUE_WAIT_MS/" $W/ov/tsa.toml
    taskset -c 0 $T serve --config $W/ov/tsa.toml --listen 127.0.0.1:3990 --admin-listen 127.0.0.1:3991 > $W/out 2> $W/err &
    pid=$!; sleep 1.5
    oha_run -z 6s -c 64 > $W/oha.txt
    cap=$(awk '/Requests\/sec/ {printf "%d", $2}' $W/oha.txt)
    q=$((cap * 3))
    oha_run -z 10s -q $q -c 1024 > $W/oha.txt
    ok=$(codes 200); refused=$(codes 503); secs=$(awk '/Total:/ {print ($3 == "ms" ? $2 / 1000 : $2); exit}' $W/oha.txt)
    echo "overload alg=$alg capacity=$cap/s offered=$q/s granted=$(awk -v n=${ok:-0} -v s=$secs -v c=$cap 'BEGIN {printf "%.0f/s = %.1f%% of capacity", n/s, 100*n/s/c}') 503=${refused:-0} peak_rss=$(awk '/VmHWM/ {print $2/1024 " MiB"}' /proc/$pid/status)"
    kill $pid; wait $pid 2>/dev/null; sleep 0.5
  done
fi
