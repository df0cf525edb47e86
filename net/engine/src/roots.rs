//! Publishing the owner's root record, and finding the newest one again.
//!
//! A record goes to two places (docs/ARCHITECTURE.md, "Recovery"): the
//! peers nearest the owner's key in the DHT, so a machine with nothing but
//! the phrase finds it through any node, and every peer that holds the
//! owner's blocks (its root slot). Peers keep only the highest valid
//! sequence per owner, so finding the newest is asking several and taking
//! the highest that verifies. With each record goes a device binding (the
//! owner's signature of this node's PeerId), so a holder lets this machine
//! release what another device of the owner placed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fincrypt_net::root::{Owner, SignedRoot};
use fincrypt_net::{Client, ErrorCode, PeerId};

use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// The highest sequence this owner published from here, in the manifest's state.
const SEQUENCE: &str = "root_sequence";
/// How long one peer may take to answer about a root record.
const ROOT_TIMEOUT: Duration = Duration::from_secs(20);

/// What one publication reached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub sequence: u64,
    /// Peers that keep the record now.
    pub kept: usize,
    /// Peers offered it.
    pub offered: usize,
}

/// Publishes the owner's root records.
pub struct Publisher {
    owner: Owner,
    seal_key: [u8; 32],
    client: Client,
    manifest: Arc<Manifest>,
    /// One publication at a time, so sequences never interleave.
    one: tokio::sync::Mutex<()>,
}

impl Publisher {
    /// Publishes for the owner with signing seed `seed`, sealing pointers under `seal_key`.
    pub fn new(
        seed: &[u8; 32],
        seal_key: [u8; 32],
        client: Client,
        manifest: Arc<Manifest>,
    ) -> Publisher {
        Publisher {
            owner: Owner::from_seed(seed),
            seal_key,
            client,
            manifest,
            one: tokio::sync::Mutex::new(()),
        }
    }

    /// The highest sequence published from here (0 before the first).
    pub fn sequence(&self) -> Result<u64> {
        read_sequence(&self.manifest)
    }

    /// Signs `pointer` (the root's pointer bytes) under the next sequence
    /// and offers it to the peers nearest the owner's key and to every
    /// holder. A peer that keeps a higher sequence (another device, or a
    /// machine this one was recovered from) makes it publish again above
    /// that. An error only when no peer keeps it.
    pub async fn publish(&self, pointer: &[u8]) -> Result<Published> {
        let _one = self.one.lock().await;
        let mut targets: Vec<PeerId> = match self.client.closest_peers(self.owner.dht_key()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "no lookup of the peers nearest the owner key");
                Vec::new()
            }
        };
        let mut seen: HashSet<PeerId> = targets.iter().copied().collect();
        for p in self.manifest.holder_peers()? {
            if seen.insert(p) {
                targets.push(p);
            }
        }
        if targets.is_empty() {
            return Err(Error::Network(
                "no peer to publish the root record on".into(),
            ));
        }
        let mut sequence = self.sequence()? + 1;
        for _ in 0..2 {
            let record = self
                .owner
                .sign(sequence, crate::unix_now(), &self.seal_key, pointer)
                .map_err(|e| Error::Format(e.to_string()))?;
            let bytes = Bytes::from(record.encode().map_err(|e| Error::Format(e.to_string()))?);
            let binding = self.owner.bind(&self.client.local_peer_id());
            let owner = self.owner.public();
            let answers = futures::future::join_all(targets.iter().map(|&peer| {
                let (client, bytes, binding) =
                    (self.client.clone(), bytes.clone(), binding.clone());
                async move {
                    // This machine is the owner's device: its releases count
                    // for what a machine it was recovered from placed.
                    match tokio::time::timeout(ROOT_TIMEOUT, client.bind(peer, owner, binding))
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "a peer did not record this device")
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "a peer did not record this device in time")
                        }
                    }
                    match tokio::time::timeout(ROOT_TIMEOUT, client.put_root(peer, bytes)).await {
                        Ok(r) => r,
                        Err(_) => Err(fincrypt_net::Error::Timeout { peer }),
                    }
                }
            }))
            .await;
            let mut kept = 0;
            let mut higher = None;
            for (peer, answer) in targets.iter().zip(answers) {
                match answer {
                    Ok(()) => kept += 1,
                    Err(fincrypt_net::Error::Refused {
                        code: ErrorCode::Stale { sequence: s },
                        ..
                    }) => higher = higher.max(Some(s)),
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "a peer did not keep the root record")
                    }
                }
            }
            if let Some(h) = higher.filter(|h| *h >= sequence) {
                tracing::info!(
                    kept = h,
                    ours = sequence,
                    "a peer keeps a newer root record; publishing above it"
                );
                sequence = h + 1;
                continue;
            }
            if kept == 0 {
                return Err(Error::Network(format!(
                    "none of {} peers kept the root record",
                    targets.len()
                )));
            }
            self.manifest
                .set_state(&[(SEQUENCE, &sequence.to_le_bytes())])?;
            tracing::info!(
                sequence,
                kept,
                offered = targets.len(),
                "root record published"
            );
            return Ok(Published {
                sequence,
                kept,
                offered: targets.len(),
            });
        }
        Err(Error::Network(
            "peers keep ever newer root records for this owner".into(),
        ))
    }
}

