//! Watched folders on real directories and a real daemon: `fincrypt watch`
//! backs a folder up into `backups/NAME` on every change, `restore` brings
//! it back as it is or as a snapshot kept it, and recovery on a new machine
//! brings the backups back too.

mod common;
#[path = "common/trees.rs"]
mod trees;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    COMMAND_DEADLINE, Mount, PASSPHRASE, ctl, ctl_ok, fincrypt, init_home, mount_opts,
    random_bytes, run, set_config, set_xattr, text, wait_until,
};
use trees::{Tree, assert_same_tree, differences, tree, write_tree};

/// How long a settled change may take to show: `watch_settle` (2 s) and
/// then some, on a slow machine.
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a first backup of a large tree may take.
const BACKUP_DEADLINE: Duration = Duration::from_secs(600);

/// `fincrypt watch PATH --name NAME ARGS` on `home`; its output.
fn watch(home: &Path, path: &Path, name: &str, args: &[&str]) -> String {
    let out = run(
        fincrypt(home)
            .arg("watch")
            .arg(path)
            .args(["--name", name])
            .args(args),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "watch: {}", text(&out.stderr));
    text(&out.stdout)
}

/// `fincryptctl watch status --json`: the folder named `name`.
fn folder(home: &Path, name: &str) -> serde_json::Value {
    let out = ctl_ok(home, &["watch", "status", "--json"]);
    let list: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no folder {name} in {list}"))
        .clone()
}

/// Waits until the daemon has backed up everything it saw of `name`:
/// a backup ended after at least `scans` full scans, nothing pending.
fn wait_backed_up(home: &Path, name: &str, scans: u64, limit: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until("the folder to be backed up", limit, || {
        last = folder(home, name);
        last["scans"].as_u64() >= Some(scans)
            && last["pending"] == 0
            && last["last_backed_up"].is_u64()
    });
    last
}

