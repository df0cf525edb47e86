//! The bad day: wrong settings, wrong mount points, a home in use, a dead
//! mount, a stranger at the control socket, a loose umask, a full disk.
//! Each refusal must name the problem, exit non-zero and change nothing.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The paths under `dir`, for "nothing was added or removed" checks while a
/// daemon that may rewrite its own files is running.
fn paths(dir: &Path) -> BTreeSet<PathBuf> {
    disk_state(dir).into_keys().collect()
}

/// A command with no `--home`, no `FINCRYPT_*` from the test's environment,
/// `HOME` at `user_home` and no XDG overrides: what a user's shell runs.
fn bare(program: &str, user_home: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("FINCRYPT_") || k.starts_with("XDG_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("HOME", user_home)
        .current_dir(cwd)
        .stdin(Stdio::null());
    cmd
}

/// The source (device) field of the mount at `path` in mountinfo, and its
/// mount options.
fn mount_source_and_options(path: &Path) -> (String, String) {
    let want = path.to_str().unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want))
        .last()
        .unwrap_or_else(|| panic!("{want} in mountinfo"));
    let fields: Vec<&str> = line.split(' ').collect();
    let dash = fields.iter().position(|f| *f == "-").unwrap();
    (fields[dash + 2].to_owned(), fields[5].to_owned())
}

#[test]
fn a_misspelt_or_mistyped_setting_is_refused_by_its_name_and_nothing_changes() {
    let home = init_home();
    let original = std::fs::read_to_string(home.path().join("config.toml")).unwrap();

    std::fs::write(
        home.path().join("config.toml"),
        format!("{original}redundnacy = 5\n"),
    )
    .unwrap();
    let before = disk_state(home.path());
    let out = refused_mount(home.path(), Some(PASSPHRASE));
    assert_refused(&out, "unknown setting `redundnacy`");
    assert_refused(&out, "did you mean `redundancy`");
    assert_eq!(
        disk_state(home.path()),
        before,
        "a refused mount changed the home"
    );
    // fincryptctl reads the same settings the same way.
    let ctl_out = ctl(home.path(), &["redundancy", "get", "/"]);
    assert!(!ctl_out.status.success());

    std::fs::write(
        home.path().join("config.toml"),
        format!("{original}redundancy = \"lots\"\n"),
    )
    .unwrap();
    let out = refused_mount(home.path(), Some(PASSPHRASE));
    let err = text(&out.stderr);
    assert!(err.contains("`redundancy` in "), "{err}");
    assert!(
        !err.contains("default."),
        "named by figment's profile: {err}"
    );
    // A PeerId that is none is refused at start too, not when the node starts.
    std::fs::write(
        home.path().join("config.toml"),
        format!("{original}accept_from = [\"nope\"]\n"),
    )
    .unwrap();
    let out = refused_mount(home.path(), Some(PASSPHRASE));
    assert_refused(&out, "`accept_from`: \"nope\" is not a PeerId");

    std::fs::write(home.path().join("config.toml"), &original).unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let out = run(
        fincrypt(home.path())
            .arg("mount")
            .arg(mnt.path())
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
            .env("FINCRYPT_REDUNDANCY", "many")
            .stdin(Stdio::null()),
        COMMAND_DEADLINE,
    );
    assert_refused(&out, "FINCRYPT_REDUNDANCY");
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn both_commands_read_the_working_directorys_env_and_no_parents() {
    let m = Mount::start(init_home());
    let user_home = tempfile::tempdir().unwrap();
    let project = tempfile::tempdir().unwrap();
    let project_dir = project.path().canonicalize().unwrap();
    std::fs::write(
        project_dir.join(".env"),
        format!("FINCRYPT_HOME={}\n", m.home().display()),
    )
    .unwrap();
    std::fs::create_dir(project_dir.join("sub")).unwrap();

    let ctl_bin = env!("CARGO_BIN_EXE_fincryptctl");
    let out = run(
        bare(ctl_bin, user_home.path(), &project_dir).args(["status", "--json"]),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // It reached the daemon of the home the .env names.
    assert_eq!(
        v["config_file"].as_str().map(PathBuf::from),
        Some(m.home().join("config.toml"))
    );
    // The daemon itself was started with no .env.
    let own = status(m.home());
    assert!(own["env_file"].is_null(), "{own}");

    // From a subdirectory the parent's .env is not read: the default home has no daemon.
    let out = run(
        bare(ctl_bin, user_home.path(), &project_dir.join("sub")).args(["status"]),
        COMMAND_DEADLINE,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no Fincrypt daemon is running"), "{err}");
    assert!(
        err.contains(&user_home.path().display().to_string()),
        "names the default home: {err}"
    );

    // fincrypt follows the same rule.
    let fin = env!("CARGO_BIN_EXE_fincrypt");
    let out = run(
        bare(fin, user_home.path(), &project_dir).arg("scrub"),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("by the running mount"),
        "{}",
        text(&out.stdout)
    );
    let out = run(
        bare(fin, user_home.path(), &project_dir.join("sub")).arg("scrub"),
        COMMAND_DEADLINE,
    );
    assert_refused(&out, &user_home.path().display().to_string());

    // A .env that cannot be read is an error, not ignored.
    std::fs::write(project_dir.join("sub/.env"), "this is not an assignment\n").unwrap();
    let out = run(
        bare(ctl_bin, user_home.path(), &project_dir.join("sub")).arg("status"),
        COMMAND_DEADLINE,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(".env"), "{}", text(&out.stderr));
    m.unmount();
}

#[test]
fn a_file_a_missing_path_or_a_non_empty_directory_is_refused_as_a_mount_point() {
    let home = init_home();
    let before = disk_state(home.path());

    let file = tempfile::NamedTempFile::new().unwrap();
    let out = refused_mount_at(home.path(), file.path(), &[], Some(PASSPHRASE));
    assert_refused(&out, "is not a directory");

    let gone = tempfile::tempdir().unwrap().path().join("gone");
    let out = refused_mount_at(home.path(), &gone, &[], Some(PASSPHRASE));
    assert_refused(&out, "does not exist");

    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("keep.txt"), b"mine").unwrap();
    let out = refused_mount_at(home.path(), full.path(), &[], Some(PASSPHRASE));
    assert_refused(&out, "is not empty");
    assert_refused(&out, "--nonempty");
    assert_eq!(
        std::fs::read(full.path().join("keep.txt")).unwrap(),
        b"mine"
    );
    assert_eq!(disk_state(home.path()), before, "refusals changed the home");

    // With --nonempty it mounts over the file, which is back afterwards.
    let m = Mount::start_on(
        home,
        full,
        StartOptions {
            args: vec!["--nonempty".into()],
            ..StartOptions::default()
        },
    );
    assert_eq!(std::fs::read_dir(m.path()).unwrap().count(), 0);
    let (_home, mnt) = m.unmount_keeping_mount_point();
    assert_eq!(std::fs::read(mnt.path().join("keep.txt")).unwrap(), b"mine");
}

#[test]
fn a_home_in_use_is_refused_with_the_pid_and_use_of_its_holder() {
    let m = Mount::start(init_home());
    let before = paths(m.home());
    let out = refused_mount(m.home(), Some(PASSPHRASE));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    let want = format!(
        "is in use by PID {} (mount on {})",
        m.pid(),
        m.path().display()
    );
    assert!(err.contains(&want), "wanted {want:?} in: {err}");
    assert!(!err.contains("Database"), "{err}");

    let out = run(
        fincrypt(m.home())
            .args([
                "serve",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--capacity",
                "1GiB",
            ])
            .stdin(Stdio::null()),
        COMMAND_DEADLINE,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    assert!(!m.home().join("held").exists());
    assert!(!m.home().join("node.key").exists());
    assert_eq!(paths(m.home()), before, "refusals added or removed files");
    m.unmount();
}

#[test]
fn a_dead_mount_is_named_with_the_command_that_clears_it() {
    let m = Mount::start(init_home());
    let (home, stale) = m.kill9_stale();
    let out = refused_mount_at(home.path(), &stale.path, &[], Some(PASSPHRASE));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    let want = format!("fusermount3 -u {}", stale.path.display());
    assert!(err.contains(&want), "wanted {want:?} in: {err}");
    // Once the user ran it, the home mounts again on the same place.
    let mnt = stale.unmount();
    let m = Mount::start_on(home, mnt, StartOptions::default());
    m.unmount();
}

#[test]
fn another_user_at_the_control_socket_is_told_permission_denied() {
    let m = Mount::start(init_home());
    let out = run(
        Command::new(env!("CARGO_BIN_EXE_fincryptctl"))
            .arg("--home")
            .arg(m.home())
            .arg("status")
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null()),
        COMMAND_DEADLINE,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("no Fincrypt daemon is running"), "{err}");
    m.unmount();
}

use std::os::unix::process::CommandExt;

/// Every file under `dir` is 0600 (sockets too) and every directory 0700.
fn assert_private(dir: &Path) {
    let top = std::fs::metadata(dir).unwrap().mode() & 0o7777;
    assert_eq!(top, 0o700, "{} is {top:o}", dir.display());
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.is_dir() {
                assert_eq!(mode, 0o700, "{} is {mode:o}", p.display());
                stack.push(p);
            } else {
                assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
            }
            seen += 1;
        }
    }
    assert!(seen > 3, "{} holds almost nothing", dir.display());
}

