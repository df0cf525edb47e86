//! Helpers shared by the block store's integration tests.
#![allow(dead_code)]

use fincrypt_blockstore::{Keys, MasterSecret};
use rand::{Rng, RngCore, SeedableRng};

pub fn keys() -> Keys {
    MasterSecret::generate().keys()
}

/// `len` bytes from a seeded generator: random, all zeros, or text-like.
pub fn bytes(seed: u64, len: usize, style: u8) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    match style % 3 {
        0 => rng.fill_bytes(&mut v),
        1 => {}
        _ => {
            let words = [
                &b"block "[..],
                b"score ",
                b"venti ",
                b"fossil\n",
                b"pointer ",
            ];
            let mut i = 0;
            while i < len {
                let w = words[rng.gen_range(0..words.len())];
                let n = w.len().min(len - i);
                v[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
    }
    v
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
