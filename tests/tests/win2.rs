//! usbip-win2's wire rules, replayed over TCP against the demo devices.
//!
//! usbip-win2 (github.com/vadimgrn/usbip-win2) is the Windows USB/IP
//! client. Its UDE driver builds every USB/IP header itself and checks the
//! server's replies with rules Linux's vhci does not have. [`win2`] is a
//! model of that driver: it puts on the wire the bytes the driver puts
//! there, and reads replies the way the driver reads them, panicking where
//! the driver drops the connection and reporting where it fails only the
//! request. It does not use usbwire's codec or client, so the two cannot
//! agree on a mistake.
//!
//! What the driver sends and requires (paths in the usbip-win2 repository):
//! - OP phase: `op_common.version` is `USBIP_VERSION` (0x0111) in requests,
//!   and replies whose version is not exactly 0x0111 fail with
//!   USBIP_ERROR_VERSION (`drivers/ude/network.cpp` and
//!   `userspace/libusbip/src/remote.cpp`, `recv_op_common`). The import
//!   reply must carry the requested busid (`drivers/ude/vhci_ioctl.cpp`,
//!   `recv_rep_import`), and every URB header carries
//!   `devid = busnum << 16 | devnum` from it (`context.h`, `make_devid`).
//! - CMD_SUBMIT: `number_of_packets = -1` unless isochronous, `interval` is
//!   the endpoint's bInterval, `transfer_flags` only URB_SHORT_NOT_OK and
//!   URB_ISO_ASAP (`drivers/ude/proto.cpp`, `set_cmd_submit_usbip_header`;
//!   `drivers/libdrv/usbd_helper.cpp`, `to_linux_flags`). Isochronous
//!   URBs carry their packet count and back-to-back descriptors
//!   (`drivers/ude/device_ioctl.cpp`, `isoch_transfer`, `repack`).
//! - seqnum: a per-device counter shifted left once, with the transfer
//!   direction in bit 0 (`drivers/ude/context.cpp`, `next_seqnum`). Replies
//!   say nothing else about direction: the driver frames a RET_SUBMIT's
//!   payload by bit 0 of its seqnum (`drivers/ude/wsk_receive.cpp`,
//!   `validate_header`; `drivers/libdrv/pdu.cpp`, `get_isoc_descr`), so
//!   the server must echo seqnum verbatim, and seqnum >> 1 must not be 0.
//! - RET_*: only RET_SUBMIT and RET_UNLINK; a RET_SUBMIT's
//!   `number_of_packets` must be -1 or 0..=1024 (`validate_header`), its
//!   `actual_length` at most the buffer, and an OUT must bring no data
//!   (`prepare_wsk_mdl`); anything else drops the connection. For an
//!   isochronous URB the count must be the submitted one, the offsets the
//!   submitted ones, IN data packed, and the packets' actual lengths must
//!   sum to `actual_length`, or the URB fails (`isoch_transfer`,
//!   `fill_isoc_data`).
//! - Unlink: the driver sends CMD_UNLINK and completes the URB at once,
//!   without waiting for anything (`drivers/ude/device_ioctl.cpp`,
//!   `send_cmd_unlink_and_complete`); a RET_SUBMIT that comes later is read
//!   and dropped. It does not look at RET_UNLINK's status; the protocol's
//!   rule, quoted in `ret_command`, is -ECONNRESET if the URB was unlinked
//!   and 0 if its RET_SUBMIT had already gone.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use usbwire_devices::acm::{AcmConfig, CdcAcm};
use usbwire_devices::descriptors::{self, DeviceDescriptor};
use usbwire_devices::hid::{HidKeyboard, KeyboardHandle};
use usbwire_devices::msc::{MassStorage, MscConfig};
use usbwire_devices::testdev::TestDevice;
use usbwire_devices::{Descriptors, EmulatedBackend, EmulatedDevice, Function, TransferType};
use usbwire_proto::{DeviceInfo, Errno, Speed};
use usbwire_server::{Backend, Completion, ServerConfig, Urb};
use usbwire_tests::support::TestServer;

use win2::{setup, Endpoint, Interface, Ret, RetSubmit};

/// The model of the driver.
mod win2 {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub const USBIP_VERSION: u16 = 0x0111;
    const OP_REQ_DEVLIST: u16 = 0x8005;
    const OP_REP_DEVLIST: u16 = 0x0005;
    const OP_REQ_IMPORT: u16 = 0x8003;
    const OP_REP_IMPORT: u16 = 0x0003;
    pub const ST_OK: u32 = 0;
    pub const ST_DEV_BUSY: u32 = 2;
    pub const ST_NODEV: u32 = 4;

    const CMD_SUBMIT: u32 = 1;
    const CMD_UNLINK: u32 = 2;
    const RET_SUBMIT: u32 = 3;
    const RET_UNLINK: u32 = 4;
    const NUMBER_OF_PACKETS_NON_ISOCH: i32 = -1;
    pub const MAX_ISO_PACKETS: usize = 1024;
    pub const URB_SHORT_NOT_OK: u32 = 0x0001;
    pub const URB_ISO_ASAP: u32 = 0x0002;

    const HEADER_LEN: usize = 48;
    const USB_DEVICE_LEN: usize = 312;
    const BUS_ID_SIZE: usize = 32;
    const ISO_DESCRIPTOR_LEN: usize = 16;

    /// How long any single reply may take before the test fails.
    pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

    fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(addr)
            .await
            .expect("connect to the server");
        // remote.cpp set_options: TCP_NODELAY (the driver sends with WSK_FLAG_NODELAY).
        s.set_nodelay(true).unwrap();
        s
    }

    async fn send(s: &mut TcpStream, bytes: &[u8]) {
        s.write_all(bytes).await.expect("write to the server");
    }

    /// Reads exactly `buf.len()` bytes (WSK_FLAG_WAITALL / MSG_WAITALL).
    async fn recv(s: &mut TcpStream, buf: &mut [u8], what: &str) {
        match tokio::time::timeout(REPLY_TIMEOUT, s.read_exact(buf)).await {
            Err(_) => panic!("no {what} from the server within {REPLY_TIMEOUT:?}"),
            Ok(Err(e)) => panic!("the connection ended ({e}) where usbip-win2 waits for {what}"),
            Ok(Ok(_)) => {}
        }
    }

    async fn expect_eof(s: &mut TcpStream, after: &str) {
        let mut b = [0u8; 64];
        match tokio::time::timeout(REPLY_TIMEOUT, s.read(&mut b)).await {
            Err(_) => panic!("the server kept the connection open after {after}"),
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("{n} stray bytes after {after}: {:02x?}", &b[..n]),
        }
    }

    /// remote.cpp `send_op_common`: version, code, status ST_OK.
    fn op_common(code: u16) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&USBIP_VERSION.to_be_bytes());
        b[2..4].copy_from_slice(&code.to_be_bytes());
        b
    }

    /// network.cpp / remote.cpp `recv_op_common`: returns the status.
    async fn recv_op_common(s: &mut TcpStream, expected_code: u16) -> u32 {
        let mut b = [0u8; 8];
        recv(s, &mut b, "op_common").await;
        let version = u16::from_be_bytes([b[0], b[1]]);
        let code = u16::from_be_bytes([b[2], b[3]]);
        assert_eq!(
            version, USBIP_VERSION,
            "usbip-win2 fails with USBIP_ERROR_VERSION unless op_common.version is exactly \
             0x0111 (recv_op_common); the server sent {b:02x?}"
        );
        assert_eq!(
            code, expected_code,
            "usbip-win2 fails with USBIP_ERROR_PROTOCOL: code {code:#06x}, expected {expected_code:#06x}"
        );
        be32(&b, 4)
    }

    /// `usbip_usb_device` as the driver reads it.
    #[derive(Debug, Clone)]
    pub struct UsbDevice {
        pub path: String,
        pub busid: [u8; BUS_ID_SIZE],
        pub busnum: u32,
        pub devnum: u32,
        pub speed: u32,
        pub id_vendor: u16,
        pub id_product: u16,
        pub num_interfaces: u8,
    }

    impl UsbDevice {
        fn parse(b: &[u8; USB_DEVICE_LEN]) -> UsbDevice {
            let path_end = b[..256].iter().position(|&c| c == 0).unwrap_or(256);
            UsbDevice {
                path: String::from_utf8_lossy(&b[..path_end]).into_owned(),
                busid: b[256..288].try_into().unwrap(),
                busnum: be32(b, 288),
                devnum: be32(b, 292),
                speed: be32(b, 296),
                id_vendor: u16::from_be_bytes([b[300], b[301]]),
                id_product: u16::from_be_bytes([b[302], b[303]]),
                num_interfaces: b[311],
            }
        }

        pub fn busid(&self) -> String {
            let end = self.busid.iter().position(|&c| c == 0).unwrap_or(32);
            String::from_utf8_lossy(&self.busid[..end]).into_owned()
        }
    }

    /// `strncmp(a, b, BUS_ID_SIZE) == 0`.
    fn strncmp_eq(a: &[u8; BUS_ID_SIZE], b: &[u8; BUS_ID_SIZE]) -> bool {
        for i in 0..BUS_ID_SIZE {
            if a[i] != b[i] {
                return false;
            }
            if a[i] == 0 {
                return true;
            }
        }
        true
    }

    /// remote.cpp `enum_exportable_devices`: each device with its
    /// interface records (class, subclass, protocol, padding).
    pub async fn devlist(addr: SocketAddr) -> Vec<(UsbDevice, Vec<[u8; 4]>)> {
        let mut s = connect(addr).await;
        send(&mut s, &op_common(OP_REQ_DEVLIST)).await;
        let status = recv_op_common(&mut s, OP_REP_DEVLIST).await;
        assert_eq!(status, ST_OK, "OP_REP_DEVLIST status");
        let mut n = [0u8; 4];
        recv(&mut s, &mut n, "op_devlist_reply").await;
        let ndev = u32::from_be_bytes(n);
        assert!(ndev <= 64, "implausible device count {ndev}");
        let mut devices = Vec::new();
        for _ in 0..ndev {
            let mut b = [0u8; USB_DEVICE_LEN];
            recv(&mut s, &mut b, "op_devlist_reply_extra").await;
            let d = UsbDevice::parse(&b);
            let mut interfaces = Vec::new();
            for _ in 0..d.num_interfaces {
                let mut i = [0u8; 4];
                recv(&mut s, &mut i, "usbip_usb_interface").await;
                interfaces.push(i);
            }
            devices.push((d, interfaces));
        }
        // The driver stops reading here; anything more would mean the
        // server's records and counts disagree.
        expect_eof(&mut s, "OP_REP_DEVLIST").await;
        devices
    }

    /// vhci_ioctl.cpp `import_remote_device`. `Err` is the OP status.
    pub async fn import(addr: SocketAddr, busid: &str) -> Result<Device, u32> {
        let mut s = connect(addr).await;
        let mut id = [0u8; BUS_ID_SIZE];
        id[..busid.len()].copy_from_slice(busid.as_bytes());
        let mut req = op_common(OP_REQ_IMPORT).to_vec();
        req.extend_from_slice(&id);
        send(&mut s, &req).await;
        let status = recv_op_common(&mut s, OP_REP_IMPORT).await;
        if status != ST_OK {
            return Err(status);
        }
        let mut b = [0u8; USB_DEVICE_LEN];
        recv(&mut s, &mut b, "op_import_reply").await;
        let udev = UsbDevice::parse(&b);
        assert!(
            strncmp_eq(&udev.busid, &id),
            "usbip-win2 refuses an import reply for busid {:?} when it asked for {busid:?} \
             (recv_rep_import)",
            udev.busid()
        );
        let devid = (udev.busnum as u16 as u32) << 16 | udev.devnum as u16 as u32;
        Ok(Device {
            stream: s,
            udev,
            devid,
            seqnum_counter: 0,
            pending: HashMap::new(),
        })
    }

    /// An endpoint descriptor, as the driver keeps it per UDE endpoint.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Endpoint {
        pub address: u8,
        pub attributes: u8,
        pub max_packet: u16,
        pub interval: u8,
    }

    /// The default control pipe.
    pub const EP0: Endpoint = Endpoint {
        address: 0,
        attributes: 0,
        max_packet: 64,
        interval: 0,
    };

    impl Endpoint {
        pub fn is_in(&self) -> bool {
            self.address & 0x80 != 0
        }
        /// bmAttributes transfer type: 0 control, 1 iso, 2 bulk, 3 interrupt.
        pub fn kind(&self) -> u8 {
            self.attributes & 3
        }
        /// Bytes per (micro)frame: wMaxPacketSize times its transactions.
        pub fn iso_packet_size(&self) -> u32 {
            u32::from(self.max_packet & 0x7ff) * (1 + u32::from((self.max_packet >> 11) & 3))
        }
    }

    #[derive(Debug, Clone)]
    pub struct Interface {
        pub number: u8,
        pub alt: u8,
        pub class: u8,
        pub endpoints: Vec<Endpoint>,
    }

    /// The interfaces and endpoints of a configuration descriptor.
    pub fn parse_configuration(b: &[u8]) -> Vec<Interface> {
        let mut out: Vec<Interface> = Vec::new();
        let mut at = 0;
        while at + 2 <= b.len() {
            let len = b[at] as usize;
            assert!(
                len >= 2 && at + len <= b.len(),
                "malformed configuration descriptor {b:02x?}"
            );
            let d = &b[at..at + len];
            match d[1] {
                4 if len >= 9 => out.push(Interface {
                    number: d[2],
                    alt: d[3],
                    class: d[5],
                    endpoints: Vec::new(),
                }),
                5 if len >= 7 => {
                    let ep = Endpoint {
                        address: d[2],
                        attributes: d[3],
                        max_packet: u16::from_le_bytes([d[4], d[5]]),
                        interval: d[6],
                    };
                    out.last_mut()
                        .expect("endpoint before any interface")
                        .endpoints
                        .push(ep);
                }
                _ => {}
            }
            at += len;
        }
        out
    }

    /// A setup packet; its multi-byte fields are little-endian.
    pub fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> [u8; 8] {
        let (v, i, l) = (
            value.to_le_bytes(),
            index.to_le_bytes(),
            length.to_le_bytes(),
        );
        [request_type, request, v[0], v[1], i[0], i[1], l[0], l[1]]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct IsoDescriptor {
        pub offset: u32,
        pub length: u32,
        pub actual_length: u32,
        pub status: i32,
    }

    impl IsoDescriptor {
        fn parse(b: &[u8]) -> IsoDescriptor {
            IsoDescriptor {
                offset: be32(b, 0),
                length: be32(b, 4),
                actual_length: be32(b, 8),
                status: be32(b, 12) as i32,
            }
        }
    }

    /// A request the driver has sent and not completed (device_ctx::requests).
    struct Request {
        dir_in: bool,
        /// URB TransferBufferLength.
        length: u32,
        /// The packets of an isochronous URB, as submitted.
        iso: Option<Vec<IsoDescriptor>>,
    }

    /// What the driver made of a RET_SUBMIT.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Outcome {
        /// It completed a pending request; the transfer buffer as the URB
        /// sees it (isochronous IN packets moved back to their offsets).
        Completed(Vec<u8>),
        /// The driver failed the request with an error of its own (the
        /// connection stays up): why.
        Refused(String),
        /// No request with this seqnum was pending (it had been unlinked,
        /// and so completed): the payload was read and dropped.
        Drained,
    }

    #[derive(Debug, Clone)]
    pub struct RetSubmit {
        pub seqnum: u32,
        pub status: i32,
        pub actual_length: i32,
        pub start_frame: i32,
        /// As on the wire.
        pub number_of_packets: i32,
        pub error_count: i32,
        /// The IN payload as it came (packed for isochronous).
        pub payload: Vec<u8>,
        pub iso: Vec<IsoDescriptor>,
        pub outcome: Outcome,
    }

    impl RetSubmit {
        /// The URB's buffer; panics unless the driver completed a pending
        /// request with this reply and the transfer succeeded.
        pub fn ok(&self) -> &[u8] {
            assert_eq!(self.status, 0, "URB status of {self:?}");
            self.buffer()
        }

        /// The URB's buffer whatever its status; panics unless the driver
        /// completed a pending request with this reply.
        pub fn buffer(&self) -> &[u8] {
            match &self.outcome {
                Outcome::Completed(b) => b,
                other => panic!("RET_SUBMIT {:#010x}: {other:?}", self.seqnum),
            }
        }
    }

    #[derive(Debug, Clone)]
    pub enum Ret {
        Submit(RetSubmit),
        Unlink { seqnum: u32, status: i32 },
    }

    /// An imported device: the socket, the header values and the pending
    /// requests of the driver's device_ctx.
    pub struct Device {
        stream: TcpStream,
        pub udev: UsbDevice,
        pub devid: u32,
        /// device_ctx::seqnum, the counter behind every seqnum.
        pub seqnum_counter: u32,
        pending: HashMap<u32, Request>,
    }

    impl Device {
        /// context.cpp `next_seqnum`: the counter, incremented, shifted
        /// left once, the direction in bit 0; 0 is skipped on wrap-around.
        pub fn next_seqnum(&mut self, dir_in: bool) -> u32 {
            loop {
                self.seqnum_counter = self.seqnum_counter.wrapping_add(1);
                let num = self.seqnum_counter << 1;
                if num != 0 {
                    return num | u32::from(dir_in);
                }
            }
        }

        /// proto.cpp `set_cmd_submit_usbip_header`.
        fn cmd_submit(&mut self, ep: &Endpoint, dir_in: bool, flags: u32, length: u32) -> [u8; 48] {
            let seqnum = self.next_seqnum(dir_in);
            let mut h = [0u8; HEADER_LEN];
            put32(&mut h, 0, CMD_SUBMIT);
            put32(&mut h, 4, seqnum);
            put32(&mut h, 8, self.devid);
            put32(&mut h, 12, u32::from(dir_in));
            put32(&mut h, 16, u32::from(ep.address & 0x0f));
            put32(&mut h, 20, flags);
            put32(&mut h, 24, length);
            put32(&mut h, 28, 0);
            put32(&mut h, 32, NUMBER_OF_PACKETS_NON_ISOCH as u32);
            put32(&mut h, 36, u32::from(ep.interval));
            h
        }

        async fn send_submit(&mut self, frame: Vec<u8>, request: Request) -> u32 {
            let seqnum = be32(&frame, 4);
            // send(): append_request before the bytes go out.
            self.pending.insert(seqnum, request);
            send(&mut self.stream, &frame).await;
            seqnum
        }

        /// device_ioctl.cpp `control_transfer` (and `send_ep0_out` when
        /// `setup` is OUT with no data). Direction from the setup packet,
        /// TransferBufferLength equal to wLength, short reads allowed as
        /// the hub and class drivers ask.
        pub async fn submit_control(&mut self, setup: [u8; 8], out: &[u8]) -> u32 {
            let dir_in = setup[0] & 0x80 != 0;
            let length = u32::from(u16::from_le_bytes([setup[6], setup[7]]));
            assert!(
                dir_in || out.len() as u32 == length,
                "OUT data must be wLength bytes"
            );
            let mut frame = self.cmd_submit(&EP0, dir_in, 0, length).to_vec();
            frame[40..48].copy_from_slice(&setup);
            if !dir_in {
                frame.extend_from_slice(out);
            }
            self.send_submit(
                frame,
                Request {
                    dir_in,
                    length,
                    iso: None,
                },
            )
            .await
        }

        /// device_ioctl.cpp `bulk_or_interrupt_transfer`. Without
        /// `short_ok` (USBD_SHORT_TRANSFER_OK) an IN carries URB_SHORT_NOT_OK.
        pub async fn submit_bulk_or_interrupt(
            &mut self,
            ep: &Endpoint,
            length: u32,
            out: &[u8],
            short_ok: bool,
        ) -> u32 {
            assert!(
                ep.kind() == 2 || ep.kind() == 3,
                "{ep:?} is not bulk or interrupt"
            );
            let dir_in = ep.is_in();
            let flags = if dir_in && !short_ok {
                URB_SHORT_NOT_OK
            } else {
                0
            };
            let mut frame = self.cmd_submit(ep, dir_in, flags, length).to_vec();
            if !dir_in {
                assert_eq!(out.len() as u32, length);
                frame.extend_from_slice(out);
            }
            self.send_submit(
                frame,
                Request {
                    dir_in,
                    length,
                    iso: None,
                },
            )
            .await
        }

        /// device_ioctl.cpp `isoch_transfer`: URB_ISO_ASAP, the packet
        /// count, and descriptors `repack`ed from the packets' offsets (each
        /// packet runs to the next one's offset, the last to the end).
        pub async fn submit_isoch(
            &mut self,
            ep: &Endpoint,
            offsets: &[u32],
            length: u32,
            out: &[u8],
        ) -> u32 {
            assert_eq!(ep.kind(), 1, "{ep:?} is not isochronous");
            assert!(offsets.len() <= MAX_ISO_PACKETS);
            let dir_in = ep.is_in();
            let iso: Vec<IsoDescriptor> = offsets
                .iter()
                .enumerate()
                .map(|(i, &offset)| {
                    let next = offsets.get(i + 1).copied().unwrap_or(length);
                    assert!(next >= offset && next <= length);
                    IsoDescriptor {
                        offset,
                        length: next - offset,
                        actual_length: 0,
                        status: 0,
                    }
                })
                .collect();
            let mut frame = self.cmd_submit(ep, dir_in, URB_ISO_ASAP, length).to_vec();
            put32(&mut frame, 32, offsets.len() as u32);
            if !dir_in {
                assert_eq!(out.len() as u32, length);
                frame.extend_from_slice(out);
            }
            for d in &iso {
                for v in [d.offset, d.length, d.actual_length, d.status as u32] {
                    frame.extend_from_slice(&v.to_be_bytes());
                }
            }
            self.send_submit(
                frame,
                Request {
                    dir_in,
                    length,
                    iso: Some(iso),
                },
            )
            .await
        }

        /// device_ioctl.cpp `send_cmd_unlink_and_complete`: CMD_UNLINK
        /// (direction OUT, ep 0), and the request is completed at once.
        pub async fn unlink(&mut self, target: u32) -> u32 {
            let seqnum = self.next_seqnum(false);
            let mut h = [0u8; HEADER_LEN];
            put32(&mut h, 0, CMD_UNLINK);
            put32(&mut h, 4, seqnum);
            put32(&mut h, 8, self.devid);
            put32(&mut h, 12, 0);
            put32(&mut h, 16, 0);
            put32(&mut h, 20, target);
            send(&mut self.stream, &h).await;
            self.pending.remove(&target);
            seqnum
        }

        /// Waits until at least a header's worth of reply has arrived in
        /// the socket without reading it: the driver's state while a
        /// completion is on its way to it.
        pub async fn wait_reply_arrived(&mut self) {
            let mut b = [0u8; HEADER_LEN];
            for _ in 0..10_000 {
                match tokio::time::timeout(REPLY_TIMEOUT, self.stream.peek(&mut b)).await {
                    Err(_) => panic!("no reply within {REPLY_TIMEOUT:?}"),
                    Ok(Ok(0)) | Ok(Err(_)) => panic!("the server closed the connection"),
                    Ok(Ok(n)) if n >= HEADER_LEN => return,
                    // Part of a header: the rest is a segment behind.
                    Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            panic!("a reply header never arrived whole");
        }

        /// One turn of wsk_receive.cpp `recv_loop`: a header checked by
        /// `validate_header`, then the payload `get_payload_size` computes
        /// from it, then `ret_submit`. Panics where the driver drops the
        /// connection.
        pub async fn recv(&mut self) -> Ret {
            let mut h = [0u8; HEADER_LEN];
            recv(&mut self.stream, &mut h, "a USBIP_RET_* header").await;
            let command = be32(&h, 0);
            let seqnum = be32(&h, 4);
            let raw_np = be32(&h, 32) as i32;
            let np = match command {
                RET_SUBMIT if raw_np == NUMBER_OF_PACKETS_NON_ISOCH => 0,
                RET_SUBMIT => {
                    assert!(
                        (0..=MAX_ISO_PACKETS as i32).contains(&raw_np),
                        "usbip-win2 drops the connection: number_of_packets({raw_np}) is out of \
                         range (validate_header) in {h:02x?}"
                    );
                    raw_np as usize
                }
                RET_UNLINK => 0,
                other => panic!(
                    "usbip-win2 drops the connection: USBIP_RET_* expected, got command \
                     {other:#x} (validate_header)"
                ),
            };
            assert!(
                seqnum >> 1 != 0,
                "usbip-win2 drops the connection: invalid seqnum {seqnum} (validate_header)"
            );
            if command == RET_UNLINK {
                // ret_command: nothing to complete, the status is not read.
                return Ret::Unlink {
                    seqnum,
                    status: be32(&h, 20) as i32,
                };
            }
            // The direction field is "always zero in server response".
            let dir_in = seqnum & 1 == 1;
            let status = be32(&h, 20) as i32;
            let actual = be32(&h, 24) as i32;
            let request = self.pending.remove(&seqnum);
            assert!(
                !dir_in || actual >= 0,
                "usbip-win2 drops the connection: negative actual_length {actual} on an IN"
            );
            let data_len = if dir_in { actual as usize } else { 0 };
            let size = data_len + np * ISO_DESCRIPTOR_LEN;
            if let (Some(r), true) = (&request, size != 0) {
                // prepare_wsk_mdl, which fails the connection on error.
                let fits = actual >= 0 && actual as u32 <= r.length;
                if np != 0 {
                    assert!(
                        fits,
                        "usbip-win2 drops the connection: actual_length {actual} > \
                         TransferBufferLength {} (prepare_wsk_mdl)",
                        r.length
                    );
                } else {
                    assert!(
                        fits && dir_in,
                        "usbip-win2 drops the connection: {} (prepare_wsk_mdl)",
                        if fits {
                            "a non-isochronous OUT with a payload".to_string()
                        } else {
                            format!("actual_length {actual} > TransferBufferLength {}", r.length)
                        }
                    );
                }
            }
            let mut payload = vec![0u8; size];
            recv(&mut self.stream, &mut payload, "the RET_SUBMIT payload").await;
            let iso: Vec<IsoDescriptor> = payload[data_len..]
                .chunks_exact(ISO_DESCRIPTOR_LEN)
                .map(IsoDescriptor::parse)
                .collect();
            payload.truncate(data_len);
            let outcome = match request {
                None => Outcome::Drained,
                Some(r) => match ret_submit_urb(&r, actual, &payload, &iso) {
                    Ok(buf) => Outcome::Completed(buf),
                    Err(why) => Outcome::Refused(why),
                },
            };
            Ret::Submit(RetSubmit {
                seqnum,
                status,
                actual_length: actual,
                start_frame: be32(&h, 28) as i32,
                number_of_packets: raw_np,
                error_count: be32(&h, 36) as i32,
                payload,
                iso,
                outcome,
            })
        }

        /// The next reply, which must be the RET_SUBMIT for `seqnum`.
        pub async fn expect_submit(&mut self, seqnum: u32) -> RetSubmit {
            match self.recv().await {
                Ret::Submit(r) if r.seqnum == seqnum => r,
                other => panic!("expected RET_SUBMIT {seqnum:#010x}, got {other:?}"),
            }
        }

        /// The next reply, which must be the RET_UNLINK for `seqnum`; its status.
        pub async fn expect_unlink(&mut self, seqnum: u32) -> i32 {
            match self.recv().await {
                Ret::Unlink { seqnum: s, status } if s == seqnum => status,
                other => panic!("expected RET_UNLINK {seqnum:#010x}, got {other:?}"),
            }
        }

        pub async fn control(&mut self, setup: [u8; 8], out: &[u8]) -> RetSubmit {
            let seq = self.submit_control(setup, out).await;
            self.expect_submit(seq).await
        }

        pub async fn bulk_or_interrupt(
            &mut self,
            ep: &Endpoint,
            length: u32,
            out: &[u8],
            short_ok: bool,
        ) -> RetSubmit {
            let seq = self
                .submit_bulk_or_interrupt(ep, length, out, short_ok)
                .await;
            self.expect_submit(seq).await
        }

        /// What the hub driver asks of a new device, then the
        /// SELECT_CONFIGURATION the filter driver turns into
        /// SET_CONFIGURATION: the device and configuration descriptors
        /// and the interfaces.
        pub async fn configure(&mut self) -> ([u8; 18], Vec<Interface>) {
            let d = self.control(setup(0x80, 6, 0x0100, 0, 18), &[]).await;
            let device: [u8; 18] = d.ok().try_into().expect("an 18-byte device descriptor");
            let c = self.control(setup(0x80, 6, 0x0200, 0, 9), &[]).await;
            let head = c.ok().to_vec();
            assert_eq!(
                (head.len(), head[1]),
                (9, 2),
                "configuration header {head:02x?}"
            );
            let total = u16::from_le_bytes([head[2], head[3]]);
            let c = self.control(setup(0x80, 6, 0x0200, 0, total), &[]).await;
            let config = c.ok().to_vec();
            assert_eq!(config.len(), usize::from(total));
            let set = self
                .control(setup(0x00, 9, u16::from(config[5]), 0, 0), &[])
                .await;
            set.ok();
            (device, parse_configuration(&config))
        }
    }

    /// wsk_receive.cpp `ret_submit_urb`: the transfer buffer the URB ends
    /// with, or why the driver fails it.
    fn ret_submit_urb(
        r: &Request,
        actual: i32,
        payload: &[u8],
        iso: &[IsoDescriptor],
    ) -> Result<Vec<u8>, String> {
        let mut buffer = vec![0u8; r.length as usize];
        let n = payload.len().min(buffer.len());
        buffer[..n].copy_from_slice(&payload[..n]);
        let Some(submitted) = &r.iso else {
            if actual < 0 || actual as u32 > r.length {
                return Err(format!(
                    "actual_length {actual} > TransferBufferLength {} (assign)",
                    r.length
                ));
            }
            buffer.truncate(actual as usize);
            return Ok(buffer);
        };
        // isoch_transfer
        if iso.len() != submitted.len() {
            return Err(format!(
                "number_of_packets({}) != NumberOfPackets({}) (isoch_transfer)",
                iso.len(),
                submitted.len()
            ));
        }
        if actual < 0 || actual as u32 > r.length {
            return Err(format!(
                "actual_length {actual} > TransferBufferLength {}",
                r.length
            ));
        }
        // fill_isoc_data: the packets' data arrived back to back; each is
        // moved to its offset, last first.
        if !r.dir_in {
            return Ok(buffer);
        }
        let mut length = actual as u32;
        for i in (0..submitted.len()).rev() {
            let (sd, offset) = (iso[i], submitted[i].offset);
            if sd.actual_length == 0 {
                continue;
            }
            if sd.actual_length > sd.length {
                return Err(format!(
                    "packet {i}: actual_length({}) > length({})",
                    sd.actual_length, sd.length
                ));
            }
            if sd.offset != offset {
                return Err(format!(
                    "packet {i}: src.offset({}) != dst.Offset({offset})",
                    sd.offset
                ));
            }
            if length < sd.actual_length {
                return Err(format!(
                    "packet {i}: length({length}) < actual_length({})",
                    sd.actual_length
                ));
            }
            length -= sd.actual_length;
            if offset + sd.actual_length > r.length {
                return Err(format!(
                    "packet {i}: dst.Offset({offset}) + actual_length({}) > TransferBufferLength",
                    sd.actual_length
                ));
            }
            if offset < length {
                return Err(format!(
                    "packet {i}: dst.Offset({offset}) < length({length}): the data has gaps"
                ));
            }
            let (from, n) = (length as usize, sd.actual_length as usize);
            buffer.copy_within(from..from + n, offset as usize);
        }
        if length != 0 {
            return Err(format!(
                "SUM(actual_length) != actual_length, delta is {length}"
            ));
        }
        Ok(buffer)
    }
}

const DISK: &str = "1-1";
const KEYBOARD: &str = "1-2";
const SERIAL: &str = "1-3";
const TEST: &str = "1-4";

/// `usbipd --demo`'s devices, served in this process.
struct Demo {
    server: TestServer,
    keyboard: KeyboardHandle,
    _image: tempfile::TempPath,
}

async fn demo() -> Demo {
    let file = tempfile::Builder::new()
        .prefix("usbwire-win2-")
        .suffix(".img")
        .tempfile()
        .expect("temporary disk image");
    file.as_file().set_len(64 * 1024 * 1024).unwrap();
    let image = file.into_temp_path();
    let disk = MassStorage::open(
        &image,
        MscConfig {
            product: "usbwire demo disk".into(),
            ..Default::default()
        },
    )
    .expect("open the disk image");
    let (kbd, keyboard) = HidKeyboard::new();
    let serial = CdcAcm::new(AcmConfig::default()).expect("serial echo port");
    let devices = vec![
        EmulatedDevice::new(disk),
        EmulatedDevice::new(kbd),
        EmulatedDevice::new(serial),
        EmulatedDevice::new(TestDevice::new()),
    ];
    Demo {
        server: TestServer::start(devices, ServerConfig::default()).await,
        keyboard,
        _image: image,
    }
}

async fn import(addr: std::net::SocketAddr, busid: &str) -> win2::Device {
    match win2::import(addr, busid).await {
        Ok(d) => d,
        Err(st) => panic!("import of {busid} refused with status {st}"),
    }
}

/// The first endpoint of `kind` and direction in the first interface
/// setting that matches `iface`.
fn endpoint(
    ifaces: &[Interface],
    iface: impl Fn(&Interface) -> bool,
    kind: u8,
    dir_in: bool,
) -> Endpoint {
    ifaces
        .iter()
        .filter(|i| iface(i))
        .flat_map(|i| i.endpoints.iter())
        .find(|e| e.kind() == kind && e.is_in() == dir_in)
        .copied()
        .unwrap_or_else(|| panic!("no endpoint of type {kind} (IN: {dir_in}) in {ifaces:#?}"))
}

const BULK: u8 = 2;
const INTERRUPT: u8 = 3;
const ECONNRESET: i32 = -104;
const EPIPE: i32 = -32;
const EREMOTEIO: i32 = -121;

/// What the driver accepts in a non-isochronous RET_SUBMIT, stated here
/// as well as enforced by the model.
fn assert_non_iso_packets(r: &RetSubmit) {
    assert!(
        r.number_of_packets == -1 || (0..=1024).contains(&r.number_of_packets),
        "non-isochronous RET_SUBMIT with number_of_packets {}",
        r.number_of_packets
    );
    assert!(
        r.iso.is_empty(),
        "descriptors on a non-isochronous RET_SUBMIT: {r:?}"
    );
}

#[tokio::test]
async fn devlist_is_version_0111_and_frames_as_win2_reads_it() {
    let d = demo().await;
    let devices = win2::devlist(d.server.addr).await;
    let ids: Vec<String> = devices.iter().map(|(u, _)| u.busid()).collect();
    assert_eq!(ids, [DISK, KEYBOARD, SERIAL, TEST]);
    for (u, interfaces) in &devices {
        assert_eq!(usize::from(u.num_interfaces), interfaces.len());
        assert!(!interfaces.is_empty(), "{} lists no interface", u.busid());
        assert!(u.path.ends_with(&u.busid()), "path {:?}", u.path);
    }
    let (test, test_ifaces) = &devices[3];
    assert_eq!((test.id_vendor, test.id_product), (0x0525, 0xa4a0));
    assert_eq!(test_ifaces[0][0], 0xff, "vendor-specific class");
    assert_eq!(devices[0].1[0][0], 0x08, "mass storage class");
    assert_eq!(devices[1].1[0][0], 0x03, "HID class");
}

#[tokio::test]
async fn import_is_version_0111_and_echoes_the_busid() {
    let d = demo().await;
    let addr = d.server.addr;
    let mut imported = Vec::new();
    for busid in [DISK, KEYBOARD, SERIAL, TEST] {
        let dev = import(addr, busid).await;
        assert_eq!(dev.udev.busid(), busid);
        // to_udex_speed: low, full, high or super; anything else is guessed.
        assert!(
            (1..=6).contains(&dev.udev.speed),
            "speed {}",
            dev.udev.speed
        );
        assert_eq!(
            dev.devid,
            dev.udev.busnum << 16 | dev.udev.devnum,
            "devid as make_devid builds it"
        );
        imported.push(dev);
    }
    // Refusals come with the same version, so the driver reads the status
    // instead of failing with USBIP_ERROR_VERSION.
    assert_eq!(win2::import(addr, "9-9").await.err(), Some(win2::ST_NODEV));
    // All four are still imported.
    assert_eq!(
        win2::import(addr, TEST).await.err(),
        Some(win2::ST_DEV_BUSY)
    );
    drop(imported);
}

/// Everything the driver sends on the non-isochronous endpoints carries
/// number_of_packets -1; the test device is enumerated, configured and
/// driven through the requests the filter driver turns into control
/// transfers (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE(HALT)).
#[tokio::test]
async fn test_device_non_iso_submits_with_minus_one() {
    let d = demo().await;
    let mut dev = import(d.server.addr, TEST).await;
    let (device, ifaces) = dev.configure().await;
    assert_eq!(
        (
            u16::from_le_bytes([device[8], device[9]]),
            u16::from_le_bytes([device[10], device[11]])
        ),
        (0x0525, 0xa4a0)
    );
    // usbtest (and any host) takes the source and sink from the first
    // setting of interface 0.
    let first = |i: &Interface| i.number == 0 && i.alt == 0;
    let source = endpoint(&ifaces, first, BULK, true);
    let sink = endpoint(&ifaces, first, BULK, false);

    // Strings, and the MS OS descriptor string Windows asks every new
    // device for: data or a STALL, never a malformed reply.
    for index in [0u16, 1, 2, 3, 0xee] {
        let r = dev
            .control(setup(0x80, 6, 0x0300 | index, 0x0409, 255), &[])
            .await;
        assert_non_iso_packets(&r);
        assert!(r.status == 0 || r.status == EPIPE, "string {index}: {r:?}");
        if r.status == 0 {
            let s = r.buffer();
            assert!(
                s.len() >= 2 && s[1] == 3 && usize::from(s[0]) == s.len(),
                "string {index}: {s:02x?}"
            );
        }
    }
    let st = dev.control(setup(0x80, 0, 0, 0, 2), &[]).await;
    assert_non_iso_packets(&st);
    assert_eq!(st.ok().len(), 2);

    // A sink takes zeros whatever its pattern; the source fills the
    // buffer. 64 KiB takes the server's direct read of OUT payloads.
    for len in [4096u32, 65536] {
        let out = dev
            .bulk_or_interrupt(&sink, len, &vec![0; len as usize], true)
            .await;
        assert_non_iso_packets(&out);
        assert_eq!((out.status, out.actual_length as u32), (0, len));
        assert!(out.payload.is_empty(), "no data comes back for an OUT");
        let r = dev.bulk_or_interrupt(&source, len, &[], false).await;
        assert_non_iso_packets(&r);
        assert_eq!(r.ok().len() as u32, len);
    }

    // SELECT_INTERFACE, SYNC_RESET_PIPE_AND_CLEAR_STALL, and a driver
    // being disabled and enabled again (SET_CONFIGURATION 0, then 1).
    for s in [
        setup(0x01, 11, 0, 0, 0),
        setup(0x02, 1, 0, u16::from(source.address), 0),
        setup(0x02, 1, 0, u16::from(sink.address), 0),
        setup(0x00, 9, 0, 0, 0),
        setup(0x00, 9, 1, 0, 0),
    ] {
        let r = dev.control(s, &[]).await;
        assert_non_iso_packets(&r);
        assert_eq!(r.status, 0, "{s:02x?}: {r:?}");
    }
    let r = dev.bulk_or_interrupt(&source, 512, &[], true).await;
    assert_eq!(r.ok().len(), 512);
}

/// One Bulk-Only Transport command: CBW, data stage (IN of `data_in`
/// bytes, or `data_out`), CSW, which must report success. The data read.
async fn bot_command(
    dev: &mut win2::Device,
    (bulk_in, bulk_out): (Endpoint, Endpoint),
    tag: u32,
    cdb: &[u8],
    data_in: u32,
    data_out: &[u8],
) -> Vec<u8> {
    let len = if data_out.is_empty() {
        data_in
    } else {
        data_out.len() as u32
    };
    let mut cbw = Vec::with_capacity(31);
    cbw.extend_from_slice(b"USBC");
    cbw.extend_from_slice(&tag.to_le_bytes());
    cbw.extend_from_slice(&len.to_le_bytes());
    cbw.push(if data_out.is_empty() { 0x80 } else { 0 });
    cbw.push(0);
    cbw.push(cdb.len() as u8);
    cbw.extend_from_slice(cdb);
    cbw.resize(31, 0);
    let r = dev.bulk_or_interrupt(&bulk_out, 31, &cbw, true).await;
    assert_non_iso_packets(&r);
    assert_eq!((r.status, r.actual_length), (0, 31));
    let mut data = Vec::new();
    if !data_out.is_empty() {
        let r = dev.bulk_or_interrupt(&bulk_out, len, data_out, true).await;
        assert_non_iso_packets(&r);
        assert_eq!((r.status, r.actual_length as u32), (0, len));
    } else if data_in > 0 {
        let r = dev.bulk_or_interrupt(&bulk_in, data_in, &[], true).await;
        assert_non_iso_packets(&r);
        data = r.ok().to_vec();
    }
    let csw = dev.bulk_or_interrupt(&bulk_in, 13, &[], true).await;
    assert_non_iso_packets(&csw);
    let csw = csw.ok().to_vec();
    assert_eq!(&csw[..4], b"USBS");
    assert_eq!(csw[4..8], tag.to_le_bytes(), "CSW tag");
    assert_eq!(csw[12], 0, "CSW status of CDB {cdb:02x?}");
    data
}

/// Bulk-Only Transport as Windows' usbstor drives it: GET_MAX_LUN, then
/// CBW, data and CSW on the endpoints of the disk's descriptors.
#[tokio::test]
async fn disk_non_iso_submits_with_minus_one() {
    let d = demo().await;
    let mut dev = import(d.server.addr, DISK).await;
    let (_, ifaces) = dev.configure().await;
    let storage = |i: &Interface| i.class == 0x08;
    let bulk_in = endpoint(&ifaces, storage, BULK, true);
    let bulk_out = endpoint(&ifaces, storage, BULK, false);
    let iface = ifaces.iter().find(|i| storage(i)).unwrap().number;

    let lun = dev
        .control(setup(0xa1, 0xfe, 0, u16::from(iface), 1), &[])
        .await;
    assert_non_iso_packets(&lun);
    assert_eq!(lun.ok(), [0]);

    let eps = (bulk_in, bulk_out);
    let inquiry = bot_command(&mut dev, eps, 1, &[0x12, 0, 0, 0, 36, 0], 36, &[]).await;
    assert_eq!(inquiry.len(), 36);
    assert_eq!(inquiry[0] & 0x1f, 0, "direct-access block device");
    // WRITE(10) and READ(10) at LBA 16: 8 blocks, and the 64 KiB usbstor
    // moves at once, which the server reads straight into its URB.
    let mut tag = 1;
    for blocks in [8u16, 128] {
        let len = u32::from(blocks) * 512;
        let data: Vec<u8> = (0..len)
            .map(|i| (i * 13 + u32::from(blocks)) as u8)
            .collect();
        let n = blocks.to_be_bytes();
        tag += 1;
        let write = [0x2a, 0, 0, 0, 0, 16, 0, n[0], n[1], 0];
        bot_command(&mut dev, eps, tag, &write, 0, &data).await;
        tag += 1;
        let read = [0x28, 0, 0, 0, 0, 16, 0, n[0], n[1], 0];
        let back = bot_command(&mut dev, eps, tag, &read, len, &[]).await;
        assert!(
            back == data,
            "{blocks} blocks read back differ from those written"
        );
    }
}

/// The CDC-ACM echo port: class requests, then bulk OUT and its echo on
/// bulk IN; a read without USBD_SHORT_TRANSFER_OK carries URB_SHORT_NOT_OK
/// and a short one ends with -EREMOTEIO and its data.
#[tokio::test]
async fn serial_non_iso_submits_with_minus_one() {
    let d = demo().await;
    let mut dev = import(d.server.addr, SERIAL).await;
    let (_, ifaces) = dev.configure().await;
    let data_iface = |i: &Interface| i.class == 0x0a;
    let bulk_in = endpoint(&ifaces, data_iface, BULK, true);
    let bulk_out = endpoint(&ifaces, data_iface, BULK, false);

    let coding = [0x80, 0x25, 0, 0, 0, 0, 8]; // 9600 8N1
    for (s, data) in [
        (setup(0x21, 0x20, 0, 0, 7), &coding[..]),
        (setup(0x21, 0x22, 3, 0, 0), &[][..]),
    ] {
        let r = dev.control(s, data).await;
        assert_non_iso_packets(&r);
        assert_eq!(r.status, 0, "{s:02x?}");
    }
    let msg = b"usbip-win2 says hello";
    let n = msg.len() as u32;
    let w = dev.bulk_or_interrupt(&bulk_out, n, msg, true).await;
    assert_eq!((w.status, w.actual_length as u32), (0, n));
    let r = dev.bulk_or_interrupt(&bulk_in, 512, &[], true).await;
    assert_non_iso_packets(&r);
    assert_eq!(r.ok(), msg);

    dev.bulk_or_interrupt(&bulk_out, n, msg, true).await.ok();
    let r = dev.bulk_or_interrupt(&bulk_in, 512, &[], false).await;
    assert_non_iso_packets(&r);
    assert_eq!(r.status, EREMOTEIO, "a short read with URB_SHORT_NOT_OK");
    assert_eq!(r.buffer(), msg, "the data comes with the error");
}

/// HID as Windows' hidusb drives it: SET_IDLE, the report descriptor,
/// then an interrupt IN that completes when a key is pressed.
#[tokio::test]
async fn keyboard_non_iso_submits_with_minus_one() {
    let d = demo().await;
    let mut dev = import(d.server.addr, KEYBOARD).await;
    let (_, ifaces) = dev.configure().await;
    let hid = |i: &Interface| i.class == 0x03;
    let int_in = endpoint(&ifaces, hid, INTERRUPT, true);
    let iface = u16::from(ifaces.iter().find(|i| hid(i)).unwrap().number);

    let idle = dev.control(setup(0x21, 0x0a, 0, iface, 0), &[]).await;
    assert_non_iso_packets(&idle);
    assert_eq!(idle.status, 0);
    let report = dev.control(setup(0x81, 6, 0x2200, iface, 255), &[]).await;
    assert_non_iso_packets(&report);
    assert!(!report.ok().is_empty(), "a report descriptor");

    let seq = dev.submit_bulk_or_interrupt(&int_in, 8, &[], true).await;
    d.keyboard.press(0, &[0x04]).unwrap();
    let r = dev.expect_submit(seq).await;
    assert_non_iso_packets(&r);
    assert_eq!(r.ok(), [0, 0, 0x04, 0, 0, 0, 0, 0]);
}

/// seqnums carry the direction in bit 0 and, from a counter that wraps,
/// bit 31 set and clear: every reply comes back with its command's seqnum
/// exactly, or the driver would frame it wrongly or find no request.
#[tokio::test]
async fn seqnums_with_the_direction_bit_are_echoed_verbatim() {
    let d = demo().await;
    let mut dev = import(d.server.addr, TEST).await;
    let (_, ifaces) = dev.configure().await;
    let first = |i: &Interface| i.number == 0 && i.alt == 0;
    let source = endpoint(&ifaces, first, BULK, true);
    let sink = endpoint(&ifaces, first, BULK, false);

    // Twelve increments before the counter's shifted value wraps to 0.
    dev.seqnum_counter = 0x7fff_fff4;
    let mut sent = Vec::new();
    for i in 0..24 {
        let seq = match i % 4 {
            0 => dev.submit_bulk_or_interrupt(&source, 512, &[], true).await,
            1 => {
                dev.submit_bulk_or_interrupt(&sink, 512, &[0; 512], true)
                    .await
            }
            2 => dev.submit_control(setup(0x80, 0, 0, 0, 2), &[]).await,
            _ => {
                dev.submit_control(setup(0x02, 1, 0, u16::from(sink.address), 0), &[])
                    .await
            }
        };
        sent.push(seq);
    }
    assert!(sent.iter().any(|s| s & 0x8000_0000 != 0) && sent.iter().any(|s| s & 0x8000_0000 == 0));
    assert!(sent.iter().any(|s| s & 1 == 1) && sent.iter().any(|s| s & 1 == 0));
    assert!(
        sent.contains(&2) || sent.contains(&3),
        "the counter wrapped past 0: {sent:x?}"
    );
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        match dev.recv().await {
            Ret::Submit(r) => {
                assert_non_iso_packets(&r);
                r.ok();
                got.push(r.seqnum);
            }
            other => panic!("{other:?}"),
        }
    }
    got.sort_unstable();
    let mut want = sent.clone();
    want.sort_unstable();
    assert_eq!(got, want);

    // An unlink's own seqnum (OUT: bit 0 clear) comes back in RET_UNLINK,
    // for completed URBs from before and after the wrap alike.
    for done in [sent[0], sent[20]] {
        let u = dev.unlink(done).await;
        assert_eq!(u & 1, 0);
        assert_eq!(dev.expect_unlink(u).await, 0, "URB {done:#x} had completed");
    }
}

