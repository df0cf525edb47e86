//! Scores: a block's name, its integrity check and the root of its storage proofs.
//!
//! The ciphertext of a block is cut into fixed [`SEGMENT_SIZE`] segments; the
//! segments are the leaves of a SHA-256 Merkle tree built with `rs_merkle`.
//! The score binds that root to the block's length, so a proof carries the
//! length and is checked against the score alone (see docs/FORMATS.md).

use std::fmt;

use rs_merkle::{MerkleProof, MerkleTree};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

/// Size of one Merkle leaf: a storage proof returns one segment.
pub const SEGMENT_SIZE: usize = 4096;

/// The largest block a score may name (a 4 MiB chunk plus codec overhead, with room).
pub const MAX_BLOCK_LEN: usize = 16 << 20;

// Domain tags keep leaves, inner nodes and the final score from ever being
// confused with one another (a second-preimage defence for Merkle trees).
const LEAF_TAG: u8 = 0x00;
const NODE_TAG: u8 = 0x01;
const SCORE_TAG: &[u8] = b"fincrypt score v1";

/// The address of a block: 32 bytes, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Score(pub [u8; 32]);

impl Score {
    /// Computes the score of a stored block (its ciphertext, header included).
    pub fn of(block: &[u8]) -> Score {
        let mut root = RootBuilder::default();
        if block.is_empty() {
            root.push(leaf_hash(&[]));
        }
        for segment in block.chunks(SEGMENT_SIZE) {
            root.push(leaf_hash(segment));
        }
        Score::bind(block.len(), root.finish())
    }

    /// The score of a block of `len` bytes whose segments hash to `leaves`
    /// (see [`leaf_hashes`]).
    pub fn from_leaves(len: usize, leaves: &[[u8; 32]]) -> Score {
        let mut root = RootBuilder::default();
        for leaf in leaves {
            root.push(*leaf);
        }
        Score::bind(len, root.finish())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Score, Error> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| Error::Format(format!("not a score: {s:?}")))?;
        Ok(Score(out))
    }

    /// The score as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Number of Merkle leaves (segments) in a block of `len` bytes; at least one.
    pub fn segments(len: usize) -> usize {
        len.div_ceil(SEGMENT_SIZE).max(1)
    }

    fn bind(len: usize, root: Option<[u8; 32]>) -> Score {
        let mut h = Sha256::new();
        h.update(SCORE_TAG);
        h.update((len as u64).to_le_bytes());
        h.update(root.unwrap_or([0u8; 32]));
        Score(h.finalize().into())
    }
}

impl fmt::Debug for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Score({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A proof that the holder of a block has segment `index` of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// Length of the whole block in bytes; fixes the tree's shape and is bound into the score.
    pub block_len: u64,
    /// The segment's bytes (the last segment may be short).
    pub segment: Vec<u8>,
    /// Sibling hashes from the leaf up to the root, as `rs_merkle` orders them.
    pub path: Vec<[u8; 32]>,
}

/// Builds the proof for segment `index` of `block`; `None` if the index is out of range.
pub fn prove(block: &[u8], index: usize) -> Option<Proof> {
    if index >= Score::segments(block.len()) {
        return None;
    }
    let leaves = leaf_hashes(block);
    let tree = MerkleTree::<SegmentHasher>::from_leaves(&leaves);
    let proof = tree.proof(&[index]);
    Some(Proof {
        block_len: block.len() as u64,
        segment: segment(block, index).to_vec(),
        path: proof.proof_hashes().to_vec(),
    })
}

/// Checks `proof` for segment `index` against `score` alone: no key and no other data.
pub fn verify(score: &Score, index: usize, proof: &Proof) -> bool {
    let Ok(len) = usize::try_from(proof.block_len) else {
        return false;
    };
    if len > MAX_BLOCK_LEN {
        return false;
    }
    let count = Score::segments(len);
    if index >= count || proof.path.len() > 64 {
        return false;
    }
    // The segment must have exactly the length its position implies.
    let start = index * SEGMENT_SIZE;
    let expected = len.saturating_sub(start).min(SEGMENT_SIZE);
    if proof.segment.len() != expected {
        return false;
    }
    let leaf = leaf_hash(&proof.segment);
    let merkle = MerkleProof::<SegmentHasher>::new(proof.path.clone());
    match merkle.root(&[index], &[leaf], count) {
        Ok(root) => Score::bind(len, Some(root)) == *score,
        Err(_) => false,
    }
}

/// The segment index a challenge nonce selects in a block of `block_len` bytes.
pub fn challenge_index(score: &Score, nonce: &[u8], block_len: u64) -> usize {
    let mut h = Sha256::new();
    h.update(b"fincrypt challenge v1");
    h.update(score.0);
    h.update(nonce);
    let d = h.finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&d[..8]);
    let segments = Score::segments(usize::try_from(block_len).unwrap_or(MAX_BLOCK_LEN)) as u64;
    (u64::from_le_bytes(n) % segments) as usize
}

