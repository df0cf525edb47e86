//! A mediator on real daemons and a real regtest node: a client mount gets
//! one deposit address of the mediator's wallet, sees its deposit pending
//! and then in its escrow once confirmed; another client gets its own
//! address and sees only its own escrow; clients the mediator denies or
//! does not accept are told why.

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
