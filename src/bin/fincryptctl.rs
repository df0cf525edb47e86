//! `fincryptctl`: ask a running Fincrypt daemon for its status, a sync or a snapshot.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fincrypt::config::HomeArg;
use fincrypt::control::{self, Answer, Request, Status, WorkerStatus};

#[derive(Parser)]
#[command(
    name = "fincryptctl",
    version,
    about = "Control a running Fincrypt daemon"
)]
struct Cli {
    #[command(flatten)]
    home: HomeArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show health and usage: blocks and bytes stored, snapshots, peers.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Return once everything written so far is durable and a new root is committed.
    Sync {
        /// Then also wait until every own block has as many confirmed holders
        /// on peers as its redundancy asks; exit 2 with the count if not by the timeout.
        #[arg(long)]
        replicated: bool,
        /// Seconds to wait for replication.
        #[arg(
            long,
            default_value_t = 300,
            value_name = "SECONDS",
            requires = "replicated"
        )]
        timeout: u64,
    },
    /// Copies on peers of a directory or file inside the mount (the xattr
    /// user.fincrypt.redundancy, inherited by everything below unless overridden).
    Redundancy {
        #[command(subcommand)]
        command: RedundancyCommand,
    },
    /// Who holds what, as the owner's manifest under the newest root says
    /// (that root is not in it yet: its holders go into the next one).
    Manifest {
        /// Print every entry as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// List or take snapshots.
    Snapshots {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// Every background worker: state, last run, work done, queue, last error.
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Paid storage: offers seen and contracts made.
    Market {
        #[command(subcommand)]
        command: MarketCommand,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
    },
    /// The Bitcoin wallet: balance, periods it funds and payments made (an
    /// owner), or income received (a storage node).
    Wallet {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Watched folders (`fincrypt watch`): how their backups stand.
    Watch {
        #[command(subcommand)]
        command: WatchCommand,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// A mediator: a client's deposit address and escrow, or (on the
    /// mediator's own home) its clients, holders and settlements.
    Mediator {
        #[command(subcommand)]
        command: MediatorCommand,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WatchCommand {
    /// Per watched folder: files and bytes backed up, the last change seen
    /// and backed up, changes pending, what could not be backed up (with
    /// paths), and whether inotify or rescans drive it.
    Status,
    /// Rescans watched folder NAME (every folder without one) now and waits
    /// until it is done: every file is compared with what was backed up,
    /// and only files that changed are read. For changes made where inotify
    /// cannot see them (another machine's writes on a network filesystem).
    Rescan { name: Option<String> },
}

#[derive(Subcommand)]
enum MediatorCommand {
    /// This client's deposit address at its mediator (the same each time).
    DepositAddress,
    /// This client's escrow at its mediator: deposited, pending, paid, fees, left.
    Balance,
    /// On a mediator's home: every client with its escrow.
    Clients,
    /// On a mediator's home: every storage node under contract, with its
    /// price, the bytes it keeps, its audit score and state.
    Holders,
    /// On a mediator's home: every settlement (one transaction each), with
    /// its txid and what it paid each holder.
    Periods,
}

#[derive(Subcommand)]
enum MarketCommand {
    /// Offers seen from storage nodes: price, room, minimum duration, age,
    /// and why placement skips one.
    Offers,
    /// Contracts: holder (or owner), bytes, price, start, periods passed,
    /// failed and paid, state.
    Contracts,
}

#[derive(Subcommand)]
enum RedundancyCommand {
    /// Ask for N copies of everything under PATH.
    Set {
        path: PathBuf,
        #[arg(value_parser = clap::value_parser!(u8).range(1..))]
        n: u8,
    },
    /// Show PATH's effective redundancy and where it comes from.
    Get { path: PathBuf },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// List retained snapshots, oldest first.
    List,
    /// Take a snapshot now.
    Create,
    /// Delete snapshots by name (as `list` shows them), or all older than
    /// an age; GC then frees what only they kept, and copies only they asked
    /// for (a redundancy lowered since) are asked no more.
    Delete {
        /// Snapshot names, e.g. 2026-12-04T10:15:00.123Z.
        names: Vec<String>,
        /// Every snapshot older than this, e.g. 30d, 12h, 90m.
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Option<u64>,
    },
}

/// Parses an age such as `30d`, `12h`, `90m`, `45s`; a bare number is
/// refused (`30` would mean 30 seconds, deleting almost everything).
fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: an age is a number and a unit, e.g. 30d, 12h, 90m"))?;
    let unit = match unit {
        "" => {
            return Err(format!(
                "{s:?}: give a unit, e.g. {s}d for days (s, m, h, d or w)"
            ));
        }
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (s, m, h, d or w)")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?}: too long an age"))
}

fn main() -> ExitCode {
    // Everything this process creates (homes, keys, volumes, indexes,
    // sockets) is for its user alone, whatever umask it was started with.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
    if let Err(e) = fincrypt::config::load_dotenv() {
        eprintln!("fincryptctl: {e:#}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fincryptctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const REDUNDANCY_XATTR: &str = "user.fincrypt.redundancy";

fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    let mut buf = vec![0u8; 64];
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        bail!("reading {name} of {}: {e}", path.display());
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        bail!(
            "setting {name} on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn status(data: &Path) -> Result<Status> {
    control::call_for(data, &Request::Status, None, |a| match a {
        Answer::Status(s) => Some(*s),
        _ => None,
    })
}

/// The mount point and default redundancy of the running daemon, and `path` made absolute inside it.
fn inside_mount(data: &Path, path: &Path) -> Result<(PathBuf, u8, PathBuf)> {
    let v = status(data)?;
    let Some(mnt) = v.mountpoint else {
        bail!("the daemon for this home is a storage node: it has no mount");
    };
    let default = v.default_redundancy;
    let abs = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    if !abs.starts_with(&mnt) {
        bail!(
            "{} is not inside the mount at {}",
            path.display(),
            mnt.display()
        );
    }
    Ok((mnt, default, abs))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let home = cli.home.resolve()?;
    let data = &home.data_dir;
    match cli.command {
        Command::Status { json } => {
            let v = status(data)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                print_status(&v);
            }
        }
        Command::Sync {
            replicated,
            timeout,
        } => {
            let v = control::call_for(data, &Request::Sync, None, |a| match a {
                Answer::Synced(s) => Some(s),
                _ => None,
            })?;
            println!("synced; root committed at {}", v.time);
            if replicated {
                let req = Request::Replicate {
                    timeout_secs: timeout,
                };
                let wait = Some(Duration::from_secs(timeout + 120));
                let v = control::call_for(data, &req, wait, |a| match a {
                    Answer::Replication(r) => Some(r),
                    _ => None,
                })?;
                if v.under_replicated > 0 {
                    eprintln!(
                        "fincryptctl: {} own blocks still have fewer holders than asked after {timeout} s ({})",
                        v.under_replicated, v.note
                    );
                    return Ok(ExitCode::from(2));
                }
                println!(
                    "replicated: {} blocks, {} copies on peers",
                    v.replicated_blocks, v.placed_copies
                );
                for (n, count) in &v.blocks_by_redundancy {
                    println!("  {count} blocks at redundancy {n}");
                }
            }
        }
        Command::Redundancy {
            command: RedundancyCommand::Set { path, n },
        } => {
            inside_mount(data, &path)?;
            set_xattr(&path, REDUNDANCY_XATTR, n.to_string().as_bytes())?;
        }
        Command::Redundancy {
            command: RedundancyCommand::Get { path },
        } => {
            let (mnt, default, abs) = inside_mount(data, &path)?;
            let mut found = None;
            for dir in abs.ancestors() {
                if let Some(v) = get_xattr(dir, REDUNDANCY_XATTR)? {
                    let n: u8 = String::from_utf8_lossy(&v)
                        .trim()
                        .parse()
                        .with_context(|| format!("{REDUNDANCY_XATTR} of {}", dir.display()))?;
                    found = Some((n, dir.to_path_buf()));
                    break;
                }
                if dir == mnt {
                    break;
                }
            }
            match found {
                Some((n, dir)) if dir == abs => println!("{n} (set here)"),
                Some((n, dir)) => println!("{n} (inherited from {})", dir.display()),
                None => println!("{default} (the default)"),
            }
        }
        Command::Manifest { json } => show(
            data,
            &Request::Manifest,
            json,
            |a| match a {
                Answer::Manifest(m) => Some(m),
                _ => None,
            },
            print_manifest,
        )?,
        Command::Snapshots {
            command: SnapshotCommand::List,
        } => {
            let list = control::call_for(data, &Request::SnapshotsList, None, |a| match a {
                Answer::Snapshots(l) => Some(l),
                _ => None,
            })?;
            if list.is_empty() {
                println!(
                    "no snapshots yet (one is taken every snapshot_interval seconds, or now with `fincryptctl snapshots create`)"
                );
            }
            for s in &list {
                println!("{}", s.name);
            }
        }
        Command::Snapshots {
            command: SnapshotCommand::Create,
        } => {
            let v = control::call_for(data, &Request::SnapshotsCreate, None, |a| match a {
                Answer::Synced(s) => Some(s),
                _ => None,
            })?;
            println!("{}", v.time);
        }
        Command::Snapshots {
            command: SnapshotCommand::Delete { names, older_than },
        } => {
            if names.is_empty() && older_than.is_none() {
                bail!("name the snapshots to delete, or give --older-than AGE");
            }
            let request = Request::SnapshotsDelete {
                names,
                older_than_secs: older_than,
            };
            let v = control::call_for(data, &request, None, |a| match a {
                Answer::Deleted(d) => Some(d),
                _ => None,
            })?;
            if v.snapshots.is_empty() {
                println!("no snapshot is that old: none deleted");
            } else {
                for s in &v.snapshots {
                    println!("deleted {s}");
                }
                println!("{} blocks freed", v.freed_blocks);
            }
            if let Some(s) = &v.kept_for_network {
                println!(
                    "{s} is what the root the network holds names: its blocks stay until a \
                     newer root is published"
                );
            }
        }
        Command::Market {
            command: MarketCommand::Offers,
            json,
        } => show(
            data,
            &Request::MarketOffers,
            json,
            |a| match a {
                Answer::Offers(l) => Some(l),
                _ => None,
            },
            |l| print_offers(l),
        )?,
        Command::Market {
            command: MarketCommand::Contracts,
            json,
        } => show(
            data,
            &Request::MarketContracts,
            json,
            |a| match a {
                Answer::Contracts(l) => Some(l),
                _ => None,
            },
            |l| print_contracts(l),
        )?,
        Command::Wallet { json } => show(
            data,
            &Request::Wallet,
            json,
            |a| match a {
                Answer::Wallet(w) => Some(w),
                _ => None,
            },
            print_wallet,
        )?,
        Command::Mediator {
            command: MediatorCommand::DepositAddress,
            json,
        } => show(
            data,
            &Request::MediatorDepositAddress,
            json,
            |a| match a {
                Answer::DepositAddress(d) => Some(d),
                _ => None,
            },
            |d| println!("{}  (deposit to the mediator at {})", d.address, d.mediator),
        )?,
        Command::Mediator {
            command: MediatorCommand::Balance,
            json,
        } => show(
            data,
            &Request::MediatorBalance,
            json,
            |a| match a {
                Answer::Escrow(e) => Some(e),
                _ => None,
            },
            |e| print_escrows(std::slice::from_ref(e)),
        )?,
        Command::Mediator {
            command: MediatorCommand::Clients,
            json,
        } => show(
            data,
            &Request::MediatorClients,
            json,
            |a| match a {
                Answer::Escrows(l) => Some(l),
                _ => None,
            },
            |l| print_escrows(l),
        )?,
        Command::Mediator {
            command: MediatorCommand::Holders,
            json,
        } => show(
            data,
            &Request::MediatorHolders,
            json,
            |a| match a {
                Answer::Holders(l) => Some(l),
                _ => None,
            },
            |l| print_mediator_holders(l),
        )?,
        Command::Mediator {
            command: MediatorCommand::Periods,
            json,
        } => show(
            data,
            &Request::MediatorPeriods,
            json,
            |a| match a {
                Answer::Settlements(l) => Some(l),
                _ => None,
            },
            |l| print_settlements(l),
        )?,
        Command::Watch {
            command: WatchCommand::Status,
            json,
        } => show(
            data,
            &Request::WatchStatus,
            json,
            |a| match a {
                Answer::Watch(l) => Some(l),
                _ => None,
            },
            |l| print_watch(l),
        )?,
        Command::Watch {
            command: WatchCommand::Rescan { name },
            json,
        } => {
            let done = rescan(data, name)?;
            if json {
                let list: Vec<serde_json::Value> = done
                    .iter()
                    .map(|(w, read)| serde_json::json!({"folder": w, "bytes_read": read}))
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for (w, read) in &done {
                    println!(
                        "{}: rescanned in {:.3} s: {} files, {} bytes, {} bytes read",
                        w.name,
                        w.last_scan_seconds.unwrap_or(0.0),
                        w.files,
                        w.bytes,
                        read
                    );
                }
            }
        }
        Command::Workers { json } => show(
            data,
            &Request::Workers,
            json,
            |a| match a {
                Answer::Workers(l) => Some(l),
                _ => None,
            },
            |l| print_workers(l),
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the daemon of `data` and prints its answer: as JSON with `json`,
/// else for a person through `text`.
fn show<T: serde::Serialize>(
    data: &Path,
    request: &Request,
    json: bool,
    pick: impl FnOnce(Answer) -> Option<T>,
    text: impl FnOnce(&T),
) -> Result<()> {
    let v = control::call_for(data, request, None, pick)?;
    if json {
        println!("{}", serde_json::to_string(&v)?);
    } else {
        text(&v);
    }
    Ok(())
}

/// Asks the daemon to rescan folder `name` (every folder when none) and
/// waits until it has: each folder rescanned, with the bytes the rescan read.
fn rescan(data: &Path, name: Option<String>) -> Result<Vec<(control::WatchView, u64)>> {
    let status = |request: &Request| {
        control::call_for(data, request, None, |a| match a {
            Answer::Watch(l) => Some(l),
            _ => None,
        })
    };
    let before = status(&Request::WatchRescan { name: name.clone() })?;
    let (asked, mut wait) = (
        std::time::Instant::now(),
        std::time::Duration::from_millis(10),
    );
    let wanted: Vec<&control::WatchView> = before
        .iter()
        .filter(|w| name.as_ref().is_none_or(|n| *n == w.name))
        .collect();
    loop {
        let now = status(&Request::WatchStatus)?;
        let done: Vec<(control::WatchView, u64)> = wanted
            .iter()
            .filter_map(|b| {
                let w = now.iter().find(|w| w.name == b.name)?;
                (!w.rescan_pending).then(|| (w.clone(), w.bytes_read.saturating_sub(b.bytes_read)))
            })
            .collect();
        if done.len() == wanted.len() {
            for (w, _) in &done {
                // The scan that answered, not one that was already running
                // when the rescan was asked and failed before it (a daemon
                // too old to say: any scan that failed since).
                let b = wanted.iter().find(|b| b.name == w.name);
                let failed = w
                    .last_scan_failed
                    .unwrap_or_else(|| b.is_some_and(|b| w.scans_failed > b.scans_failed));
                if failed {
                    anyhow::bail!(
                        "the rescan of {} failed: `fincryptctl workers` shows why",
                        w.name
                    );
                }
            }
            return Ok(done);
        }
        if let Some(w) = wanted
            .iter()
            .find(|w| !now.iter().any(|n| n.name == w.name))
        {
            anyhow::bail!("{} stopped being watched during its rescan", w.name);
        }
        // Often for two seconds (an unchanged folder takes a fraction of
        // one), then less and less: a first backup may take hours.
        std::thread::sleep(wait);
        if asked.elapsed() > std::time::Duration::from_secs(2) {
            wait = (wait * 2).min(std::time::Duration::from_millis(500));
        }
    }
}

/// Watched folders for a person.
fn print_watch(list: &[control::WatchView]) {
    if list.is_empty() {
        println!("no folder is watched (fincrypt watch PATH adds one)");
    }
    let ago = |t: Option<u64>| match t {
        None => "never".to_owned(),
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("{} s ago", now.saturating_sub(t))
        }
    };
    for w in list {
        println!("{}  {}", w.name, w.path.display());
        println!(
            "  {} files, {} bytes backed up; last change seen {}, last backed up {}; {} directories pending",
            w.files,
            w.bytes,
            ago(w.last_change_seen),
            ago(w.last_backed_up),
            w.pending
        );
        if let Some(t) = w.last_scan_seconds {
            println!(
                "  {} full scans since start, the last in {t:.3} s; {} failed",
                w.scans, w.scans_failed
            );
        }
        if w.driver == "inotify" {
            println!(
                "  driven by inotify ({} directories watched)",
                w.watched_dirs
            );
        } else {
            println!("  driven by rescans: {}", w.driver_note);
        }
        if w.error_count > 0 {
            println!("  {} not backed up:", w.error_count);
            for p in &w.errors {
                println!("    {}: {}", p.path, p.why);
            }
        }
        if w.skipped_count > 0 {
            println!("  {} skipped:", w.skipped_count);
            for p in &w.skipped {
                println!("    {}: {}", p.path, p.why);
            }
        }
    }
}

/// Escrows for a person.
fn print_escrows(list: &[fincrypt_market::mediator::Escrow]) {
    if list.is_empty() {
        println!("no clients yet");
    }
    for e in list {
        println!(
            "{}  {}  escrow {} sats: deposited {} (+{} unconfirmed), paid {}, fees {} ({}%)",
            e.client,
            e.address,
            e.escrow_sats,
            e.deposited_sats,
            e.pending_sats,
            e.paid_sats,
            e.fees_sats,
            f64::from(e.fee_basis_points) / 100.0
        );
        let funded = if e.funded_periods == u64::MAX {
            "all".to_owned()
        } else {
            e.funded_periods.to_string()
        };
        println!(
            "    {} on {} holders; a period costs {} sats with the fee; the escrow pays for {funded} periods",
            bytes(e.bytes_placed),
            e.holders,
            e.cost_per_period
        );
        if e.low {
            println!(
                "    LOW: under the mediator's {} periods of grace; deposit more to {}, or holders go unpaid",
                e.grace_periods, e.address
            );
        }
        for p in &e.payments {
            println!(
                "    paid {} sats to {} for period {} in {}",
                p.sats, p.holder, p.period, p.txid
            );
        }
    }
}

/// A mediator's holders for a person.
fn print_mediator_holders(list: &[fincrypt_market::mediator::HolderView]) {
    if list.is_empty() {
        println!("no holders under contract yet");
    }
    for h in list {
        println!(
            "{}  {} sats/GiB/period  {}  for {} clients  audit score {:.3} ({} passed, {} failed)  {}",
            h.peer,
            h.price,
            bytes(h.bytes),
            h.clients,
            h.audit_score,
            h.audits_passed,
            h.audits_failed,
            h.state
        );
    }
}

/// A mediator's settlements for a person.
fn print_settlements(list: &[fincrypt_market::mediator::SettlementView]) {
    if list.is_empty() {
        println!("nothing paid yet");
    }
    for s in list {
        println!(
            "settlement {}  {}  {} sats for {} clients, {} contract periods  {}",
            s.batch, s.state, s.sats, s.clients, s.periods, s.txid
        );
        for (address, sats) in &s.outputs {
            println!("    {address}  {sats} sats");
        }
    }
}

/// `market offers` for a person.
fn print_offers(list: &[fincrypt_market::owner::OfferView]) {
    if list.is_empty() {
        println!("no offers seen yet (they are read as blocks are placed)");
    }
    for o in list {
        let price = if o.price == 0 {
            "free".to_owned()
        } else {
            format!("{} sats/GiB/{} s", o.price, o.period)
        };
        let note = if o.skipped.is_empty() {
            String::new()
        } else {
            format!("  skipped: {}", o.skipped)
        };
        println!(
            "{}  {price}  room {}  min {} periods  read {} s ago{note}",
            o.peer,
            bytes(o.room),
            o.min_duration,
            o.age_secs
        );
    }
}

/// `market contracts` for a person.
fn print_contracts(list: &[fincrypt_market::owner::ContractView]) {
    if list.is_empty() {
        println!("no contracts");
    }
    for c in list {
        // A storage node's view: what the owner owes it since its last payment.
        let owed = if c.owed_sats > 0 || c.periods_unpaid > 0 {
            format!(", {} unpaid ({} sats owed)", c.periods_unpaid, c.owed_sats)
        } else {
            String::new()
        };
        println!(
            "{}  holder {}  owner {}  {}  {} sats/GiB/{} s  since {}  periods: {} passed, \
                 {} failed, {} paid ({} sats){owed}  {}",
            c.id,
            c.holder,
            c.owner,
            bytes(c.bytes),
            c.price,
            c.period_secs,
            c.start,
            c.periods_passed,
            c.periods_failed,
            c.periods_paid,
            c.paid_sats,
            c.state
        );
    }
}

/// `wallet` for a person.
fn print_wallet(w: &control::WalletView) {
    match w.balance_sats {
        Some(b) => println!("balance            {b} sats"),
        None => println!(
            "balance            unknown: no wallet configured (bitcoin_rpc_url), or it did not answer"
        ),
    }
    if let Some(f) = w.funded_periods {
        let low = if w.low_balance { " (low)" } else { "" };
        println!(
            "funds              {f} periods at {} sats a period{low}",
            w.cost_per_period
        );
    }
    if !w.last_settlement.is_empty() {
        println!("last settlement    {}", w.last_settlement);
    }
    for p in &w.payments {
        println!(
            "paid {} sats to {} for period {} in {}",
            p.sats, p.holder, p.period, p.txid
        );
    }
    for i in &w.income {
        println!(
            "received {} sats in {} ({} confirmations)",
            i.sats, i.txid, i.confirmations
        );
    }
}

/// Bytes as a person reads them: `0 B`, `1.5 KiB`, `2.0 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `status` for a person: aligned labels, units, and only what applies.
fn print_status(v: &Status) {
    let row = |label: &str, value: String| println!("{label:<22} {value}");
    row("role", v.role.clone());
    if let Some(m) = &v.mountpoint {
        row("mounted on", m.display().to_string());
    }
    if let Some(p) = &v.peer_id {
        row("peer id", p.clone());
    }
    for a in &v.listen_addrs {
        row("listening on", a.clone());
    }
    if let Some(port) = v.bulk_port {
        row("bulk port", format!("tcp {port}"));
    }
    if v.role == "mount" {
        row(
            "own blocks",
            format!("{} ({})", v.own_blocks, bytes(v.own_bytes)),
        );
        row("unsealed", bytes(v.unsealed_bytes));
        row("snapshots", v.snapshots.to_string());
        row("default redundancy", v.default_redundancy.to_string());
        if let Some((all, live)) = v.redundancy_highest {
            let why = if all > live {
                format!(
                    " (the live tree asks for {live}: retained snapshots keep asking for \
                     {all}; `fincryptctl snapshots delete` those from before it was lowered)"
                )
            } else {
                String::new()
            };
            row("highest redundancy", format!("{all}{why}"));
        }
    }
    if v.capacity > 0 || v.held_blocks > 0 {
        row(
            "held for peers",
            format!(
                "{} blocks ({} of {})",
                v.held_blocks,
                bytes(v.held_bytes),
                bytes(v.capacity)
            ),
        );
        if let Some(offered) = v.offered.filter(|o| *o < v.capacity) {
            row(
                "room on disk",
                format!(
                    "{} more ({} in all): the disk is nearly full, peers are offered less",
                    bytes(offered.saturating_sub(v.held_bytes)),
                    bytes(offered)
                ),
            );
        }
    }
    row(
        "cached",
        format!("{} blocks ({})", v.cached_blocks, bytes(v.cached_bytes)),
    );
    if v.role == "mount" {
        row(
            "config",
            v.config_file
                .as_ref()
                .map_or("none (defaults)".into(), |p| p.display().to_string()),
        );
    }
    row(
        ".env",
        v.env_file
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
    );
    row("peers connected", v.peers.to_string());
    for b in &v.bootstrap {
        let state = if b.reached {
            "reached".to_owned()
        } else {
            let since = b.unreachable_since.map_or("not yet tried".to_owned(), |t| {
                let ago = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(t);
                format!("unreachable for {ago} s")
            });
            format!(
                "{since} ({} tries, still trying){}",
                b.attempts,
                b.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(": {e}"))
            )
        };
        row("bootstrap", format!("{} {state}", b.addr));
    }
    if v.role == "serve" {
        row("root records kept", format!("{} owners", v.root_records));
        if v.price > 0 {
            row(
                "price",
                format!(
                    "{} sats per GiB per period, {} contracts",
                    v.price, v.contracts
                ),
            );
        } else {
            row("price", "free".to_owned());
        }
        if v.earned_sats > 0 {
            row("earned", format!("{} sats", v.earned_sats));
        }
    }
    if v.role == "mount" && v.peer_id.is_some() {
        row("contracts", v.contracts.to_string());
        if v.contracts > 0 || v.paid_sats > 0 {
            row("paid", format!("{} sats", v.paid_sats));
        }
        if let Some(b) = v.balance_sats {
            let funded = v
                .funded_periods
                .map_or(String::new(), |f| format!(", funds {f} periods"));
            let low = if v.low_balance {
                " (low: fund the wallet)"
            } else {
                ""
            };
            row("wallet", format!("{b} sats{funded}{low}"));
        }
        if !v.market_note.is_empty() {
            row("market", v.market_note.clone());
        }
    }
    if v.role == "mount" && v.peer_id.is_some() {
        row(
            "root published",
            match &v.root_published {
                Some(name) => format!("{name} (sequence {})", v.root_sequence),
                None if v.root_sequence > 0 => {
                    format!("none since start (last sequence {})", v.root_sequence)
                }
                None => "none yet: a new machine could not recover this one".into(),
            },
        );
    }
    if v.role == "mount" {
        let r = &v.replication;
        row("under-replicated", format!("{} blocks", r.under_replicated));
        row("lost", format!("{} blocks", r.lost));
        for l in &r.lost_files {
            row("  lost block", format!("{} in {}", l.score, l.path));
        }
        row(
            "proofs",
            format!("{} passed, {} failed", r.proofs_passed, r.proofs_failed),
        );
        row(
            "dropped",
            format!(
                "{} holders, {} blocks from one holder",
                r.holders_dropped, r.blocks_dropped
            ),
        );
        row(
            "read from holders",
            format!("{} blocks", r.fetched_from_holders),
        );
        row(
            "replication passes",
            format!(
                "{} ({} skipped: nothing changed; {} full walks)",
                r.passes, r.passes_skipped, r.full_walks
            ),
        );
        row(
            "queued",
            format!(
                "{} blocks for copies, {} for release",
                r.queued, r.queued_releases
            ),
        );
        if r.manifest_damaged_entries > 0 {
            row(
                "damaged manifest",
                format!("{} entries (placed again)", r.manifest_damaged_entries),
            );
        }
        if !r.note.is_empty() {
            row("note", r.note.clone());
        }
        let w = &v.workers;
        row(
            "workers",
            format!(
                "{} ({} busy, {} failing; see `fincryptctl workers`)",
                w.total, w.busy, w.failing
            ),
        );
    }
}

/// Seconds ago, from a Unix time.
fn ago(t: Option<u64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match t {
        Some(t) => format!("{} s ago", now.saturating_sub(t)),
        None => "never".into(),
    }
}

fn print_workers(list: &[WorkerStatus]) {
    println!(
        "{:<12} {:<8} {:>9} {:>12} {:>8} {:>7} {:>6}  last error",
        "worker", "state", "every", "last run", "done", "queue", "errors"
    );
    for w in list {
        let state = serde_json::to_value(w.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        println!(
            "{:<12} {:<8} {:>7} s {:>12} {:>8} {:>7} {:>6}  {}",
            w.name,
            state,
            w.interval_secs,
            ago(w.last_run),
            w.work_done,
            w.queue.map_or("-".to_owned(), |q| q.to_string()),
            w.errors,
            w.last_error.as_deref().unwrap_or("-")
        );
    }
}

/// A person's summary of `Request::Manifest`'s answer: counts per holder.
fn print_manifest(v: &control::ManifestView) {
    println!("root {} ({})", v.root, v.time);
    let Some(m) = &v.manifest else {
        println!("  names no manifest (a mount without peers, or an older root)");
        return;
    };
    println!(
        "  manifest version {}: {} own blocks, {} in {} blocks of its own",
        m.version,
        m.entries.len(),
        bytes(m.bytes),
        m.blocks.len()
    );
    let mut per_peer: std::collections::BTreeMap<&str, u64> = Default::default();
    for e in &m.entries {
        for h in &e.holders {
            *per_peer.entry(h.as_str()).or_default() += 1;
        }
    }
    for (peer, n) in per_peer {
        println!("  {peer} holds {n}");
    }
}
