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

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, StoredMembership};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::log_store::storage_error;
use super::types::{Applied, LogId, PartitionRaft, StorageError};
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
    /// Applies one committed data entry (the proposal's bytes). Deterministic, and infallible:
    /// an entry it cannot use changes nothing, on every replica alike.
    fn apply(&mut self, proposal: &[u8]);
}

impl GroupState for () {
    fn apply(&mut self, _proposal: &[u8]) {}
}

/// The applied state: all a group's snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Content<S> {
    applied: Option<LogId>,
    membership: Membership,
    /// The offset the next message gets.
    next_offset: u64,
    #[serde(default)]
    state: S,
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
            None => Content::default(),
        };
        log.set_committed_offset(content.next_offset);
        Ok(GroupStateMachine {
            content,
            log,
            current: Arc::new(Mutex::new(current)),
            dir: dir.to_path_buf(),
            io,
            publish: None,
        })
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
        for entry in entries {
            let log_id = *entry.get_log_id();
            self.content.applied = Some(log_id);
            let applied = match &entry.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Membership(m) => {
                    self.content.membership = StoredMembership::new(Some(log_id), m.clone());
                    Applied::default()
                }
                EntryPayload::Normal(p) => {
                    // The header alone: applying reads no payload and copies nothing.
                    let header = BatchHeader::of_proposal(&p.batch).map_err(|why| {
                        storage_error(ErrorSubject::Log(log_id), ErrorVerb::Read, why)
                    })?;
                    let base = self.content.next_offset;
                    let last = base + u64::from(header.last_offset_delta);
                    self.content.next_offset = last + 1;
                    self.content.state.apply(&p.batch);
                    Applied {
                        offsets: Some((base, last)),
                    }
                }
            };
            out.push(applied);
        }
        self.log.set_committed_offset(self.content.next_offset);
        self.published();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder<S> {
        SnapshotBuilder {
            content: self.content.clone(),
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
        self.log.set_committed_offset(self.content.next_offset);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored);
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
