//! TLS 1.3 with mutual authentication, in user space (rustls), and the
//! policy that decides which connections may speak plaintext.
//!
//! One port serves both: a connection whose first byte is 0x16 (a TLS
//! handshake record) is a TLS client, anything else plaintext USB/IP.
//!
//! The server sends nothing after the handshake but application data: no
//! TLS 1.3 session tickets and no KeyUpdate of its own. A client may hand
//! its socket to its kernel (vhci-hcd over kernel TLS), whose receive path
//! fails on any other record type. Nor can the server's own rustls renew
//! its keys: near the AEAD's record limit it closes the connection instead.
//!
//! Once an import is accepted, the server's side may move to kernel TLS
//! too ([`KernelTls`]): the URB phase then reads and writes plaintext on
//! the socket, and the kernel encrypts below. Reads during the handshake
//! and the OP phase stop at record ends, so that what the client sent
//! after its import request is still whole in the socket for the kernel.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};
use tokio::net::TcpStream;
use tracing::{debug, error, info, warn};
use usbwire_tls::ktls::{self, Cipher};

/// Whether this kernel can run TLS connections (see [`KernelTls::On`]).
pub use usbwire_tls::ktls::{probe as probe_kernel_tls, KtlsError};
use usbwire_tls::{Received, RecordBoundary, Traffic, TrafficError, TryIo};

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
    /// Whether an import's URB phase moves to kernel TLS.
    pub kernel: KernelTls,
}

/// Set once kernel TLS was found missing: that is said once per process,
/// not once per connection.
static KERNEL_TLS_MISSING_TOLD: AtomicBool = AtomicBool::new(false);

/// Whether the URB phase of a TLS import runs on kernel TLS (the data path
/// stays `readv`/`writev` on the socket, URB payloads land straight in
/// their buffers) or on rustls in user space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelTls {
    /// Kernel TLS where the kernel offers it, user space where not.
    #[default]
    Auto,
    /// Kernel TLS or nothing: a kernel without it is an error at start.
    On,
    /// Always user space.
    Off,
}

impl std::str::FromStr for KernelTls {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(KernelTls::Auto),
            "on" => Ok(KernelTls::On),
            "off" => Ok(KernelTls::Off),
            _ => Err(format!("{s:?}: kernel TLS is \"auto\", \"on\" or \"off\"")),
        }
    }
}

impl fmt::Display for KernelTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KernelTls::Auto => "auto",
            KernelTls::On => "on",
            KernelTls::Off => "off",
        })
    }
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("allow_plaintext", &self.allow_plaintext)
            .field("kernel", &self.kernel)
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

pub use usbwire_tls::{Fingerprint, FingerprintError};

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
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: a fifth cheaper than AES-256-GCM per byte here
    // (ring with VAES), and as safe for TLS 1.3's purposes.
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    let provider = Arc::new(provider);
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
    // The URB phase may move to kernel TLS, which takes the keys.
    config.enable_secret_extraction = true;
    // AES-GCM first, whatever the client prefers: every kernel with TLS
    // has it (the gcm module), ChaCha20-Poly1305 needs one more.
    config.ignore_client_order = true;
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

/// A TCP connection with TLS in user space: a [`Transport`] whose reads
/// and writes are plaintext.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: u64,
    // A mutex, not a RefCell: the session future must stay `Send`. It is
    // never contended (one task) and never held across an await.
    tls: Mutex<Session>,
}

struct Session {
    tls: ServerConnection,
    /// Where the client's bytes stand relative to record ends: what user
    /// space has read must end at one for the kernel, or the URB phase's
    /// own record protection ([`Traffic`]), to take over.
    boundary: RecordBoundary,
}

/// As much as the socket may hold of a 64 KiB OUT transfer and more: what
/// one read of the URB phase in user space may bring.
const READ_AHEAD: usize = 256 * 1024;

