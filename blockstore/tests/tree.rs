//! File trees over real stores: round trips, deduplication, big files, damage.

mod common;

use std::collections::HashSet;

use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{
    BlockStore, Class, Error, FileRef, LocalStore, MemStore, Resume, Score, StoreOptions,
    TreeParams, TreeReader, TreeWriter,
};
use proptest::prelude::*;

/// Small chunks and fanout, so a few hundred KiB make trees several levels deep.
const SMALL: TreeParams = TreeParams {
    min_chunk: 64,
    avg_chunk: 256,
    max_chunk: 1024,
    fanout: 4,
    inline_max: 64,
};

fn scores(reader: &TreeReader<impl BlockStore>, f: &FileRef) -> HashSet<Score> {
    let mut out = HashSet::new();
    reader
        .visit_scores(f, &mut |p| {
            if p.depth == 0 {
                out.insert(p.score);
            }
        })
        .unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any bytes of any size up to a few MiB read back whole and by random ranges,
    /// through a real on-disk volume with the production tree shape.
    #[test]
    fn local_store_round_trip(seed: u64, len in 0usize..(5 << 20), style: u8, ranges in prop::collection::vec((any::<u64>(), 0usize..(3 << 20)), 4)) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
        let keys = common::keys();
        let data = common::bytes(seed, len, style);
        let mut w = TreeWriter::new(&store, &keys, TreeParams::default(), Class::Own);
        // Feed it in uneven pieces, as a filesystem would.
        for piece in data.chunks(777_777) {
            w.write(piece).unwrap();
        }
        let file = w.finish().unwrap();
        prop_assert_eq!(file.len(), len as u64);
        let reader = TreeReader::new(&store, 64 << 20);
        prop_assert_eq!(&reader.read_all(&file).unwrap(), &data);
        for (off, n) in ranges {
            let off = if len == 0 { 0 } else { off % (len as u64 + 10) };
            let mut buf = vec![0u8; n];
            let got = reader.read_at(&file, off, &mut buf).unwrap();
            let want = data.get(off as usize..).map(|s| &s[..s.len().min(n)]).unwrap_or(&[]);
            prop_assert_eq!(&buf[..got], want);
            // The same range opened segment by segment, with a cold cache.
            let cold = TreeReader::new(&store, 1 << 20);
            let mut buf = vec![0u8; n];
            let got = cold.read_at_random(&file, off, &mut buf).unwrap();
            prop_assert_eq!(&buf[..got], want);
        }
    }

    /// Deep trees (tiny chunks, fanout 4) read back exactly over every range shape.
    #[test]
    fn deep_tree_round_trip(seed: u64, len in 0usize..200_000, style: u8, off: u64, n in 0usize..50_000) {
        let store = MemStore::new();
        let keys = common::keys();
        let data = common::bytes(seed, len, style);
        let file = write_all(&store, &keys, SMALL, Class::Own, &data).unwrap();
        let reader = TreeReader::new(&store, 1 << 20);
        prop_assert_eq!(&reader.read_all(&file).unwrap(), &data);
        let off = off % (len as u64 + 1);
        let mut buf = vec![0u8; n];
        let got = reader.read_at(&file, off, &mut buf).unwrap();
        prop_assert_eq!(&buf[..got], &data[off as usize..(off as usize + n).min(len)]);
    }
}

#[test]
fn small_files_are_inline_and_cost_no_block() {
    let store = MemStore::new();
    let keys = common::keys();
    for len in [0, 1, 100, 4096] {
        let f = write_all(
            &store,
            &keys,
            TreeParams::default(),
            Class::Own,
            &vec![9u8; len],
        )
        .unwrap();
        assert_eq!(f, FileRef::Inline(vec![9u8; len]));
    }
    assert!(store.is_empty());
    let f = write_all(
        &store,
        &keys,
        TreeParams::default(),
        Class::Own,
        &[9u8; 4097],
    )
    .unwrap();
    assert!(matches!(f, FileRef::Tree(_)));
    assert_eq!(store.len(), 1);
}

