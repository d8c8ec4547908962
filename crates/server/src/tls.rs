//! TLS 1.3 with mutual authentication, in user space (rustls), and the
//! policy that decides which connections may speak plaintext.
//!
//! One port serves both: a connection whose first byte is 0x16 (a TLS
//! handshake record) is a TLS client, anything else plaintext USB/IP.
//!
//! The server sends nothing after the handshake but application data: no
//! TLS 1.3 session tickets and no KeyUpdate of its own. A client may hand
//! its socket to its kernel (vhci-hcd over kernel TLS), whose receive path
//! fails on any other record type.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use tokio::net::TcpStream;

use crate::session::driver::Transport;

/// The first byte of a TLS record carrying a handshake message.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// How long a client may take to complete the TLS handshake, unless the
/// server is configured otherwise (`ServerConfig::tls_handshake_timeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may connect how: the TLS configuration, if any, and the sources
/// that may still use plaintext once TLS is on.
#[derive(Clone, Default)]
pub struct Access {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Sources allowed to use plaintext USB/IP although TLS is configured.
    pub allow_plaintext: Vec<IpNet>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

impl Access {
    /// Whether a plaintext connection from `ip` may be served.
    pub fn plaintext_allowed(&self, ip: IpAddr) -> bool {
        if self.tls.is_none() {
            return true;
        }
        // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        self.allow_plaintext.iter().any(|net| net.contains(&ip))
    }
}

/// The files a TLS server identity comes from, and which clients it
/// accepts: those with a certificate signed by `client_ca`, and those
/// whose certificate has one of `client_fingerprints`. At least one of the
/// two must be given.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_fingerprints: Vec<Fingerprint>,
}

/// The SHA-256 of a certificate's DER encoding, as pinned by a person.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &[u8]) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert);
        let mut f = [0u8; 32];
        f.copy_from_slice(d.as_ref());
        Fingerprint(f)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{0:?} is not a SHA-256 fingerprint: give 64 hex digits, with or without colons \
     (openssl x509 -noout -fingerprint -sha256 -in CERT prints one)"
)]
pub struct FingerprintError(String);

impl std::str::FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
        let bad = || FingerprintError(s.to_string());
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut f = [0u8; 32];
        for (out, pair) in f.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(f))
    }
}

/// Accepts a client whose certificate is pinned by fingerprint, or else
/// one the CA verifier (if any) accepts. The handshake signature is
/// checked either way: it proves the client holds the certificate's key.
#[derive(Debug)]
struct PinnedOrCa {
    pins: Vec<Fingerprint>,
    ca: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for PinnedOrCa {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.ca.as_ref().map_or(&[], |ca| ca.root_hint_subjects())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if self.pins.contains(&Fingerprint::of(end_entity)) {
            return Ok(rustls::server::danger::ClientCertVerified::assertion());
        }
        match &self.ca {
            Some(ca) => ca.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("a client CA certificate in {path} is unusable: {source}")]
    BadCa {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the server certificate or key is unusable: {0}")]
    Identity(rustls::Error),
    #[error(
        "no way to accept a client: give a client CA (--tls-client-ca) \
         or pinned client fingerprints (--tls-client-fingerprint), or both"
    )]
    NoClientPolicy,
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = |source| TlsConfigError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsConfigError::Empty {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The fingerprint of the first (the server's own) certificate in a PEM
/// chain, for clients that pin it.
pub fn cert_fingerprint(path: &Path) -> Result<Fingerprint, TlsConfigError> {
    Ok(Fingerprint::of(&certs("certificate", path)?[0]))
}

/// A TLS 1.3-only server configuration that requires a client
/// certificate (signed by the client CA, or pinned), and sends no session
/// tickets.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let chain = certs("certificate", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsConfigError::Pem {
        what: "private key",
        path: files.key.clone(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = match &files.client_ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in certs("CA certificate", path)? {
                roots.add(ca).map_err(|source| TlsConfigError::BadCa {
                    path: path.clone(),
                    source,
                })?;
            }
            Some(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()?,
            )
        }
        None => None,
    };
    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> =
        match (ca, files.client_fingerprints.is_empty()) {
            (None, true) => return Err(TlsConfigError::NoClientPolicy),
            (Some(ca), true) => ca,
            (ca, false) => Arc::new(PinnedOrCa {
                pins: files.client_fingerprints.clone(),
                ca,
                algorithms: provider.signature_verification_algorithms,
            }),
        };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsConfigError::Identity)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsConfigError::Identity)?;
    // A ticket after the handshake would break a client that handed its
    // socket to kernel TLS.
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Words a person can act on for a failed handshake.
pub fn explain_handshake_error(e: &rustls::Error) -> String {
    use rustls::{CertificateError, Error};
    match e {
        Error::NoCertificatesPresented => {
            "the client presented no certificate; this server requires one \
             (give the client a certificate signed by the CA in --tls-client-ca)"
                .into()
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the client's certificate is not signed by the CA in --tls-client-ca".into()
        }
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the client's certificate matches no --tls-client-fingerprint \
             (and no client CA is configured)"
                .into()
        }
        Error::InvalidCertificate(c) => format!("the client's certificate is not acceptable: {c}"),
        Error::PeerIncompatible(p) => {
            format!("the client cannot speak what this server requires (TLS 1.3): {p:?}")
        }
        Error::AlertReceived(a) => format!("the client aborted the handshake with alert {a:?}"),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{}", explain_handshake_error(.0))]
    Tls(#[from] rustls::Error),
    #[error("network I/O failed during the TLS handshake: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection during the TLS handshake")]
    Closed,
    #[error("the client did not complete the TLS handshake within {0:?}")]
    Timeout(Duration),
}

/// Non-blocking reads and writes on a tokio socket, as `std::io` for
/// rustls' `read_tls`/`write_tls`.
struct Socket<'a>(&'a TcpStream);

