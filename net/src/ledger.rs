//! The placement ledger: which peers placed each block a holder keeps for others.
//!
//! A multimap table from score to the PeerIds (their multihash bytes) that
//! placed it, and a `placement_meta` table with the format version, kept in
//! the holder's volume index beside the blocks' own tables (docs/FORMATS.md,
//! "Placement ledger"). Every change is a durable commit. New blocks are
//! linked into the volume in the same transaction that records their
//! placements ([`Ledger::add_in`]); a placement is removed only after its
//! block is deleted. So after any crash every held block still has its
//! placers and can be released.

use std::path::Path;
use std::sync::Arc;

use fincrypt_blockstore::{LocalStore, Score};
use libp2p::PeerId;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};

use crate::Error;
use crate::root::SignedRoot;

/// What became of a root record offered to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootOffer {
    /// It is the one kept now.
    Kept,
    /// The slot keeps one with this sequence, not lower.
    Stale(u64),
    /// No slot is left for a new owner.
    Full,
}

const PLACERS: MultimapTableDefinition<[u8; 32], &[u8]> = MultimapTableDefinition::new("placers");
const META: TableDefinition<&str, u64> = TableDefinition::new("placement_meta");
/// Root slots: owner public key -> the newest valid root record it sent.
const ROOTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("root_slots");
/// Devices: PeerId bytes -> the owner key that signed it is one of its devices.
const DEVICES: TableDefinition<&[u8], [u8; 32]> = TableDefinition::new("devices");
/// The most devices a node remembers; a new one beyond it is refused.
pub const MAX_DEVICES: u64 = 1_000_000;
/// The most owners a node keeps a root slot for; a new owner beyond it is refused.
pub const MAX_ROOT_SLOTS: u64 = 100_000;
/// The table of versions in a separate ledger file of version 1.
const OLD_META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Version of the placement ledger's tables.
pub const LEDGER_VERSION: u64 = 1;

/// Who placed which held block; see the module documentation.
pub struct Ledger {
    store: Arc<LocalStore>,
}

