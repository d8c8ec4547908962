//! The client's side of the URB phase, sans IO, in the manner of
//! quinn-proto's `Connection`: pure state driven from outside.
//!
//! A driver feeds what the socket read ([`Connection::read_buffer`],
//! [`Connection::handle_input`]), writes what
//! [`Connection::poll_transmit`] lends and reports it with
//! [`Connection::transmitted`], tells the core when the peer went away
//! ([`Connection::peer_closed`]), and hands each finished transfer
//! ([`Connection::poll_completed`]) to whoever waits for it. The core
//! owns seqnums, what is in flight, the unlink rules and every
//! protocol check; it needs no clock.
//!
//! Rules, as Linux's vhci-hcd applies them, checked by this module's tests:
//! * a RET_SUBMIT completes its URB with its data, even when a CMD_UNLINK
//!   for it is on its way; the RET_UNLINK that follows (status 0) is
//!   harmless;
//! * a RET_UNLINK with an error status (-ECONNRESET) for an URB still in
//!   flight ends it with that error;
//! * a RET_UNLINK with status 0 for an URB still in flight ends it as
//!   cancelled: usbip-host sends exactly that, and no RET_SUBMIT, when the
//!   URB completes while being unlinked, so its result is lost;
//! * a RET_SUBMIT for a seqnum not in flight (never sent, or answered
//!   already) and a RET_UNLINK for a CMD_UNLINK not awaiting an answer are
//!   protocol errors: the stream can no longer be trusted, so every
//!   transfer in flight fails and the connection is done;
//! * at most `max_in_flight` commands await a reply;
//! * when the peer goes away every transfer in flight fails as
//!   [`TransferError::Disconnected`].

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;

use usbwire_proto::urb::{InFlight, URB_HEADER_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, DecodeError, DeviceInfo, Direction, IsoPacket, Limits, UrbReply,
};

use crate::error::TransferError;
use crate::input::InputBuffer;
use crate::transfer::{TransferOutcome, TransferRequest};

/// OUT payloads at least this long go out from their own buffer (one more
/// `IoSlice` in the `writev`); shorter ones are copied next to their header.
const OUT_PAYLOAD_COPY_MAX: usize = 16 * 1024;

/// How many `IoSlice`s one [`Connection::poll_transmit`] lends at most.
pub const MAX_TRANSMIT_SLICES: usize = 64;

/// Bounds of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionConfig {
    /// Commands (CMD_SUBMIT and CMD_UNLINK) awaiting a reply before
    /// [`Connection::submit`] refuses more. Unlinks are never refused: at
    /// most one per URB in flight.
    pub max_in_flight: usize,
    /// Bounds on what a reply may make the client allocate.
    pub limits: Limits,
    /// Initial size of the receive buffer; it grows to the largest frame.
    pub receive_buffer: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            max_in_flight: 4096,
            limits: Limits::default(),
            receive_buffer: 256 * 1024,
        }
    }
}

/// Why the URB phase ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error("the server sent an invalid reply: {0}")]
    Decode(#[from] DecodeError),
    #[error(
        "the server answered CMD_UNLINK {0}, which the client never sent or saw answered already"
    )]
    UnknownUnlink(u32),
    #[error("the server closed the connection")]
    PeerClosed,
    #[error("the connection was closed by the client")]
    LocallyClosed,
}

/// Why [`Connection::submit`] did not take a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0} commands already await a reply")]
    InFlightFull(usize),
    #[error("the connection is closed")]
    Closed,
}

/// A transfer that ended, with the token its submitter gave.
#[derive(Debug)]
pub struct Completed<T> {
    pub seqnum: u32,
    pub token: T,
    pub outcome: TransferOutcome,
}

/// An URB the server has not answered yet.
#[derive(Debug)]
struct Urb<T> {
    shape: InFlight,
    /// The seqnum of the CMD_UNLINK sent for it, if any.
    unlink: Option<u32>,
    token: T,
}

/// The URB phase of one connection to one imported device. `T` is what
/// the driver needs to hand a finished transfer back (a channel, an index).
#[derive(Debug)]
pub struct Connection<T> {
    devid: u32,
    config: ConnectionConfig,
    next_seqnum: u32,
    in_flight: HashMap<u32, Urb<T>>,
    /// CMD_UNLINK seqnum -> the URB it cancels: RET_UNLINK names only the former.
    unlinks: HashMap<u32, u32>,
    input: InputBuffer,
    output: Output,
    completed: VecDeque<Completed<T>>,
    error: Option<ConnectionError>,
}

impl<T> Connection<T> {
    /// The URB phase after `device` was imported.
    pub fn new(device: &DeviceInfo, config: ConnectionConfig) -> Self {
        Connection {
            devid: device.devid(),
            config,
            next_seqnum: 1,
            in_flight: HashMap::new(),
            unlinks: HashMap::new(),
            input: InputBuffer::new(config.receive_buffer, URB_HEADER_LEN),
            output: Output::default(),
            completed: VecDeque::new(),
            error: None,
        }
    }

