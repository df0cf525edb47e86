//! Payments through a Bitcoin node's own wallet, over its JSON-RPC.
//!
//! No key of Fincrypt's holds coins: the node's wallet makes addresses,
//! chooses coins, signs and broadcasts. Only RPCs that Bitcoin Core has are
//! used (`getnewaddress`, `getbalance`, `sendmany`, `listtransactions`,
//! `gettransaction`, `getreceivedbyaddress`), each with arguments Core and the
//! regtest node of the tests (Bitcoin SV's, scripts/regtest.sh) read alike.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;

use corepc_client::{Auth, Client};
use serde::Deserialize;
use serde_json::{Value, json};

/// Satoshis in one coin.
pub const SATS_PER_COIN: u64 = 100_000_000;

/// Why a wallet call failed, and whether the node can have acted on it.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// The node answered with an error: it did not do what was asked.
    #[error("the Bitcoin node refused {method}: {message} (code {code})")]
    Refused {
        /// The RPC.
        method: &'static str,
        /// The node's error code (-6: insufficient funds, -5: bad address).
        code: i32,
        /// The node's message.
        message: String,
    },
    /// No answer (connection, timeout, bad credentials): the node may or
    /// may not have acted, so a send must be reconciled before it is retried.
    #[error("the Bitcoin node at {url} did not answer {method}: {reason}")]
    Unreachable {
        /// The node's RPC URL.
        url: String,
        /// The RPC.
        method: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The node answered something this program cannot read.
    #[error("the Bitcoin node's answer to {method} is not understood: {reason}")]
    Answer {
        /// The RPC.
        method: &'static str,
        /// What did not parse.
        reason: String,
    },
}

impl WalletError {
    /// True when the node certainly built no transaction: it refused the
    /// call for its arguments or the wallet's state before building one (no
    /// funds, a bad address or parameter, a locked wallet, an unknown
    /// method). Any other error, even an answer, may come after the wallet
    /// recorded a transaction, so a send that failed so is reconciled.
    pub fn is_refusal(&self) -> bool {
        const BEFORE_BUILDING: [i32; 9] = [-3, -5, -6, -8, -13, -32600, -32601, -32602, -32700];
        matches!(self, WalletError::Refused { code, .. } if BEFORE_BUILDING.contains(code))
    }

    /// True when the node refused for want of funds.
    pub fn is_insufficient_funds(&self) -> bool {
        matches!(self, WalletError::Refused { code: -6, .. })
    }
}

/// A transaction of the wallet, as far as payments need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalletTx {
    /// Its id, hex.
    pub txid: String,
    /// Blocks on top of (and including) the one that holds it; 0 unconfirmed.
    pub confirmations: i64,
}

/// What pays and what watches payments arrive. [`BitcoinRpc`] is the real
/// one; anything else is for tests.
pub trait Payments: Send + Sync {
    /// A new receiving address of this wallet.
    fn new_address(&self) -> impl Future<Output = Result<String, WalletError>> + Send;
    /// Spendable balance, in satoshis.
    fn balance(&self) -> impl Future<Output = Result<u64, WalletError>> + Send;
    /// Pays every output in one transaction, with `label` kept as its
    /// comment so that [`Payments::find_sent`] can find it again.
    /// Addresses must be distinct.
    fn send_many(
        &self,
        outputs: &[(String, u64)],
        label: &str,
    ) -> impl Future<Output = Result<String, WalletError>> + Send;
    /// The transaction this wallet sent with comment `label` or, should the
    /// comment be gone (a wallet restored from its seed keeps none), one
    /// that pays every one of `outputs` and is not in `known`; looking back
    /// no further than Unix time `since`. Conflicted and abandoned
    /// transactions do not count.
    fn find_sent(
        &self,
        label: &str,
        outputs: &[(String, u64)],
        since: u64,
        known: &HashSet<String>,
    ) -> impl Future<Output = Result<Option<WalletTx>, WalletError>> + Send;
    /// Whether `address` is one this node can pay.
    fn validate_address(
        &self,
        address: &str,
    ) -> impl Future<Output = Result<bool, WalletError>> + Send;
    /// A transaction's confirmations.
    fn transaction(&self, txid: &str)
    -> impl Future<Output = Result<WalletTx, WalletError>> + Send;
    /// Satoshis received by one of this wallet's addresses, in transactions
    /// with at least `min_conf` confirmations.
    fn received_by(
        &self,
        address: &str,
        min_conf: u32,
    ) -> impl Future<Output = Result<u64, WalletError>> + Send;
}

