//! File data that is written but not yet in blocks.
//!
//! Writes land in memory as extents over the file's committed tree. Reads
//! see the extents laid over the tree. On flush, fsync, close or when memory
//! runs short, the file is rewritten from its first changed chunk: the
//! unchanged prefix of chunks is kept, the rest is chunked and sealed anew.
//!
//! When a writer fills its buffer, the full buffer is sealed in the
//! background ([`SealJob`]) while new writes collect over it: the new
//! extents lie over the job's view until its tree is committed, then over
//! that tree ([`Dirty::rebase`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use fincrypt_blockstore::{
    BlockStore, Class, FileRef, Keys, Resume, TreeParams, TreeReader, TreeWriter,
};

use crate::error::FsError;
use crate::meta::Time;

/// Capacity an appended-to extent reserves: the write buffer's size, plus a write.
const EXTENT_RESERVE: usize = 9 << 20;
/// Bytes streamed per step while rewriting a file.
const STEP: usize = 4 << 20;

/// What a file's extents lie over.
#[derive(Clone, Debug)]
pub enum Base {
    /// Content committed in blocks.
    Sealed(FileRef),
    /// Earlier writes being sealed in the background.
    Sealing(Arc<SealJob>),
}

/// Writes handed to a background sealer, and its outcome once known.
#[derive(Debug)]
pub struct SealJob {
    /// The writes, frozen; always over sealed content.
    pub dirty: Dirty,
    outcome: Mutex<Option<Result<(FileRef, bool), FsError>>>,
    done: Condvar,
}

impl SealJob {
    /// A job for `dirty`, which must lie over sealed content.
    pub fn new(dirty: Dirty) -> Arc<SealJob> {
        Arc::new(SealJob {
            dirty,
            outcome: Mutex::new(None),
            done: Condvar::new(),
        })
    }

    /// Records the outcome and wakes whoever waits for it.
    pub fn finish(&self, outcome: Result<(FileRef, bool), FsError>) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        *o = Some(outcome);
        self.done.notify_all();
    }

    /// Waits for the outcome: the sealed content (again on each call), or
    /// the error (to the first caller; later ones get an EIO).
    pub fn wait(&self) -> Result<(FileRef, bool), FsError> {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &mut *o {
                Some(Ok(done)) => return Ok(done.clone()),
                Some(Err(e)) => {
                    return Err(std::mem::replace(e, FsError::Errno(libc::EIO)));
                }
                None => o = self.done.wait(o).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }
}

