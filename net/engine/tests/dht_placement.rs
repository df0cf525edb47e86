//! Placement at a size where nobody knows everybody: sixty real holders on
//! 127.0.0.1, each told only of one other, and an owner that knows one of
//! them and may hold ten connections at once. A replication pass must put
//! every block on exactly the three holders whose ids are XOR-closest to its
//! key among all sixty, which the test computes from the ids.
//!
//! Nothing here sleeps to synchronise: conditions are polled until a deadline.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::{Peer, block, holder};
use fincrypt_blockstore::{BlockStore, Class, LocalStore, StoreOptions};
use fincrypt_engine::{Manifest, Replicator};
use fincrypt_net::{Keypair, Multiaddr, Node, NodeConfig, PeerId, distance};
use futures::future::join_all;

const HOLDERS: usize = 60;
const OWNER_LIMIT: u32 = 10;
const BLOCKS: u64 = 40;
const REDUNDANCY: u8 = 3;
/// Peers each holder must know before the owner comes: a third of the network.
const KNOWN: usize = 20;

async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let poll = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if check().await {
                return;
            }
        }
    };
    tokio::time::timeout(deadline, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_places_every_block_on_its_three_closest_of_sixty_under_a_limit_of_ten() {
    // A tree: each holder is told only of its parent and finds the rest
    // through Kademlia. A level at a time, the nodes of a level at once.
    let mut peers: Vec<Peer> = Vec::with_capacity(HOLDERS);
    while peers.len() < HOLDERS {
        let level = (peers.len() + 1).min(HOLDERS - peers.len());
        let parents: Vec<Vec<Multiaddr>> = (peers.len()..peers.len() + level)
            .map(|i| {
                (i > 0)
                    .then(|| peers[(i - 1) / 2].addr())
                    .into_iter()
                    .collect()
            })
            .collect();
        peers.extend(join_all(parents.into_iter().map(holder)).await);
    }
    for p in &peers {
        let c = p.node.client();
        eventually(
            "a holder to learn the network",
            Duration::from_secs(90),
            || {
                let c = c.clone();
                async move { c.peers().await.is_ok_and(|known| known.len() >= KNOWN) }
            },
        )
        .await;
    }
    let ids: Vec<PeerId> = peers.iter().map(|p| p.node.peer_id()).collect();

    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.max_connections = OWNER_LIMIT;
    config.bootstrap = vec![peers[HOLDERS / 2].addr()];
    let owner = Node::start(config, None).await.unwrap();
    let client = owner.client();
    let first = ids[HOLDERS / 2];
    eventually(
        "the owner to know its one peer",
        Duration::from_secs(30),
        || {
            let c = client.clone();
            async move {
                c.peers()
                    .await
                    .is_ok_and(|known| known.iter().any(|p| p.peer_id == first))
            }
        },
    )
    .await;

    let local: Arc<LocalStore> =
        Arc::new(LocalStore::open(&dir.path().join("volume"), StoreOptions::default()).unwrap());
    let mut wanted = BTreeMap::new();
    for seed in 0..BLOCKS {
        let (score, data) = block(seed, 3000);
        local.put(score, data, Class::Own).unwrap();
        wanted.insert(score, REDUNDANCY);
    }
    let manifest =
        Arc::new(Manifest::open(&dir.path().join("manifest.redb"), local.clone()).unwrap());
    let replicator = Replicator::new(client.clone(), manifest.clone());
    let under = tokio::time::timeout(
        Duration::from_secs(120),
        replicator.pass(wanted.clone(), local.clone()),
    )
    .await
    .expect("a pass within two minutes")
    .unwrap();
    assert!(under.is_empty(), "{:?}", replicator.stats.reason);
    let lookups = replicator
        .stats
        .lookups
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{BLOCKS} blocks on {HOLDERS} holders: {lookups} lookups");
    assert!(
        (1..BLOCKS).contains(&lookups),
        "{lookups} lookups for {BLOCKS} blocks: one lookup serves the blocks it proves the closest of"
    );

    for score in wanted.keys() {
        let mut expected = ids.clone();
        expected.sort_by_key(|p| distance(score, p));
        let expected: BTreeSet<PeerId> = expected[..REDUNDANCY as usize].iter().copied().collect();
        let recorded: BTreeSet<PeerId> = manifest.holders(score).unwrap().into_iter().collect();
        assert_eq!(recorded, expected, "the manifest's holders of {score}");
        for p in &peers {
            let held = p.holder.store().has(score).unwrap();
            assert_eq!(
                held,
                expected.contains(&p.node.peer_id()),
                "{score} on {}: held {held}",
                p.node.peer_id()
            );
        }
    }
    let stats = client.connection_stats();
    assert!(stats.peak <= OWNER_LIMIT as usize, "{stats:?}");
    assert!(
        stats.dials_waited > 0,
        "the limit was never reached: {stats:?}"
    );

    owner.shutdown().await;
    join_all(peers.into_iter().map(|p| async move {
        let Peer { node, holder, dir } = p;
        node.shutdown().await;
        // Closing a volume is a durable commit: off the async threads.
        let _ = tokio::task::spawn_blocking(move || drop((holder, dir))).await;
    }))
    .await;
}
