//! A mediator: a node that holds its clients' prepaid Bitcoin in escrow and,
//! in later steps, places, audits and pays for them while they are offline.
//!
//! What is here: each client (a node, by PeerId) gets one deposit address of
//! the mediator's wallet, made on its first ask and kept (`DATA/mediator.redb`).
//! A client's escrow is what that address received with `min_conf`
//! confirmations, less what was paid for it and the mediator's fee (none yet:
//! placements through the mediator come next). The business rules decide
//! who may be a client. The mediator keeps coins for its clients: it is
//! custodial, and docs/ARCHITECTURE.md ("Mediator") says what a client
//! risks.
//!
//! Client and mediator speak through the peer protocol's `Mediate` request:
//! a postcard [`Envelope`] of an [`Ask`], answered by one of a [`Reply`].

use std::collections::HashSet;
use std::path::Path;

use libp2p::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::info;

use crate::MarketError;
use crate::wallet::Payments;

/// Version of the messages between a client and its mediator.
pub const MEDIATE_VERSION: u8 = 1;
/// Clients by PeerId bytes: postcard [`ClientRow`].
const CLIENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("clients");
/// `version`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LEDGER_VERSION: u64 = 1;
/// The most clients a mediator keeps (each costs an address and a row).
pub const MAX_CLIENTS: usize = 100_000;

/// A message either way, with its version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u8,
    pub body: T,
}

/// What a client asks its mediator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// Where do I deposit? (The same address every time.)
    DepositAddress,
    /// What is my escrow?
    Balance,
}

/// The mediator's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    DepositAddress {
        address: String,
    },
    Balance(Escrow),
    /// The mediator does not serve this client, or could not answer; why.
    Refused(String),
}

/// A client's escrow, in satoshis.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Escrow {
    /// The client.
    pub client: String,
    /// Its deposit address.
    pub address: String,
    /// Received at the address with the confirmations the mediator asks.
    pub deposited_sats: u64,
    /// Received, not yet confirmed enough.
    pub pending_sats: u64,
    /// Paid to holders for the client.
    pub paid_sats: u64,
    /// The mediator's fee on those payments.
    pub fees_sats: u64,
    /// What is left: deposited, less paid and fees.
    pub escrow_sats: u64,
    /// The mediator's fee, in hundredths of a percent of each payment.
    pub fee_basis_points: u32,
    /// Confirmations a deposit needs to count.
    pub min_conf: u32,
}

/// One client, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ClientRow {
    /// Its deposit address.
    address: String,
    /// Unix seconds of its first ask.
    since: u64,
}

/// Who the mediator serves, and on what terms.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// When some: only these clients.
    pub accept_clients: Option<HashSet<PeerId>>,
    /// Never these clients.
    pub deny_clients: HashSet<PeerId>,
    /// The fee, in hundredths of a percent of what is paid for a client.
    pub fee_basis_points: u32,
    /// Confirmations a deposit needs to count in the escrow.
    pub min_conf: u32,
}

impl Rules {
    /// Why `client` is not served; none if it is.
    fn refuses(&self, client: &PeerId) -> Option<&'static str> {
        if self.deny_clients.contains(client) {
            return Some("this mediator does not take this client (deny_clients)");
        }
        if self
            .accept_clients
            .as_ref()
            .is_some_and(|a| !a.contains(client))
        {
            return Some("this mediator takes only the clients it lists (accept_clients)");
        }
        None
    }
}

/// Encodes an [`Ask`] for the wire.
pub fn encode_ask(ask: Ask) -> Result<Vec<u8>, MarketError> {
    encode(&Envelope {
        version: MEDIATE_VERSION,
        body: ask,
    })
}

/// The body of an [`Envelope`] of this version; `what` names it in errors.
fn open_envelope<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, MarketError> {
    let e: Envelope<T> = decode(bytes, what)?;
    if e.version != MEDIATE_VERSION {
        return Err(MarketError::Invalid(format!(
            "{what} is of version {} (this program speaks {MEDIATE_VERSION})",
            e.version
        )));
    }
    Ok(e.body)
}

/// Reads a client's message: its [`Ask`], of this version.
pub fn decode_ask(bytes: &[u8]) -> Result<Ask, MarketError> {
    open_envelope(bytes, "the message")
}