#[test]
fn under_umask_000_every_file_is_private() {
    let root = tempfile::tempdir().unwrap();
    let owner = root.path().join("owner");
    let node_home = root.path().join("node");

    let out = run(
        with_umask(
            Command::new(env!("CARGO_BIN_EXE_fincrypt"))
                .arg("--home")
                .arg(&owner)
                .arg("init")
                .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
                .stdin(Stdio::null()),
            0,
        ),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    set_config(&owner, "snapshot_interval", "0");
    set_config(&owner, "redundancy", "1");

    let node = serve_with(
        &node_home,
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "1GiB"],
        |c| {
            with_umask(c, 0);
        },
    );
    // The owner's home as a TempDir for Mount: moved into one of its own.
    let owner_dir = tempfile::tempdir().unwrap();
    std::fs::remove_dir(owner_dir.path()).unwrap();
    std::fs::rename(&owner, owner_dir.path()).unwrap();
    let mut opts = mount_opts(std::slice::from_ref(&node), &[]);
    opts.umask = Some(0);
    let m = Mount::start_with(owner_dir, opts);
    std::fs::write(m.path().join("f"), random_bytes(7, 300_000)).unwrap();
    let out = ctl(m.home(), &["sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // One node cannot hold the three copies metadata asks for, so not
    // `sync --replicated`: the file's blocks reaching it is enough here.
    wait_until("blocks on the node", Duration::from_secs(120), || {
        number(&status(&node_home), "held_blocks") > 0
    });
    // While running (the control sockets are there) and after.
    assert_private(m.home());
    assert_private(&node_home);
    let home = m.unmount();
    let (code, _) = node.stop();
    assert!(code.success());
    assert_private(home.path());
    assert_private(&node_home);
}

#[test]
fn the_mount_is_listed_as_fuse_from_its_home() {
    let m = Mount::start(init_home());
    // Root mounts by mount(2) itself, which only knows the type "fuse";
    // other users mount through fusermount3, which adds the subtype.
    let fstype = mounted_fstype(m.path()).unwrap();
    assert!(
        fstype == "fuse" || fstype == "fuse.fincrypt",
        "a FUSE mount: {fstype}"
    );
    let (source, options) = mount_source_and_options(m.path());
    assert_eq!(source, m.home().canonicalize().unwrap().to_str().unwrap());
    assert!(options.split(',').any(|o| o == "rw"), "{options}");
    m.unmount();
}

#[test]
fn a_read_only_mount_reads_and_refuses_every_change() {
    let m = Mount::start(init_home());
    let data = random_bytes(3, 100_000);
    std::fs::write(m.path().join("kept"), &data).unwrap();
    std::fs::create_dir(m.path().join("dir")).unwrap();
    let home = m.unmount();

    let m = Mount::start_with(
        home,
        StartOptions {
            args: vec!["--read-only".into()],
            ..StartOptions::default()
        },
    );
    let (_, options) = mount_source_and_options(m.path());
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    assert_same_bytes(
        "kept",
        &std::fs::read(m.path().join("kept")).unwrap(),
        &data,
    );
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    erofs(std::fs::write(m.path().join("new"), b"x"), "create");
    erofs(
        std::fs::OpenOptions::new()
            .append(true)
            .open(m.path().join("kept"))
            .map(drop),
        "open for writing",
    );
    erofs(std::fs::create_dir(m.path().join("d2")), "mkdir");
    erofs(std::fs::remove_file(m.path().join("kept")), "unlink");
    erofs(
        std::fs::rename(m.path().join("dir"), m.path().join("dir2")),
        "rename",
    );
    let home = m.unmount();
    let m = Mount::start(home);
    assert_same_bytes(
        "kept",
        &std::fs::read(m.path().join("kept")).unwrap(),
        &data,
    );
    assert!(!m.path().join("new").exists());
    m.unmount();
}

/// Log lines at `level` (WARN, ERROR) among `lines`.
fn at_level<'a>(lines: impl IntoIterator<Item = &'a String>, level: &str) -> Vec<&'a String> {
    lines
        .into_iter()
        .filter(|l| l.split_whitespace().nth(1) == Some(level) || l.contains(&format!(" {level} ")))
        .collect()
}

