//! [`UsbfsBackend`]: a real device, claimed through usbfs, as the server's
//! [`Backend`].
//!
//! URBs are submitted asynchronously (`USBDEVFS_SUBMITURB`) on their first
//! poll and reaped (`USBDEVFS_REAPURBNDELAY`) when tokio reports the usbfs
//! descriptor writable, which is how usbfs signals reapable URBs. Several
//! URBs per endpoint are in flight ([`Backend::max_active`]); an unlink
//! discards exactly one URB (`USBDEVFS_DISCARDURB`), never the endpoint.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use usbwire_proto::urb::flags as urb_flags;
use usbwire_proto::{DeviceInfo, Direction, Errno};
use usbwire_usb::{Backend, Completion, StateChange, TransferType, Urb, UrbId};

use rustix::io::Errno as UsbfsErrno;

use crate::sysfs::{EndpointTypes, LocalDevice, Roots};
use crate::usbfs::{self, completion_errno, refusal_errno, Usbfs, UsbfsUrb};

/// URBs of one bulk/interrupt endpoint kept in the host controller at once.
pub const MAX_ACTIVE_BULK: usize = 32;
/// URBs of one isochronous endpoint kept in flight at once.
pub const MAX_ACTIVE_ISO: usize = 8;
/// How long the end of an import waits for the kernel to give back the
/// URBs it discarded; a host controller normally does within milliseconds.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The usbfs flags for an URB with USB/IP `transfer_flags`, masked the way
/// `usb_submit_urb` and stub_rx.c's `masking_bogus_flags` mask them.
///
/// `continuation`: this bulk URB was queued behind another URB still on the
/// endpoint; it gets `USBDEVFS_URB_BULK_CONTINUATION`, so that if an
/// earlier URB fails the kernel cancels this one before it runs (from the
/// failed URB's completion, before the controller moves on) instead of
/// letting it swallow data meant for a later stage. The backend then gives
/// it back to the session untouched, and the endpoint's error hold decides.
pub fn usbfs_flags(
    transfer_flags: u32,
    tt: TransferType,
    dir: Direction,
    continuation: bool,
) -> u32 {
    let is_in = dir == Direction::In;
    let mut f = 0;
    if transfer_flags & urb_flags::URB_NO_INTERRUPT != 0 {
        f |= usbfs::URB_NO_INTERRUPT;
    }
    match tt {
        TransferType::Isochronous => {
            if transfer_flags & urb_flags::URB_ISO_ASAP != 0 {
                f |= usbfs::URB_ISO_ASAP;
            }
        }
        TransferType::Bulk | TransferType::Interrupt => {
            if !is_in && transfer_flags & urb_flags::URB_ZERO_PACKET != 0 {
                f |= usbfs::URB_ZERO_PACKET;
            }
            if is_in && transfer_flags & urb_flags::URB_SHORT_NOT_OK != 0 {
                f |= usbfs::URB_SHORT_NOT_OK;
            }
            if tt == TransferType::Bulk && continuation {
                f |= usbfs::URB_BULK_CONTINUATION;
            }
        }
        TransferType::Control => {
            if is_in && transfer_flags & urb_flags::URB_SHORT_NOT_OK != 0 {
                f |= usbfs::URB_SHORT_NOT_OK;
            }
        }
    }
    f
}

/// How an URB was handed to usbfs, to shape its completion.
enum Kind {
    /// Data starts 8 bytes into the kernel buffer.
    Control,
    /// Packet lengths, for packing the IN data.
    Iso(Vec<u32>),
    Plain,
}

/// Isochronous URBs that came back from the host controller, and their
/// packets: what an operator needs to tell a stream that ran from one that
/// the controller dropped packet by packet.
#[derive(Debug, Default, Clone, Copy)]
struct IsoCounts {
    urbs: u64,
    packets: u64,
    /// Packets that came back with a status other than 0.
    failed_packets: u64,
    /// Bytes the packets moved (their actual lengths).
    bytes: u64,
}

