//! Peers: libp2p nodes that exchange, hold and prove blocks.
//!
//! A [`Node`] runs a libp2p swarm (TCP and QUIC, Noise, Yamux, Identify,
//! Kademlia, and the block protocol of [`proto`]) on tokio. The rest of the
//! program talks to it through a cloneable [`Client`]: `put`, `get`, `has`,
//! `challenge`, `release` on a given peer, plus dialling and discovery,
//! placement lookups ([`Client::closest_peers`], ordered by [`distance`]) and
//! liveness ([`Client::peer_events`], [`Client::probe`]). A node
//! that keeps blocks for others runs a [`Holder`] as its [`Handler`].
//!
//! Trust: a holder checks every block it receives against its score; a client
//! checks every block it fetches against its score and every proof against the
//! score alone. Wire and file formats are in `docs/FORMATS.md`.
//!
//! Errors say whose fault a failure is: [`Error::Refused`] (the peer answered
//! no: `Full`, `UnknownBlock`, `Unavailable` — retry later — ...),
//! [`Error::Corrupt`] (the peer sent wrong bytes), and `Unreachable`,
//! `Timeout` or `Protocol` (no usable answer). Code outside tokio (FUSE
//! threads) calls the async client through a runtime handle's `block_on`.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<fincrypt_blockstore::LocalStore>) -> Result<(), fincrypt_net::Error> {
//! use fincrypt_net::{Holder, Node, NodeConfig};
//! let mut config = NodeConfig::with_key_file("/var/lib/fincrypt/node.key".as_ref())?;
//! config.listen = vec!["/ip4/0.0.0.0/tcp/4001".parse().unwrap()];
//! let holder = Holder::open(store, "/var/lib/fincrypt/placements.redb".as_ref(), 2 << 30)?;
//! let node = Node::start(config, Some(std::sync::Arc::new(holder))).await?;
//! println!("{} on {:?}", node.peer_id(), node.listen_addrs());
//! # Ok(()) }
//! ```

pub mod bulk;
mod client;
pub mod codec;
mod dht;
mod error;
mod event_loop;
pub mod gate;
pub mod holder;
pub mod identity;
pub mod ledger;
mod node;
pub mod proto;
pub mod root;

pub use client::{Client, PROBE_TIMEOUT, Space};
pub use dht::distance;
pub use error::Error;
pub use event_loop::{EventLoop, PeerEvent, PeerInfo};
pub use gate::ConnectionStats;
pub use holder::{Holder, HolderStats, Terms, disk_reserve};
pub use node::{BootstrapPeer, BootstrapPeers, Handler, Node, NodeConfig, new};
pub use proto::{ErrorCode, Request, Response};

pub use libp2p::identity::Keypair;
pub use libp2p::{Multiaddr, PeerId, multiaddr};

/// Result with the peer layer's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
