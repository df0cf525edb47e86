//! The owner's durability engine: it keeps every own block at the copies its
//! owner asked for, on peers that prove they still hold them.
//!
//! What each block wants comes from the owner's side through [`Wants`] (the
//! binary adapts the filesystem to it; this crate never sees the
//! filesystem). [`placement`] puts blocks short of copies on the closest
//! peers with room and releases what is no longer wanted; [`proofs`]
//! challenges holders and takes a badly proven block from its holder;
//! [`liveness`] drops holders that stay unreachable; the [`Manifest`] records
//! who holds what and each holder's history; the [`TieredStore`] reads a
//! block from its holders when the local copy is missing or damaged and
//! writes it back. Every background job runs on the [`worker`] runtime.

pub mod error;
pub mod liveness;
pub mod lookup;
pub mod manifest;
pub mod placement;
pub mod proofs;
pub mod tiered;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fincrypt_blockstore::{BlockStore, Score};
use fincrypt_net::Client;
use futures::future::BoxFuture;

pub use error::{Error, Result};
pub use manifest::{HolderRecord, Manifest, ManifestRecord};
pub use placement::{META_REDUNDANCY, ReplicationStats, Replicator, Wanted, distance};
pub use proofs::{ProofOutcome, ProofPolicy, ProofResult, Prover};
pub use tiered::{Remote, TieredStore};
pub use worker::{Step, Worker, WorkerHandle, WorkerState, WorkerStatus, Workers};

/// What the owner's blocks want, as the owner's side knows it.
pub trait Wants: Send + Sync + 'static {
    /// Every block the owner keeps, with the copies each asks for.
    fn wanted(&self) -> Result<Wanted>;
    /// Where each of `scores` is used, as paths a person recognises (for
    /// naming lost blocks); scores used nowhere are left out.
    fn paths_of(&self, scores: &[Score]) -> Result<Vec<(Score, String)>>;
    /// A value that changes whenever what [`Wants::wanted`] returns may have
    /// changed; `None` if the owner's side cannot tell (every pass walks).
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// How often a pass runs even when nothing seems to have changed: the
/// safety net under the generation counters.
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(24 * 3600);

/// What the last clean pass saw; equal again means a pass has nothing to do.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    wants: u64,
    losses: u64,
}

/// Intervals and limits of the engine's workers.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Between replication passes, when nothing wakes one sooner.
    pub replicate_interval: Duration,
    /// Between proof rounds; `None` runs no proofs.
    pub proof_interval: Option<Duration>,
    /// How proofs are run.
    pub proofs: ProofPolicy,
    /// How long a holder may stay unreachable before its blocks go elsewhere.
    pub holder_timeout: Duration,
    /// Between refreshes of the DHT's routing table.
    pub dht_interval: Duration,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The engine: placement, proofs and liveness over one manifest.
pub struct Engine {
    /// Placement and release.
    pub replicator: Replicator,
    /// Storage proofs.
    pub prover: Prover,
    wants: Arc<dyn Wants>,
    local: Arc<dyn BlockStore>,
    replication: Mutex<Option<WorkerHandle>>,
    /// Set after a pass that left nothing to do, with when it ran.
    clean: Mutex<Option<(Seen, std::time::Instant)>>,
}

impl Engine {
    /// An engine placing `local`'s blocks through `client`, as `wants` asks.
    pub fn new(
        client: Client,
        manifest: Arc<Manifest>,
        wants: Arc<dyn Wants>,
        local: Arc<dyn BlockStore>,
        proofs: ProofPolicy,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            replicator: Replicator::new(client, manifest),
            prover: Prover::new(proofs),
            wants,
            local,
            replication: Mutex::new(None),
            clean: Mutex::new(None),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.replicator.manifest
    }

    /// Figures for `status`.
    pub fn stats(&self) -> &ReplicationStats {
        &self.replicator.stats
    }

    /// One replication pass; returns the own blocks still short of copies.
    pub async fn pass(&self) -> Result<u64> {
        let seen = self.seen();
        let wants = self.wants.clone();
        let wanted = tokio::task::spawn_blocking(move || wants.wanted())
            .await
            .map_err(|e| Error::Wants(e.to_string()))??;
        let under = self.replicator.pass(wanted, self.local.clone()).await?;
        let s = self.stats();
        let pending: usize = self
            .manifest()
            .pending_releases()?
            .values()
            .map(Vec::len)
            .sum();
        s.releases_pending
            .store(pending as u64, std::sync::atomic::Ordering::Relaxed);
        // Releases left undelivered do not keep passes running: a holder that
        // is gone would keep them so forever. They are asked again by the
        // next pass that runs (after any change, and at least daily).
        let clean = under == 0 && s.lost.load(std::sync::atomic::Ordering::Relaxed) == 0;
        *self.clean.lock().unwrap_or_else(|p| p.into_inner()) = seen
            .filter(|_| clean)
            .map(|s| (s, std::time::Instant::now()));
        Ok(under)
    }

