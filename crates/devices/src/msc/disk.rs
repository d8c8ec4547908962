//! The disk's own I/O thread, so that a slow image never blocks whatever
//! polls the device.
//!
//! Reads, writes and `fdatasync` run on one thread per disk, one at a time,
//! which is the order a disk wants them in anyway. The device hands it an
//! operation with its one data buffer and returns `Pending`; the thread
//! wakes the waker the device left, and the next poll collects the result.
//! Nothing here needs a runtime: a plain thread, a mutex and two condition
//! variables, and the wakers of whoever polls.
//!
//! A read first tries the page cache from the polling thread, straight
//! into the host's buffer (`read_now`, with `RWF_NOWAIT`, which never waits
//! for the storage): data that is cached (a warm image, blocks the host
//! reads again) costs no hop and no copy. The hop, an extra copy of the
//! data and two thread wake-ups, cost 40 % to twice the server CPU of a
//! 128 KiB READ in `usbwire-bench` on a 2-CPU VM.
//!
//! The buffer goes to the thread with each read or write and comes back
//! with its result, so no operation allocates once the buffer has grown to
//! the largest transfer. Reads on the thread fill a window of the image
//! ahead of the host: once the host has taken it all, the next chunk is
//! read while the reply goes out.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::{DiskImage, BLOCK_SIZE};

/// How far a read on the I/O thread runs ahead of what the host has asked
/// for. A transfer larger than this is read in full when it comes.
const READ_AHEAD: usize = 1 << 20;

/// Transient `EINTR`s tolerated per operation before it fails.
const MAX_INTERRUPTED: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Reads `len` bytes at image offset `offset` into the buffer at `at`.
    Read {
        offset: u64,
        at: usize,
        len: usize,
    },
    /// Writes the buffer's first `len` bytes at image offset `offset`.
    Write {
        offset: u64,
        len: usize,
    },
    Sync,
}

/// Who waits for an operation: the device's IN or OUT side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    In = 0,
    Out = 1,
}

struct Done {
    op: Op,
    buf: Vec<u8>,
    /// Bytes moved before `error`, or all of them.
    moved: usize,
    error: Option<io::Error>,
}

#[derive(Default)]
struct Slot {
    job: Option<(Op, Vec<u8>)>,
    done: Option<Done>,
    wakers: [Option<Waker>; 2],
    /// The device is gone: the thread ends once its queue is empty.
    closed: bool,
}

/// Where the device leaves a job for the I/O thread and the thread leaves
/// its result: one of each at a time.
#[derive(Default)]
struct Mailbox {
    slot: Mutex<Slot>,
    /// A job was queued, or the device closed.
    job_ready: Condvar,
    /// A job finished.
    job_done: Condvar,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Nothing panics while holding the lock, and every update is a
        // single assignment: a poisoned lock is still consistent.
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An operation the device learns the end of.
#[derive(Debug)]
pub(super) enum Finished {
    /// A read; its data (or its failure) is in the window.
    Read,
    /// A write, and where it failed if it did.
    Write(Result<(), (u64, io::Error)>),
    Sync(io::Result<()>),
    /// Issued for a command that was abandoned since: its result is moot.
    Stale,
}

struct InFlight {
    op: Op,
    stale: bool,
}

/// The device's side of its I/O thread, and the read window.
pub(super) struct Disk {
    mailbox: Arc<Mailbox>,
    /// The image, for reads from the page cache on the polling thread.
    image: Arc<dyn DiskImage>,
    /// Whether the image can read without waiting (`read_at_nowait`).
    nowait: bool,
    /// The data buffer, while it is not with the thread.
    buf: Option<Vec<u8>>,
    in_flight: Option<InFlight>,
    /// `buf[start..end]` holds the image from offset `pos` on.
    start: usize,
    end: usize,
    pos: u64,
    /// The end of what the current READ may read.
    read_end: u64,
    /// Where a read of the window failed; the window ends at the whole
    /// block before it.
    read_error: Option<u64>,
}

impl Disk {
    /// Starts the I/O thread for `image`. The thread ends after the
    /// `Disk` is dropped and its last operation has finished.
    pub fn start(image: Box<dyn DiskImage>) -> io::Result<Disk> {
        let image: Arc<dyn DiskImage> = image.into();
        let mailbox = Arc::new(Mailbox::default());
        let (thread_mailbox, thread_image) = (mailbox.clone(), image.clone());
        std::thread::Builder::new()
            .name("usbwire-disk".into())
            .spawn(move || io_thread(&*thread_image, &thread_mailbox))?;
        Ok(Disk {
            mailbox,
            image,
            nowait: true,
            buf: Some(Vec::new()),
            in_flight: None,
            start: 0,
            end: 0,
            pos: 0,
            read_end: 0,
            read_error: None,
        })
    }

