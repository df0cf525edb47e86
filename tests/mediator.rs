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

    // A second client, naming its mediator with --mediator, gets an address
    // of its own and sees only its escrow. A --mediator that does not name
    // the mediator's PeerId is refused.
    let home2 = init_home();
    let mnt = tempfile::tempdir().unwrap();
    let out = refused_mount_at(
        home2.path(),
        mnt.path(),
        &["--mediator", &listen],
        Some(PASSPHRASE),
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--mediator") && err.contains("/p2p/<PeerId>"),
        "{err}"
    );
    let opts2 = StartOptions {
        args: vec![
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--mediator".into(),
            mediator.addr.clone(),
        ],
        ..StartOptions::default()
    };
    let m2 = Mount::start_with(home2, opts2);
    assert_eq!(status(m2.home())["mediator"], mediator.addr.as_str());
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
/// What each client deposits unless a test says otherwise: 0.1 coin.
const DEPOSIT: u64 = 10_000_000;
/// The mediator's fee: 1.5 %.
const FEE_BP: u64 = 150;

/// A storage node at `home` asking `price`, paid into `bitcoin`'s wallet,
/// on the paid network's period, with `env` and `more` arguments.
fn priced_node(
    home: &std::path::Path,
    price: u64,
    bitcoin: &regtest::Regtest,
    env: &[(&str, &str)],
    more: &[&str],
) -> Served {
    let price = price.to_string();
    let mut args = vec![
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--capacity",
        "1GiB",
        "--price",
        &price,
    ];
    args.extend(more);
    serve_with(home, &args, |cmd| {
        cmd.envs(bitcoin.env.clone())
            .env("FINCRYPT_PERIOD", PERIOD)
            .envs(env.iter().copied());
    })
}

/// What one period of `bytes` costs at `price` sats per GiB.
fn due(price: u64, bytes: u64) -> u64 {
    ((u128::from(price) * u128::from(bytes)) >> 30) as u64
}

/// A mediator, three priced storage nodes and two clients (redundancy 2)
/// that deposited, placed a file each through the mediator, and went
/// offline.
struct Mediated {
    bitcoin: std::sync::Arc<regtest::Regtest>,
    /// The 10/20/50 sats per GiB, scaled as in tests/market.rs so
    /// that test-sized data is due more than dust.
    prices: [u64; 3],
    homes: Vec<tempfile::TempDir>,
    nodes: Vec<Served>,
    peers: Vec<String>,
    mediator_home: tempfile::TempDir,
    mediator: Option<Served>,
    /// Its listen address, without the PeerId (to restart it there).
    listen: String,
    /// The clients' PeerIds, homes (unmounted) and settings.
    clients: Vec<String>,
    client_homes: Vec<tempfile::TempDir>,
    client_env: Vec<(String, String)>,
    /// Settings of the mediator.
    mediator_env: Vec<(String, String)>,
    /// What each client deposited, in satoshis.
    deposit: u64,
    /// Bytes each holder keeps for each client: (client, holder) -> bytes.
    bytes: std::collections::HashMap<(String, String), u64>,
    miner: Option<regtest::Miner>,
}

/// How a [`Mediated`] network differs from the plain one.
struct Setup<'a> {
    /// Settings of the mediator.
    mediator: &'a [(&'a str, &'a str)],
    /// Settings of each storage node.
    nodes: &'a [(&'a str, &'a str)],
    /// What each client deposits, in satoshis.
    deposit: u64,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            mediator: &[],
            // A mediator killed again and again pays late: the nodes wait.
            nodes: &[("FINCRYPT_UNPAID_PERIODS", "1000000")],
            deposit: DEPOSIT,
        }
    }
}

impl Mediated {
    fn start() -> Mediated {
        Mediated::start_with(Setup::default())
    }

