//! Sealing plaintext into blocks and opening them again.
//!
//! A block is `[version][AES-256-GCM-SIV(inner)]` where `inner` is
//! `[kind][codec][payload]` and payload is the plaintext, zstd-compressed when
//! that pays. The key is BLAKE3-keyed(content key, kind || plaintext): the same
//! owner's identical data gives the identical block (deduplication), while
//! without the content key nobody can derive it to confirm a guessed file.

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use serde::{Deserialize, Serialize};

use crate::{Error, Score};

/// Version byte that starts every block (docs/FORMATS.md, "Block").
pub const BLOCK_VERSION: u8 = 1;
/// Bytes a block adds around its payload: version, kind, codec and the 16-byte tag.
pub const BLOCK_OVERHEAD: usize = 1 + 2 + 16;
/// The largest plaintext one block may carry.
pub const MAX_PLAINTEXT: usize = 8 << 20;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 1;
/// Plaintext shorter than this is never worth compressing.
const COMPRESS_MIN: usize = 512;
/// Compressibility is first tried on a sample of this size.
const SAMPLE: usize = 64 * 1024;

/// What a block's plaintext is; recorded inside the encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum BlockKind {
    /// File (or directory stream) content.
    Data = 0,
    /// A list of child pointers: an inner node of a file tree.
    Pointers = 1,
    /// A filesystem root record.
    Root = 2,
    /// An owner's manifest of who holds which block.
    Manifest = 3,
}

impl BlockKind {
    fn from_u8(v: u8) -> Option<BlockKind> {
        Some(match v {
            0 => BlockKind::Data,
            1 => BlockKind::Pointers,
            2 => BlockKind::Root,
            3 => BlockKind::Manifest,
            _ => return None,
        })
    }
}

/// Everything needed to fetch, check and open one block. Lives only inside encrypted parents.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pointer {
    /// The block's address.
    pub score: Score,
    /// The block's AES-256-GCM-SIV key.
    pub key: [u8; 32],
    /// Plaintext bytes the pointer covers (for a tree node, the whole subtree).
    pub len: u64,
    /// Plaintext bytes of this one block (for a data block, equal to `len`).
    pub size: u32,
    /// 0 for a data block, n for a pointer block n levels above the data.
    pub depth: u8,
}

impl std::fmt::Debug for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pointer({:?}, len {}, size {}, depth {})",
            self.score, self.len, self.size, self.depth
        )
    }
}

/// A block ready to store: its score, its bytes, and the pointer that opens it.
#[derive(Clone, Debug)]
pub struct Sealed {
    /// Opens the block (score, key, plaintext length).
    pub pointer: Pointer,
    /// The stored bytes.
    pub data: bytes::Bytes,
}

/// Seals `plain` as a block of `kind` under the owner's content key.
pub fn seal(content_key: &[u8; 32], kind: BlockKind, plain: &[u8]) -> Result<Sealed, Error> {
    if plain.len() > MAX_PLAINTEXT {
        return Err(Error::Format(format!(
            "plaintext of {} bytes is over a block's limit",
            plain.len()
        )));
    }
    let key = block_key(content_key, kind, plain);
    let compressed = compress(plain);
    let (codec, payload) = match &compressed {
        Some(c) => (CODEC_ZSTD, &c[..]),
        None => (CODEC_RAW, plain),
    };
    let mut buf = Vec::with_capacity(payload.len() + BLOCK_OVERHEAD);
    buf.extend_from_slice(&[BLOCK_VERSION, kind as u8, codec]);
    buf.extend_from_slice(payload);
    let cipher = Aes256GcmSiv::new_from_slice(&key).map_err(|_| Error::Crypto)?;
    // Each key seals exactly one plaintext, so a fixed nonce is safe; GCM-SIV
    // would stay safe even if it did not.
    let tag = cipher
        .encrypt_inout_detached(&Nonce::default(), &[BLOCK_VERSION], (&mut buf[1..]).into())
        .map_err(|_| Error::Crypto)?;
    buf.extend_from_slice(&tag);
    let score = Score::of(&buf);
    Ok(Sealed {
        pointer: Pointer {
            score,
            key,
            len: plain.len() as u64,
            size: plain.len() as u32,
            depth: 0,
        },
        data: buf.into(),
    })
}

