//! A client's side of its mediator: placement asks the mediator which of
//! the peers closest to a block to use (the mediator makes and pays the
//! contracts), and every block the client puts on, or releases from, a
//! holder is reported to the mediator, so that it pays for, and audits,
//! exactly what the holders keep.
//!
//! Reports are durable before the manifest names a holder
//! ([`Market::persist`]): they wait in `DATA/mediated.redb` until the
//! mediator has taken them, so a crash or an unreachable mediator loses
//! none. The `mediator` worker sends them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fincrypt_blockstore::Score;
use fincrypt_engine::{Engine, Market, Step, Worker, Workers};
use fincrypt_net::{Client, Multiaddr, PeerId};
use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::{info, warn};

use crate::MarketError;
use crate::contract::consent;
use crate::mediator::{Ask, MAX_REPORT, Placement, Reply, decode_reply, encode_ask};
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
        }))
    }

    /// Has placement ask the mediator, and runs the `mediator` worker.
    pub fn start(self: &Arc<Self>, engine: &Arc<Engine>, workers: &Workers) {
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
            Ok(if more {
                Step::Busy { done }
            } else {
                Step::Idle { done }
            })
        })
    }
}
