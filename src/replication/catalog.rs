//! The metadata group's state: the catalog of topics, each with its settings and the nodes that
//! hold its partitions' replicas. Changed only by applying committed commands, in log order, so
//! every node's catalog is the same at the same entry.
//!
//! A command travels as a proposal holding one record whose value is the command as JSON (the
//! metadata log is a partition log like any other).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::state_machine::GroupState;
use crate::storage::TopicConfig;
use crate::storage::record::{Batch, BatchHeader, Decoded, EncodedBatch, Record};

/// A replicated topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogTopic {
    pub config: TopicConfig,
    /// The nodes holding every partition's replicas, unless `placement` names them.
    pub replicas: Vec<u64>,
    /// Per partition, the nodes holding its replicas (a topic whose replication factor is
    /// below the number of nodes); empty: every partition on `replicas`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Vec<u64>>,
    /// Per partition, the offset its log starts at (none given: 0). Set for a topic a node
    /// brought from its single-node data (docs/replication.md, "Upgrading a single node"),
    /// whose log may start later; every other replica starts empty at the same offset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first_offsets: Vec<u64>,
    /// The consumer groups reading the topic, by name: each a Raft group of its own
    /// ([`consumer_group_name`]) on the topic's nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumer_groups: BTreeMap<String, CatalogGroup>,
    /// Its replicas changed since it was created (a node added or removed): its groups formed
    /// long ago, and a node now joining them must never form them anew.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moved: bool,
}

/// A consumer group's state on one topic, replicated by a Raft group of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogGroup {
    /// Unique in the cluster's history: part of the Raft group's name, so a group created
    /// again never meets the Raft group of an earlier one.
    pub id: u64,
    /// Where the group starts in each partition (its first events say so).
    pub starts: Vec<u64>,
    /// The nodes holding its replicas.
    pub replicas: Vec<u64>,
    /// Its replicas changed since it was created (see [`CatalogTopic::moved`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moved: bool,
    /// The node that forms its Raft group, and so leads it first: the one its first member
    /// subscribed through, so that member is not relayed (absent: chosen by the group's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<u64>,
}

/// Every replicated topic, by name, and the deletions that happened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub topics: BTreeMap<String, CatalogTopic>,
    /// Per name, the latest incarnation deleted: a topic of that name held anywhere with an
    /// incarnation at or below it is gone.
    #[serde(default)]
    pub deleted: BTreeMap<String, u64>,
    /// The id the next consumer group created gets.
    #[serde(default)]
    pub next_group_id: u64,
    /// The cluster's id, drawn once by a leader of the metadata group (empty until then).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    /// The cluster's nodes (id → cluster port), once a node was added or removed; empty
    /// before: the founding peers (each node's `cluster.peers`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<u64, String>,
}

impl CatalogTopic {
    /// The nodes holding partition `partition`'s replicas.
    pub fn replicas_of(&self, partition: u32) -> &[u64] {
        self.placement
            .get(partition as usize)
            .map_or(&self.replicas, |p| p)
    }
}

/// Where a new topic's partitions go: the partitions' replicas are dealt to the nodes in id order,
/// round the ring, starting at node `first`: partition `p`'s `factor` replicas are the nodes that
/// follow one another from `first + p × factor`. Each node then holds as many replicas as any
/// other, give or take one; `first` moves on from topic to topic so that small topics spread
/// too. `factor` must be between 1 and the number of nodes.
pub fn place(nodes: &[u64], partitions: u32, factor: usize, first: usize) -> Vec<Vec<u64>> {
    let mut ring = nodes.to_vec();
    ring.sort_unstable();
    ring.dedup();
    let n = ring.len().max(1);
    (0..partitions as usize)
        .map(|p| {
            (0..factor.min(ring.len()))
                .map(|k| ring[(first + p * factor + k) % n])
                .collect()
        })
        .collect()
}

impl Catalog {
    /// The cluster's nodes: as the catalog has them, or `founders` (this node's
    /// `cluster.peers`) while no node was ever added or removed.
    pub fn node_ids(&self, founders: &[u64]) -> Vec<u64> {
        if self.nodes.is_empty() {
            founders.to_vec()
        } else {
            self.nodes.keys().copied().collect()
        }
    }

