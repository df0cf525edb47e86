//! The owner's side of the market: which offers placement may use, the
//! contracts it makes with holders, the challenges every contracted holder
//! answers each period, and settlement.
//!
//! Placement asks [`OwnerMarket`] (as the engine's [`Market`]) which of the
//! peers closest to a block may take it. The market reads each candidate's
//! signed offer (kept until it expires or [`OFFER_REFRESH`] passes), leaves
//! out offers above `max_price`, for another period length, or priced while
//! no wallet is configured (and says why in [`MarketView::skipped`]), lets
//! the pricing [`Scheme`] order the rest, and makes contracts with as many
//! priced peers as the copies still asked need, in that order.
//!
//! [`OwnerMarket::tick`], run by the `market` worker several times a period,
//! challenges every contracted holder on one of its blocks chosen at random
//! (the engine's proofs act on the answer as on any other), records the
//! outcomes and the bytes each holder keeps in the [`Ledger`], closes ended
//! periods, and settles them through the wallet in one transaction.
//! Failures found by the engine's own proof rounds count too: a task
//! follows its outcomes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fincrypt_blockstore::Score;
use fincrypt_engine::{Engine, Market, ProofOutcome, ProofResult, Step, Worker};
use fincrypt_net::{Client, Error as NetError, ErrorCode, PeerId};
use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::MarketError;
use crate::contract::{CONTRACT_VERSION, Contract, ContractId, Terms};
use crate::ledger::{
    Batch, BatchState, Ledger, PeriodRow, PeriodState, SettleRules, Settlement, funded_periods, hex,
};
use crate::notice::{MAX_NOTICE_ITEMS, NOTICE_VERSION, PaidNotice};
use crate::offer::{Offer, SignedOffer};
use crate::signed::Signature;
use crate::wallet::Payments;

/// How long an offer read from a peer is used before it is read again
/// (sooner when it expires).
pub const OFFER_REFRESH: u64 = 600;
/// The longest a tick waits for a holder to take a notice.
const NOTICE_WAIT: Duration = Duration::from_secs(5);
/// Seconds a settlement's notices are offered again to holders that did not take them.
const NOTICE_RETRY_FOR: u64 = 86_400;
/// The longest a tick waits for the DHT to name the nodes that make offers.
const DISCOVERY_LIMIT: Duration = Duration::from_secs(10);
/// Offers asked for at once.
const PARALLEL_OFFERS: usize = 16;
/// Seconds a `sendmany` may still be running in the node after its intent
/// was recorded (see [`SettleRules::in_flight`]).
const IN_FLIGHT: u64 = 600;

/// How offers are ranked and what is offered in turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pricing {
    /// The cheapest offers within `max_price` first, ties by XOR distance;
    /// each holder is paid its own price.
    #[default]
    LowestFirst,
    /// Any offer at or under `max_price`, by XOR distance; every holder is
    /// paid `max_price`, the owner's fixed rate.
    Fixed,
    /// The closest peers by XOR distance, as a free network places, price
    /// ignored up to `max_price`; each holder is paid its own price.
    Nearest,
    /// As lowest-first, but what a holder is paid floats period by period:
    /// the cheapest price among the usable offers seen in the period, never
    /// below the holder's own floor (its offer says it) and never above its
    /// contract's price. Cheaper room appearing lowers what is paid.
    Floating,
}

impl FromStr for Pricing {
    type Err = String;
    fn from_str(s: &str) -> Result<Pricing, String> {
        match s {
            "lowest-first" => Ok(Pricing::LowestFirst),
            "fixed" => Ok(Pricing::Fixed),
            "nearest" => Ok(Pricing::Nearest),
            "floating" => Ok(Pricing::Floating),
            other => Err(format!(
                "pricing `{other}` is not one of lowest-first, fixed, nearest, floating"
            )),
        }
    }
}

impl std::fmt::Display for Pricing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pricing::LowestFirst => "lowest-first",
            Pricing::Fixed => "fixed",
            Pricing::Nearest => "nearest",
            Pricing::Floating => "floating",
        })
    }
}

/// A peer placement may use for a block, as a [`Scheme`] sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub peer: PeerId,
    /// Its place among the candidates by XOR distance to the block (0: closest).
    pub rank: usize,
    /// What it asks per GiB per period (0: free, or a contract's price).
    pub price: u64,
}

/// A pricing scheme: the order in which placement tries offers, and what
/// the owner offers a holder in a contract.
pub trait Scheme: Send + Sync {
    /// Orders `candidates` (all within `max_price`), the first to try first.
    fn order(&self, candidates: &mut [Candidate]);
    /// The price per GiB per period proposed to a node asking `asking`
    /// (never less than it, never more than `max_price`).
    fn contract_price(&self, asking: u64, max_price: u64) -> u64;
}

impl Scheme for Pricing {
    fn order(&self, candidates: &mut [Candidate]) {
        match self {
            Pricing::LowestFirst | Pricing::Floating => {
                candidates.sort_by_key(|c| (c.price, c.rank))
            }
            Pricing::Fixed | Pricing::Nearest => candidates.sort_by_key(|c| c.rank),
        }
    }

    fn contract_price(&self, asking: u64, max_price: u64) -> u64 {
        match self {
            Pricing::Fixed => max_price.max(asking),
            Pricing::LowestFirst | Pricing::Nearest | Pricing::Floating => asking,
        }
    }
}

/// The owner's market settings (config keys of the same names).
#[derive(Clone, Debug)]
pub struct OwnerSettings {
    /// The most paid per GiB per period.
    pub max_price: u64,
    pub pricing: Pricing,
    /// Seconds: offers for another period length are not taken.
    pub period: u64,
    /// Challenges of each contracted holder per period, at least.
    pub challenges_per_period: u32,
    /// The smallest payout to one holder; less waits for the next settlement.
    pub min_payout: u64,
    /// Below this many funded periods, the balance is low.
    pub min_periods_funded: u64,
}

impl OwnerSettings {
    /// Between two ticks: so that every period holds at least
    /// `challenges_per_period` of them.
    pub fn tick(&self) -> Duration {
        let k = u64::from(self.challenges_per_period.max(1)) + 1;
        Duration::from_millis((self.period.max(1) * 1000 / k).max(200))
    }
}

