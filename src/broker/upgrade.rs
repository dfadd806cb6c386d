//! Upgrading a single node's data directory to a cluster node's (docs/replication.md,
//! "Upgrading a single node").
//!
//! On the first start in cluster mode of a directory that holds a single node's topics, each
//! partition's messages become the first entries of its partition's Raft group: the group's
//! first membership (every founding member, as `initialize` writes it), then one entry per
//! stored batch, at the same offsets (a gap compaction left between batches becomes part of the
//! batch after it; a partition whose head retention removed starts at the same first offset).
//! The entries carry term 0 and are not committed: this node alone holds them, so no other
//! node forms these groups ([`TopicConfig::formed_by`]); this node, whose log is the longest,
//! is elected their first leader and replicates them like any entry. The cluster learns the
//! topics from this node ([`super::cluster`]'s adoption).
//!
//! The single node's files are kept, moved aside to `<data_dir>/pre-cluster/` (topics and
//! consumer group state), for the operator to delete once the cluster serves them.
//!
//! # Crash safety
//! 1. Every topic is converted into `<data_dir>/cluster/upgrade/` (a data directory of its own);
//!    every entry is durable before the next step.
//! 2. `cluster/upgrade/READY` is written (synced).
//! 3. Per topic: the single node's directory moves to `pre-cluster/topics/`, the converted one
//!    into its place; then the consumer group state moves aside; then `cluster/upgrade` goes.
//!
//! A crash before 2 leaves the single node's files as they were: the next start converts again
//! from scratch. A crash after 2 is finished by the next start (each move is a rename, done
//! unless already done).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use openraft::{BasicNode, EntryPayload, Membership};

use crate::replication::PartitionRaft;
use crate::replication::config::Members;
use crate::replication::log_store::{READ_BYTES, entry_to_batch};
use crate::replication::types::log_id;
use crate::storage::raft_log::RaftLog;
use crate::storage::record::{EncodedBatch, RaftId};
use crate::storage::{self, DataDir, FileIo, LogConfig, Partition, io::replace_file};

use super::audit::AUDIT_TOPIC;
use super::error::{Error, Result};
use super::topic::partition_log_config;

/// What a data directory records of the cluster it belongs to, in its `cluster/` (written
/// at the end of a node's first start in cluster mode).
pub const IDENTITY_FILE: &str = "node.json";
/// Where the single node's files go, inside the data directory.
pub const PRE_CLUSTER: &str = "pre-cluster";
/// Where topics are converted, inside the data directory's `cluster/`.
const STAGING: &str = "upgrade";
/// Written once every topic is converted.
const READY: &str = "READY";
/// Entries handed to the log at once while converting.
const CHUNK: usize = 256;

/// Refuses a cluster node's data directory to a broker started without `[cluster]`: as a single
/// node it would write batches into its partitions' Raft logs that no other replica has, and
/// change what the leaders decide (retention, compaction) on this copy alone.
pub fn refuse_cluster_data(data_dir: &Path) -> Result<()> {
    let identity = data_dir.join("cluster").join(IDENTITY_FILE);
    if identity.exists() {
        return Err(Error::InvalidArgument(format!(
            "{} holds a cluster node's data ({}): start it with its [cluster] settings; as a \
             single node it would change this copy alone",
            data_dir.display(),
            identity.display()
        )));
    }
    Ok(())
}

/// Converts the single node's topics of `data_dir` (if any are left) into this node's first
/// entries of their groups, or finishes a conversion a crash interrupted (blocking). Topics
/// already converted, and the audit trail (each node's own), stay as they are.
pub fn adopt_single_node(
    data_dir: &Path,
    members: &Members,
    log: &LogConfig,
    io: Arc<dyn FileIo>,
) -> Result<()> {
    // A node that has started in cluster mode before holds no single node's topics (its
    // identity is written after any conversion, at the end of its first start).
    if data_dir.join("cluster").join(IDENTITY_FILE).exists() {
        return Ok(());
    }
    let staging = data_dir.join("cluster").join(STAGING);
    let data = DataDir::open(data_dir, Arc::clone(&io))?;
    if !staging.join(READY).exists() {
        remove_dir(&staging)?;
        let mut single = Vec::new();
        for name in data.list_topics()? {
            if name != AUDIT_TOPIC && data.topic_config(&name)?.formed_by.is_none() {
                single.push(name);
            }
        }
        if single.is_empty() {
            return Ok(());
        }
        tracing::info!(topics = %single.join(", "), "first start in cluster mode: converting \
            this single node's topics into Raft logs (the originals go to {PRE_CLUSTER}/)");
        convert(&data, &staging, &single, members, log, &io)?;
        replace_file(io.as_ref(), &staging.join(READY), b"")
            .map_err(|e| storage::Error::io(&staging, e))?;
    }
    finish(&data, &staging, io.as_ref())
}

