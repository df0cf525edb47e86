//! Root records: how an owner's newest root is found on the network from
//! the owner's key alone (docs/FORMATS.md, "Root record").
//!
//! A [`SignedRoot`] names the owner by an ed25519 public key (derived from
//! the master secret, distinct from any node key), carries a sequence number
//! that only grows, and holds the root pointer sealed under a key only the
//! owner has. It is signed over a canonical encoding with a domain prefix.
//! Peers check the signature and the sequence before they keep a record, so
//! nobody but the owner can replace one and a replayed old one cannot roll
//! it back; they learn nothing from it but its size and sequence.

use libp2p::identity::ed25519;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use fincrypt_blockstore::Score;

/// Version of the root record's layout.
pub const ROOT_RECORD_VERSION: u8 = 1;
/// The largest record a peer keeps or sends.
pub const MAX_ROOT_RECORD_LEN: usize = 4096;
/// What the signature covers, before the record's fields.
const SIGNING_DOMAIN: &[u8] = b"fincrypt root record v1\0";
/// The sealed part's associated data, before the owner key and sequence.
const SEALING_DOMAIN: &[u8] = b"fincrypt root pointer v1\0";
/// What a device binding's signature covers, before the PeerId's bytes.
const DEVICE_DOMAIN: &[u8] = b"fincrypt device of owner v1\0";
const SIGNATURE_LEN: usize = 64;
const TAG_LEN: usize = 16;

/// Why bytes are not a valid root record, or a sealed part does not open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RootError {
    #[error("the root record is {0} bytes, more than the {MAX_ROOT_RECORD_LEN} allowed")]
    TooLarge(usize),
    #[error("the root record does not decode: {0}")]
    Malformed(String),
    #[error("root record version {0} is not supported (this program reads {ROOT_RECORD_VERSION})")]
    Version(u8),
    #[error("the root record's signature does not verify against its owner key")]
    BadSignature,
    #[error("the root record's pointer does not open with this key")]
    Sealed,
}

/// The owner's signing identity: only the owner's own devices hold it.
pub struct Owner {
    keypair: ed25519::Keypair,
}

impl Owner {
    /// The owner key pair whose 32-byte secret is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Owner {
        let mut bytes = *seed;
        let secret = ed25519::SecretKey::try_from_bytes(&mut bytes)
            .expect("any 32 bytes are an ed25519 secret key");
        Owner {
            keypair: ed25519::Keypair::from(secret),
        }
    }

    /// The public key that names the owner on the network.
    pub fn public(&self) -> [u8; 32] {
        self.keypair.public().to_bytes()
    }

    /// Where the owner's record sits in the DHT: the peers closest to this key.
    pub fn dht_key(&self) -> Score {
        dht_key(&self.public())
    }

    /// A record of `sequence` at `time` (Unix seconds) holding `plain`
    /// (the root pointer's bytes) sealed under `seal_key`.
    pub fn sign(
        &self,
        sequence: u64,
        time: u64,
        seal_key: &[u8; 32],
        plain: &[u8],
    ) -> Result<SignedRoot, RootError> {
        let owner = self.public();
        let sealed = seal(seal_key, &owner, sequence, plain)?;
        let mut record = SignedRoot {
            version: ROOT_RECORD_VERSION,
            owner,
            sequence,
            time,
            sealed,
            signature: Vec::new(),
        };
        record.signature = self.keypair.sign(&record.signed_bytes()?);
        let len = record.encode()?.len();
        if len > MAX_ROOT_RECORD_LEN {
            return Err(RootError::TooLarge(len));
        }
        Ok(record)
    }
}

impl Owner {
    /// The owner's signature that node `peer` is one of its devices: a
    /// holder that has it lets `peer` release what the owner's other devices
    /// placed (a recovered machine has a new PeerId).
    pub fn bind(&self, peer: &libp2p::PeerId) -> Vec<u8> {
        let mut msg = DEVICE_DOMAIN.to_vec();
        msg.extend_from_slice(&peer.to_bytes());
        self.keypair.sign(&msg)
    }
}

