//! Settlement against a real Bitcoin regtest node (scripts/regtest.sh):
//! every passed period paid once, in one transaction per settlement, to the
//! satoshi; nothing for a failed period; small dues carried; a wallet short
//! of funds refused and retried; and exactly once across kill -9.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fincrypt_market::contract::{CONTRACT_VERSION, Contract, Terms};
use fincrypt_market::ledger::{
    BatchState, Ledger, PeriodState, SettleRules, Settlement, funded_periods,
};
use fincrypt_market::wallet::{BitcoinRpc, Payments, RpcAuth, RpcSettings, WalletError, WalletTx};
use libp2p::identity::Keypair;

const GIB: u64 = 1 << 30;

// The regtest node helper is shared with the binary crate's tests.
#[path = "../../tests/common/regtest.rs"]
mod regtest;
use regtest::Regtest;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `n` new addresses of the wallet.
async fn addresses(wallet: &BitcoinRpc, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(wallet.new_address().await.unwrap());
    }
    out
}

/// A contract between a new owner key and a new holder key.
fn contract(owner: &Keypair, price: u64, start: u64, period: u64, payout: String) -> Contract {
    let holder = Keypair::generate_ed25519();
    Terms {
        version: CONTRACT_VERSION,
        id: rand::random(),
        owner: owner.public().to_peer_id().to_bytes(),
        holder: holder.public().to_peer_id().to_bytes(),
        price,
        start,
        min_duration: 1,
        period,
        payout,
        // min_payout alone decides what waits.
        carry: u64::MAX,
        payer: Vec::new(),
        consent: None,
    }
    .propose(owner)
    .unwrap()
    .accept(&holder)
    .unwrap()
}

/// The outputs of `txid` that pay `address`, in satoshis.
fn paid_in(node: &Regtest, txid: &str, address: &str) -> u64 {
    let tx: serde_json::Value = serde_json::from_str(&node.cli(&["gettransaction", txid])).unwrap();
    tx["details"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["category"] == "send" && d["address"] == address)
        .map(|d| fincrypt_market::wallet::sats_of(&d["amount"], "test").unwrap())
        .sum()
}

#[tokio::test]
async fn each_passed_period_is_paid_once_in_one_transaction_to_the_satoshi() {
    let node = Regtest::start();
    let wallet = node.wallet();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let owner = Keypair::generate_ed25519();
    let (start, period) = (1_000_000, 60);
    let addr = addresses(&wallet, 3).await;
    // Prices of 10, 20 and 50 sats per GiB per period; the third holds so
    // little that each period's due is under the minimum payout.
    let cheap = contract(&owner, 10_000, start, period, addr[0].clone());
    let dear = contract(&owner, 20_000, start, period, addr[1].clone());
    let tiny = contract(&owner, 50_000, start, period, addr[2].clone());
    for c in [&cheap, &dear, &tiny] {
        ledger.add_contract(c).unwrap();
    }
    let held = [(&cheap, 3 * GIB), (&dear, GIB / 2), (&tiny, GIB / 100)];
    // Four periods, two challenges each; `dear` fails one in period 2.
    for p in 0..4u64 {
        for (c, bytes) in held {
            for k in 0..2 {
                let at = start + p * period + 10 + k * 20;
                let passed = !(c.terms.id == dear.terms.id && p == 2 && k == 1);
                ledger
                    .record_challenge(&c.terms.id, at, passed, bytes)
                    .unwrap();
            }
        }
    }
    let rules = SettleRules {
        min_payout: 2_500,
        in_flight: 60,
    };
    // Before a period ends nothing is due.
    assert_eq!(
        ledger.settle(&wallet, start + 59, rules).await.unwrap(),
        Settlement::Nothing
    );

    let end = start + 4 * period;
    let Settlement::Paid {
        txid, sats, payees, ..
    } = ledger.settle(&wallet, end, rules).await.unwrap()
    else {
        panic!("four ended periods pay")
    };
    let due_cheap = 4 * (10_000 * 3);
    let due_dear = 3 * (20_000 / 2);
    assert_eq!(
        payees, 2,
        "the tiny holder's 4 x 499 sats wait for the minimum"
    );
    assert_eq!(sats, due_cheap + due_dear);
    assert_eq!(paid_in(&node, &txid, &addr[0]), due_cheap, "to the satoshi");
    assert_eq!(
        paid_in(&node, &txid, &addr[1]),
        due_dear,
        "nothing for the failed period"
    );
    assert_eq!(paid_in(&node, &txid, &addr[2]), 0);
    let rows = ledger.periods().unwrap();
    let failed = rows
        .iter()
        .find(|(id, p, _)| *id == dear.terms.id && *p == 2)
        .unwrap();
    assert_eq!(failed.2.state, PeriodState::Unpaid);
    let tiny_due: Vec<_> = rows
        .iter()
        .filter(|(id, _, _)| *id == tiny.terms.id)
        .collect();
    assert!(
        tiny_due
            .iter()
            .all(|(_, _, r)| r.state == PeriodState::Due(499))
    );

    // Settling again pays nothing twice; the transaction confirms once mined.
    assert_eq!(
        ledger.settle(&wallet, end + 1, rules).await.unwrap(),
        Settlement::Nothing
    );
    assert_eq!(wallet.transaction(&txid).await.unwrap().confirmations, 0);
    node.mine(1).await;
    assert_eq!(wallet.transaction(&txid).await.unwrap().confirmations, 1);

    // Two more periods bring the tiny holder over the minimum: its carried
    // dues are paid with them, in the next settlement's one transaction.
    for p in 4..6u64 {
        for (c, bytes) in held {
            ledger
                .record_challenge(&c.terms.id, start + p * period + 5, true, bytes)
                .unwrap();
        }
    }
    let Settlement::Paid { txid: second, .. } = ledger
        .settle(&wallet, start + 6 * period, rules)
        .await
        .unwrap()
    else {
        panic!("two more periods pay")
    };
    assert_ne!(second, txid);
    assert_eq!(paid_in(&node, &second, &addr[2]), 6 * 499);
    assert_eq!(paid_in(&node, &second, &addr[0]), 2 * 30_000);
    node.mine(1).await;
    assert_eq!(wallet.received_by(&addr[0], 1).await.unwrap(), 6 * 30_000);
    assert_eq!(wallet.received_by(&addr[1], 1).await.unwrap(), 5 * 10_000);
    assert_eq!(wallet.received_by(&addr[2], 1).await.unwrap(), 6 * 499);
    assert_eq!(ledger.owed().unwrap(), 0);
}

