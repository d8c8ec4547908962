//! The endpoint error hold (issue: no URB runs past an endpoint error
//! before the importer has reacted), over TCP with the client library and
//! the test device's scripted faults.
//!
//! The loopback endpoints carry a 100-byte "data" message and a 13-byte
//! "status" message, the shape of a mass-storage data phase followed by
//! its CSW. URB1 asks for 512 bytes with URB_SHORT_NOT_OK and gets the
//! 100 bytes: -EREMOTEIO. What happens to URB2, queued behind it, decides
//! whether the status survives.
//!
//! No assertion here measures time. That something did *not* happen is
//! shown by a later event: replies come back on one ordered path, so once
//! the reply to a request sent after URB2 has arrived, URB2's reply would
//! have arrived before it had URB2 run. How long a hold lasts is the
//! session core's unit tests' business, in virtual time
//! (`crates/server/src/session/tests.rs`).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use usbwire_client::{RemoteDevice, TransferError, TransferRequest};
use usbwire_devices::testdev::{Fault, TestDevice, EP_LOOP_IN, EP_LOOP_OUT, EP_SOURCE};
use usbwire_devices::EmulatedDevice;
use usbwire_proto::urb::flags::URB_SHORT_NOT_OK;
use usbwire_server::ServerConfig;
use usbwire_tests::support::TestServer;

const DATA: [u8; 100] = [0xd7; 100];
const STATUS: &[u8; 13] = b"USBS-status!!";
const WAIT: Duration = Duration::from_secs(10);

async fn setup(config: ServerConfig) -> (TestServer, RemoteDevice) {
    let s = TestServer::start(vec![EmulatedDevice::new(TestDevice::new())], config).await;
    let dev = usbwire_client::import(s.addr, "1-1").await.unwrap();
    dev.set_configuration(1).await.unwrap();
    dev.bulk_out(EP_LOOP_OUT, &DATA).await.unwrap();
    dev.bulk_out(EP_LOOP_OUT, STATUS).await.unwrap();
    (s, dev)
}

fn read(len: u32) -> TransferRequest {
    TransferRequest::bulk_in(EP_LOOP_IN, len)
}

