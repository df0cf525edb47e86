//! The owner's manifest: which peers confirmed holding each own block.
//!
//! Two forms, one content (docs/FORMATS.md, "Owner's manifest"):
//! - [`Manifest`], the working index a replication pass reads and updates
//!   block by block. Holders come in sets (most blocks share theirs with
//!   many others), numbered in `DATA/manifest.redb`; a block's set number
//!   is kept as the tag of its entry in the owner's volume, which has a row
//!   for every own block anyway, so knowing who holds a block costs a
//!   varint there rather than a row of its own here. Only blocks the volume
//!   does not keep (a home recovered without `--all`, blocks GC freed that
//!   wait for their release) have a row in `manifest.redb`;
//! - [`ManifestRecord`], the same entries written as an encrypted file tree
//!   whenever a snapshot is taken and referenced from its root record, so
//!   whoever can read the root can also find who holds every block, and each
//!   root carries the version of the manifest of its time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{
    BlockStore, Class, FileRef, Keys, LocalStore, Score, TreeParams, TreeReader,
};
use fincrypt_net::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Holder sets of own blocks the volume has no entry to tag: postcard
/// `u32`, a number in [`SETS`].
const HOLDERS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("holders");
/// Every holder set named by a tag or a `holders` row: postcard `Vec<u32>`,
/// indices into [`PEERS`] in ascending order. Numbers start at 1; 0 means
/// "no holder".
const SETS: TableDefinition<u32, &[u8]> = TableDefinition::new("sets");
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
pub const MANIFEST_VERSION: u64 = 3;
/// Blocks read or written per transaction when walking the whole manifest.
const CHUNK: usize = 4096;

/// Peers and holder sets, both ways; loaded at open, grown as new ones are
/// needed (each written and committed before any entry names it).
#[derive(Default)]
struct Names {
    peers: HashMap<u32, PeerId>,
    peer_index: HashMap<PeerId, u32>,
    next_peer: u32,
    sets: HashMap<u32, Vec<u32>>,
    set_index: HashMap<Vec<u32>, u32>,
    next_set: u32,
}

/// Peers and sets new to [`Names`], not yet committed.
#[derive(Default)]
struct Fresh {
    peers: Vec<(u32, PeerId)>,
    peer_index: HashMap<PeerId, u32>,
    sets: Vec<(u32, Vec<u32>)>,
    set_index: HashMap<Vec<u32>, u32>,
}

impl Names {
    /// The set number of `holders` (0 if there are none), taking new peer
    /// and set numbers into `fresh`.
    fn resolve(&self, holders: &[PeerId], fresh: &mut Fresh) -> Result<u32> {
        if holders.is_empty() {
            return Ok(0);
        }
        let mut members = Vec::with_capacity(holders.len());
        for p in holders {
            let i = match self.peer_index.get(p).or_else(|| fresh.peer_index.get(p)) {
                Some(i) => *i,
                None => {
                    let i = self
                        .next_peer
                        .checked_add(fresh.peers.len() as u32)
                        .ok_or_else(|| Error::Format("the manifest's peer table is full".into()))?;
                    fresh.peers.push((i, *p));
                    fresh.peer_index.insert(*p, i);
                    i
                }
            };
            members.push(i);
        }
        members.sort_unstable();
        members.dedup();
        if let Some(id) = self
            .set_index
            .get(&members)
            .or_else(|| fresh.set_index.get(&members))
        {
            return Ok(*id);
        }
        let id = self
            .next_set
            .checked_add(fresh.sets.len() as u32)
            .ok_or_else(|| Error::Format("the manifest's set table is full".into()))?;
        fresh.sets.push((id, members.clone()));
        fresh.set_index.insert(members, id);
        Ok(id)
    }

    /// Writes `fresh` in `txn`.
    fn write(txn: &redb::WriteTransaction, fresh: &Fresh) -> Result<()> {
        if !fresh.peers.is_empty() {
            let mut t = txn.open_table(PEERS)?;
            for (i, p) in &fresh.peers {
                t.insert(*i, p.to_bytes().as_slice())?;
            }
        }
        if !fresh.sets.is_empty() {
            let mut t = txn.open_table(SETS)?;
            for (id, members) in &fresh.sets {
                t.insert(*id, postcard::to_allocvec(members)?.as_slice())?;
            }
        }
        Ok(())
    }

    /// Takes in what `fresh` named, once it is committed.
    fn apply(&mut self, fresh: Fresh) {
        for (i, p) in fresh.peers {
            self.peers.insert(i, p);
            self.peer_index.insert(p, i);
            self.next_peer = self.next_peer.max(i.saturating_add(1));
        }
        for (id, members) in fresh.sets {
            self.next_set = self.next_set.max(id.saturating_add(1));
            self.set_index.entry(members.clone()).or_insert(id);
            self.sets.insert(id, members);
        }
    }

