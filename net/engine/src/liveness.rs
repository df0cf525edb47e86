//! Holder liveness: who is reachable, from connection state and cheap probes.
//!
//! Proofs run every few minutes and are for honesty; liveness is for repair
//! within a minute. Each check looks at every holder the manifest names: one
//! with an open connection is alive; one without is probed
//! ([`fincrypt_net::Client::probe`]: an empty `has`, which dials it) at most
//! every [`PROBE_EVERY`]. A holder
//! unreachable for longer than the holder timeout is dropped from every
//! block it holds, so the next replication pass places those copies
//! elsewhere; it is asked to release them if it comes back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fincrypt_net::PeerId;

use crate::error::Result;
use crate::placement::Replicator;

/// How often an unconnected holder is probed at most.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What liveness remembers between checks (in memory: after a restart every
/// holder starts alive, and an unreachable one is found again within the timeout).
pub struct Liveness {
    timeout: Duration,
    /// Holders not reachable, since when.
    unreachable: HashMap<PeerId, Instant>,
    last_probe: HashMap<PeerId, Instant>,
    /// The holders the manifest names, read again after each replication
    /// pass (which is what changes them) rather than at every check.
    holders: HashSet<PeerId>,
    read_at_pass: Option<u64>,
}

impl Liveness {
    /// Drops holders unreachable for longer than `timeout`.
    pub fn new(timeout: Duration) -> Liveness {
        Liveness {
            timeout,
            unreachable: HashMap::new(),
            last_probe: HashMap::new(),
            holders: HashSet::new(),
            read_at_pass: None,
        }
    }

    /// Holders not reachable at the last check.
    pub fn unreachable(&self) -> usize {
        self.unreachable.len()
    }

    /// One check; returns the holders dropped.
    pub async fn check(&mut self, r: &Replicator) -> Result<Vec<PeerId>> {
        let passes = r.stats.passes.load(Ordering::Relaxed);
        if self.read_at_pass != Some(passes) {
            self.holders = r.manifest.holder_peers()?;
            self.read_at_pass = Some(passes);
        }
        let holders = &self.holders;
        let connected: HashSet<PeerId> = r
            .client
            .peers()
            .await?
            .into_iter()
            .filter(|p| p.connected)
            .map(|p| p.peer_id)
            .collect();
        self.unreachable.retain(|p, _| holders.contains(p));
        self.last_probe.retain(|p, _| holders.contains(p));
        let now = Instant::now();
        let mut probes = Vec::new();
        for peer in holders {
            if connected.contains(peer) {
                self.unreachable.remove(peer);
                continue;
            }
            let due = self
                .last_probe
                .get(peer)
                .is_none_or(|t| now.duration_since(*t) >= PROBE_EVERY);
            if due {
                self.last_probe.insert(*peer, now);
                probes.push(*peer);
            }
        }
        let answers = futures::future::join_all(probes.into_iter().map(|peer| async move {
            let ok = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, r.client.probe(peer)).await,
                Ok(Ok(_))
            );
            (peer, ok)
        }))
        .await;
        for (peer, ok) in answers {
            if ok {
                self.unreachable.remove(&peer);
            } else {
                self.unreachable.entry(peer).or_insert(now);
            }
        }
        let mut dropped = Vec::new();
        for (peer, since) in &self.unreachable {
            if now.duration_since(*since) >= self.timeout {
                let blocks = r.manifest.drop_peer(peer)?;
                tracing::warn!(%peer, blocks, secs = self.timeout.as_secs(), "a holder stayed unreachable; placing its blocks elsewhere");
                r.stats.holders_unreachable.fetch_add(1, Ordering::Relaxed);
                r.stats.holders_dropped.fetch_add(1, Ordering::Relaxed);
                dropped.push(*peer);
            }
        }
        for peer in &dropped {
            self.unreachable.remove(peer);
            self.last_probe.remove(peer);
            self.holders.remove(peer);
        }
        Ok(dropped)
    }
}
