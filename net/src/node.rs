//! A node: its settings, the libp2p `Behaviour`, and starting and stopping it.
//!
//! Laid out as libp2p's file-sharing example: [`new`] builds the swarm and
//! returns a cloneable [`Client`] and the [`EventLoop`] that owns the swarm;
//! [`Node::start`] does that, runs the loop on tokio, listens and bootstraps.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, connection_limits, identify, kad, noise, request_response,
    tcp, yamux,
};
use tokio::sync::mpsc;

use crate::bulk::{BulkStop, WithBulk};
use crate::client::Client;
use crate::codec::{self, Codec, InboundRequest};
use crate::event_loop::{EventLoop, PeerEvent};
use crate::gate::{Counters, Gate};
use crate::proto::Response;
use crate::{Error, identity};

/// The Kademlia protocol name: Fincrypt's DHT is its own, not the IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fincrypt/kad/1");
/// The Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/fincrypt/id/1";

/// Answers inbound block requests; a [`crate::Holder`] is one.
pub trait Handler: Send + Sync + 'static {
    /// The response to `request` from `peer`; an `Err` request did not decode.
    fn handle(&self, peer: PeerId, request: InboundRequest) -> BoxFuture<'static, Response>;
}

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's identity; its public key is the PeerId.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/127.0.0.1/tcp/0` or `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the network through, with or without a trailing `/p2p/<PeerId>`.
    pub bootstrap: Vec<Multiaddr>,
    /// How long a request may take before it fails with [`Error::Timeout`].
    pub request_timeout: Duration,
    /// How long a connection is kept after its last use (a connection freed
    /// for another under `max_connections` closes sooner).
    pub idle_timeout: Duration,
    /// Inbound requests handled at once; more are answered `Unavailable`.
    pub max_inbound: usize,
    /// libp2p connections open at once, in all (dialling ones included).
    ///
    /// At the limit a new dial waits for the least recently used connection
    /// to finish what it is doing and close, rather than failing, so DHT
    /// lookups and puts stay correct under a small limit; an inbound
    /// connection is refused. See [`crate::gate`].
    pub max_connections: u32,
    /// Move blocks over bulk connections (AES-256-GCM over TCP, keyed over
    /// libp2p; see [`crate::bulk`]) when the peer offers one, and offer one
    /// when this node holds blocks. Off: everything goes over libp2p.
    pub bulk: bool,
}

impl NodeConfig {
    /// Defaults around `keypair`: no listen or bootstrap addresses.
    pub fn new(keypair: Keypair) -> NodeConfig {
        NodeConfig {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_inbound: 32,
            max_connections: 256,
            bulk: true,
        }
    }

    /// Defaults with the node key kept in `key_file` (created on first use).
    pub fn with_key_file(key_file: &Path) -> Result<NodeConfig, Error> {
        Ok(NodeConfig::new(identity::load_or_create_keypair(key_file)?))
    }
}

/// Concurrent block streams one connection may open: a request holds up to a
/// block in memory while it is read, so this and the connection limits bound
/// what peers can make a node hold.
const STREAMS_PER_CONNECTION: usize = 16;

/// The protocols a node speaks, composed; the logic is elsewhere.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) blocks: request_response::Behaviour<Codec>,
    pub(crate) kademlia: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) identify: identify::Behaviour,
}

/// Peer events a slow subscriber may fall behind by before it misses some.
const PEER_EVENTS: usize = 1024;

