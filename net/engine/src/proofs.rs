//! Storage proofs: challenge holders, keep each one's history, and act on
//! what the answers say.
//!
//! A round challenges every holder of the next slice of the manifest (a
//! cursor walks it, so every block comes round in turn without a walk of the
//! filesystem). A wrong proof or "not held" is about that block on that
//! holder: the block is taken from it at once, to be placed again, and the
//! holder stays for the blocks it still proves. No answer counts against the
//! holder; after `failures` in a row it is dropped from every block and gets
//! no placements for [`BANNED_FOR`]. Histories persist in the manifest.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fincrypt_blockstore::Score;
use fincrypt_net::PeerId;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::placement::Replicator;
use crate::unix_now;

/// How long a dropped holder gets no new placements.
pub const BANNED_FOR: Duration = Duration::from_secs(600);

/// How challenges are run.
#[derive(Clone, Copy, Debug)]
pub struct ProofPolicy {
    /// Blocks challenged per round (every holder of each).
    pub blocks: usize,
    /// Consecutive unanswered challenges after which a holder is dropped.
    pub failures: u32,
    /// How long one challenge may take.
    pub timeout: Duration,
}

/// What one challenge showed, as the market and `status` see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProofOutcome {
    /// The holder challenged.
    pub peer: PeerId,
    /// The block.
    pub score: Score,
    /// Unix time of the answer.
    pub time: u64,
    /// What came back.
    pub result: ProofResult,
}

/// The three ways a challenge ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofResult {
    /// A proof that checked out against the score.
    Passed,
    /// A wrong proof, or the holder says it does not hold the block.
    Wrong,
    /// No usable answer in time (unreachable, timed out, protocol error).
    NoAnswer,
}

/// What a round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Challenges sent.
    pub challenged: u64,
    /// Blocks taken from one holder after a wrong proof.
    pub blocks_dropped: u64,
    /// Holders dropped after failing to answer too often.
    pub holders_dropped: u64,
}

/// Outcomes kept for a subscriber that has not read them yet.
const OUTCOMES_KEPT: usize = 8192;

/// Challenges holders, round after round.
pub struct Prover {
    policy: ProofPolicy,
    /// The last score of the previous round's slice.
    cursor: Mutex<Option<Score>>,
    outcomes: broadcast::Sender<ProofOutcome>,
}

impl Prover {
    /// A prover following `policy`.
    pub fn new(policy: ProofPolicy) -> Prover {
        Prover {
            policy,
            cursor: Mutex::new(None),
            outcomes: broadcast::Sender::new(OUTCOMES_KEPT),
        }
    }

    /// Every proof outcome from now on (a slow reader misses old ones, and is told).
    pub fn subscribe(&self) -> broadcast::Receiver<ProofOutcome> {
        self.outcomes.subscribe()
    }

    /// One round over the next slice of the manifest.
    pub async fn round(&self, r: &Replicator) -> Result<RoundReport> {
        let after = *self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let slice = r.manifest.entries_after(after, self.policy.blocks.max(1))?;
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = slice.last().map(|(s, _)| *s);
        let asks: Vec<(Score, PeerId)> = slice
            .iter()
            .flat_map(|(score, holders)| holders.iter().map(move |p| (*score, *p)))
            .collect();
        Ok(self.challenge(r, asks).await?.0)
    }

    /// Challenges each holder of `asks` on its block (fresh nonces, as a
    /// round does) and acts on the answers as a round does. The market
    /// uses it to prove its contracted holders every period.
    pub async fn challenge(
        &self,
        r: &Replicator,
        asks: Vec<(Score, PeerId)>,
    ) -> Result<(RoundReport, Vec<ProofOutcome>)> {
        use futures::StreamExt;
        let timeout = self.policy.timeout;
        let results = futures::stream::iter(asks.into_iter().map(|(score, peer)| async move {
            let answer = tokio::time::timeout(timeout, r.client.challenge(peer, score)).await;
            let result = match answer {
                Ok(Ok(true)) => ProofResult::Passed,
                Ok(Ok(false)) => ProofResult::Wrong,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, %score, error = %e, "a challenge went unanswered");
                    ProofResult::NoAnswer
                }
                Err(_) => ProofResult::NoAnswer,
            };
            ProofOutcome {
                peer,
                score,
                time: unix_now(),
                result,
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let report = self.apply(r, &results).await?;
        Ok((report, results))
    }

    /// Records outcomes and acts on them.
    async fn apply(&self, r: &Replicator, outcomes: &[ProofOutcome]) -> Result<RoundReport> {
        let mut report = RoundReport {
            challenged: outcomes.len() as u64,
            ..RoundReport::default()
        };
        let mut per_peer: HashMap<PeerId, Vec<&ProofOutcome>> = HashMap::new();
        for o in outcomes {
            per_peer.entry(o.peer).or_default().push(o);
            let _ = self.outcomes.send(o.clone());
            match o.result {
                ProofResult::Passed => r.stats.proofs_passed.fetch_add(1, Ordering::Relaxed),
                _ => r.stats.proofs_failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        // Wrong proofs: those blocks leave that holder, nothing else does.
        for (peer, list) in &per_peer {
            let wrong: Vec<Score> = list
                .iter()
                .filter(|o| o.result == ProofResult::Wrong)
                .map(|o| o.score)
                .collect();
            if !wrong.is_empty() {
                let n = r.manifest.drop_blocks(peer, &wrong)?;
                tracing::warn!(%peer, blocks = n, "a holder failed proofs of blocks; placing them again");
                report.blocks_dropped += n;
            }
        }
        r.stats
            .blocks_dropped
            .fetch_add(report.blocks_dropped, Ordering::Relaxed);
        // Histories, and holders that keep not answering.
        let now = unix_now();
        let mut doomed = Vec::new();
        let peers: Vec<PeerId> = per_peer.keys().copied().collect();
        let failures = self.policy.failures.max(1);
        r.manifest.update_records(&peers, |peer, record| {
            for o in &per_peer[peer] {
                match o.result {
                    ProofResult::Passed => {
                        record.passed += 1;
                        record.consecutive = 0;
                        record.last_passed = Some(o.time);
                    }
                    ProofResult::Wrong => {
                        // About one block; the holder answered.
                        record.failed += 1;
                        record.last_failed = Some(o.time);
                    }
                    ProofResult::NoAnswer => {
                        record.failed += 1;
                        record.consecutive += 1;
                        record.last_failed = Some(o.time);
                    }
                }
            }
            if record.consecutive >= failures {
                record.consecutive = 0;
                record.dropped += 1;
                record.banned_until = Some(now + BANNED_FOR.as_secs());
                doomed.push(*peer);
            }
        })?;
        for peer in &doomed {
            let blocks = r.manifest.drop_peer(peer)?;
            tracing::warn!(%peer, blocks, "dropping a holder after unanswered storage proofs");
            r.stats.holders_dropped.fetch_add(1, Ordering::Relaxed);
        }
        report.holders_dropped = doomed.len() as u64;
        Ok(report)
    }
}
