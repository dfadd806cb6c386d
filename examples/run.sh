#!/usr/bin/env bash
# Runs the client examples against a real broker (fresh data directory, ports chosen by the
# OS): examples/python (grpcio; stubs generated from proto/ into target/examples/python) and
# examples/node (@grpc/grpc-js + proto-loader). Installs what they need when absent: a Python
# virtual environment under target/examples/venv, node_modules under examples/node.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# The build that is tested is the current one (cargo does nothing when it is up to date).
[ -n "${SLUICE_BIN:-}" ] || cargo build --release --quiet
bin="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"

venv=target/examples/venv
gen=target/examples/python
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
rm -rf "$gen" && mkdir -p "$gen"
"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$gen" --grpc_python_out="$gen" \
  proto/sluice/v1/broker.proto
if [ ! -d examples/node/node_modules/@grpc/grpc-js ]; then
  (cd examples/node && npm install --no-audit --no-fund --silent)
fi

work=$(mktemp -d)
out="$work/serve.out"
RUST_LOG=warn "$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 --http-listen "" >"$out" &
pid=$!
trap 'kill $pid 2>/dev/null && wait $pid; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
addr=$(sed -n 's/^sluice listening on //p' "$out")

echo "== python"
PYTHONPATH="$root/$gen" "$venv/bin/python" examples/python/sluice_example.py "$addr"
echo "== node"
node examples/node/example.js "$addr"
kill -INT $pid
wait $pid
