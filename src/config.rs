//! Where Fincrypt keeps things, and its settings.
//!
//! `--home DIR` (or `FINCRYPT_HOME`) puts everything under DIR. Otherwise the
//! configuration lives in `$XDG_CONFIG_HOME/fincrypt` (`~/.config/fincrypt`)
//! and data in `$XDG_DATA_HOME/fincrypt` (`~/.local/share/fincrypt`).
//! Settings come from `config.toml`, then `FINCRYPT_*` environment variables
//! (a `.env` file in the working directory, and only there, may set them),
//! later ones winning.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The `.env` read at start, if any.
static ENV_FILE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Loads `.env` from the working directory, never from a parent (both
/// `fincrypt` and `fincryptctl` call this first, so they act on the same
/// home); variables already set win. The file read, if one was.
pub fn load_dotenv() -> Result<Option<PathBuf>> {
    let path = PathBuf::from(".env");
    let read = match dotenvy::from_path(&path) {
        Ok(()) => Some(std::path::absolute(&path).unwrap_or(path)),
        Err(dotenvy::Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading .env in the working directory"),
    };
    let _ = ENV_FILE.set(read.clone());
    Ok(read)
}

/// The `.env` that [`load_dotenv`] read, if any.
pub fn env_file() -> Option<PathBuf> {
    ENV_FILE.get().cloned().flatten()
}

/// The `--home` option both commands take.
#[derive(clap::Args, Clone, Debug)]
pub struct HomeArg {
    /// The configuration and data are under DIR instead of the XDG locations.
    #[arg(long, global = true, env = "FINCRYPT_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
}

impl HomeArg {
    /// The directories it names.
    pub fn resolve(&self) -> Result<Home> {
        Home::resolve(self.home.as_deref())
    }
}

/// The directories of one Fincrypt identity.
#[derive(Clone, Debug)]
pub struct Home {
    /// Holds `config.toml` and `key.toml`.
    pub config_dir: PathBuf,
    /// Holds the block volume, filesystem metadata and the control socket.
    pub data_dir: PathBuf,
}

impl Home {
    /// Resolves `--home`, then XDG locations under `$HOME`.
    pub fn resolve(home: Option<&Path>) -> Result<Home> {
        if let Some(dir) = home {
            return Ok(Home {
                config_dir: dir.to_path_buf(),
                data_dir: dir.to_path_buf(),
            });
        }
        let user_home = std::env::var_os("HOME").map(PathBuf::from);
        let xdg = |var: &str, fallback: &str| -> Result<PathBuf> {
            match std::env::var_os(var).filter(|v| !v.is_empty()) {
                Some(v) => Ok(PathBuf::from(v)),
                None => user_home
                    .as_ref()
                    .map(|h| h.join(fallback))
                    .context("neither --home, FINCRYPT_HOME nor HOME is set"),
            }
        };
        Ok(Home {
            config_dir: xdg("XDG_CONFIG_HOME", ".config")?.join("fincrypt"),
            data_dir: xdg("XDG_DATA_HOME", ".local/share")?.join("fincrypt"),
        })
    }

    /// `config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }

    /// `key.toml`: the master secret wrapped by the passphrase.
    pub fn key_file(&self) -> PathBuf {
        self.config_dir.join("key.toml")
    }

    /// The local block volume.
    pub fn volume_dir(&self) -> PathBuf {
        self.data_dir.join("volume")
    }

    /// The volume of blocks held for peers (`fincrypt serve`).
    pub fn held_dir(&self) -> PathBuf {
        self.data_dir.join("held")
    }

    /// A mediator's ledger: its clients and their escrow.
    pub fn mediator_file(&self) -> PathBuf {
        self.data_dir.join("mediator.redb")
    }

    /// A mount's placements and releases waiting to be reported to its mediator.
    pub fn mediated_file(&self) -> PathBuf {
        self.data_dir.join("mediated.redb")
    }

    /// A storage node's contracts with the owners it stores for.
    pub fn contracts_file(&self) -> PathBuf {
        self.data_dir.join("contracts.redb")
    }

    /// An owner's market ledger: contracts with holders, what each proved
    /// in each period, and the payments that settled it.
    pub fn market_ledger_file(&self) -> PathBuf {
        self.data_dir.join("ledger.redb")
    }

    /// Where a placement ledger of its own was kept before it moved into the
    /// volume's index; one found there is moved in (docs/FORMATS.md,
    /// "Placement ledger").
    pub fn placements_file(&self) -> PathBuf {
        self.data_dir.join("placements.redb")
    }

    /// The owner's manifest: which peers confirmed holding each own block.
    pub fn manifest_file(&self) -> PathBuf {
        self.data_dir.join("manifest.redb")
    }

    /// The node key, whose public half is this machine's PeerId.
    pub fn node_key_file(&self) -> PathBuf {
        self.config_dir.join("node.key")
    }

    /// Opens the local block volume with the settings of `config`.
    pub fn open_volume(&self, config: &Config) -> Result<fincrypt_blockstore::LocalStore> {
        let options = fincrypt_blockstore::StoreOptions {
            cache_capacity: config.cache_capacity,
        };
        fincrypt_blockstore::LocalStore::open(&self.volume_dir(), options).with_context(|| {
            format!(
                "opening the block volume in {}",
                self.volume_dir().display()
            )
        })
    }

    /// Takes the home for this process (`what` says for what, e.g. "mount
    /// on /mnt"), before anything else under it is opened; refused, with
    /// the PID and use of the holder, while another process has it. The
    /// lock goes with the returned value (or the process).
    pub fn lock(&self, what: &str) -> Result<HomeLock> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        create_private_dir(&self.data_dir)?;
        if self.config_dir != self.data_dir {
            create_private_dir(&self.config_dir)?;
        }
        let path = self.data_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "this home ({}) is in use by {}: stop that first, or use another --home",
                    self.data_dir.display(),
                    if holder.is_empty() {
                        "another process".to_owned()
                    } else {
                        holder.to_owned()
                    }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "PID {} ({what})", std::process::id())?;
        file.flush()?;
        Ok(HomeLock { _file: file })
    }

    /// True once `fincrypt init` (or `recover`) has run here.
    pub fn is_initialised(&self) -> bool {
        self.key_file().exists()
    }
}