/// The driver completes an unlinked URB at once and may submit the next
/// one on the same endpoint right away: the server must answer the unlink
/// with -ECONNRESET, never send that URB's RET_SUBMIT, and give the data
/// that comes later to the new URB.
#[tokio::test]
async fn unlink_of_a_pending_urb_is_econnreset_and_its_data_goes_to_the_next() {
    let d = demo().await;
    let mut dev = import(d.server.addr, SERIAL).await;
    let (_, ifaces) = dev.configure().await;
    let data_iface = |i: &Interface| i.class == 0x0a;
    let bulk_in = endpoint(&ifaces, data_iface, BULK, true);
    let bulk_out = endpoint(&ifaces, data_iface, BULK, false);

    // Nothing to echo: this read stays pending.
    let cancelled = dev.submit_bulk_or_interrupt(&bulk_in, 512, &[], true).await;
    let unlink = dev.unlink(cancelled).await;
    let next = dev.submit_bulk_or_interrupt(&bulk_in, 512, &[], true).await;
    let msg = b"after the unlink";
    let write = dev
        .submit_bulk_or_interrupt(&bulk_out, msg.len() as u32, msg, true)
        .await;
    let mut unlink_status = None;
    let mut read = None;
    for _ in 0..3 {
        match dev.recv().await {
            Ret::Unlink { seqnum, status } if seqnum == unlink => {
                assert!(read.is_none(), "RET_UNLINK came after the data was read");
                unlink_status = Some(status);
            }
            Ret::Submit(r) if r.seqnum == write => assert_eq!(r.status, 0),
            Ret::Submit(r) if r.seqnum == next => read = Some(r),
            other => panic!("unexpected reply {other:?} (unlinked URB {cancelled:#x})"),
        }
    }
    assert_eq!(unlink_status, Some(ECONNRESET));
    assert_eq!(read.expect("the new read").ok(), msg);
    // Everything queued before this reply has been read: no stray
    // RET_SUBMIT for the unlinked URB is on its way.
    let st = dev.control(setup(0x80, 0, 0, 0, 2), &[]).await;
    assert_eq!(st.ok().len(), 2);
}

