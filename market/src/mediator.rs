//! A mediator: a node that holds its clients' prepaid Bitcoin in escrow,
//! places their blocks at the lowest prices its rules allow, audits the
//! holders on their behalf and pays them every period out of the escrow,
//! so that a client that is offline keeps its holders paid and honest.
//!
//! - **Escrow.** Each client (a node, by PeerId) gets one deposit address
//!   of the mediator's wallet, made on its first ask and kept
//!   (`DATA/mediator.redb`). Its escrow is what that address received with
//!   `min_conf` confirmations, less what was paid for it and the fee on
//!   that. Nothing of it is kept as a running balance: it is read off the
//!   wallet and the ledger each time, so a crash cannot make it disagree
//!   with the payments.
//! - **Placement.** A client asks [`Ask::Choose`] with the candidates its
//!   closest-peers lookup found for a block, and its signed consent that
//!   this mediator pays for it. The mediator runs one [`OwnerMarket`] per
//!   client over one [`Ledger`] (`DATA/mediator-ledger.redb`): it reads
//!   offers, leaves out the holders its rules refuse, makes contracts in the
//!   client's name (the client is the owner, the mediator the payer) and
//!   answers with the holders to use. The client puts the blocks itself
//!   (the mediator never sees data) and reports each placement and release
//!   ([`Ask::Report`]).
//! - **Audits and payment.** [`Mediator::tick`], several times a period,
//!   challenges every holder on a block of each client it keeps under
//!   contract (a proof is checked against the score: no key is needed),
//!   keeps an audit score per holder ([`AuditScore`]), and settles the
//!   periods due of every client in one transaction, paying a client's
//!   periods only while its escrow covers them and the fee.
//!
//! The mediator keeps coins for its clients: it is custodial, and
//! docs/ARCHITECTURE.md ("Mediator") says what a client risks.
//!
//! Client and mediator speak through the peer protocol's `Mediate` request:
//! a postcard [`Envelope`] of an [`Ask`], answered by one of a [`Reply`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fincrypt_blockstore::Score;
use fincrypt_engine::{Market, ProofOutcome, ProofResult};
use fincrypt_net::Client;
use futures::future::BoxFuture;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::MarketError;
use crate::contract::{ContractId, check_consent};
use crate::ledger::{
    BatchState, Ledger, PeriodState, SettleRules, Settlement, funded_periods, hex,
};
use crate::owner::{Custody, Gate, OwnerMarket, OwnerSettings, PaymentView, Teller};
use crate::signed::Signature;
use crate::wallet::Payments;

/// Version of the messages between a client and its mediator.
pub const MEDIATE_VERSION: u8 = 1;
/// Clients by PeerId bytes: postcard [`ClientRow`].
const CLIENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clients");
/// Holders by PeerId bytes: postcard [`AuditScore`].
const AUDITS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("audits");
/// Blocks the mediator moved while their client was away, until the client
/// took note: client PeerId bytes ‖ score -> postcard [`Moved`].
const MOVES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("moves");
/// Holders that answered none of the mediator's latest audits: PeerId bytes
/// -> postcard [`Silence`] (taken out at the next answer).
const SILENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("silent");
/// `version`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEDGER_VERSION: u64 = 2;
/// The most clients a mediator keeps (each costs an address and a row).
pub const MAX_CLIENTS: usize = 100_000;
/// The most candidates one [`Ask::Choose`] may name.
pub const MAX_CANDIDATES: usize = 256;
/// The most placements one [`Ask::Report`] may carry, and moves one
/// [`Reply::Moves`] or [`Ask::MovesTaken`] may.
pub const MAX_REPORT: usize = 1024;
/// The most payments an escrow lists (the latest): about 80 KiB.
pub const MAX_PAYMENTS_SHOWN: usize = 500;
/// Blocks moved off holders at most per round.
const MOVES_PER_ROUND: usize = 256;
/// The longest the mediator waits for a block from, or to, a holder.
const COPY_WAIT: Duration = Duration::from_secs(60);
/// How long a client's escrow, read for its placements, is used before it
/// is read again.
const ESCROW_FRESH: Duration = Duration::from_secs(30);
/// How long a client's escrow, read for its balance, is shown again: a
/// client asking in a loop costs the wallet one look every few seconds.
const BALANCE_FRESH: Duration = Duration::from_secs(3);
/// New clients taken per minute, at most: each costs an address of the
/// wallet and a row, so a flood of made-up PeerIds is slowed down.
pub const JOINS_PER_MINUTE: u32 = 60;
/// The longest the mediator waits for a holder's proof.
const PROOF_WAIT: Duration = Duration::from_secs(30);
/// The longest the mediator waits for a holder taken for gone to answer a
/// probe.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// The longest wait between two probes of a holder taken for gone.
const PROBE_BACKOFF_MAX: u64 = 24 * 3600;
/// The wait before the next probe of a holder taken for gone, after one
/// of `wait` (0 at first) went unanswered: double, at least a period, and
/// at most a day unless a period is longer.
fn next_probe_wait(wait: u64, period: u64) -> u64 {
    let period = period.max(1);
    wait.saturating_mul(2)
        .max(period)
        .min(PROBE_BACKOFF_MAX.max(period))
}

/// Challenges sent at once.
const PARALLEL_PROOFS: usize = 16;
/// Rounds of audits in a row a holder must leave unanswered, besides the
/// time, before the mediator takes it for gone: one lost answer is not an
/// absence.
const SILENT_AUDITS: u32 = 3;
/// Seconds a `sendmany` may still be running after its intent was recorded.
const IN_FLIGHT: u64 = 600;
/// How much of an audit score the past keeps at each audit.
pub const AUDIT_DECAY: f64 = 0.95;

/// A message either way, with its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u8,
    pub body: T,
}

/// What a client asks its mediator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// Where do I deposit? (The same address every time.)
    DepositAddress,
    /// What is my escrow?
    Balance,
    /// Which of `candidates` (PeerId bytes, each with the room it reported;
    /// closest to the block first) may take a block of `len` bytes, that
    /// wants `need` more copies? `consent`: the client's signed consent
    /// that this mediator makes and pays contracts for it.
    Choose {
        len: u64,
        need: u32,
        candidates: Vec<(Vec<u8>, u64)>,
        consent: Signature,
    },
    /// Blocks the client put on, or released from, holders.
    Report { items: Vec<Placement> },
    /// Which of my blocks did you move while I was away?
    Moves,
    /// I took note of these moves (scores): forget them.
    MovesTaken { scores: Vec<[u8; 32]> },
}

/// A block the mediator copied from a surviving holder to a new one after
/// its holder `from` failed an audit or stopped answering, for the client to
/// put in its manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub score: [u8; 32],
    /// The holder that lost it (PeerId bytes).
    pub from: Vec<u8>,
    /// The holder that keeps it now (PeerId bytes).
    pub to: Vec<u8>,
}

/// One block on one holder, as a client reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The holder, as PeerId bytes.
    pub holder: Vec<u8>,
    /// The block's score.
    pub score: [u8; 32],
    /// Its length in bytes.
    pub len: u64,
    /// True: the holder keeps it now; false: released.
    pub kept: bool,
}

/// The mediator's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    DepositAddress {
        address: String,
    },
    Balance(Escrow),
    /// The mediator does not serve this client, or could not answer; why.
    Refused(String),
    /// The holders to use, in order, each with the room its offer gave when
    /// a contract was made for it now (see `fincrypt_engine::Market::choose`).
    Chosen {
        peers: Vec<(Vec<u8>, Option<u64>)>,
    },
    /// A report was kept.
    Noted,
    /// Blocks moved while the client was away (at most [`MAX_REPORT`]).
    Moves {
        items: Vec<Moved>,
    },
}

/// A client's escrow, in satoshis.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// The client.
    pub client: String,
    /// Its deposit address.
    pub address: String,
    /// Received at the address with the confirmations the mediator asks.
    pub deposited_sats: u64,
    /// Received, not yet confirmed enough.
    pub pending_sats: u64,
    /// Paid to holders for the client (sent, or being sent).
    pub paid_sats: u64,
    /// The mediator's fee on those payments.
    pub fees_sats: u64,
    /// What is left: deposited, less paid and fees.
    pub escrow_sats: u64,
    /// The mediator's fee, in hundredths of a percent of each payment.
    pub fee_basis_points: u32,
    /// Confirmations a deposit needs to count.
    pub min_conf: u32,
    /// What one period of the client's contracts costs, at the bytes last
    /// audited, fee included.
    pub cost_per_period: u64,
    /// Periods the escrow pays for at that cost.
    pub funded_periods: u64,
    /// The mediator's `grace_periods`: below that many funded periods the
    /// escrow is low, and the client is told.
    pub grace_periods: u64,
    /// The escrow pays for fewer than `grace_periods` periods: once it pays
    /// for none, the client's periods go unpaid and its holders cut it
    /// (docs/ARCHITECTURE.md, "Mediator").
    pub low: bool,
    /// Bytes the client placed under the mediator's contracts.
    pub bytes_placed: u64,
    /// Holders under contract for the client.
    pub holders: u64,
    /// Payments made for the client: one line per period paid.
    pub payments: Vec<PaymentView>,
}