/// A home taken by [`Home::lock`]; dropping it lets others in.
#[derive(Debug)]
pub struct HomeLock {
    _file: std::fs::File,
}

/// Creates `dir` and its missing parents as 0700 (whatever the umask), and
/// makes an existing one 0700 if it is looser: a home holds keys, metadata
/// and the ledger of who placed what, none of it for other local users.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    Ok(())
}

/// Settings from `config.toml` and `FINCRYPT_*` variables. (Its `Debug`
/// hides the Bitcoin RPC password.)
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Bytes of the volume that cached copies of blocks may use.
    pub cache_capacity: u64,
    /// Seconds between automatic snapshots; 0 turns them off.
    pub snapshot_interval: u64,
    /// Snapshots kept; older ones go, and GC frees what only they used.
    pub snapshot_keep: usize,
    /// Peer addresses the mount listens on (multiaddrs); none and no
    /// `bootstrap` means the mount runs alone, with no network.
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<String>,
    /// Peers the mount joins the network through (multiaddrs).
    #[serde(deserialize_with = "one_or_many")]
    pub bootstrap: Vec<String>,
    /// Copies on peers of each own block when no directory above it says otherwise.
    pub redundancy: u8,
    /// Bytes of the local volume the mount offers peers for their blocks (0: none).
    pub holder_capacity: u64,
    /// PeerIds that alone may place blocks in that room (none: any peer).
    #[serde(deserialize_with = "one_or_many")]
    pub accept_from: Vec<String>,
    /// Seconds between replication passes (placing own blocks on peers).
    pub replicate_interval: u64,
    /// Seconds between rounds of storage proofs asked of holders (0: none).
    pub proof_interval: u64,
    /// Blocks whose holders are challenged per round.
    pub proof_blocks: usize,
    /// Consecutive failed proofs after which a holder is dropped and its blocks placed elsewhere.
    pub proof_failures: u32,
    /// Seconds a holder may stay unreachable before its blocks are placed elsewhere.
    pub holder_timeout: u64,
    /// Seconds between online scrubs of the local volume (0: only on request).
    pub scrub_interval: u64,
    /// With peers: seconds after changes settle within which a root is
    /// written and published, so a lost machine loses at most about that
    /// much (0: publish only snapshots).
    pub publish_interval: u64,
    /// A storage node's price: satoshis per GiB per period (0: free).
    pub price: u64,
    /// The lowest price a storage node takes, period by period, from a
    /// payer whose pricing is `floating` (0: its price).
    pub floor: u64,
    /// The fewest periods a contract with this storage node may last.
    pub min_duration: u32,
    /// The length of a payment period, in seconds: prices are per GiB per period.
    pub period: u64,
    /// Where a priced storage node is paid; empty: a new address of the
    /// wallet at `bitcoin_rpc_url`.
    pub payout_address: String,
    /// The Bitcoin node whose wallet pays and is paid, e.g.
    /// `http://127.0.0.1:8332` (empty: none).
    pub bitcoin_rpc_url: String,
    /// Its RPC user and password, or instead its cookie file.
    pub bitcoin_rpc_user: String,
    /// See `bitcoin_rpc_user`.
    pub bitcoin_rpc_password: String,
    /// See `bitcoin_rpc_user`.
    pub bitcoin_rpc_cookie: String,
    /// The wallet to use, for a node that has several (empty: its default).
    pub bitcoin_wallet: String,
    /// An owner's most paid per GiB per period, in satoshis (0: only free
    /// storage is used).
    pub max_price: u64,
    /// How an owner ranks offers: `lowest-first`, `fixed` or `nearest`.
    pub pricing: String,
    /// Below this many periods funded by the wallet, `status` says the
    /// balance is low and the daemon warns each period.
    pub min_periods_funded: u64,
    /// Challenges of each contracted holder per period, at least.
    pub challenges_per_period: u32,
    /// The smallest payout to one holder, in satoshis; less is carried to
    /// the next settlement. A storage node lets an owner carry at most this
    /// much unpaid (its offer's `carry`).
    pub min_payout: u64,
    /// A priced storage node's patience: after this many periods unpaid it
    /// takes no new blocks from the owner, and one more contract duration
    /// later releases what it holds for it.
    pub unpaid_periods: u64,
    /// A mount's mediator, as a multiaddr ending in /p2p/<PeerId> (empty: none).
    pub mediator: String,
    /// A mediator's fee, in percent of what it pays for a client.
    pub fee: f64,
    /// A mediator's clients, by PeerId (none: any node).
    #[serde(deserialize_with = "one_or_many")]
    pub accept_clients: Vec<String>,
    /// PeerIds a mediator never serves.
    #[serde(deserialize_with = "one_or_many")]
    pub deny_clients: Vec<String>,
    /// The storage nodes a mediator places on, by PeerId (none: any).
    #[serde(deserialize_with = "one_or_many")]
    pub accept_holders: Vec<String>,
    /// Storage nodes a mediator never places on.
    #[serde(deserialize_with = "one_or_many")]
    pub deny_holders: Vec<String>,
    /// A mediator places nothing new on a holder whose audit score is lower.
    pub min_audit_score: f64,
    /// A mediator places nothing new for a client whose escrow pays for
    /// fewer periods.
    pub min_escrow_periods: u64,
    /// A mediator tells a client its escrow is low when it pays for fewer
    /// periods than this.
    pub grace_periods: u64,
    /// A mediator takes a holder that answers none of its audits for this
    /// many periods for gone: its contracts end and its blocks move.
    pub unreachable_periods: u64,
    /// Folders outside the mount backed up on every change into
    /// `backups/NAME` (`fincrypt watch`; only in config.toml).
    pub watch: Vec<WatchEntry>,
    /// Seconds a changed folder must stay quiet before its changes are
    /// backed up (so a file being written is read once it is done).
    pub watch_settle: u64,
    /// Seconds between rescans of a watched folder that inotify cannot
    /// follow (too few watches, or events lost).
    pub watch_rescan: u64,
}

