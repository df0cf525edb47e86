//! `fincrypt mount`: the daemon that serves the filesystem, its control
//! socket, and its background workers (snapshots, GC, scrub, and, with peers,
//! the durability engine's).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fincrypt_blockstore::{BlockStore, FileRef, LocalStore, Score, TreeParams};
use fincrypt_engine::{
    Engine, EngineConfig, Manifest, ManifestRecord, ProofPolicy, Publisher, Remote, Step,
    TieredStore, WorkerState, Workers,
};
use fincrypt_fs::fuse::MountOptions;
use fincrypt_fs::{Fossil, Meta, snapshot};
use fincrypt_market::ledger::Ledger;
use fincrypt_market::mediated::MediatedMarket;
use fincrypt_market::mediator::{Ask, Reply};
use fincrypt_market::owner::OwnerMarket;
use fincrypt_market::wallet::BitcoinRpc;
use fincrypt_net::{Client, Holder, Multiaddr, Node, NodeConfig};
use futures::future::BoxFuture;

use crate::config::{Config, Home};
use crate::control::{self, Answer, Request};
use crate::secrets;
use crate::wants::FsWants;

/// What `fincrypt mount` was asked to do.
pub struct MountArgs {
    /// None: `fincrypt backup`, the daemon without a FUSE mount.
    pub mountpoint: Option<PathBuf>,
    pub allow_other: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// Peer addresses to listen on; they replace the config's when given.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through; they replace the config's when given.
    pub bootstrap: Vec<Multiaddr>,
    /// The mediator to use; replaces the config's `mediator` when given.
    pub mediator: Option<Multiaddr>,
}

/// The mount's peer node, when it has one.
struct Net {
    node: Mutex<Option<Node>>,
    client: Client,
    listen_addrs: Vec<Multiaddr>,
    bulk_port: Option<u16>,
    /// What became of the bootstrap addresses.
    bootstraps: fincrypt_net::BootstrapPeers,
    engine: Arc<Engine>,
    /// Publishes the owner's root records.
    publisher: Publisher,
    /// What blocks want, as the engine asks it.
    wants: Arc<FsWants>,
    /// Offers, contracts and payments.
    market: Arc<OwnerMarket<BitcoinRpc>>,
    /// The mediator that keeps this mount's escrow and chooses its paid
    /// holders, if one is set.
    mediator: Option<Arc<MediatedMarket>>,
}

/// The owner's market, over the ledger in `home` and the wallet `config` names.
fn open_market(
    home: &Home,
    config: &Config,
    keypair: fincrypt_net::Keypair,
    client: Client,
) -> Result<Arc<OwnerMarket<BitcoinRpc>>> {
    let wallet = match config.bitcoin_rpc()? {
        Some(rpc) => Some(BitcoinRpc::new(&rpc)?),
        None => None,
    };
    let ledger = Arc::new(
        Ledger::open(&home.market_ledger_file())
            .with_context(|| format!("opening {}", home.market_ledger_file().display()))?,
    );
    let settings = config.owner_settings()?;
    Ok(OwnerMarket::new(keypair, client, ledger, settings, wallet)?)
}

/// How long a status waits for the node's list of peers.
const PEERS_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses configured multiaddrs, naming the setting of a bad one.
fn parse_addrs(list: &[String], what: &str) -> Result<Vec<Multiaddr>> {
    list.iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("{what} address {a:?} is not a multiaddr"))
        })
        .collect()
}

impl Net {
    /// Starts a node when `config` names addresses to listen on or join through.
    fn start(
        runtime: &tokio::runtime::Runtime,
        home: &Home,
        config: &Config,
        keys: &fincrypt_blockstore::Keys,
        volume: &Arc<LocalStore>,
        wants: Arc<FsWants>,
    ) -> Result<Option<Net>> {
        let listen = parse_addrs(&config.listen, "listen")?;
        let mut bootstrap = parse_addrs(&config.bootstrap, "bootstrap")?;
        let mediator = config.mediator()?;
        // The mediator is a peer too: the node joins through it as well.
        if let Some((addr, _)) = &mediator
            && !bootstrap.contains(addr)
        {
            bootstrap.push(addr.clone());
        }
        if listen.is_empty() && bootstrap.is_empty() {
            return Ok(None);
        }
        let holder = if config.holder_capacity > 0 {
            let h = Holder::open(
                volume.clone(),
                &home.placements_file(),
                config.holder_capacity,
            )?;
            h.accept_from(config.accept_from_peers()?);
            Some(Arc::new(h) as Arc<dyn fincrypt_net::Handler>)
        } else {
            None
        };
        let mut node_config = NodeConfig::with_key_file(&home.node_key_file())?;
        let keypair = node_config.keypair.clone();
        node_config.listen = listen;
        node_config.bootstrap = bootstrap;
        let node = runtime.block_on(Node::start(node_config, holder))?;
        let client = node.client();
        let listen_addrs: Vec<Multiaddr> = node
            .listen_addrs()
            .iter()
            .map(|a| format!("{a}/p2p/{}", node.peer_id()).parse())
            .collect::<Result<_, _>>()
            .context("forming listen addresses")?;
        for a in &listen_addrs {
            eprintln!("fincrypt: listening on {a}");
        }
        let manifest = Arc::new(Manifest::open(&home.manifest_file(), volume.clone())?);
        let proofs = ProofPolicy {
            blocks: config.proof_blocks.max(1),
            failures: config.proof_failures.max(1),
            timeout: Duration::from_secs(30),
        };
        let publisher = Publisher::new(
            &keys.signing,
            keys.root_record_key(),
            client.clone(),
            manifest.clone(),
        );
        let engine = Engine::new(
            client.clone(),
            manifest,
            wants.clone(),
            volume.clone(),
            proofs,
        );
        let mediator = match mediator {
            Some((addr, peer)) => Some(MediatedMarket::open(
                &home.mediated_file(),
                &keypair,
                client.clone(),
                peer,
                addr,
            )?),
            None => None,
        };
        let market = open_market(home, config, keypair, client.clone())?;
        Ok(Some(Net {
            mediator,
            market,
            publisher,
            bulk_port: node.bulk_port(),
            bootstraps: node.bootstrap_peers(),
            node: Mutex::new(Some(node)),
            client,
            listen_addrs,
            engine,
            wants,
        }))
    }

