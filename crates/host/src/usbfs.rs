//! Linux usbfs (`/dev/bus/usb/BBB/DDD`): the raw ioctls, and the only
//! unsafe code of this crate.
//!
//! The kernel keeps a pointer to every submitted `usbdevfs_urb` and to its
//! buffer until the URB is reaped. [`Usbfs`] therefore owns every submitted
//! [`UsbfsUrb`] until [`Usbfs::reap`] hands it back, and closes the file
//! descriptor (which kills and waits for every URB still in the kernel,
//! `usbdev_release` → `destroy_all_async`) before it frees them. Nothing
//! outside this module can make the kernel write to freed memory.
//!
//! The ioctl numbers are `linux-raw-sys`'s and the calls go through
//! `rustix::ioctl`; the argument structs are declared here, with their sizes
//! checked at compile time against the ones the ioctl numbers encode.
//! [`refusal_errno`] and [`completion_errno`] are the crate's one
//! translation of usbfs errnos into what an importer sees.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::task::{Context, Poll};
use std::time::Duration;

use linux_raw_sys::ioctl::{
    USBDEVFS_CLAIMINTERFACE, USBDEVFS_CLEAR_HALT, USBDEVFS_CONNECT, USBDEVFS_DISCARDURB,
    USBDEVFS_DISCONNECT_CLAIM, USBDEVFS_IOCTL, USBDEVFS_REAPURBNDELAY, USBDEVFS_RELEASEINTERFACE,
    USBDEVFS_RESET, USBDEVFS_SETCONFIGURATION, USBDEVFS_SETINTERFACE, USBDEVFS_SUBMITURB,
};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, Getter, IntegerSetter, Ioctl, NoArg, Opcode, Setter};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use usbwire_proto::Errno as WireErrno;

/// The argument size an ioctl number encodes (`_IOC_SIZE`).
const fn argument_size(opcode: u32) -> usize {
    ((opcode >> 16) & 0x3fff) as usize
}

/// `struct usbdevfs_setinterface`.
#[repr(C)]
struct SetInterface {
    interface: c_uint,
    altsetting: c_uint,
}

/// `struct usbdevfs_disconnect_claim`.
#[repr(C)]
struct DisconnectClaim {
    interface: c_uint,
    flags: c_uint,
    driver: [u8; 256],
}

/// `struct usbdevfs_ioctl`.
#[repr(C)]
struct IoctlArg {
    ifno: c_int,
    ioctl_code: c_int,
    data: *mut c_void,
}

/// `struct usbdevfs_urb`.
#[repr(C)]
struct RawUrb {
    typ: u8,
    endpoint: u8,
    status: i32,
    flags: u32,
    buffer: *mut c_void,
    buffer_length: i32,
    actual_length: i32,
    start_frame: i32,
    number_of_packets: i32,
    error_count: i32,
    signr: u32,
    usercontext: *mut c_void,
}

/// `struct usbdevfs_iso_packet_desc`.
#[repr(C)]
struct RawIso {
    length: u32,
    actual_length: u32,
    status: u32,
}

// The structs are declared here (the uapi header has no Rust binding), so
// their sizes are checked against the ones the kernel's ioctl numbers carry.
const _: () = assert!(argument_size(USBDEVFS_SUBMITURB) == size_of::<RawUrb>());
const _: () = assert!(argument_size(USBDEVFS_SETINTERFACE) == size_of::<SetInterface>());
const _: () = assert!(argument_size(USBDEVFS_DISCONNECT_CLAIM) == size_of::<DisconnectClaim>());
const _: () = assert!(argument_size(USBDEVFS_IOCTL) == size_of::<IoctlArg>());
const _: () = assert!(argument_size(USBDEVFS_REAPURBNDELAY) == size_of::<*mut RawUrb>());
const _: () = assert!(argument_size(USBDEVFS_CLAIMINTERFACE) == size_of::<c_uint>());
const _: () = assert!(argument_size(USBDEVFS_RELEASEINTERFACE) == size_of::<c_uint>());
const _: () = assert!(argument_size(USBDEVFS_SETCONFIGURATION) == size_of::<c_uint>());
const _: () = assert!(argument_size(USBDEVFS_CLEAR_HALT) == size_of::<c_uint>());

