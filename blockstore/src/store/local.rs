//! The local volume: one file per block under sharded directories, and a redb
//! index of what is stored, why, and how often it is used.
//!
//! Write order: block files are written to `tmp/`, fsynced and renamed into
//! place, their directories fsynced, and only then is the index committed, one
//! transaction per batch. A block is acknowledged once it is in the index, so
//! after a crash a file without an index entry was never acknowledged and is
//! removed when the store next opens.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{BlockStore, Class, check, check_range};
use crate::score::{self, MAX_BLOCK_LEN, SEGMENT_SIZE};
use crate::{Error, Score};

/// Bytes of the block index redb may cache.
const INDEX_CACHE: usize = 16 << 20;
const BLOCKS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("blocks");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Threads that fsync lazily put block files at a durable commit.
const SYNC_THREADS: usize = 8;
/// Version of the volume layout and index entries (docs/FORMATS.md, "Local volume").
pub const VOLUME_VERSION: u64 = 1;

/// Settings of a local volume.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes that `cached` blocks may take before the least used are evicted.
    pub cache_capacity: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity: 1 << 30,
        }
    }
}

/// Blocks and bytes per class, as the index records them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub own_blocks: u64,
    pub own_bytes: u64,
    pub held_blocks: u64,
    pub held_bytes: u64,
    pub cached_blocks: u64,
    pub cached_bytes: u64,
}

impl StoreStats {
    fn add(&mut self, class: Class, size: u64, sign: i64) {
        let (b, n) = match class {
            Class::Own => (&mut self.own_blocks, &mut self.own_bytes),
            Class::Held => (&mut self.held_blocks, &mut self.held_bytes),
            Class::Cached => (&mut self.cached_blocks, &mut self.cached_bytes),
        };
        *b = b.saturating_add_signed(sign);
        *n = n.saturating_add_signed(sign * size as i64);
    }
}

/// What a scrub found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blocks read and verified.
    pub checked: u64,
    /// Indexed blocks whose bytes do not match their score.
    pub corrupt: Vec<Score>,
    /// Indexed blocks with no file.
    pub missing: Vec<Score>,
    /// Block files that the index does not know.
    pub orphans: Vec<PathBuf>,
}

impl ScrubReport {
    /// True when every indexed block is present and sound and nothing else is stored.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.missing.is_empty() && self.orphans.is_empty()
    }
}

/// One index entry (postcard-encoded, see docs/FORMATS.md).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Entry {
    class: u8,
    size: u64,
    hits: u64,
    /// Seconds since the Unix epoch of the last get or put.
    last_use: u64,
    /// Store-wide sequence number of the last put; GC spares blocks put after its mark.
    seq: u64,
    /// The caller's tag for an own block, 0 for none (see [`LocalStore::set_tags`]).
    /// Entries written before tags existed end at `seq` and read as 0.
    tag: u64,
}

/// An entry as written before tags existed.
#[derive(Deserialize)]
struct EntryWithoutTag {
    class: u8,
    size: u64,
    hits: u64,
    last_use: u64,
    seq: u64,
}

impl Entry {
    /// The entry's class; `decode_entry` has already refused unknown values.
    fn class(&self) -> Class {
        Class::from_u8(self.class).unwrap_or(Class::Own)
    }
}

/// Tags of a volume as they were when it was made (see [`LocalStore::tag_reader`]).
pub struct TagReader {
    txn: redb::ReadTransaction,
}

impl TagReader {
    /// As [`LocalStore::tags_of`].
    pub fn tags_of(&self, scores: &[Score]) -> Result<Vec<Option<u64>>, Error> {
        let table = self.txn.open_table(BLOCKS)?;
        let mut out = Vec::with_capacity(scores.len());
        for s in scores {
            let e = match table.get(s.0)? {
                Some(v) => Some(decode_entry(v.value())?),
                None => None,
            };
            out.push(e.filter(|e| e.class() == Class::Own).map(|e| e.tag));
        }
        Ok(out)
    }

    /// As [`LocalStore::tagged_after`].
    pub fn tagged_after(
        &self,
        after: Option<&Score>,
        limit: usize,
    ) -> Result<Vec<(Score, u64)>, Error> {
        let table = self.txn.open_table(BLOCKS)?;
        let range = match after {
            Some(a) => table.range((std::ops::Bound::Excluded(a.0), std::ops::Bound::Unbounded))?,
            None => table.range::<[u8; 32]>(..)?,
        };
        let mut out = Vec::new();
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            let e = decode_entry(v.value())?;
            if e.class() == Class::Own && e.tag != 0 {
                out.push((Score(k.value()), e.tag));
            }
        }
        Ok(out)
    }
}

/// Space on the disk under a volume (see [`LocalStore::disk_space`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes a new file may still take.
    pub available: u64,
    /// Size of the disk.
    pub total: u64,
}

