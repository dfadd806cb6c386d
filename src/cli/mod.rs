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
//! - `subscription.rs`: a consumer-group member's subscription and acks as every client here
//!   keeps them (subscribed again, sent again, when the group moves).
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
pub mod subscription;
mod time;
mod topics;

use std::process::ExitCode;

pub use args::*;
pub use connection::{Link, broker_client, channel, connect, link, link_with};
pub use error::CliError;

/// Most threads the broker's runtime starts for blocking work.
const BLOCKING_THREADS: usize = 12;

/// The runtime a command runs on: the broker uses every core; the clients run on one thread (a
/// consumer is one stream).
fn runtime(serve: bool) -> Option<tokio::runtime::Runtime> {
    let mut builder = if serve {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        // Blocking work (reads, opens, closes) is short; a bound keeps the thread count flat
        // however many partitions and consumers there are (docs/storage.md).
        b.max_blocking_threads(BLOCKING_THREADS);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match builder.enable_all().thread_name("sluice").build() {
        Ok(r) => Some(r),
        Err(e) => {
            crate::logging::say(format_args!("error: cannot start the async runtime: {e}"));
            None
        }
    }
}

/// The transport's floor, for benchmarks (`sluice-floor` of `benches/sluice-bench`,
/// `benches/send_floor.sh`): `sluice serve` on the same runtime, connection layer, admission and
/// codec, whose Send handlers (sluice.v1 and the seed API) answer at once and store nothing.
/// The `sluice` binary never calls it.
pub fn run_floor(args: ServeArgs) -> ExitCode {
    let Some(runtime) = runtime(true) else {
        return ExitCode::FAILURE;
    };
    exit_code(runtime.block_on(serve::run_with(args, true)))
}

/// Runs a parsed command line; the exit code is 0 only on success.
pub fn run(cli: Cli) -> ExitCode {
    let Some(runtime) = runtime(matches!(cli.command, Command::Serve(_))) else {
        return ExitCode::FAILURE;
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
            Command::Cluster(ClusterCommand::TransferLeader {
                broker,
                topic,
                partition,
                to,
            }) => cluster::transfer_leader(broker, topic, partition, to).await,
            Command::Cluster(ClusterCommand::Rebalance { broker, dry_run }) => {
                cluster::rebalance(broker, dry_run).await
            }
            Command::Cluster(ClusterCommand::AddNode { broker, node }) => {
                cluster::add_node(broker, &node).await
            }
            Command::Cluster(ClusterCommand::RemoveNode { broker, id }) => {
                cluster::remove_node(broker, id).await
            }
        }
    });
    exit_code(result)
}

fn exit_code(result: Result<(), CliError>) -> ExitCode {
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
