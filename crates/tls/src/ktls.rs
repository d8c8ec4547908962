//! Handing a TLS 1.3 connection's keys to the kernel (kernel TLS).
//!
//! Two steps, because only the first can fail without losing the
//! connection: [`attach_ulp`] puts the kernel's TLS layer on the socket
//! (which stays plain TCP until keys arrive), then [`handoff`] gives it the
//! traffic keys and record sequence numbers rustls had reached, in both
//! directions. From then on the kernel encrypts what is written and
//! decrypts what is read, for whoever holds the socket (our data path, or
//! vhci-hcd's `kernel_sendmsg`/`sock_recvmsg`).
//!
//! What must hold at hand-off, or the kernel and the peer disagree on the
//! stream: user space has sent every record it made, holds no decrypted
//! byte the application has not read, and has read no part of the peer's
//! next record ([`RecordBoundary`]). And afterwards no record other than
//! application data may arrive: the kernel's receive path refuses other
//! record types from a reader that does not ask for them (so a server
//! must send no session ticket and no KeyUpdate).

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::{TcpTlsRx, TcpTlsTx, TcpUlp, TlsCryptoInfo};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

use crate::RecordBoundary;

/// The AEAD of a connection handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
        }
    }

    /// The module that provides it, for the message when it is missing.
    fn module(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => "gcm",
            Cipher::Chacha20Poly1305 => "chacha20poly1305",
        }
    }
}

impl std::fmt::Display for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        })
    }
}

/// Which direction a key was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Transmit,
    Receive,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Transmit => "TLS_TX",
            Direction::Receive => "TLS_RX",
        })
    }
}

/// Why a connection could not be handed to kernel TLS.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("kernel TLS is not available: modprobe tls (setsockopt TCP_ULP \"tls\" failed: {0})")]
    Unavailable(Errno),
    #[error(
        "the socket already has an upper-layer protocol, or is not a connected TCP socket: {0}"
    )]
    UlpRefused(Errno),
    #[error(
        "kernel TLS has no {cipher} cipher: modprobe {} ({direction} failed: {errno})",
        cipher.module()
    )]
    CipherUnavailable {
        cipher: Cipher,
        direction: Direction,
        errno: Errno,
    },
    #[error("kernel TLS refused the {direction} keys: {errno}")]
    Install { direction: Direction, errno: Errno },
    #[error("the TLS keys cannot be extracted (the connection must allow secret extraction): {0}")]
    Extract(rustls::Error),
    #[error("{0} bytes of decrypted data wait in user space and would be lost at the hand-off")]
    PlaintextBuffered(usize),
    #[error("TLS records made in user space are not all sent yet")]
    RecordsUnsent,
    #[error("part of the peer's next TLS record was read in user space; the kernel could not decrypt it")]
    MidRecord,
    #[error("cannot make a loopback connection to look for kernel TLS: {0}")]
    Probe(std::io::Error),
    #[error("TLS failed before the hand-off: {0}")]
    Tls(rustls::Error),
}

/// Puts the kernel's TLS layer on a connected TCP socket. The socket
/// stays plain TCP until [`handoff`]; on failure nothing has changed.
pub fn attach_ulp(socket: &impl AsFd) -> Result<(), KtlsError> {
    setsockopt(socket, TcpUlp::default(), b"tls").map_err(|errno| match errno {
        // The kernel found no "tls" ULP (nor could load it).
        Errno::ENOENT => KtlsError::Unavailable(errno),
        _ => KtlsError::UlpRefused(errno),
    })
}

/// Gives a drained rustls connection's keys to the kernel, transmit then
/// receive. `boundary` is what the connection's reads went through. The
/// socket must have had [`attach_ulp`].
pub fn handoff(
    socket: &impl AsFd,
    connection: impl Into<rustls::Connection>,
    boundary: &RecordBoundary,
) -> Result<Cipher, KtlsError> {
    let mut connection = connection.into();
    match &mut connection {
        rustls::Connection::Client(c) => check_ready(c, boundary)?,
        rustls::Connection::Server(s) => check_ready(s, boundary)?,
    }
    let secrets = connection
        .dangerous_extract_secrets()
        .map_err(KtlsError::Extract)?;
    install(socket, secrets)
}

