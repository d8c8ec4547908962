//! The URB phase: `USBIP_CMD_SUBMIT`, `USBIP_RET_SUBMIT`, `USBIP_CMD_UNLINK`
//! and `USBIP_RET_UNLINK`.
//!
//! Every message has a 48-byte header (a 20-byte `usbip_header_basic` and a
//! 28-byte command-specific part). A submit may be followed by the transfer
//! buffer (OUT on the command, IN on the reply) and then by isochronous
//! packet descriptors.
//!
//! Decoding returns the header as a plain value and the *ranges* of the
//! payload inside the caller's buffer, so that a server can hand the bytes to
//! a device without copying them first.

use core::ops::Range;

use crate::wire::*;
use crate::{DecodeError, Decoded, Limits};

pub const USBIP_CMD_SUBMIT: u32 = 0x0000_0001;
pub const USBIP_CMD_UNLINK: u32 = 0x0000_0002;
pub const USBIP_RET_SUBMIT: u32 = 0x0000_0003;
pub const USBIP_RET_UNLINK: u32 = 0x0000_0004;

/// Length of every URB-phase header.
pub const URB_HEADER_LEN: usize = 48;
/// Length of one `usbip_iso_packet_descriptor`.
pub const ISO_PACKET_LEN: usize = 16;

/// Transfer flags as Linux numbers them (`URB_*` in `include/linux/usb.h`).
pub mod flags {
    pub const URB_SHORT_NOT_OK: u32 = 0x0001;
    pub const URB_ISO_ASAP: u32 = 0x0002;
    pub const URB_NO_TRANSFER_DMA_MAP: u32 = 0x0004;
    pub const URB_ZERO_PACKET: u32 = 0x0040;
    pub const URB_NO_INTERRUPT: u32 = 0x0080;
    pub const URB_FREE_BUFFER: u32 = 0x0100;
    pub const URB_DIR_IN: u32 = 0x0200;
    pub const URB_DIR_MASK: u32 = URB_DIR_IN;
}

/// Transfer direction as USB/IP encodes it: 0 is OUT (host to device), 1 is IN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Out,
    In,
}

impl Direction {
    pub fn from_u32(v: u32) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Direction::Out),
            1 => Ok(Direction::In),
            v => Err(DecodeError::BadDirection(v)),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Direction::Out => 0,
            Direction::In => 1,
        }
    }

    /// The endpoint address bit for this direction (0x80 for IN).
    pub fn ep_bit(self) -> u8 {
        match self {
            Direction::Out => 0,
            Direction::In => 0x80,
        }
    }
}

/// The 8-byte control setup packet. Unlike everything else in USB/IP its
/// multi-byte fields are little-endian, because it is copied verbatim from
/// the USB wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl SetupPacket {
    pub fn from_bytes(b: [u8; 8]) -> Self {
        SetupPacket {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub fn to_bytes(self) -> [u8; 8] {
        let v = self.value.to_le_bytes();
        let i = self.index.to_le_bytes();
        let l = self.length.to_le_bytes();
        [
            self.request_type,
            self.request,
            v[0],
            v[1],
            i[0],
            i[1],
            l[0],
            l[1],
        ]
    }

    /// Data stage direction: bit 7 of bmRequestType.
    pub fn direction(self) -> Direction {
        if self.request_type & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }
}

/// One `usbip_iso_packet_descriptor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IsoPacket {
    pub offset: u32,
    pub length: u32,
    pub actual_length: u32,
    pub status: i32,
}

impl IsoPacket {
    /// Reads descriptors from a slice whose length the decoder already checked.
    pub fn iter(b: &[u8]) -> impl ExactSizeIterator<Item = IsoPacket> + '_ {
        b.chunks_exact(ISO_PACKET_LEN).map(|c| IsoPacket {
            offset: u32_at(c, 0),
            length: u32_at(c, 4),
            actual_length: u32_at(c, 8),
            status: i32_at(c, 12),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
        out.extend_from_slice(&self.actual_length.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
    }
}

/// `USBIP_CMD_SUBMIT` header: an URB for the server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CmdSubmit {
    pub seqnum: u32,
    pub devid: u32,
    pub direction: Direction,
    /// Endpoint number, 0..=15 on a valid URB. Kept raw: a bad value is the
    /// server's to answer with an URB status, not a framing error.
    pub ep: u32,
    pub transfer_flags: u32,
    pub transfer_buffer_length: u32,
    pub start_frame: i32,
    /// As sent. Only meaningful on isochronous endpoints: peers send 0,
    /// 0xffffffff or garbage on the others.
    pub number_of_packets: u32,
    pub interval: i32,
    pub setup: [u8; 8],
}

impl CmdSubmit {
    pub fn setup_packet(&self) -> SetupPacket {
        SetupPacket::from_bytes(self.setup)
    }