/// Waits until the copy at `copy` is the same tree as `src`.
fn wait_same(src: &Path, copy: &Path, what: &str) {
    let mut last = None;
    let want = tree(src);
    let shown = what.to_owned();
    let ok = (|| {
        let deadline = std::time::Instant::now() + CHANGE_DEADLINE;
        while std::time::Instant::now() < deadline {
            // Read while the watcher may be changing it: a name can go
            // between listing and reading, which is another try.
            if let Ok(got) = std::panic::catch_unwind(|| tree(copy)) {
                if got == want {
                    return true;
                }
                last = Some(got);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })();
    assert!(
        ok,
        "{shown}: the copy did not become the source within {CHANGE_DEADLINE:?}: {:?}",
        last.map(|l| differences(&l, &want))
    );
}

/// `fincrypt restore NAME DEST ARGS` on `home`.
fn restore(home: &Path, name: &str, dest: &Path, args: &[&str]) -> std::process::Output {
    run(
        fincrypt(home)
            .arg("restore")
            .arg(name)
            .arg(dest)
            .args(args)
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        Duration::from_secs(600),
    )
}

fn restore_ok(home: &Path, name: &str, dest: &Path, args: &[&str]) -> String {
    let out = restore(home, name, dest, args);
    assert!(
        out.status.success(),
        "restore {name} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A few thousand small files in nested directories.
fn many_files(root: &Path, n: usize) {
    for i in 0..n {
        let dir = root.join(format!("many/{}/{}", i % 10, i % 7));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("n{i}")),
            format!("file {i}\n").repeat(i % 50),
        )
        .unwrap();
    }
}

/// The mode of `p`'s permission bits.
fn perm(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_watched_folder_is_backed_up_and_restored_identical_with_links_modes_times_and_xattrs() {
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), 200 << 20);
    many_files(src.path(), 3000);
    set_xattr(&src.path().join("many"), "user.kind", b"lots");
    std::fs::set_permissions(
        src.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    let home = init_home();
    let said = watch(home.path(), src.path(), "docs", &["--redundancy", "3"]);
    assert!(said.contains("backups/docs"), "{said}");
    let m = Mount::start(home);
    let f = wait_backed_up(m.home(), "docs", 1, BACKUP_DEADLINE);
    assert_eq!(f["driver"], "inotify", "{f}");
    assert_eq!(f["error_count"], 0, "{f}");
    let copy = m.path().join("backups/docs");
    assert_same_tree(&tree(&copy), &tree(src.path()), "the copy in the mount");
    assert_eq!(perm(&copy), 0o750, "the folder's own mode");
    // The copy is the watcher's alone.
    for attempt in [
        std::fs::write(copy.join("new"), b"x").err(),
        std::fs::remove_file(copy.join("empty")).err(),
        std::fs::rename(m.path().join("backups"), m.path().join("elsewhere")).err(),
        std::fs::OpenOptions::new()
            .append(true)
            .open(copy.join("empty"))
            .err(),
        std::fs::hard_link(copy.join("empty"), m.path().join("linked")).err(),
    ] {
        let e = attempt.expect("a change under backups/ is refused");
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    }
    std::fs::write(
        m.path().join("outside"),
        b"the rest of the mount is writable",
    )
    .unwrap();
    // Its redundancy shows as the directory's.
    let r = ctl_ok(m.home(), &["redundancy", "get", copy.to_str().unwrap()]);
    assert!(r.contains('3'), "{r}");

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("restored");
    let said = restore_ok(m.home(), "docs", &dest, &[]);
    assert!(said.contains("3"), "{said}");
    assert_same_tree(&tree(&dest), &tree(src.path()), "the restored tree");
    assert_eq!(perm(&dest), 0o750);
    // Not over what is there, unless asked.
    let again = restore(m.home(), "docs", &dest, &[]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--overwrite"),
        "{}",
        text(&again.stderr)
    );
    std::fs::write(dest.join("empty"), b"scribbled").unwrap();
    restore_ok(m.home(), "docs", &dest, &["--overwrite"]);
    assert_same_tree(&tree(&dest), &tree(src.path()), "restored over itself");
    let unknown = restore(m.home(), "nothing", &out.path().join("x"), &[]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("nothing"),
        "{}",
        text(&unknown.stderr)
    );

    // Without a daemon, from the home itself.
    let home = m.unmount();
    let offline = out.path().join("offline");
    restore_ok(home.path(), "docs", &offline, &[]);
    assert_same_tree(
        &tree(&offline),
        &tree(src.path()),
        "restored without a daemon",
    );
}

/// Runs `f` on a small tree, then checks the copy follows it.
fn change(src: &Path, copy: &Path, what: &str, f: impl FnOnce(&Path)) {
    f(src);
    wait_same(src, copy, what);
}

#[test]
fn every_change_shows_in_the_mount_once_settled_and_restore_at_gives_the_earlier_state() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    std::fs::create_dir_all(s.join("a/b")).unwrap();
    std::fs::write(s.join("a/b/one"), random_bytes(1, 300_000)).unwrap();
    std::fs::write(s.join("two"), b"two").unwrap();
    std::fs::write(s.join("big"), random_bytes(3, 8 << 20)).unwrap();
    std::os::unix::fs::symlink("two", s.join("to-two")).unwrap();
    let home = init_home();
    watch(home.path(), s, "work", &[]);
    let m = Mount::start(home);
    let copy = m.path().join("backups/work");
    wait_backed_up(m.home(), "work", 1, BACKUP_DEADLINE);
    wait_same(s, &copy, "the first backup");
    let first = tree(s);
    let snap = ctl_ok(m.home(), &["snapshots", "create"]);
    let snap = snap
        .split_whitespace()
        .find(|w| w.starts_with("20"))
        .unwrap_or_else(|| panic!("a snapshot name in {snap:?}"))
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();

    let blocks = || common::number(&common::status(m.home()), "own_blocks");
    let at_start = blocks();
    change(s, &copy, "an edit in the middle of a large file", |s| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.join("big"))
            .unwrap();
        f.write_all_at(b"a few bytes", 4 << 20).unwrap();
    });
    let edited = blocks();
    assert!(
        edited > at_start && edited - at_start <= 8,
        "an edit in the middle of 8 MiB costs only the changed chunks: {at_start} -> {edited} blocks"
    );
    change(s, &copy, "an edit in the middle", |s| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.join("a/b/one"))
            .unwrap();
        f.write_all_at(b"edited in the middle", 150_000).unwrap();
    });
    change(s, &copy, "a new file and directory", |s| {
        std::fs::create_dir(s.join("new")).unwrap();
        std::fs::write(s.join("new/file"), random_bytes(2, 70_000)).unwrap();
    });
    change(s, &copy, "a delete", |s| {
        std::fs::remove_file(s.join("two")).unwrap()
    });
    let before_rename = blocks();
    change(
        s,
        &copy,
        "a rename of a directory, and a copy of a file",
        |s| {
            std::fs::rename(s.join("a"), s.join("renamed")).unwrap();
            std::fs::copy(s.join("big"), s.join("big-copy")).unwrap();
        },
    );
    assert_eq!(
        blocks(),
        before_rename,
        "renamed and copied files cost no new blocks"
    );
    // The renamed directory is still watched under its new name.
    change(s, &copy, "a change inside the renamed directory", |s| {
        std::fs::write(s.join("renamed/b/three"), b"three").unwrap();
    });
    change(s, &copy, "a mode and a symlink retargeted", |s| {
        std::fs::set_permissions(
            s.join("new/file"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_file(s.join("to-two")).unwrap();
        std::os::unix::fs::symlink("new/file", s.join("to-two")).unwrap();
    });
    change(s, &copy, "a directory removed with what it holds", |s| {
        std::fs::remove_dir_all(s.join("renamed")).unwrap();
    });

    // The snapshot kept the first state, in the mount and for restore.
    let kept = m.path().join(".snapshots").join(&snap).join("backups/work");
    // (`.snapshots/` counts no links: its contents, modes and times are compared.)
    let seen = tree(&kept);
    assert_eq!(
        differences(&seen, &first)
            .into_iter()
            .filter(|d| !d.contains("links"))
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "the snapshot's copy"
    );
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("then");
    let said = restore_ok(m.home(), "work", &dest, &["--at", &snap]);
    assert!(said.contains(&snap), "{said}");
    assert_same_tree(&tree(&dest), &first, "restore --at the snapshot");
    let now = out.path().join("now");
    restore_ok(m.home(), "work", &now, &[]);
    assert_same_tree(&tree(&now), &tree(s), "restore of the newest");
    let before = restore(
        m.home(),
        "work",
        &out.path().join("x"),
        &["--at", "2001-01-01T00:00:00Z"],
    );
    assert!(!before.status.success());
    assert!(
        text(&before.stderr).contains("oldest"),
        "{}",
        text(&before.stderr)
    );

    // Unwatched: the copy leaves the live tree, a snapshot keeps it.
    let out_unwatch = run(
        fincrypt(m.home()).args(["unwatch", "work"]),
        COMMAND_DEADLINE,
    );
    assert!(
        out_unwatch.status.success(),
        "{}",
        text(&out_unwatch.stderr)
    );
    wait_until("the copy to leave the live tree", CHANGE_DEADLINE, || {
        !copy.exists()
    });
    let last = out.path().join("last");
    let snaps = ctl_ok(m.home(), &["snapshots", "list"]);
    let newest = snaps
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("20")))
        .next_back()
        .unwrap()
        .to_owned();
    restore_ok(m.home(), "work", &last, &["--at", &newest]);
    assert_same_tree(
        &tree(&last),
        &tree(s),
        "the last state, kept by the snapshot before removal",
    );
}