/// A block volume on the local disk.
pub struct LocalStore {
    dir: PathBuf,
    db: Database,
    options: StoreOptions,
    /// Serialises the index-and-rename step of puts with deletes and sweeps.
    mutate: Mutex<Stats>,
    /// Hits recorded by gets since the last commit; written with the next one.
    hits: Mutex<HashMap<Score, u64>>,
    seq: AtomicU64,
    tmp_counter: AtomicU64,
    /// False once the volume's filesystem refused a direct write (see [`direct_io`]).
    direct_ok: AtomicBool,
    /// See [`LocalStore::start_writeback_early`].
    early_writeback: AtomicBool,
    /// Set by `shutdown`; the next change marks the volume in use again.
    marked_clean: AtomicBool,
    /// Block files (and their directories) renamed into place but not yet fsynced.
    unsynced: Mutex<BTreeSet<PathBuf>>,
    /// Leaf hashes of blocks read in part, so the next partial read is checked cheaply.
    leaves: quick_cache::sync::Cache<Score, Arc<Leaves>, LeavesWeight>,
}

struct Stats(StoreStats);

/// A block's length and segment hashes, checked against its score once so
/// that later partial reads check only the segments they read.
struct Leaves {
    len: usize,
    hashes: Vec<[u8; 32]>,
}

#[derive(Clone)]
struct LeavesWeight;

impl quick_cache::Weighter<Score, Arc<Leaves>> for LeavesWeight {
    fn weight(&self, _: &Score, leaves: &Arc<Leaves>) -> u64 {
        (leaves.hashes.len() * 32 + 64) as u64
    }
}

/// Memory for leaf hashes: 8 KiB covers a 1 MiB block, so 16 MiB covers 2 GiB.
const LEAVES_CACHE: u64 = 16 << 20;

