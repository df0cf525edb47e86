//! A small network of real processes on 127.0.0.1: four `fincrypt serve`
//! nodes and a mount bootstrapped to them place the mount's own blocks at a
//! directory's redundancy, and the nodes only ever see ciphertext.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;

use common::{
    Mount, Served, StartOptions, ctl, ctl_ok, files_under, init_home, mount_opts, number, status,
    text,
};

/// Blocks the nodes under `homes` hold for others, in all.
fn held_blocks(homes: &[tempfile::TempDir]) -> u64 {
    homes
        .iter()
        .map(|h| number(&status(h.path()), "held_blocks"))
        .sum()
}

/// Four serve nodes and a mount bootstrapped to them, with `env` for the mount.
fn network(env: &[(&str, &str)]) -> (Vec<tempfile::TempDir>, Vec<Served>, Mount) {
    common::network(4, env)
}

const MARKER: &[u8] = b"PEERS-E2E-PLAINTEXT-MARKER-5b1d";

/// Writes files with [`MARKER`] in them under `dir` (and `dir/deeper`).
fn write_files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    std::fs::create_dir_all(dir.join("deeper")).unwrap();
    let mut written = Vec::new();
    for (i, len) in [64_000usize, 300_000, 2_500_000, 6_000_000]
        .into_iter()
        .enumerate()
    {
        let mut data = common::random_bytes(i as u64 + 7, len);
        for at in (0..len.saturating_sub(MARKER.len())).step_by(50_000) {
            data[at..at + MARKER.len()].copy_from_slice(MARKER);
        }
        let path = if i % 2 == 0 {
            dir.join(format!("file{i}"))
        } else {
            dir.join("deeper").join(format!("file{i}"))
        };
        std::fs::write(&path, &data).unwrap();
        written.push((path, data));
    }
    written
}

