//! A directory from outside the filesystem copied into it and kept up to
//! date (`import::sync_dir`): the copy is the same tree, an unchanged
//! rescan reads no file, and a change reads only what changed.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use fincrypt_blockstore::{BlockStore, MasterSecret, MemStore, TreeParams};
use fincrypt_fs::import::{Stamps, SyncOptions, sync_dir, sync_subdir};
use fincrypt_fs::{Caller, Fossil, Kind, Meta};

use common::read_all;

const WHO: Caller = Caller { uid: 0, gid: 0 };

fn fossil(dir: &Path) -> Fossil {
    let keys = MasterSecret::generate().keys();
    let store: Arc<dyn BlockStore> = Arc::new(MemStore::new());
    let meta = Meta::open(&dir.join("meta.redb"), &keys, 0, 0).unwrap();
    Fossil::new(meta, store, keys, TreeParams::default(), dir.to_path_buf()).unwrap()
}

/// A filesystem in `dir` and its directory `backup`, where tests copy to.
fn fossil_with_backup(dir: &Path) -> (Fossil, u64) {
    let fs = fossil(dir);
    let dst = fs
        .mknod(1, b"backup", Kind::Dir, 0o755, 0, None, WHO)
        .unwrap()
        .ino;
    (fs, dst)
}

/// Checks that directory `ino` of `fs` holds what `src` holds: names,
/// kinds, contents, modes, owners, mtimes and symlink targets (FIFOs and
/// the like are left out by design).
fn same_tree(fs: &Fossil, src: &Path, ino: u64) {
    let mut names = Vec::new();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let t = m.file_type();
        if !(t.is_dir() || t.is_file() || t.is_symlink()) {
            continue;
        }
        names.push(e.file_name());
        let a = fs
            .lookup(ino, e.file_name().as_bytes())
            .unwrap_or_else(|err| panic!("{} is missing: {err}", e.path().display()));
        assert_eq!(a.uid, m.uid(), "{}", e.path().display());
        if t.is_symlink() {
            assert_eq!(a.kind, Kind::Symlink);
            let target = std::fs::read_link(e.path()).unwrap();
            assert_eq!(fs.readlink(a.ino).unwrap(), target.as_os_str().as_bytes());
            continue;
        }
        assert_eq!(
            u32::from(a.perm),
            m.mode() & 0o7777,
            "{}",
            e.path().display()
        );
        assert_eq!(a.mtime.secs, m.mtime(), "{}", e.path().display());
        for name in xattr::list(e.path()).unwrap() {
            let want = xattr::get(e.path(), &name).unwrap().unwrap();
            assert_eq!(
                fs.getxattr(a.ino, name.as_bytes()).unwrap(),
                want,
                "{} {name:?}",
                e.path().display()
            );
        }
        if t.is_dir() {
            assert_eq!(a.kind, Kind::Dir);
            same_tree(fs, &e.path(), a.ino);
        } else {
            assert_eq!(a.kind, Kind::File);
            assert_eq!(
                read_all(fs, a.ino),
                std::fs::read(e.path()).unwrap(),
                "{}",
                e.path().display()
            );
        }
    }
    let mut offset = 0;
    let mut count = 0;
    loop {
        let page = fs.readdir(ino, offset, 1024).unwrap();
        if page.is_empty() {
            break;
        }
        for (cookie, d) in page {
            offset = cookie;
            if d.name != b"." && d.name != b".." {
                count += 1;
            }
        }
    }
    assert_eq!(
        count,
        names.len(),
        "extra entries in the copy of {}",
        src.display()
    );
}

fn write(path: &Path, len: usize, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    std::fs::write(path, data).unwrap();
}

