//! The server's URB-phase semantics over real TCP on loopback, with the
//! test device: imports, unlinks (including the vhci races), concurrency
//! across endpoints and reply ordering.

use std::time::Duration;

use usbwire_devices::testdev::{Pattern, TestDevice};
use usbwire_devices::EmulatedDevice;
use usbwire_proto::{Direction, Errno, OpReply, OpRequest, OpStatus, USBIP_VERSION};
use usbwire_server::ServerConfig;
use usbwire_tests::support::*;

const SOURCE_IN: u32 = 1; // 0x81
const SINK_OUT: u32 = 2; // 0x02
const INTR_IN: u32 = 5; // 0x85

async fn test_server(n: usize) -> TestServer {
    test_server_with(n, Pattern::Zeros).await
}

async fn test_server_with(n: usize, pattern: Pattern) -> TestServer {
    let devices = (0..n)
        .map(|_| EmulatedDevice::new(TestDevice::with_pattern(pattern)))
        .collect();
    TestServer::start(devices, ServerConfig::default()).await
}

async fn configured(addr: std::net::SocketAddr) -> RawPeer {
    let mut p = RawPeer::import(addr, "1-1").await;
    p.submit(set_configuration(1), &[]).await;
    match p.next().await {
        Reply::Submit(r, _) => assert_eq!((r.seqnum, r.status), (1, 0)),
        other => panic!("{other:?}"),
    }
    p
}