    /// What a pass would depend on now, if the owner's side can tell.
    fn seen(&self) -> Option<Seen> {
        self.wants.generation().map(|wants| Seen {
            wants,
            losses: self.manifest().losses(),
        })
    }

    /// A pass unless the last one left nothing to do and nothing changed
    /// since (no write to the filesystem, no holder lost blocks), within
    /// [`FULL_PASS_EVERY`]. Returns whether a pass ran.
    pub async fn pass_if_needed(&self) -> Result<bool> {
        let now = self.seen();
        let last = *self.clean.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(now), Some((seen, at))) = (now, last)
            && now == seen
            && at.elapsed() < FULL_PASS_EVERY
        {
            self.stats()
                .passes_skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(false);
        }
        self.pass().await?;
        Ok(true)
    }

    /// Has the replication worker run a pass soon.
    pub fn wake_replication(&self) {
        if let Some(h) = &*self.replication.lock().unwrap_or_else(|p| p.into_inner()) {
            h.wake();
        }
    }

    /// A handle that wakes the replication worker, once started.
    pub fn replication_handle(&self) -> Option<WorkerHandle> {
        self.replication
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The blocks the last pass found lost, with the paths that use them.
    pub fn lost(&self) -> Result<Vec<(Score, String)>> {
        let lost = self
            .stats()
            .lost_blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        let mut named = self.wants.paths_of(&lost)?;
        for s in &lost {
            if !named.iter().any(|(n, _)| n == s) {
                named.push((*s, "(no file uses it now)".to_owned()));
            }
        }
        Ok(named)
    }

    /// Starts the engine's workers: replication, proofs, liveness and DHT upkeep.
    pub fn start(self: &Arc<Engine>, workers: &Workers, config: EngineConfig) {
        let replication = workers.spawn(
            EngineWorker {
                name: "replication",
                engine: self.clone(),
                job: Job::Replicate,
            },
            config.replicate_interval,
        );
        *self.replication.lock().unwrap_or_else(|p| p.into_inner()) = Some(replication);
        if let Some(every) = config.proof_interval {
            workers.spawn(
                EngineWorker {
                    name: "proofs",
                    engine: self.clone(),
                    job: Job::Prove,
                },
                every,
            );
        }
        workers.spawn(
            EngineWorker {
                name: "liveness",
                engine: self.clone(),
                job: Job::Liveness(liveness::Liveness::new(config.holder_timeout)),
            },
            liveness::PROBE_EVERY,
        );
        workers.spawn(
            EngineWorker {
                name: "dht",
                engine: self.clone(),
                job: Job::Dht,
            },
            config.dht_interval,
        );
    }
}

enum Job {
    Replicate,
    Prove,
    Liveness(liveness::Liveness),
    Dht,
}

struct EngineWorker {
    name: &'static str,
    engine: Arc<Engine>,
    job: Job,
}

impl Worker for EngineWorker {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self) -> BoxFuture<'_, std::result::Result<Step, String>> {
        Box::pin(async move {
            let e = &self.engine;
            let done = match &mut self.job {
                Job::Replicate => {
                    let before = e
                        .stats()
                        .placed_copies
                        .load(std::sync::atomic::Ordering::Relaxed);
                    e.pass_if_needed().await.map_err(|e| format!("{e}"))?;
                    let after = e
                        .stats()
                        .placed_copies
                        .load(std::sync::atomic::Ordering::Relaxed);
                    after.saturating_sub(before)
                }
                Job::Prove => {
                    let report = e
                        .prover
                        .round(&e.replicator)
                        .await
                        .map_err(|e| format!("{e}"))?;
                    if report.blocks_dropped > 0 || report.holders_dropped > 0 {
                        e.wake_replication();
                    }
                    report.challenged
                }
                Job::Liveness(l) => {
                    let dropped = l.check(&e.replicator).await.map_err(|e| format!("{e}"))?;
                    if !dropped.is_empty() {
                        e.wake_replication();
                    }
                    dropped.len() as u64
                }
                Job::Dht => {
                    // No known peer yet is not a failure: the bootstrap dials may still be on their way.
                    match e.replicator.client.bootstrap().await {
                        Ok(()) | Err(fincrypt_net::Error::Bootstrap(_)) => 1,
                        Err(err) => return Err(format!("{err}")),
                    }
                }
            };
            Ok(Step::Idle { done })
        })
    }

    fn queue_len(&self) -> Option<u64> {
        match self.job {
            Job::Replicate => Some(
                self.engine
                    .stats()
                    .under_replicated
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            _ => None,
        }
    }
}
