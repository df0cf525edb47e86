//! Live metadata in redb: inodes and directory entries, every value encrypted.
//!
//! Names never reach the disk in plaintext: a directory entry is keyed by
//! (parent inode, cookie) where the cookie is a keyed hash of the name, and
//! its value (name, inode, kind) is sealed with the metadata key. Values are
//! bound to their row (the table and key are the AEAD's associated data), so
//! records cannot be swapped on disk without detection.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use fincrypt_blockstore::{FileRef, Keys, Pointer};
use rand::RngCore;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{FsError, errno};

/// Bytes of metadata pages redb may cache.
const META_CACHE: usize = 32 << 20;
const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
const DIRENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dirents");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
/// Roots written to be published between snapshots ("heads"), by time key
/// like `snapshots`; not listed in `.snapshots/`.
const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("heads");
/// Each (inode, directory) pair a name links, with how many names do.
const PARENTS: TableDefinition<(u64, u64), u32> = TableDefinition::new("parents");
/// Inodes changed since a consumer last took them, with the stamp of the
/// change (a counter, so a later change never reuses a stamp).
const CHANGED: TableDefinition<u64, u64> = TableDefinition::new("changed");

/// Version of the metadata database (docs/FORMATS.md, "Filesystem metadata").
pub const META_VERSION: u64 = 1;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;
/// Directory cookies below this are taken by "." and "..".
pub const FIRST_COOKIE: u64 = 3;

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    /// The current time.
    pub fn now() -> Time {
        Time::from(std::time::SystemTime::now())
    }

    /// As a `SystemTime`.
    pub fn system(self) -> std::time::SystemTime {
        use std::time::{Duration, UNIX_EPOCH};
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nanos)
        } else {
            UNIX_EPOCH - Duration::new(self.secs.unsigned_abs(), 0) + Duration::new(0, self.nanos)
        }
    }
}

impl From<std::time::SystemTime> for Time {
    fn from(t: std::time::SystemTime) -> Time {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Time {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (mut secs, mut nanos) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nanos > 0 {
                    secs -= 1;
                    nanos = 1_000_000_000 - nanos;
                }
                Time { secs, nanos }
            }
        }
    }
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// One file, directory or other node, as stored (encrypted) in the metadata.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits with set-uid, set-gid and sticky (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Bytes of a file; the target length of a symlink; entries of a directory.
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub rdev: u32,
    /// A file's committed content.
    pub content: FileRef,
    /// A symlink's target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Copies this directory (or file) asks peers to keep; None inherits.
    pub redundancy: Option<u8>,
}

impl Inode {
    /// A fresh inode of `kind` owned by `uid`:`gid`, all times now.
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Inode {
        let now = Time::now();
        Inode {
            kind,
            perm,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            content: FileRef::Inline(Vec::new()),
            target: Vec::new(),
            xattrs: BTreeMap::new(),
            redundancy: None,
        }
    }
}

/// A directory entry, as stored (encrypted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// A retained snapshot: its root block and when it was taken.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub time: Time,
    pub root: Pointer,
}

/// The metadata database and the keys that seal its values.
pub struct Meta {
    db: Database,
    cipher: Aes256GcmSiv,
    name_key: [u8; 32],
    /// Write transactions committed since open: changes when anything does.
    generation: std::sync::atomic::AtomicU64,
    /// Commits that changed an inode or a name (not snapshots, heads or
    /// the engine's bookkeeping).
    tree_generation: std::sync::atomic::AtomicU64,
}

