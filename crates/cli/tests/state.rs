//! `usbip state --json` against a real `usbipd`: what it shows before, during
//! and after imports in plaintext and TLS, checked against the published
//! schema (schema/usbip-state.schema.json).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Daemon;
use serde_json::Value;
use usbwire_client::{ServerTrust, TlsClientConfig};

/// How long one exchange with the daemon may take before the test fails
/// rather than hangs.
const LIMIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {LIMIT:?}"))
}

const SCHEMA: &str = include_str!("../../../schema/usbip-state.schema.json");

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema file is JSON");
    jsonschema::validator_for(&schema).expect("the schema file is a valid JSON schema")
}

/// `usbip state --json`, checked against the schema.
fn state(socket: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["state", "--json", "--control-socket"])
        .arg(socket)
        .output()
        .expect("running usbip");
    assert!(
        out.status.success(),
        "usbip state failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("usbip state --json prints JSON");
    let errors: Vec<String> = validator()
        .iter_errors(&v)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{v} breaks the schema: {errors:#?}");
    v
}

fn device<'a>(state: &'a Value, busid: &str) -> &'a Value {
    state["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["busid"] == busid)
        .unwrap_or_else(|| panic!("{busid} missing from {state}"))
}

/// Polls `usbip state` until `done` holds: the import's end is seen by the
/// server when the client's close arrives, not when the client returns.
/// Bounded in count; each turn waits for a real change of the daemon.
fn state_until(socket: &Path, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..500 {
        let v = state(socket);
        if done(&v) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "usbip state never reached the expected state: {}",
        state(socket)
    );
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn socket(&self) -> PathBuf {
        self.path("usbipd.sock")
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        let socket = self.socket();
        let state_file = self.path("bindings.json");
        let mut args = vec![
            "--demo",
            "--control-socket",
            socket.to_str().unwrap(),
            "--state-file",
            state_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, self.dir.path())
    }

    /// Writes NAME.pem and NAME.key: a self-signed certificate for `cn`.
    fn identity(&self, name: &str, cn: &str) -> (PathBuf, PathBuf, String) {
        let made = usbwire_client::self_signed(cn).unwrap();
        let (cert, key) = (
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert_pem).unwrap();
        std::fs::write(&key, made.key_pem).unwrap();
        (cert, key, made.fingerprint.to_string())
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_shows_each_import_its_client_and_traffic() {
    let s = Setup::new();
    let d = s.start(&[]);
    let socket = s.socket();

    let idle = tokio::task::block_in_place(|| state(&socket));
    assert_eq!(idle["schema"], 1);
    let devices = idle["devices"].as_array().unwrap();
    assert!(
        devices.len() >= 2,
        "the demo set exports several devices: {idle}"
    );
    assert!(devices.iter().all(|d| d["import"].is_null()), "{idle}");
    let busid = devices[0]["busid"].as_str().unwrap().to_string();
    let other = devices[1]["busid"].as_str().unwrap().to_string();

    let before = now_unix();
    let dev = within("the import", usbwire_client::import(d.addr(), &busid))
        .await
        .unwrap();
    const READS: usize = 5;
    for _ in 0..READS {
        within("a descriptor read", dev.device_descriptor())
            .await
            .unwrap();
    }
    let v = tokio::task::block_in_place(|| state(&socket));
    let import = &device(&v, &busid)["import"];
    assert_eq!(import["state"], "imported");
    // The server's view of this connection's address is the client's own.
    // (The client library does not show its local address; the port
    // varies, the loopback address does not.)
    assert!(
        import["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{import}"
    );
    assert!(
        import["tls"].is_null(),
        "a plaintext import has no TLS identity: {import}"
    );
    let since = import["since_unix"].as_u64().unwrap();
    assert!(since >= before && since <= now_unix(), "{import}");
    let traffic = &import["traffic"];
    // Each descriptor read is one URB: a 48-byte CMD_SUBMIT in, a 48-byte
    // RET_SUBMIT and the descriptor's 18 bytes out. A URB and the bytes of
    // its command are counted before its reply is sent; the bytes of a
    // reply only once the socket took them, which the client may see
    // first, so the last reply's are not relied on.
    let urbs = traffic["urbs"].as_u64().unwrap();
    assert_eq!(urbs, READS as u64, "{traffic}");
    assert!(
        traffic["bytes_from_client"].as_u64().unwrap() >= 48 * urbs,
        "{traffic}"
    );
    assert!(
        traffic["bytes_to_client"].as_u64().unwrap() >= (48 + 18) * (READS as u64 - 1),
        "{traffic}"
    );
    assert!(device(&v, &other)["import"].is_null(), "{v}");

    // More URBs move the counters on.
    within("a descriptor read", dev.device_descriptor())
        .await
        .unwrap();
    let v2 = tokio::task::block_in_place(|| state(&socket));
    let t2 = &device(&v2, &busid)["import"]["traffic"];
    assert_eq!(t2["urbs"].as_u64().unwrap(), urbs + 1, "{t2}");

    // The import ends with its connection: the device is available again.
    drop(dev);
    tokio::task::block_in_place(|| state_until(&socket, |v| device(v, &busid)["import"].is_null()));

    // Without --json: the same, for a person.
    let out = Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["state", "--control-socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&busid) && text.contains("available"),
        "{text}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_shows_the_tls_clients_certificate() {
    let s = Setup::new();
    let (server_cert, server_key, server_fp) = s.identity("server", "localhost");
    let (client_cert, client_key, client_fp) = s.identity("client", "alice");
    let d = s.start(&[
        "--tls-cert",
        server_cert.to_str().unwrap(),
        "--tls-key",
        server_key.to_str().unwrap(),
        "--tls-client-fingerprint",
        &client_fp,
        "--tls-kernel",
        "off",
    ]);
    let socket = s.socket();
    let busid = tokio::task::block_in_place(|| state(&socket))["devices"][0]["busid"]
        .as_str()
        .unwrap()
        .to_string();
    let tls = TlsClientConfig::from_files(
        Some((&client_cert, &client_key)),
        &ServerTrust::Fingerprint(server_fp.parse().unwrap()),
    )
    .unwrap();
    let dev = within(
        "the TLS import",
        usbwire_client::import_tls("127.0.0.1", d.port, &tls, &busid),
    )
    .await
    .unwrap();
    within("a descriptor read", dev.device_descriptor())
        .await
        .unwrap();
    let v = tokio::task::block_in_place(|| state(&socket));
    let import = &device(&v, &busid)["import"];
    assert_eq!(import["tls"]["fingerprint"], client_fp.as_str(), "{import}");
    assert_eq!(import["tls"]["subject"], "CN=alice", "{import}");
    // Accepted by its pinned fingerprint, not by a CA.
    assert_eq!(import["tls"]["subject_verified"], false, "{import}");
    assert!(import["traffic"]["urbs"].as_u64().unwrap() >= 1, "{import}");
    drop(dev);
    d.stop();
}

/// The schema is strict: what it lets through is what the daemon promises.
#[test]
fn the_schema_rejects_what_the_daemon_never_prints() {
    let good = serde_json::json!({
        "schema": 1,
        "devices": [{
            "busid": "1-1", "vendor_id": "1d6b", "product_id": "0104",
            "speed": "High Speed(480Mbps)",
            "import": {
                "client": "10.0.0.2:40000", "state": "imported", "since_unix": 1,
                "tls": null,
                "traffic": {"urbs": 1, "bytes_from_client": 48, "bytes_to_client": 66}
            }
        }]
    });
    let v = validator();
    assert!(v.is_valid(&good));
    let bad = |f: &dyn Fn(&mut Value)| {
        let mut x = good.clone();
        f(&mut x);
        assert!(!v.is_valid(&x), "the schema let {x} through");
    };
    bad(&|x| x["schema"] = 2.into());
    bad(&|x| x["devices"][0]["vendor_id"] = "1D6B".into());
    bad(&|x| x["devices"][0]["import"]["state"] = "busy".into());
    bad(&|x| x["devices"][0]["import"]["traffic"]["urbs"] = (-1).into());
    bad(&|x| {
        x["devices"][0]["import"]
            .as_object_mut()
            .unwrap()
            .remove("tls");
    });
    bad(&|x| x["devices"][0]["extra"] = 1.into());
    bad(&|x| x["devices"][0]["import"]["tls"] = serde_json::json!({"fingerprint": "AB"}));
}