/// Opens a block that has already been checked against `pointer.score`.
pub fn open(pointer: &Pointer, kind: BlockKind, block: &[u8]) -> Result<Vec<u8>, Error> {
    let bad = |reason: &str| Error::Corrupt {
        score: pointer.score,
        reason: reason.into(),
    };
    if block.len() < BLOCK_OVERHEAD {
        return Err(bad("shorter than a block header"));
    }
    if block[0] != BLOCK_VERSION {
        return Err(Error::Format(format!(
            "block version {} is not supported",
            block[0]
        )));
    }
    let (body, tag) = block[1..].split_at(block.len() - 1 - 16);
    let mut buf = body.to_vec();
    let cipher = Aes256GcmSiv::new_from_slice(&pointer.key).map_err(|_| Error::Crypto)?;
    let tag = Tag::try_from(tag).map_err(|_| bad("bad tag length"))?;
    cipher
        .decrypt_inout_detached(
            &Nonce::default(),
            &[BLOCK_VERSION],
            (&mut buf[..]).into(),
            &tag,
        )
        .map_err(|_| Error::Decrypt(pointer.score))?;
    let (found_kind, codec) = (BlockKind::from_u8(buf[0]), buf[1]);
    if found_kind != Some(kind) {
        return Err(Error::Format(format!(
            "block {} is not a {kind:?} block",
            pointer.score
        )));
    }
    let plain = match codec {
        CODEC_RAW => {
            buf.drain(..2);
            buf
        }
        CODEC_ZSTD => {
            let limit = (pointer.size as usize).min(MAX_PLAINTEXT);
            zstd::bulk::decompress(&buf[2..], limit)
                .map_err(|_| bad("payload does not decompress"))?
        }
        other => return Err(Error::Format(format!("unknown block codec {other}"))),
    };
    if plain.len() != pointer.size as usize {
        return Err(bad("plaintext length differs from its pointer"));
    }
    Ok(plain)
}

fn block_key(content_key: &[u8; 32], kind: BlockKind, plain: &[u8]) -> [u8; 32] {
    // BLAKE3 in keyed mode is a PRF: without the content key nobody can derive
    // a block's key, so nobody can confirm a guessed plaintext. It runs about
    // three times faster than HMAC-SHA256 here (docs/PERFORMANCE.md).
    let mut h = blake3::Hasher::new_keyed(content_key);
    h.update(&[kind as u8]);
    h.update(plain);
    h.finalize().into()
}

/// zstd-compresses `plain` if that saves at least a tenth of it.
///
/// Below that the CPU is not worth it: measured on fio's write buffers, which
/// zstd shrinks by about 6%, compression took a third of the write path.
fn compress(plain: &[u8]) -> Option<Vec<u8>> {
    if plain.len() < COMPRESS_MIN {
        return None;
    }
    // Incompressible data (media, archives, ciphertext) is common: a sample
    // from the middle decides cheaply before the whole chunk is tried.
    if plain.len() > 2 * SAMPLE {
        let mid = plain.len() / 2;
        let sample = &plain[mid - SAMPLE / 2..mid + SAMPLE / 2];
        let c = zstd::bulk::compress(sample, ZSTD_LEVEL).ok()?;
        if c.len() > SAMPLE - SAMPLE / 10 {
            return None;
        }
    }
    let c = zstd::bulk::compress(plain, ZSTD_LEVEL).ok()?;
    (c.len() + plain.len() / 10 <= plain.len()).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: [u8; 32] = [7; 32];

    #[test]
    fn seal_open_round_trip_raw_and_compressed() {
        let random: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(5000);
        for plain in [&b""[..], b"x", &random, &text] {
            let s = seal(&K, BlockKind::Data, plain).unwrap();
            assert_eq!(Score::of(&s.data), s.pointer.score);
            assert_eq!(open(&s.pointer, BlockKind::Data, &s.data).unwrap(), plain);
        }
        let s = seal(&K, BlockKind::Data, &text).unwrap();
        assert!(s.data.len() < text.len() / 4, "text compresses");
    }

    #[test]
    fn convergent_within_an_owner_but_not_across_owners() {
        let a = seal(&K, BlockKind::Data, b"same bytes").unwrap();
        let b = seal(&K, BlockKind::Data, b"same bytes").unwrap();
        let c = seal(&[8; 32], BlockKind::Data, b"same bytes").unwrap();
        assert_eq!(a.pointer.score, b.pointer.score);
        assert_ne!(a.pointer.score, c.pointer.score);
    }

    #[test]
    fn wrong_key_kind_or_damage_fail_cleanly() {
        let s = seal(&K, BlockKind::Data, &[1u8; 5000]).unwrap();
        let mut p = s.pointer;
        p.key[0] ^= 1;
        assert!(matches!(
            open(&p, BlockKind::Data, &s.data),
            Err(Error::Decrypt(_))
        ));
        assert!(open(&s.pointer, BlockKind::Pointers, &s.data).is_err());
        let mut d = s.data.to_vec();
        d[10] ^= 1;
        assert!(open(&s.pointer, BlockKind::Data, &d).is_err());
        assert!(open(&s.pointer, BlockKind::Data, &d[..5]).is_err());
        let mut p = s.pointer;
        p.size += 1;
        assert!(open(&p, BlockKind::Data, &s.data).is_err());
    }
}
