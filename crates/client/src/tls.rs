//! TLS 1.3 with a client certificate: how the client proves who it is and
//! checks the server, and what each refusal means in words a person can act on.
//!
//! The server is trusted either through a CA file (chain and name checked,
//! as any TLS client does) or through a pinned SHA-256 fingerprint of its
//! certificate, for two machines without a CA (`usbip cert new` prints it).
//! Nothing here falls back to plaintext: a server that does not complete a
//! TLS 1.3 handshake is an error.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, OtherError,
    RootCertStore, SignatureScheme,
};

/// Why a TLS connection was not set up. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{0:?} is not a SHA-256 fingerprint: give 64 hex digits (colons allowed), as `usbip cert new` prints them")]
    BadFingerprint(String),
    #[error("the client certificate and key cannot be used: {0}")]
    Identity(rustls::Error),
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("server requires a client certificate: give one (usbip: --tls-cert and --tls-key)")]
    ClientCertRequired,
    #[error("server rejected this client's certificate ({0:?}): it does not trust it; give the server this certificate's fingerprint or have it signed by a CA the server trusts")]
    ClientCertRejected(AlertDescription),
    #[error("server certificate does not match the pinned fingerprint: pinned {pinned}, server sent {actual}")]
    FingerprintMismatch {
        pinned: Fingerprint,
        actual: Fingerprint,
    },
    #[error("server certificate is not signed by the given CA ({0:?})")]
    UnknownIssuer(CertificateError),
    #[error("server certificate is not valid for the name connected to ({0:?}); connect by a name the certificate holds")]
    NameMismatch(CertificateError),
    #[error("server certificate is not trusted: {0:?}")]
    ServerCertInvalid(CertificateError),
    #[error("server closed the connection during the TLS handshake: it may not speak TLS (a plaintext USB/IP server?) or it refused this client; see its log")]
    ClosedDuringHandshake,
    #[error("server did not complete the TLS handshake within {0:?}: is this the USB/IP port, and does the server speak TLS?")]
    HandshakeTimeout(std::time::Duration),
    #[error("server did not answer in TLS ({0}): it may be a plaintext USB/IP server")]
    NotTls(rustls::Error),
    #[error("server and client share no TLS 1.3 parameters ({0:?})")]
    Incompatible(rustls::PeerIncompatible),
    #[error("server sent TLS alert {0:?}")]
    Alert(AlertDescription),
    #[error("TLS failed: {0}")]
    Other(rustls::Error),
    #[error("server name {0:?} is not a DNS name or an IP address")]
    BadServerName(String),
}

impl TlsError {
    /// The typed reason for an error rustls reports during or after the handshake.
    pub(crate) fn from_rustls(e: rustls::Error) -> TlsError {
        use rustls::Error as E;
        match e {
            E::AlertReceived(AlertDescription::CertificateRequired) => TlsError::ClientCertRequired,
            E::AlertReceived(
                a @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::AccessDenied),
            ) => TlsError::ClientCertRejected(a),
            E::AlertReceived(a) => TlsError::Alert(a),
            E::InvalidCertificate(CertificateError::Other(other)) => {
                match other.0.downcast_ref::<PinMismatch>() {
                    Some(m) => TlsError::FingerprintMismatch {
                        pinned: m.pinned,
                        actual: m.actual,
                    },
                    None => TlsError::ServerCertInvalid(CertificateError::Other(other)),
                }
            }
            E::InvalidCertificate(c @ CertificateError::UnknownIssuer) => {
                TlsError::UnknownIssuer(c)
            }
            E::InvalidCertificate(
                c @ (CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. }),
            ) => TlsError::NameMismatch(c),
            E::InvalidCertificate(c) => TlsError::ServerCertInvalid(c),
            e @ (E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }) => TlsError::NotTls(e),
            E::PeerIncompatible(p) => TlsError::Incompatible(p),
            e => TlsError::Other(e),
        }
    }
}

pub use usbwire_tls::Fingerprint;

impl From<usbwire_tls::FingerprintError> for TlsError {
    fn from(e: usbwire_tls::FingerprintError) -> Self {
        TlsError::BadFingerprint(e.0)
    }
}

