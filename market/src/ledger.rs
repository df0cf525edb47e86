//! The owner's ledger: contracts, what each holder proved in each period,
//! and the payments that settle them, exactly once.
//!
//! A period of a contract is paid when it has ended, every challenge in it
//! passed, and something is due (price x GiB held). Settlement pays every
//! holder due at least `min_payout` in one transaction; smaller dues wait,
//! carried to the next settlement. Exactly once, across crashes:
//!
//! 1. One commit creates a batch in state `Intent` with its outputs and a
//!    label unique to this ledger, and moves its periods from `Due` to
//!    `Batched`. Nothing is sent before that commit is durable.
//! 2. The wallet pays the outputs in one `sendmany`, with the label as the
//!    transaction's comment.
//! 3. One commit records the txid: the batch is `Sent`, its periods `Paid`.
//!
//! A batch left in `Intent` (the process died, or the node did not answer)
//! is reconciled before anything else is paid: if the wallet has a
//! transaction with its label, that is its txid; if the wallet says it has
//! none, and the batch is older than the time any call of it could still be
//! running in the node, it is abandoned and its periods are due again. A
//! refusal by the node (no funds) abandons the batch at once: nothing was
//! sent. So a period is in at most one batch that was not abandoned, and a
//! batch is paid by at most one transaction.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use fincrypt_blockstore::Score;

use crate::MarketError;
use crate::contract::{Contract, ContractId};
use crate::wallet::Payments;

/// Contracts by id: the encoded contract.
const CONTRACTS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("contracts");
/// (contract id, period big-endian) -> postcard [`PeriodRow`].
const PERIODS: TableDefinition<[u8; 24], &[u8]> = TableDefinition::new("periods");
/// Batch number -> postcard [`Batch`].
const BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("batches");
/// (contract id, score) -> the block's length: blocks placed on a
/// contract's holder, whose bytes the contract pays for while the holder keeps them.
const PLACED: TableDefinition<[u8; 48], u64> = TableDefinition::new("placed");
/// Contracts ended by the owner: id -> postcard (Unix time, why).
const ENDED: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("ended");
/// (contract id, period big-endian) -> satoshis per GiB the period is paid
/// at, when the payer's pricing floats (the lowest recorded in it); a
/// period without a row is paid at the contract's price.
const RATES: TableDefinition<[u8; 24], u64> = TableDefinition::new("rates");
/// `version`, `next_batch`, `ledger_id`, `notified_through`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEDGER_VERSION: u64 = 1;
/// No payout is larger than every coin there will be.
const MAX_PAYOUT: u64 = 21_000_000 * crate::wallet::SATS_PER_COIN;

/// One period of one contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodRow {
    /// Bytes the holder held for the contract in the period (the most reported).
    pub bytes: u64,
    /// Challenges it passed in the period.
    pub passed: u32,
    /// Challenges it failed in the period.
    pub failed: u32,
    /// Where the period stands.
    pub state: PeriodState,
}

/// Where a period stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeriodState {
    /// Not ended yet.
    Open,
    /// Ended with a failed challenge, none at all, or nothing due: unpaid.
    Unpaid,
    /// Ended, every challenge passed: this many satoshis are owed.
    Due(u64),
    /// In a batch being paid.
    Batched {
        /// The batch.
        batch: u64,
        /// Satoshis.
        sats: u64,
    },
    /// Paid by a batch whose transaction is known.
    Paid {
        /// The batch.
        batch: u64,
        /// Satoshis.
        sats: u64,
    },
}

/// One settlement transaction, from intent to txid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The transaction's comment in the wallet: unique to this ledger.
    pub label: String,
    /// Unix seconds when the intent was recorded.
    pub created: u64,
    /// Address -> satoshis, one output each.
    pub outputs: Vec<(String, u64)>,
    /// The periods it pays: (contract, period, satoshis).
    pub items: Vec<(ContractId, u64, u64)>,
    /// Where it stands.
    pub state: BatchState,
}

/// Where a batch stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchState {
    /// Recorded; the wallet may or may not have sent it.
    Intent,
    /// Sent, with this txid.
    Sent(String),
    /// Never sent; its periods went back to due. Why.
    Abandoned(String),
}

