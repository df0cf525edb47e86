//! `fincrypt serve`: a storage node that holds other people's blocks.
//!
//! It needs no passphrase: it only ever sees ciphertext. Its held blocks, and
//! who placed each, live in `DATA/held/`, and its node key (its PeerId) in
//! `CONFIG/node.key`; with `--home DIR` both are in DIR.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fincrypt_blockstore::{LocalStore, StoreOptions};
use fincrypt_market::holder::{Asking, HolderTerms};
use fincrypt_market::wallet::{BitcoinRpc, Payments};
use fincrypt_net::{Holder, Multiaddr, Node, NodeConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Home;
use crate::control::{self, Answer, Request};

/// What `fincrypt serve` was asked to do.
pub struct ServeArgs {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to join the network through.
    pub bootstrap: Vec<Multiaddr>,
    /// Bytes of held blocks this node accepts.
    pub capacity: u64,
    /// The only peers that may place blocks here (empty: any peer).
    pub accept_from: Vec<fincrypt_net::PeerId>,
    /// Satoshis per GiB per period (0: free).
    pub price: u64,
    /// The fewest periods a contract lasts.
    pub min_duration: u32,
    /// The period the price is for, in seconds.
    pub period: u64,
    /// Where payments go; empty: a new address of the wallet at `bitcoin`.
    pub payout_address: String,
    /// Satoshis an owner may leave unpaid for a later settlement.
    pub carry: u64,
    /// Periods unpaid before an owner may place no more here.
    pub unpaid_periods: u64,
    /// The lowest price taken from a payer whose pricing floats (0, or
    /// over the price: the price).
    pub floor: u64,
    /// The Bitcoin node's wallet, if configured.
    pub bitcoin: Option<fincrypt_market::wallet::RpcSettings>,
}

/// Runs a holder node in the foreground until SIGTERM or SIGINT.
pub fn serve(home: &Home, args: ServeArgs) -> Result<()> {
    // Every put brings a block-sized buffer that is freed once stored. With
    // mimalloc's default 10 ms before freed memory goes back to the system,
    // most of them came from fresh pages, faulted in and zeroed: about a
    // tenth of a holder's CPU in scripts/bench-net.sh. A second's delay
    // reuses them; the memory kept is bounded by the puts served at once.
    // MIMALLOC_PURGE_DELAY, when set, still wins (for measurements).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time.
        unsafe { libmimalloc_sys::mi_option_set(crate::daemon::MI_OPTION_PURGE_DELAY, 1000) };
    }
    // One async worker: a holder's async side only receives and opens
    // records (over a GB/s on one core) and runs the libp2p event loop; the
    // hashing and the disk are on the blocking pool. A second worker only
    // added context switches: on 2 cores shared with the owner and two other
    // nodes, scripts/bench-net.sh replicated 0.2 s faster with one.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(home, args))
}

/// How often a priced node announces its offer in the DHT (the first
/// announcement may find no peer yet; Kademlia keeps one for a day).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(60);

/// How often a priced node reads its income for `status`.
const INCOME_EVERY: Duration = Duration::from_secs(10);

/// A wallet's balance, and the payments to `payout` among its newest
/// transactions (none when `payout` is empty); 10 s at most.
async fn read_income(wallet: &BitcoinRpc, payout: &str) -> Result<(u64, Vec<control::Income>)> {
    let ask = async {
        let balance = wallet.balance().await?;
        let receipts = if payout.is_empty() {
            Vec::new()
        } else {
            wallet.receipts(payout, INCOME_LISTED).await?
        };
        Ok::<_, fincrypt_market::wallet::WalletError>((balance, receipts))
    };
    let (balance, receipts) = tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .context("the Bitcoin node did not answer in 10 s")??;
    let income = receipts
        .into_iter()
        .map(|r| control::Income {
            txid: r.txid,
            sats: r.sats,
            confirmations: r.confirmations,
            time: r.time,
        })
        .collect();
    Ok((balance, income))
}

/// What each transaction paid this node, by txid.
fn received(income: &[control::Income]) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    for i in income {
        let e = out.entry(i.txid.clone()).or_default();
        *e = e.saturating_add(i.sats);
    }
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Transactions a review looks up in the wallet at most.
const LOOKUPS_PER_REVIEW: usize = 64;

