//! The storage market: what a storage node offers, the contracts an owner
//! makes with holders, the ledger of what each holder proved in each period,
//! and the Bitcoin payments that settle it, exactly once.
//!
//! - [`offer`]: a node's signed offer (price, room, minimum duration, payout address).
//! - [`contract`]: terms both sides sign; periods and what each costs.
//! - [`notice`]: an owner's notice to a holder of what a transaction paid it.
//! - [`holder`]: a storage node's side: its offer, the contracts it takes,
//!   and who may place on it.
//! - [`owner`]: the owner's side: which offers placement uses, contracts,
//!   challenges each period, and the worker that settles.
//! - [`ledger`]: the owner's record of challenges per contract and period,
//!   and settlement: one transaction per period for every holder due.
//! - [`wallet`]: [`wallet::Payments`], and [`wallet::BitcoinRpc`], which pays
//!   through a Bitcoin node's own wallet over JSON-RPC.
//! - [`mediator`]: a node that keeps its clients' escrow (deposit addresses
//!   and balances, so far).

pub mod contract;
pub mod holder;
pub mod ledger;
pub mod mediated;
pub mod mediator;
pub mod notice;
pub mod offer;
pub mod owner;
pub mod signed;
pub mod wallet;

pub use signed::Signature;

/// Why a market operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    /// A message from a peer, or terms, that cannot be accepted.
    #[error("{0}")]
    Invalid(String),
    /// The ledger's storage.
    #[error("the market ledger: {0}")]
    Store(String),
    /// The wallet.
    #[error(transparent)]
    Wallet(#[from] wallet::WalletError),
}

macro_rules! store_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for MarketError {
            fn from(e: $t) -> Self {
                MarketError::Store(e.to_string())
            }
        }
    )*};
}
store_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
