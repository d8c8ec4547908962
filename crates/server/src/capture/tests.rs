use super::*;
use pcap_file::pcapng::{Block, PcapNgReader};
use usbwire_usb::UrbId;

/// A usbmon record as Linux writes it for a GET_DESCRIPTOR(DEVICE, 18)
/// submission on bus 3, device 2, decoded by hand from `struct
/// mon_bin_hdr` (little-endian x86-64).
#[rustfmt::skip]
const GET_DESCRIPTOR_SUBMIT: [u8; HEADER_LEN] = [
    0x00, 0x5c, 0x3a, 0x12, 0x81, 0x88, 0xff, 0xff, // id: an URB's address
    b'S',                                           // type: submission
    2,                                              // xfer_type: control
    0x80,                                           // epnum: 0, IN
    2,                                              // devnum
    3, 0,                                           // busnum
    0,                                              // flag_setup: setup present
    b'<',                                           // flag_data: IN, none yet
    0x80, 0xbe, 0x5a, 0x67, 0, 0, 0, 0,             // ts_sec 1734000256
    0x40, 0xe2, 0x01, 0x00,                         // ts_usec 123456
    0x8d, 0xff, 0xff, 0xff,                         // status -EINPROGRESS (-115)
    18, 0, 0, 0,                                    // len_urb
    0, 0, 0, 0,                                     // len_cap
    0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00, // setup: GET_DESCRIPTOR(DEVICE), 18
    0, 0, 0, 0,                                     // interval
    0, 0, 0, 0,                                     // start_frame
    0x00, 0x02, 0, 0,                               // xfer_flags: URB_DIR_IN
    0, 0, 0, 0,                                     // ndesc
];

fn get_descriptor_header() -> MonHeader {
    MonHeader {
        id: 0xffff_8881_123a_5c00,
        kind: b'S',
        xfer_type: XferType::Control as u8,
        epnum: 0x80,
        devnum: 2,
        busnum: 3,
        flag_setup: 0,
        flag_data: b'<',
        ts_sec: 1_734_000_256,
        ts_usec: 123_456,
        status: -115,
        len_urb: 18,
        len_cap: 0,
        setup: [0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00],
        interval: 0,
        start_frame: 0,
        xfer_flags: 0x200,
        ndesc: 0,
    }
}

#[test]
fn header_emits_a_known_usbmon_record() {
    assert_eq!(get_descriptor_header().emit(), GET_DESCRIPTOR_SUBMIT);
}

#[test]
fn header_parses_a_known_usbmon_record() {
    let h = MonHeader::parse(&GET_DESCRIPTOR_SUBMIT);
    assert_eq!(h.id, 0xffff_8881_123a_5c00);
    assert_eq!(h.kind, b'S');
    assert_eq!(h.xfer_type, 2);
    assert_eq!(h.epnum, 0x80);
    assert_eq!((h.busnum, h.devnum), (3, 2));
    assert_eq!((h.flag_setup, h.flag_data), (0, b'<'));
    assert_eq!((h.ts_sec, h.ts_usec), (1_734_000_256, 123_456));
    assert_eq!(h.status, -115);
    assert_eq!((h.len_urb, h.len_cap), (18, 0));
    assert_eq!(
        SetupPacket::from_bytes(h.setup),
        SetupPacket {
            request_type: 0x80,
            request: 6,
            value: 0x0100,
            index: 0,
            length: 18
        }
    );
    assert_eq!(h.xfer_flags, 0x200);
    assert_eq!(h, get_descriptor_header());
}

/// The same submission built from an URB by the encoder: every field as
/// usbmon fills it.
#[test]
fn control_submission_encodes_as_usbmon_does() {
    let setup = SetupPacket::from_bytes([0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00]);
    let event = Event {
        kind: b'S',
        id: 0xffff_8881_123a_5c00,
        ep: 0,
        direction: Direction::In,
        xfer: XferType::Control,
        setup,
        transfer_flags: 0x200,
        interval: 0,
        start_frame: 0,
        status: -115,
        len_urb: 18,
        data: &[],
        iso: &[],
        iso_packed: false,
    };
    let ts = Duration::new(1_734_000_256, 123_456_789);
    let (bytes, original) = encode(&event, 3, 2, ts);
    assert_eq!(bytes, GET_DESCRIPTOR_SUBMIT);
    assert_eq!(original, HEADER_LEN as u32);
}

fn urb(ep: u8, direction: Direction, length: usize) -> Urb {
    Urb {
        id: UrbId(7),
        seqnum: 1,
        ep,
        direction,
        transfer_flags: 0,
        setup: SetupPacket::default(),
        length,
        buf: (0..length).map(|i| i as u8).collect(),
        iso: Vec::new(),
        start_frame: 0,
        interval: 0,
        started: false,
    }
}

