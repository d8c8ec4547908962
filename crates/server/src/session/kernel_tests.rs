//! Imports of a device a kernel driver runs, against a fake driver: its
//! `usbip_status` and `usbip_sockfd` are files in a temporary directory,
//! and a thread stands in for the driver's receive and transmit threads.
//! What the kernel does (look the written number up, keep its own
//! reference, answer on the socket, go back to available once the
//! connection ends) the fake does the same way; the real drivers are
//! exercised in the guest (tests/tests/kernel_stub.rs).

use std::fs;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use usbwire_proto::op::USBIP_VERSION;
use usbwire_proto::{Decoded, DeviceInfo, Limits, OpReply, OpRequest, OpStatus};
use usbwire_usb::{KernelHandoff, KernelState};

use crate::tls::KernelTls;
use crate::{Backend, Completion, Registry, Server, ServerConfig, TransferType, Urb, WaitBounds};

/// What the fake driver says first on a connection it took.
const GREETING: &[u8] = b"stub_tx speaking";
/// A bound on every wait for an event, so that a broken server fails the
/// test instead of hanging it; no assertion depends on it.
const EVENT_BOUND: Duration = Duration::from_secs(30);

/// One connection the fake driver took.
#[derive(Debug)]
struct Handed {
    /// What was written to `usbip_sockfd`.
    written: String,
    /// The descriptor number the writer passed.
    fd: i32,
    /// The peer of the socket behind that number: the importing client.
    peer: SocketAddr,
}

/// A device of a fake USB/IP kernel driver.
struct FakeKernelDevice {
    dir: PathBuf,
    handed: mpsc::Sender<Handed>,
    /// How often the server gave the backend back.
    releases: Arc<Mutex<usize>>,
}

impl FakeKernelDevice {
    fn status_path(&self) -> PathBuf {
        self.dir.join("usbip_status")
    }
}

/// Sets the fake `usbip_status` in one step, as sysfs shows a status:
/// a reader never sees the file half-written.
fn set_status(dir: &std::path::Path, status: u32) {
    let tmp = dir.join(format!("usbip_status.{status}.tmp"));
    fs::write(&tmp, format!("{status}\n")).unwrap();
    fs::rename(tmp, dir.join("usbip_status")).unwrap();
}

impl KernelHandoff for FakeKernelDevice {
    fn driver(&self) -> &str {
        "fake-stub"
    }

    fn state(&self) -> io::Result<KernelState> {
        KernelState::parse(&fs::read_to_string(self.status_path())?)
    }

    fn hand_over(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let sockfd = self.dir.join("usbip_sockfd");
        fs::write(&sockfd, format!("{}\n", socket.as_raw_fd()))?;
        // The kernel's side: sockfd_lookup of the number written takes
        // its own reference to the socket.
        let written = fs::read_to_string(&sockfd)?;
        let fd: i32 = written
            .trim()
            .parse()
            .map_err(|_| io::Error::other("not a number"))?;
        if fd != socket.as_raw_fd() {
            return Err(io::Error::other("another descriptor"));
        }
        let kernel = std::net::TcpStream::from(socket.try_clone_to_owned()?);
        let peer = kernel.peer_addr()?;
        set_status(&self.dir, 2);
        let dir = self.dir.clone();
        std::thread::spawn(move || fake_driver(kernel, dir));
        let _ = self.handed.send(Handed { written, fd, peer });
        Ok(())
    }
}

/// The fake driver's threads: greets, echoes what the client sends until
/// the connection ends, then shuts it down and is available again, as
/// the stub's event handler does.
fn fake_driver(mut socket: std::net::TcpStream, dir: PathBuf) {
    let _ = socket.write_all(GREETING);
    let mut buf = [0u8; 256];
    // Bounded by the connection's end, which every test brings about.
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if socket.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = socket.shutdown(std::net::Shutdown::Both);
    drop(socket);
    set_status(&dir, 1);
}