/// One watched folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchEntry {
    /// The folder, an absolute path.
    pub path: PathBuf,
    /// Its name under `backups/` (unique).
    pub name: String,
    /// Copies on peers of its blocks (none: the default redundancy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redundancy: Option<u8>,
}

/// Why `name` cannot name a watched folder, if it cannot.
pub fn bad_watch_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name == "." || name == ".." {
        Some("it is empty, `.` or `..`")
    } else if name.contains('/') || name.contains('\0') {
        Some("it holds a `/`")
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes")
    } else {
        None
    }
}

/// Refuses a `config.toml` with a setting Fincrypt does not know (a
/// misspelt key would otherwise be ignored), naming the nearest known one.
fn check_keys(file: &Path, keys: &[String]) -> Result<()> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", file.display()))?;
    for key in table.keys() {
        if keys.iter().any(|k| k == key) {
            continue;
        }
        let nearest = keys
            .iter()
            .map(|k| (strsim::damerau_levenshtein(k, key), k))
            .min()
            .filter(|(d, _)| *d <= 3)
            .map(|(_, k)| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        bail!(
            "{}: unknown setting `{key}`{nearest}; the settings are: {}",
            file.display(),
            keys.join(", ")
        );
    }
    Ok(())
}

/// A settings error that names the key as the user writes it (in the file,
/// or as its `FINCRYPT_` variable), not by figment's profile path.
fn explain(e: figment::Error, file: &Path) -> anyhow::Error {
    let lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let key = e.path.last().cloned().unwrap_or_default();
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.to_lowercase().contains("environment"));
            let place = if from_env {
                format!("FINCRYPT_{}", key.to_uppercase())
            } else {
                format!("`{key}` in {}", file.display())
            };
            // A secret's value is never repeated in a message.
            if key.contains("password") {
                return format!(
                    "{place}: not a valid value (not shown; a password of digits \
                     must be quoted in config.toml, or use bitcoin_rpc_cookie)"
                );
            }
            format!("{place}: {}", e.kind)
        })
        .collect();
    anyhow::anyhow!("bad setting: {}", lines.join("; "))
}