    /// Every Raft group the catalog places, by name, with the nodes that hold its replicas (and
    /// so its voters): each partition's group and each consumer group's.
    pub fn placed_groups(&self) -> BTreeMap<String, Vec<u64>> {
        let mut groups = BTreeMap::new();
        for (name, t) in &self.topics {
            for p in 0..t.config.partitions {
                let mut replicas = t.replicas_of(p).to_vec();
                replicas.sort_unstable();
                groups.insert(group_name(name, p, t.config.incarnation), replicas);
            }
            for (group, g) in &t.consumer_groups {
                let mut replicas = g.replicas.clone();
                replicas.sort_unstable();
                groups.insert(consumer_group_name(name, group, g.id), replicas);
            }
        }
        groups
    }

    /// Node `id` (at `addr`) joins: it becomes one of the nodes, and every topic held by every
    /// node before, and every consumer group held by every node (whatever its topic's
    /// placement), gains a replica on it. `known`: the
    /// nodes as the proposer knew them, for a catalog that has none yet.
    fn add_node(&mut self, id: u64, addr: String, known: Vec<(u64, String)>) {
        if self.nodes.is_empty() {
            self.nodes = known.into_iter().collect();
        }
        if self.nodes.contains_key(&id) {
            return;
        }
        let before: Vec<u64> = self.nodes.keys().copied().collect();
        let after: Vec<u64> = before.iter().copied().chain([id]).collect();
        for t in self.topics.values_mut() {
            let everywhere =
                (0..t.config.partitions).all(|p| same_nodes(t.replicas_of(p), &before));
            if everywhere {
                t.replicas = after.clone();
                t.placement = Vec::new();
                t.moved = true;
            }
            // A consumer group's Raft group is on every node, whatever its topic's placement.
            for g in t.consumer_groups.values_mut() {
                if same_nodes(&g.replicas, &before) {
                    g.replicas = after.clone();
                    g.moved = true;
                }
            }
        }
        self.nodes.insert(id, addr);
    }

    /// Node `id` leaves: no topic or consumer group keeps a replica on it. Each partition
    /// replica it held moves to a node not holding that partition yet: the one holding the
    /// fewest partition replicas at that point (the lowest id of equals), the partitions with
    /// the fewest such nodes placed first; the same on every node, as the catalog applies
    /// commands in log order. A partition every remaining node holds already (a topic held by
    /// every node) just loses it. Consumer groups keep their other replicas.
    fn remove_node(&mut self, id: u64, known: Vec<(u64, String)>) {
        if self.nodes.is_empty() {
            self.nodes = known.into_iter().collect();
        }
        if self.nodes.remove(&id).is_none() {
            return;
        }
        let mut load: BTreeMap<u64, usize> = self.nodes.keys().map(|&n| (n, 0)).collect();
        let mut placements = BTreeMap::new();
        for (name, t) in &self.topics {
            let placement: Vec<Vec<u64>> = (0..t.config.partitions)
                .map(|p| t.replicas_of(p).to_vec())
                .collect();
            for n in placement.iter().flatten() {
                load.entry(*n).and_modify(|count| *count += 1);
            }
            if placement.iter().any(|replicas| replicas.contains(&id)) {
                placements.insert(name.clone(), placement);
            }
        }
        let candidates = |replicas: &[u64]| load.keys().filter(|n| !replicas.contains(n)).count();
        let mut moving: Vec<(usize, String, usize)> = placements
            .iter()
            .flat_map(|(name, placement)| {
                let on_it = placement.iter().enumerate();
                on_it
                    .filter(|(_, replicas)| replicas.contains(&id))
                    .map(|(p, replicas)| (candidates(replicas), name.clone(), p))
            })
            .collect();
        moving.sort();
        for (_, name, p) in moving {
            let Some(replicas) = placements.get_mut(&name).and_then(|t| t.get_mut(p)) else {
                continue;
            };
            let to = load
                .iter()
                .filter(|(n, _)| !replicas.contains(n))
                .min_by_key(|&(&n, &count)| (count, n))
                .map(|(&n, _)| n);
            let at = replicas.iter().position(|&n| n == id);
            match (to, at) {
                (Some(to), Some(at)) => {
                    replicas[at] = to;
                    load.entry(to).and_modify(|count| *count += 1);
                }
                (None, _) => replicas.retain(|&n| n != id),
                (_, None) => {}
            }
        }
        for (name, placement) in placements {
            let Some(t) = self.topics.get_mut(&name) else {
                continue;
            };
            t.placement = placement;
            t.replicas.retain(|&n| n != id);
            t.moved = true;
            for g in t.consumer_groups.values_mut() {
                if g.replicas.contains(&id) {
                    g.replicas.retain(|&n| n != id);
                    g.moved = true;
                }
            }
        }
    }

