//! Snapshots: the live tree written as blocks under a root, and GC from roots.
//!
//! A directory becomes a stream of [`SnapEntry`] records stored as a file
//! tree (inline when small); a snapshot is a [`RootRecord`] block holding the
//! root directory's entry, the time, the previous root and the owner's
//! manifest of who holds what (an opaque file tree to this crate). Formats
//! are in docs/FORMATS.md ("Snapshots").

use std::collections::{BTreeMap, HashMap, HashSet};

use fincrypt_blockstore::block::{self, BlockKind};
use fincrypt_blockstore::{
    BlockStore, Class, FileRef, LocalStore, Pointer, Score, TreeReader, TreeWriter,
};
use serde::{Deserialize, Serialize};

use crate::error::FsError;
use crate::fossil::Fossil;
use crate::meta::{Inode, Kind, Meta, ROOT_INO, SnapshotRecord, Time};

/// Version of root records; versions 1 (no manifest) and 2 (no list of
/// retained snapshots, entries without inode numbers) are still read.
pub const SNAPSHOT_VERSION: u8 = 3;
/// Version of directory streams; version 1 (entries without inode numbers
/// and creation times) is still read.
pub const DIR_STREAM_VERSION: u8 = 2;

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
    /// The inode number in the live filesystem when the snapshot was taken:
    /// entries with the same number are hard links of one file. 0 in
    /// entries written before version 2 of directory streams.
    pub ino: u64,
    pub crtime: Time,
}

/// A [`SnapEntry`] as version 1 directory streams (and version 1 and 2
/// roots) wrote it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SnapEntryV1 {
    name: Vec<u8>,
    kind: Kind,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    atime: Time,
    mtime: Time,
    ctime: Time,
    rdev: u32,
    content: FileRef,
    target: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    redundancy: Option<u8>,
}

impl From<SnapEntryV1> for SnapEntry {
    fn from(e: SnapEntryV1) -> SnapEntry {
        SnapEntry {
            name: e.name,
            kind: e.kind,
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            atime: e.atime,
            mtime: e.mtime,
            ctime: e.ctime,
            rdev: e.rdev,
            content: e.content,
            target: e.target,
            xattrs: e.xattrs,
            redundancy: e.redundancy,
            ino: 0,
            crtime: e.ctime,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct DirStream {
    version: u8,
    entries: Vec<SnapEntry>,
}

#[derive(Deserialize)]
struct DirStreamV1 {
    #[allow(dead_code)]
    version: u8,
    entries: Vec<SnapEntryV1>,
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
    /// The snapshots retained when this root was written, oldest first
    /// (this root not among them): what a machine recovered from this root
    /// lists in `.snapshots/`. Empty in roots before version 3.
    pub snapshots: Vec<SnapshotRecord>,
    /// True for a snapshot (listed in `.snapshots/`), false for a head: a
    /// root written only to be published between snapshots. True in roots
    /// before version 3.
    pub snapshot: bool,
}

/// A root record as version 1 wrote it.
#[derive(Deserialize)]
struct RootRecordV1 {
    version: u8,
    time: Time,
    tree: SnapEntryV1,
    previous: Option<Pointer>,
}

/// A root record as version 2 wrote it.
#[derive(Deserialize)]
struct RootRecordV2 {
    version: u8,
    time: Time,
    tree: SnapEntryV1,
    previous: Option<Pointer>,
    manifest: Option<FileRef>,
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
                    tree: r.tree.into(),
                    previous: r.previous,
                    manifest: None,
                    snapshots: Vec::new(),
                    snapshot: true,
                })
            }
            Some(2) => {
                let r: RootRecordV2 = postcard::from_bytes(plain)?;
                Ok(RootRecord {
                    version: r.version,
                    time: r.time,
                    tree: r.tree.into(),
                    previous: r.previous,
                    manifest: r.manifest,
                    snapshots: Vec::new(),
                    snapshot: true,
                })
            }
            Some(SNAPSHOT_VERSION) => Ok(postcard::from_bytes(plain)?),
            v => Err(FsError::Meta(format!(
                "snapshot version {v:?} is not supported"
            ))),
        }
    }
}

