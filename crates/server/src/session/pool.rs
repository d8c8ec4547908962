//! Transfer buffers kept for reuse, so that a warm session allocates
//! nothing per URB.

/// Spare buffers kept per connection.
const POOL_SIZE: usize = 64;

pub(super) struct BufferPool {
    spare: Vec<Vec<u8>>,
    /// Larger buffers are not kept: no URB of this session needs them.
    max_len: usize,
}

impl BufferPool {
    pub fn new(max_len: usize) -> Self {
        BufferPool {
            spare: Vec::new(),
            max_len,
        }
    }

    /// A buffer of at least `len` initialised bytes: the most recently
    /// returned one that fits, as it is the one most likely still in the
    /// CPU's cache, where taking the oldest would cycle through every
    /// buffer the pool holds.
    pub fn take(&mut self, len: usize) -> Vec<u8> {
        match self.spare.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.spare.swap_remove(i);
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
        if self.spare.len() < POOL_SIZE && b.capacity() > 0 && b.capacity() <= self.max_len {
            self.spare.push(b);
        }
    }

    /// Bytes the pool holds, for memory accounting.
    pub fn held_bytes(&self) -> usize {
        self.spare.iter().map(Vec::capacity).sum()
    }
}
