#!/usr/bin/env bash
# What TLS and token authentication cost (issue #12): the same produce runs against a plaintext
# broker and against one with TLS and `auth.required = true` (a principal with a bearer token),
# interleaved, each on a fresh data directory, with tonic's client (`sluice-bench --client tonic`:
# the lean client speaks no TLS). Certificates are made with openssl into a scratch directory.
# Usage: [BENCH_BIN=path] [ROUNDS=2] benches/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The load generator is always this checkout's sluice-bench; BENCH_BIN names the broker under test.
if [ -z "${BENCH_BIN:-}" ]; then cargo build --release --quiet --workspace; else cargo build --release --quiet -p sluice-bench; fi
bench=target/release/sluice-bench
bin="${BENCH_BIN:-target/release/sluice}"
rounds="${ROUNDS:-2}"
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
pid=

(
  cd "$work"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=broker" \
    -keyout broker.key -out broker.csr 2>/dev/null
  printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > broker.ext
  openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile broker.ext -out broker.pem 2>/dev/null
)
"$bin" auth token bench > "$work/token.txt"
token=$(sed -n 2p "$work/token.txt")
{
  printf '[tls]\ncert_file = "%s/broker.pem"\nkey_file = "%s/broker.key"\n' "$work" "$work"
  printf '[auth]\nrequired = true\n'
  sed -n '/^\[\[auth.principals\]\]/,$p' "$work/token.txt"
  printf '[[auth.grants]]\nprincipal = "bench"\ntopics = ["*"]\nallow = ["produce", "consume", "describe", "admin"]\n'
} > "$work/tls.toml"
printf '' > "$work/plain.toml"
chmod 600 "$work"/*.toml

# run MODE: starts a broker (plain or tls), runs the three produce shapes, stops it.
run() {
  local mode=$1 out="$work/serve.out" data="$work/data-$1"
  rm -rf "$data"
  : >"$out" # emptied here: the broker's own redirect may come after the first grep
  RUST_LOG=warn "$bin" serve --config "$work/$mode.toml" --data-dir "$data" \
    --listen 127.0.0.1:0 --http-listen "" --fsync always >"$out" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
  local port
  port=$(sed -n 's/^sluice listening on 127.0.0.1://p' "$out")
  local args=(--broker "127.0.0.1:$port" --client tonic)
  if [ "$mode" = tls ]; then
    args=(--broker "https://127.0.0.1:$port" --tls-ca "$work/ca.pem" --tls-domain localhost
      --token "$token" --client tonic)
  fi
  echo "== $mode"
  "$bench" produce "${args[@]}" --topic batched --producers 1 --batch 1000 --size 1000 \
    --messages 500000 --broker-pid "$pid"
  "$bench" produce "${args[@]}" --topic many --producers 64 --connections 64 --batch 1 \
    --size 1024 --messages 100000
  "$bench" produce "${args[@]}" --topic lone --producers 1 --batch 1 --messages 5000
  kill -INT $pid
  wait $pid || true
}

for _ in $(seq "$rounds"); do
  run plain
  run tls
done
