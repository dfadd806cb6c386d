//! The cluster's nodes changing: what `sluice cluster add-node` and `remove-node` check, which
//! voters each group should have, how a leader changes them, and who may connect to the cluster
//! port. The cluster layer (`Cluster::add_node`, `remove_node`, `keep_voters`) runs these.
//!
//! The catalog is what should be: `Command::AddNode` and `Command::RemoveNode`, committed in the
//! metadata group, change its nodes and the replicas of every topic held by every node (and of
//! those topics' consumer groups); a removed node's replicas of a topic on some of the nodes
//! move to other nodes (`Catalog::remove_node`). Every node then keeps the voters of each group it leads equal
//! to the replicas the catalog gives it: a new replica is added as a learner first and catches
//! up from the log (or a snapshot), then the voters change with openraft's `change_membership` —
//! joint consensus: until the new voters alone are committed, every entry needs a majority of
//! the old voters and of the new. The metadata group's voters follow the catalog's nodes the
//! same way. The node asked returns once every group's leader reports the new voters.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::Duration;

use openraft::{BasicNode, Raft};

use super::leaders::move_leader;
use crate::broker::error::{Error, Result};
use crate::proto::cluster as pb;
use crate::replication::PartitionRaft;
use crate::replication::catalog::Catalog;
use crate::replication::config::parse_peer;
use crate::replication::write::Forwarder;

/// How long `add-node` and `remove-node` wait for every group to have its new voters.
pub(super) const MOVE_DEADLINE: Duration = Duration::from_secs(600);
/// How often a node looks again at groups whose voters are not yet the catalog's.
pub(super) const VOTERS_RETRY: Duration = Duration::from_millis(500);
/// How many groups one node changes the voters of at once.
pub(super) const CHANGES_AT_ONCE: usize = 64;
/// How far behind its leader a new replica may be when it becomes a voter, in entries: close
/// enough that it is not the one slow member that every commit waits for.
const CAUGHT_UP_WITHIN: u64 = 64;

/// Who may connect to the cluster port: the IP addresses of the cluster's nodes, and under
/// TLS the host names their certificates must name. The founding peers at start, and every node
/// added since.
#[derive(Debug, Default)]
pub(super) struct Admitted {
    ips: RwLock<HashSet<IpAddr>>,
    hosts: RwLock<HashSet<String>>,
    /// The addresses admitted already (each resolved once).
    addresses: RwLock<HashSet<String>>,
}

impl Admitted {
    /// Also admits the nodes at `addresses` (cluster ports, `host:port`); an address that does
    /// not resolve is what the error says.
    pub(super) async fn admit<'a>(
        &self,
        addresses: impl IntoIterator<Item = (&'a u64, &'a String)>,
    ) -> Result<()> {
        for (id, addr) in addresses {
            if read(&self.addresses).contains(addr) {
                continue;
            }
            let found = tokio::net::lookup_host(addr.as_str()).await.map_err(|e| {
                Error::FailedPrecondition(format!(
                    "cannot resolve node {id}'s cluster address {addr}: {e}"
                ))
            })?;
            let ips: Vec<IpAddr> = found.map(|a| canonical(a.ip())).collect();
            write(&self.ips).extend(ips);
            if let Some((host, _)) = addr.rsplit_once(':') {
                write(&self.hosts).insert(host_name(host));
            }
            write(&self.addresses).insert(addr.clone());
        }
        Ok(())
    }

    pub(super) fn ip(&self, ip: IpAddr) -> bool {
        read(&self.ips).contains(&canonical(ip))
    }

    pub(super) fn host(&self, host: &str) -> bool {
        read(&self.hosts).contains(host)
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// An IP address as the cluster port compares them (an IPv4-mapped IPv6 address as IPv4).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A host as certificates name it: a DNS name in lower case, an IP address as text (brackets
/// of an IPv6 address dropped).
fn host_name(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

/// What an `add-node` of `id` at `addr` is, given the cluster's nodes (`known`): the address
/// as parsed and whether the node is there already (a repeat); or why it is refused.
pub(super) fn check_add(
    known: &BTreeMap<u64, String>,
    id: u64,
    addr: &str,
) -> Result<(String, bool)> {
    let (_, addr) = parse_peer(&format!("{id}@{addr}")).map_err(Error::InvalidArgument)?;
    match known.get(&id) {
        Some(at) if *at == addr => return Ok((addr, true)),
        Some(at) => {
            return Err(Error::InvalidArgument(format!(
                "node {id} is one of the cluster's nodes already, at {at}"
            )));
        }
        None => {}
    }
    if let Some((other, _)) = known.iter().find(|(_, a)| **a == addr) {
        return Err(Error::InvalidArgument(format!(
            "{addr} is node {other}'s cluster port"
        )));
    }
    Ok((addr, false))
}

/// Refuses a node to add that answered `answer` at `addr` but is not node `id` of cluster
/// `ours` (or of none yet).
pub(super) fn check_answer(
    answer: std::result::Result<pb::StatusResponse, String>,
    id: u64,
    addr: &str,
    ours: &str,
) -> Result<()> {
    let answer = answer.map_err(|e| {
        Error::FailedPrecondition(format!(
            "node {id} does not answer at {addr} ({e}): start it first, with cluster.join = true"
        ))
    })?;
    if answer.node_id != id {
        return Err(Error::FailedPrecondition(format!(
            "{addr} answers as node {}, not as node {id}",
            answer.node_id
        )));
    }
    if !answer.cluster_id.is_empty() && answer.cluster_id != ours {
        return Err(Error::FailedPrecondition(format!(
            "node {id} at {addr} belongs to cluster {}, not to this one ({ours})",
            answer.cluster_id
        )));
    }
    Ok(())
}

/// Refuses a `remove-node` of `id`: an unknown node, or the last one.
pub(super) fn check_remove(known: &BTreeMap<u64, String>, id: u64) -> Result<()> {
    let nodes: Vec<u64> = known.keys().copied().collect();
    if !known.contains_key(&id) {
        return Err(Error::InvalidArgument(format!(
            "node {id} is not one of the cluster's nodes ({nodes:?})"
        )));
    }
    if nodes.len() == 1 {
        return Err(Error::FailedPrecondition(format!(
            "node {id} is the cluster's last node"
        )));
    }
    Ok(())
}

/// Every group's voters as the catalog places them: each partition's and consumer group's, and
/// the metadata group's (`meta`: the catalog's nodes, else `founders`).
pub(super) fn wanted_voters(
    catalog: &Catalog,
    meta: &str,
    founders: &[u64],
) -> BTreeMap<String, BTreeSet<u64>> {
    let mut wanted: BTreeMap<String, BTreeSet<u64>> = catalog
        .placed_groups()
        .into_iter()
        .map(|(group, replicas)| (group, replicas.into_iter().collect()))
        .collect();
    wanted.insert(
        meta.to_string(),
        catalog.node_ids(founders).into_iter().collect(),
    );
    wanted
}

/// The groups of `wanted` still without their voters, as the nodes' `reports` show them: a
/// group is done once a node reports leading it with exactly those voters, no change under way.
pub(super) fn not_done<'a>(
    wanted: &'a BTreeMap<String, BTreeSet<u64>>,
    reports: &[(u64, pb::StatusResponse)],
) -> Vec<&'a String> {
    let led_with = |group: &str, want: &BTreeSet<u64>| {
        reports.iter().any(|(id, r)| {
            r.groups.iter().any(|g| {
                g.group == group
                    && g.leader == Some(*id)
                    && !g.joint
                    && g.voters.iter().copied().collect::<BTreeSet<u64>>() == *want
            })
        })
    };
    wanted
        .iter()
        .filter(|(group, want)| !led_with(group, want))
        .map(|(group, _)| group)
        .collect()
}

