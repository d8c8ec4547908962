//! The session core's rules, checked without a socket, a clock or a sleep:
//! a scripted backend completes URBs when a test says so, and time is a
//! value the test advances.

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use usbwire_proto::urb::{
    flags, URB_HEADER_LEN, USBIP_CMD_UNLINK, USBIP_RET_SUBMIT, USBIP_RET_UNLINK,
};
use usbwire_proto::{CmdSubmit, CmdUnlink, DeviceInfo, Direction, Errno, Limits, SetupPacket};

use super::{SessionConfig, UrbSession, DIRECT_READ_MIN};
use crate::abuse::ByteBudget;
use crate::{Backend, Completion, SessionError, TransferType, Urb};

const BULK_OUT: u8 = 0x01;
const BULK_IN: u8 = 0x81;
const OTHER_IN: u8 = 0x82;
const GRACE: Duration = Duration::from_millis(50);
const REPLY_STALL: Duration = Duration::from_secs(60);

/// What the scripted device has been asked and told to do.
#[derive(Default)]
struct Script {
    /// Results the test has released, by seqnum: until then a bulk URB is
    /// pending in the "device".
    results: HashMap<u32, Completion>,
    /// Seqnums in the order the device first saw them.
    started: Vec<u32>,
    /// Seqnums whose cancellation was asked for.
    cancelled: Vec<u32>,
    /// `cancel` says "under way" instead of "gone".
    cancel_is_asynchronous: bool,
    max_active: usize,
    gone: bool,
    releases: usize,
}

struct ScriptedDevice(Arc<Mutex<Script>>);

impl Backend for ScriptedDevice {
    fn device_info(&self, _busid: &str, _busnum: u32, _devnum: u32) -> DeviceInfo {
        unreachable!("the session never asks for it")
    }

    fn transfer_type(&self, ep_address: u8) -> Option<TransferType> {
        matches!(ep_address, BULK_OUT | BULK_IN | OTHER_IN).then_some(TransferType::Bulk)
    }

    fn poll_urb(&mut self, urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
        let mut script = self.0.lock().unwrap();
        if urb.ep == 0 {
            let ok = Completion::Ran {
                actual: 0,
                error: None,
            };
            return Poll::Ready(script.results.remove(&urb.seqnum).unwrap_or(ok));
        }
        if !script.started.contains(&urb.seqnum) {
            script.started.push(urb.seqnum);
        }
        if let Some(c) = script.results.remove(&urb.seqnum) {
            if let Completion::Ran { actual, .. } = c {
                if urb.direction == Direction::In {
                    urb.buf[..actual].fill(0xd7);
                }
            }
            script.started.retain(|s| *s != urb.seqnum);
            return Poll::Ready(c);
        }
        Poll::Pending
    }

    fn max_active(&self, _ep_address: u8) -> usize {
        self.0.lock().unwrap().max_active
    }

    fn cancel(&mut self, urb: &mut Urb) -> bool {
        let mut script = self.0.lock().unwrap();
        script.cancelled.push(urb.seqnum);
        !script.cancel_is_asynchronous
    }

    fn is_gone(&self) -> bool {
        self.0.lock().unwrap().gone
    }

