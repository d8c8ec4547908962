//! Linux usbfs (`/dev/bus/usb/BBB/DDD`): the raw ioctls, and the only
//! unsafe code of this crate.
//!
//! The kernel keeps a pointer to every submitted `usbdevfs_urb` and to its
//! buffer until the URB is reaped. [`Usbfs`] therefore owns every submitted
//! [`Transfer`] until [`Usbfs::reap`] hands it back, and closes the file
//! descriptor (which kills and waits for every URB still in the kernel,
//! `usbdev_release` → `destroy_all_async`) before it frees them. Nothing
//! outside this module can make the kernel write to freed memory.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::OpenOptions;
use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

const fn ioc(dir: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | ((b'U' as u32) << 8) | nr) as libc::c_ulong
}
const NONE: u32 = 0;
const WRITE: u32 = 1;
const READ: u32 = 2;

#[repr(C)]
struct SetInterface {
    interface: u32,
    altsetting: u32,
}

#[repr(C)]
struct DisconnectClaim {
    interface: u32,
    flags: u32,
    driver: [u8; 256],
}

#[repr(C)]
struct IoctlArg {
    ifno: libc::c_int,
    ioctl_code: libc::c_int,
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

const SETINTERFACE: libc::c_ulong = ioc(READ, 4, size_of::<SetInterface>());
const SETCONFIGURATION: libc::c_ulong = ioc(READ, 5, size_of::<u32>());
const SUBMITURB: libc::c_ulong = ioc(READ, 10, size_of::<RawUrb>());
const DISCARDURB: libc::c_ulong = ioc(NONE, 11, 0);
const REAPURBNDELAY: libc::c_ulong = ioc(WRITE, 13, size_of::<*mut c_void>());
const CLAIMINTERFACE: libc::c_ulong = ioc(READ, 15, size_of::<u32>());
const RELEASEINTERFACE: libc::c_ulong = ioc(READ, 16, size_of::<u32>());
const IOCTL: libc::c_ulong = ioc(READ | WRITE, 18, size_of::<IoctlArg>());
const RESET: libc::c_ulong = ioc(NONE, 20, 0);
const CLEAR_HALT: libc::c_ulong = ioc(READ, 21, size_of::<u32>());
const CONNECT: libc::c_ulong = ioc(NONE, 23, 0);
const DISCONNECT_CLAIM: libc::c_ulong = ioc(READ, 27, size_of::<DisconnectClaim>());

/// usbfs URB types.
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
pub struct Transfer {
    /// `RawUrb` followed by `n_iso` `RawIso`, in u64 words for alignment.
    storage: Vec<u64>,
    buf: Vec<u8>,
    n_iso: usize,
}

// SAFETY: the raw pointers in `storage` point into `buf`, which the
// Transfer owns; nothing else aliases them.
unsafe impl Send for Transfer {}

impl Transfer {
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
    ) -> Transfer {
        assert!(
            length <= buf.len(),
            "transfer buffer shorter than its length"
        );
        let bytes = size_of::<RawUrb>() + iso.len() * size_of::<RawIso>();
        let mut t = Transfer {
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

    /// The URB's status: 0 or a negative errno.
    pub fn status(&self) -> i32 {
        self.raw().status
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

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// An open usbfs device node.
pub struct Usbfs {
    /// Registered with tokio on first use; deregistered before `fd` closes.
    afd: Option<AsyncFd<FdRef>>,
    fd: ManuallyDrop<OwnedFd>,
    /// Submitted and not yet reaped, by id.
    inflight: HashMap<u64, Transfer>,
}

impl Usbfs {
    pub fn open(path: &Path) -> io::Result<Usbfs> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)?;
        Ok(Usbfs {
            afd: None,
            fd: ManuallyDrop::new(f.into()),
            inflight: HashMap::new(),
        })
    }

    fn ioctl_ptr<T>(&self, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
        // SAFETY: every caller passes a request whose argument type is T
        // (or no argument), and `arg` outlives the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg) })
    }

    pub fn claim_interface(&self, iface: u8) -> io::Result<()> {
        let mut n = iface as u32;
        self.ioctl_ptr(CLAIMINTERFACE, &mut n).map(drop)
    }

    pub fn release_interface(&self, iface: u8) -> io::Result<()> {
        let mut n = iface as u32;
        self.ioctl_ptr(RELEASEINTERFACE, &mut n).map(drop)
    }

    /// Detaches whatever kernel driver has `iface` and claims it, atomically
    /// (`USBDEVFS_DISCONNECT_CLAIM` with no flags).
    pub fn disconnect_claim(&self, iface: u8) -> io::Result<()> {
        let mut dc = DisconnectClaim {
            interface: iface as u32,
            flags: 0,
            driver: [0; 256],
        };
        self.ioctl_ptr(DISCONNECT_CLAIM, &mut dc).map(drop)
    }

    /// Lets the kernel probe drivers for an interface that has none
    /// (`USBDEVFS_IOCTL` with `USBDEVFS_CONNECT`).
    pub fn connect_interface(&self, iface: u8) -> io::Result<()> {
        let mut a = IoctlArg {
            ifno: iface as libc::c_int,
            ioctl_code: CONNECT as libc::c_int,
            data: std::ptr::null_mut(),
        };
        self.ioctl_ptr(IOCTL, &mut a).map(drop)
    }

    pub fn set_interface(&self, iface: u8, alt: u8) -> io::Result<()> {
        let mut s = SetInterface {
            interface: iface as u32,
            altsetting: alt as u32,
        };
        self.ioctl_ptr(SETINTERFACE, &mut s).map(drop)
    }

    pub fn set_configuration(&self, value: u8) -> io::Result<()> {
        let mut v = value as u32;
        self.ioctl_ptr(SETCONFIGURATION, &mut v).map(drop)
    }

    pub fn clear_halt(&self, ep: u8) -> io::Result<()> {
        let mut v = ep as u32;
        self.ioctl_ptr(CLEAR_HALT, &mut v).map(drop)
    }

    pub fn reset(&self) -> io::Result<()> {
        self.ioctl_ptr::<c_void>(RESET, std::ptr::null_mut())
            .map(drop)
    }

    /// Submits `t` under `id`. On failure the transfer comes back.
    pub fn submit(&mut self, id: u64, mut t: Transfer) -> Result<(), (Transfer, io::Error)> {
        t.raw_mut().usercontext = id as usize as *mut c_void;
        let p = t.storage.as_mut_ptr() as *mut RawUrb;
        match self.ioctl_ptr(SUBMITURB, p) {
            Ok(_) => {
                self.inflight.insert(id, t);
                Ok(())
            }
            Err(e) => Err((t, e)),
        }
    }

    /// Asks the kernel to cancel URB `id`; it is still reaped later.
    pub fn discard(&mut self, id: u64) -> io::Result<()> {
        let Some(t) = self.inflight.get_mut(&id) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let p = t.storage.as_mut_ptr() as *mut RawUrb;
        self.ioctl_ptr(DISCARDURB, p).map(drop)
    }

    /// One completed URB, or `WouldBlock` when none is ready, or `ENODEV`
    /// once the device is gone and nothing is left to reap.
    pub fn reap(&mut self) -> io::Result<(u64, Transfer)> {
        let mut p: *mut RawUrb = std::ptr::null_mut();
        self.ioctl_ptr(REAPURBNDELAY, &mut p)?;
        if p.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        // SAFETY: the kernel hands back a pointer we submitted, to a RawUrb
        // that is still owned by one of our in-flight transfers.
        let id = unsafe { (*p).usercontext } as usize as u64;
        match self.inflight.remove(&id) {
            Some(t) => Ok((id, t)),
            None => Err(io::Error::other("usbfs reaped an URB it was never given")),
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
    pub fn wait_reapable(&self, timeout: Duration) -> io::Result<bool> {
        // POLLOUT: a completed URB waits (usbdev_poll); POLLHUP and POLLERR,
        // a device gone, come whether asked for or not.
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // Rounded up: a wait cut to 0 ms would spin until the deadline.
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd that outlives the call.
        let n = cvt(unsafe { libc::poll(&mut p, 1, ms) })?;
        Ok(n > 0)
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
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(size_of::<RawUrb>(), 56);
        assert_eq!(SUBMITURB, 0x8038550a);
        assert_eq!(DISCARDURB, 0x550b);
        assert_eq!(REAPURBNDELAY, 0x4008550d);
        assert_eq!(CLAIMINTERFACE, 0x8004550f);
        assert_eq!(DISCONNECT_CLAIM, 0x8108551b);
        assert_eq!(IOCTL, 0xc0105512);
        assert_eq!(RESET, 0x5514);
        assert_eq!(CONNECT, 0x5517);
    }

    #[test]
    fn transfer_layout_carries_iso_descriptors() {
        let t = Transfer::new(TYPE_ISO, 0x81, URB_ISO_ASAP, vec![0; 30], 30, &[10, 20], 0);
        assert_eq!(t.iso_count(), 2);
        assert_eq!(t.storage.len() * 8, 56 + 24);
        assert_eq!(t.raw().buffer_length, 30);
        assert_eq!(t.raw().number_of_packets, 2);
    }
}