#[tokio::test]
async fn a_wallet_short_of_funds_is_refused_says_so_and_is_paid_later() {
    let node = Regtest::start();
    let wallet = node.wallet();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let owner = Keypair::generate_ed25519();
    let balance = wallet.balance().await.unwrap();
    assert_eq!(balance, 50 * 100_000_000, "one mature coinbase");
    // One period costs 60 coins: more than the wallet has.
    let c = contract(
        &owner,
        60 * 100_000_000,
        0,
        10,
        wallet.new_address().await.unwrap(),
    );
    ledger.add_contract(&c).unwrap();
    ledger.record_challenge(&c.terms.id, 5, true, GIB).unwrap();
    let cost = ledger.cost_per_period().unwrap();
    assert_eq!(cost, 60 * 100_000_000);
    assert_eq!(
        funded_periods(balance, cost),
        0,
        "low balance: no period funded"
    );

    let rules = SettleRules {
        min_payout: 1,
        in_flight: 60,
    };
    let e = ledger.settle(&wallet, 10, rules).await.unwrap_err();
    assert!(
        matches!(&e, fincrypt_market::MarketError::Wallet(w) if w.is_insufficient_funds()),
        "{e}"
    );
    assert!(e.to_string().contains("refused sendmany"), "{e}");
    let batches = ledger.batches().unwrap();
    assert!(matches!(batches[0].1.state, BatchState::Abandoned(_)));
    assert_eq!(ledger.owed().unwrap(), 60 * 100_000_000, "nothing lost");

    // Two more coinbases mature: the next settlement pays it, once.
    node.mine(2).await;
    let Settlement::Paid { sats, .. } = ledger.settle(&wallet, 20, rules).await.unwrap() else {
        panic!("funded, it pays")
    };
    assert_eq!(sats, 60 * 100_000_000);
    assert_eq!(ledger.owed().unwrap(), 0);
    assert_eq!(
        ledger.settle(&wallet, 30, rules).await.unwrap(),
        Settlement::Nothing
    );
}

/// Set for the child process of the kill -9 test: its ledger and node.
const CHILD_ENV: &str = "FINCRYPT_MARKET_SETTLE_CHILD";