/// Reads a mediator's answer; a refusal becomes an error with its reason.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, MarketError> {
    match open_envelope(bytes, "the mediator's answer")? {
        Reply::Refused(why) => Err(MarketError::Invalid(format!("the mediator refused: {why}"))),
        r => Ok(r),
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, MarketError> {
    postcard::to_allocvec(v).map_err(|e| MarketError::Invalid(format!("cannot encode: {e}")))
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8], what: &str) -> Result<T, MarketError> {
    postcard::from_bytes(bytes)
        .map_err(|e| MarketError::Invalid(format!("{what} does not decode: {e}")))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A mediator: its ledger, its wallet and its rules.
pub struct Mediator<P: Payments> {
    db: Database,
    wallet: P,
    rules: Rules,
    /// One new client at a time, so that one client never gets two addresses.
    joining: Mutex<()>,
}

impl<P: Payments> Mediator<P> {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path, wallet: P, rules: Rules) -> Result<Mediator<P>, MarketError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            crate::ledger::check_version(
                &mut txn.open_table(META)?,
                LEDGER_VERSION,
                "mediator ledger",
            )?;
            txn.open_table(CLIENTS)?;
        }
        txn.commit()?;
        Ok(Mediator {
            db,
            wallet,
            rules,
            joining: Mutex::new(()),
        })
    }

    /// Answers a client's message; what to send back (an error only when
    /// the answer cannot be encoded).
    pub async fn answer(&self, client: &PeerId, message: &[u8]) -> Result<Vec<u8>, MarketError> {
        let reply = match self.reply(client, message).await {
            Ok(r) => r,
            Err(MarketError::Invalid(why)) => Reply::Refused(why),
            Err(e) => {
                tracing::error!(%client, error = %e, "a client's ask failed");
                Reply::Refused("the mediator could not answer now; ask again later".into())
            }
        };
        encode(&Envelope {
            version: MEDIATE_VERSION,
            body: reply,
        })
    }

    async fn reply(&self, client: &PeerId, message: &[u8]) -> Result<Reply, MarketError> {
        let ask = decode_ask(message)?;
        if let Some(why) = self.rules.refuses(client) {
            return Err(MarketError::Invalid(why.into()));
        }
        match ask {
            Ask::DepositAddress => Ok(Reply::DepositAddress {
                address: self.join(client).await?.address,
            }),
            Ask::Balance => Ok(Reply::Balance(self.escrow(client).await?)),
        }
    }

    fn client(&self, client: &PeerId) -> Result<Option<ClientRow>, MarketError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CLIENTS)?;
        let row = t.get(client.to_bytes().as_slice())?;
        row.map(|v| {
            decode(v.value(), "a client row").map_err(|e| MarketError::Store(e.to_string()))
        })
        .transpose()
    }

    /// `client`'s row, made with a new deposit address on its first ask.
    async fn join(&self, client: &PeerId) -> Result<ClientRow, MarketError> {
        if let Some(row) = self.client(client)? {
            return Ok(row);
        }
        let _one = self.joining.lock().await;
        if let Some(row) = self.client(client)? {
            return Ok(row);
        }
        if self.client_count()? >= MAX_CLIENTS as u64 {
            return Err(MarketError::Invalid(
                "this mediator takes no more clients".into(),
            ));
        }
        // An address made and then lost to a crash is never used: harmless.
        let address = self.wallet.new_address().await?;
        let row = ClientRow {
            address,
            since: now(),
        };
        let txn = self.db.begin_write()?;
        txn.open_table(CLIENTS)?
            .insert(client.to_bytes().as_slice(), encode(&row)?.as_slice())?;
        txn.commit()?;
        info!(%client, address = %row.address, "a new client");
        Ok(row)
    }

    /// `client`'s escrow; a client that never asked for an address has none.
    pub async fn escrow(&self, client: &PeerId) -> Result<Escrow, MarketError> {
        let Some(row) = self.client(client)? else {
            return Err(MarketError::Invalid(
                "no deposit address yet: ask for one first (fincryptctl mediator deposit-address)"
                    .into(),
            ));
        };
        let deposited = self
            .wallet
            .received_by(&row.address, self.rules.min_conf)
            .await?;
        let seen = self.wallet.received_by(&row.address, 0).await?;
        let (paid, fees) = (0, 0);
        Ok(Escrow {
            client: client.to_string(),
            address: row.address,
            deposited_sats: deposited,
            pending_sats: seen.saturating_sub(deposited),
            paid_sats: paid,
            fees_sats: fees,
            escrow_sats: deposited.saturating_sub(paid).saturating_sub(fees),
            fee_basis_points: self.rules.fee_basis_points,
            min_conf: self.rules.min_conf,
        })
    }

    /// How many clients there are (without reading them).
    pub fn client_count(&self) -> Result<u64, MarketError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(CLIENTS)?.len()?)
    }

    /// Every client, by PeerId.
    pub fn clients(&self) -> Result<Vec<PeerId>, MarketError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for row in txn.open_table(CLIENTS)?.iter()? {
            let (k, _) = row?;
            let peer = PeerId::from_bytes(k.value())
                .map_err(|e| MarketError::Store(format!("a damaged client row: {e}")))?;
            out.push(peer);
        }
        Ok(out)
    }

    /// Every client's escrow, for whoever runs the mediator.
    pub async fn escrows(&self) -> Result<Vec<Escrow>, MarketError> {
        let mut out = Vec::new();
        for c in self.clients()? {
            out.push(self.escrow(&c).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rules_name_why_a_client_is_refused() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut r = Rules::default();
        assert_eq!(r.refuses(&a), None);
        r.deny_clients.insert(a);
        assert!(r.refuses(&a).unwrap().contains("deny_clients"));
        r.accept_clients = Some(HashSet::from([a]));
        assert!(r.refuses(&b).unwrap().contains("accept_clients"));
        assert!(r.refuses(&a).unwrap().contains("deny_clients"), "deny wins");
    }

    #[test]
    fn a_refusal_reads_back_as_an_error_with_its_reason() {
        let bytes = encode(&Envelope {
            version: MEDIATE_VERSION,
            body: Reply::Refused("no".into()),
        })
        .unwrap();
        let e = decode_reply(&bytes).unwrap_err();
        assert!(e.to_string().contains("refused: no"), "{e}");
        let newer = encode(&Envelope {
            version: MEDIATE_VERSION + 1,
            body: Reply::DepositAddress {
                address: "x".into(),
            },
        })
        .unwrap();
        assert!(
            decode_reply(&newer)
                .unwrap_err()
                .to_string()
                .contains("version")
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_reply(&bytes);
            let _ = decode_ask(&bytes);
        }
    }
}
