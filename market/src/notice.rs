//! The notice an owner sends a holder after paying it: which periods of
//! which contract one transaction paid, and how much for each. It carries
//! no signature: it comes over the owner's authenticated connection, and
//! the holder believes only what its own wallet shows of that transaction.

use serde::{Deserialize, Serialize};

use crate::MarketError;
use crate::contract::ContractId;

/// Version of the notice's layout.
pub const NOTICE_VERSION: u8 = 1;
/// The largest encoded notice (the peer protocol's market message limit).
pub const MAX_NOTICE_LEN: usize = 1024;
/// Periods one notice names at most; a payment of more is told in several.
pub const MAX_NOTICE_ITEMS: usize = 32;

/// A payment, as the owner tells it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaidNotice {
    /// [`NOTICE_VERSION`].
    pub version: u8,
    /// The contract paid under.
    pub contract: ContractId,
    /// The transaction, as 64 hex digits.
    pub txid: String,
    /// (period, satoshis) paid in it.
    pub items: Vec<(u64, u64)>,
}

impl PaidNotice {
    /// The bytes sent.
    pub fn encode(&self) -> Result<Vec<u8>, MarketError> {
        self.check()?;
        let bytes = postcard::to_allocvec(self)
            .map_err(|e| MarketError::Invalid(format!("cannot encode a notice: {e}")))?;
        if bytes.len() > MAX_NOTICE_LEN {
            return Err(MarketError::Invalid(format!(
                "a notice of {} bytes is over the {MAX_NOTICE_LEN} allowed",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Reads and checks a notice from a peer.
    pub fn decode(bytes: &[u8]) -> Result<PaidNotice, MarketError> {
        if bytes.len() > MAX_NOTICE_LEN {
            return Err(MarketError::Invalid(format!(
                "a notice of {} bytes is over the {MAX_NOTICE_LEN} allowed",
                bytes.len()
            )));
        }
        let n: PaidNotice = postcard::from_bytes(bytes)
            .map_err(|e| MarketError::Invalid(format!("the notice does not decode: {e}")))?;
        n.check()?;
        Ok(n)
    }

    fn check(&self) -> Result<(), MarketError> {
        if self.version != NOTICE_VERSION {
            return Err(MarketError::Invalid(format!(
                "notice version {} is not supported (this program reads {NOTICE_VERSION})",
                self.version
            )));
        }
        if self.txid.len() != 64 || !self.txid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MarketError::Invalid(
                "a notice's txid is not 64 hex digits".into(),
            ));
        }
        if self.items.is_empty() || self.items.len() > MAX_NOTICE_ITEMS {
            return Err(MarketError::Invalid(format!(
                "a notice names 1 to {MAX_NOTICE_ITEMS} periods, not {}",
                self.items.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn notice(items: usize) -> PaidNotice {
        PaidNotice {
            version: NOTICE_VERSION,
            contract: [7; 16],
            txid: "ab".repeat(32),
            items: (0..items as u64).map(|p| (p, u64::MAX - p)).collect(),
        }
    }

    #[test]
    fn a_notice_reads_back_and_the_largest_fits() {
        let n = notice(MAX_NOTICE_ITEMS);
        assert_eq!(PaidNotice::decode(&n.encode().unwrap()).unwrap(), n);
        assert!(notice(MAX_NOTICE_ITEMS + 1).encode().is_err());
        assert!(notice(0).encode().is_err());
        let mut bad = notice(1);
        bad.txid = "zz".repeat(32);
        assert!(bad.encode().is_err());
    }

    proptest! {
        #[test]
        fn garbage_and_flipped_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            flip in any::<usize>(),
        ) {
            let _ = PaidNotice::decode(&bytes);
            let mut good = notice(3).encode().unwrap();
            let i = flip % good.len();
            good[i] ^= 0x5a;
            let _ = PaidNotice::decode(&good);
        }
    }
}
