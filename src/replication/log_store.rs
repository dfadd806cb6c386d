//! openraft's log storage on a partition log: entries are version 2 batches of the partition
//! ([`RaftLog`]), the vote and the purge point its `raft` file.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, LeaderId, OptionalSend, RaftLogId, Vote};

use super::types::{Installed, LogId, PartitionRaft, Proposal, StorageError, log_id, raft_id};
use crate::storage::raft_log::{RaftLog, RaftLogReader as PartitionReader, StoredVote};
use crate::storage::record::{Batch, ControlKind, EncodedBatch};

type Entry = openraft::Entry<PartitionRaft>;

/// Reads asked of openraft come in bounded slices of about this many bytes.
pub const READ_BYTES: usize = 1 << 20;

pub(super) fn storage_error(
    subject: ErrorSubject<u64>,
    verb: ErrorVerb,
    e: impl ToString,
) -> StorageError {
    StorageError::from_io_error(subject, verb, std::io::Error::other(e.to_string()))
}

/// A Raft entry as the batch that stores it.
pub fn entry_to_batch(entry: &Entry) -> Result<EncodedBatch, StorageError> {
    let id = raft_id(entry.get_log_id());
    let subject = || ErrorSubject::Log(*entry.get_log_id());
    Ok(match &entry.payload {
        EntryPayload::Blank => EncodedBatch::control(id, ControlKind::Blank, &[], 0),
        EntryPayload::Normal(Proposal::Records(batch)) => EncodedBatch::from_entry(batch, id)
            .map_err(|why| storage_error(subject(), ErrorVerb::Write, why))?,
        EntryPayload::Normal(Proposal::Command(command)) => {
            let json = serde_json::to_vec(command)
                .map_err(|e| storage_error(subject(), ErrorVerb::Write, e))?;
            EncodedBatch::control(id, ControlKind::Command, &json, 0)
        }
        EntryPayload::Membership(m) => {
            let json =
                serde_json::to_vec(m).map_err(|e| storage_error(subject(), ErrorVerb::Write, e))?;
            EncodedBatch::control(id, ControlKind::Membership, &json, 0)
        }
    })
}

/// A stored batch as the Raft entry it is.
pub fn batch_to_entry(batch: &Batch) -> Result<Entry, StorageError> {
    let Some(id) = batch.header().raft else {
        return Err(storage_error(
            ErrorSubject::Logs,
            ErrorVerb::Read,
            "a batch without a Raft entry id in a replicated partition",
        ));
    };
    let log_id = log_id(id);
    let payload = match batch.control() {
        Some((ControlKind::Blank, _)) => EntryPayload::Blank,
        Some((ControlKind::Membership, json)) => EntryPayload::Membership(
            serde_json::from_slice(&json)
                .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Read, e))?,
        ),
        Some((ControlKind::Command, json)) => EntryPayload::Normal(Proposal::Command(
            serde_json::from_slice(&json)
                .map_err(|e| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Read, e))?,
        )),
        // The entry as stored, shared with the buffer it was read into: sending it to a
        // follower or applying it copies nothing.
        None => EntryPayload::Normal(Proposal::Records(batch.bytes().clone())),
    };
    Ok(Entry { log_id, payload })
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(&n) => n,
        Bound::Excluded(&n) => n.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(&n) => n.saturating_add(1),
        Bound::Excluded(&n) => n,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

/// Reads entries by index: what openraft's replication streams use.
#[derive(Debug, Clone)]
pub struct LogReader {
    inner: PartitionReader,
}

impl LogReader {
    fn read(&self, from: u64, to: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut next = from;
        while next < to {
            let batches = self
                .inner
                .entries(next, to, READ_BYTES)
                .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            if batches.is_empty() {
                break;
            }
            for b in &batches {
                out.push(batch_to_entry(b)?);
            }
            match out.last() {
                Some(e) => next = e.log_id.index + 1,
                None => break,
            }
        }
        Ok(out)
    }
}

impl RaftLogReader<PartitionRaft> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = bounds(&range);
        self.read(from, to)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let batches = self
            .inner
            .entries(start, end, READ_BYTES)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        batches.iter().map(batch_to_entry).collect()
    }
}

/// How long a purge past the end of the log waits for the state machine to install the
/// snapshot it follows (openraft runs the two apart; the install is a local file write).
const INSTALL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// openraft's log storage for one partition.
#[derive(Debug)]
pub struct LogStore {
    log: RaftLog,
    /// The snapshot point the group's state machine last installed.
    installed: Option<Installed>,
}

impl LogStore {
    pub fn new(log: RaftLog) -> Self {
        LogStore {
            log,
            installed: None,
        }
    }

    /// Links the store to its group's state machine ([`GroupStateMachine::installed`]): a purge
    /// past the end of this log (a snapshot installed from the leader) starts the log again at
    /// the snapshot's offset. A log purged past its end before a crash starts again here too.
    pub fn linked(mut self, installed: Installed) -> Result<Self, StorageError> {
        if let Some(purged) = self.log.purged()
            && self.log.purge_empties(purged)
        {
            let point = (*installed.borrow()).filter(|p| raft_id(&p.upto) == purged);
            let Some(point) = point else {
                return Err(storage_error(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    "the log is purged past its end but no snapshot says where it starts again",
                ));
            };
            self.log
                .purge_restarting(purged, point.offset)
                .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        }
        self.installed = Some(installed);
        Ok(self)
    }

    pub fn raft_log(&self) -> &RaftLog {
        &self.log
    }

    fn reader(&self) -> LogReader {
        LogReader {
            inner: self.log.reader(),
        }
    }
}

impl RaftLogReader<PartitionRaft> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (from, to) = bounds(&range);
        self.reader().read(from, to)
    }
}

impl RaftLogStorage<PartitionRaft> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionRaft>, StorageError> {
        let last_purged_log_id = self.log.purged().map(log_id);
        let last_log_id = self.log.last().map(log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.log
            .save_vote(StoredVote {
                term: vote.leader_id.term,
                voted_for: vote.leader_id.voted_for,
                committed: vote.committed,
            })
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.log.vote().map(|v| Vote {
            leader_id: LeaderId {
                term: v.term,
                voted_for: v.voted_for,
            },
            committed: v.committed,
        }))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<PartitionRaft>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batches = Vec::new();
        let mut last = None;
        for entry in entries {
            batches.push(entry_to_batch(&entry)?);
            last = Some(raft_id(entry.get_log_id()));
        }
        let Some(last) = last else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        self.log.append(
            batches,
            last,
            Box::new(move |r| {
                callback.log_io_completed(r.map(|_| ()).map_err(std::io::Error::other))
            }),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.log
            .truncate(log_id.index)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let id = raft_id(&log_id);
        let delete = |e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e);
        // Past the end of a linked log: a snapshot from the leader, which the state machine
        // installs beside this purge, says which offset the log starts again at. (A store not
        // linked to a state machine, as in openraft's storage suite, keeps its offsets.)
        let installed = match &self.installed {
            Some(installed) if self.log.purge_empties(id) => installed,
            _ => return self.log.purge(id).map_err(delete),
        };
        let mut seen = installed.subscribe();
        let point = tokio::time::timeout(
            INSTALL_WAIT,
            seen.wait_for(|p| p.is_some_and(|p| p.upto == log_id)),
        )
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|p| *p));
        let Some(point) = point else {
            return Err(delete(crate::storage::Error::InvalidConfig(format!(
                "no snapshot at {log_id} was installed within {} s to purge up to",
                INSTALL_WAIT.as_secs()
            ))));
        };
        self.log.purge_restarting(id, point.offset).map_err(delete)
    }
}
