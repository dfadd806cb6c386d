//! The broker's own output: log lines on stderr, and the count of those that never got there.
//!
//! A log line is never worth a Send, a shutdown or the process. Lines are handed to one
//! background thread (tracing-appender's non-blocking writer, lossy): a thread that logs never
//! waits for stderr, however slow or stuck its reader is, and a full queue drops the line. A
//! write that fails (the reader of a log pipe went away: `sluice serve 2>&1 | head`, a log
//! shipper restarting; a full disk under a redirect) drops the line too. Both are counted in
//! `sluice_log_lines_lost_total` and are otherwise silent: reporting them would be one more
//! write to the output that just failed (tracing-subscriber's own report of such a failure is
//! an `eprintln!`, which panics when stderr is gone, so it is turned off).

use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines the background thread failed to write.
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because the queue to the background thread was full.
static QUEUE_DROPS: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines lost so far: failed writes and lines dropped at a full queue.
pub fn lines_lost() -> u64 {
    WRITE_FAILURES.load(Ordering::Relaxed)
        + QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Lines queued for stderr at most; past that a line is dropped (and counted), never waited for.
const QUEUED_LINES: usize = 64 * 1024;

/// Stderr whose failures are counted, never returned: the background thread goes on with the
/// next line, and the line itself is gone.
struct CountedStderr;

impl Write for CountedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // One line is one write_all; a failure anywhere in it loses the line once.
        if io::stderr().write_all(buf).is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

/// The writer `tracing_subscriber::fmt` should log to, and the guard that flushes what is still
/// queued when it is dropped (waiting at most a second: a stuck reader does not hold up exit).
pub fn stderr_writer() -> (tracing_appender::non_blocking::NonBlocking, WorkerGuard) {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("sluice-log")
        .finish(CountedStderr);
    let _ = QUEUE_DROPS.set(writer.error_counter());
    (writer, guard)
}

/// Writes a line to stderr for a person at the command line, ignoring a failure: the error it
/// reports is what matters, and there is nowhere else to say it.
pub fn say(line: std::fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(line);
    let _ = err.write_all(b"\n");
}

/// Points each of stdin, stdout and stderr that the process was started without (closed, as by
/// `sluice serve 2>&-`) at `/dev/null`. Otherwise the first files the broker opens get those
/// numbers, and a log line meant for stderr would be written into a segment or an index.
pub fn reserve_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only asks whether the descriptor is open; it touches no memory.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
        if open {
            continue;
        }
        let flags = if fd == 0 {
            libc::O_RDONLY
        } else {
            libc::O_WRONLY
        };
        // SAFETY: the path is a NUL-terminated literal; `open` returns the lowest free number,
        // which is `fd` itself since every number below it is open (checked in order).
        let got = unsafe { libc::open(c"/dev/null".as_ptr(), flags) };
        if got >= 0 && got != fd {
            // SAFETY: both are descriptors this process owns; dup2 then close the spare.
            unsafe {
                libc::dup2(got, fd);
                libc::close(got);
            }
        }
    }
}
