use super::*;
use crate::core::EmulatedDevice;
use crate::test_util::{setup, CountWaker};
use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn counting() -> (Arc<CountWaker>, Waker) {
    let c = Arc::new(CountWaker(AtomicUsize::new(0)));
    (c.clone(), Waker::from(c))
}

fn configured(acm: CdcAcm) -> EmulatedDevice {
    let mut dev = EmulatedDevice::new(acm);
    dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
    dev
}

/// The descriptors of a blob, each as its bytes, read with the one parser.
fn walk(b: &[u8]) -> Vec<&[u8]> {
    usbwire_usb::descriptor::walk(b)
        .map(|d| d.bytes())
        .collect()
}

#[test]
fn descriptors_have_two_interfaces_and_union() {
    let mut dev = EmulatedDevice::new(CdcAcm::new(AcmConfig::default()).unwrap());
    let mut buf = [0u8; 512];
    let n = dev
        .control(&setup(0x80, 6, 0x0100, 0, 18), &[], &mut buf)
        .unwrap();
    assert_eq!(n, 18);
    assert_eq!(buf[4], 0x02, "device class CDC");
    assert_eq!(&buf[8..12], &[0x25, 0x05, 0xa7, 0xa4]);
    let n = dev
        .control(&setup(0x80, 6, 0x0200, 0, 512), &[], &mut buf)
        .unwrap();
    let cfg = &buf[..n];
    assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]) as usize, n);
    assert_eq!(cfg[4], 2, "bNumInterfaces");
    let ds = walk(cfg);
    let ifaces: Vec<_> = ds.iter().filter(|d| d[1] == 4).collect();
    assert_eq!(ifaces.len(), 2);
    assert_eq!(&ifaces[0][5..8], &[2, 2, 1]);
    assert_eq!(ifaces[1][5], 0x0a);
    let cs: Vec<_> = ds.iter().filter(|d| d[1] == 0x24).collect();
    assert_eq!(
        cs.iter().map(|d| d[2]).collect::<Vec<_>>(),
        vec![0, 1, 2, 6]
    );
    assert_eq!(cs[3][3..5], [0, 1], "union master 0 slave 1");
    let eps: Vec<_> = ds
        .iter()
        .filter(|d| d[1] == 5)
        .map(|d| (d[2], d[3]))
        .collect();
    assert_eq!(eps, vec![(0x83, 3), (0x81, 2), (0x02, 2)]);
    // At full speed: f_acm's 32 ms notifications and 64-byte bulk packets.
    let mut other = [0u8; 512];
    let m = dev
        .control(&setup(0x80, 6, 0x0700, 0, 512), &[], &mut other)
        .unwrap();
    assert_eq!((m, other[1]), (n, 7));
    let eps: Vec<_> = walk(&other[..m])
        .iter()
        .filter(|d| d[1] == 5)
        .map(|d| (d[2], u16::from_le_bytes([d[4], d[5]]), d[6]))
        .collect();
    assert_eq!(eps, vec![(0x83, 10, 32), (0x81, 64, 0), (0x02, 64, 0)]);
    // The product string.
    let n = dev
        .control(&setup(0x80, 6, 0x0302, 0x0409, 255), &[], &mut buf)
        .unwrap();
    let s: Vec<u16> = buf[2..n]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(String::from_utf16(&s).unwrap(), "usbwire serial");
}

#[test]
fn line_coding_and_control_lines() {
    let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
    let mut buf = [0u8; 7];
    let get = setup(0xa1, request::GET_LINE_CODING, 0, 0, 7);
    assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
    assert_eq!(LineCoding::from_bytes(&buf), Some(LineCoding::default()));
    assert_eq!(buf, [0x00, 0xc2, 0x01, 0x00, 0, 0, 8]);

    let lc = LineCoding {
        rate: 9600,
        stop_bits: 2,
        parity: 2,
        data_bits: 7,
    };
    let set = setup(0x21, request::SET_LINE_CODING, 0, 0, 7);
    assert_eq!(dev.control(&set, &lc.to_bytes(), &mut []), Ok(7));
    assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
    assert_eq!(LineCoding::from_bytes(&buf), Some(lc));
    // A short data stage is refused and changes nothing.
    assert_eq!(dev.control(&set, &[1, 2, 3], &mut []), Err(Errno::EPIPE));
    assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
    assert_eq!(LineCoding::from_bytes(&buf), Some(lc));

    let cls = setup(0x21, request::SET_CONTROL_LINE_STATE, 3, 0, 0);
    assert_eq!(dev.control(&cls, &[], &mut []), Ok(0));
    assert_eq!(
        dev.control(&setup(0x21, request::SEND_BREAK, 50, 0, 0), &[], &mut []),
        Ok(0)
    );
    // Unknown class request, and one aimed at the data interface: STALL.
    assert_eq!(
        dev.control(&setup(0x21, 0x42, 0, 0, 0), &[], &mut []),
        Err(Errno::EPIPE)
    );
    assert_eq!(
        dev.control(&get.with_index(1), &[], &mut buf),
        Err(Errno::EPIPE)
    );

    let mut acm = CdcAcm::new(AcmConfig::default()).unwrap();
    assert_eq!(acm.control_out(&cls, &[]), Some(Ok(())));
    assert!(acm.dtr() && acm.rts());
    acm.control_out(&setup(0x21, request::SET_CONTROL_LINE_STATE, 1, 0, 0), &[]);
    assert!(acm.dtr() && !acm.rts());
    assert_eq!(acm.control_out(&setup(0x21, 0x50, 0, 0, 0), &[]), None);
    assert_eq!(acm.control_in(&setup(0xa1, 0x50, 0, 0, 4), &mut buf), None);
}

