//! A storage node's side of the market: it signs its offer, accepts the
//! contracts that meet its terms and keeps them, and tells its holder who
//! may place blocks (anyone, when it is free; owners with a contract, when
//! it charges).

use std::collections::HashSet;
use std::path::Path;
use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fincrypt_net::{ErrorCode, PeerId, Terms};
use libp2p::identity::Keypair;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tracing::info;

use crate::MarketError;
use crate::contract::{Contract, ContractId, Proposal};
use crate::notice::PaidNotice;
use crate::offer::{OFFER_VERSION, Offer, check_address};

/// Contracts this node holds under, by id: the encoded contract.
const HELD: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("held_contracts");
/// (contract id, period big-endian) -> postcard (txid, satoshis): what the
/// owner said it paid; the wallet says whether it did.
const NOTICES: TableDefinition<[u8; 24], &[u8]> = TableDefinition::new("paid_notices");
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
}

/// A storage node's terms and the contracts it took (in `DATA/contracts.redb`).
pub struct HolderTerms {
    keypair: Keypair,
    asking: Asking,
    db: Database,
    /// Owners with a contract.
    owners: RwLock<HashSet<PeerId>>,
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
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(HELD)?;
        txn.open_table(NOTICES)?;
        txn.commit()?;
        let terms = HolderTerms {
            keypair,
            asking,
            db,
            owners: RwLock::new(HashSet::new()),
        };
        let owners = terms
            .contracts()?
            .iter()
            .map(|c| c.terms.owner())
            .collect::<Result<HashSet<_>, _>>()?;
        *terms.owners.write().unwrap_or_else(|p| p.into_inner()) = owners;
        Ok(terms)
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

    /// What the node asks.
    /// What owners said they paid: (contract, period, txid, satoshis).
    pub fn notices(&self) -> Result<Vec<(ContractId, u64, String, u64)>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(NOTICES)?.iter()? {
            let (k, v) = row?;
            let key = k.value();
            let mut id = [0u8; 16];
            id.copy_from_slice(&key[..16]);
            let mut period = [0u8; 8];
            period.copy_from_slice(&key[16..]);
            let (txid, sats): (String, u64) = postcard::from_bytes(v.value())
                .map_err(|e| MarketError::Store(format!("a damaged notice row: {e}")))?;
            out.push((id, u64::from_be_bytes(period), txid, sats));
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
            if c.terms.owner()? != *peer {
                return Err(MarketError::Invalid(
                    "a payment is told by the contract's owner".into(),
                ));
            }
            let current = c.terms.period_at(now()).unwrap_or(0);
            let mut t = txn.open_table(NOTICES)?;
            for (period, sats) in &n.items {
                if *period > current {
                    return Err(MarketError::Invalid(format!(
                        "period {period} has not begun"
                    )));
                }
                let mut key = [0u8; 24];
                key[..16].copy_from_slice(&n.contract);
                key[16..].copy_from_slice(&period.to_be_bytes());
                let row = postcard::to_allocvec(&(n.txid.as_str(), *sats))
                    .map_err(|e| MarketError::Store(e.to_string()))?;
                t.insert(key, row.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn asking(&self) -> &Asking {
        &self.asking
    }

    fn accept(&self, peer: &PeerId, proposal: &[u8]) -> Result<Contract, MarketError> {
        let p = Proposal::decode(proposal)?;
        let t = &p.terms;
        let refuse = |why: String| Err(MarketError::Invalid(why));
        if t.owner()? != *peer {
            return refuse("a contract is proposed by the owner it names".into());
        }
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
            if owners.contains(peer) {
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
            .insert(*peer);
        info!(owner = %peer, price = c.terms.price, "a contract was taken");
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

    fn requires_contract(&self, peer: &PeerId) -> Option<u64> {
        if self.asking.price == 0 {
            return None;
        }
        let known = self
            .owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer);
        (!known).then_some(self.asking.price)
    }
}
