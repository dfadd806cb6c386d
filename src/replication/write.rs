//! Proposing to a group and waiting for the outcome: what a Send (or a topic creation) sees of
//! Raft. Answered only once the entry is committed on a majority and applied on the leader. A
//! node that does not lead the group forwards the proposal to the leader's cluster port once
//! ([`Forwarder`]); the leader does not forward it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::Raft;
use openraft::error::ClientWriteError;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::peers::Peers;
use super::types::{Applied, PartitionRaft, Proposal};
use crate::proto::cluster as pb;
use crate::proto::cluster::raft_client::RaftClient;
use crate::storage::EncodedBatch;
use crate::storage::record::BatchHeader;

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
    let until = tokio::time::Instant::now() + deadline;
    let proposed = submit(raft, proposal).await?;
    outcome(proposed, until, deadline, peers).await
}

/// An entry handed to a group's Raft core, whose outcome is still to come ([`outcome`]).
pub type Submitted = tokio::sync::oneshot::Receiver<
    Result<
        openraft::raft::ClientWriteResponse<PartitionRaft>,
        ClientWriteError<u64, openraft::BasicNode>,
    >,
>;

/// Hands `proposal` to the group's Raft core and returns at once: entries handed over one
/// after another are appended in that order.
pub async fn submit(
    raft: &Raft<PartitionRaft>,
    proposal: Proposal,
) -> Result<Submitted, WriteError> {
    raft.client_write_ff(proposal)
        .await
        .map_err(|e| WriteError::Stopped(e.to_string()))
}

/// What became of a [`submit`]ted entry: applied here once committed, refused (not leading),
/// or not known by `until` (`deadline` from its submission).
pub async fn outcome(
    submitted: Submitted,
    until: tokio::time::Instant,
    deadline: Duration,
    peers: &Peers,
) -> Result<Applied, WriteError> {
    match tokio::time::timeout_at(until, submitted).await {
        Err(_) => Err(WriteError::TimedOut(deadline)),
        Ok(Err(_)) => Err(WriteError::Stopped(
            "the group's Raft core went away".into(),
        )),
        Ok(Ok(Ok(response))) => Ok(response.data),
        Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => {
            Err(WriteError::NoLeader(f.leader_id.map(|id| {
                let known = f.leader_node.map(|n| n.addr).unwrap_or_default();
                (id, peers.addr(id, &known))
            })))
        }
        Ok(Ok(Err(e))) => Err(WriteError::Stopped(e.to_string())),
    }
}

/// Message proposals that wait while earlier ones of their group are in flight are merged into
/// one entry: group commit at the Raft layer. openraft (0.9) appends and syncs each client
/// write on its own before it takes the next, so a busy leader otherwise pays one `fdatasync`
/// and one entry per Send where a single node's writer pays one per group of them.
pub const ROUNDS_IN_FLIGHT: usize = 2;

/// How long a proposal to a group this node holds no replica of waits after every replica
/// refused it (an election is under way), before it tries them again.
const REMOTE_RETRY: Duration = Duration::from_millis(50);

/// A merged entry takes waiting proposals up to about this many bytes (one larger than this
/// goes alone).
pub const MERGED_BYTES: usize = 1 << 20;

/// Proposals of messages to the groups this node leads, merged while earlier ones are in flight
/// (at most [`ROUNDS_IN_FLIGHT`] entries per group at a time). A lone proposal goes as it is.
#[derive(Debug, Default)]
pub struct Proposals {
    queues: Mutex<HashMap<String, Queue>>,
    /// Groups whose leadership this node is handing over ([`Proposals::hold`]): their new
    /// proposals wait.
    held: Mutex<HashSet<String>>,
    /// Told when a group is no longer held.
    released: tokio::sync::Notify,
}

/// While it lives, new proposals of its group wait ([`Proposals::hold`]).
#[derive(Debug)]
pub struct Held {
    proposals: Arc<Proposals>,
    group: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.proposals.held().remove(&self.group);
        self.proposals.released.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Rounds (tasks proposing an entry and then the next) running for the group.
    rounds: usize,
}

struct Waiting {
    batch: Bytes,
    /// Offsets its records take.
    span: u64,
    answer: tokio::sync::oneshot::Sender<Result<Applied, WriteError>>,
    /// Proposed even once nobody waits for the answer, and told how it came out.
    resolve: Option<Resolve>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("span", &self.span)
            .field("resolve", &self.resolve.is_some())
            .finish_non_exhaustive()
    }
}

