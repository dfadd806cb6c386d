//! The open-files limit and the kernel's limit on memory maps: the first is raised to the hard
//! limit at start-up, then both are checked against what the data directory needs, so that a
//! broker with many partitions says what to change instead of failing with "Too many open
//! files" or a refused `mmap` halfway through opening them (or later, as segments accumulate).

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

/// Memory maps kept for everything that is not a segment index: the allocator's arenas, thread
/// stacks, the executable and its libraries.
const SPARE_MAPS: u64 = 4096;

/// Checks the limits against what `data_dir` needs: every segment's log stays open (one
/// descriptor) and its two indexes stay mapped (two maps), besides `max_connections`.
/// `max_map_count` is `None` where the kernel does not say.
pub fn check(
    data_dir: &Path,
    max_connections: usize,
    open_files: u64,
    max_map_count: Option<u64>,
) -> Result<(), String> {
    let segments = segment_files(data_dir);
    let files = segments + max_connections as u64 + SPARE;
    if files > open_files {
        return Err(too_low(open_files, files, data_dir));
    }
    let maps = 2 * segments + SPARE_MAPS;
    match max_map_count {
        Some(limit) if maps > limit => Err(format!(
            "vm.max_map_count is {limit} but {} needs about {maps} memory maps (two indexes per \
             segment, {segments} segments, and {SPARE_MAPS} spare); raise it: `sysctl -w \
             vm.max_map_count={}` (and in /etc/sysctl.d/ to keep it), or keep fewer segments \
             (a larger log.segment_bytes, retention)",
            data_dir.display(),
            maps.next_power_of_two()
        )),
        _ => Ok(()),
    }
}

/// The kernel's limit on memory maps per process (Linux), if it says.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
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
fn too_low(limit: u64, needed: u64, data_dir: &Path) -> String {
    format!(
        "the open-files limit is {limit} but {} needs about {needed} file descriptors \
         (its segment files, max_connections and {SPARE} spare); raise the limit to at least \
         {needed}: `ulimit -n {needed}` in the shell that starts the broker, or \
         `LimitNOFILE={needed}` in its systemd unit (or lower max_connections)",
        data_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory with `n` segments in one partition.
    fn data_dir(n: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("topics/t/0");
        std::fs::create_dir_all(&p).unwrap();
        for i in 0..n {
            for ext in ["log", "index", "timeindex"] {
                std::fs::write(p.join(format!("{i:020}.{ext}")), b"").unwrap();
            }
        }
        dir
    }

    #[test]
    fn limits_are_checked_against_the_segments_and_the_message_says_what_to_raise() {
        let dir = data_dir(100);
        // (open files, max maps, what the error names)
        let cases: [(u64, Option<u64>, Option<&str>); 5] = [
            (100_000, Some(65_530), None),
            (100_000, None, None),
            (100 + 10 + SPARE - 1, Some(65_530), Some("ulimit -n 366")),
            (
                100_000,
                Some(200 + SPARE_MAPS - 1),
                Some("vm.max_map_count=8192"),
            ),
            (100_000, Some(200 + SPARE_MAPS), None),
        ];
        for (files, maps, want) in cases {
            let got = check(dir.path(), 10, files, maps);
            match want {
                None => assert!(got.is_ok(), "{files} {maps:?}: {got:?}"),
                Some(w) => {
                    let e = got.expect_err("refused");
                    assert!(e.contains(w), "{e}");
                }
            }
        }
    }
}
