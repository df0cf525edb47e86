//! Signatures of market messages by node keys: each over a domain tag and
//! the message's postcard bytes, with the signer's public key carried beside
//! it and checked against the PeerId the message names.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};

use crate::MarketError;

/// A signature and the key that made it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    /// The signer's public key, protobuf-encoded as libp2p encodes it.
    pub key: Vec<u8>,
    /// The signature over the domain and the message.
    pub sig: Vec<u8>,
}

/// Signs `message` (postcard bytes) under `domain` with `keypair`.
pub fn sign(keypair: &Keypair, domain: &[u8], message: &[u8]) -> Result<Signature, MarketError> {
    let mut signed = Vec::with_capacity(domain.len() + message.len());
    signed.extend_from_slice(domain);
    signed.extend_from_slice(message);
    let sig = keypair
        .sign(&signed)
        .map_err(|e| MarketError::Invalid(format!("cannot sign: {e}")))?;
    Ok(Signature {
        key: keypair.public().encode_protobuf(),
        sig,
    })
}

/// Checks that `s` is `signer`'s signature of `message` under `domain`.
pub fn verify(
    s: &Signature,
    signer: &PeerId,
    domain: &[u8],
    message: &[u8],
    what: &str,
) -> Result<(), MarketError> {
    let key = PublicKey::try_decode_protobuf(&s.key)
        .map_err(|_| MarketError::Invalid(format!("{what}: the signer's key does not decode")))?;
    if key.to_peer_id() != *signer {
        return Err(MarketError::Invalid(format!(
            "{what}: signed by another key than {signer}'s"
        )));
    }
    let mut signed = Vec::with_capacity(domain.len() + message.len());
    signed.extend_from_slice(domain);
    signed.extend_from_slice(message);
    if !key.verify(&signed, &s.sig) {
        return Err(MarketError::Invalid(format!(
            "{what}: the signature does not verify"
        )));
    }
    Ok(())
}

/// The PeerId in `bytes`.
pub fn peer(bytes: &[u8], what: &str) -> Result<PeerId, MarketError> {
    PeerId::from_bytes(bytes).map_err(|_| MarketError::Invalid(format!("{what}: not a PeerId")))
}