/// usbfs URB types (`USBDEVFS_URB_TYPE_*`; the uapi header's, which
/// `linux-raw-sys` does not carry).
pub const TYPE_ISO: u8 = 0;
pub const TYPE_INTERRUPT: u8 = 1;
pub const TYPE_CONTROL: u8 = 2;
pub const TYPE_BULK: u8 = 3;

/// usbfs URB flags (`USBDEVFS_URB_*`).
pub const URB_SHORT_NOT_OK: u32 = 0x01;
pub const URB_ISO_ASAP: u32 = 0x02;
pub const URB_BULK_CONTINUATION: u32 = 0x04;
pub const URB_ZERO_PACKET: u32 = 0x40;
pub const URB_NO_INTERRUPT: u32 = 0x80;

/// One URB as usbfs runs it: the `usbdevfs_urb` (with its ISO packet
/// descriptors) and the data buffer it points to.
pub struct UsbfsUrb {
    /// `RawUrb` followed by `n_iso` `RawIso`, in u64 words for alignment.
    storage: Vec<u64>,
    buf: Vec<u8>,
    n_iso: usize,
}

// SAFETY: the raw pointers in `storage` point into `buf`, which the
// UsbfsUrb owns; nothing else aliases them.
unsafe impl Send for UsbfsUrb {}

impl UsbfsUrb {
    /// `length` bytes of `buf` (which must be at least that long) are the
    /// transfer buffer; `iso` holds the packet lengths of an ISO URB.
    pub fn new(
        typ: u8,
        endpoint: u8,
        flags: u32,
        buf: Vec<u8>,
        length: usize,
        iso: &[u32],
        start_frame: i32,
    ) -> UsbfsUrb {
        assert!(
            length <= buf.len(),
            "transfer buffer shorter than its length"
        );
        let bytes = size_of::<RawUrb>() + iso.len() * size_of::<RawIso>();
        let mut t = UsbfsUrb {
            storage: vec![0u64; bytes.div_ceil(8)],
            buf,
            n_iso: iso.len(),
        };
        let buffer = if length == 0 {
            std::ptr::null_mut()
        } else {
            t.buf.as_mut_ptr() as *mut c_void
        };
        let raw = t.raw_mut();
        raw.typ = typ;
        raw.endpoint = endpoint;
        raw.flags = flags;
        raw.buffer = buffer;
        raw.buffer_length = length as i32;
        raw.start_frame = start_frame;
        raw.number_of_packets = iso.len() as i32;
        for (i, &l) in iso.iter().enumerate() {
            t.iso_mut(i).length = l;
        }
        t
    }

    fn raw(&self) -> &RawUrb {
        // SAFETY: storage is at least size_of::<RawUrb>() bytes, 8-aligned,
        // and zero-initialised, a valid RawUrb bit pattern.
        unsafe { &*(self.storage.as_ptr() as *const RawUrb) }
    }

    fn raw_mut(&mut self) -> &mut RawUrb {
        // SAFETY: as in `raw`.
        unsafe { &mut *(self.storage.as_mut_ptr() as *mut RawUrb) }
    }

    fn iso_ptr(&self, i: usize) -> *const RawIso {
        assert!(i < self.n_iso);
        // SAFETY: within storage, which holds n_iso descriptors after the header.
        unsafe {
            (self.storage.as_ptr() as *const u8).add(size_of::<RawUrb>() + i * size_of::<RawIso>())
                as *const RawIso
        }
    }

    fn iso_mut(&mut self, i: usize) -> &mut RawIso {
        // SAFETY: see iso_ptr; RawIso is 4-aligned and the header size is a multiple of 4.
        unsafe { &mut *(self.iso_ptr(i) as *mut RawIso) }
    }

