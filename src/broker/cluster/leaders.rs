//! Moving partition leaderships: `transfer-leader` (one partition, to a named replica) and the
//! leader balancer (every partition, so that no node leads more than its share), on demand and
//! every `cluster.leader_balance_interval_ms` on the metadata group's leader. The moves
//! themselves are [`handover::transfer`]s at each partition's leader; the plan is
//! [`balance::plan`]'s.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::Cluster;
use crate::broker::error::{Error, Result};
use crate::broker::topic::Topic;
use crate::replication::balance::{self, Led, Move};
use crate::replication::catalog::parse_group_name;

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

impl Cluster {
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
        self.move_leader(&group, leader, &replicas, to).await
    }

    /// Moves `group`'s leadership to `to`, asking its leader (`leader` first, as known).
    async fn move_leader(
        &self,
        group: &str,
        leader: Option<u64>,
        replicas: &[u64],
        to: u64,
    ) -> Result<(u64, u64)> {
        let answer = self
            .forwarder
            .transfer_remote(group, leader, replicas, to, self.write_timeout)
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

    /// Spreads partition leaders across the nodes that answer (see [`balance::plan`]): with
    /// `dry_run`, only says which moves it would make.
    pub async fn rebalance_leaders(self: &Arc<Self>, dry_run: bool) -> Result<Rebalanced> {
        let view = self.status().await;
        let nodes: Vec<u64> = view
            .nodes
            .iter()
            .filter(|n| n.error.is_none())
            .map(|n| n.id)
            .collect();
        let groups: Vec<Led> = view
            .groups
            .iter()
            .filter(|(name, _)| parse_group_name(name).is_some())
            .map(|(name, g)| Led {
                group: name.clone(),
                leader: g.leader,
                replicas: g.replicas.iter().map(|&(id, _)| id).collect(),
            })
            .collect();
        let moves = balance::plan(&nodes, &groups);
        let mut done = Vec::with_capacity(moves.len());
        if dry_run {
            let mut planned = groups.clone();
            for m in &moves {
                if let Some(g) = planned.iter_mut().find(|g| g.group == m.group) {
                    g.leader = Some(m.to);
                }
            }
            done.extend(moves.into_iter().map(|m| (m, None)));
            return Ok(rebalanced(done, &nodes, &planned));
        }
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
                let cluster = Arc::clone(self);
                running.spawn(async move {
                    let moved = cluster.move_leader(&m.group, Some(m.from), &replicas, m.to);
                    let error = moved.await.err().map(|e| e.to_string());
                    (m, error)
                });
            }
            match running.join_next().await {
                Some(Ok(outcome)) => done.push(outcome),
                Some(Err(e)) => return Err(Error::Internal(format!("a leader move failed: {e}"))),
                None => break,
            }
        }
        let after = self.status().await;
        let led: Vec<Led> = after
            .groups
            .iter()
            .filter(|(name, _)| parse_group_name(name).is_some())
            .map(|(name, g)| Led {
                group: name.clone(),
                leader: g.leader,
                replicas: Vec::new(),
            })
            .collect();
        Ok(rebalanced(done, &nodes, &led))
    }

    /// Every `interval`, while this node leads the metadata group, rebalances the partition
    /// leaders (moving none when they are spread already).
    pub(super) async fn balance_leaders(
        self: Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
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
}

/// A rebalance's report: `done`'s moves, and how many of `groups` each of `nodes` leads.
fn rebalanced(done: Vec<(Move, Option<String>)>, nodes: &[u64], groups: &[Led]) -> Rebalanced {
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