    pub fn write_header(&self, out: &mut [u8]) {
        put_u32(out, 0, USBIP_CMD_SUBMIT);
        put_u32(out, 4, self.seqnum);
        put_u32(out, 8, self.devid);
        put_u32(out, 12, self.direction.to_u32());
        put_u32(out, 16, self.ep);
        put_u32(out, 20, self.transfer_flags);
        put_u32(out, 24, self.transfer_buffer_length);
        put_u32(out, 28, self.start_frame as u32);
        put_u32(out, 32, self.number_of_packets);
        put_u32(out, 36, self.interval as u32);
        out[40..48].copy_from_slice(&self.setup);
    }

    /// Appends the header, the OUT payload (pass an empty slice for IN) and
    /// the isochronous descriptors.
    pub fn encode(&self, data: &[u8], iso: &[IsoPacket], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + URB_HEADER_LEN, 0);
        self.write_header(&mut out[start..]);
        if self.direction == Direction::Out {
            out.extend_from_slice(data);
        }
        for p in iso {
            p.encode(out);
        }
    }
}

/// `USBIP_RET_SUBMIT` header: the outcome of an URB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RetSubmit {
    pub seqnum: u32,
    /// Linux's stub sends 0 in devid, direction and ep of a reply.
    pub devid: u32,
    pub direction: u32,
    pub ep: u32,
    /// 0 or a negative errno.
    pub status: i32,
    pub actual_length: u32,
    pub start_frame: i32,
    pub number_of_packets: u32,
    pub error_count: i32,
}

impl RetSubmit {
    pub fn write_header(&self, out: &mut [u8]) {
        put_u32(out, 0, USBIP_RET_SUBMIT);
        put_u32(out, 4, self.seqnum);
        put_u32(out, 8, self.devid);
        put_u32(out, 12, self.direction);
        put_u32(out, 16, self.ep);
        put_u32(out, 20, self.status as u32);
        put_u32(out, 24, self.actual_length);
        put_u32(out, 28, self.start_frame as u32);
        put_u32(out, 32, self.number_of_packets);
        put_u32(out, 36, self.error_count as u32);
        out[40..48].fill(0);
    }

    /// Appends the header, the IN payload (empty for OUT) and the
    /// isochronous descriptors. For isochronous IN the payload is packed:
    /// only each packet's `actual_length` bytes, back to back, as the
    /// kernel's stub sends them.
    pub fn encode(&self, data: &[u8], iso: &[IsoPacket], out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + URB_HEADER_LEN, 0);
        self.write_header(&mut out[start..]);
        out.extend_from_slice(data);
        for p in iso {
            p.encode(out);
        }
    }
}

/// `USBIP_CMD_UNLINK`: cancel the URB with `unlink_seqnum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmdUnlink {
    pub seqnum: u32,
    pub devid: u32,
    /// Kept raw: peers differ in what they put here and it is not used.
    pub direction: u32,
    pub ep: u32,
    pub unlink_seqnum: u32,
}

impl CmdUnlink {
    pub fn write_header(&self, out: &mut [u8]) {
        put_u32(out, 0, USBIP_CMD_UNLINK);
        put_u32(out, 4, self.seqnum);
        put_u32(out, 8, self.devid);
        put_u32(out, 12, self.direction);
        put_u32(out, 16, self.ep);
        put_u32(out, 20, self.unlink_seqnum);
        out[24..48].fill(0);
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + URB_HEADER_LEN, 0);
        self.write_header(&mut out[start..]);
    }
}

/// `USBIP_RET_UNLINK`: -ECONNRESET if the URB was cancelled before it
/// completed, 0 if it had already completed (its RET_SUBMIT went first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RetUnlink {
    /// The seqnum of the CMD_UNLINK this answers.
    pub seqnum: u32,
    pub devid: u32,
    pub direction: u32,
    pub ep: u32,
    pub status: i32,
}

impl RetUnlink {
    pub fn write_header(&self, out: &mut [u8]) {
        put_u32(out, 0, USBIP_RET_UNLINK);
        put_u32(out, 4, self.seqnum);
        put_u32(out, 8, self.devid);
        put_u32(out, 12, self.direction);
        put_u32(out, 16, self.ep);
        put_u32(out, 20, self.status as u32);
        out[24..48].fill(0);
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + URB_HEADER_LEN, 0);
        self.write_header(&mut out[start..]);
    }
}

/// A command from client to server, with where its payload lies in the
/// buffer passed to [`UrbCommand::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrbCommand {
    Submit {
        cmd: CmdSubmit,
        /// OUT payload; empty for IN.
        data: Range<usize>,
        /// Isochronous descriptors, `ISO_PACKET_LEN` bytes each; empty unless isochronous.
        iso: Range<usize>,
    },
    Unlink(CmdUnlink),
}

