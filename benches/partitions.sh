#!/usr/bin/env bash
# Thousands of partitions on one broker: 2,500 topics x 4 partitions and 1,000 consumer groups
# (override with TOPICS, PARTITIONS, GROUP_COUNT). Prints the broker's threads, open descriptors and
# resident memory after one message to every partition, then the time a restart takes after a
# clean stop and after SIGKILL (until the broker prints its listening line).
# Usage: benches/partitions.sh   (builds the release binary first; not part of CI)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --workspace
bin=target/release/sluice
bench=target/release/sluice-bench
data=$(mktemp -d)
log=$(mktemp)
trap 'kill -9 "${pid:-0}" 2>/dev/null || true; rm -rf "$data" "$log"' EXIT

start() {
    local t0 t1
    t0=$(date +%s.%N)
    "$bin" serve --data-dir "$data" --listen 127.0.0.1:0 --http-listen "" >"$log" 2>/dev/null &
    pid=$!
    until grep -q "listening on" "$log"; do
        kill -0 "$pid" || { echo "broker exited" >&2; exit 1; }
        sleep 0.01
    done
    t1=$(date +%s.%N)
    addr=$(sed -n 's/^sluice listening on //p' "$log")
    echo "$1: ready in $(echo "$t1 - $t0" | bc) s (pid $pid, $addr)"
}

start "first start"
"$bench" partitions --broker "http://$addr" --pid "$pid" \
    --topics "${TOPICS:-2500}" --partitions "${PARTITIONS:-4}" --groups "${GROUP_COUNT:-1000}"
echo "open-files limit of the broker: $(awk '/Max open files/ {print $4 " soft, " $5 " hard"}' /proc/$pid/limits)"
t0=$(date +%s.%N)
kill -TERM "$pid"
wait "$pid" || true
echo "clean stop took $(echo "$(date +%s.%N) - $t0" | bc) s"
start "restart after a clean stop"
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
start "restart after SIGKILL"
echo "after SIGKILL restart: threads $(awk '/Threads/ {print $2}' /proc/$pid/status), fds $(ls /proc/$pid/fd | wc -l), rss $(awk '/VmRSS/ {print int($2/1024)}' /proc/$pid/status) MiB"
kill -TERM "$pid"
wait "$pid" || true