/// Written-but-unsealed state of one file.
#[derive(Clone, Debug)]
pub struct Dirty {
    /// What the extents lie over.
    base: Base,
    /// The sealed base ends at a content-defined cut, with the bytes after
    /// it unchanged in the extents ([`TreeWriter::finish_at_cut`]).
    base_at_cut: bool,
    /// The file's current length.
    pub size: u64,
    /// Written ranges: start offset -> bytes; never overlapping (and adjacent
    /// only where a sealed piece's tail was laid back under newer writes).
    extents: BTreeMap<u64, Vec<u8>>,
    /// Ranges zeroed (punched) since `base`: start -> end. They read as
    /// zeros and are sealed as holes, so a zeroed range costs nothing
    /// however long it is. Never overlapping each other or the extents.
    zeros: BTreeMap<u64, u64>,
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
            base: Base::Sealed(base),
            base_at_cut: false,
            size,
            extents: BTreeMap::new(),
            zeros: BTreeMap::new(),
            first_change: u64::MAX,
            base_valid,
            initial_size: size,
            mtime: Time::now(),
        }
    }

    /// Fresh state over the view of `job`, whose writes are being sealed.
    pub fn over(job: Arc<SealJob>) -> Dirty {
        let (size, mtime) = (job.dirty.size, job.dirty.mtime);
        Dirty {
            base: Base::Sealing(job),
            base_at_cut: false,
            size,
            extents: BTreeMap::new(),
            zeros: BTreeMap::new(),
            first_change: u64::MAX,
            base_valid: size,
            initial_size: size,
            mtime,
        }
    }

    /// The background job this state lies over, if any.
    pub fn sealing(&self) -> Option<&Arc<SealJob>> {
        match &self.base {
            Base::Sealing(job) => Some(job),
            Base::Sealed(_) => None,
        }
    }

    /// Lays the extents over `sealed`, the committed outcome of `job`,
    /// the writes they lay over. Past its end that job's view held only
    /// zeros, unless `at_cut` (it ends at the job's last content-defined
    /// cut): then the job's bytes after it that are still visible are laid
    /// back under the extents, to be sealed with the next piece.
    pub fn rebase<S: BlockStore>(
        &mut self,
        sealed: FileRef,
        at_cut: bool,
        job: &Dirty,
        reader: &TreeReader<S>,
    ) -> Result<(), FsError> {
        if at_cut {
            // Read every gap first: on an error nothing has changed, and the
            // extents still lie over the job.
            let hi = self.base_valid.min(self.size).min(job.size);
            let mut gaps = Vec::new();
            let mut at = sealed.len();
            while at < hi {
                if let Some(e) = self.covered_until(at) {
                    at = e;
                    continue;
                }
                let next = self.next_covered(at).unwrap_or(hi).min(hi);
                let mut gap = vec![0u8; (next - at) as usize];
                job.read(reader, at, &mut gap)?;
                gaps.push((at, gap));
                at = next;
            }
            self.extents.extend(gaps);
        }
        self.base_valid = self.base_valid.min(sealed.len());
        self.base = Base::Sealed(sealed);
        self.base_at_cut = at_cut;
        Ok(())
    }

    /// True when the last write reaches the end of the file (a stream).
    pub fn written_to_end(&self) -> bool {
        self.extents
            .iter()
            .next_back()
            .is_some_and(|(s, v)| s + v.len() as u64 == self.size)
    }

    /// Folds these writes into those of the job they lay over, whose
    /// sealing failed: nothing written is lost, and sealing can be retried.
    pub fn fold_into(self, mut under: Dirty) -> Dirty {
        let visible = self.base_valid.min(self.size);
        if visible < under.size {
            under.truncate(visible);
        }
        if self.size != under.size {
            under.truncate(self.size);
        }
        for (s, e) in &self.zeros {
            under.zero(*s, e - s);
        }
        for (s, v) in &self.extents {
            under.write(*s, v);
        }
        under.first_change = under.first_change.min(self.first_change);
        under.mtime = under.mtime.max(self.mtime);
        under
    }

    /// Bytes held in memory.
    pub fn held(&self) -> usize {
        self.extents.values().map(Vec::len).sum()
    }

    /// True when nothing differs from `base`.
    pub fn is_clean(&self) -> bool {
        self.first_change == u64::MAX
            && self.size == self.initial_size
            && self.extents.is_empty()
            && self.zeros.is_empty()
    }

    /// Records a write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = offset + data.len() as u64;
        cut_ranges(&mut self.zeros, offset, end);
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
            cut_ranges(&mut self.zeros, size, u64::MAX);
        }
        self.first_change = self.first_change.min(size.min(self.size));
        self.base_valid = self.base_valid.min(size);
        self.size = size;
        self.mtime = Time::now();
    }

    /// Replaces `[offset, offset+len)` with zeros (a punched hole), within
    /// the current size. It costs the same whatever `len` is: the range is
    /// recorded, not filled, and sealed as a hole.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        // Written bytes in the range are gone; a part outside it stays.
        let hit = overlapping(&self.extents, offset, end, |s, v| s + v.len() as u64);
        for (s, _) in hit {
            let Some(mut v) = self.extents.remove(&s) else {
                continue;
            };
            if s + v.len() as u64 > end {
                self.extents.insert(end, v[(end - s) as usize..].to_vec());
            }
            if s < offset {
                v.truncate((offset - s) as usize);
                self.extents.insert(s, v);
            }
        }
        // One range for this and every zeroed range it overlaps or touches.
        let (mut lo, mut hi) = (offset, end);
        for (s, e) in overlapping(&self.zeros, offset.saturating_sub(1), end + 1, |_, e| *e) {
            self.zeros.remove(&s);
            (lo, hi) = (lo.min(s), hi.max(e));
        }
        self.zeros.insert(lo, hi);
        self.first_change = self.first_change.min(offset);
        self.mtime = Time::now();
    }

    /// The end of the extent or zeroed range that holds `at`, if one does.
    fn covered_until(&self, at: u64) -> Option<u64> {
        let written = self
            .extents
            .range(..=at)
            .next_back()
            .map(|(s, v)| s + v.len() as u64);
        let zeroed = self.zeros.range(..=at).next_back().map(|(_, e)| *e);
        written.into_iter().chain(zeroed).find(|e| *e > at)
    }

    /// Where the first extent or zeroed range after `at` starts.
    fn next_covered(&self, at: u64) -> Option<u64> {
        let written = self.extents.range(at + 1..).next().map(|(s, _)| *s);
        let zeroed = self.zeros.range(at + 1..).next().map(|(s, _)| *s);
        written.into_iter().chain(zeroed).min()
    }

    /// Bytes of the file kept as data rather than holes: what it occupies
    /// (an estimate while writes are pending, exact once sealed).
    pub fn stored_bytes(&self) -> u64 {
        let under = match &self.base {
            Base::Sealed(f) => f.data_len(),
            Base::Sealing(job) => job.dirty.stored_bytes(),
        };
        (under.min(self.base_valid) + self.held() as u64).min(self.size)
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
            match &self.base {
                Base::Sealed(base) => {
                    reader.read_at(base, offset, &mut buf[..n])?;
                }
                Base::Sealing(job) => job.dirty.read(reader, offset, &mut buf[..n])?,
            }
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        for (s, e) in overlapping(&self.zeros, offset, end, |_, e| *e) {
            buf[(s.max(offset) - offset) as usize..(e.min(end) - offset) as usize].fill(0);
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
        Ok(self.seal_with(store, reader, keys, params, false)?.0)
    }

    /// Like [`Dirty::seal`], but for a piece of a stream: stops at the last
    /// content-defined cut and says whether it did (the rest is for
    /// [`Dirty::rebase`] to keep).
    pub fn seal_at_cut<S: BlockStore>(
        &self,
        store: &dyn BlockStore,
        reader: &TreeReader<S>,
        keys: &Keys,
        params: TreeParams,
    ) -> Result<(FileRef, bool), FsError> {
        self.seal_with(store, reader, keys, params, true)
    }

    fn seal_with<S: BlockStore>(
        &self,
        store: &dyn BlockStore,
        reader: &TreeReader<S>,
        keys: &Keys,
        params: TreeParams,
        at_cut: bool,
    ) -> Result<(FileRef, bool), FsError> {
        // Past the last written byte and the visible committed bytes lie only
        // zeros that were never written (an extended or preallocated tail):
        // they are not stored, since a file may be longer than its content.
        let written_end = self
            .extents
            .iter()
            .next_back()
            .map(|(s, v)| s + v.len() as u64)
            .unwrap_or(0);
        let Base::Sealed(base) = &self.base else {
            // The file lock lets a job start only over sealed content.
            return Err(FsError::Errno(libc::EIO));
        };
        let data_end = written_end.max(self.base_valid).min(self.size);
        let from = self.first_change.min(data_end);
        let resume = if self.base_at_cut && from > base.len() {
            Resume::Cut
        } else {
            Resume::Change(from.min(base.len()))
        };
        let (w, mut at) =
            TreeWriter::resume(store, keys, params, Class::Own, base, reader, resume)?;
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
            // Zeroed, or never written: a hole, whatever its length.
            if let Some(e) = self.covered_until(at) {
                let e = e.min(data_end);
                w.write_hole(e - at)?;
                at = e;
                continue;
            }
            let next = self.next_covered(at).unwrap_or(data_end).min(data_end);
            if at >= self.base_valid {
                w.write_hole(next - at)?;
                at = next;
                continue;
            }
            // Committed bytes: a hole in the base stays a hole, data is copied.
            let lim = next.min(self.base_valid);
            let run = reader.run_at(base, at)?;
            let stop = run.map_or(lim, |r| r.end.min(lim));
            if run.is_some_and(|r| r.hole) {
                w.write_hole(stop - at)?;
                at = stop;
                continue;
            }
            let n = ((stop - at) as usize).min(STEP);
            buf.resize(n, 0);
            self.read(reader, at, &mut buf[..n])?;
            w.write(&buf[..n])?;
            at += n as u64;
        }
        if at_cut {
            Ok(w.finish_at_cut()?)
        } else {
            Ok((w.finish()?, false))
        }
    }
}

