//! The import check of a `usbipd --fleet` (#17 point 3), end to end:
//! the usbipd binary with TLS required (and plaintext let in from the
//! fabric's subnet), a real etcd, and `usbip reserve` run as two clients.
//!
//! - A device reserved by a TLS client is its holder's by certificate:
//!   another certificate is refused (EBUSY, the OP_REP_IMPORT status
//!   DevBusy), so is a plaintext client; the holder imports with no token.
//! - A device reserved by a plaintext client is its holder's by the token
//!   `usbip reserve` keeps in its local record: an import without it, or
//!   over TLS by a certificate that is not the holder, is refused; with
//!   it, admitted.
//! - Released, each device is anyone's again at once.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use usbwire_client::{ServerTrust, TlsClientConfig};
use usbwire_proto::OpStatus;
use usbwire_tests::etcd::{self, Cluster};
use usbwire_tests::fabric::{Fabric, PREFIX_LEN};
use usbwire_tests::fleet::{import, import_once_free, usbip, FleetServer, PORT};
use usbwire_tests::tls::Ca;

const HANG: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[[device]]
kind = "test"
labels = ["gate"]
[[device]]
kind = "keyboard"
labels = ["gate"]
"#;

fn json_of(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON ({e})"))
}

/// The token `usbip reserve` recorded for `name` in `dir`.
fn recorded_token(dir: &Path, name: &str) -> String {
    for entry in std::fs::read_dir(dir).expect("reservation dir") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "json") {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if record["name"] == name {
                return record["token"].as_str().expect("a token").to_string();
            }
        }
    }
    panic!("no local reservation record of {name} in {}", dir.display());
}

#[test]
fn reserved_devices_are_imported_only_by_their_holders() {
    if !etcd::require() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut fabric = Fabric::new();
    let cluster = Cluster::start(&mut fabric, 1);
    let eps = cluster.endpoints();
    println!("etcd up in {:?}", t0.elapsed());
    let server_host = fabric.add_host("server");
    let alice = fabric.add_host("alice");
    let bob = fabric.add_host("bob");

    let ca = Ca::new("fleet test CA");
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let server_ip = server_host.addr().to_string();
    let (server_cert, server_key) = ca.issue(&[&server_ip]).write(dir.path(), "server");
    let alice_pem = ca.issue(&["alice"]);
    let (alice_cert, alice_key) = alice_pem.write(dir.path(), "alice");
    let (bob_cert, bob_key) = ca.issue(&["bob"]).write(dir.path(), "bob");
    let subnet = format!("{}/{PREFIX_LEN}", IpAddr::from(server_host.addr()));
    let mut server = FleetServer::start(
        "gated",
        server_host.clone(),
        dir.path(),
        CONFIG,
        &eps,
        &[
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--tls-client-ca",
            ca_path.to_str().unwrap(),
            "--allow-plaintext",
            &subnet,
        ],
    );
    println!("usbipd serving at {:?}", t0.elapsed());
    let published = Instant::now();
    while cluster.keys("/usbwire/v1/devices/gated/").len() < 2 {
        assert!(
            published.elapsed() < HANG,
            "the devices were not published\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let addr = SocketAddr::from((server_host.addr(), PORT));
    let tls_of = |cert: &Path, key: &Path| {
        Some(
            TlsClientConfig::from_files(Some((cert, key)), &ServerTrust::CaFile(ca_path.clone()))
                .expect("client TLS config"),
        )
    };
    let as_alice = || tls_of(&alice_cert, &alice_key);
    let as_bob = || tls_of(&bob_cert, &bob_key);
    let alice_dir = dir.path().join("alice");
    let bob_dir = dir.path().join("bob");
    std::fs::create_dir_all(&alice_dir).unwrap();
    std::fs::create_dir_all(&bob_dir).unwrap();
    println!("etcd, TLS and the server up in {:?}", t0.elapsed());

    // --- Reserved over TLS: the holder is alice's certificate.
    let taken = json_of(
        &usbip(
            &alice,
            &alice_dir,
            &[
                "--tls-cert",
                alice_cert.to_str().unwrap(),
                "--tls-key",
                alice_key.to_str().unwrap(),
                "reserve",
                "--fleet",
                &eps,
                "gated/1-1",
                "--json",
            ],
        ),
        "alice reserves gated/1-1",
    );
    assert_eq!(
        taken["holder"],
        format!("tls:{}", alice_pem.fingerprint()),
        "{taken}"
    );
    assert_eq!(import(&bob, addr, as_bob(), "1-1"), Err(OpStatus::DevBusy));
    assert_eq!(import(&bob, addr, None, "1-1"), Err(OpStatus::DevBusy));
    // A token is no way round a certificate's reservation.
    let forged = usbwire_fleet::reserve::new_token().unwrap().to_hex();
    assert_eq!(
        import(&bob, addr, None, &format!("1-1#{forged}")),
        Err(OpStatus::DevBusy)
    );
    assert_eq!(import(&alice, addr, as_alice(), "1-1"), Ok("1-1".into()));
    let log = server.log_text();
    assert!(
        log.contains("gated/1-1 is reserved by tls:"),
        "the refusal is not in the server's log:\n{log}"
    );

    // --- Reserved in plaintext: the holder's proof is its token.
    let taken = json_of(
        &usbip(
            &bob,
            &bob_dir,
            &[
                "reserve",
                "--fleet",
                &eps,
                "gated/1-2",
                "--client-id",
                "bob@lab",
                "--json",
            ],
        ),
        "bob reserves gated/1-2",
    );
    assert_eq!(taken["holder"], "bob@lab", "{taken}");
    let token = recorded_token(&bob_dir, "gated/1-2");
    assert_eq!(import(&alice, addr, None, "1-2"), Err(OpStatus::DevBusy));
    assert_eq!(
        import(&alice, addr, as_alice(), "1-2"),
        Err(OpStatus::DevBusy)
    );
    assert_eq!(
        import(&alice, addr, None, &format!("1-2#{forged}")),
        Err(OpStatus::DevBusy)
    );
    assert_eq!(
        import(&bob, addr, None, &format!("1-2#{token}")),
        Ok("1-2".into())
    );

    // --- Released: anyone's again.
    let out = usbip(&bob, &bob_dir, &["release", "gated/1-2"]);
    assert!(out.status.success(), "{out:?}");
    let out = usbip(&alice, &alice_dir, &["release", "gated/1-1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        import_once_free(&bob, addr, as_bob, "1-1"),
        Ok("1-1".into())
    );
    assert_eq!(
        import_once_free(&alice, addr, || None, "1-2"),
        Ok("1-2".into())
    );
    server.terminate();
    println!("whole test: {:?}", t0.elapsed());
}
