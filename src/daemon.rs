//! `fincrypt mount`: the daemon that serves the filesystem, its control
//! socket and its background snapshots.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fincrypt_blockstore::{BlockStore, FileRef, LocalStore, Score, TreeParams};
use fincrypt_fs::fuse::MountOptions;
use fincrypt_fs::{Fossil, Meta, snapshot};
use fincrypt_net::{Client, Holder, Multiaddr, Node, NodeConfig, PeerId};
use serde_json::json;

use crate::config::{Config, Home};
use crate::control::{self, Request};
use crate::manifest::{Manifest, ManifestRecord};
use crate::replicate::{self, ReplicationStats, Replicator};
use crate::secrets;
use crate::tiered::{Remote, TieredStore};

/// What `fincrypt mount` was asked to do.
pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    /// Peer addresses to listen on; they replace the config's when given.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through; they replace the config's when given.
    pub bootstrap: Vec<Multiaddr>,
}

/// The mount's peer node, when it has one.
struct Net {
    runtime: tokio::runtime::Runtime,
    node: Mutex<Option<Node>>,
    client: Client,
    listen_addrs: Vec<Multiaddr>,
    replicator: Replicator,
}

/// How long a status waits for the node's list of peers.
const PEERS_TIMEOUT: Duration = Duration::from_secs(5);

impl Net {
    /// Starts a node when `config` names addresses to listen on or join through.
    fn start(home: &Home, config: &Config, volume: &Arc<LocalStore>) -> Result<Option<Net>> {
        let parse = |list: &[String], what: &str| -> Result<Vec<Multiaddr>> {
            list.iter()
                .map(|a| {
                    a.parse::<Multiaddr>()
                        .with_context(|| format!("{what} address {a:?} is not a multiaddr"))
                })
                .collect()
        };
        let listen = parse(&config.listen, "listen")?;
        let bootstrap = parse(&config.bootstrap, "bootstrap")?;
        if listen.is_empty() && bootstrap.is_empty() {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("net")
            .enable_all()
            .build()
            .context("starting the network runtime")?;
        let holder = if config.holder_capacity > 0 {
            let h = Holder::open(
                volume.clone(),
                &home.placements_file(),
                config.holder_capacity,
            )?;
            Some(Arc::new(h) as Arc<dyn fincrypt_net::Handler>)
        } else {
            None
        };
        let mut node_config = NodeConfig::with_key_file(&home.node_key_file())?;
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
        let manifest = Arc::new(Manifest::open(&home.manifest_file())?);
        Ok(Some(Net {
            runtime,
            node: Mutex::new(Some(node)),
            client: client.clone(),
            listen_addrs,
            replicator: Replicator {
                client,
                manifest,
                stats: Arc::new(ReplicationStats::default()),
                running: tokio::sync::Mutex::new(()),
                failures: Mutex::new(Default::default()),
                banned: Mutex::new(Default::default()),
                cursor: Default::default(),
            },
        }))
    }

    fn connected_peers(&self) -> usize {
        let peers = self
            .runtime
            .block_on(async { tokio::time::timeout(PEERS_TIMEOUT, self.client.peers()).await });
        match peers {
            Ok(Ok(list)) => list.iter().filter(|p| p.connected).count(),
            _ => 0,
        }
    }

    fn shutdown(&self) {
        let node = self.node.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(node) = node {
            self.runtime.block_on(node.shutdown());
        }
    }
}

/// The pieces a running mount shares between threads.
struct Daemon {
    fs: Arc<Fossil>,
    volume: Arc<LocalStore>,
    config: Config,
    mountpoint: PathBuf,
    /// Serialises snapshots, pruning and GC.
    snapshots: Mutex<()>,
    /// The peer node, if peers are configured.
    net: Option<Net>,
}

impl Daemon {
    /// Frees blocks that neither live files nor retained snapshots use.
    fn collect(&self) -> Result<u64> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        Ok(snapshot::gc(&self.fs, &self.volume)?)
    }

