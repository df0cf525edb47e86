//! The holder: keeps other peers' blocks in a local volume and answers their requests.
//!
//! Rules, in the order a request meets them:
//! - a `Put` is checked against its score (recomputed from the bytes) and
//!   refused on a mismatch, then against the room offered (`capacity`, in
//!   bytes of `held` blocks, or less when the disk has less room beyond a
//!   reserve, see [`disk_reserve`]) and refused with `Full` beyond it; the placing
//!   peer is recorded in the [`Ledger`] before the block is stored durably
//!   (each put writes and syncs its block to a temporary file as it comes;
//!   puts that are ready together are then linked into the volume with their
//!   placements in one commit, and each put is answered once its block is
//!   durable);
//! - `Get`, `Has` and `Challenge` concern only blocks some peer placed here:
//!   a node's own blocks are never served through this interface;
//! - a copy that fails its check on read is deleted (its placements stay), so
//!   the placer's repair can put it again, and the answer is `UnknownBlock`;
//! - `Release` removes only the requesting peer's placements; a block goes
//!   once no placer is left.
//!
//! The volume is blocking I/O: every request runs on tokio's blocking pool,
//! never on the event loop, and at most [`MAX_CONCURRENT`] run at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, Class, LocalStore, Score, Staged, score};
use futures::future::BoxFuture;
use libp2p::PeerId;
use tokio::sync::Semaphore;

use crate::Error;
use crate::codec::InboundRequest;
use crate::ledger::Ledger;
use crate::node::Handler;
use crate::proto::{Bitmap, ErrorCode, NONCE_LEN, Request, Response};

/// Requests a holder works on at once; more wait (each may hold a block in memory).
pub const MAX_CONCURRENT: usize = 8;

/// Puts and releases of scores in one stripe are serialised; others run in parallel.
const STRIPES: usize = 16;

/// What a holder keeps for others, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HolderStats {
    /// Bytes offered to peers (the `--capacity` given).
    pub capacity: u64,
    /// Bytes offered now: the capacity, or less when the disk has less
    /// room (see [`disk_reserve`]).
    pub offered: u64,
    /// Blocks held for peers.
    pub held_blocks: u64,
    /// Bytes of blocks held for peers.
    pub held_bytes: u64,
    /// Owners whose root record this node keeps.
    pub root_records: u64,
}

/// Bytes of a disk of `total` bytes that held blocks leave free: the
/// volume's index, its temporary files and the rest of the system need
/// room too, and a disk that fills fails every write on it. A fiftieth of
/// the disk, at least 16 MiB and at most 1 GiB.
pub fn disk_reserve(total: u64) -> u64 {
    (total / 50).clamp(16 << 20, 1 << 30)
}

/// Room left on a short disk that ends its warning (see [`Inner::reserve`]).
const DISK_ROOM_AGAIN: u64 = 16 << 20;

/// A holder's terms when it stores for pay: its signed offer, the contracts
/// it accepts, and who may place without one. `fincrypt-market` implements
/// it; the holder itself knows nothing of prices or signatures.
pub trait Terms: Send + Sync {
    /// The node's offer, signed, stating `room` bytes free.
    fn offer(&self, room: u64) -> Result<Bytes, ErrorCode>;
    /// Checks a contract `peer` proposes, and countersigns and keeps it if
    /// it meets the node's terms.
    fn propose(&self, peer: &PeerId, proposal: &[u8]) -> Result<Bytes, ErrorCode>;
    /// Whether `peer` may place blocks here: `NoContract` when it needs a
    /// contract first, `Unpaid` when its contract is behind in payment.
    fn admits(&self, peer: &PeerId) -> Result<(), ErrorCode>;
    /// Takes note of `peer`'s notice that it paid for periods of its contract.
    fn paid(&self, peer: &PeerId, notice: &[u8]) -> Result<(), ErrorCode>;
    /// Whether `payer` may place blocks here for `owner`: the owner is
    /// admitted, and one of its contracts here is paid by `payer`.
    fn admits_for(&self, payer: &PeerId, owner: &PeerId) -> Result<(), ErrorCode>;
}

/// Serves other peers' blocks from a local volume; cheap to clone.
#[derive(Clone)]
pub struct Holder {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
}

struct Inner {
    store: Arc<LocalStore>,
    ledger: Ledger,
    capacity: u64,
    /// The only peers that may place blocks, root records and device
    /// bindings here; `None`: any peer.
    accept_from: std::sync::RwLock<Option<std::collections::HashSet<PeerId>>>,
    /// The node's terms when it charges; `None`: it stores for free.
    terms: std::sync::RwLock<Option<Arc<dyn Terms>>>,
    /// True while new blocks are refused because the disk, not the
    /// capacity, is short: the condition is logged when it changes.
    disk_short: std::sync::atomic::AtomicBool,
    /// Bytes of puts admitted but not yet counted in the store's statistics.
    reserved: Mutex<u64>,
    stripes: Vec<Mutex<()>>,
    /// New blocks waiting to be stored together (see [`Inner::store_new`]).
    group: Mutex<Group>,
    group_done: Condvar,
}