#[test]
fn bulk_data_goes_with_its_direction() {
    let (d, rx) = test_recorder(16);
    let out = urb(2, Direction::Out, 31);
    d.submitted(&out, XferType::Bulk);
    d.completed(&out, XferType::Bulk, 31, 0);
    let inn = urb(1, Direction::In, 512);
    d.submitted(&inn, XferType::Bulk);
    d.completed(&inn, XferType::Bulk, 13, 0);
    let r = rx.take();
    assert_eq!(r.len(), 4);
    // OUT: the data on the submission, none on the completion.
    let (h, data, _) = &r[0];
    assert_eq!((h.kind, h.epnum, h.xfer_type), (b'S', 0x02, 3));
    assert_eq!((h.flag_setup, h.flag_data), (b'-', 0));
    assert_eq!((h.len_urb, h.len_cap), (31, 31));
    assert_eq!(data[..], out.buf[..]);
    assert_eq!((h.busnum, h.devnum), (1, 4));
    assert_eq!(h.id, (3 << IMPORT_ID_SHIFT) | 7);
    let (h, data, _) = &r[1];
    assert_eq!((h.kind, h.status, h.flag_data), (b'C', 0, b'>'));
    assert_eq!((h.len_urb, h.len_cap), (31, 0));
    assert!(data.is_empty());
    assert_eq!(h.id, r[0].0.id, "submission and completion pair up");
    // IN: none on the submission, the data that came on the completion.
    let (h, _, _) = &r[2];
    assert_eq!(
        (h.epnum, h.flag_data, h.len_urb, h.len_cap),
        (0x81, b'<', 512, 0)
    );
    let (h, data, _) = &r[3];
    assert_eq!((h.flag_data, h.len_urb, h.len_cap), (0, 13, 13));
    assert_eq!(data[..], inn.buf[..13]);
}

#[test]
fn long_data_is_cut_to_the_snaplen() {
    let (d, rx) = test_recorder(4);
    let big = urb(1, Direction::In, SNAPLEN + 1000);
    d.completed(&big, XferType::Bulk, SNAPLEN + 1000, 0);
    let r = rx.take();
    let (h, data, original) = &r[0];
    assert_eq!(h.len_urb as usize, SNAPLEN + 1000);
    assert_eq!(h.len_cap as usize, SNAPLEN);
    assert_eq!(data.len(), SNAPLEN);
    assert_eq!(*original as usize, HEADER_LEN + SNAPLEN + 1000);
}

#[test]
fn hostile_lengths_and_iso_counts_are_bounded() {
    let (d, rx) = test_recorder(8);
    // An actual length beyond the buffer, an endpoint number beyond 15.
    let mut u = urb(200, Direction::In, 8);
    d.completed(&u, XferType::Bulk, usize::MAX, -32);
    // More ISO packets than usbmon keeps; packed IN data.
    u.ep = 3;
    u.iso = (0..1000)
        .map(|i| IsoPacket {
            offset: i * 8,
            length: 8,
            actual_length: if i % 2 == 0 { 4 } else { 99 },
            status: if i == 1 { -18 } else { 0 },
        })
        .collect();
    d.completed(&u, XferType::Isochronous, 8, 0);
    d.submitted(&u, XferType::Isochronous);
    let r = rx.take();
    let (h, data, _) = &r[0];
    assert_eq!((h.epnum, h.status, h.len_urb), (200 & 0x7f | 0x80, -32, 8));
    assert_eq!(data.len(), 8);
    let (h, data, _) = &r[1];
    assert_eq!(h.ndesc as usize, MAX_ISO_DESCS);
    assert_eq!(h.setup[0..4], 1i32.to_le_bytes(), "error_count");
    assert_eq!(h.setup[4..8], 1000i32.to_le_bytes(), "numdesc");
    assert_eq!(h.len_cap as usize, MAX_ISO_DESCS * ISO_DESC_LEN + 8);
    let desc = |i: usize| {
        let d = &data[i * ISO_DESC_LEN..(i + 1) * ISO_DESC_LEN];
        let w = |j: usize| u32::from_le_bytes(d[j..j + 4].try_into().unwrap());
        (w(0) as i32, w(4), w(8))
    };
    // Completion: offsets where the packed data lies, actual lengths
    // no longer than the packets.
    assert_eq!(desc(0), (0, 0, 4));
    assert_eq!(desc(1), (-18, 4, 8));
    assert_eq!(desc(2), (0, 12, 4));
    // Submission: the packets as requested.
    let (h, data, _) = &r[2];
    assert_eq!((h.ndesc, h.flag_data), (MAX_ISO_DESCS as u32, b'<'));
    let d1 = &data[ISO_DESC_LEN..2 * ISO_DESC_LEN];
    assert_eq!(d1[4..8], 8u32.to_le_bytes());
    assert_eq!(d1[8..12], 8u32.to_le_bytes());
}