    fn snapshot(&self) -> Result<serde_json::Value> {
        let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let manifest = match &self.net {
            Some(net) => Some(self.write_manifest(&net.replicator.manifest)?),
            None => None,
        };
        let snap = snapshot::create_with_manifest(&self.fs, manifest)?;
        snapshot::prune(&self.fs, self.config.snapshot_keep.max(1))?;
        let freed = snapshot::gc(&self.fs, &self.volume)?;
        Ok(json!({ "time": fincrypt_fs::snapdir::name(snap.time), "freed_blocks": freed }))
    }

    /// Stores the manifest as blocks for the next root (docs/FORMATS.md,
    /// "Owner's manifest"); unchanged, it is the same blocks as last time.
    fn write_manifest(&self, manifest: &Manifest) -> Result<FileRef> {
        let (keys, params) = self.fs.keys();
        manifest.record()?.write(self.fs.store(), keys, params)
    }

    /// The manifest the newest root names, with the holders the working
    /// index knows now of the manifest's own blocks.
    fn manifest_json(&self) -> Result<serde_json::Value> {
        let Some(snap) = self.fs.meta().snapshots()?.pop() else {
            bail!("no snapshot yet: run `fincryptctl sync` first");
        };
        let root = snapshot::root(&self.fs, &snap)?;
        let Some(file) = root.manifest else {
            return Ok(json!({
                "root": snap.root.score.to_hex(),
                "time": fincrypt_fs::snapdir::name(snap.time),
                "manifest": null,
            }));
        };
        let record = ManifestRecord::read(self.fs.reader(), &file)?;
        let mut blocks = Vec::new();
        self.fs
            .reader()
            .visit_scores(&file, &mut |p| blocks.push(p.score))?;
        let now = match &self.net {
            Some(net) => net.replicator.manifest.holders_of(blocks.iter().copied())?,
            None => vec![Vec::new(); blocks.len()],
        };
        let entry = |score: &Score, holders: &[PeerId]| {
            json!({
                "score": score.to_hex(),
                "holders": holders.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            })
        };
        Ok(json!({
            "root": snap.root.score.to_hex(),
            "time": fincrypt_fs::snapdir::name(snap.time),
            "manifest": {
                "version": record.version,
                "bytes": file.len(),
                "blocks": blocks.iter().zip(&now).map(|(s, h)| entry(s, h)).collect::<Vec<_>>(),
                "entries": record.holders()?.iter().map(|(s, h)| entry(s, h)).collect::<Vec<_>>(),
            },
        }))
    }

    /// One replication pass; returns the own blocks still short of copies.
    fn replicate(&self) -> Result<u64> {
        let Some(net) = &self.net else {
            bail!(
                "this mount has no peers: give --listen or --bootstrap (or set them in the config)"
            );
        };
        let wanted = {
            let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            replicate::wanted(&self.fs, self.config.redundancy)?
        };
        let local: Arc<dyn BlockStore> = self.volume.clone();
        net.runtime.block_on(net.replicator.pass(wanted, local))
    }

    /// One round of storage proofs; when it drops a holder, a replication
    /// pass follows at once to place its blocks elsewhere.
    fn prove(&self) -> Result<()> {
        let Some(net) = &self.net else { return Ok(()) };
        let wanted = {
            let _one = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            replicate::wanted(&self.fs, self.config.redundancy)?
        };
        let policy = replicate::ProofPolicy {
            blocks: self.config.proof_blocks.max(1),
            failures: self.config.proof_failures.max(1),
            timeout: Duration::from_secs(30),
        };
        let dropped = net
            .runtime
            .block_on(net.replicator.challenge_round(&wanted, policy))?;
        if dropped > 0 {
            self.replicate()?;
        }
        Ok(())
    }

