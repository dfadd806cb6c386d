#!/usr/bin/env bash
# End-to-end gRPC benchmarks over loopback with fsync = always: starts a broker on a fresh data
# dir (target/bench-data/grpc, or $BENCH_DATA_DIR/grpc), runs `sluice-bench`, stops it.
# Usage: [BENCH_BIN=path] benches/grpc.sh [messages for the lone-producer run, default 20000;
# x5 for 64 producers]
# The load generator is `sluice-bench` (one thread); each unary run is made with its lean client
# (gRPC straight on HTTP/2) and then with tonic's full client, as an application would send.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
# BENCH_BIN: measure another build (e.g. the previous commit's, for an interleaved A/B).
# The load generator is always this checkout's sluice-bench; BENCH_BIN names the broker under test.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
dir="${BENCH_DATA_DIR:-target/bench-data}/grpc"
rm -rf "$dir"
mkdir -p "$dir"
out=$(mktemp)
RUST_LOG=warn "$bin" serve --data-dir "$dir" --listen 127.0.0.1:0 --http-listen "" --fsync always >"$out" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^sluice listening on //p' "$out")
b() { "$bench" "$@" --broker "$addr"; }
# Every unary run with both clients, one after the other: the hand-written client's figures are
# never printed without tonic's for the same run beside them.
both() { for client in lean tonic; do echo "== $client"; b "$@" --client $client; done; }
both rpc --callers 1 --calls "$n"
both rpc --callers 64 --connections 4 --calls $((n * 5))
both produce --topic lone --producers 1 --batch 1 --messages "$n"
both produce --topic many --producers 64 --connections 4 --batch 1 --messages $((n * 5))
both produce --topic batched --producers 64 --connections 4 --batch 100 --messages 1000000
b consume --topic batched
b consume --topic batched
b consume --topic batched --group bench --max-in-flight 1000
kill -INT $pid
wait $pid
