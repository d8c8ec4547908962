//! `usbip attach --persist` as a process, against our real `usbipd` and a
//! fake vhci-hcd tree (the kernel's side is tests/tests/kernel_persist.rs):
//! the supervisor re-attaches after `usbipd` is killed and started again on
//! the same socket, records itself for `usbip port`, and `usbip detach` of
//! its last port stops it for good while it is re-attaching; a permanent
//! first failure fails the command, a server away is retried in the
//! background, and SIGTERM stops a supervisor.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use usbwire_client::persist::PersistRecord;
use usbwire_client::vhci::fake::vhci;
use usbwire_client::Vhci;
use usbwire_tests::daemon::Usbipd;

const USBIP: &str = env!("CARGO_BIN_EXE_usbip");
const USBIPD: &str = env!("CARGO_BIN_EXE_usbipd");

/// How long a supervisor may take to reach a state the test waits for:
/// generous, the machine may be busy.
const LIMIT: Duration = Duration::from_secs(60);

fn usbip(root: &Path, args: &[&str]) -> Output {
    Command::new(USBIP)
        .args(args)
        .env("USBWIRE_SYSFS_ROOT", root)
        .output()
        .expect("run usbip")
}

/// The one supervisor's record, once `pred` holds for it (re-read as the
/// supervisor rewrites it at each transition; bounded in time).
fn wait_record(root: &Path, what: &str, pred: impl Fn(&PersistRecord) -> bool) -> PersistRecord {
    let vhci = Vhci::new(root);
    let t0 = Instant::now();
    loop {
        let all = PersistRecord::read_all(&vhci);
        if let Some((_, r)) = all.iter().find(|(_, r)| pred(r)) {
            return r.clone();
        }
        assert!(
            t0.elapsed() < LIMIT,
            "no supervisor {what} within {LIMIT:?}: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the supervisors a failed test leaves behind.
struct Supervisors<'a>(&'a Path);

impl Drop for Supervisors<'_> {
    fn drop(&mut self) {
        for (_, r) in PersistRecord::read_all(&Vhci::new(self.0)) {
            if r.alive() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(r.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

#[test]
fn persist_reattaches_after_a_server_restart_and_detach_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    vhci(&root, 1, 8, &[]);
    let _cleanup = Supervisors(&root);
    let mut daemon = Usbipd::start(Path::new(USBIPD), &["--demo"], dir.path());
    let port = daemon.port.to_string();

    let out = usbip(
        &root,
        &[
            "-t",
            &port,
            "attach",
            "--persist",
            "-r",
            "127.0.0.1",
            "-b",
            "1-2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("1-2 from 127.0.0.1 attached on port 0"),
        "{stderr}"
    );
    let first = wait_record(&root, "attached", |r| r.state == "attached");
    assert_eq!((first.port, first.attempts), (Some(0), 1));
    assert!(first.alive());
    // The C tool's record is there too.
    assert_eq!(Vhci::new(&root).read_record(0).unwrap().busid, "1-2");
    // One supervisor per device.
    let out = usbip(
        &root,
        &[
            "-t",
            &port,
            "attach",
            "--persist",
            "-r",
            "127.0.0.1",
            "-b",
            "1-2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("already kept attached by pid {}", first.pid)),
        "{stderr}"
    );
    assert_eq!(PersistRecord::read_all(&Vhci::new(&root)).len(), 1);

    // The server dies: the supervisor sees its connection end.
    daemon.kill();
    wait_record(&root, "noticing the server's death", |r| {
        r.port.is_none() && r.last_error.is_some()
    });
    // Back on the same socket: attached again, by the same process.
    daemon.restart();
    let restarted = Instant::now();
    let again = wait_record(&root, "re-attached", |r| {
        r.state == "attached" && r.attempts > 1
    });
    println!(
        "re-attached {:.2}s after usbipd's restart, attempt {}",
        restarted.elapsed().as_secs_f64(),
        again.attempts
    );
    assert_eq!(again.pid, first.pid);
    let states: Vec<&str> = again.transitions.iter().map(|t| t.state.as_str()).collect();
    assert_eq!(states[..3], ["connecting", "attached", "disconnected"]);
    assert_eq!(states.last(), Some(&"attached"));

    // `usbip port --json` shows it on its port.
    let out = usbip(&root, &["port", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["persist"]["pid"], first.pid, "{j}");

    // The server goes again; while the supervisor is re-attaching (no
    // port), `usbip detach -p` of the port it was on stops it for good.
    daemon.kill();
    let waiting = wait_record(&root, "re-attaching again", |r| {
        r.port.is_none() && r.last_port == Some(0) && r.attempts > again.attempts
    });
    assert_eq!(waiting.pid, first.pid);
    let out = usbip(&root, &["detach", "-p", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "stopped the supervisor of port 0 (pid {})",
            first.pid
        )),
        "{stderr}"
    );
    assert!(!again.alive(), "the supervisor outlived the detach");
    assert!(PersistRecord::read_all(&Vhci::new(&root)).is_empty());
    assert!(Vhci::new(&root).read_record(0).is_err(), "port record left");
    // The server back: nobody is left to attach the device (the
    // supervisor's exit above is the event), and nothing is recorded.
    daemon.restart();
    let out = usbip(&root, &["port", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert!(PersistRecord::read_all(&Vhci::new(&root)).is_empty());
}

#[test]
fn persist_fails_on_a_missing_device_and_waits_for_an_absent_server() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    vhci(&root, 1, 8, &[]);
    let _cleanup = Supervisors(&root);
    let daemon = Usbipd::start(Path::new(USBIPD), &["--demo"], dir.path());

    // No such device: permanent, the command fails and nothing is kept.
    let out = usbip(
        &root,
        &[
            "-t",
            &daemon.port.to_string(),
            "attach",
            "--persist",
            "-r",
            "127.0.0.1",
            "-b",
            "9-9",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("9-9") && stderr.contains("ST_NODEV"),
        "{stderr}"
    );
    assert!(
        PersistRecord::read_all(&Vhci::new(&root)).is_empty(),
        "a failed supervisor left its state file"
    );

    // Nobody listens there (a port just released): retried in the background.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free_port = free.local_addr().unwrap().port().to_string();
    drop(free);
    let out = usbip(
        &root,
        &[
            "-t",
            &free_port,
            "attach",
            "--persist",
            "-r",
            "127.0.0.1",
            "-b",
            "1-2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("retrying in the background"), "{stderr}");
    let r = wait_record(&root, "retrying", |r| r.attempts >= 2);
    assert!(r.port.is_none() && r.last_port.is_none());
    assert!(
        r.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("connection refused"),
        "{r:?}"
    );
    let out = usbip(&root, &["port"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/1-2: no port"), "{text}");
    // SIGTERM stops it; it says so last.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(r.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = wait_record(&root, "stopped", |r| r.state == "stopped");
    let t0 = Instant::now();
    while stopped.alive() {
        assert!(t0.elapsed() < LIMIT, "the supervisor ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
