//! `fincrypt recover`: from the recovery phrase alone, the key file, the
//! filesystem metadata, the retained snapshots and the manifest of who
//! holds what, found on the network (docs/ARCHITECTURE.md, "Recovery").
//!
//! Order matters for a retry: everything is fetched and checked before
//! anything is written under the home, metadata and manifest are built in
//! files that a new attempt removes first, and the key file, whose presence
//! makes a home "initialised", is written last.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fincrypt_blockstore::block::{self, BlockKind};
use fincrypt_blockstore::{
    BlockStore, FileRef, KeyFile, Keys, MasterSecret, Pointer, Score, TreeParams, TreeReader,
};
use fincrypt_engine::{Manifest, ManifestRecord, Remote, TieredStore};
use fincrypt_fs::meta::SnapshotRecord;
use fincrypt_fs::snapshot::{self, Restored, RootRecord};
use fincrypt_fs::{Fossil, Meta};
use fincrypt_net::root::Owner;
use fincrypt_net::{Client, Multiaddr, Node, NodeConfig, PeerId};

use crate::config::{Config, Home};

/// What `fincrypt recover` was asked to do.
pub struct RecoverArgs {
    /// Peers to find the owner's root through; the config's when empty.
    pub bootstrap: Vec<Multiaddr>,
    /// Also fetch every data block into the local volume.
    pub all: bool,
}

/// How long recovery waits for a first peer to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a recovery found and rebuilt, for its report.
#[derive(Debug)]
pub struct Recovered {
    pub sequence: u64,
    pub published: u64,
    pub root_time: String,
    pub restored: Restored,
    pub holders: usize,
    pub manifest_entries: usize,
    pub peers_asked: usize,
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    pub missing: u64,
}

