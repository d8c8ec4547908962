//! The USB model shared by the usbwire engine and the devices it exports.
//!
//! * [`Backend`] and its [`Urb`]/[`Completion`]: what a session needs from
//!   an exported device, whoever runs it (an emulated function, a real
//!   device behind usbfs).
//! * [`ch9`]: control requests as typed values, and the one place that
//!   recognises the requests that change device state.
//! * [`descriptor`]: one parser and one builder for standard descriptors.
//!
//! No I/O and no runtime: the wire codec is `usbwire-proto`, the engine
//! `usbwire-server`.
#![forbid(unsafe_code)]

pub mod backend;
pub mod ch9;
pub mod descriptor;

pub use backend::{Backend, Completion, KernelHandoff, KernelState, Urb, UrbId};
pub use ch9::{Recipient, Request, RequestType, StandardRequest, StateChange};
pub use descriptor::TransferType;