    /// Loads the peer and set tables.
    fn load(db: &Database) -> Result<Names> {
        let mut names = Names {
            next_set: 1,
            ..Names::default()
        };
        let txn = db.begin_read()?;
        for item in txn.open_table(PEERS)?.iter()? {
            let (k, v) = item?;
            let i = k.value();
            names.next_peer = names.next_peer.max(i.saturating_add(1));
            match PeerId::from_bytes(v.value()) {
                Ok(p) => {
                    names.peers.insert(i, p);
                    names.peer_index.insert(p, i);
                }
                // Sets naming it read as damaged (and their blocks are placed again).
                Err(e) => {
                    tracing::error!(index = i, error = %e, "the manifest's peer table names a malformed PeerId")
                }
            }
        }
        for item in txn.open_table(SETS)?.iter()? {
            let (k, v) = item?;
            let id = k.value();
            names.next_set = names.next_set.max(id.saturating_add(1));
            match postcard::from_bytes::<Vec<u32>>(v.value()) {
                Ok(members) => {
                    names.set_index.entry(members.clone()).or_insert(id);
                    names.sets.insert(id, members);
                }
                // Blocks naming it read as damaged (and are placed again).
                Err(e) => {
                    tracing::error!(set = id, error = %e, "the manifest's set table has a damaged set")
                }
            }
        }
        Ok(names)
    }
}

/// The owner's record of which peers confirmed holding each own block.
pub struct Manifest {
    db: Database,
    /// The owner's volume, whose entries carry the set numbers of the blocks it keeps.
    volume: Arc<LocalStore>,
    /// Entries found undecodable since open (each logged); their blocks
    /// count as having no confirmed holder, so they are placed again.
    corrupt: AtomicU64,
    /// Bumped whenever a holder loses blocks (a drop), so a replication
    /// pass that saw nothing change since can be skipped.
    losses: AtomicU64,
    /// Held by every change of who holds what, from the numbers it picks
    /// to the tags it writes, so no two changes interleave.
    names: std::sync::Mutex<Names>,
}

impl Manifest {
    /// Opens (or creates) the manifest at `path` for the own blocks of
    /// `volume`, moving into the volume's entries the holders of blocks it
    /// has come to keep since they were recorded.
    pub fn open(path: &Path, volume: Arc<LocalStore>) -> Result<Manifest> {
        // redb caches up to 1 GiB by default; the daemon's memory is bounded.
        let db = redb::Builder::new()
            .set_cache_size(MANIFEST_CACHE)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            let meta = txn.open_table(META)?;
            let version = meta.get("version")?.map(|v| v.value());
            drop(meta);
            match version {
                None => {}
                Some(MANIFEST_VERSION) => {}
                Some(v @ (1 | 2)) => {
                    if v == 1 {
                        upgrade_from_1(&txn)?;
                    }
                    upgrade_from_2(&txn)?;
                    tracing::info!(path = %path.display(), "manifest upgraded from version {v} to version {MANIFEST_VERSION}");
                }
                Some(v) => {
                    return Err(Error::Format(format!(
                        "manifest version {v} in {} is not supported (this program reads {MANIFEST_VERSION})",
                        path.display()
                    )));
                }
            }
            txn.open_table(META)?.insert("version", MANIFEST_VERSION)?;
            txn.open_table(HOLDERS)?;
            txn.open_table(SETS)?;
            txn.open_table(PEERS)?;
            txn.open_table(DROPPED)?;
            txn.open_table(PROOFS)?;
            txn.open_table(QUEUE)?;
            txn.open_table(STATE)?;
        }
        let epoch = {
            let mut meta = txn.open_table(META)?;
            let existing = meta.get("tags")?.map(|v| v.value());
            match existing {
                Some(e) => e,
                None => {
                    let e = rand::random::<u64>().max(1);
                    meta.insert("tags", e)?;
                    e
                }
            }
        };
        txn.commit()?;
        // Set numbers mean something only in the file that numbered them:
        // tags written for another manifest (this one is new, or the volume
        // outlived the one it was tagged for) are cleared before any is read.
        if volume.tag_epoch()? != epoch {
            let cleared = volume.reset_tags(epoch)?;
            if cleared > 0 {
                tracing::warn!(blocks = cleared, path = %path.display(), "the volume's holder tags were written for another manifest and are cleared; those blocks are found or placed again");
            }
        }
        let names = Names::load(&db)?;
        let mut manifest = Manifest {
            db,
            volume,
            corrupt: AtomicU64::new(0),
            losses: AtomicU64::new(0),
            names: std::sync::Mutex::new(names),
        };
        let moved = manifest.settle()?;
        if moved > 0 {
            tracing::info!(
                blocks = moved,
                "holders of blocks now in the volume moved into its entries"
            );
        }
        // redb's copy-on-write pages leave the file up to about twice its
        // live size; compacting once per open keeps it near that size.
        if let Err(e) = manifest.db.compact() {
            tracing::warn!(path = %path.display(), error = %e, "the manifest could not be compacted");
        }
        Ok(manifest)
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves `holders` rows of blocks the volume keeps into their entries'
    /// tags (a row left behind by a crash, or a block fetched since it was
    /// recorded); returns how many moved. Only at open: a GC sweep running
    /// meanwhile could copy a tag into a row this then removes.
    fn settle(&self) -> Result<u64> {
        let _names = self.names();
        let mut moved = 0;
        let mut after: Option<Score> = None;
        loop {
            let rows = self.rows_after(after.as_ref(), CHUNK)?;
            let Some(last) = rows.last() else { break };
            after = Some(last.0);
            let scores: Vec<Score> = rows.iter().map(|(s, _)| *s).collect();
            let tags = self.volume.tags_of(&scores)?;
            let mut tag = Vec::new();
            let mut gone = Vec::new();
            for ((score, id), t) in rows.iter().zip(tags) {
                match t {
                    None => {}
                    Some(0) => {
                        if let Some(id) = id {
                            tag.push((*score, *id as u64));
                        }
                        gone.push(*score);
                    }
                    // Tagged since: the tag is newer.
                    Some(_) => gone.push(*score),
                }
            }
            // Durable before the rows go.
            self.volume.set_tags(&tag)?;
            if !gone.is_empty() {
                let txn = self.db.begin_write()?;
                {
                    let mut table = txn.open_table(HOLDERS)?;
                    for s in &gone {
                        table.remove(s.0)?;
                    }
                }
                txn.commit()?;
                moved += gone.len() as u64;
            }
        }
        Ok(moved)
    }