/// Told how a proposal came out, and the term this node was in when it proposed it, by
/// whoever proposed it: whatever became of the request that asked (whose caller may have
/// stopped waiting). What the id check of a Send with ids needs to settle its claims.
pub type Resolve = Box<dyn FnOnce(&Result<Applied, WriteError>, u64) + Send>;

/// [`propose`], telling `resolve` how it came out.
async fn propose_resolving(
    raft: &Raft<PartitionRaft>,
    proposal: Proposal,
    deadline: Duration,
    peers: &Peers,
    resolve: Option<Resolve>,
) -> Result<Applied, WriteError> {
    let term = raft.metrics().borrow().current_term;
    let outcome = propose(raft, proposal, deadline, peers).await;
    if let Some(resolve) = resolve {
        resolve(&outcome, term);
    }
    outcome
}

impl Proposals {
    /// Proposes `proposal` to `group` (which `raft` is this node's member of) and waits until
    /// it is committed and applied, at most `deadline`; see [`propose`]. Messages may share an
    /// entry with others proposed meanwhile; each is answered with its own offsets. With
    /// `resolve`, the proposal is made even if this call stops waiting, and `resolve` is told
    /// how it came out.
    pub async fn propose(
        self: &Arc<Self>,
        raft: &Raft<PartitionRaft>,
        group: &str,
        proposal: Proposal,
        deadline: Duration,
        peers: &Peers,
        resolve: Option<Resolve>,
    ) -> Result<Applied, WriteError> {
        let until = tokio::time::Instant::now() + deadline;
        // Nothing proposed while held: the caller may take it to the next leader.
        let held_out = || WriteError::NoLeader(None);
        let span = match &proposal {
            Proposal::Records(batch) => BatchHeader::of_proposal(batch)
                .ok()
                .filter(BatchHeader::is_dense)
                .map(|h| u64::from(h.record_count)),
            Proposal::Command(_) => None,
        };
        let (Some(span), Proposal::Records(batch)) = (span, &proposal) else {
            self.when_unheld(group, until, |_| ())
                .await
                .ok_or_else(held_out)?;
            return propose_resolving(raft, proposal, deadline, peers, resolve).await;
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let waiting = Waiting {
            batch: batch.clone(),
            span,
            answer,
            resolve,
        };
        let start = self.when_unheld(group, until, |queues| {
            let queue = queues.entry(group.to_string()).or_default();
            queue.waiting.push(waiting);
            let start = queue.rounds < ROUNDS_IN_FLIGHT;
            queue.rounds += usize::from(start);
            start
        });
        let start = start.await.ok_or_else(held_out)?;
        if start {
            // Its own task: a round outlives the Send that started it (whose client may go).
            let (me, raft, group, peers) = (
                Arc::clone(self),
                raft.clone(),
                group.to_string(),
                peers.clone(),
            );
            tokio::spawn(async move { me.rounds(&raft, &group, deadline, &peers).await });
        }
        match tokio::time::timeout_at(until, answered).await {
            Err(_) => Err(WriteError::TimedOut(deadline)),
            Ok(Err(_)) => Err(WriteError::Stopped("the proposal's round ended".into())),
            Ok(Ok(answer)) => answer,
        }
    }

    /// Proposes what waits for `group`, one entry at a time, until nothing does.
    async fn rounds(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        deadline: Duration,
        peers: &Peers,
    ) {
        loop {
            let taken = self.take(group);
            if taken.is_empty() {
                return;
            }
            let parts: Vec<Bytes> = taken.iter().map(|w| w.batch.clone()).collect();
            let merged = EncodedBatch::merged_proposal(&parts).ok();
            let Some(merged) = merged else {
                // Not mergeable (a Send's batches always are; a forwarded one may not be): each
                // goes alone, answered as it would be.
                for w in taken {
                    let alone = Proposal::Records(w.batch);
                    let outcome = propose_resolving(raft, alone, deadline, peers, w.resolve);
                    let _ = w.answer.send(outcome.await);
                }
                continue;
            };
            let term = raft.metrics().borrow().current_term;
            let outcome = propose(raft, Proposal::Records(merged), deadline, peers).await;
            let mut next = outcome.map(|a| a.offsets.map(|(base, _)| base));
            for w in taken {
                let answer = match &mut next {
                    Ok(Some(base)) => {
                        let offsets = (*base, *base + w.span - 1);
                        *base += w.span;
                        Ok(Applied {
                            offsets: Some(offsets),
                        })
                    }
                    Ok(None) => Ok(Applied { offsets: None }),
                    Err(e) => Err(e.clone()),
                };
                if let Some(resolve) = w.resolve {
                    resolve(&answer, term);
                }
                let _ = w.answer.send(answer);
            }
        }
    }

    /// Holds new proposals of `group` (each waits, up to its deadline) until the guard is
    /// dropped: for a leadership being handed over, whose leader must propose nothing more.
    /// Proposals already under way go on ([`Proposals::busy`] says when they are done).
    pub fn hold(self: &Arc<Self>, group: &str) -> Held {
        self.held().insert(group.to_string());
        Held {
            proposals: Arc::clone(self),
            group: group.to_string(),
        }
    }

    /// Runs `then` on the queues once `group` is not held, under the same lock as the look: a
    /// hold taken afterwards finds what `then` queued in [`Proposals::busy`]. `None` if the
    /// group is still held at `until`.
    async fn when_unheld<T>(
        &self,
        group: &str,
        until: tokio::time::Instant,
        then: impl FnOnce(&mut HashMap<String, Queue>) -> T,
    ) -> Option<T> {
        loop {
            // Made before looking: a release between the look and the wait still wakes it.
            let released = self.released.notified();
            {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                if !self.held().contains(group) {
                    return Some(then(&mut queues));
                }
            }
            if tokio::time::timeout_at(until, released).await.is_err() {
                return None;
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether proposals of `group` wait or are being proposed.
    pub fn busy(&self, group: &str) -> bool {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .get(group)
            .is_some_and(|q| q.rounds > 0 || !q.waiting.is_empty())
    }

    /// The proposals waiting for `group` that still have someone to answer, up to
    /// [`MERGED_BYTES`] (at least one); none ends the round (and forgets an idle group).
    fn take(&self, group: &str) -> Vec<Waiting> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queues.get_mut(group) else {
            return Vec::new();
        };
        queue
            .waiting
            .retain(|w| w.resolve.is_some() || !w.answer.is_closed());
        let mut bytes = 0;
        let n = queue
            .waiting
            .iter()
            .take_while(|w| {
                bytes += w.batch.len();
                bytes <= MERGED_BYTES
            })
            .count()
            .max(1)
            .min(queue.waiting.len());
        let taken: Vec<Waiting> = queue.waiting.drain(..n).collect();
        if taken.is_empty() {
            queue.rounds -= 1;
            if queue.rounds == 0 {
                queues.remove(group);
            }
        }
        taken
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
    /// The leader last seen, per group this node holds no replica of.
    leaders: Mutex<HashMap<String, (u64, String)>>,
    /// The proposals of groups this node leads (shared with the cluster port's `Propose`).
    proposals: Arc<Proposals>,
}

impl Forwarder {
    /// Reaches each leader at the address `peers` gives; proposes to the groups this node leads
    /// through `proposals`.
    pub fn new(peers: Peers, proposals: Arc<Proposals>) -> Self {
        Forwarder {
            peers,
            clients: Mutex::default(),
            leaders: Mutex::default(),
            proposals,
        }
    }

    /// The cluster addresses this node reaches its peers at.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// This node's proposals to the groups it leads.
    pub fn proposals(&self) -> &Arc<Proposals> {
        &self.proposals
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
                let proposed = (self.proposals)
                    .propose(raft, group, proposal.clone(), left, &self.peers, None)
                    .await;
                match proposed {
                    // Refused before it was appended (this node no longer leads, or it handed
                    // the group over meanwhile): the next leader takes it.
                    Err(WriteError::NoLeader(_)) => gone = Some((id, term)),
                    answer => return answer,
                }
                continue;
            }
            let Some(leader) = known_leader(raft, &self.peers).filter(|(l, _)| *l == id) else {
                continue; // the leader changed meanwhile: look again
            };
            match self.forward(group, &proposal, left, leader.clone()).await {
                Forwarded::Answer(answer) => return answer,
                Forwarded::Refused(_) => gone = Some((id, term)),
                Forwarded::NoGroup => {
                    return Err(WriteError::Stopped(format!(
                        "node {id} no longer runs group {group:?}"
                    )));
                }
            }
        }
    }

    /// Proposes `proposal` to `group`, which this node holds no replica of, at its leader: the
    /// one last seen, else each of `replicas` in turn until one answers or names the leader;
    /// at most `deadline` in all. Refusals before proposing (down, not the leader, the group
    /// not started there yet) move on to the next; a round of them all waits a little for an
    /// election to end.
    pub async fn propose_remote(
        &self,
        group: &str,
        replicas: &[u64],
        proposal: Proposal,
        deadline: Duration,
    ) -> Result<Applied, WriteError> {
        let hint = self.leaders().get(group).cloned();
        let mut last_hint = hint.clone();
        let mut targets = Targets::new(&self.peers, replicas, hint, deadline);
        loop {
            let Some((target, left)) = targets.next().await else {
                return Err(WriteError::NoLeader(last_hint));
            };
            match self.forward(group, &proposal, left, target.clone()).await {
                Forwarded::Answer(answer) => {
                    if answer.is_ok() {
                        self.leaders().insert(group.to_string(), target);
                    } else {
                        self.leaders().remove(group);
                    }
                    return answer;
                }
                Forwarded::Refused(named) => {
                    self.leaders().remove(group);
                    let named = named.filter(|l| l.0 != target.0);
                    if named.is_some() {
                        last_hint.clone_from(&named);
                    }
                    targets.follow(named);
                }
                Forwarded::NoGroup => {}
            }
        }
    }

    /// Proposes a batch of messages with ids to `group` here, this node leading it (the id
    /// check is made; see [`Proposals::propose`] for `resolve`). Refused with
    /// [`WriteError::NoLeader`], nothing proposed, if this node does not lead it.
    pub async fn propose_here(
        &self,
        raft: &Raft<PartitionRaft>,
        group: &str,
        batch: Bytes,
        deadline: Duration,
        resolve: Resolve,
    ) -> Result<Applied, WriteError> {
        let proposal = Proposal::Records(batch);
        (self.proposals)
            .propose(raft, group, proposal, deadline, &self.peers, Some(resolve))
            .await
    }

    /// Hands messages with ids for `group` to its leader's id check (the cluster port's
    /// `SendIds`): `leader` first when known, else each of `replicas` in turn, following the
    /// leader a refusal names, waiting a little after each round; at most `deadline` in all.
    /// Every message carries an id, so a request whose outcome is unknown (cut off, too slow)
    /// is simply made again at the next node: the leader answers an id it stored before with
    /// its first position.
    pub async fn send_ids(
        &self,
        group: &str,
        leader: Option<(u64, String)>,
        replicas: &[u64],
        batch: Bytes,
        deadline: Duration,
    ) -> Result<Vec<pb::Placement>, WriteError> {
        let hint = leader.or_else(|| self.leaders().get(group).cloned());
        let mut last = WriteError::NoLeader(hint.clone());
        let mut targets = Targets::new(&self.peers, replicas, hint, deadline);
        loop {
            let Some((target, left)) = targets.next().await else {
                return Err(last);
            };
            let mut client = self.client(&target.1)?;
            let mut request = tonic::Request::new(pb::SendIdsRequest {
                group: group.to_string(),
                batch: batch.clone(),
            });
            request.set_timeout(left);
            let status = match tokio::time::timeout(left, client.send_ids(request)).await {
                Ok(Ok(r)) => {
                    self.leaders().insert(group.to_string(), target);
                    return Ok(r.into_inner().placed);
                }
                Ok(Err(s)) => s,
                Err(_) => continue,
            };
            self.leaders().remove(group);
            // Not the leader (naming the one it knows), cancelled, or no answer about the
            // request at all: the next node is asked.
            if !(another_node_may_answer(&status)
                || matches!(status.code(), Code::FailedPrecondition | Code::Cancelled))
            {
                return Err(WriteError::from_status(&status, left));
            }
            last = WriteError::from_status(&status, left);
            if let WriteError::NoLeader(named) = &last {
                targets.follow(named.clone().filter(|l| l.0 != target.0));
            }
        }
    }

    /// Reads `req` from a node of `replicas` (see [`Forwarder::ask_replicas`]); the leader it
    /// names is asked first next time.
    pub async fn read_remote(
        &self,
        replicas: &[u64],
        req: pb::ReadRequest,
        deadline: Duration,
    ) -> Result<pb::ReadResponse, Status> {
        let group = req.group.clone();
        let (r, id) = self
            .ask_replicas(
                &group,
                replicas,
                deadline,
                Retry::WhileUnanswered,
                |mut client, request| {
                    let req = req.clone();
                    async move { client.read(request.map(|()| req)).await }
                },
            )
            .await?;
        let leader = r.leader.unwrap_or(id);
        self.leaders()
            .insert(group, (leader, self.peers.addr(leader, "")));
        Ok(r)
    }

    /// Asks a node of `replicas` to apply retention and compaction to group `group`'s
    /// partition now, as a `Compact` call through it would (see [`Forwarder::ask_replicas`]).
    pub async fn maintain_remote(
        &self,
        group: &str,
        replicas: &[u64],
        dry_run: bool,
        deadline: Duration,
    ) -> Result<pb::MaintainResponse, Status> {
        let req = pb::MaintainRequest {
            group: group.to_string(),
            dry_run,
        };
        self.ask_replicas(
            group,
            replicas,
            deadline,
            Retry::WhileUnanswered,
            |mut client, request| {
                let req = req.clone();
                async move { client.maintain(request.map(|()| req)).await }
            },
        )
        .await
        .map(|(r, _)| r)
    }

    /// Opens, at the node of `replicas` that leads consumer group `group` (its Raft group's
    /// name), the stream of a member relayed there (see [`Forwarder::ask_replicas`]; only the
    /// start of the stream has a deadline); and which node that is.
    pub async fn consume_remote(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        req: pb::ConsumeRequest,
        deadline: Duration,
    ) -> Result<(tonic::Streaming<pb::ConsumeResponse>, u64), Status> {
        self.ask_group_leader(
            group,
            leader,
            replicas,
            deadline,
            Retry::WhileUnanswered,
            |mut client, request| {
                let req = req.clone();
                async move {
                    let mut request = request.map(|()| req);
                    request.metadata_mut().remove("grpc-timeout");
                    client.consume(request).await
                }
            },
        )
        .await
    }

    /// Acks or nacks deliveries of consumer group `group` (its Raft group's name) at the node
    /// of `replicas` that leads it (see [`Forwarder::ask_replicas`]).
    pub async fn settle_remote(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        req: pb::SettleRequest,
        deadline: Duration,
    ) -> Result<pb::SettleResponse, Status> {
        self.ask_group_leader(
            group,
            leader,
            replicas,
            deadline,
            Retry::OnlyIfNotTaken,
            |mut client, request| {
                let req = req.clone();
                async move { client.settle(request.map(|()| req)).await }
            },
        )
        .await
        .map(|(answer, _)| answer)
    }

    /// Describes (and with `req.reset`, resets first) a consumer group at the node leading it,
    /// as [`Forwarder::settle_remote`] settles: a reset is not made twice.
    pub async fn administer_remote(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        req: pb::AdministerGroupRequest,
        deadline: Duration,
    ) -> Result<pb::AdministerGroupResponse, Status> {
        let retry = match req.reset {
            Some(_) => Retry::OnlyIfNotTaken,
            None => Retry::WhileUnanswered,
        };
        self.ask_group_leader(
            group,
            leader,
            replicas,
            deadline,
            retry,
            |mut client, request| {
                let req = req.clone();
                async move { client.administer_group(request.map(|()| req)).await }
            },
        )
        .await
        .map(|(answer, _)| answer)
    }

    /// Moves partition group `group`'s leadership to node `to`, at the node of `replicas` that
    /// leads it (`leader`, as this node knows it, asked first; see [`Forwarder::ask_replicas`]).
    pub async fn transfer_remote(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        to: u64,
        deadline: Duration,
    ) -> Result<pb::TransferLeaderResponse, Status> {
        let req = pb::TransferLeaderRequest {
            group: group.to_string(),
            to,
        };
        self.ask_group_leader(
            group,
            leader,
            replicas,
            deadline,
            Retry::OnlyIfNotTaken,
            |mut client, request| {
                let req = req.clone();
                async move { client.transfer_leader(request.map(|()| req)).await }
            },
        )
        .await
        .map(|(answer, _)| answer)
    }

    /// [`Forwarder::ask_replicas`] for a consumer group's call: `leader` (the one this node, a
    /// member of the group, knows) asked first, and the node that answered remembered as the
    /// leader for the next call. The answer, and who gave it.
    async fn ask_group_leader<T, F, Fut>(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        deadline: Duration,
        retry: Retry,
        call: F,
    ) -> Result<(T, u64), Status>
    where
        F: Fn(RaftClient<Channel>, tonic::Request<()>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.ask_first(group, leader);
        let (answer, id) = self
            .ask_replicas(group, replicas, deadline, retry, call)
            .await?;
        self.leaders()
            .insert(group.to_string(), (id, self.peers.addr(id, "")));
        Ok((answer, id))
    }

    /// [`Forwarder::ask_replicas`] asks `leader` first next time (the leader this node, a
    /// member of the group, knows), or, when none is known, the replicas in turn.
    fn ask_first(&self, group: &str, leader: Option<u64>) {
        let mut leaders = self.leaders();
        match leader {
            Some(id) => leaders.insert(group.to_string(), (id, self.peers.addr(id, ""))),
            None => leaders.remove(group),
        };
    }

    /// Calls `call` on a node of `replicas` (the leader last seen of `group`, else each in
    /// turn, waiting a little after each round), for a group this node holds no replica of; at
    /// most `deadline` in all. A node that cannot answer (down, cut off, the group not started
    /// there) is passed over; an answer that says what is wrong with the request
    /// (`OUT_OF_RANGE`, ...) is returned as it is. The answer, and who gave it.
    ///
    /// A call that must not be made twice (an ack: made again elsewhere after it took effect,
    /// it is answered as not in flight, which the member takes for not acknowledged) goes with
    /// [`Retry::OnlyIfNotTaken`]: the next node is asked only when the one before surely did
    /// nothing with it, and a call whose outcome is unknown (cut, timed out) is answered
    /// `UNAVAILABLE` saying so.
    async fn ask_replicas<T, F, Fut>(
        &self,
        group: &str,
        replicas: &[u64],
        deadline: Duration,
        retry: Retry,
        call: F,
    ) -> Result<(T, u64), Status>
    where
        F: Fn(RaftClient<Channel>, tonic::Request<()>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let until = Instant::now() + deadline;
        let seen = self.leaders().get(group).map(|l| l.0);
        let mut order: Vec<u64> = seen.into_iter().filter(|l| replicas.contains(l)).collect();
        order.extend(replicas.iter().filter(|&&r| Some(r) != seen));
        let mut last = Status::unavailable(format!(
            "no node holding {group:?} answered within {} ms",
            deadline.as_millis()
        ));
        for (k, &id) in order.iter().cycle().enumerate() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || order.is_empty() {
                return Err(last);
            }
            if k > 0 && k % order.len() == 0 {
                tokio::time::sleep(REMOTE_RETRY.min(left)).await;
            }
            let client = self
                .client(&self.peers.addr(id, ""))
                .map_err(|e| e.to_status())?;
            let mut request = tonic::Request::new(());
            request.set_timeout(left);
            let unknown = |why: &str| {
                Status::unavailable(format!(
                    "node {id}, leading {group:?}, {why}: whether it took the call is unknown"
                ))
            };
            match (
                tokio::time::timeout(left, call(client, request)).await,
                retry,
            ) {
                (Ok(Ok(r)), _) => return Ok((r.into_inner(), id)),
                (Ok(Err(s)), Retry::WhileUnanswered) if another_node_may_answer(&s) => last = s,
                (Ok(Err(s)), Retry::OnlyIfNotTaken) if not_taken(&s) => last = s,
                (Ok(Err(s)), Retry::OnlyIfNotTaken) if another_node_may_answer(&s) => {
                    return Err(unknown(&format!("failed ({})", s.message())));
                }
                (Ok(Err(s)), _) => return Err(s),
                (Err(_), Retry::WhileUnanswered) => {}
                (Err(_), Retry::OnlyIfNotTaken) => return Err(unknown("did not answer in time")),
            }
        }
        Err(last)
    }

    fn leaders(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, String)>> {
        self.leaders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `id`'s report of its groups, asked over its cluster port within `deadline`.
    pub async fn status(&self, id: u64, deadline: Duration) -> Result<pb::StatusResponse, String> {
        self.status_at(&self.peers.addr(id, ""), deadline).await
    }

    /// The report of the node whose cluster port is at `addr` (a node not yet in the cluster
    /// included), asked within `deadline`.
    pub async fn status_at(
        &self,
        addr: &str,
        deadline: Duration,
    ) -> Result<pb::StatusResponse, String> {
        let mut client = self.client(addr).map_err(|e| e.to_string())?;
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
            Err(s) if connection_refused(&s) => return Forwarded::Refused(None),
            // It no longer leads and proposed nothing: as good as down, for this proposal.
            Err(s) if s.metadata().contains_key(NOT_PROPOSED_METADATA) => {
                let named = match WriteError::from_status(&s, deadline) {
                    WriteError::NoLeader(leader) => leader,
                    _ => None,
                };
                return Forwarded::Refused(named);
            }
            // It runs no such group (not started yet, or the topic is gone): nothing proposed.
            Err(s) if s.code() == Code::NotFound => return Forwarded::NoGroup,
            // Cut off from this node, or its group stopped: the proposal may have arrived.
            Err(s) if s.code() == Code::Unavailable => Err(WriteError::NoLeader(Some(leader))),
            Err(s) => Err(WriteError::from_status(&s, deadline)),
        })
    }
}

