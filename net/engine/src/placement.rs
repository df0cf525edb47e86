//! Placement of own blocks on peers, recorded in the owner's manifest.
//!
//! A pass takes what the owner's blocks want ([`Wanted`], from
//! [`crate::Wants`]): a data block its file's effective redundancy, every
//! other block the highest in use and at least [`META_REDUNDANCY`]. A block
//! short of copies is put on the peers closest to it in the whole network
//! (Kademlia's XOR distance, found by DHT lookups: [`crate::lookup`]) that
//! serve blocks and have room; each peer that stores it is recorded in the manifest
//! ([`Manifest`], docs/FORMATS.md). A block with no confirmed holder whose
//! local copy is also gone or damaged is *lost*: counted and named.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, Score};
use fincrypt_net::{Client, Error as NetError, ErrorCode, PeerId};
use futures::future::BoxFuture;

use crate::error::Result;
use crate::lookup::Lookups;
use crate::unix_now;

pub use crate::manifest::Manifest;

/// The least number of copies of blocks that are not file data.
pub const META_REDUNDANCY: u8 = 3;

/// Copies asked of each own block: score -> redundancy.
pub type Wanted = BTreeMap<Score, u8>;

/// The XOR distance Kademlia puts between a block and a peer: placement
/// orders peers by it, closest first.
pub use fincrypt_net::distance;

/// Figures of replication, for `status`.
#[derive(Default)]
pub struct ReplicationStats {
    /// Own blocks with fewer confirmed holders than asked, after the last pass.
    pub under_replicated: AtomicU64,
    /// Own blocks the last pass looked at.
    pub tracked_blocks: AtomicU64,
    /// Confirmed copies of those on peers, in all.
    pub placed_copies: AtomicU64,
    /// Copies put on peers (each a `Put` a holder confirmed), since start.
    pub copies_put: AtomicU64,
    /// Passes finished.
    pub passes: AtomicU64,
    /// Why blocks are short of copies, in words (empty when none are).
    pub reason: Mutex<String>,
    /// Storage proofs that checked out against the score.
    pub proofs_passed: AtomicU64,
    /// Challenges a holder failed: a wrong proof, "not held", or no answer.
    pub proofs_failed: AtomicU64,
    /// Holders dropped after consecutive failed proofs.
    pub holders_dropped: AtomicU64,
    /// Own blocks the last pass looked at, by the redundancy they ask for.
    pub by_redundancy: Mutex<BTreeMap<u8, u64>>,
    /// Own blocks with no confirmed holder and no good local copy: lost.
    pub lost: AtomicU64,
    /// Those blocks' scores.
    pub lost_blocks: Mutex<Vec<Score>>,
    /// Blocks that failed a proof or a read on one holder and were taken
    /// from that holder only, to be placed again.
    pub blocks_dropped: AtomicU64,
    /// Holders dropped because they stayed unreachable past the holder timeout.
    pub holders_unreachable: AtomicU64,
    /// Steps that found the change feed and the queue empty.
    pub passes_skipped: AtomicU64,
    /// Full passes (walks of everything the owner keeps).
    pub full_walks: AtomicU64,
    /// Releases not yet delivered after the last pass (asked again by the next).
    pub releases_pending: AtomicU64,
    /// Blocks the wanted walks of passes visited, in all.
    pub blocks_walked: AtomicU64,
    /// Manifest rows passes read, in all.
    pub rows_scanned: AtomicU64,
    /// Closest-peer lookups passes made, in all (one serves many blocks).
    pub lookups: AtomicU64,
}

