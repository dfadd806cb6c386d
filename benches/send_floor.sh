#!/usr/bin/env bash
# Issue #24's yardstick: what an unbatched Send costs the broker, split into the transport's
# floor and the broker's own part, in one sitting. Each round starts `sluice-floor` (`sluice
# serve` with the same runtime, connection layer, admission and codec, whose Send handlers
# answer at once and store nothing) and then `sluice serve` (fsync = always), each on a fresh
# data directory, and drives both with the same clients:
#   - 64 producers x 1 message of 1 KB per Send, one connection each, tonic's client
#     (`sluice-bench produce --producers 64 --connections 64 --batch 1`)
#   - the seed burst: 10,000 concurrent seed-API Sends of 4 KB over 16 connections
#     (`sluice-bench burst`)
#   - a lone producer, 1 KB per Send, tonic's client and the lean one: p50 / p99
# and prints the server's CPU per Send (user + system from /proc, the client not counted).
# With CALLGRIND=1 each server instead runs under `valgrind --tool=callgrind` for two lengths of
# the 64 x 1 load (N and 2N Sends); the difference of their instruction counts over N is the
# instructions per Send, start-up excluded (they repeat to the instruction; CPU-seconds move
# +-30 % between identical runs on the 2-core VM).
# BENV="NAME=value ..." is passed to the broker only (an A/B of one setting, e.g.
# BENV=SLUICE_SEND_INLINE_SYNC_US=0); ONLY="64x1 burst lone" runs only those parts.
# Usage: [ROUNDS=3] [N=20000 Sends per 64 x 1 run] [CALLGRIND=1] [BENV=...] [ONLY=...]
#        benches/send_floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-3}"
n="${N:-20000}"
only="${ONLY:-64x1 burst lone}"
want() { [[ " $only " == *" $1 "* ]]; }
read -r -a benv <<<"${BENV:-}"
cargo build --release --quiet --workspace
bench=target/release/sluice-bench
root="${BENCH_DATA_DIR:-target/bench-data}/send-floor"
rm -rf "$root"
mkdir -p "$root"
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null || true' EXIT

ticks() { awk '{ sub(/.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }

start() { # start NAME [WRAPPER...]: the server NAME (floor or broker) on a fresh data dir
  local name=$1; shift
  local dir="$root/$name" bin=target/release/sluice args=(serve)
  [ "$name" = floor ] && bin=target/release/sluice-floor args=()
  rm -rf "$dir" "$dir.out"
  mkdir -p "$dir"
  local envs=(RUST_LOG=warn)
  [ "$name" = broker ] && envs+=("${benv[@]}")
  env "${envs[@]}" "$@" "$bin" "${args[@]}" --data-dir "$dir" --listen 127.0.0.1:0 --http-listen "" \
    --fsync always >"$dir.out" 2>"$dir.err" &
  pid=$!
  for _ in $(seq 600); do grep -q listening "$dir.out" && break; sleep 0.1; done
  addr=$(sed -n 's/^sluice listening on //p' "$dir.out")
}

stop() { kill -INT "$pid"; wait "$pid" 2>/dev/null || true; pid=; }

per_send() { # per_send TICKS0 TICKS1 SENDS: microseconds of CPU per Send
  echo "scale=1; ($2 - $1) * 10000 / $3" | bc
}

unbatched() { "$bench" produce --broker "$addr" --topic floor --producers 64 --connections 64 \
  --batch 1 --messages "$1" --client tonic; }

if [ "${CALLGRIND:-0}" = 1 ]; then
  for name in floor broker; do
    total=()
    for sends in "$n" $((2 * n)); do
      out="$root/$name.$sends.callgrind"
      start "$name" valgrind --tool=callgrind --callgrind-out-file="$out"
      unbatched "$sends" >/dev/null
      stop
      total+=("$(sed -n 's/^summary: //p' "$out")")
    done
    echo "$name: $(echo "(${total[1]} - ${total[0]}) / $n" | bc) instructions per Send" \
      "(64 x 1 KB, tonic; $n and $((2 * n)) Sends: ${total[0]} and ${total[1]})"
  done
  exit 0
fi

for r in $(seq "$rounds"); do
  for name in floor broker; do
    start "$name"
    if want 64x1; then
      unbatched 1000 >/dev/null # connections, topic, warm caches
      t0=$(ticks "$pid")
      line=$(unbatched "$n")
      t1=$(ticks "$pid")
      echo "round $r $name 64x1: $(per_send "$t0" "$t1" "$n") us CPU per Send; $line"
    fi
    if want burst; then
      "$bench" burst --broker "$addr" --topic seed --sends 100 >/dev/null
      t0=$(ticks "$pid")
      line=$("$bench" burst --broker "$addr" --topic seed --sends 10000)
      t1=$(ticks "$pid")
      echo "round $r $name burst: $(per_send "$t0" "$t1" 10000) us CPU per Send; $line"
    fi
    if want lone; then
      "$bench" produce --broker "$addr" --topic lone --messages 300 --client lean >/dev/null
      for client in tonic lean; do
        line=$("$bench" produce --broker "$addr" --topic lone --messages 3000 --client "$client")
        echo "round $r $name lone ($client): $line"
      done
    fi
    stop
  done
done
