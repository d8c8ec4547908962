//! The blocking std driver of the OP phase, for `usbip attach`: the socket
//! goes to vhci-hcd right after the import, so nothing past the reply may
//! be read from it. Over TLS, nothing past the reply's last record either:
//! the kernel decrypts what follows ([`usbwire_tls::RecordBoundary`]).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rustls::ClientConnection;
use usbwire_proto::{DeviceInfo, OpReply};
use usbwire_tls::RecordBoundary;

use crate::error::ClientError;
use crate::op::OpExchange;
use crate::tls::TlsError;
use crate::transport::{records_read, tls_io_error};

/// How long the server may take to answer an import (over TLS: to
/// complete the handshake and answer).
const IMPORT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// OP_REQ_IMPORT on a blocking socket, reading exactly the reply and not
/// a byte more: what follows belongs to whoever takes the socket next.
pub fn import_blocking(
    stream: &mut TcpStream,
    name: &str,
    busid: &str,
) -> Result<DeviceInfo, ClientError> {
    let mut op = OpExchange::import(busid);
    // Bounded wait for the answer; cleared afterwards, as the kernel would
    // inherit SO_RCVTIMEO.
    let _ = stream.set_read_timeout(Some(IMPORT_REPLY_TIMEOUT));
    let reply = exchange_blocking(&mut *stream, &mut op, name)?;
    stream
        .set_read_timeout(None)
        .map_err(|e| ClientError::from_io(name, e))?;
    op.imported(reply, name)
}

/// A TLS import ready for kernel TLS: the session, drained, and where the
/// socket stands relative to the server's records.
#[derive(Debug)]
pub struct TlsImport {
    pub device: DeviceInfo,
    pub session: ClientConnection,
    pub boundary: RecordBoundary,
}

/// OP_REQ_IMPORT over TLS 1.3 on a blocking socket: the handshake, the
/// request and the reply, each socket read ending at a TLS record end, so
/// that the server's next record is still whole in the socket for kernel
/// TLS to decrypt.
pub fn import_blocking_tls(
    stream: &TcpStream,
    session: ClientConnection,
    name: &str,
    busid: &str,
) -> Result<TlsImport, ClientError> {
    let mut tls = BlockingTls {
        stream,
        session,
        boundary: RecordBoundary::default(),
        deadline: Instant::now() + IMPORT_REPLY_TIMEOUT,
    };
    let mut op = OpExchange::import(busid);
    let reply = exchange_blocking(&mut tls, &mut op, name);
    // Cleared whatever happened: on success the kernel inherits the socket.
    let cleared = stream.set_read_timeout(None);
    let device = op.imported(reply?, name)?;
    cleared.map_err(|e| ClientError::from_io(name, e))?;
    Ok(TlsImport {
        device,
        session: tls.session,
        boundary: tls.boundary,
    })
}

/// The OP exchange over any blocking byte stream: sends the request, reads
/// the reply. The one decode loop is [`OpExchange`]'s.
fn exchange_blocking<S: Read + Write>(
    stream: &mut S,
    op: &mut OpExchange,
    name: &str,
) -> Result<OpReply, ClientError> {
    stream
        .write_all(op.poll_transmit())
        .and_then(|()| stream.flush())
        .map_err(|e| ClientError::from_io(name, e))?;
    op.transmitted(op.poll_transmit().len());
    // Bounded: each read brings at least one byte of a reply whose length
    // the decoder bounds, or fails (the socket's read timeout included).
    loop {
        let n = match stream.read(op.read_buffer()) {
            Ok(0) => {
                return Err(ClientError::Closed {
                    addr: name.to_string(),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ClientError::from_io(name, e)),
        };
        let decoded = op.handle_input(n).map_err(|source| ClientError::Protocol {
            addr: name.to_string(),
            source,
        })?;
        if let Some(reply) = decoded {
            return Ok(reply);
        }
    }
}

/// A rustls client session over a blocking socket whose reads stop at
/// record ends. TLS failures come out as [`TlsError`]s inside `io::Error`
/// ([`ClientError::from_io`] unwraps them).
struct BlockingTls<'a> {
    stream: &'a TcpStream,
    session: ClientConnection,
    boundary: RecordBoundary,
    /// When the handshake and the reply must have arrived.
    deadline: Instant,
}

impl BlockingTls<'_> {
    /// Reads some of the server's records (never past the end of one) and
    /// decrypts them.
    fn receive(&mut self) -> io::Result<()> {
        let handshaking = self.session.is_handshaking();
        let timed_out = || {
            if handshaking {
                tls_io_error(TlsError::HandshakeTimeout(IMPORT_REPLY_TIMEOUT))
            } else {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {IMPORT_REPLY_TIMEOUT:?}"),
                )
            }
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        let read = match self
            .session
            .read_tls(&mut self.boundary.reader(self.stream))
        {
            // SO_RCVTIMEO expired.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            read => read,
        };
        records_read(read, handshaking)?;
        let processed = self.session.process_new_packets();
        // Alerts rustls queued on failure go out before the error does.
        let _ = self.flush();
        processed.map_err(|e| tls_io_error(TlsError::from_rustls(e)))?;
        Ok(())
    }
}

impl Read for BlockingTls<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Bounded: each turn takes plaintext, or reads at least one byte
        // from the socket, which fails once the deadline has passed.
        loop {
            // Handshake records, then the request rustls held until the
            // handshake was done.
            self.flush()?;
            match self.session.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.receive()?;
        }
    }
}