#[tokio::test]
async fn second_import_is_busy_until_the_first_connection_closes() {
    let s = test_server(1).await;
    let first = usbwire_client::import(s.addr, "1-1")
        .await
        .expect("first import");
    match usbwire_client::import(s.addr, "1-1").await {
        Err(usbwire_client::ClientError::ImportRefused { status, .. }) => {
            assert_eq!(status, OpStatus::DevBusy)
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a second import of an imported device succeeded"),
    }
    // An imported device is not offered in the device list.
    assert!(usbwire_client::list(s.addr).await.unwrap().is_empty());
    drop(first);
    // The server gives the device back a moment after the close; an
    // import in that moment waits for it rather than being refused.
    usbwire_client::import(s.addr, "1-1")
        .await
        .expect("import right after the first connection closed");
}

#[tokio::test]
async fn import_of_unknown_busid_is_nodev() {
    let s = test_server(1).await;
    match usbwire_client::import(s.addr, "9-9").await {
        Err(usbwire_client::ClientError::ImportRefused { status, .. }) => {
            assert_eq!(status, OpStatus::NoDev)
        }
        other => panic!(
            "expected ST_NODEV, got {:?}",
            other.map(|d| d.info().busid.clone())
        ),
    }
}

#[tokio::test]
async fn unlink_of_pending_interrupt_in_gets_econnreset_and_no_ret_submit() {
    let s = test_server(1).await;
    let mut p = configured(s.addr).await;
    p.submit(submit(2, INTR_IN, Direction::In, 64), &[]).await;
    assert!(
        p.quiet_for(Duration::from_millis(100)).await,
        "interrupt IN completed with no data"
    );
    p.unlink(3, 2).await;
    match p.next().await {
        Reply::Unlink(u) => {
            assert_eq!(u.seqnum, 3);
            assert_eq!(u.status, Errno::ECONNRESET.to_status());
        }
        other => panic!("expected RET_UNLINK, got {other:?}"),
    }
    // The next reply must be for the next URB, not a stray RET_SUBMIT(2).
    p.submit(submit(4, SOURCE_IN, Direction::In, 512), &[])
        .await;
    match p.next().await {
        Reply::Submit(r, data) => {
            assert_eq!(r.seqnum, 4);
            assert_eq!(data.len(), 512);
        }
        other => panic!("expected RET_SUBMIT(4), got {other:?}"),
    }
}

#[tokio::test]
async fn bulk_completes_while_an_interrupt_in_is_pending() {
    let s = test_server(1).await;
    let mut p = configured(s.addr).await;
    p.submit(submit(2, INTR_IN, Direction::In, 64), &[]).await;
    p.submit(submit(3, SINK_OUT, Direction::Out, 4096), &[0xa5; 4096])
        .await;
    p.submit(submit(4, SOURCE_IN, Direction::In, 4096), &[])
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        match p.next().await {
            Reply::Submit(r, data) => {
                assert_eq!(r.status, 0);
                got.push((r.seqnum, r.actual_length, data.len()));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, vec![(3, 4096, 0), (4, 4096, 4096)]);
    // The interrupt URB is still pending: unlinking it cancels it.
    p.unlink(5, 2).await;
    assert!(
        matches!(p.next().await, Reply::Unlink(u) if u.status == Errno::ECONNRESET.to_status())
    );
}

#[tokio::test]
async fn unlink_that_overtakes_its_submit_is_answered_and_the_submit_dropped() {
    let s = test_server(1).await;
    let mut p = configured(s.addr).await;
    // vhci can put CMD_UNLINK(→10) on the wire before CMD_SUBMIT(10).
    p.unlink(11, 10).await;
    match p.next().await {
        Reply::Unlink(u) => assert_eq!((u.seqnum, u.status), (11, Errno::ECONNRESET.to_status())),
        other => panic!("{other:?}"),
    }
    p.submit(submit(10, SOURCE_IN, Direction::In, 64), &[])
        .await;
    p.submit(submit(12, SOURCE_IN, Direction::In, 64), &[])
        .await;
    match p.next().await {
        Reply::Submit(r, _) => {
            assert_eq!(r.seqnum, 12, "the overtaken submit must never be answered")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unlink_of_a_completed_urb_is_status_zero_after_its_ret_submit() {
    let s = test_server(1).await;
    let mut p = configured(s.addr).await;
    p.submit(submit(2, SOURCE_IN, Direction::In, 64), &[]).await;
    p.unlink(3, 2).await;
    // Whatever the timing, RET_SUBMIT(2) precedes a RET_UNLINK with status 0,
    // and a -ECONNRESET unlink is never followed by RET_SUBMIT(2).
    match p.next().await {
        Reply::Submit(r, _) => {
            assert_eq!(r.seqnum, 2);
            match p.next().await {
                Reply::Unlink(u) => assert_eq!((u.seqnum, u.status), (3, 0)),
                other => panic!("{other:?}"),
            }
        }
        Reply::Unlink(u) => {
            assert_eq!(u.status, Errno::ECONNRESET.to_status());
            assert!(p.quiet_for(Duration::from_millis(100)).await);
        }
    }
}

#[tokio::test]
async fn many_urbs_in_flight_complete_in_order_per_endpoint() {
    let s = test_server_with(1, Pattern::Mod63).await;
    let mut p = configured(s.addr).await;
    for i in 0..100u32 {
        p.submit(submit(10 + i, SOURCE_IN, Direction::In, 1000 + i), &[])
            .await;
    }
    for i in 0..100u32 {
        match p.next().await {
            Reply::Submit(r, data) => {
                assert_eq!(r.seqnum, 10 + i);
                assert_eq!(data.len() as u32, 1000 + i);
                // The source pattern restarts at every transfer and packet.
                let bad = data
                    .iter()
                    .enumerate()
                    .position(|(k, b)| *b != ((k % 512) % 63) as u8);
                assert_eq!(bad, None, "seqnum {}", 10 + i);
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Large OUT payloads are read straight into their URB's buffer, small ones
/// through the read buffer; whatever the split of the stream, every
/// payload reaches the device whole and in order.
#[tokio::test]
async fn out_payloads_arrive_intact_however_the_stream_is_split() {
    const LOOP_OUT: u32 = 4; // 0x04
    const LOOP_IN: u32 = 3; // 0x83
    let s = test_server(1).await;
    let mut p = configured(s.addr).await;
    // Around the direct-read threshold (16 KiB), and small ones between.
    let sizes = [65536usize, 20000, 100, 16384, 16383, 48, 30000];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| (i * 7 + k * 31) as u8).collect())
        .collect();
    let mut stream = Vec::new();
    for (k, data) in payloads.iter().enumerate() {
        let cmd = submit(10 + k as u32, LOOP_OUT, Direction::Out, data.len() as u32);
        p.encode_submit(cmd, data, &mut stream);
    }
    // Splits that cut headers and payloads everywhere, with pauses so that
    // the server sees them as separate reads.
    let cuts = [1usize, 47, 48, 49, 700, 4096, 16385, 13, 60000, 2];
    let (mut at, mut i) = (0, 0);
    while at < stream.len() {
        let n = cuts[i % cuts.len()].min(stream.len() - at);
        p.send(&stream[at..at + n]).await;
        at += n;
        i += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (k, data) in payloads.iter().enumerate() {
        match p.next().await {
            Reply::Submit(r, _) => assert_eq!(
                (r.seqnum, r.status, r.actual_length as usize),
                (10 + k as u32, 0, data.len())
            ),
            other => panic!("{other:?}"),
        }
    }
    for (k, data) in payloads.iter().enumerate() {
        p.submit(submit(100 + k as u32, LOOP_IN, Direction::In, 65536), &[])
            .await;
        match p.next().await {
            Reply::Submit(r, got) => {
                assert_eq!((r.seqnum, r.status), (100 + k as u32, 0));
                assert!(got == *data, "payload {k} ({} bytes) differs", data.len());
            }
            other => panic!("{other:?}"),
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn devlist_lists_every_device_with_interfaces() {
    let s = test_server(3).await;
    let mut p = RawPeer::connect(s.addr).await;
    let mut out = Vec::new();
    OpRequest::Devlist {
        version: USBIP_VERSION,
    }
    .encode(&mut out);
    p.send(&out).await;
    match p.read_op().await {
        OpReply::Devlist { devices, .. } => {
            let ids: Vec<_> = devices.iter().map(|d| d.busid.to_string()).collect();
            assert_eq!(ids, ["1-1", "1-2", "1-3"]);
            assert_eq!(devices[0].id_vendor, 0x0525);
            // Gadget Zero's source/sink, then the loopback interface.
            assert_eq!(devices[0].interfaces.len(), 2);
            assert!(devices[0].interfaces.iter().all(|i| i.class == 0xff));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        p.closed().await,
        "the server closes after a device list, like the C usbipd"
    );
}

mod async_cancel {
    //! A backend whose URBs are in flight elsewhere (like a real device's
    //! in a host controller): cancelling takes time, and the URB may
    //! complete first. The reply order must still be right.

    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};

    use usbwire_devices::TransferType;
    use usbwire_proto::{DeviceInfo, Direction, Errno};
    use usbwire_server::{Backend, Completion, ServerConfig, Urb};
    use usbwire_tests::support::*;

    #[derive(Default)]
    struct State {
        cancel_requested: bool,
        waker: Option<Waker>,
    }

    /// Bulk IN 0x81 stays pending until cancelled; then it completes with
    /// `outcome`: its data (it finished first), an error after some data,
    /// or -ECONNRESET.
    struct InFlightElsewhere {
        outcome: Completion,
        state: Arc<Mutex<State>>,
    }

    impl Backend for InFlightElsewhere {
        fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
            test_device_info(busid, busnum, devnum, 2)
        }
        fn transfer_type(&self, ep: u8) -> Option<TransferType> {
            (ep == 0x81).then_some(TransferType::Bulk)
        }
        fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
            if urb.ep == 0 {
                return Poll::Ready(Ok(0).into());
            }
            let mut st = self.state.lock().unwrap();
            if st.cancel_requested {
                if let Completion::Ran { actual, .. } = self.outcome {
                    urb.buf[..actual].fill(0x5a);
                }
                return Poll::Ready(self.outcome);
            }
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        }
        fn cancel(&mut self, _urb: &mut Urb) -> bool {
            let mut st = self.state.lock().unwrap();
            st.cancel_requested = true;
            if let Some(w) = st.waker.take() {
                w.wake();
            }
            false
        }
        fn release(&mut self) {}
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    async fn scenario(outcome: Completion) -> Vec<Reply> {
        let backend = InFlightElsewhere {
            outcome,
            state: Default::default(),
        };
        let s = TestServer::start_backends(vec![Box::new(backend)], ServerConfig::default()).await;
        let mut p = RawPeer::import(s.addr, "1-1").await;
        p.submit(submit(1, 1, Direction::In, 64), &[]).await;
        p.unlink(2, 1).await;
        let first = p.next().await;
        let mut replies = vec![first.clone()];
        if matches!(first, Reply::Submit(..)) {
            replies.push(p.next().await);
        }
        assert!(
            p.quiet_for(std::time::Duration::from_millis(100)).await,
            "a stray reply followed"
        );
        replies
    }

    #[tokio::test]
    async fn completed_before_cancel_gets_ret_submit_then_ret_unlink_zero() {
        let r = scenario(Ok(64).into()).await;
        match &r[..] {
            [Reply::Submit(ret, data), Reply::Unlink(u)] => {
                assert_eq!((ret.seqnum, ret.status, data.len()), (1, 0, 64));
                assert_eq!((u.seqnum, u.status), (2, 0));
            }
            other => panic!("wrong replies or order: {other:?}"),
        }
    }

    #[tokio::test]
    async fn cancelled_in_time_gets_only_ret_unlink_econnreset() {
        let r = scenario(Completion::failed(Errno::ECONNRESET)).await;
        match &r[..] {
            [Reply::Unlink(u)] => {
                assert_eq!((u.seqnum, u.status), (2, Errno::ECONNRESET.to_status()))
            }
            other => panic!("wrong replies: {other:?}"),
        }
    }

    /// A device that stalls halfway through a transfer: the bytes that
    /// came go to the importer with the error, as usbip-host sends them.
    #[tokio::test]
    async fn failed_after_some_data_gets_the_data_with_the_error() {
        let r = scenario(Completion::Ran {
            actual: 20,
            error: Some(Errno::EPIPE),
        })
        .await;
        match &r[..] {
            [Reply::Submit(ret, data), Reply::Unlink(u)] => {
                assert_eq!(
                    (ret.seqnum, ret.status, ret.actual_length),
                    (1, Errno::EPIPE.to_status(), 20)
                );
                assert_eq!(&data[..], &[0x5a; 20][..]);
                assert_eq!((u.seqnum, u.status), (2, 0));
            }
            other => panic!("wrong replies or order: {other:?}"),
        }
    }
}

mod iso {
    //! Isochronous URBs through the session, against a backend that answers
    //! as a host controller does: per-packet lengths and statuses, IN data
    //! packed back to back (as usbip-host sends it).

    use std::task::{Context, Poll};
    use std::time::Duration;

    use usbwire_client::TransferRequest;
    use usbwire_devices::TransferType;
    use usbwire_proto::{DeviceInfo, Errno, IsoPacket};
    use usbwire_server::{Backend, Completion, ServerConfig, Urb};
    use usbwire_tests::support::{test_device_info, TestServer};

    /// ISO IN 0x83: packet i moves its length minus 40 × i bytes of value
    /// i + 1, and packet 1 fails with -EPROTO (a CRC error on the bus).
    struct IsoSource;

    impl Backend for IsoSource {
        fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
            test_device_info(busid, busnum, devnum, 4)
        }
        fn transfer_type(&self, ep: u8) -> Option<TransferType> {
            (ep == 0x83).then_some(TransferType::Isochronous)
        }
        fn poll_urb(&mut self, urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
            if urb.ep == 0 {
                return Poll::Ready(Ok(0).into());
            }
            let mut at = 0;
            for (i, p) in urb.iso.iter_mut().enumerate() {
                let n = p.length.saturating_sub(40 * i as u32) as usize;
                urb.buf[at..at + n].fill(i as u8 + 1);
                at += n;
                p.actual_length = n as u32;
                p.status = if i == 1 { Errno::EPROTO.to_status() } else { 0 };
            }
            urb.start_frame = 77;
            Poll::Ready(Completion::Ran {
                actual: at,
                error: None,
            })
        }
        fn release(&mut self) {}
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn packets_come_back_with_their_lengths_statuses_data_and_error_count() {
        let s =
            TestServer::start_backends(vec![Box::new(IsoSource)], ServerConfig::default()).await;
        let dev = usbwire_client::import(s.addr, "1-1").await.unwrap();
        let iso: Vec<IsoPacket> = (0..3)
            .map(|i| IsoPacket {
                offset: 100 * i,
                length: 100,
                actual_length: 0,
                status: 0,
            })
            .collect();
        let req = TransferRequest {
            endpoint: 0x83,
            length: 300,
            iso,
            interval: 1,
            ..Default::default()
        };
        let c = tokio::time::timeout(Duration::from_secs(10), dev.submit(req))
            .await
            .unwrap();
        assert_eq!(c.status, Ok(()));
        assert_eq!(c.start_frame, 77);
        assert_eq!(c.actual_length, 100 + 60 + 20);
        let got: Vec<(u32, u32, i32)> = c
            .iso
            .iter()
            .map(|p| (p.offset, p.actual_length, p.status))
            .collect();
        assert_eq!(
            got,
            [
                (0, 100, 0),
                (100, 60, Errno::EPROTO.to_status()),
                (200, 20, 0)
            ]
        );
        assert_eq!(c.error_count, 1, "one packet failed");
        let mut want = vec![1u8; 100];
        want.extend([2u8; 60]);
        want.extend([3u8; 20]);
        assert_eq!(
            c.data, want,
            "IN data packed back to back, as the stub sends it"
        );
    }
}

mod gadget_zero {
    //! The test device as usbtest sees it, over TCP: its isochronous
    //! alternate setting, Gadget Zero's control write/read requests and the
    //! other-speed configuration, through the server and the client library.

    use std::time::Duration;

    use usbwire_client::{RemoteDevice, TransferRequest};
    use usbwire_devices::testdev::{vendor, ALT_ISO, EP_ISO_IN, EP_ISO_OUT};
    use usbwire_proto::{Errno, IsoPacket, SetupPacket};

    const WAIT: Duration = Duration::from_secs(10);

    async fn configured(addr: std::net::SocketAddr) -> RemoteDevice {
        let dev = usbwire_client::import(addr, "1-1").await.unwrap();
        dev.set_configuration(1).await.unwrap();
        dev
    }

    fn setup(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
    }

    fn packets(lengths: &[u32]) -> Vec<IsoPacket> {
        let mut offset = 0;
        lengths
            .iter()
            .map(|&length| {
                let p = IsoPacket {
                    offset,
                    length,
                    actual_length: 0,
                    status: 0,
                };
                offset += length;
                p
            })
            .collect()
    }

    #[tokio::test]
    async fn iso_in_packets_come_back_packed_with_their_results() {
        let s = super::test_server_with(1, super::Pattern::Mod63).await;
        let dev = configured(s.addr).await;
        dev.control_out(setup(0x01, 11, u16::from(ALT_ISO), 0, 0), &[])
            .await
            .unwrap();
        // The middle packet is smaller than the 1024 bytes the source sends
        // per interval: babble, as a host controller reports it.
        let iso = packets(&[1024, 100, 1024]);
        let req = TransferRequest {
            endpoint: EP_ISO_IN,
            length: 2148,
            iso,
            interval: 8,
            ..Default::default()
        };
        let c = tokio::time::timeout(WAIT, dev.submit(req)).await.unwrap();
        assert_eq!(c.status, Ok(()));
        assert_eq!(c.actual_length, 2048);
        let got: Vec<(u32, u32, i32)> = c
            .iso
            .iter()
            .map(|p| (p.offset, p.actual_length, p.status))
            .collect();
        assert_eq!(
            got,
            [
                (0, 1024, 0),
                (1024, 0, Errno::EOVERFLOW.to_status()),
                (1124, 1024, 0)
            ]
        );
        assert_eq!(c.error_count, 1);
        // Packed back to back; each packet's pattern from its own start.
        let one: Vec<u8> = (0..1024).map(|i| (i % 63) as u8).collect();
        assert_eq!(c.data.len(), 2048);
        assert!(c.data[..1024] == one[..] && c.data[1024..] == one[..]);
    }

    #[tokio::test]
    async fn iso_out_packets_are_taken_and_counted() {
        let s = super::test_server(1).await;
        let dev = configured(s.addr).await;
        let req = |lengths: &[u32]| TransferRequest {
            endpoint: EP_ISO_OUT,
            data: vec![0x3c; lengths.iter().sum::<u32>() as usize],
            iso: packets(lengths),
            interval: 8,
            ..Default::default()
        };
        dev.control_out(setup(0x01, 11, u16::from(ALT_ISO), 0, 0), &[])
            .await
            .unwrap();
        let c = tokio::time::timeout(WAIT, dev.submit(req(&[1024, 512, 1024])))
            .await
            .unwrap();
        assert_eq!(
            (c.status, c.actual_length, c.error_count),
            (Ok(()), 2560, 0)
        );
        let got: Vec<u32> = c.iso.iter().map(|p| p.actual_length).collect();
        assert_eq!(got, [1024, 512, 1024]);
        let stats = dev
            .control_in(setup(0xc0, vendor::STATS, 0, 0, 64))
            .await
            .unwrap();
        let stats = usbwire_devices::testdev::Stats::from_bytes(&stats).unwrap();
        assert_eq!(stats.iso_bytes_sunk, 2560);
    }

    #[tokio::test]
    async fn control_write_read_and_other_speed_over_the_wire() {
        let s = super::test_server(1).await;
        let dev = configured(s.addr).await;
        let data: Vec<u8> = (0..4096u32).map(|j| (j * 7) as u8).collect();
        let write =
            TransferRequest::control(setup(0x40, vendor::CONTROL_WRITE, 0, 0, 4096), data.clone());
        let c = tokio::time::timeout(WAIT, dev.submit(write)).await.unwrap();
        // The data stage's length, which usb_control_msg returns and
        // usbtest's control write test compares with what it sent.
        assert_eq!((c.status, c.actual_length), (Ok(()), 4096));
        let back = dev
            .control_in(setup(0xc0, vendor::CONTROL_READ, 0, 0, 4096))
            .await
            .unwrap();
        assert!(back == data, "read back differs");
        let other = dev.get_descriptor(7, 0, 255).await.unwrap();
        let config = dev.config_descriptor().await.unwrap();
        assert_eq!((other.len(), other[1]), (config.len(), 7));
    }
}