impl Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TCP connection with TLS in user space: a [`Transport`] whose reads
/// and writes are plaintext.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    // A mutex, not a RefCell: the session future must stay `Send`. It is
    // never contended (one task) and never held across an await.
    tls: Mutex<ServerConnection>,
}

impl TlsStream {
    fn tls(&self) -> MutexGuard<'_, ServerConnection> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A server connection on `tcp`, before its handshake.
    pub fn new(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<TlsStream, HandshakeError> {
        Ok(TlsStream {
            tcp,
            tls: Mutex::new(ServerConnection::new(config)?),
        })
    }

    /// Runs the server side of the handshake, within `deadline`.
    /// On failure, [`TlsStream::send_alert`] tells the client why.
    pub async fn accept(&self, deadline: Duration) -> Result<(), HandshakeError> {
        match tokio::time::timeout(deadline, self.handshake()).await {
            Ok(r) => r,
            Err(_) => Err(HandshakeError::Timeout(deadline)),
        }
    }

    /// Sends what rustls queued (the alert of a failed handshake), best
    /// effort: the connection is being dropped.
    pub fn send_alert(&self) {
        let mut tls = self.tls();
        let _ = Self::flush_records(&mut tls, &self.tcp);
    }

    async fn handshake(&self) -> Result<(), HandshakeError> {
        // Each turn makes progress or waits for the socket; the deadline
        // bounds the whole.
        loop {
            let blocked_on_write = {
                let mut tls = self.tls();
                let mut blocked = false;
                while tls.wants_write() {
                    match tls.write_tls(&mut Socket(&self.tcp)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            blocked = true;
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if !tls.is_handshaking() && !blocked {
                    return Ok(());
                }
                blocked
            };
            if blocked_on_write {
                self.tcp.writable().await?;
                continue;
            }
            self.tcp.readable().await?;
            let mut tls = self.tls();
            match tls.read_tls(&mut Socket(&self.tcp)) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
            // The alert that tells the client why goes out after the
            // refusal is logged (send_alert).
            tls.process_new_packets()?;
        }
    }

    /// Whether decrypted bytes wait to be read, or the peer has closed.
    fn input_pending(&self) -> bool {
        match self.tls().process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // The next read reports it.
            Err(_) => true,
        }
    }

    /// Sends buffered records; `WouldBlock` if some remain.
    fn flush_records(tls: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut Socket(tcp))?;
        }
        Ok(())
    }
}

impl Transport for TlsStream {
    async fn readable(&self) -> io::Result<()> {
        if self.input_pending() {
            return Ok(());
        }
        self.tcp.readable().await
    }