#[test]
fn a_first_node_and_a_clean_stop_log_no_warning_or_error() {
    let home = tempfile::tempdir().unwrap();
    let node = serve_with(
        home.path(),
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "1GiB"],
        |c| {
            c.env_remove("FINCRYPT_LOG");
        },
    );
    // Long enough for Kademlia's first refresh (half a second after
    // listening) to have happened: status answers once the node runs.
    wait_until("a status answer", Duration::from_secs(30), || {
        ctl(home.path(), &["status"]).status.success()
    });
    let mnt_home = init_home();
    let mut opts = mount_opts(&[], &[]);
    opts.env.clear();
    let m = Mount::start_with(mnt_home, opts);
    let (code, lines) = node.stop();
    assert!(code.success());
    assert!(at_level(&lines, "WARN").is_empty(), "{lines:#?}");
    assert!(at_level(&lines, "ERROR").is_empty(), "{lines:#?}");
    let err = m.stderr();
    let mount_lines: Vec<String> = err.lines().map(str::to_owned).collect();
    m.unmount();
    assert!(at_level(&mount_lines, "WARN").is_empty(), "{err}");
}

/// A TCP port on 127.0.0.1 bound but not listening: a dial there is
/// refused at once, and the port stays taken until this is dropped.
struct BoundPort {
    fd: libc::c_int,
    port: u16,
}

impl BoundPort {
    fn new() -> BoundPort {
        // SAFETY: plain socket calls on a descriptor this owns, with
        // buffers of the sizes given.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let bound = libc::bind(fd, (&raw const addr).cast(), len);
            assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
            let mut len = len;
            let named = libc::getsockname(fd, (&raw mut addr).cast(), &mut len);
            assert_eq!(named, 0, "getsockname: {}", std::io::Error::last_os_error());
            BoundPort {
                fd,
                port: u16::from_be(addr.sin_port),
            }
        }
    }
}