/// Whom a request for a group goes to next, from a node that does not lead it: the leader
/// named (or last seen), else each of the group's nodes in turn; after a round in which every
/// one (and a leader named) refused, an election is under way, so it waits a little. None
/// once the deadline has passed.
struct Targets<'a> {
    peers: &'a Peers,
    replicas: &'a [u64],
    hint: Option<(u64, String)>,
    until: Instant,
    next: usize,
    attempts: usize,
}

impl<'a> Targets<'a> {
    fn new(
        peers: &'a Peers,
        replicas: &'a [u64],
        hint: Option<(u64, String)>,
        deadline: Duration,
    ) -> Self {
        Targets {
            peers,
            replicas,
            hint,
            until: Instant::now() + deadline,
            next: 0,
            attempts: 0,
        }
    }

    /// The next node to ask (id, cluster address) and the time left.
    async fn next(&mut self) -> Option<((u64, String), Duration)> {
        if self.attempts > 0 && self.attempts.is_multiple_of(self.replicas.len() + 1) {
            let left = self.until.saturating_duration_since(Instant::now());
            tokio::time::sleep(REMOTE_RETRY.min(left)).await;
        }
        self.attempts += 1;
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() || self.replicas.is_empty() {
            return None;
        }
        let target = match self.hint.take() {
            Some(leader) => leader,
            None => {
                let id = self.replicas[self.next % self.replicas.len()];
                self.next += 1;
                (id, self.peers.addr(id, ""))
            }
        };
        Some((target, left))
    }