    fn connected_peers(&self, runtime: &tokio::runtime::Handle) -> u64 {
        let peers = runtime
            .block_on(async { tokio::time::timeout(PEERS_TIMEOUT, self.client.peers()).await });
        match peers {
            Ok(Ok(list)) => list.iter().filter(|p| p.connected).count() as u64,
            _ => 0,
        }
    }

    fn shutdown(&self, runtime: &tokio::runtime::Handle) {
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(node) = node {
            runtime.block_on(node.shutdown());
        }
    }
}

/// The pieces a running mount shares between threads.
struct Daemon {
    fs: Arc<Fossil>,
    volume: Arc<LocalStore>,
    tiered: Arc<TieredStore>,
    config: Config,
    /// None when it runs without a mount (`fincrypt backup`).
    mountpoint: Option<PathBuf>,
    /// The watched folders (none on a read-only mount).
    watcher: Option<Arc<crate::watch::Watcher>>,
    /// The `config.toml` read at start, if there was one.
    config_file: Option<PathBuf>,
    /// Serialises snapshots, pruning, GC and the engine's walks.
    snapshots: Arc<Mutex<()>>,
    /// The peer node, if peers are configured.
    net: Option<Net>,
    /// Who holds the own blocks: the engine's, or without peers the one a
    /// run with peers left, so GC keeps the holders of what it frees for
    /// their release (see [`Manifest::keep_freed`]).
    manifest: Option<Arc<Manifest>>,
    /// Every background job.
    workers: Workers,
    runtime: tokio::runtime::Handle,
    /// The root the last root record published from here names.
    published: Mutex<Option<fincrypt_fs::meta::SnapshotRecord>>,
    /// True while a deleted snapshot is kept as a head until a newer root
    /// is published (see [`Daemon::delete_snapshots`]).
    deleted_heads: std::sync::atomic::AtomicBool,
    /// When the tree last changed without a root written since.
    heads: Mutex<HeadState>,
}

/// What the publish worker knows of changes since the last root.
#[derive(Default)]
struct HeadState {
    /// The metadata's tree generation right after the newest root was
    /// written (at start: as the mount found it).
    root_generation: Option<u64>,
    /// The generation the last look saw, and since when it differs from `root_generation`.
    seen: u64,
    changed_since: Option<Instant>,
}