/// A shared wallet pays as the wallet does (a mediator's markets share one).
impl<T: Payments> Payments for std::sync::Arc<T> {
    fn new_address(&self) -> impl Future<Output = Result<String, WalletError>> + Send {
        (**self).new_address()
    }
    fn balance(&self) -> impl Future<Output = Result<u64, WalletError>> + Send {
        (**self).balance()
    }
    fn send_many(
        &self,
        outputs: &[(String, u64)],
        label: &str,
    ) -> impl Future<Output = Result<String, WalletError>> + Send {
        (**self).send_many(outputs, label)
    }
    fn find_sent(
        &self,
        label: &str,
        outputs: &[(String, u64)],
        since: u64,
        known: &HashSet<String>,
    ) -> impl Future<Output = Result<Option<WalletTx>, WalletError>> + Send {
        (**self).find_sent(label, outputs, since, known)
    }
    fn validate_address(
        &self,
        address: &str,
    ) -> impl Future<Output = Result<bool, WalletError>> + Send {
        (**self).validate_address(address)
    }
    fn transaction(
        &self,
        txid: &str,
    ) -> impl Future<Output = Result<WalletTx, WalletError>> + Send {
        (**self).transaction(txid)
    }
    fn received_by(
        &self,
        address: &str,
        min_conf: u32,
    ) -> impl Future<Output = Result<u64, WalletError>> + Send {
        (**self).received_by(address, min_conf)
    }
}

/// Where the node is and how to log in: the `bitcoin_rpc_*` settings.
#[derive(Clone, Debug)]
pub struct RpcSettings {
    /// `http://host:port`.
    pub url: String,
    /// The wallet's name, for a node with several (`bitcoin_wallet`).
    pub wallet: Option<String>,
    /// User and password, or a cookie file.
    pub auth: RpcAuth,
}

/// How to log in to the node. (Its `Debug` hides the password.)
#[derive(Clone)]
pub enum RpcAuth {
    /// `bitcoin_rpc_user` and `bitcoin_rpc_password`.
    UserPass(String, String),
    /// `bitcoin_rpc_cookie`: the node's `.cookie` file.
    Cookie(PathBuf),
}

impl std::fmt::Debug for RpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RpcAuth::UserPass(user, _) => write!(f, "UserPass({user:?}, (hidden))"),
            RpcAuth::Cookie(path) => write!(f, "Cookie({path:?})"),
        }
    }
}

/// A Bitcoin node's wallet over JSON-RPC (corepc-client's async client).
pub struct BitcoinRpc {
    client: Client,
    url: String,
}

impl BitcoinRpc {
    /// A client for the node; nothing is sent until the first call.
    pub fn new(settings: &RpcSettings) -> Result<BitcoinRpc, WalletError> {
        let url = match &settings.wallet {
            Some(w) => format!("{}/wallet/{w}", settings.url.trim_end_matches('/')),
            None => settings.url.clone(),
        };
        let auth = match &settings.auth {
            RpcAuth::UserPass(u, p) => Auth::UserPass(u.clone(), p.clone()),
            RpcAuth::Cookie(path) => Auth::CookieFile(path.clone()),
        };
        let client = Client::new_with_auth(&url, auth).map_err(|e| WalletError::Unreachable {
            url: settings.url.clone(),
            method: "login",
            reason: e.to_string(),
        })?;
        Ok(BitcoinRpc {
            client,
            url: settings.url.clone(),
        })
    }

    async fn call<T: for<'a> Deserialize<'a>>(
        &self,
        method: &'static str,
        args: &[Value],
    ) -> Result<T, WalletError> {
        use corepc_client::Error as E;
        self.client.call(method, args).await.map_err(|e| match e {
            E::JsonRpc(jsonrpc::Error::Rpc(rpc)) => WalletError::Refused {
                method,
                code: rpc.code,
                message: rpc.message,
            },
            E::Json(e) => WalletError::Answer {
                method,
                reason: e.to_string(),
            },
            other => WalletError::Unreachable {
                url: self.url.clone(),
                method,
                reason: other.to_string(),
            },
        })
    }
}

/// `sats` as the decimal coin amount the RPC reads, as a string: exact,
/// where a float could round.
pub fn coins(sats: u64) -> String {
    format!("{}.{:08}", sats / SATS_PER_COIN, sats % SATS_PER_COIN)
}

