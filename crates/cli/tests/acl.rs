//! usbipd's per-device access control: the `[[access]]` rules decide which
//! client, by certificate or by source network, sees and imports which
//! device; anything else is ST_NA, as a device that does not exist, and
//! the log names who asked for what. SIGHUP reloads the rules: a running
//! import they still grant goes on, one they no longer grant ends.
//!
//! The clients are the usbwire client library over mutual TLS, our
//! plaintext client and Debian's C `usbip`; certificates are made here
//! with rcgen.

mod common;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use usbwire_client::{ClientError, RemoteDevice, ServerTrust, TlsClientConfig};
use usbwire_proto::OpStatus;
use usbwire_tests::tls::{self_signed, Ca, Pem};

/// Every network step and every wait for the daemon is bounded by this:
/// generous, since the machine may be busy with qemu guests.
const LIMIT: Duration = Duration::from_secs(60);

/// The exported devices: two test devices (0525:a4a0) and a keyboard
/// (0525:a4ac).
const DEVICES: &str = r#"
[[device]]
kind = "test"
busid = "1-1"
[[device]]
kind = "test"
busid = "1-2"
[[device]]
kind = "keyboard"
busid = "2-1"
"#;

/// A CA that signs the server and the clients alice, bob and carol, and
/// mallory, who pins a self-signed certificate that also says CN=alice.
struct Setup {
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    server: (PathBuf, PathBuf),
    alice: Pem,
    bob: Pem,
    carol: Pem,
    mallory: Pem,
    config: PathBuf,
}