/// Where paid storage enters placement: which of the peers closest to a
/// block may take it, in what order, and under what contract (the market
/// crate implements it; without one, placement takes the closest peers
/// with room, as a free network does).
pub trait Market: Send + Sync {
    /// Of `candidates` (closest to the block first, each with the room it
    /// reported), those a block of `len` bytes may go to, in the order to try. The
    /// market may make contracts on the way, enough for `need` copies; a
    /// peer contracted now comes with the room its offer gave (a priced
    /// peer shows none to an owner without a contract).
    fn choose<'a>(
        &'a self,
        len: u64,
        need: usize,
        candidates: Vec<(PeerId, u64)>,
    ) -> BoxFuture<'a, Vec<(PeerId, Option<u64>)>>;
    /// `peer` took `score` (`len` bytes).
    fn placed(&self, peer: &PeerId, score: &Score, len: u64);
    /// Makes what [`Market::placed`] was told durable: called before the
    /// manifest records the new holders, so no holder keeps a block the
    /// market does not count.
    fn persist(&self) -> std::result::Result<(), String>;
    /// `peer` let go of `scores` when asked to release them (it no longer
    /// keeps them for this owner).
    fn released(&self, _peer: &PeerId, _scores: &[Score]) {}
}

/// What a pass needs.
pub struct Replicator {
    pub client: Client,
    pub manifest: Arc<Manifest>,
    pub stats: Arc<ReplicationStats>,
    /// One pass at a time.
    running: tokio::sync::Mutex<()>,
    /// Paid storage's say in placement, once set.
    market: std::sync::OnceLock<Arc<dyn Market>>,
}

/// Puts of blocks to peers in flight at once.
const PARALLEL_BLOCKS: usize = 8;

/// Queue entries read and worked through at a time.
const QUEUE_BATCH: usize = 4096;

/// What [`Replicator::place_all`] left.
#[derive(Default)]
struct Placed {
    /// Copies made.
    copies: u64,
    /// Blocks that reached their copies.
    done: Vec<(Score, u8)>,
    /// Blocks still short.
    short: Vec<(Score, u8)>,
    /// Blocks with no holder and no readable local copy.
    lost: Vec<Score>,
}

/// Peers asked for their room at once at the start of a pass.
const PARALLEL_ASKS: usize = 16;

impl Replicator {
    /// A replicator placing through `client` and recording in `manifest`.
    pub fn new(client: Client, manifest: Arc<Manifest>) -> Replicator {
        Replicator {
            client,
            manifest,
            stats: Arc::new(ReplicationStats::default()),
            running: tokio::sync::Mutex::new(()),
            market: std::sync::OnceLock::new(),
        }
    }

    /// Places through `market` from now on (once; a second is ignored).
    pub fn set_market(&self, market: Arc<dyn Market>) {
        if self.market.set(market).is_err() {
            tracing::warn!("placement already has a market; the new one is ignored");
        }
    }

    /// What this pass knows of peers at its start.
    fn round(&self) -> Result<Round> {
        let now = unix_now();
        Ok(Round {
            me: self.client.local_peer_id(),
            banned: self
                .manifest
                .holder_records()?
                .into_iter()
                .filter(|(_, r)| r.banned(now))
                .map(|(p, _)| p)
                .collect(),
            lookups: Mutex::new(Lookups::default()),
            room: Mutex::new(HashMap::new()),
            lookup_error: Mutex::new(None),
        })
    }

    /// Blocks a dropped holder may still keep: no candidate for them in this
    /// pass, even if it lets go of its copy meanwhile (they go elsewhere).
    fn pending(&self) -> Result<Arc<HashSet<(PeerId, Score)>>> {
        Ok(Arc::new(
            self.manifest
                .pending_releases()?
                .into_iter()
                .flat_map(|(p, scores)| scores.into_iter().map(move |s| (p, s)))
                .collect(),
        ))
    }