#[test]
fn a_tree_is_copied_then_kept_up_to_date_reading_only_what_changed() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // Nested directories, files of several sizes, a symlink, a hard link, a
    // FIFO, a read-only directory, and 2,000 small files.
    write(&src.join("a/b/c/deep.txt"), 10, 1);
    write(&src.join("a/big.bin"), 3 << 20, 2);
    write(&src.join("empty"), 0, 3);
    write(&src.join("linked"), 5000, 4);
    std::fs::hard_link(src.join("linked"), src.join("a/also-linked")).unwrap();
    std::os::unix::fs::symlink("a/b/c/deep.txt", src.join("to-deep")).unwrap();
    let fifo = std::ffi::CString::new(src.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    for i in 0..2000 {
        write(
            &src.join(format!("many/{:02}/f{i}", i % 20)),
            100 + i % 50,
            i as u8,
        );
    }
    xattr::set(src.join("a/big.bin"), "user.kind", b"big").unwrap();
    xattr::set(src.join("a"), "user.kind", b"a directory").unwrap();
    std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(
        src.join("a/big.bin"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let (fs, dst) = fossil_with_backup(work.path());
    let mut stamps = Stamps::new();
    let first = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.skipped.len(), 1, "{:?}", first.skipped);
    assert!(first.skipped[0].1.contains("FIFO"));
    assert_eq!((first.files, first.symlinks), (2005, 1));
    same_tree(&fs, &src, dst);
    // The hard link is one file with two names.
    let a = fs.lookup(dst, b"linked").unwrap();
    let dir_a = fs.lookup(dst, b"a").unwrap();
    let b = fs.lookup(dir_a.ino, b"also-linked").unwrap();
    assert_eq!((a.ino, a.nlink), (b.ino, 2));

    // Nothing changed: nothing is read.
    let again = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    assert_eq!((again.bytes_read, again.imported), (0, 0));
    assert_eq!(again.unchanged, 2005);

    // An edit, a new file, a removal and a renamed directory: only the
    // edited and new files are read.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(src.join("a/b/c/deep.txt"))
        .unwrap_or_else(|_| {
            std::fs::set_permissions(src.join("a/b"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::fs::OpenOptions::new()
                .append(true)
                .open(src.join("a/b/c/deep.txt"))
                .unwrap()
        });
    std::io::Write::write_all(&mut f, b" and more").unwrap();
    drop(f);
    write(&src.join("new.txt"), 777, 9);
    xattr::remove(src.join("a"), "user.kind").unwrap();
    std::fs::remove_file(src.join("empty")).unwrap();
    std::fs::rename(src.join("many/07"), src.join("many/seven")).unwrap();
    let changed = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    assert!(changed.errors.is_empty(), "{:?}", changed.errors);
    same_tree(&fs, &src, dst);
    let a = fs.lookup(dst, b"a").unwrap();
    assert!(
        fs.getxattr(a.ino, b"user.kind").is_err(),
        "a removed xattr goes"
    );
    // The renamed directory's files are new paths, so they are read again;
    // nothing else is.
    let renamed: u64 = std::fs::read_dir(src.join("many/seven"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(changed.bytes_read, 19 + 777 + renamed);
    assert!(
        changed.removed >= 2,
        "the file and the old directory name: {}",
        changed.removed
    );
}

/// Waits until the mtime of `path` is no longer `mtime_ns`.
fn wait_until_changed(path: &Path, mtime_ns: i128) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let m = std::fs::metadata(path).unwrap();
        if i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()) != mtime_ns {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never changed",
            path.display()
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_file_that_keeps_changing_while_it_is_read_is_reported_and_its_previous_version_stays() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    write(&src.join("busy"), 16 << 20, 1);
    write(&src.join("calm"), 1000, 2);
    let (fs, dst) = fossil_with_backup(work.path());
    let mut stamps = Stamps::new();
    let first = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let before = read_all(&fs, fs.lookup(dst, b"busy").unwrap().ino);

    // A writer that never stops: every read of the file sees it change.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (src.join("busy"), stop.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&n.to_le_bytes(), (n * 4096) % (16 << 20))
                    .unwrap();
                n += 1;
            }
        })
    };
    // The file has changed since the first sync before the second starts
    // (else it would be skipped as unchanged).
    let imported = stamps.get(Path::new("busy")).copied().unwrap();
    wait_until_changed(&src.join("busy"), imported.mtime_ns);
    let busy = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(busy.errors.len(), 1, "{:?}", busy.errors);
    assert_eq!(busy.errors[0].0, Path::new("busy"));
    assert!(
        busy.errors[0]
            .1
            .contains("changed while it was read 3 times"),
        "{}",
        busy.errors[0].1
    );
    assert_eq!(busy.bytes_read, 3 * (16 << 20), "read three times");
    let after = read_all(&fs, fs.lookup(dst, b"busy").unwrap().ino);
    assert!(after == before, "the previous version stays");
    // Once it is quiet, it is read once and backed up.
    let quiet = sync_dir(&fs, &src, dst, &mut stamps).unwrap();
    assert!(quiet.errors.is_empty(), "{:?}", quiet.errors);
    same_tree(&fs, &src, dst);
}