/// Keeps account of what each owner owes, four times a period: samples
/// the bytes held for it, reads the wallet's payments, and cuts, restores
/// or releases owners as `HolderTerms::review` decides.
async fn review_dues(wallet: Arc<BitcoinRpc>, terms: Arc<HolderTerms>, holder: Holder) {
    let every = Duration::from_millis((terms.asking().period.saturating_mul(250)).max(500));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Each transaction a notice names is looked up until the wallet
        // shows it confirmed (however old it is by then).
        let unverified = match terms.unverified(LOOKUPS_PER_REVIEW) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read payment notices");
                continue;
            }
        };
        let mut wallet_ok = true;
        for txid in unverified {
            match wallet.paid_to(&txid, &terms.asking().payout).await {
                Ok(Some((sats, confirmations))) if confirmations >= 1 => {
                    if let Err(e) = terms.verify(&txid, sats) {
                        tracing::warn!(error = %e, "cannot record a payment");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // Without the wallet nothing can be judged: no owner is cut for it.
                    tracing::warn!(error = %e, "cannot read payments; owners' dues are not reviewed this time");
                    wallet_ok = false;
                    break;
                }
            }
        }
        if !wallet_ok {
            continue;
        }
        let (terms, holder) = (terms.clone(), holder.clone());
        let reviewed = tokio::task::spawn_blocking(move || -> Result<()> {
            let held: HashMap<fincrypt_net::PeerId, u64> = holder
                .held_by_placer()?
                .into_iter()
                .map(|(p, (_, bytes))| (p, bytes))
                .collect();
            // Only confirmed payments count: an unconfirmed one may yet be replaced.
            for (id, owner) in terms.review(&held, &terms.verified()?, unix_now())? {
                let (blocks, bytes) = holder.release_all(&owner)?;
                terms.released(&id, blocks, bytes)?;
            }
            Ok(())
        })
        .await;
        match reviewed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "reviewing owners' dues failed")
            }
            Err(e) => tracing::error!(error = %e, "the review of owners' dues failed"),
        }
    }
}

/// Transactions of the wallet looked through for this node's income.
const INCOME_LISTED: usize = 1000;

/// What the node asks: its price, and where it is paid (its wallet gives a
/// new address when none is set).
async fn asking(args: &ServeArgs) -> Result<Asking> {
    let payout = if args.price == 0 || !args.payout_address.is_empty() {
        args.payout_address.clone()
    } else if let Some(rpc) = &args.bitcoin {
        let wallet = BitcoinRpc::new(rpc)?;
        wallet
            .new_address()
            .await
            .context("asking the Bitcoin node's wallet for a payout address")?
    } else {
        bail!(
            "a price needs somewhere to be paid: give --payout-address ADDRESS, or set \
             bitcoin_rpc_url (with its login) so the node's wallet gives an address"
        );
    };
    Ok(Asking {
        price: args.price,
        min_duration: args.min_duration,
        period: args.period,
        payout,
        carry: args.carry,
        unpaid_periods: args.unpaid_periods,
        floor: if args.floor == 0 {
            args.price
        } else {
            args.floor.min(args.price)
        },
    })
}