/// The same on an interrupt IN: the keyboard with no key pressed.
#[tokio::test]
async fn unlink_of_a_pending_interrupt_in_is_econnreset() {
    let d = demo().await;
    let mut dev = import(d.server.addr, KEYBOARD).await;
    let (_, ifaces) = dev.configure().await;
    let int_in = endpoint(&ifaces, |i| i.class == 0x03, INTERRUPT, true);

    let cancelled = dev.submit_bulk_or_interrupt(&int_in, 8, &[], true).await;
    let unlink = dev.unlink(cancelled).await;
    assert_eq!(dev.expect_unlink(unlink).await, ECONNRESET);
    let next = dev.submit_bulk_or_interrupt(&int_in, 8, &[], true).await;
    d.keyboard.press(0x02, &[0x05]).unwrap();
    let r = dev.expect_submit(next).await;
    assert_eq!(r.ok(), [0x02, 0, 0x05, 0, 0, 0, 0, 0]);
}

/// An endpoint purge (a driver stopping, a detach): every request pending
/// on the endpoint is unlinked back to back, the one the device is
/// working on and those queued behind it.
#[tokio::test]
async fn endpoint_purge_unlinks_every_pending_urb() {
    let d = demo().await;
    let mut dev = import(d.server.addr, SERIAL).await;
    let (_, ifaces) = dev.configure().await;
    let data_iface = |i: &Interface| i.class == 0x0a;
    let bulk_in = endpoint(&ifaces, data_iface, BULK, true);
    let bulk_out = endpoint(&ifaces, data_iface, BULK, false);

    let mut reads = Vec::new();
    for _ in 0..4 {
        reads.push(dev.submit_bulk_or_interrupt(&bulk_in, 512, &[], true).await);
    }
    let mut unlinks = Vec::new();
    for &r in &reads {
        unlinks.push(dev.unlink(r).await);
    }
    for u in unlinks {
        assert_eq!(dev.expect_unlink(u).await, ECONNRESET);
    }
    let msg = b"fresh";
    let w = dev.bulk_or_interrupt(&bulk_out, 5, msg, true).await;
    assert_eq!(w.status, 0);
    let r = dev.bulk_or_interrupt(&bulk_in, 512, &[], true).await;
    assert_eq!(r.ok(), msg, "no purged read took the data");
}

