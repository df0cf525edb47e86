//! A storage node that charges, on real daemons: it answers with an offer
//! its key signed, takes blocks only from owners with a contract, takes
//! contracts only on its terms, keeps them across a restart, and gets its
//! payout address from its Bitcoin node's wallet (a real regtest node).

mod common;
#[path = "common/regtest.rs"]
mod regtest;

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use fincrypt_blockstore::Score;
use fincrypt_market::contract::{CONTRACT_VERSION, Contract, Terms};
use fincrypt_market::offer::SignedOffer;
use fincrypt_net::{Client, ErrorCode, Keypair, Multiaddr, Node, NodeConfig, PeerId};

/// An owner's node in this process, connected to `addr`'s node.
async fn owner_node(keypair: &Keypair, addr: &str) -> (Node, Client, PeerId) {
    let node = Node::start(NodeConfig::new(keypair.clone()), None)
        .await
        .unwrap();
    let client = node.client();
    let peer = client
        .dial(Multiaddr::from_str(addr).unwrap())
        .await
        .unwrap();
    (node, client, peer)
}

/// A contract id no other test uses.
fn new_id() -> [u8; 16] {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    random_bytes(nanos ^ n, 16).try_into().unwrap()
}

fn terms(owner: &Keypair, holder: PeerId, price: u64, payout: &str) -> Terms {
    Terms {
        version: CONTRACT_VERSION,
        id: new_id(),
        owner: owner.public().to_peer_id().to_bytes(),
        holder: holder.to_bytes(),
        price,
        start: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        min_duration: 24,
        period: 3600,
        payout: payout.into(),
    }
}

fn refusal(e: fincrypt_net::Error) -> ErrorCode {
    match e {
        fincrypt_net::Error::Refused { code, .. } => code,
        other => panic!("refused with a code, not {other}"),
    }
}

#[test]
fn a_priced_node_offers_signed_terms_and_stores_only_under_contract() {
    let home = tempfile::tempdir().unwrap();
    let payout = "mj6mz6RpsSEJPmG1zzEf8nu3J9oV6ihxfB";
    let args = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--capacity",
        "1GiB",
        "--price",
        "20",
        "--min-duration",
        "12",
        "--payout-address",
        payout,
    ];
    let node = serve(home.path(), &args);
    let said = node
        .said(|l| l.contains("sats per GiB"))
        .expect("the price is said");
    assert!(
        said.contains("at 20 sats per GiB per period") && said.contains(payout),
        "{said}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let owner = Keypair::generate_ed25519();
    let block = Bytes::from(random_bytes(1, 10_000));
    let score = Score::of(&block);
    let addr = node.addr.clone();
    let holder = rt.block_on(async {
        let (_n, client, holder) = owner_node(&owner, &addr).await;
        // The offer: signed by the node it names, on its terms.
        let offer = SignedOffer::decode(&client.offer(holder).await.unwrap()).unwrap();
        assert_eq!(offer.offer.peer().unwrap(), holder);
        assert_eq!((offer.offer.price, offer.offer.min_duration), (20, 12));
        assert_eq!(offer.offer.payout, payout);
        assert!(offer.offer.room > 0 && offer.offer.room <= 1 << 30);

        // No contract: no room, and no block.
        let space = client.space(holder).await.unwrap();
        assert_eq!(space.capacity, space.used, "no room without a contract");
        let e = client.put(holder, score, block.clone()).await.unwrap_err();
        assert_eq!(refusal(e), ErrorCode::NoContract { price: 20 });

        // Terms below the node's are refused, with the reason.
        for (price, min, pay, period, why) in [
            (19, 24, payout, 3600, "this node asks 20"),
            (20, 6, payout, 3600, "takes 12 at least"),
            (
                20,
                24,
                "mvUT3XQBnLwUpHeZD8Zjde9TVX9HyYhx2Q",
                3600,
                "another address",
            ),
            (20, 24, payout, 36_000, "price is per 3600 s"),
        ] {
            let mut t = terms(&owner, holder, price, pay);
            t.min_duration = min;
            t.period = period;
            let p = t.propose(&owner).unwrap().encode().unwrap();
            let e = client.propose(holder, Bytes::from(p)).await.unwrap_err();
            let code = refusal(e);
            assert!(
                matches!(&code, ErrorCode::Refused(w) if w.contains(why)),
                "{code:?} for {why}"
            );
        }
        let e = client.put(holder, score, block.clone()).await.unwrap_err();
        assert_eq!(refusal(e), ErrorCode::NoContract { price: 20 });

        // On its terms: both signed, and the owner's blocks are taken.
        let t = terms(&owner, holder, 25, payout);
        let p = t.clone().propose(&owner).unwrap().encode().unwrap();
        let c = Contract::decode(&client.propose(holder, Bytes::from(p)).await.unwrap()).unwrap();
        assert_eq!(c.terms, t);
        let space = client.space(holder).await.unwrap();
        assert!(space.capacity > space.used, "room under contract");
        client.put(holder, score, block.clone()).await.unwrap();
        assert_eq!(client.get(holder, score).await.unwrap(), block);
        // One contract per owner.
        let p = terms(&owner, holder, 30, payout).propose(&owner).unwrap();
        let e = client
            .propose(holder, Bytes::from(p.encode().unwrap()))
            .await
            .unwrap_err();
        assert!(matches!(refusal(e), ErrorCode::Refused(w) if w.contains("already has")));

        // Another owner still has none.
        let stranger = Keypair::generate_ed25519();
        let (_s, other, _) = owner_node(&stranger, &addr).await;
        let e = other.put(holder, score, block.clone()).await.unwrap_err();
        assert_eq!(refusal(e), ErrorCode::NoContract { price: 20 });
        holder
    });

    // status counts it.
    let st = status(home.path());
    assert_eq!(
        (number(&st, "price"), number(&st, "contracts")),
        (20, 1),
        "{st}"
    );

    // The contract outlives a restart.
    let (status, _) = node.stop();
    assert!(status.success());
    let node = serve(home.path(), &args);
    let addr = node.addr.clone();
    rt.block_on(async {
        let (_n, client, again) = owner_node(&owner, &addr).await;
        assert_eq!(again, holder);
        let other = Bytes::from(random_bytes(2, 5_000));
        client.put(holder, Score::of(&other), other).await.unwrap();
    });
    drop(node);
}