#[test]
fn a_file_rewritten_continuously_is_backed_up_whole_once_it_settles() {
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("busy");
    // Each version: 2 MiB of one byte value, so a torn copy shows.
    let version = |v: u8| vec![v; 2 << 20];
    std::fs::write(&file, version(0)).unwrap();
    let home = init_home();
    watch(home.path(), src.path(), "busy", &[]);
    let m = Mount::start(home);
    wait_backed_up(m.home(), "busy", 1, BACKUP_DEADLINE);
    let copy = m.path().join("backups/busy/busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (file, stop) = (file.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut v, mut last) = (1u8, 1u8);
            let until = std::time::Instant::now() + Duration::from_secs(6);
            while std::time::Instant::now() < until
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                // Rewritten in place, in pieces: readers can catch it half done.
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                for piece in version(v).chunks(256 << 10) {
                    f.write_all(piece).unwrap();
                }
                last = v;
                v = v.wrapping_add(1).max(1);
            }
            last
        })
    };
    // Whatever the copy shows meanwhile is one whole version.
    while !writer.is_finished() {
        if let Ok(bytes) = std::fs::read(&copy) {
            assert_eq!(bytes.len(), 2 << 20);
            assert!(
                bytes.iter().all(|b| *b == bytes[0]),
                "a torn copy: it starts with {} and holds other bytes",
                bytes[0]
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = writer.join().unwrap();
    wait_until("the last version to be backed up", CHANGE_DEADLINE, || {
        std::fs::read(&copy).is_ok_and(|b| b == version(last))
    });
}

#[test]
fn a_rescan_of_ten_thousand_unchanged_files_after_a_restart_reads_no_file() {
    let src = tempfile::tempdir().unwrap();
    many_files(src.path(), 10_000);
    let home = init_home();
    watch(home.path(), src.path(), "many", &[]);
    let m = Mount::start(home);
    let first = wait_backed_up(m.home(), "many", 1, BACKUP_DEADLINE);
    assert_eq!(first["files"], 10_000, "{first}");
    assert!(first["bytes_read"].as_u64() > Some(0));
    assert_eq!(
        first["bytes_read"], first["bytes"],
        "the first backup read every file once"
    );
    let home = m.unmount();
    // Restarted: its first scan finds every stamp as it was kept.
    let m = Mount::start(home);
    let again = wait_backed_up(m.home(), "many", 1, BACKUP_DEADLINE);
    assert_eq!(
        again["bytes_read"], 0,
        "an unchanged tree is not read: {again}"
    );
    assert_eq!(again["files"], 10_000, "{again}");
    assert_same_tree(
        &tree(&m.path().join("backups/many")),
        &tree(src.path()),
        "the copy",
    );
    // Asked to rescan, the running daemon compares every file again, reads
    // none, and says when it is done.
    let out = ctl_ok(m.home(), &["watch", "rescan", "many", "--json"]);
    let done: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let w = &done[0]["folder"];
    assert_eq!(w["name"], "many", "{out}");
    assert_eq!(done[0]["bytes_read"], 0, "{out}");
    assert_eq!(w["scans"], 2, "{out}");
    assert_eq!(w["rescan_pending"], false, "{out}");
    assert_eq!(w["files"], 10_000, "{out}");
    assert!(w["last_scan_seconds"].as_f64().is_some(), "{out}");
    let said = ctl_ok(m.home(), &["watch", "rescan"]);
    assert!(said.starts_with("many: rescanned in "), "{said}");
    assert_eq!(folder(m.home(), "many")["bytes_read"], 0);
    let refused = ctl(m.home(), &["watch", "rescan", "nosuch"]);
    assert!(
        !refused.status.success()
            && text(&refused.stderr).contains("no watched folder is named \"nosuch\""),
        "{}",
        text(&refused.stderr)
    );
    // And a change after it is read alone.
    std::fs::write(src.path().join("many/0/0/n0"), b"changed").unwrap();
    wait_until("the change to be read", CHANGE_DEADLINE, || {
        folder(m.home(), "many")["bytes_read"] == 7
    });
}

#[test]
fn fincrypts_own_home_and_mount_inside_a_watched_folder_are_not_backed_up() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("mine"), b"mine").unwrap();
    let home = tempfile::Builder::new()
        .prefix("home-")
        .tempdir_in(outer.path())
        .unwrap();
    common::init_home_in(&home);
    let mnt = tempfile::Builder::new()
        .prefix("mnt-")
        .tempdir_in(outer.path())
        .unwrap();
    let (home_name, mnt_name) = (
        home.path().file_name().unwrap().to_owned(),
        mnt.path().file_name().unwrap().to_owned(),
    );
    watch(home.path(), outer.path(), "outer", &[]);
    let m = Mount::start_on(home, mnt, common::StartOptions::default());
    let f = wait_backed_up(m.home(), "outer", 1, BACKUP_DEADLINE);
    let copy = m.path().join("backups/outer");
    assert_eq!(std::fs::read(copy.join("mine")).unwrap(), b"mine");
    assert!(
        !copy.join(&home_name).exists(),
        "the home is not in the copy"
    );
    assert!(
        !copy.join(&mnt_name).exists(),
        "the mount is not in the copy"
    );
    let skipped = f["skipped"].to_string();
    assert!(
        skipped.contains(home_name.to_str().unwrap())
            && skipped.contains(mnt_name.to_str().unwrap())
            && skipped.contains("Fincrypt's own data"),
        "{f}"
    );
}

