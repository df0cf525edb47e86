//! The peer layer's one error type.
//!
//! Rules: nothing a peer sends makes this crate panic; it becomes one of these
//! variants. Variants that concern a peer name it, so a caller can count
//! failures per holder. `Refused` means the peer answered and said no;
//! `Unreachable`, `Timeout` and `Protocol` mean it did not answer usefully;
//! `Corrupt` means it answered with bytes that do not match the score — a
//! lying or damaged holder, never data for a reader. A closed command channel
//! is [`Error::Shutdown`], not a panic.

use std::path::PathBuf;

use libp2p::{Multiaddr, PeerId};

use crate::proto::ErrorCode;
use fincrypt_blockstore::Score;

/// Everything that can go wrong in the peer layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer answered and refused the request.
    #[error("peer {peer} refused: {code}")]
    Refused { peer: PeerId, code: ErrorCode },
    /// The peer returned a block that does not match the score asked for.
    #[error("peer {peer} returned data that does not match block {score}")]
    Corrupt { peer: PeerId, score: Score },
    /// No connection to the peer could be made or kept.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable { peer: PeerId, reason: String },
    /// The peer did not answer in time.
    #[error("peer {peer} did not answer in time")]
    Timeout { peer: PeerId },
    /// The peer answered with something this protocol does not allow.
    #[error("protocol error with peer {peer}: {reason}")]
    Protocol { peer: PeerId, reason: String },
    /// A request that this side refuses to send (for example a block over the size limit).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// Dialling an address failed.
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    /// A Kademlia bootstrap could not start or did not complete.
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// A DHT lookup could not start or did not complete.
    #[error("DHT lookup: {0}")]
    Lookup(String),
    /// Setting up the transports failed.
    #[error("cannot set up the network: {0}")]
    Transport(String),
    /// The node has shut down (or is shutting down).
    #[error("the network node has shut down")]
    Shutdown,
    /// The node key file cannot be read or written.
    #[error("node key {path}: {source}")]
    KeyIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The node key file does not follow its format.
    #[error("node key {path}: {reason}")]
    KeyFormat { path: PathBuf, reason: String },
    /// The placement ledger (who placed which held block) failed.
    #[error("placement ledger: {0}")]
    Ledger(String),
    /// The local block store failed.
    #[error(transparent)]
    Store(#[from] fincrypt_blockstore::Error),
}

impl Error {
    /// The peer this error concerns, if any.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            Error::Refused { peer, .. }
            | Error::Corrupt { peer, .. }
            | Error::Unreachable { peer, .. }
            | Error::Timeout { peer }
            | Error::Protocol { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// True when the peer answered that it does not hold the block.
    pub fn is_unknown_block(&self) -> bool {
        matches!(
            self,
            Error::Refused {
                code: ErrorCode::UnknownBlock,
                ..
            }
        )
    }
}

macro_rules! ledger_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Ledger(e.to_string())
            }
        }
    )*};
}
ledger_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
