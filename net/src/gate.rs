//! The connection gate: keeps a node's libp2p connections within its limit
//! without making a lookup or a request fail for it.
//!
//! Why not `connection_limits` alone: it *denies* a dial once the limit is
//! reached, and Kademlia (libp2p-kad 0.49) treats a denied dial like an
//! unreachable peer — the query marks it failed and leaves it out of the
//! result. A lookup run at the limit therefore skips exactly the peers it still
//! had to ask and returns a wrong closest set, with no error. A request-response
//! put to such a peer fails with `DialFailure`.
//!
//! What the gate does instead, wrapped around the node's whole
//! behaviour so that it sees every dial (Kademlia's, request-response's and the
//! client's):
//!
//! - Established plus dialling connections never exceed the limit: an inbound
//!   connection that would is refused, and an outbound dial that would is
//!   *held back*, not denied.
//! - For each held dial the connection used least recently is *released*: it
//!   closes as soon as no stream is open on it, so nothing running on it is
//!   cut (a Kademlia peer that already answered keeps its answer). When it has
//!   closed, the held dial goes out.
//! - A dial held for [`DIAL_WAIT`] (every connection stayed busy) is let
//!   through and refused, so its owner sees a failure instead of waiting
//!   forever.
//!
//! A connection closes on its own task, so a request handed to it just as it
//! closes is lost, and Kademlia counts the close as the peer's failure. The
//! gate cannot prevent that; it reports every dial denied by a limit, and the
//! event loop asks such peers again in a lookup and sends such a request
//! again (see `event_loop.rs`).
//!
//! Closing one connection gracefully needs its idle timeout to be shortened,
//! which libp2p offers only through the handler's keep-alive: the swarm runs
//! with a zero idle timeout and the gate's connection handler keeps each
//! connection alive for the node's `idle_timeout` after its last activity, or
//! until it is released.
//!
//! Not chosen: bounding Kademlia's parallelism does not bound connections
//! (peers that answered keep theirs until they idle out), and a short idle
//! timeout alone only makes a denial less likely: concurrent lookups and puts
//! still run into the limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    DialError, DialFailure, FromSwarm, NetworkBehaviour, NotifyHandler, SubstreamProtocol,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use tokio::time::{Instant, Sleep};

/// How long a dial may wait for a connection to close before it is refused;
/// Kademlia's own per-peer timeout, so a lookup never waits longer on the gate
/// than on a slow peer.
pub const DIAL_WAIT: Duration = Duration::from_secs(10);

/// Established libp2p connections of a node, as [`crate::Client::connection_stats`] reports them.
///
/// Bulk connections ([`crate::bulk`]) are plain TCP beside libp2p and not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections established now.
    pub established: usize,
    /// The most that were established at once since the node started.
    pub peak: usize,
    /// The limit they are kept within (`NodeConfig::max_connections`).
    pub limit: usize,
    /// Dials that waited for another connection to close first.
    pub dials_waited: u64,
    /// Dials and inbound connections refused because no connection could be freed.
    pub refused: u64,
}