/// Builds the swarm: the client handle and the event loop to run (see [`EventLoop::run`]).
///
/// With a `handler` the node answers block requests and advertises the
/// protocol; without one it only asks.
pub fn new(
    config: &NodeConfig,
    handler: Option<Arc<dyn Handler>>,
) -> Result<(Client, EventLoop), Error> {
    let peer_id = config.keypair.public().to_peer_id();
    let support = if handler.is_some() {
        request_response::ProtocolSupport::Full
    } else {
        request_response::ProtocolSupport::Outbound
    };
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(STREAMS_PER_CONNECTION);
    // The gate keeps the total within `max_connections` without denying
    // dials; this stays as a backstop and for the other limits.
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections.max(1)))
        .with_max_pending_incoming(Some(64))
        .with_max_established_per_peer(Some(4));
    let transport = |e: &dyn std::fmt::Display| Error::Transport(e.to_string());
    let counters = Arc::new(Counters::default());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let mut kad_config = kad::Config::new(KAD_PROTOCOL);
            kad_config.set_query_timeout(Duration::from_secs(30));
            // The DHT is for finding peers, and storage nodes that charge:
            // records and provider entries others push are filtered, and
            // only announcements of offers kept (see the event loop).
            kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
            let mut kademlia = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            // Without AutoNAT nothing would confirm an external address, and
            // a node in client mode answers no queries: every node serves.
            kademlia.set_mode(Some(kad::Mode::Server));
            let behaviour = Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                blocks: request_response::Behaviour::with_codec(
                    Codec,
                    [(codec::PROTOCOL, support)],
                    rr_config,
                ),
                kademlia,
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                        .with_agent_version(format!("fincrypt/{}", env!("CARGO_PKG_VERSION"))),
                ),
            };
            Gate::new(
                behaviour,
                config.max_connections as usize,
                config.idle_timeout,
                counters.clone(),
            )
        })
        .map_err(|e| transport(&e))?
        // Zero: the gate's handler decides how long an idle connection stays.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::ZERO))
        .build();
    let (sender, receiver) = mpsc::channel(64);
    let (events, _) = tokio::sync::broadcast::channel::<PeerEvent>(PEER_EVENTS);
    Ok((
        Client::new(
            sender,
            peer_id,
            config.bulk,
            config.request_timeout,
            events.clone(),
            counters,
        ),
        EventLoop::new(swarm, receiver, handler, config.max_inbound, events),
    ))
}

/// Splits `/…/p2p/<id>` into the id and the transport address before it.
pub(crate) fn split_p2p(addr: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut transport = addr.clone();
    match transport.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some((peer, transport)),
        _ => None,
    }
}

/// Why a fixed TCP port in `addr` cannot be listened on, if it cannot.
///
/// libp2p's TCP listeners set SO_REUSEPORT, so a second node on a port already
/// taken by another would bind it too and silently share its connections. A
/// plain bind, without that option, fails on such a port: try one first.
fn tcp_port_in_use(addr: &Multiaddr) -> Option<String> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Some(Protocol::Tcp(port)) = parts.next() else {
        return None;
    };
    if port == 0 {
        return None;
    }
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(e.to_string()),
        // Other failures (no such address, permission) show again, and
        // better, when libp2p binds.
        Err(_) => None,
    }
}

/// `handler` with bulk connections offered on the IP of the first listen
/// address; `handler` alone (blocks over libp2p only) if there is no such
/// address or it cannot be bound.
async fn with_bulk(
    listen: &[Multiaddr],
    handler: Arc<dyn Handler>,
) -> (Arc<dyn Handler>, Option<BulkStop>) {
    use libp2p::multiaddr::Protocol;
    let ip = listen.iter().find_map(|a| match a.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(std::net::IpAddr::from(ip)),
        Some(Protocol::Ip6(ip)) => Some(ip.into()),
        _ => None,
    });
    let Some(ip) = ip else {
        return (handler, None);
    };
    match WithBulk::start(ip, handler.clone()).await {
        Ok((wrapped, stop)) => (Arc::new(wrapped), Some(stop)),
        Err(e) => {
            tracing::warn!(%ip, error = %e, "cannot offer bulk connections; blocks go over libp2p");
            (handler, None)
        }
    }
}

/// A running node: the event loop on a tokio task, and a client to it.
pub struct Node {
    client: Client,
    listen_addrs: Vec<Multiaddr>,
    /// What became of each bootstrap address, for `status`.
    bootstraps: BootstrapPeers,
    task: tokio::task::JoinHandle<()>,
    /// The bulk listener, stopped after the event loop.
    bulk: Option<BulkStop>,
}

/// A bootstrap address and what became of it (see [`Node::bootstrap_peers`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BootstrapPeer {
    /// The address, as given.
    pub addr: String,
    /// True once a connection to it was made.
    pub reached: bool,
    /// Unix seconds of the first failed dial, while it has not been reached.
    pub unreachable_since: Option<u64>,
    /// Why the last dial failed, while it has not been reached.
    pub last_error: Option<String>,
    /// Dials so far.
    pub attempts: u32,
}

/// The bootstrap addresses of a node and what became of them; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct BootstrapPeers(Arc<std::sync::Mutex<Vec<BootstrapPeer>>>);