/// The driver's unlink races the completion: the RET_SUBMIT is already in
/// its socket when it cancels. The server, which completed the URB first,
/// answers the unlink with 0 after the RET_SUBMIT; the driver drops that
/// RET_SUBMIT (the request is gone) and reads on in step.
#[tokio::test]
async fn unlink_of_a_completed_urb_is_zero_after_its_ret_submit() {
    let d = demo().await;
    let mut dev = import(d.server.addr, TEST).await;
    let (_, ifaces) = dev.configure().await;
    let first = |i: &Interface| i.number == 0 && i.alt == 0;
    let source = endpoint(&ifaces, first, BULK, true);
    let sink = endpoint(&ifaces, first, BULK, false);

    for (ep, out) in [(source, &[][..]), (sink, &[0u8; 1000][..])] {
        let seq = dev.submit_bulk_or_interrupt(&ep, 1000, out, true).await;
        dev.wait_reply_arrived().await;
        let unlink = dev.unlink(seq).await;
        match dev.recv().await {
            Ret::Submit(r) => {
                assert_eq!(r.seqnum, seq);
                assert_eq!(r.outcome, win2::Outcome::Drained);
                assert_eq!((r.status, r.actual_length), (0, 1000));
            }
            other => panic!("expected the RET_SUBMIT first, got {other:?}"),
        }
        assert_eq!(dev.expect_unlink(unlink).await, 0);
    }
    // In step: the next transfer's reply is read as its own.
    let r = dev.bulk_or_interrupt(&source, 64, &[], true).await;
    assert_eq!(r.ok().len(), 64);
}