    /// Places each block of `short` (score, copies wanted, holders now),
    /// records the holders that changed, and reports what it left.
    async fn place_all(
        &self,
        short: Vec<(Score, u8, Vec<PeerId>)>,
        round: &Round,
        local: &Arc<dyn BlockStore>,
        pending: &Arc<HashSet<(PeerId, Score)>>,
    ) -> Result<Placed> {
        use futures::StreamExt;
        let results = futures::stream::iter(short.into_iter().map(|(score, n, holders)| {
            let local = local.clone();
            let pending = pending.clone();
            async move {
                let before = holders.len();
                let (holders, readable) =
                    self.place(score, n, holders, round, &local, &pending).await;
                (score, n, before, holders, readable)
            }
        }))
        .buffer_unordered(PARALLEL_BLOCKS)
        .collect::<Vec<_>>()
        .await;
        let mut out = Placed::default();
        let mut changed = Vec::new();
        for (score, n, before, holders, readable) in results {
            out.copies += (holders.len().min(n as usize) - before.min(n as usize)) as u64;
            if holders.len() < n as usize {
                out.short.push((score, n));
            } else {
                out.done.push((score, n));
            }
            if holders.is_empty() && !readable {
                out.lost.push(score);
            }
            if holders.len() != before {
                changed.push((score, holders));
            }
        }
        if let Some(market) = self.market.get() {
            market.persist().map_err(crate::Error::Market)?;
        }
        self.manifest.set_many(&changed)?;
        Ok(out)
    }

