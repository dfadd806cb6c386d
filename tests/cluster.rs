//! Three `sluice serve` processes as a cluster on loopback, checked the way Jepsen checks:
//! producers send numbered messages through random nodes (each message sent once: a Send that
//! fails or goes unanswered is recorded as unknown) while the test kills (`SIGKILL`), pauses
//! (`SIGSTOP` past the election timeout) and cuts off (every link to the other nodes
//! blackholed, `cluster/links.rs`) leaders and followers; then every partition is read
//! from every node and checked for Jepsen's anomalies by name: lost writes, duplicates,
//! inconsistent offsets, non-monotonic sends, reads of uncommitted writes. A plain subscriber
//! follows the tail through the faults and must see every acknowledged message once, in order.
//!
//! Also: what a cluster node refuses at start (bad peers, another node's or cluster's data
//! directory, a single node's data) and what it refuses at run time until part two
//! (consumer groups); ids sent again through any node across the same faults, stored once;
//! retention and topic deletion across the nodes; each node's audit chain, merged by
//! `sluice audit`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;
mod groups;
mod links;
mod nodes;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::server::bin;
use sluice::proto::seed as seed_pb;
use sluice::proto::seed::broker_client::BrokerClient as SeedClient;
use sluice::proto::v1 as pb;
use sluice::proto::v1::admin_client::AdminClient;
use sluice::proto::v1::broker_client::BrokerClient;
use tokio::sync::watch;
use tonic::transport::Channel;

/// A generous deadline for anything the cluster must do (an election, a catch-up): far above
/// a failover at the default election timeout (2.0–2.4 s), so only a cluster that never gets
/// there fails.
const DEADLINE: Duration = Duration::from_secs(60);

const TOPIC: &str = "submissions";
const PARTITIONS: u32 = 2;

/// One `sluice serve` of the cluster.
struct Node {
    id: u64,
    dir: PathBuf,
    child: Option<Child>,
}

struct TestCluster {
    _tmp: tempfile::TempDir,
    /// Each node's `cluster.peers`: itself at its own port, the others through its links.
    peers: Vec<String>,
    links: links::Links,
    /// More settings of every node (`SLUICE_*`).
    env: Vec<(String, String)>,
    nodes: Vec<Node>,
    /// Each node's client address while it runs (`None` while it is down).
    addrs: Arc<Mutex<Vec<Option<String>>>>,
    /// Each node's HTTP address, when `env` turns the HTTP port on.
    http: Vec<Option<std::net::SocketAddr>>,
    /// Each node's own cluster port (the others reach the founding three through links).
    cluster_ports: Vec<u16>,
}

/// `n` loopback ports free now, for listeners the test binds again later (a node's cluster port after
/// a restart, a proxy's after its node comes back). They are taken below the OS's ephemeral
/// range (`ip_local_port_range`, 32768-60999 by default), where no OS-assigned port lands:
/// the port of another test's listener on `127.0.0.1:0`, or the source port of an outgoing
/// connection, once took a proxy's port while its node was down (`AddrInUse` when it came
/// back).
fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    assert!(ephemeral_low > 2_048, "no ports below the ephemeral range");
    let span = (ephemeral_low - 1_024).min(12_000);
    let low = ephemeral_low - span;
    // Tests of this process take turns along the range; another test process starts
    // elsewhere on it.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % span;
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let step = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(step < span, "no free port left below the ephemeral range");
        let port = (low + (start + step) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}

fn peers_of(ports: &[u16]) -> String {
    let list: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("\"{}@127.0.0.1:{p}\"", i + 1))
        .collect();
    format!("[{}]", list.join(","))
}

/// Starts `sluice serve` in cluster mode; returns the child and its client address, or its
/// standard error when it refused to start.
fn serve(
    dir: &Path,
    id: u64,
    peers: &str,
    extra_env: &[(&str, &str)],
) -> Result<(Child, String), String> {
    serve_http(dir, id, peers, extra_env).map(|(child, addr, _)| (child, addr))
}

/// What the nodes log: warnings, or what `CLUSTER_LOGS` says (`1`: warnings, shown with the
/// test's output; a filter such as `warn,sluice=debug`: that, shown).
fn log_filter() -> String {
    match std::env::var("CLUSTER_LOGS") {
        Ok(filter) if filter != "1" => filter,
        _ => "warn".into(),
    }
}

/// [`serve`], and the HTTP port's address when `extra_env` turns it on
/// (`SLUICE_HTTP_LISTEN=127.0.0.1:0`).
fn serve_http(
    dir: &Path,
    id: u64,
    peers: &str,
    extra_env: &[(&str, &str)],
) -> Result<(Child, String, Option<std::net::SocketAddr>), String> {
    let mut child = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("SLUICE_HTTP_LISTEN", "")
        .env("SLUICE_CLUSTER_NODE_ID", id.to_string())
        .env("SLUICE_CLUSTER_PEERS", peers)
        .env("RUST_LOG", log_filter())
        .envs(extra_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    match line.trim().strip_prefix("sluice listening on ") {
        Some(addr) => {
            let addr = addr.to_string();
            line.clear();
            stdout.read_line(&mut line).unwrap();
            let http = line
                .trim()
                .strip_prefix("sluice http on http://")
                .and_then(|a| a.strip_suffix('/'))
                .map(|a| a.parse().unwrap());
            // The stderr pipe must keep draining: a blocked writer would stall the node.
            // `CLUSTER_LOGS=1` shows the nodes' logs (warnings and errors) with the test's.
            let stderr = child.stderr.take().unwrap();
            let show = std::env::var_os("CLUSTER_LOGS").is_some();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if show {
                        eprintln!("node {id}: {line}");
                    }
                }
            });
            std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
            Ok((child, addr, http))
        }
        None => {
            let out = child.wait_with_output().unwrap();
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }
}

impl TestCluster {
    /// Three nodes, each reaching the others through links the test can cut. Call within a
    /// tokio runtime (the links' proxies run on it).
    fn start() -> TestCluster {
        Self::start_with(&[])
    }

    /// [`TestCluster::start`] with more settings for every node.
    fn start_with(env: &[(&str, &str)]) -> TestCluster {
        let mut cluster = Self::stopped(env);
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster
    }

    /// Three nodes not started yet (their data directories not made yet).
    fn stopped(env: &[(&str, &str)]) -> TestCluster {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(9);
        let links = links::Links::new(&ports[..3], ports[3..].iter().copied());
        let peers = (0..3)
            .map(|i| {
                let seen: Vec<u16> = (0..3)
                    .map(|j| if i == j { ports[i] } else { links.port(i, j) })
                    .collect();
                peers_of(&seen)
            })
            .collect();
        let nodes = (1..=3)
            .map(|id| Node {
                id,
                dir: tmp.path().join(format!("node{id}")),
                child: None,
            })
            .collect();
        TestCluster {
            _tmp: tmp,
            peers,
            links,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nodes,
            addrs: Arc::new(Mutex::new(vec![None; 3])),
            http: vec![None; 3],
            cluster_ports: ports[..3].to_vec(),
        }
    }

    /// Starts one more node to join the cluster (`cluster.join = true`), reaching the others
    /// straight at their cluster ports; not in the clients' list (`addrs`) until the test puts
    /// it there. Its index, its cluster port and its client address.
    fn start_joining(&mut self) -> (usize, u16, String) {
        let i = self.nodes.len();
        self.cluster_ports.push(free_ports(1)[0]);
        self.peers.push(peers_of(&self.cluster_ports));
        let id = i as u64 + 1;
        self.nodes.push(Node {
            id,
            dir: self._tmp.path().join(format!("node{id}")),
            child: None,
        });
        self.http.push(None);
        self.addrs.lock().unwrap().push(None);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("SLUICE_CLUSTER_JOIN", "true")])
            .collect();
        let (child, addr, http) = serve_http(&self.nodes[i].dir, id, &self.peers[i], &env)
            .unwrap_or_else(|e| panic!("node {id} did not start: {e}"));
        self.nodes[i].child = Some(child);
        self.http[i] = http;
        (i, self.cluster_ports[i], addr)
    }

    /// The nodes in the clients' list now, by index.
    fn running(&self) -> Vec<usize> {
        let addrs = self.addrs.lock().unwrap();
        (0..addrs.len()).filter(|&i| addrs[i].is_some()).collect()
    }

    fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (child, addr, http) = serve_http(&node.dir, node.id, &self.peers[i], &env)
            .unwrap_or_else(|e| panic!("node {} did not start: {e}", node.id));
        node.child = Some(child);
        self.http[i] = http;
        if i < 3 {
            self.links.set_up(i, true);
        }
        self.addrs.lock().unwrap()[i] = Some(addr);
    }

    fn kill(&mut self, i: usize) {
        self.addrs.lock().unwrap()[i] = None;
        self.links.set_up(i, false);
        let mut child = self.nodes[i].child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts node `i` again as an operator of a load balancer does: clients are sent to it
    /// once its `/readyz` answers 200 (caught up with its groups' leaders). Needs the HTTP port
    /// on (`SLUICE_HTTP_LISTEN=127.0.0.1:0`).
    async fn restart_until_ready(&mut self, i: usize) {
        self.restart(i);
        let addr = self.addrs.lock().unwrap()[i].take();
        self.until_ready(i).await;
        self.addrs.lock().unwrap()[i] = addr;
    }

    /// Waits until node `i`'s `/readyz` answers 200 (caught up with its groups' leaders).
    /// Needs the HTTP port on.
    async fn until_ready(&self, i: usize) {
        let http = self.http[i].expect("the HTTP port is on");
        tokio::time::timeout(DEADLINE, async {
            while common::http::get(http, "/readyz").await.status != 200 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("node {} became ready", i + 1));
    }

    /// Stops node `i` as an operator does: taken out of the clients' list first (a load
    /// balancer draining it), then `SIGTERM`; returns how long it took to exit, once it has.
    fn stop(&mut self, i: usize) -> Duration {
        self.addrs.lock().unwrap()[i] = None;
        let started = std::time::Instant::now();
        self.signal(i, "TERM");
        let status = self.nodes[i].child.take().unwrap().wait().unwrap();
        assert!(status.success(), "node {} stopped with {status}", i + 1);
        if i < 3 {
            self.links.set_up(i, false);
        }
        started.elapsed()
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].child.as_ref().unwrap().id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    fn addr(&self, i: usize) -> String {
        self.addrs.lock().unwrap()[i].clone().expect("node is up")
    }

    /// The index of the node leading `partition`, as node `ask` knows it, once one is known
    /// and is one of `among`.
    async fn leader(&self, ask: usize, partition: u32, among: &[usize]) -> usize {
        let found = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(d) = describe_if_up(&self.addr(ask), TOPIC).await
                    && let Some(l) = d.partitions[partition as usize].leader
                    && among.contains(&(l as usize - 1))
                {
                    return l as usize - 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no leader of partition {partition} within {DEADLINE:?}"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A multi-threaded runtime for a test (the links' proxies and the clients run on it).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// [`runtime`] with four worker threads: many clients at once (producers, group members).
fn busy_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

/// Creates topic `name` with `partitions` through `channel`'s node.
async fn create_topic(channel: Channel, name: &str, partitions: u32) {
    AdminClient::new(channel)
        .create_topic(pb::CreateTopicRequest {
            name: name.into(),
            settings: Some(pb::TopicSettings {
                partitions,
                ..pb::TopicSettings::default()
            }),
        })
        .await
        .unwrap();
}

async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
}

async fn describe(addr: &str) -> Result<pb::DescribeTopicResponse, String> {
    describe_status(addr, TOPIC)
        .await
        .map_err(|e| e.to_string())
}

async fn describe_status(
    addr: &str,
    topic: &str,
) -> Result<pb::DescribeTopicResponse, tonic::Status> {
    let channel = connect(addr)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(pb::DescribeTopicRequest { name: topic.into() });
    request.set_timeout(Duration::from_secs(2));
    AdminClient::new(channel)
        .describe_topic(request)
        .await
        .map(|r| r.into_inner())
}

/// [`describe`] for a loop that waits on a node: `None` while it cannot answer yet (down,
/// starting, cut off, too slow) or has not learnt of the topic yet (`NOT_FOUND`: a node learns
/// topics from the metadata log); any other answer is the subject failing, and fails the test
/// at once instead of being waited out as "not yet".
async fn describe_if_up(addr: &str, topic: &str) -> Option<pb::DescribeTopicResponse> {
    match describe_status(addr, topic).await {
        Ok(d) => Some(d),
        Err(s) if common::not_yet(&s) || s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("{addr} answered DescribeTopic with {s:?}"),
    }
}

/// Waits until the node at `addr` serves partition 0 up to offset `end` (it has learnt that
/// much is committed).
async fn readable_up_to(addr: &str, end: u64, what: &str) {
    let seen = tokio::time::timeout(DEADLINE, async {
        while describe(addr).await.map(|d| d.partitions[0].next_offset) != Ok(end) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    seen.unwrap_or_else(|_| panic!("{addr} did not serve {what} within {DEADLINE:?}"));
}

/// What the producers saw.
#[derive(Default)]
struct History {
    /// Acknowledged: (partition, offset) → value.
    acked: BTreeMap<(u32, u64), String>,
    /// Sent, not acknowledged (an error or no answer): may or may not be stored.
    unknown: BTreeSet<String>,
    /// Per producer, the offsets of its acknowledged messages in the order it sent them.
    sent_order: BTreeMap<u32, Vec<u64>>,
    /// Why Sends failed (the start of each message), and how often: printed with the result.
    errors: BTreeMap<String, usize>,
}

/// Sends numbered messages, one per Send, each through a random running node, until `stop`.
async fn produce(
    producer: u32,
    addrs: Arc<Mutex<Vec<Option<String>>>>,
    history: Arc<Mutex<History>>,
    acks: Arc<watch::Sender<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(producer + 1);
    let partition = producer % PARTITIONS;
    for seq in 0u64.. {
        if *stop.borrow_and_update() {
            return;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let live: Vec<String> = addrs.lock().unwrap().iter().flatten().cloned().collect();
        let addr = &live[rng as usize % live.len()];
        let value = format!("p{producer}-{seq:06}");
        let sent = async {
            let mut client = BrokerClient::new(connect(addr).await.map_err(|e| e.to_string())?);
            let mut request = tonic::Request::new(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message {
                    value: Some(value.clone().into()),
                    partition: Some(partition),
                    ..pb::Message::default()
                }],
            });
            // A client's own deadline: a Send to a paused node would wait for ever.
            request.set_timeout(Duration::from_secs(3));
            client
                .send(request)
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
        };
        let outcome = sent.await;
        let mut h = history.lock().unwrap();
        match outcome {
            Ok(r) => {
                let p = &r.positions[0];
                assert_eq!(p.partition, partition, "the message went where it was sent");
                h.acked.insert((p.partition, p.offset), value);
                h.sent_order.entry(producer).or_default().push(p.offset);
                drop(h);
                acks.send_modify(|n| *n += 1);
            }
            Err(e) => {
                h.unknown.insert(value);
                *h.errors.entry(e.chars().take(400).collect()).or_default() += 1;
            }
        }
    }
}

/// `count` producers, each running `produce` with its number, the running nodes' addresses,
/// `history`, the count of acknowledged Sends and a stop signal: the signal's sender and the
/// tasks.
fn spawn_producers<H, F, Fut>(
    count: u32,
    cluster: &TestCluster,
    history: &Arc<Mutex<H>>,
    acks: &Arc<watch::Sender<u64>>,
    produce: F,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)
where
    F: Fn(
        u32,
        Arc<Mutex<Vec<Option<String>>>>,
        Arc<Mutex<H>>,
        Arc<watch::Sender<u64>>,
        watch::Receiver<bool>,
    ) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let producers = (0..count)
        .map(|p| {
            tokio::spawn(produce(
                p,
                Arc::clone(&cluster.addrs),
                Arc::clone(history),
                Arc::clone(acks),
                stop_rx.clone(),
            ))
        })
        .collect();
    (stop_tx, producers)
}

/// Follows partition 0's tail from the start through the faults, moving to another node when
/// its node goes away; returns what it read, once it has read up to `until` (set at the end).
async fn follow(
    addrs: Arc<Mutex<Vec<Option<String>>>>,
    mut until: watch::Receiver<Option<u64>>,
) -> Vec<(u64, String)> {
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut pick = 0usize;
    loop {
        let next = seen.last().map_or(0, |(o, _)| o + 1);
        if until.borrow_and_update().is_some_and(|end| next >= end) {
            return seen;
        }
        pick += 1;
        let live: Vec<String> = addrs.lock().unwrap().iter().flatten().cloned().collect();
        let addr = &live[pick % live.len()];
        let Ok(channel) = connect(addr).await else {
            continue;
        };
        let request = pb::SubscribeRequest {
            topic: TOPIC.into(),
            partitions: vec![0],
            start: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Offset(next)),
            }),
            ..pb::SubscribeRequest::default()
        };
        let Ok(stream) = BrokerClient::new(channel).subscribe(request).await else {
            continue;
        };
        let mut stream = stream.into_inner();
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                // At the end nothing more may come: look at the bound again.
                _ = until.changed() => break,
            };
            match message {
                Ok(Some(batch)) => {
                    for d in batch.deliveries {
                        let value =
                            String::from_utf8(d.value.unwrap_or_default().to_vec()).unwrap();
                        seen.push((d.offset, value));
                    }
                }
                // The node went away (killed, or its stream ended): go on elsewhere.
                _ => break,
            }
            let next = seen.last().map_or(0, |(o, _)| o + 1);
            if until.borrow().is_some_and(|end| next >= end) {
                return seen;
            }
        }
    }
}

