//! Watched folders: directories outside the mount kept backed up, on every
//! change, into `backups/NAME` of the filesystem.
//!
//! The config's `watch` list names them (`fincrypt watch` and `unwatch`
//! edit it, keeping the user's comments). A running daemon (a mount, or
//! `fincrypt backup` without one) has one `watch` worker: inotify events
//! (one non-recursive watch per directory) mark the directory they happened
//! in, and once it has been quiet for `watch_settle` seconds the worker
//! copies that directory's subtree with [`fincrypt_fs::import::sync_subdir`].
//! Stamps (inode, size, mtime, ctime) of every file imported are kept in
//! `DATA/watch.redb`, so a restart or a rescan reads no unchanged file. When
//! inotify cannot follow a folder (its watches run out, or events are
//! lost), the folder is rescanned every `watch_rescan` seconds instead, and
//! `fincryptctl watch status` says so; a full rescan also runs once a day.
//! The copies are read-only in the mount (only this worker changes them)
//! and are part of every snapshot and root like any other file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fincrypt_engine::{Step, Worker, WorkerHandle};
use fincrypt_fs::import::{Stamp, Stamps, SyncOptions, SyncReport, remove_tree, sync_subdir};
use fincrypt_fs::{Caller, Fossil, FsError, Kind};
use futures::future::BoxFuture;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::config::{Config, Home, WatchEntry, bad_watch_name};
use crate::control::{WatchProblem, WatchView};

/// A kept stamp: inode, size, mtime and ctime in nanoseconds.
type StampRow = (u64, u64, i64, i64);
/// (folder name, path relative to the folder) -> its stamp.
const STAMPS: TableDefinition<(&str, &[u8]), StampRow> = TableDefinition::new("stamps");

/// Folders unwatched while no daemon ran, whose copies leave the live
/// tree at the next start: name -> unix time of the unwatch.
const FORGET: TableDefinition<&str, u64> = TableDefinition::new("forget");
/// Folder name -> Unix seconds of the last full scan that listed every
/// directory's copy, its stamp notwithstanding (once a day).
const LISTED_ALL: TableDefinition<&str, u64> = TableDefinition::new("listed_all");

/// The watch database of a home.
fn db_path(home: &Home) -> PathBuf {
    home.data_dir.join("watch.redb")
}

/// Notes that folder `name` was unwatched while no daemon ran: its copy
/// leaves the live tree when one next starts. (A copy with no entry in
/// the config and no such note, as on a recovered home, stays.)
pub fn forget_later(home: &Home, name: &str) -> Result<()> {
    let path = db_path(home);
    let db =
        redb::Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(FORGET)?;
        t.insert(name, unix_now())?;
    }
    txn.commit()?;
    Ok(())
}

/// A full rescan of a folder that inotify follows, as a safety net.
const FULL_RESCAN: Duration = Duration::from_secs(24 * 3600);
/// Problems kept per folder for status.
const PROBLEMS_SHOWN: usize = 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------
// The config's list.

/// Adds a watched folder to `config.toml` (made from the commented default
/// if there is none); the folder must exist and be a directory outside the
/// home. Its name defaults to the folder's own.
pub fn add_to_config(
    home: &Home,
    path: &Path,
    name: Option<&str>,
    redundancy: Option<u8>,
) -> Result<WatchEntry> {
    let path = path
        .canonicalize()
        .with_context(|| format!("cannot watch {}", path.display()))?;
    if !path.is_dir() {
        bail!(
            "{} is not a directory: a watched folder is one",
            path.display()
        );
    }
    for own in [&home.config_dir, &home.data_dir] {
        let own = own.canonicalize().unwrap_or_else(|_| own.clone());
        if path.starts_with(&own) {
            bail!(
                "{} is inside Fincrypt's own home {}: it cannot be backed up into itself",
                path.display(),
                own.display()
            );
        }
    }
    let name = match name {
        Some(n) => n.to_owned(),
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the root directory has no name of its own: pass --name")?,
    };
    if let Some(why) = bad_watch_name(&name) {
        bail!("{name:?} cannot name a watched folder: {why}");
    }
    if redundancy == Some(0) {
        bail!("a redundancy of 0 keeps no copy on peers: at least 1");
    }
    let config = Config::load(home)?;
    if let Some(w) = config.watch.iter().find(|w| w.name == name) {
        bail!(
            "a watched folder is already named {name:?} ({}): pass another --name",
            w.path.display()
        );
    }
    if let Some(w) = config.watch.iter().find(|w| w.path == path) {
        bail!("{} is already watched, as {:?}", path.display(), w.name);
    }
    let text = path.to_str().with_context(|| {
        format!(
            "{} is not UTF-8: config.toml cannot name it",
            path.display()
        )
    })?;
    let mut doc = config_doc(home)?;
    let list = doc
        .entry("watch")
        .or_insert(toml_edit::Item::ArrayOfTables(
            toml_edit::ArrayOfTables::new(),
        ))
        .as_array_of_tables_mut()
        .context("`watch` in config.toml is not a list of [[watch]] tables")?;
    let mut t = toml_edit::Table::new();
    t["path"] = toml_edit::value(text);
    t["name"] = toml_edit::value(name.as_str());
    if let Some(r) = redundancy {
        t["redundancy"] = toml_edit::value(i64::from(r));
    }
    list.push(t);
    write_config(home, &doc)?;
    Ok(WatchEntry {
        path,
        name,
        redundancy,
    })
}

