//! The open-files limit: raised to the hard limit at start-up, then checked against what the
//! data directory needs, so that a broker with many partitions says what to change instead of
//! failing with "Too many open files" halfway through opening them.

use std::path::Path;

/// Descriptors kept for everything that is not a connection or a segment file: listening
/// socket, epoll, stdio, the LOCK, reads in progress, group logs being created.
const SPARE: u64 = 256;

/// Raises the soft limit to the hard limit; returns the limit now in force.
pub fn raise() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one is
        // allowed for any process.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = lim.rlim_cur,
                to = lim.rlim_max,
                "raised the open-files limit"
            );
            return Ok(lim.rlim_max);
        }
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open-files limit");
    }
    Ok(lim.rlim_cur)
}

/// Descriptors the broker needs for `data_dir` (every segment's log stays open; the indexes are
/// mapped and hold none) and `max_connections`.
pub fn needed(data_dir: &Path, max_connections: usize) -> u64 {
    segment_files(data_dir) + max_connections as u64 + SPARE
}

/// The segment logs under `dir`, at any depth.
fn segment_files(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => n += segment_files(&path),
            Ok(t) if t.is_file() => {
                let ext = path.extension().and_then(|e| e.to_str());
                if ext == Some("log") {
                    n += 1;
                }
            }
            _ => {}
        }
    }
    n
}

/// The message for a limit too low for the data directory.
pub fn too_low(limit: u64, needed: u64, data_dir: &Path) -> String {
    format!(
        "the open-files limit is {limit} but {} needs about {needed} file descriptors \
         (its segment files, max_connections and {SPARE} spare); raise the limit to at least \
         {needed}: `ulimit -n {needed}` in the shell that starts the broker, or \
         `LimitNOFILE={needed}` in its systemd unit (or lower max_connections)",
        data_dir.display()
    )
}
