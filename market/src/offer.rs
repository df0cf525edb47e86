//! A storage node's offer: its price, room, minimum duration and where to
//! pay it, signed by the node's key so that nobody can offer in its name.

use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use crate::MarketError;
use crate::signed::{self, Signature};

/// Version of the offer's layout (2 added `carry`, 3 `floor`; none before
/// 3 was released).
pub const OFFER_VERSION: u8 = 3;
/// The largest encoded offer a node sends or reads.
pub const MAX_OFFER_LEN: usize = 1024;
/// The longest payout address accepted (a bech32m address is at most 90).
pub const MAX_ADDRESS_LEN: usize = 100;
const DOMAIN: &[u8] = b"fincrypt offer v3\0";

/// What a node asks and has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// [`OFFER_VERSION`].
    pub version: u8,
    /// The node, as PeerId bytes.
    pub peer: Vec<u8>,
    /// Satoshis per GiB per period; 0 is free.
    pub price: u64,
    /// Bytes it can take now.
    pub room: u64,
    /// Periods a contract lasts at least.
    pub min_duration: u32,
    /// The length of the period `price` is for, in seconds (not 0).
    pub period: u64,
    /// Where payments go (empty for a free offer).
    pub payout: String,
    /// Unix seconds after which the offer no longer holds.
    pub expires: u64,
    /// The most, in satoshis, the node lets an owner leave unpaid for later
    /// (a contract's `carry`).
    pub carry: u64,
    /// The lowest price per GiB per period it takes, period by period, from
    /// a payer whose pricing floats (at most `price`).
    pub floor: u64,
}

/// An offer with its node's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedOffer {
    /// The terms.
    pub offer: Offer,
    /// The node's signature of them.
    pub signature: Signature,
}

impl Offer {
    /// The node that makes the offer.
    pub fn peer(&self) -> Result<PeerId, MarketError> {
        signed::peer(&self.peer, "offer")
    }

    /// Signs the offer with the key of the node it names.
    pub fn sign(self, keypair: &Keypair) -> Result<SignedOffer, MarketError> {
        if keypair.public().to_peer_id() != self.peer()? {
            return Err(MarketError::Invalid(
                "an offer is signed by its own node".into(),
            ));
        }
        let bytes = encode(&self)?;
        let signature = signed::sign(keypair, DOMAIN, &bytes)?;
        Ok(SignedOffer {
            offer: self,
            signature,
        })
    }
}