    fn start_with(setup: Setup) -> Mediated {
        let Setup {
            mediator: mediator_env,
            nodes: node_env,
            deposit,
        } = setup;
        let bitcoin = std::sync::Arc::new(regtest::Regtest::start());
        let prices = [100_000u64, 200_000, 500_000];
        let homes: Vec<tempfile::TempDir> = prices
            .iter()
            .map(|_| tempfile::tempdir().unwrap())
            .collect();
        let nodes: Vec<Served> = prices
            .iter()
            .zip(&homes)
            .map(|(price, home)| priced_node(home.path(), *price, &bitcoin, node_env, &[]))
            .collect();
        let peers: Vec<String> = homes
            .iter()
            .map(|h| status(h.path())["peer_id"].as_str().unwrap().to_owned())
            .collect();
        let mediator_home = tempfile::tempdir().unwrap();
        let mut net = Mediated {
            bitcoin,
            prices,
            homes,
            nodes,
            peers,
            mediator_home,
            mediator: None,
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            clients: Vec::new(),
            client_homes: Vec::new(),
            client_env: Vec::new(),
            mediator_env: mediator_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            deposit,
            bytes: Default::default(),
            miner: None,
        };
        net.start_mediator();
        let addr = net.mediator.as_ref().unwrap().addr.clone();
        net.listen = addr.rsplit_once("/p2p/").unwrap().0.to_owned();
        let miner_address = net.bitcoin.cli(&["getnewaddress"]);
        net.miner = Some(regtest::Miner::start(&net.bitcoin, &miner_address));

        // Two clients, each with 0.1 coin in escrow and a file of its own.
        let client_env = [
            ("FINCRYPT_MEDIATOR", addr.as_str()),
            ("FINCRYPT_PERIOD", PERIOD),
            ("FINCRYPT_REDUNDANCY", "2"),
            ("FINCRYPT_REPLICATE_INTERVAL", "1"),
            // Nothing new to place once the file is: the bytes held stay put.
            ("FINCRYPT_SNAPSHOT_INTERVAL", "0"),
            ("FINCRYPT_PUBLISH_INTERVAL", "0"),
        ];
        net.client_env = client_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut mounts = Vec::new();
        for i in 0..2u64 {
            let m = Mount::start_with(init_home(), mount_opts(&net.nodes, &client_env));
            let address = ctl_json(m.home(), &["mediator", "deposit-address"])["address"]
                .as_str()
                .unwrap()
                .to_owned();
            let coins = format!("{}.{:08}", deposit / 100_000_000, deposit % 100_000_000);
            net.bitcoin.cli(&["sendtoaddress", &address, &coins]);
            wait_until("the deposit in escrow", Duration::from_secs(60), || {
                ctl_json(m.home(), &["mediator", "balance"])["escrow_sats"] == deposit
            });
            std::fs::write(m.path().join("data"), random_bytes(40 + i, 4 << 20)).unwrap();
            ctl_ok(m.home(), &["sync"]);
            net.clients
                .push(status(m.home())["peer_id"].as_str().unwrap().to_owned());
            mounts.push(m);
        }

        // The mediator puts both files on the two cheaper nodes; the dear
        // one gets only what wants a third copy (metadata).
        wait_steady(
            "both files placed on the two cheaper nodes",
            Duration::from_secs(180),
            || (net.held(0), net.held(1)),
            |now| {
                now.0 >= 8 << 20
                    && now.1 >= 8 << 20
                    && mounts
                        .iter()
                        .all(|m| number(&status(m.home()), "mediator_reports_waiting") == 0)
            },
        );
        assert!(
            net.held(2) < (8 << 20) / 20,
            "the dear node holds data: {}",
            net.held(2)
        );
        for id in net.clients.clone() {
            for i in 0..2 {
                // (A holder samples what it keeps a few times a period.)
                let mut b = 0;
                wait_until(
                    "the holder counts the whole file",
                    Duration::from_secs(60),
                    || {
                        b = net.holder_view(i, &id)["bytes"].as_u64().unwrap();
                        b >= 4 << 20
                    },
                );
                net.bytes.insert((id.clone(), net.peers[i].clone()), b);
            }
        }
        // Both clients go away.
        net.client_homes = mounts.into_iter().map(|m| m.unmount()).collect();
        net
    }