/// Puts of new blocks, staged, that are ready while others are being linked
/// in wait and are then linked in together with their placements: one commit
/// for all of them rather than one each, which would be most of a put's cost
/// on a disk.
#[derive(Default)]
struct Group {
    /// Waiting to be taken by the next committer.
    pending: Vec<GroupPut>,
    /// True while a thread stores a taken group.
    busy: bool,
    /// Results of stored puts, by ticket, until their thread collects them.
    done: HashMap<u64, Result<(), ErrorCode>>,
    next_ticket: u64,
}

struct GroupPut {
    ticket: u64,
    peer: PeerId,
    staged: Staged,
}

impl Holder {
    /// A holder over `store`, offering `capacity` bytes. Its placement
    /// ledger lives in `store`'s index; one kept in a file of its own at
    /// `old_ledger` (the earlier layout) is moved in.
    pub fn open(store: Arc<LocalStore>, old_ledger: &Path, capacity: u64) -> Result<Holder, Error> {
        let ledger = Ledger::open(store.clone(), old_ledger)?;
        Ok(Holder {
            inner: Arc::new(Inner {
                store,
                ledger,
                capacity,
                accept_from: std::sync::RwLock::new(None),
                terms: std::sync::RwLock::new(None),
                disk_short: std::sync::atomic::AtomicBool::new(false),
                reserved: Mutex::new(0),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                group: Mutex::new(Group::default()),
                group_done: Condvar::new(),
            }),
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        })
    }

    /// Takes new blocks, root records and device bindings only from
    /// `peers` (any peer when `None`). To the others the node is full: it
    /// answers `Space` with no room and a put with `Full`, so they place
    /// elsewhere. What they placed before stays theirs to read, prove and
    /// release.
    pub fn accept_from(&self, peers: Option<Vec<PeerId>>) {
        *self
            .inner
            .accept_from
            .write()
            .unwrap_or_else(|p| p.into_inner()) = peers.map(|p| p.into_iter().collect());
    }

    /// Stores under `terms` from now on: offers are answered, contracts
    /// taken, and a peer that needs a contract may not place without one.
    pub fn set_terms(&self, terms: Arc<dyn Terms>) {
        *self.inner.terms.write().unwrap_or_else(|p| p.into_inner()) = Some(terms);
    }

    /// The volume the held blocks live in.
    pub fn store(&self) -> &Arc<LocalStore> {
        &self.inner.store
    }

    /// Room offered, and what is held in it.
    pub fn stats(&self) -> HolderStats {
        let s = self.inner.store.stats();
        let reserved = *self
            .inner
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        HolderStats {
            capacity: self.inner.capacity,
            offered: self.inner.room(s.held_bytes.saturating_add(reserved)),
            held_blocks: s.held_blocks,
            held_bytes: s.held_bytes,
            root_records: self.inner.ledger.root_records().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot count the root records kept");
                0
            }),
        }
    }

    /// The peers that placed `score` here.
    pub fn placers(&self, score: &Score) -> Result<Vec<PeerId>, Error> {
        self.inner.ledger.placers(score)
    }

    /// Blocks and bytes held for each peer that placed any: a block two
    /// peers placed counts for both. One full read of the placement ledger.
    pub fn held_by_placer(&self) -> Result<HashMap<PeerId, (u64, u64)>, Error> {
        let mut out: HashMap<PeerId, (u64, u64)> = HashMap::new();
        let mut sizes: HashMap<Score, u64> = HashMap::new();
        for (score, peer) in self.inner.ledger.all()? {
            let size = match sizes.get(&score) {
                Some(s) => *s,
                None => {
                    // A placement whose block is gone (a crash between the
                    // two) holds nothing.
                    let s = self.inner.store.size_of(&score)?.unwrap_or(0);
                    sizes.insert(score, s);
                    s
                }
            };
            let e = out.entry(peer).or_default();
            e.0 += 1;
            e.1 += size;
        }
        Ok(out)
    }

    /// Removes every placement `peer` made here (not those of other
    /// devices of its owner); a block no one else placed is deleted. Root
    /// records and device bindings stay. Blocks, bytes released.
    pub fn release_all(&self, peer: &PeerId) -> Result<(u64, u64), Error> {
        let scores: Vec<Score> = self
            .inner
            .ledger
            .all()?
            .into_iter()
            .filter(|(_, p)| p == peer)
            .map(|(s, _)| s)
            .collect();
        let (mut blocks, mut bytes) = (0, 0);
        for chunk in scores.chunks(1024) {
            let sizes: Vec<u64> = chunk
                .iter()
                .map(|s| Ok(self.inner.store.size_of(s)?.unwrap_or(0)))
                .collect::<Result<_, Error>>()?;
            let released = self
                .inner
                .release(*peer, chunk, false)
                .map_err(|code| Error::Ledger(format!("releasing {peer}'s blocks: {code}")))?;
            for (i, size) in sizes.iter().enumerate() {
                if released.get(i) {
                    blocks += 1;
                    bytes += size;
                }
            }
        }
        Ok((blocks, bytes))
    }

    /// Answers one request from `peer`, on the blocking pool.
    pub async fn serve(&self, peer: PeerId, request: InboundRequest) -> Response {
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "undecodable request");
                return Response::Error(e.to_code());
            }
        };
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return Response::Error(ErrorCode::Unavailable);
        };
        let inner = self.inner.clone();
        match tokio::task::spawn_blocking(move || inner.answer(peer, request)).await {
            Ok(response) => response,
            Err(e) => {
                tracing::error!(%peer, error = %e, "holder task failed");
                Response::Error(ErrorCode::Unavailable)
            }
        }
    }

    /// Answers one request from `peer` on the calling thread (blocking I/O).
    pub fn answer_blocking(&self, peer: PeerId, request: Request) -> Response {
        self.inner.answer(peer, request)
    }
}