async fn run(home: &Home, args: ServeArgs) -> Result<()> {
    if args.listen.is_empty() {
        bail!("serve needs at least one --listen address");
    }
    // Signals are caught from the start, so one that arrives while the node
    // is still starting is not lost (and does not kill the process mid-write).
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let asking = asking(&args).await?;

    let store = LocalStore::open(&home.held_dir(), StoreOptions::default())
        .with_context(|| format!("opening the held volume in {}", home.held_dir().display()))?;
    let store = Arc::new(store);
    let holder = Holder::open(store.clone(), &home.placements_file(), args.capacity)?;
    if !args.accept_from.is_empty() {
        holder.accept_from(Some(args.accept_from));
    }
    let mut config = NodeConfig::with_key_file(&home.node_key_file())?;
    let terms = HolderTerms::open(config.keypair.clone(), asking, &home.contracts_file())
        .with_context(|| format!("opening {}", home.contracts_file().display()))?;
    if terms.asking().price > 0 {
        eprintln!(
            "fincrypt serve: storing under contract at {} sats per GiB per period (at least {} periods), paid to {}",
            terms.asking().price,
            terms.asking().min_duration,
            terms.asking().payout
        );
    }
    let terms = Arc::new(terms);
    holder.set_terms(terms.clone());
    config.listen = args.listen;
    config.bootstrap = args.bootstrap;
    let node = Node::start(config, Some(Arc::new(holder.clone()))).await?;
    if terms.asking().price > 0 {
        // Announced in the DHT, so that owners beyond its neighbours find
        // its offer; again now and then, as peers come and go.
        let client = node.client();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ANNOUNCE_EVERY);
            loop {
                every.tick().await;
                if let Err(e) = client.provide_offers().await {
                    tracing::debug!(error = %e, "the offer was not announced in the DHT this time");
                }
            }
        });
    }

    let peer = node.peer_id();
    let stats = holder.stats();
    eprintln!(
        "fincrypt serve: peer {peer}, holding {} blocks ({} of {} bytes)",
        stats.held_blocks, stats.held_bytes, stats.capacity
    );
    for addr in node.listen_addrs() {
        eprintln!("fincrypt serve: listening on {addr}/p2p/{peer}");
    }
    let socket = control::socket_path(&home.data_dir);
    let listen: Vec<String> = node
        .listen_addrs()
        .iter()
        .map(|a| format!("{a}/p2p/{peer}"))
        .collect();
    let (client, h, runtime) = (
        node.client(),
        holder.clone(),
        tokio::runtime::Handle::current(),
    );
    let bulk_port = node.bulk_port();
    let bootstraps = node.bootstrap_peers();
    let wallet = match &args.bitcoin {
        Some(rpc) => Some(Arc::new(BitcoinRpc::new(rpc)?)),
        None => None,
    };
    // What the wallet says of this node's income: balance, and payments to
    // its payout address (none without a wallet or a price).
    let income = {
        let (wallet, runtime, payout) = (
            wallet.clone(),
            runtime.clone(),
            terms.asking().payout.clone(),
        );
        move || -> Result<(Option<u64>, Vec<control::Income>)> {
            match &wallet {
                Some(w) => runtime
                    .block_on(read_income(w, &payout))
                    .map(|(b, i)| (Some(b), i)),
                None => Ok((None, Vec::new())),
            }
        }
    };
    // `status` shows what was earned as last read here, so that it answers
    // at once even while the Bitcoin node is slow or down.
    let earned = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(w) = wallet.clone().filter(|_| terms.asking().price > 0) {
        let (earned, payout) = (earned.clone(), terms.asking().payout.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(INCOME_EVERY);
            loop {
                every.tick().await;
                match read_income(&w, &payout).await {
                    Ok((_, income)) => earned.store(
                        income.iter().map(|i| i.sats).sum(),
                        std::sync::atomic::Ordering::Relaxed,
                    ),
                    Err(e) => tracing::debug!(error = %e, "cannot read this node's income"),
                }
            }
        });
    }
    if terms.asking().price > 0 {
        // Owners are held to their payments only where the node can see them.
        let sees = match &wallet {
            None => Err("without a Bitcoin node (bitcoin_rpc_url)".to_string()),
            Some(w) => match w.is_mine(&terms.asking().payout).await {
                Ok(true) => Ok(w.clone()),
                Ok(false) => Err(format!(
                    "its wallet does not own the payout address {}, so",
                    terms.asking().payout
                )),
                Err(e) => Err(format!(
                    "its wallet did not say whether it owns the payout address ({e}), so"
                )),
            },
        };
        match sees {
            Ok(w) => {
                tokio::spawn(review_dues(w, terms.clone(), holder.clone()));
            }
            Err(why) => eprintln!(
                "fincrypt serve: {why} this node cannot see payments: it never stops taking \
                 blocks from an owner that does not pay"
            ),
        }
    }
    let answer = move |req: Request| -> Result<Answer> {
        match req {
            Request::Wallet => {
                let (balance_sats, income) = income()?;
                Ok(Answer::Wallet(control::WalletView {
                    balance_sats,
                    income,
                    ..Default::default()
                }))
            }
            Request::MarketContracts => {
                // What owners said they paid counts once this node's wallet
                // shows each transaction paying its address at least that.
                // Confirmed payments, and those the wallet lists as newly seen.
                let (_, income) = income()?;
                let mut seen = terms.verified()?;
                for (txid, sats) in received(&income) {
                    let e = seen.entry(txid).or_default();
                    *e = (*e).max(sats);
                }
                Ok(Answer::Contracts(terms.views(&seen, unix_now())?))
            }
            Request::Status => {
                let peers = runtime
                    .block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), client.peers()).await
                    })
                    .ok()
                    .and_then(|r| r.ok())
                    .map_or(0, |list| list.iter().filter(|p| p.connected).count());
                let s = h.stats();
                let volume = h.store().stats();
                Ok(Answer::Status(Box::new(control::Status {
                    role: "serve".into(),
                    env_file: crate::config::env_file(),
                    peer_id: Some(peer.to_string()),
                    listen_addrs: listen.clone(),
                    bulk_port,
                    bootstrap: bootstraps.list(),
                    peers: peers as u64,
                    capacity: s.capacity,
                    offered: Some(s.offered),
                    held_blocks: s.held_blocks,
                    held_bytes: s.held_bytes,
                    root_records: s.root_records,
                    price: terms.asking().price,
                    contracts: terms.live_contracts(),
                    earned_sats: earned.load(std::sync::atomic::Ordering::Relaxed),
                    cached_blocks: volume.cached_blocks,
                    cached_bytes: volume.cached_bytes,
                    ..Default::default()
                })))
            }
            Request::Scrub => {
                let r = h.store().scrub()?;
                Ok(Answer::Scrub(control::ScrubSummary {
                    by: "storage node".into(),
                    checked: r.checked,
                    corrupt: r.corrupt.iter().map(|s| s.to_hex()).collect(),
                    missing: r.missing.iter().map(|s| s.to_hex()).collect(),
                    stray: r.orphans.iter().map(|p| p.display().to_string()).collect(),
                    repaired: Vec::new(),
                }))
            }
            _ => bail!("this is a storage node (fincrypt serve): it has no filesystem"),
        }
    };
    control::serve_until_stopped(&socket, answer, "serve", &mut term, &mut int).await;
    node.shutdown().await;
    drop(holder);
    // Close the volume cleanly when nothing else holds it (a last request
    // still finishing on the blocking pool may; its drop then closes it).
    if let Ok(store) = Arc::try_unwrap(store) {
        store.close()?;
    }
    Ok(())
}

