//! A Gadget Zero for correctness tests and benchmarks.
//!
//! Interface 0 is the kernel's SourceSink function (f_sourcesink.c) as
//! Linux's `usbtest` driver expects it at VID:PID 0525:a4a0: alternate
//! setting 0 has a bulk IN source and a bulk OUT sink, alternate setting 1
//! adds an isochronous source and sink, and the vendor requests 0x5b/0x5c
//! write and read back a control buffer. The source sends the configured
//! [`Pattern`] and the sink checks it, halting on data that breaks it.
//!
//! Interface 1 is this project's own: a message-preserving loopback and an
//! interrupt endpoint fed on request. Faults can be scripted for a chosen
//! transfer on any of the bulk and interrupt endpoints, so that a test can
//! check what the whole stack does with a STALL, an error or a short packet
//! at an exact point rather than whenever a real device happens to
//! misbehave. usbtest binds interface 1 too (it matches the whole device)
//! but only ever tests interface 0, and nothing it does reaches interface 1.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use usbwire_proto::{Errno, IsoPacket, SetupPacket, Speed};
use usbwire_usb::{Recipient, Request, RequestType};

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

/// Bulk IN source (interface 0): the pattern, always a full buffer.
pub const EP_SOURCE: u8 = 0x81;
/// Bulk OUT sink (interface 0): everything accepted, counted and checked.
pub const EP_SINK: u8 = 0x02;
/// Isochronous IN source (interface 0, alternate setting 1).
pub const EP_ISO_IN: u8 = 0x86;
/// Isochronous OUT sink (interface 0, alternate setting 1).
pub const EP_ISO_OUT: u8 = 0x06;
/// Bulk IN side of the loopback (interface 1).
pub const EP_LOOP_IN: u8 = 0x83;
/// Bulk OUT side of the loopback (interface 1): one transfer, one message.
pub const EP_LOOP_OUT: u8 = 0x04;
/// Interrupt IN (interface 1), fed by [`vendor::INTERRUPT_DATA`].
pub const EP_INTERRUPT: u8 = 0x85;

/// Interface 0, f_sourcesink's.
pub const INTERFACE_SOURCE_SINK: u8 = 0;
/// Interface 1: loopback and interrupt.
pub const INTERFACE_LOOPBACK: u8 = 1;
/// The alternate setting of interface 0 with the isochronous endpoints.
pub const ALT_ISO: u8 = 1;

/// Vendor requests, device recipient. Gadget Zero's are 0x5b and 0x5c
/// (the only vendor requests usbtest sends); this project's own stay
/// below them.
pub mod vendor {
    /// OUT, 8 bytes: wValue endpoint, wIndex n, data `[kind, 0, 0, 0, param u32 LE]`.
    pub const FAULT: u8 = 0x01;
    /// OUT, no data.
    pub const CLEAR_FAULTS: u8 = 0x02;
    /// OUT, up to [`super::INTERRUPT_MAX`] bytes: one interrupt report.
    pub const INTERRUPT_DATA: u8 = 0x03;
    /// IN: [`super::Stats`] as [`super::Stats::LEN`] little-endian bytes.
    pub const STATS: u8 = 0x04;
    /// Gadget Zero's control write test: OUT, wValue and wIndex 0, up to
    /// [`super::CONTROL_BUF_LEN`] bytes, kept in the control buffer.
    pub const CONTROL_WRITE: u8 = 0x5b;
    /// Gadget Zero's control read test: IN, wValue and wIndex 0, wLength
    /// bytes of the control buffer, whatever was last written there.
    pub const CONTROL_READ: u8 = 0x5c;

    pub const FAULT_STALL: u8 = 1;
    pub const FAULT_ERROR: u8 = 2;
    pub const FAULT_SHORT: u8 = 3;
}

/// The control buffer of CONTROL_WRITE/CONTROL_READ: the size of a gadget's
/// ep0 buffer (USB_COMP_EP0_BUFSIZ); longer requests STALL.
pub const CONTROL_BUF_LEN: usize = 4096;
/// Largest interrupt report (the endpoint's max packet).
pub const INTERRUPT_MAX: usize = 64;
/// Loopback bounds: messages and bytes held before OUT waits.
pub const LOOP_MAX_MESSAGES: usize = 64;
pub const LOOP_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Interrupt reports held before INTERRUPT_DATA is refused.
pub const INTERRUPT_MAX_QUEUED: usize = 64;
/// Faults scheduled at once.
pub const MAX_FAULTS: usize = 64;

/// Linux's EMSGSIZE, what usbcore answers for an isochronous packet larger
/// than the endpoint can carry in one interval.
const EMSGSIZE: Errno = Errno(90);

/// The endpoints faults can target, in the order of the per-endpoint tables.
const ENDPOINTS: [u8; 5] = [EP_SOURCE, EP_SINK, EP_LOOP_IN, EP_LOOP_OUT, EP_INTERRUPT];

fn slot(ep: u8) -> Option<usize> {
    ENDPOINTS.iter().position(|&e| e == ep)
}

/// The data the source sends and the sink expects: f_sourcesink's `pattern`
/// attribute, and usbtest's module parameter of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pattern {
    /// 0: all zeros, what both sides use unless told otherwise.
    #[default]
    Zeros,
    /// 1: byte `i` of each transfer is `(i % wMaxPacketSize) % 63`, so it
    /// restarts at every packet; a lost, repeated or shifted packet shows.
    Mod63,
    /// 2: none. The source sends its buffer as the server handed it over
    /// (zeros, or this connection's own earlier data) and the sink checks
    /// nothing: only the transport is measured.
    None,
}

impl Pattern {
    /// The value of f_sourcesink's `pattern` attribute: 0, 1 or 2.
    pub fn from_attribute(v: u8) -> Option<Pattern> {
        match v {
            0 => Some(Pattern::Zeros),
            1 => Some(Pattern::Mod63),
            2 => Some(Pattern::None),
            _ => None,
        }
    }

    pub fn attribute(self) -> u8 {
        match self {
            Pattern::Zeros => 0,
            Pattern::Mod63 => 1,
            Pattern::None => 2,
        }
    }

    fn table(self) -> Option<&'static [u8; TABLE_LEN]> {
        match self {
            Pattern::Zeros => Some(&ZEROS),
            Pattern::Mod63 => Some(&MOD63),
            Pattern::None => None,
        }
    }

    /// Fills `buf`, one transfer's data from its first byte, for an
    /// endpoint whose packets are `max_packet` bytes.
    pub fn fill(self, buf: &mut [u8], max_packet: usize) {
        match self {
            Pattern::Zeros => buf.fill(0),
            Pattern::Mod63 => {
                for packet in buf.chunks_mut(max_packet.max(1)) {
                    for c in packet.chunks_mut(TABLE_LEN) {
                        c.copy_from_slice(&MOD63[..c.len()]);
                    }
                }
            }
            Pattern::None => {}
        }
    }

    /// Checks one transfer's data; `Err` has the offset of the first byte
    /// that breaks the pattern.
    pub fn check(self, data: &[u8], max_packet: usize) -> Result<(), usize> {
        let Some(table) = self.table() else {
            return Ok(());
        };
        let mut at = 0;
        for packet in data.chunks(max_packet.max(1)) {
            for c in packet.chunks(TABLE_LEN) {
                if c != &table[..c.len()] {
                    let i = c.iter().zip(table).position(|(a, b)| a != b);
                    return Err(at + i.unwrap_or(0));
                }
                at += c.len();
            }
        }
        Ok(())
    }
}

