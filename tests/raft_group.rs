//! Three replicas of one partition under openraft, in one process, on Sluice's storage: an
//! in-process network that a test can cut, a leader cut off mid-stream, and the checks Jepsen
//! makes of a replicated log: no acknowledged write lost, none stored twice, the same bytes at
//! every offset on every replica, and nothing acknowledged by a leader that had lost its
//! majority.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft};
use sluice::replication::network::GrpcLink;
use sluice::replication::write::Proposals;
use sluice::replication::{
    GroupCommand, GrpcNetwork, LogStore, PartitionRaft, Peers, Proposal, RaftService, StateMachine,
};
use sluice::storage::raft_log::{RaftLog, RaftLogReader};
use sluice::storage::{EncodedBatch, LogConfig, Partition, RealIo, Record};

type NodeRaft = Raft<PartitionRaft>;

/// Generous: three replicas on two cores, each fsyncing. It bounds waits for an election or a
/// catch-up, which take well under a second here.
const DEADLINE: Duration = Duration::from_secs(30);

/// Delivers Raft messages between the replicas of one process, either by calling the target
/// directly or over gRPC through each node's own cluster server (`RaftService` on loopback);
/// a cut node neither sends nor receives.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<HashMap<u64, NodeRaft>>>,
    cut: Arc<Mutex<HashSet<u64>>>,
    grpc: Option<Arc<Grpc>>,
}

/// Each node's cluster server.
struct Grpc {
    services: BTreeMap<u64, RaftService>,
    addrs: BTreeMap<u64, String>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

const GROUP: &str = "t/0";

impl Router {
    async fn over_grpc() -> Router {
        let mut grpc = Grpc {
            services: BTreeMap::new(),
            addrs: BTreeMap::new(),
            servers: Vec::new(),
        };
        for id in 1..=3 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            grpc.addrs
                .insert(id, listener.local_addr().unwrap().to_string());
            let service = RaftService::default();
            let server = tonic::transport::Server::builder()
                .add_service(service.clone().into_server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
            grpc.servers.push(tokio::spawn(async move {
                let _ = server.await;
            }));
            grpc.services.insert(id, service);
        }
        Router {
            grpc: Some(Arc::new(grpc)),
            ..Router::default()
        }
    }

    fn node(&self, id: u64) -> BasicNode {
        match &self.grpc {
            Some(g) => BasicNode::new(g.addrs[&id].clone()),
            None => BasicNode::default(),
        }
    }

    fn join(&self, id: u64, raft: &NodeRaft) {
        self.nodes.lock().unwrap().insert(id, raft.clone());
        if let Some(g) = &self.grpc {
            g.services[&id].add(GROUP, raft.clone());
        }
    }

    fn leave(&self, id: u64) {
        self.nodes.lock().unwrap().remove(&id);
        if let Some(g) = &self.grpc {
            g.services[&id].remove(GROUP);
        }
    }

    fn stop_servers(&self) {
        if let Some(g) = &self.grpc {
            for s in &g.servers {
                s.abort();
            }
        }
    }

    fn check_link(&self, from: u64, to: u64) -> Result<(), Unreachable> {
        let cut = self.cut.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            return Err(Unreachable::new(&std::io::Error::other(format!(
                "link {from} -> {to} is cut"
            ))));
        }
        Ok(())
    }

    fn reach(&self, from: u64, to: u64) -> Result<NodeRaft, Unreachable> {
        self.check_link(from, to)?;
        self.nodes
            .lock()
            .unwrap()
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other("no such node")))
    }
}

enum Via {
    InProcess,
    Grpc(Box<GrpcLink>),
}

struct Link {
    router: Router,
    from: u64,
    to: u64,
    via: Via,
}

/// The network of one node (knows who sends).
#[derive(Clone)]
struct NodeNet {
    router: Router,
    id: u64,
}

impl RaftNetworkFactory<PartitionRaft> for NodeNet {
    type Network = Link;
    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Link {
        let via = match &self.router.grpc {
            Some(_) => Via::Grpc(Box::new(
                GrpcNetwork::new(GROUP, Peers::default())
                    .new_client(target, node)
                    .await,
            )),
            None => Via::InProcess,
        };
        Link {
            router: self.router.clone(),
            from: self.id,
            to: target,
            via,
        }
    }
}