    /// Replication passes until nothing is short of copies or `timeout` passes.
    fn replicate_until(&self, timeout: Duration) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let under = self.replicate()?;
            if under == 0 || Instant::now() >= deadline {
                return Ok(self.replication_json(under));
            }
            // Peers may still be connecting or identifying themselves: retry.
            std::thread::sleep(Duration::from_millis(500).min(deadline - Instant::now()));
        }
    }

    fn replication_json(&self, under: u64) -> serde_json::Value {
        let (reason, tracked, copies, levels) = match &self.net {
            Some(net) => {
                let s = &net.replicator.stats;
                (
                    s.reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    s.tracked_blocks.load(Ordering::Relaxed),
                    s.placed_copies.load(Ordering::Relaxed),
                    s.by_redundancy
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .map(|(n, count)| (n.to_string(), json!(count)))
                        .collect::<serde_json::Map<_, _>>(),
                )
            }
            None => (String::new(), 0, 0, Default::default()),
        };
        json!({
            "blocks_by_redundancy": levels,
            "under_replicated": under,
            "replicated_blocks": tracked,
            "placed_copies": copies,
            "replication_note": reason,
        })
    }

    fn handle(&self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Replicate { timeout_secs } => {
                self.replicate_until(Duration::from_secs(timeout_secs))
            }
            Request::Status => {
                let s = self.volume.stats();
                let (listen, peers, under, passes, note, proofs) = match &self.net {
                    Some(net) => {
                        let st = &net.replicator.stats;
                        (
                            net.listen_addrs
                                .iter()
                                .map(|a| a.to_string())
                                .collect::<Vec<_>>(),
                            net.connected_peers(),
                            st.under_replicated.load(Ordering::Relaxed),
                            st.passes.load(Ordering::Relaxed),
                            st.reason.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                            [
                                st.proofs_passed.load(Ordering::Relaxed),
                                st.proofs_failed.load(Ordering::Relaxed),
                                st.holders_dropped.load(Ordering::Relaxed),
                            ],
                        )
                    }
                    None => (
                        Vec::new(),
                        0,
                        0,
                        0,
                        "no peers configured: blocks are kept locally only".to_owned(),
                        [0; 3],
                    ),
                };
                Ok(json!({
                    "mountpoint": self.mountpoint,
                    "own_blocks": s.own_blocks,
                    "own_bytes": s.own_bytes,
                    "held_blocks": s.held_blocks,
                    "held_bytes": s.held_bytes,
                    "cached_blocks": s.cached_blocks,
                    "cached_bytes": s.cached_bytes,
                    "unsealed_bytes": self.fs.dirty_bytes(),
                    "snapshots": self.fs.meta().snapshots()?.len(),
                    "listen_addrs": listen,
                    "peers": peers,
                    "under_replicated": under,
                    "replication_passes": passes,
                    "replication_note": note,
                    "proofs_passed": proofs[0],
                    "proofs_failed": proofs[1],
                    "holders_dropped": proofs[2],
                    "default_redundancy": self.config.redundancy,
                }))
            }
            Request::Sync | Request::SnapshotsCreate => self.snapshot(),
            Request::Manifest => self.manifest_json(),
            Request::SnapshotsList => {
                let list: Vec<_> = self
                    .fs
                    .meta()
                    .snapshots()?
                    .iter()
                    .map(|s| json!({ "name": fincrypt_fs::snapdir::name(s.time), "root": s.root.score.to_hex() }))
                    .collect();
                Ok(json!(list))
            }
        }
    }
}