/// A whole number of 63-byte periods, so that copying it back to back
/// continues the pattern: filling a packet is a few memcpys.
const TABLE_LEN: usize = 63 * 16;
static MOD63: [u8; TABLE_LEN] = {
    let mut t = [0u8; TABLE_LEN];
    let mut i = 0;
    while i < TABLE_LEN {
        t[i] = (i % 63) as u8;
        i += 1;
    }
    t
};
static ZEROS: [u8; TABLE_LEN] = [0; TABLE_LEN];

/// How the device is built. The defaults are f_sourcesink's, so that a host
/// sees what a configfs SourceSink gadget with default attributes shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestConfig {
    pub pattern: Pattern,
    /// bInterval of the isochronous endpoints: every 2^(n-1) microframes,
    /// 1..=16 (f_sourcesink's `isoc_interval`, default 4).
    pub isoc_interval: u8,
    /// Bytes per transaction of the isochronous endpoints, up to 1024
    /// (`isoc_maxpacket`, default 1024).
    pub isoc_maxpacket: u16,
    /// Extra transactions per microframe, 0..=2 (`isoc_mult`, default 0).
    pub isoc_mult: u8,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            pattern: Pattern::Zeros,
            isoc_interval: 4,
            isoc_maxpacket: 1024,
            isoc_mult: 0,
        }
    }
}

impl TestConfig {
    /// Out-of-range values brought into range, as f_sourcesink's bind does.
    fn clamped(mut self) -> Self {
        self.isoc_interval = self.isoc_interval.clamp(1, 16);
        self.isoc_maxpacket = self.isoc_maxpacket.min(1024);
        self.isoc_mult = self.isoc_mult.min(2);
        self
    }

    /// wMaxPacketSize of the isochronous endpoints, transactions in bits 11..12.
    fn iso_w_max_packet_size(&self) -> u16 {
        self.isoc_maxpacket | u16::from(self.isoc_mult) << 11
    }

    /// What the isochronous source sends, and the sink takes at most, in
    /// one interval: one packet of a URB.
    fn iso_bytes_per_interval(&self) -> usize {
        usize::from(self.isoc_maxpacket) * (usize::from(self.isoc_mult) + 1)
    }
}

/// What happens to a scripted transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The transfer fails with -EPIPE; the core halts the endpoint until
    /// CLEAR_FEATURE(ENDPOINT_HALT).
    Stall,
    /// The transfer fails with this errno (e.g. EPROTO), no halt.
    Error(Errno),
    /// The transfer moves at most this many bytes: an IN delivers a short
    /// packet (taking only that much from a loopback message), an OUT
    /// accepts only that much.
    Short(u32),
}
impl Fault {
    /// The 8-byte data stage of a FAULT request.
    pub fn to_bytes(self) -> [u8; 8] {
        let (kind, param) = match self {
            Fault::Stall => (vendor::FAULT_STALL, 0),
            Fault::Error(e) => (vendor::FAULT_ERROR, e.0 as u32),
            Fault::Short(n) => (vendor::FAULT_SHORT, n),
        };
        let p = param.to_le_bytes();
        [kind, 0, 0, 0, p[0], p[1], p[2], p[3]]
    }

    /// Parses a FAULT data stage; errnos must be in Linux's range 1..=4095.
    pub fn from_bytes(b: &[u8]) -> Option<Fault> {
        let b: &[u8; 8] = b.try_into().ok()?;
        let param = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        match b[0] {
            vendor::FAULT_STALL => Some(Fault::Stall),
            vendor::FAULT_ERROR if (1..=4095).contains(&param) => {
                Some(Fault::Error(Errno(param as i32)))
            }
            vendor::FAULT_SHORT => Some(Fault::Short(param)),
            _ => None,
        }
    }

    /// The setup packet and data stage that schedule this fault over the
    /// wire, for clients driving the device through a real host stack.
    pub fn request(self, ep: u8, nth: u16) -> (SetupPacket, [u8; 8]) {
        (
            SetupPacket {
                request_type: 0x40,
                request: vendor::FAULT,
                value: u16::from(ep),
                index: nth,
                length: 8,
            },
            self.to_bytes(),
        )
    }
}

/// Running counters, as STATS returns them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes_sourced: u64,
    pub bytes_sunk: u64,
    pub loopback_bytes_in: u64,
    pub loopback_bytes_out: u64,
    pub interrupt_reports: u64,
    pub faults_fired: u64,
    pub iso_bytes_sourced: u64,
    pub iso_bytes_sunk: u64,
}