/// The figures behind [`ConnectionStats`], shared by the gate and the clients.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    established: AtomicUsize,
    peak: AtomicUsize,
    limit: AtomicUsize,
    waited: AtomicU64,
    refused: AtomicU64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            established: self.established.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
            limit: self.limit.load(Ordering::Relaxed),
            dials_waited: self.waited.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn set_established(&self, n: usize) {
        self.established.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the connection limit ({0}) is reached and no connection could be freed in time")]
struct LimitReached(usize);

/// What the gate reports to the event loop besides the inner behaviour's events.
#[derive(Debug)]
pub(crate) enum GateEvent<E> {
    Inner(E),
    /// A dial asked for with [`Gate::dial`] failed (also when the swarm refused
    /// it outright, which it reports to behaviours only).
    DialFailed {
        connection_id: ConnectionId,
        peer: Option<PeerId>,
        reason: String,
        /// The peer was connected or being dialled meanwhile: the dial was not needed.
        connected: bool,
    },
    /// A dial to `peer`, whoever asked for it, was denied by this node's own
    /// limits (the gate's or `connection_limits`'), not by the peer: Kademlia
    /// counts it as the peer's failure all the same.
    DialDenied {
        peer: PeerId,
    },
}

/// A message to a [`GateHandler`].
#[derive(Debug)]
pub(crate) enum GateIn<E> {
    Inner(E),
    /// Close the connection as soon as no stream is open on it.
    Release,
}

struct Conn {
    peer: PeerId,
    last_active: Instant,
    released: bool,
}

struct Held {
    opts: DialOpts,
    since: Instant,
}

type Out<B> = ToSwarm<GateEvent<<B as NetworkBehaviour>::ToSwarm>, GateIn<THandlerInEvent<B>>>;

/// Wraps a behaviour so that its connections stay within a limit (see the module docs).
pub(crate) struct Gate<B: NetworkBehaviour> {
    pub(crate) inner: B,
    limit: usize,
    idle_timeout: Duration,
    established: HashMap<ConnectionId, Conn>,
    dialling: HashMap<ConnectionId, Option<PeerId>>,
    held: VecDeque<Held>,
    /// Dials the event loop asked for: their failures are reported to it.
    asked: HashSet<ConnectionId>,
    out: VecDeque<Out<B>>,
    timer: Option<Pin<Box<Sleep>>>,
    counters: Arc<Counters>,
    waker: Option<Waker>,
}

impl<B: NetworkBehaviour> Gate<B> {
    /// `inner` kept within `limit` connections, each kept `idle_timeout` after its last use.
    pub(crate) fn new(
        inner: B,
        limit: usize,
        idle_timeout: Duration,
        counters: Arc<Counters>,
    ) -> Gate<B> {
        // A limit of 0 would hold every dial forever; one connection at a time still works.
        let limit = limit.max(1);
        counters.limit.store(limit, Ordering::Relaxed);
        Gate {
            inner,
            limit,
            idle_timeout,
            established: HashMap::new(),
            dialling: HashMap::new(),
            held: VecDeque::new(),
            asked: HashSet::new(),
            out: VecDeque::new(),
            timer: None,
            counters,
            waker: None,
        }
    }

    /// Dials through the gate; the outcome arrives as a connection event, an
    /// outgoing connection error, or [`GateEvent::DialFailed`].
    pub(crate) fn dial(&mut self, opts: DialOpts) {
        self.asked.insert(opts.connection_id());
        if !self.has_slot() && !self.needs_no_slot(&opts) {
            self.counters.waited.fetch_add(1, Ordering::Relaxed);
        }
        self.held.push_back(Held {
            opts,
            since: Instant::now(),
        });
        self.release_for_held();
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    fn has_slot(&self) -> bool {
        self.established.len() + self.dialling.len() < self.limit
    }

    /// A dial to a peer already connected or being dialled opens nothing (the
    /// swarm's default condition turns it down), so it needs no slot.
    fn needs_no_slot(&self, opts: &DialOpts) -> bool {
        opts.get_peer_id().is_some_and(|peer| {
            self.established.values().any(|c| c.peer == peer)
                || self.dialling.values().any(|p| *p == Some(peer))
        })
    }

    fn refuse(&self, what: &str) -> ConnectionDenied {
        tracing::debug!(
            established = self.established.len(),
            dialling = self.dialling.len(),
            held = self.held.len(),
            "connection limit: refusing {what}"
        );
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        ConnectionDenied::new(LimitReached(self.limit))
    }

    /// Releases least recently used connections until one closes for every held dial that needs a slot.
    fn release_for_held(&mut self) {
        let needed = self
            .held
            .iter()
            .filter(|h| !self.needs_no_slot(&h.opts))
            .count();
        let mut releasing = self.established.values().filter(|c| c.released).count();
        while releasing < needed {
            let Some((&id, conn)) = self
                .established
                .iter_mut()
                .filter(|(_, c)| !c.released)
                .min_by_key(|(_, c)| c.last_active)
            else {
                break;
            };
            conn.released = true;
            tracing::debug!(peer = %conn.peer, "releasing a connection to make room for a dial");
            self.out.push_back(ToSwarm::NotifyHandler {
                peer_id: conn.peer,
                handler: NotifyHandler::One(id),
                event: GateIn::Release,
            });
            releasing += 1;
        }
    }

    /// The held dial to let out now, if any: one that needs no slot, else the
    /// oldest when a slot is free or it has waited [`DIAL_WAIT`] (then it is refused).
    fn next_held(&mut self, now: Instant) -> Option<DialOpts> {
        let i = match self.held.iter().position(|h| self.needs_no_slot(&h.opts)) {
            Some(i) => i,
            None => {
                let front = self.held.front()?;
                if !self.has_slot() && front.since + DIAL_WAIT > now {
                    return None;
                }
                0
            }
        };
        self.held.remove(i).map(|h| h.opts)
    }

    fn touch_peer(&mut self, peer: PeerId, handler: &NotifyHandler) {
        let now = Instant::now();
        match handler {
            NotifyHandler::One(id) => {
                if let Some(c) = self.established.get_mut(id) {
                    c.last_active = now;
                }
            }
            NotifyHandler::Any => {
                for c in self.established.values_mut().filter(|c| c.peer == peer) {
                    c.last_active = now;
                }
            }
        }
    }

    /// The peers of the dials held back now, waiting for a connection to close.
    pub(crate) fn held_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.held.iter().filter_map(|h| h.opts.get_peer_id())
    }

    fn on_dial_failure(&mut self, failure: &DialFailure) {
        self.dialling.remove(&failure.connection_id);
        if let (Some(peer), DialError::Denied { .. }) = (failure.peer_id, failure.error) {
            self.out
                .push_back(ToSwarm::GenerateEvent(GateEvent::DialDenied { peer }));
        }
        if self.asked.remove(&failure.connection_id) {
            self.out
                .push_back(ToSwarm::GenerateEvent(GateEvent::DialFailed {
                    connection_id: failure.connection_id,
                    peer: failure.peer_id,
                    reason: failure.error.to_string(),
                    connected: matches!(failure.error, DialError::DialPeerConditionFalse(_)),
                }));
        }
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gate<B> {
    type ConnectionHandler = GateHandler<THandler<B>>;
    type ToSwarm = GateEvent<B::ToSwarm>;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        if !self.has_slot() {
            return Err(self.refuse("an inbound connection"));
        }
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // Checked again: dials may have taken the room since the handshake began.
        if !self.has_slot() {
            return Err(self.refuse("an inbound connection"));
        }
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(GateHandler::new(handler, self.idle_timeout))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if !self.has_slot() {
            return Err(self.refuse(&format!("a dial to {maybe_peer:?}")));
        }
        let addrs = self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )?;
        self.dialling.insert(connection_id, maybe_peer);
        Ok(addrs)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(GateHandler::new(handler, self.idle_timeout))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                self.dialling.remove(&e.connection_id);
                self.asked.remove(&e.connection_id);
                self.established.insert(
                    e.connection_id,
                    Conn {
                        peer: e.peer_id,
                        last_active: Instant::now(),
                        released: false,
                    },
                );
                self.counters.set_established(self.established.len());
                self.wake();
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. }) => {
                self.established.remove(connection_id);
                self.counters.set_established(self.established.len());
                self.wake();
            }
            FromSwarm::DialFailure(failure) => {
                self.on_dial_failure(failure);
                self.wake();
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if let Some(c) = self.established.get_mut(&connection_id) {
            c.last_active = Instant::now();
        }
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Out<B>> {
        self.waker = Some(cx.waker().clone());
        loop {
            // Connections that were still dialling when a dial was held may
            // have opened since: release them too if that dial still waits.
            if !self.held.is_empty() {
                self.release_for_held();
            }
            if let Some(event) = self.out.pop_front() {
                return Poll::Ready(event);
            }
            // The swarm handles a dial before it polls again, so a slot seen
            // free here is still free when the dial claims it.
            if let Some(opts) = self.next_held(Instant::now()) {
                return Poll::Ready(ToSwarm::Dial { opts });
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::Dial { opts }) => {
                    let no_slot = self.needs_no_slot(&opts);
                    if self.held.is_empty() && (no_slot || self.has_slot()) {
                        return Poll::Ready(ToSwarm::Dial { opts });
                    }
                    if !no_slot && !self.has_slot() {
                        self.counters.waited.fetch_add(1, Ordering::Relaxed);
                    }
                    self.held.push_back(Held {
                        opts,
                        since: Instant::now(),
                    });
                    self.release_for_held();
                    continue;
                }
                Poll::Ready(event) => {
                    if let ToSwarm::NotifyHandler {
                        peer_id, handler, ..
                    } = &event
                    {
                        let (peer, handler) = (*peer_id, handler.clone());
                        self.touch_peer(peer, &handler);
                    }
                    return Poll::Ready(event.map_out(GateEvent::Inner).map_in(GateIn::Inner));
                }
                Poll::Pending => {}
            }
            // Wake up when the oldest held dial has waited long enough.
            let Some(front) = self.held.front() else {
                self.timer = None;
                return Poll::Pending;
            };
            let deadline = front.since + DIAL_WAIT;
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
        }
    }
}

