//! The mount's block store: the local volume, then the peers that hold a block.
//!
//! A read that the local volume cannot answer (the block is missing, or its
//! bytes do not match its score) asks the block's confirmed holders from the
//! manifest, one after another, then the peers nearest its score (where
//! placement puts blocks: how a recovered machine reads blocks its manifest
//! does not list yet). The network client checks every fetched block
//! against its score, so a lying or damaged holder yields an error, never a
//! wrong byte; such a holder loses that block in the manifest (it is placed
//! again). A good copy is written back to the volume as the own block it is,
//! so the next read is local and scrub sees it.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, Class, Error, LocalStore, Score};
use fincrypt_net::{Client, PeerId};

use crate::manifest::Manifest;
use crate::worker::WorkerHandle;

/// How long one holder may take to send a block.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Peers nearest a block asked for it when no confirmed holder gave it.
const NEAREST_ASKED: usize = 8;

/// Where blocks come from when the volume lacks them.
pub struct Remote {
    pub handle: tokio::runtime::Handle,
    pub client: Client,
    pub manifest: Arc<Manifest>,
    /// Woken when a holder gave a bad copy, so the block is placed again soon.
    pub repair: Option<WorkerHandle>,
}

/// The local volume with peers behind it.
pub struct TieredStore {
    local: Arc<LocalStore>,
    remote: OnceLock<Remote>,
    fetched: AtomicU64,
    restore_failures: AtomicU64,
    /// Fetched blocks are written back without waiting for the disk.
    lazy: AtomicBool,
}

impl TieredStore {
    /// Local only until [`TieredStore::connect`] is called.
    pub fn new(local: Arc<LocalStore>) -> TieredStore {
        TieredStore {
            local,
            remote: OnceLock::new(),
            fetched: AtomicU64::new(0),
            restore_failures: AtomicU64::new(0),
            lazy: AtomicBool::new(false),
        }
    }

    /// Blocks read from holders because the local copy was missing or damaged.
    pub fn fetched_from_holders(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Fetched blocks that could not be written back locally.
    pub fn restore_failures(&self) -> u64 {
        self.restore_failures.load(Ordering::Relaxed)
    }

    /// The local volume under it.
    pub fn local(&self) -> &Arc<LocalStore> {
        &self.local
    }

    /// Fetches `score` from a holder and writes it back locally (scrub found
    /// its local copy missing or damaged). False if no holder gave a good copy.
    pub fn repair(&self, score: &Score) -> Result<bool, Error> {
        match self.fetch(score, Error::NotFound(*score)) {
            Ok(_) => Ok(true),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// From now on, blocks fetched from holders are written back without an
    /// fsync each, durable at the next [`BlockStore::sync`]: for a recovery,
    /// which fetches many and syncs once before it counts as done.
    pub fn write_back_lazily(&self) {
        self.lazy.store(true, Ordering::Relaxed);
        self.local.start_writeback_early();
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
        // Each block's holders are asked starting from one its score picks,
        // so many reads spread over them rather than all going to the first.
        let first = usize::from(score.0[0])
            .checked_rem(holders.len())
            .unwrap_or(0);
        for peer in holders.iter().cycle().skip(first).take(holders.len()) {
            if let Some(data) = self.fetch_from(remote, score, *peer, true) {
                return Ok(data);
            }
        }
        // Not from the holders the manifest names (a block placed after the
        // manifest a recovered machine started from, or a stale entry): the
        // peers nearest its score, where placement puts every block.
        let nearest = remote.handle.block_on(async {
            tokio::time::timeout(FETCH_TIMEOUT, remote.client.closest_peers(*score)).await
        });
        match nearest {
            Ok(Ok(peers)) => {
                let others = peers.into_iter().filter(|p| !holders.contains(p));
                for peer in others.take(NEAREST_ASKED) {
                    if let Some(data) = self.fetch_from(remote, score, peer, false) {
                        return Ok(data);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(%score, error = %e, "no lookup of the peers nearest a block")
            }
            Err(_) => tracing::debug!(%score, "the lookup of the peers nearest a block timed out"),
        }
        Err(local_error)
    }

    /// A verified copy of `score` from `peer`, written back locally; `None`
    /// if it has none. A wrong copy from a confirmed holder (`holder`) takes
    /// that block from it in the manifest.
    fn fetch_from(
        &self,
        remote: &Remote,
        score: &Score,
        peer: PeerId,
        holder: bool,
    ) -> Option<Bytes> {
        let got = remote.handle.block_on(async {
            tokio::time::timeout(FETCH_TIMEOUT, remote.client.get(peer, *score)).await
        });
        match got {
            Ok(Ok(data)) => {
                tracing::info!(%score, %peer, "read a block from a holder");
                self.fetched.fetch_add(1, Ordering::Relaxed);
                let written = if self.lazy.load(Ordering::Relaxed) {
                    // `Client::get` checked it against its score.
                    self.local
                        .restore_checked_lazily(score, data.clone(), Class::Own)
                } else {
                    self.local.restore(score, &data, Class::Own)
                };
                if let Err(e) = written {
                    self.restore_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%score, error = %e, "cannot write a fetched block back to the volume");
                }
                Some(data)
            }
            Ok(Err(e)) => {
                if holder && matches!(e, fincrypt_net::Error::Corrupt { .. }) {
                    match remote.manifest.drop_blocks(&peer, &[*score]) {
                        Ok(_) => {
                            if let Some(r) = &remote.repair {
                                r.wake();
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%score, error = %e, "cannot update the manifest")
                        }
                    }
                }
                if holder || !e.is_unknown_block() {
                    tracing::warn!(%score, %peer, error = %e, "a holder did not give a block");
                }
                None
            }
            Err(_) => {
                tracing::warn!(%score, %peer, "a holder timed out sending a block");
                None
            }
        }
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
