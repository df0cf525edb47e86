//! Placement through the DHT on real nodes: closest-peer lookups across a
//! network the owner was told almost nothing of, under a small connection limit.
//!
//! Nothing here sleeps to synchronise: conditions are polled until a deadline.

mod common;

use std::time::{Duration, Instant};

use common::{Peer, block, eventually, holder, knows, within};
use fincrypt_blockstore::BlockStore;
use fincrypt_net::{Keypair, Node, NodeConfig, PeerId, distance};
use futures::future::join_all;

const HOLDERS: usize = 60;
const OWNER_LIMIT: u32 = 10;
const LOOKUPS: u64 = 20;
const REDUNDANCY: usize = 3;
/// Peers each holder must know before the owner comes: a third of the network.
const KNOWN: usize = 20;

/// `HOLDERS` holders in a tree: each is told only of its parent, and finds
/// the rest through Kademlia (every node bootstraps when it first learns of
/// a peer). Ready when each knows a good share of the network.
async fn network() -> Vec<Peer> {
    let mut peers: Vec<Peer> = Vec::with_capacity(HOLDERS);
    // A level at a time, the nodes of a level at once: opening a volume costs
    // fsyncs, which overlap.
    while peers.len() < HOLDERS {
        let level = (peers.len() + 1).min(HOLDERS - peers.len());
        let parents: Vec<_> = (peers.len()..peers.len() + level)
            .map(|i| (i > 0).then(|| peers[(i - 1) / 2].addr()))
            .collect();
        let started = join_all(parents.into_iter().map(|p| holder(p.into_iter().collect()))).await;
        peers.extend(started);
    }
    for p in &peers {
        let c = p.client();
        eventually(
            "a holder to learn the network",
            Duration::from_secs(60),
            || async {
                let known = c.peers().await.ok()?.len();
                (known >= KNOWN).then_some(())
            },
        )
        .await;
    }
    peers
}

/// Stops holders and drops their volumes (a durable commit each) all at once.
async fn stop(holders: Vec<Peer>) {
    let dropped = holders.into_iter().map(|h| async move {
        h.node.shutdown().await;
        let volume = (h.holder, h.dir);
        let _ = tokio::task::spawn_blocking(move || drop(volume)).await;
    });
    join_all(dropped).await;
}

