//! Loopback throughput of block puts, for a quick look (not a timed test):
//!
//!   cargo test --release -p fincrypt-net --test throughput -- --ignored --nocapture
//!
//! Prints MB/s for 4 MiB puts with several in flight, to a handler that only
//! checks the score (the network and protocol cost) and to a real holder (plus
//! the durable write), over TCP and over QUIC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fincrypt_blockstore::{LocalStore, Score, StoreOptions};
use fincrypt_net::codec::InboundRequest;
use fincrypt_net::{Handler, Holder, Multiaddr, Node, NodeConfig, PeerId, Request, Response};
use futures::future::BoxFuture;
use libp2p::multiaddr::Protocol;

const BLOCK: usize = 4 << 20;
const BLOCKS: usize = 48;
const IN_FLIGHT: usize = 8;

/// Checks each block against its score, as a holder does, and keeps nothing.
struct Sink;

impl Handler for Sink {
    fn handle(&self, _: PeerId, request: InboundRequest) -> BoxFuture<'static, Response> {
        Box::pin(async move {
            match request {
                Ok(Request::Put { score, data }) => {
                    let ok = tokio::task::spawn_blocking(move || Score::of(&data) == score)
                        .await
                        .unwrap_or(false);
                    if ok {
                        Response::Stored
                    } else {
                        Response::Error(fincrypt_net::ErrorCode::ScoreMismatch)
                    }
                }
                _ => Response::Error(fincrypt_net::ErrorCode::Unavailable),
            }
        })
    }
}

async fn measure(label: &str, listen: &str, handler: Arc<dyn Handler>) {
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.listen = vec![listen.parse::<Multiaddr>().unwrap()];
    let target = Node::start(config, Some(handler)).await.unwrap();
    let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
    config.bootstrap = vec![
        target.listen_addrs()[0]
            .clone()
            .with(Protocol::P2p(target.peer_id())),
    ];
    let sender = Node::start(config, None).await.unwrap();
    let client = sender.client();
    let blocks: Vec<(Score, Bytes)> = (0..BLOCKS)
        .map(|i| {
            let data: Vec<u8> = (0..BLOCK)
                .map(|j| (j as u32).wrapping_mul(2_654_435_761).rotate_left(i as u32) as u8)
                .collect();
            (Score::of(&data), Bytes::from(data))
        })
        .collect();
    // Warm the connection up.
    client
        .put(target.peer_id(), blocks[0].0, blocks[0].1.clone())
        .await
        .unwrap();
    let start = Instant::now();
    let peer = target.peer_id();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for (score, data) in blocks.iter().skip(1).cloned() {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.put(peer, score, data).await;
            drop(permit);
            r
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = ((BLOCKS - 1) * BLOCK) as f64 / 1e6;
    println!("{label}: {:.0} MB/s ({mb:.0} MB in {secs:.2} s)", mb / secs);
    sender.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn put_throughput_on_loopback() {
    let run = tokio::time::timeout(Duration::from_secs(600), async {
        measure(
            "tcp  -> score check only",
            "/ip4/127.0.0.1/tcp/0",
            Arc::new(Sink),
        )
        .await;
        measure(
            "quic -> score check only",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            Arc::new(Sink),
        )
        .await;
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(LocalStore::open(&dir.path().join("held"), StoreOptions::default()).unwrap());
        let holder = Holder::open(store, &dir.path().join("placements.redb"), u64::MAX).unwrap();
        measure(
            "tcp  -> holder (durable)",
            "/ip4/127.0.0.1/tcp/0",
            Arc::new(holder),
        )
        .await;
    });
    run.await.expect("measurement took too long");
}