impl Meta {
    /// Opens (or creates, with an empty root directory) the database at `path`.
    pub fn open(path: &Path, keys: &Keys, root_uid: u32, root_gid: u32) -> Result<Meta, FsError> {
        // redb caches up to 1 GiB by default; the daemon's memory is bounded.
        let mut db = redb::Builder::new()
            .set_cache_size(META_CACHE)
            .create(path)?;
        // redb's copy-on-write pages leave the file larger than what it
        // holds (a third larger after a first backup of 14,000 files);
        // compacting once per open takes it back, in milliseconds.
        if let Err(e) = db.compact() {
            tracing::warn!(path = %path.display(), error = %e, "the metadata could not be compacted");
        }
        let cipher = Aes256GcmSiv::new_from_slice(&keys.metadata)
            .map_err(|_| FsError::Meta("bad key".into()))?;
        let name_key = blake3::derive_key("fincrypt fs name cookies v1", &keys.metadata);
        let meta = Meta {
            db,
            cipher,
            name_key,
            generation: std::sync::atomic::AtomicU64::new(0),
            tree_generation: std::sync::atomic::AtomicU64::new(0),
        };
        let mut txn = meta.write()?;
        // Read transactions cannot open a table that was never created.
        txn.txn.open_table(INODES)?;
        txn.txn.open_table(DIRENTS)?;
        txn.txn.open_table(ORPHANS)?;
        txn.txn.open_table(SNAPSHOTS)?;
        txn.txn.open_table(HEADS)?;
        txn.txn.open_table(PARENTS)?;
        txn.txn.open_table(CHANGED)?;
        let version = txn.counter("version")?;
        match version {
            0 => {
                txn.set_counter("version", META_VERSION)?;
                txn.set_counter("next_ino", ROOT_INO + 1)?;
                let mut root = Inode::new(Kind::Dir, 0o755, root_uid, root_gid);
                root.nlink = 2;
                txn.put_inode(ROOT_INO, &root)?;
            }
            META_VERSION => {}
            v => {
                return Err(FsError::Meta(format!(
                    "metadata version {v} is not supported"
                )));
            }
        }
        if txn.counter("parents")? == 0 {
            // Written before the parents table existed (or new): index every name once.
            txn.index_parents()?;
            txn.set_counter("parents", 1)?;
        }
        txn.commit(true)?;
        Ok(meta)
    }

    /// The directories that hold a name of `ino` (none for the root and for
    /// an inode unlinked while open).
    pub fn parents(&self, ino: u64) -> Result<Vec<u64>, FsError> {
        let txn = self.db.begin_read()?;
        parents_in(&txn.open_table(PARENTS)?, ino)
    }

