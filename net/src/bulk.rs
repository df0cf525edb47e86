//! Bulk connections: blocks between two peers over a TCP connection of their
//! own, encrypted with AES-256-GCM under a key agreed over libp2p.
//!
//! Why: nearly every byte between peers is a block in a `Put` or a `Get`.
//! libp2p's Noise offers only ChaCha20-Poly1305 (and its TLS prefers it), and
//! the muxer frames and copies every byte again. On CPUs with AES instructions
//! AES-GCM costs a fraction of ChaCha20-Poly1305, so replication spent a third
//! of its CPU on transport crypto it need not. Puts and gets go over a bulk
//! connection when the peer offers one; everything else, and everything when a
//! bulk connection cannot be had, goes over libp2p as before.
//!
//! Opening (docs/FORMATS.md, "Bulk connections"): the client sends
//! `Request::Bulk { key }` over its libp2p connection (authenticated and
//! encrypted by Noise) with a fresh random key. The holder keeps
//! `session -> (peer, key)` for [`SESSION_TTL`] and answers
//! `Response::Bulk { port, session }`. The client connects to `port` at the IP
//! its libp2p connection reaches, sends the 16 session bytes, then records.
//! A session opens one connection, once.
//!
//! Frames (a frame body of the peer protocol: version byte, postcard
//! message) go as records of at most [`PIECE`] bytes of plaintext. Record: a
//! 4-byte little-endian word, its bit 31 set when more records of the frame
//! follow and its low bits the sealed length `L` (16 < `L` <= [`PIECE`] + 16),
//! then `L` bytes: the piece sealed with AES-256-GCM, the word as associated
//! data, tag last.
//! Nonce: the direction as 4 bytes big-endian (0 client to holder, 1 holder
//! to client), then the record's index in that direction as 8 bytes
//! big-endian. A record that fails to open ends the connection: only the peer
//! the key was agreed with can send one, and none can be replayed, reordered
//! or cut without notice.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use futures::future::BoxFuture;
use libp2p::PeerId;
use rand::RngCore;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::codec::InboundRequest;
use crate::node::Handler;
use crate::proto::{
    self, BulkKey, DecodeError, ErrorCode, LEN_PREFIX, MAX_FRAME_LEN, Request, Response,
};

/// Bytes of a session id.
pub const SESSION_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// How long a session waits for its connection.
pub const SESSION_TTL: Duration = Duration::from_secs(30);
/// Sessions waiting at once; more are answered `Unavailable`.
const MAX_SESSIONS: usize = 1024;
/// Bulk connections a holder serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 128;
/// How long a new connection may take to name its session.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no record for this long is closed (clients keep idle
/// connections for less, see [`IDLE_KEPT`]).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client keeps an idle connection for reuse (each keeps a
/// block-sized buffer); a sweep every [`SWEEP_EVERY`] closes older ones.
const IDLE_KEPT: Duration = Duration::from_secs(10);
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long a holder keeps a quiet connection's receive buffer.
const SPARE_KEPT: Duration = Duration::from_secs(1);
/// Idle connections a client keeps per peer.
const IDLE_PER_PEER: usize = 8;
/// How long a client waits for a connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// After a peer's bulk connection could not be opened, how long requests to
/// it go over libp2p only.
const RETRY_AFTER: Duration = Duration::from_secs(300);

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which way a record travels; part of its nonce.
#[derive(Clone, Copy)]
enum Direction {
    ToHolder = 0,
    ToClient = 1,
}

/// One direction of a connection: its key, the index of its next record,
/// and (sending) the buffer records are sealed in, made once per connection.
struct Cipher {
    key: LessSafeKey,
    direction: Direction,
    next: u64,
    scratch: Vec<u8>,
}

