//! Cluster mode: this node's part in the metadata group and in every partition's group.
//!
//! - **The cluster port** serves `sluice.cluster.v1.Raft` for every group this node is in.
//! - **The metadata group** (`_meta`, its log in `<data_dir>/cluster/meta`) holds the catalog of
//!   topics. A topic is created by proposing it there (the broker's `Topics` sends each creation
//!   here); every node, on applying it, creates the topic's partitions and joins their groups.
//! - **A partition's group** (`<topic>/<partition>`) writes the partition's own log: a Send is a
//!   proposal, answered once committed on a majority and applied here ([`PartitionHandle`]'s
//!   `replica`).
//! - **Forming**: every founding node of a group initialises it with the same members (the
//!   nodes the catalog places its replicas on), which openraft allows: the first entry is the
//!   same everywhere, and an election follows once a majority is up.
//!
//! - **Deleting a topic** goes through the metadata group too; each creation of a name is an
//!   incarnation, part of its groups' names ([`group_name`]), so the groups of a name created
//!   again never meet the old ones on a node that slept through it.
//!
//! A partition this node holds no replica of is served through the nodes that do (Sends
//! forwarded to its leader, reads through `super::remote`). Message ids are checked by each
//! partition's leader
//! ([`super::id_check`]); every replica learns the ids of what it applies
//! ([`Cluster::id_hooks`]). Retention and key compaction are replicated: each partition's
//! leader proposes them periodically, and any node on demand (`Compact`) through the leader
//! ([`Cluster::trim`], [`Cluster::compact`]); every replica applies them alike.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, Raft};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::tls::cluster_tls;
use crate::replication::catalog::{Catalog, Command, group_name, parse_group_name, place};
use crate::replication::config::Members;
use crate::replication::elections::Elections;
use crate::replication::handover;
use crate::replication::reads::GroupLog;
use crate::replication::state_machine::{OnApplied, OnIds};
use crate::replication::status::{self, ClusterView};
use crate::replication::write::{Forwarder, Proposals, wait_for_leader};
use crate::replication::{
    GroupStateMachine, GrpcNetwork, LogStore, PartitionRaft, Peers, RaftService, StateMachine,
};
use crate::storage::raft_log::{RaftLog, RaftLogReader};
use crate::storage::{self, FileIo, Partition};

use super::audit::AUDIT_TOPIC;
use super::blocking::blocking;
use super::dedup::{ids_in_entry, write_later};
use super::error::{Error, Result};
use super::settings::Settings;
use super::topic::{PartitionDescription, PartitionHandle, Topic};
use super::topics::{CreateRequest, Topics};
use super::upgrade::PRE_CLUSTER;

mod identity;
mod leaders;
mod members;
pub use leaders::{LeaderMove, Rebalanced};

/// The metadata group's name on the cluster port.
pub const META_GROUP: &str = "_meta";
/// How long a node's report of its groups may take before it counts as unreachable.
const STATUS_DEADLINE: Duration = Duration::from_secs(1);

/// This node's groups and the cluster port.
pub struct Cluster {
    members: Members,
    elections: Elections,
    service: RaftService,
    meta: Raft<PartitionRaft>,
    meta_log: Arc<Partition>,
    catalog: watch::Receiver<Arc<Catalog>>,
    topics: Arc<Topics>,
    io: Arc<dyn FileIo>,
    /// `<data_dir>/cluster`.
    dir: PathBuf,
    /// Every partition group this node runs, by name.
    groups: Mutex<HashMap<String, Raft<PartitionRaft>>>,
    /// Serialises joining groups (the catalog watcher and creations both do).
    joining: tokio::sync::Mutex<()>,
    /// Serialises bringing this node's topics in line with the catalog (the catalog watcher,
    /// creations and deletions all do): one deletes a topic's files before another creates the
    /// name again.
    reconciling: tokio::sync::Mutex<()>,
    /// How long a proposal may wait to be committed before the caller hears "unknown".
    write_timeout: Duration,
    /// Takes proposals to leaders on other nodes.
    forwarder: Arc<Forwarder>,
    /// The cluster port's address.
    addr: SocketAddr,
    /// Whether this node has caught up, since it started, with the commit point of every group
    /// it held then (`/readyz`).
    caught_up: watch::Sender<bool>,
    /// Groups that applied a retention point: their snapshot (and so their purge) is due.
    trimmed: mpsc::UnboundedSender<String>,
    /// Partitions that applied a compaction point, with their topic's `delete_retention_ms`:
    /// their compaction to it is due.
    compacted: mpsc::UnboundedSender<(Arc<Partition>, u64)>,
    /// Runs the id indexes' background writes, and the watches of replicas moving here.
    tasks: TaskTracker,
    /// The broker's shutdown: the tasks on `tasks` end with it.
    stopping: CancellationToken,
    /// What `/metrics` reads of each partition group this node runs, by name.
    observed: Mutex<HashMap<String, Observed>>,
    /// Stops the cluster port: at the end of [`Cluster::shutdown`], not with the broker's
    /// token, so that other nodes reach this one's groups while it drains its clients and
    /// hands its leaderships over.
    port_stop: CancellationToken,
    /// The cluster port's server task and its TLS acceptor.
    port_tasks: TaskTracker,
    /// Who may connect to the cluster port: the cluster's nodes.
    admitted: Arc<members::Admitted>,
}

/// What `/metrics` reads of a partition group besides openraft's metrics.
#[derive(Debug, Clone)]
struct Observed {
    /// Reads the group's entries (the age of the oldest one a follower lacks).
    reader: RaftLogReader,
    /// Snapshots installed from a leader since the group started here.
    installs: Arc<std::sync::atomic::AtomicU64>,
    /// The term when the group started here.
    first_term: u64,
}

