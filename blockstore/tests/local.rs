//! The on-disk volume: classes, eviction, GC sweeps, scrub, and no plaintext on disk.

mod common;

use std::collections::HashSet;

use bytes::Bytes;
use fincrypt_blockstore::block::{BlockKind, seal};
use fincrypt_blockstore::{
    BlockStore, Class, Error, LocalStore, Score, StoreOptions, TreeParams, TreeReader, TreeWriter,
};

fn block(seed: u64, len: usize) -> (Score, Bytes) {
    let s = seal(&[1; 32], BlockKind::Data, &common::bytes(seed, len, 0)).unwrap();
    (s.pointer.score, s.data)
}

fn open(dir: &std::path::Path) -> LocalStore {
    LocalStore::open(
        dir,
        StoreOptions {
            cache_capacity: 10_000,
        },
    )
    .unwrap()
}

#[test]
fn put_get_has_delete_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let blocks: Vec<_> = (0..5).map(|i| block(i, 1000 + i as usize)).collect();
    {
        let store = open(dir.path());
        store.put_batch(&blocks, Class::Own).unwrap();
        assert_eq!(store.stats().own_blocks, 5);
        assert!(store.delete(&blocks[0].0).unwrap());
        assert!(!store.delete(&blocks[0].0).unwrap());
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert!(matches!(store.get(&blocks[0].0), Err(Error::NotFound(_))));
    for (s, d) in &blocks[1..] {
        assert!(store.has(s).unwrap());
        assert_eq!(&store.get(s).unwrap(), d);
    }
    let st = store.stats();
    assert_eq!(st.own_blocks, 4);
    assert_eq!(
        st.own_bytes,
        blocks[1..].iter().map(|b| b.1.len() as u64).sum::<u64>()
    );
    assert!(store.scrub().unwrap().is_clean());
}

#[test]
fn classes_only_rise() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let b = block(1, 100);
    store.put(b.0, b.1.clone(), Class::Cached).unwrap();
    assert_eq!(store.class_of(&b.0).unwrap(), Some(Class::Cached));
    store.put(b.0, b.1.clone(), Class::Own).unwrap();
    assert_eq!(store.class_of(&b.0).unwrap(), Some(Class::Own));
    store.put(b.0, b.1.clone(), Class::Held).unwrap();
    assert_eq!(store.class_of(&b.0).unwrap(), Some(Class::Own));
    let st = store.stats();
    assert_eq!((st.own_blocks, st.cached_blocks, st.held_blocks), (1, 0, 0));
}

#[test]
fn cached_blocks_are_evicted_by_use_and_others_never() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let own = block(100, 3000);
    let held = block(101, 3000);
    store.put(own.0, own.1.clone(), Class::Own).unwrap();
    store.put(held.0, held.1.clone(), Class::Held).unwrap();
    let favourite = block(0, 1000);
    store
        .put(favourite.0, favourite.1.clone(), Class::Cached)
        .unwrap();
    for _ in 0..5 {
        store.get(&favourite.0).unwrap();
    }
    for i in 1..40 {
        let b = block(i, 1000);
        store.put(b.0, b.1, Class::Cached).unwrap();
    }
    let st = store.stats();
    assert!(st.cached_bytes <= 10_000, "{st:?}");
    assert!(st.cached_blocks < 40);
    assert!(
        store.has(&favourite.0).unwrap(),
        "the most used block stays"
    );
    assert!(store.has(&own.0).unwrap() && store.has(&held.0).unwrap());
    assert!(store.scrub().unwrap().is_clean());
}