/// The smallest `--capacity` a storage node takes: room for one block of
/// a megabyte (a smaller one could hold almost nothing).
pub const MIN_CAPACITY: u64 = 1 << 20;

/// Parses `--capacity`: a size (see [`parse_size`]) of at least
/// [`MIN_CAPACITY`]. The node offers less while its disk has less room.
pub fn parse_capacity(s: &str) -> Result<u64, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s:?}: a capacity cannot be negative"));
    }
    let bytes = parse_size(s)?;
    if bytes < MIN_CAPACITY {
        return Err(format!(
            "{s:?} is {bytes} bytes: a storage node needs room for at least 1MiB of blocks \
             (to hold nothing for peers, do not run `fincrypt serve`)"
        ));
    }
    Ok(bytes)
}

/// Parses a size such as `2GiB`, `500MB`, `1.5G` or `4096` (bytes).
///
/// `K`, `M`, `G`, `T` (with or without a `B`) are powers of 1000; `KiB`,
/// `MiB`, `GiB`, `TiB` powers of 1024. Case does not matter; a space may
/// separate number and unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let multiplier: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000_u128.pow(2),
        "g" | "gb" => 1000_u128.pow(3),
        "t" | "tb" => 1000_u128.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(format!("{s:?}: no number"));
    }
    if fraction.len() > 9 || fraction.contains('.') {
        return Err(format!("{s:?}: not a number"));
    }
    let parse = |digits: &str| -> Result<u128, String> {
        if digits.is_empty() {
            Ok(0)
        } else {
            digits
                .parse::<u128>()
                .map_err(|_| format!("{s:?}: not a number"))
        }
    };
    let scale = 10_u128.pow(fraction.len() as u32);
    let whole = parse(whole)?;
    let fraction = parse(fraction)?;
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|w| w.checked_add(fraction * multiplier / scale))
        .filter(|b| *b <= u64::MAX as u128)
        .ok_or_else(|| format!("{s:?}: too large"))?;
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_capacity, parse_size};

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("500mb"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10 KiB"), Ok(10 << 10));
        assert_eq!(parse_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_capacity("1MiB"), Ok(1 << 20));
        for bad in ["0", "1", "1KiB", "-1", " -5GiB"] {
            assert!(parse_capacity(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        for bad in [
            "",
            "GiB",
            "2 parsecs",
            "1.2.3G",
            "-5MB",
            "99999999999999999999TB",
            ".",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit"));
    }
}