impl Drop for BoundPort {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this value's own, closed once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

#[test]
fn an_unreachable_bootstrap_peer_is_retried_and_shown_in_status() {
    // A port nothing listens on, kept bound (so dials are refused and no
    // other test's listener takes it) until the node below needs it.
    let held = BoundPort::new();
    let port = held.port;
    let addr = format!("/ip4/127.0.0.1/tcp/{port}");
    let m = Mount::start_with(
        init_home(),
        StartOptions {
            args: vec![
                "--listen".into(),
                "/ip4/127.0.0.1/tcp/0".into(),
                "--bootstrap".into(),
                addr.clone(),
            ],
            ..StartOptions::default()
        },
    );
    wait_until(
        "two dials of the bootstrap peer",
        Duration::from_secs(60),
        || {
            let v = status(m.home());
            v["bootstrap"][0]["attempts"].as_u64().unwrap_or(0) >= 2
        },
    );
    let v = status(m.home());
    let b = &v["bootstrap"][0];
    assert_eq!(b["addr"].as_str(), Some(addr.as_str()));
    assert_eq!(b["reached"].as_bool(), Some(false));
    assert!(b["unreachable_since"].as_u64().is_some(), "{b}");
    assert!(
        b["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{b}"
    );
    let text_status = ctl_ok(m.home(), &["status"]);
    assert!(
        text_status.contains(&addr) && text_status.contains("unreachable for"),
        "{text_status}"
    );
    // Only the first failure is a warning.
    let warns = m
        .stderr()
        .lines()
        .filter(|l| l.contains("cannot reach a bootstrap peer"))
        .count();
    assert_eq!(warns, 1, "{}", m.stderr());

    // A node that comes up there later is reached by the retries.
    let node_home = tempfile::tempdir().unwrap();
    drop(held);
    let node = serve(node_home.path(), &["--listen", &addr, "--capacity", "1GiB"]);
    wait_until(
        "the bootstrap peer reached",
        Duration::from_secs(120),
        || status(m.home())["bootstrap"][0]["reached"].as_bool() == Some(true),
    );
    assert!(number(&status(m.home()), "peers") >= 1);
    m.unmount();
    drop(node);
}

#[test]
fn a_capacity_below_a_block_or_negative_is_refused_with_a_reason() {
    for (arg, want) in [
        ("0", "at least 1MiB"),
        ("1", "at least 1MiB"),
        ("-1", "cannot be negative"),
        ("lots", "unknown unit"),
    ] {
        let home = tempfile::tempdir().unwrap();
        let out = run(
            fincrypt(home.path())
                .args([
                    "serve",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--capacity",
                    arg,
                ])
                .stdin(Stdio::null()),
            COMMAND_DEADLINE,
        );
        assert!(!out.status.success(), "--capacity {arg} was taken");
        assert!(
            text(&out.stderr).contains(want),
            "{arg}: {}",
            text(&out.stderr)
        );
        assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
    }
}

#[test]
fn a_storage_nodes_held_volume_is_scrubbed_offline_and_online() {
    let (node_homes, nodes, m) = network(1, &[]);
    set_config(m.home(), "redundancy", "1");
    std::fs::write(m.path().join("f"), random_bytes(11, 2_000_000)).unwrap();
    let out = ctl(m.home(), &["sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("blocks on the node", Duration::from_secs(120), || {
        number(&status(node_homes[0].path()), "held_blocks") > 0
    });
    let node_home = node_homes[0].path();
    let out = run(fincrypt(node_home).arg("scrub"), COMMAND_DEADLINE);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("by the running storage node"),
        "{}",
        text(&out.stdout)
    );
    let home = m.unmount();
    drop(home);
    let mut nodes = nodes;
    let (code, _) = nodes.pop().unwrap().stop();
    assert!(code.success());

    // Offline, and with one held block damaged.
    let files = regular_files(&node_home.join("held"));
    let victim = files
        .iter()
        .find(|p| {
            !p.to_string_lossy().contains("redb") && std::fs::metadata(p).unwrap().len() > 1000
        })
        .expect("a block file in the held volume");
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[500] ^= 0x55;
    std::fs::write(victim, &bytes).unwrap();
    let out = run(fincrypt(node_home).arg("scrub"), COMMAND_DEADLINE);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("held for peers: 1 corrupt"), "{stdout}");
}

/// `statvfs` of `path`: bytes available to its user.
fn available(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

/// A tmpfs of `size` on a temporary directory, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs of {size}");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_storage_node_on_a_small_disk_offers_and_takes_only_what_the_disk_holds() {
    const MIB: u64 = 1 << 20;
    let disk = SmallDisk::new("64m");
    let node_home = disk.0.path().join("node");
    let node = serve(
        &node_home,
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "1GiB"],
    );
    let v = status(&node_home);
    assert_eq!(number(&v, "capacity"), 1 << 30);
    let offered = number(&v, "offered");
    // 64 MiB less its reserve (16 MiB, the least) and what the node wrote.
    assert!(
        offered <= 48 * MIB && offered > 32 * MIB,
        "offered {offered} of a 64 MiB disk"
    );
    let text_status = ctl_ok(&node_home, &["status"]);
    assert!(text_status.contains("room on disk"), "{text_status}");

    // An owner with more to place than the disk can take.
    let m = Mount::start_with(init_home(), mount_opts(std::slice::from_ref(&node), &[]));
    std::fs::write(m.path().join("big"), random_bytes(13, 80 * MIB as usize)).unwrap();
    let out = ctl(m.home(), &["sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The owner places until the node has no room left for a block (puts
    // that race past the room it offers are refused as "full").
    wait_until(
        "the node to fill its disk",
        Duration::from_secs(240),
        || {
            let v = status(&node_home);
            number(&v, "offered").saturating_sub(number(&v, "held_bytes")) < 5 * MIB
        },
    );
    // It took what fitted and kept its reserve (16 MiB here, less at most
    // the blocks admitted together just before the limit).
    assert!(number(&status(&node_home), "held_bytes") > 16 * MIB);
    assert!(
        available(disk.0.path()) >= 8 * MIB,
        "the node left room on its disk: {} bytes",
        available(disk.0.path())
    );
    // The mount still works, and says why it is short.
    assert_eq!(
        std::fs::read(m.path().join("big")).unwrap().len(),
        80 * MIB as usize
    );
    assert!(number(&status(m.home()), "under_replicated") > 0);
    m.unmount();
    let (code, lines) = node.stop();
    assert!(code.success());
    // A refused put is logged once while the disk stays short, not per
    // block (none at all when every put kept within the room offered).
    let warnings = lines.iter().filter(|l| l.contains("nearly full")).count();
    assert!(
        warnings <= 1,
        "one warning at most while the disk stays short: {lines:#?}"
    );
}

#[test]
fn an_allocation_larger_than_the_disk_fails_with_enospc() {
    use std::os::fd::AsRawFd;
    let disk = SmallDisk::new("64m");
    let home = tempfile::tempdir_in(disk.0.path()).unwrap();
    init_home_in(&home);
    let m = Mount::start(home);
    let f = std::fs::File::create(m.path().join("f")).unwrap();
    // SAFETY: fallocate(2) on an open descriptor.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 30) };
    let e = std::io::Error::last_os_error();
    assert_eq!(rc, -1, "1 GiB allocated on a 64 MiB disk");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(
        f.metadata().unwrap().len(),
        0,
        "a failed allocation changes nothing"
    );
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 30) };
    assert_eq!(rc, -1, "1 GiB kept-size allocation on a 64 MiB disk");
    // What fits is allocated.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 4 << 20) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(f.metadata().unwrap().len(), 4 << 20);
    drop(f);
    m.unmount();
}