    /// Commands awaiting a reply.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.unlinks.len()
    }

    /// Whether [`Connection::submit`] would take a transfer now.
    pub fn can_submit(&self) -> bool {
        self.error.is_none() && self.in_flight() < self.config.max_in_flight
    }

    /// Why the connection ended, once it has.
    pub fn error(&self) -> Option<&ConnectionError> {
        self.error.as_ref()
    }

    fn allocate_seqnum(&mut self) -> u32 {
        // Bounded: fewer than max_in_flight seqnums are taken.
        loop {
            let seqnum = self.next_seqnum;
            self.next_seqnum = self.next_seqnum.wrapping_add(1).max(1);
            if !self.in_flight.contains_key(&seqnum) && !self.unlinks.contains_key(&seqnum) {
                return seqnum;
            }
        }
    }

    /// Queues a CMD_SUBMIT; returns its seqnum. On refusal the token comes back.
    pub fn submit(&mut self, request: TransferRequest, token: T) -> Result<u32, (SubmitError, T)> {
        if self.error.is_some() {
            return Err((SubmitError::Closed, token));
        }
        if self.in_flight() >= self.config.max_in_flight {
            return Err((SubmitError::InFlightFull(self.in_flight()), token));
        }
        let seqnum = self.allocate_seqnum();
        let direction = request.direction();
        let command = CmdSubmit {
            seqnum,
            devid: self.devid,
            direction,
            ep: u32::from(request.endpoint & 0x0f),
            transfer_flags: request.flags,
            transfer_buffer_length: request.buffer_length(),
            start_frame: request.start_frame,
            number_of_packets: request.iso.len() as u32,
            interval: request.interval,
            setup: request.setup.unwrap_or_default().to_bytes(),
        };
        self.output
            .push_submit(&command, request.data, &request.iso);
        let shape = InFlight {
            direction,
            iso: !request.iso.is_empty(),
            length: command.transfer_buffer_length,
        };
        self.in_flight.insert(
            seqnum,
            Urb {
                shape,
                unlink: None,
                token,
            },
        );
        Ok(seqnum)
    }

    /// Queues a CMD_UNLINK for the URB `seqnum`. False, and nothing sent,
    /// when it is not in flight (finished already) or is being unlinked.
    pub fn unlink(&mut self, seqnum: u32) -> bool {
        if self.error.is_some() {
            return false;
        }
        match self.in_flight.get(&seqnum) {
            Some(urb) if urb.unlink.is_none() => {}
            _ => return false,
        }
        let unlink_seqnum = self.allocate_seqnum();
        CmdUnlink {
            seqnum: unlink_seqnum,
            devid: self.devid,
            unlink_seqnum: seqnum,
            ..Default::default()
        }
        .encode(&mut self.output.inline);
        self.output.total += URB_HEADER_LEN;
        self.unlinks.insert(unlink_seqnum, seqnum);
        if let Some(urb) = self.in_flight.get_mut(&seqnum) {
            urb.unlink = Some(unlink_seqnum);
        }
        true
    }

    /// Whether bytes wait to be sent.
    pub fn has_transmit(&self) -> bool {
        self.output.sent < self.output.total
    }

    /// Lends what is still to be sent, in order, as up to `slices.len()`
    /// slices; returns how many it filled. Many commands go in one `writev`.
    pub fn poll_transmit<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        self.output.fill(slices)
    }

    /// `n` bytes of what [`Connection::poll_transmit`] lent were written.
    pub fn transmitted(&mut self, n: usize) {
        self.output.advance(n);
    }

    /// Where the next read goes: as much room as there is.
    pub fn read_buffer(&mut self) -> &mut [u8] {
        self.input.spare(false)
    }

    /// `n` bytes were read into [`Connection::read_buffer`]: decodes every
    /// whole reply. On a protocol error every transfer in flight fails
    /// (see [`Connection::poll_completed`]) and the error is returned.
    pub fn handle_input(&mut self, n: usize) -> Result<(), ConnectionError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        self.input.filled(n);
        // Bounded: each pass consumes a frame of the bytes received.
        loop {
            let in_flight = &self.in_flight;
            let limits = &self.config.limits;
            let decoded = self.input.next_frame(|b| {
                UrbReply::decode(b, limits, |seqnum| in_flight.get(&seqnum).map(|u| u.shape))
            });
            let step = match decoded {
                Ok(Some((reply, frame))) => self.handle_reply(reply, frame.start),
                Ok(None) => return Ok(()),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = step {
                self.fail(e.clone());
                return Err(e);
            }
        }
    }

    /// Test and driver convenience: copies `bytes` in as if read.
    pub fn handle_bytes(&mut self, mut bytes: &[u8]) -> Result<(), ConnectionError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        while !bytes.is_empty() {
            let spare = self.read_buffer();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.handle_input(n)?;
        }
        Ok(())
    }

    fn handle_reply(&mut self, reply: UrbReply, base: usize) -> Result<(), ConnectionError> {
        match reply {
            UrbReply::Submit { ret, data, iso } => {
                let urb = self
                    .in_flight
                    .remove(&ret.seqnum)
                    .ok_or(DecodeError::UnknownSeqnum(ret.seqnum))?;
                let frame = self.input.frame(base..base + iso.end);
                let outcome = TransferOutcome {
                    status: TransferError::from_status(ret.status),
                    data: frame[data].to_vec(),
                    actual_length: ret.actual_length,
                    iso: IsoPacket::iter(&frame[iso]).collect(),
                    start_frame: ret.start_frame,
                    error_count: ret.error_count,
                };
                // Its CMD_UNLINK, if any, stays known until its RET_UNLINK.
                self.completed.push_back(Completed {
                    seqnum: ret.seqnum,
                    token: urb.token,
                    outcome,
                });
            }
            UrbReply::Unlink(ret) => {
                let target = self
                    .unlinks
                    .remove(&ret.seqnum)
                    .ok_or(ConnectionError::UnknownUnlink(ret.seqnum))?;
                // Still in flight under this very unlink (not a later URB
                // that reused the seqnum): the RET_UNLINK ends it.
                let ends_urb = self
                    .in_flight
                    .get(&target)
                    .is_some_and(|u| u.unlink == Some(ret.seqnum));
                if ends_urb {
                    let urb = self.in_flight.remove(&target).expect("checked above");
                    let error = TransferError::from_status(ret.status)
                        .err()
                        .unwrap_or(TransferError::Cancelled);
                    self.completed.push_back(Completed {
                        seqnum: target,
                        token: urb.token,
                        outcome: TransferOutcome::failed(error),
                    });
                }
            }
        }
        Ok(())
    }

    /// The next transfer that ended, in the order they ended.
    pub fn poll_completed(&mut self) -> Option<Completed<T>> {
        self.completed.pop_front()
    }

    /// The server went away (EOF or a socket error): every transfer in
    /// flight fails as disconnected.
    pub fn peer_closed(&mut self) {
        self.fail(ConnectionError::PeerClosed);
    }

    /// The client ends the connection: every transfer in flight fails as
    /// disconnected.
    pub fn close(&mut self) {
        self.fail(ConnectionError::LocallyClosed);
    }

    fn fail(&mut self, error: ConnectionError) {
        if self.error.is_some() {
            return;
        }
        self.error = Some(error);
        self.unlinks.clear();
        self.input.clear();
        self.output.clear();
        let mut failed: Vec<(u32, Urb<T>)> = self.in_flight.drain().collect();
        failed.sort_by_key(|(seqnum, _)| *seqnum);
        self.completed
            .extend(failed.into_iter().map(|(seqnum, urb)| Completed {
                seqnum,
                token: urb.token,
                outcome: TransferOutcome::failed(TransferError::Disconnected(None)),
            }));
    }
}