impl LocalStore {
    /// Opens (or creates) the volume in `dir`, repairing what a crash left behind.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<LocalStore, Error> {
        for sub in ["", "blocks", "tmp"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        // All 256 shard directories exist before any put, so a put never
        // creates a directory whose own entry would need another fsync.
        let blocks = dir.join("blocks");
        if !blocks.join("ff").exists() {
            for i in 0..=255u8 {
                let p = blocks.join(format!("{i:02x}"));
                fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
            fs::File::open(&blocks)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(&blocks, e))?;
        }
        // redb caches up to 1 GiB by default; the index's hot part is its
        // interior pages, and the daemon's memory is bounded (docs/SEMANTICS.md).
        let db = redb::Builder::new()
            .set_cache_size(INDEX_CACHE)
            .create(dir.join("index.redb"))?;
        let txn = db.begin_write()?;
        let (clean, seq) = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(BLOCKS)?;
            let version = meta.get("version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("version", VOLUME_VERSION)?;
                }
                Some(VOLUME_VERSION) => {}
                Some(v) => {
                    return Err(Error::Format(format!(
                        "volume version {v} is not supported (this program reads version {VOLUME_VERSION})"
                    )));
                }
            }
            let clean = meta.get("clean")?.map(|v| v.value()).unwrap_or(1) == 1;
            let seq = meta.get("seq")?.map(|v| v.value()).unwrap_or(0);
            meta.insert("clean", 0)?;
            (clean, seq)
        };
        txn.commit()?;
        let store = LocalStore {
            dir: dir.to_path_buf(),
            db,
            options,
            mutate: Mutex::new(Stats(StoreStats::default())),
            hits: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(seq),
            tmp_counter: AtomicU64::new(0),
            direct_ok: AtomicBool::new(true),
            early_writeback: AtomicBool::new(false),
            marked_clean: AtomicBool::new(false),
            unsynced: Mutex::new(BTreeSet::new()),
            leaves: quick_cache::sync::Cache::with_weighter(
                (LEAVES_CACHE / (8 << 10)) as usize,
                LEAVES_CACHE,
                LeavesWeight,
            ),
        };
        store.clear_tmp()?;
        if !clean {
            let removed = store.remove_orphans()?;
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed unacknowledged block files left by a crash"
                );
            }
        }
        let (stats, max_seq) = store.count()?;
        store.lock().0 = stats;
        // The counter is saved only at a clean close; never hand out a number already used.
        store.seq.fetch_max(max_seq, Ordering::SeqCst);
        Ok(store)
    }

    /// Counts a read, for the eviction of cached blocks.
    fn touch(&self, score: &Score) {
        *self
            .hits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(*score)
            .or_insert(0) += 1;
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Free and total bytes of the disk the volume is on, as an unprivileged
    /// writer sees them (`statvfs`: blocks available to non-root users).
    pub fn disk_space(&self) -> std::io::Result<DiskSpace> {
        let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: all-zero is a valid statvfs.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid C string and `st` a valid out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let unit = st.f_frsize as u64;
        Ok(DiskSpace {
            available: (st.f_bavail as u64).saturating_mul(unit),
            total: (st.f_blocks as u64).saturating_mul(unit),
        })
    }

    /// The volume's index, for a user of the store to keep tables of its own
    /// beside it (the store's own are `blocks` and `meta`), written in their
    /// own transactions or with blocks through [`LocalStore::put_staged_with`].
    pub fn index(&self) -> &Database {
        &self.db
    }

    /// Blocks and bytes per class.
    pub fn stats(&self) -> StoreStats {
        self.lock().0
    }

    /// The class a block is stored under, if it is stored.
    pub fn class_of(&self, score: &Score) -> Result<Option<Class>, Error> {
        Ok(self.entry(score)?.map(|e| e.class()))
    }

    /// The length of a stored block, if it is stored.
    pub fn size_of(&self, score: &Score) -> Result<Option<u64>, Error> {
        Ok(self.entry(score)?.map(|e| e.size))
    }

    /// A GC mark: blocks put from now on are spared by a sweep given this mark.
    pub fn mark(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Removes `own` blocks put before `mark` that are not in `live`; returns the ones that went.
    ///
    /// The caller computes `live` by walking every retained root after taking
    /// the mark. A block put (or put again) after the mark is kept even if it
    /// is not in `live`, so a sweep never races a writer that reuses a block.
    pub fn sweep(&self, live: &HashSet<Score>, mark: u64) -> Result<Vec<Score>, Error> {
        self.sweep_keeping_tags(live, mark, |_| Ok(()))
    }

    /// [`LocalStore::sweep`], handing `keep` the tags of the blocks about to
    /// go (those with a tag) before their entries are removed: if `keep`
    /// fails, nothing is removed, so whoever tagged a block can keep what
    /// its tag said elsewhere.
    pub fn sweep_keeping_tags(
        &self,
        live: &HashSet<Score>,
        mark: u64,
        keep: impl FnOnce(&[(Score, u64)]) -> Result<(), Error>,
    ) -> Result<Vec<Score>, Error> {
        let mut stats = self.lock();
        let txn = self.db.begin_write()?;
        self.in_use(&txn)?;
        let mut gone = Vec::new();
        {
            let mut table = txn.open_table(BLOCKS)?;
            let mut doomed = Vec::new();
            for item in table.iter()? {
                let (k, v) = item?;
                let e = decode_entry(v.value())?;
                let score = Score(k.value());
                if e.class() == Class::Own && e.seq <= mark && !live.contains(&score) {
                    doomed.push((score, e));
                }
            }
            let tags: Vec<(Score, u64)> = doomed
                .iter()
                .filter(|(_, e)| e.tag != 0)
                .map(|(s, e)| (*s, e.tag))
                .collect();
            if !tags.is_empty() {
                keep(&tags)?;
            }
            for (score, e) in doomed {
                table.remove(score.0)?;
                stats.0.add(Class::Own, e.size, -1);
                gone.push(score);
            }
        }
        self.commit(txn, true)?;
        for score in &gone {
            self.remove_file(score)?;
        }
        Ok(gone)
    }

    /// The tag of each of `scores` (see [`LocalStore::set_tags`]): `None`
    /// for a block the volume does not keep as its own, else its tag (0 for
    /// none yet).
    pub fn tags_of(&self, scores: &[Score]) -> Result<Vec<Option<u64>>, Error> {
        self.tag_reader()?.tags_of(scores)
    }

    /// Own blocks with a tag, in score order from after `after` (from the
    /// first if `None`), at most `limit`.
    pub fn tagged_after(
        &self,
        after: Option<&Score>,
        limit: usize,
    ) -> Result<Vec<(Score, u64)>, Error> {
        self.tag_reader()?.tagged_after(after, limit)
    }

    /// Reads tags as of now, however they change meanwhile.
    pub fn tag_reader(&self) -> Result<TagReader, Error> {
        Ok(TagReader {
            txn: self.db.begin_read()?,
        })
    }

    /// Gives own blocks a tag: a number the volume keeps in the block's
    /// entry for the layer above, and otherwise ignores (the durability
    /// engine keeps there who holds the block, for the price of a varint
    /// rather than a row of its own). Durable on return. Returns, for each
    /// block, whether it was tagged: a block the volume does not keep as its
    /// own has no entry to tag.
    ///
    /// Durable because a lazy commit cannot reuse the pages it frees until
    /// a durable one: tags changed a few at a time in lazy commits doubled
    /// the index file (34,000 entries tagged 64 at a time: 4.5 to 8.9 MB;
    /// durably: no growth). The block files a durable commit must sync
    /// first are synced before the volume's lock is taken.
    pub fn set_tags(&self, tags: &[(Score, u64)]) -> Result<Vec<bool>, Error> {
        let mut out = Vec::with_capacity(tags.len());
        if tags.is_empty() {
            return Ok(out);
        }
        self.sync_pending()?;
        let _stats = self.lock();
        let txn = self.db.begin_write()?;
        let mut changed = false;
        {
            let mut table = txn.open_table(BLOCKS)?;
            for (score, tag) in tags {
                let existing = table
                    .get(score.0)?
                    .map(|v| decode_entry(v.value()))
                    .transpose()?;
                match existing {
                    Some(mut e) if e.class() == Class::Own => {
                        if e.tag != *tag {
                            e.tag = *tag;
                            table.insert(score.0, &encode_entry(&e)[..])?;
                            changed = true;
                        }
                        out.push(true);
                    }
                    _ => out.push(false),
                }
            }
        }
        if changed {
            self.commit(txn, true)?;
        } else {
            txn.abort()?;
        }
        Ok(out)
    }

    /// What the tags were written against: a number the layer above chose
    /// ([`LocalStore::reset_tags`]), 0 if none.
    pub fn tag_epoch(&self) -> Result<u64, Error> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(META)?.get("tags")?.map_or(0, |v| v.value()))
    }

    /// Clears every tag and records `epoch` as what the tags are written
    /// against from now on, in one durable commit: tags meant for a layer
    /// above that is gone (its state lost or replaced) must not be read by
    /// the next. Returns how many tags were cleared.
    pub fn reset_tags(&self, epoch: u64) -> Result<u64, Error> {
        let _stats = self.lock();
        let txn = self.db.begin_write()?;
        let mut cleared = 0;
        {
            let mut table = txn.open_table(BLOCKS)?;
            let mut tagged = Vec::new();
            for item in table.iter()? {
                let (k, v) = item?;
                let e = decode_entry(v.value())?;
                if e.tag != 0 {
                    tagged.push((k.value(), e));
                }
            }
            for (k, mut e) in tagged {
                e.tag = 0;
                table.insert(k, &encode_entry(&e)[..])?;
                cleared += 1;
            }
            txn.open_table(META)?.insert("tags", epoch)?;
        }
        self.commit(txn, true)?;
        Ok(cleared)
    }

    /// Re-reads every block and checks it against its score; also finds missing and stray files.
    ///
    /// Safe while the store is in use: the index and the files are listed
    /// together under the lock every change takes (a block linked or deleted
    /// between the two would look stray or missing), and a block that goes
    /// while it is being checked is not counted missing.
    pub fn scrub(&self) -> Result<ScrubReport, Error> {
        let mut report = ScrubReport::default();
        let (indexed, files) = {
            let _still = self.lock();
            (self.indexed()?, self.files()?)
        };
        for score in &indexed {
            match fs::read(self.path_of(score)) {
                Ok(data) => {
                    report.checked += 1;
                    if check(score, &data).is_err() {
                        report.corrupt.push(*score);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if self.entry(score)?.is_some() {
                        report.missing.push(*score);
                    }
                }
                Err(e) => return Err(Error::io(&self.path_of(score), e)),
            }
        }
        for (score, path) in files {
            if !score.is_some_and(|s| indexed.contains(&s)) {
                report.orphans.push(path);
            }
        }
        Ok(report)
    }

    /// As [`LocalStore::restore`] for a block the volume does not index yet,
    /// but durable only after the next durable commit or
    /// [`BlockStore::sync`] (many blocks fetched then made durable at once);
    /// a block the index already names is restored durably. The bytes are
    /// not hashed or copied again: the caller has checked them against
    /// `score`, as the network client checks every block it receives.
    pub fn restore_checked_lazily(
        &self,
        score: &Score,
        data: Bytes,
        class: Class,
    ) -> Result<(), Error> {
        if self.entry(score)?.is_none() {
            return self.put_batch_unsynced(&[(*score, data)], class);
        }
        self.restore(score, &data, class)
    }

    /// From now on, a block put without waiting for the disk has its
    /// writeback started at once rather than when the kernel gets to it,
    /// so the disk works while more are fetched and the sync that makes
    /// them durable finds little left to write (a recovery's bulk fetch).
    pub fn start_writeback_early(&self) {
        self.early_writeback.store(true, Ordering::Relaxed);
    }

    /// Writes `data` back as the block `score` after its file was lost or
    /// damaged, keeping the class the index gives it (or storing it as
    /// `class` if the index has no entry); the bytes are checked against the
    /// score first, so a wrong copy never replaces anything. Durable on return.
    pub fn restore(&self, score: &Score, data: &[u8], class: Class) -> Result<(), Error> {
        check(score, data)?;
        if self.entry(score)?.is_none() {
            return self.put(*score, Bytes::copy_from_slice(data), class);
        }
        let (tmp, file) = self.write_tmp(data, false)?;
        let dest = self.path_of(score);
        let linked = file
            .sync_all()
            .and_then(|()| fs::rename(&tmp, &dest))
            .and_then(|()| match dest.parent() {
                Some(dir) => fs::File::open(dir).and_then(|d| d.sync_all()),
                None => Ok(()),
            });
        if let Err(e) = linked {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&dest, e));
        }
        self.leaves.remove(score);
        Ok(())
    }

    /// Every score in the index.
    pub fn indexed(&self) -> Result<BTreeSet<Score>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut out = BTreeSet::new();
        for item in table.iter()? {
            out.insert(Score(item?.0.value()));
        }
        Ok(out)
    }

    /// The on-disk path of a block's file.
    pub fn path_of(&self, score: &Score) -> PathBuf {
        let hex = score.to_hex();
        self.dir.join("blocks").join(&hex[..2]).join(hex)
    }

    fn lock(&self) -> MutexGuard<'_, Stats> {
        self.mutate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, score: &Score) -> Result<Option<Entry>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        match table.get(score.0)? {
            Some(v) => Ok(Some(decode_entry(v.value())?)),
            None => Ok(None),
        }
    }

    /// Writes `data` to a new file in `tmp/` and returns it, not yet fsynced;
    /// `direct` asks for a write past the page cache (see [`direct_io`]),
    /// which falls back to a buffered one on a filesystem that refuses it.
    fn write_tmp(&self, data: &[u8], direct: bool) -> Result<(PathBuf, fs::File), Error> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}-{n}", std::process::id()));
        let buffered = || fs::File::create(&path).and_then(|mut f| f.write_all(data).map(|()| f));
        let direct = direct && self.direct_ok.load(Ordering::Relaxed);
        let result = match direct.then(|| direct_io::write_file(&path, data)) {
            None => buffered(),
            Some(Err(e)) if direct_io::refused(&e) => {
                tracing::debug!(dir = %self.dir.display(), "the volume's filesystem refuses direct writes; writing through the page cache");
                self.direct_ok.store(false, Ordering::Relaxed);
                buffered()
            }
            Some(written) => written,
        };
        match result {
            Ok(file) => Ok((path, file)),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(Error::io(&path, e))
            }
        }
    }

    fn remove_file(&self, score: &Score) -> Result<(), Error> {
        let path = self.path_of(score);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    fn clear_tmp(&self) -> Result<(), Error> {
        let tmp = self.dir.join("tmp");
        for item in fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
            let path = item.map_err(|e| Error::io(&tmp, e))?.path();
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Every file under `blocks/`, with its score when the name is one.
    fn files(&self) -> Result<Vec<(Option<Score>, PathBuf)>, Error> {
        let root = self.dir.join("blocks");
        let mut out = Vec::new();
        for shard in fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
            let shard = shard.map_err(|e| Error::io(&root, e))?.path();
            if !shard.is_dir() {
                out.push((None, shard));
                continue;
            }
            for f in fs::read_dir(&shard).map_err(|e| Error::io(&shard, e))? {
                let path = f.map_err(|e| Error::io(&shard, e))?.path();
                let score = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| Score::from_hex(n).ok());
                out.push((score, path));
            }
        }
        Ok(out)
    }

    fn remove_orphans(&self) -> Result<u64, Error> {
        let indexed = self.indexed()?;
        let mut removed = 0;
        for (score, path) in self.files()? {
            if !score.is_some_and(|s| indexed.contains(&s)) {
                fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Counts blocks per class and finds the highest sequence number in use.
    fn count(&self) -> Result<(StoreStats, u64), Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOCKS)?;
        let mut stats = StoreStats::default();
        let mut max_seq = 0;
        for item in table.iter()? {
            let e = decode_entry(item?.1.value())?;
            stats.add(e.class(), e.size, 1);
            max_seq = max_seq.max(e.seq);
        }
        Ok((stats, max_seq))
    }

    /// Evicts the least used cached blocks until they fit in 90% of the cache capacity.
    fn evict(&self, stats: &mut Stats) -> Result<(), Error> {
        if stats.0.cached_bytes <= self.options.cache_capacity {
            return Ok(());
        }
        let target = self.options.cache_capacity / 10 * 9;
        let txn = self.db.begin_write()?;
        self.in_use(&txn)?;
        let mut gone = Vec::new();
        {
            let mut table = txn.open_table(BLOCKS)?;
            let mut cached = Vec::new();
            for item in table.iter()? {
                let (k, v) = item?;
                let e = decode_entry(v.value())?;
                if e.class() == Class::Cached {
                    cached.push((e.hits, e.last_use, Score(k.value()), e.size));
                }
            }
            cached.sort();
            for (_, _, score, size) in cached {
                if stats.0.cached_bytes <= target {
                    break;
                }
                table.remove(score.0)?;
                stats.0.add(Class::Cached, size, -1);
                gone.push(score);
            }
        }
        self.commit(txn, true)?;
        for score in &gone {
            self.remove_file(score)?;
        }
        Ok(())
    }

    /// Commits the index. A durable commit first fsyncs every block file put
    /// without sync, so the index never durably names a block whose bytes
    /// might not be on disk; a lazy one is atomic but may be lost in a crash.
    fn commit(&self, txn: redb::WriteTransaction, durable: bool) -> Result<(), Error> {
        let mut txn = txn;
        if durable {
            self.sync_pending()?;
        } else {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| Error::Index(e.to_string()))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Fsyncs the files and directories that lazy puts left unsynced, on
    /// several threads: fsyncs that overlap share the filesystem's journal
    /// commits, where one after another each waits for its own.
    fn sync_pending(&self) -> Result<(), Error> {
        let pending = std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(|p| p.into_inner()));
        let paths: Vec<&PathBuf> = pending.iter().collect();
        let sync_one = |path: &PathBuf| match fs::File::open(path) {
            Ok(f) => f.sync_all().map_err(|e| Error::io(path, e)),
            // Deleted since: nothing to make durable.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        };
        let result = if paths.len() < 2 * SYNC_THREADS {
            paths.iter().try_for_each(|p| sync_one(p))
        } else {
            std::thread::scope(|scope| {
                let workers: Vec<_> = paths
                    .chunks(paths.len().div_ceil(SYNC_THREADS))
                    .map(|chunk| scope.spawn(move || chunk.iter().try_for_each(|p| sync_one(p))))
                    .collect();
                // Every worker is joined before the first error is returned.
                let results: Vec<Result<(), Error>> = workers
                    .into_iter()
                    .map(|w| {
                        w.join().unwrap_or_else(|_| {
                            Err(Error::Index("a thread syncing block files panicked".into()))
                        })
                    })
                    .collect();
                results.into_iter().collect::<Result<(), Error>>()
            })
        };
        if result.is_err() {
            // Keep them pending, so the next sync tries again.
            self.unsynced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pending);
        }
        result
    }

    /// Called in every transaction that changes the volume: after a clean
    /// shutdown, the first change marks the volume in use again.
    fn in_use(&self, txn: &redb::WriteTransaction) -> Result<(), Error> {
        if self.marked_clean.swap(false, Ordering::SeqCst) {
            txn.open_table(META)?.insert("clean", 0)?;
        }
        Ok(())
    }

    /// Writes hits recorded since the last commit into `table`.
    fn flush_hits(&self, table: &mut redb::Table<'_, [u8; 32], &[u8]>) -> Result<(), Error> {
        let hits = std::mem::take(&mut *self.hits.lock().unwrap_or_else(|p| p.into_inner()));
        let now = now();
        for (score, n) in hits {
            let existing = table
                .get(score.0)?
                .map(|v| decode_entry(v.value()))
                .transpose()?;
            if let Some(mut e) = existing {
                e.hits = e.hits.saturating_add(n);
                e.last_use = now;
                table.insert(score.0, &encode_entry(&e)[..])?;
            }
        }
        Ok(())
    }

    /// Marks the volume cleanly closed, so the next open skips the crash repair scan.
    pub fn close(self) -> Result<(), Error> {
        self.shutdown()
    }

    /// As [`LocalStore::close`] for a store still shared: writes buffered hits
    /// and marks the volume clean. Any later put marks it in use again.
    pub fn shutdown(&self) -> Result<(), Error> {
        let _guard = self.lock();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(BLOCKS)?;
            self.flush_hits(&mut table)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("seq", self.seq.load(Ordering::SeqCst))?;
            meta.insert("clean", 1)?;
        }
        self.commit(txn, true)?;
        self.marked_clean.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "could not mark the block volume clean");
        }
    }
}

