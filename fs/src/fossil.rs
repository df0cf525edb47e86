//! Fossil: the live filesystem over the block store, with no knowledge of FUSE.
//!
//! Namespace and attributes live in [`Meta`]; file data lives in block trees,
//! with recent writes held as [`Dirty`] extents until flush, fsync or close.
//! Lock order: a file's state lock, then a metadata transaction. The table of
//! open counts is a leaf lock, never held while taking another.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, mpsc};

use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, Class, FileRef, Keys, TreeParams, TreeReader, TreeWriter};

use crate::error::{FsError, errno};
use crate::file::{Dirty, SealJob};
use crate::meta::{Dirent, Inode, Kind, Meta, ROOT_INO, Time};
use crate::snapdir::{SNAP_BASE, SNAPSHOTS_NAME, SnapDir, is_snapshot_ino};

/// Longest name in a directory, as on Linux.
pub const NAME_MAX: usize = 255;
/// Longest extended attribute value.
pub const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Dirty bytes one file may hold before it is sealed into blocks.
const FILE_DIRTY_MAX: usize = 8 << 20;
/// Dirty bytes all files together may hold.
const TOTAL_DIRTY_MAX: usize = 32 << 20;
/// Blocks decoded ahead of a sequential reader.
const READ_AHEAD_BLOCKS: usize = 2;
/// Bytes of decoded blocks the reader caches.
const READ_CACHE: u64 = 16 << 20;
/// The xattr that shows a directory's redundancy.
pub const REDUNDANCY_XATTR: &[u8] = b"user.fincrypt.redundancy";
/// The directory in the root that holds the backed-up copies of watched folders.
pub const BACKUPS_NAME: &[u8] = b"backups";
/// Marks the root's `backups` as the filesystem's own: a user's directory of
/// that name has no such mark, and stays the user's.
pub const BACKUPS_XATTR: &[u8] = b"user.fincrypt.backups";

/// Attributes as the kernel wants them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// 512-byte units, as stat(2) counts them.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub rdev: u32,
}

/// A time to set: now, or a given one.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(Time),
}

/// Changes of a setattr call; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Time>,
}

/// What a file copied in from outside the filesystem keeps of its source
/// (see [`Fossil::import_file`]).
#[derive(Clone, Debug)]
pub struct Imported {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: Time,
    pub mtime: Time,
    pub xattrs: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
}

/// GC held off while imported files are sealed and committed
/// ([`Fossil::import_gate`]).
pub struct ImportGate<'a>(#[allow(dead_code)] std::sync::RwLockReadGuard<'a, ()>);

/// A file's contents stored as blocks, not yet named by an inode
/// ([`Fossil::seal_import`]).
#[derive(Clone, Debug)]
pub struct Sealed {
    content: FileRef,
    size: u64,
}

/// Bytes read from an imported file at a time.
const IMPORT_READ: usize = 4 << 20;

/// Who asks: the caller's uid and gid, for ownership of new nodes.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The state of a file that is open or has unsealed writes.
#[derive(Default)]
struct FileState {
    dirty: Option<Dirty>,
}

/// A full buffer's seal, run on the sealing thread.
type SealTask = Box<dyn FnOnce() + Send>;

/// What sealing a file's writes needs, for the calling or a background thread.
#[derive(Clone)]
struct Sealer {
    meta: Arc<Meta>,
    store: Arc<dyn BlockStore>,
    reader: TreeReader<Arc<dyn BlockStore>>,
    keys: Keys,
    params: TreeParams,
    gc_gate: Arc<RwLock<()>>,
}

impl Sealer {
    /// Writes `d` as blocks and records the new content in the inode;
    /// returns the content, or `None` when nothing changed. With `at_cut`,
    /// only up to the last content-defined cut ([`Dirty::seal_at_cut`]);
    /// the flag returned says whether it stopped there.
    fn seal(
        &self,
        ino: u64,
        d: &Dirty,
        durable: bool,
        at_cut: bool,
    ) -> Result<Option<(FileRef, bool)>, FsError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let content = if d.is_clean() {
            None
        } else if at_cut {
            Some(d.seal_at_cut(&*self.store, &self.reader, &self.keys, self.params)?)
        } else {
            Some((
                d.seal(&*self.store, &self.reader, &self.keys, self.params)?,
                false,
            ))
        };
        let mut txn = self.meta.write()?;
        match txn.inode(ino) {
            Ok(mut inode) => {
                if let Some((c, cut)) = &content {
                    inode.content = c.clone();
                    // A piece cut short is committed as a file of its length.
                    inode.size = if *cut { c.len() } else { d.size };
                    inode.mtime = d.mtime;
                    inode.ctime = inode.ctime.max(d.mtime);
                }
                txn.put_inode(ino, &inode)?;
            }
            // Deleted meanwhile: its blocks are garbage for the next GC.
            Err(FsError::Errno(libc::ENOENT)) => {}
            Err(e) => return Err(e),
        }
        if durable {
            commit_durably(&*self.store, txn)?;
        } else {
            txn.commit(false)?;
        }
        Ok(content)
    }
}

/// Commits `txn` durably, after making the blocks it may name durable.
/// The open transaction keeps every other commit out meanwhile, so no
/// metadata naming a block that is not yet on disk becomes durable.
fn commit_durably(store: &dyn BlockStore, txn: crate::meta::WriteTxn<'_>) -> Result<(), FsError> {
    store.sync()?;
    txn.commit(true)
}

