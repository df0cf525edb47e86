//! A storage node's side of the market: it signs its offer, accepts the
//! contracts that meet its terms and keeps them, tells its holder who may
//! place blocks (anyone, when it is free; owners with a contract that pay,
//! when it charges), and keeps account of what each owner owes.
//!
//! Dues, as the node sees them: at each review it samples the bytes it
//! holds for each owner, and a period's dues are the contract's price for
//! the fewest bytes seen in it. A period is paid when an owner's notice
//! names it, the node's wallet shows that transaction paying its address
//! what the notices say, confirmed, and the sum is at least half the
//! period's dues by the node's count (the owner counts the bytes it placed
//! under the contract, which may be fewer). Counting from the owner's last
//! paid period, once the dues of
//! the periods since reach the contract's `carry`, each further period
//! that ends without payment, after one period of grace to settle, is one
//! unpaid period (periods the node did not see, being down, do not count).
//! At `unpaid_periods` of them the owner is cut: it may
//! place nothing new, and it is told why. A payment ends the cut. An owner
//! still cut `min_duration` periods later has its blocks released (those it
//! placed itself; other devices' placements stay), and the contract is over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fincrypt_net::{ErrorCode, PeerId, Terms};
use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::MarketError;
use crate::contract::{Contract, ContractId, Proposal};
use crate::ledger::{period_key, split_key};
use crate::notice::PaidNotice;
use crate::offer::{OFFER_VERSION, Offer, check_address};
use crate::owner::ContractView;

/// Contracts this node holds under, by id: the encoded contract.
const HELD: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("held_contracts");
/// (contract id, period big-endian) -> postcard (txid, satoshis): what the
/// owner said it paid; the wallet says whether it did.
const NOTICES: TableDefinition<[u8; 24], &[u8]> = TableDefinition::new("paid_notices");
/// (contract id, period big-endian) -> the fewest bytes held for the
/// owner seen in the period. Rows before the last paid period are dropped.
const SAMPLES: TableDefinition<[u8; 24], u64> = TableDefinition::new("held_samples");
/// Contract id -> postcard [`Standing`], for an owner behind in payment.
const STANDING: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("standing");
/// Txid -> the contract whose notices named it first: a transaction pays
/// the contracts of that contract's payer, so no other payer can claim it.
const NOTICE_TXIDS: TableDefinition<&str, [u8; 16]> = TableDefinition::new("notice_txids");
/// Txid -> satoshis it paid the payout address, once the wallet showed it
/// confirmed: each named transaction is looked up until it is.
const VERIFIED: TableDefinition<&str, u64> = TableDefinition::new("verified_payments");
/// How long an offer holds: owners ask again for the ones they use.
pub const OFFER_LIFETIME: u64 = 3600;
/// How far from now a contract may say it starts.
const START_SLACK: u64 = 86_400;
/// The most contracts a node keeps (each costs a durable write to take).
pub const MAX_CONTRACTS: usize = 100_000;

/// What a storage node asks.
#[derive(Clone, Debug)]
pub struct Asking {
    /// Satoshis per GiB per period; 0 is free.
    pub price: u64,
    /// The fewest periods a contract may last.
    pub min_duration: u32,
    /// The period its price is for, in seconds: a contract must use it.
    pub period: u64,
    /// Where it is paid.
    pub payout: String,
    /// Satoshis an owner may leave unpaid for a later settlement.
    pub carry: u64,
    /// Periods unpaid beyond `carry` before an owner is cut (at least 1).
    pub unpaid_periods: u64,
    /// The lowest price it takes from a payer whose pricing floats (at most
    /// `price`): its dues are counted at no more than this rate.
    pub floor: u64,
}

/// An owner behind in payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standing {
    /// It places nothing new since period `since`; its blocks go at period
    /// `release_at` unless it pays first. `unpaid`: periods unpaid, as last counted.
    Cut {
        since: u64,
        release_at: u64,
        unpaid: u64,
    },
    /// Its blocks are being released: no payment stops it now (kept
    /// durably first, so a release a crash cut short is finished).
    Releasing { since: u64 },
    /// Its blocks were released at Unix time `at`: the contract is over.
    Released { at: u64, blocks: u64, bytes: u64 },
}

/// One contract's account, as this node keeps it.
#[derive(Clone, Debug)]
pub struct Account {
    pub contract: Contract,
    /// Periods the owner said it paid and the wallet shows paid, and their sum.
    pub periods_paid: u64,
    pub paid_sats: u64,
    /// Periods the owner said it paid that the wallet does not show (yet).
    pub unseen: u64,
    /// Dues of the periods ended since the last paid one.
    pub owed_sats: u64,
    /// Periods unpaid beyond the carry (see the module documentation).
    pub unpaid: u64,
    /// The last period paid, if any.
    pub last_paid: Option<u64>,
    /// Bytes held for the owner as last sampled.
    pub held: u64,
    pub standing: Option<Standing>,
}

/// One ended period, as a holder sees it: its dues, and whether it was paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owed {
    pub period: u64,
    pub due: u64,
    pub paid: bool,
    /// The node saw the period (it has a sample of it).
    pub sampled: bool,
}

