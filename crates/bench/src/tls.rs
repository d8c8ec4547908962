//! TLS for the bench: certificates made with rcgen at bench time (a CA,
//! the server's and one client's), a blocking rustls client stream for the
//! load client, and the flood of failed handshakes.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use usbwire_proto::{OpRequest, USBIP_VERSION};
use usbwire_tls::{Received, Traffic};

use crate::load::{self, Stream};

/// The bench's PKI: what usbipd needs (as `[tls]` lines of its config) and
/// the client configurations of an accepted client and of one without a
/// certificate, whose handshakes the server refuses.
pub struct Pki {
    pub server_toml: String,
    pub client: Arc<ClientConfig>,
    pub anonymous: Arc<ClientConfig>,
}

fn gen(e: rcgen::Error) -> String {
    format!("making the bench certificates: {e}")
}

impl Pki {
    /// Writes the CA, the server's certificate and key into `dir`.
    pub fn new(dir: &Path) -> Result<Pki, String> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "usbwire-bench CA");
        let ca_key = KeyPair::generate().map_err(gen)?;
        let ca = ca_params.self_signed(&ca_key).map_err(gen)?;
        let issue = |name: &str, usage| -> Result<(rcgen::Certificate, KeyPair), String> {
            let mut p = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                .map_err(gen)?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().map_err(gen)?;
            let cert = p.signed_by(&key, &ca, &ca_key).map_err(gen)?;
            Ok((cert, key))
        };
        let (server, server_key) =
            issue("usbwire-bench server", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client, client_key) =
            issue("usbwire-bench client", ExtendedKeyUsagePurpose::ClientAuth)?;
        let write = |name: &str, pem: String| -> Result<String, String> {
            let path = dir.join(name);
            std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path.display().to_string())
        };
        let server_toml = format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\
             allow_plaintext = [\"127.0.0.0/8\"]\n",
            write("server.pem", server.pem())?,
            write("server.key", server_key.serialize_pem())?,
            write("ca.pem", ca.pem())?,
        );
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.der().clone())
            .map_err(|e| format!("the bench CA: {e}"))?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = || {
            ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| e.to_string())
                .map(|b| b.with_root_certificates(roots.clone()))
        };
        let mut client = builder()?
            .with_client_auth_cert(
                vec![CertificateDer::from(client.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key.serialize_der())),
            )
            .map_err(|e| format!("the bench client identity: {e}"))?;
        // After the handshake the load client protects its records itself
        // (usbwire_tls::Traffic), as usbipd does.
        client.enable_secret_extraction = true;
        let mut anonymous = builder()?.with_no_client_auth();
        anonymous.enable_secret_extraction = true;
        Ok(Pki {
            server_toml,
            client: Arc::new(client),
            anonymous: Arc::new(anonymous),
        })
    }
}

/// Bytes one read of the socket may bring.
const READ_AHEAD: usize = 256 << 10;

/// A blocking TLS client connection: rustls for the handshake, then
/// records sealed and opened as usbipd's URB phase does it in user space
/// ([`Traffic`]: a record is opened where the socket read it and copied
/// once, into the caller's buffer).
pub struct TlsStream {
    traffic: Traffic,
    tcp: TcpStream,
}

impl TlsStream {
    /// Connects and completes the handshake; also returns how long the
    /// handshake took (from the TCP connection being up).
    pub fn connect(
        addr: SocketAddr,
        config: &Arc<ClientConfig>,
    ) -> io::Result<(TlsStream, Duration)> {
        let mut tcp = load::connect(addr)?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
        let start = Instant::now();
        // Bounded by the socket's timeouts: each turn moves bytes or fails.
        while tls.is_handshaking() || tls.wants_write() {
            tls.complete_io(&mut tcp)?;
        }
        let took = start.elapsed();
        let traffic = Traffic::take(tls, None, READ_AHEAD)?;
        Ok((TlsStream { traffic, tcp }, took))
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }
    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        // Bounded: each turn returns, or reads new bytes from the socket
        // (which has a read timeout).
        loop {
            match self.traffic.read_plaintext(bufs)? {
                Received::Data(n) => return Ok(n),
                Received::Closed => return Ok(0),
                Received::NeedInput => {}
            }
            match self.tcp.read(self.traffic.read_space())? {
                0 => return Ok(0),
                n => self.traffic.received(n),
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Blocking socket: write_to returns once every record is sent.
        self.traffic.write_to(&mut self.tcp)?;
        let n = self.traffic.seal(bufs)?;
        self.traffic.write_to(&mut self.tcp)?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.traffic.write_to(&mut self.tcp)
    }
}

/// A TLS connection with the bench client's certificate, ready for
/// [`crate::load::Conn::import_on`].
pub fn connect(addr: SocketAddr, pki: &Pki) -> io::Result<(Stream, Duration)> {
    let (s, took) = TlsStream::connect(addr, &pki.client)?;
    Ok((Stream::Tls(Box::new(s)), took))
}

/// What a flood of refused handshakes did.
#[derive(Debug, Clone, Default)]
pub struct Flood {
    /// Handshakes the server refused, as it should.
    pub refused: u64,
    /// Connections the server let through (a bug) or that failed otherwise.
    pub unexpected: u64,
    pub first_unexpected: Option<String>,
    pub elapsed: Duration,
}

/// `n` TLS handshakes without a client certificate from this host, one
/// after the other, each until the server's refusal has arrived (its
/// alert or its close), so that the server did all of its work for each.
pub fn flood(addr: SocketAddr, anonymous: &Arc<ClientConfig>, n: u64) -> Flood {
    let mut f = Flood::default();
    let start = Instant::now();
    for _ in 0..n {
        match refused_handshake(addr, anonymous) {
            Ok(()) => f.refused += 1,
            Err(e) => {
                f.unexpected += 1;
                f.first_unexpected.get_or_insert(e);
            }
        }
    }
    f.elapsed = start.elapsed();
    f
}

fn refused_handshake(addr: SocketAddr, anonymous: &Arc<ClientConfig>) -> Result<(), String> {
    // TLS 1.3: the client's side of the handshake ends before the server
    // has checked the client's (empty) certificate; the refusal comes as
    // an alert to the first request.
    let (mut s, _) = match TlsStream::connect(addr, anonymous) {
        Ok(x) => x,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(format!("nothing listens at {addr}: {e}"));
        }
        // Refused during the handshake (or closed unread: throttled).
        Err(_) => return Ok(()),
    };
    match load::op_roundtrip(
        &mut s,
        &OpRequest::Devlist {
            version: USBIP_VERSION,
        },
    ) {
        Ok(reply) => Err(format!(
            "the server answered a client without a certificate: {reply:?}"
        )),
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            Err(format!("no refusal within the socket timeout: {e}"))
        }
        Err(_) => Ok(()),
    }
}

/// Why the kernel TLS rows are not measured here, from this machine's
/// kernel: `None` if it offers the `tls` upper-layer protocol.
pub fn ktls_unavailable() -> Option<String> {
    let path = "/proc/sys/net/ipv4/tcp_available_ulp";
    match std::fs::read_to_string(path) {
        Ok(s) if s.split_whitespace().any(|u| u == "tls") => None,
        Ok(s) => Some(format!(
            "this kernel has no tls ULP ({path}: {:?}; modprobe tls, where the module exists)",
            s.trim()
        )),
        Err(e) => Some(format!("cannot read {path}: {e}")),
    }
}
