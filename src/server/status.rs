//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::broker::Error;
use crate::storage::Error as StorageError;

/// The trailer naming a group's leader on an `UNAVAILABLE` answer of a node that does not lead
/// it: `<node id>@<address>`.
pub const LEADER_TRAILER: &str = "x-sluice-leader";

/// The status for a broker error; the message is the error's own text.
pub fn to_status(e: Error) -> Status {
    if let Error::NoLeader {
        leader: Some((id, addr)),
        ..
    } = &e
    {
        let mut s = status(Code::Unavailable, e.to_string());
        if let Ok(value) = format!("{id}@{addr}").parse() {
            s.metadata_mut().insert(LEADER_TRAILER, value);
        }
        return s;
    }
    if let Error::Relayed(s) = e {
        return s;
    }
    let code = match &e {
        Error::Storage(s) => storage_code(s),
        Error::InvalidArgument(_) | Error::MessageTooLarge { .. } => Code::InvalidArgument,
        Error::TopicNotFound(_) | Error::PartitionNotFound { .. } | Error::TopicDeleted(_) => {
            Code::NotFound
        }
        Error::LimitExceeded(_) => Code::ResourceExhausted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::Protected(_) => Code::PermissionDenied,
        Error::ShuttingDown | Error::Unavailable(_) | Error::NoLeader { .. } => Code::Unavailable,
        Error::Damaged(_) => Code::DataLoss,
        Error::Internal(_) => Code::Internal,
        Error::Relayed(s) => s.code(),
    };
    if code == Code::Internal || code == Code::DataLoss {
        tracing::error!(error = %e, "request failed");
    }
    status(code, e.to_string())
}

/// Longest status message sent, in bytes. Messages quote what the client sent (a topic name, an
/// ack id, a key): quoted whole, 100 KB of input came back as 100 KB of `grpc-message`, over
/// what clients accept in headers (tonic's 16 KiB), and the client saw only a transport error.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A status with `message` cut to [`MAX_MESSAGE_BYTES`] (at a character boundary, saying how
/// much was cut). Every status the server makes goes through here or [`to_status`].
pub fn status(code: Code, message: impl Into<String>) -> Status {
    Status::new(code, clip(message.into()))
}

fn clip(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_MESSAGE_BYTES - 64;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!("… ({} more bytes)", total - cut));
    message
}

/// tonic's own answer to a request over `max_request_bytes` is `OUT_OF_RANGE`; by the gRPC
/// convention (and ours) a size limit the client can split is `RESOURCE_EXHAUSTED`. Returns the
/// code to send instead, for response headers carrying that one status.
pub fn rewrite_transport_status(headers: &http::HeaderMap) -> Option<Code> {
    // As sent: percent-encoded, spaces as %20.
    const TOO_LARGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";
    let status = headers.get("grpc-status")?;
    let message = headers.get("grpc-message")?;
    let out_of_range = (Code::OutOfRange as i32).to_string();
    (status.as_bytes() == out_of_range.as_bytes() && message.as_bytes().starts_with(TOO_LARGE))
        .then_some(Code::ResourceExhausted)
}

fn storage_code(e: &StorageError) -> Code {
    match e {
        StorageError::InvalidTopicName { .. }
        | StorageError::InvalidGroupName { .. }
        | StorageError::EmptyBatch
        | StorageError::InvalidConfig(_) => Code::InvalidArgument,
        StorageError::TopicNotFound(_)
        | StorageError::GroupNotFound(_)
        | StorageError::GroupNotOnTopic { .. }
        | StorageError::PartitionNotFound { .. } => Code::NotFound,
        StorageError::TopicExists(_) => Code::AlreadyExists,
        StorageError::BatchTooLarge { .. } => Code::ResourceExhausted,
        StorageError::OffsetOutOfRange { .. } => Code::OutOfRange,
        // A latched partition, a failed sync, a closed writer: retry later (elsewhere).
        StorageError::Poisoned { .. }
        | StorageError::SyncFailed { .. }
        | StorageError::Closed { .. } => Code::Unavailable,
        StorageError::Io { .. } if e.is_storage_full() => Code::ResourceExhausted,
        StorageError::Io { .. } => Code::Internal,
        StorageError::Corrupt { .. } | StorageError::Damaged { .. } => Code::DataLoss,
        StorageError::Locked { .. } => Code::FailedPrecondition,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn each_error_class_gets_its_status_code() {
        let cases: Vec<(Error, Code)> = vec![
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (StorageError::EmptyBatch.into(), Code::InvalidArgument),
            (
                StorageError::InvalidTopicName {
                    name: "../x".into(),
                    reason: "r",
                }
                .into(),
                Code::InvalidArgument,
            ),
            (Error::TopicNotFound("t".into()), Code::NotFound),
            (
                StorageError::OffsetOutOfRange {
                    requested: 9,
                    start: 0,
                    end: 1,
                }
                .into(),
                Code::OutOfRange,
            ),
            (
                StorageError::io("/d", io::Error::from(io::ErrorKind::StorageFull)).into(),
                Code::ResourceExhausted,
            ),
            (
                StorageError::Poisoned { path: "/d".into() }.into(),
                Code::Unavailable,
            ),
            (StorageError::corrupt("/d", 1, "crc").into(), Code::DataLoss),
            (
                StorageError::TopicExists("t".into()).into(),
                Code::AlreadyExists,
            ),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let s = to_status(e);
            assert_eq!(s.code(), code, "{text}");
            assert_eq!(s.message(), text);
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary_and_say_so() {
        let long = format!("malformed ack id {:?}", "é".repeat(60_000));
        let s = to_status(Error::InvalidArgument(long.clone()));
        assert!(
            s.message().len() <= MAX_MESSAGE_BYTES,
            "{}",
            s.message().len()
        );
        assert!(long.starts_with(s.message().split('…').next().unwrap()));
        assert!(s.message().ends_with("more bytes)"), "{}", s.message());
        let short = status(Code::NotFound, "topic \"t\" does not exist");
        assert_eq!(short.message(), "topic \"t\" does not exist");
    }
}
