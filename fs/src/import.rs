//! Copying a directory from outside the filesystem into it, and keeping the
//! copy up to date: the ground of watched folders (issue 18).
//!
//! [`sync_dir`] walks a source directory and makes a directory of the
//! filesystem the same: directories, regular files (through
//! [`Fossil::import_file`], so a file changes in one commit), symlinks as
//! symlinks, and hard links within the tree as hard links. What the source
//! no longer has is removed. A file whose (inode, size, mtime, ctime) are
//! those recorded when it was last imported ([`Stamps`]) is neither read nor
//! hashed, as restic does with its parent snapshot. A file that changes
//! while it is read is read again, and after [`TRIES`] tries reported: its
//! previous version stays. Sockets, FIFOs and devices are skipped, each named
//! in the report, and so is whatever cannot be read.
//!
//! Extended attributes of files and directories are kept (not those of
//! symlinks, nor the redundancy attribute, which is this filesystem's own).
//! Not yet: the stamps kept across restarts (the caller holds them).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::FsError;
use crate::fossil::{Caller, Fossil, Imported, REDUNDANCY_XATTR, SetAttr, SetTime};
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

/// Stamps of the files imported, by path relative to the source.
pub type Stamps = HashMap<PathBuf, Stamp>;

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
    /// Entries not backed up by design (sockets, FIFOs, devices), and why.
    pub skipped: Vec<(PathBuf, String)>,
    /// Entries that could not be backed up now (unreadable, always
    /// changing), and why; their previous version stays.
    pub errors: Vec<(PathBuf, String)>,
}

/// Makes directory `dst` of `fs` the same as the directory `src`.
pub fn sync_dir(
    fs: &Fossil,
    src: &Path,
    dst: u64,
    stamps: &mut Stamps,
) -> Result<SyncReport, FsError> {
    let mut run = Run {
        fs,
        src,
        stamps,
        links: HashMap::new(),
        report: SyncReport::default(),
    };
    run.dir(Path::new(""), dst)?;
    Ok(run.report)
}

struct Run<'a> {
    fs: &'a Fossil,
    src: &'a Path,
    stamps: &'a mut Stamps,
    /// Source files with several links, by (device, inode): the inode of
    /// their copy, once made in this run.
    links: HashMap<(u64, u64), u64>,
    report: SyncReport,
}

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