/// One client, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRow {
    /// Its deposit address.
    address: String,
    /// Unix seconds of its first ask.
    since: u64,
    /// Its consent that this mediator pays for it, once given.
    consent: Option<Signature>,
}

/// A holder's audit score: like a decaying success ratio. Each audit
/// (a proof checked, or a wrong one) updates
/// `alpha = d * alpha + passed` and `beta = d * beta + failed`, with
/// `d` = [`AUDIT_DECAY`]; the score is `alpha / (alpha + beta)`, from 1.0 for
/// a holder never audited. It weighs the last twenty or so audits, the
/// newest most: a long-standing holder falls to 0.95 after one wrong proof
/// and under 0.6 after ten in a row; a new one to 0.49 after its first, and
/// back to 0.67 after one passed audit. A challenge left unanswered does
/// not change it (the period goes unpaid instead).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditScore {
    pub alpha: f64,
    pub beta: f64,
    /// Audits passed and failed, in all.
    pub passed: u64,
    pub failed: u64,
}

/// A holder that answered none of the mediator's audits since `since`
/// (unix seconds): `unanswered` of them, the latest at `last`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub since: u64,
    pub last: u64,
    /// Rounds of audits ([`Mediator::tick`]) it answered none of: a round
    /// that asks it for several clients counts once.
    pub unanswered: u32,
    /// The last round counted.
    pub round: u64,
}

impl Silence {
    /// Whether the holder counts as gone after `limit` seconds of silence:
    /// its contracts end and its blocks move (docs/ARCHITECTURE.md,
    /// "Mediator").
    pub fn gone(&self, limit: u64) -> bool {
        self.unanswered >= SILENT_AUDITS && self.last.saturating_sub(self.since) >= limit
    }
}

impl Default for AuditScore {
    fn default() -> Self {
        AuditScore {
            alpha: 1.0,
            beta: 0.0,
            passed: 0,
            failed: 0,
        }
    }
}

impl AuditScore {
    /// The score, between 0 and 1.
    pub fn score(&self) -> f64 {
        if self.alpha + self.beta <= 0.0 {
            1.0
        } else {
            self.alpha / (self.alpha + self.beta)
        }
    }

    /// After one more audit.
    pub fn after(mut self, passed: bool) -> AuditScore {
        self.alpha = AUDIT_DECAY * self.alpha + if passed { 1.0 } else { 0.0 };
        self.beta = AUDIT_DECAY * self.beta + if passed { 0.0 } else { 1.0 };
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        self
    }
}

/// Who the mediator serves, and on what terms.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// When some: only these clients.
    pub accept_clients: Option<HashSet<PeerId>>,
    /// Never these clients.
    pub deny_clients: HashSet<PeerId>,
    /// When some: only these holders.
    pub accept_holders: Option<HashSet<PeerId>>,
    /// Never these holders.
    pub deny_holders: HashSet<PeerId>,
    /// No new blocks go to a holder whose audit score is below this.
    pub min_audit_score: f64,
    /// No new placements for a client whose escrow funds fewer periods.
    pub min_escrow_periods: u64,
    /// A client whose escrow funds fewer periods is told its escrow is low.
    pub grace_periods: u64,
    /// A holder that answers none of the mediator's audits for this many
    /// periods is taken for gone: its contracts end and its blocks move.
    pub unreachable_periods: u64,
    /// The fee, in hundredths of a percent of what is paid for a client.
    pub fee_basis_points: u32,
    /// Confirmations a deposit needs to count in the escrow.
    pub min_conf: u32,
}

impl Rules {
    /// Why `client` is not served; none if it is.
    fn refuses(&self, client: &PeerId) -> Option<&'static str> {
        if self.deny_clients.contains(client) {
            return Some("this mediator does not take this client (deny_clients)");
        }
        if self
            .accept_clients
            .as_ref()
            .is_some_and(|a| !a.contains(client))
        {
            return Some("this mediator takes only the clients it lists (accept_clients)");
        }
        None
    }

    /// Why `holder` gets no new blocks; none if it may.
    fn refuses_holder(
        &self,
        holder: &PeerId,
        audit: Option<AuditScore>,
        gone: Option<Silence>,
    ) -> Option<String> {
        if self.deny_holders.contains(holder) {
            return Some("the mediator does not place on it (deny_holders)".into());
        }
        if self
            .accept_holders
            .as_ref()
            .is_some_and(|a| !a.contains(holder))
        {
            return Some(
                "the mediator places only on the holders it lists (accept_holders)".into(),
            );
        }
        if let Some(s) = gone {
            return Some(format!(
                "it has answered none of the mediator's last {} rounds of audits, since {}",
                s.unanswered, s.since
            ));
        }
        if let Some(a) = audit
            && a.score() < self.min_audit_score
        {
            return Some(format!(
                "its audit score {:.3} is under the mediator's min_audit_score {}",
                a.score(),
                self.min_audit_score
            ));
        }
        None
    }

    /// The fee on `paid` satoshis, rounded down.
    pub fn fee(&self, paid: u64) -> u64 {
        let f = u128::from(paid) * u128::from(self.fee_basis_points) / 10_000;
        u64::try_from(f).unwrap_or(u64::MAX)
    }
}

/// Encodes an [`Ask`] for the wire.
pub fn encode_ask(ask: Ask) -> Result<Vec<u8>, MarketError> {
    encode(&Envelope {
        version: MEDIATE_VERSION,
        body: ask,
    })
}

/// The body of an [`Envelope`] of this version; `what` names it in errors.
fn open_envelope<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, MarketError> {
    let e: Envelope<T> = decode(bytes, what)?;
    if e.version != MEDIATE_VERSION {
        return Err(MarketError::Invalid(format!(
            "{what} is of version {} (this program speaks {MEDIATE_VERSION})",
            e.version
        )));
    }
    Ok(e.body)
}

/// Reads a client's message: its [`Ask`], of this version.
pub fn decode_ask(bytes: &[u8]) -> Result<Ask, MarketError> {
    open_envelope(bytes, "the message")
}

