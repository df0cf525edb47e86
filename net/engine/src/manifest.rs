//! The owner's manifest: which peers confirmed holding each own block.
//!
//! Two forms, one content (docs/FORMATS.md, "Owner's manifest"):
//! - [`Manifest`], `DATA/manifest.redb`, the working index a replication
//!   pass reads and updates block by block;
//! - [`ManifestRecord`], the same entries written as an encrypted file tree
//!   whenever a snapshot is taken and referenced from its root record, so
//!   whoever can read the root can also find who holds every block, and each
//!   root carries the version of the manifest of its time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use std::sync::atomic::{AtomicU64, Ordering};

use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{BlockStore, Class, FileRef, Keys, Score, TreeParams, TreeReader};
use fincrypt_net::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Confirmed holders of each block: postcard `Vec<u32>`, indices into [`PEERS`].
const HOLDERS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("holders");
/// Every peer ever named as a holder: its index, then its PeerId bytes.
const PEERS: TableDefinition<u32, &[u8]> = TableDefinition::new("peers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Blocks a dropped holder may still keep: key PeerId bytes then the score.
const DROPPED: TableDefinition<&[u8], u8> = TableDefinition::new("dropped");
/// Each holder's proof history: key PeerId bytes, value a postcard [`HolderRecord`].
const PROOFS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("proofs");
/// Blocks waiting for the replication worker: score -> copies wanted, 0 to
/// release it from its holders (GC freed it). Fed by the owner's changes,
/// GC and holder losses; an entry goes once its work is done.
const QUEUE: TableDefinition<[u8; 32], u8> = TableDefinition::new("queue");
/// Where the replication worker is: values it keeps across restarts.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// Bytes of manifest pages redb may cache.
const MANIFEST_CACHE: usize = 8 << 20;
/// Version of the manifest's tables.
pub const MANIFEST_VERSION: u64 = 2;

/// Peers named in `holders`, both ways; loaded at open, grown as new
/// holders are recorded (each index is written in the same commit as the
/// first entry that uses it).
#[derive(Default)]
struct PeerTable {
    ids: HashMap<u32, PeerId>,
    index: HashMap<PeerId, u32>,
    next: u32,
}

/// The owner's record of which peers confirmed holding each own block.
pub struct Manifest {
    db: Database,
    /// Entries found undecodable since open (each logged); their blocks
    /// count as having no confirmed holder, so they are placed again.
    corrupt: AtomicU64,
    /// Bumped whenever a holder loses blocks (a drop), so a replication
    /// pass that saw nothing change since can be skipped.
    losses: AtomicU64,
    peers: std::sync::Mutex<PeerTable>,
}

impl Manifest {
    /// Opens (or creates) the manifest at `path`.
    pub fn open(path: &Path) -> Result<Manifest> {
        // redb caches up to 1 GiB by default; the daemon's memory is bounded.
        let db = redb::Builder::new()
            .set_cache_size(MANIFEST_CACHE)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("version", MANIFEST_VERSION)?;
                }
                Some(MANIFEST_VERSION) => {}
                Some(1) => {
                    drop(meta);
                    upgrade_from_1(&txn)?;
                    txn.open_table(META)?.insert("version", MANIFEST_VERSION)?;
                    tracing::info!(path = %path.display(), "manifest upgraded to version {MANIFEST_VERSION}");
                }
                Some(v) => {
                    return Err(Error::Format(format!(
                        "manifest version {v} in {} is not supported (this program reads {MANIFEST_VERSION})",
                        path.display()
                    )));
                }
            }
            txn.open_table(HOLDERS)?;
            txn.open_table(PEERS)?;
            txn.open_table(DROPPED)?;
            txn.open_table(PROOFS)?;
            txn.open_table(QUEUE)?;
            txn.open_table(STATE)?;
        }
        txn.commit()?;
        // redb's copy-on-write pages leave the file up to about twice its
        // live size; compacting once per open keeps it near that size.
        let mut db = db;
        if let Err(e) = db.compact() {
            tracing::warn!(path = %path.display(), error = %e, "the manifest could not be compacted");
        }
        let mut peers = PeerTable::default();
        {
            let txn = db.begin_read()?;
            for item in txn.open_table(PEERS)?.iter()? {
                let (k, v) = item?;
                let i = k.value();
                peers.next = peers.next.max(i.saturating_add(1));
                match PeerId::from_bytes(v.value()) {
                    Ok(p) => {
                        peers.ids.insert(i, p);
                        peers.index.insert(p, i);
                    }
                    // Entries naming it read as damaged (and are placed again).
                    Err(e) => {
                        tracing::error!(index = i, error = %e, "the manifest's peer table names a malformed PeerId")
                    }
                }
            }
        }
        Ok(Manifest {
            db,
            corrupt: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            peers: std::sync::Mutex::new(peers),
        })
    }

    /// `peers` as a `holders` value, writing the index of any peer new to
    /// the table in `txn` (so it is durable with the entry that uses it).
    fn encode_peers(&self, txn: &redb::WriteTransaction, peers: &[PeerId]) -> Result<Vec<u8>> {
        let mut table = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let mut ids = Vec::with_capacity(peers.len());
        let mut fresh = Vec::new();
        for p in peers {
            let i = match table.index.get(p) {
                Some(i) => *i,
                None => {
                    let i = table.next;
                    table.next = i
                        .checked_add(1)
                        .ok_or_else(|| Error::Format("the manifest's peer table is full".into()))?;
                    table.index.insert(*p, i);
                    table.ids.insert(i, *p);
                    fresh.push((i, *p));
                    i
                }
            };
            ids.push(i);
        }
        drop(table);
        if !fresh.is_empty() {
            let mut t = txn.open_table(PEERS)?;
            for (i, p) in fresh {
                t.insert(i, p.to_bytes().as_slice())?;
            }
        }
        Ok(postcard::to_allocvec(&ids)?)
    }

    /// The confirmed holders of `score`.
    pub fn holders(&self, score: &Score) -> Result<Vec<PeerId>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        Ok(match table.get(score.0)? {
            Some(v) => self.decode_peers(score, v.value()),
            None => Vec::new(),
        })
    }

    /// The confirmed holders of each of `scores`, read in one transaction.
    pub fn holders_of(&self, scores: impl Iterator<Item = Score>) -> Result<Vec<Vec<PeerId>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        let mut out = Vec::new();
        for s in scores {
            out.push(match table.get(s.0)? {
                Some(v) => self.decode_peers(&s, v.value()),
                None => Vec::new(),
            });
        }
        Ok(out)
    }

    /// Records the confirmed holders of several blocks in one commit.
    pub fn set_many(&self, entries: &[(Score, Vec<PeerId>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            // encode_peers opens only the `peers` table: both may be open at once.
            let mut table = txn.open_table(HOLDERS)?;
            for (score, peers) in entries {
                let bytes = self.encode_peers(&txn, peers)?;
                table.insert(score.0, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every entry: score and confirmed holders, in score order.
    pub fn all(&self) -> Result<Vec<(Score, Vec<PeerId>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let score = Score(k.value());
            out.push((score, self.decode_peers(&score, v.value())));
        }
        Ok(out)
    }

    /// Forgets blocks entirely.
    pub fn remove(&self, scores: impl Iterator<Item = Score>) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(HOLDERS)?;
            for s in scores {
                table.remove(s.0)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes `peer` from every block's holders; returns how many blocks it held.
    pub fn drop_peer(&self, peer: &PeerId) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut table = txn.open_table(HOLDERS)?;
            let mut changed = Vec::new();
            for item in table.iter()? {
                let (k, v) = item?;
                let peers = self.decode_peers(&Score(k.value()), v.value());
                if peers.contains(peer) {
                    let rest: Vec<PeerId> = peers.into_iter().filter(|p| p != peer).collect();
                    changed.push((k.value(), rest));
                }
            }
            let mut dropped = txn.open_table(DROPPED)?;
            let mut queue = txn.open_table(QUEUE)?;
            for (k, rest) in changed {
                let v = self.encode_peers(&txn, &rest)?;
                table.insert(k, v.as_slice())?;
                want_again(&mut queue, k, rest.len() + 1)?;
                let mut key = peer.to_bytes();
                key.extend_from_slice(&k);
                dropped.insert(key.as_slice(), 1)?;
                n += 1;
            }
        }
        txn.commit()?;
        self.losses.fetch_add(1, Ordering::Release);
        Ok(n)
    }

    /// Blocks dropped holders may still keep, per holder.
    pub fn pending_releases(&self) -> Result<HashMap<PeerId, Vec<Score>>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DROPPED)?;
        let mut out: HashMap<PeerId, Vec<Score>> = HashMap::new();
        for item in table.iter()? {
            let (k, _) = item?;
            let k = k.value();
            if k.len() <= 32 {
                continue;
            }
            let (peer, score) = k.split_at(k.len() - 32);
            if let (Ok(peer), Ok(score)) = (PeerId::from_bytes(peer), <[u8; 32]>::try_from(score)) {
                out.entry(peer).or_default().push(Score(score));
            }
        }
        Ok(out)
    }

    /// Forgets that `peer` may keep `scores`.
    pub fn forget_releases(&self, peer: &PeerId, scores: &[Score]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(DROPPED)?;
            for s in scores {
                let mut key = peer.to_bytes();
                key.extend_from_slice(&s.0);
                table.remove(key.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Takes `peer` out of the holders of `scores` (a failed proof or read of
    /// those blocks there) and remembers that it may still keep them, so it
    /// is asked to release them; its other blocks stay. Returns how many of
    /// `scores` it was a holder of.
    pub fn drop_blocks(&self, peer: &PeerId, scores: &[Score]) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut table = txn.open_table(HOLDERS)?;
            let mut dropped = txn.open_table(DROPPED)?;
            let mut queue = txn.open_table(QUEUE)?;
            for score in scores {
                let peers = match table.get(score.0)? {
                    Some(v) => self.decode_peers(score, v.value()),
                    None => continue,
                };
                if !peers.contains(peer) {
                    continue;
                }
                // Fewer holders than before: no peer new to the table.
                let rest: Vec<PeerId> = peers.into_iter().filter(|p| p != peer).collect();
                let v = self.encode_peers(&txn, &rest)?;
                table.insert(score.0, v.as_slice())?;
                want_again(&mut queue, score.0, rest.len() + 1)?;
                let mut key = peer.to_bytes();
                key.extend_from_slice(&score.0);
                dropped.insert(key.as_slice(), 1)?;
                n += 1;
            }
        }
        txn.commit()?;
        self.losses.fetch_add(1, Ordering::Release);
        Ok(n)
    }

    /// Every peer named as a holder of some block.
    pub fn holder_peers(&self) -> Result<HashSet<PeerId>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        let mut out = HashSet::new();
        for item in table.iter()? {
            let (k, v) = item?;
            out.extend(self.decode_peers(&Score(k.value()), v.value()));
        }
        Ok(out)
    }

    /// Entries from `after` on (exclusive), at most `limit`, wrapping to the
    /// start past the end: a cursor over the whole manifest in slices.
    pub fn entries_after(
        &self,
        after: Option<Score>,
        limit: usize,
    ) -> Result<Vec<(Score, Vec<PeerId>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        let mut out = Vec::new();
        let tail = match after {
            Some(a) => table.range((std::ops::Bound::Excluded(a.0), std::ops::Bound::Unbounded))?,
            None => table.range::<[u8; 32]>(..)?,
        };
        // From the start again past the end, up to where this slice began.
        let head = match after {
            Some(a) => Some(table.range(..=a.0)?),
            None => None,
        };
        for item in tail.chain(head.into_iter().flatten()) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let score = Score(k.value());
            if after == Some(score) {
                break;
            }
            out.push((score, self.decode_peers(&score, v.value())));
        }
        Ok(out)
    }

    /// The proof history of `peer` (empty if it was never challenged).
    pub fn holder_record(&self, peer: &PeerId) -> Result<HolderRecord> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROOFS)?;
        Ok(match table.get(peer.to_bytes().as_slice())? {
            Some(v) => HolderRecord::decode(v.value()),
            None => HolderRecord::default(),
        })
    }

    /// Changes the proof histories of several holders in one commit.
    pub fn update_records(
        &self,
        peers: &[PeerId],
        mut change: impl FnMut(&PeerId, &mut HolderRecord),
    ) -> Result<()> {
        if peers.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(PROOFS)?;
            for peer in peers {
                let key = peer.to_bytes();
                let mut record = match table.get(key.as_slice())? {
                    Some(v) => HolderRecord::decode(v.value()),
                    None => HolderRecord::default(),
                };
                change(peer, &mut record);
                table.insert(key.as_slice(), postcard::to_allocvec(&record)?.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every holder's proof history.
    pub fn holder_records(&self) -> Result<Vec<(PeerId, HolderRecord)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PROOFS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            match PeerId::from_bytes(k.value()) {
                Ok(p) => out.push((p, HolderRecord::decode(v.value()))),
                Err(e) => tracing::error!(error = %e, "a proof record names a malformed PeerId"),
            }
        }
        Ok(out)
    }

    /// The whole manifest as a record, to be stored as blocks.
    pub fn record(&self) -> Result<ManifestRecord> {
        Ok(ManifestRecord::new(&self.all()?))
    }
}

