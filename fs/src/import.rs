//! Copying a directory from outside the filesystem into it, and keeping the
//! copy up to date: the ground of watched folders (issue 18).
//!
//! [`sync_dir`] walks a source directory and makes a directory of the
//! filesystem the same: directories, regular files (read and sealed on one
//! thread per core while the walk goes on, [`Fossil::seal_import`], then
//! named a batch at a time in one commit, [`Fossil::commit_imports`], so a
//! file changes in one commit), symlinks as symlinks, and hard links within
//! the tree as hard links. What the source no longer has is removed. A
//! file whose (inode, size, mtime, ctime) are
//! those recorded when it was last imported ([`Stamps`]) is neither read nor
//! hashed, as restic does with its parent snapshot. A file that changes
//! while it is read is read again, and after [`TRIES`] tries reported: its
//! previous version stays. Sockets, FIFOs and devices are skipped, each named
//! in the report, and so is whatever cannot be read.
//!
//! Extended attributes of files and directories are kept (not those of
//! symlinks, nor the redundancy attribute, which is this filesystem's own).
//! The caller keeps the stamps across runs (and restarts): [`Stamps`] says
//! which changed since it last asked.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use crate::error::FsError;
use crate::fossil::{
    Caller, Fossil, ImportGate, Imported, REDUNDANCY_XATTR, Sealed, SetAttr, SetTime,
};
use crate::meta::{Kind, Time};

/// Reads of a file that keeps changing before it is reported.
pub const TRIES: u32 = 3;

/// What a source file was when it was last imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// Stamps of the files imported, by path relative to the source, with the
/// paths whose stamp changed since [`Stamps::take_changed`]; and stamps of
/// the directories whose copy lists exactly their entries (see
/// [`Stamps::from_kept`] for how the two are told apart when kept).
#[derive(Clone, Debug, Default)]
pub struct Stamps {
    /// Hashed, not ordered: a rescan looks every file up, and ordered
    /// paths compare component by component (a tenth of a rescan's time).
    map: HashMap<PathBuf, Stamp>,
    changed: HashSet<PathBuf>,
    /// A directory's stamp as it was when its copy was last made to hold
    /// exactly its entries: while the stamp is the same, no entry was
    /// added, removed or renamed, and the copy's listing need not be read.
    dirs: HashMap<PathBuf, Stamp>,
    changed_dirs: HashSet<PathBuf>,
    /// Sum of the sizes in `map`, kept as it changes.
    bytes: u64,
}

impl Stamps {
    pub fn new() -> Stamps {
        Stamps::default()
    }

    /// Stamps as they were kept (as [`Stamps::take_changed`] gave them),
    /// none of them changed: a path whose bytes end in `/` is a
    /// directory's (the folder itself is `/`), any other a file's.
    pub fn from_kept(kept: impl IntoIterator<Item = (PathBuf, Stamp)>) -> Stamps {
        let mut map = HashMap::new();
        let mut dirs = HashMap::new();
        for (p, s) in kept {
            match p.as_os_str().as_bytes().strip_suffix(b"/") {
                Some(dir) => dirs.insert(PathBuf::from(OsStr::from_bytes(dir)), s),
                None => map.insert(p, s),
            };
        }
        let bytes = map.values().map(|s| s.size).fold(0, u64::saturating_add);
        Stamps {
            map,
            changed: HashSet::new(),
            dirs,
            changed_dirs: HashSet::new(),
            bytes,
        }
    }

    /// The stamp of directory `rel` when its copy last held exactly its
    /// entries.
    fn dir(&self, rel: &Path) -> Option<&Stamp> {
        self.dirs.get(rel)
    }

    fn insert_dir(&mut self, rel: &Path, stamp: Stamp) {
        if self.dirs.get(rel) != Some(&stamp) {
            self.dirs.insert(rel.to_path_buf(), stamp);
            self.changed_dirs.insert(rel.to_path_buf());
        }
    }

    fn forget_dir(&mut self, rel: &Path) {
        if self.dirs.remove(rel).is_some() {
            self.changed_dirs.insert(rel.to_path_buf());
        }
    }

