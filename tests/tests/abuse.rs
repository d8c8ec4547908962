//! Hostile input: the server must answer cleanly or close, keep serving
//! everyone else, and never let a peer make it allocate more than the
//! configured maximum in one go.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::AsyncReadExt;
use usbwire_client::TransferRequest;
use usbwire_devices::testdev::TestDevice;
use usbwire_devices::{EmulatedDevice, TransferType};
use usbwire_proto::{DeviceInfo, Direction, IsoPacket, OpReply, OpRequest};
use usbwire_server::{Backend, Completion, ServerConfig, Urb};
use usbwire_tests::support::*;

/// Records the largest single allocation made by anything in this process.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_TRANSFER: u32 = 1024 * 1024;

fn header(cmd: u32, seqnum: u32, dir: u32, ep: u32, tbl: u32, np: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [cmd, seqnum, 0x0001_0002, dir, ep, 0, tbl, 0, np, 0] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&[0u8; 8]);
    b
}

/// The server still answers a device list, so it is alive and serving.
async fn still_serving(addr: std::net::SocketAddr) {
    let list = tokio::time::timeout(TIMEOUT, usbwire_client::list(addr))
        .await
        .expect("device list in time")
        .expect("device list after abuse");
    assert!(
        list.iter().any(|d| d.busid == "1-2"),
        "device 1-2 is missing from {list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_survived_and_bounded() {
    let mut config = ServerConfig::default();
    config.limits.max_transfer_length = MAX_TRANSFER;
    config.max_bytes_in_flight = 4 * MAX_TRANSFER as usize;
    // Device 1-2 stays available for the liveness checks.
    let s = TestServer::start(
        vec![
            EmulatedDevice::new(TestDevice::new()),
            EmulatedDevice::new(TestDevice::new()),
        ],
        config.clone(),
    )
    .await;
    // Once it has served a client, what the runtime and the server set up
    // for themselves is done: count only what the abuse makes it allocate.
    still_serving(s.addr).await;
    LARGEST.store(0, Ordering::Relaxed);

    // OP phase abuse: each must end in a clean reply or a close.
    let op_cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated OP header", vec![0x01, 0x11, 0x80]),
        ("unknown OP code", vec![0x01, 0x11, 0x80, 0x99, 0, 0, 0, 0]),
        ("CMD_SUBMIT before import", header(1, 1, 1, 1, 64, 0)),
        ("import with a truncated busid", {
            let mut b = vec![0x01, 0x11, 0x80, 0x03, 0, 0, 0, 0];
            b.extend_from_slice(b"1-1");
            b
        }),
    ];
    for (what, bytes) in op_cases {
        let mut p = RawPeer::connect(s.addr).await;
        p.send(&bytes).await;
        drop(p.stream.shutdown_write_half().await);
        assert!(
            p.closed().await,
            "{what}: server neither answered nor closed"
        );
        still_serving(s.addr).await;
    }

    // Wrong version: the layout is the same, so it is served.
    {
        let mut p = RawPeer::connect(s.addr).await;
        let mut out = Vec::new();
        OpRequest::Devlist { version: 0x0106 }.encode(&mut out);
        p.send(&out).await;
        assert!(matches!(p.read_op().await, OpReply::Devlist { .. }));
    }

    // URB phase abuse, each on a fresh import of 1-1.
    let urb_cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "transfer_buffer_length 0x7fffffff OUT",
            header(1, 5, 0, 2, 0x7fff_ffff, 0),
        ),
        (
            "transfer_buffer_length 0x7fffffff IN",
            header(1, 5, 1, 1, 0x7fff_ffff, 0),
        ),
        (
            "negative transfer_buffer_length",
            header(1, 5, 1, 1, 0xffff_fff0, 0),
        ),
        (
            "number_of_packets 0x7fffffff",
            header(1, 5, 1, 1, 64, 0x7fff_ffff),
        ),
        ("unknown command", header(0x77, 5, 0, 0, 0, 0)),
        ("bad direction", header(1, 5, 7, 1, 64, 0)),
        ("truncated header", header(1, 5, 1, 1, 64, 0)[..20].to_vec()),
        (
            "OUT promising more data than sent",
            header(1, 5, 0, 2, 4096, 0),
        ),
    ];
    for (what, bytes) in urb_cases {
        let mut p = RawPeer::import(s.addr, "1-1").await;
        p.send(&bytes).await;
        drop(p.stream.shutdown_write_half().await);
        // Either a clean error status or a close; never a hang or a crash.
        let mut answered_or_closed = false;
        for _ in 0..10 {
            let mut b = [0u8; 4096];
            match tokio::time::timeout(
                TIMEOUT,
                tokio::io::AsyncReadExt::read(&mut p.stream, &mut b),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    answered_or_closed = true;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
        assert!(
            answered_or_closed,
            "{what}: no close after the peer's end of input"
        );
        still_serving(s.addr).await;
        // The device comes back to the registry once the abuser is gone.
        let mut back = false;
        for _ in 0..200 {
            if usbwire_client::list(s.addr)
                .await
                .map(|l| l.len() == 2)
                .unwrap_or(false)
            {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(back, "{what}: device 1-1 was not released");
    }

    // Bad endpoint numbers and unknown requests get a status, and the
    // connection keeps working.
    {
        let mut p = RawPeer::import(s.addr, "1-1").await;
        p.submit(set_configuration(1), &[]).await;
        let _ = p.next().await;
        p.submit(submit(2, 9, Direction::In, 64), &[]).await; // no endpoint 0x89
        p.submit(submit(3, 200, Direction::In, 64), &[]).await; // not an endpoint number
        let vendor = usbwire_proto::SetupPacket {
            request_type: 0xc0,
            request: 0x7e,
            value: 0,
            index: 0,
            length: 8,
        };
        p.submit(control(4, vendor), &[]).await;
        for seq in 2..=4 {
            match p.next().await {
                Reply::Submit(r, _) => {
                    assert_eq!(r.seqnum, seq);
                    assert_eq!(r.status, -32, "seq {seq}: expected -EPIPE");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    // Random bytes after a valid import, with a fixed seed so a failure reproduces.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x05b1_0001);
    for round in 0..50 {
        let mut p = RawPeer::import(s.addr, "1-1").await;
        let len = rng.gen_range(1..2000);
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        p.send(&bytes).await;
        drop(p.stream.shutdown_write_half().await);
        let _ = tokio::time::timeout(Duration::from_secs(5), p.closed()).await;
        if round % 10 == 0 {
            still_serving(s.addr).await;
        }
    }
    still_serving(s.addr).await;

    iso_lengths_beyond_the_buffer_are_refused(config).await;

    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= 2 * MAX_TRANSFER as usize,
        "a single allocation of {largest} bytes exceeds the configured maximum transfer ({MAX_TRANSFER})"
    );
    s.stop().await;
}

/// An isochronous IN endpoint 0x83 run the way the usbfs backend runs one:
/// the packets are gathered into one buffer of their summed lengths.
struct IsoGatherer;

impl Backend for IsoGatherer {
    fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
        test_device_info(busid, busnum, devnum, 5)
    }
    fn transfer_type(&self, ep: u8) -> Option<TransferType> {
        (ep == 0x83).then_some(TransferType::Isochronous)
    }
    fn poll_urb(&mut self, urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
        if urb.ep == 0 {
            return Poll::Ready(Ok(0).into());
        }
        let total: usize = urb.iso.iter().map(|p| p.length as usize).sum();
        std::hint::black_box(vec![0u8; total]);
        for p in &mut urb.iso {
            p.actual_length = 0;
        }
        Poll::Ready(Ok(0).into())
    }
    fn release(&mut self) {}
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Descriptors that each lie inside the buffer but overlap, adding up to
/// 1024 buffers: the connection is closed before any backend sees them,
/// and the device is served again afterwards.
async fn iso_lengths_beyond_the_buffer_are_refused(config: ServerConfig) {
    let s = TestServer::start_backends(vec![Box::new(IsoGatherer)], config).await;
    let mut p = RawPeer::import(s.addr, "1-1").await;
    let mut frame = header(1, 5, 1, 3, MAX_TRANSFER, 1024);
    for _ in 0..1024 {
        IsoPacket {
            offset: 0,
            length: MAX_TRANSFER,
            ..Default::default()
        }
        .encode(&mut frame);
    }
    p.send(&frame).await;
    assert!(
        p.closed().await,
        "ISO lengths adding up to 1 GiB: the connection was not closed"
    );
    drop(p);
    let mut released = false;
    for _ in 0..200 {
        if usbwire_client::list(s.addr)
            .await
            .map(|l| l.len() == 1)
            .unwrap_or(false)
        {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(released, "the ISO device was not released");
    // Packets laid out as hosts lay them are served as before.
    let dev = usbwire_client::import(s.addr, "1-1").await.unwrap();
    let req = TransferRequest {
        endpoint: 0x83,
        length: 300,
        iso: (0..3)
            .map(|i| IsoPacket {
                offset: 100 * i,
                length: 100,
                ..Default::default()
            })
            .collect(),
        interval: 1,
        ..Default::default()
    };
    let c = tokio::time::timeout(TIMEOUT, dev.submit(req))
        .await
        .expect("ISO URB answered in time");
    assert_eq!(c.status, Ok(()));
    assert_eq!(c.iso.len(), 3);
    drop(dev);
    s.stop().await;
}

/// Helper trait so the test can half-close its side cleanly.
trait ShutdownWrite {
    async fn shutdown_write_half(&mut self) -> std::io::Result<()>;
}

impl ShutdownWrite for tokio::net::TcpStream {
    async fn shutdown_write_half(&mut self) -> std::io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(self).await
    }
}

/// A client that imports, asks for more than the shared in-flight budget
/// holds and never reads a reply would keep that budget, and every other
/// import waiting behind it, for as long as it liked: it is cut once its
/// replies have waited `reply_stall_timeout`, and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_no_replies_is_cut_and_the_budget_goes_to_others() {
    let mut config = ServerConfig::default();
    config.limits.max_transfer_length = MAX_TRANSFER;
    // The connection's own bound above the shared one: the hostile client
    // alone can take the whole budget and then wait, first in line.
    config.max_bytes_in_flight = 16 * MAX_TRANSFER as usize;
    config.max_inflight_bytes = 4 * MAX_TRANSFER as usize;
    config.reply_stall_timeout = Duration::from_secs(1);
    let s = TestServer::start(
        vec![
            EmulatedDevice::new(TestDevice::new()),
            EmulatedDevice::new(TestDevice::new()),
        ],
        config,
    )
    .await;
    let mut hostile = RawPeer::import(s.addr, "1-1").await;
    hostile.submit(set_configuration(1), &[]).await;
    assert!(matches!(hostile.next().await, Reply::Submit(r, _) if r.status == 0));
    // Far more IN data than the socket buffers and the budget hold.
    let mut burst = Vec::new();
    for seqnum in 2..66 {
        hostile.encode_submit(
            submit(seqnum, 1, Direction::In, MAX_TRANSFER),
            &[],
            &mut burst,
        );
    }
    hostile.send(&burst).await;
    // Bounded: until the hostile client's unread replies have taken so much
    // of the budget that its next 1 MiB command waits, first in line.
    let full = async {
        for _ in 0..10_000 {
            if s.server.inflight_budget_waiters() > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the hostile client never filled the budget");
    };
    tokio::time::timeout(TIMEOUT, full)
        .await
        .expect("budget filled in time");

    // Another client's transfer waits behind it, and goes through once the
    // server has given up on the client that reads nothing.
    let other = usbwire_client::import(s.addr, "1-2")
        .await
        .expect("import 1-2");
    other.set_configuration(1).await.unwrap();
    let data = tokio::time::timeout(TIMEOUT, other.bulk_in(0x81, 64 * 1024))
        .await
        .expect("the other import's transfer went through in time")
        .expect("bulk IN");
    assert_eq!(data.len(), 64 * 1024);
    // What the server had sent before it gave up, then the end.
    let mut chunk = vec![0u8; 1 << 16];
    let mut cut = false;
    for _ in 0..10_000 {
        match tokio::time::timeout(TIMEOUT, hostile.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut = true;
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    assert!(cut, "the client reading nothing was cut");
}