impl Ledger {
    /// Opens (or creates) the ledger in `store`'s index. The placements of a
    /// ledger kept in a file of its own at `old_file` (as before version 1
    /// moved into the index) are moved in, and the file removed.
    pub fn open(store: Arc<LocalStore>, old_file: &Path) -> Result<Ledger, Error> {
        let txn = store.index().begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("version", LEDGER_VERSION)?;
                }
                Some(LEDGER_VERSION) => {}
                Some(v) => {
                    return Err(Error::Ledger(format!(
                        "ledger version {v} is not supported (this program reads version {LEDGER_VERSION})"
                    )));
                }
            }
            txn.open_table(ROOTS)?;
            txn.open_table(DEVICES)?;
            let mut placers = txn.open_multimap_table(PLACERS)?;
            if old_file.exists() {
                let moved = move_in(old_file, &mut placers)?;
                tracing::info!(moved, file = %old_file.display(), "moved the placement ledger into the volume's index");
            }
        }
        txn.commit()?;
        if old_file.exists() {
            std::fs::remove_file(old_file)
                .map_err(|e| Error::Ledger(format!("{}: {e}", old_file.display())))?;
        }
        Ok(Ledger { store })
    }

    fn db(&self) -> &Database {
        self.store.index()
    }

    /// Records placements in `txn`, a write transaction of the volume's
    /// index (the one that links their blocks in); for each, true if it had
    /// not been recorded.
    pub fn add_in(
        txn: &redb::WriteTransaction,
        placements: &[(Score, PeerId)],
    ) -> Result<Vec<bool>, fincrypt_blockstore::Error> {
        let mut table = txn.open_multimap_table(PLACERS)?;
        placements
            .iter()
            .map(|(s, p)| Ok(!table.insert(s.0, p.to_bytes().as_slice())?))
            .collect()
    }

    /// Records that `peer` placed `score`; true if it had not before.
    pub fn add(&self, score: &Score, peer: &PeerId) -> Result<bool, Error> {
        Ok(self.add_many(&[(*score, *peer)])?[0])
    }

    /// Records several placements in one commit; for each, true if it had not been recorded.
    pub fn add_many(&self, placements: &[(Score, PeerId)]) -> Result<Vec<bool>, Error> {
        let txn = self.db().begin_write()?;
        let out = Ledger::add_in(&txn, placements).map_err(|e| Error::Ledger(e.to_string()))?;
        txn.commit()?;
        Ok(out)
    }

    /// The peers that placed `score`.
    pub fn placers(&self, score: &Score) -> Result<Vec<PeerId>, Error> {
        let txn = self.db().begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        let mut out = Vec::new();
        for v in table.get(score.0)? {
            let v = v?;
            match PeerId::from_bytes(v.value()) {
                Ok(p) => out.push(p),
                Err(e) => return Err(Error::Ledger(format!("bad peer id for {score}: {e}"))),
            }
        }
        Ok(out)
    }

    /// Every placement, in score order: one full read of the table.
    pub fn all(&self) -> Result<Vec<(Score, PeerId)>, Error> {
        let txn = self.db().begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, values) = row?;
            let score = Score(k.value());
            for v in values {
                let v = v?;
                match PeerId::from_bytes(v.value()) {
                    Ok(p) => out.push((score, p)),
                    Err(e) => return Err(Error::Ledger(format!("bad peer id for {score}: {e}"))),
                }
            }
        }
        Ok(out)
    }

    /// For each score, whether any peer has placed it.
    pub fn placed(&self, scores: &[Score]) -> Result<Vec<bool>, Error> {
        let txn = self.db().begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        scores
            .iter()
            .map(|s| Ok(!table.get(s.0)?.is_empty()))
            .collect()
    }

    /// Removes these placements in one commit; for each, true if it was recorded.
    pub fn remove(&self, placements: &[(Score, PeerId)]) -> Result<Vec<bool>, Error> {
        let txn = self.db().begin_write()?;
        let out = {
            let mut table = txn.open_multimap_table(PLACERS)?;
            placements
                .iter()
                .map(|(s, p)| Ok(table.remove(s.0, p.to_bytes().as_slice())?))
                .collect::<Result<Vec<bool>, Error>>()?
        };
        txn.commit()?;
        Ok(out)
    }

    /// Keeps `record` (already verified) as its owner's root unless the slot
    /// holds one of the same or a higher sequence: then that one's sequence.
    /// Check and write are one write transaction, so two offers racing
    /// cannot leave the lower one in place.
    pub fn offer_root(&self, record: &SignedRoot, bytes: &[u8]) -> Result<RootOffer, Error> {
        let txn = self.db().begin_write()?;
        let outcome = {
            let mut table = txn.open_table(ROOTS)?;
            let kept = table.get(record.owner)?.map(|v| v.value().to_vec());
            match kept.map(|k| SignedRoot::decode(&k).map(|r| (r, k))) {
                Some(Ok((k, _))) if k.sequence == record.sequence && k == *record => {
                    RootOffer::Kept
                }
                Some(Ok((k, _))) if !crate::root::supersedes(record, &k) => {
                    RootOffer::Stale(k.sequence)
                }
                kept => {
                    if kept.is_none() && table.len()? >= MAX_ROOT_SLOTS {
                        RootOffer::Full
                    } else {
                        if let Some(Err(e)) = kept {
                            tracing::warn!(error = %e, "a kept root record no longer verifies; replacing it");
                        }
                        table.insert(record.owner, bytes)?;
                        RootOffer::Kept
                    }
                }
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Records that `peer` is a device of `owner` (the signature already
    /// checked); false if the table is full.
    pub fn bind(&self, peer: &PeerId, owner: &[u8; 32]) -> Result<bool, Error> {
        let txn = self.db().begin_write()?;
        let ok = {
            let mut t = txn.open_table(DEVICES)?;
            let key = peer.to_bytes();
            if t.get(key.as_slice())?.is_none() && t.len()? >= MAX_DEVICES {
                false
            } else {
                t.insert(key.as_slice(), *owner)?;
                true
            }
        };
        txn.commit()?;
        Ok(ok)
    }

    /// The owner `peer` is bound to, if any.
    pub fn owner_of(&self, peer: &PeerId) -> Result<Option<[u8; 32]>, Error> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(DEVICES)?;
        Ok(t.get(peer.to_bytes().as_slice())?.map(|v| v.value()))
    }

    /// The root record kept for `owner`, as it was sent.
    pub fn root(&self, owner: &[u8; 32]) -> Result<Option<Vec<u8>>, Error> {
        let txn = self.db().begin_read()?;
        let table = txn.open_table(ROOTS)?;
        Ok(table.get(*owner)?.map(|v| v.value().to_vec()))
    }

    /// Number of owners whose root record is kept.
    pub fn root_records(&self) -> Result<u64, Error> {
        let txn = self.db().begin_read()?;
        Ok(txn.open_table(ROOTS)?.len()?)
    }

    /// Number of blocks with at least one placer.
    pub fn blocks(&self) -> Result<u64, Error> {
        let txn = self.db().begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        let mut n = 0;
        for item in table.iter()? {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

/// Copies every placement of the ledger file at `path` into `placers`.
fn move_in(
    path: &Path,
    placers: &mut redb::MultimapTable<'_, [u8; 32], &[u8]>,
) -> Result<u64, Error> {
    let old =
        Database::open(path).map_err(|e| Error::Ledger(format!("{}: {e}", path.display())))?;
    let txn = old.begin_read()?;
    let version = txn.open_table(OLD_META)?.get("version")?.map(|v| v.value());
    if version != Some(1) {
        return Err(Error::Ledger(format!(
            "{}: ledger version {version:?} is not supported",
            path.display()
        )));
    }
    let mut moved = 0;
    for entry in txn.open_multimap_table(PLACERS)?.iter()? {
        let (score, peers) = entry?;
        for peer in peers {
            placers.insert(score.value(), peer?.value())?;
            moved += 1;
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dir: &Path) -> Arc<LocalStore> {
        let options = fincrypt_blockstore::StoreOptions::default();
        Arc::new(LocalStore::open(&dir.join("held"), options).unwrap())
    }

    #[test]
    fn placements_are_per_peer_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.redb");
        let (a, b) = (PeerId::random(), PeerId::random());
        let s = Score([1; 32]);
        {
            let ledger = Ledger::open(volume(dir.path()), &path).unwrap();
            assert!(ledger.add(&s, &a).unwrap());
            assert!(!ledger.add(&s, &a).unwrap());
            assert!(ledger.add(&s, &b).unwrap());
        }
        let ledger = Ledger::open(volume(dir.path()), &path).unwrap();
        let mut placers = ledger.placers(&s).unwrap();
        placers.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(placers, expected);
        assert_eq!(
            ledger.placed(&[s, Score([2; 32])]).unwrap(),
            vec![true, false]
        );
        assert_eq!(ledger.remove(&[(s, a), (s, a)]).unwrap(), vec![true, false]);
        assert_eq!(ledger.placers(&s).unwrap(), vec![b]);
        assert_eq!(ledger.blocks().unwrap(), 1);
        ledger.remove(&[(s, b)]).unwrap();
        let t = Score([3; 32]);
        assert_eq!(
            ledger.add_many(&[(t, a), (t, b), (t, a)]).unwrap(),
            vec![true, true, false]
        );
        ledger.remove(&[(t, a), (t, b)]).unwrap();
        assert_eq!(ledger.placed(&[s]).unwrap(), vec![false]);
        assert_eq!(ledger.blocks().unwrap(), 0);
    }

    #[test]
    fn a_ledger_file_of_its_own_is_moved_into_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.redb");
        let (a, b) = (PeerId::random(), PeerId::random());
        let (s, t) = (Score([1; 32]), Score([2; 32]));
        {
            // The version 1 layout: a file with `placers` and `meta`.
            let old = Database::create(&path).unwrap();
            let txn = old.begin_write().unwrap();
            {
                txn.open_table(OLD_META)
                    .unwrap()
                    .insert("version", 1)
                    .unwrap();
                let mut placers = txn.open_multimap_table(PLACERS).unwrap();
                for (score, peer) in [(s, a), (s, b), (t, b)] {
                    placers.insert(score.0, peer.to_bytes().as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let ledger = Ledger::open(volume(dir.path()), &path).unwrap();
        assert!(!path.exists(), "the old file is gone once moved");
        let mut placers = ledger.placers(&s).unwrap();
        placers.sort();
        let mut expected = vec![a, b];
        expected.sort();
        assert_eq!(placers, expected);
        assert_eq!(ledger.placers(&t).unwrap(), vec![b]);
        drop(ledger);
        let ledger = Ledger::open(volume(dir.path()), &path).unwrap();
        assert_eq!(ledger.blocks().unwrap(), 2);
    }
}