#[test]
fn a_node_with_accept_from_takes_blocks_only_from_those_peers() {
    let (home, owner) = home_with_peer_id();

    let peer_of = |s: &Served| s.addr.rsplit('/').next().unwrap().to_owned();
    let (friend_home, stranger_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let friend = serve(
        friend_home.path(),
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--capacity",
            "1GiB",
            "--accept-from",
            &owner,
        ],
    );
    // This one accepts only the other node.
    let stranger = serve(
        stranger_home.path(),
        &[
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--capacity",
            "1GiB",
            "--accept-from",
            &peer_of(&friend),
        ],
    );
    let nodes = [friend, stranger];
    let m = Mount::start_with(home, mount_opts(&nodes, &[]));
    std::fs::write(m.path().join("f"), random_bytes(17, 500_000)).unwrap();
    assert!(ctl(m.home(), &["sync"]).status.success());
    wait_until(
        "blocks on the accepting node",
        Duration::from_secs(120),
        || number(&status(friend_home.path()), "held_blocks") > 0,
    );
    // Both nodes were asked (redundancy 2 wants both); the other said no room.
    wait_for_note(
        m.home(),
        &[
            "2 of the closest peers found serve blocks, 1 of them with room",
            "1 of the closest peers found serve blocks, 0 of them with room",
        ],
    );
    assert_eq!(number(&status(stranger_home.path()), "held_blocks"), 0);

    let bad = run(
        fincrypt(tempfile::tempdir().unwrap().path())
            .args([
                "serve",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--capacity",
                "1GiB",
            ])
            .args(["--accept-from", "not-a-peer"]),
        COMMAND_DEADLINE,
    );
    assert_refused(&bad, "accept-from");
    m.unmount();
}

#[test]
fn a_snapshot_deleted_by_name_or_age_goes_and_frees_what_only_it_kept() {
    let m = Mount::start(init_home());
    std::fs::write(m.path().join("old"), random_bytes(19, 3_000_000)).unwrap();
    let first = ctl_ok(m.home(), &["snapshots", "create"]).trim().to_owned();
    std::fs::remove_file(m.path().join("old")).unwrap();
    std::fs::write(m.path().join("new"), b"kept").unwrap();
    let second = ctl_ok(m.home(), &["snapshots", "create"]).trim().to_owned();
    let listed = |m: &Mount| ctl_ok(m.home(), &["snapshots", "list"]);
    assert!(listed(&m).contains(&first) && listed(&m).contains(&second));

    // A name that is not there: refused, and nothing goes.
    let out = ctl(
        m.home(),
        &["snapshots", "delete", &first, "2001-01-01T00:00:00.000Z"],
    );
    assert_refused(&out, "no snapshot 2001-01-01");
    assert!(listed(&m).contains(&first));
    let out = ctl(m.home(), &["snapshots", "delete"]);
    assert!(!out.status.success(), "nothing named, no age");

    let before = number(&status(m.home()), "own_blocks");
    let out = ctl_ok(m.home(), &["snapshots", "delete", &first]);
    assert!(out.contains(&format!("deleted {first}")), "{out}");
    let after = number(&status(m.home()), "own_blocks");
    assert!(
        after < before,
        "the deleted file's blocks are freed: {before} -> {after}"
    );
    assert!(!listed(&m).contains(&first));
    assert!(!m.path().join(".snapshots").join(&first).exists());
    assert_eq!(
        std::fs::read(m.path().join(".snapshots").join(&second).join("new")).unwrap(),
        b"kept"
    );

    // By age: none is a day old; every one is older than zero seconds.
    let out = ctl_ok(m.home(), &["snapshots", "delete", "--older-than", "1d"]);
    assert!(out.contains("none deleted"), "{out}");
    let out = ctl(
        m.home(),
        &["snapshots", "delete", "--older-than", "3 fortnights"],
    );
    assert!(!out.status.success());
    // A bare number would be seconds, and delete almost everything.
    let out = ctl(m.home(), &["snapshots", "delete", "--older-than", "30"]);
    assert_refused(&out, "give a unit");
    assert!(listed(&m).contains(&second));
    wait_until(
        "the second snapshot to be older than a second",
        Duration::from_secs(10),
        || {
            let out = ctl_ok(m.home(), &["snapshots", "delete", "--older-than", "1s"]);
            out.contains(&format!("deleted {second}"))
        },
    );
    assert!(listed(&m).contains("no snapshots yet"));
    assert_eq!(std::fs::read(m.path().join("new")).unwrap(), b"kept");
    m.unmount();
}