fn check_len(field: &'static str, value: i32, limit: u32) -> Result<u32, DecodeError> {
    if value < 0 {
        return Err(DecodeError::Negative { field, value });
    }
    let v = value as u32;
    if v > limit {
        return Err(DecodeError::TooLong {
            field,
            value: v.into(),
            limit: limit.into(),
        });
    }
    Ok(v)
}

/// Bounds `number_of_packets` of an isochronous URB. Linux sends -1 on
/// non-isochronous URBs and some peers send it on isochronous ones with no
/// packets, so -1 reads as none.
fn iso_count(raw: u32, limits: &Limits) -> Result<u32, DecodeError> {
    if raw == u32::MAX {
        return Ok(0);
    }
    check_len("number_of_packets", raw as i32, limits.max_iso_packets)
}

/// A CMD_SUBMIT decoded from its 48-byte header alone, with where its
/// payload and isochronous descriptors will lie once they have arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitHeader {
    pub cmd: CmdSubmit,
    /// OUT payload; empty for IN.
    pub data: Range<usize>,
    /// Isochronous descriptors; empty unless isochronous.
    pub iso: Range<usize>,
}

impl SubmitHeader {
    /// The whole frame's length: header, payload and descriptors.
    pub fn frame_len(&self) -> usize {
        self.iso.end
    }
}

impl UrbCommand {
    /// Decodes one command. `is_iso(direction, ep)` tells whether the
    /// endpoint is isochronous: the header does not say, and only then does
    /// `number_of_packets` mean anything.
    pub fn decode(
        b: &[u8],
        limits: &Limits,
        is_iso: impl FnOnce(Direction, u32) -> bool,
    ) -> Result<Decoded<UrbCommand>, DecodeError> {
        if b.len() < URB_HEADER_LEN {
            return Ok(Decoded::NeedMore(URB_HEADER_LEN));
        }
        match u32_at(b, 0) {
            USBIP_CMD_SUBMIT => {
                let SubmitHeader { cmd, data, iso } = Self::submit_header(b, limits, is_iso)?
                    .expect("a CMD_SUBMIT header is present");
                if b.len() < iso.end {
                    return Ok(Decoded::NeedMore(iso.end));
                }
                let buffer = u64::from(cmd.transfer_buffer_length);
                let mut sum = 0u64;
                for (index, p) in IsoPacket::iter(&b[iso.clone()]).enumerate() {
                    if u64::from(p.offset) + u64::from(p.length) > buffer {
                        return Err(DecodeError::IsoOutOfBounds {
                            index: index as u32,
                            offset: p.offset,
                            length: p.length,
                            buffer: cmd.transfer_buffer_length,
                        });
                    }
                    sum += u64::from(p.length);
                }
                // Packets inside the buffer may still overlap, and a backend
                // that gathers them (usbfs packs them back to back) would
                // allocate their sum: 1024 packets over one 8 MiB buffer are
                // 8 GiB. Real hosts lay packets out without overlap, so the
                // sum never exceeds the buffer (the kernel's hardened
                // usbip_recv_iso likewise refuses descriptors that claim
                // more than the buffer).
                if sum > buffer {
                    return Err(DecodeError::IsoLengthsExceedBuffer {
                        sum,
                        buffer: cmd.transfer_buffer_length,
                    });
                }
                let end = iso.end;
                Ok(Decoded::Message(UrbCommand::Submit { cmd, data, iso }, end))
            }
            USBIP_CMD_UNLINK => Ok(Decoded::Message(
                UrbCommand::Unlink(CmdUnlink {
                    seqnum: u32_at(b, 4),
                    devid: u32_at(b, 8),
                    direction: u32_at(b, 12),
                    ep: u32_at(b, 16),
                    unlink_seqnum: u32_at(b, 20),
                }),
                URB_HEADER_LEN,
            )),
            other => Err(DecodeError::UnknownCommand(other)),
        }
    }

