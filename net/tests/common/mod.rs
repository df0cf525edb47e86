//! Helpers shared by the multi-node tests: holders in temp dirs, polling with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fincrypt_blockstore::{LocalStore, Score, StoreOptions};
use fincrypt_net::{Client, Holder, Multiaddr, Node, NodeConfig, PeerId};
use libp2p::multiaddr::Protocol;

pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn tcp() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

/// Waits until `check` returns `Some`, polling, or fails the test at `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if let Some(v) = check().await {
                return v;
            }
        }
    };
    tokio::time::timeout(deadline, poll)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Runs `f` with a deadline, so a hung request fails the test instead of hanging it.
pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("request did not finish in time")
}

/// A block of `len` pseudo-random bytes from `seed`, and its score.
pub fn block(seed: u64, len: usize) -> (Score, Bytes) {
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

/// A node holding blocks for others, on a store in its own temp dir.
pub struct Peer {
    pub node: Node,
    pub holder: Holder,
    pub dir: tempfile::TempDir,
}

impl Peer {
    pub fn client(&self) -> Client {
        self.node.client()
    }

    pub fn id(&self) -> PeerId {
        self.node.peer_id()
    }

    /// The first listen address with `/p2p/<id>`, as a bootstrap entry is written.
    pub fn addr(&self) -> Multiaddr {
        self.node.listen_addrs()[0]
            .clone()
            .with(Protocol::P2p(self.id()))
    }
}

/// Starts a holder on 127.0.0.1 that joins through `bootstrap`.
pub async fn holder(bootstrap: Vec<Multiaddr>) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
    let holder = Holder::open(store, &dir.path().join("placements.redb"), 1 << 30).unwrap();
    let mut config = NodeConfig::with_key_file(&dir.path().join("node.key")).unwrap();
    config.listen = vec![tcp()];
    config.bootstrap = bootstrap;
    let node = Node::start(config, Some(Arc::new(holder.clone())))
        .await
        .unwrap();
    Peer { node, holder, dir }
}

/// True once `client` has `peer` in its routing table or connections.
pub async fn knows(client: &Client, peer: PeerId) -> bool {
    client.peers().await.is_ok_and(|peers| {
        peers
            .iter()
            .any(|p| p.peer_id == peer && !p.addrs.is_empty())
    })
}