/// What is known of a peer's offer.
#[derive(Clone, Debug)]
enum Seen {
    /// A valid offer.
    Offer(Offer),
    /// It makes none: it stores for free.
    Free,
    /// It gave an offer that cannot be used.
    Bad(String),
    /// It takes no new blocks from this owner, which it counts `u64`
    /// periods behind in payment.
    Unpaid(u64),
    /// None could be read (unreachable, timed out): its room decides, as
    /// without a market (a priced node shows none without a contract).
    Unknown(String),
}

/// Why placement passes a peer's priced offer by.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Skip {
    /// No wallet is configured to pay it.
    NoWallet,
    /// It asks more than `max_price`.
    OverMax { price: u64, max: u64 },
    /// Its price is for a period of another length.
    Period { theirs: u64, ours: u64 },
    /// It did not take the contract proposed.
    Refused(String),
    /// Its contract was ended: after a wrong proof, or (a mediator's) after
    /// it answered no audit for long.
    Ended,
    /// It takes no new blocks from this owner: it counts `periods` unpaid.
    Unpaid { periods: u64 },
    /// The rules of whoever runs the market turn it down (a mediator's
    /// `deny_holders`, `min_audit_score`); why.
    Rule(String),
}

impl Skip {
    /// The reason without its figures, to count alike ones together.
    fn kind(&self) -> &'static str {
        match self {
            Skip::NoWallet => "priced, and no wallet is configured (set bitcoin_rpc_url to pay)",
            Skip::OverMax { .. } => "over max_price",
            Skip::Period { .. } => "for another period length",
            Skip::Refused(_) => "refused a contract",
            Skip::Ended => "with a contract ended (a wrong proof, or no answer)",
            Skip::Unpaid { .. } => "taking no new blocks until they are paid",
            Skip::Rule(_) => "turned down by the mediator's rules",
        }
    }
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::NoWallet => {
                f.write_str("is priced and no wallet is configured (set bitcoin_rpc_url to pay)")
            }
            Skip::OverMax { price, max } => write!(
                f,
                "asks {price} sats per GiB per period, over max_price {max}"
            ),
            Skip::Period { theirs, ours } => write!(
                f,
                "prices a period of {theirs} s, this owner's period is {ours} s"
            ),
            Skip::Refused(why) => write!(f, "refused a contract: {why}"),
            Skip::Ended => f.write_str("its contract was ended (a wrong proof, or no answer)"),
            Skip::Unpaid { periods } => write!(
                f,
                "takes no new blocks from this owner: it counts {periods} periods unpaid"
            ),
            Skip::Rule(why) => f.write_str(why),
        }
    }
}

/// An offer seen, for `fincryptctl market offers`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OfferView {
    pub peer: String,
    /// Satoshis per GiB per period (0: free).
    pub price: u64,
    pub room: u64,
    pub min_duration: u32,
    pub period: u64,
    /// Seconds since it was read.
    pub age_secs: u64,
    /// Why placement does not use it (empty: it may).
    pub skipped: String,
}

/// A contract, for `fincryptctl market contracts`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContractView {
    pub id: String,
    /// The owner node (a storage node's view shows whom it stores for).
    pub owner: String,
    pub holder: String,
    /// Bytes of ours it keeps now.
    pub bytes: u64,
    pub price: u64,
    /// Unix seconds.
    pub start: u64,
    pub period_secs: u64,
    pub min_duration: u32,
    /// Periods ended with every challenge passed.
    pub periods_passed: u64,
    /// Periods ended with a failed challenge.
    pub periods_failed: u64,
    /// Those periods, by number (0: the one the contract starts in).
    pub failed_periods: Vec<u64>,
    /// Periods paid by a sent transaction.
    pub periods_paid: u64,
    /// Satoshis paid under it.
    pub paid_sats: u64,
    /// A storage node's view: periods its owner is behind in payment, beyond
    /// what the contract lets it carry (see `unpaid_periods`).
    #[serde(default)]
    pub periods_unpaid: u64,
    /// A storage node's view: what the periods ended since the owner's last
    /// payment came to, by the bytes the node held for it.
    #[serde(default)]
    pub owed_sats: u64,
    /// `active`, or `dropped` once the holder was dropped for failing proofs.
    pub state: String,
}

impl ContractView {
    /// `c`'s terms in state `state`, with nothing counted yet.
    pub fn of(c: &Contract, state: String) -> ContractView {
        let peer = |p: Result<PeerId, MarketError>| p.map(|p| p.to_string()).unwrap_or_default();
        ContractView {
            id: hex(&c.terms.id),
            owner: peer(c.terms.owner()),
            holder: peer(c.terms.holder()),
            bytes: 0,
            price: c.terms.price,
            start: c.terms.start,
            period_secs: c.terms.period,
            min_duration: c.terms.min_duration,
            periods_passed: 0,
            periods_failed: 0,
            failed_periods: Vec::new(),
            periods_paid: 0,
            paid_sats: 0,
            periods_unpaid: 0,
            owed_sats: 0,
            state,
        }
    }
}

/// A payment, for `fincryptctl wallet`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub txid: String,
    pub holder: String,
    pub contract: String,
    pub period: u64,
    pub sats: u64,
}

/// The market's figures, for `status` and `fincryptctl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MarketView {
    pub contracts: u64,
    /// Satoshis paid to holders, in sent transactions.
    pub paid_sats: u64,
    /// The wallet's spendable balance (none: no wallet, or it did not answer).
    pub balance_sats: Option<u64>,
    /// Periods the balance pays for at the current rate.
    pub funded_periods: Option<u64>,
    pub low_balance: bool,
    /// Satoshis every contract's next period costs at today's bytes.
    pub cost_per_period: u64,
    /// Why paid offers were skipped, in words (empty: none were).
    pub skipped: String,
    /// The last settlement's outcome or error.
    pub last_settlement: String,
}