/// The entry a snapshot records for inode `ino` under `name`, with `content`.
pub fn entry(name: Vec<u8>, ino: u64, inode: &Inode, content: FileRef) -> SnapEntry {
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
        ino,
        crtime: inode.crtime,
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
    write_root(fs, manifest, true)
}

/// Seals all writes and writes the tree under a *head*: a root to publish
/// between snapshots, kept (for GC and replication) but not listed in
/// `.snapshots/`, until [`drop_heads_before`] a newer published root. Heads
/// written since the oldest kept one go (they were never published).
pub fn create_head(fs: &Fossil, manifest: Option<FileRef>) -> Result<SnapshotRecord, FsError> {
    write_root(fs, manifest, false)
}

/// Forgets the heads older than `root` (once `root` is published, they are
/// not needed to recover); GC then frees what only they used. With
/// `rewalk`, and if any went, what blocks want is worked out again by a walk
/// (they may have asked for more copies than what stays).
pub fn drop_heads_before(fs: &Fossil, root: &SnapshotRecord, rewalk: bool) -> Result<u64, FsError> {
    let mut txn = fs.meta().write()?;
    let n = txn.remove_heads_before(key_of(root.time))?;
    if rewalk && n > 0 {
        txn.note_redundancy_change()?;
    }
    fs.commit_durably(txn)?;
    Ok(n)
}

fn write_root(
    fs: &Fossil,
    manifest: Option<FileRef>,
    as_snapshot: bool,
) -> Result<SnapshotRecord, FsError> {
    fs.sync_all()?;
    let (keys, params) = fs.keys();
    let store = fs.store();
    let view = fs.meta().view()?;
    // Post-order without recursion: a directory is written after its children.
    struct Frame {
        name: Vec<u8>,
        ino: u64,
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
        ino: ROOT_INO,
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
                    ino,
                    inode,
                    pending,
                    done: Vec::new(),
                });
            } else {
                let content = inode.content.clone();
                top.done.push(entry(name, ino, &inode, content));
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
        // Made durable all at once, before the record naming the root.
        let mut w = TreeWriter::new(store, keys, params, Class::Own).unsynced();
        w.write(&stream)?;
        let content = w.finish()?;
        let e = entry(frame.name, frame.ino, &frame.inode, content);
        match stack.last_mut() {
            Some(parent) => parent.done.push(e),
            None => break e,
        }
    };
    let mut retained = fs.meta().snapshots()?;
    let last = fs.meta().roots()?.pop();
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
        snapshots: std::mem::take(&mut retained),
        snapshot: as_snapshot,
    };
    let bytes = postcard::to_allocvec(&record)?;
    let sealed = block::seal(&keys.content, BlockKind::Root, &bytes)?;
    store.put(sealed.pointer.score, sealed.data, Class::Own)?;
    let snap = SnapshotRecord {
        time,
        root: sealed.pointer,
    };
    let oldest_head = fs.meta().heads()?.first().map(|h| key_of(h.time));
    let mut txn = fs.meta().write()?;
    if as_snapshot {
        txn.put_snapshot(key_of(time), &snap)?;
    } else {
        // Heads newer than the oldest were never published (publishing one
        // drops those before it) and this one supersedes them: so at most
        // the last published head and the newest stay, however long
        // publishing fails.
        if let Some(k) = oldest_head {
            txn.remove_heads_after(k)?;
        }
        txn.put_head(key_of(time), &snap)?;
    }
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
    read_dir_with(fs.reader(), dir)
}

/// The entries of a snapshot directory, read through `reader`.
pub fn read_dir_with<S: BlockStore>(
    reader: &TreeReader<S>,
    dir: &SnapEntry,
) -> Result<Vec<SnapEntry>, FsError> {
    decode_dir(&reader.read_all(&dir.content)?)
}