/// The owner's side as a process to kill: settles the contracts in the
/// ledger every period, recording one passed challenge per period, forever.
#[tokio::test]
#[ignore = "run by the kill -9 test as its child"]
async fn settlement_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let v: Vec<&str> = spec.split('\n').collect();
    let settings = RpcSettings {
        url: v[1].into(),
        wallet: None,
        auth: RpcAuth::UserPass(v[2].into(), v[3].into()),
    };
    let wallet = BitcoinRpc::new(&settings).unwrap();
    let ledger = Ledger::open(Path::new(v[0])).unwrap();
    let rules = SettleRules {
        min_payout: 1,
        in_flight: 2,
    };
    loop {
        let t = now();
        for c in ledger.contracts().unwrap() {
            ledger.record_challenge(&c.terms.id, t, true, GIB).unwrap();
        }
        // A refusal (coins not yet confirmed) is retried next period.
        let _ = ledger.settle(&wallet, t, rules).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kill_9_during_settlement_pays_no_period_twice_and_leaves_none_unpaid() {
    let node = Regtest::start();
    // Ten more mature coinbases: sends in quick succession need coins.
    node.mine(20).await;
    let wallet = node.wallet();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let owner = Keypair::generate_ed25519();
    let addr = addresses(&wallet, 2).await;
    let start = now();
    {
        let ledger = Ledger::open(&path).unwrap();
        for (i, a) in addr.iter().enumerate() {
            ledger
                .add_contract(&contract(
                    &owner,
                    1_000 * (i as u64 + 1),
                    start,
                    1,
                    a.clone(),
                ))
                .unwrap();
        }
    }
    let RpcAuth::UserPass(user, password) = &node.settings.auth else {
        unreachable!()
    };
    let spec = [path.to_str().unwrap(), &node.settings.url, user, password].join("\n");
    let child = || {
        Command::new(std::env::current_exe().unwrap())
            .args(["settlement_child", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &spec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    for round in 0..10u64 {
        let mut c = child();
        // A random moment: within a settlement or between two.
        let wait = 300 + rand::random::<u64>() % 1_200;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        if round % 3 == 2 {
            node.mine(1).await;
        }
    }
    node.mine(1).await;

    // Settle what is left, here, with no kill.
    let ledger = Ledger::open(&path).unwrap();
    let rules = SettleRules {
        min_payout: 1,
        in_flight: 2,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = now();
        match ledger.settle(&wallet, t, rules).await {
            Ok(Settlement::Nothing) if ledger.owed().unwrap() == 0 => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "still owed: {}",
            ledger.owed().unwrap()
        );
        node.mine(1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Every sent batch is one wallet transaction with its label, no label
    // was sent twice, and each address got exactly the sum of its paid periods.
    let batches = ledger.batches().unwrap();
    let mut expected = vec![0u64; addr.len()];
    let contracts = ledger.contracts().unwrap();
    let mut paid_periods = 0;
    for (_, _, row) in ledger.periods().unwrap() {
        assert!(
            !matches!(row.state, PeriodState::Due(_) | PeriodState::Batched { .. }),
            "a period left unpaid: {row:?}"
        );
        if let PeriodState::Paid { .. } = row.state {
            paid_periods += 1;
        }
    }
    assert!(paid_periods >= 5, "{paid_periods} periods paid");
    for (_, b) in &batches {
        if let BatchState::Sent(txid) = &b.state {
            for (i, a) in addr.iter().enumerate() {
                let got = paid_in(&node, txid, a);
                let want: u64 = b
                    .outputs
                    .iter()
                    .filter(|(o, _)| o == a)
                    .map(|(_, s)| s)
                    .sum();
                assert_eq!(got, want, "batch {} pays {a} what it recorded", b.label);
                expected[i] += want;
            }
        }
    }
    let list: serde_json::Value =
        serde_json::from_str(&node.cli(&["listtransactions", "*", "100000"])).unwrap();
    let mut sent_labels: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["category"] == "send")
        .filter(|t| {
            t["comment"]
                .as_str()
                .is_some_and(|c| c.starts_with("fincrypt settlement"))
        })
        .filter_map(|t| {
            Some((
                t["comment"].as_str()?.to_owned(),
                t["txid"].as_str()?.to_owned(),
            ))
        })
        .collect();
    sent_labels.sort();
    sent_labels.dedup();
    let mut labels: Vec<&String> = sent_labels.iter().map(|(l, _)| l).collect();
    let all = labels.len();
    labels.dedup();
    assert_eq!(
        labels.len(),
        all,
        "a settlement was sent twice: {sent_labels:?}"
    );
    let sent_batches = batches
        .iter()
        .filter(|(_, b)| matches!(b.state, BatchState::Sent(_)))
        .count();
    assert_eq!(
        all, sent_batches,
        "every transaction sent is a batch the ledger knows"
    );
    for (i, a) in addr.iter().enumerate() {
        assert_eq!(wallet.received_by(a, 0).await.unwrap(), expected[i], "{a}");
    }
    // And what was paid is what the periods were worth.
    for c in &contracts {
        let worth: u64 = ledger
            .periods()
            .unwrap()
            .iter()
            .filter(|(id, _, _)| *id == c.terms.id)
            .filter_map(|(_, _, r)| match r.state {
                PeriodState::Paid { sats, .. } => Some(sats),
                _ => None,
            })
            .sum();
        let a = addr.iter().position(|a| *a == c.terms.payout).unwrap();
        assert_eq!(worth, expected[a]);
    }
}

/// The real wallet, but a `sendmany` whose answer is lost: after sending
/// (`sent`) or before (`!sent`), as when the process dies or the connection
/// drops around the call.
struct LostAnswer<'a> {
    wallet: &'a BitcoinRpc,
    sent: bool,
}

impl Payments for LostAnswer<'_> {
    async fn new_address(&self) -> Result<String, WalletError> {
        self.wallet.new_address().await
    }
    async fn balance(&self) -> Result<u64, WalletError> {
        self.wallet.balance().await
    }
    async fn send_many(
        &self,
        outputs: &[(String, u64)],
        label: &str,
    ) -> Result<String, WalletError> {
        if self.sent {
            self.wallet.send_many(outputs, label).await?;
        }
        Err(WalletError::Unreachable {
            url: "test".into(),
            method: "sendmany",
            reason: "the answer was lost".into(),
        })
    }
    async fn find_sent(
        &self,
        label: &str,
        outputs: &[(String, u64)],
        since: u64,
        known: &std::collections::HashSet<String>,
    ) -> Result<Option<WalletTx>, WalletError> {
        self.wallet.find_sent(label, outputs, since, known).await
    }
    async fn validate_address(&self, address: &str) -> Result<bool, WalletError> {
        self.wallet.validate_address(address).await
    }
    async fn transaction(&self, txid: &str) -> Result<WalletTx, WalletError> {
        self.wallet.transaction(txid).await
    }
    async fn received_by(&self, address: &str, min_conf: u32) -> Result<u64, WalletError> {
        self.wallet.received_by(address, min_conf).await
    }
}

#[tokio::test]
async fn a_send_whose_answer_was_lost_is_found_by_its_label_or_paid_again_once() {
    let node = Regtest::start();
    node.mine(5).await;
    let wallet = node.wallet();
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
    let owner = Keypair::generate_ed25519();
    let payout = wallet.new_address().await.unwrap();
    let c = contract(&owner, 1_000, 0, 10, payout.clone());
    ledger.add_contract(&c).unwrap();
    let rules = SettleRules {
        min_payout: 1,
        in_flight: 30,
    };

    // Sent, then the answer lost: the next settlement finds the transaction
    // by its label and pays nothing again.
    ledger.record_challenge(&c.terms.id, 5, true, GIB).unwrap();
    let lost = LostAnswer {
        wallet: &wallet,
        sent: true,
    };
    assert!(ledger.settle(&lost, 10, rules).await.is_err());
    assert_eq!(
        ledger.owed().unwrap(),
        1_000,
        "in a batch not yet known sent"
    );
    assert_eq!(
        ledger.settle(&wallet, 11, rules).await.unwrap(),
        Settlement::Nothing
    );
    let batches = ledger.batches().unwrap();
    let BatchState::Sent(txid) = &batches[0].1.state else {
        panic!("the lost send was found: {batches:?}")
    };
    assert_eq!(paid_in(&node, txid, &payout), 1_000);
    assert_eq!(ledger.owed().unwrap(), 0);

    // Lost before it reached the node: while a call could still be running
    // nothing is paid; after that, the period is paid once.
    ledger.record_challenge(&c.terms.id, 15, true, GIB).unwrap();
    let lost = LostAnswer {
        wallet: &wallet,
        sent: false,
    };
    assert!(ledger.settle(&lost, 20, rules).await.is_err());
    assert_eq!(
        ledger.settle(&wallet, 21, rules).await.unwrap(),
        Settlement::Waiting
    );
    let Settlement::Paid {
        txid: again, sats, ..
    } = ledger.settle(&wallet, 50, rules).await.unwrap()
    else {
        panic!("abandoned after in_flight, then paid")
    };
    assert_eq!(sats, 1_000);
    let batches = ledger.batches().unwrap();
    assert!(
        matches!(batches[1].1.state, BatchState::Abandoned(_)),
        "{batches:?}"
    );
    assert_eq!(batches[2].1.state, BatchState::Sent(again.clone()));
    node.mine(1).await;
    assert_eq!(
        wallet.received_by(&payout, 1).await.unwrap(),
        2_000,
        "each period once"
    );
}