/// Recovers `home` (empty) from `phrase`; the new key file is wrapped by `passphrase`.
pub fn recover(home: &Home, phrase: &str, passphrase: &str, args: RecoverArgs) -> Result<()> {
    let secret = MasterSecret::from_phrase(phrase)?;
    if home.is_initialised() {
        bail!(
            "{} already holds a Fincrypt key ({}); refusing to overwrite it",
            home.config_dir.display(),
            home.key_file().display()
        );
    }
    let config = Config::load(home)?;
    let bootstrap = if args.bootstrap.is_empty() {
        config
            .bootstrap
            .iter()
            .map(|a| {
                a.parse::<Multiaddr>()
                    .with_context(|| format!("bootstrap address {a:?}"))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        args.bootstrap.clone()
    };
    if bootstrap.is_empty() {
        crate::secrets::recover(home, phrase, passphrase)?;
        eprintln!(
            "Recovered the key into {}.\n\
             Your files are NOT restored: no peer to find them on was given. They live on the\n\
             peers that held your blocks; run `fincrypt recover --bootstrap /ip4/.../p2p/<PeerId>`\n\
             on an empty home to bring them back.",
            home.key_file().display()
        );
        return Ok(());
    }
    // The key file's Argon2id wrap keeps a core busy for a while, and
    // recovery mostly waits on peers and the disk: it runs beside the rest.
    let (result, wrapped) = std::thread::scope(|scope| {
        let wrapping = scope.spawn(|| KeyFile::wrap(&secret, passphrase));
        let result = fetch_and_rebuild(home, &config, &secret, &bootstrap, args.all);
        let wrapped = match wrapping.join() {
            Ok(w) => w.context("wrapping the key file"),
            Err(_) => Err(anyhow::anyhow!("wrapping the key file panicked")),
        };
        (result, wrapped)
    });
    let recovered = result?;
    // Last: with the key file in place the home counts as initialised.
    crate::secrets::install_key_file(home, &wrapped?)?;
    report(home, &recovered, args.all);
    Ok(())
}

/// Everything but the key file: the network part and the rebuild.
fn fetch_and_rebuild(
    home: &Home,
    config: &Config,
    secret: &MasterSecret,
    bootstrap: &[Multiaddr],
    all: bool,
) -> Result<Recovered> {
    let keys = secret.keys();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("recover")
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    for dir in [&home.config_dir, &home.data_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict(dir, 0o700)?;
    }
    let node = runtime.block_on(Node::start(
        NodeConfig::with_key_file(&home.node_key_file())?,
        None,
    ))?;
    let client = node.client();
    let result = run(home, config, &keys, &runtime, &client, bootstrap, all);
    runtime.block_on(node.shutdown());
    result
}

fn report(home: &Home, r: &Recovered, all: bool) {
    let d = &r.restored;
    println!(
        "Recovered {} from the root of {} (record sequence {}, published at Unix time {}), found among {} peers.",
        home.data_dir.display(),
        r.root_time,
        r.sequence,
        r.published,
        r.peers_asked
    );
    println!(
        "files {}  directories {}  symlinks {}  hard links {}  bytes {}  snapshots {}",
        d.files, d.dirs, d.symlinks, d.hard_links, d.bytes, d.snapshots
    );
    println!(
        "manifest entries {}  holders reached {}  blocks fetched {} ({} bytes)",
        r.manifest_entries, r.holders, r.fetched_blocks, r.fetched_bytes
    );
    if all {
        println!("every data block is in the local volume");
    } else {
        println!("file data is read from holders when first used, and kept locally");
    }
}

/// Dials each bootstrap address; the peers that answered.
fn connect(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    addrs: &[Multiaddr],
) -> Result<Vec<PeerId>> {
    let dials = runtime.block_on(futures::future::join_all(addrs.iter().map(|a| {
        let client = client.clone();
        let a = a.clone();
        async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, client.dial(a.clone())).await {
                Ok(r) => r.map_err(|e| format!("{a}: {e}")),
                Err(_) => Err(format!(
                    "{a}: no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )),
            }
        }
    })));
    let mut peers = Vec::new();
    let mut errors = Vec::new();
    for d in dials {
        match d {
            Ok(p) => peers.push(p),
            Err(e) => errors.push(e),
        }
    }
    if peers.is_empty() {
        bail!(
            "no peer reachable: {} (nothing was written; check the addresses and run recover again)",
            errors.join("; ")
        );
    }
    // Fill the routing table, so lookups reach beyond the bootstrap peers.
    if let Err(e) = runtime.block_on(client.bootstrap()) {
        tracing::debug!(error = %e, "DHT bootstrap failed; asking the bootstrap peers only");
    }
    Ok(peers)
}

/// Connects to the network and finds the owner's newest root record; with
/// it, every peer known (those asked).
fn find_root(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    bootstrap: &[Multiaddr],
    keys: &Keys,
    progress: &Progress,
) -> Result<(
    fincrypt_engine::roots::Found,
    fincrypt_net::root::SignedRoot,
    Vec<PeerId>,
)> {
    let peers = connect(runtime, client, bootstrap)?;
    let owner = Owner::from_seed(&keys.signing).public();
    progress.say("looking for the newest root record");
    let mut known: Vec<PeerId> = peers.clone();
    if let Ok(list) = runtime.block_on(client.peers()) {
        known.extend(
            list.into_iter()
                .filter(|p| p.serves_blocks != Some(false))
                .map(|p| p.peer_id)
                .filter(|p| !peers.contains(p)),
        );
    }
    let mut found = runtime.block_on(fincrypt_engine::roots::find_newest(client, owner, &known));
    let Some(record) = found.newest.take() else {
        bail!(
            "no root found for this phrase among {} peers ({} answered{}): either nothing was \
             published with this phrase, or the peers that keep its root are not reachable from here",
            found.asked,
            found.answered,
            if found.invalid > 0 {
                format!(", {} sent invalid records", found.invalid)
            } else {
                String::new()
            }
        );
    };
    Ok((found, record, known))
}

#[allow(clippy::too_many_arguments)]
fn run(
    home: &Home,
    config: &Config,
    keys: &Keys,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    bootstrap: &[Multiaddr],
    all: bool,
) -> Result<Recovered> {
    let progress = Progress::new();
    progress.say("connecting to peers");
    // The new volume (its 256 shard directories and its index) is made
    // while the network is asked: on a busy disk that takes as long. It is
    // taken away again if the phrase turns out to own no root.
    // An error reading whether it exists counts as existing: never removed.
    let fresh_volume = matches!(home.volume_dir().try_exists(), Ok(false));
    let (found, volume) = std::thread::scope(|scope| {
        let opening = scope.spawn(|| home.open_volume(config));
        let found = find_root(runtime, client, bootstrap, keys, &progress);
        let volume = opening
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("opening the volume panicked")));
        (found, volume)
    });
    let opened = found.and_then(|(found, record, known)| {
        let plain = record
            .open(&keys.root_record_key())
            .context("the newest root record does not open with this phrase's key")?;
        let pointer: Pointer =
            postcard::from_bytes(&plain).context("the root record's pointer does not decode")?;
        Ok((found, record, pointer, known))
    });
    let (found, record, pointer, known) = match opened {
        Ok(f) => f,
        Err(e) => {
            if fresh_volume {
                drop(volume);
                if let Err(e) = std::fs::remove_dir_all(home.volume_dir()) {
                    tracing::debug!(error = %e, "cannot remove the volume made for a recovery that found no root");
                }
            }
            return Err(e);
        }
    };
    let volume = Arc::new(volume?);

    // Start from clean files: an interrupted recovery may have left some.
    let fs_dir = home.data_dir.join("fs");
    for f in [fs_dir.join("meta.redb"), home.manifest_file()] {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", f.display())),
        }
    }
    std::fs::create_dir_all(&fs_dir).with_context(|| format!("creating {}", fs_dir.display()))?;
    let manifest = Arc::new(Manifest::open(&home.manifest_file(), volume.clone())?);
    let tiered = Arc::new(TieredStore::new(volume.clone()));
    tiered.connect(Remote {
        handle: runtime.handle().clone(),
        client: client.clone(),
        manifest: manifest.clone(),
        repair: None,
    });
    // Many blocks come in; one sync at the end (fs.sync_all) makes them durable.
    tiered.write_back_lazily();
    let store: Arc<dyn BlockStore> = tiered.clone();
    let reader = TreeReader::new(store.clone(), 16 << 20);

    progress.say("fetching the root");
    let data = fetch(&tiered, &pointer.score).context("fetching the root block")?;
    let plain = block::open(&pointer, BlockKind::Root, &data).context("opening the root block")?;
    let root = RootRecord::decode(&plain).context("decoding the root block")?;
    let snap = SnapshotRecord {
        time: root.time,
        root: pointer,
    };

    let mut entries = 0;
    if let Some(file) = &root.manifest {
        progress.say("fetching the manifest");
        let record = ManifestRecord::read(&reader, file).context("reading the manifest")?;
        let holders = record.holders()?;
        entries = holders.len();
        for chunk in holders.chunks(4096) {
            manifest.set_many(chunk)?;
        }
    }
    fincrypt_engine::roots::set_sequence(&manifest, record.sequence)?;

    progress.say("fetching directories and pointer blocks");
    let blocks = fetch_trees(&reader, &*store, &snap, &root).map_err(missing_hint)?;

    progress.say("rebuilding the filesystem metadata");
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let meta = Meta::open(&fs_dir.join("meta.redb"), keys, uid, gid)
        .context("creating the filesystem metadata")?;
    let restored = snapshot::restore(&meta, &reader, &snap, &root, &mut |r| {
        progress.set(format!(
            "rebuilding the filesystem metadata: {} directories, {} files",
            r.dirs, r.files
        ))
    })
    .map_err(|e| missing_hint(e.into()))?;

    let fs = Fossil::new(
        meta,
        store.clone(),
        keys.clone(),
        TreeParams::default(),
        home.volume_dir(),
    )?;
    progress.say("asking holders which blocks they keep");
    census(runtime, client, &manifest, &blocks, &known)?;
    let mut missing = 0;
    if all {
        progress.say("fetching every data block");
        missing = fetch_all(&blocks, &tiered, &progress)?;
    }
    progress.say("making it durable");
    fs.sync_all()?;
    drop(fs);
    progress.finish();
    let holders = manifest.holder_peers()?.len();
    let fetched_blocks = tiered.fetched_from_holders();
    let fetched_bytes = volume.stats().own_bytes;
    volume.shutdown()?;
    let unwritten = tiered.restore_failures();
    if unwritten > 0 && all {
        bail!(
            "{unwritten} fetched blocks could not be written to the local volume (the warnings \
             above say why: a full disk?); run recover --all again once that is mended"
        );
    }
    if unwritten > 0 {
        tracing::warn!(
            unwritten,
            "fetched blocks could not be kept in the local volume; the mount fetches them again when it needs them"
        );
    }
    if missing > 0 {
        bail!(
            "{missing} data blocks could not be fetched from any holder; the metadata is rebuilt, \
             but run recover again (on an empty home) once more holders are online"
        );
    }
    Ok(Recovered {
        sequence: record.sequence,
        published: record.time,
        root_time: fincrypt_fs::snapdir::name(root.time),
        restored,
        holders,
        manifest_entries: entries,
        peers_asked: found.asked,
        fetched_blocks,
        fetched_bytes,
        missing,
    })
}

