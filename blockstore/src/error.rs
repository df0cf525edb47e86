//! The block store's one error type.
//!
//! Rules: input from disk or the network never panics; it becomes one of these
//! variants. `Corrupt` and `NotFound` name the score so callers can fetch the
//! block elsewhere; `WrongPassphrase` is kept apart so the CLI can say so.

use std::path::{Path, PathBuf};

use crate::Score;

/// Everything that can go wrong in the block store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No block with this score is stored here.
    #[error("block {0} not found")]
    NotFound(Score),
    /// A block's bytes do not match its score (damaged, truncated or forged).
    #[error("block {score} is corrupt: {reason}")]
    Corrupt { score: Score, reason: String },
    /// A block matched its score but did not decrypt or decode with the given key.
    #[error("block {0} cannot be decrypted with this key")]
    Decrypt(Score),
    /// The passphrase does not unlock the key file.
    #[error("wrong passphrase: it does not unlock this key file")]
    WrongPassphrase,
    /// A recovery phrase that is not 24 valid BIP39 words.
    #[error("invalid recovery phrase: {0}")]
    Phrase(String),
    /// A file or message that does not follow its documented format.
    #[error("bad format: {0}")]
    Format(String),
    /// The cipher refused its input (never expected with well-formed keys).
    #[error("encryption failed")]
    Crypto,
    /// An operating system error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The block index (redb) failed.
    #[error("block index: {0}")]
    Index(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// True for errors that mean "this copy is bad or absent; another copy may do".
    pub fn is_block_unavailable(&self) -> bool {
        matches!(self, Error::NotFound(_) | Error::Corrupt { .. })
    }
}

macro_rules! index_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Index(e.to_string())
            }
        }
    )*};
}
index_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
