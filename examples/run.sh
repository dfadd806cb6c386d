#!/usr/bin/env bash
# Runs the client examples against a real broker (fresh data directory, ports chosen by the
# OS): examples/python (the sluice-client package of clients/python, whose stubs are generated
# from proto/ when it is built) and examples/node (@grpc/grpc-js + proto-loader), then the Python
# package's own tests (pytest; they start brokers of their own). Installs what they need when
# absent: a Python virtual environment under target/examples/venv, node_modules under
# examples/node.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# The build that is tested is the current one (cargo does nothing when it is up to date).
[ -n "${SLUICE_BIN:-}" ] || cargo build --release --quiet
bin="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"

venv=target/examples/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The client package is built from this checkout every time (its stubs from proto/), in a
# build directory of its own so the source tree stays clean.
rm -rf clients/python/build
"$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./clients/python
"$venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
rm -rf clients/python/build clients/python/src/*.egg-info
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
"$venv/bin/python" examples/python/sluice_example.py "$addr"
echo "== python client package tests"
case $bin in /*) abs_bin=$bin ;; *) abs_bin=$root/$bin ;; esac
SLUICE_BIN="$abs_bin" "$venv/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests
echo "== node"
node examples/node/example.js "$addr"
kill -INT $pid
wait $pid
