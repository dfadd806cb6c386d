#!/usr/bin/env bash
# The console's browser test: starts a broker on a fresh data directory (ports chosen by the
# OS), drives the console in headless Chromium (tests/browser/console.mjs), stops the broker.
# Installs what it needs when absent: Debian's chromium (apt-get), playwright-core (npm, into
# tests/browser/node_modules). Usage: tests/browser/run.sh [screenshot dir, e.g. docs]
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/@grpc/grpc-js ]; then
  (cd tests/browser && npm install --no-audit --no-fund --silent)
fi
# The build that is tested is the current one (cargo does nothing when it is up to date).
[ -n "${SLUICE_BIN:-}" ] || cargo build --release --quiet
bin="${SLUICE_BIN:-${CARGO_TARGET_DIR:-target}/release/sluice}"
work=$(mktemp -d)
out="$work/serve.out"
RUST_LOG=warn "$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$out" &
pid=$!
trap 'kill $pid 2>/dev/null && wait $pid; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "sluice http on" "$out" && break; sleep 0.1; done
grpc=$(sed -n 's/^sluice listening on //p' "$out")
http=$(sed -n 's/^sluice http on //p' "$out")
shots=()
if [ -n "${1:-}" ]; then shots=(--screenshots "$1"); fi

# A second broker with access control: the console must ask for a token and then show data.
"$bin" auth token console > "$work/token.txt"
token=$(sed -n 2p "$work/token.txt")
{
  printf '[auth]\nrequired = true\n'
  sed -n '/^\[\[auth.principals\]\]/,$p' "$work/token.txt"
  printf '[[auth.grants]]\nprincipal = "console"\ntopics = ["*"]\ngroups = ["*"]\nallow = ["describe"]\n'
} > "$work/auth.toml"
chmod 600 "$work/auth.toml"
RUST_LOG=warn "$bin" serve --config "$work/auth.toml" --data-dir "$work/auth-data" \
  --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$work/auth.out" &
auth_pid=$!
trap 'kill $pid $auth_pid 2>/dev/null && wait $pid $auth_pid; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "sluice http on" "$work/auth.out" && break; sleep 0.1; done
auth_http=$(sed -n 's/^sluice http on //p' "$work/auth.out")

# Three nodes of a cluster (node 1 with its HTTP port): the console shows the nodes and each
# partition's replicas.
read -r p1 p2 p3 < <(node -e 'const net = require("net");
const s = [0, 1, 2].map(() => net.createServer()); const ports = [];
s.forEach(x => x.listen(0, "127.0.0.1", () => { ports.push(x.address().port);
  if (ports.length === 3) { console.log(ports.join(" ")); s.forEach(y => y.close()); } }));')
peers="[\"1@127.0.0.1:$p1\",\"2@127.0.0.1:$p2\",\"3@127.0.0.1:$p3\"]"
cluster_pids=()
for i in 1 2 3; do
  listen_http=""
  [ "$i" = 1 ] && listen_http=127.0.0.1:0
  SLUICE_CLUSTER_NODE_ID=$i SLUICE_CLUSTER_PEERS="$peers" RUST_LOG=warn "$bin" serve \
    --data-dir "$work/node$i" --listen 127.0.0.1:0 --http-listen "$listen_http" >"$work/node$i.out" 2>"$work/node$i.err" &
  cluster_pids+=($!)
done
trap 'kill $pid $auth_pid "${cluster_pids[@]}" 2>/dev/null && wait $pid $auth_pid "${cluster_pids[@]}"; rm -rf "$work"' EXIT
for _ in $(seq 100); do grep -q "sluice http on" "$work/node1.out" && break; sleep 0.1; done
cluster_grpc=$(sed -n 's/^sluice listening on //p' "$work/node1.out")
cluster_http=$(sed -n 's/^sluice http on //p' "$work/node1.out")
"$bin" topics create diary --partitions 2 --broker "$cluster_grpc" >/dev/null

node tests/browser/console.mjs --bin "$bin" --grpc "$grpc" --http "$http" "${shots[@]}" \
  --auth-http "$auth_http" --token="$token" --cluster-http "$cluster_http" --cluster-topic diary
kill -INT $pid $auth_pid "${cluster_pids[@]}"
wait $pid $auth_pid "${cluster_pids[@]}"
