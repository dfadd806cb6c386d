//! When each node of a group stands for election: at a different time from every other node,
//! in an order that rotates from group to group.
//!
//! openraft 0.9 draws a node's election timeout at random once, when the group starts, and
//! looks at it only on its tick (every 1.5 heartbeats: 300 ms by default). Drawn from one range
//! (800–1200 ms), two followers' timeouts often ended on the same tick, and the followers of a
//! group the catalog creates start it within a millisecond of each other (they apply the same
//! metadata entry at once), so their ticks fall together. When such a group's leader died,
//! both followers stood on the same tick round after round, each voted for itself and refused
//! the other, until their clocks drifted apart: 13 rounds (16 s) and once 27 rounds (30 s)
//! under the cluster tests.
//!
//! So no two nodes of a group share a timeout. The node at position `k` (in id order) of an
//! `n`-node cluster takes turn `(k + crc32(group)) mod n` and waits `E + turn × S`, where the
//! step `S` (1.75 heartbeats) is longer than a tick: whoever stands first does so at least a
//! fraction of a heartbeat before the next one's tick, and its vote request arrives first. The
//! turns rotate with the group's name, so each node goes first for about `1/n` of the groups,
//! and after a failover the leaders stay spread. openraft's leader lease (how long a follower
//! refuses to vote after the leader's last message) is its `election_timeout_max`: here a
//! millisecond past the node's own timeout.

use std::sync::Arc;
use std::time::Duration;

use openraft::{Config, SnapshotPolicy};

use super::config::Members;

/// openraft's settings for each turn, and which turn this node takes in a group.
#[derive(Debug, Clone)]
pub struct Elections {
    /// By turn.
    configs: Vec<Arc<Config>>,
    /// The cluster's nodes in id order.
    ids: Vec<u64>,
    /// This node's id.
    me: u64,
}

impl Elections {
    /// The settings of this node of `members`' cluster, or what is wrong with them.
    pub fn new(members: &Members) -> Result<Elections, String> {
        let ids = members.ids();
        if !ids.contains(&members.node_id) {
            return Err(format!("node {} is not among the peers", members.node_id));
        }
        let step = members.heartbeat_ms * 7 / 4;
        let configs = (0..ids.len() as u64)
            .map(|turn| {
                let timeout = members.election_timeout_ms + turn * step;
                let config = Config {
                    cluster_name: "sluice".into(),
                    heartbeat_interval: members.heartbeat_ms,
                    election_timeout_min: timeout,
                    election_timeout_max: timeout + 1,
                    // A partition's snapshot is its retention point, taken when one is applied
                    // (never by count); the log is purged right up to it: the messages below
                    // are gone everywhere.
                    snapshot_policy: SnapshotPolicy::Never,
                    max_in_snapshot_log_to_keep: 0,
                    ..Config::default()
                };
                config.validate().map(Arc::new).map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?;
        Ok(Elections {
            configs,
            ids,
            me: members.node_id,
        })
    }

    /// Node `node`'s turn in `group` (0 stands first), if it is one of the cluster's nodes.
    fn turn(&self, node: u64, group: &str) -> Option<usize> {
        let n = self.ids.len();
        let position = self.ids.iter().position(|&id| id == node)?;
        Some((position + crc32fast::hash(group.as_bytes()) as usize % n) % n)
    }

    /// openraft's settings for `group` on this node.
    pub fn config(&self, group: &str) -> Arc<Config> {
        let turn = self.turn(self.me, group).unwrap_or_default();
        Arc::clone(&self.configs[turn])
    }

    /// How long node `node` refuses to vote in `group` after its leader's last message (the
    /// longest lease of any node if it is not one of the cluster's).
    pub fn lease(&self, node: u64, group: &str) -> Duration {
        match self.turn(node, group) {
            Some(turn) => Duration::from_millis(self.configs[turn].election_timeout_max),
            None => self.longest_lease(),
        }
    }

    /// The longest a member of any group refuses to vote after its leader's last message.
    pub fn longest_lease(&self) -> Duration {
        let longest = self.configs.iter().map(|c| c.election_timeout_max).max();
        Duration::from_millis(longest.unwrap_or_default())
    }

    /// How often a leader tells its followers it is alive.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.configs[0].heartbeat_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::config::ClusterConfig;

    fn elections(node_id: u64, n: u64) -> Elections {
        let members = ClusterConfig {
            node_id,
            peers: (1..=n)
                .map(|i| format!("{i}@127.0.0.1:{}", 7000 + i))
                .collect(),
            replication_factor: n.min(3) as u32,
            ..ClusterConfig::default()
        }
        .members()
        .unwrap()
        .unwrap();
        Elections::new(&members).unwrap()
    }

    /// In every group, the nodes' timeouts differ by more than a tick (1.5 heartbeats), so
    /// that the first to stand is never tied with another; and each node goes first in some
    /// groups.
    #[test]
    fn no_two_nodes_of_a_group_stand_on_the_same_tick_and_each_goes_first_somewhere() {
        for n in [1, 2, 3, 5, 7] {
            let nodes: Vec<Elections> = (1..=n).map(|id| elections(id, n)).collect();
            let tick = nodes[0].heartbeat().as_millis() as u64 * 3 / 2;
            let mut first = vec![0; n as usize];
            for g in 0..300 {
                let group = format!("topic-{g}/0");
                let mut timeouts: Vec<u64> = nodes
                    .iter()
                    .map(|e| e.config(&group).election_timeout_min)
                    .collect();
                let leader = (0..n as usize).min_by_key(|&i| timeouts[i]).unwrap();
                first[leader] += 1;
                timeouts.sort_unstable();
                for pair in timeouts.windows(2) {
                    assert!(pair[1] - pair[0] > tick, "{n} nodes, {group}: {timeouts:?}");
                }
                for (i, e) in nodes.iter().enumerate() {
                    let c = e.config(&group);
                    assert!(e.longest_lease().as_millis() as u64 >= c.election_timeout_max);
                    assert!(
                        c.election_timeout_min >= 800,
                        "never sooner than configured"
                    );
                    for other in &nodes {
                        let lease = other.lease(i as u64 + 1, &group).as_millis() as u64;
                        assert_eq!(lease, c.election_timeout_max, "every node knows its lease");
                    }
                }
            }
            let fair = 300 / n as usize;
            for (i, &f) in first.iter().enumerate() {
                assert!(
                    f > fair / 2,
                    "{n} nodes: node {} first in {f} of 300 groups",
                    i + 1
                );
            }
        }
    }
}