#[test]
fn sweep_frees_unreferenced_own_blocks_but_spares_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (live, dead, held) = (block(1, 500), block(2, 500), block(3, 500));
    store.put(live.0, live.1.clone(), Class::Own).unwrap();
    store.put(dead.0, dead.1.clone(), Class::Own).unwrap();
    store.put(held.0, held.1.clone(), Class::Held).unwrap();
    let mark = store.mark();
    // Written after the mark by a concurrent writer: not yet in any root.
    let fresh = block(4, 500);
    store.put(fresh.0, fresh.1.clone(), Class::Own).unwrap();
    let removed = store.sweep(&HashSet::from([live.0]), mark).unwrap();
    assert_eq!(removed, vec![dead.0]);
    assert!(!store.has(&dead.0).unwrap());
    assert!(
        store.has(&live.0).unwrap() && store.has(&fresh.0).unwrap() && store.has(&held.0).unwrap()
    );
    // A block reused after the mark is spared too.
    let mark = store.mark();
    store.put(live.0, live.1.clone(), Class::Own).unwrap();
    assert_eq!(
        store.sweep(&HashSet::new(), mark).unwrap(),
        vec![fresh.0],
        "only `fresh` goes"
    );
    assert!(store.has(&live.0).unwrap());
    assert!(store.scrub().unwrap().is_clean());
}

#[test]
fn own_blocks_keep_a_tag_that_old_entries_lack_and_a_sweep_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let (own, kept, held, absent) = (block(1, 3000), block(2, 3000), block(3, 3000), block(4, 10));
    {
        let store = open(dir.path());
        store.put(own.0, own.1.clone(), Class::Own).unwrap();
        store.put(kept.0, kept.1.clone(), Class::Own).unwrap();
        store.put(held.0, held.1.clone(), Class::Held).unwrap();
        // An entry as written before tags existed: class, size, hits, last use, sequence.
        let txn = store.index().begin_write().unwrap();
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<[u8; 32], &[u8]>::new("blocks"))
                .unwrap();
            let old = postcard::to_allocvec(&(2u8, own.1.len() as u64, 0u64, 0u64, 1u64)).unwrap();
            t.insert(own.0.0, old.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let scores = [own.0, kept.0, held.0, absent.0];
        assert_eq!(
            store.tags_of(&scores).unwrap(),
            vec![Some(0), Some(0), None, None]
        );
        assert_eq!(
            store
                .set_tags(&[(own.0, 7), (kept.0, 300), (held.0, 1), (absent.0, 1)])
                .unwrap(),
            vec![true, true, false, false],
            "only own blocks take a tag"
        );
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.get(&own.0).unwrap(),
        own.1,
        "the old entry still reads"
    );
    assert_eq!(store.size_of(&own.0).unwrap(), Some(own.1.len() as u64));
    // Put again: the tag stays.
    store.put(own.0, own.1.clone(), Class::Own).unwrap();
    let mut tagged = store.tagged_after(None, 10).unwrap();
    tagged.sort();
    let mut want = vec![(own.0, 7), (kept.0, 300)];
    want.sort();
    assert_eq!(tagged, want);
    assert_eq!(store.tagged_after(Some(&want[0].0), 10).unwrap(), want[1..]);
    // A sweep hands over the tags of what it frees first, and frees nothing if that fails.
    let live = HashSet::from([kept.0]);
    let refused = store.sweep_keeping_tags(&live, store.mark(), |_| {
        Err(Error::Index("cannot keep them".into()))
    });
    assert!(refused.is_err());
    assert!(store.has(&own.0).unwrap());
    let mut handed = Vec::new();
    let gone = store
        .sweep_keeping_tags(&live, store.mark(), |tags| {
            handed.extend_from_slice(tags);
            Ok(())
        })
        .unwrap();
    assert_eq!(gone, vec![own.0]);
    assert_eq!(handed, vec![(own.0, 7)]);
    // Tags made for another user of the volume are cleared at once.
    assert_eq!(store.tag_epoch().unwrap(), 0);
    assert_eq!(store.reset_tags(9).unwrap(), 1);
    assert_eq!(store.tag_epoch().unwrap(), 9);
    assert_eq!(store.tags_of(&[kept.0]).unwrap(), vec![Some(0)]);
}