#[test]
fn watch_refuses_what_it_cannot_back_up_and_names_clashes() {
    let home = init_home();
    let src = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], wanted: &str| {
        let out = run(
            fincrypt(home.path()).arg("watch").args(args),
            COMMAND_DEADLINE,
        );
        assert!(!out.status.success(), "{args:?} refused");
        assert!(
            text(&out.stderr).contains(wanted),
            "{args:?}: {}",
            text(&out.stderr)
        );
    };
    refused(&["/no/such/dir"], "cannot watch /no/such/dir");
    refused(&[home.path().join("fs").to_str().unwrap()], "");
    refused(
        &[home.path().to_str().unwrap()],
        "inside Fincrypt's own home",
    );
    let s = src.path().to_str().unwrap();
    refused(&[s, "--name", "a/b"], "cannot name a watched folder");
    watch(home.path(), src.path(), "docs", &[]);
    refused(&[s, "--name", "other"], "already watched");
    let other = tempfile::tempdir().unwrap();
    refused(
        &[other.path().to_str().unwrap(), "--name", "docs"],
        "already named",
    );
    // The config keeps the user's comments and says what is watched.
    let config = std::fs::read_to_string(home.path().join("config.toml")).unwrap();
    assert!(config.contains("# Fincrypt settings"), "{config}");
    assert!(
        config.contains("[[watch]]") && config.contains("name = \"docs\""),
        "{config}"
    );
    let out = run(
        fincrypt(home.path()).args(["unwatch", "nope"]),
        COMMAND_DEADLINE,
    );
    assert!(text(&out.stderr).contains("docs"), "{}", text(&out.stderr));
}