impl Backend for FakeKernelDevice {
    fn device_info(&self, busid: &str, _: u32, _: u32) -> DeviceInfo {
        let mut info = crate::registry::placeholder_info(busid);
        info.id_vendor = 0x1d6b;
        info.id_product = 0x0104;
        info
    }
    fn transfer_type(&self, _: u8) -> Option<TransferType> {
        None
    }
    fn poll_urb(
        &mut self,
        _: &mut Urb,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Completion> {
        unreachable!("the kernel runs this device's URBs")
    }
    fn release(&mut self) {
        *self.releases.lock().unwrap() += 1;
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn kernel_handoff(&mut self) -> Option<&mut dyn KernelHandoff> {
        Some(self)
    }
}

/// A fake device exported as 1-1, available.
struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    registry: Registry,
    handed: mpsc::Receiver<Handed>,
    releases: Arc<Mutex<usize>>,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    set_status(&dir, 1);
    let (tx, handed) = mpsc::channel();
    let releases = Arc::new(Mutex::new(0));
    let device = FakeKernelDevice {
        dir: dir.clone(),
        handed: tx,
        releases: releases.clone(),
    };
    let registry = Registry::new();
    registry
        .add(device.device_info("1-1", 1, 2), Box::new(device))
        .unwrap();
    Fixture {
        _dir: tmp,
        dir,
        registry,
        handed,
        releases,
    }
}

fn import_request() -> Vec<u8> {
    let mut bytes = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: "1-1".into(),
    }
    .encode(&mut bytes);
    bytes
}

/// The OP_REP_IMPORT at the front of `bytes`, if it is all there.
fn import_reply(bytes: &[u8]) -> Option<(OpStatus, Option<DeviceInfo>, usize)> {
    match OpReply::decode(bytes, &Limits::default()).unwrap() {
        Decoded::Message(OpReply::Import { status, device, .. }, used) => {
            Some((status, device, used))
        }
        Decoded::Message(other, _) => panic!("not an import reply: {other:?}"),
        Decoded::NeedMore(_) => None,
    }
}

/// Imports 1-1 over plaintext: the connection, the status, and what came
/// after the reply in the same reads.
async fn import(addr: SocketAddr) -> (TcpStream, OpStatus, Vec<u8>) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(&import_request()).await.unwrap();
    let mut got = Vec::new();
    // Bounded by the reply's length or the server's close.
    loop {
        if let Some((status, device, used)) = import_reply(&got) {
            if status == OpStatus::Ok {
                assert_eq!(device.unwrap().busid, "1-1");
            }
            return (c, status, got.split_off(used));
        }
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "the server closed before its import reply");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Reads exactly `len` bytes after `already`.
async fn read_exactly(c: &mut TcpStream, mut already: Vec<u8>, len: usize) -> Vec<u8> {
    let start = already.len();
    already.resize(len.max(start), 0);
    c.read_exact(&mut already[start..]).await.unwrap();
    already
}

