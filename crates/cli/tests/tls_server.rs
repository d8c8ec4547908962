//! usbipd with mutual TLS 1.3: a rustls client lists, imports and runs
//! URBs; clients without a certificate, with one from another CA, and in
//! plaintext are refused with words in the log; Debian's C usbip and
//! OpenSSL's s_client, which nobody here wrote, agree.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use usbwire_proto::urb::InFlight;
use usbwire_proto::{
    Decoded, Direction, Limits, OpReply, OpRequest, OpStatus, UrbReply, USBIP_VERSION,
};
use usbwire_server::tls::Fingerprint;
use usbwire_tests::support::{set_configuration, submit};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A certificate and its key, as DER and as PEM files.
struct Identity {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// A CA with what it signed: the server's identity and a client's.
struct Pki {
    ca_file: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        Pki {
            ca_file,
            ca_cert,
            ca_key,
        }
    }

    fn issue(&self, dir: &Path, name: &str, usage: ExtendedKeyUsagePurpose) -> Identity {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        Identity {
            cert: cert.der().clone(),
            key: key.serialize_der(),
            cert_file,
            key_file,
        }
    }
}

/// Everything a test needs: a CA that signs the server and one client,
/// and a second CA whose client the server does not know.
struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    server: Identity,
    client: Identity,
    stranger: Identity,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path(), "usbwire");
        let server = pki.issue(dir.path(), "server", ExtendedKeyUsagePurpose::ServerAuth);
        let client = pki.issue(dir.path(), "client", ExtendedKeyUsagePurpose::ClientAuth);
        let other = Pki::new(dir.path(), "other");
        let stranger = other.issue(dir.path(), "stranger", ExtendedKeyUsagePurpose::ClientAuth);
        Setup {
            dir,
            pki,
            server,
            client,
            stranger,
        }
    }

    /// usbipd exporting the test device (1-1) with TLS on, clients
    /// accepted by the CA, plus `extra`.
    fn daemon(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--tls-client-ca", self.pki.ca_file.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.daemon_without_ca(&args)
    }

    /// usbipd exporting the test device (1-1) with TLS on, `extra` saying
    /// which clients it accepts.
    fn daemon_without_ca(&self, extra: &[&str]) -> Daemon {
        let config = self.dir.path().join("usbipd.toml");
        std::fs::write(&config, "[[device]]\nkind = \"test\"\n").unwrap();
        let mut args = vec![
            "--no-control",
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            self.server.cert_file.to_str().unwrap(),
            "--tls-key",
            self.server.key_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, self.dir.path())
    }

    fn client_config(&self, identity: Option<&Identity>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.pki.ca_cert.der().to_vec()))
            .unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots);
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    vec![id.cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.clone())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// A USB/IP client over rustls, blocking, every read bounded in time.
struct TlsPeer {
    s: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsPeer {
    fn connect(d: &Daemon, config: Arc<ClientConfig>) -> TlsPeer {
        let tcp = TcpStream::connect(d.addr()).expect("connect to usbipd");
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(config, name).unwrap();
        TlsPeer {
            s: StreamOwned::new(conn, tcp),
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn op_reply(&mut self) -> std::io::Result<OpReply> {
        // Bounded: every turn reads at least one byte or ends.
        loop {
            if let Decoded::Message(m, n) =
                OpReply::decode(&self.buf, &Limits::default()).expect("a valid OP reply")
            {
                self.buf.drain(..n);
                return Ok(m);
            }
            if self.fill()? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn devlist(&mut self) -> std::io::Result<OpReply> {
        let mut out = Vec::new();
        OpRequest::Devlist {
            version: USBIP_VERSION,
        }
        .encode(&mut out);
        self.send(&out)?;
        self.op_reply()
    }

    /// Runs one URB and returns its status and IN data.
    fn urb(&mut self, cmd: usbwire_proto::CmdSubmit, data: &[u8]) -> (i32, Vec<u8>) {
        let mut out = Vec::new();
        cmd.encode(data, &[], &mut out);
        self.send(&out).expect("sending a URB over TLS");
        self.reply(&cmd)
    }

    /// The reply to `cmd`, sent earlier.
    fn reply(&mut self, cmd: &usbwire_proto::CmdSubmit) -> (i32, Vec<u8>) {
        let (direction, length) = (cmd.direction, cmd.transfer_buffer_length);
        loop {
            let d = UrbReply::decode(&self.buf, &Limits::default(), |_| {
                Some(InFlight {
                    direction,
                    iso: false,
                    length,
                })
            })
            .expect("a valid URB reply");
            if let Decoded::Message(UrbReply::Submit { ret, data, .. }, n) = d {
                assert_eq!(ret.seqnum, cmd.seqnum);
                let data = self.buf[data].to_vec();
                self.buf.drain(..n);
                return (ret.status, data);
            }
            assert!(
                self.fill().expect("reading a URB reply over TLS") > 0,
                "usbipd closed the TLS connection"
            );
        }
    }
}

/// The TLS alert a refused client received.
fn alert(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

#[test]
fn mutual_tls_devlist_import_and_urbs() {
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    let config = setup.client_config(Some(&setup.client));

    let mut p = TlsPeer::connect(&d, config.clone());
    match p.devlist().expect("devlist over TLS") {
        OpReply::Devlist {
            status: OpStatus::Ok,
            devices,
            ..
        } => {
            let busids: Vec<String> = devices.iter().map(|d| d.busid.to_string()).collect();
            assert_eq!(busids, ["1-1"]);
        }
        other => panic!("unexpected reply {other:?}"),
    }
    assert_eq!(
        p.s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let mut p = TlsPeer::connect(&d, config);
    let mut out = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: "1-1".into(),
    }
    .encode(&mut out);
    p.send(&out).unwrap();
    match p.op_reply().expect("import reply over TLS") {
        OpReply::Import {
            status: OpStatus::Ok,
            device: Some(dev),
            ..
        } => assert_eq!(dev.busid.to_string(), "1-1"),
        other => panic!("import failed: {other:?}"),
    }
    assert_eq!(p.urb(set_configuration(1), &[]).0, 0);
    // The test device's sink (0x02) and source (0x81), zeros pattern:
    // a few bulk URBs each way, from a short packet to 64 KiB.
    let mut seqnum = 2;
    for len in [512u32, 4096, 65536] {
        let payload = vec![0u8; len as usize];
        let (status, _) = p.urb(submit(seqnum, 2, Direction::Out, len), &payload);
        assert_eq!(status, 0, "bulk OUT of {len} bytes");
        seqnum += 1;
        let (status, data) = p.urb(submit(seqnum, 1, Direction::In, len), &[]);
        assert_eq!(status, 0, "bulk IN of {len} bytes");
        assert_eq!(data.len(), len as usize);
        assert!(data.iter().all(|&b| b == 0));
        seqnum += 1;
    }
    // Sixteen 64 KiB OUT transfers sent at once: once the URB phase runs
    // in user space the server reads the socket ahead of rustls, several
    // records a read, and every byte must still land in its own transfer.
    // The loopback (0x04 -> 0x83) gives each message back whole, in order.
    let messages: Vec<Vec<u8>> = (0..16u8)
        .map(|m| (0..65536u32).map(|i| (i % 239) as u8 ^ m).collect())
        .collect();
    let mut burst = Vec::new();
    let mut cmds = Vec::new();
    for m in &messages {
        let cmd = submit(seqnum, 4, Direction::Out, m.len() as u32);
        cmd.encode(m, &[], &mut burst);
        cmds.push(cmd);
        seqnum += 1;
    }
    p.send(&burst).unwrap();
    for cmd in &cmds {
        assert_eq!(p.reply(cmd).0, 0, "loopback OUT {}", cmd.seqnum);
    }
    for (m, expected) in messages.iter().enumerate() {
        let (status, data) = p.urb(submit(seqnum, 3, Direction::In, 65536), &[]);
        assert_eq!(status, 0, "loopback IN {m}");
        assert!(data == *expected, "loopback message {m} came back changed");
        seqnum += 1;
    }
    drop(p);
    let log = d.log_text();
    assert!(log.contains("TLS client authenticated"), "{log}");
    assert!(log.contains("imported"), "{log}");
    d.stop();
}

#[test]
fn the_server_sends_no_session_ticket() {
    // A ticket after the handshake would break a client that hands its
    // socket to kernel TLS (vhci-hcd): its receive path takes only data.
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    let store = Arc::new(ClientSessionMemoryCache::new(8));
    let mut config = (*setup.client_config(Some(&setup.client))).clone();
    config.resumption = Resumption::store(store.clone());
    let mut p = TlsPeer::connect(&d, Arc::new(config));
    p.devlist().expect("devlist over TLS");
    // The whole connection was read, to the server's close_notify.
    assert_eq!(p.fill().expect("read to the end"), 0);
    let name = ServerName::try_from("localhost").unwrap();
    assert!(
        store.take_tls13_ticket(&name).is_none(),
        "usbipd sent a TLS 1.3 session ticket"
    );
    d.stop();
}

#[test]
fn pinned_client_fingerprint_without_ca() {
    let setup = Setup::new();
    let pin = Fingerprint::of(&setup.client.cert).to_string();
    let d = setup.daemon_without_ca(&["--tls-client-fingerprint", &pin]);
    let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.client)));
    assert!(matches!(
        p.devlist().expect("devlist for a pinned client"),
        OpReply::Devlist { .. }
    ));
    let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.stranger)));
    let e = p
        .devlist()
        .expect_err("a client with an unpinned certificate was served");
    assert!(alert(&e).is_some(), "{e:?}");
    let log = d.log_text();
    assert!(
        log.contains("the client's certificate matches no --tls-client-fingerprint"),
        "{log}"
    );
    d.stop();
}

