#!/usr/bin/env bash
# A soak (issue #28 item 4): one broker process under mixed work for SOAK_SECONDS — producers with and
# without ids, a plain subscriber, two groups whose members come and go (acks, Nacks with a
# delay, ack timeouts, dead letters), retention by bytes, online compaction passes — restarted
# every RESTART seconds (kill -9 and SIGTERM in turn), sampled every 10 s into soak.csv (RSS,
# descriptors, threads, disk use, /metrics). At the end a reader checks that nothing
# acknowledged was lost and no group position went backwards, and the process after its last
# restart is compared with the same point after its first (within 10 %); exits non-zero on any.
# PLOT=1 draws soak.png (matplotlib, installed into target/soak-venv when absent). FLAT_CHECK=0
# reports the sizes without judging them (CI's two-minute run ends before retention is reached).
# Usage: [SOAK_SECONDS=3600] [RESTART=180] [OUT=target/soak] [PLOT=1] [FLAT_CHECK=1] benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SOAK_SECONDS:-3600}"
restart="${RESTART:-180}"
out="${OUT:-target/soak}"
cargo build --release --quiet --workspace
rm -rf "$out" && mkdir -p "$out"
flat=()
if [ "${FLAT_CHECK:-1}" = 0 ]; then flat=(--no-flat-check); fi
target/release/sluice-bench soak --sluice target/release/sluice --data-dir "$out/data" \
  --seconds "$seconds" --restart-every "$restart" --csv "$out/soak.csv" "${flat[@]}" 2>&1 |
  tee "$out/soak.log"
status=${PIPESTATUS[0]}
if [ "${PLOT:-1}" = 1 ]; then
  py=python3
  if ! python3 -c 'import matplotlib' 2>/dev/null; then
    [ -x target/soak-venv/bin/python ] || { python3 -m venv target/soak-venv &&
      target/soak-venv/bin/pip install -q matplotlib; }
    py=target/soak-venv/bin/python
  fi
  "$py" benches/soak_plot.py "$out/soak.csv" "$out/soak.png"
  echo "plot: $out/soak.png"
fi
exit "$status"