/// Periods unpaid beyond `carry` up to period `settled_by`, the last the
/// owner has had time to pay: counted from the first period at which the
/// dues since the last paid period (of any) reach `carry`. `periods` in order.
pub fn unpaid_periods(periods: &[Owed], settled_by: u64, carry: u64) -> u64 {
    let mut since_paid = 0u64;
    let mut overdue_from = None;
    for o in periods {
        if o.paid {
            since_paid = 0;
            overdue_from = None;
            continue;
        }
        if o.period > settled_by || !o.sampled {
            continue;
        }
        since_paid = since_paid.saturating_add(o.due);
        if overdue_from.is_none() && since_paid >= carry.max(1) {
            overdue_from = Some(o.period);
        }
    }
    let Some(from) = overdue_from else {
        return 0;
    };
    periods
        .iter()
        .filter(|o| o.sampled && !o.paid && (from..=settled_by).contains(&o.period))
        .count() as u64
}

/// A storage node's terms and the contracts it took (in `DATA/contracts.redb`).
pub struct HolderTerms {
    keypair: Keypair,
    asking: Asking,
    db: Database,
    /// Owners with a contract that is not over.
    owners: RwLock<HashSet<PeerId>>,
    /// Owners cut for not paying, with the periods they are behind.
    cut: RwLock<HashMap<PeerId, u64>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl HolderTerms {
    /// The node with `keypair` asking `asking`, its contracts kept at `path`.
    pub fn open(keypair: Keypair, asking: Asking, path: &Path) -> Result<HolderTerms, MarketError> {
        check_address(&asking.payout, asking.price > 0)?;
        if asking.period == 0 {
            return Err(MarketError::Invalid("a period of 0 seconds".into()));
        }
        if asking.unpaid_periods == 0 {
            return Err(MarketError::Invalid(
                "unpaid_periods is 0: an owner needs a period to pay".into(),
            ));
        }
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(HELD)?;
        txn.open_table(NOTICES)?;
        txn.open_table(SAMPLES)?;
        txn.open_table(STANDING)?;
        txn.open_table(NOTICE_TXIDS)?;
        txn.open_table(VERIFIED)?;
        txn.commit()?;
        let terms = HolderTerms {
            keypair,
            asking,
            db,
            owners: RwLock::new(HashSet::new()),
            cut: RwLock::new(HashMap::new()),
        };
        let standing = terms.standing()?;
        let (mut owners, mut cut) = (HashSet::new(), HashMap::new());
        for c in terms.contracts()? {
            let owner = c.terms.owner()?;
            match standing.get(&c.terms.id) {
                Some(Standing::Released { .. }) => continue,
                Some(Standing::Cut { unpaid, .. }) => {
                    cut.insert(owner, *unpaid);
                }
                Some(Standing::Releasing { .. }) => {
                    cut.insert(owner, 0);
                }
                None => {}
            }
            owners.insert(owner);
        }
        *terms.owners.write().unwrap_or_else(|p| p.into_inner()) = owners;
        *terms.cut.write().unwrap_or_else(|p| p.into_inner()) = cut;
        Ok(terms)
    }

    /// Contracts not over (released ones are).
    pub fn live_contracts(&self) -> u64 {
        self.owners.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    /// Transactions owners' notices name that the wallet has not shown
    /// confirmed yet, those of the latest periods first, at most `limit`.
    pub fn unverified(&self, limit: usize) -> Result<Vec<String>, MarketError> {
        let txn = self.db.begin_read()?;
        let verified = txn.open_table(VERIFIED)?;
        let mut named: Vec<(u64, String)> = Vec::new();
        for (_, period, txid, _) in self.notices()? {
            if verified.get(txid.as_str())?.is_none() {
                named.push((period, txid));
            }
        }
        named.sort_unstable_by(|a, b| b.cmp(a));
        let mut seen = HashSet::new();
        Ok(named
            .into_iter()
            .filter(|(_, t)| seen.insert(t.clone()))
            .take(limit)
            .map(|(_, t)| t)
            .collect())
    }

    /// Records that the wallet shows `txid` confirmed, paying `sats` to
    /// this node's address.
    pub fn verify(&self, txid: &str, sats: u64) -> Result<(), MarketError> {
        let txn = self.db.begin_write()?;
        txn.open_table(VERIFIED)?.insert(txid, sats)?;
        txn.commit()?;
        Ok(())
    }

    /// Every payment the wallet showed confirmed: txid -> satoshis.
    pub fn verified(&self) -> Result<HashMap<String, u64>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = HashMap::new();
        for row in txn.open_table(VERIFIED)?.iter()? {
            let (k, v) = row?;
            out.insert(k.value().to_owned(), v.value());
        }
        Ok(out)
    }

    /// Owners behind in payment, by contract.
    fn standing(&self) -> Result<HashMap<ContractId, Standing>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = HashMap::new();
        for row in txn.open_table(STANDING)?.iter()? {
            let (k, v) = row?;
            let s: Standing = postcard::from_bytes(v.value())
                .map_err(|e| MarketError::Store(format!("a damaged standing row: {e}")))?;
            out.insert(k.value(), s);
        }
        Ok(out)
    }

