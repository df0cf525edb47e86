//! Liveness signals on real nodes: connection events and probes.
//!
//! Nothing here sleeps to synchronise: events and conditions are awaited with a deadline.

mod common;

use std::time::Duration;

use common::{holder, within};
use fincrypt_net::{Error, Keypair, Node, NodeConfig, PeerEvent, PeerId};
use tokio::sync::broadcast;

/// Repair wants to hear of a lost holder well within a minute.
const NOTICE: Duration = Duration::from_secs(10);

async fn next_about(events: &mut broadcast::Receiver<PeerEvent>, peer: PeerId) -> PeerEvent {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(e @ (PeerEvent::Connected(p) | PeerEvent::Disconnected(p))) if p == peer => {
                    return e;
                }
                Ok(_) => {}
                Err(e) => panic!("peer events ended: {e}"),
            }
        }
    };
    tokio::time::timeout(NOTICE, wait)
        .await
        .expect("no event about the peer in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_is_reported_disconnected() {
    let h = holder(vec![]).await;
    let node = Node::start(NodeConfig::new(Keypair::generate_ed25519()), None)
        .await
        .unwrap();
    let client = node.client();
    let mut events = client.peer_events();

    within(client.dial(h.addr())).await.unwrap();
    assert_eq!(
        next_about(&mut events, h.id()).await,
        PeerEvent::Connected(h.id())
    );

    let id = h.id();
    h.node.shutdown().await;
    assert_eq!(
        next_about(&mut events, id).await,
        PeerEvent::Disconnected(id)
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_times_a_live_holder_and_fails_on_a_stopped_one() {
    let h = holder(vec![]).await;
    let node = Node::start(NodeConfig::new(Keypair::generate_ed25519()), None)
        .await
        .unwrap();
    let client = node.client();
    client
        .add_address(h.id(), h.node.listen_addrs()[0].clone())
        .await
        .unwrap();

    // The first probe dials; the second rides the open connection.
    within(client.probe(h.id())).await.unwrap();
    let rtt = within(client.probe(h.id())).await.unwrap();
    assert!(
        rtt > Duration::ZERO && rtt < Duration::from_secs(10),
        "{rtt:?}"
    );

    let id = h.id();
    h.node.shutdown().await;
    let err = within(client.probe(id)).await.unwrap_err();
    assert_eq!(err.peer(), Some(id), "{err}");
    assert!(
        matches!(err, Error::Unreachable { .. } | Error::Timeout { .. }),
        "{err}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_serves_no_blocks_cannot_be_probed() {
    let asker = Node::start(NodeConfig::new(Keypair::generate_ed25519()), None)
        .await
        .unwrap();
    let mut config = NodeConfig::new(Keypair::generate_ed25519());
    config.listen = vec![common::tcp()];
    let plain = Node::start(config, None).await.unwrap();
    let addr = plain.listen_addrs()[0].clone();
    asker
        .client()
        .add_address(plain.peer_id(), addr)
        .await
        .unwrap();
    let err = within(asker.client().probe(plain.peer_id()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    asker.shutdown().await;
    plain.shutdown().await;
}