    fn start_mediator(&mut self) {
        let mut args = vec!["--listen", self.listen.as_str(), "--fee", "1.5"];
        for n in &self.nodes {
            args.extend(["--bootstrap", n.addr.as_str()]);
        }
        let mut env = self.bitcoin.env.clone();
        env.extend(self.mediator_env.iter().cloned());
        self.mediator = Some(node_with(
            self.mediator_home.path(),
            "mediator",
            &args,
            |cmd| {
                cmd.envs(env).env("FINCRYPT_PERIOD", PERIOD);
            },
        ));
        let home = self.mediator_home.path();
        wait_until("the mediator answers", Duration::from_secs(30), || {
            ctl(home, &["status"]).status.success()
        });
    }

    /// Client `i` mounted again.
    fn client_back(&mut self, i: usize) -> Mount {
        let home = self.client_homes.remove(i);
        let env: Vec<(&str, &str)> = self
            .client_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Mount::start_with(home, mount_opts(&self.nodes, &env))
    }

    /// Once the mediator dropped holder 1 (a wrong proof, or no answer):
    /// what it kept for both clients is copied from holder 0 to holder 2,
    /// and it is paid no more while holder 0 goes on being paid.
    fn holder_1_replaced_and_unpaid(&self, why: &str) {
        let (h0, h1) = (&self.peers[0], &self.peers[1]);
        // The blocks it lost are copied from holder 0 to the only other node,
        // for both clients.
        wait_until(
            "the lost data on the third node",
            Duration::from_secs(120),
            || self.held(2) >= 8 << 20,
        );
        // It is paid no more, while holder 0 goes on being paid.
        let mut before = (0, 0);
        wait_until("holder 0 paid on", Duration::from_secs(60), || {
            let e = self.escrows();
            before = (payments_to(&e, h0), payments_to(&e, h1));
            before.0 > 0
        });
        wait_until(
            "three more periods paid to holder 0 for each client",
            Duration::from_secs(120),
            || payments_to(&self.escrows(), h0) >= before.0 + 6,
        );
        let settled = payments_to(&self.escrows(), h1);
        wait_until(
            "two more periods paid to holder 0 for each client",
            Duration::from_secs(120),
            || payments_to(&self.escrows(), h0) >= before.0 + 10,
        );
        assert_eq!(
            payments_to(&self.escrows(), h1),
            settled,
            "holder 1 paid after {why}"
        );
    }

    /// Client `i`, back, takes the mediator's moves into its manifest: the
    /// moved blocks on holders 0 and 2, not on holder 1.
    fn client_finds_the_moves(&mut self, i: usize) {
        let (h0, h1) = (self.peers[0].clone(), self.peers[1].clone());
        let m = self.client_back(i);
        let mut moved = 0;
        wait_until("the moves taken", Duration::from_secs(90), || {
            moved = number(&status(m.home()), "mediator_moves_taken");
            moved > 0
        });
        ctl_ok(m.home(), &["sync"]);
        let manifest = ctl_json(m.home(), &["manifest"]);
        let h2 = self.peers[2].as_str();
        let now_on_2 = manifest["manifest"]["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| {
                let holders: Vec<&str> = b["holders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h.as_str().unwrap())
                    .collect();
                holders.contains(&h0.as_str())
                    && holders.contains(&h2)
                    && !holders.contains(&h1.as_str())
            })
            .count() as u64;
        assert!(
            now_on_2 >= moved,
            "{moved} moves taken, {now_on_2} blocks on holders 0 and 2: {manifest}"
        );
        drop(m);
    }

    fn held(&self, i: usize) -> u64 {
        number(&status(self.homes[i].path()), "held_bytes")
    }