    /// Whether a topic held here as `incarnation` of `name` is gone from the cluster: deleted,
    /// or created again since. Only ever turns true as the catalog applies more of its log (a
    /// catalog still catching up never condemns a topic it has not heard the end of).
    pub fn is_stale(&self, name: &str, incarnation: u64) -> bool {
        self.deleted.get(name).is_some_and(|&d| incarnation <= d)
            || self
                .topics
                .get(name)
                .is_some_and(|t| t.config.incarnation > incarnation)
    }
}

/// Whether `a` and `b` name the same nodes, in any order.
fn same_nodes(a: &[u64], b: &[u64]) -> bool {
    let set = |x: &[u64]| {
        x.iter()
            .copied()
            .collect::<std::collections::BTreeSet<u64>>()
    };
    set(a) == set(b)
}

/// The name of a partition's Raft group on the cluster port: `<topic>/<partition>`, and for a
/// topic created again after a deletion, `@<incarnation>` after it (topic names hold no `@`),
/// so the groups of two creations of one name never exchange a message.
pub fn group_name(topic: &str, partition: u32, incarnation: u64) -> String {
    match incarnation {
        0 => format!("{topic}/{partition}"),
        n => format!("{topic}/{partition}@{n}"),
    }
}

/// The topic and partition a group name stands for (`None` for the metadata group).
pub fn parse_group_name(group: &str) -> Option<(&str, u32)> {
    let (topic, rest) = group.rsplit_once('/')?;
    let partition = rest.split_once('@').map_or(rest, |(p, _)| p);
    Some((topic, partition.parse().ok()?))
}

/// The name of a consumer group's Raft group on the cluster port: `<topic>:<group>#<id>`
/// (names hold no `:`, `#` or `/`, so it is never a partition's).
pub fn consumer_group_name(topic: &str, group: &str, id: u64) -> String {
    format!("{topic}:{group}#{id}")
}

/// The topic and consumer group a Raft group's name stands for, when it is a consumer
/// group's ([`consumer_group_name`]).
pub fn parse_consumer_group_name(name: &str) -> Option<(&str, &str)> {
    let (topic, rest) = name.split_once(':')?;
    let (group, id) = rest.rsplit_once('#')?;
    id.parse::<u64>().ok()?;
    Some((topic, group))
}

/// A change to the catalog, as the metadata leader proposes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Creates the topic unless it exists (a repeat changes nothing), as the incarnation after
    /// the last one deleted.
    CreateTopic {
        name: String,
        config: TopicConfig,
        replicas: Vec<u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        first_offsets: Vec<u64>,
        /// Per partition, its replicas' nodes (see [`CatalogTopic::placement`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        placement: Vec<Vec<u64>>,
    },
    /// Deletes `incarnation` of the topic (a repeat, or an older incarnation, changes nothing).
    DeleteTopic { name: String, incarnation: u64 },
    /// Gives the cluster its id unless it has one (the first committed stays).
    Found { cluster_id: String },
    /// Creates consumer group `group` on `incarnation` of `topic` unless it exists there (a
    /// repeat changes nothing: the first creation's starts stay).
    CreateGroup {
        topic: String,
        incarnation: u64,
        group: String,
        starts: Vec<u64>,
        replicas: Vec<u64>,
        /// The node its first member subscribed through (see [`CatalogGroup::first`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first: Option<u64>,
    },
    /// Deletes consumer group `group` on each topic of `ids` where it is still the creation
    /// with that id (a group created again since stays).
    DeleteGroup {
        group: String,
        /// Topic → the group's id there.
        ids: BTreeMap<String, u64>,
    },
    /// Node `id` joins the cluster at cluster port `addr` (a repeat changes nothing); every
    /// topic held by every node gains a replica on it. `known`: the nodes as the proposer
    /// knew them (the founding peers, for a catalog that lists none yet).
    /// (A list of pairs, not a map: a map with number keys does not survive the command's
    /// tagged JSON.)
    AddNode {
        id: u64,
        addr: String,
        known: Vec<(u64, String)>,
    },
    /// Node `id` leaves the cluster (a repeat changes nothing): every replica it held goes.
    RemoveNode { id: u64, known: Vec<(u64, String)> },
}

impl Command {
    /// The proposal bytes that carry the command.
    pub fn to_proposal(&self, timestamp: i64) -> Result<Bytes, serde_json::Error> {
        let record = Record {
            timestamp,
            value: Some(Bytes::from(serde_json::to_vec(self)?)),
            ..Record::default()
        };
        Ok(Bytes::copy_from_slice(
            EncodedBatch::new(&[record]).as_bytes(),
        ))
    }