#[test]
fn client_without_certificate_is_refused() {
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    let mut p = TlsPeer::connect(&d, setup.client_config(None));
    let e = p
        .devlist()
        .expect_err("a client without certificate was served");
    assert_eq!(
        alert(&e),
        Some(AlertDescription::CertificateRequired),
        "{e:?}"
    );
    let log = d.log_text();
    assert!(
        log.contains("refused a TLS connection: the client presented no certificate"),
        "{log}"
    );
    d.stop();
}

#[test]
fn client_with_certificate_from_another_ca_is_refused() {
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.stranger)));
    let e = p
        .devlist()
        .expect_err("a client of an unknown CA was served");
    assert_eq!(alert(&e), Some(AlertDescription::UnknownCA), "{e:?}");
    let log = d.log_text();
    assert!(
        log.contains("the client's certificate is not signed by the CA in --tls-client-ca"),
        "{log}"
    );
    d.stop();
}

/// Runs Debian's C `usbip list -r` against `d`.
fn c_list(c_usbip: &Path, d: &Daemon) -> std::process::Output {
    Command::new(c_usbip)
        .args(["--tcp-port", &d.port.to_string(), "list", "-r", "127.0.0.1"])
        .output()
        .expect("running Debian's usbip")
}

#[test]
fn plaintext_is_refused_with_tls_on() {
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    // Our own plaintext client...
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt.block_on(usbwire_client::list(d.addr()));
    assert!(listed.is_err(), "plaintext devlist served: {listed:?}");
    // ...and Debian's.
    if let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") {
        let out = c_list(&c_usbip, &d);
        assert!(
            !out.status.success(),
            "C usbip listed over plaintext: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("1-1"));
    }
    let log = d.log_text();
    assert!(
        log.contains(
            "refused a plaintext connection: this server requires TLS; \
             to let this source use plaintext, add --allow-plaintext 127.0.0.1/32"
        ),
        "{log}"
    );
    d.stop();
}

