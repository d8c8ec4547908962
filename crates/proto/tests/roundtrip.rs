//! Property round-trips: arbitrary messages encode, then decode to the same
//! value; messages back to back in one buffer decode one after the other;
//! and a stream cut at arbitrary points, fed piece by piece into a buffer,
//! yields the same messages with the same framing.

use core::fmt::Debug;

use proptest::prelude::*;
use usbwire_proto::urb::InFlight;
use usbwire_proto::{
    CmdSubmit, CmdUnlink, DecodeError, Decoded, DeviceInfo, Direction, InterfaceInfo, IsoPacket,
    Limits, OpReply, OpRequest, OpStatus, RetSubmit, RetUnlink, Speed, UrbCommand, UrbReply,
    WireString, URB_HEADER_LEN,
};

fn limits() -> Limits {
    Limits::default()
}

// ---------------------------------------------------------------------------
// Strategies: OP_* phase
// ---------------------------------------------------------------------------

/// A field's content: text of ours, which leaves room for the NUL (at
/// most `N - 1` bytes, the longest and the empty one weighted), or what a
/// peer may send: any bytes but NUL, UTF-8 or not, up to the whole field
/// with no NUL to end it.
fn field<const N: usize>() -> impl Strategy<Value = WireString<N>> {
    let max = N - 1;
    prop_oneof![
        1 => Just(WireString::default()),
        2 => proptest::string::string_regex(&format!("[!-~]{{{max}}}"))
            .unwrap()
            .prop_map(WireString::from),
        2 => proptest::string::string_regex(&format!("[a-z0-9./:-]{{1,{max}}}"))
            .unwrap()
            .prop_map(WireString::from),
        2 => proptest::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..=max)
            .prop_map(|cs| WireString::from(cs.into_iter().collect::<String>())),
        3 => proptest::collection::vec(1u8..=255, 0..=N).prop_map(|b| WireString::from_field(&b)),
        1 => proptest::collection::vec(1u8..=255, N).prop_map(|b| WireString::from_field(&b)),
    ]
}

fn version() -> impl Strategy<Value = u16> {
    prop_oneof![Just(0x0111u16), Just(0x0106), Just(0), any::<u16>()]
}

fn speed() -> impl Strategy<Value = Speed> {
    prop_oneof![0u32..8, any::<u32>()].prop_map(Speed::from_u32)
}

fn op_status() -> impl Strategy<Value = OpStatus> {
    prop_oneof![0u32..7, any::<u32>()].prop_map(OpStatus::from_u32)
}

fn interface() -> impl Strategy<Value = InterfaceInfo> {
    any::<[u8; 3]>().prop_map(|[class, subclass, protocol]| InterfaceInfo {
        class,
        subclass,
        protocol,
    })
}