/// The live filesystem.
pub struct Fossil {
    meta: Arc<Meta>,
    store: Arc<dyn BlockStore>,
    reader: TreeReader<Arc<dyn BlockStore>>,
    keys: Keys,
    params: TreeParams,
    files: Mutex<HashMap<u64, Arc<Mutex<FileState>>>>,
    opens: Mutex<HashMap<u64, u32>>,
    /// Unsealed bytes of all files, in-flight background seals included.
    dirty_total: Arc<AtomicUsize>,
    /// Held shared from sealing a file's blocks until its inode is committed;
    /// GC takes it exclusively to set its mark, so it never sweeps such blocks.
    gc_gate: Arc<RwLock<()>>,
    seal_queue: OnceLock<mpsc::Sender<SealTask>>,
    snapdir: SnapDir,
    /// Where each file's last read ended: a read that starts there is sequential.
    read_ends: Mutex<HashMap<u64, u64>>,
    /// A directory on the disk that holds the volume, for statfs.
    disk: PathBuf,
    /// The inode of the marked `backups` directory, or 0 while there is none.
    backups: AtomicU64,
    /// The metadata's generation right after [`Fossil::sync_meta`] last
    /// made it durable (`u64::MAX`: not yet): unchanged since, there is
    /// nothing to sync.
    synced: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks stays consistent at every await-free step,
    // so a panic elsewhere does not poison it for us.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fossil {
    /// A filesystem over `meta` and `store`; `disk` is where statfs looks.
    pub fn new(
        meta: Meta,
        store: Arc<dyn BlockStore>,
        keys: Keys,
        params: TreeParams,
        disk: PathBuf,
    ) -> Result<Fossil, FsError> {
        let fs = Fossil {
            meta: Arc::new(meta),
            reader: TreeReader::new(store.clone(), READ_CACHE),
            store,
            keys,
            params,
            files: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            dirty_total: Arc::new(AtomicUsize::new(0)),
            gc_gate: Arc::new(RwLock::new(())),
            seal_queue: OnceLock::new(),
            snapdir: SnapDir::default(),
            read_ends: Mutex::new(HashMap::new()),
            disk,
            backups: AtomicU64::new(0),
            synced: AtomicU64::new(u64::MAX),
        };
        if let Some(ino) = fs.marked_backups()? {
            fs.backups.store(ino, Ordering::Relaxed);
        }
        // Files unlinked while open when the last session ended go now.
        let orphans = fs.meta.orphans()?;
        if !orphans.is_empty() {
            let mut txn = fs.meta.write()?;
            for ino in orphans {
                txn.remove_inode(ino)?;
                txn.remove_orphan(ino)?;
            }
            txn.commit(true)?;
        }
        Ok(fs)
    }

    /// The root's `backups`, if it is there and marked as the filesystem's own.
    fn marked_backups(&self) -> Result<Option<u64>, FsError> {
        let Some(d) = self.meta.lookup(ROOT_INO, BACKUPS_NAME)? else {
            return Ok(None);
        };
        let inode = self.meta.inode(d.ino)?;
        Ok((inode.kind == Kind::Dir && inode.xattrs.contains_key(BACKUPS_XATTR)).then_some(d.ino))
    }

    /// The directory that holds watched folders' copies, made (and marked)
    /// if there is none yet. A `backups` of the user's own is left alone:
    /// `EEXIST`.
    pub fn backups_dir(&self, owner: Caller) -> Result<u64, FsError> {
        let known = self.backups.load(Ordering::Relaxed);
        if known != 0 {
            return Ok(known);
        }
        if let Some(ino) = self.marked_backups()? {
            self.backups.store(ino, Ordering::Relaxed);
            return Ok(ino);
        }
        let a = self.mknod(ROOT_INO, BACKUPS_NAME, Kind::Dir, 0o755, 0, None, owner)?;
        if let Err(e) = self.setxattr(a.ino, BACKUPS_XATTR, b"1", true, false) {
            let _ = self.rmdir(ROOT_INO, BACKUPS_NAME);
            return Err(e);
        }
        self.backups.store(a.ino, Ordering::Relaxed);
        Ok(a.ino)
    }

    /// `EROFS` for a change asked through the mount to `ino` when it is the
    /// `backups` directory or under it: only the watcher changes those copies.
    pub fn check_user_change(&self, ino: u64) -> Result<(), FsError> {
        let backups = self.backups.load(Ordering::Relaxed);
        if backups == 0 || is_snapshot_ino(ino) {
            return Ok(());
        }
        // Names under `backups` are all made there by the watcher (a link
        // into or out of it is refused), so one parent chain leads up.
        let mut at = ino;
        for _ in 0..4096 {
            if at == backups {
                return errno(libc::EROFS);
            }
            if at == ROOT_INO {
                return Ok(());
            }
            match self.meta.parents(at)?.first() {
                Some(&p) => at = p,
                None => return Ok(()),
            }
        }
        Ok(())
    }

    /// [`Fossil::check_user_change`] of directory `parent` and of what
    /// `name` in it is, for a name about to be removed or replaced.
    pub fn check_user_change_entry(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        self.check_user_change(parent)?;
        if self.backups.load(Ordering::Relaxed) == 0 || is_snapshot_ino(parent) {
            return Ok(());
        }
        match self.meta.lookup(parent, name) {
            Ok(Some(d)) => self.check_user_change(d.ino),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The metadata store (for snapshots and GC).
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The block store underneath.
    pub fn store(&self) -> &dyn BlockStore {
        &*self.store
    }

    /// The reader over the block store.
    pub fn reader(&self) -> &TreeReader<Arc<dyn BlockStore>> {
        &self.reader
    }

    /// The keys and tree shape in use.
    pub fn keys(&self) -> (&Keys, TreeParams) {
        (&self.keys, self.params)
    }

    fn state(&self, ino: u64) -> Arc<Mutex<FileState>> {
        lock(&self.files).entry(ino).or_default().clone()
    }

    fn attr(&self, ino: u64, inode: &Inode) -> Attr {
        let (mut size, mut mtime, mut ctime) = (inode.size, inode.mtime, inode.ctime);
        // What a file occupies is its data, not its holes.
        let mut stored = match inode.kind {
            Kind::File => inode.content.data_len().min(size),
            _ => size,
        };
        if inode.kind == Kind::File
            && let Some(st) = lock(&self.files).get(&ino).cloned()
            && let Some(d) = &lock(&st).dirty
        {
            size = d.size;
            stored = d.stored_bytes();
            if d.mtime > mtime {
                mtime = d.mtime;
                ctime = ctime.max(d.mtime);
            }
        }
        Attr {
            ino,
            kind: inode.kind,
            perm: inode.perm,
            uid: inode.uid,
            gid: inode.gid,
            nlink: inode.nlink,
            size,
            blocks: stored.div_ceil(512),
            atime: inode.atime,
            mtime,
            ctime,
            crtime: inode.crtime,
            rdev: inode.rdev,
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if is_snapshot_ino(ino) {
            return self.snapdir.getattr(ino);
        }
        let inode = self.meta.inode(ino)?;
        Ok(self.attr(ino, &inode))
    }

    /// Finds `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        check_name(name)?;
        if is_snapshot_ino(parent) {
            return self.snapdir.lookup(self, parent, name);
        }
        if parent == ROOT_INO && name == SNAPSHOTS_NAME {
            return self.snapdir.getattr(SNAP_BASE);
        }
        let dir = self.meta.inode(parent)?;
        if dir.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        match self.meta.lookup(parent, name)? {
            Some(d) => self.getattr(d.ino),
            None => errno(libc::ENOENT),
        }
    }

    /// Creates a node of `kind` in `parent` (file, directory, special file or symlink).
    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        perm: u16,
        rdev: u32,
        target: Option<&[u8]>,
        who: Caller,
    ) -> Result<Attr, FsError> {
        check_new_name(parent, name)?;
        let mut txn = self.meta.write()?;
        let mut dir = live_dir(&txn, parent)?;
        if txn.lookup(parent, name)?.is_some() {
            return errno(libc::EEXIST);
        }
        let ino = txn.alloc_ino()?;
        let mut inode = Inode::new(kind, perm & 0o7777, who.uid, who.gid);
        // BSD group semantics under a set-gid directory, as Linux does it.
        if dir.perm & 0o2000 != 0 {
            inode.gid = dir.gid;
            if kind == Kind::Dir {
                inode.perm |= 0o2000;
            }
        }
        inode.rdev = rdev;
        if let Some(t) = target {
            inode.target = t.to_vec();
            inode.size = t.len() as u64;
        }
        if kind == Kind::Dir {
            inode.size = 0;
            inode.target = parent.to_le_bytes().to_vec();
            dir.nlink += 1;
        }
        let now = inode.ctime;
        dir.mtime = now;
        dir.ctime = now;
        txn.put_inode(ino, &inode)?;
        txn.put_inode(parent, &dir)?;
        txn.put_dirent(
            parent,
            &Dirent {
                name: name.to_vec(),
                ino,
                kind,
            },
        )?;
        txn.commit(false)?;
        Ok(self.attr(ino, &inode))
    }

    /// Creates and opens a regular file (open(2) with O_CREAT).
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        perm: u16,
        who: Caller,
    ) -> Result<Attr, FsError> {
        let a = self.mknod(parent, name, Kind::File, perm, 0, None, who)?;
        self.open(a.ino)?;
        Ok(a)
    }