/// One partition group this node runs, as `/metrics` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RaftSample {
    pub topic: String,
    pub partition: u32,
    pub term: u64,
    /// This node leads the group.
    pub leader: bool,
    /// This node knows a leader of the group.
    pub has_leader: bool,
    pub last_log_index: u64,
    /// On the leader, the highest index a majority holds; elsewhere what this node applied
    /// (a follower applies what its leader says is committed at once).
    pub commit_index: u64,
    pub applied_index: u64,
    /// Terms begun since the group started here (each election begins one).
    pub elections: u64,
    pub snapshot_installs: u64,
    /// On the leader, per follower: entries it lacks, and the age in seconds of the oldest of
    /// them (0 when it lacks none).
    pub followers: Vec<(u64, u64, f64)>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.members.node_id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Checks the data directory belongs to this node of this cluster, opens the metadata
    /// group, starts the cluster port, joins the groups of the topics this node holds, and
    /// starts following the catalog. Topic creations of `topics` go through the cluster from
    /// now on. The node's members, data directory, log and TLS settings come from `settings`.
    pub async fn start(
        members: Members,
        settings: &Settings,
        topics: Arc<Topics>,
        io: Arc<dyn FileIo>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cluster>> {
        let log = settings.log.clone();
        let dir = settings.data_dir.join("cluster");
        let identity = {
            // A single node's topics were converted before (`super::upgrade`).
            let (dir, members, io) = (dir.clone(), members.clone(), Arc::clone(&io));
            blocking(move || identity::check_identity(&dir, &members, io.as_ref())).await?
        };
        let elections = Elections::new(&members)
            .map_err(|e| Error::InvalidArgument(format!("cluster settings: {e}")))?;
        let write_timeout =
            Duration::from_millis(members.election_timeout_ms * 8).max(Duration::from_secs(5));
        let tls = settings
            .cluster_tls
            .as_ref()
            .map(cluster_tls)
            .transpose()
            .map_err(|e| Error::FailedPrecondition(e.to_string()))?;
        let mut peers = Peers::new(members.peers.clone());
        let mut acceptor = None;
        if let Some((server_tls, client_tls)) = tls {
            peers = peers.with_tls(client_tls);
            acceptor = Some(tokio_rustls::TlsAcceptor::from(server_tls));
        }
        // Before this node takes its port: no other process runs as this node, and the
        // peers that answer are of this directory's cluster.
        let known_id = identity.cluster_id.as_deref();
        identity::check_peers(&members, &peers, known_id, STATUS_DEADLINE).await?;
        let proposals = Arc::new(Proposals::default());
        let service = RaftService::default()
            .with_write_timeout(write_timeout)
            .with_peers(peers.clone())
            .with_proposals(Arc::clone(&proposals))
            .with_elections(elections.clone());
        let (meta, meta_log, catalog) = {
            let (tx, rx) = watch::channel(Arc::new(Catalog::default()));
            let meta_dir = dir.join("meta");
            let io2 = Arc::clone(&io);
            let (log, sm) = blocking(move || {
                let log = RaftLog::open(&meta_dir, log, Arc::clone(&io2))?;
                let sm = GroupStateMachine::<Catalog>::open(&meta_dir, io2, log.reader())
                    .map_err(|e| Error::Internal(format!("metadata group: {e}")))?;
                Ok((log, sm))
            })
            .await?;
            let sm = sm.publishing(Box::new(move |c: &Catalog| {
                tx.send_replace(Arc::new(c.clone()));
            }));
            let partition = Arc::clone(log.partition());
            let raft = Raft::new(
                members.node_id,
                elections.config(META_GROUP),
                GrpcNetwork::new(META_GROUP, peers.clone()),
                LogStore::new(log),
                sm,
            )
            .await
            .map_err(|e| Error::Internal(format!("metadata group: {e}")))?;
            (raft, partition, rx)
        };
        let listener = tokio::net::TcpListener::bind(members.listen)
            .await
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "cannot listen on the cluster port {}: {e}",
                    members.listen
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (trimmed, trims) = mpsc::unbounded_channel();
        let (compacted, compactions) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            members,
            elections,
            service,
            meta,
            meta_log,
            catalog,
            topics: Arc::clone(&topics),
            io,
            dir: dir.clone(),
            groups: Mutex::new(HashMap::new()),
            joining: tokio::sync::Mutex::new(()),
            reconciling: tokio::sync::Mutex::new(()),
            write_timeout,
            forwarder: Arc::new(Forwarder::new(peers, proposals)),
            addr,
            caught_up: watch::Sender::new(false),
            trimmed,
            compacted,
            tasks: tasks.clone(),
            stopping: shutdown.clone(),
            observed: Mutex::default(),
            port_stop: CancellationToken::new(),
            port_tasks: TaskTracker::new(),
            admitted: Arc::default(),
        });
        cluster.service.add(META_GROUP, cluster.meta.clone());
        cluster.admitted.admit(&cluster.members.peers).await?;
        // Nodes added since this node's configuration was written, as its metadata log's
        // membership records them: reached and let in before the catalog is known again (one
        // of them may lead the metadata group this node must catch up from).
        let added: BTreeMap<u64, String> = {
            let m = cluster.meta.metrics().borrow().clone();
            let membership = m.membership_config.membership().clone();
            let nodes = membership.nodes();
            nodes
                .filter(|(_, node)| !node.addr.is_empty())
                .map(|(&id, node)| (id, node.addr.clone()))
                .collect()
        };
        cluster.forwarder.peers().learn(&added);
        cluster.admitted.admit(&added).await?;
        let admitted = Arc::clone(&cluster.admitted);
        // Forwarded Sends share one connection per peer: thousands at once must neither split
        // into tiny DATA frames (h2 answers a flood of them with GOAWAY) nor wait on a small
        // window. At most 1,024 streams at once, each with a 1 MiB window, 16 MiB in all.
        // A peer that stops answering pings for an election timeout (down, paused, cut off)
        // loses its connections: the streams it held here end (a relayed consumer-group
        // member leaves its group, giving back what it held) instead of waiting forever on a
        // connection nobody reads.
        let (lease, _) = cluster.lease();
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(lease))
            .http2_keepalive_timeout(Some(lease))
            .max_concurrent_streams(Some(1024))
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(Some(1 << 20))
            .add_service(cluster.service.clone().into_server());
        let stop = cluster.port_stop.clone().cancelled_owned();
        let server: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match acceptor
        {
            None => {
                let incoming = tokio_stream::StreamExt::filter(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    move |conn| match conn {
                        Ok(stream) => from_peer(stream, &admitted),
                        Err(_) => true,
                    },
                );
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
            Some(acceptor) => {
                let (tx, rx) = mpsc::channel(16);
                cluster.port_tasks.spawn(accept_peers_tls(
                    listener,
                    acceptor,
                    admitted,
                    tx,
                    cluster.port_stop.clone(),
                ));
                let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
        cluster.port_tasks.spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the cluster port stopped");
            }
        });
        // A node joining a running cluster forms nothing: the metadata group's leader adds it.
        if !cluster.members.join {
            cluster
                .initialize(
                    &cluster.meta,
                    META_GROUP,
                    None,
                    &cluster.members.ids(),
                    None,
                )
                .await?;
        }
        // The groups of the topics this node already holds, before the catalog is known again
        // (it is rebuilt from the metadata log once a leader says what is committed).
        for topic in topics.all() {
            if &*topic.name != AUDIT_TOPIC {
                cluster.join_topic(&topic, true).await?;
            }
        }
        let (create_tx, create_rx) = mpsc::channel(64);
        topics.replicate_through(create_tx);
        if let Some(known) = &identity.cluster_id {
            cluster.service.set_cluster_id(known);
        }
        tasks.spawn(Arc::clone(&cluster).found(identity, shutdown.clone()));
        tasks.spawn(Arc::clone(&cluster).follow_catalog(shutdown.clone()));
        tasks.spawn(Arc::clone(&cluster).keep_voters(shutdown.clone()));
        tasks.spawn(Arc::clone(&cluster).catch_up(shutdown.clone()));
        tasks.spawn(Arc::clone(&cluster).take_snapshots(trims, shutdown.clone()));
        tasks.spawn(compact_replicas(compactions, shutdown.clone()));
        tasks.spawn(Arc::clone(&cluster).adopt(shutdown.clone()));
        let balance = cluster.members.leader_balance_interval_ms;
        if balance > 0 {
            let interval = Duration::from_millis(balance);
            tasks.spawn(Arc::clone(&cluster).balance_leaders(interval, shutdown.clone()));
        }
        tasks.spawn(Arc::clone(&cluster).serve_creations(create_rx, shutdown));
        tracing::info!(node_id = cluster.members.node_id, %addr,
            peers = cluster.members.peers.len(), "cluster port listening");
        Ok(cluster)
    }

    pub fn node_id(&self) -> u64 {
        self.members.node_id
    }

    /// The cluster port's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How long a proposal may wait to be committed.
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Takes proposals to the leaders of groups this node does not lead.
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// Whether this node has caught up with the commit point of every group it held when it
    /// started (each group's leader asked once); stays true from then on.
    pub fn caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Every node's report of its groups, merged; a node that does not answer within
    /// [`STATUS_DEADLINE`] is listed as unreachable, with why.
    pub async fn status(&self) -> ClusterView {
        let me = self.members.node_id;
        let mut asks = tokio::task::JoinSet::new();
        for id in self.node_ids() {
            if id != me {
                let forwarder = Arc::clone(&self.forwarder);
                let addr = forwarder.peers().addr(id, "");
                asks.spawn(async move { (id, addr, forwarder.status(id, STATUS_DEADLINE).await) });
            }
        }
        let mut reports = vec![(me, self.addr.to_string(), Ok(self.service.status()))];
        while let Some(answer) = asks.join_next().await {
            if let Ok(report) = answer {
                reports.push(report);
            }
        }
        // A leader no majority has acknowledged for a whole election timeout leads nothing.
        status::merge(me, reports, self.members.election_timeout_ms * 2)
    }

    /// Waits, group by group, until a leader is known and this node has applied what that
    /// leader had applied when asked; then `/readyz` says ready.
    async fn catch_up(self: Arc<Self>, shutdown: CancellationToken) {
        let me = self.members.node_id;
        let mut groups: Vec<(String, Raft<PartitionRaft>)> =
            vec![(META_GROUP.into(), self.meta.clone())];
        groups.extend(self.running().iter().map(|(n, r)| (n.clone(), r.clone())));
        let mut reports: HashMap<u64, crate::proto::cluster::StatusResponse> = HashMap::new();
        for (name, raft) in groups {
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                // A group of a topic the cluster deleted meanwhile has nothing to catch up with.
                if name != META_GROUP && !self.running().contains_key(&name) {
                    break;
                }
                let Some(leader) = wait_for_leader(&raft, STATUS_DEADLINE).await else {
                    continue;
                };
                if leader == me {
                    // A restarted node may resume as the leader its stored vote names, until it
                    // hears of a newer term: it leads only once a majority has acknowledged it.
                    let fresh = self.members.election_timeout_ms;
                    let acknowledged = |m: &openraft::RaftMetrics<u64, BasicNode>| {
                        m.current_leader == Some(me)
                            && m.millis_since_quorum_ack.is_some_and(|ms| ms <= fresh)
                    };
                    let mut metrics = raft.metrics();
                    let settled =
                        metrics.wait_for(|m| m.current_leader != Some(me) || acknowledged(m));
                    tokio::select! {
                        _ = tokio::time::timeout(STATUS_DEADLINE, settled) => {}
                        () = shutdown.cancelled() => return,
                    }
                    if acknowledged(&raft.metrics().borrow()) {
                        break;
                    }
                    continue;
                }
                let report = match reports.entry(leader) {
                    Entry::Occupied(known) => known.into_mut(),
                    Entry::Vacant(ask) => {
                        match self.forwarder.status(leader, STATUS_DEADLINE).await {
                            Ok(r) => ask.insert(r),
                            Err(_) => {
                                tokio::time::sleep(STATUS_DEADLINE).await;
                                continue;
                            }
                        }
                    }
                };
                let committed = report
                    .groups
                    .iter()
                    .find(|g| g.group == name && g.leader == Some(leader))
                    .map(|g| g.last_applied);
                let Some(committed) = committed else {
                    // It no longer leads (or does not know the group yet): ask anew.
                    reports.remove(&leader);
                    tokio::time::sleep(STATUS_DEADLINE).await;
                    continue;
                };
                let mut metrics = raft.metrics();
                let applied = metrics.wait_for(|m| m.last_applied.map(|l| l.index) >= committed);
                tokio::select! {
                    _ = applied => break,
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(STATUS_DEADLINE * 5) => {
                        reports.remove(&leader); // not there yet: ask what is committed now
                    }
                }
            }
        }
        tracing::info!("caught up with every group's leader: ready");
        self.caught_up.send_replace(true);
    }

    /// Initialises a group with `members` (every node for the metadata group, a partition's
    /// replicas' nodes for its group) unless it already is. One founder, `first` when given (a
    /// consumer group's: the node its first member came through) else chosen by the group's
    /// name (so first leaders spread over the nodes), does so at once and so becomes the
    /// group's first leader; each other founder waits a random E to 2 E first
    /// (in the background) and does nothing if the group formed meanwhile. Founders that
    /// initialise together also vote for themselves together, and with one founder down the
    /// other two can tie round after round. A group whose first entries one node brought from
    /// its single-node data (`formed_by`) is formed by that node alone: it already is there,
    /// and any other founder forming it would start a log without them.
    async fn initialize(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        formed_by: Option<u64>,
        members: &[u64],
        first: Option<u64>,
    ) -> Result<()> {
        if formed_by.is_some_and(|n| n != self.members.node_id) {
            return Ok(());
        }
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| Error::Internal(format!("group {group}: {e}")))?;
        if initialized {
            return Ok(());
        }
        // As Raft knows them: by id. Addresses are each node's own configuration ([`Peers`]),
        // so the first entry of a group is the same on every node.
        let voters: BTreeMap<u64, BasicNode> = members
            .iter()
            .map(|&id| (id, BasicNode::default()))
            .collect();
        let ids: Vec<u64> = voters.keys().copied().collect();
        let first = first
            .filter(|n| ids.contains(n))
            .unwrap_or_else(|| ids[crc32fast::hash(group.as_bytes()) as usize % ids.len().max(1)]);
        if first == self.members.node_id {
            return form(raft, voters, group).await;
        }
        let e = self.members.election_timeout_ms;
        let wait = Duration::from_millis(e + random_below(e + 1));
        let (raft, group) = (raft.clone(), group.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if raft.is_initialized().await.unwrap_or(true) {
                return;
            }
            if let Err(e) = form(&raft, voters, &group).await {
                tracing::warn!(%group, error = %e, "cannot form the group");
            }
        });
        Ok(())
    }

    /// The nodes holding partition `partition` of `topic`: as the catalog places it, or every
    /// node for a topic the catalog does not know (yet).
    fn replicas_of(&self, topic: &Topic, partition: u32) -> Vec<u64> {
        let catalog = self.catalog.borrow();
        match catalog.topics.get(&*topic.name) {
            Some(t) if t.config.incarnation == topic.config.incarnation => {
                t.replicas_of(partition).to_vec()
            }
            _ => catalog.node_ids(&self.members.ids()),
        }
    }

    /// Whether a node of the group of partition `partition` of `topic` may form it: not once
    /// the topic's replicas have moved (it formed long before; a node now joining it waits to
    /// be added by its leader).
    fn formable(&self, topic: &Topic) -> bool {
        let catalog = self.catalog.borrow();
        !catalog
            .topics
            .get(&*topic.name)
            .is_some_and(|t| t.config.incarnation == topic.config.incarnation && t.moved)
    }

    /// The catalog as this node has applied it, following every change.
    pub(super) fn catalog(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.clone()
    }

    /// How long a leader leads without a majority's acknowledgement (the election timeout:
    /// by then the others may have elected another), and how often it hears from them (the
    /// heartbeat).
    pub(super) fn lease(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.members.election_timeout_ms),
            Duration::from_millis(self.members.heartbeat_ms),
        )
    }

    /// Every node of the cluster, by id: as the catalog has them (nodes added and removed),
    /// else the founding peers.
    pub(super) fn node_ids(&self) -> Vec<u64> {
        self.catalog.borrow().node_ids(&self.members.ids())
    }

    /// The cluster's nodes and their cluster ports: the catalog's, else the founding peers.
    fn known_nodes(&self) -> BTreeMap<u64, String> {
        let catalog = self.catalog.borrow();
        if catalog.nodes.is_empty() {
            self.members.peers.clone()
        } else {
            catalog.nodes.clone()
        }
    }

    /// Adds node `id`, whose cluster port is `addr`, to the cluster (`members::check_add`,
    /// `check_answer`): every topic held by every node gains a replica on it. Returns once every
    /// group that should have it as a voter has, with how many those are. A repeat (same id and
    /// address) waits for the same.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<usize> {
        let known = self.known_nodes();
        let (addr, there) = members::check_add(&known, id, addr)?;
        if !there {
            let answer = self.forwarder.status_at(&addr, STATUS_DEADLINE * 5).await;
            let ours = self.catalog.borrow().cluster_id.clone();
            members::check_answer(answer, id, &addr, &ours)?;
            let known = known.into_iter().collect();
            let command = Command::AddNode { id, addr, known };
            self.commit_to_catalog(command, |c| c.nodes.contains_key(&id))
                .await?
                .ok_or_else(|| self.not_heard("added"))?;
            tracing::info!(
                node = id,
                "node added to the catalog; its replicas are being added"
            );
        }
        self.until_voters(id, true).await
    }

    /// Removes node `id` from the cluster (`members::check_remove`): every replica it holds
    /// goes (to another node, for a topic on some of the nodes), then it leaves the metadata
    /// group. Returns once no group has it as a voter, with
    /// how many groups there are.
    pub async fn remove_node(&self, id: u64) -> Result<usize> {
        let known = self.known_nodes();
        members::check_remove(&known, id)?;
        let known = known.into_iter().collect();
        let command = Command::RemoveNode { id, known };
        let gone = |c: &Catalog| !c.nodes.is_empty() && !c.nodes.contains_key(&id);
        self.commit_to_catalog(command, gone)
            .await?
            .ok_or_else(|| self.not_heard("removed"))?;
        tracing::info!(
            node = id,
            "node removed from the catalog; its replicas are being removed"
        );
        self.until_voters(id, false).await
    }

    fn not_heard(&self, what: &str) -> Error {
        Error::Unavailable(format!(
            "the node was {what} in the catalog but this node has not heard of it within {} \
             ms; ask again to wait for its replicas",
            self.write_timeout.as_millis()
        ))
    }

    /// Waits until the leader of every group with node `id` among its voters (`present`), or of
    /// every group (not `present`: none may keep it), reports the voters the catalog places;
    /// says how far it got every few seconds. The number of groups, or how many are left at
    /// the deadline.
    async fn until_voters(&self, id: u64, present: bool) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + members::MOVE_DEADLINE;
        let mut said = tokio::time::Instant::now();
        loop {
            let catalog = Arc::clone(&self.catalog.borrow());
            let mut wanted = members::wanted_voters(&catalog, META_GROUP, &self.members.ids());
            wanted.retain(|_, voters| !present || voters.contains(&id));
            // The removed node's own view (it may still think it leads) does not count.
            let reports = self.reports(&catalog, (!present).then_some(id)).await;
            let left = members::not_done(&wanted, &reports);
            let Some(first) = left.first() else {
                tracing::info!(
                    node = id,
                    groups = wanted.len(),
                    present,
                    "every group has its new voters"
                );
                return Ok(wanted.len());
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "{} of {} groups do not have their new voters yet (first: {first}); they \
                     change as soon as their leaders can",
                    left.len(),
                    wanted.len()
                )));
            }
            if now >= said + Duration::from_secs(5) {
                said = now;
                tracing::info!(
                    node = id,
                    done = wanted.len() - left.len(),
                    of = wanted.len(),
                    "groups with their new voters"
                );
            }
            tokio::time::sleep(members::VOTERS_RETRY).await;
        }
    }

    /// Every node's report of its groups (this one's included), but `without`'s.
    async fn reports(
        &self,
        catalog: &Catalog,
        without: Option<u64>,
    ) -> Vec<(u64, crate::proto::cluster::StatusResponse)> {
        let me = self.members.node_id;
        let mut asks = tokio::task::JoinSet::new();
        for id in catalog.node_ids(&self.members.ids()) {
            if id != me && Some(id) != without {
                let forwarder = Arc::clone(&self.forwarder);
                asks.spawn(async move { (id, forwarder.status(id, STATUS_DEADLINE).await) });
            }
        }
        let mut reports = vec![(me, self.service.status())];
        while let Some(answer) = asks.join_next().await {
            if let Ok((id, Ok(report))) = answer {
                reports.push((id, report));
            }
        }
        reports
    }

    /// Keeps the voters of every group this node leads as the catalog places its replicas (the
    /// metadata group's: the catalog's nodes), each time the catalog changes and, while a group
    /// anywhere is not there yet, every [`members::VOTERS_RETRY`] (its leader may change).
    async fn keep_voters(self: Arc<Self>, shutdown: CancellationToken) {
        let mut catalog = self.catalog.clone();
        loop {
            let current = Arc::clone(&catalog.borrow_and_update());
            let pending = self.set_voters(&current).await;
            tokio::select! {
                changed = catalog.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(members::VOTERS_RETRY), if pending => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass of [`Cluster::keep_voters`]: whether some group's voters still differ.
    async fn set_voters(&self, catalog: &Catalog) -> bool {
        if catalog.nodes.is_empty() {
            return false; // no node was ever added or removed
        }
        let wanted = members::wanted_voters(catalog, META_GROUP, &self.members.ids());
        let mut groups: Vec<(String, Raft<PartitionRaft>)> =
            vec![(META_GROUP.to_string(), self.meta.clone())];
        groups.extend(self.running().iter().map(|(n, r)| (n.clone(), r.clone())));
        let me = self.members.node_id;
        let mut pending = false;
        // The groups this node leads change side by side (a leaving leader's handovers each
        // wait out a lease), at most CHANGES_AT_ONCE at a time.
        let permits = Arc::new(tokio::sync::Semaphore::new(members::CHANGES_AT_ONCE));
        let mut changes = tokio::task::JoinSet::new();
        for (name, raft) in groups {
            let Some(want) = wanted.get(&name) else {
                continue;
            };
            let (voters, joint, leads) = members::voters_of(&raft, me);
            if voters.is_empty() || (voters == *want && !joint) {
                continue; // not formed here yet, or as it should be
            }
            pending = true;
            if !leads {
                continue; // its leader changes it
            }
            let (want, nodes) = (want.clone(), catalog.nodes.clone());
            let (forwarder, deadline) = (Arc::clone(&self.forwarder), self.write_timeout);
            let permits = Arc::clone(&permits);
            changes.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let changed =
                    members::change_voters(&raft, &name, &want, &nodes, me, &forwarder, deadline);
                if let Err(e) = changed.await {
                    tracing::info!(group = %name, error = %e, "voters not changed yet; trying again");
                }
            });
        }
        while changes.join_next().await.is_some() {}
        pending
    }

    /// Serves the cluster port's `Consume` and `Settle` with `host` (the broker's consumer
    /// groups).
    pub fn serve_groups(&self, host: Arc<dyn crate::replication::service::GroupHost>) {
        self.service.serve_groups(host);
    }

    /// Runs group `name` (a consumer group's) here over `log`, with `members`, unless it runs
    /// already; like a partition's group, it is in the status reports, the catch-up, the
    /// snapshots after a trim and the handover at shutdown.
    pub(super) async fn run_group(
        &self,
        name: &str,
        log: &Arc<Partition>,
        members: &[u64],
        formable: bool,
        first: Option<u64>,
    ) -> Result<Raft<PartitionRaft>> {
        let _joining = self.joining.lock().await;
        if let Some(raft) = self.running().get(name) {
            return Ok(raft.clone());
        }
        let (raft, observed) = self.start_group(name, log, 0, None).await?;
        if formable {
            self.initialize(&raft, name, None, members, first).await?;
        }
        self.service.add(name.to_string(), raft.clone());
        self.observing().insert(name.to_string(), observed);
        self.running().insert(name.to_string(), raft.clone());
        Ok(raft)
    }

    /// Moves the leadership of group `name` (a consumer group's, led here) to member `to`; see
    /// `handover::transfer`.
    pub(super) async fn transfer_led(
        &self,
        name: &str,
        raft: &Raft<PartitionRaft>,
        to: u64,
    ) -> std::result::Result<(u64, u64), handover::TransferError> {
        let (peers, proposals) = (self.forwarder.peers(), self.forwarder.proposals());
        handover::transfer(raft, name, to, peers, &self.elections, proposals).await
    }

    /// Stops group `name` here (its consumer group was deleted).
    pub(super) async fn stop_group(&self, name: &str) {
        let _joining = self.joining.lock().await;
        self.service.remove(name);
        self.observing().remove(name);
        let raft = self.running().remove(name);
        if let Some(raft) = raft
            && let Err(e) = raft.shutdown().await
        {
            tracing::warn!(group = %name, error = %e, "a group did not stop cleanly");
        }
    }

    /// Serves the cluster port's `SendIds` with `sender` (the broker's id check).
    pub fn serve_ids(&self, sender: crate::replication::service::IdSender) {
        self.service.serve_ids(sender);
    }

    /// Serves the cluster port's `Maintain` with `maintainer` (the broker's maintenance).
    pub fn serve_maintenance(&self, maintainer: crate::replication::service::Maintainer) {
        self.service.serve_maintenance(maintainer);
    }

    /// Retention and compaction of group `group`'s partition, which this node holds no replica
    /// of, decided now by a node of `replicas` (`dry_run`: what would be done): its report, as
    /// JSON.
    pub async fn maintain_remote(
        &self,
        group: &str,
        replicas: &[u64],
        dry_run: bool,
    ) -> Result<bytes::Bytes> {
        let answer = self
            .forwarder
            .maintain_remote(group, replicas, dry_run, self.write_timeout)
            .await
            .map_err(|s| Error::no_holder_answered(group, replicas, s.message()))?;
        Ok(answer.report)
    }

    /// Partition `partition` (group `group`), which this node holds no replica of, as a node of
    /// `replicas` describes it.
    pub async fn describe_remote(
        &self,
        group: &str,
        partition: u32,
        replicas: &[u64],
    ) -> Result<PartitionDescription> {
        let req = crate::proto::cluster::ReadRequest {
            group: group.to_string(),
            ..Default::default()
        };
        let state = self
            .forwarder
            .read_remote(replicas, req, STATUS_DEADLINE)
            .await
            .map_err(|s| Error::no_holder_answered(group, replicas, s.message()))?;
        let mut replicas = replicas.to_vec();
        replicas.sort_unstable(); // as a member lists its group's voters
        Ok(PartitionDescription {
            partition,
            first_offset: state.log_start,
            next_offset: state.high_water,
            size_bytes: state.size_bytes,
            segments: state.segments,
            held_bytes: 0,
            held_by: None,
            leader: state.leader,
            replicas,
        })
    }

    /// Joins the group of every partition of `topic` this node holds and does not run yet, as
    /// the catalog places them. `at_start`: before the catalog is known again, only the groups
    /// this node was a member of (its vote or entries are in the partition's directory), and
    /// none is formed: the catalog says later which others it holds, and with whom.
    async fn join_topic(&self, topic: &Arc<Topic>, at_start: bool) -> Result<()> {
        let _joining = self.joining.lock().await;
        for handle in &topic.partitions {
            let group = topic.group_name(handle.id);
            if handle.replica.get().is_some() {
                continue;
            }
            let members = if at_start {
                if !was_member(handle) {
                    continue;
                }
                None
            } else {
                let members = self.replicas_of(topic, handle.id);
                if !members.contains(&self.members.node_id) {
                    handle.remote.set(Some(members));
                    continue;
                }
                Some(members)
            };
            let keep = topic.config.delete_retention_ms;
            let ids = self.id_hooks(topic, handle.id);
            let (raft, observed) = self.start_group(&group, &handle.log, keep, ids).await?;
            if let Some(members) = members.filter(|_| self.formable(topic)) {
                self.initialize(&raft, &group, topic.config.formed_by, &members, None)
                    .await?;
            }
            self.service.add(group.clone(), raft.clone());
            let log = GroupLog {
                log: Arc::clone(&handle.log),
                high_water: handle.high_water.clone(),
            };
            self.service.add_log(group.clone(), log);
            let _ = handle.replica.set(raft.clone());
            if handle.remote.get().is_some() {
                self.serve_once_voter(handle, &raft);
            }
            self.observing().insert(group.clone(), observed);
            self.running().insert(group, raft);
        }
        Ok(())
    }

    /// A replica moving here (the catalog placed it on this node, which served the partition
    /// from its nodes until now): served by those nodes, not by this catching-up copy, until
    /// its group's leader makes this node a voter (within 64 entries of the leader).
    fn serve_once_voter(&self, handle: &Arc<PartitionHandle>, raft: &Raft<PartitionRaft>) {
        let (handle, mut metrics, me) = (Arc::clone(handle), raft.metrics(), self.members.node_id);
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            let voter = metrics.wait_for(|m| {
                m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == me)
            });
            // The broker waits for its tasks before it stops the groups: not for this one.
            tokio::select! {
                voted = voter => if voted.is_ok() {
                    handle.remote.set(None);
                },
                () = stopping.cancelled() => {}
            }
        });
    }

    /// How a replica of `topic`'s partition `partition` keeps the topic's id index (when it
    /// has one): it learns the ids of every entry it applies, and lets go of the ids it
    /// claimed as leader in a term whose entries can no longer be committed.
    fn id_hooks(&self, topic: &Topic, partition: u32) -> Option<(OnIds, OnApplied)> {
        let dedup = topic.dedup.clone()?;
        let logs: Vec<Arc<Partition>> = topic
            .partitions
            .iter()
            .map(|h| Arc::clone(&h.log))
            .collect();
        let (name, tasks) = (Arc::clone(&topic.name), self.tasks.clone());
        let data = Arc::clone(self.topics.data());
        let learner = Arc::clone(&dedup);
        let on_ids: OnIds = Box::new(move |base, batch| {
            let stored = match ids_in_entry(partition, base, batch) {
                Ok(stored) => stored,
                Err(why) => {
                    tracing::error!(topic = %name, partition, base, why, "an applied entry's ids do not parse; they are not indexed");
                    return;
                }
            };
            let ends = || logs.iter().map(|l| l.high_water()).collect();
            if learner.learn(&stored, ends) {
                write_later(&learner, &name, &tasks, Arc::clone(&data));
            }
        });
        let on_applied: OnApplied = Box::new(move |term| dedup.applied_term(partition, term));
        Some((on_ids, on_applied))
    }

    async fn start_group(
        &self,
        group: &str,
        log: &Arc<Partition>,
        delete_retention_ms: u64,
        ids: Option<(OnIds, OnApplied)>,
    ) -> Result<(Raft<PartitionRaft>, Observed)> {
        let (partition, io) = (Arc::clone(log), Arc::clone(&self.io));
        let (store, sm, reader) = blocking(move || {
            let dir = partition.dir().to_path_buf();
            let log = RaftLog::on(partition, Arc::clone(&io))?;
            let damaged = |e| Error::Internal(format!("{}: {e}", dir.display()));
            let sm = StateMachine::open(&dir, io, log.reader()).map_err(damaged)?;
            let reader = log.reader();
            let store = LogStore::new(log).linked(sm.installed()).map_err(damaged)?;
            Ok((store, sm, reader))
        })
        .await?;
        let installs = sm.installs();
        let (trimmed, name) = (self.trimmed.clone(), group.to_string());
        let (compacted, partition) = (self.compacted.clone(), Arc::clone(log));
        let sm = sm
            .on_trim(Box::new(move || {
                let _ = trimmed.send(name.clone());
            }))
            .on_compact(Box::new(move || {
                let _ = compacted.send((Arc::clone(&partition), delete_retention_ms));
            }));
        let sm = match ids {
            Some((on_ids, on_applied)) => sm.on_apply(on_ids, on_applied),
            None => sm,
        };
        let raft = Raft::new(
            self.members.node_id,
            self.elections.config(group),
            GrpcNetwork::new(group, self.forwarder.peers().clone()),
            store,
            sm,
        )
        .await
        .map_err(|e| Error::Internal(format!("group {group}: {e}")))?;
        let first_term = raft.metrics().borrow().current_term;
        let observed = Observed {
            reader,
            installs,
            first_term,
        };
        Ok((raft, observed))
    }

    fn observing(&self) -> std::sync::MutexGuard<'_, HashMap<String, Observed>> {
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every partition group this node runs, as `/metrics` shows it (reads the log for the
    /// age of each lagging follower's oldest missing entry: blocking work on the blocking
    /// pool).
    pub async fn raft_samples(&self) -> Vec<RaftSample> {
        let groups: Vec<(String, Raft<PartitionRaft>, Observed)> = {
            let running = self.running();
            let observed = self.observing();
            running
                .iter()
                .filter_map(|(g, r)| Some((g.clone(), r.clone(), observed.get(g)?.clone())))
                .collect()
        };
        let now = super::clock::now_ms();
        let sampled = blocking(move || {
            Ok(groups
                .into_iter()
                .filter_map(|(g, raft, o)| sample(&g, &raft, &o, now))
                .collect())
        })
        .await;
        sampled.unwrap_or_default()
    }

    /// Every partition group this node runs, by name.
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Raft<PartitionRaft>>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the snapshot of each group that applied a retention point; openraft then purges
    /// its log up to it (on a leader, once no follower still needs those entries: a follower
    /// further behind gets the snapshot instead).
    async fn take_snapshots(
        self: Arc<Self>,
        mut trims: mpsc::UnboundedReceiver<String>,
        shutdown: CancellationToken,
    ) {
        loop {
            let group = tokio::select! {
                g = trims.recv() => match g { Some(g) => g, None => return },
                () = shutdown.cancelled() => return,
            };
            let raft = self.running().get(&group).cloned();
            // The ids of the messages about to be purged go into the id index's files first:
            // after a restart this replica applies again only the entries after the snapshot.
            let topic = parse_group_name(&group).and_then(|(t, _)| self.topics.get(t));
            if let Some(topic) = topic.filter(|t| t.dedup.is_some())
                && let Err(e) = blocking(move || topic.persist_ids()).await
            {
                tracing::warn!(%group, error = %e, "cannot write the id index before a purge; the snapshot waits for the next retention point");
                continue;
            }
            // A group applying entries as it starts is not listed yet: its first Send or the
            // next retention point takes the snapshot then.
            if let Some(raft) = raft
                && let Err(e) = raft.trigger().snapshot().await
            {
                tracing::warn!(%group, error = %e, "cannot take the snapshot at a retention point");
            }
        }
    }

    /// Retention of a partition: proposes that every replica drops the messages below `offset`
    /// (a segment's base offset the retention rules chose here). Periodically only the
    /// partition's leader decides; `on_demand` (the `Compact` call, any node) this node decides
    /// from its own copy of the committed log and proposes through the leader. True once
    /// committed and applied here; false when `offset` is not above what readers already cannot
    /// see, or not committed.
    pub async fn trim(
        &self,
        topic: &Topic,
        handle: &PartitionHandle,
        offset: u64,
        on_demand: bool,
    ) -> Result<bool> {
        if !(on_demand || self.leads(handle)) {
            return Ok(false);
        }
        let Some(raft) = handle.replica.get() else {
            return Ok(false);
        };
        self.trim_log(raft, &topic.group_name(handle.id), &handle.log, offset)
            .await
    }

    /// Proposes to group `group` (run here by `raft`, over `log`) that every replica drops the
    /// records below `offset` (see [`Cluster::trim`]): true once committed and applied here.
    pub(super) async fn trim_log(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        log: &Arc<Partition>,
        offset: u64,
    ) -> Result<bool> {
        if offset <= log.log_start() || offset > log.high_water() {
            return Ok(false);
        }
        // The entry holding the message just below: the snapshot point every replica takes.
        let l = Arc::clone(log);
        let batches = blocking(move || Ok(l.read(offset - 1, 64 << 10)?)).await?;
        let holding = batches
            .iter()
            .map(|b| *b.header())
            .find(|h| !h.is_control() && h.base_offset < offset && h.last_offset() + 1 >= offset);
        let Some(header) = holding else {
            return Ok(false);
        };
        let Some(upto) = header.raft.filter(|_| header.last_offset() + 1 == offset) else {
            return Ok(false); // not a boundary between entries (retention cuts at segments)
        };
        let command = crate::replication::GroupCommand::Trim {
            upto_term: upto.term,
            upto_index: upto.index,
            offset,
        };
        Ok(self.propose(raft, group, command).await
            && self
                .applied_here(Some(raft), || log.log_start() >= offset)
                .await)
    }

    /// Key compaction of a partition: proposes that every replica compacts the messages below
    /// the start of this node's active segment as of `now_ms`, when that point is past the last
    /// one. Who decides: as for [`Cluster::trim`]. True once committed and applied here.
    pub async fn compact(
        &self,
        topic: &Topic,
        handle: &PartitionHandle,
        now_ms: i64,
        on_demand: bool,
    ) -> bool {
        let log = &handle.log;
        let Some(&below) = log.segment_bases().last() else {
            return false;
        };
        let moved = log.compaction_point().is_none_or(|p| p.below < below);
        if !moved
            || below <= log.log_start()
            || below > log.high_water()
            || !(on_demand || self.leads(handle))
        {
            return false;
        }
        let command = crate::replication::GroupCommand::Compact { below, now_ms };
        let applied = || log.compaction_point().is_some_and(|p| p.below >= below);
        let Some(raft) = handle.replica.get() else {
            return false;
        };
        self.propose(raft, &topic.group_name(handle.id), command)
            .await
            && self.applied_here(Some(raft), applied).await
    }

    fn leads(&self, handle: &PartitionHandle) -> bool {
        handle.replica.get().is_some_and(|raft| {
            raft.metrics().borrow().current_leader == Some(self.members.node_id)
        })
    }

    /// Proposes a command to a group run here, through its leader; true once committed.
    async fn propose(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        command: crate::replication::GroupCommand,
    ) -> bool {
        let proposal = crate::replication::Proposal::Command(command);
        match self
            .forwarder
            .propose(raft, group, proposal, self.write_timeout)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(%group, ?command, error = %e, "command not committed");
                false
            }
        }
    }

    /// Waits, up to the write timeout, until `done` (a command committed through the leader
    /// is applied here soon after: the leader tells this node the new commit point). Looked at
    /// again each time the partition's group reports progress (its metrics change once an
    /// entry is applied), not on a timer.
    async fn applied_here(
        &self,
        raft: Option<&Raft<PartitionRaft>>,
        done: impl Fn() -> bool,
    ) -> bool {
        let Some(raft) = raft else {
            return done();
        };
        let mut progress = raft.metrics();
        let wait = async {
            while !done() {
                if progress.changed().await.is_err() {
                    return done(); // the group stopped
                }
            }
            true
        };
        tokio::time::timeout(self.write_timeout, wait)
            .await
            .unwrap_or(false)
    }

    /// Brings this node's topics in line with the catalog each time it changes (and again
    /// every second while that fails).
    async fn follow_catalog(self: Arc<Self>, shutdown: CancellationToken) {
        let mut catalog = self.catalog.clone();
        loop {
            let current = Arc::clone(&catalog.borrow_and_update());
            // Nodes added since: reached at the catalog's address, and let in (one whose
            // address does not resolve yet is tried again with the topics, every second).
            self.forwarder.peers().learn(&current.nodes);
            let admitted = self.admitted.admit(&current.nodes).await;
            let failed = match self.reconcile(&current).await.and(admitted) {
                Ok(()) => false,
                Err(e) => {
                    tracing::error!(error = %e, "cannot bring this node's topics in line with \
                        the catalog; trying again");
                    true
                }
            };
            tokio::select! {
                changed = catalog.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(STATUS_DEADLINE), if failed => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Deletes, here, every topic the catalog says is gone, then creates every topic of the
    /// catalog this node lacks and joins its groups.
    async fn reconcile(&self, catalog: &Catalog) -> Result<()> {
        let _one_at_a_time = self.reconciling.lock().await;
        self.remove_stale(catalog).await?;
        for (name, entry) in &catalog.topics {
            let topic = match self.topics.get(name) {
                Some(t) => t,
                None => {
                    let created = self
                        .topics
                        .create_local(name, entry.config.clone(), &entry.first_offsets)
                        .await;
                    match created {
                        Ok(()) | Err(Error::Storage(storage::Error::TopicExists(_))) => {}
                        Err(e) => return Err(e),
                    }
                    self.topics.existing(name)?
                }
            };
            self.join_topic(&topic, false).await?;
        }
        Ok(())
    }

    /// Deletes, here, every topic the catalog says is gone (deleted, or created again since):
    /// its groups stop, its files go.
    async fn remove_stale(&self, catalog: &Catalog) -> Result<()> {
        for topic in self.topics.open_topics() {
            if !catalog.is_stale(&topic.name, topic.config.incarnation) {
                continue;
            }
            let _joining = self.joining.lock().await;
            for handle in &topic.partitions {
                let group = topic.group_name(handle.id);
                self.service.remove(&group);
                self.observing().remove(&group);
                let raft = self.running().remove(&group);
                if let Some(raft) = raft
                    && let Err(e) = raft.shutdown().await
                {
                    tracing::warn!(%group, error = %e, "a deleted topic's group did not stop cleanly");
                }
            }
            let removed = match self.topics.remove_local(&topic.name).await {
                Ok(r) => r,
                Err(Error::Storage(storage::Error::TopicNotFound(_))) => continue,
                Err(e) => return Err(e),
            };
            let topics = Arc::clone(&self.topics);
            blocking(move || topics.delete_files(&removed)).await?;
            tracing::info!(topic = %topic.name, incarnation = topic.config.incarnation,
                "topic deleted in the cluster: deleted here");
        }
        Ok(())
    }

    /// Deletes a topic in the cluster: the metadata group's leader commits its deletion, and
    /// every node deletes its copy once it applies that (a node that is down does so when it
    /// is back, before it could serve the topic's old messages again). Returns once this node
    /// has deleted its own.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let known = self
            .catalog
            .borrow()
            .topics
            .get(name)
            .map(|t| (t.config.incarnation, t.config.partitions));
        let Some((incarnation, partitions)) = known else {
            return Err(storage::Error::TopicNotFound(name.to_string()).into());
        };
        let command = Command::DeleteTopic {
            name: name.to_string(),
            incarnation,
        };
        let applied = self
            .commit_to_catalog(command, |c| c.is_stale(name, incarnation))
            .await?;
        match applied {
            Some(c) => {
                self.reconcile(&c).await?;
                let everyone = self.node_ids();
                let groups: Vec<(String, Vec<u64>)> = (0..partitions)
                    .map(|p| (group_name(name, p, incarnation), everyone.clone()))
                    .collect();
                self.until_peers(&groups, false).await;
                Ok(())
            }
            None => Err(Error::Unavailable(format!(
                "topic {name:?} was deleted in the cluster but this node has not heard of it \
                 within {} ms; it will go here once it does",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// Commits `command` in the metadata group (through its leader), then waits, up to the
    /// write timeout, until this node's catalog shows `done` (`None` when it does not in time).
    pub(super) async fn commit_to_catalog(
        &self,
        command: Command,
        done: impl Fn(&Catalog) -> bool,
    ) -> Result<Option<Arc<Catalog>>> {
        let proposal = command
            .to_proposal(super::clock::now_ms())
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.forwarder
            .propose(
                &self.meta,
                META_GROUP,
                crate::replication::Proposal::Records(proposal),
                self.write_timeout,
            )
            .await
            .map_err(|e| Error::not_written("the metadata group", e))?;
        let mut catalog = self.catalog.clone();
        let applied = tokio::time::timeout(self.write_timeout, async {
            catalog.wait_for(|c| done(c)).await.map(|c| Arc::clone(&c))
        })
        .await;
        Ok(applied.ok().and_then(|r| r.ok()))
    }

    /// Waits, up to the write timeout, until every other node that answers runs those of
    /// `groups` it holds (each group with its replicas' nodes), each with a known leader
    /// (`present`), or none of them: a topic created or deleted through this node is so on
    /// every running node when the call returns. A node that does not answer catches up when
    /// it is back.
    async fn until_peers(&self, groups: &[(String, Vec<u64>)], present: bool) {
        let me = self.members.node_id;
        let until = tokio::time::Instant::now() + self.write_timeout;
        for id in self.node_ids().into_iter().filter(|&id| id != me) {
            while tokio::time::Instant::now() < until {
                let Ok(report) = self.forwarder.status(id, STATUS_DEADLINE).await else {
                    break;
                };
                let runs = |g: &String| {
                    report
                        .groups
                        .iter()
                        .any(|r| &r.group == g && (!present || r.leader.is_some()))
                };
                let held = groups.iter().filter(|(_, on)| on.contains(&id));
                if held.map(|(g, _)| g).all(|g| runs(g) == present) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Brings into the catalog every topic this node converted from its single-node data
    /// ([`super::upgrade`]), with the offset each partition starts at, unless the catalog has
    /// it already; at every start, since the node may have stopped before it was committed.
    /// A name the cluster used before keeps the cluster's topic: this node's data for it then
    /// stays only in `pre-cluster/`, and it says so.
    async fn adopt(self: Arc<Self>, shutdown: CancellationToken) {
        let me = self.members.node_id;
        let mine: Vec<Arc<Topic>> = self
            .topics
            .open_topics()
            .into_iter()
            .filter(|t| t.config.formed_by == Some(me))
            .collect();
        for topic in mine {
            let name = topic.name.to_string();
            loop {
                let (known, gone) = {
                    let catalog = self.catalog.borrow();
                    let known = catalog.topics.get(&name).map(|t| t.config.formed_by);
                    (known, catalog.is_stale(&name, topic.config.incarnation))
                };
                // Deleted in the cluster since it was adopted (this node then deletes its copy).
                if gone {
                    break;
                }
                match known {
                    Some(Some(n)) if n == me => break,
                    Some(_) => {
                        tracing::error!(topic = %name, "the cluster had a topic of this name \
                            before this node could bring its single-node data into it: that \
                            data stays in {}/ only", PRE_CLUSTER);
                        break;
                    }
                    None => {}
                }
                let command = Command::CreateTopic {
                    name: name.clone(),
                    config: topic.config.clone(),
                    replicas: self.node_ids(),
                    first_offsets: topic.partitions.iter().map(|h| h.log.log_start()).collect(),
                    // Every node: the data starts on this one, whatever the factor.
                    placement: Vec::new(),
                };
                let committed = self
                    .commit_to_catalog(command, |c| {
                        c.topics.contains_key(&name) || c.is_stale(&name, topic.config.incarnation)
                    })
                    .await;
                if let Ok(Some(_)) = committed {
                    continue;
                }
                if let Err(e) = committed {
                    tracing::warn!(topic = %name, error = %e, "cannot bring this node's \
                        single-node topic into the cluster yet; trying again");
                }
                tokio::select! {
                    () = tokio::time::sleep(STATUS_DEADLINE) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }

    /// Serves the topic creations of this node's `Topics`: proposed to the metadata group, then
    /// created here.
    async fn serve_creations(
        self: Arc<Self>,
        mut requests: mpsc::Receiver<CreateRequest>,
        shutdown: CancellationToken,
    ) {
        loop {
            let request = tokio::select! {
                r = requests.recv() => match r { Some(r) => r, None => return },
                () = shutdown.cancelled() => return,
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let outcome = this.create_topic(&request.name, request.config).await;
                let _ = request.done.send(outcome);
            });
        }
    }

    async fn create_topic(&self, name: &str, mut config: storage::TopicConfig) -> Result<()> {
        config.formed_by = None;
        let nodes = self.node_ids();
        // The cluster's setting, as far as there are nodes (fewer for a while, with a node
        // removed and its replacement not added yet); a topic's own is checked as given.
        let factor = config.replication_factor.unwrap_or_else(|| {
            self.members
                .replication_factor
                .min(nodes.len().max(1) as u32)
        });
        if factor == 0 || factor as usize > nodes.len() {
            return Err(storage::Error::InvalidConfig(format!(
                "replication_factor = {factor} must be between 1 and the number of nodes ({})",
                nodes.len()
            ))
            .into());
        }
        config.replication_factor = Some(factor);
        let turn = {
            let catalog = self.catalog.borrow();
            if catalog.topics.contains_key(name) {
                return Err(storage::Error::TopicExists(name.to_string()).into());
            }
            catalog.topics.len() + catalog.deleted.len()
        };
        let placement = place(&nodes, config.partitions, factor as usize, turn);
        let command = Command::CreateTopic {
            name: name.to_string(),
            config,
            replicas: nodes,
            first_offsets: Vec::new(),
            placement,
        };
        // Committed; created here once this node has applied it too (at once on the leader).
        let applied = self
            .commit_to_catalog(command, |c| c.topics.contains_key(name))
            .await?;
        match applied {
            Some(c) => {
                self.reconcile(&c).await?;
                // Ready for Sends when the call returns: each partition's group has elected
                // its first leader, and every node of its replicas that answers runs it and
                // knows that leader.
                if let Some(topic) = self.topics.get(name) {
                    for handle in &topic.partitions {
                        if let Some(raft) = handle.replica.get() {
                            wait_for_leader(raft, self.write_timeout).await;
                        }
                    }
                    let groups: Vec<(String, Vec<u64>)> = topic
                        .partitions
                        .iter()
                        .map(|h| (topic.group_name(h.id), self.replicas_of(&topic, h.id)))
                        .collect();
                    self.until_peers(&groups, true).await;
                }
                Ok(())
            }
            None => Err(Error::Unavailable(format!(
                "topic {name:?} was created in the cluster but this node has not heard of it \
                 within {} ms; it will open here once it does",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// Moves the leadership of partition `partition` of `topic` to node `to`, at the node
    /// leading it: the leader and its term once `to` leads.
    pub async fn transfer_leader(
        &self,
        topic: &Topic,
        partition: u32,
        to: u64,
    ) -> Result<(u64, u64)> {
        let replicas = self.replicas_of(topic, partition);
        if !replicas.contains(&to) {
            return Err(Error::InvalidArgument(format!(
                "node {to} holds no replica of {:?}/{partition} (its replicas: {replicas:?})",
                topic.name
            )));
        }
        let group = topic.group_name(partition);
        let leader = topic.partitions[partition as usize]
            .replica
            .get()
            .and_then(|raft| raft.metrics().borrow().current_leader);
        let deadline = self.write_timeout;
        leaders::move_leader(&self.forwarder, &group, leader, &replicas, to, deadline).await
    }

    /// Spreads partition leaders across the nodes that answer (see `balance::plan`): with
    /// `dry_run`, only says which moves it would make.
    pub async fn rebalance_leaders(&self, dry_run: bool) -> Result<Rebalanced> {
        let (nodes, groups) = leaders::placement(&self.status().await);
        let moves = crate::replication::balance::plan(&nodes, &groups);
        if dry_run {
            let planned = leaders::after_moves(&groups, &moves);
            let done = moves.into_iter().map(|m| (m, None)).collect();
            return Ok(leaders::rebalanced(done, &nodes, &planned));
        }
        let deadline = self.write_timeout;
        let done = leaders::make_moves(&self.forwarder, &groups, moves, deadline).await?;
        let (_, after) = leaders::placement(&self.status().await);
        Ok(leaders::rebalanced(done, &nodes, &after))
    }

    /// Every `interval`, while this node leads the metadata group, rebalances the partition
    /// leaders (moving none when they are spread already).
    async fn balance_leaders(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let me = self.members.node_id;
            if self.meta.metrics().borrow().current_leader != Some(me) {
                continue;
            }
            match self.rebalance_leaders(false).await {
                Ok(r) if r.moves.is_empty() => {}
                Ok(r) => {
                    let failed = r.moves.iter().filter(|m| m.error.is_some()).count();
                    tracing::info!(moves = r.moves.len(), failed, leaders = ?r.leaders,
                        "partition leaders rebalanced");
                }
                Err(e) => tracing::warn!(error = %e, "the leader balancer could not run"),
            }
        }
    }

    /// Until the cluster has an id: draws one whenever this node leads the metadata group
    /// (the first commit wins); then, and whenever the catalog carries it, records it in
    /// this node's `node.json` and answers it to peers asking who this node is.
    async fn found(self: Arc<Self>, mut identity: identity::Identity, shutdown: CancellationToken) {
        let me = self.members.node_id;
        let mut catalog = self.catalog.clone();
        let mut leading = self.meta.metrics();
        let mut failed = false;
        loop {
            let known = catalog.borrow_and_update().cluster_id.clone();
            if !known.is_empty() {
                self.service.set_cluster_id(&known);
                if identity.cluster_id.as_deref() != Some(&known) {
                    identity.cluster_id = Some(known);
                    let (dir, io, id) = (self.dir.clone(), Arc::clone(&self.io), identity.clone());
                    if let Err(e) =
                        blocking(move || identity::write_identity(&dir, &id, io.as_ref())).await
                    {
                        tracing::error!(error = %e, "cannot record the cluster's id");
                    }
                }
                return;
            }
            if leading.borrow_and_update().current_leader == Some(me) {
                let command =
                    identity::new_cluster_id().map(|cluster_id| Command::Found { cluster_id });
                let founded = match command {
                    Ok(c) => {
                        self.commit_to_catalog(c, |c| !c.cluster_id.is_empty())
                            .await
                    }
                    Err(e) => Err(e),
                };
                failed = founded.is_err();
                if let Err(e) = founded {
                    tracing::warn!(error = %e, group = META_GROUP, "the cluster's id was not committed; trying again");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(STATUS_DEADLINE), if failed => {}
                changed = catalog.changed() => if changed.is_err() { return },
                changed = leading.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Stops every group (the partitions are closed by the broker afterwards) and the
    /// metadata log.
    pub async fn shutdown(&self) {
        let mut groups: Vec<(String, Raft<PartitionRaft>)> = self.running().drain().collect();
        groups.push((META_GROUP.to_string(), self.meta.clone()));
        for (name, _) in &groups {
            self.service.remove(name);
        }
        // The groups this node leads go to the others first (see `handover`), all at once: a
        // handover mostly waits for a follower's last entries and two peers' answers.
        let mut handing = tokio::task::JoinSet::new();
        for (name, raft) in groups {
            let peers = self.forwarder.peers().clone();
            let proposals = Arc::clone(self.forwarder.proposals());
            let elections = self.elections.clone();
            handing.spawn(async move {
                let me = raft.metrics().borrow().id;
                if raft.metrics().borrow().current_leader == Some(me) {
                    let busy = || proposals.busy(&name);
                    if let Some(to) =
                        handover::stop_handing_over(&raft, &name, &peers, &elections, busy).await
                    {
                        tracing::info!(group = %name, to, "leadership handed over");
                    }
                } else if let Err(e) = raft.shutdown().await {
                    tracing::warn!(group = %name, error = %e, "a group did not stop cleanly");
                }
            });
        }
        while handing.join_next().await.is_some() {}
        self.port_stop.cancel();
        self.port_tasks.close();
        // Peers close their connections once they see the GOAWAY; one still reading a long
        // `Read` is not waited for past a write's timeout.
        if tokio::time::timeout(self.write_timeout, self.port_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("the cluster port's connections did not close in time");
        }
        let meta_log = Arc::clone(&self.meta_log);
        if let Err(e) = blocking(move || Ok(meta_log.close()?)).await {
            tracing::error!(error = %e, "the metadata log did not close cleanly");
        }
    }
}

/// One group as `/metrics` shows it, read at `now_ms`.
fn sample(
    group: &str,
    raft: &Raft<PartitionRaft>,
    o: &Observed,
    now_ms: i64,
) -> Option<RaftSample> {
    let (topic, partition) = parse_group_name(group)?;
    let m = raft.metrics().borrow().clone();
    let leader = m.current_leader == Some(m.id);
    let last_log_index = m.last_log_index.unwrap_or(0);
    let applied_index = m.last_applied.map_or(0, |l| l.index);
    let mut followers = Vec::new();
    let mut commit_index = applied_index;
    if leader && let Some(replication) = &m.replication {
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut held: Vec<u64> = voters
            .iter()
            .map(|v| match replication.get(v) {
                _ if *v == m.id => last_log_index,
                Some(matched) => matched.map_or(0, |l| l.index),
                None => 0,
            })
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(&majority) = held.get(voters.len() / 2) {
            commit_index = majority;
        }
        for (&node, matched) in replication.iter().filter(|(n, _)| **n != m.id) {
            let matched = matched.map_or(0, |l| l.index);
            let behind = last_log_index.saturating_sub(matched);
            let age = if behind == 0 {
                0.0
            } else {
                // The oldest entry it lacks: its first record's time (or the oldest held).
                let oldest = o
                    .reader
                    .entries(matched + 1, last_log_index + 1, 1)
                    .ok()
                    .and_then(|b| b.first().map(|b| b.header().first_timestamp));
                oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0)
            };
            followers.push((node, behind, age));
        }
    }
    Some(RaftSample {
        topic: topic.to_string(),
        partition,
        term: m.current_term,
        leader,
        has_leader: m.current_leader.is_some(),
        last_log_index,
        commit_index,
        applied_index,
        elections: m.current_term.saturating_sub(o.first_term),
        snapshot_installs: o.installs.load(std::sync::atomic::Ordering::Relaxed),
        followers,
    })
}

/// Whether this node took part in the partition's group before: it saved a vote (every member
/// does on its first election or first entries) or holds entries (a founder that formed the
/// group). A partition this node holds no replica of has neither: its log is an empty segment.
fn was_member(handle: &PartitionHandle) -> bool {
    let stats = handle.log.stats();
    handle.log.dir().join(storage::raft_log::FILE_NAME).exists()
        || stats.segments > 1
        || stats.active_segment_bytes > storage::segment::LOG_HEADER_LEN
}

/// Forms a group with `voters` as its first members (its first entry, the same on every
/// founder); a group another founder formed first needs nothing more.
async fn form(
    raft: &Raft<PartitionRaft>,
    voters: BTreeMap<u64, BasicNode>,
    group: &str,
) -> Result<()> {
    match raft.initialize(voters).await {
        Ok(()) => Ok(()),
        // Another member's first entry reached this one first: the group is formed.
        Err(openraft::error::RaftError::APIError(
            openraft::error::InitializeError::NotAllowed(_),
        )) => Ok(()),
        Err(e) => Err(Error::Internal(format!("group {group}: {e}"))),
    }
}

/// A random number below `n` (seeded by the process's random hasher keys).
fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

/// The cluster port under mutual TLS: a connection from a peer's address whose certificate
/// (signed by `tls.client_ca_file`, checked in the handshake) names a peer's host is served;
/// any other is closed, and said in the log. Handshakes run apart, at most 5 s each.
async fn accept_peers_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    admitted: Arc<members::Admitted>,
    accepted: mpsc::Sender<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
    shutdown: CancellationToken,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, from)) = conn else { continue };
        if !from_peer(&stream, &admitted) {
            continue;
        }
        let (acceptor, hosts, accepted) =
            (acceptor.clone(), Arc::clone(&admitted), accepted.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream));
            let tls = match handshake.await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%from, error = %e, "cluster port: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%from, "cluster port: no TLS handshake within 5 s, closed");
                    return;
                }
            };
            let names_a_peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .is_some_and(|cert| {
                    crate::auth::tls::certificate_hosts(cert)
                        .iter()
                        .any(|h| hosts.host(h))
                });
            if !names_a_peer {
                tracing::warn!(%from, "cluster port: the certificate names no peer's host \
                    (cluster.peers), closed");
                return;
            }
            let _ = accepted.send(Ok(tls)).await;
        });
    }
}

/// Whether a connection to the cluster port comes from a peer's address; others are closed
/// at once, and said in the log. A peer's is set to send without delay: with Nagle's
/// algorithm, the last frames of an answer waited for the peer's delayed ACK of the first
/// (a lone producer's p99.9 was 44 ms in a cluster, 1.6 ms on one node).
fn from_peer(stream: &tokio::net::TcpStream, peers: &members::Admitted) -> bool {
    match stream.peer_addr() {
        Ok(addr) if peers.ip(addr.ip()) => {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(from = %addr, error = %e, "cluster port: cannot set TCP_NODELAY");
            }
            true
        }
        Ok(addr) => {
            tracing::warn!(from = %addr, "cluster port: connection from an address that is not a peer's, closed");
            false
        }
        Err(_) => false,
    }
}

/// Compacts each partition that applied a compaction point to it, one at a time, as soon as it
/// is applied (on every replica alike; the maintenance pass does it again if this failed).
async fn compact_replicas(
    mut due: mpsc::UnboundedReceiver<(Arc<Partition>, u64)>,
    shutdown: CancellationToken,
) {
    loop {
        let (partition, keep) = tokio::select! {
            d = due.recv() => match d { Some(d) => d, None => return },
            () = shutdown.cancelled() => return,
        };
        let dir = partition.dir().to_path_buf();
        let done = blocking(move || Ok(partition.compact_to_point(keep, false)?)).await;
        if let Err(e) = done {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot compact to the compaction point; \
                the next maintenance pass tries again");
        }
    }
}
