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
pub mod roots;
pub mod tiered;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fincrypt_blockstore::{BlockStore, Score};
use fincrypt_net::Client;
use futures::future::BoxFuture;

pub use error::{Error, Result};
pub use manifest::{HolderRecord, Manifest, ManifestRecord};
pub use placement::{META_REDUNDANCY, Market, ReplicationStats, Replicator, Wanted, distance};
pub use proofs::{ProofOutcome, ProofPolicy, ProofResult, Prover};
pub use roots::{Found, Published, Publisher};
pub use tiered::{Remote, TieredStore};
pub use worker::{Step, Worker, WorkerHandle, WorkerState, WorkerStatus, Workers};

/// What the owner's blocks want, as the owner's side knows it.
///
/// The engine walks everything ([`Wants::wanted`]) only as a safety net,
/// once a day or when only a walk can tell; between walks it asks for what
/// changed ([`Wants::changes`]) and queues that work.
pub trait Wants: Send + Sync + 'static {
    /// Every block the owner keeps, with the copies each asks for, and the
    /// cursor [`Wants::changes`] continues from.
    fn wanted(&self) -> Result<(Wanted, Vec<u8>)>;
    /// What changed since `cursor` (from [`Wants::wanted`] or an earlier
    /// `changes`): blocks wanted anew or at more copies. `None` when only a
    /// full walk can tell (a redundancy lowered, a cursor it cannot read).
    /// `known` says whether the engine already tracks a block, so a tree it
    /// tracks need not be walked again.
    fn changes(&self, cursor: &[u8], known: &dyn Fn(&Score) -> bool) -> Result<Option<Changes>> {
        let _ = (cursor, known);
        Ok(None)
    }
    /// The engine has kept what the last [`Wants::wanted`] or
    /// [`Wants::changes`] returned: those changes may be forgotten.
    fn taken(&self) -> Result<()> {
        Ok(())
    }
    /// Where each of `scores` is used, as paths a person recognises (for
    /// naming lost blocks); scores used nowhere are left out.
    fn paths_of(&self, scores: &[Score]) -> Result<Vec<(Score, String)>>;
}

/// What changed on the owner's side since a cursor.
#[derive(Debug, Default)]
pub struct Changes {
    /// Blocks wanted anew or at more copies, with the copies each asks for.
    pub blocks: Vec<(Score, u8)>,
    /// Blocks visited to find them.
    pub walked: u64,
    /// Where the next [`Wants::changes`] starts.
    pub cursor: Vec<u8>,
    /// More changes wait beyond these.
    pub more: bool,
}

