//! The placement ledger: which peers placed each block a holder keeps for others.
//!
//! A redb file with a multimap table from score to the PeerIds (their
//! multihash bytes) that placed it, and a `meta` table with the format
//! version (docs/FORMATS.md, "Placement ledger"). Every change is a durable
//! commit. The holder writes a placement here before it stores the block and
//! removes it only after deleting the block, so after any crash every held
//! block still has its placers and can be released.

use std::path::Path;

use fincrypt_blockstore::Score;
use libp2p::PeerId;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};

use crate::Error;

/// Bytes of ledger pages redb may cache.
const LEDGER_CACHE: usize = 8 << 20;
const PLACERS: MultimapTableDefinition<[u8; 32], &[u8]> = MultimapTableDefinition::new("placers");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Version of the placement ledger's tables.
pub const LEDGER_VERSION: u64 = 1;

/// Who placed which held block; see the module documentation.
pub struct Ledger {
    db: Database,
}

impl Ledger {
    /// Opens (or creates) the ledger file at `path`.
    pub fn open(path: &Path) -> Result<Ledger, Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Ledger(format!("{}: {e}", dir.display())))?;
        }
        // redb caches up to 1 GiB by default; a node's memory is bounded.
        let db = redb::Builder::new()
            .set_cache_size(LEDGER_CACHE)
            .create(path)
            .map_err(|e| Error::Ledger(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write()?;
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
            txn.open_multimap_table(PLACERS)?;
        }
        txn.commit()?;
        Ok(Ledger { db })
    }

    /// Records that `peer` placed `score`; true if it had not before.
    pub fn add(&self, score: &Score, peer: &PeerId) -> Result<bool, Error> {
        let txn = self.db.begin_write()?;
        let was = {
            let mut table = txn.open_multimap_table(PLACERS)?;
            table.insert(score.0, peer.to_bytes().as_slice())?
        };
        txn.commit()?;
        Ok(!was)
    }

    /// Records several placements in one commit; for each, true if it had not been recorded.
    pub fn add_many(&self, placements: &[(Score, PeerId)]) -> Result<Vec<bool>, Error> {
        let txn = self.db.begin_write()?;
        let out = {
            let mut table = txn.open_multimap_table(PLACERS)?;
            placements
                .iter()
                .map(|(s, p)| Ok(!table.insert(s.0, p.to_bytes().as_slice())?))
                .collect::<Result<Vec<bool>, Error>>()?
        };
        txn.commit()?;
        Ok(out)
    }

    /// The peers that placed `score`.
    pub fn placers(&self, score: &Score) -> Result<Vec<PeerId>, Error> {
        let txn = self.db.begin_read()?;
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

    /// For each score, whether any peer has placed it.
    pub fn placed(&self, scores: &[Score]) -> Result<Vec<bool>, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        scores
            .iter()
            .map(|s| Ok(!table.get(s.0)?.is_empty()))
            .collect()
    }

    /// Removes these placements in one commit; for each, true if it was recorded.
    pub fn remove(&self, placements: &[(Score, PeerId)]) -> Result<Vec<bool>, Error> {
        let txn = self.db.begin_write()?;
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

    /// Number of blocks with at least one placer.
    pub fn blocks(&self) -> Result<u64, Error> {
        let txn = self.db.begin_read()?;
        let table = txn.open_multimap_table(PLACERS)?;
        let mut n = 0;
        for item in table.iter()? {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_are_per_peer_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.redb");
        let (a, b) = (PeerId::random(), PeerId::random());
        let s = Score([1; 32]);
        {
            let ledger = Ledger::open(&path).unwrap();
            assert!(ledger.add(&s, &a).unwrap());
            assert!(!ledger.add(&s, &a).unwrap());
            assert!(ledger.add(&s, &b).unwrap());
        }
        let ledger = Ledger::open(&path).unwrap();
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
}