/// An URB built for usbfs, not yet submitted.
struct Built {
    urb: UsbfsUrb,
    kind: Kind,
    /// Queued behind another URB of its bulk endpoint.
    continuation: bool,
}

struct Submitted {
    id: u64,
    kind: Kind,
    /// Endpoint address, to know what else is in flight on it.
    ep: u8,
    /// Submitted with USBDEVFS_URB_BULK_CONTINUATION.
    continuation: bool,
    /// The session asked for it to be cancelled (an unlink).
    cancelled: bool,
}

/// A real device exported through usbfs. Dropping it releases every
/// interface and lets the kernel drivers bind again.
pub struct UsbfsBackend {
    dev: Usbfs,
    roots: Roots,
    sys: LocalDevice,
    desc: EndpointTypes,
    /// The `descriptors` sysfs file as last read, for a packet capture.
    raw_descriptors: Vec<u8>,
    config: u8,
    alts: BTreeMap<u8, u8>,
    /// Interfaces we claimed, with the driver each had before.
    claimed: Vec<(u8, Option<String>)>,
    next_id: u64,
    /// URBs submitted to usbfs, by the server's id for them (the client's
    /// seqnums may repeat).
    in_flight: HashMap<UrbId, Submitted>,
    done: HashMap<u64, UsbfsUrb>,
    /// Isochronous traffic of the current import, logged when it ends.
    iso: IsoCounts,
    gone: bool,
    /// Put the original drivers back when dropped.
    reattach: bool,
}

