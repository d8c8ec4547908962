//! A Gadget Zero-like device for correctness tests and benchmarks.
//!
//! Its endpoints behave predictably (a source with a known pattern, a sink,
//! a message-preserving loopback, an interrupt endpoint fed on request), and
//! faults can be scripted for a chosen transfer, so that a test can check
//! what the whole stack does with a STALL, an error or a short packet at an
//! exact point rather than whenever a real device happens to misbehave.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use usbwire_proto::{Errno, SetupPacket, Speed};

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

/// Bulk IN source: the pattern, always a full buffer.
pub const EP_SOURCE: u8 = 0x81;
/// Bulk OUT sink: everything accepted and counted.
pub const EP_SINK: u8 = 0x02;
/// Bulk IN side of the loopback.
pub const EP_LOOP_IN: u8 = 0x83;
/// Bulk OUT side of the loopback: one transfer, one message.
pub const EP_LOOP_OUT: u8 = 0x04;
/// Interrupt IN, fed by [`vendor::INTERRUPT_DATA`].
pub const EP_INTERRUPT: u8 = 0x85;

/// Vendor requests, device recipient.
pub mod vendor {
    /// OUT, 8 bytes: wValue endpoint, wIndex n, data `[kind, 0, 0, 0, param u32 LE]`.
    pub const FAULT: u8 = 0x01;
    /// OUT, no data.
    pub const CLEAR_FAULTS: u8 = 0x02;
    /// OUT, up to [`super::INTERRUPT_MAX`] bytes: one interrupt report.
    pub const INTERRUPT_DATA: u8 = 0x03;
    /// IN: [`super::Stats`] as [`super::Stats::LEN`] little-endian bytes.
    pub const STATS: u8 = 0x04;

    pub const FAULT_STALL: u8 = 1;
    pub const FAULT_ERROR: u8 = 2;
    pub const FAULT_SHORT: u8 = 3;
}

/// Largest interrupt report (the endpoint's max packet).
pub const INTERRUPT_MAX: usize = 64;
/// Loopback bounds: messages and bytes held before OUT waits.
pub const LOOP_MAX_MESSAGES: usize = 64;
pub const LOOP_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Interrupt reports held before INTERRUPT_DATA is refused.
pub const INTERRUPT_MAX_QUEUED: usize = 64;
/// Faults scheduled at once.
pub const MAX_FAULTS: usize = 64;

/// The data endpoints, in the order of the per-endpoint tables.
const ENDPOINTS: [u8; 5] = [EP_SOURCE, EP_SINK, EP_LOOP_IN, EP_LOOP_OUT, EP_INTERRUPT];

fn slot(ep: u8) -> Option<usize> {
    ENDPOINTS.iter().position(|&e| e == ep)
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
}

impl Stats {
    pub const LEN: usize = 48;

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let v = [
            self.bytes_sourced,
            self.bytes_sunk,
            self.loopback_bytes_in,
            self.loopback_bytes_out,
            self.interrupt_reports,
            self.faults_fired,
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
        })
    }
}

/// Period of the source pattern (g_zero's pattern 1: `i % 63`), chosen
/// prime-ish to the packet sizes so that a lost or repeated packet shows.
const PERIOD: usize = 63;
const PATTERN_LEN: usize = PERIOD * 256;
/// A whole number of periods, so copying it back to back continues the
/// pattern exactly: filling a buffer is a few memcpys.
static PATTERN: [u8; PATTERN_LEN] = {
    let mut t = [0u8; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        t[i] = (i % PERIOD) as u8;
        i += 1;
    }
    t
};

/// Fills `buf` with the pattern from stream offset 0.
pub fn fill_pattern(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(PATTERN_LEN) {
        chunk.copy_from_slice(&PATTERN[..chunk.len()]);
    }
}

/// Whether `buf` holds the pattern from offset 0; what a reader of the
/// source checks.
pub fn check_pattern(buf: &[u8]) -> bool {
    buf.chunks(PATTERN_LEN).all(|c| c == &PATTERN[..c.len()])
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
    pub fn new() -> Self {
        TestDevice {
            descriptors: build_descriptors(),
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
            _ => Err(Errno::EPIPE),
        }
    }
}

fn build_descriptors() -> Descriptors {
    let speed = Speed::High;
    let bulk = descriptors::bulk_max_packet(speed);
    let mut body = Vec::with_capacity(9 + 5 * 7);
    body.extend_from_slice(&descriptors::interface(0, 0, 5, 0xff, 0, 0, 0));
    for ep in [EP_SOURCE, EP_SINK, EP_LOOP_IN, EP_LOOP_OUT] {
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
        &[],
    )
}

