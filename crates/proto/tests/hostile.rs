//! Decoder robustness: what a hostile or merely sloppy peer can send.
//!
//! Lengths a peer declares must be refused from the header alone, before
//! anything is allocated or waited for; fields that real peers fill
//! inconsistently must be tolerated; and no input may make a decoder panic.
//!
//! Allocation is measured with a counting global allocator, per thread,
//! so that tests running in parallel do not disturb each other.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use usbwire_proto::op::{DEVICE_INFO_LEN, OP_HEADER_LEN};
use usbwire_proto::urb::{
    InFlight, ISO_PACKET_LEN, USBIP_CMD_SUBMIT, USBIP_CMD_UNLINK, USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
};
use usbwire_proto::{
    BusId, DecodeError, Decoded, Direction, Limits, OpReply, OpRequest, OpStatus, Speed,
    UrbCommand, UrbReply, OP_REP_DEVLIST, OP_REP_IMPORT, OP_REQ_DEVLIST, OP_REQ_IMPORT,
    URB_HEADER_LEN,
};

// ---------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(n: usize) {
    // `try_with` fails only while the thread is being torn down.
    let _ = ALLOCATED.try_with(|c| c.set(c.get().saturating_add(n)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// thread-local counter is a const-initialised `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns what it returned and how many bytes it allocated
/// on this thread.
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATED.with(Cell::get);
    let r = f();
    (r, ALLOCATED.with(Cell::get) - before)
}

#[test]
fn allocation_counter_counts() {
    // Guards the zero-allocation assertions below against a counter that
    // never moves.
    let (v, bytes) = allocated_by(|| vec![0u8; 1000]);
    assert_eq!(v.len(), 1000);
    assert!(bytes >= 1000, "counted {bytes}");
}

// ---------------------------------------------------------------------------
// Frame builders
// ---------------------------------------------------------------------------

fn limits() -> Limits {
    Limits::default()
}

/// A 48-byte URB header of 12 big-endian words (setup/padding as words too).
fn urb_header(words: [u32; 12]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

fn cmd_submit(dir: u32, ep: u32, tbl: u32, packet_count: u32) -> Vec<u8> {
    urb_header([
        USBIP_CMD_SUBMIT,
        9,
        0x0001_0002,
        dir,
        ep,
        0,
        tbl,
        0,
        packet_count,
        0,
        0,
        0,
    ])
}

fn ret_submit(actual: u32, packet_count: u32) -> Vec<u8> {
    urb_header([
        USBIP_RET_SUBMIT,
        9,
        0,
        0,
        0,
        0,
        actual,
        0,
        packet_count,
        0,
        0,
        0,
    ])
}

fn iso_desc(offset: u32, length: u32, actual: u32, status: i32) -> Vec<u8> {
    [offset, length, actual, status as u32]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect()
}

fn op_header(version: u16, code: u16, status: u32) -> Vec<u8> {
    let mut v = version.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&status.to_be_bytes());
    v
}

fn never_iso(_: Direction, _: u32) -> bool {
    false
}

fn always_iso(_: Direction, _: u32) -> bool {
    true
}

fn in_flight(direction: Direction, iso: bool) -> impl Fn(u32) -> Option<InFlight> + Copy {
    move |_| {
        Some(InFlight {
            direction,
            iso,
            length: u32::MAX,
        })
    }
}

/// The decoder's answer must be the error, from the header alone, with no
/// allocation at all.
fn assert_rejected_without_alloc<T: core::fmt::Debug>(
    r: impl FnOnce() -> Result<Decoded<T>, DecodeError>,
    expected: DecodeError,
) {
    let (got, bytes) = allocated_by(r);
    assert_eq!(got.unwrap_err(), expected);
    assert_eq!(bytes, 0, "allocated {bytes} bytes before rejecting");
}

// ---------------------------------------------------------------------------
// Declared lengths
// ---------------------------------------------------------------------------

#[test]
fn transfer_buffer_length_too_long_from_header_alone() {
    let lim = limits();
    for dir in [0, 1] {
        for is_iso in [never_iso, always_iso] {
            let b = cmd_submit(dir, 1, 0x7fff_ffff, 0);
            assert_eq!(b.len(), URB_HEADER_LEN);
            assert_rejected_without_alloc(
                || UrbCommand::decode(&b, &lim, is_iso),
                DecodeError::TooLong {
                    field: "transfer_buffer_length",
                    value: 0x7fff_ffff,
                    limit: lim.max_transfer_length.into(),
                },
            );
        }
    }
    // One past the limit is refused; the limit itself is accepted (and,
    // for OUT, waited for without allocating).
    let b = cmd_submit(0, 1, lim.max_transfer_length + 1, 0);
    assert!(matches!(
        UrbCommand::decode(&b, &lim, never_iso),
        Err(DecodeError::TooLong { .. })
    ));
    let b = cmd_submit(0, 1, lim.max_transfer_length, 0);
    let (r, bytes) = allocated_by(|| UrbCommand::decode(&b, &lim, never_iso));
    assert_eq!(
        r,
        Ok(Decoded::NeedMore(
            URB_HEADER_LEN + lim.max_transfer_length as usize
        ))
    );
    assert_eq!(bytes, 0);
}

#[test]
fn transfer_buffer_length_negative() {
    for tbl in [0x8000_0000u32, 0xffff_ffff, 0xffff_ff00] {
        for dir in [0, 1] {
            let b = cmd_submit(dir, 1, tbl, 0);
            assert_rejected_without_alloc(
                || UrbCommand::decode(&b, &limits(), never_iso),
                DecodeError::Negative {
                    field: "transfer_buffer_length",
                    value: tbl as i32,
                },
            );
        }
    }
}

#[test]
fn actual_length_too_long_or_negative() {
    let lim = limits();
    for (dir, iso) in [
        (Direction::In, false),
        (Direction::Out, false),
        (Direction::In, true),
    ] {
        let b = ret_submit(0x7fff_ffff, 0);
        assert_rejected_without_alloc(
            || UrbReply::decode(&b, &lim, in_flight(dir, iso)),
            DecodeError::TooLong {
                field: "actual_length",
                value: 0x7fff_ffff,
                limit: lim.max_transfer_length.into(),
            },
        );
        let b = ret_submit(0xffff_fff0, 0);
        assert_rejected_without_alloc(
            || UrbReply::decode(&b, &lim, in_flight(dir, iso)),
            DecodeError::Negative {
                field: "actual_length",
                value: -16,
            },
        );
    }
}

#[test]
fn iso_packet_count_too_long() {
    let lim = limits();
    for dir in [0, 1] {
        let b = cmd_submit(dir, 3, 0, 0x7fff_ffff);
        assert_rejected_without_alloc(
            || UrbCommand::decode(&b, &lim, always_iso),
            DecodeError::TooLong {
                field: "number_of_packets",
                value: 0x7fff_ffff,
                limit: lim.max_iso_packets.into(),
            },
        );
    }
    let b = cmd_submit(0, 3, 0, lim.max_iso_packets + 1);
    assert!(matches!(
        UrbCommand::decode(&b, &lim, always_iso),
        Err(DecodeError::TooLong { .. })
    ));
    // Values with the top bit set (other than -1) are negative counts.
    let b = cmd_submit(0, 3, 0, 0x8000_0000);
    assert_eq!(
        UrbCommand::decode(&b, &lim, always_iso).unwrap_err(),
        DecodeError::Negative {
            field: "number_of_packets",
            value: i32::MIN,
        }
    );
    // The same on the reply side.
    let b = ret_submit(0, 0x7fff_ffff);
    assert_rejected_without_alloc(
        || UrbReply::decode(&b, &lim, in_flight(Direction::In, true)),
        DecodeError::TooLong {
            field: "number_of_packets",
            value: 0x7fff_ffff,
            limit: lim.max_iso_packets.into(),
        },
    );
}

#[test]
fn iso_packet_count_at_kernel_limit_is_accepted() {
    let n = Limits::KERNEL_MAX_ISO_PACKETS;
    let mut b = cmd_submit(1, 3, 1024, n);
    let need = URB_HEADER_LEN + n as usize * ISO_PACKET_LEN;
    assert_eq!(
        UrbCommand::decode(&b, &limits(), always_iso),
        Ok(Decoded::NeedMore(need))
    );
    for i in 0..n {
        b.extend(iso_desc(i, 1, 0, 0));
    }
    let (m, used) = UrbCommand::decode(&b, &limits(), always_iso)
        .unwrap()
        .message()
        .unwrap();
    assert_eq!(used, need);
    match m {
        UrbCommand::Submit { data, iso, .. } => {
            assert!(data.is_empty());
            assert_eq!(iso, URB_HEADER_LEN..need);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn number_of_packets_ignored_on_non_iso_endpoints() {
    for packet_count in [0xffff_ffffu32, 0, 12345, 0x7fff_ffff, 0x8000_0000] {
        // IN: header only.
        let b = cmd_submit(1, 1, 64, packet_count);
        match UrbCommand::decode(&b, &limits(), never_iso).unwrap() {
            Decoded::Message(UrbCommand::Submit { cmd, data, iso }, 48) => {
                assert_eq!(cmd.number_of_packets, packet_count, "kept as sent");
                assert!(data.is_empty());
                assert_eq!(iso, 48..48, "no descriptors expected");
            }
            other => panic!("packet_count {packet_count:#x}: {other:?}"),
        }
        // OUT: header and payload, nothing after.
        let mut b = cmd_submit(0, 2, 4, packet_count);
        b.extend_from_slice(&[1, 2, 3, 4]);
        b.extend_from_slice(&[0xee; 32]); // the next frame, not descriptors
        match UrbCommand::decode(&b, &limits(), never_iso).unwrap() {
            Decoded::Message(UrbCommand::Submit { data, iso, .. }, 52) => {
                assert_eq!(data, 48..52);
                assert_eq!(iso, 52..52);
            }
            other => panic!("packet_count {packet_count:#x}: {other:?}"),
        }
        // The reply side, likewise.
        let mut b = ret_submit(4, packet_count);
        b.extend_from_slice(&[1, 2, 3, 4]);
        match UrbReply::decode(&b, &limits(), in_flight(Direction::In, false)).unwrap() {
            Decoded::Message(UrbReply::Submit { ret, data, iso }, 52) => {
                assert_eq!(ret.number_of_packets, packet_count);
                assert_eq!(data, 48..52);
                assert!(iso.is_empty());
            }
            other => panic!("packet_count {packet_count:#x}: {other:?}"),
        }
    }
}

#[test]
fn minus_one_packets_on_iso_endpoint_means_none() {
    let b = cmd_submit(1, 3, 64, 0xffff_ffff);
    match UrbCommand::decode(&b, &limits(), always_iso).unwrap() {
        Decoded::Message(UrbCommand::Submit { cmd, iso, .. }, 48) => {
            assert_eq!(cmd.number_of_packets, 0xffff_ffff);
            assert!(iso.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn iso_descriptor_outside_buffer() {
    // OUT: 8-byte buffer, packet 1 runs past it.
    let mut b = cmd_submit(0, 3, 8, 2);
    b.extend_from_slice(&[0; 8]);
    b.extend(iso_desc(0, 4, 0, 0));
    b.extend(iso_desc(4, 5, 0, 0));
    assert_eq!(
        UrbCommand::decode(&b, &limits(), always_iso).unwrap_err(),
        DecodeError::IsoOutOfBounds {
            index: 1,
            offset: 4,
            length: 5,
            buffer: 8,
        }
    );
    // IN: no payload on the command, but the descriptors still describe
    // the server-side buffer of transfer_buffer_length bytes.
    let mut b = cmd_submit(1, 3, 16, 1);
    b.extend(iso_desc(17, 0, 0, 0));
    assert_eq!(
        UrbCommand::decode(&b, &limits(), always_iso).unwrap_err(),
        DecodeError::IsoOutOfBounds {
            index: 0,
            offset: 17,
            length: 0,
            buffer: 16,
        }
    );
    // offset + length must not wrap around 2^32.
    let mut b = cmd_submit(1, 3, 16, 1);
    b.extend(iso_desc(0xffff_fff8, 0x10, 0, 0));
    assert!(matches!(
        UrbCommand::decode(&b, &limits(), always_iso),
        Err(DecodeError::IsoOutOfBounds { .. })
    ));
    // Exactly at the end is fine.
    let mut b = cmd_submit(1, 3, 16, 1);
    b.extend(iso_desc(8, 8, 0, 0));
    assert!(UrbCommand::decode(&b, &limits(), always_iso)
        .unwrap()
        .message()
        .is_some());
}

#[test]
fn iso_lengths_adding_up_beyond_the_buffer() {
    // Every packet lies inside the 1 MiB buffer, but 1024 of them over the
    // same bytes add up to 1 GiB, which a backend that gathers the packets
    // would allocate. Refused from the descriptors, before anything is
    // allocated for them.
    let tbl = 1 << 20;
    let mut b = cmd_submit(1, 3, tbl, 1024);
    for _ in 0..1024 {
        b.extend(iso_desc(0, tbl, 0, 0));
    }
    assert_rejected_without_alloc(
        || UrbCommand::decode(&b, &limits(), always_iso),
        DecodeError::IsoLengthsExceedBuffer {
            sum: 1 << 30,
            buffer: tbl,
        },
    );
    // OUT too, and one byte over is already too many.
    let mut b = cmd_submit(0, 3, 8, 2);
    b.extend_from_slice(&[0; 8]);
    b.extend(iso_desc(0, 5, 0, 0));
    b.extend(iso_desc(4, 4, 0, 0));
    assert_eq!(
        UrbCommand::decode(&b, &limits(), always_iso).unwrap_err(),
        DecodeError::IsoLengthsExceedBuffer { sum: 9, buffer: 8 }
    );
    // Overlapping packets whose lengths fit the buffer are left alone (no
    // known host sends them, but nothing in them is unbounded), and so are
    // packets that fill it exactly.
    for (first, second) in [((0, 4), (2, 4)), ((0, 4), (4, 4))] {
        let mut b = cmd_submit(0, 3, 8, 2);
        b.extend_from_slice(&[0; 8]);
        b.extend(iso_desc(first.0, first.1, 0, 0));
        b.extend(iso_desc(second.0, second.1, 0, 0));
        assert!(
            UrbCommand::decode(&b, &limits(), always_iso)
                .unwrap()
                .message()
                .is_some(),
            "{first:?} {second:?}"
        );
    }
}

#[test]
fn iso_in_reply_actual_lengths_must_add_up() {
    let mut b = ret_submit(8, 2);
    b.extend_from_slice(&[0; 8]);
    b.extend(iso_desc(0, 8, 5, 0));
    b.extend(iso_desc(8, 8, 4, 0));
    assert_eq!(
        UrbReply::decode(&b, &limits(), in_flight(Direction::In, true)).unwrap_err(),
        DecodeError::IsoActualMismatch { sum: 9, actual: 8 }
    );
    // Sums that would overflow u32 are summed in u64.
    let mut b = ret_submit(0, 2);
    b.extend(iso_desc(0, 0, 0xffff_ffff, 0));
    b.extend(iso_desc(0, 0, 1, 0));
    assert_eq!(
        UrbReply::decode(&b, &limits(), in_flight(Direction::In, true)).unwrap_err(),
        DecodeError::IsoActualMismatch {
            sum: 0x1_0000_0000,
            actual: 0,
        }
    );
}

#[test]
fn reply_for_unknown_seqnum() {
    let b = ret_submit(0, 0);
    assert_eq!(
        UrbReply::decode(&b, &limits(), |_| None).unwrap_err(),
        DecodeError::UnknownSeqnum(9)
    );
    // RET_UNLINK does not consult the URBs in flight.
    let b = urb_header([USBIP_RET_UNLINK, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(UrbReply::decode(&b, &limits(), |_| None)
        .unwrap()
        .message()
        .is_some());
}

#[test]
fn bad_direction() {
    for dir in [2u32, 0x8000_0000, u32::MAX] {
        let b = cmd_submit(dir, 0, 0, 0);
        assert_eq!(
            UrbCommand::decode(&b, &limits(), never_iso).unwrap_err(),
            DecodeError::BadDirection(dir)
        );
    }
}

#[test]
fn unknown_commands_carry_the_code() {
    for code in [
        0u32,
        5,
        0x8001,
        0xffff_ffff,
        USBIP_RET_SUBMIT,
        USBIP_RET_UNLINK,
    ] {
        let b = urb_header([code, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            UrbCommand::decode(&b, &limits(), never_iso).unwrap_err(),
            DecodeError::UnknownCommand(code)
        );
    }
    for code in [0u32, 5, 0xffff_ffff, USBIP_CMD_SUBMIT, USBIP_CMD_UNLINK] {
        let b = urb_header([code, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            UrbReply::decode(&b, &limits(), |_| panic!("in_flight for {code:#x}")).unwrap_err(),
            DecodeError::UnknownCommand(code)
        );
    }
    for code in [
        0u16,
        0x8001,
        0x8004,
        0x8006,
        0xffff,
        OP_REP_DEVLIST,
        OP_REP_IMPORT,
    ] {
        let b = op_header(0x0111, code, 0);
        assert_eq!(
            OpRequest::decode(&b).unwrap_err(),
            DecodeError::UnknownOpCode(code)
        );
    }
    for code in [0u16, 1, 4, 6, 0xffff, OP_REQ_DEVLIST, OP_REQ_IMPORT] {
        let b = op_header(0x0111, code, 0);
        assert_eq!(
            OpReply::decode(&b, &limits()).unwrap_err(),
            DecodeError::UnknownOpCode(code)
        );
    }
    // The error text names the code, for logs.
    assert!(DecodeError::UnknownOpCode(0x8006)
        .to_string()
        .contains("0x8006"));
    assert!(DecodeError::UnknownCommand(5)
        .to_string()
        .contains("0x00000005"));
}

// ---------------------------------------------------------------------------
// OP_* phase
// ---------------------------------------------------------------------------

#[test]
fn devlist_claiming_u32_max_devices() {
    let mut b = op_header(0x0111, OP_REP_DEVLIST, 0);
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    let lim = limits();
    assert_rejected_without_alloc(
        || OpReply::decode(&b, &lim),
        DecodeError::TooLong {
            field: "number of devices",
            value: u32::MAX.into(),
            limit: lim.max_devices.into(),
        },
    );
    // Even with no device limit at all, a count is only a promise: the
    // decoder waits for the records without reserving room for them.
    let unlimited = Limits {
        max_devices: u32::MAX,
        ..limits()
    };
    let (r, bytes) = allocated_by(|| OpReply::decode(&b, &unlimited));
    assert_eq!(r, Ok(Decoded::NeedMore(12 + DEVICE_INFO_LEN)));
    assert_eq!(bytes, 0);
    // One past the configured limit.
    let mut b = op_header(0x0111, OP_REP_DEVLIST, 0);
    b.extend_from_slice(&(lim.max_devices + 1).to_be_bytes());
    assert!(matches!(
        OpReply::decode(&b, &lim),
        Err(DecodeError::TooLong { .. })
    ));
}

/// A device record with the given busid/path field contents and interface count.
fn device_record(path: &[u8], busid: &[u8], num_interfaces: u8) -> Vec<u8> {
    let mut r = vec![0u8; DEVICE_INFO_LEN];
    r[..path.len()].copy_from_slice(path);
    r[256..256 + busid.len()].copy_from_slice(busid);
    r[299] = 3; // speed = high (last byte of the big-endian u32 at 296)
    r[311] = num_interfaces;
    r
}

#[test]
fn devlist_interface_count_drives_framing() {
    let mut b = op_header(0x0111, OP_REP_DEVLIST, 0);
    b.extend_from_slice(&2u32.to_be_bytes());
    b.extend(device_record(b"/p", b"1-1", 255));
    let first = b.len();
    b.extend(vec![0xabu8; 255 * 4]);
    assert_eq!(
        OpReply::decode(&b[..first + 10], &limits()),
        Ok(Decoded::NeedMore(first + 255 * 4))
    );
    b.extend(device_record(b"/q", b"1-2", 0));
    let (m, n) = OpReply::decode(&b, &limits()).unwrap().message().unwrap();
    assert_eq!(n, b.len());
    match m {
        OpReply::Devlist { devices, .. } => {
            assert_eq!(devices.len(), 2);
            assert_eq!(devices[0].interfaces.len(), 255);
            assert_eq!(devices[0].num_interfaces, 255);
            assert_eq!(devices[0].speed, Speed::High);
            assert_eq!(devices[1].busid, "1-2");
            assert!(devices[1].interfaces.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn busid_without_nul() {
    let mut b = op_header(0x0111, OP_REQ_IMPORT, 0);
    b.extend_from_slice(&[b'a'; 32]);
    let (m, n) = OpRequest::decode(&b).unwrap().message().unwrap();
    assert_eq!(n, 40);
    assert_eq!(
        m,
        OpRequest::Import {
            version: 0x0111,
            busid: BusId::from_field(&[b'a'; 32]),
        }
    );
    // Kept whole, so it goes out again exactly as it came.
    let mut e = Vec::new();
    m.encode(&mut e);
    assert_eq!(e, b);
    // Path and busid of a device record, both filling their fields.
    let mut b = op_header(0x0111, OP_REP_IMPORT, 0);
    b.extend(device_record(&[b'p'; 256], &[b'b'; 32], 0));
    match OpReply::decode(&b, &limits()).unwrap().message().unwrap() {
        (
            OpReply::Import {
                device: Some(d), ..
            },
            320,
        ) => {
            assert_eq!(d.path, "p".repeat(256));
            assert_eq!(d.busid, "b".repeat(32));
            assert_eq!(d.busnum, 0, "busid did not bleed into busnum");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn busid_with_garbage_after_nul() {
    let mut field = [0xffu8; 32];
    field[..4].copy_from_slice(b"1-1\0");
    let mut b = op_header(0x0111, OP_REQ_IMPORT, 0);
    b.extend_from_slice(&field);
    assert_eq!(
        OpRequest::decode(&b).unwrap(),
        Decoded::Message(
            OpRequest::Import {
                version: 0x0111,
                busid: "1-1".into(),
            },
            40
        )
    );
    let mut path = [b'x'; 256];
    path[..6].copy_from_slice(b"/a/b\0z");
    let mut b = op_header(0x0111, OP_REP_DEVLIST, 0);
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend(device_record(&path, &field, 0));
    match OpReply::decode(&b, &limits()).unwrap().message().unwrap() {
        (OpReply::Devlist { devices, .. }, n) => {
            assert_eq!(n, b.len());
            assert_eq!(devices[0].path, "/a/b");
            assert_eq!(devices[0].busid, "1-1");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn busid_not_utf8_does_not_fail() {
    let mut b = op_header(0x0111, OP_REQ_IMPORT, 0);
    let mut field = [0u8; 32];
    field[..4].copy_from_slice(&[b'1', 0xc3, 0x28, 0xff]);
    b.extend_from_slice(&field);
    match OpRequest::decode(&b).unwrap() {
        Decoded::Message(OpRequest::Import { busid, .. }, 40) => {
            assert_eq!(busid.as_bytes(), &[b'1', 0xc3, 0x28, 0xff]);
            assert_eq!(busid.to_string(), "1\u{fffd}(\u{fffd}");
        }
        other => panic!("{other:?}"),
    }
}

/// The input on which the OP fuzz targets failed within seconds: a busid
/// of 32 0xff bytes read through lossy UTF-8 became 32 three-byte
/// replacement characters, and every trip through the field changed it.
#[test]
fn busid_of_invalid_bytes_round_trips_exactly() {
    let mut b = vec![0x0b, 0x00, 0x80, 0x03, 0x00, 0xff, 0xff, 0xff];
    b.extend_from_slice(&[0xff; 32]);
    let (m, n) = OpRequest::decode(&b).unwrap().message().unwrap();
    assert_eq!(n, 40);
    let OpRequest::Import { version, busid } = &m else {
        panic!("{m:?}");
    };
    assert_eq!((*version, busid.as_bytes()), (0x0b00, &[0xff; 32][..]));
    let mut e = Vec::new();
    m.encode(&mut e);
    // A request carries no status, so that field goes out as 0; the busid
    // goes out exactly as it came.
    assert_eq!(e[..4], b[..4]);
    assert_eq!(e[8..], b[8..]);
    assert_eq!(OpRequest::decode(&e), Ok(Decoded::Message(m, 40)));
}

#[test]
fn any_version_still_decodes() {
    for version in [0x0106u16, 0x0000, 0x0100, 0x0111, 0xffff] {
        assert_eq!(
            OpRequest::decode(&op_header(version, OP_REQ_DEVLIST, 0)),
            Ok(Decoded::Message(OpRequest::Devlist { version }, 8))
        );
        let mut b = op_header(version, OP_REQ_IMPORT, 0);
        b.extend_from_slice(&[0; 32]);
        assert_eq!(
            OpRequest::decode(&b),
            Ok(Decoded::Message(
                OpRequest::Import {
                    version,
                    busid: BusId::default(),
                },
                40
            ))
        );
        let mut b = op_header(version, OP_REP_DEVLIST, 0);
        b.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(
            OpReply::decode(&b, &limits()),
            Ok(Decoded::Message(
                OpReply::Devlist {
                    version,
                    status: OpStatus::Ok,
                    devices: vec![],
                },
                12
            ))
        );
        let mut b = op_header(version, OP_REP_IMPORT, 0);
        b.extend(device_record(b"/p", b"1-1", 1));
        match OpReply::decode(&b, &limits()).unwrap() {
            Decoded::Message(
                OpReply::Import {
                    version: v,
                    device: Some(d),
                    ..
                },
                320,
            ) => {
                assert_eq!(v, version);
                assert_eq!(d.busid, "1-1");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn request_status_field_is_ignored() {
    assert_eq!(
        OpRequest::decode(&op_header(0x0111, OP_REQ_DEVLIST, 0xdead_beef)),
        Ok(Decoded::Message(OpRequest::Devlist { version: 0x0111 }, 8))
    );
}

#[test]
fn failed_import_is_header_only_whatever_the_status() {
    for status in [1u32, 2, 3, 4, 5, 6, 0xdead_beef] {
        let mut b = op_header(0x0111, OP_REP_IMPORT, status);
        // Whatever follows belongs to no message; it must not be read.
        b.extend_from_slice(&[0x55; 400]);
        assert_eq!(
            OpReply::decode(&b, &limits()),
            Ok(Decoded::Message(
                OpReply::Import {
                    version: 0x0111,
                    status: OpStatus::from_u32(status),
                    device: None,
                },
                OP_HEADER_LEN
            ))
        );
    }
}

#[test]
fn failed_devlist_still_carries_a_count() {
    let mut b = op_header(0x0111, OP_REP_DEVLIST, 1);
    assert_eq!(OpReply::decode(&b, &limits()), Ok(Decoded::NeedMore(12)));
    b.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        OpReply::decode(&b, &limits()),
        Ok(Decoded::Message(
            OpReply::Devlist {
                version: 0x0111,
                status: OpStatus::Na,
                devices: vec![],
            },
            12
        ))
    );
}

// ---------------------------------------------------------------------------
// Arbitrary bytes never panic, and whatever comes back is consistent.
// ---------------------------------------------------------------------------

/// The most any frame can need under `lim`.
fn max_urb_frame(lim: &Limits) -> usize {
    URB_HEADER_LEN
        + lim.max_transfer_length as usize
        + lim.max_iso_packets as usize * ISO_PACKET_LEN
}

fn check<T: core::fmt::Debug>(len: usize, r: &Result<Decoded<T>, DecodeError>, max: usize) {
    match r {
        Ok(Decoded::Message(_, n)) => assert!(*n <= len && *n > 0, "consumed {n} of {len}"),
        Ok(Decoded::NeedMore(n)) => assert!(*n > len && *n <= max, "NeedMore({n}) with {len}"),
        Err(_) => {}
    }
}

/// Random bytes, or random bytes behind a valid code so that the decoders
/// get past the first check.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let urb_code = prop_oneof![
        Just(USBIP_CMD_SUBMIT),
        Just(USBIP_CMD_UNLINK),
        Just(USBIP_RET_SUBMIT),
        Just(USBIP_RET_UNLINK),
    ];
    let op_code = prop_oneof![
        Just(OP_REQ_DEVLIST),
        Just(OP_REQ_IMPORT),
        Just(OP_REP_DEVLIST),
        Just(OP_REP_IMPORT),
    ];
    let tail = || proptest::collection::vec(any::<u8>(), 0..1200);
    prop_oneof![
        2 => tail(),
        2 => (urb_code, 0u32..2, 0u32..300, tail()).prop_map(|(c, dir, small, t)| {
            // A URB header with a plausible direction and a small length,
            // so that payload and descriptor paths are reached.
            let mut v = c.to_be_bytes().to_vec();
            v.extend_from_slice(&t[..t.len().min(8)]);
            v.resize(12, 0);
            v.extend_from_slice(&dir.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 0]);
            v.extend_from_slice(&small.to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, 0]);
            v.extend_from_slice(&(small % 5).to_be_bytes());
            v.extend_from_slice(&t[t.len().min(8)..]);
            v
        }),
        1 => (op_code, tail()).prop_map(|(c, t)| {
            let mut v = vec![0x01, 0x11];
            v.extend_from_slice(&c.to_be_bytes());
            v.extend_from_slice(&t);
            v
        }),
        1 => (0u32..3, tail()).prop_map(|(n, t)| {
            let mut v = vec![0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0];
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&t);
            v.resize(v.len().max(12 + 312 * n as usize), 0);
            v
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(b in hostile_bytes(), first in any::<u8>(), cut in any::<usize>()) {
        let lim = limits();
        let len = b.len();
        let max_op = 12 + lim.max_devices as usize * (DEVICE_INFO_LEN + 255 * 4);

        let r = OpRequest::decode(&b);
        check(len, &r, 40);
        let r = OpReply::decode(&b, &lim);
        check(len, &r, max_op);

        let is_iso = |_: Direction, ep: u32| (first ^ ep as u8) & 1 == 1;
        let r = UrbCommand::decode(&b, &lim, is_iso);
        check(len, &r, max_urb_frame(&lim));

        let flight = |seq: u32| match (first ^ seq as u8) % 5 {
            0 => None,
            1 => Some(InFlight { direction: Direction::In, iso: false, length: u32::MAX }),
            2 => Some(InFlight { direction: Direction::Out, iso: false, length: u32::MAX }),
            3 => Some(InFlight { direction: Direction::In, iso: true, length: u32::MAX }),
            _ => Some(InFlight { direction: Direction::Out, iso: true, length: u32::MAX }),
        };
        let r = UrbReply::decode(&b, &lim, flight);
        check(len, &r, max_urb_frame(&lim));

        // A prefix of a hostile frame never panics either, and a decoder
        // that accepted the prefix as a whole message accepts the whole
        // input as the same one.
        let p = &b[..cut % (len + 1)];
        let rp = UrbCommand::decode(p, &lim, is_iso);
        check(p.len(), &rp, max_urb_frame(&lim));
        if let Ok(Decoded::Message(m, n)) = rp {
            prop_assert_eq!(UrbCommand::decode(&b, &lim, is_iso), Ok(Decoded::Message(m, n)));
        }
        let rp = OpReply::decode(p, &lim);
        check(p.len(), &rp, max_op);
        if let Ok(Decoded::Message(m, n)) = rp {
            prop_assert_eq!(OpReply::decode(&b, &lim), Ok(Decoded::Message(m, n)));
        }
    }

    /// With tight limits, nothing the peer declares gets past them.
    #[test]
    fn tight_limits_hold(b in hostile_bytes(), first in any::<u8>()) {
        let lim = Limits { max_transfer_length: 64, max_iso_packets: 2, max_devices: 1 };
        let is_iso = |_: Direction, _: u32| first & 1 == 1;
        check(b.len(), &UrbCommand::decode(&b, &lim, is_iso), max_urb_frame(&lim));
        let flight = |_: u32| Some(InFlight { direction: Direction::In, iso: first & 2 == 2, length: u32::MAX });
        check(b.len(), &UrbReply::decode(&b, &lim, flight), max_urb_frame(&lim));
        if let Ok(Decoded::Message(OpReply::Devlist { devices, .. }, _)) = OpReply::decode(&b, &lim) {
            prop_assert!(devices.len() <= 1);
        }
    }
}

#[test]
fn reply_longer_than_its_urb_is_rejected() {
    // CVE-2016-3955: a RET_SUBMIT claiming more than the URB asked for.
    let mut b = Vec::new();
    usbwire_proto::RetSubmit {
        seqnum: 7,
        actual_length: 513,
        ..Default::default()
    }
    .encode(&[0u8; 513], &[], &mut b);
    let r = UrbReply::decode(&b, &Limits::default(), |_| {
        Some(InFlight {
            direction: Direction::In,
            iso: false,
            length: 512,
        })
    });
    assert!(
        matches!(
            r,
            Err(DecodeError::TooLong {
                field: "actual_length",
                value: 513,
                limit: 512
            })
        ),
        "{r:?}"
    );
}

#[test]
fn long_busid_is_cut_at_a_character_boundary() {
    let busid = "é".repeat(16); // 32 bytes: one too many for the field.
    let mut b = Vec::new();
    usbwire_proto::OpRequest::Import {
        version: 0x0111,
        busid: busid.as_str().into(),
    }
    .encode(&mut b);
    let (m, _) = usbwire_proto::OpRequest::decode(&b)
        .unwrap()
        .message()
        .unwrap();
    assert_eq!(
        m,
        usbwire_proto::OpRequest::Import {
            version: 0x0111,
            busid: "é".repeat(15).into()
        }
    );
}