/// The owner's market: placement's [`Market`] and the `market` worker's work.
pub struct OwnerMarket<P: Payments> {
    /// The node that proposes and pays: the owner, or its mediator.
    keypair: Keypair,
    /// Whose blocks the contracts hold.
    owner: PeerId,
    /// The owner's consent that `keypair` pays for it, when they differ.
    consent: Option<Signature>,
    /// Turns holders down by the rules of whoever runs the market.
    gate: Option<Gate>,
    client: Client,
    ledger: Arc<Ledger>,
    settings: OwnerSettings,
    wallet: Option<P>,
    offers: Mutex<HashMap<PeerId, (u64, Seen)>>,
    /// Contracts by holder.
    contracts: RwLock<HashMap<PeerId, Contract>>,
    /// Holders whose contract the owner ended (a wrong proof): no new blocks.
    ended: RwLock<HashSet<PeerId>>,
    /// One contract negotiation at a time, so a holder is not asked twice.
    contracting: tokio::sync::Mutex<()>,
    /// Tells holders what each settlement paid them.
    teller: Teller,
    /// Placements on contracted holders not yet written to the ledger
    /// (they are before the manifest names the holders: [`Market::persist`]).
    placed: Mutex<Vec<(ContractId, Score, u64)>>,
    /// Bytes each contracted holder keeps for us, as of the last tick.
    bytes: Mutex<HashMap<PeerId, u64>>,
    /// Why each paid offer was skipped, by peer.
    skipped: Mutex<BTreeMap<PeerId, Skip>>,
    view: Mutex<MarketView>,
    /// The last period in which a low balance was warned of.
    warned: Mutex<Option<u64>>,
    /// When offers were last looked for in the DHT.
    discovered: Mutex<Option<u64>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a holder is turned down, if it is (see [`OwnerMarket::for_client`]).
pub type Gate = Arc<dyn Fn(&PeerId) -> Option<String> + Send + Sync>;

/// What the market needs to know of the blocks it pays for, and how it
/// challenges their holders: the owner's engine ([`EngineCustody`]), or a
/// mediator's record of what its client placed.
pub trait Custody: Send + Sync {
    /// Of `scores`, placed on `holder` under contract, which it is still
    /// meant to keep (the others were released or moved: no longer paid).
    fn kept(&self, holder: &PeerId, scores: &[Score]) -> Result<Vec<bool>, MarketError>;
    /// Challenges each holder on its block now; every outcome.
    fn challenge(
        &self,
        asks: Vec<(Score, PeerId)>,
    ) -> BoxFuture<'_, Result<Vec<ProofOutcome>, MarketError>>;
    /// Whether failed outcomes reach the market apart from what
    /// [`Custody::challenge`] returns (the engine's outcome feed does).
    fn feeds_failures(&self) -> bool;
    /// A holder under contract gave a wrong proof: its blocks go elsewhere;
    /// how many.
    fn drop_holder(&self, holder: &PeerId) -> Result<u64, MarketError>;
}

/// [`Custody`] of the owner's own blocks: its engine's manifest and proofs.
pub struct EngineCustody(pub Arc<Engine>);

impl Custody for EngineCustody {
    fn kept(&self, holder: &PeerId, scores: &[Score]) -> Result<Vec<bool>, MarketError> {
        Ok(self
            .0
            .manifest()
            .holders_of(scores.iter().copied())
            .map_err(|e| MarketError::Store(e.to_string()))?
            .into_iter()
            .map(|h| h.contains(holder))
            .collect())
    }

    fn challenge(
        &self,
        asks: Vec<(Score, PeerId)>,
    ) -> BoxFuture<'_, Result<Vec<ProofOutcome>, MarketError>> {
        Box::pin(async move {
            self.0
                .challenge(asks)
                .await
                .map_err(|e| MarketError::Store(e.to_string()))
        })
    }

    fn feeds_failures(&self) -> bool {
        true
    }

    fn drop_holder(&self, holder: &PeerId) -> Result<u64, MarketError> {
        self.0
            .drop_holder(holder)
            .map_err(|e| MarketError::Store(e.to_string()))
    }
}

