//! File data that is written but not yet in blocks.
//!
//! Writes land in memory as extents over the file's committed tree. Reads
//! see the extents laid over the tree. On flush, fsync, close or when memory
//! runs short, the file is rewritten from its first changed chunk: the
//! unchanged prefix of chunks is kept, the rest is chunked and sealed anew.

use std::collections::BTreeMap;

use fincrypt_blockstore::{BlockStore, Class, FileRef, Keys, TreeParams, TreeReader, TreeWriter};

use crate::error::FsError;
use crate::meta::Time;

/// Capacity an appended-to extent reserves: the write buffer's size, plus a write.
const EXTENT_RESERVE: usize = 17 << 20;
/// Bytes streamed per step while rewriting a file.
const STEP: usize = 4 << 20;

/// Written-but-unsealed state of one file.
#[derive(Debug)]
pub struct Dirty {
    /// The committed content the extents lie over.
    pub base: FileRef,
    /// The file's current length.
    pub size: u64,
    /// Written ranges: start offset -> bytes; never overlapping or adjacent.
    extents: BTreeMap<u64, Vec<u8>>,
    /// Smallest offset whose content may differ from `base`.
    pub first_change: u64,
    /// Committed bytes still visible: a truncation hides what lies past it for good.
    base_valid: u64,
    /// The length when this state began, to tell whether it changed.
    initial_size: u64,
    /// Time of the last write.
    pub mtime: Time,
}

impl Dirty {
    /// Fresh state over committed content of `size` bytes.
    pub fn new(base: FileRef, size: u64) -> Dirty {
        let base_valid = base.len();
        Dirty {
            base,
            size,
            extents: BTreeMap::new(),
            first_change: u64::MAX,
            base_valid,
            initial_size: size,
            mtime: Time::now(),
        }
    }

    /// Bytes held in memory.
    pub fn held(&self) -> usize {
        self.extents.values().map(Vec::len).sum()
    }

