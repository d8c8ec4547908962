//! One client connection: the OP phase, then the URB phase of an import.
//!
//! Everything a connection does happens in one task, and every reply goes
//! through one ordered output queue. That makes the reply-ordering race of
//! Linux's usbip-host (a RET_UNLINK overtaking the RET_SUBMIT it refers to)
//! impossible by construction, and lets emulated devices be answered
//! without a task per URB.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use usbwire_proto::op::OP_HEADER_LEN;
use usbwire_proto::urb::{flags, URB_HEADER_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, DecodeError, Decoded, Direction, Errno, IsoPacket, OpReply, OpRequest,
    OpStatus, RetSubmit, RetUnlink, UrbCommand, USBIP_VERSION,
};

use usbwire_usb::StateChange;

use crate::queue::EndpointQueue;
use crate::registry::Importer;
use crate::{Backend, Completion, TransferType, Urb, UrbId};
use crate::{SessionError, Shared};

const READ_CHUNK: usize = 256 * 1024;
/// How long a client may take to send its OP request.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Unlinks remembered for URBs not yet submitted (the vhci race), at most.
const MAX_EARLY_UNLINKS: usize = 1024;
/// Spare buffers kept for reuse per connection.
const POOL_SIZE: usize = 64;
/// OUT payloads at least this long are read from the socket straight into
/// their URB's buffer (see `PartialOut`); shorter ones are copied out of
/// the read buffer, which costs less than the extra system calls.
const DIRECT_READ_MIN: usize = 16 * 1024;

pub(crate) async fn serve(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let _ = stream.set_nodelay(true);
    let mut rbuf = Vec::with_capacity(512);
    let req = tokio::select! {
        r = tokio::time::timeout(OP_TIMEOUT, read_op(&mut stream, &mut rbuf)) => match r {
            Ok(r) => r?,
            Err(_) => return Err(SessionError::Timeout),
        },
        _ = shutdown.changed() => return Ok(()),
    };
    let Some((req, used)) = req else {
        return Ok(());
    };
    rbuf.drain(..used);
    match req {
        OpRequest::Devlist { .. } => {
            let devices = shared.registry.devlist();
            let mut out = Vec::with_capacity(12 + devices.len() * 330);
            OpReply::Devlist {
                version: USBIP_VERSION,
                status: OpStatus::Ok,
                devices,
            }
            .encode(&mut out);
            stream.write_all(&out).await?;
            let _ = stream.shutdown().await;
            Ok(())
        }
        OpRequest::Import { busid, .. } => {
            let (importer, end) = match Importer::new(conn, &stream) {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, or the client is gone already.
                    warn!(conn, %busid, "cannot take the import: {e}");
                    return Err(e.into());
                }
            };
            let imported = tokio::select! {
                r = shared.registry.import(&busid, importer, shared.config.import_wait) => r,
                _ = shutdown.changed() => return Ok(()),
            };
            let (info, backend) = match imported {
                Ok(x) => x,
                Err(e) => {
                    info!(conn, %busid, "import refused: {e}");
                    let mut out = Vec::new();
                    OpReply::Import {
                        version: USBIP_VERSION,
                        status: e.op_status(),
                        device: None,
                    }
                    .encode(&mut out);
                    stream.write_all(&out).await?;
                    return Ok(());
                }
            };
            // It named an exported device: from here on, that device's name.
            let busid = busid.to_string();
            let mut out = Vec::new();
            OpReply::Import {
                version: USBIP_VERSION,
                status: OpStatus::Ok,
                device: Some(info.clone()),
            }
            .encode(&mut out);
            if let Err(e) = stream.write_all(&out).await {
                shared.release(&busid, conn, backend).await;
                return Err(e.into());
            }
            info!(conn, %busid, "imported");
            let mut s = Session::new(shared.clone(), backend, rbuf, &stream, &busid);
            let r = tokio::select! {
                r = s.run(&stream, &mut shutdown) => r,
                () = end.requested() => {
                    info!(conn, %busid, "import ended from outside");
                    Ok(())
                }
            };
            shared.registry.ending(&busid, conn);
            // Nothing more goes to this client: it sees the close now, not
            // after the device has been reset.
            drop(stream);
            let backend = s.into_backend();
            shared.release(&busid, conn, backend).await;
            info!(conn, %busid, "released");
            r
        }
    }
}