    /// Writes everything `source` yields as the file `name` in `parent`,
    /// with the mode, owner, times and extended attributes of `attrs`: a new
    /// file, or a new version of the one there (same inode, so its hard
    /// links follow). The contents stream through the block pipeline a few
    /// MiB at a time, and the file changes in one commit once they are all
    /// stored, so a snapshot sees the old version or the new one, never part
    /// of one. A file there with writes not yet sealed is `EBUSY`.
    ///
    /// [`Fossil::seal_import`] and [`Fossil::commit_imports`] do the same
    /// for many files: sealed side by side, committed together.
    pub fn import_file(
        &self,
        parent: u64,
        name: &[u8],
        source: &mut dyn std::io::Read,
        attrs: &Imported,
    ) -> Result<Attr, FsError> {
        check_new_name(parent, name)?;
        let gate = self.import_gate();
        let sealed = self.seal_import(&gate, source)?;
        let mut done = self.commit_imports(&[(parent, name, &sealed, attrs)])?;
        done.pop().unwrap_or_else(|| errno(libc::EIO))
    }

    /// Holds off GC while imported files are sealed and until the commit
    /// that names their blocks: it must not sweep blocks nothing names yet.
    /// Hold it no longer than a batch of files takes, and never take a
    /// second one on a thread that holds one (a waiting GC would keep it
    /// out for good).
    pub fn import_gate(&self) -> ImportGate<'_> {
        ImportGate(self.gc_gate.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stores everything `source` yields as the blocks of a file not yet
    /// named by any inode (see [`Fossil::commit_imports`]). Several may run
    /// at once, on other threads, under one gate.
    pub fn seal_import(
        &self,
        _gate: &ImportGate<'_>,
        source: &mut dyn std::io::Read,
    ) -> Result<Sealed, FsError> {
        let mut w = TreeWriter::new(&*self.store, &self.keys, self.params, Class::Own).unsynced();
        // Small at first, grown while reads fill it: most files are small,
        // and zeroing a 4 MiB buffer for each cost more than reading them.
        let mut buf = vec![0u8; 64 << 10];
        let mut size = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return errno(e.raw_os_error().unwrap_or(libc::EIO)),
            };
            w.write(&buf[..n])?;
            size += n as u64;
            if n == buf.len() && buf.len() < IMPORT_READ {
                buf.resize((buf.len() * 4).min(IMPORT_READ), 0);
            }
        }
        Ok(Sealed {
            content: w.finish()?,
            size,
        })
    }

    /// Names sealed files, each `(parent, name, sealed, attrs)` as
    /// [`Fossil::import_file`] would, all in one commit. Each file gets its
    /// own answer: one that cannot be named (a directory there, unsealed
    /// writes: `EBUSY`, a parent that is no directory) is left out and the
    /// rest are committed. The error of the whole is the commit's.
    ///
    /// The [`ImportGate`] each file was sealed under must still be held,
    /// by this thread or another, until this returns. Taking one here
    /// could wait forever: a GC waiting for the gate keeps new holders out
    /// while the sealers keep it.
    pub fn commit_imports(
        &self,
        files: &[(u64, &[u8], &Sealed, &Imported)],
    ) -> Result<Vec<Result<Attr, FsError>>, FsError> {
        let mut txn = self.meta.write()?;
        let now = Time::now();
        let mut out = Vec::with_capacity(files.len());
        // Directories that got a new name: their times change once.
        let mut grown: Vec<u64> = Vec::new();
        for (parent, name, sealed, attrs) in files {
            let ino = match Self::import_one(&self.files, &mut txn, *parent, name, attrs) {
                Ok((ino, fresh)) => {
                    if fresh && !grown.contains(parent) {
                        grown.push(*parent);
                    }
                    ino
                }
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let mut inode = txn.inode(ino)?;
            inode.content = sealed.content.clone();
            inode.size = sealed.size;
            inode.perm = attrs.perm & 0o7777;
            inode.uid = attrs.uid;
            inode.gid = attrs.gid;
            inode.atime = attrs.atime;
            inode.mtime = attrs.mtime;
            inode.ctime = now;
            // Redundancy is this filesystem's own setting, never a source's.
            inode.xattrs = attrs
                .xattrs
                .iter()
                .filter(|(k, _)| k.as_slice() != REDUNDANCY_XATTR)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            txn.put_inode(ino, &inode)?;
            out.push(Ok(self.attr(ino, &inode)));
        }
        for parent in grown {
            let mut dir = live_dir(&txn, parent)?;
            dir.mtime = now;
            dir.ctime = now;
            txn.put_inode(parent, &dir)?;
        }
        txn.commit(false)?;
        Ok(out)
    }

    /// The inode an imported file `name` in `parent` goes to: the file
    /// there, or a new one (then `true`).
    fn import_one(
        files: &Mutex<HashMap<u64, Arc<Mutex<FileState>>>>,
        txn: &mut crate::meta::WriteTxn<'_>,
        parent: u64,
        name: &[u8],
        attrs: &Imported,
    ) -> Result<(u64, bool), FsError> {
        check_new_name(parent, name)?;
        if attrs.xattrs.values().any(|v| v.len() > XATTR_SIZE_MAX) {
            return errno(libc::E2BIG);
        }
        live_dir(txn, parent)?;
        match txn.lookup(parent, name)? {
            Some(d) if d.kind != Kind::File => errno(libc::EEXIST),
            Some(d) => {
                let dirty = lock(files)
                    .get(&d.ino)
                    .is_some_and(|st| lock(st).dirty.is_some());
                if dirty {
                    return errno(libc::EBUSY);
                }
                Ok((d.ino, false))
            }
            None => {
                let ino = txn.alloc_ino()?;
                txn.put_dirent(
                    parent,
                    &Dirent {
                        name: name.to_vec(),
                        ino,
                        kind: Kind::File,
                    },
                )?;
                txn.put_inode(ino, &Inode::new(Kind::File, 0, attrs.uid, attrs.gid))?;
                Ok((ino, true))
            }
        }
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        if is_snapshot_ino(ino) {
            return self.snapdir.readlink(ino);
        }
        let inode = self.meta.inode(ino)?;
        if inode.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(inode.target)
    }

    /// Removes a non-directory entry.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        check_existing_name(parent, name)?;
        let mut txn = self.meta.write()?;
        let d = txn
            .lookup(parent, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        if d.kind == Kind::Dir {
            return errno(libc::EISDIR);
        }
        let now = Time::now();
        let mut dir = txn.inode(parent)?;
        dir.mtime = now;
        dir.ctime = now;
        txn.put_inode(parent, &dir)?;
        txn.remove_dirent(parent, name)?;
        let mut gone = Vec::new();
        self.drop_link(&mut txn, d.ino, now, &mut gone)?;
        self.commit_and_forget(txn, gone)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        check_existing_name(parent, name)?;
        if name == b"." {
            return errno(libc::EINVAL);
        }
        let mut txn = self.meta.write()?;
        let d = txn
            .lookup(parent, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        if d.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        if txn.has_entries(d.ino)? {
            return errno(libc::ENOTEMPTY);
        }
        let now = Time::now();
        let mut dir = txn.inode(parent)?;
        dir.nlink = dir.nlink.saturating_sub(1);
        dir.mtime = now;
        dir.ctime = now;
        txn.put_inode(parent, &dir)?;
        txn.remove_dirent(parent, name)?;
        let mut gone = Vec::new();
        self.drop_inode_if_unused(&mut txn, d.ino, true, &mut gone)?;
        self.commit_and_forget(txn, gone)
    }

    /// One link fewer to `ino`; deleted once it has none and nobody has it open.
    fn drop_link(
        &self,
        txn: &mut crate::meta::WriteTxn<'_>,
        ino: u64,
        now: Time,
        gone: &mut Vec<u64>,
    ) -> Result<(), FsError> {
        let mut inode = txn.inode(ino)?;
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = now;
        if inode.nlink > 0 {
            txn.put_inode(ino, &inode)?;
            return Ok(());
        }
        txn.put_inode(ino, &inode)?;
        self.drop_inode_if_unused(txn, ino, false, gone)
    }

    /// Deletes `ino` now, or marks it an orphan while it is open. Deleted inodes
    /// are added to `gone`; the caller forgets their state after committing,
    /// since a file's state lock must never be taken inside a transaction.
    fn drop_inode_if_unused(
        &self,
        txn: &mut crate::meta::WriteTxn<'_>,
        ino: u64,
        is_dir: bool,
        gone: &mut Vec<u64>,
    ) -> Result<(), FsError> {
        let open = lock(&self.opens).get(&ino).copied().unwrap_or(0) > 0;
        if open {
            if is_dir {
                let mut inode = txn.inode(ino)?;
                inode.nlink = 0;
                txn.put_inode(ino, &inode)?;
            }
            txn.add_orphan(ino)?;
        } else {
            txn.remove_inode(ino)?;
            gone.push(ino);
        }
        Ok(())
    }

    /// Commits a namespace change, then forgets the state of the inodes it
    /// deleted (only after the commit: see `drop_inode_if_unused`).
    fn commit_and_forget(
        &self,
        txn: crate::meta::WriteTxn<'_>,
        gone: Vec<u64>,
    ) -> Result<(), FsError> {
        txn.commit(false)?;
        gone.into_iter().for_each(|ino| self.forget_state(ino));
        Ok(())
    }

    fn forget_state(&self, ino: u64) {
        if let Some(st) = lock(&self.files).remove(&ino)
            && let Some(d) = lock(&st).dirty.take()
        {
            self.dirty_total.fetch_sub(d.held(), Ordering::Relaxed);
        }
    }

    /// Renames `name` in `parent` to `newname` in `newparent`.
    ///
    /// `noreplace` fails with EEXIST if the target exists; `exchange` swaps the two.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
        exchange: bool,
    ) -> Result<(), FsError> {
        check_existing_name(parent, name)?;
        check_new_name(newparent, newname)?;
        let mut txn = self.meta.write()?;
        let src = txn
            .lookup(parent, name)?
            .ok_or(FsError::Errno(libc::ENOENT))?;
        let dst = txn.lookup(newparent, newname)?;
        if txn.inode(newparent)?.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let now = Time::now();
        if exchange {
            let dst = dst.ok_or(FsError::Errno(libc::ENOENT))?;
            txn.put_dirent(
                parent,
                &Dirent {
                    name: name.to_vec(),
                    ino: dst.ino,
                    kind: dst.kind,
                },
            )?;
            txn.put_dirent(
                newparent,
                &Dirent {
                    name: newname.to_vec(),
                    ino: src.ino,
                    kind: src.kind,
                },
            )?;
            if parent != newparent {
                for (ino, kind, from, to) in [
                    (src.ino, src.kind, parent, newparent),
                    (dst.ino, dst.kind, newparent, parent),
                ] {
                    if kind == Kind::Dir {
                        self.move_dir(&mut txn, ino, from, to)?;
                    }
                }
            }
            for ino in [src.ino, dst.ino] {
                let mut i = txn.inode(ino)?;
                i.ctime = now;
                txn.put_inode(ino, &i)?;
            }
            self.touch_dirs(&mut txn, parent, newparent, now)?;
            txn.commit(false)?;
            return Ok(());
        }
        if let Some(dst) = &dst {
            if dst.ino == src.ino {
                return Ok(()); // two names of one inode: POSIX says do nothing
            }
            if noreplace {
                return errno(libc::EEXIST);
            }
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return errno(libc::ENOTDIR),
                (false, true) => return errno(libc::EISDIR),
                (true, true) if txn.has_entries(dst.ino)? => return errno(libc::ENOTEMPTY),
                _ => {}
            }
        }
        if src.kind == Kind::Dir
            && parent != newparent
            && self.is_ancestor(&txn, src.ino, newparent)?
        {
            return errno(libc::EINVAL);
        }
        txn.remove_dirent(parent, name)?;
        let mut gone = Vec::new();
        if let Some(dst) = dst {
            txn.remove_dirent(newparent, newname)?;
            if dst.kind == Kind::Dir {
                let mut np = txn.inode(newparent)?;
                np.nlink = np.nlink.saturating_sub(1);
                txn.put_inode(newparent, &np)?;
                self.drop_inode_if_unused(&mut txn, dst.ino, true, &mut gone)?;
            } else {
                self.drop_link(&mut txn, dst.ino, now, &mut gone)?;
            }
        }
        txn.put_dirent(
            newparent,
            &Dirent {
                name: newname.to_vec(),
                ino: src.ino,
                kind: src.kind,
            },
        )?;
        if src.kind == Kind::Dir && parent != newparent {
            self.move_dir(&mut txn, src.ino, parent, newparent)?;
        }
        let mut moved = txn.inode(src.ino)?;
        moved.ctime = now;
        txn.put_inode(src.ino, &moved)?;
        self.touch_dirs(&mut txn, parent, newparent, now)?;
        self.commit_and_forget(txn, gone)
    }

    /// Moves directory `ino` from `from` to `to`: fixes ".." and both link counts.
    fn move_dir(
        &self,
        txn: &mut crate::meta::WriteTxn<'_>,
        ino: u64,
        from: u64,
        to: u64,
    ) -> Result<(), FsError> {
        let mut d = txn.inode(ino)?;
        d.target = to.to_le_bytes().to_vec();
        txn.put_inode(ino, &d)?;
        let mut f = txn.inode(from)?;
        f.nlink = f.nlink.saturating_sub(1);
        txn.put_inode(from, &f)?;
        let mut t = txn.inode(to)?;
        t.nlink += 1;
        txn.put_inode(to, &t)?;
        Ok(())
    }

    fn touch_dirs(
        &self,
        txn: &mut crate::meta::WriteTxn<'_>,
        a: u64,
        b: u64,
        now: Time,
    ) -> Result<(), FsError> {
        for ino in if a == b { vec![a] } else { vec![a, b] } {
            let mut d = txn.inode(ino)?;
            d.mtime = now;
            d.ctime = now;
            txn.put_inode(ino, &d)?;
        }
        Ok(())
    }

    /// True if directory `ancestor` is `ino` or lies above it.
    fn is_ancestor(
        &self,
        txn: &crate::meta::WriteTxn<'_>,
        ancestor: u64,
        mut ino: u64,
    ) -> Result<bool, FsError> {
        for _ in 0..4096 {
            if ino == ancestor {
                return Ok(true);
            }
            if ino == ROOT_INO {
                return Ok(false);
            }
            ino = parent_of(&txn.inode(ino)?);
        }
        Ok(false)
    }

    /// Adds the name `newname` in `newparent` for the existing node `ino`.
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr, FsError> {
        writable(ino)?;
        check_new_name(newparent, newname)?;
        let mut txn = self.meta.write()?;
        let mut inode = txn.inode(ino)?;
        if inode.kind == Kind::Dir {
            return errno(libc::EPERM);
        }
        if inode.nlink == 0 {
            return errno(libc::ENOENT);
        }
        if txn.lookup(newparent, newname)?.is_some() {
            return errno(libc::EEXIST);
        }
        let now = Time::now();
        inode.nlink += 1;
        inode.ctime = now;
        txn.put_inode(ino, &inode)?;
        txn.put_dirent(
            newparent,
            &Dirent {
                name: newname.to_vec(),
                ino,
                kind: inode.kind,
            },
        )?;
        let mut dir = txn.inode(newparent)?;
        dir.mtime = now;
        dir.ctime = now;
        txn.put_inode(newparent, &dir)?;
        txn.commit(false)?;
        Ok(self.attr(ino, &inode))
    }

    /// Changes attributes; a size change truncates or extends the file.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> Result<Attr, FsError> {
        writable(ino)?;
        let st = self.state(ino);
        let mut st = lock(&st);
        let mut txn = self.meta.write()?;
        let mut inode = txn.inode(ino)?;
        let now = Time::now();
        if let Some(mode) = set.mode {
            inode.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => now,
            SetTime::At(t) => t,
        };
        if let Some(t) = set.atime {
            inode.atime = resolve(t);
        }
        if let Some(size) = set.size {
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return errno(libc::EISDIR),
                _ => return errno(libc::EINVAL),
            }
            let d = st
                .dirty
                .get_or_insert_with(|| Dirty::new(inode.content.clone(), inode.size));
            let before = d.held();
            d.truncate(size);
            self.account(before, d.held());
            inode.mtime = d.mtime;
        }
        if let Some(t) = set.mtime {
            inode.mtime = resolve(t);
            if let Some(d) = &mut st.dirty {
                d.mtime = inode.mtime;
            }
        }
        inode.ctime = set.ctime.unwrap_or(now);
        txn.put_inode(ino, &inode)?;
        txn.commit(false)?;
        let open = lock(&self.opens).get(&ino).copied().unwrap_or(0) > 0;
        if set.size.is_some() && !open {
            // Nobody will close this file: seal the truncation now.
            self.seal_locked(ino, &mut st, false)?;
        }
        drop(st);
        self.getattr(ino)
    }

    /// Notes an open of `ino`.
    pub fn open(&self, ino: u64) -> Result<(), FsError> {
        if is_snapshot_ino(ino) {
            return self.snapdir.getattr(ino).map(|_| ());
        }
        let _ = self.meta.inode(ino)?;
        *lock(&self.opens).entry(ino).or_insert(0) += 1;
        Ok(())
    }

    /// Notes a close of `ino`: seals its writes and deletes it if it was unlinked.
    pub fn release(&self, ino: u64) -> Result<(), FsError> {
        if is_snapshot_ino(ino) {
            return Ok(());
        }
        let last = {
            let mut opens = lock(&self.opens);
            let n = opens.entry(ino).or_insert(1);
            *n = n.saturating_sub(1);
            let last = *n == 0;
            if last {
                opens.remove(&ino);
                lock(&self.read_ends).remove(&ino);
            }
            last
        };
        let sealed = self.flush(ino);
        if last {
            let inode = self.meta.inode(ino);
            if let Ok(inode) = inode {
                if inode.nlink == 0 {
                    let mut txn = self.meta.write()?;
                    txn.remove_inode(ino)?;
                    txn.remove_orphan(ino)?;
                    txn.commit(false)?;
                    self.forget_state(ino);
                } else if lock(&self.files)
                    .get(&ino)
                    .is_some_and(|s| lock(s).dirty.is_none())
                {
                    lock(&self.files).remove(&ino);
                }
            }
        }
        sealed
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        if is_snapshot_ino(ino) {
            return self.snapdir.read(self, ino, offset, size).map(Bytes::from);
        }
        let st = lock(&self.files).get(&ino).cloned();
        if let Some(st) = st {
            let st = lock(&st);
            if let Some(d) = &st.dirty {
                let n = d.size.saturating_sub(offset).min(size as u64) as usize;
                let mut buf = vec![0u8; n];
                d.read(&self.reader, offset, &mut buf)?;
                return Ok(buf.into());
            }
        }
        let inode = self.meta.inode(ino)?;
        if inode.kind == Kind::Dir {
            return errno(libc::EISDIR);
        }
        let n = inode.size.saturating_sub(offset).min(size as u64) as usize;
        let end = offset + n as u64;
        let sequential = lock(&self.read_ends).insert(ino, end) == Some(offset);
        if !sequential {
            // A jump: decode only what is asked until a run shows up.
            let mut buf = vec![0u8; n];
            self.reader
                .read_at_random(&inode.content, offset, &mut buf)?;
            return Ok(buf.into());
        }
        if n > 0 {
            // Decode the next blocks on the other cores while this one is read.
            self.reader.prefetch(&inode.content, end, READ_AHEAD_BLOCKS);
        }
        let got = self.reader.read_bytes(&inode.content, offset, n)?;
        if got.len() < n {
            // The size was raised past the sealed content (truncate up): the
            // rest is a hole, read as zeros.
            let mut buf = got.to_vec();
            buf.resize(n, 0);
            return Ok(buf.into());
        }
        Ok(got)
    }

    /// Where the next data (`hole` false) or hole (`hole` true) at or after
    /// `offset` starts: lseek(2)'s SEEK_DATA and SEEK_HOLE. The end of the
    /// file counts as a hole; ENXIO at or past it, or when no data follows.
    /// Pending writes are sealed first, so the answer is the file tree's.
    pub fn seek_hole_data(&self, ino: u64, offset: u64, hole: bool) -> Result<u64, FsError> {
        let (size, content) = if is_snapshot_ino(ino) {
            self.snapdir.content(ino)?
        } else {
            self.flush(ino)?;
            let inode = self.meta.inode(ino)?;
            if inode.kind != Kind::File {
                return errno(libc::EINVAL);
            }
            (inode.size, inode.content)
        };
        let mut at = offset;
        while at < size {
            // Past the stored content lie only zeros: a hole to the end.
            let run = match self.reader.run_at(&content, at)? {
                Some(run) => run,
                None => fincrypt_blockstore::Run {
                    hole: true,
                    end: size,
                },
            };
            if run.hole == hole {
                return Ok(at);
            }
            at = run.end.min(size);
        }
        if hole && offset < size {
            return Ok(size);
        }
        errno(libc::ENXIO)
    }

    /// Writes `data` at `offset`; returns the bytes written.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize, FsError> {
        writable(ino)?;
        offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        let st = self.state(ino);
        let mut st = lock(&st);
        if st.dirty.is_none() {
            let inode = self.meta.inode(ino)?;
            if inode.kind != Kind::File {
                return errno(libc::EINVAL);
            }
            st.dirty = Some(Dirty::new(inode.content, inode.size));
        }
        let held = {
            let d = st.dirty.as_mut().ok_or(FsError::Errno(libc::EIO))?;
            let before = d.held();
            d.write(offset, data);
            self.account(before, d.held());
            d.held()
        };
        if held > FILE_DIRTY_MAX || self.dirty_total.load(Ordering::Relaxed) > TOTAL_DIRTY_MAX {
            self.seal_in_background(ino, &mut st)?;
        }
        Ok(data.len())
    }

    fn account(&self, before: usize, after: usize) {
        if after >= before {
            self.dirty_total
                .fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.dirty_total
                .fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Seals the file's writes into blocks and records them (not yet durably).
    pub fn flush(&self, ino: u64) -> Result<(), FsError> {
        if is_snapshot_ino(ino) {
            return Ok(());
        }
        let Some(st) = lock(&self.files).get(&ino).cloned() else {
            return Ok(());
        };
        let mut st = lock(&st);
        self.seal_locked(ino, &mut st, false)
    }

    /// Makes the file's data and all metadata so far durable.
    pub fn fsync(&self, ino: u64) -> Result<(), FsError> {
        let st = lock(&self.files).get(&ino).cloned();
        match st {
            Some(st) => {
                let mut st = lock(&st);
                self.seal_locked(ino, &mut st, true)
            }
            None => self.sync_meta(),
        }
    }

    /// Makes every metadata change so far durable; nothing to do (no
    /// fsync) when nothing was committed since it last did.
    pub fn sync_meta(&self) -> Result<(), FsError> {
        if self.meta.generation() == self.synced.load(Ordering::Acquire) {
            return Ok(());
        }
        let txn = self.meta.write()?;
        // No other commit can come between: the open transaction keeps
        // them out, so the generation after this commit is one more.
        let before = self.meta.generation();
        self.commit_durably(txn)?;
        self.synced.store(before.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Commits `txn` durably, after making the blocks it may name durable.
    pub fn commit_durably(&self, txn: crate::meta::WriteTxn<'_>) -> Result<(), FsError> {
        commit_durably(&*self.store, txn)
    }

    /// Seals every file's writes and makes everything durable.
    pub fn sync_all(&self) -> Result<(), FsError> {
        let all: Vec<(u64, Arc<Mutex<FileState>>)> = lock(&self.files)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (ino, st) in all {
            let mut st = lock(&st);
            self.seal_locked(ino, &mut st, false)?;
        }
        self.sync_meta()
    }

    fn seal_locked(&self, ino: u64, st: &mut FileState, durable: bool) -> Result<(), FsError> {
        self.settle(st)?;
        let Some(d) = &st.dirty else {
            return if durable { self.sync_meta() } else { Ok(()) };
        };
        self.sealer().seal(ino, d, durable, false)?;
        if let Some(d) = st.dirty.take() {
            self.dirty_total.fetch_sub(d.held(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Hands the file's writes to a background sealer and lets new writes
    /// collect over them, after the previous job of this file is settled:
    /// the writer fills one buffer while the other is chunked and sealed.
    fn seal_in_background(&self, ino: u64, st: &mut FileState) -> Result<(), FsError> {
        self.settle(st)?;
        let Some(d) = st.dirty.take_if(|d| !d.is_clean()) else {
            return Ok(());
        };
        // A full buffer of a stream is sealed up to its last cut; the rest
        // goes on with the next, so no piece re-reads the one before.
        let at_cut = d.held() > FILE_DIRTY_MAX / 2 && d.written_to_end();
        let job = SealJob::new(d);
        st.dirty = Some(Dirty::over(job.clone()));
        let (sealer, total) = (self.sealer(), self.dirty_total.clone());
        let task: SealTask = Box::new(move || {
            // Whatever happens, the job gets an outcome: a waiter never hangs.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sealer.seal(ino, &job.dirty, false, at_cut)
            }))
            .unwrap_or(Err(FsError::Errno(libc::EIO)))
            .and_then(|c| c.ok_or(FsError::Errno(libc::EIO)));
            total.fetch_sub(job.dirty.held(), Ordering::Relaxed);
            job.finish(outcome);
        });
        if let Err(refused) = self.seal_queue().send(task) {
            // No sealing thread to be had: seal here, as if synchronously.
            (refused.0)();
        }
        Ok(())
    }

    /// The queue of the thread that seals full buffers, started on first use.
    /// One thread is enough: each seal spreads its chunks over the rayon pool.
    fn seal_queue(&self) -> &mpsc::Sender<SealTask> {
        self.seal_queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SealTask>();
            let _ = std::thread::Builder::new()
                .name("fincrypt-seal".into())
                .spawn(move || rx.into_iter().for_each(|task| task()));
            tx
        })
    }

    /// Waits for the background seal the file's writes lie over, if any, and
    /// lays them over its committed tree. If it failed, its writes are
    /// folded back into the file's, to be sealed again, and its error returned.
    fn settle(&self, st: &mut FileState) -> Result<(), FsError> {
        let Some(job) = st.dirty.as_ref().and_then(|d| d.sealing()).cloned() else {
            return Ok(());
        };
        let outcome = job.wait();
        let Some(d) = st.dirty.take() else {
            return outcome.map(drop);
        };
        match outcome {
            Ok((sealed, at_cut)) => {
                let mut d = d;
                let before = d.held();
                let rebased = d.rebase(sealed, at_cut, &job.dirty, &self.reader);
                self.account(before, d.held());
                st.dirty = Some(d);
                rebased
            }
            Err(e) => {
                let before = d.held();
                let merged = d.fold_into(job.dirty.clone());
                self.account(before, merged.held());
                st.dirty = Some(merged);
                Err(e)
            }
        }
    }

    fn sealer(&self) -> Sealer {
        Sealer {
            meta: self.meta.clone(),
            store: self.store.clone(),
            reader: self.reader.clone(),
            keys: self.keys.clone(),
            params: self.params,
            gc_gate: self.gc_gate.clone(),
        }
    }

    /// Up to `limit` entries of directory `ino` from cookie `offset`: (next cookie, entry).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Dirent)>, FsError> {
        if is_snapshot_ino(ino) {
            return self.snapdir.readdir(self, ino, offset);
        }
        let dir = self.meta.inode(ino)?;
        if dir.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        let mut out = dot_entries(ino, parent_of(&dir), offset);
        for (cookie, d) in self.meta.list(ino, offset, limit)? {
            out.push((cookie + 1, d));
        }
        Ok(out)
    }

    /// Sets an extended attribute; `create`/`replace` as XATTR_CREATE/XATTR_REPLACE.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> Result<(), FsError> {
        if name.is_empty() || name.len() > NAME_MAX {
            return errno(libc::ERANGE);
        }
        if value.len() > XATTR_SIZE_MAX {
            return errno(libc::E2BIG);
        }
        writable(ino)?;
        let mut txn = self.meta.write()?;
        let mut inode = txn.inode(ino)?;
        if name == REDUNDANCY_XATTR {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.trim().parse::<u8>().ok());
            match n {
                Some(n) if n >= 1 => {
                    if inode.redundancy != Some(n) {
                        txn.note_redundancy_change()?;
                    }
                    inode.redundancy = Some(n)
                }
                _ => return errno(libc::EINVAL),
            }
        } else {
            let exists = inode.xattrs.contains_key(name);
            if create && exists {
                return errno(libc::EEXIST);
            }
            if replace && !exists {
                return errno(libc::ENODATA);
            }
            inode.xattrs.insert(name.to_vec(), value.to_vec());
        }
        inode.ctime = Time::now();
        txn.put_inode(ino, &inode)?;
        txn.commit(false)
    }

    /// An extended attribute's value.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        if is_snapshot_ino(ino) {
            return self
                .snapdir
                .xattrs(ino)?
                .remove(name)
                .ok_or(FsError::Errno(libc::ENODATA));
        }
        let inode = self.meta.inode(ino)?;
        if name == REDUNDANCY_XATTR {
            return match inode.redundancy {
                Some(n) => Ok(n.to_string().into_bytes()),
                None => errno(libc::ENODATA),
            };
        }
        inode
            .xattrs
            .get(name)
            .cloned()
            .ok_or(FsError::Errno(libc::ENODATA))
    }

    /// Names of the extended attributes, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        if is_snapshot_ino(ino) {
            for name in self.snapdir.xattrs(ino)?.keys() {
                out.extend_from_slice(name);
                out.push(0);
            }
            return Ok(out);
        }
        let inode = self.meta.inode(ino)?;
        for name in inode.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        if inode.redundancy.is_some() {
            out.extend_from_slice(REDUNDANCY_XATTR);
            out.push(0);
        }
        Ok(out)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<(), FsError> {
        writable(ino)?;
        let mut txn = self.meta.write()?;
        let mut inode = txn.inode(ino)?;
        let removed = if name == REDUNDANCY_XATTR {
            let had = inode.redundancy.take().is_some();
            if had {
                txn.note_redundancy_change()?;
            }
            had
        } else {
            inode.xattrs.remove(name).is_some()
        };
        if !removed {
            return errno(libc::ENODATA);
        }
        inode.ctime = Time::now();
        txn.put_inode(ino, &inode)?;
        txn.commit(false)
    }

    /// Allocates, extends, or punches a hole (fallocate(2) modes).
    pub fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), FsError> {
        const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(KEEP_SIZE | PUNCH | ZERO) != 0 || (mode & PUNCH != 0 && mode & KEEP_SIZE == 0) {
            return errno(libc::EOPNOTSUPP);
        }
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or(FsError::Errno(libc::EFBIG))?;
        writable(ino)?;
        let st = self.state(ino);
        let mut st = lock(&st);
        if st.dirty.is_none() {
            let inode = self.meta.inode(ino)?;
            if inode.kind != Kind::File {
                return errno(libc::ENODEV);
            }
            st.dirty = Some(Dirty::new(inode.content, inode.size));
        }
        let d = st.dirty.as_mut().ok_or(FsError::Errno(libc::EIO))?;
        // A plain allocation promises room for the bytes it adds: programs
        // call it to learn the space is there. Blocks are written only when
        // data is, so nothing is reserved, but an allocation the disk cannot
        // hold now fails as it would on any filesystem.
        // Zeroing a range past the end allocates it too.
        if mode & PUNCH == 0 {
            let adds = end.saturating_sub(d.size);
            if adds > 0 {
                let disk = self.statfs()?;
                let free = (disk.f_bavail as u64).saturating_mul(disk.f_frsize as u64);
                if adds > free {
                    return errno(libc::ENOSPC);
                }
            }
        }
        let before = d.held();
        if mode & (PUNCH | ZERO) != 0 {
            d.zero(offset, len);
        }
        if mode & KEEP_SIZE == 0 && end > d.size {
            d.truncate(end);
        }
        self.account(before, d.held());
        Ok(())
    }

    /// Copies up to `len` bytes between files (copy_file_range); returns the bytes copied.
    pub fn copy_range(
        &self,
        from: u64,
        from_off: u64,
        to: u64,
        to_off: u64,
        len: u64,
    ) -> Result<u64, FsError> {
        // One call copies at most 1 GiB; callers loop, as with any short copy.
        let len = len.min(1 << 30);
        let mut done = 0u64;
        while done < len {
            let step = (len - done).min(8 << 20) as u32;
            let data = self.read(from, from_off + done, step)?;
            if data.is_empty() {
                break;
            }
            self.write(to, to_off + done, &data)?;
            done += data.len() as u64;
        }
        Ok(done)
    }

    /// Space figures of the disk that holds the volume.
    pub fn statfs(&self) -> Result<libc::statvfs, FsError> {
        let path = std::ffi::CString::new(self.disk.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Errno(libc::EINVAL))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid C string and `st` a valid out-pointer.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        if rc != 0 {
            return errno(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            );
        }
        Ok(st)
    }

    /// Runs `take_mark` while no file is between sealing its blocks and
    /// committing them, so every block put before the mark is referenced by
    /// metadata committed before it.
    pub fn with_sealing_paused<T>(&self, take_mark: impl FnOnce() -> T) -> T {
        let _gate = self.gc_gate.write().unwrap_or_else(|p| p.into_inner());
        take_mark()
    }

    /// Bytes written but not yet sealed into blocks.
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_total.load(Ordering::Relaxed)
    }
}

