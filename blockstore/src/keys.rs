//! The master secret, its recovery phrase, the keys derived from it, and the
//! passphrase-wrapped key file that keeps it on disk.

use std::fs;
use std::io::Write;
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::Error;

/// Version of the key file format (docs/FORMATS.md, "Key file").
pub const KEY_FILE_VERSION: u32 = 1;
const KEY_FILE_AAD: &[u8] = b"fincrypt key file v1";

/// Argon2id cost used for new key files: 64 MiB, 3 passes (RFC 9106's second recommendation, one lane).
pub const ARGON2_M_COST_KIB: u32 = 64 * 1024;
/// Argon2id passes for new key files.
pub const ARGON2_T_COST: u32 = 3;

/// The 256-bit secret everything else is derived from; shown once as 24 words.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterSecret([u8; 32]);

impl MasterSecret {
    /// A fresh secret from the operating system's random source.
    pub fn generate() -> MasterSecret {
        let mut s = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut s);
        MasterSecret(s)
    }

    /// The 24-word BIP39 (English) recovery phrase for this secret.
    pub fn to_phrase(&self) -> String {
        // 32 bytes of entropy is always a valid BIP39 length.
        match bip39::Mnemonic::from_entropy(&self.0) {
            Ok(m) => m.to_string(),
            Err(_) => unreachable!("32 bytes is a valid BIP39 entropy length"),
        }
    }

    /// Parses a recovery phrase; words are case-insensitive and separated by any white space.
    pub fn from_phrase(phrase: &str) -> Result<MasterSecret, Error> {
        let words: Vec<String> = phrase.split_whitespace().map(str::to_lowercase).collect();
        if words.len() != 24 {
            return Err(Error::Phrase(format!(
                "a recovery phrase is 24 words; this one has {}",
                words.len()
            )));
        }
        let m = bip39::Mnemonic::parse_normalized(&words.join(" ")).map_err(|e| {
            Error::Phrase(match e {
                bip39::Error::UnknownWord(i) => format!(
                    "word {} ({:?}) is not in the BIP39 English word list",
                    i + 1,
                    words.get(i).map_or("", String::as_str)
                ),
                bip39::Error::InvalidChecksum => "the 24 words are valid but their checksum is not: a word is wrong, or two are swapped".into(),
                other => other.to_string(),
            })
        })?;
        let (entropy, len) = m.to_entropy_array();
        if len != 32 {
            return Err(Error::Phrase(format!(
                "expected 24 words, got {}",
                m.word_count()
            )));
        }
        let mut s = [0u8; 32];
        s.copy_from_slice(&entropy[..32]);
        Ok(MasterSecret(s))
    }

    /// Derives the working keys.
    pub fn keys(&self) -> Keys {
        let hk = Hkdf::<Sha256>::new(Some(b"fincrypt v1"), &self.0);
        let mut k = Keys {
            content: [0; 32],
            metadata: [0; 32],
            signing: [0; 32],
            chunker_seed: 0,
        };
        let mut seed = [0u8; 8];
        // Output lengths here are far below HKDF's limit, so expand cannot fail.
        for (info, out) in [
            (&b"content"[..], &mut k.content[..]),
            (b"metadata", &mut k.metadata[..]),
            (b"signing", &mut k.signing[..]),
            (b"chunker", &mut seed[..]),
        ] {
            if hk.expand(info, out).is_err() {
                unreachable!("HKDF output length is valid");
            }
        }
        k.chunker_seed = u64::from_le_bytes(seed);
        k
    }
}

/// Keys derived from the master secret. None of them ever leaves the machine.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Keys {
    /// Keys convergent encryption: block key = BLAKE3-keyed(content, kind || plaintext).
    pub content: [u8; 32],
    /// Encrypts live metadata kept on the local disk.
    pub metadata: [u8; 32],
    /// Seed of the owner's signing key (root records, manifests).
    pub signing: [u8; 32],
    /// Seeds the chunker's gear table so chunk boundaries do not fingerprint content.
    pub chunker_seed: u64,
}

impl Keys {
    /// The key that seals the root pointer inside the owner's published
    /// root records (docs/FORMATS.md, "Root record").
    pub fn root_record_key(&self) -> [u8; 32] {
        blake3::derive_key("fincrypt root record pointer v1", &self.metadata)
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// The master secret wrapped by a passphrase, as stored in `key.toml`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyFile {
    /// Format version; see [`KEY_FILE_VERSION`].
    pub version: u32,
    /// Always "argon2id".
    pub kdf: String,
    /// Argon2 memory cost in KiB.
    pub m_cost_kib: u32,
    /// Argon2 passes.
    pub t_cost: u32,
    /// Argon2 lanes.
    pub p_cost: u32,
    /// 16 random bytes, hex.
    pub salt: String,
    /// 12 random bytes, hex.
    pub nonce: String,
    /// AES-256-GCM-SIV ciphertext of the master secret with its tag, hex.
    pub wrapped: String,
}

impl KeyFile {
    /// Wraps `secret` under `passphrase` with fresh salt and nonce.
    pub fn wrap(secret: &MasterSecret, passphrase: &str) -> Result<KeyFile, Error> {
        KeyFile::wrap_with_cost(secret, passphrase, ARGON2_M_COST_KIB, ARGON2_T_COST)
    }