    /// The set number each of `scores` has: its tag in the volume, else its
    /// `holders` row, else 0.
    fn ids_of(&self, scores: &[Score]) -> Result<Vec<u32>> {
        let tags = self.volume.tags_of(scores)?;
        let mut out = vec![0; scores.len()];
        let mut untagged = Vec::new();
        for (i, t) in tags.into_iter().enumerate() {
            match t {
                Some(t) if t != 0 => out[i] = self.tag_id(&scores[i], t),
                _ => untagged.push(i),
            }
        }
        if !untagged.is_empty() {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(HOLDERS)?;
            for i in untagged {
                if let Some(v) = table.get(scores[i].0)? {
                    out[i] = self.row_id(&scores[i], decode_id(v.value()));
                }
            }
        }
        Ok(out)
    }

    /// A tag as a set number; a tag no set number can be is counted damaged.
    fn tag_id(&self, score: &Score, tag: u64) -> u32 {
        u32::try_from(tag).unwrap_or_else(|_| {
            self.damaged(
                score,
                &format!("the volume tags it {tag}, not a holder set"),
            );
            0
        })
    }

    /// A `holders` value as a set number; a damaged one is counted.
    fn row_id(&self, score: &Score, id: Option<u32>) -> u32 {
        id.unwrap_or_else(|| {
            self.damaged(score, "its holders row does not decode");
            0
        })
    }