impl<P: Payments + 'static> OwnerMarket<P> {
    /// The market of the owner node `keypair`, keeping contracts in `ledger`
    /// and paying through `wallet` (none: only free offers are used).
    pub fn new(
        keypair: Keypair,
        client: Client,
        ledger: Arc<Ledger>,
        settings: OwnerSettings,
        wallet: Option<P>,
    ) -> Result<Arc<OwnerMarket<P>>, MarketError> {
        let owner = keypair.public().to_peer_id();
        Self::for_client(keypair, owner, None, None, client, ledger, settings, wallet)
    }

    /// The market a mediator (`keypair`) runs for its client `owner`, which
    /// gave its `consent`, over the mediator's one `ledger` (only the
    /// client's contracts are this market's); `gate` applies the
    /// mediator's rules to holders.
    #[allow(clippy::too_many_arguments)]
    pub fn for_client(
        keypair: Keypair,
        owner: PeerId,
        consent: Option<Signature>,
        gate: Option<Gate>,
        client: Client,
        ledger: Arc<Ledger>,
        settings: OwnerSettings,
        wallet: Option<P>,
    ) -> Result<Arc<OwnerMarket<P>>, MarketError> {
        let mut contracts = HashMap::new();
        let mut ended = HashSet::new();
        let ended_ids = ledger.ended()?;
        for c in ledger.contracts()? {
            if c.terms.owner()? != owner {
                continue;
            }
            let holder = c.terms.holder()?;
            if ended_ids.contains_key(&c.terms.id) {
                ended.insert(holder);
            }
            contracts.insert(holder, c);
        }
        Ok(Arc::new(OwnerMarket {
            keypair,
            owner,
            consent,
            gate,
            teller: Teller::new(client.clone(), ledger.clone()),
            client,
            ledger,
            settings,
            wallet,
            offers: Mutex::new(HashMap::new()),
            contracts: RwLock::new(contracts),
            ended: RwLock::new(ended),
            contracting: tokio::sync::Mutex::new(()),
            placed: Mutex::new(Vec::new()),
            bytes: Mutex::new(HashMap::new()),
            skipped: Mutex::new(BTreeMap::new()),
            view: Mutex::new(MarketView::default()),
            warned: Mutex::new(None),
            discovered: Mutex::new(None),
        }))
    }

    /// Has placement ask this market, runs the `market` worker, and follows
    /// the engine's proof outcomes.
    pub fn start(self: &Arc<Self>, engine: &Arc<Engine>, workers: &fincrypt_engine::Workers) {
        engine.replicator.set_market(self.clone());
        let mut outcomes = engine.prover.subscribe();
        let (market, e) = (self.clone(), EngineCustody(engine.clone()));
        workers.handle().spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match outcomes.recv().await {
                    // Passes are counted by the ticks' own challenges; a
                    // failure anywhere counts against the period.
                    Ok(o) if o.result != ProofResult::Passed => market.failed(&o, &e),
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed = n, "the market fell behind the proof outcomes");
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        workers.spawn(
            MarketWorker {
                market: self.clone(),
                custody: EngineCustody(engine.clone()),
            },
            self.settings.tick(),
        );
    }

    fn contract_of(&self, peer: &PeerId) -> Option<Contract> {
        self.contracts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// A contracted holder failed a challenge: its period goes unpaid and,
    /// for a wrong proof (the block is lost or it lied), the contract ends
    /// and its blocks go elsewhere. No answer at all is left to the
    /// engine's consecutive-failure rule.
    fn failed(&self, o: &ProofOutcome, custody: &dyn Custody) {
        let peer = &o.peer;
        let Some(c) = self.contract_of(peer) else {
            return;
        };
        let bytes = self.bytes_of(peer);
        if let Err(e) = self
            .ledger
            .record_challenge(&c.terms.id, o.time, false, bytes)
        {
            warn!(holder = %peer, error = %e, "cannot record a failed challenge");
        }
        if o.result != ProofResult::Wrong {
            return;
        }
        let why = format!("a wrong proof of block {}", o.score);
        match self.end_contract_of(peer, o.time, &why) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(holder = %peer, error = %e, "cannot end a contract");
                return;
            }
        }
        match custody.drop_holder(peer) {
            Ok(blocks) => warn!(
                holder = %peer,
                blocks,
                "a contracted holder gave a wrong proof: its contract ends and its blocks go elsewhere"
            ),
            Err(e) => warn!(holder = %peer, error = %e, "cannot drop a holder"),
        }
    }

    /// Ends the contract with `peer` at `at`, for `why`, if there is one not
    /// ended yet: no period after it is paid, the holder is not challenged
    /// under it again and gets no new blocks from this market. Whether one
    /// ended now.
    pub fn end_contract_of(&self, peer: &PeerId, at: u64, why: &str) -> Result<bool, MarketError> {
        if self.is_ended(peer) {
            return Ok(false);
        }
        let Some(c) = self.contract_of(peer) else {
            return Ok(false);
        };
        self.ledger.end_contract(&c.terms.id, at, why)?;
        self.ended
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*peer);
        Ok(true)
    }

    fn is_ended(&self, peer: &PeerId) -> bool {
        self.ended
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }

    fn bytes_of(&self, peer: &PeerId) -> u64 {
        self.bytes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .copied()
            .unwrap_or(0)
    }

    /// Reads the offers of `peers` not known or due a refresh.
    async fn refresh_offers(&self, peers: &[PeerId]) {
        self.refresh_offers_older(peers, OFFER_REFRESH).await
    }

    /// Reads the offers of `peers` not known or read `max_age` seconds ago.
    async fn refresh_offers_older(&self, peers: &[PeerId], max_age: u64) {
        use futures::StreamExt;
        let t = now();
        let stale: Vec<PeerId> = {
            let offers = self.offers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .iter()
                .filter(|p| match offers.get(p) {
                    None => true,
                    Some((seen, s)) => {
                        t.saturating_sub(*seen) >= max_age
                            || matches!(s, Seen::Offer(o) if o.expires < t)
                            // Until it is paid, asked again each time.
                            || matches!(s, Seen::Unknown(_) | Seen::Unpaid(_) if t > *seen)
                    }
                })
                .copied()
                .collect()
        };
        let read = futures::stream::iter(stale.into_iter().map(|p| async move {
            let seen = match self.client.offer(p).await {
                Ok(bytes) => match SignedOffer::decode(&bytes) {
                    Ok(s) if s.offer.peer().ok() != Some(p) => {
                        Seen::Bad("its offer names another node".into())
                    }
                    Ok(s) if !s.live(now()) => Seen::Bad("its offer has expired".into()),
                    Ok(s) => Seen::Offer(s.offer),
                    Err(e) => {
                        info!(peer = %p, error = %e, "ignoring a malformed offer");
                        Seen::Bad(format!("its offer is malformed: {e}"))
                    }
                },
                Err(NetError::Refused {
                    code: ErrorCode::Unpaid { periods },
                    ..
                }) => Seen::Unpaid(periods),
                // A node that stores for free makes no offer.
                Err(NetError::Refused { .. }) => Seen::Free,
                Err(e) => Seen::Unknown(format!("no offer could be read: {e}")),
            };
            (p, seen)
        }))
        .buffer_unordered(PARALLEL_OFFERS)
        .collect::<Vec<_>>()
        .await;
        {
            // (`skipped` is never locked while `offers` is held.)
            let mut skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
            for (p, seen) in &read {
                match seen {
                    Seen::Unpaid(periods) => {
                        skipped.insert(*p, Skip::Unpaid { periods: *periods });
                    }
                    _ if matches!(skipped.get(p), Some(Skip::Unpaid { .. })) => {
                        skipped.remove(p);
                    }
                    _ => {}
                }
            }
        }
        let mut offers = self.offers.lock().unwrap_or_else(|p| p.into_inner());
        for (p, seen) in read {
            offers.insert(p, (t, seen));
        }
    }

    /// Why a priced offer may not be used (none: it may).
    fn unusable(&self, o: &Offer) -> Option<Skip> {
        if self.wallet.is_none() {
            return Some(Skip::NoWallet);
        }
        if o.price > self.settings.max_price {
            return Some(Skip::OverMax {
                price: o.price,
                max: self.settings.max_price,
            });
        }
        if o.period != self.settings.period {
            return Some(Skip::Period {
                theirs: o.period,
                ours: self.settings.period,
            });
        }
        None
    }

    /// Proposes a contract to `peer` on its `offer`, keeps it, and returns it.
    async fn contract_with(&self, peer: PeerId, offer: &Offer) -> Result<Contract, MarketError> {
        let _one = self.contracting.lock().await;
        if let Some(c) = self.contract_of(&peer) {
            return Ok(c);
        }
        let terms = Terms {
            version: CONTRACT_VERSION,
            id: rand::random(),
            owner: self.owner.to_bytes(),
            holder: peer.to_bytes(),
            price: self
                .settings
                .pricing
                .contract_price(offer.price, self.settings.max_price),
            start: now(),
            min_duration: offer.min_duration,
            period: offer.period,
            payout: offer.payout.clone(),
            carry: offer.carry,
            payer: if self.consent.is_some() {
                self.keypair.public().to_peer_id().to_bytes()
            } else {
                Vec::new()
            },
            consent: self.consent.clone(),
        };
        let proposal = terms.clone().propose(&self.keypair)?.encode()?;
        let reply = self
            .client
            .propose(peer, proposal.into())
            .await
            .map_err(|e| {
                MarketError::Invalid(format!("the node did not take the contract: {e}"))
            })?;
        let contract = Contract::decode(&reply)?;
        if contract.terms != terms {
            return Err(MarketError::Invalid(
                "the node signed other terms than those proposed".into(),
            ));
        }
        self.ledger.add_contract(&contract)?;
        self.contracts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, contract.clone());
        info!(holder = %peer, price = terms.price, id = %hex(&terms.id), "a contract was made");
        Ok(contract)
    }

    async fn choose_inner(
        &self,
        len: u64,
        need: usize,
        candidates: Vec<(PeerId, u64)>,
    ) -> Vec<(PeerId, Option<u64>)> {
        let peers: Vec<PeerId> = candidates.iter().map(|(p, _)| *p).collect();
        self.refresh_offers(&peers).await;
        let offers: HashMap<PeerId, Seen> = {
            let all = self.offers.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .iter()
                .filter_map(|p| all.get(p).map(|(_, s)| (*p, s.clone())))
                .collect()
        };
        let room: HashMap<PeerId, u64> = candidates.iter().copied().collect();
        let mut usable = Vec::new();
        let mut to_contract: HashMap<PeerId, Offer> = HashMap::new();
        for (rank, peer) in peers.iter().enumerate() {
            if self.is_ended(peer) {
                self.skipped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*peer, Skip::Ended);
                continue;
            }
            if let Some(why) = self.gate.as_ref().and_then(|g| g(peer)) {
                self.skipped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*peer, Skip::Rule(why));
                continue;
            }
            if let Some(Seen::Unpaid(periods)) = offers.get(peer) {
                self.skipped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(*peer, Skip::Unpaid { periods: *periods });
                continue;
            }
            if let Some(c) = self.contract_of(peer) {
                usable.push(Candidate {
                    peer: *peer,
                    rank,
                    price: c.terms.price,
                });
                continue;
            }
            match offers.get(peer) {
                Some(Seen::Offer(o)) if o.price > 0 => {
                    let why = self.unusable(o);
                    let mut skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
                    match why {
                        Some(why) => {
                            skipped.insert(*peer, why);
                        }
                        None => {
                            skipped.remove(peer);
                            usable.push(Candidate {
                                peer: *peer,
                                rank,
                                price: o.price,
                            });
                            to_contract.insert(*peer, o.clone());
                        }
                    }
                }
                Some(Seen::Bad(why)) => {
                    tracing::debug!(%peer, %why, "not placing on a peer whose offer is unusable");
                }
                // Free, or no offer known: its room decides, as without a market.
                _ => usable.push(Candidate {
                    peer: *peer,
                    rank,
                    price: 0,
                }),
            }
        }
        self.settings.pricing.order(&mut usable);
        let mut out = Vec::new();
        let mut ready = 0;
        for c in usable {
            match to_contract.get(&c.peer) {
                None => {
                    if room.get(&c.peer).is_some_and(|r| *r >= len) {
                        ready += 1;
                    }
                    out.push((c.peer, None));
                }
                Some(offer) if ready < need && offer.room >= len => {
                    match self.contract_with(c.peer, offer).await {
                        Ok(_) => {
                            ready += 1;
                            out.push((c.peer, Some(offer.room)));
                        }
                        Err(e) => {
                            warn!(holder = %c.peer, error = %e, "no contract was made");
                            self.skipped
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(c.peer, Skip::Refused(e.to_string()));
                        }
                    }
                }
                // Not needed for this block: no contract yet.
                Some(_) => {}
            }
        }
        out
    }

    /// `holder` no longer keeps `scores` for the owner (they were
    /// released): they are no longer paid for nor challenged.
    pub fn forget(&self, holder: &PeerId, scores: &[Score]) -> Result<(), MarketError> {
        self.flush_placed()?;
        match self.contract_of(holder) {
            Some(c) => self.ledger.forget_placed(&c.terms.id, scores),
            None => Ok(()),
        }
    }

    /// Each contracted holder: its contract, the bytes it kept for the
    /// owner at the last audit, and whether the contract was ended.
    pub fn holders(&self) -> Vec<(PeerId, Contract, u64, bool)> {
        let contracts: Vec<(PeerId, Contract)> = self
            .contracts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, c)| (*p, c.clone()))
            .collect();
        contracts
            .into_iter()
            .map(|(p, c)| {
                let (bytes, ended) = (self.bytes_of(&p), self.is_ended(&p));
                (p, c, bytes, ended)
            })
            .collect()
    }

    /// Writes the placements kept in memory to the ledger.
    fn flush_placed(&self) -> Result<(), MarketError> {
        let items = std::mem::take(&mut *self.placed.lock().unwrap_or_else(|p| p.into_inner()));
        self.ledger.add_placed(&items)
    }

    /// Reads the offers of the storage nodes the DHT knows to make them,
    /// once every [`OFFER_REFRESH`]: `market offers` shows the market
    /// beyond the peers placement has asked so far.
    async fn discover_offers(&self) {
        // A floating price follows the market: looked at every period.
        let every = match self.settings.pricing {
            Pricing::Floating => self.settings.period.clamp(1, OFFER_REFRESH),
            _ => OFFER_REFRESH,
        };
        let t = now();
        {
            let mut last = self.discovered.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|l| t.saturating_sub(l) < every) {
                return;
            }
            *last = Some(t);
        }
        // Bounded: a slow DHT must not hold up a period's challenges.
        let found = tokio::time::timeout(DISCOVERY_LIMIT, self.client.find_offers())
            .await
            .unwrap_or_else(|_| Err(fincrypt_net::Error::Lookup("timed out".into())));
        match found {
            Ok(peers) => {
                let me = self.client.local_peer_id();
                let peers: Vec<PeerId> = peers.into_iter().filter(|p| *p != me).collect();
                self.refresh_offers_older(&peers, every).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "no offers found in the DHT this time");
                // Asked again at the next tick.
                *self.discovered.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
    }

    /// One tick of an owner's own market: challenge, record, close, settle,
    /// and look at the balance.
    pub async fn tick(&self, custody: &dyn Custody) -> Result<u64, MarketError> {
        self.discover_offers().await;
        let (challenged, contracts) = self.audit(custody).await?;
        self.settle_and_tell(contracts).await?;
        Ok(challenged)
    }

    /// Challenges every contracted holder on one of the blocks it keeps
    /// under contract, chosen at random, and records the outcomes and the
    /// bytes each keeps in the ledger. Returns the challenges made and the
    /// contracts.
    pub async fn audit(&self, custody: &dyn Custody) -> Result<(u64, u64), MarketError> {
        self.flush_placed()?;
        if self.settings.pricing == Pricing::Floating {
            self.discover_offers().await;
        }
        let contracts: Vec<Contract> = self
            .contracts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        // Holders under contract are asked for their offer once a period,
        // so that one that stops taking blocks until it is paid is known.
        let holders: Vec<PeerId> = contracts
            .iter()
            .filter_map(|c| c.terms.holder().ok())
            .collect();
        self.refresh_offers_older(&holders, self.settings.period.clamp(1, OFFER_REFRESH))
            .await;
        let mut asks = Vec::new();
        let mut ids: HashMap<PeerId, ContractId> = HashMap::new();
        for c in &contracts {
            let holder = c.terms.holder()?;
            if self.is_ended(&holder) {
                // Ended after a wrong proof: not challenged again, so no
                // period of it is due from now on.
                continue;
            }
            let placed = self.ledger.placed(&c.terms.id)?;
            let scores: Vec<Score> = placed.iter().map(|(s, _)| *s).collect();
            let kept = custody.kept(&holder, &scores)?;
            let (held, gone): (Vec<_>, Vec<_>) =
                placed.into_iter().zip(kept).partition(|(_, k)| *k);
            let gone: Vec<Score> = gone.into_iter().map(|((s, _), _)| s).collect();
            self.ledger.forget_placed(&c.terms.id, &gone)?;
            let bytes: u64 = held.iter().map(|((_, len), _)| len).sum();
            self.bytes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(holder, bytes);
            if let Some(((score, _), _)) = held.choose(&mut rand::thread_rng()) {
                asks.push((*score, holder));
                ids.insert(holder, c.terms.id);
            }
        }
        if self.settings.pricing == Pricing::Floating {
            self.record_rates(&contracts)?;
        }
        let challenged = asks.len() as u64;
        if !asks.is_empty() {
            let outcomes = custody.challenge(asks).await?;
            for o in outcomes {
                if o.result == ProofResult::Passed {
                    if let Some(id) = ids.get(&o.peer) {
                        self.ledger
                            .record_challenge(id, o.time, true, self.bytes_of(&o.peer))?;
                    }
                } else if !custody.feeds_failures() {
                    // (The engine's own feed brings them otherwise.)
                    self.failed(&o, custody);
                }
            }
        }
        Ok((challenged, contracts.len() as u64))
    }

    /// Records, for each contract, what its holder is paid this period under
    /// floating pricing: the cheapest usable offer with room seen now, but
    /// no less than the holder's floor and no more than the contract's price.
    fn record_rates(&self, contracts: &[Contract]) -> Result<(), MarketError> {
        let (cheapest, floors) = {
            let offers = self.offers.lock().unwrap_or_else(|p| p.into_inner());
            let mut cheapest: Option<u64> = None;
            let mut floors = HashMap::new();
            for (peer, (_, seen)) in offers.iter() {
                if let Seen::Offer(o) = seen {
                    floors.insert(*peer, o.floor);
                    if o.price > 0
                        && o.room > 0
                        && self.unusable(o).is_none()
                        && !self.is_ended(peer)
                        && self.gate.as_ref().and_then(|g| g(peer)).is_none()
                    {
                        cheapest = Some(cheapest.map_or(o.price, |c| c.min(o.price)));
                    }
                }
            }
            (cheapest, floors)
        };
        let t = now();
        for c in contracts {
            let holder = c.terms.holder()?;
            let floor = floors.get(&holder).copied().unwrap_or(c.terms.price);
            let rate = cheapest
                .unwrap_or(c.terms.price)
                .max(floor)
                .min(c.terms.price);
            self.ledger.record_rate(&c.terms.id, t, rate)?;
        }
        Ok(())
    }

    /// Closes, settles and tells holders of payments, and looks at the
    /// balance (an owner's own market).
    async fn settle_and_tell(&self, contracts: u64) -> Result<(), MarketError> {
        let t = now();
        let rules = SettleRules {
            min_payout: self.settings.min_payout,
            in_flight: IN_FLIGHT,
        };
        let mut view = MarketView {
            contracts,
            skipped: self.skipped_note(),
            ..MarketView::default()
        };
        match &self.wallet {
            Some(wallet) => {
                view.last_settlement = match self.ledger.settle(wallet, t, rules).await {
                    Ok(Settlement::Paid {
                        txid, sats, payees, ..
                    }) => format!("paid {sats} sats to {payees} holders in {txid}"),
                    Ok(Settlement::Waiting) => {
                        "waiting: an interrupted settlement is not decided yet".into()
                    }
                    Ok(Settlement::Nothing) => self
                        .view
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .last_settlement
                        .clone(),
                    Err(e) => {
                        warn!(error = %e, "a settlement failed; it is tried again next time");
                        format!("failed: {e}")
                    }
                };
                view.balance_sats = match wallet.balance().await {
                    Ok(b) => Some(b),
                    Err(e) => {
                        warn!(error = %e, "cannot read the wallet's balance");
                        None
                    }
                };
            }
            None => {
                self.ledger.close_periods(t)?;
            }
        }
        let summary = self.ledger.summary()?;
        view.cost_per_period = summary.cost_per_period;
        if self.wallet.is_some() {
            self.teller.tell_paid(t).await?;
        }
        view.paid_sats = summary.paid;
        if let Some(balance) = view.balance_sats {
            // What is owed and not yet sent comes out of the balance first.
            let free = balance.saturating_sub(summary.owed);
            let funded = funded_periods(free, view.cost_per_period);
            view.funded_periods = Some(funded);
            view.low_balance = funded < self.settings.min_periods_funded;
            if view.low_balance {
                let period = t / self.settings.period.max(1);
                let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
                if *warned != Some(period) {
                    *warned = Some(period);
                    warn!(
                        balance_sats = balance,
                        cost_per_period = view.cost_per_period,
                        funded_periods = funded,
                        min_periods_funded = self.settings.min_periods_funded,
                        "the wallet's balance is low: fund it, or holders go unpaid"
                    );
                }
            }
        }
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
        Ok(())
    }

    fn skipped_note(&self) -> String {
        let skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for why in skipped.values() {
            *reasons.entry(why.kind()).or_default() += 1;
        }
        if reasons.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = reasons
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        format!("paid offers skipped: {}", parts.join("; "))
    }

    /// The market's figures as of the last tick.
    pub fn view(&self) -> MarketView {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        v.contracts = self
            .contracts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        v.skipped = self.skipped_note();
        v
    }

    /// Offers seen.
    pub fn offers(&self) -> Vec<OfferView> {
        let t = now();
        let skipped = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        let offers = self.offers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<OfferView> = offers
            .iter()
            .map(|(peer, (seen, s))| {
                let (offer, why) = match s {
                    Seen::Offer(o) => (
                        Some(o),
                        skipped.get(peer).map(Skip::to_string).unwrap_or_default(),
                    ),
                    Seen::Free => (None, String::new()),
                    Seen::Bad(why) | Seen::Unknown(why) => (None, why.clone()),
                    Seen::Unpaid(periods) => (None, Skip::Unpaid { periods: *periods }.to_string()),
                };
                OfferView {
                    peer: peer.to_string(),
                    price: offer.map_or(0, |o| o.price),
                    room: offer.map_or(0, |o| o.room),
                    min_duration: offer.map_or(0, |o| o.min_duration),
                    period: offer.map_or(0, |o| o.period),
                    age_secs: t.saturating_sub(*seen),
                    skipped: why,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.price, &a.peer).cmp(&(b.price, &b.peer)));
        out
    }

    /// Contracts, with what each period came to.
    pub fn contract_views(
        &self,
        dropped: &HashSet<PeerId>,
    ) -> Result<Vec<ContractView>, MarketError> {
        let mut periods: HashMap<ContractId, Vec<(u64, PeriodRow)>> = HashMap::new();
        for (id, n, row) in self.ledger.periods()? {
            periods.entry(id).or_default().push((n, row));
        }
        let ended = self.ledger.ended()?;
        let unpaid: HashMap<PeerId, u64> = self
            .skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(p, s)| match s {
                Skip::Unpaid { periods } => Some((*p, *periods)),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for c in self.ledger.contracts()? {
            let holder = c.terms.holder()?;
            let state = match ended.get(&c.terms.id) {
                Some((_, why)) => format!("ended: {why}"),
                None if dropped.contains(&holder) => {
                    "dropped for now: it did not answer challenges".into()
                }
                None => match unpaid.get(&holder) {
                    Some(n) => format!(
                        "active; the holder takes no new blocks until paid: it counts {n} periods unpaid"
                    ),
                    None => "active".into(),
                },
            };
            let mut v = ContractView::of(&c, state);
            v.bytes = self.bytes_of(&holder);
            for (n, row) in periods.remove(&c.terms.id).unwrap_or_default() {
                match row.state {
                    PeriodState::Open => {}
                    PeriodState::Unpaid if row.failed > 0 => {
                        v.periods_failed += 1;
                        v.failed_periods.push(n);
                    }
                    PeriodState::Unpaid => {}
                    PeriodState::Due(_) | PeriodState::Batched { .. } => v.periods_passed += 1,
                    PeriodState::Paid { sats, .. } => {
                        v.periods_passed += 1;
                        v.periods_paid += 1;
                        v.paid_sats += sats;
                    }
                }
            }
            out.push(v);
        }
        Ok(out)
    }

    /// Payments made: one line per period paid, with its transaction.
    pub fn payments(&self) -> Result<Vec<PaymentView>, MarketError> {
        let holders: HashMap<ContractId, String> = self
            .ledger
            .contracts()?
            .iter()
            .map(|c| {
                (
                    c.terms.id,
                    c.terms.holder().map(|h| h.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        let mut out = Vec::new();
        for (_, b) in self.ledger.batches()? {
            if let BatchState::Sent(txid) = &b.state {
                for (id, period, sats) in &b.items {
                    out.push(PaymentView {
                        txid: txid.clone(),
                        holder: holders.get(id).cloned().unwrap_or_default(),
                        contract: hex(id),
                        period: *period,
                        sats: *sats,
                    });
                }
            }
        }
        Ok(out)
    }
}

impl<P: Payments + 'static> Market for OwnerMarket<P> {
    fn choose<'a>(
        &'a self,
        len: u64,
        need: usize,
        candidates: Vec<(PeerId, u64)>,
    ) -> BoxFuture<'a, Vec<(PeerId, Option<u64>)>> {
        Box::pin(self.choose_inner(len, need, candidates))
    }

    fn placed(&self, peer: &PeerId, score: &Score, len: u64) {
        let Some(c) = self.contract_of(peer) else {
            return;
        };
        self.placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((c.terms.id, *score, len));
    }

    fn persist(&self) -> Result<(), String> {
        self.flush_placed()
            .map_err(|e| format!("recording blocks placed under contracts: {e}"))
    }
}

/// Tells holders what each settlement of a ledger paid them, batch by
/// batch in order (one per ledger: an owner's market, or a mediator for
/// all its clients).
pub struct Teller {
    client: Client,
    ledger: Arc<Ledger>,
    /// Batches after `notified_through` and the contracts already told of
    /// each (since this process started: telling again is harmless).
    told: Mutex<HashMap<u64, HashSet<ContractId>>>,
}

impl Teller {
    pub fn new(client: Client, ledger: Arc<Ledger>) -> Teller {
        Teller {
            client,
            ledger,
            told: Mutex::new(HashMap::new()),
        }
    }

    /// Tells the holders of every batch sent since the last told what it
    /// paid them. A holder that did not take its notices is told again
    /// each tick, for a day, without holding up the others (a storage node
    /// counts a period paid only once told, and cuts an owner that leaves
    /// periods unpaid). `notified_through` moves past a batch once every
    /// holder took it, or the day is over.
    pub async fn tell_paid(&self, now: u64) -> Result<(), MarketError> {
        let mut through = self.ledger.notified_through()?;
        let mut n = through;
        let mut done_so_far = true;
        loop {
            let Some(batch) = self.ledger.batch(n + 1)? else {
                return Ok(());
            };
            n += 1;
            let done = match &batch.state {
                // Not sent yet: later batches wait for it to be decided.
                BatchState::Intent => return Ok(()),
                BatchState::Abandoned(_) => true,
                BatchState::Sent(txid) => {
                    let told = self
                        .told
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&n)
                        .unwrap_or_default();
                    let (all, told) = self.tell_batch(&batch, txid, told).await;
                    if !all {
                        self.told
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(n, told);
                    }
                    all || now.saturating_sub(batch.created) >= NOTICE_RETRY_FOR
                }
            };
            done_so_far &= done;
            if done_so_far {
                through = n;
                self.ledger.set_notified_through(through)?;
                self.told
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&n);
            }
        }
    }

    /// Tells each holder of `batch` not in `told` what it paid it, period
    /// by period ([`PaidNotice`]); whether every holder has now taken every
    /// notice, and the contracts whose holders have.
    async fn tell_batch(
        &self,
        batch: &Batch,
        txid: &str,
        mut told: HashSet<ContractId>,
    ) -> (bool, HashSet<ContractId>) {
        let mut by_contract: BTreeMap<ContractId, Vec<(u64, u64)>> = BTreeMap::new();
        for (id, period, sats) in &batch.items {
            by_contract.entry(*id).or_default().push((*period, *sats));
        }
        let holders: HashMap<ContractId, PeerId> = match self.ledger.contracts() {
            Ok(all) => all
                .iter()
                .filter_map(|c| Some((c.terms.id, c.terms.holder().ok()?)))
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the contracts to tell holders of payments");
                return (false, told);
            }
        };
        let mut all = true;
        for (id, items) in by_contract {
            if told.contains(&id) {
                continue;
            }
            let Some(holder) = holders.get(&id) else {
                continue;
            };
            let mut taken = true;
            for chunk in items.chunks(MAX_NOTICE_ITEMS) {
                let notice = PaidNotice {
                    version: NOTICE_VERSION,
                    contract: id,
                    txid: txid.to_owned(),
                    items: chunk.to_vec(),
                };
                let result = match notice.encode() {
                    Ok(bytes) => {
                        let tell = self.client.paid(*holder, bytes.into());
                        match tokio::time::timeout(NOTICE_WAIT, tell).await {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err("no answer in time".into()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = result {
                    taken = false;
                    tracing::info!(%holder, error = %e, "a holder was not told of its payment yet");
                    break;
                }
            }
            if taken {
                told.insert(id);
            } else {
                all = false;
            }
        }
        (all, told)
    }
}

/// The `market` worker: [`OwnerMarket::tick`] several times a period.
struct MarketWorker<P: Payments> {
    market: Arc<OwnerMarket<P>>,
    custody: EngineCustody,
}

impl<P: Payments + 'static> Worker for MarketWorker<P> {
    fn name(&self) -> &'static str {
        "market"
    }

    fn step(&mut self) -> BoxFuture<'_, Result<Step, String>> {
        Box::pin(async move {
            let done = self
                .market
                .tick(&self.custody)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Step::Idle { done })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(prices: &[u64]) -> Vec<Candidate> {
        prices
            .iter()
            .enumerate()
            .map(|(rank, price)| Candidate {
                peer: PeerId::random(),
                rank,
                price: *price,
            })
            .collect()
    }

    fn order(p: Pricing, prices: &[u64]) -> Vec<(usize, u64)> {
        let mut c = candidates(prices);
        p.order(&mut c);
        c.iter().map(|c| (c.rank, c.price)).collect()
    }

    #[test]
    fn lowest_first_takes_the_cheapest_then_the_closest() {
        assert_eq!(
            order(Pricing::LowestFirst, &[30, 10, 0, 10]),
            [(2, 0), (1, 10), (3, 10), (0, 30)]
        );
    }

    #[test]
    fn fixed_and_nearest_keep_the_order_of_distance() {
        for p in [Pricing::Fixed, Pricing::Nearest] {
            assert_eq!(order(p, &[30, 10, 0]), [(0, 30), (1, 10), (2, 0)], "{p}");
        }
    }

    #[test]
    fn fixed_pays_the_owners_rate_and_the_others_the_asking_price() {
        assert_eq!(Pricing::Fixed.contract_price(10, 30), 30);
        assert_eq!(Pricing::LowestFirst.contract_price(10, 30), 10);
        assert_eq!(Pricing::Nearest.contract_price(10, 30), 10);
    }

    #[test]
    fn pricing_names_read_back_and_a_bad_one_is_named() {
        for p in [
            Pricing::LowestFirst,
            Pricing::Fixed,
            Pricing::Nearest,
            Pricing::Floating,
        ] {
            assert_eq!(p.to_string().parse::<Pricing>(), Ok(p));
        }
        let e = "cheapest".parse::<Pricing>().unwrap_err();
        assert!(
            e.contains("`cheapest`") && e.contains("lowest-first"),
            "{e}"
        );
    }

    #[test]
    fn every_period_holds_the_challenges_asked() {
        let s = OwnerSettings {
            max_price: 0,
            pricing: Pricing::default(),
            period: 3600,
            challenges_per_period: 4,
            min_payout: 0,
            min_periods_funded: 0,
        };
        // Five ticks an hour: any hour-long window holds at least four.
        assert_eq!(s.tick(), Duration::from_secs(720));
    }
}