/// Waits until `done` holds of the registry, woken by its changes.
async fn until(registry: &Registry, done: impl Fn(&Registry) -> bool) {
    let mut changes = registry.changes();
    tokio::time::timeout(EVENT_BOUND, async {
        // Bounded by EVENT_BOUND.
        while !done(registry) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the registry never reached the state waited for");
}

fn imported_by(registry: &Registry) -> Option<SocketAddr> {
    registry.client_of("1-1")
}

fn available(registry: &Registry) -> bool {
    registry.devlist().iter().any(|d| d.busid == "1-1")
}

fn recv_handed(handed: &mpsc::Receiver<Handed>) -> Handed {
    handed
        .recv_timeout(EVENT_BOUND)
        .expect("the connection was not handed to the driver")
}

fn config() -> ServerConfig {
    ServerConfig {
        // A second import of a held device is refused without waiting
        // long for it.
        import_wait: WaitBounds {
            close: Duration::from_millis(50),
            release: Duration::from_millis(50),
        },
        workers: 1,
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn a_plaintext_import_hands_the_socket_to_the_driver_until_it_lets_go() {
    let f = fixture();
    let server = Server::new(f.registry.clone(), config()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let server = server.clone();
        async move { server.run(vec![listener], stopped).await }
    });

    let (mut a, status, rest) = import(addr).await;
    assert_eq!(status, OpStatus::Ok);
    let handed = tokio::task::spawn_blocking({
        let rx = f.handed;
        move || (recv_handed(&rx), rx)
    })
    .await
    .unwrap();
    let (handed, rx) = handed;
    assert_eq!(handed.written, format!("{}\n", handed.fd));
    assert_eq!(
        handed.peer,
        a.local_addr().unwrap(),
        "the importer's socket"
    );
    // The driver runs the connection: it speaks first, and what the
    // client sends reaches it, not the server.
    assert_eq!(read_exactly(&mut a, rest, GREETING.len()).await, GREETING);
    a.write_all(b"CMD_SUBMIT, say").await.unwrap();
    assert_eq!(
        read_exactly(&mut a, Vec::new(), 15).await,
        b"CMD_SUBMIT, say"
    );
    // Imported by this client for as long as the driver holds it.
    assert_eq!(imported_by(&f.registry), Some(a.local_addr().unwrap()));
    assert!(!available(&f.registry));
    assert!(f.registry.all().iter().all(|(_, imported)| *imported));
    let (_b, status, _) = import(addr).await;
    assert_eq!(status, OpStatus::DevBusy);

    // The client leaves; the driver sees the end, goes back to available,
    // and the server gives the device back for the next import.
    drop(a);
    until(&f.registry, |r| available(r) && imported_by(r).is_none()).await;
    assert_eq!(*f.releases.lock().unwrap(), 1);

    let (mut c, status, rest) = import(addr).await;
    assert_eq!(status, OpStatus::Ok);
    let (handed, _rx) = tokio::task::spawn_blocking(move || (recv_handed(&rx), rx))
        .await
        .unwrap();
    assert_eq!(handed.peer, c.local_addr().unwrap());
    assert_eq!(read_exactly(&mut c, rest, GREETING.len()).await, GREETING);

    // Shutdown ends the driver's connection instead of waiting for it,
    // and gives the device back.
    stop.send(()).unwrap();
    tokio::time::timeout(EVENT_BOUND, running)
        .await
        .expect("the server's shutdown hung on the device the kernel held")
        .unwrap();
    let mut tail = Vec::new();
    c.read_to_end(&mut tail).await.unwrap();
    assert!(tail.is_empty(), "{tail:?}");
    assert!(available(&f.registry));
    assert_eq!(*f.releases.lock().unwrap(), 2);
}

#[tokio::test]
async fn a_driver_that_holds_a_connection_of_its_own_is_refused_with_busy() {
    // Bound to usbip-host and handed a connection by another daemon.
    let f = fixture();
    set_status(&f.dir, 2);
    let server = Server::new(f.registry.clone(), config()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move { server.run(vec![listener], stopped).await });
    let (_a, status, _) = import(addr).await;
    assert_eq!(status, OpStatus::DevBusy);
    until(&f.registry, available).await;
    set_status(&f.dir, 3);
    let (_a, status, _) = import(addr).await;
    assert_eq!(status, OpStatus::DevErr);
    assert!(f.handed.try_recv().is_err(), "nothing was handed over");
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// A TLS 1.3 server identity without client authentication, set up as
/// `tls::server_config` sets up a real one for kernel TLS.
fn tls_server() -> (Arc<rustls::ServerConfig>, rcgen::Certificate) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )),
    )
    .unwrap();
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    (Arc::new(config), cert)
}

/// A blocking rustls client that imports 1-1: the status, and the
/// plaintext that followed until the server or the driver closed.
fn tls_import(addr: SocketAddr, cert: &rcgen::Certificate) -> (OpStatus, Vec<u8>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(EVENT_BOUND)).unwrap();
    let mut tls =
        rustls::ClientConnection::new(Arc::new(config), "usbwire.test".try_into().unwrap())
            .unwrap();
    let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
    stream.write_all(&import_request()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    // Bounded by the reply's length and the close that follows.
    let (status, used) = loop {
        if let Some((status, _, used)) = import_reply(&got) {
            break (status, used);
        }
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the import reply");
        got.extend_from_slice(&buf[..n]);
    };
    let mut rest = got.split_off(used);
    if status == OpStatus::Ok {
        // The driver's greeting, through kernel TLS.
        while rest.len() < GREETING.len() {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "closed before the driver spoke");
            rest.extend_from_slice(&buf[..n]);
        }
    } else {
        // Closed without close_notify: read_to_end reports that as an
        // error, and nothing more may have come.
        let _ = stream.read_to_end(&mut rest);
    }
    (status, rest)
}

/// The log lines of the current thread, while the guard lives.
fn capture_log() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(log.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    (log, tracing::subscriber::set_default(subscriber))
}