#[test]
fn status_says_when_retained_snapshots_keep_a_lowered_redundancy() {
    let (_homes, _nodes, m) = network(
        1,
        &[
            ("FINCRYPT_REPLICATE_INTERVAL", "1"),
            ("FINCRYPT_PUBLISH_INTERVAL", "0"),
        ],
    );
    let dir = m.path().join("photos");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("p"), random_bytes(23, 200_000)).unwrap();
    let d = dir.to_str().unwrap();
    ctl_ok(m.home(), &["redundancy", "set", d, "4"]);
    let snap = ctl_ok(m.home(), &["snapshots", "create"]).trim().to_owned();
    ctl_ok(m.home(), &["redundancy", "set", d, "1"]);
    let highest = |m: &Mount| status(m.home())["redundancy_highest"].clone();
    wait_until(
        "a walk that sees the snapshot ask for 4",
        Duration::from_secs(60),
        || highest(&m) == serde_json::json!([4, 2]),
    );
    let text_status = ctl_ok(m.home(), &["status"]);
    assert!(
        text_status.contains("retained snapshots keep asking for 4"),
        "{text_status}"
    );
    ctl_ok(m.home(), &["snapshots", "delete", &snap]);
    wait_until("a walk without it", Duration::from_secs(60), || {
        highest(&m) == serde_json::json!([2, 2])
    });
    m.unmount();
}

/// Whether some process holds `home`'s lock.
fn home_in_use(home: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(home.join("lock")) else {
        return false;
    };
    // SAFETY: flock(2) on an open descriptor; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

#[test]
fn the_mount_helper_mounts_as_mount_8_calls_it_and_returns_once_up() {
    let home = init_home();
    let mnt = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let passfile = secrets.path().join("pass");
    let helper_run = |opts: &str| {
        run(
            Command::new(MOUNT_HELPER)
                .arg(home.path())
                .arg(mnt.path())
                .args(["-o", opts])
                .env("FINCRYPT_BIN", env!("CARGO_BIN_EXE_fincrypt"))
                .env_remove("FINCRYPT_PASSPHRASE")
                .stdin(Stdio::null()),
            COMMAND_DEADLINE,
        )
    };
    // A peer that is not there, to see the option reach the mount.
    let nowhere = format!(
        "/ip4/127.0.0.1/tcp/9/p2p/{}",
        fincrypt_net::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    );
    let opts = format!(
        "passfile={},ro,nonempty,allow_other,listen=/ip4/127.0.0.1/tcp/0,bootstrap={nowhere},\
         nofail,_netdev",
        passfile.display()
    );
    // Over a file, which nonempty allows.
    std::fs::write(mnt.path().join("under"), b"hidden").unwrap();

    // A passfile others can read is refused before anything starts.
    std::fs::write(&passfile, format!("{PASSPHRASE}\n")).unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = helper_run(&opts);
    assert_refused(&out, "chmod 600");
    assert!(!is_mounted(mnt.path()));

    // A wrong passphrase: the daemon's own message, and no mount.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&passfile, "not the passphrase\n").unwrap();
    let out = helper_run(&opts);
    assert_refused(&out, "passphrase");
    assert!(!is_mounted(mnt.path()));

    // The right one: mounted read-only when the helper returns.
    std::fs::write(&passfile, format!("{PASSPHRASE}\n")).unwrap();
    let out = helper_run(&opts);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(is_mounted(mnt.path()), "mounted once the helper returned");
    let (_, options) = mount_source_and_options(mnt.path());
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    let err = std::fs::write(mnt.path().join("f"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(home_in_use(home.path()));
    // The other options reached the daemon as its flags.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == mnt.path().to_str())
        .unwrap();
    assert!(line.contains("allow_other"), "{line}");
    let v = status(home.path());
    assert!(
        !v["listen_addrs"].as_array().unwrap().is_empty(),
        "listening: {v}"
    );
    assert_eq!(v["bootstrap"][0]["addr"].as_str(), Some(nowhere.as_str()));
    assert!(fusermount_ok(mnt.path()));
    assert_eq!(std::fs::read(mnt.path().join("under")).unwrap(), b"hidden");
    wait_until("the daemon to exit", Duration::from_secs(30), || {
        !home_in_use(home.path())
    });
    let bad = helper_run("passfile=/nonexistent,bogus");
    assert!(!bad.status.success());
}

/// Sets `/dev/fuse` to 0666 (as a desktop system has it) while any of these
/// lives, then back: this machine keeps it root's alone. Counted, so tests
/// running side by side do not close it under each other.
struct FuseOpenToAll;

/// Guards alive, and the mode `/dev/fuse` had before the first.
static FUSE_OPEN: std::sync::Mutex<(usize, u32)> = std::sync::Mutex::new((0, 0));

impl FuseOpenToAll {
    fn new() -> FuseOpenToAll {
        let mut open = FUSE_OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 == 0 {
            let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o777;
            std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode | 0o666))
                .unwrap();
            open.1 = mode;
        }
        open.0 += 1;
        FuseOpenToAll
    }
}

impl Drop for FuseOpenToAll {
    fn drop(&mut self) {
        let mut open = FUSE_OPEN.lock().unwrap_or_else(|p| p.into_inner());
        open.0 -= 1;
        if open.0 == 0 {
            let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(open.1));
        }
    }
}

/// An initialised home of an unprivileged user, a mount point of theirs
/// (named `mnt_name`) and a copy of `fincrypt` they can run, with
/// `/dev/fuse` open to them while it lives.
struct UserHome {
    _dir: tempfile::TempDir,
    _fuse: FuseOpenToAll,
    dir: PathBuf,
    bin: PathBuf,
    home: PathBuf,
    mnt: PathBuf,
}

impl UserHome {
    const NOBODY: u32 = 65534;