impl TlsStream {
    fn session(&self) -> MutexGuard<'_, Session> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A server connection on `tcp`, before its handshake.
    pub fn new(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
        conn: u64,
    ) -> Result<TlsStream, HandshakeError> {
        Ok(TlsStream {
            tcp,
            conn,
            tls: Mutex::new(Session {
                tls: ServerConnection::new(config)?,
                boundary: RecordBoundary::default(),
            }),
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
        let mut s = self.session();
        let _ = Self::flush_records(&mut s.tls, &self.tcp);
    }

    /// The negotiated cipher suite, for the log.
    pub fn cipher_suite(&self) -> String {
        self.session()
            .tls
            .negotiated_cipher_suite()
            .map_or_else(|| "none".into(), |s| format!("{:?}", s.suite()))
    }

    async fn handshake(&self) -> Result<(), HandshakeError> {
        // Each turn makes progress or waits for the socket; the deadline
        // bounds the whole.
        loop {
            let blocked_on_write = {
                let mut s = self.session();
                let blocked = match Self::flush_records(&mut s.tls, &self.tcp) {
                    Ok(()) => false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
                    Err(e) => return Err(e.into()),
                };
                if !s.tls.is_handshaking() && !blocked {
                    return Ok(());
                }
                blocked
            };
            if blocked_on_write {
                self.tcp.writable().await?;
                continue;
            }
            self.tcp.readable().await?;
            let mut s = self.session();
            match Self::read_records(&mut s, &self.tcp) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
            // The alert that tells the client why goes out after the
            // refusal is logged (send_alert).
            s.tls.process_new_packets()?;
        }
    }

    /// The client's own certificate (DER), once the handshake verified it.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        let session = self.session();
        Some(
            session
                .tls
                .peer_certificates()?
                .first()?
                .clone()
                .into_owned(),
        )
    }

    /// Reads from the socket into rustls, never past the end of the
    /// record under way (what follows may be for kernel TLS).
    fn read_records(s: &mut Session, tcp: &TcpStream) -> io::Result<usize> {
        let Session { tls, boundary } = s;
        tls.read_tls(&mut boundary.reader(TryIo(tcp)))
    }

    /// Whether decrypted bytes wait to be read, or the peer has closed.
    fn input_pending(&self) -> bool {
        let mut s = self.session();
        match s.tls.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // The next read reports it.
            Err(_) => true,
        }
    }

    /// Sends buffered records; `WouldBlock` if some remain.
    fn flush_records(tls: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut TryIo(tcp))?;
        }
        Ok(())
    }

    /// Moves the connection to kernel TLS for the URB phase, if `kernel`
    /// wants it and the kernel can: see [`KernelTls`]; otherwise to record
    /// protection in user space with the same rules ([`Traffic`]).
    async fn into_urb_carrier(self, kernel: KernelTls) -> UrbCarrier<TlsStream> {
        match self.kernel_if_possible(kernel).await {
            UrbCarrier::Same(stream) => stream.into_user_space(),
            other => other,
        }
    }

    fn into_user_space(self) -> UrbCarrier<TlsStream> {
        let TlsStream { tcp, tls, conn } = self;
        let s = tls.into_inner().unwrap_or_else(|e| e.into_inner());
        match Traffic::take(s.tls, Some(&s.boundary), READ_AHEAD) {
            Ok(traffic) => UrbCarrier::User(UserTlsStream {
                tcp,
                conn,
                traffic: Mutex::new(traffic),
            }),
            Err(e) => {
                // The OP phase reads whole records and sends its reply
                // before the URB phase: this is a bug, not a client's doing.
                error!(
                    conn,
                    "closing the connection: cannot carry its URBs over TLS: {e}"
                );
                UrbCarrier::Closed
            }
        }
    }

    async fn kernel_if_possible(self, kernel: KernelTls) -> UrbCarrier<TlsStream> {
        if kernel == KernelTls::Off {
            return UrbCarrier::Same(self);
        }
        let conn = self.conn;
        let (ready, aes_gcm) = {
            let mut s = self.session();
            let Session { tls, boundary, .. } = &mut *s;
            let aes_gcm = tls.negotiated_cipher_suite().is_some_and(|c| {
                matches!(
                    c.suite(),
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                )
            });
            (ktls::check_ready(tls, boundary), aes_gcm)
        };
        if let Err(e) = ready {
            // A client that sent URBs before the import's reply: what user
            // space holds of them could not reach the kernel.
            debug!(conn, "this connection stays in user-space TLS: {e}");
            return UrbCarrier::Same(self);
        }
        if kernel == KernelTls::Auto {
            if !aes_gcm {
                // A client that offered no AES-GCM: the probe did not look
                // for its cipher in the kernel.
                debug!(
                    conn,
                    "this connection stays in user-space TLS: its cipher is not AES-GCM"
                );
                return UrbCarrier::Same(self);
            }
            if let Err(why) = kernel_tls_usable().await {
                say_kernel_tls_missing(conn, why);
                return UrbCarrier::Same(self);
            }
        }
        if let Err(e) = ktls::attach_ulp(&self.tcp) {
            if kernel == KernelTls::On {
                error!(
                    conn,
                    "closing the connection: kernel TLS is required ([tls] kernel = \"on\"): {e}"
                );
                return UrbCarrier::Closed;
            }
            say_kernel_tls_missing(conn, &e.to_string());
            return UrbCarrier::Same(self);
        }
        let TlsStream { tcp, tls, .. } = self;
        let s = tls.into_inner().unwrap_or_else(|e| e.into_inner());
        match ktls::handoff(&tcp, s.tls, &s.boundary) {
            Ok(cipher) => UrbCarrier::Kernel(KernelTlsStream { tcp, cipher, conn }),
            Err(e) => {
                // The keys are out of rustls: there is no way back.
                error!(
                    conn,
                    "closing the connection: cannot hand it to kernel TLS: {e}"
                );
                UrbCarrier::Closed
            }
        }
    }
}