/// A block on its way into a [`LocalStore`]: written to a file of its own in
/// `tmp/` (unless the store had it already), to be linked in by
/// [`LocalStore::put_staged`]. A staged file that never joins is removed.
///
/// Staging apart from the commit lets a caller write blocks from several
/// threads at once and commit them together: a holder's puts each write
/// their block as it arrives, and a group of them is committed in one go.
pub struct Staged {
    score: Score,
    /// `None` for a block the store had when it was staged.
    file: Option<StagedFile>,
}

struct StagedFile {
    tmp: PathBuf,
    size: u64,
    /// Open until synced; `None` once synced or when not to be synced.
    open: Option<fs::File>,
}

impl Staged {
    /// The block's score.
    pub fn score(&self) -> &Score {
        &self.score
    }

    /// Makes the staged file's data durable (metadata included: it has to
    /// be found after a crash once linked in).
    pub fn sync(&mut self) -> Result<(), Error> {
        if let Some(staged) = &mut self.file
            && let Some(file) = staged.open.take()
        {
            file.sync_data().map_err(|e| Error::io(&staged.tmp, e))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(staged) = self.file.take() {
            let _ = fs::remove_file(staged.tmp);
        }
    }
}

impl LocalStore {
    /// Writes `data`, the block `score`, to a temporary file unless the store
    /// has it; with `durable`, a later [`Staged::sync`] or
    /// [`LocalStore::put_staged`] makes it durable.
    pub fn stage(
        &self,
        score: &Score,
        data: &[u8],
        class: Class,
        durable: bool,
    ) -> Result<Staged, Error> {
        if self.entry(score)?.is_some() {
            return Ok(Staged {
                score: *score,
                file: None,
            });
        }
        // Held blocks are other peers' data, rarely read back here: they
        // go to disk past the page cache rather than through it.
        let direct = durable && class == Class::Held;
        let (tmp, file) = self.write_tmp(data, direct)?;
        if !durable && self.early_writeback.load(Ordering::Relaxed) {
            start_writeback(&file);
        }
        Ok(Staged {
            score: *score,
            file: Some(StagedFile {
                tmp,
                size: data.len() as u64,
                open: durable.then_some(file),
            }),
        })
    }