/// A block through the tiered store (holders from the manifest, then the
/// peers nearest its score).
fn fetch(tiered: &TieredStore, score: &Score) -> Result<bytes::Bytes> {
    tiered.get(score).map_err(|e| {
        anyhow::anyhow!(
            "block {score} is on no peer reached ({e}); nothing usable was kept, run recover again once its holders are online"
        )
    })
}

fn missing_hint(e: anyhow::Error) -> anyhow::Error {
    e.context("a metadata block could not be fetched from any peer reached; nothing usable was kept, run recover again once more holders are online")
}

/// One piece of [`fetch_trees`]' work.
enum Job {
    /// A retained snapshot's root block: its manifest record and tree follow.
    Root(Pointer),
    /// A directory's stream: its entries follow.
    Dir(snapshot::SnapEntry),
    /// A file's tree of more than one block: its pointer blocks are read.
    File(FileRef),
}

/// Fetches into the volume every directory stream and pointer block of the
/// tree of `root` and of the snapshots it retained (with their root blocks
/// and manifest records), many at once and each as soon as its parent is
/// read, so the rebuild and the mount find them locally. Returns every
/// block score of those trees, data blocks included, each once: what the
/// census asks about and `--all` fetches.
fn fetch_trees(
    reader: &TreeReader<Arc<dyn BlockStore>>,
    store: &dyn BlockStore,
    snap: &SnapshotRecord,
    root: &RootRecord,
) -> Result<Vec<Score>> {
    let found = std::sync::Mutex::new((std::collections::HashSet::new(), Vec::new()));
    // True if `s` was not found before.
    let add = |s: Score| {
        let mut f = found.lock().unwrap_or_else(|p| p.into_inner());
        let new = f.0.insert(s);
        if new {
            f.1.push(s);
        }
        new
    };
    // A tree's job is queued once, by the score of its top block.
    let fresh = |f: &FileRef| f.root().is_none_or(|p| add(p.score));
    let add_all = |f: &FileRef| -> Result<()> {
        reader.visit_scores(f, &mut |p| {
            add(p.score);
        })?;
        Ok(())
    };
    add(snap.root.score);
    if let Some(m) = &root.manifest {
        add_all(m).context("reading the manifest record's pointer blocks")?;
    }
    let mut first = Vec::new();
    if fresh(&root.tree.content) {
        first.push(Job::Dir(root.tree.clone()));
    }
    for s in &root.snapshots {
        if add(s.root.score) {
            first.push(Job::Root(s.root));
        }
    }
    work_queue(first, |job| {
        let mut next = Vec::new();
        match job {
            Job::Root(pointer) => {
                let r = read_root(store, &pointer)?;
                if let Some(m) = &r.manifest {
                    add_all(m).context("reading a snapshot's manifest record")?;
                }
                if fresh(&r.tree.content) {
                    next.push(Job::Dir(r.tree));
                }
            }
            Job::Dir(dir) => {
                add_all(&dir.content)?;
                for e in snapshot::read_dir_with(reader, &dir).context("fetching a directory")? {
                    if e.kind == fincrypt_fs::meta::Kind::Dir {
                        if fresh(&e.content) {
                            next.push(Job::Dir(e));
                        }
                    } else if let Some(p) = e.content.root()
                        && add(p.score)
                        && p.depth > 0
                    {
                        next.push(Job::File(e.content));
                    }
                }
            }
            Job::File(content) => add_all(&content).context("fetching a file's pointer blocks")?,
        }
        Ok(next)
    })?;
    Ok(found.into_inner().unwrap_or_else(|p| p.into_inner()).1)
}

