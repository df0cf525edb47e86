//! Sealing plaintext into blocks and opening them again.
//!
//! A block is `[version][header][segment 0]...[segment n-1]`. A plaintext of
//! at most [`ONE_SEGMENT_MAX`] bytes (a small file, a directory stream, a
//! file's tail) is one segment, compressed whole; a larger one is cut into
//! [`SEGMENT_PLAIN`] segments, so a small read of a large file opens one
//! segment instead of the whole block. Each segment is zstd-compressed when
//! that pays and sealed on its own with AES-256-GCM-SIV. The sealed header holds the block's kind and
//! each segment's stored length. The key is BLAKE3-keyed(content key, kind ||
//! plaintext): the same owner's identical data gives the identical block
//! (deduplication), while without the content key nobody can derive it to
//! confirm a guessed file. docs/FORMATS.md, "Block", has the byte layout.

use std::cell::RefCell;
use std::ops::Range;

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Nonce, Tag};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Score};

/// Version byte that starts every block written (docs/FORMATS.md, "Block").
pub const BLOCK_VERSION: u8 = 3;
/// The version before, still read: every block cut into [`SEGMENT_PLAIN`]
/// segments, however small.
const BLOCK_VERSION_2: u8 = 2;
/// Plaintext bytes per independently sealed segment of a block larger than
/// [`ONE_SEGMENT_MAX`] (the last may be shorter).
pub const SEGMENT_PLAIN: usize = 16 << 10;
/// A block of at most this many plaintext bytes is one segment (version 3):
/// compressed as a whole, it keeps the context that 16 KiB pieces lose
/// (docs/PERFORMANCE.md, "Stored bytes").
pub const ONE_SEGMENT_MAX: usize = 256 << 10;
/// The largest plaintext one block may carry.
pub const MAX_PLAINTEXT: usize = 8 << 20;

const TAG_LEN: usize = 16;
/// Set in a header entry when the segment is zstd-compressed.
const ZSTD_FLAG: u32 = 1 << 31;
/// zstd level of the segments of a large block: written at the mount's pace.
const ZSTD_LEVEL: i32 = 1;
/// zstd level of a one-segment block: small files and directory streams,
/// where the ratio counts for more than the speed (level 3 takes about 15 %
/// more time than level 1 for 3-4 % less).
const ZSTD_LEVEL_WHOLE: i32 = 3;
/// Plaintext shorter than this is never worth compressing.
const COMPRESS_MIN: usize = 512;
/// Nonce of the header; segment `i` uses `i` (little-endian) as its nonce.
const HEADER_NONCE: [u8; 12] = [0xff; 12];

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

impl Pointer {
    /// A hole: `len` bytes of zeros that no block holds (file tree layout 2,
    /// docs/FORMATS.md). Its score, key and size are zero; it sits where a
    /// data block would (depth 0).
    pub fn hole(len: u64) -> Pointer {
        Pointer {
            score: Score([0; 32]),
            key: [0; 32],
            len,
            size: 0,
            depth: 0,
        }
    }

    /// True for a [`Pointer::hole`]. No block has size 0, so no real pointer is one.
    pub fn is_hole(&self) -> bool {
        self.size == 0
    }
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
    seal_as(BLOCK_VERSION, content_key, kind, plain)
}

