//! A block store in memory: for unit tests and as the fastest cache tier.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;

use super::{BlockStore, Class, check};
use crate::{Error, Score};

/// Blocks in a hash map; verifies on get like every other store.
#[derive(Default)]
pub struct MemStore {
    blocks: Mutex<HashMap<Score, (Class, Bytes)>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Number of blocks stored.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no block is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces a block's bytes without checking them: lets tests play a damaged disk.
    pub fn tamper(&self, score: &Score, data: Bytes) {
        if let Some(e) = self.lock().get_mut(score) {
            e.1 = data;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Score, (Class, Bytes)>> {
        // A panic elsewhere while holding the lock leaves the map itself intact.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockStore for MemStore {
    fn put_batch(&self, blocks: &[(Score, Bytes)], class: Class) -> Result<(), Error> {
        let mut map = self.lock();
        for (score, data) in blocks {
            let e = map.entry(*score).or_insert((class, data.clone()));
            e.0 = e.0.max(class);
        }
        Ok(())
    }

    fn get(&self, score: &Score) -> Result<Bytes, Error> {
        let data = self
            .lock()
            .get(score)
            .map(|e| e.1.clone())
            .ok_or(Error::NotFound(*score))?;
        check(score, &data)?;
        Ok(data)
    }

    fn has(&self, score: &Score) -> Result<bool, Error> {
        Ok(self.lock().contains_key(score))
    }

    fn delete(&self, score: &Score) -> Result<bool, Error> {
        Ok(self.lock().remove(score).is_some())
    }
}