/// A device record. In a devlist the interface records follow and their
/// count is `num_interfaces`; in an import there are none and
/// `num_interfaces` is free.
fn device(in_devlist: bool) -> impl Strategy<Value = DeviceInfo> {
    let ifaces = if in_devlist {
        prop_oneof![
            8 => proptest::collection::vec(interface(), 0..6),
            1 => proptest::collection::vec(interface(), 255..=255),
        ]
        .boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (
        (field(), field(), any::<u32>(), any::<u32>(), speed()),
        (any::<u16>(), any::<u16>(), any::<u16>(), any::<[u8; 6]>()),
        ifaces,
    )
        .prop_map(
            move |((path, busid, busnum, devnum, speed), (vid, pid, bcd, b), interfaces)| {
                DeviceInfo {
                    path,
                    busid,
                    busnum,
                    devnum,
                    speed,
                    id_vendor: vid,
                    id_product: pid,
                    bcd_device: bcd,
                    device_class: b[0],
                    device_subclass: b[1],
                    device_protocol: b[2],
                    configuration_value: b[3],
                    num_configurations: b[4],
                    num_interfaces: if in_devlist {
                        interfaces.len() as u8
                    } else {
                        b[5]
                    },
                    interfaces,
                }
            },
        )
}

fn op_request() -> impl Strategy<Value = OpRequest> {
    prop_oneof![
        version().prop_map(|version| OpRequest::Devlist { version }),
        (version(), field()).prop_map(|(version, busid)| OpRequest::Import { version, busid }),
    ]
}

fn op_reply() -> impl Strategy<Value = OpReply> {
    prop_oneof![
        (
            version(),
            op_status(),
            proptest::collection::vec(device(true), 0..4)
        )
            .prop_map(|(version, status, devices)| OpReply::Devlist {
                version,
                status,
                devices
            }),
        (version(), device(false)).prop_map(|(version, d)| OpReply::Import {
            version,
            status: OpStatus::Ok,
            device: Some(d),
        }),
        (
            version(),
            op_status().prop_filter("failure", |s| *s != OpStatus::Ok)
        )
            .prop_map(|(version, status)| OpReply::Import {
                version,
                status,
                device: None,
            }),
    ]
}

// ---------------------------------------------------------------------------
// URB phase: owned forms of decoded frames, so that they can be compared.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Cmd {
    Submit {
        cmd: CmdSubmit,
        /// What `is_iso` answers for this URB's endpoint.
        is_iso: bool,
        data: Vec<u8>,
        iso: Vec<IsoPacket>,
    },
    Unlink(CmdUnlink),
}

impl Cmd {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Cmd::Submit { cmd, data, iso, .. } => cmd.encode(data, iso, out),
            Cmd::Unlink(u) => u.encode(out),
        }
    }

    /// Decodes the next frame, answering `is_iso` as `expected` says (and
    /// checking that the decoder asks about the right endpoint).
    fn decode(b: &[u8], expected: &Cmd) -> Result<Decoded<Cmd>, DecodeError> {
        let answer = match expected {
            Cmd::Submit { cmd, is_iso, .. } => Some((cmd.direction, cmd.ep, *is_iso)),
            Cmd::Unlink(_) => None,
        };
        let is_iso = |d: Direction, ep: u32| {
            let (ed, eep, iso) = answer.expect("is_iso called for an UNLINK");
            assert_eq!((d, ep), (ed, eep));
            iso
        };
        Ok(match UrbCommand::decode(b, &limits(), is_iso)? {
            Decoded::NeedMore(n) => Decoded::NeedMore(n),
            Decoded::Message(UrbCommand::Submit { cmd, data, iso }, n) => {
                assert_eq!(data.start, URB_HEADER_LEN);
                assert_eq!(iso.start, data.end);
                assert_eq!(iso.end, n);
                assert!(n <= b.len());
                Decoded::Message(
                    Cmd::Submit {
                        cmd,
                        is_iso: answer.unwrap().2,
                        data: b[data].to_vec(),
                        iso: IsoPacket::iter(&b[iso]).collect(),
                    },
                    n,
                )
            }
            Decoded::Message(UrbCommand::Unlink(u), n) => Decoded::Message(Cmd::Unlink(u), n),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ret {
    Submit {
        ret: RetSubmit,
        /// What `in_flight` answers for this seqnum.
        urb: InFlight,
        data: Vec<u8>,
        iso: Vec<IsoPacket>,
    },
    Unlink(RetUnlink),
}

impl Ret {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Ret::Submit { ret, data, iso, .. } => ret.encode(data, iso, out),
            Ret::Unlink(u) => u.encode(out),
        }
    }

    fn decode(b: &[u8], expected: &Ret) -> Result<Decoded<Ret>, DecodeError> {
        let answer = match expected {
            Ret::Submit { ret, urb, .. } => Some((ret.seqnum, *urb)),
            Ret::Unlink(_) => None,
        };
        let in_flight = |seq: u32| {
            let (eseq, urb) = answer.expect("in_flight called for a RET_UNLINK");
            assert_eq!(seq, eseq);
            Some(urb)
        };
        Ok(match UrbReply::decode(b, &limits(), in_flight)? {
            Decoded::NeedMore(n) => Decoded::NeedMore(n),
            Decoded::Message(UrbReply::Submit { ret, data, iso }, n) => {
                assert_eq!(data.start, URB_HEADER_LEN);
                assert_eq!(iso.start, data.end);
                assert_eq!(iso.end, n);
                assert!(n <= b.len());
                Decoded::Message(
                    Ret::Submit {
                        ret,
                        urb: answer.unwrap().1,
                        data: b[data].to_vec(),
                        iso: IsoPacket::iter(&b[iso]).collect(),
                    },
                    n,
                )
            }
            Decoded::Message(UrbReply::Unlink(u), n) => Decoded::Message(Ret::Unlink(u), n),
        })
    }
}

// ---------------------------------------------------------------------------
// Strategies: URB phase
// ---------------------------------------------------------------------------

fn direction() -> impl Strategy<Value = Direction> {
    prop_oneof![Just(Direction::Out), Just(Direction::In)]
}

fn ep() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..16, 1 => any::<u32>()]
}