    fn release(&mut self) {
        self.0.lock().unwrap().releases += 1;
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct WakeCount(AtomicUsize);

impl Wake for WakeCount {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A reply as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Submit {
        seqnum: u32,
        status: i32,
        data: Vec<u8>,
    },
    Unlink {
        seqnum: u32,
        status: i32,
    },
}

fn ret_submit(seqnum: u32, status: i32, len: usize) -> Reply {
    Reply::Submit {
        seqnum,
        status,
        data: vec![0xd7; len],
    }
}

fn ret_unlink(seqnum: u32, status: i32) -> Reply {
    Reply::Unlink { seqnum, status }
}

const ECONNRESET: i32 = Errno::ECONNRESET.to_status();
const EPIPE: i32 = Errno::EPIPE.to_status();

/// A session over the scripted device, and the client's side of it.
struct Harness {
    session: UrbSession,
    script: Arc<Mutex<Script>>,
    now: Instant,
    /// Direction of each URB submitted, to tell whether data follows a reply.
    directions: HashMap<u32, Direction>,
    sent: Vec<u8>,
    /// How often the session's waker fired.
    woken: Arc<WakeCount>,
}

fn config() -> SessionConfig {
    SessionConfig {
        limits: Limits::default(),
        max_urbs_in_flight: 1024,
        max_bytes_in_flight: 64 << 20,
        hold_on_error: true,
        hold_grace: GRACE,
        reply_stall_timeout: REPLY_STALL,
    }
}

impl Harness {
    fn new() -> Self {
        Self::with_config(config())
    }

    fn with_config(config: SessionConfig) -> Self {
        let script = Arc::new(Mutex::new(Script {
            max_active: 1,
            ..Script::default()
        }));
        let now = Instant::now();
        let woken = Arc::new(WakeCount::default());
        let session = UrbSession::new(
            config,
            Box::new(ScriptedDevice(script.clone())),
            Waker::from(woken.clone()),
            "1-1",
            "test".into(),
            now,
        );
        Harness {
            session,
            script,
            now,
            directions: HashMap::new(),
            sent: Vec::new(),
            woken,
        }
    }

    /// A session that also takes from `budget`, shared with others.
    fn with_budget(budget: &Arc<ByteBudget>) -> Self {
        let mut h = Self::new();
        let session = std::mem::replace(&mut h.session, Self::new().session);
        h.session = session.with_budget(budget.share());
        h.script().max_active = 8;
        h
    }

    fn wakes(&self) -> usize {
        self.woken.0.load(Ordering::Relaxed)
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        let taken = self.session.handle_input(self.now, bytes)?;
        assert_eq!(
            taken,
            bytes.len(),
            "the session took only part of the input"
        );
        Ok(())
    }

    fn submit_frame(
        &mut self,
        seqnum: u32,
        ep: u8,
        len: u32,
        flags: u32,
        setup: [u8; 8],
    ) -> Vec<u8> {
        let direction = if ep & 0x80 != 0 || (ep == 0 && setup[0] & 0x80 != 0) {
            Direction::In
        } else {
            Direction::Out
        };
        self.directions.insert(seqnum, direction);
        let cmd = CmdSubmit {
            seqnum,
            devid: 0x10002,
            direction,
            ep: u32::from(ep & 0x0f),
            transfer_flags: flags,
            transfer_buffer_length: len,
            start_frame: 0,
            number_of_packets: u32::MAX,
            interval: 0,
            setup,
        };
        let mut frame = Vec::new();
        cmd.encode(&vec![0x5a; len as usize], &[], &mut frame);
        frame
    }

    fn submit(&mut self, seqnum: u32, ep: u8, len: u32) {
        self.submit_with(seqnum, ep, len, 0);
    }

    fn submit_with(&mut self, seqnum: u32, ep: u8, len: u32, flags: u32) {
        let frame = self.submit_frame(seqnum, ep, len, flags, [0; 8]);
        self.send(&frame).unwrap();
    }

    fn control_out(&mut self, seqnum: u32, request_type: u8, request: u8, value: u16, index: u16) {
        let setup = SetupPacket {
            request_type,
            request,
            value,
            index,
            length: 0,
        }
        .to_bytes();
        let frame = self.submit_frame(seqnum, 0, 0, 0, setup);
        self.send(&frame).unwrap();
    }

    fn unlink(&mut self, seqnum: u32, target: u32) {
        let mut frame = Vec::new();
        CmdUnlink {
            seqnum,
            devid: 0x10002,
            unlink_seqnum: target,
            ..Default::default()
        }
        .encode(&mut frame);
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()),
            USBIP_CMD_UNLINK
        );
        self.send(&frame).unwrap();
    }

    /// The device finishes URB `seqnum` (once it is polled), and the waker
    /// that a real device would fire makes the driver poll the session.
    fn finish(&mut self, seqnum: u32, completion: Completion) {
        self.script().results.insert(seqnum, completion);
        self.session.poll_backend(self.now).unwrap();
    }

    fn finish_ok(&mut self, seqnum: u32, actual: usize) {
        self.finish(
            seqnum,
            Completion::Ran {
                actual,
                error: None,
            },
        );
    }

    /// Moves virtual time on, and handles the deadline if it has come, as
    /// the driver's timer would.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        if self.session.poll_timeout().is_some_and(|t| t <= self.now) {
            self.session.handle_timeout(self.now);
        }
    }

    /// Sends what the session has to send, a few bytes at a time so that
    /// partial writes are exercised, and decodes it.
    fn replies(&mut self) -> Vec<Reply> {
        for round in 0..100_000 {
            if !self.session.has_output() {
                break;
            }
            let mut slices = [IoSlice::new(&[]); 4];
            let used = self.session.poll_transmit(&mut slices);
            // Short writes that split headers, and long ones.
            let room = if round % 2 == 0 { 37 } else { 1 << 20 };
            let mut n = 0;
            for s in &slices[..used] {
                let take = s.len().min(room - n);
                self.sent.extend_from_slice(&s[..take]);
                n += take;
            }
            self.session.transmitted(self.now, n).unwrap();
        }
        assert!(!self.session.has_output(), "output did not drain");
        let mut replies = Vec::new();
        let mut at = 0;
        let word = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        while at < self.sent.len() {
            let b = &self.sent[at..];
            let seqnum = word(b, 4);
            let status = word(b, 20) as i32;
            match word(b, 0) {
                USBIP_RET_SUBMIT => {
                    let len = if self.directions[&seqnum] == Direction::In {
                        word(b, 24) as usize
                    } else {
                        0
                    };
                    let data = b[URB_HEADER_LEN..URB_HEADER_LEN + len].to_vec();
                    replies.push(Reply::Submit {
                        seqnum,
                        status,
                        data,
                    });
                    at += URB_HEADER_LEN + len;
                }
                USBIP_RET_UNLINK => {
                    replies.push(Reply::Unlink { seqnum, status });
                    at += URB_HEADER_LEN;
                }
                other => panic!("not a reply: {other:#x}"),
            }
        }
        self.sent.clear();
        replies
    }

    fn started(&self) -> Vec<u32> {
        self.script().started.clone()
    }
}

// ---- the ordered reply path and the unlink rules ----

/// Where, relative to the unlink, the URB's completion lands.
#[derive(Debug, Clone, Copy)]
enum Interleaving {
    /// Completed and its reply sent before the unlink arrives.
    CompletedAndSent,
    /// Completed, reply still queued, when the unlink arrives.
    CompletedNotSent,
    /// Still running; the backend cancels it at once.
    CancelledAtOnce,
    /// Still running; the cancellation is under way and the URB then
    /// completes with data (it finished first).
    CancelRacesCompletion,
    /// Still running; the cancellation is under way and the URB then
    /// ends with -ECONNRESET (stopped in time).
    CancelledLater,
    /// Not started yet: queued behind another URB of its endpoint.
    StillWaiting,
}

