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
use fincrypt_market::notice::{NOTICE_VERSION, PaidNotice};
use fincrypt_market::offer::SignedOffer;
use fincrypt_market::wallet::Payments;
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
        carry: 1000,
        payer: Vec::new(),
        consent: None,
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

        // A payment notice is taken from the contract's payer (here its
        // owner) alone, and only for a period that has begun.
        let notice = |period: u64| {
            let n = PaidNotice {
                version: NOTICE_VERSION,
                contract: c.terms.id,
                txid: "ab".repeat(32),
                items: vec![(period, 1_000)],
            };
            Bytes::from(n.encode().unwrap())
        };
        let e = other.paid(holder, notice(0)).await.unwrap_err();
        assert!(matches!(refusal(e), ErrorCode::Refused(w) if w.contains("pays the contract")));
        let e = client.paid(holder, notice(5)).await.unwrap_err();
        assert!(matches!(refusal(e), ErrorCode::Refused(w) if w.contains("not begun")));
        let e = client
            .paid(holder, Bytes::from_static(b"\x01garbage"))
            .await
            .unwrap_err();
        assert!(matches!(refusal(e), ErrorCode::Refused(_)));
        client.paid(holder, notice(0)).await.unwrap();
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

    // An owner with no wallet places on the free node only, and says why
    // it passed the priced one by.
    let nodes = [node, free];
    let m = Mount::start_with(
        init_home(),
        mount_opts(&nodes, &[("FINCRYPT_REPLICATE_INTERVAL", "1")]),
    );
    std::fs::write(m.path().join("f"), random_bytes(4, 100_000)).unwrap();
    wait_until("a block on the free node", Duration::from_secs(60), || {
        number(&status(free_home.path()), "held_blocks") > 0
    });
    wait_until(
        "the priced node named as skipped",
        Duration::from_secs(60),
        || {
            status(m.home())["market_note"]
                .as_str()
                .unwrap()
                .contains("1 priced, and no wallet is configured")
        },
    );
    let priced = status(home.path());
    assert_eq!(
        (number(&priced, "held_blocks"), number(&priced, "contracts")),
        (0, 0),
        "{priced}"
    );
    drop(m);
    drop(nodes);
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

/// Three priced storage nodes, an owner mounted over them with
/// `max_price` between the second and third prices and redundancy 2, a real regtest node paying, and a
/// file of 8 MiB placed.
struct Paid {
    bitcoin: std::sync::Arc<regtest::Regtest>,
    /// Satoshis per GiB per period. The 10/20/50 (max 30) scaled by
    /// 10,000: test-sized data at 10 sats per GiB would be due 0 sats a
    /// period, and an output under 546 sats is dust no node relays.
    prices: [u64; 3],
    homes: Vec<tempfile::TempDir>,
    nodes: Vec<Served>,
    peers: Vec<String>,
    owner_env: Vec<(String, String)>,
    /// The owner's mount (`None` only while it restarts).
    mount: Option<Mount>,
    /// Addresses of another regtest node's wallet: outside the owner's.
    outside: Vec<String>,
    _other: regtest::Regtest,
}

/// How a [`Paid`] network differs from the plain one.
struct Setup<'a> {
    /// Settings of the owner.
    owner: &'a [(&'a str, &'a str)],
    /// Settings of every storage node.
    nodes: &'a [(&'a str, &'a str)],
    /// More arguments of each storage node's `serve`.
    node_args: [&'a [&'a str]; 3],
    prices: [u64; 3],
    /// The two cheaper nodes are paid to addresses outside the wallet, so
    /// that payments lower its balance.
    pay_outside: bool,
    /// The owner pays from the other regtest node's wallet: on a chain the
    /// storage nodes' wallet never sees.
    owner_elsewhere: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            owner: &[],
            nodes: &[],
            node_args: [&[], &[], &[]],
            prices: [100_000, 200_000, 500_000],
            pay_outside: false,
            owner_elsewhere: false,
        }
    }
}

