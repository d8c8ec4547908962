//! The client half of usbwire.
//!
//! [`list`] and [`import`] speak the OP phase to any USB/IP server (ours,
//! the kernel's usbipd, usbipd-win). A [`RemoteDevice`] then drives the
//! imported device entirely from user space, with no kernel module: many
//! transfers in flight, cancellation with Linux's unlink semantics, and
//! typed errors.
//!
//! [`vhci`] hands an imported device to the kernel's vhci-hcd instead
//! (`usbip attach/detach/port`). Local USB devices (`usbip list -l`) are
//! `usbwire_host::sysfs`'s.

mod error;
mod remote;
pub mod vhci;

pub use error::{ClientError, TransferError};
pub use remote::{
    import, import_stream, list, Completion, RemoteDevice, Transfer, TransferRequest,
};
pub use usbwire_proto::{DeviceInfo, Direction, Errno, IsoPacket, SetupPacket, Speed};
pub use vhci::{
    AttachError, Attached, AttrWriter, Hub, ImportedDevice, PortRecord, PortState, PortStatus,
    SysfsWriter, Vhci, VhciError,
};
