//! The filesystem's one error type: what a FUSE request can fail with.
//!
//! Each kind carries its errno and the level it is logged at. The errno mapping is an exhaustive
//! `match` with no catch-all arm, so adding a kind forces a decision about what the caller sees.
//! Download failures are logged once, by the transfer that failed; a read that merely reports one
//! logs at debug, so a reader retrying in a loop cannot flood the log.

use std::io;

use fuser::Errno;
use tracing::Level;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("is a directory")]
    IsDir,
    #[error("read-only file system")]
    ReadOnly,
    #[error("unknown file handle")]
    BadHandle,
    #[error("no such attribute")]
    NoAttr,
    /// The package could not be fetched or did not match the index. Already logged.
    #[error("{path}: {reason}")]
    Fetch { path: String, reason: String },
    /// The local cache failed (disk error, disk full).
    #[error("cache: {0}")]
    Cache(#[from] io::Error),
}

impl FsError {
    pub fn errno(&self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::IsDir => Errno::EISDIR,
            FsError::ReadOnly => Errno::EROFS,
            FsError::BadHandle => Errno::EBADF,
            FsError::NoAttr => Errno::NO_XATTR,
            FsError::Fetch { .. } => Errno::EIO,
            FsError::Cache(_) => Errno::EIO,
        }
    }

    pub fn level(&self) -> Level {
        match self {
            FsError::NotFound | FsError::IsDir | FsError::NoAttr => Level::DEBUG,
            FsError::ReadOnly | FsError::BadHandle | FsError::Fetch { .. } => Level::DEBUG,
            FsError::Cache(_) => Level::WARN,
        }
    }
}