/// Step 1: every topic of `names` converted into a data directory at `staging`.
fn convert(
    data: &DataDir,
    staging: &Path,
    names: &[String],
    members: &Members,
    log: &LogConfig,
    io: &Arc<dyn FileIo>,
) -> Result<()> {
    let into = DataDir::open(staging, Arc::clone(io))?;
    for name in names {
        let mut config = data.topic_config(name)?;
        let log = partition_log_config(&config, log);
        let mut sources = Vec::new();
        for p in 0..config.partitions {
            let dir = data.partition_dir(name, p)?;
            sources.push(Partition::open(&dir, log.clone(), Arc::clone(io), None)?);
        }
        let first_offsets: Vec<u64> = sources.iter().map(Partition::log_start).collect();
        config.formed_by = Some(members.node_id);
        into.create_topic_at(name, &config, &first_offsets, log.index_capacity())?;
        for (p, source) in (0u32..).zip(sources) {
            let dest = RaftLog::open(&into.partition_dir(name, p)?, log.clone(), Arc::clone(io))?;
            copy_as_entries(&source, dest, members).map_err(|e| {
                Error::FailedPrecondition(format!("{}: {e}", source.dir().display()))
            })?;
            source.close()?;
        }
    }
    Ok(())
}

/// The partition's batches as entries of `dest`, after the group's first membership.
fn copy_as_entries(source: &Partition, mut dest: RaftLog, members: &Members) -> Result<()> {
    let voters: BTreeSet<u64> = members.peers.keys().copied().collect();
    let nodes: BTreeMap<u64, BasicNode> = voters
        .iter()
        .map(|&id| (id, BasicNode::default()))
        .collect();
    let membership = openraft::Entry::<PartitionRaft> {
        log_id: log_id(RaftId { term: 0, index: 0 }),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    };
    let mut pending =
        vec![entry_to_batch(&membership).map_err(|e| Error::Internal(e.to_string()))?];
    let mut index = 0;
    let mut next = source.log_start();
    let end = source.high_water();
    while next < end {
        let batches = source.read(next, READ_BYTES)?;
        if batches.is_empty() {
            break;
        }
        for batch in batches {
            let header = *batch.header();
            if header.raft.is_some() {
                return Err(Error::FailedPrecondition(
                    "holds Raft entries: not a single node's data".into(),
                ));
            }
            if header.last_offset() < next {
                continue;
            }
            let encoded = if header.base_offset == next {
                EncodedBatch::from_encoded(batch.bytes().to_vec())
                    .map_err(|why| Error::Internal(why.into()))
            } else if header.base_offset > next {
                batch.rebased(next).ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "the offsets {next}..{} before the batch at {} are too many to carry \
                         over (at most 2^32 a batch)",
                        header.base_offset, header.base_offset
                    ))
                })
            } else {
                Err(Error::FailedPrecondition(format!(
                    "batches overlap at offset {}",
                    header.base_offset
                )))
            }?;
            index += 1;
            pending.push(encoded.with_raft_id(RaftId { term: 0, index }));
            next = header.last_offset() + 1;
            if pending.len() >= CHUNK {
                append(&mut dest, std::mem::take(&mut pending), index)?;
            }
        }
    }
    append(&mut dest, pending, index)?;
    Ok(dest.close()?)
}

/// Appends `batches` (the last being entry `last`) and waits until they are durable.
fn append(dest: &mut RaftLog, batches: Vec<EncodedBatch>, last: u64) -> Result<()> {
    if batches.is_empty() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let last = RaftId {
        term: 0,
        index: last,
    };
    dest.append(
        batches,
        last,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match rx.recv() {
        Ok(r) => r.map(|_| ()).map_err(Error::from),
        Err(_) => Err(Error::Internal("the log writer stopped".into())),
    }
}

/// Step 3: the converted topics into place, the single node's aside; then the staging goes.
fn finish(data: &DataDir, staging: &Path, io: &dyn FileIo) -> Result<()> {
    let converted = staging.join("topics");
    let aside = data.root().join(PRE_CLUSTER);
    let mut names = Vec::new();
    if converted.exists() {
        for entry in std::fs::read_dir(&converted).map_err(|e| storage::Error::io(&converted, e))? {
            let entry = entry.map_err(|e| storage::Error::io(&converted, e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    for name in &names {
        let place = data.topic_dir(name)?;
        if place.exists() {
            move_into(io, &place, &aside.join("topics"), name)?;
        }
        move_into(io, &converted.join(name), &data.root().join("topics"), name)?;
    }
    let groups = data.root().join("groups");
    let has_groups = std::fs::read_dir(&groups).is_ok_and(|mut d| d.next().is_some());
    if has_groups && !aside.join("groups").exists() {
        storage::io::create_dir_all(io, &aside).map_err(|e| storage::Error::io(&aside, e))?;
        rename(io, &groups, &aside.join("groups"))?;
        storage::io::create_dir_all(io, &groups).map_err(|e| storage::Error::io(&groups, e))?;
    }
    remove_dir(staging)?;
    if !names.is_empty() {
        tracing::info!(topics = %names.join(", "), "this single node's topics are now its \
            Raft logs; the original files are in {}", aside.display());
    }
    Ok(())
}

/// Moves `from` to `dir/name` (creating `dir`), durably.
fn move_into(io: &dyn FileIo, from: &Path, dir: &Path, name: &str) -> Result<()> {
    storage::io::create_dir_all(io, dir).map_err(|e| storage::Error::io(dir, e))?;
    rename(io, from, &dir.join(name))
}

fn rename(io: &dyn FileIo, from: &Path, to: &Path) -> Result<()> {
    io.rename(from, to).map_err(|e| storage::Error::io(to, e))?;
    for d in [from.parent(), to.parent()].into_iter().flatten() {
        io.sync_dir(d).map_err(|e| storage::Error::io(d, e))?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(storage::Error::io(dir, e).into()),
    }
}
