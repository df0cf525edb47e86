//! The filesystem as the durability engine sees it: what each own block
//! wants ([`fincrypt_engine::Wants`]). A full walk goes over the live tree
//! and every retained snapshot; between walks, what changed comes from the
//! metadata's change feed (inodes written or newly named) and from
//! snapshots taken since, whose trees are walked only where the engine does
//! not track them yet.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fincrypt_blockstore::{FileRef, Pointer, Score};
use fincrypt_engine::{Changes, META_REDUNDANCY, Wanted};
use fincrypt_fs::Fossil;
use fincrypt_fs::meta::{Kind, Time};
use fincrypt_fs::walk::{Item, Live, Walk, walk};
use serde::{Deserialize, Serialize};

type Result<T> = std::result::Result<T, fincrypt_engine::Error>;

fn walk_error(e: impl Into<anyhow::Error>) -> fincrypt_engine::Error {
    fincrypt_engine::Error::Wants(format!("{:#}", e.into()))
}

/// Changed inodes taken per [`fincrypt_engine::Wants::changes`].
const CHANGES_AT_ONCE: usize = 20_000;

/// The mount's filesystem, adapted for the engine.
pub struct FsWants {
    pub fs: Arc<Fossil>,
    /// The daemon's snapshot lock: held while walking, so GC and pruning do not run under it.
    pub snapshots: Arc<Mutex<()>>,
    /// Copies of data blocks where no directory says otherwise.
    pub default: u8,
    /// Changes handed out and not yet [taken](fincrypt_engine::Wants::taken).
    pub handed: Mutex<Vec<(u64, u64)>>,
    /// The last walk's highest redundancy asked, in all and of the live tree.
    pub highest: Mutex<Option<(u8, u8)>>,
}

/// Where the change feed was left (kept by the engine, opaque to it).
#[derive(Serialize, Deserialize)]
struct Cursor {
    /// The newest snapshot already handed out.
    snapshot: Option<Time>,
    /// The metadata's redundancy-change counter then: any change means a walk.
    redundancy_changes: u64,
    /// The default redundancy then.
    default: u8,
    /// The highest redundancy in use at the last walk (metadata blocks ask for it).
    highest: u8,
}

impl FsWants {
    /// The adapter over `fs`, walking under the daemon's `snapshots` lock.
    pub fn new(fs: Arc<Fossil>, snapshots: Arc<Mutex<()>>, default: u8) -> FsWants {
        FsWants {
            fs,
            snapshots,
            default: default.max(1),
            handed: Mutex::new(Vec::new()),
            highest: Mutex::new(None),
        }
    }

    fn hand_out(&self, changed: Vec<(u64, u64)>) {
        *self.handed.lock().unwrap_or_else(|p| p.into_inner()) = changed;
    }
}

impl fincrypt_engine::Wants for FsWants {
    fn wanted(&self) -> Result<(Wanted, Vec<u8>)> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let meta = self.fs.meta();
        // Read before the walk: the walk sees at least these changes.
        let changed = meta.changed(usize::MAX).map_err(walk_error)?;
        let redundancy_changes = meta.redundancy_changes().map_err(walk_error)?;
        let newest = meta.roots().map_err(walk_error)?.last().map(|s| s.time);
        let (wanted, walked) = wanted(&self.fs, self.default).map_err(walk_error)?;
        let highest = walked.highest;
        *self.highest.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((walked.highest, walked.highest_live));
        self.hand_out(changed);
        let cursor = Cursor {
            snapshot: newest,
            redundancy_changes,
            default: self.default,
            highest,
        };
        Ok((wanted, postcard::to_allocvec(&cursor).map_err(walk_error)?))
    }

    fn changes(&self, cursor: &[u8], known: &dyn Fn(&Score) -> bool) -> Result<Option<Changes>> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(mut c) = postcard::from_bytes::<Cursor>(cursor) else {
            return Ok(None);
        };
        let meta = self.fs.meta();
        if c.default != self.default
            || meta.redundancy_changes().map_err(walk_error)? != c.redundancy_changes
        {
            // A setting changed: only a walk knows what now wants fewer copies.
            return Ok(None);
        }
        let changed = meta.changed(CHANGES_AT_ONCE).map_err(walk_error)?;
        let more = changed.len() == CHANGES_AT_ONCE;
        let mut feed = Feed::new(&self.fs, c.highest);
        let view = meta.view().map_err(walk_error)?;
        let mut memo = HashMap::new();
        for (ino, _) in &changed {
            let inode = match view.inode(*ino) {
                Ok(i) => i,
                // Deleted since: nothing of it is wanted.
                Err(fincrypt_fs::FsError::Errno(libc::ENOENT)) => continue,
                Err(e) => return Err(walk_error(e)),
            };
            let n = fincrypt_fs::walk::effective_redundancy(&view, *ino, self.default, &mut memo)
                .map_err(walk_error)?;
            if n > c.highest {
                return Ok(None);
            }
            if inode.kind == Kind::Dir {
                feed.live_subtree(*ino, n).map_err(walk_error)?;
            } else {
                feed.file(&inode.content, n, false).map_err(walk_error)?;
            }
        }
        drop(view);
        c.snapshot = feed
            .snapshots(c.snapshot, self.default, known)
            .map_err(walk_error)?;
        self.hand_out(changed);
        let Feed { blocks, walked, .. } = feed;
        Ok(Some(Changes {
            blocks: blocks.into_iter().collect(),
            walked,
            cursor: postcard::to_allocvec(&c).map_err(walk_error)?,
            more,
        }))
    }

    fn taken(&self) -> Result<()> {
        let handed = std::mem::take(&mut *self.handed.lock().unwrap_or_else(|p| p.into_inner()));
        self.fs.meta().take_changed(&handed).map_err(walk_error)
    }

    fn paths_of(&self, scores: &[Score]) -> Result<Vec<(Score, String)>> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        paths_of(&self.fs, scores).map_err(walk_error)
    }
}

