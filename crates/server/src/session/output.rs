//! The ordered output queue: every reply of an import, in the order it
//! was produced, written many per system call.

use std::collections::VecDeque;
use std::io::IoSlice;

use usbwire_proto::urb::URB_HEADER_LEN;
use usbwire_proto::{IsoPacket, RetSubmit, RetUnlink};

use super::pool::BufferPool;

/// A reply waiting to be written.
struct OutFrame {
    header: [u8; URB_HEADER_LEN],
    /// The URB's buffer; `payload_len` bytes at its front are sent.
    payload: Vec<u8>,
    payload_len: usize,
    iso: Vec<u8>,
}

impl OutFrame {
    fn len(&self) -> usize {
        URB_HEADER_LEN + self.payload_len + self.iso.len()
    }

    /// Heap and queue memory the frame holds until it is sent.
    fn footprint(&self) -> usize {
        std::mem::size_of::<OutFrame>() + self.payload.capacity() + self.iso.capacity()
    }

    fn parts(&self) -> [&[u8]; 3] {
        [&self.header, &self.payload[..self.payload_len], &self.iso]
    }
}

#[derive(Default)]
pub(super) struct Output {
    frames: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    written: usize,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Memory the queued frames hold: a short reply can keep a large URB
    /// buffer, so what bounds the queue is this, not the bytes to send.
    footprint: usize,
}

impl Output {
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn footprint(&self) -> usize {
        self.footprint
    }

    /// Queues a RET_SUBMIT. `payload` is the URB's buffer, of which the
    /// first `payload_len` bytes are sent; `iso` its descriptors.
    pub fn push_ret_submit(
        &mut self,
        ret: RetSubmit,
        payload: Vec<u8>,
        payload_len: usize,
        iso: &[IsoPacket],
    ) {
        let mut header = [0u8; URB_HEADER_LEN];
        ret.write_header(&mut header);
        let mut encoded_iso = Vec::new();
        for p in iso {
            p.encode(&mut encoded_iso);
        }
        self.push(OutFrame {
            header,
            payload,
            payload_len,
            iso: encoded_iso,
        });
    }

    pub fn push_ret_unlink(&mut self, seqnum: u32, status: i32) {
        let mut header = [0u8; URB_HEADER_LEN];
        RetUnlink {
            seqnum,
            status,
            ..Default::default()
        }
        .write_header(&mut header);
        self.push(OutFrame {
            header,
            payload: Vec::new(),
            payload_len: 0,
            iso: Vec::new(),
        });
    }

    fn push(&mut self, frame: OutFrame) {
        self.bytes += frame.len();
        self.footprint += frame.footprint();
        self.frames.push_back(frame);
    }

    /// Fills `slices` with the bytes to send next, in order, and returns
    /// how many it filled: header-only replies take one slice each.
    pub fn fill<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut used = 0;
        let mut skip = self.written;
        for frame in &self.frames {
            for part in frame.parts() {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                if used == slices.len() {
                    return used;
                }
                slices[used] = IoSlice::new(&part[skip..]);
                used += 1;
                skip = 0;
            }
        }
        used
    }

    /// `n` more bytes were sent: frames sent whole give their buffers back.
    pub fn advance(&mut self, n: usize, pool: &mut BufferPool) {
        assert!(n <= self.bytes, "transmitted more than was handed out");
        self.written += n;
        self.bytes -= n;
        while let Some(frame) = self.frames.front() {
            if self.written < frame.len() {
                break;
            }
            self.written -= frame.len();
            self.footprint -= frame.footprint();
            let frame = self.frames.pop_front().expect("front exists");
            pool.give(frame.payload);
        }
    }
}