/// Seals `plain` in block format `version` (only tests write version 2).
fn seal_as(
    version: u8,
    content_key: &[u8; 32],
    kind: BlockKind,
    plain: &[u8],
) -> Result<Sealed, Error> {
    if plain.len() > MAX_PLAINTEXT {
        return Err(Error::Format(format!(
            "plaintext of {} bytes is over a block's limit",
            plain.len()
        )));
    }
    let key = block_key(content_key, kind, plain);
    let cipher = Aes256GcmSiv::new_from_slice(&key).map_err(|_| Error::Crypto)?;
    let (n, seg_len) = segments(version, plain.len());
    let level = if n == 1 && seg_len == ONE_SEGMENT_MAX {
        ZSTD_LEVEL_WHOLE
    } else {
        ZSTD_LEVEL
    };
    let compress = worth_compressing(plain);
    let mut header = Vec::with_capacity(1 + 4 * n + TAG_LEN);
    header.push(kind as u8);
    let mut out = crate::buf::take(1 + header_len(n) + plain.len() + n * TAG_LEN);
    out.push(version);
    out.resize(1 + header_len(n), 0);
    for i in 0..n {
        let seg = &plain[(i * seg_len).min(plain.len())..((i + 1) * seg_len).min(plain.len())];
        let at = out.len();
        let entry = match compress.then(|| compress_segment(seg, level)).flatten() {
            Some(c) => {
                out.extend_from_slice(&c);
                c.len() as u32 | ZSTD_FLAG
            }
            None => {
                out.extend_from_slice(seg);
                seg.len() as u32
            }
        };
        // Each (key, nonce) pair seals exactly one segment: keys are per
        // content and nonces per position. GCM-SIV would stay safe if not.
        let tag = cipher
            .encrypt_inout_detached(&nonce(i), &[version], (&mut out[at..]).into())
            .map_err(|_| Error::Crypto)?;
        out.extend_from_slice(&tag);
        header.extend_from_slice(&entry.to_le_bytes());
    }
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::from(HEADER_NONCE),
            &[version],
            (&mut header[..]).into(),
        )
        .map_err(|_| Error::Crypto)?;
    header.extend_from_slice(&tag);
    out[1..1 + header.len()].copy_from_slice(&header);
    let score = Score::of(&out);
    Ok(Sealed {
        pointer: Pointer {
            score,
            key,
            len: plain.len() as u64,
            size: plain.len() as u32,
            depth: 0,
        },
        data: crate::buf::share(out),
    })
}

/// Opens a whole block that has already been checked against `pointer.score`.
pub fn open(pointer: &Pointer, kind: BlockKind, block: &[u8]) -> Result<Vec<u8>, Error> {
    let version = *block.first().ok_or_else(|| corrupt(pointer, "empty"))?;
    let layout = Layout::read(
        pointer,
        kind,
        block.get(header_range(version, pointer)).unwrap_or(&[]),
    )?;
    if block.len() != layout.block_len {
        return Err(corrupt(pointer, "length differs from its header"));
    }
    // Pooled: a block-sized buffer is otherwise freshly faulted in each time.
    let mut out = crate::buf::take(pointer.size as usize);
    for (i, seg) in layout.segments.iter().enumerate() {
        seg.open(
            &layout.cipher,
            layout.version,
            pointer,
            i,
            &block[seg.stored.clone()],
            &mut out,
        )?;
    }
    Ok(out)
}

/// Opens bytes `range` of a block's plaintext, fetching only the header and the
/// segments that hold them. `fetch` returns bytes of the stored block, already
/// checked against `pointer.score` (see [`crate::BlockStore::get_range`]).
pub fn open_range(
    pointer: &Pointer,
    kind: BlockKind,
    range: Range<usize>,
    fetch: &mut dyn FnMut(Range<usize>) -> Result<Bytes, Error>,
) -> Result<Vec<u8>, Error> {
    if range.start > range.end || range.end > pointer.size as usize {
        return Err(Error::Format(format!(
            "range {range:?} is outside block {}",
            pointer.score
        )));
    }
    let mut out = vec![0u8; range.len()];
    if range.is_empty() {
        return Ok(out);
    }
    // The header's length follows from the pointer and the version. A large
    // block's is the same in both versions; a small one's is read as version
    // 3 first, the version written now (a version 3 block is never shorter
    // than that), and again if the block turns out to be version 2.
    let mut header = fetch(header_range(BLOCK_VERSION, pointer))?;
    if let Some(&v) = header.first()
        && v != BLOCK_VERSION
        && header_range(v, pointer) != header_range(BLOCK_VERSION, pointer)
    {
        header = fetch(header_range(v, pointer))?;
    }
    let layout = Layout::read(pointer, kind, &header)?;
    let seg_len = layout.seg_len;
    let (first, last) = (range.start / seg_len, (range.end - 1) / seg_len);
    let (segs, span) = (
        &layout.segments[first..=last],
        layout.segments[first].stored.start..layout.segments[last].stored.end,
    );
    let stored = fetch(span.clone())?;
    if stored.len() != span.len() {
        return Err(corrupt(pointer, "short read"));
    }
    let mut plain = Vec::with_capacity(segs.iter().map(|s| s.plain.len()).sum());
    for (k, seg) in segs.iter().enumerate() {
        let src = seg.stored.start - span.start..seg.stored.end - span.start;
        seg.open(
            &layout.cipher,
            layout.version,
            pointer,
            first + k,
            &stored[src],
            &mut plain,
        )?;
    }
    let skip = range.start - first * seg_len;
    out.copy_from_slice(&plain[skip..skip + range.len()]);
    Ok(out)
}