    /// How the URB failed, from its status (0 or a negative errno).
    pub fn failure(&self) -> Option<Errno> {
        match self.raw().status {
            0 => None,
            status => Some(
                status
                    .checked_neg()
                    .map_or(Errno::PROTO, Errno::from_raw_os_error),
            ),
        }
    }

    pub fn actual_length(&self) -> usize {
        self.raw().actual_length.max(0) as usize
    }

    pub fn start_frame(&self) -> i32 {
        self.raw().start_frame
    }

    pub fn error_count(&self) -> i32 {
        self.raw().error_count
    }

    pub fn flags(&self) -> u32 {
        self.raw().flags
    }

    /// `(actual_length, status)` of ISO packet `i`.
    pub fn iso_result(&self, i: usize) -> (u32, i32) {
        // SAFETY: see iso_ptr.
        let p = unsafe { &*self.iso_ptr(i) };
        (p.actual_length, p.status as i32)
    }

    pub fn iso_count(&self) -> usize {
        self.n_iso
    }

    pub fn buf(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_buf(self) -> Vec<u8> {
        self.buf
    }
}

/// The errno an importer sees when usbfs refuses a request (the ioctl
/// failed): one that means the device is gone is ENODEV, whatever the
/// ioctl said; anything unexpected is a protocol error.
///
/// This and [`completion_errno`] are the crate's only translation of usbfs
/// errnos. They differ on purpose: a refused submit's ENOENT means the
/// device went away, while an URB that completes with -ENOENT was
/// unlinked, which the importer must see as such.
pub fn refusal_errno(e: Errno) -> WireErrno {
    let forwarded = [
        Errno::PIPE,
        Errno::PROTO,
        Errno::ILSEQ,
        Errno::OVERFLOW,
        Errno::NOMEM,
        Errno::INVAL,
        Errno::REMOTEIO,
        Errno::NOSPC,
        Errno::XDEV,
        Errno::CONNRESET,
        Errno::BUSY,
    ];
    if e == Errno::NODEV || e == Errno::NOENT || e == Errno::SHUTDOWN {
        WireErrno::ENODEV
    } else if e == Errno::TIMEDOUT || e == Errno::TIME {
        WireErrno::ETIME
    } else if forwarded.contains(&e) {
        WireErrno(e.raw_os_error())
    } else {
        WireErrno::EPROTO
    }
}

/// The errno an importer sees for a URB that completed with `failure`
/// ([`UsbfsUrb::failure`]), forwarded as usbip-host forwards it: Linux
/// errnos are the wire's.
pub fn completion_errno(failure: Errno) -> WireErrno {
    WireErrno(failure.raw_os_error())
}

/// An open usbfs device node.
pub struct Usbfs {
    /// Registered with tokio on first use; deregistered before `fd` closes.
    afd: Option<AsyncFd<FdRef>>,
    fd: ManuallyDrop<OwnedFd>,
    /// Submitted and not yet reaped, by id.
    inflight: HashMap<u64, UsbfsUrb>,
}

/// Runs one usbfs ioctl on `fd`.
///
/// # Safety
/// `request`'s opcode must be a usbfs ioctl whose argument is what
/// `request` passes, and any memory it points to must outlive the call (and,
/// for a submitted URB, stay put until it is reaped).
unsafe fn usbfs_ioctl<I: Ioctl>(fd: impl AsFd, request: I) -> Result<I::Output, Errno> {
    // SAFETY: upheld by the caller.
    unsafe { ioctl(fd, request) }
}

impl Usbfs {
    pub fn open(path: &Path) -> io::Result<Usbfs> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        Ok(Usbfs {
            afd: None,
            fd: ManuallyDrop::new(fd),
            inflight: HashMap::new(),
        })
    }

    /// An ioctl whose argument is an `unsigned int` the kernel reads.
    fn set_uint<const OPCODE: Opcode>(&self, value: u32) -> Result<(), Errno> {
        // SAFETY: every caller's OPCODE takes a pointer to an unsigned int
        // (checked against the opcode's size above).
        unsafe { usbfs_ioctl(&*self.fd, Setter::<OPCODE, c_uint>::new(value)) }
    }

