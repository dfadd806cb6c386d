//! Brokers for tests: in-process (with an injectable fault seam) or as a child process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use sluice::config::Config;
use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;
use sluice::proto::v1::broker_client::BrokerClient;
use sluice::storage::{FileIo, FsyncPolicy, RealIo};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// `sluice serve` on a gRPC port the OS chooses and no HTTP port (add `--data-dir DIR`).
pub const SERVE: [&str; 5] = ["serve", "--listen", "127.0.0.1:0", "--http-listen", ""];

/// A config for tests: a port chosen by the OS, the given data dir, small segments.
pub fn test_config(data_dir: &Path) -> Config {
    let mut c = Config {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    c.http.listen = "127.0.0.1:0".into();
    c.log.segment_bytes = 4 << 20;
    c.log.fsync = FsyncPolicy::Always;
    c
}

/// A broker running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The HTTP port (metrics, API, console).
    pub http: Option<SocketAddr>,
    stop: CancellationToken,
    done: Option<tokio::task::JoinHandle<Result<(), sluice::server::ServeError>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        Self::start_with_io(config, Arc::new(RealIo)).await
    }

    pub async fn start_with_io(config: Config, io: Arc<dyn FileIo>) -> TestServer {
        let stop = CancellationToken::new();
        let running = sluice::server::start_with_io(config, io, stop.clone())
            .await
            .unwrap();
        TestServer {
            addr: running.addr,
            http: running.http_addr,
            stop,
            done: Some(running.done),
        }
    }

    pub async fn channel(&self) -> Channel {
        sluice::cli::connect(&self.addr.to_string()).await.unwrap()
    }

    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// Graceful stop: waits until every partition is closed.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(done) = self.done.take() {
            done.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A `sluice serve` child process.
pub struct BrokerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The HTTP port (metrics, API, console).
    pub http: SocketAddr,
}

/// Reads `sluice serve`'s first line of output, `sluice listening on ADDR`, and returns ADDR.
pub fn listening_addr(stdout: &mut impl BufRead) -> String {
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    line.trim()
        .strip_prefix("sluice listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

impl BrokerProcess {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        Self::spawn_with_env(data_dir, extra, &[])
    }

    /// [`BrokerProcess::spawn`] with settings in `SLUICE_*` variables.
    pub fn spawn_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> BrokerProcess {
        let mut child = Command::new(bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let addr = listening_addr(&mut stdout).parse().unwrap();
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let http = line
            .trim()
            .strip_prefix("sluice http on http://")
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .parse()
            .unwrap();
        BrokerProcess { child, addr, http }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the process, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:") * 1024
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn message(value: impl Into<bytes::Bytes>) -> pb::Message {
    pb::Message {
        value: Some(value.into()),
        ..pb::Message::default()
    }
}

pub fn keyed(key: &str, value: impl Into<bytes::Bytes>) -> pb::Message {
    pb::Message {
        key: Some(bytes::Bytes::copy_from_slice(key.as_bytes())),
        value: Some(value.into()),
        ..pb::Message::default()
    }
}

pub fn start(kind: pb::start_position::Kind) -> Option<pb::StartPosition> {
    Some(pb::StartPosition { kind: Some(kind) })
}

/// Reads deliveries from a stream until `n` have arrived (fails after 30 s of silence).
pub async fn take(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    n: usize,
) -> Vec<pb::Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
            .await
            .expect("no delivery within 30 s")
            .unwrap()
            .expect("stream ended");
        out.extend(next.deliveries);
    }
    out
}

/// The broker binary the tests run: this build's, or `BROKER_UNDER_TEST` (a copy kept aside,
/// so that a long run of a test can go on while the tree is rebuilt).
pub fn bin() -> PathBuf {
    std::env::var_os("BROKER_UNDER_TEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sluice")))
}

/// Runs `sluice args…` with `stdin` (text or bytes) as its standard input (and none of the
/// caller's `SLUICE_BROKER` or `SLUICE_TOKEN`), and waits for it.
pub fn cli(args: &[&str], stdin: impl AsRef<[u8]>) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("SLUICE_BROKER")
        .env_remove("SLUICE_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_ref())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Asserts that a `sluice` command exited 0, showing `context` and its standard error if not.
pub fn assert_succeeded(out: &std::process::Output, context: &str) {
    assert!(
        out.status.success(),
        "{context}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Joins `group` on `topic` as a member.
pub async fn join_group(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    group: &str,
    max_in_flight: u32,
    exclusive: bool,
) -> tonic::Streaming<pb::SubscribeResponse> {
    client
        .subscribe(pb::SubscribeRequest {
            topic: topic.into(),
            group: group.into(),
            max_in_flight,
            exclusive,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Acknowledges `deliveries` for `group` on `topic`; returns what the broker applied.
pub async fn ack_deliveries(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    group: &str,
    deliveries: &[pb::Delivery],
) -> pb::AckResponse {
    client
        .ack(pb::AckRequest {
            group: group.into(),
            topic: topic.into(),
            ack_ids: deliveries.iter().map(|d| d.ack_id.clone()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A plain subscription to `topic` from `start` (absent: earliest).
pub async fn subscribe_from(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    start: Option<pb::StartPosition>,
) -> tonic::Streaming<pb::SubscribeResponse> {
    client
        .subscribe(pb::SubscribeRequest {
            topic: topic.into(),
            start,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}
