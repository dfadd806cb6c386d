//! Handing a group's leadership over when its leader stops (`SIGTERM`), so that the next
//! leader is elected at once rather than after two election timeouts.
//!
//! openraft 0.9 has no leadership transfer, and a member refuses to vote while its lease of the
//! leader runs (its `election_timeout_max` after the leader's last message: see
//! [`super::elections`]). Left alone, both
//! followers of a stopped leader time out within that lease, each stands for election, is
//! refused by the other, and they try again a timeout later. Handed over, the stopping leader
//! lets the most caught-up follower have every entry and stops, then tells the others to hold
//! their own elections and that follower to stand once the leases have run out: one election,
//! by a member that has every entry, right after the lease.
//!
//! A leadership is moved without a stop the same way ([`transfer`]: `transfer-leader` and the
//! leader balancer): the leader holds new proposals, waits until the chosen member has every
//! entry, and falls silent (heartbeats off) instead of stopping; the new leader's first message
//! makes it a follower.

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;

use super::elections::Elections;
use super::peers::Peers;
use super::types::PartitionRaft;
use super::wire;
use super::write::Proposals;
use crate::proto::cluster as pb;

/// How often a stopping leader looks whether its group is quiet and a follower caught up.
const QUIET_POLL: Duration = Duration::from_millis(5);

/// Whether follower `id` is known to hold every entry of this leader's log.
fn holds_every_entry(m: &openraft::RaftMetrics<u64, openraft::BasicNode>, id: u64) -> bool {
    m.replication
        .as_ref()
        .and_then(|r| r.get(&id).copied().flatten())
        .map(|l| l.index)
        == m.last_log_index
}

/// Waits until no proposal of the group is under way (`busy`) and a follower (`to`, or any when
/// `None`) holds every entry; false if that is not so by `until`.
async fn until_caught_up(
    raft: &Raft<PartitionRaft>,
    to: Option<u64>,
    busy: impl Fn() -> bool,
    until: tokio::time::Instant,
) -> bool {
    while tokio::time::Instant::now() < until {
        let m = raft.metrics().borrow().clone();
        let mut members = m.membership_config.membership().voter_ids();
        let caught_up = match to {
            Some(to) => holds_every_entry(&m, to),
            None => members.any(|id| id != m.id && holds_every_entry(&m, id)),
        };
        if !busy() && caught_up {
            return true;
        }
        tokio::time::sleep(QUIET_POLL).await;
    }
    false
}

/// Stops `group` here, as its leader: waits (up to one lease) until no proposal of it is under
/// way (`busy`) and a follower holds every entry, stops the group (no message of it leaves this
/// node afterwards, so every member's lease runs from before the next step), then, if a
/// follower is known to hold every entry, tells the members how to elect it. Returns the
/// member chosen. This node must take no new proposal of the group meanwhile.
pub async fn stop_handing_over(
    raft: &Raft<PartitionRaft>,
    group: &str,
    peers: &Peers,
    elections: &Elections,
    busy: impl Fn() -> bool,
) -> Option<u64> {
    let me = raft.metrics().borrow().id;
    let until = tokio::time::Instant::now() + elections.longest_lease();
    let waited = until_caught_up(raft, None, busy, until).await;
    // What the group knows as it stops (openraft's metrics after the stop no longer say what
    // each follower holds). Only a follower known to hold every entry of this leader's log
    // holds at least as much as any other member, so it alone may be chosen.
    let metrics = raft.metrics().borrow().clone();
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(group, error = %e, "a group did not stop cleanly");
    }
    if metrics.current_leader != Some(me) {
        return None;
    }
    let Some(chosen) = metrics
        .membership_config
        .membership()
        .voter_ids()
        .find(|&id| id != me && holds_every_entry(&metrics, id))
    else {
        tracing::info!(
            group,
            caught_up = waited,
            "no follower is known to hold every entry: the members elect as usual"
        );
        return None;
    };
    tell_members(&metrics, chosen, group, peers, elections).await;
    Some(chosen)
}

/// Why a leadership was not transferred.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("this node does not lead the group")]
    NotLeader,
    #[error("node {0} holds no replica of the group")]
    NotAMember(u64),
    #[error(
        "node {to} did not catch up with the leader within {} ms; the leader stays",
        waited.as_millis()
    )]
    NotCaughtUp { to: u64, waited: Duration },
    #[error(
        "node {to} did not take the leadership over within {} ms; the leader is now {}",
        waited.as_millis(),
        leader.map_or_else(|| "unknown".to_string(), |l| format!("node {l}"))
    )]
    NotTaken {
        to: u64,
        waited: Duration,
        leader: Option<u64>,
    },
}

