//! `sluice serve`: load the configuration, start the server, stop cleanly on SIGINT/SIGTERM.

use std::io::{IsTerminal, Write};

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::server;

use super::args::ServeArgs;
use super::error::CliError;

/// Turns transparent huge pages off for the broker's process (`PR_SET_THP_DISABLE`), as Redis
/// and MongoDB advise for theirs. The allocator asks for them on its arenas; then every page it
/// gives back to the system and takes again costs a 2 MiB fault to zero and stays resident as
/// 2 MiB. Measured (docs/benchmarks.md): 8–25 MiB less resident memory, the same CPU.
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(%error, "could not turn transparent huge pages off");
    }
}

pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    run_with(args, false).await
}

/// [`run`]; with `floor`, Send handlers answer at once and store nothing (benchmarks only: see
/// [`super::run_floor`]).
pub async fn run_with(args: ServeArgs, floor: bool) -> Result<(), CliError> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    config.answer_sends_without_storing = floor;
    config.config_file = args.config.clone();
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = args.http_listen {
        config.http.listen = h;
    }
    if let Some(f) = args.fsync {
        config.log.fsync = f;
    }
    if let Some(a) = args.auto_create_topics {
        config.auto_create_topics = a;
    }
    if let Some(f) = args.log_format {
        config.log_format = f;
    }
    config.sanitize()?;
    // Held to the end: dropping it flushes what is still queued for stderr.
    let _log = init_tracing(config.log_format, &config.log_filter);
    for deprecated in &config.deprecations {
        tracing::warn!("{deprecated}");
    }
    no_huge_pages();
    let limit = super::fdlimit::raise()?;
    super::fdlimit::check(
        &config.data_dir,
        config.max_connections,
        limit,
        super::fdlimit::max_map_count(),
    )
    .map_err(CliError::Usage)?;

    if !crate::storage::WriterPool::configure_global(config.writer_threads) {
        tracing::warn!("the writer pool was started before its thread count was set");
    }
    let stop = CancellationToken::new();
    let running = server::start(config.clone(), stop.clone()).await?;
    // Listening for SIGTERM and SIGINT before saying where we listen: a script that stops the
    // broker as soon as it has read that line must get a clean stop, not the default action.
    let signals = Signals::listen()?;
    // One line on stdout per port, for scripts and tests that asked for port 0 (a reader that
    // stops after the first line is no error).
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "sluice listening on {}", running.addr);
    if let Some(http) = running.http_addr {
        let _ = writeln!(out, "sluice http on http://{http}/");
    }
    if let Some((id, cluster)) = running.cluster {
        let _ = writeln!(out, "sluice node {id} cluster port on {cluster}");
    }
    let _ = out.flush();
    drop(out);
    tracing::info!(addr = %running.addr, data_dir = %config.data_dir.display(),
        fsync = ?config.log.fsync, "serving");

    let stopper = stop.clone();
    tokio::spawn(async move {
        signals.wait().await;
        stopper.cancel();
    });
    match running.done.await {
        Ok(result) => result?,
        Err(e) => {
            return Err(CliError::Usage(format!("server task failed: {e}")));
        }
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// openraft reports every failed call to a peer (twice a second per group while a node is down)
/// and every vote at `info`: off unless the filter names it. The cluster's own lines say when a
/// peer goes away and comes back (docs/replication.md).
fn quiet_openraft(filter: &str) -> String {
    if filter.contains("openraft") {
        filter.to_string()
    } else {
        format!("{filter},openraft=off")
    }
}

/// SIGTERM and SIGINT, listened for from creation on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => tracing::info!("SIGINT received"),
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
        }
    }
}

fn init_tracing(format: LogFormat, filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(quiet_openraft(filter)));
    let (writer, guard) = crate::logging::stderr_writer();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person at a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer)
        // Its report of a failed write is an `eprintln!`: a panic when stderr is gone.
        .log_internal_errors(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(e) = result {
        crate::logging::say(format_args!("warning: logging not initialised: {e}"));
    }
    guard
}
