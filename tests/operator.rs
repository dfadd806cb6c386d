//! What an operator does to a broker's process and data directory from outside: log output
//! that goes away (a closed stderr, a log pipe whose reader exits) in both log formats, and
//! offline commands pointed at directories that are not data directories, or run dry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::BufReader;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::server::{BrokerProcess, assert_succeeded, bin, cli, listening_addr};

/// How the broker's stderr goes away.
#[derive(Debug, Clone, Copy)]
enum LogSink {
    /// Started with fd 2 closed (`sluice serve 2>&-`).
    Closed,
    /// A pipe whose reader exits right after the broker is up (`| head -c 100`).
    ReaderGone,
}

/// `sluice serve` logging every connection (debug) into `sink`; returns it with its gRPC port.
fn serve_with_log(dir: &Path, sink: LogSink, format: &str) -> (Child, SocketAddr) {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--http-listen", ""])
        .arg("--data-dir")
        .arg(dir)
        .args(["--log-format", format])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    match sink {
        LogSink::Closed => {
            cmd.stderr(Stdio::null());
            // SAFETY: close(2) between fork and exec touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::close(2);
                    Ok(())
                });
            }
        }
        LogSink::ReaderGone => {
            cmd.stderr(Stdio::piped());
        }
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(mut err) = child.stderr.take() {
        // Read a little, as `head -c 100` does, then go away.
        let mut first = [0u8; 100];
        let _ = std::io::Read::read(&mut err, &mut first);
        drop(err);
    }
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let addr = listening_addr(&mut out).parse().unwrap();
    (child, addr)
}

/// Waits for the process to exit; fails past `deadline` (a spec bound, not a speed target).
fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("the broker did not stop within {deadline:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_broker_whose_log_output_goes_away_serves_records_and_stops_cleanly() {
    for sink in [LogSink::Closed, LogSink::ReaderGone] {
        for format in ["text", "json"] {
            let case = format!("{sink:?}, {format}");
            let dir = tempfile::tempdir().unwrap();
            let (mut child, addr) = serve_with_log(dir.path(), sink, format);
            let broker = addr.to_string();
            // Each command is a connection (logged at debug), a topic is created (logged and
            // recorded in the audit trail), and every Send must be answered.
            for i in 0..20 {
                let out = cli(
                    &["produce", "--broker", &broker, "--topic", "prom"],
                    format!("submission {i}\n"),
                );
                assert_succeeded(&out, &format!("{case}: produce {i}: "));
            }
            let out = cli(
                &[
                    "topics",
                    "create",
                    "--broker",
                    &broker,
                    "trial",
                    "--partitions",
                    "2",
                ],
                "",
            );
            assert_succeeded(&out, &format!("{case}: topics create: "));
            let out = cli(
                &[
                    "consume", "--broker", &broker, "--topic", "prom", "--count", "20",
                ],
                "",
            );
            assert_succeeded(&out, &format!("{case}: consume: "));
            let want: String = (0..20).map(|i| format!("submission {i}\n")).collect();
            assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{case}");
            let out = cli(&["audit", "--broker", &broker, "--format", "json"], "");
            assert_succeeded(&out, &format!("{case}: audit: "));
            let trail = String::from_utf8_lossy(&out.stdout);
            assert!(
                trail.contains("trial"),
                "{case}: no audit record of the topic: {trail}"
            );

            // SIGTERM ends it, cleanly: the deadline is the default shutdown_timeout_ms (10 s)
            // plus generous slack for a loaded machine.
            let kill = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
            let status = wait_with_deadline(&mut child, Duration::from_secs(60));
            assert!(status.success(), "{case}: exit {status:?}");
            // A clean stop: the data directory opens without recovery and holds everything.
            let out = cli(&["verify", "--data-dir", dir.path().to_str().unwrap()], "");
            assert_succeeded(&out, &format!("{case}: verify: "));
            let out = cli(
                &[
                    "dump",
                    "--data-dir",
                    dir.path().to_str().unwrap(),
                    "--topic",
                    "prom",
                ],
                "",
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).lines().count(),
                20,
                "{case}"
            );
        }
    }
}

/// Every entry below `root` (and `root` itself): kind, mode, size, modification time and,
/// for files, the contents.
fn tree(root: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let contents = if m.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            Vec::new()
        };
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        out.insert(p, (m.mode(), m.size(), m.mtime(), m.mtime_nsec(), contents));
    }
    out
}

/// A data directory as a broker leaves it after a clean stop: a plain topic, a compacted
/// topic with repeated keys, and a group that acked some of its messages.
fn populated_data_dir(dir: &Path) {
    let broker = BrokerProcess::spawn(dir, &[]);
    let addr = broker.addr.to_string();
    let run = |args: &[&str], stdin: &str| {
        let mut full = args.to_vec();
        full.extend(["--broker", &addr]);
        let out = cli(&full, stdin);
        assert_succeeded(&out, &format!("{args:?}: "));
    };
    run(&["topics", "create", "keyed", "--compact"], "");
    run(
        &["produce", "--topic", "keyed", "-K", ":"],
        "a:1\nb:1\na:2\na:3\n",
    );
    run(&["produce", "--topic", "prom"], "one\ntwo\nthree\n");
    run(
        &["consume", "--topic", "prom", "--group", "g", "--count", "2"],
        "",
    );
    broker.signal("TERM");
    assert!(broker.wait().success());
}