    fn submit(&mut self, op: Op, buf: Vec<u8>) {
        debug_assert!(self.in_flight.is_none(), "one operation at a time");
        self.in_flight = Some(InFlight { op, stale: false });
        self.mailbox.lock().job = Some((op, buf));
        self.mailbox.job_ready.notify_one();
    }

    /// Queues a write of `data` at `offset`. The disk must be idle.
    pub fn submit_write(&mut self, offset: u64, data: &[u8]) {
        let mut buf = self.buf.take().unwrap_or_default();
        if buf.len() < data.len() {
            buf.resize(data.len(), 0);
        }
        buf[..data.len()].copy_from_slice(data);
        self.submit(
            Op::Write {
                offset,
                len: data.len(),
            },
            buf,
        );
    }

    /// Queues an `fdatasync`. The disk must be idle.
    pub fn submit_sync(&mut self) {
        self.submit(Op::Sync, Vec::new());
    }

    /// Whatever the operation under way became, leaving the disk idle;
    /// `Ready(None)` if it already was. Registers `cx` for `side` while
    /// the operation runs.
    pub fn poll_finished(&mut self, side: Side, cx: &Context<'_>) -> Poll<Option<Finished>> {
        if self.in_flight.is_none() {
            return Poll::Ready(None);
        }
        let done = {
            let mut slot = self.mailbox.lock();
            match slot.done.take() {
                Some(d) => d,
                None => {
                    // Under the lock the thread stores results in: a
                    // result cannot land between the check and this.
                    match &mut slot.wakers[side as usize] {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        w => *w = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            }
        };
        Poll::Ready(Some(self.finish(done)))
    }

    /// Blocks until the operation under way has finished; `None` if the
    /// disk was idle. For [`super::MassStorage::flush`], which may block.
    pub fn wait_finished(&mut self) -> Option<Finished> {
        self.in_flight.as_ref()?;
        let done = {
            let mut slot = self.mailbox.lock();
            loop {
                if let Some(d) = slot.done.take() {
                    break d;
                }
                slot = self
                    .mailbox
                    .job_done
                    .wait(slot)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        Some(self.finish(done))
    }

    fn finish(&mut self, done: Done) -> Finished {
        let in_flight = self.in_flight.take().expect("a result comes for a job");
        debug_assert_eq!(in_flight.op, done.op);
        if done.op != Op::Sync {
            self.buf = Some(done.buf);
        }
        if in_flight.stale {
            return Finished::Stale;
        }
        match done.op {
            Op::Read { offset, at, .. } => {
                let good = match done.error {
                    None => done.moved,
                    Some(e) => {
                        let failed = offset + done.moved as u64;
                        tracing::warn!(
                            error = %e,
                            lba = failed / BLOCK_SIZE,
                            "read of the disk image failed"
                        );
                        self.read_error = Some(failed);
                        // Reads start on a block, so this is within the read.
                        (failed / BLOCK_SIZE * BLOCK_SIZE - offset) as usize
                    }
                };
                self.end = at + good;
                Finished::Read
            }
            Op::Write { offset, .. } => Finished::Write(match done.error {
                None => Ok(()),
                Some(e) => Err((offset + done.moved as u64, e)),
            }),
            Op::Sync => Finished::Sync(match done.error {
                None => Ok(()),
                Some(e) => Err(e),
            }),
        }
    }

    /// A READ's data phase starts: `len` bytes from `offset`, a block
    /// boundary.
    pub fn begin_read(&mut self, offset: u64, len: u64) {
        self.start = 0;
        self.end = 0;
        self.pos = offset;
        self.read_end = offset + len.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        self.read_error = None;
    }

    /// Fills `buf` with the READ's next bytes if the page cache has all of
    /// them, on this thread and without waiting; `false` leaves the read to
    /// the I/O thread. Only while the disk is idle: a read never overtakes
    /// a write.
    pub fn read_now(&mut self, buf: &mut [u8]) -> bool {
        if !self.nowait
            || self.in_flight.is_some()
            || self.start != self.end
            || self.read_error.is_some()
            || self.pos + buf.len() as u64 > self.read_end
        {
            return false;
        }
        match self.image.read_at_nowait(buf, self.pos) {
            Ok(n) if n == buf.len() => {
                self.pos += n as u64;
                true
            }
            // Part cached, or none, or a failure that the I/O thread's
            // read will report with its block.
            Ok(_) => false,
            Err(e) => {
                if matches!(
                    e.kind(),
                    io::ErrorKind::Unsupported | io::ErrorKind::InvalidInput
                ) {
                    // A file system without RWF_NOWAIT, or a kernel older
                    // than 4.14: do not ask again.
                    self.nowait = false;
                }
                false
            }
        }
    }

    /// The READ's data, from where the host is, that is here now.
    pub fn window(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start..self.end],
            None => &[],
        }
    }

    /// Where the window's read failed, if it did: nothing from that block
    /// on will come.
    pub fn read_error(&self) -> Option<u64> {
        self.read_error
    }

    /// Whether the window reached the end of what the READ may read.
    pub fn read_exhausted(&self) -> bool {
        self.pos + (self.end - self.start) as u64 >= self.read_end
    }

    /// The host took `n` bytes of the window. An empty window is refilled
    /// at once while the READ has more.
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.start);
        self.start += n;
        self.pos += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.in_flight.is_none() && self.read_error.is_none() {
                self.read_more(0);
            }
        }
    }

