//! End-to-end tests of a mounted Fincrypt filesystem: the `fincrypt mount`
//! daemon driven through the kernel, as a user's programs would drive it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{
    Mount, Rng, assert_same_bytes, contains, ctl, ctl_ok, disk_state, init_home, init_home_in,
    random_bytes, refused_mount, regular_files, set_xattr, text, wait_until,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The hidden snapshot directory in the root; not part of the user's tree.
const SNAPSHOTS: &str = ".snapshots";

/// What the user put at one path.
#[derive(Clone, Debug)]
enum Want {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
        nlink: u64,
        mtime: SystemTime,
    },
    Symlink {
        target: PathBuf,
    },
}

/// Relative paths of every entry under `root`, skipping the hidden snapshot directory.
fn list_tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
            let e = e.unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
            if rel.as_os_str().is_empty() && e.file_name() == SNAPSHOTS {
                continue;
            }
            let p = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(p);
        }
    }
    out
}

/// Checks the tree under `root` is exactly `want`.
fn verify_tree(root: &Path, want: &BTreeMap<PathBuf, Want>, when: &str) {
    let got = list_tree(root);
    let expected: BTreeSet<PathBuf> = want.keys().cloned().collect();
    assert_eq!(
        got.difference(&expected).collect::<Vec<_>>(),
        Vec::<&PathBuf>::new(),
        "{when}: unexpected entries"
    );
    assert_eq!(
        expected.difference(&got).collect::<Vec<_>>(),
        Vec::<&PathBuf>::new(),
        "{when}: missing entries"
    );
    for (rel, w) in want {
        let p = root.join(rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{when}: stat {rel:?}: {e}"));
        match w {
            Want::Dir { mode } => {
                assert!(m.is_dir(), "{when}: {rel:?} is a directory");
                assert_eq!(m.mode() & 0o7777, *mode, "{when}: mode of {rel:?}");
            }
            Want::File {
                mode,
                data,
                nlink,
                mtime,
            } => {
                assert!(m.file_type().is_file(), "{when}: {rel:?} is a file");
                assert_eq!(m.mode() & 0o7777, *mode, "{when}: mode of {rel:?}");
                assert_eq!(m.len(), data.len() as u64, "{when}: size of {rel:?}");
                assert_eq!(m.nlink(), *nlink, "{when}: link count of {rel:?}");
                assert_eq!(m.modified().unwrap(), *mtime, "{when}: mtime of {rel:?}");
                let got = fs::read(&p).unwrap_or_else(|e| panic!("{when}: read {rel:?}: {e}"));
                assert_same_bytes(&format!("{when}: {rel:?}"), &got, data);
            }
            Want::Symlink { target } => {
                assert!(m.file_type().is_symlink(), "{when}: {rel:?} is a symlink");
                assert_eq!(
                    &fs::read_link(&p).unwrap(),
                    target,
                    "{when}: target of {rel:?}"
                );
                assert_eq!(
                    m.len(),
                    target.as_os_str().len() as u64,
                    "{when}: size of symlink {rel:?}"
                );
            }
        }
    }
}

/// Size of the `i`-th file of the tree: edge cases first, then a spread.
fn tree_file_size(i: usize, rng: &mut Rng) -> usize {
    const EDGES: &[u64] = &[
        0,
        0,
        1,
        2,
        100,
        511,
        4095,
        4096,
        4097,
        8191,
        8192,
        65535,
        65536,
        65537,
        MIB - 1,
        MIB,
        MIB + 1,
        3 * MIB + 7,
        4 * MIB - 1,
    ];
    if let Some(&s) = EDGES.get(i) {
        return s as usize;
    }
    (match rng.below(100) {
        0..=19 => rng.below(100),
        20..=49 => rng.range(100, 4 * KIB),
        50..=79 => rng.range(4 * KIB + 1, 256 * KIB),
        80..=94 => rng.range(256 * KIB, MIB),
        _ => rng.range(MIB, 4 * MIB),
    }) as usize
}

/// Contents of a tree file: mostly random, some compressible, some zeros.
fn tree_file_data(len: usize, rng: &mut Rng) -> Vec<u8> {
    match rng.below(10) {
        0 => vec![0u8; len],
        1 => {
            let line = format!("line of compressible text {}\n", rng.below(1000));
            line.bytes().cycle().take(len).collect()
        }
        2 => {
            // Random runs separated by zeros.
            let mut v = rng.bytes(len);
            for chunk in v.chunks_mut(8192).step_by(2) {
                chunk.fill(0);
            }
            v
        }
        _ => rng.bytes(len),
    }
}

#[test]
fn a_tree_of_files_survives_unmount_and_remount() {
    let home = init_home();
    let m = Mount::start(home);
    let root = m.path().to_path_buf();
    let mut rng = Rng::new(0x7EE5);
    let mut want: BTreeMap<PathBuf, Want> = BTreeMap::new();

    let dirs: Vec<(&str, u32)> = vec![
        ("a", 0o755),
        ("a/b", 0o750),
        ("a/b/c", 0o700),
        ("a/b/c/d", 0o755),
        ("a/b/c/d/e", 0o711),
        ("a/b/c/d/e/f", 0o755),
        ("e", 0o755),
        ("e/f", 0o775),
        ("g h (spaces)", 0o755),
        ("ünïcødé-ファイル", 0o700),
        ("links", 0o755),
        ("empty-dir", 0o555),
    ];
    for (d, _) in &dirs {
        fs::create_dir(root.join(d)).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
    }
    let modes = [0o644, 0o600, 0o755, 0o640, 0o444, 0o700, 0o664, 0o400];
    let base_time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let mut total = 0usize;
    for i in 0..200 {
        let len = tree_file_size(i, &mut rng);
        let data = tree_file_data(len, &mut rng);
        let dir = match rng.below(dirs.len() as u64 + 2) as usize {
            n if n < dirs.len() && dirs[n].0 != "empty-dir" => PathBuf::from(dirs[n].0),
            _ => PathBuf::new(),
        };
        let name = match i % 50 {
            7 => format!("{i:03}-{}", "long".repeat(50)),
            13 => format!("{i:03} with spaces & symbols #%!"),
            29 => format!("{i:03}-ünïcødé.bin"),
            41 => format!(".hidden-{i:03}"),
            _ => format!("f{i:03}-{len}.bin"),
        };
        let rel = dir.join(name);
        let p = root.join(&rel);
        let mut f = File::create(&p).unwrap_or_else(|e| panic!("create {rel:?}: {e}"));
        match i % 4 {
            // One write (split by the kernel at its maximum write size).
            0 | 1 => f.write_all(&data).unwrap(),
            // Odd-sized sequential pieces.
            2 => {
                for piece in data.chunks(7 * 1024 + 13) {
                    f.write_all(piece).unwrap();
                }
            }
            // Back half first, then the front half, at explicit offsets.
            _ => {
                let half = data.len() / 2;
                f.write_all_at(&data[half..], half as u64).unwrap();
                f.write_all_at(&data[..half], 0).unwrap();
            }
        }
        let mode = modes[rng.below(modes.len() as u64) as usize];
        let mtime = base_time + Duration::new(i as u64 * 3600, (i as u32) * 1_000_003);
        f.set_modified(mtime).unwrap();
        drop(f);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        total += len;
        want.insert(
            rel,
            Want::File {
                mode,
                data,
                nlink: 1,
                mtime,
            },
        );
    }
    eprintln!("tree: 200 files, {} MiB", total >> 20);

    // A hard link: two names, one inode.
    let original = PathBuf::from("a/b/hard-original");
    let data = random_bytes(99, 300_000);
    fs::write(root.join(&original), &data).unwrap();
    fs::set_permissions(root.join(&original), fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = base_time + Duration::new(12345, 678);
    File::options()
        .write(true)
        .open(root.join(&original))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let linked = PathBuf::from("e/f/hard-link");
    fs::hard_link(root.join(&original), root.join(&linked)).unwrap();
    for rel in [&original, &linked] {
        want.insert(
            rel.clone(),
            Want::File {
                mode: 0o640,
                data: data.clone(),
                nlink: 2,
                mtime,
            },
        );
    }

    // Symlinks: one relative to a real file, one dangling with a long target.
    std::os::unix::fs::symlink("../a/b/hard-original", root.join("links/to-original")).unwrap();
    want.insert(
        "links/to-original".into(),
        Want::Symlink {
            target: "../a/b/hard-original".into(),
        },
    );
    let long_target: PathBuf = format!("/nowhere/{}", "x/".repeat(150)).into();
    std::os::unix::fs::symlink(&long_target, root.join("links/dangling")).unwrap();
    want.insert(
        "links/dangling".into(),
        Want::Symlink {
            target: long_target,
        },
    );

    // Directory modes last, so none stops the writes above.
    for (d, mode) in &dirs {
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(*mode)).unwrap();
        want.insert(d.into(), Want::Dir { mode: *mode });
    }

    verify_tree(&root, &want, "before unmount");
    let home = m.unmount();

    let m = Mount::start(home);
    let root = m.path().to_path_buf();
    verify_tree(&root, &want, "after remount");
    // The hard link is one inode, and the symlink leads to it.
    let a = fs::metadata(root.join(&original)).unwrap();
    let b = fs::metadata(root.join(&linked)).unwrap();
    assert_eq!(a.ino(), b.ino(), "hard links share an inode");
    assert_same_bytes(
        "read through the symlink",
        &fs::read(root.join("links/to-original")).unwrap(),
        &data,
    );
    m.unmount();
}

/// A file whose `fsync` returned success: it must survive any crash.
#[derive(Clone, Debug)]
struct Acked {
    rel: PathBuf,
    seed: u64,
    len: usize,
}

/// Everything the writers of one crash round share with the test.
struct Round {
    acked: Mutex<Vec<Acked>>,
    acked_now: AtomicU64,
    unsynced_ops: AtomicU64,
    killed: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Round {
    fn failed(&self, what: String) {
        if !self.killed.load(Ordering::SeqCst) {
            self.errors.lock().unwrap().push(what);
        }
    }
}

/// Writes files one after another, fsyncing each and recording it once acknowledged.
fn fsync_writer(root: PathBuf, dir: PathBuf, seed: u64, round: Arc<Round>) {
    let mut rng = Rng::new(seed);
    for i in 0.. {
        if round.killed.load(Ordering::SeqCst) {
            return;
        }
        let len = match rng.below(10) {
            0 => 0,
            1..=5 => rng.below(64 * KIB),
            6..=8 => rng.range(64 * KIB, 512 * KIB),
            _ => rng.range(512 * KIB, 3 * MIB),
        } as usize;
        let fseed = rng.next_u64();
        let piece = rng.range(1, 300 * KIB) as usize;
        let rel = dir.join(format!("f{i:04}"));
        let data = random_bytes(fseed, len);
        let written = (|| -> std::io::Result<()> {
            let mut f = File::create(root.join(&rel))?;
            for chunk in data.chunks(piece) {
                f.write_all(chunk)?;
            }
            f.sync_all()
        })();
        match written {
            Ok(()) => {
                round.acked.lock().unwrap().push(Acked {
                    rel,
                    seed: fseed,
                    len,
                });
                round.acked_now.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                round.failed(format!("fsync writer, {rel:?}: {e}"));
                return;
            }
        }
    }
}

/// Creates, overwrites, renames and deletes files without ever syncing.
fn unsynced_writer(root: PathBuf, dir: PathBuf, seed: u64, round: Arc<Round>) {
    let mut rng = Rng::new(seed);
    let mut files: Vec<PathBuf> = Vec::new();
    for i in 0.. {
        if round.killed.load(Ordering::SeqCst) {
            return;
        }
        let op = if files.is_empty() { 0 } else { rng.below(10) };
        let r = (|| -> std::io::Result<()> {
            match op {
                0..=5 => {
                    let rel = dir.join(format!("u{i:05}"));
                    let mut f = File::create(root.join(&rel))?;
                    let len = rng.below(MIB) as usize;
                    let data = rng.bytes(len);
                    for chunk in data.chunks(32 * KIB as usize) {
                        f.write_all(chunk)?;
                    }
                    files.push(rel);
                }
                6 | 7 => {
                    let rel = &files[rng.below(files.len() as u64) as usize];
                    let f = OpenOptions::new().write(true).open(root.join(rel))?;
                    let off = rng.below(MIB);
                    let len = rng.range(1, 200 * KIB) as usize;
                    f.write_all_at(&rng.bytes(len), off)?;
                }
                8 => {
                    let k = rng.below(files.len() as u64) as usize;
                    let to = dir.join(format!("renamed{i:05}"));
                    fs::rename(root.join(&files[k]), root.join(&to))?;
                    files[k] = to;
                }
                _ => {
                    let k = rng.below(files.len() as u64) as usize;
                    fs::remove_file(root.join(files.swap_remove(k)))?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            round.failed(format!("unsynced writer, op {op}: {e}"));
            return;
        }
        round.unsynced_ops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Walks the whole tree: every directory lists, every entry stats, every
/// file reads to its stated size, every symlink reads. Returns the file count.
fn check_consistent(root: &Path) -> usize {
    let mut files = 0;
    for rel in list_tree(root) {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {rel:?}: {e}"));
        if m.file_type().is_file() {
            let mut data = Vec::new();
            File::open(&p)
                .and_then(|mut f| f.read_to_end(&mut data))
                .unwrap_or_else(|e| panic!("read {rel:?}: {e}"));
            assert_eq!(data.len() as u64, m.len(), "{rel:?} reads to its size");
            files += 1;
        } else if m.file_type().is_symlink() {
            fs::read_link(&p).unwrap_or_else(|e| panic!("readlink {rel:?}: {e}"));
        } else {
            assert!(m.is_dir(), "{rel:?}: unexpected kind {:?}", m.file_type());
        }
    }
    files
}

/// Every acknowledged file is there with exactly its bytes.
fn verify_acked(root: &Path, acked: &[Acked], when: &str) {
    for a in acked {
        let p = root.join(&a.rel);
        let got = fs::read(&p)
            .unwrap_or_else(|e| panic!("{when}: fsync-acknowledged {:?} unreadable: {e}", a.rel));
        assert_same_bytes(
            &format!("{when}: fsync-acknowledged {:?}", a.rel),
            &got,
            &random_bytes(a.seed, a.len),
        );
    }
}

#[test]
fn kill_9_during_fsynced_writes_loses_no_acknowledged_file() {
    const ROUNDS: usize = 12;
    let mut m = Mount::start(init_home());
    let mut rng = Rng::new(0xC0FFEE);
    let mut acked: Vec<Acked> = Vec::new();
    for round_no in 0..ROUNDS {
        let root = m.path().to_path_buf();
        let synced = PathBuf::from(format!("synced/r{round_no:02}"));
        let unsynced = PathBuf::from(format!("unsynced/r{round_no:02}"));
        fs::create_dir_all(root.join(&synced)).unwrap();
        fs::create_dir_all(root.join(&unsynced)).unwrap();
        let round = Arc::new(Round {
            acked: Mutex::new(Vec::new()),
            acked_now: AtomicU64::new(0),
            unsynced_ops: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        });
        let writers = [
            {
                let (root, r, seed) = (root.clone(), round.clone(), rng.next_u64());
                std::thread::spawn(move || fsync_writer(root, synced, seed, r))
            },
            {
                let (root, r, seed) = (root.clone(), round.clone(), rng.next_u64());
                std::thread::spawn(move || unsynced_writer(root, unsynced, seed, r))
            },
        ];
        // Kill at a different point each round: after some acknowledged
        // files and some unsynced operations, mid-way through whatever the
        // writers are doing then.
        let want_acked = rng.below(9);
        let want_ops = rng.below(15);
        wait_until(
            &format!("round {round_no}: {want_acked} fsyncs and {want_ops} unsynced operations"),
            Duration::from_secs(300),
            || {
                !round.errors.lock().unwrap().is_empty()
                    || (round.acked_now.load(Ordering::SeqCst) >= want_acked
                        && round.unsynced_ops.load(Ordering::SeqCst) >= want_ops)
            },
        );
        round.killed.store(true, Ordering::SeqCst);
        let home = m.kill9();
        for w in writers {
            w.join().unwrap();
        }
        let errors = round.errors.lock().unwrap().clone();
        assert!(
            errors.is_empty(),
            "round {round_no}: writes failed before the kill: {errors:?}"
        );
        let new = round.acked.lock().unwrap().clone();
        eprintln!(
            "round {round_no}: killed after {} acknowledged files, {} unsynced operations",
            new.len(),
            round.unsynced_ops.load(Ordering::SeqCst)
        );
        acked.extend(new);

        // Remount as is: no repair step.
        m = Mount::start(home);
        verify_acked(m.path(), &acked, &format!("after kill {round_no}"));
        check_consistent(m.path());
    }
    // A clean unmount and remount after all that keeps everything too.
    let home = m.unmount();
    let m = Mount::start(home);
    verify_acked(m.path(), &acked, "after a clean remount");
    let files = check_consistent(m.path());
    assert!(files >= acked.len());
    let home = m.unmount();

    // No block the metadata refers to is missing or corrupt.
    let out = common::run(
        common::fincrypt(home.path()).arg("scrub"),
        common::COMMAND_DEADLINE,
    );
    let report = text(&out.stdout);
    assert!(
        report.contains(" 0 corrupt, 0 missing"),
        "scrub after the crashes: {report}{}",
        text(&out.stderr)
    );
}

#[test]
fn a_wrong_passphrase_is_refused_and_touches_nothing() {
    let m = Mount::start(init_home());
    fs::create_dir(m.path().join("dir")).unwrap();
    fs::write(m.path().join("dir/file"), random_bytes(3, 200_000)).unwrap();
    fs::write(m.path().join("small"), b"hello").unwrap();
    let home = m.unmount();

    let before = disk_state(home.path());
    assert!(
        before.len() > 3,
        "the home holds a volume: {:?}",
        before.keys()
    );
    let out = refused_mount(home.path(), Some("not the passphrase"));
    assert!(!out.status.success(), "a wrong passphrase mounted nothing");
    assert!(
        text(&out.stderr).contains("passphrase"),
        "stderr names the passphrase: {}",
        text(&out.stderr)
    );
    let after = disk_state(home.path());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "no file appeared or went"
    );
    for (p, b) in &before {
        // The lock file names whichever process last held the home: it is
        // rewritten by every start, refused or not, and holds no data.
        if p.as_os_str() == "lock" {
            continue;
        }
        assert!(
            &after[p] == b,
            "{p:?} changed: {:?} -> {:?}",
            b.mtime,
            after[p].mtime
        );
    }

    // The right one still opens the same files.
    let m = Mount::start(home);
    assert_eq!(fs::read(m.path().join("small")).unwrap(), b"hello");
    assert_same_bytes(
        "dir/file",
        &fs::read(m.path().join("dir/file")).unwrap(),
        &random_bytes(3, 200_000),
    );
    m.unmount();
}

#[test]
fn no_name_or_content_reaches_the_home_in_the_clear() {
    const NAME: &str = "FINCRYPT-NAME-MARKER";
    const CONTENT: &str = "FINCRYPT-CONTENT-MARKER";
    let name = |s: &str| format!("{NAME}-{s}");
    let content = |s: &str| format!("{CONTENT}-{s}");

    let m = Mount::start(init_home());
    let root = m.path().to_path_buf();
    let mut rng = Rng::new(0x5EC7E7);

    let d1 = root.join(name("dir-1"));
    let d2 = d1.join(name("dir-2"));
    fs::create_dir_all(&d2).unwrap();
    // Compressible: the marker over and over.
    let repeated: Vec<u8> = format!("{}\n", content("repeated"))
        .bytes()
        .cycle()
        .take(MIB as usize)
        .collect();
    fs::write(d1.join(name("repeated.txt")), &repeated).unwrap();
    // Tiny: just the marker.
    fs::write(d2.join(name("tiny")), content("tiny")).unwrap();
    // Text with the marker on some lines.
    let mut lines = String::new();
    for i in 0..5000 {
        if i % 7 == 0 {
            lines += &format!("{i}: {}\n", content("line"));
        } else {
            lines += &format!("{i}: an ordinary line of text\n");
        }
    }
    fs::write(root.join(name("lines.log")), &lines).unwrap();
    // Random bytes with the marker inserted here and there.
    let mut noisy = rng.bytes(3 * MIB as usize);
    let marker = content("in-random");
    for _ in 0..64 {
        let at = rng.below(noisy.len() as u64 - 64) as usize;
        noisy[at..at + marker.len()].copy_from_slice(marker.as_bytes());
    }
    fs::write(d2.join(name("noisy.bin")), &noisy).unwrap();
    // A file renamed (its old name must not linger) and one deleted after a sync.
    fs::write(root.join(name("old-name")), content("renamed")).unwrap();
    fs::write(root.join(name("deleted")), content("deleted").repeat(1000)).unwrap();
    ctl_ok(m.home(), &["sync"]);
    fs::rename(root.join(name("old-name")), root.join(name("new-name"))).unwrap();
    fs::remove_file(root.join(name("deleted"))).unwrap();
    // A symlink whose name and target carry markers, and an extended attribute.
    std::os::unix::fs::symlink(name("link-target"), root.join(name("link"))).unwrap();
    set_xattr(
        &d1.join(name("repeated.txt")),
        &format!("user.{}", name("xattr")),
        content("xattr-value").as_bytes(),
    );
    ctl_ok(m.home(), &["sync"]);
    // The names really are there, as written.
    assert!(root.join(name("new-name")).exists());
    assert_eq!(
        fs::read_link(root.join(name("link"))).unwrap(),
        PathBuf::from(name("link-target"))
    );
    let home = m.unmount();

    let files = regular_files(home.path());
    assert!(files.len() > 3, "the home holds data: {files:?}");
    let mut bytes = 0;
    let mut leaks = Vec::new();
    for f in &files {
        let data = fs::read(f).unwrap();
        bytes += data.len();
        for needle in [NAME, CONTENT] {
            if contains(&data, needle.as_bytes()) {
                leaks.push(format!("{needle} in {}", f.display()));
            }
        }
    }
    // At least the 3 MiB of random bytes, which do not compress.
    assert!(
        bytes as u64 > 3 * MIB,
        "the data is in the home ({bytes} bytes)"
    );
    assert!(leaks.is_empty(), "plaintext in the home: {leaks:#?}");
}

/// Reads `len` bytes at `off`.
fn read_at(f: &File, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {off}: {e}"));
    buf
}

/// Writing a file much larger than the write buffers streams it: the daemon
/// holds a bounded amount of it, whatever the file's size.
#[test]
fn streaming_a_large_file_keeps_the_daemon_under_256_mib() {
    const LIMIT: u64 = 256 * MIB;
    let size = 3 * GIB;
    let m = Mount::start(init_home());
    let piece = random_bytes(91, MIB as usize);
    let mut f = File::create(m.path().join("stream")).unwrap();
    let mut buf = piece.clone();
    for i in 0..size / MIB {
        // Every MiB differs, so nothing deduplicates away.
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let peak = m.peak_rss();
    assert!(
        peak < LIMIT,
        "daemon peaked at {} MiB resident writing {} GiB",
        peak / MIB,
        size / GIB
    );
    let f = File::open(m.path().join("stream")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    for i in [0, 1, size / MIB / 2, size / MIB - 1] {
        let got = read_at(&f, i * MIB, MIB);
        assert_eq!(&got[..8], &i.to_le_bytes(), "MiB {i}");
        assert_same_bytes(&format!("MiB {i}"), &got[8..], &piece[8..]);
    }
    drop(f);
    eprintln!("peak resident while streaming: {} MiB", peak / MIB);
    m.unmount();
}

#[test]
fn a_file_over_4_gib_keeps_its_data_and_its_holes() {
    let size = 4 * GIB + 3 * MIB + 12_345;
    // 1 MiB patterns: at 0, unaligned past 1 GiB, across the 4 GiB line,
    // past it, and the tail.
    let patterns: Vec<(u64, Vec<u8>)> = [
        0,
        GIB + 4097,
        4 * GIB - MIB / 2,
        4 * GIB + MIB + 3,
        size - MIB,
    ]
    .iter()
    .enumerate()
    .map(|(i, &off)| (off, random_bytes(4000 + i as u64, MIB as usize)))
    .collect();
    // Stretches that were never written: they read as zeros.
    let holes: Vec<(u64, u64)> = vec![
        (MIB, MIB),
        (GIB + 4097 - MIB, MIB),
        (GIB + 4097 + MIB, MIB),
        (2 * GIB, MIB),
        (3 * GIB + 12_345, 100_000),
        (4 * GIB - MIB / 2 - MIB, MIB),
        (4 * GIB + MIB / 2, MIB / 2 + 3),
        (4 * GIB + 2 * MIB + 3, size - MIB - (4 * GIB + 2 * MIB + 3)),
    ];
    // A second file grown past 4 GiB by one write, without set_len.
    let far = 4 * GIB + 5;
    let far_data = random_bytes(77, MIB as usize);

    let check = |root: &Path, when: &str| {
        let f = File::open(root.join("big")).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size, "{when}: size");
        for (off, want) in &patterns {
            assert_same_bytes(
                &format!("{when}: pattern at {off}"),
                &read_at(&f, *off, want.len() as u64),
                want,
            );
        }
        for &(off, len) in &holes {
            let got = read_at(&f, off, len);
            assert!(
                got.iter().all(|b| *b == 0),
                "{when}: hole at {off}+{len} reads non-zero at {:?}",
                got.iter().position(|b| *b != 0).map(|i| off + i as u64)
            );
        }
        let mut tail = [0u8; 10];
        assert_eq!(
            f.read_at(&mut tail, size).unwrap(),
            0,
            "{when}: EOF at the size"
        );
        assert_eq!(
            f.read_at(&mut tail, size - 4).unwrap(),
            4,
            "{when}: short read at the end"
        );
        assert_eq!(
            &tail[..4],
            &patterns[4].1[MIB as usize - 4..],
            "{when}: last bytes"
        );

        let g = File::open(root.join("far")).unwrap();
        assert_eq!(
            g.metadata().unwrap().len(),
            far + MIB,
            "{when}: size of far"
        );
        assert_same_bytes(
            &format!("{when}: far data"),
            &read_at(&g, far, MIB),
            &far_data,
        );
        for off in [0, GIB, 4 * GIB - MIB] {
            assert!(
                read_at(&g, off, MIB).iter().all(|b| *b == 0),
                "{when}: far hole at {off}"
            );
        }
        assert!(
            read_at(&g, far - 5, 5).iter().all(|b| *b == 0),
            "{when}: far hole just before its data"
        );
    };

    let m = Mount::start(init_home());
    {
        let f = File::create(m.path().join("big")).unwrap();
        f.set_len(size).unwrap();
        for (off, data) in &patterns {
            f.write_all_at(data, *off).unwrap();
        }
        f.sync_all().unwrap();
        let g = File::create(m.path().join("far")).unwrap();
        g.write_all_at(&far_data, far).unwrap();
    }
    check(m.path(), "before unmount");
    let started = Instant::now();
    let home = m.unmount();
    eprintln!("unmount took {:?}", started.elapsed());
    let m = Mount::start(home);
    check(m.path(), "after remount");
    m.unmount();
}

/// `fincryptctl status --json`'s own_blocks and own_bytes.
fn own_usage(home: &Path) -> (u64, u64) {
    let out = ctl_ok(home, &["status", "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON {out:?}: {e}"));
    assert!(v.is_object(), "status is an object: {v}");
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("status has a number {k}: {v}"))
    };
    (n("own_blocks"), n("own_bytes"))
}

fn snapshot_names(home: &Path) -> Vec<String> {
    ctl_ok(home, &["snapshots", "list"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every fincryptctl command fails, naming the missing daemon.
fn assert_no_daemon(home: &Path, when: &str) {
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["sync"],
        &["snapshots", "list"],
        &["snapshots", "create"],
    ] {
        let out = ctl(home, args);
        assert!(
            !out.status.success(),
            "{when}: fincryptctl {args:?} succeeded with no daemon: {}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains("daemon"),
            "{when}: fincryptctl {args:?} says there is no daemon: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn fincryptctl_reports_usage_syncs_and_snapshots() {
    let m = Mount::start(init_home());
    let (blocks0, bytes0) = own_usage(m.home());
    let data = random_bytes(5, 5 * MIB as usize);
    fs::write(m.path().join("five-mib.bin"), &data).unwrap();
    ctl_ok(m.home(), &["sync"]);
    let (blocks1, bytes1) = own_usage(m.home());
    assert!(
        blocks1 > blocks0,
        "own_blocks grows with a 5 MiB file: {blocks0} -> {blocks1}"
    );
    assert!(
        bytes1 >= bytes0 + 5 * MIB,
        "own_bytes grows by at least the 5 MiB of random data: {bytes0} -> {bytes1}"
    );

    let before = snapshot_names(m.home());
    let created = ctl_ok(m.home(), &["snapshots", "create"]);
    let after = snapshot_names(m.home());
    assert_eq!(
        after.len(),
        before.len() + 1,
        "one more snapshot: {before:?} -> {after:?}"
    );
    assert!(
        after.iter().any(|s| s == created.trim()),
        "the new snapshot {created:?} is listed: {after:?}"
    );
    assert!(
        before.iter().all(|s| after.contains(s)),
        "older snapshots stay: {before:?} -> {after:?}"
    );
    assert_same_bytes(
        "five-mib.bin",
        &fs::read(m.path().join("five-mib.bin")).unwrap(),
        &data,
    );

    // Cleanly stopped: the socket is gone.
    let home = m.unmount();
    assert_no_daemon(home.path(), "after unmount");
    // Killed: a stale socket is left, and nobody answers on it.
    let home = Mount::start(home).kill9();
    assert_no_daemon(home.path(), "after kill -9");
    // Never mounted.
    assert_no_daemon(init_home().path(), "never mounted");
}

#[test]
fn mounting_an_uninitialised_home_without_a_terminal_says_to_run_init() {
    for pass in [Some(common::PASSPHRASE), None] {
        let home = tempfile::tempdir().unwrap();
        let out = refused_mount(home.path(), pass);
        assert!(
            !out.status.success(),
            "mount on an empty home fails (passphrase {pass:?})"
        );
        let err = text(&out.stderr);
        assert!(err.contains("init"), "the error points at init: {err}");
        assert!(
            !home.path().join("key.toml").exists(),
            "no identity was created without a terminal"
        );
        let left: Vec<_> = fs::read_dir(home.path()).unwrap().collect();
        assert!(left.is_empty(), "nothing was written to the home: {left:?}");
    }
}

/// Deleted data is freed once no kept snapshot uses it: with one snapshot
/// kept, the sync after a delete prunes the old root and GC frees the blocks.
#[test]
fn deleted_data_is_freed_once_no_kept_snapshot_uses_it() {
    let home = init_home();
    common::set_config(home.path(), "snapshot_keep", "1");
    let m = Mount::start(home);
    let (_, bytes0) = own_usage(m.home());
    fs::write(
        m.path().join("doomed.bin"),
        random_bytes(9, 6 * MIB as usize),
    )
    .unwrap();
    ctl_ok(m.home(), &["sync"]);
    let (blocks1, bytes1) = own_usage(m.home());
    assert!(
        bytes1 >= bytes0 + 6 * MIB,
        "the file's blocks are stored: {bytes0} -> {bytes1}"
    );
    fs::remove_file(m.path().join("doomed.bin")).unwrap();
    // The first snapshot still holds the file; the next sync replaces it.
    ctl_ok(m.home(), &["sync"]);
    let (blocks2, bytes2) = own_usage(m.home());
    assert!(blocks2 < blocks1, "blocks freed: {blocks1} -> {blocks2}");
    assert!(
        bytes2 + 6 * MIB <= bytes1 + MIB,
        "about 6 MiB freed: {bytes1} -> {bytes2}"
    );
    m.unmount();
}

/// Snapshots that share most of their trees all read back whole after the
/// GC that follows each of them (it walks what they share only once).
#[test]
fn kept_snapshots_sharing_trees_survive_gc() {
    let home = init_home();
    common::set_config(home.path(), "snapshot_keep", "3");
    let m = Mount::start(home);
    let files = [
        ("a/one.bin", 3 * MIB as usize),
        ("a/b/two.bin", 200_000),
        ("a/b/c/three.bin", 5_000),
        ("top.txt", 40),
    ];
    let mut want: Vec<BTreeMap<&str, Vec<u8>>> = Vec::new();
    let mut now: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    fs::create_dir_all(m.path().join("a/b/c")).unwrap();
    for (i, (name, len)) in files.iter().enumerate() {
        let data = random_bytes(500 + i as u64, *len);
        fs::write(m.path().join(name), &data).unwrap();
        now.insert(name, data);
    }
    ctl_ok(m.home(), &["sync"]);
    want.push(now.clone());
    // One file deep down changes; everything else is shared with the first.
    let changed = random_bytes(600, 200_000);
    fs::write(m.path().join("a/b/two.bin"), &changed).unwrap();
    now.insert("a/b/two.bin", changed);
    ctl_ok(m.home(), &["sync"]);
    want.push(now.clone());
    // Everything goes from the live tree.
    fs::remove_dir_all(m.path().join("a")).unwrap();
    fs::remove_file(m.path().join("top.txt")).unwrap();
    ctl_ok(m.home(), &["sync"]);
    want.push(BTreeMap::new());

    let names = snapshot_names(m.home());
    assert_eq!(names.len(), 3, "three kept: {names:?}");
    for (name, files) in names.iter().zip(&want) {
        let dir = m.path().join(".snapshots").join(name);
        for (file, data) in files {
            let got = fs::read(dir.join(file))
                .unwrap_or_else(|e| panic!("snapshot {name}: reading {file}: {e}"));
            assert_same_bytes(&format!("snapshot {name}: {file}"), &got, data);
        }
    }
    m.unmount();
}

/// A tmpfs of limited size, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(ok.success(), "mounting a tmpfs on {}", dir.display());
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk is an error to the writer (ENOSPC), never a crash or a
/// hang, and loses nothing already made durable: the mount goes on, older
/// files read back, space freed by a delete is usable again, and the home
/// mounts again afterwards.
#[test]
fn a_full_disk_is_an_error_and_loses_nothing_durable() {
    let home = tempfile::Builder::new()
        .prefix("fincrypt-home-small-")
        .tempdir()
        .unwrap();
    let _disk = SmallDisk::mount(home.path(), "48m");
    init_home_in(&home);
    let m = Mount::start(home);
    let keep = random_bytes(700, 4 * MIB as usize);
    let mut f = File::create(m.path().join("keep.bin")).unwrap();
    f.write_all(&keep).unwrap();
    f.sync_all().unwrap();
    drop(f);

    // Write far more than fits: some write, close or fsync must fail.
    let error = (|| -> std::io::Result<()> {
        let mut f = File::create(m.path().join("big.bin"))?;
        let mut piece = random_bytes(701, MIB as usize);
        for i in 0..200u64 {
            piece[..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&piece)?;
        }
        f.sync_all()
    })()
    .expect_err("200 MiB fitted on a 48 MiB disk");
    assert_eq!(
        error.raw_os_error(),
        Some(libc::ENOSPC),
        "a full disk shows as ENOSPC: {error}"
    );

    // The mount still answers, and what was durable reads back.
    assert_same_bytes(
        "keep.bin",
        &fs::read(m.path().join("keep.bin")).unwrap(),
        &keep,
    );
    ctl_ok(m.home(), &["status", "--json"]);
    // Deleting the big file and collecting frees room for new data.
    fs::remove_file(m.path().join("big.bin")).unwrap();
    ctl_ok(m.home(), &["sync"]);
    let after = random_bytes(702, MIB as usize);
    let mut f = File::create(m.path().join("after.bin")).unwrap();
    f.write_all(&after).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let home = m.unmount();
    let m = Mount::start(home);
    assert_same_bytes(
        "keep.bin",
        &fs::read(m.path().join("keep.bin")).unwrap(),
        &keep,
    );
    assert_same_bytes(
        "after.bin",
        &fs::read(m.path().join("after.bin")).unwrap(),
        &after,
    );
    assert!(!m.path().join("big.bin").exists());
    m.unmount();
}

#[test]
fn a_file_raised_by_truncate_reads_its_hole_to_the_end() {
    // The kernel reads 128 KiB at a time: the second, sequential read lies
    // wholly past the file's sealed content (none) and must still be zeros.
    let m = Mount::start(init_home());
    let path = m.path().join("raised");
    fs::write(&path, b"").unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(131_073).unwrap();
    drop(f);
    let got = fs::read(&path).unwrap();
    assert_eq!(got.len(), 131_073, "every byte up to the size is read");
    assert!(got.iter().all(|b| *b == 0), "the hole reads as zeros");
    m.unmount();
}

/// The `snapshots` worker's row in `fincryptctl workers --json`.
fn snapshots_worker(home: &Path) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(ctl_ok(home, &["workers", "--json"]).trim()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "snapshots")
        .cloned()
        .expect("a snapshots worker")
}

/// Makes a directory immutable (not even root may add to it) until dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chattr +i {}", dir.display());
        Immutable(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_worker_that_fails_shows_its_error_and_recovers_when_the_cause_goes() {
    let home = init_home();
    common::set_config(home.path(), "snapshot_interval", "1");
    let volume_tmp = home.path().join("volume").join("tmp");
    let m = Mount::start(home);
    wait_until("a scheduled snapshot", Duration::from_secs(30), || {
        snapshots_worker(m.home())["steps"].as_u64() > Some(0)
    });

    // New blocks are staged in the volume's tmp directory: while nothing can
    // be added there, every snapshot (a new root block) fails.
    let blocked = Immutable::set(&volume_tmp);
    let mut failing = serde_json::Value::Null;
    wait_until(
        "the snapshots worker failing with its error",
        Duration::from_secs(30),
        || {
            failing = snapshots_worker(m.home());
            failing["state"] == "failing" && failing["last_error"].is_string()
        },
    );
    let error = failing["last_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("tmp") && error.to_lowercase().contains("not permitted"),
        "the error says what failed and where: {error}"
    );
    let table = ctl_ok(m.home(), &["workers"]);
    assert!(
        table.lines().any(|l| l.starts_with("snapshots")
            && l.contains("failing")
            && l.contains("not permitted")),
        "{table}"
    );
    let summary = common::status(m.home());
    assert!(
        summary["workers"]["failing"].as_u64() >= Some(1),
        "{summary}"
    );

    // The cause goes: the worker's next retry succeeds and the error clears.
    let errors = failing["errors"].as_u64().unwrap();
    drop(blocked);
    let mut recovered = serde_json::Value::Null;
    wait_until(
        "the snapshots worker recovering",
        Duration::from_secs(60),
        || {
            recovered = snapshots_worker(m.home());
            recovered["state"] != "failing" && recovered["last_error"].is_null()
        },
    );
    assert!(recovered["errors"].as_u64() >= Some(errors), "{recovered}");
    let summary = common::status(m.home());
    assert_eq!(summary["workers"]["failing"].as_u64(), Some(0), "{summary}");
    // And what it does works again: a new snapshot is listed.
    let before = snapshot_names(m.home()).len();
    wait_until(
        "a new snapshot after recovery",
        Duration::from_secs(30),
        || snapshot_names(m.home()).len() > before,
    );
    m.unmount();
}
