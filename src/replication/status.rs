//! What the cluster looks like: each node's own report of its groups (`Status` on the cluster
//! port), and the one view `sluice cluster status` shows, merged from every node's report.

use std::collections::BTreeMap;

use openraft::{Raft, ServerState};

use super::types::PartitionRaft;
use crate::proto::cluster as pb;

/// This node's report of one group.
pub fn group_status(group: &str, raft: &Raft<PartitionRaft>) -> pb::GroupStatus {
    let m = raft.metrics().borrow().clone();
    let matched = match (&m.replication, m.state) {
        (Some(replication), ServerState::Leader) => replication
            .iter()
            .map(|(&node_id, log_id)| pb::Matched {
                node_id,
                index: log_id.map(|l| l.index),
            })
            .collect(),
        _ => Vec::new(),
    };
    pb::GroupStatus {
        group: group.to_string(),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.map(|l| l.index),
        voters: m.membership_config.membership().voter_ids().collect(),
        joint: m.membership_config.membership().get_joint_config().len() > 1,
        matched,
        millis_since_quorum_ack: m.millis_since_quorum_ack,
    }
}

/// One node as the answering node reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: u64,
    pub address: String,
    /// Why it could not be asked; `None` when it answered.
    pub error: Option<String>,
}

/// One group as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub group: String,
    pub term: u64,
    pub leader: Option<u64>,
    /// Each member and how many entries it is behind the leader (`None`: not known).
    pub replicas: Vec<(u64, Option<u64>)>,
}

/// What every reachable node reported, merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub node_id: u64,
    pub nodes: Vec<NodeView>,
    /// By group name, in order.
    pub groups: BTreeMap<String, GroupView>,
}