fn read_sequence(manifest: &Manifest) -> Result<u64> {
    Ok(match manifest.state(SEQUENCE)? {
        Some(v) => {
            u64::from_le_bytes(v.as_slice().try_into().map_err(|_| {
                Error::Format("the root sequence in the manifest is damaged".into())
            })?)
        }
        None => 0,
    })
}

/// Records that `sequence` was the owner's newest (a recovered machine
/// publishes above it).
pub fn set_sequence(manifest: &Manifest, sequence: u64) -> Result<()> {
    let now = read_sequence(manifest)?;
    manifest.set_state(&[(SEQUENCE, &now.max(sequence).to_le_bytes())])
}

/// What [`find_newest`] learnt.
#[derive(Debug, Default)]
pub struct Found {
    /// The valid record with the highest sequence, if any peer had one.
    pub newest: Option<SignedRoot>,
    /// Peers asked.
    pub asked: usize,
    /// Peers that answered (with a record or without).
    pub answered: usize,
    /// Peers whose record did not verify or named another owner.
    pub invalid: usize,
}

/// Asks `peers` and the peers nearest `owner`'s key for its root record,
/// and keeps the valid one with the highest sequence: recovery never
/// returns an older root while a peer it reached has a newer one.
pub async fn find_newest(client: &Client, owner: [u8; 32], peers: &[PeerId]) -> Found {
    let mut ask: Vec<PeerId> = peers.to_vec();
    let mut seen: HashSet<PeerId> = ask.iter().copied().collect();
    match client
        .closest_peers(fincrypt_net::root::dht_key(&owner))
        .await
    {
        Ok(near) => {
            for p in near {
                if seen.insert(p) {
                    ask.push(p);
                }
            }
        }
        Err(e) => tracing::debug!(error = %e, "no lookup of the peers nearest the owner key"),
    }
    let answers = futures::future::join_all(ask.iter().map(|&peer| {
        let client = client.clone();
        async move {
            match tokio::time::timeout(ROOT_TIMEOUT, client.get_root(peer, owner)).await {
                Ok(r) => r,
                Err(_) => Err(fincrypt_net::Error::Timeout { peer }),
            }
        }
    }))
    .await;
    let mut found = Found {
        asked: ask.len(),
        ..Found::default()
    };
    for (peer, answer) in ask.iter().zip(answers) {
        match answer {
            Ok(Some(r)) => {
                found.answered += 1;
                if found
                    .newest
                    .as_ref()
                    .is_none_or(|n| r.sequence > n.sequence)
                {
                    found.newest = Some(r);
                }
            }
            Ok(None) => found.answered += 1,
            Err(fincrypt_net::Error::Protocol { .. }) => {
                found.answered += 1;
                found.invalid += 1;
            }
            Err(e) => tracing::debug!(%peer, error = %e, "a peer gave no root record"),
        }
    }
    found
}
