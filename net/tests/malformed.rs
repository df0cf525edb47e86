//! A real holder fed raw bytes on the block protocol: it answers or drops the
//! stream, never crashes, and keeps serving well-formed peers afterwards.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use fincrypt_blockstore::{LocalStore, Score, StoreOptions};
use fincrypt_net::codec::PROTOCOL;
use fincrypt_net::proto::{self, ErrorCode, Response};
use fincrypt_net::{Holder, Node, NodeConfig, PeerId};
use futures::prelude::*;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, ProtocolSupport};
use libp2p::swarm::{Swarm, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, noise, tcp, yamux};

/// Writes requests verbatim and reads whatever comes back.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<Vec<u8>> {
        Err(io::Error::other("this side only asks"))
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        io.take(1 << 20).read_to_end(&mut out).await?;
        Ok(out)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&request).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Err(io::Error::other("this side only asks"))
    }
}

fn raw_swarm() -> Swarm<request_response::Behaviour<RawCodec>> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            )
        })
        .unwrap()
        .build()
}

/// Sends `bytes` as one request and drives the swarm until its outcome.
async fn send_raw(
    swarm: &mut Swarm<request_response::Behaviour<RawCodec>>,
    peer: PeerId,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, OutboundFailure> {
    let id = swarm.behaviour_mut().send_request(&peer, bytes);
    let outcome = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => return Err(error),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), outcome)
        .await
        .expect("no outcome in time")
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn answer(bytes: &[u8]) -> Response {
    proto::decode_response_frame(bytes).expect("the holder answers with a valid frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_never_crash_a_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
    let holder = Holder::open(store, &dir.path().join("placements.redb"), 1 << 30).unwrap();
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let node = Node::start(config, Some(Arc::new(holder.clone())))
        .await
        .unwrap();
    let addr: Multiaddr = node.listen_addrs()[0].clone();
    let id = node.peer_id();

    let mut raw = raw_swarm();
    raw.add_peer_address(id, addr.clone());

    // Framed garbage: a clear BadRequest.
    let got = send_raw(&mut raw, id, frame(&[proto::VERSION, 250, 250, 250, 250])).await;
    assert!(matches!(
        answer(&got.unwrap()),
        Response::Error(ErrorCode::BadRequest(_))
    ));

    // A version from the future: named as such.
    let got = send_raw(&mut raw, id, frame(&[9, 1, 2, 3])).await;
    assert_eq!(
        answer(&got.unwrap()),
        Response::Error(ErrorCode::UnsupportedVersion {
            supported: proto::VERSION
        })
    );

    // An empty body, and a valid message with bytes after it.
    let got = send_raw(&mut raw, id, frame(&[])).await;
    assert!(matches!(
        answer(&got.unwrap()),
        Response::Error(ErrorCode::BadRequest(_))
    ));
    let mut get = proto::encode_request(&proto::Request::Get {
        score: Score([0; 32]),
    })
    .unwrap();
    get.push(7);
    let len = (get.len() - proto::LEN_PREFIX) as u32;
    get[..proto::LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
    let got = send_raw(&mut raw, id, get).await;
    assert!(matches!(
        answer(&got.unwrap()),
        Response::Error(ErrorCode::BadRequest(_))
    ));

    // Oversized and truncated frames: the stream is dropped, no answer.
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[1; 64]);
    let got = send_raw(&mut raw, id, huge).await;
    assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");
    let mut short = 1000u32.to_le_bytes().to_vec();
    short.extend_from_slice(&[1; 10]);
    let got = send_raw(&mut raw, id, short).await;
    assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");
    let got = send_raw(&mut raw, id, vec![1, 2]).await;
    assert!(got.as_ref().map_or(true, |b| b.is_empty()), "{got:?}");

    // Random bytes, framed and not.
    let mut x = 0x1234_5678_9abc_def1u64;
    for round in 0..40 {
        let len = (x % 300) as usize;
        let body: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let bytes = if round % 2 == 0 { frame(&body) } else { body };
        if let Ok(reply) = send_raw(&mut raw, id, bytes).await
            && !reply.is_empty()
        {
            assert!(matches!(answer(&reply), Response::Error(_)));
        }
    }

    // The holder is still up and serving a well-formed peer.
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.bootstrap = vec![addr.with(Protocol::P2p(id))];
    let good = Node::start(config, None).await.unwrap();
    let data = bytes::Bytes::from_static(b"still serving");
    let score = Score::of(&data);
    let client = good.client();
    tokio::time::timeout(Duration::from_secs(30), client.put(id, score, data.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.get(id, score).await.unwrap(), data);
    good.shutdown().await;
    node.shutdown().await;
}
