//! The client library over TLS 1.3 with client certificates, against a
//! rustls server the test runs: a TLS-terminating front in front of a
//! plaintext usbwire server (the server's own TLS is another branch's).
//! Checks mutual-TLS devlist, import and URBs, and that each refusal says
//! what happened, and that a plaintext server is never used silently.

use std::net::SocketAddr;
use std::time::Duration;

use usbwire_client::{ClientError, ServerTrust, TlsClientConfig, TlsError};
use usbwire_devices::testdev::{Pattern, TestDevice};
use usbwire_devices::EmulatedDevice;
use usbwire_server::ServerConfig;
use usbwire_tests::support::TestServer;
use usbwire_tests::tls::{self_signed, server_tls, tls_front, Ca, Pem};

/// Every network step of these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(30);

/// A plaintext usbwire server exporting one test device (1-1).
async fn usbwire_server() -> TestServer {
    TestServer::start(
        vec![EmulatedDevice::new(TestDevice::with_pattern(
            Pattern::Zeros,
        ))],
        ServerConfig::default(),
    )
    .await
}

/// A CA, a server certificate it signed for 127.0.0.1, a client it signed,
/// and the front serving with them.
struct Setup {
    dir: tempfile::TempDir,
    ca: Ca,
    server: Pem,
    front: SocketAddr,
    _backend: TestServer,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("usbwire test CA");
        let server = ca.issue(&["127.0.0.1", "localhost"]);
        let backend = usbwire_server().await;
        let front = tls_front(server_tls(&server, &ca), backend.addr).await;
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        Setup {
            dir,
            ca,
            server,
            front,
            _backend: backend,
        }
    }

    fn ca_trust(&self) -> ServerTrust {
        ServerTrust::CaFile(self.dir.path().join("ca.crt"))
    }

    /// A client certificate the server's CA signed.
    fn known_client(&self, trust: &ServerTrust) -> TlsClientConfig {
        let (cert, key) = self.ca.issue(&["client"]).write(self.dir.path(), "client");
        TlsClientConfig::from_files(Some((&cert, &key)), trust).unwrap()
    }
}

async fn list(addr: SocketAddr, tls: &TlsClientConfig) -> Result<Vec<String>, ClientError> {
    let devices = tokio::time::timeout(
        LIMIT,
        usbwire_client::list_tls("127.0.0.1", addr.port(), tls),
    )
    .await
    .expect("list_tls ended");
    devices.map(|d| d.into_iter().map(|d| d.busid.to_string()).collect())
}

fn tls_error(result: Result<Vec<String>, ClientError>) -> TlsError {
    match result {
        Err(ClientError::Tls { source, .. }) => source,
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn mutual_tls_lists_imports_and_moves_urbs() {
    let setup = Setup::new().await;
    let tls = setup.known_client(&setup.ca_trust());
    assert_eq!(list(setup.front, &tls).await.unwrap(), ["1-1"]);

    let device = tokio::time::timeout(
        LIMIT,
        usbwire_client::import_tls("127.0.0.1", setup.front.port(), &tls, "1-1"),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(device.info().busid, "1-1");
    let urbs = async {
        let descriptor = device.device_descriptor().await.unwrap();
        assert_eq!(descriptor.len(), 18);
        assert_eq!(descriptor[1], 1, "a device descriptor");
        device.set_configuration(1).await.unwrap();
        // Larger than a TLS record (16 KiB) both ways.
        let out: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        assert_eq!(device.bulk_out(0x02, &out).await.unwrap(), out.len() as u32);
        let back = device.bulk_in(0x81, 64 * 1024).await.unwrap();
        assert_eq!(back.len(), 64 * 1024);
        assert!(back.iter().all(|&b| b == 0), "the zeros pattern");
        // Many in flight at once through the one session.
        let pending: Vec<_> = (0..32)
            .map(|_| device.submit(usbwire_client::TransferRequest::bulk_in(1, 512)))
            .collect();
        for p in pending {
            let done = p.await;
            assert_eq!(done.status, Ok(()));
            assert_eq!(done.actual_length, 512);
        }
    };
    tokio::time::timeout(LIMIT, urbs).await.expect("URBs done");
}

#[tokio::test]
async fn a_pinned_fingerprint_stands_in_for_a_ca() {
    let setup = Setup::new().await;
    let tls = setup.known_client(&ServerTrust::Fingerprint(setup.server.fingerprint()));
    assert_eq!(list(setup.front, &tls).await.unwrap(), ["1-1"]);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_told_the_server_requires_one() {
    let setup = Setup::new().await;
    let tls = TlsClientConfig::from_files(None, &setup.ca_trust()).unwrap();
    let e = tls_error(list(setup.front, &tls).await);
    assert!(matches!(e, TlsError::ClientCertRequired), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("server requires a client certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn a_client_certificate_the_server_does_not_trust_is_refused_as_such() {
    let setup = Setup::new().await;
    let (cert, key) = self_signed("stranger").write(setup.dir.path(), "stranger");
    let tls = TlsClientConfig::from_files(Some((&cert, &key)), &setup.ca_trust()).unwrap();
    let e = tls_error(list(setup.front, &tls).await);
    assert!(matches!(e, TlsError::ClientCertRejected(_)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("server rejected this client's certificate"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_not_matching_the_pin_is_refused() {
    let setup = Setup::new().await;
    let other = self_signed("127.0.0.1").fingerprint();
    let tls = setup.known_client(&ServerTrust::Fingerprint(other));
    let e = tls_error(list(setup.front, &tls).await);
    match &e {
        TlsError::FingerprintMismatch { pinned, actual } => {
            assert_eq!(*pinned, other);
            assert_eq!(*actual, setup.server.fingerprint());
        }
        e => panic!("{e:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("server certificate does not match the pinned fingerprint"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_not_signed_by_the_ca_is_refused() {
    let setup = Setup::new().await;
    let other_ca = Ca::new("another CA");
    let path = setup.dir.path().join("other-ca.crt");
    std::fs::write(&path, other_ca.pem()).unwrap();
    let tls = setup.known_client(&ServerTrust::CaFile(path));
    let e = tls_error(list(setup.front, &tls).await);
    assert!(matches!(e, TlsError::UnknownIssuer(_)), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("server certificate is not signed by the given CA"),
        "{e}"
    );
}

#[tokio::test]
async fn a_plaintext_server_is_a_tls_error_not_a_listing() {
    let setup = Setup::new().await;
    let tls = setup.known_client(&setup.ca_trust());
    let plaintext = usbwire_server().await;
    let e = tls_error(list(plaintext.addr, &tls).await);
    assert!(
        matches!(e, TlsError::ClosedDuringHandshake | TlsError::NotTls(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("plaintext USB/IP server"), "{e}");
    let import = tokio::time::timeout(
        LIMIT,
        usbwire_client::import_tls("127.0.0.1", plaintext.addr.port(), &tls, "1-1"),
    )
    .await
    .unwrap();
    assert!(
        matches!(import, Err(ClientError::Tls { .. })),
        "{:?}",
        import.map(|d| d.info().busid.clone())
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_that_stalls_the_handshake_is_given_up_on() {
    let setup = Setup::new().await;
    let tls = setup.known_client(&setup.ca_trust());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and holds the connection without a word, until the test ends.
    let mute = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(socket);
    });
    // Virtual time: the deadline passes once nothing else can happen.
    let e = usbwire_client::list_tls("127.0.0.1", port, &tls).await;
    match e {
        Err(ClientError::Tls {
            source: TlsError::HandshakeTimeout(_),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    mute.abort();
}