impl Handler for Holder {
    fn handle(&self, peer: PeerId, request: InboundRequest) -> BoxFuture<'static, Response> {
        let holder = self.clone();
        Box::pin(async move { holder.serve(peer, request).await })
    }
}

/// Turns a local failure into the answer a peer gets, logging the detail
/// here: paths and error text stay on this machine.
fn unavailable(what: &str, e: impl std::fmt::Display) -> ErrorCode {
    tracing::error!(error = %e, "holder could not {what}");
    ErrorCode::Unavailable
}

impl Inner {
    /// Whether `peer` may place here (see [`Holder::accept_from`]).
    fn accepts(&self, peer: &PeerId) -> bool {
        self.accept_from
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|peers| peers.contains(peer))
    }

    fn answer(&self, peer: PeerId, request: Request) -> Response {
        let places = matches!(
            request,
            Request::Put { .. } | Request::PutRoot { .. } | Request::Bind { .. }
        );
        if places && !self.accepts(&peer) {
            tracing::debug!(%peer, "a placement from a peer not in accept_from refused");
            return Response::Error(ErrorCode::Full { free: 0 });
        }
        let terms = self.terms.read().unwrap_or_else(|p| p.into_inner()).clone();
        if places && let Some(Err(code)) = terms.as_ref().map(|t| t.admits(&peer)) {
            tracing::debug!(%peer, %code, "a placement refused under the node's terms");
            return Response::Error(code);
        }
        let result = match request {
            Request::Put { score, data } => self.put(peer, score, data).map(|()| Response::Stored),
            Request::Get { score } => self.get(&score).map(|data| Response::Block { data }),
            Request::Has { scores } => self.has(&scores).map(|held| Response::Have { held }),
            Request::Challenge { score, nonce } => self
                .prove(&score, &nonce)
                .map(|proof| Response::Proof { proof }),
            Request::Release { scores } => self
                .release(peer, &scores, true)
                .map(|released| Response::Released { released }),
            Request::Bulk { .. } => Err(ErrorCode::bad_request(
                "this node offers no bulk connections",
            )),
            Request::PutRoot { record } => self.put_root(&record),
            Request::Bind { owner, signature } => {
                if !crate::root::verify_binding(&owner, &peer, &signature) {
                    Err(ErrorCode::bad_request(
                        "the binding does not verify for this peer",
                    ))
                } else {
                    match self.ledger.bind(&peer, &owner) {
                        Ok(true) => Ok(Response::Stored),
                        Ok(false) => Err(ErrorCode::Full { free: 0 }),
                        Err(e) => Err(unavailable("record a device", e)),
                    }
                }
            }
            Request::GetRoot { owner } => self
                .ledger
                .root(&owner)
                .map(|r| Response::Root {
                    record: r.map(Bytes::from),
                })
                .map_err(|e| unavailable("read a root slot", e)),
            Request::Offer => match &terms {
                Some(t) => {
                    if let Err(code @ ErrorCode::Unpaid { .. }) = t.admits(&peer) {
                        // An owner behind in payment learns why it may not place.
                        return Response::Error(code);
                    }
                    let used = self.store.stats().held_bytes;
                    let room = if self.accepts(&peer) {
                        self.room(used).saturating_sub(used)
                    } else {
                        0
                    };
                    t.offer(room).map(|offer| Response::Offer { offer })
                }
                None => Err(ErrorCode::refused(
                    "this node makes no offer: it stores for free",
                )),
            },
            Request::Propose { proposal } => match &terms {
                Some(t) => t
                    .propose(&peer, &proposal)
                    .map(|contract| Response::Contract { contract }),
                None => Err(ErrorCode::refused(
                    "this node stores for free: it needs no contract",
                )),
            },
            Request::Mediate { .. } => Err(ErrorCode::refused(
                "this node is no mediator: it keeps blocks",
            )),
            Request::PutFor { owner, score, data } => match PeerId::from_bytes(&owner) {
                Err(_) => Err(ErrorCode::bad_request("the owner is not a PeerId")),
                Ok(owner) if !self.accepts(&owner) => Err(ErrorCode::Full { free: 0 }),
                Ok(owner) => match &terms {
                    Some(t) => t
                        .admits_for(&peer, &owner)
                        .and_then(|()| self.put(owner, score, data))
                        .map(|()| Response::Stored),
                    None => Err(ErrorCode::refused(
                        "this node stores for free: only an owner places its blocks here",
                    )),
                },
            },
            Request::Paid { notice } => match &terms {
                Some(t) => t.paid(&peer, &notice).map(|()| Response::Noted),
                None => Err(ErrorCode::refused(
                    "this node stores for free: it is owed nothing",
                )),
            },
            Request::Space => {
                let used = self.store.stats().held_bytes;
                // A peer that may not place here sees no room: one not in
                // accept_from, or without the contract a priced node needs.
                let needs_contract = terms.as_ref().is_some_and(|t| t.admits(&peer).is_err());
                let capacity = if self.accepts(&peer) && !needs_contract {
                    self.room(used)
                } else {
                    used
                };
                Ok(Response::Space { capacity, used })
            }
        };
        result.unwrap_or_else(Response::Error)
    }

    fn stripe(&self, score: &Score) -> MutexGuard<'_, ()> {
        let i = score.0[0] as usize % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, peer: PeerId, score: Score, data: Bytes) -> Result<(), ErrorCode> {
        if Score::of(&data) != score {
            tracing::debug!(%peer, %score, "refused a block that does not match its score");
            return Err(ErrorCode::ScoreMismatch);
        }
        let _stripe = self.stripe(&score);
        let class = self
            .store
            .class_of(&score)
            .map_err(|e| unavailable("look up a block", e))?;
        if matches!(class, Some(Class::Held | Class::Own)) {
            // Kept for good already (for this peer or another): only the placement is new.
            self.ledger
                .add(&score, &peer)
                .map_err(|e| unavailable("record a placement", e))?;
            return Ok(());
        }
        // New, or only a cached copy that eviction could take: store it as held.
        let len = data.len() as u64;
        self.reserve(len)?;
        // Each put writes its block as it comes, in parallel with the others;
        // only linking the blocks in is done for a group at a time.
        let result = self
            .store
            .stage(&score, &data, Class::Held, true)
            .and_then(|mut staged| staged.sync().map(|()| staged))
            .map_err(|e| unavailable("store a block", e))
            .and_then(|staged| {
                drop(data);
                self.store_new(peer, staged)
            });
        *self.reserved.lock().unwrap_or_else(|p| p.into_inner()) -= len;
        result
    }

    /// The bytes of held blocks this node can take in all, with `used`
    /// taken already: the capacity, or what the disk still has room for
    /// (beyond its reserve) if that is less. A disk that cannot be asked
    /// leaves the capacity (the write itself will then tell).
    fn room(&self, used: u64) -> u64 {
        match self.store.disk_space() {
            Ok(disk) => {
                let spare = disk.available.saturating_sub(disk_reserve(disk.total));
                self.capacity.min(used.saturating_add(spare))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the held volume's disk for its room");
                self.capacity
            }
        }
    }

    /// Admits `len` more bytes if they fit in the capacity and on the disk.
    fn reserve(&self, len: u64) -> Result<(), ErrorCode> {
        use std::sync::atomic::Ordering;
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let used = self.store.stats().held_bytes.saturating_add(*reserved);
        let room = self.room(used);
        if used.saturating_add(len) > room {
            if room < self.capacity
                && used.saturating_add(len) <= self.capacity
                && !self.disk_short.swap(true, Ordering::Relaxed)
            {
                let disk = self.store.disk_space().ok();
                tracing::warn!(
                    available = disk.map(|d| d.available),
                    reserve = disk.map(|d| disk_reserve(d.total)),
                    "the disk of the held volume is nearly full: new blocks are refused \
                     (peers are told the node is full) until there is room again"
                );
            }
            return Err(ErrorCode::Full {
                free: room.saturating_sub(used),
            });
        }
        // Room again only with some to spare: a small block that fits just
        // after a refusal would otherwise flip the warning back and forth.
        if (room >= self.capacity
            || room.saturating_sub(used.saturating_add(len)) >= DISK_ROOM_AGAIN)
            && self.disk_short.swap(false, Ordering::Relaxed)
        {
            tracing::info!("the disk of the held volume has room again: new blocks are taken");
        }
        *reserved += len;
        Ok(())
    }

    /// Links a new block, staged and synced, into the volume with its
    /// placement, in a group with the puts that wait meanwhile; returns once
    /// this one is durable (or failed).
    ///
    /// Whichever waiting thread finds no group being stored takes every
    /// pending put and stores them; the others wait for their result.
    fn store_new(&self, peer: PeerId, staged: Staged) -> Result<(), ErrorCode> {
        let lock = || self.group.lock().unwrap_or_else(|p| p.into_inner());
        let mut group = lock();
        let ticket = group.next_ticket;
        group.next_ticket += 1;
        group.pending.push(GroupPut {
            ticket,
            peer,
            staged,
        });
        loop {
            if let Some(result) = group.done.remove(&ticket) {
                return result;
            }
            if !group.busy {
                group.busy = true;
                let puts = std::mem::take(&mut group.pending);
                drop(group);
                let tickets: Vec<u64> = puts.iter().map(|p| p.ticket).collect();
                // A panic must not leave `busy` set and every later put waiting.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.store_group(puts)
                }))
                .unwrap_or(Err(ErrorCode::Unavailable));
                group = lock();
                group.busy = false;
                for ticket in tickets {
                    group.done.insert(ticket, result.clone());
                }
                self.group_done.notify_all();
                continue;
            }
            group = self
                .group_done
                .wait(group)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Links the blocks in durably with their placements, in one commit.
    fn store_group(&self, puts: Vec<GroupPut>) -> Result<(), ErrorCode> {
        let placements: Vec<(Score, PeerId)> =
            puts.iter().map(|p| (*p.staged.score(), p.peer)).collect();
        let staged = puts.into_iter().map(|p| p.staged).collect();
        self.store
            .put_staged_with(staged, Class::Held, true, |txn| {
                Ledger::add_in(txn, &placements).map(|_| ())
            })
            .map_err(|e| unavailable("store a block", e))
    }

    /// Reads a placed block; a copy that fails its check is deleted.
    fn read(&self, score: &Score) -> Result<Bytes, ErrorCode> {
        let placed = self
            .ledger
            .placed(std::slice::from_ref(score))
            .map_err(|e| unavailable("read the ledger", e))?;
        if placed != [true] {
            return Err(ErrorCode::UnknownBlock);
        }
        match self.store.get(score) {
            Ok(data) => Ok(data),
            Err(fincrypt_blockstore::Error::NotFound(_)) => Err(ErrorCode::UnknownBlock),
            Err(fincrypt_blockstore::Error::Corrupt { reason, .. }) => {
                tracing::warn!(%score, %reason, "a held block is damaged; deleting the copy");
                let _stripe = self.stripe(score);
                self.delete_held(score)?;
                Err(ErrorCode::UnknownBlock)
            }
            Err(e) => Err(unavailable("read a block", e)),
        }
    }

    fn get(&self, score: &Score) -> Result<Bytes, ErrorCode> {
        self.read(score)
    }

    fn prove(&self, score: &Score, nonce: &[u8; NONCE_LEN]) -> Result<score::Proof, ErrorCode> {
        let data = self.read(score)?;
        let index = score::challenge_index(score, nonce, data.len() as u64);
        score::prove(&data, index).ok_or_else(|| unavailable("prove a block", "index out of range"))
    }

    fn has(&self, scores: &[Score]) -> Result<Bitmap, ErrorCode> {
        let placed = self
            .ledger
            .placed(scores)
            .map_err(|e| unavailable("read the ledger", e))?;
        let mut held = Vec::with_capacity(scores.len());
        for (score, placed) in scores.iter().zip(placed) {
            held.push(
                placed
                    && self
                        .store
                        .has(score)
                        .map_err(|e| unavailable("look up a block", e))?,
            );
        }
        Ok(Bitmap::from_bools(held))
    }

    /// The owner `peer` is a bound device of; none if unknown or unreadable.
    fn owner_of(&self, peer: &PeerId) -> Option<[u8; 32]> {
        self.ledger.owner_of(peer).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the devices table");
            None
        })
    }

    /// `peer`'s release of `scores`; with `devices`, also the placements
    /// of the other devices of its owner.
    fn release(&self, peer: PeerId, scores: &[Score], devices: bool) -> Result<Bitmap, ErrorCode> {
        let owner = if devices { self.owner_of(&peer) } else { None };
        let mut released = vec![false; scores.len()];
        let mut by_stripe: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, s) in scores.iter().enumerate() {
            by_stripe
                .entry(s.0[0] as usize % STRIPES)
                .or_default()
                .push(i);
        }
        for indices in by_stripe.values() {
            let _stripe = self.stripe(&scores[indices[0]]);
            let mut removals = Vec::new();
            for &i in indices {
                let score = scores[i];
                let placers = self
                    .ledger
                    .placers(&score)
                    .map_err(|e| unavailable("read the ledger", e))?;
                // The requester's own placement, and those of other devices
                // of the same owner (a recovered machine has a new PeerId).
                let mine: Vec<PeerId> = placers
                    .iter()
                    .copied()
                    .filter(|p| *p == peer || owner.is_some() && self.owner_of(p) == owner)
                    .collect();
                if mine.is_empty() || removals.iter().any(|(s, _)| *s == score) {
                    continue;
                }
                // The last placers' release frees the block, before their
                // placements go: a crash in between leaves a placement
                // without a block, which a release again clears.
                if placers.len() == mine.len() {
                    self.delete_held(&score)?;
                }
                removals.extend(mine.into_iter().map(|p| (score, p)));
                released[i] = true;
            }
            if !removals.is_empty() {
                self.ledger
                    .remove(&removals)
                    .map_err(|e| unavailable("update the ledger", e))?;
            }
        }
        Ok(Bitmap::from_bools(released))
    }

    /// Keeps a valid root record newer than the one in its owner's slot.
    fn put_root(&self, bytes: &[u8]) -> Result<Response, ErrorCode> {
        let record = crate::root::SignedRoot::decode(bytes).map_err(ErrorCode::bad_request)?;
        match self
            .ledger
            .offer_root(&record, bytes)
            .map_err(|e| unavailable("write a root slot", e))?
        {
            crate::ledger::RootOffer::Kept => Ok(Response::Stored),
            crate::ledger::RootOffer::Stale(sequence) => Err(ErrorCode::Stale { sequence }),
            crate::ledger::RootOffer::Full => Err(ErrorCode::Full { free: 0 }),
        }
    }

    /// Deletes a block no peer needs any more, unless it is also this node's own or cached copy.
    fn delete_held(&self, score: &Score) -> Result<(), ErrorCode> {
        let class = self
            .store
            .class_of(score)
            .map_err(|e| unavailable("look up a block", e))?;
        if class == Some(Class::Held) {
            self.store
                .delete(score)
                .map_err(|e| unavailable("delete a block", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::StoreOptions;

    fn holder(capacity: u64) -> (tempfile::TempDir, Holder) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
        let h = Holder::open(store, &dir.path().join("placements.redb"), capacity).unwrap();
        (dir, h)
    }

    fn block(n: u8, len: usize) -> (Score, Bytes) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ n).collect();
        (Score::of(&data), Bytes::from(data))
    }

    #[test]
    fn a_root_slot_keeps_the_highest_valid_record_and_refuses_rollback_and_forgery() {
        use crate::root::{Owner, SignedRoot};
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let store = Arc::new(
                LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap(),
            );
            Holder::open(store, &dir.path().join("placements.redb"), 1 << 20).unwrap()
        };
        let h = open();
        let owner = Owner::from_seed(&[5; 32]);
        let key = [1u8; 32];
        let rec =
            |seq: u64| Bytes::from(owner.sign(seq, 0, &key, b"root").unwrap().encode().unwrap());
        let p = PeerId::random();
        let get = |h: &Holder| match h.answer_blocking(
            p,
            Request::GetRoot {
                owner: owner.public(),
            },
        ) {
            Response::Root { record } => record.map(|r| SignedRoot::decode(&r).unwrap().sequence),
            other => panic!("GetRoot answered {other:?}"),
        };
        assert_eq!(get(&h), None);
        let two = rec(2);
        assert_eq!(
            h.answer_blocking(
                p,
                Request::PutRoot {
                    record: two.clone()
                }
            ),
            Response::Stored
        );
        // The same record again is fine; another of an equal or lower sequence is
        // refused with the kept sequence.
        assert_eq!(
            h.answer_blocking(p, Request::PutRoot { record: two }),
            Response::Stored
        );
        assert_eq!(
            h.answer_blocking(p, Request::PutRoot { record: rec(2) }),
            Response::Error(ErrorCode::Stale { sequence: 2 })
        );
        assert_eq!(
            h.answer_blocking(p, Request::PutRoot { record: rec(1) }),
            Response::Error(ErrorCode::Stale { sequence: 2 })
        );
        // Signed by another key but naming this owner: refused, slot unchanged.
        let mut forged = Owner::from_seed(&[6; 32])
            .sign(9, 0, &key, b"evil")
            .unwrap();
        forged.owner = owner.public();
        let forged = Bytes::from(forged.encode().unwrap());
        assert!(matches!(
            h.answer_blocking(p, Request::PutRoot { record: forged }),
            Response::Error(ErrorCode::BadRequest(_))
        ));
        assert!(matches!(
            h.answer_blocking(
                p,
                Request::PutRoot {
                    record: Bytes::from_static(b"\x01garbage")
                }
            ),
            Response::Error(ErrorCode::BadRequest(_))
        ));
        assert_eq!(get(&h), Some(2));
        assert_eq!(
            h.answer_blocking(p, Request::PutRoot { record: rec(3) }),
            Response::Stored
        );
        assert_eq!(h.stats().root_records, 1);
        drop(h);
        // Kept across a restart, and still refusing the old one.
        let h = open();
        assert_eq!(get(&h), Some(3));
        assert_eq!(
            h.answer_blocking(p, Request::PutRoot { record: rec(2) }),
            Response::Error(ErrorCode::Stale { sequence: 3 })
        );
    }

    #[test]
    fn a_bound_device_releases_what_another_device_of_its_owner_placed() {
        use crate::root::Owner;
        let (_d, h) = holder(1 << 20);
        let owner = Owner::from_seed(&[3; 32]);
        let (lost, recovered, stranger) = (PeerId::random(), PeerId::random(), PeerId::random());
        let (s, data) = block(7, 5000);
        let (t, other) = block(8, 5000);
        for (score, data) in [(s, data), (t, other.clone())] {
            assert_eq!(
                h.answer_blocking(lost, Request::Put { score, data }),
                Response::Stored
            );
        }
        // Another peer's placement of t stays whatever the owner's devices do.
        assert_eq!(
            h.answer_blocking(
                stranger,
                Request::Put {
                    score: t,
                    data: other
                }
            ),
            Response::Stored
        );
        let bind = |p: PeerId, sig: Vec<u8>| {
            h.answer_blocking(
                p,
                Request::Bind {
                    owner: owner.public(),
                    signature: sig,
                },
            )
        };
        // Unbound, or bound with a signature over another PeerId: releases are ignored.
        let release =
            |p: PeerId| match h.answer_blocking(p, Request::Release { scores: vec![s, t] }) {
                Response::Released { released } => released.to_bools(),
                other => panic!("{other:?}"),
            };
        assert_eq!(release(recovered), vec![false, false]);
        assert!(matches!(
            bind(recovered, owner.bind(&stranger)),
            Response::Error(ErrorCode::BadRequest(_))
        ));
        assert_eq!(release(recovered), vec![false, false]);
        // The lost machine was bound before it was lost; the recovered one now is.
        assert_eq!(bind(lost, owner.bind(&lost)), Response::Stored);
        assert_eq!(bind(recovered, owner.bind(&recovered)), Response::Stored);
        assert_eq!(release(recovered), vec![true, true]);
        // s is gone; t stays for the stranger.
        assert!(matches!(
            h.answer_blocking(stranger, Request::Get { score: s }),
            Response::Error(ErrorCode::UnknownBlock)
        ));
        assert!(matches!(
            h.answer_blocking(stranger, Request::Get { score: t }),
            Response::Block { .. }
        ));
        assert_eq!(h.placers(&t).unwrap(), vec![stranger]);
    }

    #[test]
    fn put_get_has_prove_release() {
        let (_d, h) = holder(1 << 20);
        let (a, b) = (PeerId::random(), PeerId::random());
        let (s, data) = block(1, 10_000);
        let put = Request::Put {
            score: s,
            data: data.clone(),
        };
        assert_eq!(h.answer_blocking(a, put.clone()), Response::Stored);
        assert_eq!(
            h.answer_blocking(a, Request::Get { score: s }),
            Response::Block { data: data.clone() }
        );
        let Response::Have { held } = h.answer_blocking(
            b,
            Request::Has {
                scores: vec![s, Score([0; 32])],
            },
        ) else {
            panic!("not a Have");
        };
        assert_eq!(held.to_bools(), vec![true, false]);

        let nonce = [4; NONCE_LEN];
        let Response::Proof { proof } =
            h.answer_blocking(b, Request::Challenge { score: s, nonce })
        else {
            panic!("not a proof");
        };
        let index = score::challenge_index(&s, &nonce, proof.block_len);
        assert!(score::verify(&s, index, &proof));

        // b did not place it: its release changes nothing.
        let Response::Released { released } =
            h.answer_blocking(b, Request::Release { scores: vec![s] })
        else {
            panic!("not Released");
        };
        assert_eq!(released.to_bools(), vec![false]);
        assert_eq!(h.stats().held_blocks, 1);

        // b places it too; a's release keeps it for b; b's frees it.
        assert_eq!(h.answer_blocking(b, put), Response::Stored);
        let Response::Released { released } =
            h.answer_blocking(a, Request::Release { scores: vec![s, s] })
        else {
            panic!("not Released");
        };
        assert_eq!(released.to_bools(), vec![true, false]);
        assert_eq!(h.stats().held_blocks, 1);
        h.answer_blocking(b, Request::Release { scores: vec![s] });
        assert_eq!(h.stats().held_blocks, 0);
        assert_eq!(
            h.answer_blocking(a, Request::Get { score: s }),
            Response::Error(ErrorCode::UnknownBlock)
        );
    }

    #[test]
    fn mismatch_and_capacity_are_refused() {
        let (_d, h) = holder(15_000);
        let p = PeerId::random();
        let (s, data) = block(1, 10_000);
        let (_, other) = block(2, 10_000);
        assert_eq!(
            h.answer_blocking(
                p,
                Request::Put {
                    score: s,
                    data: other
                }
            ),
            Response::Error(ErrorCode::ScoreMismatch)
        );
        assert_eq!(h.placers(&s).unwrap(), vec![]);
        assert_eq!(
            h.answer_blocking(p, Request::Put { score: s, data }),
            Response::Stored
        );
        let (s2, data2) = block(3, 10_000);
        assert_eq!(
            h.answer_blocking(
                p,
                Request::Put {
                    score: s2,
                    data: data2
                }
            ),
            Response::Error(ErrorCode::Full { free: 5_000 })
        );
        // A block already held costs no room.
        let (s, data) = block(1, 10_000);
        assert_eq!(
            h.answer_blocking(PeerId::random(), Request::Put { score: s, data }),
            Response::Stored
        );
        assert_eq!(
            h.answer_blocking(p, Request::Space),
            Response::Space {
                capacity: 15_000,
                used: 10_000
            }
        );
    }

    #[test]
    fn only_accepted_peers_place_and_the_others_see_no_room() {
        let (_d, h) = holder(1 << 20);
        let (friend, stranger) = (PeerId::random(), PeerId::random());
        h.accept_from(Some(vec![friend]));
        let (score, data) = block(1, 5000);
        assert_eq!(
            h.answer_blocking(
                stranger,
                Request::Put {
                    score,
                    data: data.clone()
                }
            ),
            Response::Error(ErrorCode::Full { free: 0 })
        );
        assert_eq!(
            h.answer_blocking(stranger, Request::Space),
            Response::Space {
                capacity: 0,
                used: 0
            }
        );
        assert_eq!(
            h.answer_blocking(friend, Request::Put { score, data }),
            Response::Stored
        );
        // What the friend placed, the stranger still cannot read as its own
        // placement, but may ask about: reads concern any placed block.
        assert!(matches!(
            h.answer_blocking(stranger, Request::Get { score }),
            Response::Block { .. }
        ));
        h.accept_from(None);
        assert!(matches!(
            h.answer_blocking(stranger, Request::Space),
            Response::Space { capacity, .. } if capacity == 1 << 20
        ));
    }

    #[test]
    fn own_blocks_are_not_served_and_a_damaged_copy_is_dropped() {
        let (_d, h) = holder(1 << 20);
        let p = PeerId::random();
        let (own, data) = block(5, 5000);
        h.store().put(own, data, Class::Own).unwrap();
        assert_eq!(
            h.answer_blocking(p, Request::Get { score: own }),
            Response::Error(ErrorCode::UnknownBlock)
        );

        let (s, data) = block(6, 9000);
        h.answer_blocking(
            p,
            Request::Put {
                score: s,
                data: data.clone(),
            },
        );
        let path = h.store().path_of(&s);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let challenge = Request::Challenge {
            score: s,
            nonce: [0; NONCE_LEN],
        };
        assert_eq!(
            h.answer_blocking(p, challenge),
            Response::Error(ErrorCode::UnknownBlock)
        );
        assert_eq!(h.stats().held_blocks, 0);
        // The placer's repair puts it again.
        assert_eq!(
            h.answer_blocking(
                p,
                Request::Put {
                    score: s,
                    data: data.clone()
                }
            ),
            Response::Stored
        );
        assert_eq!(
            h.answer_blocking(p, Request::Get { score: s }),
            Response::Block { data }
        );
    }

    #[test]
    fn concurrent_puts_never_overfill_the_capacity() {
        let (_d, h) = holder(50_000);
        let outcomes: Vec<Response> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..16u8)
                .map(|i| {
                    let h = h.clone();
                    scope.spawn(move || {
                        let (score, data) = block(100 + i, 10_000);
                        h.answer_blocking(PeerId::random(), Request::Put { score, data })
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let stored = outcomes.iter().filter(|r| **r == Response::Stored).count();
        let full = outcomes
            .iter()
            .filter(|r| matches!(r, Response::Error(ErrorCode::Full { .. })))
            .count();
        assert_eq!((stored, full), (5, 11), "{outcomes:?}");
        assert_eq!(h.stats().held_bytes, 50_000);
    }

    #[test]
    fn puts_stored_together_are_each_durable_placed_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let blocks: Vec<(Score, Bytes)> = (0..48u8).map(|i| block(i, 5000 + i as usize)).collect();
        {
            let store = Arc::new(
                LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap(),
            );
            let h = Holder::open(store, &dir.path().join("placements.redb"), 1 << 30).unwrap();
            // More threads than stripes and a shared block: puts overlap and group.
            let outcomes: Vec<Response> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..24usize)
                    .map(|t| {
                        let (h, blocks, peers) = (h.clone(), &blocks, &peers);
                        scope.spawn(move || {
                            let mut out = Vec::new();
                            for (score, data) in
                                blocks.iter().skip(t * 2).take(2).chain(&blocks[..1])
                            {
                                let put = Request::Put {
                                    score: *score,
                                    data: data.clone(),
                                };
                                out.push(h.answer_blocking(peers[t % 4], put));
                            }
                            out
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap())
                    .collect()
            });
            assert!(
                outcomes.iter().all(|r| *r == Response::Stored),
                "{outcomes:?}"
            );
            let total: u64 = blocks.iter().map(|(_, d)| d.len() as u64).sum();
            assert_eq!(h.stats().held_blocks, 48);
            assert_eq!(h.stats().held_bytes, total);
            drop(h);
        }
        // Everything is there after reopening, with its placers.
        let store =
            Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
        let h = Holder::open(store, &dir.path().join("placements.redb"), 1 << 30).unwrap();
        for (i, (score, data)) in blocks.iter().enumerate() {
            let got = h.answer_blocking(peers[0], Request::Get { score: *score });
            assert_eq!(got, Response::Block { data: data.clone() });
            let placers = h.placers(score).unwrap();
            if i == 0 {
                assert_eq!(placers.len(), 4, "every thread's peer placed block 0");
            } else {
                assert_eq!(placers, vec![peers[(i / 2) % 4]]);
            }
        }
    }

    #[test]
    fn a_cached_copy_placed_by_a_peer_becomes_held() {
        let (_d, h) = holder(1 << 20);
        let (s, data) = block(7, 3000);
        h.store().put(s, data.clone(), Class::Cached).unwrap();
        let put = Request::Put { score: s, data };
        assert_eq!(h.answer_blocking(PeerId::random(), put), Response::Stored);
        assert_eq!(h.store().class_of(&s).unwrap(), Some(Class::Held));
        assert_eq!(h.stats().held_bytes, 3000);
    }

    #[tokio::test]
    async fn undecodable_requests_get_an_answer() {
        let (_d, h) = holder(1 << 20);
        let r = h
            .serve(
                PeerId::random(),
                Err(crate::proto::DecodeError::UnsupportedVersion(9)),
            )
            .await;
        assert_eq!(
            r,
            Response::Error(ErrorCode::UnsupportedVersion {
                supported: crate::proto::VERSION
            })
        );
    }
}
