//! The event loop: owns the swarm and routes commands and events, nothing else.
//!
//! Commands from [`crate::Client`] arrive on a channel with a oneshot for the
//! answer; swarm events complete them or go to the [`Handler`]. Inbound
//! requests run as tasks beside the loop, so a slow disk never stalls it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use fincrypt_blockstore::Score;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::kad::QueryId;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionError, ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::Error;
use crate::codec::{self, InboundRequest};
use crate::dht;
use crate::gate::{Gate, GateEvent};
use crate::node::{Behaviour, BehaviourEvent, Handler, KAD_PROTOCOL, split_p2p};
use crate::proto::{ErrorCode, Request, Response};

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// How long a shutdown waits for inbound requests already being handled.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Kademlia queries one closest-peers lookup may run before it gives up on
/// peers it could not ask (see [`Lookup`]).
const LOOKUP_ATTEMPTS: u32 = 5;

/// A request sent to a peer, kept until its answer.
struct Outbound {
    peer: PeerId,
    /// Kept to send it again once if its connection closes before it goes out.
    request: Request,
    reply: Reply<Response>,
    resent: bool,
}

/// A closest-peers lookup: one Kademlia query at a time, run again while a
/// peer that may belong in the result could not be asked.
///
/// Kademlia (libp2p-kad 0.49) marks a peer failed in every running query when
/// its last connection closes or a dial to it is denied, and leaves it out of
/// the result without telling which peers it left out. Under a connection
/// limit both happen through no fault of the peer's: the gate frees a
/// connection just as a query sends a request on it, or holds a dial past its
/// wait. Such a peer is *interrupted*; if it could be closer than the result's
/// farthest, the result may be wrong, and the lookup runs again, keeping what
/// answered before. A peer that is really gone fails its dial in the next
/// query and is not interrupted again.
struct Lookup {
    score: Score,
    reply: Reply<Vec<PeerId>>,
    attempts: u32,
    /// Peers that answered, in any of its queries.
    answered: HashSet<PeerId>,
    /// Peers interrupted while the current query ran.
    interrupted: HashSet<PeerId>,
}

