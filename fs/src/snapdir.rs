//! `.snapshots`: every retained snapshot, browsable read-only at
//! `MNT/.snapshots/<time>/`.
//!
//! The directory is reachable by name but not listed in the root (like ZFS's
//! `.zfs` with snapdir=hidden), so tools that walk the tree do not walk every
//! snapshot. Nodes inside get inode numbers from [`SNAP_BASE`] up, handed out
//! as they are looked up.

use std::collections::HashMap;
use std::sync::Mutex;

use fincrypt_blockstore::FileRef;

use crate::error::{FsError, errno};
use crate::fossil::{Attr, Fossil, dot_entries};
use crate::meta::{Dirent, Kind, Time};
use crate::snapshot::{self, SnapEntry};

/// The name of the snapshot directory in the root.
pub const SNAPSHOTS_NAME: &[u8] = b".snapshots";
/// Inode of `.snapshots`; every node below it has a larger one.
pub const SNAP_BASE: u64 = 1 << 62;

/// True for inodes that live in a snapshot (read-only).
pub fn is_snapshot_ino(ino: u64) -> bool {
    ino >= SNAP_BASE
}

/// The name a snapshot is shown under: its UTC time, which sorts as the snapshots do.
pub fn name(t: Time) -> String {
    let secs = t.secs.max(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.nanos / 1_000_000
    )
}

/// Snapshot nodes looked up so far.
#[derive(Default)]
pub struct SnapDir {
    nodes: Mutex<Nodes>,
}

#[derive(Default)]
struct Nodes {
    entries: Vec<SnapEntry>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
}

impl SnapDir {
    fn lock(&self) -> std::sync::MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node(&self, ino: u64) -> Result<SnapEntry, FsError> {
        let i = ino
            .checked_sub(SNAP_BASE + 1)
            .ok_or(FsError::Errno(libc::ENOENT))?;
        self.lock()
            .entries
            .get(i as usize)
            .cloned()
            .ok_or(FsError::Errno(libc::ENOENT))
    }

    fn intern(&self, parent: u64, e: SnapEntry) -> u64 {
        let mut n = self.lock();
        if let Some(ino) = n.by_name.get(&(parent, e.name.clone())) {
            return *ino;
        }
        let ino = SNAP_BASE + 1 + n.entries.len() as u64;
        n.by_name.insert((parent, e.name.clone()), ino);
        n.entries.push(e);
        ino
    }

    fn root_attr(&self) -> Attr {
        let now = Time::now();
        Attr {
            ino: SNAP_BASE,
            kind: Kind::Dir,
            perm: 0o555,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
        }
    }

    /// Attributes of a snapshot node.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if ino == SNAP_BASE {
            return Ok(self.root_attr());
        }
        let e = self.node(ino)?;
        Ok(Attr {
            ino,
            kind: e.kind,
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            nlink: if e.kind == Kind::Dir { 2 } else { 1 },
            size: e.size,
            blocks: match e.kind {
                Kind::File => e.content.data_len().min(e.size),
                _ => e.size,
            }
            .div_ceil(512),
            atime: e.atime,
            mtime: e.mtime,
            ctime: e.ctime,
            crtime: e.ctime,
            rdev: e.rdev,
        })
    }

    /// The entries of a snapshot directory (or of `.snapshots` itself).
    fn children(&self, fs: &Fossil, ino: u64) -> Result<Vec<SnapEntry>, FsError> {
        if ino == SNAP_BASE {
            let mut out = Vec::new();
            for s in fs.meta().snapshots()? {
                let mut tree = snapshot::root(fs, &s)?.tree;
                tree.name = name(s.time).into_bytes();
                out.push(tree);
            }
            return Ok(out);
        }
        let e = self.node(ino)?;
        if e.kind != Kind::Dir {
            return errno(libc::ENOTDIR);
        }
        snapshot::read_dir(fs, &e)
    }

    /// Finds `name` in a snapshot directory.
    pub fn lookup(&self, fs: &Fossil, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        let e = self
            .children(fs, parent)?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or(FsError::Errno(libc::ENOENT))?;
        let ino = self.intern(parent, e);
        self.getattr(ino)
    }

    /// Entries of a snapshot directory from `offset`: (next cookie, entry).
    pub fn readdir(
        &self,
        fs: &Fossil,
        ino: u64,
        offset: u64,
    ) -> Result<Vec<(u64, Dirent)>, FsError> {
        let mut out = dot_entries(ino, SNAP_BASE, offset);
        let children = self.children(fs, ino)?;
        for (i, e) in children
            .into_iter()
            .enumerate()
            .skip(offset.saturating_sub(2) as usize)
        {
            let kind = e.kind;
            let name = e.name.clone();
            let child = self.intern(ino, e);
            out.push((
                i as u64 + 3,
                Dirent {
                    name,
                    ino: child,
                    kind,
                },
            ));
        }
        Ok(out)
    }

    /// Reads from a file in a snapshot.
    pub fn read(&self, fs: &Fossil, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let e = self.node(ino)?;
        if e.kind != Kind::File {
            return errno(if e.kind == Kind::Dir {
                libc::EISDIR
            } else {
                libc::EINVAL
            });
        }
        let n = e.size.saturating_sub(offset).min(size as u64) as usize;
        let mut buf = vec![0u8; n];
        fs.reader().read_at(&e.content, offset, &mut buf)?;
        Ok(buf)
    }

    /// A snapshot file's length and content.
    pub fn content(&self, ino: u64) -> Result<(u64, FileRef), FsError> {
        let e = self.node(ino)?;
        if e.kind != Kind::File {
            return errno(libc::EINVAL);
        }
        Ok((e.size, e.content))
    }

    /// A symlink's target in a snapshot.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let e = self.node(ino)?;
        if e.kind != Kind::Symlink {
            return errno(libc::EINVAL);
        }
        Ok(e.target)
    }

    /// Extended attributes of a snapshot node.
    pub fn xattrs(
        &self,
        ino: u64,
    ) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, FsError> {
        if ino == SNAP_BASE {
            return Ok(Default::default());
        }
        Ok(self.node(ino)?.xattrs)
    }
}