    pub fn claim_interface(&self, iface: u8) -> Result<(), Errno> {
        self.set_uint::<{ USBDEVFS_CLAIMINTERFACE as Opcode }>(iface.into())
    }

    pub fn release_interface(&self, iface: u8) -> Result<(), Errno> {
        self.set_uint::<{ USBDEVFS_RELEASEINTERFACE as Opcode }>(iface.into())
    }

    /// Detaches whatever kernel driver has `iface` and claims it, atomically
    /// (`USBDEVFS_DISCONNECT_CLAIM` with no flags).
    pub fn disconnect_claim(&self, iface: u8) -> Result<(), Errno> {
        let claim = DisconnectClaim {
            interface: iface.into(),
            flags: 0,
            driver: [0; 256],
        };
        // SAFETY: USBDEVFS_DISCONNECT_CLAIM reads a usbdevfs_disconnect_claim.
        unsafe {
            usbfs_ioctl(
                &*self.fd,
                Setter::<{ USBDEVFS_DISCONNECT_CLAIM as Opcode }, _>::new(claim),
            )
        }
    }

    /// Lets the kernel probe drivers for an interface that has none
    /// (`USBDEVFS_IOCTL` with `USBDEVFS_CONNECT`).
    pub fn connect_interface(&self, iface: u8) -> Result<(), Errno> {
        let request = IoctlArg {
            ifno: iface.into(),
            ioctl_code: USBDEVFS_CONNECT as c_int,
            data: std::ptr::null_mut(),
        };
        // SAFETY: USBDEVFS_IOCTL reads a usbdevfs_ioctl; CONNECT has no data.
        unsafe {
            usbfs_ioctl(
                &*self.fd,
                Setter::<{ USBDEVFS_IOCTL as Opcode }, _>::new(request),
            )
        }
    }

    pub fn set_interface(&self, iface: u8, alt: u8) -> Result<(), Errno> {
        let setting = SetInterface {
            interface: iface.into(),
            altsetting: alt.into(),
        };
        // SAFETY: USBDEVFS_SETINTERFACE reads a usbdevfs_setinterface.
        unsafe {
            usbfs_ioctl(
                &*self.fd,
                Setter::<{ USBDEVFS_SETINTERFACE as Opcode }, _>::new(setting),
            )
        }
    }

    pub fn set_configuration(&self, value: u8) -> Result<(), Errno> {
        self.set_uint::<{ USBDEVFS_SETCONFIGURATION as Opcode }>(value.into())
    }

    pub fn clear_halt(&self, ep: u8) -> Result<(), Errno> {
        self.set_uint::<{ USBDEVFS_CLEAR_HALT as Opcode }>(ep.into())
    }

    pub fn reset(&self) -> Result<(), Errno> {
        // SAFETY: USBDEVFS_RESET takes no argument.
        unsafe { usbfs_ioctl(&*self.fd, NoArg::<{ USBDEVFS_RESET as Opcode }>::new()) }
    }

    /// Submits `urb` under `id`. On failure the URB comes back.
    pub fn submit(&mut self, id: u64, mut urb: UsbfsUrb) -> Result<(), (UsbfsUrb, Errno)> {
        urb.raw_mut().usercontext = id as usize as *mut c_void;
        let raw = urb.storage.as_mut_ptr() as *mut c_void;
        // SAFETY: USBDEVFS_SUBMITURB takes a pointer to a usbdevfs_urb (with
        // its ISO descriptors after it), which `urb` owns; the heap storage
        // and buffer stay put while `inflight` holds the URB, until it is
        // reaped or the descriptor closes.
        let submitted = unsafe {
            usbfs_ioctl(
                &*self.fd,
                IntegerSetter::<{ USBDEVFS_SUBMITURB as Opcode }>::new_pointer(raw),
            )
        };
        match submitted {
            Ok(()) => {
                self.inflight.insert(id, urb);
                Ok(())
            }
            Err(e) => Err((urb, e)),
        }
    }