/// Whether [`handoff`] would take the connection: every record made is
/// sent, no decrypted byte waits unread, and no part of the peer's next
/// record has been read. Unlike [`handoff`] it keeps the connection, so a
/// caller that is refused can go on in user space.
pub fn check_ready<D>(
    connection: &mut rustls::ConnectionCommon<D>,
    boundary: &RecordBoundary,
) -> Result<(), KtlsError> {
    let state = connection.process_new_packets().map_err(KtlsError::Tls)?;
    if state.plaintext_bytes_to_read() > 0 {
        return Err(KtlsError::PlaintextBuffered(
            state.plaintext_bytes_to_read(),
        ));
    }
    if connection.wants_write() {
        return Err(KtlsError::RecordsUnsent);
    }
    if !boundary.at_record_start() {
        return Err(KtlsError::MidRecord);
    }
    Ok(())
}

/// Whether this kernel can carry a TLS 1.3 connection with AES-GCM (128
/// and 256 bit keys), found on a throwaway loopback connection: the `tls`
/// upper-layer protocol, then transmit keys of each size (which load the
/// `gcm` cipher). For a daemon told to use kernel TLS, to refuse to start
/// rather than fail on its first client. Blocking (a loopback connect).
pub fn probe() -> Result<(), KtlsError> {
    let probe_io = KtlsError::Probe;
    for cipher in [Cipher::Aes128Gcm, Cipher::Aes256Gcm] {
        let listener =
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(probe_io)?;
        let socket = std::net::TcpStream::connect(listener.local_addr().map_err(probe_io)?)
            .map_err(probe_io)?;
        attach_ulp(&socket)?;
        // Keys of zeros: nothing is ever sent with them.
        let keys = kernel_keys(cipher, &[0; 32][..cipher.key_len()], &[0; 12], 0)?;
        set_keys(&socket, Direction::Transmit, cipher, &keys)?;
    }
    Ok(())
}

/// Installs extracted keys: transmit, then receive.
pub fn install(socket: &impl AsFd, secrets: ExtractedSecrets) -> Result<Cipher, KtlsError> {
    let (cipher, tx) = crypto_info(secrets.tx.0, &secrets.tx.1)?;
    let (_, rx) = crypto_info(secrets.rx.0, &secrets.rx.1)?;
    set_keys(socket, Direction::Transmit, cipher, &tx)?;
    set_keys(socket, Direction::Receive, cipher, &rx)?;
    Ok(cipher)
}

/// Gives one direction's keys to the kernel.
fn set_keys(
    socket: &impl AsFd,
    direction: Direction,
    cipher: Cipher,
    keys: &TlsCryptoInfo,
) -> Result<(), KtlsError> {
    let set = match direction {
        Direction::Transmit => setsockopt(socket, TcpTlsTx, keys),
        Direction::Receive => setsockopt(socket, TcpTlsRx, keys),
    };
    set.map_err(|errno| match errno {
        // The cipher's module is missing: ENOENT reads like a missing
        // file, so say which module.
        Errno::ENOENT => KtlsError::CipherUnavailable {
            cipher,
            direction,
            errno,
        },
        _ => KtlsError::Install { direction, errno },
    })
}

/// One direction's keys from what rustls extracted.
fn crypto_info(
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<(Cipher, TlsCryptoInfo), KtlsError> {
    let (cipher, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (Cipher::Chacha20Poly1305, key, iv)
        }
        // rustls may add AEADs the kernel lacks.
        #[allow(unreachable_patterns)]
        _ => {
            return Err(KtlsError::Extract(rustls::Error::General(
                "the negotiated cipher has no kernel TLS counterpart".into(),
            )))
        }
    };
    Ok((cipher, kernel_keys(cipher, key.as_ref(), iv.as_ref(), seq)?))
}

