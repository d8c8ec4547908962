//! Where the bind manager puts the devices it binds: an export table the
//! daemon owns (the server's registry, in usbipd).
//!
//! The manager knows devices and usbfs; the engine knows imports. Between
//! them sits this trait, so that neither crate depends on the other: the
//! manager reserves a bus id before it claims the device (a refused claim
//! leaves no half-exported device behind), then hands the daemon a ready
//! `(DeviceInfo, Box<dyn Backend>)` through [`ExportReservation::commit`],
//! and gets the backend back when the export ends.

use std::net::SocketAddr;

use usbwire_proto::DeviceInfo;
use usbwire_usb::Backend;

/// Why the export table refused an operation on a bus id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportRefusal {
    #[error("{busid} is already exported (EEXIST)")]
    Exported {
        busid: String,
        /// Who imports it right now, if anyone.
        client: Option<SocketAddr>,
    },
    #[error("{busid} is changing state right now (EAGAIN)")]
    Changing { busid: String },
    #[error("{busid} is not exported (ENODEV)")]
    NotExported { busid: String },
    #[error("{busid} is imported by {client} (EBUSY)")]
    Imported { busid: String, client: SocketAddr },
    #[error("{busid} is still being given back after the import by {client} ended (EBUSY)")]
    Releasing { busid: String, client: SocketAddr },
    /// Anything else, as the table words it (an invalid bus id).
    #[error("{0}")]
    Other(String),
}

/// A device whose export ended.
pub struct Unexported {
    pub backend: Box<dyn Backend>,
    /// The client whose import a forced removal ended, if it did.
    pub forced: Option<SocketAddr>,
}

/// A bus id held for a device about to be exported. Dropped without
/// [`ExportReservation::commit`], it gives the bus id back.
pub trait ExportReservation: Send {
    /// Exports the device under the reserved bus id.
    fn commit(self: Box<Self>, info: DeviceInfo, backend: Box<dyn Backend>);
}

/// The daemon's table of exported devices, as the bind manager uses it.
pub trait ExportTable: Send + Sync + 'static {
    /// Holds `busid` for a device about to be exported: refused while it
    /// is exported or changing state.
    fn reserve(&self, busid: &str) -> Result<Box<dyn ExportReservation>, ExportRefusal>;

    /// Ends the export of `busid` now, unless it is imported.
    fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, ExportRefusal>;

    /// Ends the export of `busid` once no import holds it: an import that
    /// is ending is waited for; an active one is refused, or with `force`
    /// ended first. Blocks the calling thread while it waits.
    fn remove_when_free(&self, busid: &str, force: bool) -> Result<Unexported, ExportRefusal>;

    /// `None` if `busid` is not exported; otherwise whether it is imported.
    fn is_imported(&self, busid: &str) -> Option<bool>;
}