/// How the client decides that it reached the right server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The server's chain must lead to a certificate in this PEM file and
    /// name the host connected to.
    CaFile(PathBuf),
    /// The server's certificate must have this SHA-256 fingerprint.
    Fingerprint(Fingerprint),
}

/// A client's TLS 1.3 setup: its identity and how it trusts servers.
#[derive(Clone)]
pub struct TlsClientConfig {
    pub(crate) config: Arc<ClientConfig>,
}

impl fmt::Debug for TlsClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClientConfig").finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl TlsClientConfig {
    /// `identity`: this client's certificate chain and private key (PEM
    /// files); without one, a server that asks for a certificate refuses
    /// the client with [`TlsError::ClientCertRequired`].
    pub fn from_files(
        identity: Option<(&Path, &Path)>,
        trust: &ServerTrust,
    ) -> Result<Self, TlsError> {
        let identity = match identity {
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsError::NoKey {
                        path: key.to_path_buf(),
                    })?;
                Some((chain, key))
            }
            None => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Other)?;
        let builder = match trust {
            ServerTrust::CaFile(path) => {
                let mut roots = RootCertStore::empty();
                for ca in certificates(path)? {
                    roots.add(ca).map_err(|e| TlsError::BadCa {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                }
                builder.with_root_certificates(roots)
            }
            ServerTrust::Fingerprint(pinned) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedServer {
                    pinned: *pinned,
                    algorithms,
                })),
        };
        let config = match identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Identity)?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClientConfig {
            config: Arc::new(config),
        })
    }

    /// A session to `host` (the name the server's certificate must hold
    /// when trusted through a CA).
    pub(crate) fn session(&self, host: &str) -> Result<rustls::ClientConnection, TlsError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TlsError::BadServerName(host.to_string()))?;
        rustls::ClientConnection::new(self.config.clone(), name).map_err(TlsError::Other)
    }

    /// A session whose keys can be handed to kernel TLS once the OP phase
    /// is over (`usbip attach --tls`). Only such sessions keep their
    /// secrets extractable.
    pub(crate) fn kernel_tls_session(
        &self,
        host: &str,
    ) -> Result<rustls::ClientConnection, TlsError> {
        let mut config = (*self.config).clone();
        config.enable_secret_extraction = true;
        TlsClientConfig {
            config: Arc::new(config),
        }
        .session(host)
    }
}

/// What a pinned-fingerprint check found, carried through rustls' error.
#[derive(Debug)]
struct PinMismatch {
    pinned: Fingerprint,
    actual: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pinned {}, server sent {}", self.pinned, self.actual)
    }
}

impl std::error::Error for PinMismatch {}

/// Trusts exactly one certificate, by fingerprint. Its name and validity
/// dates are not looked at: the pin is the identity. The handshake
/// signature is still checked, so only the key's holder passes.
#[derive(Debug)]
struct PinnedServer {
    pinned: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Fingerprint::of(end_entity);
        if actual == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    pinned: self.pinned,
                    actual,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The fingerprint of the first certificate in a PEM file, as the
/// pinning options take it.
pub fn certificate_fingerprint(path: &Path) -> Result<Fingerprint, TlsError> {
    Ok(Fingerprint::of(&certificates(path)?[0]))
}

/// A new key and a self-signed certificate for it, in PEM.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: Fingerprint,
}

/// Makes a key (ECDSA P-256) and a self-signed certificate naming `name`
/// (common name and subject alternative name: a DNS name or an IP address).
pub fn self_signed(name: &str) -> Result<SelfSigned, TlsError> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(SelfSigned {
        fingerprint: Fingerprint::of(cert.der()),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_certificate_has_the_fingerprint_printed() {
        let made = self_signed("usbwire.test").unwrap();
        let der = CertificateDer::from_pem_slice(made.cert_pem.as_bytes()).unwrap();
        assert_eq!(Fingerprint::of(&der), made.fingerprint);
        PrivateKeyDer::from_pem_slice(made.key_pem.as_bytes()).unwrap();
    }
}
