//! The OP phase: one request (a device list or an import) and its reply.

use std::time::Instant;

use usbwire_proto::op::OP_HEADER_LEN;
use usbwire_proto::{
    BusId, DecodeError, Decoded, DeviceInfo, ImportToken, OpReply, OpRequest, OpStatus,
    USBIP_VERSION,
};

use super::OP_TIMEOUT;
use crate::SessionError;

/// Bytes read at a time: no more than the request still lacks, so nothing
/// of what follows an import request is read here.
const OP_READ_CHUNK: usize = 64;

/// What the client asked for; the driver answers it from the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpEvent {
    /// OP_REQ_DEVLIST: answer with [`OpSession::answer_devlist`].
    DevlistRequested,
    /// OP_REQ_IMPORT: answer with [`OpSession::refuse_import`], or with
    /// [`OpSession::accept_import`] and then run an [`super::UrbSession`].
    ImportRequested(BusId),
}

/// The sans-IO OP phase of a connection.
pub struct OpSession {
    input: Vec<u8>,
    filled: usize,
    /// Bytes the request needs in all, as far as is known yet.
    need: usize,
    deadline: Instant,
    reply: Vec<u8>,
    sent: usize,
}

impl OpSession {
    /// A connection accepted at `now`.
    pub fn new(now: Instant) -> Self {
        let need = match OpRequest::decode(&[]) {
            Ok(Decoded::NeedMore(n)) => n,
            _ => OP_HEADER_LEN,
        };
        OpSession {
            input: Vec::with_capacity(OP_READ_CHUNK),
            filled: 0,
            need,
            deadline: now + OP_TIMEOUT,
            reply: Vec::new(),
            sent: 0,
        }
    }

    /// Where the transport reads the request's next bytes into; then call
    /// [`OpSession::input_filled`].
    pub fn read_buffer(&mut self) -> &mut [u8] {
        let want = self
            .need
            .saturating_sub(self.filled)
            .clamp(1, OP_READ_CHUNK);
        self.input.resize(self.filled + want, 0);
        &mut self.input[self.filled..]
    }

    /// `n` bytes were read into the buffer [`OpSession::read_buffer`] lent.
    /// An unknown request is answered with a failure reply (left to
    /// transmit, best effort) and ends the connection with an error.
    pub fn input_filled(&mut self, n: usize) -> Result<Option<OpEvent>, SessionError> {
        self.filled = (self.filled + n).min(self.input.len());
        self.input.truncate(self.filled);
        match OpRequest::decode(&self.input) {
            Ok(Decoded::Message(OpRequest::Devlist { .. }, _)) => {
                Ok(Some(OpEvent::DevlistRequested))
            }
            Ok(Decoded::Message(OpRequest::Import { busid, .. }, _)) => {
                Ok(Some(OpEvent::ImportRequested(busid)))
            }
            Ok(Decoded::NeedMore(n)) => {
                self.need = n;
                Ok(None)
            }
            Err(DecodeError::UnknownOpCode(code)) => {
                // The reply code of the same request and a failure status,
                // so that a peer speaking a newer or older dialect learns why.
                self.reply.extend_from_slice(&USBIP_VERSION.to_be_bytes());
                self.reply.extend_from_slice(&(code & 0x7fff).to_be_bytes());
                self.reply
                    .extend_from_slice(&OpStatus::Na.to_u32().to_be_bytes());
                Err(DecodeError::UnknownOpCode(code).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// When the request must have arrived.
    pub fn poll_timeout(&self) -> Instant {
        self.deadline
    }

    /// Ends the connection if the request is late at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if now >= self.deadline {
            return Err(SessionError::Timeout);
        }
        Ok(())
    }

    pub fn answer_devlist(&mut self, devices: Vec<DeviceInfo>) {
        self.reply.reserve(12 + devices.len() * 330);
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            devices,
        }
        .encode(&mut self.reply);
    }

    pub fn refuse_import(&mut self, status: OpStatus) {
        OpReply::Import {
            version: USBIP_VERSION,
            status,
            device: None,
        }
        .encode(&mut self.reply);
    }

    pub fn accept_import(&mut self, device: DeviceInfo) {
        OpReply::Import {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            device: Some(device),
        }
        .encode(&mut self.reply);
    }

    /// The fleet reservation token an OP_REQ_IMPORT carried, if any.
    pub fn import_token(&self) -> Option<ImportToken> {
        let field = self
            .input
            .get(OP_HEADER_LEN..OP_HEADER_LEN + usbwire_proto::op::BUSID_LEN)?;
        ImportToken::from_busid_field(field)
    }

    /// The reply bytes not yet sent.
    pub fn poll_transmit(&self) -> &[u8] {
        &self.reply[self.sent..]
    }

    pub fn transmitted(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.reply.len());
    }
}