#[test]
fn ret_submit_precedes_ret_unlink_under_every_interleaving() {
    use Interleaving::*;
    for case in [
        CompletedAndSent,
        CompletedNotSent,
        CancelledAtOnce,
        CancelRacesCompletion,
        CancelledLater,
        StillWaiting,
    ] {
        let mut h = Harness::new();
        h.script().cancel_is_asynchronous = matches!(case, CancelRacesCompletion | CancelledLater);
        let mut replies = Vec::new();
        if matches!(case, StillWaiting) {
            h.submit(1, BULK_IN, 64);
        }
        h.submit(2, BULK_IN, 64);
        match case {
            CompletedAndSent => {
                h.finish_ok(2, 64);
                replies.extend(h.replies());
            }
            CompletedNotSent => h.finish_ok(2, 64),
            _ => {}
        }
        h.unlink(3, 2);
        match case {
            CancelRacesCompletion => h.finish_ok(2, 64),
            CancelledLater => h.finish(2, Completion::failed(Errno::ECONNRESET)),
            _ => {}
        }
        replies.extend(h.replies());
        let expected = match case {
            CompletedAndSent | CompletedNotSent | CancelRacesCompletion => {
                vec![ret_submit(2, 0, 64), ret_unlink(3, 0)]
            }
            CancelledAtOnce | CancelledLater | StillWaiting => vec![ret_unlink(3, ECONNRESET)],
        };
        assert_eq!(replies, expected, "{case:?}");
        if matches!(case, StillWaiting) {
            assert_eq!(
                h.started(),
                vec![1],
                "the unlinked URB never reached the device"
            );
        }
        // The unlinked URB's seqnum is free again, whichever way it ended.
        h.submit(2, BULK_OUT, 8);
    }
}

/// The capture sees every URB submitted and completed, an unlinked one
/// completing with -ECONNRESET however the unlink took it; an URB for an
/// endpoint the device lacks, and a submit its early unlink dropped, too.
#[test]
fn the_capture_records_each_urb_and_unlinks_as_econnreset() {
    use crate::capture::test_recorder;
    let mut h = Harness::new();
    let (recorder, records) = test_recorder(64);
    let session = std::mem::replace(&mut h.session, Harness::new().session);
    h.session = session.with_capture(recorder);
    h.script().cancel_is_asynchronous = false;
    // 1 completes; 2 is cancelled at once; 4 never started (behind 3).
    h.submit(1, BULK_IN, 64);
    h.finish_ok(1, 64);
    h.submit(2, BULK_IN, 64);
    h.unlink(10, 2);
    h.submit(3, BULK_IN, 64);
    h.submit(4, BULK_IN, 64);
    h.unlink(11, 4);
    // An endpoint the device does not have: submitted and stalled.
    h.submit(5, 0x87, 8);
    h.finish_ok(3, 64);
    let seen: Vec<(u8, i32, u32)> = records
        .take()
        .iter()
        .map(|(r, _, _)| (r.kind, r.status, r.len_urb))
        .collect();
    let (s, c) = (b'S', b'C');
    let reset = Errno::ECONNRESET.to_status();
    assert_eq!(
        seen,
        vec![
            (s, -115, 64),
            (c, 0, 64),
            (s, -115, 64),
            (c, reset, 0),
            (s, -115, 64),
            (s, -115, 64),
            (c, reset, 0),
            (s, -115, 8),
            (c, Errno::EPIPE.to_status(), 0),
            (c, 0, 64),
        ]
    );
}

#[test]
fn unlink_before_its_submit_is_answered_and_the_submit_dropped() {
    let mut h = Harness::new();
    h.submit(1, BULK_IN, 64);
    h.finish_ok(1, 64);
    // vhci's race: the unlink of seqnum 2 overtakes the submit of 2.
    h.unlink(3, 2);
    h.submit(2, BULK_IN, 64);
    assert_eq!(
        h.replies(),
        vec![ret_submit(1, 0, 64), ret_unlink(3, ECONNRESET)]
    );
    assert_eq!(
        h.started(),
        Vec::<u32>::new(),
        "the dropped submit never ran"
    );
    // The next submit with another seqnum runs as usual.
    h.submit(4, BULK_IN, 64);
    h.finish_ok(4, 64);
    assert_eq!(h.replies(), vec![ret_submit(4, 0, 64)]);
}

#[test]
fn unlink_of_an_urb_completed_long_ago_answers_zero() {
    let mut h = Harness::new();
    h.submit(1, BULK_IN, 64);
    h.finish_ok(1, 64);
    h.submit(2, BULK_IN, 64);
    h.finish_ok(2, 64);
    h.unlink(3, 1);
    assert_eq!(
        h.replies(),
        vec![ret_submit(1, 0, 64), ret_submit(2, 0, 64), ret_unlink(3, 0)]
    );
}

#[test]
fn unlink_before_submit_across_seqnum_wrap_around() {
    let mut h = Harness::new();
    h.submit(u32::MAX, BULK_IN, 8);
    h.finish_ok(u32::MAX, 8);
    // 1 is after u32::MAX in serial-number order: not completed, so early.
    h.unlink(2, 1);
    h.submit(1, BULK_IN, 8);
    assert_eq!(
        h.replies(),
        vec![ret_submit(u32::MAX, 0, 8), ret_unlink(2, ECONNRESET)]
    );
    assert!(h.started().is_empty());
}