impl UsbfsBackend {
    /// Takes over `sys`: every interface of the active configuration is
    /// detached from its driver and claimed.
    pub fn claim(roots: &Roots, sys: LocalDevice) -> io::Result<UsbfsBackend> {
        let dev = Usbfs::open(&sys.devnode(roots))?;
        let raw_descriptors = sys.descriptors()?;
        let desc = EndpointTypes::parse(&raw_descriptors);
        let mut b = UsbfsBackend {
            dev,
            roots: roots.clone(),
            config: sys.active_configuration(),
            alts: sys
                .interfaces
                .iter()
                .map(|i| (i.number, i.alternate_setting))
                .collect(),
            claimed: Vec::new(),
            sys,
            desc,
            raw_descriptors,
            next_id: 1,
            in_flight: HashMap::new(),
            done: HashMap::new(),
            iso: IsoCounts::default(),
            gone: false,
            reattach: true,
        };
        let ifaces: Vec<(u8, Option<String>)> = b
            .sys
            .interfaces
            .iter()
            .map(|i| (i.number, i.driver.clone()))
            .collect();
        for (n, driver) in ifaces {
            if let Err(e) = b.dev.disconnect_claim(n) {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot claim interface {n} of {}: {e}", b.sys.busid),
                ));
            }
            b.claimed.push((n, driver));
        }
        Ok(b)
    }

    pub fn busid(&self) -> &str {
        &self.sys.busid
    }

    pub fn sys(&self) -> &LocalDevice {
        &self.sys
    }

    /// The interfaces claimed and their original drivers.
    pub fn original_drivers(&self) -> &[(u8, Option<String>)] {
        &self.claimed
    }

    /// Whether the device was seen unplugged.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    fn reclaim(&mut self) {
        for (n, _) in self.claimed.clone() {
            if let Err(e) = self.dev.disconnect_claim(n) {
                if e != UsbfsErrno::BUSY {
                    debug!(busid = %self.sys.busid, "re-claiming interface {n}: {e}");
                }
            }
        }
    }

    /// USBDEVFS_RESET, keeping the interfaces away from kernel drivers.
    /// usbfs has no pre_reset/post_reset, so `usb_reset_device` unbinds it
    /// from every interface it claims and then probes *all* drivers for
    /// them: usbhid, usb-storage, uas, ftdi_sio... took the device until
    /// `reclaim` pushed them off again (seen with qemu's devices on xHCI: a
    /// keyboard input device and a SCSI disk appeared after every import).
    /// An interface with no driver is not probed again, so release first.
    fn reset_device(&mut self) -> Result<(), UsbfsErrno> {
        for (n, _) in &self.claimed {
            let _ = self.dev.release_interface(*n);
        }
        let r = self.dev.reset();
        self.reclaim();
        r
    }

    fn refresh(&mut self) {
        if let Ok(s) = self.roots.local_device(&self.sys.busid) {
            if let Ok(raw) = s.descriptors() {
                self.desc = EndpointTypes::parse(&raw);
                self.raw_descriptors = raw;
            }
            self.config = s.active_configuration();
            self.alts = s
                .interfaces
                .iter()
                .map(|i| (i.number, i.alternate_setting))
                .collect();
        }
    }

    /// Reaps everything completed, without blocking.
    fn reap_all(&mut self) {
        loop {
            match self.dev.reap() {
                Ok(Some((id, t))) => {
                    self.done.insert(id, t);
                }
                Ok(None) => return,
                Err(e) => {
                    if e == UsbfsErrno::NODEV {
                        if !self.gone {
                            info!(busid = %self.sys.busid, "device unplugged");
                        }
                        self.gone = true;
                    } else {
                        warn!(busid = %self.sys.busid, "reaping URBs failed: {e}");
                    }
                    return;
                }
            }
        }
    }

    fn io_result(&mut self, r: Result<(), UsbfsErrno>) -> Result<usize, Errno> {
        match r {
            Ok(()) => Ok(0),
            Err(e) => {
                if e == UsbfsErrno::NODEV {
                    self.gone = true;
                }
                Err(refusal_errno(e))
            }
        }
    }

    /// Control requests that change device state go through the ioctls
    /// that keep the kernel's view in step, as stub_rx.c does.
    fn special_control(&mut self, urb: &Urb) -> Option<Result<usize, Errno>> {
        match StateChange::recognise(&urb.setup)? {
            StateChange::PortReset => {
                info!(busid = %self.sys.busid, "device reset requested");
                let r = self.reset_device();
                self.refresh();
                Some(self.io_result(r))
            }
            StateChange::SetConfiguration { value } => Some(self.set_configuration(value as u8)),
            StateChange::SetInterface {
                interface,
                alt_setting,
            } => {
                let (iface, alt) = (interface as u8, alt_setting as u8);
                let r = self.dev.set_interface(iface, alt);
                if r.is_ok() {
                    self.alts.insert(iface, alt);
                }
                Some(self.io_result(r))
            }
            StateChange::ClearHalt { endpoint } => {
                let r = self.dev.clear_halt(endpoint);
                Some(self.io_result(r))
            }
        }
    }

    /// SET_CONFIGURATION through usbfs, which rebinds the interfaces: they
    /// are released first and claimed again after.
    fn set_configuration(&mut self, value: u8) -> Result<usize, Errno> {
        if value == self.config {
            // Already active: setting it again would unbind and rebind
            // every interface (the kernel's stub skips it likewise).
            return Ok(0);
        }
        info!(busid = %self.sys.busid, "SET_CONFIGURATION {value}");
        for (n, _) in self.claimed.clone() {
            let _ = self.dev.release_interface(n);
        }
        let r = self.dev.set_configuration(value);
        self.refresh();
        self.claimed = self
            .desc
            .interfaces(self.config)
            .into_iter()
            .map(|n| (n, None))
            .collect();
        self.reclaim();
        self.io_result(r)
    }

    /// Builds and submits an URB. `Some` when it finished at once.
    fn submit(&mut self, urb: &mut Urb) -> Option<Completion> {
        if self.gone {
            return Some(Completion::failed(Errno::ENODEV));
        }
        let ep = urb.ep_address();
        let built = if urb.ep == 0 {
            if let Some(r) = self.special_control(urb) {
                return Some(r.into());
            }
            Ok(control_urb(urb))
        } else {
            match self.transfer_type(ep) {
                Some(TransferType::Isochronous) => iso_urb(urb, ep),
                Some(tt @ (TransferType::Bulk | TransferType::Interrupt)) => {
                    let continuation =
                        tt == TransferType::Bulk && self.in_flight.values().any(|s| s.ep == ep);
                    Ok(plain_urb(urb, ep, tt, continuation))
                }
                Some(TransferType::Control) | None => Err(Errno::EPIPE),
            }
        };
        match built {
            Ok(built) => self.hand_to_kernel(urb, ep, built),
            Err(errno) => Some(Completion::failed(errno)),
        }
    }

    /// Submits a built URB: `None` once the kernel has it, else how it ended.
    fn hand_to_kernel(&mut self, urb: &mut Urb, ep: u8, built: Built) -> Option<Completion> {
        let Built {
            urb: usbfs_urb,
            kind,
            continuation,
        } = built;
        let id = self.next_id;
        self.next_id += 1;
        let e = match self.dev.submit(id, usbfs_urb) {
            Ok(()) => {
                let submitted = Submitted {
                    id,
                    kind,
                    ep,
                    continuation,
                    cancelled: false,
                };
                self.in_flight.insert(urb.id, submitted);
                return None;
            }
            Err((usbfs_urb, e)) => {
                if matches!(kind, Kind::Plain) {
                    urb.buf = usbfs_urb.into_buf();
                }
                e
            }
        };
        debug!(busid = %self.sys.busid, ep, "submit failed: {e}");
        if e == UsbfsErrno::NODEV {
            self.gone = true;
        }
        if continuation && e == UsbfsErrno::REMOTEIO {
            // usbfs refuses continuations after an earlier failure on the
            // endpoint until a new transfer starts: not run.
            if urb.buf.len() < urb.length {
                urb.buf.resize(urb.length, 0);
            }
            return Some(Completion::NotStarted);
        }
        Some(Completion::failed(refusal_errno(e)))
    }

    /// What the kernel gave back, with whatever data moved before an
    /// error, as usbip-host forwards it.
    fn finish(&mut self, urb: &mut Urb, sub: Submitted, t: UsbfsUrb) -> Completion {
        let failure = t.failure();
        let actual = t.actual_length();
        let kind = sub.kind;
        if sub.continuation
            && !sub.cancelled
            && failure == Some(UsbfsErrno::CONNRESET)
            && actual == 0
        {
            // The kernel cancelled this continuation because an earlier URB
            // of the endpoint failed; it never ran.
            urb.buf = t.into_buf();
            if urb.buf.len() < urb.length {
                urb.buf.resize(urb.length, 0);
            }
            return Completion::NotStarted;
        }
        match kind {
            Kind::Plain => {
                urb.buf = t.into_buf();
                if urb.buf.len() < urb.length {
                    urb.buf.resize(urb.length, 0);
                }
            }
            Kind::Control => {
                if urb.setup.direction() == Direction::In {
                    let n = actual.min(urb.buf.len());
                    urb.buf[..n].copy_from_slice(&t.buf()[8..8 + n]);
                }
            }
            Kind::Iso(lens) => {
                let actual = iso_completion(urb, &lens, |i| t.iso_result(i), t.buf());
                self.iso.urbs += 1;
                self.iso.packets += lens.len() as u64;
                self.iso.failed_packets += urb.iso.iter().filter(|p| p.status != 0).count() as u64;
                self.iso.bytes += actual as u64;
                urb.start_frame = t.start_frame();
                // -EXDEV: some packets failed, each with its own status.
                let error = failure
                    .filter(|&e| e != UsbfsErrno::XDEV)
                    .map(completion_errno);
                return Completion::Ran { actual, error };
            }
        }
        // A short IN with URB_SHORT_NOT_OK: the session reports -EREMOTEIO
        // itself.
        let error = failure
            .filter(|&e| e != UsbfsErrno::REMOTEIO)
            .map(completion_errno);
        if matches!(failure, Some(UsbfsErrno::NODEV | UsbfsErrno::SHUTDOWN)) {
            self.gone = true;
        }
        Completion::Ran { actual, error }
    }

    /// Discards every URB in flight and waits, bounded by [`DRAIN_TIMEOUT`],
    /// until the kernel gave them all back: woken by the kernel as each
    /// comes back (poll(2)), so it ends as soon as the last one has. It
    /// blocks, so it runs only where that is allowed: `release` (on the
    /// server's blocking pool), `reset` and the drop, never in `poll_urb`.
    fn drain(&mut self) {
        let discarded = self.dev.inflight_len();
        for id in self.dev.inflight_ids() {
            let _ = self.dev.discard(id);
        }
        let start = Instant::now();
        let deadline = start + DRAIN_TIMEOUT;
        loop {
            self.reap_all();
            if self.dev.inflight_len() == 0 || self.gone {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    busid = %self.sys.busid,
                    urbs = self.dev.inflight_len(),
                    "the kernel did not give back every discarded URB in {DRAIN_TIMEOUT:?}"
                );
                break;
            }
            match self.dev.wait_reapable(left) {
                Ok(_) => {}
                Err(UsbfsErrno::INTR) => {}
                Err(e) => {
                    warn!(busid = %self.sys.busid, "waiting for discarded URBs failed: {e}");
                    break;
                }
            }
        }
        if discarded > 0 {
            debug!(
                busid = %self.sys.busid,
                urbs = discarded,
                left = self.dev.inflight_len(),
                waited_us = start.elapsed().as_micros() as u64,
                "drained the URBs in flight"
            );
        }
        self.done.clear();
        self.in_flight.clear();
    }

    /// Do not put the kernel drivers back when dropped (the device is gone).
    pub fn skip_reattach(&mut self) {
        self.reattach = false;
    }
}

