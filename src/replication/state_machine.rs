//! What applying a partition group's entries means, and its snapshots.
//!
//! The messages are the log itself, so applying an entry stores nothing: it advances the applied
//! id, remembers the membership, and counts offsets (an entry of n offsets takes the next n; Raft's
//! own entries take none), which is exactly how the partition's writer assigned them, and lets
//! readers of the partition see up to there (nothing past the commit point is read). A snapshot
//! is that small state (`snapshot`, JSON, replaced atomically); the messages below a snapshot
//! stay in the log's segments.
//!
//! A group may keep more state than its log position ([`GroupState`]): the metadata group keeps
//! its catalog of topics, changed by each entry it applies and carried in its snapshots.
//!
//! **Retention of a replicated partition** is a leader's command in the log
//! ([`GroupCommand::Trim`]): applying it hides the messages below its offset from readers, and
//! the group's snapshot is taken *at the trim point* (the state there: the next offset is the
//! trim offset), not at the applied entry. openraft then purges the log up to that point
//! (whole segments go), and a replica that lacks those entries installs the snapshot and starts
//! its log at the trim offset: the messages after it follow from the leader's log. So a
//! snapshot never needs to carry messages, and every replica holds the same offsets.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, StoredMembership};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::log_store::storage_error;
use super::types::{
    Applied, CompactedAt, GroupCommand, Installed, LogId, PartitionRaft, Proposal, StorageError,
    TrimPoint,
};
use crate::storage::CompactionPoint;
use crate::storage::io::{FileIo, replace_file};
use crate::storage::raft_log::RaftLogReader;
use crate::storage::record::BatchHeader;

type Entry = openraft::Entry<PartitionRaft>;
type Membership = StoredMembership<u64, openraft::BasicNode>;

pub const SNAPSHOT_FILE: &str = "snapshot";

/// What a group keeps besides its log position, changed by each data entry it applies (in log
/// order, so the same on every replica). A partition keeps nothing (`()`).
pub trait GroupState:
    Default + Clone + Serialize + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
    /// Whether the log is the data (a partition): its leader may trim it, and its snapshots are
    /// taken at the trim point. A group whose state is built from its log (the catalog) takes
    /// its snapshots at the applied entry and ignores trims.
    const LOG_IS_DATA: bool;

    /// Applies one committed data entry (the proposal's bytes). Deterministic, and infallible:
    /// an entry it cannot use changes nothing, on every replica alike.
    fn apply(&mut self, proposal: &Bytes);
}

impl GroupState for () {
    const LOG_IS_DATA: bool = true;

    fn apply(&mut self, _proposal: &Bytes) {}
}

/// Told of each applied message entry whose records carry ids: the offset its first record
/// took, and the entry's bytes ([`crate::storage::EncodedBatch::entry_records`] reads them).
pub type OnIds = Box<dyn Fn(u64, &Bytes) + Send + Sync>;

/// Told, after each run of entries applied, the term of the last one.
pub type OnApplied = Box<dyn Fn(u64) + Send + Sync>;

/// The applied state: all a group's snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Content<S> {
    applied: Option<LogId>,
    membership: Membership,
    /// The offset the next message gets.
    next_offset: u64,
    #[serde(default)]
    state: S,
    /// The latest retention point applied (partitions only).
    #[serde(default)]
    trim: Option<TrimPoint>,
    /// The latest compaction point applied (partitions only).
    #[serde(default)]
    compaction: Option<CompactedAt>,
}

impl<S: GroupState> Content<S> {
    /// The state a snapshot holds: a partition's at its retention point (none before the first),
    /// any other group's as applied.
    fn snapshot(&self) -> Content<S> {
        if !S::LOG_IS_DATA {
            return self.clone();
        }
        match self.trim {
            Some(trim) => Content {
                applied: Some(trim.upto),
                membership: self.membership.clone(),
                next_offset: trim.offset,
                state: S::default(),
                trim: Some(trim),
                // Only a point set at or before the snapshot's entry: a later one is applied
                // again from the log after it.
                compaction: self.compaction.filter(|c| c.at <= trim.upto),
            },
            None => Content {
                membership: self.membership.clone(),
                ..Content::default()
            },
        }
    }

