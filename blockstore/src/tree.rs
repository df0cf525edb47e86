//! Files as trees of blocks: content-defined chunks at the leaves, encrypted
//! pointer blocks above them, one root pointer (or inline bytes) at the top.
//!
//! Reading a byte range fetches only the pointer blocks on its path and the
//! data blocks it overlaps. Small files are kept inline by their parent
//! (a directory entry) and cost no block of their own.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastcdc::v2020::{FastCDC, Normalization};
use serde::{Deserialize, Serialize};

use crate::block::{self, BlockKind, Pointer};
use crate::{BlockStore, Class, Error, Keys, Score};

/// Shape of file trees: chunk sizes, pointers per block, and the inline limit.
#[derive(Clone, Copy, Debug)]
pub struct TreeParams {
    /// Smallest chunk the chunker cuts (except at the end of a file).
    pub min_chunk: u32,
    /// Chunk size the chunker aims for.
    pub avg_chunk: u32,
    /// Largest chunk.
    pub max_chunk: u32,
    /// Pointers per pointer block.
    pub fanout: usize,
    /// Files up to this many bytes are kept inline rather than as blocks.
    pub inline_max: usize,
}

impl Default for TreeParams {
    fn default() -> Self {
        TreeParams {
            min_chunk: 256 << 10,
            avg_chunk: 1 << 20,
            max_chunk: 4 << 20,
            fanout: 1024,
            inline_max: 4096,
        }
    }
}

impl TreeParams {
    /// Buffered bytes that trigger chunking: several chunks, so both cores get work.
    fn batch_bytes(&self) -> usize {
        (self.max_chunk as usize * 4).max(16 << 20)
    }
}

/// The shortest hole a writer keeps as a hole; shorter runs of zeros are data.
pub const HOLE_MIN: u64 = 4096;

/// How a file's content is reached: inline bytes, or the root of a block tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRef {
    /// The whole content, kept by the parent.
    Inline(Vec<u8>),
    /// The root pointer of a tree of blocks without holes (layout 1).
    Tree(Pointer),
    /// The root pointer of a tree that holds holes (layout 2), and the bytes
    /// those holes cover.
    Sparse {
        /// The tree's root.
        root: Pointer,
        /// Bytes of the file that are holes rather than stored data.
        holes: u64,
    },
}

impl FileRef {
    /// The reference to the tree under `root` with `holes` bytes of holes.
    fn from_root(root: Pointer, holes: u64) -> FileRef {
        if holes == 0 {
            // A tree without holes keeps the first layout, readable by any reader.
            FileRef::Tree(root)
        } else {
            FileRef::Sparse { root, holes }
        }
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            FileRef::Inline(b) => b.len() as u64,
            FileRef::Tree(p) | FileRef::Sparse { root: p, .. } => p.len,
        }
    }

    /// The root of the file's tree, unless the file is inline.
    pub fn root(&self) -> Option<&Pointer> {
        match self {
            FileRef::Inline(_) => None,
            FileRef::Tree(p) | FileRef::Sparse { root: p, .. } => Some(p),
        }
    }

    /// Bytes of the file that are holes.
    pub fn holes(&self) -> u64 {
        match self {
            FileRef::Sparse { holes, .. } => *holes,
            _ => 0,
        }
    }

    /// Bytes of the file that are stored as data (inline or in blocks).
    pub fn data_len(&self) -> u64 {
        self.len().saturating_sub(self.holes())
    }

    /// True for a zero-length file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where [`TreeWriter::resume`] continues a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// At the first byte that differs from the base.
    Change(u64),
    /// At the end of a base that [`TreeWriter::finish_at_cut`] made, with the
    /// byte after it unchanged.
    Cut,
}

/// Builds a file tree from a stream of bytes, storing blocks as it goes.
///
/// Memory stays bounded by a few chunks however long the stream is. Chunks are
/// sealed in parallel on the rayon pool and stored one batch (one fsync and
/// one index commit) per flush.
pub struct TreeWriter<'a> {
    store: &'a dyn BlockStore,
    keys: &'a Keys,
    params: TreeParams,
    class: Class,
    buf: Vec<u8>,
    /// `levels[i]`: pointers of depth i not yet gathered into a parent block.
    levels: Vec<Vec<Pointer>>,
    pending: Vec<(Score, Bytes)>,
    /// The file is a tree, not inline: a block was stored or a hole written.
    stored_any: bool,
    durable: bool,
    /// Bytes of holes in the file so far.
    holes: u64,
}

