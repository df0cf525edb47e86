//! What the engine's in-process tests share: real holder nodes on
//! 127.0.0.1, each with its own volume, and blocks made from a seed.

use std::sync::Arc;

use bytes::Bytes;
use fincrypt_blockstore::{LocalStore, Score, StoreOptions};
use fincrypt_net::{Holder, Keypair, Multiaddr, Node, NodeConfig};

/// A storage node: its libp2p node, its holder side and its directory.
pub struct Peer {
    pub node: Node,
    pub holder: Holder,
    pub _dir: tempfile::TempDir,
}

impl Peer {
    /// Its first listen address, ending in its PeerId.
    pub fn addr(&self) -> Multiaddr {
        let node = &self.node;
        format!("{}/p2p/{}", node.listen_addrs()[0], node.peer_id())
            .parse()
            .unwrap()
    }
}

/// A holder with 1 GiB of room, told of `bootstrap` if given.
pub async fn holder(bootstrap: Option<Multiaddr>) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
    let holder = Holder::open(store, &dir.path().join("placements.redb"), 1 << 30).unwrap();
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = bootstrap.into_iter().collect();
    let node = Node::start(config, Some(Arc::new(holder.clone())))
        .await
        .unwrap();
    Peer {
        node,
        holder,
        _dir: dir,
    }
}

/// A block of 3,000 pseudo-random bytes from `seed`, and its score.
pub fn block(seed: u64) -> (Score, Bytes) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..3000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    (Score::of(&data), Bytes::from(data))
}