impl Run<'_> {
    fn dir(&mut self, rel: &Path, dst: u64) -> Result<(), FsError> {
        let path = self.src.join(rel);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) => {
                self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                return Ok(());
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
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        for name in &names {
            seen.insert(name.as_bytes().to_vec());
            self.entry(&rel.join(name), name, dst)?;
        }
        // What the source no longer has.
        for d in self.children(dst)? {
            if !seen.contains(&d.0) {
                self.remove(dst, &d.0, &rel.join(OsStr::from_bytes(&d.0)))?;
            }
        }
        Ok(())
    }

    /// The names and kinds in directory `ino`.
    fn children(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, Kind)>, FsError> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let page = self.fs.readdir(ino, offset, 1024)?;
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

    /// Removes `name` from `dir`, a directory with all it holds.
    fn remove(&mut self, dir: u64, name: &[u8], rel: &Path) -> Result<(), FsError> {
        let a = self.fs.lookup(dir, name)?;
        if a.kind == Kind::Dir {
            for (child, _, _) in self.children(a.ino)? {
                self.remove(a.ino, &child, &rel.join(OsStr::from_bytes(&child)))?;
            }
            self.fs.rmdir(dir, name)?;
        } else {
            self.fs.unlink(dir, name)?;
        }
        self.stamps.retain(|p, _| !p.starts_with(rel));
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

    /// What `name` in `dir` is now, if anything.
    fn existing(&self, dir: u64, name: &[u8]) -> Result<Option<(u64, Kind)>, FsError> {
        match self.fs.lookup(dir, name) {
            Ok(a) => Ok(Some((a.ino, a.kind))),
            Err(FsError::Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn entry(&mut self, rel: &Path, name: &OsStr, dst: u64) -> Result<(), FsError> {
        let path = self.src.join(rel);
        let name_bytes = name.as_bytes();
        let m = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                return Ok(());
            }
        };
        let t = m.file_type();
        let owner = Caller {
            uid: m.uid(),
            gid: m.gid(),
        };
        let have = self.existing(dst, name_bytes)?;
        if t.is_dir() {
            let ino = match have {
                Some((ino, Kind::Dir)) => ino,
                other => {
                    if other.is_some() {
                        self.remove(dst, name_bytes, rel)?;
                    }
                    self.fs
                        .mknod(dst, name_bytes, Kind::Dir, 0o700, 0, None, owner)?
                        .ino
                }
            };
            self.dir(rel, ino)?;
            match xattrs_of(xattr::list(&path), |n| xattr::get(&path, n)) {
                Ok(want) => self.set_xattrs(ino, &want)?,
                Err(e) => self.report.errors.push((rel.to_path_buf(), io_errno(&e))),
            }
            // Last: filling it changed its times.
            self.fs.setattr(
                ino,
                SetAttr {
                    mode: Some(m.mode() & 0o7777),
                    uid: Some(m.uid()),
                    gid: Some(m.gid()),
                    atime: Some(SetTime::At(time(m.atime(), m.atime_nsec()))),
                    mtime: Some(SetTime::At(time(m.mtime(), m.mtime_nsec()))),
                    ..SetAttr::default()
                },
            )?;
            self.report.dirs += 1;
        } else if t.is_symlink() {
            let target = match std::fs::read_link(&path) {
                Ok(t) => t,
                Err(e) => {
                    self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                    return Ok(());
                }
            };
            let target = target.as_os_str().as_bytes();
            let same = match have {
                Some((ino, Kind::Symlink)) => self.fs.readlink(ino)? == target,
                _ => false,
            };
            if !same {
                if have.is_some() {
                    self.remove(dst, name_bytes, rel)?;
                }
                self.fs.mknod(
                    dst,
                    name_bytes,
                    Kind::Symlink,
                    0o777,
                    0,
                    Some(target),
                    owner,
                )?;
            }
            self.report.symlinks += 1;
        } else if t.is_file() {
            self.file(rel, name_bytes, dst, &m, have)?;
            self.report.files += 1;
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
        }
        Ok(())
    }

    fn file(
        &mut self,
        rel: &Path,
        name: &[u8],
        dst: u64,
        m: &std::fs::Metadata,
        have: Option<(u64, Kind)>,
    ) -> Result<(), FsError> {
        let key = (m.dev(), m.ino());
        // A second name of a file already copied in this run: a link to it.
        if m.nlink() > 1
            && let Some(&ino) = self.links.get(&key)
        {
            if have.map(|(i, _)| i) != Some(ino) {
                if have.is_some() {
                    self.remove(dst, name, rel)?;
                }
                self.fs.link(ino, dst, name)?;
            }
            self.stamps.insert(rel.to_path_buf(), Stamp::of(m));
            self.report.unchanged += 1;
            return Ok(());
        }
        if let Some((ino, Kind::File)) = have
            && self.stamps.get(rel) == Some(&Stamp::of(m))
        {
            if m.nlink() > 1 {
                self.links.insert(key, ino);
            }
            self.report.unchanged += 1;
            return Ok(());
        }
        if let Some((_, kind)) = have
            && kind != Kind::File
        {
            self.remove(dst, name, rel)?;
        }
        let path = self.src.join(rel);
        let mut last = String::new();
        for _ in 0..TRIES {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                    return Ok(());
                }
            };
            let before = match file.metadata() {
                Ok(b) => b,
                Err(e) => {
                    self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                    return Ok(());
                }
            };
            use xattr::FileExt;
            let xattrs = match xattrs_of(file.list_xattr(), |n| file.get_xattr(n)) {
                Ok(x) => x,
                Err(e) => {
                    self.report.errors.push((rel.to_path_buf(), io_errno(&e)));
                    return Ok(());
                }
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
            };
            let result = self.fs.import_file(dst, name, &mut reader, &attrs);
            self.report.bytes_read += reader.read;
            match result {
                Ok(a) => {
                    self.stamps.insert(rel.to_path_buf(), reader.before);
                    if m.nlink() > 1 {
                        self.links.insert(key, a.ino);
                    }
                    self.report.imported += 1;
                    return Ok(());
                }
                Err(FsError::Errno(libc::EAGAIN)) => {
                    last = "it changed while it was read".into();
                }
                Err(FsError::Errno(e)) => {
                    let e = std::io::Error::from_raw_os_error(e);
                    self.report.errors.push((rel.to_path_buf(), e.to_string()));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.report.errors.push((
            rel.to_path_buf(),
            format!("{last} {TRIES} times; the previous version stays"),
        ));
        Ok(())
    }
}

/// A source file read to its end that fails with `EAGAIN` at the end if it
/// changed meanwhile, so that no torn version is committed.
struct Stable {
    file: std::fs::File,
    before: Stamp,
    read: u64,
}

impl Read for Stable {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
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