    fn damaged(&self, score: &Score, reason: &str) {
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%score, %reason, "a manifest entry is damaged; the block will be placed again");
    }

    /// The holders set `id` names; a set that is not in the table reads as
    /// no holder (so the block is placed again), never as a wrong one.
    fn members(&self, names: &Names, score: &Score, id: u32) -> Vec<PeerId> {
        if id == 0 {
            return Vec::new();
        }
        let peers = names
            .sets
            .get(&id)
            .ok_or_else(|| format!("holder set {id} is not in the set table"))
            .and_then(|members| {
                members
                    .iter()
                    .map(|i| {
                        names
                            .peers
                            .get(i)
                            .copied()
                            .ok_or_else(|| format!("peer index {i} is not in the peer table"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            });
        match peers {
            Ok(p) => p,
            Err(reason) => {
                self.damaged(score, &reason);
                Vec::new()
            }
        }
    }

    /// Records set numbers: as tags where the volume keeps the block, as
    /// `holders` rows where it does not; 0 forgets the block's holders.
    /// Called with `names` held.
    fn write_ids(&self, ids: &[(Score, u32)]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let forget: Vec<Score> = ids
            .iter()
            .filter(|(_, id)| *id == 0)
            .map(|(s, _)| *s)
            .collect();
        // A forgotten block's row goes before its tag is cleared: were the
        // tag cleared first, a crash would leave the row to be settled back
        // into the tag at the next open.
        self.remove_rows(&forget)?;
        let tags: Vec<(Score, u64)> = ids.iter().map(|(s, id)| (*s, *id as u64)).collect();
        let tagged = self.volume.set_tags(&tags)?;
        // A row beside a non-zero tag is left: the tag is read first, a GC
        // sweep may be copying that tag into the row this very moment, and
        // the next open removes it. A block without an entry has a row, and
        // a forgotten one none (a sweep may have copied its old tag into a
        // row since the first removal).
        let rows: Vec<&(Score, u32)> = ids
            .iter()
            .zip(&tagged)
            .filter(|(_, t)| !**t)
            .map(|(e, _)| e)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(HOLDERS)?;
            for (score, id) in rows {
                if *id == 0 {
                    table.remove(score.0)?;
                } else {
                    table.insert(score.0, postcard::to_allocvec(id)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Removes the `holders` rows of `scores`.
    fn remove_rows(&self, scores: &[Score]) -> Result<()> {
        if scores.is_empty() {
            return Ok(());
        }
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

    /// Commits the peers and sets `fresh` names, with whatever `also`
    /// writes, and takes them into `names`.
    fn commit_fresh(
        &self,
        names: &mut Names,
        fresh: Fresh,
        also: impl FnOnce(&redb::WriteTransaction) -> Result<()>,
    ) -> Result<()> {
        let txn = self.db.begin_write()?;
        Names::write(&txn, &fresh)?;
        also(&txn)?;
        txn.commit()?;
        names.apply(fresh);
        Ok(())
    }

    /// The confirmed holders of `score`.
    pub fn holders(&self, score: &Score) -> Result<Vec<PeerId>> {
        Ok(self
            .holders_of(std::iter::once(*score))?
            .pop()
            .unwrap_or_default())
    }

    /// The confirmed holders of each of `scores`.
    pub fn holders_of(&self, scores: impl Iterator<Item = Score>) -> Result<Vec<Vec<PeerId>>> {
        let scores: Vec<Score> = scores.collect();
        let mut out = Vec::with_capacity(scores.len());
        for chunk in scores.chunks(CHUNK) {
            let ids = self.ids_of(chunk)?;
            let names = self.names();
            out.extend(
                chunk
                    .iter()
                    .zip(ids)
                    .map(|(s, id)| self.members(&names, s, id)),
            );
        }
        Ok(out)
    }

    /// Records the confirmed holders of several blocks (no holders: forgets
    /// the block's).
    pub fn set_many(&self, entries: &[(Score, Vec<PeerId>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut names = self.names();
        let mut fresh = Fresh::default();
        let mut ids = Vec::with_capacity(entries.len());
        for (score, peers) in entries {
            ids.push((*score, names.resolve(peers, &mut fresh)?));
        }
        if !fresh.peers.is_empty() || !fresh.sets.is_empty() {
            self.commit_fresh(&mut names, fresh, |_| Ok(()))?;
        }
        self.write_ids(&ids)
    }

    /// Keeps, as `holders` rows, the set numbers GC's sweep found in the
    /// entries of blocks it is about to remove from the volume, so their
    /// release still knows where they are (see
    /// [`LocalStore::sweep_keeping_tags`]). Runs inside the sweep's
    /// transaction of the volume: it takes no lock a change holds while
    /// writing tags.
    pub fn keep_freed(&self, tags: &[(Score, u64)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(HOLDERS)?;
            for (score, tag) in tags {
                let id = self.tag_id(score, *tag);
                if id != 0 {
                    table.insert(score.0, postcard::to_allocvec(&id)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every entry: score and confirmed holders, in score order.
    pub fn all(&self) -> Result<Vec<(Score, Vec<PeerId>)>> {
        let ids = self.all_ids()?;
        let names = self.names();
        Ok(ids
            .into_iter()
            .map(|(s, id)| (s, self.members(&names, &s, id)))
            .collect())
    }

    /// Every block with a set number, in score order.
    fn all_ids(&self) -> Result<Vec<(Score, u32)>> {
        let mut out = Vec::new();
        loop {
            let ids = self.ids_after(out.last().map(|(s, _)| s), CHUNK)?;
            if ids.is_empty() {
                return Ok(out);
            }
            out.extend(ids);
        }
    }

    /// Up to `limit` `holders` rows after `after` (exclusive), in score
    /// order, each with its set number (`None` if it does not decode).
    fn rows_after(&self, after: Option<&Score>, limit: usize) -> Result<Vec<(Score, Option<u32>)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(HOLDERS)?;
        let range = match after {
            Some(a) => table.range((std::ops::Bound::Excluded(a.0), std::ops::Bound::Unbounded))?,
            None => table.range::<[u8; 32]>(..)?,
        };
        let mut rows = Vec::new();
        for item in range.take(limit) {
            let (k, v) = item?;
            rows.push((Score(k.value()), decode_id(v.value())));
        }
        Ok(rows)
    }

    /// Up to `limit` blocks with a set number, in score order after `after`
    /// (exclusive): tags of the volume and `holders` rows merged, a row
    /// beside a tag left out. Empty only past the last.
    fn ids_after(&self, after: Option<&Score>, limit: usize) -> Result<Vec<(Score, u32)>> {
        let limit = limit.max(1);
        let mut from = after.copied();
        loop {
            // The volume is read first and as of one moment, the rows after
            // it: a block GC removes meanwhile has its row by the time its
            // entry goes, and one tagged meanwhile is seen either way.
            let reader = self.volume.tag_reader()?;
            let tagged = reader.tagged_after(from.as_ref(), limit)?;
            let rows: Vec<(Score, u32)> = self
                .rows_after(from.as_ref(), limit)?
                .into_iter()
                .map(|(score, id)| (score, self.row_id(&score, id)))
                .collect();
            // Each source read up to `limit`: what lies past the end of a
            // full one is not known yet.
            let bound = [
                (tagged.len() == limit)
                    .then(|| tagged.last().map(|(s, _)| *s))
                    .flatten(),
                (rows.len() == limit)
                    .then(|| rows.last().map(|(s, _)| *s))
                    .flatten(),
            ]
            .into_iter()
            .flatten()
            .min();
            let scores: Vec<Score> = rows.iter().map(|(s, _)| *s).collect();
            let beside_tag = reader.tags_of(&scores)?;
            let rows = rows
                .into_iter()
                .zip(beside_tag)
                .filter(|(_, t)| !matches!(t, Some(t) if *t != 0))
                .map(|(r, _)| r);
            let mut out: Vec<(Score, u32)> = tagged
                .into_iter()
                .map(|(s, t)| (s, self.tag_id(&s, t)))
                .chain(rows)
                .filter(|(s, _)| bound.is_none_or(|b| *s <= b))
                .collect();
            out.sort_unstable_by_key(|(s, _)| *s);
            out.dedup_by_key(|(s, _)| *s);
            out.truncate(limit);
            match bound {
                // Only rows beside tags up to `b`: look further.
                Some(b) if out.is_empty() => from = Some(b),
                _ => return Ok(out),
            }
        }
    }

    /// Forgets blocks entirely.
    pub fn remove(&self, scores: impl Iterator<Item = Score>) -> Result<()> {
        let ids: Vec<(Score, u32)> = scores.map(|s| (s, 0)).collect();
        let _names = self.names();
        self.write_ids(&ids)
    }

    /// Every block with a set number among `ids` (tags and rows; a block
    /// may come twice).
    fn blocks_in(&self, ids: &HashSet<u32>) -> Result<Vec<Score>> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let tagged = self.volume.tagged_after(after.as_ref(), CHUNK)?;
            let Some((last, _)) = tagged.last() else {
                break;
            };
            after = Some(*last);
            out.extend(
                tagged
                    .iter()
                    .filter(|(_, t)| u32::try_from(*t).is_ok_and(|id| ids.contains(&id)))
                    .map(|(s, _)| *s),
            );
        }
        let txn = self.db.begin_read()?;
        for item in txn.open_table(HOLDERS)?.iter()? {
            let (k, v) = item?;
            if decode_id(v.value()).is_some_and(|id| ids.contains(&id)) {
                out.push(Score(k.value()));
            }
        }
        Ok(out)
    }

    /// Removes `peer` from every block's holders; returns how many blocks it held.
    ///
    /// Every set that names it loses it, in place: the blocks of a set
    /// share its fate, so none of their entries is rewritten.
    pub fn drop_peer(&self, peer: &PeerId) -> Result<u64> {
        let mut names = self.names();
        let Some(&index) = names.peer_index.get(peer) else {
            self.losses.fetch_add(1, Ordering::Release);
            return Ok(0);
        };
        let changed: HashMap<u32, Vec<u32>> = names
            .sets
            .iter()
            .filter(|(_, m)| m.contains(&index))
            .map(|(id, m)| (*id, m.iter().copied().filter(|i| *i != index).collect()))
            .collect();
        if changed.is_empty() {
            self.losses.fetch_add(1, Ordering::Release);
            return Ok(0);
        }
        let ids: HashSet<u32> = changed.keys().copied().collect();
        // Read before the commit below, and under `names`: no change can
        // give a block one of these sets meanwhile. A block GC removes
        // meanwhile is in a `holders` row by the time its entry goes.
        let mut blocks = self.blocks_in(&ids)?;
        let txn = self.db.begin_write()?;
        {
            // Rows GC kept since the read above.
            let table = txn.open_table(HOLDERS)?;
            for item in table.iter()? {
                let (k, v) = item?;
                if decode_id(v.value()).is_some_and(|id| ids.contains(&id)) {
                    blocks.push(Score(k.value()));
                }
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
        let tags = self.volume.tags_of(&blocks)?;
        let mut n = 0;
        {
            let mut sets = txn.open_table(SETS)?;
            for (id, members) in &changed {
                sets.insert(*id, postcard::to_allocvec(members)?.as_slice())?;
            }
            let mut dropped = txn.open_table(DROPPED)?;
            let mut queue = txn.open_table(QUEUE)?;
            let rows = txn.open_table(HOLDERS)?;
            for (score, tag) in blocks.iter().zip(tags) {
                let id = match tag {
                    Some(t) if t != 0 => u32::try_from(t).unwrap_or(0),
                    _ => rows
                        .get(score.0)?
                        .and_then(|v| decode_id(v.value()))
                        .unwrap_or(0),
                };
                let Some(rest) = changed.get(&id) else {
                    continue;
                };
                want_again(&mut queue, score.0, rest.len() + 1)?;
                let mut key = peer.to_bytes();
                key.extend_from_slice(&score.0);
                dropped.insert(key.as_slice(), 1)?;
                n += 1;
            }
        }
        txn.commit()?;
        for (id, members) in changed {
            if let Some(old) = names.sets.insert(id, members.clone())
                && names.set_index.get(&old) == Some(&id)
            {
                names.set_index.remove(&old);
            }
            names.set_index.entry(members).or_insert(id);
        }
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
        let mut names = self.names();
        let ids = self.ids_of(scores)?;
        let mut fresh = Fresh::default();
        let mut changed = Vec::new();
        for (score, id) in scores.iter().zip(ids) {
            let holders = self.members(&names, score, id);
            if !holders.contains(peer) {
                continue;
            }
            let rest: Vec<PeerId> = holders.into_iter().filter(|p| p != peer).collect();
            let n = rest.len();
            changed.push((*score, names.resolve(&rest, &mut fresh)?, n));
        }
        // The drop and the new wants are committed first: should the tags
        // below be lost to a crash, the block still names `peer`, whose
        // release is then forgotten, and its next failed proof drops it again.
        self.commit_fresh(&mut names, fresh, |txn| {
            let mut dropped = txn.open_table(DROPPED)?;
            let mut queue = txn.open_table(QUEUE)?;
            for (score, _, rest) in &changed {
                want_again(&mut queue, score.0, rest + 1)?;
                let mut key = peer.to_bytes();
                key.extend_from_slice(&score.0);
                dropped.insert(key.as_slice(), 1)?;
            }
            Ok(())
        })?;
        let ids: Vec<(Score, u32)> = changed.iter().map(|(s, id, _)| (*s, *id)).collect();
        self.write_ids(&ids)?;
        self.losses.fetch_add(1, Ordering::Release);
        Ok(changed.len() as u64)
    }

    /// Every peer named as a holder of some block.
    pub fn holder_peers(&self) -> Result<HashSet<PeerId>> {
        let used: HashSet<u32> = self.all_ids()?.into_iter().map(|(_, id)| id).collect();
        let names = self.names();
        let mut out = HashSet::new();
        for id in used {
            for i in names.sets.get(&id).into_iter().flatten() {
                out.extend(names.peers.get(i).copied());
            }
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
        let mut ids = self.ids_after(after.as_ref(), limit)?;
        if let Some(a) = after
            && ids.len() < limit
        {
            // From the start again past the end, up to where this slice began.
            let head = self.ids_after(None, limit - ids.len())?;
            ids.extend(head.into_iter().take_while(|(s, _)| *s < a));
        }
        let names = self.names();
        Ok(ids
            .into_iter()
            .map(|(s, id)| (s, self.members(&names, &s, id)))
            .collect())
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

    /// The whole manifest as a record, to be stored as blocks: the same as
    /// `ManifestRecord::new(&self.all()?)`, built from the blocks' set
    /// numbers so that no block's holders are spelt out as PeerIds (about
    /// 250 bytes a block, some 9 MB at 34,000 blocks, at every head).
    pub fn record(&self) -> Result<ManifestRecord> {
        let ids = self.all_ids()?;
        let mut sets: HashMap<u32, Vec<PeerId>> = HashMap::new();
        {
            let names = self.names();
            for (score, id) in &ids {
                if !sets.contains_key(id) {
                    sets.insert(*id, self.members(&names, score, *id));
                }
            }
        }
        let mut index: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
        for p in sets.values().flatten() {
            index.insert(p.to_bytes(), 0);
        }
        for (i, v) in index.values_mut().enumerate() {
            *v = i as u32;
        }
        let members: HashMap<u32, Vec<u32>> = sets
            .into_iter()
            .map(|(id, peers)| {
                let mut m: Vec<u32> = peers.iter().map(|p| index[&p.to_bytes()]).collect();
                m.sort_unstable();
                m.dedup();
                (id, m)
            })
            .collect();
        // `ids_after` gives them in score order, each once.
        let entries = ids
            .into_iter()
            .map(|(score, id)| (score, members.get(&id).cloned().unwrap_or_default()))
            .collect();
        Ok(ManifestRecord {
            version: MANIFEST_RECORD_VERSION,
            peers: index.into_keys().collect(),
            entries,
        })
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
        let mut after = None;
        loop {
            let batch = self.queued_after(after, CHUNK)?;
            let Some((last, _)) = batch.last() else { break };
            after = Some(*last);
            let wants: Vec<Score> = batch
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(s, _)| *s)
                .collect();
            if self
                .holders_of(wants.into_iter())?
                .iter()
                .any(Vec::is_empty)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `score` has a confirmed holder or is queued.
    pub fn knows(&self, score: &Score) -> Result<bool> {
        if self.ids_of(std::slice::from_ref(score))?[0] != 0 {
            return Ok(true);
        }
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(QUEUE)?.get(score.0)?.is_some())
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

/// Rewrites a version 2 `holders` table (each row the indices of its
/// holders) as numbers of holder sets in a new `sets` table, in the
/// caller's transaction. The rows move into the volume's tags when the
/// manifest is opened. A row that does not decode is left out: its block is
/// placed again, as a damaged entry always is.
fn upgrade_from_2(txn: &redb::WriteTransaction) -> Result<()> {
    let mut rows = Vec::new();
    {
        let table = txn.open_table(HOLDERS)?;
        for item in table.iter()? {
            let (k, v) = item?;
            match postcard::from_bytes::<Vec<u32>>(v.value()) {
                Ok(mut members) => {
                    members.sort_unstable();
                    members.dedup();
                    rows.push((k.value(), members));
                }
                Err(e) => {
                    tracing::error!(score = %Score(k.value()), error = %e, "a version 2 manifest entry is damaged; the block will be placed again")
                }
            }
        }
    }
    let mut ids: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut sets = txn.open_table(SETS)?;
    let mut holders = txn.open_table(HOLDERS)?;
    holders.retain(|_, _| false)?;
    for (score, members) in rows {
        if members.is_empty() {
            continue;
        }
        let next = ids.len() as u32 + 1;
        let id = *ids.entry(members.clone()).or_insert(next);
        if id == next {
            sets.insert(id, postcard::to_allocvec(&members)?.as_slice())?;
        }
        holders.insert(score, postcard::to_allocvec(&id)?.as_slice())?;
    }
    Ok(())
}

/// A `holders` value: a set number; `None` if it does not decode.
fn decode_id(bytes: &[u8]) -> Option<u32> {
    postcard::from_bytes::<u32>(bytes)
        .ok()
        .filter(|id| *id != 0)
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
    use redb::ReadableTableMetadata;
    use std::sync::Arc;

    /// A volume in `dir`, opened once per test (a reopened manifest shares it).
    fn volume(dir: &Path) -> Arc<LocalStore> {
        Arc::new(LocalStore::open(&dir.join("volume"), Default::default()).unwrap())
    }

    /// Puts an own block into `volume`; its score.
    fn own(volume: &LocalStore, n: u32) -> Score {
        let data = bytes::Bytes::from(format!("own block {n}").into_bytes());
        let score = Score::of(&data);
        volume.put(score, data, Class::Own).unwrap();
        score
    }

    /// Rows of the manifest's own `holders` table.
    fn rows(m: &Manifest) -> usize {
        let txn = m.db.begin_read().unwrap();
        txn.open_table(HOLDERS).unwrap().len().unwrap() as usize
    }

    #[test]
    fn the_manifest_keeps_holders_and_dropped_placements_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let (p, q) = (PeerId::random(), PeerId::random());
        // s is kept in the volume, t is not (a home recovered without --all).
        let (s, t) = (own(&vol, 1), Score([4; 32]));
        {
            let m = Manifest::open(&path, vol.clone()).unwrap();
            m.set_many(&[(s, vec![p, q]), (t, vec![q])]).unwrap();
            assert_eq!(rows(&m), 1, "only the block the volume lacks has a row");
            assert!(vol.tags_of(&[s]).unwrap()[0].is_some_and(|t| t != 0));
            assert_eq!(m.drop_peer(&q).unwrap(), 2);
        }
        let m = Manifest::open(&path, vol.clone()).unwrap();
        assert_eq!(m.holders(&s).unwrap(), vec![p]);
        assert!(m.holders(&t).unwrap().is_empty());
        let pending = m.pending_releases().unwrap();
        let mut kept = pending.get(&q).cloned().unwrap_or_default();
        kept.sort_by_key(|s| s.0);
        let mut both = vec![s, t];
        both.sort_by_key(|s| s.0);
        assert_eq!(kept, both);
        m.forget_releases(&q, &[s, t]).unwrap();
        assert!(m.pending_releases().unwrap().is_empty());
        m.remove([s].into_iter()).unwrap();
        assert!(m.holders(&s).unwrap().is_empty());
    }

    #[test]
    fn holders_of_blocks_in_the_volume_cost_no_row_and_survive_their_gc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let scores: Vec<Score> = (0..300).map(|i| own(&vol, i)).collect();
        let m = Manifest::open(&path, vol.clone()).unwrap();
        let e: Vec<(Score, Vec<PeerId>)> = scores
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, vec![peers[i % 4], peers[(i + 1) % 4]]))
            .collect();
        m.set_many(&e).unwrap();
        assert_eq!(rows(&m), 0);
        assert_eq!(m.names().sets.len(), 4, "300 blocks, four holder sets");
        assert_eq!(sorted(m.all().unwrap()), sorted(e.clone()));
        assert_eq!(m.holder_peers().unwrap().len(), 4);
        assert_eq!(m.record().unwrap(), ManifestRecord::new(&e));
        // GC frees half; their holders move into rows, so the release finds them.
        let live: HashSet<Score> = scores[..150].iter().copied().collect();
        let gone = vol
            .sweep_keeping_tags(&live, vol.mark(), |tags| {
                m.keep_freed(tags)
                    .map_err(|e| fincrypt_blockstore::Error::Index(e.to_string()))
            })
            .unwrap();
        assert_eq!(gone.len(), 150);
        assert_eq!(rows(&m), 150);
        assert_eq!(
            sorted(m.all().unwrap()),
            sorted(e.clone()),
            "nothing forgotten"
        );
        assert_eq!(
            m.record().unwrap(),
            ManifestRecord::new(&e),
            "rows and tags alike"
        );
        m.remove(scores[150..].iter().copied()).unwrap();
        assert_eq!(rows(&m), 0);
        assert_eq!(sorted(m.all().unwrap()), sorted(e[..150].to_vec()));
        assert_eq!(m.corrupt_entries(), 0);
    }

    #[test]
    fn a_block_fetched_into_the_volume_has_its_row_moved_into_its_tag_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let data = bytes::Bytes::from_static(b"fetched later");
        let s = Score::of(&data);
        let p = PeerId::random();
        {
            let m = Manifest::open(&path, vol.clone()).unwrap();
            m.set_many(&[(s, vec![p])]).unwrap();
            assert_eq!(rows(&m), 1);
        }
        vol.put(s, data, Class::Own).unwrap();
        let m = Manifest::open(&path, vol.clone()).unwrap();
        assert_eq!(rows(&m), 0);
        assert_eq!(m.holders(&s).unwrap(), vec![p]);
        assert!(m.knows(&s).unwrap());
    }

    #[test]
    fn tags_written_for_another_manifest_are_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let s = own(&vol, 3);
        {
            let m = Manifest::open(&path, vol.clone()).unwrap();
            m.set_many(&[(s, vec![PeerId::random(), PeerId::random()])])
                .unwrap();
        }
        // The manifest is lost (an interrupted recovery starts a new one);
        // the volume and its tags stay, and a new manifest numbers its sets afresh.
        std::fs::remove_file(&path).unwrap();
        let m = Manifest::open(&path, vol.clone()).unwrap();
        assert_eq!(vol.tags_of(&[s]).unwrap(), vec![Some(0)]);
        assert!(m.holders(&s).unwrap().is_empty());
        let p = PeerId::random();
        m.set_many(&[(s, vec![p])]).unwrap();
        drop(m);
        let m = Manifest::open(&path, vol.clone()).unwrap();
        assert_eq!(m.holders(&s).unwrap(), vec![p], "its own tags stay");
    }

    #[test]
    fn a_version_1_manifest_is_upgraded_with_every_entry_and_holders_cost_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let local = own(&vol, 7);
        let e: Vec<(Score, Vec<PeerId>)> = (0..200u32)
            .map(|i| {
                let mut s = [0u8; 32];
                s[..4].copy_from_slice(&i.to_be_bytes());
                let k = i as usize;
                (
                    if i == 100 { local } else { Score(s) },
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
            let m = Manifest::open(&path, vol.clone()).unwrap();
            assert_eq!(
                sorted(m.all().unwrap()),
                sorted(e.clone()),
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
            assert_eq!(holders.len().unwrap(), 199, "the volume's block is a tag");
            let v = holders.get(e[0].0.0).unwrap().unwrap();
            assert!(v.value().len() <= 1, "a set number: {:?}", v.value());
            assert_eq!(m.names().sets.len(), 5);
        }
        let m = Manifest::open(&path, vol.clone()).unwrap();
        assert_eq!(
            sorted(m.all().unwrap()),
            sorted(e.clone()),
            "and again after reopening"
        );
        let extra = (Score([0xee; 32]), vec![PeerId::random(), peers[0]]);
        m.set_many(std::slice::from_ref(&extra)).unwrap();
        drop(m);
        let m = Manifest::open(&path, vol.clone()).unwrap();
        let mut got = m.holders(&extra.0).unwrap();
        got.sort();
        let mut want = extra.1.clone();
        want.sort();
        assert_eq!(got, want, "a new peer's index is kept");
        assert_eq!(m.corrupt_entries(), 0);
    }

    #[test]
    fn an_entry_naming_an_unknown_set_reads_as_no_holder_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(dir.path());
        let m = Manifest::open(&dir.path().join("manifest.redb"), vol.clone()).unwrap();
        let (s, t) = (Score([7; 32]), own(&vol, 1));
        m.set_many(&[(s, vec![PeerId::random()]), (t, vec![PeerId::random()])])
            .unwrap();
        let txn = m.db.begin_write().unwrap();
        txn.open_table(HOLDERS)
            .unwrap()
            .insert(s.0, postcard::to_allocvec(&77u32).unwrap().as_slice())
            .unwrap();
        txn.commit().unwrap();
        vol.set_tags(&[(t, 1 << 40)]).unwrap();
        assert!(m.holders(&s).unwrap().is_empty());
        assert!(m.holders(&t).unwrap().is_empty());
        assert_eq!(m.corrupt_entries(), 2);
    }

    #[test]
    fn proof_histories_and_per_block_drops_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.redb");
        let vol = volume(dir.path());
        let (p, q) = (PeerId::random(), PeerId::random());
        let (s, t) = (own(&vol, 5), Score([6; 32]));
        {
            let m = Manifest::open(&path, vol.clone()).unwrap();
            m.set_many(&[(s, vec![p, q]), (t, vec![p, q])]).unwrap();
            assert_eq!(m.drop_blocks(&p, &[s]).unwrap(), 1);
            m.update_records(&[p], |_, r| {
                r.passed += 2;
                r.failed += 1;
                r.banned_until = Some(u64::MAX);
            })
            .unwrap();
        }
        let m = Manifest::open(&path, vol.clone()).unwrap();
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
        let vol = volume(dir.path());
        let m = Manifest::open(&dir.path().join("manifest.redb"), vol.clone()).unwrap();
        // Half the blocks in the volume (tags), half not (rows), interleaved.
        let mut e = entries(5);
        let peers = e[0].1.clone();
        e.extend((0..5).map(|i| (own(&vol, i), peers.clone())));
        m.set_many(&e).unwrap();
        assert_eq!(rows(&m), 5);
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
        let mut in_order = seen[..10].to_vec();
        in_order.sort();
        assert_eq!(seen[..10], in_order[..], "in score order");
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