/// Bytes of a stored block of `version` that hold the version and the sealed
/// header (for a version this build does not know, those of the current one:
/// reading them refuses the version).
fn header_range(version: u8, pointer: &Pointer) -> Range<usize> {
    0..1 + header_len(segments(version, pointer.size as usize).0)
}

/// Where each segment of a block lies, from its decrypted header.
struct Layout {
    cipher: Aes256GcmSiv,
    /// The block's version: the associated data of every segment.
    version: u8,
    /// Plaintext bytes per segment (the last may be shorter).
    seg_len: usize,
    segments: Vec<Segment>,
    block_len: usize,
}

struct Segment {
    /// Bytes of the stored block: payload then tag.
    stored: Range<usize>,
    /// Bytes of the block's plaintext.
    plain: Range<usize>,
    zstd: bool,
}

impl Layout {
    /// Decrypts and checks the header (`version || sealed header`).
    fn read(pointer: &Pointer, kind: BlockKind, header: &[u8]) -> Result<Layout, Error> {
        let size = pointer.size as usize;
        let version = match header.first() {
            Some(&v @ (BLOCK_VERSION | BLOCK_VERSION_2)) => v,
            Some(v) => {
                return Err(Error::Format(format!("block version {v} is not supported")));
            }
            None => return Err(corrupt(pointer, "empty")),
        };
        let (n, seg_len) = segments(version, size);
        if header.len() != 1 + header_len(n) || size > MAX_PLAINTEXT {
            return Err(corrupt(pointer, "shorter than its header"));
        }
        let cipher = Aes256GcmSiv::new_from_slice(&pointer.key).map_err(|_| Error::Crypto)?;
        let (body, tag) = header[1..].split_at(header_len(n) - TAG_LEN);
        let mut body = body.to_vec();
        let tag = Tag::try_from(tag).map_err(|_| corrupt(pointer, "bad tag length"))?;
        cipher
            .decrypt_inout_detached(
                &Nonce::from(HEADER_NONCE),
                &[version],
                (&mut body[..]).into(),
                &tag,
            )
            .map_err(|_| Error::Decrypt(pointer.score))?;
        if BlockKind::from_u8(body[0]) != Some(kind) {
            return Err(Error::Format(format!(
                "block {} is not a {kind:?} block",
                pointer.score
            )));
        }
        let mut segments = Vec::with_capacity(n);
        let mut at = header.len();
        for (i, e) in body[1..].chunks_exact(4).enumerate() {
            let e = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let (zstd, len) = (e & ZSTD_FLAG != 0, (e & !ZSTD_FLAG) as usize);
            let plain = i * seg_len..((i + 1) * seg_len).min(size);
            if (!zstd && len != plain.len()) || len > seg_len {
                return Err(corrupt(pointer, "segment length differs from its pointer"));
            }
            segments.push(Segment {
                stored: at..at + len + TAG_LEN,
                plain,
                zstd,
            });
            at += len + TAG_LEN;
        }
        Ok(Layout {
            cipher,
            version,
            seg_len,
            segments,
            block_len: at,
        })
    }
}

impl Segment {
    /// Decrypts (and decompresses) the stored segment `stored`, appending it to `out`.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        cipher: &Aes256GcmSiv,
        version: u8,
        pointer: &Pointer,
        index: usize,
        stored: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let (payload, tag) = stored.split_at(stored.len() - TAG_LEN);
        let tag = Tag::try_from(tag).map_err(|_| corrupt(pointer, "bad tag length"))?;
        let decrypt = |buf: &mut [u8]| {
            cipher
                .decrypt_inout_detached(&nonce(index), &[version], buf.into(), &tag)
                .map_err(|_| Error::Decrypt(pointer.score))
        };
        let at = out.len();
        out.extend_from_slice(payload);
        decrypt(&mut out[at..])?;
        if self.zstd {
            let plain = ZSTD_D
                .with(|d| {
                    let mut d = d.borrow_mut();
                    let d = d.as_mut().ok_or(())?;
                    d.decompress(&out[at..], self.plain.len()).map_err(|_| ())
                })
                .map_err(|_| corrupt(pointer, "segment does not decompress"))?;
            out.truncate(at);
            out.extend_from_slice(&plain);
        }
        if out.len() - at != self.plain.len() {
            return Err(corrupt(pointer, "segment length differs from its pointer"));
        }
        Ok(())
    }
}

