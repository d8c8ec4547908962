use super::*;
use crate::core::EmulatedDevice;
use crate::test_util::{setup, CountWaker};
use std::future::poll_fn;
use std::io::{Read, Write};
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

fn walk(b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 2 <= b.len() && b[at] >= 2 && at + b[at] as usize <= b.len() {
        out.push(&b[at..at + b[at] as usize]);
        at += b[at] as usize;
    }
    out
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

/// Polls `dev` IN until `want` bytes arrived, driving it the way the
/// server does: re-poll only after a wake (or a short timeout).
async fn read_in(dev: &mut EmulatedDevice, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out, got {got:?}"
        );
        let mut buf = [0u8; 512];
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            poll_fn(|cx| dev.poll_in(EP_DATA_IN, &mut buf, cx)),
        )
        .await;
        if let Ok(r) = r {
            let n = r.unwrap();
            assert!(n > 0, "IN must not complete empty");
            got.extend_from_slice(&buf[..n]);
        }
    }
    got
}

async fn write_out(dev: &mut EmulatedDevice, data: &[u8]) {
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        poll_fn(|cx| dev.poll_out(EP_DATA_OUT, data, cx)),
    )
    .await
    .expect("OUT timed out")
    .unwrap();
    assert_eq!(n, data.len());
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

    // Without a client, host bytes are dropped, not queued.
    write_out(&mut dev, b"lost").await;

    let t = Duration::from_secs(5);
    let mut client = tokio::time::timeout(t, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"from client").await.unwrap();
    assert_eq!(read_in(&mut dev, 11).await, b"from client");

    // The accept may lag the connect; retry the OUT until the client sees it.
    let mut got = Vec::new();
    for _ in 0..50 {
        write_out(&mut dev, b"ping").await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await
        {
            got.extend_from_slice(&buf[..n]);
            break;
        }
    }
    assert!(got.starts_with(b"ping"), "client got {got:?}");
    assert!(!got.windows(4).any(|w| w == b"lost"));

    // A second client is turned away while the first is connected.
    let mut second = tokio::time::timeout(t, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(t, second.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "second client must be closed");

    // After the first leaves, a new client is served.
    drop(client);
    let mut third = None;
    for _ in 0..50 {
        let mut c = tokio::time::timeout(t, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        c.write_all(b"3").await.unwrap();
        let mut b = [0u8; 1];
        // Refused connections get closed; a served one stays open.
        match tokio::time::timeout(Duration::from_millis(100), c.read(&mut b)).await {
            Err(_) => {
                third = Some(c);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(third.is_some(), "no client accepted after the first left");
    assert_eq!(read_in(&mut dev, 1).await, b"3");
}

#[tokio::test]
async fn pty_backend_bridges_both_ways() {
    use std::os::unix::fs::OpenOptionsExt;
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

    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&link)
        .unwrap();
    (&slave).write_all(b"from pty\n").unwrap();
    assert_eq!(read_in(&mut dev, 9).await, b"from pty\n");

    write_out(&mut dev, b"to pty").await;
    // The slave is non-blocking so that this bounded loop cannot hang.
    let mut got = Vec::new();
    for _ in 0..500 {
        let mut buf = [0u8; 64];
        match (&slave).read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("slave read: {e}"),
        }
        if got.len() >= 6 {
            break;
        }
    }
    assert_eq!(got, b"to pty");
    // Raw mode: the host's bytes were not echoed back to it.
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        poll_fn(|cx| dev.poll_in(EP_DATA_IN, &mut buf, cx)),
    )
    .await;
    assert!(r.is_err(), "unexpected echo: {r:?}");

    drop(dev);
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link removed on drop"
    );
}