#[test]
fn a_watched_folder_on_peers_comes_back_on_a_new_machine_from_the_phrase() {
    let (_dirs, nodes) = common::serve_nodes(3);
    let (home, phrase) = common::owner_home();
    let src = tempfile::tempdir().unwrap();
    write_tree(src.path(), 3 << 20);
    watch(home.path(), src.path(), "docs", &["--redundancy", "2"]);
    let m = Mount::start_with(home, mount_opts(&nodes, &[]));
    wait_backed_up(m.home(), "docs", 1, BACKUP_DEADLINE);
    let sync = common::ctl(m.home(), &["sync", "--replicated", "--timeout", "300"]);
    assert!(
        sync.status.success(),
        "sync --replicated: {}",
        text(&sync.stdout)
    );
    // Every block has its two holders, as the next root's manifest records.
    ctl_ok(m.home(), &["sync"]);
    let manifest: serde_json::Value =
        serde_json::from_str(ctl_ok(m.home(), &["manifest", "--json"]).trim()).unwrap();
    let entries = manifest["manifest"]["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("manifest entries in {manifest}"));
    assert!(!entries.is_empty());
    for e in entries {
        assert!(
            e["holders"].as_array().map_or(0, Vec::len) >= 2,
            "a block with fewer than 2 holders: {e}"
        );
    }
    let home = m.unmount();
    let lost: PathBuf = home.path().to_path_buf();
    drop(home);
    assert!(!lost.exists());

    let new_home = tempfile::tempdir().unwrap();
    let out = run(
        fincrypt(new_home.path())
            .args(["recover", "--bootstrap", &nodes[0].addr])
            .env("FINCRYPT_RECOVERY_PHRASE", &phrase)
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        Duration::from_secs(600),
    );
    assert!(out.status.success(), "recover: {}", text(&out.stderr));
    set_config(new_home.path(), "snapshot_interval", "0");
    let m = Mount::start_with(new_home, mount_opts(&nodes, &[]));
    // The copy is there (not watched on this machine, and kept).
    assert!(m.path().join("backups/docs").is_dir());
    let dest = tempfile::tempdir().unwrap();
    let dest = dest.path().join("docs");
    restore_ok(m.home(), "docs", &dest, &[]);
    let s = common::status(m.home());
    assert!(
        common::number(&s, "fetched_from_holders") > 0,
        "the data came from holders: {s}"
    );
    let want: Tree = tree(src.path());
    assert_same_tree(&tree(&dest), &want, "the folder brought back");
}

#[test]
fn what_was_backed_up_survives_the_daemon_killed_and_nothing_is_skipped_after() {
    let src = tempfile::tempdir().unwrap();
    many_files(src.path(), 500);
    std::fs::write(src.path().join("large"), random_bytes(4, 5 << 20)).unwrap();
    let home = init_home();
    watch(home.path(), src.path(), "kept", &[]);
    let m = Mount::start(home);
    let before = wait_backed_up(m.home(), "kept", 1, BACKUP_DEADLINE);
    // A change backed up, then the daemon killed at once.
    let late: &[u8] = b"backed up just before the kill";
    std::fs::write(src.path().join("late"), late).unwrap();
    let copy = m.path().join("backups/kept");
    wait_same(src.path(), &copy, "the change before the kill");
    // The copy shows as soon as it is in the tree; it is backed up once
    // it is durable with its stamps, which is when nothing is pending.
    let read_before = before["bytes_read"].as_u64().unwrap();
    wait_until("the change made durable", CHANGE_DEADLINE, || {
        let f = folder(m.home(), "kept");
        f["pending"] == 0 && f["bytes_read"].as_u64() >= Some(read_before + late.len() as u64)
    });
    let home = m.kill9();
    let m = Mount::start(home);
    let f = wait_backed_up(m.home(), "kept", 1, BACKUP_DEADLINE);
    assert_eq!(
        f["bytes_read"], 0,
        "its stamps were kept with the copies: {f}"
    );
    assert_same_tree(
        &tree(&m.path().join("backups/kept")),
        &tree(src.path()),
        "the copy after kill -9",
    );
}

#[test]
fn a_folder_unwatched_while_no_daemon_runs_leaves_the_live_tree_at_the_next_mount() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"kept in a snapshot").unwrap();
    let home = init_home();
    watch(home.path(), src.path(), "gone", &[]);
    let m = Mount::start(home);
    wait_backed_up(m.home(), "gone", 1, BACKUP_DEADLINE);
    let home = m.unmount();
    let out = run(
        fincrypt(home.path()).args(["unwatch", "gone"]),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("next mounted"),
        "{}",
        text(&out.stdout)
    );
    let m = Mount::start(home);
    let copy = m.path().join("backups/gone");
    wait_until("the copy to leave the live tree", CHANGE_DEADLINE, || {
        !copy.exists()
    });
    let snaps = ctl_ok(m.home(), &["snapshots", "list"]);
    let newest = snaps
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("20")))
        .next_back()
        .unwrap_or_else(|| panic!("a snapshot kept it: {snaps}"))
        .to_owned();
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("r");
    restore_ok(m.home(), "gone", &dest, &["--at", &newest]);
    assert_same_tree(&tree(&dest), &tree(src.path()), "the copy a snapshot kept");
}
