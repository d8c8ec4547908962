//! The bounded byte FIFOs the function and its bridge meet in.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A bounded byte FIFO between one producer and one consumer that may live
/// on different tasks or threads, each side parking its waker when it cannot
/// make progress. A `std` mutex is enough: it is never held across an await
/// and critical sections are a memcpy.
#[derive(Clone)]
pub(crate) struct ByteQueue {
    inner: Arc<Mutex<QueueState>>,
}

struct QueueState {
    buf: VecDeque<u8>,
    cap: usize,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// Writes are accepted and dropped: nobody is there to read (a TCP
    /// backend with no client), and a serial line without a listener loses
    /// bytes rather than stalling the host's writer forever.
    discard: bool,
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl ByteQueue {
    pub(crate) fn new(cap: usize) -> Self {
        ByteQueue {
            inner: Arc::new(Mutex::new(QueueState {
                buf: VecDeque::new(),
                cap: cap.max(1),
                reader: None,
                writer: None,
                discard: false,
            })),
        }
    }

    /// A poisoned lock only means another thread panicked mid-memcpy; the
    /// queue is still structurally valid, so keep going rather than
    /// propagating the panic into the server.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().buf.len()
    }

    /// Takes up to `out.len()` bytes; pending while empty (an empty `out`
    /// completes at once, since the caller asked for nothing).
    pub(crate) fn poll_read(&self, out: &mut [u8], cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        if out.is_empty() {
            return Poll::Ready(0);
        }
        if s.buf.is_empty() {
            park(&mut s.reader, cx);
            return Poll::Pending;
        }
        let n = out.len().min(s.buf.len());
        let (a, b) = s.buf.as_slices();
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.buf.drain(..n);
        let w = s.writer.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Poll::Ready(n)
    }

    /// Takes the whole of `data` or nothing, so that an OUT transfer is
    /// either accepted or NAKed, never half-done. An empty queue accepts any
    /// size, otherwise a transfer larger than the capacity would wait forever;
    /// the bytes are already in memory, so this does not raise the bound by
    /// more than one transfer.
    pub(crate) fn poll_write_all(&self, data: &[u8], cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        if s.discard {
            if !data.is_empty() {
                tracing::debug!(
                    len = data.len(),
                    "serial: no reader connected, bytes dropped"
                );
            }
            return Poll::Ready(data.len());
        }
        if data.is_empty() {
            return Poll::Ready(0);
        }
        if !s.buf.is_empty() && s.buf.len() + data.len() > s.cap {
            park(&mut s.writer, cx);
            return Poll::Pending;
        }
        s.buf.extend(data);
        let w = s.reader.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Poll::Ready(data.len())
    }

    /// Waits for free space and says how much; a producer then reads at
    /// most that much from its source, so [`ByteQueue::push`] never drops.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        let room = s.cap.saturating_sub(s.buf.len());
        if room == 0 {
            park(&mut s.writer, cx);
            return Poll::Pending;
        }
        Poll::Ready(room)
    }

    /// Appends as much of `data` as fits and returns how much that was.
    pub(crate) fn push(&self, data: &[u8]) -> usize {
        let mut s = self.lock();
        let n = data.len().min(s.cap.saturating_sub(s.buf.len()));
        s.buf.extend(&data[..n]);
        let w = if n > 0 { s.reader.take() } else { None };
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        n
    }

    /// Switches discard mode; entering it drops what is buffered (nobody will
    /// ever read it) and releases a waiting writer.
    pub(crate) fn set_discard(&self, discard: bool) {
        let mut s = self.lock();
        s.discard = discard;
        let w = if discard {
            if !s.buf.is_empty() {
                tracing::debug!(
                    len = s.buf.len(),
                    "serial: reader gone, buffered bytes dropped"
                );
            }
            s.buf.clear();
            s.writer.take()
        } else {
            None
        };
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }

    pub(crate) fn clear(&self) {
        let mut s = self.lock();
        s.buf.clear();
        let w = s.writer.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_out_is_accepted_when_empty() {
        let q = ByteQueue::new(8);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(q.poll_write_all(&[1; 20], &mut cx), Poll::Ready(20));
        assert!(q.poll_write_all(&[2], &mut cx).is_pending());
        assert!(q.poll_room(&mut cx).is_pending());
        let mut out = [0u8; 32];
        assert_eq!(q.poll_read(&mut out, &mut cx), Poll::Ready(20));
        assert_eq!(q.push(&[3; 20]), 8, "push stops at the capacity");
        assert_eq!(q.len(), 8);
        q.set_discard(true);
        assert_eq!(q.len(), 0);
        assert_eq!(q.poll_write_all(&[4; 100], &mut cx), Poll::Ready(100));
        assert_eq!(q.len(), 0);
    }
}
