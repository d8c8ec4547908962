//! Sans-IO codec for USB/IP v1.1.1, the protocol of Linux's `usbip-host`,
//! `vhci-hcd` and the `usbip`/`usbipd` tools.
//!
//! Nothing here does I/O. Decoders take the bytes received so far and either
//! return a message with the number of bytes it used, or say how many bytes
//! they need, so a caller can feed them from any transport. Every length a
//! peer declares is checked against [`Limits`] before anything is allocated,
//! because all input is hostile until proven otherwise.
//!
//! Two phases share one TCP connection: the `OP_*` phase (device list and
//! import, see [`op`]) and, after a successful import, the URB phase (see
//! [`urb`]).
#![forbid(unsafe_code)]

pub mod errno;
mod field;
pub mod op;
pub mod urb;
mod wire;

pub use errno::Errno;
pub use field::{BusId, DevicePath, WireString};
pub use op::{
    DeviceInfo, ImportToken, InterfaceInfo, OpReply, OpRequest, OpStatus, Speed, OP_REP_DEVLIST,
    OP_REP_IMPORT, OP_REQ_DEVLIST, OP_REQ_IMPORT, USBIP_VERSION,
};
pub use urb::{
    CmdSubmit, CmdUnlink, Direction, IsoPacket, RetSubmit, RetUnlink, SetupPacket, SubmitHeader,
    UrbCommand, UrbReply, URB_HEADER_LEN,
};

/// What a decoder returns when the buffer holds a whole message or not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A message and how many bytes of the buffer it took.
    Message(T, usize),
    /// The buffer is too short; the message needs at least this many bytes in total.
    NeedMore(usize),
}

impl<T> Decoded<T> {
    /// The message, if complete. Mostly for tests.
    pub fn message(self) -> Option<(T, usize)> {
        match self {
            Decoded::Message(m, n) => Some((m, n)),
            Decoded::NeedMore(_) => None,
        }
    }
}

/// Bounds on what a peer may make us allocate. A frame that declares more is
/// rejected before any buffer is sized from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest `transfer_buffer_length` (and `actual_length`) accepted.
    pub max_transfer_length: u32,
    /// Largest `number_of_packets` on an isochronous URB. Linux uses 1024.
    pub max_iso_packets: u32,
    /// Largest number of devices in an `OP_REP_DEVLIST`.
    pub max_devices: u32,
}

impl Limits {
    /// The kernel's own bound on isochronous packets per URB (`USBIP_MAX_ISO_PACKETS`).
    pub const KERNEL_MAX_ISO_PACKETS: u32 = 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_transfer_length: 8 * 1024 * 1024,
            max_iso_packets: Self::KERNEL_MAX_ISO_PACKETS,
            max_devices: 65_536,
        }
    }
}

/// Why a frame could not be decoded. Any of these ends the connection: the
/// stream can no longer be trusted to be in step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown OP code {0:#06x}")]
    UnknownOpCode(u16),
    #[error("unknown USB/IP command {0:#010x}")]
    UnknownCommand(u32),
    #[error("invalid direction {0} (expected 0 for OUT or 1 for IN)")]
    BadDirection(u32),
    #[error("endpoint number {0} is out of range 0..=15")]
    BadEndpoint(u32),
    #[error("{field} is {value}, above the configured limit {limit}")]
    TooLong {
        field: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("negative {field} ({value})")]
    Negative { field: &'static str, value: i32 },
    #[error("isochronous packet {index} (offset {offset}, length {length}) lies outside the {buffer}-byte buffer")]
    IsoOutOfBounds {
        index: u32,
        offset: u32,
        length: u32,
        buffer: u32,
    },
    #[error("isochronous packets' lengths add up to {sum} bytes, more than the {buffer}-byte buffer they share")]
    IsoLengthsExceedBuffer { sum: u64, buffer: u32 },
    #[error("isochronous packets' actual lengths add up to {sum}, but actual_length is {actual}")]
    IsoActualMismatch { sum: u64, actual: u32 },
    #[error("RET for seqnum {0}, which has no URB in flight")]
    UnknownSeqnum(u32),
    #[error("OP_REP status {0} is not a USB/IP status code")]
    BadStatus(u32),
}