fn segment(block: &[u8], index: usize) -> &[u8] {
    let start = index * SEGMENT_SIZE;
    let end = (start + SEGMENT_SIZE).min(block.len());
    &block[start.min(end)..end]
}

/// The Merkle leaf hash of every segment of `block` (one for an empty block).
pub fn leaf_hashes(block: &[u8]) -> Vec<[u8; 32]> {
    if block.is_empty() {
        return vec![leaf_hash(&[])];
    }
    block.chunks(SEGMENT_SIZE).map(leaf_hash).collect()
}

/// The Merkle leaf hash of one segment.
pub fn leaf_hash(segment: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([LEAF_TAG]);
    h.update(segment);
    h.finalize().into()
}

/// The root of the Merkle tree over leaves pushed one at a time, as rs_merkle
/// builds it (pairs hashed left to right, an odd last node promoted
/// unchanged), in constant memory.
///
/// Every block stored or received is scored, and rs_merkle's `from_leaves`
/// keeps a tree of layers to answer proofs with, allocating for each: a
/// tenth of a holder's CPU went to that. rs_merkle's tree is, from the left,
/// perfect subtrees of decreasing size, then the last ones joined from the
/// right; so each leaf joins the perfect subtree before it while both are of
/// one height, and [`RootBuilder::finish`] joins what is left from the right.
/// Proofs still come from rs_merkle, and a test checks both agree.
struct RootBuilder {
    /// Leaves pushed so far: bit `h` is set when `subtrees[h]` holds the root
    /// of a perfect subtree of height `h` (the subtrees' leaves, left to
    /// right, are in order of decreasing height).
    count: u64,
    subtrees: [[u8; 32]; 64],
}

impl Default for RootBuilder {
    fn default() -> Self {
        RootBuilder {
            count: 0,
            subtrees: [[0; 32]; 64],
        }
    }
}

impl RootBuilder {
    fn push(&mut self, leaf: [u8; 32]) {
        use rs_merkle::Hasher as _;
        let mut node = leaf;
        let mut height = 0;
        while self.count & (1 << height) != 0 {
            node = SegmentHasher::concat_and_hash(&self.subtrees[height], Some(&node));
            height += 1;
        }
        self.subtrees[height] = node;
        self.count += 1;
    }

    /// The root; `None` if nothing was pushed.
    fn finish(self) -> Option<[u8; 32]> {
        use rs_merkle::Hasher as _;
        let mut heights = (0..64).filter(|h| self.count & (1 << h) != 0);
        let mut right = self.subtrees[heights.next()?];
        for height in heights {
            right = SegmentHasher::concat_and_hash(&self.subtrees[height], Some(&right));
        }
        Some(right)
    }
}

/// rs_merkle hasher with a tag on inner nodes (leaves are hashed by `leaf_hash`).
#[derive(Clone)]
struct SegmentHasher;

