#!/usr/bin/env bash
# What idempotent Send costs (issue #13).
#
# 1. Throughput: the same produce runs with a unique id on every message and without ids,
#    interleaved, each on a fresh data directory, with the lean and the tonic client; and
#    ("off") with ids on topics whose dedup_window is 0: the ids carried and stored, not indexed.
# 2. Ten million ids: a broker receives IDS messages (default 10,000,000) with unique ids, and
#    another the same messages without ids; their resident memory (VmRSS) at the end, after
#    SIGKILL and a restart (the restart's time to listening), are compared.
#
# Usage: [BENCH_BIN=path] [ROUNDS=2] [IDS=10000000] [PART=1|2|all] benches/dedup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The load generator is always this checkout's sluice-bench; BENCH_BIN names the broker under test.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
rounds="${ROUNDS:-2}"
ids="${IDS:-10000000}"
part="${PART:-all}"
work=$(mktemp -d)
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$work"' EXIT
pid=
port=

# start DATA: starts a broker on DATA; sets pid, port and took (seconds until it listened).
start() {
  local out="$work/serve.out"
  local t0
  t0=$(date +%s.%N)
  : >"$out" # emptied here: the broker's own redirect may come after the first grep
  RUST_LOG=warn "$bin" serve --data-dir "$1" --listen 127.0.0.1:0 --http-listen "" --fsync always >"$out" &
  pid=$!
  until grep -q listening "$out"; do sleep 0.005; done
  took=$(echo "$(date +%s.%N) - $t0" | bc)
  port=$(sed -n 's/^sluice listening on 127.0.0.1://p' "$out")
}

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }

if [ "$part" = 1 ] || [ "$part" = all ]; then
  for _ in $(seq "$rounds"); do
    for client in lean tonic; do
      for mode in "" --ids off; do
        rm -rf "$work/data"
        start "$work/data"
        b=(--broker "127.0.0.1:$port" --client "$client" $mode)
        if [ "$mode" = off ]; then
          # Ids carried and stored in the records, but no index (dedup_window 0): what carrying
          # an id costs apart from looking it up.
          for t in batched batched1k lone; do
            "$bin" topics create --broker "127.0.0.1:$port" --dedup-window-ms 0 "$t" >/dev/null
          done
          b=(--broker "127.0.0.1:$port" --client "$client" --ids)
        fi
        echo "== $client ${mode:-(no ids)}"
        "$bench" produce "${b[@]}" --topic batched --producers 4 --connections 4 \
          --batch 1000 --size 100 --messages 2000000 --broker-pid "$pid"
        "$bench" produce "${b[@]}" --topic batched1k --producers 1 --batch 1000 \
          --size 1000 --messages 500000 --broker-pid "$pid"
        "$bench" produce "${b[@]}" --topic lone --producers 1 --batch 1 --size 100 \
          --messages 10000 --broker-pid "$pid"
        kill -INT $pid
        wait $pid || true
      done
    done
  done
fi

if [ "$part" = 2 ] || [ "$part" = all ]; then
  for mode in "" --ids; do
    rm -rf "$work/data"
    start "$work/data"
    echo "== $ids messages ${mode:-without ids}"
    echo "RSS at start: $(rss_mib $pid) MiB"
    "$bench" produce --broker "127.0.0.1:$port" $mode --topic epro --producers 4 \
      --connections 4 --batch 1000 --size 16 --messages "$ids" --broker-pid "$pid"
    echo "RSS after: $(rss_mib $pid) MiB"
    sleep 15
    echo "RSS 15 s later: $(rss_mib $pid) MiB"
    "$bin" topics describe --broker "127.0.0.1:$port" epro | grep ids: || true
    kill -9 $pid
    wait $pid 2>/dev/null || true
    start "$work/data"
    echo "restart after SIGKILL: $took s to listening"
    echo "RSS after the restart: $(rss_mib $pid) MiB"
    "$bin" topics describe --broker "127.0.0.1:$port" epro | grep ids: || true
    kill -INT $pid
    wait $pid || true
  done
fi
