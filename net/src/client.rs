//! The client handle: what the rest of the program calls to use the network.
//!
//! Every method sends a command to the event loop and awaits its answer; the
//! checks that make a peer's answer trustworthy happen here, outside the loop:
//! a fetched block is checked against its score and a proof against the score
//! alone, so a lying or damaged holder yields an error or `false`, never bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use fincrypt_blockstore::{Score, score};
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::Error;
use crate::bulk::{BulkConn, BulkPool, Pooled};
use crate::event_loop::{Command, PeerEvent, PeerInfo};
use crate::gate::{ConnectionStats, Counters};
use crate::proto::{Bitmap, BulkKey, NONCE_LEN, Request, Response};

/// A cloneable handle to a running node; a closed node answers [`Error::Shutdown`].
#[derive(Clone)]
pub struct Client {
    sender: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// Bulk connections for puts and gets; `None` when the node uses libp2p only.
    bulk: Option<Arc<BulkPool>>,
    request_timeout: Duration,
    events: broadcast::Sender<PeerEvent>,
    connections: Arc<Counters>,
}

/// The longest a [`Client::probe`] waits for its answer: a peer slower than
/// this is as good as gone for repair's purposes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Room a holder offers, as it reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Bytes offered to peers in all.
    pub capacity: u64,
    /// Bytes of it in use.
    pub used: u64,
}

impl Space {
    /// Bytes still free.
    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used)
    }
}

impl Client {
    pub(crate) fn new(
        sender: mpsc::Sender<Command>,
        peer_id: PeerId,
        bulk: bool,
        request_timeout: Duration,
        events: broadcast::Sender<PeerEvent>,
        connections: Arc<Counters>,
    ) -> Client {
        Client {
            sender,
            peer_id,
            bulk: bulk.then(Arc::default),
            request_timeout,
            events,
            connections,
        }
    }

    /// This node's libp2p connections: now, at most since start, and the limit.
    pub fn connection_stats(&self) -> ConnectionStats {
        self.connections.snapshot()
    }

    /// Connection events from now on: `Connected` when the first connection to
    /// a peer opens, `Disconnected` when the last one closes.
    ///
    /// A subscriber more than 1024 events behind gets `Lagged` and misses
    /// those; a closed node ends the stream (`Closed`).
    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Requests answered over bulk connections so far (see [`crate::bulk`]).
    pub fn bulk_answered(&self) -> u64 {
        self.bulk
            .as_ref()
            .map_or(0, |b| b.answered.load(Ordering::Relaxed))
    }

