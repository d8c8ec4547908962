//! The sans-IO URB phase of an import: decoding commands, running them on
//! the backend in per-endpoint order, the unlink rules, the error hold, the
//! in-flight bounds, and the ordered replies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tracing::{debug, info, warn};
use usbwire_proto::urb::{flags, URB_HEADER_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, Decoded, Direction, Errno, IsoPacket, RetSubmit, UrbCommand,
};

use super::output::Output;
use super::pool::BufferPool;
use super::{SessionConfig, DIRECT_READ_MIN, MAX_EARLY_UNLINKS, READ_CHUNK};
use usbwire_usb::StateChange;

use crate::abuse::BudgetShare;
use crate::capture::{DeviceCapture, XferType};
use crate::metrics::{self, DeviceMetrics, HoldEnd, Metrics};
use crate::queue::EndpointQueue;
use crate::{Backend, Completion, SessionError, TransferType, Urb, UrbId};

/// A CMD_SUBMIT whose OUT payload is being read straight into its own
/// buffer: a large payload is copied once, by the kernel, instead of into
/// the read buffer and then again into the URB.
struct PartialOut {
    cmd: CmdSubmit,
    buf: Vec<u8>,
    filled: usize,
    /// Room for the next command's header, read along with the payload's
    /// end: if it carries a large payload too, that one should go straight
    /// into its own buffer as well.
    next_header: [u8; URB_HEADER_LEN],
}

/// Where the transport reads an import's next bytes: one or two buffers,
/// filled in order (a vectored read).
pub type ReadBuffers<'a> = [IoSliceMut<'a>; 2];

/// Queue index of an endpoint. Endpoint 0 is one bidirectional queue:
/// control transfers of both directions must stay in order.
fn ep_index(ep: u8, dir: Direction) -> usize {
    if ep == 0 {
        0
    } else {
        ep as usize + if dir == Direction::In { 16 } else { 0 }
    }
}

/// Serial-number comparison: is `a` after `b`, allowing for wrap-around?
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Grows `buf` to `len` initialised bytes, if it is shorter, without the
/// doubling of `Vec`'s amortised growth: the read buffer's size is part of
/// the session's memory bound.
fn grow_exactly(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.reserve_exact(len - buf.len());
        buf.resize(len, 0);
    }
}

/// Statuses of an URB stopped by its own unlink: not endpoint errors.
fn is_unlinked_status(status: i32) -> bool {
    status == Errno::ECONNRESET.to_status() || status == Errno::ENOENT.to_status()
}

/// The wire status of an URB that moved `actual` bytes and failed if
/// `error` says so.
fn urb_status(urb: &Urb, actual: usize, error: Option<Errno>) -> i32 {
    match error {
        Some(e) => e.to_status(),
        None if urb.direction == Direction::In
            && actual < urb.length
            && urb.transfer_flags & flags::URB_SHORT_NOT_OK != 0 =>
        {
            Errno::EREMOTEIO.to_status()
        }
        None => 0,
    }
}

