//! The check every offline command (`compact --data-dir`, `verify`, `dump`, `audit
//! --data-dir`) makes before it reads: the directory is a data directory.

use crate::storage::data_dir::not_a_data_dir;
use crate::storage::verify::is_data_dir;

use super::error::CliError;

/// Refuses a directory that is not a Sluice data directory (exit 2), rather than finding "no
/// problems" in it, or making one of it: no offline command creates a data directory.
pub fn data_dir_or_refuse(dir: &std::path::Path) -> Result<(), CliError> {
    if is_data_dir(dir) {
        return Ok(());
    }
    Err(CliError::NotDataDir(not_a_data_dir(dir)))
}