    /// Each contract's account, with `received`: what this node's wallet
    /// shows each transaction paying its address, by txid.
    pub fn accounts(
        &self,
        received: &HashMap<String, u64>,
        now: u64,
    ) -> Result<Vec<Account>, MarketError> {
        let notices = self.notices()?;
        let mut claimed: HashMap<&str, u64> = HashMap::new();
        for (_, _, txid, sats) in &notices {
            let c = claimed.entry(txid.as_str()).or_default();
            *c = c.saturating_add(*sats);
        }
        let samples = self.samples()?;
        let standing = self.standing()?;
        let mut out = Vec::new();
        for c in self.contracts()? {
            let id = c.terms.id;
            let mut a = Account {
                contract: c,
                periods_paid: 0,
                paid_sats: 0,
                unseen: 0,
                owed_sats: 0,
                unpaid: 0,
                last_paid: None,
                held: 0,
                standing: standing.get(&id).copied(),
            };
            let current = a.contract.terms.period_at(now);
            // Period -> (dues by the node's count, if it saw the period;
            // satoshis paid for it, as the wallet confirms).
            let mut periods: BTreeMap<u64, (Option<u64>, u64)> = BTreeMap::new();
            if let Some(rows) = samples.get(&id) {
                // Rows come in period order.
                a.held = rows.last().map_or(0, |(_, b)| *b);
                for (period, bytes) in rows {
                    if current.is_some_and(|p| *period < p) {
                        // At its floor: a floating payer may pay no more.
                        let due = a.contract.terms.due_at(self.asking.floor, *bytes);
                        periods.entry(*period).or_default().0 = Some(due);
                    }
                }
            }
            for (_, period, txid, sats) in notices.iter().filter(|n| n.0 == id) {
                let got = received.get(txid.as_str()).copied().unwrap_or(0);
                if got >= claimed[txid.as_str()] {
                    a.periods_paid += 1;
                    a.paid_sats = a.paid_sats.saturating_add(*sats);
                    let e = periods.entry(*period).or_default();
                    e.1 = e.1.saturating_add(*sats);
                } else {
                    a.unseen += 1;
                }
            }
            let owed: Vec<Owed> = periods
                .into_iter()
                .map(|(period, (due, paid))| Owed {
                    period,
                    due: due.unwrap_or(0),
                    // At least half what the node counts: the owner may
                    // count fewer bytes, never a token amount.
                    paid: paid > 0 && paid.saturating_mul(2) >= due.unwrap_or(0),
                    sampled: due.is_some(),
                })
                .collect();
            a.last_paid = owed.iter().filter(|o| o.paid).map(|o| o.period).max();
            a.owed_sats = owed
                .iter()
                .filter(|o| a.last_paid.is_none_or(|l| o.period > l) && !o.paid)
                .map(|o| o.due)
                .fold(0, u64::saturating_add);
            // One period's grace after a period ends, to settle it.
            if let Some(settled_by) = current.and_then(|p| p.checked_sub(2)) {
                a.unpaid = unpaid_periods(&owed, settled_by, a.contract.terms.carry);
            }
            out.push(a);
        }
        Ok(out)
    }