/// The kernel's `tls12_crypto_info_*` for one direction (the name is the
/// kernel's; it carries TLS 1.3 too). TLS 1.3's 12-byte IV is the
/// kernel's 4-byte salt followed by its 8-byte IV for the GCM ciphers.
fn kernel_keys(
    cipher: Cipher,
    key: &[u8],
    iv: &[u8],
    seq: u64,
) -> Result<TlsCryptoInfo, KtlsError> {
    let rec_seq = seq.to_be_bytes();
    let header = |cipher_type| libc::tls_crypto_info {
        version: libc::TLS_1_3_VERSION,
        cipher_type,
    };
    Ok(match cipher {
        Cipher::Aes128Gcm => {
            let mut info = libc::tls12_crypto_info_aes_gcm_128 {
                info: header(libc::TLS_CIPHER_AES_GCM_128),
                iv: [0; 8],
                key: [0; 16],
                salt: [0; 4],
                rec_seq,
            };
            copy(&mut info.key, key)?;
            split_iv(&mut info.salt, &mut info.iv, iv)?;
            TlsCryptoInfo::Aes128Gcm(info)
        }
        Cipher::Aes256Gcm => {
            let mut info = libc::tls12_crypto_info_aes_gcm_256 {
                info: header(libc::TLS_CIPHER_AES_GCM_256),
                iv: [0; 8],
                key: [0; 32],
                salt: [0; 4],
                rec_seq,
            };
            copy(&mut info.key, key)?;
            split_iv(&mut info.salt, &mut info.iv, iv)?;
            TlsCryptoInfo::Aes256Gcm(info)
        }
        Cipher::Chacha20Poly1305 => {
            let mut info = libc::tls12_crypto_info_chacha20_poly1305 {
                info: header(libc::TLS_CIPHER_CHACHA20_POLY1305),
                iv: [0; 12],
                key: [0; 32],
                salt: [],
                rec_seq,
            };
            copy(&mut info.key, key)?;
            copy(&mut info.iv, iv)?;
            TlsCryptoInfo::Chacha20Poly1305(info)
        }
    })
}

fn copy(to: &mut [u8], from: &[u8]) -> Result<(), KtlsError> {
    if to.len() != from.len() {
        return Err(KtlsError::Extract(rustls::Error::General(format!(
            "a {}-byte key or IV where the kernel takes {}",
            from.len(),
            to.len()
        ))));
    }
    to.copy_from_slice(from);
    Ok(())
}