/// Blocks found changed, with the copies each asks for.
struct Feed<'a> {
    fs: &'a Fossil,
    meta_n: u8,
    blocks: HashMap<Score, u8>,
    walked: u64,
}

impl Feed<'_> {
    fn new(fs: &Fossil, highest: u8) -> Feed<'_> {
        Feed {
            fs,
            meta_n: highest.max(META_REDUNDANCY),
            blocks: HashMap::new(),
            walked: 0,
        }
    }

    fn want(&mut self, score: Score, n: u8) {
        let e = self.blocks.entry(score).or_insert(n);
        *e = (*e).max(n);
    }

    /// A file's (or directory stream's) blocks: data at `n`, the rest as metadata.
    fn file(
        &mut self,
        f: &FileRef,
        n: u8,
        is_dir: bool,
    ) -> std::result::Result<(), fincrypt_fs::FsError> {
        let meta_n = self.meta_n;
        let mut found = Vec::new();
        self.fs.reader().visit_scores(f, &mut |p: &Pointer| {
            found.push((p.score, if p.depth == 0 && !is_dir { n } else { meta_n }));
        })?;
        self.walked += found.len() as u64;
        for (s, n) in found {
            self.want(s, n);
        }
        Ok(())
    }

    /// Every file below live directory `dir`, which asks for `n`.
    fn live_subtree(&mut self, dir: u64, n: u8) -> anyhow::Result<()> {
        let opts = Walk {
            default: n,
            live: Live::Below {
                ino: dir,
                redundancy: n,
            },
            snapshots_after: Some(Time {
                secs: i64::MAX,
                nanos: 0,
            }),
            paths: false,
        };
        let fs = self.fs;
        walk(fs, &opts, &mut |item| {
            if let Item::File {
                content,
                redundancy,
                ..
            } = item
            {
                self.file(content, redundancy, false)?;
            }
            Ok(true)
        })?;
        Ok(())
    }

    /// Snapshots taken after `after`: each one's root and manifest, and the
    /// parts of its tree the engine does not track yet (a tree it tracks was
    /// taken with everything below it, since a tree's blocks are named by
    /// content). Returns the newest snapshot walked.
    fn snapshots(
        &mut self,
        after: Option<Time>,
        default: u8,
        known: &dyn Fn(&Score) -> bool,
    ) -> anyhow::Result<Option<Time>> {
        let opts = Walk {
            default,
            live: Live::None,
            snapshots_after: after,
            paths: false,
        };
        let tracked = |f: &FileRef| f.root().is_some_and(|p| known(&p.score));
        let fs = self.fs;
        let walked = walk(fs, &opts, &mut |item| {
            Ok(match item {
                Item::Root { snap, root } => {
                    self.want(snap.root.score, self.meta_n);
                    self.walked += 1;
                    if let Some(m) = &root.manifest {
                        self.file(m, default, true)?;
                    }
                    true
                }
                Item::Dir {
                    content,
                    redundancy,
                    ..
                } => {
                    if tracked(content) {
                        false
                    } else {
                        self.file(content, redundancy, true)?;
                        true
                    }
                }
                Item::File {
                    content,
                    redundancy,
                    ..
                } => {
                    if !tracked(content) {
                        self.file(content, redundancy, false)?;
                    }
                    true
                }
            })
        })?;
        Ok(walked.newest.or(after))
    }
}

