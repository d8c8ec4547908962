//! Bulk-Only Transport (BOT 1.0): the CBW that starts a command, its data
//! phase, the CSW that ends it, and the phase errors and wedge in between.

use std::io;
use std::task::{ready, Context, Poll, Waker};

use usbwire_proto::Errno;

use super::disk::{Finished, Side};
use super::scsi::{op, shape, Exec};
use super::sense::Sense;
use super::{MassStorage, BLOCK_SIZE};

pub(super) const CBW_LEN: usize = 31;
pub(super) const CSW_LEN: usize = 13;
pub(super) const CBW_SIGNATURE: u32 = 0x4342_5355;
pub(super) const CSW_SIGNATURE: u32 = 0x5342_5355;

/// CSW bCSWStatus values.
pub const CSW_GOOD: u8 = 0;
pub const CSW_FAILED: u8 = 1;
pub const CSW_PHASE_ERROR: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    None,
    In,
    Out,
}

/// Where the data phase takes its bytes from or puts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Io {
    Nothing,
    Reply,
    /// From the disk's read window.
    Read,
    Write {
        offset: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for a CBW on bulk OUT.
    Idle,
    DataIn,
    DataOut,
    /// The CSW waits for the next IN transfer.
    Status,
    /// An invalid CBW arrived: both bulk endpoints stall, even through
    /// CLEAR_FEATURE(HALT), until a Bulk-Only Mass Storage Reset (BOT 6.6.1).
    Wedged,
}

/// A parsed Command Block Wrapper (BOT 5.1).
struct Cbw {
    tag: u32,
    length: u32,
    flags: u8,
    lun: u8,
    cb_len: usize,
    cb: [u8; 16],
}

impl Cbw {
    /// `None` for a CBW that is not valid (wrong size or signature) or
    /// not meaningful (BOT 6.2): both wedge the device.
    fn parse(data: &[u8]) -> Option<Cbw> {
        let d: &[u8; CBW_LEN] = data.try_into().ok()?;
        if u32::from_le_bytes([d[0], d[1], d[2], d[3]]) != CBW_SIGNATURE {
            return None;
        }
        let mut cb = [0u8; 16];
        cb.copy_from_slice(&d[15..31]);
        let cbw = Cbw {
            tag: u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
            length: u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
            flags: d[12],
            lun: d[13] & 0x0f,
            cb_len: usize::from(d[14] & 0x1f),
            cb,
        };
        // Reserved bits set, a LUN we do not have, or a command block
        // length outside 1..=16 (BOT 6.2.2).
        if d[12] & 0x7f != 0 || d[13] & 0xf0 != 0 || d[14] & 0xe0 != 0 {
            return None;
        }
        if cbw.lun != 0 || cbw.cb_len == 0 || cbw.cb_len > 16 {
            return None;
        }
        Some(cbw)
    }
}

