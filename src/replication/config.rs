//! `[cluster]`: the settings of a node in cluster mode, and their checks at start.
//!
//! No `peers` means no cluster: the broker runs as today's single node. With `peers`, each
//! entry is `<id>@<host>:<port>` (the founding members and their cluster ports), `node_id` names
//! this node among them, and every mistake below is refused at start with what is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `[cluster]`. Cluster mode is on when `peers` is not empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: stable, unique, greater than 0. Default: 0 (not set).
    pub node_id: u64,
    /// Address of the cluster port (Raft traffic between nodes). Default: empty, which means
    /// this node's address in `peers`.
    pub listen: String,
    /// The founding members, `<id>@<host>:<port>` each, this node included. Default: empty
    /// (a single node, no cluster).
    pub peers: Vec<String>,
    /// Replicas of each partition of a new topic. Default: 3.
    pub replication_factor: u32,
    /// The election timeout E, in ms. In each group the nodes take turns (see
    /// `replication::elections`): the node whose turn is `t` waits `T = E + t × 1.75 heartbeats`;
    /// a follower that hears nothing from its leader for `T` (openraft's leader lease, during
    /// which it also refuses to vote for another) plus another `T` starts an election, and a
    /// candidate that was not elected tries again after `T`. Default: 800.
    pub election_timeout_ms: u64,
    /// How often a leader tells its followers it is alive, in ms. Default: 200.
    pub heartbeat_ms: u64,
    /// How often the metadata group's leader spreads partition leaders across the nodes (the
    /// leader balancer, as `sluice cluster rebalance` does on demand), in ms; 0: never.
    /// Default: 300000 (5 minutes).
    pub leader_balance_interval_ms: u64,
    /// This node joins a running cluster (`sluice cluster add-node`) instead of founding one:
    /// `peers` then lists the cluster's nodes it can reach and itself, and the node forms no
    /// group; it waits, not ready, until the cluster adds it. Default: false.
    pub join: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 0,
            listen: String::new(),
            peers: Vec::new(),
            replication_factor: 3,
            election_timeout_ms: 800,
            heartbeat_ms: 200,
            leader_balance_interval_ms: 300_000,
            join: false,
        }
    }
}

/// The checked cluster settings of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    pub node_id: u64,
    /// Where this node's cluster port listens.
    pub listen: SocketAddr,
    /// Every founding member's id and cluster address, this node included.
    pub peers: BTreeMap<u64, String>,
    pub replication_factor: u32,
    pub election_timeout_ms: u64,
    pub heartbeat_ms: u64,
    /// 0: no leader balancer.
    pub leader_balance_interval_ms: u64,
    /// Joins a running cluster rather than founding one ([`ClusterConfig::join`]).
    pub join: bool,
}

impl Members {
    /// Every founding member's id, this node's included, in order.
    pub fn ids(&self) -> Vec<u64> {
        self.peers.keys().copied().collect()
    }
}

impl ClusterConfig {
    /// Whether this node runs in cluster mode.
    pub fn enabled(&self) -> bool {
        !self.peers.is_empty()
    }

