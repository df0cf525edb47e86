//! The mount's block store: the local volume, then the peers that hold a block.
//!
//! A read that the local volume cannot answer (the block is missing, or its
//! bytes do not match its score) asks the block's confirmed holders from the
//! manifest, one after another. The network client checks every fetched block
//! against its score, so a lying or damaged holder yields an error, never a
//! wrong byte; a good copy is kept in the volume as a cached block.

use std::ops::Range;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, Class, Error, LocalStore, Score};
use fincrypt_net::Client;

use crate::manifest::Manifest;

/// How long one holder may take to send a block.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Where blocks come from when the volume lacks them.
pub struct Remote {
    pub handle: tokio::runtime::Handle,
    pub client: Client,
    pub manifest: Arc<Manifest>,
}

/// The local volume with peers behind it.
pub struct TieredStore {
    local: Arc<LocalStore>,
    remote: OnceLock<Remote>,
}

impl TieredStore {
    /// Local only until [`TieredStore::connect`] is called.
    pub fn new(local: Arc<LocalStore>) -> TieredStore {
        TieredStore {
            local,
            remote: OnceLock::new(),
        }
    }

    /// Lets reads fall back to peers.
    pub fn connect(&self, remote: Remote) {
        let _ = self.remote.set(remote);
    }

    /// After `local_error`, a verified copy of `score` from a holder, if one has it.
    fn fetch(&self, score: &Score, local_error: Error) -> Result<Bytes, Error> {
        let Some(remote) = self.remote.get() else {
            return Err(local_error);
        };
        // Never block a runtime thread on the runtime.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(local_error);
        }
        let holders = match remote.manifest.holders(score) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%score, error = %e, "cannot read the manifest");
                return Err(local_error);
            }
        };
        for peer in holders {
            let got = remote.handle.block_on(async {
                tokio::time::timeout(FETCH_TIMEOUT, remote.client.get(peer, *score)).await
            });
            match got {
                Ok(Ok(data)) => {
                    tracing::info!(%score, %peer, "read a block from a holder");
                    if matches!(local_error, Error::Corrupt { .. }) {
                        let _ = self.local.delete(score);
                    }
                    if let Err(e) = self.local.put(*score, data.clone(), Class::Cached) {
                        tracing::warn!(%score, error = %e, "cannot cache a fetched block");
                    }
                    return Ok(data);
                }
                Ok(Err(e)) => {
                    tracing::warn!(%score, %peer, error = %e, "a holder did not give a block")
                }
                Err(_) => tracing::warn!(%score, %peer, "a holder timed out sending a block"),
            }
        }
        Err(local_error)
    }

    /// A range read locally, or, if the block is missing or damaged here,
    /// the range of the whole block fetched (and checked) from a holder.
    fn range_or_fetch(
        &self,
        score: &Score,
        range: Range<usize>,
        local: Result<Bytes, Error>,
    ) -> Result<Bytes, Error> {
        match local {
            Err(e) if e.is_block_unavailable() => {
                let block = self.fetch(score, e)?;
                fincrypt_blockstore::store::check_range(score, &range, block.len())?;
                Ok(block.slice(range))
            }
            other => other,
        }
    }
}

impl BlockStore for TieredStore {
    fn put_batch(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        self.local.put_batch(blocks, class)
    }

    fn put_batch_unsynced(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        self.local.put_batch_unsynced(blocks, class)
    }

    fn sync(&self) -> Result<(), Error> {
        self.local.sync()
    }

    fn get(&self, score: &Score) -> Result<Bytes, Error> {
        match self.local.get(score) {
            Err(e) if e.is_block_unavailable() => self.fetch(score, e),
            other => other,
        }
    }

    fn get_to_open(&self, score: &Score) -> Result<Bytes, Error> {
        match self.local.get_to_open(score) {
            Err(e) if e.is_block_unavailable() => self.fetch(score, e),
            other => other,
        }
    }

    fn get_range(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        let local = self.local.get_range(score, range.clone());
        self.range_or_fetch(score, range, local)
    }

    fn get_range_to_open(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        let local = self.local.get_range_to_open(score, range.clone());
        self.range_or_fetch(score, range, local)
    }

    fn has(&self, score: &Score) -> Result<bool, Error> {
        self.local.has(score)
    }

    fn delete(&self, score: &Score) -> Result<bool, Error> {
        self.local.delete(score)
    }
}