/// Every message of `partition` on the node at `addr`, up to `end`.
async fn read_all(addr: &str, topic: &str, partition: u32, end: u64) -> Vec<(u64, String)> {
    if end == 0 {
        return Vec::new();
    }
    let mut client = BrokerClient::new(connect(addr).await.unwrap());
    let request = pb::SubscribeRequest {
        topic: topic.into(),
        partitions: vec![partition],
        start: Some(pb::StartPosition {
            kind: Some(pb::start_position::Kind::Earliest(true)),
        }),
        limit: end,
        ..pb::SubscribeRequest::default()
    };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(batch) = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("reading a partition stalled")
        .unwrap()
    {
        for d in batch.deliveries {
            out.push((
                d.offset,
                String::from_utf8(d.value.unwrap_or_default().to_vec()).unwrap(),
            ));
        }
    }
    out
}

/// Waits until `n` more Sends than now have been acknowledged: the cluster makes progress.
/// Producers sending ids to one topic through random nodes ([`produce_ids`]), and what they saw.
struct IdProducers {
    history: Arc<Mutex<IdHistory>>,
    acks: Arc<watch::Sender<u64>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl IdProducers {
    /// `count` producers of ids to `topic`, numbered from `first` (their ids differ by number).
    fn spawn(cluster: &TestCluster, topic: &'static str, count: u32, first: u32) -> IdProducers {
        let history = Arc::new(Mutex::new(IdHistory::default()));
        let acks = Arc::new(watch::Sender::new(0u64));
        let (stop, tasks) = spawn_producers(count, cluster, &history, &acks, |p, a, h, k, s| {
            produce_ids(topic, first + p, a, h, k, s)
        });
        IdProducers {
            history,
            acks,
            stop,
            tasks,
        }
    }

    /// Waits for `n` more acknowledged Sends ([`progress`]).
    async fn progress(&self, n: u64, what: &str) {
        progress(&self.acks, n, what).await;
    }

    /// Stops them; what they saw.
    async fn stop(self) -> IdHistory {
        self.stop.send_replace(true);
        for p in self.tasks {
            p.await.unwrap();
        }
        std::mem::take(&mut *self.history.lock().unwrap())
    }
}

/// Asserts that no running node refused a Send: the only errors are from a node taken out (being
/// stopped or killed) as the Send reached it.
fn assert_no_running_node_refused(histories: &[&IdHistory]) {
    let refused: Vec<&String> = histories
        .iter()
        .flat_map(|h| h.errors.keys())
        .filter(|e| !e.starts_with(STOPPING))
        .collect();
    assert!(refused.is_empty(), "refused by a running node: {refused:?}");
}

async fn progress(acks: &watch::Sender<u64>, n: u64, what: &str) {
    let target = *acks.borrow() + n;
    let mut rx = acks.subscribe();
    tokio::time::timeout(DEADLINE, rx.wait_for(|&a| a >= target))
        .await
        .unwrap_or_else(|_| panic!("no progress within {DEADLINE:?} {what}"))
        .unwrap();
}

#[test]
fn kills_pauses_and_cuts_of_leaders_and_followers_lose_duplicate_and_reorder_nothing_acknowledged()
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        // Created through a node that may not lead the metadata group: it is forwarded.
        let mut admin = AdminClient::new(connect(&cluster.addr(0)).await.unwrap());
        admin
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: Some(pb::TopicSettings {
                    partitions: PARTITIONS,
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();

        let history = Arc::new(Mutex::new(History::default()));
        let acks = Arc::new(watch::Sender::new(0u64));
        let (stop_tx, producers) = spawn_producers(4, &cluster, &history, &acks, produce);
        let (until_tx, until_rx) = watch::channel(None);
        let follower = tokio::spawn(follow(Arc::clone(&cluster.addrs), until_rx));

        progress(&acks, 50, "before any fault").await;
        // CLUSTER_ROUNDS=N runs the schedule N times (1 in CI; docs/benchmarks.md records a
        // longer run), alternating which partition's leader is killed and which paused.
        let rounds = cluster_rounds();
        let all = [0, 1, 2];
        for round in 0..rounds {
            let killed = round % PARTITIONS;
            // 1. SIGKILL of one partition's leader; Sends go on through the others; it comes
            // back.
            let victim = cluster.leader(0, killed, &all).await;
            cluster.kill(victim);
            progress(&acks, 50, "after killing a leader").await;
            cluster.restart(victim);
            progress(&acks, 20, "after restarting it").await;
            // 2. SIGSTOP of the other partition's leader past the election timeout: the others
            // elect a new one; the old one, resumed, must not acknowledge what it held.
            let paused = cluster.leader(0, 1 - killed, &all).await;
            cluster.signal(paused, "STOP");
            let others: Vec<usize> = all.iter().copied().filter(|&i| i != paused).collect();
            cluster.leader(others[0], 1 - killed, &others).await;
            progress(&acks, 20, "while a leader is paused").await;
            cluster.signal(paused, "CONT");
            progress(&acks, 20, "after it resumed").await;
            // 3. SIGKILL of a follower of the first.
            let leader = cluster.leader(0, killed, &all).await;
            let victim = (leader + 1) % 3;
            cluster.kill(victim);
            progress(&acks, 50, "after killing a follower").await;
            cluster.restart(victim);
            progress(&acks, 20, "after restarting it").await;
            // 4. A leader cut off from the other nodes (clients still reach it) past the
            // election timeout: it can commit nothing, so acknowledges nothing; the others
            // elect a new one; healed, it learns the newer term and its uncommitted entries are
            // cut.
            let cut = cluster.leader(0, killed, &all).await;
            cluster.links.isolate(cut, true);
            let others: Vec<usize> = all.iter().copied().filter(|&i| i != cut).collect();
            cluster.leader(others[0], killed, &others).await;
            progress(&acks, 20, "while a leader is cut off").await;
            cluster.links.isolate(cut, false);
            progress(&acks, 20, "after its links healed").await;
            // 5. A follower cut off.
            let leader = cluster.leader(0, 1 - killed, &all).await;
            let cut = (leader + 2) % 3;
            cluster.links.isolate(cut, true);
            progress(&acks, 50, "while a follower is cut off").await;
            cluster.links.isolate(cut, false);
            progress(&acks, 20, "after its links healed").await;
        }

        stop_tx.send_replace(true);
        for p in producers {
            p.await.unwrap();
        }
        let ends = converged_ends(&cluster, TOPIC, PARTITIONS).await;
        let history = std::mem::take(&mut *history.lock().unwrap());
        let log = &same_logs_everywhere(&cluster, TOPIC, &ends).await;
        // Lost writes: every acknowledged message is at the offset it was acknowledged with.
        for (at, value) in &history.acked {
            assert_eq!(
                log.get(at),
                Some(value),
                "lost write: {value} acknowledged at {at:?}"
            );
        }
        // Duplicates: no message stored twice; everything stored was sent (acknowledged or not).
        let acked: BTreeSet<&String> = history.acked.values().collect();
        let mut stored = BTreeSet::new();
        for value in log.values() {
            assert!(stored.insert(value.clone()), "duplicate: {value}");
            assert!(
                acked.contains(value) || history.unknown.contains(value),
                "stored but never sent: {value}"
            );
        }
        // Monotonic: each producer's messages sit in the order it sent them.
        for (producer, offsets) in &history.sent_order {
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "producer {producer} reordered"
            );
        }
        // ... and read back in that order: within a partition, a producer's acknowledged numbers
        // grow with the offset. (A Send that failed may still be committed later, after the
        // producer's next one: without ids, as with any broker's non-idempotent producer, that
        // message is "unknown", not acknowledged, and may land anywhere later.)
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for value in log.values().filter(|v| acked.contains(v)) {
            let (producer, seq) = value.split_once('-').unwrap();
            if let Some(before) = last.insert(producer, seq) {
                assert!(before < seq, "{producer}: {seq} stored after {before}");
            }
        }
        // The tail follower: every message once, in offset order, each one that stayed.
        until_tx.send_replace(Some(ends[0]));
        let seen = tokio::time::timeout(DEADLINE, follower)
            .await
            .expect("the follower did not reach the end")
            .unwrap();
        let want: Vec<(u64, String)> = log
            .iter()
            .filter(|((p, _), _)| *p == 0)
            .map(|((_, o), v)| (*o, v.clone()))
            .collect();
        assert_eq!(
            seen, want,
            "the tail follower read something that is not in the log"
        );
        eprintln!(
            "cluster run: {} acknowledged, {} unknown, ends {ends:?}; errors: {:#?}",
            history.acked.len(),
            history.unknown.len(),
            history.errors
        );
    });
}

/// What producers of ids saw.
#[derive(Default)]
struct IdHistory {
    /// Each acknowledged id's position, as first acknowledged.
    acked: BTreeMap<String, (u32, u64)>,
    /// Every id sent (each is sent until acknowledged).
    sent: BTreeSet<String>,
    /// Sends of an id acknowledged before, answered `duplicate` at its position.
    duplicates: usize,
    /// Why Sends failed, and how often.
    errors: BTreeMap<String, usize>,
    /// The longest an acknowledged Send took.
    slowest_ack: Duration,
    /// The longest a producer waited for an id to be acknowledged: from its first Send to the
    /// one acknowledged, through every refusal and retry between.
    longest_wait: Duration,
}

/// How [`produce_ids`] marks the errors of nodes taken out of the clients' list meanwhile.
const STOPPING: &str = "[a node taken out] ";