/// A root block fetched and decoded.
fn read_root(store: &dyn BlockStore, pointer: &Pointer) -> Result<RootRecord> {
    let data = store
        .get(&pointer.score)
        .context("fetching a snapshot's root block")?;
    let plain = block::open(pointer, BlockKind::Root, &data).context("opening a root block")?;
    RootRecord::decode(&plain).context("decoding a root block")
}

/// Runs `f` on every job, and on the jobs each one returns, [`FETCH_THREADS`]
/// at a time; the first error ends it.
fn work_queue<T: Send>(first: Vec<T>, f: impl Fn(T) -> Result<Vec<T>> + Sync) -> Result<()> {
    struct State<T> {
        jobs: Vec<T>,
        running: usize,
        failed: Option<anyhow::Error>,
    }
    let state = std::sync::Mutex::new(State {
        jobs: first,
        running: 0,
        failed: None,
    });
    let changed = std::sync::Condvar::new();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    std::thread::scope(|scope| {
        for _ in 0..FETCH_THREADS {
            scope.spawn(|| {
                loop {
                    let job = {
                        let mut st = lock();
                        loop {
                            if st.failed.is_some() {
                                return;
                            }
                            if let Some(job) = st.jobs.pop() {
                                st.running += 1;
                                break job;
                            }
                            if st.running == 0 {
                                return;
                            }
                            st = changed.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    // A panic is an error here: the others must not wait on
                    // a job that will never be done.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(job)))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a fetching thread panicked")));
                    let mut st = lock();
                    st.running -= 1;
                    match result {
                        Ok(more) => st.jobs.extend(more),
                        Err(e) => {
                            st.failed.get_or_insert(e);
                        }
                    }
                    changed.notify_all();
                }
            });
        }
    });
    match state.into_inner().unwrap_or_else(|p| p.into_inner()).failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Records who holds the blocks of the recovered trees (`scores`) that the
/// manifest record could not list (the root, the record's own blocks,
/// directories, and data placed after the record was written): `Has` of
/// every peer known, in batches of scores, so the mount does not put them
/// again.
fn census(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    manifest: &Manifest,
    scores: &[Score],
    peers: &[PeerId],
) -> Result<()> {
    let known = manifest.holders_of(scores.iter().copied())?;
    let unlisted: Vec<Score> = scores
        .iter()
        .zip(known)
        .filter(|(_, h)| h.is_empty())
        .map(|(s, _)| *s)
        .collect();
    if unlisted.is_empty() {
        return Ok(());
    }
    let mut holders: std::collections::HashMap<Score, Vec<PeerId>> = Default::default();
    for chunk in unlisted.chunks(fincrypt_net::proto::MAX_SCORES) {
        let answers =
            runtime.block_on(futures::future::join_all(peers.iter().map(|&peer| {
                let client = client.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(30), client.has(peer, chunk)).await
                }
            })));
        for (peer, answer) in peers.iter().zip(answers) {
            match answer {
                Ok(Ok(flags)) => {
                    for (s, held) in chunk.iter().zip(flags) {
                        if held {
                            holders.entry(*s).or_default().push(*peer);
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "a peer did not say what it holds")
                }
                Err(_) => tracing::debug!(%peer, "a peer did not say what it holds in time"),
            }
        }
    }
    let entries: Vec<(Score, Vec<PeerId>)> = holders.into_iter().collect();
    for chunk in entries.chunks(4096) {
        manifest.set_many(chunk)?;
    }
    Ok(())
}

/// Fetches every block of the recovered trees (`scores`) into the volume;
/// the number that no peer gave.
fn fetch_all(scores: &[Score], tiered: &TieredStore, progress: &Progress) -> Result<u64> {
    let total = scores.len();
    let missing = std::sync::atomic::AtomicU64::new(0);
    // Several blocks in flight: one at a time, a round trip and a write
    // each, the network and the disk would mostly wait.
    in_parallel(scores, |i, s| {
        if !tiered.local().has(s).context("reading the local volume")? && tiered.get(s).is_err() {
            missing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(score = %s, "no peer gave this block");
        }
        if i.is_multiple_of(64) || i + 1 == total {
            progress.set(format!("fetching data: {} of {total} blocks", i + 1));
        }
        Ok(())
    })?;
    Ok(missing.into_inner())
}

/// Runs `f` on every item, [`FETCH_THREADS`] at a time; the first error.
fn in_parallel<T: Sync>(items: &[T], f: impl Fn(usize, &T) -> Result<()> + Sync) -> Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..FETCH_THREADS.min(items.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if let Err(e) = f(i, item) {
                        failed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Blocks `--all` fetches at once.
const FETCH_THREADS: usize = 8;

/// A spinner with a message at a terminal; nothing otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// When recovery started and the step before this one ended, for the log.
    start: std::time::Instant,
    step: std::sync::Mutex<(String, std::time::Instant)>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let now = std::time::Instant::now();
        Progress {
            bar,
            start: now,
            step: std::sync::Mutex::new((String::new(), now)),
        }
    }

    /// A new step; the one before is logged with how long it took.
    fn say(&self, what: &str) {
        self.done_with_step();
        *self.step.lock().unwrap_or_else(|p| p.into_inner()) =
            (what.to_owned(), std::time::Instant::now());
        self.set(what.to_owned());
    }

    fn done_with_step(&self) {
        let (name, since) = self.step.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !name.is_empty() {
            tracing::info!(
                step = %name,
                ms = since.elapsed().as_millis() as u64,
                total_ms = self.start.elapsed().as_millis() as u64,
                "recovery step done"
            );
        }
    }

    fn set(&self, what: String) {
        if let Some(b) = &self.bar {
            b.set_message(what);
        }
    }

    fn finish(&self) {
        self.done_with_step();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions of {}", path.display()))
}