/// How often a full walk runs even when no change asks for one: the safety
/// net under the queue.
pub const FULL_PASS_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Where the owner's side left off, kept in the manifest.
const CURSOR: &str = "wants_cursor";
/// Unix time of the last full walk, kept in the manifest.
const WALKED_AT: &str = "walked_at";

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
    /// One step or pass at a time: each hands out and takes the owner's changes.
    stepping: tokio::sync::Mutex<()>,
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
            stepping: tokio::sync::Mutex::new(()),
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

    /// A full pass: walks everything the owner keeps, places what is short
    /// and releases what is no longer wanted. Returns the blocks still short.
    pub async fn pass(&self) -> Result<u64> {
        let _one = self.stepping.lock().await;
        self.full_pass().await
    }

    async fn full_pass(&self) -> Result<u64> {
        let wants = self.wants.clone();
        let losses = self.manifest().losses();
        // Releases stay queued: a holder that did not answer is asked again.
        let mut before = self.manifest().queued_after(None, usize::MAX)?;
        before.retain(|(_, n)| *n > 0);
        let (wanted, cursor) = tokio::task::spawn_blocking(move || wants.wanted())
            .await
            .map_err(|e| Error::Wants(e.to_string()))??;
        let short = self.replicator.pass(wanted, self.local.clone()).await?;
        let m = self.manifest();
        // The walk did all the queue asked, unless a holder lost blocks
        // meanwhile: then their queued work stays.
        if m.losses() == losses {
            m.dequeue(&before)?;
        }
        let now = unix_now().to_le_bytes();
        m.enqueue_with_state(&short, &[(CURSOR, &cursor), (WALKED_AT, &now)])?;
        self.wants.taken()?;
        self.note_pending()?;
        Ok(short.len() as u64)
    }

    fn note_pending(&self) -> Result<()> {
        let pending: usize = self
            .manifest()
            .pending_releases()?
            .values()
            .map(Vec::len)
            .sum();
        self.stats()
            .releases_pending
            .store(pending as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether a full walk is due: none yet, or the last one is a day old.
    fn walk_due(&self) -> Result<Option<Vec<u8>>> {
        let m = self.manifest();
        let walked = m
            .state(WALKED_AT)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes);
        let due = walked.is_none_or(|t| unix_now().saturating_sub(t) >= FULL_PASS_EVERY.as_secs());
        Ok(if due { None } else { m.state(CURSOR)? })
    }

    /// One step of replication: takes the owner's changes into the queue and
    /// works through it, or walks everything when only that can tell (see
    /// [`Wants`]). Nothing is read beyond the change feed and the queue when
    /// both are empty. Returns whether more changes wait.
    pub async fn step(&self) -> Result<bool> {
        let _one = self.stepping.lock().await;
        let Some(cursor) = self.walk_due()? else {
            self.full_pass().await?;
            return Ok(false);
        };
        let wants = self.wants.clone();
        let manifest = self.manifest().clone();
        let changes = tokio::task::spawn_blocking(move || {
            let known = |s: &Score| manifest.knows(s).unwrap_or(false);
            wants.changes(&cursor, &known)
        })
        .await
        .map_err(|e| Error::Wants(e.to_string()))??;
        let Some(changes) = changes else {
            self.full_pass().await?;
            return Ok(false);
        };
        let s = self.stats();
        s.blocks_walked
            .fetch_add(changes.walked, std::sync::atomic::Ordering::Relaxed);
        let m = self.manifest();
        m.enqueue_with_state(&changes.blocks, &[(CURSOR, &changes.cursor)])?;
        self.wants.taken()?;
        // Releases a dropped holder never took do not keep passes running
        // (a holder that is gone would keep them so forever): they are asked
        // again by the next pass that has work, and by the daily walk.
        if changes.blocks.is_empty() && m.queued_after(None, 1)?.is_empty() {
            s.passes_skipped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(changes.more);
        }
        self.replicator.work(self.local.clone()).await?;
        self.note_pending()?;
        Ok(changes.more)
    }

    /// Challenges each holder of `asks` on its block now, and acts on the
    /// answers as a proof round does (outcomes also go to
    /// [`Prover::subscribe`]rs). Returns each outcome.
    pub async fn challenge(
        &self,
        asks: Vec<(Score, fincrypt_net::PeerId)>,
    ) -> Result<Vec<ProofOutcome>> {
        let (report, outcomes) = self.prover.challenge(&self.replicator, asks).await?;
        if report.blocks_dropped > 0 || report.holders_dropped > 0 {
            self.wake_replication();
        }
        Ok(outcomes)
    }

    /// Takes `peer` off every block it holds, so they are placed elsewhere
    /// (and released there when it is back); returns how many blocks.
    pub fn drop_holder(&self, peer: &fincrypt_net::PeerId) -> Result<u64> {
        let blocks = self.manifest().drop_peer(peer)?;
        self.stats()
            .holders_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.wake_replication();
        Ok(blocks)
    }

    /// Queues the release of blocks GC freed locally (those with holders).
    pub fn released(&self, scores: &[Score]) -> Result<()> {
        let m = self.manifest();
        let held: Vec<(Score, u8)> = m
            .holders_of(scores.iter().copied())?
            .into_iter()
            .zip(scores)
            .filter(|(h, _)| !h.is_empty())
            .map(|(_, s)| (*s, 0))
            .collect();
        m.enqueue(&held)?;
        if !held.is_empty() {
            self.wake_replication();
        }
        Ok(())
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
                    let more = e.step().await.map_err(|e| format!("{e}"))?;
                    let after = e
                        .stats()
                        .placed_copies
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let done = after.saturating_sub(before);
                    if more {
                        return Ok(Step::Busy { done });
                    }
                    done
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