    /// Holder `i`'s contract for `client`.
    fn holder_view(&self, i: usize, client: &str) -> serde_json::Value {
        ctl_json(self.homes[i].path(), &["market", "contracts"])
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["owner"] == client)
            .unwrap_or_else(|| panic!("holder {i} has no contract for {client}"))
            .clone()
    }

    fn escrows(&self) -> serde_json::Value {
        ctl_json(self.mediator_home.path(), &["mediator", "clients"])
    }

    /// Payments in `e` (a client's escrow) to `holder` at its price for
    /// the bytes it keeps for that client.
    fn paid_at_price(&self, e: &serde_json::Value, holder: &str) -> usize {
        let client = e["client"].as_str().unwrap();
        let i = self.peers.iter().position(|p| p == holder).unwrap();
        let want = due(
            self.prices[i],
            self.bytes[&(client.to_owned(), holder.to_owned())],
        );
        e["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == holder && p["sats"].as_u64() == Some(want))
            .count()
    }

    /// Waits until `periods` periods are paid to holders 0 and 1 for each
    /// client at their prices, then stops the miner and confirms what was
    /// sent.
    fn wait_paid_then_confirm(&mut self, what: &str, periods: usize) {
        wait_until(what, Duration::from_secs(180), || {
            self.escrows().as_array().unwrap().iter().all(|e| {
                self.paid_at_price(e, &self.peers[0]) >= periods
                    && self.paid_at_price(e, &self.peers[1]) >= periods
            })
        });
        self.miner = None;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(self.bitcoin.mine(1));
    }

    /// Checks that each escrow came down by exactly what was paid for it
    /// and the fee on that, that no satoshi is lost (escrows + payments +
    /// fees = deposits) and that no period was paid twice; with `settled`,
    /// first waits until no settlement is between its intent and its txid,
    /// and checks the payments listed come to what was paid. The escrows.
    fn escrows_add_up(&self, settled: bool) -> serde_json::Value {
        let mut escrows = serde_json::Value::Null;
        wait_until("the escrows add up", Duration::from_secs(60), || {
            escrows = self.escrows();
            let mut total = 0u64;
            for e in escrows.as_array().unwrap() {
                let mut seen = std::collections::HashSet::new();
                let mut paid = 0;
                for p in e["payments"].as_array().unwrap() {
                    let key = (
                        p["contract"].as_str().unwrap().to_owned(),
                        p["period"].as_u64().unwrap(),
                    );
                    assert!(seen.insert(key), "a period paid twice: {e}");
                    paid += p["sats"].as_u64().unwrap();
                }
                let n = |k: &str| e[k].as_u64().unwrap();
                if settled && n("paid_sats") != paid {
                    return false;
                }
                // (Paid includes a settlement being sent.)
                assert!(n("paid_sats") >= paid, "{e}");
                let paid = n("paid_sats");
                let fee = paid * FEE_BP / 10_000;
                assert_eq!(n("fees_sats"), fee, "{e}");
                assert_eq!(n("escrow_sats"), self.deposit - paid - fee, "{e}");
                total += n("escrow_sats") + paid + n("fees_sats");
            }
            assert_eq!(total, 2 * self.deposit, "{escrows}");
            true
        });
        escrows
    }

    /// What each holder's wallet received is what the mediator recorded
    /// paying it: no transaction the ledger does not know of, each for the
    /// amount it says; and the holder counts the mediator's notices.
    fn holders_got_what_was_recorded(&self) {
        for (i, home) in self.homes.iter().enumerate().take(2) {
            let income = ctl_json(home.path(), &["wallet"]);
            // Read after the holder's: the mediator goes on paying.
            let escrows = self.escrows();
            let mut recorded: std::collections::HashMap<String, u64> = Default::default();
            for e in escrows.as_array().unwrap() {
                for p in e["payments"].as_array().unwrap() {
                    if p["holder"] == self.peers[i].as_str() {
                        *recorded
                            .entry(p["txid"].as_str().unwrap().to_owned())
                            .or_default() += p["sats"].as_u64().unwrap();
                    }
                }
            }
            for r in income["income"].as_array().unwrap() {
                let txid = r["txid"].as_str().unwrap();
                assert_eq!(
                    recorded.get(txid).copied(),
                    r["sats"].as_u64(),
                    "holder {i} received {txid}: {income} against {escrows}"
                );
            }
            for id in &self.clients {
                wait_until(
                    "the holder counts its payments",
                    Duration::from_secs(60),
                    || self.holder_view(i, id)["periods_paid"].as_u64().unwrap() >= 3,
                );
            }
        }
    }
}

