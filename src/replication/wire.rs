//! Raft's messages as `sluice.cluster.v1` protobuf and back. Entries travel as the version 2
//! batches a replica stores ([`super::log_store::entry_to_batch`]).

use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, LeaderId, Vote};

use super::log_store::{batch_to_entry, entry_to_batch};
use super::types::Proposal;
use super::types::{LogId, PartitionRaft, log_id, raft_id};
use crate::proto::cluster as pb;
use crate::storage::record::{Batch, BatchHeader, Decoded};

/// The largest message on the cluster port: an AppendEntries carries entries up to
/// [`READ_BYTES`](super::log_store::READ_BYTES) and always at least one, which may be a batch of
/// the largest size a log takes; a forwarded proposal is one batch. (tonic's default, 4 MiB,
/// refused replication of a few large batches: measured with `benches/cluster.sh`.)
pub const MAX_MESSAGE_BYTES: usize =
    super::log_store::READ_BYTES + crate::storage::record::MAX_BATCH_LEN + (1 << 20);

/// A client of a peer's cluster port on `channel`, taking and sending messages up to
/// [`MAX_MESSAGE_BYTES`].
pub fn client(
    channel: tonic::transport::Channel,
) -> pb::raft_client::RaftClient<tonic::transport::Channel> {
    pb::raft_client::RaftClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A message that does not decode into Raft's types.
#[derive(Debug, thiserror::Error)]
#[error("malformed Raft message: {0}")]
pub struct Malformed(pub String);

pub fn vote_to_pb(v: &Vote<u64>) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        voted_for: v.leader_id.voted_for,
        committed: v.committed,
    }
}

pub fn vote_from_pb(v: Option<pb::Vote>) -> Result<Vote<u64>, Malformed> {
    let v = v.ok_or_else(|| Malformed("no vote".into()))?;
    Ok(Vote {
        leader_id: LeaderId {
            term: v.term,
            voted_for: v.voted_for,
        },
        committed: v.committed,
    })
}

pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    let id = raft_id(id);
    pb::LogId {
        term: id.term,
        index: id.index,
    }
}

pub fn log_id_from_pb(id: pb::LogId) -> LogId {
    log_id(crate::storage::record::RaftId {
        term: id.term,
        index: id.index,
    })
}

pub fn append_to_pb(
    group: &str,
    rpc: &AppendEntriesRequest<PartitionRaft>,
) -> Result<pb::AppendEntriesRequest, Malformed> {
    let mut entries = Vec::with_capacity(rpc.entries.len());
    for e in &rpc.entries {
        // An entry read from the log goes as it is stored, CRC and all (the receiving writer
        // stamps its offset and CRC again); any other is encoded and sealed at offset 0.
        if let EntryPayload::Normal(Proposal::Records(stored)) = &e.payload
            && BatchHeader::of_entry(stored).is_ok_and(|h| h.raft == Some(raft_id(&e.log_id)))
        {
            entries.push(stored.clone());
            continue;
        }
        let mut batch = entry_to_batch(e).map_err(|e| Malformed(e.to_string()))?;
        entries.push(Bytes::copy_from_slice(batch.seal(0)));
    }
    Ok(pb::AppendEntriesRequest {
        group: group.to_string(),
        vote: Some(vote_to_pb(&rpc.vote)),
        prev_log_id: rpc.prev_log_id.as_ref().map(log_id_to_pb),
        entries,
        leader_commit: rpc.leader_commit.as_ref().map(log_id_to_pb),
    })
}

pub fn append_from_pb(
    req: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<PartitionRaft>, Malformed> {
    let mut entries = Vec::with_capacity(req.entries.len());
    for bytes in &req.entries {
        let batch = match Batch::decode(bytes) {
            Decoded::Valid(b) if b.header().size == bytes.len() => b,
            Decoded::Valid(_) => return Err(Malformed("trailing bytes after an entry".into())),
            Decoded::Torn { .. } => return Err(Malformed("an entry cut short".into())),
            Decoded::Corrupt(why) => return Err(Malformed(format!("a corrupt entry: {why}"))),
        };
        entries.push(batch_to_entry(&batch).map_err(|e| Malformed(e.to_string()))?);
    }
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(req.vote)?,
        prev_log_id: req.prev_log_id.map(log_id_from_pb),
        entries,
        leader_commit: req.leader_commit.map(log_id_from_pb),
    })
}