fn sync_replicated(home: &Path) {
    let out = ctl(home, &["sync", "--replicated", "--timeout", "120"]);
    assert!(
        out.status.success(),
        "sync --replicated failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `fincryptctl redundancy set DIR N` on the mount of `home`.
fn set_redundancy(home: &Path, dir: &Path, n: u8) {
    ctl_ok(
        home,
        &["redundancy", "set", dir.to_str().unwrap(), &n.to_string()],
    );
}

/// MNT/precious at redundancy 3 with [`write_files`] in it, replicated:
/// the home, the directory and what was written.
fn replicated_precious(
    m: &Mount,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<(std::path::PathBuf, Vec<u8>)>,
) {
    let home = m.home().to_path_buf();
    let dir = m.path().join("precious");
    std::fs::create_dir_all(&dir).unwrap();
    set_redundancy(&home, &dir, 3);
    let written = write_files(&dir);
    sync_replicated(&home);
    (home, dir, written)
}

#[test]
fn a_killed_holder_is_dropped_and_its_copies_are_made_again() {
    let (node_homes, mut nodes, m) = network(&[
        ("FINCRYPT_REPLICATE_INTERVAL", "2"),
        ("FINCRYPT_PROOF_INTERVAL", "1"),
    ]);
    let (home, _, written) = replicated_precious(&m);
    let own = number(&status(&home), "own_blocks");

    let mut dead = nodes.remove(0);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let survivors = &node_homes[1..];
    common::wait_until(
        "three copies of every own block on the three survivors",
        Duration::from_secs(60),
        || {
            let st = status(&home);
            let held: u64 = held_blocks(survivors);
            held == 3 * own
                && number(&st, "under_replicated") == 0
                && number(&st, "holders_dropped") >= 1
        },
    );
    let st = status(&home);
    assert!(number(&st, "proofs_passed") > 0, "{st}");
    assert!(number(&st, "proofs_failed") > 0, "{st}");
    for (path, data) in &written {
        assert!(
            std::fs::read(path).unwrap() == *data,
            "{} reads back",
            path.display()
        );
    }
    m.unmount();
    drop(nodes);
}

#[test]
fn four_nodes_hold_three_copies_of_every_own_block_and_no_plaintext() {
    // Only the passes `sync --replicated` asks for run in this test.
    // One snapshot kept, so a deleted file's blocks are freed at the next sync.
    let (node_homes, nodes, m) = network(&[
        ("FINCRYPT_REPLICATE_INTERVAL", "3600"),
        ("FINCRYPT_SNAPSHOT_KEEP", "1"),
    ]);
    let home = m.home().to_path_buf();

    let st = status(&home);
    let listen = st["listen_addrs"]
        .as_array()
        .expect("listen_addrs is a list");
    assert_eq!(listen.len(), 1, "{st}");
    assert!(listen[0].as_str().unwrap().contains("/p2p/"), "{st}");
    assert_eq!(number(&st, "proofs_failed"), 0);

    // Redundancy: 3 on a directory, inherited below it, default elsewhere.
    let dir = m.path().join("precious");
    std::fs::create_dir_all(dir.join("deeper")).unwrap();
    set_redundancy(&home, &dir, 3);
    let got = ctl_ok(&home, &["redundancy", "get", dir.to_str().unwrap()]);
    assert!(got.starts_with("3 (set here)"), "{got}");
    let got = ctl_ok(
        &home,
        &["redundancy", "get", dir.join("deeper").to_str().unwrap()],
    );
    assert!(got.starts_with("3 (inherited"), "{got}");
    let got = ctl_ok(&home, &["redundancy", "get", m.path().to_str().unwrap()]);
    assert!(got.starts_with("2 (the default)"), "{got}");
    let outside = ctl(&home, &["redundancy", "get", "/tmp"]);
    assert!(
        !outside.status.success(),
        "a path outside the mount is refused"
    );

    // Files with a plaintext marker, big enough to need blocks of their own.
    let mut written = write_files(&dir);
    sync_replicated(&home);

    let st = status(&home);
    assert_eq!(number(&st, "under_replicated"), 0, "{st}");
    assert!(
        number(&st, "peers") >= 4,
        "the mount sees the four nodes: {st}"
    );
    let own = number(&st, "own_blocks");
    assert!(own >= 4, "the files made blocks: {st}");
    let held: u64 = held_blocks(&node_homes);
    assert_eq!(held, 3 * own, "three copies of each of {own} own blocks");
    assert_eq!(
        number(&st, "held_blocks"),
        0,
        "the mount holds nothing for others"
    );

    for (path, data) in &written {
        assert!(
            std::fs::read(path).unwrap() == *data,
            "{} reads back",
            path.display()
        );
    }

    // A deleted file's blocks, once GC frees them, are released on the nodes.
    let (big, _) = written.pop().unwrap();
    std::fs::remove_file(&big).unwrap();
    sync_replicated(&home);
    let st = status(&home);
    let own_after = number(&st, "own_blocks");
    assert!(own_after < own, "deleting a 6 MB file freed blocks: {st}");
    let held: u64 = held_blocks(&node_homes);
    assert_eq!(
        held,
        3 * own_after,
        "freed blocks were released on the nodes"
    );

    for h in &node_homes {
        let mut files = Vec::new();
        files_under(h.path(), &mut files);
        for f in files {
            let bytes = std::fs::read(&f).unwrap_or_default();
            assert!(
                !common::contains(&bytes, MARKER),
                "plaintext marker in a node's {}",
                f.display()
            );
        }
    }

    m.unmount();
    drop(nodes);
}

#[test]
fn reads_come_from_holders_when_the_local_copies_are_damaged() {
    let env = [("FINCRYPT_REPLICATE_INTERVAL", "3600")];
    let (_node_homes, nodes, m) = network(&env);
    let (_, _, written) = replicated_precious(&m);
    let names: Vec<_> = written
        .iter()
        .map(|(p, d)| (p.strip_prefix(m.path()).unwrap().to_path_buf(), d.clone()))
        .collect();
    let home_dir = m.unmount();

    // Every block file of the owner's volume now holds zeros.
    let mut files = Vec::new();
    files_under(&home_dir.path().join("volume").join("blocks"), &mut files);
    assert!(files.len() >= 4, "the volume has block files");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        std::fs::write(f, vec![0u8; len]).unwrap();
    }

    let m = Mount::start_with(home_dir, mount_opts(&nodes, &env));
    for (name, data) in &names {
        let got = std::fs::read(m.path().join(name)).unwrap();
        assert!(
            got == *data,
            "{} reads back from the holders",
            name.display()
        );
    }
    m.unmount();
    drop(nodes);
}

/// `sync --replicated`'s lines "  N blocks at redundancy R", as (R, N).
fn levels(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (count, rest) = l.split_once(" blocks at redundancy ")?;
            Some((rest.trim().parse().ok()?, count.parse().ok()?))
        })
        .collect()
}