fn config(hold: bool, floor_ms: u64) -> ServerConfig {
    ServerConfig {
        hold_on_error: hold,
        hold_floor: Duration::from_millis(floor_ms),
        hold_ceiling: Duration::from_millis(floor_ms.max(1000)),
        ..ServerConfig::default()
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("transfer did not complete in time")
}

/// What `f` completed with, if it has, without waiting for it.
async fn completed<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match Pin::new(&mut *f).poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// A round trip on another endpoint: once it is back, every reply to what
/// was sent before it is back too.
async fn round_trip(dev: &usbwire_client::RemoteDevice) {
    let other = within(dev.bulk_in(EP_SOURCE, 4096)).await.unwrap();
    assert_eq!(other.len(), 4096);
}

#[tokio::test]
async fn short_read_then_unlink_keeps_the_status_for_urb3() {
    let (_s, dev) = setup(config(true, 200)).await;
    let mut urb1 = dev.submit(read(512).with_flags(URB_SHORT_NOT_OK));
    let mut urb2 = dev.submit(read(512).with_flags(URB_SHORT_NOT_OK));
    let urb3 = dev.submit(read(512));
    let c1 = within(&mut urb1).await;
    assert_eq!(c1.status, Err(TransferError::Short));
    assert_eq!(c1.data, DATA, "the short data is still delivered");
    // Only now, having seen URB1's error, does the importer unlink URB2,
    // as usb_sg_wait does from its completion handler.
    urb2.cancel().await;
    let c2 = within(&mut urb2).await;
    assert_eq!(
        c2.status,
        Err(TransferError::Cancelled),
        "URB2 must not have run"
    );
    assert!(c2.data.is_empty());
    let c3 = within(urb3).await;
    assert_eq!(c3.status, Ok(()));
    assert_eq!(c3.data, STATUS, "the status reached URB3 intact");
}

#[tokio::test]
async fn without_an_unlink_urb2_runs_after_the_grace_window_in_order() {
    // The hold ends by itself (no unlink, no CLEAR_HALT): URB2 then gets
    // the next data, in order. That it waited for the window is
    // `error_hold_ends_at_the_grace_expiry_in_order` in the core's tests;
    // here the window only has to outlast one round trip on loopback by far.
    let (_s, dev) = setup(config(true, 3000)).await;
    let mut urb1 = dev.submit(read(512).with_flags(URB_SHORT_NOT_OK));
    let mut urb2 = dev.submit(read(512));
    let c1 = within(&mut urb1).await;
    assert_eq!(c1.status, Err(TransferError::Short));
    round_trip(&dev).await;
    assert!(
        completed(&mut urb2).await.is_none(),
        "URB2 ran at once, past URB1's error"
    );
    let c2 = within(urb2).await;
    assert_eq!(c2.status, Ok(()));
    assert_eq!(c2.data, STATUS, "URB2 gets the next data, in order");
}

#[tokio::test]
async fn stall_holds_until_clear_halt_and_other_endpoints_keep_running() {
    // The longest window there is, so that only the CLEAR_FEATURE(HALT)
    // can explain URB2 running within a round trip.
    let config = ServerConfig {
        hold_floor: Duration::from_secs(10),
        hold_ceiling: Duration::from_secs(60),
        ..config(true, 0)
    };
    let (_s, dev) = setup(config).await;
    let (setup, data) = Fault::Stall.request(EP_LOOP_IN, 0);
    dev.control_out(setup, &data).await.unwrap();
    let mut urb1 = dev.submit(read(512));
    let mut urb2 = dev.submit(read(512));
    assert_eq!(within(&mut urb1).await.status, Err(TransferError::Stall));
    // The loop endpoint is held; the source endpoint is not.
    round_trip(&dev).await;
    assert!(
        completed(&mut urb2).await.is_none(),
        "URB2 ran while the endpoint was held"
    );
    dev.clear_halt(EP_LOOP_IN).await.unwrap();
    // URB2 starts as the CLEAR_FEATURE(HALT) completes, so its reply comes
    // before that of anything sent later.
    round_trip(&dev).await;
    let c2 = completed(&mut urb2)
        .await
        .expect("CLEAR_FEATURE(HALT) did not release the hold");
    assert_eq!(
        c2.status,
        Ok(()),
        "URB2 ran after the halt was cleared, not into the stall"
    );
    assert_eq!(c2.data, DATA);
}

#[tokio::test]
async fn with_the_hold_switched_off_urb2_swallows_the_status() {
    // The control experiment: it shows the first test exercises the contract.
    let (_s, dev) = setup(config(false, 0)).await;
    let mut urb1 = dev.submit(read(512).with_flags(URB_SHORT_NOT_OK));
    let mut urb2 = dev.submit(read(512).with_flags(URB_SHORT_NOT_OK));
    let urb3 = dev.submit(read(512));
    assert_eq!(within(&mut urb1).await.status, Err(TransferError::Short));
    urb2.cancel().await;
    let c2 = within(&mut urb2).await;
    assert_eq!(
        c2.data, STATUS,
        "without the hold, URB2 ran at once and took the status"
    );
    let mut urb3 = urb3;
    round_trip(&dev).await;
    assert!(
        completed(&mut urb3).await.is_none(),
        "URB3 got data although the status was already consumed"
    );
}

mod given_back {
    //! A device whose URBs sit in a host controller, as through usbfs: when
    //! URB1 fails, the controller cancels URB2 and URB3 (bulk continuation)
    //! before they run and the backend gives them back. The session must
    //! hold them like URBs it never started.

    use std::collections::{HashSet, VecDeque};
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use usbwire_client::{TransferError, TransferRequest};
    use usbwire_devices::TransferType;
    use usbwire_proto::urb::flags::URB_SHORT_NOT_OK;
    use usbwire_proto::DeviceInfo;
    use usbwire_server::{Backend, Completion, ServerConfig, Urb, UrbId};
    use usbwire_tests::support::{test_device_info, TestServer};

    struct HostController {
        messages: VecDeque<Vec<u8>>,
        started: Vec<UrbId>,
        cancelled: HashSet<UrbId>,
        waker: Option<Waker>,
    }

    impl Backend for HostController {
        fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
            test_device_info(busid, busnum, devnum, 3)
        }
        fn transfer_type(&self, ep: u8) -> Option<TransferType> {
            (ep == 0x81).then_some(TransferType::Bulk)
        }
        fn max_active(&self, _ep: u8) -> usize {
            8
        }
        fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
            if urb.ep == 0 {
                return Poll::Ready(Ok(0).into());
            }
            if self.cancelled.remove(&urb.id) {
                self.started.retain(|s| *s != urb.id);
                return Poll::Ready(Completion::NotStarted);
            }
            if !self.started.contains(&urb.id) {
                self.started.push(urb.id);
                if let Some(w) = self.waker.take() {
                    w.wake();
                }
            }
            // The first URB completes only once three are in the controller.
            if self.started.first() == Some(&urb.id)
                && (self.started.len() >= 3 || self.messages.len() < 2)
            {
                let Some(m) = self.messages.pop_front() else {
                    self.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                };
                self.started.remove(0);
                urb.buf[..m.len()].copy_from_slice(&m);
                if m.len() < urb.length && urb.transfer_flags & URB_SHORT_NOT_OK != 0 {
                    // Short under SHORT_NOT_OK: the controller cancels the
                    // continuation URBs queued behind it before they run.
                    self.cancelled.extend(self.started.iter().copied());
                }
                return Poll::Ready(Ok(m.len()).into());
            }
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
        fn release(&mut self) {}
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn urbs_given_back_by_the_controller_are_held_and_unlinkable() {
        let backend = HostController {
            messages: VecDeque::from([vec![0xd7; 100], b"USBS-status!!".to_vec()]),
            started: Vec::new(),
            cancelled: HashSet::new(),
            waker: None,
        };
        let config = ServerConfig {
            hold_floor: Duration::from_millis(200),
            ..ServerConfig::default()
        };
        let s = TestServer::start_backends(vec![Box::new(backend)], config).await;
        let dev = usbwire_client::import(s.addr, "1-1").await.unwrap();
        let mut urb1 = dev.submit(TransferRequest::bulk_in(1, 512).with_flags(URB_SHORT_NOT_OK));
        let mut urb2 = dev.submit(TransferRequest::bulk_in(1, 512).with_flags(URB_SHORT_NOT_OK));
        let urb3 = dev.submit(TransferRequest::bulk_in(1, 512));
        let c1 = tokio::time::timeout(Duration::from_secs(10), &mut urb1)
            .await
            .unwrap();
        assert_eq!(c1.status, Err(TransferError::Short));
        assert_eq!(c1.data.len(), 100);
        urb2.cancel().await;
        let c2 = tokio::time::timeout(Duration::from_secs(10), &mut urb2)
            .await
            .unwrap();
        assert_eq!(
            c2.status,
            Err(TransferError::Cancelled),
            "URB2 was given back, so its unlink wins"
        );
        let c3 = tokio::time::timeout(Duration::from_secs(10), urb3)
            .await
            .unwrap();
        assert_eq!(c3.status, Ok(()));
        assert_eq!(
            c3.data, b"USBS-status!!",
            "the status reached URB3 after the hold"
        );
    }
}