/// Commands queued for the socket: headers (and short payloads) in one
/// buffer, long OUT payloads in their own, interleaved by position.
#[derive(Debug, Default)]
struct Output {
    inline: Vec<u8>,
    /// (where in `inline` the payload goes, the payload).
    payloads: Vec<(usize, Vec<u8>)>,
    /// Bytes queued in all.
    total: usize,
    /// Bytes written.
    sent: usize,
}

impl Output {
    fn push_submit(&mut self, command: &CmdSubmit, data: Vec<u8>, iso: &[IsoPacket]) {
        let start = self.inline.len();
        self.inline.resize(start + URB_HEADER_LEN, 0);
        command.write_header(&mut self.inline[start..]);
        let mut queued = URB_HEADER_LEN;
        if command.direction == Direction::Out && !data.is_empty() {
            queued += data.len();
            if data.len() < OUT_PAYLOAD_COPY_MAX {
                self.inline.extend_from_slice(&data);
            } else {
                self.payloads.push((self.inline.len(), data));
            }
        }
        for packet in iso {
            packet.encode(&mut self.inline);
        }
        queued += iso.len() * usbwire_proto::urb::ISO_PACKET_LEN;
        self.total += queued;
    }

    /// The queued bytes in order: `inline` up to each payload, the payload, ...
    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        self.payloads
            .iter()
            .flat_map(move |(pos, data)| {
                let before = &self.inline[at..*pos];
                at = *pos;
                [before, data.as_slice()]
            })
            .chain(std::iter::once_with(move || {
                let last = self.payloads.last().map_or(0, |(pos, _)| *pos);
                &self.inline[last..]
            }))
            .filter(|piece| !piece.is_empty())
    }

    fn fill<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut skip = self.sent;
        let mut filled = 0;
        for piece in self.pieces() {
            if filled == slices.len() {
                break;
            }
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            slices[filled] = IoSlice::new(&piece[skip..]);
            skip = 0;
            filled += 1;
        }
        filled
    }

    fn advance(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.total);
        if self.sent == self.total {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.inline.clear();
        self.payloads.clear();
        self.total = 0;
        self.sent = 0;
    }
}

#[cfg(test)]
mod tests;
