//! kill -9 while blocks are being put: every acknowledged block survives, and
//! the index and the volume agree afterwards.
//!
//! The test binary runs itself as the child (the ignored test `child_put_loop`),
//! which prints each score once `put_batch` has returned.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fincrypt_blockstore::block::{BlockKind, seal};
use fincrypt_blockstore::{BlockStore, Class, LocalStore, Score, StoreOptions};
use rand::{Rng, SeedableRng};

const DIR_VAR: &str = "FINCRYPT_CRASH_TEST_DIR";

#[test]
#[ignore = "run by kill_9_during_puts_loses_no_acknowledged_block as its child"]
fn child_put_loop() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let store = LocalStore::open(dir.as_ref(), StoreOptions::default()).unwrap();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut out = std::io::stdout().lock();
    loop {
        let batch: Vec<_> = (0..rng.gen_range(1..8))
            .map(|_| {
                let len = rng.gen_range(1..(1 << 20));
                let s = seal(
                    &[3; 32],
                    BlockKind::Data,
                    &common::bytes(rng.r#gen(), len, 0),
                )
                .unwrap();
                (s.pointer.score, s.data)
            })
            .collect();
        store.put_batch(&batch, Class::Own).unwrap();
        for (score, _) in &batch {
            use std::io::Write;
            writeln!(out, "{score}").unwrap();
        }
        std::io::Write::flush(&mut out).unwrap();
    }
}

#[test]
fn kill_9_during_puts_loses_no_acknowledged_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut acked: Vec<Score> = Vec::new();
    for trial in 0..20 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_put_loop",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(s) = Score::from_hex(line.trim())
                    && tx.send(s).is_err()
                {
                    break;
                }
            }
        });
        // Kill after a random number of acknowledgements, at a random point of a put.
        let wanted = rng.gen_range(1..30);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < wanted {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => {
                    acked.push(s);
                    seen += 1;
                }
                Err(_) => {
                    panic!("trial {trial}: the child acknowledged only {seen} blocks in 60 s")
                }
            }
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..20_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        acked.extend(rx.try_iter());

        let store = LocalStore::open(dir.path(), StoreOptions::default()).unwrap();
        for s in &acked {
            store
                .get(s)
                .unwrap_or_else(|e| panic!("trial {trial}: acknowledged block lost: {e}"));
        }
        let report = store.scrub().unwrap();
        assert!(
            report.is_clean(),
            "trial {trial}: index and volume disagree: {report:?}"
        );
        assert_eq!(store.stats().own_blocks, report.checked);
        store.close().unwrap();
    }
    assert!(acked.len() >= 20);
}