impl Daemon {
    /// Frees blocks that neither live files nor retained snapshots use.
    fn collect(&self) -> Result<u64> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        self.collect_locked()
    }

    /// [`Daemon::collect`], under the snapshot lock already taken.
    fn collect_locked(&self) -> Result<u64> {
        let freed = snapshot::gc(&self.fs, &self.volume, |tags| match &self.manifest {
            Some(m) => m.keep_freed(tags).map_err(|e| {
                fincrypt_blockstore::Error::Index(format!(
                    "keeping the holders of freed blocks in the manifest: {e}"
                ))
            }),
            None => Ok(()),
        })?;
        self.freed(&freed)?;
        Ok(freed.len() as u64)
    }

    /// Blocks GC freed locally are released on their holders too.
    fn freed(&self, scores: &[fincrypt_blockstore::Score]) -> Result<()> {
        if let Some(net) = &self.net {
            net.engine.released(scores)?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<control::Synced> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let manifest = match &self.net {
            Some(net) => Some(self.write_manifest(net.engine.manifest())?),
            None => None,
        };
        // Pruned first, so the new root lists only the snapshots that stay.
        let keep = self.config.snapshot_keep.max(1);
        snapshot::prune(&self.fs, keep - 1)?;
        let snap = snapshot::create_with_manifest(&self.fs, manifest)?;
        self.root_written();
        snapshot::prune(&self.fs, keep)?;
        let freed = self.collect_locked()?;
        if let Some(net) = &self.net {
            // New metadata blocks (the root, directories, the manifest) want copies.
            net.engine.wake_replication();
        }
        Ok(control::Synced {
            time: fincrypt_fs::snapdir::name(snap.time),
            freed_blocks: freed,
        })
    }

    /// Deletes the snapshots `names` (refusing all if one is not there) and
    /// those older than `older_than`; a new root that lists the rest is
    /// written before GC frees what only they used.
    fn delete_snapshots(
        &self,
        names: &[String],
        older_than: Option<Duration>,
    ) -> Result<control::Deleted> {
        use fincrypt_fs::snapdir::name;
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let snaps = self.fs.meta().snapshots()?;
        for n in names {
            if !snaps.iter().any(|s| name(s.time) == *n) {
                bail!("there is no snapshot {n} (see `fincryptctl snapshots list`): none deleted");
            }
        }
        let now = fincrypt_fs::meta::Time::now().secs;
        let cutoff = older_than.map(|age| now.saturating_sub(age.as_secs() as i64));
        let doomed: Vec<_> = snaps
            .iter()
            .filter(|s| names.contains(&name(s.time)) || cutoff.is_some_and(|c| s.time.secs < c))
            .cloned()
            .collect();
        // The root the network holds (the last published from here, or
        // after a restart the newest) is what a new machine recovers from:
        // deleted, it leaves `.snapshots/` but stays a head, its blocks
        // kept, until a newer root is published.
        let held_by_network = match &self.net {
            Some(_) => self
                .published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|s| s.time)
                .or(self.fs.meta().roots()?.last().map(|s| s.time)),
            None => None,
        };
        let kept = doomed
            .iter()
            .find(|s| Some(s.time) == held_by_network)
            .map(|s| name(s.time));
        snapshot::delete(&self.fs, &doomed, held_by_network)?;
        if kept.is_some() {
            self.deleted_heads.store(true, Ordering::Relaxed);
        }
        let mut freed = 0;
        if !doomed.is_empty() {
            self.write_head_locked()?;
            freed = self.collect_locked()?;
        }
        Ok(control::Deleted {
            snapshots: doomed.iter().map(|s| name(s.time)).collect(),
            freed_blocks: freed,
            kept_for_network: kept,
        })
    }

    /// Stores the manifest as blocks for the next root (docs/FORMATS.md,
    /// "Owner's manifest"); unchanged, it is the same blocks as last time.
    fn write_manifest(&self, manifest: &Manifest) -> Result<FileRef> {
        let (keys, params) = self.fs.keys();
        Ok(manifest.record()?.write(self.fs.store(), keys, params)?)
    }

    /// The manifest the newest root names, with the holders the working
    /// index knows now of the manifest's own blocks.
    fn manifest_view(&self) -> Result<control::ManifestView> {
        let Some(snap) = self.fs.meta().snapshots()?.pop() else {
            bail!("no snapshot yet: run `fincryptctl sync` first");
        };
        let root = snapshot::root(&self.fs, &snap)?;
        let (root_hex, time) = (
            snap.root.score.to_hex(),
            fincrypt_fs::snapdir::name(snap.time),
        );
        let Some(file) = root.manifest else {
            return Ok(control::ManifestView {
                root: root_hex,
                time,
                manifest: None,
            });
        };
        let record = ManifestRecord::read(self.fs.reader(), &file)?;
        let mut blocks = Vec::new();
        self.fs
            .reader()
            .visit_scores(&file, &mut |p| blocks.push(p.score))?;
        let now = match &self.net {
            Some(net) => net.engine.manifest().holders_of(blocks.iter().copied())?,
            None => vec![Vec::new(); blocks.len()],
        };
        let entry = |score: &Score, holders: &[fincrypt_net::PeerId]| control::HeldBlock {
            score: score.to_hex(),
            holders: holders.iter().map(|p| p.to_string()).collect(),
        };
        Ok(control::ManifestView {
            root: root_hex,
            time,
            manifest: Some(control::ManifestBody {
                version: record.version,
                bytes: file.len(),
                blocks: blocks.iter().zip(&now).map(|(s, h)| entry(s, h)).collect(),
                entries: record.holders()?.iter().map(|(s, h)| entry(s, h)).collect(),
            }),
        })
    }

    fn engine(&self) -> Result<&Arc<Engine>> {
        match &self.net {
            Some(net) => Ok(&net.engine),
            None => bail!(
                "this mount has no peers: give --listen or --bootstrap (or set them in the config)"
            ),
        }
    }

    /// Replication passes until nothing is short of copies or `timeout` passes;
    /// then a root is committed, so the newest root's manifest names the copies.
    fn replicate_until(&self, timeout: Duration) -> Result<control::Replication> {
        let engine = self.engine()?.clone();
        let deadline = Instant::now() + timeout;
        let under = loop {
            // The deadline bounds a pass too: one stuck on an unresponsive
            // peer ends with the rest of its blocks counted short. What it
            // placed before is on its holders; the next pass records it.
            let left = deadline.saturating_duration_since(Instant::now());
            let pass = self
                .runtime
                .block_on(async { tokio::time::timeout(left, engine.pass()).await });
            let under = match pass {
                Ok(under) => under?,
                Err(_) => {
                    // Unfinished, so not all placed: at least one block, or
                    // what the last finished pass left short.
                    let s = engine.stats();
                    let mut note = s.reason.lock().unwrap_or_else(|p| p.into_inner());
                    let before = std::mem::take(&mut *note);
                    *note = format!("a pass was still running at the timeout. {before}")
                        .trim_end()
                        .to_owned();
                    s.under_replicated.load(Ordering::Relaxed).max(1)
                }
            };
            if under == 0 || Instant::now() >= deadline {
                break under;
            }
            // Peers may still be connecting or identifying themselves: retry.
            std::thread::sleep(Duration::from_millis(500).min(deadline - Instant::now()));
        };
        if under == 0 {
            self.snapshot()?;
            // The new root's own blocks (root, manifest) want copies too.
            let under = self.runtime.block_on(engine.pass())?;
            if under == 0 {
                self.publish(true)?;
            }
            return Ok(self.replication(&engine, under));
        }
        Ok(self.replication(&engine, under))
    }

    /// Publishes a root record naming the newest snapshot, unless one
    /// already does. Unless `now`, only once the root's blocks are on peers
    /// (its root block has holders, and no queued block has none; blocks
    /// still short of their full copies do not hold it back): a record
    /// naming blocks no peer has yet would not recover. 1 if it published.
    fn publish(&self, now: bool) -> Result<u64> {
        let Some(net) = &self.net else {
            return Ok(0);
        };
        let Some(snap) = self.fs.meta().roots()?.pop() else {
            return Ok(0);
        };
        let last = self
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if last.is_some_and(|l| l.root.score == snap.root.score) {
            return Ok(0);
        }
        if !now {
            let manifest = net.engine.manifest();
            let root_held = !manifest.holders(&snap.root.score)?.is_empty();
            let unheld = manifest.queued_without_holder()?;
            if !root_held || unheld {
                tracing::debug!(root_held, unheld, "the newest root is not on peers yet");
                return Ok(0);
            }
        }
        let pointer = postcard::to_allocvec(&snap.root)?;
        let published = self.runtime.block_on(net.publisher.publish(&pointer))?;
        tracing::info!(
            sequence = published.sequence,
            kept = published.kept,
            snapshot = %fincrypt_fs::snapdir::name(snap.time),
            "published the root record"
        );
        // Older heads are not needed to recover any more; GC frees what only they used.
        {
            let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            // A deleted snapshot kept as a head for the network's sake may
            // have asked for more copies than what stays.
            let rewalk = self.deleted_heads.swap(false, Ordering::Relaxed);
            snapshot::drop_heads_before(&self.fs, &snap, rewalk)?;
        }
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap);
        Ok(1)
    }

    /// The tree as it is now has a root.
    fn root_written(&self) {
        let mut h = self.heads.lock().unwrap_or_else(|p| p.into_inner());
        h.root_generation = Some(self.fs.meta().tree_generation());
        h.changed_since = None;
    }

    /// The publish worker: writes a head root once changes since the newest
    /// root have settled (no change since the last look) or have waited
    /// `publish_interval`, then publishes the newest root once it is placed.
    fn publish_when_placed(&self) -> Result<u64> {
        let interval = Duration::from_secs(self.config.publish_interval);
        if self.net.is_some() && !interval.is_zero() {
            let now = self.fs.meta().tree_generation();
            let write = {
                let mut h = self.heads.lock().unwrap_or_else(|p| p.into_inner());
                match h.root_generation {
                    Some(g) if g == now => false,
                    _ => {
                        let since = *h.changed_since.get_or_insert_with(Instant::now);
                        let settled = h.seen == now;
                        h.seen = now;
                        settled || since.elapsed() >= interval
                    }
                }
            };
            if write {
                self.write_head()?;
            }
        }
        self.publish(false)
    }

    /// Writes a head root of the tree as it is, with the manifest.
    fn write_head(&self) -> Result<()> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        self.write_head_locked()
    }

    /// [`Daemon::write_head`], under the snapshot lock already taken.
    fn write_head_locked(&self) -> Result<()> {
        let Some(net) = &self.net else {
            return Ok(());
        };
        let manifest = self.write_manifest(net.engine.manifest())?;
        let head = snapshot::create_head(&self.fs, Some(manifest))?;
        self.root_written();
        tracing::debug!(head = %fincrypt_fs::snapdir::name(head.time), "wrote a root to publish");
        // Its new blocks (directories, the root, the manifest) want copies.
        net.engine.wake_replication();
        Ok(())
    }

    fn replication(&self, engine: &Engine, under: u64) -> control::Replication {
        let s = engine.stats();
        control::Replication {
            under_replicated: under,
            replicated_blocks: s.tracked_blocks.load(Ordering::Relaxed),
            placed_copies: s.placed_copies.load(Ordering::Relaxed),
            blocks_by_redundancy: s
                .by_redundancy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            note: s.reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    fn status(&self) -> Result<control::Status> {
        let s = self.volume.stats();
        let workers = self.workers.list();
        let mut status = control::Status {
            role: if self.mountpoint.is_some() {
                "mount"
            } else {
                "backup"
            }
            .into(),
            mountpoint: self.mountpoint.clone(),
            config_file: self.config_file.clone(),
            env_file: crate::config::env_file(),
            own_blocks: s.own_blocks,
            own_bytes: s.own_bytes,
            held_blocks: s.held_blocks,
            held_bytes: s.held_bytes,
            capacity: self.config.holder_capacity,
            cached_blocks: s.cached_blocks,
            cached_bytes: s.cached_bytes,
            unsealed_bytes: self.fs.dirty_bytes() as u64,
            snapshots: self.fs.meta().snapshots()?.len() as u64,
            default_redundancy: self.config.redundancy,
            redundancy_highest: self
                .net
                .as_ref()
                .and_then(|n| *n.wants.highest.lock().unwrap_or_else(|p| p.into_inner())),
            workers: control::WorkersSummary {
                total: workers.len() as u64,
                busy: workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Busy)
                    .count() as u64,
                failing: workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Failing)
                    .count() as u64,
            },
            ..Default::default()
        };
        status.replication.fetched_from_holders = self.tiered.fetched_from_holders();
        match &self.net {
            None => {
                status.replication.note =
                    "no peers configured: blocks are kept locally only".to_owned();
            }
            Some(net) => {
                let st = net.engine.stats();
                status.peer_id = Some(net.client.local_peer_id().to_string());
                status.listen_addrs = net.listen_addrs.iter().map(|a| a.to_string()).collect();
                status.bulk_port = net.bulk_port;
                status.bootstrap = net.bootstraps.list();
                if let Some(m) = &net.mediator {
                    status.mediator = m.address().to_string();
                    status.mediator_note = m.note();
                    status.mediator_reports_waiting = m.waiting()?;
                    status.mediator_moves_taken = m.moves_taken();
                    if let Some(e) = m.escrow() {
                        status.mediator_escrow_sats = Some(e.escrow_sats);
                        status.mediator_funded_periods = Some(e.funded_periods);
                        status.mediator_low_escrow = e.low;
                    }
                }
                status.peers = net.connected_peers(&self.runtime);
                status.root_sequence = net.publisher.sequence()?;
                status.root_published = self
                    .published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .map(|s| fincrypt_fs::snapdir::name(s.time));
                let r = &mut status.replication;
                r.under_replicated = st.under_replicated.load(Ordering::Relaxed);
                r.copies_put = st.copies_put.load(Ordering::Relaxed);
                r.lost = st.lost.load(Ordering::Relaxed);
                if r.lost > 0 {
                    r.lost_files = net
                        .engine
                        .lost()?
                        .into_iter()
                        .take(100)
                        .map(|(score, path)| control::LostBlock {
                            score: score.to_hex(),
                            path,
                        })
                        .collect();
                }
                r.passes = st.passes.load(Ordering::Relaxed);
                r.passes_skipped = st.passes_skipped.load(Ordering::Relaxed);
                r.releases_pending = st.releases_pending.load(Ordering::Relaxed);
                (r.queued, r.queued_releases) = net.engine.manifest().queue_len()?;
                r.full_walks = st.full_walks.load(Ordering::Relaxed);
                r.blocks_walked = st.blocks_walked.load(Ordering::Relaxed);
                r.manifest_rows_scanned = st.rows_scanned.load(Ordering::Relaxed);
                r.dht_lookups = st.lookups.load(Ordering::Relaxed);
                r.note = st.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
                r.proofs_passed = st.proofs_passed.load(Ordering::Relaxed);
                r.proofs_failed = st.proofs_failed.load(Ordering::Relaxed);
                r.holders_dropped = st.holders_dropped.load(Ordering::Relaxed);
                r.blocks_dropped = st.blocks_dropped.load(Ordering::Relaxed);
                r.manifest_damaged_entries = net.engine.manifest().corrupt_entries();
                let m = net.market.view();
                status.contracts = m.contracts;
                status.paid_sats = m.paid_sats;
                status.balance_sats = m.balance_sats;
                status.funded_periods = m.funded_periods;
                status.low_balance = m.low_balance;
                if r.under_replicated > 0 && !m.skipped.is_empty() {
                    // Why the peers that could take them did not.
                    r.note = format!("{}; {}", r.note, m.skipped);
                }
                status.market_note = m.skipped;
            }
        }
        Ok(status)
    }

    /// Checks every local block now; a damaged or missing one is fetched
    /// from a holder and written back where one has it.
    fn scrub(&self) -> Result<control::ScrubSummary> {
        let report = self.volume.scrub()?;
        let mut repaired = Vec::new();
        for score in report.corrupt.iter().chain(&report.missing) {
            match self.tiered.repair(score) {
                Ok(true) => repaired.push(score.to_hex()),
                Ok(false) => {}
                Err(e) => tracing::warn!(%score, error = %e, "scrub could not repair a block"),
            }
        }
        if let Some(net) = &self.net
            && report.corrupt.len() + report.missing.len() > repaired.len()
        {
            net.engine.wake_replication();
        }
        Ok(control::ScrubSummary {
            by: "mount".into(),
            checked: report.checked,
            corrupt: report.corrupt.iter().map(|s| s.to_hex()).collect(),
            missing: report.missing.iter().map(|s| s.to_hex()).collect(),
            stray: report
                .orphans
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            repaired,
        })
    }

    fn handle(&self, req: Request) -> Result<Answer> {
        Ok(match req {
            Request::Replicate { timeout_secs } => {
                Answer::Replication(self.replicate_until(Duration::from_secs(timeout_secs))?)
            }
            Request::Status => Answer::Status(Box::new(self.status()?)),
            Request::Sync | Request::SnapshotsCreate => Answer::Synced(self.snapshot()?),
            Request::Manifest => Answer::Manifest(self.manifest_view()?),
            Request::SnapshotsList => Answer::Snapshots(
                self.fs
                    .meta()
                    .snapshots()?
                    .iter()
                    .map(|s| control::SnapshotInfo {
                        name: fincrypt_fs::snapdir::name(s.time),
                        root: s.root.score.to_hex(),
                    })
                    .collect(),
            ),
            Request::Workers => Answer::Workers(self.workers.list()),
            Request::Scrub => Answer::Scrub(self.scrub()?),
            Request::MarketOffers => Answer::Offers(self.market()?.offers()),
            Request::MarketContracts => {
                let net = self.net.as_ref().context(NO_MARKET)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let dropped = net
                    .engine
                    .manifest()
                    .holder_records()?
                    .into_iter()
                    .filter(|(_, r)| r.banned(now))
                    .map(|(p, _)| p)
                    .collect();
                Answer::Contracts(net.market.contract_views(&dropped)?)
            }
            Request::Wallet => {
                let market = self.market()?;
                let m = market.view();
                Answer::Wallet(control::WalletView {
                    balance_sats: m.balance_sats,
                    funded_periods: m.funded_periods,
                    cost_per_period: m.cost_per_period,
                    low_balance: m.low_balance,
                    last_settlement: m.last_settlement,
                    payments: market.payments()?,
                    ..Default::default()
                })
            }
            Request::MediatorDepositAddress => {
                let (addr, reply) = self.ask_mediator(Ask::DepositAddress)?;
                match reply {
                    Reply::DepositAddress { address } => {
                        Answer::DepositAddress(control::DepositAddress {
                            mediator: addr.to_string(),
                            address,
                        })
                    }
                    other => bail!("the mediator answered something else: {other:?}"),
                }
            }
            Request::MediatorBalance => match self.ask_mediator(Ask::Balance)?.1 {
                Reply::Balance(escrow) => Answer::Escrow(escrow),
                other => bail!("the mediator answered something else: {other:?}"),
            },
            Request::MediatorClients | Request::MediatorHolders | Request::MediatorPeriods => {
                bail!(
                    "this is a mount: `mediator clients`, `holders` and `periods` ask a mediator's own \
                 home (fincryptctl --home MEDIATOR_HOME)"
                )
            }
            Request::SnapshotsDelete {
                names,
                older_than_secs,
            } => Answer::Deleted(
                self.delete_snapshots(&names, older_than_secs.map(Duration::from_secs))?,
            ),
            Request::WatchReload => {
                self.watcher()?.reload()?;
                Answer::Watch(self.watcher()?.status())
            }
            Request::WatchStatus => Answer::Watch(self.watcher()?.status()),
            Request::WatchRescan { name } => {
                self.watcher()?.rescan_now(name.as_deref())?;
                Answer::Watch(self.watcher()?.status())
            }
            Request::Restore {
                name,
                dest,
                at,
                overwrite,
            } => Answer::Restored(crate::watch::restore(
                &self.fs,
                &name,
                &dest,
                at.as_deref(),
                overwrite,
                &mut |_| {},
            )?),
        })
    }
}

