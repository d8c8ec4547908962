//! The URB-phase rules, driven byte by byte with no socket and no clock.

use std::io::IoSlice;

use usbwire_proto::urb::URB_HEADER_LEN;
use usbwire_proto::{
    CmdSubmit, CmdUnlink, DecodeError, Decoded, DeviceInfo, Direction, Errno, IsoPacket, Limits,
    RetSubmit, RetUnlink, SetupPacket, Speed, UrbCommand,
};

use super::{
    Completed, Connection, ConnectionConfig, ConnectionError, SubmitError, MAX_TRANSMIT_SLICES,
};
use crate::error::TransferError;
use crate::transfer::{TransferOutcome, TransferRequest};

const ECONNRESET: i32 = -104;

fn device() -> DeviceInfo {
    DeviceInfo {
        path: "/sys/devices/pci0000:00/usb1/1-1".into(),
        busid: "1-1".into(),
        busnum: 1,
        devnum: 2,
        speed: Speed::High,
        id_vendor: 0x1234,
        id_product: 0x5678,
        bcd_device: 0x0100,
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 1,
        num_configurations: 1,
        num_interfaces: 0,
        interfaces: Vec::new(),
    }
}

/// A connection whose tokens are plain labels.
fn connection(max_in_flight: usize) -> Connection<&'static str> {
    Connection::new(
        &device(),
        ConnectionConfig {
            max_in_flight,
            // Small, so that replies wrap around and compact the buffer.
            receive_buffer: 64,
            ..ConnectionConfig::default()
        },
    )
}

/// Everything queued for the socket, as if one write took it all.
fn transmit_all<T>(c: &mut Connection<T>) -> Vec<u8> {
    let mut out = Vec::new();
    // Bounded: each pass takes every slice lent, and at least one byte.
    while c.has_transmit() {
        let mut slices = [IoSlice::new(&[]); MAX_TRANSMIT_SLICES];
        let filled = c.poll_transmit(&mut slices);
        let n: usize = slices[..filled].iter().map(|s| s.len()).sum();
        assert!(n > 0, "has_transmit() but nothing lent");
        for s in &slices[..filled] {
            out.extend_from_slice(s);
        }
        c.transmitted(n);
    }
    out
}

/// The commands in a transmitted byte stream, as a server decodes them.
fn commands(mut bytes: &[u8]) -> Vec<(UrbCommand, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Decoded::Message(command, used) =
            UrbCommand::decode(bytes, &Limits::default(), |_, ep| ep == 5).unwrap()
        else {
            panic!("truncated command stream");
        };
        out.push((command, bytes[..used].to_vec()));
        bytes = &bytes[used..];
    }
    out
}

fn ret_submit(seqnum: u32, status: i32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    RetSubmit {
        seqnum,
        status,
        actual_length: data.len() as u32,
        number_of_packets: u32::MAX,
        ..Default::default()
    }
    .encode(data, &[], &mut out);
    out
}

fn ret_unlink(seqnum: u32, status: i32) -> Vec<u8> {
    let mut out = Vec::new();
    RetUnlink {
        seqnum,
        status,
        ..Default::default()
    }
    .encode(&mut out);
    out
}

fn completions<T>(c: &mut Connection<T>) -> Vec<Completed<T>> {
    std::iter::from_fn(|| c.poll_completed()).collect()
}

fn ok_with(data: &[u8]) -> TransferOutcome {
    TransferOutcome {
        status: Ok(()),
        data: data.to_vec(),
        actual_length: data.len() as u32,
        iso: Vec::new(),
        start_frame: 0,
        error_count: 0,
    }
}

