//! The supervisor's schedule, in tokio's virtual time: every wait is the
//! backoff's, and the clock only moves when nothing else can run.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::*;

/// What the fake does on each attempt.
#[derive(Debug)]
enum Step {
    /// The import fails.
    Fail { permanent: bool },
    /// Attached on this port; the session ends when the test says so.
    Attach(u32),
    /// The import never answers (a black hole, before its timeout).
    Hang,
}

#[derive(Default)]
struct Shared {
    /// Virtual time of each import, relative to the start.
    imports: Vec<Duration>,
    /// Senders that end the sessions, in attach order.
    enders: Vec<oneshot::Sender<String>>,
    cleaned: Vec<u32>,
}

struct Fake {
    start: Instant,
    steps: VecDeque<Step>,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
struct FakeSession {
    port: u32,
    end: oneshot::Receiver<String>,
}

impl Attach for Fake {
    type Imported = u32;
    type Session = FakeSession;

    async fn import(&mut self) -> Result<u32, AttemptError> {
        self.shared
            .lock()
            .unwrap()
            .imports
            .push(self.start.elapsed());
        match self.steps.pop_front() {
            Some(Step::Fail { permanent }) => Err(AttemptError {
                message: "refused".into(),
                permanent,
            }),
            Some(Step::Attach(port)) => Ok(port),
            Some(Step::Hang) | None => std::future::pending().await,
        }
    }

    async fn hand_over(&mut self, port: u32) -> Result<(FakeSession, Option<u32>), AttemptError> {
        let (tx, rx) = oneshot::channel();
        self.shared.lock().unwrap().enders.push(tx);
        Ok((FakeSession { port, end: rx }, Some(port)))
    }

    async fn ended(&mut self, s: &mut FakeSession) -> String {
        (&mut s.end)
            .await
            .unwrap_or_else(|_| "ender dropped".into())
    }