impl RaftNetwork<PartitionRaft> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if let Via::Grpc(link) = &mut self.via {
            self.router.check_link(self.from, self.to)?;
            return link.append_entries(rpc, option).await;
        }
        let raft = self.router.reach(self.from, self.to)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        if let Via::Grpc(link) = &mut self.via {
            self.router.check_link(self.from, self.to)?;
            return link.install_snapshot(rpc, option).await;
        }
        let raft = self.router.reach(self.from, self.to)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        if let Via::Grpc(link) = &mut self.via {
            self.router.check_link(self.from, self.to)?;
            return link.vote(rpc, option).await;
        }
        let raft = self.router.reach(self.from, self.to)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}

struct Replica {
    raft: NodeRaft,
    log: RaftLogReader,
}

async fn start(dir: &std::path::Path, id: u64, router: &Router) -> Replica {
    let part = dir.join(format!("n{id}")).join("p");
    // Small segments: a trim deletes whole ones.
    let config = LogConfig {
        segment_bytes: 4 << 10,
        index_interval_bytes: 512,
        ..LogConfig::default()
    };
    let log = RaftLog::open(&part, config, Arc::new(RealIo)).expect("open the log");
    let reader = log.reader();
    let sm =
        StateMachine::open(&part, Arc::new(RealIo), log.reader()).expect("open the state machine");
    let store = LogStore::new(log)
        .linked(sm.installed())
        .expect("a log purged past its end starts again");
    // As the broker does: a retention point applied here is this replica's snapshot to take.
    let (trimmed, mut trims) = tokio::sync::mpsc::unbounded_channel();
    let sm = sm.on_trim(Box::new(move || {
        let _ = trimmed.send(());
    }));
    let config = Config {
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 0,
        ..Config::default()
    };
    let raft = Raft::new(
        id,
        Arc::new(config.validate().expect("raft config")),
        NodeNet {
            router: router.clone(),
            id,
        },
        store,
        sm,
    )
    .await
    .expect("start raft");
    let r = raft.clone();
    tokio::spawn(async move {
        while trims.recv().await.is_some() {
            let _ = r.trigger().snapshot().await;
        }
    });
    router.join(id, &raft);
    Replica { raft, log: reader }
}

fn proposal(n: u64) -> Proposal {
    let record = Record {
        timestamp: 1_700_000_000_000 + n as i64,
        key: Some(Bytes::from(format!("producer-{}", n % 3))),
        value: Some(Bytes::from(format!("message {n:06}"))),
        ..Record::default()
    };
    Proposal::Records(Bytes::copy_from_slice(
        EncodedBatch::new(&[record]).as_bytes(),
    ))
}

/// The leader every node in `among` agrees on, once they agree (a node cut off while it led
/// may still think it leads; it is not agreed on until it has heard of the newer term).
async fn leader_among(replicas: &BTreeMap<u64, Replica>, among: &[u64]) -> u64 {
    let mut changes: Vec<_> = among.iter().map(|id| replicas[id].raft.metrics()).collect();
    let agreed = tokio::time::timeout(DEADLINE, async {
        loop {
            let views: Vec<_> = changes.iter().map(|rx| rx.borrow().clone()).collect();
            let leader = views[0].current_leader;
            let term = views.iter().map(|m| m.current_term).max();
            if let Some(l) = leader
                && among.contains(&l)
                && views
                    .iter()
                    .all(|m| m.current_leader == Some(l) && Some(m.current_term) == term)
                && views
                    .iter()
                    .any(|m| m.id == l && m.state == openraft::ServerState::Leader)
            {
                return l;
            }
            // Wait for any node's view to change.
            let waits = changes.iter_mut().map(|rx| Box::pin(rx.changed()));
            let _ = futures_select_any(waits).await;
        }
    })
    .await;
    agreed.expect("the connected nodes agree on a leader within the deadline")
}

/// Resolves when the first of `futures` does.
async fn futures_select_any<F: std::future::Future + Unpin>(futures: impl Iterator<Item = F>) {
    let mut all: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in all.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Every message of a replica, in offset order: (offset, value).
fn messages(partition: &Partition) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut next = partition.log_start();
    while next < partition.high_water() {
        for batch in partition.read(next, 1 << 20).expect("read") {
            for r in batch.records() {
                let r = r.expect("record");
                if r.offset >= next {
                    out.push((r.offset, r.value.expect("value")));
                }
            }
            next = next.max(batch.header().next_offset());
        }
    }
    out
}