#[test]
fn copies_follow_a_subdirectory_setting_below_its_parent() {
    let (node_homes, nodes, m) = network(&[
        ("FINCRYPT_REPLICATE_INTERVAL", "3600"),
        // A retained snapshot keeps the setting it recorded (the highest wins):
        // keep one, so the lowered setting is all that counts after a sync.
        ("FINCRYPT_SNAPSHOT_KEEP", "1"),
    ]);
    let home = m.home().to_path_buf();
    let parent = m.path().join("three");
    let child = parent.join("two");
    std::fs::create_dir_all(&child).unwrap();
    set_redundancy(&home, &parent, 3);
    set_redundancy(&home, &child, 2);
    let got = ctl_ok(&home, &["redundancy", "get", child.to_str().unwrap()]);
    assert!(got.starts_with("2 (set here)"), "{got}");
    std::fs::write(child.join("data"), common::random_bytes(3, 3_000_000)).unwrap();
    std::fs::write(parent.join("data"), common::random_bytes(4, 3_000_000)).unwrap();
    let out = ctl_ok(&home, &["sync", "--replicated", "--timeout", "120"]);
    let levels = levels(&out);
    let at = |r: u64| levels.iter().find(|(n, _)| *n == r).map_or(0, |(_, c)| *c);
    assert!(
        at(2) >= 1,
        "the subdirectory's data asks for 2 copies: {out}"
    );
    assert!(
        at(3) >= 2,
        "the parent's data and the metadata ask for 3: {out}"
    );
    let own = number(&status(&home), "own_blocks");
    assert_eq!(at(2) + at(3), own, "every own block is placed: {out}");
    let held: u64 = held_blocks(&node_homes);
    assert_eq!(
        held,
        2 * at(2) + 3 * at(3),
        "copies follow the settings: {out}"
    );

    // Lowered to 1: the surplus copies are released.
    set_redundancy(&home, &child, 1);
    let out = ctl_ok(&home, &["sync", "--replicated", "--timeout", "120"]);
    let levels = self::levels(&out);
    let at = |r: u64| levels.iter().find(|(n, _)| *n == r).map_or(0, |(_, c)| *c);
    assert!(at(1) >= 1 && at(2) == 0, "{out}");
    let held: u64 = held_blocks(&node_homes);
    assert_eq!(
        held,
        at(1) + 3 * at(3),
        "surplus copies were released: {out}"
    );
    m.unmount();
    drop(nodes);
}

#[test]
fn a_holder_with_a_corrupted_volume_loses_its_blocks_and_reads_stay_right() {
    let env = [
        ("FINCRYPT_REPLICATE_INTERVAL", "2"),
        ("FINCRYPT_PROOF_INTERVAL", "1"),
    ];
    let (node_homes, nodes, m) = network(&env);
    let (home, _, written) = replicated_precious(&m);
    let own = number(&status(&home), "own_blocks");

    // Node 0's held block files now hold zeros.
    let mut files = Vec::new();
    files_under(
        &node_homes[0].path().join("held").join("blocks"),
        &mut files,
    );
    assert!(!files.is_empty(), "node 0 holds blocks");
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        std::fs::write(f, vec![0u8; len]).unwrap();
    }
    let others = &node_homes[1..];
    common::wait_until(
        "the corrupting holder's blocks taken from it and three good copies on the others",
        Duration::from_secs(60),
        || {
            let st = status(&home);
            let held: u64 = held_blocks(others);
            // Each block that failed its proof there is released there.
            let dropped_keeps = number(&status(node_homes[0].path()), "held_blocks");
            held == 3 * own
                && dropped_keeps == 0
                && number(&st, "under_replicated") == 0
                && number(&st, "blocks_dropped") >= 1
        },
    );

    // Reads are right, also with the owner's own copies damaged.
    let names: Vec<_> = written
        .iter()
        .map(|(p, d)| (p.strip_prefix(m.path()).unwrap().to_path_buf(), d.clone()))
        .collect();
    let home_dir = m.unmount();
    let mut files = Vec::new();
    files_under(&home_dir.path().join("volume").join("blocks"), &mut files);
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        std::fs::write(f, vec![0u8; len]).unwrap();
    }
    let m = Mount::start_with(home_dir, mount_opts(&nodes, &env));
    for (name, data) in &names {
        let got = std::fs::read(m.path().join(name)).unwrap();
        assert!(got == *data, "{} reads back right", name.display());
    }
    m.unmount();
    drop(nodes);
}