/// How a plaintext of `size` bytes is cut in block format `version`: the
/// number of segments and the plaintext bytes of each (the last may be
/// shorter; an empty plaintext has one empty segment).
fn segments(version: u8, size: usize) -> (usize, usize) {
    let seg_len = if version != BLOCK_VERSION_2 && size <= ONE_SEGMENT_MAX {
        ONE_SEGMENT_MAX
    } else {
        SEGMENT_PLAIN
    };
    (size.div_ceil(seg_len).max(1), seg_len)
}

/// Sealed header length for `n` segments: kind, one u32 per segment, tag.
fn header_len(n: usize) -> usize {
    1 + 4 * n + TAG_LEN
}

fn nonce(index: usize) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(index as u64).to_le_bytes());
    Nonce::from(n)
}

fn corrupt(pointer: &Pointer, reason: &str) -> Error {
    Error::Corrupt {
        score: pointer.score,
        reason: reason.into(),
    }
}

thread_local! {
    // zstd contexts are costly to set up: one per thread and level, reused
    // per segment.
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    static ZSTD_C_WHOLE: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL_WHOLE).ok());
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        RefCell::new(zstd::bulk::Decompressor::new().ok());
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

/// Whether to try compressing `plain`'s segments at all.
///
/// Incompressible data (media, archives, ciphertext) is common: two sample
/// segments decide cheaply, by the same rule each segment is kept by. (A
/// larger sample misleads: fio's buffers save 10.5% over 64 KiB but 4.5% per
/// 16 KiB segment, so every segment was compressed and then thrown away.)
fn worth_compressing(plain: &[u8]) -> bool {
    if plain.len() < COMPRESS_MIN {
        return false;
    }
    if plain.len() <= 2 * SEGMENT_PLAIN {
        return true;
    }
    [plain.len() / 3, plain.len() * 2 / 3].iter().any(|&at| {
        let start = at.min(plain.len() - SEGMENT_PLAIN);
        compress_segment(&plain[start..start + SEGMENT_PLAIN], ZSTD_LEVEL).is_some()
    })
}