/// The race as it comes out of one write: submit and unlink together.
/// Either outcome is allowed, but an -ECONNRESET unlink never has a
/// RET_SUBMIT, and a 0 unlink always follows it.
#[tokio::test]
async fn submit_and_unlink_together_are_answered_consistently() {
    let d = demo().await;
    let mut dev = import(d.server.addr, TEST).await;
    let (_, ifaces) = dev.configure().await;
    let source = endpoint(&ifaces, |i| i.number == 0 && i.alt == 0, BULK, true);
    for _ in 0..20 {
        let seq = dev.submit_bulk_or_interrupt(&source, 256, &[], true).await;
        let unlink = dev.unlink(seq).await;
        match dev.recv().await {
            Ret::Submit(r) => {
                assert_eq!((r.seqnum, r.status), (seq, 0));
                assert_eq!(dev.expect_unlink(unlink).await, 0);
            }
            Ret::Unlink { seqnum, status } => {
                assert_eq!((seqnum, status), (unlink, ECONNRESET));
            }
        }
    }
    let r = dev.bulk_or_interrupt(&source, 64, &[], true).await;
    assert_eq!(r.ok().len(), 64, "no stray RET_SUBMIT came before this one");
}

// ---------------------------------------------------------------------------
// Isochronous.
// ---------------------------------------------------------------------------