#[test]
fn identical_content_gives_identical_scores() {
    let store = MemStore::new();
    let keys = common::keys();
    let data = common::bytes(1, 3 << 20, 0);
    let a = write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap();
    let n = store.len();
    let b = write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap();
    assert_eq!(a, b);
    assert_eq!(store.len(), n, "the second copy added no block");
    // Another owner's identical data shares nothing.
    let c = write_all(
        &store,
        &common::keys(),
        TreeParams::default(),
        Class::Own,
        &data,
    )
    .unwrap();
    assert_ne!(a, c);
}

#[test]
fn insertion_at_the_front_keeps_most_blocks() {
    let store = MemStore::new();
    let keys = common::keys();
    let data = common::bytes(7, 64 << 20, 0);
    let mut shifted = Vec::with_capacity(data.len() + 1);
    shifted.push(0x42);
    shifted.extend_from_slice(&data);
    let a = write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap();
    let b = write_all(&store, &keys, TreeParams::default(), Class::Own, &shifted).unwrap();
    let reader = TreeReader::new(&store, 1 << 20);
    let (sa, sb) = (scores(&reader, &a), scores(&reader, &b));
    let shared = sa.intersection(&sb).count();
    assert!(sa.len() > 20, "64 MiB makes many chunks: {}", sa.len());
    assert!(
        shared * 10 >= sa.len() * 9,
        "shared {shared} of {}",
        sa.len()
    );
}

#[test]
fn damaged_or_missing_blocks_are_errors_never_wrong_bytes() {
    let store = MemStore::new();
    let keys = common::keys();
    let data = common::bytes(3, 100_000, 2);
    let file = write_all(&store, &keys, SMALL, Class::Own, &data).unwrap();
    let reader_scores = scores(&TreeReader::new(&store, 0), &file);
    let victim = *reader_scores.iter().next().unwrap();
    let mut bytes = store.get(&victim).unwrap().to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    store.tamper(&victim, bytes.into());
    let reader = TreeReader::new(&store, 0);
    let err = reader.read_all(&file).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { score, .. } if score == victim),
        "{err}"
    );
    store.delete(&victim).unwrap();
    assert!(matches!(reader.read_all(&file), Err(Error::NotFound(s)) if s == victim));
}

#[test]
fn a_wrong_key_fails_cleanly() {
    let store = MemStore::new();
    let keys = common::keys();
    let data = common::bytes(4, 1 << 20, 0);
    let FileRef::Tree(mut root) =
        write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap()
    else {
        panic!("1 MiB is not inline");
    };
    root.key[5] ^= 1;
    let err = TreeReader::new(&store, 0)
        .read_all(&FileRef::Tree(root))
        .unwrap_err();
    assert!(matches!(err, Error::Decrypt(_)), "{err}");
}

