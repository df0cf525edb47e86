//! Which peers are closest to a block in the whole network, from Kademlia
//! lookups, with as few lookups as a pass can prove enough.
//!
//! A lookup of block `B` answers the `k` peers closest to B's key `K_B` (the
//! SHA-256 of its score; a peer sits at the SHA-256 of its id), or fewer when
//! the network has fewer. Any other peer is then at least `R_B` from `K_B`,
//! `R_B` being the distance of the farthest answered. XOR distance obeys
//! `d(x, z) <= d(x, y) + d(y, z)`, so for another block `C` with
//! `δ = d(K_B, K_C)`, a peer outside the answer is at least `R_B - δ` from
//! `K_C`: every answered peer nearer `K_C` than that is certainly among the
//! closest to C, in the order the whole network would give. A pass looks a
//! block up only when no earlier lookup certifies enough peers for it; in a
//! network smaller than `k` one lookup serves every block.

use fincrypt_blockstore::Score;
use fincrypt_net::PeerId;
use sha2::{Digest, Sha256};

/// Where Kademlia puts a block: SHA-256 of its score's bytes.
fn block_key(score: &Score) -> [u8; 32] {
    Sha256::digest(score.0).into()
}

/// Where Kademlia puts a peer: SHA-256 of its id's bytes.
fn peer_key(peer: &PeerId) -> [u8; 32] {
    Sha256::digest(peer.to_bytes()).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut d = [0u8; 32];
    for (d, (a, b)) in d.iter_mut().zip(a.iter().zip(b)) {
        *d = a ^ b;
    }
    d
}

/// `a + b < c`, as 256-bit big-endian numbers (the sum may carry past 256 bits).
fn sum_below(a: &[u8; 32], b: &[u8; 32], c: &[u8; 32]) -> bool {
    let mut sum = [0u8; 33];
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let s = a[i] as u16 + b[i] as u16 + carry;
        sum[i + 1] = s as u8;
        carry = s >> 8;
    }
    sum[0] = carry as u8;
    let mut limit = [0u8; 33];
    limit[1..].copy_from_slice(c);
    sum < limit
}

/// One lookup's answer.
struct Found {
    key: [u8; 32],
    /// Answered peers and where each sits.
    peers: Vec<(PeerId, [u8; 32])>,
    /// The farthest answered distance; `None` when fewer than `k` answered,
    /// so the answer is every peer the network has.
    radius: Option<[u8; 32]>,
}

/// The lookups of one pass.
#[derive(Default)]
pub struct Lookups {
    found: Vec<Found>,
}

impl Lookups {
    /// Records the answer of a lookup of `score`: `peers`, of which a full
    /// answer has `k`.
    pub fn insert(&mut self, score: &Score, peers: &[PeerId], k: usize) {
        let key = block_key(score);
        let peers: Vec<(PeerId, [u8; 32])> = peers.iter().map(|p| (*p, peer_key(p))).collect();
        let radius = if peers.len() < k {
            None
        } else {
            peers.iter().map(|(_, at)| xor(&key, at)).max()
        };
        self.found.push(Found { key, peers, radius });
    }

    /// Lookups recorded.
    pub fn len(&self) -> usize {
        self.found.len()
    }

