//! The one "decode → NeedMore → read" loop of the client: a receive buffer
//! that a driver reads into, and that hands complete frames to a decoder.
//!
//! Drivers (tokio, blocking std, a test feeding bytes one at a time) only
//! move bytes: they read into [`InputBuffer::spare`] and report how many
//! arrived with [`InputBuffer::filled`]; the protocol cores call
//! [`InputBuffer::next_frame`] until it says the next frame is incomplete.

use std::ops::Range;

use usbwire_proto::{DecodeError, Decoded};

/// When a free tail shorter than this is left, a read that may take as
/// much as the socket has first moves the unconsumed bytes to the front.
const MIN_READ: usize = 16 * 1024;

/// Received bytes not yet decoded, in one reused allocation.
#[derive(Debug)]
pub(crate) struct InputBuffer {
    /// Zero-initialised once and reused: reads land in `bytes[end..]`.
    bytes: Vec<u8>,
    /// First byte not yet decoded.
    start: usize,
    /// One past the last byte received.
    end: usize,
    /// The total length the frame at `start` needs, as the decoder last
    /// said; at least one byte.
    need: usize,
}

impl InputBuffer {
    /// `first_need`: the shortest frame's header, what the first read asks for.
    pub(crate) fn new(capacity: usize, first_need: usize) -> Self {
        InputBuffer {
            bytes: vec![0; capacity.max(first_need)],
            start: 0,
            end: 0,
            need: first_need.max(1),
        }
    }

    /// Where the next read goes, never empty. `exact`: only the bytes the
    /// frame at the front still lacks, so that a read takes nothing that
    /// belongs to whoever owns the stream next (vhci-hcd after an import);
    /// otherwise as much room as there is.
    pub(crate) fn spare(&mut self, exact: bool) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let cramped = !exact && self.bytes.len() - self.end < MIN_READ;
        if self.start > 0 && (self.start + self.need > self.bytes.len() || cramped) {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let frame_end = self.start + self.need;
        // `need` comes from a decoder that bounded every declared length by
        // its Limits before asking for it, and `end` < `frame_end`: the
        // buffer stays within the largest frame plus MIN_READ.
        let wanted = if exact {
            frame_end
        } else {
            frame_end.max(self.end + MIN_READ)
        };
        if wanted > self.bytes.len() {
            self.bytes.resize(wanted, 0);
        }
        debug_assert!(self.end < frame_end, "spare() with a whole frame buffered");
        if exact {
            &mut self.bytes[self.end..frame_end]
        } else {
            &mut self.bytes[self.end..]
        }
    }

    /// `n` bytes were read into the slice [`InputBuffer::spare`] returned.
    pub(crate) fn filled(&mut self, n: usize) {
        assert!(
            self.end + n <= self.bytes.len(),
            "filled more than spare() lent"
        );
        self.end += n;
    }

    /// Decodes the frame at the front. `Some((message, frame))`: it was
    /// whole and is consumed; `frame` is where it lies, for
    /// [`InputBuffer::frame`], valid until the next [`InputBuffer::spare`].
    /// `None`: more bytes are needed first.
    pub(crate) fn next_frame<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<Decoded<T>, DecodeError>,
    ) -> Result<Option<(T, Range<usize>)>, DecodeError> {
        match decode(&self.bytes[self.start..self.end])? {
            Decoded::Message(message, used) => {
                let frame = self.start..self.start + used;
                self.start += used;
                self.need = 1;
                Ok(Some((message, frame)))
            }
            Decoded::NeedMore(need) => {
                self.need = need.max(self.end - self.start + 1);
                Ok(None)
            }
        }
    }

    /// The bytes of a frame [`InputBuffer::next_frame`] returned.
    pub(crate) fn frame(&self, frame: Range<usize>) -> &[u8] {
        &self.bytes[frame]
    }

    /// Drops every byte received: the stream is out of step and done.
    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        self.need = 1;
    }

    /// Bytes received but not yet decoded.
    pub(crate) fn buffered(&self) -> usize {
        self.end - self.start
    }
}