    /// The command a proposal carries, or why it carries none.
    pub fn from_proposal(proposal: &Bytes) -> Result<Command, String> {
        // An entry as stored is sealed already; a proposal is sealed here to be decoded.
        let sealed = match BatchHeader::of_entry(proposal).map_err(String::from)?.raft {
            Some(_) => proposal.clone(),
            None => {
                let mut encoded =
                    EncodedBatch::from_encoded(proposal.to_vec()).map_err(String::from)?;
                Bytes::copy_from_slice(encoded.seal(0))
            }
        };
        let batch = match Batch::decode(&sealed) {
            Decoded::Valid(b) => b,
            Decoded::Torn { .. } => return Err("a torn proposal".into()),
            Decoded::Corrupt(why) => return Err(why.into()),
        };
        let mut records = batch.records();
        let value = match records.next() {
            Some(Ok(r)) => r.value.unwrap_or_default(),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("a proposal without a record".into()),
        };
        serde_json::from_slice(&value).map_err(|e| e.to_string())
    }
}

impl GroupState for Catalog {
    const LOG_IS_DATA: bool = false;

    fn apply(&mut self, proposal: &Bytes) {
        let command = match Command::from_proposal(proposal) {
            Ok(c) => c,
            Err(why) => {
                // The same on every node: an entry that is not a command changes nothing.
                tracing::error!(%why, "a metadata entry that is not a command was skipped");
                return;
            }
        };
        match command {
            Command::Found { cluster_id } => {
                if self.cluster_id.is_empty() {
                    self.cluster_id = cluster_id;
                }
            }
            Command::CreateTopic {
                name,
                config,
                replicas,
                first_offsets,
                placement,
            } => {
                let incarnation = self.deleted.get(&name).map_or(0, |d| d + 1);
                // A single node's data joins only a name never used in the cluster: its
                // groups' names (incarnation 0) are the ones its entries were written for.
                if config.formed_by.is_some() && incarnation > 0 {
                    return;
                }
                self.topics.entry(name).or_insert(CatalogTopic {
                    config: TopicConfig {
                        incarnation,
                        ..config
                    },
                    replicas,
                    first_offsets,
                    placement,
                    consumer_groups: BTreeMap::new(),
                    moved: false,
                });
            }
            Command::DeleteTopic { name, incarnation } => {
                if self
                    .topics
                    .get(&name)
                    .is_some_and(|t| t.config.incarnation == incarnation)
                {
                    self.topics.remove(&name);
                    let last = self.deleted.entry(name).or_default();
                    *last = (*last).max(incarnation);
                }
            }
            Command::CreateGroup {
                topic,
                incarnation,
                group,
                starts,
                replicas,
                first,
            } => {
                let Some(t) = self
                    .topics
                    .get_mut(&topic)
                    .filter(|t| t.config.incarnation == incarnation)
                else {
                    return;
                };
                if let std::collections::btree_map::Entry::Vacant(new) =
                    t.consumer_groups.entry(group)
                {
                    new.insert(CatalogGroup {
                        id: self.next_group_id,
                        starts,
                        replicas,
                        moved: false,
                        first,
                    });
                    self.next_group_id += 1;
                }
            }
            Command::DeleteGroup { group, ids } => {
                for (topic, id) in ids {
                    if let Some(t) = self.topics.get_mut(&topic)
                        && t.consumer_groups.get(&group).is_some_and(|g| g.id == id)
                    {
                        t.consumer_groups.remove(&group);
                    }
                }
            }
            Command::AddNode { id, addr, known } => self.add_node(id, addr, known),
            Command::RemoveNode { id, known } => self.remove_node(id, known),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cluster_id_committed_stays() {
        let mut catalog = Catalog::default();
        for id in ["first", "second"] {
            let found = Command::Found {
                cluster_id: id.into(),
            };
            catalog.apply(&found.to_proposal(1).unwrap());
        }
        assert_eq!(catalog.cluster_id, "first");
    }

    #[test]
    fn commands_round_trip_through_proposals_and_apply_in_order() {
        let create = Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
            replicas: vec![1, 2, 3],
            first_offsets: Vec::new(),
            placement: Vec::new(),
        };
        let bytes = create.to_proposal(1).unwrap();
        assert_eq!(Command::from_proposal(&bytes).unwrap(), create);
        let mut catalog = Catalog::default();
        catalog.apply(&bytes);
        assert_eq!(catalog.topics["epro"].config.partitions, 3);
        // A repeated creation (another node asked too) keeps the first settings.
        let again = Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig::default(),
            replicas: vec![1, 2, 3],
            first_offsets: Vec::new(),
            placement: Vec::new(),
        };
        catalog.apply(&again.to_proposal(2).unwrap());
        assert_eq!(catalog.topics["epro"].config.partitions, 3);
        // The entry as stored (read back from the log, or as a follower receives it) carries
        // the same command.
        let id = crate::storage::record::RaftId { term: 2, index: 9 };
        let mut stored = EncodedBatch::from_entry(&again.to_proposal(2).unwrap(), id).unwrap();
        let stored = Bytes::copy_from_slice(stored.seal(40));
        assert_eq!(Command::from_proposal(&stored).unwrap(), again);
        // Not a command: nothing changes.
        let before = catalog.clone();
        let other = Bytes::copy_from_slice(EncodedBatch::new(&[Record::default()]).as_bytes());
        catalog.apply(&other);
        catalog.apply(&Bytes::from_static(b"junk"));
        assert_eq!(catalog, before);
    }