#[test]
fn with_no_holders_sync_replicated_fails_with_a_count_and_a_reason() {
    // A node with no one to place blocks on.
    let opts = mount_opts(&[], &[("FINCRYPT_REPLICATE_INTERVAL", "3600")]);
    let m = Mount::start_with(init_home(), opts);
    let home = m.home().to_path_buf();
    std::fs::write(m.path().join("f"), common::random_bytes(1, 500_000)).unwrap();
    let out = ctl(&home, &["sync", "--replicated", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("fewer holders than asked"), "{err}");
    assert!(
        err.contains("0 of the closest peers found serve blocks"),
        "{err}"
    );
    assert!(err.contains("a DHT lookup failed"), "{err}");
    let st = status(&home);
    assert!(number(&st, "under_replicated") >= 1, "{st}");
    m.unmount();

    // Without --listen or --bootstrap the mount has no node at all.
    let m = Mount::start(init_home());
    let out = ctl(m.home(), &["sync", "--replicated", "--timeout", "1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no peers"),
        "{}",
        text(&out.stderr)
    );
    let st = status(m.home());
    assert_eq!(st["listen_addrs"].as_array().map(Vec::len), Some(0), "{st}");
    m.unmount();
}

/// The holders of each score, by PeerId, as `fincryptctl manifest --json` lists them.
fn listed(v: &serde_json::Value) -> Vec<(String, std::collections::BTreeSet<String>)> {
    v.as_array()
        .unwrap_or_else(|| panic!("a list: {v}"))
        .iter()
        .map(|e| {
            let holders = e["holders"]
                .as_array()
                .unwrap_or_else(|| panic!("holders: {e}"))
                .iter()
                .map(|h| h.as_str().unwrap().to_owned())
                .collect();
            (e["score"].as_str().unwrap().to_owned(), holders)
        })
        .collect()
}

/// Which of `scores` each node says it holds for a placer, asked over the
/// network as any peer could: score -> PeerIds of the nodes holding it.
fn ask_nodes(
    nodes: &[Served],
    scores: &[String],
) -> std::collections::HashMap<String, std::collections::BTreeSet<String>> {
    use fincrypt_blockstore::Score;
    use fincrypt_net::{Keypair, Node, NodeConfig};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let parsed: Vec<Score> = scores.iter().map(|s| Score::from_hex(s).unwrap()).collect();
    let mut out: std::collections::HashMap<_, std::collections::BTreeSet<String>> = scores
        .iter()
        .map(|s| (s.clone(), Default::default()))
        .collect();
    rt.block_on(async {
        let probe = Node::start(NodeConfig::new(Keypair::generate_ed25519()), None)
            .await
            .unwrap();
        let client = probe.client();
        for n in nodes {
            let peer = client.dial(n.addr.parse().unwrap()).await.unwrap();
            for (i, chunk) in parsed.chunks(1000).enumerate() {
                let flags = client.has(peer, chunk).await.unwrap();
                for (j, held) in flags.into_iter().enumerate() {
                    if held {
                        let key = &scores[i * 1000 + j];
                        out.get_mut(key).unwrap().insert(peer.to_string());
                    }
                }
            }
        }
        probe.shutdown().await;
    });
    out
}

#[test]
fn the_newest_root_names_a_manifest_of_who_holds_each_block() {
    let (_node_homes, nodes, m) = network(&[
        ("FINCRYPT_REPLICATE_INTERVAL", "3600"),
        ("FINCRYPT_SNAPSHOT_KEEP", "8"),
    ]);
    let home = m.home().to_path_buf();
    let dir = m.path().join("precious");
    std::fs::create_dir_all(&dir).unwrap();
    set_redundancy(&home, &dir, 3);
    // One block per file, enough of them for a manifest of more than 4 KiB:
    // stored in blocks of its own rather than inline in the root.
    for i in 0..160u64 {
        let data = common::random_bytes(1000 + i, 8192);
        std::fs::write(dir.join(format!("small{i}")), data).unwrap();
    }
    sync_replicated(&home);
    // The root of this sync names what the first pass placed.
    sync_replicated(&home);

    let v: serde_json::Value =
        serde_json::from_str(ctl_ok(&home, &["manifest", "--json"]).trim()).unwrap();
    let manifest = &v["manifest"];
    assert_eq!(manifest["version"], 1, "{v}");
    let entries = listed(&manifest["entries"]);
    let blocks = listed(&manifest["blocks"]);
    assert!(!blocks.is_empty(), "the manifest is stored in blocks: {v}");
    let own = number(&status(&home), "own_blocks");
    assert_eq!(
        entries.len() + 1 + blocks.len(),
        own as usize,
        "every own block is in the manifest but the newest root and the manifest's own blocks"
    );

    let mut scores: Vec<String> = entries.iter().map(|(s, _)| s.clone()).collect();
    scores.extend(blocks.iter().map(|(s, _)| s.clone()));
    let truth = ask_nodes(&nodes, &scores);
    for (score, holders) in &entries {
        assert_eq!(
            holders.len(),
            3,
            "{score} has three holders in the manifest"
        );
        assert_eq!(
            holders, &truth[score],
            "the manifest names the nodes that hold {score}"
        );
    }
    for (score, holders) in &blocks {
        assert!(
            truth[score].len() >= 3,
            "the manifest's block {score} is held by {:?}",
            truth[score]
        );
        assert_eq!(holders, &truth[score], "the working index knows them");
    }

    // A person's summary names each holder.
    let out = ctl_ok(&home, &["manifest"]);
    assert!(
        out.contains(&format!("{} own blocks", entries.len())),
        "{out}"
    );
    m.unmount();
    drop(nodes);
}

/// The block files of a volume (`volume/blocks` or `held/blocks`), by score.
fn block_files(dir: &Path) -> std::collections::BTreeMap<String, std::path::PathBuf> {
    let mut files = Vec::new();
    if dir.exists() {
        files_under(dir, &mut files);
    }
    files
        .into_iter()
        .filter_map(|p| Some((p.file_name()?.to_str()?.to_owned(), p)))
        .collect()
}

fn zero(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len() as usize;
    std::fs::write(path, vec![0u8; len]).unwrap();
}

#[test]
fn a_killed_holder_is_repaired_within_a_minute_with_the_default_config() {
    let (node_homes, mut nodes, m) = network(&[]);
    let (home, _, _) = replicated_precious(&m);
    let own = number(&status(&home), "own_blocks");

    let mut dead = nodes.remove(0);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let survivors = &node_homes[1..];
    common::wait_until(
        "three copies of every own block on the survivors, with the default intervals",
        Duration::from_secs(60),
        || {
            let st = status(&home);
            held_blocks(survivors) == 3 * own && number(&st, "under_replicated") == 0
        },
    );
    m.unmount();
    drop(nodes);
}

#[test]
fn one_block_failing_its_proof_on_one_holder_is_placed_again_and_that_holder_keeps_the_rest() {
    let env = [
        ("FINCRYPT_REPLICATE_INTERVAL", "2"),
        ("FINCRYPT_PROOF_INTERVAL", "1"),
    ];
    let (node_homes, nodes, m) = network(&env);
    let (home, _, _) = replicated_precious(&m);
    let own = number(&status(&home), "own_blocks");

    let bad = node_homes[0].path();
    let bad_id = status(bad)["peer_id"].as_str().unwrap().to_owned();
    let held = block_files(&bad.join("held").join("blocks"));
    let kept_before = held.len() as u64;
    assert!(kept_before >= 2, "node 0 holds blocks");
    let (score, path) = held.iter().next().unwrap();
    zero(path);

    common::wait_until(
        "the damaged block taken from that holder and three good copies elsewhere",
        Duration::from_secs(60),
        || {
            let st = status(&home);
            number(&st, "blocks_dropped") >= 1
                && number(&st, "under_replicated") == 0
                && number(&status(bad), "held_blocks") == kept_before - 1
                && held_blocks(&node_homes) == 3 * own
        },
    );
    let st = status(&home);
    assert_eq!(number(&st, "holders_dropped"), 0, "the holder stays: {st}");
    // The next root's manifest names three holders of it, none the bad one.
    ctl_ok(&home, &["sync"]);
    let v: serde_json::Value =
        serde_json::from_str(ctl_ok(&home, &["manifest", "--json"]).trim()).unwrap();
    let entries = listed(&v["manifest"]["entries"]);
    let (_, holders) = entries
        .iter()
        .find(|(s, _)| s == score)
        .expect("the block is in the manifest");
    assert_eq!(holders.len(), 3, "{holders:?}");
    assert!(!holders.contains(&bad_id), "{holders:?}");
    m.unmount();
    drop(nodes);
}

#[test]
fn a_block_with_every_copy_destroyed_is_reported_lost_with_its_file() {
    let env = [
        ("FINCRYPT_REPLICATE_INTERVAL", "2"),
        ("FINCRYPT_PROOF_INTERVAL", "1"),
    ];
    let (node_homes, nodes, m) = network(&env);
    let home = m.home().to_path_buf();
    let volume = home.join("volume").join("blocks");
    let before = block_files(&volume);
    // One block of data: under the smallest chunk, over the inline size.
    let file = m.path().join("doomed-file");
    std::fs::write(&file, common::random_bytes(99, 100_000)).unwrap();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();
    let new: Vec<String> = block_files(&volume)
        .into_keys()
        .filter(|s| !before.contains_key(s))
        .collect();
    assert_eq!(new.len(), 1, "one data block: {new:?}");
    let score = &new[0];
    sync_replicated(&home);

    let mut destroyed = 0;
    for h in &node_homes {
        if let Some(p) = block_files(&h.path().join("held").join("blocks")).get(score) {
            zero(p);
            destroyed += 1;
        }
    }
    assert!(destroyed >= 2, "the block had copies on peers");
    std::fs::remove_file(&block_files(&volume)[score]).unwrap();

    common::wait_until("the block reported lost", Duration::from_secs(60), || {
        number(&status(&home), "lost") >= 1
    });
    let st = status(&home);
    let lost = st["replication"]["lost_files"].to_string();
    assert!(
        lost.contains(score.as_str()) && lost.contains("doomed-file"),
        "{st}"
    );
    let text = ctl_ok(&home, &["status"]);
    assert!(text.contains("doomed-file"), "{text}");
    m.unmount();
    drop(nodes);
}

#[test]
fn a_block_missing_locally_is_read_from_a_holder_and_kept() {
    let env = [("FINCRYPT_REPLICATE_INTERVAL", "3600")];
    let (_node_homes, nodes, m) = network(&env);
    let (_, _, written) = replicated_precious(&m);
    let names: Vec<_> = written
        .iter()
        .map(|(p, d)| (p.strip_prefix(m.path()).unwrap().to_path_buf(), d.clone()))
        .collect();
    let home_dir = m.unmount();
    let volume = home_dir.path().join("volume").join("blocks");
    let all = block_files(&volume);
    for p in all.values() {
        std::fs::remove_file(p).unwrap();
    }

    let m = Mount::start_with(home_dir, mount_opts(&nodes, &env));
    for (name, data) in &names {
        let got = std::fs::read(m.path().join(name)).unwrap();
        assert!(got == *data, "{} reads back from holders", name.display());
    }
    let fetched = number(&status(m.home()), "fetched_from_holders");
    assert!(fetched >= 4, "counted: {fetched}");
    let home_dir = m.unmount();
    let back = block_files(&home_dir.path().join("volume").join("blocks"));
    assert!(
        back.len() >= 4 && back.keys().all(|s| all.contains_key(s)),
        "the fetched blocks are in the volume again: {} of {}",
        back.len(),
        all.len()
    );
    // With every node gone, the files still read: from the volume alone.
    drop(nodes);
    let m = Mount::start_with(home_dir, StartOptions::default());
    for (name, data) in &names {
        let got = std::fs::read(m.path().join(name)).unwrap();
        assert!(got == *data, "{} reads back locally", name.display());
    }
    let home_dir = m.unmount();
    // What came back is whole: an offline scrub finds no damaged block.
    let out = common::run(
        common::fincrypt(home_dir.path()).arg("scrub"),
        Duration::from_secs(60),
    );
    let report = text(&out.stdout);
    assert!(report.contains(" 0 corrupt"), "{report}");
}

#[test]
fn scrub_while_mounted_repairs_a_corrupted_block_from_a_holder_and_workers_show() {
    let env = [("FINCRYPT_REPLICATE_INTERVAL", "3600")];
    let (_node_homes, nodes, m) = network(&env);
    let (home, _, _) = replicated_precious(&m);

    let volume = home.join("volume").join("blocks");
    let (score, path) = block_files(&volume).into_iter().next().unwrap();
    zero(&path);
    let out = common::run(
        common::fincrypt(&home).arg("scrub"),
        Duration::from_secs(120),
    );
    let report = text(&out.stdout);
    assert!(out.status.success(), "{report}{}", text(&out.stderr));
    assert!(report.contains("by the running mount"), "{report}");
    assert!(
        report.contains(&format!("corrupt {score} (repaired)")),
        "{report}"
    );
    let again = common::run(
        common::fincrypt(&home).arg("scrub"),
        Duration::from_secs(120),
    );
    assert!(
        text(&again.stdout).contains(" 0 corrupt, 0 missing"),
        "{}",
        text(&again.stdout)
    );

    let workers: serde_json::Value =
        serde_json::from_str(ctl_ok(&home, &["workers", "--json"]).trim()).unwrap();
    let names: Vec<&str> = workers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    // Tests run with scheduled snapshots off, so GC has a worker of its own.
    for w in ["gc", "scrub", "replication", "proofs", "liveness", "dht"] {
        assert!(names.contains(&w), "{w} in {names:?}");
    }
    let table = ctl_ok(&home, &["workers"]);
    assert!(
        table.contains("replication") && table.contains("last error"),
        "{table}"
    );
    m.unmount();
    drop(nodes);
}

/// The replication figures that show what passes did, from `status --json`.
fn pass_work(home: &Path) -> (u64, u64, u64, u64) {
    let st = status(home);
    (
        number(&st, "passes"),
        number(&st, "passes_skipped"),
        number(&st, "blocks_walked"),
        number(&st, "manifest_rows_scanned"),
    )
}

#[test]
fn an_idle_mount_walks_and_scans_nothing_until_something_changes() {
    let env = [("FINCRYPT_REPLICATE_INTERVAL", "1")];
    let (node_homes, nodes, m) = network(&env);
    let (home, dir, _) = replicated_precious(&m);

    // Settled: passes are being skipped.
    let mut settled = pass_work(&home);
    common::wait_until(
        "replication passes skipped on an idle mount",
        Duration::from_secs(60),
        || {
            settled = pass_work(&home);
            settled.1 >= 2
        },
    );
    let mut idle = settled;
    common::wait_until("three more passes skipped", Duration::from_secs(60), || {
        idle = pass_work(&home);
        idle.1 >= settled.1 + 3
    });
    assert_eq!(
        (idle.0, idle.2, idle.3),
        (settled.0, settled.2, settled.3),
        "idle passes ran, walked or scanned (passes, blocks walked, rows scanned): {idle:?} after {settled:?}"
    );

    // A write is a change: the next step takes it from the change feed and
    // places the new blocks, without a full walk.
    let own_before = number(&status(&home), "own_blocks");
    let walks = number(&status(&home), "full_walks");
    std::fs::write(dir.join("later"), common::random_bytes(99, 700_000)).unwrap();
    common::wait_until(
        "a pass after a write, with its blocks placed",
        Duration::from_secs(60),
        || {
            let now = pass_work(&home);
            let st = status(&home);
            let own = number(&st, "own_blocks");
            now.0 > idle.0
                && now.2 > idle.2
                && now.3 > idle.3
                && own > own_before
                && number(&st, "under_replicated") == 0
                && held_blocks(&node_homes) == 3 * own
        },
    );
    assert_eq!(number(&status(&home), "full_walks"), walks, "no full walk");
    m.unmount();
    drop(nodes);
}

#[test]
fn sync_replicated_keeps_its_timeout_while_a_holder_hangs() {
    let env = [("FINCRYPT_REPLICATE_INTERVAL", "3600")];
    let (_node_homes, nodes, m) = network(&env);
    let home = m.home().to_path_buf();
    // One holder stops answering but keeps its connections open.
    let hung = nodes[0].child.id().to_string();
    let stopped = Command::new("kill")
        .args(["-STOP", &hung])
        .status()
        .unwrap();
    assert!(stopped.success());
    std::fs::write(m.path().join("f"), common::random_bytes(3, 2_000_000)).unwrap();
    let out = common::run(
        common::fincryptctl(&home).args(["sync", "--replicated", "--timeout", "5"]),
        Duration::from_secs(40),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}{err}", text(&out.stdout));
    assert!(err.contains("fewer holders than asked"), "{err}");
    // Without the deadline on the pass itself, it waited out the hung
    // holder's lookups and put timeouts and then reported success.
    assert!(
        err.contains("a pass was still running at the timeout"),
        "{err}"
    );
    let _ = Command::new("kill").args(["-CONT", &hung]).status();
    m.unmount();
    drop(nodes);
}