#[test]
fn offline_commands_refuse_a_directory_that_is_not_a_data_directory_and_change_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("typo-dir");
    std::fs::create_dir(&empty).unwrap();
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let with_files = scratch.path().join("home");
    std::fs::create_dir(&with_files).unwrap();
    std::fs::write(with_files.join("notes.txt"), "not a broker's").unwrap();
    let missing = scratch.path().join("missing");
    for dir in [&empty, &with_files, &missing] {
        let d = dir.to_str().unwrap();
        let commands: [&[&str]; 6] = [
            &["compact", "--data-dir", d],
            &["compact", "--data-dir", d, "--dry-run"],
            &["compact", "--data-dir", d, "--topic", "t", "--dry-run"],
            &["verify", "--data-dir", d],
            &["dump", "--data-dir", d, "--topic", "t"],
            &["audit", "--data-dir", d],
        ];
        for args in commands {
            let before = tree(scratch.path());
            let out = cli(args, "");
            assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("not a Sluice data directory"),
                "{args:?}: {err}"
            );
            assert_eq!(tree(scratch.path()), before, "{args:?} changed the tree");
        }
    }
}

#[test]
fn read_only_offline_commands_and_dry_runs_write_nothing_in_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    populated_data_dir(dir.path());
    let d = dir.path().to_str().unwrap();
    let commands: [&[&str]; 7] = [
        &["compact", "--data-dir", d, "--dry-run"],
        &["compact", "--data-dir", d, "--topic", "keyed", "--dry-run"],
        &["compact", "--data-dir", d, "--topic", "prom", "--dry-run"],
        &["verify", "--data-dir", d],
        &["dump", "--data-dir", d, "--topic", "keyed"],
        &["audit", "--data-dir", d],
        &["audit", "--data-dir", d, "--since", "-2h"],
    ];
    for args in commands {
        let before = tree(dir.path());
        let out = cli(args, "");
        assert_succeeded(&out, &format!("{args:?}: "));
        assert_eq!(
            tree(dir.path()),
            before,
            "{args:?} changed the data directory"
        );
    }
    // The dry run said what the real run then does.
    let dry = cli(&["compact", "--data-dir", d, "--dry-run"], "");
    let dry = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(dry.contains("dry run:"), "{dry}");
    let real = cli(&["compact", "--data-dir", d], "");
    assert_succeeded(&real, "compact: ");
}

#[test]
fn a_dry_run_on_a_directory_that_needs_recovery_refuses_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::spawn(dir.path(), &[]);
    let out = cli(
        &[
            "produce",
            "--broker",
            &broker.addr.to_string(),
            "--topic",
            "prom",
        ],
        "one\ntwo\n",
    );
    assert_succeeded(&out, "produce: ");
    broker.signal("KILL");
    let _ = broker.wait();
    let before = tree(dir.path());
    let d = dir.path().to_str().unwrap();
    let out = cli(&["compact", "--data-dir", d, "--dry-run"], "");
    assert_eq!(
        tree(dir.path()),
        before,
        "the dry run changed the data directory"
    );
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("needs recovery"), "{err}");
    }
    // The real run recovers and goes on.
    assert_succeeded(&cli(&["compact", "--data-dir", d], ""), "compact: ");
    let out = cli(&["dump", "--data-dir", d, "--topic", "prom"], "");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
}

#[test]
fn verify_reports_an_empty_or_torn_checkpoint_as_a_note_and_the_broker_opens_it() {
    for damage in [&b""[..], &b"SLCP\x01\x00garbage"[..]] {
        let dir = tempfile::tempdir().unwrap();
        populated_data_dir(dir.path());
        let checkpoint = dir.path().join("topics/prom/0/checkpoint");
        assert!(checkpoint.exists());
        std::fs::write(&checkpoint, damage).unwrap();
        let d = dir.path().to_str().unwrap();
        let out = cli(&["verify", "--data-dir", d], "");
        assert_succeeded(&out, "verify: ");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("note:") && text.contains("checkpoint"),
            "{text}"
        );
        assert!(text.contains(": 0 problems"), "{text}");
        // The broker accepts the same directory and serves every record.
        let broker = BrokerProcess::spawn(dir.path(), &[]);
        let out = cli(
            &[
                "consume",
                "--broker",
                &broker.addr.to_string(),
                "--topic",
                "prom",
                "--count",
                "3",
            ],
            "",
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\nthree\n");
    }
}

#[test]
fn a_deprecated_group_setting_still_works_and_the_broker_says_so_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--http-listen", ""])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .env("SLUICE_GROUP_MAX_DELIVERIES", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    listening_addr(&mut BufReader::new(child.stdout.take().unwrap()));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SLUICE_GROUP_MAX_DELIVERIES is deprecated")
            && err.contains("[groups] max_deliveries"),
        "{err}"
    );
}
