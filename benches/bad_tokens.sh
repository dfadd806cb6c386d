#!/usr/bin/env bash
# A client hammering with bad tokens beside a good one (issue #28 item 2): a broker with
# `auth.required = true` and `fsync = always`; a good producer (tonic's client, one message of
# 1 KiB per Send) runs alone, then again and again while 20,000 calls with a wrong token arrive at
# full speed over 16 connections (256 callers). Prints both runs' latency, the bad client's rate,
# how many records `_audit` gained, and checks that every message the good client had
# acknowledged is in its topic. Interleaved for ROUNDS rounds, each on a fresh data directory.
# Usage: [BENCH_BIN=path] [ROUNDS=2] [GOOD=3000] [BAD=20000] benches/bad_tokens.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
cli=target/release/sluice
rounds="${ROUNDS:-2}"
good="${GOOD:-3000}"
bad="${BAD:-20000}"
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null && wait $pid; rm -rf "$work"' EXIT
pid=

"$cli" auth token good > "$work/token.txt"
token=$(sed -n 2p "$work/token.txt")
{
  printf '[auth]\nrequired = true\n'
  sed -n '/^\[\[auth.principals\]\]/,$p' "$work/token.txt"
  printf '[[auth.grants]]\nprincipal = "good"\ntopics = ["*"]\nallow = ["produce", "consume", "describe", "admin"]\n'
  printf '[[auth.grants]]\nprincipal = "good"\ntopics = ["_audit"]\nallow = ["describe"]\n'
} > "$work/auth.toml"
chmod 600 "$work/auth.toml"

# next TOPIC: the topic's next offset (partition 0), as the good principal sees it.
next() {
  "$cli" topics describe "$1" --broker "127.0.0.1:$port" --token "$token" |
    awk '$1 == "0" { print $3 }'
}

for round in $(seq "$rounds"); do
  data="$work/data-$round" out="$work/serve.out"
  : >"$out"
  RUST_LOG=warn "$bin" serve --config "$work/auth.toml" --data-dir "$data" \
    --listen 127.0.0.1:0 --http-listen "" --fsync always >"$out" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
  port=$(sed -n 's/^sluice listening on 127.0.0.1://p' "$out")
  goodargs=(--broker "127.0.0.1:$port" --token "$token" --client tonic --topic lone
    --producers 1 --batch 1 --size 1024 --messages "$good")
  echo "== round $round"
  echo "-- alone"
  "$bench" produce "${goodargs[@]}"
  runs=1
  audit_before=$(next _audit)
  echo "-- beside $bad calls with a wrong token (the good run repeated until they are done)"
  "$bench" rpc --broker "127.0.0.1:$port" --client tonic --refused \
    --token "wrong-token-0000000000000000000000000000000000" \
    --callers 256 --connections 16 --calls "$bad" > "$work/bad.out" &
  badpid=$!
  while kill -0 $badpid 2>/dev/null; do
    "$bench" produce "${goodargs[@]}"
    runs=$((runs + 1))
  done
  wait $badpid
  cat "$work/bad.out"
  audit_after=$(next _audit)
  echo "_audit: $((audit_after - audit_before)) records added during the run"
  # Each run sends one warm-up message besides its GOOD.
  stored=$(next lone)
  if [ "$stored" != "$((runs * (good + 1)))" ]; then
    echo "FAIL: topic lone holds $stored messages, the good client had $((runs * (good + 1))) acknowledged" >&2
    exit 1
  fi
  echo "the good client's $stored acknowledged messages are all stored"
  kill -INT $pid
  wait $pid || true
done