#[test]
fn a_mediator_places_at_the_lowest_prices_and_pays_for_offline_clients_out_of_their_escrow() {
    let mut net = Mediated::start();
    // While both clients are offline, the mediator audits and pays for them.
    net.wait_paid_then_confirm(
        "three periods paid to each holder for each client, while both are offline",
        3,
    );
    let escrows = net.escrows_add_up(true);
    // Every payment is at the price for the bytes held, and only to the two
    // holders the mediator chose for data; one transaction pays for both
    // clients.
    let mut by_tx: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for e in escrows.as_array().unwrap() {
        let client = e["client"].as_str().unwrap().to_owned();
        for p in e["payments"].as_array().unwrap() {
            let holder = p["holder"].as_str().unwrap();
            let Some(i) = net.peers.iter().position(|x| x == holder) else {
                panic!("paid a stranger: {e}");
            };
            if i < 2 {
                let want = due(
                    net.prices[i],
                    net.bytes[&(client.clone(), holder.to_owned())],
                );
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
    let settlements = ctl_json(net.mediator_home.path(), &["mediator", "periods"]);
    assert!(
        settlements
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "sent" && s["clients"] == 2),
        "{settlements}"
    );
    net.holders_got_what_was_recorded();
    // Whoever runs the mediator sees the holders it audits.
    let holders = ctl_json(net.mediator_home.path(), &["mediator", "holders"]);
    for p in &net.peers[..2] {
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
}

#[test]
fn a_mediator_killed_ten_times_while_settling_pays_each_period_once_and_loses_no_escrow() {
    let mut net = Mediated::start();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill moments from seed {seed}");
    let mut rng = Rng::new(seed);
    for _ in 0..10 {
        // A moment within the next period: the mediator settles five times a period.
        std::thread::sleep(Duration::from_millis(rng.range(200, 4_000)));
        let mut m = net.mediator.take().unwrap();
        m.child.kill().expect("SIGKILL");
        let _ = m.child.wait();
        drop(m);
        net.start_mediator();
        net.escrows_add_up(false);
    }
    net.wait_paid_then_confirm(
        "periods paid to each holder for each client after the kills",
        3,
    );
    net.escrows_add_up(true);
    net.holders_got_what_was_recorded();
}

/// Payments in `escrows` to `holder`, for every client.
fn payments_to(escrows: &serde_json::Value, holder: &str) -> usize {
    escrows
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["payments"].as_array().unwrap().iter())
        .filter(|p| p["holder"] == holder)
        .count()
}

#[test]
fn a_holder_that_loses_blocks_while_its_clients_are_away_is_unpaid_and_its_blocks_move() {
    // One wrong proof among a few audits puts a holder under 0.99.
    let mut net = Mediated::start_with(Setup {
        mediator: &[("FINCRYPT_MIN_AUDIT_SCORE", "0.99")],
        ..Setup::default()
    });
    let h1 = net.peers[1].clone();
    wait_until("a period paid to holder 1", Duration::from_secs(60), || {
        payments_to(&net.escrows(), &h1) > 0
    });
    // Holder 1's held blocks now hold zeros.
    assert!(
        zero_held_blocks(net.homes[1].path()) > 0,
        "holder 1 holds blocks"
    );
    // The mediator's audits catch it: its contracts end, and it gets no
    // new blocks from this mediator.
    wait_until(
        "holder 1 caught by an audit",
        Duration::from_secs(60),
        || {
            let holders = ctl_json(net.mediator_home.path(), &["mediator", "holders"]);
            holders.as_array().unwrap().iter().any(|h| {
                h["peer"] == h1.as_str()
                    && h["audits_failed"].as_u64().unwrap() >= 1
                    && h["state"].as_str().unwrap().contains("contracts ended")
                    && h["state"].as_str().unwrap().contains("min_audit_score")
            })
        },
    );
    net.holder_1_replaced_and_unpaid("it lost its blocks");

    // A new client's blocks go to holders 0 and 2 only: holder 1's audit
    // score is under the mediator's min_audit_score.
    let env: Vec<(&str, &str)> = net
        .client_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let newcomer = Mount::start_with(init_home(), mount_opts(&net.nodes, &env));
    let address = ctl_json(newcomer.home(), &["mediator", "deposit-address"])["address"]
        .as_str()
        .unwrap()
        .to_owned();
    net.bitcoin.cli(&["sendtoaddress", &address, "0.1"]);
    wait_until("the newcomer's deposit", Duration::from_secs(60), || {
        ctl_json(newcomer.home(), &["mediator", "balance"])["escrow_sats"] == DEPOSIT
    });
    std::fs::write(newcomer.path().join("new"), random_bytes(77, 1 << 20)).unwrap();
    ctl_ok(newcomer.home(), &["sync"]);
    let id = status(newcomer.home())["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(
        "the newcomer's file on holders 0 and 2",
        Duration::from_secs(120),
        || {
            [0, 2].iter().all(|&i| {
                ctl_json(net.homes[i].path(), &["market", "contracts"])
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["owner"] == id.as_str() && c["bytes"].as_u64().unwrap() >= 1 << 20)
            })
        },
    );
    let on_1 = ctl_json(net.homes[1].path(), &["market", "contracts"]);
    assert!(
        !on_1
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["owner"] == id.as_str()),
        "holder 1 got a contract for a new client: {on_1}"
    );
    drop(newcomer);

    net.client_finds_the_moves(0);
}