/// Why a mount without peers has no market to show.
const NO_MARKET: &str =
    "this mount has no peers configured, so it makes no contracts and pays nothing";

impl Daemon {
    fn watcher(&self) -> Result<&Arc<crate::watch::Watcher>> {
        self.watcher
            .as_ref()
            .context("this mount is read-only: it backs up no watched folder")
    }

    fn market(&self) -> Result<&Arc<OwnerMarket<BitcoinRpc>>> {
        Ok(&self.net.as_ref().context(NO_MARKET)?.market)
    }

    /// Asks this mount's mediator; its address and answer.
    fn ask_mediator(&self, ask: Ask) -> Result<(Multiaddr, Reply)> {
        const NO_MEDIATOR: &str = "this mount has no mediator: set `mediator` in the config \
             (its address, ending in /p2p/<PeerId>) and mount again";
        let net = self.net.as_ref().context(NO_MEDIATOR)?;
        let m = net.mediator.as_ref().context(NO_MEDIATOR)?;
        let reply = self.runtime.block_on(m.ask(ask))?;
        Ok((m.address().clone(), reply))
    }
}

/// A daemon job run on the blocking pool, as a worker.
struct DaemonWorker {
    name: &'static str,
    daemon: Arc<Daemon>,
    job: fn(&Daemon) -> Result<u64>,
}