/// Sends ids (each message's value is its id; no key, so the id picks the partition), one per
/// Send or the same id twice in one, each through a random running node, until `stop`. A Send
/// that fails is sent again, the same id through another node, until acknowledged; one
/// acknowledged is sometimes sent again through another node, which must answer `duplicate` at
/// the first position.
async fn produce_ids(
    topic: &'static str,
    producer: u32,
    addrs: Arc<Mutex<Vec<Option<String>>>>,
    history: Arc<Mutex<IdHistory>>,
    acks: Arc<watch::Sender<u64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ u64::from(producer + 1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let send = |addr: String, id: String, twice: bool| async move {
        let mut client = BrokerClient::new(connect(&addr).await.map_err(|e| e.to_string())?);
        let message = pb::Message {
            value: Some(id.clone().into()),
            id: Some(id.into()),
            ..pb::Message::default()
        };
        let messages = if twice {
            vec![message.clone(), message]
        } else {
            vec![message]
        };
        let mut request = tonic::Request::new(pb::SendRequest {
            topic: topic.into(),
            messages,
        });
        request.set_timeout(Duration::from_secs(3));
        client
            .send(request)
            .await
            .map(|r| r.into_inner().positions)
            .map_err(|e| e.to_string())
    };
    for seq in 0u64.. {
        if *stop.borrow_and_update() {
            return;
        }
        let id = format!("p{producer}-{seq:05}");
        history.lock().unwrap().sent.insert(id.clone());
        let twice = next() % 5 == 0;
        let began = tokio::time::Instant::now();
        let deadline = began + DEADLINE;
        let first = loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} not acknowledged within {DEADLINE:?}"
            );
            let live: Vec<String> = addrs.lock().unwrap().iter().flatten().cloned().collect();
            let addr = live[next() as usize % live.len()].clone();
            let tried = addr.clone();
            let sent_at = tokio::time::Instant::now();
            match send(addr, id.clone(), twice).await {
                Ok(positions) => {
                    let took = sent_at.elapsed();
                    let mut h = history.lock().unwrap();
                    h.slowest_ack = h.slowest_ack.max(took);
                    h.longest_wait = h.longest_wait.max(began.elapsed());
                    drop(h);
                    let first = &positions[0];
                    if twice {
                        let again = &positions[1];
                        assert!(again.duplicate, "{id} twice in one Send: {positions:?}");
                        assert_eq!(
                            (again.partition, again.offset),
                            (first.partition, first.offset)
                        );
                    }
                    break (first.partition, first.offset);
                }
                Err(e) => {
                    // A node the test took out of the list (to stop or kill it) meanwhile.
                    let gone = !addrs.lock().unwrap().contains(&Some(tried));
                    let why: String = e.chars().take(100).collect();
                    let key = if gone {
                        format!("{STOPPING}{why}")
                    } else {
                        why
                    };
                    *history.lock().unwrap().errors.entry(key).or_default() += 1;
                }
            }
        };
        history.lock().unwrap().acked.insert(id.clone(), first);
        acks.send_modify(|n| *n += 1);
        if next() % 3 == 0 {
            let live: Vec<String> = addrs.lock().unwrap().iter().flatten().cloned().collect();
            let addr = live[next() as usize % live.len()].clone();
            // A retry that fails (a fault meanwhile) proves nothing; one answered must be the
            // duplicate at the first position.
            if let Ok(positions) = send(addr, id.clone(), false).await {
                let again = &positions[0];
                assert!(again.duplicate, "{id} sent again: {positions:?}");
                assert_eq!((again.partition, again.offset), first, "{id} sent again");
                history.lock().unwrap().duplicates += 1;
            }
        }
    }
}