/// The interface setting that has an isochronous IN and OUT endpoint.
fn iso_setting(ifaces: &[Interface]) -> Option<(u8, u8, Endpoint, Endpoint)> {
    ifaces.iter().find_map(|i| {
        let find = |dir_in: bool| {
            i.endpoints
                .iter()
                .find(|e| e.kind() == 1 && e.is_in() == dir_in)
                .copied()
        };
        Some((i.number, i.alt, find(true)?, find(false)?))
    })
}

/// An isochronous OUT and IN of `packets` packets each as the driver
/// submits them; checks what the driver requires of the replies and
/// returns them (OUT, IN) with the offsets used.
async fn iso_round_trip(
    dev: &mut win2::Device,
    ep_in: &Endpoint,
    ep_out: &Endpoint,
    packets: usize,
    out_data: impl Fn(usize) -> u8,
) -> (RetSubmit, RetSubmit, Vec<u32>) {
    let mut done = Vec::new();
    for ep in [ep_out, ep_in] {
        let size = ep.iso_packet_size();
        let offsets: Vec<u32> = (0..packets as u32).map(|i| i * size).collect();
        let length = size * packets as u32;
        let data: Vec<u8> = if ep.is_in() {
            Vec::new()
        } else {
            (0..length as usize).map(&out_data).collect()
        };
        let seq = dev.submit_isoch(ep, &offsets, length, &data).await;
        let r = dev.expect_submit(seq).await;
        assert_eq!(
            r.number_of_packets, packets as i32,
            "an isochronous RET_SUBMIT carries the submitted count"
        );
        assert_eq!(r.iso.len(), packets);
        let sum: u64 = r.iso.iter().map(|p| u64::from(p.actual_length)).sum();
        assert_eq!(
            sum, r.actual_length as u64,
            "packets' actual lengths add up to actual_length"
        );
        for (i, p) in r.iso.iter().enumerate() {
            assert_eq!(
                (p.offset, p.length),
                (offsets[i], size),
                "packet {i} as submitted"
            );
            assert!(p.actual_length <= p.length);
        }
        assert_eq!(
            r.error_count as usize,
            r.iso.iter().filter(|p| p.status != 0).count(),
            "error_count counts the failed packets"
        );
        assert_eq!(r.status, 0, "{r:?}");
        if ep.is_in() {
            assert_eq!(
                r.payload.len(),
                r.actual_length as usize,
                "IN data packed back to back"
            );
        } else {
            assert!(r.payload.is_empty(), "no data comes back for an OUT");
        }
        assert!(
            matches!(r.outcome, win2::Outcome::Completed(_)),
            "usbip-win2 fails the isochronous URB: {:?}",
            r.outcome
        );
        done.push((r, offsets));
    }
    let (r_in, offsets) = done.pop().unwrap();
    let (r_out, _) = done.pop().unwrap();
    (r_out, r_in, offsets)
}