/// What one call of [`Ledger::settle`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Nothing was due at or above the minimum payout.
    Nothing,
    /// An earlier batch may still be being sent; it is looked at again next time.
    Waiting,
    /// Paid, in one transaction.
    Paid {
        /// Its batch.
        batch: u64,
        /// Its txid.
        txid: String,
        /// Satoshis paid.
        sats: u64,
        /// Outputs (holders' addresses).
        payees: usize,
    },
}

/// Settlement settings.
#[derive(Clone, Copy, Debug)]
pub struct SettleRules {
    /// The smallest payout to one address; less is carried to the next settlement.
    pub min_payout: u64,
    /// Seconds a `sendmany` may still be running in the node after the
    /// intent was recorded: a batch younger than this is not abandoned.
    pub in_flight: u64,
}

/// The owner's ledger, in one redb file.
pub struct Ledger {
    db: Database,
    id: u64,
    /// True while a settlement runs: two at once could batch a period twice.
    settling: AtomicBool,
}

/// Clears the `settling` flag when a settlement ends, however it ends.
struct Settling<'a>(&'a AtomicBool);

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub(crate) fn period_key(id: &ContractId, period: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(id);
    k[16..].copy_from_slice(&period.to_be_bytes());
    k
}

fn placed_key(id: &ContractId, score: &Score) -> [u8; 48] {
    let mut k = [0u8; 48];
    k[..16].copy_from_slice(id);
    k[16..].copy_from_slice(&score.0);
    k
}

/// The contract and period a `periods` key names.
pub(crate) fn split_key(key: &[u8; 24]) -> (ContractId, u64) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&key[..16]);
    let mut period = [0u8; 8];
    period.copy_from_slice(&key[16..]);
    (id, u64::from_be_bytes(period))
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, MarketError> {
    postcard::to_allocvec(v).map_err(|e| MarketError::Store(format!("cannot encode: {e}")))
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8], what: &str) -> Result<T, MarketError> {
    postcard::from_bytes(b).map_err(|e| MarketError::Store(format!("a damaged {what} row: {e}")))
}

