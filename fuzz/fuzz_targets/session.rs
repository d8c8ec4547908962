//! The server's session core (`UrbSession`) on arbitrary bytes, arbitrarily
//! chunked, interleaved with arbitrary backend completions, cancellations,
//! timeouts, partial writes and a departing device.
//!
//! Asserts: no panic; the heap the session holds stays within its
//! configured bounds (every allocation of the process is counted); and
//! every reply answers a command: each RET_SUBMIT a CMD_SUBMIT that was
//! sent and not yet answered, once, each RET_UNLINK a CMD_UNLINK, and every
//! reply decodes as the kernel's vhci would decode it (an IN reply carries
//! no more than its URB asked for).
//!
//! Input: two configuration bytes, then operations, each an opcode byte
//! followed by its arguments; the bytes a "receive" operation hands the
//! session are taken from the input as they come.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use usbwire_proto::urb::{ISO_PACKET_LEN, USBIP_RET_SUBMIT, USBIP_RET_UNLINK};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, Decoded, DeviceInfo, Direction, Errno, IsoPacket, Limits, UrbCommand,
    URB_HEADER_LEN,
};
use usbwire_server::session::{SessionConfig, UrbSession, READ_CHUNK};
use usbwire_server::{Backend, Completion, TransferType, Urb, UrbId};