/// What a scenario does next.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Write this many messages, one at a time, to the leader of the connected majority.
    Write(u64),
    /// Cut the leader off from the others, then try writes on it (none may be acknowledged).
    CutLeader,
    /// Cut one follower off.
    CutFollower,
    /// Reconnect everyone.
    Heal,
    /// Stop a connected node the way a crash does (no close) and start it again from its files.
    Restart,
    /// The leader drops the oldest messages (retention): about this many percent of them.
    Trim(u64),
}

/// A small deterministic generator (xorshift), so that a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn step(&mut self) -> Step {
        match self.next() % 9 {
            0..=2 => Step::Write(1 + self.next() % 60),
            3 => Step::CutLeader,
            4 => Step::CutFollower,
            5 | 6 => Step::Heal,
            7 => Step::Trim(10 + self.next() % 80),
            _ => Step::Restart,
        }
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    router: Router,
    replicas: BTreeMap<u64, Replica>,
    /// Acknowledged messages: number -> offsets.
    acked: BTreeMap<u64, (u64, u64)>,
    /// Sent to a leader that was cut off: never committable.
    never: Vec<u64>,
    n: u64,
    /// The highest retention point committed: no replica shows an offset below it.
    trimmed: u64,
}

impl Cluster {
    async fn new(grpc: bool) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let router = if grpc {
            Router::over_grpc().await
        } else {
            Router::default()
        };
        let mut replicas = BTreeMap::new();
        for id in 1..=3 {
            replicas.insert(id, start(dir.path(), id, &router).await);
        }
        let members: BTreeMap<u64, BasicNode> = (1..=3).map(|id| (id, router.node(id))).collect();
        replicas[&1]
            .raft
            .initialize(members)
            .await
            .expect("initialize");
        let mut cluster = Cluster {
            dir,
            router,
            replicas,
            acked: BTreeMap::new(),
            never: Vec::new(),
            n: 0,
            trimmed: 0,
        };
        // Every member knows the membership before faults start (a node that never heard of it
        // cannot take part in an election).
        cluster.catch_up().await;
        cluster
    }

    /// Writes a barrier message until one is acknowledged, then waits until every replica has
    /// applied it (every entry before it was appended before it). Returns the leader.
    async fn catch_up(&mut self) -> u64 {
        loop {
            let leader = leader_among(&self.replicas, &[1, 2, 3]).await;
            self.n += 1;
            let write = self.replicas[&leader].raft.client_write(proposal(self.n));
            let Ok(Ok(r)) = tokio::time::timeout(DEADLINE, write).await else {
                continue;
            };
            self.acked
                .insert(self.n, r.data.offsets.expect("a message takes offsets"));
            for replica in self.replicas.values() {
                replica
                    .raft
                    .wait(Some(DEADLINE))
                    .applied_index_at_least(Some(r.log_id.index), "catch up")
                    .await
                    .expect("every replica catches up");
            }
            return leader;
        }
    }

    fn connected(&self) -> Vec<u64> {
        let cut = self.router.cut.lock().unwrap();
        (1..=3).filter(|id| !cut.contains(id)).collect()
    }

    async fn write(&mut self, count: u64) {
        let connected = self.connected();
        let leader = leader_among(&self.replicas, &connected).await;
        for _ in 0..count {
            self.n += 1;
            let write = self.replicas[&leader].raft.client_write(proposal(self.n));
            // A write can meet an election (then it is unknown: it may or may not be stored).
            if let Ok(Ok(r)) = tokio::time::timeout(DEADLINE, write).await {
                self.acked
                    .insert(self.n, r.data.offsets.expect("a message takes offsets"));
            }
        }
    }

    async fn run(&mut self, step: Step) {
        match step {
            Step::Write(k) => self.write(k).await,
            Step::CutLeader | Step::CutFollower => {
                if self.connected().len() < 3 {
                    return;
                }
                let leader = leader_among(&self.replicas, &[1, 2, 3]).await;
                let victim = match step {
                    Step::CutLeader => leader,
                    _ => (1..=3).find(|&id| id != leader).expect("a follower"),
                };
                self.router.cut.lock().unwrap().insert(victim);
                if victim == leader {
                    for _ in 0..3 {
                        self.n += 1;
                        let write = self.replicas[&victim].raft.client_write(proposal(self.n));
                        match tokio::time::timeout(Duration::from_millis(600), write).await {
                            Ok(Ok(r)) => {
                                panic!("a leader without a majority acknowledged {}: {r:?}", self.n)
                            }
                            _ => self.never.push(self.n),
                        }
                    }
                    // The cut-off leader stored them, but no reader of it sees them.
                    let log = &self.replicas[&victim].log;
                    let readable: BTreeSet<Bytes> = messages(log.partition())
                        .into_iter()
                        .map(|(_, v)| v)
                        .collect();
                    for m in &self.never[self.never.len() - 3..] {
                        let v = Bytes::from(format!("message {m:06}"));
                        assert!(
                            !readable.contains(&v),
                            "uncommitted message {m} is readable"
                        );
                    }
                    // Once the others have a leader of their own, what the cut-off one took can
                    // never be committed: it exists nowhere else.
                    let rest: Vec<u64> = (1..=3).filter(|&id| id != victim).collect();
                    leader_among(&self.replicas, &rest).await;
                }
            }
            Step::Heal => self.router.cut.lock().unwrap().clear(),
            Step::Trim(percent) => self.trim(percent).await,
            Step::Restart => {
                let connected = self.connected();
                let id = connected[(self.n % connected.len() as u64) as usize];
                self.restart(id).await;
            }
        }
    }

    /// Stops node `id` the way a crash does and starts it again from its files.
    async fn restart(&mut self, id: u64) {
        let old = self.replicas.remove(&id).expect("a replica");
        self.router.leave(id);
        old.raft.shutdown().await.expect("shutdown");
        // The process is gone: what its writer had queued is written, nothing more
        // (openraft's tasks may hold the store a moment longer than `shutdown`).
        let _ = old.log.partition().close();
        drop(old);
        let again = start(self.dir.path(), id, &self.router).await;
        self.replicas.insert(id, again);
    }

    /// The leader of the connected majority proposes a retention point at the end of the entry
    /// holding the message `percent` % of the way through what readers see.
    async fn trim(&mut self, percent: u64) {
        let connected = self.connected();
        if connected.len() < 2 {
            return;
        }
        let leader = leader_among(&self.replicas, &connected).await;
        let partition = self.replicas[&leader].log.partition().clone();
        let (start, end) = (partition.log_start(), partition.high_water());
        if end <= start + 1 {
            return;
        }
        let target = start + (end - start) * percent / 100;
        let Some(header) = partition
            .read(target, 1)
            .unwrap()
            .iter()
            .map(|b| *b.header())
            .find(|h| !h.is_control())
        else {
            return;
        };
        let upto = header.raft.expect("a replicated batch has an id");
        let offset = header.last_offset() + 1;
        let command = GroupCommand::Trim {
            upto_term: upto.term,
            upto_index: upto.index,
            offset,
        };
        let write = self.replicas[&leader]
            .raft
            .client_write(Proposal::Command(command));
        if let Ok(Ok(_)) = tokio::time::timeout(DEADLINE, write).await {
            self.trimmed = self.trimmed.max(offset);
        }
    }

    /// Heals, lets everyone catch up, and checks the replicas.
    async fn check(&mut self) {
        self.router.cut.lock().unwrap().clear();
        let leader = self.catch_up().await;
        let reference = messages(self.replicas[&leader].log.partition());
        for (id, r) in &self.replicas {
            let got = messages(r.log.partition());
            if got != reference {
                let first = got.iter().zip(&reference).position(|(a, b)| a != b);
                let p = r.log.partition();
                for (i, rr) in &self.replicas {
                    let m = rr.raft.metrics().borrow().clone();
                    let tail: Vec<_> = rr
                        .log
                        .entries(0, u64::MAX, usize::MAX)
                        .unwrap()
                        .iter()
                        .map(|b| {
                            let h = b.header();
                            (
                                h.raft.unwrap().term,
                                h.raft.unwrap().index,
                                h.base_offset,
                                h.record_count,
                            )
                        })
                        .rev()
                        .take(8)
                        .collect();
                    eprintln!("replica {i}: {m:?}\n  tail {tail:?}");
                }
                panic!(
                    "inconsistent offsets: replica {id} differs (leader {leader}): {} against {} messages, first difference at {first:?}, last id {:?}, high water {}, segments {:?}",
                    got.len(),
                    reference.len(),
                    r.log.last_id(),
                    p.high_water(),
                    p.segment_bases()
                );
            }
        }
        // Retention: every replica shows the same first offset, the latest committed trim's
        // (or a later one, when a trim whose answer was lost committed anyway).
        let start = self.replicas[&leader].log.partition().log_start();
        assert!(
            start >= self.trimmed,
            "a replica shows offsets below a committed trim"
        );
        for (id, r) in &self.replicas {
            assert_eq!(
                r.log.partition().log_start(),
                start,
                "replica {id}'s first offset"
            );
        }
        let offsets: Vec<u64> = reference.iter().map(|(o, _)| *o).collect();
        let dense: Vec<u64> = (start..start + reference.len() as u64).collect();
        assert_eq!(offsets, dense, "offsets are dense");
        let mut seen = HashSet::new();
        for (offset, value) in &reference {
            assert!(seen.insert(value.clone()), "duplicate: offset {offset}");
        }
        for (m, (base, _)) in self.acked.iter().filter(|(_, (base, _))| *base >= start) {
            let want = Bytes::from(format!("message {m:06}"));
            assert_eq!(
                reference.get((base - start) as usize).map(|(_, v)| v),
                Some(&want),
                "lost write: acknowledged message {m} at offset {base}"
            );
        }
        let order: Vec<u64> = self.acked.values().map(|(base, _)| *base).collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "acknowledged messages are stored in the order they were acknowledged"
        );
        let stored: BTreeSet<Bytes> = reference.iter().map(|(_, v)| v.clone()).collect();
        for m in &self.never {
            let v = Bytes::from(format!("message {m:06}"));
            assert!(
                !stored.contains(&v),
                "read of an uncommitted write: message {m}"
            );
        }
    }

    async fn stop(self) {
        for r in self.replicas.values() {
            r.raft.shutdown().await.expect("shutdown");
        }
        self.router.stop_servers();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Retention while a follower is cut off: the leader purges entries the follower never got,
/// so on its return it installs the leader's snapshot (the retention point) and starts its log
/// again at the trim offset; then it crashes and restarts from those files. Every replica shows
/// the same messages from the same first offset.
fn a_follower_that_missed_a_trim_installs_the_snapshot_and_starts_at_its_offset(grpc: bool) {
    runtime().block_on(async {
        let mut cluster = Cluster::new(grpc).await;
        cluster.run(Step::Write(40)).await;
        let leader = cluster.catch_up().await;
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        cluster.router.cut.lock().unwrap().insert(follower);
        cluster.run(Step::Write(150)).await;
        cluster.run(Step::Trim(90)).await;
        assert!(
            cluster.trimmed > 40,
            "the trim committed past what the follower holds"
        );
        let leader = leader_among(&cluster.replicas, &cluster.connected()).await;
        // The leader's snapshot is taken and its log purged: whole segments are gone.
        let replica = &cluster.replicas[&leader];
        let purged = replica
            .raft
            .wait(Some(DEADLINE))
            .metrics(
                |m| m.purged.is_some(),
                "the leader purges up to its snapshot",
            )
            .await
            .expect("purged");
        let first_base = replica.log.partition().segment_bases()[0];
        assert!(first_base > 0, "no segment was deleted: {purged:?}");
        assert!(first_base <= cluster.trimmed);
        cluster.run(Step::Heal).await;
        cluster.run(Step::Write(10)).await;
        cluster.check().await;
        let bases = cluster.replicas[&follower].log.partition().segment_bases();
        assert_eq!(
            bases[0], cluster.trimmed,
            "the follower's log starts again at the trim offset"
        );
        cluster.restart(follower).await;
        cluster.run(Step::Write(10)).await;
        cluster.check().await;
        cluster.stop().await;
    });
}

#[test]
fn in_process_a_follower_that_missed_a_trim_installs_the_snapshot() {
    a_follower_that_missed_a_trim_installs_the_snapshot_and_starts_at_its_offset(false);
}

#[test]
fn over_grpc_a_follower_that_missed_a_trim_installs_the_snapshot() {
    a_follower_that_missed_a_trim_installs_the_snapshot_and_starts_at_its_offset(true);
}

fn a_leader_cut_off_acknowledges_nothing_and_its_entries_are_cut_when_it_returns(grpc: bool) {
    runtime().block_on(async {
        let mut cluster = Cluster::new(grpc).await;
        for step in [
            Step::Write(30),
            Step::CutLeader,
            Step::Write(30),
            Step::Heal,
            Step::Write(10),
        ] {
            cluster.run(step).await;
        }
        assert_eq!(cluster.never.len(), 3);
        cluster.check().await;
        cluster.stop().await;
    });
}

/// Random schedules of writes, cuts, heals and crash-restarts. `RAFT_SEEDS` runs more seeds
/// (the default keeps CI short).
fn random_faults_lose_duplicate_and_reorder_nothing_acknowledged(grpc: bool) {
    let seeds: u64 = std::env::var("RAFT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for seed in 1..=seeds {
        runtime().block_on(async {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
            let mut cluster = Cluster::new(grpc).await;
            let steps: Vec<Step> = (0..12).map(|_| rng.step()).collect();
            eprintln!("seed {seed} (grpc: {grpc}): {steps:?}");
            for &step in &steps {
                cluster.run(step).await;
            }
            cluster.check().await;
            cluster.stop().await;
        });
    }
}

#[test]
fn in_process_a_leader_cut_off_acknowledges_nothing() {
    a_leader_cut_off_acknowledges_nothing_and_its_entries_are_cut_when_it_returns(false);
}

#[test]
fn in_process_random_faults_lose_duplicate_and_reorder_nothing_acknowledged() {
    random_faults_lose_duplicate_and_reorder_nothing_acknowledged(false);
}

#[test]
fn over_grpc_a_leader_cut_off_acknowledges_nothing() {
    a_leader_cut_off_acknowledges_nothing_and_its_entries_are_cut_when_it_returns(true);
}

#[test]
fn over_grpc_random_faults_lose_duplicate_and_reorder_nothing_acknowledged() {
    random_faults_lose_duplicate_and_reorder_nothing_acknowledged(true);
}

/// The cluster port's bad input: a group the node does not hold is `NOT_FOUND`, a message that
/// does not decode (a damaged entry, a missing vote) is `INVALID_ARGUMENT`, and neither changes
/// the replica's log.
#[test]
fn the_cluster_port_refuses_unknown_groups_and_malformed_messages_and_changes_nothing() {
    use sluice::proto::cluster as pb;
    runtime().block_on(async {
        let mut cluster = Cluster::new(true).await;
        cluster.run(Step::Write(5)).await;
        let leader = cluster.catch_up().await;
        let follower = (1..=3).find(|&id| id != leader).unwrap();
        let before = cluster.replicas[&follower].log.last_id().unwrap();
        let addr = cluster.router.grpc.as_ref().unwrap().addrs[&follower].clone();
        let mut client = pb::raft_client::RaftClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let vote = Some(pb::Vote {
            term: 1_000,
            voted_for: Some(leader),
            committed: true,
        });

        let unknown = client
            .append_entries(pb::AppendEntriesRequest {
                group: "no-such-topic/0".into(),
                vote,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

        let mut entry = {
            let e = entry_bytes(before.unwrap().index + 1);
            e.to_vec()
        };
        let last = entry.len() - 1;
        entry[last] ^= 0xff;
        for (what, request) in [
            (
                "a damaged entry",
                pb::AppendEntriesRequest {
                    group: GROUP.into(),
                    vote,
                    prev_log_id: before.map(|id| pb::LogId {
                        term: id.term,
                        index: id.index,
                    }),
                    entries: vec![Bytes::from(entry.clone())],
                    leader_commit: None,
                },
            ),
            (
                "no vote",
                pb::AppendEntriesRequest {
                    group: GROUP.into(),
                    ..Default::default()
                },
            ),
        ] {
            let err = client.append_entries(request.clone()).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
            // The same among coalesced heartbeats: refused in its place, the call answered.
            let replies = client
                .heartbeats(pb::HeartbeatsRequest {
                    heartbeats: vec![request],
                })
                .await
                .unwrap()
                .into_inner()
                .replies;
            let refused = match &replies[..] {
                [
                    pb::HeartbeatReply {
                        outcome: Some(pb::heartbeat_reply::Outcome::Refused(r)),
                    },
                ] => r.code,
                other => panic!("{what}: {other:?}"),
            };
            assert_eq!(refused, tonic::Code::InvalidArgument as i32, "{what}");
        }
        let err = client
            .vote(pb::VoteRequest {
                group: GROUP.into(),
                vote: None,
                last_log_id: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "a vote without a vote"
        );
        // Forwarded proposals that are not one, at the leader: a command that does not decode,
        // batches no Send encoded (garbage, a stored entry, records that do not parse, cut
        // short). Each refused, nothing proposed.
        let leader_addr = cluster.router.grpc.as_ref().unwrap().addrs[&leader].clone();
        let leader_before = cluster.replicas[&leader].log.last_id().unwrap();
        let mut bad_records = EncodedBatch::new(&[Record {
            value: Some(Bytes::from_static(b"0123456789")),
            ..Record::default()
        }])
        .as_bytes()
        .to_vec();
        let n = bad_records.len();
        bad_records[n - 12..].fill(0xff);
        let proposal = EncodedBatch::new(&[Record::default()]).as_bytes().to_vec();
        let cases: [(&str, Bytes, Option<Bytes>); 5] = [
            (
                "a command that does not decode",
                Bytes::new(),
                Some(Bytes::from_static(b"{\"op\":\"erase_everything\"}")),
            ),
            ("garbage", Bytes::from_static(b"not a batch at all"), None),
            ("a stored entry", entry_bytes(99), None),
            ("records that do not parse", bad_records.into(), None),
            (
                "a batch cut short",
                Bytes::copy_from_slice(&proposal[..proposal.len() - 1]),
                None,
            ),
        ];
        let mut client = pb::raft_client::RaftClient::connect(format!("http://{leader_addr}"))
            .await
            .unwrap();
        for (what, batch, command) in cases {
            let err = client
                .propose(pb::ProposeRequest {
                    group: GROUP.into(),
                    batch,
                    command,
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        }
        assert_eq!(
            cluster.replicas[&leader].log.last_id().unwrap(),
            leader_before
        );
        assert_eq!(
            cluster.replicas[&follower].log.last_id().unwrap(),
            before,
            "refused messages change nothing"
        );
        cluster.check().await;
        cluster.stop().await;
    });
}

/// A data entry as the cluster port carries it: a sealed version 2 batch.
fn entry_bytes(index: u64) -> Bytes {
    let id = sluice::storage::record::RaftId { term: 1, index };
    let records = [Record {
        timestamp: 1,
        value: Some(Bytes::from_static(b"x")),
        ..Record::default()
    }];
    let mut batch = EncodedBatch::raft(&records, id);
    Bytes::copy_from_slice(batch.seal(0))
}

/// Heartbeats of many groups to one node travel as one call (`Heartbeats`), and each gets its
/// own answer in its place: here every group is unknown to the node, so each is refused
/// `NOT_FOUND` naming its own group.
#[test]
fn heartbeats_of_many_groups_to_one_node_travel_as_one_call_each_with_its_own_answer() {
    use sluice::proto::cluster as pb;
    use std::sync::atomic::{AtomicUsize, Ordering};
    runtime().block_on(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let server = pb::raft_server::RaftServer::with_interceptor(
            RaftService::default(),
            move |request: tonic::Request<()>| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(request)
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(incoming),
        );
        let peers = Peers::default();
        // A deadline far longer than the sends take: all of them wait in one batch.
        let ttl = Duration::from_secs(4);
        let sends: Vec<_> = (0..50)
            .map(|g| {
                let (peers, addr) = (peers.clone(), addr.clone());
                tokio::spawn(async move {
                    let request = pb::AppendEntriesRequest {
                        group: format!("g{g}"),
                        ..pb::AppendEntriesRequest::default()
                    };
                    peers.heartbeat(&addr, request, ttl).await
                })
            })
            .collect();
        for (g, send) in sends.into_iter().enumerate() {
            let refused = send.await.unwrap().unwrap_err();
            assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
            assert!(
                refused.message().contains(&format!("\"g{g}\"")),
                "answered in its place: {refused:?}"
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one call for 50 heartbeats"
        );
    });
}

/// Proposal `k` of the concurrency test: 1 to 5 messages, every seventh of them large (so that
/// merging meets its size limit), each value naming its proposal and place.
fn numbered_proposal(k: u64) -> (Bytes, Vec<Bytes>) {
    let values: Vec<Bytes> = (0..1 + k % 5)
        .map(|j| {
            let pad = if k.is_multiple_of(7) { 300 << 10 } else { 100 };
            Bytes::from(format!("proposal {k} message {j} {}", "x".repeat(pad)))
        })
        .collect();
    let records: Vec<Record> = values
        .iter()
        .map(|v| Record {
            timestamp: 1_700_000_000_000 + k as i64,
            value: Some(v.clone()),
            ..Record::default()
        })
        .collect();
    (EncodedBatch::new(&records).into_bytes(), values)
}

#[test]
fn concurrent_proposals_share_entries_and_each_is_answered_with_its_own_offsets() {
    // Proposals that wait while others are in flight are merged into one entry; each must be
    // answered with the offsets its own messages took, in its own order, whatever it shared.
    runtime().block_on(async {
        let cluster = Cluster::new(false).await;
        let leader = leader_among(&cluster.replicas, &[1, 2, 3]).await;
        let raft = cluster.replicas[&leader].raft.clone();
        let entries_before = raft.metrics().borrow().last_log_index.unwrap_or(0);
        let proposals = Arc::new(Proposals::default());
        let count = 300u64;
        let tasks: Vec<_> = (0..count)
            .map(|k| {
                let (proposals, raft) = (Arc::clone(&proposals), raft.clone());
                tokio::spawn(async move {
                    let (batch, values) = numbered_proposal(k);
                    let peers = Peers::default();
                    let proposal = Proposal::Records(batch);
                    let answer = proposals.propose(&raft, "g", proposal, DEADLINE, &peers, None);
                    (answer.await, values)
                })
            })
            .collect();
        let mut answered = Vec::new();
        for t in tasks {
            let (answer, values) = t.await.unwrap();
            let (base, last) = answer.expect("acknowledged").offsets.expect("offsets");
            assert_eq!(last - base + 1, values.len() as u64);
            answered.push((base, values));
        }
        let stored: HashMap<u64, Bytes> = messages(cluster.replicas[&leader].log.partition())
            .into_iter()
            .collect();
        let mut taken = HashSet::new();
        for (base, values) in &answered {
            for (j, v) in values.iter().enumerate() {
                let offset = base + j as u64;
                assert!(taken.insert(offset), "offset {offset} answered twice");
                assert_eq!(stored.get(&offset), Some(v), "offset {offset}");
            }
        }
        let entries = raft.metrics().borrow().last_log_index.unwrap_or(0) - entries_before;
        assert!(
            entries < count,
            "{count} concurrent proposals took {entries} entries: none were merged"
        );
    });
}

#[test]
fn a_message_to_a_group_that_starts_while_it_waits_is_served_and_one_that_never_does_is_not_found()
{
    // A new topic's leader reaches a node before that node has started the topic's group: the
    // message waits for the group (up to `GROUP_WAIT`) instead of being refused at once.
    use sluice::proto::cluster as pb;
    use sluice::proto::cluster::raft_server::Raft as RaftRpc;
    // One thread: the call below runs up to its wait before the group is added.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cluster = Cluster::new(false).await;
        let raft = cluster.replicas[&1].raft.clone();
        let service = RaftService::default();
        // An old term: the group answers (and refuses the vote) without changing anything.
        let vote = |group: &str| pb::VoteRequest {
            group: group.into(),
            vote: Some(pb::Vote {
                term: 0,
                voted_for: Some(2),
                committed: false,
            }),
            last_log_id: None,
        };
        let waiting = {
            let (service, request) = (service.clone(), vote("late/0"));
            tokio::spawn(async move { service.vote(tonic::Request::new(request)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the call waits for the group");
        service.add("late/0", raft);
        let answer = waiting
            .await
            .unwrap()
            .expect("served once the group started");
        assert!(!answer.into_inner().vote_granted);
        let never = service.vote(tonic::Request::new(vote("never/0"))).await;
        assert_eq!(never.unwrap_err().code(), tonic::Code::NotFound);
    });
}
