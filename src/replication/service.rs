//! Raft's messages from other nodes (`sluice.cluster.v1.Raft`, the cluster port): the receiving
//! side, handing each message to the group it names; and the proposals other nodes forward to
//! the groups this node leads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::Raft;
use tonic::{Request, Response, Status};

use super::elections::Elections;
use super::handover::{self, TransferError};
use super::peers::Peers;
use super::reads::GroupLog;
use super::status;
use super::types::{PartitionRaft, Proposal};
use super::wire;
use super::wire::MAX_MESSAGE_BYTES;
use super::write::{NOT_PROPOSED_METADATA, Proposals, WriteError, known_leader};
use crate::proto::cluster as pb;
use crate::storage::EncodedBatch;

/// Applies retention and compaction to a group's partition now (`dry_run`: reports only), for
/// the cluster port's `Maintain`; its report as JSON, or why not. Set by the broker, which owns
/// maintenance.
pub type Maintainer = Arc<
    dyn Fn(String, bool) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>
        + Send
        + Sync,
>;

/// Runs a `SendIds` here: the id check and the proposal of a batch of messages with ids to a
/// group this node leads, answering each message's position. Refused with
/// [`WriteError::NoLeader`], nothing claimed or proposed, by a node that does not lead the
/// group. Set by the broker, which owns the id index.
pub type IdSender = Arc<
    dyn Fn(
            String,
            bytes::Bytes,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<pb::Placement>, WriteError>> + Send>>
        + Send
        + Sync,
>;

/// A relayed member's deliveries (the cluster port's `Consume`).
pub type ConsumeStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send>>;

/// Serves the cluster port's `Consume` and `Settle`: consumer groups this node leads. Set by
/// the broker, which owns consumer groups. A node that does not lead the group answers
/// `UNAVAILABLE`, so that the caller asks the next node.
pub trait GroupHost: Send + Sync {
    fn consume(
        &self,
        request: pb::ConsumeRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<ConsumeStream, Status>> + Send + '_>>;

    fn settle(
        &self,
        request: pb::SettleRequest,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<pb::SettleResponse, Status>> + Send + '_>>;

    fn administer(
        &self,
        request: pb::AdministerGroupRequest,
    ) -> std::pin::Pin<
        Box<dyn Future<Output = Result<pb::AdministerGroupResponse, Status>> + Send + '_>,
    >;
}

/// The Raft groups this node takes part in, by name (`<topic>/<partition>`).
#[derive(Clone)]
pub struct RaftService {
    groups: Arc<RwLock<HashMap<String, Raft<PartitionRaft>>>>,
    /// The logs of the partition groups, for nodes that hold no replica of them.
    logs: Arc<RwLock<HashMap<String, GroupLog>>>,
    /// How long a forwarded proposal may wait to be committed.
    write_timeout: Duration,
    /// Where the peers are, to name a leader in a refusal.
    peers: Peers,
    /// Forwarded proposals join this node's own (see [`Proposals`]).
    proposals: Arc<Proposals>,
    /// Counts groups added: a message to a group not started yet waits for the next.
    added: Arc<tokio::sync::watch::Sender<u64>>,
    /// Serves `Maintain` once the broker has set it.
    maintainer: Arc<std::sync::OnceLock<Maintainer>>,
    /// Serves `SendIds` once the broker has set it.
    id_sender: Arc<std::sync::OnceLock<IdSender>>,
    /// Serves `Consume` and `Settle` once the broker has set it.
    group_host: Arc<std::sync::OnceLock<Arc<dyn GroupHost>>>,
    /// The members' election timeouts, for `TransferLeader`.
    elections: Option<Elections>,
    /// The cluster's id, once known (`Status`).
    cluster_id: Arc<RwLock<String>>,
}

/// How long a Raft message to a group this node has not started waits for it to start before it
/// is answered `NOT_FOUND`. A new topic's leader starts replicating before every node has
/// started the topic's groups; answered at once, it retried thousands of times a second (three
/// warnings each in its log) until the group appeared. Waiting, the message is served as soon as
/// the group starts. Well under openraft's RPC deadlines, so a peer that waits out the whole of
/// it is not taken for unreachable.
pub const GROUP_WAIT: Duration = Duration::from_millis(50);

impl Default for RaftService {
    fn default() -> Self {
        RaftService {
            groups: Arc::default(),
            logs: Arc::default(),
            write_timeout: Duration::from_secs(10),
            peers: Peers::default(),
            proposals: Arc::default(),
            added: Arc::new(tokio::sync::watch::Sender::new(0)),
            maintainer: Arc::default(),
            id_sender: Arc::default(),
            group_host: Arc::default(),
            elections: None,
            cluster_id: Arc::default(),
        }
    }
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// Forwarded proposals wait at most `timeout` to be committed.
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// Proposes forwarded proposals through `proposals` (this node's own go there too).
    pub fn with_proposals(mut self, proposals: Arc<Proposals>) -> Self {
        self.proposals = proposals;
        self
    }

    /// Moves leaderships (`TransferLeader`) with the members' election timeouts.
    pub fn with_elections(mut self, elections: Elections) -> Self {
        self.elections = Some(elections);
        self
    }

    /// Names leaders in refusals at the addresses `peers` gives.
    pub fn with_peers(mut self, peers: Peers) -> Self {
        self.peers = peers;
        self
    }

    /// Routes the group's messages to `raft` from now on (replacing any earlier instance).
    pub fn add(&self, group: impl Into<String>, raft: Raft<PartitionRaft>) {
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.into(), raft);
        self.added.send_modify(|n| *n += 1);
    }

    /// Answers `cluster_id` to `Status` from now on.
    pub fn set_cluster_id(&self, cluster_id: &str) {
        *self.cluster_id.write().unwrap_or_else(|p| p.into_inner()) = cluster_id.to_string();
    }

    /// Serves `Maintain` with `maintainer` from now on (the first one set stays).
    pub fn serve_maintenance(&self, maintainer: Maintainer) {
        let _ = self.maintainer.set(maintainer);
    }

    /// Serves `SendIds` with `sender` from now on (the first one set stays).
    pub fn serve_ids(&self, sender: IdSender) {
        let _ = self.id_sender.set(sender);
    }

    /// Serves `Consume` and `Settle` with `host` from now on (the first one set stays).
    pub fn serve_groups(&self, host: Arc<dyn GroupHost>) {
        let _ = self.group_host.set(host);
    }

    fn group_host(&self) -> Result<&Arc<dyn GroupHost>, Status> {
        self.group_host
            .get()
            .ok_or_else(|| Status::unavailable("this node is still starting"))
    }

    /// Serves reads of the group's log to nodes that hold no replica of it.
    pub fn add_log(&self, group: impl Into<String>, log: GroupLog) {
        self.logs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.into(), log);
    }

    /// Stops routing the group's messages (and reads of its log); they are answered
    /// `NOT_FOUND`.
    pub fn remove(&self, group: &str) -> Option<Raft<PartitionRaft>> {
        self.logs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(group);
        self.groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(group)
    }

    pub fn into_server(self) -> pb::raft_server::RaftServer<RaftService> {
        pb::raft_server::RaftServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// This node's report of every group it is in.
    pub fn status(&self) -> pb::StatusResponse {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        let node_id = groups
            .values()
            .next()
            .map_or(0, |r| r.metrics().borrow().id);
        let mut groups: Vec<pb::GroupStatus> = groups
            .iter()
            .map(|(name, raft)| status::group_status(name, raft))
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        let cluster_id = self
            .cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        pb::StatusResponse {
            node_id,
            groups,
            cluster_id,
        }
    }

    /// The group `name`, waiting up to [`GROUP_WAIT`] for it to be added.
    async fn started_group(&self, name: &str) -> Result<Raft<PartitionRaft>, Status> {
        if let Ok(raft) = self.group(name) {
            return Ok(raft); // every message but those of the first moments of a group
        }
        let mut added = self.added.subscribe();
        // Added between the lookup and the subscription: look again before waiting.
        if let Ok(raft) = self.group(name) {
            return Ok(raft);
        }
        let started = tokio::time::timeout(GROUP_WAIT, async {
            while added.changed().await.is_ok() {
                if let Ok(raft) = self.group(name) {
                    return Some(raft);
                }
            }
            None
        });
        match started.await {
            Ok(Some(raft)) => Ok(raft),
            _ => self.group(name),
        }
    }

    fn group(&self, name: &str) -> Result<Raft<PartitionRaft>, Status> {
        self.groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("this node has no Raft group {name:?}")))
    }
}