/// A group's voters as `raft` has them now, whether they are changing, and whether node `me`
/// leads it.
pub(super) fn voters_of(raft: &Raft<PartitionRaft>, me: u64) -> (BTreeSet<u64>, bool, bool) {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    (
        membership.voter_ids().collect(),
        membership.get_joint_config().len() > 1,
        m.current_leader == Some(me),
    )
}

/// Makes `want` the voters of group `name`, which node `me` leads: each new node added as a
/// learner (reached at its address in `nodes`) and caught up first, then openraft's joint
/// consensus. A leader that is itself leaving first hands its leadership to the most caught-up
/// member that stays, which then makes the change: producers wait for one handover, not for
/// the election that would follow this leader stepping down. Why not (yet), on failure.
pub(super) async fn change_voters(
    raft: &Raft<PartitionRaft>,
    name: &str,
    want: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, String>,
    me: u64,
    forwarder: &Forwarder,
    deadline: Duration,
) -> std::result::Result<(), String> {
    let (voters, learners, matched) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        let matched: BTreeMap<u64, u64> = (m.replication.iter().flatten())
            .map(|(&n, l)| (n, l.map_or(0, |l| l.index)))
            .collect();
        (voters, learners, matched)
    };
    let staying: Vec<u64> = want.intersection(&voters).copied().collect();
    if !want.contains(&me)
        && let Some(&to) = staying.iter().max_by_key(|n| matched.get(n).copied())
    {
        let voters: Vec<u64> = voters.iter().copied().collect();
        move_leader(forwarder, name, Some(me), &voters, to, deadline)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(group = %name, to, "leaving: leadership handed over first");
        return Ok(());
    }
    for &n in want.difference(&voters) {
        if learners.contains(&n) {
            continue;
        }
        let node = BasicNode::new(nodes.get(&n).cloned().unwrap_or_default());
        tokio::time::timeout(deadline, raft.add_learner(n, node, false))
            .await
            .map_err(|_| format!("adding node {n} as a learner took too long"))?
            .map_err(|e| format!("adding node {n} as a learner: {e}"))?;
        tracing::info!(group = %name, node = n, "learner added");
    }
    for &n in want.difference(&voters) {
        let mut metrics = raft.metrics();
        let caught_up = metrics.wait_for(|m| {
            let matched = (m.replication.as_ref())
                .and_then(|r| r.get(&n).copied().flatten())
                .map(|l| l.index);
            let last = m.last_log_index.unwrap_or_default();
            matched.is_some_and(|i| i + CAUGHT_UP_WITHIN >= last)
        });
        match tokio::time::timeout(deadline, caught_up).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err("the group stopped".into()),
            Err(_) => return Err(format!("learner {n} is still catching up")),
        }
    }
    tokio::time::timeout(deadline * 2, raft.change_membership(want.clone(), false))
        .await
        .map_err(|_| "the change of voters took too long".to_string())?
        .map_err(|e| format!("changing the voters: {e}"))?;
    tracing::info!(group = %name, voters = ?want, "voters changed");
    Ok(())
}