    /// Stages the blocks of a batch (see [`LocalStore::stage`]).
    ///
    /// Every file is written before any is fsynced: on a journaling
    /// filesystem the first fsync then commits all their creations at once,
    /// where write-then-fsync per file waits for one commit each. Files are
    /// synced every `SYNC_GROUP` to bound how many are open.
    fn stage_batch(
        &self,
        blocks: &[(Score, Bytes)],
        class: Class,
        durable: bool,
    ) -> Result<Vec<Staged>, Error> {
        const SYNC_GROUP: usize = 256;
        let mut staged: Vec<Staged> = Vec::with_capacity(blocks.len());
        let mut seen = HashSet::new();
        for (score, data) in blocks {
            if !seen.insert(*score) {
                continue;
            }
            staged.push(self.stage(score, data, class, durable)?);
            if durable && staged.len().is_multiple_of(SYNC_GROUP) {
                let from = staged.len() - SYNC_GROUP;
                staged[from..].iter_mut().try_for_each(Staged::sync)?;
            }
        }
        Ok(staged)
    }

    /// Stores blocks; with `durable` they are on disk on return, otherwise
    /// after the next durable commit or [`BlockStore::sync`].
    fn store_batch(
        &self,
        blocks: &[(Score, Bytes)],
        class: Class,
        durable: bool,
    ) -> Result<(), Error> {
        let staged = self.stage_batch(blocks, class, durable)?;
        self.put_staged(staged, class, durable)
    }

