//! The `sluice` binary: see `sluice --help`.

use std::process::ExitCode;

/// mimalloc: the broker's hot path (HTTP/2 frames, requests, deliveries) allocates many small,
/// short-lived buffers across threads, which glibc's allocator handles poorly.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    sluice::logging::reserve_standard_fds();
    sluice::cli::run(sluice::cli::Cli::parse_args())
}