    fn new(mnt_name: &str) -> UserHome {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A copy the user can run, wherever the build is.
        let bin = dir.join("fincrypt");
        std::fs::copy(env!("CARGO_BIN_EXE_fincrypt"), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (home, mnt) = (dir.join("home"), dir.join(mnt_name));
        for d in [&home, &mnt] {
            std::fs::create_dir(d).unwrap();
            std::os::unix::fs::chown(d, Some(Self::NOBODY), Some(Self::NOBODY)).unwrap();
        }
        let u = UserHome {
            _dir: tmp,
            _fuse: FuseOpenToAll::new(),
            dir,
            bin,
            home,
            mnt,
        };
        let out = run(&mut u.fincrypt(&["init"]), COMMAND_DEADLINE);
        assert!(out.status.success(), "{}", text(&out.stderr));
        u
    }

    /// `fincrypt --home HOME ARGS`, run as the user.
    fn fincrypt(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--home")
            .arg(&self.home)
            .args(args)
            .env("HOME", &self.dir)
            .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
            .current_dir(&self.dir)
            .uid(Self::NOBODY)
            .gid(Self::NOBODY)
            .stdin(Stdio::null());
        c
    }

    /// Unmounts with `fusermount3 -u` and waits for the daemon to let go of the home.
    fn unmount(&self) {
        assert!(
            fusermount_ok(&self.mnt),
            "fusermount3 -u {}",
            self.mnt.display()
        );
        wait_until("the daemon to exit", Duration::from_secs(30), || {
            !home_in_use(&self.home)
        });
    }
}

/// `fusermount3 -u PATH` succeeded.
fn fusermount_ok(path: &Path) -> bool {
    Command::new("fusermount3")
        .arg("-u")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_users_mount_through_fusermount3_is_listed_as_fuse_fincrypt_from_its_home() {
    let u = UserHome::new("mnt");
    let mut daemon = u
        .fincrypt(&["mount", u.mnt.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (log, _) = drain(daemon.stderr.take().unwrap());
    wait_until("the user's mount", Duration::from_secs(60), || {
        mounted_fstype(&u.mnt).is_some()
    });
    assert_eq!(mounted_fstype(&u.mnt).as_deref(), Some("fuse.fincrypt"));
    let (source, _) = mount_source_and_options(&u.mnt);
    assert_eq!(source, u.home.to_str().unwrap());
    u.unmount();
    let status = wait_child(&mut daemon, Duration::from_secs(30)).expect("the daemon exits");
    assert!(status.success(), "{status}: {}", text(&log.lock().unwrap()));
}

#[test]
fn an_offline_scrub_of_a_damaged_owner_volume_says_how_to_repair_it() {
    let m = Mount::start(init_home());
    std::fs::write(m.path().join("f"), random_bytes(29, 1_000_000)).unwrap();
    let home = m.unmount();
    let blocks = regular_files(&home.path().join("volume").join("blocks"));
    let victim = blocks
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 1000)
        .expect("a block file");
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(victim, &bytes).unwrap();
    let out = run(fincrypt(home.path()).arg("scrub"), COMMAND_DEADLINE);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("1 corrupt"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("mount this home with its peers"),
        "{}",
        text(&out.stderr)
    );
}

/// The mount helper fstab and systemd units call.
const MOUNT_HELPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mount.fuse.fincrypt");

/// `out` failed, and its standard error says `wanted`.
fn assert_refused(out: &std::process::Output, wanted: &str) {
    assert!(!out.status.success(), "{wanted:?} refused");
    assert!(text(&out.stderr).contains(wanted), "{}", text(&out.stderr));
}

#[test]
fn the_mount_helper_runs_the_daemon_as_the_user_it_names_on_any_mount_point() {
    // A space in the mount point: mountinfo writes it as \040.
    let u = UserHome::new("my files");
    let passfile = u.dir.join("pass");
    std::fs::write(&passfile, PASSPHRASE).unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run(
        Command::new(MOUNT_HELPER)
            .arg(&u.home)
            .arg(&u.mnt)
            .arg("-o")
            .arg(format!(
                "setuid={},passfile={},user=me,defaults",
                UserHome::NOBODY,
                passfile.display()
            ))
            .env("FINCRYPT_BIN", &u.bin)
            .env_remove("FINCRYPT_PASSPHRASE")
            .stdin(Stdio::null()),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Through fusermount3, as the user: the subtype shows.
    assert_eq!(mounted_fstype(&u.mnt).as_deref(), Some("fuse.fincrypt"));
    assert_eq!(
        std::fs::metadata(u.home.join("lock")).unwrap().uid(),
        UserHome::NOBODY,
        "the home stays the user's"
    );
    u.unmount();
}

#[test]
fn a_mounts_holder_room_takes_blocks_only_from_its_accept_from() {
    let listen = || StartOptions {
        args: vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
        ..StartOptions::default()
    };
    let (friend_home, friend_peer) = home_with_peer_id();

    let host_home = init_home();
    set_config(host_home.path(), "holder_capacity", "104857600");
    set_config(
        host_home.path(),
        "accept_from",
        &format!("[\"{friend_peer}\"]"),
    );
    let host = Mount::start_with(host_home, listen());
    let host_addr = status(host.home())["listen_addrs"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let via_host = || StartOptions {
        args: vec![
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--bootstrap".into(),
            host_addr.clone(),
        ],
        ..StartOptions::default()
    };
    let stranger = Mount::start_with(init_home(), via_host());
    std::fs::write(stranger.path().join("s"), random_bytes(31, 300_000)).unwrap();
    assert!(ctl(stranger.home(), &["sync"]).status.success());
    // The host answered it with no room.
    wait_for_note(
        stranger.home(),
        &["1 of the closest peers found serve blocks, 0 of them with room"],
    );
    assert_eq!(number(&status(host.home()), "held_blocks"), 0);

    let friend = Mount::start_with(friend_home, via_host());
    std::fs::write(friend.path().join("f"), random_bytes(37, 300_000)).unwrap();
    assert!(ctl(friend.home(), &["sync"]).status.success());
    wait_until(
        "the friend's blocks on the host",
        Duration::from_secs(120),
        || number(&status(host.home()), "held_blocks") > 0,
    );
    friend.unmount();
    stranger.unmount();
    host.unmount();
}

/// A new home whose node key exists, and its PeerId: from a first start
/// that listens (the key is kept).
fn home_with_peer_id() -> (tempfile::TempDir, String) {
    let m = Mount::start_with(
        init_home(),
        StartOptions {
            args: vec!["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()],
            ..StartOptions::default()
        },
    );
    let peer = status(m.home())["peer_id"].as_str().unwrap().to_owned();
    (m.unmount(), peer)
}

/// Waits until the mount's replication note says one of `any`.
fn wait_for_note(home: &Path, any: &[&str]) {
    wait_until(
        &format!("a replication note saying {any:?}"),
        Duration::from_secs(120),
        || {
            status(home)["replication"]["note"]
                .as_str()
                .is_some_and(|n| any.iter().any(|a| n.contains(a)))
        },
    );
}

/// Bytes the filesystem under `dir` has allocated for everything below it.
fn allocated(dir: &Path) -> u64 {
    let mut sum = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            sum += md.blocks() * 512;
            if md.is_dir() {
                todo.push(e.path());
            }
        }
    }
    sum
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE: the offset, or the errno.
fn seek(f: &std::fs::File, offset: u64, whence: i32) -> Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let at = unsafe { libc::lseek(f.as_raw_fd(), offset as i64, whence) };
    if at < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(at as u64)
}

#[test]
fn holes_cost_nothing_whatever_their_size_and_seek_finds_them() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    const TIB: u64 = 1 << 40;
    let last = (1u64 << 63) - 2;
    let m = Mount::start(init_home());
    let path = m.path().join("sparse");
    let before = allocated(m.home());
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // A byte at 16 TiB (generic/308) and one at 2^63 - 2 (generic/525),
    // each made durable. Before holes were holes, the first took hours.
    f.write_all_at(b"x", 16 * TIB).unwrap();
    f.sync_all().unwrap();
    f.write_all_at(b"y", last).unwrap();
    f.sync_all().unwrap();
    let grown = allocated(m.home()).saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "the home grew by {grown} bytes for two bytes of data"
    );
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), last + 1);
    assert!(
        md.blocks() <= 16,
        "{} blocks for two bytes of data",
        md.blocks()
    );
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 16 * TIB).unwrap();
    assert_eq!(&b, b"x");
    f.read_exact_at(&mut b, last).unwrap();
    assert_eq!(&b, b"y");
    let mut zeros = vec![0xffu8; 64 << 10];
    f.read_exact_at(&mut zeros, 3 * TIB).unwrap();
    assert!(zeros.iter().all(|b| *b == 0), "a hole reads as zeros");

    // SEEK_DATA and SEEK_HOLE report the holes; the end is a hole, past it ENXIO.
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(16 * TIB));
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(&f, 16 * TIB, libc::SEEK_HOLE), Ok(16 * TIB + 1));
    assert_eq!(seek(&f, 16 * TIB + 1, libc::SEEK_DATA), Ok(last));
    assert_eq!(seek(&f, last, libc::SEEK_HOLE), Ok(last + 1));
    assert_eq!(seek(&f, last + 1, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(&f, last + 1, libc::SEEK_HOLE), Err(libc::ENXIO));
    drop(f);

    // xfstests' sparse case: 50 KB written at 1.6 MB counts 50 KB, not 1.6 MB,
    // before and after it is sealed.
    let small = m.path().join("small");
    let f = std::fs::File::create(&small).unwrap();
    f.write_all_at(&random_bytes(3, 50_000), 1_600_000).unwrap();
    for when in ["written", "fsynced"] {
        let used = f.metadata().unwrap().blocks() * 512;
        assert!(
            (50_000..100_000).contains(&used),
            "{used} bytes used once {when}"
        );
        f.sync_all().unwrap();
    }
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(1_600_000));
    drop(f);

    // A punched hole: its bytes read as zeros and stop counting, whatever
    // its size, and the data around it stays.
    let data = random_bytes(4, 8 << 20);
    let punched = m.path().join("punched");
    std::fs::write(&punched, &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&punched)
        .unwrap();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on an open descriptor.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, 1 << 20, 4 << 20) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    f.sync_all().unwrap();
    let mut want = data.clone();
    want[1 << 20..5 << 20].fill(0);
    assert!(
        std::fs::read(&punched).unwrap() == want,
        "the punched file reads back"
    );
    let used = f.metadata().unwrap().blocks() * 512;
    assert!(used <= 4 << 20, "{used} bytes used by 4 MiB of data");
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(1 << 20));
    assert_eq!(seek(&f, 1 << 20, libc::SEEK_DATA), Ok(5 << 20));
    drop(f);

    // All of it holds after a remount: the holes are in the file tree.
    let m = Mount::start(m.unmount());
    let f = std::fs::File::open(m.path().join("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), last + 1);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, last).unwrap();
    assert_eq!(&b, b"y");
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(16 * TIB));
    assert!(std::fs::read(m.path().join("punched")).unwrap() == want);
    drop(f);
    m.unmount();
}
