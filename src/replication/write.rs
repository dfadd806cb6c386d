//! Proposing to a group and waiting for the outcome: what a Send (or a topic creation) sees of
//! Raft. Answered only once the entry is committed on a majority and applied on the leader. A
//! node that does not lead the group forwards the proposal to the leader's cluster port once
//! ([`Forwarder`]); the leader does not forward it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::peers::Peers;
use super::types::{Applied, PartitionRaft, Proposal};
use crate::proto::cluster as pb;
use crate::proto::cluster::raft_client::RaftClient;

/// The metadata naming a group's leader, `<node id>@<cluster address>`, on refusals.
pub const LEADER_METADATA: &str = "x-sluice-leader";

/// Set on a forwarded proposal's refusal when the node refused it before proposing (it did not
/// lead the group): nothing was appended, so the proposal may go to the next leader.
pub const NOT_PROPOSED_METADATA: &str = "x-sluice-not-proposed";

/// Why a proposal was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This node does not lead the group and could not reach a leader; the leader as this node
    /// knows it (id, cluster address), if any. Nothing was committed.
    #[error("no leader reachable")]
    NoLeader(Option<(u64, String)>),
    /// Proposed, but not committed within the deadline (the leader may have lost its
    /// majority): the entry may still be committed later, or never.
    #[error("not committed within {0:?}; the outcome is unknown")]
    TimedOut(Duration),
    /// The group stopped (shutdown, or a fatal storage error).
    #[error("the group stopped: {0}")]
    Stopped(String),
}

/// Proposes `proposal` and waits until it is committed and applied, at most `deadline`. A
/// refusal names the leader at the address `peers` gives.
pub async fn propose(
    raft: &Raft<PartitionRaft>,
    proposal: Proposal,
    deadline: Duration,
    peers: &Peers,
) -> Result<Applied, WriteError> {
    let write = raft.client_write(proposal);
    match tokio::time::timeout(deadline, write).await {
        Err(_) => Err(WriteError::TimedOut(deadline)),
        Ok(Ok(response)) => Ok(response.data),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(WriteError::NoLeader(f.leader_id.map(|id| {
                let known = f.leader_node.map(|n| n.addr).unwrap_or_default();
                (id, peers.addr(id, &known))
            })))
        }
        Ok(Err(RaftError::APIError(e))) => Err(WriteError::Stopped(e.to_string())),
        Ok(Err(RaftError::Fatal(e))) => Err(WriteError::Stopped(e.to_string())),
    }
}

/// The leader this node knows of for `raft`, waiting up to `deadline` while an election runs.
pub async fn wait_for_leader(raft: &Raft<PartitionRaft>, deadline: Duration) -> Option<u64> {
    wait_for_new_leader(raft, None, deadline)
        .await
        .map(|(leader, _)| leader)
}

/// The leader this node knows of for `raft` (id, cluster address as `peers` gives it), if any.
pub fn known_leader(raft: &Raft<PartitionRaft>, peers: &Peers) -> Option<(u64, String)> {
    let metrics = raft.metrics().borrow().clone();
    let id = metrics.current_leader?;
    let known = metrics
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
        .unwrap_or_default();
    Some((id, peers.addr(id, &known)))
}

impl WriteError {
    /// As the cluster port answers a forwarded proposal.
    pub fn to_status(&self) -> Status {
        match self {
            WriteError::NoLeader(leader) => {
                let mut s = Status::failed_precondition("this node does not lead the group");
                if let Some((id, addr)) = leader
                    && let Ok(v) = format!("{id}@{addr}").parse()
                {
                    s.metadata_mut().insert(LEADER_METADATA, v);
                }
                s
            }
            WriteError::TimedOut(d) => {
                Status::deadline_exceeded(format!("not committed within {} ms", d.as_millis()))
            }
            WriteError::Stopped(why) => Status::unavailable(why.clone()),
        }
    }

    /// What a forwarded proposal's answer means.
    fn from_status(status: &Status, deadline: Duration) -> WriteError {
        match status.code() {
            Code::FailedPrecondition => {
                let leader = status
                    .metadata()
                    .get(LEADER_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split_once('@'))
                    .and_then(|(id, addr)| Some((id.parse().ok()?, addr.to_string())));
                WriteError::NoLeader(leader)
            }
            Code::DeadlineExceeded | Code::Cancelled => WriteError::TimedOut(deadline),
            _ => WriteError::Stopped(format!("the leader answered: {}", with_causes(status))),
        }
    }
}

