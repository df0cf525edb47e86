//! Writing a tree of the filesystem (live, or as a snapshot kept it) out to
//! a directory of the host: how a watched folder is restored.
//!
//! Directories, regular files (streamed, a few MiB at a time), symlinks and
//! hard links (names that shared an inode share one again) come back with
//! their modes, times and extended attributes; owners too when the process
//! may set them. FIFOs, sockets and devices are made again where the process
//! may. What cannot be set (an owner, an attribute the target filesystem
//! refuses) is named in [`Exported::warnings`], never silently dropped.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fincrypt_blockstore::FileRef;

use crate::error::FsError;
use crate::fossil::{Fossil, REDUNDANCY_XATTR};
use crate::meta::{Kind, Time};
use crate::snapshot::{self, SnapEntry};

/// Bytes read from the store and written out at a time.
const CHUNK: usize = 4 << 20;

/// Where a tree to write out is.
#[derive(Clone, Debug)]
pub enum Tree {
    /// A directory of the live filesystem, by inode.
    Live(u64),
    /// A directory as a snapshot kept it.
    Snapshot(Box<SnapEntry>),
}

/// What [`export`] wrote, so far or in all.
#[derive(Clone, Debug, Default)]
pub struct Exported {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Names beyond a file's first.
    pub hard_links: u64,
    /// FIFOs, sockets and devices.
    pub others: u64,
    pub bytes: u64,
    /// What could not be set as it was (path relative to the destination, why).
    pub warnings: Vec<(PathBuf, String)>,
}

fn io(e: std::io::Error, what: &str, path: &Path) -> FsError {
    FsError::Meta(format!("{what} {}: {e}", path.display()))
}

/// Writes directory `tree` into `dest`, an existing directory that then
/// takes its modes, times and attributes. An entry already at a name is
/// replaced (a directory is merged into). `progress` sees the counts after
/// every file.
pub fn export(
    fs: &Fossil,
    tree: &Tree,
    dest: &Path,
    progress: &mut dyn FnMut(&Exported),
) -> Result<Exported, FsError> {
    let mut run = Run {
        fs,
        dest,
        links: HashMap::new(),
        done: Exported::default(),
        progress,
        buf: vec![0; CHUNK],
    };
    run.dir(tree, Path::new(""))?;
    let top = match tree {
        Tree::Live(ino) => live_entry(fs, Vec::new(), *ino)?,
        Tree::Snapshot(e) => (**e).clone(),
    };
    let here = Path::new("");
    run.xattrs(dest, here, &top);
    run.owner(dest, here, &top);
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(u32::from(top.perm)))
        .map_err(|err| io(err, "setting the mode of", dest))?;
    run.times(dest, here, &top, false);
    Ok(run.done)
}

/// A live inode as a snapshot would record it (a directory's content is
/// not a stream here: it is listed from the live tree).
fn live_entry(fs: &Fossil, name: Vec<u8>, ino: u64) -> Result<SnapEntry, FsError> {
    let inode = fs.meta().inode(ino)?;
    Ok(snapshot::entry(name, ino, &inode, inode.content.clone()))
}

struct Run<'a> {
    fs: &'a Fossil,
    dest: &'a Path,
    /// Inode numbers of files written, with the first path written for each.
    links: HashMap<u64, PathBuf>,
    done: Exported,
    progress: &'a mut dyn FnMut(&Exported),
    buf: Vec<u8>,
}

