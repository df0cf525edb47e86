//! A mediator on real daemons and a real regtest node: a client mount gets
//! one deposit address of the mediator's wallet, sees its deposit pending
//! and then in its escrow once confirmed; another client gets its own
//! address and sees only its own escrow; clients the mediator denies or
//! does not accept are told why. Three priced storage nodes and two
//! clients: the mediator places at the lowest prices, and while both
//! clients are offline audits the holders and pays them each period, for
//! both clients in one transaction, out of each client's escrow.

mod common;
#[path = "common/regtest.rs"]
mod regtest;

use std::time::Duration;

use common::*;

/// `fincryptctl ARGS --json` of `home`'s daemon, parsed.
fn ctl_json(home: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = ctl_ok(home, &all);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?} JSON {out:?}: {e}"))
}

fn start_mediator(
    home: &std::path::Path,
    bitcoin: &regtest::Regtest,
    listen: &str,
    env: &[(&str, &str)],
) -> Served {
    let extra: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    node_with(
        home,
        "mediator",
        &["--listen", listen, "--fee", "1.5"],
        |cmd| {
            cmd.envs(bitcoin.env.clone()).envs(extra);
        },
    )
}

#[test]
fn a_client_deposits_at_its_mediator_and_sees_its_escrow() {
    let bitcoin = regtest::Regtest::start();
    let mediator_home = tempfile::tempdir().unwrap();
    let mediator = start_mediator(mediator_home.path(), &bitcoin, "/ip4/127.0.0.1/tcp/0", &[]);
    // Restarted on the same address, as the client's config names it.
    let listen = mediator.addr.rsplit_once("/p2p/").unwrap().0.to_owned();

    let opts = StartOptions {
        args: vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
        env: vec![("FINCRYPT_MEDIATOR".into(), mediator.addr.clone())],
        ..StartOptions::default()
    };
    let m = Mount::start_with(init_home(), opts);
    assert_eq!(status(m.home())["mediator"], mediator.addr.as_str());
    let me = status(m.home())["peer_id"].as_str().unwrap().to_owned();

    // One address of the mediator's wallet, the same each time.
    let d = ctl_json(m.home(), &["mediator", "deposit-address"]);
    let address = d["address"].as_str().unwrap().to_owned();
    let info: serde_json::Value =
        serde_json::from_str(&bitcoin.cli(&["validateaddress", &address])).unwrap();
    assert_eq!(info["ismine"], true, "{info}");
    assert_eq!(
        ctl_json(m.home(), &["mediator", "deposit-address"])["address"],
        address.as_str()
    );
    let b = ctl_json(m.home(), &["mediator", "balance"]);
    assert_eq!(b["escrow_sats"], 0, "{b}");
    assert_eq!(b["fee_basis_points"], 150, "{b}");

    // A deposit is pending until confirmed, then escrow.
    bitcoin.cli(&["sendtoaddress", &address, "1.5"]);
    wait_until("the deposit seen", Duration::from_secs(30), || {
        ctl_json(m.home(), &["mediator", "balance"])["pending_sats"] == 150_000_000
    });
    assert_eq!(
        ctl_json(m.home(), &["mediator", "balance"])["escrow_sats"],
        0
    );
    let miner = bitcoin.cli(&["getnewaddress"]);
    bitcoin.cli(&["generatetoaddress", "1", miner.trim()]);
    wait_until("the deposit in escrow", Duration::from_secs(30), || {
        let b = ctl_json(m.home(), &["mediator", "balance"]);
        b["escrow_sats"] == 150_000_000
            && b["deposited_sats"] == 150_000_000
            && b["pending_sats"] == 0
    });

    // Whoever runs the mediator sees the client and its escrow.
    let clients = ctl_json(mediator_home.path(), &["mediator", "clients"]);
    let list = clients.as_array().unwrap();
    assert_eq!(list.len(), 1, "{clients}");
    assert_eq!(list[0]["client"], me.as_str());
    assert_eq!(list[0]["address"], address.as_str());
    assert_eq!(list[0]["escrow_sats"], 150_000_000);
    assert_eq!(status(mediator_home.path())["clients"], 1);

    // A second client gets an address of its own and sees only its escrow.
    let opts2 = StartOptions {
        args: vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
        env: vec![("FINCRYPT_MEDIATOR".into(), mediator.addr.clone())],
        ..StartOptions::default()
    };
    let m2 = Mount::start_with(init_home(), opts2);
    let other = status(m2.home())["peer_id"].as_str().unwrap().to_owned();
    let d2 = ctl_json(m2.home(), &["mediator", "deposit-address"]);
    assert_ne!(d2["address"], address.as_str(), "one address per client");
    let b2 = ctl_json(m2.home(), &["mediator", "balance"]);
    assert_eq!(b2["client"], other.as_str());
    assert_eq!(b2["escrow_sats"], 0, "{b2}");
    assert_eq!(status(mediator_home.path())["clients"], 2);

    // Restarted, the mediator keeps the client's address; told to deny the
    // client, it refuses it with the reason.
    let _ = mediator.stop();
    let mediator = start_mediator(mediator_home.path(), &bitcoin, &listen, &[]);
    wait_until(
        "the same address after a restart",
        Duration::from_secs(60),
        || {
            let out = ctl(m.home(), &["mediator", "deposit-address", "--json"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&address)
        },
    );
    let _ = mediator.stop();
    let _mediator = start_mediator(
        mediator_home.path(),
        &bitcoin,
        &listen,
        &[
            ("FINCRYPT_DENY_CLIENTS", me.as_str()),
            ("FINCRYPT_ACCEPT_CLIENTS", me.as_str()),
        ],
    );
    wait_until("a denied client told why", Duration::from_secs(60), || {
        let out = ctl(m.home(), &["mediator", "balance"]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("deny_clients")
    });
    // The second client is not among those it accepts.
    wait_until(
        "a client not accepted told why",
        Duration::from_secs(60),
        || {
            let out = ctl(m2.home(), &["mediator", "balance"]);
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("accept_clients")
        },
    );
    drop(m2);
    drop(m);
}

/// The length of a period in the paid network below, in seconds.
const PERIOD: &str = "4";

/// What one period of `bytes` costs at `price` sats per GiB.
fn due(price: u64, bytes: u64) -> u64 {
    ((u128::from(price) * u128::from(bytes)) >> 30) as u64
}

#[test]
fn a_mediator_places_at_the_lowest_prices_and_pays_for_offline_clients_out_of_their_escrow() {
    let bitcoin = std::sync::Arc::new(regtest::Regtest::start());
    // The 10/20/50 sats per GiB, scaled as in tests/market.rs so that
    // test-sized data is due more than dust.
    let prices = [100_000u64, 200_000, 500_000];
    let homes: Vec<tempfile::TempDir> = prices
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let nodes: Vec<Served> = prices
        .iter()
        .zip(&homes)
        .map(|(price, home)| {
            let price = price.to_string();
            let args = [
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--capacity",
                "1GiB",
                "--price",
                &price,
            ];
            serve_with(home.path(), &args, |cmd| {
                cmd.envs(bitcoin.env.clone()).env("FINCRYPT_PERIOD", PERIOD);
            })
        })
        .collect();
    let peers: Vec<String> = homes
        .iter()
        .map(|h| status(h.path())["peer_id"].as_str().unwrap().to_owned())
        .collect();
    let mediator_home = tempfile::tempdir().unwrap();
    let mut args = vec!["--listen", "/ip4/127.0.0.1/tcp/0", "--fee", "1.5"];
    for n in &nodes {
        args.extend(["--bootstrap", n.addr.as_str()]);
    }
    let mediator = node_with(mediator_home.path(), "mediator", &args, |cmd| {
        cmd.envs(bitcoin.env.clone()).env("FINCRYPT_PERIOD", PERIOD);
    });
    let miner_address = bitcoin.cli(&["getnewaddress"]);
    let miner = regtest::Miner::start(&bitcoin, &miner_address);

    // Two clients, redundancy 2, each with 0.1 coin in escrow and a file of its own.
    let client_env = [
        ("FINCRYPT_MEDIATOR", mediator.addr.as_str()),
        ("FINCRYPT_PERIOD", PERIOD),
        ("FINCRYPT_REDUNDANCY", "2"),
        ("FINCRYPT_REPLICATE_INTERVAL", "1"),
        // Nothing new to place once the file is: the bytes held stay put.
        ("FINCRYPT_SNAPSHOT_INTERVAL", "0"),
        ("FINCRYPT_PUBLISH_INTERVAL", "0"),
    ];
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for i in 0..2u64 {
        let m = Mount::start_with(init_home(), mount_opts(&nodes, &client_env));
        let address = ctl_json(m.home(), &["mediator", "deposit-address"])["address"]
            .as_str()
            .unwrap()
            .to_owned();
        bitcoin.cli(&["sendtoaddress", &address, "0.1"]);
        wait_until("the deposit in escrow", Duration::from_secs(60), || {
            ctl_json(m.home(), &["mediator", "balance"])["escrow_sats"] == 10_000_000
        });
        std::fs::write(m.path().join("data"), random_bytes(40 + i, 4 << 20)).unwrap();
        ctl_ok(m.home(), &["sync"]);
        ids.push(status(m.home())["peer_id"].as_str().unwrap().to_owned());
        clients.push(m);
    }

    // The mediator puts both files on the two cheaper nodes; the dear one
    // gets only what wants a third copy (metadata).
    let held = |i: usize| number(&status(homes[i].path()), "held_bytes");
    let mut last = (0, 0, 0);
    let mut steady_since = std::time::Instant::now();
    wait_until(
        "both files placed on the two cheaper nodes",
        Duration::from_secs(180),
        || {
            let now = (held(0), held(1), held(2));
            if now != last {
                last = now;
                steady_since = std::time::Instant::now();
            }
            now.0 >= 8 << 20
                && now.1 >= 8 << 20
                && steady_since.elapsed() > Duration::from_secs(3)
                && clients
                    .iter()
                    .all(|m| number(&status(m.home()), "mediator_reports_waiting") == 0)
        },
    );
    assert!(
        held(2) < (8 << 20) / 20,
        "the dear node holds data: {}",
        held(2)
    );
    // Each client's contracts, as the holders count them.
    let holder_view = |i: usize, client: &str| -> serde_json::Value {
        ctl_json(homes[i].path(), &["market", "contracts"])
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["owner"] == client)
            .unwrap_or_else(|| panic!("holder {i} has no contract for {client}"))
            .clone()
    };
    let mut bytes = std::collections::HashMap::new();
    for id in &ids {
        for (i, peer) in peers.iter().enumerate().take(2) {
            let b = holder_view(i, id)["bytes"].as_u64().unwrap();
            assert!(b >= 4 << 20, "holder {i} keeps {b} bytes of {id}");
            bytes.insert((id.clone(), peer.clone()), b);
        }
    }

    // Both clients go away; the mediator audits and pays for them.
    let homes_of_clients: Vec<tempfile::TempDir> =
        clients.into_iter().map(|m| m.unmount()).collect();
    let mut escrows = serde_json::Value::Null;
    let paid_at_price = |e: &serde_json::Value, holder: &str| -> usize {
        let client = e["client"].as_str().unwrap();
        let i = peers.iter().position(|p| p == holder).unwrap();
        let want = due(prices[i], bytes[&(client.to_owned(), holder.to_owned())]);
        e["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == holder && p["sats"].as_u64() == Some(want))
            .count()
    };
    wait_until(
        "three periods paid to each holder for each client, while both are offline",
        Duration::from_secs(180),
        || {
            escrows = ctl_json(mediator_home.path(), &["mediator", "clients"]);
            escrows
                .as_array()
                .unwrap()
                .iter()
                .all(|e| paid_at_price(e, &peers[0]) >= 3 && paid_at_price(e, &peers[1]) >= 3)
        },
    );
    // Every payment is at the price for the bytes held, each period once,
    // and only to the two holders the mediator chose for data.
    let mut by_tx: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for e in escrows.as_array().unwrap() {
        let client = e["client"].as_str().unwrap().to_owned();
        let mut seen = std::collections::HashSet::new();
        for p in e["payments"].as_array().unwrap() {
            let holder = p["holder"].as_str().unwrap();
            let key = (
                p["contract"].as_str().unwrap().to_owned(),
                p["period"].as_u64().unwrap(),
            );
            assert!(seen.insert(key), "a period paid twice: {e}");
            let Some(i) = peers.iter().position(|x| x == holder) else {
                panic!("paid a stranger: {e}");
            };
            if i < 2 {
                let want = due(prices[i], bytes[&(client.clone(), holder.to_owned())]);
                assert_eq!(p["sats"].as_u64(), Some(want), "{e}");
            }
            by_tx
                .entry(p["txid"].as_str().unwrap().to_owned())
                .or_default()
                .insert(client.clone());
        }
    }
    assert!(
        by_tx.values().any(|c| c.len() == 2),
        "one transaction pays for both clients: {by_tx:?}"
    );
    let settlements = ctl_json(mediator_home.path(), &["mediator", "periods"]);
    assert!(
        settlements
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "sent" && s["clients"] == 2),
        "{settlements}"
    );

    // Each escrow came down by exactly its payments and the 1.5 % fee on
    // them, and no satoshi is lost: escrows + payments + fees = deposits.
    // (Read again until no settlement is between its intent and its txid.)
    drop(miner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bitcoin.mine(1));
    wait_until("the escrows add up", Duration::from_secs(60), || {
        escrows = ctl_json(mediator_home.path(), &["mediator", "clients"]);
        let mut total = 0u64;
        for e in escrows.as_array().unwrap() {
            let paid: u64 = e["payments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["sats"].as_u64().unwrap())
                .sum();
            let n = |k: &str| e[k].as_u64().unwrap();
            if n("paid_sats") != paid {
                return false;
            }
            assert_eq!(n("fees_sats"), paid * 150 / 10_000, "{e}");
            assert_eq!(
                n("escrow_sats"),
                10_000_000 - paid - paid * 150 / 10_000,
                "{e}"
            );
            total += n("escrow_sats") + paid + n("fees_sats");
        }
        assert_eq!(total, 20_000_000, "{escrows}");
        true
    });
    // Each holder's wallet got exactly what the mediator says it paid it,
    // and the holder counts the mediator's notices as payments.
    for (i, home) in homes.iter().enumerate().take(2) {
        let mut sent = 0;
        let mut txids = std::collections::BTreeSet::new();
        for e in escrows.as_array().unwrap() {
            for p in e["payments"].as_array().unwrap() {
                if p["holder"] == peers[i].as_str() {
                    sent += p["sats"].as_u64().unwrap();
                    txids.insert(p["txid"].as_str().unwrap().to_owned());
                }
            }
        }
        let income = ctl_json(home.path(), &["wallet"]);
        let got: u64 = income["income"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| txids.contains(r["txid"].as_str().unwrap()))
            .map(|r| r["sats"].as_u64().unwrap())
            .sum();
        assert_eq!(got, sent, "holder {i}: {income}");
        for id in &ids {
            wait_until(
                "the holder counts its payments",
                Duration::from_secs(60),
                || holder_view(i, id)["periods_paid"].as_u64().unwrap() >= 3,
            );
        }
    }
    // Whoever runs the mediator sees the holders it audits.
    let holders = ctl_json(mediator_home.path(), &["mediator", "holders"]);
    for p in &peers[..2] {
        let h = holders
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["peer"] == p.as_str())
            .unwrap_or_else(|| panic!("{p} among {holders}"));
        assert_eq!(h["clients"], 2, "{h}");
        assert!(h["audits_passed"].as_u64().unwrap() >= 6, "{h}");
        assert_eq!(h["audits_failed"], 0, "{h}");
        assert_eq!(h["state"], "active", "{h}");
    }
    drop(homes_of_clients);
    drop(nodes);
}