impl BootstrapPeers {
    /// Each address given at start: reached yet, or since when it could not be.
    pub fn list(&self) -> Vec<BootstrapPeer> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The longest wait between two dials of a bootstrap peer not reached yet.
const BOOTSTRAP_RETRY_MAX: Duration = Duration::from_secs(60);

/// Dials bootstrap address `i` until it answers (waiting 1 s, 2 s, 4 s… up
/// to a minute between tries), or the node shuts down. The first failure is
/// a warning; the retries are not, their state is in `status`.
async fn dial_bootstrap(client: Client, addr: Multiaddr, states: BootstrapPeers, i: usize) {
    let mut wait = Duration::from_secs(1);
    loop {
        let result = client.dial(addr.clone()).await;
        let first_failure = {
            let mut states = states.0.lock().unwrap_or_else(|p| p.into_inner());
            let Some(state) = states.get_mut(i) else {
                return;
            };
            state.attempts += 1;
            match &result {
                Ok(_) => {
                    state.reached = true;
                    state.unreachable_since = None;
                    state.last_error = None;
                    false
                }
                Err(Error::Shutdown) => return,
                Err(e) => {
                    state.last_error = Some(e.to_string());
                    let first = state.unreachable_since.is_none();
                    if first {
                        state.unreachable_since = Some(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        );
                    }
                    first
                }
            }
        };
        match result {
            Ok(peer) => {
                tracing::info!(%peer, %addr, "connected to a bootstrap peer");
                // A lookup through it fills the routing table now rather
                // than at the next refresh.
                let _ = client.bootstrap().await;
                return;
            }
            Err(e) if first_failure => tracing::warn!(
                %addr,
                error = %e,
                "cannot reach a bootstrap peer; retrying in the background (see `fincryptctl status`)"
            ),
            Err(e) => tracing::debug!(%addr, error = %e, "bootstrap peer still unreachable"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(BOOTSTRAP_RETRY_MAX);
    }
}

impl Node {
    /// Starts a node on the current tokio runtime: listens on every
    /// `config.listen` address (failing if one cannot be bound) and dials the
    /// bootstrap peers (an unreachable one is logged, not fatal).
    pub async fn start(
        config: NodeConfig,
        handler: Option<Arc<dyn Handler>>,
    ) -> Result<Node, Error> {
        let (handler, bulk) = match (config.bulk, handler) {
            (true, Some(handler)) => {
                let (handler, stop) = with_bulk(&config.listen, handler).await;
                (Some(handler), stop)
            }
            (_, handler) => (handler, None),
        };
        let (client, event_loop) = new(&config, handler)?;
        let task = tokio::spawn(event_loop.run());
        let mut node = Node {
            client,
            listen_addrs: Vec::new(),
            bootstraps: BootstrapPeers(Arc::new(std::sync::Mutex::new(
                config
                    .bootstrap
                    .iter()
                    .map(|addr| BootstrapPeer {
                        addr: addr.to_string(),
                        reached: false,
                        unreachable_since: None,
                        last_error: None,
                        attempts: 0,
                    })
                    .collect(),
            ))),
            task,
            bulk,
        };
        for addr in &config.listen {
            let bound = match tcp_port_in_use(addr) {
                Some(reason) => Err(Error::Listen {
                    addr: addr.clone(),
                    reason,
                }),
                None => node.client.start_listening(addr.clone()).await,
            };
            match bound {
                Ok(bound) => node.listen_addrs.push(bound),
                Err(e) => {
                    node.shutdown().await;
                    return Err(e);
                }
            }
        }
        for (i, addr) in config.bootstrap.iter().enumerate() {
            // Known before start returns, so a request to a bootstrap peer
            // made right after finds its address even before the dial is done.
            if let Some((peer, transport)) = split_p2p(addr) {
                let _ = node.client.add_address(peer, transport).await;
            }
            tokio::spawn(dial_bootstrap(
                node.client.clone(),
                addr.clone(),
                node.bootstraps.clone(),
                i,
            ));
        }
        Ok(node)
    }

    /// What became of each bootstrap address given at start; the handle
    /// stays current.
    pub fn bootstrap_peers(&self) -> BootstrapPeers {
        self.bootstraps.clone()
    }

    /// This node's PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.client.local_peer_id()
    }

    /// A handle to ask the node for things; clone it freely.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The addresses bound at start, one per `listen` entry (ports resolved).
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen_addrs
    }

    /// The TCP port bulk connections are accepted on, if this node offers them.
    pub fn bulk_port(&self) -> Option<u16> {
        self.bulk.as_ref().map(|b| b.port)
    }

    /// Stops the node: in-flight inbound requests are answered, then the swarm closes.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the network event loop failed");
        }
        if let Some(bulk) = self.bulk {
            bulk.stop().await;
        }
    }
}
