//! The DHT's key space for blocks: the key a score is looked up under, and the
//! XOR distance Kademlia orders peers by.
//!
//! libp2p-kad places every key at SHA-256 of its bytes: a peer at
//! SHA-256(PeerId bytes), a lookup key at SHA-256(key). A block's lookup key is
//! its score's 32 bytes, so a block sits at SHA-256(score) and its closest peers
//! are those with the smallest SHA-256(score) XOR SHA-256(PeerId), read as a
//! big-endian number. [`distance`] computes exactly that, with kad's own key
//! type, so sorting by it gives the order of [`crate::Client::closest_peers`].

use fincrypt_blockstore::Score;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;

/// The Kademlia lookup key for a block.
pub(crate) fn key(score: &Score) -> Vec<u8> {
    score.0.to_vec()
}

/// The XOR distance Kademlia puts between a block and a peer; smaller is
/// closer, and comparing the arrays compares the distances.
pub fn distance(score: &Score, peer: &PeerId) -> [u8; 32] {
    let block = KBucketKey::new(key(score));
    let peer = KBucketKey::from(*peer);
    let mut d = [0u8; 32];
    for ((d, a), b) in d
        .iter_mut()
        .zip(block.hashed_bytes())
        .zip(peer.hashed_bytes())
    {
        *d = a ^ b;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use proptest::prelude::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect()
    }

    #[test]
    fn distance_is_the_sha256_of_both_xored() {
        use ring::digest::{SHA256, digest};
        let score = Score([7; 32]);
        let peer = peers(1)[0];
        let a = digest(&SHA256, &score.0);
        let b = digest(&SHA256, &peer.to_bytes());
        let expected: Vec<u8> = a
            .as_ref()
            .iter()
            .zip(b.as_ref())
            .map(|(x, y)| x ^ y)
            .collect();
        assert_eq!(distance(&score, &peer).to_vec(), expected);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Sorting by `distance` gives kad's own order, and the bytes are kad's
        /// distance as a big-endian number.
        #[test]
        fn distance_orders_peers_as_kad_does(score in any::<[u8; 32]>()) {
            let score = Score(score);
            let target = KBucketKey::new(key(&score));
            let mut ours = peers(24);
            let mut kads = ours.clone();
            ours.sort_by_key(|p| distance(&score, p));
            kads.sort_by_key(|p| target.distance(&KBucketKey::from(*p)));
            prop_assert_eq!(&ours, &kads);
            for p in &ours {
                let kad = target.distance(&KBucketKey::from(*p));
                prop_assert_eq!(distance(&score, p), kad.0.to_big_endian());
            }
        }
    }
}