/// One import's URB phase, driven from outside: bytes in through
/// [`UrbSession::read_buffers`]/[`UrbSession::input_filled`] (or
/// [`UrbSession::handle_input`]), replies out through
/// [`UrbSession::poll_transmit`]/[`UrbSession::transmitted`], the backend
/// polled on [`UrbSession::poll_backend`] after the waker fired, the error
/// hold's deadline through [`UrbSession::poll_timeout`]/
/// [`UrbSession::handle_timeout`]. Time is always an argument.
pub struct UrbSession {
    config: SessionConfig,
    backend: Box<dyn Backend>,
    /// Given to the backend with every poll; the driver calls
    /// [`UrbSession::poll_backend`] when it fires.
    waker: Waker,
    /// The imported device and who imported it, for log lines.
    busid: String,
    client: String,
    /// The time given with the call being handled: error holds start then.
    now: Instant,
    /// Input not yet handled: `input[..filled]`. All of `input` is
    /// initialised, so that the transport can read into it safely.
    input: Vec<u8>,
    filled: usize,
    partial: Option<PartialOut>,
    queues: Vec<EndpointQueue>,
    output: Output,
    /// Since when replies have waited without the client taking a byte of
    /// them: what the reply-stall deadline runs from.
    replies_waiting_since: Option<Instant>,
    inflight: usize,
    inflight_bytes: usize,
    /// Seqnums of the URBs in flight: a second CMD_SUBMIT with one of them
    /// is refused, since its RET_SUBMIT and any unlink of it could not be
    /// told from the first one's. Once its URB completed, a seqnum may come
    /// again.
    seqnums: HashSet<u32>,
    /// The id the next URB gets.
    next_urb_id: u64,
    /// Highest CMD_SUBMIT seqnum seen, to tell an unlink of a completed URB
    /// from an unlink that overtook its submit.
    max_seqnum: Option<u32>,
    early_unlinks: VecDeque<u32>,
    /// Active URBs whose cancellation the backend is still carrying out,
    /// with the seqnum of the CMD_UNLINK to answer when it has.
    pending_unlinks: HashMap<u32, u32>,
    /// How many queues are held (see `recount_holds`).
    held: usize,
    pool: BufferPool,
    /// This session's part of the server's global in-flight budget, if
    /// it has one.
    budget: Option<BudgetShare>,
    /// Where this import's URBs and error holds are counted, if anywhere.
    metrics: Option<(Arc<DeviceMetrics>, Arc<Metrics>)>,
    /// Each queue's transfer type (a [`metrics::TRANSFER_TYPES`] index) as
    /// the backend gave it at the last submit, so that completions need
    /// not ask again.
    ep_types: [u8; 32],
    /// Where this import's URBs are recorded, if anywhere.
    capture: Option<DeviceCapture>,
}

impl UrbSession {
    /// The URB phase of an import of `busid` by `client`, starting at
    /// `now`. The backend is polled with `waker`.
    pub fn new(
        config: SessionConfig,
        backend: Box<dyn Backend>,
        waker: Waker,
        busid: &str,
        client: String,
        now: Instant,
    ) -> Self {
        UrbSession {
            config,
            backend,
            waker,
            busid: busid.to_string(),
            client,
            now,
            input: Vec::new(),
            filled: 0,
            partial: None,
            queues: (0..32).map(|_| EndpointQueue::default()).collect(),
            output: Output::default(),
            replies_waiting_since: None,
            inflight: 0,
            inflight_bytes: 0,
            seqnums: HashSet::new(),
            next_urb_id: 0,
            max_seqnum: None,
            early_unlinks: VecDeque::new(),
            pending_unlinks: HashMap::new(),
            held: 0,
            pool: BufferPool::new(
                config.limits.max_transfer_length as usize,
                config.max_bytes_in_flight,
            ),
            budget: None,
            metrics: None,
            ep_types: [0; 32],
            capture: None,
        }
    }

    /// Records this import's URBs into `capture`, starting with the
    /// device's descriptors as the backend has them.
    pub fn with_capture(mut self, capture: DeviceCapture) -> Self {
        if let Some((device, configuration)) = self.backend.descriptors() {
            capture.replay_descriptors(&device, &configuration);
        }
        self.capture = Some(capture);
        self
    }

    /// The usbmon transfer type of an URB's endpoint, for the capture: an
    /// endpoint the device does not have is shown as bulk.
    fn capture_xfer_type(&self, urb: &Urb) -> XferType {
        if urb.ep == 0 {
            return XferType::Control;
        }
        if urb.ep > 15 {
            return XferType::Bulk;
        }
        self.backend
            .transfer_type(urb.ep_address())
            .map_or(XferType::Bulk, XferType::from)
    }

    /// Counts this import's URBs in `device` and its error holds in `server`.
    pub fn with_metrics(mut self, device: Arc<DeviceMetrics>, server: Arc<Metrics>) -> Self {
        self.metrics = Some((device, server));
        self
    }

    /// CMD_SUBMITs queued to the device so far.
    pub fn urbs_taken(&self) -> u64 {
        self.next_urb_id
    }

    /// Makes the session take what its commands need from a budget shared
    /// with other sessions, besides its own bounds: it takes no command
    /// the budget cannot cover, until the waker says it may.
    pub fn with_budget(mut self, share: BudgetShare) -> Self {
        self.budget = Some(share);
        self
    }