/// What a [`crate::Client`] asks of the event loop.
pub(crate) enum Command {
    Listen {
        addr: Multiaddr,
        reply: Reply<Multiaddr>,
    },
    Dial {
        addr: Multiaddr,
        reply: Reply<PeerId>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Request {
        peer: PeerId,
        request: Request,
        reply: Reply<Response>,
    },
    ListenAddrs {
        reply: Reply<Vec<Multiaddr>>,
    },
    Peers {
        reply: Reply<Vec<PeerInfo>>,
    },
    Bootstrap {
        reply: Reply<()>,
    },
    ClosestPeers {
        score: Score,
        reply: Reply<Vec<PeerId>>,
    },
    /// Announce this node in the DHT as one that makes offers.
    ProvideOffers {
        reply: Reply<()>,
    },
    /// The nodes the DHT knows to make offers.
    FindOffers {
        reply: Reply<Vec<PeerId>>,
    },
    /// The IP address a connection to `peer` reaches it at.
    RemoteIp {
        peer: PeerId,
        reply: Reply<std::net::IpAddr>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What this node knows of another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// Addresses it can be reached at (from Kademlia and Identify).
    pub addrs: Vec<Multiaddr>,
    /// True while a connection to it is open.
    pub connected: bool,
    /// Whether it answers block requests; `None` until it has identified itself.
    pub serves_blocks: Option<bool>,
    /// Its software name and version, once identified.
    pub agent: Option<String>,
}

/// A change in this node's connections to another, from [`crate::Client::peer_events`].
///
/// These are connection facts, not verdicts: a live peer is `Disconnected`
/// when its connection goes idle or is freed for another; confirm with
/// [`crate::Client::probe`] before treating it as gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The first connection to the peer opened.
    Connected(PeerId),
    /// The last connection to the peer closed.
    Disconnected(PeerId),
}

/// Owns the swarm; run it with [`EventLoop::run`] on a tokio runtime.
pub struct EventLoop {
    swarm: Swarm<Gate<Behaviour>>,
    commands: mpsc::Receiver<Command>,
    handler: Option<Arc<dyn Handler>>,
    max_inbound: usize,
    inbound: JoinSet<(PeerId, ResponseChannel<Response>, Response)>,
    requests: HashMap<OutboundRequestId, Outbound>,
    /// Connections that closed idle while a request to their peer was
    /// pending: a request failing with such a connection never went out.
    closed_idle: HashSet<ConnectionId>,
    listens: HashMap<ListenerId, (Multiaddr, Reply<Multiaddr>)>,
    dials: HashMap<ConnectionId, (Multiaddr, Reply<PeerId>)>,
    bootstraps: HashMap<QueryId, Reply<()>>,
    lookups: HashMap<QueryId, Lookup>,
    /// Announcements of this node's offers under way.
    provides: HashMap<QueryId, Reply<()>>,
    /// Searches for nodes that make offers, with those found so far.
    offer_searches: HashMap<QueryId, (HashSet<PeerId>, Reply<Vec<PeerId>>)>,
    events: broadcast::Sender<PeerEvent>,
    identified: HashMap<PeerId, identify::Info>,
    /// The remote address of one open connection per connected peer.
    remote: HashMap<PeerId, Multiaddr>,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Gate<Behaviour>>,
        commands: mpsc::Receiver<Command>,
        handler: Option<Arc<dyn Handler>>,
        max_inbound: usize,
        events: broadcast::Sender<PeerEvent>,
    ) -> EventLoop {
        EventLoop {
            swarm,
            commands,
            handler,
            max_inbound,
            inbound: JoinSet::new(),
            requests: HashMap::new(),
            closed_idle: HashSet::new(),
            listens: HashMap::new(),
            dials: HashMap::new(),
            bootstraps: HashMap::new(),
            lookups: HashMap::new(),
            provides: HashMap::new(),
            offer_searches: HashMap::new(),
            events,
            identified: HashMap::new(),
            remote: HashMap::new(),
        }
    }