impl Setup {
    fn new(access: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("usbwire acl test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let server = ca
            .issue(&["localhost", "127.0.0.1"])
            .write(dir.path(), "server");
        let setup = Setup {
            config: dir.path().join("usbipd.toml"),
            ca_file,
            server,
            alice: ca.issue(&["alice"]),
            bob: ca.issue(&["bob"]),
            carol: ca.issue(&["carol"]),
            mallory: self_signed("alice"),
            dir,
        };
        setup.write_access(access);
        setup
    }

    /// Replaces the configuration file's access rules.
    fn write_access(&self, access: &str) {
        // Written whole to a temporary file, then renamed: a reload never
        // reads half a file.
        let tmp = self.dir.path().join("usbipd.toml.new");
        std::fs::write(&tmp, format!("{DEVICES}\n{access}")).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// usbipd with TLS (clients of the CA, and mallory by pin), and `extra`.
    fn daemon(&self, extra: &[&str]) -> Daemon {
        let pin = self.mallory.fingerprint().to_string();
        let pid = self.dir.path().join("usbipd.pid");
        let mut args = vec![
            "--no-control",
            "--config",
            self.config.to_str().unwrap(),
            "--tls-cert",
            self.server.0.to_str().unwrap(),
            "--tls-key",
            self.server.1.to_str().unwrap(),
            "--tls-client-ca",
            self.ca_file.to_str().unwrap(),
            "--tls-client-fingerprint",
            &pin,
            "--pid",
            pid.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, self.dir.path())
    }

    fn client(&self, who: &Pem, name: &str) -> TlsClientConfig {
        let (cert, key) = who.write(self.dir.path(), name);
        TlsClientConfig::from_files(
            Some((&cert, &key)),
            &ServerTrust::CaFile(self.ca_file.clone()),
        )
        .unwrap()
    }

    /// Sends SIGHUP to the daemon, whose pid file says who it is.
    fn sighup(&self) {
        let pid = std::fs::read_to_string(self.dir.path().join("usbipd.pid")).unwrap();
        let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }
}

/// The bus ids a TLS client is shown.
async fn list(d: &Daemon, tls: &TlsClientConfig) -> Vec<String> {
    let devices = tokio::time::timeout(LIMIT, usbwire_client::list_tls("127.0.0.1", d.port, tls))
        .await
        .expect("devlist within the limit")
        .unwrap_or_else(|e| panic!("devlist over TLS: {e}\n{}", d.log_text()));
    devices.iter().map(|d| d.busid.to_string()).collect()
}

async fn import(
    d: &Daemon,
    tls: &TlsClientConfig,
    busid: &str,
) -> Result<RemoteDevice, ClientError> {
    tokio::time::timeout(
        LIMIT,
        usbwire_client::import_tls("127.0.0.1", d.port, tls, busid),
    )
    .await
    .expect("import within the limit")
}

/// The status of a refused import.
async fn refusal(d: &Daemon, tls: &TlsClientConfig, busid: &str) -> OpStatus {
    match import(d, tls, busid).await {
        Err(ClientError::ImportRefused { status, .. }) => status,
        Err(e) => panic!("import of {busid} failed otherwise: {e}"),
        Ok(_) => panic!("import of {busid} was granted:\n{}", d.log_text()),
    }
}

/// A bulk round trip on a test device: 4 KiB to its sink, 4 KiB from its
/// source (zeros).
async fn bulk_round_trip(device: &RemoteDevice) -> Result<(), String> {
    let run = async {
        let sent = device
            .bulk_out(0x02, &[0u8; 4096])
            .await
            .map_err(|e| e.to_string())?;
        let back = device
            .bulk_in(0x81, 4096)
            .await
            .map_err(|e| e.to_string())?;
        if sent != 4096 || back.len() != 4096 {
            return Err(format!("moved {sent} out and {} in", back.len()));
        }
        Ok(())
    };
    tokio::time::timeout(LIMIT, run)
        .await
        .map_err(|_| "no answer within the limit".to_string())?
}

/// Waits, on inotify events of the log file, until `done` holds for the
/// daemon's log, and returns the log. No polling on a timer: each look
/// follows a write to the file.
fn wait_for_log(d: &Daemon, what: &str, done: impl Fn(&str) -> bool) -> String {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify.add_watch(&d.log, AddWatchFlags::IN_MODIFY).unwrap();
    let deadline = Instant::now() + LIMIT;
    // Each turn follows a write to the log, or ends at the deadline.
    loop {
        let log = d.log_text();
        if done(&log) {
            return log;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the log never showed {what}:\n{log}");
        let mut fds = [nix::poll::PollFd::new(
            inotify.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout = nix::poll::PollTimeout::try_from(left).unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        // Drained so that the next poll waits for the next write.
        let _ = inotify.read_events();
    }
}

/// Whether some line of `log` has every one of `parts`.
fn has_line(log: &str, parts: &[&str]) -> bool {
    log.lines().any(|l| parts.iter().all(|p| l.contains(p)))
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_sees_and_imports_only_what_it_is_granted() {
    let setup = Setup::new("");
    let bob_pin = setup.bob.fingerprint().to_string();
    setup.write_access(&format!(
        r#"
        [[access]]
        devices = ["1-1", "0525:a4ac"]    # a test device by bus id, the keyboard by VID:PID
        clients = ["subject:CN=alice"]
        [[access]]
        devices = ["1-2"]
        clients = ["fingerprint:{bob_pin}"]
        "#
    ));
    let d = setup.daemon(&[]);
    let alice = setup.client(&setup.alice, "alice");
    let bob = setup.client(&setup.bob, "bob");
    let carol = setup.client(&setup.carol, "carol");
    let mallory = setup.client(&setup.mallory, "mallory");

    assert_eq!(list(&d, &alice).await, ["1-1", "2-1"]);
    assert_eq!(list(&d, &bob).await, ["1-2"]);
    // Authenticated, but granted nothing.
    assert!(list(&d, &carol).await.is_empty());
    // Pinned, so let in, but its subject is its own say-so: no alice.
    assert!(list(&d, &mallory).await.is_empty());

    // A device that is not granted and one that does not exist: the same
    // answer, ST_NA.
    assert_eq!(refusal(&d, &bob, "1-1").await, OpStatus::Na);
    assert_eq!(refusal(&d, &bob, "9-9").await, OpStatus::Na);
    assert_eq!(refusal(&d, &mallory, "2-1").await, OpStatus::Na);
    let log = d.log_text();
    assert!(
        has_line(
            &log,
            &[
                "import refused: the access policy does not grant this device to this client (answered ST_NA)",
                "busid=1-1",
                &format!("certificate SHA-256 {bob_pin}, subject CN=bob)"),
            ]
        ),
        "{log}"
    );
    assert!(
        has_line(
            &log,
            &["import refused", "busid=9-9", "(answered ST_NA)", "CN=bob"]
        ),
        "{log}"
    );
    assert!(
        has_line(
            &log,
            &[
                "does not grant this device",
                "busid=2-1",
                "subject CN=alice not CA-verified)"
            ]
        ),
        "{log}"
    );

    // What is granted is served.
    let device = import(&d, &alice, "1-1").await.expect("alice imports 1-1");
    tokio::time::timeout(LIMIT, device.set_configuration(1))
        .await
        .unwrap()
        .unwrap();
    bulk_round_trip(&device).await.unwrap();
    drop(device);
    d.stop();
}

/// Runs Debian's C `usbip list -r 127.0.0.1` against `d`: its stdout.
fn c_list(c_usbip: &Path, d: &Daemon) -> String {
    let out = Command::new(c_usbip)
        .args(["--tcp-port", &d.port.to_string(), "list", "-r", "127.0.0.1"])
        .output()
        .expect("running Debian's usbip");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "C usbip list -r: {stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_granted_by_source_network() {
    let setup = Setup::new(
        r#"
        [[access]]
        devices = ["1-2"]
        clients = ["cidr:127.0.0.0/8"]
        [[access]]
        devices = ["*"]
        clients = ["subject:CN=alice"]
        "#,
    );
    let d = setup.daemon(&["--allow-plaintext", "127.0.0.0/8"]);
    // Our plaintext client...
    let listed = tokio::time::timeout(LIMIT, usbwire_client::list(d.addr()))
        .await
        .unwrap()
        .expect("plaintext devlist from 127.0.0.0/8");
    let busids: Vec<String> = listed.iter().map(|d| d.busid.to_string()).collect();
    assert_eq!(busids, ["1-2"]);
    let refused = tokio::time::timeout(LIMIT, usbwire_client::import(d.addr(), "1-1"))
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            Err(ClientError::ImportRefused {
                status: OpStatus::Na,
                ..
            })
        ),
        "{:?}",
        refused.map(|_| ())
    );
    let device = tokio::time::timeout(LIMIT, usbwire_client::import(d.addr(), "1-2"))
        .await
        .unwrap()
        .expect("plaintext import of 1-2 from 127.0.0.0/8");
    // ...with the device imported, it is listed to nobody (as the C usbipd
    // does); once it is back, Debian's client sees it and only it.
    drop(device);
    let log = wait_for_log(&d, "1-2 released", |log| {
        has_line(log, &["released", "busid=1-2"])
    });
    assert!(
        has_line(&log, &["imported", "busid=1-2", "(plaintext)"]),
        "{log}"
    );
    if let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") {
        let stdout = c_list(&c_usbip, &d);
        assert!(stdout.contains("1-2:"), "{stdout}");
        for hidden in ["1-1:", "2-1:"] {
            assert!(!stdout.contains(hidden), "{hidden} listed: {stdout}");
        }
    }
    // The network grants nothing to a TLS client from it: alice sees
    // what her certificate is granted, carol nothing.
    assert_eq!(
        list(&d, &setup.client(&setup.alice, "alice")).await,
        ["1-1", "1-2", "2-1"]
    );
    assert!(list(&d, &setup.client(&setup.carol, "carol"))
        .await
        .is_empty());
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_rules_keeping_granted_imports_and_ending_revoked_ones() {
    let setup = Setup::new(
        r#"
        [[access]]
        devices = ["1-1", "1-2"]
        clients = ["subject:CN=alice"]
        "#,
    );
    let d = setup.daemon(&[]);
    let alice = setup.client(&setup.alice, "alice");
    let bob = setup.client(&setup.bob, "bob");
    assert!(list(&d, &bob).await.is_empty());
    let kept = import(&d, &alice, "1-1").await.expect("alice imports 1-1");
    let revoked = import(&d, &alice, "1-2").await.expect("alice imports 1-2");
    for device in [&kept, &revoked] {
        tokio::time::timeout(LIMIT, device.set_configuration(1))
            .await
            .unwrap()
            .unwrap();
        bulk_round_trip(device).await.unwrap();
    }

    // A file that does not parse changes nothing.
    setup.write_access("[[access]]\ndevices = [\"1-2\"]\nclients = [\"bob\"]\n");
    setup.sighup();
    let log = wait_for_log(&d, "the refused reload", |log| {
        log.contains("SIGHUP: the access policy in force is kept")
    });
    // The devices, the blank line write_access adds, then the rule: its
    // third line is the bad one.
    let bad_line = format!("TOML parse error at line {}", DEVICES.lines().count() + 4);
    assert!(
        has_line(
            &log,
            &[
                "the access policy in force is kept",
                "usbipd.toml",
                &bad_line
            ]
        ),
        "{log}"
    );
    assert!(log.contains("\"bob\" names no client"), "{log}");
    assert!(list(&d, &bob).await.is_empty());
    bulk_round_trip(&revoked).await.unwrap();

    // 1-2 goes from alice to bob; 1-1 stays alice's.
    let reloads = count(&d.log_text(), "access policy reloaded on SIGHUP");
    let bob_pin = setup.bob.fingerprint().to_string();
    setup.write_access(&format!(
        r#"
        [[access]]
        devices = ["1-1"]
        clients = ["subject:CN=alice"]
        [[access]]
        devices = ["1-2"]
        clients = ["fingerprint:{bob_pin}"]
        "#
    ));
    setup.sighup();
    wait_for_log(&d, "the reload", |log| {
        count(log, "access policy reloaded on SIGHUP") > reloads
    });
    // The revoked import ends as if unbound, and says so...
    let log = wait_for_log(&d, "the revoked import's end", |log| {
        has_line(
            log,
            &[
                "import ended: the reloaded access policy no longer grants this device to this client",
                "busid=1-2",
                "subject CN=alice)",
            ],
        )
    });
    assert!(
        has_line(&log, &["access rule 2: [1-2] to [fingerprint:"]),
        "{log}"
    );
    // ...its connection is gone (nothing answers its URBs)...
    assert!(
        bulk_round_trip(&revoked).await.is_err(),
        "the revoked import still runs URBs:\n{}",
        d.log_text()
    );
    // ...while the one still granted goes on.
    bulk_round_trip(&kept).await.unwrap();
    assert_eq!(list(&d, &alice).await, Vec::<String>::new());
    assert_eq!(refusal(&d, &alice, "1-2").await, OpStatus::Na);
    // Bob gets 1-2 once it is back.
    wait_for_log(&d, "1-2 released", |log| {
        has_line(log, &["released", "busid=1-2"])
    });
    assert_eq!(list(&d, &bob).await, ["1-2"]);
    let device = import(&d, &bob, "1-2").await.expect("bob imports 1-2");
    tokio::time::timeout(LIMIT, device.set_configuration(1))
        .await
        .unwrap()
        .unwrap();
    bulk_round_trip(&device).await.unwrap();
    bulk_round_trip(&kept).await.unwrap();
    drop((device, kept, revoked));
    d.stop();
}

#[test]
fn without_tls_rules_grant_by_source_network_and_tls_rules_are_flagged() {
    let setup = Setup::new(
        r#"
        [[access]]
        devices = ["2-1"]
        clients = ["cidr:127.0.0.1/32", "subject:CN=alice"]
        [[access]]
        devices = ["*"]
        clients = ["cidr:192.0.2.0/24"]
        "#,
    );
    // The drop-in case: no TLS at all, only plaintext.
    let d = Daemon::start(
        &["--no-control", "--config", setup.config.to_str().unwrap()],
        setup.dir.path(),
    );
    let log = d.log_text();
    assert!(
        log.contains(
            "access rule 1: subject:CN=alice names a TLS client, but TLS is off: it grants nothing"
        ),
        "{log}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt
        .block_on(async { tokio::time::timeout(LIMIT, usbwire_client::list(d.addr())).await })
        .unwrap()
        .expect("plaintext devlist");
    let busids: Vec<String> = listed.iter().map(|d| d.busid.to_string()).collect();
    assert_eq!(busids, ["2-1"]);
    if let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") {
        let stdout = c_list(&c_usbip, &d);
        assert!(stdout.contains("2-1:"), "{stdout}");
        assert!(stdout.contains("(0525:a4ac)"), "{stdout}");
        for hidden in ["1-1:", "1-2:"] {
            assert!(!stdout.contains(hidden), "{hidden} listed: {stdout}");
        }
    }
    d.stop();
}
