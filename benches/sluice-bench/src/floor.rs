//! `sluice-floor`: the transport's floor for the benchmarks (`benches/send_floor.sh`). It takes
//! `sluice serve`'s arguments and serves the same way (runtime, connection layer, admission,
//! codec, allocator), except that Send (sluice.v1 and the seed API) is answered at once and
//! nothing is stored. Not part of the product: a broker that acknowledges what it does not keep
//! is only a yardstick.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `sluice serve`, with Sends answered at once and nothing stored (benchmarks only).
#[derive(Debug, Parser)]
#[command(name = "sluice-floor")]
struct FloorCli {
    #[command(flatten)]
    serve: sluice::cli::ServeArgs,
}

fn main() -> ExitCode {
    sluice::logging::reserve_standard_fds();
    sluice::cli::run_floor(FloorCli::parse().serve)
}
