//! The cluster's nodes changing: `sluice cluster add-node` and `remove-node`, and each group's
//! voters kept as the catalog places its replicas.
//!
//! The catalog is what should be: `Command::AddNode` and `Command::RemoveNode`, committed in the
//! metadata group, change its nodes and the replicas of every topic held by every node (and of
//! those topics' consumer groups). Every node then keeps the voters of each group it leads equal
//! to the replicas the catalog gives it ([`Cluster::keep_voters`]): a new replica is added as a
//! learner first and catches up from the log (or a snapshot), then the voters change with
//! openraft's `change_membership` — joint consensus: until the new voters alone are committed,
//! every entry needs a majority of the old voters and of the new. The metadata group's voters
//! follow the catalog's nodes the same way. The node asked returns once every group's leader
//! reports the new voters ([`Cluster::until_voters`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::{BasicNode, Raft};
use tokio_util::sync::CancellationToken;

use super::{Cluster, META_GROUP, STATUS_DEADLINE, canonical, host_name};
use crate::broker::error::{Error, Result};
use crate::proto::cluster as pb;
use crate::replication::PartitionRaft;
use crate::replication::catalog::{Catalog, Command};
use crate::replication::config::parse_peer;

/// How long `add-node` and `remove-node` wait for every group to have its new voters.
const MOVE_DEADLINE: Duration = Duration::from_secs(600);
/// How often a node looks again at groups whose voters are not yet the catalog's.
const VOTERS_RETRY: Duration = Duration::from_millis(500);
/// How far behind its leader a new replica may be when it becomes a voter, in entries: close
/// enough that it is not the one slow member that every commit waits for.
const CAUGHT_UP_WITHIN: u64 = 64;

/// Who may connect to the cluster port: the IP addresses of the cluster's nodes, and under
/// TLS the host names their certificates must name. The founding peers at start, and every node
/// the catalog adds.
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

impl Cluster {
    /// The cluster's nodes and their cluster ports: the catalog's, else the founding peers.
    fn known_nodes(&self) -> BTreeMap<u64, String> {
        let catalog = self.catalog.borrow();
        if catalog.nodes.is_empty() {
            self.members.peers.clone()
        } else {
            catalog.nodes.clone()
        }
    }