    async fn writable(&self) -> io::Result<()> {
        self.tcp.writable().await
    }

    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut tls = self.tls();
        // Bounded: each turn either returns or reads new bytes, and
        // read_tls returns WouldBlock once the socket is drained.
        loop {
            match tls.reader().read_vectored(bufs) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: USB/IP frames itself, so a
                // cut is an ordinary end of the connection.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut Socket(&self.tcp))? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                let _ = tls.write_tls(&mut Socket(&self.tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tls = self.tls();
        // Records still waiting for the socket come first: the session's
        // backpressure is the socket's.
        Self::flush_records(&mut tls, &self.tcp)?;
        let n = tls.writer().write_vectored(bufs)?;
        match Self::flush_records(&mut tls, &self.tcp) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn wants_flush(&self) -> bool {
        self.tls().wants_write()
    }

    fn flush(&self) -> io::Result<()> {
        Self::flush_records(&mut self.tls(), &self.tcp)
    }

    fn close(&self) {
        self.tls().send_close_notify();
    }

    fn socket(&self) -> &TcpStream {
        &self.tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Registry, ServerConfig, ServerState};
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::watch;

    /// A TLS configuration that no handshake in these tests gets far
    /// enough to use.
    fn unused_tls() -> Arc<rustls::ServerConfig> {
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
        )
    }

    /// Serves one connection whose client sends `first` and then nothing;
    /// returns how long (in virtual time) the server kept it open.
    async fn stalled_client(first: &[u8]) -> Duration {
        stalled_client_with(first, ServerConfig::default()).await.0
    }

    /// Also returns the refusals the server counted.
    async fn stalled_client_with(
        first: &[u8],
        mut config: ServerConfig,
    ) -> (Duration, crate::abuse::RefusalSnapshot) {
        config.access.tls = Some(unused_tls());
        let state = Arc::new(ServerState::new(Registry::new(), config));
        let open = stalled_client_on(first, &state).await;
        (open, state.refusals.snapshot())
    }

    async fn stalled_client_on(first: &[u8], state: &Arc<ServerState>) -> Duration {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(first).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let start = tokio::time::Instant::now();
        let served = tokio::spawn(crate::session::driver::serve(
            server,
            state.clone(),
            1,
            stop_rx,
        ));
        let mut rest = Vec::new();
        // The server's close ends this read.
        let _ = client.read_to_end(&mut rest).await;
        let _ = served.await.unwrap();
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_handshake_is_cut_at_its_deadline() {
        // A record header that announces more than ever comes.
        let open = stalled_client(&[TLS_HANDSHAKE_RECORD, 3, 1, 0, 200, 1]).await;
        assert!(open >= HANDSHAKE_TIMEOUT, "{open:?}");
        assert!(open < crate::session::OP_TIMEOUT, "{open:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_handshake_deadline_is_configurable() {
        let config = ServerConfig {
            tls_handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let (open, refusals) =
            stalled_client_with(&[TLS_HANDSHAKE_RECORD, 3, 1, 0, 200, 1], config).await;
        assert!(open >= Duration::from_secs(2), "{open:?}");
        assert!(open < HANDSHAKE_TIMEOUT, "{open:?}");
        // Counted against its source.
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(refusals.sources.len(), 1);
        assert_eq!(refusals.sources[0].0, loopback);
        assert_eq!(refusals.sources[0].1.failed_handshakes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_cut_at_the_op_deadline() {
        let open = stalled_client(&[]).await;
        assert!(open >= crate::session::OP_TIMEOUT, "{open:?}");
    }

    #[test]
    fn plaintext_policy() {
        let mut a = Access::default();
        assert!(a.plaintext_allowed("192.0.2.1".parse().unwrap()));
        a.tls = Some(unused_tls());
        assert!(!a.plaintext_allowed("127.0.0.1".parse().unwrap()));
        a.allow_plaintext.push("127.0.0.0/8".parse().unwrap());
        assert!(a.plaintext_allowed("127.0.0.1".parse().unwrap()));
        assert!(a.plaintext_allowed("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!a.plaintext_allowed("192.0.2.1".parse().unwrap()));
        assert!(!a.plaintext_allowed("::1".parse().unwrap()));
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let plain = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let f: Fingerprint = plain.parse().unwrap();
        assert_eq!(f.0[1], 0x11);
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        assert!("0011".parse::<Fingerprint>().is_err());
        assert!(plain.replace('0', "g").parse::<Fingerprint>().is_err());
    }
}
