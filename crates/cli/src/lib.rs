//! Shared code of the `usbipd` and `usbip` binaries.

pub mod config;
pub mod control;
pub mod devices;
pub mod discovery;
pub mod fleet;
pub mod listen;
pub mod metrics;
pub mod names;
pub mod persist;
pub mod reserve;