    fn cleanup(&mut self, s: FakeSession) {
        self.shared.lock().unwrap().cleaned.push(s.port);
    }
}

type Log = Arc<Mutex<Vec<(Duration, PersistState)>>>;

/// A supervisor under test: what the fake saw, the states, its stop switch
/// and its task.
type Running = (
    Arc<Mutex<Shared>>,
    Log,
    watch::Sender<bool>,
    tokio::task::JoinHandle<Supervised<FakeSession>>,
);

/// Runs a supervisor over `steps` in the background; its states go to the log.
fn start(steps: Vec<Step>, options: SuperviseOptions) -> Running {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let log: Log = Arc::default();
    let start = Instant::now();
    let mut fake = Fake {
        start,
        steps: steps.into(),
        shared: shared.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let l = log.clone();
    let task = tokio::spawn(async move {
        supervise(&mut fake, options, stop_rx, move |s| {
            l.lock().unwrap().push((start.elapsed(), s.clone()))
        })
        .await
    });
    (shared, log, stop_tx, task)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets the supervisor run until it waits on something else than time.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut b = Backoff::DEFAULT;
    let got: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
    assert_eq!(
        got,
        [ms(500), ms(1000), ms(2000), ms(2000), ms(2000), ms(2000)]
    );
    b.reset();
    assert_eq!(b.next_delay(), ms(500));
    // The promise the CLI makes: a server restarted at any moment is tried
    // again within the cap, well inside 5 s.
    assert!(Backoff::DEFAULT.cap() <= Duration::from_secs(2));
    let mut odd = Backoff::new(ms(300), ms(1000));
    let got: Vec<Duration> = (0..4).map(|_| odd.next_delay()).collect();
    assert_eq!(got, [ms(300), ms(600), ms(1000), ms(1000)]);
}

#[tokio::test(start_paused = true)]
async fn retries_on_the_backoff_schedule_and_resets_after_an_attach() {
    let fail = || Step::Fail { permanent: false };
    let (shared, log, stop, task) = start(
        vec![
            fail(),
            fail(),
            fail(),
            fail(),
            Step::Attach(3),
            fail(),
            Step::Attach(5),
        ],
        SuperviseOptions::default(),
    );
    // Five imports: at 0, then after 0.5, 1, 2 and 2 (capped) s.
    for _ in 0..200 {
        settle().await;
        if !shared.lock().unwrap().enders.is_empty() {
            break;
        }
        tokio::time::advance(ms(100)).await;
    }
    assert_eq!(
        shared.lock().unwrap().imports,
        [ms(0), ms(500), ms(1500), ms(3500), ms(5500)]
    );
    // The session lasts; no attempt meanwhile.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(shared.lock().unwrap().imports.len(), 5);
    // It ends: the next import is after the first step again (reset), then
    // one failure doubles it.
    let ender = shared.lock().unwrap().enders.remove(0);
    ender.send("server gone".into()).unwrap();
    for _ in 0..200 {
        settle().await;
        if !shared.lock().unwrap().enders.is_empty() {
            break;
        }
        tokio::time::advance(ms(100)).await;
    }
    let imports = shared.lock().unwrap().imports.clone();
    assert_eq!(imports.len(), 7);
    let ended_at = log
        .lock()
        .unwrap()
        .iter()
        .find(
            |(_, s)| matches!(s, PersistState::Disconnected { reason } if reason == "server gone"),
        )
        .map(|(t, _)| *t)
        .expect("the session's end is reported");
    assert!(ended_at >= ms(65_500), "ended after the minute attached");
    assert_eq!(imports[5], ended_at + ms(500), "reset to the first step");
    assert_eq!(imports[6] - imports[5], ms(1000));
    assert_eq!(shared.lock().unwrap().cleaned, [3]);

    // Stop while attached: the session is handed back, still attached.
    stop.send(true).unwrap();
    match task.await.unwrap() {
        Supervised::Stopped {
            session: Some(s),
            port: Some(5),
        } => assert_eq!(s.port, 5),
        other => panic!("{other:?}"),
    }
    let names: Vec<&str> = log.lock().unwrap().iter().map(|(_, s)| s.name()).collect();
    assert_eq!(
        names[..6],
        [
            "connecting",
            "disconnected",
            "waiting",
            "connecting",
            "disconnected",
            "waiting"
        ]
    );
    assert_eq!(
        names[names.len() - 4..],
        ["waiting", "connecting", "attached", "stopped"]
    );
    let log = log.lock().unwrap();
    assert!(matches!(log.last(), Some((_, PersistState::Stopped))));
    // Waiting names the next attempt and when it is due.
    let waits: Vec<u32> = log
        .iter()
        .filter_map(|(_, s)| match s {
            PersistState::Waiting { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect();
    assert_eq!(waits, [2, 3, 4, 5, 6, 7]);
}

#[tokio::test(start_paused = true)]
async fn stop_ends_a_wait_and_a_hung_import_at_once() {
    let (shared, log, stop, task) = start(
        vec![Step::Fail { permanent: false }, Step::Hang],
        SuperviseOptions::default(),
    );
    settle().await;
    tokio::time::advance(ms(500)).await;
    settle().await;
    assert_eq!(shared.lock().unwrap().imports, [ms(0), ms(500)]);
    // Hung in the second import: stopping does not wait for it.
    let before = Instant::now();
    stop.send(true).unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Supervised::Stopped {
            session: None,
            port: None
        }
    ));
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert!(matches!(
        log.lock().unwrap().last(),
        Some((_, PersistState::Stopped))
    ));

    // Stopped while waiting between attempts.
    let (shared, _log, stop, task) = start(
        vec![Step::Fail { permanent: false }],
        SuperviseOptions::default(),
    );
    settle().await;
    stop.send(true).unwrap();
    assert!(matches!(
        task.await.unwrap(),
        Supervised::Stopped { session: None, .. }
    ));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(
        shared.lock().unwrap().imports.len(),
        1,
        "no attempt after stop"
    );
}

#[tokio::test(start_paused = true)]
async fn a_permanent_first_failure_ends_it_but_a_later_one_is_retried() {
    let (_shared, log, _stop, task) = start(
        vec![Step::Fail { permanent: true }],
        SuperviseOptions::default(),
    );
    match task.await.unwrap() {
        Supervised::FirstAttemptFailed(e) => assert!(e.permanent),
        other => panic!("{other:?}"),
    }
    let names: Vec<&str> = log.lock().unwrap().iter().map(|(_, s)| s.name()).collect();
    assert_eq!(names, ["connecting", "disconnected", "stopped"]);

    let (shared, _log, stop, task) = start(
        vec![
            Step::Fail { permanent: false },
            Step::Fail { permanent: true },
            Step::Fail { permanent: true },
        ],
        SuperviseOptions::default(),
    );
    for _ in 0..40 {
        settle().await;
        tokio::time::advance(ms(100)).await;
    }
    // Retried after both permanent failures: the fourth import (at 3.5 s)
    // is waiting for an answer.
    assert_eq!(
        shared.lock().unwrap().imports,
        [ms(0), ms(500), ms(1500), ms(3500)]
    );
    stop.send(true).unwrap();
    assert!(matches!(task.await.unwrap(), Supervised::Stopped { .. }));
}

#[test]
fn state_file_round_trip_and_transitions() {
    let t = tempfile::tempdir().unwrap();
    let vhci = crate::Vhci::new(t.path());
    let mut r = PersistRecord::new(4242, "10.0.2.100", 3240, "1-2");
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    r.apply(&PersistState::Connecting { attempt: 1 }, t0);
    r.apply(
        &PersistState::Attached {
            port: Some(7),
            since: t0,
        },
        t0 + ms(250),
    );
    r.apply(
        &PersistState::Disconnected {
            reason: "port 7: connection lost".into(),
        },
        t0 + ms(5000),
    );
    r.apply(
        &PersistState::Waiting {
            until: t0 + ms(5500),
            attempt: 2,
        },
        t0 + ms(5000),
    );
    assert_eq!(
        (r.port, r.last_port, r.state.as_str(), r.attempts),
        (None, Some(7), "waiting", 1)
    );
    assert_eq!(r.last_error.as_deref(), Some("port 7: connection lost"));
    let path = r.write(&vhci).unwrap();
    assert_eq!(
        path,
        t.path()
            .join("var/run/vhci_hcd/persist/10.0.2.100_3240_1-2.json")
    );
    let back = PersistRecord::read(&path).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.transitions[1].detail.as_deref(), Some("port 7"));
    assert_eq!(back.transitions[0].at.0, 1_700_000_000_123);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"at\": 1700000000.123"), "{text}");
    let all = PersistRecord::read_all(&vhci);
    assert_eq!(all.len(), 1);
    assert!(all[0].1.alive() == (std::process::id() == 4242) || !all[0].1.alive());
    // Only the most recent transitions are kept.
    for i in 0..100 {
        r.apply(&PersistState::Connecting { attempt: i }, t0);
    }
    assert_eq!(r.transitions.len(), MAX_TRANSITIONS);
    assert_eq!(
        r.transitions.last().unwrap().detail.as_deref(),
        Some("attempt 99")
    );
    // Our own pid is alive; a file naming an odd host is still one file.
    let me = PersistRecord::new(std::process::id(), "fe80::1%eth0", 3240, "1-1");
    assert!(me.alive());
    assert_eq!(
        PersistRecord::file_name("fe80::1%eth0", 3240, "1-1"),
        "fe80__1_eth0_3240_1-1.json"
    );
    // A malformed file is an error, not a panic.
    std::fs::write(&path, b"{\"pid\": \"x\"").unwrap();
    assert!(PersistRecord::read(&path).is_err());
}