    /// Links staged blocks into the store as `class` in one commit (a block
    /// stored meanwhile keeps its copy, its class raised to `class` if
    /// lower); with `durable` they are on disk on return, otherwise after
    /// the next durable commit or [`BlockStore::sync`].
    pub fn put_staged(
        &self,
        staged: Vec<Staged>,
        class: Class,
        durable: bool,
    ) -> Result<(), Error> {
        self.put_staged_with(staged, class, durable, |_| Ok(()))
    }

    /// As [`LocalStore::put_staged`], and runs `also` in the same write
    /// transaction of the index, so that what it records there (in tables of
    /// its own, see [`LocalStore::index`]) commits with the blocks, or not at all.
    pub fn put_staged_with(
        &self,
        mut staged: Vec<Staged>,
        class: Class,
        durable: bool,
        also: impl FnOnce(&redb::WriteTransaction) -> Result<(), Error>,
    ) -> Result<(), Error> {
        // The slow part, fsyncing data, happens outside the lock.
        if durable {
            staged.iter_mut().try_for_each(Staged::sync)?;
        }
        let mut stats = self.lock();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let now = now();
        let txn = self.db.begin_write()?;
        self.in_use(&txn)?;
        let mut dirs = BTreeSet::new();
        // Counter changes, applied only once the commit has succeeded.
        let mut changes: Vec<(Class, u64, i64)> = Vec::new();
        {
            let mut table = txn.open_table(BLOCKS)?;
            self.flush_hits(&mut table)?;
            for block in &mut staged {
                let score = &block.score;
                let existing = table
                    .get(score.0)?
                    .map(|v| decode_entry(v.value()))
                    .transpose()?;
                match existing {
                    Some(mut e) => {
                        // Already stored (maybe by a racing put): raise its class and
                        // refresh its sequence so a running GC sweep spares it.
                        let old = e.class();
                        if class > old {
                            changes.push((old, e.size, -1));
                            changes.push((class, e.size, 1));
                            e.class = class as u8;
                        }
                        e.seq = seq;
                        e.last_use = now;
                        table.insert(score.0, &encode_entry(&e)[..])?;
                    }
                    None => {
                        let Some(StagedFile { tmp, size, .. }) = &block.file else {
                            // Gone since it was staged (a racing delete): nothing to link.
                            continue;
                        };
                        let (size, dest) = (*size, self.path_of(score));
                        dirs.insert(dest.parent().map(Path::to_path_buf).unwrap_or_default());
                        fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
                        // Linked: no longer the staged file's to remove.
                        block.file = None;
                        if !durable {
                            self.unsynced
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(dest.clone());
                        }
                        let e = Entry {
                            class: class as u8,
                            size,
                            hits: 0,
                            last_use: now,
                            seq,
                            tag: 0,
                        };
                        table.insert(score.0, &encode_entry(&e)[..])?;
                        changes.push((class, size, 1));
                    }
                }
            }
            if durable {
                for dir in &dirs {
                    fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| Error::io(dir, e))?;
                }
            } else {
                self.unsynced
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(dirs);
            }
        }
        also(&txn)?;
        self.commit(txn, durable)?;
        for (c, size, sign) in changes {
            stats.0.add(c, size, sign);
        }
        self.evict(&mut stats)
    }
}