#[test]
fn submit_encodes_every_field_and_long_payloads_go_out_uncopied() {
    let mut c = connection(16);
    let setup = SetupPacket {
        request_type: 0x80,
        request: 6,
        value: 0x0100,
        index: 0,
        length: 18,
    };
    let long = vec![0xa5; 64 * 1024];
    let iso = [
        IsoPacket {
            offset: 0,
            length: 3,
            ..Default::default()
        },
        IsoPacket {
            offset: 3,
            length: 5,
            ..Default::default()
        },
    ];
    let control = c
        .submit(TransferRequest::control(setup, Vec::new()), "control")
        .unwrap();
    let bulk = c
        .submit(TransferRequest::bulk_out(2, long.clone()), "bulk")
        .unwrap();
    let iso_out = c
        .submit(
            TransferRequest {
                endpoint: 5,
                data: vec![1; 8],
                iso: iso.to_vec(),
                interval: 1,
                ..Default::default()
            },
            "iso",
        )
        .unwrap();
    assert_eq!((control, bulk, iso_out), (1, 2, 3));
    {
        let mut slices = [IoSlice::new(&[]); MAX_TRANSMIT_SLICES];
        let filled = c.poll_transmit(&mut slices);
        assert!(
            slices[..filled]
                .iter()
                .any(|s| s.as_ptr() == long.as_ptr() || s.len() == long.len()),
            "the 64 KiB payload is lent from its own buffer"
        );
    }
    let sent = commands(&transmit_all(&mut c));
    let expected = [
        CmdSubmit {
            seqnum: 1,
            devid: 0x0001_0002,
            direction: Direction::In,
            ep: 0,
            transfer_flags: 0,
            transfer_buffer_length: 18,
            start_frame: 0,
            number_of_packets: 0,
            interval: 0,
            setup: setup.to_bytes(),
        },
        CmdSubmit {
            seqnum: 2,
            devid: 0x0001_0002,
            direction: Direction::Out,
            ep: 2,
            transfer_flags: 0,
            transfer_buffer_length: long.len() as u32,
            start_frame: 0,
            number_of_packets: 0,
            interval: 0,
            setup: [0; 8],
        },
        CmdSubmit {
            seqnum: 3,
            devid: 0x0001_0002,
            direction: Direction::Out,
            ep: 5,
            transfer_flags: 0,
            transfer_buffer_length: 8,
            start_frame: 0,
            number_of_packets: 2,
            interval: 1,
            setup: [0; 8],
        },
    ];
    assert_eq!(sent.len(), 3);
    for ((command, frame), want) in sent.iter().zip(expected) {
        let UrbCommand::Submit {
            cmd,
            data,
            iso: iso_range,
        } = command
        else {
            panic!("{command:?}");
        };
        assert_eq!(*cmd, want);
        match cmd.seqnum {
            2 => assert_eq!(&frame[data.clone()], &long[..]),
            3 => {
                assert_eq!(&frame[data.clone()], &[1; 8]);
                assert_eq!(
                    IsoPacket::iter(&frame[iso_range.clone()]).collect::<Vec<_>>(),
                    iso
                );
            }
            _ => assert!(data.is_empty()),
        }
    }
    assert_eq!(c.in_flight(), 3);
}

#[test]
fn partial_writes_at_every_byte_give_the_same_stream() {
    let build = || {
        let mut c = connection(16);
        c.submit(TransferRequest::bulk_out(1, vec![7; 20_000]), "a")
            .unwrap();
        c.submit(TransferRequest::bulk_in(1, 512), "b").unwrap();
        c.submit(TransferRequest::bulk_out(1, vec![9; 17_000]), "c")
            .unwrap();
        c.unlink(2);
        c
    };
    let whole = transmit_all(&mut build());
    assert_eq!(commands(&whole).len(), 4);
    // Each write takes `step` bytes at most, wherever it falls.
    for step in [1, 47, 48, 49, 4096, 20_047, 20_048] {
        let mut c = build();
        let mut out = Vec::new();
        while c.has_transmit() {
            let mut slices = [IoSlice::new(&[]); MAX_TRANSMIT_SLICES];
            let filled = c.poll_transmit(&mut slices);
            let mut room = step;
            for s in &slices[..filled] {
                let n = room.min(s.len());
                out.extend_from_slice(&s[..n]);
                room -= n;
            }
            c.transmitted(step - room);
        }
        assert_eq!(out, whole, "writes of {step} bytes");
    }
}