// ---- the error hold ----

/// URB 1 fails on BULK_IN; 2 is queued behind it. The device takes several
/// URBs at once, so only the hold can keep 2 from starting.
fn held() -> Harness {
    let mut h = Harness::new();
    h.script().max_active = 8;
    h.submit(1, BULK_IN, 64);
    h.finish(1, Completion::failed(Errno::EPIPE));
    h.submit(2, BULK_IN, 64);
    assert_eq!(h.replies(), vec![ret_submit(1, EPIPE, 0)]);
    assert!(!h.started().contains(&2), "URB 2 started past the error");
    h
}

#[test]
fn error_hold_starts_on_an_endpoint_error_and_holds_what_follows() {
    let mut h = held();
    assert_eq!(h.session.poll_timeout(), Some(h.now + GRACE));
    // Held: more URBs for that endpoint wait too, and time just short of
    // the grace window changes nothing.
    h.submit(3, BULK_IN, 64);
    h.advance(GRACE - Duration::from_millis(1));
    assert!(h.started().is_empty(), "{:?}", h.started());
    // What may pass it: other endpoints, and control transfers.
    h.submit(4, OTHER_IN, 64);
    h.submit(5, BULK_OUT, 8);
    h.finish_ok(4, 64);
    h.finish_ok(5, 0);
    h.control_out(6, 0x00, 3, 1, 0); // SET_FEATURE(remote wakeup): ends no hold
    assert_eq!(
        h.replies(),
        vec![
            ret_submit(4, 0, 64),
            ret_submit(5, 0, 0),
            ret_submit(6, 0, 0)
        ]
    );
    assert!(!h.started().contains(&2));
}

#[test]
fn error_hold_ends_at_the_grace_expiry_in_order() {
    let mut h = held();
    h.submit(3, BULK_IN, 64);
    h.advance(GRACE);
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
    assert_eq!(h.started(), vec![2, 3], "released in submission order");
    h.finish_ok(2, 10);
    h.finish_ok(3, 10);
    assert_eq!(
        h.replies(),
        vec![ret_submit(2, 0, 10), ret_submit(3, 0, 10)]
    );
}

#[test]
fn error_hold_ends_on_clear_halt_of_its_endpoint_only() {
    let mut h = held();
    // An error on another endpoint holds that one too.
    h.submit(10, BULK_OUT, 8);
    h.finish(10, Completion::failed(Errno::EPIPE));
    h.submit(11, BULK_OUT, 8);
    h.control_out(20, 0x02, 1, 0, u16::from(BULK_IN)); // CLEAR_FEATURE(ENDPOINT_HALT)
    assert!(h.started().contains(&2), "the cleared endpoint runs");
    assert!(!h.started().contains(&11), "the other endpoint stays held");
    assert!(h.session.poll_timeout().is_some());
}

#[test]
fn error_hold_ends_on_set_interface() {
    let mut h = held();
    h.control_out(20, 0x01, 11, 0, 0);
    assert_eq!(h.started(), vec![2]);
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
}

#[test]
fn error_hold_ends_on_set_configuration() {
    let mut h = held();
    h.control_out(20, 0x00, 9, 1, 0);
    assert_eq!(h.started(), vec![2]);
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
}

#[test]
fn error_hold_ends_on_reset() {
    let mut h = held();
    h.control_out(20, 0x23, 3, 4, 1); // SET_FEATURE(PORT_RESET)
    assert_eq!(h.started(), vec![2]);
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
}

#[test]
fn error_hold_unlinked_urbs_never_run_and_the_rest_stay_held() {
    let mut h = held();
    h.submit(3, BULK_IN, 64);
    // usb_sg_wait's reaction: unlink what was queued behind the failure.
    h.unlink(4, 2);
    assert_eq!(h.replies(), vec![ret_unlink(4, ECONNRESET)]);
    assert!(h.started().is_empty(), "the unlinked URB never ran");
    // What was not unlinked waits for the grace window or another end.
    h.advance(GRACE);
    assert_eq!(h.started(), vec![3]);
}

#[test]
fn error_hold_takes_back_urbs_the_device_gave_back_unrun() {
    let mut h = Harness::new();
    h.script().max_active = 8;
    h.submit(1, BULK_IN, 64);
    h.submit(2, BULK_IN, 64);
    assert_eq!(h.started(), vec![1, 2]);
    // The controller fails 1 and cancels 2 before it ran (bulk continuation).
    h.script().results.insert(2, Completion::NotStarted);
    h.finish(1, Completion::failed(Errno::EPIPE));
    assert_eq!(h.replies(), vec![ret_submit(1, EPIPE, 0)]);
    h.script().started.clear();
    h.advance(GRACE / 2);
    assert!(
        h.started().is_empty(),
        "a given-back URB is held like a waiting one"
    );
    h.advance(GRACE);
    assert_eq!(h.started(), vec![2]);
}