#[test]
fn plaintext_is_served_from_an_allowed_network() {
    let setup = Setup::new();
    let d = setup.daemon(&["--allow-plaintext", "127.0.0.0/8"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt
        .block_on(usbwire_client::list(d.addr()))
        .expect("plaintext devlist from 127.0.0.0/8");
    assert_eq!(listed.len(), 1);
    if let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") {
        let out = c_list(&c_usbip, &d);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1-1:"),
            "C usbip list -r from an allowed network: {stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
    }
    // TLS still works beside it.
    let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.client)));
    assert!(matches!(
        p.devlist().expect("devlist over TLS"),
        OpReply::Devlist { .. }
    ));
    d.stop();
}

#[test]
fn tls_section_of_the_config_file() {
    let setup = Setup::new();
    // Relative paths: relative to the file, not to usbipd's directory.
    let config = setup.dir.path().join("tls.toml");
    std::fs::write(
        &config,
        "[tls]\n\
         cert = \"server.pem\"\n\
         key = \"server.key\"\n\
         client_ca = \"usbwire-ca.pem\"\n\
         allow_plaintext = [\"127.0.0.0/8\"]\n\
         [[device]]\n\
         kind = \"test\"\n",
    )
    .unwrap();
    let d = Daemon::start(
        &["--no-control", "--config", config.to_str().unwrap()],
        setup.dir.path(),
    );
    let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.client)));
    assert!(matches!(
        p.devlist().expect("devlist over TLS"),
        OpReply::Devlist { .. }
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = rt
        .block_on(usbwire_client::list(d.addr()))
        .expect("plaintext devlist from 127.0.0.0/8");
    assert_eq!(listed.len(), 1);
    let log = d.log_text();
    let pin = Fingerprint::of(&setup.server.cert).to_string();
    assert!(
        log.contains(&format!("server certificate SHA-256 fingerprint: {pin}")),
        "{log}"
    );
    d.stop();
}

#[test]
fn without_tls_the_log_says_the_devices_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&["--demo", "--no-control"], dir.path());
    let log = d.log_text();
    assert!(
        log.contains("no TLS configured: every exported device is open to anyone"),
        "{log}"
    );
    d.stop();
}

