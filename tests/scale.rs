//! An idle mount with 100,000 files does no replication work: once a pass
//! has left nothing to do, later passes walk no block and read no manifest
//! row until something changes. A test binary of its own, so that its
//! 100,000 creates do not share the machine with the timing-bound tests of
//! tests/peers_e2e.rs.

use std::path::Path;
use std::time::Duration;

mod common;

use common::{ctl, number, status, text};

const FILES: usize = 100_000;
const PER_DIR: usize = 1_000;

/// Passes run, passes skipped, blocks walked, manifest rows scanned.
fn pass_work(home: &Path) -> [u64; 4] {
    let st = status(home);
    [
        "passes",
        "passes_skipped",
        "blocks_walked",
        "manifest_rows_scanned",
    ]
    .map(|k| number(&st, k))
}

#[test]
fn an_idle_mount_with_100000_files_walks_and_scans_nothing() {
    // No root records published while the files go in: the heads they
    // leave are freed by a later GC, whose releases are real work that
    // could land among the idle passes measured below.
    let (_node_homes, nodes, m) = common::network(
        3,
        &[
            ("FINCRYPT_REPLICATE_INTERVAL", "1"),
            ("FINCRYPT_PUBLISH_INTERVAL", "0"),
        ],
    );
    let home = m.home().to_path_buf();
    let tree = m.path().join("tree");
    for d in 0..FILES / PER_DIR {
        let dir = tree.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..PER_DIR {
            let i = d * PER_DIR + f;
            std::fs::write(
                dir.join(format!("f{f:04}")),
                format!("file {i} of the idle test\n"),
            )
            .unwrap();
        }
    }
    let out = ctl(&home, &["sync", "--replicated", "--timeout", "900"]);
    assert!(
        out.status.success(),
        "sync --replicated: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let mut settled = pass_work(&home);
    common::wait_until(
        "replication passes skipped on the idle mount",
        Duration::from_secs(300),
        || {
            settled = pass_work(&home);
            settled[1] >= 2
        },
    );
    assert!(settled[2] > 0, "passes walked the tree before: {settled:?}");
    let mut idle = settled;
    common::wait_until("five more passes skipped", Duration::from_secs(120), || {
        idle = pass_work(&home);
        idle[1] >= settled[1] + 5
    });
    assert_eq!(
        [idle[0], idle[2], idle[3]],
        [settled[0], settled[2], settled[3]],
        "idle passes ran, walked or scanned (passes, skipped, walked, scanned): {idle:?} after {settled:?}"
    );
    let entries = std::fs::read_dir(tree.join("d042")).unwrap().count();
    assert_eq!(entries, PER_DIR);

    // One new file: the next step takes its blocks from the change feed and
    // places them, reading only those, with no walk of the 100,000 others.
    let walks = number(&status(&home), "full_walks");
    std::fs::write(
        tree.join("d042").join("new"),
        common::random_bytes(5, 700_000),
    )
    .unwrap();
    let mut after = idle;
    common::wait_until(
        "the new file's blocks placed from the queue",
        Duration::from_secs(120),
        || {
            after = pass_work(&home);
            let st = status(&home);
            after[0] > idle[0]
                && after[2] > idle[2]
                && number(&st, "under_replicated") == 0
                && number(&st, "queued") == 0
        },
    );
    assert_eq!(number(&status(&home), "full_walks"), walks, "no full walk");
    assert!(
        after[2] - idle[2] < 200 && after[3] - idle[3] < 200,
        "only the new file's blocks were walked and read: {after:?} after {idle:?}"
    );
    m.unmount();
    drop(nodes);
}