impl fincrypt_engine::Worker for DaemonWorker {
    fn name(&self) -> &'static str {
        self.name
    }

    fn step(&mut self) -> BoxFuture<'_, Result<Step, String>> {
        let (daemon, job) = (self.daemon.clone(), self.job);
        Box::pin(async move {
            let done = tokio::task::spawn_blocking(move || job(&daemon))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{e:#}"))?;
            Ok(Step::Idle { done })
        })
    }
}

/// `mi_option_purge_delay` in `mimalloc.h` (libmimalloc-sys builds mimalloc
/// v3 unless its `v2` feature is on; the option has this number in both);
/// libmimalloc-sys names no constant for it.
pub(crate) const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The directory to mount on, made absolute, once it is fit for it: a
/// directory, not a mount that lost its daemon, and empty unless
/// `nonempty` (a mount hides what is there until it is unmounted).
pub fn check_mountpoint(path: &Path, nonempty: bool) -> Result<PathBuf> {
    let shown = path.display();
    // A FUSE mount whose daemon died answers ENOTCONN, to stat or to readdir
    // depending on what the kernel still has cached: every step says so.
    let failed = |e: std::io::Error, step: &str| -> anyhow::Error {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            anyhow::anyhow!(
                "{shown} is a FUSE mount whose daemon is gone (killed or crashed): unmount it \
                 with `fusermount3 -u {shown}`, then mount again"
            )
        } else if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("mount point {shown} does not exist: create an empty directory first")
        } else {
            anyhow::Error::new(e).context(format!("{step} mount point {shown}"))
        }
    };
    let meta = std::fs::metadata(path).map_err(|e| failed(e, "checking"))?;
    if !meta.is_dir() {
        bail!("mount point {shown} is not a directory: mount on an empty directory");
    }
    let absolute = path.canonicalize().map_err(|e| failed(e, "resolving"))?;
    let mut entries = std::fs::read_dir(&absolute).map_err(|e| failed(e, "reading"))?;
    if !nonempty {
        let count = entries.try_fold(0usize, |n, e| e.map(|_| n + 1));
        let count = count.map_err(|e| failed(e, "reading"))?;
        if count > 0 {
            bail!(
                "mount point {shown} is not empty ({count} entries): mount on an empty \
                 directory, or pass --nonempty to hide its files while it is mounted"
            );
        }
    } else if let Some(Err(e)) = entries.next() {
        return Err(failed(e, "reading"));
    }
    Ok(absolute)
}

