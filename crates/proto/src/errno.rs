//! Linux errno values as they travel on the wire.
//!
//! USB/IP carries URB statuses as *negative* Linux errnos, whatever the
//! platform of either peer, so the numbers are fixed here rather than taken
//! from the host's libc.

use core::fmt;

/// A positive Linux errno. On the wire a status is `-errno`, and 0 is success.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident = $val:expr, $text:expr;)*) => {
        impl Errno {
            $(#[doc = $text] pub const $name: Errno = Errno($val);)*

            /// The symbolic name (`"EPIPE"`), or `None` for a number outside the table.
            pub fn name(self) -> Option<&'static str> {
                match self.0 { $($val => Some(stringify!($name)),)* _ => None }
            }

            /// What the status means for a USB transfer, in words a person can act on.
            pub fn describe(self) -> &'static str {
                match self.0 { $($val => $text,)* _ => "unknown error" }
            }
        }
    };
}

errnos! {
    EPERM = 1, "operation not permitted";
    ENOENT = 2, "URB was not linked or was unlinked synchronously";
    EIO = 5, "I/O error";
    ENXIO = 6, "no such device or address";
    E2BIG = 7, "argument list too long";
    EAGAIN = 11, "resource temporarily unavailable, try again";
    ENOMEM = 12, "out of memory";
    EBUSY = 16, "device or resource busy";
    EEXIST = 17, "already exists";
    EXDEV = 18, "isochronous transfer only partially completed";
    ENODEV = 19, "device was removed";
    EINVAL = 22, "invalid argument";
    ENOSPC = 28, "no space left for the requested bandwidth";
    EPIPE = 32, "endpoint stalled";
    ENOSR = 63, "buffer error during transfer";
    ETIME = 62, "transfer timed out";
    ECOMM = 70, "data overrun during transfer";
    EPROTO = 71, "bitstuff or unknown USB protocol error";
    EOVERFLOW = 75, "babble: the device sent more data than requested";
    EILSEQ = 84, "CRC mismatch";
    EOPNOTSUPP = 95, "operation not supported";
    ECONNRESET = 104, "URB was unlinked asynchronously";
    ESHUTDOWN = 108, "device or host controller was shut down";
    ETIMEDOUT = 110, "connection timed out";
    ECONNREFUSED = 111, "connection refused";
    EINPROGRESS = 115, "URB still pending";
    EREMOTEIO = 121, "short transfer with URB_SHORT_NOT_OK set";
}

impl Errno {
    /// The value of a USB/IP `status` field for this error.
    pub const fn to_status(self) -> i32 {
        -self.0
    }

    /// Reads a wire `status`: 0 is success, a negative value an errno.
    /// A positive value is not something Linux sends; it is kept as is so
    /// that nothing is silently turned into success.
    pub fn from_status(status: i32) -> Result<(), Errno> {
        match status {
            0 => Ok(()),
            s if s < 0 => Err(Errno(s.checked_neg().unwrap_or(i32::MAX))),
            s => Err(Errno(s)),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{} ({n}, -{})", self.describe(), self.0),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl std::error::Error for Errno {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip() {
        assert_eq!(Errno::EPIPE.to_status(), -32);
        assert_eq!(Errno::from_status(-104), Err(Errno::ECONNRESET));
        assert_eq!(Errno::from_status(0), Ok(()));
        assert_eq!(Errno::from_status(i32::MIN), Err(Errno(i32::MAX)));
        assert_eq!(Errno::EREMOTEIO.name(), Some("EREMOTEIO"));
        assert!(Errno::EPIPE.to_string().contains("stalled"));
    }
}