#[test]
fn any_flipped_byte_fails_get_and_scrub_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (score, data) = block(9, 20_000);
    store.put(score, data.clone(), Class::Own).unwrap();
    let path = store.path_of(&score);
    for pos in [0, 1, 4095, 4096, 10_000, data.len() - 17, data.len() - 1] {
        let mut bad = data.to_vec();
        bad[pos] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        assert!(
            matches!(store.get(&score), Err(Error::Corrupt { .. })),
            "flip at {pos}"
        );
        assert_eq!(store.scrub().unwrap().corrupt, vec![score], "flip at {pos}");
    }
    std::fs::write(&path, &data[..data.len() - 1]).unwrap();
    assert!(
        matches!(store.get(&score), Err(Error::Corrupt { .. })),
        "truncated"
    );
    std::fs::remove_file(&path).unwrap();
    let report = store.scrub().unwrap();
    assert_eq!(report.missing, vec![score]);
    std::fs::write(&path, &data).unwrap();
    let stray = block(10, 100).0;
    std::fs::write(store.path_of(&stray), b"junk").unwrap_or_else(|_| {
        std::fs::create_dir_all(store.path_of(&stray).parent().unwrap()).unwrap();
        std::fs::write(store.path_of(&stray), b"junk").unwrap();
    });
    let report = store.scrub().unwrap();
    assert!(report.corrupt.is_empty() && report.missing.is_empty());
    assert_eq!(report.orphans, vec![store.path_of(&stray)]);
}

#[test]
fn partial_reads_check_the_segments_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (score, data) = block(11, 300_000);
    store.put(score, data.clone(), Class::Own).unwrap();
    let len = data.len();
    // The first partial read checks the whole block; later ones only their segments.
    for range in [0..10, 4090..4100, 8192..12288, len - 5..len, 7..7, 0..len] {
        let got = store.get_range(&score, range.clone()).unwrap();
        assert_eq!(&got[..], &data[range.clone()], "range {range:?}");
    }
    assert!(store.get_range(&score, 0..len + 1).is_err());
    let path = store.path_of(&score);
    let mut bad = data.to_vec();
    bad[150_000] ^= 0x01;
    std::fs::write(&path, &bad).unwrap();
    let seg = 150_000 / 4096 * 4096;
    assert!(matches!(
        store.get_range(&score, 150_000..150_001),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store.get_range(&score, seg - 10..seg + 1),
        Err(Error::Corrupt { .. })
    ));
    // Segments that are intact still read.
    assert_eq!(&store.get_range(&score, 0..100).unwrap()[..], &data[..100]);
    std::fs::write(&path, &data[..len - 1]).unwrap();
    assert!(matches!(
        store.get_range(&score, len - 10..len),
        Err(Error::Corrupt { .. })
    ));
    // A damaged block is refused on its first partial read too.
    let (score2, data2) = block(12, 50_000);
    store.put(score2, data2.clone(), Class::Own).unwrap();
    let mut bad = data2.to_vec();
    bad[40_000] ^= 0x80;
    std::fs::write(store.path_of(&score2), &bad).unwrap();
    assert!(matches!(
        store.get_range(&score2, 0..10),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn no_plaintext_reaches_the_volume() {
    let marker = b"FINCRYPT-PLAINTEXT-MARKER-7f3a";
    let dir = tempfile::tempdir().unwrap();
    let keys = common::keys();
    {
        let store = open(dir.path());
        // Marker in compressible text, in random data, and in a small file.
        let mut text = b"some compressible words ".repeat(100_000);
        text.extend_from_slice(marker);
        let mut random = common::bytes(5, 3 << 20, 0);
        random[1 << 20..(1 << 20) + marker.len()].copy_from_slice(marker);
        for data in [text, random, marker.repeat(200)] {
            let mut w = TreeWriter::new(&store, &keys, TreeParams::default(), Class::Own);
            w.write(&data).unwrap();
            let f = w.finish().unwrap();
            assert_eq!(TreeReader::new(&store, 0).read_all(&f).unwrap(), data);
        }
        store.close().unwrap();
    }
    let files = common::files_under(dir.path());
    assert!(files.len() > 3);
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "marker in {}",
            f.display()
        );
    }
}