impl Run<'_> {
    fn children(&self, tree: &Tree) -> Result<Vec<(SnapEntry, Tree)>, FsError> {
        match tree {
            Tree::Live(ino) => {
                let mut out = Vec::new();
                let mut offset = 0;
                loop {
                    let page = self.fs.readdir(*ino, offset, 1024)?;
                    if page.is_empty() {
                        break;
                    }
                    for (cookie, d) in page {
                        offset = cookie;
                        if d.name == b"." || d.name == b".." {
                            continue;
                        }
                        let e = live_entry(self.fs, d.name, d.ino)?;
                        out.push((e, Tree::Live(d.ino)));
                    }
                }
                Ok(out)
            }
            Tree::Snapshot(dir) => Ok(snapshot::read_dir(self.fs, dir)?
                .into_iter()
                .map(|e| (e.clone(), Tree::Snapshot(Box::new(e))))
                .collect()),
        }
    }

    fn warn(&mut self, rel: &Path, why: String) {
        self.done.warnings.push((rel.to_path_buf(), why));
    }

    fn dir(&mut self, tree: &Tree, rel: &Path) -> Result<(), FsError> {
        for (e, sub) in self.children(tree)? {
            let name = OsStr::from_bytes(&e.name);
            let rel = rel.join(name);
            let path = self.dest.join(&rel);
            self.clear(&path, e.kind == Kind::Dir)?;
            match e.kind {
                Kind::Dir => {
                    match std::fs::create_dir(&path) {
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(err) => return Err(io(err, "creating", &path)),
                    }
                    // Writable while it is filled; its mode comes last.
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                        .map_err(|err| io(err, "opening up", &path))?;
                    self.dir(&sub, &rel)?;
                    self.xattrs(&path, &rel, &e);
                    self.owner(&path, &rel, &e);
                    std::fs::set_permissions(
                        &path,
                        std::fs::Permissions::from_mode(u32::from(e.perm)),
                    )
                    .map_err(|err| io(err, "setting the mode of", &path))?;
                    self.times(&path, &rel, &e, false);
                    self.done.dirs += 1;
                }
                Kind::File => self.file(&e, &path, &rel)?,
                Kind::Symlink => {
                    std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), &path)
                        .map_err(|err| io(err, "making the symlink", &path))?;
                    self.owner(&path, &rel, &e);
                    self.times(&path, &rel, &e, true);
                    self.done.symlinks += 1;
                }
                Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                    let kind = match e.kind {
                        Kind::Fifo => libc::S_IFIFO,
                        Kind::Socket => libc::S_IFSOCK,
                        Kind::CharDev => libc::S_IFCHR,
                        _ => libc::S_IFBLK,
                    };
                    let c = CString::new(path.as_os_str().as_bytes())
                        .map_err(|_| FsError::Errno(libc::EINVAL))?;
                    // SAFETY: a valid C string path.
                    let r = unsafe {
                        libc::mknod(
                            c.as_ptr(),
                            kind | libc::mode_t::from(e.perm),
                            libc::dev_t::from(e.rdev),
                        )
                    };
                    if r != 0 {
                        let err = std::io::Error::last_os_error();
                        self.warn(&rel, format!("not made again: {err}"));
                        continue;
                    }
                    self.xattrs(&path, &rel, &e);
                    self.owner(&path, &rel, &e);
                    self.times(&path, &rel, &e, false);
                    self.done.others += 1;
                }
            }
        }
        Ok(())
    }

    /// Makes room for a new entry at `path`: what is there goes, unless
    /// both are directories.
    fn clear(&self, path: &Path, dir: bool) -> Result<(), FsError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e, "reading", path)),
            Ok(m) if m.is_dir() && dir => Ok(()),
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(path).map_err(|e| io(e, "replacing", path))
            }
            Ok(_) => std::fs::remove_file(path).map_err(|e| io(e, "replacing", path)),
        }
    }

    fn file(&mut self, e: &SnapEntry, path: &Path, rel: &Path) -> Result<(), FsError> {
        if e.ino != 0
            && let Some(first) = self.links.get(&e.ino)
        {
            let first = self.dest.join(first);
            std::fs::hard_link(&first, path).map_err(|err| io(err, "linking", path))?;
            self.done.hard_links += 1;
            return Ok(());
        }
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|err| io(err, "creating", path))?;
        self.content(&e.content, e.size, &mut out, path)?;
        out.flush().map_err(|err| io(err, "writing", path))?;
        drop(out);
        self.xattrs(path, rel, e);
        self.owner(path, rel, e);
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(u32::from(e.perm)))
            .map_err(|err| io(err, "setting the mode of", path))?;
        self.times(path, rel, e, false);
        if e.ino != 0 {
            self.links.insert(e.ino, rel.to_path_buf());
        }
        self.done.files += 1;
        self.done.bytes += e.size;
        (self.progress)(&self.done);
        Ok(())
    }

    /// Writes `size` bytes of `content`; holes stay holes.
    fn content(
        &mut self,
        content: &FileRef,
        size: u64,
        out: &mut std::fs::File,
        path: &Path,
    ) -> Result<(), FsError> {
        use std::os::unix::fs::FileExt;
        let mut offset = 0u64;
        while offset < size {
            let want = (size - offset).min(self.buf.len() as u64) as usize;
            let n = self
                .fs
                .reader()
                .read_at(content, offset, &mut self.buf[..want])?;
            if n == 0 {
                break;
            }
            let chunk = &self.buf[..n];
            if chunk.iter().any(|b| *b != 0) {
                out.write_all_at(chunk, offset)
                    .map_err(|err| io(err, "writing", path))?;
            }
            offset += n as u64;
        }
        // Trailing zeros (or a file past its data) are a hole up to its size.
        out.set_len(size)
            .map_err(|err| io(err, "setting the size of", path))
    }

    fn xattrs(&mut self, path: &Path, rel: &Path, e: &SnapEntry) {
        for (name, value) in &e.xattrs {
            if name.as_slice() == REDUNDANCY_XATTR {
                continue;
            }
            if let Err(err) = xattr::set(path, OsStr::from_bytes(name), value) {
                let name = String::from_utf8_lossy(name).into_owned();
                self.warn(rel, format!("extended attribute {name} not set: {err}"));
            }
        }
    }

    /// The owner, where this process may set it (root may; others may
    /// only keep their own).
    fn owner(&mut self, path: &Path, rel: &Path, e: &SnapEntry) {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if me != 0 && e.uid == me {
            return;
        }
        if let Err(err) = std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid)) {
            self.warn(rel, format!("owner {}:{} not set: {err}", e.uid, e.gid));
        }
    }

    fn times(&mut self, path: &Path, rel: &Path, e: &SnapEntry, symlink: bool) {
        let ts = |t: Time| libc::timespec {
            tv_sec: t.secs as libc::time_t,
            tv_nsec: libc::c_long::from(t.nanos as i32),
        };
        let times = [ts(e.atime), ts(e.mtime)];
        let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
            return;
        };
        let flags = if symlink {
            libc::AT_SYMLINK_NOFOLLOW
        } else {
            0
        };
        // SAFETY: a valid C string path and two timespecs.
        let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            self.warn(rel, format!("times not set: {err}"));
        }
    }
}