fn is_vendor_device(s: &SetupPacket) -> bool {
    s.kind() == 2 && s.recipient() == 0
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
            _ => None,
        }
    }

    fn control_out(&mut self, s: &SetupPacket, data: &[u8]) -> Option<Result<(), Errno>> {
        if !is_vendor_device(s) {
            return None;
        }
        match s.request {
            vendor::FAULT | vendor::CLEAR_FAULTS | vendor::INTERRUPT_DATA => {
                Some(self.vendor_out(s, data))
            }
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
                fill_pattern(&mut buf[..n]);
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
            self.stats.bytes_sunk += data.len() as u64;
            Poll::Ready(Ok(data.len()))
        } else {
            self.loop_out(data, cx)
        };
        self.finish(slot, r)
    }

    fn reset(&mut self) {
        // Queued data is dropped; scheduled faults and transfer counts are
        // kept, because a test schedules them before import and enumeration
        // resets the device.
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
        let mut dev = EmulatedDevice::new(TestDevice::new());
        dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
        dev
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
    fn descriptors() {
        let dev = configured();
        let d = dev.descriptors();
        assert_eq!(d.speed, Speed::High);
        assert_eq!(d.device_bytes()[8..12], [0x25, 0x05, 0xa0, 0xa4]);
        let eps: Vec<_> = d
            .endpoints()
            .iter()
            .map(|e| (e.address, e.transfer_type, e.max_packet_size))
            .collect();
        assert_eq!(
            eps,
            vec![
                (0x81, TransferType::Bulk, 512),
                (0x02, TransferType::Bulk, 512),
                (0x83, TransferType::Bulk, 512),
                (0x04, TransferType::Bulk, 512),
                (0x85, TransferType::Interrupt, 64),
            ]
        );
        assert_eq!(d.interfaces()[0].class, 0xff);
    }

    #[test]
    fn source_pattern_and_sink_counting() {
        let mut dev = configured();
        let mut cx = noop_cx();
        for len in [1usize, 62, 63, 64, 512, 100_000] {
            let mut buf = vec![0xee; len];
            assert_eq!(
                dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
                Poll::Ready(Ok(len))
            );
            assert!(
                buf.iter().enumerate().all(|(i, &b)| b == (i % 63) as u8),
                "len {len}"
            );
            assert!(check_pattern(&buf));
        }
        let mut bad = vec![0u8; 200];
        fill_pattern(&mut bad);
        bad[130] ^= 1;
        assert!(!check_pattern(&bad));
        assert_eq!(
            dev.poll_out(EP_SINK, &[7; 1000], &mut cx),
            Poll::Ready(Ok(1000))
        );
        assert_eq!(dev.poll_out(EP_SINK, &[], &mut cx), Poll::Ready(Ok(0)));
        assert_eq!(
            dev.poll_out(EP_SINK, &[7; 24], &mut cx),
            Poll::Ready(Ok(24))
        );
        let s = stats(&mut dev);
        assert_eq!(s.bytes_sourced, 1 + 62 + 63 + 64 + 512 + 100_000);
        assert_eq!(s.bytes_sunk, 1024);
        // Wrong direction or unknown endpoint: the core refuses.
        assert_eq!(
            dev.poll_in(0x82, &mut [0; 4], &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
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
        assert_eq!(fault(&mut dev, EP_SOURCE, 2, Fault::Stall), Ok(0));
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
        assert_eq!(fault(&mut dev, EP_LOOP_IN, 0, Fault::Stall), Ok(0));
        assert_eq!(
            dev.poll_in(EP_LOOP_IN, &mut buf, &mut cx),
            Poll::Ready(Err(Errno::EPIPE))
        );
        // OUT side too.
        assert_eq!(fault(&mut dev, EP_LOOP_OUT, 0, Fault::Stall), Ok(0));
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
            Ok(0)
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
        assert_eq!(fault(&mut dev, EP_LOOP_IN, 0, Fault::Short(3)), Ok(0));
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
        assert_eq!(fault(&mut dev, EP_SOURCE, 0, Fault::Short(10)), Ok(0));
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(10))
        );
        assert_eq!(
            dev.poll_in(EP_SOURCE, &mut buf, &mut cx),
            Poll::Ready(Ok(64))
        );
        assert_eq!(fault(&mut dev, EP_LOOP_OUT, 0, Fault::Short(2)), Ok(0));
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
            assert_eq!(dev.poll_out(EP_SINK, &[1], &mut cx), Poll::Ready(Ok(1)));
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
        assert_eq!(dev.control(&inject(5), b"event", &mut []), Ok(0));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(dev.control(&inject(2), b"ev", &mut []), Ok(0));
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
            assert_eq!(dev.control(&inject(1), &[1], &mut []), Ok(0));
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
        };
        assert_eq!(Stats::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Stats::from_bytes(&[0; 47]), None);
        for f in [Fault::Stall, Fault::Error(Errno::EPROTO), Fault::Short(7)] {
            assert_eq!(Fault::from_bytes(&f.to_bytes()), Some(f));
        }
    }
}