/// The ranges (start, end) of `map` that overlap `[lo, hi)`, where
/// `end_of(start, value)` is where the range of an entry ends.
fn overlapping<V>(
    map: &BTreeMap<u64, V>,
    lo: u64,
    hi: u64,
    end_of: impl Fn(u64, &V) -> u64,
) -> Vec<(u64, u64)> {
    let before = map.range(..lo).next_back();
    before
        .into_iter()
        .chain(map.range(lo..hi))
        .map(|(s, v)| (*s, end_of(*s, v)))
        .filter(|(_, e)| *e > lo)
        .collect()
}

/// Removes `[lo, hi)` from disjoint ranges (start -> end), splitting one that straddles it.
fn cut_ranges(ranges: &mut BTreeMap<u64, u64>, lo: u64, hi: u64) {
    for (s, e) in overlapping(ranges, lo, hi, |_, e| *e) {
        ranges.remove(&s);
        if s < lo {
            ranges.insert(s, lo);
        }
        if e > hi {
            ranges.insert(hi, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fincrypt_blockstore::MemStore;

    /// Small chunks and fanout, so a few KiB make multi-level trees.
    const SMALL: TreeParams = TreeParams {
        min_chunk: 64,
        avg_chunk: 256,
        max_chunk: 1024,
        fanout: 4,
        inline_max: 64,
    };

    #[test]
    fn extents_merge_and_read_back_over_a_base() {
        let store = MemStore::new();
        let keys = fincrypt_blockstore::MasterSecret::generate().keys();
        let params = SMALL;
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

    fn view<S: BlockStore>(d: &Dirty, reader: &TreeReader<S>) -> Vec<u8> {
        let mut buf = vec![0u8; d.size as usize];
        d.read(reader, 0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn writes_over_a_seal_job_rebase_onto_it_or_fold_back_into_it() {
        let store = MemStore::new();
        let keys = fincrypt_blockstore::MasterSecret::generate().keys();
        let params = SMALL;
        let reader = TreeReader::new(&store, 1 << 20);
        let base_data: Vec<u8> = (0..6_000u32).map(|i| (i * 7) as u8).collect();
        let base =
            fincrypt_blockstore::tree::write_all(&store, &keys, params, Class::Own, &base_data)
                .unwrap();
        // The job's writes: an edit, an append, a hole and zeros past its last write.
        let mut under = Dirty::new(base, base_data.len() as u64);
        under.write(100, &[1; 300]);
        under.write(6_000, &[2; 2_000]);
        under.write(9_000, &[3; 500]);
        under.truncate(12_000);
        let job = SealJob::new(under.clone());
        // New writes over it: a cut into its writes, then writes across the cut.
        let mut over = Dirty::over(job.clone());
        over.write(50, &[4; 100]);
        over.truncate(7_000);
        over.write(6_900, &[5; 400]);
        over.write(10_000, &[6; 10]);
        let expected = view(&over, &reader);
        assert_eq!(expected.len(), 10_010);
        assert_eq!(
            &expected[7_300..10_000],
            &vec![0u8; 2_700][..],
            "the cut hid the job's bytes"
        );

        // A failed seal: the writes fold back into the job's, losing nothing.
        let folded = over.clone().fold_into(job.dirty.clone());
        assert!(folded.sealing().is_none());
        assert_eq!(view(&folded, &reader), expected);
        let resealed = folded.seal(&store, &reader, &keys, params).unwrap();
        let stored = reader.read_all(&resealed).unwrap();
        assert_eq!(stored, expected[..stored.len()]);

        // A successful one: the writes lie over its tree.
        let sealed = job.dirty.seal(&store, &reader, &keys, params).unwrap();
        over.rebase(sealed, false, &job.dirty, &reader).unwrap();
        assert!(over.sealing().is_none());
        assert_eq!(view(&over, &reader), expected);
        let resealed = over.seal(&store, &reader, &keys, params).unwrap();
        let stored = reader.read_all(&resealed).unwrap();
        assert_eq!(stored, expected[..stored.len()]);
    }

    #[test]
    fn zeroed_and_never_written_ranges_are_sealed_as_holes_and_read_as_zeros() {
        let store = MemStore::new();
        let keys = fincrypt_blockstore::MasterSecret::generate().keys();
        let reader = TreeReader::new(&store, 1 << 20);
        let base_data: Vec<u8> = (0..40_000u32).map(|i| (i * 13 + 1) as u8).collect();
        let base =
            fincrypt_blockstore::tree::write_all(&store, &keys, SMALL, Class::Own, &base_data)
                .unwrap();
        let mut d = Dirty::new(base, base_data.len() as u64);
        let mut model = base_data.clone();
        let apply = |d: &mut Dirty, model: &mut Vec<u8>, op: (bool, u64, u64, u8)| {
            let (zero, off, len, byte) = op;
            if zero {
                d.zero(off, len);
                let end = ((off + len) as usize).min(model.len());
                if (off as usize) < end {
                    model[off as usize..end].fill(0);
                }
            } else {
                d.write(off, &vec![byte; len as usize]);
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].fill(byte);
            }
        };
        // Writes and zeroed ranges that overlap, split and touch each other
        // and the base; a write far past the end leaves a never-written gap.
        for op in [
            (false, 1_000, 3_000, 1),
            (true, 2_000, 20_000, 0),
            (false, 5_000, 100, 2),
            (true, 4_000, 1_000, 0),
            (true, 5_100, 900, 0),
            (false, 90_000, 50, 3),
            (true, 30_000, 5_000, 0),
            (true, 0, 10, 0),
        ] {
            apply(&mut d, &mut model, op);
            assert_eq!(view(&d, &reader), model, "after {op:?}");
        }
        assert!(d.held() <= 3_000 + 100 + 50, "zeroed ranges hold no memory");

        // A failed seal over these writes folds them back, zeros included.
        let job = SealJob::new(d.clone());
        let mut over = Dirty::over(job.clone());
        apply(&mut over, &mut model, (true, 89_000, 10_000, 0));
        apply(&mut over, &mut model, (false, 89_990, 20, 4));
        let folded = over.clone().fold_into(job.dirty.clone());
        assert_eq!(view(&folded, &reader), model);

        let sealed = folded.seal(&store, &reader, &keys, SMALL).unwrap();
        assert!(sealed.holes() >= 60_000, "holes: {}", sealed.holes());
        let stored = reader.read_all(&sealed).unwrap();
        assert_eq!(stored, model[..stored.len()]);
        assert!(model[stored.len()..].iter().all(|b| *b == 0));

        // Over the sealed tree, a write after the holes keeps them as holes.
        let mut again = Dirty::new(sealed.clone(), model.len() as u64);
        apply(&mut again, &mut model, (false, 200_000, 10, 5));
        let resealed = again.seal(&store, &reader, &keys, SMALL).unwrap();
        assert!(resealed.holes() > sealed.holes());
        let stored = reader.read_all(&resealed).unwrap();
        assert_eq!(stored, model);
    }
}