/// Accepts a list, or one string of addresses separated by commas or spaces
/// (as `FINCRYPT_BOOTSTRAP=/ip4/…,/ip4/…` gives).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.clone();
        if !shown.bitcoin_rpc_password.is_empty() {
            shown.bitcoin_rpc_password = "(hidden)".into();
        }
        match toml::to_string(&shown) {
            Ok(t) => f.write_str(&t),
            Err(_) => f.write_str("Config { .. }"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cache_capacity: 1 << 30,
            snapshot_interval: 900,
            snapshot_keep: 96,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            redundancy: 2,
            holder_capacity: 0,
            accept_from: Vec::new(),
            replicate_interval: 30,
            proof_interval: 300,
            proof_blocks: 16,
            proof_failures: 3,
            holder_timeout: 30,
            scrub_interval: 7 * 24 * 3600,
            publish_interval: 30,
            price: 0,
            floor: 0,
            min_duration: 1,
            period: 3600,
            payout_address: String::new(),
            bitcoin_rpc_url: String::new(),
            bitcoin_rpc_user: String::new(),
            bitcoin_rpc_password: String::new(),
            bitcoin_rpc_cookie: String::new(),
            bitcoin_wallet: String::new(),
            max_price: 0,
            pricing: "lowest-first".into(),
            min_periods_funded: 24,
            challenges_per_period: 4,
            // Beside a fee of about 200 vbytes at 1 sat/vbyte, a quarter.
            min_payout: 1000,
            unpaid_periods: 3,
            mediator: String::new(),
            fee: 0.0,
            accept_clients: Vec::new(),
            deny_clients: Vec::new(),
            accept_holders: Vec::new(),
            deny_holders: Vec::new(),
            // Under 0.6: about half its recent audits failed.
            min_audit_score: 0.6,
            min_escrow_periods: 1,
            // A day of hourly periods.
            grace_periods: 24,
            unreachable_periods: 1,
            watch: Vec::new(),
            watch_settle: 2,
            watch_rescan: 300,
        }
    }
}