impl MassStorage {
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        // Either side may have a transfer parked on the old phase.
        if let Some(w) = self.in_waker.take() {
            w.wake();
        }
        if let Some(w) = self.out_waker.take() {
            w.wake();
        }
    }

    fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
        match slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
    }

    /// Back to waiting for a CBW, whatever was in progress: the
    /// Bulk-Only Mass Storage Reset, a port reset, or a new configuration.
    pub(super) fn reset_protocol(&mut self) {
        self.io = Io::Nothing;
        self.disk.abandon();
        self.host_left = 0;
        self.residue = 0;
        self.dev_left = 0;
        self.sync_after_write = false;
        self.sync_pending = false;
        self.reply.clear();
        self.reply_pos = 0;
        self.sense = Sense::NONE;
        self.set_phase(Phase::Idle);
    }

    pub(super) fn fail(&mut self, sense: Sense) {
        self.sense = sense;
        if self.status == CSW_GOOD {
            self.status = CSW_FAILED;
        }
    }

    fn handle_cbw(&mut self, data: &[u8]) {
        let cbw = match Cbw::parse(data) {
            Some(c) => c,
            None => {
                tracing::debug!(len = data.len(), "invalid or not meaningful CBW; wedging");
                self.io = Io::Nothing;
                self.set_phase(Phase::Wedged);
                return;
            }
        };
        self.tag = cbw.tag;
        self.status = CSW_GOOD;
        self.host_left = u64::from(cbw.length);
        self.residue = self.host_left;
        self.sync_after_write = false;
        self.sync_pending = false;
        self.reply.clear();
        self.reply_pos = 0;
        let host_dir = match (cbw.length, cbw.flags & 0x80 != 0) {
            (0, _) => Dir::None,
            (_, true) => Dir::In,
            (_, false) => Dir::Out,
        };

        let cdb = &cbw.cb;
        let cmd_shape = shape(cdb, cbw.cb_len);
        let dir = if cmd_shape.len == 0 {
            Dir::None
        } else {
            cmd_shape.dir
        };
        let mut len = cmd_shape.len;
        // Host expects less than the device intends (BOT cases 2, 3, 7, 13):
        // do the command, move only what the host allows, report a phase error.
        if self.host_left < len {
            len = self.host_left;
            self.status = CSW_PHASE_ERROR;
        }
        let exec = if (host_dir != dir && len > 0) || cbw.cb_len < cmd_shape.cdb_len {
            // Opposite directions (cases 8, 10), or a command block too
            // short for its opcode: the command is not run at all.
            self.status = CSW_PHASE_ERROR;
            Exec::Nothing
        } else {
            if cdb[0] != op::REQUEST_SENSE {
                self.sense = Sense::NONE;
            }
            if cmd_shape.needs_medium && self.blocks == 0 {
                self.fail(Sense::NOT_PRESENT);
                Exec::Nothing
            } else {
                self.execute(cdb, len)
            }
        };
        self.begin_data_phase(exec, len, host_dir);
    }

    /// Sets up the data phase for what the command wants moved, at most
    /// `len` bytes, in the direction the host announced.
    fn begin_data_phase(&mut self, exec: Exec, len: u64, host_dir: Dir) {
        let (io, dev_left) = match exec {
            Exec::Nothing => (Io::Nothing, 0),
            Exec::Reply => {
                let n = (self.reply.len() as u64).min(len);
                (Io::Reply, n)
            }
            Exec::Read {
                offset,
                len: wanted,
            } => {
                let n = wanted.min(len);
                self.disk.begin_read(offset, n);
                (Io::Read, n)
            }
            Exec::Write {
                offset,
                len: wanted,
                fua,
            } => {
                self.sync_after_write = fua;
                (Io::Write { offset }, wanted.min(len))
            }
        };
        self.io = io;
        self.dev_left = dev_left;
        match host_dir {
            Dir::None => self.finish_data(),
            Dir::In => self.set_phase(Phase::DataIn),
            Dir::Out => self.set_phase(Phase::DataOut),
        }
    }

    /// The data phase is over: the CSW follows once the writes are done
    /// (and, after a FUA write, flushed).
    fn finish_data(&mut self) {
        if std::mem::take(&mut self.sync_after_write) {
            self.sync_pending = true;
        }
        if self.io == Io::Read {
            self.disk.end_read();
        }
        self.io = Io::Nothing;
        self.set_phase(Phase::Status);
    }

    /// Applies what the disk finished to the command it was for.
    pub(super) fn apply(&mut self, f: Finished) {
        match f {
            Finished::Write(Err((at, e))) => self.write_failed(at, e),
            Finished::Sync(Err(e)) => {
                tracing::warn!(error = %e, "fdatasync of the disk image failed");
                self.fail(Sense::write_error(None));
            }
            // A read's data or failure is in the disk's window.
            Finished::Read | Finished::Stale | Finished::Write(Ok(())) | Finished::Sync(Ok(())) => {
            }
        }
    }

    /// Ready once the disk is idle, with what it finished applied.
    fn poll_disk_idle(&mut self, side: Side, cx: &Context<'_>) -> Poll<()> {
        // One operation at a time: at most one result to collect.
        while let Some(f) = ready!(self.disk.poll_finished(side, cx)) {
            self.apply(f);
        }
        Poll::Ready(())
    }

    /// Ready once the READ's window holds `want` bytes, or all it ever
    /// will (a read failed), with the disk idle.
    fn poll_disk_read(&mut self, want: usize, cx: &Context<'_>) -> Poll<()> {
        // Each turn collects a read or starts one; two reads at most fill
        // any window, the third turn finds it full.
        for _ in 0..4 {
            ready!(self.poll_disk_idle(Side::In, cx));
            let have = self.disk.window().len();
            if have >= want || self.disk.read_error().is_some() || self.disk.read_exhausted() {
                return Poll::Ready(());
            }
            self.disk.read_more(want - have);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn csw(&self) -> [u8; CSW_LEN] {
        let mut b = [0u8; CSW_LEN];
        b[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        let residue = u32::try_from(self.residue).unwrap_or(u32::MAX);
        b[8..12].copy_from_slice(&residue.to_le_bytes());
        b[12] = self.status;
        b
    }

    fn write_failed(&mut self, at: u64, e: io::Error) {
        let lba = at / BLOCK_SIZE;
        tracing::warn!(error = %e, lba, "write to the disk image failed");
        self.fail(Sense::write_error(Some(lba)));
        self.dev_left = 0;
        if matches!(self.io, Io::Write { .. }) {
            self.io = Io::Nothing;
        }
        self.sync_after_write = false;
        self.sync_pending = false;
    }

    fn data_in(&mut self, buf: &mut [u8], cx: &Context<'_>) -> Poll<Result<usize, Errno>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = (buf.len() as u64).min(self.host_left).min(self.dev_left) as usize;
        if want == 0 {
            // The device has no more data but the host wants more, and the
            // last transfer did not end short: BOT 6.7.2 says stall.
            self.finish_data();
            return Poll::Ready(Err(Errno::EPIPE));
        }
        let n = match self.io {
            Io::Reply => {
                let end = self.reply_pos + want;
                match self.reply.get(self.reply_pos..end) {
                    Some(src) => {
                        buf[..want].copy_from_slice(src);
                        self.reply_pos = end;
                        want
                    }
                    None => 0,
                }
            }
            // Cached data comes at once, without a copy or a hop.
            Io::Read if self.disk.read_now(&mut buf[..want]) => want,
            Io::Read => {
                ready!(self.poll_disk_read(want, cx));
                let window = self.disk.window();
                let n = window.len().min(want);
                buf[..n].copy_from_slice(&window[..n]);
                self.disk.consume(n);
                if n < want {
                    if let Some(at) = self.disk.read_error() {
                        // Only the whole good blocks before it were delivered.
                        self.fail(Sense::unrecovered_read(at / BLOCK_SIZE));
                        self.dev_left = 0;
                    }
                }
                n
            }
            Io::Nothing | Io::Write { .. } => 0,
        };
        self.host_left -= n as u64;
        self.residue -= n as u64;
        self.dev_left = self.dev_left.saturating_sub(n as u64);
        if n == 0 {
            self.finish_data();
            return Poll::Ready(Err(Errno::EPIPE));
        }
        // A short transfer ends the data phase; so does a full host length.
        if n < buf.len() || self.host_left == 0 {
            self.finish_data();
        }
        Poll::Ready(Ok(n))
    }

    fn data_out(&mut self, data: &[u8], cx: &Context<'_>) -> Poll<Result<usize, Errno>> {
        if matches!(self.io, Io::Write { .. }) {
            // One buffer: the previous write must be done before this data
            // is taken, and if it failed, the rest is discarded.
            ready!(self.poll_disk_idle(Side::Out, cx));
        }
        let take = (data.len() as u64).min(self.host_left) as usize;
        let for_device = (take as u64).min(self.dev_left) as usize;
        if let Io::Write { offset } = self.io {
            if for_device > 0 {
                self.disk.submit_write(offset, &data[..for_device]);
                self.io = Io::Write {
                    offset: offset + for_device as u64,
                };
            }
        }
        // Bytes beyond what the command wants are read and thrown away
        // (BOT case 9), as the kernel gadget does.
        self.dev_left = self.dev_left.saturating_sub(for_device as u64);
        self.residue -= for_device as u64;
        self.host_left -= take as u64;
        // A packet shorter than wMaxPacketSize (or a zero-length one) ends
        // the transfer on the USB wire; max_packet is a power of two.
        let short = data.is_empty() || data.len() & (self.max_packet - 1) != 0;
        if self.host_left == 0 || short {
            if self.dev_left > 0 && self.status == CSW_GOOD {
                // The host ended the data phase before sending what its own
                // CBW promised: the two sides no longer agree.
                self.status = CSW_PHASE_ERROR;
            }
            self.finish_data();
        }
        Poll::Ready(Ok(take))
    }

    /// A bulk IN transfer: data, the CSW, or a wait, by the phase the
    /// command is in.
    pub(super) fn poll_bulk_in(
        &mut self,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match self.phase {
            Phase::Wedged => Poll::Ready(Err(Errno::EPIPE)),
            Phase::Idle | Phase::DataOut => {
                Self::park(&mut self.in_waker, cx);
                Poll::Pending
            }
            Phase::DataIn => self.data_in(buf, cx),
            Phase::Status => {
                if buf.len() < CSW_LEN {
                    // The 13-byte CSW does not fit: babble. The CSW stays
                    // for a retry with a proper buffer.
                    return Poll::Ready(Err(Errno::EOVERFLOW));
                }
                // The status reports the writes and the flush: both done.
                ready!(self.poll_disk_idle(Side::In, cx));
                if std::mem::take(&mut self.sync_pending) {
                    self.disk.submit_sync();
                    ready!(self.poll_disk_idle(Side::In, cx));
                }
                buf[..CSW_LEN].copy_from_slice(&self.csw());
                self.set_phase(Phase::Idle);
                Poll::Ready(Ok(CSW_LEN))
            }
        }
    }

    /// A bulk OUT transfer: a CBW, data, or a wait, by the phase the
    /// command is in.
    pub(super) fn poll_bulk_out(
        &mut self,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match self.phase {
            Phase::Wedged => Poll::Ready(Err(Errno::EPIPE)),
            Phase::Idle => {
                // A command starts with the disk idle: what the last one
                // left running (a read ahead it did not need) is done.
                ready!(self.poll_disk_idle(Side::Out, cx));
                self.handle_cbw(data);
                Poll::Ready(Ok(data.len()))
            }
            Phase::DataOut => self.data_out(data, cx),
            // A CBW before the CSW was read: NAK it, as a real device would.
            Phase::DataIn | Phase::Status => {
                Self::park(&mut self.out_waker, cx);
                Poll::Pending
            }
        }
    }
}