/// `number_of_packets` as peers send it on non-isochronous URBs.
fn non_iso_np() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(u32::MAX), any::<u32>()]
}

/// An isochronous packet count field for `n` packets: `n`, or -1 when there
/// are none.
fn iso_np(n: usize) -> BoxedStrategy<u32> {
    if n == 0 {
        prop_oneof![Just(0u32), Just(u32::MAX)].boxed()
    } else {
        Just(n as u32).boxed()
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..80)
}

/// Descriptors inside a `tbl`-byte buffer, laid out as hosts lay them: in
/// order and without overlap (gaps allowed), so their lengths never add up
/// to more than the buffer.
fn iso_in_buffer(tbl: u32) -> impl Strategy<Value = Vec<IsoPacket>> {
    (
        proptest::collection::vec(0..=tbl, 0..12),
        proptest::collection::vec((any::<u32>(), any::<i32>()), 6),
    )
        .prop_map(|(mut cuts, results)| {
            cuts.truncate(cuts.len() / 2 * 2);
            cuts.sort_unstable();
            cuts.chunks_exact(2)
                .zip(results)
                .map(|(c, (actual_length, status))| IsoPacket {
                    offset: c[0],
                    length: c[1] - c[0],
                    actual_length,
                    status,
                })
                .collect()
        })
}

fn cmd_submit() -> impl Strategy<Value = Cmd> {
    let max = limits().max_transfer_length;
    let header = (
        any::<u32>(),
        any::<u32>(),
        ep(),
        any::<u32>(),
        any::<i32>(),
        any::<i32>(),
        any::<[u8; 8]>(),
    );
    // OUT sends the whole buffer; IN sends none, so its length may be
    // anything up to the limit.
    let body = (direction(), payload(), prop_oneof![0u32..100, 0..=max]).prop_map(
        |(dir, data, in_len)| match dir {
            Direction::Out => (dir, data.len() as u32, data),
            Direction::In => (dir, in_len, Vec::new()),
        },
    );
    (header, body, any::<bool>())
        .prop_flat_map(|(h, (dir, tbl, data), is_iso)| {
            let iso = if is_iso {
                iso_in_buffer(tbl).boxed()
            } else {
                Just(Vec::new()).boxed()
            };
            (Just(h), Just((dir, tbl, data)), Just(is_iso), iso)
        })
        .prop_flat_map(|(h, body, is_iso, iso)| {
            let np = if is_iso {
                iso_np(iso.len())
            } else {
                non_iso_np().boxed()
            };
            (Just(h), Just(body), Just(is_iso), Just(iso), np)
        })
        .prop_map(
            |(
                (seqnum, devid, ep, transfer_flags, start_frame, interval, setup),
                (direction, tbl, data),
                is_iso,
                iso,
                np,
            )| Cmd::Submit {
                cmd: CmdSubmit {
                    seqnum,
                    devid,
                    direction,
                    ep,
                    transfer_flags,
                    transfer_buffer_length: tbl,
                    start_frame,
                    number_of_packets: np,
                    interval,
                    setup,
                },
                is_iso,
                data,
                iso,
            },
        )
}