impl LocalStore {
    /// Runs `read` on the block's file, naming what can go wrong: a missing
    /// file is an unknown block, a short one a corrupt block.
    fn read_block_file<T>(
        &self,
        score: &Score,
        read: impl FnOnce(fs::File) -> std::io::Result<T>,
    ) -> Result<T, Error> {
        let path = self.path_of(score);
        fs::File::open(&path)
            .and_then(read)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound(*score),
                std::io::ErrorKind::UnexpectedEof => Error::Corrupt {
                    score: *score,
                    reason: "block file is shorter than the block".into(),
                },
                _ => Error::io(&path, e),
            })
    }
}

impl BlockStore for LocalStore {
    fn put_batch(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        self.store_batch(blocks, class, true)
    }

    fn put_batch_unsynced(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        self.store_batch(blocks, class, false)
    }

    fn sync(&self) -> Result<(), Error> {
        let _stats = self.lock();
        let txn = self.db.begin_write()?;
        self.commit(txn, true)
    }

    fn get(&self, score: &Score) -> Result<Bytes, Error> {
        let data = self.get_to_open(score)?;
        check(score, &data)?;
        Ok(data)
    }

    fn get_to_open(&self, score: &Score) -> Result<Bytes, Error> {
        let data = self.read_block_file(score, |mut f| {
            use std::io::Read;
            let len = f.metadata()?.len() as usize;
            if len > MAX_BLOCK_LEN {
                return Err(std::io::Error::other(
                    "block file is over the largest block",
                ));
            }
            let mut buf = crate::buf::take(len);
            f.read_to_end(&mut buf)?;
            Ok(buf)
        })?;
        self.touch(score);
        Ok(crate::buf::share(data))
    }