    /// Adds node `id`, whose cluster port is `addr`, to the cluster: it must run already
    /// (`cluster.join = true`) and answer as that node of no other cluster. Every topic held by
    /// every node gains a replica on it. Returns once every group that should have it as a voter
    /// has, with how many those are. A repeat (same id and address) waits for the same.
    pub async fn add_node(&self, id: u64, addr: &str) -> Result<usize> {
        let (_, addr) = parse_peer(&format!("{id}@{addr}")).map_err(Error::InvalidArgument)?;
        let known = self.known_nodes();
        match known.get(&id) {
            Some(at) if *at == addr => return self.until_voters(id, true).await,
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
        let answer = self
            .forwarder
            .status_at(&addr, STATUS_DEADLINE * 5)
            .await
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "node {id} does not answer at {addr} ({e}): start it first, with \
                     cluster.join = true"
                ))
            })?;
        if answer.node_id != id {
            return Err(Error::FailedPrecondition(format!(
                "{addr} answers as node {}, not as node {id}",
                answer.node_id
            )));
        }
        let ours = self.catalog.borrow().cluster_id.clone();
        if !answer.cluster_id.is_empty() && answer.cluster_id != ours {
            return Err(Error::FailedPrecondition(format!(
                "node {id} at {addr} belongs to cluster {}, not to this one ({ours})",
                answer.cluster_id
            )));
        }
        let command = Command::AddNode {
            id,
            addr,
            known: known.into_iter().collect(),
        };
        self.commit_to_catalog(command, |c| c.nodes.contains_key(&id))
            .await?
            .ok_or_else(|| self.not_heard("added"))?;
        tracing::info!(
            node = id,
            "node added to the catalog; its replicas are being added"
        );
        self.until_voters(id, true).await
    }

    /// Removes node `id` from the cluster: every replica it holds goes (the other nodes hold
    /// every topic it is on), then it leaves the metadata group. Returns once no group has it
    /// as a voter, with how many groups there are. Refused for the last node, and while it
    /// holds a replica of a topic some nodes do not hold (moving a replica to another node is
    /// not built yet).
    pub async fn remove_node(&self, id: u64) -> Result<usize> {
        let known = self.known_nodes();
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
        if let Some(topic) = self.catalog.borrow().subset_topic_on(id, &nodes) {
            return Err(Error::FailedPrecondition(format!(
                "node {id} holds replicas of topic {topic:?}, which some nodes do not hold \
                 (its replication_factor): moving a replica to another node is not built yet \
                 (docs/replication.md)"
            )));
        }
        let known = known.into_iter().collect();
        let command = Command::RemoveNode { id, known };
        self.commit_to_catalog(command, |c| {
            !c.nodes.is_empty() && !c.nodes.contains_key(&id)
        })
        .await?
        .ok_or_else(|| self.not_heard("removed"))?;
        tracing::info!(
            node = id,
            "node removed from the catalog; its replicas are being removed"
        );
        self.until_voters(id, false).await
    }

    fn not_heard(&self, what: &str) -> Error {
        Error::Unavailable(format!(
            "the node was {what} in the catalog but this node has not heard of it within {} \
             ms; ask again to wait for its replicas",
            self.write_timeout.as_millis()
        ))
    }

    /// Waits until the leader of every group the catalog places reports exactly the voters it
    /// places (so with node `id` among them, `present`, or not), the metadata group's voters
    /// included; says how far it got every few seconds. The number of groups, or how many are
    /// still to go at the deadline.
    async fn until_voters(&self, id: u64, present: bool) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + MOVE_DEADLINE;
        let mut said = tokio::time::Instant::now();
        loop {
            let catalog = Arc::clone(&self.catalog.borrow());
            let mut wanted = catalog.placed_groups();
            wanted.insert(
                META_GROUP.to_string(),
                catalog.node_ids(&self.members.ids()),
            );
            // The groups this change moves: those with `id` among their replicas (added), or
            // every group (removed: none may keep it).
            let moved: BTreeMap<String, Vec<u64>> = wanted
                .into_iter()
                .filter(|(_, replicas)| !present || replicas.contains(&id))
                .collect();
            let reports = self
                .reports(&catalog, if present { None } else { Some(id) })
                .await;
            let left: Vec<&String> = moved
                .iter()
                .filter(|(group, replicas)| !led_with(&reports, group, replicas))
                .map(|(group, _)| group)
                .collect();
            if left.is_empty() {
                tracing::info!(
                    node = id,
                    groups = moved.len(),
                    present,
                    "every group has its new voters"
                );
                return Ok(moved.len());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Unavailable(format!(
                    "{} of {} groups do not have their new voters yet (first: {}); they \
                     change as soon as their leaders can",
                    left.len(),
                    moved.len(),
                    left[0]
                )));
            }
            if now >= said + Duration::from_secs(5) {
                said = now;
                tracing::info!(
                    node = id,
                    done = moved.len() - left.len(),
                    of = moved.len(),
                    "groups with their new voters"
                );
            }
            tokio::time::sleep(VOTERS_RETRY).await;
        }
    }

    /// Every node's report of its groups (this one's included), but `without`'s.
    async fn reports(
        &self,
        catalog: &Catalog,
        without: Option<u64>,
    ) -> Vec<(u64, pb::StatusResponse)> {
        let me = self.members.node_id;
        let mut asks = tokio::task::JoinSet::new();
        for id in catalog.node_ids(&self.members.ids()) {
            if id != me && Some(id) != without {
                let forwarder = Arc::clone(&self.forwarder);
                asks.spawn(async move { (id, forwarder.status(id, STATUS_DEADLINE).await) });
            }
        }
        let mut reports = vec![(me, self.service.status())];
        while let Some(answer) = asks.join_next().await {
            if let Ok((id, Ok(report))) = answer {
                reports.push((id, report));
            }
        }
        reports
    }

    /// Keeps the voters of every group this node leads as the catalog places its replicas (the
    /// metadata group's: the catalog's nodes), each time the catalog changes and, while a group
    /// anywhere is not there yet, every [`VOTERS_RETRY`] (its leader may change meanwhile).
    pub(super) async fn keep_voters(self: Arc<Self>, shutdown: CancellationToken) {
        let mut catalog = self.catalog.clone();
        loop {
            let current = Arc::clone(&catalog.borrow_and_update());
            let pending = self.set_voters(&current).await;
            tokio::select! {
                changed = catalog.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(VOTERS_RETRY), if pending => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass of [`Cluster::keep_voters`]: whether some group's voters still differ.
    async fn set_voters(&self, catalog: &Catalog) -> bool {
        if catalog.nodes.is_empty() {
            return false; // no node was ever added or removed
        }
        let mut wanted = catalog.placed_groups();
        wanted.insert(
            META_GROUP.to_string(),
            catalog.nodes.keys().copied().collect(),
        );
        let mut groups: Vec<(String, Raft<PartitionRaft>)> =
            vec![(META_GROUP.to_string(), self.meta.clone())];
        groups.extend(self.running().iter().map(|(n, r)| (n.clone(), r.clone())));
        let me = self.members.node_id;
        let mut pending = false;
        for (name, raft) in groups {
            let Some(replicas) = wanted.get(&name) else {
                continue;
            };
            let want: BTreeSet<u64> = replicas.iter().copied().collect();
            let (voters, joint, leads) = {
                let m = raft.metrics().borrow().clone();
                let membership = m.membership_config.membership().clone();
                let voters: BTreeSet<u64> = membership.voter_ids().collect();
                let joint = membership.get_joint_config().len() > 1;
                (voters, joint, m.current_leader == Some(me))
            };
            if voters.is_empty() || (voters == want && !joint) {
                continue; // not formed here yet, or as it should be
            }
            pending = true;
            if !leads {
                continue; // its leader changes it
            }
            if let Err(e) = self
                .change_voters(&name, &raft, &want, &catalog.nodes)
                .await
            {
                tracing::info!(group = %name, error = %e, "voters not changed yet; trying again");
            }
        }
        pending
    }

    /// Makes `want` the voters of group `name`, which this node leads: each new node added as
    /// a learner and caught up first, then openraft's joint consensus.
    async fn change_voters(
        &self,
        name: &str,
        raft: &Raft<PartitionRaft>,
        want: &BTreeSet<u64>,
        nodes: &BTreeMap<u64, String>,
    ) -> std::result::Result<(), String> {
        let learners: BTreeSet<u64> = {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership().clone();
            membership.learner_ids().collect()
        };
        let (voters, matched): (BTreeSet<u64>, BTreeMap<u64, u64>) = {
            let m = raft.metrics().borrow().clone();
            let voters = m.membership_config.membership().voter_ids().collect();
            let matched = m.replication.iter().flatten();
            let matched = matched
                .map(|(&n, l)| (n, l.map_or(0, |l| l.index)))
                .collect();
            (voters, matched)
        };
        let me = self.members.node_id;
        let staying: Vec<u64> = want.intersection(&voters).copied().collect();
        if !want.contains(&me)
            && let Some(&to) = staying.iter().max_by_key(|n| matched.get(n).copied())
        {
            // Leaving: the leadership goes first to the most caught-up member that stays,
            // which then changes the voters. Producers wait for one handover, not for the
            // election that would follow this leader stepping down.
            let voters: Vec<u64> = voters.iter().copied().collect();
            super::leaders::move_leader(
                &self.forwarder,
                name,
                Some(me),
                &voters,
                to,
                self.write_timeout,
            )
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
            tokio::time::timeout(self.write_timeout, raft.add_learner(n, node, false))
                .await
                .map_err(|_| format!("adding node {n} as a learner took too long"))?
                .map_err(|e| format!("adding node {n} as a learner: {e}"))?;
            tracing::info!(group = %name, node = n, "learner added");
        }
        for &n in want.difference(&voters) {
            let mut metrics = raft.metrics();
            let caught_up = metrics.wait_for(|m| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&n).copied().flatten())
                    .map(|l| l.index);
                let last = m.last_log_index.unwrap_or_default();
                matched.is_some_and(|i| i + CAUGHT_UP_WITHIN >= last)
            });
            match tokio::time::timeout(self.write_timeout, caught_up).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err("the group stopped".into()),
                Err(_) => return Err(format!("learner {n} is still catching up")),
            }
        }
        tokio::time::timeout(
            self.write_timeout * 2,
            raft.change_membership(want.clone(), false),
        )
        .await
        .map_err(|_| "the change of voters took too long".to_string())?
        .map_err(|e| format!("changing the voters: {e}"))?;
        tracing::info!(group = %name, voters = ?want, "voters changed");
        Ok(())
    }
}

/// Whether a node reports leading `group` with exactly `replicas` as its voters, not changing.
fn led_with(reports: &[(u64, pb::StatusResponse)], group: &str, replicas: &[u64]) -> bool {
    let want: BTreeSet<u64> = replicas.iter().copied().collect();
    reports.iter().any(|(id, r)| {
        r.groups.iter().any(|g| {
            g.group == group
                && g.leader == Some(*id)
                && !g.joint
                && g.voters.iter().copied().collect::<BTreeSet<u64>>() == want
        })
    })
}
