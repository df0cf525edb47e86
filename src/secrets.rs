//! Creating, recovering and unlocking the master secret, and asking for passphrases.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, Result, bail};
use fincrypt_blockstore::{Error as StoreError, KeyFile, Keys, MasterSecret};

use crate::config::{Config, Home};

/// Environment variable holding the passphrase, for scripts and tests.
pub const PASSPHRASE_VAR: &str = "FINCRYPT_PASSPHRASE";
/// Environment variable holding a new passphrase for `passwd`.
pub const NEW_PASSPHRASE_VAR: &str = "FINCRYPT_NEW_PASSPHRASE";
/// Environment variable holding the recovery phrase for `recover`.
pub const PHRASE_VAR: &str = "FINCRYPT_RECOVERY_PHRASE";

/// Creates a new identity under `home`; returns the recovery phrase to show once.
pub fn init(home: &Home, passphrase: &str) -> Result<String> {
    let secret = MasterSecret::generate();
    install(home, &secret, passphrase)?;
    Ok(secret.to_phrase())
}

/// Recreates the key file of an identity from its recovery phrase.
pub fn recover(home: &Home, phrase: &str, passphrase: &str) -> Result<()> {
    let secret = MasterSecret::from_phrase(phrase)?;
    install(home, &secret, passphrase)
}

fn install(home: &Home, secret: &MasterSecret, passphrase: &str) -> Result<()> {
    refuse_initialised(home)?;
    install_key_file(home, &KeyFile::wrap(secret, passphrase)?)
}

/// Writes a key file already wrapped (recovery wraps it while it fetches)
/// and, if there is none, the default config.
pub fn install_key_file(home: &Home, file: &KeyFile) -> Result<()> {
    refuse_initialised(home)?;
    for dir in [&home.config_dir, &home.data_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    restrict(&home.config_dir, 0o700)?;
    restrict(&home.data_dir, 0o700)?;
    file.save(&home.key_file())?;
    restrict(&home.key_file(), 0o600)?;
    if !home.config_file().exists() {
        std::fs::write(home.config_file(), Config::default_file())
            .with_context(|| format!("writing {}", home.config_file().display()))?;
    }
    Ok(())
}

fn refuse_initialised(home: &Home) -> Result<()> {
    if home.is_initialised() {
        bail!(
            "{} already holds a Fincrypt key ({}); refusing to overwrite it",
            home.config_dir.display(),
            home.key_file().display()
        );
    }
    Ok(())
}

/// Unlocks the identity of `home`; a wrong passphrase is an error that says so.
pub fn unlock(home: &Home, passphrase: &str) -> Result<(MasterSecret, Keys)> {
    if !home.is_initialised() {
        bail!(not_initialised(home));
    }
    let file = KeyFile::load(&home.key_file())?;
    match file.unwrap(passphrase) {
        Ok(secret) => {
            let keys = secret.keys();
            Ok((secret, keys))
        }
        Err(StoreError::WrongPassphrase) => {
            bail!(
                "wrong passphrase: it does not unlock {}",
                home.key_file().display()
            )
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces the passphrase that wraps the key; nothing changes unless `old` is right.
pub fn change_passphrase(home: &Home, old: &str, new: &str) -> Result<()> {
    let (secret, _) = unlock(home, old)?;
    KeyFile::wrap(&secret, new)?.save(&home.key_file())?;
    Ok(())
}

/// The message for a home that has no key yet.
pub fn not_initialised(home: &Home) -> String {
    format!(
        "no Fincrypt identity in {}: run `fincrypt{} init` first (or `recover` with your recovery phrase)",
        home.config_dir.display(),
        if home.config_dir == home.data_dir {
            format!(" --home {}", home.config_dir.display())
        } else {
            String::new()
        }
    )
}

/// The passphrase from `var`, or asked at the terminal (twice when `confirm`).
pub fn passphrase(var: &str, prompt: &str, confirm: bool) -> Result<String> {
    if let Ok(p) = std::env::var(var) {
        if p.is_empty() {
            bail!("{var} is set but empty; a passphrase must not be empty");
        }
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set {var} or run at a terminal");
    }
    let p = rpassword::prompt_password(prompt).context("reading the passphrase")?;
    if p.is_empty() {
        bail!("a passphrase must not be empty");
    }
    if confirm && rpassword::prompt_password("Repeat it: ").context("reading the passphrase")? != p
    {
        bail!("the two passphrases differ");
    }
    Ok(p)
}

/// Words in a recovery phrase.
const PHRASE_WORDS: usize = 24;

/// The recovery phrase from [`PHRASE_VAR`] or standard input, read line by
/// line until it holds 24 words (or input ends): one line, one word per
/// line, or anything between.
pub fn recovery_phrase() -> Result<String> {
    if let Ok(p) = std::env::var(PHRASE_VAR) {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Type the 24 words of your recovery phrase (on one line or several):");
    }
    read_phrase(&mut std::io::stdin().lock())
}

fn read_phrase(input: &mut impl BufRead) -> Result<String> {
    let mut phrase = String::new();
    while phrase.split_whitespace().count() < PHRASE_WORDS {
        let mut line = String::new();
        let n = input
            .read_line(&mut line)
            .context("reading the recovery phrase")?;
        if n == 0 {
            break;
        }
        phrase.push(' ');
        phrase.push_str(&line);
    }
    Ok(phrase)
}

fn restrict(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phrase_is_read_over_as_many_lines_as_it_takes_and_no_further() {
        let words: Vec<String> = (0..24).map(|i| format!("w{i}")).collect();
        let one_per_line = format!("{}\nafter\n", words.join("\n"));
        let got = read_phrase(&mut one_per_line.as_bytes()).unwrap();
        assert_eq!(got.split_whitespace().collect::<Vec<_>>(), words);
        let two_lines = format!(
            "{}\n{}\nafter\n",
            words[..10].join(" "),
            words[10..].join("  ")
        );
        let got = read_phrase(&mut two_lines.as_bytes()).unwrap();
        assert_eq!(got.split_whitespace().count(), 24);
        // Input that ends early gives what there was (the parser then says how many).
        let got = read_phrase(&mut "a b c".as_bytes()).unwrap();
        assert_eq!(got.split_whitespace().count(), 3);
    }
}