fn cmd_unlink() -> impl Strategy<Value = Cmd> {
    any::<[u32; 5]>().prop_map(|[seqnum, devid, direction, ep, unlink_seqnum]| {
        Cmd::Unlink(CmdUnlink {
            seqnum,
            devid,
            direction,
            ep,
            unlink_seqnum,
        })
    })
}

fn urb_command() -> impl Strategy<Value = Cmd> {
    prop_oneof![3 => cmd_submit(), 1 => cmd_unlink()]
}

fn ret_submit() -> impl Strategy<Value = Ret> {
    let max = limits().max_transfer_length;
    let header = (any::<[u32; 4]>(), any::<i32>(), any::<i32>(), any::<i32>());
    // (urb, actual_length, data, iso, number_of_packets)
    let non_iso = (direction(), payload(), 0..=max, non_iso_np()).prop_map(
        |(direction, data, out_len, np)| {
            let urb = InFlight {
                direction,
                iso: false,
                length: u32::MAX,
            };
            match direction {
                Direction::In => (urb, data.len() as u32, data, Vec::new(), np),
                Direction::Out => (urb, out_len, Vec::new(), Vec::new(), np),
            }
        },
    );
    let any_pkt = (any::<u32>(), any::<u32>(), 0u32..24, any::<i32>()).prop_map(
        |(offset, length, actual_length, status)| IsoPacket {
            offset,
            length,
            actual_length,
            status,
        },
    );
    // ISO IN: the payload is packed, so its length is the sum of the
    // packets' actual lengths, and so is actual_length.
    let iso_in = proptest::collection::vec(any_pkt.clone(), 0..6)
        .prop_flat_map(|iso| {
            let sum: u32 = iso.iter().map(|p| p.actual_length).sum();
            let np = iso_np(iso.len());
            (
                proptest::collection::vec(any::<u8>(), sum as usize),
                Just(iso),
                np,
            )
        })
        .prop_map(|(data, iso, np)| {
            let urb = InFlight {
                direction: Direction::In,
                iso: true,
                length: u32::MAX,
            };
            (urb, data.len() as u32, data, iso, np)
        });
    // ISO OUT: no payload, but the kernel still requires actual_length to
    // be the sum of the packets' actual lengths.
    let iso_out = proptest::collection::vec(any_pkt, 0..6)
        .prop_flat_map(|iso| {
            let actual: u32 = iso.iter().map(|p| p.actual_length).sum();
            let np = iso_np(iso.len());
            (Just(iso), Just(actual), np)
        })
        .prop_map(|(iso, actual, np)| {
            let urb = InFlight {
                direction: Direction::Out,
                iso: true,
                length: u32::MAX,
            };
            (urb, actual, Vec::new(), iso, np)
        });
    (header, prop_oneof![non_iso, iso_in, iso_out]).prop_map(
        |(
            ([seqnum, devid, direction, ep], status, start_frame, error_count),
            (urb, actual_length, data, iso, number_of_packets),
        )| Ret::Submit {
            ret: RetSubmit {
                seqnum,
                devid,
                direction,
                ep,
                status,
                actual_length,
                start_frame,
                number_of_packets,
                error_count,
            },
            urb,
            data,
            iso,
        },
    )
}

fn ret_unlink() -> impl Strategy<Value = Ret> {
    (any::<[u32; 4]>(), any::<i32>()).prop_map(|([seqnum, devid, direction, ep], status)| {
        Ret::Unlink(RetUnlink {
            seqnum,
            devid,
            direction,
            ep,
            status,
        })
    })
}

fn urb_reply() -> impl Strategy<Value = Ret> {
    prop_oneof![3 => ret_submit(), 1 => ret_unlink()]
}

// ---------------------------------------------------------------------------
// Stream checking
// ---------------------------------------------------------------------------

