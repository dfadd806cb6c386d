//! The one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::broker::Error;
use crate::storage::Error as StorageError;

/// The status for a broker error; the message is the error's own text.
pub fn to_status(e: Error) -> Status {
    let code = match &e {
        Error::Storage(s) => storage_code(s),
        Error::InvalidArgument(_) | Error::MessageTooLarge { .. } => Code::InvalidArgument,
        Error::TopicNotFound(_) | Error::PartitionNotFound { .. } | Error::TopicDeleted(_) => {
            Code::NotFound
        }
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ShuttingDown => Code::Unavailable,
        Error::Internal(_) => Code::Internal,
    };
    if code == Code::Internal || code == Code::DataLoss {
        tracing::error!(error = %e, "request failed");
    }
    Status::new(code, e.to_string())
}

fn storage_code(e: &StorageError) -> Code {
    match e {
        StorageError::InvalidTopicName { .. }
        | StorageError::InvalidGroupName { .. }
        | StorageError::EmptyBatch
        | StorageError::BatchTooLarge { .. }
        | StorageError::InvalidConfig(_) => Code::InvalidArgument,
        StorageError::TopicNotFound(_)
        | StorageError::GroupNotFound(_)
        | StorageError::PartitionNotFound { .. } => Code::NotFound,
        StorageError::TopicExists(_) => Code::AlreadyExists,
        StorageError::OffsetOutOfRange { .. } => Code::OutOfRange,
        // A latched partition, a failed sync, a closed writer: retry later (elsewhere).
        StorageError::Poisoned { .. }
        | StorageError::SyncFailed { .. }
        | StorageError::Closed { .. } => Code::Unavailable,
        StorageError::Io { .. } if e.is_storage_full() => Code::ResourceExhausted,
        StorageError::Io { .. } => Code::Internal,
        StorageError::Corrupt { .. } => Code::DataLoss,
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
}