    /// As [`KeyFile::wrap`], with an explicit Argon2 cost (tests use a small one).
    pub fn wrap_with_cost(
        secret: &MasterSecret,
        passphrase: &str,
        m_cost_kib: u32,
        t_cost: u32,
    ) -> Result<KeyFile, Error> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut file = KeyFile {
            version: KEY_FILE_VERSION,
            kdf: "argon2id".into(),
            m_cost_kib,
            t_cost,
            p_cost: 1,
            salt: hex::encode(salt),
            nonce: hex::encode(nonce),
            wrapped: String::new(),
        };
        let kek = file.kek(passphrase)?;
        let cipher = Aes256GcmSiv::new_from_slice(&kek[..]).map_err(|_| Error::Crypto)?;
        let ct = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &secret.0,
                    aad: KEY_FILE_AAD,
                },
            )
            .map_err(|_| Error::Crypto)?;
        file.wrapped = hex::encode(ct);
        Ok(file)
    }

    /// Recovers the master secret; a wrong passphrase is [`Error::WrongPassphrase`].
    pub fn unwrap(&self, passphrase: &str) -> Result<MasterSecret, Error> {
        if self.version != KEY_FILE_VERSION || self.kdf != "argon2id" {
            return Err(Error::Format(format!(
                "key file version {} / kdf {:?} is not supported",
                self.version, self.kdf
            )));
        }
        let nonce = decode_fixed::<12>(&self.nonce, "nonce")?;
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| Error::Format("key file: wrapped key is not hex".into()))?;
        let kek = self.kek(passphrase)?;
        let cipher = Aes256GcmSiv::new_from_slice(&kek[..]).map_err(|_| Error::Crypto)?;
        let mut plain = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &wrapped,
                    aad: KEY_FILE_AAD,
                },
            )
            .map_err(|_| Error::WrongPassphrase)?;
        if plain.len() != 32 {
            plain.zeroize();
            return Err(Error::Format(
                "key file: wrapped key has the wrong length".into(),
            ));
        }
        let mut s = [0u8; 32];
        s.copy_from_slice(&plain);
        plain.zeroize();
        Ok(MasterSecret(s))
    }

    fn kek(&self, passphrase: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, Error> {
        let salt = decode_fixed::<16>(&self.salt, "salt")?;
        // Refuse absurd costs from a damaged or hostile file rather than allocate them.
        if self.m_cost_kib > 4 * 1024 * 1024
            || self.t_cost > 100
            || self.p_cost == 0
            || self.p_cost > 16
        {
            return Err(Error::Format("key file: Argon2 cost out of range".into()));
        }
        let params = argon2::Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::Format(format!("key file: Argon2 parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = zeroize::Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, &mut out[..])
            .map_err(|e| Error::Format(format!("key file: Argon2: {e}")))?;
        Ok(out)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<KeyFile, Error> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Format(format!("{}: {e}", path.display())))
    }

    /// Writes the key file atomically (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let text = toml::to_string(self).map_err(|e| Error::Format(e.to_string()))?;
        write_atomic(path, text.as_bytes())
    }
}

/// Replaces `path` with `data` so that a crash leaves either the old or the new file.
///
/// The file is private to its owner (0600) from its creation: it holds keys.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    // A temp file left by a crash may have any mode: start afresh.
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn decode_fixed<const N: usize>(s: &str, what: &str) -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| Error::Format(format!("key file: {what} is not {N} hex bytes")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_written_private_also_over_a_public_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.toml");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic(&path, b"new").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn phrase_round_trips_and_has_24_words() {
        let s = MasterSecret::generate();
        let phrase = s.to_phrase();
        assert_eq!(phrase.split(' ').count(), 24);
        let back = MasterSecret::from_phrase(&format!("  {}\n", phrase.to_uppercase())).unwrap();
        assert_eq!(back.0, s.0);
    }

    #[test]
    fn bad_phrases_are_refused() {
        assert!(matches!(
            MasterSecret::from_phrase("abandon abandon"),
            Err(Error::Phrase(_))
        ));
        let s = MasterSecret::generate().to_phrase();
        let mut words: Vec<&str> = s.split(' ').collect();
        words.swap(0, 1);
        // Swapping words almost always breaks the checksum; a 12-word phrase never fits.
        let twelve = bip39::Mnemonic::generate(12).unwrap().to_string();
        assert!(MasterSecret::from_phrase(&twelve).is_err());
        let _ = MasterSecret::from_phrase(&words.join(" "));
    }

    #[test]
    fn wrap_unwrap_and_wrong_passphrase() {
        let s = MasterSecret::generate();
        let f = KeyFile::wrap_with_cost(&s, "correct horse", 256, 1).unwrap();
        assert_eq!(f.unwrap("correct horse").unwrap().0, s.0);
        assert!(matches!(
            f.unwrap("wrong horse"),
            Err(Error::WrongPassphrase)
        ));
        let mut tampered = f.clone();
        tampered.wrapped.replace_range(0..2, "00");
        assert!(tampered.unwrap("correct horse").is_err());
    }

    #[test]
    fn derived_keys_differ_and_are_stable() {
        let s = MasterSecret::generate();
        let (a, b) = (s.keys(), s.keys());
        assert_eq!(a.content, b.content);
        assert_ne!(a.content, a.metadata);
        assert_ne!(a.content, a.signing);
        assert_ne!(MasterSecret::generate().keys().content, a.content);
    }
}
