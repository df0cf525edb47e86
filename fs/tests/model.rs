//! Reference-model test: random operation sequences on the inner filesystem,
//! each result compared with a plain in-memory model of a directory.
//!
//! Tiny chunks and fanout make every file a multi-level block tree, so the
//! write buffer, truncation, sealing and resumed chunking are all exercised,
//! and a reopen from disk checks that sealed state persists.

use std::collections::BTreeMap;
use std::sync::Arc;

use fincrypt_blockstore::{BlockStore, LocalStore, MasterSecret, StoreOptions, TreeParams};
use fincrypt_fs::{Caller, Fossil, FsError, Kind, Meta, SetAttr};
use proptest::prelude::*;

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const ROOT: u64 = 1;
const PARAMS: TreeParams = TreeParams {
    min_chunk: 64,
    avg_chunk: 256,
    max_chunk: 1024,
    fanout: 4,
    inline_max: 64,
};
const WHO: Caller = Caller { uid: 0, gid: 0 };

#[derive(Clone, Debug)]
enum Op {
    Create(usize),
    Mkdir(usize),
    Write {
        name: usize,
        offset: u32,
        len: u16,
        byte: u8,
    },
    Truncate {
        name: usize,
        size: u32,
    },
    Read {
        name: usize,
        offset: u32,
        len: u16,
    },
    Unlink(usize),
    Rmdir(usize),
    Rename(usize, usize),
    Link(usize, usize),
    Fsync(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        n.clone().prop_map(Op::Create),
        n.clone().prop_map(Op::Mkdir),
        (n.clone(), 0u32..20_000, 0u16..6000, any::<u8>()).prop_map(|(name, offset, len, byte)| {
            Op::Write {
                name,
                offset,
                len,
                byte,
            }
        }),
        (n.clone(), 0u32..25_000).prop_map(|(name, size)| Op::Truncate { name, size }),
        (n.clone(), 0u32..25_000, 0u16..8000).prop_map(|(name, offset, len)| Op::Read {
            name,
            offset,
            len
        }),
        n.clone().prop_map(Op::Unlink),
        n.clone().prop_map(Op::Rmdir),
        (n.clone(), n.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        (n.clone(), n.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        n.prop_map(Op::Fsync),
        Just(Op::Reopen),
    ]
}

/// The model: names in one directory, each a file (shared by hard links) or an empty directory.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    File(usize),
    /// An empty directory, with an identity so two directories never compare equal.
    Dir(usize),
}

#[derive(Default)]
struct Model {
    names: BTreeMap<usize, Node>,
    files: Vec<Vec<u8>>,
    dirs: usize,
}

fn errno<T>(r: Result<T, FsError>) -> Result<T, i32> {
    r.map_err(|e| e.errno())
}

struct Harness {
    dir: tempfile::TempDir,
    keys: fincrypt_blockstore::Keys,
    fs: Option<Fossil>,
    /// Inodes opened by this test and not yet released (opened once per create).
    open: Vec<u64>,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            keys: MasterSecret::generate().keys(),
            fs: None,
            open: Vec::new(),
        };
        h.fs = Some(h.mount());
        h
    }

    fn mount(&self) -> Fossil {
        let store: Arc<dyn BlockStore> = Arc::new(
            LocalStore::open(&self.dir.path().join("volume"), StoreOptions::default()).unwrap(),
        );
        let meta = Meta::open(&self.dir.path().join("meta.redb"), &self.keys, 0, 0).unwrap();
        Fossil::new(
            meta,
            store,
            self.keys.clone(),
            PARAMS,
            self.dir.path().to_path_buf(),
        )
        .unwrap()
    }

    fn fs(&self) -> &Fossil {
        self.fs.as_ref().unwrap()
    }

    fn ino(&self, name: usize) -> Result<u64, i32> {
        errno(self.fs().lookup(ROOT, NAMES[name].as_bytes())).map(|a| a.ino)
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut h = Harness::new();
    let mut m = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        match op {
            Op::Create(n) => {
                let got =
                    errno(
                        h.fs()
                            .mknod(ROOT, NAMES[n].as_bytes(), Kind::File, 0o644, 0, None, WHO),
                    );
                if m.names.contains_key(&n) {
                    prop_assert_eq!(got.err(), Some(libc::EEXIST), "{}", ctx);
                } else {
                    let a = got.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                    h.fs().open(a.ino).unwrap();
                    h.open.push(a.ino);
                    m.files.push(Vec::new());
                    m.names.insert(n, Node::File(m.files.len() - 1));
                }
            }
            Op::Mkdir(n) => {
                let got =
                    errno(
                        h.fs()
                            .mknod(ROOT, NAMES[n].as_bytes(), Kind::Dir, 0o755, 0, None, WHO),
                    );
                if m.names.contains_key(&n) {
                    prop_assert_eq!(got.err(), Some(libc::EEXIST), "{}", ctx);
                } else {
                    prop_assert!(got.is_ok(), "{}", ctx);
                    m.dirs += 1;
                    m.names.insert(n, Node::Dir(m.dirs));
                }
            }
            Op::Write {
                name,
                offset,
                len,
                byte,
            } => {
                if let Some(Node::File(f)) = m.names.get(&name).cloned() {
                    let ino = h.ino(name).unwrap();
                    let data = vec![byte; len as usize];
                    h.fs().write(ino, offset as u64, &data).unwrap();
                    // A write of nothing changes nothing, not even the length.
                    if len > 0 {
                        let file = &mut m.files[f];
                        let end = offset as usize + len as usize;
                        if file.len() < end {
                            file.resize(end, 0);
                        }
                        file[offset as usize..end].copy_from_slice(&data);
                    }
                }
            }
            Op::Truncate { name, size } => match m.names.get(&name).cloned() {
                Some(Node::File(f)) => {
                    let ino = h.ino(name).unwrap();
                    let a = h
                        .fs()
                        .setattr(
                            ino,
                            SetAttr {
                                size: Some(size as u64),
                                ..Default::default()
                            },
                        )
                        .unwrap();
                    prop_assert_eq!(a.size, size as u64, "{}", ctx);
                    m.files[f].resize(size as usize, 0);
                }
                Some(Node::Dir(_)) => {
                    let ino = h.ino(name).unwrap();
                    let got = errno(h.fs().setattr(
                        ino,
                        SetAttr {
                            size: Some(size as u64),
                            ..Default::default()
                        },
                    ));
                    prop_assert_eq!(got.err(), Some(libc::EISDIR), "{}", ctx);
                }
                None => {}
            },
            Op::Read { name, offset, len } => match m.names.get(&name).cloned() {
                Some(Node::File(f)) => {
                    let ino = h.ino(name).unwrap();
                    let got = h.fs().read(ino, offset as u64, len as u32).unwrap();
                    let file = &m.files[f];
                    let start = (offset as usize).min(file.len());
                    let end = (offset as usize + len as usize).min(file.len());
                    prop_assert_eq!(&got[..], &file[start..end], "{}", ctx);
                    prop_assert_eq!(
                        h.fs().getattr(ino).unwrap().size,
                        file.len() as u64,
                        "{}",
                        ctx
                    );
                }
                _ => prop_assert!(
                    h.ino(name).map(|i| h.fs().getattr(i).unwrap().kind) != Ok(Kind::File),
                    "{}",
                    ctx
                ),
            },
            Op::Unlink(n) => {
                let got = errno(h.fs().unlink(ROOT, NAMES[n].as_bytes()));
                match m.names.get(&n) {
                    None => prop_assert_eq!(got, Err(libc::ENOENT), "{}", ctx),
                    Some(Node::Dir(_)) => prop_assert_eq!(got, Err(libc::EISDIR), "{}", ctx),
                    Some(Node::File(_)) => {
                        prop_assert_eq!(got, Ok(()), "{}", ctx);
                        m.names.remove(&n);
                    }
                }
            }
            Op::Rmdir(n) => {
                let got = errno(h.fs().rmdir(ROOT, NAMES[n].as_bytes()));
                match m.names.get(&n) {
                    None => prop_assert_eq!(got, Err(libc::ENOENT), "{}", ctx),
                    Some(Node::File(_)) => prop_assert_eq!(got, Err(libc::ENOTDIR), "{}", ctx),
                    Some(Node::Dir(_)) => {
                        prop_assert_eq!(got, Ok(()), "{}", ctx);
                        m.names.remove(&n);
                    }
                }
            }
            Op::Rename(a, b) => {
                let got = errno(h.fs().rename(
                    ROOT,
                    NAMES[a].as_bytes(),
                    ROOT,
                    NAMES[b].as_bytes(),
                    false,
                    false,
                ));
                let want = match (m.names.get(&a).cloned(), m.names.get(&b).cloned()) {
                    (None, _) => Err(libc::ENOENT),
                    (Some(x), Some(y)) if x == y && matches!(x, Node::File(_)) => Ok(()),
                    (Some(_), _) if a == b => Ok(()),
                    (Some(Node::Dir(_)), Some(Node::File(_))) => Err(libc::ENOTDIR),
                    (Some(Node::File(_)), Some(Node::Dir(_))) => Err(libc::EISDIR),
                    (Some(x), _) => {
                        // Two names of one file: POSIX leaves both in place.
                        if m.names.get(&b) != Some(&x) {
                            m.names.remove(&a);
                            m.names.insert(b, x);
                        }
                        Ok(())
                    }
                };
                prop_assert_eq!(got, want, "{}", ctx);
            }
            Op::Link(a, b) => {
                let got = match h.ino(a) {
                    Ok(ino) => errno(h.fs().link(ino, ROOT, NAMES[b].as_bytes()).map(|_| ())),
                    Err(e) => Err(e),
                };
                let want = match (m.names.get(&a).cloned(), m.names.contains_key(&b)) {
                    (None, _) => Err(libc::ENOENT),
                    (Some(Node::Dir(_)), _) => Err(libc::EPERM),
                    (Some(_), true) => Err(libc::EEXIST),
                    (Some(x), false) => {
                        m.names.insert(b, x);
                        Ok(())
                    }
                };
                prop_assert_eq!(got, want, "{}", ctx);
            }
            Op::Fsync(n) => {
                if let Ok(ino) = h.ino(n) {
                    h.fs().fsync(ino).unwrap();
                }
            }
            Op::Reopen => {
                // A clean unmount: close what is open, write everything back, start afresh.
                for ino in std::mem::take(&mut h.open) {
                    h.fs().release(ino).unwrap();
                }
                h.fs().sync_all().unwrap();
                h.fs = None;
                h.fs = Some(h.mount());
            }
        }
        // Every name in the model is there with the right kind and size, and nothing else.
        let listed: Vec<Vec<u8>> = h
            .fs()
            .readdir(ROOT, 0, 100)
            .unwrap()
            .into_iter()
            .map(|(_, d)| d.name)
            .filter(|n| n != b"." && n != b"..")
            .collect();
        prop_assert_eq!(listed.len(), m.names.len(), "{}: listing {:?}", ctx, listed);
        for (n, node) in &m.names {
            let a = h.fs().lookup(ROOT, NAMES[*n].as_bytes()).unwrap();
            match node {
                Node::File(f) => {
                    prop_assert_eq!(a.kind, Kind::File, "{}", ctx);
                    prop_assert_eq!(
                        a.size,
                        m.files[*f].len() as u64,
                        "{}: size of {}",
                        ctx,
                        NAMES[*n]
                    );
                    let links = m.names.values().filter(|x| *x == node).count() as u32;
                    prop_assert_eq!(a.nlink, links, "{}: links of {}", ctx, NAMES[*n]);
                }
                Node::Dir(_) => prop_assert_eq!(a.kind, Kind::Dir, "{}", ctx),
            }
        }
    }
    // Finally every file reads back whole.
    for (n, node) in &m.names {
        if let Node::File(f) = node {
            let ino = h.ino(*n).unwrap();
            let got = h.fs().read(ino, 0, 1 << 20).unwrap();
            prop_assert_eq!(&got, &m.files[*f], "final content of {}", NAMES[*n]);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn fossil_matches_a_simple_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
