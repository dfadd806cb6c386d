#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time, from its committed seeds
# (seeds/<target>) and its working corpus (corpus/<target>, not committed).
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 20 seconds, every target
#   fuzz/run.sh build                     only builds them (CI builds while the suite runs)
#
# Fails on the first target that finds a crash, a failed assertion, a leak of time
# (-timeout) or an allocation larger than the input justifies (-malloc_limit_mb); the input that
# did it is in artifacts/<target>/ (see README.md to reproduce and minimise it).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# -s none: no sanitizer (safe Rust; the unsafe code is mmap and pwritev, whose bounds the
# targets' assertions exercise); -a: debug assertions and overflow checks on.
flags=(-s none -a)
cargo +nightly fuzz build "${flags[@]}"
if [ "$secs" = build ]; then
  exit 0
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
mkdir -p logs
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  # The config target starts from the repository's own sluice.toml too (every setting).
  if [ "$t" = config ]; then cp ../sluice.toml corpus/config/; fi
  dirs=("corpus/$t")
  if [ -d "seeds/$t" ]; then dirs+=("seeds/$t"); fi
  log="logs/$t.log"
  if ! "target/$triple/release/$t" "${dirs[@]}" -artifact_prefix="artifacts/$t/" \
    -max_total_time="$secs" -timeout=20 -malloc_limit_mb=128 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    grep -v '^#[0-9]' "$log" | tail -n 40
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/ (README.md: reproducing it)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "fuzz: $t: ${runs:-?} runs in ${secs}s, ${cov:-cov: ?}"
done