#[test]
fn held_blocks_of_any_length_are_stored_exactly() {
    // Held blocks are written past the page cache in 4 KiB-aligned pieces and
    // cut to length: lengths around the alignment must come back exact.
    let dir = tempfile::tempdir().unwrap();
    let lens = [
        1usize,
        511,
        4095,
        4096,
        4097,
        65_536 + 17,
        (1 << 20) + 3,
        2 << 20,
        (3 << 20) + 4095,
    ];
    let blocks: Vec<(Score, Bytes)> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let data = Bytes::from(common::bytes(i as u64, len, 0));
            (Score::of(&data), data)
        })
        .collect();
    {
        let store = open(dir.path());
        store.put_batch(&blocks[..3], Class::Held).unwrap();
        for b in &blocks[3..] {
            store.put(b.0, b.1.clone(), Class::Held).unwrap();
        }
        for (s, d) in &blocks {
            assert_eq!(&store.get(s).unwrap(), d);
        }
        store.close().unwrap();
    }
    let store = open(dir.path());
    for (s, d) in &blocks {
        assert_eq!(
            &store.get(s).unwrap(),
            d,
            "block of {} bytes after reopen",
            d.len()
        );
    }
    let st = store.stats();
    assert_eq!(st.held_blocks, lens.len() as u64);
    assert_eq!(st.held_bytes, lens.iter().sum::<usize>() as u64);
    assert!(store.scrub().unwrap().is_clean());
}

#[test]
fn staged_blocks_join_in_one_commit_and_leave_nothing_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let tmp_files = || std::fs::read_dir(dir.path().join("tmp")).unwrap().count();
    let (kept, dropped, cached, twice) =
        (block(1, 5000), block(2, 6000), block(3, 700), block(4, 800));
    store
        .put(cached.0, cached.1.clone(), Class::Cached)
        .unwrap();

    // Staged from several threads, as a holder's puts are.
    let mut staged: Vec<_> = std::thread::scope(|s| {
        let jobs: Vec<_> = [&kept, &dropped, &cached, &twice, &twice]
            .into_iter()
            .map(|(score, data)| {
                let store = &store;
                s.spawn(move || {
                    let mut st = store.stage(score, data, Class::Held, true).unwrap();
                    st.sync().unwrap();
                    st
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    // Two new blocks, the second staged twice; the cached one needs no file.
    assert_eq!(tmp_files(), 4);
    let dropped_stage = staged.remove(1);
    assert_eq!(dropped_stage.score(), &dropped.0);
    drop(dropped_stage);
    assert_eq!(tmp_files(), 3);

    store.put_staged(staged, Class::Held, true).unwrap();
    assert_eq!(tmp_files(), 0, "every staged file was linked in or removed");
    for (score, data) in [&kept, &cached, &twice] {
        assert_eq!(&store.get(score).unwrap(), data);
        assert_eq!(store.class_of(score).unwrap(), Some(Class::Held));
    }
    assert!(!store.has(&dropped.0).unwrap());
    let st = store.stats();
    assert_eq!((st.held_blocks, st.cached_blocks), (3, 0));
    assert_eq!(
        st.held_bytes,
        (kept.1.len() + cached.1.len() + twice.1.len()) as u64
    );
    drop(store);

    let store = open(dir.path());
    assert_eq!(&store.get(&twice.0).unwrap(), &twice.1);
    assert!(store.scrub().unwrap().is_clean());
}

#[test]
fn a_scrub_while_blocks_come_and_go_finds_nothing_stray_or_missing() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(open(dir.path()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (score, data) = block(1000 + i, 2000);
                store.put(score, data, Class::Held).unwrap();
                if i % 2 == 1 {
                    store.delete(&score).unwrap();
                }
                i += 1;
            }
            i
        })
    };
    for _ in 0..200 {
        let report = store.scrub().unwrap();
        assert!(
            report.is_clean(),
            "a scrub during puts and deletes: {report:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(writer.join().unwrap() > 0, "blocks came and went meanwhile");
}