impl SignedOffer {
    /// The bytes sent to peers.
    pub fn encode(&self) -> Result<Vec<u8>, MarketError> {
        let bytes = encode(self)?;
        if bytes.len() > MAX_OFFER_LEN {
            return Err(MarketError::Invalid(format!(
                "an offer of {} bytes is over the {MAX_OFFER_LEN} allowed",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Reads and checks an offer from a peer: its size, layout, version,
    /// address and signature. Whether it has expired is for the caller, with
    /// [`SignedOffer::live`].
    pub fn decode(bytes: &[u8]) -> Result<SignedOffer, MarketError> {
        if bytes.len() > MAX_OFFER_LEN {
            return Err(MarketError::Invalid(format!(
                "an offer of {} bytes is over the {MAX_OFFER_LEN} allowed",
                bytes.len()
            )));
        }
        let s: SignedOffer = postcard::from_bytes(bytes)
            .map_err(|e| MarketError::Invalid(format!("the offer does not decode: {e}")))?;
        let o = &s.offer;
        if o.version != OFFER_VERSION {
            return Err(MarketError::Invalid(format!(
                "offer version {} is not supported (this program reads {OFFER_VERSION})",
                o.version
            )));
        }
        check_address(&o.payout, o.price > 0)?;
        if o.period == 0 {
            return Err(MarketError::Invalid(
                "an offer's period is 0 seconds".into(),
            ));
        }
        if o.floor > o.price {
            return Err(MarketError::Invalid(
                "an offer's floor is over its price".into(),
            ));
        }
        signed::verify(&s.signature, &o.peer()?, DOMAIN, &encode(o)?, "offer")?;
        Ok(s)
    }

    /// True while the offer holds at Unix time `now`.
    pub fn live(&self, now: u64) -> bool {
        now <= self.offer.expires
    }
}

/// Refuses an address that cannot be one: empty where payment is due, too
/// long, or with characters no address format uses. (The wallet checks
/// the rest when it pays.)
pub fn check_address(address: &str, needed: bool) -> Result<(), MarketError> {
    if address.is_empty() {
        return if needed {
            Err(MarketError::Invalid(
                "a priced offer names no payout address".into(),
            ))
        } else {
            Ok(())
        };
    }
    if address.len() > MAX_ADDRESS_LEN || !address.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(MarketError::Invalid(format!(
            "{:?} is not a payout address",
            address.chars().take(MAX_ADDRESS_LEN).collect::<String>()
        )));
    }
    Ok(())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, MarketError> {
    postcard::to_allocvec(v).map_err(|e| MarketError::Invalid(format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn offer(keypair: &Keypair, price: u64) -> Offer {
        Offer {
            version: OFFER_VERSION,
            peer: keypair.public().to_peer_id().to_bytes(),
            price,
            room: 1 << 30,
            min_duration: 24,
            period: 3600,
            payout: "mvUT3XQBnLwUpHeZD8Zjde9TVX9HyYhx2Q".into(),
            expires: 1_800_000_000,
            carry: 1000,
            floor: price,
        }
    }

    #[test]
    fn a_signed_offer_reads_back_and_any_change_is_refused() {
        let k = Keypair::generate_ed25519();
        let s = offer(&k, 20).sign(&k).unwrap();
        let bytes = s.encode().unwrap();
        assert_eq!(SignedOffer::decode(&bytes).unwrap(), s);
        assert!(s.live(1_800_000_000) && !s.live(1_800_000_001));

        // A price raised after signing, or another node's signature.
        let mut dearer = s.clone();
        dearer.offer.price = 30;
        let e = SignedOffer::decode(&dearer.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        // A floor over the price is no offer, signed or not.
        let mut o = offer(&k, 20);
        o.floor = 21;
        let e = SignedOffer::decode(&o.sign(&k).unwrap().encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("floor"), "{e}");
        let other = Keypair::generate_ed25519();
        let mut forged = offer(&other, 20).sign(&other).unwrap();
        forged.offer.peer = s.offer.peer.clone();
        let e = SignedOffer::decode(&forged.encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("another key"), "{e}");
        assert!(
            offer(&k, 20).sign(&other).is_err(),
            "only the node signs its offer"
        );

        // Every truncation is refused, never a panic.
        for n in 0..bytes.len() {
            assert!(SignedOffer::decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut priced = offer(&k, 20);
        priced.payout.clear();
        let e = SignedOffer::decode(&priced.sign(&k).unwrap().encode().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no payout address"), "{e}");
        let mut free = offer(&k, 0);
        free.payout.clear();
        assert!(SignedOffer::decode(&free.sign(&k).unwrap().encode().unwrap()).is_ok());
        let mut odd = offer(&k, 20);
        odd.payout = "bc1 q; drop".into();
        assert!(SignedOffer::decode(&odd.sign(&k).unwrap().encode().unwrap()).is_err());
        assert!(SignedOffer::decode(&vec![0u8; MAX_OFFER_LEN + 1]).is_err());
    }

    proptest! {
        #[test]
        fn garbage_is_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            prop_assert!(SignedOffer::decode(&bytes).is_err());
        }

        #[test]
        fn flipped_bytes_never_verify(at in 0usize..400, bit in 0u8..8) {
            let k = Keypair::generate_ed25519();
            let mut bytes = offer(&k, 7).sign(&k).unwrap().encode().unwrap();
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            if let Ok(s) = SignedOffer::decode(&bytes) {
                // Only a change postcard reads back the same can pass.
                prop_assert_eq!(s.encode().unwrap(), offer(&k, 7).sign(&k).unwrap().encode().unwrap());
            }
        }
    }
}
