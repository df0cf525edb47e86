//! Shared harness for end-to-end tests of the `fincrypt` and `fincryptctl`
//! programs: homes, a mounted daemon that always cleans up after itself,
//! commands with deadlines and a seeded byte generator.
//!
//! Nothing here sleeps to synchronise: every wait polls a condition until a
//! deadline and fails loudly when the deadline passes.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// The passphrase of every home [`init_home`] creates.
pub const PASSPHRASE: &str = "correct horse battery staple";

/// How long a mount may take to appear.
pub const MOUNT_DEADLINE: Duration = Duration::from_secs(60);
/// How long an unmount (with its final write-back) may take.
pub const UNMOUNT_DEADLINE: Duration = Duration::from_secs(300);
/// How long a short command (init, fincryptctl, a refused mount) may take.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Polls `cond` until it holds; panics with `what` once `limit` has passed.
/// Overwrites with zeros every block a storage node at `home` holds for
/// others (a holder that lost its data), and says how many there were.
pub fn zero_held_blocks(home: &Path) -> usize {
    let mut files = Vec::new();
    files_under(&home.join("held").join("blocks"), &mut files);
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len() as usize;
        std::fs::write(f, vec![0u8; len]).unwrap();
    }
    files.len()
}

/// Waits up to `limit` until `reading` has stayed the same for three
/// seconds and `done` accepts it (placement has settled, say).
pub fn wait_steady<T: PartialEq + Clone>(
    what: &str,
    limit: Duration,
    mut reading: impl FnMut() -> T,
    mut done: impl FnMut(&T) -> bool,
) {
    let mut last: Option<T> = None;
    let mut since = Instant::now();
    wait_until(what, limit, || {
        let now = reading();
        if last.as_ref() != Some(&now) {
            last = Some(now.clone());
            since = Instant::now();
        }
        done(&now) && since.elapsed() > Duration::from_secs(3)
    });
}

pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Waits for `child` to exit; `None` if it is still running after `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Reads `r` to its end on a thread, appending to a buffer others can look at meanwhile.
pub fn drain(
    mut r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => b.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, handle)
}

/// Runs `cmd` with no standard input, collecting its output; kills it and
/// panics if it has not finished within `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let (out, out_t) = drain(child.stdout.take().unwrap());
    let (err, err_t) = drain(child.stderr.take().unwrap());
    let status = match wait_child(&mut child, limit) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let _ = err_t.join();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&err.lock().unwrap())
            );
        }
    };
    let _ = out_t.join();
    let _ = err_t.join();
    let stdout = std::mem::take(&mut *out.lock().unwrap());
    let stderr = std::mem::take(&mut *err.lock().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Lossy text of a byte buffer, for messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command for `program` on `home`, with no `FINCRYPT_*` variables of the
/// test's own environment leaking in (FINCRYPT_LOG excepted) and the home as
/// working directory, so no stray `.env` file is read.
fn command(program: &str, home: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FINCRYPT_") && k != "FINCRYPT_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.arg("--home").arg(home).current_dir(home);
    cmd
}

/// `fincrypt --home HOME` with no passphrase set.
pub fn fincrypt(home: &Path) -> Command {
    command(env!("CARGO_BIN_EXE_fincrypt"), home)
}

/// `fincryptctl --home HOME`.
pub fn fincryptctl(home: &Path) -> Command {
    command(env!("CARGO_BIN_EXE_fincryptctl"), home)
}

/// Runs `fincryptctl --home HOME ARGS...` to completion (with a deadline).
pub fn ctl(home: &Path, args: &[&str]) -> Output {
    run(fincryptctl(home).args(args), COMMAND_DEADLINE)
}

/// Like [`ctl`], but panics unless it succeeds; returns its standard output.
pub fn ctl_ok(home: &Path, args: &[&str]) -> String {
    let out = ctl(home, args);
    assert!(
        out.status.success(),
        "fincryptctl {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A fresh home initialised with [`PASSPHRASE`], automatic snapshots off.
pub fn init_home() -> TempDir {
    let home = tempfile::Builder::new()
        .prefix("fincrypt-home-")
        .tempdir()
        .unwrap();
    init_home_in(&home);
    home
}

/// A new owner home (initialised, no scheduled snapshots) and its
/// recovery phrase.
pub fn owner_home() -> (TempDir, String) {
    let home = tempfile::Builder::new()
        .prefix("fincrypt-owner-")
        .tempdir()
        .unwrap();
    let out = run(
        fincrypt(home.path())
            .arg("init")
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    let phrase = text(&out.stdout).trim().to_owned();
    assert_eq!(phrase.split_whitespace().count(), 24);
    set_config(home.path(), "snapshot_interval", "0");
    (home, phrase)
}

/// Initialises `home` (an empty directory) as [`init_home`] does.
pub fn init_home_in(home: &TempDir) {
    let out = run(
        fincrypt(home.path())
            .arg("init")
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "init failed: {}", text(&out.stderr));
    let phrase = text(&out.stdout);
    assert_eq!(
        phrase.split_whitespace().count(),
        24,
        "init prints a 24-word phrase: {phrase:?}"
    );
    set_config(home.path(), "snapshot_interval", "0");
}

/// Sets `key = value` in the home's config.toml, replacing an existing line.
pub fn set_config(home: &Path, key: &str, value: &str) {
    let file = home.join("config.toml");
    let old = std::fs::read_to_string(&file).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !(l.starts_with(key) && l[key.len()..].trim_start().starts_with('='))
        })
        .map(str::to_owned)
        .collect();
    lines.push(format!("{key} = {value}"));
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
}

/// Undoes the octal escapes (`\040` and friends) of a /proc/self/mountinfo field.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The filesystem type of whatever is mounted exactly at `path`, if anything.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|i| fields.get(i + 1))
            .map(|s| s.to_string())
            .unwrap_or_default();
        // The last one listed is the one on top.
        found = Some(fstype);
    }
    found
}

