//! Placement of own blocks on peers, recorded in the owner's manifest.
//!
//! A pass walks what the live tree and every retained snapshot reference
//! (as GC does) and asks, per block, for a number of copies on peers:
//! a data block its file's effective redundancy (the nearest
//! `user.fincrypt.redundancy` on the way down from the root, else the
//! config's default), every other block (pointer blocks, directory
//! streams, roots, the manifest's own blocks) the highest redundancy in use
//! and at least [`META_REDUNDANCY`]. A block short of copies is put on the connected
//! peers that serve blocks and have room, closest first by XOR distance
//! between the score and the SHA-256 of the peer's id; each peer that
//! stores it is recorded in the manifest ([`Manifest`], docs/FORMATS.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use fincrypt_blockstore::{BlockStore, FileRef, Pointer, Score};
use fincrypt_fs::meta::{Kind, ROOT_INO};
use fincrypt_fs::{Fossil, snapshot};
use fincrypt_net::{Client, Error as NetError, ErrorCode, PeerId};
use sha2::{Digest, Sha256};

pub use crate::manifest::Manifest;

/// The least number of copies of blocks that are not file data.
pub const META_REDUNDANCY: u8 = 3;

/// Copies asked of each own block: score -> redundancy.
pub type Wanted = BTreeMap<Score, u8>;

/// Works out the redundancy every referenced own block asks for.
pub fn wanted(fs: &Fossil, default: u8) -> Result<Wanted> {
    let default = default.max(1);
    let mut data: HashMap<Score, u8> = HashMap::new();
    let mut meta: HashSet<Score> = HashSet::new();
    let mut highest = default;
    let reader = fs.reader();
    let add_file = |f: &FileRef,
                    n: u8,
                    is_dir: bool,
                    data: &mut HashMap<Score, u8>,
                    meta: &mut HashSet<Score>|
     -> Result<()> {
        reader.visit_scores(f, &mut |p: &Pointer| {
            if p.depth == 0 && !is_dir {
                let e = data.entry(p.score).or_insert(n);
                *e = (*e).max(n);
            } else {
                meta.insert(p.score);
            }
        })?;
        Ok(())
    };

    // Trees already walked, with the redundancy asked of them then: walking
    // one again at no higher redundancy adds nothing, and the live tree and
    // the retained snapshots share most of their trees.
    let mut walked: HashMap<(Score, bool), u8> = HashMap::new();
    fn fresh(walked: &mut HashMap<(Score, bool), u8>, f: &FileRef, n: u8, is_dir: bool) -> bool {
        let FileRef::Tree(p) = f else { return true };
        let seen = walked.entry((p.score, is_dir)).or_insert(0);
        if *seen >= n {
            return false;
        }
        *seen = n;
        true
    }

    // The live tree, carrying each directory's effective redundancy down.
    let view = fs.meta().view()?;
    let root = view.inode(ROOT_INO)?;
    let root_n = root.redundancy.unwrap_or(default);
    highest = highest.max(root_n);
    let mut dirs = vec![(ROOT_INO, root_n)];
    let mut seen_dirs = HashSet::new();
    while let Some((dir, n)) = dirs.pop() {
        if !seen_dirs.insert(dir) {
            continue;
        }
        for d in view.entries(dir)? {
            let inode = view.inode(d.ino)?;
            let m = inode.redundancy.unwrap_or(n);
            highest = highest.max(m);
            if inode.kind == Kind::Dir {
                dirs.push((d.ino, m));
            } else if fresh(&mut walked, &inode.content, m, false) {
                add_file(&inode.content, m, false, &mut data, &mut meta)?;
            }
        }
    }
    // Files no name leads to (unlinked while open) still have blocks.
    for content in view.contents()? {
        reader.visit_scores(&content, &mut |p: &Pointer| {
            if p.depth == 0 {
                data.entry(p.score).or_insert(default);
            } else {
                meta.insert(p.score);
            }
        })?;
    }
    drop(view);

    // Retained snapshots, with the settings they recorded.
    for snap in fs.meta().snapshots()? {
        meta.insert(snap.root.score);
        let r = snapshot::root(fs, &snap)?;
        // The manifest's blocks are metadata, like the root that names them.
        if let Some(m) = &r.manifest {
            add_file(m, default, true, &mut data, &mut meta)?;
        }
        let n = r.tree.redundancy.unwrap_or(default);
        let mut dirs = vec![(r.tree, n)];
        while let Some((d, n)) = dirs.pop() {
            if !fresh(&mut walked, &d.content, n, true) {
                // Listed before at this redundancy or higher: all below it too.
                continue;
            }
            add_file(&d.content, n, true, &mut data, &mut meta)?;
            for e in snapshot::read_dir(fs, &d)? {
                let m = e.redundancy.unwrap_or(n);
                highest = highest.max(m);
                if e.kind == Kind::Dir {
                    dirs.push((e, m));
                } else if fresh(&mut walked, &e.content, m, false) {
                    add_file(&e.content, m, false, &mut data, &mut meta)?;
                }
            }
        }
    }

    let meta_n = highest.max(META_REDUNDANCY);
    let mut out: Wanted = data.into_iter().collect();
    for s in meta {
        out.insert(s, meta_n);
    }
    Ok(out)
}

