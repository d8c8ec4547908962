//! The client half of usbwire.
//!
//! [`list`] and [`import`] speak the OP phase to any USB/IP server (ours,
//! the kernel's usbipd, usbipd-win). A [`RemoteDevice`] then drives the
//! imported device entirely from user space, with no kernel module: many
//! transfers in flight, cancellation with Linux's unlink semantics, and
//! typed errors.
//!
//! The protocol lives in sans-IO cores that any transport can drive:
//! [`OpExchange`] for the OP phase and [`Connection`] for the URB phase.
//! The tokio driver behind [`RemoteDevice`] and the blocking one behind
//! [`import_blocking`] only move bytes.
//!
//! [`vhci`] hands an imported device to the kernel's vhci-hcd instead
//! (`usbip attach/detach/port`), and [`persist`] keeps it there across
//! connection losses (`usbip attach --persist`). Local USB devices (`usbip list -l`) are
//! `usbwire_host::sysfs`'s.

mod blocking;
mod connection;
mod error;
mod input;
mod op;
pub mod persist;
mod remote;
mod tls;
mod transfer;
mod transport;
pub mod vhci;

pub use blocking::import_blocking;
pub use connection::{
    Completed, Connection, ConnectionConfig, ConnectionError, SubmitError, MAX_TRANSMIT_SLICES,
};
pub use error::{ClientError, TransferError};
pub use op::{split_token, OpExchange};
pub use remote::{
    import, import_stream, import_tls, list, list_tls, PendingTransfer, RemoteDevice,
};
pub use tls::{
    certificate_fingerprint, self_signed, Fingerprint, SelfSigned, ServerTrust, TlsClientConfig,
    TlsError,
};
pub use transfer::{TransferOutcome, TransferRequest};
pub use usbwire_proto::{DeviceInfo, Direction, Errno, IsoPacket, SetupPacket, Speed};
pub use vhci::{
    AttachError, Attached, AttrWriter, Hub, ImportedDevice, PortRecord, PortState, PortStatus,
    SysfsWriter, Vhci, VhciError,
};
