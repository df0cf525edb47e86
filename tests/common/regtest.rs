//! A real Bitcoin regtest node for a test (scripts/regtest.sh), stopped
//! when dropped. Shared by the market crate's tests and the binary's.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fincrypt_market::wallet::{BitcoinRpc, Payments, RpcAuth, RpcSettings};

/// A regtest node of its own, with 50 spendable coins.
pub struct Regtest {
    dir: tempfile::TempDir,
    /// How to reach its wallet.
    pub settings: RpcSettings,
    /// `FINCRYPT_BITCOIN_RPC_*` variables for a daemon to reach it.
    pub env: Vec<(String, String)>,
}

fn script() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if here.join("scripts").is_dir() {
        here.to_path_buf()
    } else {
        here.join("..")
    };
    root.join("scripts/regtest.sh")
}

impl Regtest {
    /// Starts one (installing it first if needed).
    pub fn start() -> Regtest {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/regtest.sh start failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let var = |name: &str| {
            env.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{name} not in {text}"))
        };
        let settings = RpcSettings {
            url: var("FINCRYPT_BITCOIN_RPC_URL"),
            wallet: None,
            auth: RpcAuth::UserPass(
                var("FINCRYPT_BITCOIN_RPC_USER"),
                var("FINCRYPT_BITCOIN_RPC_PASSWORD"),
            ),
        };
        Regtest { dir, settings, env }
    }

    /// A client of its wallet.
    pub fn wallet(&self) -> BitcoinRpc {
        BitcoinRpc::new(&self.settings).unwrap()
    }

    /// `bitcoin-cli ARGS` against it; its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(script())
            .arg("cli")
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "bitcoin-cli {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Mines `n` blocks: confirms what was sent and matures coinbases.
    pub async fn mine(&self, n: u32) {
        let to = self.wallet().new_address().await.unwrap();
        self.cli(&["generatetoaddress", &n.to_string(), &to]);
    }
}

impl Drop for Regtest {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Mines a block every second until dropped, as a network would (a wallet
/// spends only confirmed coins, and each settlement's change is new).
pub struct Miner {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Miner {
    /// Mines to `address` (each block also matures one more of the
    /// coinbases `scripts/regtest.sh start` mined to the wallet).
    pub fn start(bitcoin: &std::sync::Arc<Regtest>, address: &str) -> Miner {
        let address = address.to_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, s) = (bitcoin.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                b.cli(&["generatetoaddress", "1", &address]);
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        Miner {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
