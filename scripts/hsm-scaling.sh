#!/usr/bin/env bash
# HSM path over HTTP on a machine with many cores: SoftHSM2's raw single-process rate beside
# `tsa serve` on 2, 4 and 8 cores (HSM_CORE_SETS, default "0-1 0-3 0-7"), with wrk on LOAD_CPUS
# (default cores 8-15). The part "hsm" of scaling.sh, which unpacks the kit's packages (SoftHSM2
# and wrk among them) first: run it as `PARTS=hsm ./scaling.sh` (its header says what the kit
# holds).
set -u
cd "$(dirname "$0")"
[ -n "${KIT_UNPACKED:-}" ] || { echo "run as PARTS=hsm ./scaling.sh" >&2; exit 2; }
T=${TSA:-$PWD/tsa}; W=/tmp/hsmload; rm -rf $W; mkdir -p $W
nproc; $T --version
$T init --dir $W/st --hsm > $W/init.log 2>&1 || { cat $W/init.log; exit 1; }
echo "raw (tsa hsm check, 1 process, 1 thread):"; taskset -c 0 $T hsm check --config $W/st/tsa.toml --signatures ${HSM_SIGNATURES:-20000} --threads 1 2>&1 | grep rate
echo "raw (1 process, 4 threads):"; $T hsm check --config $W/st/tsa.toml --signatures ${HSM_SIGNATURES:-20000} --threads 4 2>&1 | grep rate
cat > $W/post.lua <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/timestamp-query"
local f = io.open("$PWD/q.tsq", "rb"); wrk.body = f:read("*a"); f:close()
LUA
pid=
trap '[ -n "$pid" ] && { kill $pid; wait $pid; } 2>/dev/null' EXIT
tokens() { curl -s --max-time 5 http://127.0.0.1:3991/metrics | awk '/^tsa_tokens_issued_total / { printf "%d", $2 }'; }
for cores in ${HSM_CORE_SETS:-0-1 0-3 0-7}; do
  (exec 3<>/dev/tcp/127.0.0.1/3990) 2>/dev/null && { echo "port 3990 is taken" >&2; exit 1; }
  taskset -c $cores $T serve --config $W/st/tsa.toml --listen 127.0.0.1:3990 --admin-listen 127.0.0.1:3991 > $W/out 2> $W/err &
  pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/3990) 2>/dev/null && break; sleep 0.1; done
  kill -0 $pid 2>/dev/null || { echo "tsa serve did not start:"; tail -5 $W/err; exit 1; }
  for c in 16 64; do
    echo "server on cores $cores, wrk on cores ${LOAD_CPUS:-8-15}, c=$c:"
    # Tokens by the server's own count: wrk's Requests/sec counts every reply.
    before=$(tokens)
    taskset -c ${LOAD_CPUS:-8-15} wrk -t${LOAD_THREADS:-4} -c$c -d6s -s $W/post.lua http://127.0.0.1:3990/ | grep -E "Requests/sec|Latency|Non-2xx"
    echo "tokens issued: $(( $(tokens) - before )) in 6 s"
  done
  kill $pid; wait $pid 2>/dev/null; pid=; sleep 0.5
done