    /// Applies a leader's command (the entry `at`); true when it moved the retention point.
    fn command(&mut self, at: LogId, command: &GroupCommand) -> bool {
        let (upto_term, upto_index, offset) = match *command {
            GroupCommand::Trim {
                upto_term,
                upto_index,
                offset,
            } => (upto_term, upto_index, offset),
            GroupCommand::Compact { below, now_ms } => {
                // Deterministic on every replica: only forward, never past what is applied.
                if S::LOG_IS_DATA
                    && below <= self.next_offset
                    && self.compaction.is_none_or(|c| c.point.below < below)
                {
                    let point = CompactionPoint { below, now_ms };
                    self.compaction = Some(CompactedAt { at, point });
                }
                return false;
            }
        };
        let upto = super::types::log_id(crate::storage::record::RaftId {
            term: upto_term,
            index: upto_index,
        });
        // Deterministic on every replica: only forward, never past what is applied, and never
        // before the membership the snapshot at the point would have to name.
        let usable = S::LOG_IS_DATA
            && self.trim.is_none_or(|t| t.offset < offset && t.upto < upto)
            && offset <= self.next_offset
            && Some(upto) < self.applied
            && self.membership.log_id().is_none_or(|m| m <= upto);
        if usable {
            self.trim = Some(TrimPoint { upto, offset });
        }
        usable
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

/// Told the group's state after each change (applied entries, an installed snapshot).
pub type Publish<S> = Box<dyn Fn(&S) + Send + Sync>;

/// A group's state machine.
pub struct GroupStateMachine<S: GroupState> {
    content: Content<S>,
    log: RaftLogReader,
    current: Arc<Mutex<Option<Stored>>>,
    dir: PathBuf,
    io: Arc<dyn FileIo>,
    publish: Option<Publish<S>>,
    /// Told each time a retention point is applied (its snapshot is due).
    on_trim: Option<Box<dyn Fn() + Send + Sync>>,
    /// Told each time a compaction point is applied (compacting to it is due).
    on_compact: Option<Box<dyn Fn() + Send + Sync>>,
    /// Told of each applied message entry with ids.
    on_ids: Option<OnIds>,
    /// Told the term of the last entry applied, after each run.
    on_applied: Option<OnApplied>,
    /// Snapshots installed from a leader since the group started here.
    installs: Arc<std::sync::atomic::AtomicU64>,
    installed: Installed,
}

/// A partition group's state machine: the log position alone.
pub type StateMachine = GroupStateMachine<()>;

impl<S: GroupState> std::fmt::Debug for GroupStateMachine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStateMachine")
            .field("content", &self.content)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl<S: GroupState> GroupStateMachine<S> {
    /// Opens the state machine whose snapshot lives in `dir` (the partition's directory), for
    /// the partition `log` reads.
    pub fn open(
        dir: &Path,
        io: Arc<dyn FileIo>,
        log: RaftLogReader,
    ) -> Result<GroupStateMachine<S>, StorageError> {
        let path = dir.join(SNAPSHOT_FILE);
        let subject = || ErrorSubject::Snapshot(None);
        let current: Option<Stored> = match std::fs::read(&path) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| storage_error(subject(), ErrorVerb::Read, e))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(storage_error(subject(), ErrorVerb::Read, e)),
        };
        let content = match &current {
            Some(s) => serde_json::from_slice(&s.data)
                .map_err(|e| storage_error(subject(), ErrorVerb::Read, e))?,
            // Nothing applied yet: the first entry's messages take the offset the log starts
            // at (0, or where a single node's converted log or its replicas start).
            None => Content {
                next_offset: log.partition().log_start(),
                ..Content::default()
            },
        };
        log.set_committed_offset(content.next_offset);
        if let Some(trim) = content.trim {
            log.partition().hide_below(trim.offset);
        }
        if let Some(c) = content.compaction {
            log.partition().set_compaction_point(c.point);
        }
        let installed = Installed::new(content.trim);
        Ok(GroupStateMachine {
            content,
            log,
            current: Arc::new(Mutex::new(current)),
            dir: dir.to_path_buf(),
            io,
            publish: None,
            on_trim: None,
            on_compact: None,
            on_ids: None,
            on_applied: None,
            installs: Arc::default(),
            installed,
        })
    }

