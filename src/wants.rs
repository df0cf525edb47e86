//! The filesystem as the durability engine sees it: what each own block
//! wants ([`fincrypt_engine::Wants`]), worked out by walking the live tree
//! and every retained snapshot, as GC does.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use fincrypt_blockstore::{FileRef, Pointer, Score};
use fincrypt_engine::{META_REDUNDANCY, Wanted};
use fincrypt_fs::meta::{Kind, ROOT_INO};
use fincrypt_fs::{Fossil, snapshot};

type Result<T> = std::result::Result<T, fincrypt_engine::Error>;

fn walk_error(e: anyhow::Error) -> fincrypt_engine::Error {
    fincrypt_engine::Error::Wants(format!("{e:#}"))
}

/// The mount's filesystem, adapted for the engine.
pub struct FsWants {
    pub fs: Arc<Fossil>,
    /// The daemon's snapshot lock: held while walking, so GC and pruning do not run under it.
    pub snapshots: Arc<Mutex<()>>,
    /// Copies of data blocks where no directory says otherwise.
    pub default: u8,
    /// The local volume: GC changes what is wanted without a metadata write.
    pub volume: Arc<fincrypt_blockstore::LocalStore>,
}

impl fincrypt_engine::Wants for FsWants {
    fn wanted(&self) -> Result<Wanted> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        wanted(&self.fs, self.default).map_err(walk_error)
    }

    fn generation(&self) -> Option<u64> {
        // Metadata writes (files sealed, names, xattrs, snapshots) and the
        // volume's own blocks (GC) are all that change the wanted set.
        let s = self.volume.stats();
        let m = self.fs.meta().generation();
        Some(m.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ s.own_blocks ^ s.own_bytes.rotate_left(32))
    }

    fn paths_of(&self, scores: &[Score]) -> Result<Vec<(Score, String)>> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        paths_of(&self.fs, scores).map_err(walk_error)
    }
}

/// Where each of `scores` is used in the live tree, or else in a retained
/// snapshot (as `.snapshots/NAME/path`).
pub fn paths_of(fs: &Fossil, scores: &[Score]) -> anyhow::Result<Vec<(Score, String)>> {
    let wanted: HashSet<Score> = scores.iter().copied().collect();
    let mut found: HashMap<Score, String> = HashMap::new();
    let reader = fs.reader();
    let note =
        |f: &FileRef, path: &str, found: &mut HashMap<Score, String>| -> anyhow::Result<()> {
            reader.visit_scores(f, &mut |p: &Pointer| {
                if wanted.contains(&p.score) {
                    found.entry(p.score).or_insert_with(|| path.to_owned());
                }
            })?;
            Ok(())
        };
    let view = fs.meta().view()?;
    let mut dirs = vec![(ROOT_INO, String::new())];
    let mut seen = HashSet::new();
    while let Some((dir, path)) = dirs.pop() {
        if !seen.insert(dir) {
            continue;
        }
        for d in view.entries(dir)? {
            let inode = view.inode(d.ino)?;
            let p = format!("{path}/{}", String::from_utf8_lossy(&d.name));
            if inode.kind == Kind::Dir {
                dirs.push((d.ino, p));
            } else {
                note(&inode.content, &p, &mut found)?;
            }
        }
    }
    drop(view);
    for snap in fs.meta().snapshots()? {
        let name = format!("/.snapshots/{}", fincrypt_fs::snapdir::name(snap.time));
        if wanted.contains(&snap.root.score) {
            found.entry(snap.root.score).or_insert_with(|| name.clone());
        }
        let r = snapshot::root(fs, &snap)?;
        let mut dirs = vec![(r.tree, name)];
        while let Some((d, path)) = dirs.pop() {
            note(&d.content, &path, &mut found)?;
            for e in snapshot::read_dir(fs, &d)? {
                let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
                if e.kind == Kind::Dir {
                    dirs.push((e, p));
                } else {
                    note(&e.content, &p, &mut found)?;
                }
            }
        }
    }
    Ok(scores
        .iter()
        .filter_map(|s| found.get(s).map(|p| (*s, p.clone())))
        .collect())
}