/// Merges the reports of every node (id, address, its report or why it could not be asked).
///
/// A group's leader is the node that reports leading it in the newest term (it alone knows how
/// far each member is), unless no majority has acknowledged it for over `stale_ms` (it can
/// commit nothing: no leader); when no reachable node leads, the leader the reachable nodes of
/// the newest term name (how far behind each member is then unknown); else none.
pub fn merge(
    node_id: u64,
    reports: Vec<(u64, String, Result<pb::StatusResponse, String>)>,
    stale_ms: u64,
) -> ClusterView {
    let mut nodes = Vec::new();
    let mut by_group: BTreeMap<String, Vec<(u64, pb::GroupStatus)>> = BTreeMap::new();
    for (id, address, report) in reports {
        match report {
            Ok(r) => {
                nodes.push(NodeView {
                    id,
                    address,
                    error: None,
                });
                for g in r.groups {
                    by_group.entry(g.group.clone()).or_default().push((id, g));
                }
            }
            Err(e) => nodes.push(NodeView {
                id,
                address,
                error: Some(e),
            }),
        }
    }
    nodes.sort_by_key(|n| n.id);
    let groups = by_group
        .into_iter()
        .map(|(name, reports)| {
            let term = reports.iter().map(|(_, g)| g.term).max().unwrap_or(0);
            let newest = || reports.iter().filter(|(_, g)| g.term == term);
            // At most one leader per term (Raft), and it knows it leads.
            let leading = newest().find(|(id, g)| g.leader == Some(*id));
            let stale =
                |g: &pb::GroupStatus| g.millis_since_quorum_ack.is_none_or(|ms| ms > stale_ms);
            let leading = leading.filter(|(_, g)| !stale(g));
            let claimed = newest().any(|(id, g)| g.leader == Some(*id));
            let leader = match (leading, claimed) {
                (Some((id, _)), _) => Some(*id),
                (None, true) => None,
                (None, false) => newest().find_map(|(_, g)| g.leader),
            };
            // The leader's voters (a follower may not have the newest change yet), else those
            // of the newest term.
            let voters = leading
                .or_else(|| reports.iter().max_by_key(|(_, g)| g.term))
                .map(|(_, g)| g.voters.clone())
                .unwrap_or_default();
            let replicas = voters
                .iter()
                .map(|&v| {
                    let behind = leading.and_then(|(leader, g)| {
                        if v == *leader {
                            return Some(0);
                        }
                        let last = g.last_log_index?;
                        let matched = g.matched.iter().find(|m| m.node_id == v)?.index?;
                        Some(last.saturating_sub(matched))
                    });
                    (v, behind)
                })
                .collect();
            let view = GroupView {
                group: name.clone(),
                term,
                leader,
                replicas,
            };
            (name, view)
        })
        .collect();
    ClusterView {
        node_id,
        nodes,
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(
        term: u64,
        leader: Option<u64>,
        last: u64,
        matched: &[(u64, Option<u64>)],
    ) -> pb::GroupStatus {
        pb::GroupStatus {
            group: "t/0".into(),
            term,
            leader,
            last_log_index: Some(last),
            last_applied: Some(last),
            voters: vec![1, 2, 3],
            matched: matched
                .iter()
                .map(|&(node_id, index)| pb::Matched { node_id, index })
                .collect(),
            millis_since_quorum_ack: (leader == Some(1) || !matched.is_empty()).then_some(100),
            joint: false,
        }
    }

    fn report(
        node: u64,
        g: Option<pb::GroupStatus>,
    ) -> (u64, String, Result<pb::StatusResponse, String>) {
        let r = match g {
            Some(g) => Ok(pb::StatusResponse {
                node_id: node,
                groups: vec![g],
                cluster_id: String::new(),
            }),
            None => Err("unreachable".into()),
        };
        (node, format!("n{node}"), r)
    }

    #[test]
    fn the_leader_of_the_newest_term_says_how_far_each_replica_is_behind() {
        let caught_up = [(1, Some(9)), (2, Some(9)), (3, Some(4))];
        // What the nodes report → leader, and each replica's lag.
        type Case = (
            &'static str,
            Vec<(u64, Option<pb::GroupStatus>)>,
            Option<u64>,
            Vec<Option<u64>>,
        );
        let table: Vec<Case> = vec![
            (
                "all reachable: the leader's own view",
                vec![
                    (1, Some(group(2, Some(1), 9, &caught_up))),
                    (2, Some(group(2, Some(1), 9, &[]))),
                    (3, Some(group(2, Some(1), 4, &[]))),
                ],
                Some(1),
                vec![Some(0), Some(0), Some(5)],
            ),
            (
                "the leader unreachable: named by the others, lag unknown",
                vec![
                    (1, None),
                    (2, Some(group(2, Some(1), 9, &[]))),
                    (3, Some(group(2, Some(1), 4, &[]))),
                ],
                Some(1),
                vec![None, None, None],
            ),
            (
                "a paused old leader still claims an older term",
                vec![
                    (1, Some(group(2, Some(1), 12, &caught_up))),
                    (2, Some(group(3, Some(2), 9, &[(2, Some(9)), (3, None)]))),
                    (3, Some(group(3, Some(2), 9, &[]))),
                ],
                Some(2),
                vec![None, Some(0), None],
            ),
            (
                "a leader alone, unacknowledged for longer than an election: no leader",
                vec![
                    (
                        1,
                        Some(pb::GroupStatus {
                            millis_since_quorum_ack: Some(5_000),
                            ..group(2, Some(1), 12, &caught_up)
                        }),
                    ),
                    (2, None),
                    (3, None),
                ],
                None,
                vec![None, None, None],
            ),
            (
                "an election under way: no leader",
                vec![
                    (1, None),
                    (2, Some(group(3, None, 9, &[]))),
                    (3, Some(group(3, None, 9, &[]))),
                ],
                None,
                vec![None, None, None],
            ),
        ];
        for (what, reports, leader, behind) in table {
            let reports = reports.into_iter().map(|(n, g)| report(n, g)).collect();
            let view = merge(2, reports, 2_000);
            let g = &view.groups["t/0"];
            assert_eq!(g.leader, leader, "{what}");
            let lag: Vec<Option<u64>> = g.replicas.iter().map(|(_, b)| *b).collect();
            assert_eq!(lag, behind, "{what}");
            assert_eq!(
                view.nodes.len(),
                3,
                "{what}: every node listed, reachable or not"
            );
        }
    }
}