    /// Distinct peers the recorded lookups found, in all.
    pub fn peers_seen(&self) -> usize {
        let mut seen: Vec<PeerId> = self
            .found
            .iter()
            .flat_map(|f| f.peers.iter().map(|(p, _)| *p))
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// True before the first lookup.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    /// Peers certainly the closest to `score` in the network, closest first,
    /// as long as one recorded lookup gives them: the longest such list with
    /// at least `need` of them `usable`, or `None` if no lookup gives that
    /// many (the block needs a lookup of its own).
    pub fn closest(
        &self,
        score: &Score,
        need: usize,
        usable: impl Fn(&PeerId) -> bool,
    ) -> Option<Vec<PeerId>> {
        let key = block_key(score);
        let mut best: Option<Vec<PeerId>> = None;
        for f in &self.found {
            let delta = xor(&key, &f.key);
            let mut order: Vec<([u8; 32], PeerId)> =
                f.peers.iter().map(|(p, at)| (xor(&key, at), *p)).collect();
            order.sort_unstable_by_key(|a| a.0);
            let sure: Vec<PeerId> = order
                .into_iter()
                .take_while(|(d, _)| match &f.radius {
                    None => true,
                    // Its own lookup: every answered peer is among the closest.
                    Some(_) if delta == [0; 32] => true,
                    Some(r) => sum_below(d, &delta, r),
                })
                .map(|(_, p)| p)
                .collect();
            if sure.iter().filter(|p| usable(p)).count() >= need
                && best.as_ref().is_none_or(|b| sure.len() > b.len())
            {
                best = Some(sure);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `n` closest of `all` to `score`, by brute force.
    fn truth(all: &[PeerId], score: &Score, n: usize) -> Vec<PeerId> {
        let mut v = all.to_vec();
        v.sort_by_key(|p| xor(&block_key(score), &peer_key(p)));
        v.truncate(n);
        v
    }

    fn score(i: u32) -> Score {
        let mut s = [0u8; 32];
        s[..4].copy_from_slice(&i.to_be_bytes());
        s[31] = 0x5a;
        Score(s)
    }

    #[test]
    fn distances_are_those_of_the_net_crate() {
        for i in 0..20 {
            let (p, s) = (PeerId::random(), score(i));
            assert_eq!(
                xor(&block_key(&s), &peer_key(&p)),
                fincrypt_net::distance(&s, &p)
            );
        }
    }

    #[test]
    fn sums_compare_as_256_bit_numbers() {
        let mut one = [0u8; 32];
        one[31] = 1;
        let max = [0xff; 32];
        assert!(
            !sum_below(&max, &one, &max),
            "a carry past 256 bits is large"
        );
        assert!(sum_below(&one, &one, &{
            let mut three = [0u8; 32];
            three[31] = 3;
            three
        }));
        let mut half = [0u8; 32];
        half[0] = 0x80;
        assert!(!sum_below(&half, &half, &max));
    }

    #[test]
    fn what_a_lookup_certifies_for_other_blocks_is_always_the_true_closest() {
        let all: Vec<PeerId> = (0..200).map(|_| PeerId::random()).collect();
        let k = 20;
        let mut lookups = Lookups::default();
        let mut looked_up = 0;
        for i in 0..400 {
            let s = score(i);
            let got = match lookups.closest(&s, 3, |_| true) {
                Some(sure) => sure,
                None => {
                    looked_up += 1;
                    lookups.insert(&s, &truth(&all, &s, k), k);
                    lookups
                        .closest(&s, 3, |_| true)
                        .expect("its own lookup certifies")
                }
            };
            assert!(got.len() >= 3);
            assert_eq!(got, truth(&all, &s, got.len()), "block {i}");
        }
        // 200 peers in answers of 20: about ten regions, each looked up once
        // or twice (18 seen); one lookup per block would be 400.
        assert!(
            looked_up < 100,
            "other blocks' lookups served most: {looked_up} lookups"
        );
    }

    #[test]
    fn in_a_network_smaller_than_k_one_lookup_serves_every_block() {
        let all: Vec<PeerId> = (0..7).map(|_| PeerId::random()).collect();
        let mut lookups = Lookups::default();
        lookups.insert(&score(0), &truth(&all, &score(0), 20), 20);
        for i in 1..100 {
            let s = score(i);
            let sure = lookups.closest(&s, 3, |_| true).unwrap();
            assert_eq!(sure, truth(&all, &s, 7));
        }
        assert_eq!(lookups.len(), 1);
    }

    #[test]
    fn peers_that_cannot_be_used_are_skipped_but_still_ordered() {
        let all: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let mut lookups = Lookups::default();
        let s = score(1);
        lookups.insert(&s, &truth(&all, &s, 20), 20);
        let order = truth(&all, &s, 5);
        let banned = order[0];
        let sure = lookups.closest(&s, 4, |p| *p != banned).unwrap();
        assert_eq!(sure, order);
        assert!(lookups.closest(&s, 5, |p| *p != banned).is_none());
    }
}
