//! The client's side of the OP phase, sans IO: one request out
//! (OP_REQ_DEVLIST or OP_REQ_IMPORT), one reply in.

use usbwire_proto::{
    DecodeError, DeviceInfo, ImportToken, Limits, OpReply, OpRequest, OpStatus, OP_REP_DEVLIST,
    OP_REP_IMPORT, USBIP_VERSION,
};

use crate::error::ClientError;
use crate::input::InputBuffer;

/// An OP_REP header: the shortest reply, what the first read asks for.
const OP_HEADER_LEN: usize = 8;

/// Which request an [`OpExchange`] carries, and so which reply it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Devlist,
    Import {
        busid: String,
        token: Option<ImportToken>,
    },
}

/// Splits `BUSID#TOKEN` (a fleet reservation's token, 32 hex digits, see
/// [`ImportToken`]) into the bus id and the token. A plain bus id has no
/// token; so has one whose token is malformed or that is too long to carry
/// one: its import goes without, and a reserved device refuses it.
pub fn split_token(busid: &str) -> (&str, Option<ImportToken>) {
    match busid.rsplit_once('#') {
        Some((bus, hex)) if bus.len() <= usbwire_proto::op::IMPORT_TOKEN_BUSID_MAX => {
            (bus, ImportToken::from_hex(hex))
        }
        Some((bus, _)) => (bus, None),
        None => (busid, None),
    }
}