    /// Runs until a shutdown command, or until every client handle is gone.
    pub async fn run(mut self) {
        let done = loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                Some(answered) = self.inbound.join_next(), if !self.inbound.is_empty() => {
                    self.on_answered(answered);
                }
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    Some(command) => self.on_command(command),
                    None => break None,
                },
            }
        };
        // Answer what is being answered (the holder's disk work finishes
        // anyway), but do not let a stuck handler hold the shutdown forever.
        let drain = async {
            while let Some(answered) = self.inbound.join_next().await {
                self.on_answered(answered);
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!("inbound requests still running at shutdown were dropped");
        }
        drop(self.swarm);
        if let Some(reply) = done {
            let _ = reply.send(());
        }
    }

    fn on_answered(
        &mut self,
        answered: Result<(PeerId, ResponseChannel<Response>, Response), tokio::task::JoinError>,
    ) {
        match answered {
            Ok((peer, channel, response)) => {
                if self
                    .swarm
                    .behaviour_mut()
                    .inner
                    .blocks
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!(%peer, "peer went away before its answer");
                }
            }
            // The channel went down with the task: the peer sees its stream close.
            Err(e) => tracing::error!(error = %e, "an inbound request handler failed"),
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.listens.insert(id, (addr, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(Error::Listen {
                        addr,
                        reason: e.to_string(),
                    }));
                }
            },
            Command::Dial { addr, reply } => self.dial(addr, reply),
            Command::AddAddress { peer, addr } => {
                self.swarm
                    .behaviour_mut()
                    .inner
                    .kademlia
                    .add_address(&peer, addr);
            }
            Command::Request {
                peer,
                request,
                reply,
            } => self.send(Outbound {
                peer,
                request,
                reply,
                resent: false,
            }),
            Command::ListenAddrs { reply } => {
                let _ = reply.send(Ok(self.swarm.listeners().cloned().collect()));
            }
            Command::Peers { reply } => {
                let _ = reply.send(Ok(self.peers()));
            }
            Command::Bootstrap { reply } => {
                match self.swarm.behaviour_mut().inner.kademlia.bootstrap() {
                    Ok(id) => {
                        self.bootstraps.insert(id, reply);
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::Bootstrap(
                            "no known peers to bootstrap from".into(),
                        )));
                    }
                }
            }
            Command::ClosestPeers { score, reply } => self.closest_peers(score, reply),
            Command::ProvideOffers { reply } => {
                let kademlia = &mut self.swarm.behaviour_mut().inner.kademlia;
                match kademlia.start_providing(dht::offers_key()) {
                    Ok(id) => {
                        self.provides.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Lookup(format!("cannot announce: {e}"))));
                    }
                }
            }
            Command::FindOffers { reply } => {
                let kademlia = &mut self.swarm.behaviour_mut().inner.kademlia;
                if kademlia.kbuckets().next().is_none() {
                    let _ = reply.send(Err(Error::Lookup("no known peers to ask".into())));
                } else {
                    let id = kademlia.get_providers(dht::offers_key());
                    self.offer_searches.insert(id, (HashSet::new(), reply));
                }
            }
            Command::RemoteIp { peer, reply } => {
                let ip = self.remote.get(&peer).and_then(|addr| {
                    addr.iter().find_map(|p| match p {
                        libp2p::multiaddr::Protocol::Ip4(ip) => Some(ip.into()),
                        libp2p::multiaddr::Protocol::Ip6(ip) => Some(ip.into()),
                        _ => None,
                    })
                });
                let _ = reply.send(ip.ok_or_else(|| Error::Unreachable {
                    peer,
                    reason: "not connected over IP".into(),
                }));
            }
            // `run` stops on it before it gets here.
            Command::Shutdown { .. } => {}
        }
    }

    fn send(&mut self, outbound: Outbound) {
        let id = self
            .swarm
            .behaviour_mut()
            .inner
            .blocks
            .send_request(&outbound.peer, Ok(outbound.request.clone()));
        self.requests.insert(id, outbound);
    }

    fn dial(&mut self, addr: Multiaddr, reply: Reply<PeerId>) {
        let opts = match split_p2p(&addr) {
            Some((peer, transport)) => {
                self.swarm
                    .behaviour_mut()
                    .inner
                    .kademlia
                    .add_address(&peer, transport.clone());
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                DialOpts::peer_id(peer).addresses(vec![transport]).build()
            }
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        // Through the gate, so a dial at the connection limit waits for room;
        // its outcome comes back as a swarm or gate event.
        self.dials.insert(opts.connection_id(), (addr, reply));
        self.swarm.behaviour_mut().dial(opts);
    }

    /// Starts a Kademlia lookup of the peers closest to `score` (see [`dht`]).
    fn closest_peers(&mut self, score: Score, reply: Reply<Vec<PeerId>>) {
        let kademlia = &mut self.swarm.behaviour_mut().inner.kademlia;
        if kademlia.kbuckets().next().is_none() {
            let _ = reply.send(Err(Error::Lookup("no known peers to ask".into())));
            return;
        }
        self.query(Lookup {
            score,
            reply,
            attempts: 0,
            answered: HashSet::new(),
            interrupted: HashSet::new(),
        });
    }

    /// Runs one more Kademlia query for `lookup`.
    fn query(&mut self, mut lookup: Lookup) {
        lookup.attempts += 1;
        lookup.interrupted.clear();
        let kademlia = &mut self.swarm.behaviour_mut().inner.kademlia;
        let id = kademlia.get_closest_peers(dht::key(&lookup.score));
        self.lookups.insert(id, lookup);
    }

    /// Kademlia may have counted `peer` as failed without asking it: see [`Lookup`].
    fn interrupted(&mut self, peer: PeerId) {
        for lookup in self.lookups.values_mut() {
            lookup.interrupted.insert(peer);
        }
    }

    /// A query of `lookup` ended with `found`: answers it, or runs it again
    /// when an interrupted peer may belong among the closest.
    fn on_lookup(&mut self, mut lookup: Lookup, found: Vec<kad::PeerInfo>) {
        let found = self.learn(found);
        lookup.answered.extend(found);
        // Dials held back by the gate now were not asked either.
        let local = *self.swarm.local_peer_id();
        let unasked = lookup
            .interrupted
            .iter()
            .copied()
            .chain(self.swarm.behaviour().held_peers())
            .filter(|p| *p != local);
        let (closest, doubtful) =
            dht::settle(&lookup.score, &lookup.answered, unasked, kad::K_VALUE.get());
        if doubtful.is_empty() {
            tracing::debug!(score = %lookup.score, found = closest.len(), "closest peers found");
            let _ = lookup.reply.send(Ok(closest));
        } else if lookup.attempts < LOOKUP_ATTEMPTS {
            tracing::debug!(
                score = %lookup.score,
                attempt = lookup.attempts,
                doubtful = doubtful.len(),
                "peers that may be among the closest were not asked; looking up again"
            );
            self.query(lookup);
        } else {
            let _ = lookup.reply.send(Err(Error::Lookup(format!(
                "{} peers that may be among the closest could not be asked in {} queries \
                 (connection limit or connections closing)",
                doubtful.len(),
                lookup.attempts
            ))));
        }
    }

    /// Keeps the addresses a lookup learned, for the requests that follow it.
    ///
    /// Kademlia forgets them with the query and keeps in its routing table
    /// only peers with room in their bucket; the swarm's peer addresses reach
    /// request-response, which dials from them when a put follows.
    fn learn(&mut self, found: Vec<kad::PeerInfo>) -> Vec<PeerId> {
        let local = *self.swarm.local_peer_id();
        let mut peers = Vec::with_capacity(found.len());
        for info in found {
            if info.peer_id == local {
                continue;
            }
            for addr in info.addrs {
                self.swarm.add_peer_address(info.peer_id, addr);
            }
            peers.push(info.peer_id);
        }
        peers
    }

    fn peers(&mut self) -> Vec<PeerInfo> {
        let mut known: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for bucket in self.swarm.behaviour_mut().inner.kademlia.kbuckets() {
            for entry in bucket.iter() {
                known
                    .entry(*entry.node.key.preimage())
                    .or_default()
                    .extend(entry.node.value.iter().cloned());
            }
        }
        for peer in self.swarm.connected_peers() {
            known.entry(*peer).or_default();
        }
        known
            .into_iter()
            .map(|(peer_id, mut addrs)| {
                let info = self.identified.get(&peer_id);
                if let Some(info) = info {
                    addrs.extend(info.listen_addrs.iter().cloned());
                }
                addrs.sort();
                addrs.dedup();
                PeerInfo {
                    peer_id,
                    addrs,
                    connected: self.swarm.is_connected(&peer_id),
                    serves_blocks: info.map(|i| i.protocols.contains(&codec::PROTOCOL)),
                    agent: info.map(|i| i.agent_version.clone()),
                }
            })
            .collect()
    }

    fn in_routing_table(&mut self, peer: &PeerId) -> bool {
        self.swarm
            .behaviour_mut()
            .inner
            .kademlia
            .kbucket(*peer)
            .is_some_and(|bucket| bucket.iter().any(|e| e.node.key.preimage() == peer))
    }

    fn on_behaviour(&mut self, event: GateEvent<BehaviourEvent>) {
        match event {
            GateEvent::Inner(BehaviourEvent::Blocks(event)) => self.on_blocks(event),
            GateEvent::Inner(BehaviourEvent::Identify(event)) => self.on_identify(event),
            GateEvent::Inner(BehaviourEvent::Kademlia(event)) => self.on_kademlia(event),
            GateEvent::Inner(BehaviourEvent::Limits(never)) => match never {},
            GateEvent::DialFailed {
                connection_id,
                peer,
                reason,
                connected,
            } => {
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    let result = match peer {
                        Some(peer) if connected => Ok(peer),
                        _ => Err(Error::Dial { addr, reason }),
                    };
                    let _ = reply.send(result);
                }
            }
            GateEvent::DialDenied { peer } => self.interrupted(peer),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<GateEvent<BehaviourEvent>>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, "listening");
                if let Some((_, reply)) = self.listens.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some((addr, reply)) = self.listens.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    let _ = reply.send(Err(Error::Listen { addr, reason }));
                }
            }
            SwarmEvent::ListenerError { error, .. } => {
                tracing::warn!(error = %error, "listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, "connected");
                if num_established.get() == 1 {
                    // No subscriber is not an error.
                    let _ = self.events.send(PeerEvent::Connected(peer_id));
                }
                self.remote
                    .insert(peer_id, endpoint.get_remote_address().clone());
                if let Some((_, reply)) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                peer_id,
            } => {
                if let Some((addr, reply)) = self.dials.remove(&connection_id) {
                    // Connected over another address meanwhile: the dial did its job.
                    let result = match (peer_id, &error) {
                        (Some(peer), DialError::DialPeerConditionFalse(_)) => Ok(peer),
                        _ => Err(Error::Dial {
                            addr,
                            reason: error.to_string(),
                        }),
                    };
                    let _ = reply.send(result);
                } else {
                    tracing::debug!(peer = ?peer_id, error = %error, "outgoing connection failed");
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, cause = ?cause, "connection closed");
                // Idle means no stream was open on it, so no request on it had gone out.
                if matches!(cause, Some(ConnectionError::KeepAliveTimeout))
                    && self.requests.values().any(|o| o.peer == peer_id)
                {
                    self.closed_idle.insert(connection_id);
                }
                // Forget what a peer said of itself once it is neither
                // connected nor in the routing table, so the map stays small.
                if num_established == 0 {
                    self.interrupted(peer_id);
                    let _ = self.events.send(PeerEvent::Disconnected(peer_id));
                    self.remote.remove(&peer_id);
                    if !self.in_routing_table(&peer_id) {
                        self.identified.remove(&peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    /// Answers an inbound request from the loop itself, not the handler.
    fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self
            .swarm
            .behaviour_mut()
            .inner
            .blocks
            .send_response(channel, response);
    }

    fn on_blocks(&mut self, event: request_response::Event<InboundRequest, Response>) {
        self.on_blocks_event(event);
        if self.requests.is_empty() {
            self.closed_idle.clear();
        }
    }

    fn on_blocks_event(&mut self, event: request_response::Event<InboundRequest, Response>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(outbound) = self.requests.remove(&request_id) {
                        let _ = outbound.reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                connection_id,
                request_id,
                error,
            } => {
                let Some(outbound) = self.requests.remove(&request_id) else {
                    return;
                };
                // The gate freed the connection just as the request was handed
                // to it: it was never sent, so sending it again is safe.
                let unsent = matches!(error, request_response::OutboundFailure::ConnectionClosed)
                    && self.closed_idle.contains(&connection_id);
                if unsent && !outbound.resent {
                    tracing::debug!(%peer, "a request met its connection closing; sending it again");
                    self.send(Outbound {
                        resent: true,
                        ..outbound
                    });
                } else {
                    let _ = outbound.reply.send(Err(outbound_error(peer, error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: InboundRequest,
        channel: ResponseChannel<Response>,
    ) {
        let Some(handler) = self.handler.clone() else {
            // Not advertised, so not expected; say so rather than stay silent.
            return self.respond(
                channel,
                Response::Error(ErrorCode::bad_request("this node holds no blocks")),
            );
        };
        if self.inbound.len() >= self.max_inbound {
            return self.respond(channel, Response::Error(ErrorCode::Unavailable));
        }
        self.inbound.spawn(async move {
            let response = handler.handle(peer, request).await;
            (peer, channel, response)
        });
    }

    fn on_identify(&mut self, event: identify::Event) {
        if let identify::Event::Received { peer_id, info, .. } = event {
            // Only peers that speak our DHT go into its routing table.
            if info.protocols.contains(&KAD_PROTOCOL) {
                for addr in &info.listen_addrs {
                    self.swarm
                        .behaviour_mut()
                        .inner
                        .kademlia
                        .add_address(&peer_id, addr.clone());
                }
            }
            tracing::debug!(peer = %peer_id, agent = %info.agent_version, "identified");
            self.identified.insert(peer_id, info);
        }
    }

    fn on_kademlia(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::Bootstrap(result),
                step,
                ..
            } => {
                let finished = step.last || matches!(&result, Ok(ok) if ok.num_remaining == 0);
                if finished && let Some(reply) = self.bootstraps.remove(&id) {
                    let _ = reply.send(
                        result
                            .map(|_| ())
                            .map_err(|e| Error::Bootstrap(e.to_string())),
                    );
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                ..
            } => {
                // A closest-peers query reports once, when it ends.
                let Some(lookup) = self.lookups.remove(&id) else {
                    return;
                };
                match result {
                    Ok(ok) => self.on_lookup(lookup, ok.peers),
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => {
                        let _ = lookup.reply.send(Err(Error::Lookup(format!(
                            "timed out with {} peers found",
                            peers.len()
                        ))));
                    }
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::StartProviding(result),
                ..
            } => {
                if let Some(reply) = self.provides.remove(&id) {
                    let _ = reply.send(
                        result
                            .map(|_| ())
                            .map_err(|e| Error::Lookup(format!("announcing offers: {e}"))),
                    );
                }
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            } => {
                let Some((found, _)) = self.offer_searches.get_mut(&id) else {
                    return;
                };
                if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = &result {
                    found.extend(providers.iter().copied());
                }
                if step.last
                    && let Some((found, reply)) = self.offer_searches.remove(&id)
                {
                    // Providers found before a timeout are still an answer.
                    let _ = reply.send(match result {
                        Err(e) if found.is_empty() => {
                            Err(Error::Lookup(format!("finding offers: {e}")))
                        }
                        _ => Ok(found.into_iter().collect()),
                    });
                }
            }
            // Only announcements of offers are kept (the store bounds how
            // many per key); other records and providers are not.
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } if record.key == dht::offers_key() => {
                let kademlia = &mut self.swarm.behaviour_mut().inner.kademlia;
                if let Err(e) = kad::store::RecordStore::add_provider(kademlia.store_mut(), record)
                {
                    tracing::debug!(error = %e, "an offer announcement was not kept");
                }
            }
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } if is_new_peer => {
                tracing::debug!(%peer, "added to the routing table");
            }
            _ => {}
        }
    }
}

fn outbound_error(peer: PeerId, error: request_response::OutboundFailure) -> Error {
    use request_response::OutboundFailure as F;
    match error {
        F::DialFailure => Error::Unreachable {
            peer,
            reason: "no address could be dialled".into(),
        },
        F::Timeout => Error::Timeout { peer },
        F::ConnectionClosed => Error::Unreachable {
            peer,
            reason: "the connection closed before the answer".into(),
        },
        F::UnsupportedProtocols => Error::Protocol {
            peer,
            reason: "the peer does not serve blocks".into(),
        },
        F::Io(e) => Error::Protocol {
            peer,
            reason: e.to_string(),
        },
    }
}
