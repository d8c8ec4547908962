//! What both ends of a TLS USB/IP connection share: the certificate
//! fingerprints people pin, the adapter rustls reads and writes a
//! non-blocking socket through, a reader that stops at TLS record
//! boundaries, and the hand-off of a connection's keys to kernel TLS.
//!
//! Kernel TLS is what lets the kernel's own vhci-hcd (and usbipd's data
//! path) speak TLS: the handshake runs here in user space, then the
//! traffic keys go to the socket and the kernel encrypts and decrypts
//! below whoever reads and writes it.

#![forbid(unsafe_code)]

mod fingerprint;
pub mod ktls;
mod record;
mod socket;
mod traffic;

pub use fingerprint::{Fingerprint, FingerprintError};
pub use record::{RecordBoundary, RecordBounded};
pub use socket::TryIo;
pub use traffic::{Received, Traffic, TrafficError, MAX_RECORD_PLAINTEXT};
