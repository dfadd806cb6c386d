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

use std::time::Duration;

use openraft::Raft;

use super::elections::Elections;
use super::peers::Peers;
use super::types::PartitionRaft;
use super::wire;
use crate::proto::cluster as pb;

/// How often a stopping leader looks whether its group is quiet and a follower caught up.
const QUIET_POLL: Duration = Duration::from_millis(5);

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
    let holds_every_entry = |m: &openraft::RaftMetrics<u64, openraft::BasicNode>, id: u64| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(&id).copied().flatten())
            .map(|l| l.index)
            == m.last_log_index
    };
    let until = tokio::time::Instant::now() + elections.longest_lease();
    let mut waited = false;
    while tokio::time::Instant::now() < until {
        let m = raft.metrics().borrow().clone();
        let members = m.membership_config.membership().voter_ids();
        if !busy()
            && members
                .filter(|&id| id != me)
                .any(|id| holds_every_entry(&m, id))
        {
            waited = true;
            break;
        }
        tokio::time::sleep(QUIET_POLL).await;
    }
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
    let members: Vec<u64> = metrics
        .membership_config
        .membership()
        .voter_ids()
        .filter(|&id| id != me)
        .collect();
    let Some(chosen) = members
        .iter()
        .copied()
        .find(|&id| holds_every_entry(&metrics, id))
    else {
        tracing::info!(
            group,
            caught_up = waited,
            "no follower is known to hold every entry: the members elect as usual"
        );
        return None;
    };
    let addresses: Vec<(u64, String)> = metrics
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| members.contains(id))
        .map(|(&id, node)| (id, peers.addr(id, &node.addr)))
        .collect();
    // The chosen one stands once every other member's lease has run out (it needs their
    // votes); the others hold their own elections for three leases, after which a handover
    // that failed (the chosen member died too) ends in an ordinary election.
    let elect_after = members
        .iter()
        .filter(|&&id| id != chosen)
        .map(|&id| elections.lease(id, group))
        .max()
        .unwrap_or_default();
    let hold = elections.longest_lease() * 3;
    for (id, addr) in addresses {
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
    Some(chosen)
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
