#!/usr/bin/env bash
# The disk's own limits, measured with fio on the disk that holds target/ (or $BENCH_DATA_DIR),
# to compare Sluice's numbers with. Needs fio (Debian package `fio`; installed with apt when
# missing). ONLY=prealloc runs only the preallocated 1 KiB case (issue #24's yardstick for a
# lone producer: a log segment is preallocated, so its appends overwrite allocated blocks).
set -euo pipefail
command -v fio >/dev/null || apt-get install -y fio >/dev/null
dir="${BENCH_DATA_DIR:-$(dirname "$0")/../target/bench-data}/fio"
mkdir -p "$dir"
cd "$dir"
run() {
  echo "== fio $*"
  fio --name=w --rw=write "$@" | grep -E 'WRITE:|sync \(usec\)|sync percentiles|99\.00th|50\.00th|IOPS=' || true
  rm -f w.0.0
}
# fdatasync latency of 1 KiB appends to a preallocated file (written once, then overwritten).
fio --name=w --rw=write --bs=1m --size=64m >/dev/null
run --bs=1k --size=16m --overwrite=1 --fdatasync=1
[ "${ONLY:-}" = prealloc ] && exit 0
# Synced bandwidth: 1 MiB blocks, fdatasync after each.
run --bs=1m --size=2g --fdatasync=1
# fdatasync latency and rate: 4 KiB blocks, fdatasync after each (256 MiB keeps it short).
run --bs=4k --size=256m --fdatasync=1
# Buffered sequential write bandwidth, one fsync at the end.
run --bs=1m --size=2g --end_fsync=1