/// Encodes `msgs` into one stream, cuts it at `cuts` (taken modulo the
/// stream length), and feeds the pieces into a buffer one at a time,
/// decoding whenever the buffer may hold a message. The messages must come
/// out unchanged, each taking exactly its own bytes, and every `NeedMore`
/// must ask for more than is buffered but not beyond the current message.
fn feed<M: Debug + PartialEq>(
    msgs: &[M],
    cuts: &[usize],
    encode: impl Fn(&M, &mut Vec<u8>),
    decode: impl Fn(&[u8], &M) -> Result<Decoded<M>, DecodeError>,
) -> Result<(), TestCaseError> {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        encode(m, &mut stream);
        ends.push(stream.len());
    }
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();

    let mut buf = Vec::new();
    let mut fed = 0;
    let mut base = 0; // stream offset of buf[0]
    let mut got = Vec::new();
    for cut in cuts {
        buf.extend_from_slice(&stream[fed..cut]);
        fed = cut;
        while got.len() < msgs.len() {
            match decode(&buf, &msgs[got.len()]) {
                Ok(Decoded::Message(m, n)) => {
                    prop_assert!(n <= buf.len());
                    prop_assert_eq!(base + n, ends[got.len()], "frame length");
                    got.push(m);
                    buf.drain(..n);
                    base += n;
                }
                Ok(Decoded::NeedMore(n)) => {
                    prop_assert!(n > buf.len(), "NeedMore({}) with {} buffered", n, buf.len());
                    prop_assert!(
                        base + n <= ends[got.len()],
                        "NeedMore({}) reaches past the message",
                        n
                    );
                    break;
                }
                Err(e) => return Err(TestCaseError::fail(format!("decode error {e}"))),
            }
        }
    }
    prop_assert!(buf.is_empty());
    prop_assert_eq!(got.as_slice(), msgs);
    Ok(())
}

