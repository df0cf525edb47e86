//! The control socket between `fincryptctl` and a running daemon.
//!
//! One JSON request per connection, one JSON reply, each a single line
//! (docs/FORMATS.md, "Control socket"). Requests and answers are the typed
//! [`Request`] and [`Answer`]; a reply of another version is refused, and a
//! missing field is an error, never a default. The socket lives in the data
//! directory and is private to the user who mounted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
pub use fincrypt_engine::WorkerStatus;
use serde::{Deserialize, Serialize};

/// Version of the control protocol.
pub const CONTROL_VERSION: u32 = 2;

/// What `fincryptctl` asks.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Health and usage figures.
    Status,
    /// Return once everything written so far is durable and a new root is committed.
    Sync,
    /// Retained snapshots.
    SnapshotsList,
    /// Take a snapshot now.
    SnapshotsCreate,
    /// Delete the snapshots named (all must exist) and those older than
    /// `older_than_secs`.
    SnapshotsDelete {
        names: Vec<String>,
        older_than_secs: Option<u64>,
    },
    /// Run replication passes until no own block is short of copies, or
    /// `timeout_secs` pass.
    Replicate { timeout_secs: u64 },
    /// The owner's manifest the newest root names: who holds each own block.
    Manifest,
    /// Every background worker and its state.
    Workers,
    /// Check every block of the local volume now; repair what a holder has.
    Scrub,
    /// Offers seen from storage nodes.
    MarketOffers,
    /// The owner's contracts with holders.
    MarketContracts,
    /// The wallet: balance, and payments made or received.
    Wallet,
    /// A mount: its deposit address at its mediator.
    MediatorDepositAddress,
    /// A mount: its escrow at its mediator.
    MediatorBalance,
    /// A mediator: every client's escrow.
    MediatorClients,
    /// A mediator: every holder under contract, with its audit score.
    MediatorHolders,
    /// A mediator: every settlement, with what it paid each holder.
    MediatorPeriods,
    /// Read the config's watched folders again (after `fincrypt watch` or `unwatch`).
    WatchReload,
    /// Every watched folder and how its backups stand.
    WatchStatus,
    /// A full scan of watched folder `name` (every folder when none) now;
    /// answered at once with every folder (`rescan_pending` true until done).
    WatchRescan { name: Option<String> },
    /// Write watched folder `name` as it is (or as the newest snapshot at
    /// or before `at`, a snapshot name or RFC 3339 time) into `dest`.
    Restore {
        name: String,
        dest: PathBuf,
        at: Option<String>,
        overwrite: bool,
    },
}

/// The daemon's answer to a [`Request`], one variant per kind of request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Status(Box<Status>),
    Synced(Synced),
    Snapshots(Vec<SnapshotInfo>),
    Replication(Replication),
    Manifest(ManifestView),
    Workers(Vec<WorkerStatus>),
    Scrub(ScrubSummary),
    Deleted(Deleted),
    Offers(Vec<fincrypt_market::owner::OfferView>),
    Contracts(Vec<fincrypt_market::owner::ContractView>),
    Wallet(WalletView),
    DepositAddress(DepositAddress),
    Escrow(fincrypt_market::mediator::Escrow),
    Escrows(Vec<fincrypt_market::mediator::Escrow>),
    Holders(Vec<fincrypt_market::mediator::HolderView>),
    Settlements(Vec<fincrypt_market::mediator::SettlementView>),
    Watch(Vec<WatchView>),
    Restored(RestoreSummary),
}