/// zstd-compresses one segment if that saves at least an eighth of it.
///
/// Less is not worth the CPU: fio's write buffers save 12% per segment, and
/// compressing them halved the write path's throughput. ZFS keeps a
/// compressed record by the same 1/8 rule.
fn compress_segment(seg: &[u8], level: i32) -> Option<Vec<u8>> {
    if seg.len() < COMPRESS_MIN {
        return None;
    }
    let context = if level == ZSTD_LEVEL_WHOLE {
        &ZSTD_C_WHOLE
    } else {
        &ZSTD_C
    };
    let c = context.with(|c| c.borrow_mut().as_mut()?.compress(seg).ok())?;
    (c.len() + seg.len() / 8 <= seg.len()).then_some(c)
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
    fn any_range_opens_from_its_segments_alone() {
        let random = |n: u32| -> Vec<u8> {
            (0..n)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect()
        };
        let text = b"segments of text compress on their own. ".repeat(8000);
        let (small, large) = (random(100_000), random(300_000));
        // (version, plaintext, plaintext bytes per segment): large blocks in
        // 16 KiB segments, small ones whole (version 3) or in 16 KiB
        // segments (version 2, still read).
        let cases: [(u8, &[u8], usize); 7] = [
            (3, &large, SEGMENT_PLAIN),
            (3, &text, SEGMENT_PLAIN),
            (3, &small, ONE_SEGMENT_MAX),
            (3, &text[..100_000], ONE_SEGMENT_MAX),
            (2, &small, SEGMENT_PLAIN),
            (2, &text[..100_000], SEGMENT_PLAIN),
            (2, &text[..SEGMENT_PLAIN], SEGMENT_PLAIN),
        ];
        for (version, plain, seg) in cases {
            let s = seal_as(version, &K, BlockKind::Data, plain).unwrap();
            assert_eq!(s.data[0], version);
            assert_eq!(open(&s.pointer, BlockKind::Data, &s.data).unwrap(), plain);
            let len = plain.len();
            let step = SEGMENT_PLAIN;
            for range in [
                0..1,
                0..len,
                step - 1..step + 1,
                len - 1..len,
                5..5,
                3 * step / 2..len,
            ] {
                if range.end > len || range.start > range.end {
                    continue;
                }
                let mut fetched = Vec::new();
                let got = open_range(&s.pointer, BlockKind::Data, range.clone(), &mut |r| {
                    fetched.push(r.clone());
                    Ok(s.data.slice(r))
                })
                .unwrap();
                assert_eq!(got, &plain[range.clone()], "v{version} range {range:?}");
                // The header (twice for a small version 2 block of several
                // segments: read as version 3 first), then only the segments
                // that hold the range.
                if !range.is_empty() {
                    let want = range.len().div_ceil(seg) + 1;
                    let body = fetched.last().unwrap();
                    assert!(body.len() <= want * (seg + TAG_LEN), "{fetched:?}");
                    let headers =
                        if version == 2 && len <= ONE_SEGMENT_MAX && segments(2, len).0 > 1 {
                            2
                        } else {
                            1
                        };
                    assert_eq!(fetched.len(), headers + 1, "v{version}: {fetched:?}");
                }
            }
            assert!(
                open_range(&s.pointer, BlockKind::Data, 0..len + 1, &mut |r| Ok(s
                    .data
                    .slice(r)))
                .is_err()
            );
            assert!(
                open_range(&s.pointer, BlockKind::Root, 0..1, &mut |r| Ok(s
                    .data
                    .slice(r)))
                .is_err()
            );
            // A damaged segment fails, whether opened alone or with the block.
            let mut bad = s.data.to_vec();
            let at = bad.len() - 20;
            bad[at] ^= 1;
            let bad = bytes::Bytes::from(bad);
            assert!(
                open_range(&s.pointer, BlockKind::Data, len - 1..len, &mut |r| Ok(
                    bad.slice(r)
                ))
                .is_err()
            );
            assert!(open(&s.pointer, BlockKind::Data, &bad).is_err());
        }
        let s = seal(&K, BlockKind::Data, &text).unwrap();
        assert!(s.data.len() < text.len() / 4, "segments still compress");
    }

    #[test]
    fn a_small_block_is_one_segment_compressed_whole() {
        // Text whose repeats lie further apart than a 16 KiB segment, as in
        // source files: compressed whole, the block is much smaller.
        let mut text = Vec::new();
        let mut x = 1u32;
        let words: Vec<Vec<u8>> = (0..3000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                format!("word{} ", x % 100_000).into_bytes()
            })
            .collect();
        while text.len() < 200_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            text.extend_from_slice(&words[(x >> 8) as usize % words.len()]);
        }
        let v3 = seal(&K, BlockKind::Data, &text).unwrap();
        let v2 = seal_as(2, &K, BlockKind::Data, &text).unwrap();
        // One segment: version, sealed header of one entry, payload, tag.
        let header = 1 + header_len(1);
        assert!(v3.data.len() - header - TAG_LEN < text.len() / 2);
        assert!(
            (v3.data.len() as f64) < 0.9 * v2.data.len() as f64,
            "whole {} against in segments {}",
            v3.data.len(),
            v2.data.len()
        );
        assert_eq!(open(&v3.pointer, BlockKind::Data, &v3.data).unwrap(), text);
        assert_eq!(open(&v2.pointer, BlockKind::Data, &v2.data).unwrap(), text);
        // The same plaintext in the two versions: different blocks, each
        // opening only as its own version says.
        assert_ne!(v3.pointer.score, v2.pointer.score);
        let mut relabelled = v2.data.to_vec();
        relabelled[0] = BLOCK_VERSION;
        assert!(open(&v2.pointer, BlockKind::Data, &relabelled).is_err());
        let mut unknown = v3.data.to_vec();
        unknown[0] = 4;
        match open(&v3.pointer, BlockKind::Data, &unknown) {
            Err(Error::Format(m)) => assert!(m.contains("version 4"), "{m}"),
            other => panic!("{other:?}"),
        }
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