/// A storage node asking 5 sats per GiB per period, with no payout address.
const FIVE_SATS: &[&str] = &[
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--capacity",
    "1GiB",
    "--price",
    "5",
];

#[test]
fn a_price_with_nowhere_to_be_paid_is_refused_and_a_wallet_gives_the_address() {
    // Neither an address nor a wallet: refused before anything starts.
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fincrypt"))
        .arg("--home")
        .arg(home.path())
        .arg("serve")
        .args(FIVE_SATS)
        .env_remove("FINCRYPT_BITCOIN_RPC_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a price needs somewhere to be paid"), "{err}");
    assert!(
        !home.path().join("held").exists(),
        "nothing was created: {err}"
    );

    // A bad secret is named, never shown.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fincrypt"))
        .arg("--home")
        .arg(home.path())
        .arg("serve")
        .args(FIVE_SATS)
        .env("FINCRYPT_BITCOIN_RPC_URL", "http://127.0.0.1:9")
        .env("FINCRYPT_BITCOIN_RPC_USER", "u")
        .env("FINCRYPT_BITCOIN_RPC_PASSWORD", "9817265")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("FINCRYPT_BITCOIN_RPC_PASSWORD") && !err.contains("9817265"),
        "{err}"
    );

    // With a wallet: a new address of it.
    let bitcoin = regtest::Regtest::start();
    let env = bitcoin.env.clone();
    let home = tempfile::tempdir().unwrap();
    let node = serve_with(home.path(), FIVE_SATS, |cmd| {
        cmd.envs(env);
    });
    let said = node
        .said(|l| l.contains("paid to"))
        .expect("the address is said");
    let address = said.rsplit(' ').next().unwrap().to_owned();
    let info: serde_json::Value =
        serde_json::from_str(&bitcoin.cli(&["validateaddress", &address])).unwrap();
    assert_eq!(info["ismine"], true, "{address} is the wallet's: {info}");

    // A free node stores for anyone; its signed offer asks nothing.
    let free_home = tempfile::tempdir().unwrap();
    let free = serve(
        free_home.path(),
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "1GiB"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let owner = Keypair::generate_ed25519();
        let (_n, client, peer) = owner_node(&owner, &free.addr).await;
        let offer = SignedOffer::decode(&client.offer(peer).await.unwrap()).unwrap();
        assert_eq!(offer.offer.price, 0);
        let block = Bytes::from(random_bytes(3, 3_000));
        client.put(peer, Score::of(&block), block).await.unwrap();
    });
    drop(node);
}