    /// Asks the leader a refusal named next.
    fn follow(&mut self, leader: Option<(u64, String)>) {
        self.hint = leader;
    }
}

/// What forwarding a proposal came to.
enum Forwarded {
    Answer(Result<Applied, WriteError>),
    /// Nothing was proposed: the leader's port refused the connection, or the node no longer
    /// leads and said it proposed nothing (naming the leader it knows, if any).
    Refused(Option<(u64, String)>),
    /// Nothing was proposed: the node runs no such group.
    NoGroup,
}

/// Whether a call to a peer failed without an answer about the request itself, so that another
/// node holding the group may give one: the peer is down or does not run the group, was too
/// slow, or the connection failed under the call (a stopping peer's GOAWAY: `INTERNAL` with a
/// transport cause; a status the peer answered itself has no cause).
/// How [`Forwarder::ask`] goes on after a node failed to answer.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Asks the next node whenever another may answer (the call may be made twice).
    WhileUnanswered,
    /// Asks the next node only when this one did not take the call.
    OnlyIfNotTaken,
}

/// Whether a failed call surely did nothing: the connection was refused, the node said it
/// does not lead the group and did nothing, or it does not hold the group.
fn not_taken(status: &Status) -> bool {
    connection_refused(status)
        || status.metadata().contains_key(NOT_PROPOSED_METADATA)
        || status.code() == Code::NotFound
}

fn another_node_may_answer(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::NotFound | Code::DeadlineExceeded | Code::Unknown => true,
        Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
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
