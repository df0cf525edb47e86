//! A client's side of its mediator: placement asks the mediator which of
//! the peers closest to a block to use (the mediator makes and pays the
//! contracts), and every block the client puts on, or releases from, a
//! holder is reported to the mediator, so that it pays for, and audits,
//! exactly what the holders keep.
//!
//! Reports are durable before the manifest names a holder
//! ([`Market::persist`]): they wait in `DATA/mediated.redb` until the
//! mediator has taken them, so a crash or an unreachable mediator loses
//! none. The `mediator` worker sends them, and once a minute asks for the
//! blocks the mediator moved off holders that failed its audits while the
//! client was away: each goes into the manifest (the old holder out, to be
//! asked to release it; the new one in) before the mediator is told to
//! forget it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fincrypt_blockstore::Score;
use fincrypt_engine::{Engine, Manifest, Market, Step, Worker, Workers};
use fincrypt_net::{Client, Multiaddr, PeerId};
use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{info, warn};

use crate::MarketError;
use crate::contract::consent;
use crate::mediator::{Ask, Escrow, MAX_REPORT, Placement, Reply, decode_reply, encode_ask};

/// How often the client asks for the blocks its mediator moved.
const MOVES_EVERY: Duration = Duration::from_secs(60);
use crate::signed::Signature;

/// Placements not yet taken by the mediator: score and holder PeerId
/// bytes -> the block's length, or [`RELEASED`].
const REPORTS: TableDefinition<&[u8], u64> = TableDefinition::new("reports");
/// `version`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VERSION: u64 = 1;
/// A report of a release, in place of a length.
const RELEASED: u64 = u64::MAX;
/// How long a question to the mediator may take.
pub const MEDIATOR_WAIT: Duration = Duration::from_secs(30);
/// How long the mediator's choice among the same candidates is used again
/// (it changes only as contracts are made or end).
const CHOICE_FRESH: Duration = Duration::from_secs(60);
/// How often the `mediator` worker sends what waits.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Holders to use, as placement takes them (see [`Market::choose`]).
type Chosen = Vec<(PeerId, Option<u64>)>;

/// The client's market when a mediator pays for it.
pub struct MediatedMarket {
    client: Client,
    mediator: PeerId,
    addr: Multiaddr,
    consent: Signature,
    db: Database,
    pending: Mutex<Vec<(PeerId, Score, u64)>>,
    /// The mediator's last choices, by candidates.
    choices: Mutex<HashMap<Vec<u8>, (Instant, Chosen)>>,
    /// Why the last ask failed (empty when it did not).
    note: Mutex<String>,
    /// Placements and releases the mediator took, since start.
    reported: AtomicU64,
    /// The owner's manifest, once started.
    manifest: std::sync::OnceLock<Arc<Manifest>>,
    /// When moves were last asked for.
    moves_asked: Mutex<Option<Instant>>,
    /// Moves taken into the manifest, since start.
    moves_taken: AtomicU64,
    /// The escrow as last asked (with the moves), and whether its being low
    /// was logged.
    escrow: Mutex<(Option<Escrow>, bool)>,
}

fn key(peer: &PeerId, score: &Score) -> Vec<u8> {
    let mut k = score.0.to_vec();
    k.extend_from_slice(&peer.to_bytes());
    k
}

