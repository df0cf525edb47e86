//! Real libp2p nodes on 127.0.0.1: discovery, block exchange, proofs, release, restart.
//!
//! Nothing here sleeps to synchronise: conditions are polled until a deadline.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fincrypt_blockstore::{LocalStore, Score, StoreOptions};
use fincrypt_net::{
    Client, Error, ErrorCode, Handler, Holder, Multiaddr, Node, NodeConfig, PeerId, Request,
    Response,
};
use futures::future::BoxFuture;
use libp2p::multiaddr::Protocol;

const DEADLINE: Duration = Duration::from_secs(30);

fn tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

fn quic() -> Multiaddr {
    "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()
}

/// Waits until `check` returns `Some`, polling, or fails the test at the deadline.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Some(v) = check().await {
                return v;
            }
        }
    };
    tokio::time::timeout(DEADLINE, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Runs `f` with a deadline, so a hung request fails the test instead of hanging it.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("request did not finish in time")
}

fn block(seed: u64, len: usize) -> (Score, Bytes) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (Score::of(&data), Bytes::from(data))
}

struct Peer {
    node: Node,
    holder: Holder,
    _dir: Option<tempfile::TempDir>,
}

impl Peer {
    fn client(&self) -> Client {
        self.node.client()
    }

    fn id(&self) -> PeerId {
        self.node.peer_id()
    }

    /// The first listen address with `/p2p/<id>`, as a bootstrap entry is written.
    fn addr(&self) -> Multiaddr {
        self.node.listen_addrs()[0]
            .clone()
            .with(Protocol::P2p(self.id()))
    }
}

fn open_holder(dir: &Path, capacity: u64) -> Holder {
    let store = Arc::new(LocalStore::open(&dir.join("held"), StoreOptions::default()).unwrap());
    Holder::open(store, &dir.join("placements.redb"), capacity).unwrap()
}

async fn start_in(
    dir: &Path,
    capacity: u64,
    listen: Multiaddr,
    bootstrap: Vec<Multiaddr>,
) -> (Node, Holder) {
    let holder = open_holder(dir, capacity);
    let mut config = NodeConfig::with_key_file(&dir.join("node.key")).unwrap();
    config.listen = vec![listen];
    config.bootstrap = bootstrap;
    let node = Node::start(config, Some(Arc::new(holder.clone())))
        .await
        .unwrap();
    (node, holder)
}

async fn start(capacity: u64, listen: Multiaddr, bootstrap: Vec<Multiaddr>) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let (node, holder) = start_in(dir.path(), capacity, listen, bootstrap).await;
    Peer {
        node,
        holder,
        _dir: Some(dir),
    }
}

