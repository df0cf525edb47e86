//! The engine's one error type.
//!
//! Rules: a damaged manifest entry, a failed probe or a peer that lies never
//! becomes a wrong answer ("no holders", "held"); it is an error here, or it is
//! logged and counted where the engine can carry on without it. Peers'
//! failures keep their own type ([`fincrypt_net::Error`]) so callers can tell
//! whose fault they were.

/// Everything that can go wrong in the durability engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest's database (redb) failed.
    #[error("manifest database: {0}")]
    Db(#[from] redb::Error),
    /// The local block store failed.
    #[error(transparent)]
    Store(#[from] fincrypt_blockstore::Error),
    /// A peer request failed.
    #[error(transparent)]
    Net(#[from] fincrypt_net::Error),
    /// A record could not be encoded or decoded.
    #[error("encoding: {0}")]
    Encode(#[from] postcard::Error),
    /// A file or record that does not follow its documented format.
    #[error("{0}")]
    Format(String),
    /// The owner's side could not say what its blocks want (a walk of the filesystem failed).
    #[error("working out the copies blocks want: {0}")]
    Wants(String),
    /// Peers could not be reached for what was asked (no peer, or none kept it).
    #[error("{0}")]
    Network(String),
    /// The market (paid storage) could not record what placement did.
    #[error("market: {0}")]
    Market(String),
    /// The engine was shut down.
    #[error("the engine is shutting down")]
    Shutdown,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Result with the engine's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
