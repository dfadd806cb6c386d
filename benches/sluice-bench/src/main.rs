//! `sluice-bench`: the load generator of Sluice's benchmarks (`benches/*.sh`), a binary of its
//! own so that the `sluice` product carries no code that exists only to be measured.
//!
//! # Layout
//!
//! - `bench`: `produce`, `consume` and `rpc` against a running broker, with either client.
//! - `partitions`: many topics, partitions and groups; the broker's threads, files and memory.
//! - `burst`: the seed's burst of one seed-API Send per patient.
//! - `soak`: a broker process under mixed work and restarts for a set time, then checked.
//! - `lean`: a minimal unary gRPC client straight on HTTP/2 (`--client lean`), whose figures are
//!   always printed beside the same run with tonic's client by the scripts.

mod bench;
mod burst;
mod lean;
mod partitions;
mod soak;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Load a running Sluice broker and measure it"
)]
struct Cli {
    #[command(subcommand)]
    command: bench::BenchCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: the load generator must leave the other cores to the broker it measures (on
    // the 2-core machine, a one-thread generator measured 10-15 % more broker throughput).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            sluice::logging::say(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            sluice::logging::say(format_args!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}
