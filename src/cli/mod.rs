//! The `sluice` command line: one binary, one subcommand per job.
//!
//! - `args.rs`: the grammar (every subcommand's arguments); `error.rs`: [`CliError`].
//! - `serve.rs`: run the broker (`fdlimit.rs`: the descriptors it needs).
//! - `connection.rs`: reaching a broker (TLS, token); `produce.rs`, `consume.rs`, `topics.rs`,
//!   `groups.rs`, `cluster.rs`: the commands that go through one (`lines.rs`: their text and JSON line
//!   formats; `time.rs`: the positions and times they take).
//! - `compact.rs`: retention and key compaction, online or offline.
//! - `offline.rs`: `verify` and `dump` of a data directory; `data_dir.rs`: the check every
//!   offline command makes first.
//! - `audit.rs`: `audit` and `auth token`.
//!
//! The benchmarks' load generator is another binary, `sluice-bench` (`benches/sluice-bench`).

mod args;
mod audit;
mod cluster;
mod compact;
mod connection;
mod consume;
mod data_dir;
mod error;
mod fdlimit;
mod groups;
mod lines;
mod offline;
mod produce;
mod serve;
mod time;
mod topics;

use std::process::ExitCode;

pub use args::*;
pub use connection::{Link, broker_client, channel, connect, link, link_with};
pub use error::CliError;

/// Most threads the broker's runtime starts for blocking work.
const BLOCKING_THREADS: usize = 12;

/// Runs a parsed command line; the exit code is 0 only on success.
pub fn run(cli: Cli) -> ExitCode {
    // The broker uses every core. The clients run on one thread: a consumer is one stream.
    let mut builder = match &cli.command {
        Command::Serve(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            // Blocking work (reads, opens, closes) is short; a bound keeps the thread count
            // flat however many partitions and consumers there are (docs/storage.md).
            b.max_blocking_threads(BLOCKING_THREADS);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().thread_name("sluice").build() {
        Ok(r) => r,
        Err(e) => {
            crate::logging::say(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Produce(args) => produce::produce(args).await,
            Command::Consume(args) => consume::consume(args).await,
            Command::Topics(cmd) => topics::topics(cmd).await,
            Command::Groups(cmd) => groups::groups(cmd).await,
            Command::Compact(args) => compact::run(args).await,
            Command::Verify(args) => offline::verify(args),
            Command::Dump(args) => offline::dump(args),
            Command::Auth(AuthCommand::Token { name }) => audit::new_token(&name),
            Command::Audit(args) => audit::run(args).await,
            Command::Cluster(ClusterCommand::Status { broker, format }) => {
                cluster::status(broker, format).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`sluice consume | head`): that is how it ends.
        Err(CliError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            crate::logging::say(format_args!("error: {e}"));
            match e {
                CliError::NotDataDir(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