/// A stretch of a file that is all data or all hole: see [`TreeReader::run_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The bytes are a hole (zeros that no block holds).
    pub hole: bool,
    /// Where the stretch ends (exclusive); at most the file's length.
    pub end: u64,
}

impl<'a> TreeWriter<'a> {
    /// A writer whose blocks go to `store` under `class`.
    pub fn new(
        store: &'a dyn BlockStore,
        keys: &'a Keys,
        params: TreeParams,
        class: Class,
    ) -> Self {
        TreeWriter {
            store,
            keys,
            params,
            class,
            buf: Vec::new(),
            levels: Vec::new(),
            pending: Vec::new(),
            stored_any: false,
            durable: true,
            holes: 0,
        }
    }

    /// Stores blocks without waiting for the disk ([`BlockStore::put_batch_unsynced`]);
    /// the caller syncs the store before it relies on them.
    pub fn unsynced(mut self) -> Self {
        self.durable = false;
        self
    }

    /// A writer that continues `base` and the offset from which the caller
    /// must write the new content. At [`Resume::Change`] it keeps the data
    /// blocks of `base` that end at a content-defined boundary before the
    /// first changed byte: appending to a large file thus re-chunks only its
    /// last chunk, and an edit re-chunks from the chunk it falls in. At
    /// [`Resume::Cut`] it keeps every block of `base`, which
    /// [`TreeWriter::finish_at_cut`] made, and the caller writes on from its end.
    /// (A tree with holes also has the pointer blocks over the shorter side
    /// of the kept part opened, to count its holes.)
    pub fn resume<S: BlockStore>(
        store: &'a dyn BlockStore,
        keys: &'a Keys,
        params: TreeParams,
        class: Class,
        base: &FileRef,
        reader: &TreeReader<S>,
        at: Resume,
    ) -> Result<(Self, u64), Error> {
        // The last leaf ends where the file ended, not at a content-defined
        // cut, so it is re-chunked (`from` is at most the end), unless
        // `finish_at_cut` made it.
        let from = match at {
            Resume::Change(from) => from.min(base.len()),
            Resume::Cut => u64::MAX,
        };
        let mut w = TreeWriter::new(store, keys, params, class);
        let mut end = 0u64;
        if let Some(root) = base.root() {
            w.keep(reader, root, true, &mut end, from)?;
            if base.holes() > 0 {
                // Count the holes kept on the shorter side of `end`: the kept
                // pointer blocks are not opened otherwise.
                w.holes = if end <= base.len() / 2 {
                    reader.holes_in(base, 0, end)?
                } else {
                    let dropped = reader.holes_in(base, end, base.len())?;
                    base.holes().checked_sub(dropped).ok_or_else(|| {
                        Error::Format("a file's tree holds more holes than it records".into())
                    })?
                };
            }
        }
        Ok((w, end))
    }

