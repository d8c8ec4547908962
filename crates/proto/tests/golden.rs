//! Golden byte vectors, written field by field from the kernel's
//! `Documentation/usb/usbip_protocol.rst` and the structs in
//! `drivers/usb/usbip/usbip_common.h` / `tools/usb/usbip/libsrc/usbip_common.h`.
//!
//! Each vector is checked both ways: decoding gives the expected value and
//! length, and encoding the value gives exactly the bytes. Every proper
//! prefix of a vector must decode to `NeedMore(n)` with `len < n <= total`,
//! so that a caller feeding bytes as they arrive never stalls or over-reads.

use core::fmt::Debug;

use usbwire_proto::op::{DEVICE_INFO_LEN, OP_HEADER_LEN};
use usbwire_proto::urb::{flags, InFlight, ISO_PACKET_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, DecodeError, Decoded, DeviceInfo, Direction, Errno, InterfaceInfo,
    IsoPacket, Limits, OpReply, OpRequest, OpStatus, RetSubmit, RetUnlink, Speed, UrbCommand,
    UrbReply, URB_HEADER_LEN, USBIP_VERSION,
};

// ---------------------------------------------------------------------------
// Building fixed arrays out of commented fields, at compile time.
// ---------------------------------------------------------------------------

/// Concatenates the fields into an array of exactly `N` bytes; a wrong total
/// is a compile error, so a missing or extra field cannot go unnoticed.
const fn cat<const N: usize>(parts: &[&[u8]]) -> [u8; N] {
    let mut out = [0u8; N];
    let mut at = 0;
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        let mut j = 0;
        while j < p.len() {
            out[at] = p[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    assert!(at == N, "vector length does not match its declared size");
    out
}

/// A NUL-padded fixed-width string field, as the C tools write it.
const fn padded<const N: usize>(s: &[u8]) -> [u8; N] {
    assert!(s.len() < N, "a C string field needs room for its NUL");
    let mut out = [0u8; N];
    let mut i = 0;
    while i < s.len() {
        out[i] = s[i];
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn limits() -> Limits {
    Limits::default()
}

/// Every proper prefix must ask for more, and never for more than the
/// whole message.
fn assert_prefixes_need_more<T: Debug>(
    name: &str,
    bytes: &[u8],
    mut dec: impl FnMut(&[u8]) -> Result<Decoded<T>, DecodeError>,
) {
    for len in 0..bytes.len() {
        match dec(&bytes[..len]) {
            Ok(Decoded::NeedMore(n)) => assert!(
                n > len && n <= bytes.len(),
                "{name}: prefix of {len} bytes asked for {n} (message is {} bytes)",
                bytes.len()
            ),
            other => panic!("{name}: prefix of {len} bytes decoded to {other:?}"),
        }
    }
}

/// Trailing bytes (the next message) must not change what is decoded.
fn with_trailer(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.extend_from_slice(&[0xA5; 64]);
    v
}

fn op_request_golden(name: &str, bytes: &[u8], expected: OpRequest) {
    for input in [bytes.to_vec(), with_trailer(bytes)] {
        let got = OpRequest::decode(&input).unwrap();
        assert_eq!(
            got,
            Decoded::Message(expected.clone(), bytes.len()),
            "{name}"
        );
    }
    let mut out = Vec::new();
    expected.encode(&mut out);
    assert_eq!(out, bytes, "{name}: encoding");
    assert_prefixes_need_more(name, bytes, OpRequest::decode);
}

fn op_reply_golden(name: &str, bytes: &[u8], expected: OpReply) {
    for input in [bytes.to_vec(), with_trailer(bytes)] {
        let got = OpReply::decode(&input, &limits()).unwrap();
        assert_eq!(
            got,
            Decoded::Message(expected.clone(), bytes.len()),
            "{name}"
        );
    }
    let mut out = Vec::new();
    expected.encode(&mut out);
    assert_eq!(out, bytes, "{name}: encoding");
    assert_prefixes_need_more(name, bytes, |b| OpReply::decode(b, &limits()));
}

fn iso_packets(b: &[u8]) -> Vec<IsoPacket> {
    assert_eq!(b.len() % ISO_PACKET_LEN, 0);
    IsoPacket::iter(b).collect()
}

/// Checks a CMD_SUBMIT vector. `is_iso` answers for the vector's endpoint
/// and asserts that the decoder asked about the right one.
#[allow(clippy::too_many_arguments)]
fn cmd_submit_golden(
    name: &str,
    bytes: &[u8],
    iso_ep: bool,
    expected: CmdSubmit,
    data: &[u8],
    iso: &[IsoPacket],
) {
    let is_iso = |d: Direction, ep: u32| {
        assert_eq!(
            (d, ep),
            (expected.direction, expected.ep),
            "{name}: is_iso args"
        );
        iso_ep
    };
    for input in [bytes.to_vec(), with_trailer(bytes)] {
        match UrbCommand::decode(&input, &limits(), is_iso).unwrap() {
            Decoded::Message(
                UrbCommand::Submit {
                    cmd,
                    data: d,
                    iso: i,
                },
                n,
            ) => {
                assert_eq!(n, bytes.len(), "{name}: consumed");
                assert_eq!(cmd, expected, "{name}");
                assert_eq!(d.start, URB_HEADER_LEN, "{name}: payload offset");
                assert_eq!(&input[d.clone()], data, "{name}: payload");
                assert_eq!(i.start, d.end, "{name}: iso follows payload");
                assert_eq!(i.end, n, "{name}: iso ends the frame");
                assert_eq!(iso_packets(&input[i]), iso, "{name}: iso descriptors");
            }
            other => panic!("{name}: decoded to {other:?}"),
        }
    }
    let mut out = Vec::new();
    expected.encode(data, iso, &mut out);
    assert_eq!(out, bytes, "{name}: encoding");
    assert_prefixes_need_more(name, bytes, |b| UrbCommand::decode(b, &limits(), is_iso));
}

fn ret_submit_golden(
    name: &str,
    bytes: &[u8],
    urb: InFlight,
    expected: RetSubmit,
    data: &[u8],
    iso: &[IsoPacket],
) {
    let in_flight = |seq: u32| {
        assert_eq!(seq, expected.seqnum, "{name}: in_flight seqnum");
        Some(urb)
    };
    for input in [bytes.to_vec(), with_trailer(bytes)] {
        match UrbReply::decode(&input, &limits(), in_flight).unwrap() {
            Decoded::Message(
                UrbReply::Submit {
                    ret,
                    data: d,
                    iso: i,
                },
                n,
            ) => {
                assert_eq!(n, bytes.len(), "{name}: consumed");
                assert_eq!(ret, expected, "{name}");
                assert_eq!(d.start, URB_HEADER_LEN, "{name}: payload offset");
                assert_eq!(&input[d.clone()], data, "{name}: payload");
                assert_eq!(i.start, d.end, "{name}: iso follows payload");
                assert_eq!(i.end, n, "{name}: iso ends the frame");
                assert_eq!(iso_packets(&input[i]), iso, "{name}: iso descriptors");
            }
            other => panic!("{name}: decoded to {other:?}"),
        }
    }
    let mut out = Vec::new();
    expected.encode(data, iso, &mut out);
    assert_eq!(out, bytes, "{name}: encoding");
    assert_prefixes_need_more(name, bytes, |b| UrbReply::decode(b, &limits(), in_flight));
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(s.len() % 2, 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// OP_* phase
// ---------------------------------------------------------------------------

const OP_REQ_DEVLIST_BYTES: [u8; 8] = [
    0x01, 0x11, // 0x00 version           = 0x0111 (v1.1.1)
    0x80, 0x05, // 0x02 command           = OP_REQ_DEVLIST
    0x00, 0x00, 0x00, 0x00, // 0x04 status = 0 (unused)
];

#[test]
fn op_req_devlist() {
    op_request_golden(
        "OP_REQ_DEVLIST",
        &OP_REQ_DEVLIST_BYTES,
        OpRequest::Devlist {
            version: USBIP_VERSION,
        },
    );
}

const OP_REQ_IMPORT_BYTES: [u8; 40] = cat(&[
    &[0x01, 0x11],             // 0x00 version = 0x0111
    &[0x80, 0x03],             // 0x02 command = OP_REQ_IMPORT
    &[0x00, 0x00, 0x00, 0x00], // 0x04 status  = 0 (unused)
    &padded::<32>(b"3-2"),     // 0x08 busid   = "3-2", NUL-padded to 32
]);

#[test]
fn op_req_import() {
    op_request_golden(
        "OP_REQ_IMPORT",
        &OP_REQ_IMPORT_BYTES,
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "3-2".into(),
        },
    );
    // Spot-check the layout against the document's offsets.
    assert_eq!(&OP_REQ_IMPORT_BYTES[8..11], b"3-2");
    assert!(OP_REQ_IMPORT_BYTES[11..].iter().all(|&b| b == 0));
}

const PATH: &[u8] = b"/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2";

/// `struct usbip_usb_device` (312 bytes). Record offsets are given first;
/// the document's absolute offsets follow for OP_REP_DEVLIST (record at
/// 0x0C) and OP_REP_IMPORT (record at 0x08).
const DEVICE_RECORD: [u8; DEVICE_INFO_LEN] = cat(&[
    &padded::<256>(PATH),  // +0x000 path (dl 0x00C, imp 0x008), NUL-padded to 256
    &padded::<32>(b"3-2"), // +0x100 busid (dl 0x10C, imp 0x108) = "3-2"
    &[0x00, 0x00, 0x00, 0x03], // +0x120 busnum (dl 0x12C, imp 0x128) = 3
    &[0x00, 0x00, 0x00, 0x02], // +0x124 devnum (dl 0x130, imp 0x12C) = 2
    &[0x00, 0x00, 0x00, 0x02], // +0x128 speed (dl 0x134, imp 0x130) = USB_SPEED_FULL
    &[0x04, 0x6d],         // +0x12C idVendor (dl 0x138, imp 0x134) = 0x046d
    &[0xc5, 0x2b],         // +0x12E idProduct (dl 0x13A, imp 0x136) = 0xc52b
    &[0x12, 0x11],         // +0x130 bcdDevice (dl 0x13C, imp 0x138) = 0x1211
    &[0x00],               // +0x132 bDeviceClass (dl 0x13E, imp 0x13A) = 0
    &[0x00],               // +0x133 bDeviceSubClass (dl 0x13F, imp 0x13B) = 0
    &[0x00],               // +0x134 bDeviceProtocol (dl 0x140, imp 0x13C) = 0
    &[0x01],               // +0x135 bConfigurationValue (dl 0x141, imp 0x13D) = 1
    &[0x01],               // +0x136 bNumConfigurations (dl 0x142, imp 0x13E) = 1
    &[0x02],               // +0x137 bNumInterfaces (dl 0x143, imp 0x13F) = 2
]);

fn device(interfaces: Vec<InterfaceInfo>) -> DeviceInfo {
    DeviceInfo {
        path: usbwire_proto::DevicePath::from_field(PATH),
        busid: "3-2".into(),
        busnum: 3,
        devnum: 2,
        speed: Speed::Full,
        id_vendor: 0x046d,
        id_product: 0xc52b,
        bcd_device: 0x1211,
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 1,
        num_configurations: 1,
        num_interfaces: 2,
        interfaces,
    }
}

const OP_REP_DEVLIST_EMPTY_BYTES: [u8; 12] = [
    0x01, 0x11, // 0x00 version = 0x0111
    0x00, 0x05, // 0x02 reply code = OP_REP_DEVLIST
    0x00, 0x00, 0x00, 0x00, // 0x04 status = 0 (ST_OK)
    0x00, 0x00, 0x00, 0x00, // 0x08 number of exported devices = 0; the message ends here
];

#[test]
fn op_rep_devlist_no_devices() {
    op_reply_golden(
        "OP_REP_DEVLIST (0 devices)",
        &OP_REP_DEVLIST_EMPTY_BYTES,
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            devices: vec![],
        },
    );
}

const OP_REP_DEVLIST_ONE_BYTES: [u8; 12 + DEVICE_INFO_LEN + 8] = cat(&[
    &[0x01, 0x11],             // 0x000 version = 0x0111
    &[0x00, 0x05],             // 0x002 reply code = OP_REP_DEVLIST
    &[0x00, 0x00, 0x00, 0x00], // 0x004 status = 0 (ST_OK)
    &[0x00, 0x00, 0x00, 0x01], // 0x008 number of exported devices = 1
    &DEVICE_RECORD,            // 0x00C .. 0x144 device 0 (see DEVICE_RECORD)
    &[0x03, 0x01, 0x01, 0x00], // 0x144 interface 0: class 3 (HID), subclass 1 (boot), protocol 1 (keyboard), pad
    &[0x03, 0x01, 0x02, 0x00], // 0x148 interface 1: class 3 (HID), subclass 1 (boot), protocol 2 (mouse), pad
]);

#[test]
fn op_rep_devlist_one_device_two_interfaces() {
    let b = &OP_REP_DEVLIST_ONE_BYTES;
    // The document's absolute offsets.
    assert_eq!(&b[0x10C..0x10F], b"3-2");
    assert_eq!(b[0x12C..0x130], [0, 0, 0, 3]);
    assert_eq!(b[0x138..0x13A], [0x04, 0x6d]);
    assert_eq!(b[0x143], 2);
    assert_eq!(b[0x144..0x147], [3, 1, 1]);
    op_reply_golden(
        "OP_REP_DEVLIST (1 device, 2 interfaces)",
        b,
        OpReply::Devlist {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            devices: vec![device(vec![
                InterfaceInfo {
                    class: 3,
                    subclass: 1,
                    protocol: 1,
                },
                InterfaceInfo {
                    class: 3,
                    subclass: 1,
                    protocol: 2,
                },
            ])],
        },
    );
}

const OP_REP_IMPORT_OK_BYTES: [u8; OP_HEADER_LEN + DEVICE_INFO_LEN] = cat(&[
    &[0x01, 0x11],             // 0x000 version = 0x0111
    &[0x00, 0x03],             // 0x002 reply code = OP_REP_IMPORT
    &[0x00, 0x00, 0x00, 0x00], // 0x004 status = 0 (ST_OK): the device record follows
    &DEVICE_RECORD,            // 0x008 .. 0x140 device (no interface records in an import)
]);

#[test]
fn op_rep_import_success() {
    let b = &OP_REP_IMPORT_OK_BYTES;
    assert_eq!(b.len(), 320);
    assert_eq!(&b[0x108..0x10B], b"3-2");
    assert_eq!(b[0x128..0x12C], [0, 0, 0, 3]);
    assert_eq!(b[0x13F], 2);
    op_reply_golden(
        "OP_REP_IMPORT (ok)",
        b,
        OpReply::Import {
            version: USBIP_VERSION,
            status: OpStatus::Ok,
            device: Some(device(vec![])),
        },
    );
}

const OP_REP_IMPORT_FAIL_BYTES: [u8; 8] = [
    0x01, 0x11, // 0x00 version = 0x0111
    0x00, 0x03, // 0x02 reply code = OP_REP_IMPORT
    0x00, 0x00, 0x00, 0x01, // 0x04 status = 1 (ST_NA); the reply ends with the status
];

#[test]
fn op_rep_import_failure() {
    op_reply_golden(
        "OP_REP_IMPORT (status 1)",
        &OP_REP_IMPORT_FAIL_BYTES,
        OpReply::Import {
            version: USBIP_VERSION,
            status: OpStatus::Na,
            device: None,
        },
    );
}

// ---------------------------------------------------------------------------
// URB phase
// ---------------------------------------------------------------------------

const CMD_SUBMIT_CONTROL_IN: [u8; 48] = [
    0x00, 0x00, 0x00, 0x01, // 0x00 command = USBIP_CMD_SUBMIT
    0x00, 0x00, 0x00, 0x01, // 0x04 seqnum = 1
    0x00, 0x03, 0x00, 0x02, // 0x08 devid = busnum 3 << 16 | devnum 2
    0x00, 0x00, 0x00, 0x01, // 0x0C direction = 1 (USBIP_DIR_IN)
    0x00, 0x00, 0x00, 0x00, // 0x10 ep = 0
    0x00, 0x00, 0x02, 0x00, // 0x14 transfer_flags = URB_DIR_IN
    0x00, 0x00, 0x00, 0x12, // 0x18 transfer_buffer_length = 18
    0x00, 0x00, 0x00, 0x00, // 0x1C start_frame = 0
    0xff, 0xff, 0xff, 0xff, // 0x20 number_of_packets = 0xffffffff (not ISO)
    0x00, 0x00, 0x00, 0x00, // 0x24 interval = 0
    0x80, // 0x28 setup.bmRequestType = 0x80 (IN, standard, device)
    0x06, // 0x29 setup.bRequest = GET_DESCRIPTOR
    0x00, 0x01, // 0x2A setup.wValue = 0x0100 (DEVICE descriptor, index 0), LITTLE-endian
    0x00, 0x00, // 0x2C setup.wIndex = 0, little-endian
    0x12,
    0x00, // 0x2E setup.wLength = 18, little-endian
          // (IN: no transfer_buffer follows)
];

#[test]
fn cmd_submit_control_in_get_descriptor() {
    let cmd = CmdSubmit {
        seqnum: 1,
        devid: 0x0003_0002,
        direction: Direction::In,
        ep: 0,
        transfer_flags: flags::URB_DIR_IN,
        transfer_buffer_length: 18,
        start_frame: 0,
        number_of_packets: 0xffff_ffff,
        interval: 0,
        setup: [0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00],
    };
    cmd_submit_golden(
        "CMD_SUBMIT control IN",
        &CMD_SUBMIT_CONTROL_IN,
        false,
        cmd,
        &[],
        &[],
    );
    let s = cmd.setup_packet();
    assert_eq!(s.request_type, 0x80);
    assert_eq!(s.request, 6);
    assert_eq!(s.value, 0x0100, "wValue is little-endian on the wire");
    assert_eq!(s.index, 0);
    assert_eq!(s.length, 18, "wLength is little-endian on the wire");
    assert_eq!(s.direction(), Direction::In);
    assert_eq!(s.to_bytes(), cmd.setup);
}

const CMD_SUBMIT_BULK_OUT: [u8; 48 + 8] = [
    0x00, 0x00, 0x00, 0x01, // 0x00 command = USBIP_CMD_SUBMIT
    0x00, 0x00, 0x00, 0x02, // 0x04 seqnum = 2
    0x00, 0x03, 0x00, 0x02, // 0x08 devid = 0x00030002
    0x00, 0x00, 0x00, 0x00, // 0x0C direction = 0 (USBIP_DIR_OUT)
    0x00, 0x00, 0x00, 0x02, // 0x10 ep = 2
    0x00, 0x00, 0x00, 0x40, // 0x14 transfer_flags = URB_ZERO_PACKET
    0x00, 0x00, 0x00, 0x08, // 0x18 transfer_buffer_length = 8
    0x00, 0x00, 0x00, 0x00, // 0x1C start_frame = 0
    0xff, 0xff, 0xff, 0xff, // 0x20 number_of_packets = 0xffffffff (not ISO)
    0x00, 0x00, 0x00, 0x00, // 0x24 interval = 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x28 setup = zeros (unused)
    0x55, 0x53, 0x42, 0x43, 0xde, 0xad, 0xbe, 0xef, // 0x30 transfer_buffer (8 bytes, OUT)
];

#[test]
fn cmd_submit_bulk_out() {
    cmd_submit_golden(
        "CMD_SUBMIT bulk OUT",
        &CMD_SUBMIT_BULK_OUT,
        false,
        CmdSubmit {
            seqnum: 2,
            devid: 0x0003_0002,
            direction: Direction::Out,
            ep: 2,
            transfer_flags: flags::URB_ZERO_PACKET,
            transfer_buffer_length: 8,
            start_frame: 0,
            number_of_packets: 0xffff_ffff,
            interval: 0,
            setup: [0; 8],
        },
        &[0x55, 0x53, 0x42, 0x43, 0xde, 0xad, 0xbe, 0xef],
        &[],
    );
}

const CMD_SUBMIT_ISO_OUT: [u8; 48 + 6 + 2 * 16] = [
    0x00, 0x00, 0x00, 0x01, // 0x00 command = USBIP_CMD_SUBMIT
    0x00, 0x00, 0x00, 0x03, // 0x04 seqnum = 3
    0x00, 0x03, 0x00, 0x02, // 0x08 devid = 0x00030002
    0x00, 0x00, 0x00, 0x00, // 0x0C direction = 0 (OUT)
    0x00, 0x00, 0x00, 0x03, // 0x10 ep = 3 (isochronous)
    0x00, 0x00, 0x00, 0x02, // 0x14 transfer_flags = URB_ISO_ASAP
    0x00, 0x00, 0x00, 0x06, // 0x18 transfer_buffer_length = 6
    0x00, 0x00, 0x01, 0x00, // 0x1C start_frame = 256
    0x00, 0x00, 0x00, 0x02, // 0x20 number_of_packets = 2
    0x00, 0x00, 0x00, 0x01, // 0x24 interval = 1
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x28 setup = zeros (unused)
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, // 0x30 transfer_buffer (6 bytes, OUT)
    0x00, 0x00, 0x00, 0x00, // 0x36 iso[0].offset = 0
    0x00, 0x00, 0x00, 0x03, // 0x3A iso[0].length = 3
    0x00, 0x00, 0x00, 0x00, // 0x3E iso[0].actual_length = 0
    0x00, 0x00, 0x00, 0x00, // 0x42 iso[0].status = 0
    0x00, 0x00, 0x00, 0x03, // 0x46 iso[1].offset = 3
    0x00, 0x00, 0x00, 0x03, // 0x4A iso[1].length = 3
    0x00, 0x00, 0x00, 0x00, // 0x4E iso[1].actual_length = 0
    0x00, 0x00, 0x00, 0x00, // 0x52 iso[1].status = 0
];

#[test]
fn cmd_submit_iso_out_two_packets() {
    cmd_submit_golden(
        "CMD_SUBMIT ISO OUT",
        &CMD_SUBMIT_ISO_OUT,
        true,
        CmdSubmit {
            seqnum: 3,
            devid: 0x0003_0002,
            direction: Direction::Out,
            ep: 3,
            transfer_flags: flags::URB_ISO_ASAP,
            transfer_buffer_length: 6,
            start_frame: 256,
            number_of_packets: 2,
            interval: 1,
            setup: [0; 8],
        },
        &[1, 2, 3, 4, 5, 6],
        &[
            IsoPacket {
                offset: 0,
                length: 3,
                actual_length: 0,
                status: 0,
            },
            IsoPacket {
                offset: 3,
                length: 3,
                actual_length: 0,
                status: 0,
            },
        ],
    );
}

/// The 18-byte device descriptor the control IN above asks for.
const DEVICE_DESCRIPTOR: [u8; 18] = [
    0x12, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x40, 0x6d, 0x04, 0x2b, 0xc5, 0x11, 0x12, 0x01, 0x02,
    0x00, 0x01,
];

const RET_SUBMIT_IN: [u8; 48 + 18] = cat(&[
    &[0x00, 0x00, 0x00, 0x03], // 0x00 command = USBIP_RET_SUBMIT
    &[0x00, 0x00, 0x00, 0x01], // 0x04 seqnum = 1 (answers the control IN)
    &[0x00, 0x00, 0x00, 0x00], // 0x08 devid = 0 (server)
    &[0x00, 0x00, 0x00, 0x00], // 0x0C direction = 0 (server)
    &[0x00, 0x00, 0x00, 0x00], // 0x10 ep = 0 (server)
    &[0x00, 0x00, 0x00, 0x00], // 0x14 status = 0
    &[0x00, 0x00, 0x00, 0x12], // 0x18 actual_length = 18
    &[0x00, 0x00, 0x00, 0x00], // 0x1C start_frame = 0
    &[0x00, 0x00, 0x00, 0x00], // 0x20 number_of_packets = 0 (urb->number_of_packets of a non-ISO URB)
    &[0x00, 0x00, 0x00, 0x00], // 0x24 error_count = 0
    &[0x00; 8],                // 0x28 padding
    &DEVICE_DESCRIPTOR,        // 0x30 transfer_buffer (actual_length bytes, IN)
]);

#[test]
fn ret_submit_in_with_payload() {
    ret_submit_golden(
        "RET_SUBMIT IN",
        &RET_SUBMIT_IN,
        InFlight {
            direction: Direction::In,
            iso: false,
            length: u32::MAX,
        },
        RetSubmit {
            seqnum: 1,
            actual_length: 18,
            ..RetSubmit::default()
        },
        &DEVICE_DESCRIPTOR,
        &[],
    );
}

const RET_SUBMIT_ISO_IN: [u8; 48 + 8 + 2 * 16] = [
    0x00, 0x00, 0x00, 0x03, // 0x00 command = USBIP_RET_SUBMIT
    0x00, 0x00, 0x00, 0x07, // 0x04 seqnum = 7
    0x00, 0x00, 0x00, 0x00, // 0x08 devid = 0
    0x00, 0x00, 0x00, 0x00, // 0x0C direction = 0
    0x00, 0x00, 0x00, 0x00, // 0x10 ep = 0
    0x00, 0x00, 0x00, 0x00, // 0x14 status = 0
    0x00, 0x00, 0x00,
    0x08, // 0x18 actual_length = 8 = 5 + 3 (sum of the packets' actual lengths)
    0x00, 0x00, 0x01, 0x10, // 0x1C start_frame = 0x110
    0x00, 0x00, 0x00, 0x02, // 0x20 number_of_packets = 2
    0x00, 0x00, 0x00, 0x00, // 0x24 error_count = 0
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 0x28 padding
    0xa0, 0xa1, 0xa2, 0xa3,
    0xa4, // 0x30 packet 0 data (5 bytes, packed: no padding to its length 8)
    0xb0, 0xb1, 0xb2, // 0x35 packet 1 data (3 bytes)
    0x00, 0x00, 0x00, 0x00, // 0x38 iso[0].offset = 0 (in the client's unpacked buffer)
    0x00, 0x00, 0x00, 0x08, // 0x3C iso[0].length = 8
    0x00, 0x00, 0x00, 0x05, // 0x40 iso[0].actual_length = 5
    0x00, 0x00, 0x00, 0x00, // 0x44 iso[0].status = 0
    0x00, 0x00, 0x00, 0x08, // 0x48 iso[1].offset = 8
    0x00, 0x00, 0x00, 0x08, // 0x4C iso[1].length = 8
    0x00, 0x00, 0x00, 0x03, // 0x50 iso[1].actual_length = 3
    0xff, 0xff, 0xff, 0xee, // 0x54 iso[1].status = -18 (-EXDEV)
];

#[test]
fn ret_submit_iso_in_packed() {
    ret_submit_golden(
        "RET_SUBMIT ISO IN",
        &RET_SUBMIT_ISO_IN,
        InFlight {
            direction: Direction::In,
            iso: true,
            length: u32::MAX,
        },
        RetSubmit {
            seqnum: 7,
            actual_length: 8,
            start_frame: 0x110,
            number_of_packets: 2,
            ..RetSubmit::default()
        },
        &[0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xb0, 0xb1, 0xb2],
        &[
            IsoPacket {
                offset: 0,
                length: 8,
                actual_length: 5,
                status: 0,
            },
            IsoPacket {
                offset: 8,
                length: 8,
                actual_length: 3,
                status: Errno::EXDEV.to_status(),
            },
        ],
    );
}

const CMD_UNLINK: [u8; 48] = cat(&[
    &[0x00, 0x00, 0x00, 0x02], // 0x00 command = USBIP_CMD_UNLINK
    &[0x00, 0x00, 0x00, 0x05], // 0x04 seqnum = 5
    &[0x00, 0x03, 0x00, 0x02], // 0x08 devid = 0x00030002
    &[0x00, 0x00, 0x00, 0x00], // 0x0C direction = 0
    &[0x00, 0x00, 0x00, 0x00], // 0x10 ep = 0 (shall be 0 for UNLINK)
    &[0x00, 0x00, 0x00, 0x04], // 0x14 unlink_seqnum = 4
    &[0x00; 24],               // 0x18 padding
]);

#[test]
fn cmd_unlink() {
    let expected = CmdUnlink {
        seqnum: 5,
        devid: 0x0003_0002,
        direction: 0,
        ep: 0,
        unlink_seqnum: 4,
    };
    let no_iso = |_: Direction, _: u32| -> bool { panic!("is_iso asked for an UNLINK") };
    for input in [CMD_UNLINK.to_vec(), with_trailer(&CMD_UNLINK)] {
        assert_eq!(
            UrbCommand::decode(&input, &limits(), no_iso).unwrap(),
            Decoded::Message(UrbCommand::Unlink(expected), 48)
        );
    }
    let mut out = Vec::new();
    expected.encode(&mut out);
    assert_eq!(out, CMD_UNLINK);
    assert_prefixes_need_more("CMD_UNLINK", &CMD_UNLINK, |b| {
        UrbCommand::decode(b, &limits(), no_iso)
    });
}

const RET_UNLINK: [u8; 48] = cat(&[
    &[0x00, 0x00, 0x00, 0x04], // 0x00 command = USBIP_RET_UNLINK
    &[0x00, 0x00, 0x00, 0x05], // 0x04 seqnum = 5 (the CMD_UNLINK's)
    &[0x00, 0x00, 0x00, 0x00], // 0x08 devid = 0
    &[0x00, 0x00, 0x00, 0x00], // 0x0C direction = 0
    &[0x00, 0x00, 0x00, 0x00], // 0x10 ep = 0
    &[0xff, 0xff, 0xff, 0x98], // 0x14 status = -104 (-ECONNRESET)
    &[0x00; 24],               // 0x18 padding
]);

#[test]
fn ret_unlink_econnreset() {
    let expected = RetUnlink {
        seqnum: 5,
        devid: 0,
        direction: 0,
        ep: 0,
        status: Errno::ECONNRESET.to_status(),
    };
    assert_eq!(expected.status as u32, 0xFFFF_FF98);
    let none = |_: u32| -> Option<InFlight> { panic!("in_flight asked for a RET_UNLINK") };
    for input in [RET_UNLINK.to_vec(), with_trailer(&RET_UNLINK)] {
        assert_eq!(
            UrbReply::decode(&input, &limits(), none).unwrap(),
            Decoded::Message(UrbReply::Unlink(expected), 48)
        );
    }
    let mut out = Vec::new();
    expected.encode(&mut out);
    assert_eq!(out, RET_UNLINK);
    assert_eq!(Errno::from_status(expected.status), Err(Errno::ECONNRESET));
    assert_prefixes_need_more("RET_UNLINK", &RET_UNLINK, |b| {
        UrbReply::decode(b, &limits(), none)
    });
}

// ---------------------------------------------------------------------------
// The capture in the EXAMPLE section of usbip_protocol.rst (HID interrupt).
// ---------------------------------------------------------------------------

const HID_OUT_PAYLOAD: &str = "ffffffff860008a784ce5ae212376300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
const HID_IN_PAYLOAD: &str = "ffffffff860011a784ce5ae2123763612891b1020100000400000000000000000000000000000000000000000000000000000000000000000000000000000000";

#[test]
fn kernel_doc_capture_cmd_intr_in() {
    let b = hex("00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 00000000 00000000");
    cmd_submit_golden(
        "CmdIntrIN",
        &b,
        false,
        CmdSubmit {
            seqnum: 0xd05,
            devid: 0x0001_000f,
            direction: Direction::In,
            ep: 1,
            transfer_flags: flags::URB_DIR_IN,
            transfer_buffer_length: 64,
            start_frame: -1,
            number_of_packets: 0,
            interval: 4,
            setup: [0; 8],
        },
        &[],
        &[],
    );
}

#[test]
fn kernel_doc_capture_cmd_intr_out() {
    let mut b = hex("00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff 00000000 00000004 00000000 00000000");
    let payload = hex(HID_OUT_PAYLOAD);
    assert_eq!(payload.len(), 64);
    b.extend_from_slice(&payload);
    cmd_submit_golden(
        "CmdIntrOUT",
        &b,
        false,
        CmdSubmit {
            seqnum: 0xd06,
            devid: 0x0001_000f,
            direction: Direction::Out,
            ep: 1,
            transfer_flags: 0,
            transfer_buffer_length: 64,
            start_frame: -1,
            number_of_packets: 0,
            interval: 4,
            setup: [0; 8],
        },
        &payload,
        &[],
    );
}

#[test]
fn kernel_doc_capture_ret_intr_out() {
    // The reply to an OUT carries actual_length but no data.
    let b = hex("00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000");
    ret_submit_golden(
        "RetIntrOut",
        &b,
        InFlight {
            direction: Direction::Out,
            iso: false,
            length: u32::MAX,
        },
        RetSubmit {
            seqnum: 0xd06,
            actual_length: 64,
            start_frame: -1,
            ..RetSubmit::default()
        },
        &[],
        &[],
    );
}

#[test]
fn kernel_doc_capture_ret_intr_in() {
    let mut b = hex("00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000");
    let payload = hex(HID_IN_PAYLOAD);
    assert_eq!(payload.len(), 64);
    b.extend_from_slice(&payload);
    ret_submit_golden(
        "RetIntrIn",
        &b,
        InFlight {
            direction: Direction::In,
            iso: false,
            length: u32::MAX,
        },
        RetSubmit {
            seqnum: 0xd05,
            actual_length: 64,
            start_frame: -1,
            ..RetSubmit::default()
        },
        &payload,
        &[],
    );
}

/// The whole URB conversation of this file, back to back in one buffer,
/// decodes message by message with the right lengths.
#[test]
fn urb_vectors_back_to_back() {
    let stream: Vec<u8> = [
        &CMD_SUBMIT_CONTROL_IN[..],
        &CMD_SUBMIT_BULK_OUT,
        &CMD_SUBMIT_ISO_OUT,
        &CMD_UNLINK,
    ]
    .concat();
    let mut at = 0;
    let mut lens = Vec::new();
    while at < stream.len() {
        let (_, n) = UrbCommand::decode(&stream[at..], &limits(), |_, ep| ep == 3)
            .unwrap()
            .message()
            .unwrap();
        lens.push(n);
        at += n;
    }
    assert_eq!(lens, [48, 56, 86, 48]);

    let replies: Vec<u8> = [&RET_SUBMIT_IN[..], &RET_SUBMIT_ISO_IN, &RET_UNLINK].concat();
    let mut at = 0;
    let mut lens = Vec::new();
    while at < replies.len() {
        let (_, n) = UrbReply::decode(&replies[at..], &limits(), |seq| {
            Some(InFlight {
                direction: Direction::In,
                iso: seq == 7,
                length: u32::MAX,
            })
        })
        .unwrap()
        .message()
        .unwrap();
        lens.push(n);
        at += n;
    }
    assert_eq!(lens, [66, 88, 48]);
}
