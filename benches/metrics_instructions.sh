#!/usr/bin/env bash
# What metrics cost, counted in instructions (repeatable where wall-clock runs on a 2-vCPU VM
# vary by ±10 %): the broker runs under `valgrind --tool=callgrind` (instruction counts only),
# once idle and once per load, for the build before metrics (BASE_BIN) and this build; the
# difference is the load's instructions. Then this build is scraped SCRAPES times with no load,
# for the instructions of one scrape.
# Usage: BASE_BIN=path [BENCH_BIN=path] [N=10000] benches/metrics_instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The load generator is always this checkout's sluice-bench; BENCH_BIN names the broker under test.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
base="${BASE_BIN:?BASE_BIN: a build from before the metrics}"
n="${N:-10000}"
scrapes="${SCRAPES:-20}"
work=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

# measure EXE LOAD [HTTP]: prints the broker's total instructions for LOAD (idle, 64x1,
# batched, scrape).
measure() {
  local exe=$1 load=$2 http=()
  [ "$exe" = "$bin" ] && http=(--http-listen 127.0.0.1:0)
  rm -rf "$work/data" "$work/cg.out"
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$exe" serve \
    --data-dir "$work/data" --listen 127.0.0.1:0 "${http[@]}" --fsync always \
    >"$work/out" 2>"$work/err" &
  pid=$!
  until grep -q listening "$work/out"; do sleep 0.1; done
  local port
  port=$(sed -n 's/^sluice listening on 127.0.0.1://p' "$work/out")
  local b=(--broker "127.0.0.1:$port" --client tonic)
  case $load in
    64x1) "$bench" produce "${b[@]}" --topic t --producers 64 --connections 4 --batch 1 \
            --size 100 --messages "$n" >/dev/null ;;
    batched) "$bench" produce "${b[@]}" --topic t --producers 64 --connections 4 \
            --batch 100 --size 100 --messages $((n * 20)) >/dev/null ;;
    scrape) "$bench" produce "${b[@]}" --topic t --producers 1 --batch 1 --messages 1 \
              >/dev/null
            until grep -q "sluice http on" "$work/out"; do sleep 0.1; done
            local url
            url=$(sed -n 's/^sluice http on //p' "$work/out")metrics
            for _ in $(seq "$scrapes"); do curl -sf "$url" >/dev/null; done ;;
    idle1) "$bench" produce "${b[@]}" --topic t --producers 1 --batch 1 --messages 1 \
             >/dev/null ;;
  esac
  kill -TERM $pid # background jobs of a script ignore SIGINT, and valgrind keeps that
  wait $pid || true
  grep -E '^(summary|totals):' "$work/cg.out" | tail -1 | awk '{print $2}'
}

for exe in "$base" "$bin"; do
  idle=$(measure "$exe" idle1)
  for load in 64x1 batched; do
    total=$(measure "$exe" $load)
    msgs=$n
    [ $load = batched ] && msgs=$((n * 20))
    echo "$exe $load: $(( (total - idle) / msgs )) instructions per message ($msgs messages; total $total, idle $idle)"
  done
done
idle=$(measure "$bin" idle1)
total=$(measure "$bin" scrape)
echo "one scrape of /metrics: $(( (total - idle) / scrapes )) instructions (over $scrapes)"