    pub fn get(&self, rel: &Path) -> Option<&Stamp> {
        self.map.get(rel)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Files (names) and bytes stamped.
    pub fn totals(&self) -> (u64, u64) {
        (self.map.len() as u64, self.bytes)
    }

    fn insert(&mut self, rel: &Path, stamp: Stamp) {
        if self.map.get(rel) != Some(&stamp) {
            if let Some(old) = self.map.insert(rel.to_path_buf(), stamp) {
                self.bytes = self.bytes.saturating_sub(old.size);
            }
            self.bytes = self.bytes.saturating_add(stamp.size);
            self.changed.insert(rel.to_path_buf());
        }
    }

    /// Forgets the stamp of `rel` (it is read again next time), kept
    /// forgotten until [`Stamps::take_changed`]; `rel` as that gives it (a
    /// directory's with `/` after it).
    pub fn forget(&mut self, rel: &Path) {
        if let Some(dir) = rel.as_os_str().as_bytes().strip_suffix(b"/") {
            self.forget_dir(Path::new(OsStr::from_bytes(dir)));
            return;
        }
        if let Some(old) = self.map.remove(rel) {
            self.bytes = self.bytes.saturating_sub(old.size);
            self.changed.insert(rel.to_path_buf());
        }
    }

    /// Forgets `rel` and every path under it (a walk of every stamp: a
    /// removed directory is rare beside a looked-up file).
    fn remove_under(&mut self, rel: &Path) {
        if !self.dirs.contains_key(rel) && self.map.contains_key(rel) {
            // A file's: nothing is under it (a directory that was there
            // before it had its own removed with it).
            self.forget(rel);
            return;
        }
        let doomed: Vec<PathBuf> = self
            .map
            .keys()
            .filter(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in doomed {
            self.forget(&p);
        }
        let doomed: Vec<PathBuf> = self
            .dirs
            .keys()
            .filter(|p| p.starts_with(rel))
            .cloned()
            .collect();
        for p in doomed {
            self.forget_dir(&p);
        }
    }

    /// The paths changed since the last call, each with its stamp now
    /// (none: forgotten); a directory's path with `/` after it.
    pub fn take_changed(&mut self) -> Vec<(PathBuf, Option<Stamp>)> {
        let mut out: Vec<(PathBuf, Option<Stamp>)> = std::mem::take(&mut self.changed)
            .into_iter()
            .map(|p| {
                let s = self.map.get(&p).copied();
                (p, s)
            })
            .collect();
        for p in std::mem::take(&mut self.changed_dirs) {
            let s = self.dirs.get(&p).copied();
            let mut key = p.into_os_string().into_vec();
            key.push(b'/');
            out.push((PathBuf::from(std::ffi::OsString::from_vec(key)), s));
        }
        out
    }
}

/// What one [`sync_dir`] did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Files read and written anew (new or changed).
    pub imported: u64,
    /// Bytes read from source files.
    pub bytes_read: u64,
    /// Files left as they were: their stamps had not changed.
    pub unchanged: u64,
    /// Entries removed because the source no longer has them.
    pub removed: u64,
    /// Directories whose copy was listed to compare it with the source:
    /// those whose stamp changed since the copy last held exactly their
    /// entries (the others cost their source listing alone).
    pub listed: u64,
    /// Entries not backed up by design (sockets, FIFOs, devices), and why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Entries that could not be backed up now (unreadable, always
    /// changing), and why; their previous version stays.
    pub errors: Vec<(PathBuf, String)>,
    /// Every directory walked, relative to the source (`""` for itself).
    pub dirs_seen: Vec<PathBuf>,
}

/// The names, inodes and kinds in directory `ino` of `fs`.
pub fn children(fs: &Fossil, ino: u64) -> Result<Vec<(Vec<u8>, u64, Kind)>, FsError> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let page = fs.readdir(ino, offset, 1024)?;
        if page.is_empty() {
            return Ok(out);
        }
        for (cookie, d) in page {
            offset = cookie;
            if d.name != b"." && d.name != b".." {
                out.push((d.name, d.ino, d.kind));
            }
        }
    }
}

/// Removes `name` from directory `dir` of `fs`, with everything under it.
pub fn remove_tree(fs: &Fossil, dir: u64, name: &[u8]) -> Result<(), FsError> {
    let a = fs.lookup(dir, name)?;
    if a.kind == Kind::Dir {
        for (child, _, _) in children(fs, a.ino)? {
            remove_tree(fs, a.ino, &child)?;
        }
        fs.rmdir(dir, name)
    } else {
        fs.unlink(dir, name)
    }
}

/// Makes directory `dst` of `fs` the same as the directory `src`.
pub fn sync_dir(
    fs: &Fossil,
    src: &Path,
    dst: u64,
    stamps: &mut Stamps,
) -> Result<SyncReport, FsError> {
    sync_subdir(fs, src, Path::new(""), dst, stamps, &SyncOptions::default())
}