    /// Bytes charged to the global budget: transfer buffers in flight
    /// (including an OUT payload being read) and replies not yet sent.
    fn charged(&self) -> usize {
        let partial = self
            .partial
            .as_ref()
            .map_or(0, |p| p.cmd.transfer_buffer_length as usize);
        self.inflight_bytes + self.output.footprint() + partial
    }

    /// Whether the global budget covers a command of `len` more bytes.
    fn reserve(&mut self, len: usize) -> bool {
        let need = self.charged() + len;
        let Some(share) = &mut self.budget else {
            return true;
        };
        let was_waiting = share.is_waiting();
        let granted = share.try_hold(need, &self.waker);
        if !granted && !was_waiting {
            debug!(
                busid = %self.busid, client = %self.client, need,
                "waiting for the server's in-flight budget (max_inflight_bytes)"
            );
        }
        granted
    }

    /// Gives back to the global budget what the session no longer holds,
    /// and charges what it holds beyond its reservations (a reply's
    /// buffer larger than its URB).
    /// What every step ends with: the shared budget charged for what
    /// the session now holds, and the reply-stall clock started if replies
    /// wait.
    fn settle(&mut self) {
        let charged = self.charged();
        if let Some(share) = &mut self.budget {
            share.settle(charged);
        }
        if !self.output.is_empty() && self.replies_waiting_since.is_none() {
            self.replies_waiting_since = Some(self.now);
        }
    }

    /// The device, for release once the import ends.
    pub fn into_backend(self) -> Box<dyn Backend> {
        if let Some((device, server)) = &self.metrics {
            device.dropped(self.inflight);
            server.hold_ended(HoldEnd::ImportEnded, self.held);
        }
        self.backend
    }

    // ---- input ----

    /// Whether the transport should read: while the buffer has room, even
    /// when the in-flight bounds stop new URBs from starting, since that is
    /// how a peer that went away is noticed and its device released.
    pub fn wants_input(&self) -> bool {
        self.partial.is_some() || self.filled < self.config.read_limit()
    }