    /// Asks the kernel to cancel URB `id`; it is still reaped later.
    pub fn discard(&mut self, id: u64) -> Result<(), Errno> {
        let Some(urb) = self.inflight.get_mut(&id) else {
            return Err(Errno::INVAL);
        };
        let raw = urb.storage.as_mut_ptr() as *mut c_void;
        // SAFETY: USBDEVFS_DISCARDURB takes the pointer it was submitted with.
        unsafe {
            usbfs_ioctl(
                &*self.fd,
                IntegerSetter::<{ USBDEVFS_DISCARDURB as Opcode }>::new_pointer(raw),
            )
        }
    }

    /// One completed URB, `None` when none is ready, or `ENODEV` once the
    /// device is gone and nothing is left to reap.
    pub fn reap(&mut self) -> Result<Option<(u64, UsbfsUrb)>, Errno> {
        // SAFETY: USBDEVFS_REAPURBNDELAY writes one usbdevfs_urb pointer.
        let reaped = unsafe {
            usbfs_ioctl(
                &*self.fd,
                Getter::<{ USBDEVFS_REAPURBNDELAY as Opcode }, *mut RawUrb>::new(),
            )
        };
        let raw = match reaped {
            Ok(raw) if !raw.is_null() => raw,
            Ok(_) | Err(Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e),
        };
        // SAFETY: the kernel hands back a pointer we submitted, to a RawUrb
        // that is still owned by one of our in-flight URBs.
        let id = unsafe { (*raw).usercontext } as usize as u64;
        match self.inflight.remove(&id) {
            Some(urb) => Ok(Some((id, urb))),
            // Cannot happen: every pointer we submit is in `inflight`.
            None => Err(Errno::IO),
        }
    }

    /// Ready when URBs may be reapable (usbfs polls writable then), with
    /// the readiness already cleared; registers `cx` otherwise. Must run
    /// inside a tokio runtime.
    pub fn poll_reapable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.afd.is_none() {
            // SAFETY: the AsyncFd lives in `self` and is dropped in
            // `Drop for Usbfs` before the descriptor is closed.
            let a = unsafe {
                AsyncFd::register_with_interest(FdRef(self.fd.as_raw_fd()), Interest::WRITABLE)
            }
            .map_err(|e| e.into_parts().1)?;
            self.afd = Some(a);
        }
        let afd = self.afd.as_ref().expect("just set");
        match afd.poll_write_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(mut g)) => {
                g.clear_ready();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Blocks until URBs may be reapable, the device is gone, or `timeout`
    /// has passed, with poll(2): for a thread that may block (an import's
    /// drain runs on the blocking pool), never a runtime's worker. Returns
    /// whether the descriptor became ready.
    pub fn wait_reapable(&self, timeout: Duration) -> Result<bool, Errno> {
        // POLLOUT: a completed URB waits (usbdev_poll); POLLHUP and POLLERR,
        // a device gone, come whether asked for or not.
        let mut fds = [PollFd::new(&*self.fd, PollFlags::OUT)];
        // Rounded up to a millisecond: a wait cut to 0 would spin until the
        // deadline (poll(2) counts milliseconds).
        let ms = timeout.as_nanos().div_ceil(1_000_000);
        let timeout = Timespec {
            tv_sec: (ms / 1000).min(i64::MAX as u128) as i64,
            tv_nsec: ((ms % 1000) * 1_000_000) as _,
        };
        Ok(rustix::event::poll(&mut fds, Some(&timeout))? > 0)
    }

    /// Leaves the runtime whose reactor watches the descriptor. Each import
    /// is served on one of the server's worker runtimes, and the next
    /// import may be on another: it registers again on its first poll.
    pub fn unregister(&mut self) {
        self.afd = None;
    }

    pub fn inflight_ids(&self) -> Vec<u64> {
        self.inflight.keys().copied().collect()
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }
}