/// The XOR distance between a score and a peer (its id hashed to 32 bytes).
pub fn distance(score: &Score, peer: &PeerId) -> [u8; 32] {
    let h = Sha256::digest(peer.to_bytes());
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = score.0[i] ^ h[i];
    }
    d
}

/// Figures of replication, for `status`.
#[derive(Default)]
pub struct ReplicationStats {
    /// Own blocks with fewer confirmed holders than asked, after the last pass.
    pub under_replicated: AtomicU64,
    /// Own blocks the last pass looked at.
    pub tracked_blocks: AtomicU64,
    /// Confirmed copies of those on peers, in all.
    pub placed_copies: AtomicU64,
    /// Passes finished.
    pub passes: AtomicU64,
    /// Why blocks are short of copies, in words (empty when none are).
    pub reason: Mutex<String>,
    /// Storage proofs that checked out against the score.
    pub proofs_passed: AtomicU64,
    /// Challenges a holder failed: a wrong proof, "not held", or no answer.
    pub proofs_failed: AtomicU64,
    /// Holders dropped after consecutive failed proofs.
    pub holders_dropped: AtomicU64,
    /// Own blocks the last pass looked at, by the redundancy they ask for.
    pub by_redundancy: Mutex<BTreeMap<u8, u64>>,
}

/// How challenges are run.
#[derive(Clone, Copy, Debug)]
pub struct ProofPolicy {
    /// Blocks challenged per round (every holder of each).
    pub blocks: usize,
    /// Consecutive failures after which a holder is dropped.
    pub failures: u32,
    /// How long one challenge may take.
    pub timeout: std::time::Duration,
}

/// How long a dropped holder gets no new placements.
const BANNED_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// What a pass needs.
pub struct Replicator {
    pub client: Client,
    pub manifest: Arc<Manifest>,
    pub stats: Arc<ReplicationStats>,
    /// One pass at a time.
    pub running: tokio::sync::Mutex<()>,
    /// Consecutive failed proofs per holder.
    pub failures: Mutex<HashMap<PeerId, u32>>,
    /// Holders dropped lately, kept out of placement until the instant.
    pub banned: Mutex<HashMap<PeerId, std::time::Instant>>,
    /// Where the next challenge round starts in the list of blocks.
    pub cursor: std::sync::atomic::AtomicUsize,
}

/// Puts of blocks to peers in flight at once.
const PARALLEL_BLOCKS: usize = 8;

