//! One walk over everything a home keeps: the live tree, every inode no name
//! leads to (unlinked while open), and the trees of retained snapshots. GC,
//! the durability engine's wanted set and change feed, and the naming of
//! lost blocks all go through it, each with a visitor of its own.
//!
//! The walk hands the visitor each file's content with the redundancy it
//! asks for (its own setting, else its directory's, down from the root's or
//! the default), and each snapshot's root and directory streams. Trees are
//! named by content, so one already handed out at the same redundancy or
//! higher is not handed out again: the live tree and the snapshots share
//! most of theirs, and a walk costs what they do not share.

use std::collections::{HashMap, HashSet};

use fincrypt_blockstore::{FileRef, Score};

use crate::error::FsError;
use crate::fossil::Fossil;
use crate::meta::{Kind, ROOT_INO, SnapshotRecord, Time, View};
use crate::snapshot::{self, RootRecord, SnapEntry};

/// The redundancy live inode `ino` asks for: its own setting, else the
/// highest of the directories that name it (the default at the root and for
/// an inode no name leads to). `memo` keeps what was worked out, for the
/// next inode of the same view.
pub fn effective_redundancy(
    view: &View<'_>,
    ino: u64,
    default: u8,
    memo: &mut HashMap<u64, u8>,
) -> Result<u8, FsError> {
    if let Some(n) = memo.get(&ino) {
        return Ok(*n);
    }
    let n = match view.inode(ino)?.redundancy {
        Some(n) => n,
        None if ino == ROOT_INO => default,
        None => {
            let mut n = None;
            for p in view.parents(ino)? {
                let m = effective_redundancy(view, p, default, memo)?;
                n = Some(n.map_or(m, |k: u8| k.max(m)));
            }
            n.unwrap_or(default)
        }
    };
    memo.insert(ino, n);
    Ok(n)
}

/// What the walk hands the visitor.
pub enum Item<'a> {
    /// A retained snapshot's root record (its root block is `snap.root`).
    Root {
        snap: &'a SnapshotRecord,
        root: &'a RootRecord,
    },
    /// A snapshot's directory stream, asking for `redundancy`. The visitor
    /// returns whether to go below it.
    Dir {
        content: &'a FileRef,
        redundancy: u8,
        path: &'a str,
    },
    /// A file's content (also a symlink's or a device's, which hold no
    /// blocks), asking for `redundancy`.
    File {
        content: &'a FileRef,
        redundancy: u8,
        path: &'a str,
    },
}

/// Which part of the live tree to walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    /// None of it.
    None,
    /// All of it, and the inodes no name leads to.
    All,
    /// What is below directory `ino`, which asks for `redundancy`.
    Below { ino: u64, redundancy: u8 },
}

/// Which parts to walk.
pub struct Walk {
    /// Copies asked where no directory says otherwise.
    pub default: u8,
    /// Which of the live tree.
    pub live: Live,
    /// Snapshots taken after this time (`None`: every retained one).
    pub snapshots_after: Option<Time>,
    /// Build paths (`/dir/file`, `/.snapshots/NAME/dir/file`); otherwise empty.
    pub paths: bool,
}

impl Walk {
    /// Everything, without paths.
    pub fn all(default: u8) -> Walk {
        Walk {
            default: default.max(1),
            live: Live::All,
            snapshots_after: None,
            paths: false,
        }
    }
}

/// What a walk saw besides what it handed out.
#[derive(Debug, Default)]
pub struct Walked {
    /// The highest redundancy any file or directory asked for.
    pub highest: u8,
    /// The same of the live tree alone: where `highest` is more, retained
    /// snapshots (or published roots) keep asking for it.
    pub highest_live: u8,
    /// The newest snapshot walked.
    pub newest: Option<Time>,
}