/// One watched folder, as `fincryptctl watch status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchView {
    pub name: String,
    pub path: PathBuf,
    pub redundancy: Option<u8>,
    /// `inotify`, or `rescans` when inotify cannot follow it.
    pub driver: String,
    /// Why rescans drive it, and how often.
    pub driver_note: String,
    /// Directories with an inotify watch.
    pub watched_dirs: u64,
    /// Files backed up (names) and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Unix time of the last change inotify reported.
    pub last_change_seen: Option<u64>,
    /// Unix time the last backup of a change (or scan) ended.
    pub last_backed_up: Option<u64>,
    /// Directories with changes not backed up yet, those being backed up
    /// now included.
    pub pending: u64,
    /// Full scans made since the daemon started.
    pub scans: u64,
    /// Full scans that failed since the daemon started.
    #[serde(default)]
    pub scans_failed: u64,
    /// Seconds the last full scan took, until its copies were durable.
    #[serde(default)]
    pub last_scan_seconds: Option<f64>,
    /// A rescan was asked (`fincryptctl watch rescan`) and has not ended.
    #[serde(default)]
    pub rescan_pending: bool,
    /// The last full scan (the one that answered the last rescan, once
    /// none is pending) failed: `fincryptctl workers` says why. None from
    /// a daemon older than this field.
    #[serde(default)]
    pub last_scan_failed: Option<bool>,
    /// Bytes read from the folder since the daemon started.
    pub bytes_read: u64,
    /// What could not be backed up (unreadable, always changing): the
    /// first thousand, with the count of all.
    pub error_count: u64,
    pub errors: Vec<WatchProblem>,
    /// What is not backed up by design (sockets, FIFOs, devices).
    pub skipped_count: u64,
    pub skipped: Vec<WatchProblem>,
}

/// A path in a watched folder, relative to it, and why it is not backed up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchProblem {
    pub path: String,
    pub why: String,
}

/// What a restore wrote.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// `live`, or the name of the snapshot restored from.
    pub from: String,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub others: u64,
    pub bytes: u64,
    /// What could not be set as it was (path, why).
    pub warnings: Vec<WatchProblem>,
}

/// The answer to [`Request::MediatorDepositAddress`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DepositAddress {
    /// The mediator, as a multiaddr ending in its PeerId.
    pub mediator: String,
    /// Where this client deposits: an address of the mediator's wallet.
    pub address: String,
}

/// The answer to [`Request::Wallet`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WalletView {
    /// The wallet's spendable balance (none: no wallet configured, or it
    /// did not answer).
    pub balance_sats: Option<u64>,
    /// Periods that balance pays for at the current rate (an owner's).
    pub funded_periods: Option<u64>,
    /// What one period of every contract costs now (an owner's).
    pub cost_per_period: u64,
    pub low_balance: bool,
    /// The last settlement's outcome (an owner's).
    pub last_settlement: String,
    /// Payments made, one per period paid (an owner's).
    pub payments: Vec<fincrypt_market::owner::PaymentView>,
    /// Payments received at the payout address (a storage node's).
    pub income: Vec<Income>,
}

/// A payment a storage node received.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Income {
    pub txid: String,
    pub sats: u64,
    pub confirmations: i64,
    /// Unix seconds the wallet first saw it.
    pub time: u64,
}

/// The answer to [`Request::SnapshotsDelete`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deleted {
    /// The snapshots deleted, oldest first.
    pub snapshots: Vec<String>,
    /// Blocks GC freed after it.
    pub freed_blocks: u64,
    /// The deleted snapshot whose blocks stay until a newer root is
    /// published, because the root the network holds names it.
    #[serde(default)]
    pub kept_for_network: Option<String>,
}