    /// Up to `limit` inodes changed (content, attributes or a new name)
    /// since they were last [taken](Meta::take_changed), with their stamps.
    pub fn changed(&self, limit: usize) -> Result<Vec<(u64, u64)>, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHANGED)?;
        let mut out = Vec::new();
        for item in t.iter()?.take(limit) {
            let (k, v) = item?;
            out.push((k.value(), v.value()));
        }
        Ok(out)
    }

    /// Forgets the changes in `seen` that are still as they were read (an
    /// inode changed again since keeps its newer stamp).
    pub fn take_changed(&self, seen: &[(u64, u64)]) -> Result<(), FsError> {
        if seen.is_empty() {
            return Ok(());
        }
        let txn = self.write()?;
        {
            let mut t = txn.txn.open_table(CHANGED)?;
            for (ino, stamp) in seen {
                if t.get(*ino)?.map(|v| v.value()) == Some(*stamp) {
                    t.remove(*ino)?;
                }
            }
        }
        txn.commit(false)
    }

    /// A counter that moves whenever a redundancy setting changes.
    pub fn redundancy_changes(&self) -> Result<u64, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(COUNTERS)?;
        Ok(t.get("redundancy_changes")?.map(|v| v.value()).unwrap_or(0))
    }

    /// A write transaction; one at a time, in the order asked.
    pub fn write(&self) -> Result<WriteTxn<'_>, FsError> {
        Ok(WriteTxn {
            txn: self.db.begin_write()?,
            meta: self,
            stamp: None,
            touched: false,
            unfed: false,
        })
    }

    /// Write transactions committed since open: equal values mean nothing
    /// changed in between (the durability engine skips work on it).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Commits since open that changed an inode or a name: equal values
    /// mean the tree is as it was (roots, heads and the engine's
    /// bookkeeping do not count).
    pub fn tree_generation(&self) -> u64 {
        self.tree_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// A consistent read-only view of the whole metadata at this moment.
    pub fn view(&self) -> Result<View<'_>, FsError> {
        Ok(View {
            txn: self.db.begin_read()?,
            meta: self,
        })
    }

    /// Reads one inode.
    pub fn inode(&self, ino: u64) -> Result<Inode, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INODES)?;
        match t.get(ino)? {
            Some(v) => self.open_value(b"i", &ino.to_le_bytes(), v.value()),
            None => errno(libc::ENOENT),
        }
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DIRENTS)?;
        self.find(&t, parent, name)
    }

    /// Up to `limit` entries of `parent` with cookies from `from`, with their cookies.
    pub fn list(
        &self,
        parent: u64,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Dirent)>, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DIRENTS)?;
        let mut out = Vec::new();
        for item in t.range((parent, from.max(FIRST_COOKIE))..=(parent, u64::MAX))? {
            let (k, v) = item?;
            let (_, cookie) = k.value();
            out.push((
                cookie,
                self.open_value(b"d", &key_bytes(parent, cookie), v.value())?,
            ));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Inodes unlinked while still open when the last session ended.
    pub fn orphans(&self) -> Result<Vec<u64>, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ORPHANS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            out.push(item?.0.value());
        }
        Ok(out)
    }

    /// Retained snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, FsError> {
        self.records(SNAPSHOTS, b"s")
    }

    /// Roots written between snapshots to be published, oldest first (kept
    /// until a newer root is published).
    pub fn heads(&self) -> Result<Vec<SnapshotRecord>, FsError> {
        self.records(HEADS, b"h")
    }

    /// Every root kept: the retained snapshots and the heads, oldest first.
    pub fn roots(&self) -> Result<Vec<SnapshotRecord>, FsError> {
        let mut all = self.snapshots()?;
        all.extend(self.heads()?);
        all.sort_by_key(|r| r.time);
        Ok(all)
    }

    fn records(
        &self,
        table: TableDefinition<u64, &[u8]>,
        tag: &[u8],
    ) -> Result<Vec<SnapshotRecord>, FsError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push(self.open_value(tag, &k.value().to_le_bytes(), v.value())?);
        }
        Ok(out)
    }

    fn find(
        &self,
        t: &impl ReadableTable<(u64, u64), &'static [u8]>,
        parent: u64,
        name: &[u8],
    ) -> Result<Option<Dirent>, FsError> {
        let cookie = self.cookie(parent, name);
        match t.get((parent, cookie))? {
            Some(v) => {
                let d: Dirent = self.open_value(b"d", &key_bytes(parent, cookie), v.value())?;
                Ok((d.name == name).then_some(d))
            }
            None => Ok(None),
        }
    }

    /// The cookie of `name` in `parent`: ordered, stable, and never below [`FIRST_COOKIE`].
    fn cookie(&self, parent: u64, name: &[u8]) -> u64 {
        let mut h = blake3::Hasher::new_keyed(&self.name_key);
        h.update(&parent.to_le_bytes());
        h.update(name);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.finalize().as_bytes()[..8]);
        (u64::from_le_bytes(b) >> 2) + FIRST_COOKIE
    }

    fn seal_value<T: Serialize>(
        &self,
        table: &[u8],
        key: &[u8],
        value: &T,
    ) -> Result<Vec<u8>, FsError> {
        let plain = postcard::to_allocvec(value)?;
        let mut nonce = [0u8; 12];
        // A CSPRNG seeded from the OS, without a system call per value.
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = [table, key].concat();
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| FsError::Meta("encryption failed".into()))?;
        Ok([&nonce[..], &ct].concat())
    }

    fn open_value<T: DeserializeOwned>(
        &self,
        table: &[u8],
        key: &[u8],
        sealed: &[u8],
    ) -> Result<T, FsError> {
        if sealed.len() < 12 {
            return Err(FsError::Meta("metadata record too short".into()));
        }
        let (nonce, ct) = sealed.split_at(12);
        let nonce: [u8; 12] = nonce
            .try_into()
            .map_err(|_| FsError::Meta("bad nonce".into()))?;
        let aad = [table, key].concat();
        let plain = self
            .cipher
            .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| {
                FsError::Meta("metadata record does not decrypt (damaged or wrong key)".into())
            })?;
        Ok(postcard::from_bytes(&plain)?)
    }
}

/// A read transaction: every read sees the same moment.
pub struct View<'a> {
    txn: redb::ReadTransaction,
    meta: &'a Meta,
}