impl Config {
    /// Loads the settings of `home`; a missing file means defaults.
    pub fn load(home: &Home) -> Result<Config> {
        let file = home.config_file();
        let keys = Config::keys();
        check_keys(&file, &keys)?;
        // Watched folders are a list of tables: config.toml alone sets them.
        let names: Vec<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| *k != "watch")
            .collect();
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(&file))
            .merge(Env::prefixed("FINCRYPT_").only(&names))
            .extract::<Config>()
            .map_err(|e| explain(e, &file))
            .and_then(|c| {
                // Checked here, before anything starts, not when the node does.
                c.accept_from_peers()
                    .with_context(|| format!("in {} or FINCRYPT_ACCEPT_FROM", file.display()))?;
                c.pricing()
                    .with_context(|| format!("in {} or FINCRYPT_PRICING", file.display()))?;
                if c.period == 0 {
                    bail!(
                        "`period` in {} or FINCRYPT_PERIOD is 0 seconds: prices are per \
                         period of at least a second",
                        file.display()
                    );
                }
                c.mediator()
                    .with_context(|| format!("in {} or FINCRYPT_MEDIATOR", file.display()))?;
                c.client_rules()
                    .with_context(|| format!("in {} or FINCRYPT_*_CLIENTS", file.display()))?;
                c.holder_rules()
                    .with_context(|| format!("in {} or FINCRYPT_*_HOLDERS", file.display()))?;
                if !(0.0..=1.0).contains(&c.min_audit_score) {
                    bail!(
                        "`min_audit_score` in {} or FINCRYPT_MIN_AUDIT_SCORE is {}: \
                         an audit score is between 0 and 1",
                        file.display(),
                        c.min_audit_score
                    );
                }
                if c.unreachable_periods == 0 {
                    bail!(
                        "`unreachable_periods` in {} or FINCRYPT_UNREACHABLE_PERIODS is 0: a \
                         holder must be given at least a period to answer",
                        file.display()
                    );
                }
                c.check_watch()
                    .with_context(|| format!("`watch` in {}", file.display()))?;
                if c.unpaid_periods == 0 {
                    bail!(
                        "`unpaid_periods` in {} or FINCRYPT_UNPAID_PERIODS is 0: an owner \
                         needs at least one period to pay",
                        file.display()
                    );
                }
                Ok(c)
            })
    }

    /// Each watched folder has an absolute path, a name of its own and a
    /// redundancy of at least 1.
    fn check_watch(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for w in &self.watch {
            if let Some(why) = bad_watch_name(&w.name) {
                bail!("the name {:?} cannot be a folder's name: {why}", w.name);
            }
            if !names.insert(w.name.as_str()) {
                bail!("two watched folders are named {:?}", w.name);
            }
            if !w.path.is_absolute() {
                bail!("{} is not an absolute path", w.path.display());
            }
            if w.redundancy == Some(0) {
                bail!("{:?} has redundancy 0: at least 1", w.name);
            }
        }
        Ok(())
    }

    /// The PeerIds of `accept_from`; `None` when there are none (any peer
    /// may place).
    pub fn accept_from_peers(&self) -> Result<Option<Vec<fincrypt_net::PeerId>>> {
        if self.accept_from.is_empty() {
            return Ok(None);
        }
        Config::peer_list(&self.accept_from, "accept_from").map(Some)
    }

    /// PeerIds of a list setting, naming the setting of a bad one.
    fn peer_list(list: &[String], what: &str) -> Result<Vec<fincrypt_net::PeerId>> {
        list.iter()
            .map(|id| {
                id.trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("`{what}`: {id:?} is not a PeerId ({e})"))
            })
            .collect()
    }

    /// A mediator's `accept_clients` (none: any client) and `deny_clients`.
    pub fn client_rules(
        &self,
    ) -> Result<(Option<Vec<fincrypt_net::PeerId>>, Vec<fincrypt_net::PeerId>)> {
        let accept = if self.accept_clients.is_empty() {
            None
        } else {
            Some(Config::peer_list(&self.accept_clients, "accept_clients")?)
        };
        Ok((
            accept,
            Config::peer_list(&self.deny_clients, "deny_clients")?,
        ))
    }

    /// What an owner's market (or a mediator's) pays and how often it checks.
    pub fn owner_settings(&self) -> Result<fincrypt_market::owner::OwnerSettings> {
        Ok(fincrypt_market::owner::OwnerSettings {
            max_price: self.max_price,
            pricing: self.pricing()?,
            period: self.period,
            challenges_per_period: self.challenges_per_period.max(1),
            min_payout: self.min_payout,
            min_periods_funded: self.min_periods_funded,
        })
    }

    /// A mediator's `accept_holders` (none: any holder) and `deny_holders`.
    pub fn holder_rules(
        &self,
    ) -> Result<(Option<Vec<fincrypt_net::PeerId>>, Vec<fincrypt_net::PeerId>)> {
        let accept = if self.accept_holders.is_empty() {
            None
        } else {
            Some(Config::peer_list(&self.accept_holders, "accept_holders")?)
        };
        Ok((
            accept,
            Config::peer_list(&self.deny_holders, "deny_holders")?,
        ))
    }

    /// A mount's mediator: its address and PeerId (none when not set).
    pub fn mediator(&self) -> Result<Option<(fincrypt_net::Multiaddr, fincrypt_net::PeerId)>> {
        if self.mediator.trim().is_empty() {
            return Ok(None);
        }
        let addr: fincrypt_net::Multiaddr = self
            .mediator
            .trim()
            .parse()
            .with_context(|| format!("`mediator`: {:?} is not a multiaddr", self.mediator))?;
        let Some(fincrypt_net::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
            bail!(
                "`mediator`: {:?} does not end in /p2p/<PeerId>, so the mediator cannot be told apart",
                self.mediator
            );
        };
        Ok(Some((addr, peer)))
    }

    /// The owner's pricing scheme.
    pub fn pricing(&self) -> Result<fincrypt_market::owner::Pricing> {
        self.pricing
            .parse()
            .map_err(|e: String| anyhow::anyhow!("`pricing`: {e}"))
    }

    /// The Bitcoin node's RPC settings, if one is configured.
    pub fn bitcoin_rpc(&self) -> Result<Option<fincrypt_market::wallet::RpcSettings>> {
        use fincrypt_market::wallet::{RpcAuth, RpcSettings};
        if self.bitcoin_rpc_url.is_empty() {
            return Ok(None);
        }
        let auth = if !self.bitcoin_rpc_cookie.is_empty() {
            RpcAuth::Cookie(PathBuf::from(&self.bitcoin_rpc_cookie))
        } else if !self.bitcoin_rpc_user.is_empty() {
            RpcAuth::UserPass(
                self.bitcoin_rpc_user.clone(),
                self.bitcoin_rpc_password.clone(),
            )
        } else {
            bail!(
                "bitcoin_rpc_url is set but neither bitcoin_rpc_user and bitcoin_rpc_password \
                 nor bitcoin_rpc_cookie: the Bitcoin node needs a login"
            );
        };
        Ok(Some(RpcSettings {
            url: self.bitcoin_rpc_url.clone(),
            wallet: (!self.bitcoin_wallet.is_empty()).then(|| self.bitcoin_wallet.clone()),
            auth,
        }))
    }

    /// The names of every setting, as `config.toml` spells them.
    pub fn keys() -> Vec<String> {
        match toml::Table::try_from(Config::default()) {
            Ok(t) => t.keys().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The commented file `init` writes, so a user can see what may be set.
    pub fn default_file() -> String {
        let d = Config::default();
        format!(
            "# Fincrypt settings. Each may also be set as FINCRYPT_<NAME> in the environment.\n\
             \n\
             # Bytes of the local volume that cached copies of other blocks may use.\n\
             cache_capacity = {}\n\
             \n\
             # Seconds between automatic snapshots (0: only on request), and how many to keep.\n\
             snapshot_interval = {}\n\
             snapshot_keep = {}\n\
             \n\
             # Peers: addresses to listen on and to join through, e.g.\n\
             # listen = [\"/ip4/0.0.0.0/tcp/4001\"]\n\
             # bootstrap = [\"/ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...\"]\n\
             # With neither, the mount works alone.\n\
             \n\
             # Copies on peers of each own block unless a directory's\n\
             # user.fincrypt.redundancy says otherwise (fincryptctl redundancy set).\n\
             redundancy = {}\n\
             \n\
             # Bytes of the local volume offered to peers for their blocks (0: none),\n\
             # and the peers that alone may place there (none: any), e.g.\n\
             # accept_from = [\"12D3KooW...\"]\n\
             holder_capacity = {}\n\
             \n\
             # Seconds between passes that place own blocks on peers.\n\
             replicate_interval = {}\n\
             \n\
             # Storage proofs: seconds between rounds (0: none), blocks per round,\n\
             # and consecutive failures after which a holder is dropped.\n\
             proof_interval = {}\n\
             proof_blocks = {}\n\
             proof_failures = {}\n\
             \n\
             # Seconds a holder may stay unreachable before its blocks go elsewhere.\n\
             holder_timeout = {}\n\
             \n\
             # Seconds between checks of every local block against its score\n\
             # (a damaged one is fetched again from a holder); 0: only on request.\n\
             scrub_interval = {}\n\
             \n\
             # With peers: seconds after changes settle within which the tree is\n\
             # published to them, so a lost machine loses at most about that much\n\
             # (0: only snapshots are published).\n\
             publish_interval = {}\n\
             \n\
             # Storage nodes (fincrypt serve): the price in satoshis per GiB per\n\
             # period (0: free), the fewest periods a contract lasts, and where\n\
             # payments go (empty: a new address of the wallet below).\n\
             price = {}\n\
             min_duration = {}\n\
             # The lowest price taken from an owner or mediator whose pricing\n\
             # floats, period by period (0: the price).\n\
             floor = {}\n\
             # The length of a period, in seconds.\n\
             period = {}\n\
             # payout_address = \"bc1q...\"\n\
             \n\
             # Owners paying for storage: the most paid per GiB per period (0: free\n\
             # storage only), how offers are ranked (lowest-first, fixed, nearest,\n\
             # floating: lowest-first, each period paying no more than the cheapest\n\
             # room seen and no less than the holder's floor),\n\
             # the fewest periods the wallet should fund, challenges of each holder\n\
             # per period, and the smallest payout (less waits for a later period).\n\
             max_price = {}\n\
             pricing = \"{}\"\n\
             min_periods_funded = {}\n\
             challenges_per_period = {}\n\
             min_payout = {}\n\
             # A storage node's patience: periods unpaid (beyond min_payout carried)\n\
             # before it takes no new blocks from an owner; one contract duration\n\
             # later it releases what it holds for that owner.\n\
             unpaid_periods = {}\n\
             \n\
             # A mediator that keeps this mount's escrow (fincryptctl mediator), e.g.\n\
             # mediator = \"/ip4/192.0.2.9/tcp/4001/p2p/12D3KooW...\"\n\
             # Running one (fincrypt mediator): its fee in percent, and its clients\n\
             # (accept_clients: only these; deny_clients: never these), by PeerId.\n\
             # fee = 1.0\n\
             # accept_clients = [\"12D3KooW...\"]\n\
             # A mediator pays holders at most max_price (0: any price; it takes\n\
             # the lowest first), places on accept_holders only if set, never on\n\
             # deny_holders nor on a holder whose audit score is under\n\
             # min_audit_score, and only for clients whose escrow pays for\n\
             # min_escrow_periods periods; it tells a client whose escrow pays for\n\
             # fewer than grace_periods periods that it runs low. A holder that\n\
             # answers none of its audits for unreachable_periods periods is\n\
             # taken for gone: its contracts end and its blocks move elsewhere.\n\
             # deny_holders = [\"12D3KooW...\"]\n\
             min_audit_score = {}\n\
             min_escrow_periods = {}\n\
             grace_periods = {}\n\
             unreachable_periods = {}\n\
             \n\
             # Folders backed up on every change into backups/NAME in the mount\n\
             # (`fincrypt watch PATH`, `fincrypt unwatch NAME`), after they stay\n\
             # quiet for watch_settle seconds; rescanned every watch_rescan seconds\n\
             # when inotify cannot follow them. Each is a table:\n\
             # [[watch]]\n\
             # path = \"/home/me/Documents\"\n\
             # name = \"Documents\"\n\
             # redundancy = 3\n\
             watch_settle = {}\n\
             watch_rescan = {}\n\
             \n\
             # The Bitcoin node whose wallet pays and is paid (JSON-RPC), e.g.\n\
             # bitcoin_rpc_url = \"http://127.0.0.1:8332\"\n\
             # bitcoin_rpc_user = \"...\" and bitcoin_rpc_password = \"...\", or\n\
             # bitcoin_rpc_cookie = \"/path/to/.cookie\"; bitcoin_wallet = \"name\"\n",
            d.cache_capacity,
            d.snapshot_interval,
            d.snapshot_keep,
            d.redundancy,
            d.holder_capacity,
            d.replicate_interval,
            d.proof_interval,
            d.proof_blocks,
            d.proof_failures,
            d.holder_timeout,
            d.scrub_interval,
            d.publish_interval,
            d.price,
            d.min_duration,
            d.floor,
            d.period,
            d.max_price,
            d.pricing,
            d.min_periods_funded,
            d.challenges_per_period,
            d.min_payout,
            d.unpaid_periods,
            d.min_audit_score,
            d.min_escrow_periods,
            d.grace_periods,
            d.unreachable_periods,
            d.watch_settle,
            d.watch_rescan
        )
    }
}