    /// Over node counts, factors, partition counts and turns: every partition gets `factor`
    /// distinct nodes of the cluster; each node holds as many replicas as any other, give or take
    /// one; the same arguments give the same placement in any node order; a catalog entry
    /// without a placement puts every partition on its replicas.
    #[test]
    fn placement_spreads_replicas_evenly_over_distinct_nodes() {
        for n in 1..=7u64 {
            let nodes: Vec<u64> = (1..=n).map(|i| i * 10).collect();
            let mut shuffled = nodes.clone();
            shuffled.reverse();
            for factor in 1..=n as usize {
                for partitions in [1u32, 2, 3, 5, 8, 64] {
                    for first in [0usize, 1, 5] {
                        let placed = place(&nodes, partitions, factor, first);
                        let what = format!(
                            "{n} nodes, factor {factor}, {partitions} partitions, turn {first}"
                        );
                        assert_eq!(
                            placed,
                            place(&shuffled, partitions, factor, first),
                            "{what}"
                        );
                        assert_eq!(placed.len(), partitions as usize, "{what}");
                        let mut held = BTreeMap::<u64, usize>::new();
                        for replicas in &placed {
                            let mut distinct = replicas.clone();
                            distinct.sort_unstable();
                            distinct.dedup();
                            assert_eq!(distinct.len(), factor, "{what}: {replicas:?}");
                            assert!(replicas.iter().all(|r| nodes.contains(r)), "{what}");
                            for r in replicas {
                                *held.entry(*r).or_default() += 1;
                            }
                        }
                        let counts: Vec<usize> = nodes
                            .iter()
                            .map(|id| held.get(id).copied().unwrap_or(0))
                            .collect();
                        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
                        assert!(spread <= 1, "{what}: {held:?}");
                    }
                }
            }
        }
        let everywhere = CatalogTopic {
            config: TopicConfig::default(),
            replicas: vec![1, 2, 3],
            placement: Vec::new(),
            first_offsets: Vec::new(),
            consumer_groups: BTreeMap::new(),
            moved: false,
        };
        assert_eq!(everywhere.replicas_of(5), &[1, 2, 3]);
        let placed = CatalogTopic {
            placement: place(&[1, 2, 3], 2, 2, 0),
            ..everywhere
        };
        assert_eq!(placed.replicas_of(0), &[1, 2]);
        assert_eq!(placed.replicas_of(1), &[3, 1]);
    }