/// Reads a mediator's answer; a refusal becomes an error with its reason.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, MarketError> {
    match open_envelope(bytes, "the mediator's answer")? {
        Reply::Refused(why) => Err(MarketError::Invalid(format!("the mediator refused: {why}"))),
        r => Ok(r),
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, MarketError> {
    postcard::to_allocvec(v).map_err(|e| MarketError::Invalid(format!("cannot encode: {e}")))
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, MarketError> {
    postcard::from_bytes(bytes)
        .map_err(|e| MarketError::Invalid(format!("{what} does not decode: {e}")))
}

/// A row of the `silent` table. Rows written before silence counted rounds
/// lack `round` (postcard keeps no field names): they read as round 0.
fn silence_row(bytes: &[u8]) -> Result<Silence, MarketError> {
    #[derive(Deserialize)]
    struct Unrounded {
        since: u64,
        last: u64,
        unanswered: u32,
    }
    decode::<Silence>(bytes, "a silence row")
        .or_else(|e| {
            decode::<Unrounded>(bytes, "a silence row")
                .map(|u| Silence {
                    since: u.since,
                    last: u.last,
                    unanswered: u.unanswered,
                    round: 0,
                })
                .map_err(|_| e)
        })
        .map_err(|e| MarketError::Store(e.to_string()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn peer_of(bytes: &[u8], what: &str) -> Result<PeerId, MarketError> {
    PeerId::from_bytes(bytes).map_err(|_| MarketError::Invalid(format!("{what} is not a PeerId")))
}

/// Audit scores, kept with the clients.
struct Audits {
    db: Arc<Database>,
    /// Unix seconds of the latest audit any holder answered (0 since start).
    last_answer: std::sync::atomic::AtomicU64,
}

impl Audits {
    fn get(&self, holder: &PeerId) -> Result<Option<AuditScore>, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AUDITS)?;
        let row = t.get(holder.to_bytes().as_slice())?;
        row.map(|v| {
            decode(v.value(), "an audit row").map_err(|e| MarketError::Store(e.to_string()))
        })
        .transpose()
    }

    fn record(&self, results: &[(PeerId, bool)]) -> Result<(), MarketError> {
        if results.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(AUDITS)?;
            for (holder, passed) in results {
                let key = holder.to_bytes();
                let old: AuditScore = match t.get(key.as_slice())? {
                    Some(v) => decode(v.value(), "an audit row")
                        .map_err(|e| MarketError::Store(e.to_string()))?,
                    None => AuditScore::default(),
                };
                t.insert(key.as_slice(), encode(&old.after(*passed))?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Notes which holders answered an audit at `at` (a proof, right or
    /// wrong) and which did not: a holder's silence lasts from its first
    /// unanswered audit until its next answer.
    ///
    /// `round` is the round of audits (one a tick, for every client), and a
    /// silence with no audit for over `gap` seconds (the mediator was
    /// stopped) starts again rather than lasting through it.
    fn heard(
        &self,
        answers: &[(PeerId, bool)],
        at: u64,
        round: u64,
        gap: u64,
    ) -> Result<(), MarketError> {
        if answers.is_empty() {
            return Ok(());
        }
        // A holder asked twice in one call counts as answering if it
        // answered once.
        let mut by_holder: HashMap<PeerId, bool> = HashMap::new();
        for (holder, answered) in answers {
            *by_holder.entry(*holder).or_default() |= *answered;
        }
        if by_holder.values().any(|a| *a) {
            self.last_answer
                .fetch_max(at, std::sync::atomic::Ordering::Relaxed);
        }
        if by_holder.values().all(|a| *a) {
            // The usual case, every holder answering: a write only to end a silence.
            let txn = self.db.begin_read()?;
            let t = txn.open_table(SILENT)?;
            let mut silent = false;
            for holder in by_holder.keys() {
                silent |= t.get(holder.to_bytes().as_slice())?.is_some();
            }
            if !silent {
                return Ok(());
            }
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(SILENT)?;
            for (holder, answered) in by_holder {
                let key = holder.to_bytes();
                if answered {
                    t.remove(key.as_slice())?;
                    continue;
                }
                let kept = t
                    .get(key.as_slice())?
                    .map(|v| silence_row(v.value()))
                    .transpose()?;
                let s = match kept {
                    Some(s) if at.saturating_sub(s.last) <= gap => Silence {
                        last: s.last.max(at),
                        unanswered: s.unanswered.saturating_add(u32::from(s.round != round)),
                        round,
                        ..s
                    },
                    _ => Silence {
                        since: at,
                        last: at,
                        unanswered: 1,
                        round,
                    },
                };
                t.insert(key.as_slice(), encode(&s)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Holders silent now, and since when.
    fn silent(&self) -> Result<HashMap<PeerId, Silence>, MarketError> {
        self.by_holder(SILENT, "a silence row", silence_row)
    }

    /// Every row of a table of holders (PeerId bytes -> a value `row` reads).
    fn by_holder<T>(
        &self,
        table: TableDefinition<&[u8], &[u8]>,
        what: &str,
        row: impl Fn(&[u8]) -> Result<T, MarketError>,
    ) -> Result<HashMap<PeerId, T>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = HashMap::new();
        for item in txn.open_table(table)?.iter()? {
            let (k, v) = item?;
            let peer = PeerId::from_bytes(k.value())
                .map_err(|e| MarketError::Store(format!("{what} is damaged: {e}")))?;
            out.insert(peer, row(v.value())?);
        }
        Ok(out)
    }

    /// `holder`'s silence, if it is gone after `limit` seconds of it.
    fn gone(&self, holder: &PeerId, limit: u64) -> Result<Option<Silence>, MarketError> {
        let txn = self.db.begin_read()?;
        let row = txn.open_table(SILENT)?.get(holder.to_bytes().as_slice())?;
        let s = row.map(|v| silence_row(v.value())).transpose()?;
        Ok(s.filter(|s| s.gone(limit)))
    }

    fn all(&self) -> Result<HashMap<PeerId, AuditScore>, MarketError> {
        self.by_holder(AUDITS, "an audit row", |v| {
            decode(v, "an audit row").map_err(|e| MarketError::Store(e.to_string()))
        })
    }
}

/// [`Custody`] for a mediator: the blocks its client reported placed (a
/// release takes them off at once), challenged by the mediator's own node.
struct Audit<'a> {
    client: &'a Client,
    audits: &'a Audits,
    /// This round of audits, and the longest time between two audits of
    /// one silence (see [`Audits::heard`]).
    round: u64,
    gap: u64,
}

impl Custody for Audit<'_> {
    fn kept(&self, _holder: &PeerId, scores: &[Score]) -> Result<Vec<bool>, MarketError> {
        Ok(vec![true; scores.len()])
    }

    fn challenge(
        &self,
        asks: Vec<(Score, PeerId)>,
    ) -> BoxFuture<'_, Result<Vec<ProofOutcome>, MarketError>> {
        use futures::StreamExt;
        Box::pin(async move {
            let outcomes: Vec<ProofOutcome> =
                futures::stream::iter(asks.into_iter().map(|(score, peer)| async move {
                    let asked =
                        tokio::time::timeout(PROOF_WAIT, self.client.challenge(peer, score));
                    let result = match asked.await {
                        Ok(Ok(true)) => ProofResult::Passed,
                        Ok(Ok(false)) => ProofResult::Wrong,
                        Ok(Err(e)) => {
                            info!(holder = %peer, error = %e, "a holder did not answer an audit");
                            ProofResult::NoAnswer
                        }
                        Err(_) => ProofResult::NoAnswer,
                    };
                    ProofOutcome {
                        peer,
                        score,
                        time: now(),
                        result,
                    }
                }))
                .buffer_unordered(PARALLEL_PROOFS)
                .collect()
                .await;
            let scored: Vec<(PeerId, bool)> = outcomes
                .iter()
                .filter(|o| o.result != ProofResult::NoAnswer)
                .map(|o| (o.peer, o.result == ProofResult::Passed))
                .collect();
            self.audits.record(&scored)?;
            let answered: Vec<(PeerId, bool)> = outcomes
                .iter()
                .map(|o| (o.peer, o.result != ProofResult::NoAnswer))
                .collect();
            self.audits.heard(&answered, now(), self.round, self.gap)?;
            for o in outcomes.iter().filter(|o| o.result == ProofResult::Wrong) {
                warn!(holder = %o.peer, block = %o.score, "a holder failed an audit");
            }
            Ok(outcomes)
        })
    }

    fn feeds_failures(&self) -> bool {
        false
    }

    fn drop_holder(&self, _holder: &PeerId) -> Result<u64, MarketError> {
        // The client moves its blocks when it next asks; the mediator pays
        // the holder nothing more and places nothing new on it.
        Ok(0)
    }
}

/// A holder as the mediator sees it, for `fincryptctl mediator holders`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HolderView {
    pub peer: String,
    /// Satoshis per GiB per period, under its contracts (the highest).
    pub price: u64,
    /// Bytes it keeps for the mediator's clients, as last audited.
    pub bytes: u64,
    /// Clients it holds for.
    pub clients: u64,
    /// Its audit score, and the audits behind it.
    pub audit_score: f64,
    pub audits_passed: u64,
    pub audits_failed: u64,
    /// `active`, or why not.
    pub state: String,
}

/// One settlement, for `fincryptctl mediator periods`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementView {
    pub batch: u64,
    /// `sent`, `intent` (being decided) or `abandoned: why`.
    pub state: String,
    pub txid: String,
    /// Unix seconds it was decided on.
    pub created: u64,
    pub sats: u64,
    /// Each holder's address and what it was paid.
    pub outputs: Vec<(String, u64)>,
    /// Clients and contract periods it pays for.
    pub clients: u64,
    pub periods: u64,
}

/// A mediator: its ledgers, its wallet and its rules.
pub struct Mediator<P: Payments + 'static> {
    db: Arc<Database>,
    audits: Arc<Audits>,
    ledger: Arc<Ledger>,
    wallet: Arc<P>,
    rules: Rules,
    keypair: Keypair,
    settings: OwnerSettings,
    /// The mediator's node, once it runs ([`Mediator::attach`]).
    client: OnceLock<Client>,
    teller: OnceLock<Teller>,
    /// Each client's market, made on first need.
    markets: std::sync::Mutex<HashMap<PeerId, Arc<OwnerMarket<Arc<P>>>>>,
    /// Escrows read lately, by client.
    escrows: std::sync::Mutex<HashMap<PeerId, (Instant, Escrow)>>,
    /// One new client at a time, so that one client never gets two
    /// addresses; and the minute's joins so far (its start, how many).
    joining: Mutex<(Option<Instant>, u32)>,
    /// The last settlement's outcome, in words.
    last_settlement: std::sync::Mutex<String>,
    /// Rounds of audits since start.
    round: std::sync::atomic::AtomicU64,
    /// Holders taken for gone that did not answer a probe: when to probe
    /// each again and the wait before that (doubling up to [`PROBE_BACKOFF_MAX`]),
    /// so that holders gone for good cost less and less.
    probes: std::sync::Mutex<HashMap<PeerId, (u64, u64)>>,
}

impl<P: Payments + 'static> Mediator<P> {
    /// Opens (or creates) the mediator's ledgers: clients and audits at
    /// `path`, contracts and payments at `ledger`. `keypair` is its node's.
    pub fn open(
        path: &Path,
        ledger: &Path,
        wallet: P,
        rules: Rules,
        keypair: Keypair,
        settings: OwnerSettings,
    ) -> Result<Mediator<P>, MarketError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            crate::ledger::check_version(
                &mut txn.open_table(META)?,
                LEDGER_VERSION,
                "mediator ledger",
            )?;
            txn.open_table(CLIENTS)?;
            txn.open_table(AUDITS)?;
            txn.open_table(MOVES)?;
            txn.open_table(SILENT)?;
        }
        txn.commit()?;
        let db = Arc::new(db);
        Ok(Mediator {
            audits: Arc::new(Audits {
                db: db.clone(),
                last_answer: std::sync::atomic::AtomicU64::new(0),
            }),
            db,
            ledger: Arc::new(Ledger::open(ledger)?),
            wallet: Arc::new(wallet),
            rules,
            keypair,
            settings,
            client: OnceLock::new(),
            teller: OnceLock::new(),
            markets: std::sync::Mutex::new(HashMap::new()),
            escrows: std::sync::Mutex::new(HashMap::new()),
            joining: Mutex::new((None, 0)),
            last_settlement: std::sync::Mutex::new(String::new()),
            round: std::sync::atomic::AtomicU64::new(0),
            probes: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Gives the mediator its running node, through which it reads offers,
    /// proposes contracts, audits and tells holders of payments.
    pub fn attach(&self, client: Client) {
        let _ = self
            .teller
            .set(Teller::new(client.clone(), self.ledger.clone()));
        let _ = self.client.set(client);
    }

    fn node(&self) -> Result<&Client, MarketError> {
        self.client
            .get()
            .ok_or_else(|| MarketError::Store("the mediator's node is not running yet".into()))
    }

    /// How often [`Mediator::tick`] runs: several times a period.
    pub fn tick_every(&self) -> Duration {
        self.settings.tick()
    }

    /// Answers a client's message; what to send back (an error only when
    /// the answer cannot be encoded).
    pub async fn answer(&self, client: &PeerId, message: &[u8]) -> Result<Vec<u8>, MarketError> {
        let reply = match self.reply(client, message).await {
            Ok(r) => r,
            Err(MarketError::Invalid(why)) => Reply::Refused(why),
            Err(e) => {
                tracing::error!(%client, error = %e, "a client's ask failed");
                Reply::Refused("the mediator could not answer now; ask again later".into())
            }
        };
        encode(&Envelope {
            version: MEDIATE_VERSION,
            body: reply,
        })
    }

    async fn reply(&self, client: &PeerId, message: &[u8]) -> Result<Reply, MarketError> {
        let ask = decode_ask(message)?;
        if let Some(why) = self.rules.refuses(client) {
            return Err(MarketError::Invalid(why.into()));
        }
        match ask {
            Ask::DepositAddress => Ok(Reply::DepositAddress {
                address: self.join(client).await?.address,
            }),
            Ask::Balance => Ok(Reply::Balance(
                self.escrow_fresh(client, BALANCE_FRESH).await?,
            )),
            Ask::Choose {
                len,
                need,
                candidates,
                consent,
            } => self.choose(client, len, need, candidates, consent).await,
            Ask::Report { items } => self.report(client, items).await,
            Ask::Moves => Ok(Reply::Moves {
                items: self.moves_of(client)?,
            }),
            Ask::MovesTaken { scores } => self.moves_taken(client, &scores),
        }
    }

    async fn choose(
        &self,
        client: &PeerId,
        len: u64,
        need: u32,
        candidates: Vec<(Vec<u8>, u64)>,
        consent: Signature,
    ) -> Result<Reply, MarketError> {
        if candidates.len() > MAX_CANDIDATES {
            return Err(MarketError::Invalid(format!(
                "{} candidates; at most {MAX_CANDIDATES} are taken",
                candidates.len()
            )));
        }
        let me = self.keypair.public().to_peer_id();
        check_consent(&consent, client, &me)?;
        let row = self.join(client).await?;
        if row.consent.as_ref() != Some(&consent) {
            self.keep_consent(client, consent)?;
        }
        let escrow = self.escrow_recent(client).await?;
        if escrow.escrow_sats == 0 {
            return Err(MarketError::Invalid(format!(
                "no escrow: deposit to {} first (fincryptctl mediator deposit-address)",
                escrow.address
            )));
        }
        if escrow.funded_periods < self.rules.min_escrow_periods {
            return Err(MarketError::Invalid(format!(
                "the escrow pays for {} periods; this mediator places only for clients whose \
                 escrow pays for {} (min_escrow_periods): deposit more",
                escrow.funded_periods, self.rules.min_escrow_periods
            )));
        }
        let peers = candidates
            .into_iter()
            .map(|(p, room)| Ok((peer_of(&p, "a candidate")?, room)))
            .collect::<Result<Vec<_>, MarketError>>()?;
        let market = self.market_for(client)?;
        let chosen = market.choose(len, need as usize, peers).await;
        Ok(Reply::Chosen {
            peers: chosen.into_iter().map(|(p, r)| (p.to_bytes(), r)).collect(),
        })
    }

    /// Keeps a client's report. A placement counts only once its holder
    /// says it has the block: a client cannot have the mediator pay for, or
    /// audit, a block a holder never got. A holder that does not answer
    /// fails the report, which the client sends again.
    async fn report(&self, client: &PeerId, items: Vec<Placement>) -> Result<Reply, MarketError> {
        if items.len() > MAX_REPORT {
            return Err(MarketError::Invalid(format!(
                "a report of {} placements; at most {MAX_REPORT} are taken",
                items.len()
            )));
        }
        if self.client_row(client)?.is_none() {
            return Err(MarketError::Invalid("not a client of this mediator".into()));
        }
        let market = self.market_for(client)?;
        let mut released: BTreeMap<PeerId, Vec<Score>> = BTreeMap::new();
        let mut kept: BTreeMap<PeerId, Vec<(Score, u64)>> = BTreeMap::new();
        for p in items {
            let holder = peer_of(&p.holder, "a holder")?;
            if p.kept {
                kept.entry(holder)
                    .or_default()
                    .push((Score(p.score), p.len));
            } else {
                released.entry(holder).or_default().push(Score(p.score));
            }
        }
        let node = self.node()?;
        for (holder, blocks) in kept {
            for chunk in blocks.chunks(fincrypt_net::proto::MAX_SCORES) {
                let scores: Vec<Score> = chunk.iter().map(|(s, _)| *s).collect();
                let has = tokio::time::timeout(PROOF_WAIT, node.has(holder, &scores))
                    .await
                    .map_err(|_| MarketError::Store(format!("holder {holder} did not answer")))?
                    .map_err(|e| MarketError::Store(format!("asking holder {holder}: {e}")))?;
                for ((score, len), held) in chunk.iter().zip(has) {
                    if held {
                        market.placed(&holder, score, *len);
                    } else {
                        info!(%client, %holder, block = %score, "a reported placement the holder does not have");
                    }
                }
            }
        }
        market.persist().map_err(MarketError::Store)?;
        for (holder, scores) in released {
            market.forget(&holder, &scores)?;
        }
        Ok(Reply::Noted)
    }

    fn client_row(&self, client: &PeerId) -> Result<Option<ClientRow>, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CLIENTS)?;
        let row = t.get(client.to_bytes().as_slice())?;
        row.map(|v| {
            decode(v.value(), "a client row").map_err(|e| MarketError::Store(e.to_string()))
        })
        .transpose()
    }

    fn keep_consent(&self, client: &PeerId, consent: Signature) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(CLIENTS)?;
            let key = client.to_bytes();
            let mut row: ClientRow = match t.get(key.as_slice())? {
                Some(v) => decode(v.value(), "a client row")
                    .map_err(|e| MarketError::Store(e.to_string()))?,
                None => return Err(MarketError::Store("a client row vanished".into())),
            };
            row.consent = Some(consent);
            t.insert(key.as_slice(), encode(&row)?.as_slice())?;
        }
        txn.commit()?;
        // (A market made before keeps the consent it was made with: either
        // is the client's own, and both name this mediator.)
        Ok(())
    }

    /// `client`'s row, made with a new deposit address on its first ask.
    async fn join(&self, client: &PeerId) -> Result<ClientRow, MarketError> {
        if let Some(row) = self.client_row(client)? {
            return Ok(row);
        }
        let mut joins = self.joining.lock().await;
        if let Some(row) = self.client_row(client)? {
            return Ok(row);
        }
        match joins.0 {
            Some(start) if start.elapsed() < Duration::from_secs(60) => {
                if joins.1 >= JOINS_PER_MINUTE {
                    return Err(MarketError::Invalid(
                        "this mediator takes no more new clients this minute; ask again later"
                            .into(),
                    ));
                }
                joins.1 += 1;
            }
            _ => *joins = (Some(Instant::now()), 1),
        }
        if self.client_count()? >= MAX_CLIENTS as u64 {
            return Err(MarketError::Invalid(
                "this mediator takes no more clients".into(),
            ));
        }
        // An address made and then lost to a crash is never used: harmless.
        let address = self.wallet.new_address().await?;
        let row = ClientRow {
            address,
            since: now(),
            consent: None,
        };
        let txn = self.db.begin_write()?;
        txn.open_table(CLIENTS)?
            .insert(client.to_bytes().as_slice(), encode(&row)?.as_slice())?;
        txn.commit()?;
        info!(%client, address = %row.address, "a new client");
        Ok(row)
    }

    /// The market the mediator runs for `client`, made on first need from
    /// its consent.
    fn market_for(&self, client: &PeerId) -> Result<Arc<OwnerMarket<Arc<P>>>, MarketError> {
        // Held while one is made: two markets of one client would each
        // propose a contract to the same holder.
        let mut markets = self.markets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = markets.get(client) {
            return Ok(m.clone());
        }
        let row = self
            .client_row(client)?
            .ok_or_else(|| MarketError::Invalid("not a client of this mediator".into()))?;
        let consent = row.consent.ok_or_else(|| {
            MarketError::Invalid(
                "the client has not consented to this mediator paying for it yet".into(),
            )
        })?;
        let (rules, audits) = (self.rules.clone(), self.audits.clone());
        let limit = self.silence_limit();
        let gate: Gate = Arc::new(move |holder: &PeerId| {
            let audit = audits.get(holder).unwrap_or_else(|e| {
                warn!(error = %e, "cannot read an audit score");
                None
            });
            let gone = audits.gone(holder, limit).unwrap_or_else(|e| {
                warn!(error = %e, "cannot read whether a holder answers");
                None
            });
            rules.refuses_holder(holder, audit, gone)
        });
        let market = OwnerMarket::for_client(
            self.keypair.clone(),
            *client,
            Some(consent),
            Some(gate),
            self.node()?.clone(),
            self.ledger.clone(),
            self.settings.clone(),
            Some(self.wallet.clone()),
        )?;
        markets.insert(*client, market.clone());
        Ok(market)
    }

    /// Satoshis paid (sent, or in a batch being sent) for each client.
    fn spent(&self) -> Result<HashMap<PeerId, u64>, MarketError> {
        let owners: HashMap<ContractId, PeerId> = self
            .ledger
            .contracts()?
            .iter()
            .map(|c| Ok((c.terms.id, c.terms.owner()?)))
            .collect::<Result<_, MarketError>>()?;
        let mut out: HashMap<PeerId, u64> = HashMap::new();
        for (id, _, row) in self.ledger.periods()? {
            if let PeriodState::Paid { sats, .. } | PeriodState::Batched { sats, .. } = row.state
                && let Some(owner) = owners.get(&id)
            {
                let e = out.entry(*owner).or_default();
                *e = e.saturating_add(sats);
            }
        }
        Ok(out)
    }

    /// `client`'s escrow, read again if older than [`ESCROW_FRESH`].
    async fn escrow_recent(&self, client: &PeerId) -> Result<Escrow, MarketError> {
        self.escrow_fresh(client, ESCROW_FRESH).await
    }

    /// `client`'s escrow, read again if older than `fresh`.
    async fn escrow_fresh(&self, client: &PeerId, fresh: Duration) -> Result<Escrow, MarketError> {
        if let Some((at, e)) = self
            .escrows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client)
            && at.elapsed() < fresh
        {
            return Ok(e.clone());
        }
        self.escrow(client).await
    }

    /// `client`'s escrow; a client that never asked for an address has none.
    pub async fn escrow(&self, client: &PeerId) -> Result<Escrow, MarketError> {
        self.escrow_given(client, &self.spent()?).await
    }

    /// What one period of `market`'s live contracts costs, fee included,
    /// at the bytes last audited; and their holders and bytes.
    fn period_cost(&self, market: &OwnerMarket<Arc<P>>) -> (u64, u64, u64) {
        let (mut cost, mut holders, mut bytes) = (0u64, 0, 0);
        for (_, c, b, ended) in market.holders() {
            if !ended {
                holders += 1;
                bytes += b;
                cost = cost.saturating_add(c.terms.due(b));
            }
        }
        (cost.saturating_add(self.rules.fee(cost)), holders, bytes)
    }

    /// [`Mediator::escrow`], with what was paid for each client (`spent`).
    async fn escrow_given(
        &self,
        client: &PeerId,
        spent: &HashMap<PeerId, u64>,
    ) -> Result<Escrow, MarketError> {
        let Some(row) = self.client_row(client)? else {
            return Err(MarketError::Invalid(
                "no deposit address yet: ask for one first (fincryptctl mediator deposit-address)"
                    .into(),
            ));
        };
        let deposited = self
            .wallet
            .received_by(&row.address, self.rules.min_conf)
            .await?;
        let seen = self.wallet.received_by(&row.address, 0).await?;
        let paid = spent.get(client).copied().unwrap_or(0);
        let fees = self.rules.fee(paid);
        let escrow = deposited.saturating_sub(paid).saturating_sub(fees);
        let mut e = Escrow {
            client: client.to_string(),
            address: row.address,
            deposited_sats: deposited,
            pending_sats: seen.saturating_sub(deposited),
            paid_sats: paid,
            fees_sats: fees,
            escrow_sats: escrow,
            fee_basis_points: self.rules.fee_basis_points,
            min_conf: self.rules.min_conf,
            ..Escrow::default()
        };
        if row.consent.is_some() {
            let market = self.market_for(client)?;
            (e.cost_per_period, e.holders, e.bytes_placed) = self.period_cost(&market);
            e.payments = self.payments_of(client)?;
        }
        e.funded_periods = funded_periods(escrow, e.cost_per_period);
        e.grace_periods = self.rules.grace_periods;
        e.low = e.funded_periods < self.rules.grace_periods;
        self.escrows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*client, (Instant::now(), e.clone()));
        Ok(e)
    }

    fn payments_of(&self, client: &PeerId) -> Result<Vec<PaymentView>, MarketError> {
        let mine: HashMap<ContractId, String> = self
            .ledger
            .contracts()?
            .iter()
            .filter(|c| c.terms.owner().ok() == Some(*client))
            .map(|c| {
                let holder = c.terms.holder().map(|h| h.to_string()).unwrap_or_default();
                (c.terms.id, holder)
            })
            .collect();
        let mut out = Vec::new();
        for (_, b) in self.ledger.batches()? {
            if let BatchState::Sent(txid) = &b.state {
                for (id, period, sats) in &b.items {
                    if let Some(holder) = mine.get(id) {
                        out.push(PaymentView {
                            txid: txid.clone(),
                            holder: holder.clone(),
                            contract: hex(id),
                            period: *period,
                            sats: *sats,
                        });
                    }
                }
            }
        }
        // The latest only: an answer must fit in one message.
        let skip = out.len().saturating_sub(MAX_PAYMENTS_SHOWN);
        out.drain(..skip);
        Ok(out)
    }

    /// One round: audits every client's holders, settles every client's
    /// due periods that its escrow covers in one transaction, and tells the
    /// holders. Returns the audits made.
    pub async fn tick(&self) -> Result<u64, MarketError> {
        let client = self.node()?;
        let round = self
            .round
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let custody = Audit {
            client,
            audits: &self.audits,
            round,
            // (A round may wait on unanswered challenges.)
            gap: self
                .silence_limit()
                .max(2 * (PROOF_WAIT.as_secs() + self.settings.tick().as_secs() + 1)),
        };
        // What each client's escrow can still pay: deposits, less paid and
        // fees. A client whose deposits cannot be read is paid for next time.
        let spent = self.spent()?;
        let mut budgets: HashMap<PeerId, (u64, u64)> = HashMap::new();
        let rows = self.client_rows()?;
        for (peer, row) in &rows {
            match self
                .wallet
                .received_by(&row.address, self.rules.min_conf)
                .await
            {
                Ok(deposited) => {
                    budgets.insert(*peer, (deposited, spent.get(peer).copied().unwrap_or(0)));
                }
                Err(e) => warn!(client = %peer, error = %e, "cannot read a client's deposits"),
            }
        }
        let mut audited = 0;
        for (peer, row) in &rows {
            // One client's trouble is logged; the others go on.
            if row.consent.is_none() {
                continue;
            }
            let market = match self.market_for(peer) {
                Ok(m) => m,
                Err(e) => {
                    warn!(client = %peer, error = %e, "a client's market cannot open");
                    continue;
                }
            };
            // A client whose escrow cannot pay a period is not audited: its
            // periods go unpaid, and its holders may cut it and release its
            // blocks by their own rules, which is no failure of theirs.
            let (cost, _, _) = self.period_cost(&market);
            let left = budgets
                .get(peer)
                .map(|(d, s)| d.saturating_sub(*s).saturating_sub(self.rules.fee(*s)));
            if cost > 0 && left.is_some_and(|l| l < cost) {
                continue;
            }
            match market.audit(&custody).await {
                Ok((n, _)) => audited += n,
                Err(e) => warn!(client = %peer, error = %e, "a client's audit failed"),
            }
        }
        // Holders that answered no audit for `unreachable_periods` are
        // gone: their contracts end (nothing more is paid to them) and
        // `repair` below moves their blocks, as after a wrong proof.
        if let Err(e) = self.end_silent(&rows).await {
            warn!(error = %e, "cannot end the contracts of holders that stopped answering");
        }
        // Network fees are the mediator's own: a wallet holding no more than
        // the escrows cannot pay them, and then pays no holder at all.
        let owed: u64 = budgets
            .values()
            .map(|(d, s)| d.saturating_sub(*s).saturating_sub(self.rules.fee(*s)))
            .sum();
        match self.wallet.balance().await {
            Ok(balance) if balance <= owed => warn!(
                balance_sats = balance,
                escrows_sats = owed,
                "the wallet holds no more than the clients' escrow: network fees come from \
                 the mediator's own coins, so add some, or settlements fail"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read the wallet's balance"),
        }
        let rules = self.rules.clone();
        let mut fits = move |c: &crate::contract::Contract, sats: u64| {
            let Ok(owner) = c.terms.owner() else {
                return false;
            };
            let Some((deposited, spent)) = budgets.get_mut(&owner) else {
                return false;
            };
            let after = spent.saturating_add(sats);
            if after.saturating_add(rules.fee(after)) <= *deposited {
                *spent = after;
                true
            } else {
                false
            }
        };
        let settle = SettleRules {
            min_payout: self.settings.min_payout,
            in_flight: IN_FLIGHT,
        };
        let outcome = self
            .ledger
            .settle_within(&self.wallet, now(), settle, &mut fits)
            .await;
        let note = match outcome {
            Ok(Settlement::Paid {
                txid, sats, payees, ..
            }) => Some(format!("paid {sats} sats to {payees} holders in {txid}")),
            Ok(Settlement::Waiting) => {
                Some("waiting: an interrupted settlement is not decided yet".into())
            }
            Ok(Settlement::Nothing) => None,
            Err(e) => {
                warn!(error = %e, "a settlement failed; it is tried again next time");
                Some(format!("failed: {e}"))
            }
        };
        if let Some(note) = note {
            *self
                .last_settlement
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = note;
        }
        if let Some(teller) = self.teller.get() {
            teller.tell_paid(now()).await?;
        }
        // After paying: moving blocks may take long, and holders wait for
        // their payments only a period.
        let limit = Duration::from_secs((self.settings.period / 2).max(5));
        match tokio::time::timeout(limit, self.repair()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "moving blocks off dropped holders failed"),
            Err(_) => info!("moving blocks off dropped holders goes on next round"),
        }
        self.escrows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(audited)
    }

    /// Seconds of silence after which a holder is gone.
    fn silence_limit(&self) -> u64 {
        self.rules
            .unreachable_periods
            .max(1)
            .saturating_mul(self.settings.period.max(1))
    }

    /// Ends every client's contract with a holder gone silent. Each such
    /// holder is probed first: one that answers is not gone after all (and
    /// one whose contracts ended may get new blocks again; they stay ended).
    /// Nothing ends while no holder at all has answered for as long: the
    /// mediator's own network is then the likelier fault. How many
    /// contracts ended.
    async fn end_silent(&self, rows: &[(PeerId, ClientRow)]) -> Result<u64, MarketError> {
        use futures::StreamExt;
        let limit = self.silence_limit();
        let gone: Vec<(PeerId, Silence)> = self
            .audits
            .silent()?
            .into_iter()
            .filter(|(_, s)| s.gone(limit))
            .collect();
        // A holder that answered an audit since is no longer gone: if it
        // goes silent again, it is probed afresh.
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|h, _| gone.iter().any(|(g, _)| g == h));
        if gone.is_empty() {
            return Ok(0);
        }
        let node = self.node()?;
        let t = now();
        let mut still = Vec::new();
        let due: Vec<(PeerId, Silence)> = {
            let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            gone.into_iter()
                .filter_map(|(holder, s)| match probes.get(&holder) {
                    Some((next, _)) if *next > t => {
                        still.push((holder, s));
                        None
                    }
                    _ => Some((holder, s)),
                })
                .collect()
        };
        let probed: Vec<(PeerId, Silence, bool)> =
            futures::stream::iter(due.into_iter().map(|(holder, s)| async move {
                let back = matches!(
                    tokio::time::timeout(PROBE_WAIT, node.probe(holder)).await,
                    Ok(Ok(_))
                );
                (holder, s, back)
            }))
            .buffer_unordered(PARALLEL_PROOFS)
            .collect()
            .await;
        for (holder, s, back) in probed {
            let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
            if back {
                probes.remove(&holder);
                drop(probes);
                info!(%holder, "a holder taken for gone answers again: it may get new blocks");
                self.audits.heard(&[(holder, true)], now(), 0, 0)?;
            } else {
                let wait = probes.get(&holder).map_or(0, |(_, w)| *w);
                let wait = next_probe_wait(wait, self.settings.period);
                probes.insert(holder, (t.saturating_add(wait), wait));
                still.push((holder, s));
            }
        }
        if still.is_empty() {
            return Ok(0);
        }
        let heard_last = self
            .audits
            .last_answer
            .load(std::sync::atomic::Ordering::Relaxed);
        if heard_last.saturating_add(limit) < t {
            warn!(
                holders = still.len(),
                "no holder answered any audit for {limit} s: the mediator's own network is the \
                 likelier fault, so no contract ends"
            );
            return Ok(0);
        }
        let mut ended = 0;
        for (client, row) in rows {
            if row.consent.is_none() {
                continue;
            }
            let market = match self.market_for(client) {
                Ok(m) => m,
                Err(e) => {
                    warn!(%client, error = %e, "a client's market cannot open");
                    continue;
                }
            };
            for (holder, s) in &still {
                let why = format!(
                    "no answer to {} rounds of audits, since {}",
                    s.unanswered, s.since
                );
                match market.end_contract_of(holder, t, &why) {
                    Ok(true) => {
                        warn!(%client, %holder, silent_since = s.since, "a holder answered no audit for {limit} s: its contract ends and its blocks move");
                        ended += 1;
                    }
                    Ok(false) => {}
                    Err(e) => warn!(%client, %holder, error = %e, "cannot end a contract"),
                }
            }
        }
        Ok(ended)
    }

    /// `client`'s moves not yet taken, at most [`MAX_REPORT`].
    fn moves_of(&self, client: &PeerId) -> Result<Vec<Moved>, MarketError> {
        let prefix = client.to_bytes();
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MOVES)?;
        let mut out = Vec::new();
        for row in t.range(prefix.as_slice()..)? {
            let (k, v) = row?;
            if !k.value().starts_with(&prefix) || out.len() == MAX_REPORT {
                break;
            }
            out.push(
                decode(v.value(), "a move row").map_err(|e| MarketError::Store(e.to_string()))?,
            );
        }
        Ok(out)
    }

    fn moves_taken(&self, client: &PeerId, scores: &[[u8; 32]]) -> Result<Reply, MarketError> {
        if scores.len() > MAX_REPORT {
            return Err(MarketError::Invalid(format!(
                "{} moves at once; at most {MAX_REPORT}",
                scores.len()
            )));
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(MOVES)?;
            for s in scores {
                // Every move of that block (client ‖ score ‖ new holder).
                let mut key = client.to_bytes();
                key.extend_from_slice(s);
                let keys: Vec<Vec<u8>> = t
                    .range(key.as_slice()..)?
                    .map_while(|r| match r {
                        Ok((k, _)) if k.value().starts_with(&key) => Some(Ok(k.value().to_vec())),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .collect::<Result<_, _>>()?;
                for k in keys {
                    t.remove(k.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(Reply::Noted)
    }

    /// Moves the blocks of contracts ended after a failed audit to other
    /// holders: each is read from a holder that still keeps it under
    /// another of the client's contracts (checked against its score), put
    /// for the client on a holder the client's market chooses, and kept as
    /// a move for the client to take. Returns how many blocks moved.
    async fn repair(&self) -> Result<u64, MarketError> {
        let ended = self.ledger.ended()?;
        if ended.is_empty() {
            return Ok(0);
        }
        let client = self.node()?;
        let contracts = self.ledger.contracts()?;
        let mut moved = 0u64;
        let mut budget = MOVES_PER_ROUND;
        for gone in contracts.iter().filter(|c| ended.contains_key(&c.terms.id)) {
            let placed = self.ledger.placed(&gone.terms.id)?;
            if placed.is_empty() || budget == 0 {
                continue;
            }
            let owner = gone.terms.owner()?;
            let from = gone.terms.holder()?;
            let market = self.market_for(&owner)?;
            // Where else each block is, under the client's live contracts.
            let mut elsewhere: HashMap<Score, Vec<PeerId>> = HashMap::new();
            for c in contracts
                .iter()
                .filter(|c| c.terms.owner().ok() == Some(owner) && !ended.contains_key(&c.terms.id))
            {
                let holder = c.terms.holder()?;
                for (s, _) in self.ledger.placed(&c.terms.id)? {
                    elsewhere.entry(s).or_default().push(holder);
                }
            }
            // In a new order each round: blocks that could not move do not
            // keep the others waiting.
            let mut placed = placed;
            rand::seq::SliceRandom::shuffle(placed.as_mut_slice(), &mut rand::thread_rng());
            for (score, len) in placed.into_iter().take(budget) {
                budget -= 1;
                let Some(sources) = elsewhere.get(&score) else {
                    info!(client = %owner, block = %score, "no other holder keeps a block to move; the client places it again");
                    continue;
                };
                let mut data = None;
                for s in sources {
                    match tokio::time::timeout(COPY_WAIT, client.get(*s, score)).await {
                        Ok(Ok(d)) if Score::of(&d) == score => {
                            data = Some(d);
                            break;
                        }
                        Ok(Ok(_)) => {
                            warn!(holder = %s, block = %score, "a holder sent a block that is not its score")
                        }
                        Ok(Err(e)) => info!(holder = %s, error = %e, "cannot read a block to move"),
                        Err(_) => info!(holder = %s, "a block to move did not come in time"),
                    }
                }
                let Some(data) = data else {
                    continue;
                };
                let closest = match client.closest_peers(score).await {
                    Ok(p) => p,
                    Err(e) => {
                        info!(error = %e, "no closest peers to move a block to");
                        continue;
                    }
                };
                let candidates: Vec<(PeerId, u64)> = closest
                    .into_iter()
                    .filter(|p| *p != from && !sources.contains(p))
                    .map(|p| (p, u64::MAX))
                    .collect();
                let chosen = market.choose(len, 1, candidates).await;
                let mut to = None;
                for (peer, _) in chosen {
                    let put = client.put_for(peer, owner, score, data.clone());
                    match tokio::time::timeout(COPY_WAIT, put).await {
                        Ok(Ok(())) => {
                            to = Some(peer);
                            break;
                        }
                        Ok(Err(e)) => {
                            info!(holder = %peer, error = %e, "a holder did not take a moved block")
                        }
                        Err(_) => info!(holder = %peer, "a moved block was not taken in time"),
                    }
                }
                let Some(to) = to else {
                    continue;
                };
                // The move first: should the process die before the rest,
                // the client still learns of the copy (and releases it if
                // it does not want it), and is never paying for one it
                // does not know of.
                let row = Moved {
                    score: score.0,
                    from: from.to_bytes(),
                    to: to.to_bytes(),
                };
                let txn = self.db.begin_write()?;
                {
                    let mut key = owner.to_bytes();
                    key.extend_from_slice(&score.0);
                    key.extend_from_slice(&to.to_bytes());
                    txn.open_table(MOVES)?
                        .insert(key.as_slice(), encode(&row)?.as_slice())?;
                }
                txn.commit()?;
                market.placed(&to, &score, len);
                market.persist().map_err(MarketError::Store)?;
                self.ledger.forget_placed(&gone.terms.id, &[score])?;
                info!(client = %owner, block = %score, %from, %to, "moved a block off a dropped holder");
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// The last settlement's outcome, in words.
    pub fn last_settlement(&self) -> String {
        self.last_settlement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn client_rows(&self) -> Result<Vec<(PeerId, ClientRow)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(CLIENTS)?.iter()? {
            let (k, v) = row?;
            let peer = PeerId::from_bytes(k.value())
                .map_err(|e| MarketError::Store(format!("a damaged client row: {e}")))?;
            let row =
                decode(v.value(), "a client row").map_err(|e| MarketError::Store(e.to_string()))?;
            out.push((peer, row));
        }
        Ok(out)
    }

    /// How many clients there are (without reading them).
    pub fn client_count(&self) -> Result<u64, MarketError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(CLIENTS)?.len()?)
    }

    /// Every client, by PeerId.
    pub fn clients(&self) -> Result<Vec<PeerId>, MarketError> {
        Ok(self.client_rows()?.into_iter().map(|(p, _)| p).collect())
    }

    /// Every client's escrow, for whoever runs the mediator.
    pub async fn escrows(&self) -> Result<Vec<Escrow>, MarketError> {
        // One read of what was paid, for all of them.
        let spent = self.spent()?;
        let mut out = Vec::new();
        for c in self.clients()? {
            out.push(self.escrow_given(&c, &spent).await?);
        }
        Ok(out)
    }

    /// Every holder under contract, with its audit score.
    pub fn holders(&self) -> Result<Vec<HolderView>, MarketError> {
        let audits = self.audits.all()?;
        let silent = self.audits.silent()?;
        let whys = self.ledger.ended()?;
        let mut by_holder: BTreeMap<PeerId, HolderView> = BTreeMap::new();
        let mut ended: HashMap<PeerId, (u64, String)> = HashMap::new();
        for (peer, row) in self.client_rows()? {
            if row.consent.is_none() {
                continue;
            }
            for (holder, c, bytes, is_ended) in self.market_for(&peer)?.holders() {
                let v = by_holder.entry(holder).or_default();
                v.peer = holder.to_string();
                v.price = v.price.max(c.terms.price);
                v.clients += 1;
                if is_ended {
                    let e = ended.entry(holder).or_default();
                    e.0 += 1;
                    if let Some((_, why)) = whys.get(&c.terms.id) {
                        e.1.clone_from(why);
                    }
                } else {
                    v.bytes += bytes;
                }
            }
        }
        let mut out = Vec::new();
        for (holder, mut v) in by_holder {
            let a = audits.get(&holder).copied().unwrap_or_default();
            v.audit_score = a.score();
            v.audits_passed = a.passed;
            v.audits_failed = a.failed;
            let audit = audits.get(&holder).copied();
            let gone = silent
                .get(&holder)
                .copied()
                .filter(|s| s.gone(self.silence_limit()));
            let mut state = Vec::new();
            if let Some((n, why)) = ended.get(&holder) {
                state.push(format!("contracts ended: {n} (the latest: {why})"));
            }
            if let Some(s) = silent.get(&holder)
                && gone.is_none()
            {
                state.push(format!(
                    "answered none of the last {} rounds of audits, since {}",
                    s.unanswered, s.since
                ));
            }
            if let Some(why) = self.rules.refuses_holder(&holder, audit, gone) {
                state.push(format!("no new blocks: {why}"));
            }
            v.state = if state.is_empty() {
                "active".into()
            } else {
                state.join("; ")
            };
            out.push(v);
        }
        Ok(out)
    }

    /// Every settlement, oldest first.
    pub fn settlements(&self) -> Result<Vec<SettlementView>, MarketError> {
        let owners: HashMap<ContractId, PeerId> = self
            .ledger
            .contracts()?
            .iter()
            .filter_map(|c| Some((c.terms.id, c.terms.owner().ok()?)))
            .collect();
        let mut out = Vec::new();
        for (n, b) in self.ledger.batches()? {
            let (state, txid) = match &b.state {
                BatchState::Sent(t) => ("sent".to_string(), t.clone()),
                BatchState::Intent => ("intent".to_string(), String::new()),
                BatchState::Abandoned(why) => (format!("abandoned: {why}"), String::new()),
            };
            let clients: HashSet<&PeerId> = b
                .items
                .iter()
                .filter_map(|(id, _, _)| owners.get(id))
                .collect();
            out.push(SettlementView {
                batch: n,
                state,
                txid,
                created: b.created,
                sats: b.outputs.iter().map(|(_, s)| s).sum(),
                outputs: b.outputs.clone(),
                clients: clients.len() as u64,
                periods: b.items.len() as u64,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules_name_why_a_client_is_refused() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut r = Rules::default();
        assert_eq!(r.refuses(&a), None);
        r.deny_clients.insert(a);
        assert!(r.refuses(&a).unwrap().contains("deny_clients"));
        r.accept_clients = Some(HashSet::from([a]));
        assert!(r.refuses(&b).unwrap().contains("accept_clients"));
        assert!(r.refuses(&a).unwrap().contains("deny_clients"), "deny wins");
    }

    #[test]
    fn a_silence_row_written_before_rounds_were_counted_still_reads() {
        #[derive(Serialize)]
        struct Unrounded {
            since: u64,
            last: u64,
            unanswered: u32,
        }
        let old = postcard::to_allocvec(&Unrounded {
            since: 10,
            last: 70,
            unanswered: 4,
        })
        .unwrap();
        let s = silence_row(&old).unwrap();
        assert_eq!((s.since, s.last, s.unanswered, s.round), (10, 70, 4, 0));
        let new = Silence { round: 9, ..s };
        assert_eq!(silence_row(&encode(&new).unwrap()).unwrap(), new);
        assert!(silence_row(&[0xff]).is_err());
    }

    #[test]
    fn a_gone_holder_is_probed_at_doubling_waits_from_a_period_to_a_day_or_a_longer_period() {
        let mut waits = Vec::new();
        let mut w = 0;
        for _ in 0..12 {
            w = next_probe_wait(w, 3600);
            waits.push(w);
        }
        assert_eq!(&waits[..6], &[3600, 7200, 14400, 28800, 57600, 86400]);
        assert!(waits[6..].iter().all(|w| *w == 86400), "{waits:?}");
        // A period longer than a day: one probe a period (this panicked once).
        let week = 7 * 86400;
        assert_eq!(next_probe_wait(0, week), week);
        assert_eq!(next_probe_wait(week, week), week);
        assert_eq!(next_probe_wait(5, 0), 10);
    }

    #[test]
    fn a_holder_is_gone_after_rounds_of_audits_left_unanswered_for_the_limit_until_it_answers() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("m.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(SILENT).unwrap();
        txn.commit().unwrap();
        let audits = Audits {
            db: Arc::new(db),
            last_answer: std::sync::atomic::AtomicU64::new(0),
        };
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        const GAP: u64 = 50;
        // a is silent from 100; b answers one of its two asks in a round.
        audits
            .heard(&[(a, false), (b, false), (b, true)], 100, 1, GAP)
            .unwrap();
        assert!(!audits.silent().unwrap().contains_key(&b));
        assert_eq!(
            audits
                .last_answer
                .load(std::sync::atomic::Ordering::Relaxed),
            100
        );
        // Asked again in the same round (for another client): counted once.
        audits.heard(&[(a, false)], 101, 1, GAP).unwrap();
        for (t, round) in [(110, 2), (120, 3)] {
            audits.heard(&[(a, false)], t, round, GAP).unwrap();
        }
        // Three rounds, 20 s: gone after 20 s, not after 60.
        assert!(audits.gone(&a, 20).unwrap().is_some());
        assert_eq!(audits.gone(&a, 60).unwrap(), None);
        let s = audits.silent().unwrap()[&a];
        assert_eq!((s.since, s.last, s.unanswered), (100, 120, 3));
        // Two rounds are not enough, however long apart.
        audits.heard(&[(b, false)], 0, 1, 10_000).unwrap();
        audits.heard(&[(b, false)], 1000, 2, 10_000).unwrap();
        assert_eq!(audits.gone(&b, 20).unwrap(), None);
        // Nor three that the mediator spread over a stop longer than the
        // gap: the silence starts again after it.
        for (t, round) in [(0, 1), (10, 2), (500, 3)] {
            audits.heard(&[(c, false)], t, round, GAP).unwrap();
        }
        let sc = audits.silent().unwrap()[&c];
        assert_eq!((sc.since, sc.unanswered), (500, 1));
        let why = Rules::default().refuses_holder(&a, None, Some(s)).unwrap();
        assert!(why.contains("answered none"), "{why}");
        // An answer ends the silence.
        audits.heard(&[(a, true)], 130, 4, GAP).unwrap();
        assert_eq!(audits.gone(&a, 20).unwrap(), None);
        assert!(!audits.silent().unwrap().contains_key(&a));
    }

    #[test]
    fn holder_rules_name_why_a_holder_gets_no_new_blocks() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut r = Rules {
            min_audit_score: 0.6,
            ..Rules::default()
        };
        assert_eq!(r.refuses_holder(&a, None, None), None);
        let failing = AuditScore::default().after(false);
        assert!(
            r.refuses_holder(&a, Some(failing), None)
                .unwrap()
                .contains("min_audit_score")
        );
        r.deny_holders.insert(a);
        assert!(
            r.refuses_holder(&a, None, None)
                .unwrap()
                .contains("deny_holders")
        );
        r.accept_holders = Some(HashSet::from([a]));
        assert!(
            r.refuses_holder(&b, None, None)
                .unwrap()
                .contains("accept_holders")
        );
        assert!(
            r.refuses_holder(&a, None, None)
                .unwrap()
                .contains("deny_holders"),
            "deny wins"
        );
    }

    #[test]
    fn the_audit_score_moves_as_documented() {
        let new = AuditScore::default();
        assert_eq!(new.score(), 1.0);
        let failed = new.after(false);
        assert!((failed.score() - 0.487).abs() < 0.001, "{}", failed.score());
        assert!((failed.after(true).score() - 0.667).abs() < 0.001);
        // A long-standing holder: one failure leaves 0.95, ten in a row
        // take it under 0.6, nine do not.
        let mut old = new;
        for _ in 0..500 {
            old = old.after(true);
        }
        assert!((old.after(false).score() - 0.95).abs() < 0.001);
        let mut s = old;
        for n in 1..=10 {
            s = s.after(false);
            assert_eq!(
                s.score() < 0.6,
                n == 10,
                "after {n} failures: {}",
                s.score()
            );
        }
    }

    #[test]
    fn a_refusal_reads_back_as_an_error_with_its_reason() {
        let bytes = encode(&Envelope {
            version: MEDIATE_VERSION,
            body: Reply::Refused("no".into()),
        })
        .unwrap();
        let e = decode_reply(&bytes).unwrap_err();
        assert!(e.to_string().contains("refused: no"), "{e}");
        let newer = encode(&Envelope {
            version: MEDIATE_VERSION + 1,
            body: Reply::DepositAddress {
                address: "x".into(),
            },
        })
        .unwrap();
        assert!(
            decode_reply(&newer)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_reply(&bytes);
            let _ = decode_ask(&bytes);
        }
    }
}