impl Write for BlockingTls<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.session.writer().write(buf)?;
        self.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Bounded: each write takes at least one byte of what rustls holds.
        while self.session.wants_write() {
            if self.session.write_tls(&mut self.stream)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::ServerConnection;

    use crate::tls::{Fingerprint, ServerTrust, TlsClientConfig};

    /// OP_REP_IMPORT of busid 1-1 (high speed), as a server sends it.
    fn import_reply() -> Vec<u8> {
        let mut r = vec![0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0];
        r.extend_from_slice(&[0; 256]);
        let mut busid = [0u8; 32];
        busid[..3].copy_from_slice(b"1-1");
        r.extend_from_slice(&busid);
        for v in [1u32, 2, 3] {
            r.extend_from_slice(&v.to_be_bytes());
        }
        r.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0x01, 0x00, 0, 0, 0, 1, 1, 1]);
        r
    }

    /// A TLS 1.3 server that answers the import in two records and sends
    /// a third right behind them, all in one TCP write, as a server whose
    /// first RET_SUBMIT follows its reply at once would.
    fn serve(listener: TcpListener, key: rcgen::KeyPair, cert: rcgen::Certificate) {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
        config.send_tls13_tickets = 0;
        let mut tls = ServerConnection::new(Arc::new(config)).unwrap();
        let (mut socket, _) = listener.accept().unwrap();
        let mut request = [0u8; 40];
        let mut got = 0;
        // Bounded: each turn reads at least one byte of a finite handshake and request.
        while got < request.len() {
            tls.complete_io(&mut socket).unwrap();
            match tls.reader().read(&mut request[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&request[..4], &[0x01, 0x11, 0x80, 0x03]);
        let reply = import_reply();
        tls.writer().write_all(&reply[..100]).unwrap();
        tls.writer().write_all(&reply[100..]).unwrap();
        tls.writer().write_all(b"NEXT-RECORD").unwrap();
        let mut wire = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut wire).unwrap();
        }
        socket.write_all(&wire).unwrap();
        // Held open until the client is done.
        let _ = socket.read(&mut [0u8; 1]);
    }

    #[test]
    fn a_tls_import_reads_no_byte_of_the_record_after_the_reply() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pin = Fingerprint::of(cert.der());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener, key, cert));

        let config = TlsClientConfig::from_files(None, &ServerTrust::Fingerprint(pin)).unwrap();
        let session = config.kernel_tls_session("usbwire.test").unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        let mut import = import_blocking_tls(&stream, session, "test", "1-1").unwrap();
        assert_eq!(import.device.busid.to_string(), "1-1");
        assert!(import.boundary.at_record_start());
        assert_eq!(stream.read_timeout().unwrap(), None, "SO_RCVTIMEO cleared");

        // Nothing decrypted waits in user space, and the socket holds the
        // whole next record (11 bytes, its content type and a 16-byte tag,
        // behind a 5-byte header): the server sent it in the same TCP
        // write as the reply, so it has all arrived.
        let state = import.session.process_new_packets().unwrap();
        assert_eq!(state.plaintext_bytes_to_read(), 0);
        let mut peeked = [0u8; 64];
        assert_eq!(stream.peek(&mut peeked).unwrap(), 5 + 11 + 1 + 16);
        assert_eq!(peeked[..5], [0x17, 0x03, 0x03, 0, 28]);
        // The record after the reply is whole in the socket: the session
        // (as the kernel would, with the next sequence number) decrypts it.
        let mut next = [0u8; 11];
        let mut got = 0;
        // Bounded: each turn reads at least one byte of the one record.
        while got < next.len() {
            import.session.read_tls(&mut &stream).unwrap();
            import.session.process_new_packets().unwrap();
            match import.session.reader().read(&mut next[got..]) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&next, b"NEXT-RECORD");
        // Kernel TLS sessions keep their secrets: three records received.
        let secrets = import.session.dangerous_extract_secrets().unwrap();
        assert_eq!(secrets.rx.0, 3);
        drop(stream);
        server.join().unwrap();
    }

    fn tls_error(e: ClientError) -> TlsError {
        match e {
            ClientError::Tls { source, .. } => source,
            e => panic!("not a TLS error: {e}"),
        }
    }

    #[test]
    fn a_plaintext_server_or_the_wrong_certificate_is_a_tls_error_that_says_so() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = Fingerprint::of(b"another certificate");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener, key, cert));
        let config = TlsClientConfig::from_files(None, &ServerTrust::Fingerprint(other)).unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        let session = config.kernel_tls_session("usbwire.test").unwrap();
        let e = tls_error(import_blocking_tls(&stream, session, "test", "1-1").unwrap_err());
        assert!(matches!(e, TlsError::FingerprintMismatch { .. }), "{e}");
        drop(stream);
        // The server's handshake fails on the client's alert.
        assert!(server.join().is_err());

        // A plaintext USB/IP server reads a header, finds no USB/IP version
        // in it and closes, as the C usbipd does.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let plaintext = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            socket.read_exact(&mut [0u8; 8]).unwrap();
        });
        let stream = TcpStream::connect(addr).unwrap();
        let session = config.kernel_tls_session("usbwire.test").unwrap();
        let e = tls_error(import_blocking_tls(&stream, session, "test", "1-1").unwrap_err());
        assert!(matches!(e, TlsError::ClosedDuringHandshake), "{e}");
        plaintext.join().unwrap();
    }
}
