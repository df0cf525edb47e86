//! A small pool of block-sized buffers.
//!
//! Reading and decoding a block each need a megabyte buffer. Allocating them
//! fresh costs a page fault per 4 KiB once the allocator has returned freed
//! memory to the system (the daemon asks it to, to bound its peak memory), so
//! buffers are handed back here and reused. The pool keeps a few buffers only.

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers kept for reuse; a few blocks in flight at once need no more.
const KEEP: usize = 4;
/// Larger buffers are not kept (a block's plaintext is at most 8 MiB).
const MAX_KEEP: usize = 9 << 20;
/// Smaller buffers are not worth pooling.
const MIN_KEEP: usize = 64 << 10;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for at least `capacity` bytes.
pub fn take(capacity: usize) -> Vec<u8> {
    if capacity >= MIN_KEEP {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool.iter().position(|b| b.capacity() >= capacity) {
            return pool.swap_remove(i);
        }
    }
    Vec::with_capacity(capacity)
}

/// Hands a buffer back for reuse.
pub fn give(mut buf: Vec<u8>) {
    if (MIN_KEEP..=MAX_KEEP).contains(&buf.capacity()) {
        buf.clear();
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < KEEP {
            pool.push(buf);
        } else if let Some(small) = pool.iter_mut().min_by_key(|b| b.capacity())
            && small.capacity() < buf.capacity()
        {
            // Keep the larger buffers: they serve every request.
            *small = buf;
        }
    }
}

/// Shares `buf` as [`Bytes`]; it returns to the pool when the last view drops.
pub fn share(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Pooled(buf))
}

struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_empty_and_big_enough() {
        let mut b = take(1 << 20);
        b.extend_from_slice(&[7u8; 1000]);
        let bytes = share(b);
        assert_eq!(&bytes[..3], &[7, 7, 7]);
        let view = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(view.len(), 10);
        drop(view);
        let again = take(1 << 20);
        assert!(again.is_empty() && again.capacity() >= 1 << 20);
        assert!(take(10).capacity() >= 10);
    }
}