#[test]
fn a_holder_that_vanishes_while_its_clients_are_away_is_unpaid_and_its_blocks_move() {
    let mut net = Mediated::start();
    let h1 = net.peers[1].clone();
    wait_until("a period paid to holder 1", Duration::from_secs(60), || {
        payments_to(&net.escrows(), &h1) > 0
    });
    // Holder 1's machine goes away for good.
    let node = &mut net.nodes[1];
    node.child.kill().expect("SIGKILL");
    let _ = node.child.wait();
    // After a period (the default `unreachable_periods`) of audits left
    // unanswered, the mediator takes it for gone: its contracts end, and it
    // gets no new blocks.
    wait_until("holder 1 taken for gone", Duration::from_secs(60), || {
        let holders = ctl_json(net.mediator_home.path(), &["mediator", "holders"]);
        holders.as_array().unwrap().iter().any(|h| {
            let state = h["state"].as_str().unwrap();
            h["peer"] == h1.as_str()
                && state.contains("contracts ended: 2")
                && state.contains("no answer to")
                && state.contains("no new blocks: it has answered none")
        })
    });
    net.holder_1_replaced_and_unpaid("it went away");
    net.client_finds_the_moves(1);
}

#[test]
fn a_client_whose_escrow_runs_low_is_told_and_is_cut_by_its_holders_once_it_is_spent() {
    // 10,000 sats pay for about eight periods of a client's two 4 MiB
    // copies; a client is told it is low under 1,000 periods, and a node
    // cuts an owner after two periods unpaid.
    let mut net = Mediated::start_with(Setup {
        mediator: &[("FINCRYPT_GRACE_PERIODS", "1000")],
        nodes: &[("FINCRYPT_UNPAID_PERIODS", "2")],
        deposit: 10_000,
    });
    // A client that comes back online is told, in its status and its log.
    let m = net.client_back(0);
    wait_until("the low escrow shown", Duration::from_secs(90), || {
        status(m.home())["mediator_low_escrow"] == true
    });
    assert!(
        m.stderr().contains("escrow at the mediator is low"),
        "{}",
        m.stderr()
    );
    let balance = ctl_ok(m.home(), &["mediator", "balance"]);
    assert!(balance.contains("LOW"), "{balance}");
    // Once spent, nothing more is paid for the client: its holders count
    // the periods unpaid and cut it (later, they release its blocks).
    let other = net.clients[1].clone();
    wait_until(
        "the offline client cut by its holders",
        Duration::from_secs(180),
        || {
            // (Cut, and with contracts of one period, soon released.)
            (0..2).all(|i| {
                let v = net.holder_view(i, &other);
                let state = v["state"].as_str().unwrap();
                state.starts_with("cut") || state.starts_with("releas")
            })
        },
    );
    // Not a satoshi beyond the deposits was paid.
    let escrows = net.escrows_add_up(true);
    for e in escrows.as_array().unwrap() {
        assert!(
            e["escrow_sats"].as_u64().unwrap() < e["cost_per_period"].as_u64().unwrap(),
            "{e}"
        );
    }
    // And the mediator places nothing new for a client it cannot pay for.
    std::fs::write(m.path().join("more"), random_bytes(99, 1 << 20)).unwrap();
    ctl_ok(m.home(), &["sync"]);
    wait_until(
        "new placements refused, with the reason",
        Duration::from_secs(60),
        || {
            status(m.home())["mediator_note"]
                .as_str()
                .unwrap()
                .contains("escrow")
        },
    );
}