/// The most plaintext one record carries; a longer frame body goes as several.
///
/// Small records keep each piece in the cache from the copy that takes it out
/// of a block, through sealing (or opening), to the socket, and the sender's
/// buffer small enough to keep for good: sealing whole 4 MiB blocks made each
/// connection fault in and walk a block-sized buffer from memory.
const PIECE: usize = 256 << 10;
/// Set in a record's length prefix when more records of the same frame follow.
const MORE: u32 = 1 << 31;
/// A frame buffer a receiver makes when the first record says more follow:
/// the largest block of the default chunking and its frame, so that it is
/// made once and kept (only the part written is committed to memory).
const FRAME_MADE: usize = (4 << 20) + (128 << 10);
/// A frame buffer larger than this is not kept after its frame.
const FRAME_KEPT: usize = 8 << 20;

impl Cipher {
    fn new(key: &BulkKey, direction: Direction) -> io::Result<Cipher> {
        let key = UnboundKey::new(&AES_256_GCM, &key.0)
            .map_err(|_| io::Error::other("the AES-256-GCM key was refused"))?;
        Ok(Cipher {
            key: LessSafeKey::new(key),
            direction,
            next: 0,
            scratch: Vec::new(),
        })
    }

    /// The next record's nonce; each is used once.
    fn nonce(&mut self) -> io::Result<Nonce> {
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&(self.direction as u32).to_be_bytes());
        n[4..].copy_from_slice(&self.next.to_be_bytes());
        self.next = self
            .next
            .checked_add(1)
            .ok_or_else(|| io::Error::other("record counter exhausted"))?;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Seals the frame given as head (length prefix first) and tail, and writes
/// it as records of at most [`PIECE`] bytes of plaintext each.
async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    cipher: &mut Cipher,
    (head, tail): (Vec<u8>, Bytes),
) -> io::Result<()> {
    let head = head.get(LEN_PREFIX..).unwrap_or_default();
    let body = head.len() + tail.len();
    if body == 0 || body > MAX_FRAME_LEN {
        return Err(invalid(format!("a frame body of {body} bytes")));
    }
    let mut buf = std::mem::take(&mut cipher.scratch);
    if buf.capacity() < LEN_PREFIX + PIECE + TAG_LEN {
        buf = Vec::with_capacity(LEN_PREFIX + PIECE + TAG_LEN);
    }
    let mut sent = 0;
    let result = loop {
        let piece = (body - sent).min(PIECE);
        let more = if sent + piece < body { MORE } else { 0 };
        let prefix = (piece + TAG_LEN) as u32 | more;
        buf.clear();
        buf.extend_from_slice(&prefix.to_le_bytes());
        // The piece [sent, sent + piece) of head ++ tail.
        let from_head = head.get(sent..).unwrap_or_default();
        let from_head = &from_head[..from_head.len().min(piece)];
        buf.extend_from_slice(from_head);
        let in_tail = (sent + from_head.len()).saturating_sub(head.len());
        buf.extend_from_slice(&tail[in_tail..in_tail + piece - from_head.len()]);
        let nonce = cipher.nonce()?;
        let (prefix_bytes, plain) = buf.split_at_mut(LEN_PREFIX);
        let tag = cipher
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*prefix_bytes), plain)
            .map_err(|_| io::Error::other("sealing a record failed"))?;
        buf.extend_from_slice(tag.as_ref());
        if let Err(e) = io.write_all(&buf).await {
            break Err(e);
        }
        sent += piece;
        if more == 0 {
            break Ok(());
        }
    };
    cipher.scratch = buf;
    result?;
    io.flush().await
}

