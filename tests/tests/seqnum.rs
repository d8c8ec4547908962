//! Seqnums over TCP: a CMD_SUBMIT whose seqnum is already in flight on its
//! connection is refused by closing that connection, with a log line that
//! names the seqnum, the device and the client; every other connection
//! carries on. What vhci really does stays legal: seqnums wrap, an unlink
//! may overtake its submit, and a seqnum whose URB completed comes again.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use usbwire_devices::TransferType;
use usbwire_proto::{DeviceInfo, Direction, Errno};
use usbwire_server::{Backend, Completion, ServerConfig, Urb};
use usbwire_tests::support::*;

/// Everything the server logs in this test binary.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bulk IN 0x81 never completes: its URBs stay in flight until unlinked
/// or the import ends. Bulk IN 0x82 completes at once with the URB's
/// seqnum as 4 bytes, and records the seqnum.
struct Parking {
    completed: Arc<Mutex<Vec<u32>>>,
}

impl Backend for Parking {
    fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
        test_device_info(busid, busnum, devnum, 6)
    }
    fn transfer_type(&self, ep: u8) -> Option<TransferType> {
        matches!(ep, 0x81 | 0x82).then_some(TransferType::Bulk)
    }
    fn poll_urb(&mut self, urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
        match urb.ep {
            1 => Poll::Pending,
            2 => {
                self.completed.lock().unwrap().push(urb.seqnum);
                urb.buf[..4].copy_from_slice(&urb.seqnum.to_be_bytes());
                Poll::Ready(Ok(4).into())
            }
            _ => Poll::Ready(Ok(0).into()),
        }
    }
    fn release(&mut self) {}
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const PARK: u32 = 1;
const ANSWER: u32 = 2;

/// Submits `seqnum` on the answering endpoint and expects its reply.
async fn answered(p: &mut RawPeer, seqnum: u32) {
    p.submit(submit(seqnum, ANSWER, Direction::In, 64), &[])
        .await;
    match p.next().await {
        Reply::Submit(r, data) => {
            assert_eq!((r.seqnum, r.status), (seqnum, 0));
            assert_eq!(data, seqnum.to_be_bytes());
        }
        other => panic!("seqnum {seqnum}: {other:?}"),
    }
}

/// Waits until `busid` is listed again, that is, released.
async fn listed(addr: SocketAddr, busid: &str) -> bool {
    for _ in 0..500 {
        if let Ok(l) = usbwire_client::list(addr).await {
            if l.iter().any(|d| d.busid == busid) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seqnum_in_flight_is_refused_and_only_its_connection_closed() {
    // The server's sessions run on threads of their own: only a global
    // subscriber sees their lines.
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .init();
    let completed = [(); 2].map(|_| Arc::new(Mutex::new(Vec::new())));
    let s = TestServer::start_backends(
        completed
            .iter()
            .map(|c| {
                Box::new(Parking {
                    completed: c.clone(),
                }) as Box<dyn Backend>
            })
            .collect(),
        ServerConfig::default(),
    )
    .await;

    // Another importer, using the same seqnums on its own connection.
    let mut other = RawPeer::import(s.addr, "1-2").await;
    other.submit(submit(7, PARK, Direction::In, 64), &[]).await;
    answered(&mut other, 8).await;

    let mut p = RawPeer::import(s.addr, "1-1").await;
    let client = p.stream.local_addr().unwrap();
    p.submit(submit(7, PARK, Direction::In, 64), &[]).await;
    // Legal: a seqnum again once its URB completed...
    answered(&mut p, 8).await;
    answered(&mut p, 8).await;
    // ...seqnums wrapping around while the ones before the wrap are in
    // flight...
    p.submit(submit(u32::MAX, PARK, Direction::In, 64), &[])
        .await;
    answered(&mut p, 0).await;
    // ...and an unlink that overtook its submit: the submit is dropped when
    // it comes, and its seqnum is free again after that.
    p.unlink(60, 9).await;
    match p.next().await {
        Reply::Unlink(u) => {
            assert_eq!((u.seqnum, u.status), (60, Errno::ECONNRESET.to_status()))
        }
        other => panic!("{other:?}"),
    }
    p.submit(submit(9, ANSWER, Direction::In, 64), &[]).await;
    answered(&mut p, 9).await;

    // Seqnum 7 is still in flight on endpoint 0x81: the same seqnum on
    // another endpoint is refused, and nothing answers it.
    p.submit(submit(7, ANSWER, Direction::In, 64), &[]).await;
    let mut after = Vec::new();
    // A FIN or a reset: either way, closed.
    let _ = tokio::time::timeout(TIMEOUT, p.stream.read_to_end(&mut after))
        .await
        .expect("the connection is closed in time");
    assert!(after.is_empty(), "a reply to the duplicate: {after:02x?}");
    assert_eq!(*completed[0].lock().unwrap(), [8, 8, 0, 9]);
    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
    let line = log
        .lines()
        .find(|l| l.contains("seqnum already in flight"))
        .unwrap_or_else(|| panic!("no log line for the duplicate in:\n{log}"));
    for field in [
        "seqnum=7".to_string(),
        "busid=1-1".to_string(),
        format!("client={client}"),
    ] {
        assert!(line.contains(&field), "{field} missing from: {line}");
    }

    // The other importer is unaffected, its seqnum 7 still parked.
    answered(&mut other, 9).await;
    answered(&mut other, 8).await;
    assert_eq!(*completed[1].lock().unwrap(), [8, 9, 8]);
    // The refused importer's device comes back and can be imported again.
    assert!(listed(s.addr, "1-1").await, "1-1 was not released");
    let mut again = RawPeer::import(s.addr, "1-1").await;
    answered(&mut again, 7).await;
    drop((other, again));
    s.stop().await;
}
