//! Emulated USB devices, the user-space counterpart of the kernel's gadget
//! drivers.
//!
//! A device is a [`Function`] (the class- or vendor-specific part) wrapped
//! in an [`EmulatedDevice`], which answers the chapter-9 standard requests
//! once for every function and keeps the real halt state of each endpoint.
//! Functions answer control requests by returning values, `None` meaning
//! "not mine", so each can be unit-tested without a server.

pub mod acm;
pub mod backend;
pub mod core;
pub mod descriptors;
pub mod hid;
pub mod msc;
#[cfg(test)]
mod test_util;
pub mod testdev;

pub use crate::backend::EmulatedBackend;
pub use crate::core::{EmulatedDevice, Function};
pub use crate::descriptors::{Descriptors, EndpointInfo, TransferType};
pub use usbwire_proto::{Errno, SetupPacket, Speed};