#[test]
fn an_unread_queue_drops_and_counts() {
    let (d, rx) = test_recorder(2);
    let u = urb(1, Direction::In, 8);
    for _ in 0..5 {
        d.submitted(&u, XferType::Bulk);
    }
    assert_eq!(rx.take().len(), 2);
    assert_eq!(rx.shared.dropped_queue.load(Ordering::Relaxed), 3);
    assert_eq!(
        rx.shared.queued_bytes.load(Ordering::Relaxed),
        2 * HEADER_LEN,
        "what the writer takes it gives back; the test took it without"
    );
}

#[test]
fn descriptors_replay_as_get_descriptor_pairs() {
    let (d, rx) = test_recorder(8);
    let device = [18u8, 1, 0, 2, 0, 0, 0, 64, 1, 2, 3, 4, 0, 1, 1, 2, 3, 1];
    let config = [9u8, 2, 9, 0, 0, 1, 0, 0x80, 50];
    d.replay_descriptors(&device, &config);
    let r = rx.take();
    assert_eq!(r.len(), 4);
    assert_eq!(r[0].0.setup, [0x80, 6, 0, 1, 0, 0, 18, 0]);
    assert_eq!(r[1].1, device);
    assert_eq!(r[2].0.setup, [0x80, 6, 0, 2, 0, 0, 9, 0]);
    assert_eq!(r[3].1, config);
    assert_eq!((r[3].0.kind, r[3].0.status, r[3].0.epnum), (b'C', 0, 0x80));
    assert_ne!(r[0].0.id, r[2].0.id);
}

/// The packet blocks of a capture file, read back with pcap-file.
fn read_back(path: &Path) -> Vec<Vec<u8>> {
    let mut reader = PcapNgReader::new(File::open(path).unwrap()).unwrap();
    assert_eq!(reader.section().endianness, Endianness::Little);
    let mut packets = Vec::new();
    let mut interfaces = 0;
    while let Some(block) = reader.next_block() {
        match block.unwrap() {
            Block::InterfaceDescription(i) => {
                assert_eq!(i.linktype, DataLink::USB_LINUX_MMAPPED);
                interfaces += 1;
            }
            Block::EnhancedPacket(p) => packets.push(p.data.into_owned()),
            other => panic!("unexpected block {other:?}"),
        }
    }
    assert_eq!(interfaces, 1);
    packets
}

#[test]
fn the_file_stops_at_its_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limited.pcapng");
    let limit = 2048;
    let capture = Capture::start(CaptureConfig {
        path: path.clone(),
        busid: None,
        limit,
    })
    .unwrap();
    let d = capture.device("1-1", 1, 2).unwrap();
    let u = urb(1, Direction::In, 100);
    for _ in 0..50 {
        d.completed(&u, XferType::Bulk, 100, 0);
    }
    let stats = capture.finish();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size <= limit, "{size} bytes, over the {limit}-byte limit");
    let packets = read_back(&path);
    assert!(!packets.is_empty());
    assert_eq!(stats.written, packets.len() as u64);
    assert_eq!(stats.written + stats.dropped_limit, 50);
    assert_eq!(stats.dropped_queue, 0);
    // Room for no further record: the file stops at the last whole one.
    assert!(size + packet_block_len(HEADER_LEN + 100) > limit);
    // Records after the end are not counted as losses.
    d.completed(&u, XferType::Bulk, 100, 0);
    assert_eq!(capture.stats(), stats);
}

#[test]
fn everything_queued_is_written_at_the_finish() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.pcapng");
    let capture = Capture::start(CaptureConfig::new(&path)).unwrap();
    let d = capture.device("1-1", 1, 2).unwrap();
    let u = urb(2, Direction::Out, 31);
    for _ in 0..100 {
        d.submitted(&u, XferType::Bulk);
    }
    let stats = capture.finish();
    assert_eq!(stats.written, 100);
    let packets = read_back(&path);
    assert_eq!(packets.len(), 100);
    assert_eq!(packets[0].len(), HEADER_LEN + 31);
    assert_eq!(packet_block_len(packets[0].len()), 32 + 96);
}

#[test]
fn a_busid_filter_leaves_other_devices_out() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::start(CaptureConfig {
        busid: Some("2-1".into()),
        ..CaptureConfig::new(dir.path().join("one.pcapng"))
    })
    .unwrap();
    assert!(capture.device("1-1", 1, 2).is_none());
    assert!(capture.device("2-1", 2, 2).is_some());
    capture.finish();
}

#[test]
fn an_unwritable_path_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/x.pcapng");
    let e = Capture::start(CaptureConfig::new(&path)).unwrap_err();
    assert!(e.to_string().contains("no/such/dir"), "{e}");
}