#[test]
fn in_flight_completes_with_its_data_in_reply_order() {
    let mut c = connection(16);
    let a = c.submit(TransferRequest::bulk_in(1, 8), "a").unwrap();
    let b = c
        .submit(TransferRequest::bulk_out(2, vec![1, 2]), "b")
        .unwrap();
    transmit_all(&mut c);
    let mut replies = ret_submit(b, 0, &[]);
    replies.extend(ret_submit(a, -32, b"shor"));
    c.handle_bytes(&replies).unwrap();
    let done = completions(&mut c);
    assert_eq!(done.len(), 2);
    assert_eq!((done[0].seqnum, done[0].token), (b, "b"));
    assert_eq!(done[0].outcome, ok_with(&[]));
    assert_eq!((done[1].seqnum, done[1].token), (a, "a"));
    assert_eq!(done[1].outcome.status, Err(TransferError::Stall));
    assert_eq!(done[1].outcome.data, b"shor", "a failed IN keeps its data");
    assert_eq!(c.in_flight(), 0);
}

/// When the client unlinks an URB relative to its RET_SUBMIT arriving.
#[derive(Debug, Clone, Copy)]
enum UnlinkAt {
    /// CMD_UNLINK queued, not yet written, when the RET_SUBMIT arrives.
    Queued,
    /// CMD_UNLINK written before the RET_SUBMIT arrives.
    Sent,
    /// After the RET_SUBMIT: nothing left to unlink.
    AfterCompletion,
}

#[test]
fn ret_submit_before_ret_unlink_zero_in_every_order() {
    for at in [UnlinkAt::Queued, UnlinkAt::Sent, UnlinkAt::AfterCompletion] {
        // The RET_SUBMIT and RET_UNLINK arrive together, or split anywhere.
        for split in 0..=(URB_HEADER_LEN + 4 + URB_HEADER_LEN) {
            let mut c = connection(16);
            let urb = c.submit(TransferRequest::bulk_in(1, 4), "in").unwrap();
            transmit_all(&mut c);
            let mut replies = ret_submit(urb, 0, b"data");
            let unlink_seqnum = match at {
                UnlinkAt::Queued | UnlinkAt::Sent => {
                    assert!(c.unlink(urb));
                    assert!(!c.unlink(urb), "one CMD_UNLINK per URB");
                    let sent = commands(&if matches!(at, UnlinkAt::Sent) {
                        transmit_all(&mut c)
                    } else {
                        let mut out = Vec::new();
                        let mut slices = [IoSlice::new(&[]); MAX_TRANSMIT_SLICES];
                        let filled = c.poll_transmit(&mut slices);
                        for s in &slices[..filled] {
                            out.extend_from_slice(s);
                        }
                        out
                    });
                    let [(UrbCommand::Unlink(u), _)] = &sent[..] else {
                        panic!("{sent:?}");
                    };
                    assert_eq!(u.unlink_seqnum, urb);
                    replies.extend(ret_unlink(u.seqnum, 0));
                    Some(u.seqnum)
                }
                UnlinkAt::AfterCompletion => None,
            };
            let split = split.min(replies.len());
            c.handle_bytes(&replies[..split]).unwrap();
            if matches!(at, UnlinkAt::AfterCompletion) && split == replies.len() {
                assert!(!c.unlink(urb), "completed: no CMD_UNLINK");
                assert!(!c.has_transmit());
            }
            c.handle_bytes(&replies[split..]).unwrap();
            let done = completions(&mut c);
            assert_eq!(done.len(), 1, "{at:?} split {split}");
            assert_eq!(done[0].outcome, ok_with(b"data"), "{at:?} split {split}");
            assert_eq!(
                c.in_flight(),
                0,
                "{at:?} split {split}: {unlink_seqnum:?} answered"
            );
            // Nothing is left that a second RET_UNLINK could match.
            if let Some(unlink_seqnum) = unlink_seqnum {
                assert_eq!(
                    c.handle_bytes(&ret_unlink(unlink_seqnum, 0)),
                    Err(ConnectionError::UnknownUnlink(unlink_seqnum))
                );
            }
        }
    }
}