    /// The bytes held for each contract's owner, sampled by period.
    fn samples(&self) -> Result<HashMap<ContractId, Vec<(u64, u64)>>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out: HashMap<ContractId, Vec<(u64, u64)>> = HashMap::new();
        for row in txn.open_table(SAMPLES)?.iter()? {
            let (k, v) = row?;
            let (id, period) = split_key(&k.value());
            out.entry(id).or_default().push((period, v.value()));
        }
        Ok(out)
    }

    /// Takes account of each owner: samples what this node holds for it
    /// (`held`: bytes by placer), counts its unpaid periods with `received`
    /// (as [`HolderTerms::accounts`]), and cuts, restores or marks for
    /// release. Returns the owners whose blocks are to be released now; the
    /// caller releases them and then calls [`HolderTerms::released`].
    pub fn review(
        &self,
        held: &HashMap<PeerId, u64>,
        received: &HashMap<String, u64>,
        now: u64,
    ) -> Result<Vec<(ContractId, PeerId)>, MarketError> {
        let standing = self.standing()?;
        let contracts = self.contracts()?;
        let txn = self.db.begin_write()?;
        {
            let mut samples = txn.open_table(SAMPLES)?;
            for c in &contracts {
                if matches!(standing.get(&c.terms.id), Some(Standing::Released { .. })) {
                    continue;
                }
                let Some(period) = c.terms.period_at(now) else {
                    continue;
                };
                let bytes = held.get(&c.terms.owner()?).copied().unwrap_or(0);
                let key = period_key(&c.terms.id, period);
                let least = samples.get(key)?.map_or(bytes, |v| v.value().min(bytes));
                samples.insert(key, least)?;
            }
        }
        txn.commit()?;

        let accounts = self.accounts(received, now)?;
        let mut release = Vec::new();
        let mut cut = HashMap::new();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(STANDING)?;
            let mut samples = txn.open_table(SAMPLES)?;
            for a in &accounts {
                let t = &a.contract.terms;
                let owner = t.owner()?;
                let Some(current) = t.period_at(now) else {
                    continue;
                };
                if let Some(last) = a.last_paid {
                    // What came before the last payment no longer counts.
                    samples
                        .retain_in(period_key(&t.id, 0)..period_key(&t.id, last), |_, _| false)?;
                }
                let behind = a.unpaid >= self.asking.unpaid_periods;
                let next = match (a.standing, behind) {
                    (Some(Standing::Released { .. }), _) => continue,
                    (Some(Standing::Releasing { since }), _) => {
                        release.push((t.id, owner));
                        Some(Standing::Releasing { since })
                    }
                    (None, false) => None,
                    (None, true) => {
                        let release_at = current.saturating_add(u64::from(t.min_duration.max(1)));
                        warn!(
                            %owner, unpaid = a.unpaid, owed_sats = a.owed_sats, release_at,
                            "an owner is behind in payment: it may place nothing new here, and \
                             its blocks are released at the period shown unless it pays"
                        );
                        Some(Standing::Cut {
                            since: current,
                            release_at,
                            unpaid: a.unpaid,
                        })
                    }
                    (Some(Standing::Cut { .. }), false) => {
                        info!(%owner, "an owner paid: it may place here again");
                        None
                    }
                    (Some(Standing::Cut { release_at, .. }), true) if current >= release_at => {
                        release.push((t.id, owner));
                        Some(Standing::Releasing { since: current })
                    }
                    (
                        Some(Standing::Cut {
                            since, release_at, ..
                        }),
                        true,
                    ) => Some(Standing::Cut {
                        since,
                        release_at,
                        unpaid: a.unpaid,
                    }),
                };
                match next {
                    Some(s) => {
                        let row = postcard::to_allocvec(&s)
                            .map_err(|e| MarketError::Store(e.to_string()))?;
                        table.insert(t.id, row.as_slice())?;
                        match s {
                            Standing::Cut { unpaid, .. } => {
                                cut.insert(owner, unpaid);
                            }
                            Standing::Releasing { .. } => {
                                cut.insert(owner, a.unpaid);
                            }
                            Standing::Released { .. } => {}
                        }
                    }
                    None => {
                        table.remove(t.id)?;
                    }
                }
            }
        }
        txn.commit()?;
        *self.cut.write().unwrap_or_else(|p| p.into_inner()) = cut;
        Ok(release)
    }

    /// Records that the blocks of contract `id`'s owner were released: the
    /// contract is over, and the owner needs a new one to place here.
    pub fn released(&self, id: &ContractId, blocks: u64, bytes: u64) -> Result<(), MarketError> {
        let c = self.contract(id)?;
        let row = postcard::to_allocvec(&Standing::Released {
            at: now(),
            blocks,
            bytes,
        })
        .map_err(|e| MarketError::Store(e.to_string()))?;
        let txn = self.db.begin_write()?;
        {
            txn.open_table(STANDING)?.insert(id, row.as_slice())?;
            let mut samples = txn.open_table(SAMPLES)?;
            samples.retain_in(period_key(id, 0)..=period_key(id, u64::MAX), |_, _| false)?;
        }
        txn.commit()?;
        let owner = c.terms.owner()?;
        self.owners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&owner);
        self.cut
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&owner);
        warn!(%owner, blocks, bytes, "released the blocks of an owner that did not pay");
        Ok(())
    }

    fn contract(&self, id: &ContractId) -> Result<Contract, MarketError> {
        let txn = self.db.begin_read()?;
        match txn.open_table(HELD)?.get(id)? {
            Some(v) => Contract::decode(v.value()),
            None => Err(MarketError::Store("no such contract".into())),
        }
    }

    /// Each contract for `fincryptctl market contracts`, with `received`
    /// as for [`HolderTerms::accounts`].
    pub fn views(
        &self,
        received: &HashMap<String, u64>,
        now: u64,
    ) -> Result<Vec<ContractView>, MarketError> {
        Ok(self
            .accounts(received, now)?
            .into_iter()
            .map(|a| {
                let state = match a.standing {
                    None => "active".to_string(),
                    Some(Standing::Cut { release_at, .. }) => format!(
                        "cut: no new blocks until the owner pays; released at period {release_at}"
                    ),
                    Some(Standing::Releasing { .. }) => {
                        "releasing: the owner's blocks are being let go unpaid".to_string()
                    }
                    Some(Standing::Released { blocks, bytes, .. }) => {
                        format!("released: {blocks} blocks ({bytes} bytes) let go unpaid")
                    }
                };
                let mut v = ContractView::of(&a.contract, state);
                v.bytes = a.held;
                v.periods_paid = a.periods_paid;
                v.paid_sats = a.paid_sats;
                v.periods_unpaid = a.unpaid;
                v.owed_sats = a.owed_sats;
                if a.unseen > 0 {
                    v.state.push_str(&format!(
                        "; {} periods the owner says it paid are not in this node's wallet (yet)",
                        a.unseen
                    ));
                }
                v
            })
            .collect())
    }

    /// Every contract this node took.
    pub fn contracts(&self) -> Result<Vec<Contract>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(HELD)?.iter()? {
            let (_, v) = row?;
            out.push(Contract::decode(v.value())?);
        }
        Ok(out)
    }

    /// What owners said they paid: (contract, period, txid, satoshis).
    pub fn notices(&self) -> Result<Vec<(ContractId, u64, String, u64)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(NOTICES)?.iter()? {
            let (k, v) = row?;
            let key = k.value();
            let (id, period) = split_key(&key);
            let (txid, sats): (String, u64) = postcard::from_bytes(v.value())
                .map_err(|e| MarketError::Store(format!("a damaged notice row: {e}")))?;
            out.push((id, period, txid, sats));
        }
        Ok(out)
    }

    /// Keeps `peer`'s notice of a payment under one of its contracts here,
    /// for periods that have begun.
    fn note(&self, peer: &PeerId, bytes: &[u8]) -> Result<(), MarketError> {
        let n = PaidNotice::decode(bytes)?;
        let txn = self.db.begin_write()?;
        {
            let held = txn.open_table(HELD)?;
            let c = match held.get(n.contract)? {
                Some(v) => Contract::decode(v.value())?,
                None => return Err(MarketError::Invalid("no such contract here".into())),
            };
            if c.terms.payer()? != *peer {
                return Err(MarketError::Invalid(
                    "a payment is told by the node that pays the contract".into(),
                ));
            }
            let Some(current) = c.terms.period_at(now()) else {
                return Err(MarketError::Invalid("the contract has not begun".into()));
            };
            {
                // A transaction pays the contracts of one payer: the
                // first to name it (a mediator pays all its clients'
                // contracts here in one).
                let mut txids = txn.open_table(NOTICE_TXIDS)?;
                let named = txids.get(n.txid.as_str())?.map(|v| v.value());
                match named {
                    Some(other) if other != n.contract => {
                        let first = match held.get(other)? {
                            Some(v) => Contract::decode(v.value())?.terms.payer()?,
                            None => {
                                return Err(MarketError::Store(
                                    "a txid names a contract not kept".into(),
                                ));
                            }
                        };
                        if first != *peer {
                            warn!(payer = %peer, txid = %n.txid, "a notice names a transaction another payer named first");
                            return Err(MarketError::Invalid(
                                "another payer's notices named this transaction".into(),
                            ));
                        }
                    }
                    Some(_) => {}
                    None => {
                        txids.insert(n.txid.as_str(), n.contract)?;
                    }
                }
            }
            let mut t = txn.open_table(NOTICES)?;
            for (period, sats) in &n.items {
                if *period > current {
                    return Err(MarketError::Invalid(format!(
                        "period {period} has not begun"
                    )));
                }
                if *sats == 0 {
                    return Err(MarketError::Invalid(format!(
                        "a notice pays period {period} nothing"
                    )));
                }
                let key = period_key(&n.contract, *period);
                let row = postcard::to_allocvec(&(n.txid.as_str(), *sats))
                    .map_err(|e| MarketError::Store(e.to_string()))?;
                t.insert(key, row.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// What the node asks.
    pub fn asking(&self) -> &Asking {
        &self.asking
    }

    fn accept(&self, peer: &PeerId, proposal: &[u8]) -> Result<Contract, MarketError> {
        let p = Proposal::decode(proposal)?;
        let t = &p.terms;
        let refuse = |why: String| Err(MarketError::Invalid(why));
        // The owner, or a mediator paying for it, proposes; the owner it
        // names is who may place under it.
        if t.payer()? != *peer {
            return refuse("a contract is proposed by the node that pays it".into());
        }
        // A payer other than the owner carries the owner's consent
        // (checked with the terms).
        let owner = t.owner()?;
        if t.holder()? != self.keypair.public().to_peer_id() {
            return refuse("the contract names another holder".into());
        }
        if t.price < self.asking.price {
            return refuse(format!(
                "the price is {} sats per GiB per period; this node asks {}",
                t.price, self.asking.price
            ));
        }
        if t.min_duration < self.asking.min_duration {
            return refuse(format!(
                "the contract lasts {} periods; this node takes {} at least",
                t.min_duration, self.asking.min_duration
            ));
        }
        if t.carry > self.asking.carry {
            return refuse(format!(
                "the contract lets the owner leave {} sats unpaid; this node allows {}",
                t.carry, self.asking.carry
            ));
        }
        if t.payout != self.asking.payout {
            return refuse("the contract pays another address than this node's".into());
        }
        // The price is per period: a longer period would pay less for the same.
        if t.period != self.asking.period {
            return refuse(format!(
                "the contract's period is {} s; this node's price is per {} s",
                t.period, self.asking.period
            ));
        }
        {
            let owners = self.owners.read().unwrap_or_else(|p| p.into_inner());
            if owners.contains(&owner) {
                return refuse("this owner already has a contract with this node".into());
            }
            if owners.len() >= MAX_CONTRACTS {
                return refuse("this node takes no more contracts".into());
            }
        }
        if t.start.abs_diff(now()) > START_SLACK {
            return refuse("the contract starts more than a day from now".into());
        }
        let c = p.accept(&self.keypair)?;
        let txn = self.db.begin_write()?;
        {
            let mut held = txn.open_table(HELD)?;
            if held.get(c.terms.id)?.is_some() {
                return refuse("a contract with this id exists".into());
            }
            held.insert(c.terms.id, c.encode()?.as_slice())?;
        }
        txn.commit()?;
        self.owners
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(owner);
        info!(%owner, payer = %peer, price = c.terms.price, "a contract was taken");
        Ok(c)
    }
}

impl Terms for HolderTerms {
    fn offer(&self, room: u64) -> Result<Bytes, ErrorCode> {
        let offer = Offer {
            version: OFFER_VERSION,
            peer: self.keypair.public().to_peer_id().to_bytes(),
            price: self.asking.price,
            room,
            min_duration: self.asking.min_duration,
            period: self.asking.period,
            payout: self.asking.payout.clone(),
            expires: now() + OFFER_LIFETIME,
            carry: self.asking.carry,
            floor: self.asking.floor.min(self.asking.price),
        };
        offer
            .sign(&self.keypair)
            .and_then(|s| s.encode())
            .map(Bytes::from)
            .map_err(|e| {
                tracing::error!(error = %e, "cannot sign this node's offer");
                ErrorCode::Unavailable
            })
    }

    fn propose(&self, peer: &PeerId, proposal: &[u8]) -> Result<Bytes, ErrorCode> {
        match self.accept(peer, proposal) {
            Ok(c) => c
                .encode()
                .map(Bytes::from)
                .map_err(|_| ErrorCode::Unavailable),
            Err(MarketError::Invalid(why)) => Err(ErrorCode::refused(why)),
            Err(e) => {
                tracing::error!(error = %e, "cannot keep a contract");
                Err(ErrorCode::Unavailable)
            }
        }
    }

    fn paid(&self, peer: &PeerId, notice: &[u8]) -> Result<(), ErrorCode> {
        match self.note(peer, notice) {
            Ok(()) => Ok(()),
            Err(MarketError::Invalid(why)) => {
                info!(owner = %peer, %why, "ignoring a payment notice");
                Err(ErrorCode::refused(why))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot keep a payment notice");
                Err(ErrorCode::Unavailable)
            }
        }
    }

    fn admits_for(&self, payer: &PeerId, owner: &PeerId) -> Result<(), ErrorCode> {
        self.admits(owner)?;
        let contracts = self.contracts().map_err(|e| {
            tracing::error!(error = %e, "cannot read the contracts");
            ErrorCode::Unavailable
        })?;
        let standing = self.standing().map_err(|e| {
            tracing::error!(error = %e, "cannot read the owners' standing");
            ErrorCode::Unavailable
        })?;
        // A live contract: one released is over, and its payer with it.
        let paid_by = contracts.iter().any(|c| {
            c.terms.owner().ok() == Some(*owner)
                && c.terms.payer().ok() == Some(*payer)
                && !matches!(
                    standing.get(&c.terms.id),
                    Some(Standing::Released { .. } | Standing::Releasing { .. })
                )
        });
        if paid_by {
            Ok(())
        } else {
            Err(ErrorCode::refused(
                "no contract here for that owner is paid by this node",
            ))
        }
    }

    fn admits(&self, peer: &PeerId) -> Result<(), ErrorCode> {
        if self.asking.price == 0 {
            return Ok(());
        }
        let known = self
            .owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer);
        if !known {
            return Err(ErrorCode::NoContract {
                price: self.asking.price,
            });
        }
        match self.cut.read().unwrap_or_else(|p| p.into_inner()).get(peer) {
            Some(periods) => Err(ErrorCode::Unpaid { periods: *periods }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owed(rows: &[(u64, u64, bool)]) -> Vec<Owed> {
        rows.iter()
            .map(|&(period, due, paid)| Owed {
                period,
                due,
                paid,
                sampled: true,
            })
            .collect()
    }

    #[test]
    fn periods_count_as_unpaid_only_beyond_the_carry() {
        // 300 sats a period, carry 1000: periods 0..=2 come to 900 and may
        // wait; period 3 brings them to 1200, so it is the first unpaid.
        let p = owed(&[
            (0, 300, false),
            (1, 300, false),
            (2, 300, false),
            (3, 300, false),
        ]);
        assert_eq!(unpaid_periods(&p, 2, 1000), 0);
        assert_eq!(unpaid_periods(&p, 3, 1000), 1);
        let more = owed(&[
            (0, 300, false),
            (1, 300, false),
            (2, 300, false),
            (3, 300, false),
            (4, 300, false),
            (5, 300, false),
        ]);
        assert_eq!(unpaid_periods(&more, 5, 1000), 3);
        // Periods past `settled_by` are still in their grace.
        assert_eq!(unpaid_periods(&more, 4, 1000), 2);
    }

    #[test]
    fn a_payment_starts_the_count_again() {
        let p = owed(&[
            (0, 600, false),
            (1, 600, false),
            (2, 600, false),
            (3, 600, true),
            (4, 600, false),
        ]);
        assert_eq!(unpaid_periods(&p[..3], 2, 1000), 2);
        assert_eq!(
            unpaid_periods(&p, 4, 1000),
            0,
            "600 since the payment may wait"
        );
        // A payment still in its grace period counts already.
        assert_eq!(unpaid_periods(&p, 2, 1000), 0);
        // A tiny contract owes nothing worth counting for a long time.
        let tiny: Vec<Owed> = (0..10_000)
            .map(|period| Owed {
                period,
                due: 0,
                paid: false,
                sampled: true,
            })
            .collect();
        assert_eq!(unpaid_periods(&tiny, 9_999, 1000), 0);
        // A carry of 0 counts every unpaid period that owes anything.
        assert_eq!(unpaid_periods(&owed(&[(5, 1, false)]), 5, 0), 1);
        assert_eq!(unpaid_periods(&owed(&[(5, 0, false)]), 5, 0), 0);
        // Periods the node did not see (it was down) do not count.
        let mut gap = owed(&[
            (0, 600, false),
            (1, 600, false),
            (2, 600, false),
            (3, 600, false),
        ]);
        gap[2].sampled = false;
        assert_eq!(unpaid_periods(&gap, 3, 1000), 2, "1 and 3");
    }

    #[test]
    fn an_owner_is_cut_kept_cut_across_a_restart_restored_by_paying_and_released_later() {
        use crate::contract::{CONTRACT_VERSION, Terms as ContractTerms};
        use crate::notice::NOTICE_VERSION;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("contracts.redb");
        let (node, owner) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let owner_id = owner.public().to_peer_id();
        let payout = "mvUT3XQBnLwUpHeZD8Zjde9TVX9HyYhx2Q".to_string();
        let asking = Asking {
            price: 1 << 20,
            min_duration: 2,
            period: 60,
            payout: payout.clone(),
            carry: 1000,
            unpaid_periods: 2,
            floor: 1 << 20,
        };
        let open = || HolderTerms::open(node.clone(), asking.clone(), &path).unwrap();
        let terms = open();
        // Began 50 periods ago, so that every period used here has begun.
        let start = now() - 50 * 60;
        let proposal = |owner: &Keypair, id: ContractId| {
            ContractTerms {
                version: CONTRACT_VERSION,
                id,
                owner: owner.public().to_peer_id().to_bytes(),
                holder: node.public().to_peer_id().to_bytes(),
                price: 1 << 20,
                start,
                min_duration: 2,
                period: 60,
                payout: payout.clone(),
                carry: 1000,
                payer: Vec::new(),
                consent: None,
            }
            .propose(owner)
            .unwrap()
            .encode()
            .unwrap()
        };
        terms
            .propose(&owner_id, &proposal(&owner, [3; 16]))
            .unwrap();
        assert_eq!(terms.admits(&owner_id), Ok(()));

        // 1 MiB held: 1024 sats a period, over the carry each period.
        let held = HashMap::from([(owner_id, 1u64 << 20)]);
        let at = |period: u64| start + period * 60 + 1;
        let none = HashMap::new();
        for p in 0..=2 {
            assert!(terms.review(&held, &none, at(p)).unwrap().is_empty());
            assert_eq!(terms.admits(&owner_id), Ok(()), "period {p}");
        }
        // At period 3, periods 0 and 1 are past their grace, and 0 alone
        // reached the carry: two unpaid, the most allowed.
        assert!(terms.review(&held, &none, at(3)).unwrap().is_empty());
        assert_eq!(
            terms.admits(&owner_id),
            Err(ErrorCode::Unpaid { periods: 2 })
        );
        let a = &terms.accounts(&none, at(3)).unwrap()[0];
        assert_eq!(a.owed_sats, 3 * 1024);
        drop(terms);

        // Cut across a restart; a notice the wallet does not show changes nothing.
        let terms = open();
        assert!(matches!(
            terms.admits(&owner_id),
            Err(ErrorCode::Unpaid { .. })
        ));
        let notice_of = |contract: ContractId, period: u64, txid: &str, sats: u64| {
            PaidNotice {
                version: NOTICE_VERSION,
                contract,
                txid: txid.into(),
                items: vec![(period, sats)],
            }
            .encode()
            .unwrap()
        };
        let notice = |period: u64, txid: &str| notice_of([3; 16], period, txid, 1024);
        let txid = "ab".repeat(32);
        terms.paid(&owner_id, &notice(3, &txid)).unwrap();
        assert!(terms.review(&held, &none, at(4)).unwrap().is_empty());
        assert_eq!(
            terms.admits(&owner_id),
            Err(ErrorCode::Unpaid { periods: 3 }),
            "a payment the wallet does not show"
        );
        // Another peer cannot tell of payments under the contract.
        let stranger = Keypair::generate_ed25519().public().to_peer_id();
        assert!(terms.paid(&stranger, &notice(4, &txid)).is_err());
        // Nor can another owner claim this payment as its own, nor a notice pay nothing.
        let other = Keypair::generate_ed25519();
        let other_id = other.public().to_peer_id();
        terms
            .propose(&other_id, &proposal(&other, [4; 16]))
            .unwrap();
        assert!(
            terms
                .paid(&other_id, &notice_of([4; 16], 3, &txid, 1024))
                .is_err()
        );
        assert!(
            terms
                .paid(&owner_id, &notice_of([3; 16], 2, &"ef".repeat(32), 0))
                .is_err()
        );

        // The wallet shows it: the owner may place again.
        assert_eq!(terms.unverified(10).unwrap(), vec![txid.clone()]);
        terms.verify(&txid, 1024).unwrap();
        assert!(
            terms.unverified(10).unwrap().is_empty(),
            "looked up until confirmed, then no more"
        );
        assert_eq!(terms.verified().unwrap()[&txid], 1024);
        let paid = HashMap::from([(txid.clone(), 1024u64)]);
        assert!(terms.review(&held, &paid, at(4)).unwrap().is_empty());
        assert_eq!(terms.admits(&owner_id), Ok(()));
        assert_eq!(terms.accounts(&paid, at(4)).unwrap()[0].periods_paid, 1);

        // Unpaid again from period 4 on (a token payment for period 4 does
        // not count): cut at period 7 (4 and 5 past their grace), released
        // min_duration (2) periods later, at 9.
        let dust = "cd".repeat(32);
        terms
            .paid(&owner_id, &notice_of([3; 16], 4, &dust, 1))
            .unwrap();
        let paid = HashMap::from([(txid.clone(), 1024u64), (dust, 1)]);
        for p in 5..=6 {
            assert!(terms.review(&held, &paid, at(p)).unwrap().is_empty());
            assert_eq!(terms.admits(&owner_id), Ok(()), "period {p}");
        }
        assert!(terms.review(&held, &paid, at(7)).unwrap().is_empty());
        assert!(terms.admits(&owner_id).is_err());
        assert!(terms.review(&held, &paid, at(8)).unwrap().is_empty());
        let release = terms.review(&held, &paid, at(9)).unwrap();
        assert_eq!(release, vec![([3; 16], owner_id)]);
        // A crash before the release finished: it is asked again, and a
        // payment now does not stop it.
        drop(terms);
        let terms = open();
        let late = "01".repeat(32);
        terms
            .paid(&owner_id, &notice_of([3; 16], 8, &late, 1024))
            .unwrap();
        let mut paid = paid;
        paid.insert(late, 1024);
        assert_eq!(terms.review(&held, &paid, at(9)).unwrap(), release);
        assert!(terms.admits(&owner_id).is_err());
        terms.released(&[3; 16], 5, 5 << 20).unwrap();
        assert_eq!(
            terms.admits(&owner_id),
            Err(ErrorCode::NoContract { price: 1 << 20 }),
            "the contract is over"
        );
        assert_eq!(terms.live_contracts(), 1, "the other owner's");
        drop(terms);
        let terms = open();
        assert_eq!(terms.live_contracts(), 1, "over across a restart");
        assert!(terms.review(&held, &paid, at(10)).unwrap().is_empty());
        let views = terms.views(&paid, at(10)).unwrap();
        assert!(views[0].state.starts_with("released"), "{:?}", views[0]);
    }

    #[test]
    fn a_mediator_contracts_for_its_clients_with_their_consent_and_pays_them_in_one_transaction() {
        use crate::contract::{CONTRACT_VERSION, Terms as ContractTerms, consent};
        use crate::notice::NOTICE_VERSION;
        let dir = tempfile::tempdir().unwrap();
        let node = Keypair::generate_ed25519();
        let mediator = Keypair::generate_ed25519();
        let mediator_id = mediator.public().to_peer_id();
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let payout = "mvUT3XQBnLwUpHeZD8Zjde9TVX9HyYhx2Q".to_string();
        let asking = Asking {
            price: 100,
            min_duration: 1,
            period: 60,
            payout: payout.clone(),
            carry: 1000,
            unpaid_periods: 3,
            floor: 100,
        };
        let terms = HolderTerms::open(node.clone(), asking, &dir.path().join("c.redb")).unwrap();
        let proposal = |client: &Keypair, id: ContractId| {
            ContractTerms {
                version: CONTRACT_VERSION,
                id,
                owner: client.public().to_peer_id().to_bytes(),
                holder: node.public().to_peer_id().to_bytes(),
                price: 100,
                start: now() - 120,
                min_duration: 1,
                period: 60,
                payout: payout.clone(),
                carry: 1000,
                payer: mediator_id.to_bytes(),
                consent: Some(consent(client, &mediator_id).unwrap()),
            }
            .propose(&mediator)
            .unwrap()
            .encode()
            .unwrap()
        };
        let (pa, pb) = (proposal(&a, [1; 16]), proposal(&b, [2; 16]));
        let a_id = a.public().to_peer_id();
        assert!(
            terms.propose(&a_id, &pa).is_err(),
            "proposed by the payer, not the owner"
        );
        terms.propose(&mediator_id, &pa).unwrap();
        terms.propose(&mediator_id, &pb).unwrap();
        assert_eq!(terms.live_contracts(), 2);
        assert_eq!(terms.admits(&a_id), Ok(()), "the owner places");
        assert!(
            terms.admits(&mediator_id).is_err(),
            "the payer does not place"
        );
        // The payer tells of payments, and one transaction may pay several
        // of its contracts; the owner does not tell, nor may another payer
        // claim that transaction.
        let notice = |contract: ContractId, txid: &str| {
            PaidNotice {
                version: NOTICE_VERSION,
                contract,
                txid: txid.into(),
                items: vec![(1, 50)],
            }
            .encode()
            .unwrap()
        };
        let txid = "cd".repeat(32);
        assert!(terms.paid(&a_id, &notice([1; 16], &txid)).is_err());
        terms.paid(&mediator_id, &notice([1; 16], &txid)).unwrap();
        terms.paid(&mediator_id, &notice([2; 16], &txid)).unwrap();
        let own = Keypair::generate_ed25519();
        let own_id = own.public().to_peer_id();
        let own_terms = ContractTerms {
            version: CONTRACT_VERSION,
            id: [3; 16],
            owner: own_id.to_bytes(),
            holder: node.public().to_peer_id().to_bytes(),
            price: 100,
            start: now() - 120,
            min_duration: 1,
            period: 60,
            payout: payout.clone(),
            carry: 1000,
            payer: Vec::new(),
            consent: None,
        };
        let own_proposal = own_terms.propose(&own).unwrap().encode().unwrap();
        terms.propose(&own_id, &own_proposal).unwrap();
        assert!(
            terms.paid(&own_id, &notice([3; 16], &txid)).is_err(),
            "another payer's transaction"
        );
        // Both notices count against what the wallet shows the transaction paid.
        let mut paid = HashMap::new();
        paid.insert(txid.clone(), 99);
        let unseen: u64 = terms
            .accounts(&paid, now())
            .unwrap()
            .iter()
            .map(|a| a.unseen)
            .sum();
        assert_eq!(unseen, 2, "99 sats cannot pay two notices of 50");
        paid.insert(txid, 100);
        let accounts = terms.accounts(&paid, now()).unwrap();
        assert_eq!(accounts.iter().map(|a| a.periods_paid).sum::<u64>(), 2);
    }
}