    /// Says why `under` blocks are short, and records what was lost.
    fn report(&self, under: u64, lost: Vec<Score>, round: &Round) {
        let reason = if under == 0 {
            String::new()
        } else {
            let room = round.room.lock().unwrap_or_else(|p| p.into_inner());
            let serving = room.values().filter(|f| f.is_some()).count();
            let free = room.values().filter(|f| f.is_some_and(|f| f > 0)).count();
            let seen = round
                .lookups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .peers_seen();
            // A block takes one copy per peer: with fewer peers than copies
            // asked (metadata asks for at least META_REDUNDANCY), no pass
            // can do more.
            let mut note = format!(
                "{under} blocks short of copies, {seen} peers found in all (one copy each, \
                 metadata asks for {META_REDUNDANCY}): {serving} of the closest peers found \
                 serve blocks, {free} of them with room"
            );
            if let Some(e) = round
                .lookup_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                note.push_str(&format!("; a DHT lookup failed: {e}"));
            }
            note
        };
        *self.stats.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.stats.lost.store(lost.len() as u64, Ordering::Relaxed);
        if !lost.is_empty() {
            tracing::error!(
                blocks = lost.len(),
                "own blocks have no readable copy anywhere"
            );
        }
        *self
            .stats
            .lost_blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = lost;
        self.stats.under_replicated.store(under, Ordering::Relaxed);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
    }

    /// A full pass: places every block of `wanted` short of copies, releases
    /// what nobody wants any more; returns the blocks still short, with the
    /// copies they want.
    ///
    /// `local` reads a block's bytes from the owner's volume.
    pub async fn pass(
        &self,
        wanted: Wanted,
        local: Arc<dyn BlockStore>,
    ) -> Result<Vec<(Score, u8)>> {
        let _one = self.running.lock().await;
        self.stats.full_walks.fetch_add(1, Ordering::Relaxed);
        let round = self.round()?;
        let tracked = wanted.len() as u64;
        let mut levels = BTreeMap::new();
        for n in wanted.values() {
            *levels.entry(*n).or_insert(0u64) += 1;
        }
        *self
            .stats
            .by_redundancy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = levels;
        let mut short = Vec::new();
        let mut surplus = Vec::new();
        let mut placed_total = 0u64;
        self.stats
            .blocks_walked
            .fetch_add(tracked, Ordering::Relaxed);
        let known = self.manifest.holders_of(wanted.keys().copied())?;
        self.stats
            .rows_scanned
            .fetch_add(tracked, Ordering::Relaxed);
        for ((score, n), holders) in wanted.iter().zip(known) {
            placed_total += holders.len().min(*n as usize) as u64;
            if holders.len() < *n as usize {
                short.push((*score, *n, holders));
            } else if holders.len() > *n as usize {
                surplus.push((*score, *n, holders));
            }
        }
        self.release_surplus(surplus).await?;
        let pending = self.pending()?;
        self.release_dropped().await?;
        let placed = self.place_all(short, &round, &local, &pending).await?;
        placed_total += placed.copies;
        self.stats
            .copies_put
            .fetch_add(placed.copies, Ordering::Relaxed);
        self.release_freed(&wanted, &local).await?;
        self.report(placed.short.len() as u64, placed.lost, &round);
        self.stats.tracked_blocks.store(tracked, Ordering::Relaxed);
        self.stats
            .placed_copies
            .store(placed_total, Ordering::Relaxed);
        Ok(placed.short)
    }

    /// An incremental pass: does the work the queue holds (blocks wanting
    /// copies, blocks to release) and takes what is done off it; returns how
    /// many blocks are still short of copies.
    pub async fn work(&self, local: Arc<dyn BlockStore>) -> Result<u64> {
        let _one = self.running.lock().await;
        let round = self.round()?;
        let pending = self.pending()?;
        self.release_dropped().await?;
        let (mut under, mut lost) = (0u64, Vec::new());
        let mut after = None;
        loop {
            let batch = self.manifest.queued_after(after, QUEUE_BATCH)?;
            let Some((last, _)) = batch.last() else { break };
            after = Some(*last);
            self.stats
                .rows_scanned
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let (wants, releases): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(_, n)| *n > 0);
            let mut done = Vec::new();
            let known = self.manifest.holders_of(wants.iter().map(|(s, _)| *s))?;
            let mut short = Vec::new();
            for ((score, n), holders) in wants.into_iter().zip(known) {
                if holders.len() >= n as usize {
                    done.push((score, n));
                } else {
                    short.push((score, n, holders));
                }
            }
            let placed = self.place_all(short, &round, &local, &pending).await?;
            self.stats
                .placed_copies
                .fetch_add(placed.copies, Ordering::Relaxed);
            self.stats
                .copies_put
                .fetch_add(placed.copies, Ordering::Relaxed);
            under += placed.short.len() as u64;
            lost.extend(placed.lost);
            done.extend(placed.done);
            done.extend(self.release_queued(&releases, &local).await?);
            self.manifest.dequeue(&done)?;
        }
        self.report(under, lost, &round);
        Ok(under)
    }

    /// Releases queued blocks (freed by GC) on their holders; returns those
    /// done with: every holder let go, or the block is wanted locally again.
    async fn release_queued(
        &self,
        releases: &[(Score, u8)],
        local: &Arc<dyn BlockStore>,
    ) -> Result<Vec<(Score, u8)>> {
        let mut done = Vec::new();
        let mut per_peer: HashMap<PeerId, Vec<Score>> = HashMap::new();
        let mut entries: HashMap<Score, Vec<PeerId>> = HashMap::new();
        let holders = self.manifest.holders_of(releases.iter().map(|(s, _)| *s))?;
        for ((score, n), holders) in releases.iter().zip(holders) {
            match local.has(score) {
                // Put again since GC freed it: in use, and its want is queued.
                Ok(true) => done.push((*score, *n)),
                Ok(false) if holders.is_empty() => done.push((*score, *n)),
                Ok(false) => {
                    for p in &holders {
                        per_peer.entry(*p).or_default().push(*score);
                    }
                    entries.insert(*score, holders);
                }
                Err(e) => {
                    tracing::warn!(%score, error = %e, "cannot tell whether a block was freed; its copies stay");
                }
            }
        }
        if entries.is_empty() {
            return Ok(done);
        }
        let released: u64 = per_peer.values().map(|v| v.len() as u64).sum();
        self.release_on(per_peer, &mut entries).await;
        let (gone, kept): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(_, h)| h.is_empty());
        let still: u64 = kept.iter().map(|(_, h)| h.len() as u64).sum();
        let _ = self
            .stats
            .placed_copies
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_sub(released.saturating_sub(still)))
            });
        self.manifest.set_many(&kept)?;
        self.manifest.remove(gone.iter().map(|(s, _)| *s))?;
        done.extend(gone.iter().map(|(s, _)| (*s, 0)));
        Ok(done)
    }

    /// Blocks with more holders than asked (their redundancy went down): the
    /// holders farthest by XOR distance release them; the nearest `n` stay.
    async fn release_surplus(&self, surplus: Vec<(Score, u8, Vec<PeerId>)>) -> Result<()> {
        let mut per_peer: HashMap<PeerId, Vec<Score>> = HashMap::new();
        let mut entries: HashMap<Score, Vec<PeerId>> = HashMap::new();
        for (score, n, mut holders) in surplus {
            holders.sort_by_key(|p| distance(&score, p));
            for p in &holders[n as usize..] {
                per_peer.entry(*p).or_default().push(score);
            }
            entries.insert(score, holders);
        }
        self.release_on(per_peer, &mut entries).await;
        let changed: Vec<_> = entries.into_iter().collect();
        self.manifest.set_many(&changed)
    }

    /// Sends each peer `Release` for its scores (in requests of at most
    /// `MAX_SCORES`) and takes a peer out of a score's holders in `entries`
    /// once it answered: released, or it had no placement of ours, either
    /// way gone. A peer that did not answer stays, to be asked again later.
    async fn release_on(
        &self,
        per_peer: HashMap<PeerId, Vec<Score>>,
        entries: &mut HashMap<Score, Vec<PeerId>>,
    ) {
        for (peer, scores) in per_peer {
            for chunk in scores.chunks(fincrypt_net::proto::MAX_SCORES) {
                match self.client.release(peer, chunk).await {
                    Ok(_) => {
                        if let Some(m) = self.market.get() {
                            m.released(&peer, chunk);
                        }
                        for s in chunk {
                            if let Some(h) = entries.get_mut(s) {
                                h.retain(|p| *p != peer);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "a release failed; retrying later")
                    }
                }
            }
        }
    }

    /// Asks dropped holders that are connected again to release what they
    /// kept, so a holder that comes back does not keep copies no one counts.
    /// A block placed on the same holder again since is left alone.
    async fn release_dropped(&self) -> Result<()> {
        let pending = self.manifest.pending_releases()?;
        if pending.is_empty() {
            return Ok(());
        }
        let connected: HashSet<PeerId> = self
            .client
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.peer_id)
            .collect();
        for (peer, scores) in pending {
            if !connected.contains(&peer) {
                continue;
            }
            let mut release = Vec::new();
            let mut placed_again = Vec::new();
            for s in scores {
                if self.manifest.holders(&s)?.contains(&peer) {
                    placed_again.push(s);
                } else {
                    release.push(s);
                }
            }
            self.manifest.forget_releases(&peer, &placed_again)?;
            for chunk in release.chunks(fincrypt_net::proto::MAX_SCORES) {
                match self.client.release(peer, chunk).await {
                    Ok(_) => {
                        if let Some(m) = self.market.get() {
                            m.released(&peer, chunk);
                        }
                        self.manifest.forget_releases(&peer, chunk)?
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "a release failed; retrying later")
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases, on their holders, blocks that nothing references any more
    /// and that GC has freed locally; forgets them once every holder let go.
    /// An unreachable holder is asked again on a later pass.
    async fn release_freed(&self, wanted: &Wanted, local: &Arc<dyn BlockStore>) -> Result<()> {
        let mut per_peer: HashMap<PeerId, Vec<Score>> = HashMap::new();
        let mut entries: HashMap<Score, Vec<PeerId>> = HashMap::new();
        let all = self.manifest.all()?;
        self.stats
            .rows_scanned
            .fetch_add(all.len() as u64, Ordering::Relaxed);
        for (score, holders) in all {
            if wanted.contains_key(&score) {
                continue;
            }
            match local.has(&score) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    // Not known to be freed: kept on its holders, and said.
                    tracing::warn!(%score, error = %e, "cannot tell whether a block was freed; its copies stay");
                    continue;
                }
            }
            for p in &holders {
                per_peer.entry(*p).or_default().push(score);
            }
            entries.insert(score, holders);
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.release_on(per_peer, &mut entries).await;
        let (gone, kept): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(_, h)| h.is_empty());
        self.manifest.set_many(&kept)?;
        self.manifest.remove(gone.iter().map(|(s, _)| *s))?;
        Ok(())
    }

    /// Puts `score` on the peers closest to it in the network (by DHT
    /// lookup, see [`crate::lookup`]) that have room, until it has `n`
    /// holders; returns its holders and whether the local copy was readable
    /// (as far as placing it showed).
    async fn place(
        &self,
        score: Score,
        n: u8,
        mut holders: Vec<PeerId>,
        round: &Round,
        local: &Arc<dyn BlockStore>,
        pending: &HashSet<(PeerId, Score)>,
    ) -> (Vec<PeerId>, bool) {
        // Not checked against the score here: each holder checks it (and
        // refuses a damaged copy), so hashing it here too would only cost.
        let data: Bytes = match local.get_to_open(&score) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%score, error = %e, "no local copy to place");
                return (holders, false);
            }
        };
        let len = data.len() as u64;
        let mut own_lookup = false;
        let mut look_up = false;
        let mut tried: HashSet<PeerId> = HashSet::new();
        while holders.len() < n as usize {
            let need = n as usize - holders.len();
            let usable = |p: &PeerId| {
                *p != round.me
                    && !holders.contains(p)
                    && !tried.contains(p)
                    && !pending.contains(&(*p, score))
                    && !round.banned.contains(p)
                    && round.room_for(p).is_none_or(|free| free >= len)
            };
            let known = if look_up {
                None
            } else {
                round
                    .lookups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .closest(&score, need, usable)
            };
            let order = match known {
                Some(order) => order,
                None if !own_lookup => {
                    own_lookup = true;
                    self.stats.lookups.fetch_add(1, Ordering::Relaxed);
                    match self.client.closest_peers(score).await {
                        Ok(found) => {
                            let mut lookups =
                                round.lookups.lock().unwrap_or_else(|p| p.into_inner());
                            lookups.insert(&score, &found, LOOKUP_ANSWER);
                            lookups.closest(&score, 0, |_| true).unwrap_or_default()
                        }
                        Err(e) => {
                            tracing::debug!(%score, error = %e, "a closest-peers lookup failed");
                            *round.lookup_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                            break;
                        }
                    }
                }
                // Its own lookup found no more peers that could take it.
                None => break,
            };
            let order_len = order.len();
            let mut candidates: Vec<PeerId> = order.into_iter().filter(|p| usable(p)).collect();
            round.ask_room(&self.client, &candidates).await;
            if let Some(market) = self.market.get() {
                let rooms = candidates
                    .iter()
                    .map(|p| (*p, round.room_for(p).unwrap_or(0)))
                    .collect();
                let chosen = market.choose(len, need, rooms).await;
                for (p, room) in &chosen {
                    if let Some(room) = room {
                        round.set_room(p, *room);
                    }
                }
                candidates = chosen.into_iter().map(|(p, _)| p).collect();
            }
            let batch: Vec<PeerId> = candidates
                .into_iter()
                .filter(|p| round.room_for(p).is_some_and(|free| free >= len))
                .take(need)
                .collect();
            if batch.is_empty() {
                if own_lookup {
                    tracing::debug!(
                        %score,
                        found = order_len,
                        banned = round.banned.len(),
                        "no peer the lookup found can take the block this pass"
                    );
                    break;
                }
                // The peers earlier lookups vouch for have no room: look
                // this block up itself.
                look_up = true;
                continue;
            }
            tried.extend(batch.iter().copied());
            let puts = batch.iter().map(|p| {
                let data = data.clone();
                async move { (*p, self.client.put(*p, score, data).await) }
            });
            for (peer, result) in futures::future::join_all(puts).await {
                match result {
                    Ok(()) => {
                        holders.push(peer);
                        round.took(&peer, len);
                        if let Some(market) = self.market.get() {
                            market.placed(&peer, &score, len);
                        }
                    }
                    Err(NetError::Refused {
                        code: ErrorCode::Full { free },
                        ..
                    }) => round.set_room(&peer, free.min(len.saturating_sub(1))),
                    Err(NetError::Refused {
                        code: ErrorCode::ScoreMismatch,
                        ..
                    }) => {
                        tracing::warn!(%score, "the local copy of a block does not match its score; not placed");
                        return (holders, false);
                    }
                    Err(e) => {
                        tracing::debug!(%peer, %score, error = %e, "a put to a peer failed");
                    }
                }
            }
        }
        (holders, true)
    }
}

