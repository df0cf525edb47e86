//! The engine driven by its queue, in one process with real stores and real
//! nodes on 127.0.0.1: changes the owner's side hands out are placed without
//! a walk, an idle step reads nothing, a holder's loss and a GC release are
//! worked from the queue, and the queue and proof history survive a restart.
//!
//! Nothing here sleeps to synchronise: conditions are polled until a deadline.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Peer, block, holder};
use fincrypt_blockstore::{BlockStore, Class, LocalStore, Score, StoreOptions};
use fincrypt_engine::{Changes, Engine, Manifest, ProofPolicy, Wanted, Wants};
use fincrypt_net::{Keypair, Node, NodeConfig};

const REDUNDANCY: u8 = 3;

/// The owner's side as a test drives it: a wanted set, and the changes not
/// yet handed out.
#[derive(Default)]
struct TestWants {
    wanted: Mutex<Wanted>,
    fresh: Mutex<Vec<(Score, u8)>>,
    handed: Mutex<usize>,
}

impl TestWants {
    fn add(&self, blocks: &[(Score, u8)]) {
        self.wanted.lock().unwrap().extend(blocks.iter().copied());
        self.fresh.lock().unwrap().extend_from_slice(blocks);
    }

    fn forget(&self, scores: &[Score]) {
        let mut w = self.wanted.lock().unwrap();
        for s in scores {
            w.remove(s);
        }
    }
}

impl Wants for TestWants {
    fn wanted(&self) -> fincrypt_engine::Result<(Wanted, Vec<u8>)> {
        *self.handed.lock().unwrap() = self.fresh.lock().unwrap().len();
        Ok((self.wanted.lock().unwrap().clone(), b"cursor".to_vec()))
    }

    fn changes(
        &self,
        cursor: &[u8],
        _known: &dyn Fn(&Score) -> bool,
    ) -> fincrypt_engine::Result<Option<Changes>> {
        assert_eq!(cursor, b"cursor", "the cursor comes back as it was kept");
        let fresh = self.fresh.lock().unwrap().clone();
        *self.handed.lock().unwrap() = fresh.len();
        Ok(Some(Changes {
            walked: fresh.len() as u64,
            blocks: fresh,
            cursor: cursor.to_vec(),
            more: false,
        }))
    }

    fn taken(&self) -> fincrypt_engine::Result<()> {
        let n = std::mem::take(&mut *self.handed.lock().unwrap());
        self.fresh.lock().unwrap().drain(..n);
        Ok(())
    }

    fn paths_of(&self, _: &[Score]) -> fincrypt_engine::Result<Vec<(Score, String)>> {
        Ok(Vec::new())
    }
}

/// Steps the engine until `done` holds, for at most a minute (a loaded
/// machine may take a while to connect six nodes); returns how many steps.
async fn step_until(engine: &Engine, what: &str, done: impl Fn() -> bool) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut steps = 0;
    while std::time::Instant::now() < deadline {
        engine.step().await.unwrap();
        steps += 1;
        if done() {
            return steps;
        }
        // Peers may still be connecting: poll again shortly.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "{what}: not done after a minute of steps: {}",
        engine.stats().reason.lock().unwrap()
    );
}

