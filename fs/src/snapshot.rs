//! Snapshots: the live tree written as blocks under a root, and GC from roots.
//!
//! A directory becomes a stream of [`SnapEntry`] records stored as a file
//! tree (inline when small); a snapshot is a [`RootRecord`] block holding the
//! root directory's entry, the time, the previous root and the owner's
//! manifest of who holds what (an opaque file tree to this crate). Formats
//! are in docs/FORMATS.md ("Snapshots").

use std::collections::{BTreeMap, HashSet};

use fincrypt_blockstore::block::{self, BlockKind};
use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{Class, FileRef, LocalStore, Pointer, Score};
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::fossil::Fossil;
use crate::meta::{Inode, Kind, ROOT_INO, SnapshotRecord, Time};

/// Version of root records; version 1 roots (no manifest) are still read.
pub const SNAPSHOT_VERSION: u8 = 2;
/// Version of directory streams (unchanged since roots were version 1).
pub const DIR_STREAM_VERSION: u8 = 1;

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
    /// The owner's manifest as of this snapshot (written by the mount: who
    /// holds each own block); `None` in version 1 roots and without peers.
    pub manifest: Option<FileRef>,
}

/// A root record as version 1 wrote it.
#[derive(Deserialize)]
struct RootRecordV1 {
    version: u8,
    time: Time,
    tree: SnapEntry,
    previous: Option<Pointer>,
}

impl RootRecord {
    /// Decodes a root record of any version this program reads.
    pub fn decode(plain: &[u8]) -> Result<RootRecord, FsError> {
        // postcard writes the leading `version: u8` as one byte.
        match plain.first().copied() {
            Some(1) => {
                let r: RootRecordV1 = postcard::from_bytes(plain)?;
                Ok(RootRecord {
                    version: r.version,
                    time: r.time,
                    tree: r.tree,
                    previous: r.previous,
                    manifest: None,
                })
            }
            Some(SNAPSHOT_VERSION) => Ok(postcard::from_bytes(plain)?),
            v => Err(FsError::Meta(format!(
                "snapshot version {v:?} is not supported"
            ))),
        }
    }
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

/// Seals all writes, writes the tree as blocks and records a new root; the
/// root keeps the previous root's manifest.
pub fn create(fs: &Fossil) -> Result<SnapshotRecord, FsError> {
    create_with_manifest(fs, None)
}

/// As [`create`], with `manifest` (the owner's manifest, already stored as
/// blocks) in the root; `None` keeps the previous root's, if any.
pub fn create_with_manifest(
    fs: &Fossil,
    manifest: Option<FileRef>,
) -> Result<SnapshotRecord, FsError> {
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
            version: DIR_STREAM_VERSION,
            entries: frame.done,
        })?;
        let content = write_all(store, keys, params, Class::Own, &stream)?;
        let e = entry(frame.name, &frame.inode, content);
        match stack.last_mut() {
            Some(parent) => parent.done.push(e),
            None => break e,
        }
    };
    let last = fs.meta().snapshots()?.pop();
    let manifest = match (manifest, &last) {
        (Some(m), _) => Some(m),
        // An unreadable previous root only costs the carried-over manifest.
        (None, Some(last)) => self::root(fs, last).ok().and_then(|r| r.manifest),
        (None, None) => None,
    };
    let previous = last.map(|s| s.root);
    let time = Time::now();
    let record = RootRecord {
        version: SNAPSHOT_VERSION,
        time,
        tree,
        previous,
        manifest,
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
    RootRecord::decode(&plain)
}

/// The entries of a snapshot directory.
pub fn read_dir(fs: &Fossil, dir: &SnapEntry) -> Result<Vec<SnapEntry>, FsError> {
    let bytes = fs.reader().read_all(&dir.content)?;
    let s: DirStream = postcard::from_bytes(&bytes)?;
    if s.version != DIR_STREAM_VERSION {
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

/// Frees own blocks that neither live files nor retained snapshots
/// reference; returns the blocks freed.
pub fn gc(fs: &Fossil, volume: &LocalStore) -> Result<Vec<Score>, FsError> {
    let mark = fs.with_sealing_paused(|| volume.mark());
    let mut live: HashSet<Score> = HashSet::new();
    let reader = fs.reader();
    // A subtree already marked is not walked again (the walk also skips
    // trees it handed out), so GC costs what the snapshots do not share.
    crate::walk::walk(fs, &crate::walk::Walk::all(1), &mut |item| {
        match item {
            crate::walk::Item::Root { snap, root } => {
                live.insert(snap.root.score);
                if let Some(m) = &root.manifest {
                    reader.add_new_scores(m, &mut live)?;
                }
            }
            crate::walk::Item::Dir { content, .. } | crate::walk::Item::File { content, .. } => {
                reader.add_new_scores(content, &mut live)?
            }
        }
        Ok(true)
    })?;
    Ok(volume.sweep(&live, mark)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::Score;

    fn dir_entry() -> SnapEntry {
        SnapEntry {
            name: Vec::new(),
            kind: Kind::Dir,
            perm: 0o755,
            uid: 1,
            gid: 2,
            size: 0,
            atime: Time::now(),
            mtime: Time::now(),
            ctime: Time::now(),
            rdev: 0,
            content: FileRef::Inline(b"stream".to_vec()),
            target: Vec::new(),
            xattrs: BTreeMap::new(),
            redundancy: Some(3),
        }
    }

    /// Version 1's layout, as it was written before roots named a manifest.
    #[derive(Serialize)]
    struct WrittenByV1 {
        version: u8,
        time: Time,
        tree: SnapEntry,
        previous: Option<Pointer>,
    }

    #[test]
    fn version_1_roots_still_read_and_version_2_roots_keep_their_manifest() {
        let old = WrittenByV1 {
            version: 1,
            time: Time::now(),
            tree: dir_entry(),
            previous: None,
        };
        let r = RootRecord::decode(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!((r.version, r.manifest, r.tree), (1, None, old.tree));

        let manifest = FileRef::Tree(Pointer {
            score: Score([9; 32]),
            key: [7; 32],
            len: 5000,
            size: 40,
            depth: 1,
        });
        let new = RootRecord {
            version: SNAPSHOT_VERSION,
            time: Time::now(),
            tree: dir_entry(),
            previous: None,
            manifest: Some(manifest.clone()),
        };
        let r = RootRecord::decode(&postcard::to_allocvec(&new).unwrap()).unwrap();
        assert_eq!(r.manifest, Some(manifest));
        assert_eq!(r.version, 2);

        let mut future = postcard::to_allocvec(&new).unwrap();
        future[0] = 3;
        assert!(RootRecord::decode(&future).is_err());
    }
}