impl View<'_> {
    /// Reads one inode.
    pub fn inode(&self, ino: u64) -> Result<Inode, FsError> {
        let t = self.txn.open_table(INODES)?;
        match t.get(ino)? {
            Some(v) => self.meta.open_value(b"i", &ino.to_le_bytes(), v.value()),
            None => errno(libc::ENOENT),
        }
    }

    /// Every entry of directory `parent`.
    pub fn entries(&self, parent: u64) -> Result<Vec<Dirent>, FsError> {
        let t = self.txn.open_table(DIRENTS)?;
        let mut out = Vec::new();
        for item in t.range((parent, FIRST_COOKIE)..=(parent, u64::MAX))? {
            let (k, v) = item?;
            out.push(
                self.meta
                    .open_value(b"d", &key_bytes(parent, k.value().1), v.value())?,
            );
        }
        Ok(out)
    }

    /// The directories that hold a name of `ino`.
    pub fn parents(&self, ino: u64) -> Result<Vec<u64>, FsError> {
        parents_in(&self.txn.open_table(PARENTS)?, ino)
    }

    /// Every inode's number, in order.
    pub fn inode_numbers(&self) -> Result<Vec<u64>, FsError> {
        let t = self.txn.open_table(INODES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            out.push(item?.0.value());
        }
        Ok(out)
    }
}

fn parents_in(t: &impl ReadableTable<(u64, u64), u32>, ino: u64) -> Result<Vec<u64>, FsError> {
    let mut out = Vec::new();
    for item in t.range((ino, 0)..=(ino, u64::MAX))? {
        out.push(item?.0.value().1);
    }
    Ok(out)
}

fn key_bytes(parent: u64, cookie: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&parent.to_le_bytes());
    k[8..].copy_from_slice(&cookie.to_le_bytes());
    k
}

/// One metadata transaction. Dropped without `commit`, it changes nothing.
pub struct WriteTxn<'a> {
    txn: redb::WriteTransaction,
    meta: &'a Meta,
    /// The stamp of this transaction's changes, once one is made.
    stamp: Option<u64>,
    /// An inode or a name was written or removed.
    touched: bool,
    /// Changes here are not put in the change feed ([`WriteTxn::without_change_feed`]).
    unfed: bool,
}

