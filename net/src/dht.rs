//! The DHT's key space for blocks: the key a score is looked up under, and the
//! XOR distance Kademlia orders peers by.
//!
//! libp2p-kad places every key at SHA-256 of its bytes: a peer at
//! SHA-256(PeerId bytes), a lookup key at SHA-256(key). A block's lookup key is
//! its score's 32 bytes, so a block sits at SHA-256(score) and its closest peers
//! are those with the smallest SHA-256(score) XOR SHA-256(PeerId), read as a
//! big-endian number. [`distance`] computes exactly that, with kad's own key
//! type, so sorting by it gives the order of [`crate::Client::closest_peers`].

use std::collections::HashSet;

use fincrypt_blockstore::Score;
use libp2p::PeerId;
use libp2p::kad::KBucketKey;

/// The key storage nodes that charge are found under: each announces itself
/// as a provider of it, and an owner asks the DHT for its providers.
pub(crate) fn offers_key() -> libp2p::kad::RecordKey {
    libp2p::kad::RecordKey::new(&b"fincrypt/offers/1")
}

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

/// The `k` of `answered` closest to `score`, closest first, and the peers of
/// `unasked` (not answered) that could be closer than the farthest of them:
/// while there are any, the `k` closest are not known.
///
/// With fewer than `k` answered, every unasked peer could belong.
pub(crate) fn settle(
    score: &Score,
    answered: &HashSet<PeerId>,
    unasked: impl IntoIterator<Item = PeerId>,
    k: usize,
) -> (Vec<PeerId>, HashSet<PeerId>) {
    let mut closest: Vec<PeerId> = answered.iter().copied().collect();
    closest.sort_by_key(|p| distance(score, p));
    closest.truncate(k);
    let farthest = match closest.last() {
        Some(p) if closest.len() == k => Some(distance(score, p)),
        _ => None,
    };
    let doubtful = unasked
        .into_iter()
        .filter(|p| !answered.contains(p))
        .filter(|p| farthest.is_none_or(|f| distance(score, p) < f))
        .collect();
    (closest, doubtful)
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

    #[test]
    fn settle_keeps_the_k_closest_and_doubts_only_closer_unasked_peers() {
        let score = Score([3; 32]);
        let mut all = peers(12);
        all.sort_by_key(|p| distance(&score, p));
        // Answered: all but the 2nd and the 11th closest.
        let answered: HashSet<PeerId> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 1 && *i != 10)
            .map(|(_, p)| *p)
            .collect();
        let unasked = [all[1], all[10], all[0]];
        let (closest, doubtful) = settle(&score, &answered, unasked, 5);
        let expected = vec![all[0], all[2], all[3], all[4], all[5]];
        assert_eq!(closest, expected);
        // all[10] is farther than the 5th answered; all[0] answered after all.
        assert_eq!(doubtful, HashSet::from([all[1]]));

        // Fewer than k answered: any unasked peer could belong.
        let few: HashSet<PeerId> = all[..2].iter().copied().collect();
        let (closest, doubtful) = settle(&score, &few, [all[11]], 5);
        assert_eq!(closest, all[..2].to_vec());
        assert_eq!(doubtful, HashSet::from([all[11]]));

        let (_, none) = settle(&score, &answered, [], 5);
        assert!(none.is_empty());
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