/// A control URB: the setup packet, then the OUT data or room for the IN
/// data, in one buffer as usbfs wants it.
fn control_urb(urb: &Urb) -> Built {
    let len = urb.length.min(urb.buf.len());
    let in_dir = urb.setup.direction() == Direction::In;
    let wlen = (urb.setup.length as usize).min(len);
    let mut b = vec![0u8; 8 + wlen];
    b[..8].copy_from_slice(&urb.setup.to_bytes());
    if !in_dir {
        b[8..].copy_from_slice(&urb.buf[..wlen]);
    }
    let dir = if in_dir {
        Direction::In
    } else {
        Direction::Out
    };
    let f = usbfs_flags(urb.transfer_flags, TransferType::Control, dir, false);
    let n = b.len();
    Built {
        urb: UsbfsUrb::new(usbfs::TYPE_CONTROL, 0, f, b, n, &[], 0),
        kind: Kind::Control,
        continuation: false,
    }
}

/// An isochronous URB: usbfs packs the packets back to back, where USB/IP
/// gives each its offset.
fn iso_urb(urb: &Urb, ep: u8) -> Result<Built, Errno> {
    let len = urb.length.min(urb.buf.len());
    let lens: Vec<u32> = urb.iso.iter().map(|p| p.length).collect();
    let total: usize = lens.iter().map(|&l| l as usize).sum();
    let mut b = vec![0u8; total];
    if urb.direction == Direction::Out {
        let mut at = 0;
        for p in &urb.iso {
            let (o, l) = (p.offset as usize, p.length as usize);
            if o + l > len {
                return Err(Errno::EINVAL);
            }
            b[at..at + l].copy_from_slice(&urb.buf[o..o + l]);
            at += l;
        }
    }
    let tt = TransferType::Isochronous;
    let f = usbfs_flags(urb.transfer_flags, tt, urb.direction, false);
    Ok(Built {
        urb: UsbfsUrb::new(usbfs::TYPE_ISO, ep, f, b, total, &lens, urb.start_frame),
        kind: Kind::Iso(lens),
        continuation: false,
    })
}