/// The filesystem of an unlocked home, over its volume (through a tiered
/// store that a daemon connects to holders).
pub fn open_fs(
    home: &Home,
    config: &Config,
    keys: fincrypt_blockstore::Keys,
) -> Result<(Arc<Fossil>, Arc<LocalStore>, Arc<TieredStore>)> {
    let volume = Arc::new(home.open_volume(config)?);
    let fs_dir = home.data_dir.join("fs");
    std::fs::create_dir_all(&fs_dir).with_context(|| format!("creating {}", fs_dir.display()))?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let meta = Meta::open(&fs_dir.join("meta.redb"), &keys, uid, gid)
        .context("opening the filesystem metadata")?;
    let tiered = Arc::new(TieredStore::new(volume.clone()));
    let store: Arc<dyn BlockStore> = tiered.clone();
    let fs = Arc::new(Fossil::new(
        meta,
        store,
        keys,
        TreeParams::default(),
        home.volume_dir(),
    )?);
    Ok((fs, volume, tiered))
}

/// Unlocks, mounts and serves until unmounted or told to stop by SIGTERM or SIGINT.
pub fn mount(home: &Home, args: MountArgs, passphrase: &str) -> Result<()> {
    // The daemon frees megabyte buffers on many threads; returning them to the
    // system at once, not after mimalloc's default 10 ms, halves its peak
    // memory while a large file is written (measured: 400 MB -> 240 MB).
    // MIMALLOC_PURGE_DELAY, when set, still wins (for measurements).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    // Unlock before opening anything, so a wrong passphrase changes no file.
    let (_, keys) = secrets::unlock(home, passphrase)?;
    let mut config = Config::load(home)?;
    if !args.listen.is_empty() {
        config.listen = args.listen.iter().map(|a| a.to_string()).collect();
    }
    if !args.bootstrap.is_empty() {
        config.bootstrap = args.bootstrap.iter().map(|a| a.to_string()).collect();
    }
    if let Some(m) = &args.mediator {
        config.mediator = m.to_string();
        config.mediator().context("--mediator")?;
    }
    let mountpoint = match &args.mountpoint {
        Some(m) => Some(
            m.canonicalize()
                .with_context(|| format!("mount point {}", m.display()))?,
        ),
        None => None,
    };
    let keys_for_net = keys.clone();
    let (fs, volume, tiered) = open_fs(home, &config, keys)?;

    let opts = MountOptions {
        allow_other: args.allow_other,
        read_only: args.read_only,
        source: home.data_dir.to_string_lossy().into_owned(),
        // Each FUSE thread holds a 16 MiB request buffer; three keep the daemon well
        // under 256 MiB while one thread can wait on fsync.
        threads: 3,
    };
    // One runtime for the network and every background worker.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("workers")
        .enable_all()
        .build()
        .context("starting the worker runtime")?;
    let snapshots = Arc::new(Mutex::new(()));
    let wants = Arc::new(FsWants::new(
        fs.clone(),
        snapshots.clone(),
        config.redundancy,
    ));
    let watcher = if args.read_only {
        None
    } else {
        let exclude = mountpoint.iter().cloned().collect();
        Some(crate::watch::Watcher::start(
            fs.clone(),
            home,
            &config,
            exclude,
        )?)
    };
    let net = Net::start(&runtime, home, &config, &keys_for_net, &volume, wants)?;
    let session = match &mountpoint {
        None => None,
        Some(mnt) => match fincrypt_fs::fuse::session(fs.clone(), mnt, &opts) {
            Ok(session) => Some(session),
            // The kernel's first request was never read: the mount was taken
            // away (fusermount3 -u, umount) as soon as it appeared, which is an
            // unmount like any other.
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                tracing::info!("unmounted before the first request");
                if let Some(net) = &net {
                    net.shutdown(runtime.handle());
                }
                volume.shutdown()?;
                eprintln!("fincrypt: unmounted {}", mnt.display());
                return Ok(());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("mounting on {}", mnt.display()));
            }
        },
    };
    let manifest = match &net {
        Some(net) => Some(net.engine.manifest().clone()),
        None if !args.read_only && home.manifest_file().exists() => Some(Arc::new(Manifest::open(
            &home.manifest_file(),
            volume.clone(),
        )?)),
        None => None,
    };
    let daemon = Arc::new(Daemon {
        fs: fs.clone(),
        volume: volume.clone(),
        tiered: tiered.clone(),
        config: config.clone(),
        mountpoint: mountpoint.clone(),
        watcher: watcher.clone(),
        config_file: home.config_file().exists().then(|| home.config_file()),
        snapshots,
        net,
        manifest,
        workers: Workers::new(runtime.handle().clone()),
        runtime: runtime.handle().clone(),
        published: Mutex::new(None),
        deleted_heads: std::sync::atomic::AtomicBool::new(false),
        // The newest root is taken to cover the tree as it is at start (a
        // change made before a crash shows at the next change).
        heads: Mutex::new(HeadState {
            root_generation: Some(fs.meta().tree_generation()),
            ..HeadState::default()
        }),
    });
    start_workers(&daemon);
    if let Some(w) = &watcher {
        // A folder no longer watched leaves the live tree after a snapshot
        // keeps its last state.
        let d = Arc::downgrade(&daemon);
        w.set_before_removal(Box::new(move || match d.upgrade() {
            Some(d) => d.snapshot().map(|_| ()),
            None => Ok(()),
        }));
        let handle = daemon.workers.spawn(w.worker(), w.interval());
        w.set_wake(handle);
    }
    if let Some(net) = &daemon.net {
        tiered.connect(Remote {
            handle: runtime.handle().clone(),
            client: net.client.clone(),
            manifest: net.engine.manifest().clone(),
            repair: net.engine.replication_handle(),
        });
    }

    let socket = control::socket_path(&home.data_dir);
    let d = daemon.clone();
    control::serve(&socket, move |req| d.handle(req))?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let served = match (session, &mountpoint) {
        (Some(mut session), Some(mnt)) => {
            let mut unmounter = session.unmount_callable();
            let shown = mnt.display().to_string();
            let mnt = mnt.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if signals.forever().next().is_some() {
                        tracing::info!("signal received: unmounting");
                        if let Err(e) = unmounter.unmount() {
                            tracing::warn!(error = %e, "unmount refused (busy?); detaching lazily");
                            lazy_unmount(&mnt);
                        }
                    }
                })?;
            eprintln!("fincrypt: mounted on {shown}");
            session.run()
        }
        _ => {
            eprintln!(
                "fincrypt: backing up {} watched folder(s); stop with SIGTERM or SIGINT",
                config.watch.len()
            );
            signals.forever().next();
            tracing::info!("signal received: stopping");
            Ok(())
        }
    };
    runtime.block_on(daemon.workers.shutdown());
    if let Some(w) = &watcher {
        w.stop();
    }
    fs.sync_all().context("writing back at unmount")?;
    if let Some(net) = &daemon.net {
        net.shutdown(runtime.handle());
    }
    volume.shutdown()?;
    let _ = std::fs::remove_file(&socket);
    served.context("serving the mount")?;
    match &mountpoint {
        Some(mnt) => eprintln!("fincrypt: unmounted {}", mnt.display()),
        None => eprintln!("fincrypt: stopped"),
    }
    Ok(())
}

