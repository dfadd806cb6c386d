#!/usr/bin/env bash
# Sluice beside Redis Streams in one sitting: unbatched durable sends from many clients.
#   Redis: appendonly yes, appendfsync always; redis-benchmark -c 64 -P 1 -x XADD (1 KB values),
#          then the seed burst: -c 1000 -n 10000 XADD of 4 KB values (its makespan as
#          redis-benchmark reports it: from the first request, its connections already open); the server's CPU per XADD (user +
#          system from /proc, the client not counted)
#   Sluice: fsync = always (default); sluice-bench produce, 64 producers x 1 message per request,
#           1 KB values, with tonic's generated client and with the lean one (its broker CPU
#           per message: --broker-pid); the seed burst is benches/send_floor.sh's.
# Installs redis-server/redis-tools with apt when missing. Not part of CI.
# Usage: benches/peers.sh [ROUNDS]   (rounds are interleaved: redis, sluice tonic, sluice lean)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
n=${MESSAGES:-100000}
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
    apt-get install -y redis-server redis-tools >/dev/null
fi
cargo build --release --quiet --workspace
bin=target/release/sluice
bench=target/release/sluice-bench
work=$(mktemp -d)
trap 'kill -9 "${rpid:-0}" "${spid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 1024 /dev/zero | tr '\0' 'v' >"$work/value"
head -c 4096 /dev/zero | tr '\0' 'v' >"$work/value4k"
ticks() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }

redis_round() {
    rm -rf "$work/redis"; mkdir -p "$work/redis"
    redis-server --port 6399 --dir "$work/redis" --appendonly yes --appendfsync always \
        --save '' --daemonize no >/dev/null &
    rpid=$!
    until redis-cli -p 6399 ping >/dev/null 2>&1; do sleep 0.05; done
    local t0 t1 s0 s1
    t0=$(ticks "$rpid")
    redis-benchmark -p 6399 -c 64 -P 1 -n "$n" -x XADD s '*' f <"$work/value" 2>/dev/null \
        | tr '\r' '\n' | grep -E "requests per second" | tail -1 | sed 's/^/redis XADD (c64, P1): /'
    t1=$(ticks "$rpid")
    echo "redis XADD (c64, P1): $(echo "scale=1; ($t1 - $t0) * 10000 / $n" | bc) us server CPU per XADD"
    t0=$(ticks "$rpid")
    local took
    took=$(redis-benchmark -p 6399 -c 1000 -P 1 -n 10000 -x XADD b '*' f <"$work/value4k" 2>/dev/null \
        | tr '\r' '\n' | sed -n 's/.*requests completed in \([0-9.]*\) seconds.*/\1/p' | tail -1)
    t1=$(ticks "$rpid")
    echo "redis burst (c1000, 10,000 XADD of 4 KB): makespan ${took} s (redis-benchmark's own, the" \
        "1000 connections opened before it), $(echo "scale=1; ($t1 - $t0) * 10000 / 10000" | bc) us server CPU per XADD"
    kill "$rpid"; wait "$rpid" 2>/dev/null || true
}

sluice_round() {
    rm -rf "$work/sluice"
    "$bin" serve --data-dir "$work/sluice" --listen 127.0.0.1:0 --http-listen "" >"$work/log" 2>/dev/null &
    spid=$!
    until grep -q "listening on" "$work/log"; do sleep 0.01; done
    addr=http://$(sed -n 's/^sluice listening on //p' "$work/log")
    "$bench" produce --broker "$addr" --topic peers --producers 64 --connections 64 \
        --batch 1 --size 1024 --messages "$n" --client "$1" --broker-pid "$spid" \
        | sed "s/^/sluice ($1 client): /"
    kill -TERM "$spid"; wait "$spid" || true
}

for _ in $(seq "$rounds"); do
    redis_round
    sluice_round tonic
    sluice_round lean
done