/// Copies what the kernel reported for each packet of an isochronous URB
/// (`result(i)`: actual length and status) into the USB/IP URB, and for IN
/// the packets' data from `data` (usbfs's buffer, where packet `i` starts
/// at the sum of the lengths before it), packed back to back as
/// usbip-host sends it (vhci spreads them out again, usbip_pad_iso).
///
/// Returns the URB's actual length as the sum of its packets' actual
/// lengths: vhci-hcd drops the connection when the two differ
/// (usbip_recv_iso), and usbfs only computes the sum itself since Linux
/// 4.15 (before, the host controller driver's value went out as it was).
/// A packet reported longer than it is counts as its length.
fn iso_completion(
    urb: &mut Urb,
    lens: &[u32],
    result: impl Fn(usize) -> (u32, i32),
    data: &[u8],
) -> usize {
    let mut src = 0;
    let mut dst = 0;
    for (i, &l) in lens.iter().enumerate() {
        let (a, status) = result(i);
        let a = a.min(l);
        if let Some(p) = urb.iso.get_mut(i) {
            p.actual_length = a;
            p.status = status;
        }
        let a = a as usize;
        if urb.direction == Direction::In {
            if let (Some(to), Some(from)) = (urb.buf.get_mut(dst..dst + a), data.get(src..src + a))
            {
                to.copy_from_slice(from);
            }
        }
        dst += a;
        src += l as usize;
    }
    dst
}