impl Paid {
    fn start(owner: &[(&str, &str)]) -> Paid {
        Paid::start_with(Setup {
            owner,
            ..Setup::default()
        })
    }

    /// The owner's `max_price` lies between the second and the third price.
    fn start_with(setup: Setup) -> Paid {
        let Setup {
            owner: extra,
            nodes: node_env,
            node_args,
            prices,
            pay_outside,
            owner_elsewhere,
        } = setup;
        let bitcoin = std::sync::Arc::new(regtest::Regtest::start());
        let env = bitcoin.env.clone();
        let other = regtest::Regtest::start();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let outside: Vec<String> = (0..3)
            .map(|_| rt.block_on(other.wallet().new_address()).unwrap())
            .collect();
        let homes: Vec<tempfile::TempDir> = prices
            .iter()
            .map(|_| tempfile::tempdir().unwrap())
            .collect();
        let nodes: Vec<Served> = prices
            .iter()
            .zip(&homes)
            .enumerate()
            .map(|(i, (price, home))| {
                let price = price.to_string();
                let mut args = vec![
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--capacity",
                    "1GiB",
                    "--price",
                    &price,
                ];
                if pay_outside && i < 2 {
                    args.extend(["--payout-address", outside[i + 1].as_str()]);
                }
                args.extend(node_args[i]);
                serve_with(home.path(), &args, |cmd| {
                    cmd.envs(env.clone())
                        .env("FINCRYPT_PERIOD", PERIOD)
                        .envs(node_env.iter().copied());
                })
            })
            .collect();
        let peers = homes
            .iter()
            .map(|h| status(h.path())["peer_id"].as_str().unwrap().to_owned())
            .collect();
        let max_price = ((prices[1] + prices[2]) / 2).to_string();
        let mut owner_env: Vec<(String, String)> = if owner_elsewhere {
            other.env.clone()
        } else {
            env.clone()
        };
        for (k, v) in [
            ("FINCRYPT_PERIOD", PERIOD),
            ("FINCRYPT_MAX_PRICE", max_price.as_str()),
            ("FINCRYPT_REDUNDANCY", "2"),
            ("FINCRYPT_REPLICATE_INTERVAL", "1"),
            // Nothing new to place once the file is: the bytes held stay put.
            ("FINCRYPT_SNAPSHOT_INTERVAL", "0"),
            ("FINCRYPT_PUBLISH_INTERVAL", "0"),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            owner_env.retain(|(key, _)| key != k);
            owner_env.push((k.into(), v.into()));
        }
        let mut opts = mount_opts(&nodes, &[]);
        opts.env = owner_env.clone();
        let m = Mount::start_with(init_home(), opts);
        std::fs::write(m.path().join("data"), random_bytes(7, 8 << 20)).unwrap();
        // Durable, so that a daemon killed later still has it.
        ctl_ok(m.home(), &["sync"]);
        let p = Paid {
            bitcoin,
            prices,
            homes,
            nodes,
            peers,
            owner_env,
            mount: Some(m),
            outside,
            _other: other,
        };
        // The two nodes within max_price take every block of ours, under contract.
        wait_steady(
            "the file placed on the two cheaper nodes",
            Duration::from_secs(120),
            || (p.held(0), p.held(1)),
            |now| now.0 >= 8 << 20 && now.1 >= 8 << 20,
        );
        p
    }

    fn m(&self) -> &Mount {
        self.mount.as_ref().unwrap()
    }

    /// Unmounts the owner and mounts it again with `env` added.
    fn restart_owner(&mut self, env: &[(&str, &str)]) {
        let home = self.mount.take().unwrap().unmount();
        for (k, v) in env {
            self.owner_env.retain(|(key, _)| key != k);
            self.owner_env.push((k.to_string(), v.to_string()));
        }
        self.mount = Some(Mount::start_with(home, self.owner_opts()));
    }

    /// How the owner is mounted: bootstrapped to the nodes, with its settings.
    fn owner_opts(&self) -> StartOptions {
        let mut opts = mount_opts(&self.nodes, &[]);
        opts.env = self.owner_env.clone();
        opts
    }

