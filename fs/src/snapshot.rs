//! Snapshots: the live tree written as blocks under a root, and GC from roots.
//!
//! A directory becomes a stream of [`SnapEntry`] records stored as a file
//! tree (inline when small); a snapshot is a [`RootRecord`] block holding the
//! root directory's entry, the time and the previous root. Formats are in
//! docs/FORMATS.md ("Snapshots").

use std::collections::{BTreeMap, HashSet};

use fincrypt_blockstore::block::{self, BlockKind};
use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{Class, FileRef, LocalStore, Pointer, Score};
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::fossil::Fossil;
use crate::meta::{Inode, Kind, ROOT_INO, SnapshotRecord, Time};

/// Version of directory streams and root records.
pub const SNAPSHOT_VERSION: u8 = 1;

/// One name in a snapshot directory, with everything `stat` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapEntry {
    pub name: Vec<u8>,
    pub kind: Kind,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub rdev: u32,
    /// A file's content, or a directory's stream of entries.
    pub content: FileRef,
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub redundancy: Option<u8>,
}

#[derive(Serialize, Deserialize)]
struct DirStream {
    version: u8,
    entries: Vec<SnapEntry>,
}

/// The root block of a snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootRecord {
    pub version: u8,
    pub time: Time,
    /// The root directory (name empty).
    pub tree: SnapEntry,
    pub previous: Option<Pointer>,
}

fn entry(name: Vec<u8>, inode: &Inode, content: FileRef) -> SnapEntry {
    SnapEntry {
        name,
        kind: inode.kind,
        perm: inode.perm,
        uid: inode.uid,
        gid: inode.gid,
        size: inode.size,
        atime: inode.atime,
        mtime: inode.mtime,
        ctime: inode.ctime,
        rdev: inode.rdev,
        content,
        target: if inode.kind == Kind::Symlink {
            inode.target.clone()
        } else {
            Vec::new()
        },
        xattrs: inode.xattrs.clone(),
        redundancy: inode.redundancy,
    }
}

/// Seals all writes, writes the tree as blocks and records a new root.
pub fn create(fs: &Fossil) -> Result<SnapshotRecord, FsError> {
    fs.sync_all()?;
    let (keys, params) = fs.keys();
    let store = fs.store();
    let view = fs.meta().view()?;
    // Post-order without recursion: a directory is written after its children.
    struct Frame {
        name: Vec<u8>,
        inode: Inode,
        pending: Vec<(Vec<u8>, u64)>,
        done: Vec<SnapEntry>,
    }
    let root = view.inode(ROOT_INO)?;
    let children = |ino: u64| -> Result<Vec<(Vec<u8>, u64)>, FsError> {
        Ok(view
            .entries(ino)?
            .into_iter()
            .map(|d| (d.name, d.ino))
            .rev()
            .collect())
    };
    let mut stack = vec![Frame {
        name: Vec::new(),
        pending: children(ROOT_INO)?,
        inode: root,
        done: Vec::new(),
    }];
    let tree = loop {
        let Some(top) = stack.last_mut() else {
            return Err(FsError::Meta("empty snapshot walk".into()));
        };
        if let Some((name, ino)) = top.pending.pop() {
            let inode = view.inode(ino)?;
            if inode.kind == Kind::Dir {
                let pending = children(ino)?;
                stack.push(Frame {
                    name,
                    inode,
                    pending,
                    done: Vec::new(),
                });
            } else {
                let content = inode.content.clone();
                top.done.push(entry(name, &inode, content));
            }
            continue;
        }
        let Some(frame) = stack.pop() else {
            unreachable!("stack checked non-empty above")
        };
        let stream = postcard::to_allocvec(&DirStream {
            version: SNAPSHOT_VERSION,
            entries: frame.done,
        })?;
        let content = write_all(store, keys, params, Class::Own, &stream)?;
        let e = entry(frame.name, &frame.inode, content);
        match stack.last_mut() {
            Some(parent) => parent.done.push(e),
            None => break e,
        }
    };
    let previous = fs.meta().snapshots()?.last().map(|s| s.root);
    let time = Time::now();
    let record = RootRecord {
        version: SNAPSHOT_VERSION,
        time,
        tree,
        previous,
    };
    let bytes = postcard::to_allocvec(&record)?;
    let sealed = block::seal(&keys.content, BlockKind::Root, &bytes)?;
    store.put(sealed.pointer.score, sealed.data, Class::Own)?;
    let snap = SnapshotRecord {
        time,
        root: sealed.pointer,
    };
    let mut txn = fs.meta().write()?;
    txn.put_snapshot(key_of(time), &snap)?;
    fs.commit_durably(txn)?;
    Ok(snap)
}

fn key_of(t: Time) -> u64 {
    (t.secs.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.nanos as u64)
}

/// Reads a snapshot's root record.
pub fn root(fs: &Fossil, snap: &SnapshotRecord) -> Result<RootRecord, FsError> {
    let data = fs.store().get(&snap.root.score)?;
    let plain = block::open(&snap.root, BlockKind::Root, &data)?;
    let r: RootRecord = postcard::from_bytes(&plain)?;
    if r.version != SNAPSHOT_VERSION {
        return Err(FsError::Meta(format!(
            "snapshot version {} is not supported",
            r.version
        )));
    }
    Ok(r)
}

/// The entries of a snapshot directory.
pub fn read_dir(fs: &Fossil, dir: &SnapEntry) -> Result<Vec<SnapEntry>, FsError> {
    let bytes = fs.reader().read_all(&dir.content)?;
    let s: DirStream = postcard::from_bytes(&bytes)?;
    if s.version != SNAPSHOT_VERSION {
        return Err(FsError::Meta(format!(
            "directory stream version {} is not supported",
            s.version
        )));
    }
    Ok(s.entries)
}

/// Drops all but the newest `keep` snapshots; returns how many went.
pub fn prune(fs: &Fossil, keep: usize) -> Result<usize, FsError> {
    let snaps = fs.meta().snapshots()?;
    let excess = snaps.len().saturating_sub(keep);
    if excess == 0 {
        return Ok(0);
    }
    let mut txn = fs.meta().write()?;
    for s in &snaps[..excess] {
        txn.remove_snapshot(key_of(s.time))?;
    }
    fs.commit_durably(txn)?;
    Ok(excess)
}

/// Frees own blocks that neither live files nor retained snapshots reference.
pub fn gc(fs: &Fossil, volume: &LocalStore) -> Result<u64, FsError> {
    let mark = fs.with_sealing_paused(|| volume.mark());
    let mut live: HashSet<Score> = HashSet::new();
    let reader = fs.reader();
    let add_tree = |f: &FileRef, live: &mut HashSet<Score>| -> Result<(), FsError> {
        reader.visit_scores(f, &mut |p| {
            live.insert(p.score);
        })?;
        Ok(())
    };
    for content in fs.meta().view()?.contents()? {
        add_tree(&content, &mut live)?;
    }
    for snap in fs.meta().snapshots()? {
        live.insert(snap.root.score);
        let r = root(fs, &snap)?;
        let mut dirs = vec![r.tree];
        while let Some(d) = dirs.pop() {
            add_tree(&d.content, &mut live)?;
            for e in read_dir(fs, &d)? {
                if e.kind == Kind::Dir {
                    dirs.push(e);
                } else {
                    add_tree(&e.content, &mut live)?;
                }
            }
        }
    }
    Ok(volume.sweep(&live, mark)?)
}