/// Takes the folder named `name` out of `config.toml`.
pub fn remove_from_config(home: &Home, name: &str) -> Result<WatchEntry> {
    let config = Config::load(home)?;
    let Some(entry) = config.watch.iter().find(|w| w.name == name).cloned() else {
        let names: Vec<&str> = config.watch.iter().map(|w| w.name.as_str()).collect();
        if names.is_empty() {
            bail!("no folder is watched");
        }
        bail!(
            "no watched folder is named {name:?}; they are: {}",
            names.join(", ")
        );
    };
    let mut doc = config_doc(home)?;
    if let Some(list) = doc
        .get_mut("watch")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
    {
        list.retain(|t| t.get("name").and_then(toml_edit::Item::as_str) != Some(name));
        if list.is_empty() {
            doc.remove("watch");
        }
    }
    write_config(home, &doc)?;
    Ok(entry)
}

fn config_doc(home: &Home) -> Result<toml_edit::DocumentMut> {
    let file = home.config_file();
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default_file(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    text.parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))
}

/// Replaces `config.toml` at once (a reader never sees half of it).
fn write_config(home: &Home, doc: &toml_edit::DocumentMut) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let file = home.config_file();
    let tmp = file.with_extension("toml.new");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(doc.to_string().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file).with_context(|| format!("replacing {}", file.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------
// The daemon's side.

/// What drives a folder's backups.
#[derive(Clone, Debug, PartialEq)]
enum Driver {
    Inotify,
    /// Periodic rescans, and why.
    Rescans(String),
}

/// One watched folder, as the worker follows it.
struct Folder {
    entry: WatchEntry,
    /// None while a sync has them.
    stamps: Option<Stamps>,
    /// Directories (relative) with changes, and when each last changed.
    pending: HashMap<PathBuf, Instant>,
    /// Directories being backed up now (a full scan counts one).
    working: u64,
    /// When the next full scan is due.
    full_at: Instant,
    driver: Driver,
    /// Directories (absolute) with an inotify watch.
    watched: BTreeSet<PathBuf>,
    last_seen: Option<u64>,
    last_backed_up: Option<u64>,
    files: u64,
    bytes: u64,
    scans: u64,
    scans_failed: u64,
    /// Whether the last full scan failed.
    last_scan_failed: bool,
    /// Unix seconds of the last full scan that listed every directory's
    /// copy (kept in watch.redb).
    listed_all: u64,
    /// How long the last full scan took, until its copies were durable.
    last_scan: Option<Duration>,
    /// Rescans asked for (`fincryptctl watch rescan`), and the last of them
    /// that a full scan ended after.
    asked: u64,
    answered: u64,
    bytes_read: u64,
    errors: BTreeMap<PathBuf, String>,
    skipped: BTreeMap<PathBuf, String>,
}

impl Folder {
    fn new(entry: WatchEntry, stamps: Stamps, driver: Driver) -> Folder {
        let (files, bytes) = stamps.totals();
        Folder {
            entry,
            stamps: Some(stamps),
            pending: HashMap::new(),
            working: 0,
            full_at: Instant::now(),
            driver,
            watched: BTreeSet::new(),
            last_seen: None,
            last_backed_up: None,
            files,
            bytes,
            scans: 0,
            scans_failed: 0,
            last_scan_failed: false,
            listed_all: 0,
            last_scan: None,
            asked: 0,
            answered: 0,
            bytes_read: 0,
            errors: BTreeMap::new(),
            skipped: BTreeMap::new(),
        }
    }
}

/// Work the worker took for one folder.
enum Job {
    /// A full scan, answering the rescans asked up to this one (see
    /// [`Watcher::rescan_now`]).
    /// `list_all`: every directory's copy listed, whatever its stamp.
    Full {
        asked: u64,
        list_all: bool,
    },
    Dirs(Vec<PathBuf>),
}

/// The watched folders of a running daemon.
pub struct Watcher {
    fs: Arc<Fossil>,
    home: Home,
    db: redb::Database,
    settle: Duration,
    rescan: Duration,
    /// Never backed up, wherever they are: the home and the mount.
    exclude: Vec<PathBuf>,
    owner: Caller,
    folders: Mutex<BTreeMap<String, Folder>>,
    /// Events as inotify gave them, with when, until the worker takes them.
    /// (The handler takes no other lock: the worker adds watches, which
    /// waits on the thread that runs the handler.)
    events: Mutex<Vec<(Instant, u64, notify::Result<notify::Event>)>>,
    /// None when inotify could not be started (every folder is rescanned).
    notifier: Mutex<Option<notify::INotifyWatcher>>,
    no_inotify: Option<String>,
    wake: OnceLock<WorkerHandle>,
    /// Called before a folder that is no longer watched leaves the live
    /// tree, so that a snapshot keeps its last state.
    before_removal: OnceLock<Box<dyn Fn() -> Result<()> + Send + Sync>>,
    /// Serialises [`Watcher::work`] (the worker) with reloads.
    working: Mutex<()>,
    /// Set when the daemon stops: a sync under way ends at once.
    stopping: std::sync::atomic::AtomicBool,
    /// Copies to remove found at start, removed at the first step (once
    /// the daemon can take a snapshot before a copy leaves the tree).
    initial: Mutex<Option<Vec<String>>>,
}

impl Watcher {
    /// The watcher of a daemon over `fs`, for the folders of `config`.
    /// `exclude` lists paths never backed up (the mount point).
    pub fn start(
        fs: Arc<Fossil>,
        home: &Home,
        config: &Config,
        exclude: Vec<PathBuf>,
    ) -> Result<Arc<Watcher>> {
        let path = db_path(home);
        let db =
            redb::Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut exclude = exclude;
        for own in [&home.config_dir, &home.data_dir] {
            exclude.push(own.canonicalize().unwrap_or_else(|_| own.clone()));
        }
        // SAFETY: getuid/getgid cannot fail.
        let owner = unsafe {
            Caller {
                uid: libc::getuid(),
                gid: libc::getgid(),
            }
        };
        let w = Arc::new_cyclic(|weak: &Weak<Watcher>| {
            let events = weak.clone();
            let handler = move |ev: notify::Result<notify::Event>| {
                if let Some(w) = events.upgrade() {
                    lock(&w.events).push((Instant::now(), unix_now(), ev));
                    w.wake();
                }
            };
            let (notifier, no_inotify) = match notify::Watcher::new(
                handler,
                // No open or close-without-write events: the watcher's own
                // reads (every directory a scan lists, every file a backup
                // reads) would each wake it for nothing.
                notify::Config::default()
                    .with_follow_symlinks(false)
                    .with_event_kinds(
                        notify::EventKindMask::CORE | notify::EventKindMask::ACCESS_CLOSE,
                    ),
            ) {
                Ok(n) => (Some(n), None),
                Err(e) => (None, Some(format!("inotify could not start ({e})"))),
            };
            Watcher {
                fs,
                home: home.clone(),
                db,
                settle: Duration::from_secs(config.watch_settle),
                rescan: Duration::from_secs(config.watch_rescan.max(1)),
                exclude,
                owner,
                folders: Mutex::new(BTreeMap::new()),
                events: Mutex::new(Vec::new()),
                notifier: Mutex::new(notifier),
                no_inotify,
                wake: OnceLock::new(),
                before_removal: OnceLock::new(),
                working: Mutex::new(()),
                stopping: std::sync::atomic::AtomicBool::new(false),
                initial: Mutex::new(None),
            }
        });
        if let Some(why) = &w.no_inotify {
            tracing::warn!("{why}: watched folders are rescanned instead");
        }
        let gone = w.follow_list(&config.watch)?;
        *lock(&w.initial) = Some(gone);
        Ok(w)
    }

    /// Ends a sync under way (what it read of a file is not committed) and
    /// waits for it; called once the workers have stopped.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _one = lock(&self.working);
        *lock(&self.notifier) = None;
    }

    /// How often the worker looks for due rescans when nothing woke it.
    pub fn interval(&self) -> Duration {
        self.rescan.min(Duration::from_secs(300))
    }

    /// Has `hook` run before a folder no longer watched leaves the tree.
    pub fn set_before_removal(&self, hook: Box<dyn Fn() -> Result<()> + Send + Sync>) {
        let _ = self.before_removal.set(hook);
    }

    /// The worker that backs the folders up.
    pub fn worker(self: &Arc<Self>) -> WatchWorker {
        WatchWorker(self.clone())
    }

    /// Tells the watcher how to wake its worker, and wakes it for the first scans.
    pub fn set_wake(&self, handle: WorkerHandle) {
        handle.wake();
        let _ = self.wake.set(handle);
    }

    fn wake(&self) {
        if let Some(h) = self.wake.get() {
            h.wake();
        }
    }

    /// Reads the config's list again and follows it.
    pub fn reload(&self) -> Result<()> {
        let config = Config::load(&self.home)?;
        let _one = lock(&self.working);
        let mut gone = lock(&self.initial).take().unwrap_or_default();
        gone.extend(self.follow_list(&config.watch)?);
        self.remove_copies(&gone)?;
        self.wake();
        Ok(())
    }

    /// Follows `list`: new folders are scanned, changed ones start again;
    /// returns the dropped ones (and those unwatched while no daemon ran),
    /// whose copies are to leave the live tree.
    fn follow_list(&self, list: &[WatchEntry]) -> Result<Vec<String>> {
        let mut gone = self.forgotten()?;
        gone.retain(|n| !list.iter().any(|w| w.name == *n));
        {
            let mut folders = lock(&self.folders);
            let keep: BTreeSet<&str> = list.iter().map(|w| w.name.as_str()).collect();
            let dropped: Vec<String> = folders
                .keys()
                .filter(|n| !keep.contains(n.as_str()))
                .cloned()
                .collect();
            for name in dropped {
                if let Some(f) = folders.remove(&name) {
                    self.unwatch_all(&f);
                }
                gone.push(name);
            }
            for w in list {
                if folders.get(&w.name).is_some_and(|f| f.entry == *w) {
                    continue;
                }
                let old = folders.remove(&w.name);
                if let Some(old) = &old {
                    self.unwatch_all(old);
                }
                let stamps = self.load_stamps(&w.name)?;
                let driver = match &self.no_inotify {
                    Some(why) => Driver::Rescans(why.clone()),
                    None => Driver::Inotify,
                };
                let mut folder = Folder::new(w.clone(), stamps, driver);
                if let Some(old) = old {
                    // The same folder, its entry changed: the counts since
                    // start go on, and a rescan asked for is answered by the
                    // full scan the new entry starts with.
                    folder.scans = old.scans;
                    folder.scans_failed = old.scans_failed;
                    folder.asked = old.asked;
                    folder.bytes_read = old.bytes_read;
                    folder.listed_all = old.listed_all;
                } else {
                    folder.listed_all = self.listed_all(&w.name)?;
                }
                folders.insert(w.name.clone(), folder);
            }
        }
        Ok(gone)
    }

    /// Removes the copies of folders no longer watched, after a snapshot
    /// keeps them, and forgets their stamps.
    fn remove_copies(&self, gone: &[String]) -> Result<()> {
        if let Some(dir) = self.backups_if_any()? {
            let present: Vec<String> = gone
                .iter()
                .filter(|n| self.fs.lookup(dir, n.as_bytes()).is_ok())
                .cloned()
                .collect();
            if !present.is_empty() {
                if let Some(hook) = self.before_removal.get() {
                    hook().context("taking a snapshot before unwatched folders leave the tree")?;
                }
                for name in &present {
                    remove_tree(&self.fs, dir, name.as_bytes())?;
                    tracing::info!(folder = %name, "no longer watched: its copy left the live tree (snapshots keep it)");
                }
            }
        }
        for name in gone {
            self.forget_stamps(name)?;
        }
        Ok(())
    }

    /// Folders unwatched while no daemon ran.
    fn forgotten(&self) -> Result<Vec<String>> {
        let txn = self.db.begin_read()?;
        let t = match txn.open_table(FORGET) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(row?.0.value().to_owned());
        }
        Ok(out)
    }

    fn backups_if_any(&self) -> Result<Option<u64>> {
        match self.fs.lookup(
            fincrypt_fs::meta::ROOT_INO,
            fincrypt_fs::fossil::BACKUPS_NAME,
        ) {
            Ok(a) if a.kind == Kind::Dir => {
                let marked = self
                    .fs
                    .getxattr(a.ino, fincrypt_fs::fossil::BACKUPS_XATTR)
                    .is_ok();
                Ok(marked.then_some(a.ino))
            }
            Ok(_) | Err(FsError::Errno(libc::ENOENT)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn unwatch_all(&self, f: &Folder) {
        use notify::Watcher as _;
        if let Some(n) = lock(&self.notifier).as_mut() {
            for d in &f.watched {
                let _ = n.unwatch(d);
            }
        }
    }

    fn load_stamps(&self, name: &str) -> Result<Stamps> {
        let txn = self.db.begin_read()?;
        let t = match txn.open_table(STAMPS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Stamps::new()),
            Err(e) => return Err(e.into()),
        };
        let mut kept = Vec::new();
        for row in t.range((name, &[][..])..)? {
            let (k, v) = row?;
            let (n, rel) = k.value();
            if n != name {
                break;
            }
            let (ino, size, mtime_ns, ctime_ns) = v.value();
            kept.push((
                PathBuf::from(std::ffi::OsStr::from_bytes(rel)),
                Stamp {
                    ino,
                    size,
                    mtime_ns: i128::from(mtime_ns),
                    ctime_ns: i128::from(ctime_ns),
                },
            ));
        }
        Ok(Stamps::from_kept(kept))
    }

    fn save_stamps(&self, name: &str, changed: Vec<(PathBuf, Option<Stamp>)>) -> Result<()> {
        if changed.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(STAMPS)?;
            for (rel, stamp) in changed {
                let key = (name, rel.as_os_str().as_bytes());
                match stamp {
                    Some(s) => {
                        let ns = |v: i128| i64::try_from(v).unwrap_or(i64::MAX);
                        t.insert(key, (s.ino, s.size, ns(s.mtime_ns), ns(s.ctime_ns)))?;
                    }
                    None => {
                        t.remove(key)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn forget_stamps(&self, name: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(STAMPS)?;
            let keys: Vec<Vec<u8>> = t
                .range((name, &[][..])..)?
                .map_while(|r| {
                    let (k, _) = r.ok()?;
                    let (n, rel) = k.value();
                    (n == name).then(|| rel.to_vec())
                })
                .collect();
            for rel in keys {
                t.remove((name, rel.as_slice()))?;
            }
            txn.open_table(FORGET)?.remove(name)?;
            txn.open_table(LISTED_ALL)?.remove(name)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// When folder `name`'s copy was last listed whole (0: never).
    fn listed_all(&self, name: &str) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let t = match txn.open_table(LISTED_ALL) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(name)?.map_or(0, |v| v.value()))
    }

    fn note_listed_all(&self, name: &str, at: u64) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(LISTED_ALL)?.insert(name, at)?;
        txn.commit()?;
        Ok(())
    }

    // Events.

    /// Takes the events inotify gave since the last call into the folders.
    fn drain_events(&self) {
        let events = std::mem::take(&mut *lock(&self.events));
        if events.is_empty() {
            return;
        }
        let mut folders = lock(&self.folders);
        for (at, unix, ev) in events {
            self.on_event(&mut folders, at, unix, ev);
        }
    }

    fn on_event(
        &self,
        folders: &mut BTreeMap<String, Folder>,
        now: Instant,
        unix: u64,
        ev: notify::Result<notify::Event>,
    ) {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, ModifyKind, RemoveKind};
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "inotify reported an error: rescanning");
                for f in folders.values_mut() {
                    f.full_at = now;
                }
                return;
            }
        };
        if ev.need_rescan() {
            for f in folders.values_mut() {
                f.full_at = now;
            }
            tracing::warn!("inotify lost events (its queue overflowed): rescanning");
            return;
        }
        match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            _ => {}
        }
        let gone_dir = matches!(
            ev.kind,
            EventKind::Remove(RemoveKind::Folder | RemoveKind::Any | RemoveKind::Other)
                | EventKind::Modify(ModifyKind::Name(_))
        );
        for path in &ev.paths {
            let Some(f) = folders
                .values_mut()
                .find(|f| path.starts_with(&f.entry.path))
            else {
                continue;
            };
            if gone_dir {
                // Its watch went with it (inotify drops a moved or removed
                // directory's watch): watched again once seen again.
                let stale: Vec<PathBuf> = f
                    .watched
                    .range::<Path, _>((
                        std::ops::Bound::Included(path.as_path()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|p| p.starts_with(path))
                    .cloned()
                    .collect();
                for p in stale {
                    f.watched.remove(&p);
                }
            }
            let rel = path.strip_prefix(&f.entry.path).unwrap_or(Path::new(""));
            let dir = rel.parent().unwrap_or(Path::new("")).to_path_buf();
            f.pending.insert(dir, now);
            f.last_seen = Some(unix);
        }
    }

    /// How long until the earliest pending change has settled; `None` when
    /// something can be done now or nothing waits.
    fn until_settled(&self) -> Option<Duration> {
        self.drain_events();
        let now = Instant::now();
        let folders = lock(&self.folders);
        let mut soonest: Option<Duration> = None;
        for f in folders.values() {
            if f.full_at <= now {
                return None;
            }
            for t in f.pending.values() {
                let ready = *t + self.settle;
                if ready <= now {
                    return None;
                }
                let wait = ready - now;
                soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
            }
        }
        soonest
    }

    fn pending(&self) -> u64 {
        lock(&self.folders)
            .values()
            .map(|f| f.pending.len() as u64)
            .sum()
    }

    /// Backs up what is due: full scans, then settled directories. Returns
    /// the files imported.
    pub fn work(&self) -> Result<u64> {
        let _one = lock(&self.working);
        let initial = lock(&self.initial).take();
        if let Some(gone) = initial
            && let Err(e) = self.remove_copies(&gone)
        {
            // Tried again at the next step.
            *lock(&self.initial) = Some(gone);
            return Err(e);
        }
        self.drain_events();
        let now = Instant::now();
        let mut jobs = Vec::new();
        {
            let mut folders = lock(&self.folders);
            for (name, f) in folders.iter_mut() {
                let job = if f.full_at <= now {
                    f.pending.clear();
                    Job::Full {
                        asked: f.asked,
                        list_all: unix_now() >= f.listed_all.saturating_add(FULL_RESCAN.as_secs()),
                    }
                } else {
                    let ready: Vec<PathBuf> = f
                        .pending
                        .iter()
                        .filter(|(_, t)| **t + self.settle <= now)
                        .map(|(p, _)| p.clone())
                        .collect();
                    if ready.is_empty() {
                        continue;
                    }
                    for p in &ready {
                        f.pending.remove(p);
                    }
                    Job::Dirs(outermost(ready))
                };
                let Some(stamps) = f.stamps.take() else {
                    continue;
                };
                f.working = match &job {
                    Job::Full { .. } => 1,
                    Job::Dirs(d) => d.len() as u64,
                };
                jobs.push((name.clone(), f.entry.clone(), job, stamps));
            }
        }
        let mut imported = 0;
        let mut first_error = None;
        for (name, entry, job, mut stamps) in jobs {
            // The copies are made durable (blocks, then the metadata that
            // names them) before the stamps that say they are done: a crash
            // between the two reads a file again, never skips one.
            let started = Instant::now();
            let result = self
                .sync(&entry, &job, &mut stamps)
                .and_then(|r| Ok(self.fs.sync_meta().map(|()| r)?));
            let took = started.elapsed();
            let changed = stamps.take_changed();
            let saved = match &result {
                Ok(_) => self.save_stamps(&name, changed),
                // What the failed sync stamped may not be durable: those
                // files are read again.
                Err(_) => {
                    for (rel, _) in &changed {
                        stamps.forget(rel);
                    }
                    // Kept forgotten: a restart must not find the stamps
                    // of before the failed sync either.
                    self.save_stamps(&name, changed.into_iter().map(|(p, _)| (p, None)).collect())
                }
            };
            let mut folders = lock(&self.folders);
            let Some(f) = folders.get_mut(&name) else {
                continue;
            };
            (f.files, f.bytes) = stamps.totals();
            f.stamps = Some(stamps);
            f.working = 0;
            match result {
                Ok(reports) => {
                    for (under, report) in &reports {
                        imported += report.imported;
                        f.bytes_read += report.bytes_read;
                        replace_under(&mut f.errors, under, &report.errors);
                        replace_under(&mut f.skipped, under, &report.skipped);
                        for (p, why) in &report.errors {
                            tracing::warn!(folder = %name, path = %p.display(), "not backed up: {why}");
                        }
                    }
                    let seen: Vec<(PathBuf, Vec<PathBuf>)> = reports
                        .iter()
                        .map(|(under, r)| (under.clone(), r.dirs_seen.clone()))
                        .collect();
                    self.follow(f, &seen);
                    f.last_backed_up = Some(unix_now());
                    if let Job::Full { asked, list_all } = job {
                        if list_all {
                            f.listed_all = unix_now();
                            if let Err(e) = self.note_listed_all(&name, f.listed_all) {
                                tracing::warn!(folder = %name, error = %e, "cannot note a full listing");
                            }
                        }
                        f.scans += 1;
                        f.last_scan_failed = false;
                        f.last_scan = Some(took);
                        f.answered = asked;
                        // A rescan asked while this one ran comes next.
                        f.full_at = if f.asked > asked {
                            Instant::now()
                        } else {
                            Instant::now()
                                + match f.driver {
                                    Driver::Inotify => FULL_RESCAN,
                                    Driver::Rescans(_) => self.rescan,
                                }
                        };
                    }
                }
                Err(e) => {
                    if let Job::Full { asked, .. } = job {
                        f.scans_failed += 1;
                        f.last_scan_failed = true;
                        f.answered = asked;
                    }
                    // Tried again at the next full scan, sooner than a day
                    // (at once if a rescan was asked and not yet made).
                    f.full_at = if f.asked > f.answered {
                        Instant::now()
                    } else {
                        Instant::now() + self.rescan
                    };
                    first_error.get_or_insert(e.context(format!("backing up {name:?}")));
                }
            }
            if let Err(e) = saved {
                first_error.get_or_insert(e.context(format!("keeping the stamps of {name:?}")));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(imported),
        }
    }

    /// The directory `backups/NAME` (made if it is not there), with the
    /// folder's redundancy.
    fn copy_dir(&self, entry: &WatchEntry) -> Result<u64> {
        let backups = self.fs.backups_dir(self.owner).map_err(|e| match e {
            FsError::Errno(libc::EEXIST) => anyhow::anyhow!(
                "the mount's root has a `backups` of the user's own: rename it, and the \
                 watched folders are backed up there"
            ),
            e => e.into(),
        })?;
        let name = entry.name.as_bytes();
        let ino = match self.fs.lookup(backups, name) {
            Ok(a) if a.kind == Kind::Dir => a.ino,
            Ok(_) => {
                remove_tree(&self.fs, backups, name)?;
                self.fs
                    .mknod(backups, name, Kind::Dir, 0o700, 0, None, self.owner)?
                    .ino
            }
            Err(FsError::Errno(libc::ENOENT)) => {
                self.fs
                    .mknod(backups, name, Kind::Dir, 0o700, 0, None, self.owner)?
                    .ino
            }
            Err(e) => return Err(e.into()),
        };
        let x = fincrypt_fs::fossil::REDUNDANCY_XATTR;
        let now = self.fs.getxattr(ino, x).ok();
        let want = entry.redundancy.map(|r| r.to_string().into_bytes());
        if now != want {
            match &want {
                Some(v) => self.fs.setxattr(ino, x, v, false, false)?,
                None => self.fs.removexattr(ino, x)?,
            }
        }
        Ok(ino)
    }

    /// Syncs what `job` says; each report with the directory it covers.
    fn sync(
        &self,
        entry: &WatchEntry,
        job: &Job,
        stamps: &mut Stamps,
    ) -> Result<Vec<(PathBuf, SyncReport)>> {
        let root = self.copy_dir(entry)?;
        let src = &entry.path;
        let dirs = match job {
            Job::Full { .. } => vec![PathBuf::new()],
            Job::Dirs(d) => d.clone(),
        };
        let mut out: Vec<(PathBuf, SyncReport)> = Vec::new();
        for rel in dirs {
            // The nearest directory that both sides still have.
            let (mut under, mut ino) = (PathBuf::new(), root);
            for c in rel.components() {
                let next = under.join(c);
                let src_dir = std::fs::symlink_metadata(src.join(&next)).is_ok_and(|m| m.is_dir());
                let dst = match self.fs.lookup(ino, c.as_os_str().as_bytes()) {
                    Ok(a) if a.kind == Kind::Dir => Some(a.ino),
                    _ => None,
                };
                match (src_dir, dst) {
                    (true, Some(d)) => {
                        under = next;
                        ino = d;
                    }
                    _ => break,
                }
            }
            if out.iter().any(|(u, _)| under.starts_with(u)) {
                continue;
            }
            // The totals in `watch status` follow a long first backup.
            let progress = |files, bytes| {
                if let Some(f) = lock(&self.folders).get_mut(&entry.name) {
                    (f.files, f.bytes) = (files, bytes);
                }
            };
            let options = SyncOptions {
                exclude: &self.exclude,
                cancel: Some(&self.stopping),
                progress: Some(&progress),
                dir_stamp_margin: None,
                ignore_dir_stamps: matches!(job, Job::Full { list_all: true, .. }),
            };
            let report = sync_subdir(&self.fs, src, &under, ino, stamps, &options)?;
            out.push((under, report));
        }
        Ok(out)
    }

    /// Watches the directories just seen and forgets those gone, under
    /// each directory synced; a folder whose watches run out is rescanned.
    fn follow(&self, f: &mut Folder, seen: &[(PathBuf, Vec<PathBuf>)]) {
        use notify::Watcher as _;
        let mut guard = lock(&self.notifier);
        let Some(n) = guard.as_mut() else {
            return;
        };
        for (under, dirs) in seen {
            let top = f.entry.path.join(under);
            let now: BTreeSet<PathBuf> = dirs.iter().map(|d| f.entry.path.join(d)).collect();
            let before: Vec<PathBuf> = f
                .watched
                .range::<Path, _>((
                    std::ops::Bound::Included(top.as_path()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|p| p.starts_with(&top))
                .cloned()
                .collect();
            for p in before {
                if !now.contains(&p) {
                    let _ = n.unwatch(&p);
                    f.watched.remove(&p);
                }
            }
            if f.driver != Driver::Inotify {
                continue;
            }
            // One round trip to notify's thread for them all: one each took
            // as long as the rest of the first scan after a restart.
            let mut todo: Vec<notify::PathOp> = now
                .into_iter()
                .filter(|p| !f.watched.contains(p))
                .map(notify::PathOp::watch_non_recursive)
                .collect();
            while !todo.is_empty() {
                let ops = std::mem::take(&mut todo);
                let paths: Vec<PathBuf> = ops.iter().map(|o| o.as_path().to_path_buf()).collect();
                let e = match n.update_paths(ops) {
                    Ok(()) => {
                        f.watched.extend(paths);
                        break;
                    }
                    Err(e) => e,
                };
                // Those before the one that failed were applied.
                let failed = e.origin.as_ref().map(|o| o.as_path().to_path_buf());
                // (Unknown without the failed one: none are counted.)
                let applied = match failed {
                    Some(_) => paths.len().saturating_sub(e.remaining.len() + 1),
                    None => 0,
                };
                f.watched.extend(paths.into_iter().take(applied));
                let Some(p) = failed else {
                    tracing::warn!(folder = %f.entry.name, error = %e.source, "inotify watches could not be added; the next full scan tries again");
                    break;
                };
                if matches!(e.source.kind, notify::ErrorKind::MaxFilesWatch) {
                    let why = format!(
                        "inotify watches ran out after {} directories \
                         (fs.inotify.max_user_watches)",
                        f.watched.len()
                    );
                    tracing::warn!(folder = %f.entry.name, "{why}: rescanning every {} s instead", self.rescan.as_secs());
                    f.driver = Driver::Rescans(why);
                    f.full_at = Instant::now() + self.rescan;
                    break;
                }
                // Gone since it was walked: its parent is looked at again.
                tracing::debug!(path = %p.display(), error = %e.source, "no watch");
                let rel = p.strip_prefix(&f.entry.path).unwrap_or(Path::new(""));
                f.pending.insert(
                    rel.parent().unwrap_or(Path::new("")).to_path_buf(),
                    Instant::now(),
                );
                todo = e.remaining;
            }
        }
    }

    /// Makes a full scan of folder `name` (of every folder when none) due
    /// now, as after a restart: every file's stamp is compared, and only
    /// changed files are read. The folders' `rescan_pending` stays true until
    /// a scan that started after this ask has ended.
    pub fn rescan_now(&self, name: Option<&str>) -> Result<()> {
        {
            let mut folders = lock(&self.folders);
            if let Some(n) = name
                && !folders.contains_key(n)
            {
                anyhow::bail!(
                    "no watched folder is named {n:?} (fincryptctl watch status lists them)"
                );
            }
            for (k, f) in folders.iter_mut() {
                if name.is_none_or(|n| n == k) {
                    f.asked += 1;
                    f.full_at = Instant::now();
                }
            }
        }
        self.wake();
        Ok(())
    }

    /// What `fincryptctl watch status` shows.
    pub fn status(&self) -> Vec<WatchView> {
        let folders = lock(&self.folders);
        let problems = |m: &BTreeMap<PathBuf, String>| -> Vec<WatchProblem> {
            m.iter()
                .take(PROBLEMS_SHOWN)
                .map(|(p, why)| WatchProblem {
                    path: p.display().to_string(),
                    why: why.clone(),
                })
                .collect()
        };
        folders
            .values()
            .map(|f| WatchView {
                name: f.entry.name.clone(),
                path: f.entry.path.clone(),
                redundancy: f.entry.redundancy,
                driver: match &f.driver {
                    Driver::Inotify => "inotify".into(),
                    Driver::Rescans(_) => "rescans".into(),
                },
                driver_note: match &f.driver {
                    Driver::Inotify => String::new(),
                    Driver::Rescans(why) => {
                        format!("{why}; rescanned every {} s", self.rescan.as_secs())
                    }
                },
                watched_dirs: f.watched.len() as u64,
                files: f.files,
                bytes: f.bytes,
                last_change_seen: f.last_seen,
                last_backed_up: f.last_backed_up,
                pending: f.pending.len() as u64 + f.working,
                scans: f.scans,
                scans_failed: f.scans_failed,
                last_scan_failed: Some(f.last_scan_failed),
                last_scan_seconds: f.last_scan.map(|d| d.as_secs_f64()),
                rescan_pending: f.asked > f.answered,
                bytes_read: f.bytes_read,
                error_count: f.errors.len() as u64,
                errors: problems(&f.errors),
                skipped_count: f.skipped.len() as u64,
                skipped: problems(&f.skipped),
            })
            .collect()
    }
}

use std::os::unix::ffi::OsStrExt;

/// The directories of `dirs` that no other one of them holds.
fn outermost(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    dirs.sort();
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        if !out.iter().any(|o| d.starts_with(o)) {
            out.push(d);
        }
    }
    out
}

/// Replaces the problems under `under` with `now`.
fn replace_under(map: &mut BTreeMap<PathBuf, String>, under: &Path, now: &[(PathBuf, String)]) {
    map.retain(|p, _| !p.starts_with(under));
    for (p, why) in now {
        map.insert(p.clone(), why.clone());
    }
}

/// The `watch` worker: backs up settled changes and due rescans.
pub struct WatchWorker(Arc<Watcher>);

impl Worker for WatchWorker {
    fn name(&self) -> &'static str {
        "watch"
    }

    fn step(&mut self) -> BoxFuture<'_, Result<Step, String>> {
        let w = self.0.clone();
        Box::pin(async move {
            if let Some(wait) = w.until_settled() {
                tokio::time::sleep(wait).await;
            }
            let work = w.clone();
            let done = tokio::task::spawn_blocking(move || work.work())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{e:#}"))?;
            Ok(if w.pending() > 0 {
                Step::Busy { done }
            } else {
                Step::Idle { done }
            })
        })
    }

    fn queue_len(&self) -> Option<u64> {
        Some(self.0.pending())
    }
}

// ---------------------------------------------------------------------
// Restoring.

/// Which tree holds folder `name`: the live copy, or the newest snapshot
/// at or before `at` (a snapshot name, or an RFC 3339 time); with what
/// to call it.
fn source(fs: &Fossil, name: &str, at: Option<&str>) -> Result<(Tree, String)> {
    use fincrypt_fs::fossil::BACKUPS_NAME;
    use fincrypt_fs::meta::ROOT_INO;
    use fincrypt_fs::snapdir;
    let Some(at) = at else {
        let missing = || {
            anyhow::anyhow!(
                "no folder named {name:?} is backed up here (see `fincryptctl watch status`, \
                 or `--at` for one no longer watched)"
            )
        };
        let backups = fs.lookup(ROOT_INO, BACKUPS_NAME).map_err(|_| missing())?;
        let a = fs
            .lookup(backups.ino, name.as_bytes())
            .map_err(|_| missing())?;
        return Ok((Tree::Live(a.ino), "live".into()));
    };
    let when = humantime::parse_rfc3339_weak(at).map_err(|e| {
        anyhow::anyhow!(
            "--at {at:?} is not a time ({e}): give a snapshot's name as \
             `fincryptctl snapshots list` shows it, or a time such as 2026-12-07T09:30:00Z"
        )
    })?;
    let when = when
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let snaps = fs.meta().snapshots()?;
    // Names show milliseconds: a snapshot's own name picks it.
    let millis = |t: fincrypt_fs::Time| i128::from(t.secs) * 1000 + i128::from(t.nanos / 1_000_000);
    let Some(snap) = snaps
        .iter()
        .filter(|s| millis(s.time) <= when as i128)
        .max_by_key(|s| s.time)
    else {
        match snaps.iter().map(|s| s.time).min() {
            Some(t) => bail!(
                "no snapshot was taken at or before {at}: the oldest is {}",
                snapdir::name(t)
            ),
            None => bail!("there are no snapshots yet (`fincryptctl snapshots create` takes one)"),
        }
    };
    let shown = snapdir::name(snap.time);
    let root = fincrypt_fs::snapshot::root(fs, snap)?;
    let find = |dir: &fincrypt_fs::snapshot::SnapEntry, want: &[u8]| -> Result<Option<_>> {
        Ok(fincrypt_fs::snapshot::read_dir(fs, dir)?
            .into_iter()
            .find(|e| e.name == want && e.kind == Kind::Dir))
    };
    let found = match find(&root.tree, BACKUPS_NAME)? {
        Some(b) => find(&b, name.as_bytes())?,
        None => None,
    };
    let entry = found
        .with_context(|| format!("snapshot {shown} holds no backup of a folder named {name:?}"))?;
    Ok((Tree::Snapshot(Box::new(entry)), shown))
}

use fincrypt_fs::export::{Exported, Tree, export};

/// Writes watched folder `name` (live, or as of `at`) into `dest`, made if
/// missing; a `dest` with anything in it is refused unless `overwrite`.
pub fn restore(
    fs: &Fossil,
    name: &str,
    dest: &Path,
    at: Option<&str>,
    overwrite: bool,
    progress: &mut dyn FnMut(&Exported),
) -> Result<crate::control::RestoreSummary> {
    let (tree, from) = source(fs, name, at)?;
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() && !overwrite {
                bail!(
                    "{} is not empty: restore into an empty directory, or pass --overwrite \
                     to replace what has the same names",
                    dest.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dest)
                .with_context(|| format!("creating {}", dest.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", dest.display())),
    }
    let done = export(fs, &tree, dest, progress).map_err(|e| match e {
        FsError::Errno(libc::EIO) | FsError::Store(_) => anyhow::Error::new(e).context(
            "a block of the backup could not be read here: with peers, run the restore \
             while the mount (or `fincrypt backup`) is up, and it fetches blocks from holders",
        ),
        e => anyhow::Error::new(e).context(format!("restoring into {}", dest.display())),
    })?;
    Ok(crate::control::RestoreSummary {
        from,
        dirs: done.dirs,
        files: done.files,
        symlinks: done.symlinks,
        hard_links: done.hard_links,
        others: done.others,
        bytes: done.bytes,
        warnings: done
            .warnings
            .into_iter()
            .map(|(p, why)| WatchProblem {
                path: p.display().to_string(),
                why,
            })
            .collect(),
    })
}