/// A status's message followed by each underlying cause (a transport error's says why).
fn with_causes(status: &Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Forwards proposals to leaders over the cluster port: one lazily connected channel per peer.
#[derive(Debug, Default)]
pub struct Forwarder {
    peers: Peers,
    clients: Mutex<HashMap<String, RaftClient<Channel>>>,
}

impl Forwarder {
    /// Reaches each leader at the address `peers` gives.
    pub fn new(peers: Peers) -> Self {
        Forwarder {
            peers,
            clients: Mutex::default(),
        }
    }

    /// The cluster addresses this node reaches its peers at.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    fn client(&self, addr: &str) -> Result<RaftClient<Channel>, WriteError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = self.peers.endpoint(addr).map_err(WriteError::Stopped)?;
        let client = super::wire::client(endpoint.connect_lazy());
        clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Proposes `proposal` here if this node leads `group`, else at the leader it knows, waiting
    /// at most `deadline` in all. A leader that refuses the connection (down: the proposal never
    /// left this node), or that no longer leads and says it proposed nothing, is waited out: the
    /// proposal goes to the next leader, so a Send rides through a failover instead of failing.
    pub async fn propose(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        proposal: Proposal,
        deadline: Duration,
    ) -> Result<Applied, WriteError> {
        let until = Instant::now() + deadline;
        let me = raft.metrics().borrow().id;
        let mut gone: Option<(u64, u64)> = None;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let Some((id, term)) = wait_for_new_leader(raft, gone, left).await else {
                return Err(WriteError::NoLeader(gone.and_then(|(id, _)| {
                    known_leader(raft, &self.peers).filter(|(l, _)| *l == id)
                })));
            };
            if id == me {
                return propose(raft, proposal, left, &self.peers).await;
            }
            let Some(leader) = known_leader(raft, &self.peers).filter(|(l, _)| *l == id) else {
                continue; // the leader changed meanwhile: look again
            };
            match self.forward(group, &proposal, left, leader.clone()).await {
                Forwarded::Answer(answer) => return answer,
                Forwarded::Refused => gone = Some((id, term)),
            }
        }
    }

    /// Node `id`'s report of its groups, asked over its cluster port within `deadline`.
    pub async fn status(&self, id: u64, deadline: Duration) -> Result<pb::StatusResponse, String> {
        let addr = self.peers.addr(id, "");
        let mut client = self.client(&addr).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(pb::StatusRequest {});
        request.set_timeout(deadline);
        match tokio::time::timeout(deadline, client.status(request)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err(format!("no answer within {} ms", deadline.as_millis())),
        }
    }

    async fn forward(
        &self,
        group: &str,
        proposal: &Proposal,
        deadline: Duration,
        leader: (u64, String),
    ) -> Forwarded {
        let mut client = match self.client(&leader.1) {
            Ok(c) => c,
            Err(e) => return Forwarded::Answer(Err(e)),
        };
        let (batch, command) = match proposal {
            Proposal::Records(batch) => (batch.clone(), None),
            Proposal::Command(command) => match serde_json::to_vec(command) {
                Ok(json) => (Bytes::new(), Some(json.into())),
                Err(e) => return Forwarded::Answer(Err(WriteError::Stopped(e.to_string()))),
            },
        };
        let mut request = tonic::Request::new(pb::ProposeRequest {
            group: group.to_string(),
            batch,
            command,
        });
        request.set_timeout(deadline);
        Forwarded::Answer(match client.propose(request).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(Applied {
                    offsets: r.base_offset.zip(r.last_offset),
                })
            }
            Err(s) if connection_refused(&s) => return Forwarded::Refused,
            // It no longer leads and proposed nothing: as good as down, for this proposal.
            Err(s) if s.metadata().contains_key(NOT_PROPOSED_METADATA) => {
                return Forwarded::Refused;
            }
            // Cut off from this node, or its group stopped: the proposal may have arrived.
            Err(s) if s.code() == Code::Unavailable => Err(WriteError::NoLeader(Some(leader))),
            Err(s) => Err(WriteError::from_status(&s, deadline)),
        })
    }
}

/// What forwarding a proposal came to.
enum Forwarded {
    Answer(Result<Applied, WriteError>),
    /// Nothing was proposed: the leader's port refused the connection, or the node no longer
    /// leads and said it proposed nothing.
    Refused,
}

/// Whether a call failed because the peer refused the connection (so the request never left).
fn connection_refused(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The leader of `raft`'s group and its term, once one is known that is not `gone` (a leader,
/// and the term it led, found down), waiting at most `deadline`.
async fn wait_for_new_leader(
    raft: &Raft<PartitionRaft>,
    gone: Option<(u64, u64)>,
    deadline: Duration,
) -> Option<(u64, u64)> {
    let fresh = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| match (m.current_leader, gone)
    {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(l), Some((id, term))) => l != id || m.current_term > term,
    };
    let mut metrics = raft.metrics();
    let found = tokio::time::timeout(deadline, metrics.wait_for(fresh)).await;
    drop(found);
    let m = raft.metrics().borrow().clone();
    if !fresh(&m) {
        return None;
    }
    Some((m.current_leader?, m.current_term))
}