    /// Calls `on_trim` each time a retention point is applied: this node's snapshot is due
    /// (`Raft::trigger().snapshot()`), after which openraft purges the log up to it.
    pub fn on_trim(mut self, on_trim: Box<dyn Fn() + Send + Sync>) -> Self {
        self.on_trim = Some(on_trim);
        self
    }

    /// Calls `on_compact` each time a compaction point is applied: compacting this replica to
    /// it is due ([`crate::storage::Partition::compact_to_point`]).
    pub fn on_compact(mut self, on_compact: Box<dyn Fn() + Send + Sync>) -> Self {
        self.on_compact = Some(on_compact);
        self
    }

    /// Calls `on_ids` for each applied message entry with ids, and `on_applied` after each
    /// run of entries applied (see [`OnIds`], [`OnApplied`]): how a replica keeps its id index.
    pub fn on_apply(mut self, on_ids: OnIds, on_applied: OnApplied) -> Self {
        self.on_ids = Some(on_ids);
        self.on_applied = Some(on_applied);
        self
    }

    /// Counts the snapshots installed from a leader since the group started here.
    pub fn installs(&self) -> Arc<std::sync::atomic::AtomicU64> {
        Arc::clone(&self.installs)
    }

    /// The snapshot point last installed (at open, the saved snapshot's), for the group's log
    /// store ([`super::LogStore::linked`]).
    pub fn installed(&self) -> Installed {
        self.installed.clone()
    }

    /// Tells `publish` the state now and after every change.
    pub fn publishing(mut self, publish: Publish<S>) -> Self {
        publish(&self.content.state);
        self.publish = Some(publish);
        self
    }

    fn published(&self) {
        if let Some(p) = &self.publish {
            p(&self.content.state);
        }
    }

    /// The offset the next message gets.
    pub fn next_offset(&self) -> u64 {
        self.content.next_offset
    }
}

fn save(dir: &Path, io: &dyn FileIo, stored: &Stored) -> Result<(), StorageError> {
    let signature = Some(stored.meta.signature());
    let bytes = serde_json::to_vec(stored).map_err(|e| {
        storage_error(
            ErrorSubject::Snapshot(signature.clone()),
            ErrorVerb::Write,
            e,
        )
    })?;
    replace_file(io, &dir.join(SNAPSHOT_FILE), &bytes)
        .map_err(|e| storage_error(ErrorSubject::Snapshot(signature), ErrorVerb::Write, e))
}

/// Builds a snapshot of the state as it was when the builder was made.
#[derive(Debug)]
pub struct SnapshotBuilder<S> {
    content: Content<S>,
    current: Arc<Mutex<Option<Stored>>>,
    dir: PathBuf,
    io: Arc<dyn FileIo>,
}