#[test]
fn error_hold_starts_not_on_unlinks_control_or_when_switched_off() {
    // An URB ended by its own unlink is no endpoint error.
    let mut h = Harness::new();
    h.script().cancel_is_asynchronous = true;
    h.submit(1, BULK_IN, 64);
    h.unlink(2, 1);
    h.finish(1, Completion::failed(Errno::ECONNRESET));
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
    // A stalled control request holds nothing.
    let mut h = Harness::new();
    h.script()
        .results
        .insert(1, Completion::failed(Errno::EPIPE));
    h.control_out(1, 0x00, 3, 1, 0);
    assert_eq!(h.replies(), vec![ret_submit(1, EPIPE, 0)]);
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
    // hold_on_error = false: URB 2 starts as soon as 1 failed.
    let mut h = Harness::with_config(SessionConfig {
        hold_on_error: false,
        ..config()
    });
    h.submit(1, BULK_IN, 64);
    h.submit(2, BULK_IN, 64);
    h.finish(1, Completion::failed(Errno::EPIPE));
    assert!(h.started().contains(&2));
    // No hold; and no reply waits unread, so no deadline at all.
    h.replies();
    assert_eq!(h.session.poll_timeout(), None);
}

#[test]
fn short_read_with_short_not_ok_is_an_error_that_holds() {
    let mut h = Harness::new();
    h.submit_with(1, BULK_IN, 512, flags::URB_SHORT_NOT_OK);
    h.submit(2, BULK_IN, 512);
    h.finish_ok(1, 100);
    assert_eq!(
        h.replies(),
        vec![ret_submit(1, Errno::EREMOTEIO.to_status(), 100)],
        "the short data still goes out, with the error"
    );
    assert!(!h.started().contains(&2));
    assert!(h.session.poll_timeout().is_some());
}

// ---- bounds, departures, seqnums ----

#[test]
fn in_flight_bounds_stop_commands_but_not_reading() {
    let mut h = Harness::with_config(SessionConfig {
        max_urbs_in_flight: 4,
        ..config()
    });
    h.script().max_active = 8;
    for seqnum in 1..=6 {
        h.submit(seqnum, BULK_IN, 64);
    }
    assert_eq!(h.session.in_flight().0, 4);
    assert_eq!(h.started(), vec![1, 2, 3, 4]);
    // Still reading: that is how a peer that went away is noticed.
    assert!(h.session.wants_input());
    h.finish_ok(1, 64);
    assert_eq!(
        h.started(),
        vec![2, 3, 4, 5],
        "a completion lets the next command in"
    );
    assert_eq!(h.session.in_flight().0, 4);
}

#[test]
fn bytes_in_flight_and_unsent_replies_are_bounded() {
    let limits = Limits::default();
    let max = limits.max_transfer_length as usize;
    let mut h = Harness::with_config(SessionConfig {
        max_bytes_in_flight: max,
        ..config()
    });
    h.script().max_active = 8;
    h.submit(1, BULK_IN, max as u32);
    h.submit(2, BULK_IN, 64);
    assert_eq!(h.started(), vec![1], "the byte bound keeps 2 out");
    // 1 completes, but its reply (max bytes) is not sent yet: still bounded.
    h.finish_ok(1, max);
    assert_eq!(h.started(), Vec::<u32>::new());
    let (urbs, bytes, unsent) = h.session.in_flight();
    assert_eq!((urbs, bytes), (0, 0));
    assert!(unsent >= URB_HEADER_LEN + max);
    // Sending the reply makes room.
    assert_eq!(h.replies().len(), 1);
    assert_eq!(h.started(), vec![2]);
}

#[test]
fn short_replies_count_the_buffers_they_hold() {
    // A peer that asks for large IN transfers, gets a byte from each and
    // reads no replies must not make the server keep a large buffer per
    // reply: the unsent replies count at the memory they hold.
    let mut h = Harness::with_config(SessionConfig {
        max_bytes_in_flight: 1 << 20,
        ..config()
    });
    for seqnum in 1..=4 {
        h.submit(seqnum, BULK_IN, 256 << 10);
        h.finish_ok(seqnum, 1);
    }
    h.submit(5, BULK_IN, 64);
    let (urbs, _, unsent) = h.session.in_flight();
    assert_eq!(urbs, 0);
    assert!(unsent >= 1 << 20, "four replies hold four 256 KiB buffers");
    assert!(h.started().is_empty(), "the fifth command waits");
    assert_eq!(h.replies().len(), 4);
    assert_eq!(h.started(), vec![5], "sent replies make room again");
}

#[test]
fn read_buffer_is_bounded_when_commands_are_held_back() {
    let mut h = Harness::with_config(SessionConfig {
        max_urbs_in_flight: 1,
        ..config()
    });
    h.submit(1, BULK_IN, 64);
    let frames = h.submit_frame(2, BULK_IN, 64, 0, [0; 8]).repeat(1000);
    let mut offered = 0;
    for _ in 0..100_000 {
        let taken = h.session.handle_input(h.now, &frames).unwrap();
        offered += taken;
        if taken < frames.len() {
            break;
        }
    }
    assert!(
        !h.session.wants_input(),
        "the session stops reading at its limit"
    );
    assert!(offered <= config().read_limit() + super::READ_CHUNK);
    assert!(h.session.buffered_bytes() <= config().read_limit() + super::READ_CHUNK);
}

#[test]
fn departed_peer_gives_the_device_back_with_urbs_in_flight() {
    let mut h = Harness::new();
    h.submit(1, BULK_IN, 64);
    h.submit(2, BULK_OUT, 8);
    assert_eq!(h.started(), vec![1, 2]);
    // The driver saw EOF: the session ends and its device goes back to the
    // registry for release, whatever was in flight.
    let Harness {
        session, script, ..
    } = h;
    let mut backend = session.into_backend();
    backend.release();
    assert_eq!(script.lock().unwrap().releases, 1);
}