#[test]
fn floating_prices_pay_the_cheapest_room_seen_within_each_holders_floor() {
    // Every node takes as little as 50,000 sats per GiB from a payer whose
    // pricing floats.
    let net = Mediated::start_with(Setup {
        mediator: &[("FINCRYPT_PRICING", "floating")],
        nodes: &[
            ("FINCRYPT_UNPAID_PERIODS", "1000000"),
            ("FINCRYPT_FLOOR", "50000"),
        ],
        ..Setup::default()
    });
    let h1 = net.peers[1].clone();
    // Paid at rate `rate` for the bytes it keeps for the client of `e`.
    let paid_at = |e: &serde_json::Value, i: usize, rate: u64| -> usize {
        let client = e["client"].as_str().unwrap();
        let want = due(rate, net.bytes[&(client.to_owned(), net.peers[i].clone())]);
        e["payments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["holder"] == net.peers[i].as_str() && p["sats"].as_u64() == Some(want))
            .count()
    };
    // Holder 1 asks 200,000, but the cheapest room seen is holder 0's
    // 100,000: that is what it is paid.
    wait_until(
        "holder 1 paid at the cheapest price seen",
        Duration::from_secs(120),
        || {
            net.escrows()
                .as_array()
                .unwrap()
                .iter()
                .all(|e| paid_at(e, 1, 100_000) >= 2)
        },
    );
    // Cheaper room appears: a node at 60,000. Both holders are paid that.
    let home = tempfile::tempdir().unwrap();
    let _cheap = priced_node(
        home.path(),
        60_000,
        &net.bitcoin,
        &[],
        &["--bootstrap", net.nodes[0].addr.as_str()],
    );
    wait_until(
        "both holders paid at the new cheapest price",
        Duration::from_secs(180),
        || {
            net.escrows()
                .as_array()
                .unwrap()
                .iter()
                .all(|e| paid_at(e, 0, 60_000) >= 2 && paid_at(e, 1, 60_000) >= 2)
        },
    );
    // Never above the cheapest seen, never below the floor.
    let escrows = net.escrows_add_up(true);
    for e in escrows.as_array().unwrap() {
        let client = e["client"].as_str().unwrap().to_owned();
        for p in e["payments"].as_array().unwrap() {
            if p["holder"] == h1.as_str() {
                let bytes = net.bytes[&(client.clone(), h1.clone())];
                let sats = p["sats"].as_u64().unwrap();
                assert!(
                    sats <= due(100_000, bytes) && sats >= due(50_000, bytes),
                    "{p} for {bytes} bytes"
                );
            }
        }
    }
}