    /// Decodes a CMD_SUBMIT's header without waiting for what follows it,
    /// with the same checks as [`UrbCommand::decode`] (the descriptors'
    /// bounds and sum aside, which need the descriptors). `None` if `b` holds less
    /// than a header or another command. This is what lets a server read a
    /// large OUT payload straight into the URB's own buffer instead of
    /// copying it out of its read buffer.
    pub fn submit_header(
        b: &[u8],
        limits: &Limits,
        is_iso: impl FnOnce(Direction, u32) -> bool,
    ) -> Result<Option<SubmitHeader>, DecodeError> {
        if b.len() < URB_HEADER_LEN || u32_at(b, 0) != USBIP_CMD_SUBMIT {
            return Ok(None);
        }
        let direction = Direction::from_u32(u32_at(b, 12))?;
        let ep = u32_at(b, 16);
        let tbl = check_len(
            "transfer_buffer_length",
            i32_at(b, 24),
            limits.max_transfer_length,
        )?;
        let raw_packet_count = u32_at(b, 32);
        let packet_count = if is_iso(direction, ep) {
            iso_count(raw_packet_count, limits)?
        } else {
            0
        };
        let data_len = if direction == Direction::Out { tbl } else { 0 } as usize;
        let data = URB_HEADER_LEN..URB_HEADER_LEN + data_len;
        let iso = data.end..data.end + packet_count as usize * ISO_PACKET_LEN;
        let mut setup = [0u8; 8];
        setup.copy_from_slice(&b[40..48]);
        let cmd = CmdSubmit {
            seqnum: u32_at(b, 4),
            devid: u32_at(b, 8),
            direction,
            ep,
            transfer_flags: u32_at(b, 20),
            transfer_buffer_length: tbl,
            start_frame: i32_at(b, 28),
            number_of_packets: raw_packet_count,
            interval: i32_at(b, 36),
            setup,
        };
        Ok(Some(SubmitHeader { cmd, data, iso }))
    }
}

/// What the client knows of an URB it has in flight: the reply alone does
/// not say whether data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub direction: Direction,
    pub iso: bool,
    /// The URB's transfer_buffer_length: a reply claiming more is fatal,
    /// as in the kernel (CVE-2016-3955).
    pub length: u32,
}

/// A reply from server to client, with where its payload lies in the buffer
/// passed to [`UrbReply::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrbReply {
    Submit {
        ret: RetSubmit,
        /// IN payload (packed for isochronous); empty for OUT.
        data: Range<usize>,
        iso: Range<usize>,
    },
    Unlink(RetUnlink),
}

impl UrbReply {
    /// Decodes one reply. `in_flight(seqnum)` describes the URB a
    /// RET_SUBMIT answers; `None` means no such URB, which Linux's vhci
    /// treats as a fatal protocol error, and so does this.
    pub fn decode(
        b: &[u8],
        limits: &Limits,
        in_flight: impl FnOnce(u32) -> Option<InFlight>,
    ) -> Result<Decoded<UrbReply>, DecodeError> {
        if b.len() < URB_HEADER_LEN {
            return Ok(Decoded::NeedMore(URB_HEADER_LEN));
        }
        let seqnum = u32_at(b, 4);
        match u32_at(b, 0) {
            USBIP_RET_SUBMIT => {
                let urb = in_flight(seqnum).ok_or(DecodeError::UnknownSeqnum(seqnum))?;
                let actual = check_len(
                    "actual_length",
                    i32_at(b, 24),
                    limits.max_transfer_length.min(urb.length),
                )?;
                let raw_packet_count = u32_at(b, 32);
                let packet_count = if urb.iso {
                    iso_count(raw_packet_count, limits)?
                } else {
                    0
                };
                let data_len = if urb.direction == Direction::In {
                    actual
                } else {
                    0
                } as usize;
                let data = URB_HEADER_LEN..URB_HEADER_LEN + data_len;
                let iso = data.end..data.end + packet_count as usize * ISO_PACKET_LEN;
                if b.len() < iso.end {
                    return Ok(Decoded::NeedMore(iso.end));
                }
                // The kernel checks the sum on every isochronous reply.
                if urb.iso {
                    let sum: u64 = IsoPacket::iter(&b[iso.clone()])
                        .map(|p| u64::from(p.actual_length))
                        .sum();
                    if sum != u64::from(actual) {
                        return Err(DecodeError::IsoActualMismatch { sum, actual });
                    }
                }
                let ret = RetSubmit {
                    seqnum,
                    devid: u32_at(b, 8),
                    direction: u32_at(b, 12),
                    ep: u32_at(b, 16),
                    status: i32_at(b, 20),
                    actual_length: actual,
                    start_frame: i32_at(b, 28),
                    number_of_packets: raw_packet_count,
                    error_count: i32_at(b, 36),
                };
                let end = iso.end;
                Ok(Decoded::Message(UrbReply::Submit { ret, data, iso }, end))
            }
            USBIP_RET_UNLINK => Ok(Decoded::Message(
                UrbReply::Unlink(RetUnlink {
                    seqnum,
                    devid: u32_at(b, 8),
                    direction: u32_at(b, 12),
                    ep: u32_at(b, 16),
                    status: i32_at(b, 20),
                }),
                URB_HEADER_LEN,
            )),
            other => Err(DecodeError::UnknownCommand(other)),
        }
    }
}