/// A coin amount from the RPC (a JSON number with at most 8 decimals) in
/// satoshis; its sign is dropped.
pub fn sats_of(v: &Value, method: &'static str) -> Result<u64, WalletError> {
    let bad = |reason: String| WalletError::Answer { method, reason };
    let coins = v
        .as_f64()
        .ok_or_else(|| bad(format!("{v} is not an amount")))?;
    let sats = (coins.abs() * SATS_PER_COIN as f64).round();
    // Every amount of 21 million coins or less is exact in an f64 in satoshis.
    if !sats.is_finite() || sats > (21_000_000 * SATS_PER_COIN) as f64 {
        return Err(bad(format!("{v} is not a possible amount")));
    }
    Ok(sats as u64)
}

/// One entry of `listtransactions`: one output of a transaction.
#[derive(Deserialize)]
struct Listed {
    category: String,
    txid: Option<String>,
    comment: Option<String>,
    time: Option<u64>,
    confirmations: Option<i64>,
    address: Option<String>,
    amount: Option<Value>,
    abandoned: Option<bool>,
}

/// What the listed entries of one sent transaction say.
#[derive(Default)]
struct Sent {
    comment: Option<String>,
    confirmations: i64,
    live: bool,
    paid: Vec<(String, u64)>,
}

impl BitcoinRpc {
    /// A transaction of this wallet's fee (satoshis) and size (bytes).
    pub async fn fee_and_size(&self, txid: &str) -> Result<(u64, u64), WalletError> {
        let v: Value = self.call("gettransaction", &[json!(txid)]).await?;
        let fee = sats_of(&v["fee"], "gettransaction")?;
        let hex = v["hex"].as_str().ok_or_else(|| WalletError::Answer {
            method: "gettransaction",
            reason: "no raw transaction".into(),
        })?;
        Ok((fee, hex.len() as u64 / 2))
    }