    /// Reads at least `want` more bytes (whole blocks, at least a
    /// read-ahead's worth) after the window, within the READ. The disk
    /// must be idle.
    pub fn read_more(&mut self, want: usize) {
        let from = self.pos + (self.end - self.start) as u64;
        let left = self.read_end.saturating_sub(from);
        let want = (want as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let len = want.max(READ_AHEAD as u64).min(left) as usize;
        if len == 0 || self.read_error.is_some() {
            return;
        }
        let mut buf = self.buf.take().unwrap_or_default();
        if self.start > 0 {
            buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if buf.len() < self.end + len {
            buf.resize(self.end + len, 0);
        }
        self.submit(
            Op::Read {
                offset: from,
                at: self.end,
                len,
            },
            buf,
        );
    }

    /// The READ is over (data phase ended): what was read ahead is
    /// dropped, and a read under way is moot.
    pub fn end_read(&mut self) {
        self.start = 0;
        self.end = 0;
        self.read_end = self.pos;
        self.read_error = None;
        if let Some(f) = &mut self.in_flight {
            if matches!(f.op, Op::Read { .. }) {
                f.stale = true;
            }
        }
    }

    /// The command was abandoned (a reset): whatever runs is moot.
    pub fn abandon(&mut self) {
        self.end_read();
        if let Some(f) = &mut self.in_flight {
            f.stale = true;
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // The thread finishes a queued write before it ends; nothing waits
        // for it here, so dropping a device never blocks on its image.
        self.mailbox.lock().closed = true;
        self.mailbox.job_ready.notify_one();
    }
}

fn io_thread(image: &dyn DiskImage, mailbox: &Mailbox) {
    loop {
        let (op, mut buf) = {
            let mut slot = mailbox.lock();
            loop {
                if let Some(job) = slot.job.take() {
                    break job;
                }
                if slot.closed {
                    return;
                }
                slot = mailbox
                    .job_ready
                    .wait(slot)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let (moved, error) = match op {
            Op::Read { offset, at, len } => read_fully(image, &mut buf[at..at + len], offset),
            Op::Write { offset, len } => write_fully(image, &buf[..len], offset),
            Op::Sync => (0, image.sync_data().err()),
        };
        let wakers = {
            let mut slot = mailbox.lock();
            slot.done = Some(Done {
                op,
                buf,
                moved,
                error,
            });
            std::mem::take(&mut slot.wakers)
        };
        mailbox.job_done.notify_all();
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }
}

fn read_fully(image: &dyn DiskImage, buf: &mut [u8], offset: u64) -> (usize, Option<io::Error>) {
    let mut done = 0;
    let mut interrupted = 0;
    while done < buf.len() {
        match image.read_at(&mut buf[done..], offset + done as u64) {
            // The image shrank under us: those blocks are gone.
            Ok(0) => return (done, Some(io::ErrorKind::UnexpectedEof.into())),
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < MAX_INTERRUPTED => {
                interrupted += 1;
            }
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

fn write_fully(image: &dyn DiskImage, data: &[u8], offset: u64) -> (usize, Option<io::Error>) {
    let mut done = 0;
    let mut interrupted = 0;
    while done < data.len() {
        match image.write_at(&data[done..], offset + done as u64) {
            Ok(0) => return (done, Some(io::ErrorKind::WriteZero.into())),
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < MAX_INTERRUPTED => {
                interrupted += 1;
            }
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}
