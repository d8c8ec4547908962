//! UrbReply::decode on arbitrary bytes. The first input byte, mixed with
//! the reply's seqnum, decides what the client has in flight for it: none,
//! or an IN/OUT, isochronous or not, URB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbwire_proto::urb::{InFlight, ISO_PACKET_LEN};
use usbwire_proto::{Decoded, Direction, IsoPacket, Limits, UrbReply, URB_HEADER_LEN};

mod common;

fn in_flight(ctrl: u8, seqnum: u32) -> Option<InFlight> {
    let (direction, iso) = match (ctrl ^ seqnum as u8) % 5 {
        0 => return None,
        1 => (Direction::In, false),
        2 => (Direction::Out, false),
        3 => (Direction::In, true),
        _ => (Direction::Out, true),
    };
    Some(InFlight { direction, iso, length: u32::MAX })
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctrl, data)) = input.split_first() else {
        return;
    };
    let lim = Limits {
        max_transfer_length: 4096,
        max_iso_packets: 32,
        ..Limits::default()
    };
    let flight = |seq: u32| in_flight(ctrl, seq);

    let r = UrbReply::decode(data, &lim, flight);
    common::check_decoded(data.len(), &r);
    if let Ok(Decoded::NeedMore(n)) = r {
        assert!(n <= URB_HEADER_LEN + 4096 + 32 * ISO_PACKET_LEN);
    }
    let Ok(Decoded::Message(m1, n1)) = r else {
        return;
    };
    assert_eq!(
        UrbReply::decode(&data[..n1], &lim, flight),
        Ok(Decoded::Message(m1.clone(), n1))
    );

    let mut e1 = Vec::new();
    match &m1 {
        UrbReply::Submit { ret, data: d, iso } => {
            let urb = flight(ret.seqnum).expect("decoded a reply with nothing in flight");
            assert_eq!(d.start, URB_HEADER_LEN);
            assert_eq!(iso.start, d.end);
            assert_eq!(iso.end, n1);
            assert_eq!(iso.len() % ISO_PACKET_LEN, 0);
            match urb.direction {
                Direction::In => assert_eq!(d.len(), ret.actual_length as usize),
                Direction::Out => assert!(d.is_empty()),
            }
            assert!(ret.actual_length <= lim.max_transfer_length);
            let packets: Vec<IsoPacket> = IsoPacket::iter(&data[iso.clone()]).collect();
            if !urb.iso {
                assert!(packets.is_empty());
            }
            if urb.iso && urb.direction == Direction::In {
                let sum: u64 = packets.iter().map(|p| u64::from(p.actual_length)).sum();
                assert_eq!(sum, u64::from(ret.actual_length));
            }

            ret.encode(&data[d.clone()], &packets, &mut e1);
            assert_eq!(e1.len(), n1);
            match UrbReply::decode(&e1, &lim, flight) {
                Ok(Decoded::Message(
                    UrbReply::Submit {
                        ret: ret2,
                        data: d2,
                        iso: iso2,
                    },
                    n2,
                )) => {
                    assert_eq!(n2, e1.len());
                    assert_eq!(ret2, *ret);
                    assert_eq!(d2, *d);
                    assert_eq!(iso2, *iso);
                    assert_eq!(&e1[d2], &data[d.clone()]);
                    assert!(IsoPacket::iter(&e1[iso2]).eq(packets.iter().copied()));
                }
                other => panic!("re-encoded {m1:?} decodes to {other:?}"),
            }
            // Everything but the 8 bytes of padding is reproduced.
            assert_eq!(&e1[..40], &data[..40]);
        }
        UrbReply::Unlink(u) => {
            assert_eq!(n1, URB_HEADER_LEN);
            u.encode(&mut e1);
            assert_eq!(
                UrbReply::decode(&e1, &lim, flight),
                Ok(Decoded::Message(m1.clone(), URB_HEADER_LEN))
            );
            assert_eq!(&e1[..24], &data[..24]);
        }
    }
});