/// Stamps a new `meta` table with `version`, or refuses one that holds
/// another; `what` names the file in the error.
pub(crate) fn check_version(
    meta: &mut redb::Table<&str, u64>,
    version: u64,
    what: &str,
) -> Result<(), MarketError> {
    if let Some(v) = meta.get("version")?.map(|v| v.value())
        && v != version
    {
        return Err(MarketError::Store(format!(
            "{what} version {v} is not supported (this program reads {version})"
        )));
    }
    meta.insert("version", version)?;
    Ok(())
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, MarketError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        let id = {
            let mut meta = txn.open_table(META)?;
            check_version(&mut meta, LEDGER_VERSION, "ledger")?;
            let existing = meta.get("ledger_id")?.map(|v| v.value());
            match existing {
                Some(id) => id,
                None => {
                    // Labels must not repeat those of an earlier ledger on the
                    // same wallet (a recovered machine starts a new one).
                    let id = rand::random::<u64>();
                    meta.insert("ledger_id", id)?;
                    id
                }
            }
        };
        txn.open_table(CONTRACTS)?;
        txn.open_table(PERIODS)?;
        txn.open_table(BATCHES)?;
        txn.open_table(PLACED)?;
        txn.open_table(ENDED)?;
        txn.open_table(RATES)?;
        txn.commit()?;
        Ok(Ledger {
            db,
            id,
            settling: AtomicBool::new(false),
        })
    }

    /// Keeps a contract both sides signed.
    pub fn add_contract(&self, c: &Contract) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        txn.open_table(CONTRACTS)?
            .insert(c.terms.id, c.encode()?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Every contract kept.
    pub fn contracts(&self) -> Result<Vec<Contract>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(CONTRACTS)?.iter()? {
            let (_, v) = row?;
            out.push(Contract::decode(v.value())?);
        }
        Ok(out)
    }

    fn contracts_by_id(&self) -> Result<BTreeMap<ContractId, Contract>, MarketError> {
        Ok(self
            .contracts()?
            .into_iter()
            .map(|c| (c.terms.id, c))
            .collect())
    }

    fn contract(&self, id: &ContractId) -> Result<Contract, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CONTRACTS)?;
        let row = t
            .get(id)?
            .ok_or_else(|| MarketError::Store(format!("no contract {}", hex(id))))?;
        Contract::decode(row.value())
    }

    /// Ends contract `id` at Unix time `at`: no new blocks go to its holder.
    /// Periods already proven are still paid.
    pub fn end_contract(&self, id: &ContractId, at: u64, why: &str) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(ENDED)?;
            if t.get(id)?.is_none() {
                t.insert(id, enc(&(at, why.to_owned()))?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Contracts ended, with when and why.
    pub fn ended(&self) -> Result<BTreeMap<ContractId, (u64, String)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = BTreeMap::new();
        for row in txn.open_table(ENDED)?.iter()? {
            let (k, v) = row?;
            out.insert(k.value(), dec(v.value(), "ended contract")?);
        }
        Ok(out)
    }

    /// Records blocks placed on contracts' holders: (contract, score, length).
    pub fn add_placed(&self, items: &[(ContractId, Score, u64)]) -> Result<(), MarketError> {
        if items.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(PLACED)?;
            for (id, score, len) in items {
                t.insert(placed_key(id, score), len)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The blocks recorded as placed under contract `id`, with their lengths.
    pub fn placed(&self, id: &ContractId) -> Result<Vec<(Score, u64)>, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PLACED)?;
        let mut out = Vec::new();
        let range = placed_key(id, &Score([0; 32]))..=placed_key(id, &Score([0xff; 32]));
        for row in t.range(range)? {
            let (k, v) = row?;
            let mut score = [0u8; 32];
            score.copy_from_slice(&k.value()[16..]);
            out.push((Score(score), v.value()));
        }
        Ok(out)
    }

    /// Forgets blocks the holder of contract `id` no longer keeps for us.
    pub fn forget_placed(&self, id: &ContractId, scores: &[Score]) -> Result<(), MarketError> {
        if scores.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(PLACED)?;
            for s in scores {
                t.remove(placed_key(id, s))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records a challenge of contract `id` at Unix time `at`, and the bytes
    /// the holder held for it then.
    pub fn record_challenge(
        &self,
        id: &ContractId,
        at: u64,
        passed: bool,
        bytes: u64,
    ) -> Result<(), MarketError> {
        let c = self.contract(id)?;
        let Some(period) = c.terms.period_at(at) else {
            return Err(MarketError::Invalid(format!(
                "a challenge before contract {} began",
                hex(id)
            )));
        };
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(PERIODS)?;
            let key = period_key(id, period);
            let mut row = match t.get(&key)? {
                Some(v) => dec::<PeriodRow>(v.value(), "period")?,
                None => PeriodRow {
                    bytes: 0,
                    passed: 0,
                    failed: 0,
                    state: PeriodState::Open,
                },
            };
            if row.state != PeriodState::Open {
                // A late answer for a period already closed changes nothing.
                return Ok(());
            }
            if passed {
                row.passed += 1;
            } else {
                row.failed += 1;
            }
            row.bytes = row.bytes.max(bytes);
            t.insert(&key, enc(&row)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Records that contract `id`'s period at Unix time `at` is paid at no
    /// more than `rate` satoshis per GiB (floating pricing).
    pub fn record_rate(&self, id: &ContractId, at: u64, rate: u64) -> Result<(), MarketError> {
        let c = self.contract(id)?;
        let Some(period) = c.terms.period_at(at) else {
            return Ok(());
        };
        let key = period_key(id, period);
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(RATES)?;
            let old = t.get(&key)?.map(|v| v.value());
            if old.is_none_or(|o| rate < o) {
                t.insert(&key, rate)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Closes every open period that has ended by `now`: due if every
    /// challenge in it passed (and at least one was made), else unpaid.
    pub fn close_periods(&self, now: u64) -> Result<usize, MarketError> {
        let contracts = self.contracts_by_id()?;
        let txn = self.db.begin_write()?;
        let mut closed = 0;
        {
            let rates = txn.open_table(RATES)?;
            let mut t = txn.open_table(PERIODS)?;
            let mut changes = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let key = k.value();
                let mut p: PeriodRow = dec(v.value(), "period")?;
                if p.state != PeriodState::Open {
                    continue;
                }
                let (id, period) = split_key(&key);
                let Some(c) = contracts.get(&id) else {
                    return Err(MarketError::Store(format!(
                        "a period of unknown contract {}",
                        hex(&id)
                    )));
                };
                if c.terms.period_end(period) > now {
                    continue;
                }
                let due = match rates.get(&key)? {
                    Some(rate) => c.terms.due_at(rate.value(), p.bytes),
                    None => c.terms.due(p.bytes),
                };
                p.state = if p.failed == 0 && p.passed > 0 && due > 0 {
                    PeriodState::Due(due)
                } else {
                    PeriodState::Unpaid
                };
                changes.push((key, p));
            }
            for (key, p) in changes {
                t.insert(&key, enc(&p)?.as_slice())?;
                closed += 1;
            }
        }
        txn.commit()?;
        Ok(closed)
    }

    /// Every period kept, by contract and period.
    pub fn periods(&self) -> Result<Vec<(ContractId, u64, PeriodRow)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(PERIODS)?.iter()? {
            let (k, v) = row?;
            let (id, period) = split_key(&k.value());
            out.push((id, period, dec(v.value(), "period")?));
        }
        Ok(out)
    }

    /// Every batch, oldest first.
    pub fn batches(&self) -> Result<Vec<(u64, Batch)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(BATCHES)?.iter()? {
            let (k, v) = row?;
            out.push((k.value(), dec(v.value(), "batch")?));
        }
        Ok(out)
    }

    /// The highest batch whose holders were told of it (or that needs no
    /// telling): batches are told in order.
    pub fn notified_through(&self) -> Result<u64, MarketError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("notified_through")?.map_or(0, |v| v.value()))
    }

    /// Records that every batch up to `n` was told.
    pub fn set_notified_through(&self, n: u64) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("notified_through", n)?;
        txn.commit()?;
        Ok(())
    }

    /// Batch `n`, if there is one.
    pub fn batch(&self, n: u64) -> Result<Option<Batch>, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(BATCHES)?;
        t.get(n)?.map(|v| dec(v.value(), "batch")).transpose()
    }

    /// Settles an open batch: `Sent(txid)` or `Abandoned(why)`, and its
    /// periods with it.
    fn finish_batch(&self, n: u64, state: BatchState) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        {
            let mut batches = txn.open_table(BATCHES)?;
            let mut b: Batch = match batches.get(n)? {
                Some(v) => dec(v.value(), "batch")?,
                None => return Err(MarketError::Store(format!("no batch {n}"))),
            };
            if b.state != BatchState::Intent {
                return Err(MarketError::Store(format!("batch {n} is already settled")));
            }
            let mut periods = txn.open_table(PERIODS)?;
            for (id, period, sats) in &b.items {
                let key = period_key(id, *period);
                let mut p: PeriodRow = match periods.get(&key)? {
                    Some(v) => dec(v.value(), "period")?,
                    None => {
                        return Err(MarketError::Store(format!(
                            "batch {n} pays a missing period"
                        )));
                    }
                };
                p.state = match state {
                    BatchState::Sent(_) => PeriodState::Paid {
                        batch: n,
                        sats: *sats,
                    },
                    _ => PeriodState::Due(*sats),
                };
                periods.insert(&key, enc(&p)?.as_slice())?;
            }
            b.state = state;
            batches.insert(n, enc(&b)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Looks up every batch left in `Intent`: paid (the wallet has its
    /// label) or abandoned (the wallet has none, and no call of it can
    /// still be running). Returns how many remain undecided.
    pub async fn reconcile<P: Payments>(
        &self,
        wallet: &P,
        now: u64,
        rules: SettleRules,
    ) -> Result<usize, MarketError> {
        let mut undecided = 0;
        let open: Vec<(u64, Batch)> = self
            .batches()?
            .into_iter()
            .filter(|(_, b)| b.state == BatchState::Intent)
            .collect();
        for (n, b) in open {
            // Transactions already recorded for other batches cannot be this one's.
            let known: HashSet<String> = self
                .batches()?
                .into_iter()
                .filter_map(|(_, b)| match b.state {
                    BatchState::Sent(txid) => Some(txid),
                    _ => None,
                })
                .collect();
            // The wallet's clock may differ from ours: look back a day more.
            match wallet
                .find_sent(
                    &b.label,
                    &b.outputs,
                    b.created.saturating_sub(86_400),
                    &known,
                )
                .await?
            {
                Some(tx) => {
                    info!(batch = n, txid = %tx.txid, "an interrupted settlement had been sent");
                    self.finish_batch(n, BatchState::Sent(tx.txid))?;
                }
                None if now >= b.created.saturating_add(rules.in_flight) => {
                    info!(
                        batch = n,
                        "an interrupted settlement was never sent; its periods are due again"
                    );
                    self.finish_batch(
                        n,
                        BatchState::Abandoned("not in the wallet after an interruption".into()),
                    )?;
                }
                None => undecided += 1,
            }
        }
        Ok(undecided)
    }

    /// Closes ended periods, reconciles interrupted batches, and pays what
    /// is due in one transaction.
    pub async fn settle<P: Payments>(
        &self,
        wallet: &P,
        now: u64,
        rules: SettleRules,
    ) -> Result<Settlement, MarketError> {
        self.settle_within(wallet, now, rules, &mut |_, _| true)
            .await
    }

    /// [`Ledger::settle`], paying only the due periods `fits` admits: it is
    /// asked of each (its contract, satoshis), oldest first within a
    /// contract, and may keep count (a mediator pays each client's periods
    /// while its escrow covers them). A period it turns down stays due.
    pub async fn settle_within<P: Payments>(
        &self,
        wallet: &P,
        now: u64,
        rules: SettleRules,
        fits: &mut (dyn FnMut(&Contract, u64) -> bool + Send),
    ) -> Result<Settlement, MarketError> {
        if self.settling.swap(true, Ordering::AcqRel) {
            return Ok(Settlement::Waiting);
        }
        let _settling = Settling(&self.settling);
        self.close_periods(now)?;
        if self.reconcile(wallet, now, rules).await? > 0 {
            return Ok(Settlement::Waiting);
        }
        let contracts = self.contracts_by_id()?;
        // What is due, by address.
        let mut by_address: BTreeMap<String, Vec<(ContractId, u64, u64)>> = BTreeMap::new();
        for (id, period, row) in self.periods()? {
            if let PeriodState::Due(sats) = row.state {
                let c = contracts.get(&id).ok_or_else(|| {
                    MarketError::Store(format!("a period of unknown contract {}", hex(&id)))
                })?;
                if !fits(c, sats) {
                    continue;
                }
                by_address
                    .entry(c.terms.payout.clone())
                    .or_default()
                    .push((id, period, sats));
            }
        }
        let mut outputs = Vec::new();
        let mut items = Vec::new();
        for (address, due) in by_address {
            // Dues wait up to min_payout, and never beyond what a contract
            // paid at this address lets the owner carry.
            let threshold = due
                .iter()
                .filter_map(|(id, _, _)| contracts.get(id).map(|c| c.terms.carry))
                .fold(rules.min_payout, u64::min);
            let sum = due.iter().try_fold(0u64, |a, (_, _, s)| a.checked_add(*s));
            let Some(sum) = sum.filter(|s| *s <= MAX_PAYOUT) else {
                warn!(%address, "dues over 21 million coins are not paid");
                continue;
            };
            if sum < threshold.max(1) {
                continue;
            }
            // One address the node cannot pay must not hold up the others.
            if !wallet.validate_address(&address).await? {
                warn!(%address, "a holder's payout address is not valid for this node; its dues wait");
                continue;
            }
            outputs.push((address, sum));
            items.extend(due);
        }
        if outputs.is_empty() {
            return Ok(Settlement::Nothing);
        }
        let total: u64 = outputs.iter().map(|(_, s)| s).sum();
        let payees = outputs.len();

        // 1. The intent, durable before anything is sent.
        let txn = self.db.begin_write()?;
        let (n, label) = {
            let mut meta = txn.open_table(META)?;
            let n = meta.get("next_batch")?.map_or(1, |v| v.value());
            meta.insert("next_batch", n + 1)?;
            let label = format!("fincrypt settlement {:016x}-{n}", self.id);
            let mut periods = txn.open_table(PERIODS)?;
            for (id, period, sats) in &items {
                let key = period_key(id, *period);
                let mut p: PeriodRow = match periods.get(&key)? {
                    Some(v) => dec(v.value(), "period")?,
                    None => return Err(MarketError::Store("a due period vanished".into())),
                };
                if p.state != PeriodState::Due(*sats) {
                    // Dropping the transaction records no intent.
                    return Err(MarketError::Store(format!(
                        "period {period} of contract {} is no longer due",
                        hex(id)
                    )));
                }
                p.state = PeriodState::Batched {
                    batch: n,
                    sats: *sats,
                };
                periods.insert(&key, enc(&p)?.as_slice())?;
            }
            let batch = Batch {
                label: label.clone(),
                created: now,
                outputs: outputs.clone(),
                items,
                state: BatchState::Intent,
            };
            txn.open_table(BATCHES)?
                .insert(n, enc(&batch)?.as_slice())?;
            (n, label)
        };
        txn.commit()?;

        // 2. One transaction for every payee; 3. its txid.
        match wallet.send_many(&outputs, &label).await {
            Ok(txid) => {
                self.finish_batch(n, BatchState::Sent(txid.clone()))?;
                info!(batch = n, %txid, sats = total, payees, "settled");
                Ok(Settlement::Paid {
                    batch: n,
                    txid,
                    sats: total,
                    payees,
                })
            }
            Err(e) if e.is_refusal() => {
                warn!(batch = n, error = %e, "the wallet refused a settlement; it is tried again next time");
                self.finish_batch(n, BatchState::Abandoned(e.to_string()))?;
                Err(e.into())
            }
            // It may have been sent: reconciled before anything else is paid.
            Err(e) => Err(e.into()),
        }
    }

    /// What every period in the ledger comes to, in one read.
    pub fn summary(&self) -> Result<Summary, MarketError> {
        let contracts = self.contracts_by_id()?;
        let mut last: BTreeMap<ContractId, u64> = BTreeMap::new();
        let mut sum = Summary::default();
        for (id, _, row) in self.periods()? {
            // Periods come in order, so the last row is the newest.
            last.insert(id, row.bytes);
            match row.state {
                PeriodState::Due(s) | PeriodState::Batched { sats: s, .. } => sum.owed += s,
                PeriodState::Paid { sats, .. } => sum.paid += sats,
                PeriodState::Open | PeriodState::Unpaid => {}
            }
        }
        sum.cost_per_period = last
            .iter()
            .filter_map(|(id, bytes)| contracts.get(id).map(|c| c.terms.due(*bytes)))
            .sum();
        Ok(sum)
    }

    /// Satoshis one period of every contract costs at the bytes last
    /// reported for it.
    pub fn cost_per_period(&self) -> Result<u64, MarketError> {
        Ok(self.summary()?.cost_per_period)
    }

    /// Satoshis owed and not yet in a sent transaction.
    pub fn owed(&self) -> Result<u64, MarketError> {
        Ok(self.summary()?.owed)
    }
}

/// What the periods of a ledger come to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Satoshis one period of every contract costs at the bytes last reported.
    pub cost_per_period: u64,
    /// Satoshis owed and not yet in a sent transaction.
    pub owed: u64,
    /// Satoshis paid in sent transactions.
    pub paid: u64,
}

/// How many periods `balance` pays for at `cost` each (all of them when nothing costs).
pub fn funded_periods(balance: u64, cost: u64) -> u64 {
    balance.checked_div(cost).unwrap_or(u64::MAX)
}

/// Hex of a contract id, for messages.
pub fn hex(id: &ContractId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
