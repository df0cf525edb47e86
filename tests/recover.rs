//! A lost machine: the owner's home destroyed, everything brought back on a
//! new home from the recovery phrase and one node's address, with real
//! `serve` daemons on 127.0.0.1 and real FUSE mounts.

mod common;
#[path = "common/trees.rs"]
mod trees;

use std::path::Path;
use std::time::Duration;

use common::{
    Mount, PASSPHRASE, Served, ctl, ctl_ok, fincrypt, mount_opts, number, random_bytes, run,
    set_config, status, text, wait_until,
};
use trees::{Tree, tree, write_tree};

/// Serve nodes with 1 GiB each.
fn nodes(n: usize) -> (Vec<tempfile::TempDir>, Vec<Served>) {
    common::serve_nodes(n)
}

/// A new owner home with redundancy 3 and no scheduled snapshots; its phrase.
fn owner_home() -> (tempfile::TempDir, String) {
    let (home, phrase) = common::owner_home();
    set_config(home.path(), "redundancy", "3");
    (home, phrase)
}

fn snapshot_names(mnt: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(mnt.join(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn recover(home: &Path, phrase: &str, args: &[&str]) -> std::process::Output {
    run(
        fincrypt(home)
            .arg("recover")
            .args(args)
            .env("FINCRYPT_RECOVERY_PHRASE", phrase)
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        Duration::from_secs(600),
    )
}

/// What was written before the loss, as the owner's mount showed it.
struct Before {
    tree: Tree,
    snapshots: Vec<String>,
    /// The first snapshot's view of `d0`, taken before later changes.
    first_snapshot_d0: Tree,
}

/// Writes the tree on a mount over `nodes`, snapshots, changes a file,
/// replicates, unmounts and destroys the owner's home.
fn lose_a_machine(nodes: &[Served], big: usize) -> (String, Before) {
    let (home, phrase) = owner_home();
    let m = Mount::start_with(home, mount_opts(nodes, &[]));
    write_tree(m.path(), big);
    ctl_ok(m.home(), &["snapshots", "create"]);
    // After the first snapshot: a change only the newest root has.
    std::fs::write(
        m.path().join("d0/sub0/deeper/f0"),
        b"changed after the first snapshot",
    )
    .unwrap();
    std::fs::write(m.path().join("new-after-snapshot"), b"new").unwrap();
    let out = ctl(m.home(), &["sync", "--replicated", "--timeout", "300"]);
    assert!(
        out.status.success(),
        "sync --replicated: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let s = status(m.home());
    assert!(
        number(&s, "root_sequence") >= 1,
        "a root record was published: {s}"
    );
    let snapshots = snapshot_names(m.path());
    assert!(snapshots.len() >= 2, "snapshots: {snapshots:?}");
    let before = Before {
        tree: tree(m.path()),
        first_snapshot_d0: tree(&m.path().join(".snapshots").join(&snapshots[0]).join("d0")),
        snapshots,
    };
    let home = m.unmount();
    let path = home.path().to_path_buf();
    drop(home);
    assert!(!path.exists(), "the owner's home is gone");
    (phrase, before)
}

fn check_recovered(mnt: &Path, before: &Before) {
    let after = tree(mnt);
    assert_eq!(after.same_inode, before.tree.same_inode, "hard links");
    assert_eq!(after.xattrs, before.tree.xattrs, "xattrs");
    assert_eq!(after.links, before.tree.links, "link counts");
    for (p, e) in &before.tree.entries {
        assert_eq!(
            after.entries.get(p),
            Some(e),
            "{} after recovery",
            p.display()
        );
    }
    assert_eq!(after.entries.len(), before.tree.entries.len());
    assert_eq!(snapshot_names(mnt), before.snapshots, "retained snapshots");
    let first = tree(&mnt.join(".snapshots").join(&before.snapshots[0]).join("d0"));
    assert_eq!(first, before.first_snapshot_d0, "the first snapshot's d0");
}

#[test]
fn a_lost_machine_is_recovered_from_the_phrase_and_one_node_without_placing_copies_again() {
    let (_homes, nodes) = nodes(4);
    let (phrase, before) = lose_a_machine(&nodes, 100 << 20);

    let new = tempfile::Builder::new()
        .prefix("fincrypt-recovered-")
        .tempdir()
        .unwrap();
    let out = recover(new.path(), &phrase, &["--bootstrap", &nodes[0].addr]);
    assert!(
        out.status.success(),
        "recover: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let said = text(&out.stdout);
    assert!(
        said.contains("files 244 "),
        "recover reports what it found: {said}"
    );
    // Only metadata came: far less than the 100 MiB file.
    let recovered_bytes: u64 = walk_bytes(&new.path().join("volume"));
    assert!(
        recovered_bytes < 20 << 20,
        "recovery fetched {recovered_bytes} bytes"
    );
    set_config(new.path(), "snapshot_interval", "0");

    let m = Mount::start_with(new, mount_opts(&nodes, &[]));
    check_recovered(m.path(), &before);
    // The recovered manifest names every copy: a full pass finds nothing short
    // and puts nothing.
    wait_until(
        "a full pass of the recovered mount",
        Duration::from_secs(120),
        || {
            let s = status(m.home());
            number(&s, "full_walks") >= 1 && number(&s, "under_replicated") == 0
        },
    );
    let s = status(m.home());
    assert_eq!(number(&s, "copies_put"), 0, "nothing placed again: {s}");
    assert_eq!(number(&s, "lost"), 0);
    // Replication carries on: new data gets its copies, and the new root is
    // published above the lost machine's.
    std::fs::write(
        m.path().join("after-recovery"),
        b"written on the new machine",
    )
    .unwrap();
    let out = ctl(m.home(), &["sync", "--replicated", "--timeout", "300"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(number(&status(m.home()), "root_sequence") >= 2);
    m.unmount();
}

fn walk_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                n += m.len();
            }
        }
    }
    n
}

#[test]
fn recovery_with_one_node_killed_and_with_all_reads_everything_with_every_node_stopped() {
    let (_homes, mut nodes) = nodes(4);
    let (phrase, before) = lose_a_machine(&nodes, 8 << 20);
    // One holder gone for good before recovery.
    let mut killed = nodes.remove(3);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();

    let new = tempfile::Builder::new()
        .prefix("fincrypt-recovered-")
        .tempdir()
        .unwrap();
    let out = recover(
        new.path(),
        &phrase,
        &["--bootstrap", &nodes[1].addr, "--all"],
    );
    assert!(
        out.status.success(),
        "recover --all: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("every data block is in the local volume"));
    set_config(new.path(), "snapshot_interval", "0");
    // Every node stopped: the mount has only its own volume.
    drop(nodes);
    let m = Mount::start(new);
    check_recovered(m.path(), &before);
    m.unmount();
}

#[test]
fn recover_refuses_bad_phrases_unknown_owners_and_unreachable_peers_and_writes_no_key() {
    let (_homes, nodes) = nodes(1);
    let home = tempfile::tempdir().unwrap();
    // A word not in the list, named by its place.
    let (_, good) = owner_home();
    let mut words: Vec<&str> = good.split_whitespace().collect();
    words[4] = "notaword";
    let out = recover(
        home.path(),
        &words.join(" "),
        &["--bootstrap", &nodes[0].addr],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("word 5 (\"notaword\")"),
        "{}",
        text(&out.stderr)
    );
    let out = recover(
        home.path(),
        "abandon abandon",
        &["--bootstrap", &nodes[0].addr],
    );
    assert!(
        text(&out.stderr).contains("24 words; this one has 2"),
        "{}",
        text(&out.stderr)
    );
    // Valid, but nothing was ever published with it.
    let out = recover(home.path(), &good, &["--bootstrap", &nodes[0].addr]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no root found for this phrase among 1 peers"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !home.path().join("key.toml").exists(),
        "no key written after a failed recovery"
    );
    assert!(
        !home.path().join("volume").exists(),
        "the volume made while the root was looked for is taken away again"
    );
    // The same through the config's bootstrap (here its FINCRYPT_ variable).
    let out = run(
        fincrypt(home.path())
            .arg("recover")
            .env("FINCRYPT_BOOTSTRAP", &nodes[0].addr)
            .env("FINCRYPT_RECOVERY_PHRASE", &good)
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        Duration::from_secs(120),
    );
    assert!(
        text(&out.stderr).contains("no root found for this phrase among 1 peers"),
        "{}",
        text(&out.stderr)
    );
    // Nobody listening there.
    let out = recover(home.path(), &good, &["--bootstrap", "/ip4/127.0.0.1/tcp/9"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no peer reachable"),
        "{}",
        text(&out.stderr)
    );
    assert!(!home.path().join("key.toml").exists());
    // Without any peer: the key only, and it says the files are not restored.
    let out = recover(home.path(), &good, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Your files are NOT restored"),
        "{}",
        text(&out.stderr)
    );
    assert!(home.path().join("key.toml").exists());
}

#[test]
fn a_phrase_written_one_word_per_line_on_standard_input_is_read() {
    let (_, good) = owner_home();
    let home = tempfile::tempdir().unwrap();
    let mut child = fincrypt(home.path())
        .arg("recover")
        .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                good.split_whitespace()
                    .collect::<Vec<_>>()
                    .join("\n")
                    .as_bytes(),
            )
            .unwrap();
        stdin.write_all(b"\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(home.path().join("key.toml").exists());
}

#[test]
fn a_write_published_within_publish_interval_survives_a_machine_killed_before_any_snapshot() {
    let (_homes, nodes) = nodes(3);
    let (home, phrase) = owner_home();
    set_config(home.path(), "publish_interval", "2");
    let m = Mount::start_with(home, mount_opts(&nodes, &[]));
    std::fs::create_dir_all(m.path().join("docs")).unwrap();
    std::fs::write(m.path().join("docs/early"), b"before any snapshot").unwrap();
    wait_until("a first root published", Duration::from_secs(120), || {
        number(&status(m.home()), "root_sequence") >= 1
    });
    let first = number(&status(m.home()), "root_sequence");
    let late = random_bytes(5, 300_000);
    std::fs::write(m.path().join("docs/late"), &late).unwrap();
    std::fs::remove_file(m.path().join("docs/early")).unwrap();
    wait_until(
        "the later changes published",
        Duration::from_secs(120),
        || number(&status(m.home()), "root_sequence") > first,
    );
    // Published roots between snapshots are not snapshots.
    assert!(snapshot_names(m.path()).is_empty());
    let before = tree(m.path());
    // The machine dies: no unmount, no snapshot, no sync.
    let home = m.kill9();
    drop(home);

    let new = tempfile::Builder::new()
        .prefix("fincrypt-recovered-")
        .tempdir()
        .unwrap();
    let out = recover(new.path(), &phrase, &["--bootstrap", &nodes[2].addr]);
    assert!(
        out.status.success(),
        "recover: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    set_config(new.path(), "snapshot_interval", "0");
    let m = Mount::start_with(new, mount_opts(&nodes, &[]));
    assert_eq!(tree(m.path()), before, "the tree as last published");
    assert!(!m.path().join("docs/early").exists());
    assert_eq!(std::fs::read(m.path().join("docs/late")).unwrap(), late);
    assert!(snapshot_names(m.path()).is_empty());
    m.unmount();
}

#[test]
fn a_recovery_killed_midway_leaves_no_key_and_a_second_one_completes() {
    let (_homes, nodes) = nodes(3);
    let (phrase, before) = lose_a_machine(&nodes, 64 << 20);
    let new = tempfile::Builder::new()
        .prefix("fincrypt-recovered-")
        .tempdir()
        .unwrap();
    let mut child = fincrypt(new.path())
        .args(["recover", "--all", "--bootstrap", &nodes[0].addr])
        .env("FINCRYPT_RECOVERY_PHRASE", &phrase)
        .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the metadata is being rebuilt, while data is still to come.
    let meta = new.path().join("fs/meta.redb");
    wait_until(
        "recovery to start writing metadata",
        Duration::from_secs(120),
        || meta.exists() || child.try_wait().unwrap().is_some(),
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "recovery was killed before it ended");
    assert!(
        !new.path().join("key.toml").exists(),
        "an interrupted recovery writes no key"
    );

    let out = recover(new.path(), &phrase, &["--bootstrap", &nodes[1].addr]);
    assert!(
        out.status.success(),
        "the second recover: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    set_config(new.path(), "snapshot_interval", "0");
    let m = Mount::start_with(new, mount_opts(&nodes, &[]));
    check_recovered(m.path(), &before);
    m.unmount();
}