/// Walks as `opts` says, handing each item to `visit`. A visitor's error
/// ends the walk.
pub fn walk(
    fs: &Fossil,
    opts: &Walk,
    visit: &mut dyn FnMut(Item<'_>) -> Result<bool, FsError>,
) -> Result<Walked, FsError> {
    let default = opts.default.max(1);
    let mut out = Walked {
        highest: default,
        highest_live: default,
        newest: None,
    };
    // Trees handed out, with the redundancy asked of them then.
    let mut handed: HashMap<(Score, bool), u8> = HashMap::new();
    let mut fresh = |f: &FileRef, n: u8, is_dir: bool| -> bool {
        let Some(p) = f.root() else { return true };
        let seen = handed.entry((p.score, is_dir)).or_insert(0);
        if *seen >= n {
            return false;
        }
        *seen = n;
        true
    };
    let join = |path: &str, name: &[u8]| -> String {
        if opts.paths {
            format!("{path}/{}", String::from_utf8_lossy(name))
        } else {
            String::new()
        }
    };

    if opts.live != Live::None {
        let view = fs.meta().view()?;
        let (top, top_n) = match opts.live {
            Live::Below { ino, redundancy } => (ino, redundancy),
            _ => (
                ROOT_INO,
                view.inode(ROOT_INO)?.redundancy.unwrap_or(default),
            ),
        };
        out.highest = out.highest.max(top_n);
        let mut reached: HashSet<u64> = HashSet::from([top]);
        let mut dirs = vec![(top, top_n, String::new())];
        while let Some((dir, n, path)) = dirs.pop() {
            for d in view.entries(dir)? {
                let first = reached.insert(d.ino);
                let inode = view.inode(d.ino)?;
                let m = inode.redundancy.unwrap_or(n);
                out.highest = out.highest.max(m);
                let p = join(&path, &d.name);
                if inode.kind == Kind::Dir {
                    if first {
                        dirs.push((d.ino, m, p));
                    }
                } else if fresh(&inode.content, m, false) {
                    visit(Item::File {
                        content: &inode.content,
                        redundancy: m,
                        path: &p,
                    })?;
                }
            }
        }
        // Inodes no name leads to (unlinked while open) still have content.
        let unnamed = match opts.live {
            Live::All => view.inode_numbers()?,
            _ => Vec::new(),
        };
        for ino in unnamed {
            if reached.contains(&ino) {
                continue;
            }
            let inode = view.inode(ino)?;
            if fresh(&inode.content, default, false) {
                visit(Item::File {
                    content: &inode.content,
                    redundancy: default,
                    path: if opts.paths {
                        "(unlinked, still open)"
                    } else {
                        ""
                    },
                })?;
            }
        }
    }

    out.highest_live = out.highest;
    let heads: Vec<Time> = fs.meta().heads()?.iter().map(|h| h.time).collect();
    for snap in fs.meta().roots()? {
        if opts.snapshots_after.is_some_and(|t| snap.time <= t) {
            continue;
        }
        out.newest = Some(snap.time);
        let r = snapshot::root(fs, &snap)?;
        visit(Item::Root {
            snap: &snap,
            root: &r,
        })?;
        let name = if opts.paths && heads.contains(&snap.time) {
            format!(
                "(the root published at {})",
                crate::snapdir::name(snap.time)
            )
        } else if opts.paths {
            format!("/.snapshots/{}", crate::snapdir::name(snap.time))
        } else {
            String::new()
        };
        let tree = r.tree;
        let n = tree.redundancy.unwrap_or(default);
        out.highest = out.highest.max(n);
        let mut dirs: Vec<(SnapEntry, u8, String)> = vec![(tree, n, name)];
        while let Some((d, n, path)) = dirs.pop() {
            if !fresh(&d.content, n, true) {
                // Handed out before at this redundancy or higher: all below it too.
                continue;
            }
            let below = visit(Item::Dir {
                content: &d.content,
                redundancy: n,
                path: &path,
            })?;
            if !below {
                continue;
            }
            for e in snapshot::read_dir(fs, &d)? {
                let m = e.redundancy.unwrap_or(n);
                out.highest = out.highest.max(m);
                let p = join(&path, &e.name);
                if e.kind == Kind::Dir {
                    dirs.push((e, m, p));
                } else if fresh(&e.content, m, false) {
                    visit(Item::File {
                        content: &e.content,
                        redundancy: m,
                        path: &p,
                    })?;
                }
            }
        }
    }
    Ok(out)
}