/// Reads and opens the records of one frame, into `spare`'s memory; `None`
/// when the stream ends between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    cipher: &mut Cipher,
    spare: Vec<u8>,
) -> io::Result<Option<Bytes>> {
    let mut buf = spare;
    buf.clear();
    loop {
        let mut prefix = [0u8; LEN_PREFIX];
        let mut got = 0;
        while got < LEN_PREFIX {
            match io.read(&mut prefix[got..]).await? {
                0 if got == 0 && buf.is_empty() => return Ok(None),
                0 => return Err(truncated()),
                n => got += n,
            }
        }
        let word = u32::from_le_bytes(prefix);
        let len = (word & !MORE) as usize;
        if !(TAG_LEN < len && len <= PIECE + TAG_LEN) {
            return Err(invalid(format!("a record of {len} bytes is out of bounds")));
        }
        let filled = buf.len();
        if filled + len - TAG_LEN > MAX_FRAME_LEN {
            return Err(invalid("a frame beyond the size limit"));
        }
        if buf.capacity() < filled + len {
            // A frame of several records gets a buffer for the block it
            // usually is, so that it does not regrow; a short one, its size.
            let want = if word & MORE != 0 { FRAME_MADE } else { 0 };
            buf.reserve((filled + len).max(want) - filled);
        }
        // Read into the spare capacity: no zeroing of what the socket fills.
        while buf.len() < filled + len {
            let want = filled + len - buf.len();
            if io.read_buf(&mut (&mut buf).limit(want)).await? == 0 {
                return Err(truncated());
            }
        }
        let nonce = cipher.nonce()?;
        let plain = cipher
            .key
            .open_in_place(nonce, Aad::from(prefix), &mut buf[filled..])
            .map_err(|_| invalid("a record failed its authentication"))?
            .len();
        buf.truncate(filled + plain);
        if word & MORE == 0 {
            return Ok(Some(Bytes::from(buf)));
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        DecodeError::Truncated("stream ended inside a frame"),
    )
}

/// A holder's side: the listener, and the sessions opened over libp2p.
pub(crate) struct BulkServer {
    port: u16,
    sessions: Mutex<HashMap<[u8; SESSION_LEN], Session>>,
}

struct Session {
    peer: PeerId,
    key: BulkKey,
    expires: Instant,
}

impl BulkServer {
    /// Listens on `ip` (the port chosen by the system) and serves connections
    /// with `handler` until stopped (see [`BulkStop`]).
    pub(crate) async fn start(
        ip: IpAddr,
        handler: Arc<dyn Handler>,
    ) -> io::Result<(Arc<BulkServer>, BulkStop)> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let server = Arc::new(BulkServer {
            port: listener.local_addr()?.port(),
            sessions: Mutex::new(HashMap::new()),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(accept(listener, server.clone(), handler, stopped));
        let port = server.port;
        Ok((server, BulkStop { stop, task, port }))
    }

    /// Opens a session for `peer` with its `key`: the answer to its `Request::Bulk`.
    pub(crate) fn open(&self, peer: PeerId, key: BulkKey) -> Response {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            return Response::Error(ErrorCode::Unavailable);
        }
        let mut session = [0u8; SESSION_LEN];
        rand::thread_rng().fill_bytes(&mut session);
        sessions.insert(
            session,
            Session {
                peer,
                key,
                expires: now + SESSION_TTL,
            },
        );
        Response::Bulk {
            port: self.port,
            session,
        }
    }

    fn take(&self, session: &[u8; SESSION_LEN]) -> Option<Session> {
        let s = lock(&self.sessions).remove(session)?;
        (s.expires > Instant::now()).then_some(s)
    }
}

/// Stops a bulk listener and its connections, and waits until they are gone
/// (and with them their hold on the handler and its volume).
pub(crate) struct BulkStop {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The TCP port it listens on.
    pub(crate) port: u16,
}

impl BulkStop {
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        // Cancelled is a stop too: the handler wrapping it aborts the
        // listener when it is dropped first (a node that failed to start).
        if let Err(e) = self.task.await
            && !e.is_cancelled()
        {
            tracing::error!(error = %e, "the bulk listener failed");
        }
    }
}

/// A node's handler with bulk connections offered: it answers
/// `Request::Bulk` itself and hands every other request to the node's own
/// handler. Dropped (a node dropped without a shutdown), it aborts the listener.
pub(crate) struct WithBulk {
    server: Arc<BulkServer>,
    inner: Arc<dyn Handler>,
    listener: tokio::task::AbortHandle,
}

impl WithBulk {
    /// Listens for bulk connections on `ip` and wraps `inner`.
    pub(crate) async fn start(
        ip: IpAddr,
        inner: Arc<dyn Handler>,
    ) -> io::Result<(WithBulk, BulkStop)> {
        let (server, stop) = BulkServer::start(ip, inner.clone()).await?;
        tracing::debug!(%ip, port = server.port, "offering bulk connections");
        let listener = stop.task.abort_handle();
        Ok((
            WithBulk {
                server,
                inner,
                listener,
            },
            stop,
        ))
    }
}

