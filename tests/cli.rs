//! The `fincrypt` command line as a new user meets it: init, wrong passphrases, recovery.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn fincrypt(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fincrypt"));
    cmd.arg("--home")
        .arg(home)
        .args(args)
        .env_remove("FINCRYPT_PASSPHRASE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Every file under `dir` with its bytes and modification time.
fn snapshot(dir: &Path) -> BTreeMap<std::path::PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let meta = std::fs::metadata(&p).unwrap();
                out.insert(
                    p.clone(),
                    (std::fs::read(&p).unwrap(), meta.modified().unwrap()),
                );
            }
        }
    }
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_shows_a_24_word_phrase_once_and_refuses_to_run_twice() {
    let home = tempfile::tempdir().unwrap();
    let out = fincrypt(
        home.path(),
        &["init"],
        &[("FINCRYPT_PASSPHRASE", "pass one")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let phrase = String::from_utf8(out.stdout).unwrap();
    assert_eq!(phrase.split_whitespace().count(), 24, "{phrase}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(home.path().join("key.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key file is private");
    assert!(
        !std::fs::read_to_string(home.path().join("key.toml"))
            .unwrap()
            .contains(phrase.trim())
    );

    let again = fincrypt(
        home.path(),
        &["init"],
        &[("FINCRYPT_PASSPHRASE", "pass two")],
    );
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already"), "{}", stderr(&again));

    let scrub = fincrypt(home.path(), &["scrub"], &[]);
    assert!(scrub.status.success(), "{}", stderr(&scrub));
    assert!(String::from_utf8_lossy(&scrub.stdout).contains("checked 0 blocks"));
}

#[test]
fn a_wrong_passphrase_is_named_and_changes_nothing() {
    let home = tempfile::tempdir().unwrap();
    assert!(
        fincrypt(home.path(), &["init"], &[("FINCRYPT_PASSPHRASE", "right")])
            .status
            .success()
    );
    let before = snapshot(home.path());
    let out = fincrypt(
        home.path(),
        &["passwd"],
        &[
            ("FINCRYPT_PASSPHRASE", "wrong"),
            ("FINCRYPT_NEW_PASSPHRASE", "other"),
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("passphrase"), "{}", stderr(&out));
    assert_eq!(
        snapshot(home.path()),
        before,
        "a failed unlock touched no file"
    );

    let out = fincrypt(
        home.path(),
        &["passwd"],
        &[
            ("FINCRYPT_PASSPHRASE", "right"),
            ("FINCRYPT_NEW_PASSPHRASE", "new"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = fincrypt(
        home.path(),
        &["passwd"],
        &[
            ("FINCRYPT_PASSPHRASE", "right"),
            ("FINCRYPT_NEW_PASSPHRASE", "x"),
        ],
    );
    assert!(
        !out.status.success(),
        "the old passphrase no longer unlocks"
    );
}

#[test]
fn without_a_passphrase_or_terminal_init_explains_itself() {
    let home = tempfile::tempdir().unwrap();
    let out = fincrypt(home.path(), &["init"], &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("FINCRYPT_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
    assert!(!home.path().join("key.toml").exists());
}

#[test]
fn the_recovery_phrase_brings_back_the_same_keys() {
    let a = tempfile::tempdir().unwrap();
    let out = fincrypt(
        a.path(),
        &["init"],
        &[("FINCRYPT_PASSPHRASE", "first machine")],
    );
    let phrase = String::from_utf8(out.stdout).unwrap();

    let b = tempfile::tempdir().unwrap();
    let bad = fincrypt(
        b.path(),
        &["recover"],
        &[
            ("FINCRYPT_RECOVERY_PHRASE", "abandon ability able"),
            ("FINCRYPT_PASSPHRASE", "p"),
        ],
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("recovery phrase"), "{}", stderr(&bad));

    let out = fincrypt(
        b.path(),
        &["recover"],
        &[
            ("FINCRYPT_RECOVERY_PHRASE", phrase.trim()),
            ("FINCRYPT_PASSPHRASE", "second machine"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    use fincrypt::config::Home;
    let (_, ka) =
        fincrypt::secrets::unlock(&Home::resolve(Some(a.path())).unwrap(), "first machine")
            .unwrap();
    let (_, kb) =
        fincrypt::secrets::unlock(&Home::resolve(Some(b.path())).unwrap(), "second machine")
            .unwrap();
    assert_eq!(ka.content, kb.content);
    assert_eq!(ka.signing, kb.signing);
}
