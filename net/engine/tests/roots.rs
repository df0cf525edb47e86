//! Root records between real nodes on 127.0.0.1: a publication reaches the
//! peers nearest the owner key, finding returns the highest valid sequence
//! any reached peer keeps (never an older one), and a node offered an older
//! or forged record keeps the newest.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{Peer, holder, within};
use fincrypt_engine::{Manifest, Publisher, roots};
use fincrypt_net::root::Owner;
use fincrypt_net::{ErrorCode, Keypair, Node, NodeConfig};

const SEED: [u8; 32] = [42; 32];
const SEAL: [u8; 32] = [7; 32];

async fn network(n: usize) -> Vec<Peer> {
    let first = holder(Vec::new()).await;
    let mut peers = vec![first];
    for _ in 1..n {
        let boot = vec![peers[0].addr()];
        peers.push(holder(boot).await);
    }
    peers
}

/// The owner's volume, which the manifest keeps its holders in.
fn volume(dir: &std::path::Path) -> Arc<fincrypt_blockstore::LocalStore> {
    Arc::new(
        fincrypt_blockstore::LocalStore::open(&dir.join("volume"), Default::default()).unwrap(),
    )
}

async fn owner_node(peers: &[Peer]) -> Node {
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.bootstrap = peers.iter().map(|p| p.addr()).collect();
    let node = Node::start(config, None).await.unwrap();
    for p in peers {
        within(node.client().dial(p.addr())).await.unwrap();
    }
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_record_wins_everywhere_and_no_peer_rolls_it_back() {
    let peers = network(4).await;
    let node = owner_node(&peers).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest =
        Arc::new(Manifest::open(&dir.path().join("manifest.redb"), volume(dir.path())).unwrap());
    let publisher = Publisher::new(&SEED, SEAL, node.client(), manifest.clone());
    let owner = Owner::from_seed(&SEED).public();
    let ids: Vec<_> = peers.iter().map(|p| p.id()).collect();

    let one = within(publisher.publish(b"first root")).await.unwrap();
    assert_eq!(one.sequence, 1);
    assert!(one.kept >= 1, "{one:?}");
    let two = within(publisher.publish(b"second root")).await.unwrap();
    assert_eq!(two.sequence, 2);
    let found = within(roots::find_newest(&node.client(), owner, &ids)).await;
    let newest = found.newest.expect("a record was found");
    assert_eq!(newest.sequence, 2);
    assert_eq!(newest.open(&SEAL).unwrap(), b"second root");

    // One peer is offered the old record again (a replay): it keeps the newest.
    let old = Owner::from_seed(&SEED)
        .sign(1, 0, &SEAL, b"first root")
        .unwrap();
    let old = Bytes::from(old.encode().unwrap());
    for p in &peers {
        match within(node.client().put_root(p.id(), old.clone())).await {
            Ok(()) => panic!("{} took an older record", p.id()),
            Err(fincrypt_net::Error::Refused {
                code: ErrorCode::Stale { sequence },
                ..
            }) => {
                assert!(sequence >= 1)
            }
            // A peer that never got one: it keeps this one now, and still must
            // not win over a peer that has the newer one.
            Err(e) => panic!("unexpected answer: {e}"),
        }
    }
    // A forged record naming this owner is refused by every peer.
    let mut forged = Owner::from_seed(&[9; 32])
        .sign(99, 0, &SEAL, b"evil")
        .unwrap();
    forged.owner = owner;
    let forged = Bytes::from(forged.encode().unwrap());
    for p in &peers {
        assert!(
            within(node.client().put_root(p.id(), forged.clone()))
                .await
                .is_err()
        );
    }
    // Only one peer has a newer record: finding still returns it.
    let three = Owner::from_seed(&SEED)
        .sign(3, 0, &SEAL, b"third root")
        .unwrap();
    within(
        node.client()
            .put_root(ids[2], Bytes::from(three.encode().unwrap())),
    )
    .await
    .unwrap();
    let found = within(roots::find_newest(&node.client(), owner, &ids)).await;
    assert_eq!(found.newest.unwrap().sequence, 3);
    assert_eq!(found.asked, 4);
    // The publisher learns of the higher sequence from a Stale answer and goes above it.
    let four = within(publisher.publish(b"fourth root")).await.unwrap();
    assert!(four.sequence > 3, "{four:?}");
    // A block the first device placed is released by a second device of the
    // same owner (a machine recovered from the phrase has a new PeerId), once
    // both published (each publication binds its node to the owner).
    let (score, data) = common::block(77, 4000);
    within(node.client().put(ids[0], score, data))
        .await
        .unwrap();
    let second = owner_node(&peers).await;
    let dir2 = tempfile::tempdir().unwrap();
    let manifest2 =
        Arc::new(Manifest::open(&dir2.path().join("manifest.redb"), volume(dir2.path())).unwrap());
    roots::set_sequence(&manifest2, four.sequence).unwrap();
    let publisher2 = Publisher::new(&SEED, SEAL, second.client(), manifest2);
    let five = within(publisher2.publish(b"fifth root")).await.unwrap();
    assert!(five.sequence > four.sequence);
    let released = within(second.client().release(ids[0], &[score]))
        .await
        .unwrap();
    assert_eq!(
        released,
        vec![true],
        "the second device released the first one's block"
    );
    assert!(within(second.client().get(ids[0], score)).await.is_err());
    // An owner with no record anywhere: found nothing, every peer answered.
    let none = within(roots::find_newest(&node.client(), [1; 32], &ids)).await;
    assert!(none.newest.is_none());
    assert_eq!(none.answered, 4);
}