/// OpenSSL's s_client: TLS 1.3 is negotiated; without a client certificate
/// it gets the certificate_required alert, with one it is served.
#[test]
fn openssl_s_client_agrees() {
    let Some(openssl) = peer_binary("/usr/bin/openssl", "openssl") else {
        return;
    };
    let setup = Setup::new();
    let d = setup.daemon(&[]);
    let connect = format!("127.0.0.1:{}", d.port);
    let base = [
        "s_client",
        "-connect",
        &connect,
        "-tls1_3",
        "-servername",
        "localhost",
        "-CAfile",
        setup.pki.ca_file.to_str().unwrap(),
        "-verify_return_error",
        "-ign_eof",
    ];
    // OP_REQ_DEVLIST, as application data.
    let mut devlist = Vec::new();
    OpRequest::Devlist {
        version: USBIP_VERSION,
    }
    .encode(&mut devlist);

    let run = |extra: &[&str]| {
        let mut child = Command::new(&openssl)
            .args(base)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running openssl s_client");
        child.stdin.take().unwrap().write_all(&devlist).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (stdout, stderr) = run(&[]);
    assert!(stdout.contains("TLSv1.3"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("certificate required") || stderr.contains("alert number 116"),
        "s_client without a certificate: {stdout}\n{stderr}"
    );

    let (stdout, stderr) = run(&[
        "-cert",
        setup.client.cert_file.to_str().unwrap(),
        "-key",
        setup.client.key_file.to_str().unwrap(),
    ]);
    assert!(stdout.contains("TLSv1.3"), "{stdout}\n{stderr}");
    assert!(stdout.contains("Verification: OK"), "{stdout}\n{stderr}");

    // TLS 1.2 is not spoken at all.
    let out = Command::new(&openssl)
        .args(["s_client", "-connect", &connect, "-tls1_2"])
        .stdin(Stdio::null())
        .output()
        .expect("running openssl s_client -tls1_2");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "TLS 1.2 negotiated: {stdout}");
    let log = d.log_text();
    assert!(
        log.contains("refused a TLS connection: the client presented no certificate"),
        "{log}"
    );
    assert!(log.contains("TLS client authenticated"), "{log}");
    assert!(
        log.contains("the client cannot speak what this server requires (TLS 1.3)"),
        "{log}"
    );
    d.stop();
}

/// Imports the test device over `p` and runs a control and a bulk URB
/// each way through it.
fn import_and_run(p: &mut TlsPeer) {
    let mut out = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: "1-1".into(),
    }
    .encode(&mut out);
    p.send(&out).unwrap();
    assert!(matches!(
        p.op_reply().expect("import reply over TLS"),
        OpReply::Import {
            status: OpStatus::Ok,
            ..
        }
    ));
    assert_eq!(p.urb(set_configuration(1), &[]).0, 0);
    let (status, _) = p.urb(submit(2, 2, Direction::Out, 4096), &[0u8; 4096]);
    assert_eq!(status, 0);
    let (status, data) = p.urb(submit(3, 1, Direction::In, 4096), &[]);
    assert_eq!((status, data), (0, vec![0u8; 4096]));
}