/// Decodes a directory stream of any version this program reads.
fn decode_dir(bytes: &[u8]) -> Result<Vec<SnapEntry>, FsError> {
    match bytes.first().copied() {
        Some(1) => {
            let s: DirStreamV1 = postcard::from_bytes(bytes)?;
            Ok(s.entries.into_iter().map(SnapEntry::from).collect())
        }
        Some(DIR_STREAM_VERSION) => Ok(postcard::from_bytes::<DirStream>(bytes)?.entries),
        v => Err(FsError::Meta(format!(
            "directory stream version {v:?} is not supported"
        ))),
    }
}

/// Entries [`restore`] writes per commit.
const RESTORE_ROWS_PER_COMMIT: usize = 8192;

/// What [`restore`] rebuilt, so far or in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub dirs: u64,
    /// Files, counted once however many names they have.
    pub files: u64,
    pub symlinks: u64,
    /// FIFOs, sockets and devices.
    pub others: u64,
    /// Names beyond a file's first.
    pub hard_links: u64,
    /// Bytes of the files' contents.
    pub bytes: u64,
    /// Snapshots listed in `.snapshots/`.
    pub snapshots: u64,
}

fn inode_of(e: &SnapEntry, nlink: u32, target: Vec<u8>) -> Inode {
    Inode {
        kind: e.kind,
        perm: e.perm,
        uid: e.uid,
        gid: e.gid,
        nlink,
        size: e.size,
        atime: e.atime,
        mtime: e.mtime,
        ctime: e.ctime,
        crtime: e.crtime,
        rdev: e.rdev,
        content: e.content.clone(),
        target,
        xattrs: e.xattrs.clone(),
        redundancy: e.redundancy,
    }
}

/// Rebuilds the live namespace of a new, empty `meta` (only its root
/// directory) from the tree of root `snap` (decoded as `root`), reading
/// directory streams through `reader`, and lists the snapshots it retained
/// (and `snap` itself, if it is a snapshot; else it is kept as a head). Entries that share an inode number become
/// hard links of one inode; inode numbers are given afresh. Rows go in
/// commits of some thousands, the last one durable, and not into the change
/// feed (the engine of a recovered home walks everything first); `progress`
/// sees the counts after each commit.
pub fn restore<S: BlockStore>(
    meta: &Meta,
    reader: &TreeReader<S>,
    snap: &SnapshotRecord,
    root: &RootRecord,
    progress: &mut dyn FnMut(&Restored),
) -> Result<Restored, FsError> {
    if !meta.view()?.entries(ROOT_INO)?.is_empty() {
        return Err(FsError::Meta(
            "the filesystem to restore into is not empty".into(),
        ));
    }
    let mut done = Restored::default();
    // Snapshot inode number -> the number given here (files with several names).
    let mut linked: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut next = ROOT_INO + 1;
    let root_target = meta.inode(ROOT_INO)?.target;
    // Directories still to list: their number here, entry and parent's number.
    let mut dirs: Vec<(u64, SnapEntry, u64)> = vec![(ROOT_INO, root.tree.clone(), ROOT_INO)];
    // A recovered home walks everything once anyway (its engine has never
    // walked), so the rows go in large commits and not into the change feed.
    let fresh_txn = || -> Result<crate::meta::WriteTxn<'_>, FsError> {
        let mut txn = meta.write()?;
        txn.without_change_feed();
        Ok(txn)
    };
    let mut txn = fresh_txn()?;
    // Rows of the commit being built, written in bulk when it is full.
    let mut inodes: Vec<(u64, Inode)> = Vec::new();
    let mut names: Vec<(u64, crate::meta::Dirent)> = Vec::new();
    while let Some((ino, dir, parent)) = dirs.pop() {
        let entries = read_dir_with(reader, &dir)?;
        let subdirs = entries.iter().filter(|e| e.kind == Kind::Dir).count() as u32;
        let target = if ino == ROOT_INO {
            root_target.clone()
        } else {
            parent.to_le_bytes().to_vec()
        };
        inodes.push((ino, inode_of(&dir, 2 + subdirs, target)));
        for e in entries {
            let known = (e.kind != Kind::Dir && e.ino != 0)
                .then(|| linked.get_mut(&e.ino))
                .flatten();
            let child = match known {
                Some((child, names)) => {
                    *names += 1;
                    done.hard_links += 1;
                    *child
                }
                None => {
                    let child = next;
                    next += 1;
                    match e.kind {
                        Kind::Dir => {}
                        Kind::File => {
                            done.files += 1;
                            done.bytes += e.size;
                        }
                        Kind::Symlink => done.symlinks += 1,
                        _ => done.others += 1,
                    }
                    if e.kind != Kind::Dir {
                        if e.ino != 0 {
                            linked.insert(e.ino, (child, 1));
                        }
                        inodes.push((child, inode_of(&e, 1, e.target.clone())));
                    }
                    child
                }
            };
            names.push((
                ino,
                crate::meta::Dirent {
                    name: e.name.clone(),
                    ino: child,
                    kind: e.kind,
                },
            ));
            if e.kind == Kind::Dir {
                dirs.push((child, e, ino));
            }
        }
        done.dirs += 1;
        if inodes.len() + names.len() >= RESTORE_ROWS_PER_COMMIT {
            txn.put_fresh(&inodes, &names)?;
            inodes.clear();
            names.clear();
            txn.set_next_ino(next)?;
            txn.commit(false)?;
            txn = fresh_txn()?;
            progress(&done);
        }
    }
    txn.put_fresh(&inodes, &names)?;
    txn.set_next_ino(next)?;
    for (child, names) in linked.values() {
        if *names > 1 {
            let mut inode = txn.inode(*child)?;
            inode.nlink = *names;
            txn.put_inode(*child, &inode)?;
        }
    }
    for s in &root.snapshots {
        txn.put_snapshot(key_of(s.time), s)?;
        done.snapshots += 1;
    }
    if root.snapshot {
        txn.put_snapshot(key_of(snap.time), snap)?;
        done.snapshots += 1;
    } else {
        txn.put_head(key_of(snap.time), snap)?;
    }
    txn.commit(true)?;
    progress(&done);
    Ok(done)
}