#[test]
fn departed_device_answers_what_it_never_started_with_enodev() {
    let mut h = Harness::new();
    h.submit(1, BULK_IN, 64);
    h.submit(2, BULK_IN, 64);
    h.script().gone = true;
    assert!(!h.session.poll_device_gone(), "1 is still in the device");
    h.finish(1, Completion::failed(Errno::ENODEV));
    assert!(!h.session.poll_device_gone(), "replies are not sent yet");
    let enodev = Errno::ENODEV.to_status();
    assert_eq!(
        h.replies(),
        vec![ret_submit(2, enodev, 0), ret_submit(1, enodev, 0)]
    );
    assert!(h.session.poll_device_gone());
}

#[test]
fn duplicate_seqnum_in_flight_is_refused() {
    let mut h = Harness::new();
    h.submit(7, BULK_IN, 64);
    let again = h.submit_frame(7, BULK_OUT, 8, 0, [0; 8]);
    assert!(matches!(
        h.session.handle_input(h.now, &again),
        Err(SessionError::DuplicateSeqnum(7))
    ));
}

#[test]
fn seqnum_may_come_again_once_its_urb_completed() {
    let mut h = Harness::new();
    h.submit(7, BULK_IN, 64);
    h.finish_ok(7, 64);
    h.submit(7, BULK_IN, 64);
    h.finish_ok(7, 32);
    assert_eq!(
        h.replies(),
        vec![ret_submit(7, 0, 64), ret_submit(7, 0, 32)]
    );
}

#[test]
fn urbs_for_missing_endpoints_stall_without_reaching_the_device() {
    let mut h = Harness::new();
    h.submit(1, 0x85, 64);
    assert_eq!(h.replies(), vec![ret_submit(1, EPIPE, 0)]);
    assert!(h.started().is_empty());
}

#[test]
fn protocol_errors_end_the_session() {
    let mut h = Harness::new();
    let mut frame = h.submit_frame(1, BULK_IN, 64, 0, [0; 8]);
    frame[0..4].copy_from_slice(&9u32.to_be_bytes());
    assert!(matches!(
        h.session.handle_input(h.now, &frame),
        Err(SessionError::Protocol(_))
    ));
}

// ---- the data path ----

#[test]
fn large_out_payload_is_read_straight_into_its_urb_buffer() {
    let mut h = Harness::new();
    let len = DIRECT_READ_MIN as u32 * 4;
    let frame = h.submit_frame(1, BULK_OUT, len, 0, [0; 8]);
    h.send(&frame[..URB_HEADER_LEN + 100]).unwrap();
    // The transport is now lent the URB's own buffer for the rest of the
    // payload, and room for the next command's header behind it.
    let lent: Vec<usize> = h.session.read_buffers().iter().map(|b| b.len()).collect();
    assert_eq!(lent, vec![len as usize - 100, URB_HEADER_LEN]);
    // The payload's end and the next command arrive in one read.
    let mut rest = frame[URB_HEADER_LEN + 100..].to_vec();
    rest.extend(h.submit_frame(2, BULK_IN, 64, 0, [0; 8]));
    h.send(&rest).unwrap();
    assert_eq!(h.started(), vec![1, 2]);
    h.finish_ok(1, len as usize);
    h.finish_ok(2, 64);
    assert_eq!(h.replies(), vec![ret_submit(1, 0, 0), ret_submit(2, 0, 64)]);
}

#[test]
fn input_in_any_chunking_gives_the_same_replies() {
    let mut frames = Vec::new();
    let mut h = Harness::new();
    h.script().max_active = 16;
    for seqnum in 1..=20u32 {
        let ep = if seqnum % 2 == 0 { BULK_IN } else { BULK_OUT };
        let len = if seqnum % 5 == 0 {
            DIRECT_READ_MIN as u32 + 7
        } else {
            seqnum * 3
        };
        frames.extend(h.submit_frame(seqnum, ep, len, 0, [0; 8]));
    }
    for chunk in [1, 7, 48, 4096, frames.len()] {
        let mut h2 = Harness::new();
        h2.script().max_active = 16;
        h2.directions = h.directions.clone();
        for part in frames.chunks(chunk) {
            h2.send(part).unwrap();
        }
        assert_eq!(h2.started(), (1..=20).collect::<Vec<_>>(), "chunk {chunk}");
    }
}