/// Says once per process, not once per connection, that kernel TLS is
/// missing and why.
fn say_kernel_tls_missing(conn: u64, why: &str) {
    if !KERNEL_TLS_MISSING_TOLD.swap(true, Ordering::Relaxed) {
        info!(
            "{why}; TLS imports use user-space TLS (rustls) instead \
             (said once; [tls] kernel = \"off\" stops trying)"
        );
    } else {
        debug!(
            conn,
            "this connection stays in user-space TLS: no kernel TLS"
        );
    }
}

/// Whether this kernel runs TLS with AES-GCM, found once per process on
/// the blocking pool (the probe makes a loopback connection).
async fn kernel_tls_usable() -> Result<(), &'static str> {
    static PROBE: tokio::sync::OnceCell<Result<(), String>> = tokio::sync::OnceCell::const_new();
    PROBE
        .get_or_init(|| async {
            tokio::task::spawn_blocking(|| ktls::probe().map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("the kernel TLS probe failed: {e}")))
        })
        .await
        .as_ref()
        .map(|_| ())
        .map_err(String::as_str)
}

/// What carries an import's URB phase.
pub(crate) enum UrbCarrier<T> {
    /// The transport of the OP phase.
    Same(T),
    Kernel(KernelTlsStream),
    User(UserTlsStream),
    /// The connection could not go on: said in the log.
    Closed,
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
        let mut s = self.session();
        // Bounded: each turn either returns or reads new bytes, and
        // read_tls returns WouldBlock once the socket is drained.
        loop {
            match s.tls.reader().read_vectored(bufs) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: USB/IP frames itself, so a
                // cut is an ordinary end of the connection.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if Self::read_records(&mut s, &self.tcp)? == 0 {
                return Ok(0);
            }
            if let Err(e) = s.tls.process_new_packets() {
                let _ = s.tls.write_tls(&mut TryIo(&self.tcp));
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut s = self.session();
        // Records still waiting for the socket come first: the session's
        // backpressure is the socket's.
        Self::flush_records(&mut s.tls, &self.tcp)?;
        let n = s.tls.writer().write_vectored(bufs)?;
        match Self::flush_records(&mut s.tls, &self.tcp) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn wants_flush(&self) -> bool {
        self.session().tls.wants_write()
    }

    fn flush(&self) -> io::Result<()> {
        Self::flush_records(&mut self.session().tls, &self.tcp)
    }

    fn close(&self) {
        self.session().tls.send_close_notify();
    }

    fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    async fn urb_carrier(self, kernel: KernelTls) -> UrbCarrier<Self> {
        self.into_urb_carrier(kernel).await
    }

    fn carrier(&self) -> String {
        format!("user-space TLS, {}", self.cipher_suite())
    }

    async fn kernel_carrier_possible(&self, kernel: KernelTls) -> Result<(), String> {
        if kernel == KernelTls::Off {
            return Err("kernel TLS is switched off ([tls] kernel = \"off\")".into());
        }
        {
            let mut s = self.session();
            let Session { tls, boundary, .. } = &mut *s;
            let suite = tls.negotiated_cipher_suite().map(|c| c.suite());
            if !matches!(
                suite,
                Some(
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
                )
            ) {
                return Err(format!(
                    "the client negotiated {suite:?}, and kernel TLS runs AES-GCM only"
                ));
            }
            ktls::check_ready(tls, boundary).map_err(|e| e.to_string())?;
        }
        kernel_tls_usable().await.map_err(str::to_string)
    }
}

/// A connection whose records user space protects after the handshake,
/// with rustls' keys and record protection and kernel TLS's rules: the
/// URB phase where the kernel has no TLS (see [`Traffic`]).
pub(crate) struct UserTlsStream {
    tcp: TcpStream,
    conn: u64,
    // As in TlsStream: uncontended, never held across an await.
    traffic: Mutex<Traffic>,
}

impl UserTlsStream {
    fn traffic(&self) -> MutexGuard<'_, Traffic> {
        self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for UserTlsStream {
    async fn readable(&self) -> io::Result<()> {
        if self.traffic().has_input() {
            return Ok(());
        }
        self.tcp.readable().await
    }

    async fn writable(&self) -> io::Result<()> {
        self.tcp.writable().await
    }

    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut traffic = self.traffic();
        // Bounded: each turn returns or reads new bytes, and the socket
        // says WouldBlock once drained.
        loop {
            match traffic.read_plaintext(bufs) {
                Ok(Received::Data(n)) => return Ok(n),
                Ok(Received::Closed) => return Ok(0),
                Ok(Received::NeedInput) => {}
                Err(e) => {
                    debug!(conn = self.conn, "ending the connection: {e}");
                    return Err(e.into());
                }
            }
            // Closed without close_notify: USB/IP frames itself, so a cut
            // is an ordinary end of the connection.
            match self.tcp.try_read(traffic.read_space())? {
                0 => return Ok(0),
                n => traffic.received(n),
            }
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut traffic = self.traffic();
        // Records still waiting for the socket come first: the session's
        // backpressure is the socket's.
        traffic.write_to(TryIo(&self.tcp))?;
        let n = match traffic.seal(bufs) {
            Ok(n) => n,
            Err(e) => {
                if matches!(e, TrafficError::RecordLimit { .. }) {
                    warn!(conn = self.conn, "{e}");
                }
                return Err(e.into());
            }
        };
        match traffic.write_to(TryIo(&self.tcp)) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(n),
        }
    }