impl Replicator {
    /// Places every block of `wanted` short of copies; returns how many are still short.
    ///
    /// `local` reads a block's bytes from the owner's volume.
    pub async fn pass(&self, wanted: Wanted, local: Arc<dyn BlockStore>) -> Result<u64> {
        use futures::StreamExt;
        let _one = self.running.lock().await;
        let me = self.client.local_peer_id();
        let peers: Vec<PeerId> = self
            .client
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.connected && p.serves_blocks == Some(true) && p.peer_id != me)
            .map(|p| p.peer_id)
            .collect();
        let peers: Vec<PeerId> = {
            let now = std::time::Instant::now();
            let mut banned = self.banned.lock().unwrap_or_else(|p| p.into_inner());
            banned.retain(|_, until| *until > now);
            peers
                .into_iter()
                .filter(|p| !banned.contains_key(p))
                .collect()
        };
        // Room each candidate reports, counted down as this pass fills it.
        let mut room: HashMap<PeerId, u64> = HashMap::new();
        for p in &peers {
            if let Ok(space) = self.client.space(*p).await {
                room.insert(*p, space.free());
            }
        }
        let room = Arc::new(Mutex::new(room));
        let tracked = wanted.len() as u64;
        let mut levels = BTreeMap::new();
        for n in wanted.values() {
            *levels.entry(*n).or_insert(0u64) += 1;
        }
        *self
            .stats
            .by_redundancy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = levels;
        let mut short = Vec::new();
        let mut surplus = Vec::new();
        let mut placed_total = 0u64;
        let known = self.manifest.holders_of(wanted.keys().copied())?;
        for ((score, n), holders) in wanted.iter().zip(known) {
            placed_total += holders.len().min(*n as usize) as u64;
            if holders.len() < *n as usize {
                short.push((*score, *n, holders));
            } else if holders.len() > *n as usize {
                surplus.push((*score, *n, holders));
            }
        }
        self.release_surplus(surplus).await?;
        let results = futures::stream::iter(short.into_iter().map(|(score, n, holders)| {
            let room = room.clone();
            let local = local.clone();
            async move {
                let before = holders.len();
                let holders = self.place(score, n, holders, &room, &local).await;
                (score, n, before, holders)
            }
        }))
        .buffer_unordered(PARALLEL_BLOCKS)
        .collect::<Vec<_>>()
        .await;
        let mut under = 0u64;
        let mut changed = Vec::new();
        for (score, n, before, holders) in results {
            placed_total += (holders.len().min(n as usize) - before.min(n as usize)) as u64;
            if holders.len() < n as usize {
                under += 1;
            }
            if holders.len() != before {
                changed.push((score, holders));
            }
        }
        self.manifest.set_many(&changed)?;
        self.release_freed(&wanted, &local).await?;
        self.release_dropped().await?;
        let reason = if under == 0 {
            String::new()
        } else {
            let free = room
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|f| **f > 0)
                .count();
            format!(
                "{under} blocks short of copies: {} peers serve blocks, {free} of them with room",
                peers.len()
            )
        };
        *self.stats.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
        self.stats.under_replicated.store(under, Ordering::Relaxed);
        self.stats.tracked_blocks.store(tracked, Ordering::Relaxed);
        self.stats
            .placed_copies
            .store(placed_total, Ordering::Relaxed);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        Ok(under)
    }

    /// Blocks with more holders than asked (their redundancy went down): the
    /// holders farthest by XOR distance release them; the nearest `n` stay.
    async fn release_surplus(&self, surplus: Vec<(Score, u8, Vec<PeerId>)>) -> Result<()> {
        let mut per_peer: HashMap<PeerId, Vec<Score>> = HashMap::new();
        let mut entries: HashMap<Score, Vec<PeerId>> = HashMap::new();
        for (score, n, mut holders) in surplus {
            holders.sort_by_key(|p| distance(&score, p));
            for p in &holders[n as usize..] {
                per_peer.entry(*p).or_default().push(score);
            }
            entries.insert(score, holders);
        }
        self.release_on(per_peer, &mut entries).await;
        let changed: Vec<_> = entries.into_iter().collect();
        self.manifest.set_many(&changed)
    }

    /// Sends each peer `Release` for its scores (in requests of at most
    /// `MAX_SCORES`) and takes a peer out of a score's holders in `entries`
    /// once it answered: released, or it had no placement of ours, either
    /// way gone. A peer that did not answer stays, to be asked again later.
    async fn release_on(
        &self,
        per_peer: HashMap<PeerId, Vec<Score>>,
        entries: &mut HashMap<Score, Vec<PeerId>>,
    ) {
        for (peer, scores) in per_peer {
            for chunk in scores.chunks(fincrypt_net::proto::MAX_SCORES) {
                match self.client.release(peer, chunk).await {
                    Ok(_) => {
                        for s in chunk {
                            if let Some(h) = entries.get_mut(s) {
                                h.retain(|p| *p != peer);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "a release failed; retrying later")
                    }
                }
            }
        }
    }

    /// Asks dropped holders that are connected again to release what they
    /// kept, so a holder that comes back does not keep copies no one counts.
    /// A block placed on the same holder again since is left alone.
    async fn release_dropped(&self) -> Result<()> {
        let pending = self.manifest.pending_releases()?;
        if pending.is_empty() {
            return Ok(());
        }
        let connected: HashSet<PeerId> = self
            .client
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.peer_id)
            .collect();
        for (peer, scores) in pending {
            if !connected.contains(&peer) {
                continue;
            }
            let mut release = Vec::new();
            let mut placed_again = Vec::new();
            for s in scores {
                if self.manifest.holders(&s)?.contains(&peer) {
                    placed_again.push(s);
                } else {
                    release.push(s);
                }
            }
            self.manifest.forget_releases(&peer, &placed_again)?;
            for chunk in release.chunks(fincrypt_net::proto::MAX_SCORES) {
                match self.client.release(peer, chunk).await {
                    Ok(_) => self.manifest.forget_releases(&peer, chunk)?,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "a release failed; retrying later")
                    }
                }
            }
        }
        Ok(())
    }

    /// Releases, on their holders, blocks that nothing references any more
    /// and that GC has freed locally; forgets them once every holder let go.
    /// An unreachable holder is asked again on a later pass.
    async fn release_freed(&self, wanted: &Wanted, local: &Arc<dyn BlockStore>) -> Result<()> {
        let mut per_peer: HashMap<PeerId, Vec<Score>> = HashMap::new();
        let mut entries: HashMap<Score, Vec<PeerId>> = HashMap::new();
        for (score, holders) in self.manifest.all()? {
            if wanted.contains_key(&score) || local.has(&score).unwrap_or(true) {
                continue;
            }
            for p in &holders {
                per_peer.entry(*p).or_default().push(score);
            }
            entries.insert(score, holders);
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.release_on(per_peer, &mut entries).await;
        let (gone, kept): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(_, h)| h.is_empty());
        self.manifest.set_many(&kept)?;
        self.manifest.remove(gone.iter().map(|(s, _)| *s))?;
        Ok(())
    }

    /// Challenges every confirmed holder of the next `policy.blocks` blocks of
    /// `wanted`; drops a holder (from every block it holds) after
    /// `policy.failures` consecutive failures. Returns the holders dropped.
    pub async fn challenge_round(&self, wanted: &Wanted, policy: ProofPolicy) -> Result<usize> {
        use futures::StreamExt;
        if wanted.is_empty() {
            return Ok(0);
        }
        let start = self.cursor.fetch_add(policy.blocks, Ordering::Relaxed) % wanted.len();
        let mut asks = Vec::new();
        for score in wanted
            .keys()
            .cycle()
            .skip(start)
            .take(policy.blocks.min(wanted.len()))
        {
            for peer in self.manifest.holders(score)? {
                asks.push((*score, peer));
            }
        }
        let results = futures::stream::iter(asks.into_iter().map(|(score, peer)| async move {
            let answer =
                tokio::time::timeout(policy.timeout, self.client.challenge(peer, score)).await;
            (peer, matches!(answer, Ok(Ok(true))))
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let mut doomed = Vec::new();
        {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            for (peer, ok) in results {
                if ok {
                    self.stats.proofs_passed.fetch_add(1, Ordering::Relaxed);
                    failures.remove(&peer);
                } else {
                    self.stats.proofs_failed.fetch_add(1, Ordering::Relaxed);
                    let n = failures.entry(peer).or_insert(0);
                    *n += 1;
                    if *n >= policy.failures && !doomed.contains(&peer) {
                        doomed.push(peer);
                    }
                }
            }
            for peer in &doomed {
                failures.remove(peer);
            }
        }
        for peer in &doomed {
            let blocks = self.manifest.drop_peer(peer)?;
            tracing::warn!(%peer, blocks, "dropping a holder after failed storage proofs");
            self.banned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(*peer, std::time::Instant::now() + BANNED_FOR);
            self.stats.holders_dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(doomed.len())
    }

    /// Puts `score` on the closest peers with room until it has `n` holders.
    async fn place(
        &self,
        score: Score,
        n: u8,
        mut holders: Vec<PeerId>,
        room: &Mutex<HashMap<PeerId, u64>>,
        local: &Arc<dyn BlockStore>,
    ) -> Vec<PeerId> {
        // Not checked against the score here: each holder checks it (and
        // refuses a damaged copy), so hashing it here too would only cost.
        let data: Bytes = match local.get_to_open(&score) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%score, error = %e, "no local copy to place");
                return holders;
            }
        };
        let len = data.len() as u64;
        let mut candidates: Vec<PeerId> = room
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(p, free)| **free >= len && !holders.contains(p))
            .map(|(p, _)| *p)
            .collect();
        candidates.sort_by_key(|p| distance(&score, p));
        let mut next = candidates.into_iter();
        while holders.len() < n as usize {
            let batch: Vec<PeerId> = next.by_ref().take(n as usize - holders.len()).collect();
            if batch.is_empty() {
                break;
            }
            let puts = batch.iter().map(|p| {
                let data = data.clone();
                async move { (*p, self.client.put(*p, score, data).await) }
            });
            for (peer, result) in futures::future::join_all(puts).await {
                let mut room = room.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(()) => {
                        holders.push(peer);
                        if let Some(f) = room.get_mut(&peer) {
                            *f = f.saturating_sub(len);
                        }
                    }
                    Err(NetError::Refused {
                        code: ErrorCode::Full { free },
                        ..
                    }) => {
                        room.insert(peer, free.min(len.saturating_sub(1)));
                    }
                    Err(NetError::Refused {
                        code: ErrorCode::ScoreMismatch,
                        ..
                    }) => {
                        tracing::warn!(%score, "the local copy of a block does not match its score; not placed");
                        return holders;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, %score, error = %e, "a put to a peer failed");
                    }
                }
            }
        }
        holders
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::{LocalStore, MasterSecret, StoreOptions, TreeParams};
    use fincrypt_fs::fossil::REDUNDANCY_XATTR;
    use fincrypt_fs::{Caller, Meta};

    /// The copies asked of a file's data blocks follow the highest setting
    /// over the live tree and every retained snapshot, also when the walk
    /// skips trees it has seen (snapshots share them).
    #[test]
    fn wanted_takes_the_highest_redundancy_over_live_tree_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let keys = MasterSecret::generate().keys();
        let store: Arc<dyn BlockStore> = Arc::new(
            LocalStore::open(&dir.path().join("volume"), StoreOptions::default()).unwrap(),
        );
        let meta = Meta::open(&dir.path().join("meta.redb"), &keys, 0, 0).unwrap();
        let fs = Fossil::new(meta, store, keys, TreeParams::default(), dir.path().into()).unwrap();
        let who = Caller { uid: 0, gid: 0 };
        let a = fs
            .mknod(ROOT_INO, b"a", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let b = fs
            .mknod(ROOT_INO, b"b", Kind::Dir, 0o755, 0, None, who)
            .unwrap()
            .ino;
        let write = |parent: u64, name: &[u8], seed: u8| {
            let ino = fs.create(parent, name, 0o644, who).unwrap().ino;
            let data: Vec<u8> = (0..300_000u32)
                .map(|i| (i * 31 + seed as u32) as u8 ^ seed)
                .collect();
            fs.write(ino, 0, &data).unwrap();
            fs.release(ino).unwrap();
            let inode = fs.meta().inode(ino).unwrap();
            let mut scores = Vec::new();
            fs.reader()
                .visit_scores(&inode.content, &mut |p| {
                    if p.depth == 0 {
                        scores.push(p.score);
                    }
                })
                .unwrap();
            assert!(!scores.is_empty());
            scores
        };
        let f = write(a, b"f", 1);
        let g = write(b, b"g", 2);
        let set = |ino: u64, n: &str| {
            fs.setxattr(ino, REDUNDANCY_XATTR, n.as_bytes(), false, false)
                .unwrap()
        };
        let asked = |scores: &[Score]| -> Vec<u8> {
            let w = wanted(&fs, 2).unwrap();
            scores.iter().map(|s| w[s]).collect()
        };

        set(a, "2");
        snapshot::create(&fs).unwrap();
        set(a, "4");
        assert!(
            asked(&f).iter().all(|n| *n == 4),
            "the live setting, higher than the snapshot's"
        );
        snapshot::create(&fs).unwrap();
        set(a, "1");
        assert!(
            asked(&f).iter().all(|n| *n == 4),
            "the newer snapshot's setting, higher than live"
        );
        assert!(asked(&g).iter().all(|n| *n == 2), "the default, everywhere");
    }

    #[test]
    fn placement_order_is_deterministic_and_depends_on_the_score() {
        let peers: Vec<PeerId> = (0..8).map(|_| PeerId::random()).collect();
        let order = |score: &Score| {
            let mut p = peers.clone();
            p.sort_by_key(|p| distance(score, p));
            p
        };
        let (a, b) = (Score([1; 32]), Score([200; 32]));
        assert_eq!(order(&a), order(&a));
        let mut shuffled = peers.clone();
        shuffled.reverse();
        shuffled.sort_by_key(|p| distance(&a, p));
        assert_eq!(shuffled, order(&a), "the input order does not matter");
        assert_ne!(
            order(&a),
            order(&b),
            "different blocks spread over different peers"
        );
    }
}