/// Where each of `scores` is used in the live tree, or else in a retained
/// snapshot (as `.snapshots/NAME/path`).
pub fn paths_of(fs: &Fossil, scores: &[Score]) -> anyhow::Result<Vec<(Score, String)>> {
    let wanted: HashSet<Score> = scores.iter().copied().collect();
    let mut found: HashMap<Score, String> = HashMap::new();
    let reader = fs.reader();
    let mut opts = Walk::all(1);
    opts.paths = true;
    walk(fs, &opts, &mut |item| {
        let (content, path) = match item {
            Item::Root { snap, .. } => {
                if wanted.contains(&snap.root.score) {
                    let name = format!("/.snapshots/{}", fincrypt_fs::snapdir::name(snap.time));
                    found.entry(snap.root.score).or_insert(name);
                }
                return Ok(true);
            }
            Item::Dir { content, path, .. } | Item::File { content, path, .. } => (content, path),
        };
        reader.visit_scores(content, &mut |p: &Pointer| {
            if wanted.contains(&p.score) {
                found.entry(p.score).or_insert_with(|| path.to_owned());
            }
        })?;
        Ok(true)
    })?;
    Ok(scores
        .iter()
        .filter_map(|s| found.get(s).map(|p| (*s, p.clone())))
        .collect())
}