/// True if something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounted_fstype(path).is_some()
}

/// `fusermount3 -u [-z] MNT`; true if it succeeded.
fn fusermount_u(mnt: &Path, lazy: bool) -> bool {
    let mut cmd = Command::new("fusermount3");
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    cmd.arg(mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// What [`Mount::start_with`] passes to the daemon.
#[derive(Clone, Debug)]
pub struct StartOptions {
    pub passphrase: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The umask the daemon starts with (the test's own when `None`).
    pub umask: Option<u32>,
}

/// Makes `cmd` start with umask `mask`.
pub fn with_umask(cmd: &mut Command, mask: u32) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask(2) is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        })
    }
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            passphrase: PASSPHRASE.into(),
            args: Vec::new(),
            env: Vec::new(),
            umask: None,
        }
    }
}

/// A running `fincrypt mount` daemon over a home, mounted on a temporary
/// directory. Dropping it (for instance when a test panics) detaches the
/// mount lazily and kills the daemon, so no test leaves a mount behind.
pub struct Mount {
    /// `None` once handed back by [`Mount::unmount`] or [`Mount::kill9`].
    home: Option<TempDir>,
    mnt: Option<TempDir>,
    /// Canonical path of the mount point.
    mnt_path: PathBuf,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    done: bool,
}

impl Mount {
    /// Mounts `home` with [`PASSPHRASE`] and waits until the mount is there.
    pub fn start(home: TempDir) -> Mount {
        Mount::start_with(home, StartOptions::default())
    }

    /// Mounts `home` with the given options and waits until the mount is there.
    pub fn start_with(home: TempDir, opts: StartOptions) -> Mount {
        let mnt = tempfile::Builder::new()
            .prefix("fincrypt-mnt-")
            .tempdir()
            .unwrap();
        Mount::start_on(home, mnt, opts)
    }

    /// Mounts `home` on `mnt` (which may hold files, with `--nonempty`).
    pub fn start_on(home: TempDir, mnt: TempDir, opts: StartOptions) -> Mount {
        let mnt_path = mnt.path().canonicalize().unwrap();
        assert!(!is_mounted(&mnt_path));
        let mut cmd = fincrypt(home.path());
        cmd.arg("mount")
            .arg(&mnt_path)
            .args(&opts.args)
            .env("FINCRYPT_PASSPHRASE", &opts.passphrase)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(mask) = opts.umask {
            with_umask(&mut cmd, mask);
        }
        let mut child = cmd.spawn().expect("spawning fincrypt mount");
        let (stderr, _) = drain(child.stderr.take().unwrap());
        let mut m = Mount {
            home: Some(home),
            mnt: Some(mnt),
            mnt_path,
            child,
            stderr,
            done: false,
        };
        let deadline = Instant::now() + MOUNT_DEADLINE;
        loop {
            if let Some(status) = m.child.try_wait().unwrap() {
                panic!(
                    "fincrypt mount exited ({status}) before mounting: {}",
                    m.stderr()
                );
            }
            if mounted_fstype(&m.mnt_path).is_some_and(|t| t.starts_with("fuse")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not mounted after {MOUNT_DEADLINE:?}: {}",
                m.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The root answers, i.e. the daemon serves requests.
        let root = std::fs::metadata(&m.mnt_path).expect("stat of the mount root");
        assert!(root.is_dir());
        m
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt_path
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        self.home.as_ref().unwrap().path()
    }

    /// The daemon's peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("reading the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in /proc status")
            * 1024
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon has written to standard error so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr.lock().unwrap())
    }

