//! One client connection: the OP phase, then the URB phase of an import.
//!
//! The protocol lives in two sans-IO state machines, in the manner of
//! quinn-proto's `Connection`: [`OpSession`] (one OP request and its reply)
//! and [`UrbSession`] (an import's URBs). Neither touches a socket or a
//! clock: bytes go in through a buffer they lend, replies come out as
//! `IoSlice`s, time is an argument, and the backend is polled with a waker
//! the driver gives. [`driver`] runs them over anything that reads into a
//! buffer and writes `IoSlice`s (plain TCP today; TLS and sockets handed to
//! a kernel driver are further transports of the same shape).
//!
//! Every reply of a connection goes through one ordered output queue. That
//! makes the reply-ordering race of Linux's usbip-host (a RET_UNLINK
//! overtaking the RET_SUBMIT it refers to) impossible by construction, and
//! lets emulated devices be answered without a task per URB.

use std::time::Duration;

use usbwire_proto::Limits;

use crate::ServerConfig;

mod core;
pub(crate) mod driver;
#[cfg(test)]
mod kernel_tests;
mod op;
mod output;
mod pool;
#[cfg(test)]
mod tests;

pub use self::core::{ReadBuffers, UrbSession};
pub use self::op::{OpEvent, OpSession};

/// How long a client may take to send its OP request.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Unlinks remembered for URBs not yet submitted (the vhci race), at most.
pub const MAX_EARLY_UNLINKS: usize = 1024;
/// OUT payloads at least this long are read from the transport straight
/// into their URB's buffer; shorter ones are copied out of the read buffer,
/// which costs less than the extra system calls.
pub const DIRECT_READ_MIN: usize = 16 * 1024;
/// How much the read buffer grows by when it runs short of room.
pub const READ_CHUNK: usize = 256 * 1024;

/// The bounds and policies one import's session runs under.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    pub limits: Limits,
    /// URBs in flight before the session stops taking commands.
    pub max_urbs_in_flight: usize,
    /// Transfer-buffer bytes in flight (and reply bytes not yet sent)
    /// before the session stops taking commands.
    pub max_bytes_in_flight: usize,
    /// Hold an endpoint's queue after an error (see `queue.rs`).
    pub hold_on_error: bool,
    /// How long an error hold lasts if the importer does not react.
    pub hold_grace: Duration,
    /// How long replies may wait with the client taking none of them
    /// before the connection is ended.
    pub reply_stall_timeout: Duration,
}

impl SessionConfig {
    /// A server's bounds, with the error-hold window for a connection whose
    /// measured round-trip time is `rtt`.
    pub fn new(server: &ServerConfig, rtt: Option<Duration>) -> Self {
        SessionConfig {
            limits: server.limits,
            max_urbs_in_flight: server.max_urbs_in_flight,
            max_bytes_in_flight: server.max_bytes_in_flight,
            hold_on_error: server.hold_on_error,
            hold_grace: server.hold_grace(rtt),
            reply_stall_timeout: server.reply_stall_timeout,
        }
    }

    /// How much unprocessed input may be buffered: one largest frame and
    /// change.
    pub fn read_limit(&self) -> usize {
        self.limits.max_transfer_length as usize + READ_CHUNK
    }
}
