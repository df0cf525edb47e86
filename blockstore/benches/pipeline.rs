//! Write pipeline (chunk + key + compress + encrypt + score) and read pipeline
//! (verify + decrypt) beside bare SHA-256 over the same bytes, and 1 MiB
//! puts and gets on the local volume. `scripts/bench-blockstore.sh` turns the
//! results into the table in docs/PERFORMANCE.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fincrypt_blockstore::block::{BlockKind, seal};
use fincrypt_blockstore::tree::write_all;
use fincrypt_blockstore::{
    BlockStore, Class, LocalStore, MasterSecret, MemStore, StoreOptions, TreeParams, TreeReader,
};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

// Large block buffers are allocated and freed all the time; mimalloc reuses
// them where the system allocator maps and faults in fresh pages each time.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LEN: usize = 64 << 20;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Text-like bytes: words from a small vocabulary, as source code and logs are.
fn text(len: usize) -> Vec<u8> {
    let words: Vec<&[u8]> =
        b"fn let mut self return match struct impl pub use Result Error Ok None Some if else for while loop\n"
            .split(|b| *b == b' ')
            .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        v.extend_from_slice(words[(rng.next_u32() as usize) % words.len()]);
        v.push(b' ');
    }
    v.truncate(len);
    v
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn pipeline(c: &mut Criterion) {
    let keys = MasterSecret::generate().keys();
    let data = random(LEN, 1);
    let words = text(LEN);
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(LEN as u64));

    g.bench_function("sha256/1-core", |b| b.iter(|| Sha256::digest(&data)));
    for threads in [1, 2] {
        let p = pool(threads);
        for (name, input) in [("random", &data), ("text", &words)] {
            g.bench_function(
                BenchmarkId::new(format!("write-{name}"), format!("{threads}-core")),
                |b| {
                    b.iter(|| {
                        let store = MemStore::new();
                        p.install(|| {
                            write_all(&store, &keys, TreeParams::default(), Class::Own, input)
                                .unwrap()
                        })
                    })
                },
            );
        }
    }
    let store = MemStore::new();
    let file = write_all(&store, &keys, TreeParams::default(), Class::Own, &data).unwrap();
    g.bench_function("read-random/1-core", |b| {
        b.iter(|| {
            // A fresh reader each time: nothing comes from its cache.
            let reader = TreeReader::new(&store, 1);
            let mut buf = vec![0u8; 4 << 20];
            let mut off = 0;
            while off < LEN as u64 {
                off += reader.read_at(&file, off, &mut buf).unwrap() as u64;
            }
        })
    });
    g.finish();
}

fn volume(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
    let blocks: Vec<_> = (0..64)
        .map(|i| {
            let s = seal(&[1; 32], BlockKind::Data, &random(1 << 20, 100 + i)).unwrap();
            (s.pointer.score, s.data)
        })
        .collect();
    let mut g = c.benchmark_group("volume");
    g.sample_size(10);
    for batch in [1usize, 16] {
        g.throughput(Throughput::Bytes((batch << 20) as u64));
        g.bench_function(
            BenchmarkId::new("put-1MiB", format!("batch-{batch}")),
            |b| {
                b.iter_batched(
                    || {
                        // Fresh blocks every time, or the store would just deduplicate.
                        for (s, _) in &blocks[..batch] {
                            store.delete(s).unwrap();
                        }
                    },
                    |_| store.put_batch(&blocks[..batch], Class::Own).unwrap(),
                    criterion::BatchSize::PerIteration,
                )
            },
        );
    }
    store.put_batch(&blocks, Class::Own).unwrap();
    g.throughput(Throughput::Bytes(1 << 20));
    let mut i = 0;
    g.bench_function("get-1MiB/warm", |b| {
        b.iter(|| {
            i = (i + 1) % blocks.len();
            store.get(&blocks[i].0).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline, volume);
criterion_main!(benches);