/// The "." and ".." entries a listing from `offset` still has to return,
/// with the cookies (1 and 2) that follow them.
pub fn dot_entries(ino: u64, parent: u64, offset: u64) -> Vec<(u64, Dirent)> {
    [(1, &b"."[..], ino), (2, &b".."[..], parent)]
        .into_iter()
        .filter(|(cookie, _, _)| offset < *cookie)
        .map(|(cookie, name, ino)| {
            (
                cookie,
                Dirent {
                    name: name.to_vec(),
                    ino,
                    kind: Kind::Dir,
                },
            )
        })
        .collect()
}

/// The parent of a directory, kept in its `target` field.
pub fn parent_of(dir: &Inode) -> u64 {
    dir.target
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(ROOT_INO)
}

/// Snapshots are read-only.
fn writable(ino: u64) -> Result<(), FsError> {
    if is_snapshot_ino(ino) {
        errno(libc::EROFS)
    } else {
        Ok(())
    }
}

/// A name about to be created in `parent`: valid, writable, and not `.snapshots` in the root.
/// Directory `parent`, still linked: `ENOTDIR` or `ENOENT` otherwise.
fn live_dir(txn: &crate::meta::WriteTxn<'_>, parent: u64) -> Result<Inode, FsError> {
    let dir = txn.inode(parent)?;
    if dir.kind != Kind::Dir {
        return errno(libc::ENOTDIR);
    }
    if dir.nlink == 0 {
        return errno(libc::ENOENT);
    }
    Ok(dir)
}

fn check_new_name(parent: u64, name: &[u8]) -> Result<(), FsError> {
    check_name_in(parent, name, libc::EEXIST)
}

/// A name about to be removed or moved from `parent`; `.snapshots` cannot be.
fn check_existing_name(parent: u64, name: &[u8]) -> Result<(), FsError> {
    check_name_in(parent, name, libc::EBUSY)
}

/// A valid name in a writable directory; `reserved` is the errno for `.snapshots` in the root.
fn check_name_in(parent: u64, name: &[u8], reserved: i32) -> Result<(), FsError> {
    check_name(name)?;
    writable(parent)?;
    if parent == ROOT_INO && name == SNAPSHOTS_NAME {
        return errno(reserved);
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_MAX {
        return errno(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') {
        return errno(libc::EINVAL);
    }
    Ok(())
}
