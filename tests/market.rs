//! A storage node that charges, on real daemons: it answers with an offer
//! its key signed, takes blocks only from owners with a contract, takes
//! contracts only on its terms, keeps them across a restart, and gets its
//! payout address from its Bitcoin node's wallet (a real regtest node).

mod common;
#[path = "common/regtest.rs"]
mod regtest;

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A period of a few seconds, for the owner and its holders alike.
const PERIOD: &str = "4";

/// `fincryptctl ARGS --json` of `home`'s daemon, parsed.
fn ctl_json(home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ctl_ok(home, &all);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?} JSON {out:?}: {e}"))
}

/// Mines a block every second until dropped, as a network would (a wallet
/// spends only confirmed coins, and each settlement's change is new).
struct Miner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Miner {
    fn start(bitcoin: &std::sync::Arc<regtest::Regtest>) -> Miner {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, s) = (bitcoin.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                rt.block_on(b.mine(1));
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        Miner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_owner_contracts_the_cheapest_holders_and_pays_each_proven_period_in_one_transaction() {
    let bitcoin = std::sync::Arc::new(regtest::Regtest::start());
    let env = bitcoin.env.clone();
    // Satoshis per GiB per period. The 10/20/50 (max 30) scaled by
    // 10,000: test-sized data at 10 sats per GiB would be due 0 sats a
    // period, and an output under 546 sats is dust no node relays.
    let prices = [100_000u64, 200_000, 500_000];
    let homes: Vec<tempfile::TempDir> = prices
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let mut nodes: Vec<Served> = prices
        .iter()
        .zip(&homes)
        .map(|(price, home)| {
            let price = price.to_string();
            serve_with(
                home.path(),
                &[
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--capacity",
                    "1GiB",
                    "--price",
                    &price,
                ],
                |cmd| {
                    cmd.envs(env.clone()).env("FINCRYPT_PERIOD", PERIOD);
                },
            )
        })
        .collect();
    let payouts: Vec<String> = nodes
        .iter_mut()
        .map(|n| {
            let line = n
                .said(|l| l.contains("paid to"))
                .expect("the payout address is said");
            line.rsplit(' ').next().unwrap().to_owned()
        })
        .collect();

    let mut owner_env: Vec<(String, String)> = env.clone();
    for (k, v) in [
        ("FINCRYPT_PERIOD", PERIOD),
        ("FINCRYPT_MAX_PRICE", "300000"),
        ("FINCRYPT_REDUNDANCY", "2"),
        ("FINCRYPT_REPLICATE_INTERVAL", "1"),
        // Nothing new to place once the file is: the bytes held stay put.
        ("FINCRYPT_SNAPSHOT_INTERVAL", "0"),
        ("FINCRYPT_PUBLISH_INTERVAL", "0"),
    ] {
        owner_env.push((k.into(), v.into()));
    }
    let mut opts = mount_opts(&nodes, &[]);
    opts.env = owner_env;
    let m = Mount::start_with(init_home(), opts);
    let _miner = Miner::start(&bitcoin);
    std::fs::write(m.path().join("data"), random_bytes(7, 8 << 20)).unwrap();

    // The two nodes within max_price take every block of ours, under contract; the third none.
    let held = |i: usize| number(&status(homes[i].path()), "held_bytes");
    let mut last = (0, 0);
    let mut steady_since = std::time::Instant::now();
    wait_until(
        "the file placed on the two cheaper nodes",
        Duration::from_secs(120),
        || {
            let now = (held(0), held(1));
            if now != last {
                last = now;
                steady_since = std::time::Instant::now();
            }
            now.0 >= 8 << 20 && now.1 >= 8 << 20 && steady_since.elapsed() > Duration::from_secs(3)
        },
    );
    let st = status(m.home());
    assert_eq!(number(&st, "contracts"), 2, "{st}");
    assert!(
        st["market_note"]
            .as_str()
            .unwrap()
            .contains("1 over max_price"),
        "the dear node is named as skipped: {st}"
    );
    let dear = status(homes[2].path());
    assert_eq!(
        (number(&dear, "held_blocks"), number(&dear, "contracts")),
        (0, 0),
        "{dear}"
    );
    for h in &homes[..2] {
        assert_eq!(number(&status(h.path()), "contracts"), 1);
    }
    let bytes = [held(0), held(1)];
    let offers = ctl_json(m.home(), &["market", "offers"]);
    assert_eq!(offers.as_array().unwrap().len(), 3, "{offers}");

    // Several periods later: each holder paid price x GiB held for each
    // period, to the satoshi, and each settlement is one transaction.
    let peer_of = |i: usize| {
        status(homes[i].path())["peer_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let peers = [peer_of(0), peer_of(1)];
    let due = |i: usize| ((prices[i] as u128 * bytes[i] as u128) >> 30) as u64;
    let paid_periods = |w: &serde_json::Value, i: usize| {
        w["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == peers[i].as_str() && p["sats"].as_u64() == Some(due(i)))
            .count()
    };
    let mut wallet = serde_json::Value::Null;
    wait_until(
        "three periods paid to each holder at its price",
        Duration::from_secs(120),
        || {
            wallet = ctl_json(m.home(), &["wallet"]);
            paid_periods(&wallet, 0) >= 3 && paid_periods(&wallet, 1) >= 3
        },
    );
    let payments = wallet["payments"].as_array().unwrap().clone();
    let mut seen = std::collections::HashSet::new();
    let mut by_tx: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for p in &payments {
        let key = (
            p["contract"].as_str().unwrap().to_owned(),
            p["period"].as_u64().unwrap(),
        );
        assert!(seen.insert(key), "a period paid twice: {wallet}");
        let i = peers
            .iter()
            .position(|x| p["holder"] == x.as_str())
            .expect("a contracted holder");
        by_tx
            .entry(p["txid"].as_str().unwrap().to_owned())
            .or_default()
            .push(i);
    }
    assert!(
        by_tx
            .values()
            .any(|who| who.contains(&0) && who.contains(&1)),
        "one transaction pays both holders: {by_tx:?}"
    );
    for (i, p) in payouts.iter().enumerate().take(2) {
        let contracts = ctl_json(m.home(), &["market", "contracts"]);
        let c = contracts
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["holder"] == peers[i].as_str())
            .unwrap_or_else(|| panic!("a contract with holder {i}: {contracts}"));
        assert_eq!(c["bytes"].as_u64(), Some(bytes[i]), "{c}");
        assert_eq!(c["price"].as_u64(), Some(prices[i]), "{c}");
        assert_eq!(c["periods_failed"].as_u64(), Some(0), "{c}");
        assert!(!p.is_empty());
    }

    // Each holder's wallet received exactly what the owner says it paid,
    // in confirmed transactions once a block is mined.
    // (`wallet` was read before: later settlements may not be mined yet.)
    drop(_miner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bitcoin.mine(1));
    for i in 0..2 {
        let sent: u64 = wallet["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == peers[i].as_str())
            .map(|p| p["sats"].as_u64().unwrap())
            .sum();
        let txids: std::collections::BTreeSet<&str> = wallet["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == peers[i].as_str())
            .map(|p| p["txid"].as_str().unwrap())
            .collect();
        let income = ctl_json(homes[i].path(), &["wallet"]);
        let got: Vec<&serde_json::Value> = income["income"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| txids.contains(r["txid"].as_str().unwrap()))
            .collect();
        assert_eq!(got.len(), txids.len(), "every payment arrived: {income}");
        assert_eq!(
            got.iter().map(|r| r["sats"].as_u64().unwrap()).sum::<u64>(),
            sent,
            "{income}"
        );
        assert!(
            got.iter()
                .all(|r| r["confirmations"].as_i64().unwrap() >= 1),
            "{income}"
        );
    }
    drop(m);
}