impl MediatedMarket {
    /// The market of the client node `keypair`, whose mediator is at `addr`
    /// (ending in `/p2p/<PeerId>`), keeping its reports at `path`.
    pub fn open(
        path: &Path,
        keypair: &Keypair,
        client: Client,
        mediator: PeerId,
        addr: Multiaddr,
    ) -> Result<Arc<MediatedMarket>, MarketError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            crate::ledger::check_version(&mut txn.open_table(META)?, VERSION, "mediator reports")?;
            txn.open_table(REPORTS)?;
        }
        txn.commit()?;
        Ok(Arc::new(MediatedMarket {
            consent: consent(keypair, &mediator)?,
            client,
            mediator,
            addr,
            db,
            pending: Mutex::new(Vec::new()),
            choices: Mutex::new(HashMap::new()),
            note: Mutex::new(String::new()),
            reported: AtomicU64::new(0),
            manifest: std::sync::OnceLock::new(),
            moves_asked: Mutex::new(None),
            moves_taken: AtomicU64::new(0),
            escrow: Mutex::new((None, false)),
        }))
    }

    /// Has placement ask the mediator, and runs the `mediator` worker.
    pub fn start(self: &Arc<Self>, engine: &Arc<Engine>, workers: &Workers) {
        let _ = self.manifest.set(engine.manifest().clone());
        engine.replicator.set_market(self.clone());
        workers.spawn(Reporter(self.clone()), REPORT_EVERY);
    }

    /// Asks the mediator.
    pub async fn ask(&self, ask: Ask) -> Result<Reply, MarketError> {
        let message = encode_ask(ask)?;
        // Its address again each time: one the DHT dropped after the
        // mediator was away would leave it unreachable for good.
        if let Err(e) = self
            .client
            .add_address(self.mediator, self.addr.clone())
            .await
        {
            tracing::debug!(error = %e, "cannot add the mediator's address");
        }
        let asked = self.client.mediate(self.mediator, message.into());
        let bytes = tokio::time::timeout(MEDIATOR_WAIT, asked)
            .await
            .map_err(|_| {
                MarketError::Invalid(format!(
                    "the mediator at {} did not answer in {MEDIATOR_WAIT:?}",
                    self.addr
                ))
            })?
            .map_err(|e| {
                MarketError::Invalid(format!("asking the mediator at {}: {e}", self.addr))
            })?;
        decode_reply(&bytes)
    }

    /// The mediator's address.
    pub fn address(&self) -> &Multiaddr {
        &self.addr
    }

    /// Why the last ask of placement failed; empty when it did not.
    pub fn note(&self) -> String {
        self.note.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_note(&self, note: String) {
        *self.note.lock().unwrap_or_else(|p| p.into_inner()) = note;
    }

    /// Reports waiting for the mediator.
    pub fn waiting(&self) -> Result<u64, MarketError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(REPORTS)?.len()?)
    }

    /// Placements and releases the mediator took since start.
    pub fn reported(&self) -> u64 {
        self.reported.load(Ordering::Relaxed)
    }

    /// Moves of blocks by the mediator taken into the manifest since start.
    pub fn moves_taken(&self) -> u64 {
        self.moves_taken.load(Ordering::Relaxed)
    }

    /// The escrow as last asked (once a minute while mounted).
    pub fn escrow(&self) -> Option<Escrow> {
        self.escrow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Asks the escrow, and warns once when it runs low.
    async fn check_escrow(&self) -> Result<(), MarketError> {
        let escrow = match self.ask(Ask::Balance).await? {
            Reply::Balance(e) => e,
            other => {
                return Err(MarketError::Invalid(format!(
                    "the mediator answered a balance with {other:?}"
                )));
            }
        };
        let mut kept = self.escrow.lock().unwrap_or_else(|p| p.into_inner());
        if escrow.low && !kept.1 {
            warn!(
                escrow_sats = escrow.escrow_sats,
                cost_per_period = escrow.cost_per_period,
                funded_periods = escrow.funded_periods,
                grace_periods = escrow.grace_periods,
                address = %escrow.address,
                "the escrow at the mediator is low: deposit more, or holders go unpaid and, \
                 after their patience, release this client's blocks"
            );
        }
        kept.1 = escrow.low;
        kept.0 = Some(escrow);
        Ok(())
    }

    /// Takes the blocks the mediator moved into the manifest, and tells it
    /// so; how many. Asked once every [`MOVES_EVERY`], with the escrow.
    pub async fn take_moves(&self) -> Result<u64, MarketError> {
        let Some(manifest) = self.manifest.get() else {
            return Ok(0);
        };
        {
            let mut asked = self.moves_asked.lock().unwrap_or_else(|p| p.into_inner());
            if asked.is_some_and(|at| at.elapsed() < MOVES_EVERY) {
                return Ok(0);
            }
            *asked = Some(Instant::now());
        }
        if let Err(e) = self.check_escrow().await {
            warn!(error = %e, "cannot read the escrow at the mediator");
        }
        let items = match self.ask(Ask::Moves).await? {
            Reply::Moves { items } => items,
            other => {
                return Err(MarketError::Invalid(format!(
                    "the mediator answered a question for moves with {other:?}"
                )));
            }
        };
        if items.is_empty() {
            return Ok(0);
        }
        let store = |e: fincrypt_engine::Error| MarketError::Store(e.to_string());
        let mut scores = Vec::with_capacity(items.len());
        let mut applied = 0u64;
        for m in &items {
            let (Ok(from), Ok(to)) = (PeerId::from_bytes(&m.from), PeerId::from_bytes(&m.to))
            else {
                return Err(MarketError::Invalid(
                    "the mediator named a holder that is not a PeerId".into(),
                ));
            };
            let score = Score(m.score);
            scores.push(m.score);
            // Taken on the new holder's word, not the mediator's: a move to
            // a holder that does not have the block changes nothing.
            let has = tokio::time::timeout(MEDIATOR_WAIT, self.client.has(to, &[score])).await;
            if !matches!(has, Ok(Ok(ref h)) if h.first() == Some(&true)) {
                warn!(block = %score, %to, "the mediator moved a block to a holder that does not have it; ignored");
                continue;
            }
            // The old holder is asked to release it; the new one holds it.
            manifest.drop_blocks(&from, &[score]).map_err(store)?;
            let mut holders = manifest.holders(&score).map_err(store)?;
            if !holders.contains(&to) {
                holders.push(to);
            }
            manifest.set_many(&[(score, holders)]).map_err(store)?;
            info!(block = %score, %from, %to, "the mediator moved a block while this client was away");
            applied += 1;
        }
        self.ask(Ask::MovesTaken { scores }).await?;
        self.moves_taken.fetch_add(applied, Ordering::Relaxed);
        // More may wait: ask again at the next step.
        *self.moves_asked.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(applied)
    }

    async fn choose_inner(
        &self,
        len: u64,
        need: usize,
        candidates: Vec<(PeerId, u64)>,
    ) -> Vec<(PeerId, Option<u64>)> {
        let mut cache_key = vec![u8::try_from(need).unwrap_or(u8::MAX)];
        for (p, _) in &candidates {
            cache_key.extend_from_slice(&p.to_bytes());
        }
        if let Some((at, chosen)) = self
            .choices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
            && at.elapsed() < CHOICE_FRESH
        {
            return chosen.clone();
        }
        let ask = Ask::Choose {
            len,
            need: u32::try_from(need).unwrap_or(u32::MAX),
            candidates: candidates
                .iter()
                .take(crate::mediator::MAX_CANDIDATES)
                .map(|(p, room)| (p.to_bytes(), *room))
                .collect(),
            consent: self.consent.clone(),
        };
        let chosen = match self.ask(ask).await {
            Ok(Reply::Chosen { peers }) => peers
                .into_iter()
                .filter_map(|(p, room)| Some((PeerId::from_bytes(&p).ok()?, room)))
                .collect::<Vec<_>>(),
            Ok(other) => {
                self.set_note(format!("the mediator answered something else: {other:?}"));
                return Vec::new();
            }
            Err(e) => {
                warn!(error = %e, "the mediator chose no holders");
                self.set_note(e.to_string());
                return Vec::new();
            }
        };
        self.set_note(String::new());
        // Only the mediator's names: a holder it did not choose is not
        // offered to this client by it.
        if chosen.iter().all(|(_, room)| room.is_none()) {
            self.choices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(cache_key, (Instant::now(), chosen.clone()));
        }
        chosen
    }

    fn write(&self, items: &[(PeerId, Score, u64)]) -> Result<(), MarketError> {
        if items.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(REPORTS)?;
            for (peer, score, len) in items {
                t.insert(key(peer, score).as_slice(), len)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Sends the mediator what waits, at most [`MAX_REPORT`] at a time,
    /// and forgets what it took; how many, and whether more wait.
    pub async fn report(&self) -> Result<(u64, bool), MarketError> {
        let (rows, more) = {
            let txn = self.db.begin_read()?;
            let t = txn.open_table(REPORTS)?;
            let mut rows = Vec::new();
            let mut more = false;
            for row in t.iter()? {
                let (k, v) = row?;
                if rows.len() == MAX_REPORT {
                    more = true;
                    break;
                }
                rows.push((k.value().to_vec(), v.value()));
            }
            (rows, more)
        };
        if rows.is_empty() {
            return Ok((0, false));
        }
        let mut items = Vec::with_capacity(rows.len());
        for (k, len) in &rows {
            if k.len() <= 32 {
                return Err(MarketError::Store("a damaged report row".into()));
            }
            let mut score = [0u8; 32];
            score.copy_from_slice(&k[..32]);
            items.push(Placement {
                holder: k[32..].to_vec(),
                score,
                len: if *len == RELEASED { 0 } else { *len },
                kept: *len != RELEASED,
            });
        }
        match self.ask(Ask::Report { items }).await? {
            Reply::Noted => {}
            other => {
                return Err(MarketError::Invalid(format!(
                    "the mediator answered a report with {other:?}"
                )));
            }
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(REPORTS)?;
            for (k, len) in &rows {
                // A row written again since it was read is sent next time.
                let same = t.get(k.as_slice())?.map(|v| v.value()) == Some(*len);
                if same {
                    t.remove(k.as_slice())?;
                }
            }
        }
        txn.commit()?;
        let n = rows.len() as u64;
        self.reported.fetch_add(n, Ordering::Relaxed);
        info!(reports = n, "the mediator took placement reports");
        Ok((n, more))
    }
}

impl Market for MediatedMarket {
    fn choose<'a>(
        &'a self,
        len: u64,
        need: usize,
        candidates: Vec<(PeerId, u64)>,
    ) -> BoxFuture<'a, Vec<(PeerId, Option<u64>)>> {
        Box::pin(self.choose_inner(len, need, candidates))
    }

    fn placed(&self, peer: &PeerId, score: &Score, len: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((*peer, *score, len.min(RELEASED - 1)));
    }

    fn persist(&self) -> Result<(), String> {
        let items = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        self.write(&items)
            .map_err(|e| format!("recording placements for the mediator: {e}"))
    }

    fn released(&self, peer: &PeerId, scores: &[Score]) {
        let items: Vec<_> = scores.iter().map(|s| (*peer, *s, RELEASED)).collect();
        if let Err(e) = self.write(&items) {
            // The mediator then goes on auditing those blocks, finds them
            // gone, and stops paying the holder for them.
            warn!(error = %e, "cannot record releases for the mediator");
        }
    }
}

/// The `mediator` worker: sends placement reports.
struct Reporter(Arc<MediatedMarket>);

impl Worker for Reporter {
    fn name(&self) -> &'static str {
        "mediator"
    }

    fn step(&mut self) -> BoxFuture<'_, Result<Step, String>> {
        Box::pin(async move {
            let (done, more) = self.0.report().await.map_err(|e| e.to_string())?;
            let moved = self.0.take_moves().await.map_err(|e| e.to_string())?;
            let (done, more) = (done + moved, more || moved > 0);
            Ok(if more {
                Step::Busy { done }
            } else {
                Step::Idle { done }
            })
        })
    }
}