/// Peers a full Kademlia answer holds (libp2p-kad's `K_VALUE`).
const LOOKUP_ANSWER: usize = 20;

/// What one pass learns of the network as it goes.
struct Round {
    me: PeerId,
    /// Holders that get no new placements for now.
    banned: HashSet<PeerId>,
    lookups: Mutex<Lookups>,
    /// Room each asked peer reported, counted down as this pass fills it;
    /// `None`: it gave none (it serves no blocks, or did not answer).
    room: Mutex<HashMap<PeerId, Option<u64>>>,
    /// The last lookup that failed, for `status`.
    lookup_error: Mutex<Option<String>>,
}

impl Round {
    /// What is known of `peer`'s room: `None` when not asked yet,
    /// `Some(0)` when it gave none.
    fn room_for(&self, peer: &PeerId) -> Option<u64> {
        self.room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .map(|r| r.unwrap_or(0))
    }

    fn set_room(&self, peer: &PeerId, free: u64) {
        self.room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*peer, Some(free));
    }

    fn took(&self, peer: &PeerId, len: u64) {
        if let Some(Some(f)) = self
            .room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(peer)
        {
            *f = f.saturating_sub(len);
        }
    }

    /// Asks each of `peers` not asked yet in this pass for its room, at once.
    async fn ask_room(&self, client: &Client, peers: &[PeerId]) {
        use futures::StreamExt;
        let new: Vec<PeerId> = {
            let room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            peers
                .iter()
                .filter(|p| !room.contains_key(p))
                .copied()
                .collect()
        };
        let asks: Vec<_> = new
            .into_iter()
            .map(|p| async move {
                match client.space(p).await {
                    Ok(space) => (p, Some(space.free())),
                    Err(e) => {
                        tracing::debug!(peer = %p, error = %e, "no room report; not a candidate this pass");
                        (p, None)
                    }
                }
            })
            .collect();
        let answers: Vec<(PeerId, Option<u64>)> = futures::stream::iter(asks)
            .buffer_unordered(PARALLEL_ASKS)
            .collect()
            .await;
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        for (p, free) in answers {
            room.entry(p).or_insert(free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_order_is_deterministic_and_depends_on_the_score() {
        // Fixed peers: with random ones, the two orders below coincide once
        // in 8! runs.
        let peers: Vec<PeerId> = (1..=8u8)
            .map(|i| {
                let key = fincrypt_net::Keypair::ed25519_from_bytes([i; 32]).unwrap();
                key.public().to_peer_id()
            })
            .collect();
        let order = |score: &Score| {
            let mut p = peers.clone();
            p.sort_by_key(|p| distance(score, p));
            p
        };
        let (a, b) = (Score([1; 32]), Score([200; 32]));
        assert_eq!(order(&a), order(&a));
        let mut shuffled = peers.clone();
        shuffled.reverse();
        shuffled.sort_by_key(|p| distance(&a, p));
        assert_eq!(shuffled, order(&a), "the input order does not matter");
        assert_ne!(
            order(&a),
            order(&b),
            "different blocks spread over different peers"
        );
    }
}