#[test]
fn ret_unlink_for_an_urb_still_in_flight_ends_it_cancelled() {
    for (status, ended_with) in [
        (ECONNRESET, TransferError::Cancelled),
        (-2, TransferError::Cancelled),
        // usbip-host: completed while being unlinked, no RET_SUBMIT, result lost.
        (0, TransferError::Cancelled),
        (-108, TransferError::Disconnected(Some(Errno::ESHUTDOWN))),
    ] {
        let mut c = connection(16);
        let kept = c.submit(TransferRequest::bulk_in(1, 8), "kept").unwrap();
        let urb = c.submit(TransferRequest::bulk_in(1, 8), "cut").unwrap();
        assert!(c.unlink(urb));
        let sent = commands(&transmit_all(&mut c));
        let UrbCommand::Unlink(u) = &sent[2].0 else {
            panic!("{sent:?}")
        };
        c.handle_bytes(&ret_unlink(u.seqnum, status)).unwrap();
        let done = completions(&mut c);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].seqnum, done[0].token), (urb, "cut"));
        assert_eq!(done[0].outcome, TransferOutcome::failed(ended_with));
        assert_eq!(c.in_flight(), 1, "the other URB is untouched");
        // Its RET_SUBMIT may not come any more: the kernel's vhci fails the
        // connection on it too.
        assert_eq!(
            c.handle_bytes(&ret_submit(urb, 0, &[])),
            Err(DecodeError::UnknownSeqnum(urb).into())
        );
        let failed = completions(&mut c);
        assert_eq!(failed.len(), 1);
        assert_eq!((failed[0].seqnum, failed[0].token), (kept, "kept"));
    }
}