impl Stats {
    pub const LEN: usize = 64;

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let v = [
            self.bytes_sourced,
            self.bytes_sunk,
            self.loopback_bytes_in,
            self.loopback_bytes_out,
            self.interrupt_reports,
            self.faults_fired,
            self.iso_bytes_sourced,
            self.iso_bytes_sunk,
        ];
        for (chunk, x) in out.chunks_exact_mut(8).zip(v) {
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<Stats> {
        if b.len() < Self::LEN {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Some(Stats {
            bytes_sourced: u(0),
            bytes_sunk: u(1),
            loopback_bytes_in: u(2),
            loopback_bytes_out: u(3),
            interrupt_reports: u(4),
            faults_fired: u(5),
            iso_bytes_sourced: u(6),
            iso_bytes_sunk: u(7),
        })
    }
}

struct Scheduled {
    slot: usize,
    /// The endpoint's transfer number the fault applies to.
    target: u64,
    fault: Fault,
}

/// The test device function.
pub struct TestDevice {
    descriptors: Descriptors,
    config: TestConfig,
    /// Whether a configuration is set: Gadget Zero answers its vendor
    /// requests only then (the composite framework has no function before).
    configured: bool,
    /// CONTROL_WRITE's data, for CONTROL_READ.
    control_buf: Vec<u8>,
    /// The sink saw data that breaks the pattern: the sink halts after the
    /// transfer that brought it.
    sink_broken: bool,
    stats: Stats,
    faults: Vec<Scheduled>,
    /// Transfers completed per endpoint (by the function; ones the core
    /// refused never got here), which is what fault targets count.
    transfers: [u64; ENDPOINTS.len()],
    loop_msgs: VecDeque<Vec<u8>>,
    /// How much of the head message earlier INs already took.
    loop_head_off: usize,
    loop_bytes: usize,
    loop_in_waker: Option<Waker>,
    loop_out_waker: Option<Waker>,
    interrupts: VecDeque<Vec<u8>>,
    interrupt_waker: Option<Waker>,
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

impl Default for TestDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDevice {
    /// f_sourcesink's defaults: zeros, isochronous 1024 bytes every 8
    /// microframes.
    pub fn new() -> Self {
        Self::with_config(TestConfig::default())
    }

    pub fn with_pattern(pattern: Pattern) -> Self {
        Self::with_config(TestConfig {
            pattern,
            ..TestConfig::default()
        })
    }

    pub fn with_config(config: TestConfig) -> Self {
        let config = config.clamped();
        TestDevice {
            descriptors: build_descriptors(&config),
            config,
            configured: false,
            control_buf: vec![0; CONTROL_BUF_LEN],
            sink_broken: false,
            stats: Stats::default(),
            faults: Vec::new(),
            transfers: [0; ENDPOINTS.len()],
            loop_msgs: VecDeque::new(),
            loop_head_off: 0,
            loop_bytes: 0,
            loop_in_waker: None,
            loop_out_waker: None,
            interrupts: VecDeque::new(),
            interrupt_waker: None,
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn config(&self) -> TestConfig {
        self.config
    }

    /// Makes the `nth` upcoming transfer on `ep` (0 = the next one) fail or
    /// come up short. A fault already scheduled for that transfer is
    /// replaced. An unknown endpoint or a full list is logged and ignored;
    /// [`TestDevice::try_schedule_fault`] reports them instead.
    pub fn schedule_fault(&mut self, ep: u8, nth: u32, fault: Fault) {
        if let Err(e) = self.try_schedule_fault(ep, nth, fault) {
            tracing::warn!(ep, nth, ?fault, error = %e, "test device: fault not scheduled");
        }
    }

    pub fn try_schedule_fault(&mut self, ep: u8, nth: u32, fault: Fault) -> Result<(), Errno> {
        let slot = slot(ep).ok_or(Errno::EINVAL)?;
        if let Fault::Error(e) = fault {
            if !(1..=4095).contains(&e.0) {
                return Err(Errno::EINVAL);
            }
        }
        let target = self.transfers[slot] + u64::from(nth);
        if let Some(f) = self
            .faults
            .iter_mut()
            .find(|f| f.slot == slot && f.target == target)
        {
            f.fault = fault;
            return Ok(());
        }
        if self.faults.len() >= MAX_FAULTS {
            return Err(Errno::ENOSPC);
        }
        self.faults.push(Scheduled {
            slot,
            target,
            fault,
        });
        Ok(())
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Queues one report for the interrupt endpoint.
    pub fn inject_interrupt(&mut self, data: &[u8]) -> Result<(), Errno> {
        if data.len() > INTERRUPT_MAX || self.interrupts.len() >= INTERRUPT_MAX_QUEUED {
            return Err(Errno::EPIPE);
        }
        self.interrupts.push_back(data.to_vec());
        wake(&mut self.interrupt_waker);
        Ok(())
    }

    /// The fault for the transfer now starting on `slot`. STALL and ERROR
    /// fire at once (the host sees them whether or not data is there) and
    /// count as the transfer; SHORT gives a limit, consumed in `finish`.
    fn begin(&mut self, slot: usize) -> Result<Option<usize>, Errno> {
        let target = self.transfers[slot];
        let Some(i) = self
            .faults
            .iter()
            .position(|f| f.slot == slot && f.target == target)
        else {
            return Ok(None);
        };
        match self.faults[i].fault {
            Fault::Short(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            Fault::Stall => {
                self.fire(i, slot);
                Err(Errno::EPIPE)
            }
            Fault::Error(e) => {
                self.fire(i, slot);
                Err(e)
            }
        }
    }

    fn fire(&mut self, i: usize, slot: usize) {
        self.faults.swap_remove(i);
        self.transfers[slot] += 1;
        self.stats.faults_fired += 1;
    }

    /// Counts a completed transfer and retires a SHORT fault it used.
    fn finish(&mut self, slot: usize, r: Poll<Result<usize, Errno>>) -> Poll<Result<usize, Errno>> {
        if r.is_ready() {
            let target = self.transfers[slot];
            if let Some(i) = self
                .faults
                .iter()
                .position(|f| f.slot == slot && f.target == target)
            {
                self.fire(i, slot);
            } else {
                self.transfers[slot] += 1;
            }
        }
        r
    }

    fn loop_in(
        &mut self,
        buf: &mut [u8],
        limit: usize,
        cx: &Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        let Some(head) = self.loop_msgs.front() else {
            park(&mut self.loop_in_waker, cx);
            return Poll::Pending;
        };
        let rest = &head[self.loop_head_off..];
        let n = rest.len().min(buf.len()).min(limit);
        buf[..n].copy_from_slice(&rest[..n]);
        self.loop_head_off += n;
        if self.loop_head_off == head.len() {
            self.loop_bytes -= head.len();
            self.loop_msgs.pop_front();
            self.loop_head_off = 0;
            wake(&mut self.loop_out_waker);
        }
        self.stats.loopback_bytes_out += n as u64;
        Poll::Ready(Ok(n))
    }

    fn loop_out(&mut self, data: &[u8], cx: &Context<'_>) -> Poll<Result<usize, Errno>> {
        // An empty queue takes a message of any size (the server bounds
        // transfers), or one too large for the byte bound would wait forever.
        let full = self.loop_msgs.len() >= LOOP_MAX_MESSAGES
            || (!self.loop_msgs.is_empty() && self.loop_bytes + data.len() > LOOP_MAX_BYTES);
        if full {
            park(&mut self.loop_out_waker, cx);
            return Poll::Pending;
        }
        self.loop_msgs.push_back(data.to_vec());
        self.loop_bytes += data.len();
        self.stats.loopback_bytes_in += data.len() as u64;
        wake(&mut self.loop_in_waker);
        Poll::Ready(Ok(data.len()))
    }

    fn interrupt_in(
        &mut self,
        buf: &mut [u8],
        limit: usize,
        cx: &Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        let Some(report) = self.interrupts.pop_front() else {
            park(&mut self.interrupt_waker, cx);
            return Poll::Pending;
        };
        if report.len() > buf.len() {
            // A report is one packet; a smaller buffer is babble.
            return Poll::Ready(Err(Errno::EOVERFLOW));
        }
        let n = report.len().min(limit);
        buf[..n].copy_from_slice(&report[..n]);
        self.stats.interrupt_reports += 1;
        Poll::Ready(Ok(n))
    }

    fn vendor_out(&mut self, s: &SetupPacket, data: &[u8]) -> Result<(), Errno> {
        match s.request {
            vendor::FAULT => {
                let fault = Fault::from_bytes(data).ok_or(Errno::EPIPE)?;
                if s.value > 0xff {
                    return Err(Errno::EPIPE);
                }
                self.try_schedule_fault(s.value as u8, u32::from(s.index), fault)
                    .map_err(|_| Errno::EPIPE)
            }
            vendor::CLEAR_FAULTS => {
                self.clear_faults();
                Ok(())
            }
            vendor::INTERRUPT_DATA => self.inject_interrupt(data),
            vendor::CONTROL_WRITE => {
                self.control_check(s)?;
                let n = data.len().min(usize::from(s.length));
                self.control_buf[..n].copy_from_slice(&data[..n]);
                Ok(())
            }
            _ => Err(Errno::EPIPE),
        }
    }

    /// What f_sourcesink's setup handler refuses for 0x5b/0x5c: any wValue
    /// or wIndex, more than its ep0 buffer, or no configuration yet.
    fn control_check(&self, s: &SetupPacket) -> Result<(), Errno> {
        if !self.configured || s.value != 0 || s.index != 0 || s.length as usize > CONTROL_BUF_LEN {
            return Err(Errno::EPIPE);
        }
        Ok(())
    }

    /// The sink: counted, and checked against the pattern.
    fn sink(&mut self, data: &[u8]) -> Poll<Result<usize, Errno>> {
        self.stats.bytes_sunk += data.len() as u64;
        let max_packet = usize::from(descriptors::bulk_max_packet(self.descriptors.speed));
        if let Err(at) = self.config.pattern.check(data, max_packet) {
            tracing::warn!(
                offset = at,
                byte = data[at],
                pattern = self.config.pattern.attribute(),
                "test device: bad OUT byte on the sink, halting it"
            );
            self.sink_broken = true;
        }
        Poll::Ready(Ok(data.len()))
    }
}

fn build_descriptors(config: &TestConfig) -> Descriptors {
    let speed = Speed::High;
    let bulk = descriptors::bulk_max_packet(speed);
    let iso = |ep| {
        descriptors::endpoint(
            ep,
            TransferType::Isochronous,
            config.iso_w_max_packet_size(),
            config.isoc_interval,
        )
    };
    let mut body = Vec::with_capacity(3 * 9 + 9 * 7);
    // Interface 0 as f_sourcesink describes it, string 4.
    body.extend_from_slice(&descriptors::interface(0, 0, 2, 0xff, 0, 0, 4));
    body.extend_from_slice(&descriptors::endpoint(
        EP_SOURCE,
        TransferType::Bulk,
        bulk,
        0,
    ));
    body.extend_from_slice(&descriptors::endpoint(EP_SINK, TransferType::Bulk, bulk, 0));
    body.extend_from_slice(&descriptors::interface(0, ALT_ISO, 4, 0xff, 0, 0, 4));
    body.extend_from_slice(&descriptors::endpoint(
        EP_SOURCE,
        TransferType::Bulk,
        bulk,
        0,
    ));
    body.extend_from_slice(&descriptors::endpoint(EP_SINK, TransferType::Bulk, bulk, 0));
    body.extend_from_slice(&iso(EP_ISO_IN));
    body.extend_from_slice(&iso(EP_ISO_OUT));
    // Interface 1, this project's, string 5.
    body.extend_from_slice(&descriptors::interface(1, 0, 3, 0xff, 0, 0, 5));
    for ep in [EP_LOOP_IN, EP_LOOP_OUT] {
        body.extend_from_slice(&descriptors::endpoint(ep, TransferType::Bulk, bulk, 0));
    }
    body.extend_from_slice(&descriptors::endpoint(
        EP_INTERRUPT,
        TransferType::Interrupt,
        INTERRUPT_MAX as u16,
        1,
    ));
    Descriptors::new(
        speed,
        DeviceDescriptor {
            usb_version: 0x0200,
            class: 0,
            subclass: 0,
            protocol: 0,
            max_packet_size0: 64,
            vendor_id: 0x0525,
            product_id: 0xa4a0,
            device_version: 0x0100,
            manufacturer: Some("usbwire".into()),
            product: Some("usbwire test device".into()),
            serial: Some("0001".into()),
        },
        0,
        100,
        &body,
        &["source and sink data", "loopback and interrupt"],
    )
}

fn is_vendor_device(s: &SetupPacket) -> bool {
    let r = Request::from(s);
    r.request_type == RequestType::Vendor && r.recipient == Recipient::Device
}

impl Function for TestDevice {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control_in(&mut self, s: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        if !is_vendor_device(s) {
            return None;
        }
        match s.request {
            vendor::STATS => {
                let b = self.stats.to_bytes();
                let n = crate::core::reply(&b, buf);
                Some(Ok(n))
            }
            vendor::CONTROL_READ => Some(self.control_check(s).map(|()| {
                let n = buf.len().min(usize::from(s.length));
                crate::core::reply(&self.control_buf[..n], buf)
            })),
            _ => None,
        }
    }

    fn control_out(&mut self, s: &SetupPacket, data: &[u8]) -> Option<Result<(), Errno>> {
        if !is_vendor_device(s) {
            return None;
        }
        match s.request {
            vendor::FAULT
            | vendor::CLEAR_FAULTS
            | vendor::INTERRUPT_DATA
            | vendor::CONTROL_WRITE => Some(self.vendor_out(s, data)),
            _ => None,
        }
    }

    fn transfer_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        let Some(slot) = slot(ep).filter(|_| ep & 0x80 != 0) else {
            return Poll::Ready(Err(Errno::EPIPE));
        };
        let limit = match self.begin(slot) {
            Ok(l) => l.unwrap_or(usize::MAX),
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = match ep {
            EP_SOURCE => {
                let n = buf.len().min(limit);
                let max_packet = usize::from(descriptors::bulk_max_packet(self.descriptors.speed));
                self.config.pattern.fill(&mut buf[..n], max_packet);
                self.stats.bytes_sourced += n as u64;
                Poll::Ready(Ok(n))
            }
            EP_LOOP_IN => self.loop_in(buf, limit, cx),
            _ => self.interrupt_in(buf, limit, cx),
        };
        self.finish(slot, r)
    }

    fn transfer_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        let Some(slot) = slot(ep).filter(|_| ep & 0x80 == 0) else {
            return Poll::Ready(Err(Errno::EPIPE));
        };
        let data = match self.begin(slot) {
            Ok(Some(l)) => &data[..data.len().min(l)],
            Ok(None) => data,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let r = if ep == EP_SINK {
            self.sink(data)
        } else {
            self.loop_out(data, cx)
        };
        self.finish(slot, r)
    }

    fn iso_in(&mut self, ep: u8, packets: &mut [IsoPacket], buf: &mut [u8]) -> Result<(), Errno> {
        if ep != EP_ISO_IN {
            return Err(Errno::EPIPE);
        }
        // f_sourcesink queues requests of one interval's worth, each filled
        // from its start against the raw wMaxPacketSize. The whole URB
        // completes at once rather than one packet per interval: across
        // USB/IP only the timing could tell, and no host driver relies on
        // it (usbtest's ISO tests count packets and bytes).
        let n = self.config.iso_bytes_per_interval();
        let period = usize::from(self.config.iso_w_max_packet_size());
        for p in packets {
            if (p.length as usize) < n {
                // The device sends its whole packet whatever the host has
                // room for: babble, and the packet's data is lost.
                p.actual_length = 0;
                p.status = Errno::EOVERFLOW.to_status();
                continue;
            }
            let at = p.offset as usize;
            self.config.pattern.fill(&mut buf[at..at + n], period);
            p.actual_length = n as u32;
            p.status = 0;
            self.stats.iso_bytes_sourced += n as u64;
        }
        Ok(())
    }

    fn iso_out(&mut self, ep: u8, packets: &mut [IsoPacket], _buf: &[u8]) -> Result<(), Errno> {
        if ep != EP_ISO_OUT {
            return Err(Errno::EPIPE);
        }
        // Like f_sourcesink's isochronous sink: taken, not checked.
        let n = self.config.iso_bytes_per_interval();
        for p in packets {
            if p.length as usize > n {
                p.actual_length = 0;
                p.status = EMSGSIZE.to_status();
            } else {
                p.actual_length = p.length;
                p.status = 0;
                self.stats.iso_bytes_sunk += u64::from(p.length);
            }
        }
        Ok(())
    }

    fn halt_after(&mut self, ep: u8) -> bool {
        ep == EP_SINK && std::mem::take(&mut self.sink_broken)
    }

    fn set_configuration(&mut self, config: u8) {
        self.configured = config != 0;
    }

    fn reset(&mut self) {
        // Queued data is dropped; scheduled faults and transfer counts are
        // kept, because a test schedules them before import and enumeration
        // resets the device.
        self.configured = false;
        self.sink_broken = false;
        self.loop_msgs.clear();
        self.loop_head_off = 0;
        self.loop_bytes = 0;
        self.interrupts.clear();
        wake(&mut self.loop_out_waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EmulatedDevice;
    use crate::test_util::{setup, CountWaker};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn configured() -> EmulatedDevice {
        configured_with(Pattern::Zeros)
    }

    fn configured_with(pattern: Pattern) -> EmulatedDevice {
        let mut dev = EmulatedDevice::new(TestDevice::with_pattern(pattern));
        dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
        dev
    }

    fn mod63(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i % 512) % 63) as u8).collect()
    }

    fn noop_cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    fn stats(dev: &mut EmulatedDevice) -> Stats {
        let mut buf = [0u8; 64];
        let n = dev
            .control(&setup(0xc0, vendor::STATS, 0, 0, 64), &[], &mut buf)
            .unwrap();
        assert_eq!(n, Stats::LEN);
        Stats::from_bytes(&buf[..n]).unwrap()
    }

    fn fault(dev: &mut EmulatedDevice, ep: u8, nth: u16, f: Fault) -> Result<usize, Errno> {
        let (s, data) = f.request(ep, nth);
        dev.control(&s, &data, &mut [])
    }

    #[test]
    fn descriptors_are_gadget_zero_plus_the_loopback_interface() {
        let dev = configured();
        let d = dev.descriptors();
        assert_eq!(d.speed, Speed::High);
        let dd = d.device_bytes();
        assert_eq!(dd[2..4], [0x00, 0x02], "bcdUSB 2.00");
        assert_eq!(dd[8..12], [0x25, 0x05, 0xa0, 0xa4]);
        let c = &d.configuration;
        assert_eq!(c.len(), 9 + 9 + 2 * 7 + 9 + 4 * 7 + 9 + 3 * 7);
        assert_eq!(
            c[2..5],
            [c.len() as u8, 0, 2],
            "wTotalLength, two interfaces"
        );
        // Interface 0 alt 0: f_sourcesink's, bulk source then sink.
        let mut at = 9;
        assert_eq!(c[at..at + 9], [9, 4, 0, 0, 2, 0xff, 0, 0, 4]);
        at += 9;
        assert_eq!(c[at..at + 7], [7, 5, 0x81, 2, 0x00, 0x02, 0]);
        assert_eq!(c[at + 7..at + 14], [7, 5, 0x02, 2, 0x00, 0x02, 0]);
        at += 14;
        // Alt 1: the same plus isochronous source and sink, 1024 bytes
        // every 2^(4-1) microframes (isoc_maxpacket, isoc_interval).
        assert_eq!(c[at..at + 9], [9, 4, 0, 1, 4, 0xff, 0, 0, 4]);
        at += 9;
        assert_eq!(c[at..at + 7], [7, 5, 0x81, 2, 0x00, 0x02, 0]);
        assert_eq!(c[at + 7..at + 14], [7, 5, 0x02, 2, 0x00, 0x02, 0]);
        assert_eq!(c[at + 14..at + 21], [7, 5, 0x86, 1, 0x00, 0x04, 4]);
        assert_eq!(c[at + 21..at + 28], [7, 5, 0x06, 1, 0x00, 0x04, 4]);
        at += 28;
        // Interface 1: loopback and interrupt.
        assert_eq!(c[at..at + 9], [9, 4, 1, 0, 3, 0xff, 0, 0, 5]);
        at += 9;
        assert_eq!(c[at..at + 7], [7, 5, 0x83, 2, 0x00, 0x02, 0]);
        assert_eq!(c[at + 7..at + 14], [7, 5, 0x04, 2, 0x00, 0x02, 0]);
        assert_eq!(c[at + 14..at + 21], [7, 5, 0x85, 3, 64, 0, 1]);
        assert_eq!(d.string(4).unwrap()[2..6], [b's', 0, b'o', 0]);
        assert_eq!(d.string(5).unwrap()[2..6], [b'l', 0, b'o', 0]);
        // In alt 0 the isochronous endpoints do not exist.
        assert_eq!(dev.endpoint_type(EP_ISO_IN), None);
        assert_eq!(dev.endpoint_type(EP_LOOP_IN), Some(TransferType::Bulk));
    }

    #[test]
    fn other_speed_configuration_has_full_speed_packets() {
        let mut dev = configured();
        let mut o = vec![0u8; 255];
        let n = dev
            .control(&setup(0x80, 6, 0x0700, 0, 255), &[], &mut o)
            .unwrap();
        o.truncate(n);
        assert_eq!(n, dev.descriptors().configuration.len());
        assert_eq!(o[..2], [9, 7]);
        // Bulk 64, isochronous 1023 every 2^(1-1) frames, interrupt 64 every frame.
        let eps: Vec<&[u8]> = o.windows(7).filter(|w| w[..2] == [7, 5]).collect();
        let got: Vec<(u8, u16, u8)> = eps
            .iter()
            .map(|e| (e[2], u16::from_le_bytes([e[4], e[5]]), e[6]))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x81, 64, 0),
                (0x02, 64, 0),
                (0x81, 64, 0),
                (0x02, 64, 0),
                (0x86, 1023, 1),
                (0x06, 1023, 1),
                (0x83, 64, 0),
                (0x04, 64, 0),
                (0x85, 64, 1),
            ]
        );
    }

    #[test]
    fn iso_settings_follow_f_sourcesink_attributes() {
        let t = TestDevice::with_config(TestConfig {
            pattern: Pattern::Zeros,
            isoc_interval: 40,
            isoc_maxpacket: 2000,
            isoc_mult: 7,
        });
        // Clamped as f_sourcesink's bind does: 16, 1024, 2.
        let e = t
            .descriptors()
            .endpoints()
            .iter()
            .find(|e| e.address == EP_ISO_IN)
            .copied()
            .unwrap();
        assert_eq!((e.max_packet_size, e.interval), (1024 | 2 << 11, 16));
        assert_eq!(t.config().iso_bytes_per_interval(), 3072);
    }

    #[test]
    fn source_sends_the_pattern_of_each_transfer() {
        let mut cx = noop_cx();
        // Zeros, the default.
        let mut dev = configured();
        for len in [1usize, 511, 512, 513, 100_000] {
            let mut buf = vec![0xee; len];
            assert_eq!(
                dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
                Poll::Ready(Ok(len))
            );
            assert!(buf.iter().all(|&b| b == 0), "len {len}");
        }
        // mod63, restarting at every 512-byte packet and every transfer.
        let mut dev = configured_with(Pattern::Mod63);
        for len in [1usize, 62, 63, 64, 512, 1000, 100_000] {
            let mut buf = vec![0xee; len];
            assert_eq!(
                dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
                Poll::Ready(Ok(len))
            );
            let bad = buf
                .iter()
                .enumerate()
                .position(|(i, &b)| b != ((i % 512) % 63) as u8);
            assert_eq!(bad, None, "len {len}");
        }
        let mut buf = [0xee; 514];
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(514))
        );
        assert_eq!(buf[510..514], [6, 7, 0, 1]);
        // None: the buffer as the server handed it over.
        let mut dev = configured_with(Pattern::None);
        let mut buf = [0xee; 64];
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(64))
        );
        assert_eq!(buf, [0xee; 64]);
        assert_eq!(stats(&mut dev).bytes_sourced, 64);
    }

    #[test]
    fn pattern_check_finds_the_first_bad_byte() {
        let mut buf = vec![0u8; 3000];
        Pattern::Mod63.fill(&mut buf, 512);
        assert_eq!(Pattern::Mod63.check(&buf, 512), Ok(()));
        assert_eq!(Pattern::Zeros.check(&buf, 512), Err(1));
        // Continuing across the packet boundary is not the pattern.
        assert_eq!(Pattern::Mod63.check(&buf, 1024), Err(512));
        buf[2000] ^= 1;
        assert_eq!(Pattern::Mod63.check(&buf, 512), Err(2000));
        assert_eq!(Pattern::None.check(&buf, 512), Ok(()));
        assert_eq!(Pattern::Zeros.check(&[0; 5000], 512), Ok(()));
        assert_eq!(Pattern::Zeros.check(&[], 512), Ok(()));
        for v in 0..=2 {
            assert_eq!(Pattern::from_attribute(v).unwrap().attribute(), v);
        }
        assert_eq!(Pattern::from_attribute(3), None);
    }

    #[test]
    fn sink_takes_bad_data_then_halts_like_f_sourcesink() {
        let mut cx = noop_cx();
        for (pattern, good, bad) in [
            (Pattern::Zeros, vec![0u8; 1000], vec![7u8; 1000]),
            (Pattern::Mod63, mod63(1000), vec![0u8; 1000]),
        ] {
            let mut dev = configured_with(pattern);
            for _ in 0..3 {
                assert_eq!(dev.poll_out(EP_SINK, &good, &mut cx), Poll::Ready(Ok(1000)));
            }
            assert!(!dev.is_halted(EP_SINK));
            // The transfer that brings bad data succeeds, the next one stalls.
            assert_eq!(dev.poll_out(EP_SINK, &bad, &mut cx), Poll::Ready(Ok(1000)));
            assert!(dev.is_halted(EP_SINK), "{pattern:?}");
            assert_eq!(
                dev.poll_out(EP_SINK, &good, &mut cx),
                Poll::Ready(Err(Errno::EPIPE))
            );
            dev.control(&setup(0x02, 1, 0, u16::from(EP_SINK), 0), &[], &mut [])
                .unwrap();
            assert_eq!(dev.poll_out(EP_SINK, &good, &mut cx), Poll::Ready(Ok(1000)));
            assert!(!dev.is_halted(EP_SINK));
            assert_eq!(stats(&mut dev).bytes_sunk, 5000);
        }
        // None checks nothing; a zero-length transfer breaks no pattern.
        let mut dev = configured_with(Pattern::None);
        assert_eq!(
            dev.poll_out(EP_SINK, &[7; 24], &mut cx),
            Poll::Ready(Ok(24))
        );
        assert_eq!(dev.poll_out(EP_SINK, &[], &mut cx), Poll::Ready(Ok(0)));
        assert!(!dev.is_halted(EP_SINK));
        // Wrong direction or unknown endpoint: the core refuses.
        assert_eq!(
            dev.poll_in(0x82, &mut [0; 4], &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
    }

    #[test]
    fn control_write_then_read_back_as_gadget_zero() {
        let mut dev = configured();
        let write = |n: u16| setup(0x40, vendor::CONTROL_WRITE, 0, 0, n);
        let read = |n: u16| setup(0xc0, vendor::CONTROL_READ, 0, 0, n);
        for len in [1usize, 64, 65, 1000, CONTROL_BUF_LEN] {
            let data: Vec<u8> = (0..len).map(|j| (j + len) as u8).collect();
            assert_eq!(dev.control(&write(len as u16), &data, &mut []), Ok(len));
            let mut back = vec![0u8; len];
            assert_eq!(dev.control(&read(len as u16), &[], &mut back), Ok(len));
            assert_eq!(back, data, "len {len}");
        }
        // A read answers wLength bytes, whatever the last write left there.
        assert_eq!(dev.control(&write(2), &[0xaa, 0xbb], &mut []), Ok(2));
        let mut back = [0u8; 4];
        assert_eq!(dev.control(&read(4), &[], &mut back), Ok(4));
        assert_eq!(back, [0xaa, 0xbb, 2, 3]);
        // Too long, non-zero wValue or wIndex, the wrong recipient: STALL.
        let big = vec![0u8; CONTROL_BUF_LEN + 1];
        let n = CONTROL_BUF_LEN as u16 + 1;
        assert_eq!(dev.control(&write(n), &big, &mut []), Err(Errno::EPIPE));
        assert_eq!(
            dev.control(&read(n), &[], &mut vec![0; n.into()]),
            Err(Errno::EPIPE)
        );
        for s in [
            setup(0x40, vendor::CONTROL_WRITE, 1, 0, 1),
            setup(0x40, vendor::CONTROL_WRITE, 0, 1, 1),
            setup(0x41, vendor::CONTROL_WRITE, 0, 0, 1),
        ] {
            assert_eq!(dev.control(&s, &[1], &mut []), Err(Errno::EPIPE), "{s:?}");
        }
        for s in [
            setup(0xc0, vendor::CONTROL_READ, 1, 0, 1),
            setup(0xc0, vendor::CONTROL_READ, 0, 1, 1),
            setup(0xc1, vendor::CONTROL_READ, 0, 0, 1),
            // 0x5b is an OUT request, 0x5c an IN one.
            setup(0xc0, vendor::CONTROL_WRITE, 0, 0, 1),
        ] {
            assert_eq!(dev.control(&s, &[], &mut [0]), Err(Errno::EPIPE), "{s:?}");
        }
        assert_eq!(
            dev.control(&setup(0x40, vendor::CONTROL_READ, 0, 0, 1), &[1], &mut []),
            Err(Errno::EPIPE)
        );
        // The refused write changed nothing.
        assert_eq!(dev.control(&read(2), &[], &mut back[..2]), Ok(2));
        assert_eq!(back[..2], [0xaa, 0xbb]);
        // Gadget Zero has no function to answer before SET_CONFIGURATION.
        dev.reset();
        assert_eq!(dev.control(&write(1), &[1], &mut []), Err(Errno::EPIPE));
        assert_eq!(dev.control(&read(1), &[], &mut [0]), Err(Errno::EPIPE));
    }

    fn iso_packets(lengths: &[u32]) -> Vec<IsoPacket> {
        let mut offset = 0;
        lengths
            .iter()
            .map(|&length| {
                let p = IsoPacket {
                    offset,
                    length,
                    actual_length: 0xdead,
                    status: 0x7777,
                };
                offset += length;
                p
            })
            .collect()
    }

    #[test]
    fn iso_source_fills_each_packet_and_babbles_into_short_ones() {
        let mut dev = configured_with(Pattern::Mod63);
        let mut packets = iso_packets(&[1024, 1024]);
        let mut buf = vec![0xa5u8; 2048];
        // Only in alternate setting 1.
        assert_eq!(
            dev.iso_in(EP_ISO_IN, &mut packets, &mut buf),
            Err(Errno::EPIPE)
        );
        dev.control(&setup(0x01, 11, u16::from(ALT_ISO), 0, 0), &[], &mut [])
            .unwrap();
        assert_eq!(dev.iso_in(EP_ISO_IN, &mut packets, &mut buf), Ok(()));
        for p in &packets {
            assert_eq!((p.actual_length, p.status), (1024, 0));
        }
        // Each packet is one f_sourcesink request, its pattern from its start.
        let want: Vec<u8> = (0..2048).map(|i| ((i % 1024) % 63) as u8).collect();
        assert_eq!(buf, want);
        // A packet smaller than what the device sends per interval is
        // babble; a larger one is short. Neither fails the URB.
        let mut packets = iso_packets(&[1024, 100, 3000]);
        let mut buf = vec![0xa5u8; 4124];
        assert_eq!(dev.iso_in(EP_ISO_IN, &mut packets, &mut buf), Ok(()));
        let got: Vec<(u32, i32)> = packets
            .iter()
            .map(|p| (p.actual_length, p.status))
            .collect();
        assert_eq!(got, vec![(1024, 0), (0, -Errno::EOVERFLOW.0), (1024, 0)]);
        assert_eq!(
            buf[1024..1124],
            [0xa5; 100],
            "the babbled packet got nothing"
        );
        assert_eq!(buf[1124..1127], [0, 1, 2]);
        assert_eq!(stats(&mut dev).iso_bytes_sourced, 4 * 1024);
    }

    #[test]
    fn iso_sink_takes_packets_up_to_one_interval() {
        let mut dev = configured();
        dev.control(&setup(0x01, 11, u16::from(ALT_ISO), 0, 0), &[], &mut [])
            .unwrap();
        let mut packets = iso_packets(&[1024, 0, 512, 1025]);
        let buf = vec![0x5au8; 2561];
        assert_eq!(dev.iso_out(EP_ISO_OUT, &mut packets, &buf), Ok(()));
        let got: Vec<(u32, i32)> = packets
            .iter()
            .map(|p| (p.actual_length, p.status))
            .collect();
        assert_eq!(got, vec![(1024, 0), (0, 0), (512, 0), (0, -90)]);
        // Not checked against the pattern, as f_sourcesink's: no halt.
        assert!(!dev.is_halted(EP_ISO_OUT));
        assert_eq!(stats(&mut dev).iso_bytes_sunk, 1536);
        // The isochronous endpoints are not the bulk ones.
        assert_eq!(
            dev.iso_out(EP_SINK, &mut iso_packets(&[10]), &buf),
            Err(Errno::EPIPE)
        );
        // Back in alt 0 they are gone.
        dev.control(&setup(0x01, 11, 0, 0, 0), &[], &mut [])
            .unwrap();
        assert_eq!(
            dev.iso_out(EP_ISO_OUT, &mut iso_packets(&[10]), &buf),
            Err(Errno::EPIPE)
        );
    }

    #[test]
    fn loopback_keeps_message_boundaries_and_splits() {
        let mut dev = configured();
        let mut cx = noop_cx();
        let a: Vec<u8> = (0..100u8).collect();
        assert_eq!(dev.poll_out(EP_LOOP_OUT, &a, &mut cx), Poll::Ready(Ok(100)));
        assert_eq!(
            dev.poll_out(EP_LOOP_OUT, b"second", &mut cx),
            Poll::Ready(Ok(6))
        );
        assert_eq!(dev.poll_out(EP_LOOP_OUT, b"", &mut cx), Poll::Ready(Ok(0)));
        let mut buf = [0u8; 512];
        // Larger than the buffer: split across INs.
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf[..64], &mut cx),
            Poll::Ready(Ok(64))
        );
        assert_eq!(&buf[..64], &a[..64]);
        // The rest, short: the message boundary is kept.
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(36))
        );
        assert_eq!(&buf[..36], &a[64..]);
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(6))
        );
        assert_eq!(&buf[..6], b"second");
        // A zero-length message is a zero-length transfer, then nothing.
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(0))
        );
        assert!(dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx).is_pending());
        let s = stats(&mut dev);
        assert_eq!((s.loopback_bytes_in, s.loopback_bytes_out), (106, 106));
    }

    #[test]
    fn loopback_pending_wake_and_bound() {
        let mut dev = configured();
        let count = Arc::new(CountWaker(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 16];
        assert!(dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert_eq!(dev.poll_out(EP_LOOP_OUT, b"x", &mut cx), Poll::Ready(Ok(1)));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "pending IN woken by OUT");
        for _ in 1..LOOP_MAX_MESSAGES {
            assert_eq!(dev.poll_out(EP_LOOP_OUT, b"y", &mut cx), Poll::Ready(Ok(1)));
        }
        assert!(
            dev.poll_out(EP_LOOP_OUT, b"z", &mut cx).is_pending(),
            "64 messages"
        );
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(1))
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "pending OUT woken by IN");
        assert_eq!(dev.poll_out(EP_LOOP_OUT, b"z", &mut cx), Poll::Ready(Ok(1)));

        // Byte bound: an empty queue takes anything, then it must fit.
        let mut dev = configured();
        let big = vec![1u8; LOOP_MAX_BYTES];
        assert_eq!(
            dev.poll_out(EP_LOOP_OUT, &big, &mut cx),
            Poll::Ready(Ok(big.len()))
        );
        assert!(dev.poll_out(EP_LOOP_OUT, b"a", &mut cx).is_pending());
    }

    #[test]
    fn stall_fault_halts_until_clear_feature() {
        let mut dev = configured();
        let mut cx = noop_cx();
        let mut buf = [0u8; 64];
        assert_eq!(fault(&mut dev, EP_SOURCE, 2, Fault::Stall), Ok(8));
        // Transfers 0 and 1 are fine, transfer 2 stalls.
        for _ in 0..2 {
            assert_eq!(
                dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
                Poll::Ready(Ok(64))
            );
        }
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
        assert!(dev.is_halted(EP_SOURCE));
        // Halted by the core, no new fault involved.
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
        let mut st = [0u8; 2];
        dev.control(&setup(0x82, 0, 0, u16::from(EP_SOURCE), 2), &[], &mut st)
            .unwrap();
        assert_eq!(st, [1, 0], "GET_STATUS shows the halt");
        dev.control(&setup(0x02, 1, 0, u16::from(EP_SOURCE), 0), &[], &mut [])
            .unwrap();
        assert!(!dev.is_halted(EP_SOURCE));
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(64))
        );
        assert_eq!(stats(&mut dev).faults_fired, 1);
    }

    #[test]
    fn stall_fires_on_pending_endpoint_too() {
        let mut dev = configured();
        let mut cx = noop_cx();
        let mut buf = [0u8; 64];
        assert!(dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx).is_pending());
        assert_eq!(fault(&mut dev, EP_LOOP_IN, 0, Fault::Stall), Ok(8));
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
        // OUT side too.
        assert_eq!(fault(&mut dev, EP_LOOP_OUT, 0, Fault::Stall), Ok(8));
        assert_eq!(
            dev.poll_out(EP_LOOP_OUT, b"m", &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
        assert!(dev.is_halted(EP_LOOP_OUT));
    }

    #[test]
    fn error_fault_does_not_halt() {
        let mut dev = configured();
        let mut cx = noop_cx();
        assert_eq!(
            fault(&mut dev, EP_SINK, 1, Fault::Error(Errno::EPROTO)),
            Ok(8)
        );
        assert_eq!(
            dev.poll_out(EP_SINK, &[0; 10], &mut cx),
            Poll::Ready(Ok(10))
        );
        assert_eq!(
            dev.poll_out(EP_SINK, &[0; 10], &mut cx),
            Poll::Ready(Err(Errno::EPROTO))
        );
        assert!(!dev.is_halted(EP_SINK));
        assert_eq!(
            dev.poll_out(EP_SINK, &[0; 10], &mut cx),
            Poll::Ready(Ok(10))
        );
        assert_eq!(stats(&mut dev).bytes_sunk, 20);
    }

    #[test]
    fn short_fault_on_loopback_consumes_only_part() {
        let mut dev = configured();
        let mut cx = noop_cx();
        let mut buf = [0u8; 64];
        // Scheduled while the IN pends: the pending transfer is the target,
        // and it stays the target until it completes.
        assert!(dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx).is_pending());
        assert_eq!(fault(&mut dev, EP_LOOP_IN, 0, Fault::Short(3)), Ok(8));
        assert!(dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx).is_pending());
        assert_eq!(
            dev.poll_out(EP_LOOP_OUT, b"abcdefgh", &mut cx),
            Poll::Ready(Ok(8))
        );
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(3))
        );
        assert_eq!(&buf[..3], b"abc");
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(5))
        );
        assert_eq!(&buf[..5], b"defgh");
        // On the source, and on OUT.
        assert_eq!(fault(&mut dev, EP_SOURCE, 0, Fault::Short(10)), Ok(8));
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(10))
        );
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(64))
        );
        assert_eq!(fault(&mut dev, EP_LOOP_OUT, 0, Fault::Short(2)), Ok(8));
        assert_eq!(
            dev.poll_out(EP_LOOP_OUT, b"xyz", &mut cx),
            Poll::Ready(Ok(2))
        );
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(2))
        );
        assert_eq!(&buf[..2], b"xy");
        assert_eq!(stats(&mut dev).faults_fired, 3);
    }

    #[test]
    fn rust_api_faults_survive_reset_and_clear() {
        let mut t = TestDevice::new();
        t.schedule_fault(EP_SOURCE, 0, Fault::Error(Errno::EPROTO));
        t.schedule_fault(EP_SOURCE, 0, Fault::Error(Errno::ETIME)); // replaces
        assert_eq!(
            t.try_schedule_fault(0x86, 0, Fault::Stall),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            t.try_schedule_fault(EP_SOURCE, 0, Fault::Error(Errno(0))),
            Err(Errno::EINVAL)
        );
        for i in 1..MAX_FAULTS as u32 {
            t.try_schedule_fault(EP_SINK, i, Fault::Stall).unwrap();
        }
        assert_eq!(
            t.try_schedule_fault(EP_SINK, 999, Fault::Stall),
            Err(Errno::ENOSPC)
        );
        let mut dev = EmulatedDevice::new(t);
        dev.reset();
        dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
        let mut cx = noop_cx();
        let mut buf = [0u8; 8];
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Err(Errno::ETIME))
        );
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(8))
        );
        // CLEAR_FAULTS drops the rest.
        assert_eq!(
            dev.control(&setup(0x40, vendor::CLEAR_FAULTS, 0, 0, 0), &[], &mut []),
            Ok(0)
        );
        for _ in 0..3 {
            assert_eq!(dev.poll_out(EP_SINK, &[0], &mut cx), Poll::Ready(Ok(1)));
        }
    }

    #[test]
    fn bad_fault_requests_stall() {
        let mut dev = configured();
        let out = |kind: u8, param: u32| {
            let p = param.to_le_bytes();
            [kind, 0, 0, 0, p[0], p[1], p[2], p[3]]
        };
        let s = setup(0x40, vendor::FAULT, u16::from(EP_SOURCE), 0, 8);
        assert_eq!(
            dev.control(&s, &out(9, 0), &mut []),
            Err(Errno::EPIPE),
            "kind"
        );
        assert_eq!(
            dev.control(&s, &out(2, 0), &mut []),
            Err(Errno::EPIPE),
            "errno 0"
        );
        assert_eq!(
            dev.control(&s, &out(2, 5000), &mut []),
            Err(Errno::EPIPE),
            "errno range"
        );
        assert_eq!(
            dev.control(&s, &out(1, 0)[..7], &mut []),
            Err(Errno::EPIPE),
            "length"
        );
        let bad_ep = setup(0x40, vendor::FAULT, 0x86, 0, 8);
        assert_eq!(dev.control(&bad_ep, &out(1, 0), &mut []), Err(Errno::EPIPE));
        let wide_ep = setup(0x40, vendor::FAULT, 0x0181, 0, 8);
        assert_eq!(
            dev.control(&wide_ep, &out(1, 0), &mut []),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            dev.control(&setup(0x40, 0x77, 0, 0, 0), &[], &mut []),
            Err(Errno::EPIPE)
        );
        // Nothing was scheduled by the refused requests.
        let mut cx = noop_cx();
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut [0; 4], &mut cx),
            Poll::Ready(Ok(4))
        );
        // Not vendor-device: not ours.
        let mut t = TestDevice::new();
        assert_eq!(
            t.control_out(&setup(0x41, vendor::FAULT, 0x81, 0, 8), &out(1, 0)),
            None
        );
        assert_eq!(
            t.control_in(&setup(0xa0, vendor::STATS, 0, 0, 48), &mut [0; 48]),
            None
        );
    }

    #[test]
    fn interrupt_injection() {
        let mut dev = configured();
        let count = Arc::new(CountWaker(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 64];
        assert!(dev.poll_in(EP_INTERRUPT, &mut buf, &mut cx).is_pending());
        let inject = |n: u16| setup(0x40, vendor::INTERRUPT_DATA, 0, 0, n);
        assert_eq!(dev.control(&inject(5), b"event", &mut []), Ok(5));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(dev.control(&inject(2), b"ev", &mut []), Ok(2));
        assert_eq!(
            dev.poll_in(EP_INTERRUPT, &mut buf, &mut cx),
            Poll::Ready(Ok(5))
        );
        assert_eq!(&buf[..5], b"event");
        // A buffer smaller than the report is babble.
        assert_eq!(
            dev.poll_in(EP_INTERRUPT, &mut buf[..1], &mut cx),
            Poll::Ready(Err(Errno::EOVERFLOW))
        );
        assert!(dev.poll_in(EP_INTERRUPT, &mut buf, &mut cx).is_pending());
        assert_eq!(
            dev.control(&inject(65), &[0; 65], &mut []),
            Err(Errno::EPIPE)
        );
        for _ in 0..INTERRUPT_MAX_QUEUED {
            assert_eq!(dev.control(&inject(1), &[1], &mut []), Ok(1));
        }
        assert_eq!(
            dev.control(&inject(1), &[1], &mut []),
            Err(Errno::EPIPE),
            "queue bound"
        );
        assert_eq!(stats(&mut dev).interrupt_reports, 1);
    }

    #[test]
    fn stats_round_trip() {
        let s = Stats {
            bytes_sourced: 1,
            bytes_sunk: 2,
            loopback_bytes_in: 3,
            loopback_bytes_out: 4,
            interrupt_reports: 5,
            faults_fired: u64::MAX,
            iso_bytes_sourced: 7,
            iso_bytes_sunk: 8,
        };
        assert_eq!(Stats::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Stats::from_bytes(&[0; Stats::LEN - 1]), None);
        for f in [Fault::Stall, Fault::Error(Errno::EPROTO), Fault::Short(7)] {
            assert_eq!(Fault::from_bytes(&f.to_bytes()), Some(f));
        }
    }
}