/// Whether `signature` is `owner`'s binding of `peer` ([`Owner::bind`]).
pub fn verify_binding(owner: &[u8; 32], peer: &libp2p::PeerId, signature: &[u8]) -> bool {
    let Ok(key) = ed25519::PublicKey::try_from_bytes(owner) else {
        return false;
    };
    let mut msg = DEVICE_DOMAIN.to_vec();
    msg.extend_from_slice(&peer.to_bytes());
    signature.len() == SIGNATURE_LEN && key.verify(&msg, signature)
}

/// The DHT key of the owner with public key `owner`.
pub fn dht_key(owner: &[u8; 32]) -> Score {
    Score(*owner)
}

/// One owner's root record, as peers keep and send it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoot {
    pub version: u8,
    /// The owner's ed25519 public key.
    pub owner: [u8; 32],
    /// Grows with every record the owner publishes; the highest wins.
    pub sequence: u64,
    /// When it was published, Unix seconds (shown, not trusted for order).
    pub time: u64,
    /// Nonce, ciphertext and tag of the root pointer.
    pub sealed: Vec<u8>,
    /// ed25519 over the signing domain and the fields above.
    pub signature: Vec<u8>,
}

#[derive(Serialize)]
struct Unsigned<'a> {
    version: u8,
    owner: &'a [u8; 32],
    sequence: u64,
    time: u64,
    sealed: &'a [u8],
}

impl SignedRoot {
    fn signed_bytes(&self) -> Result<Vec<u8>, RootError> {
        let fields = Unsigned {
            version: self.version,
            owner: &self.owner,
            sequence: self.sequence,
            time: self.time,
            sealed: &self.sealed,
        };
        postcard::to_extend(&fields, SIGNING_DOMAIN.to_vec())
            .map_err(|e| RootError::Malformed(e.to_string()))
    }

    /// The record's bytes (postcard).
    pub fn encode(&self) -> Result<Vec<u8>, RootError> {
        postcard::to_allocvec(self).map_err(|e| RootError::Malformed(e.to_string()))
    }

    /// Decodes and verifies a record: the layout, the version and the
    /// signature against the owner key it names. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<SignedRoot, RootError> {
        if bytes.len() > MAX_ROOT_RECORD_LEN {
            return Err(RootError::TooLarge(bytes.len()));
        }
        if let Some(&v) = bytes.first()
            && v != ROOT_RECORD_VERSION
        {
            return Err(RootError::Version(v));
        }
        let (record, rest): (SignedRoot, _) =
            postcard::take_from_bytes(bytes).map_err(|e| RootError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(RootError::Malformed(format!(
                "{} bytes after the record",
                rest.len()
            )));
        }
        if record.signature.len() != SIGNATURE_LEN {
            return Err(RootError::BadSignature);
        }
        let key = ed25519::PublicKey::try_from_bytes(&record.owner)
            .map_err(|_| RootError::BadSignature)?;
        if !key.verify(&record.signed_bytes()?, &record.signature) {
            return Err(RootError::BadSignature);
        }
        Ok(record)
    }

    /// The sealed pointer's bytes, opened with `seal_key`.
    pub fn open(&self, seal_key: &[u8; 32]) -> Result<Vec<u8>, RootError> {
        if self.sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(RootError::Sealed);
        }
        let (nonce, body) = self.sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| RootError::Sealed)?;
        let mut body = body.to_vec();
        let plain = aead_key(seal_key)?
            .open_in_place(nonce, Aad::from(aad(&self.owner, self.sequence)), &mut body)
            .map_err(|_| RootError::Sealed)?;
        Ok(plain.to_vec())
    }
}

fn aead_key(key: &[u8; 32]) -> Result<LessSafeKey, RootError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| RootError::Sealed)
}