/// Once every node serves the same log end of each of `partitions`: those ends.
async fn converged_ends(cluster: &TestCluster, topic: &str, partitions: u32) -> Vec<u64> {
    let ends = tokio::time::timeout(DEADLINE, async {
        let running = cluster.running();
        loop {
            let mut ends = Vec::new();
            for &i in &running {
                if let Some(d) = describe_if_up(&cluster.addr(i), topic).await {
                    ends.push(
                        d.partitions
                            .iter()
                            .map(|p| p.next_offset)
                            .collect::<Vec<_>>(),
                    );
                }
            }
            if ends.len() == running.len() && ends.iter().all(|e| *e == ends[0]) {
                return ends[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the replicas did not converge");
    assert_eq!(ends.len(), partitions as usize);
    ends
}

/// Every message of every partition (up to `ends`) as each node serves it, checked to be the
/// same on every node at dense offsets.
async fn same_logs_everywhere(
    cluster: &TestCluster,
    topic: &str,
    ends: &[u64],
) -> BTreeMap<(u32, u64), String> {
    let mut logs: Vec<BTreeMap<(u32, u64), String>> = Vec::new();
    let running = cluster.running();
    for &i in &running {
        let mut log = BTreeMap::new();
        for (p, &end) in (0u32..).zip(ends) {
            let read = read_all(&cluster.addr(i), topic, p, end).await;
            let offsets: Vec<u64> = read.iter().map(|(o, _)| *o).collect();
            let dense: Vec<u64> = (0..end).collect();
            assert_eq!(
                offsets,
                dense,
                "node {}: partition {p}'s offsets are dense",
                i + 1
            );
            log.extend(read.into_iter().map(|(o, v)| ((p, o), v)));
        }
        logs.push(log);
    }
    // Inconsistent offsets: every replica holds the same message at every offset.
    for (k, log) in logs.iter().enumerate().skip(1) {
        let (a, b) = (running[k] + 1, running[0] + 1);
        assert!(*log == logs[0], "node {a} and node {b} differ");
    }
    logs.swap_remove(0)
}

/// Once the replicas converged: each id stored once, wherever and however often it was sent;
/// nothing stored that was not sent; each acknowledged id where it was acknowledged. Returns
/// the partitions' ends.
async fn ids_stored_once(
    cluster: &TestCluster,
    topic: &str,
    partitions: u32,
    history: &IdHistory,
) -> Vec<u64> {
    let ends = converged_ends(cluster, topic, partitions).await;
    let log = same_logs_everywhere(cluster, topic, &ends).await;
    let mut stored = BTreeMap::new();
    for (at, id) in &log {
        assert!(history.sent.contains(id), "stored but never sent: {id}");
        if let Some(before) = stored.insert(id.clone(), *at) {
            panic!("{id} stored twice: at {before:?} and {at:?}");
        }
    }
    for (id, at) in &history.acked {
        assert_eq!(stored.get(id), Some(at), "{id} acknowledged at {at:?}");
    }
    ends
}

/// Creates `TOPIC` with `partitions` and an hour's id window, through node 1.
async fn create_id_topic(cluster: &TestCluster, partitions: u32) {
    AdminClient::new(connect(&cluster.addr(0)).await.unwrap())
        .create_topic(pb::CreateTopicRequest {
            name: TOPIC.into(),
            settings: Some(pb::TopicSettings {
                partitions,
                dedup_window_ms: Some(3_600_000),
                ..pb::TopicSettings::default()
            }),
        })
        .await
        .unwrap();
}

#[test]
fn ids_sent_again_through_any_node_across_kills_pauses_and_cuts_are_stored_once() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        let partitions = 3;
        create_id_topic(&cluster, partitions).await;
        let producers = IdProducers::spawn(&cluster, TOPIC, 4, 0);
        producers.progress(50, "before any fault").await;
        let all = [0, 1, 2];
        // A leader killed (Sends in flight on it: their outcome unknown, sent again elsewhere),
        // and back.
        let victim = cluster.leader(0, 0, &all).await;
        cluster.kill(victim);
        producers.progress(50, "after killing a leader").await;
        cluster.restart(victim);
        producers.progress(20, "after restarting it").await;
        // A leader paused past the election timeout, then resumed.
        let paused = cluster.leader(0, 1, &all).await;
        cluster.signal(paused, "STOP");
        let others: Vec<usize> = all.iter().copied().filter(|&i| i != paused).collect();
        cluster.leader(others[0], 1, &others).await;
        producers.progress(30, "while a leader is paused").await;
        cluster.signal(paused, "CONT");
        producers.progress(20, "after it resumed").await;
        // A leader cut off from the other nodes: what it appended is never committed; the
        // same ids, sent again through the others, are stored by the new leader.
        let cut = cluster.leader(0, 2, &all).await;
        cluster.links.isolate(cut, true);
        let others: Vec<usize> = all.iter().copied().filter(|&i| i != cut).collect();
        cluster.leader(others[0], 2, &others).await;
        producers.progress(30, "while a leader is cut off").await;
        cluster.links.isolate(cut, false);
        producers.progress(30, "after its links healed").await;
        let history = producers.stop().await;
        let ends = ids_stored_once(&cluster, TOPIC, partitions, &history).await;
        // Every node killed and started again: each rebuilds its id index (its runs, and the
        // entries it applies again), so an id sent again through any node is still answered
        // at its first position, and nothing more is stored.
        for i in 0..3 {
            cluster.kill(i);
        }
        for i in 0..3 {
            cluster.restart(i);
        }
        for (k, (id, at)) in history.acked.iter().step_by(5).enumerate() {
            let placed = tokio::time::timeout(DEADLINE, async {
                loop {
                    let mut client =
                        BrokerClient::new(connect(&cluster.addr(k % 3)).await.unwrap());
                    let sent = client
                        .send(pb::SendRequest {
                            topic: TOPIC.into(),
                            messages: vec![pb::Message {
                                value: Some(id.clone().into()),
                                id: Some(id.clone().into()),
                                ..pb::Message::default()
                            }],
                        })
                        .await;
                    match sent {
                        Ok(r) => return r.into_inner().positions[0],
                        // Electing leaders after the restart: nothing stored yet.
                        Err(s) if s.code() == tonic::Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(s) => panic!("{id} after the restart: {s}"),
                    }
                }
            })
            .await
            .expect("Sends answered again after a restart of every node");
            assert!(placed.duplicate, "{id} after the restart: {placed:?}");
            assert_eq!(
                (placed.partition, placed.offset),
                *at,
                "{id} after the restart"
            );
        }
        assert_eq!(converged_ends(&cluster, TOPIC, partitions).await, ends);
        eprintln!(
            "ids run: {} acknowledged, {} answered duplicate when sent again, ends {ends:?}; \
             errors: {:#?}",
            history.acked.len(),
            history.duplicates,
            history.errors
        );
    });
}

/// How many rounds of faults the harnesses run: `CLUSTER_ROUNDS`, 1 by default (CI).
fn cluster_rounds() -> u32 {
    std::env::var("CLUSTER_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
}

/// Node `i`'s view of every partition's term (`sluice_raft_term`).
async fn terms(cluster: &TestCluster, i: usize, partitions: u32) -> Vec<f64> {
    let mut out = Vec::new();
    for p in 0..partitions {
        out.extend(raft_view(cluster, &[i], "sluice_raft_term", p).await);
    }
    out
}

#[test]
fn a_rolling_restart_refuses_no_send_longer_than_one_election_and_loses_nothing() {
    let runtime = busy_runtime();
    runtime.block_on(async {
        // A delivery cut short by a stop comes back after the ack timeout: shorter than the
        // default, so the run stays short.
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_HTTP_LISTEN", "127.0.0.1:0"),
            ("SLUICE_GROUPS_ACK_TIMEOUT_MS", "5000"),
        ]);
        let partitions = 3;
        create_id_topic(&cluster, partitions).await;
        let producers = IdProducers::spawn(&cluster, TOPIC, 16, 0);
        // A consumer group of two members, each through its own node (the next running one
        // when that stops), acking what it is handed.
        let consumed = Arc::new(Mutex::new(groups::GroupHistory::default()));
        let members = groups::Members::spawn(TOPIC, 2, &cluster.addrs, &consumed);
        producers.progress(100, "before the restarts").await;
        // Every node in turn, the leader of partition 0 first (so at least one stop hands a
        // leadership over), each started again and ready before the next stops.
        let all = [0, 1, 2];
        let first = cluster.leader(0, 0, &all).await;
        let order = [first, (first + 1) % 3, (first + 2) % 3];
        let (mut stops, mut handed, mut elections) = (Vec::new(), 0, 0.0);
        for i in order {
            let others: Vec<usize> = all.iter().copied().filter(|&j| j != i).collect();
            let mut led = Vec::new();
            for p in 0..partitions {
                if cluster.leader(others[0], p, &all).await == i {
                    led.push(p);
                }
            }
            let before = terms(&cluster, others[0], partitions).await;
            stops.push(cluster.stop(i));
            for &p in &led {
                let next = cluster.leader(others[0], p, &others).await;
                // Usually one election; a vote refused on a starved machine is asked again a
                // heartbeat later, which the producers' longest wait below covers.
                elections +=
                    terms(&cluster, next, partitions).await[p as usize] - before[p as usize];
                handed += 1;
            }
            producers.progress(100, "while a node is down").await;
            cluster.restart_until_ready(i).await;
            producers.progress(100, "after it came back").await;
        }
        let history = producers.stop().await;
        ids_stored_once(&cluster, TOPIC, partitions, &history).await;
        // The group is handed every acknowledged message, and no ack applies twice (a second
        // one would mean the group forgot the first across a stop and delivered it again).
        let consumed = members.acked_every_id_once(&consumed, &history).await;
        // A running node refused nothing; only the node being stopped answered a Send that
        // reached it as it stopped.
        assert_no_running_node_refused(&[&history]);
        assert!(handed > 0);
        // No producer waited longer than one election for a Send to be taken. With these
        // settings (election timeout 800 ms, heartbeat 200 ms, three nodes) the followers'
        // leases of a stopped leader run out within 1.5 s, then the chosen follower's vote is
        // granted, or refused on a starved machine and asked again a heartbeat later: 1.7 s,
        // and one heartbeat more as slack. Measured: 1.53–1.60 s, also with two busy loops
        // beside the run; with the handover switched off (the followers find out for
        // themselves, after their own timeouts) 2.47–2.62 s, which this fails.
        let one_election = Duration::from_millis(1501 + 3 * 200);
        assert!(
            history.longest_wait <= one_election,
            "a producer waited {:?} for a Send to be taken (one election: {one_election:?})",
            history.longest_wait
        );
        eprintln!(
            "rolling restart: {} acknowledged, {handed} leaderships handed over in {elections} \
             elections, stops took {stops:?}, the slowest Send {:?}, the longest wait {:?}; \
             errors: {:#?}; the group: {} deliveries, {} acked",
            history.acked.len(),
            history.slowest_ack,
            history.longest_wait,
            history.errors,
            consumed.delivered.len(),
            consumed.acked.len()
        );
    });
}

/// Runs `sluice cluster ARGS --broker ADDR`: its exit code, stdout and stderr.
fn cluster_cli(addr: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["cluster"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--broker", addr]);
    let out = tokio::task::block_in_place(|| common::server::cli(&all, ""));
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// How many partitions of `TOPIC` each node leads, as `sluice cluster status` through node
/// `ask` shows them (each partition's leader in its newest term).
fn leaders_per_node(cluster: &TestCluster, ask: usize) -> [usize; 3] {
    let (code, status, err) = tokio::task::block_in_place(|| cluster_status(&cluster.addr(ask)));
    assert_eq!(code, 0, "{status} {err}");
    let mut counts = [0; 3];
    for p in status["partitions"].as_array().unwrap() {
        if p["topic"] == TOPIC {
            counts[p["leader"].as_u64().unwrap() as usize - 1] += 1;
        }
    }
    counts
}

#[test]
fn leaderships_move_on_demand_and_the_balancer_spreads_them_while_producers_lose_nothing() {
    runtime().block_on(async {
        let cluster = TestCluster::start_with(&[]);
        let partitions = 6;
        create_id_topic(&cluster, partitions).await;
        let producers = IdProducers::spawn(&cluster, TOPIC, 16, 0);
        producers.progress(100, "before the moves").await;

        // Every partition's leadership to node 1, each asked through a different node.
        for p in 0..partitions {
            let ask = cluster.addr(p as usize % 3);
            let part = p.to_string();
            let args = [
                "transfer-leader",
                "--topic",
                TOPIC,
                "--partition",
                &part,
                "--to",
                "1",
            ];
            let (code, out, err) = cluster_cli(&ask, &args);
            assert_eq!(code, 0, "transfer of partition {p}: {out}{err}");
            assert!(out.contains("leader node 1"), "{out}");
        }
        assert_eq!(leaders_per_node(&cluster, 1), [6, 0, 0]);
        producers.progress(100, "with every leader on node 1").await;

        // What cannot be moved is refused, saying why, and moves nothing.
        for (args, says) in [
            (
                ["--topic", TOPIC, "--partition", "0", "--to", "9"],
                "holds no replica",
            ),
            (
                ["--topic", TOPIC, "--partition", "99", "--to", "2"],
                "no partition 99",
            ),
            (
                ["--topic", "nope", "--partition", "0", "--to", "2"],
                "does not exist",
            ),
        ] {
            let mut all = vec!["transfer-leader"];
            all.extend_from_slice(&args);
            let (code, out, err) = cluster_cli(&cluster.addr(1), &all);
            assert_ne!(code, 0, "{args:?} was accepted: {out}");
            assert!(err.contains(says), "{args:?}: {err}");
        }
        assert_eq!(leaders_per_node(&cluster, 2), [6, 0, 0]);

        // The balancer: a dry run says what it would move and moves nothing; the real one
        // leaves no node leading more than its share, ceil(6 / 3) = 2 (the bound asked is
        // that plus one); a second one finds nothing to move.
        let (code, out, err) = cluster_cli(&cluster.addr(1), &["rebalance", "--dry-run"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.matches("would move").count(), 4, "{out}");
        assert_eq!(leaders_per_node(&cluster, 2), [6, 0, 0]);
        let (code, out, err) = cluster_cli(&cluster.addr(2), &["rebalance"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(out.matches("\tmoved").count(), 4, "{out}");
        let counts = leaders_per_node(&cluster, 0);
        assert!(
            counts.iter().all(|&n| n <= 2),
            "leaders per node {counts:?}"
        );
        let (code, out, err) = cluster_cli(&cluster.addr(0), &["rebalance"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("nothing to move"), "{out}");
        producers.progress(100, "after the rebalance").await;

        let history = producers.stop().await;
        ids_stored_once(&cluster, TOPIC, partitions, &history).await;
        // Sends waited while a leadership moved; none was refused.
        assert!(history.errors.is_empty(), "refused: {:#?}", history.errors);
        eprintln!(
            "leader moves: {} acknowledged, the slowest Send {:?}",
            history.acked.len(),
            history.slowest_ack
        );
    });
}

/// Asserts a call was refused with `FAILED_PRECONDITION`, saying `says`.
fn precondition<T>(r: Result<T, tonic::Status>, says: &str) {
    let Err(s) = r else {
        panic!("accepted; expected FAILED_PRECONDITION saying {says:?}");
    };
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains(says), "{s:?}");
}

/// Runs `sluice serve` expecting it to refuse to start; returns what it said.
fn refused(dir: &Path, id: u64, peers: &str, env: &[(&str, &str)]) -> String {
    match serve(dir, id, peers, env) {
        Ok((mut child, _)) => {
            let _ = child.kill();
            panic!("node {id} started with {peers} {env:?}");
        }
        Err(said) => said,
    }
}

#[test]
fn a_node_refuses_to_start_on_bad_peers_or_a_data_directory_that_is_not_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = free_ports(4);
    let peers = peers_of(&ports[..3]);
    let p = |i: usize| ports[i];
    /// What is wrong, node id, peers, more settings, what the refusal must say.
    type Case<'a> = (&'a str, u64, String, Vec<(&'a str, String)>, &'a str);
    let table: Vec<Case> = vec![
        (
            "a peer list naming this node twice",
            1,
            format!(
                "[\"1@127.0.0.1:{}\",\"1@127.0.0.1:{}\",\"3@127.0.0.1:{}\"]",
                p(0),
                p(1),
                p(2)
            ),
            vec![],
            "names node 1 twice",
        ),
        (
            "a node_id not among the peers",
            4,
            peers.clone(),
            vec![],
            "not among cluster.peers",
        ),
        (
            "two nodes with one id (this one listens where the peers put another)",
            1,
            peers.clone(),
            vec![("SLUICE_CLUSTER_LISTEN", format!("127.0.0.1:{}", p(1)))],
            "says node 1 is at",
        ),
    ];
    for (what, id, list, env, says) in table {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let said = refused(&tmp.path().join("bad"), id, &list, &env);
        assert!(said.contains(says), "{what}: {said}");
        assert!(
            !tmp.path().join("bad").join("cluster").exists(),
            "{what}: nothing was written"
        );
    }

    // A data directory of another node, and of another cluster. One node alone starts (it waits
    // for a majority) and records whose directory it is.
    let dir = tmp.path().join("node1");
    let (mut child, _) = serve(&dir, 1, &peers, &[]).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let said = refused(&dir, 2, &peers, &[]);
    assert!(said.contains("belongs to node 1"), "{said}");
    let other = peers_of(&[p(0), p(1), p(3)]);
    let said = refused(&dir, 1, &other, &[]);
    assert!(said.contains("belongs to a cluster founded by"), "{said}");

    // A cluster node's data directory, served or compacted as a single node (no [cluster]):
    // refused, since that would change this copy alone.
    let single: [&[&str]; 2] = [&["serve", "--listen", "127.0.0.1:0"], &["compact"]];
    for args in single {
        let mut child = Command::new(bin())
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .env("SLUICE_HTTP_LISTEN", "")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.starts_with("sluice listening") {
            child.kill().unwrap();
            panic!("{args:?} served a cluster node's data as a single node");
        }
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {said}");
        assert!(
            said.contains("holds a cluster node's data"),
            "{args:?}: {said}"
        );
    }
}

/// The cluster id node `dir` has recorded in its `node.json`, once it has.
fn cluster_id_of(dir: &Path) -> String {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let recorded = std::fs::read(dir.join("cluster").join("node.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["cluster_id"].as_str().map(str::to_string));
        if let Some(id) = recorded {
            return id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cluster id recorded in {} within {DEADLINE:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_node_refuses_to_start_as_an_id_that_runs_already_or_on_another_clusters_data() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let peers = peers_of(&ports);
    let dir = |cluster: &str, id: u64| tmp.path().join(format!("{cluster}{id}"));
    let start = |cluster: &str| {
        Reaped(
            (1..=3)
                .map(|id| serve(&dir(cluster, id), id, &peers, &[]).unwrap().0)
                .collect(),
        )
    };
    // Cluster b on these addresses, founded, then stopped; cluster a on the same addresses.
    let b = start("b");
    let b_id = cluster_id_of(&dir("b", 2));
    drop(b);
    let mut a = start("a");
    let a_id = (1..=3)
        .map(|id| cluster_id_of(&dir("a", id)))
        .collect::<BTreeSet<_>>();
    assert_eq!(a_id.len(), 1, "one id for the whole cluster: {a_id:?}");
    let a_id = a_id.into_iter().next().unwrap();
    assert_ne!(a_id, b_id, "each founding draws its own id");

    // A second process as node 2 (its own address free: another interface, same port).
    let listen = format!("127.0.0.2:{}", ports[1]);
    let env = [("SLUICE_CLUSTER_LISTEN", listen.as_str())];
    let said = refused(&tmp.path().join("x"), 2, &peers, &env);
    assert!(said.contains("node 2 already runs at"), "{said}");

    // Node 2 of a stopped, and b's node 2 directory started in its place: refused, naming
    // both clusters; a's own directory starts again.
    let _ = a.0[1].kill();
    let _ = a.0[1].wait();
    let said = refused(&dir("b", 2), 2, &peers, &[]);
    assert!(
        said.contains(&format!("belongs to cluster {b_id}")) && said.contains(&a_id),
        "{said}"
    );
    a.0[1] = serve(&dir("a", 2), 2, &peers, &[]).unwrap().0;
}

#[test]
fn dry_runs_the_largest_send_a_group_and_the_seed_api_work_on_a_cluster() {
    let runtime = runtime();
    runtime.block_on(async {
        let cluster = TestCluster::start();
        let channel = connect(&cluster.addr(1)).await.unwrap();
        let mut admin = AdminClient::new(channel.clone());
        admin
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: None,
            })
            .await
            .unwrap();
        let mut client = BrokerClient::new(channel);
        // A dry run of Compact reports, and changes nothing.
        let dry = admin
            .compact(pb::CompactRequest {
                topic: TOPIC.into(),
                dry_run: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!dry.partitions.is_empty(), "{dry:?}");
        // Nothing of it was stored: the topic is there, empty, on every node.
        for i in 0..3 {
            let d = describe(&cluster.addr(i)).await.unwrap();
            assert!(d.partitions.iter().all(|p| p.next_offset == 0), "{d:?}");
            assert_eq!(d.partitions[0].replicas, vec![1, 2, 3]);
        }
        // The largest Send a broker takes by default (7 messages of 1 MiB: one 7 MiB batch, one
        // Raft entry) is replicated like any other: tonic's default 4 MiB message limit on the
        // cluster port once stalled replication of such entries.
        let big = vec![b'x'; (1 << 20) - 64];
        let sent = client
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: (0..7)
                    .map(|_| pb::Message {
                        value: Some(big.clone().into()),
                        ..pb::Message::default()
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(sent.positions.len(), 7);
        for i in 0..3 {
            readable_up_to(&cluster.addr(i), 7, "the 7 MiB batch").await;
        }
        // A consumer group is taken (its replication and administration are tested in
        // `groups`).
        let mut member = client
            .subscribe(pb::SubscribeRequest {
                topic: TOPIC.into(),
                group: "etl".into(),
                max_in_flight: 1,
                ..pb::SubscribeRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = member.message().await.unwrap().unwrap().deliveries;
        assert_eq!((first[0].offset, first[0].attempt), (0, 1), "{first:?}");
        client
            .ack(pb::AckRequest {
                group: "etl".into(),
                topic: TOPIC.into(),
                ack_ids: vec![first[0].ack_id.clone()],
            })
            .await
            .unwrap();
        let next = member.message().await.unwrap().unwrap().deliveries;
        assert_eq!(next[0].offset, 1, "after the ack, the next message");
        drop(member);
        // The seed API's client: its Send creates the topic through the metadata group (from a
        // node that may not lead it) and is answered on commit; its Subscribe, a consumer
        // group's, receives it.
        let mut seed = SeedClient::new(connect(&cluster.addr(0)).await.unwrap());
        let answer = seed
            .send(seed_pb::SendRequest {
                msg: Some(seed_pb::Message {
                    topic: "seed-intake".into(),
                    payload: "questionnaire 1".into(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(answer.success);
        for i in 0..3 {
            let mut admin = AdminClient::new(connect(&cluster.addr(i)).await.unwrap());
            let read = tokio::time::timeout(DEADLINE, async {
                loop {
                    let d = admin
                        .describe_topic(pb::DescribeTopicRequest {
                            name: "seed-intake".into(),
                        })
                        .await;
                    if d.is_ok_and(|d| d.into_inner().partitions[0].next_offset == 1) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            assert!(read.is_ok(), "node {} never served the seed Send", i + 1);
        }
        let mut subscribe = seed
            .subscribe(seed_pb::SubscribeRequest {
                topic: "seed-intake".into(),
                consumer_group: "etl".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let got = subscribe.message().await.unwrap().unwrap().msg.unwrap();
        assert_eq!(got.payload, b"questionnaire 1".to_vec());
    });
}

/// The command lines of README.md's code block whose info string is `info`, each with the
/// output its `#=>` comment promises.
fn readme_block(info: &str) -> Vec<(String, Option<String>)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find(&format!("```{info}\n"))
        .unwrap_or_else(|| panic!("README.md has no ```{info} block"));
    let body = &readme[start + info.len() + 4..];
    let body = &body[..body.find("```").unwrap()];
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once("#=>") {
            Some((command, expect)) => {
                (command.trim().to_string(), Some(expect.trim().to_string()))
            }
            None => (l.trim().to_string(), None),
        })
        .collect()
}

#[test]
fn the_readme_three_node_cluster_works_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The example files' ports, each replaced by a free one (the system picks them).
    let mut ports: BTreeMap<String, String> = BTreeMap::new();
    let fresh = free_ports(9);
    // Stopped however the test ends (a failed assertion included).
    let mut children = Reaped::default();
    let serves = readme_block("sh cluster");
    assert_eq!(serves.len(), 3, "three commands start the cluster");
    for (command, _) in &serves {
        let config = command
            .strip_prefix("cargo run --release -- serve --config ")
            .unwrap_or_else(|| panic!("not a serve command: {command}"));
        let mut text = std::fs::read_to_string(root.join(config)).unwrap();
        for port in [
            "7010", "7011", "7170", "7020", "7021", "7270", "7030", "7031", "7370",
        ] {
            let n = ports.len();
            let to = ports
                .entry(port.to_string())
                .or_insert_with(|| fresh[n].to_string())
                .clone();
            text = text.replace(&format!(":{port}\""), &format!(":{to}\""));
        }
        let file = tmp.path().join(Path::new(config).file_name().unwrap());
        std::fs::write(&file, text).unwrap();
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&file)
            .current_dir(tmp.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("sluice listening on"), "{command}: {line}");
        children.0.push(child);
    }
    let dir = tmp.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(bin(), dir.join("sluice")).unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (command, expect) in readme_block("sh cluster-client") {
        let mut run = command.clone();
        for (from, to) in &ports {
            run = run.replace(&format!(":{from}"), &format!(":{to}"));
        }
        let out = Command::new("sh")
            .args(["-c", &run])
            .env("PATH", &path)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(expect) = expect {
            assert!(
                stdout.contains(&expect),
                "{command} printed {stdout:?}, not {expect:?}"
            );
        }
    }
    // The HTTP API shows each partition's leader and replicas too.
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", ports["7011"]).parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let topic = runtime.block_on(common::http::get(http, "/api/v1/topics/trial-42"));
    let partitions = topic.json()["partitions"].clone();
    for p in partitions.as_array().unwrap() {
        assert!(
            p["leader"].as_u64().is_some_and(|l| (1..=3).contains(&l)),
            "{p}"
        );
        assert_eq!(p["replicas"], serde_json::json!([1, 2, 3]), "{p}");
    }
}

/// Child processes killed when dropped.
#[derive(Default)]
struct Reaped(Vec<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn the_cluster_port_closes_connections_from_addresses_that_are_not_peers() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(3);
        let (mut child, _) = serve(&tmp.path().join("n1"), 1, &peers_of(&ports), &[]).unwrap();
        let port: std::net::SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
        // An HTTP/2 client preface: a peer's connection is answered (the server's SETTINGS), a
        // stranger's is closed without a byte.
        let first_bytes = |from: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let mut stream = socket.connect(port).await.unwrap();
            let _ = stream
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await;
            let mut buf = [0u8; 64];
            tokio::time::timeout(DEADLINE, stream.read(&mut buf))
                .await
                .expect("no answer and not closed")
                .unwrap_or(0)
        };
        assert!(
            first_bytes("127.0.0.1").await > 0,
            "a peer's address is served"
        );
        assert_eq!(
            first_bytes("127.0.0.2").await,
            0,
            "a stranger's connection is closed"
        );
        let _ = child.kill();
        let _ = child.wait();
    });
}

#[test]
fn with_two_of_three_nodes_down_nothing_is_acknowledged_and_what_was_committed_stays_readable() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        let channel = connect(&cluster.addr(2)).await.unwrap();
        create_topic(channel.clone(), TOPIC, 1).await;
        let send = |value: &'static str| {
            let mut client = BrokerClient::new(channel.clone());
            async move {
                let mut request = tonic::Request::new(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: vec![pb::Message {
                        value: Some(value.into()),
                        ..pb::Message::default()
                    }],
                });
                // Past the broker's own deadline for a proposal (8 × the election timeout).
                request.set_timeout(Duration::from_secs(30));
                client.send(request).await
            }
        };
        send("committed").await.unwrap();
        // Node 3 learns the commit point from its leader (at once if it leads, else with the
        // next heartbeat); what it knows is committed it serves from then on.
        readable_up_to(&cluster.addr(2), 1, "the committed message").await;
        cluster.kill(0);
        cluster.kill(1);
        let refused = send("no majority").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        let read = read_all(&cluster.addr(2), TOPIC, 0, 1).await;
        assert_eq!(read, vec![(0, "committed".to_string())]);
        // What the lone node may hold of the refused Send is not committed: not readable.
        let d = describe(&cluster.addr(2)).await.unwrap();
        assert_eq!(d.partitions[0].next_offset, 1, "{d:?}");
    });
}

/// The bytes of partition 0's segment logs of `TOPIC` in a node's data directory.
fn log_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("topics").join(TOPIC).join("0"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// Waits until the nodes `among` all serve partition 0 up to `end` from one first offset above
/// 0 (retention dropped the same oldest messages on each).
async fn first_offsets_agree(cluster: &TestCluster, among: &[usize], end: u64) {
    let found = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut firsts = BTreeSet::new();
            for &i in among {
                match describe_if_up(&cluster.addr(i), TOPIC).await {
                    Some(d) if d.partitions[0].next_offset == end => {
                        firsts.insert(d.partitions[0].first_offset)
                    }
                    _ => firsts.insert(u64::MAX),
                };
            }
            if firsts.len() == 1 && firsts.first().is_some_and(|&f| f > 0 && f < end) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    found.expect("retention ran alike on every node within the deadline");
}

/// Retention in a cluster is decided by each partition's leader and applied by every replica:
/// every node shows the same messages from the same first offset, keeps about the configured
/// bytes on disk, and a node that was down while the oldest messages went (it holds none of
/// what remains) installs the leader's snapshot and starts its log at that offset.
#[test]
fn retention_is_decided_by_the_leader_and_every_replica_keeps_the_same_messages() {
    const SEGMENT: u64 = 4096;
    const RETAIN: u64 = 4 * SEGMENT;
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_LOG_SEGMENT_BYTES", "4096"),
            ("SLUICE_RETENTION_CHECK_MS", "100"),
        ]);
        let channel = connect(&cluster.addr(0)).await.unwrap();
        AdminClient::new(channel)
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: Some(pb::TopicSettings {
                    partitions: 1,
                    retention_bytes: Some(RETAIN),
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();
        // A follower goes down (the leader stays: no election to wait out).
        let leader = cluster.leader(0, 0, &[0, 1, 2]).await;
        let down = (0..3).find(|&i| i != leader).unwrap();
        let up: Vec<usize> = (0..3).filter(|&i| i != down).collect();
        cluster.kill(down);
        let mut client = BrokerClient::new(connect(&cluster.addr(up[0])).await.unwrap());
        let value = |n: u64| format!("{n:05}{}", "x".repeat(95));
        let mut sent = BTreeMap::new();
        for n in 0..400 {
            let r = client
                .send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: vec![pb::Message {
                        value: Some(value(n).into()),
                        ..pb::Message::default()
                    }],
                })
                .await
                .unwrap()
                .into_inner();
            sent.insert(r.positions[0].offset, value(n));
        }
        let end = sent.len() as u64;
        // Every node, the one that was down included, drops the oldest messages: the same ones.
        first_offsets_agree(&cluster, &up, end).await;
        cluster.restart(down);
        first_offsets_agree(&cluster, &[0, 1, 2], end).await;
        for i in 0..3 {
            let first = describe(&cluster.addr(i)).await.unwrap().partitions[0].first_offset;
            let mut stream = BrokerClient::new(connect(&cluster.addr(i)).await.unwrap())
                .subscribe(pb::SubscribeRequest {
                    topic: TOPIC.into(),
                    partitions: vec![0],
                    start: Some(pb::StartPosition {
                        kind: Some(pb::start_position::Kind::Earliest(true)),
                    }),
                    limit: end - first,
                    ..pb::SubscribeRequest::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut read = BTreeMap::new();
            while let Some(batch) = stream.message().await.unwrap() {
                for d in batch.deliveries {
                    let v = String::from_utf8(d.value.unwrap_or_default().to_vec()).unwrap();
                    read.insert(d.offset, v);
                }
            }
            let want: BTreeMap<u64, String> =
                sent.range(first..).map(|(o, v)| (*o, v.clone())).collect();
            assert_eq!(
                read,
                want,
                "node {} serves every message from the first offset kept",
                i + 1
            );
            // Disk: what retention keeps, plus the segments holding the first kept message and
            // the active one.
            let bytes = log_bytes(&cluster.nodes[i].dir);
            assert!(
                bytes <= RETAIN + 2 * SEGMENT + 1024,
                "node {} keeps {bytes} bytes",
                i + 1
            );
        }
        // The node that was down held none of what remains: it installed the leader's snapshot
        // (the retention point) and its log starts there.
        let first = describe(&cluster.addr(down)).await.unwrap().partitions[0].first_offset;
        let oldest =
            std::fs::read_dir(cluster.nodes[down].dir.join("topics").join(TOPIC).join("0"))
                .unwrap()
                .filter_map(|e| {
                    e.ok()?
                        .file_name()
                        .to_str()?
                        .strip_suffix(".log")?
                        .parse::<u64>()
                        .ok()
                })
                .min();
        assert!(
            oldest.is_some_and(|o| o > 0 && o <= first),
            "its oldest segment: {oldest:?}"
        );
        // A reading below the first offset kept is out of range.
        let below = BrokerClient::new(connect(&cluster.addr(down)).await.unwrap())
            .subscribe(pb::SubscribeRequest {
                topic: TOPIC.into(),
                partitions: vec![0],
                start: Some(pb::StartPosition {
                    kind: Some(pb::start_position::Kind::Offset(first - 1)),
                }),
                limit: 1,
                ..pb::SubscribeRequest::default()
            })
            .await;
        let code = match below {
            Err(status) => status.code(),
            Ok(response) => match response.into_inner().message().await {
                Err(status) => status.code(),
                Ok(m) => panic!("read below the first offset kept: {m:?}"),
            },
        };
        assert_eq!(code, tonic::Code::OutOfRange);
    });
}

/// Every message (offset, key, value) of partition 0 of `TOPIC` the node at `addr` serves, up
/// to the message at `last` (which compaction keeps: the newest of its key).
async fn keyed(addr: &str, last: u64) -> Vec<(u64, String, String)> {
    let text = |b: Option<bytes::Bytes>| String::from_utf8(b.unwrap_or_default().to_vec()).unwrap();
    let mut stream = BrokerClient::new(connect(addr).await.unwrap())
        .subscribe(pb::SubscribeRequest {
            topic: TOPIC.into(),
            partitions: vec![0],
            start: Some(pb::StartPosition {
                kind: Some(pb::start_position::Kind::Earliest(true)),
            }),
            ..pb::SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    loop {
        let batch = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("reading a partition stalled")
            .unwrap()
            .expect("the stream follows the tail");
        for d in batch.deliveries {
            out.push((d.offset, text(d.key), text(d.value)));
            if d.offset == last {
                return out;
            }
        }
    }
}

/// Sends `n` messages to partition 0 of `TOPIC` through the node at `addr`, one per Send, with
/// keys `k0`..`k{keys-1}` in turn; returns each as acknowledged (offset, key, value).
async fn send_keyed(addr: &str, n: u64, keys: u64) -> Vec<(u64, String, String)> {
    let mut client = BrokerClient::new(connect(addr).await.unwrap());
    let mut sent = Vec::new();
    for n in 0..n {
        let (key, value) = (
            format!("k{}", n % keys),
            format!("{n:05}{}", "x".repeat(95)),
        );
        let r = client
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message {
                    key: Some(key.clone().into()),
                    value: Some(value.clone().into()),
                    ..pb::Message::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        sent.push((r.positions[0].offset, key, value));
    }
    sent
}

/// What compaction may leave of `sent`: messages as acknowledged, at their offsets, and the
/// newest of each key among them.
fn compacted_from(held: &[(u64, String, String)], sent: &[(u64, String, String)]) {
    for record in held {
        assert!(sent.contains(record), "{record:?} was sent at its offset");
    }
    let mut newest = BTreeMap::new();
    for (offset, key, _) in sent {
        newest.insert(key.clone(), *offset);
    }
    for (key, offset) in newest {
        assert!(
            held.iter().any(|(o, k, _)| *o == offset && *k == key),
            "the newest {key} (offset {offset}) is kept"
        );
    }
}

/// Key compaction in a cluster is decided by each partition's leader and applied by every
/// replica: every node ends with the same records at the same offsets (the newest of each key
/// among those below the leader's compaction point, everything after it), and a node that was
/// down meanwhile, sent entries its leader had already compacted (some emptied), holds them at
/// the offsets the others do and takes the next message at the same offset.
#[test]
fn compaction_is_decided_by_the_leader_and_every_replica_keeps_the_same_records() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start_with(&[
            ("SLUICE_LOG_SEGMENT_BYTES", "4096"),
            ("SLUICE_RETENTION_CHECK_MS", "100"),
        ]);
        AdminClient::new(connect(&cluster.addr(0)).await.unwrap())
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: Some(pb::TopicSettings {
                    partitions: 1,
                    cleanup_policy: pb::CleanupPolicy::Compact as i32,
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();
        let leader = cluster.leader(0, 0, &[0, 1, 2]).await;
        let down = (0..3).find(|&i| i != leader).unwrap();
        let up: Vec<usize> = (0..3).filter(|&i| i != down).collect();
        cluster.kill(down);
        // 10 keys, each written 40 times, one message per Send (one entry each).
        let sent = send_keyed(&cluster.addr(up[1]), 400, 10).await;
        let last = sent.last().unwrap().0;
        cluster.restart(down);
        // Every node, the one that was down included, ends with the same compacted records.
        let agreed = tokio::time::timeout(DEADLINE, async {
            loop {
                let mut held = Vec::new();
                for i in 0..3 {
                    held.push(keyed(&cluster.addr(i), last).await);
                }
                let compacted = held[0].len() < sent.len() / 2;
                if compacted && held.iter().all(|h| *h == held[0]) {
                    return held.swap_remove(0);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("every replica compacted alike within the deadline");
        compacted_from(&agreed, &sent);
        // The next message takes the next offset, wherever it is sent.
        let r = BrokerClient::new(connect(&cluster.addr(down)).await.unwrap())
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message {
                    key: Some("k0".into()),
                    value: Some("after".into()),
                    ..pb::Message::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.positions[0].offset, last + 1);
        for i in 0..3 {
            let held = keyed(&cluster.addr(i), last + 1).await;
            assert_eq!(held.last().unwrap().2, "after", "node {}", i + 1);
        }
    });
}

/// Retention and compaction on demand (`Compact`) through a node that does not lead the
/// partition — a follower of three, or a node holding none of the partition's two replicas: a
/// node holding it decides from its own copy and proposes through the leader, and every replica
/// applies the decision at once (no periodic pass runs in this test): the same first offset and
/// the same records read through every node, as the node asked reported.
#[test]
fn retention_and_compaction_on_demand_through_any_node_apply_on_every_replica() {
    for factor in [3, 2] {
        runtime().block_on(compact_on_demand(factor));
    }
}

async fn compact_on_demand(factor: u32) {
    let cluster = TestCluster::start_with(&[
        ("SLUICE_LOG_SEGMENT_BYTES", "4096"),
        ("SLUICE_RETENTION_CHECK_MS", "3600000"),
    ]);
    AdminClient::new(connect(&cluster.addr(0)).await.unwrap())
        .create_topic(pb::CreateTopicRequest {
            name: TOPIC.into(),
            settings: Some(pb::TopicSettings {
                partitions: 1,
                cleanup_policy: pb::CleanupPolicy::Compact as i32,
                retention_bytes: Some(8 * 4096),
                replication_factor: Some(factor),
                ..pb::TopicSettings::default()
            }),
        })
        .await
        .unwrap();
    let leader = cluster.leader(0, 0, &[0, 1, 2]).await;
    let replicas = describe(&cluster.addr(0)).await.unwrap().partitions[0]
        .replicas
        .clone();
    let asked = (0..3)
        .find(|&i| !replicas.contains(&(i as u64 + 1)))
        .unwrap_or((leader + 1) % 3);
    let sent = send_keyed(&cluster.addr(leader), 500, 20).await;
    let last = sent.last().unwrap().0;
    readable_up_to(&cluster.addr(asked), last + 1, "before compacting").await;
    let report = AdminClient::new(connect(&cluster.addr(asked)).await.unwrap())
        .compact(pb::CompactRequest {
            topic: TOPIC.into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    let p = &report.partitions[0];
    assert!(p.first_offset > 0, "retention dropped the oldest: {p:?}");
    assert!(
        p.records_dropped > 0,
        "compaction dropped superseded records: {p:?}"
    );
    let first = p.first_offset;
    let held = keyed(&cluster.addr(asked), last).await;
    assert_eq!(
        held.first().map(|r| r.0 >= first),
        Some(true),
        "{:?}",
        held.first()
    );
    compacted_from(&held, &sent);
    assert!(held.len() < sent.len() / 2, "{} records kept", held.len());
    // Every other replica applies the same decisions, at once.
    let agreed = tokio::time::timeout(DEADLINE, async {
        loop {
            let mut same = true;
            for i in 0..3 {
                same &= keyed(&cluster.addr(i), last).await == held;
            }
            if same {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        agreed.is_ok(),
        "factor {factor}: every replica holds what the node asked reported"
    );
}

/// Every message of partition 0 of `TOPIC` the node at `addr` serves, from the first offset.
async fn values(addr: &str) -> Vec<String> {
    let end = describe(addr).await.unwrap().partitions[0].next_offset;
    read_all(addr, TOPIC, 0, end)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Deleting a topic in a cluster deletes it on every node, a node that was down included (when
/// it is back, before it serves the old messages), also when the name was created again while
/// it was away: the new topic's groups never meet the old one's, and every node ends with the
/// new topic alone.
#[test]
fn a_deleted_topic_goes_from_every_node_and_a_new_one_of_its_name_never_mixes_with_it() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        let channel = connect(&cluster.addr(0)).await.unwrap();
        create_topic(channel.clone(), TOPIC, 1).await;
        let send = |channel: Channel, value: String| async move {
            BrokerClient::new(channel)
                .send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: vec![pb::Message {
                        value: Some(value.clone().into()),
                        partition: Some(0),
                        ..pb::Message::default()
                    }],
                })
                .await
                .unwrap_or_else(|e| panic!("sending {value:?}: {e:?}"))
        };
        for n in 0..20 {
            send(channel.clone(), format!("old {n}")).await;
        }
        for i in 0..3 {
            readable_up_to(&cluster.addr(i), 20, "the first incarnation").await;
        }
        // Node 3 sleeps through the deletion and the re-creation.
        cluster.kill(2);
        let mut admin = AdminClient::new(connect(&cluster.addr(1)).await.unwrap());
        admin
            .delete_topic(pb::DeleteTopicRequest { name: TOPIC.into() })
            .await
            .unwrap();
        // The node asked has deleted its copy when the call returns; the other running node
        // once it applies the deletion.
        for i in [1, 0] {
            let files = cluster.nodes[i].dir.join("topics").join(TOPIC);
            let gone = tokio::time::timeout(DEADLINE, async {
                while files.exists() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            gone.unwrap_or_else(|_| panic!("node {}'s files are still there", i + 1));
            let answer = describe(&cluster.addr(i)).await.unwrap_err();
            assert!(
                answer.contains("does not exist"),
                "node {}: {answer}",
                i + 1
            );
        }
        let again = admin
            .delete_topic(pb::DeleteTopicRequest { name: TOPIC.into() })
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::NotFound, "{again:?}");
        // The same name again, with other settings.
        create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 2).await;
        for n in 0..5 {
            send(connect(&cluster.addr(0)).await.unwrap(), format!("new {n}")).await;
        }
        cluster.restart(2);
        let settled = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Some(d) = describe_if_up(&cluster.addr(2), TOPIC).await
                    && d.partitions.len() == 2
                    && d.partitions[0].next_offset == 5
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        settled.expect("node 3 holds the new topic within the deadline");
        let want: Vec<String> = (0..5).map(|n| format!("new {n}")).collect();
        for i in 0..3 {
            assert_eq!(values(&cluster.addr(i)).await, want, "node {}", i + 1);
        }
        // It takes part in the new topic's group: with another node down, Sends go on.
        cluster.kill(0);
        let through = connect(&cluster.addr(2)).await.unwrap();
        let mut request = tonic::Request::new(pb::SendRequest {
            topic: TOPIC.into(),
            messages: vec![pb::Message {
                value: Some("new 5".into()),
                partition: Some(0),
                ..pb::Message::default()
            }],
        });
        request.set_timeout(DEADLINE);
        let r = BrokerClient::new(through)
            .send(request)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.positions[0].offset, 5);
    });
}

/// `sluice cluster status --format json` through the node at `addr`: its exit code and output.
fn cluster_status(addr: &str) -> (i32, serde_json::Value, String) {
    let out = common::server::cli(
        &["cluster", "status", "--format", "json", "--broker", addr],
        "",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap(),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cluster_status_shows_every_node_leader_and_lag_and_fails_when_a_group_has_no_leader() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        let channel = connect(&cluster.addr(0)).await.unwrap();
        create_topic(channel.clone(), TOPIC, PARTITIONS).await;
        let sent = BrokerClient::new(channel)
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: (0..10u32)
                    .map(|i| pb::Message {
                        value: Some(format!("m{i}").into()),
                        partition: Some(i % PARTITIONS),
                        ..pb::Message::default()
                    })
                    .collect(),
            })
            .await;
        sent.unwrap();

        // All up: every node reachable, every group led, and (once the followers have
        // acknowledged the Send to their leaders) every replica 0 entries behind, through
        // every node.
        for ask in 0..3 {
            let json = tokio::time::timeout(DEADLINE, async {
                loop {
                    let (code, json, err) =
                        tokio::task::block_in_place(|| cluster_status(&cluster.addr(ask)));
                    assert_eq!(code, 0, "{err}");
                    let caught_up = json["partitions"].as_array().unwrap().iter().all(|p| {
                        p["replicas"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .all(|r| r["behind"] == 0)
                    });
                    if caught_up {
                        return json;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .expect("every replica caught up");
            assert_eq!(json["node_id"], ask as u64 + 1);
            let nodes = json["nodes"].as_array().unwrap();
            assert_eq!(nodes.len(), 3, "{json}");
            assert!(nodes.iter().all(|n| n["reachable"] == true), "{json}");
            assert!(json["metadata_leader"].is_u64(), "{json}");
            let partitions = json["partitions"].as_array().unwrap();
            assert_eq!(partitions.len(), PARTITIONS as usize, "{json}");
            for p in partitions {
                let leader = p["leader"].as_u64().expect("a leader");
                let replicas = p["replicas"].as_array().unwrap();
                let ids: Vec<u64> = replicas
                    .iter()
                    .map(|r| r["node_id"].as_u64().unwrap())
                    .collect();
                assert_eq!(ids, vec![1, 2, 3], "{json}");
                for r in replicas {
                    assert_eq!(r["leader"], r["node_id"].as_u64() == Some(leader), "{json}");
                }
            }
        }
        // The same view in the text format, with the lag column.
        let out = common::server::cli(&["cluster", "status", "--broker", &cluster.addr(1)], "");
        common::server::assert_succeeded(&out, "cluster status");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("{TOPIC}/0\t")), "{text}");
        assert!(text.contains("metadata leader: "), "{text}");

        // One node down: listed as unreachable; the others still lead every group.
        cluster.kill(2);
        let (code, json) = tokio::time::timeout(DEADLINE, async {
            loop {
                let (code, json, _) =
                    tokio::task::block_in_place(|| cluster_status(&cluster.addr(0)));
                if code == 0 {
                    return (code, json);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the two remaining nodes lead every group again");
        assert_eq!(code, 0);
        assert_eq!(json["nodes"][2]["reachable"], false, "{json}");
        assert!(json["nodes"][2]["error"].is_string(), "{json}");

        // Two down: no majority, so no leader is elected anew; the lone node says which groups
        // have none and exits 1 (once its leaders' terms are over).
        cluster.kill(1);
        let said = tokio::time::timeout(DEADLINE, async {
            loop {
                let (code, _, err) =
                    tokio::task::block_in_place(|| cluster_status(&cluster.addr(0)));
                if code == 1 {
                    return err;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the lone node reports groups without a leader");
        assert!(said.contains("no leader:"), "{said}");
    });
}

/// The `sluice_raft_*` samples of a `/metrics` text: (family, labels) → value.
async fn raft_metrics(http: std::net::SocketAddr) -> BTreeMap<(String, String), f64> {
    let reply = common::http::get(http, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply
        .body
        .lines()
        .filter(|l| l.starts_with("sluice_raft_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (family, labels) = series.split_once('{')?;
            Some((
                (family.to_string(), labels.trim_end_matches('}').to_string()),
                value.parse().ok()?,
            ))
        })
        .collect()
}

/// What every node's `/metrics` says of partition `p` (labels `topic="submissions",partition="p"`).
async fn raft_view(cluster: &TestCluster, nodes: &[usize], family: &str, p: u32) -> Vec<f64> {
    let labels = format!("topic=\"{TOPIC}\",partition=\"{p}\"");
    let mut out = Vec::new();
    for &i in nodes {
        let m = raft_metrics(cluster.http[i].unwrap()).await;
        out.push(
            m.get(&(family.to_string(), labels.clone()))
                .copied()
                .unwrap_or(f64::NAN),
        );
    }
    out
}

#[test]
fn metrics_show_each_groups_term_leader_indexes_and_how_far_each_follower_lags() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start_with(&[("SLUICE_HTTP_LISTEN", "127.0.0.1:0")]);
        let channel = connect(&cluster.addr(0)).await.unwrap();
        create_topic(channel.clone(), TOPIC, PARTITIONS).await;
        let mut client = BrokerClient::new(channel);
        let send = |n: u32| pb::SendRequest {
            topic: TOPIC.into(),
            messages: (0..n)
                .map(|i| pb::Message {
                    value: Some(format!("m{i}").into()),
                    partition: Some(0),
                    ..pb::Message::default()
                })
                .collect(),
        };
        client.send(send(10)).await.unwrap();
        let all = [0, 1, 2];
        // Every node: the same term; exactly one leader; every node knows it; once the
        // followers have the Send, every replica at the same last, commit and applied index,
        // and the leader reports each follower 0 entries and 0 s behind.
        let leader = cluster.leader(0, 0, &all).await;
        tokio::time::timeout(DEADLINE, async {
            loop {
                let applied = raft_view(&cluster, &all, "sluice_raft_applied_index", 0).await;
                let last = raft_view(&cluster, &all, "sluice_raft_last_log_index", 0).await;
                if applied.iter().all(|a| *a == last[leader])
                    && last.iter().all(|l| *l == last[leader])
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("every replica applies what the leader holds");
        let terms = raft_view(&cluster, &all, "sluice_raft_term", 0).await;
        assert!(
            terms.iter().all(|t| *t == terms[0] && *t >= 1.0),
            "{terms:?}"
        );
        let leads = raft_view(&cluster, &all, "sluice_raft_leader", 0).await;
        let want: Vec<f64> = all
            .iter()
            .map(|&i| f64::from(u8::from(i == leader)))
            .collect();
        assert_eq!(leads, want);
        assert_eq!(
            raft_view(&cluster, &all, "sluice_raft_has_leader", 0).await,
            vec![1.0; 3]
        );
        let commit = raft_view(&cluster, &[leader], "sluice_raft_commit_index", 0).await;
        let last = raft_view(&cluster, &[leader], "sluice_raft_last_log_index", 0).await;
        assert_eq!(commit, last);
        let on_leader = raft_metrics(cluster.http[leader].unwrap()).await;
        for f in all.iter().filter(|&&i| i != leader) {
            let labels = format!("topic=\"{TOPIC}\",partition=\"0\",follower=\"{}\"", f + 1);
            let lag = |family: &str| {
                on_leader
                    .get(&(family.to_string(), labels.clone()))
                    .copied()
            };
            assert_eq!(
                lag("sluice_raft_follower_lag_entries"),
                Some(0.0),
                "{on_leader:?}"
            );
            assert_eq!(
                lag("sluice_raft_follower_lag_seconds"),
                Some(0.0),
                "{on_leader:?}"
            );
        }
        // The JSON API the console reads: the nodes, each partition's leader and replicas.
        let http = cluster.http[leader].unwrap();
        let overview = common::http::get(http, "/api/v1/overview").await;
        let overview: serde_json::Value = serde_json::from_str(&overview.body).unwrap();
        assert_eq!(overview["cluster"], true, "{overview}");
        let view = common::http::get(http, "/api/v1/cluster").await;
        assert_eq!(view.status, 200, "{}", view.body);
        let view: serde_json::Value = serde_json::from_str(&view.body).unwrap();
        let nodes = view["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{view}");
        assert!(nodes.iter().all(|n| n["reachable"] == true), "{view}");
        let p0 = view["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["topic"] == TOPIC && p["partition"] == 0)
            .unwrap_or_else(|| panic!("{view}"));
        assert_eq!(p0["leader"], leader as u64 + 1, "{view}");
        assert_eq!(p0["replicas"].as_array().unwrap().len(), 3, "{view}");

        // A follower down while Sends go on: the leader counts the entries it lacks and how old
        // the oldest of them is; the commit index still moves (a majority holds it).
        let victim = (leader + 1) % 3;
        cluster.kill(victim);
        client.send(send(5)).await.unwrap();
        let labels = format!(
            "topic=\"{TOPIC}\",partition=\"0\",follower=\"{}\"",
            victim + 1
        );
        let lag = |m: &BTreeMap<(String, String), f64>, family: &str| {
            m.get(&(family.to_string(), labels.clone()))
                .copied()
                .unwrap_or(f64::NAN)
        };
        // The oldest entry it lacks grows older while it is down: seen past one second.
        let on_leader = tokio::time::timeout(DEADLINE, async {
            loop {
                let m = raft_metrics(cluster.http[leader].unwrap()).await;
                if lag(&m, "sluice_raft_follower_lag_seconds") >= 1.0 {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the lag in seconds grows while the follower is down");
        assert!(
            lag(&on_leader, "sluice_raft_follower_lag_entries") >= 1.0,
            "{on_leader:?}"
        );
        let view = common::http::get(http, "/api/v1/cluster").await;
        let view: serde_json::Value = serde_json::from_str(&view.body).unwrap();
        assert_eq!(view["nodes"][victim]["reachable"], false, "{view}");
        let commit = raft_view(&cluster, &[leader], "sluice_raft_commit_index", 0).await;
        let last = raft_view(&cluster, &[leader], "sluice_raft_last_log_index", 0).await;
        assert_eq!(commit, last, "two of three hold every entry");
        // Back: it catches up, and the leader says so.
        cluster.restart(victim);
        tokio::time::timeout(DEADLINE, async {
            loop {
                let on_leader = raft_metrics(cluster.http[leader].unwrap()).await;
                let labels = format!(
                    "topic=\"{TOPIC}\",partition=\"0\",follower=\"{}\"",
                    victim + 1
                );
                if on_leader.get(&("sluice_raft_follower_lag_entries".to_string(), labels))
                    == Some(&0.0)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the follower caught up");
        // The leader stopped: the others elect a new one in a later term, each counting the
        // election; the node that comes back learns the new term.
        let before = raft_view(&cluster, &all, "sluice_raft_term", 0).await[0];
        cluster.kill(leader);
        let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
        let new_leader = cluster.leader(others[0], 0, &others).await;
        let terms = raft_view(&cluster, &others, "sluice_raft_term", 0).await;
        assert!(
            terms.iter().all(|t| *t > before),
            "{terms:?} after {before}"
        );
        let elections = raft_view(&cluster, &[new_leader], "sluice_raft_elections_total", 0).await;
        assert!(elections[0] >= 1.0, "{elections:?}");
        let leads = raft_view(&cluster, &others, "sluice_raft_leader", 0).await;
        assert_eq!(leads.iter().sum::<f64>(), 1.0, "{leads:?}");
    });
}

#[test]
fn a_cluster_node_is_ready_only_once_caught_up_with_its_groups_leaders() {
    let runtime = runtime();
    // The node restarted was the partition's leader (its stored vote still names it: it must not
    // count itself caught up), or a follower.
    for was_leader in [true, false] {
        runtime.block_on(async {
            let mut cluster = TestCluster::start();
            create_topic(connect(&cluster.addr(0)).await.unwrap(), TOPIC, 1).await;
            let all = [0, 1, 2];
            let leader = cluster.leader(0, 0, &all).await;
            let victim = if was_leader { leader } else { (leader + 1) % 3 };
            let others: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
            // The victim stops; 200 messages are committed without it.
            cluster.kill(victim);
            cluster.leader(others[0], 0, &others).await;
            let mut client = BrokerClient::new(connect(&cluster.addr(others[0])).await.unwrap());
            for i in 0..20u32 {
                let messages = (0..10)
                    .map(|j| pb::Message {
                        value: Some(format!("m{i}-{j}").into()),
                        ..pb::Message::default()
                    })
                    .collect();
                client
                    .send(pb::SendRequest {
                        topic: TOPIC.into(),
                        messages,
                    })
                    .await
                    .unwrap();
            }
            // Restarted with the others up: ready only once it serves all 200.
            let node = &mut cluster.nodes[victim];
            let (child, addr, http) = serve_http(
                &node.dir,
                node.id,
                &cluster.peers[victim],
                &[("SLUICE_HTTP_LISTEN", "127.0.0.1:0")],
            )
            .unwrap();
            node.child = Some(child);
            cluster.links.set_up(victim, true);
            let http = http.expect("the HTTP port is on");
            tokio::time::timeout(DEADLINE, async {
                loop {
                    let reply = common::http::get(http, "/readyz").await;
                    if reply.status == 200 {
                        return;
                    }
                    assert_eq!(reply.status, 503, "{}", reply.body);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the restarted node became ready");
            let d = describe(&addr).await.unwrap();
            assert_eq!(
                d.partitions[0].next_offset, 200,
                "ready, so it serves everything committed while it was down (was leader: \
                 {was_leader})"
            );
        });
    }
}

#[test]
fn with_tls_the_nodes_authenticate_each_other_and_refuse_anyone_else_on_the_cluster_port() {
    let runtime = runtime();
    runtime.block_on(async {
        let pki = tempfile::tempdir().unwrap();
        let ca = common::pki::Ca::new(pki.path(), "clinic");
        // One certificate for the three nodes (each names 127.0.0.1, the peers' host here).
        let node = ca.server("node");
        let client = ca.client("admin");
        let (cert, key, ca_file) = (
            node.cert.to_str().unwrap(),
            node.key.to_str().unwrap(),
            ca.cert.to_str().unwrap(),
        );
        let cluster = TestCluster::start_with(&[
            ("SLUICE_TLS_CERT_FILE", cert),
            ("SLUICE_TLS_KEY_FILE", key),
            ("SLUICE_TLS_CLIENT_CA_FILE", ca_file),
        ]);
        // Replication works over mutual TLS: a topic created through node 1, a message sent
        // through node 2 (committed on a majority), read from node 3.
        let tls_args = [
            "--tls-ca",
            ca_file,
            "--tls-cert",
            client.cert.to_str().unwrap(),
            "--tls-key",
            client.key.to_str().unwrap(),
        ];
        let run = |args: &[&str], stdin: &str| {
            let mut all: Vec<&str> = args.to_vec();
            all.extend(tls_args);
            tokio::task::block_in_place(|| common::server::cli(&all, stdin))
        };
        let (a1, a2, a3) = (cluster.addr(0), cluster.addr(1), cluster.addr(2));
        let out = run(&["topics", "create", TOPIC, "--broker", &a1], "");
        common::server::assert_succeeded(&out, "create over TLS");
        let out = run(
            &["produce", "--topic", TOPIC, "--broker", &a2],
            "over mutual TLS\n",
        );
        common::server::assert_succeeded(&out, "produce over TLS");
        let out = run(
            &["consume", "--topic", TOPIC, "--count", "1", "--broker", &a3],
            "",
        );
        common::server::assert_succeeded(&out, "consume over TLS");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "over mutual TLS\n");

        // The cluster port: who may ask node 1 for its status.
        let stranger_ca = common::pki::Ca::new(pki.path(), "stranger");
        let stranger = stranger_ca.server("stranger");
        let no_peer_name = ca.client("not-a-node");
        let port = cluster.peers[0]
            .split(&['"', ','][..])
            .find(|p| p.starts_with("1@"))
            .unwrap()
            .trim_start_matches("1@")
            .to_string();
        let read = |p: &std::path::Path| std::fs::read(p).unwrap();
        let ask = |identity: Option<(&std::path::Path, &std::path::Path)>, tls: bool| {
            let port = port.clone();
            let ca_pem = read(&ca.cert);
            let identity =
                identity.map(|(c, k)| tonic::transport::Identity::from_pem(read(c), read(k)));
            async move {
                let scheme = if tls { "https" } else { "http" };
                let mut endpoint =
                    tonic::transport::Endpoint::from_shared(format!("{scheme}://{port}"))
                        .unwrap()
                        .connect_timeout(Duration::from_secs(2))
                        .timeout(Duration::from_secs(2));
                if tls {
                    let mut config = tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
                    if let Some(identity) = identity {
                        config = config.identity(identity);
                    }
                    endpoint = endpoint.tls_config(config).unwrap();
                }
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                sluice::proto::cluster::raft_client::RaftClient::new(channel)
                    .status(sluice::proto::cluster::StatusRequest {})
                    .await
                    .map(|r| r.into_inner().node_id)
                    .map_err(|e| e.to_string())
            }
        };
        // Who connects → whether node 1 answers.
        let table: Vec<(&str, Result<u64, String>)> = vec![
            (
                "a node's certificate",
                ask(Some((&node.cert, &node.key)), true).await,
            ),
            ("plaintext", ask(None, false).await),
            ("TLS without a certificate", ask(None, true).await),
            (
                "a certificate of another CA",
                ask(Some((&stranger.cert, &stranger.key)), true).await,
            ),
            (
                "the CA's certificate naming no peer's host",
                ask(Some((&no_peer_name.cert, &no_peer_name.key)), true).await,
            ),
        ];
        for (who, answer) in table {
            match who {
                "a node's certificate" => assert_eq!(answer, Ok(1), "{who}"),
                _ => assert!(answer.is_err(), "{who}: {answer:?}"),
            }
        }
    });
}

#[test]
fn ten_thousand_concurrent_seed_sends_through_a_follower_are_all_acknowledged() {
    let runtime = runtime();
    runtime.block_on(async {
        let cluster = TestCluster::start();
        let topic = "burst";
        create_topic(connect(&cluster.addr(0)).await.unwrap(), topic, 1).await;
        // The seed's burst, through a node that does not lead the partition: every Send is
        // forwarded to the leader over one cluster connection.
        let mut admin = AdminClient::new(connect(&cluster.addr(0)).await.unwrap());
        let describe = pb::DescribeTopicRequest { name: topic.into() };
        // The partition's leader (another election may be under way: tests share the cores).
        let leader = tokio::time::timeout(DEADLINE, async {
            loop {
                let d = admin.describe_topic(describe.clone()).await.unwrap();
                if let Some(l) = d.into_inner().partitions[0].leader {
                    return l as usize - 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a leader");
        let through = cluster.addr((leader + 1) % 3);
        let mut channels = Vec::new();
        for _ in 0..16 {
            channels.push(connect(&through).await.unwrap());
        }
        let payload = bytes::Bytes::from(vec![b'q'; 4096]);
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..10_000usize {
            let mut client = SeedClient::new(channels[i % channels.len()].clone());
            let request = seed_pb::SendRequest {
                msg: Some(seed_pb::Message {
                    topic: topic.into(),
                    payload: payload.clone(),
                }),
            };
            sends.spawn(async move { client.send(request).await.map(|r| r.into_inner()) });
        }
        let mut acknowledged = 0;
        while let Some(sent) = sends.join_next().await {
            let answer = sent
                .unwrap()
                .unwrap_or_else(|e| panic!("a Send failed: {e:?}"));
            assert!(answer.success, "{answer:?}");
            acknowledged += 1;
        }
        assert_eq!(acknowledged, 10_000);
        // Asked of the leader: a follower learns the commit point a heartbeat later.
        let mut admin = AdminClient::new(connect(&cluster.addr(leader)).await.unwrap());
        let d = admin.describe_topic(describe).await.unwrap().into_inner();
        assert_eq!(d.partitions[0].next_offset, 10_000, "each stored once");
    });
}

/// The upgrade path (docs/replication.md, "Upgrading a single node"): a single node's data
/// directory, whose retention had removed each partition's head, becomes node 1 of a new
/// cluster (nodes 2 and 3 start empty). Every node then serves the single node's messages at
/// their offsets from the same first offset, Sends go on from the next offset, and the messages
/// outlive node 1 (they were replicated, not just kept where they were).
#[test]
fn a_single_nodes_data_directory_becomes_the_first_node_of_a_cluster() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::stopped(&[]);
        let sent: u64 = 300;
        let value = |n: u64| format!("single {n} {}", "x".repeat(100));
        // Per partition: the first offset the single node kept, and the messages from it.
        let mut kept: Vec<(u64, Vec<(u64, String)>)> = Vec::new();
        {
            let mut config = common::server::test_config(&cluster.nodes[0].dir);
            config.log.segment_bytes = 4096;
            let server = common::server::TestServer::start(config).await;
            let mut admin = server.admin().await;
            admin
                .create_topic(pb::CreateTopicRequest {
                    name: TOPIC.into(),
                    settings: Some(pb::TopicSettings {
                        partitions: 2,
                        retention_bytes: Some(8192),
                        ..pb::TopicSettings::default()
                    }),
                })
                .await
                .unwrap();
            let mut client = server.client().await;
            for n in 0..sent {
                client
                    .send(pb::SendRequest {
                        topic: TOPIC.into(),
                        messages: vec![pb::Message {
                            value: Some(value(n).into()),
                            partition: Some((n % 2) as u32),
                            ..pb::Message::default()
                        }],
                    })
                    .await
                    .unwrap();
            }
            admin
                .compact(pb::CompactRequest {
                    topic: TOPIC.into(),
                    dry_run: false,
                })
                .await
                .unwrap();
            let described = admin
                .describe_topic(pb::DescribeTopicRequest { name: TOPIC.into() })
                .await
                .unwrap()
                .into_inner();
            for p in 0..2u64 {
                let first = described.partitions[p as usize].first_offset;
                let messages = (0..sent)
                    .filter(|n| n % 2 == p)
                    .enumerate()
                    .map(|(offset, n)| (offset as u64, value(n)))
                    .filter(|(offset, _)| *offset >= first)
                    .collect();
                kept.push((first, messages));
            }
            server.stop().await;
        }
        assert!(
            kept.iter().all(|(first, _)| *first > 0),
            "retention removed each partition's head"
        );
        for i in 0..3 {
            cluster.restart(i);
        }
        let end = sent / 2;
        for i in 0..3 {
            readable_up_to(&cluster.addr(i), end, "the single node's messages").await;
            let described = describe(&cluster.addr(i)).await.unwrap();
            for (p, (first, messages)) in kept.iter().enumerate() {
                assert_eq!(
                    described.partitions[p].first_offset,
                    *first,
                    "node {} partition {p}: first offset",
                    i + 1
                );
                assert_eq!(
                    &read_all(&cluster.addr(i), TOPIC, p as u32, end - first).await,
                    messages,
                    "node {} partition {p}",
                    i + 1
                );
            }
        }
        assert!(
            cluster.nodes[0]
                .dir
                .join("pre-cluster/topics")
                .join(TOPIC)
                .exists(),
            "the single node's files are kept aside"
        );
        // Sends through node 2 go on at the next offset; node 1 stops; 2 and 3 serve all.
        let mut client = BrokerClient::new(connect(&cluster.addr(1)).await.unwrap());
        let reply = client
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message {
                    value: Some(value(sent).into()),
                    partition: Some(0),
                    ..pb::Message::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.positions[0].offset, end);
        cluster.kill(0);
        let (first, mut messages) = kept[0].clone();
        messages.push((end, value(sent)));
        for i in 1..3 {
            assert_eq!(
                read_all(&cluster.addr(i), TOPIC, 0, end + 1 - first).await,
                messages,
                "node {}",
                i + 1
            );
        }
    });
}

/// Bytes of partition `partition`'s log files in node data directory `dir` (0 when it has
/// none).
fn partition_bytes(dir: &Path, partition: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir.join("topics").join(TOPIC).join(partition.to_string()))
    else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// A topic whose replication factor is below the number of nodes: its partitions spread over
/// the nodes (two of three each, every node holding as many), only those nodes store them,
/// and every node serves every call on them alike — Sends through a node that holds none are
/// acknowledged at the same dense offsets, Subscribe through it reads the same records (from
/// the start, and following the tail), DescribeTopic shows the same replicas, leader and end;
/// with one of a partition's nodes down, the other still serves its reads through every node.
/// A factor above the number of nodes, or 0, is refused with `INVALID_ARGUMENT`.
#[test]
fn a_topic_on_fewer_nodes_than_the_cluster_is_served_alike_through_every_node() {
    let rt = runtime();
    let _guard = rt.enter();
    let mut cluster = TestCluster::start();
    let partitions = 3u32;
    rt.block_on(async {
        let mut admin = AdminClient::new(connect(&cluster.addr(0)).await.unwrap());
        for factor in [4, 0] {
            let refused = admin
                .create_topic(pb::CreateTopicRequest {
                    name: "too-many".into(),
                    settings: Some(pb::TopicSettings {
                        replication_factor: Some(factor),
                        ..pb::TopicSettings::default()
                    }),
                })
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
            assert!(
                refused.message().contains("replication_factor"),
                "{refused}"
            );
        }
        admin
            .create_topic(pb::CreateTopicRequest {
                name: TOPIC.into(),
                settings: Some(pb::TopicSettings {
                    partitions,
                    replication_factor: Some(2),
                    ..pb::TopicSettings::default()
                }),
            })
            .await
            .unwrap();
    });
    // Every node describes the same placement: two distinct nodes per partition, each node
    // holding two partitions.
    let placement: Vec<Vec<u64>> = rt.block_on(async {
        let d = describe(&cluster.addr(0)).await.unwrap();
        assert_eq!(
            d.settings.unwrap().replication_factor,
            Some(2),
            "the factor is kept with the topic"
        );
        d.partitions.iter().map(|p| p.replicas.clone()).collect()
    });
    let mut held = [0; 3];
    for replicas in &placement {
        let distinct: BTreeSet<u64> = replicas.iter().copied().collect();
        assert_eq!(distinct.len(), 2, "{placement:?}");
        for r in replicas {
            held[*r as usize - 1] += 1;
        }
    }
    assert_eq!(held, [2, 2, 2], "{placement:?}");
    // Sends through every node, to every partition: 10 each, round the nodes.
    let per = 30u64;
    rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..3 {
            clients.push(BrokerClient::new(connect(&cluster.addr(i)).await.unwrap()));
        }
        for p in 0..partitions {
            for n in 0..per {
                let through = (n % 3) as usize;
                let placed = clients[through]
                    .send(pb::SendRequest {
                        topic: TOPIC.into(),
                        messages: vec![pb::Message {
                            value: Some(format!("{p}-{n}").into_bytes().into()),
                            partition: Some(p),
                            ..pb::Message::default()
                        }],
                    })
                    .await
                    .unwrap_or_else(|e| panic!("send {p}-{n} through node {}: {e}", through + 1))
                    .into_inner();
                assert_eq!(placed.positions[0].partition, p);
                assert_eq!(placed.positions[0].offset, n, "dense offsets, in order");
            }
        }
    });
    // Every node describes and reads the same: replicas, leader among them, end, records (a
    // follower applies the last entry once it hears it is committed: waited for).
    rt.block_on(async {
        for i in 0..3 {
            let caught_up = tokio::time::timeout(DEADLINE, async {
                loop {
                    let d = describe(&cluster.addr(i)).await.unwrap();
                    if d.partitions.iter().all(|p| p.next_offset == per) {
                        return d;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            let d = caught_up
                .await
                .unwrap_or_else(|_| panic!("node {} caught up", i + 1));
            for (p, part) in d.partitions.iter().enumerate() {
                assert_eq!(part.replicas, placement[p], "node {} partition {p}", i + 1);
                assert!(
                    part.leader.is_some_and(|l| placement[p].contains(&l)),
                    "node {} partition {p}: leader {:?}",
                    i + 1,
                    part.leader
                );
                assert_eq!(part.next_offset, per, "node {} partition {p}", i + 1);
                let read = read_all(&cluster.addr(i), TOPIC, p as u32, per).await;
                let want: Vec<(u64, String)> = (0..per).map(|n| (n, format!("{p}-{n}"))).collect();
                assert_eq!(read, want, "node {} partition {p}", i + 1);
            }
        }
    });
    // Only the nodes holding a partition store its records (another keeps at most an empty
    // segment: its header).
    for (p, replicas) in placement.iter().enumerate() {
        let stored = partition_bytes(&cluster.nodes[replicas[0] as usize - 1].dir, p as u32);
        assert!(stored > per * 4, "partition {p} holds its {per} records");
        for i in 0..3u64 {
            let bytes = partition_bytes(&cluster.nodes[i as usize].dir, p as u32);
            if replicas.contains(&(i + 1)) {
                assert!(bytes > per * 4, "node {} holds partition {p}", i + 1);
            } else {
                assert!(
                    bytes < stored / 10,
                    "node {} holds no replica of partition {p}",
                    i + 1
                );
            }
        }
    }
    // A subscriber on a node holding no replica of partition 0 follows its tail.
    let outsider = (1..=3u64).find(|n| !placement[0].contains(n)).unwrap() as usize - 1;
    let replica = placement[0][0] as usize - 1;
    rt.block_on(async {
        let mut client = BrokerClient::new(connect(&cluster.addr(outsider)).await.unwrap());
        let mut stream = client
            .subscribe(pb::SubscribeRequest {
                topic: TOPIC.into(),
                partitions: vec![0],
                start: Some(pb::StartPosition {
                    kind: Some(pb::start_position::Kind::Latest(true)),
                }),
                limit: 5,
                ..pb::SubscribeRequest::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut sender = BrokerClient::new(connect(&cluster.addr(replica)).await.unwrap());
        for n in per..per + 5 {
            sender
                .send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: vec![pb::Message {
                        value: Some(format!("0-{n}").into_bytes().into()),
                        partition: Some(0),
                        ..pb::Message::default()
                    }],
                })
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        while let Some(batch) = tokio::time::timeout(DEADLINE, stream.message())
            .await
            .expect("the tail reached the subscriber")
            .unwrap()
        {
            seen.extend(batch.deliveries.into_iter().map(|d| d.offset));
        }
        assert_eq!(seen, (per..per + 5).collect::<Vec<_>>());
    });
    // One of partition 0's nodes down: the other still serves its reads, through the outsider.
    let other = placement[0][1] as usize - 1;
    cluster.kill(replica);
    rt.block_on(async {
        let read = read_all(&cluster.addr(outsider), TOPIC, 0, per + 5).await;
        assert_eq!(read.len() as u64, per + 5);
        assert_eq!(read.last().unwrap().1, format!("0-{}", per + 4));
        let read = read_all(&cluster.addr(other), TOPIC, 0, per + 5).await;
        assert_eq!(read.len() as u64, per + 5);
    });
    // Back: a Send through the outsider finds the partition's leader again (the one it saw last
    // may be the node that went down, or no longer lead) and is acknowledged at the next offset.
    cluster.restart(replica);
    rt.block_on(async {
        let mut client = BrokerClient::new(connect(&cluster.addr(outsider)).await.unwrap());
        let placed = client
            .send(pb::SendRequest {
                topic: TOPIC.into(),
                messages: vec![pb::Message {
                    value: Some(b"after".to_vec().into()),
                    partition: Some(0),
                    ..pb::Message::default()
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(placed.positions[0].offset, per + 5);
        let read = read_all(&cluster.addr(replica), TOPIC, 0, per + 6).await;
        assert_eq!(read.last().unwrap(), &(per + 5, "after".to_string()));
        // A message with an id through the outsider is checked by the partition's leader: sent
        // again through every node (holder or not), it is answered at its first position and
        // stored once.
        let with_id = |node: usize| {
            let addr = cluster.addr(node);
            async move {
                let mut client = BrokerClient::new(connect(&addr).await.unwrap());
                let r = client
                    .send(pb::SendRequest {
                        topic: TOPIC.into(),
                        messages: vec![pb::Message {
                            value: Some(b"with-id".to_vec().into()),
                            partition: Some(0),
                            id: Some(b"form-17".to_vec().into()),
                            ..pb::Message::default()
                        }],
                    })
                    .await
                    .unwrap();
                r.into_inner().positions[0]
            }
        };
        let first = with_id(outsider).await;
        assert_eq!((first.offset, first.duplicate), (per + 6, false));
        for node in [0, 1, 2] {
            let again = with_id(node).await;
            assert!(again.duplicate, "through node {}: {again:?}", node + 1);
            assert_eq!(again.offset, per + 6, "through node {}", node + 1);
        }
        let read = read_all(&cluster.addr(replica), TOPIC, 0, per + 7).await;
        assert_eq!(read.len() as u64, per + 7);
    });
    // The outsider restarted (before it knows the catalog again) joins only the groups it
    // holds: it still stores nothing of partition 0 and still serves it.
    cluster.kill(outsider);
    cluster.restart(outsider);
    rt.block_on(async {
        let mut client = BrokerClient::new(connect(&cluster.addr(outsider)).await.unwrap());
        let sent = tokio::time::timeout(DEADLINE, async {
            loop {
                let send = client.send(pb::SendRequest {
                    topic: TOPIC.into(),
                    messages: vec![pb::Message {
                        value: Some(b"restarted".to_vec().into()),
                        partition: Some(0),
                        ..pb::Message::default()
                    }],
                });
                match send.await {
                    Ok(r) => return r.into_inner().positions[0].offset,
                    // Not open here yet (the catalog not known again): nothing was stored.
                    Err(s) if s.code() == tonic::Code::Unavailable => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(s) => panic!("{s}"),
                }
            }
        })
        .await
        .expect("the restarted outsider takes Sends again");
        assert_eq!(sent, per + 7);
        let read = read_all(&cluster.addr(outsider), TOPIC, 0, per + 8).await;
        assert_eq!(read.last().unwrap(), &(per + 7, "restarted".to_string()));
    });
    let stored = partition_bytes(&cluster.nodes[replica].dir, 0);
    let outside = partition_bytes(&cluster.nodes[outsider].dir, 0);
    assert!(
        outside < stored / 10,
        "the outsider stores none of partition 0"
    );
    let vote = cluster.nodes[outsider]
        .dir
        .join("topics")
        .join(TOPIC)
        .join("0")
        .join("raft");
    assert!(
        !vote.exists(),
        "the outsider never took part in partition 0's group"
    );
}

/// `sluice audit`'s records, one JSON object per line, and how it exited.
fn audit_json(args: &[&str]) -> (Vec<serde_json::Value>, std::process::Output) {
    let mut all = vec!["audit", "--format", "json"];
    all.extend_from_slice(args);
    let out = common::server::cli(&all, "");
    let records = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (records, out)
}

/// Checks a merged view: every record names its node, each node's records come in chain
/// order, the whole in time order; returns each record's (node, seq).
fn merged(records: &[serde_json::Value]) -> Vec<(u64, u64)> {
    let at = |r: &serde_json::Value| humantime::parse_rfc3339(r["time"].as_str().unwrap()).unwrap();
    let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seen = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let node = r["node"].as_u64().unwrap_or_else(|| panic!("no node: {r}"));
        let seq = r["seq"].as_u64().unwrap();
        if let Some(before) = last_seq.insert(node, seq) {
            assert_eq!(seq, before + 1, "node {node}'s chain out of order: {r}");
        }
        if i > 0 {
            assert!(at(&records[i - 1]) <= at(r), "not in time order at {r}");
        }
        seen.push((node, seq));
    }
    seen
}

#[test]
fn each_node_keeps_its_own_audit_chain_and_sluice_audit_merges_them_checking_every_chain() {
    let runtime = runtime();
    runtime.block_on(async {
        let mut cluster = TestCluster::start();
        // An administrative action through each node: each is recorded by the node that
        // answered it.
        for (i, name) in ["first", "second", "third"].into_iter().enumerate() {
            create_topic(connect(&cluster.addr(i)).await.unwrap(), name, 1).await;
        }
        let addrs: Vec<String> = (0..3).map(|i| cluster.addr(i)).collect();
        let mut args = Vec::new();
        for a in &addrs {
            args.extend(["--node", a.as_str()]);
        }
        let (online, out) = audit_json(&args);
        common::server::assert_succeeded(&out, "sluice audit --node ×3: ");
        let online_ids = merged(&online);
        for (node, name) in [(1, "first"), (2, "second"), (3, "third")] {
            let of = |rpc: &str, resource: &str| {
                online
                    .iter()
                    .filter(|r| r["node"] == node && r["rpc"] == rpc && r["resource"] == resource)
                    .count()
            };
            assert_eq!(of("broker/start", ""), 1, "node {node} started once");
            let creation = format!("topic {name:?}");
            assert_eq!(
                of("sluice.v1.Admin/CreateTopic", &creation),
                1,
                "node {node} recorded the creation it answered"
            );
            let anywhere = online.iter().filter(|r| r["resource"] == creation).count();
            assert_eq!(
                anywhere, 1,
                "{name} is recorded once, by the node that answered"
            );
        }
        // One node's trail alone, through that node.
        let (one, out) = audit_json(&["--broker", &addrs[1]]);
        common::server::assert_succeeded(&out, "sluice audit through node 2: ");
        assert!(one.iter().all(|r| r["node"] == 2), "{one:?}");

        for i in 0..3 {
            cluster.kill(i);
        }
        let dirs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.dir.display().to_string())
            .collect();
        let mut offline_args = Vec::new();
        for d in &dirs {
            offline_args.extend(["--data-dir", d.as_str()]);
        }
        let (offline, out) = audit_json(&offline_args);
        common::server::assert_succeeded(&out, "sluice audit --data-dir ×3: ");
        assert_eq!(
            merged(&offline),
            online_ids,
            "the same records read offline"
        );
        for d in &dirs {
            let out = common::server::cli(&["verify", "--data-dir", d], "");
            common::server::assert_succeeded(&out, "sluice verify of a node's directory: ");
        }

        // A record of node 2 changed, stored with a valid CRC: only the chain shows it, and
        // both tools name the node's directory.
        let node2 = &cluster.nodes[1].dir;
        let mut values = common::audit_values(node2);
        let mut changed: serde_json::Value = serde_json::from_slice(&values[0]).unwrap();
        changed["principal"] = "someone else".into();
        values[0] = serde_json::to_vec(&changed).unwrap();
        common::rewrite_audit_trail(node2, &values);
        let (still, out) = audit_json(&offline_args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a broken chain fails: {stderr}");
        assert!(
            stderr.contains(&format!("{}: audit record 0: changed", dirs[1])),
            "{stderr}"
        );
        assert_eq!(still.len(), offline.len(), "every record is still shown");
        let out = common::server::cli(&["verify", "--data-dir", &dirs[1]], "");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{stdout}");
        assert!(stdout.contains("audit record 0: changed"), "{stdout}");
    });
}
