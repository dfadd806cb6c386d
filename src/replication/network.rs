//! Raft's messages to other nodes over gRPC (`sluice.cluster.v1.Raft`, the cluster port): the
//! sending side. Every group's messages to a peer share one lazily connected channel
//! ([`Peers::channel`]); a peer that does not answer is `Unreachable` (openraft backs off),
//! anything else a network error.

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::Channel;

use super::peers::Peers;
use super::types::{LogId, PartitionRaft};
use super::wire;
use crate::proto::cluster::raft_client::RaftClient;

type RpcError<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

/// Makes the links of one Raft group to its peers, at the addresses this node's configuration
/// gives ([`Peers`]; a node Raft knows that the configuration does not name is reached at the
/// address its membership entry carries).
#[derive(Debug, Clone)]
pub struct GrpcNetwork {
    group: String,
    peers: Peers,
}

impl GrpcNetwork {
    pub fn new(group: impl Into<String>, peers: Peers) -> Self {
        GrpcNetwork {
            group: group.into(),
            peers,
        }
    }
}

impl RaftNetworkFactory<PartitionRaft> for GrpcNetwork {
    type Network = GrpcLink;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GrpcLink {
        GrpcLink {
            group: self.group.clone(),
            target,
            addr: self.peers.addr(target, &node.addr),
            peers: self.peers.clone(),
            reachable: true,
            commit_sent: None,
            busy_at: std::time::Instant::now(),
        }
    }
}

/// One group's link to one peer.
#[derive(Debug)]
pub struct GrpcLink {
    group: String,
    target: u64,
    addr: String,
    peers: Peers,
    /// Whether the last call reached the peer: a change is logged once (openraft's own report
    /// of every failed call is off by default, see `sluice serve`'s log filter).
    reachable: bool,
    /// The commit point the peer was last told, with the vote and the entry it follows: an
    /// append that repeats all three is a heartbeat, coalesced with other groups' ([`Peers::heartbeat`]).
    commit_sent: Option<(openraft::Vote<u64>, Option<LogId>, Option<LogId>)>,
    /// When this link last carried entries or a new commit point: only the heartbeats of a group
    /// idle for a while are coalesced (openraft sends one message at a time to a follower, so an
    /// entry proposed meanwhile would wait behind a heartbeat in its window).
    busy_at: std::time::Instant,
}

/// How many heartbeat deadlines a group must have been idle before its heartbeats are coalesced.
const IDLE_DEADLINES: u32 = 4;

fn unreachable(e: &(impl std::error::Error + 'static)) -> Unreachable {
    Unreachable::new(e)
}

/// A failed call: a peer that cannot be reached is `Unreachable`, so openraft backs off.
fn status_error<E: std::error::Error>(status: tonic::Status) -> RpcError<E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(unreachable(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn malformed<E: std::error::Error>(e: wire::Malformed) -> RpcError<E> {
    RPCError::Network(NetworkError::new(&e))
}

impl GrpcLink {
    fn client<E: std::error::Error>(&mut self) -> Result<RaftClient<Channel>, RpcError<E>> {
        let channel = self
            .peers
            .channel(&self.addr)
            .map_err(|e| RPCError::Unreachable(unreachable(&std::io::Error::other(e))))?;
        Ok(wire::client(channel))
    }

    /// Logs a change of reachability: at `warn` for the metadata group (one line per peer that
    /// goes away or comes back), at `debug` for each partition's group.
    fn note<T, E>(&mut self, result: &Result<T, RpcError<E>>)
    where
        E: std::error::Error,
    {
        let reachable = !matches!(result, Err(RPCError::Unreachable(_)));
        if reachable == self.reachable {
            return;
        }
        self.reachable = reachable;
        let (group, peer, addr) = (&self.group, self.target, &self.addr);
        match (reachable, group.starts_with('_')) {
            (false, true) => tracing::warn!(%group, peer, %addr, "peer unreachable"),
            (true, true) => tracing::info!(%group, peer, %addr, "peer reachable again"),
            (false, false) => tracing::debug!(%group, peer, %addr, "peer unreachable"),
            (true, false) => tracing::debug!(%group, peer, %addr, "peer reachable again"),
        }
    }

    fn request<T>(&self, message: T, option: &RPCOption) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(option.hard_ttl());
        request
    }
}

impl RaftNetwork<PartitionRaft> for GrpcLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        let message = wire::append_to_pb(&self.group, &rpc).map_err(malformed)?;
        let said = (rpc.vote, rpc.prev_log_id, rpc.leader_commit);
        let heartbeat = rpc.entries.is_empty() && self.commit_sent.as_ref() == Some(&said);
        if !heartbeat {
            self.busy_at = std::time::Instant::now();
        }
        let idle = self.busy_at.elapsed() >= option.hard_ttl() * IDLE_DEADLINES;
        let response = if heartbeat && idle {
            self.peers
                .heartbeat(&self.addr, message, option.hard_ttl())
                .await
                .map_err(status_error)
        } else {
            let request = self.request(message, &option);
            let r = self.client()?.append_entries(request).await;
            r.map(tonic::Response::into_inner).map_err(status_error)
        };
        self.note(&response);
        let response = wire::append_response_from_pb(response?).map_err(malformed)?;
        self.commit_sent = match response {
            AppendEntriesResponse::Success => Some(said),
            _ => None,
        };
        Ok(response)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        let message = wire::snapshot_to_pb(&self.group, &rpc).map_err(malformed)?;
        let request = self.request(message, &option);
        let response = self
            .client()?
            .install_snapshot(request)
            .await
            .map_err(status_error)?;
        wire::snapshot_response_from_pb(response.into_inner()).map_err(malformed)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        let message = wire::vote_request_to_pb(&self.group, &rpc);
        let request = self.request(message, &option);
        let response = self.client()?.vote(request).await.map_err(status_error);
        self.note(&response);
        wire::vote_response_from_pb(response?.into_inner()).map_err(malformed)
    }
}