impl Manifest {
    /// The holders an entry names; a damaged entry is logged and counted,
    /// and reads as no confirmed holder (so the block is placed again), never
    /// as a wrong one.
    fn decode_peers(&self, score: &Score, bytes: &[u8]) -> Vec<PeerId> {
        let decoded = postcard::from_bytes::<Vec<u32>>(bytes).map_err(|e| e.to_string());
        let peers = decoded.and_then(|ids| {
            let table = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .map(|i| {
                    table
                        .ids
                        .get(i)
                        .copied()
                        .ok_or_else(|| format!("peer index {i} is not in the peer table"))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        match peers {
            Ok(p) => p,
            Err(reason) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%score, %reason, "a manifest entry is damaged; the block will be placed again");
                Vec::new()
            }
        }
    }

    /// Queues work: each block with the copies it wants, or 0 to release it.
    /// A block queued twice keeps the most copies asked; a release replaces
    /// a want (the block is gone locally), and a want replaces a release.
    pub fn enqueue(&self, items: &[(Score, u8)]) -> Result<()> {
        self.enqueue_with_state(items, &[])
    }

    /// Queues work and keeps `state` values in one commit, so what a cursor
    /// says was taken is never lost to a crash.
    pub fn enqueue_with_state(&self, items: &[(Score, u8)], state: &[(&str, &[u8])]) -> Result<()> {
        if items.is_empty() && state.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(QUEUE)?;
            for (score, n) in items {
                let now = queue.get(score.0)?.map(|v| v.value());
                let next = match now {
                    Some(old) if old > 0 && *n > 0 => old.max(*n),
                    _ => *n,
                };
                if now != Some(next) {
                    queue.insert(score.0, next)?;
                }
            }
            let mut t = txn.open_table(STATE)?;
            for (k, v) in state {
                t.insert(*k, *v)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Up to `limit` queued blocks after `after` (exclusive), in score order.
    pub fn queued_after(&self, after: Option<Score>, limit: usize) -> Result<Vec<(Score, u8)>> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(QUEUE)?;
        let range = match after {
            Some(a) => queue.range((std::ops::Bound::Excluded(a.0), std::ops::Bound::Unbounded))?,
            None => queue.range::<[u8; 32]>(..)?,
        };
        let mut out = Vec::new();
        for item in range.take(limit) {
            let (k, v) = item?;
            out.push((Score(k.value()), v.value()));
        }
        Ok(out)
    }

    /// Takes finished work off the queue: each block only if it still asks
    /// what it asked when read (`items`), so work queued meanwhile stays.
    pub fn dequeue(&self, items: &[(Score, u8)]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut queue = txn.open_table(QUEUE)?;
            for (score, n) in items {
                if queue.get(score.0)?.map(|v| v.value()) == Some(*n) {
                    queue.remove(score.0)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Blocks queued: (wanting copies, to release).
    pub fn queue_len(&self) -> Result<(u64, u64)> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(QUEUE)?;
        let (mut wants, mut releases) = (0, 0);
        for item in queue.iter()? {
            if item?.1.value() == 0 {
                releases += 1;
            } else {
                wants += 1;
            }
        }
        Ok((wants, releases))
    }

    /// Whether some block queued for copies has no confirmed holder at all
    /// (stops at the first): while one has, what it belongs to cannot be
    /// recovered from peers yet.
    pub fn queued_without_holder(&self) -> Result<bool> {
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(QUEUE)?;
        let holders = txn.open_table(HOLDERS)?;
        for item in queue.iter()? {
            let (k, v) = item?;
            if v.value() > 0 && holders.get(k.value())?.is_none_or(|h| h.value().is_empty()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `score` has a confirmed holder or is queued.
    pub fn knows(&self, score: &Score) -> Result<bool> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(HOLDERS)?.get(score.0)?.is_some()
            || txn.open_table(QUEUE)?.get(score.0)?.is_some())
    }

    /// Empties the queue (a full pass has just done all its work).
    pub fn clear_queue(&self) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(QUEUE)?.retain(|_, _| false)?;
        txn.commit()?;
        Ok(())
    }

    /// A value the replication worker kept, if any.
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(STATE)?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Keeps values for the replication worker, in one commit.
    pub fn set_state(&self, values: &[(&str, &[u8])]) -> Result<()> {
        self.enqueue_with_state(&[], values)
    }

    /// Changes each time a holder loses blocks ([`Manifest::drop_peer`],
    /// [`Manifest::drop_blocks`]).
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Acquire)
    }

    /// Manifest entries found damaged since it was opened.
    pub fn corrupt_entries(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }
}

/// Queues a block that lost a holder to get back to the copies it had,
/// unless it is queued for more already or for release.
fn want_again(
    queue: &mut redb::Table<'_, [u8; 32], u8>,
    score: [u8; 32],
    had: usize,
) -> Result<()> {
    let had = had.min(u8::MAX as usize) as u8;
    let now = queue.get(score)?.map(|v| v.value());
    if !matches!(now, Some(n) if n == 0 || n >= had) {
        queue.insert(score, had)?;
    }
    Ok(())
}

/// Rewrites a version 1 `holders` table (PeerId bytes in every entry) with
/// indices into a new `peers` table, in the caller's transaction. An entry
/// that does not decode is left out: its block has no confirmed holder and
/// is placed again, as a damaged entry always is.
fn upgrade_from_1(txn: &redb::WriteTransaction) -> Result<()> {
    let mut entries = Vec::new();
    {
        let table = txn.open_table(HOLDERS)?;
        for item in table.iter()? {
            let (k, v) = item?;
            let ids = postcard::from_bytes::<Vec<Vec<u8>>>(v.value())
                .map_err(|e| e.to_string())
                .and_then(|ids| {
                    ids.iter()
                        .map(|b| PeerId::from_bytes(b).map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, _>>()
                });
            match ids {
                Ok(ids) => entries.push((k.value(), ids)),
                Err(reason) => {
                    tracing::error!(score = %Score(k.value()), %reason, "a version 1 manifest entry is damaged; the block will be placed again")
                }
            }
        }
    }
    let mut index: HashMap<PeerId, u32> = HashMap::new();
    let mut peers = txn.open_table(PEERS)?;
    let mut holders = txn.open_table(HOLDERS)?;
    holders.retain(|_, _| false)?;
    for (score, ids) in entries {
        let mut v = Vec::with_capacity(ids.len());
        for p in ids {
            let next = index.len() as u32;
            let i = *index.entry(p).or_insert_with(|| next);
            if i == next {
                peers.insert(i, p.to_bytes().as_slice())?;
            }
            v.push(i);
        }
        holders.insert(score, postcard::to_allocvec(&v)?.as_slice())?;
    }
    Ok(())
}

/// What the owner learnt of one holder from its proofs; kept across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderRecord {
    /// Proofs that checked out.
    pub passed: u64,
    /// Challenges failed: a wrong proof, "not held", or no answer.
    pub failed: u64,
    /// Failures since the last pass.
    pub consecutive: u32,
    /// Unix time of the last passed proof.
    pub last_passed: Option<u64>,
    /// Unix time of the last failure.
    pub last_failed: Option<u64>,
    /// Times it was dropped as a holder.
    pub dropped: u32,
    /// Unix time until which it gets no new placements (after a drop).
    pub banned_until: Option<u64>,
}

impl HolderRecord {
    /// A stored record; a damaged one is logged and starts afresh (it only
    /// ever makes a holder look better than it was for one round).
    fn decode(bytes: &[u8]) -> HolderRecord {
        postcard::from_bytes(bytes).unwrap_or_else(|e| {
            tracing::error!(error = %e, "a holder's proof record is damaged; starting it afresh");
            HolderRecord::default()
        })
    }

    /// True while it gets no new placements.
    pub fn banned(&self, now: u64) -> bool {
        self.banned_until.is_some_and(|t| t > now)
    }
}

/// Version of [`ManifestRecord`].
pub const MANIFEST_RECORD_VERSION: u8 = 1;

/// The manifest as stored in blocks under a snapshot root: each own block's
/// confirmed holders, with every holder's PeerId written once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// [`MANIFEST_RECORD_VERSION`].
    pub version: u8,
    /// PeerId bytes of every holder named below, in byte order, each once.
    pub peers: Vec<Vec<u8>>,
    /// Own blocks in score order, each with its holders as indices into `peers`.
    pub entries: Vec<(Score, Vec<u32>)>,
}

impl ManifestRecord {
    /// A record of `entries` (score, holders); the order of the input does not matter.
    pub fn new(entries: &[(Score, Vec<PeerId>)]) -> ManifestRecord {
        let mut index: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
        for (_, holders) in entries {
            for p in holders {
                index.insert(p.to_bytes(), 0);
            }
        }
        for (i, v) in index.values_mut().enumerate() {
            *v = i as u32;
        }
        let mut out: Vec<(Score, Vec<u32>)> = entries
            .iter()
            .map(|(score, holders)| {
                let mut ids: Vec<u32> = holders.iter().map(|p| index[&p.to_bytes()]).collect();
                ids.sort_unstable();
                ids.dedup();
                (*score, ids)
            })
            .collect();
        out.sort_by_key(|(s, _)| *s);
        ManifestRecord {
            version: MANIFEST_RECORD_VERSION,
            peers: index.into_keys().collect(),
            entries: out,
        }
    }

    /// Every entry with its holders as PeerIds, in score order.
    pub fn holders(&self) -> Result<Vec<(Score, Vec<PeerId>)>> {
        let peers = self
            .peers
            .iter()
            .map(|b| {
                PeerId::from_bytes(b)
                    .map_err(|e| Error::Format(format!("a manifest names a malformed PeerId: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        self.entries
            .iter()
            .map(|(score, ids)| {
                let holders = ids
                    .iter()
                    .map(|i| {
                        peers.get(*i as usize).copied().ok_or_else(|| {
                            Error::Format(format!(
                                "a manifest entry names holder {i} of {}",
                                peers.len()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((*score, holders))
            })
            .collect()
    }

    /// Writes the record as a file tree of own blocks and returns its reference.
    ///
    /// The tree is content-defined and its keys convergent, so an unchanged
    /// manifest gives the same blocks again, and a change touches few of them.
    pub fn write(
        &self,
        store: &dyn BlockStore,
        keys: &Keys,
        params: TreeParams,
    ) -> Result<FileRef> {
        let bytes = postcard::to_allocvec(self)?;
        Ok(write_all(store, keys, params, Class::Own, &bytes)?)
    }

    /// Reads a record written by [`ManifestRecord::write`].
    pub fn read<S: BlockStore>(reader: &TreeReader<S>, file: &FileRef) -> Result<ManifestRecord> {
        let bytes = reader.read_all(file)?;
        let version = bytes.first().copied();
        if version != Some(MANIFEST_RECORD_VERSION) {
            return Err(Error::Format(format!(
                "manifest record version {version:?} is not supported (this program reads {MANIFEST_RECORD_VERSION})"
            )));
        }
        let record: ManifestRecord = postcard::from_bytes(&bytes)
            .map_err(|e| Error::Format(format!("decoding the manifest record: {e}")))?;
        // Indices are checked once here, so readers can trust them.
        record.holders()?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::{MasterSecret, MemStore};
    use std::sync::Arc;

    #[test]
    fn the_manifest_keeps_holders_and_dropped_placements_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let (p, q) = (PeerId::random(), PeerId::random());
        let (s, t) = (Score([3; 32]), Score([4; 32]));
        {
            let m = Manifest::open(&path).unwrap();
            m.set_many(&[(s, vec![p, q]), (t, vec![q])]).unwrap();
            assert_eq!(m.drop_peer(&q).unwrap(), 2);
        }
        let m = Manifest::open(&path).unwrap();
        assert_eq!(m.holders(&s).unwrap(), vec![p]);
        assert!(m.holders(&t).unwrap().is_empty());
        let pending = m.pending_releases().unwrap();
        let mut kept = pending.get(&q).cloned().unwrap_or_default();
        kept.sort_by_key(|s| s.0);
        assert_eq!(kept, vec![s, t]);
        m.forget_releases(&q, &[s, t]).unwrap();
        assert!(m.pending_releases().unwrap().is_empty());
        m.remove([s].into_iter()).unwrap();
        assert!(m.holders(&s).unwrap().is_empty());
    }

    #[test]
    fn a_version_1_manifest_is_upgraded_with_every_entry_and_holders_cost_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let e: Vec<(Score, Vec<PeerId>)> = (0..200u32)
            .map(|i| {
                let mut s = [0u8; 32];
                s[..4].copy_from_slice(&i.to_be_bytes());
                let k = i as usize;
                (
                    Score(s),
                    vec![peers[k % 5], peers[(k + 1) % 5], peers[(k + 3) % 5]],
                )
            })
            .collect();
        {
            // Written as version 1 wrote it: PeerId bytes in every entry.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                txn.open_table(META).unwrap().insert("version", 1).unwrap();
                let mut t = txn.open_table(HOLDERS).unwrap();
                for (s, p) in &e {
                    let ids: Vec<Vec<u8>> = p.iter().map(|p| p.to_bytes()).collect();
                    t.insert(s.0, postcard::to_allocvec(&ids).unwrap().as_slice())
                        .unwrap();
                }
                t.insert([0xff; 32], &[9u8, 9, 9][..]).unwrap();
            }
            txn.commit().unwrap();
        }
        {
            let m = Manifest::open(&path).unwrap();
            assert_eq!(
                m.all().unwrap(),
                e,
                "the damaged entry is left out, the rest kept"
            );
            let txn = m.db.begin_read().unwrap();
            let version = txn
                .open_table(META)
                .unwrap()
                .get("version")
                .unwrap()
                .unwrap()
                .value();
            assert_eq!(version, MANIFEST_VERSION);
            let holders = txn.open_table(HOLDERS).unwrap();
            let v = holders.get(e[0].0.0).unwrap().unwrap();
            assert!(
                v.value().len() <= 4,
                "three holders as indices: {:?}",
                v.value()
            );
        }
        let m = Manifest::open(&path).unwrap();
        assert_eq!(m.all().unwrap(), e, "and again after reopening");
        let extra = (Score([0xee; 32]), vec![PeerId::random(), peers[0]]);
        m.set_many(std::slice::from_ref(&extra)).unwrap();
        drop(m);
        let m = Manifest::open(&path).unwrap();
        assert_eq!(
            m.holders(&extra.0).unwrap(),
            extra.1,
            "a new peer's index is kept"
        );
        assert_eq!(m.corrupt_entries(), 0);
    }

    #[test]
    fn an_entry_naming_an_unknown_peer_index_reads_as_no_holder_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::open(&dir.path().join("manifest.redb")).unwrap();
        let s = Score([7; 32]);
        m.set_many(&[(s, vec![PeerId::random()])]).unwrap();
        let txn = m.db.begin_write().unwrap();
        txn.open_table(HOLDERS)
            .unwrap()
            .insert(
                s.0,
                postcard::to_allocvec(&vec![0u32, 77]).unwrap().as_slice(),
            )
            .unwrap();
        txn.commit().unwrap();
        assert!(m.holders(&s).unwrap().is_empty());
        assert_eq!(m.corrupt_entries(), 1);
    }

    #[test]
    fn proof_histories_and_per_block_drops_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let (p, q) = (PeerId::random(), PeerId::random());
        let (s, t) = (Score([5; 32]), Score([6; 32]));
        {
            let m = Manifest::open(&path).unwrap();
            m.set_many(&[(s, vec![p, q]), (t, vec![p, q])]).unwrap();
            assert_eq!(m.drop_blocks(&p, &[s]).unwrap(), 1);
            m.update_records(&[p], |_, r| {
                r.passed += 2;
                r.failed += 1;
                r.banned_until = Some(u64::MAX);
            })
            .unwrap();
        }
        let m = Manifest::open(&path).unwrap();
        assert_eq!(m.holders(&s).unwrap(), vec![q], "only that block left p");
        assert_eq!(
            m.holders(&t).unwrap(),
            vec![p, q],
            "p keeps the block it proves"
        );
        assert_eq!(m.pending_releases().unwrap()[&p], vec![s]);
        let r = m.holder_record(&p).unwrap();
        assert_eq!((r.passed, r.failed), (2, 1));
        assert!(r.banned(0));
        assert_eq!(m.holder_record(&q).unwrap(), HolderRecord::default());
    }

    #[test]
    fn a_cursor_over_the_manifest_visits_every_entry_once_per_lap() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::open(&dir.path().join("manifest.redb")).unwrap();
        let e = entries(10);
        m.set_many(&e).unwrap();
        let mut seen = Vec::new();
        let mut after = None;
        for _ in 0..4 {
            let slice = m.entries_after(after, 3).unwrap();
            assert!(!slice.is_empty());
            after = slice.last().map(|(s, _)| *s);
            seen.extend(slice.into_iter().map(|(s, _)| s));
        }
        // Four slices of three over ten entries: the first two come round again.
        let mut first_lap = seen[..10].to_vec();
        first_lap.sort();
        first_lap.dedup();
        assert_eq!(first_lap.len(), 10, "{seen:?}");
        assert_eq!(seen[10..], seen[..2]);
    }

    /// Entries over `n` blocks, each held by three of eight peers.
    fn entries(n: usize) -> Vec<(Score, Vec<PeerId>)> {
        let peers: Vec<PeerId> = (0..8).map(|_| PeerId::random()).collect();
        (0..n)
            .map(|i| {
                let mut s = [0u8; 32];
                s[..8]
                    .copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
                let holders = (0..3).map(|k| peers[(i + k * 3) % 8]).collect();
                (Score(s), holders)
            })
            .collect()
    }

    fn sorted(mut v: Vec<(Score, Vec<PeerId>)>) -> Vec<(Score, Vec<PeerId>)> {
        for (_, h) in &mut v {
            h.sort();
        }
        v.sort_by_key(|(s, _)| *s);
        v
    }

    #[test]
    fn a_manifest_written_as_blocks_reads_back_equal() {
        let keys = MasterSecret::generate().keys();
        let store = Arc::new(MemStore::new());
        // Small chunks and fanout, so the record spans data and pointer blocks.
        let params = TreeParams {
            min_chunk: 1 << 10,
            avg_chunk: 4 << 10,
            max_chunk: 16 << 10,
            fanout: 4,
            inline_max: 64,
        };
        let reader = TreeReader::new(store.clone() as Arc<dyn BlockStore>, 1 << 20);
        for n in [0usize, 1, 3000] {
            let e = entries(n);
            let record = ManifestRecord::new(&e);
            let file = record.write(&*store, &keys, params).unwrap();
            let back = ManifestRecord::read(&reader, &file).unwrap();
            assert_eq!(back, record, "{n} entries");
            assert_eq!(
                sorted(back.holders().unwrap()),
                sorted(e.clone()),
                "{n} entries"
            );
            if n == 3000 {
                let FileRef::Tree(root) = &file else {
                    panic!("3000 entries are not inline")
                };
                assert!(root.depth >= 2, "the record spans pointer blocks");
                // Written again unchanged, it is the same blocks.
                let again = ManifestRecord::new(&entries_like(&e)).write(&*store, &keys, params);
                assert_eq!(again.unwrap(), file);
            }
        }
    }

    /// The same entries in another order.
    fn entries_like(e: &[(Score, Vec<PeerId>)]) -> Vec<(Score, Vec<PeerId>)> {
        let mut v = e.to_vec();
        v.reverse();
        for (_, h) in &mut v {
            h.reverse();
        }
        v
    }

    #[test]
    fn a_record_naming_a_missing_holder_or_another_version_is_refused() {
        let keys = MasterSecret::generate().keys();
        let store = Arc::new(MemStore::new());
        let reader = TreeReader::new(store.clone() as Arc<dyn BlockStore>, 1 << 20);
        let mut record = ManifestRecord::new(&entries(10));
        record.entries[3].1.push(99);
        let file = record.write(&*store, &keys, TreeParams::default()).unwrap();
        let err = ManifestRecord::read(&reader, &file).unwrap_err();
        assert!(err.to_string().contains("holder 99"), "{err:#}");

        let mut record = ManifestRecord::new(&entries(10));
        record.version = 2;
        let file = record.write(&*store, &keys, TreeParams::default()).unwrap();
        let err = ManifestRecord::read(&reader, &file).unwrap_err();
        assert!(err.to_string().contains("version"), "{err:#}");
    }
}