// ---- every heap byte of the process, counted ----

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grew(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if n > l.size() {
            grew(n - l.size());
        } else {
            LIVE.fetch_sub(l.size() - n, Ordering::Relaxed);
        }
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---- a device whose every move the input decides ----

#[derive(Default)]
struct DeviceState {
    /// URBs the device has seen and not finished, oldest first.
    running: Vec<UrbId>,
    /// How each URB is to end, once polled again.
    results: HashMap<UrbId, Completion>,
    cancel_is_asynchronous: bool,
    max_active: usize,
    gone: bool,
}

struct FuzzDevice(Arc<Mutex<DeviceState>>);

fn endpoint_type(ep_address: u8) -> Option<TransferType> {
    match ep_address {
        0x01 | 0x81 => Some(TransferType::Bulk),
        0x82 => Some(TransferType::Interrupt),
        0x03 | 0x83 => Some(TransferType::Isochronous),
        _ => None,
    }
}

impl Backend for FuzzDevice {
    fn device_info(&self, _: &str, _: u32, _: u32) -> DeviceInfo {
        unreachable!("the session core never asks")
    }
    fn transfer_type(&self, ep_address: u8) -> Option<TransferType> {
        endpoint_type(ep_address)
    }
    fn poll_urb(&mut self, urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
        let mut device = self.0.lock().unwrap();
        let Some(result) = device.results.remove(&urb.id) else {
            if !device.running.contains(&urb.id) {
                device.running.push(urb.id);
            }
            return Poll::Pending;
        };
        device.running.retain(|id| *id != urb.id);
        let Completion::Ran { actual, error } = result else {
            return Poll::Ready(result);
        };
        if urb.iso.is_empty() {
            return Poll::Ready(result);
        }
        // As a host controller reports isochronous URBs: per packet, and
        // in all the sum of the packets.
        let mut sum = 0;
        for p in &mut urb.iso {
            p.actual_length = p.length.min(actual as u32);
            p.status = if p.actual_length == 0 { -18 } else { 0 };
            sum += p.actual_length as usize;
        }
        Poll::Ready(Completion::Ran { actual: sum, error })
    }
    fn max_active(&self, _: u8) -> usize {
        self.0.lock().unwrap().max_active
    }
    fn cancel(&mut self, urb: &mut Urb) -> bool {
        let mut device = self.0.lock().unwrap();
        if device.cancel_is_asynchronous {
            return false;
        }
        device.running.retain(|id| *id != urb.id);
        true
    }
    fn is_gone(&self) -> bool {
        self.0.lock().unwrap().gone
    }
    fn release(&mut self) {}
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

// ---- the client's side: what it sent, and the replies it may get ----

/// What the client knows of a CMD_SUBMIT it sent.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Sent {
    direction: Direction,
    /// Isochronous descriptors sent with it, which its reply carries back.
    iso_packets: u32,
    length: u32,
}

#[derive(Default)]
struct Client {
    /// The command stream as sent, decoded on its own: which commands the
    /// session can have seen. What is decoded is dropped.
    sent: Vec<u8>,
    decoded_to: usize,
    stream_broken: bool,
    /// Per seqnum, the CMD_SUBMITs sent and not yet answered. Usually one;
    /// more when a seqnum came again after an earlier URB of it completed,
    /// or after a submit the session dropped for an unlink that overtook it.
    submits: HashMap<u32, Vec<Sent>>,
    /// Per seqnum, the targets of the CMD_UNLINKs sent and not yet answered.
    unlinks: HashMap<u32, Vec<u32>>,
    received: Vec<u8>,
    /// Outstanding submits of one seqnum disagree on what the reply holds:
    /// the replies that follow cannot be framed, so checks stop here.
    ambiguous: bool,
    /// Which URB a RET_UNLINK's cancellation hit can no longer be told;
    /// replies are still matched to commands, by seqnum.
    targets_unknown: bool,
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

impl Client {
    fn sent(&mut self, bytes: &[u8], limits: &Limits) {
        self.sent.extend_from_slice(bytes);
        while !self.stream_broken {
            let is_iso = |dir: Direction, ep: u32| {
                ep < 16 && endpoint_type(ep as u8 | dir.ep_bit()) == Some(TransferType::Isochronous)
            };
            match UrbCommand::decode(&self.sent[self.decoded_to..], limits, is_iso) {
                Ok(Decoded::Message(UrbCommand::Submit { cmd, iso, .. }, n)) => {
                    self.submits.entry(cmd.seqnum).or_default().push(Sent {
                        direction: cmd.direction,
                        iso_packets: (iso.len() / ISO_PACKET_LEN) as u32,
                        length: cmd.transfer_buffer_length,
                    });
                    self.decoded_to += n;
                }
                Ok(Decoded::Message(UrbCommand::Unlink(u), n)) => {
                    self.unlinks.entry(u.seqnum).or_default().push(u.unlink_seqnum);
                    self.decoded_to += n;
                }
                Ok(Decoded::NeedMore(_)) => break,
                Err(_) => self.stream_broken = true,
            }
        }
        // Only a partial command is kept, and nothing once the stream broke.
        if self.stream_broken {
            self.sent = Vec::new();
        } else {
            self.sent.drain(..self.decoded_to);
        }
        self.decoded_to = 0;
    }

    /// Checks every complete reply received so far against the commands.
    fn check_replies(&mut self) {
        let mut at = 0;
        while !self.ambiguous && self.received.len() - at >= URB_HEADER_LEN {
            let b = &self.received[at..];
            let seqnum = word(b, 4);
            let status = word(b, 20) as i32;
            match word(b, 0) {
                USBIP_RET_SUBMIT => {
                    let outstanding = self
                        .submits
                        .get_mut(&seqnum)
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| panic!("RET_SUBMIT {seqnum} answers no CMD_SUBMIT"));
                    let first = outstanding[0];
                    if outstanding.iter().any(|s| {
                        s.direction != first.direction || s.iso_packets != first.iso_packets
                    }) {
                        self.ambiguous = true;
                        return;
                    }
                    let actual = word(b, 24);
                    let packets = word(b, 32);
                    let longest = outstanding.iter().map(|s| s.length).max().unwrap_or(0);
                    assert!(actual <= longest, "RET_SUBMIT {seqnum}: {actual} bytes for {longest}");
                    if first.iso_packets > 0 {
                        assert_eq!(packets, first.iso_packets, "RET_SUBMIT {seqnum}: descriptors");
                    }
                    let data = if first.direction == Direction::In { actual } else { 0 };
                    let len = URB_HEADER_LEN
                        + data as usize
                        + first.iso_packets as usize * ISO_PACKET_LEN;
                    if self.received.len() - at < len {
                        break;
                    }
                    let i = outstanding
                        .iter()
                        .position(|s| s.length >= actual)
                        .expect("the longest one fits");
                    outstanding.remove(i);
                    at += len;
                }
                USBIP_RET_UNLINK => {
                    let targets = self
                        .unlinks
                        .get_mut(&seqnum)
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| panic!("RET_UNLINK {seqnum} answers no CMD_UNLINK"));
                    // Unlinks that share a seqnum and name different URBs may
                    // be answered in any order: which one this answers is
                    // then unknown, and so is which URB a cancellation hit.
                    if targets.iter().any(|t| *t != targets[0]) {
                        self.targets_unknown = true;
                    }
                    let target = targets.remove(0);
                    at += URB_HEADER_LEN;
                    assert!(
                        status == 0 || status == Errno::ECONNRESET.to_status(),
                        "RET_UNLINK {seqnum} with status {status}"
                    );
                    if status == 0 || self.targets_unknown {
                        continue;
                    }
                    // Cancelled: that URB gets no RET_SUBMIT, ever (or the
                    // unlink overtook its submit, which is then dropped).
                    if let Some(outstanding) = self.submits.get_mut(&target) {
                        if outstanding.iter().any(|s| *s != outstanding[0]) {
                            self.ambiguous = true;
                            break;
                        }
                        outstanding.pop();
                    }
                }
                other => panic!("not a reply: command {other:#x}"),
            }
        }
        if self.ambiguous {
            // Nothing more can be framed: nothing more is kept.
            self.received = Vec::new();
        } else {
            self.received.drain(..at);
        }
    }
}

