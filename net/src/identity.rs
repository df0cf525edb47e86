//! The node key: an ed25519 key pair whose public half is the node's PeerId.
//!
//! Kept in one file so the PeerId stays the same across restarts (holders
//! record placers by PeerId). Format (docs/FORMATS.md, "Node key"): the magic
//! `FCNK`, a version byte (1), then the 32-byte ed25519 secret. The file is
//! created with mode 0600, written to a temporary name, fsynced and renamed,
//! so a crash never leaves half a key.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::Error;

const MAGIC: &[u8; 4] = b"FCNK";
/// Version of the node key file format.
pub const KEY_VERSION: u8 = 1;
const FILE_LEN: usize = 4 + 1 + 32;

/// Loads the node key at `path`, or creates one there if there is no file.
pub fn load_or_create_keypair(path: &Path) -> Result<Keypair, Error> {
    match fs::File::open(path) {
        Ok(file) => read_keypair(path, file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_keypair(path),
        Err(e) => Err(key_io(path, e)),
    }
}

fn key_io(path: &Path, source: std::io::Error) -> Error {
    Error::KeyIo {
        path: path.to_path_buf(),
        source,
    }
}

fn read_keypair(path: &Path, file: fs::File) -> Result<Keypair, Error> {
    let mode = file
        .metadata()
        .map_err(|e| key_io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "the node key is readable by other users; chmod 600 it"
        );
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    // Read one byte more than a key file has, to notice a longer file.
    file.take(FILE_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| key_io(path, e))?;
    let format = |reason: &str| Error::KeyFormat {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() != FILE_LEN || &bytes[..4] != MAGIC {
        return Err(format("not a Fincrypt node key file"));
    }
    if bytes[4] != KEY_VERSION {
        return Err(format(&format!(
            "node key version {} is not supported (this program reads version {KEY_VERSION})",
            bytes[4]
        )));
    }
    let mut secret = Zeroizing::new([0u8; 32]);
    secret.copy_from_slice(&bytes[5..]);
    Keypair::ed25519_from_bytes(&mut secret[..]).map_err(|e| format(&e.to_string()))
}

fn create_keypair(path: &Path) -> Result<Keypair, Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| key_io(dir, e))?;
    let mut secret = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut secret[..]);
    let mut contents = Zeroizing::new(Vec::with_capacity(FILE_LEN));
    contents.extend_from_slice(MAGIC);
    contents.push(KEY_VERSION);
    contents.extend_from_slice(&secret[..]);

    let tmp = tmp_path(path);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&contents)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(key_io(&tmp, e));
    }
    // Two nodes starting at once on one directory: the first key wins and
    // both use it, so the PeerId is still one.
    if let Err(e) = fs::hard_link(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return load_or_create_keypair(path);
        }
        return Err(key_io(path, e));
    }
    let _ = fs::remove_file(&tmp);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| key_io(dir, e))?;
    tracing::info!(path = %path.display(), "created a new node key");
    Keypair::ed25519_from_bytes(&mut secret[..]).map_err(|e| Error::KeyFormat {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_reloads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = load_or_create_keypair(&path).unwrap();
        let b = load_or_create_keypair(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&path).unwrap().len(), FILE_LEN);
        // Nothing but the key is left in the directory.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_or_create_keypair(&path).unwrap();
        let good = fs::read(&path).unwrap();

        fs::write(&path, &good[..FILE_LEN - 1]).unwrap();
        assert!(matches!(
            load_or_create_keypair(&path),
            Err(Error::KeyFormat { .. })
        ));

        let mut longer = good.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        assert!(matches!(
            load_or_create_keypair(&path),
            Err(Error::KeyFormat { .. })
        ));

        let mut future = good.clone();
        future[4] = 2;
        fs::write(&path, &future).unwrap();
        let err = load_or_create_keypair(&path).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
    }
}