/// Health and usage of a daemon, a mount's or a storage node's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// `mount` or `serve`.
    pub role: String,
    /// Where the filesystem is mounted (a mount only).
    pub mountpoint: Option<PathBuf>,
    /// This node's PeerId, when it is on the network.
    pub peer_id: Option<String>,
    /// Its libp2p addresses, each with `/p2p/<PeerId>`.
    pub listen_addrs: Vec<String>,
    /// The TCP port bulk connections are accepted on, if offered.
    pub bulk_port: Option<u16>,
    /// The bootstrap addresses given, and whether each was reached.
    #[serde(default)]
    pub bootstrap: Vec<fincrypt_net::BootstrapPeer>,
    /// Peers connected now.
    pub peers: u64,
    /// Own blocks and bytes in the local volume.
    pub own_blocks: u64,
    pub own_bytes: u64,
    /// Blocks and bytes held for peers.
    pub held_blocks: u64,
    pub held_bytes: u64,
    /// Room offered to peers (bytes).
    pub capacity: u64,
    /// Of it, what the disk has room for now (a storage node's; less than
    /// `capacity` when its disk is nearly full).
    #[serde(default)]
    pub offered: Option<u64>,
    /// Cached copies and their bytes.
    pub cached_blocks: u64,
    pub cached_bytes: u64,
    /// Written but not yet chunked and sealed.
    pub unsealed_bytes: u64,
    /// Retained snapshots.
    pub snapshots: u64,
    /// Copies asked of data blocks where no directory says otherwise.
    pub default_redundancy: u8,
    /// From the last full walk (mounts with peers): the highest redundancy
    /// asked, in all and of the live tree alone. Where the first is more,
    /// retained snapshots keep asking for it (metadata takes the highest).
    #[serde(default)]
    pub redundancy_highest: Option<(u8, u8)>,
    /// Owners whose root record this storage node keeps (a storage node only).
    pub root_records: u64,
    /// A storage node's price, in satoshis per GiB per period (0: free).
    #[serde(default)]
    pub price: u64,
    /// Contracts: those a storage node holds under, or those an owner made.
    #[serde(default)]
    pub contracts: u64,
    /// Satoshis an owner paid its holders, in sent transactions.
    #[serde(default)]
    pub paid_sats: u64,
    /// Satoshis a storage node received at its payout address.
    #[serde(default)]
    pub earned_sats: u64,
    /// The wallet's spendable balance (none: no wallet configured, or it did not answer).
    #[serde(default)]
    pub balance_sats: Option<u64>,
    /// Periods an owner's balance pays for at the current rate.
    #[serde(default)]
    pub funded_periods: Option<u64>,
    /// True when that is fewer than `min_periods_funded`.
    #[serde(default)]
    pub low_balance: bool,
    /// Why paid offers were skipped, in words (empty: none were).
    #[serde(default)]
    pub market_note: String,
    /// A mediator: the clients it keeps escrow for.
    #[serde(default)]
    pub clients: Option<u64>,
    /// A mount: the mediator it uses (empty: none).
    #[serde(default)]
    pub mediator: String,
    /// A mount: why its mediator last chose no holders (empty: it did).
    #[serde(default)]
    pub mediator_note: String,
    /// A mount: placements and releases not yet reported to its mediator.
    #[serde(default)]
    pub mediator_reports_waiting: u64,
    /// A mount: blocks its mediator moved off failing holders while it was
    /// away, taken into its manifest since it started.
    #[serde(default)]
    pub mediator_moves_taken: u64,
    /// A mount: its escrow at its mediator and the periods it pays for, as
    /// last asked (once a minute; none before the first answer).
    #[serde(default)]
    pub mediator_escrow_sats: Option<u64>,
    #[serde(default)]
    pub mediator_funded_periods: Option<u64>,
    /// A mount: its escrow pays for fewer periods than the mediator's
    /// `grace_periods`.
    #[serde(default)]
    pub mediator_low_escrow: bool,
    /// The highest root record sequence this mount published (0: none yet).
    pub root_sequence: u64,
    /// The snapshot the last root record published from here names, by its
    /// name in `.snapshots/` (none published since the mount started).
    pub root_published: Option<String>,
    /// Replication figures (all 0 without peers).
    pub replication: ReplicationStatus,
    /// Workers by state.
    pub workers: WorkersSummary,
    /// The `config.toml` the daemon read (none: it runs on defaults).
    pub config_file: Option<PathBuf>,
    /// The `.env` the daemon read at start (none: there was none in its
    /// working directory).
    pub env_file: Option<PathBuf>,
}

