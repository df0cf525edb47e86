//! The filesystem's one error type; each variant carries the errno the kernel sees.

use fincrypt_blockstore::Error as StoreError;

/// Errors of filesystem operations.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A POSIX error that the caller caused (ENOENT, EEXIST, ENOTEMPTY, ...).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The block store failed (a missing or corrupt block is EIO, never wrong data).
    #[error("block store: {0}")]
    Store(#[from] StoreError),
    /// The metadata database failed.
    #[error("metadata: {0}")]
    Meta(String),
}

impl FsError {
    /// The errno to answer the kernel with.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno(e) => *e,
            FsError::Store(StoreError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                libc::ENOSPC
            }
            FsError::Store(_) | FsError::Meta(_) => libc::EIO,
        }
    }
}

/// Shorthand for an errno result.
pub fn errno<T>(e: i32) -> Result<T, FsError> {
    Err(FsError::Errno(e))
}

macro_rules! meta_error {
    ($($t:ty),*) => {$(
        impl From<$t> for FsError {
            fn from(e: $t) -> FsError {
                FsError::Meta(e.to_string())
            }
        }
    )*};
}
meta_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    postcard::Error
);