    fn get_range(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        let Some(leaves) = self.leaves.get(score) else {
            // First partial read of this block: check it whole, keep its leaves.
            let block = self.get(score)?;
            check_range(score, &range, block.len())?;
            let leaves = Leaves {
                len: block.len(),
                hashes: score::leaf_hashes(&block),
            };
            self.leaves.insert(*score, Arc::new(leaves));
            return Ok(block.slice(range));
        };
        let len = leaves.len;
        check_range(score, &range, len)?;
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        // Read whole segments, so each can be checked against its leaf hash.
        let first = range.start / SEGMENT_SIZE;
        let last = (range.end - 1) / SEGMENT_SIZE;
        let (start, end) = (first * SEGMENT_SIZE, ((last + 1) * SEGMENT_SIZE).min(len));
        let mut buf = vec![0u8; end - start];
        self.read_block_file(score, |f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut buf, start as u64)
        })?;
        for (i, seg) in buf.chunks(SEGMENT_SIZE).enumerate() {
            if score::leaf_hash(seg) != leaves.hashes[first + i] {
                return Err(Error::Corrupt {
                    score: *score,
                    reason: format!("segment {} does not match the score", first + i),
                });
            }
        }
        self.touch(score);
        Ok(Bytes::from(buf).slice(range.start - start..range.end - start))
    }

    fn get_range_to_open(&self, score: &Score, range: Range<usize>) -> Result<Bytes, Error> {
        if range.start > range.end || range.end > MAX_BLOCK_LEN {
            return Err(Error::Format(format!(
                "range {range:?} is outside block {score}"
            )));
        }
        let mut buf = vec![0u8; range.len()];
        self.read_block_file(score, |f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut buf, range.start as u64)
        })?;
        self.touch(score);
        Ok(Bytes::from(buf))
    }

    fn has(&self, score: &Score) -> Result<bool, Error> {
        Ok(self.entry(score)?.is_some())
    }

    fn delete(&self, score: &Score) -> Result<bool, Error> {
        let mut stats = self.lock();
        let txn = self.db.begin_write()?;
        self.in_use(&txn)?;
        let removed = {
            let mut table = txn.open_table(BLOCKS)?;

            table
                .remove(score.0)?
                .map(|v| decode_entry(v.value()))
                .transpose()?
        };
        self.commit(txn, true)?;
        match removed {
            Some(e) => {
                stats.0.add(e.class(), e.size, -1);
                self.remove_file(score)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    // Encoding a plain struct into a Vec cannot fail.
    postcard::to_allocvec(e).unwrap_or_default()
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, Error> {
    // An entry without a tag is one varint short of a tagged one, so it
    // never reads as tagged; a tagged one is tried first.
    let e: Entry = match postcard::from_bytes(bytes) {
        Ok(e) => e,
        Err(_) => postcard::from_bytes::<EntryWithoutTag>(bytes)
            .map(|e| Entry {
                class: e.class,
                size: e.size,
                hits: e.hits,
                last_use: e.last_use,
                seq: e.seq,
                tag: 0,
            })
            .map_err(|e| Error::Index(format!("damaged index entry: {e}")))?,
    };
    if Class::from_u8(e.class).is_none() {
        return Err(Error::Index(format!(
            "index entry has unknown class {}",
            e.class
        )));
    }
    Ok(e)
}

/// Asks the kernel to start writing `file`'s dirty pages now, without
/// waiting for them; a hint, so a failure is only logged (the later fsync
/// reports any real error).
fn start_writeback(file: &fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `file` keeps open.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range refused; writeback left to the kernel");
    }
}

/// Writes past the page cache (`O_DIRECT`).
///
/// A held block is written once, fsynced at once and seldom read again on
/// this machine: copying it into the page cache first only costs CPU and
/// pushes the owner's own files out of memory. Direct I/O needs the buffer,
/// length and offset aligned to the device's sector, so the block is copied
/// into an aligned buffer padded to [`ALIGN`] and the file then cut to the
/// block's length. Filesystems without direct I/O answer `EINVAL`, and the
/// store then writes through the page cache.
mod direct_io {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::sync::Mutex;

    /// Alignment for buffer, length and offset: a page covers any sector size in use.
    pub const ALIGN: usize = 4096;
    /// A block is copied into an aligned buffer and written this much at a time.
    const CHUNK: usize = 1 << 20;
    /// Aligned buffers kept for the writes that follow: about as many as
    /// holders write at once, so that each write finds one already in memory.
    const KEPT: usize = 8;

    static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// True for the answers of a filesystem that does not do direct I/O.
    pub fn refused(e: &std::io::Error) -> bool {
        e.raw_os_error() == Some(libc::EINVAL)
    }

    /// Creates `path` holding exactly `data`; the caller fsyncs it.
    pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<fs::File> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let taken = BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = taken.unwrap_or_else(|| vec![0; CHUNK + ALIGN]);
        // The first ALIGN-aligned byte of the buffer: a Vec<u8> has no alignment to ask for.
        let start = buf.as_ptr().align_offset(ALIGN);
        let written = if start < ALIGN {
            // Every piece but the last is a whole CHUNK, so each starts aligned
            // in the file; the last is padded with zeros and cut off below.
            data.chunks(CHUNK).try_for_each(|piece| {
                let padded = piece.len().div_ceil(ALIGN) * ALIGN;
                let aligned = &mut buf[start..start + padded];
                aligned[..piece.len()].copy_from_slice(piece);
                aligned[piece.len()..].fill(0);
                file.write_all(aligned)
            })
        } else {
            Err(std::io::Error::from_raw_os_error(libc::EINVAL))
        };
        {
            let mut kept = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() < KEPT {
                kept.push(buf);
            }
        }
        written?;
        if !data.len().is_multiple_of(ALIGN) {
            file.set_len(data.len() as u64)?;
        }
        Ok(file)
    }
}
