//! Trees on disk for before/after comparisons: a tree of every kind of
//! entry to write, and what a tree is (contents, modes, mtimes, links,
//! hard links, xattrs). Test files take it as
//! `#[path = "common/trees.rs"] mod trees;` beside `mod common;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::{DiskEntry, disk_state, random_bytes, set_xattr};

/// Every user xattr of `path` (not following a symlink), by name.
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: a valid C string and a buffer of the stated length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        n >= 0,
        "listxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let mut out = BTreeMap::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
    {
        let c = CString::new(name).unwrap();
        let mut value = vec![0u8; 65536];
        // SAFETY: valid C strings and a buffer of the stated length.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert!(len >= 0);
        value.truncate(len as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    out
}

/// Everything the test compares: contents, kinds, modes, sizes, mtimes,
/// link counts, which names are one inode, and xattrs.
#[derive(Debug, PartialEq)]
pub struct Tree {
    pub entries: BTreeMap<PathBuf, DiskEntry>,
    pub links: BTreeMap<PathBuf, u64>,
    pub same_inode: Vec<Vec<PathBuf>>,
    pub xattrs: BTreeMap<PathBuf, BTreeMap<String, Vec<u8>>>,
}

pub fn tree(dir: &Path) -> Tree {
    let mut entries = disk_state(dir);
    // What a directory's size is depends on the filesystem, not its content.
    for e in entries.values_mut() {
        if e.kind == "dir" {
            e.len = 0;
        }
    }
    let mut links = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut attrs = BTreeMap::new();
    for p in entries.keys() {
        let full = dir.join(p);
        let m = std::fs::symlink_metadata(&full).unwrap();
        links.insert(p.clone(), m.nlink());
        if m.is_file() {
            by_ino.entry(m.ino()).or_default().push(p.clone());
        }
        let x = xattrs(&full);
        if !x.is_empty() {
            attrs.insert(p.clone(), x);
        }
    }
    let mut same_inode: Vec<Vec<PathBuf>> = by_ino.into_values().filter(|v| v.len() > 1).collect();
    same_inode.sort();
    Tree {
        entries,
        links,
        same_inode,
        xattrs: attrs,
    }
}

/// A tree of a few hundred files in nested directories, a large file, a
/// sparse one, symlinks, a hard link, xattrs and odd modes.
pub fn write_tree(root: &Path, big: usize) {
    for d in 0..6 {
        let dir = root.join(format!("d{d}/sub{}/deeper", d % 3));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..40 {
            let len = 100 + (d * 40 + f) * 97 % 20_000;
            std::fs::write(
                dir.join(format!("f{f}")),
                random_bytes((d * 100 + f) as u64, len),
            )
            .unwrap();
        }
    }
    std::fs::write(root.join("big.bin"), random_bytes(99, big)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    // A sparse file: data, a 32 MiB hole, data (a tree with a hole in it).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("sparse")).unwrap();
        f.write_all_at(&random_bytes(7, 300_000), 0).unwrap();
        f.write_all_at(&random_bytes(8, 300_000), 300_000 + (32 << 20))
            .unwrap();
    }
    std::os::unix::fs::symlink("d0/sub0/deeper/f1", root.join("link-to-f1")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("d1/sub1/deeper/f2"), root.join("hard-f2")).unwrap();
    set_xattr(&root.join("d2/sub2/deeper/f3"), "user.colour", b"blue");
    set_xattr(&root.join("d2"), "user.note", b"a directory's xattr");
    std::fs::set_permissions(
        root.join("d3/sub0/deeper/f4"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(root.join("d4"), std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// Panics unless `got` is `want`, naming the first paths that differ and
/// how (never whole contents).
pub fn assert_same_tree(got: &Tree, want: &Tree, what: &str) {
    if got == want {
        return;
    }
    let mut diffs = differences(got, want);
    diffs.truncate(12);
    panic!("{what}: the trees differ:\n{}", diffs.join("\n"));
}

/// How `got` differs from `want`, one line per path.
pub fn differences(got: &Tree, want: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, w) in &want.entries {
        match got.entries.get(p) {
            None => out.push(format!("{}: missing", p.display())),
            Some(g) if g != w => out.push(format!(
                "{}: {} mode {:o} len {} mtime {:?}{} (wanted {} mode {:o} len {} mtime {:?})",
                p.display(),
                g.kind,
                g.mode,
                g.len,
                g.mtime,
                if g.data != w.data { ", other data" } else { "" },
                w.kind,
                w.mode,
                w.len,
                w.mtime
            )),
            Some(_) => {}
        }
    }
    for p in got.entries.keys() {
        if !want.entries.contains_key(p) {
            out.push(format!("{}: not wanted", p.display()));
        }
    }
    for (p, n) in &want.links {
        if got.links.get(p).is_some_and(|g| g != n) {
            out.push(format!(
                "{}: {:?} links, wanted {n}",
                p.display(),
                got.links.get(p)
            ));
        }
    }
    if got.same_inode != want.same_inode {
        out.push(format!(
            "hard links: {:?}, wanted {:?}",
            got.same_inode, want.same_inode
        ));
    }
    for (p, x) in &want.xattrs {
        if got.xattrs.get(p) != Some(x) {
            out.push(format!(
                "{}: xattrs {:?}, wanted {:?}",
                p.display(),
                got.xattrs.get(p).map(|m| m.keys().collect::<Vec<_>>()),
                x.keys().collect::<Vec<_>>()
            ));
        }
    }
    for p in got.xattrs.keys() {
        if !want.xattrs.contains_key(p) {
            out.push(format!("{}: xattrs not wanted", p.display()));
        }
    }
    out
}