impl<S: GroupState> RaftSnapshotBuilder<PartitionRaft> for SnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionRaft>, StorageError> {
        let data = serde_json::to_vec(&self.content)
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        let snapshot_id = match &self.content.applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.content.applied,
            last_membership: self.content.membership.clone(),
            snapshot_id,
        };
        let stored = Stored {
            meta: meta.clone(),
            data: data.clone(),
        };
        save(&self.dir, self.io.as_ref(), &stored)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: GroupState> RaftStateMachine<PartitionRaft> for GroupStateMachine<S> {
    type SnapshotBuilder = SnapshotBuilder<S>;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.content.applied, self.content.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let (mut trimmed, mut compacted) = (false, false);
        for entry in entries {
            let log_id = *entry.get_log_id();
            self.content.applied = Some(log_id);
            let applied = match &entry.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Membership(m) => {
                    self.content.membership = StoredMembership::new(Some(log_id), m.clone());
                    Applied::default()
                }
                EntryPayload::Normal(Proposal::Records(batch)) => {
                    // The header alone: applying reads no payload and copies nothing.
                    let header = BatchHeader::of_entry(batch).map_err(|why| {
                        storage_error(ErrorSubject::Log(log_id), ErrorVerb::Read, why)
                    })?;
                    let base = self.content.next_offset;
                    let last = base + u64::from(header.last_offset_delta);
                    self.content.next_offset = last + 1;
                    self.content.state.apply(batch);
                    if header.has_ids()
                        && let Some(on_ids) = &self.on_ids
                    {
                        on_ids(base, batch);
                    }
                    Applied {
                        offsets: Some((base, last)),
                    }
                }
                EntryPayload::Normal(Proposal::Command(command)) => {
                    if self.content.command(log_id, command)
                        && let Some(trim) = self.content.trim
                    {
                        self.log.partition().hide_below(trim.offset);
                        trimmed = true;
                    }
                    if let Some(c) = self.content.compaction
                        && self.log.partition().compaction_point() != Some(c.point)
                    {
                        self.log.partition().set_compaction_point(c.point);
                        compacted = true;
                    }
                    Applied::default()
                }
            };
            out.push(applied);
        }
        self.log.set_committed_offset(self.content.next_offset);
        self.published();
        if let (Some(on_applied), Some(last)) = (&self.on_applied, self.content.applied) {
            on_applied(last.leader_id.term);
        }
        if trimmed && let Some(on_trim) = &self.on_trim {
            on_trim();
        }
        if compacted && let Some(on_compact) = &self.on_compact {
            on_compact();
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder<S> {
        SnapshotBuilder {
            content: self.content.snapshot(),
            current: Arc::clone(&self.current),
            dir: self.dir.clone(),
            io: Arc::clone(&self.io),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let signature = Some(meta.signature());
        let data = snapshot.into_inner();
        let content: Content<S> = serde_json::from_slice(&data)
            .map_err(|e| storage_error(ErrorSubject::Snapshot(signature), ErrorVerb::Read, e))?;
        let stored = Stored {
            meta: meta.clone(),
            data,
        };
        save(&self.dir, self.io.as_ref(), &stored)?;
        self.content = content;
        if let Some(trim) = self.content.trim {
            self.log.partition().hide_below(trim.offset);
        }
        if let Some(c) = self.content.compaction {
            self.log.partition().set_compaction_point(c.point);
        }
        self.log.set_committed_offset(self.content.next_offset);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
        // The log store may be waiting for this to purge past the end of its log.
        self.installed.send_replace(self.content.trim);
        self.installs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.published();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionRaft>>, StorageError> {
        let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        Ok(current.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::record::RaftId;

    fn id(index: u64) -> LogId {
        super::super::types::log_id(RaftId { term: 1, index })
    }

    fn trim(index: u64, offset: u64) -> GroupCommand {
        GroupCommand::Trim {
            upto_term: 1,
            upto_index: index,
            offset,
        }
    }

    fn compact(below: u64) -> GroupCommand {
        GroupCommand::Compact {
            below,
            now_ms: 5_000,
        }
    }

    /// A compaction point only moves forward and never past what is applied; a snapshot at a
    /// retention point carries it only when the entry that set it is in the snapshot (a later
    /// one is applied again from the log), and the catalog ignores it.
    #[test]
    fn a_compaction_point_moves_only_forward_within_what_is_applied() {
        type Case = (
            &'static str,
            Vec<(u64, GroupCommand)>,
            Option<(u64, u64)>,
            bool,
        );
        // (what, (entry index, command) in log order, the point kept: entry, below; whether a
        // snapshot at the retention point entry 10 carries it)
        let cases: [Case; 7] = [
            (
                "a first point",
                vec![(21, compact(80))],
                Some((21, 80)),
                false,
            ),
            (
                "forward again",
                vec![(21, compact(80)), (22, compact(90))],
                Some((22, 90)),
                false,
            ),
            (
                "not backward",
                vec![(21, compact(90)), (22, compact(80))],
                Some((21, 90)),
                false,
            ),
            (
                "the same point twice keeps the first",
                vec![(21, compact(80)), (22, compact(80))],
                Some((21, 80)),
                false,
            ),
            (
                "not past the next offset",
                vec![(21, compact(101))],
                None,
                false,
            ),
            (
                "up to the next offset",
                vec![(21, compact(100))],
                Some((21, 100)),
                false,
            ),
            (
                "set before the snapshot's entry",
                vec![(5, compact(40))],
                Some((5, 40)),
                true,
            ),
        ];
        for (what, commands, want, in_snapshot) in cases {
            let mut c = Content::<()> {
                applied: Some(id(20)),
                membership: StoredMembership::new(Some(id(1)), openraft::Membership::default()),
                next_offset: 100,
                ..Content::default()
            };
            for (index, command) in &commands {
                c.command(id(*index), command);
            }
            let got = c.compaction.map(|p| (p.at.index, p.point.below));
            assert_eq!(got, want, "{what}");
            c.command(id(23), &trim(10, 50));
            let carried = c.snapshot().compaction.is_some();
            assert_eq!(carried, in_snapshot, "{what}: carried by the snapshot");
        }
        let mut catalog = Content::<crate::replication::catalog::Catalog> {
            next_offset: 100,
            ..Content::default()
        };
        catalog.command(id(21), &compact(50));
        assert_eq!(catalog.compaction, None, "the catalog ignores compaction");
    }

    /// The rules every replica applies alike: a retention point only moves forward, never past
    /// what is applied, never before the membership a snapshot there would name; a group whose
    /// state is built from its log ignores it. A partition's snapshot is the state at the point.
    #[test]
    fn a_trim_moves_only_forward_within_what_is_applied() {
        let partition = || Content::<()> {
            applied: Some(id(20)),
            membership: StoredMembership::new(Some(id(1)), openraft::Membership::default()),
            next_offset: 100,
            ..Content::default()
        };
        // (what, the commands in log order, the retention point kept: entry index, offset)
        type Case = (&'static str, Vec<GroupCommand>, Option<(u64, u64)>);
        let cases: [Case; 6] = [
            ("a first trim", vec![trim(10, 50)], Some((10, 50))),
            (
                "forward again",
                vec![trim(10, 50), trim(12, 60)],
                Some((12, 60)),
            ),
            (
                "not backward",
                vec![trim(12, 60), trim(10, 50)],
                Some((12, 60)),
            ),
            ("not past what is applied", vec![trim(20, 100)], None),
            ("not past the next offset", vec![trim(19, 101)], None),
            ("not before the membership", vec![trim(0, 0)], None),
        ];
        for (what, commands, want) in cases {
            let mut c = partition();
            for (i, command) in commands.iter().enumerate() {
                c.command(id(21 + i as u64), command);
            }
            let got = c.trim.map(|t| (t.upto.index, t.offset));
            assert_eq!(got, want, "{what}");
            let snapshot = c.snapshot();
            match want {
                Some((index, offset)) => {
                    assert_eq!(snapshot.applied, Some(id(index)), "{what}");
                    assert_eq!(snapshot.next_offset, offset, "{what}");
                }
                None => assert_eq!(snapshot.applied, None, "{what}"),
            }
        }
        let mut catalog = Content::<crate::replication::catalog::Catalog> {
            applied: Some(id(20)),
            next_offset: 100,
            ..Content::default()
        };
        assert!(
            !catalog.command(id(21), &trim(10, 50)),
            "the catalog ignores trims"
        );
        assert_eq!(
            catalog.snapshot().applied,
            Some(id(20)),
            "snapshot as applied"
        );
    }
}
