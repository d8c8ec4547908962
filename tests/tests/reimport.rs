//! A client that closes its import and imports the same device again at
//! once (vhci's re-attach, usbip-win2, `attach --persist`) is never refused.
//!
//! The server gives a device back a moment after the close: its session
//! has to notice the close on its worker thread, end its URBs and reset the
//! device, while the new connection may already be served on another
//! worker. An import that arrives in that window waits for the release
//! instead of getting ST_DEV_BUSY.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use usbwire_devices::testdev::{TestDevice, EP_LOOP_IN};
use usbwire_devices::EmulatedDevice;
use usbwire_proto::{Direction, OpReply, OpRequest, OpStatus, USBIP_VERSION};
use usbwire_server::ServerConfig;
use usbwire_tests::support::*;

const CYCLES: usize = 1000;

/// How a cycle's client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// Closes right after the import.
    AtOnce,
    /// Closes with a bulk IN pending that the device never completes (the
    /// loopback IN with no message), so the server has an URB to end.
    UrbPending,
    /// The same, leaving a reply unread: the close is a reset.
    UrbPendingUnread,
    /// Shuts down its sending side first, as vhci does (SHUT_RDWR), then closes.
    ShutdownThenClose,
}

const LEAVES: [Leave; 4] = [
    Leave::AtOnce,
    Leave::UrbPending,
    Leave::UrbPendingUnread,
    Leave::ShutdownThenClose,
];

/// Imports 1-1; the status of the refusal, if refused.
async fn import(addr: SocketAddr) -> Result<RawPeer, String> {
    let mut p = RawPeer::connect(addr).await;
    let mut out = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: "1-1".into(),
    }
    .encode(&mut out);
    p.send(&out).await;
    match p.read_op().await {
        OpReply::Import {
            status: OpStatus::Ok,
            device: Some(_),
            ..
        } => Ok(p),
        OpReply::Import { status, .. } => Err(format!("{status:?}")),
        other => panic!("not an import reply: {other:?}"),
    }
}

async fn leave(mut p: RawPeer, how: Leave) {
    if how != Leave::AtOnce {
        p.submit(set_configuration(1), &[]).await;
        if how != Leave::UrbPendingUnread {
            match p.next().await {
                Reply::Submit(r, _) => assert_eq!((r.seqnum, r.status), (1, 0)),
                other => panic!("{other:?}"),
            }
        }
        let ep = u32::from(EP_LOOP_IN & 0x0f);
        p.submit(submit(2, ep, Direction::In, 512), &[]).await;
    }
    if how == Leave::ShutdownThenClose {
        p.stream.shutdown().await.expect("shutdown");
    }
    drop(p);
}

#[tokio::test]
async fn a_device_is_imported_again_right_after_a_close_every_time() {
    let config = ServerConfig {
        // The close and the next import are served on different threads:
        // the race a client that reconnects at once runs into.
        workers: 2,
        ..ServerConfig::default()
    };
    let s = TestServer::start(vec![EmulatedDevice::new(TestDevice::new())], config).await;
    let mut refused: Vec<(usize, Leave, String)> = Vec::new();
    let mut peer = import(s.addr).await.expect("the first import");
    let mut slowest = (Duration::ZERO, 0);
    for cycle in 0..CYCLES {
        let how = LEAVES[cycle % LEAVES.len()];
        leave(peer, how).await;
        let t = Instant::now();
        let imported = import(s.addr).await;
        slowest = slowest.max((t.elapsed(), cycle));
        peer = match imported {
            Ok(p) => p,
            Err(status) => {
                refused.push((cycle, how, status));
                // Only to go on counting: the device comes back once the
                // server has noticed the close.
                let mut again = None;
                for _ in 0..10_000 {
                    if let Ok(p) = import(s.addr).await {
                        again = Some(p);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                again.expect("the device never came back after a close")
            }
        };
    }
    // For the log: how long the longest wait for a release took.
    println!("slowest re-import: {:?} (cycle {})", slowest.0, slowest.1);
    // The last import works like any other.
    peer.submit(set_configuration(1), &[]).await;
    match peer.next().await {
        Reply::Submit(r, _) => assert_eq!((r.seqnum, r.status), (1, 0)),
        other => panic!("{other:?}"),
    }
    assert!(
        refused.is_empty(),
        "{} of {CYCLES} re-imports right after a close were refused; the first: {:?}",
        refused.len(),
        &refused[..refused.len().min(10)]
    );
    drop(peer);
    s.stop().await;
}