fn split_iv(salt: &mut [u8; 4], iv: &mut [u8; 8], from: &[u8]) -> Result<(), KtlsError> {
    let mut whole = [0u8; 12];
    copy(&mut whole, from)?;
    salt.copy_from_slice(&whole[..4]);
    iv.copy_from_slice(&whole[4..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConnection, ServerConnection};

    /// The key material of one direction, as the kernel would get it.
    fn material(info: &TlsCryptoInfo) -> (u16, Vec<u8>, Vec<u8>, Vec<u8>, [u8; 8]) {
        match info {
            TlsCryptoInfo::Aes128Gcm(i) => (
                i.info.cipher_type,
                i.key.to_vec(),
                i.salt.to_vec(),
                i.iv.to_vec(),
                i.rec_seq,
            ),
            TlsCryptoInfo::Aes256Gcm(i) => (
                i.info.cipher_type,
                i.key.to_vec(),
                i.salt.to_vec(),
                i.iv.to_vec(),
                i.rec_seq,
            ),
            TlsCryptoInfo::Chacha20Poly1305(i) => (
                i.info.cipher_type,
                i.key.to_vec(),
                Vec::new(),
                i.iv.to_vec(),
                i.rec_seq,
            ),
        }
    }

    /// Moves every record one side has made to the other.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> usize {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let n = wire.len();
        let mut slice = &wire[..];
        while !slice.is_empty() {
            to.read_tls(&mut slice).unwrap();
            to.process_new_packets().unwrap();
        }
        n
    }

    fn pair(suite: rustls::SupportedCipherSuite) -> (rustls::Connection, rustls::Connection) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(cert.der().to_vec()))
            .unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        let client = ClientConnection::new(
            Arc::new(client),
            ServerName::try_from("usbwire.test").unwrap(),
        )
        .unwrap();
        let server = ServerConnection::new(Arc::new(server)).unwrap();
        (client.into(), server.into())
    }

    #[test]
    fn each_side_transmits_with_the_keys_the_other_receives_with() {
        let suites = rustls::crypto::ring::default_provider().cipher_suites;
        let tls13: Vec<_> = suites
            .into_iter()
            .filter(|s| s.version() == &rustls::version::TLS13)
            .collect();
        assert_eq!(
            tls13.len(),
            3,
            "AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305"
        );
        for suite in tls13 {
            let (mut client, mut server) = pair(suite);
            // Bounded: a TLS 1.3 handshake takes a few flights.
            for _ in 0..4 {
                pump(&mut client, &mut server);
                pump(&mut server, &mut client);
            }
            assert!(!client.is_handshaking() && !server.is_handshaking());
            // Three records from the client, one from the server, as an
            // OP request and its reply would be.
            for _ in 0..3 {
                client.writer().write_all(b"OP_REQ_IMPORT").unwrap();
                pump(&mut client, &mut server);
            }
            server.writer().write_all(b"OP_REP_IMPORT").unwrap();
            pump(&mut server, &mut client);
            let mut got = vec![0; 39];
            server.reader().read_exact(&mut got).unwrap();
            let mut reply = vec![0; 13];
            client.reader().read_exact(&mut reply).unwrap();

            let c = client.dangerous_extract_secrets().unwrap();
            let s = server.dangerous_extract_secrets().unwrap();
            let (cipher, c_tx) = crypto_info(c.tx.0, &c.tx.1).unwrap();
            let (_, c_rx) = crypto_info(c.rx.0, &c.rx.1).unwrap();
            let (_, s_tx) = crypto_info(s.tx.0, &s.tx.1).unwrap();
            let (_, s_rx) = crypto_info(s.rx.0, &s.rx.1).unwrap();
            assert_eq!(material(&c_tx), material(&s_rx), "{cipher:?}");
            assert_eq!(material(&s_tx), material(&c_rx), "{cipher:?}");
            assert_ne!(material(&c_tx).1, material(&c_rx).1, "{cipher:?}");
            assert_eq!(material(&c_tx).4, 3u64.to_be_bytes(), "{cipher:?}");
            assert_eq!(material(&s_tx).4, 1u64.to_be_bytes(), "{cipher:?}");
        }
    }

    #[test]
    fn a_connection_with_unread_data_is_not_handed_off() {
        let suite = rustls::crypto::ring::default_provider().cipher_suites[0];
        let (mut client, mut server) = pair(suite);
        for _ in 0..4 {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        client.writer().write_all(b"CMD_SUBMIT").unwrap();
        pump(&mut client, &mut server);
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = handoff(&socket, server, &RecordBoundary::default()).unwrap_err();
        assert!(matches!(err, KtlsError::PlaintextBuffered(10)), "{err}");
        // Unsent records are refused too.
        client.writer().write_all(b"more").unwrap();
        let err = handoff(&socket, client, &RecordBoundary::default()).unwrap_err();
        assert!(matches!(err, KtlsError::RecordsUnsent), "{err}");
    }

    #[test]
    fn attaching_the_ulp_works_or_says_to_load_tls() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        match attach_ulp(&stream) {
            Ok(()) => {
                let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap();
                assert!(ulps.split_whitespace().any(|u| u == "tls"), "{ulps}");
            }
            Err(e) => {
                assert!(matches!(e, KtlsError::Unavailable(Errno::ENOENT)), "{e}");
                assert!(e
                    .to_string()
                    .starts_with("kernel TLS is not available: modprobe tls"));
            }
        }
    }

    #[test]
    fn the_probe_agrees_with_the_kernels_list_of_ulps() {
        let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap();
        match probe() {
            // The probe's own connection may have loaded tls.ko (as root).
            Ok(()) => {
                let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap();
                assert!(ulps.split_whitespace().any(|u| u == "tls"), "{ulps}");
            }
            Err(KtlsError::Unavailable(_)) => {
                assert!(!ulps.split_whitespace().any(|u| u == "tls"), "{ulps}");
            }
            // tls is there but a cipher module is not: the message names it.
            Err(e @ KtlsError::CipherUnavailable { .. }) => {
                assert!(e.to_string().contains("modprobe gcm"), "{e}");
            }
            Err(e) => panic!("{e}"),
        }
    }
}