#[test]
fn kernel_tls_auto_uses_the_kernel_or_else_user_space_and_says_so_once() {
    // This machine's kernel may or may not have TLS (`modprobe tls`);
    // either way every import is served, and the log says how.
    let kernel = usbwire_server::tls::probe_kernel_tls();
    let setup = Setup::new();
    let d = setup.daemon(&["--tls-kernel", "auto"]);
    // Each import's URBs ran, so each import was logged before the log
    // is read.
    for _ in 0..3 {
        let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.client)));
        import_and_run(&mut p);
        drop(p);
    }
    let log = d.log_text();
    let imports: Vec<&str> = log.lines().filter(|l| l.contains(" imported")).collect();
    assert_eq!(imports.len(), 3, "{log}");
    match kernel {
        Ok(()) => assert!(
            imports
                .iter()
                .all(|l| l.contains("via=kernel TLS, AES-128-GCM")),
            "{log}"
        ),
        Err(e) => {
            assert!(e.to_string().contains("modprobe tls"), "{e}");
            assert!(
                imports
                    .iter()
                    .all(|l| l.contains("via=user-space TLS, TLS13_AES_128_GCM_SHA256")),
                "{log}"
            );
            let told = log
                .matches("kernel TLS is not available: modprobe tls")
                .count();
            assert_eq!(told, 1, "said once per process, not per connection:\n{log}");
            assert!(
                log.contains("TLS imports use user-space TLS (rustls) instead"),
                "{log}"
            );
        }
    }
    d.stop();
}

#[test]
fn kernel_tls_on_refuses_to_start_without_it() {
    let setup = Setup::new();
    match usbwire_server::tls::probe_kernel_tls() {
        Ok(()) => {
            let d = setup.daemon(&["--tls-kernel", "on"]);
            let mut p = TlsPeer::connect(&d, setup.client_config(Some(&setup.client)));
            import_and_run(&mut p);
            drop(p);
            let log = d.log_text();
            assert!(log.contains("via=kernel TLS"), "{log}");
            d.stop();
        }
        Err(_) => {
            let config = setup.dir.path().join("usbipd.toml");
            std::fs::write(
                &config,
                "[[device]]\nkind = \"test\"\n[tls]\nkernel = \"on\"\n",
            )
            .unwrap();
            let out = Command::new(env!("CARGO_BIN_EXE_usbipd"))
                .args([
                    "--no-control",
                    "--config",
                    config.to_str().unwrap(),
                    "--tls-cert",
                    setup.server.cert_file.to_str().unwrap(),
                    "--tls-key",
                    setup.server.key_file.to_str().unwrap(),
                    "--tls-client-ca",
                    setup.pki.ca_file.to_str().unwrap(),
                ])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{stderr}");
            assert!(
                stderr.contains(
                    "kernel TLS is required (--tls-kernel on, tls.kernel = \"on\"): \
                     kernel TLS is not available: modprobe tls"
                ),
                "{stderr}"
            );
        }
    }
    // Without TLS the option means nothing, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_usbipd"))
        .args(["--demo", "--no-control", "--tls-kernel", "on"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--tls-kernel (tls.kernel) only means something with TLS on"),
        "{stderr}"
    );
}