/// Drops the snapshots `doomed` from `.snapshots/`, in one commit that also
/// counts as a redundancy change: what they asked for is looked at again by
/// a walk, so a redundancy lowered since takes effect. The one taken at
/// `keep_as_head`, if among them, stays a head: the root the network holds
/// names it, so its blocks stay until a newer root is published. Returns
/// how many went.
pub fn delete(
    fs: &Fossil,
    doomed: &[SnapshotRecord],
    keep_as_head: Option<Time>,
) -> Result<usize, FsError> {
    if doomed.is_empty() {
        return Ok(0);
    }
    let mut txn = fs.meta().write()?;
    for s in doomed {
        txn.remove_snapshot(key_of(s.time))?;
        if keep_as_head == Some(s.time) {
            txn.put_head(key_of(s.time), s)?;
        }
    }
    txn.note_redundancy_change()?;
    fs.commit_durably(txn)?;
    Ok(doomed.len())
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
/// reference; returns the blocks freed. `keep` is given the volume's tags
/// of the blocks about to go, before they go (see
/// [`LocalStore::sweep_keeping_tags`]).
pub fn gc(
    fs: &Fossil,
    volume: &LocalStore,
    keep: impl FnOnce(&[(Score, u64)]) -> Result<(), fincrypt_blockstore::Error>,
) -> Result<Vec<Score>, FsError> {
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
    Ok(volume.sweep_keeping_tags(&live, mark, keep)?)
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
            ino: 1,
            crtime: Time { secs: 1, nanos: 2 },
        }
    }

    fn v1_of(e: &SnapEntry) -> SnapEntryV1 {
        SnapEntryV1 {
            name: e.name.clone(),
            kind: e.kind,
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            atime: e.atime,
            mtime: e.mtime,
            ctime: e.ctime,
            rdev: e.rdev,
            content: e.content.clone(),
            target: e.target.clone(),
            xattrs: e.xattrs.clone(),
            redundancy: e.redundancy,
        }
    }

    /// Version 1's layout, as it was written before roots named a manifest.
    #[derive(Serialize)]
    struct WrittenByV1 {
        version: u8,
        time: Time,
        tree: SnapEntryV1,
        previous: Option<Pointer>,
    }

    /// Version 2's layout: a manifest, no retained list, entries without inode numbers.
    #[derive(Serialize)]
    struct WrittenByV2 {
        version: u8,
        time: Time,
        tree: SnapEntryV1,
        previous: Option<Pointer>,
        manifest: Option<FileRef>,
    }

    fn pointer(n: u8) -> Pointer {
        Pointer {
            score: Score([n; 32]),
            key: [7; 32],
            len: 5000,
            size: 40,
            depth: 1,
        }
    }

    #[test]
    fn roots_of_every_version_read_and_version_3_keeps_inodes_and_the_retained_list() {
        // What an entry of an older version reads as: no inode number, crtime = ctime.
        let mut tree = dir_entry();
        tree.ino = 0;
        tree.crtime = tree.ctime;
        let old = WrittenByV1 {
            version: 1,
            time: Time::now(),
            tree: v1_of(&tree),
            previous: None,
        };
        let r = RootRecord::decode(&postcard::to_allocvec(&old).unwrap()).unwrap();
        assert_eq!((r.version, r.manifest, &r.tree), (1, None, &tree));
        assert!(r.snapshots.is_empty() && r.snapshot);

        let manifest = FileRef::Tree(pointer(9));
        let v2 = WrittenByV2 {
            version: 2,
            time: Time::now(),
            tree: v1_of(&tree),
            previous: Some(pointer(3)),
            manifest: Some(manifest.clone()),
        };
        let r = RootRecord::decode(&postcard::to_allocvec(&v2).unwrap()).unwrap();
        assert_eq!(
            (r.version, &r.manifest, &r.tree),
            (2, &Some(manifest.clone()), &tree)
        );

        let mut linked = dir_entry();
        linked.ino = 42;
        let new = RootRecord {
            version: SNAPSHOT_VERSION,
            time: Time::now(),
            tree: linked.clone(),
            previous: None,
            manifest: Some(manifest.clone()),
            snapshots: vec![SnapshotRecord {
                time: Time { secs: 5, nanos: 6 },
                root: pointer(4),
            }],
            snapshot: false,
        };
        let r = RootRecord::decode(&postcard::to_allocvec(&new).unwrap()).unwrap();
        assert_eq!((r.version, r.manifest, r.tree), (3, Some(manifest), linked));
        assert_eq!(r.snapshots.len(), 1);
        assert_eq!(r.snapshots[0].root.score, Score([4; 32]));
        assert!(!r.snapshot);

        let mut future = postcard::to_allocvec(&new).unwrap();
        future[0] = 4;
        assert!(RootRecord::decode(&future).is_err());
    }

    #[test]
    fn version_1_directory_streams_still_read() {
        #[derive(Serialize)]
        struct StreamV1 {
            version: u8,
            entries: Vec<SnapEntryV1>,
        }
        let mut e = dir_entry();
        e.name = b"a".to_vec();
        let bytes = postcard::to_allocvec(&StreamV1 {
            version: 1,
            entries: vec![v1_of(&e)],
        })
        .unwrap();
        let got = decode_dir(&bytes).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].ino, &got[0].name, got[0].crtime),
            (0, &e.name, e.ctime)
        );
        let v2 = postcard::to_allocvec(&DirStream {
            version: DIR_STREAM_VERSION,
            entries: vec![e.clone()],
        })
        .unwrap();
        assert_eq!(decode_dir(&v2).unwrap(), vec![e]);
        assert!(decode_dir(&[9, 0]).is_err());
        assert!(decode_dir(&[]).is_err());
    }
}
