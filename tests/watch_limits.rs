//! A watched folder at the edges, alone in its test binary (it lowers the
//! machine's `fs.inotify.max_user_watches` while it runs): files the daemon
//! cannot read are reported and the rest backed up, and with inotify's
//! watches exhausted, rescans still back up every change. The daemon is
//! `fincrypt backup` (no mount), run as root without the capabilities that
//! let root read any file.

mod common;
#[path = "common/trees.rs"]
mod trees;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    COMMAND_DEADLINE, PASSPHRASE, ctl_ok, drain, fincrypt, init_home, run, set_config, text,
    wait_child, wait_until,
};
use trees::{differences, tree};

const LIMIT: &str = "/proc/sys/fs/inotify/max_user_watches";

/// Sets the inotify watch limit while it lives, and puts the old one back.
struct WatchLimit(String);

impl WatchLimit {
    fn set(n: u32) -> WatchLimit {
        let old = std::fs::read_to_string(LIMIT).unwrap();
        std::fs::write(LIMIT, n.to_string()).unwrap();
        WatchLimit(old.trim().to_owned())
    }
}

impl Drop for WatchLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(LIMIT, &self.0);
    }
}

/// Ends the daemon (SIGTERM) when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        if wait_child(&mut self.0, Duration::from_secs(60)).is_none() {
            let _ = self.0.kill();
        }
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

#[test]
fn unreadable_files_are_reported_and_rescans_back_up_every_change_when_watches_run_out() {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    std::fs::create_dir_all(s.join("sub/deeper")).unwrap();
    std::fs::write(s.join("readable"), b"kept").unwrap();
    std::fs::write(s.join("sub/deeper/also"), b"kept too").unwrap();
    std::fs::write(s.join("secret"), b"not for the daemon").unwrap();
    chmod(&s.join("secret"), 0o000);
    std::fs::create_dir(s.join("locked")).unwrap();
    std::fs::write(s.join("locked/inner"), b"hidden").unwrap();
    chmod(&s.join("locked"), 0o000);

    let home = init_home();
    set_config(home.path(), "watch_rescan", "2");
    let out = run(
        fincrypt(home.path())
            .arg("watch")
            .arg(s)
            .args(["--name", "edge"]),
        COMMAND_DEADLINE,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let _limit = WatchLimit::set(1);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--bounding-set=-dac_override,-dac_read_search",
        "--",
        env!("CARGO_BIN_EXE_fincrypt"),
        "--home",
    ])
    .arg(home.path())
    .arg("backup")
    .env("FINCRYPT_PASSPHRASE", PASSPHRASE)
    .current_dir(home.path())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("setpriv fincrypt backup");
    let (log, _) = drain(child.stderr.take().unwrap());
    let _daemon = Daemon(child);
    let log = || text(&log.lock().unwrap());

    let status = || -> serde_json::Value {
        let out = ctl_ok(home.path(), &["watch", "status", "--json"]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()[0].clone()
    };
    wait_until(
        "the backup daemon's control socket",
        COMMAND_DEADLINE,
        || {
            common::ctl(home.path(), &["watch", "status", "--json"])
                .status
                .success()
        },
    );
    let mut f = serde_json::Value::Null;
    wait_until("a first scan", COMMAND_DEADLINE, || {
        f = status();
        f["scans"].as_u64() >= Some(1)
    });
    assert_eq!(f["driver"], "rescans", "watches ran out: {f}\n{}", log());
    assert!(
        f["driver_note"]
            .as_str()
            .unwrap()
            .contains("max_user_watches"),
        "{f}"
    );
    let errors = f["errors"].to_string();
    assert_eq!(f["error_count"], 2, "{f}");
    assert!(
        errors.contains("\"secret\"") && errors.contains("\"locked\""),
        "{f}"
    );
    assert!(errors.contains("Permission denied"), "{f}");
    assert!(log().contains("secret"), "the log names it: {}", log());

    // What the copy should be: the source without what cannot be read.
    let want = || {
        let mut t = tree(s);
        t.entries.remove(Path::new("secret"));
        t.entries.remove(Path::new("locked/inner"));
        t.links.remove(Path::new("secret"));
        t.links.remove(Path::new("locked/inner"));
        t
    };
    let check = |what: &str| {
        let mut last = Vec::new();
        let ok = (|| {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                let out = tempfile::tempdir().unwrap();
                let dest = out.path().join("r");
                let r = run(
                    fincrypt(home.path()).args(["restore", "edge"]).arg(&dest),
                    COMMAND_DEADLINE,
                );
                assert!(r.status.success(), "restore: {}", text(&r.stderr));
                last = differences(&tree(&dest), &want());
                if last.is_empty() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            false
        })();
        assert!(ok, "{what}: the backup differs: {last:?}");
    };
    check("the first backup");
    std::fs::write(s.join("sub/deeper/also"), b"edited").unwrap();
    check("an edit");
    std::fs::create_dir(s.join("sub/new")).unwrap();
    std::fs::write(s.join("sub/new/file"), b"new").unwrap();
    check("a new directory and file");
    std::fs::remove_file(s.join("readable")).unwrap();
    check("a delete");
    std::fs::rename(s.join("sub"), s.join("moved")).unwrap();
    check("a rename");
    chmod(&s.join("locked"), 0o755);
    chmod(&s.join("secret"), 0o644);
}