    /// True when nothing differs from `base`.
    pub fn is_clean(&self) -> bool {
        self.first_change == u64::MAX && self.size == self.initial_size
    }

    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        self.size = self.size.max(end);
        self.first_change = self.first_change.min(offset);
        self.mtime = Time::now();
        // The common case, writing on from where an extent ends (or inside
        // it), extends that extent in place instead of copying it.
        let before = self
            .extents
            .range(..=offset)
            .next_back()
            .map(|(s, v)| (*s, *s + v.len() as u64));
        if let Some((s, e)) = before {
            let next_touches = self.extents.range(s + 1..=end).next().is_some();
            if let Some(v) = self
                .extents
                .get_mut(&s)
                .filter(|_| e >= offset && !next_touches)
            {
                let at = (offset - s) as usize;
                if v.capacity() < at + data.len() {
                    // Reserve for the whole write buffer at once: growing by
                    // doubling would copy it and fault in new pages each time
                    // (untouched capacity costs no memory).
                    v.reserve_exact((at + data.len()).max(EXTENT_RESERVE) - v.len());
                }
                // Overwrite what the extent has, append the rest (no zero-fill first).
                let overlap = (v.len() - at).min(data.len());
                v[at..at + overlap].copy_from_slice(&data[..overlap]);
                v.extend_from_slice(&data[overlap..]);
                return;
            }
        }
        // Otherwise merge with every extent that overlaps or touches [offset, end).
        let mut start = offset;
        let mut merged: Vec<u8> = Vec::new();
        let touching: Vec<u64> = self
            .extents
            .range(..=end)
            .filter(|(s, v)| *s + v.len() as u64 >= offset)
            .map(|(s, _)| *s)
            .collect();
        if let Some(&first) = touching.first() {
            start = start.min(first);
        }
        let mut new_end = end;
        for s in &touching {
            new_end = new_end.max(s + self.extents[s].len() as u64);
        }
        merged.resize((new_end - start) as usize, 0);
        for s in touching {
            if let Some(v) = self.extents.remove(&s) {
                let at = (s - start) as usize;
                merged[at..at + v.len()].copy_from_slice(&v);
            }
        }
        let at = (offset - start) as usize;
        merged[at..at + data.len()].copy_from_slice(data);
        self.extents.insert(start, merged);
    }

    /// Sets the length: cuts extents past it, or extends with zeros.
    pub fn truncate(&mut self, size: u64) {
        if size < self.size {
            let cut: Vec<u64> = self
                .extents
                .range(..)
                .filter(|(s, v)| *s + v.len() as u64 > size)
                .map(|(s, _)| *s)
                .collect();
            for s in cut {
                if s >= size {
                    self.extents.remove(&s);
                } else if let Some(v) = self.extents.get_mut(&s) {
                    v.truncate((size - s) as usize);
                }
            }
        }
        self.first_change = self.first_change.min(size.min(self.size));
        self.base_valid = self.base_valid.min(size);
        self.size = size;
        self.mtime = Time::now();
    }

    /// Replaces `[offset, offset+len)` with zeros (a punched hole), within the current size.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = (offset + len).min(self.size);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(STEP as u64) as usize;
            self.write(at, &vec![0u8; n]);
            at += n as u64;
        }
    }

    /// Reads `buf.len()` bytes at `offset` (the caller has clipped to `size`).
    pub fn read<S: BlockStore>(
        &self,
        reader: &TreeReader<S>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), FsError> {
        let end = offset + buf.len() as u64;
        // Committed bytes first (zeros past the committed end), then the extents on top.
        let base_len = self.base_valid.min(self.size);
        if offset < base_len {
            let n = ((base_len - offset) as usize).min(buf.len());
            reader.read_at(&self.base, offset, &mut buf[..n])?;
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        for (s, v) in self.extents.range(..end) {
            let e = s + v.len() as u64;
            if e <= offset {
                continue;
            }
            let from = offset.max(*s);
            let to = end.min(e);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&v[(from - s) as usize..(to - s) as usize]);
        }
        Ok(())
    }

    /// The written bytes from `at` (before `end`), if an extent holds `at`.
    fn written_run(&self, at: u64, end: u64) -> Option<&[u8]> {
        let (s, v) = self.extents.range(..=at).next_back()?;
        let e = (s + v.len() as u64).min(end);
        (at < e).then(|| &v[(at - s) as usize..(e - s) as usize])
    }

    /// Writes the file's new content as blocks and returns its reference.
    pub fn seal<S: BlockStore>(
        &self,
        store: &dyn BlockStore,
        reader: &TreeReader<S>,
        keys: &Keys,
        params: TreeParams,
    ) -> Result<FileRef, FsError> {
        // Past the last written byte and the visible committed bytes lie only
        // zeros that were never written (an extended or preallocated tail):
        // they are not stored, since a file may be longer than its content.
        let written_end = self
            .extents
            .iter()
            .next_back()
            .map(|(s, v)| s + v.len() as u64)
            .unwrap_or(0);
        let data_end = written_end.max(self.base_valid).min(self.size);
        let from = self.first_change.min(data_end).min(self.base.len());
        let (w, mut at) =
            TreeWriter::resume(store, keys, params, Class::Own, &self.base, reader, from)?;
        // Durable at the next fsync or sync, which syncs the store first.
        let mut w = w.unsynced();
        // Sized to what is sealed: a small file must not fault in a whole step.
        let mut buf = Vec::new();
        while at < data_end {
            // Written bytes go to the writer straight from their extent.
            if let Some(run) = self.written_run(at, data_end) {
                w.write(run)?;
                at += run.len() as u64;
                continue;
            }
            let n = ((data_end - at) as usize).min(STEP);
            buf.resize(n, 0);
            self.read(reader, at, &mut buf[..n])?;
            w.write(&buf[..n])?;
            at += n as u64;
        }
        Ok(w.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::MemStore;

    #[test]
    fn extents_merge_and_read_back_over_a_base() {
        let store = MemStore::new();
        let keys = fincrypt_blockstore::MasterSecret::generate().keys();
        let params = TreeParams {
            min_chunk: 64,
            avg_chunk: 256,
            max_chunk: 1024,
            fanout: 4,
            inline_max: 64,
        };
        let mut model: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let base = fincrypt_blockstore::tree::write_all(&store, &keys, params, Class::Own, &model)
            .unwrap();
        let reader = TreeReader::new(&store, 1 << 20);
        let mut d = Dirty::new(base, model.len() as u64);
        for (off, len, byte) in [
            (100u64, 50usize, 1u8),
            (140, 100, 2),
            (90, 5, 3),
            (9_990, 30, 4),
            (20_000, 10, 5),
        ] {
            d.write(off, &vec![byte; len]);
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].fill(byte);
        }
        d.truncate(15_000);
        model.truncate(15_000);
        d.truncate(21_000);
        model.resize(21_000, 0);
        let mut buf = vec![0u8; model.len()];
        d.read(&reader, 0, &mut buf).unwrap();
        assert_eq!(buf, model);
        let sealed = d.seal(&store, &reader, &keys, params).unwrap();
        // The zeros that extend the file past its last write are not stored.
        let stored = reader.read_all(&sealed).unwrap();
        // The write at 20,000 was cut by the truncation to 15,000; the last is at 9,990 + 30.
        assert_eq!(stored.len(), 10_020);
        assert!(stored == model[..stored.len()], "sealed content differs");
        assert!(model[stored.len()..].iter().all(|b| *b == 0));
    }
}