/// Replication's side of [`Status`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// Own blocks with fewer confirmed copies on peers than asked.
    pub under_replicated: u64,
    /// Own blocks with no readable copy anywhere.
    pub lost: u64,
    /// The lost blocks and the files that use them (at most 100).
    pub lost_files: Vec<LostBlock>,
    /// Passes finished.
    pub passes: u64,
    /// Steps that found the change feed and the queue empty, so read nothing else.
    pub passes_skipped: u64,
    /// Full walks of the live tree and every snapshot (daily, or when only a walk can tell).
    pub full_walks: u64,
    /// Blocks queued for copies (still short, or not yet worked).
    pub queued: u64,
    /// Blocks queued for release on their holders (GC freed them).
    pub queued_releases: u64,
    /// Releases dropped holders have not taken yet (asked again when they are back).
    pub releases_pending: u64,
    /// Blocks walks and the change feed visited, in all (unchanged while steps are skipped).
    pub blocks_walked: u64,
    /// Manifest and queue rows passes read, in all (unchanged while steps are skipped).
    pub manifest_rows_scanned: u64,
    /// Closest-peer lookups passes made through the DHT, in all.
    pub dht_lookups: u64,
    /// Why blocks are short of copies, in words (empty when none are).
    pub note: String,
    pub proofs_passed: u64,
    pub proofs_failed: u64,
    /// Holders dropped from every block (unreachable, or not answering proofs).
    pub holders_dropped: u64,
    /// Blocks taken from one holder after a failed proof or read there.
    pub blocks_dropped: u64,
    /// Blocks read from holders because the local copy was missing or damaged.
    pub fetched_from_holders: u64,
    /// Copies put on peers since the mount started.
    pub copies_put: u64,
    /// Manifest entries found damaged (their blocks are placed again).
    pub manifest_damaged_entries: u64,
}

/// A lost block and where it is used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LostBlock {
    pub score: String,
    pub path: String,
}

/// How many workers are in each state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkersSummary {
    pub total: u64,
    pub busy: u64,
    pub failing: u64,
}

/// The answer to [`Request::Sync`] and [`Request::SnapshotsCreate`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Synced {
    /// The new snapshot's name (its time).
    pub time: String,
    /// Blocks GC freed after it.
    pub freed_blocks: u64,
}

/// One retained snapshot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// Its root block's score.
    pub root: String,
}

/// The answer to [`Request::Replicate`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Replication {
    pub under_replicated: u64,
    /// Own blocks the last pass looked at.
    pub replicated_blocks: u64,
    /// Confirmed copies of those on peers.
    pub placed_copies: u64,
    /// Own blocks by the redundancy they ask for.
    pub blocks_by_redundancy: BTreeMap<u8, u64>,
    pub note: String,
}

/// Who holds each own block, as the newest root's manifest says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestView {
    /// The newest root's score and time.
    pub root: String,
    pub time: String,
    /// None when that root names no manifest.
    pub manifest: Option<ManifestBody>,
}

/// The manifest a root names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestBody {
    pub version: u8,
    /// Its size as a record.
    pub bytes: u64,
    /// Its own blocks, with the holders the working index knows of them now.
    pub blocks: Vec<HeldBlock>,
    /// Every own block it lists, with its holders.
    pub entries: Vec<HeldBlock>,
}

/// A block and its holders.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldBlock {
    pub score: String,
    pub holders: Vec<String>,
}

/// What an online scrub found and did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScrubSummary {
    /// Which daemon checked: `mount` (its own volume) or `storage node`
    /// (the volume it holds for peers).
    #[serde(default)]
    pub by: String,
    /// Blocks read and checked.
    pub checked: u64,
    /// Scores of blocks whose bytes did not match.
    pub corrupt: Vec<String>,
    /// Scores of indexed blocks whose file was gone.
    pub missing: Vec<String>,
    /// Files in the volume that no index entry names.
    pub stray: Vec<String>,
    /// Of the corrupt and missing, those written back from a holder.
    pub repaired: Vec<String>,
}

/// The daemon's reply: an answer, or an error message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The socket path of a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("fincrypt.sock")
}