/// A connection handler kept alive for `idle_timeout` after its last activity,
/// or until the gate releases it; otherwise the inner handler, unchanged.
pub(crate) struct GateHandler<H> {
    inner: H,
    idle_timeout: Duration,
    linger: Pin<Box<Sleep>>,
    released: bool,
    waker: Option<Waker>,
}

impl<H> GateHandler<H> {
    fn new(inner: H, idle_timeout: Duration) -> GateHandler<H> {
        GateHandler {
            inner,
            idle_timeout,
            linger: Box::pin(tokio::time::sleep(idle_timeout)),
            released: false,
            waker: None,
        }
    }

    fn touch(&mut self) {
        if !self.released {
            let deadline = Instant::now() + self.idle_timeout;
            self.linger.as_mut().reset(deadline);
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for GateHandler<H> {
    type FromBehaviour = GateIn<H::FromBehaviour>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    // The swarm asks this only while no stream is open or being negotiated,
    // so a released connection closes at its first idle moment.
    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
            || (!self.released && Instant::now() < self.linger.deadline())
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        if let Poll::Ready(event) = self.inner.poll(cx) {
            self.touch();
            return Poll::Ready(event);
        }
        // Registers a wake-up for when lingering ends, so the connection asks
        // `connection_keep_alive` again then.
        if !self.released {
            let _ = self.linger.as_mut().poll(cx);
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            GateIn::Inner(event) => {
                self.touch();
                self.inner.on_behaviour_event(event);
            }
            GateIn::Release => {
                self.released = true;
                if let Some(waker) = self.waker.take() {
                    waker.wake();
                }
            }
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        if matches!(
            event,
            ConnectionEvent::FullyNegotiatedInbound(_)
                | ConnectionEvent::FullyNegotiatedOutbound(_)
        ) {
            self.touch();
        }
        self.inner.on_connection_event(event);
    }
}