async fn owner(limit: u32, bootstrap: &Peer) -> Node {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.max_connections = limit;
    config.bootstrap = vec![bootstrap.addr()];
    let node = Node::start(config, None).await.unwrap();
    let client = node.client();
    eventually(
        "the owner to know its one peer",
        common::DEADLINE,
        || async { knows(&client, bootstrap.id()).await.then_some(()) },
    )
    .await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_find_the_closest_holders_of_sixty_under_a_limit_of_ten() {
    let started = Instant::now();
    let holders = network().await;
    let ids: Vec<PeerId> = holders.iter().map(Peer::id).collect();
    let built = started.elapsed();

    let owner = owner(OWNER_LIMIT, &holders[HOLDERS / 2]).await;
    let client = owner.client();
    for seed in 0..LOOKUPS {
        let (score, data) = block(seed, 4096);
        let found = within(client.closest_peers(score)).await.unwrap();

        let mut expected = ids.clone();
        expected.sort_by_key(|p| distance(&score, p));
        assert!(
            found.len() >= REDUNDANCY,
            "only {} peers found",
            found.len()
        );
        assert_eq!(
            &found[..REDUNDANCY],
            &expected[..REDUNDANCY],
            "block {seed}"
        );
        assert!(!found.contains(&owner.peer_id()));
        let mut by_distance = found.clone();
        by_distance.sort_by_key(|p| distance(&score, p));
        assert_eq!(found, by_distance, "closest first");

        for peer in &found[..REDUNDANCY] {
            let put = within(client.put(*peer, score, data.clone())).await;
            put.unwrap_or_else(|e| panic!("put {seed} on {peer}: {e}"));
        }
        // Exactly the three closest of all sixty hold it.
        for h in &holders {
            let held = h.holder.store().has(&score).unwrap();
            if expected[..REDUNDANCY].contains(&h.id()) {
                assert!(held, "block {seed} missing on {}", h.id());
                assert_eq!(h.holder.placers(&score).unwrap(), vec![owner.peer_id()]);
            } else {
                assert!(!held, "block {seed} on {}, not among the closest", h.id());
            }
        }
    }

    let stats = client.connection_stats();
    assert_eq!(stats.limit, OWNER_LIMIT as usize);
    assert!(stats.peak <= OWNER_LIMIT as usize, "{stats:?}");
    assert!(
        stats.dials_waited > 0,
        "the limit was never reached: {stats:?}"
    );
    assert_eq!(stats.refused, 0, "{stats:?}");
    let looked = started.elapsed() - built;

    owner.shutdown().await;
    stop(holders).await;
    eprintln!(
        "{HOLDERS} holders up in {built:?}; {LOOKUPS} lookups and puts in {looked:?}; \
         stopped in {:?}; {stats:?}",
        started.elapsed() - built - looked
    );
}

/// Concurrent puts to more peers than the limit allows at once all succeed:
/// each waits for a connection to close instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_to_more_peers_than_the_limit_wait_for_room() {
    let first = holder(vec![]).await;
    let mut holders = vec![];
    for _ in 0..5 {
        holders.push(holder(vec![first.addr()]).await);
    }
    holders.push(first);
    let owner = owner(2, &holders[5]).await;
    let client = owner.client();
    for h in &holders {
        let id = h.id();
        let addr = h.node.listen_addrs()[0].clone();
        client.add_address(id, addr).await.unwrap();
    }
    let puts = holders.iter().enumerate().map(|(i, h)| {
        let client = client.clone();
        let (score, data) = block(100 + i as u64, 1000);
        async move { (h, score, within(client.put(h.id(), score, data)).await) }
    });
    for (h, score, result) in join_all(puts).await {
        result.unwrap();
        assert_eq!(h.holder.placers(&score).unwrap(), vec![owner.peer_id()]);
    }
    let stats = client.connection_stats();
    assert!(stats.peak <= 2, "{stats:?}");
    assert!(stats.dials_waited > 0, "{stats:?}");

    // A lookup under the same limit still sees all six.
    let (score, _) = block(7, 10);
    let found = within(client.closest_peers(score)).await.unwrap();
    let mut expected: Vec<PeerId> = holders.iter().map(Peer::id).collect();
    expected.sort_by_key(|p| distance(&score, p));
    assert_eq!(found, expected);
    assert!(client.connection_stats().peak <= 2);

    owner.shutdown().await;
    stop(holders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_with_no_known_peer_is_an_error() {
    let node = Node::start(NodeConfig::new(Keypair::generate_ed25519()), None)
        .await
        .unwrap();
    let err = node
        .client()
        .closest_peers(block(1, 10).0)
        .await
        .unwrap_err();
    assert!(matches!(err, fincrypt_net::Error::Lookup(_)), "{err}");
    node.shutdown().await;
}

/// A storage node that charges announces itself in the DHT; an owner that
/// was told of another node only finds it there (and a node that does not
/// announce is not found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_finds_the_nodes_that_make_offers_through_the_dht() {
    // A chain: each node told only of the one before it.
    let mut peers: Vec<Peer> = Vec::new();
    for i in 0..6 {
        let parent = (i > 0).then(|| peers[i - 1].addr());
        peers.push(holder(parent.into_iter().collect()).await);
    }
    let seller = peers[5].client();
    eventually("the offer announced", Duration::from_secs(60), || async {
        seller.provide_offers().await.ok()
    })
    .await;
    let owner = owner(OWNER_LIMIT, &peers[0]).await;
    let client = owner.client();
    let found = eventually("the seller found", Duration::from_secs(60), || async {
        let found = client.find_offers().await.ok()?;
        found.contains(&peers[5].id()).then_some(found)
    })
    .await;
    assert!(
        !found.contains(&peers[4].id()),
        "a node that does not announce is not found: {found:?}"
    );
    owner.shutdown().await;
    stop(peers).await;
}