/// How often the publish worker looks for changes to write a root for, and
/// for a placed root to publish (at most `publish_interval`).
const PUBLISH_CHECK: Duration = Duration::from_secs(5);

/// Seconds between GC runs when snapshots are not scheduled (they run GC themselves).
const GC_INTERVAL: u64 = 300;

/// Starts every background worker of the mount: snapshots (each prunes and
/// runs GC) or, with snapshots off, GC alone; scrub; and with peers the
/// engine's replication, proofs, liveness and DHT upkeep.
fn start_workers(daemon: &Arc<Daemon>) {
    let c = &daemon.config;
    let job = |name, job| DaemonWorker {
        name,
        daemon: daemon.clone(),
        job,
    };
    if c.snapshot_interval > 0 {
        daemon.workers.spawn(
            job("snapshots", |d| d.snapshot().map(|s| s.freed_blocks)),
            Duration::from_secs(c.snapshot_interval),
        );
    } else {
        daemon
            .workers
            .spawn(job("gc", Daemon::collect), Duration::from_secs(GC_INTERVAL));
    }
    if c.scrub_interval > 0 {
        daemon.workers.spawn(
            job("scrub", |d| {
                let report = d.scrub()?;
                if !report.corrupt.is_empty() || !report.missing.is_empty() {
                    tracing::warn!(
                        corrupt = report.corrupt.len(),
                        missing = report.missing.len(),
                        repaired = report.repaired.len(),
                        "scrub found damaged blocks in the volume"
                    );
                }
                Ok(report.checked)
            }),
            Duration::from_secs(c.scrub_interval),
        );
    }
    if daemon.net.is_some() {
        daemon.workers.spawn(
            job("publish", Daemon::publish_when_placed),
            PUBLISH_CHECK.min(Duration::from_secs(c.publish_interval.max(1))),
        );
    }
    if let Some(net) = &daemon.net {
        net.engine.start(
            &daemon.workers,
            EngineConfig {
                replicate_interval: Duration::from_secs(c.replicate_interval.max(1)),
                proof_interval: (c.proof_interval > 0)
                    .then(|| Duration::from_secs(c.proof_interval)),
                proofs: ProofPolicy {
                    blocks: c.proof_blocks.max(1),
                    failures: c.proof_failures.max(1),
                    timeout: Duration::from_secs(30),
                },
                holder_timeout: Duration::from_secs(c.holder_timeout.max(1)),
                dht_interval: Duration::from_secs(300),
            },
        );
        match &net.mediator {
            // Its mediator chooses the paid holders and pays them.
            Some(m) => m.start(&net.engine, &daemon.workers),
            None => net.market.start(&net.engine, &daemon.workers),
        }
    }
}

fn lazy_unmount(mnt: &Path) {
    let Ok(path) = std::ffi::CString::new(mnt.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a valid C string path; MNT_DETACH only detaches the mount.
    unsafe {
        libc::umount2(path.as_ptr(), libc::MNT_DETACH);
    }
}