/// A high-speed device with f_sourcesink's layout of isochronous
/// endpoints (interface 0: no endpoints in setting 0, ISO IN 0x81 and ISO
/// OUT 0x01 in setting 1). Its isochronous URBs complete the way a host
/// controller reports them, per packet; everything else is the chapter-9
/// core's.
mod iso_device {
    use super::*;

    pub const PACKET: u16 = 1024;

    struct IsoFunction(Descriptors);

    impl Function for IsoFunction {
        fn descriptors(&self) -> &Descriptors {
            &self.0
        }
        fn transfer_in(
            &mut self,
            _: u8,
            _: &mut [u8],
            _: &mut Context<'_>,
        ) -> Poll<Result<usize, Errno>> {
            Poll::Ready(Err(Errno::EPIPE))
        }
        fn transfer_out(
            &mut self,
            _: u8,
            _: &[u8],
            _: &mut Context<'_>,
        ) -> Poll<Result<usize, Errno>> {
            Poll::Ready(Err(Errno::EPIPE))
        }
    }

    /// The IN pattern: byte `k` of packet `i`.
    pub fn in_byte(i: usize, k: usize) -> u8 {
        (i * 7 + k) as u8
    }

    /// How much of packet `i` (of `length` bytes) the source fills, and its
    /// status: full, half, missed (-EXDEV: no transaction in its
    /// microframe), one short of full.
    pub fn in_packet(i: usize, length: u32) -> (u32, i32) {
        match i % 4 {
            0 => (length, 0),
            1 => (length / 2, 0),
            2 => (0, Errno::EXDEV.to_status()),
            _ => (length - 1, 0),
        }
    }

    pub const START_FRAME: i32 = 0x1234;

    pub struct IsoRig {
        inner: EmulatedBackend,
        /// Every isochronous OUT packet the device received.
        pub received: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl IsoRig {
        pub fn new() -> IsoRig {
            let mut body = Vec::new();
            body.extend_from_slice(&descriptors::interface(0, 0, 0, 0xff, 0, 0, 0));
            body.extend_from_slice(&descriptors::interface(0, 1, 2, 0xff, 0, 0, 0));
            body.extend_from_slice(&descriptors::endpoint(
                0x81,
                TransferType::Isochronous,
                PACKET,
                4,
            ));
            body.extend_from_slice(&descriptors::endpoint(
                0x01,
                TransferType::Isochronous,
                PACKET,
                4,
            ));
            let d = Descriptors::new(
                Speed::High,
                DeviceDescriptor {
                    usb_version: 0x0200,
                    class: 0,
                    subclass: 0,
                    protocol: 0,
                    max_packet_size0: 64,
                    vendor_id: 0x1d6b,
                    product_id: 0x0104,
                    device_version: 0x0100,
                    manufacturer: Some("usbwire".into()),
                    product: Some("isochronous rig".into()),
                    serial: None,
                },
                0,
                100,
                &body,
                &[],
            );
            IsoRig {
                inner: EmulatedBackend::new(EmulatedDevice::new(IsoFunction(d))),
                received: Default::default(),
            }
        }
    }

    impl Backend for IsoRig {
        fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
            self.inner.device_info(busid, busnum, devnum)
        }
        fn transfer_type(&self, ep: u8) -> Option<TransferType> {
            self.inner.transfer_type(ep)
        }
        fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
            if urb.ep == 0
                || self.transfer_type(urb.ep_address()) != Some(TransferType::Isochronous)
            {
                return self.inner.poll_urb(urb, cx);
            }
            let dir_in = urb.ep_address() & 0x80 != 0;
            let mut at = 0usize;
            for (i, p) in urb.iso.iter_mut().enumerate() {
                let (o, l) = (p.offset as usize, p.length as usize);
                if dir_in {
                    let (n, status) = in_packet(i, p.length);
                    for k in 0..n as usize {
                        urb.buf[at + k] = in_byte(i, k);
                    }
                    at += n as usize;
                    p.actual_length = n;
                    p.status = status;
                } else {
                    self.received
                        .lock()
                        .unwrap()
                        .push(urb.buf[o..o + l].to_vec());
                    at += l;
                    p.actual_length = p.length;
                    p.status = 0;
                }
            }
            urb.start_frame = START_FRAME;
            Poll::Ready(Completion::Ran {
                actual: at,
                error: None,
            })
        }
        fn release(&mut self) {
            self.inner.release()
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
}

/// Isochronous URBs through the session: the RET_SUBMIT has the
/// submitted packet count (1, 8 and the maximum 1024), the submitted
/// offsets, IN data packed with actual lengths summing to actual_length,
/// so that the driver moves every packet back to its offset intact.
#[tokio::test]
async fn iso_ret_submit_has_the_submitted_count_and_lengths_summing_to_actual_length() {
    let rig = iso_device::IsoRig::new();
    let received = rig.received.clone();
    let s = TestServer::start_backends(vec![Box::new(rig)], ServerConfig::default()).await;
    let mut dev = import(s.addr, "1-1").await;
    let (_, ifaces) = dev.configure().await;
    let (iface, alt, ep_in, ep_out) = iso_setting(&ifaces).expect("an isochronous setting");
    dev.control(setup(0x01, 11, u16::from(alt), u16::from(iface), 0), &[])
        .await
        .ok();

    let size = ep_in.iso_packet_size();
    for packets in [1usize, 8, 1024] {
        received.lock().unwrap().clear();
        let out_byte = |k: usize| (k / 3) as u8;
        let (r_out, r_in, offsets) =
            iso_round_trip(&mut dev, &ep_in, &ep_out, packets, out_byte).await;
        assert_eq!(r_out.actual_length as u32, size * packets as u32);
        let got = received.lock().unwrap().clone();
        assert_eq!(got.len(), packets);
        for (i, p) in got.iter().enumerate() {
            let o = offsets[i] as usize;
            assert!(
                p.iter().enumerate().all(|(k, &b)| b == out_byte(o + k)),
                "OUT packet {i} reached the device from the wrong place"
            );
        }

        assert_eq!(r_in.start_frame, iso_device::START_FRAME);
        let buffer = r_in.buffer();
        for (i, p) in r_in.iso.iter().enumerate() {
            let (n, status) = iso_device::in_packet(i, size);
            assert_eq!((p.actual_length, p.status), (n, status), "IN packet {i}");
            let o = offsets[i] as usize;
            assert!(
                (0..n as usize).all(|k| buffer[o + k] == iso_device::in_byte(i, k)),
                "IN packet {i}'s data is not where the driver puts it"
            );
        }
    }
}

/// The same against the demo test device's isochronous setting
/// (f_sourcesink's altsetting 1), found in its descriptors.
#[tokio::test]
async fn iso_rules_on_the_test_device() {
    let d = demo().await;
    let mut dev = import(d.server.addr, TEST).await;
    let (_, ifaces) = dev.configure().await;
    let (iface, alt, ep_in, ep_out) = iso_setting(&ifaces)
        .unwrap_or_else(|| panic!("the test device has no isochronous setting: {ifaces:#?}"));
    let r = dev
        .control(setup(0x01, 11, u16::from(alt), u16::from(iface), 0), &[])
        .await;
    assert_eq!(r.status, 0, "SET_INTERFACE({iface}, {alt})");
    // A sink takes zeros whatever its pattern.
    for packets in [1usize, 8, 64] {
        iso_round_trip(&mut dev, &ep_in, &ep_out, packets, |_| 0).await;
    }
}