/// Reads the input as a sequence of small numbers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn run(input: &[u8], baseline: usize) {
    let mut input = Input(input);
    let (Some(c0), Some(c1)) = (input.byte(), input.byte()) else {
        return;
    };
    // Small bounds keep inputs short; the logic is the same at any size.
    let max_transfer = 4096usize << (c1 & 3);
    let config = SessionConfig {
        limits: Limits {
            max_transfer_length: max_transfer as u32,
            max_iso_packets: 16,
            ..Limits::default()
        },
        max_urbs_in_flight: usize::from((c0 >> 4) & 7) + 1,
        max_bytes_in_flight: max_transfer * (usize::from((c1 >> 2) & 3) + 1),
        hold_on_error: c0 & 4 == 0,
        hold_grace: Duration::from_millis(20),
        reply_stall_timeout: Duration::from_secs(1),
    };
    let limits = config.limits;
    let device = Arc::new(Mutex::new(DeviceState {
        max_active: usize::from(c0 & 3) + 1,
        cancel_is_asynchronous: c0 & 8 != 0,
        ..DeviceState::default()
    }));
    let mut now = Instant::now();
    let mut session = UrbSession::new(
        config,
        Box::new(FuzzDevice(device.clone())),
        Waker::from(Arc::new(NoWake)),
        "1-1",
        "fuzz".into(),
        now,
    );
    let mut client = Client::default();
    // Every heap byte the session may hold, from its configuration: the
    // read buffer; a large OUT payload being read; the URBs in flight
    // (their lengths are bounded, and a pooled buffer may have up to its
    // length or 64 KiB more room); the replies not yet sent (bounded by
    // the memory they hold, plus what completes after the last check, and
    // the queue's growth); the pool; per URB and unlink its bookkeeping.
    // Then what this harness keeps, which grows with the input.
    let (t, b, urbs) = (max_transfer, config.max_bytes_in_flight, config.max_urbs_in_flight);
    let spare_room = 64 * 1024;
    let urb_buffers = 2 * (b + t) + spare_room * (urbs + 1);
    let bound = config.read_limit()
        + READ_CHUNK
        + 2 * t
        + spare_room
        + urb_buffers
        + 2 * (b + urb_buffers)
        + b
        + urbs * 1024
        + 2 * 1024 * 4
        + 64 * 1024
        + 64 * input.0.len()
        + 3 * (URB_HEADER_LEN + t + 16 * ISO_PACKET_LEN);

    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 10_000 {
            break;
        }
        let result = match op % 12 {
            // Receive: a chunk of the rest of the input, of any length.
            0..=3 => {
                let len = match input.byte() {
                    Some(b) if b >= 0xf0 => usize::from(b & 0x0f) << 12,
                    Some(b) => usize::from(b),
                    None => 0,
                };
                let chunk = input.take(len);
                match session.handle_input(now, chunk) {
                    Ok(taken) => {
                        client.sent(&chunk[..taken], &limits);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            // The device finishes one of its URBs.
            4 | 5 => {
                let (pick, how) = (input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                {
                    let mut d = device.lock().unwrap();
                    if !d.running.is_empty() {
                        let id = d.running[usize::from(pick) % d.running.len()];
                        let completion = match how % 8 {
                            0 => Completion::NotStarted,
                            1 => Completion::failed(Errno::EPIPE),
                            2 => Completion::failed(Errno::ECONNRESET),
                            3 => Completion::failed(Errno::ENOENT),
                            4 => Completion::Ran {
                                actual: usize::from(how),
                                error: Some(Errno::EPROTO),
                            },
                            _ => Completion::Ran {
                                actual: usize::from(how) * 64,
                                error: None,
                            },
                        };
                        d.results.insert(id, completion);
                    }
                }
                session.poll_backend(now)
            }
            // Time passes; the driver's timer fires if a deadline came.
            6 => {
                now += Duration::from_millis(u64::from(input.byte().unwrap_or(0)));
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(now);
                }
                Ok(())
            }
            // The transport takes some of the output.
            7 => {
                let room = usize::from(input.byte().unwrap_or(0)) * 97 + 1;
                transmit(&mut session, &mut client, now, room)
            }
            // Whole commands built from a few input bytes, so that runs
            // reach deep states sooner; they go in as bytes like the rest.
            10 | 11 => {
                let mut frame = Vec::new();
                if op % 12 == 10 {
                    build_submit(&mut input, max_transfer, &mut frame);
                } else {
                    let (seqnum, target) = (input.byte().unwrap_or(0), input.byte().unwrap_or(0));
                    CmdUnlink {
                        seqnum: u32::from(seqnum),
                        unlink_seqnum: u32::from(target),
                        ..CmdUnlink::default()
                    }
                    .encode(&mut frame);
                }
                match session.handle_input(now, &frame) {
                    Ok(taken) => {
                        client.sent(&frame[..taken], &limits);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            8 => {
                let mut d = device.lock().unwrap();
                d.cancel_is_asynchronous = !d.cancel_is_asynchronous;
                Ok(())
            }
            _ => {
                device.lock().unwrap().gone = true;
                let _ = session.poll_device_gone();
                Ok(())
            }
        };
        let peak = PEAK.load(Ordering::Relaxed) - baseline;
        assert!(
            peak <= bound,
            "{peak} heap bytes held, bound {bound}; {config:?}; in flight (URBs, bytes, \
             unsent reply memory) {:?}; read buffer and pool {}",
            session.in_flight(),
            session.buffered_bytes()
        );
        if result.is_err() {
            // The driver closes the connection: the device goes back.
            drop(session.into_backend());
            return;
        }
    }
    // The peer reads everything that is left.
    let _ = transmit(&mut session, &mut client, now, usize::MAX);
    drop(session.into_backend());
}

/// Control requests that matter to the session (they end error holds),
/// and one that does not.
const SETUPS: [[u8; 8]; 6] = [
    [0x02, 1, 0, 0, 0x81, 0, 0, 0], // CLEAR_FEATURE(ENDPOINT_HALT) of 0x81
    [0x02, 1, 0, 0, 0x01, 0, 0, 0], // CLEAR_FEATURE(ENDPOINT_HALT) of 0x01
    [0x01, 11, 0, 0, 0, 0, 0, 0],   // SET_INTERFACE
    [0x00, 9, 1, 0, 0, 0, 0, 0],    // SET_CONFIGURATION
    [0x23, 3, 4, 0, 1, 0, 0, 0],    // SET_FEATURE(PORT_RESET)
    [0x80, 6, 0, 1, 0, 0, 18, 0],   // GET_DESCRIPTOR(DEVICE)
];

/// A CMD_SUBMIT from four input bytes: seqnum, endpoint and direction,
/// length, flags and the rest.
fn build_submit(input: &mut Input<'_>, max_transfer: usize, frame: &mut Vec<u8>) {
    let seqnum = input.byte().unwrap_or(0);
    let endpoint = input.byte().unwrap_or(0);
    let length = input.byte().unwrap_or(0);
    let extra = input.byte().unwrap_or(0);
    let direction = if endpoint & 0x80 != 0 {
        Direction::In
    } else {
        Direction::Out
    };
    let ep = u32::from(endpoint & 0x1f).min(16);
    let length = (usize::from(length) * max_transfer / 255) as u32;
    let iso = ep < 16 && endpoint_type(ep as u8 | direction.ep_bit()) == Some(TransferType::Isochronous);
    let packets: Vec<IsoPacket> = if iso {
        let count = u32::from(extra >> 4).min(length);
        (0..count)
            .map(|i| IsoPacket {
                offset: i * (length / count.max(1)),
                length: length / count.max(1),
                ..IsoPacket::default()
            })
            .collect()
    } else {
        Vec::new()
    };
    let cmd = CmdSubmit {
        seqnum: u32::from(seqnum),
        devid: 0,
        direction,
        ep,
        transfer_flags: u32::from(extra & 1), // URB_SHORT_NOT_OK
        transfer_buffer_length: length,
        start_frame: 0,
        number_of_packets: if iso { packets.len() as u32 } else { u32::MAX },
        interval: 0,
        setup: SETUPS[usize::from(extra >> 1) % SETUPS.len()],
    };
    let payload = vec![0x5a; length as usize];
    cmd.encode(&payload, &packets, frame);
}

/// Hands the client up to `room` bytes of output, in vectored writes of
/// a few slices, and checks the replies that arrived whole.
fn transmit(
    session: &mut UrbSession,
    client: &mut Client,
    now: Instant,
    room: usize,
) -> Result<(), usbwire_server::SessionError> {
    let mut left = room;
    for _ in 0..100_000 {
        if left == 0 || !session.has_output() {
            break;
        }
        let mut slices = [IoSlice::new(&[]); 8];
        let used = session.poll_transmit(&mut slices);
        let mut n = 0;
        for s in &slices[..used] {
            let take = s.len().min(left - n);
            if !client.ambiguous {
                client.received.extend_from_slice(&s[..take]);
            }
            n += take;
        }
        left -= n;
        session.transmitted(now, n)?;
    }
    client.check_replies();
    Ok(())
}

fuzz_target!(|input: &[u8]| {
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    run(input, baseline);
});