    /// Keeps what the resumed file shares with the subtree under `p`, which
    /// starts at `*end`: returns false at the first block not kept. A full
    /// pointer block whose whole range lies before `from` is kept as one
    /// pointer, since the writer would seal the very same block there;
    /// except on the tree's right edge (`last`), where `finish` may have
    /// filled a block with a partial one. So resuming reads only the right
    /// edge, however long the file.
    fn keep<S: BlockStore>(
        &mut self,
        reader: &TreeReader<S>,
        p: &Pointer,
        last: bool,
        end: &mut u64,
        from: u64,
    ) -> Result<bool, Error> {
        if p.is_hole() {
            // No chunker looks at a hole, so one that ends by the first
            // changed byte is kept. One that reaches past it is written again
            // by the caller, whole where it stays a hole, as a fresh writer would.
            if *end + p.len > from {
                return Ok(false);
            }
            self.add(0, *p)?;
            self.stored_any = true;
            *end += p.len;
            return Ok(true);
        }
        // FastCDC decides a cut at offset e by hashing byte e too (the first
        // byte of the next chunk), so a chunk is kept only if it ends
        // strictly before the first changed byte.
        if *end + p.len >= from && p.depth == 0 {
            return Ok(false);
        }
        if p.depth > 0 {
            let node = reader.node(p)?;
            let Node::Pointers(children) = &*node else {
                return Err(Error::Format(format!(
                    "pointer block {} holds data",
                    p.score
                )));
            };
            if last || children.len() != self.params.fanout || *end + p.len >= from {
                for (i, (_, c)) in children.iter().enumerate() {
                    let last = last && i + 1 == children.len();
                    if !self.keep(reader, c, last, end, from)? {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
        }
        self.add(p.depth as usize, *p)?;
        self.stored_any = true;
        *end += p.len;
        Ok(true)
    }

    /// Appends bytes to the file.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        let max_chunk = self.params.max_chunk as usize;
        if self.buf.is_empty() && data.len() >= 2 * max_chunk {
            // A large write is chunked where it lies; only its tail is copied.
            let consumed = self.seal_chunks(data, false)?;
            self.buf.extend_from_slice(&data[consumed..]);
            return Ok(());
        }
        if !self.buf.is_empty() && data.len() >= 3 * max_chunk {
            // Chunk the buffered bytes with just enough of `data` to pass a
            // cut (a chunk ends within `max_chunk` of its start), then the
            // rest of `data` where it lies, instead of copying all of it.
            let old = self.buf.len();
            self.buf.extend_from_slice(&data[..max_chunk]);
            let consumed = self.flush_chunks(false)?;
            if consumed >= old {
                self.buf.clear();
                return self.write(&data[consumed - old..]);
            }
            self.buf.extend_from_slice(&data[max_chunk..]);
        } else {
            self.buf.extend_from_slice(data);
        }
        if self.buf.len() >= self.params.batch_bytes() {
            self.flush_chunks(false)?;
        }
        Ok(())
    }

    /// Appends `len` zero bytes as a hole: no block holds them, so this costs
    /// the same whatever `len` is. The bytes written before it end their last
    /// chunk here, as at the end of a file. A hole shorter than
    /// [`HOLE_MIN`] is written as zeros: a pointer and a cut cost more.
    pub fn write_hole(&mut self, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Ok(());
        }
        let overflow = || Error::Format("file length overflows".into());
        if self.buf.is_empty()
            && let Some(last) = self
                .levels
                .first_mut()
                .and_then(|l| l.last_mut())
                .filter(|p| p.is_hole())
        {
            // Straight after a hole: one hole, however short this part.
            last.len = last.len.checked_add(len).ok_or_else(overflow)?;
            self.holes = self.holes.checked_add(len).ok_or_else(overflow)?;
            return Ok(());
        }
        if len < HOLE_MIN {
            return self.write(&[0u8; HOLE_MIN as usize][..len as usize]);
        }
        if !self.buf.is_empty() {
            self.flush_chunks(true)?;
        }
        self.holes = self.holes.checked_add(len).ok_or_else(overflow)?;
        self.stored_any = true;
        self.add(0, Pointer::hole(len))
    }

    /// Stores every chunk that ends at a content-defined cut and returns the
    /// tree of those alone and `true`: the bytes after the last cut are
    /// dropped, for the caller to write again over that tree, resumed at
    /// [`Resume::Cut`]. A stream sealed in pieces so is cut
    /// exactly as if written in one go, and no piece re-reads the last.
    /// With no cut at all, this is [`TreeWriter::finish`] and `false`.
    pub fn finish_at_cut(mut self) -> Result<(FileRef, bool), Error> {
        if self.buf.len() > self.params.inline_max {
            self.flush_chunks(false)?;
        }
        // A tree of nothing but a hole is no cut to resume at: it would
        // end as an empty file, so the buffered bytes are written after it.
        let only_hole = self.pending.is_empty()
            && self.levels.iter().map(Vec::len).sum::<usize>() == 1
            && self
                .levels
                .first()
                .and_then(|l| l.first())
                .is_some_and(Pointer::is_hole);
        let cut = (self.stored_any || self.levels.iter().any(|l| !l.is_empty())) && !only_hole;
        if cut {
            self.buf.clear();
        }
        Ok((self.finish()?, cut))
    }

    /// Stores what remains and returns the file's reference.
    pub fn finish(mut self) -> Result<FileRef, Error> {
        if !self.stored_any && self.buf.len() <= self.params.inline_max {
            return Ok(FileRef::Inline(std::mem::take(&mut self.buf)));
        }
        self.flush_chunks(true)?;
        let mut level = 0;
        let root = loop {
            if level >= self.levels.len() {
                return Err(Error::Format("file tree has no root".into()));
            }
            let higher_empty = self.levels[level + 1..].iter().all(Vec::is_empty);
            if higher_empty && self.levels[level].len() == 1 {
                break self.levels[level][0];
            }
            if !self.levels[level].is_empty() {
                let entries = std::mem::take(&mut self.levels[level]);
                self.push_parent(level, &entries)?;
            }
            level += 1;
        };
        self.put_pending()?;
        if root.is_hole() {
            // Nothing but a hole: no content at all, as past the end of any file.
            return Ok(FileRef::Inline(Vec::new()));
        }
        Ok(FileRef::from_root(root, self.holes))
    }

    /// Cuts the buffer into chunks and stores them; keeps the last, possibly
    /// incomplete chunk unless this is the end of the file. Returns the bytes used.
    fn flush_chunks(&mut self, last: bool) -> Result<usize, Error> {
        let buf = std::mem::take(&mut self.buf);
        let result = self.seal_chunks(&buf, last);
        self.buf = buf;
        let consumed = result?;
        self.buf.drain(..consumed);
        Ok(consumed)
    }

    /// Chunks `input`, seals the chunks and stores them with any parent
    /// blocks they complete; returns how many bytes of `input` were used.
    ///
    /// A helper thread cuts chunks and hands them to the rayon pool to seal;
    /// this thread stores each block as it comes, so cutting, sealing and
    /// writing overlap. (Waiting for sealed blocks on a pool thread instead
    /// could deadlock when every pool thread waits so.)
    fn seal_chunks(&mut self, input: &[u8], last: bool) -> Result<usize, Error> {
        let p = self.params;
        let (key, seed) = (&self.keys.content, self.keys.chunker_seed);
        if input.len() <= p.min_chunk as usize {
            // One chunk at most (none is cut shorter), and only at the end
            // of the file: sealed here, without a thread and a pool task
            // for each small file.
            if !last || input.is_empty() {
                return Ok(0);
            }
            let s = block::seal(key, BlockKind::Data, input)?;
            self.pending.push((s.pointer.score, s.data));
            self.add(0, s.pointer)?;
            self.put_pending()?;
            return Ok(input.len());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sealed: Vec<(usize, block::Pointer)> = Vec::new();
        let mut failed = None;
        let (store, class, durable) = (self.store, self.class, self.durable);
        let pending = &mut self.pending;
        let consumed = std::thread::scope(|threads| {
            let cutter = threads.spawn(move || {
                let mut consumed = 0;
                rayon::scope(|scope| {
                    let mut cuts = FastCDC::with_level_and_seed(
                        input,
                        p.min_chunk,
                        p.avg_chunk,
                        p.max_chunk,
                        Normalization::Level1,
                        seed,
                    )
                    .enumerate()
                    .peekable();
                    while let Some((i, c)) = cuts.next() {
                        // The final cut ends only where the input does: unless this is
                        // the end of the file, that chunk goes on in the next write.
                        if cuts.peek().is_none() && !last {
                            break;
                        }
                        consumed = c.offset + c.length;
                        let tx = tx.clone();
                        let chunk = &input[c.offset..c.offset + c.length];
                        scope.spawn(move |_| {
                            // The receiver outlives the scope, so this send cannot fail.
                            let _ = tx.send((i, block::seal(key, BlockKind::Data, chunk)));
                        });
                    }
                });
                consumed
            });
            for (i, s) in rx {
                let stored = s.and_then(|s| {
                    if durable {
                        // One durable batch below: one fsync pass, not one per block.
                        pending.push((s.pointer.score, s.data));
                    } else {
                        store.put_batch_unsynced(&[(s.pointer.score, s.data)], class)?;
                    }
                    Ok(s.pointer)
                });
                match stored {
                    Ok(p) => sealed.push((i, p)),
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            cutter.join()
        });
        let consumed = consumed.map_err(|_| Error::Format("chunking thread panicked".into()))?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.stored_any |= !sealed.is_empty();
        sealed.sort_by_key(|(i, _)| *i);
        for (_, p) in sealed {
            self.add(0, p)?;
        }
        self.put_pending()?;
        Ok(consumed)
    }

    fn put_pending(&mut self) -> Result<(), Error> {
        if !self.pending.is_empty() {
            if self.durable {
                self.store.put_batch(&self.pending, self.class)?;
            } else {
                self.store.put_batch_unsynced(&self.pending, self.class)?;
            }
            self.pending.clear();
            self.stored_any = true;
        }
        Ok(())
    }

    fn add(&mut self, level: usize, pointer: Pointer) -> Result<(), Error> {
        while self.levels.len() <= level + 1 {
            self.levels.push(Vec::new());
        }
        self.levels[level].push(pointer);
        if self.levels[level].len() >= self.params.fanout {
            let entries = std::mem::take(&mut self.levels[level]);
            self.push_parent(level, &entries)?;
        }
        Ok(())
    }

    /// Seals `entries` (pointers of depth `level`) into a pointer block one level up.
    fn push_parent(&mut self, level: usize, entries: &[Pointer]) -> Result<(), Error> {
        let encoded = postcard::to_allocvec(entries).map_err(|e| Error::Format(e.to_string()))?;
        let s = block::seal(&self.keys.content, BlockKind::Pointers, &encoded)?;
        let mut pointer = s.pointer;
        pointer.len = entries
            .iter()
            .try_fold(0u64, |sum, p| sum.checked_add(p.len))
            .ok_or_else(|| Error::Format("file length overflows".into()))?;
        pointer.depth = level as u8 + 1;
        self.pending.push((pointer.score, s.data));
        self.add(level + 1, pointer)
    }
}

/// Writes `data` as one file and returns its reference.
pub fn write_all(
    store: &dyn BlockStore,
    keys: &Keys,
    params: TreeParams,
    class: Class,
    data: &[u8],
) -> Result<FileRef, Error> {
    let mut w = TreeWriter::new(store, keys, params, class);
    w.write(data)?;
    w.finish()
}

/// A decoded block, as the reader caches it.
enum Node {
    Data(Bytes),
    /// Children with the file offset (relative to the node) at which each starts.
    Pointers(Vec<(u64, Pointer)>),
}

impl Node {
    fn weight(&self) -> u64 {
        match self {
            Node::Data(d) => d.len() as u64,
            Node::Pointers(p) => (p.len() * std::mem::size_of::<(u64, Pointer)>()) as u64,
        }
    }
}

#[derive(Clone)]
struct NodeWeight;

impl quick_cache::Weighter<Score, Arc<Node>> for NodeWeight {
    fn weight(&self, _: &Score, node: &Arc<Node>) -> u64 {
        node.weight().max(1)
    }
}

/// How much of a data block a read decodes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Whole {
    /// All of it, cached for the reads that follow.
    Block,
    /// Only the segments read; nothing is cached.
    Segments,
}

/// Reads byte ranges of file trees, caching decoded blocks.
pub struct TreeReader<S> {
    store: S,
    cache: Arc<quick_cache::sync::Cache<Score, Arc<Node>, NodeWeight>>,
}

/// A clone shares the cache.
impl<S: Clone> Clone for TreeReader<S> {
    fn clone(&self) -> Self {
        TreeReader {
            store: self.store.clone(),
            cache: self.cache.clone(),
        }
    }
}

impl<S: BlockStore> TreeReader<S> {
    /// A reader over `store` that keeps up to `cache_bytes` of decoded blocks.
    pub fn new(store: S, cache_bytes: u64) -> Self {
        let items = (cache_bytes / (256 << 10)).max(16) as usize;
        TreeReader {
            store,
            cache: Arc::new(quick_cache::sync::Cache::with_weighter(
                items,
                cache_bytes,
                NodeWeight,
            )),
        }
    }

    /// Reads into `buf` from `offset`; returns the bytes read (short only at the end of file).
    pub fn read_at(&self, file: &FileRef, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        self.read(file, offset, buf, Whole::Block)
    }

    /// Like [`TreeReader::read_at`], but opens only the segments it needs of
    /// data blocks not already decoded: for random access, where decoding a
    /// whole block for a few bytes wastes the work.
    pub fn read_at_random(
        &self,
        file: &FileRef,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Error> {
        self.read(file, offset, buf, Whole::Segments)
    }

    fn read(
        &self,
        file: &FileRef,
        offset: u64,
        buf: &mut [u8],
        whole: Whole,
    ) -> Result<usize, Error> {
        let len = file.len();
        if offset >= len || buf.is_empty() {
            return Ok(0);
        }
        let n = (len - offset).min(buf.len() as u64) as usize;
        match file.root() {
            None => {
                if let FileRef::Inline(data) = file {
                    let start = offset as usize;
                    buf[..n].copy_from_slice(&data[start..start + n]);
                }
            }
            Some(root) => self.read_node(root, offset, &mut buf[..n], whole)?,
        }
        Ok(n)
    }

    /// Reads up to `len` bytes at `offset` (short only at the end of file).
    /// A range inside one data block is a view of the cached block, not a copy.
    pub fn read_bytes(&self, file: &FileRef, offset: u64, len: usize) -> Result<Bytes, Error> {
        let n = file.len().saturating_sub(offset).min(len as u64) as usize;
        if let Some(root) = file.root()
            && n > 0
            && let Some(b) = self.view(root, offset, n)?
        {
            return Ok(b);
        }
        let mut buf = vec![0u8; n];
        self.read(file, offset, &mut buf, Whole::Block)?;
        Ok(buf.into())
    }

    /// The `n` bytes at `offset` under `p` if one data block holds them all.
    fn view(&self, p: &Pointer, offset: u64, n: usize) -> Result<Option<Bytes>, Error> {
        let (mut p, mut at) = (*p, offset);
        loop {
            if p.is_hole() {
                return Ok(None);
            }
            let node = self.node(&p)?;
            match &*node {
                Node::Data(d) => {
                    let start = at as usize;
                    return Ok(d.get(start..start + n).map(|_| d.slice(start..start + n)));
                }
                Node::Pointers(children) => {
                    let i = child_index(children, at);
                    let Some((start, c)) = children.get(i) else {
                        return Ok(None);
                    };
                    if at - start + n as u64 > c.len {
                        return Ok(None);
                    }
                    at -= start;
                    p = *c;
                }
            }
        }
    }

    /// Reads a whole file into memory (for small files and tests).
    pub fn read_all(&self, file: &FileRef) -> Result<Vec<u8>, Error> {
        let len = usize::try_from(file.len())
            .map_err(|_| Error::Format("file too large for memory".into()))?;
        let mut out = vec![0u8; len];
        self.read_at(file, 0, &mut out)?;
        Ok(out)
    }

    /// Calls `f` with every block of the tree (pointer blocks and data
    /// blocks); holes have no block and are skipped.
    pub fn visit_scores(&self, file: &FileRef, f: &mut dyn FnMut(&Pointer)) -> Result<(), Error> {
        if let Some(root) = file.root() {
            self.visit(root, f)?;
        }
        Ok(())
    }

    /// Whether the bytes at `offset` are data or a hole, and where that
    /// stretch ends: the end of the data block or hole holding `offset`
    /// (of the file, for one without holes). `None` at or past the end.
    pub fn run_at(&self, file: &FileRef, offset: u64) -> Result<Option<Run>, Error> {
        let len = file.len();
        if offset >= len {
            return Ok(None);
        }
        let Some(root) = file.root().filter(|_| file.holes() > 0) else {
            return Ok(Some(Run {
                hole: false,
                end: len,
            }));
        };
        let (mut p, mut start) = (*root, 0u64);
        loop {
            if p.is_hole() || p.depth == 0 {
                return Ok(Some(Run {
                    hole: p.is_hole(),
                    end: start + p.len,
                }));
            }
            let node = self.node(&p)?;
            let Node::Pointers(children) = &*node else {
                return Err(Error::Format(format!(
                    "pointer block {} holds data",
                    p.score
                )));
            };
            let at = offset - start;
            let i = child_index(children, at);
            let Some((s, c)) = children.get(i) else {
                return Err(Error::Corrupt {
                    score: p.score,
                    reason: "tree shorter than its length".into(),
                });
            };
            start += s;
            p = *c;
        }
    }

    /// Bytes of holes in `[lo, hi)` of `file`, opening only the pointer
    /// blocks over that range.
    pub fn holes_in(&self, file: &FileRef, lo: u64, hi: u64) -> Result<u64, Error> {
        match file.root() {
            Some(root) if file.holes() > 0 => self.holes_under(root, 0, lo, hi),
            _ => Ok(0),
        }
    }

    fn holes_under(&self, p: &Pointer, start: u64, lo: u64, hi: u64) -> Result<u64, Error> {
        let end = start + p.len;
        if end <= lo || start >= hi || (p.depth == 0 && !p.is_hole()) {
            return Ok(0);
        }
        if p.is_hole() {
            return Ok(end.min(hi) - start.max(lo));
        }
        let node = self.node(p)?;
        let Node::Pointers(children) = &*node else {
            return Err(Error::Format(format!(
                "pointer block {} holds data",
                p.score
            )));
        };
        let mut sum = 0;
        for (s, c) in children {
            sum += self.holes_under(c, start + s, lo, hi)?;
        }
        Ok(sum)
    }

    /// Adds the score of every block of `file` to `seen`, without opening a
    /// pointer block already there: its subtree was added with it. Walking
    /// many trees that share most blocks (snapshots) so costs what they do
    /// not share.
    pub fn add_new_scores(&self, file: &FileRef, seen: &mut HashSet<Score>) -> Result<(), Error> {
        if let Some(root) = file.root() {
            self.add_new(root, seen)?;
        }
        Ok(())
    }

    fn add_new(&self, p: &Pointer, seen: &mut HashSet<Score>) -> Result<(), Error> {
        if p.is_hole() {
            return Ok(());
        }
        if seen.insert(p.score) && p.depth > 0 {
            let node = self.node(p)?;
            if let Node::Pointers(children) = &*node {
                for (_, c) in children {
                    self.add_new(c, seen)?;
                }
            }
        }
        Ok(())
    }

    fn visit(&self, p: &Pointer, f: &mut dyn FnMut(&Pointer)) -> Result<(), Error> {
        if p.is_hole() {
            return Ok(());
        }
        f(p);
        if p.depth > 0 {
            let node = self.node(p)?;
            if let Node::Pointers(children) = &*node {
                for (_, c) in children {
                    self.visit(c, f)?;
                }
            }
        }
        Ok(())
    }

    /// Fills `out` with the bytes at `offset` (relative to the node) under `p`.
    fn read_node(
        &self,
        p: &Pointer,
        offset: u64,
        out: &mut [u8],
        whole: Whole,
    ) -> Result<(), Error> {
        if p.is_hole() {
            out.fill(0);
            return Ok(());
        }
        // A block of one segment (version 3) is opened whole either way: it
        // is kept for the reads that follow.
        if p.depth == 0
            && whole == Whole::Segments
            && p.size as usize > block::ONE_SEGMENT_MAX
            && self.cache.get(&p.score).is_none()
        {
            let range = offset as usize..offset as usize + out.len();
            // Opening authenticates the bytes; only a failure pays for the
            // checked read, which then names a damaged block as such.
            let plain = block::open_range(p, BlockKind::Data, range.clone(), &mut |r| {
                self.store.get_range_to_open(&p.score, r)
            })
            .or_else(|_| {
                block::open_range(p, BlockKind::Data, range, &mut |r| {
                    self.store.get_range(&p.score, r)
                })
            })?;
            out.copy_from_slice(&plain);
            return Ok(());
        }
        let node = self.node(p)?;
        match &*node {
            Node::Data(data) => {
                let start = offset as usize;
                out.copy_from_slice(&data[start..start + out.len()]);
            }
            Node::Pointers(children) => {
                // First child whose range contains `offset`.
                let mut i = child_index(children, offset);
                let mut done = 0usize;
                while done < out.len() {
                    let Some((start, child)) = children.get(i) else {
                        return Err(Error::Corrupt {
                            score: p.score,
                            reason: "tree shorter than its length".into(),
                        });
                    };
                    let at = offset + done as u64 - start;
                    let n = ((child.len - at) as usize).min(out.len() - done);
                    self.read_node(child, at, &mut out[done..done + n], whole)?;
                    done += n;
                    i += 1;
                }
            }
        }
        Ok(())
    }

    fn node(&self, p: &Pointer) -> Result<Arc<Node>, Error> {
        // Concurrent readers of one block wait for a single load.
        self.cache
            .get_or_insert_with(&p.score, || load(&self.store, p).map(Arc::new))
    }
}

impl<S: BlockStore + Clone + Send + Sync + 'static> TreeReader<S> {
    /// Starts decoding, on the rayon pool, up to `count` data blocks that
    /// follow the one holding `offset`, so a sequential reader finds them ready.
    pub fn prefetch(&self, file: &FileRef, offset: u64, count: usize) {
        let Some(root) = file.root() else { return };
        let (mut p, mut at) = (*root, offset);
        while p.depth > 0 {
            let Ok(node) = self.node(&p) else { return };
            let Node::Pointers(children) = &*node else {
                return;
            };
            let i = child_index(children, at);
            if p.depth == 1 {
                for (_, c) in children
                    .iter()
                    .skip(i + 1)
                    .filter(|(_, c)| !c.is_hole())
                    .take(count)
                {
                    if self.cache.get(&c.score).is_none() {
                        let (store, cache, c) = (self.store.clone(), self.cache.clone(), *c);
                        rayon::spawn(move || {
                            // Never wait here for a load already under way: a
                            // waiting task would hold a pool thread idle.
                            if let quick_cache::sync::GuardResult::Guard(g) =
                                cache.get_value_or_guard(&c.score, Some(Duration::ZERO))
                            {
                                // A failure here shows again when the block is read.
                                if let Ok(node) = load(&store, &c) {
                                    let _ = g.insert(Arc::new(node));
                                }
                            }
                        });
                    }
                }
                return;
            }
            let Some((start, c)) = children.get(i) else {
                return;
            };
            at -= start;
            p = *c;
        }
    }
}

/// The index of the child of a pointer block whose range holds offset
/// `at` (relative to the block); the last child for an offset past them all.
fn child_index(children: &[(u64, Pointer)], at: u64) -> usize {
    children
        .partition_point(|(start, _)| *start <= at)
        .saturating_sub(1)
}

/// Fetches, verifies and decodes one block of a tree.
fn load<S: BlockStore>(store: &S, p: &Pointer) -> Result<Node, Error> {
    if p.is_hole() {
        return Err(Error::Format("a hole has no block to load".into()));
    }
    // Opening authenticates the bytes; only a failure pays for the score check,
    // which then names a damaged block as such.
    store
        .get_to_open(&p.score)
        .and_then(|data| decode(p, &data))
        .or_else(|_| decode(p, &store.get(&p.score)?))
}

/// Opens and parses one block of a tree.
fn decode(p: &Pointer, data: &[u8]) -> Result<Node, Error> {
    let node = if p.depth == 0 {
        let plain = block::open(p, BlockKind::Data, data)?;
        if plain.len() as u64 != p.len {
            return Err(Error::Format(format!(
                "data block {} has the wrong length",
                p.score
            )));
        }
        Node::Data(crate::buf::share(plain))
    } else {
        let plain = block::open(p, BlockKind::Pointers, data)?;
        let entries: Result<Vec<Pointer>, _> = postcard::from_bytes(&plain);
        crate::buf::give(plain);
        let entries =
            entries.map_err(|e| Error::Format(format!("pointer block {}: {e}", p.score)))?;
        let mut start = 0u64;
        let mut children = Vec::with_capacity(entries.len());
        for c in entries {
            // A child must sit exactly one level lower: this also bounds recursion.
            // A hole stands where a data block would, and is exactly a hole.
            let bad_hole = c.is_hole() && c != Pointer::hole(c.len);
            if c.depth + 1 != p.depth || c.len == 0 || bad_hole {
                return Err(Error::Format(format!(
                    "pointer block {} is malformed",
                    p.score
                )));
            }
            children.push((start, c));
            start = start
                .checked_add(c.len)
                .ok_or_else(|| Error::Format("tree length overflows".into()))?;
        }
        if start != p.len {
            return Err(Error::Format(format!(
                "pointer block {} does not add up to its length",
                p.score
            )));
        }
        Node::Pointers(children)
    };
    Ok(node)
}
