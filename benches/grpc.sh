#!/usr/bin/env bash
# End-to-end gRPC benchmarks over loopback with fsync = always: starts a broker on a fresh data
# dir (target/bench-data/grpc, or $SLUICE_BENCH_DIR/grpc), runs `sluice bench`, stops it.
# Usage: [BENCH_BIN=path] benches/grpc.sh [messages for the lone-producer run, default 20000;
# x5 for 64 producers]
# The load generator is `sluice bench`'s lean client (one thread, gRPC straight on HTTP/2); the
# runs marked "tonic" repeat two of them with tonic's full client for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
# BENCH_BIN: measure another build (e.g. the previous commit's, for an interleaved A/B).
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet; fi
bin="${BENCH_BIN:-target/release/sluice}"
dir="${SLUICE_BENCH_DIR:-target/bench-data}/grpc"
rm -rf "$dir"
mkdir -p "$dir"
out=$(mktemp)
RUST_LOG=warn "$bin" serve --data-dir "$dir" --listen 127.0.0.1:0 --http-listen "" --fsync always >"$out" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^sluice listening on //p' "$out")
b() { "$bin" bench "$@" --broker "$addr"; }
b rpc --callers 1 --calls "$n"
b rpc --callers 64 --connections 4 --calls $((n * 5))
b produce --topic lone --producers 1 --batch 1 --messages "$n"
b produce --topic many --producers 64 --connections 4 --batch 1 --messages $((n * 5))
b rpc --callers 64 --connections 4 --calls $((n * 5)) --client tonic
b produce --topic many --producers 64 --connections 4 --batch 1 --messages $((n * 5)) --client tonic
b produce --topic batched --producers 64 --connections 4 --batch 100 --messages 1000000
b consume --topic batched
b consume --topic batched
b consume --topic batched --group bench --max-in-flight 1000
kill -INT $pid
wait $pid