    /// Adding and removing nodes, as every node applies it: a topic held by every node (and
    /// each of its consumer groups) follows the nodes, marked moved so that no node forms its
    /// groups again; a topic on some of the nodes keeps its placement when a node is added, and
    /// when a node it is on is removed, that node's replicas move to the least loaded nodes not
    /// holding them, keeping the factor; repeats change nothing; every placed group lists
    /// exactly the nodes it is on.
    #[test]
    fn nodes_added_and_removed_move_every_replica_the_catalog_places() {
        let founders: Vec<(u64, String)> = (1..=3)
            .map(|id| (id, format!("10.0.0.{id}:7170")))
            .collect();
        let mut catalog = Catalog::default();
        let apply = |c: &mut Catalog, command: Command| {
            c.apply(&command.to_proposal(1).unwrap());
        };
        let topic = |name: &str, partitions: u32, placement: Vec<Vec<u64>>| Command::CreateTopic {
            name: name.into(),
            config: TopicConfig {
                partitions,
                ..TopicConfig::default()
            },
            replicas: vec![1, 2, 3],
            first_offsets: Vec::new(),
            placement,
        };
        apply(&mut catalog, topic("all", 2, Vec::new()));
        apply(&mut catalog, topic("placed", 3, place(&[1, 2, 3], 3, 2, 0)));
        for (topic, group) in [("all", "g"), ("placed", "h")] {
            let create = Command::CreateGroup {
                topic: topic.into(),
                incarnation: 0,
                group: group.into(),
                starts: vec![0; 3],
                replicas: vec![1, 2, 3],
                first: None,
            };
            apply(&mut catalog, create);
        }
        assert_eq!(catalog.node_ids(&[1, 2, 3]), vec![1, 2, 3]);

        let add = Command::AddNode {
            id: 4,
            addr: "10.0.0.4:7170".into(),
            known: founders.clone(),
        };
        apply(&mut catalog, add.clone());
        let after_add = catalog.clone();
        apply(&mut catalog, add);
        assert_eq!(catalog, after_add, "a repeated AddNode changes nothing");
        assert_eq!(catalog.node_ids(&[1, 2, 3]), vec![1, 2, 3, 4]);
        assert_eq!(catalog.nodes[&4], "10.0.0.4:7170");
        let groups = catalog.placed_groups();
        assert_eq!(groups["all/0"], vec![1, 2, 3, 4]);
        assert_eq!(groups["all/1"], vec![1, 2, 3, 4]);
        assert_eq!(groups["all:g#0"], vec![1, 2, 3, 4]);
        assert!(catalog.topics["all"].moved && catalog.topics["all"].consumer_groups["g"].moved);
        // On some nodes: untouched; its consumer group, on every node, gains the new one.
        assert_eq!(groups["placed/0"], vec![1, 2]);
        assert_eq!(groups["placed/1"], vec![1, 3]);
        assert_eq!(groups["placed/2"], vec![2, 3]);
        assert!(!catalog.topics["placed"].moved);
        assert_eq!(groups["placed:h#1"], vec![1, 2, 3, 4]);
        assert!(catalog.topics["placed"].consumer_groups["h"].moved);

        // Node 1 removed: "all" leaves it; each replica of "placed" on it moves to the node with
        // the fewest replicas (4: two, against 2 and 3's four), the factor kept.
        let remove = Command::RemoveNode {
            id: 1,
            known: Vec::new(),
        };
        apply(&mut catalog, remove.clone());
        let after_remove = catalog.clone();
        apply(&mut catalog, remove);
        assert_eq!(
            catalog, after_remove,
            "a repeated RemoveNode changes nothing"
        );
        assert_eq!(catalog.node_ids(&[1, 2, 3]), vec![2, 3, 4]);
        let groups = catalog.placed_groups();
        assert_eq!(groups["all/0"], vec![2, 3, 4]);
        assert_eq!(groups["all:g#0"], vec![2, 3, 4]);
        assert_eq!(groups["placed/0"], vec![2, 4]);
        assert_eq!(groups["placed/1"], vec![3, 4]);
        assert_eq!(
            groups["placed/2"],
            vec![2, 3],
            "a partition not on node 1 stays"
        );
        assert_eq!(groups["placed:h#1"], vec![2, 3, 4]);
        assert!(catalog.topics["placed"].moved);
        // Node 4 removed too: a partition whose other replica is on 2 goes to 3 and the other
        // way round; "placed/2" is on both already, so it is held by the nodes left.
        apply(
            &mut catalog,
            Command::RemoveNode {
                id: 4,
                known: Vec::new(),
            },
        );
        let groups = catalog.placed_groups();
        for p in 0..3 {
            assert_eq!(groups[&format!("placed/{p}")], vec![2, 3], "placed/{p}");
        }
        // No group is left on a removed node, none without a replica.
        for (group, replicas) in &groups {
            assert!(
                !replicas.is_empty() && replicas.iter().all(|n| [2, 3].contains(n)),
                "{group}"
            );
        }
        // A catalog that never listed its nodes takes the proposer's.
        let mut fresh = Catalog::default();
        let remove = Command::RemoveNode {
            id: 3,
            known: founders,
        };
        apply(&mut fresh, remove);
        assert_eq!(fresh.node_ids(&[1, 2, 3]), vec![1, 2]);
    }

