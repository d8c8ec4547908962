//! What a user asks of a device ([`TransferRequest`]) and what comes back
//! ([`TransferOutcome`]), independent of any transport.

use usbwire_proto::{Direction, IsoPacket, SetupPacket};

use crate::error::TransferError;

/// One transfer to submit.
#[derive(Debug, Clone, Default)]
pub struct TransferRequest {
    /// Endpoint address: 0x80 set for IN. Control is 0x00 (OUT) or 0x80 (IN).
    pub endpoint: u8,
    /// Linux URB_* transfer flags (e.g. URB_SHORT_NOT_OK).
    pub flags: u32,
    /// Setup packet, for control transfers.
    pub setup: Option<SetupPacket>,
    /// OUT payload.
    pub data: Vec<u8>,
    /// IN length to ask for.
    pub length: u32,
    pub iso: Vec<IsoPacket>,
    pub start_frame: i32,
    pub interval: i32,
}

impl TransferRequest {
    pub fn bulk_in(endpoint: u8, length: u32) -> Self {
        TransferRequest {
            endpoint: endpoint | 0x80,
            length,
            ..Default::default()
        }
    }

    pub fn bulk_out(endpoint: u8, data: Vec<u8>) -> Self {
        TransferRequest {
            endpoint: endpoint & 0x7f,
            data,
            ..Default::default()
        }
    }

    pub fn control(setup: SetupPacket, data: Vec<u8>) -> Self {
        let dir_in = setup.direction() == Direction::In;
        TransferRequest {
            endpoint: if dir_in { 0x80 } else { 0 },
            length: if dir_in {
                setup.length.into()
            } else {
                data.len() as u32
            },
            setup: Some(setup),
            data,
            ..Default::default()
        }
    }

    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags |= flags;
        self
    }

    pub fn direction(&self) -> Direction {
        if self.endpoint & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }

    /// `transfer_buffer_length` on the wire: the payload for OUT, the
    /// length asked for IN.
    pub fn buffer_length(&self) -> u32 {
        match self.direction() {
            Direction::Out => self.data.len() as u32,
            Direction::In => self.length,
        }
    }
}

/// How a transfer ended. A failed IN transfer may still carry data (a
/// short transfer under URB_SHORT_NOT_OK does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferOutcome {
    pub status: Result<(), TransferError>,
    /// IN data.
    pub data: Vec<u8>,
    pub actual_length: u32,
    pub iso: Vec<IsoPacket>,
    pub start_frame: i32,
    /// Isochronous packets that failed (each has its status in `iso`).
    pub error_count: i32,
}

impl TransferOutcome {
    /// The data, or the error.
    pub fn into_result(self) -> Result<Vec<u8>, TransferError> {
        self.status.map(|()| self.data)
    }

    /// A transfer that ended without a RET_SUBMIT: nothing was transferred
    /// as far as the client can tell.
    pub fn failed(error: TransferError) -> Self {
        TransferOutcome {
            status: Err(error),
            data: Vec::new(),
            actual_length: 0,
            iso: Vec::new(),
            start_frame: 0,
            error_count: 0,
        }
    }
}
