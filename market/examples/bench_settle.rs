//! One period's settlement for `CONTRACTS` contracts (default 100) on a real
//! regtest node, run by scripts/bench-market.sh: the challenges (real storage
//! proofs, `CHALLENGES` per contract, default 4), the accounting in the
//! ledger, and the one `sendmany` that pays every holder, beside the same
//! payments made one transaction each. Prints Markdown rows.
//!
//! Needs FINCRYPT_BITCOIN_RPC_URL, _USER and _PASSWORD, and a wallet with at
//! least CONTRACTS + 1 confirmed coins (the script mines them).

use std::error::Error;
use std::time::{Duration, Instant};

use fincrypt_blockstore::Score;
use fincrypt_blockstore::score::{challenge_index, prove, verify};
use fincrypt_market::contract::{CONTRACT_VERSION, Terms};
use fincrypt_market::ledger::{Ledger, SettleRules, Settlement};
use fincrypt_market::wallet::{BitcoinRpc, Payments, RpcAuth, RpcSettings};
use libp2p::identity::Keypair;

const GIB: u64 = 1 << 30;
const PRICE: u64 = 1_000;

/// CPU seconds this process has used.
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(r.ru_utime) + t(r.ru_stime)
}

fn var(name: &str) -> Result<String, Box<dyn Error>> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: usize = std::env::var("CONTRACTS").map_or(Ok(100), |v| v.parse())?;
    let challenges: u64 = std::env::var("CHALLENGES").map_or(Ok(4), |v| v.parse())?;
    let wallet = BitcoinRpc::new(&RpcSettings {
        url: var("FINCRYPT_BITCOIN_RPC_URL")?,
        wallet: None,
        auth: RpcAuth::UserPass(
            var("FINCRYPT_BITCOIN_RPC_USER")?,
            var("FINCRYPT_BITCOIN_RPC_PASSWORD")?,
        ),
    })?;
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(&dir.path().join("ledger.redb"))?;
    let owner = Keypair::generate_ed25519();
    let mut payees = Vec::new();
    for i in 0..n {
        let holder = Keypair::generate_ed25519();
        let payout = wallet.new_address().await?;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let c = Terms {
            version: CONTRACT_VERSION,
            id,
            owner: owner.public().to_peer_id().to_bytes(),
            holder: holder.public().to_peer_id().to_bytes(),
            price: PRICE,
            start: 0,
            min_duration: 1,
            period: 3600,
            payout: payout.clone(),
            carry: u64::MAX,
            payer: Vec::new(),
            consent: None,
        }
        .propose(&owner)?
        .accept(&holder)?;
        ledger.add_contract(&c)?;
        payees.push((id, payout));
    }
    // Each holder keeps a 4 MiB block; each challenge asks a segment of it
    // with a fresh nonce and checks the proof against the score alone.
    let block: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let score = Score::of(&block);

    // The holders' side, in this process: a proof per challenge.
    let (h0, hc0) = (Instant::now(), cpu());
    let mut asked = Vec::new();
    for (id, _) in &payees {
        for k in 0..challenges {
            let nonce: [u8; 32] = rand::random();
            let index = challenge_index(&score, &nonce, block.len() as u64);
            asked.push((*id, k, index, prove(&block, index)));
        }
    }
    let (h1, hc1) = (Instant::now(), cpu());
    // The owner's: each proof checked against the score alone, and recorded.
    let (t0, c0) = (Instant::now(), cpu());
    for (id, k, index, proof) in &asked {
        let passed = proof.as_ref().is_some_and(|p| verify(&score, *index, p));
        ledger.record_challenge(id, 10 + k, passed, GIB)?;
    }
    let (t1, c1) = (Instant::now(), cpu());
    let rules = SettleRules {
        min_payout: 1,
        in_flight: 60,
    };
    let Settlement::Paid {
        txid,
        sats,
        payees: outputs,
        ..
    } = ledger.settle(&wallet, 3600, rules).await?
    else {
        return Err("the period did not settle".into());
    };
    let (t2, c2) = (Instant::now(), cpu());
    let (fee, size) = wallet.fee_and_size(&txid).await?;

    // The same payments, one transaction each.
    let (t3, c3) = (Instant::now(), cpu());
    let (mut fees, mut sizes) = (0u64, 0u64);
    for (i, (_, address)) in payees.iter().enumerate() {
        let one = wallet
            .send_many(&[(address.clone(), PRICE)], &format!("bench single {i}"))
            .await?;
        let (f, s) = wallet.fee_and_size(&one).await?;
        fees += f;
        sizes += s;
    }
    let (t4, c4) = (Instant::now(), cpu());

    let secs = |d: Duration| format!("{:.3}", d.as_secs_f64());
    println!(
        "| {n} contracts, one period | wall s | CPU s (this process) | transactions | bytes | fee, sats |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| holders: prove {challenges} challenges each (4 MiB block) | {} | {} | | | |",
        secs(h1 - h0),
        secs(hc1 - hc0)
    );
    println!(
        "| owner: verify each proof and record it in the ledger | {} | {} | | | |",
        secs(t1 - t0),
        secs(c1 - c0)
    );
    println!(
        "| settle: one `sendmany` to {outputs} holders, {sats} sats | {} | {} | 1 | {size} | {fee} |",
        secs(t2 - t1),
        secs(c2 - c1)
    );
    println!(
        "| the same, one transaction per holder | {} | {} | {n} | {sizes} | {fees} |",
        secs(t4 - t3),
        secs(c4 - c3)
    );
    Ok(())
}