#[test]
fn waker_given_by_the_driver_reaches_the_backend() {
    struct WakesOnPoll;
    impl Backend for WakesOnPoll {
        fn device_info(&self, _: &str, _: u32, _: u32) -> DeviceInfo {
            unreachable!()
        }
        fn transfer_type(&self, ep: u8) -> Option<TransferType> {
            (ep == BULK_IN).then_some(TransferType::Bulk)
        }
        fn poll_urb(&mut self, _urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
        fn release(&mut self) {}
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let wakes = Arc::new(WakeCount::default());
    let now = Instant::now();
    let mut session = UrbSession::new(
        config(),
        Box::new(WakesOnPoll),
        Waker::from(wakes.clone()),
        "1-1",
        "test".into(),
        now,
    );
    let mut frame = Vec::new();
    CmdSubmit {
        seqnum: 1,
        devid: 0,
        direction: Direction::In,
        ep: 1,
        transfer_flags: 0,
        transfer_buffer_length: 8,
        start_frame: 0,
        number_of_packets: 0,
        interval: 0,
        setup: [0; 8],
    }
    .encode(&[], &[], &mut frame);
    session.handle_input(now, &frame).unwrap();
    assert!(wakes.0.load(Ordering::Relaxed) > 0);
}

// ---- the OP phase ----

mod op_phase {
    use std::time::{Duration, Instant};

    use usbwire_proto::{OpRequest, USBIP_VERSION};

    use crate::session::{OpEvent, OpSession, OP_TIMEOUT};
    use crate::SessionError;

    /// Feeds `bytes` through the buffers the OP phase lends, as a transport
    /// would; returns the event and how many bytes it read.
    fn feed(op: &mut OpSession, bytes: &[u8]) -> (Result<Option<OpEvent>, SessionError>, usize) {
        let mut at = 0;
        while at < bytes.len() {
            let buf = op.read_buffer();
            let n = buf.len().min(bytes.len() - at);
            buf[..n].copy_from_slice(&bytes[at..at + n]);
            at += n;
            match op.input_filled(n) {
                Ok(None) => {}
                other => return (other, at),
            }
        }
        (Ok(None), at)
    }

    #[test]
    fn import_request_is_read_to_its_end_and_no_further() {
        let mut op = OpSession::new(Instant::now());
        let mut bytes = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "1-1".into(),
        }
        .encode(&mut bytes);
        let request_len = bytes.len();
        bytes.extend_from_slice(&[0xee; 100]); // the first URB command, say
        let (event, read) = feed(&mut op, &bytes);
        assert_eq!(event.unwrap(), Some(OpEvent::ImportRequested("1-1".into())));
        assert_eq!(read, request_len, "nothing of the URB phase is read here");
    }

    #[test]
    fn devlist_request_is_answered_then_the_connection_ends() {
        let mut op = OpSession::new(Instant::now());
        let mut bytes = Vec::new();
        OpRequest::Devlist {
            version: USBIP_VERSION,
        }
        .encode(&mut bytes);
        let (event, _) = feed(&mut op, &bytes);
        assert_eq!(event.unwrap(), Some(OpEvent::DevlistRequested));
        op.answer_devlist(Vec::new());
        let reply = op.poll_transmit().to_vec();
        assert_eq!(reply.len(), 12, "header and a device count of zero");
        op.transmitted(5);
        assert_eq!(op.poll_transmit(), &reply[5..]);
    }

    #[test]
    fn unknown_request_gets_a_failure_reply_and_ends_the_connection() {
        let mut op = OpSession::new(Instant::now());
        let bytes = [0x01, 0x11, 0x80, 0x42, 0, 0, 0, 0];
        let (event, _) = feed(&mut op, &bytes);
        assert!(matches!(event, Err(SessionError::Protocol(_))));
        assert_eq!(
            op.poll_transmit(),
            &[0x01, 0x11, 0x00, 0x42, 0, 0, 0, 1],
            "the reply code of the same request, status ST_NA"
        );
    }

    #[test]
    fn request_not_sent_in_time_ends_the_connection() {
        let start = Instant::now();
        let mut op = OpSession::new(start);
        assert_eq!(op.poll_timeout(), start + OP_TIMEOUT);
        assert!(op
            .handle_timeout(start + OP_TIMEOUT - Duration::from_millis(1))
            .is_ok());
        assert!(matches!(
            op.handle_timeout(start + OP_TIMEOUT),
            Err(SessionError::Timeout)
        ));
    }
}

#[test]
fn a_global_budget_makes_sessions_wait_in_turn() {
    const K64: u32 = 64 << 10;
    let budget = ByteBudget::new(2 * K64 as usize);
    let mut a = Harness::with_budget(&budget);
    let mut b = Harness::with_budget(&budget);
    a.submit(1, BULK_IN, K64);
    a.submit(2, BULK_IN, K64);
    assert_eq!(a.started(), vec![1, 2]);
    // B's command waits: no error, no reply, just not started.
    b.submit(10, BULK_IN, K64);
    assert!(b.started().is_empty());
    assert!(!b.session.has_output());
    assert_eq!(budget.waiting(), 1);
    let b_wakes = b.wakes();
    // A's completed URB still holds its bytes until its reply is sent.
    a.finish_ok(1, K64 as usize);
    assert_eq!(b.wakes(), b_wakes, "nothing freed yet");
    assert_eq!(a.replies(), vec![ret_submit(1, 0, K64 as usize)]);
    assert!(b.wakes() > b_wakes, "B is told that its turn came");
    // A asks again before B came back for its share: B goes first.
    a.submit(3, BULK_IN, K64);
    assert_eq!(a.started(), vec![2]);
    b.session.poll_backend(b.now).unwrap();
    assert_eq!(b.started(), vec![10]);
    // Then A, once its own bytes come back.
    a.finish_ok(2, K64 as usize);
    a.replies();
    assert_eq!(a.started(), vec![3]);
    assert_eq!(budget.waiting(), 0);
    b.finish_ok(10, K64 as usize);
    b.replies();
    a.finish_ok(3, K64 as usize);
    a.replies();
    assert_eq!(budget.available(), 2 * i64::from(K64));
}

#[test]
fn a_session_out_of_budget_stops_reading_at_its_limit() {
    let budget = ByteBudget::new(64 << 10);
    let mut other = Harness::with_budget(&budget);
    other.submit(1, BULK_IN, 64 << 10);
    let mut h = Harness::with_budget(&budget);
    // More than the read buffer's bound, all waiting for budget.
    let frames: Vec<u8> = (2..2600)
        .flat_map(|seqnum| h.submit_frame(seqnum, BULK_OUT, 4096, 0, [0; 8]))
        .collect();
    let offered = h.session.handle_input(h.now, &frames).unwrap();
    assert!(offered < frames.len());
    assert!(h.started().is_empty());
    assert!(!h.session.wants_input(), "backpressure, not an error");
    assert!(offered <= config().read_limit() + super::READ_CHUNK);
    // The holder's bytes come back: the waiting session goes on.
    other.finish_ok(1, 0);
    other.replies();
    h.session.poll_backend(h.now).unwrap();
    assert_eq!(h.started().first(), Some(&2));
}

#[test]
fn an_ended_session_gives_its_budget_back() {
    let budget = ByteBudget::new(1 << 20);
    let mut h = Harness::with_budget(&budget);
    h.submit(1, BULK_IN, 256 << 10);
    h.submit(2, BULK_OUT, 64 << 10);
    assert!(budget.available() <= (1 << 20) - (320 << 10));
    drop(h);
    assert_eq!(budget.available(), 1 << 20);
}

// ---- a client that reads none of its replies ----

#[test]
fn a_client_reading_no_replies_is_given_up_on_after_the_stall_timeout() {
    let mut h = Harness::new();
    assert_eq!(h.session.poll_timeout(), None, "nothing to send yet");
    h.submit(1, BULK_IN, 64);
    h.finish_ok(1, 64);
    let since = h.now;
    assert_eq!(h.session.poll_timeout(), Some(since + REPLY_STALL));
    h.advance(REPLY_STALL - Duration::from_millis(1));
    assert!(!h.session.replies_stalled(h.now));
    // The client takes a few bytes: the clock starts again from there.
    let mut slices = [IoSlice::new(&[]); 4];
    h.session.poll_transmit(&mut slices);
    h.session.transmitted(h.now, 7).unwrap();
    let progress = h.now;
    assert_eq!(h.session.poll_timeout(), Some(progress + REPLY_STALL));
    h.advance(REPLY_STALL - Duration::from_millis(1));
    assert!(!h.session.replies_stalled(h.now));
    h.now += Duration::from_millis(1);
    assert!(
        h.session.replies_stalled(h.now),
        "no byte taken for the whole window"
    );
}

#[test]
fn replies_taken_in_time_stop_the_stall_clock() {
    let mut h = Harness::new();
    h.submit(1, BULK_IN, 64);
    h.finish_ok(1, 64);
    h.advance(REPLY_STALL / 2);
    assert_eq!(h.replies(), vec![ret_submit(1, 0, 64)]);
    assert_eq!(h.session.poll_timeout(), None);
    h.advance(REPLY_STALL * 2);
    assert!(!h.session.replies_stalled(h.now));
    // A new reply starts a new window, from when it was made.
    h.submit(2, BULK_IN, 64);
    h.finish_ok(2, 64);
    assert_eq!(h.session.poll_timeout(), Some(h.now + REPLY_STALL));
}

#[test]
fn metrics_count_urbs_and_error_holds_with_how_each_ended() {
    use crate::metrics::{Metrics, DIRECTIONS, TRANSFER_TYPES};
    let server = Arc::new(Metrics::default());
    let device = server.device("1-1");
    let mut h = Harness::new();
    let session = std::mem::replace(&mut h.session, Harness::new().session);
    h.session = session.with_metrics(device.clone(), server.clone());
    h.script().max_active = 8;
    let ended = |how: &str| {
        server
            .holds_ended()
            .iter()
            .find(|(n, _)| *n == how)
            .unwrap()
            .1
    };

    h.submit(1, BULK_IN, 64);
    h.finish(1, Completion::failed(Errno::EPIPE));
    h.submit(2, BULK_IN, 64);
    assert_eq!(server.holds_started(), 1);
    assert_eq!(device.in_flight(), 1, "URB 2 waits behind the hold");
    h.advance(GRACE);
    assert_eq!(ended("expired"), 1);
    h.finish_ok(2, 10);
    // Cleared by the importer.
    h.submit(3, BULK_IN, 64);
    h.finish(3, Completion::failed(Errno::EPIPE));
    h.control_out(4, 0x02, 1, 0, u16::from(BULK_IN)); // CLEAR_FEATURE(HALT)
    h.finish_ok(4, 0);
    assert_eq!(ended("released"), 1);
    // Held when the import ends, with URB 6 still in flight.
    h.submit(5, BULK_IN, 64);
    h.finish(5, Completion::failed(Errno::EPIPE));
    h.submit(6, BULK_IN, 64);
    h.replies();
    assert_eq!(server.holds_started(), 3);
    let Harness { session, .. } = h;
    drop(session.into_backend());
    assert_eq!(ended("import_ended"), 1);
    assert_eq!(device.in_flight(), 0);

    let (inp, bulk, control) = (
        DIRECTIONS.iter().position(|&d| d == "in").unwrap(),
        TRANSFER_TYPES.iter().position(|&t| t == "bulk").unwrap(),
        TRANSFER_TYPES.iter().position(|&t| t == "control").unwrap(),
    );
    assert_eq!(device.urbs(inp, bulk), 4);
    assert_eq!(device.bytes(inp, bulk), 10);
    assert_eq!(device.urbs(0, control), 1);
    let statuses = device.statuses();
    assert!(statuses.contains(&("EPIPE", 3)), "{statuses:?}");
    assert!(statuses.contains(&("ok", 2)), "{statuses:?}");
}