/// Works out the redundancy every referenced own block asks for.
pub fn wanted(fs: &Fossil, default: u8) -> anyhow::Result<Wanted> {
    let default = default.max(1);
    let mut data: HashMap<Score, u8> = HashMap::new();
    let mut meta: HashSet<Score> = HashSet::new();
    let mut highest = default;
    let reader = fs.reader();
    let add_file = |f: &FileRef,
                    n: u8,
                    is_dir: bool,
                    data: &mut HashMap<Score, u8>,
                    meta: &mut HashSet<Score>|
     -> anyhow::Result<()> {
        reader.visit_scores(f, &mut |p: &Pointer| {
            if p.depth == 0 && !is_dir {
                let e = data.entry(p.score).or_insert(n);
                *e = (*e).max(n);
            } else {
                meta.insert(p.score);
            }
        })?;
        Ok(())
    };

    // Trees already walked, with the redundancy asked of them then: walking
    // one again at no higher redundancy adds nothing, and the live tree and
    // the retained snapshots share most of their trees.
    let mut walked: HashMap<(Score, bool), u8> = HashMap::new();
    fn fresh(walked: &mut HashMap<(Score, bool), u8>, f: &FileRef, n: u8, is_dir: bool) -> bool {
        let FileRef::Tree(p) = f else { return true };
        let seen = walked.entry((p.score, is_dir)).or_insert(0);
        if *seen >= n {
            return false;
        }
        *seen = n;
        true
    }

    // The live tree, carrying each directory's effective redundancy down.
    let view = fs.meta().view()?;
    let root = view.inode(ROOT_INO)?;
    let root_n = root.redundancy.unwrap_or(default);
    highest = highest.max(root_n);
    let mut dirs = vec![(ROOT_INO, root_n)];
    let mut seen_dirs = HashSet::new();
    while let Some((dir, n)) = dirs.pop() {
        if !seen_dirs.insert(dir) {
            continue;
        }
        for d in view.entries(dir)? {
            let inode = view.inode(d.ino)?;
            let m = inode.redundancy.unwrap_or(n);
            highest = highest.max(m);
            if inode.kind == Kind::Dir {
                dirs.push((d.ino, m));
            } else if fresh(&mut walked, &inode.content, m, false) {
                add_file(&inode.content, m, false, &mut data, &mut meta)?;
            }
        }
    }
    // Files no name leads to (unlinked while open) still have blocks.
    for content in view.contents()? {
        reader.visit_scores(&content, &mut |p: &Pointer| {
            if p.depth == 0 {
                data.entry(p.score).or_insert(default);
            } else {
                meta.insert(p.score);
            }
        })?;
    }
    drop(view);

    // Retained snapshots, with the settings they recorded.
    for snap in fs.meta().snapshots()? {
        meta.insert(snap.root.score);
        let r = snapshot::root(fs, &snap)?;
        // The manifest's blocks are metadata, like the root that names them.
        if let Some(m) = &r.manifest {
            add_file(m, default, true, &mut data, &mut meta)?;
        }
        let n = r.tree.redundancy.unwrap_or(default);
        let mut dirs = vec![(r.tree, n)];
        while let Some((d, n)) = dirs.pop() {
            if !fresh(&mut walked, &d.content, n, true) {
                // Listed before at this redundancy or higher: all below it too.
                continue;
            }
            add_file(&d.content, n, true, &mut data, &mut meta)?;
            for e in snapshot::read_dir(fs, &d)? {
                let m = e.redundancy.unwrap_or(n);
                highest = highest.max(m);
                if e.kind == Kind::Dir {
                    dirs.push((e, m));
                } else if fresh(&mut walked, &e.content, m, false) {
                    add_file(&e.content, m, false, &mut data, &mut meta)?;
                }
            }
        }
    }

    let meta_n = highest.max(META_REDUNDANCY);
    let mut out: Wanted = data.into_iter().collect();
    for s in meta {
        out.insert(s, meta_n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::{BlockStore, LocalStore, MasterSecret, StoreOptions, TreeParams};
    use fincrypt_fs::fossil::REDUNDANCY_XATTR;
    use fincrypt_fs::{Caller, Meta};

    /// The copies asked of a file's data blocks follow the highest setting
    /// over the live tree and every retained snapshot, also when the walk
    /// skips trees it has seen (snapshots share them).
    #[test]
    fn wanted_takes_the_highest_redundancy_over_live_tree_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterSecret::generate().keys();
        let store: Arc<dyn BlockStore> = Arc::new(
            LocalStore::open(&dir.path().join("volume"), StoreOptions::default()).unwrap(),
        );
        let meta = Meta::open(&dir.path().join("meta.redb"), &keys, 0, 0).unwrap();
        let fs = Fossil::new(meta, store, keys, TreeParams::default(), dir.path().into()).unwrap();
        let who = Caller { uid: 0, gid: 0 };
        let a = fs
            .mknod(ROOT_INO, b"a", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let b = fs
            .mknod(ROOT_INO, b"b", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let write = |parent: u64, name: &[u8], seed: u8| {
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
            scores
        };
        let f = write(a, b"f", 1);
        let g = write(b, b"g", 2);
        let set = |ino: u64, n: &str| {
            fs.setxattr(ino, REDUNDANCY_XATTR, n.as_bytes(), false, false)
                .unwrap()
        };
        let asked = |scores: &[Score]| -> Vec<u8> {
            let w = wanted(&fs, 2).unwrap();
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