trait WithIndex {
    fn with_index(self, i: u16) -> Self;
}
impl WithIndex for SetupPacket {
    fn with_index(mut self, i: u16) -> Self {
        self.index = i;
        self
    }
}

#[test]
fn echo_round_trip_pending_and_wake() {
    let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
    let (count, waker) = counting();
    let mut cx = Context::from_waker(&waker);
    let mut buf = [0u8; 512];
    assert!(dev.poll_in(EP_DATA_IN, &mut buf, &mut cx).is_pending());
    assert!(dev.poll_in(EP_NOTIFY, &mut buf[..10], &mut cx).is_pending());
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    assert_eq!(
        dev.poll_out(EP_DATA_OUT, b"hello", &mut cx),
        Poll::Ready(Ok(5))
    );
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        1,
        "the pending IN was woken"
    );
    // A short read takes part, then the rest.
    assert_eq!(
        dev.poll_in(EP_DATA_IN, &mut buf[..3], &mut cx),
        Poll::Ready(Ok(3))
    );
    assert_eq!(&buf[..3], b"hel");
    assert_eq!(
        dev.poll_in(EP_DATA_IN, &mut buf, &mut cx),
        Poll::Ready(Ok(2))
    );
    assert_eq!(&buf[..2], b"lo");
    assert!(dev.poll_in(EP_DATA_IN, &mut buf, &mut cx).is_pending());
    // The notification endpoint never completes empty.
    assert!(dev.poll_in(EP_NOTIFY, &mut buf[..10], &mut cx).is_pending());
}

#[test]
fn backpressure_when_full() {
    let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
    let (count, waker) = counting();
    let mut cx = Context::from_waker(&waker);
    let chunk = vec![0x5a; 16 * 1024];
    for _ in 0..BUFFER_SIZE / chunk.len() {
        assert_eq!(
            dev.poll_out(EP_DATA_OUT, &chunk, &mut cx),
            Poll::Ready(Ok(chunk.len()))
        );
    }
    assert!(dev.poll_out(EP_DATA_OUT, b"x", &mut cx).is_pending());
    assert_eq!(count.0.load(Ordering::SeqCst), 0);
    let mut buf = [0u8; 1];
    assert_eq!(
        dev.poll_in(EP_DATA_IN, &mut buf, &mut cx),
        Poll::Ready(Ok(1))
    );
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        1,
        "the pending OUT was woken"
    );
    assert_eq!(dev.poll_out(EP_DATA_OUT, b"x", &mut cx), Poll::Ready(Ok(1)));
    assert!(dev.poll_out(EP_DATA_OUT, b"y", &mut cx).is_pending());
}