/// `mi_option_purge_delay` in `mimalloc.h` (libmimalloc-sys builds mimalloc
/// v3 unless its `v2` feature is on; the option has this number in both);
/// libmimalloc-sys names no constant for it.
pub(crate) const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

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
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    let volume = Arc::new(home.open_volume(&config)?);
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

    let opts = MountOptions {
        allow_other: args.allow_other,
        // Each FUSE thread holds a 16 MiB request buffer; three keep the daemon well
        // under 256 MiB while one thread can wait on fsync.
        threads: 3,
    };
    let net = Net::start(home, &config, &volume)?;
    if let Some(net) = &net {
        tiered.connect(Remote {
            handle: net.runtime.handle().clone(),
            client: net.client.clone(),
            manifest: net.replicator.manifest.clone(),
        });
    }
    let mut session = fincrypt_fs::fuse::session(fs.clone(), &mountpoint, &opts)
        .with_context(|| format!("mounting on {}", mountpoint.display()))?;
    let daemon = Arc::new(Daemon {
        fs: fs.clone(),
        volume: volume.clone(),
        config: config.clone(),
        mountpoint: mountpoint.clone(),
        snapshots: Mutex::new(()),
        net,
    });

    let socket = control::socket_path(&home.data_dir);
    let d = daemon.clone();
    control::serve(&socket, move |req| d.handle(req))?;

    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    spawn_snapshot_worker(daemon.clone(), stop.clone());
    if daemon.net.is_some() {
        let every = Duration::from_secs(daemon.config.replicate_interval.max(1));
        spawn_worker("replication", every, daemon.clone(), stop.clone(), |d| {
            d.replicate().map(|_| ())
        });
        if daemon.config.proof_interval > 0 {
            let every = Duration::from_secs(daemon.config.proof_interval);
            spawn_worker("proofs", every, daemon.clone(), stop.clone(), |d| d.prove());
        }
    }

    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    let mnt = mountpoint.clone();
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

    eprintln!("fincrypt: mounted on {}", mountpoint.display());
    let served = session.run();
    *stop.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    stop.1.notify_all();
    fs.sync_all().context("writing back at unmount")?;
    if let Some(net) = &daemon.net {
        net.shutdown();
    }
    volume.shutdown()?;
    let _ = std::fs::remove_file(&socket);
    served.context("serving the mount")?;
    eprintln!("fincrypt: unmounted {}", mountpoint.display());
    Ok(())
}

/// Seconds between GC runs when snapshots are not scheduled (they run GC themselves).
const GC_INTERVAL: u64 = 300;

/// Takes snapshots every `snapshot_interval` seconds (each prunes and runs GC),
/// or, with snapshots off, runs GC every [`GC_INTERVAL`] seconds so deleted
/// data is still freed.
fn spawn_snapshot_worker(daemon: Arc<Daemon>, stop: Arc<(Mutex<bool>, Condvar)>) {
    let snapshots = daemon.config.snapshot_interval;
    let interval = if snapshots > 0 {
        snapshots
    } else {
        GC_INTERVAL
    };
    let _ = std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || {
            let (lock, cvar) = &*stop;
            let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let (guard, timeout) = cvar
                    .wait_timeout(stopped, Duration::from_secs(interval))
                    .unwrap_or_else(|p| p.into_inner());
                stopped = guard;
                if *stopped {
                    return;
                }
                if timeout.timed_out() {
                    drop(stopped);
                    let done = if snapshots > 0 {
                        daemon.snapshot().map(|_| ())
                    } else {
                        daemon.collect().map(|_| ())
                    };
                    if let Err(e) = done {
                        tracing::warn!(error = %e, "scheduled snapshot or GC failed");
                    }
                    stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
            }
        });
}

/// Runs `work` every `interval` until stopped; failures are logged.
fn spawn_worker(
    name: &'static str,
    interval: Duration,
    daemon: Arc<Daemon>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    work: fn(&Daemon) -> Result<()>,
) {
    let _ = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let (lock, cvar) = &*stop;
            let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let (guard, _) = cvar
                    .wait_timeout(stopped, interval)
                    .unwrap_or_else(|p| p.into_inner());
                stopped = guard;
                if *stopped {
                    return;
                }
                drop(stopped);
                if let Err(e) = work(&daemon) {
                    tracing::warn!(worker = name, error = %e, "background work failed");
                }
                stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
            }
        });
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
