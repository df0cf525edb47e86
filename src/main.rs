//! `fincrypt`: create an identity, mount the filesystem, serve storage to peers.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fincrypt::config::{Config, Home, HomeArg};
use fincrypt::secrets;
use fincrypt_blockstore::LocalStore;

#[derive(Parser)]
#[command(
    name = "fincrypt",
    version,
    about = "An encrypted, distributed filesystem"
)]
struct Cli {
    #[command(flatten)]
    home: HomeArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new identity: a master secret, shown once as a recovery phrase,
    /// kept on disk wrapped by a passphrase (FINCRYPT_PASSPHRASE or a prompt).
    Init,
    /// Bring an identity back on an empty home from its recovery phrase
    /// (FINCRYPT_RECOVERY_PHRASE or standard input, 24 words over any number
    /// of lines): the key file and, with peers to ask (--bootstrap or the
    /// config), the filesystem, its snapshots and the manifest of who holds
    /// what. The new passphrase comes from FINCRYPT_PASSPHRASE or a prompt.
    Recover {
        /// A peer to find the owner's newest root through (repeatable);
        /// replaces `bootstrap` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<fincrypt_net::Multiaddr>,
        /// Also fetch every data block into the local volume now (otherwise
        /// file data comes from holders when first read).
        #[arg(long)]
        all: bool,
    },
    /// Change the passphrase (old from FINCRYPT_PASSPHRASE, new from FINCRYPT_NEW_PASSPHRASE, or prompts).
    Passwd,
    /// Re-read every block of the local volume and check it against its score;
    /// with the mount running, the mount does it and repairs from holders.
    Scrub,
    /// Mount the filesystem at MOUNTPOINT and serve it in the foreground until
    /// it is unmounted (fusermount3 -u) or the process gets SIGTERM or SIGINT.
    Mount {
        /// An empty directory to mount on.
        mountpoint: PathBuf,
        /// Mount even if the directory is not empty (its files are hidden
        /// while mounted, and back after unmount).
        #[arg(long)]
        nonempty: bool,
        /// Mount read-only: nothing in the tree can be changed through it.
        #[arg(long)]
        read_only: bool,
        /// Let other users in (FUSE allow_other; the kernel checks permissions).
        #[arg(long)]
        allow_other: bool,
        /// Also be a peer node listening on this address (repeatable), e.g.
        /// /ip4/0.0.0.0/tcp/4001; replaces `listen` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<fincrypt_net::Multiaddr>,
        /// A peer to join the network through (repeatable); replaces
        /// `bootstrap` from the config. Own blocks are placed on peers.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<fincrypt_net::Multiaddr>,
        /// The mediator that places and pays for this node's blocks, ending
        /// in /p2p/<PeerId>; replaces `mediator` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        mediator: Option<fincrypt_net::Multiaddr>,
    },
    /// Back up a folder outside the mount on every change: its copy is
    /// `backups/NAME` in the mount (read-only there) and in every snapshot,
    /// placed on peers like any file. Adds it to the config; a running
    /// mount or `fincrypt backup` takes it up at once.
    Watch {
        /// The folder (a directory outside the home and the mount).
        path: PathBuf,
        /// Its name under `backups/` (default: the folder's own name).
        #[arg(long)]
        name: Option<String>,
        /// Copies on peers of its blocks (default: the config's `redundancy`).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
        redundancy: Option<u8>,
    },
    /// Stop watching folder NAME: its copy leaves the live tree once a
    /// snapshot keeps its last state (restore it with `--at`).
    Unwatch { name: String },
    /// Back up the watched folders without a mount (for servers): the
    /// daemon, with its peers, in the foreground until SIGTERM or SIGINT.
    Backup {
        /// Also be a peer node listening on this address (repeatable);
        /// replaces `listen` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<fincrypt_net::Multiaddr>,
        /// A peer to join the network through (repeatable); replaces
        /// `bootstrap` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<fincrypt_net::Multiaddr>,
        /// The mediator that places and pays for this node's blocks, ending
        /// in /p2p/<PeerId>; replaces `mediator` from the config.
        #[arg(long, value_name = "MULTIADDR")]
        mediator: Option<fincrypt_net::Multiaddr>,
    },
    /// Write watched folder NAME as it was backed up into DEST, with modes,
    /// times, symlinks, hard links and extended attributes. With the daemon
    /// running, it does the work (and fetches blocks from holders).
    Restore {
        name: String,
        /// Where to write it (made if missing; refused if not empty).
        dest: PathBuf,
        /// The newest snapshot at or before TIME instead of the newest
        /// backup: a snapshot's name, or a time like 2026-12-07T09:30:00Z.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Write into a DEST that is not empty, replacing what has the same names.
        #[arg(long)]
        overwrite: bool,
    },
    /// Hold other people's blocks: a storage node for peers, in the foreground
    /// until SIGTERM or SIGINT. Needs no passphrase (it only sees ciphertext).
    Serve {
        /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4001 or
        /// /ip4/0.0.0.0/udp/4001/quic-v1.
        #[arg(long, value_name = "MULTIADDR", required = true)]
        listen: Vec<fincrypt_net::Multiaddr>,
        /// A peer to join the network through (repeatable), e.g.
        /// /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<fincrypt_net::Multiaddr>,
        /// Room offered to peers, e.g. 2GiB or 500MB (at least 1MiB; less is
        /// offered while the disk has less room, beyond a reserve).
        #[arg(long, value_name = "SIZE", allow_hyphen_values = true,
              value_parser = fincrypt::serve::parse_capacity)]
        capacity: u64,
        /// The only peer that may place blocks here (repeatable; without
        /// it, any peer may). To others the node is full.
        #[arg(long, value_name = "PEERID")]
        accept_from: Vec<fincrypt_net::PeerId>,
        /// Store only under contract, for this many satoshis per GiB per
        /// period (config `price`; 0, the default, stores for free).
        #[arg(long, value_name = "SATS")]
        price: Option<u64>,
        /// The fewest periods a contract may last (config `min_duration`).
        #[arg(long, value_name = "PERIODS")]
        min_duration: Option<u32>,
        /// Where payments go (config `payout_address`; without it, a new
        /// address of the wallet at `bitcoin_rpc_url`).
        #[arg(long, value_name = "ADDRESS")]
        payout_address: Option<String>,
    },
    /// Keep clients' escrow, choose their paid holders, audit those holders
    /// and pay them every period, also while the clients are offline: a
    /// mediator node, in the foreground until SIGTERM or SIGINT. Needs a
    /// Bitcoin wallet of its own (bitcoin_rpc_url) and no client's secrets.
    /// Clients name it with `mediator` in their config.
    Mediator {
        /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/tcp/4002.
        #[arg(long, value_name = "MULTIADDR", required = true)]
        listen: Vec<fincrypt_net::Multiaddr>,
        /// A peer to join the network through (repeatable).
        #[arg(long, value_name = "MULTIADDR")]
        bootstrap: Vec<fincrypt_net::Multiaddr>,
        /// The fee, in percent of what it pays for a client (config `fee`),
        /// taken from the client's escrow with each payment.
        #[arg(long, value_name = "PERCENT")]
        fee: Option<f64>,
    },
}