#[test]
fn tcp_refuses_non_loopback() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let cfg = AcmConfig {
        backend: AcmBackend::Tcp("0.0.0.0:0".parse().unwrap()),
        ..Default::default()
    };
    let err = CdcAcm::new(cfg).err().expect("must refuse");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn pty_and_tcp_need_a_runtime() {
    let cfg = AcmConfig {
        backend: AcmBackend::Tcp("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    assert!(CdcAcm::new(cfg).is_err());
    let cfg = AcmConfig {
        backend: AcmBackend::Pty,
        ..Default::default()
    };
    assert!(CdcAcm::new(cfg).is_err());
}

/// How long a wait for an event that must come may last before the test
/// fails instead of hanging. Reaching it is a failure, never a result: no
/// assertion here depends on how long anything took.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// Awaits `fut`, failing the test (instead of hanging it) if the event it
/// waits for never comes.
async fn event<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not happen within {HANG_GUARD:?}"))
}

/// Polls `dev` IN until `want` bytes arrived, driving it the way the
/// server does: re-poll only after a wake, so a lost wake-up hangs here
/// (and fails at the guard) instead of being papered over.
async fn read_in(dev: &mut EmulatedDevice, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let mut buf = [0u8; 512];
        let n = event(
            "IN data",
            poll_fn(|cx| dev.poll_in(EP_DATA_IN, &mut buf, cx)),
        )
        .await
        .unwrap();
        assert!(n > 0, "IN must not complete empty");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

async fn write_out(dev: &mut EmulatedDevice, data: &[u8]) {
    let n = event(
        "OUT accepted",
        poll_fn(|cx| dev.poll_out(EP_DATA_OUT, data, cx)),
    )
    .await
    .unwrap();
    assert_eq!(n, data.len());
}

async fn read_exact<R: AsyncReadExt + Unpin>(from: &mut R, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    event("bytes from the bridge", from.read_exact(&mut got))
        .await
        .unwrap();
    got
}

/// Waits until the peer closes `stream` (end of file, or a reset).
async fn closed_by_peer(stream: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 64];
    let r = event("close by the bridge", stream.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "expected a close, got {r:?}");
}

#[tokio::test]
async fn tcp_backend_bridges_both_ways() {
    use tokio::net::TcpStream;
    let cfg = AcmConfig {
        backend: AcmBackend::Tcp("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    let acm = CdcAcm::new(cfg).unwrap();
    let addr = acm.local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let mut dev = configured(acm);

    // Without a client, host bytes are dropped, not queued: "ping" below is
    // the first thing the client receives.
    write_out(&mut dev, b"lost").await;

    let mut client = event("connect", TcpStream::connect(addr)).await.unwrap();
    client.write_all(b"from client").await.unwrap();
    // The bridge stops discarding before it starts reading its client, so
    // once the client's bytes are here the host's next OUT reaches it.
    assert_eq!(read_in(&mut dev, 11).await, b"from client");
    write_out(&mut dev, b"ping").await;
    assert_eq!(read_exact(&mut client, 4).await, b"ping");

    // A second client is turned away while the first is connected.
    let mut second = event("connect", TcpStream::connect(addr)).await.unwrap();
    closed_by_peer(&mut second).await;

    // The first leaves. The bridge closes its side only once it has
    // finished with that client, and then has nothing left to accept with
    // but its main loop: from here on a new client is served, not refused.
    client.shutdown().await.unwrap();
    closed_by_peer(&mut client).await;
    let mut third = event("connect", TcpStream::connect(addr)).await.unwrap();
    third.write_all(b"3").await.unwrap();
    assert_eq!(read_in(&mut dev, 1).await, b"3");
    write_out(&mut dev, b"back").await;
    assert_eq!(read_exact(&mut third, 4).await, b"back");
}

#[tokio::test]
async fn pty_backend_bridges_both_ways() {
    use std::os::unix::fs::OpenOptionsExt;
    use tokio::net::unix::pipe;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyUSBWIRE");
    let cfg = AcmConfig {
        backend: AcmBackend::Pty,
        pty_link: Some(link.clone()),
        ..Default::default()
    };
    let acm = CdcAcm::new(cfg).unwrap();
    let path = acm.pty_path().unwrap();
    assert!(path.starts_with("/dev/pts"), "{path:?}");
    assert_eq!(std::fs::read_link(&link).unwrap(), path);
    let mut dev = configured(acm);

    // The local program's side, non-blocking and registered with tokio so
    // that reads wait for readiness, the way the bridge reads the master.
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&link)
        .unwrap();
    let slave_for_writes = slave.try_clone().unwrap();
    let mut slave_rx = pipe::Receiver::from_file_unchecked(slave).unwrap();
    let mut slave_tx = pipe::Sender::from_file_unchecked(slave_for_writes).unwrap();

    slave_tx.write_all(b"from pty\n").await.unwrap();
    assert_eq!(read_in(&mut dev, 9).await, b"from pty\n");

    write_out(&mut dev, b"to pty").await;
    assert_eq!(read_exact(&mut slave_rx, 6).await, b"to pty");
    // Raw mode: the host's bytes are not echoed back to it. An echo is
    // queued towards the master when the slave's line discipline takes the
    // bytes in, before the reader above could see them, so it would come
    // ahead of a marker written now.
    slave_tx.write_all(b"marker").await.unwrap();
    assert_eq!(
        read_in(&mut dev, 6).await,
        b"marker",
        "echo of the host's bytes"
    );

    drop(dev);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link removed on drop"
    );
}