impl rs_merkle::Hasher for SegmentHasher {
    type Hash = [u8; 32];

    fn hash(data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([NODE_TAG]);
        h.update(data);
        h.finalize().into()
    }

    fn concat_and_hash(left: &[u8; 32], right: Option<&[u8; 32]>) -> [u8; 32] {
        match right {
            Some(right) => {
                let mut h = Sha256::new();
                h.update([NODE_TAG]);
                h.update(left);
                h.update(right);
                h.finalize().into()
            }
            // An odd node is promoted unchanged, as rs_merkle does by default.
            None => *left,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn the_root_is_rs_merkles_for_any_number_of_leaves() {
        for n in (0..=300).chain([511, 512, 513, 1000, 2048, 2049]) {
            let leaves: Vec<[u8; 32]> = (0..n)
                .map(|i| leaf_hash(&(i as u64).to_le_bytes()))
                .collect();
            let mut root = RootBuilder::default();
            leaves.iter().for_each(|l| root.push(*l));
            assert_eq!(
                root.finish(),
                MerkleTree::<SegmentHasher>::from_leaves(&leaves).root(),
                "{n} leaves"
            );
        }
    }

    #[test]
    fn identical_blocks_have_identical_scores() {
        assert_eq!(Score::of(&block(10_000)), Score::of(&block(10_000)));
        assert_ne!(Score::of(&block(10_000)), Score::of(&block(10_001)));
    }

    #[test]
    fn every_segment_of_various_sizes_proves() {
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 7, 1 << 20] {
            let b = block(len);
            let score = Score::of(&b);
            for i in 0..Score::segments(len) {
                let p = prove(&b, i).expect("index in range");
                assert!(verify(&score, i, &p), "len {len} index {i}");
            }
            assert!(prove(&b, Score::segments(len)).is_none());
        }
    }

    #[test]
    fn wrong_segment_index_or_path_is_rejected() {
        let b = block(9 * 4096 + 100);
        let score = Score::of(&b);
        let good = prove(&b, 3).unwrap();
        assert!(verify(&score, 3, &good));

        let mut bad = good.clone();
        bad.segment[17] ^= 1;
        assert!(!verify(&score, 3, &bad), "flipped segment byte");

        assert!(!verify(&score, 4, &good), "wrong index");
        assert!(!verify(&score, 1000, &good), "index out of range");

        let mut bad = good.clone();
        bad.path[1][0] ^= 1;
        assert!(!verify(&score, 3, &bad), "flipped path hash");

        let mut bad = good.clone();
        bad.path.pop();
        assert!(!verify(&score, 3, &bad), "short path");

        let mut bad = good.clone();
        bad.block_len += 4096;
        assert!(!verify(&score, 3, &bad), "claimed longer block");

        let other = Score::of(&block(100));
        assert!(!verify(&other, 3, &good), "other score");
    }

    #[test]
    fn a_promoted_subtree_cannot_pose_as_a_shorter_block() {
        // With 3 segments the third is promoted; a proof claiming a 2-segment
        // block whose second leaf is that segment must not verify.
        let b = block(3 * 4096);
        let score = Score::of(&b);
        let real = prove(&b, 2).unwrap();
        let forged = Proof {
            block_len: 2 * 4096,
            ..real
        };
        assert!(!verify(&score, 1, &forged));
    }

    #[test]
    fn challenge_index_is_in_range_and_nonce_dependent() {
        let s = Score::of(b"x");
        let len = 40 * 4096;
        let picks: std::collections::HashSet<_> = (0..200u32)
            .map(|n| challenge_index(&s, &n.to_le_bytes(), len))
            .collect();
        assert!(picks.iter().all(|&i| i < 40));
        assert!(picks.len() > 20);
    }

    #[test]
    fn hex_round_trips() {
        let s = Score::of(b"abc");
        assert_eq!(Score::from_hex(&s.to_hex()).unwrap(), s);
        assert!(Score::from_hex("zz").is_err());
    }
}