fn aad(owner: &[u8; 32], sequence: u64) -> Vec<u8> {
    let mut aad = SEALING_DOMAIN.to_vec();
    aad.extend_from_slice(owner);
    aad.extend_from_slice(&sequence.to_le_bytes());
    aad
}

/// A fresh random nonce, then AES-256-GCM of `plain` bound to the owner and sequence.
fn seal(
    key: &[u8; 32],
    owner: &[u8; 32],
    sequence: u64,
    plain: &[u8],
) -> Result<Vec<u8>, RootError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| RootError::Sealed)?;
    let mut body = plain.to_vec();
    aead_key(key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(owner, sequence)),
            &mut body,
        )
        .map_err(|_| RootError::Sealed)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Whether a peer keeping `kept` should replace it with `offered` (both
/// already verified and of the same owner): only a higher sequence does.
pub fn supersedes(offered: &SignedRoot, kept: &SignedRoot) -> bool {
    offered.sequence > kept.sequence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u8) -> Owner {
        Owner::from_seed(&[n; 32])
    }

    #[test]
    fn a_record_verifies_opens_and_refuses_every_tampering() {
        let o = owner(1);
        let key = [7u8; 32];
        let r = o.sign(5, 1_700_000_000, &key, b"the root pointer").unwrap();
        let bytes = r.encode().unwrap();
        let back = SignedRoot::decode(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.open(&key).unwrap(), b"the root pointer");
        assert_eq!(back.open(&[8u8; 32]), Err(RootError::Sealed));
        assert_eq!(back.owner, o.public());

        // Any flipped byte is refused (or, in the signature's length varint, malformed).
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                SignedRoot::decode(&bad).is_err(),
                "byte {i} flipped was accepted"
            );
        }
        // A sequence raised by someone else fails the signature.
        let mut raised = r.clone();
        raised.sequence = 6;
        assert_eq!(
            SignedRoot::decode(&raised.encode().unwrap()),
            Err(RootError::BadSignature)
        );
        // Signed by another owner but naming this one: refused.
        let mut forged = owner(2).sign(9, 0, &key, b"x").unwrap();
        forged.owner = o.public();
        assert_eq!(
            SignedRoot::decode(&forged.encode().unwrap()),
            Err(RootError::BadSignature)
        );
        // Truncated at every length: an error, never a panic.
        for n in 0..bytes.len() {
            assert!(SignedRoot::decode(&bytes[..n]).is_err());
        }
        assert!(matches!(
            SignedRoot::decode(&vec![1u8; MAX_ROOT_RECORD_LEN + 1]),
            Err(RootError::TooLarge(_))
        ));
    }

    #[test]
    fn a_device_binding_verifies_only_for_its_owner_and_peer() {
        let o = owner(4);
        let (p, q) = (libp2p::PeerId::random(), libp2p::PeerId::random());
        let sig = o.bind(&p);
        assert!(verify_binding(&o.public(), &p, &sig));
        assert!(!verify_binding(&o.public(), &q, &sig));
        assert!(!verify_binding(&owner(5).public(), &p, &sig));
        assert!(!verify_binding(&o.public(), &p, &sig[..63]));
    }

    #[test]
    fn only_a_higher_sequence_supersedes() {
        let o = owner(3);
        let a = o.sign(1, 0, &[0; 32], b"a").unwrap();
        let b = o.sign(2, 0, &[0; 32], b"b").unwrap();
        assert!(supersedes(&b, &a));
        assert!(!supersedes(&a, &b));
        assert!(!supersedes(&a, &a));
    }

    #[test]
    fn the_owner_key_is_the_seed_s_and_differs_between_seeds() {
        assert_eq!(owner(1).public(), owner(1).public());
        assert_ne!(owner(1).public(), owner(2).public());
        assert_eq!(owner(1).dht_key(), dht_key(&owner(1).public()));
    }
}