/// What else a [`sync_subdir`] heeds.
#[derive(Clone, Copy, Default)]
pub struct SyncOptions<'a> {
    /// Absolute paths never backed up (Fincrypt's own home and mount).
    pub exclude: &'a [PathBuf],
    /// Set, the sync stops at the next entry or read with `ECANCELED`
    /// (a file being read is not committed).
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
    /// Told the stamps' [`Stamps::totals`] after each batch of files is
    /// committed, so a long first backup shows how far it is.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// How much older than the walk a directory's times must be for its
    /// stamp to be kept (none: [`DIR_STAMP_SETTLED`]).
    pub dir_stamp_margin: Option<std::time::Duration>,
    /// List every directory's copy, whatever its stamp says (a safety net
    /// now and then: see docs/ARCHITECTURE.md, "Watched folders").
    pub ignore_dir_stamps: bool,
}

/// [`sync_dir`] of the part of `src` under `under` (relative to it), which
/// directory `dst` copies; stamps stay relative to `src`. A hard link whose
/// other names lie outside `under` is copied as a file of its own.
pub fn sync_subdir(
    fs: &Fossil,
    src: &Path,
    under: &Path,
    dst: u64,
    stamps: &mut Stamps,
    options: &SyncOptions<'_>,
) -> Result<SyncReport, FsError> {
    // Normalised (no `//`, no `.`), so that the walk's paths compare with
    // the excluded ones as bytes.
    let src: PathBuf = src.components().collect();
    let exclude: Vec<PathBuf> = options
        .exclude
        .iter()
        .map(|e| e.components().collect())
        .collect();
    // The readers of a batch run while the walk goes on: threads of this
    // scope, so that they may borrow; a return stops them (see `InFlight`).
    std::thread::scope(|scope| {
        let mut run = Run {
            fs,
            src: &src,
            exclude: &exclude,
            cancel: options.cancel,
            progress: options.progress,
            stamps,
            batch: Batch::default(),
            in_flight: None,
            scope,
            links: HashMap::new(),
            report: SyncReport::default(),
            settled_before_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128)
                - options
                    .dir_stamp_margin
                    .unwrap_or(DIR_STAMP_SETTLED)
                    .as_nanos() as i128,
            list_all: options.ignore_dir_stamps,
        };
        run.dir(under, dst, None, false)?;
        run.import()?;
        run.finish()?;
        // The directory itself: filling its copy changed its times, and the
        // folder's own modes and attributes are set by no parent.
        match std::fs::metadata(src.join(under)) {
            Ok(m) if m.is_dir() => run.dir_attrs(under, dst, &m)?,
            Ok(_) => {}
            Err(e) => {
                if !run.report.errors.iter().any(|(p, _)| p == under) {
                    run.report.errors.push((under.to_path_buf(), io_errno(&e)));
                }
            }
        }
        Ok(std::mem::take(&mut run.report))
    })
}

struct Run<'a, 's> {
    fs: &'a Fossil,
    src: &'a Path,
    exclude: &'a [PathBuf],
    cancel: Option<&'a std::sync::atomic::AtomicBool>,
    progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    stamps: &'a mut Stamps,
    /// Files to read, and directories waiting for them.
    batch: Batch,
    /// The batch being read meanwhile.
    in_flight: Option<InFlight>,
    scope: &'s std::thread::Scope<'s, 'a>,
    /// Source files with several links, by (device, inode): the inode of
    /// their copy, once made in this run.
    links: HashMap<(u64, u64), u64>,
    report: SyncReport,
    /// Directory stamps newer than this (nanoseconds since the epoch) are
    /// not kept: the walk's start less the margin.
    settled_before_ns: i128,
    /// Every directory's copy is listed ([`SyncOptions::ignore_dir_stamps`]).
    list_all: bool,
}

/// What the copy has at an entry's name.
#[derive(Clone, Copy)]
enum Have {
    /// As its directory's listing said: the node and its kind, if any.
    Listed(Option<(u64, Kind)>),
    /// Not listed: its directory's stamp says that the copy holds the same
    /// names as the source (looked up if needed).
    Unlisted,
}

/// A directory's stamp is kept only once its times are this much older than
/// the walk that listed it: a change in the same tick of the filesystem's
/// clock could leave them as they were (FAT keeps times to 2 s, a network
/// filesystem's server clock may run a little ahead).
pub const DIR_STAMP_SETTLED: std::time::Duration = std::time::Duration::from_secs(10);

