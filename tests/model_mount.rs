//! Reference-model test on a real mount: random operation sequences run
//! through the kernel against a Fincrypt mount and against a local directory
//! side by side, every result (data or errno) compared.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const NAMES: [&str; 5] = ["a", "b", "c", "sub", "sub/x"];

#[derive(Clone, Debug)]
enum Op {
    Write {
        name: usize,
        offset: u32,
        len: u32,
        byte: u8,
    },
    Truncate {
        name: usize,
        size: u32,
    },
    Read(usize),
    Unlink(usize),
    Mkdir(usize),
    Rmdir(usize),
    Rename(usize, usize),
    Link(usize, usize),
    Symlink(usize, usize),
    Fsync(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        4 => (n.clone(), 0u32..3_000_000, 0u32..300_000, any::<u8>())
            .prop_map(|(name, offset, len, byte)| Op::Write { name, offset, len, byte }),
        2 => (n.clone(), 0u32..3_000_000).prop_map(|(name, size)| Op::Truncate { name, size }),
        2 => n.clone().prop_map(Op::Read),
        1 => n.clone().prop_map(Op::Unlink),
        1 => n.clone().prop_map(Op::Mkdir),
        1 => n.clone().prop_map(Op::Rmdir),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Rename(a, b)),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Link(a, b)),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Symlink(a, b)),
        1 => n.prop_map(Op::Fsync),
    ]
}

/// Runs one operation under `root`; the result is data or an errno.
fn apply(root: &Path, op: &Op) -> Result<Vec<u8>, i32> {
    let p = |i: usize| root.join(NAMES[i]);
    let e = |err: std::io::Error| err.raw_os_error().unwrap_or(-1);
    match op {
        Op::Write {
            name,
            offset,
            len,
            byte,
        } => {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(p(*name))
                .map_err(e)?;
            f.seek(SeekFrom::Start(*offset as u64)).map_err(e)?;
            f.write_all(&vec![*byte; *len as usize]).map_err(e)?;
            Ok(Vec::new())
        }
        Op::Truncate { name, size } => {
            let f = OpenOptions::new().write(true).open(p(*name)).map_err(e)?;
            f.set_len(*size as u64).map_err(e).map(|_| Vec::new())
        }
        Op::Read(name) => fs::read(p(*name)).map_err(e),
        Op::Unlink(name) => fs::remove_file(p(*name)).map_err(e).map(|_| Vec::new()),
        Op::Mkdir(name) => fs::create_dir(p(*name)).map_err(e).map(|_| Vec::new()),
        Op::Rmdir(name) => fs::remove_dir(p(*name)).map_err(e).map(|_| Vec::new()),
        Op::Rename(a, b) => fs::rename(p(*a), p(*b)).map_err(e).map(|_| Vec::new()),
        Op::Link(a, b) => fs::hard_link(p(*a), p(*b)).map_err(e).map(|_| Vec::new()),
        Op::Symlink(a, b) => {
            std::os::unix::fs::symlink(NAMES[*a], p(*b)).map_err(e)?;
            fs::read_link(p(*b))
                .map(|t| t.into_os_string().into_encoded_bytes())
                .map_err(e)
        }
        Op::Fsync(name) => {
            let f = fs::File::open(p(*name)).map_err(e)?;
            f.sync_all().map_err(e).map(|_| Vec::new())
        }
    }
}

/// Every name under `root` with its kind, size, link count and content.
fn tree(root: &Path) -> Vec<(String, String, u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let m = fs::symlink_metadata(&path).unwrap();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            let (kind, content) = if m.is_dir() {
                stack.push(path.clone());
                ("dir", Vec::new())
            } else if m.file_type().is_symlink() {
                (
                    "symlink",
                    fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                ("file", fs::read(&path).unwrap())
            };
            let size = if m.is_dir() { 0 } else { m.len() };
            out.push((
                name,
                kind.to_string(),
                size,
                if m.is_dir() { 0 } else { m.nlink() },
                content,
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn a_mount_behaves_like_a_local_directory() {
    let mount = common::Mount::start(common::init_home());
    let local = tempfile::tempdir().unwrap();
    let case = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (m, l) = (
            mount.path().join(format!("case{case}")),
            local.path().join(format!("case{case}")),
        );
        fs::create_dir(&m).unwrap();
        fs::create_dir(&l).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let (got, want) = (apply(&m, op), apply(&l, op));
            prop_assert_eq!(&got, &want, "step {}: {:?}", i, op);
        }
        prop_assert_eq!(tree(&m), tree(&l), "final trees differ");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    mount.unmount();
}