    /// What transaction `txid` paid `address` (satoshis) and its
    /// confirmations; none when the wallet does not know the transaction.
    pub async fn paid_to(
        &self,
        txid: &str,
        address: &str,
    ) -> Result<Option<(u64, i64)>, WalletError> {
        let v: Value = match self.call("gettransaction", &[json!(txid)]).await {
            Ok(v) => v,
            // Invalid or non-wallet transaction id.
            Err(WalletError::Refused { code: -5, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let confirmations = v["confirmations"].as_i64().unwrap_or(0);
        let mut sats = 0u64;
        for d in v["details"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            if d["category"] == "receive" && d["address"] == address {
                sats = sats.saturating_add(sats_of(&d["amount"], "gettransaction")?);
            }
        }
        Ok(Some((sats, confirmations)))
    }

    /// Whether `address` is one of this wallet's own, so that it sees what
    /// is paid there (`getaddressinfo`; `validateaddress` on a node
    /// without it, as the regtest node of the tests).
    pub async fn is_mine(&self, address: &str) -> Result<bool, WalletError> {
        let v: Value = match self.call("getaddressinfo", &[json!(address)]).await {
            Ok(v) => v,
            Err(WalletError::Refused { code: -32601, .. }) => {
                self.call("validateaddress", &[json!(address)]).await?
            }
            Err(e) => return Err(e),
        };
        Ok(v["ismine"].as_bool().unwrap_or(false))
    }
}

/// A payment received at one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub txid: String,
    pub sats: u64,
    pub confirmations: i64,
    /// Unix seconds the wallet first saw it.
    pub time: u64,
}

impl BitcoinRpc {
    /// Payments to `address` in the wallet's newest `limit` transactions,
    /// newest first; conflicted ones are left out.
    pub async fn receipts(&self, address: &str, limit: usize) -> Result<Vec<Receipt>, WalletError> {
        let page: Vec<Listed> = self
            .call("listtransactions", &[json!("*"), json!(limit), json!(0)])
            .await?;
        let mut out = Vec::new();
        for t in page.iter().rev() {
            if t.category != "receive" || t.address.as_deref() != Some(address) {
                continue;
            }
            let (Some(txid), Some(amount)) = (&t.txid, &t.amount) else {
                continue;
            };
            let confirmations = t.confirmations.unwrap_or(0);
            if confirmations < 0 {
                continue;
            }
            out.push(Receipt {
                txid: txid.clone(),
                sats: sats_of(amount, "listtransactions")?,
                confirmations,
                time: t.time.unwrap_or(0),
            });
        }
        Ok(out)
    }
}

impl Payments for BitcoinRpc {
    async fn new_address(&self) -> Result<String, WalletError> {
        self.call("getnewaddress", &[]).await
    }

    async fn balance(&self) -> Result<u64, WalletError> {
        let v: Value = self.call("getbalance", &[]).await?;
        sats_of(&v, "getbalance")
    }

    async fn send_many(
        &self,
        outputs: &[(String, u64)],
        label: &str,
    ) -> Result<String, WalletError> {
        let mut amounts = serde_json::Map::new();
        for (address, sats) in outputs {
            if amounts
                .insert(address.clone(), Value::String(coins(*sats)))
                .is_some()
            {
                return Err(WalletError::Answer {
                    method: "sendmany",
                    reason: format!("{address} is paid twice in one transaction"),
                });
            }
        }
        // ("" is the account/dummy argument both nodes take first; minconf 1.)
        self.call(
            "sendmany",
            &[json!(""), Value::Object(amounts), json!(1), json!(label)],
        )
        .await
    }

    async fn find_sent(
        &self,
        label: &str,
        outputs: &[(String, u64)],
        since: u64,
        known: &HashSet<String>,
    ) -> Result<Option<WalletTx>, WalletError> {
        const PAGE: usize = 200;
        let mut skip = 0;
        // The sends seen, by txid (a transaction's outputs may span pages).
        let mut sends: BTreeMap<String, Sent> = BTreeMap::new();
        loop {
            let page: Vec<Listed> = self
                .call("listtransactions", &[json!("*"), json!(PAGE), json!(skip)])
                .await?;
            for t in page.iter().filter(|t| t.category == "send") {
                let Some(txid) = &t.txid else { continue };
                let e = sends.entry(txid.clone()).or_insert_with(|| Sent {
                    live: true,
                    ..Sent::default()
                });
                e.comment = e.comment.take().or_else(|| t.comment.clone());
                e.confirmations = t.confirmations.unwrap_or(0);
                // A conflicted (negative) or abandoned send paid nothing.
                e.live &= e.confirmations >= 0 && t.abandoned != Some(true);
                if let (Some(a), Some(v)) = (&t.address, &t.amount) {
                    e.paid.push((a.clone(), sats_of(v, "listtransactions")?));
                }
            }
            let found = sends
                .iter()
                .filter(|(_, s)| s.live)
                .find(|(_, s)| s.comment.as_deref() == Some(label))
                .or_else(|| {
                    sends.iter().filter(|(_, s)| s.live).find(|(txid, s)| {
                        !known.contains(*txid)
                            && !outputs.is_empty()
                            && outputs.iter().all(|o| s.paid.contains(o))
                    })
                });
            if let Some((txid, s)) = found {
                return Ok(Some(WalletTx {
                    txid: txid.clone(),
                    confirmations: s.confirmations,
                }));
            }
            let older = page.iter().all(|t| t.time.is_some_and(|at| at < since));
            if page.len() < PAGE || older {
                return Ok(None);
            }
            skip += PAGE;
        }
    }

    async fn validate_address(&self, address: &str) -> Result<bool, WalletError> {
        let v: Value = self.call("validateaddress", &[json!(address)]).await?;
        Ok(v["isvalid"].as_bool() == Some(true))
    }

    async fn transaction(&self, txid: &str) -> Result<WalletTx, WalletError> {
        let v: Value = self.call("gettransaction", &[json!(txid)]).await?;
        let confirmations = v["confirmations"]
            .as_i64()
            .ok_or_else(|| WalletError::Answer {
                method: "gettransaction",
                reason: "no confirmations".into(),
            })?;
        Ok(WalletTx {
            txid: txid.to_owned(),
            confirmations,
        })
    }

    async fn received_by(&self, address: &str, min_conf: u32) -> Result<u64, WalletError> {
        let v: Value = self
            .call("getreceivedbyaddress", &[json!(address), json!(min_conf)])
            .await?;
        sats_of(&v, "getreceivedbyaddress")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_written_and_read_to_the_satoshi() {
        assert_eq!(coins(0), "0.00000000");
        assert_eq!(coins(1), "0.00000001");
        assert_eq!(coins(123_456_789), "1.23456789");
        assert_eq!(coins(21_000_000 * SATS_PER_COIN), "21000000.00000000");
        for sats in [
            0u64,
            1,
            7,
            546,
            99_999_999,
            123_456_789,
            2_099_999_997_690_000,
        ] {
            let v: Value = serde_json::from_str(&coins(sats)).unwrap();
            assert_eq!(sats_of(&v, "t").unwrap(), sats);
        }
        assert!(sats_of(&json!("1.0"), "t").is_err());
        assert!(sats_of(&json!(1e30), "t").is_err());
        assert_eq!(sats_of(&json!(-0.000052), "t").unwrap(), 5200);
    }
}