fn held_by(peers: &[Peer], score: &Score) -> usize {
    peers
        .iter()
        .filter(|p| p.holder.store().has(score).unwrap())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_places_repairs_and_releases_without_walking() {
    let first = holder(Vec::new()).await;
    let boot = first.addr();
    let mut peers = vec![first];
    for _ in 0..4 {
        peers.push(holder(vec![boot.clone()]).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let local =
        Arc::new(LocalStore::open(&dir.path().join("volume"), StoreOptions::default()).unwrap());
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = vec![boot];
    let owner = Node::start(config, None).await.unwrap();
    let manifest_path = dir.path().join("manifest.redb");
    let manifest = Arc::new(Manifest::open(&manifest_path, local.clone()).unwrap());
    let wants = Arc::new(TestWants::default());
    let policy = ProofPolicy {
        blocks: 64,
        failures: 3,
        timeout: Duration::from_secs(10),
    };
    let engine = Engine::new(
        owner.client(),
        manifest.clone(),
        wants.clone(),
        local.clone(),
        policy,
    );

    // The first step walks (nothing is known yet); there is nothing to do.
    engine.step().await.unwrap();
    assert_eq!(engine.stats().passes.load(Ordering::Relaxed), 1);

    // New blocks come from the change feed and are placed from the queue.
    let blocks: Vec<(Score, Bytes)> = (0..12).map(|i| block(i, 2000)).collect();
    for (s, b) in &blocks {
        local.put(*s, b.clone(), Class::Own).unwrap();
    }
    let scores: Vec<Score> = blocks.iter().map(|(s, _)| *s).collect();
    wants.add(&scores.iter().map(|s| (*s, REDUNDANCY)).collect::<Vec<_>>());
    let placed = || {
        scores
            .iter()
            .all(|s| manifest.holders(s).unwrap().len() == REDUNDANCY as usize)
    };
    step_until(&engine, "the new blocks placed", placed).await;
    for s in &scores {
        assert_eq!(held_by(&peers, s), REDUNDANCY as usize);
    }
    let s = engine.stats();
    assert!(s.passes.load(Ordering::Relaxed) >= 2);
    assert_eq!(s.under_replicated.load(Ordering::Relaxed), 0);
    assert_eq!(
        manifest.queue_len().unwrap(),
        (0, 0),
        "done work leaves the queue"
    );

    // Idle: a step reads nothing beyond the empty feed and queue.
    let (walked, scanned, skipped) = (
        s.blocks_walked.load(Ordering::Relaxed),
        s.rows_scanned.load(Ordering::Relaxed),
        s.passes_skipped.load(Ordering::Relaxed),
    );
    engine.step().await.unwrap();
    assert_eq!(s.blocks_walked.load(Ordering::Relaxed), walked);
    assert_eq!(s.rows_scanned.load(Ordering::Relaxed), scanned);
    assert_eq!(s.passes_skipped.load(Ordering::Relaxed), skipped + 1);

    // A holder is lost: its blocks are queued, and placed again elsewhere.
    let lost = manifest.holders(&scores[0]).unwrap()[0];
    let had = manifest.drop_peer(&lost).unwrap();
    assert!(had > 0);
    assert_eq!(
        manifest.queue_len().unwrap().0,
        had,
        "every block it held is queued"
    );
    let steps = step_until(&engine, "the lost holder's blocks placed again", || {
        scores.iter().all(|s| {
            let h = manifest.holders(s).unwrap();
            h.len() == REDUNDANCY as usize && !h.contains(&lost)
        })
    })
    .await;
    let scanned_after_loss = s.rows_scanned.load(Ordering::Relaxed) - scanned;
    // Each step reads at most the queued rows (a step that finds a peer
    // still connecting leaves them queued for the next).
    assert!(
        scanned_after_loss <= had * steps,
        "only the queued blocks were read ({scanned_after_loss} rows for {had} blocks in {steps} steps)"
    );

    // GC frees three blocks locally: they are released on their holders,
    // which the volume's entries named until GC kept them in the manifest.
    let freed = &scores[..3];
    let keep: std::collections::HashSet<Score> = scores[3..].iter().copied().collect();
    let gone = local
        .sweep_keeping_tags(&keep, local.mark(), |tags| {
            manifest
                .keep_freed(tags)
                .map_err(|e| fincrypt_blockstore::Error::Index(e.to_string()))
        })
        .unwrap();
    assert_eq!(gone.len(), 3);
    wants.forget(freed);
    engine.released(freed).unwrap();
    assert_eq!(manifest.queue_len().unwrap(), (0, 3));
    step_until(&engine, "the freed blocks released", || {
        freed
            .iter()
            .all(|s| manifest.holders(s).unwrap().is_empty())
    })
    .await;
    for s in freed {
        // The dropped holder kept its copy (it was never asked to let go while dropped).
        let live = peers.iter().filter(|p| p.node.peer_id() != lost);
        assert_eq!(live.filter(|p| p.holder.store().has(s).unwrap()).count(), 0);
    }
    assert_eq!(manifest.queue_len().unwrap(), (0, 0));

    // Proofs are recorded, and they and queued work survive a restart.
    let report = engine.prover.round(&engine.replicator).await.unwrap();
    assert!(report.challenged > 0);
    let before: BTreeMap<_, _> = manifest.holder_records().unwrap().into_iter().collect();
    assert!(before.values().any(|r| r.passed > 0));
    manifest.enqueue(&[(scores[5], 5)]).unwrap();
    drop(engine);
    drop(manifest);
    let reopened = Manifest::open(&manifest_path, local.clone()).unwrap();
    let after: BTreeMap<_, _> = reopened.holder_records().unwrap().into_iter().collect();
    assert_eq!(before, after, "proof history kept across a restart");
    assert_eq!(
        reopened.queued_after(None, 10).unwrap(),
        vec![(scores[5], 5)]
    );
}