/// Moves `group`'s leadership from this node to member `to`, without stopping: holds new
/// proposals of the group (they wait in `proposals`, then go to the new leader), waits until
/// `to` holds every entry, falls silent (no heartbeat), and tells the members as
/// [`stop_handing_over`] does. Answers the leader and its term once `to` leads.
pub async fn transfer(
    raft: &Raft<PartitionRaft>,
    group: &str,
    to: u64,
    peers: &Peers,
    elections: &Elections,
    proposals: &Arc<Proposals>,
) -> Result<(u64, u64), TransferError> {
    let m = raft.metrics().borrow().clone();
    let me = m.id;
    if m.current_leader != Some(me) {
        return Err(TransferError::NotLeader);
    }
    if to == me {
        return Ok((me, m.current_term));
    }
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|id| id == to)
    {
        return Err(TransferError::NotAMember(to));
    }
    let held = proposals.hold(group);
    let lease = elections.longest_lease();
    let until = tokio::time::Instant::now() + lease;
    if !until_caught_up(raft, Some(to), || proposals.busy(group), until).await {
        return Err(TransferError::NotCaughtUp { to, waited: lease });
    }
    raft.runtime_config().heartbeat(false);
    let metrics = raft.metrics().borrow().clone();
    tell_members(&metrics, to, group, peers, elections).await;
    // The members hold their own elections for three leases; a transfer not done in two gives
    // the leadership back to the usual elections.
    let waited = lease * 2;
    let mut watched = raft.metrics();
    let new_leader = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>| {
        m.current_leader.is_some_and(|l| l != me)
    };
    let _ = tokio::time::timeout(waited, watched.wait_for(new_leader)).await;
    raft.runtime_config().heartbeat(true);
    drop(held);
    let m = raft.metrics().borrow().clone();
    match m.current_leader {
        Some(leader) if leader == to => Ok((leader, m.current_term)),
        leader => Err(TransferError::NotTaken { to, waited, leader }),
    }
}

/// Tells every member of the group but this leader how to elect `chosen` (a member holding
/// every entry) now that this leader has fallen silent: `chosen` stands once every other
/// member's lease has run out (it needs their votes); the others hold their own elections for
/// three leases, after which a handover that failed (`chosen` died too) ends in an ordinary
/// election.
async fn tell_members(
    metrics: &openraft::RaftMetrics<u64, openraft::BasicNode>,
    chosen: u64,
    group: &str,
    peers: &Peers,
    elections: &Elections,
) {
    let me = metrics.id;
    let membership = metrics.membership_config.membership();
    let members: Vec<u64> = membership.voter_ids().filter(|&id| id != me).collect();
    let elect_after = members
        .iter()
        .filter(|&&id| id != chosen)
        .map(|&id| elections.lease(id, group))
        .max()
        .unwrap_or_default();
    let hold = elections.longest_lease() * 3;
    for (&id, node) in membership.nodes().filter(|(id, _)| members.contains(id)) {
        let addr = peers.addr(id, &node.addr);
        let request = pb::HandOverRequest {
            group: group.to_string(),
            elect: id == chosen,
            elect_after_ms: elect_after.as_millis() as u64,
            hold_ms: hold.as_millis() as u64,
            from: me,
        };
        let told = async {
            let mut request = tonic::Request::new(request);
            request.set_timeout(elections.heartbeat());
            wire::client(peers.channel(&addr)?)
                .hand_over(request)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = told.await {
            tracing::warn!(group, node = id, error = %e, "a member did not hear of the handover; it elects as usual");
        }
    }
}

/// A member's side of [`stop_handing_over`]: holds this member's elections for `hold_ms`; if `elect`,
/// stands for election after `elect_after_ms` and again every `retry` until a leader other than
/// `from` is known. Returns at once; the rest runs on its own task.
pub fn take_over(raft: Raft<PartitionRaft>, request: &pb::HandOverRequest, retry: Duration) {
    raft.runtime_config().elect(false);
    let hold = Duration::from_millis(request.hold_ms);
    let after = Duration::from_millis(request.elect_after_ms);
    let (elect, from) = (request.elect, request.from);
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + hold;
        if elect {
            tokio::time::sleep(after).await;
            while tokio::time::Instant::now() < until {
                let leader = raft.metrics().borrow().current_leader;
                if leader.is_some_and(|l| l != from) || raft.trigger().elect().await.is_err() {
                    break;
                }
                tokio::time::sleep(retry).await;
            }
        }
        tokio::time::sleep_until(until).await;
        raft.runtime_config().elect(true);
    });
}