#[test]
fn large_files_of_one_directory_are_read_side_by_side_and_all_copied() {
    // Each file is long enough to be cut and sealed on rayon's pool while
    // the thread reading it waits: read side by side on that pool, they
    // would wait on each other for good.
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for f in 0..6 {
        let data: Vec<u8> = (0..(6 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(src.join(format!("large-{f}")), data).unwrap();
    }
    let fs = fossil(work.path());
    let mut stamps = Stamps::new();
    let report = sync_dir(&fs, &src, 1, &mut stamps).unwrap();
    assert_eq!(report.imported, 6, "{report:?}");
    assert_eq!(report.bytes_read, 6 * (6 << 20));
    same_tree(&fs, &src, 1);
}

#[test]
fn a_long_sync_tells_its_totals_as_batches_of_files_are_committed() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..600 {
        write(&src.join(format!("f{i:04}")), 100 + i, i as u8);
    }
    let fs = fossil(work.path());
    let mut stamps = Stamps::new();
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |files, bytes| seen.lock().unwrap().push((files, bytes));
    let options = SyncOptions {
        progress: Some(&progress),
        ..SyncOptions::default()
    };
    sync_subdir(&fs, &src, Path::new(""), 1, &mut stamps, &options).unwrap();
    let seen = seen.into_inner().unwrap();
    // 600 files, committed at most 256 at a time.
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
        "{seen:?}"
    );
    assert_eq!(seen.last().copied(), Some(stamps.totals()));
    assert_eq!(stamps.totals().0, 600);
}

#[test]
fn gc_running_all_through_a_sync_sweeps_no_block_of_a_file_being_imported() {
    use fincrypt_blockstore::{LocalStore, StoreOptions};
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    // Files over the inline limit, so each has a block of its own.
    for d in 0..30 {
        for f in 0..30 {
            write(
                &src.join(format!("d{d:02}/f{f:02}")),
                5000 + d * 300 + f * 7,
                (d * 30 + f) as u8,
            );
        }
    }
    let keys = MasterSecret::generate().keys();
    let volume =
        Arc::new(LocalStore::open(&work.path().join("volume"), StoreOptions::default()).unwrap());
    let meta = Meta::open(&work.path().join("meta.redb"), &keys, 0, 0).unwrap();
    let store: Arc<dyn BlockStore> = volume.clone();
    let fs = Fossil::new(
        meta,
        store,
        keys,
        TreeParams::default(),
        work.path().to_path_buf(),
    )
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut stamps = Stamps::new();
    let runs = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fincrypt_fs::snapshot::gc(&fs, &volume, |_| Ok(())).unwrap();
                runs += 1;
            }
            runs
        });
        let report = sync_dir(&fs, &src, 1, &mut stamps).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(report.imported, 900, "{report:?}");
        gc.join().unwrap()
    });
    assert!(runs > 1, "GC ran {runs} times");
    // Every file reads back whole: no block was swept before its file was named.
    fincrypt_fs::snapshot::gc(&fs, &volume, |_| Ok(())).unwrap();
    same_tree(&fs, &src, 1);
}