async fn knows(client: &Client, peer: PeerId) -> Option<()> {
    let peers = client.peers().await.ok()?;
    peers
        .iter()
        .any(|p| p.peer_id == peer && !p.addrs.is_empty() && p.serves_blocks == Some(true))
        .then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_and_exchange_blocks_over_tcp() {
    let a = start(1 << 30, tcp(), vec![]).await;
    let b = start(1 << 30, tcp(), vec![a.addr()]).await;
    let c = start(1 << 30, tcp(), vec![a.addr()]).await;
    assert_ne!(a.id(), b.id());

    // c was told only of a; it learns of b through the DHT.
    let cc = c.client();
    eventually("c to know a", || knows(&cc, a.id())).await;
    eventually("c to find b through Kademlia", || async {
        let _ = cc.bootstrap().await;
        knows(&cc, b.id()).await
    })
    .await;
    assert!(
        cc.listen_addrs()
            .await
            .unwrap()
            .contains(&c.node.listen_addrs()[0])
    );

    let blocks: Vec<_> = (0..3)
        .map(|i| block(i, 100_000 + i as usize * 7777))
        .collect();
    for holder in [a.id(), b.id()] {
        for (score, data) in &blocks {
            within(cc.put(holder, *score, data.clone())).await.unwrap();
        }
    }
    assert_eq!(a.holder.stats().held_blocks, 3);
    assert_eq!(b.holder.stats().held_blocks, 3);
    assert_eq!(a.holder.placers(&blocks[0].0).unwrap(), vec![c.id()]);

    let scores: Vec<Score> = blocks.iter().map(|(s, _)| *s).collect();
    let absent = block(99, 10).0;
    for holder in [a.id(), b.id()] {
        for (score, data) in &blocks {
            assert_eq!(&within(cc.get(holder, *score)).await.unwrap(), data);
            assert!(within(cc.challenge(holder, *score)).await.unwrap());
        }
        let mut asked = scores.clone();
        asked.push(absent);
        assert_eq!(
            within(cc.has(holder, &asked)).await.unwrap(),
            vec![true, true, true, false]
        );
        assert!(!within(cc.challenge(holder, absent)).await.unwrap());
        let err = within(cc.get(holder, absent)).await.unwrap_err();
        assert!(err.is_unknown_block(), "{err}");
    }
    // Puts and gets (6 + 6 + 2) went over bulk connections, the rest over libp2p.
    assert_eq!(cc.bulk_answered(), 14);

    // Another peer may read (b from a), but only c's release counts.
    let bc = b.client();
    assert_eq!(
        within(bc.get(a.id(), scores[1])).await.unwrap(),
        blocks[1].1
    );
    let space = within(bc.space(a.id())).await.unwrap();
    assert_eq!(space.capacity, 1 << 30);
    assert_eq!(space.used, a.holder.stats().held_bytes);

    assert_eq!(
        within(cc.release(a.id(), &scores[..2])).await.unwrap(),
        vec![true, true]
    );
    assert_eq!(
        within(cc.has(a.id(), &scores)).await.unwrap(),
        vec![false, false, true]
    );
    assert_eq!(a.holder.stats().held_blocks, 1);
    assert_eq!(b.holder.stats().held_blocks, 3);

    for p in [a, b, c] {
        p.node.shutdown().await;
    }
    // A shut-down node's handles answer Shutdown rather than hang or panic.
    assert!(matches!(cc.peers().await, Err(Error::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_cross_quic() {
    let h = start(1 << 30, quic(), vec![]).await;
    let o = start(1 << 30, quic(), vec![]).await;
    assert!(h.node.listen_addrs()[0].to_string().contains("quic-v1"));
    let oc = o.client();
    assert_eq!(within(oc.dial(h.addr())).await.unwrap(), h.id());
    // A block of the largest default chunk size, to push real data through QUIC.
    let (score, data) = block(7, 4 << 20);
    within(oc.put(h.id(), score, data.clone())).await.unwrap();
    assert_eq!(within(oc.get(h.id(), score)).await.unwrap(), data);
    assert!(within(oc.challenge(h.id(), score)).await.unwrap());
    assert_eq!(
        within(oc.release(h.id(), &[score])).await.unwrap(),
        vec![true]
    );
    assert_eq!(h.holder.stats().held_blocks, 0);
    o.node.shutdown().await;
    h.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_refuses_a_wrong_score_and_a_block_beyond_its_room() {
    let h = start(150_000, tcp(), vec![]).await;
    let o = start(0, tcp(), vec![h.addr()]).await;
    let oc = o.client();
    let (score, data) = block(1, 100_000);
    let (_, other) = block(2, 100_000);

    let err = within(oc.put(h.id(), score, other)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Refused { code: ErrorCode::ScoreMismatch, peer } if *peer == h.id()),
        "{err}"
    );
    assert_eq!(h.holder.stats().held_blocks, 0);

    within(oc.put(h.id(), score, data)).await.unwrap();
    let (score2, data2) = block(3, 100_000);
    let err = within(oc.put(h.id(), score2, data2)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: ErrorCode::Full { free: 50_000 },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(h.holder.stats().held_bytes, 100_000);

    // Too large to send at all: refused before it leaves.
    let huge = Bytes::from(vec![0u8; fincrypt_net::proto::MAX_BLOCK_LEN + 1]);
    let err = within(oc.put(h.id(), Score::of(&huge), huge))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
    o.node.shutdown().await;
    h.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_copy_fails_its_proof_and_its_read() {
    let h = start(1 << 30, tcp(), vec![]).await;
    let o = start(0, tcp(), vec![h.addr()]).await;
    let oc = o.client();
    let (score, data) = block(5, 300_000);
    within(oc.put(h.id(), score, data.clone())).await.unwrap();
    assert!(within(oc.challenge(h.id(), score)).await.unwrap());

    let path = h.holder.store().path_of(&score);
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[1000..1010] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();

    assert!(!within(oc.challenge(h.id(), score)).await.unwrap());
    let err = within(oc.get(h.id(), score)).await.unwrap_err();
    assert!(err.is_unknown_block(), "{err}");

    // The placer's repair restores the copy.
    within(oc.put(h.id(), score, data.clone())).await.unwrap();
    assert_eq!(within(oc.get(h.id(), score)).await.unwrap(), data);
    assert!(within(oc.challenge(h.id(), score)).await.unwrap());
    o.node.shutdown().await;
    h.node.shutdown().await;
}

/// A holder that lies: it serves other bytes than it was given and forges proofs.
struct Liar;

impl Handler for Liar {
    fn handle(
        &self,
        _peer: PeerId,
        request: fincrypt_net::codec::InboundRequest,
    ) -> BoxFuture<'static, Response> {
        let response = match request {
            Ok(Request::Put { .. }) => Response::Stored,
            Ok(Request::Get { .. }) => Response::Block {
                data: block(666, 50_000).1,
            },
            Ok(Request::Challenge { .. }) => {
                // A genuine proof, but of another block.
                let (_, other) = block(667, 50_000);
                Response::Proof {
                    proof: fincrypt_blockstore::score::prove(&other, 0).unwrap(),
                }
            }
            Ok(Request::Has { scores }) => Response::Have {
                // One flag too few.
                held: fincrypt_net::proto::Bitmap::from_bools(vec![
                    true;
                    scores.len().saturating_sub(1)
                ]),
            },
            _ => Response::Error(ErrorCode::Unavailable),
        };
        Box::pin(async move { response })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_holder_yields_errors_never_bytes() {
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.listen = vec![tcp()];
    let liar = Node::start(config, Some(Arc::new(Liar))).await.unwrap();
    let liar_addr = liar.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(liar.peer_id()));
    let o = start(0, tcp(), vec![liar_addr]).await;
    let oc = o.client();
    let (score, data) = block(9, 50_000);
    within(oc.put(liar.peer_id(), score, data)).await.unwrap();

    let err = within(oc.get(liar.peer_id(), score)).await.unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { peer, score: s } if peer == liar.peer_id() && s == score),
        "{err}"
    );
    assert!(!within(oc.challenge(liar.peer_id(), score)).await.unwrap());
    let err = within(oc.has(liar.peer_id(), &[score, score]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    o.node.shutdown().await;
    liar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_placer_may_release() {
    let h = start(1 << 30, tcp(), vec![]).await;
    let placer = start(0, tcp(), vec![h.addr()]).await;
    let other = start(0, tcp(), vec![h.addr()]).await;
    let (score, data) = block(11, 20_000);
    within(placer.client().put(h.id(), score, data))
        .await
        .unwrap();

    assert_eq!(
        within(other.client().release(h.id(), &[score]))
            .await
            .unwrap(),
        vec![false]
    );
    assert_eq!(
        within(other.client().has(h.id(), &[score])).await.unwrap(),
        vec![true]
    );
    assert_eq!(h.holder.stats().held_blocks, 1);

    assert_eq!(
        within(placer.client().release(h.id(), &[score]))
            .await
            .unwrap(),
        vec![true]
    );
    assert_eq!(h.holder.stats().held_blocks, 0);
    // Releasing again is harmless and says nothing was released.
    assert_eq!(
        within(placer.client().release(h.id(), &[score]))
            .await
            .unwrap(),
        vec![false]
    );
    for p in [h, placer, other] {
        p.node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_keeps_its_peer_id_and_its_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (node, holder) = start_in(dir.path(), 1 << 30, tcp(), vec![]).await;
    let first_id = node.peer_id();
    let first_addr = node.listen_addrs()[0].clone();
    let o = start(0, tcp(), vec![]).await;
    let oc = o.client();
    oc.dial(first_addr.with(Protocol::P2p(first_id)))
        .await
        .unwrap();
    let (score, data) = block(21, 64_000);
    within(oc.put(first_id, score, data.clone())).await.unwrap();

    node.shutdown().await;
    drop(holder);
    // The old address no longer answers.
    assert!(within(oc.get(first_id, score)).await.is_err());
    // A request answered on the blocking pool when the node stopped keeps
    // the volume open until it ends (the runtime cannot abort it): wait
    // until the volume can be opened again.
    eventually("the volume to be released", || async {
        LocalStore::open(&dir.path().join("held"), StoreOptions::default())
            .ok()
            .map(drop)
    })
    .await;

    let (node, holder) = start_in(dir.path(), 1 << 30, tcp(), vec![]).await;
    assert_eq!(node.peer_id(), first_id);
    assert_eq!(holder.stats().held_blocks, 1);
    let addr = node.listen_addrs()[0].clone().with(Protocol::P2p(first_id));
    assert_eq!(within(oc.dial(addr)).await.unwrap(), first_id);
    assert_eq!(within(oc.get(first_id, score)).await.unwrap(), data);
    assert!(within(oc.challenge(first_id, score)).await.unwrap());
    // The placement survived too: the placer can still release.
    assert_eq!(
        within(oc.release(first_id, &[score])).await.unwrap(),
        vec![true]
    );
    node.shutdown().await;
    o.node.shutdown().await;
    drop(o.holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_handler_only_asks() {
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.listen = vec![tcp()];
    let asker = Node::start(config, None).await.unwrap();
    let h = start(1 << 30, tcp(), vec![]).await;
    let ac = asker.client();
    ac.dial(h.addr()).await.unwrap();
    let (score, data) = block(31, 1000);
    within(ac.put(h.id(), score, data)).await.unwrap();

    // The holder cannot ask the asker for blocks: it does not speak the protocol inbound.
    let addr = asker.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(asker.peer_id()));
    h.client().dial(addr).await.unwrap();
    let err = within(h.client().get(asker.peer_id(), score))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    let hc = h.client();
    eventually("the asker to be identified", || async {
        let peers = hc.peers().await.ok()?;
        peers
            .iter()
            .any(|p| p.peer_id == asker.peer_id() && p.serves_blocks == Some(false))
            .then_some(())
    })
    .await;
    asker.shutdown().await;
    h.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_on_a_taken_port_is_a_clear_error() {
    let h = start(1 << 30, tcp(), vec![]).await;
    let port = h.node.listen_addrs()[0]
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap();
    assert_ne!(port, 0);
    let taken = h.node.listen_addrs()[0].clone();
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.listen = vec![taken];
    let err = Node::start(config, None)
        .await
        .err()
        .expect("port is taken");
    assert!(matches!(err, Error::Listen { .. }), "{err}");
    // And a dial to nowhere fails rather than hangs.
    let nowhere: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
    assert!(matches!(
        within(h.client().dial(nowhere)).await,
        Err(Error::Dial { .. })
    ));
    h.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_address_without_a_peer_id_is_enough() {
    let h = start(1 << 30, tcp(), vec![]).await;
    // Only the transport address: the peer's id is learnt when it identifies itself.
    let bare = h.node.listen_addrs()[0].clone();
    let o = start(0, tcp(), vec![bare]).await;
    let oc = o.client();
    eventually("the bootstrap peer to be known", || knows(&oc, h.id())).await;
    let (score, data) = block(41, 5000);
    within(oc.put(h.id(), score, data)).await.unwrap();
    assert_eq!(h.holder.placers(&score).unwrap(), vec![o.id()]);
    o.node.shutdown().await;
    h.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_go_over_libp2p_to_a_holder_without_bulk_connections() {
    let dir = tempfile::tempdir().unwrap();
    let holder = open_holder(dir.path(), 1 << 30);
    let mut config = NodeConfig::with_key_file(&dir.path().join("node.key")).unwrap();
    config.listen = vec![tcp()];
    config.bulk = false;
    let plain = Node::start(config, Some(Arc::new(holder.clone())))
        .await
        .unwrap();
    let plain_addr = plain.listen_addrs()[0]
        .clone()
        .with(Protocol::P2p(plain.peer_id()));
    let asker = start(1 << 30, tcp(), vec![plain_addr]).await;
    let ac = asker.client();
    eventually("the asker to know the holder", || {
        knows(&ac, plain.peer_id())
    })
    .await;

    let blocks: Vec<_> = (0..3).map(|i| block(40 + i, 200_000)).collect();
    for (score, data) in &blocks {
        within(ac.put(plain.peer_id(), *score, data.clone()))
            .await
            .unwrap();
    }
    for (score, data) in &blocks {
        assert_eq!(
            &within(ac.get(plain.peer_id(), *score)).await.unwrap(),
            data
        );
    }
    assert_eq!(holder.stats().held_blocks, 3);
    assert_eq!(holder.placers(&blocks[0].0).unwrap(), vec![asker.id()]);
    assert_eq!(ac.bulk_answered(), 0);
    asker.node.shutdown().await;
    plain.shutdown().await;
}