/// True when a daemon answers on the socket of `data_dir`.
pub fn daemon_running(data_dir: &Path) -> bool {
    UnixStream::connect(socket_path(data_dir)).is_ok()
}

/// A node's control socket (a convenience: the node runs without one, say
/// when a mount of the same home has it) until SIGTERM or SIGINT, then
/// removed; `who` names the node in what it prints.
pub async fn serve_until_stopped<F>(
    path: &Path,
    handle: F,
    who: &str,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) where
    F: Fn(Request) -> Result<Answer> + Send + Sync + 'static,
{
    let socket_ok = match serve(path, handle) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "no control socket for status");
            false
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("fincrypt {who}: stopping");
    if socket_ok {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves requests on `path` with `handle` until the process ends; one thread per connection.
pub fn serve<F>(path: &Path, handle: F) -> Result<()>
where
    F: Fn(Request) -> Result<Answer> + Send + Sync + 'static,
{
    if path.exists() {
        // Left by a daemon that died: nobody answers on it.
        if UnixStream::connect(path).is_ok() {
            bail!("another daemon already serves {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let handle = std::sync::Arc::new(handle);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handle = handle.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*handle) {
                            tracing::debug!(error = %e, "control connection ended badly");
                        }
                    });
            }
        })?;
    Ok(())
}

fn answer(conn: UnixStream, handle: &dyn Fn(Request) -> Result<Answer>) -> Result<()> {
    let mut line = String::new();
    std::io::Read::take(BufReader::new(conn.try_clone()?), 64 * 1024).read_line(&mut line)?;
    let (ok, error) = match serde_json::from_str::<Request>(&line) {
        Ok(req) => match handle(req) {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
        Err(e) => (None, Some(format!("bad request: {e}"))),
    };
    let reply = Reply {
        version: CONTROL_VERSION,
        ok,
        error,
    };
    let mut conn = conn;
    serde_json::to_writer(&mut conn, &reply)?;
    conn.write_all(b"\n")?;
    Ok(())
}

/// Sends one request to the daemon of `data_dir` and returns its answer.
pub fn call(data_dir: &Path, req: &Request, timeout: Option<Duration>) -> Result<Answer> {
    let path = socket_path(data_dir);
    let mut conn = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
            "the daemon of {} is not yours to talk to ({}: permission denied): run this as the \
             user that started it",
            data_dir.display(),
            path.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "no Fincrypt daemon is running for {} ({}: {e}); start one with `fincrypt mount`",
            data_dir.display(),
            path.display()
        ),
        _ => anyhow::anyhow!(
            "cannot reach the daemon of {} ({}: {e})",
            data_dir.display(),
            path.display()
        ),
    })?;
    conn.set_read_timeout(timeout)?;
    serde_json::to_writer(&mut conn, req)?;
    conn.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .context("reading the daemon's reply")?;
    let version: serde_json::Value =
        serde_json::from_str(&line).context("the daemon's reply is not JSON")?;
    if version["version"].as_u64() != Some(u64::from(CONTROL_VERSION)) {
        bail!(
            "the daemon speaks control version {}, this program {CONTROL_VERSION}: run the same version of both",
            version["version"]
        );
    }
    let reply: Reply = serde_json::from_str(&line).context("the daemon's reply is not valid")?;
    match (reply.ok, reply.error) {
        (Some(v), _) => Ok(v),
        (None, Some(e)) => bail!("{e}"),
        (None, None) => bail!("the daemon sent an empty reply"),
    }
}

/// Calls and expects one kind of answer (`pick` returns it, or None for another kind).
pub fn call_for<T>(
    data_dir: &Path,
    req: &Request,
    timeout: Option<Duration>,
    pick: impl FnOnce(Answer) -> Option<T>,
) -> Result<T> {
    let answer = call(data_dir, req, timeout)?;
    pick(answer).with_context(|| format!("the daemon answered {req:?} with another kind of answer"))
}