/// A file over 4 GiB, streamed: offsets past 2^32 must land on the right bytes.
#[test]
fn a_file_over_4_gib_streams_and_reads_back() {
    const MIB: u64 = 1 << 20;
    let total: u64 = 4 * 1024 * MIB + 3 * MIB + 12345;
    // Each MiB starts with its own index, so every chunk differs and any
    // misplaced range shows; the rest is zeros and compresses away.
    let piece = |i: u64| {
        let mut v = vec![0u8; MIB as usize];
        v[..8].copy_from_slice(&i.to_le_bytes());
        v[MIB as usize - 8..].copy_from_slice(&(!i).to_le_bytes());
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
    let keys = common::keys();
    let mut w = TreeWriter::new(&store, &keys, TreeParams::default(), Class::Own);
    let mut written = 0u64;
    let mut i = 0;
    while written < total {
        let p = piece(i);
        let n = (total - written).min(MIB) as usize;
        w.write(&p[..n]).unwrap();
        written += n as u64;
        i += 1;
    }
    let file = w.finish().unwrap();
    assert_eq!(file.len(), total);
    let reader = TreeReader::new(&store, 64 << 20);
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0u64;
    while off < total {
        let n = reader.read_at(&file, off, &mut buf).unwrap();
        assert!(n > 0);
        for (j, chunk) in buf[..n].chunks(MIB as usize).enumerate() {
            let idx = off / MIB + j as u64;
            let want = piece(idx);
            assert_eq!(chunk, &want[..chunk.len()], "MiB {idx}");
        }
        off += n as u64;
    }
    // A read that straddles 4 GiB.
    let mut b = [0u8; 16];
    reader.read_at(&file, (4 << 30) - 8, &mut b).unwrap();
    assert_eq!(&b[..8], &(!(4095u64)).to_le_bytes());
    assert_eq!(&b[8..], &4096u64.to_le_bytes());
}

/// Resuming keeps the unchanged prefix and gives the same tree as writing afresh.
#[test]
fn resume_matches_a_fresh_write_and_reuses_the_prefix() {
    let store = MemStore::new();
    let keys = common::keys();
    let reader = TreeReader::new(&store, 1 << 20);
    for params in [SMALL, TreeParams::default()] {
        let old = common::bytes(11, 9 << 20, 0);
        let base = write_all(&store, &keys, params, Class::Own, &old).unwrap();
        for (edit_at, new_len) in [
            (old.len(), old.len() + 5000),
            (4 << 20, old.len()),
            (100, 6 << 20),
            (0, 10),
        ] {
            let mut new = old.clone();
            new.resize(new_len, 0);
            if edit_at < new.len() {
                new[edit_at] ^= 0xff;
            }
            let fresh = write_all(&store, &keys, params, Class::Own, &new).unwrap();
            let (mut w, from) = TreeWriter::resume(
                &store,
                &keys,
                params,
                Class::Own,
                &base,
                &reader,
                Resume::Change(edit_at as u64),
            )
            .unwrap();
            assert!(from <= edit_at as u64);
            if edit_at >= 4 << 20 {
                assert!(from > 0, "a late edit keeps a prefix");
            }
            w.write(&new[from as usize..]).unwrap();
            assert_eq!(
                w.finish().unwrap(),
                fresh,
                "edit at {edit_at}, new length {new_len}"
            );
        }
    }
}

/// An edit at the very first byte of a chunk: the chunker hashed that byte to
/// cut the chunk before it, so that chunk must not be kept either.
#[test]
fn resume_after_an_edit_exactly_at_a_chunk_boundary() {
    let store = MemStore::new();
    let reader = TreeReader::new(&store, 1 << 20);
    for _ in 0..8 {
        let keys = common::keys();
        let old = common::bytes(12, 200_000, 0);
        let base = write_all(&store, &keys, SMALL, Class::Own, &old).unwrap();
        let mut ends = Vec::new();
        let mut at = 0u64;
        reader
            .visit_scores(&base, &mut |p| {
                if p.depth == 0 {
                    at += p.len;
                    ends.push(at);
                }
            })
            .unwrap();
        for &edit in ends.iter().step_by(ends.len() / 6 + 1).take(6) {
            if edit as usize >= old.len() {
                continue;
            }
            let mut new = old.clone();
            new[edit as usize] ^= 0xff;
            let fresh = write_all(&store, &keys, SMALL, Class::Own, &new).unwrap();
            let (mut w, from) = TreeWriter::resume(
                &store,
                &keys,
                SMALL,
                Class::Own,
                &base,
                &reader,
                Resume::Change(edit),
            )
            .unwrap();
            w.write(&new[from as usize..]).unwrap();
            assert_eq!(w.finish().unwrap(), fresh, "edit at the boundary {edit}");
        }
    }
}

/// A stream sealed in pieces, each up to its last cut and the next resumed
/// at that cut, ends as the very tree written in one go: the same blocks, so
/// dedup holds, and no piece re-reads the one before.
#[test]
fn a_stream_sealed_in_pieces_at_cuts_is_the_tree_of_one_write() {
    let store = MemStore::new();
    let reader = TreeReader::new(&store, 1 << 20);
    let keys = common::keys();
    let data = common::bytes(21, 300_000, 0);
    let whole = write_all(&store, &keys, SMALL, Class::Own, &data).unwrap();
    for piece in [3_000usize, 17_777, 100_000] {
        let mut base = FileRef::Inline(Vec::new());
        let mut cut = false;
        let mut end = 0usize;
        while end < data.len() {
            end = (end + piece).min(data.len());
            let at = if cut {
                Resume::Cut
            } else {
                Resume::Change(base.len())
            };
            let (mut w, from) =
                TreeWriter::resume(&store, &keys, SMALL, Class::Own, &base, &reader, at).unwrap();
            // Two uneven writes: a short one buffered, then a long one
            // chunked where it lies after bridging the buffered bytes.
            let mid = from as usize + (end - from as usize) / 5;
            w.write(&data[from as usize..mid]).unwrap();
            w.write(&data[mid..end]).unwrap();
            if end < data.len() {
                (base, cut) = w.finish_at_cut().unwrap();
                assert!(base.len() <= end as u64);
                assert_eq!(
                    reader.read_all(&base).unwrap(),
                    &data[..base.len() as usize]
                );
            } else {
                base = w.finish().unwrap();
            }
        }
        assert_eq!(base, whole, "pieces of {piece} bytes");
    }
}

/// Random reads from the local volume open segments without the leaf checks;
/// a damaged segment still fails to open and is then read checked, so the
/// reader gets an error naming the block, never wrong bytes, while the
/// block's intact segments still read right.
#[test]
fn random_reads_of_a_damaged_local_block_are_errors_never_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
    let keys = common::keys();
    let data = common::bytes(5, 3 << 20, 0);
    let file = write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap();
    // The first data block.
    let mut leaves = Vec::new();
    TreeReader::new(&store, 0)
        .visit_scores(&file, &mut |p| {
            if p.depth == 0 {
                leaves.push(*p);
            }
        })
        .unwrap();
    let first = leaves[0];
    // Damage one byte well inside the block (past the header, in a segment).
    let path = store.path_of(&first.score);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let reader = TreeReader::new(&store, 0);
    let mut saw_error = false;
    for off in (0..first.len).step_by(4096) {
        let mut buf = vec![0u8; 4096.min((first.len - off) as usize)];
        match reader.read_at_random(&file, off, &mut buf) {
            Ok(n) => assert_eq!(&buf[..n], &data[off as usize..off as usize + n], "at {off}"),
            Err(e) => {
                assert!(
                    matches!(e, Error::Corrupt { score, .. } if score == first.score),
                    "at {off}: {e}"
                );
                saw_error = true;
            }
        }
    }
    assert!(saw_error, "the damaged segment read without an error");
}

/// Adding a tree's scores to a set opens no pointer block already in it:
/// trees that share subtrees (snapshots) cost only what they do not share.
#[test]
fn adding_new_scores_skips_subtrees_already_seen() {
    let store = MemStore::new();
    let keys = common::keys();
    let data = common::bytes(8, 200_000, 0);
    let file = write_all(&store, &keys, SMALL, Class::Own, &data).unwrap();
    let mut all = HashSet::new();
    TreeReader::new(&store, 0)
        .visit_scores(&file, &mut |p| {
            all.insert(p.score);
        })
        .unwrap();
    let mut seen = HashSet::new();
    let reader = TreeReader::new(&store, 0);
    reader.add_new_scores(&file, &mut seen).unwrap();
    assert_eq!(seen, all);
    // Seen before, the root is not opened again: gone from the store, the
    // walk still succeeds and adds nothing.
    let FileRef::Tree(root) = &file else {
        panic!("200 KB is not inline");
    };
    store.delete(&root.score).unwrap();
    reader.add_new_scores(&file, &mut seen).unwrap();
    assert_eq!(seen, all);
    let mut fresh = HashSet::new();
    assert!(reader.add_new_scores(&file, &mut fresh).is_err());
}
