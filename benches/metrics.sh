#!/usr/bin/env bash
# What metrics cost (issue #14): the same produce runs, interleaved, each on a fresh data
# directory, against
#   base     the build before metrics existed (BASE_BIN: e.g. `git worktree add /tmp/base REV`
#            and `cargo build --release` there), no HTTP port;
#   idle     this build, HTTP port on, never scraped;
#   scraped  this build with /metrics scraped every second while the load runs.
# Shapes: 64 producers x batch 100 ("batched") and 64 producers x 1 message, with the stock
# tonic client and sluice's lean client. Reports messages/s and broker CPU-seconds per GB.
# Usage: BASE_BIN=path [BENCH_BIN=path] [ROUNDS=2] [MODES="base idle scraped"] benches/metrics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The load generator is always this checkout's sluice-bench; BENCH_BIN names the broker under test.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
base="${BASE_BIN:?BASE_BIN: a build from before the metrics}"
rounds="${ROUNDS:-2}"
modes="${MODES:-base idle scraped}"
work=$(mktemp -d)
pid=
scraper=
trap 'kill $scraper $pid 2>/dev/null || true; rm -rf "$work"' EXIT

run() { # run MODE
  local mode=$1 exe=$bin http=()
  case $mode in
    base) exe=$base ;;
    idle|scraped) http=(--http-listen 127.0.0.1:0) ;;
  esac
  rm -rf "$work/data"
  RUST_LOG=warn "$exe" serve --data-dir "$work/data" --listen 127.0.0.1:0 "${http[@]}" \
    --fsync always >"$work/out" &
  pid=$!
  until grep -q listening "$work/out"; do sleep 0.01; done
  local port url
  port=$(sed -n 's/^sluice listening on 127.0.0.1://p' "$work/out")
  if [ "$mode" = scraped ]; then
    until grep -q "sluice http on" "$work/out"; do sleep 0.01; done
    url=$(sed -n 's/^sluice http on //p' "$work/out")metrics
    (while true; do curl -sf "$url" >/dev/null; sleep 1; done) &
    scraper=$!
  fi
  for client in tonic lean; do
    echo "== $mode $client"
    "$bench" produce --broker "127.0.0.1:$port" --client $client --topic batched \
      --producers 64 --connections 4 --batch 100 --size 100 --messages 1000000 --broker-pid "$pid"
    "$bench" produce --broker "127.0.0.1:$port" --client $client --topic many \
      --producers 64 --connections 4 --batch 1 --size 100 --messages 100000 --broker-pid "$pid"
  done
  if [ -n "$scraper" ]; then kill $scraper; wait $scraper 2>/dev/null || true; scraper=; fi
  kill -INT $pid
  wait $pid || true
}

for _ in $(seq "$rounds"); do
  for mode in $modes; do run $mode; done
done