    /// The checked settings, `None` without a cluster, or what is wrong.
    pub fn members(&self) -> Result<Option<Members>, String> {
        if !self.enabled() {
            if self.node_id != 0 || !self.listen.trim().is_empty() {
                return Err(
                    "cluster.node_id or cluster.listen is set but cluster.peers is \
                            empty: list the founding members (`<id>@<host>:<port>`), or remove \
                            the [cluster] section to run a single node"
                        .into(),
                );
            }
            return Ok(None);
        }
        if self.node_id == 0 {
            return Err(
                "cluster.node_id must be set, greater than 0, and one of the ids in \
                        cluster.peers"
                    .into(),
            );
        }
        let mut peers = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        for peer in &self.peers {
            let (id, addr) = parse_peer(peer)?;
            if let Some(first) = peers.insert(id, addr.clone()) {
                return Err(format!(
                    "cluster.peers names node {id} twice ({first} and {addr}): each id is one \
                     node"
                ));
            }
            if let Some(other) = addresses.insert(addr.clone(), id) {
                return Err(format!(
                    "cluster.peers gives nodes {other} and {id} one address ({addr}): each node \
                     has its own cluster port"
                ));
            }
        }
        let Some(own) = peers.get(&self.node_id) else {
            let ids: Vec<String> = peers.keys().map(u64::to_string).collect();
            return Err(format!(
                "cluster.node_id = {} is not among cluster.peers (ids {}): a founding node \
                 must be one of them",
                self.node_id,
                ids.join(", ")
            ));
        };
        let listen_text = match self.listen.trim() {
            "" => own.as_str(),
            l => l,
        };
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            format!(
                "cluster.listen = {listen_text:?}: expected an address such as 0.0.0.0:7170 (or \
                 leave it empty and give node {} an IP address in cluster.peers)",
                self.node_id
            )
        })?;
        if let Ok(own_addr) = own.parse::<SocketAddr>()
            && own_addr.port() != listen.port()
        {
            return Err(format!(
                "cluster.listen = {listen} but cluster.peers says node {} is at {own}: the \
                 other nodes would not reach this one (is this the node_id of another node?)",
                self.node_id
            ));
        }
        let n = peers.len() as u32;
        if self.replication_factor == 0 || self.replication_factor > n {
            return Err(format!(
                "cluster.replication_factor = {} must be between 1 and the number of peers ({n})",
                self.replication_factor
            ));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms < 3 * self.heartbeat_ms {
            return Err(format!(
                "cluster.election_timeout_ms = {} must be at least three heartbeats \
                 (cluster.heartbeat_ms = {}, greater than 0), or followers would elect a new \
                 leader while the old one is fine",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        Ok(Some(Members {
            node_id: self.node_id,
            listen,
            peers,
            replication_factor: self.replication_factor,
            election_timeout_ms: self.election_timeout_ms,
            heartbeat_ms: self.heartbeat_ms,
            leader_balance_interval_ms: self.leader_balance_interval_ms,
            join: self.join,
        }))
    }
}

/// `<id>@<host>:<port>`.
pub fn parse_peer(peer: &str) -> Result<(u64, String), String> {
    let bad = |why: &str| {
        Err(format!(
            "cluster.peers entry {peer:?}: {why}; expected `<id>@<host>:<port>` such as \
             \"1@10.0.0.1:7170\""
        ))
    };
    let Some((id, addr)) = peer.trim().split_once('@') else {
        return bad("no `@`");
    };
    let Ok(id) = id.trim().parse::<u64>() else {
        return bad("the id is not a number");
    };
    if id == 0 {
        return bad("ids start at 1");
    }
    let addr = addr.trim();
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return bad("not a host and port");
    }
    Ok((id, addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(node_id: u64, listen: &str, peers: &[&str]) -> ClusterConfig {
        ClusterConfig {
            node_id,
            listen: listen.into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            ..ClusterConfig::default()
        }
    }

    const THREE: [&str; 3] = ["1@127.0.0.1:7170", "2@127.0.0.1:7171", "3@127.0.0.1:7172"];

    #[test]
    fn no_peers_is_a_single_node_and_a_good_cluster_is_read_whole() {
        assert_eq!(ClusterConfig::default().members(), Ok(None));
        let m = cluster(2, "", &THREE).members().unwrap().unwrap();
        assert_eq!(m.node_id, 2);
        assert_eq!(m.listen, "127.0.0.1:7171".parse().unwrap());
        assert_eq!(m.peers.len(), 3);
        assert_eq!(m.peers[&3], "127.0.0.1:7172");
        // Listening on every interface at the port the others know.
        let m = cluster(1, "0.0.0.0:7170", &THREE)
            .members()
            .unwrap()
            .unwrap();
        assert_eq!(m.listen, "0.0.0.0:7170".parse().unwrap());
        // Host names are kept for the others to resolve.
        let m = cluster(
            1,
            "0.0.0.0:7170",
            &["1@a.example:7170", "2@b.example:7170", "3@c.example:7170"],
        )
        .members()
        .unwrap()
        .unwrap();
        assert_eq!(m.peers[&2], "b.example:7170");
    }

    #[test]
    fn every_mistake_is_refused_saying_what_is_wrong() {
        let dup_id = ["1@127.0.0.1:7170", "1@127.0.0.1:7171", "3@127.0.0.1:7172"];
        let dup_addr = ["1@127.0.0.1:7170", "2@127.0.0.1:7170", "3@127.0.0.1:7172"];
        let rf = ClusterConfig {
            replication_factor: 4,
            ..cluster(1, "", &THREE)
        };
        let timeouts = ClusterConfig {
            election_timeout_ms: 300,
            ..cluster(1, "", &THREE)
        };
        let table: Vec<(&str, ClusterConfig, &str)> = vec![
            (
                "this node twice",
                cluster(1, "", &dup_id),
                "names node 1 twice",
            ),
            (
                "one address twice",
                cluster(1, "", &dup_addr),
                "one address",
            ),
            (
                "node not a peer",
                cluster(4, "", &THREE),
                "not among cluster.peers",
            ),
            ("no node id", cluster(0, "", &THREE), "node_id must be set"),
            (
                "another node's port",
                cluster(1, "127.0.0.1:7171", &THREE),
                "says node 1 is at",
            ),
            ("no peers", cluster(1, "", &[]), "peers is empty"),
            ("no @", cluster(1, "", &["127.0.0.1:7170"]), "no `@`"),
            (
                "id 0",
                cluster(1, "", &["0@127.0.0.1:7170"]),
                "ids start at 1",
            ),
            (
                "bad id",
                cluster(1, "", &["x@127.0.0.1:7170"]),
                "not a number",
            ),
            ("no port", cluster(1, "", &["1@host"]), "no port"),
            (
                "bad listen",
                cluster(1, "nowhere", &THREE),
                "cluster.listen",
            ),
            ("factor above peers", rf, "replication_factor"),
            ("election within heartbeats", timeouts, "three heartbeats"),
        ];
        for (what, config, says) in table {
            let err = config.members().expect_err(what);
            assert!(err.contains(says), "{what}: {err}");
        }
    }
}
