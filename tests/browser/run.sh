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

node tests/browser/console.mjs --bin "$bin" --grpc "$grpc" --http "$http" "${shots[@]}" \
  --auth-http "$auth_http" --token="$token"
kill -INT $pid $auth_pid
wait $pid $auth_pid