impl RaftService {
    /// Hands an AppendEntries to the group it names.
    async fn append(
        &self,
        req: pb::AppendEntriesRequest,
    ) -> Result<pb::AppendEntriesResponse, Status> {
        let raft = self.started_group(&req.group).await?;
        let rpc = wire::append_from_pb(req).map_err(bad)?;
        let r = raft.append_entries(rpc).await.map_err(stopped)?;
        Ok(wire::append_response_to_pb(&r))
    }

    /// A refusal before proposing anything (this node does not lead the group), naming the
    /// leader it knows: the forwarding node may take the request to the next leader.
    fn not_proposed(&self, raft: &Raft<PartitionRaft>) -> Status {
        let leader = known_leader(raft, &self.peers);
        let mut status = WriteError::NoLeader(leader).to_status();
        status.metadata_mut().insert(
            NOT_PROPOSED_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        status
    }
}

fn bad(e: wire::Malformed) -> Status {
    Status::invalid_argument(e.to_string())
}

fn stopped(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the Raft group is stopping: {e}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        self.append(request.into_inner()).await.map(Response::new)
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = request.into_inner();
        let raft = self.started_group(&req.group).await?;
        let rpc = wire::vote_request_from_pb(req).map_err(bad)?;
        let r = raft.vote(rpc).await.map_err(stopped)?;
        Ok(Response::new(wire::vote_response_to_pb(&r)))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let req = request.into_inner();
        let raft = self.started_group(&req.group).await?;
        let rpc = wire::snapshot_from_pb(req).map_err(bad)?;
        let r = raft.install_snapshot(rpc).await.map_err(stopped)?;
        Ok(Response::new(wire::snapshot_response_to_pb(&r)))
    }