/// Reads one OP request. `None` if the peer closed first.
async fn read_op(
    stream: &mut TcpStream,
    rbuf: &mut Vec<u8>,
) -> Result<Option<(OpRequest, usize)>, SessionError> {
    loop {
        match OpRequest::decode(rbuf) {
            Ok(Decoded::Message(m, n)) => return Ok(Some((m, n))),
            Ok(Decoded::NeedMore(n)) => {
                let mut chunk = [0u8; 64];
                let want = (n - rbuf.len()).min(chunk.len());
                let got = stream.read(&mut chunk[..want]).await?;
                if got == 0 {
                    return Ok(None);
                }
                rbuf.extend_from_slice(&chunk[..got]);
            }
            Err(DecodeError::UnknownOpCode(code)) => {
                // Answer with the reply code of the same request and a
                // failure status, so that a peer speaking a newer or older
                // dialect learns why, then close.
                let mut out = Vec::with_capacity(OP_HEADER_LEN);
                out.extend_from_slice(&USBIP_VERSION.to_be_bytes());
                out.extend_from_slice(&(code & 0x7fff).to_be_bytes());
                out.extend_from_slice(&OpStatus::Na.to_u32().to_be_bytes());
                let _ = stream.write_all(&out).await;
                return Err(DecodeError::UnknownOpCode(code).into());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Wakes the session task when a backend can make progress.
struct SessionWaker(Notify);

impl Wake for SessionWaker {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// A CMD_SUBMIT whose OUT payload is being read straight into its own
/// buffer: a large payload is copied once, by the kernel, instead of into
/// the read buffer and then again into the URB.
struct PartialOut {
    cmd: CmdSubmit,
    buf: Vec<u8>,
    filled: usize,
}

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
}

fn ep_index(ep: u8, dir: Direction) -> usize {
    // Endpoint 0 is one bidirectional queue: control transfers of both
    // directions must stay in order.
    if ep == 0 {
        0
    } else {
        ep as usize + if dir == Direction::In { 16 } else { 0 }
    }
}

struct Session {
    shared: Arc<Shared>,
    backend: Option<Box<dyn Backend>>,
    /// The imported device and who imported it, for log lines.
    busid: String,
    client: String,
    rbuf: Vec<u8>,
    partial: Option<PartialOut>,
    queues: Vec<EndpointQueue>,
    out: VecDeque<OutFrame>,
    /// Bytes of the front frame already written.
    out_written: usize,
    out_bytes: usize,
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
    pool: Vec<Vec<u8>>,
    waker: Arc<SessionWaker>,
    grace: Duration,
}

/// Serial-number comparison: is `a` after `b`, allowing for wrap-around?
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        backend: Box<dyn Backend>,
        rbuf: Vec<u8>,
        stream: &TcpStream,
        busid: &str,
    ) -> Self {
        let grace = shared.config.hold_grace(crate::sys::rtt(stream));
        debug!(?grace, "error hold grace window");
        Session {
            shared,
            backend: Some(backend),
            busid: busid.to_string(),
            client: stream
                .peer_addr()
                .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string()),
            rbuf,
            partial: None,
            queues: (0..32).map(|_| EndpointQueue::default()).collect(),
            out: VecDeque::new(),
            out_written: 0,
            out_bytes: 0,
            inflight: 0,
            inflight_bytes: 0,
            seqnums: HashSet::new(),
            next_urb_id: 0,
            max_seqnum: None,
            early_unlinks: VecDeque::new(),
            pending_unlinks: HashMap::new(),
            held: 0,
            pool: Vec::new(),
            waker: Arc::new(SessionWaker(Notify::new())),
            grace,
        }
    }

    fn into_backend(mut self) -> Box<dyn Backend> {
        self.backend
            .take()
            .expect("backend present until the session ends")
    }

    fn backend(&mut self) -> &mut dyn Backend {
        &mut **self
            .backend
            .as_mut()
            .expect("backend present until the session ends")
    }

    async fn run(
        &mut self,
        stream: &TcpStream,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        // Bytes that arrived with the import request.
        self.process_input()?;
        self.poll_all();
        let mut eof = false;
        loop {
            if !self.out.is_empty() {
                self.write_some(stream)?;
                if !self.rbuf.is_empty() && self.can_read() {
                    // Written replies made room for buffered commands.
                    self.process_input()?;
                    self.poll_all();
                }
            }
            if eof {
                return Ok(());
            }
            if self.backend().is_gone() && self.fail_all_gone() && self.out.is_empty() {
                info!("the device is gone: closing its import");
                return Ok(());
            }
            // Keep reading while the buffer has room, even when the
            // in-flight bounds stop new URBs from starting: that is how a
            // peer that went away is noticed and its device released.
            let want_read = self.partial.is_some() || self.rbuf.len() < self.read_limit();
            let want_write = !self.out.is_empty();
            let deadline = self.next_deadline();
            let notify = self.waker.clone();
            tokio::select! {
                // Fixed order: no random draw per turn, and input first.
                biased;
                r = stream.readable(), if want_read => {
                    r?;
                    if self.partial.is_some() {
                        eof = self.read_partial(stream)?;
                    } else {
                        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                            self.rbuf.reserve(READ_CHUNK);
                        }
                        match stream.try_read_buf(&mut self.rbuf) {
                            Ok(0) => eof = true,
                            Ok(_) => {
                                self.process_input()?;
                                self.poll_all();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                r = stream.writable(), if want_write => { r?; }
                _ = notify.0.notified() => {
                    self.poll_all();
                    // Completions free in-flight room for commands already buffered.
                    self.process_input()?;
                    self.poll_all();
                }
                _ = sleep_until_opt(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    for q in &mut self.queues { q.expire(now); }
                    self.recount_holds();
                    self.poll_all();
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Completes every URB not yet started with -ENODEV (started ones
    /// complete through the backend). Returns whether none is left.
    fn fail_all_gone(&mut self) -> bool {
        for q in 0..self.queues.len() {
            while let Some(urb) = self.queues[q].waiting.pop_front() {
                self.complete(urb, 0, Some(Errno::ENODEV));
            }
        }
        self.poll_all();
        self.queues.iter().all(|q| q.is_empty())
    }

    /// How much unprocessed input may be buffered: one largest frame and
    /// change.
    fn read_limit(&self) -> usize {
        self.shared.config.limits.max_transfer_length as usize + READ_CHUNK
    }

    fn can_read(&self) -> bool {
        let c = &self.shared.config;
        self.inflight < c.max_urbs_in_flight
            && self.inflight_bytes < c.max_bytes_in_flight
            && self.out_bytes < c.max_bytes_in_flight
    }

    /// Error holds are rare; counting them when they change keeps the
    /// common path from scanning every queue for a deadline.
    fn recount_holds(&mut self) {
        self.held = self.queues.iter().filter(|q| q.is_held()).count();
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.held == 0 {
            return None;
        }
        self.queues.iter().filter_map(|q| q.deadline()).min()
    }

    /// Decodes and handles every complete frame in the read buffer, as long
    /// as the in-flight bounds allow.
    fn process_input(&mut self) -> Result<(), SessionError> {
        let mut at = 0;
        let limits = self.shared.config.limits;
        while at < self.rbuf.len() {
            if !self.can_read() {
                break;
            }
            let backend = self.backend.as_deref().expect("backend");
            let is_iso = |dir: Direction, ep: u32| {
                ep < 16
                    && backend.transfer_type(ep as u8 | dir.ep_bit())
                        == Some(TransferType::Isochronous)
            };
            match UrbCommand::decode(&self.rbuf[at..], &limits, is_iso) {
                Ok(Decoded::NeedMore(n)) => {
                    if let Some(h) = UrbCommand::submit_header(&self.rbuf[at..], &limits, is_iso)? {
                        if h.iso.is_empty() && h.data.len() >= DIRECT_READ_MIN {
                            self.start_partial(h.cmd, at + URB_HEADER_LEN);
                            at = self.rbuf.len();
                            break;
                        }
                    }
                    if self.rbuf.capacity() < at + n {
                        self.rbuf.reserve(at + n - self.rbuf.len());
                    }
                    break;
                }
                Ok(Decoded::Message(cmd, used)) => {
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
        self.rbuf.drain(..at);
        Ok(())
    }

    /// Starts reading an OUT payload into its own buffer; the part already
    /// read, from `from` to the end of the read buffer, is copied over.
    fn start_partial(&mut self, cmd: CmdSubmit, from: usize) {
        let len = cmd.transfer_buffer_length as usize;
        let have = self.rbuf.len() - from;
        debug_assert!(have < len, "a complete frame is decoded, not read on");
        let mut buf = self.take_buf(len);
        buf[..have].copy_from_slice(&self.rbuf[from..]);
        self.partial = Some(PartialOut {
            cmd,
            buf,
            filled: have,
        });
    }

    /// Reads more of the partial OUT payload, and with it at most the next
    /// command's header: if that command carries a large payload too, it
    /// should go straight into its own buffer as well. Returns whether the
    /// peer closed the connection.
    fn read_partial(&mut self, stream: &TcpStream) -> Result<bool, SessionError> {
        let p = self.partial.as_mut().expect("a partial payload");
        let len = p.cmd.transfer_buffer_length as usize;
        let mut next = [0u8; URB_HEADER_LEN];
        let mut bufs = [
            IoSliceMut::new(&mut p.buf[p.filled..len]),
            IoSliceMut::new(&mut next),
        ];
        let n = match stream.try_read_vectored(&mut bufs) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let to_payload = n.min(len - p.filled);
        p.filled += to_payload;
        // The read buffer was emptied up to this payload when it started.
        debug_assert!(self.rbuf.is_empty() || to_payload == n);
        self.rbuf.extend_from_slice(&next[..n - to_payload]);
        if p.filled == len {
            let p = self.partial.take().expect("checked above");
            self.submit_urb(p.cmd, p.buf, Vec::new())?;
            self.process_input()?;
            self.poll_all();
        }
        Ok(false)
    }

    /// The most recently returned buffer that fits: it is the one most
    /// likely still in the CPU's cache, where taking the oldest would cycle
    /// through every buffer the pool holds.
    fn take_buf(&mut self, len: usize) -> Vec<u8> {
        match self.pool.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.pool.swap_remove(i);
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
    fn give_buf(&mut self, b: Vec<u8>) {
        if self.pool.len() < POOL_SIZE
            && b.capacity() > 0
            && b.capacity() <= self.shared.config.limits.max_transfer_length as usize
        {
            self.pool.push(b);
        }
    }

    fn submit(
        &mut self,
        cmd: CmdSubmit,
        data: std::ops::Range<usize>,
        iso: std::ops::Range<usize>,
    ) -> Result<(), SessionError> {
        let length = cmd.transfer_buffer_length as usize;
        let iso_packets: Vec<IsoPacket> = if iso.is_empty() {
            Vec::new()
        } else {
            IsoPacket::iter(&self.rbuf[iso]).collect()
        };
        let mut buf = self.take_buf(length);
        if cmd.direction == Direction::Out {
            buf[..length].copy_from_slice(&self.rbuf[data]);
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
            self.give_buf(buf);
            return Ok(());
        }
        if !self.seqnums.insert(cmd.seqnum) {
            warn!(
                seqnum = cmd.seqnum,
                busid = %self.busid,
                client = %self.client,
                "CMD_SUBMIT with a seqnum already in flight: closing the connection"
            );
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
        if cmd.ep > 15 {
            self.complete(urb, 0, Some(Errno::EPIPE));
            return Ok(());
        }
        let ep_addr = urb.ep_address();
        if urb.ep != 0 && self.backend().transfer_type(ep_addr).is_none() {
            debug!(ep = ep_addr, "URB for an endpoint the device does not have");
            self.complete(urb, 0, Some(Errno::EPIPE));
            return Ok(());
        }
        let q = ep_index(urb.ep, urb.direction);
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
        self.push_ret_unlink(u.seqnum, status);
    }

    fn push_ret_unlink(&mut self, seqnum: u32, status: i32) {
        let mut header = [0u8; URB_HEADER_LEN];
        RetUnlink {
            seqnum,
            status,
            ..Default::default()
        }
        .write_header(&mut header);
        self.push_out(OutFrame {
            header,
            payload: Vec::new(),
            payload_len: 0,
            iso: Vec::new(),
        });
    }

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
            if self.backend().cancel(&mut urb) {
                self.finish_silently(urb);
                self.pump(qi);
                return Some(true);
            }
            self.queues[qi].active.insert(i, urb);
            return Some(false);
        }
        None
    }

    fn finish_silently(&mut self, urb: Urb) {
        self.seqnums.remove(&urb.seqnum);
        self.inflight -= 1;
        self.inflight_bytes -= urb.length;
        self.give_buf(urb.buf);
    }

    /// Starts what may start on queue `q` and polls its active URBs.
    fn pump(&mut self, q: usize) {
        let waker = Waker::from(self.waker.clone());
        let mut cx = Context::from_waker(&waker);
        // Bounded, so that a backend that keeps giving URBs back cannot
        // spin the session; the next wake-up carries on.
        for _ in 0..1024 {
            let mut progressed = false;
            while let Some(ep) = self.queues[q].waiting.front().map(|u| u.ep_address()) {
                let max = self.backend().max_active(ep).max(1);
                if !self.queues[q].start_next(max) {
                    break;
                }
            }
            // Poll every active URB in order: the first poll of a real
            // device's URB submits it.
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
                match self.backend().poll_urb(&mut urb, &mut cx) {
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
            if !progressed {
                return;
            }
        }
        // Out of rounds with work left: come back on the next turn.
        waker.wake_by_ref();
    }

    fn poll_all(&mut self) {
        for q in 0..self.queues.len() {
            if !self.queues[q].is_empty() {
                self.pump(q);
            }
        }
    }

    /// Answers an URB that moved `actual` bytes and failed if `error`
    /// says so; the bytes go out with the error too.
    fn complete(&mut self, urb: Urb, actual: usize, error: Option<Errno>) {
        let actual = actual.min(urb.length).min(urb.buf.len());
        let status = match error {
            Some(e) => e.to_status(),
            None if urb.direction == Direction::In
                && actual < urb.length
                && urb.transfer_flags & flags::URB_SHORT_NOT_OK != 0 =>
            {
                Errno::EREMOTEIO.to_status()
            }
            None => 0,
        };
        if urb.ep == 0 && status == 0 {
            self.after_control(&urb);
        }
        // An URB stopped by its own unlink is not an endpoint error.
        let unlinked =
            status == Errno::ECONNRESET.to_status() || status == Errno::ENOENT.to_status();
        if status != 0 && !unlinked && (1..16).contains(&urb.ep) && self.shared.config.hold_on_error
        {
            let q = ep_index(urb.ep, urb.direction);
            self.queues[q].hold(Instant::now() + self.grace);
            self.recount_holds();
            debug!(
                seqnum = urb.seqnum,
                ep = urb.ep_address(),
                status,
                "endpoint error: queue held"
            );
        }
        let mut header = [0u8; URB_HEADER_LEN];
        RetSubmit {
            seqnum: urb.seqnum,
            status,
            actual_length: actual as u32,
            start_frame: urb.start_frame,
            number_of_packets: if urb.iso.is_empty() {
                0
            } else {
                urb.iso.len() as u32
            },
            // As a host controller counts them for usbip-host to forward.
            error_count: urb.iso.iter().filter(|p| p.status != 0).count() as i32,
            ..Default::default()
        }
        .write_header(&mut header);
        let mut iso = Vec::new();
        for p in &urb.iso {
            p.encode(&mut iso);
        }
        self.seqnums.remove(&urb.seqnum);
        self.inflight -= 1;
        self.inflight_bytes -= urb.length;
        let payload_len = if urb.direction == Direction::In {
            actual
        } else {
            0
        };
        // Hashing every completion's seqnum costs more than the lookup is
        // worth when, as almost always, no unlink is under way.
        let unlink = if self.pending_unlinks.is_empty() {
            None
        } else {
            self.pending_unlinks.remove(&urb.seqnum)
        };
        if unlink.is_some()
            && (status == Errno::ECONNRESET.to_status() || status == Errno::ENOENT.to_status())
        {
            // Cancelled in time: only the unlink is answered, as if the URB
            // had never been submitted.
            self.give_buf(urb.buf);
        } else if payload_len == 0 {
            // Nothing of the buffer goes out (OUT, or IN with no data): back
            // to the pool now, still warm, for the next URB's payload.
            self.give_buf(urb.buf);
            self.push_out(OutFrame {
                header,
                payload: Vec::new(),
                payload_len,
                iso,
            });
        } else {
            self.push_out(OutFrame {
                header,
                payload: urb.buf,
                payload_len,
                iso,
            });
        }
        if let Some(unlink_seq) = unlink {
            // A URB that completed before its cancellation took effect gets
            // RET_SUBMIT first, then RET_UNLINK(0): never the reverse.
            let st =
                if status == Errno::ECONNRESET.to_status() || status == Errno::ENOENT.to_status() {
                    Errno::ECONNRESET.to_status()
                } else {
                    0
                };
            self.push_ret_unlink(unlink_seq, st);
        }
    }

    /// Control requests that change endpoint state also end error holds,
    /// as they do on a local host controller.
    fn after_control(&mut self, urb: &Urb) {
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
    }

    fn push_out(&mut self, f: OutFrame) {
        self.out_bytes += f.len();
        self.out.push_back(f);
    }

    /// Writes as much of the output queue as the socket takes now, many
    /// frames per system call.
    fn write_some(&mut self, stream: &TcpStream) -> Result<(), SessionError> {
        const MAX_SLICES: usize = 64;
        while !self.out.is_empty() {
            // A fixed array: no allocation per write, and up to 64 replies
            // (header-only ones take one slice each) per system call.
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut used = 0;
            let mut skip = self.out_written;
            'frames: for f in self.out.iter() {
                for part in [&f.header[..], &f.payload[..f.payload_len], &f.iso[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if used == MAX_SLICES {
                        break 'frames;
                    }
                    slices[used] = IoSlice::new(&part[skip..]);
                    used += 1;
                    skip = 0;
                }
            }
            let n = match stream.try_write_vectored(&slices[..used]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            self.out_written += n;
            self.out_bytes -= n;
            while let Some(f) = self.out.front() {
                let len = f.len();
                if self.out_written < len {
                    break;
                }
                self.out_written -= len;
                let f = self.out.pop_front().expect("front exists");
                self.give_buf(f.payload);
            }
        }
        Ok(())
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
