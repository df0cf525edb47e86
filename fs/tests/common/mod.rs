//! What the filesystem's tests share.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use fincrypt_blockstore::{BlockStore, Keys, LocalStore, StoreOptions, TreeParams};
use fincrypt_fs::{Fossil, Meta};

/// The filesystem kept in `dir` (its volume and metadata), opened with `keys`.
pub fn mount(dir: &Path, keys: &Keys) -> Fossil {
    let store: Arc<dyn BlockStore> =
        Arc::new(LocalStore::open(&dir.join("volume"), StoreOptions::default()).unwrap());
    let meta = Meta::open(&dir.join("meta.redb"), keys, 0, 0).unwrap();
    Fossil::new(
        meta,
        store,
        keys.clone(),
        TreeParams::default(),
        dir.to_path_buf(),
    )
    .unwrap()
}

/// Every byte of file `ino`.
pub fn read_all(fs: &Fossil, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size as usize;
    let mut out = Vec::new();
    while out.len() < size {
        let got = fs.read(ino, out.len() as u64, 1 << 20).unwrap();
        assert!(!got.is_empty(), "short at {}", out.len());
        out.extend_from_slice(&got);
    }
    out
}