fn time(secs: i64, nanos: i64) -> Time {
    Time {
        secs,
        nanos: u32::try_from(nanos).unwrap_or(0),
    }
}

fn io_errno(e: &std::io::Error) -> String {
    e.to_string()
}

type Xattrs = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// The extended attributes of an open file, or of the node at a path (not
/// followed); none where the filesystem keeps none.
fn xattrs_of(
    list: std::io::Result<xattr::XAttrs>,
    get: impl Fn(&OsStr) -> std::io::Result<Option<Vec<u8>>>,
) -> std::io::Result<Xattrs> {
    let names = match list {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Xattrs::new()),
        Err(e) => return Err(e),
    };
    let mut out = Xattrs::new();
    for name in names {
        if name.as_bytes() == REDUNDANCY_XATTR {
            continue;
        }
        if let Some(v) = get(&name)? {
            out.insert(name.as_bytes().to_vec(), v);
        }
    }
    Ok(out)
}

impl<'a, 's> Run<'a, 's> {
    /// Makes the copy's directory `dst` hold what source directory `rel`
    /// holds; `own` is the source directory's stamp if already read, and
    /// `made` says that `dst` was just made (empty, whatever the stamps
    /// say). Whether the copy needed no change at all (the directory's
    /// attributes included), so that they need not be set again.
    fn dir(
        &mut self,
        rel: &Path,
        dst: u64,
        own: Option<Stamp>,
        made: bool,
    ) -> Result<bool, FsError> {
        let path = self.src.join(rel);
        self.report.dirs_seen.push(rel.to_path_buf());
        // Its stamp before it is listed: a change while it is listed
        // changes the stamp, and the next walk lists the copy again.
        let own = own.or_else(|| std::fs::symlink_metadata(&path).ok().map(|m| Stamp::of(&m)));
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) => {
                self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                self.stamps.forget_dir(rel);
                return Ok(false);
            }
        };
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for e in entries {
            match e {
                Ok(e) => names.push(e.file_name()),
                Err(e) => self.report.errors.push((rel.to_path_buf(), io_errno(&e))),
            }
        }
        names.sort();
        let unlisted =
            !self.list_all && !made && own.is_some() && self.stamps.dir(rel) == own.as_ref();
        let mut clean = unlisted;
        if unlisted {
            // No entry added, removed or renamed since the copy last held
            // exactly these: an unchanged file costs its lstat alone.
            for name in &names {
                clean &= !self.entry(&rel.join(name), name, dst, Have::Unlisted)?;
                if self.batch.full() {
                    self.import()?;
                }
            }
        } else {
            // The copy's entries, listed once.
            self.report.listed += 1;
            let mut have: HashMap<Vec<u8>, (u64, Kind)> = self
                .children(dst)?
                .into_iter()
                .map(|(name, ino, kind)| (name, (ino, kind)))
                .collect();
            for name in &names {
                let now = have.remove(name.as_bytes());
                self.entry(&rel.join(name), name, dst, Have::Listed(now))?;
                if self.batch.full() {
                    self.import()?;
                }
            }
            // What the source no longer has.
            for name in have.into_keys() {
                self.remove(dst, &name, &rel.join(OsStr::from_bytes(&name)))?;
            }
        }
        match own {
            Some(s)
                if s.mtime_ns < self.settled_before_ns && s.ctime_ns < self.settled_before_ns =>
            {
                self.stamps.insert_dir(rel, s)
            }
            _ => self.stamps.forget_dir(rel),
        }
        Ok(clean)
    }

    /// What the copy has at `name` in `dst`.
    fn resolve(&self, dst: u64, name: &[u8], have: Have) -> Result<Option<(u64, Kind)>, FsError> {
        match have {
            Have::Listed(h) => Ok(h),
            Have::Unlisted => match self.fs.lookup(dst, name) {
                Ok(a) => Ok(Some((a.ino, a.kind))),
                Err(FsError::Errno(libc::ENOENT)) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    fn children(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, Kind)>, FsError> {
        children(self.fs, ino)
    }

    /// Removes `name` from `dir`, a directory with all it holds.
    fn remove(&mut self, dir: u64, name: &[u8], rel: &Path) -> Result<(), FsError> {
        remove_tree(self.fs, dir, name)?;
        self.stamps.remove_under(rel);
        self.report.removed += 1;
        Ok(())
    }

    /// Makes the extended attributes of `ino` be `want` (the redundancy
    /// attribute aside).
    fn set_xattrs(&self, ino: u64, want: &Xattrs) -> Result<(), FsError> {
        let listed = self.fs.listxattr(ino)?;
        for name in listed.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if name != REDUNDANCY_XATTR && !want.contains_key(name) {
                self.fs.removexattr(ino, name)?;
            }
        }
        for (name, value) in want {
            if self.fs.getxattr(ino, name).ok().as_ref() != Some(value) {
                self.fs.setxattr(ino, name, value, false, false)?;
            }
        }
        Ok(())
    }

    /// Gives directory `ino` the extended attributes and attributes of the
    /// source directory `rel` (whose metadata is `m`): last, as filling it
    /// changed its times.
    fn dir_attrs(&mut self, rel: &Path, ino: u64, m: &std::fs::Metadata) -> Result<(), FsError> {
        let path = self.src.join(rel);
        match xattrs_of(xattr::list(&path), |n| xattr::get(&path, n)) {
            Ok(want) => self.set_xattrs(ino, &want)?,
            Err(e) => self.report.errors.push((rel.to_path_buf(), io_errno(&e))),
        }
        self.same_attrs(ino, m, true)
    }

    /// Gives `ino` the owner, times and (with `mode`) permissions of `m`;
    /// left alone when nothing differs, so that a rescan of an unchanged
    /// tree writes nothing.
    fn same_attrs(&self, ino: u64, m: &std::fs::Metadata, mode: bool) -> Result<(), FsError> {
        let (atime, mtime) = (
            time(m.atime(), m.atime_nsec()),
            time(m.mtime(), m.mtime_nsec()),
        );
        let now = self.fs.getattr(ino)?;
        let perm = if mode {
            (m.mode() & 0o7777) as u16
        } else {
            now.perm
        };
        if (now.perm, now.uid, now.gid, now.atime, now.mtime)
            != (perm, m.uid(), m.gid(), atime, mtime)
        {
            self.fs.setattr(
                ino,
                SetAttr {
                    mode: mode.then_some(u32::from(perm)),
                    uid: Some(m.uid()),
                    gid: Some(m.gid()),
                    atime: Some(SetTime::At(atime)),
                    mtime: Some(SetTime::At(mtime)),
                    ..SetAttr::default()
                },
            )?;
        }
        Ok(())
    }

    /// Copies source entry `rel` as `name` into `dst`, where `have` is
    /// what the copy has at that name now. Whether the copy of `dst` changed
    /// for it (an entry made, replaced or removed, or a file's content to be
    /// read).
    fn entry(&mut self, rel: &Path, name: &OsStr, dst: u64, have: Have) -> Result<bool, FsError> {
        if cancelled(self.cancel) {
            return Err(FsError::Errno(libc::ECANCELED));
        }
        let path = self.src.join(rel);
        let name_bytes = name.as_bytes();
        // (Compared as bytes: both sides are normalised, and comparing
        // paths component by component costs more than the lstat.)
        if self
            .exclude
            .iter()
            .any(|e| e.as_os_str().as_bytes() == path.as_os_str().as_bytes())
        {
            // As if it were not there: a copy made before it was excluded goes.
            let had = self.resolve(dst, name_bytes, have)?.is_some();
            if had {
                self.remove(dst, name_bytes, rel)?;
            }
            self.report.skipped.push((
                rel.to_path_buf(),
                "Fincrypt's own data (its home or mount) is not backed up".into(),
            ));
            return Ok(had);
        }
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                return Ok(false);
            }
        };
        let t = m.file_type();
        let owner = Caller {
            uid: m.uid(),
            gid: m.gid(),
        };
        if t.is_dir() {
            let (ino, made) = match self.resolve(dst, name_bytes, have)? {
                Some((ino, Kind::Dir)) => (ino, false),
                other => {
                    if other.is_some() {
                        self.remove(dst, name_bytes, rel)?;
                    }
                    let ino = self
                        .fs
                        .mknod(dst, name_bytes, Kind::Dir, 0o700, 0, None, owner)?
                        .ino;
                    (ino, true)
                }
            };
            let clean = self.dir(rel, ino, Some(Stamp::of(&m)), made)?;
            // After its files are named: naming them changes its times.
            // (Nothing to do when neither it nor its copy changed.)
            if !clean {
                if self.batch.files.is_empty() && self.in_flight.is_none() {
                    self.dir_attrs(rel, ino, &m)?;
                } else {
                    self.batch.dirs.push((rel.to_path_buf(), ino, m));
                }
            }
            self.report.dirs += 1;
            Ok(made)
        } else if t.is_symlink() {
            let target = match std::fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                    return Ok(false);
                }
            };
            let target = target.as_os_str().as_bytes();
            let have = self.resolve(dst, name_bytes, have)?;
            let same = match have {
                Some((ino, Kind::Symlink)) => self.fs.readlink(ino)? == target,
                _ => false,
            };
            let ino = match (same, have) {
                (true, Some((ino, _))) => ino,
                _ => {
                    if have.is_some() {
                        self.remove(dst, name_bytes, rel)?;
                    }
                    self.fs
                        .mknod(
                            dst,
                            name_bytes,
                            Kind::Symlink,
                            0o777,
                            0,
                            Some(target),
                            owner,
                        )?
                        .ino
                }
            };
            self.same_attrs(ino, &m, false)?;
            self.report.symlinks += 1;
            Ok(!same)
        } else if t.is_file() {
            let changed = self.file(rel, name_bytes, dst, &m, have)?;
            self.report.files += 1;
            Ok(changed)
        } else {
            let what = if t.is_socket() {
                "a socket"
            } else if t.is_fifo() {
                "a FIFO"
            } else {
                "a device"
            };
            self.report
                .skipped
                .push((rel.to_path_buf(), format!("{what} is not backed up")));
            Ok(false)
        }
    }

    /// Copies regular file `rel`: at once when it has other names (so
    /// that they can link to its copy), else in the batch. Whether the copy
    /// changed (see [`Run::entry`]).
    fn file(
        &mut self,
        rel: &Path,
        name: &[u8],
        dst: u64,
        m: &std::fs::Metadata,
        have: Have,
    ) -> Result<bool, FsError> {
        let key = (m.dev(), m.ino());
        // A second name of a file already copied in this run: a link to it.
        if m.nlink() > 1
            && let Some(&ino) = self.links.get(&key)
        {
            let have = self.resolve(dst, name, have)?;
            let relinked = have.map(|(i, _)| i) != Some(ino);
            if relinked {
                if have.is_some() {
                    self.remove(dst, name, rel)?;
                }
                self.fs.link(ino, dst, name)?;
            }
            self.stamps.insert(rel, Stamp::of(m));
            self.report.unchanged += 1;
            return Ok(relinked);
        }
        let stamped = self.stamps.get(rel) == Some(&Stamp::of(m));
        if stamped && m.nlink() == 1 && matches!(have, Have::Unlisted) {
            // Its directory's stamp vouches that the copy has it, and its
            // own that the copy is of this content.
            self.report.unchanged += 1;
            return Ok(false);
        }
        let have = self.resolve(dst, name, have)?;
        if let Some((ino, Kind::File)) = have
            && stamped
        {
            if m.nlink() > 1 {
                self.links.insert(key, ino);
            }
            self.report.unchanged += 1;
            return Ok(false);
        }
        if let Some((_, kind)) = have
            && kind != Kind::File
        {
            self.remove(dst, name, rel)?;
        }
        let pending = Pending {
            rel: rel.to_path_buf(),
            parent: dst,
            name: name.to_vec(),
            link: (m.nlink() > 1).then_some(key),
        };
        let alone = pending.link.is_some();
        self.batch.push(pending, m.size());
        if alone {
            // Named before the walk goes on, so that its other names link to it.
            self.import()?;
            self.finish()?;
        }
        Ok(true)
    }

    /// Names the batch in flight, if any, and starts reading this one
    /// (one thread per core) while the walk goes on.
    fn import(&mut self) -> Result<(), FsError> {
        self.finish()?;
        let Batch { files, dirs, .. } = std::mem::take(&mut self.batch);
        if files.is_empty() {
            for (rel, ino, m) in dirs {
                self.dir_attrs(&rel, ino, &m)?;
            }
            return Ok(());
        }
        // Asked once: each time reads the cgroup's files.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cores =
            *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |c| c.get()));
        let paths: Arc<Vec<PathBuf>> =
            Arc::new(files.iter().map(|p| self.src.join(&p.rel)).collect());
        let next = Arc::new(AtomicUsize::new(0));
        let (results, read) = mpsc::channel();
        let mut release = Vec::new();
        for _ in 0..cores.min(files.len()) {
            let (fs, cancel) = (self.fs, self.cancel);
            let (paths, next, results) = (paths.clone(), next.clone(), results.clone());
            let (done, wait) = mpsc::channel::<()>();
            release.push(done);
            self.scope.spawn(move || {
                // Held until the batch is named (or given up): GC must not
                // sweep blocks nothing names yet.
                let gate = fs.import_gate();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(i) else { break };
                    if results
                        .send((i, seal_stable(fs, &gate, path, cancel)))
                        .is_err()
                    {
                        break;
                    }
                }
                // Let the results end once every reader is done (or has
                // panicked), then wait for the walker to drop the other end
                // of `wait`, once it has named them.
                drop(results);
                let _ = wait.recv();
            });
        }
        self.in_flight = Some(InFlight {
            files,
            dirs,
            read,
            release,
        });
        Ok(())
    }

    /// Waits for the batch in flight to be read, names its files in one
    /// commit, then gives the directories it completed their attributes.
    fn finish(&mut self) -> Result<(), FsError> {
        let Some(InFlight {
            files,
            dirs,
            read,
            release,
        }) = self.in_flight.take()
        else {
            return Ok(());
        };
        let mut got: Vec<Option<(Outcome, u64)>> = files.iter().map(|_| None).collect();
        for _ in 0..files.len() {
            // A reader that panicked ends the channel early; the scope
            // passes its panic on.
            let Ok((i, r)) = read.recv() else { break };
            if let Some(slot) = got.get_mut(i) {
                *slot = Some(r);
            }
        }
        let mut sealed = Vec::new();
        let mut which = Vec::new();
        let mut failed = None;
        for (p, r) in files.iter().zip(got) {
            let Some((outcome, bytes)) = r else {
                failed.get_or_insert(FsError::Meta("a reader thread stopped".into()));
                continue;
            };
            self.report.bytes_read += bytes;
            match outcome {
                Outcome::Sealed(s, attrs, stamp) => {
                    sealed.push((p.parent, p.name.as_slice(), s, attrs));
                    which.push((p, stamp));
                }
                Outcome::Unreadable(why) => self.report.errors.push((p.rel.clone(), why)),
                Outcome::Failed(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let named: Vec<(u64, &[u8], &Sealed, &Imported)> =
            sealed.iter().map(|(d, n, s, a)| (*d, *n, s, a)).collect();
        let done = if named.is_empty() {
            Vec::new()
        } else {
            self.fs.commit_imports(&named)?
        };
        // Named: the readers may let GC in.
        drop(release);
        for ((p, stamp), result) in which.into_iter().zip(done) {
            match result {
                Ok(a) => {
                    self.stamps.insert(&p.rel, stamp);
                    if let Some(key) = p.link {
                        self.links.insert(key, a.ino);
                    }
                    self.report.imported += 1;
                }
                Err(FsError::Errno(e)) => {
                    let e = std::io::Error::from_raw_os_error(e);
                    self.report.errors.push((p.rel.clone(), e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        for (rel, ino, m) in dirs {
            self.dir_attrs(&rel, ino, &m)?;
        }
        if let Some(progress) = self.progress {
            let (files, bytes) = self.stamps.totals();
            progress(files, bytes);
        }
        Ok(())
    }
}

/// A batch whose files are being read by threads of the sync's scope,
/// each holding an [`ImportGate`] until `release` is dropped: after the
/// commit that names the files, or when the sync returns early.
struct InFlight {
    files: Vec<Pending>,
    dirs: Vec<(PathBuf, u64, std::fs::Metadata)>,
    read: mpsc::Receiver<(usize, (Outcome, u64))>,
    release: Vec<mpsc::Sender<()>>,
}

/// Files to import together, from any directories, at most
/// [`BATCH_FILES`] or about [`BATCH_BYTES`] (GC waits while a batch is
/// sealed), and the directories whose attributes wait for them.
#[derive(Default)]
struct Batch {
    files: Vec<Pending>,
    bytes: u64,
    /// Directories walked whose files are in `files`, children first:
    /// their modes, times and attributes are set once those are named.
    dirs: Vec<(PathBuf, u64, std::fs::Metadata)>,
}

/// Files imported in one commit, at most.
const BATCH_FILES: usize = 256;
/// Bytes a batch stops taking more files at.
const BATCH_BYTES: u64 = 64 << 20;

impl Batch {
    fn push(&mut self, p: Pending, size: u64) {
        self.files.push(p);
        self.bytes = self.bytes.saturating_add(size);
    }

    fn full(&self) -> bool {
        self.files.len() >= BATCH_FILES || self.bytes >= BATCH_BYTES
    }
}

/// A source file to import: where it is, where and by what name it goes
/// in the copy, and its (device, inode) when it has other names.
struct Pending {
    rel: PathBuf,
    /// The directory of the copy it goes into.
    parent: u64,
    name: Vec<u8>,
    link: Option<(u64, u64)>,
}

/// What reading a source file came to.
enum Outcome {
    /// Stored, with the attributes and stamp it had while read.
    Sealed(Sealed, Imported, Stamp),
    /// Not read (the reason goes in the report); its previous copy stays.
    Unreadable(String),
    /// Cancelled, or the filesystem failed: the sync stops.
    Failed(FsError),
}

/// Reads the file at `path` into blocks, again if it changed while read,
/// up to [`TRIES`] times; with the bytes read.
fn seal_stable(
    fs: &Fossil,
    gate: &ImportGate<'_>,
    path: &Path,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> (Outcome, u64) {
    let mut read = 0;
    let mut last = String::new();
    for _ in 0..TRIES {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => return (Outcome::Unreadable(io_errno(&e)), read),
        };
        let before = match file.metadata() {
            Ok(b) => b,
            Err(e) => return (Outcome::Unreadable(io_errno(&e)), read),
        };
        use xattr::FileExt;
        let xattrs = match xattrs_of(file.list_xattr(), |n| file.get_xattr(n)) {
            Ok(x) => x,
            Err(e) => return (Outcome::Unreadable(io_errno(&e)), read),
        };
        let attrs = Imported {
            perm: (before.mode() & 0o7777) as u16,
            uid: before.uid(),
            gid: before.gid(),
            atime: time(before.atime(), before.atime_nsec()),
            mtime: time(before.mtime(), before.mtime_nsec()),
            xattrs,
        };
        let mut reader = Stable {
            file,
            before: Stamp::of(&before),
            read: 0,
            cancel,
        };
        let result = fs.seal_import(gate, &mut reader);
        read += reader.read;
        match result {
            Ok(s) => return (Outcome::Sealed(s, attrs, reader.before), read),
            Err(FsError::Errno(libc::EAGAIN)) => {
                last = "it changed while it was read".into();
            }
            Err(e @ FsError::Errno(libc::ECANCELED)) => return (Outcome::Failed(e), read),
            Err(FsError::Errno(e)) => {
                let e = std::io::Error::from_raw_os_error(e);
                return (Outcome::Unreadable(e.to_string()), read);
            }
            Err(e) => return (Outcome::Failed(e), read),
        }
    }
    (
        Outcome::Unreadable(format!("{last} {TRIES} times; the previous version stays")),
        read,
    )
}

/// A source file read to its end that fails with `EAGAIN` at the end if it
/// changed meanwhile, so that no torn version is committed.
struct Stable<'a> {
    file: std::fs::File,
    before: Stamp,
    read: u64,
    cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

fn cancelled(cancel: Option<&std::sync::atomic::AtomicBool>) -> bool {
    cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
}

impl Read for Stable<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if cancelled(self.cancel) {
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
        let n = self.file.read(buf)?;
        self.read += n as u64;
        if n == 0 {
            let now = Stamp::of(&self.file.metadata()?);
            if now != self.before || self.read != self.before.size {
                return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, size: u64) -> Stamp {
        Stamp {
            ino,
            size,
            mtime_ns: 0,
            ctime_ns: 0,
        }
    }

    #[test]
    fn the_totals_follow_every_change_of_the_stamps() {
        let mut s = Stamps::from_kept([
            (PathBuf::from("a"), stamp(1, 10)),
            (PathBuf::from("d/x"), stamp(2, 20)),
            (PathBuf::from("d/y"), stamp(3, 30)),
        ]);
        assert_eq!(s.totals(), (3, 60));
        s.insert(Path::new("a"), stamp(1, 15));
        s.insert(Path::new("b"), stamp(4, 5));
        assert_eq!(s.totals(), (4, 70));
        s.forget(Path::new("b"));
        s.forget(Path::new("nowhere"));
        assert_eq!(s.totals(), (3, 65));
        s.remove_under(Path::new("d"));
        assert_eq!(s.totals(), (1, 15));
        let recomputed: u64 = s.map.values().map(|v| v.size).sum();
        assert_eq!(s.totals().1, recomputed);
    }
}