impl WriteTxn<'_> {
    /// Reads an inode; ENOENT if there is none.
    pub fn inode(&self, ino: u64) -> Result<Inode, FsError> {
        let t = self.txn.open_table(INODES)?;
        match t.get(ino)? {
            Some(v) => self.meta.open_value(b"i", &ino.to_le_bytes(), v.value()),
            None => errno(libc::ENOENT),
        }
    }

    /// Writes an inode.
    pub fn put_inode(&mut self, ino: u64, inode: &Inode) -> Result<(), FsError> {
        self.touched = true;
        let sealed = self.meta.seal_value(b"i", &ino.to_le_bytes(), inode)?;
        self.txn.open_table(INODES)?.insert(ino, &sealed[..])?;
        self.mark_changed(ino)
    }

    /// Deletes an inode record.
    pub fn remove_inode(&mut self, ino: u64) -> Result<(), FsError> {
        self.touched = true;
        self.txn.open_table(INODES)?.remove(ino)?;
        self.txn.open_table(CHANGED)?.remove(ino)?;
        Ok(())
    }

    /// Notes that `ino` changed in this transaction.
    fn mark_changed(&mut self, ino: u64) -> Result<(), FsError> {
        if self.unfed {
            return Ok(());
        }
        let stamp = match self.stamp {
            Some(s) => s,
            None => {
                let s = self.counter("change_stamp")? + 1;
                self.set_counter("change_stamp", s)?;
                self.stamp = Some(s);
                s
            }
        };
        self.txn.open_table(CHANGED)?.insert(ino, stamp)?;
        Ok(())
    }

    /// Notes that a redundancy setting changed (see [`Meta::redundancy_changes`]).
    pub fn note_redundancy_change(&mut self) -> Result<(), FsError> {
        let n = self.counter("redundancy_changes")?;
        self.set_counter("redundancy_changes", n + 1)
    }

    /// Adds one to the names `parent` holds for `ino` (`by` 1) or takes one away (`by` -1).
    fn link_parent(&mut self, ino: u64, parent: u64, by: i64) -> Result<(), FsError> {
        let mut t = self.txn.open_table(PARENTS)?;
        let now = t.get((ino, parent))?.map(|v| v.value()).unwrap_or(0);
        let next = (now as i64 + by).max(0) as u32;
        if next == 0 {
            t.remove((ino, parent))?;
        } else {
            t.insert((ino, parent), next)?;
        }
        Ok(())
    }

    /// Fills the parents table from every directory entry.
    fn index_parents(&mut self) -> Result<(), FsError> {
        let mut links: BTreeMap<(u64, u64), u32> = BTreeMap::new();
        {
            let t = self.txn.open_table(DIRENTS)?;
            for item in t.iter()? {
                let (k, v) = item?;
                let (parent, cookie) = k.value();
                let d: Dirent =
                    self.meta
                        .open_value(b"d", &key_bytes(parent, cookie), v.value())?;
                *links.entry((d.ino, parent)).or_insert(0) += 1;
            }
        }
        let mut t = self.txn.open_table(PARENTS)?;
        for (k, n) in links {
            t.insert(k, n)?;
        }
        Ok(())
    }

    /// Looks `name` up in `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Dirent>, FsError> {
        let t = self.txn.open_table(DIRENTS)?;
        self.meta.find(&t, parent, name)
    }

    /// Adds or replaces the entry `d.name` in `parent`.
    pub fn put_dirent(&mut self, parent: u64, d: &Dirent) -> Result<(), FsError> {
        self.touched = true;
        let cookie = self.meta.cookie(parent, &d.name);
        let mut t = self.txn.open_table(DIRENTS)?;
        let mut replaced = None;
        if let Some(v) = t.get((parent, cookie))? {
            let old: Dirent = self
                .meta
                .open_value(b"d", &key_bytes(parent, cookie), v.value())?;
            if old.name != d.name {
                // Two names with one 62-bit cookie: astronomically rare; refuse rather than lose one.
                return errno(libc::EEXIST);
            }
            replaced = Some(old.ino);
        }
        let sealed = self.meta.seal_value(b"d", &key_bytes(parent, cookie), d)?;
        t.insert((parent, cookie), &sealed[..])?;
        drop(t);
        if replaced != Some(d.ino) {
            if let Some(old) = replaced {
                self.link_parent(old, parent, -1)?;
            }
            self.link_parent(d.ino, parent, 1)?;
        }
        // A new name may put the inode under a different redundancy.
        self.mark_changed(d.ino)
    }

    /// Removes the entry `name` from `parent`.
    pub fn remove_dirent(&mut self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.touched = true;
        let cookie = self.meta.cookie(parent, name);
        let old = self
            .txn
            .open_table(DIRENTS)?
            .remove((parent, cookie))?
            .map(|v| {
                self.meta
                    .open_value::<Dirent>(b"d", &key_bytes(parent, cookie), v.value())
            });
        if let Some(old) = old {
            self.link_parent(old?.ino, parent, -1)?;
        }
        Ok(())
    }

    /// True if directory `ino` has any entry.
    pub fn has_entries(&self, ino: u64) -> Result<bool, FsError> {
        let t = self.txn.open_table(DIRENTS)?;
        let mut r = t.range((ino, 0)..=(ino, u64::MAX))?;
        Ok(r.next().is_some())
    }

    /// A fresh inode number.
    pub fn alloc_ino(&mut self) -> Result<u64, FsError> {
        let n = self.counter("next_ino")?;
        self.set_counter("next_ino", n + 1)?;
        Ok(n)
    }

    /// Writes fresh inodes and names in bulk, for a namespace rebuilt whole:
    /// values sealed on the rayon pool and each table opened once. As
    /// [`WriteTxn::put_inode`] and [`WriteTxn::put_dirent`] otherwise, except
    /// that a name already in its directory is an error (EEXIST), not
    /// replaced.
    pub fn put_fresh(
        &mut self,
        inodes: &[(u64, Inode)],
        names: &[(u64, Dirent)],
    ) -> Result<(), FsError> {
        use rayon::prelude::*;
        if inodes.is_empty() && names.is_empty() {
            return Ok(());
        }
        self.touched = true;
        let meta = self.meta;
        let sealed_inodes: Vec<(u64, Vec<u8>)> = inodes
            .par_iter()
            .map(|(ino, inode)| Ok((*ino, meta.seal_value(b"i", &ino.to_le_bytes(), inode)?)))
            .collect::<Result<_, FsError>>()?;
        let sealed_names: Vec<((u64, u64), Vec<u8>)> = names
            .par_iter()
            .map(|(parent, d)| {
                let cookie = meta.cookie(*parent, &d.name);
                let sealed = meta.seal_value(b"d", &key_bytes(*parent, cookie), d)?;
                Ok(((*parent, cookie), sealed))
            })
            .collect::<Result<_, FsError>>()?;
        {
            let mut t = self.txn.open_table(INODES)?;
            for (ino, sealed) in &sealed_inodes {
                t.insert(*ino, &sealed[..])?;
            }
        }
        {
            let mut t = self.txn.open_table(DIRENTS)?;
            for (key, sealed) in &sealed_names {
                if t.insert(*key, &sealed[..])?.is_some() {
                    return errno(libc::EEXIST);
                }
            }
        }
        let mut links: BTreeMap<(u64, u64), u32> = BTreeMap::new();
        for (parent, d) in names {
            *links.entry((d.ino, *parent)).or_insert(0) += 1;
        }
        {
            let mut t = self.txn.open_table(PARENTS)?;
            for (key, n) in links {
                let before = t.insert(key, n)?.map(|v| v.value());
                if let Some(before) = before {
                    t.insert(key, before + n)?;
                }
            }
        }
        if !self.unfed {
            for ino in inodes
                .iter()
                .map(|(i, _)| *i)
                .chain(names.iter().map(|(_, d)| d.ino))
            {
                self.mark_changed(ino)?;
            }
        }
        Ok(())
    }

    /// Keeps this transaction's changes out of the `changed` table: for a
    /// namespace rebuilt whole, which the durability engine walks in full.
    pub fn without_change_feed(&mut self) {
        self.unfed = true;
    }

    /// Inode numbers from `n` on are free (a namespace rebuilt from a
    /// snapshot used those below it).
    pub fn set_next_ino(&mut self, n: u64) -> Result<(), FsError> {
        let now = self.counter("next_ino")?;
        self.set_counter("next_ino", now.max(n))
    }

    /// Records an inode unlinked while open, to delete at release or next mount.
    pub fn add_orphan(&mut self, ino: u64) -> Result<(), FsError> {
        self.txn.open_table(ORPHANS)?.insert(ino, ())?;
        Ok(())
    }

    /// Forgets an orphan.
    pub fn remove_orphan(&mut self, ino: u64) -> Result<(), FsError> {
        self.txn.open_table(ORPHANS)?.remove(ino)?;
        Ok(())
    }

    /// Records a snapshot under its time key.
    pub fn put_snapshot(&mut self, key: u64, s: &SnapshotRecord) -> Result<(), FsError> {
        let sealed = self.meta.seal_value(b"s", &key.to_le_bytes(), s)?;
        self.txn.open_table(SNAPSHOTS)?.insert(key, &sealed[..])?;
        Ok(())
    }

    /// Records a head root under its time key.
    pub fn put_head(&mut self, key: u64, s: &SnapshotRecord) -> Result<(), FsError> {
        let sealed = self.meta.seal_value(b"h", &key.to_le_bytes(), s)?;
        self.txn.open_table(HEADS)?.insert(key, &sealed[..])?;
        Ok(())
    }

    /// Drops the head roots with a time key above `key`; how many went.
    pub fn remove_heads_after(&mut self, key: u64) -> Result<u64, FsError> {
        let mut t = self.txn.open_table(HEADS)?;
        let newer: Vec<u64> = t
            .range(key.saturating_add(1)..)?
            .map(|item| item.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for k in &newer {
            t.remove(*k)?;
        }
        Ok(newer.len() as u64)
    }

    /// Drops the head roots with a time key below `key`; how many went.
    pub fn remove_heads_before(&mut self, key: u64) -> Result<u64, FsError> {
        let mut t = self.txn.open_table(HEADS)?;
        let old: Vec<u64> = t
            .range(..key)?
            .map(|item| item.map(|(k, _)| k.value()))
            .collect::<Result<_, _>>()?;
        for k in &old {
            t.remove(*k)?;
        }
        Ok(old.len() as u64)
    }

    /// Drops a snapshot record.
    pub fn remove_snapshot(&mut self, key: u64) -> Result<(), FsError> {
        self.txn.open_table(SNAPSHOTS)?.remove(key)?;
        Ok(())
    }

    fn counter(&self, name: &str) -> Result<u64, FsError> {
        let t = self.txn.open_table(COUNTERS)?;
        Ok(t.get(name)?.map(|v| v.value()).unwrap_or(0))
    }

    fn set_counter(&mut self, name: &str, v: u64) -> Result<(), FsError> {
        self.txn.open_table(COUNTERS)?.insert(name, v)?;
        Ok(())
    }

    /// Commits; `durable` waits for the disk (fsync), otherwise the change is
    /// atomic but may be lost in a crash until the next durable commit.
    pub fn commit(mut self, durable: bool) -> Result<(), FsError> {
        let level = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.txn
            .set_durability(level)
            .map_err(|e| FsError::Meta(e.to_string()))?;
        self.txn.commit()?;
        self.meta
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        if self.touched {
            self.meta
                .tree_generation
                .fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::MasterSecret;

    fn dirent(name: &[u8], ino: u64) -> Dirent {
        Dirent {
            name: name.to_vec(),
            ino,
            kind: Kind::File,
        }
    }

    fn inline_file(text: &[u8]) -> Inode {
        let mut inode = Inode::new(Kind::File, 0o644, 1, 1);
        inode.size = text.len() as u64;
        inode.content = FileRef::Inline(text.to_vec());
        inode
    }

    /// Space that removed records leave in the file is given back when
    /// it is next opened.
    #[test]
    fn the_file_shrinks_at_open_once_records_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let keys = MasterSecret::generate().keys();
        let len = || std::fs::metadata(&path).unwrap().len();
        let noise: Vec<u8> = (0..4000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        {
            let meta = Meta::open(&path, &keys, 0, 0).unwrap();
            for batch in 0..20u64 {
                let mut txn = meta.write().unwrap();
                for i in 0..100 {
                    txn.put_inode(100 + batch * 100 + i, &inline_file(&noise))
                        .unwrap();
                }
                txn.commit(false).unwrap();
            }
            let mut txn = meta.write().unwrap();
            for ino in 100..2100 {
                txn.remove_inode(ino).unwrap();
            }
            txn.commit(true).unwrap();
        }
        let full = len();
        let meta = Meta::open(&path, &keys, 0, 0).unwrap();
        assert!(
            len() * 4 < full,
            "{} bytes after open, {full} before",
            len()
        );
        assert_eq!(meta.inode(ROOT_INO).unwrap().kind, Kind::Dir);
    }

    /// Rows written in bulk read back as written, count each name in the
    /// parents table (two names of one file in one directory count two),
    /// stay out of the change feed when asked, and a name already present
    /// is refused rather than replaced.
    #[test]
    fn fresh_rows_in_bulk_read_back_with_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterSecret::generate().keys();
        let meta = Meta::open(&dir.path().join("meta.redb"), &keys, 0, 0).unwrap();
        let (d, f) = (ROOT_INO + 1, ROOT_INO + 2);
        let mut txn = meta.write().unwrap();
        txn.without_change_feed();
        let inodes = vec![
            (d, Inode::new(Kind::Dir, 0o700, 1, 2)),
            (f, Inode::new(Kind::File, 0o640, 3, 4)),
        ];
        let names = vec![
            (
                ROOT_INO,
                Dirent {
                    name: b"d".to_vec(),
                    ino: d,
                    kind: Kind::Dir,
                },
            ),
            (d, dirent(b"f1", f)),
            (d, dirent(b"f2", f)),
            (ROOT_INO, dirent(b"f", f)),
        ];
        txn.put_fresh(&inodes, &names).unwrap();
        txn.commit(true).unwrap();
        assert_eq!(meta.inode(d).unwrap(), inodes[0].1);
        assert_eq!(meta.inode(f).unwrap(), inodes[1].1);
        assert_eq!(meta.lookup(d, b"f2").unwrap(), Some(dirent(b"f2", f)));
        assert_eq!(meta.parents(f).unwrap(), vec![ROOT_INO, d]);
        assert_eq!(meta.parents(d).unwrap(), vec![ROOT_INO]);
        // Only the root, put when the file was created, is in the feed.
        let changed: Vec<u64> = meta.changed(100).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(changed, vec![ROOT_INO]);
        // The second name under d counts: removing one leaves f linked there.
        let mut txn = meta.write().unwrap();
        txn.remove_dirent(d, b"f1").unwrap();
        txn.commit(true).unwrap();
        assert_eq!(meta.parents(f).unwrap(), vec![ROOT_INO, d]);

        let mut txn = meta.write().unwrap();
        let again = txn.put_fresh(&[], &[(ROOT_INO, dirent(b"f", f))]);
        assert!(
            matches!(again, Err(FsError::Errno(libc::EEXIST))),
            "{again:?}"
        );
    }

    /// Names keep the parents table right (a second name, a replaced name,
    /// a removed one), a metadata file from before the table gets it built
    /// at open, and taken changes go while newer ones stay.
    #[test]
    fn parents_follow_names_and_changes_are_taken_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let keys = MasterSecret::generate().keys();
        let meta = Meta::open(&path, &keys, 0, 0).unwrap();
        let mut txn = meta.write().unwrap();
        let (d, f, g) = (
            txn.alloc_ino().unwrap(),
            txn.alloc_ino().unwrap(),
            txn.alloc_ino().unwrap(),
        );
        txn.put_dirent(
            ROOT_INO,
            &Dirent {
                name: b"d".to_vec(),
                ino: d,
                kind: Kind::Dir,
            },
        )
        .unwrap();
        txn.put_dirent(ROOT_INO, &dirent(b"f", f)).unwrap();
        txn.put_dirent(d, &dirent(b"f1", f)).unwrap();
        txn.put_dirent(d, &dirent(b"f2", f)).unwrap();
        txn.commit(true).unwrap();
        assert_eq!(meta.parents(f).unwrap(), vec![ROOT_INO, d]);
        let mut txn = meta.write().unwrap();
        txn.remove_dirent(d, b"f1").unwrap();
        txn.commit(true).unwrap();
        assert_eq!(
            meta.parents(f).unwrap(),
            vec![ROOT_INO, d],
            "f2 still links f under d"
        );
        let mut txn = meta.write().unwrap();
        txn.put_dirent(d, &dirent(b"f2", g)).unwrap();
        txn.commit(true).unwrap();
        assert_eq!(meta.parents(f).unwrap(), vec![ROOT_INO]);
        assert_eq!(meta.parents(g).unwrap(), vec![d]);

        let changed = meta.changed(100).unwrap();
        let inos: Vec<u64> = changed.iter().map(|(i, _)| *i).collect();
        assert!(
            inos.contains(&d) && inos.contains(&f) && inos.contains(&g),
            "{inos:?}"
        );
        // g changes again after the read: taking what was read leaves it.
        let mut txn = meta.write().unwrap();
        txn.put_inode(g, &Inode::new(Kind::File, 0o644, 0, 0))
            .unwrap();
        txn.commit(true).unwrap();
        meta.take_changed(&changed).unwrap();
        assert_eq!(
            meta.changed(100)
                .unwrap()
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>(),
            vec![g]
        );

        // A file written before the parents table: built at open.
        let mut txn = meta.write().unwrap();
        txn.txn
            .open_table(PARENTS)
            .unwrap()
            .retain(|_, _| false)
            .unwrap();
        txn.set_counter("parents", 0).unwrap();
        txn.commit(true).unwrap();
        drop(meta);
        let meta = Meta::open(&path, &keys, 0, 0).unwrap();
        assert_eq!(meta.parents(g).unwrap(), vec![d]);
        assert_eq!(meta.parents(d).unwrap(), vec![ROOT_INO]);
    }
}