    /// Removing nodes one after another from a cluster of many topics on some of the nodes keeps
    /// every partition's factor (as long as there are that many nodes) and spreads the moved
    /// replicas: the gap between the nodes holding the most and the fewest partition replicas
    /// does not grow (beyond one).
    #[test]
    fn removed_nodes_replicas_keep_their_factor_and_spread() {
        let mut catalog = Catalog::default();
        let nodes: Vec<u64> = (1..=6).collect();
        catalog.nodes = nodes.iter().map(|&n| (n, format!("h{n}:1"))).collect();
        for (turn, (partitions, factor)) in [(5, 2), (3, 3), (7, 1), (4, 2), (1, 3)]
            .into_iter()
            .enumerate()
        {
            let command = Command::CreateTopic {
                name: format!("t{turn}"),
                config: TopicConfig {
                    partitions,
                    ..TopicConfig::default()
                },
                replicas: nodes.clone(),
                first_offsets: Vec::new(),
                placement: place(&nodes, partitions, factor, turn),
            };
            catalog.apply(&command.to_proposal(1).unwrap());
        }
        let factors: BTreeMap<String, usize> = catalog
            .placed_groups()
            .into_iter()
            .map(|(g, r)| (g, r.len()))
            .collect();
        let spread = |c: &Catalog, nodes: &[u64]| {
            let mut held: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
            for replicas in c.placed_groups().values() {
                for n in replicas {
                    held.entry(*n).and_modify(|h| *h += 1);
                }
            }
            held.values().max().unwrap() - held.values().min().unwrap()
        };
        for gone in [3, 1, 6] {
            let stay: Vec<u64> = catalog
                .node_ids(&[])
                .into_iter()
                .filter(|&n| n != gone)
                .collect();
            let before = spread(&catalog, &stay);
            let remove = Command::RemoveNode {
                id: gone,
                known: Vec::new(),
            };
            catalog.apply(&remove.to_proposal(1).unwrap());
            let left = catalog.node_ids(&[]);
            let mut held: BTreeMap<u64, usize> = left.iter().map(|&n| (n, 0)).collect();
            for (group, replicas) in catalog.placed_groups() {
                let mut distinct = replicas.clone();
                distinct.dedup();
                assert_eq!(distinct, replicas, "{group}: distinct nodes");
                assert_eq!(
                    replicas.len(),
                    factors[&group].min(left.len()),
                    "{group} after {gone}"
                );
                for n in replicas {
                    *held
                        .get_mut(&n)
                        .unwrap_or_else(|| panic!("{group} on removed {n}")) += 1;
                }
            }
            let after = spread(&catalog, &left);
            assert!(after <= before.max(1), "after removing {gone}: {held:?}");
        }
    }

