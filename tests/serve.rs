//! `fincrypt serve` as a process: it comes up, holds blocks for a real peer,
//! keeps its PeerId across restarts, and exits 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use fincrypt_blockstore::Score;
use fincrypt_net::{Multiaddr, Node, NodeConfig, PeerId};

mod common;

const START_LIMIT: Duration = Duration::from_secs(60);

struct Served {
    child: Reaped,
    peer: PeerId,
    addr: Multiaddr,
    _lines: Receiver<String>,
}

/// A child process that is killed and reaped when dropped, so a failed test
/// leaves no node running behind it.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `fincrypt --home HOME serve ARGS` and waits for its "listening on" line.
fn serve(home: &Path, args: &[&str]) -> Served {
    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_fincrypt"))
            .arg("--home")
            .arg(home)
            .arg("serve")
            .args(args)
            .env_remove("FINCRYPT_PASSPHRASE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[serve] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + START_LIMIT;
    let mut peer = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!("serve did not come up: {e}"),
        };
        if let Some(rest) = line.strip_prefix("fincrypt serve: peer ") {
            let id = rest.split(',').next().unwrap();
            peer = Some(id.parse::<PeerId>().unwrap());
        }
        if let Some(addr) = line.strip_prefix("fincrypt serve: listening on ") {
            let addr: Multiaddr = addr.parse().unwrap();
            let peer = peer.expect("the peer line comes first");
            assert!(addr.to_string().ends_with(&format!("/p2p/{peer}")));
            return Served {
                child,
                peer,
                addr,
                _lines: lines,
            };
        }
    }
}

/// Sends SIGTERM and waits for a clean exit.
fn stop(mut s: Served) {
    let pid = s.child.0.id() as libc::pid_t;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    match common::wait_child(&mut s.child.0, Duration::from_secs(30)) {
        Some(status) => assert!(status.success(), "serve exited with {status}"),
        None => panic!("serve did not exit within 30 s of SIGTERM"),
    }
}

#[test]
fn two_serve_nodes_come_up_hold_blocks_and_stop_on_sigterm() {
    let home_a = tempfile::tempdir().unwrap();
    let home_b = tempfile::tempdir().unwrap();
    let a = serve(
        home_a.path(),
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "5MiB"],
    );
    let a_addr = a.addr.to_string();
    let b = serve(
        home_b.path(),
        &[
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &a_addr,
            "--capacity",
            "500MB",
        ],
    );
    assert_ne!(a.peer, b.peer);
    let key = home_a.path().join("node.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A real peer places a block on each node and reads it back.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
        config.bootstrap = vec![a.addr.clone(), b.addr.clone()];
        let node = Node::start(config, None).await.unwrap();
        let client = node.client();
        let data = bytes::Bytes::from(vec![42u8; 300_000]);
        let score = Score::of(&data);
        for peer in [a.peer, b.peer] {
            let put = client.put(peer, score, data.clone());
            tokio::time::timeout(START_LIMIT, put)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(client.get(peer, score).await.unwrap(), data);
            assert!(client.challenge(peer, score).await.unwrap());
        }
        // a offers 5 MiB: more is refused with a clear error.
        let big = bytes::Bytes::from(vec![7u8; 8 << 20]);
        let err = client.put(a.peer, Score::of(&big), big).await.unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        node.shutdown().await;
    });
    drop(runtime);
    assert!(home_a.path().join("held").is_dir());
    // The placements live in the volume's index, not in a file of their own.
    assert!(!home_a.path().join("placements.redb").exists());

    stop(b);
    stop(a);

    // Restarted, a is the same peer and still holds the block.
    let a = serve(
        home_a.path(),
        &["--listen", "/ip4/127.0.0.1/tcp/0", "--capacity", "5MiB"],
    );
    assert_eq!(
        a.addr.to_string().rsplit('/').next().unwrap(),
        a_addr.rsplit('/').next().unwrap()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = NodeConfig::new(fincrypt_net::Keypair::generate_ed25519());
        config.bootstrap = vec![a.addr.clone()];
        let node = Node::start(config, None).await.unwrap();
        let score = Score::of(&vec![42u8; 300_000]);
        let client = node.client();
        let has = tokio::time::timeout(START_LIMIT, client.has(a.peer, &[score])).await;
        assert_eq!(has.unwrap().unwrap(), vec![true]);
        node.shutdown().await;
    });
    stop(a);
}

#[test]
fn bad_arguments_are_refused_before_anything_starts() {
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fincrypt"))
            .arg("--home")
            .arg(home.path())
            .arg("serve")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--capacity",
        "2 parsecs",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
    let out = run(&["--listen", "not an address", "--capacity", "1GiB"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--capacity", "1GiB"]);
    assert_eq!(out.status.code(), Some(2));
    // Nothing was created by a refused command line.
    assert!(!home.path().join("node.key").exists());
}
