//! Typed errors, each mapped in one place from what the wire or the OS says.

use usbwire_proto::{DecodeError, Errno, OpStatus};

use crate::tls::TlsError;

/// Why a transfer did not complete normally. Mapped from the wire's
/// negative errno by [`TransferError::from_status`] and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("endpoint stalled (EPIPE)")]
    Stall,
    #[error("transfer cancelled (ECONNRESET)")]
    Cancelled,
    #[error("short transfer with URB_SHORT_NOT_OK set (EREMOTEIO)")]
    Short,
    #[error("device disconnected ({0:?})")]
    Disconnected(Option<Errno>),
    #[error("device sent more data than requested (EOVERFLOW)")]
    Overflow,
    #[error("USB protocol error ({0})")]
    Protocol(Errno),
    #[error("transfer failed: {0}")]
    Other(Errno),
}

impl TransferError {
    /// Maps a RET_SUBMIT/RET_UNLINK status; 0 is success.
    pub fn from_status(status: i32) -> Result<(), TransferError> {
        Errno::from_status(status).map_err(|e| match e {
            Errno::EPIPE => TransferError::Stall,
            Errno::ECONNRESET | Errno::ENOENT => TransferError::Cancelled,
            Errno::EREMOTEIO => TransferError::Short,
            Errno::ENODEV | Errno::ESHUTDOWN => TransferError::Disconnected(Some(e)),
            Errno::EOVERFLOW => TransferError::Overflow,
            Errno::EPROTO | Errno::EILSEQ | Errno::ETIME | Errno::ECOMM | Errno::ENOSR => {
                TransferError::Protocol(e)
            }
            e => TransferError::Other(e),
        })
    }

    /// The errno this error stands for on the wire.
    pub fn errno(&self) -> Errno {
        match self {
            TransferError::Stall => Errno::EPIPE,
            TransferError::Cancelled => Errno::ECONNRESET,
            TransferError::Short => Errno::EREMOTEIO,
            TransferError::Disconnected(e) => e.unwrap_or(Errno::ESHUTDOWN),
            TransferError::Overflow => Errno::EOVERFLOW,
            TransferError::Protocol(e) | TransferError::Other(e) => *e,
        }
    }
}

/// Why talking to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network error talking to {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} sent something that is not USB/IP: {source}")]
    Protocol {
        addr: String,
        #[source]
        source: DecodeError,
    },
    #[error("{addr} closed the connection before answering")]
    Closed { addr: String },
    #[error("device {busid} on {addr} {}", import_reason(*.status))]
    ImportRefused {
        addr: String,
        busid: String,
        status: OpStatus,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: TlsError,
    },
    #[error("{addr} answered the device list with {} ({})", .status.name(), .status.describe())]
    ListRefused { addr: String, status: OpStatus },
}

impl ClientError {
    /// A transport failure: a TLS one keeps its type (the TLS layer wraps
    /// it in the `io::Error`), anything else is a network error.
    pub(crate) fn from_io(addr: &str, e: std::io::Error) -> ClientError {
        let addr = addr.to_string();
        if !e.get_ref().is_some_and(|inner| inner.is::<TlsError>()) {
            return ClientError::Io { addr, source: e };
        }
        let kind = e.kind();
        match e.into_inner().map(|inner| inner.downcast::<TlsError>()) {
            Some(Ok(tls)) => ClientError::Tls { addr, source: *tls },
            Some(Err(inner)) => ClientError::Io {
                addr,
                source: std::io::Error::new(kind, inner),
            },
            None => ClientError::Io {
                addr,
                source: kind.into(),
            },
        }
    }
}

fn import_reason(s: OpStatus) -> String {
    match s {
        OpStatus::DevBusy => "is already in use (ST_DEV_BUSY)".into(),
        OpStatus::NoDev => "does not exist or is not exported (ST_NODEV)".into(),
        OpStatus::DevErr => "is in an error state on the server (ST_DEV_ERR)".into(),
        OpStatus::Na => "is not available (ST_NA)".into(),
        s => format!("could not be imported ({}: {})", s.name(), s.describe()),
    }
}