#[test]
fn replies_for_seqnums_not_in_flight_are_protocol_errors() {
    type Case = (&'static str, fn(u32, u32) -> Vec<u8>, ConnectionError);
    let cases: [Case; 4] = [
        (
            "RET_SUBMIT never asked for",
            |_, _| ret_submit(99, 0, &[]),
            DecodeError::UnknownSeqnum(99).into(),
        ),
        (
            "RET_SUBMIT twice",
            |urb, _| [ret_submit(urb, 0, b"ab"), ret_submit(urb, 0, b"ab")].concat(),
            DecodeError::UnknownSeqnum(1).into(),
        ),
        (
            "RET_UNLINK never asked for",
            |_, _| ret_unlink(77, ECONNRESET),
            ConnectionError::UnknownUnlink(77),
        ),
        (
            "RET_UNLINK twice",
            |_, unlink| [ret_unlink(unlink, ECONNRESET), ret_unlink(unlink, 0)].concat(),
            ConnectionError::UnknownUnlink(3),
        ),
    ];
    for (what, replies, error) in cases {
        let mut c = connection(16);
        let urb = c.submit(TransferRequest::bulk_in(1, 2), "first").unwrap();
        let other = c.submit(TransferRequest::bulk_in(1, 2), "second").unwrap();
        let unlink = if what.starts_with("RET_UNLINK twice") {
            c.unlink(urb);
            3
        } else {
            0
        };
        transmit_all(&mut c);
        assert_eq!(
            c.handle_bytes(&replies(urb, unlink)),
            Err(error.clone()),
            "{what}"
        );
        assert_eq!(c.error(), Some(&error));
        // Everything still in flight failed, once, in seqnum order.
        let done = completions(&mut c);
        let failed: Vec<_> = done
            .iter()
            .filter(|d| d.outcome == TransferOutcome::failed(TransferError::Disconnected(None)))
            .map(|d| d.seqnum)
            .collect();
        assert!(failed.contains(&other), "{what}: {done:?}");
        assert!(failed.windows(2).all(|w| w[0] < w[1]), "{what}");
        assert_eq!(c.in_flight(), 0, "{what}");
        // The connection stays failed.
        assert_eq!(c.handle_bytes(&[0]), Err(error), "{what}");
        assert!(!c.can_submit());
        assert!(matches!(
            c.submit(TransferRequest::bulk_in(1, 1), "late"),
            Err((SubmitError::Closed, "late"))
        ));
        assert!(!c.unlink(other));
    }
}

#[test]
fn a_reply_longer_than_its_urb_is_refused() {
    let mut c = connection(16);
    let urb = c.submit(TransferRequest::bulk_in(1, 2), "in").unwrap();
    transmit_all(&mut c);
    assert!(matches!(
        c.handle_bytes(&ret_submit(urb, 0, b"abc")),
        Err(ConnectionError::Decode(DecodeError::TooLong { .. }))
    ));
    assert_eq!(completions(&mut c).len(), 1);
}

#[test]
fn in_flight_bound_counts_submits_and_unlinks_but_never_refuses_an_unlink() {
    let mut c = connection(2);
    let a = c.submit(TransferRequest::bulk_in(1, 1), "a").unwrap();
    let b = c.submit(TransferRequest::bulk_in(1, 1), "b").unwrap();
    assert!(!c.can_submit());
    assert!(matches!(
        c.submit(TransferRequest::bulk_in(1, 1), "c"),
        Err((SubmitError::InFlightFull(2), "c"))
    ));
    assert!(c.unlink(a), "an unlink is taken at the bound");
    assert_eq!(c.in_flight(), 3);
    let sent = commands(&transmit_all(&mut c));
    assert_eq!(sent.len(), 3, "the refused submit sent nothing");
    let UrbCommand::Unlink(CmdUnlink { seqnum: unlink, .. }) = sent[2].0 else {
        panic!("{sent:?}");
    };
    c.handle_bytes(&ret_submit(b, 0, b"x")).unwrap();
    assert!(!c.can_submit(), "a's submit and unlink still await replies");
    c.handle_bytes(&ret_unlink(unlink, ECONNRESET)).unwrap();
    assert!(c.can_submit());
    assert_eq!(completions(&mut c).len(), 2);
    let d = c.submit(TransferRequest::bulk_in(1, 1), "d").unwrap();
    assert!(![a, b, unlink].contains(&d), "seqnums are not reused early");
}

#[test]
fn seqnums_skip_zero_and_those_in_flight_when_they_wrap() {
    let mut c = connection(16);
    c.next_seqnum = u32::MAX - 1;
    let kept = c.submit(TransferRequest::bulk_in(1, 1), "kept").unwrap();
    assert_eq!(kept, u32::MAX - 1);
    assert_eq!(
        c.submit(TransferRequest::bulk_in(1, 1), "x").unwrap(),
        u32::MAX
    );
    assert_eq!(c.submit(TransferRequest::bulk_in(1, 1), "y").unwrap(), 1);
    c.next_seqnum = u32::MAX - 1;
    assert_eq!(
        c.submit(TransferRequest::bulk_in(1, 1), "z").unwrap(),
        2,
        "u32::MAX - 1, u32::MAX, 0 and 1 skipped"
    );
}

#[test]
fn a_departed_peer_fails_everything_in_flight() {
    let mut c = connection(16);
    let a = c.submit(TransferRequest::bulk_in(1, 64), "a").unwrap();
    let b = c
        .submit(TransferRequest::bulk_out(1, vec![0; 4]), "b")
        .unwrap();
    c.unlink(b);
    transmit_all(&mut c);
    // Half of a's reply, then the peer is gone.
    let reply = ret_submit(a, 0, &[5; 64]);
    c.handle_bytes(&reply[..70]).unwrap();
    assert!(completions(&mut c).is_empty());
    c.submit(TransferRequest::bulk_in(1, 1), "unsent").unwrap();
    assert!(c.has_transmit());
    c.peer_closed();
    assert_eq!(c.error(), Some(&ConnectionError::PeerClosed));
    let done = completions(&mut c);
    let tokens: Vec<_> = done.iter().map(|d| d.token).collect();
    assert_eq!(tokens, ["a", "b", "unsent"]);
    assert!(done
        .iter()
        .all(|d| d.outcome == TransferOutcome::failed(TransferError::Disconnected(None))));
    assert!(!c.has_transmit(), "nothing is sent to a departed peer");
    assert_eq!(c.in_flight(), 0);
    // A second close changes nothing.
    c.close();
    assert_eq!(c.error(), Some(&ConnectionError::PeerClosed));
    assert!(completions(&mut c).is_empty());
}

/// Replies of every kind, with what each ends as.
fn every_kind_of_reply() -> (Connection<u32>, Vec<u8>, Vec<(u32, TransferOutcome)>) {
    let mut c = Connection::new(
        &device(),
        ConnectionConfig {
            receive_buffer: 64,
            ..ConnectionConfig::default()
        },
    );
    let bulk_in = c.submit(TransferRequest::bulk_in(1, 300), 0).unwrap();
    let bulk_out = c
        .submit(TransferRequest::bulk_out(2, vec![3; 10]), 1)
        .unwrap();
    let iso_in = c
        .submit(
            TransferRequest {
                endpoint: 0x85,
                length: 6,
                iso: vec![
                    IsoPacket {
                        offset: 0,
                        length: 3,
                        ..Default::default()
                    };
                    2
                ],
                ..Default::default()
            },
            2,
        )
        .unwrap();
    let stalled = c.submit(TransferRequest::bulk_in(1, 4), 3).unwrap();
    let cancelled = c.submit(TransferRequest::bulk_in(1, 4), 4).unwrap();
    c.unlink(cancelled);
    let unlink = commands(&transmit_all(&mut c))
        .into_iter()
        .find_map(|(command, _)| match command {
            UrbCommand::Unlink(u) => Some(u.seqnum),
            UrbCommand::Submit { .. } => None,
        })
        .unwrap();
    let payload: Vec<u8> = (0..300).map(|i| i as u8).collect();
    let iso_packets = [
        IsoPacket {
            offset: 0,
            length: 3,
            actual_length: 3,
            status: 0,
        },
        IsoPacket {
            offset: 3,
            length: 3,
            actual_length: 1,
            status: -18,
        },
    ];
    let mut bytes = ret_submit(bulk_in, 0, &payload);
    let mut out_reply = Vec::new();
    RetSubmit {
        seqnum: bulk_out,
        actual_length: 10,
        number_of_packets: u32::MAX,
        ..Default::default()
    }
    .encode(&[], &[], &mut out_reply);
    bytes.extend(out_reply);
    RetSubmit {
        seqnum: iso_in,
        actual_length: 4,
        start_frame: 9,
        number_of_packets: 2,
        error_count: 1,
        ..Default::default()
    }
    .encode(b"abcd", &iso_packets, &mut bytes);
    bytes.extend(ret_submit(stalled, -32, &[]));
    bytes.extend(ret_unlink(unlink, ECONNRESET));
    let expected = vec![
        (0, ok_with(&payload)),
        (
            1,
            TransferOutcome {
                actual_length: 10,
                ..ok_with(&[])
            },
        ),
        (
            2,
            TransferOutcome {
                iso: iso_packets.to_vec(),
                start_frame: 9,
                error_count: 1,
                ..ok_with(b"abcd")
            },
        ),
        (3, TransferOutcome::failed(TransferError::Stall)),
        (4, TransferOutcome::failed(TransferError::Cancelled)),
    ];
    (c, bytes, expected)
}

fn outcomes(c: &mut Connection<u32>) -> Vec<(u32, TransferOutcome)> {
    completions(c)
        .into_iter()
        .map(|d| (d.token, d.outcome))
        .collect()
}

#[test]
fn short_reads_at_every_byte_boundary_of_every_reply() {
    let (mut c, bytes, expected) = every_kind_of_reply();
    c.handle_bytes(&bytes).unwrap();
    assert_eq!(outcomes(&mut c), expected, "all at once");
    // One byte per read.
    let (mut c, bytes, expected) = every_kind_of_reply();
    for b in &bytes {
        c.handle_bytes(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(outcomes(&mut c), expected, "one byte per read");
    // Two reads, split at every byte.
    for split in 1..bytes.len() {
        let (mut c, bytes, expected) = every_kind_of_reply();
        c.handle_bytes(&bytes[..split]).unwrap();
        let early = outcomes(&mut c);
        assert_eq!(early[..], expected[..early.len()], "split {split}");
        c.handle_bytes(&bytes[split..]).unwrap();
        assert_eq!(
            [early, outcomes(&mut c)].concat(),
            expected,
            "split {split}"
        );
        assert_eq!(c.in_flight(), 0);
    }
}

#[test]
fn the_read_buffer_is_lent_and_filled_in_place() {
    let (mut c, bytes, expected) = every_kind_of_reply();
    let mut rest = &bytes[..];
    // Bounded: each read lends at least one byte.
    while !rest.is_empty() {
        let spare = c.read_buffer();
        assert!(!spare.is_empty());
        // A socket returns less than was asked for.
        let n = spare.len().min(rest.len()).min(37);
        spare[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        c.handle_input(n).unwrap();
    }
    assert_eq!(outcomes(&mut c), expected);
}