/// Works out the redundancy every referenced own block asks for, and the
/// highest redundancy in use: data blocks their file's, every other block
/// the highest and at least [`META_REDUNDANCY`].
pub fn wanted(fs: &Fossil, default: u8) -> anyhow::Result<(Wanted, fincrypt_fs::walk::Walked)> {
    let mut data: HashMap<Score, u8> = HashMap::new();
    let mut meta: HashSet<Score> = HashSet::new();
    let reader = fs.reader();
    let walked = walk(fs, &Walk::all(default), &mut |item| {
        let (content, n, is_data) = match item {
            Item::Root { snap, root } => {
                meta.insert(snap.root.score);
                // The manifest's blocks are metadata, like the root that names them.
                match &root.manifest {
                    Some(m) => (m, 0, false),
                    None => return Ok(true),
                }
            }
            Item::Dir { content, .. } => (content, 0, false),
            Item::File {
                content,
                redundancy,
                ..
            } => (content, redundancy, true),
        };
        reader.visit_scores(content, &mut |p: &Pointer| {
            if p.depth == 0 && is_data {
                let e = data.entry(p.score).or_insert(n);
                *e = (*e).max(n);
            } else {
                meta.insert(p.score);
            }
        })?;
        Ok(true)
    })?;
    let meta_n = walked.highest.max(META_REDUNDANCY);
    let mut out: Wanted = data.into_iter().collect();
    for s in meta {
        out.insert(s, meta_n);
    }
    Ok((out, walked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::{BlockStore, LocalStore, MasterSecret, StoreOptions, TreeParams};
    use fincrypt_fs::fossil::REDUNDANCY_XATTR;
    use fincrypt_fs::meta::ROOT_INO;
    use fincrypt_fs::snapshot;
    use fincrypt_fs::{Caller, Meta};

    /// The copies asked of a file's data blocks follow the highest setting
    /// over the live tree and every retained snapshot, also when the walk
    /// skips trees it has seen (snapshots share them).
    fn new_fs(dir: &std::path::Path) -> Fossil {
        let keys = MasterSecret::generate().keys();
        let store: Arc<dyn BlockStore> =
            Arc::new(LocalStore::open(&dir.join("volume"), StoreOptions::default()).unwrap());
        let meta = Meta::open(&dir.join("meta.redb"), &keys, 0, 0).unwrap();
        Fossil::new(meta, store, keys, TreeParams::default(), dir.into()).unwrap()
    }

    /// A file of `len` bytes from `seed` at `parent/name`; returns its inode
    /// and its data blocks.
    fn write_file(fs: &Fossil, parent: u64, name: &[u8], seed: u8) -> (u64, Vec<Score>) {
        let who = Caller { uid: 0, gid: 0 };
        let ino = fs.create(parent, name, 0o644, who).unwrap().ino;
        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i * 31 + seed as u32) as u8 ^ seed)
            .collect();
        fs.write(ino, 0, &data).unwrap();
        fs.release(ino).unwrap();
        let inode = fs.meta().inode(ino).unwrap();
        let mut scores = Vec::new();
        fs.reader()
            .visit_scores(&inode.content, &mut |p| {
                if p.depth == 0 {
                    scores.push(p.score);
                }
            })
            .unwrap();
        assert!(!scores.is_empty());
        (ino, scores)
    }

    /// Between walks the change feed hands out exactly what changed, with
    /// the copies it asks for, and nothing when nothing did; a lowered or
    /// raised setting asks for a walk.
    #[test]
    fn the_change_feed_hands_out_new_blocks_with_their_redundancy() {
        use fincrypt_engine::Wants;
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(new_fs(dir.path()));
        let who = Caller { uid: 0, gid: 0 };
        let mk = |name: &[u8]| {
            fs.mknod(ROOT_INO, name, Kind::Dir, 0o755, 0, None, who)
                .unwrap()
                .ino
        };
        let (a, b) = (mk(b"a"), mk(b"b"));
        fs.setxattr(a, REDUNDANCY_XATTR, b"4", false, false)
            .unwrap();
        write_file(&fs, a, b"old", 9);
        let w = FsWants::new(fs.clone(), Arc::new(Mutex::new(())), 2);
        let (full, cursor) = w.wanted().unwrap();
        w.taken().unwrap();
        let none = |_: &Score| false;
        let c = w.changes(&cursor, &none).unwrap().expect("no walk needed");
        assert!(c.blocks.is_empty(), "nothing changed: {:?}", c.blocks);
        assert_eq!(c.walked, 0);

        // A new file in b: its data at the default, its other blocks as metadata.
        let (g, g_data) = write_file(&fs, b, b"g", 1);
        let c = w.changes(&c.cursor, &none).unwrap().unwrap();
        w.taken().unwrap();
        let got: HashMap<Score, u8> = c.blocks.iter().copied().collect();
        for s in &g_data {
            assert_eq!(got.get(s), Some(&2), "a data block of g");
        }
        assert!(got.values().all(|n| *n == 2 || *n == 4), "{got:?}");
        assert!(
            got.keys()
                .all(|s| !full.contains_key(s) || full[s] >= got[s])
        );
        let c = w.changes(&c.cursor, &none).unwrap().unwrap();
        assert!(
            c.blocks.is_empty(),
            "taken changes are not handed out again"
        );

        // A second name in a (redundancy 4): g's data now asks for 4.
        fs.link(g, a, b"g2").unwrap();
        let c = w.changes(&c.cursor, &none).unwrap().unwrap();
        w.taken().unwrap();
        let got: HashMap<Score, u8> = c.blocks.iter().copied().collect();
        for s in &g_data {
            assert_eq!(got.get(s), Some(&4), "g linked under a");
        }

        // A snapshot: its root and the directory streams not tracked yet.
        let snap = snapshot::create(&fs).unwrap();
        let c = w.changes(&c.cursor, &none).unwrap().unwrap();
        w.taken().unwrap();
        assert!(
            c.blocks.iter().any(|(s, _)| *s == snap.root.score),
            "the snapshot's root"
        );
        let all_known = |_: &Score| true;
        snapshot::create(&fs).unwrap();
        let c2 = w.changes(&c.cursor, &all_known).unwrap().unwrap();
        assert_eq!(
            c2.blocks.len(),
            1,
            "a tracked tree is not walked again: {:?}",
            c2.blocks
        );

        // A setting changed: only a walk can say what wants fewer copies.
        fs.setxattr(a, REDUNDANCY_XATTR, b"3", false, false)
            .unwrap();
        assert!(w.changes(&c2.cursor, &none).unwrap().is_none());
        let (full, cursor) = w.wanted().unwrap();
        w.taken().unwrap();
        for s in &g_data {
            assert_eq!(full[s], 4, "the retained snapshots still ask for 4");
        }
        assert!(
            w.changes(&cursor, &none)
                .unwrap()
                .unwrap()
                .blocks
                .is_empty()
        );
    }

    #[test]
    fn wanted_takes_the_highest_redundancy_over_live_tree_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let fs = new_fs(dir.path());
        let who = Caller { uid: 0, gid: 0 };
        let a = fs
            .mknod(ROOT_INO, b"a", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let b = fs
            .mknod(ROOT_INO, b"b", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let f = write_file(&fs, a, b"f", 1).1;
        let g = write_file(&fs, b, b"g", 2).1;
        let set = |ino: u64, n: &str| {
            fs.setxattr(ino, REDUNDANCY_XATTR, n.as_bytes(), false, false)
                .unwrap()
        };
        let asked = |scores: &[Score]| -> Vec<u8> {
            let (w, _) = wanted(&fs, 2).unwrap();
            scores.iter().map(|s| w[s]).collect()
        };

        set(a, "2");
        snapshot::create(&fs).unwrap();
        set(a, "4");
        assert!(
            asked(&f).iter().all(|n| *n == 4),
            "the live setting, higher than the snapshot's"
        );
        snapshot::create(&fs).unwrap();
        set(a, "1");
        assert!(
            asked(&f).iter().all(|n| *n == 4),
            "the newer snapshot's setting, higher than live"
        );
        assert!(asked(&g).iter().all(|n| *n == 2), "the default, everywhere");
    }
}
