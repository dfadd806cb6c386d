//! File work from async code: every read, open and delete that may wait on the disk runs on
//! tokio's blocking pool through [`blocking`], never on a worker thread.

use super::error::{Error, Result};

/// Runs `f` on the blocking pool and returns its result.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
