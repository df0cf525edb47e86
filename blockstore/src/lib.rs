//! Venti for Fincrypt: an encrypted, content-addressed block store.
//!
//! Data is cut into content-defined chunks ([`tree`]), each sealed into a
//! block by keyed convergent encryption ([`block`]) and named by its [`Score`],
//! a Merkle root over the ciphertext that also serves storage proofs.
//! Blocks live in a [`BlockStore`]; [`LocalStore`] keeps them on disk.
//! Formats are specified in `docs/FORMATS.md`.

pub mod block;
pub mod buf;
mod error;
pub mod keys;
pub mod score;
pub mod store;
pub mod tree;

pub use block::{BlockKind, Pointer, Sealed};
pub use error::Error;
pub use keys::{KeyFile, Keys, MasterSecret};
pub use score::{Proof, Score};
pub use store::local::{LocalStore, ScrubReport, Staged, StoreOptions, StoreStats, TagReader};
pub use store::mem::MemStore;
pub use store::{BlockStore, Class};
pub use tree::{FileRef, HOLE_MIN, Resume, Run, TreeParams, TreeReader, TreeWriter};

/// Result with the block store's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