    /// Unmounts with `fusermount3 -u`, waits for the daemon to exit 0 and
    /// hands back the home.
    pub fn unmount(self) -> TempDir {
        self.unmount_keeping_mount_point().0
    }

    /// As [`Mount::unmount`], and hands back the mount point too, to look at
    /// what the mount covered.
    pub fn unmount_keeping_mount_point(mut self) -> (TempDir, TempDir) {
        let deadline = Instant::now() + MOUNT_DEADLINE;
        loop {
            if fusermount_u(&self.mnt_path, false) {
                break;
            }
            // It may have gone by itself (that would show below as a bad exit).
            if !is_mounted(&self.mnt_path) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fusermount3 -u {} kept failing",
                self.mnt_path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = wait_child(&mut self.child, UNMOUNT_DEADLINE).unwrap_or_else(|| {
            panic!(
                "daemon still running {UNMOUNT_DEADLINE:?} after unmount: {}",
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "daemon exited with {status} after unmount: {}",
            self.stderr()
        );
        assert!(!is_mounted(&self.mnt_path), "still mounted after unmount");
        self.done = true;
        (self.home.take().unwrap(), self.mnt.take().unwrap())
    }

    /// Sends SIGTERM and waits for the daemon to unmount and exit 0.
    pub fn terminate(mut self) -> TempDir {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM");
        let status = wait_child(&mut self.child, UNMOUNT_DEADLINE).unwrap_or_else(|| {
            panic!(
                "daemon still running {UNMOUNT_DEADLINE:?} after SIGTERM: {}",
                self.stderr()
            )
        });
        assert!(
            status.success(),
            "daemon exited with {status} after SIGTERM: {}",
            self.stderr()
        );
        assert!(!is_mounted(&self.mnt_path), "still mounted after SIGTERM");
        self.done = true;
        self.home.take().unwrap()
    }

    /// SIGKILLs the daemon and leaves its dead mount in place (every access
    /// to it fails with ENOTCONN): hands back the home and the mount point.
    pub fn kill9_stale(mut self) -> (TempDir, StaleMount) {
        self.child.kill().expect("SIGKILL");
        let status = wait_child(&mut self.child, COMMAND_DEADLINE).expect("a killed daemon exits");
        assert!(!status.success());
        self.done = true;
        let stale = StaleMount {
            mnt: self.mnt.take(),
            path: self.mnt_path.clone(),
        };
        (self.home.take().unwrap(), stale)
    }

    /// SIGKILLs the daemon, detaches the dead mount lazily and hands back the home.
    pub fn kill9(mut self) -> TempDir {
        self.child.kill().expect("SIGKILL");
        let status = wait_child(&mut self.child, COMMAND_DEADLINE).expect("a killed daemon exits");
        assert!(!status.success());
        assert!(
            fusermount_u(&self.mnt_path, true),
            "fusermount3 -u -z {} failed",
            self.mnt_path.display()
        );
        wait_until("the dead mount to go", MOUNT_DEADLINE, || {
            !is_mounted(&self.mnt_path)
        });
        self.done = true;
        self.home.take().unwrap()
    }
}

/// The mount point of a killed daemon, its dead mount still there until
/// [`StaleMount::unmount`] (or the drop, which detaches it lazily).
pub struct StaleMount {
    mnt: Option<TempDir>,
    pub path: PathBuf,
}

impl StaleMount {
    /// `fusermount3 -u` as a user would run it; hands back the mount point.
    pub fn unmount(mut self) -> TempDir {
        assert!(
            fusermount_u(&self.path, false),
            "fusermount3 -u {} failed",
            self.path.display()
        );
        assert!(!is_mounted(&self.path));
        self.mnt.take().unwrap()
    }
}

impl Drop for StaleMount {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            fusermount_u(&self.path, true);
        }
        if is_mounted(&self.path)
            && let Some(m) = self.mnt.take()
        {
            std::mem::forget(m);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.done {
            if is_mounted(&self.mnt_path) {
                fusermount_u(&self.mnt_path, true);
            }
            let _ = self.child.kill();
            let _ = wait_child(&mut self.child, COMMAND_DEADLINE);
        }
        if is_mounted(&self.mnt_path) {
            // Never let TempDir's clean-up walk into a live mount.
            if let Some(m) = self.mnt.take() {
                std::mem::forget(m);
            }
        }
    }
}

/// A small, fast, seeded generator (xorshift64*): reproducible test data
/// without extra dependencies.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // SplitMix64 of the seed, so nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(z | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..hi` (lo < hi).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts two byte strings are equal without printing megabytes.
#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: contents differ at byte {i} (got {} bytes, want {} bytes; got {:02x?}.. want {:02x?}..)",
            got.len(),
            want.len(),
            &got[i..got.len().min(i + 16)],
            &want[i..want.len().min(i + 16)],
        );
    }
}