    /// The buffers the transport reads into next; then call
    /// [`UrbSession::input_filled`] with how many bytes it read.
    pub fn read_buffers(&mut self) -> ReadBuffers<'_> {
        if let Some(p) = &mut self.partial {
            let len = p.cmd.transfer_buffer_length as usize;
            return [
                IoSliceMut::new(&mut p.buf[p.filled..len]),
                IoSliceMut::new(&mut p.next_header),
            ];
        }
        if self.input.len() - self.filled < READ_CHUNK / 4 {
            grow_exactly(&mut self.input, self.filled + READ_CHUNK);
        }
        [
            IoSliceMut::new(&mut self.input[self.filled..]),
            IoSliceMut::new(&mut []),
        ]
    }

    /// `n` bytes were read, at `now`, into the buffers
    /// [`UrbSession::read_buffers`] lent.
    pub fn input_filled(&mut self, now: Instant, n: usize) -> Result<(), SessionError> {
        let r = self.take_input(now, n);
        self.settle();
        r
    }

    fn take_input(&mut self, now: Instant, n: usize) -> Result<(), SessionError> {
        self.now = now;
        let Some(p) = &mut self.partial else {
            self.filled = (self.filled + n).min(self.input.len());
            self.process_input()?;
            self.poll_all();
            return Ok(());
        };
        let len = p.cmd.transfer_buffer_length as usize;
        let to_payload = n.min(len - p.filled);
        p.filled += to_payload;
        let header_bytes = (n - to_payload).min(URB_HEADER_LEN);
        // The read buffer was emptied up to this payload when it started.
        debug_assert_eq!(self.filled, 0);
        grow_exactly(&mut self.input, URB_HEADER_LEN);
        self.input[..header_bytes].copy_from_slice(&p.next_header[..header_bytes]);
        self.filled = header_bytes;
        if p.filled == len {
            let p = self.partial.take().expect("checked above");
            self.submit_urb(p.cmd, p.buf, Vec::new())?;
            self.process_input()?;
            self.poll_all();
        }
        Ok(())
    }

    /// Takes as much of `bytes` as the session will buffer now, through
    /// the same path as a transport's reads; returns how much it took.
    /// For transports that hand over bytes they read themselves (TLS in
    /// user space), and for tests.
    pub fn handle_input(&mut self, now: Instant, mut bytes: &[u8]) -> Result<usize, SessionError> {
        let mut taken = 0;
        while !bytes.is_empty() && self.wants_input() {
            let mut copied = 0;
            for buf in self.read_buffers().iter_mut() {
                let n = buf.len().min(bytes.len() - copied);
                buf[..n].copy_from_slice(&bytes[copied..copied + n]);
                copied += n;
            }
            if copied == 0 {
                break;
            }
            bytes = &bytes[copied..];
            taken += copied;
            self.input_filled(now, copied)?;
        }
        Ok(taken)
    }

    /// Whether the bounds let another command start.
    fn may_take_command(&self) -> bool {
        self.inflight < self.config.max_urbs_in_flight
            && self.inflight_bytes < self.config.max_bytes_in_flight
            && self.output.footprint() < self.config.max_bytes_in_flight
    }

    /// Decodes and handles every complete frame in the read buffer, as long
    /// as the in-flight bounds allow.
    fn process_input(&mut self) -> Result<(), SessionError> {
        let mut at = 0;
        let limits = self.config.limits;
        while at < self.filled {
            if !self.may_take_command() {
                break;
            }
            let backend = &*self.backend;
            let is_iso = |dir: Direction, ep: u32| {
                ep < 16
                    && backend.transfer_type(ep as u8 | dir.ep_bit())
                        == Some(TransferType::Isochronous)
            };
            let frame = &self.input[at..self.filled];
            match UrbCommand::decode(frame, &limits, is_iso) {
                Ok(Decoded::NeedMore(n)) => {
                    if let Some(h) = UrbCommand::submit_header(frame, &limits, is_iso)? {
                        if h.iso.is_empty() && h.data.len() >= DIRECT_READ_MIN {
                            if !self.reserve(h.cmd.transfer_buffer_length as usize) {
                                // Read on into the read buffer, up to its
                                // bound: the backpressure.
                                break;
                            }
                            self.start_partial(h.cmd, at + URB_HEADER_LEN);
                            at = self.filled;
                            break;
                        }
                    }
                    // Room for the whole frame, once the handled part is gone.
                    grow_exactly(&mut self.input, (self.filled - at).max(n));
                    break;
                }
                Ok(Decoded::Message(cmd, used)) => {
                    if let UrbCommand::Submit { cmd, .. } = &cmd {
                        if !self.reserve(cmd.transfer_buffer_length as usize) {
                            break;
                        }
                    }
                    let base = at;
                    at += used;
                    match cmd {
                        UrbCommand::Submit { cmd, data, iso } => {
                            let data = base + data.start..base + data.end;
                            let iso = base + iso.start..base + iso.end;
                            self.submit(cmd, data, iso)?;
                        }
                        UrbCommand::Unlink(u) => self.unlink(u),
                    }
                }
                Err(e) => {
                    warn!(busid = %self.busid, client = %self.client, "protocol error, closing the connection: {e}");
                    return Err(e.into());
                }
            }
        }
        if at > 0 {
            self.input.copy_within(at..self.filled, 0);
            self.filled -= at;
        }
        Ok(())
    }

    /// Starts reading an OUT payload into its own buffer; the part already
    /// read, from `from` to the end of the read buffer, is copied over.
    fn start_partial(&mut self, cmd: CmdSubmit, from: usize) {
        let len = cmd.transfer_buffer_length as usize;
        let have = self.filled - from;
        debug_assert!(have < len, "a complete frame is decoded, not read on");
        let mut buf = self.pool.take(len);
        buf[..have].copy_from_slice(&self.input[from..self.filled]);
        self.partial = Some(PartialOut {
            cmd,
            buf,
            filled: have,
            next_header: [0; URB_HEADER_LEN],
        });
    }

    // ---- commands ----

    fn submit(
        &mut self,
        cmd: CmdSubmit,
        data: Range<usize>,
        iso: Range<usize>,
    ) -> Result<(), SessionError> {
        let length = cmd.transfer_buffer_length as usize;
        let iso_packets: Vec<IsoPacket> = if iso.is_empty() {
            Vec::new()
        } else {
            IsoPacket::iter(&self.input[iso]).collect()
        };
        let mut buf = self.pool.take(length);
        if cmd.direction == Direction::Out {
            buf[..length].copy_from_slice(&self.input[data]);
        }
        self.submit_urb(cmd, buf, iso_packets)
    }

    /// Queues a submitted URB, whose OUT payload is already in `buf`. A
    /// seqnum already in flight ends the connection.
    fn submit_urb(
        &mut self,
        cmd: CmdSubmit,
        buf: Vec<u8>,
        iso: Vec<IsoPacket>,
    ) -> Result<(), SessionError> {
        if let Some(i) = self.early_unlinks.iter().position(|&s| s == cmd.seqnum) {
            self.early_unlinks.remove(i);
            debug!(
                seqnum = cmd.seqnum,
                "dropping a submit whose unlink arrived first"
            );
            self.pool.give(buf);
            return Ok(());
        }
        if !self.seqnums.insert(cmd.seqnum) {
            warn!(
                seqnum = cmd.seqnum,
                busid = %self.busid,
                client = %self.client,
                "CMD_SUBMIT with a seqnum already in flight: closing the connection"
            );
            self.pool.give(buf);
            return Err(SessionError::DuplicateSeqnum(cmd.seqnum));
        }
        if self.max_seqnum.is_none_or(|m| seq_after(cmd.seqnum, m)) {
            self.max_seqnum = Some(cmd.seqnum);
        }
        let length = cmd.transfer_buffer_length as usize;
        let id = UrbId(self.next_urb_id);
        self.next_urb_id += 1;
        let urb = Urb {
            id,
            seqnum: cmd.seqnum,
            ep: cmd.ep.min(255) as u8,
            direction: cmd.direction,
            transfer_flags: cmd.transfer_flags,
            setup: cmd.setup_packet(),
            length,
            buf,
            iso,
            start_frame: cmd.start_frame,
            interval: cmd.interval,
            started: false,
        };
        self.inflight += 1;
        self.inflight_bytes += length;
        if let Some((device, _)) = &self.metrics {
            device.submitted();
        }
        if let Some(capture) = &self.capture {
            capture.submitted(&urb, self.capture_xfer_type(&urb));
        }
        if cmd.ep > 15 {
            self.complete(urb, 0, Some(Errno::EPIPE));
            return Ok(());
        }
        let ep_addr = urb.ep_address();
        let q = ep_index(urb.ep, urb.direction);
        let ty = if urb.ep == 0 {
            Some(TransferType::Control)
        } else {
            self.backend.transfer_type(ep_addr)
        };
        self.ep_types[q] = ty.map_or(0, metrics::transfer_type_index) as u8;
        if ty.is_none() {
            debug!(ep = ep_addr, "URB for an endpoint the device does not have");
            self.complete(urb, 0, Some(Errno::EPIPE));
            return Ok(());
        }
        self.queues[q].waiting.push_back(urb);
        self.pump(q);
        Ok(())
    }

    fn unlink(&mut self, u: CmdUnlink) {
        let target = u.unlink_seqnum;
        let status = if let Some(urb) = self
            .queues
            .iter_mut()
            .find_map(|q| q.remove_waiting(target))
        {
            self.finish_silently(urb);
            Errno::ECONNRESET.to_status()
        } else if let Some(cancelled) = self.cancel_active(target) {
            if !cancelled {
                // The backend must finish it first; `complete` answers the
                // unlink then, after the RET_SUBMIT if the URB got one.
                self.pending_unlinks.insert(target, u.seqnum);
                return;
            }
            Errno::ECONNRESET.to_status()
        } else if self.max_seqnum.is_none_or(|m| seq_after(target, m)) {
            // The unlink overtook its submit (vhci queues unlinks behind
            // submits but does not check that the submit went out). Answer
            // now and drop the submit when it comes.
            if self.early_unlinks.len() >= MAX_EARLY_UNLINKS {
                warn!("too many unlinks for URBs never submitted; forgetting the oldest");
                self.early_unlinks.pop_front();
            }
            self.early_unlinks.push_back(target);
            Errno::ECONNRESET.to_status()
        } else {
            // Already completed: its RET_SUBMIT is already queued ahead of
            // this reply.
            0
        };
        debug!(seqnum = u.seqnum, target, status, "unlink");
        self.output.push_ret_unlink(u.seqnum, status);
    }

    /// Cancels the started URB `seqnum`: `None` if there is none, else
    /// whether it is gone already.
    fn cancel_active(&mut self, seqnum: u32) -> Option<bool> {
        for qi in 0..self.queues.len() {
            let Some(i) = self.queues[qi]
                .active
                .iter()
                .position(|u| u.seqnum == seqnum)
            else {
                continue;
            };
            let mut urb = self.queues[qi].active.remove(i).expect("index found");
            if self.backend.cancel(&mut urb) {
                self.finish_silently(urb);
                self.pump(qi);
                return Some(true);
            }
            self.queues[qi].active.insert(i, urb);
            return Some(false);
        }
        None
    }

    // ---- the backend ----

    /// The backend woke the waker: polls it, and takes the commands that
    /// completions made room for.
    pub fn poll_backend(&mut self, now: Instant) -> Result<(), SessionError> {
        self.now = now;
        self.poll_all();
        let r = self.process_input();
        self.poll_all();
        self.settle();
        r
    }

    /// Starts what may start on queue `q` and polls its active URBs.
    fn pump(&mut self, q: usize) {
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        // Bounded, so that a backend that keeps giving URBs back cannot
        // spin the session; the next wake-up carries on.
        for _ in 0..1024 {
            self.start_waiting(q);
            if !self.poll_active(q, &mut cx) {
                return;
            }
        }
        // Out of rounds with work left: come back on the next turn.
        waker.wake_by_ref();
    }

    /// Moves waiting URBs of queue `q` to its active list as far as the
    /// hold and the backend allow.
    fn start_waiting(&mut self, q: usize) {
        while let Some(ep) = self.queues[q].waiting.front().map(Urb::ep_address) {
            let max = self.backend.max_active(ep).max(1);
            if !self.queues[q].start_next(max) {
                break;
            }
        }
    }

    /// Polls every active URB of queue `q` in order (the first poll of a
    /// real device's URB submits it). Returns whether anything completed
    /// or was given back.
    fn poll_active(&mut self, q: usize, cx: &mut Context<'_>) -> bool {
        let mut progressed = false;
        let mut i = 0;
        let mut given_back = Vec::new();
        while i < self.queues[q].active.len() {
            let mut urb = self.queues[q].active.remove(i).expect("index checked");
            if !urb.started && self.queues[q].is_held() {
                // An earlier URB of this pass failed: this one was moved
                // up but never reached the device, so it waits instead.
                given_back.push(urb);
                continue;
            }
            urb.started = true;
            match self.backend.poll_urb(&mut urb, cx) {
                Poll::Pending => {
                    self.queues[q].active.insert(i, urb);
                    i += 1;
                }
                Poll::Ready(Completion::NotStarted) => {
                    urb.started = false;
                    given_back.push(urb);
                }
                Poll::Ready(Completion::Ran { actual, error }) => {
                    self.complete(urb, actual, error);
                    progressed = true;
                }
            }
        }
        // URBs the device never ran go back ahead of those still
        // waiting, in their order: the queue's hold now governs them.
        for urb in given_back.into_iter().rev() {
            self.queues[q].waiting.push_front(urb);
            progressed = true;
        }
        progressed
    }

    fn poll_all(&mut self) {
        for q in 0..self.queues.len() {
            if !self.queues[q].is_empty() {
                self.pump(q);
            }
        }
    }

    /// Whether the device is gone and the import is over: every URB not
    /// yet started is answered with -ENODEV (started ones complete through
    /// the backend), and every reply has been sent. The driver asks every
    /// turn, so it takes no time argument: the holds its -ENODEV answers
    /// start (at the last time given) keep nothing from a gone device.
    pub fn poll_device_gone(&mut self) -> bool {
        if !self.backend.is_gone() {
            return false;
        }
        for q in 0..self.queues.len() {
            while let Some(urb) = self.queues[q].waiting.pop_front() {
                self.complete(urb, 0, Some(Errno::ENODEV));
            }
        }
        self.poll_all();
        self.settle();
        let answered = self.queues.iter().all(EndpointQueue::is_empty);
        if answered && self.output.is_empty() {
            info!(busid = %self.busid, "the device is gone: closing its import");
            return true;
        }
        false
    }

    // ---- completions ----

    /// Answers an URB that moved `actual` bytes and failed if `error`
    /// says so; the bytes go out with the error too.
    fn complete(&mut self, urb: Urb, actual: usize, error: Option<Errno>) {
        let actual = actual.min(urb.length).min(urb.buf.len());
        let status = urb_status(&urb, actual, error);
        if urb.ep == 0 && status == 0 {
            self.after_control(&urb);
        }
        self.hold_after_error(&urb, status);
        self.count_out(&urb);
        if let Some((device, _)) = &self.metrics {
            let ty = if (1..16).contains(&urb.ep) {
                self.ep_types[ep_index(urb.ep, urb.direction)] as usize
            } else {
                0
            };
            device.completed(urb.direction, ty, actual, status);
        }
        if let Some(capture) = &self.capture {
            capture.completed(&urb, self.capture_xfer_type(&urb), actual, status);
        }
        // Hashing every completion's seqnum costs more than the lookup is
        // worth when, as almost always, no unlink is under way.
        let unlink = if self.pending_unlinks.is_empty() {
            None
        } else {
            self.pending_unlinks.remove(&urb.seqnum)
        };
        if unlink.is_some() && is_unlinked_status(status) {
            // Cancelled in time: only the unlink is answered, as if the URB
            // had never been submitted.
            self.pool.give(urb.buf);
        } else {
            self.push_ret_submit(urb, actual, status);
        }
        if let Some(unlink_seqnum) = unlink {
            // A URB that completed before its cancellation took effect gets
            // RET_SUBMIT first, then RET_UNLINK(0): never the reverse.
            let unlink_status = if is_unlinked_status(status) {
                Errno::ECONNRESET.to_status()
            } else {
                0
            };
            self.output.push_ret_unlink(unlink_seqnum, unlink_status);
        }
    }

    /// An endpoint error holds its queue (see `queue.rs`).
    fn hold_after_error(&mut self, urb: &Urb, status: i32) {
        if status == 0
            || is_unlinked_status(status)
            || !(1..16).contains(&urb.ep)
            || !self.config.hold_on_error
        {
            return;
        }
        let q = ep_index(urb.ep, urb.direction);
        if let (false, Some((_, server))) = (self.queues[q].is_held(), &self.metrics) {
            server.hold_started();
        }
        self.queues[q].hold(self.now + self.config.hold_grace);
        self.recount_holds();
        debug!(
            seqnum = urb.seqnum,
            ep = urb.ep_address(),
            status,
            "endpoint error: queue held"
        );
    }

    /// The URB no longer counts against the in-flight bounds, and its
    /// seqnum may come again.
    fn count_out(&mut self, urb: &Urb) {
        self.seqnums.remove(&urb.seqnum);
        self.inflight -= 1;
        self.inflight_bytes -= urb.length;
    }

    /// Ends an URB that gets no RET_SUBMIT (unlinked in time).
    fn finish_silently(&mut self, urb: Urb) {
        self.count_out(&urb);
        if let Some((device, _)) = &self.metrics {
            device.dropped(1);
        }
        if let Some(capture) = &self.capture {
            // As a host controller gives back an unlinked URB.
            let status = Errno::ECONNRESET.to_status();
            capture.completed(&urb, self.capture_xfer_type(&urb), 0, status);
        }
        self.pool.give(urb.buf);
    }

    fn push_ret_submit(&mut self, urb: Urb, actual: usize, status: i32) {
        let ret = RetSubmit {
            seqnum: urb.seqnum,
            status,
            actual_length: actual as u32,
            start_frame: urb.start_frame,
            number_of_packets: urb.iso.len() as u32,
            // As a host controller counts them for usbip-host to forward.
            error_count: urb.iso.iter().filter(|p| p.status != 0).count() as i32,
            ..Default::default()
        };
        let payload_len = if urb.direction == Direction::In {
            actual
        } else {
            0
        };
        if payload_len == 0 {
            // Nothing of the buffer goes out (OUT, or IN with no data): back
            // to the pool now, still warm, for the next URB's payload.
            self.pool.give(urb.buf);
            self.output.push_ret_submit(ret, Vec::new(), 0, &urb.iso);
        } else {
            self.output
                .push_ret_submit(ret, urb.buf, payload_len, &urb.iso);
        }
    }

    /// Control requests that change endpoint state also end error holds,
    /// as they do on a local host controller.
    fn after_control(&mut self, urb: &Urb) {
        let held = self.held;
        match StateChange::recognise(&urb.setup) {
            Some(StateChange::ClearHalt { endpoint }) => {
                let dir = if endpoint & 0x80 != 0 {
                    Direction::In
                } else {
                    Direction::Out
                };
                let q = ep_index(endpoint & 0x0f, dir);
                self.queues[q].release();
            }
            Some(
                StateChange::SetInterface { .. }
                | StateChange::SetConfiguration { .. }
                | StateChange::PortReset,
            ) => {
                for q in &mut self.queues {
                    q.release();
                }
            }
            None => {}
        }
        self.recount_holds();
        if let Some((_, server)) = &self.metrics {
            server.hold_ended(HoldEnd::Released, held.saturating_sub(self.held));
        }
    }

    // ---- the error hold's deadline ----

    /// Error holds are rare; counting them when they change keeps the
    /// common path from scanning every queue for a deadline.
    fn recount_holds(&mut self) {
        self.held = self.queues.iter().filter(|q| q.is_held()).count();
    }

    /// When the next error hold runs out, if one is on.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stall = self.reply_stall_deadline();
        if self.held == 0 {
            return stall;
        }
        let hold = self.queues.iter().filter_map(EndpointQueue::deadline).min();
        match (hold, stall) {
            (Some(h), Some(s)) => Some(h.min(s)),
            (h, s) => h.or(s),
        }
    }

    /// When a client that takes none of its replies is given up on.
    fn reply_stall_deadline(&self) -> Option<Instant> {
        self.replies_waiting_since
            .map(|since| since + self.config.reply_stall_timeout)
    }

    /// Whether the client has taken none of its replies for the
    /// configured time at `now`: it holds what they cost of the server's
    /// shared in-flight budget, so the driver ends the connection.
    pub fn replies_stalled(&self, now: Instant) -> bool {
        self.reply_stall_deadline().is_some_and(|d| now >= d)
    }

    /// The bounds this session runs with.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Ends the error holds whose grace window has run out at `now`, and
    /// starts what they held.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        let expired = self
            .queues
            .iter_mut()
            .map(|q| q.expire(now))
            .filter(|&e| e)
            .count();
        if let Some((_, server)) = &self.metrics {
            server.hold_ended(HoldEnd::Expired, expired);
        }
        self.recount_holds();
        self.poll_all();
        self.settle();
    }

    // ---- output ----

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Fills `slices` with the reply bytes to send next, in order, and
    /// returns how many it filled; then call [`UrbSession::transmitted`].
    pub fn poll_transmit<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        self.output.fill(slices)
    }

    /// `n` bytes of what [`UrbSession::poll_transmit`] gave were sent at
    /// `now`. The room that made lets buffered commands in.
    pub fn transmitted(&mut self, now: Instant, n: usize) -> Result<(), SessionError> {
        self.output.advance(n, &mut self.pool);
        if self.output.is_empty() {
            self.replies_waiting_since = None;
        } else if n > 0 {
            self.replies_waiting_since = Some(now);
        }
        let mut r = Ok(());
        if self.filled > 0 && self.partial.is_none() && self.may_take_command() {
            self.now = now;
            r = self.process_input();
            self.poll_all();
        }
        self.settle();
        r
    }

    /// URBs in flight, their transfer lengths, and the memory the replies
    /// not yet sent hold: what the configured bounds limit.
    pub fn in_flight(&self) -> (usize, usize, usize) {
        (self.inflight, self.inflight_bytes, self.output.footprint())
    }

    /// Heap bytes the session holds for input and spare buffers.
    pub fn buffered_bytes(&self) -> usize {
        self.input.len() + self.pool.held_bytes()
    }
}
