//! Transfer buffers kept for reuse, so that a warm session allocates
//! nothing per URB.

/// Spare buffers kept per connection.
const POOL_SIZE: usize = 64;
/// A buffer may be this much (or its URB's length, if more) larger than
/// the URB it is lent to. Without a cap, small URBs would take large
/// buffers, large URBs would then allocate new ones, and the pool would
/// fill with large buffers while few bytes are ever in flight.
const MAX_SPARE_ROOM: usize = 64 * 1024;

pub(super) struct BufferPool {
    spare: Vec<Vec<u8>>,
    /// Bytes the spare buffers hold.
    held: usize,
    /// Bytes the pool may hold: the bytes one connection may have in flight.
    budget: usize,
    /// Larger buffers are not kept: no URB of this session needs them.
    max_len: usize,
}

/// Whether a buffer of `capacity` bytes may carry an URB of `len` bytes.
fn fits(capacity: usize, len: usize) -> bool {
    capacity >= len && capacity - len <= len.max(MAX_SPARE_ROOM)
}

impl BufferPool {
    pub fn new(max_len: usize, budget: usize) -> Self {
        BufferPool {
            spare: Vec::new(),
            held: 0,
            budget,
            max_len,
        }
    }

    /// A buffer of at least `len` initialised bytes: the most recently
    /// returned one that fits, as it is the one most likely still in the
    /// CPU's cache, where taking the oldest would cycle through every
    /// buffer the pool holds.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        match self.spare.iter().rposition(|b| fits(b.capacity(), len)) {
            Some(i) => {
                let mut b = self.spare.swap_remove(i);
                self.held -= b.capacity();
                if b.len() < len {
                    b.resize(len, 0);
                }
                b
            }
            None => vec![0; len],
        }
    }

    /// Keeps `b` for reuse. Frames without a payload carry an empty Vec:
    /// those are not kept, or they would fill the pool in place of real
    /// buffers.
    pub fn give(&mut self, b: Vec<u8>) {
        let capacity = b.capacity();
        if self.spare.len() < POOL_SIZE
            && capacity > 0
            && capacity <= self.max_len
            && self.held + capacity <= self.budget
        {
            self.held += capacity;
            self.spare.push(b);
        }
    }

    /// Bytes the pool holds, for memory accounting.
    pub fn held_bytes(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_urbs_do_not_take_large_buffers() {
        let mut pool = BufferPool::new(8 << 20, 64 << 20);
        pool.give(vec![0; 8 << 20]);
        let small = pool.take(100);
        assert_eq!(
            small.capacity(),
            100,
            "a new small buffer, not the 8 MiB one"
        );
        let large = pool.take(4 << 20);
        assert_eq!(large.capacity(), 8 << 20, "the 8 MiB buffer serves 4 MiB");
    }

    #[test]
    fn pool_holds_no_more_than_its_budget() {
        let mut pool = BufferPool::new(1 << 20, 3 << 20);
        for _ in 0..10 {
            pool.give(vec![0; 1 << 20]);
        }
        assert_eq!(pool.held_bytes(), 3 << 20);
        assert_eq!(pool.spare.len(), 3);
        let b = pool.take(1 << 20);
        assert_eq!(pool.held_bytes(), 2 << 20);
        pool.give(b);
        assert_eq!(pool.held_bytes(), 3 << 20);
    }
}
