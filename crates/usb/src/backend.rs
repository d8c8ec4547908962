//! What the session needs from an exported device, whatever runs it.

use std::io;
use std::os::fd::BorrowedFd;
use std::task::{Context, Poll};

use usbwire_proto::{DeviceInfo, Direction, Errno, IsoPacket, SetupPacket};

use crate::descriptor::TransferType;

/// The server's name for an URB: unique among the URBs of one import.
/// Backends key what they keep per URB on it, never on the client's
/// seqnum, which is the client's to choose and to reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UrbId(pub u64);

impl std::fmt::Display for UrbId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One URB as the server runs it.
#[derive(Debug)]
pub struct Urb {
    pub id: UrbId,
    /// The client's name for it, echoed in the replies.
    pub seqnum: u32,
    /// Endpoint number, 0..=15.
    pub ep: u8,
    pub direction: Direction,
    pub transfer_flags: u32,
    pub setup: SetupPacket,
    /// transfer_buffer_length.
    pub length: usize,
    /// OUT: the payload, `length` bytes. IN: at least `length` bytes of room;
    /// the backend writes the data at the front.
    pub buf: Vec<u8>,
    pub iso: Vec<IsoPacket>,
    pub start_frame: i32,
    pub interval: i32,
    /// Set by the session once the backend has seen the URB: before that,
    /// an error hold can still take it back without anything having run.
    pub started: bool,
}

impl Urb {
    /// Endpoint address, with 0x80 for IN; control is always 0.
    pub fn ep_address(&self) -> u8 {
        if self.ep == 0 {
            0
        } else {
            self.ep | self.direction.ep_bit()
        }
    }
}

/// An exported device, as a session drives it.
///
/// `poll_urb` runs the URB at the front of an endpoint's queue in the manner
/// of `Future::poll`: `Pending` means nothing was consumed or produced yet
/// and the backend will wake `cx` when it can make progress. The session,
/// not the backend, decides which URB may run (the server's `queue.rs`).
///
/// Control transfers reach the backend through `poll_urb` on endpoint 0,
/// a port reset included; [`crate::StateChange::recognise`] names the
/// requests among them that change device state.
pub trait Backend: Send + 'static {
    /// The device record for devlist and import, with this bus id.
    fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo;

    /// The transfer type of an endpoint address in the current settings,
    /// `None` for an endpoint the device does not have.
    fn transfer_type(&self, ep_address: u8) -> Option<TransferType>;

    fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion>;

    /// How many URBs of one endpoint may be started at once. A device that
    /// completes transfers itself runs one at a time; a real device keeps
    /// several in the host controller so the bus never idles.
    fn max_active(&self, _ep_address: u8) -> usize {
        1
    }

    /// Cancels a started URB. `true`: it is gone and moved no data (the
    /// session answers the unlink with -ECONNRESET at once). `false`: the
    /// cancellation is under way and the URB will still complete through
    /// `poll_urb`, with -ECONNRESET if it was stopped in time or its real
    /// result if not. A transfer that returned `Pending` consumed nothing,
    /// so the default drops it.
    fn cancel(&mut self, _urb: &mut Urb) -> bool {
        true
    }

    /// The device was unplugged: the session completes what is left with
    /// -ENODEV and closes the import, so the importer sees a disconnect
    /// rather than a device that never answers.
    fn is_gone(&self) -> bool {
        false
    }

    /// The importer went away: back to a state a new importer expects.
    /// It may block (drain a real device, flush a disk): the server calls
    /// it on its blocking pool, never where URBs are polled.
    fn release(&mut self);

    /// Makes acknowledged writes durable; blocks until they are.
    fn flush(&mut self) -> io::Result<()>;

    /// The device descriptor and the current configuration's descriptor
    /// (with its interfaces and endpoints), as GET_DESCRIPTOR answers
    /// them, if the backend has them at hand: a packet capture replays
    /// them at the start of an import so that its reader knows the
    /// interfaces' classes. It must not block.
    fn descriptors(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        None
    }

    /// The device's serial number (its iSerialNumber string), if it has
    /// one and the backend has it at hand: what a fleet publishes to tell
    /// two devices of one model apart. It must not block.
    fn serial(&self) -> Option<String> {
        None
    }

    /// A device that a kernel driver runs (usbip-host, usbip-vudc): an
    /// import gives the driver the connection itself, as the C usbipd
    /// does, instead of running URBs through `poll_urb`. `None` for a
    /// device whose URBs the server runs.
    fn kernel_handoff(&mut self) -> Option<&mut dyn KernelHandoff> {
        None
    }
}

/// Where a kernel driver that takes USB/IP connections stands, from its
/// sysfs `usbip_status` (`enum usbip_device_status` in the kernel's
/// usbip_common.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelState {
    /// SDEV_ST_AVAILABLE: it holds no connection and takes one.
    Available,
    /// SDEV_ST_USED: it runs a connection.
    Used,
    /// SDEV_ST_ERROR or a value this code does not know: it takes no
    /// connection (the raw value, for the log).
    Unusable(u32),
}

impl KernelState {
    /// The state a `usbip_status` attribute's text names.
    pub fn parse(text: &str) -> io::Result<KernelState> {
        let value: u32 = text.trim().parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("usbip_status {:?} is not a number", text.trim()),
            )
        })?;
        Ok(match value {
            1 => KernelState::Available,
            2 => KernelState::Used,
            v => KernelState::Unusable(v),
        })
    }
}

/// The kernel driver behind a [`Backend::kernel_handoff`] device.
///
/// The session calls these on the server's blocking pool (they read and
/// write sysfs, and the driver starts its threads inside the write), never
/// where URBs are polled, and calls `hand_over` only after OP_REP_IMPORT
/// has gone out, once `state` said `Available`.
pub trait KernelHandoff: Send {
    /// The driver's name, for the log: `usbip-host`, `usbip-vudc`.
    fn driver(&self) -> &str;

    /// What the driver's `usbip_status` says now. An error means the
    /// device has left the driver (unbound, unplugged).
    fn state(&self) -> io::Result<KernelState>;

    /// Gives the driver the connection: writes the socket's descriptor
    /// number to its `usbip_sockfd`. The kernel looks the number up in this
    /// process and keeps its own reference, so the caller may close its
    /// descriptors afterwards; the connection then lives until the driver
    /// ends it (its `state` leaves `Used`) or the socket is shut down.
    fn hand_over(&mut self, socket: BorrowedFd<'_>) -> io::Result<()>;
}

/// How an URB given to `poll_urb` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// It ran and moved `actual` bytes, and failed if `error` says so. A
    /// transfer can fail after moving data (a device that stalls halfway
    /// through a bulk IN): the importer gets both, as usbip-host sends
    /// them, so that its class driver can account for the data that came.
    Ran { actual: usize, error: Option<Errno> },
    /// Given back without having run: a real host controller cancelled it
    /// because an earlier URB of its endpoint failed (usbfs bulk
    /// continuation). The session puts it back at the front of the
    /// endpoint's waiting queue, where the error hold decides when, or
    /// whether, it runs. No data may have moved for it.
    NotStarted,
}

impl Completion {
    pub fn failed(e: Errno) -> Completion {
        Completion::Ran {
            actual: 0,
            error: Some(e),
        }
    }
}

/// Emulated devices either move data or fail before any moved.
impl From<Result<usize, Errno>> for Completion {
    fn from(r: Result<usize, Errno>) -> Completion {
        match r {
            Ok(actual) => Completion::Ran {
                actual,
                error: None,
            },
            Err(e) => Completion::failed(e),
        }
    }
}