/// One OP request and its reply. A driver sends
/// [`OpExchange::poll_transmit`], then reads into
/// [`OpExchange::read_buffer`] and reports each read to
/// [`OpExchange::handle_input`] until that returns the reply.
///
/// An import's reads are exact: the buffer lent is never longer than what
/// the reply still lacks, so no byte after the reply is taken from the
/// stream, since those belong to the URB phase, which may be vhci-hcd's. A
/// device list ends the connection, so its reads take what there is (a
/// list of a thousand devices is then a few reads, not two per device).
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

    /// OP_REQ_IMPORT of `busid`, or of `BUSID#TOKEN` with a fleet
    /// reservation's token (see [`split_token`]).
    pub fn import(busid: &str) -> Self {
        let (busid, token) = split_token(busid);
        Self::new(Asked::Import {
            busid: busid.into(),
            token,
        })
    }

    fn new(asked: Asked) -> Self {
        let mut request = Vec::new();
        match &asked {
            Asked::Devlist => OpRequest::Devlist {
                version: USBIP_VERSION,
            }
            .encode(&mut request),
            Asked::Import {
                busid,
                token: Some(token),
            } => {
                // Fits: split_token kept the token only beside a short bus id.
                let _ = token.encode_import(USBIP_VERSION, busid, &mut request);
            }
            Asked::Import { busid, token: None } => OpRequest::Import {
                version: USBIP_VERSION,
                busid: busid.as_str().into(),
            }
            .encode(&mut request),
        }
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

    /// Where the next read goes: for an import, exactly the bytes the
    /// reply still lacks.
    pub fn read_buffer(&mut self) -> &mut [u8] {
        let exact = matches!(self.asked, Asked::Import { .. });
        self.input.spare(exact)
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
            (Asked::Import { busid, .. }, OpReply::Import { status, .. }) => {
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

#[cfg(test)]
mod tests {
    use usbwire_proto::{InterfaceInfo, Speed};

    use super::*;

    fn device(busid: &str, interfaces: usize) -> DeviceInfo {
        DeviceInfo {
            path: format!("/sys/devices/usb1/{busid}").as_str().into(),
            busid: busid.into(),
            busnum: 1,
            devnum: 3,
            speed: Speed::Super,
            id_vendor: 0x1d6b,
            id_product: 0x0104,
            bcd_device: 0x0510,
            device_class: 0xef,
            device_subclass: 2,
            device_protocol: 1,
            configuration_value: 1,
            num_configurations: 1,
            num_interfaces: interfaces as u8,
            interfaces: (0..interfaces)
                .map(|i| InterfaceInfo {
                    class: 8,
                    subclass: 6,
                    protocol: 0x50 + i as u8,
                })
                .collect(),
        }
    }

    /// Runs `op` against a peer that answers `stream`, at most `max_read`
    /// bytes per read; returns the reply and how many bytes were read.
    fn run(
        op: &mut OpExchange,
        stream: &[u8],
        max_read: usize,
    ) -> (Result<OpReply, DecodeError>, usize) {
        assert!(!op.poll_transmit().is_empty());
        op.transmitted(op.poll_transmit().len());
        assert!(op.poll_transmit().is_empty());
        let mut read = 0;
        // Bounded: each pass reads at least one byte of `stream`.
        while read < stream.len() {
            let buffer = op.read_buffer();
            assert!(!buffer.is_empty());
            let n = buffer.len().min(max_read).min(stream.len() - read);
            buffer[..n].copy_from_slice(&stream[read..read + n]);
            read += n;
            match op.handle_input(n) {
                Ok(Some(reply)) => return (Ok(reply), read),
                Ok(None) => {}
                Err(e) => return (Err(e), read),
            }
        }
        panic!("the stream ended before the reply did");
    }

    #[test]
    fn requests_are_the_c_tools_bytes() {
        let mut devlist = Vec::new();
        OpRequest::Devlist {
            version: USBIP_VERSION,
        }
        .encode(&mut devlist);
        assert_eq!(OpExchange::devlist().poll_transmit(), &devlist[..]);
        let mut import = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "3-1.2".into(),
        }
        .encode(&mut import);
        let mut op = OpExchange::import("3-1.2");
        assert_eq!(op.poll_transmit(), &import[..]);
        op.transmitted(5);
        assert_eq!(op.poll_transmit(), &import[5..], "a partial write resumes");
    }

    #[test]
    fn devlist_reply_at_every_byte_boundary() {
        let devices = vec![device("1-1", 3), device("1-2", 0), device("2-1", 1)];
        let mut reply = Vec::new();
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            devices: devices.clone(),
        }
        .encode(&mut reply);
        for max_read in 1..=reply.len() {
            let mut op = OpExchange::devlist();
            let (decoded, read) = run(&mut op, &reply, max_read);
            assert_eq!(read, reply.len(), "reads of {max_read}");
            assert_eq!(op.buffered(), 0);
            let got = op.devices(decoded.unwrap(), "server").unwrap();
            assert_eq!(got, devices, "reads of {max_read}");
        }
    }

    #[test]
    fn a_long_devlist_takes_few_reads() {
        let devices: Vec<DeviceInfo> = (0..1000).map(|i| device(&format!("1-{i}"), 2)).collect();
        let mut reply = Vec::new();
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            devices,
        }
        .encode(&mut reply);
        let mut op = OpExchange::devlist();
        let mut reads = 0;
        let mut at = 0;
        let decoded = loop {
            let buffer = op.read_buffer();
            let n = buffer.len().min(reply.len() - at);
            buffer[..n].copy_from_slice(&reply[at..at + n]);
            at += n;
            reads += 1;
            if let Some(decoded) = op.handle_input(n).unwrap() {
                break decoded;
            }
        };
        assert_eq!(op.devices(decoded, "server").unwrap().len(), 1000);
        // 320 KiB in reads of at least 16 KiB, not two reads per device.
        assert!(reads <= 1 + reply.len() / (16 * 1024) + 1, "{reads} reads");
    }

    #[test]
    fn import_reply_read_exactly_at_every_byte_boundary() {
        let mut reply = Vec::new();
        OpReply::Import {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            device: Some(device("1-1", 0)),
        }
        .encode(&mut reply);
        // The URB phase's first bytes follow at once.
        let stream = [&reply[..], &[0, 0, 0, 3][..]].concat();
        for max_read in 1..=reply.len() {
            let mut op = OpExchange::import("1-1");
            let (decoded, read) = run(&mut op, &stream, max_read);
            assert_eq!(read, reply.len(), "reads of {max_read}");
            let got = op.imported(decoded.unwrap(), "server").unwrap();
            assert_eq!(got.busid.to_string(), "1-1");
            assert_eq!(got.devid(), 0x0001_0003);
        }
    }

    #[test]
    fn refusals_and_wrong_replies_are_typed() {
        let mut refused = Vec::new();
        OpReply::Import {
            version: USBIP_VERSION,
            status: OpStatus::DevBusy,
            device: None,
        }
        .encode(&mut refused);
        let mut op = OpExchange::import("1-1");
        let (decoded, read) = run(&mut op, &refused, 3);
        assert_eq!(read, 8, "a refusal is a bare header");
        match op.imported(decoded.unwrap(), "server:3240") {
            Err(ClientError::ImportRefused { busid, status, .. }) => {
                assert_eq!((busid.as_str(), status), ("1-1", OpStatus::DevBusy));
            }
            other => panic!("{other:?}"),
        }

        let mut list_failed = Vec::new();
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Error,
            devices: Vec::new(),
        }
        .encode(&mut list_failed);
        let mut op = OpExchange::devlist();
        let (decoded, _) = run(&mut op, &list_failed, 64);
        assert!(matches!(
            op.devices(decoded.unwrap(), "server"),
            Err(ClientError::ListRefused {
                status: OpStatus::Error,
                ..
            })
        ));

        // A devlist answered with an import reply, and the other way round.
        let mut op = OpExchange::devlist();
        let (decoded, _) = run(&mut op, &refused, 64);
        assert!(matches!(
            op.devices(decoded.unwrap(), "server"),
            Err(ClientError::Protocol {
                source: DecodeError::UnknownOpCode(OP_REP_IMPORT),
                ..
            })
        ));
        let mut op = OpExchange::import("1-1");
        let (decoded, _) = run(&mut op, &list_failed, 64);
        assert!(matches!(
            op.imported(decoded.unwrap(), "server"),
            Err(ClientError::Protocol {
                source: DecodeError::UnknownOpCode(OP_REP_DEVLIST),
                ..
            })
        ));
    }

    #[test]
    fn hostile_replies_fail_before_anything_is_allocated_for_them() {
        let mut op = OpExchange::import("1-1");
        let (decoded, read) = run(&mut op, b"HTTP/1.1 400 Bad", 64);
        assert_eq!(
            decoded,
            Err(DecodeError::UnknownOpCode(u16::from_be_bytes(*b"TP")))
        );
        assert_eq!(read, 8, "the header alone was read");
        // A devlist claiming more devices than the limit.
        let mut huge = vec![0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut op = OpExchange::devlist();
        let (decoded, read) = run(&mut op, &huge, 64);
        assert!(matches!(decoded, Err(DecodeError::TooLong { .. })));
        assert_eq!(read, 12);
    }

    #[test]
    fn a_reservation_token_goes_after_the_bus_id_and_never_into_messages() {
        let hex = "00112233445566778899aabbccddeeff";
        let op = OpExchange::import(&format!("1-1.2#{hex}"));
        let field = &op.poll_transmit()[8..];
        assert_eq!(&field[..6], b"1-1.2\0");
        assert_eq!(
            ImportToken::from_busid_field(field),
            ImportToken::from_hex(hex)
        );
        let refused = op.imported(
            OpReply::Import {
                version: USBIP_VERSION,
                status: OpStatus::DevBusy,
                device: None,
            },
            "h:3240",
        );
        assert!(!refused.unwrap_err().to_string().contains(hex));
        // Malformed: the bus id alone, no token.
        let op = OpExchange::import("1-1#xyz");
        assert_eq!(
            ImportToken::from_busid_field(&op.poll_transmit()[8..]),
            None
        );
        assert_eq!(&op.poll_transmit()[8..12], b"1-1\0");
    }
}
