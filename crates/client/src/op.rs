//! The client's side of the OP phase, sans IO: one request out
//! (OP_REQ_DEVLIST or OP_REQ_IMPORT), one reply in.

use usbwire_proto::{
    DecodeError, DeviceInfo, Limits, OpReply, OpRequest, OpStatus, OP_REP_DEVLIST, OP_REP_IMPORT,
    USBIP_VERSION,
};

use crate::error::ClientError;
use crate::input::InputBuffer;

/// An OP_REP header: the shortest reply, what the first read asks for.
const OP_HEADER_LEN: usize = 8;

/// Which request an [`OpExchange`] carries, and so which reply it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Devlist,
    Import { busid: String },
}

/// One OP request and its reply. A driver sends
/// [`OpExchange::poll_transmit`], then reads into
/// [`OpExchange::read_buffer`] and reports each read to
/// [`OpExchange::handle_input`] until that returns the reply.
///
/// Reads are exact: the buffer lent is never longer than what the reply
/// still lacks, so no byte after the reply is taken from the stream. After
/// an import those bytes belong to the URB phase, which may be vhci-hcd's.
#[derive(Debug)]
pub struct OpExchange {
    asked: Asked,
    request: Vec<u8>,
    sent: usize,
    input: InputBuffer,
    limits: Limits,
}

impl OpExchange {
    /// OP_REQ_DEVLIST.
    pub fn devlist() -> Self {
        Self::new(Asked::Devlist)
    }

    /// OP_REQ_IMPORT of `busid`.
    pub fn import(busid: &str) -> Self {
        Self::new(Asked::Import {
            busid: busid.into(),
        })
    }

    fn new(asked: Asked) -> Self {
        let mut request = Vec::new();
        match &asked {
            Asked::Devlist => OpRequest::Devlist {
                version: USBIP_VERSION,
            },
            Asked::Import { busid } => OpRequest::Import {
                version: USBIP_VERSION,
                busid: busid.as_str().into(),
            },
        }
        .encode(&mut request);
        OpExchange {
            asked,
            request,
            sent: 0,
            input: InputBuffer::new(512, OP_HEADER_LEN),
            limits: Limits::default(),
        }
    }

    /// The part of the request not yet sent; empty once it all went.
    pub fn poll_transmit(&self) -> &[u8] {
        &self.request[self.sent..]
    }

    /// `n` bytes of [`OpExchange::poll_transmit`] were written.
    pub fn transmitted(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.request.len());
    }

    /// Where the next read goes: exactly the bytes the reply still lacks.
    pub fn read_buffer(&mut self) -> &mut [u8] {
        self.input.spare(true)
    }

    /// `n` bytes were read into [`OpExchange::read_buffer`]. `Some` once
    /// the reply is whole.
    pub fn handle_input(&mut self, n: usize) -> Result<Option<OpReply>, DecodeError> {
        self.input.filled(n);
        let limits = &self.limits;
        Ok(self
            .input
            .next_frame(|b| OpReply::decode(b, limits))?
            .map(|(reply, _)| reply))
    }

    /// What a complete OP_REP_DEVLIST says: the devices, or why not.
    pub fn devices(&self, reply: OpReply, addr: &str) -> Result<Vec<DeviceInfo>, ClientError> {
        match (&self.asked, reply) {
            (
                Asked::Devlist,
                OpReply::Devlist {
                    status: OpStatus::Ok,
                    devices,
                    ..
                },
            ) => Ok(devices),
            (Asked::Devlist, OpReply::Devlist { status, .. }) => Err(ClientError::ListRefused {
                addr: addr.into(),
                status,
            }),
            (_, reply) => Err(self.wrong_reply(reply, addr)),
        }
    }

    /// What a complete OP_REP_IMPORT says: the device, or why not.
    pub fn imported(&self, reply: OpReply, addr: &str) -> Result<DeviceInfo, ClientError> {
        match (&self.asked, reply) {
            (
                Asked::Import { .. },
                OpReply::Import {
                    status: OpStatus::Ok,
                    device: Some(info),
                    ..
                },
            ) => Ok(info),
            (Asked::Import { busid }, OpReply::Import { status, .. }) => {
                Err(ClientError::ImportRefused {
                    addr: addr.into(),
                    busid: busid.clone(),
                    status,
                })
            }
            (_, reply) => Err(self.wrong_reply(reply, addr)),
        }
    }

    /// A reply to a request we did not send.
    fn wrong_reply(&self, reply: OpReply, addr: &str) -> ClientError {
        let code = match reply {
            OpReply::Devlist { .. } => OP_REP_DEVLIST,
            OpReply::Import { .. } => OP_REP_IMPORT,
        };
        ClientError::Protocol {
            addr: addr.into(),
            source: DecodeError::UnknownOpCode(code),
        }
    }

    /// Bytes received and not part of a reply yet: after the reply, zero.
    pub fn buffered(&self) -> usize {
        self.input.buffered()
    }
}