/// What a path under a directory tree looks like on disk, for before/after comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskEntry {
    pub kind: &'static str,
    pub mode: u32,
    pub len: u64,
    pub mtime: SystemTime,
    /// File contents or symlink target; empty for directories.
    pub data: Vec<u8>,
}

/// Every path under `dir` (directories, files, symlinks, others) with its
/// kind, mode, size, mtime and contents.
pub fn disk_state(dir: &Path) -> BTreeMap<PathBuf, DiskEntry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("readdir {}: {e}", d.display())) {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, data) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else if ft.is_file() {
                ("file", std::fs::read(&p).unwrap())
            } else if ft.is_symlink() {
                use std::os::unix::ffi::OsStrExt;
                (
                    "symlink",
                    std::fs::read_link(&p)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else {
                ("other", Vec::new())
            };
            out.insert(
                p.strip_prefix(dir).unwrap().to_path_buf(),
                DiskEntry {
                    kind,
                    mode: m.mode(),
                    len: m.len(),
                    mtime: m.modified().unwrap(),
                    data,
                },
            );
        }
    }
    out
}

/// Every regular file under `dir`, recursively.
pub fn regular_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Sets the extended attribute `name` of `path` (of a symlink itself, not
/// its target).
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the stated length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs `fincrypt mount` on `home` and a fresh mount point, expecting it to
/// give up: returns its output once it has exited. Panics (after cleaning
/// up) if it mounts anything or is still running after the deadline.
pub fn refused_mount(home: &Path, passphrase: Option<&str>) -> Output {
    let mnt = tempfile::Builder::new()
        .prefix("fincrypt-mnt-")
        .tempdir()
        .unwrap();
    let mnt_path = mnt.path().canonicalize().unwrap();
    let out = refused_mount_at(home, &mnt_path, &[], passphrase);
    let left: Vec<_> = std::fs::read_dir(&mnt_path).unwrap().collect();
    assert!(
        left.is_empty(),
        "a refused mount wrote into the mount point"
    );
    out
}

/// Runs `fincrypt mount MNT ARGS` on `home` (`mnt` may be anything: a file,
/// a dead mount), expecting it to give up: returns its output once it has
/// exited. Panics (after cleaning up) if it mounts or keeps running.
pub fn refused_mount_at(
    home: &Path,
    mnt_path: &Path,
    args: &[&str],
    passphrase: Option<&str>,
) -> Output {
    let was_mounted = is_mounted(mnt_path);
    let mut cmd = fincrypt(home);
    cmd.arg("mount")
        .arg(mnt_path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = passphrase {
        cmd.env("FINCRYPT_PASSPHRASE", p);
    }
    let mut child = cmd.spawn().expect("spawning fincrypt mount");
    let (out, out_t) = drain(child.stdout.take().unwrap());
    let (err, err_t) = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        let mounted = !was_mounted && is_mounted(mnt_path);
        if mounted || Instant::now() >= deadline {
            if mounted {
                fusermount_u(mnt_path, true);
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "fincrypt mount was expected to refuse, but {}; stderr: {}",
                if mounted {
                    "it mounted"
                } else {
                    "it kept running"
                },
                text(&err.lock().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = out_t.join();
    let _ = err_t.join();
    assert_eq!(
        is_mounted(mnt_path),
        was_mounted,
        "a refused mount changed what is mounted"
    );
    let stdout = std::mem::take(&mut *out.lock().unwrap());
    let stderr = std::mem::take(&mut *err.lock().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

/// How long a `fincrypt serve` may take to listen.
pub const START_LIMIT: Duration = Duration::from_secs(60);

/// A `fincrypt serve` process, killed and reaped when dropped.
pub struct Served {
    pub child: Child,
    pub addr: String,
    /// Standard error lines read while it started.
    started: Vec<String>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Served {
    /// Waits up to `deadline` for a line of its standard error that `wanted`
    /// accepts, and returns it (the lines read stay for [`Served::stop`]).
    pub fn wait_for_line(
        &mut self,
        what: &str,
        deadline: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.started.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what} from the node within {deadline:?}"),
            }
        }
    }

    /// The first line of standard error read so far that `wanted` accepts.
    pub fn said(&self, wanted: impl Fn(&str) -> bool) -> Option<String> {
        self.started.iter().find(|l| wanted(l)).cloned()
    }

    /// Stops it with SIGTERM; its exit status and every line it wrote to
    /// standard error.
    pub fn stop(mut self) -> (ExitStatus, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0, "kill -TERM");
        let status = wait_child(&mut self.child, UNMOUNT_DEADLINE).expect("serve stops on SIGTERM");
        let mut lines = std::mem::take(&mut self.started);
        // The reader thread ends at EOF, once the process is gone.
        while let Ok(line) = self.lines.recv_timeout(COMMAND_DEADLINE) {
            lines.push(line);
        }
        (status, lines)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `fincrypt --home HOME serve ARGS` and waits for its "listening on" line.
/// The child is reaped by `Served`'s drop.
pub fn serve(home: &Path, args: &[&str]) -> Served {
    serve_with(home, args, |_| {})
}

/// Like [`serve`], with `adjust` applied to the command first (an umask,
/// the environment).
#[allow(clippy::zombie_processes)]
pub fn serve_with(home: &Path, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Served {
    node_with(home, "serve", args, adjust)
}

/// `fincrypt --home HOME COMMAND ARGS` (a node: `serve` or `mediator`),
/// once it says where it listens. (A node that never comes up panics the
/// test, which ends the process and its children.)
#[allow(clippy::zombie_processes)]
pub fn node_with(
    home: &Path,
    command: &str,
    args: &[&str],
    adjust: impl FnOnce(&mut Command),
) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fincrypt"));
    cmd.arg("--home")
        .arg(home)
        .arg(command)
        .args(args)
        .env_remove("FINCRYPT_PASSPHRASE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    adjust(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("[node] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_LIMIT;
    let mut started = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!("{command} did not come up: {e}"),
        };
        started.push(line.clone());
        if let Some(addr) = line.strip_prefix(&format!("fincrypt {command}: listening on ")) {
            return Served {
                child,
                addr: addr.to_owned(),
                started,
                lines,
            };
        }
    }
}

/// `fincryptctl status --json` of the daemon of `home`.
pub fn status(home: &Path) -> serde_json::Value {
    let out = ctl_ok(home, &["status", "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("status JSON {out:?}: {e}"))
}

/// A figure of `status --json`: at the top, or among the replication figures.
pub fn number(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .or_else(|| v["replication"][key].as_u64())
        .unwrap_or_else(|| panic!("status has a number {key}: {v}"))
}

/// Mount options that bootstrap to `nodes`, with `env` for the mount.
pub fn mount_opts(nodes: &[Served], env: &[(&str, &str)]) -> StartOptions {
    let mut args = vec!["--listen".to_owned(), "/ip4/127.0.0.1/tcp/0".to_owned()];
    for n in nodes {
        args.push("--bootstrap".into());
        args.push(n.addr.clone());
    }
    StartOptions {
        args,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..StartOptions::default()
    }
}

/// `n` serve nodes on 127.0.0.1, 1 GiB each, and their homes.
pub fn serve_nodes(n: usize) -> (Vec<TempDir>, Vec<Served>) {
    let homes: Vec<TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = homes
        .iter()
        .map(|h| {
            serve(
                h.path(),
                &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "1GiB"],
            )
        })
        .collect();
    (homes, nodes)
}

/// `nodes` serve nodes (1 GiB each) and a mount bootstrapped to them, with `env` for the mount.
pub fn network(nodes: usize, env: &[(&str, &str)]) -> (Vec<TempDir>, Vec<Served>, Mount) {
    let (node_homes, nodes) = serve_nodes(nodes);
    let m = Mount::start_with(init_home(), mount_opts(&nodes, env));
    (node_homes, nodes, m)
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}
