//! Exporting real USB devices through Linux usbfs.
//!
//! * [`sysfs`] is the one model of local USB devices: the enumerator that
//!   `usbip list -l` and `bind` share, and the one hub rule.
//! * [`bind::Manager`] binds and unbinds devices (busy checks in [`busy`],
//!   bindings persisted by [`state`]) and follows hotplug from kernel
//!   uevents ([`hotplug`]).
//! * [`backend::UsbfsBackend`] is the [`usbwire_usb::Backend`] of a bound
//!   device, which the manager hands to the daemon's [`export::ExportTable`].
//! * [`stub`]: devices bound to the kernel's `usbip-host`, exported by
//!   handing each import's socket to it.
//! * [`handoff::SysfsHandoff`] gives an import's connection to a kernel
//!   driver (usbip-host, usbip-vudc) through its sysfs attributes.
//! * [`usbfs`] holds the raw ioctls, the only unsafe code of the crate.
//! * [`vudc`] exports gadgets bound to the kernel's `usbip-vudc` (`usbipd -e`).
#![deny(unsafe_code)]

pub mod backend;
pub mod bind;
pub mod busy;
pub mod export;
pub mod handoff;
pub mod hotplug;
pub mod state;
pub mod stub;
pub mod sysfs;
pub mod usbfs;
pub mod vudc;

pub use backend::UsbfsBackend;
pub use bind::{BindError, BindingStatus, Manager};
pub use export::{ExportRefusal, ExportReservation, ExportTable, Unexported};
pub use handoff::KernelRunDevice;
pub use handoff::SysfsHandoff;
pub use stub::kernel_stub_backend;
pub use sysfs::{ExportStatus, LocalDevice, LocalError, LocalInterface, NotExportable, Roots};
pub use vudc::{vudc_backend, VudcExports, VudcGadget, VudcScan};