    fn wants_flush(&self) -> bool {
        self.traffic().wants_write()
    }

    fn flush(&self) -> io::Result<()> {
        self.traffic().write_to(TryIo(&self.tcp))
    }

    fn close(&self) {
        if let Err(e) = self.traffic().close_notify() {
            debug!(conn = self.conn, "no close_notify: {e}");
        }
    }

    fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    fn carrier(&self) -> String {
        format!("user-space TLS, {:?}", self.traffic().suite().suite())
    }
}

/// A connection whose TLS the kernel runs: reads and writes on the socket
/// are plaintext, as on a plaintext connection.
pub(crate) struct KernelTlsStream {
    tcp: TcpStream,
    cipher: Cipher,
    conn: u64,
}

impl Transport for KernelTlsStream {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> {
        self.tcp.readable()
    }

    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> {
        self.tcp.writable()
    }

    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match self.tcp.try_read_vectored(bufs) {
            // A record other than application data, which a read without
            // room for its type cannot take: the client's close_notify,
            // or a KeyUpdate the kernel cannot follow. Either way the
            // connection is over.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                debug!(
                    conn = self.conn,
                    "the client sent a TLS record other than application data \
                     (close_notify, or a KeyUpdate): end of the connection"
                );
                Ok(0)
            }
            r => r,
        }
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.tcp.try_write_vectored(bufs)
    }

    fn socket(&self) -> &TcpStream {
        &self.tcp
    }

    fn carrier(&self) -> String {
        format!("kernel TLS, {}", self.cipher)
    }

    fn kernel_may_hold(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Registry, ServerConfig, ServerState};
    use std::io::Write;
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

    /// Counts the TLS records that pass through a reader.
    struct RecordTap<R> {
        inner: R,
        header: Vec<u8>,
        body_left: usize,
        records: usize,
    }

    impl<R: Write> Write for RecordTap<R> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    impl<R: Read> Read for RecordTap<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            for &b in &buf[..n] {
                if self.body_left > 0 {
                    self.body_left -= 1;
                    continue;
                }
                self.header.push(b);
                if self.header.len() == 5 {
                    self.body_left =
                        usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                    self.header.clear();
                    self.records += 1;
                }
            }
            Ok(n)
        }
    }

    /// A server configuration whose one cipher suite, AES-128-GCM, has
    /// its confidentiality limit lowered to `limit` records: rustls renews
    /// the keys (KeyUpdate) after that many.
    fn low_limit_config(limit: u64) -> (Arc<rustls::ServerConfig>, rcgen::Certificate) {
        let base = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .unwrap();
        let low: &'static rustls::Tls13CipherSuite =
            Box::leak(Box::new(rustls::Tls13CipherSuite {
                common: rustls::crypto::CipherSuiteCommon {
                    suite: base.common.suite,
                    hash_provider: base.common.hash_provider,
                    confidentiality_limit: limit,
                },
                hkdf_provider: base.hkdf_provider,
                aead_alg: base.aead_alg,
                quic: base.quic,
            }));
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![rustls::SupportedCipherSuite::Tls13(low)];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
                ),
            )
            .unwrap();
        config.send_tls13_tickets = 0;
        config.enable_secret_extraction = true;
        (Arc::new(config), cert)
    }

    /// A blocking rustls client on `addr`: handshakes, sends a KeyUpdate
    /// request first if `request_key_update`, then reads to the end.
    /// Returns the plaintext and how many records came after the handshake.
    fn client(
        addr: std::net::SocketAddr,
        cert: &rcgen::Certificate,
        request_key_update: bool,
    ) -> std::thread::JoinHandle<(Vec<u8>, usize)> {
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        std::thread::spawn(move || {
            let tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut tls =
                rustls::ClientConnection::new(Arc::new(config), "usbwire.test".try_into().unwrap())
                    .unwrap();
            let mut tap = RecordTap {
                inner: tcp,
                header: Vec::new(),
                body_left: 0,
                records: 0,
            };
            // The server writes nothing until the handshake is done.
            while tls.is_handshaking() {
                tls.complete_io(&mut tap).unwrap();
            }
            tap.records = 0;
            if request_key_update {
                tls.refresh_traffic_keys().unwrap();
            }
            tls.writer().write_all(b"go").unwrap();
            while tls.wants_write() {
                tls.write_tls(&mut tap.inner).unwrap();
            }
            let mut got = Vec::new();
            // Bounded by the server's close.
            loop {
                match tls.reader().read_to_end(&mut got) {
                    // A close without close_notify, too: the server's
                    // answer to a KeyUpdate.
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
                if tls.read_tls(&mut tap).unwrap() == 0 {
                    break;
                }
                tls.process_new_packets().unwrap();
                while tls.wants_write() {
                    tls.write_tls(&mut tap.inner).unwrap();
                }
            }
            (got, tap.records)
        })
    }

    /// Serves one client as an import's URB phase in user space: reads
    /// its "go", then writes `writes` messages of 16 bytes; returns how
    /// many went out before the record guard closed the connection, and
    /// the error that ended it.
    async fn serve_writes(
        config: Arc<rustls::ServerConfig>,
        listener: tokio::net::TcpListener,
        writes: usize,
    ) -> (usize, Option<io::Error>) {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = TlsStream::new(tcp, config, 1).unwrap();
        stream.accept(HANDSHAKE_TIMEOUT).await.unwrap();
        let UrbCarrier::User(stream) = stream.urb_carrier(KernelTls::Off).await else {
            panic!("the URB phase is not in user space");
        };
        assert!(stream.carrier().starts_with("user-space TLS"));
        let mut go = [0u8; 2];
        let mut got = 0;
        while got < 2 {
            stream.readable().await.unwrap();
            match stream.try_read_vectored(&mut [IoSliceMut::new(&mut go[got..])]) {
                Ok(0) => panic!("closed"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return (0, Some(e)),
            }
        }
        assert_eq!(&go, b"go");
        let mut sent = 0;
        let mut error = None;
        for _ in 0..writes {
            match stream.try_write_vectored(&[IoSlice::new(&[0x5a; 16])]) {
                Ok(16) => sent += 1,
                Ok(n) => panic!("a 16-byte write took {n}"),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        stream.close();
        while stream.wants_flush() {
            stream.writable().await.unwrap();
            let _ = stream.flush();
        }
        (sent, error)
    }

    #[tokio::test]
    async fn user_space_tls_closes_before_rustls_would_send_a_key_update() {
        const LIMIT: u64 = 8;
        let (config, cert) = low_limit_config(LIMIT);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = client(listener.local_addr().unwrap(), &cert, false);
        let (sent, error) = serve_writes(config, listener, 20).await;
        let (got, records) = tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap();
        // One record is kept for the close_notify alert.
        assert_eq!(sent as u64, LIMIT - 1);
        let error = error.expect("the guard refused a write");
        assert!(
            error
                .to_string()
                .contains("closed the TLS connection after 7 records")
                && error.to_string().contains("KeyUpdate"),
            "{error}"
        );
        assert_eq!(got, vec![0x5a; 16 * sent]);
        // Only the data and the close_notify: no KeyUpdate among them.
        assert_eq!(records, sent + 1);
    }

    #[test]
    fn rustls_alone_sends_a_key_update_at_the_limit() {
        // What the guard prevents, seen with the same record count.
        const LIMIT: u64 = 8;
        let (config, cert) = low_limit_config(LIMIT);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = client(listener.local_addr().unwrap(), &cert, false);
        let (tcp, _) = listener.accept().unwrap();
        let mut server = rustls::StreamOwned::new(ServerConnection::new(config).unwrap(), tcp);
        let mut go = [0u8; 2];
        server.read_exact(&mut go).unwrap();
        for _ in 0..LIMIT {
            server.write_all(&[0x5a; 16]).unwrap();
        }
        server.conn.send_close_notify();
        server.conn.complete_io(&mut server.sock).unwrap();
        drop(server);
        let (got, records) = client.join().unwrap();
        assert_eq!(got.len(), 16 * LIMIT as usize);
        assert_eq!(
            records,
            LIMIT as usize + 2,
            "the data, a KeyUpdate, close_notify"
        );
    }

    #[tokio::test]
    async fn a_client_key_update_ends_the_connection_as_kernel_tls_would() {
        // User space follows kernel TLS's rules, so that a client sees the
        // same server whichever carries its import: no keys are renewed.
        let (config, cert) = low_limit_config(1 << 24);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = client(listener.local_addr().unwrap(), &cert, true);
        let (sent, error) = serve_writes(config, listener, 3).await;
        let (got, records) = tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap();
        let error = error.expect("the KeyUpdate ended the connection");
        assert!(error.to_string().contains("KeyUpdate"), "{error}");
        assert_eq!((sent, got.len(), records), (0, 0, 0));
    }
}
