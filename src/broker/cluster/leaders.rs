//! Moving partition leaderships: `transfer-leader` (one partition, to a named replica) and the
//! leader balancer (every partition, so that no node leads more than its share), on demand and
//! every `cluster.leader_balance_interval_ms` on the metadata group's leader. The moves
//! themselves are `handover::transfer`s at each partition's leader; the plan is
//! `balance::plan`'s; `Cluster` calls these with what they need.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use crate::broker::error::{Error, Result};
use crate::replication::balance::{Led, Move};
use crate::replication::catalog::parse_group_name;
use crate::replication::status::ClusterView;
use crate::replication::write::Forwarder;

/// How many leaderships a rebalance moves at once (each waits about one election timeout).
const MOVES_AT_ONCE: usize = 8;

/// A leadership move of a rebalance and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderMove {
    pub topic: String,
    pub partition: u32,
    pub from: u64,
    pub to: u64,
    /// Why it was not made; `None` when it was (or would be, for a dry run).
    pub error: Option<String>,
}

/// What a rebalance did: its moves, and how many partitions each node leads afterwards (as
/// planned for a dry run, as the cluster reports it after the moves otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rebalanced {
    pub moves: Vec<LeaderMove>,
    pub leaders: Vec<(u64, u32)>,
}

/// Moves `group`'s leadership to `to`, asking its leader (`leader` first, as known) within
/// `deadline`: the leader and its term once done.
pub(super) async fn move_leader(
    forwarder: &Forwarder,
    group: &str,
    leader: Option<u64>,
    replicas: &[u64],
    to: u64,
    deadline: Duration,
) -> Result<(u64, u64)> {
    let answer = forwarder
        .transfer_remote(group, leader, replicas, to, deadline)
        .await;
    match answer {
        Ok(moved) => Ok((moved.leader, moved.term)),
        Err(s) if s.code() == Code::InvalidArgument => {
            Err(Error::InvalidArgument(s.message().to_string()))
        }
        Err(s) => Err(Error::Unavailable(format!(
            "the leadership of {group:?} was not moved to node {to}: {}",
            s.message()
        ))),
    }
}

/// The reachable nodes and the partition groups of `view`, as the balancer sees them.
pub(super) fn placement(view: &ClusterView) -> (Vec<u64>, Vec<Led>) {
    let nodes = view
        .nodes
        .iter()
        .filter(|n| n.error.is_none())
        .map(|n| n.id)
        .collect();
    let groups = view
        .groups
        .iter()
        .filter(|(name, _)| parse_group_name(name).is_some())
        .map(|(name, g)| Led {
            group: name.clone(),
            leader: g.leader,
            replicas: g.replicas.iter().map(|&(id, _)| id).collect(),
        })
        .collect();
    (nodes, groups)
}

/// `groups` with `moves` made, as planned.
pub(super) fn after_moves(groups: &[Led], moves: &[Move]) -> Vec<Led> {
    let mut planned = groups.to_vec();
    for m in moves {
        if let Some(g) = planned.iter_mut().find(|g| g.group == m.group) {
            g.leader = Some(m.to);
        }
    }
    planned
}

/// Makes `moves` (of `groups`), up to [`MOVES_AT_ONCE`] at a time: each with why it failed, if
/// it did.
pub(super) async fn make_moves(
    forwarder: &Arc<Forwarder>,
    groups: &[Led],
    moves: Vec<Move>,
    deadline: Duration,
) -> Result<Vec<(Move, Option<String>)>> {
    let mut done = Vec::with_capacity(moves.len());
    let mut running = tokio::task::JoinSet::new();
    let mut moves = moves.into_iter();
    loop {
        while running.len() < MOVES_AT_ONCE {
            let Some(m) = moves.next() else { break };
            let replicas = groups
                .iter()
                .find(|g| g.group == m.group)
                .map(|g| g.replicas.clone())
                .unwrap_or_default();
            let forwarder = Arc::clone(forwarder);
            running.spawn(async move {
                let moved = move_leader(
                    &forwarder,
                    &m.group,
                    Some(m.from),
                    &replicas,
                    m.to,
                    deadline,
                );
                let error = moved.await.err().map(|e| e.to_string());
                (m, error)
            });
        }
        match running.join_next().await {
            Some(Ok(outcome)) => done.push(outcome),
            Some(Err(e)) => return Err(Error::Internal(format!("a leader move failed: {e}"))),
            None => return Ok(done),
        }
    }
}

/// A rebalance's report: `done`'s moves, and how many of `groups` each of `nodes` leads.
pub(super) fn rebalanced(
    done: Vec<(Move, Option<String>)>,
    nodes: &[u64],
    groups: &[Led],
) -> Rebalanced {
    let moves = done
        .into_iter()
        .filter_map(|(m, error)| {
            let (topic, partition) = parse_group_name(&m.group)?;
            Some(LeaderMove {
                topic: topic.to_string(),
                partition,
                from: m.from,
                to: m.to,
                error,
            })
        })
        .collect();
    let leaders = nodes
        .iter()
        .map(|&n| {
            let count = groups.iter().filter(|g| g.leader == Some(n)).count();
            (n, count as u32)
        })
        .collect();
    Rebalanced { moves, leaders }
}