    fn held(&self, i: usize) -> u64 {
        number(&status(self.homes[i].path()), "held_bytes")
    }

    /// What one period of holder `i` holding `bytes` costs.
    fn due(&self, i: usize, bytes: u64) -> u64 {
        ((self.prices[i] as u128 * bytes as u128) >> 30) as u64
    }

    /// Payments to holder `i` in the owner's `wallet --json`.
    fn payments<'a>(&self, wallet: &'a serde_json::Value, i: usize) -> Vec<&'a serde_json::Value> {
        wallet["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == self.peers[i].as_str())
            .collect()
    }

    /// The owner's contract with holder `i`.
    fn contract(&self, i: usize) -> serde_json::Value {
        let contracts = ctl_json(self.m().home(), &["market", "contracts"]);
        contracts
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["holder"] == self.peers[i].as_str())
            .unwrap_or_else(|| panic!("a contract with holder {i}: {contracts}"))
            .clone()
    }
}

#[test]
fn an_owner_contracts_the_cheapest_holders_and_pays_each_proven_period_in_one_transaction() {
    let p = Paid::start(&[]);
    let _miner = regtest::Miner::start(&p.bitcoin, &p.outside[0]);
    let (homes, m, peers, prices) = (&p.homes, p.m(), &p.peers, p.prices);
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
    let bytes = [p.held(0), p.held(1)];
    let offers = ctl_json(m.home(), &["market", "offers"]);
    assert_eq!(offers.as_array().unwrap().len(), 3, "{offers}");

    // Several periods later: each holder paid price x GiB held for each
    // period, to the satoshi, and each settlement is one transaction.
    let due = |i: usize| p.due(i, bytes[i]);
    let paid_periods = |w: &serde_json::Value, i: usize| {
        p.payments(w, i)
            .iter()
            .filter(|x| x["sats"].as_u64() == Some(due(i)))
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
    for x in &payments {
        let key = (
            x["contract"].as_str().unwrap().to_owned(),
            x["period"].as_u64().unwrap(),
        );
        assert!(seen.insert(key), "a period paid twice: {wallet}");
        let i = peers
            .iter()
            .position(|h| x["holder"] == h.as_str())
            .expect("a contracted holder");
        assert!(i < 2, "only the two cheaper nodes are paid: {wallet}");
        by_tx
            .entry(x["txid"].as_str().unwrap().to_owned())
            .or_default()
            .push(i);
    }
    assert!(
        by_tx
            .values()
            .any(|who| who.contains(&0) && who.contains(&1)),
        "one transaction pays both holders: {by_tx:?}"
    );
    for i in 0..2 {
        let c = p.contract(i);
        assert_eq!(c["bytes"].as_u64(), Some(bytes[i]), "{c}");
        assert_eq!(c["price"].as_u64(), Some(prices[i]), "{c}");
        assert_eq!(c["periods_failed"].as_u64(), Some(0), "{c}");
    }

    // Each holder's wallet received exactly what the owner says it paid,
    // in confirmed transactions once a block is mined.
    // (`wallet` was read before: later settlements may not be mined yet.)
    drop(_miner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(p.bitcoin.mine(1));
    for (i, home) in homes.iter().enumerate().take(2) {
        let mine = p.payments(&wallet, i);
        let sent: u64 = mine.iter().map(|x| x["sats"].as_u64().unwrap()).sum();
        let txids: std::collections::BTreeSet<&str> =
            mine.iter().map(|x| x["txid"].as_str().unwrap()).collect();
        let income = ctl_json(home.path(), &["wallet"]);
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
        // And the holder, told by the owner which periods each paid, finds
        // them in its wallet.
        wait_until(
            "the holder counts what it was paid",
            Duration::from_secs(30),
            || {
                let c = &ctl_json(home.path(), &["market", "contracts"])[0];
                c["paid_sats"].as_u64().unwrap() >= sent
                    && c["periods_paid"].as_u64().unwrap() >= mine.len() as u64
                    && number(&status(home.path()), "earned_sats") >= sent
            },
        );
    }
    drop(p);
}

#[test]
fn a_holder_with_a_wrong_proof_is_not_paid_for_that_period_and_its_blocks_move_only_within_max_price()
 {
    let mut p = Paid::start(&[("FINCRYPT_PROOF_INTERVAL", "1")]);
    let _miner = regtest::Miner::start(&p.bitcoin, &p.outside[0]);
    wait_until(
        "a period paid to holder 1",
        Duration::from_secs(120),
        || {
            !p.payments(&ctl_json(p.m().home(), &["wallet"]), 1)
                .is_empty()
        },
    );

    // Holder 1's held blocks now hold zeros.
    assert!(
        zero_held_blocks(p.homes[1].path()) > 0,
        "holder 1 holds blocks"
    );
    // Its next challenge fails: the contract ends, that period goes unpaid,
    // and its blocks can go nowhere else within max_price.
    wait_until(
        "holder 1's contract ended and its period failed",
        Duration::from_secs(60),
        || {
            let c = p.contract(1);
            c["state"]
                .as_str()
                .unwrap()
                .starts_with("ended: a wrong proof")
                && c["periods_failed"].as_u64().unwrap() >= 1
        },
    );
    wait_until("blocks short of copies", Duration::from_secs(60), || {
        number(&status(p.m().home()), "under_replicated") > 0
    });
    let st = status(p.m().home());
    let note = st["replication"]["note"].as_str().unwrap();
    assert!(
        note.contains("1 over max_price"),
        "under_replicated says why: {note}"
    );
    let c = p.contract(1);
    let failed: Vec<u64> = c["failed_periods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let wallet = ctl_json(p.m().home(), &["wallet"]);
    for x in p.payments(&wallet, 1) {
        let period = x["period"].as_u64().unwrap();
        assert!(
            !failed.contains(&period),
            "failed period {period} paid: {wallet}"
        );
    }
    assert_eq!(number(&status(p.homes[2].path()), "held_blocks"), 0);

    // With max_price above the dear node's price, the blocks move there, under contract.
    p.restart_owner(&[("FINCRYPT_MAX_PRICE", "600000")]);
    wait_until(
        "holder 1's blocks placed on the dear node",
        Duration::from_secs(120),
        // (Metadata, which asks for 3 copies, stays one short: the ended
        // holder takes nothing.)
        || number(&status(p.homes[2].path()), "contracts") == 1 && p.held(2) >= 8 << 20,
    );
    assert_eq!(number(&status(p.m().home()), "lost"), 0);
    let c = p.contract(2);
    assert_eq!(c["price"].as_u64(), Some(p.prices[2]), "{c}");
    assert!(
        p.contract(1)["state"]
            .as_str()
            .unwrap()
            .starts_with("ended"),
        "the ended contract stays ended after a restart"
    );
    drop(p);
}

/// Payments the owner's `wallet` lists, each (contract, period) at most once.
fn paid_once(wallet: &serde_json::Value) -> usize {
    let mut seen = std::collections::HashSet::new();
    for x in wallet["payments"].as_array().unwrap() {
        let key = (
            x["contract"].as_str().unwrap().to_owned(),
            x["period"].as_u64().unwrap(),
        );
        assert!(seen.insert(key), "a period paid twice: {wallet}");
    }
    seen.len()
}

/// Waits until every period the owner's contracts with holders 0 and 1
/// passed is paid, and at least `periods` in all, each once; the owner's
/// `wallet --json`.
fn all_passed_paid_once(p: &Paid, periods: usize) -> serde_json::Value {
    wait_until(
        "every period that passed paid",
        Duration::from_secs(120),
        || {
            (0..2).all(|i| {
                let c = p.contract(i);
                c["periods_passed"] == c["periods_paid"] && c["periods_paid"].as_u64().unwrap() > 0
            })
        },
    );
    let wallet = ctl_json(p.m().home(), &["wallet"]);
    assert!(paid_once(&wallet) >= periods, "{wallet}");
    wallet
}

#[test]
fn an_owner_killed_ten_times_while_settling_pays_each_proven_period_exactly_once() {
    let mut p = Paid::start_with(Setup {
        // Ten restarts span more than a few periods of 4 s: the nodes wait.
        nodes: &[("FINCRYPT_UNPAID_PERIODS", "1000000")],
        ..Setup::default()
    });
    let _miner = regtest::Miner::start(&p.bitcoin, &p.outside[0]);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill moments from seed {seed}");
    let mut rng = Rng::new(seed);
    for _ in 0..10 {
        // A moment within the next period: settlements run five times a period.
        std::thread::sleep(Duration::from_millis(rng.range(200, 4_000)));
        let home = p.mount.take().unwrap().kill9();
        p.mount = Some(Mount::start_with(home, p.owner_opts()));
    }
    let wallet = all_passed_paid_once(&p, 2);
    // What each holder received is what the owner recorded paying it: no
    // transaction the ledger does not know of, each for the amount the
    // ledger says. (The owner's list is read after the holder's, as the
    // owner goes on paying meanwhile.)
    drop(_miner);
    for i in 0..2 {
        let income = ctl_json(p.homes[i].path(), &["wallet"]);
        let now = ctl_json(p.m().home(), &["wallet"]);
        let mut recorded: std::collections::HashMap<&str, u64> = Default::default();
        for x in p.payments(&now, i) {
            *recorded.entry(x["txid"].as_str().unwrap()).or_default() +=
                x["sats"].as_u64().unwrap();
        }
        for r in income["income"].as_array().unwrap() {
            let txid = r["txid"].as_str().unwrap();
            assert_eq!(
                recorded.get(txid).copied(),
                r["sats"].as_u64(),
                "holder {i} received {txid}: {income} against {now}"
            );
        }
        let sent: u64 = p
            .payments(&wallet, i)
            .iter()
            .map(|x| x["sats"].as_u64().unwrap())
            .sum();
        // Notices of payments made around a kill reach the holder too.
        wait_until(
            "the holder counts what it was paid",
            Duration::from_secs(60),
            || {
                ctl_json(p.homes[i].path(), &["market", "contracts"])[0]["paid_sats"]
                    .as_u64()
                    .unwrap()
                    >= sent
            },
        );
    }
    drop(p);
}

#[test]
fn a_wallet_running_low_is_said_before_payments_fail_and_nothing_is_lost() {
    // Prices at which one period of 8 MiB costs about 23 of the wallet's 50
    // coins: the balance funds two periods, then one, then none.
    let prices = [100_000_000_000, 200_000_000_000, 500_000_000_000];
    // No blocks are mined until it is funded again: each would mature one
    // more of the wallet's first coinbases.
    let mut p = Paid::start_with(Setup {
        owner: &[("FINCRYPT_MIN_PERIODS_FUNDED", "2")],
        prices,
        pay_outside: true,
        ..Setup::default()
    });
    // Paid outside their own wallet, the nodes cannot see that they are:
    // they say so, and never give up on the owner.
    let blind = |l: &str| l.contains("cannot see payments");
    if p.nodes[0].said(blind).is_none() {
        p.nodes[0].wait_for_line(
            "its note that it cannot see payments",
            Duration::from_secs(30),
            blind,
        );
    }
    wait_until("low_balance", Duration::from_secs(60), || {
        status(p.m().home())["low_balance"] == true
    });
    wait_until("a payment refused", Duration::from_secs(60), || {
        let w = ctl_json(p.m().home(), &["wallet"]);
        w["last_settlement"].as_str().unwrap().starts_with("failed")
    });
    let log = p.m().stderr();
    let warned = log
        .find("balance is low")
        .expect("the low balance is logged");
    let failed = log
        .find("refused a settlement")
        .expect("the refusal is logged");
    assert!(warned < failed, "warned before payments failed: {log}");

    // Funded again (coinbases of its own that mature): every period that
    // passed is paid, once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let address = rt.block_on(p.bitcoin.wallet().new_address()).unwrap();
    p.bitcoin.cli(&["generatetoaddress", "150", &address]);
    all_passed_paid_once(&p, 3);
    drop(p);
}

/// A storage node's view of its one contract.
fn held_contract(home: &std::path::Path) -> serde_json::Value {
    let contracts = ctl_json(home, &["market", "contracts"]);
    assert_eq!(contracts.as_array().unwrap().len(), 1, "{contracts}");
    contracts[0].clone()
}

#[test]
fn a_node_takes_nothing_new_from_an_owner_that_does_not_pay_and_releases_its_blocks_later() {
    // The owner "pays" on another chain, which the nodes' wallet never
    // sees: to them it pays nothing, whatever its notices say.
    let mut p = Paid::start_with(Setup {
        nodes: &[("FINCRYPT_UNPAID_PERIODS", "2")],
        // Node 0 keeps an owner's blocks one period after cutting it, node 1
        // a thousand.
        node_args: [&["--min-duration", "1"], &["--min-duration", "1000"], &[]],
        owner_elsewhere: true,
        ..Setup::default()
    });
    let behind = |p: &Paid, i: usize| {
        let c = held_contract(p.homes[i].path());
        (c["state"].as_str().unwrap().to_owned(), c)
    };
    wait_until("node 1 cuts the owner", Duration::from_secs(180), || {
        behind(&p, 1).0.starts_with("cut")
    });
    let (state, c) = behind(&p, 1);
    assert!(c["periods_unpaid"].as_u64().unwrap() >= 2, "{c}");
    assert!(c["owed_sats"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["periods_paid"], 0, "{c}");
    assert!(
        state.contains("not in this node's wallet"),
        "the owner's notices name transactions the wallet does not have: {state}"
    );

    // Node 0 lets the owner's blocks go one period after it cut it.
    wait_until(
        "node 0 releases the owner's blocks",
        Duration::from_secs(60),
        || behind(&p, 0).0.starts_with("released"),
    );
    assert_eq!(p.held(0), 0, "{}", behind(&p, 0).1);

    // While cut, the owner learns why, and nothing new is placed there.
    let held_before = p.held(1);
    std::fs::write(p.m().path().join("more"), random_bytes(8, 2 << 20)).unwrap();
    ctl_ok(p.m().home(), &["sync"]);
    wait_until(
        "the owner says why node 1 takes nothing",
        Duration::from_secs(60),
        || {
            let offers = ctl_json(p.m().home(), &["market", "offers"]);
            let why = offers
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["peer"] == p.peers[1].as_str())
                .map(|o| o.to_string())
                .unwrap_or_default();
            why.contains("periods unpaid") && number(&status(p.m().home()), "under_replicated") > 0
        },
    );
    assert_eq!(p.held(1), held_before, "a cut owner placed new blocks");
    let c = p.contract(1);
    assert!(
        c["state"].as_str().unwrap().contains("takes no new blocks"),
        "the owner's view of the contract says so: {c}"
    );

    // Paying from the nodes' own chain: node 1 sees the payments, takes the
    // owner back, and the new file reaches it.
    let real: Vec<(String, String)> = p.bitcoin.env.clone();
    let real: Vec<(&str, &str)> = real.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    p.restart_owner(&real);
    let _miner = regtest::Miner::start(&p.bitcoin, &p.outside[0]);
    wait_until(
        "node 1 takes the owner back once paid",
        Duration::from_secs(180),
        || behind(&p, 1).0.starts_with("active"),
    );
    let c = behind(&p, 1).1;
    assert!(c["periods_paid"].as_u64().unwrap() > 0, "{c}");
    wait_until(
        "the new file placed on node 1",
        Duration::from_secs(90),
        || p.held(1) >= held_before + (2 << 20),
    );
    drop(p);
}