impl Drop for WithBulk {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Handler for WithBulk {
    fn handle(&self, peer: PeerId, request: InboundRequest) -> BoxFuture<'static, Response> {
        match request {
            Ok(Request::Bulk { key }) => {
                let response = self.server.open(peer, key);
                Box::pin(async move { response })
            }
            other => self.inner.handle(peer, other),
        }
    }
}

async fn accept(
    listener: TcpListener,
    server: Arc<BulkServer>,
    handler: Arc<dyn Handler>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => {
                connections.shutdown().await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::debug!(%from, "too many bulk connections; closing a new one");
                        continue;
                    }
                    let (server, handler) = (server.clone(), handler.clone());
                    connections.spawn(async move {
                        if let Err(e) = serve(stream, &server, handler).await {
                            tracing::debug!(%from, error = %e, "a bulk connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a bulk connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(
    stream: TcpStream,
    server: &BulkServer,
    handler: Arc<dyn Handler>,
) -> io::Result<()> {
    let mut io = stream;
    io.set_nodelay(true)?;
    let mut session = [0u8; SESSION_LEN];
    tokio::time::timeout(HELLO_TIMEOUT, io.read_exact(&mut session))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let Some(Session { peer, key, .. }) = server.take(&session) else {
        return Err(invalid("unknown or expired session"));
    };
    let mut inbound = Cipher::new(&key, Direction::ToHolder)?;
    let mut outbound = Cipher::new(&key, Direction::ToClient)?;
    drop(key);
    // A record's memory, back from the handler when it kept no part of it:
    // reading each block into fresh memory costs page faults.
    let mut spare = Vec::new();
    loop {
        // A quiet connection gives its buffer back; a busy one keeps it.
        if tokio::time::timeout(SPARE_KEPT, io.readable())
            .await
            .is_err()
        {
            spare = Vec::new();
        }
        let read = read_frame(&mut io, &mut inbound, std::mem::take(&mut spare));
        let record = tokio::time::timeout(IDLE_TIMEOUT, read)
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let Some(body) = record else {
            return Ok(());
        };
        let whole = body.clone();
        let request = match proto::decode_request_bytes(body) {
            Ok(Request::Bulk { .. }) => Err(DecodeError::Malformed(
                "a bulk connection cannot open another".into(),
            )),
            other => other,
        };
        let response = handler.handle(peer, request).await;
        if let Ok(memory) = whole.try_into_mut() {
            let memory = Vec::from(memory);
            if memory.capacity() <= FRAME_KEPT {
                spare = memory;
            }
        }
        let parts = proto::encode_response_parts(&response).map_err(invalid)?;
        write_frame(&mut io, &mut outbound, parts).await?;
    }
}

/// A client's open connection to one holder.
pub(crate) struct BulkConn {
    io: TcpStream,
    send: Cipher,
    recv: Cipher,
    idle_since: Instant,
}

impl BulkConn {
    /// Connects to a holder's bulk listener and names the session.
    pub(crate) async fn connect(
        addr: SocketAddr,
        session: [u8; SESSION_LEN],
        key: &BulkKey,
    ) -> io::Result<BulkConn> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let mut io = stream;
        io.set_nodelay(true)?;
        io.write_all(&session).await?;
        Ok(BulkConn {
            io,
            send: Cipher::new(key, Direction::ToHolder)?,
            recv: Cipher::new(key, Direction::ToClient)?,
            idle_since: Instant::now(),
        })
    }

    /// Sends one request and reads its response.
    pub(crate) async fn call(&mut self, request: &Request) -> io::Result<Response> {
        let parts = proto::encode_request_parts(request).map_err(invalid)?;
        write_frame(&mut self.io, &mut self.send, parts).await?;
        let body = read_frame(&mut self.io, &mut self.recv, Vec::new())
            .await?
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        proto::decode_response_bytes(body).map_err(invalid)
    }
}

/// A client's idle bulk connections, per peer.
#[derive(Default)]
pub(crate) struct BulkPool {
    peers: Mutex<HashMap<PeerId, PeerConns>>,
    /// True while a task sweeps idle connections.
    sweeping: std::sync::atomic::AtomicBool,
    /// Requests answered over bulk connections, for tests and status.
    pub(crate) answered: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct PeerConns {
    idle: Vec<BulkConn>,
    libp2p_only_until: Option<Instant>,
}

/// What the pool has for a peer.
pub(crate) enum Pooled {
    /// An idle connection to reuse.
    Idle(Box<BulkConn>),
    /// None idle: open one.
    Open,
    /// The peer's bulk connection failed lately: use libp2p.
    Skip,
}

impl BulkPool {
    pub(crate) fn take(&self, peer: &PeerId) -> Pooled {
        let mut peers = lock(&self.peers);
        let Some(p) = peers.get_mut(peer) else {
            return Pooled::Open;
        };
        if p.libp2p_only_until.is_some_and(|t| t > Instant::now()) {
            return Pooled::Skip;
        }
        while let Some(conn) = p.idle.pop() {
            if conn.idle_since.elapsed() < IDLE_KEPT {
                return Pooled::Idle(Box::new(conn));
            }
        }
        Pooled::Open
    }

    pub(crate) fn give_back(self: &Arc<Self>, peer: PeerId, mut conn: BulkConn) {
        conn.idle_since = Instant::now();
        {
            let mut peers = lock(&self.peers);
            let p = peers.entry(peer).or_default();
            p.libp2p_only_until = None;
            if p.idle.len() < IDLE_PER_PEER {
                p.idle.push(conn);
            }
        }
        self.sweep_later();
    }

    /// Starts a task that closes connections idle longer than [`IDLE_KEPT`],
    /// until none is left, unless one runs already.
    fn sweep_later(self: &Arc<Self>) {
        use std::sync::atomic::Ordering::SeqCst;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.sweeping.swap(true, SeqCst) {
            return;
        }
        let pool = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = pool.upgrade() else { return };
                let mut peers = lock(&pool.peers);
                peers.retain(|_, p| {
                    p.idle.retain(|c| c.idle_since.elapsed() < IDLE_KEPT);
                    !p.idle.is_empty() || p.libp2p_only_until.is_some_and(|t| t > Instant::now())
                });
                if peers.values().all(|p| p.idle.is_empty()) {
                    // Cleared under the lock: a connection given back after
                    // this starts a new sweep.
                    pool.sweeping.store(false, SeqCst);
                    return;
                }
            }
        });
    }

    /// Sends requests to `peer` over libp2p only for a while.
    pub(crate) fn set_libp2p_only(&self, peer: PeerId) {
        let mut peers = lock(&self.peers);
        let p = peers.entry(peer).or_default();
        p.idle.clear();
        p.libp2p_only_until = Some(Instant::now() + RETRY_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::Score;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers `Stored` to a put, `Block` with a copy of the last put to a
    /// get, and counts what reached it.
    #[derive(Default)]
    struct Echo {
        calls: AtomicUsize,
        last: Mutex<Option<(PeerId, Bytes)>>,
    }

    impl Handler for Arc<Echo> {
        fn handle(&self, peer: PeerId, request: InboundRequest) -> BoxFuture<'static, Response> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let response = match request {
                Ok(Request::Put { data, .. }) => {
                    *lock(&self.last) = Some((peer, data));
                    Response::Stored
                }
                Ok(Request::Get { .. }) => match lock(&self.last).clone() {
                    Some((_, data)) => Response::Block { data },
                    None => Response::Error(ErrorCode::UnknownBlock),
                },
                Ok(_) => Response::Error(ErrorCode::bad_request("not here")),
                Err(e) => Response::Error(e.to_code()),
            };
            Box::pin(async move { response })
        }
    }

    async fn server() -> (Arc<Echo>, Arc<BulkServer>, BulkStop, SocketAddr) {
        let echo = Arc::new(Echo::default());
        let (server, task) =
            BulkServer::start("127.0.0.1".parse().unwrap(), Arc::new(echo.clone()))
                .await
                .unwrap();
        let addr = SocketAddr::new("127.0.0.1".parse().unwrap(), server.port);
        (echo, server, task, addr)
    }

    fn session_of(response: Response) -> [u8; SESSION_LEN] {
        match response {
            Response::Bulk { session, .. } => session,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// True once the holder has closed `stream` (what it reads is discarded).
    async fn closed(stream: &mut TcpStream) -> bool {
        use tokio::io::AsyncReadExt as _;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        });
        read.await.unwrap_or(false)
    }

    async fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
        use tokio::io::AsyncWriteExt as _;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream
    }

    #[tokio::test]
    async fn a_session_opens_one_connection_for_its_peer_and_key() {
        let (echo, server, task, addr) = server().await;
        let peer = PeerId::random();
        let key = BulkKey([7; 32]);
        let session = session_of(server.open(peer, key.clone()));
        let mut conn = BulkConn::connect(addr, session, &key).await.unwrap();
        let data = Bytes::from(vec![5u8; 300_000]);
        let put = Request::Put {
            score: Score::of(&data),
            data: data.clone(),
        };
        assert_eq!(conn.call(&put).await.unwrap(), Response::Stored);
        let get = Request::Get {
            score: Score::of(&data),
        };
        assert_eq!(
            conn.call(&get).await.unwrap(),
            Response::Block { data: data.clone() }
        );
        assert_eq!(lock(&echo.last).as_ref().unwrap().0, peer);
        // A bulk connection cannot open another.
        let nested = Request::Bulk { key: key.clone() };
        assert!(matches!(
            conn.call(&nested).await.unwrap(),
            Response::Error(ErrorCode::BadRequest(_))
        ));
        // The session is spent: a second connection with it is closed unheard.
        let calls = echo.calls.load(Ordering::SeqCst);
        let mut again = BulkConn::connect(addr, session, &key).await.unwrap();
        assert!(again.call(&get).await.is_err());
        assert_eq!(echo.calls.load(Ordering::SeqCst), calls);
        task.stop().await;
    }

    #[tokio::test]
    async fn strangers_and_forgers_are_closed_unheard() {
        let (echo, server, task, addr) = server().await;
        let key = BulkKey([9; 32]);

        // An unknown session.
        let mut s = raw(addr, &[1; SESSION_LEN]).await;
        assert!(closed(&mut s).await);

        // A known session, then bytes that are no record of its key.
        let session = session_of(server.open(PeerId::random(), key.clone()));
        let mut garbage = session.to_vec();
        garbage.extend_from_slice(&100u32.to_le_bytes());
        garbage.extend_from_slice(&[0xAB; 100]);
        let mut s = raw(addr, &garbage).await;
        assert!(closed(&mut s).await);

        // A record sealed with another key.
        let session = session_of(server.open(PeerId::random(), key.clone()));
        let mut forged = BulkConn::connect(addr, session, &BulkKey([10; 32]))
            .await
            .unwrap();
        assert!(forged.call(&Request::Space).await.is_err());

        // A length beyond the limit, and a record cut short.
        for tail in [
            (u32::MAX).to_le_bytes().to_vec(),
            [1000u32.to_le_bytes().as_slice(), &[0; 10]].concat(),
        ] {
            let session = session_of(server.open(PeerId::random(), key.clone()));
            let mut s = raw(addr, &[session.as_slice(), &tail].concat()).await;
            if tail.len() > 4 {
                use tokio::io::AsyncWriteExt as _;
                s.shutdown().await.unwrap();
            }
            assert!(closed(&mut s).await);
        }
        assert_eq!(echo.calls.load(Ordering::SeqCst), 0);

        // The listener still serves an honest client after all that.
        let session = session_of(server.open(PeerId::random(), key.clone()));
        let mut conn = BulkConn::connect(addr, session, &key).await.unwrap();
        let data = Bytes::from_static(b"still here");
        let put = Request::Put {
            score: Score::of(&data),
            data,
        };
        assert_eq!(conn.call(&put).await.unwrap(), Response::Stored);
        task.stop().await;
    }

    #[test]
    fn long_frames_go_as_several_records_that_open_only_whole() {
        futures::executor::block_on(async {
            let key = BulkKey([5; 32]);
            let data: Vec<u8> = (0..3 * PIECE + 1234).map(|i| (i % 251) as u8).collect();
            let frame = || {
                (
                    vec![0, 0, 0, 0, proto::VERSION, 7],
                    Bytes::from(data.clone()),
                )
            };
            let mut wire = Vec::new();
            let mut send = Cipher::new(&key, Direction::ToHolder).unwrap();
            write_frame(&mut wire, &mut send, frame()).await.unwrap();
            write_frame(&mut wire, &mut send, frame()).await.unwrap();
            // Four records a frame, the first three marked "more".
            let mut at = 0;
            let mut words = Vec::new();
            while at < wire.len() {
                let word = u32::from_le_bytes(wire[at..at + 4].try_into().unwrap());
                words.push(word & MORE != 0);
                at += LEN_PREFIX + (word & !MORE) as usize;
            }
            assert_eq!(words, [true, true, true, false, true, true, true, false]);

            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(wire.clone());
            for _ in 0..2 {
                let body = read_frame(&mut io, &mut recv, Vec::new())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(&body[..2], &[proto::VERSION, 7]);
                assert_eq!(&body[2..], &data[..]);
            }
            assert!(
                read_frame(&mut io, &mut recv, Vec::new())
                    .await
                    .unwrap()
                    .is_none()
            );

            // A stream that ends after a record marked "more" is cut, not done.
            let first = LEN_PREFIX + PIECE + TAG_LEN;
            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(wire[..first].to_vec());
            let cut = read_frame(&mut io, &mut recv, Vec::new())
                .await
                .unwrap_err();
            assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);

            // Clearing "more" to end the frame early fails to open: the word is
            // associated data.
            let mut early = wire.clone();
            early[3] &= 0x7f;
            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(early);
            assert!(read_frame(&mut io, &mut recv, Vec::new()).await.is_err());

            // A record longer than a piece is refused before it is read.
            let mut long = Vec::new();
            long.extend_from_slice(&((PIECE + TAG_LEN + 1) as u32).to_le_bytes());
            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(long);
            let err = read_frame(&mut io, &mut recv, Vec::new())
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        });
    }

    #[test]
    fn records_open_only_in_order_and_direction() {
        futures::executor::block_on(async {
            let key = BulkKey([4; 32]);
            let frame = |n: u8| (vec![0, 0, 0, 0, proto::VERSION, n], Bytes::new());
            let mut wire = Vec::new();
            let mut send = Cipher::new(&key, Direction::ToHolder).unwrap();
            write_frame(&mut wire, &mut send, frame(1)).await.unwrap();
            write_frame(&mut wire, &mut send, frame(2)).await.unwrap();
            let first_len = LEN_PREFIX + 2 + TAG_LEN;

            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(wire.clone());
            let a = read_frame(&mut io, &mut recv, Vec::new())
                .await
                .unwrap()
                .unwrap();
            let b = read_frame(&mut io, &mut recv, Vec::new())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                (&a[..], &b[..]),
                (&[proto::VERSION, 1][..], &[proto::VERSION, 2][..])
            );
            assert!(
                read_frame(&mut io, &mut recv, Vec::new())
                    .await
                    .unwrap()
                    .is_none()
            );

            // The second record first (a reorder or a replay) does not open.
            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(wire[first_len..].to_vec());
            assert!(read_frame(&mut io, &mut recv, Vec::new()).await.is_err());

            // Nor does a record reflected back in the other direction.
            let mut recv = Cipher::new(&key, Direction::ToClient).unwrap();
            let mut io = std::io::Cursor::new(wire.clone());
            assert!(read_frame(&mut io, &mut recv, Vec::new()).await.is_err());

            // Nor one with a flipped bit.
            let mut bent = wire.clone();
            bent[LEN_PREFIX + 1] ^= 1;
            let mut recv = Cipher::new(&key, Direction::ToHolder).unwrap();
            let mut io = std::io::Cursor::new(bent);
            assert!(read_frame(&mut io, &mut recv, Vec::new()).await.is_err());
        });
    }
}
