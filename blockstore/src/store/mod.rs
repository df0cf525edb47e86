//! The one storage interface that the local volume, caches and the network tier share.

pub mod local;
pub mod mem;

use std::ops::Range;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Score};

/// Why a block is kept, which decides when it may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Class {
    /// Opportunistic copy: bounded by capacity, evicted by hit count and recency.
    Cached = 0,
    /// Kept for a peer until its contract ends; never evicted.
    Held = 1,
    /// The owner's own data: kept while a retained root references it; never evicted.
    Own = 2,
}

impl Class {
    pub(crate) fn from_u8(v: u8) -> Option<Class> {
        Some(match v {
            0 => Class::Cached,
            1 => Class::Held,
            2 => Class::Own,
            _ => return None,
        })
    }
}

/// A content-addressed block store.
///
/// `get` returns only bytes that match the score: a damaged or missing block
/// is an error, never wrong data. `put_batch` returns once the blocks are
/// durable. Storing a block again under a higher [`Class`] raises its class.
pub trait BlockStore: Send + Sync {
    /// Stores blocks whose scores the caller has computed; durable on return.
    fn put_batch(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error>;

    /// Reads and verifies one block.
    fn get(&self, score: &Score) -> Result<Bytes, Error>;

    /// Reads one block for a caller that authenticates it itself, by opening
    /// it with its key (AES-GCM-SIV tags fail on any change). A store may skip
    /// the score check, which costs as much as the decryption; a block that
    /// then fails to open is re-read with [`BlockStore::get`] to tell damage
    /// from a wrong key. Bytes from peers are always checked before they are kept.
    fn get_to_open(&self, score: &Score) -> Result<Bytes, Error> {
        self.get(score)
    }

    /// Reads bytes `range` of one block, checked against the score: a store
    /// that can verify part of a block (from its Merkle leaves) reads only
    /// that part.
    fn get_range(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        let block = self.get(score)?;
        check_range(score, &range, block.len())?;
        Ok(block.slice(range))
    }

    /// Reads bytes `range` of one block for a caller that authenticates them
    /// itself by opening them with the block's key, as
    /// [`BlockStore::get_to_open`] does for a whole block: a store may skip
    /// the leaf checks. A range that then fails to open is read again with
    /// [`BlockStore::get_range`].
    fn get_range_to_open(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        self.get_range(score, range)
    }

    /// True if the block is stored here (without reading it).
    fn has(&self, score: &Score) -> Result<bool, Error>;

    /// Removes a block; false if it was not there.
    fn delete(&self, score: &Score) -> Result<bool, Error>;

    /// Stores blocks without waiting for the disk: they are durable after the
    /// next [`BlockStore::sync`] (or durable put). Stores without such a
    /// distinction store them durably.
    fn put_batch_unsynced(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        self.put_batch(blocks, class)
    }

    /// Makes every block stored so far durable.
    fn sync(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Stores one block; see [`BlockStore::put_batch`].
    fn put(&self, score: Score, data: Bytes, class: Class) -> Result<(), Error> {
        self.put_batch(&[(score, data)], class)
    }
}

/// Lets `&S` and `Arc<S>` stand wherever a store is expected.
macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        impl<S: BlockStore + ?Sized> BlockStore for $ty {
            fn put_batch(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
                (**self).put_batch(blocks, class)
            }
            fn put_batch_unsynced(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
                (**self).put_batch_unsynced(blocks, class)
            }
            fn sync(&self) -> Result<(), Error> {
                (**self).sync()
            }
            fn get(&self, score: &Score) -> Result<Bytes, Error> {
                (**self).get(score)
            }
            fn get_to_open(&self, score: &Score) -> Result<Bytes, Error> {
                (**self).get_to_open(score)
            }
            fn get_range(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
                (**self).get_range(score, range)
            }
            fn get_range_to_open(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
                (**self).get_range_to_open(score, range)
            }
            fn has(&self, score: &Score) -> Result<bool, Error> {
                (**self).has(score)
            }
            fn delete(&self, score: &Score) -> Result<bool, Error> {
                (**self).delete(score)
            }
        }
    )*};
}
forward_store!(&S, std::sync::Arc<S>);

/// Checks fetched bytes against their score; used by every store's `get`.
pub fn check(score: &Score, data: &[u8]) -> Result<(), Error> {
    if Score::of(data) == *score {
        Ok(())
    } else {
        Err(Error::Corrupt {
            score: *score,
            reason: format!("{} bytes do not match the score", data.len()),
        })
    }
}

/// Refuses a range that does not lie within a block of `len` bytes.
pub fn check_range(score: &Score, range: &Range<usize>, len: usize) -> Result<(), Error> {
    if range.start <= range.end && range.end <= len {
        Ok(())
    } else {
        Err(Error::Format(format!(
            "range {range:?} is outside block {score} of {len} bytes"
        )))
    }
}