fn main() -> ExitCode {
    // Everything this process creates (homes, keys, volumes, indexes,
    // sockets) is for its user alone, whatever umask it was started with.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
    if let Err(e) = fincrypt::config::load_dotenv() {
        eprintln!("fincrypt: {e:#}");
        return ExitCode::FAILURE;
    }
    // fuser warns when it finds the mount already gone after fusermount3 -u: not news.
    // Kademlia warns that it cannot refresh its routing table while it knows
    // no peer, which is how every first node starts (and it tries again
    // itself); its only other warning concerns DHT records, which Fincrypt
    // does not keep. What is wrong with the network shows in `status`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FINCRYPT_LOG")
                .unwrap_or_else(|_| "warn,fuser=error,libp2p_kad::behaviour=error".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fincrypt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Scrub by the running mount: it checks its volume and repairs what it can
/// from holders. Exit 1 if anything stays damaged or missing.
fn scrub_online(home: &Home) -> Result<ExitCode> {
    use fincrypt::control::{self, Answer, Request};
    let r = control::call_for(&home.data_dir, &Request::Scrub, None, |a| match a {
        Answer::Scrub(r) => Some(r),
        _ => None,
    })?;
    let repaired = if r.by == "mount" {
        format!(", {} repaired from holders", r.repaired.len())
    } else {
        String::new()
    };
    println!(
        "checked {} blocks (by the running {}): {} corrupt, {} missing, {} stray files{repaired}",
        r.checked,
        r.by,
        r.corrupt.len(),
        r.missing.len(),
        r.stray.len(),
    );
    for (what, list) in [("corrupt", &r.corrupt), ("missing", &r.missing)] {
        for s in list {
            let fixed = if r.repaired.contains(s) {
                " (repaired)"
            } else {
                ""
            };
            println!("{what} {s}{fixed}");
        }
    }
    for p in &r.stray {
        println!("stray {p}");
    }
    let unrepaired = r.corrupt.len() + r.missing.len() - r.repaired.len();
    Ok(if unrepaired > 0 || !r.stray.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let home = cli.home.resolve()?;
    match cli.command {
        Command::Mount {
            mountpoint,
            nonempty,
            read_only,
            allow_other,
            listen,
            bootstrap,
            mediator,
        } => {
            let mountpoint = fincrypt::daemon::check_mountpoint(&mountpoint, nonempty)?;
            // A bad setting is refused before anything under the home is touched.
            fincrypt::config::Config::load(&home)?;
            let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
            if !home.is_initialised() && !interactive {
                anyhow::bail!(secrets::not_initialised(&home));
            }
            let _lock = home.lock(&format!("mount on {}", mountpoint.display()))?;
            let pass = if home.is_initialised() {
                secrets::passphrase(secrets::PASSPHRASE_VAR, "Passphrase: ", false)?
            } else if interactive {
                eprintln!(
                    "No Fincrypt identity yet in {}: creating one.",
                    home.config_dir.display()
                );
                let pass = secrets::passphrase(secrets::PASSPHRASE_VAR, "New passphrase: ", true)?;
                let phrase = secrets::init(&home, &pass)?;
                eprintln!(
                    "\nYour recovery phrase (shown only this once; write it down):\n\n{phrase}\n"
                );
                pass
            } else {
                anyhow::bail!(secrets::not_initialised(&home));
            };
            fincrypt::daemon::mount(
                &home,
                fincrypt::daemon::MountArgs {
                    mountpoint: Some(mountpoint),
                    allow_other,
                    read_only,
                    listen,
                    bootstrap,
                    mediator,
                },
                &pass,
            )?;
        }
        Command::Serve {
            listen,
            bootstrap,
            capacity,
            accept_from,
            price,
            min_duration,
            payout_address,
        } => {
            let _lock = home.lock("serve")?;
            let config = fincrypt::config::Config::load(&home)?;
            fincrypt::serve::serve(
                &home,
                fincrypt::serve::ServeArgs {
                    listen,
                    bootstrap,
                    capacity,
                    accept_from,
                    price: price.unwrap_or(config.price),
                    min_duration: min_duration.unwrap_or(config.min_duration),
                    period: config.period,
                    payout_address: payout_address.unwrap_or(config.payout_address.clone()),
                    carry: config.min_payout,
                    unpaid_periods: config.unpaid_periods,
                    floor: config.floor,
                    bitcoin: config.bitcoin_rpc()?,
                },
            )?;
        }
        Command::Mediator {
            listen,
            bootstrap,
            fee,
        } => {
            let _lock = home.lock("mediator")?;
            let config = fincrypt::config::Config::load(&home)?;
            let (accept_clients, deny_clients) = config.client_rules()?;
            let (accept_holders, deny_holders) = config.holder_rules()?;
            fincrypt::mediator::mediator(
                &home,
                fincrypt::mediator::MediatorArgs {
                    listen,
                    bootstrap,
                    fee_percent: fee.unwrap_or(config.fee),
                    accept_clients,
                    deny_clients,
                    accept_holders,
                    deny_holders,
                    min_audit_score: config.min_audit_score,
                    min_escrow_periods: config.min_escrow_periods,
                    grace_periods: config.grace_periods,
                    unreachable_periods: config.unreachable_periods,
                    settings: config.owner_settings()?,
                    bitcoin: config.bitcoin_rpc()?,
                },
            )?;
        }
        Command::Watch {
            path,
            name,
            redundancy,
        } => {
            let w = fincrypt::watch::add_to_config(&home, &path, name.as_deref(), redundancy)?;
            println!(
                "watching {} as {:?}: backed up into backups/{} in the mount",
                w.path.display(),
                w.name,
                w.name
            );
            tell_daemon(&home);
        }
        Command::Unwatch { name } => {
            let w = fincrypt::watch::remove_from_config(&home, &name)?;
            println!(
                "no longer watching {} ({:?}); its backups stay in the snapshots",
                w.path.display(),
                w.name
            );
            if fincrypt::control::daemon_running(&home.data_dir) {
                tell_daemon(&home);
            } else {
                let _lock = home.lock("unwatch")?;
                fincrypt::watch::forget_later(&home, &w.name)?;
                println!("its copy leaves backups/ in the mount when this home is next mounted");
            }
        }
        Command::Backup {
            listen,
            bootstrap,
            mediator,
        } => {
            fincrypt::config::Config::load(&home)?;
            if !home.is_initialised() {
                anyhow::bail!(secrets::not_initialised(&home));
            }
            let _lock = home.lock("backup")?;
            let pass = secrets::passphrase(secrets::PASSPHRASE_VAR, "Passphrase: ", false)?;
            fincrypt::daemon::mount(
                &home,
                fincrypt::daemon::MountArgs {
                    mountpoint: None,
                    allow_other: false,
                    read_only: false,
                    listen,
                    bootstrap,
                    mediator,
                },
                &pass,
            )?;
        }
        Command::Restore {
            name,
            dest,
            at,
            overwrite,
        } => return restore(&home, name, dest, at, overwrite),
        Command::Init => {
            let _lock = home.lock("init")?;
            let pass = secrets::passphrase(secrets::PASSPHRASE_VAR, "New passphrase: ", true)?;
            let phrase = secrets::init(&home, &pass)?;
            open_volume(&home)?.close()?;
            eprintln!(
                "Initialised {}.\n\nYour recovery phrase is below. It is shown only this once. Write it down and keep it\n\
                 somewhere safe: on a new machine, `fincrypt recover --bootstrap <a node's address>` brings\n\
                 back with it your key and every snapshot your mount published to its peers (a mount with\n\
                 no peers keeps its files on this machine only: the phrase then restores the key alone).\n\
                 Anyone who has it can read your files.\n",
                home.config_dir.display()
            );
            println!("{phrase}");
        }
        Command::Recover { bootstrap, all } => {
            let phrase = secrets::recovery_phrase()?;
            // Checked before the passphrase is asked for.
            fincrypt_blockstore::MasterSecret::from_phrase(&phrase)?;
            let pass = secrets::passphrase(
                secrets::PASSPHRASE_VAR,
                "New passphrase for this machine: ",
                true,
            )?;
            let _lock = home.lock("recover")?;
            fincrypt::recover::recover(
                &home,
                &phrase,
                &pass,
                fincrypt::recover::RecoverArgs { bootstrap, all },
            )?;
            open_volume(&home)?.close()?;
        }
        Command::Passwd => {
            let old = secrets::passphrase(secrets::PASSPHRASE_VAR, "Current passphrase: ", false)?;
            secrets::unlock(&home, &old)?;
            let new = secrets::passphrase(secrets::NEW_PASSPHRASE_VAR, "New passphrase: ", true)?;
            secrets::change_passphrase(&home, &old, &new)?;
            eprintln!("Passphrase changed.");
        }
        Command::Scrub => {
            // A storage node's home has no identity, only the volume it
            // holds for peers: that is what is checked there (it needs no
            // key, a block is checked against its score).
            let storage_node = !home.is_initialised() && home.held_dir().exists();
            anyhow::ensure!(
                home.is_initialised() || storage_node,
                secrets::not_initialised(&home)
            );
            if fincrypt::control::daemon_running(&home.data_dir) {
                return scrub_online(&home);
            }
            let _lock = home.lock("scrub")?;
            let (store, what) = if storage_node {
                let store = LocalStore::open(
                    &home.held_dir(),
                    fincrypt_blockstore::StoreOptions::default(),
                )
                .with_context(|| {
                    format!("opening the held volume in {}", home.held_dir().display())
                })?;
                (store, " held for peers")
            } else {
                (open_volume(&home)?, "")
            };
            let report = store.scrub()?;
            println!(
                "checked {} blocks{what}: {} corrupt, {} missing, {} stray files",
                report.checked,
                report.corrupt.len(),
                report.missing.len(),
                report.orphans.len()
            );
            for s in &report.corrupt {
                println!("corrupt {s}");
            }
            for s in &report.missing {
                println!("missing {s}");
            }
            for p in &report.orphans {
                println!("stray {}", p.display());
            }
            if !report.is_clean() {
                if !storage_node && !(report.corrupt.is_empty() && report.missing.is_empty()) {
                    eprintln!(
                        "fincrypt: to repair them from their holders, mount this home with its \
                         peers and run `fincrypt scrub` again (while mounted, a damaged block is \
                         also fetched from a holder when it is read)"
                    );
                }
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Has a running daemon read the config's watched folders again.
fn tell_daemon(home: &Home) {
    use fincrypt::control::{self, Request};
    if !control::daemon_running(&home.data_dir) {
        println!("the next `fincrypt mount` or `fincrypt backup` of this home backs it up");
        return;
    }
    match control::call(&home.data_dir, &Request::WatchReload, None) {
        Ok(_) => println!("the running daemon has taken the change"),
        Err(e) => eprintln!(
            "fincrypt: the config is changed, but the running daemon did not take it ({e:#});              it will at its next start"
        ),
    }
}

/// `fincrypt restore`: by the running daemon if there is one (it reaches
/// holders for blocks not kept here), else from the home directly.
fn restore(
    home: &Home,
    name: String,
    dest: PathBuf,
    at: Option<String>,
    overwrite: bool,
) -> Result<ExitCode> {
    use fincrypt::control::{self, Answer, Request, RestoreSummary};
    anyhow::ensure!(home.is_initialised(), secrets::not_initialised(home));
    let dest =
        std::path::absolute(&dest).with_context(|| format!("resolving {}", dest.display()))?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!("restoring {name} into {}", dest.display()));
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let summary: RestoreSummary = if control::daemon_running(&home.data_dir) {
        let req = Request::Restore {
            name: name.clone(),
            dest: dest.clone(),
            at,
            overwrite,
        };
        control::call_for(&home.data_dir, &req, None, |a| match a {
            Answer::Restored(r) => Some(r),
            _ => None,
        })?
    } else {
        let _lock = home.lock("restore")?;
        let pass = secrets::passphrase(secrets::PASSPHRASE_VAR, "Passphrase: ", false)?;
        let (_, keys) = secrets::unlock(home, &pass)?;
        let config = Config::load(home)?;
        let (fs, volume, _) = fincrypt::daemon::open_fs(home, &config, keys)?;
        let shown = bar.clone();
        let r = fincrypt::watch::restore(&fs, &name, &dest, at.as_deref(), overwrite, &mut |d| {
            if let Some(b) = &shown {
                b.set_message(format!(
                    "restoring {name}: {} files, {} bytes",
                    d.files, d.bytes
                ));
            }
        });
        drop(fs);
        volume.shutdown()?;
        r?
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "restored {name} ({}) into {}: {} files, {} bytes, {} directories, {} symlinks, {} hard links",
        summary.from,
        dest.display(),
        summary.files,
        summary.bytes,
        summary.dirs,
        summary.symlinks,
        summary.hard_links
    );
    for w in &summary.warnings {
        eprintln!("fincrypt: {}: {}", w.path, w.why);
    }
    Ok(ExitCode::SUCCESS)
}

fn open_volume(home: &Home) -> Result<LocalStore> {
    home.open_volume(&Config::load(home)?)
}
