//! UrbCommand::decode on arbitrary bytes. The first input byte says which
//! endpoints are isochronous (bit `ep % 8`); the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbwire_proto::urb::ISO_PACKET_LEN;
use usbwire_proto::{Decoded, Direction, IsoPacket, Limits, UrbCommand, URB_HEADER_LEN};

mod common;

fuzz_target!(|input: &[u8]| {
    let Some((&ctrl, data)) = input.split_first() else {
        return;
    };
    // Small limits keep inputs short; the logic is the same at any size.
    let lim = Limits {
        max_transfer_length: 4096,
        max_iso_packets: 32,
        ..Limits::default()
    };
    let is_iso = |_: Direction, ep: u32| ctrl & (1 << (ep % 8)) != 0;

    let r = UrbCommand::decode(data, &lim, is_iso);
    common::check_decoded(data.len(), &r);
    if let Ok(Decoded::NeedMore(n)) = r {
        assert!(n <= URB_HEADER_LEN + 4096 + 32 * ISO_PACKET_LEN);
    }
    let Ok(Decoded::Message(m1, n1)) = r else {
        return;
    };
    assert_eq!(
        UrbCommand::decode(&data[..n1], &lim, is_iso),
        Ok(Decoded::Message(m1.clone(), n1))
    );

    let mut e1 = Vec::new();
    match &m1 {
        UrbCommand::Submit { cmd, data: d, iso } => {
            assert_eq!(d.start, URB_HEADER_LEN);
            assert_eq!(iso.start, d.end);
            assert_eq!(iso.end, n1);
            assert_eq!(iso.len() % ISO_PACKET_LEN, 0);
            match cmd.direction {
                Direction::Out => assert_eq!(d.len(), cmd.transfer_buffer_length as usize),
                Direction::In => assert!(d.is_empty()),
            }
            assert!(cmd.transfer_buffer_length <= lim.max_transfer_length);
            let packets: Vec<IsoPacket> = IsoPacket::iter(&data[iso.clone()]).collect();
            if !is_iso(cmd.direction, cmd.ep) {
                assert!(packets.is_empty());
            }
            assert!(packets.len() <= lim.max_iso_packets as usize);
            for p in &packets {
                assert!(
                    u64::from(p.offset) + u64::from(p.length)
                        <= u64::from(cmd.transfer_buffer_length)
                );
            }
            // No backend may be made to allocate more than the buffer.
            let sum: u64 = packets.iter().map(|p| u64::from(p.length)).sum();
            assert!(sum <= u64::from(cmd.transfer_buffer_length));

            cmd.encode(&data[d.clone()], &packets, &mut e1);
            assert_eq!(e1.len(), n1);
            match UrbCommand::decode(&e1, &lim, is_iso) {
                Ok(Decoded::Message(
                    UrbCommand::Submit {
                        cmd: cmd2,
                        data: d2,
                        iso: iso2,
                    },
                    n2,
                )) => {
                    assert_eq!(n2, e1.len());
                    assert_eq!(cmd2, *cmd);
                    assert_eq!(d2, *d);
                    assert_eq!(iso2, *iso);
                    assert_eq!(&e1[d2], &data[d.clone()]);
                    assert!(IsoPacket::iter(&e1[iso2]).eq(packets.iter().copied()));
                }
                other => panic!("re-encoded {m1:?} decodes to {other:?}"),
            }
            // The header's 48 bytes are reproduced exactly: nothing in it
            // is padding.
            assert_eq!(&e1[..URB_HEADER_LEN], &data[..URB_HEADER_LEN]);
        }
        UrbCommand::Unlink(u) => {
            assert_eq!(n1, URB_HEADER_LEN);
            u.encode(&mut e1);
            assert_eq!(
                UrbCommand::decode(&e1, &lim, is_iso),
                Ok(Decoded::Message(m1.clone(), URB_HEADER_LEN))
            );
            assert_eq!(&e1[..24], &data[..24]);
        }
    }
});