/// A bulk or interrupt URB: the session's buffer goes to the kernel and
/// comes back on completion, no copy.
fn plain_urb(urb: &mut Urb, ep: u8, tt: TransferType, continuation: bool) -> Built {
    let len = urb.length.min(urb.buf.len());
    let f = usbfs_flags(urb.transfer_flags, tt, urb.direction, continuation);
    let typ = if tt == TransferType::Bulk {
        usbfs::TYPE_BULK
    } else {
        usbfs::TYPE_INTERRUPT
    };
    let b = std::mem::take(&mut urb.buf);
    Built {
        urb: UsbfsUrb::new(typ, ep, f, b, len, &[], 0),
        kind: Kind::Plain,
        continuation,
    }
}

impl UsbfsBackend {
    /// Submits `urb` on its first poll, then reaps until it is back.
    fn poll_one(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
        if !self.in_flight.contains_key(&urb.id) {
            if let Some(r) = self.submit(urb) {
                return Poll::Ready(r);
            }
        }
        let id = self.in_flight[&urb.id].id;
        loop {
            if let Some(t) = self.done.remove(&id) {
                let s = self.in_flight.remove(&urb.id).expect("present");
                return Poll::Ready(self.finish(urb, s, t));
            }
            self.reap_all();
            if let Some(t) = self.done.remove(&id) {
                let s = self.in_flight.remove(&urb.id).expect("present");
                return Poll::Ready(self.finish(urb, s, t));
            }
            if self.gone {
                // Nothing left to reap and ours did not come back.
                self.in_flight.remove(&urb.id);
                return Poll::Ready(Completion::failed(Errno::ENODEV));
            }
            // Readiness is cleared before the next reap: a completion
            // that lands after it is signalled again.
            match self.dev.poll_reapable(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    warn!("usbfs readiness failed: {e}");
                    self.gone = true;
                }
            }
        }
    }
}

impl Backend for UsbfsBackend {
    fn is_gone(&self) -> bool {
        self.gone
    }

    fn device_info(&self, busid: &str, _busnum: u32, _devnum: u32) -> DeviceInfo {
        let mut i = self.sys.device_info();
        i.busid = busid.into();
        i
    }

    fn descriptors(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        crate::sysfs::split_descriptors(&self.raw_descriptors, self.config)
    }

    fn serial(&self) -> Option<String> {
        self.sys.serial.clone().filter(|s| !s.is_empty())
    }

    fn transfer_type(&self, ep_address: u8) -> Option<TransferType> {
        if ep_address & 0x0f == 0 {
            return Some(TransferType::Control);
        }
        self.desc.endpoint_type(self.config, &self.alts, ep_address)
    }

    fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
        let r = self.poll_one(urb, cx);
        // A reap takes whatever completed, other URBs' too, and it consumed
        // the readiness that announced them: their owners may already have
        // been polled this turn and would wait for a wake-up that never
        // comes (seen: a control transfer behind 8 pending bulk INs hung).
        if !self.done.is_empty() {
            cx.waker().wake_by_ref();
        }
        r
    }

    fn max_active(&self, ep_address: u8) -> usize {
        if ep_address & 0x0f == 0 {
            return 1;
        }
        match self.transfer_type(ep_address) {
            Some(TransferType::Bulk) => MAX_ACTIVE_BULK,
            // usbfs has no continuation for interrupt endpoints, so one at a
            // time is the only way nothing runs past an error there.
            Some(TransferType::Interrupt) => 1,
            Some(TransferType::Isochronous) => MAX_ACTIVE_ISO,
            _ => 1,
        }
    }

    fn cancel(&mut self, urb: &mut Urb) -> bool {
        let Some(s) = self.in_flight.get_mut(&urb.id) else {
            return true;
        };
        s.cancelled = true;
        let id = s.id;
        if self.done.contains_key(&id) {
            return false;
        }
        match self.dev.discard(id) {
            Ok(()) => debug!(seqnum = urb.seqnum, "discarding one URB"),
            // EINVAL: it completed already and waits to be reaped.
            Err(e) => debug!(seqnum = urb.seqnum, "discard: {e}"),
        }
        false
    }

    fn release(&mut self) {
        self.drain();
        let iso = std::mem::take(&mut self.iso);
        if iso.urbs > 0 {
            info!(
                busid = %self.sys.busid,
                urbs = iso.urbs,
                packets = iso.packets,
                failed_packets = iso.failed_packets,
                bytes = iso.bytes,
                "isochronous transfers of this import"
            );
        }
        self.dev.unregister();
        if !self.gone {
            // Back to what a new importer expects: the kernel's stub
            // resets the device when its importer goes away.
            let _ = self.reset_device();
            self.refresh();
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for UsbfsBackend {
    fn drop(&mut self) {
        self.drain();
        if !self.reattach || self.gone {
            return;
        }
        for (n, _) in &self.claimed {
            let _ = self.dev.release_interface(*n);
        }
        for (n, _) in &self.claimed {
            if let Err(e) = self.dev.connect_interface(*n) {
                debug!(busid = %self.sys.busid, "re-probing interface {n}: {e}");
            }
        }
        crate::bind::restore_drivers(&self.roots, &self.sys, &self.claimed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usbwire_proto::{IsoPacket, SetupPacket};

    fn iso_urb_of(direction: Direction, lens: &[u32]) -> Urb {
        let mut offset = 0;
        let iso = lens
            .iter()
            .map(|&length| {
                let p = IsoPacket {
                    offset,
                    length,
                    actual_length: 0,
                    status: 0,
                };
                offset += length;
                p
            })
            .collect();
        Urb {
            id: UrbId(1),
            seqnum: 1,
            ep: 1,
            direction,
            transfer_flags: urb_flags::URB_ISO_ASAP,
            setup: SetupPacket::default(),
            length: offset as usize,
            buf: (0..offset).map(|i| i as u8).collect(),
            iso,
            start_frame: 0,
            interval: 1,
            started: true,
        }
    }

    #[test]
    fn iso_out_packets_are_packed_and_their_results_copied() {
        // Offsets with a hole: usbfs wants the packets back to back.
        let mut urb = iso_urb_of(Direction::Out, &[4, 4, 4]);
        urb.iso[1].offset = 5;
        urb.iso[2].offset = 9;
        urb.length = 13;
        urb.buf = b"aaaa-bbbbcccc".to_vec();
        let built = iso_urb(&urb, 0x01).unwrap();
        assert_eq!(built.urb.buf(), b"aaaabbbbcccc");
        assert_eq!(built.urb.iso_count(), 3);
        // A packet past the buffer is refused before usbfs sees it.
        urb.iso[2].offset = 10;
        assert_eq!(iso_urb(&urb, 0x01).err(), Some(Errno::EINVAL));

        // What xhci_hcd gave back for 3 packets: two sent, one missed.
        let results = [(4, 0), (4, 0), (0, -18)];
        let actual = iso_completion(&mut urb, &[4, 4, 4], |i| results[i], built.urb.buf());
        assert_eq!(actual, 8);
        let got: Vec<(u32, i32)> = urb
            .iso
            .iter()
            .map(|p| (p.actual_length, p.status))
            .collect();
        assert_eq!(got, results);
        // OUT data is not touched.
        assert_eq!(urb.buf, b"aaaa-bbbbcccc");
    }

    #[test]
    fn iso_in_packets_come_back_packed_and_sum_to_the_actual_length() {
        let mut urb = iso_urb_of(Direction::In, &[4, 4, 4]);
        let data = b"aaaabbbbcccc";
        // Short packets, and one the kernel claims is longer than it is.
        let results = [(4, 0), (2, 0), (9, 0)];
        let actual = iso_completion(&mut urb, &[4, 4, 4], |i| results[i], data);
        assert_eq!(actual, 4 + 2 + 4);
        assert_eq!(&urb.buf[..actual], b"aaaabbcccc");
        let lengths: Vec<u32> = urb.iso.iter().map(|p| p.actual_length).collect();
        assert_eq!(lengths, [4, 2, 4]);
        assert_eq!(
            urb.iso
                .iter()
                .map(|p| p.actual_length as usize)
                .sum::<usize>(),
            actual
        );
        // Offsets stay the client's: vhci places each packet by them.
        let offsets: Vec<u32> = urb.iso.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [0, 4, 8]);
    }

    #[test]
    fn flags_are_masked_like_the_kernel() {
        let all = urb_flags::URB_SHORT_NOT_OK
            | urb_flags::URB_ZERO_PACKET
            | urb_flags::URB_ISO_ASAP
            | urb_flags::URB_NO_INTERRUPT
            | urb_flags::URB_DIR_IN
            | urb_flags::URB_FREE_BUFFER
            | urb_flags::URB_NO_TRANSFER_DMA_MAP;
        // Bulk OUT: ZERO_PACKET kept, SHORT_NOT_OK and ISO_ASAP dropped.
        assert_eq!(
            usbfs_flags(all, TransferType::Bulk, Direction::Out, false),
            usbfs::URB_ZERO_PACKET | usbfs::URB_NO_INTERRUPT
        );
        // Bulk IN: SHORT_NOT_OK kept, ZERO_PACKET dropped.
        assert_eq!(
            usbfs_flags(all, TransferType::Bulk, Direction::In, false),
            usbfs::URB_SHORT_NOT_OK | usbfs::URB_NO_INTERRUPT
        );
        // A bulk URB queued behind another is a continuation, either way:
        // the kernel then cancels it, unrun, if an earlier one fails.
        assert_eq!(
            usbfs_flags(
                urb_flags::URB_SHORT_NOT_OK,
                TransferType::Bulk,
                Direction::In,
                true
            ),
            usbfs::URB_SHORT_NOT_OK | usbfs::URB_BULK_CONTINUATION
        );
        assert_eq!(
            usbfs_flags(0, TransferType::Bulk, Direction::Out, true),
            usbfs::URB_BULK_CONTINUATION
        );
        assert_eq!(usbfs_flags(0, TransferType::Bulk, Direction::In, false), 0);
        assert_eq!(
            usbfs_flags(
                urb_flags::URB_SHORT_NOT_OK,
                TransferType::Interrupt,
                Direction::In,
                true
            ),
            usbfs::URB_SHORT_NOT_OK
        );
        // ISO: only ISO_ASAP.
        assert_eq!(
            usbfs_flags(
                all & !urb_flags::URB_NO_INTERRUPT,
                TransferType::Isochronous,
                Direction::In,
                false
            ),
            usbfs::URB_ISO_ASAP
        );
        // Control OUT: nothing.
        assert_eq!(
            usbfs_flags(
                urb_flags::URB_SHORT_NOT_OK | urb_flags::URB_ZERO_PACKET,
                TransferType::Control,
                Direction::Out,
                false
            ),
            0
        );
    }
}
