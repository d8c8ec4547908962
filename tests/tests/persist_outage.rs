//! The library's persistent device ([`PersistentDevice`]) through a network
//! outage: `usbipd` serves in one network namespace, the client runs in
//! another, joined by a veth pair; the server's side of the link goes down
//! for at least 10 s (this host has no `sch_netem`: a link down is the
//! black hole) and comes back.
//!
//! A transfer in flight when the path goes silent fails once keepalive
//! and TCP_USER_TIMEOUT end the connection, instead of hanging; one issued
//! while the device is re-imported fails at once with
//! [`PersistError::Reconnecting`]; the state changes go Attached →
//! Disconnected → Waiting/Connecting → Attached; transfers work after.

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use usbwire_client::persist::{PersistError, PersistState, PersistentDevice, SuperviseOptions};
use usbwire_client::{SetupPacket, TransferError, TransferRequest};
use usbwire_tests::activation::Activated;
use usbwire_tests::daemon::read_line;
use usbwire_tests::kernel;
use usbwire_tests::netns::{Network, INTERFACE};

/// The outage's least length.
const OUTAGE: Duration = Duration::from_secs(10);
/// Bound on each wait for the supervisor: far above what the keepalive,
/// the server's probes and the backoff add up to.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `f` on a thread inside network namespace `name`: every socket it
/// makes belongs there.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on this thread only, with a namespace fd we opened.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

fn get_device_descriptor() -> TransferRequest {
    TransferRequest::control(
        SetupPacket {
            request_type: 0x80,
            request: 6,
            value: 0x0100,
            index: 0,
            length: 18,
        },
        Vec::new(),
    )
}

#[test]
fn persistent_device_survives_a_network_outage() {
    let Some(net) = Network::require(2) else {
        return;
    };
    let t0 = Instant::now();
    let (server_ns, client_ns) = (net.ns(0).clone(), net.ns(1).clone());
    let server_ip = server_ns.addr();
    let listener = in_netns(server_ns.name(), move || {
        TcpListener::bind(SocketAddr::from((server_ip, 0)))
            .expect("listen in the server's namespace")
    });
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let log = File::create(dir.path().join("usbipd.log")).unwrap();
    // usbipd serves the listener it inherits, which lives in the server's
    // namespace whatever namespace the process is in.
    let mut usbipd = Activated::new(kernel::cargo_bin("usbipd"))
        .args(["--demo", "--ready-fd", "1"])
        .env("USBWIRE_LOG", "debug")
        .listener(&listener)
        .unwrap()
        .fd_names(&["usbipd"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start usbipd");
    let mut ready = usbipd.stdout.take().unwrap();
    read_line(&mut ready, Duration::from_secs(60)).expect("usbipd serves");
    let usbipd_log = dir.path().join("usbipd.log");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let server = server_ns.clone();
        in_netns(client_ns.name(), move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(scenario(server, port))
        })
    }));
    let _ = usbipd.kill();
    let _ = usbipd.wait();
    if let Err(e) = result {
        eprintln!(
            "--- usbipd log ---\n{}",
            std::fs::read_to_string(&usbipd_log).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
    println!(
        "library outage test took {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}

fn within<T>(what: &str, r: Result<T, tokio::time::error::Elapsed>) -> T {
    r.unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

async fn scenario(server: usbwire_tests::netns::Netns, port: u16) {
    let states: Arc<Mutex<Vec<(Instant, PersistState)>>> = Arc::default();
    let log = states.clone();
    let dev = PersistentDevice::start_with(
        &server.addr().to_string(),
        port,
        // The demo keyboard.
        "1-2",
        SuperviseOptions::default(),
        move |s| log.lock().unwrap().push((Instant::now(), s.clone())),
    );
    let d = within(
        "the first import",
        tokio::time::timeout(LIMIT, dev.wait_attached()).await,
    )
    .expect("attached");
    let descriptor = d
        .submit(get_device_descriptor())
        .await
        .into_result()
        .unwrap();
    assert_eq!(descriptor.len(), 18);
    assert_eq!(descriptor[1], 1, "a device descriptor");
    drop(d);

    // The black hole: the server's side of the link goes down.
    server.ip(&["link", "set", INTERFACE, "down"]).unwrap();
    let down = Instant::now();
    // In flight as the path went silent: fails once the connection is
    // declared dead (TCP_USER_TIMEOUT), never hangs.
    let in_flight = dev.transfer(get_device_descriptor()).await;
    let failed_after = down.elapsed();
    match in_flight {
        Ok(outcome) => assert!(
            matches!(outcome.status, Err(TransferError::Disconnected(_))),
            "a transfer during the outage: {:?}",
            outcome.status
        ),
        Err(e) => panic!("the device was already down: {e}"),
    }
    // The supervisor noticed (the transfer's failure and the state change
    // come from the same end of the connection).
    let mut watch = dev.states();
    within(
        "noticing the outage",
        tokio::time::timeout(
            LIMIT,
            watch.wait_for(|s| !matches!(s, PersistState::Attached { .. })),
        )
        .await,
    )
    .unwrap();
    // Issued now, while it re-imports: refused at once, not queued.
    {
        let mut issued = std::pin::pin!(dev.transfer(get_device_descriptor()));
        match issued
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(Err(PersistError::Reconnecting { state })) => {
                assert_ne!(state, "attached")
            }
            Poll::Ready(other) => panic!("expected Reconnecting, got {other:?}"),
            Poll::Pending => panic!("a transfer while reconnecting waits instead of failing"),
        }
    }
    if let Some(rest) = OUTAGE.checked_sub(down.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    server.ip(&["link", "set", INTERFACE, "up"]).unwrap();
    let up = Instant::now();
    let d = within(
        "re-import after the outage",
        tokio::time::timeout(LIMIT, dev.wait_attached()).await,
    )
    .expect("attached again");
    let back_after = up.elapsed();
    let descriptor = d
        .submit(get_device_descriptor())
        .await
        .into_result()
        .unwrap();
    assert_eq!(descriptor.len(), 18);
    drop(d);

    let names: Vec<&'static str> = states
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.name())
        .collect();
    let first_down = names
        .iter()
        .position(|n| *n == "disconnected")
        .expect("a disconnection");
    assert_eq!(names[first_down - 1], "attached", "{names:?}");
    assert!(
        matches!(names[first_down + 1], "waiting"),
        "after the disconnection: {names:?}"
    );
    assert!(names[first_down..].contains(&"connecting"), "{names:?}");
    assert_eq!(names.last(), Some(&"attached"), "{names:?}");
    dev.stop().await;
    println!(
        "in-flight transfer failed {:.1}s into the outage; re-imported {:.1}s after the link \
         came back; states: {names:?}",
        failed_after.as_secs_f64(),
        back_after.as_secs_f64()
    );
}