    /// Deletion and re-creation: each creation after a deletion is the next incarnation; a
    /// delete names the incarnation it removes (a stale or repeated one changes nothing); a
    /// topic held anywhere is stale once the catalog has seen its end, never before.
    #[test]
    fn deletions_count_incarnations_and_condemn_only_what_the_log_ended() {
        let create = |partitions| Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig {
                partitions,
                ..TopicConfig::default()
            },
            replicas: vec![1, 2, 3],
            first_offsets: Vec::new(),
            placement: Vec::new(),
        };
        let delete = |incarnation| Command::DeleteTopic {
            name: "epro".into(),
            incarnation,
        };
        let mut catalog = Catalog::default();
        let apply = |c: &mut Catalog, command: Command| c.apply(&command.to_proposal(0).unwrap());
        // (step, command, incarnation in the catalog after it, stale: [held as 0, as 1, as 2])
        let steps: [(&str, Command, Option<u64>, [bool; 3]); 6] = [
            ("first creation", create(1), Some(0), [false, false, false]),
            (
                "delete of an incarnation that is not there",
                delete(1),
                Some(0),
                [false, false, false],
            ),
            ("delete", delete(0), None, [true, false, false]),
            ("repeated delete", delete(0), None, [true, false, false]),
            ("created again", create(2), Some(1), [true, false, false]),
            ("deleted again", delete(1), None, [true, true, false]),
        ];
        for (what, command, incarnation, stale) in steps {
            apply(&mut catalog, command);
            assert_eq!(
                catalog.topics.get("epro").map(|t| t.config.incarnation),
                incarnation,
                "{what}"
            );
            let got: Vec<bool> = (0..3).map(|i| catalog.is_stale("epro", i)).collect();
            assert_eq!(got, stale, "{what}");
        }
        // A single node's data joins only a name the cluster never used (its groups are
        // incarnation 0's).
        let adopted = |from| Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig {
                formed_by: Some(from),
                ..TopicConfig::default()
            },
            replicas: vec![1, 2, 3],
            first_offsets: vec![40],
            placement: Vec::new(),
        };
        let before = catalog.clone();
        apply(&mut catalog, adopted(1));
        assert_eq!(catalog, before, "a used name is not adopted");
        let mut fresh = Catalog::default();
        apply(&mut fresh, adopted(2));
        assert_eq!(fresh.topics["epro"].config.formed_by, Some(2));
        assert_eq!(fresh.topics["epro"].first_offsets, vec![40]);
        apply(&mut fresh, adopted(3));
        assert_eq!(
            fresh.topics["epro"].config.formed_by,
            Some(2),
            "the first creation stays"
        );
        apply(&mut catalog, create(3));
        assert_eq!(catalog.topics["epro"].config.incarnation, 2);
        assert_eq!(catalog.topics["epro"].config.partitions, 3);
        assert!(
            !Catalog::default().is_stale("epro", 0),
            "an empty catalog condemns nothing"
        );
        for (group, parsed) in [
            (group_name("epro", 3, 0), Some(("epro", 3))),
            (group_name("epro", 3, 2), Some(("epro", 3))),
            ("_meta".to_string(), None),
        ] {
            assert_eq!(parse_group_name(&group), parsed, "{group}");
        }
        assert_eq!(group_name("epro", 3, 2), "epro/3@2");
    }

    /// Consumer groups: created once per topic incarnation (a repeat keeps the first starts),
    /// deleted only as the creation a delete names, each with an id no other creation ever gets, even after the topic is deleted and created
    /// again; a creation for an incarnation that is gone changes nothing; group and partition
    /// Raft group names never parse as each other.
    #[test]
    fn consumer_groups_get_ids_never_reused_and_go_with_their_topic() {
        let create_topic = Command::CreateTopic {
            name: "epro".into(),
            config: TopicConfig::default(),
            replicas: vec![1, 2, 3],
            first_offsets: Vec::new(),
            placement: Vec::new(),
        };
        let group = |name: &str, incarnation, start| Command::CreateGroup {
            topic: "epro".into(),
            incarnation,
            group: name.into(),
            starts: vec![start],
            replicas: vec![1, 2, 3],
            first: Some(1),
        };
        let mut catalog = Catalog::default();
        let apply = |c: &mut Catalog, command: Command| c.apply(&command.to_proposal(0).unwrap());
        apply(&mut catalog, group("billing", 0, 0));
        assert_eq!(catalog, Catalog::default(), "no topic: nothing changes");
        apply(&mut catalog, create_topic.clone());
        // (step, command, the group's (id, start) after it, next id after it)
        type Step = (&'static str, Command, &'static str, Option<(u64, u64)>, u64);
        let delete = |name: &str, id| Command::DeleteGroup {
            group: name.into(),
            ids: [("epro".to_string(), id)].into_iter().collect(),
        };
        let steps: [Step; 9] = [
            (
                "created",
                group("billing", 0, 5),
                "billing",
                Some((0, 5)),
                1,
            ),
            (
                "repeated",
                group("billing", 0, 9),
                "billing",
                Some((0, 5)),
                1,
            ),
            ("another", group("audit", 0, 7), "audit", Some((1, 7)), 2),
            ("a gone incarnation", group("late", 3, 0), "late", None, 2),
            (
                "a delete naming another creation",
                delete("audit", 0),
                "audit",
                Some((1, 7)),
                2,
            ),
            ("deleted", delete("audit", 1), "audit", None, 2),
            (
                "created again",
                group("audit", 0, 8),
                "audit",
                Some((2, 8)),
                3,
            ),
            (
                "the old delete again",
                delete("audit", 1),
                "audit",
                Some((2, 8)),
                3,
            ),
            (
                "topic deleted",
                Command::DeleteTopic {
                    name: "epro".into(),
                    incarnation: 0,
                },
                "billing",
                None,
                3,
            ),
        ];
        for (what, command, name, expected, next) in steps {
            apply(&mut catalog, command);
            let got = catalog
                .topics
                .get("epro")
                .and_then(|t| t.consumer_groups.get(name))
                .map(|g| (g.id, g.starts[0]));
            assert_eq!(got, expected, "{what}");
            assert_eq!(catalog.next_group_id, next, "{what}");
        }
        apply(&mut catalog, create_topic);
        apply(&mut catalog, group("billing", 1, 0));
        assert_eq!(
            catalog.topics["epro"].consumer_groups["billing"].id, 3,
            "created again: a new id"
        );
        let name = consumer_group_name("epro", "7", 2);
        assert_eq!(name, "epro:7#2");
        assert_eq!(parse_group_name(&name), None, "not a partition's group");
        assert_eq!(parse_consumer_group_name(&name), Some(("epro", "7")));
        assert_eq!(parse_consumer_group_name(&group_name("epro", 3, 2)), None);
        assert_eq!(parse_consumer_group_name("_meta"), None);
    }
}