pub fn append_response_to_pb(r: &AppendEntriesResponse<u64>) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Kind;
    let (kind, matching, higher_vote) = match r {
        AppendEntriesResponse::Success => (Kind::Success, None, None),
        AppendEntriesResponse::PartialSuccess(m) => {
            (Kind::PartialSuccess, m.as_ref().map(log_id_to_pb), None)
        }
        AppendEntriesResponse::Conflict => (Kind::Conflict, None, None),
        AppendEntriesResponse::HigherVote(v) => (Kind::HigherVote, None, Some(vote_to_pb(v))),
    };
    pb::AppendEntriesResponse {
        kind: kind as i32,
        matching,
        higher_vote,
    }
}

pub fn append_response_from_pb(
    r: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<u64>, Malformed> {
    use pb::append_entries_response::Kind;
    Ok(match Kind::try_from(r.kind) {
        Ok(Kind::Success) => AppendEntriesResponse::Success,
        Ok(Kind::PartialSuccess) => {
            AppendEntriesResponse::PartialSuccess(r.matching.map(log_id_from_pb))
        }
        Ok(Kind::Conflict) => AppendEntriesResponse::Conflict,
        Ok(Kind::HigherVote) => AppendEntriesResponse::HigherVote(vote_from_pb(r.higher_vote)?),
        Err(_) => {
            return Err(Malformed(format!(
                "unknown append response kind {}",
                r.kind
            )));
        }
    })
}

pub fn vote_request_to_pb(group: &str, rpc: &VoteRequest<u64>) -> pb::VoteRequest {
    pb::VoteRequest {
        group: group.to_string(),
        vote: Some(vote_to_pb(&rpc.vote)),
        last_log_id: rpc.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_request_from_pb(req: pb::VoteRequest) -> Result<VoteRequest<u64>, Malformed> {
    Ok(VoteRequest {
        vote: vote_from_pb(req.vote)?,
        last_log_id: req.last_log_id.map(log_id_from_pb),
    })
}

pub fn vote_response_to_pb(r: &VoteResponse<u64>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub fn vote_response_from_pb(r: pb::VoteResponse) -> Result<VoteResponse<u64>, Malformed> {
    Ok(VoteResponse {
        vote: vote_from_pb(r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.map(log_id_from_pb),
    })
}

pub fn snapshot_to_pb(
    group: &str,
    rpc: &InstallSnapshotRequest<PartitionRaft>,
) -> Result<pb::InstallSnapshotRequest, Malformed> {
    Ok(pb::InstallSnapshotRequest {
        group: group.to_string(),
        vote: Some(vote_to_pb(&rpc.vote)),
        meta: serde_json::to_vec(&rpc.meta)
            .map_err(|e| Malformed(e.to_string()))?
            .into(),
        offset: rpc.offset,
        data: rpc.data.clone().into(),
        done: rpc.done,
    })
}

pub fn snapshot_from_pb(
    req: pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<PartitionRaft>, Malformed> {
    Ok(InstallSnapshotRequest {
        vote: vote_from_pb(req.vote)?,
        meta: serde_json::from_slice(&req.meta).map_err(|e| Malformed(e.to_string()))?,
        offset: req.offset,
        data: req.data.to_vec(),
        done: req.done,
    })
}

pub fn snapshot_response_to_pb(r: &InstallSnapshotResponse<u64>) -> pb::InstallSnapshotResponse {
    pb::InstallSnapshotResponse {
        vote: Some(vote_to_pb(&r.vote)),
    }
}

pub fn snapshot_response_from_pb(
    r: pb::InstallSnapshotResponse,
) -> Result<InstallSnapshotResponse<u64>, Malformed> {
    Ok(InstallSnapshotResponse {
        vote: vote_from_pb(r.vote)?,
    })
}
