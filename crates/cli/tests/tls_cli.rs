//! `usbip list -r` over TLS 1.3 with a client certificate, and `usbip cert`,
//! against our usbipd behind a rustls front that terminates TLS (the
//! server's own TLS is built elsewhere).

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use usbwire_tests::tls::{server_tls, tls_front, Ca, Pem};

async fn usbip(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_usbip"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn arg(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `usbip list -r 127.0.0.1 -t PORT` with `tls` options.
async fn list(port: u16, tls: &[String]) -> Output {
    let mut args: Vec<String> = ["-t", &port.to_string(), "list", "-r", "127.0.0.1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend_from_slice(tls);
    usbip(args).await
}

/// `usbip cert new` for the server's side: files in DIR and the fingerprint printed.
async fn cert_new(dir: &Path, name: &str) -> (Pem, String) {
    let out = usbip(vec![
        "cert".into(),
        "new".into(),
        "--out".into(),
        arg(dir),
        "--name".into(),
        name.into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let fingerprint = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint in {stdout:?}"))
        .to_string();
    let mode = std::fs::metadata(dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is its owner's only");
    let pem = Pem {
        cert: std::fs::read_to_string(dir.join("cert.pem")).unwrap(),
        key: std::fs::read_to_string(dir.join("key.pem")).unwrap(),
    };
    (pem, fingerprint)
}

struct Setup {
    dir: tempfile::TempDir,
    daemon: Daemon,
    front: SocketAddr,
    fingerprint: String,
    /// --tls-cert/--tls-key of a client the front's CA signed.
    client: Vec<String>,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(&["--demo"], dir.path());
        let (server, fingerprint) = cert_new(&dir.path().join("server"), "127.0.0.1").await;
        let ca = Ca::new("clients");
        let front = tls_front(server_tls(&server, &ca), daemon.addr()).await;
        let (cert, key) = ca.issue(&["client"]).write(dir.path(), "client");
        let client = vec![
            "--tls-cert".into(),
            arg(&cert),
            "--tls-key".into(),
            arg(&key),
        ];
        Setup {
            dir,
            daemon,
            front,
            fingerprint,
            client,
        }
    }

    fn pinned(&self, fingerprint: &str) -> Vec<String> {
        let mut args = self.client.clone();
        args.extend(["--tls-fingerprint".into(), fingerprint.into()]);
        args
    }
}

#[tokio::test]
async fn list_over_tls_shows_what_plaintext_shows_with_the_fingerprint_cert_new_printed() {
    let setup = Setup::new().await;
    let plain = list(setup.daemon.port, &[]).await;
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    assert!(
        text(&plain.stdout).contains("1-1"),
        "{}",
        text(&plain.stdout)
    );
    let tls = list(setup.front.port(), &setup.pinned(&setup.fingerprint)).await;
    assert!(tls.status.success(), "{}", text(&tls.stderr));
    assert_eq!(text(&tls.stdout), text(&plain.stdout));

    // `cert fingerprint` prints the same form for the same file.
    let again = usbip(vec![
        "cert".into(),
        "fingerprint".into(),
        arg(&setup.dir.path().join("server/cert.pem")),
    ])
    .await;
    assert_eq!(text(&again.stdout).trim(), setup.fingerprint);
    // And `cert new` replaces nothing.
    let twice = usbip(vec![
        "cert".into(),
        "new".into(),
        "--out".into(),
        arg(&setup.dir.path().join("server")),
    ])
    .await;
    assert!(!twice.status.success());
    assert!(
        text(&twice.stderr).contains("not replacing it"),
        "{}",
        text(&twice.stderr)
    );
}

/// Fails, prints nothing on stdout, and says `why` on stderr.
fn refused(out: &Output, why: &str) {
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout), "", "no listing");
    assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
}

#[tokio::test]
async fn list_over_tls_refusals_say_what_happened() {
    let setup = Setup::new().await;
    let other = "00".repeat(32);
    refused(
        &list(setup.front.port(), &setup.pinned(&other)).await,
        "server certificate does not match the pinned fingerprint",
    );
    // A plaintext server is never used when TLS was asked for.
    refused(
        &list(setup.daemon.port, &setup.pinned(&setup.fingerprint)).await,
        "plaintext USB/IP server",
    );
    // A client certificate the server's CA did not sign.
    let stranger = setup.dir.path().join("stranger");
    cert_new(&stranger, "stranger").await;
    let args = vec![
        "--tls-cert".into(),
        arg(&stranger.join("cert.pem")),
        "--tls-key".into(),
        arg(&stranger.join("key.pem")),
        "--tls-fingerprint".into(),
        setup.fingerprint.clone(),
    ];
    refused(
        &list(setup.front.port(), &args).await,
        "server rejected this client's certificate",
    );
    // Half the options is an error naming the rest, not plaintext.
    refused(
        &list(setup.front.port(), &setup.client).await,
        "--tls-ca FILE or --tls-fingerprint HEX",
    );
}

/// `usbip attach -r 127.0.0.1 -t PORT -b 1-1` and `extra` against the
/// vhci-hcd tree under `root`.
async fn attach(root: &Path, port: u16, extra: &[String]) -> Output {
    let mut args: Vec<String> = [
        "-t",
        &port.to_string(),
        "attach",
        "-r",
        "127.0.0.1",
        "-b",
        "1-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(extra);
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_usbip"))
            .args(args)
            .env("USBWIRE_SYSFS_ROOT", root)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// Whether this machine's kernel offers the TLS upper-layer protocol.
fn kernel_has_tls() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"))
}

#[tokio::test]
async fn attach_over_tls_without_kernel_tls_says_modprobe_tls_and_imports_nothing() {
    let setup = Setup::new().await;
    let root = setup.dir.path().join("root");
    let hc = usbwire_client::vhci::fake::vhci(&root, 1, 8, &[]);
    // Half the options, or none with --tls, is an error naming the rest.
    let mut no_options = vec!["--tls".to_string()];
    refused(
        &attach(&root, setup.front.port(), &no_options).await,
        "attach --tls needs --tls-cert FILE, --tls-key FILE and --tls-ca FILE or --tls-fingerprint HEX",
    );
    no_options.extend(setup.client.clone());
    refused(
        &attach(&root, setup.front.port(), &no_options).await,
        "--tls-ca FILE or --tls-fingerprint HEX",
    );
    if kernel_has_tls() {
        // The guest tests (tests/tests/kernel_tls.rs) attach for real; a
        // host with kernel TLS cannot show its absence.
        eprintln!("this kernel has TLS: its absence is tested in the guest only");
        return;
    }
    let mut tls = vec!["--tls".to_string()];
    tls.extend(setup.pinned(&setup.fingerprint));
    // The options alone mean TLS too: never a plaintext attach.
    for args in [tls, setup.pinned(&setup.fingerprint)] {
        let out = attach(&root, setup.front.port(), &args).await;
        refused(&out, "kernel TLS is not available: modprobe tls");
        assert_eq!(
            std::fs::read_to_string(hc.join("attach")).unwrap(),
            "",
            "nothing was handed to vhci-hcd"
        );
        assert!(
            !root.join("var/run/vhci_hcd").exists(),
            "no port was recorded"
        );
    }
    // Nothing is held on the server: the device imports at once.
    let config = usbwire_client::TlsClientConfig::from_files(
        Some((
            &setup.dir.path().join("client.crt"),
            &setup.dir.path().join("client.key"),
        )),
        &usbwire_client::ServerTrust::Fingerprint(setup.fingerprint.parse().unwrap()),
    )
    .unwrap();
    usbwire_client::import_tls("127.0.0.1", setup.front.port(), &config, "1-1")
        .await
        .expect("1-1 is still importable");
}