    /// This node's PeerId.
    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(make(reply))
            .await
            .map_err(|_| Error::Shutdown)?;
        answer.await.map_err(|_| Error::Shutdown)?
    }

    /// Listens on `addr`; returns the address actually bound (a `/tcp/0` port resolved).
    pub async fn start_listening(&self, addr: Multiaddr) -> Result<Multiaddr, Error> {
        self.ask(|reply| Command::Listen { addr, reply }).await
    }

    /// The addresses this node listens on now.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, Error> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// Connects to `addr` (with or without a trailing `/p2p/<PeerId>`); returns the peer's id.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, Error> {
        self.ask(|reply| Command::Dial { addr, reply }).await
    }

    /// Tells the DHT that `peer` is reachable at `addr`, without connecting.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), Error> {
        self.sender
            .send(Command::AddAddress { peer, addr })
            .await
            .map_err(|_| Error::Shutdown)
    }

    /// Runs a Kademlia bootstrap (a lookup of our own id) and waits for it to end.
    pub async fn bootstrap(&self) -> Result<(), Error> {
        self.ask(|reply| Command::Bootstrap { reply }).await
    }

    /// The peers closest to `score` in the whole network, closest first, by a
    /// Kademlia lookup (up to 20 peers; never this node).
    ///
    /// The order is that of [`crate::distance`]. Only peers that answered the
    /// lookup are returned, and their addresses are kept, so a
    /// [`Client::put`] to one right after can dial it. A peer this node could
    /// not ask for a reason of its own (the connection limit, a connection
    /// closing under the request) is asked again in a fresh query rather than
    /// left out. Fails with [`Error::Lookup`] when no peer is known, the
    /// lookup timed out, or such peers could still not be asked after a few
    /// queries: never a closest set with a gap.
    pub async fn closest_peers(&self, score: Score) -> Result<Vec<PeerId>, Error> {
        self.ask(|reply| Command::ClosestPeers { score, reply })
            .await
    }

    /// Announces in the DHT that this node makes offers (a storage node that
    /// charges), so owners beyond its neighbours find it; Kademlia renews the
    /// announcement, and calling again refreshes it.
    pub async fn provide_offers(&self) -> Result<(), Error> {
        self.ask(|reply| Command::ProvideOffers { reply }).await
    }

    /// The nodes the DHT knows to make offers.
    pub async fn find_offers(&self) -> Result<Vec<PeerId>, Error> {
        self.ask(|reply| Command::FindOffers { reply }).await
    }

    /// Peers this node is connected to or knows through Kademlia.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, Error> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// Stops the node (see [`crate::Node::shutdown`]); other handles then answer `Shutdown`.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.sender.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    async fn request(&self, peer: PeerId, request: Request) -> Result<Response, Error> {
        request.check_limits().map_err(Error::InvalidRequest)?;
        let bulk = match &request {
            Request::Put { .. } | Request::Get { .. } => self.bulk_call(peer, &request).await,
            _ => None,
        };
        let response = match bulk {
            Some(response) => response,
            None => self.libp2p_call(peer, request).await?,
        };
        match response {
            Response::Error(code) => Err(Error::Refused { peer, code }),
            other => Ok(other),
        }
    }

    async fn libp2p_call(&self, peer: PeerId, request: Request) -> Result<Response, Error> {
        self.ask(|reply| Command::Request {
            peer,
            request,
            reply,
        })
        .await
    }

    /// Sends `request` over a bulk connection to `peer`; `None` when there is
    /// none to be had or it failed, and the request should go over libp2p.
    async fn bulk_call(&self, peer: PeerId, request: &Request) -> Option<Response> {
        let pool = self.bulk.as_ref()?;
        // An idle connection may have been closed by the holder meanwhile:
        // then one fresh connection is tried before giving up.
        let mut conn = match pool.take(&peer) {
            Pooled::Skip => return None,
            Pooled::Idle(conn) => Some(*conn),
            Pooled::Open => None,
        };
        for _ in 0..2 {
            let fresh = conn.is_none();
            let mut c = match conn.take() {
                Some(c) => c,
                None => match self.open_bulk(peer).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "no bulk connection; using libp2p");
                        pool.set_libp2p_only(peer);
                        return None;
                    }
                },
            };
            match tokio::time::timeout(self.request_timeout, c.call(request)).await {
                Ok(Ok(response)) => {
                    pool.give_back(peer, c);
                    pool.answered.fetch_add(1, Ordering::Relaxed);
                    return Some(response);
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a bulk request failed"),
                Err(_) => tracing::debug!(%peer, "a bulk request timed out"),
            }
            if fresh {
                pool.set_libp2p_only(peer);
                break;
            }
        }
        None
    }

    /// Opens a bulk connection to `peer`: a key agreed over libp2p, then TCP.
    async fn open_bulk(&self, peer: PeerId) -> Result<BulkConn, Error> {
        let mut key = BulkKey([0; 32]);
        rand::thread_rng().fill_bytes(&mut key.0);
        let request = Request::Bulk { key: key.clone() };
        let (port, session) = match self.libp2p_call(peer, request).await? {
            Response::Bulk { port, session } => (port, session),
            Response::Error(code) => return Err(Error::Refused { peer, code }),
            other => return Err(unexpected(peer, &other)),
        };
        let ip = self.ask(|reply| Command::RemoteIp { peer, reply }).await?;
        BulkConn::connect(SocketAddr::new(ip, port), session, &key)
            .await
            .map_err(|e| Error::Unreachable {
                peer,
                reason: format!("bulk connection: {e}"),
            })
    }

    /// Asks `peer` to hold a block; returns once the peer has stored it durably.
    ///
    /// `score` must be the block's score: the holder recomputes it and refuses
    /// a mismatch ([`crate::ErrorCode::ScoreMismatch`]), or a block beyond its room
    /// ([`crate::ErrorCode::Full`]).
    pub async fn put(&self, peer: PeerId, score: Score, data: Bytes) -> Result<(), Error> {
        match self.request(peer, Request::Put { score, data }).await? {
            Response::Stored => Ok(()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Puts a block on `peer` for `owner`, under a contract of the owner's
    /// there that this node pays (see [`Request::PutFor`]).
    pub async fn put_for(
        &self,
        peer: PeerId,
        owner: PeerId,
        score: Score,
        data: Bytes,
    ) -> Result<(), Error> {
        let owner = owner.to_bytes();
        match self
            .request(peer, Request::PutFor { owner, score, data })
            .await?
        {
            Response::Stored => Ok(()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Fetches a block from `peer`, checked against its score.
    ///
    /// Bytes that do not match are [`Error::Corrupt`]: a lying or damaged holder
    /// never yields data.
    pub async fn get(&self, peer: PeerId, score: Score) -> Result<Bytes, Error> {
        match self.request(peer, Request::Get { score }).await? {
            Response::Block { data } => {
                // Hashing a few MiB takes milliseconds: not on the async threads.
                let (data, ok) = tokio::task::spawn_blocking(move || {
                    let ok = Score::of(&data) == score;
                    (data, ok)
                })
                .await
                .map_err(|_| Error::Shutdown)?;
                if ok {
                    Ok(data)
                } else {
                    tracing::warn!(%peer, %score, "a peer returned a block that does not match its score");
                    Err(Error::Corrupt { peer, score })
                }
            }
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Which of `scores` `peer` says it holds (one flag per score, in order).
    ///
    /// This is the peer's word only; [`Client::challenge`] checks it.
    pub async fn has(&self, peer: PeerId, scores: &[Score]) -> Result<Vec<bool>, Error> {
        let answer = self
            .request(
                peer,
                Request::Has {
                    scores: scores.to_vec(),
                },
            )
            .await?;
        match answer {
            Response::Have { held } => bitmap_of(peer, held, scores.len()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Challenges `peer` to prove it holds `score`, with a fresh random nonce.
    ///
    /// `Ok(true)`: the proof checks out against the score. `Ok(false)`: the
    /// peer answered but did not prove possession (a wrong proof, or it says it
    /// does not hold the block). `Err`: no usable answer (unreachable, timeout,
    /// refusal for another reason).
    pub async fn challenge(&self, peer: PeerId, score: Score) -> Result<bool, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        match self
            .request(peer, Request::Challenge { score, nonce })
            .await
        {
            Ok(Response::Proof { proof }) => {
                let index = score::challenge_index(&score, &nonce, proof.block_len);
                let ok = score::verify(&score, index, &proof);
                if !ok {
                    tracing::warn!(%peer, %score, "a peer answered a challenge with a bad proof");
                }
                Ok(ok)
            }
            Ok(other) => Err(unexpected(peer, &other)),
            Err(e) if e.is_unknown_block() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks `peer` to drop blocks this node placed there; one flag per score,
    /// true where this node's placement was recorded and is now removed.
    /// A holder ignores releases from peers that did not place a block.
    pub async fn release(&self, peer: PeerId, scores: &[Score]) -> Result<Vec<bool>, Error> {
        let answer = self
            .request(
                peer,
                Request::Release {
                    scores: scores.to_vec(),
                },
            )
            .await?;
        match answer {
            Response::Released { released } => bitmap_of(peer, released, scores.len()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Whether `peer` answers, and how fast: the round trip of an empty `Has`.
    ///
    /// Any answer counts, a refusal too; dialling is included when no
    /// connection is open. Waits at most [`PROBE_TIMEOUT`] (or the request
    /// timeout, if shorter) before [`Error::Timeout`]. Only nodes that serve
    /// blocks can be probed: others fail with [`Error::Protocol`].
    pub async fn probe(&self, peer: PeerId) -> Result<Duration, Error> {
        let start = tokio::time::Instant::now();
        let request = Request::Has { scores: Vec::new() };
        let wait = self.request_timeout.min(PROBE_TIMEOUT);
        match tokio::time::timeout(wait, self.libp2p_call(peer, request)).await {
            Ok(Ok(_)) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout { peer }),
        }
    }

    /// The room `peer` offers and how much of it is used.
    pub async fn space(&self, peer: PeerId) -> Result<Space, Error> {
        match self.request(peer, Request::Space).await? {
            Response::Space { capacity, used } => Ok(Space { capacity, used }),
            other => Err(unexpected(peer, &other)),
        }
    }
}

impl Client {
    /// `peer`'s signed offer (to be checked by the caller, see `fincrypt-market`).
    pub async fn offer(&self, peer: PeerId) -> Result<Bytes, Error> {
        match self.request(peer, Request::Offer).await? {
            Response::Offer { offer } => Ok(offer),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Proposes a contract to `peer`; its answer is the contract both signed.
    pub async fn propose(&self, peer: PeerId, proposal: Bytes) -> Result<Bytes, Error> {
        match self.request(peer, Request::Propose { proposal }).await? {
            Response::Contract { contract } => Ok(contract),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Asks the mediator `peer` (a `fincrypt-market` message); its answer.
    pub async fn mediate(&self, peer: PeerId, message: Bytes) -> Result<Bytes, Error> {
        match self.request(peer, Request::Mediate { message }).await? {
            Response::Mediated { message } => Ok(message),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Tells `peer` of a payment to it (a `fincrypt-market` notice).
    pub async fn paid(&self, peer: PeerId, notice: Bytes) -> Result<(), Error> {
        match self.request(peer, Request::Paid { notice }).await? {
            Response::Noted => Ok(()),
            other => Err(unexpected(peer, &other)),
        }
    }
}

impl Client {
    /// Offers `peer` the owner's root record; `Ok` once the peer keeps it
    /// (or already kept the very same). A peer keeping a newer one answers
    /// [`crate::ErrorCode::Stale`].
    pub async fn put_root(&self, peer: PeerId, record: Bytes) -> Result<(), Error> {
        match self.request(peer, Request::PutRoot { record }).await? {
            Response::Stored => Ok(()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// Tells `peer` that this node is a device of `owner` (`signature` from
    /// [`crate::root::Owner::bind`] over this node's PeerId).
    pub async fn bind(
        &self,
        peer: PeerId,
        owner: [u8; 32],
        signature: Vec<u8>,
    ) -> Result<(), Error> {
        match self
            .request(peer, Request::Bind { owner, signature })
            .await?
        {
            Response::Stored => Ok(()),
            other => Err(unexpected(peer, &other)),
        }
    }

    /// The root record `peer` keeps for `owner`, checked: a record that does
    /// not verify, or names another owner, is [`Error::Protocol`].
    pub async fn get_root(
        &self,
        peer: PeerId,
        owner: [u8; 32],
    ) -> Result<Option<crate::root::SignedRoot>, Error> {
        match self.request(peer, Request::GetRoot { owner }).await? {
            Response::Root { record: None } => Ok(None),
            Response::Root {
                record: Some(bytes),
            } => match crate::root::SignedRoot::decode(&bytes) {
                Ok(r) if r.owner == owner => Ok(Some(r)),
                Ok(_) => Err(Error::Protocol {
                    peer,
                    reason: "a root record of another owner".into(),
                }),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "a peer sent an invalid root record");
                    Err(Error::Protocol {
                        peer,
                        reason: format!("invalid root record: {e}"),
                    })
                }
            },
            other => Err(unexpected(peer, &other)),
        }
    }
}

fn bitmap_of(peer: PeerId, map: Bitmap, expected: usize) -> Result<Vec<bool>, Error> {
    if map.len() != expected {
        return Err(Error::Protocol {
            peer,
            reason: format!("{} flags for {expected} scores", map.len()),
        });
    }
    Ok(map.to_bools())
}

fn unexpected(peer: PeerId, response: &Response) -> Error {
    let kind = match response {
        Response::Stored => "Stored",
        Response::Block { .. } => "Block",
        Response::Have { .. } => "Have",
        Response::Proof { .. } => "Proof",
        Response::Released { .. } => "Released",
        Response::Space { .. } => "Space",
        Response::Bulk { .. } => "Bulk",
        Response::Root { .. } => "Root",
        Response::Offer { .. } => "Offer",
        Response::Contract { .. } => "Contract",
        Response::Noted => "Noted",
        Response::Mediated { .. } => "Mediated",
        Response::Error(_) => "Error",
    };
    Error::Protocol {
        peer,
        reason: format!("unexpected {kind} response"),
    }
}