/// Waits until every directory under `root` has times over a second old:
/// only then does a walk keep a directory's stamp (a change within one tick
/// of the filesystem's clock could leave its times as they were).
fn wait_until_dirs_settled(root: &Path) {
    fn newest(dir: &Path) -> i128 {
        let m = std::fs::symlink_metadata(dir).unwrap();
        let mut t = (i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
            .max(i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()));
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                t = t.max(newest(&e.path()));
            }
        }
        t
    }
    let settled = newest(root) + 1_100_000_000;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128)
        < settled
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_directory_whose_stamp_is_unchanged_is_not_listed_again_and_every_change_is_still_seen() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..50 {
        write(&src.join(format!("d1/f{i}")), 5000 + i, i as u8);
    }
    for i in 0..5 {
        write(&src.join(format!("d1/sub/g{i}")), 6000, i as u8);
        write(&src.join(format!("d2/h{i}")), 7000, i as u8);
    }
    std::fs::hard_link(src.join("d2/h1"), src.join("d1/link")).unwrap();
    std::os::unix::fs::symlink("h0", src.join("d2/sym")).unwrap();
    let (fs, dst) = fossil_with_backup(work.path());
    let mut stamps = Stamps::new();
    // (A test-sized margin: by default a directory's times must be 10 s old.)
    let options = SyncOptions {
        dir_stamp_margin: Some(std::time::Duration::from_secs(1)),
        ..SyncOptions::default()
    };
    let sync = |stamps: &mut Stamps| {
        let r = sync_subdir(&fs, &src, Path::new(""), dst, stamps, &options).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        same_tree(&fs, &src, dst);
        r
    };
    sync(&mut stamps);
    // Listed again until their times are settled; then kept, and an
    // unchanged tree reads no listing of the copy and no file.
    wait_until_dirs_settled(&src);
    assert_eq!(sync(&mut stamps).listed, 4);
    let quiet = sync(&mut stamps);
    assert_eq!((quiet.listed, quiet.bytes_read), (0, 0));
    assert_eq!(quiet.unchanged, 61);
    // The daily safety net lists every copy all the same, and reads nothing.
    let whole = sync_subdir(
        &fs,
        &src,
        Path::new(""),
        dst,
        &mut stamps,
        &SyncOptions {
            ignore_dir_stamps: true,
            dir_stamp_margin: Some(std::time::Duration::from_secs(1)),
            ..SyncOptions::default()
        },
    )
    .unwrap();
    assert_eq!((whole.listed, whole.bytes_read), (4, 0));
    // The stamps as a daemon keeps them between runs do the same.
    let mut kept = Stamps::from_kept(
        stamps
            .clone()
            .take_changed()
            .into_iter()
            .filter_map(|(p, s)| Some((p, s?))),
    );
    let _ = stamps.take_changed();
    let restarted = sync(&mut kept);
    assert_eq!((restarted.listed, restarted.bytes_read), (0, 0));

    // A file edited in place changes no directory: it alone is read.
    let before = std::fs::metadata(src.join("d1/f3")).unwrap();
    write(&src.join("d1/f3"), 5003, 99);
    wait_until_changed(
        &src.join("d1/f3"),
        i128::from(before.mtime()) * 1_000_000_000 + i128::from(before.mtime_nsec()),
    );
    let edited = sync(&mut stamps);
    assert_eq!((edited.listed, edited.bytes_read), (0, 5003));
    // Entries made, removed and renamed, a mode, a symlink's target and a
    // new hard link: each lists the directories it changed, and the copy
    // follows.
    write(&src.join("d1/sub/new"), 10, 1);
    assert!(sync(&mut stamps).listed >= 1);
    std::fs::remove_file(src.join("d2/h3")).unwrap();
    sync(&mut stamps);
    std::fs::rename(src.join("d1/f4"), src.join("d1/f4b")).unwrap();
    sync(&mut stamps);
    std::fs::set_permissions(src.join("d2"), std::fs::Permissions::from_mode(0o711)).unwrap();
    sync(&mut stamps);
    std::fs::remove_file(src.join("d2/sym")).unwrap();
    std::os::unix::fs::symlink("h2", src.join("d2/sym")).unwrap();
    sync(&mut stamps);
    std::fs::hard_link(src.join("d1/f5"), src.join("d2/f5-too")).unwrap();
    sync(&mut stamps);
    let (a, b) = (
        fs.lookup(fs.lookup(dst, b"d1").unwrap().ino, b"f5")
            .unwrap(),
        fs.lookup(fs.lookup(dst, b"d2").unwrap().ino, b"f5-too")
            .unwrap(),
    );
    assert_eq!((a.ino, a.nlink), (b.ino, 2));
    // Settled again, nothing is listed.
    wait_until_dirs_settled(&src);
    sync(&mut stamps);
    assert_eq!(sync(&mut stamps).listed, 0);
}

#[test]
fn a_directory_made_again_in_the_copy_is_filled_whatever_its_stamp_says() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    write(&src.join("d/f"), 5000, 1);
    write(&src.join("d/e/g"), 6000, 2);
    let (fs, dst) = fossil_with_backup(work.path());
    // No margin: every directory's stamp is kept at once.
    let options = SyncOptions {
        dir_stamp_margin: Some(std::time::Duration::ZERO),
        ..SyncOptions::default()
    };
    let mut stamps = Stamps::new();
    sync_subdir(&fs, &src, Path::new(""), dst, &mut stamps, &options).unwrap();
    assert_eq!(
        sync_subdir(&fs, &src, Path::new(""), dst, &mut stamps, &options)
            .unwrap()
            .listed,
        0
    );
    // The copy of d goes behind the stamps' back (as after a sync that
    // failed and whose forgotten stamps came back): made again, it is
    // listed and filled, its stamp notwithstanding.
    fincrypt_fs::import::remove_tree(&fs, dst, b"d").unwrap();
    let again = sync_subdir(&fs, &src, Path::new(""), dst, &mut stamps, &options).unwrap();
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    same_tree(&fs, &src, dst);
    assert_eq!(again.bytes_read, 11_000);
}