impl AsRawFd for Usbfs {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for Usbfs {
    fn drop(&mut self) {
        self.afd = None;
        // SAFETY: dropped exactly once, here. Closing the descriptor makes
        // the kernel kill and wait for every URB still submitted, so the
        // in-flight buffers are freed only after the kernel let go of them.
        unsafe { ManuallyDrop::drop(&mut self.fd) };
        self.inflight.clear();
    }
}

/// Registers a descriptor this crate owns with tokio's reactor (the
/// uevent socket's; tokio makes that registration `unsafe`, and this
/// module holds the crate's unsafe code).
pub fn register_owned(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, so it stays open while
    // registered and nothing else can replace or close it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// A raw fd for tokio's `AsyncFd`, borrowed from a [`Usbfs`] that outlives it.
pub struct FdRef(pub RawFd);

impl AsRawFd for FdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernel_headers() {
        // What <linux/usbdevice_fs.h> gives on x86-64, as a cross-check of
        // the linux-raw-sys constants and of the struct layouts.
        assert_eq!(size_of::<RawUrb>(), 56);
        assert_eq!(USBDEVFS_SUBMITURB, 0x8038550a);
        assert_eq!(USBDEVFS_DISCARDURB, 0x550b);
        assert_eq!(USBDEVFS_REAPURBNDELAY, 0x4008550d);
        assert_eq!(USBDEVFS_CLAIMINTERFACE, 0x8004550f);
        assert_eq!(USBDEVFS_DISCONNECT_CLAIM, 0x8108551b);
        assert_eq!(USBDEVFS_IOCTL, 0xc0105512);
        assert_eq!(USBDEVFS_RESET, 0x5514);
        assert_eq!(USBDEVFS_CONNECT, 0x5517);
    }

    #[test]
    fn errnos_map_to_the_wire_in_one_place() {
        assert_eq!(refusal_errno(Errno::NODEV), WireErrno::ENODEV);
        assert_eq!(refusal_errno(Errno::NOENT), WireErrno::ENODEV);
        assert_eq!(refusal_errno(Errno::SHUTDOWN), WireErrno::ENODEV);
        assert_eq!(refusal_errno(Errno::PIPE), WireErrno::EPIPE);
        assert_eq!(refusal_errno(Errno::TIMEDOUT), WireErrno::ETIME);
        assert_eq!(refusal_errno(Errno::BUSY), WireErrno::EBUSY);
        assert_eq!(refusal_errno(Errno::ACCESS), WireErrno::EPROTO);
        assert_eq!(completion_errno(Errno::PIPE), WireErrno::EPIPE);
        assert_eq!(completion_errno(Errno::CONNRESET), WireErrno::ECONNRESET);
        // An unlinked URB stays unlinked, a disabled port stays that.
        assert_eq!(completion_errno(Errno::NOENT), WireErrno(2));
        assert_eq!(completion_errno(Errno::SHUTDOWN), WireErrno(108));
        let status = |status: i32| {
            let mut urb = UsbfsUrb::new(TYPE_BULK, 0x81, 0, vec![0; 8], 8, &[], 0);
            urb.raw_mut().status = status;
            urb.failure()
        };
        assert_eq!(status(0), None);
        assert_eq!(status(-71), Some(Errno::PROTO));
        assert_eq!(status(-2), Some(Errno::NOENT));
        assert_eq!(status(i32::MIN), Some(Errno::PROTO));
    }

    #[test]
    fn urb_layout_carries_iso_descriptors() {
        let t = UsbfsUrb::new(TYPE_ISO, 0x81, URB_ISO_ASAP, vec![0; 30], 30, &[10, 20], 0);
        assert_eq!(t.iso_count(), 2);
        assert_eq!(t.storage.len() * 8, 56 + 24);
        assert_eq!(t.raw().buffer_length, 30);
        assert_eq!(t.raw().number_of_packets, 2);
    }
}
