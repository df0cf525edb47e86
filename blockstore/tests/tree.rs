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
            (6 << 20, old.len()),
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
            // The first chunk ends within `max_chunk` whatever the keys: an
            // edit past that always keeps it.
            if edit_at > params.max_chunk as usize {
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

/// A file as a writer is fed it: bytes, or a hole of some length.
#[derive(Clone, Debug)]
enum Piece {
    Data(Vec<u8>),
    Hole(u64),
}

/// Feeds the pieces of `file` from byte `from` on.
fn feed(w: &mut TreeWriter<'_>, file: &[Piece], from: u64) {
    let mut at = 0u64;
    for p in file {
        let len = match p {
            Piece::Data(d) => d.len() as u64,
            Piece::Hole(n) => *n,
        };
        if at + len > from {
            let skip = from.saturating_sub(at);
            match p {
                Piece::Data(d) => w.write(&d[skip as usize..]).unwrap(),
                Piece::Hole(n) => w.write_hole(n - skip).unwrap(),
            }
        }
        at += len;
    }
}

/// What `file` holds in `[offset, offset + n)`: the data, zeros in holes.
fn model_range(file: &[Piece], offset: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut at = 0u64;
    for p in file {
        match p {
            Piece::Data(d) => {
                let (lo, hi) = (at.max(offset), (at + d.len() as u64).min(offset + n as u64));
                if lo < hi {
                    out[(lo - offset) as usize..(hi - offset) as usize]
                        .copy_from_slice(&d[(lo - at) as usize..(hi - at) as usize]);
                }
                at += d.len() as u64;
            }
            Piece::Hole(h) => at += h,
        }
    }
    out
}

#[test]
fn holes_cost_nothing_whatever_their_size_and_read_as_zeros() {
    let store = MemStore::new();
    let keys = common::keys();
    let reader = TreeReader::new(&store, 1 << 20);
    const TIB: u64 = 1 << 40;
    // Five holes among data, in a tree several levels deep (fanout 4),
    // the last file byte at 2^63 - 2 as in xfstests' generic/525.
    let file = vec![
        Piece::Data(common::bytes(1, 5000, 0)),
        Piece::Hole(16 * TIB),
        Piece::Data(common::bytes(2, 3000, 0)),
        Piece::Hole(7_000),
        Piece::Data(common::bytes(3, 9000, 0)),
        Piece::Hole(5 * TIB),
        Piece::Data(vec![7]),
        Piece::Hole((1 << 63) - 2 - (21 * TIB + 5000 + 3000 + 7000 + 9000 + 1)),
        Piece::Data(vec![9]),
    ];
    let len: u64 = (1 << 63) - 1;
    let holes = 21 * TIB + 7000 + ((1 << 63) - 2 - (21 * TIB + 5000 + 3000 + 7000 + 9000 + 1));
    let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
    feed(&mut w, &file, 0);
    let f = w.finish().unwrap();
    assert_eq!(f.len(), len);
    assert_eq!(f.holes(), holes);
    assert_eq!(f.data_len(), 5000 + 3000 + 9000 + 2);
    assert!(matches!(f, FileRef::Sparse { .. }));
    // The holes hold no block: the same pieces with every hole at its
    // smallest (each still one hole pointer) store exactly as many blocks,
    // whatever the holes' sizes. (The keys, and so the chunk cuts, differ
    // from run to run: the count itself is not fixed.)
    let stored: usize = store.len();
    let small_holes = {
        let other = MemStore::new();
        let mut w = TreeWriter::new(&other, &keys, SMALL, Class::Own);
        let small: Vec<Piece> = file
            .iter()
            .map(|p| match p {
                Piece::Hole(_) => Piece::Hole(fincrypt_blockstore::HOLE_MIN),
                data => data.clone(),
            })
            .collect();
        feed(&mut w, &small, 0);
        w.finish().unwrap();
        other.len()
    };
    assert_eq!(
        stored, small_holes,
        "holes of TiB cost blocks that holes of 4 KiB do not"
    );

    // Reads across every edge: data, zeros in holes, and the end.
    let edges = [
        0,
        4990,
        5000,
        16 * TIB + 4990,
        16 * TIB + 5000 + 2990,
        16 * TIB + 5000 + 3000 + 6990,
        len - 5,
    ];
    for at in edges {
        let mut buf = vec![0xaau8; 40];
        let n = reader.read_at_random(&f, at, &mut buf).unwrap();
        assert_eq!(&buf[..n], &model_range(&file, at, n)[..], "at {at}");
        let n2 = reader.read_at(&f, at, &mut buf).unwrap();
        assert_eq!(&buf[..n2], &model_range(&file, at, n2)[..], "at {at}");
    }
    assert_eq!(reader.read_bytes(&f, len - 1, 10).unwrap().as_ref(), &[9]);

    // Runs: where data and holes begin and end.
    let run = |at| reader.run_at(&f, at).unwrap().unwrap();
    assert_eq!((run(0).hole, run(10).hole), (false, false));
    assert_eq!(
        run(5000),
        fincrypt_blockstore::Run {
            hole: true,
            end: 16 * TIB + 5000
        }
    );
    assert!(!run(16 * TIB + 5000).hole);
    assert!(run(16 * TIB + 8000).hole);
    assert!(run(len - 2).hole);
    assert_eq!(
        run(len - 1),
        fincrypt_blockstore::Run {
            hole: false,
            end: len
        }
    );
    assert_eq!(reader.run_at(&f, len).unwrap(), None);
    assert_eq!(reader.holes_in(&f, 0, len).unwrap(), holes);
    assert_eq!(reader.holes_in(&f, 4000, 6000).unwrap(), 1000);

    // Every block the tree names is a real block; no hole is visited.
    let mut visited = 0;
    reader
        .visit_scores(&f, &mut |p| {
            assert!(!p.is_hole());
            assert!(store.has(&p.score).unwrap());
            visited += 1;
        })
        .unwrap();
    assert_eq!(visited, stored);

    // An edit inside a hole, and one after it, resumed over the tree: the
    // same tree as a fresh write of the new content, and the holes before
    // the edit are kept, not read.
    for (edit_at, byte) in [(4 * TIB, 3u8), (16 * TIB + 5000 + 1000, 4), (len - 1, 5)] {
        let mut new = Vec::new();
        let mut at = 0u64;
        for p in &file {
            let plen = match p {
                Piece::Data(d) => d.len() as u64,
                Piece::Hole(n) => *n,
            };
            if (at..at + plen).contains(&edit_at) {
                match p {
                    Piece::Data(d) => {
                        let mut d = d.clone();
                        d[(edit_at - at) as usize] = byte;
                        new.push(Piece::Data(d));
                    }
                    Piece::Hole(n) => {
                        let before = edit_at - at;
                        new.push(Piece::Hole(before));
                        new.push(Piece::Data(vec![byte]));
                        new.push(Piece::Hole(n - before - 1));
                    }
                }
            } else {
                new.push(p.clone());
            }
            at += plen;
        }
        let fresh = {
            let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
            feed(&mut w, &new, 0);
            w.finish().unwrap()
        };
        let (mut w, from) = TreeWriter::resume(
            &store,
            &keys,
            SMALL,
            Class::Own,
            &f,
            &reader,
            Resume::Change(edit_at),
        )
        .unwrap();
        assert!(from <= edit_at);
        if edit_at > 16 * TIB {
            assert!(from > 16 * TIB, "the first hole is kept: resumed at {from}");
        }
        feed(&mut w, &new, from);
        assert_eq!(w.finish().unwrap(), fresh, "edit at {edit_at}");
    }
}

#[test]
fn short_holes_are_data_and_a_file_of_only_a_hole_holds_nothing() {
    let store = MemStore::new();
    let keys = common::keys();
    let reader = TreeReader::new(&store, 1 << 20);
    let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
    w.write(&[1; 100]).unwrap();
    w.write_hole(fincrypt_blockstore::HOLE_MIN - 1).unwrap();
    w.write(&[2; 100]).unwrap();
    let f = w.finish().unwrap();
    assert!(
        matches!(f, FileRef::Tree(_)),
        "a short hole is stored as zeros"
    );
    assert_eq!(f.holes(), 0);
    let mut want = vec![1u8; 100];
    want.resize(100 + fincrypt_blockstore::HOLE_MIN as usize - 1, 0);
    want.extend_from_slice(&[2; 100]);
    assert_eq!(reader.read_all(&f).unwrap(), want);

    let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
    w.write_hole(1 << 50).unwrap();
    assert_eq!(w.finish().unwrap(), FileRef::Inline(Vec::new()));

    // A piece of a stream that is a hole and a few bytes is no cut: the
    // bytes are not dropped for a next piece that would start from nothing.
    let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
    w.write_hole(1 << 40).unwrap();
    w.write(&[5; 10]).unwrap();
    let (f, cut) = w.finish_at_cut().unwrap();
    assert!(!cut);
    assert_eq!(f.len(), (1 << 40) + 10);
    assert_eq!(
        reader.read_bytes(&f, 1 << 40, 10).unwrap().as_ref(),
        &[5; 10]
    );
}

#[test]
fn a_sparse_reference_is_a_new_variant_and_the_first_layout_still_reads() {
    let store = MemStore::new();
    let keys = common::keys();
    let reader = TreeReader::new(&store, 1 << 20);
    // A file without holes keeps the first layout, byte for byte.
    let plain = write_all(
        &store,
        &keys,
        SMALL,
        Class::Own,
        &common::bytes(5, 20_000, 0),
    )
    .unwrap();
    let FileRef::Tree(root) = &plain else {
        panic!("20,000 bytes are a tree")
    };
    let encoded = postcard::to_allocvec(&plain).unwrap();
    assert_eq!(encoded[0], 1);
    assert_eq!(postcard::from_bytes::<FileRef>(&encoded).unwrap(), plain);
    assert_eq!(
        reader.read_all(&FileRef::Tree(*root)).unwrap().len(),
        20_000
    );
    // A sparse one is variant 2: the root, then the bytes of holes.
    let mut w = TreeWriter::new(&store, &keys, SMALL, Class::Own);
    w.write(&[1; 10_000]).unwrap();
    w.write_hole(1 << 30).unwrap();
    w.write(&[1; 10]).unwrap();
    let sparse = w.finish().unwrap();
    let encoded = postcard::to_allocvec(&sparse).unwrap();
    assert_eq!(encoded[0], 2);
    assert_eq!(postcard::from_bytes::<FileRef>(&encoded).unwrap(), sparse);
    assert_eq!(sparse.holes(), 1 << 30);
}