/// Serves one TLS connection with the engine's driver on this thread.
async fn serve_tls_import(f: &Fixture, kernel: KernelTls) -> (OpStatus, Vec<u8>, String) {
    let (tls, cert) = tls_server();
    let mut config = config();
    config.access.tls = Some(tls);
    config.access.kernel = kernel;
    let state = Arc::new(crate::ServerState::new(f.registry.clone(), config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::task::spawn_blocking(move || tls_import(addr, &cert));
    let (log, _guard) = capture_log();
    let (server, _) = listener.accept().await.unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let served = crate::session::driver::serve(server, state, 7, stop_rx);
    let (served, client) = tokio::join!(served, client);
    served.unwrap();
    let (status, rest) = client.unwrap();
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    (status, rest, log)
}

#[tokio::test]
async fn a_tls_import_is_refused_with_a_status_when_kernel_tls_is_switched_off() {
    let f = fixture();
    let (status, rest, log) = serve_tls_import(&f, KernelTls::Off).await;
    assert_eq!(status, OpStatus::Na);
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        log.contains("import refused")
            && log.contains("fake-stub, which needs kernel TLS")
            && log.contains("[tls] kernel = \"off\""),
        "{log}"
    );
    assert!(f.handed.try_recv().is_err(), "nothing was handed over");
    // Nothing half-done: the device is available again.
    assert!(available(&f.registry));
}

#[tokio::test]
async fn a_tls_import_gets_kernel_tls_for_the_driver_or_a_status_without_it() {
    let f = fixture();
    let kernel_tls = tokio::task::spawn_blocking(crate::tls::probe_kernel_tls)
        .await
        .unwrap();
    let (status, rest, log) = serve_tls_import(&f, KernelTls::Auto).await;
    match kernel_tls {
        // This host (no `tls` ULP): refused before the import is answered.
        Err(e) => {
            assert_eq!(status, OpStatus::Na, "{log}");
            assert!(rest.is_empty(), "{rest:?}");
            assert!(
                log.contains("import refused") && log.contains("needs kernel TLS"),
                "{log}"
            );
            assert!(log.contains(&e.to_string()), "the reason is named: {log}");
            assert!(f.handed.try_recv().is_err(), "nothing was handed over");
            assert!(available(&f.registry));
        }
        // A host with kernel TLS: the driver's words reach the client
        // through the kernel's encryption.
        Ok(()) => {
            assert_eq!(status, OpStatus::Ok, "{log}");
            assert_eq!(&rest[..GREETING.len()], GREETING);
            assert!(log.contains("via=kernel TLS"), "{log}");
            assert!(f.handed.try_recv().is_ok());
        }
    }
}

#[tokio::test]
async fn unbind_force_ends_the_drivers_connection_and_removes_the_device() {
    let f = fixture();
    let server = Server::new(f.registry.clone(), config()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn({
        let server = server.clone();
        async move { server.run(vec![listener], stopped).await }
    });
    let (mut a, status, rest) = import(addr).await;
    assert_eq!(status, OpStatus::Ok);
    assert_eq!(read_exactly(&mut a, rest, GREETING.len()).await, GREETING);
    let client = a.local_addr().unwrap();
    // Without --force: refused, naming the client; the connection goes on.
    let registry = f.registry.clone();
    let refused = tokio::task::spawn_blocking(move || {
        registry
            .remove_when_free("1-1", false, WaitBounds::default())
            .err()
    })
    .await
    .unwrap();
    assert_eq!(
        refused,
        Some(crate::RegistryError::InUse {
            busid: "1-1".into(),
            client
        })
    );
    a.write_all(b"still here").await.unwrap();
    assert_eq!(read_exactly(&mut a, Vec::new(), 10).await, b"still here");
    // --force: the socket is shut down under the driver, which lets go;
    // the device leaves the table once it has.
    let registry = f.registry.clone();
    let removed = tokio::task::spawn_blocking(move || {
        registry
            .remove_when_free("1-1", true, WaitBounds::default())
            .map(|r| r.forced)
    })
    .await
    .unwrap();
    assert_eq!(removed, Ok(Some(client)));
    let mut tail = Vec::new();
    a.read_to_end(&mut tail).await.unwrap();
    assert!(tail.is_empty(), "{tail:?}");
    assert_eq!(
        fs::read_to_string(f.dir.join("usbip_status")).unwrap(),
        "1\n"
    );
    assert!(f.registry.all().is_empty());
    stop.send(()).unwrap();
    running.await.unwrap();
}