fn enc_op_request(m: &OpRequest, out: &mut Vec<u8>) {
    m.encode(out)
}
fn dec_op_request(b: &[u8], _: &OpRequest) -> Result<Decoded<OpRequest>, DecodeError> {
    OpRequest::decode(b)
}
fn enc_op_reply(m: &OpReply, out: &mut Vec<u8>) {
    m.encode(out)
}
fn dec_op_reply(b: &[u8], _: &OpReply) -> Result<Decoded<OpReply>, DecodeError> {
    OpReply::decode(b, &limits())
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..12)
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn op_request_roundtrip(m in op_request()) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let expected_len = match &m {
            OpRequest::Devlist { .. } => 8,
            OpRequest::Import { .. } => 40,
        };
        prop_assert_eq!(out.len(), expected_len);
        prop_assert_eq!(OpRequest::decode(&out).unwrap(), Decoded::Message(m, out.len()));
    }

    #[test]
    fn op_reply_roundtrip(m in op_reply()) {
        let mut out = Vec::new();
        m.encode(&mut out);
        prop_assert_eq!(OpReply::decode(&out, &limits()).unwrap(), Decoded::Message(m, out.len()));
    }

    #[test]
    fn urb_command_roundtrip(m in urb_command()) {
        let mut out = Vec::new();
        m.encode(&mut out);
        prop_assert_eq!(Cmd::decode(&out, &m).unwrap(), Decoded::Message(m, out.len()));
    }

    /// Every prefix holding at least the header gives what the whole frame
    /// gives, so a server may start an URB's buffer from the header alone.
    #[test]
    fn submit_header_agrees_with_decode(m in urb_command()) {
        let mut out = Vec::new();
        m.encode(&mut out);
        let is_iso = match &m {
            Cmd::Submit { is_iso, .. } => *is_iso,
            Cmd::Unlink(_) => false,
        };
        let whole = UrbCommand::decode(&out, &limits(), |_, _| is_iso).unwrap();
        for cut in [0, URB_HEADER_LEN - 1, URB_HEADER_LEN, (URB_HEADER_LEN + out.len()) / 2, out.len()] {
            let cut = cut.min(out.len());
            let h = UrbCommand::submit_header(&out[..cut], &limits(), |_, _| is_iso).unwrap();
            match (&whole, h) {
                (_, None) if cut < URB_HEADER_LEN => {}
                (Decoded::Message(UrbCommand::Unlink(_), _), None) => {}
                (Decoded::Message(UrbCommand::Submit { cmd, data, iso }, n), Some(h)) => {
                    prop_assert_eq!(&h.cmd, cmd);
                    prop_assert_eq!(&h.data, data);
                    prop_assert_eq!(&h.iso, iso);
                    prop_assert_eq!(h.frame_len(), *n);
                }
                (w, h) => prop_assert!(false, "cut {}: decode {:?}, header {:?}", cut, w, h),
            }
        }
    }

    #[test]
    fn urb_reply_roundtrip(m in urb_reply()) {
        let mut out = Vec::new();
        m.encode(&mut out);
        prop_assert_eq!(Ret::decode(&out, &m).unwrap(), Decoded::Message(m, out.len()));
    }

    /// decode(encode(a) ++ encode(b)) gives a, then b.
    #[test]
    fn op_request_pair(a in op_request(), b in op_request()) {
        feed(&[a, b], &[], enc_op_request, dec_op_request)?;
    }

    #[test]
    fn op_reply_pair(a in op_reply(), b in op_reply()) {
        feed(&[a, b], &[], enc_op_reply, dec_op_reply)?;
    }

    #[test]
    fn urb_command_pair(a in urb_command(), b in urb_command()) {
        feed(&[a, b], &[], Cmd::encode, Cmd::decode)?;
    }

    #[test]
    fn urb_reply_pair(a in urb_reply(), b in urb_reply()) {
        feed(&[a, b], &[], Ret::encode, Ret::decode)?;
    }

    /// A stream split at arbitrary points and fed incrementally.
    #[test]
    fn op_request_stream(msgs in proptest::collection::vec(op_request(), 0..8), cuts in cuts()) {
        feed(&msgs, &cuts, enc_op_request, dec_op_request)?;
    }

    #[test]
    fn op_reply_stream(msgs in proptest::collection::vec(op_reply(), 0..5), cuts in cuts()) {
        feed(&msgs, &cuts, enc_op_reply, dec_op_reply)?;
    }

    #[test]
    fn urb_command_stream(msgs in proptest::collection::vec(urb_command(), 0..10), cuts in cuts()) {
        feed(&msgs, &cuts, Cmd::encode, Cmd::decode)?;
    }

    #[test]
    fn urb_reply_stream(msgs in proptest::collection::vec(urb_reply(), 0..10), cuts in cuts()) {
        feed(&msgs, &cuts, Ret::encode, Ret::decode)?;
    }

    /// Byte-at-a-time feeding: the harshest split.
    #[test]
    fn urb_command_byte_by_byte(msgs in proptest::collection::vec(urb_command(), 1..4)) {
        let mut total = 0;
        for m in &msgs {
            let mut v = Vec::new();
            m.encode(&mut v);
            total += v.len();
        }
        let cuts: Vec<usize> = (0..total).collect();
        feed(&msgs, &cuts, Cmd::encode, Cmd::decode)?;
    }

    #[test]
    fn op_reply_byte_by_byte(m in op_reply()) {
        let mut v = Vec::new();
        m.encode(&mut v);
        let cuts: Vec<usize> = (0..v.len()).collect();
        feed(&[m], &cuts, enc_op_reply, dec_op_reply)?;
    }

    /// The setup packet's little-endian fields survive the trip.
    #[test]
    fn setup_packet_roundtrip(b in any::<[u8; 8]>()) {
        let s = usbwire_proto::SetupPacket::from_bytes(b);
        prop_assert_eq!(s.to_bytes(), b);
        prop_assert_eq!(s.value, u16::from_le_bytes([b[2], b[3]]));
        prop_assert_eq!(s.length, u16::from_le_bytes([b[6], b[7]]));
    }

    /// Status and speed numbers survive, including ones outside the tables.
    #[test]
    fn enum_numbers_roundtrip(v in any::<u32>()) {
        prop_assert_eq!(OpStatus::from_u32(v).to_u32(), v);
        prop_assert_eq!(Speed::from_u32(v).to_u32(), v);
    }
}