    async fn heartbeats(
        &self,
        request: Request<pb::HeartbeatsRequest>,
    ) -> Result<Response<pb::HeartbeatsResponse>, Status> {
        // Each group's in its own task: one slow group holds none of the others back.
        let mut answers = tokio::task::JoinSet::new();
        for (i, req) in request.into_inner().heartbeats.into_iter().enumerate() {
            let me = self.clone();
            answers.spawn(async move { (i, me.append(req).await) });
        }
        let mut replies = vec![pb::HeartbeatReply::default(); answers.len()];
        while let Some(joined) = answers.join_next().await {
            let (i, outcome) = joined.map_err(|e| Status::internal(e.to_string()))?;
            replies[i].outcome = Some(match outcome {
                Ok(r) => pb::heartbeat_reply::Outcome::Response(r),
                Err(s) => pb::heartbeat_reply::Outcome::Refused(pb::Refusal {
                    code: s.code() as i32,
                    message: s.message().to_string(),
                }),
            });
        }
        Ok(Response::new(pb::HeartbeatsResponse { replies }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let req = request.into_inner();
        let log = self
            .logs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&req.group)
            .cloned()
            .ok_or_else(|| {
                Status::not_found(format!("this node has no Raft group {:?}", req.group))
            })?;
        let leader = self
            .group(&req.group)
            .ok()
            .and_then(|raft| raft.metrics().borrow().current_leader);
        log.read(&req, leader).await.map(Response::new)
    }

    async fn maintain(
        &self,
        request: Request<pb::MaintainRequest>,
    ) -> Result<Response<pb::MaintainResponse>, Status> {
        let req = request.into_inner();
        self.group(&req.group)?; // a group this node holds
        let Some(maintainer) = self.maintainer.get() else {
            return Err(Status::unavailable("this node is still starting"));
        };
        match maintainer(req.group, req.dry_run).await {
            Ok(report) => Ok(Response::new(pb::MaintainResponse {
                report: report.into(),
            })),
            Err(why) => Err(Status::internal(why)),
        }
    }

    async fn hand_over(
        &self,
        request: Request<pb::HandOverRequest>,
    ) -> Result<Response<pb::HandOverResponse>, Status> {
        let req = request.into_inner();
        let raft = self.group(&req.group)?;
        let retry = Duration::from_millis(raft.config().heartbeat_interval);
        handover::take_over(raft, &req, retry);
        Ok(Response::new(pb::HandOverResponse {}))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let req = request.into_inner();
        let raft = self.group(&req.group)?;
        let Some(elections) = &self.elections else {
            return Err(Status::failed_precondition(
                "this node does not move leaderships",
            ));
        };
        let moved = handover::transfer(
            &raft,
            &req.group,
            req.to,
            &self.peers,
            elections,
            &self.proposals,
        )
        .await;
        match moved {
            Ok((leader, term)) => Ok(Response::new(pb::TransferLeaderResponse { leader, term })),
            Err(TransferError::NotLeader) => Err(self.not_proposed(&raft)),
            Err(e @ TransferError::NotAMember(_)) => Err(Status::invalid_argument(e.to_string())),
            // Tried and given up (the leader stays, or another was elected): not to be made
            // again at another node.
            Err(e) => Err(Status::aborted(e.to_string())),
        }
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let req = request.into_inner();
        let raft = self.group(&req.group)?;
        let leads = {
            let m = raft.metrics().borrow().clone();
            m.current_leader == Some(m.id)
        };
        if !leads {
            // Refused before proposing: the forwarding node may take it to the next leader.
            return Err(self.not_proposed(&raft));
        }
        let proposal = match &req.command {
            Some(json) => Proposal::Command(
                serde_json::from_slice(json)
                    .map_err(|e| Status::invalid_argument(format!("a command: {e}")))?,
            ),
            None => {
                // A batch no Send encoded would reach the log: refused, nothing proposed.
                EncodedBatch::check_proposal(&req.batch)
                    .map_err(|why| Status::invalid_argument(format!("a batch: {why}")))?;
                Proposal::Records(req.batch)
            }
        };
        let proposed = self.proposals.propose(
            &raft,
            &req.group,
            proposal,
            self.write_timeout,
            &self.peers,
            None,
        );
        match proposed.await {
            Ok(applied) => Ok(Response::new(pb::ProposeResponse {
                base_offset: applied.offsets.map(|o| o.0),
                last_offset: applied.offsets.map(|o| o.1),
            })),
            // Refused by Raft (it no longer leads, or it handed the group over while the
            // proposal waited): never appended, or dropped as a conflict, so never committed.
            Err(WriteError::NoLeader(_)) => Err(self.not_proposed(&raft)),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn send_ids(
        &self,
        request: Request<pb::SendIdsRequest>,
    ) -> Result<Response<pb::SendIdsResponse>, Status> {
        let req = request.into_inner();
        let raft = self.group(&req.group)?;
        let Some(sender) = self.id_sender.get() else {
            return Err(Status::unavailable("this node is still starting"));
        };
        EncodedBatch::check_proposal(&req.batch)
            .map_err(|why| Status::invalid_argument(format!("a batch: {why}")))?;
        match sender(req.group, req.batch).await {
            Ok(placed) => Ok(Response::new(pb::SendIdsResponse { placed })),
            Err(WriteError::NoLeader(_)) => Err(self.not_proposed(&raft)),
            Err(e) => Err(e.to_status()),
        }
    }

    type ConsumeStream = ConsumeStream;

    async fn consume(
        &self,
        request: Request<pb::ConsumeRequest>,
    ) -> Result<Response<ConsumeStream>, Status> {
        let host = self.group_host()?;
        host.consume(request.into_inner()).await.map(Response::new)
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let host = self.group_host()?;
        host.settle(request.into_inner()).await.map(Response::new)
    }

    async fn administer_group(
        &self,
        request: Request<pb::AdministerGroupRequest>,
    ) -> Result<Response<pb::AdministerGroupResponse>, Status> {
        let host = self.group_host()?;
        host.administer(request.into_inner())
            .await
            .map(Response::new)
    }
}
