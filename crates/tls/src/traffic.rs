//! A connection's application traffic after the handshake, protected in
//! user space the way kernel TLS protects it: rustls makes the keys, and
//! its own record protection for the negotiated suite (the
//! `MessageEncrypter`/`MessageDecrypter` of the suite's AEAD) seals and
//! opens each record. Only the framing is done here.
//!
//! Why not rustls' buffered reader: it copies each decrypted record into a
//! fresh buffer, and the reader copies it again; here a record is opened
//! in place in the buffer the socket was read into, and copied once, into
//! the caller's buffers (an URB's payload). And the rules are kernel
//! TLS's: no KeyUpdate and no other post-handshake message in either
//! direction, so user space and kernel TLS behave the same to a client.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write};

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};

use crate::RecordBoundary;

/// The length of a TLS record header: type, legacy version, length.
const HEADER_LEN: usize = 5;
/// The most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// The longest record body a TLS 1.3 peer may send: the plaintext, its
/// content type and padding, and the AEAD's expansion (RFC 8446 §5.2).
const MAX_RECORD_BODY: usize = MAX_RECORD_PLAINTEXT + 256;
/// Sealed bytes that may wait for the socket before [`Traffic::seal`]
/// takes no more plaintext: the session's backpressure is the socket's.
const MAX_PENDING: usize = 256 * 1024;
/// The TLS alert description close_notify.
const CLOSE_NOTIFY: u8 = 0;

/// Why a connection's traffic could not go on.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error("the connection did not negotiate TLS 1.3")]
    NotTls13,
    #[error("TLS records rustls made are not all sent yet")]
    RecordsUnsent,
    #[error("part of the peer's next TLS record was already read by rustls")]
    MidRecord,
    #[error("the TLS keys cannot be extracted (the connection must allow secret extraction): {0}")]
    Extract(rustls::Error),
    #[error("TLS failed before the switch to record protection in user space: {0}")]
    Tls(rustls::Error),
    #[error("the peer sent a TLS record of {0} bytes, more than TLS 1.3 allows")]
    RecordOverflow(usize),
    #[error("the peer sent an unencrypted TLS record of type {0} after the handshake")]
    Unencrypted(u8),
    #[error("a TLS record from the peer failed to decrypt: {0}")]
    Decrypt(rustls::Error),
    #[error(
        "the peer sent a TLS {0:?} message after the handshake (a KeyUpdate?): this connection \
         never renews its keys, as kernel TLS cannot"
    )]
    PostHandshake(ContentType),
    #[error("the peer ended the connection with TLS alert {0}")]
    Alert(u8),
    #[error(
        "closed the TLS connection after {records} records, at its cipher's limit of {limit}: \
         rustls would renew the keys with a TLS KeyUpdate, which a client whose kernel holds \
         the connection (kernel TLS, usbip attach --tls) cannot take; the client may reconnect"
    )]
    RecordLimit { records: u64, limit: u64 },
    #[error("cannot seal a TLS record: {0}")]
    Seal(rustls::Error),
}

impl From<TrafficError> for io::Error {
    fn from(e: TrafficError) -> io::Error {
        let kind = match e {
            TrafficError::RecordLimit { .. } => io::ErrorKind::Other,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// What [`Traffic::read_plaintext`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Plaintext copied into the caller's buffers.
    Data(usize),
    /// No whole record is buffered: read the socket into
    /// [`Traffic::read_space`].
    NeedInput,
    /// The peer sent close_notify.
    Closed,
}

/// One connection's application traffic in both directions.
pub struct Traffic {
    suite: SupportedCipherSuite,
    opener: Box<dyn MessageDecrypter>,
    sealer: Box<dyn MessageEncrypter>,
    rx_seq: u64,
    tx_seq: u64,
    /// Records the transmit keys may seal, one kept for close_notify.
    tx_limit: u64,
    /// Socket bytes: `raw_start..raw_end` not yet opened; before them,
    /// `plain_start..plain_end` opened and not yet read.
    rx: Box<[u8]>,
    raw_start: usize,
    raw_end: usize,
    plain_start: usize,
    plain_end: usize,
    /// Plaintext rustls had decrypted before the switch, read first.
    leftover: VecDeque<u8>,
    peer_closed: bool,
    /// Sealed records waiting for the socket; the first has `sent_of_first`
    /// bytes gone.
    pending: VecDeque<Vec<u8>>,
    pending_bytes: usize,
    sent_of_first: usize,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic")
            .field("suite", &self.suite.suite())
            .field("rx_seq", &self.rx_seq)
            .field("tx_seq", &self.tx_seq)
            .finish_non_exhaustive()
    }
}

impl Traffic {
    /// Takes over a connection whose handshake is done: every record it
    /// made must have been sent, and (when its reads went through
    /// `boundary`) nothing of the peer's next record read. Plaintext it
    /// had decrypted and not yet given out is read first. `receive_buffer`
    /// is how much one socket read may bring (at least one whole record).
    pub fn take(
        connection: impl Into<rustls::Connection>,
        boundary: Option<&RecordBoundary>,
        receive_buffer: usize,
    ) -> Result<Traffic, TrafficError> {
        let mut connection = connection.into();
        let mut leftover = VecDeque::new();
        let (suite, unsent) = match &mut connection {
            rustls::Connection::Client(c) => (
                c.negotiated_cipher_suite(),
                drain(c, &mut leftover).map_err(TrafficError::Tls)?,
            ),
            rustls::Connection::Server(s) => (
                s.negotiated_cipher_suite(),
                drain(s, &mut leftover).map_err(TrafficError::Tls)?,
            ),
        };
        if unsent {
            return Err(TrafficError::RecordsUnsent);
        }
        if boundary.is_some_and(|b| !b.at_record_start()) {
            return Err(TrafficError::MidRecord);
        }
        let suite = suite.ok_or(TrafficError::NotTls13)?;
        let secrets = connection
            .dangerous_extract_secrets()
            .map_err(TrafficError::Extract)?;
        Traffic::new(suite, secrets, leftover, receive_buffer)
    }

    fn new(
        suite: SupportedCipherSuite,
        secrets: rustls::ExtractedSecrets,
        leftover: VecDeque<u8>,
        receive_buffer: usize,
    ) -> Result<Traffic, TrafficError> {
        let tls13 = suite.tls13().ok_or(TrafficError::NotTls13)?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let (tx_key, tx_iv) = key_and_iv(tx)?;
        let (rx_key, rx_iv) = key_and_iv(rx)?;
        Ok(Traffic {
            suite,
            opener: tls13.aead_alg.decrypter(rx_key, rx_iv),
            sealer: tls13.aead_alg.encrypter(tx_key, tx_iv),
            rx_seq,
            tx_seq,
            tx_limit: tls13.common.confidentiality_limit.saturating_sub(1),
            rx: vec![0; receive_buffer.max(2 * (HEADER_LEN + MAX_RECORD_BODY))].into_boxed_slice(),
            raw_start: 0,
            raw_end: 0,
            plain_start: 0,
            plain_end: 0,
            leftover,
            peer_closed: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            sent_of_first: 0,
        })
    }

    /// The negotiated cipher suite.
    pub fn suite(&self) -> SupportedCipherSuite {
        self.suite
    }

    /// Whether [`Traffic::read_plaintext`] has something to give without
    /// reading the socket: plaintext, a whole record, or the peer's close.
    pub fn has_input(&self) -> bool {
        self.peer_closed
            || !self.leftover.is_empty()
            || self.plain_start < self.plain_end
            || self.whole_record().is_some()
            || self.refused_header()
    }

    /// Whether the header at the front of the raw bytes is one
    /// [`Traffic::read_plaintext`] refuses without waiting for its body.
    fn refused_header(&self) -> bool {
        let raw = &self.rx[self.raw_start..self.raw_end];
        raw.len() >= HEADER_LEN
            && (raw[0] != u8::from(ContentType::ApplicationData)
                || usize::from(u16::from_be_bytes([raw[3], raw[4]])) > MAX_RECORD_BODY)
    }

    /// The length of the record at the front of the raw bytes, header
    /// included, if it is all there.
    fn whole_record(&self) -> Option<usize> {
        let raw = &self.rx[self.raw_start..self.raw_end];
        if raw.len() < HEADER_LEN {
            return None;
        }
        let len = HEADER_LEN + usize::from(u16::from_be_bytes([raw[3], raw[4]]));
        (raw.len() >= len).then_some(len)
    }

    /// Where to read socket bytes to; then [`Traffic::received`]. Only
    /// when [`Traffic::read_plaintext`] asked for input.
    pub fn read_space(&mut self) -> &mut [u8] {
        if self.raw_start == self.raw_end
            || self.rx.len() - self.raw_start < HEADER_LEN + MAX_RECORD_BODY
        {
            // What is left is part of one record, which might not fit
            // where it is: it moves to the front.
            self.rx.copy_within(self.raw_start..self.raw_end, 0);
            self.raw_end -= self.raw_start;
            self.raw_start = 0;
            self.plain_start = 0;
            self.plain_end = 0;
        }
        &mut self.rx[self.raw_end..]
    }

    /// `n` bytes were read into [`Traffic::read_space`].
    pub fn received(&mut self, n: usize) {
        self.raw_end = (self.raw_end + n).min(self.rx.len());
    }

    /// Copies plaintext into `bufs`, opening the next record when what was
    /// opened is used up.
    pub fn read_plaintext(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Result<Received, TrafficError> {
        if !self.leftover.is_empty() {
            let mut n = 0;
            for buf in bufs.iter_mut() {
                let take = buf.len().min(self.leftover.len());
                for (d, s) in buf[..take].iter_mut().zip(self.leftover.drain(..take)) {
                    *d = s;
                }
                n += take;
            }
            return Ok(Received::Data(n));
        }
        // Bounded: each turn opens a record or returns.
        loop {
            if self.plain_start < self.plain_end {
                let mut n = 0;
                for buf in bufs.iter_mut() {
                    let take = buf.len().min(self.plain_end - self.plain_start);
                    buf[..take]
                        .copy_from_slice(&self.rx[self.plain_start..self.plain_start + take]);
                    self.plain_start += take;
                    n += take;
                }
                return Ok(Received::Data(n));
            }
            if self.peer_closed {
                return Ok(Received::Closed);
            }
            if !self.open_record()? {
                return Ok(Received::NeedInput);
            }
        }
    }

    /// Opens the record at the front of the raw bytes, in place; `false`
    /// if it is not all there yet.
    fn open_record(&mut self) -> Result<bool, TrafficError> {
        let raw = &self.rx[self.raw_start..self.raw_end];
        if raw.len() >= HEADER_LEN {
            let body = usize::from(u16::from_be_bytes([raw[3], raw[4]]));
            // Refused before waiting for its bytes.
            if body > MAX_RECORD_BODY {
                return Err(TrafficError::RecordOverflow(body));
            }
            if raw[0] != u8::from(ContentType::ApplicationData) {
                return Err(TrafficError::Unencrypted(raw[0]));
            }
        }
        let Some(len) = self.whole_record() else {
            return Ok(false);
        };
        let body_start = self.raw_start + HEADER_LEN;
        let record_end = self.raw_start + len;
        let rx_base = self.rx.as_ptr() as usize;
        let sealed = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut self.rx[body_start..record_end],
        );
        let opened = self
            .opener
            .decrypt(sealed, self.rx_seq)
            .map_err(TrafficError::Decrypt)?;
        self.rx_seq += 1;
        self.raw_start = record_end;
        // The plaintext is a prefix of the record's body, opened in place.
        let start = opened.payload.as_ptr() as usize - rx_base;
        let end = start + opened.payload.len();
        match opened.typ {
            ContentType::ApplicationData => {
                self.plain_start = start;
                self.plain_end = end;
            }
            ContentType::Alert => match opened.payload {
                [_, CLOSE_NOTIFY] => self.peer_closed = true,
                [_, description] => return Err(TrafficError::Alert(*description)),
                _ => return Err(TrafficError::Alert(u8::MAX)),
            },
            other => return Err(TrafficError::PostHandshake(other)),
        }
        Ok(true)
    }

    /// Seals as much of `bufs` as may wait for the socket, in records of
    /// at most 16 KiB; returns the plaintext bytes taken (0 when the
    /// records waiting are at their bound: send them first).
    pub fn seal(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TrafficError> {
        let slices: Vec<&[u8]> = bufs
            .iter()
            .map(|b| &b[..])
            .filter(|b| !b.is_empty())
            .collect();
        if slices.is_empty() {
            return Ok(0);
        }
        let mut rest = OutboundChunks::new(&slices);
        let mut taken = 0;
        while !rest.is_empty() && self.pending_bytes < MAX_PENDING {
            if self.tx_seq >= self.tx_limit {
                if taken > 0 {
                    break;
                }
                return Err(TrafficError::RecordLimit {
                    records: self.tx_seq,
                    limit: self.tx_limit + 1,
                });
            }
            let (record, after) = rest.split_at(MAX_RECORD_PLAINTEXT);
            let len = record.len();
            self.push_record(ContentType::ApplicationData, record)?;
            taken += len;
            rest = after;
        }
        Ok(taken)
    }

    /// Queues close_notify, after what is already sealed.
    pub fn close_notify(&mut self) -> Result<(), TrafficError> {
        self.push_record(
            ContentType::Alert,
            OutboundChunks::Single(&[1, CLOSE_NOTIFY]),
        )
    }

    fn push_record(
        &mut self,
        typ: ContentType,
        payload: OutboundChunks<'_>,
    ) -> Result<(), TrafficError> {
        let sealed = self
            .sealer
            .encrypt(
                OutboundPlainMessage {
                    typ,
                    version: ProtocolVersion::TLSv1_2,
                    payload,
                },
                self.tx_seq,
            )
            .map_err(TrafficError::Seal)?;
        self.tx_seq += 1;
        let record = sealed.encode();
        self.pending_bytes += record.len();
        self.pending.push_back(record);
        Ok(())
    }

    /// Whether sealed records wait for the socket.
    pub fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes waiting records to `socket` until they are all sent or it
    /// would block (`WouldBlock`).
    pub fn write_to(&mut self, mut socket: impl Write) -> io::Result<()> {
        /// Records per system call, at most.
        const SLICES: usize = 64;
        // Bounded: each turn sends bytes or returns.
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES];
            let mut count = 0;
            for (i, record) in self.pending.iter().take(SLICES).enumerate() {
                let from = if i == 0 { self.sent_of_first } else { 0 };
                slices[i] = IoSlice::new(&record[from..]);
                count = i + 1;
            }
            let mut n = socket.write_vectored(&slices[..count])?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.pending_bytes -= n;
            while n > 0 {
                let first = self
                    .pending
                    .front()
                    .map_or(0, |r| r.len() - self.sent_of_first);
                if n >= first {
                    n -= first;
                    self.pending.pop_front();
                    self.sent_of_first = 0;
                } else {
                    self.sent_of_first += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// Moves what `connection` decrypted and did not give out into `into`;
/// returns whether records it made wait to be sent.
fn drain<D>(
    connection: &mut rustls::ConnectionCommon<D>,
    into: &mut VecDeque<u8>,
) -> Result<bool, rustls::Error> {
    let state = connection.process_new_packets()?;
    let mut left = state.plaintext_bytes_to_read();
    let mut chunk = [0u8; 4096];
    // Bounded by the count rustls reported.
    while left > 0 {
        match io::Read::read(&mut connection.reader(), &mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                into.extend(&chunk[..n]);
                left = left.saturating_sub(n);
            }
        }
    }
    Ok(connection.wants_write())
}

fn key_and_iv(
    secrets: ConnectionTrafficSecrets,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), TrafficError> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        _ => Err(TrafficError::NotTls13),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Arc;

    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    fn configs(
        suite: Option<SupportedCipherSuite>,
    ) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(suite) = suite {
            provider.cipher_suites = vec![suite];
        }
        let provider = Arc::new(provider);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["usbwire.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
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
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(client), Arc::new(server))
    }

    /// Moves every record `from` has made to `to`.
    fn pass<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    fn connected(suite: Option<SupportedCipherSuite>) -> (ClientConnection, ServerConnection) {
        let (cc, sc) = configs(suite);
        let mut client = ClientConnection::new(cc, "usbwire.test".try_into().unwrap()).unwrap();
        let mut server = ServerConnection::new(sc).unwrap();
        // Bounded: a TLS 1.3 handshake takes two flights each way.
        for _ in 0..4 {
            pass(&mut client, &mut server);
            pass(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        (client, server)
    }

    /// Gives `traffic` the socket bytes `wire` in reads of `chunk` bytes,
    /// reading plaintext in pieces of `piece` bytes, until the bytes are
    /// used up.
    fn receive(traffic: &mut Traffic, wire: &[u8], chunk: usize, piece: usize) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        let mut rest = wire;
        let mut buf = vec![0u8; piece];
        // Bounded: each turn takes plaintext or socket bytes, or ends.
        loop {
            match traffic
                .read_plaintext(&mut [IoSliceMut::new(&mut buf)])
                .unwrap()
            {
                Received::Data(n) => got.extend_from_slice(&buf[..n]),
                Received::Closed => return (got, true),
                Received::NeedInput => {
                    if rest.is_empty() {
                        return (got, false);
                    }
                    let space = traffic.read_space();
                    let n = space.len().min(chunk).min(rest.len());
                    space[..n].copy_from_slice(&rest[..n]);
                    traffic.received(n);
                    rest = &rest[n..];
                }
            }
        }
    }

    fn sent(traffic: &mut Traffic) -> Vec<u8> {
        let mut wire = Vec::new();
        traffic.write_to(&mut wire).unwrap();
        wire
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn records_from_rustls_open_in_any_chunking_and_ours_open_in_rustls() {
        for suite in [
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut client, server) = connected(Some(suite));
            client.set_buffer_limit(None);
            let mut traffic = Traffic::take(server, None, 64 * 1024).unwrap();
            let data = pattern(200_000);
            for (chunk, piece) in [
                (1, 7),
                (4096, 65536),
                (100_000, 1000),
                (usize::MAX, 200_000),
            ] {
                client.writer().write_all(&data).unwrap();
                let mut wire = Vec::new();
                while client.wants_write() {
                    client.write_tls(&mut wire).unwrap();
                }
                let (got, closed) = receive(&mut traffic, &wire, chunk, piece);
                assert!(!closed);
                assert!(got == data, "{suite:?} chunk {chunk} piece {piece}");
            }
            // The other way, split over slices, with close_notify last.
            let (a, b) = data.split_at(70_001);
            assert_eq!(
                traffic.seal(&[IoSlice::new(a), IoSlice::new(b)]).unwrap(),
                data.len()
            );
            traffic.close_notify().unwrap();
            let wire = sent(&mut traffic);
            let mut rest = &wire[..];
            let mut got = Vec::new();
            let mut closed = false;
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                let state = client.process_new_packets().unwrap();
                closed |= state.peer_has_closed();
                let _ = client.reader().read_to_end(&mut got);
            }
            assert!(closed);
            assert!(got == data, "{suite:?} sealed");
        }
    }

    #[test]
    fn the_peers_close_notify_ends_the_stream() {
        let (mut client, server) = connected(None);
        let mut traffic = Traffic::take(server, None, 0).unwrap();
        client.writer().write_all(b"last").unwrap();
        client.send_close_notify();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        assert_eq!(receive(&mut traffic, &wire, 3, 2), (b"last".to_vec(), true));
        assert!(traffic.has_input());
    }

    #[test]
    fn both_ends_in_user_space_and_plaintext_rustls_held_comes_first() {
        let (mut client, mut server) = connected(None);
        // Sent before the server's switch, and decrypted by rustls.
        client.writer().write_all(b"early").unwrap();
        pass(&mut client, &mut server);
        let mut ours = Traffic::take(client, None, 0).unwrap();
        let mut theirs = Traffic::take(server, None, 0).unwrap();
        ours.seal(&[IoSlice::new(b" and late")]).unwrap();
        let wire = sent(&mut ours);
        assert_eq!(
            receive(&mut theirs, &wire, 10, 3),
            (b"early and late".to_vec(), false)
        );
    }

    #[test]
    fn a_key_update_from_the_peer_is_refused_as_kernel_tls_would() {
        let (mut client, server) = connected(None);
        let mut traffic = Traffic::take(server, None, 0).unwrap();
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"x").unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let space = traffic.read_space();
        space[..wire.len()].copy_from_slice(&wire);
        traffic.received(wire.len());
        let e = traffic
            .read_plaintext(&mut [IoSliceMut::new(&mut [0u8; 8])])
            .unwrap_err();
        assert!(
            matches!(e, TrafficError::PostHandshake(ContentType::Handshake)),
            "{e}"
        );
        assert!(e.to_string().contains("KeyUpdate"), "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_before_their_body_arrives() {
        for (header, want) in [
            ([23u8, 3, 3, 0xff, 0xff], "more than TLS 1.3 allows"),
            ([21u8, 3, 3, 0, 2], "unencrypted TLS record of type 21"),
            ([23u8, 3, 3, 0, 40], "failed to decrypt"),
        ] {
            let (_, server) = connected(None);
            let mut traffic = Traffic::take(server, None, 0).unwrap();
            let mut wire = header.to_vec();
            if want == "failed to decrypt" {
                wire.extend_from_slice(&[0u8; 40]);
            }
            let space = traffic.read_space();
            space[..wire.len()].copy_from_slice(&wire);
            traffic.received(wire.len());
            assert!(traffic.has_input());
            let e = traffic
                .read_plaintext(&mut [IoSliceMut::new(&mut [0u8; 8])])
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn records_past_the_ciphers_limit_are_refused_keeping_one_for_close_notify() {
        let base = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .unwrap();
        let low: &'static rustls::Tls13CipherSuite =
            Box::leak(Box::new(rustls::Tls13CipherSuite {
                common: rustls::crypto::CipherSuiteCommon {
                    confidentiality_limit: 4,
                    ..base.common
                },
                ..*base
            }));
        let (_, server) = connected(Some(SupportedCipherSuite::Tls13(low)));
        let mut traffic = Traffic::take(server, None, 0).unwrap();
        for _ in 0..3 {
            assert_eq!(traffic.seal(&[IoSlice::new(b"ab")]).unwrap(), 2);
        }
        let e = traffic.seal(&[IoSlice::new(b"ab")]).unwrap_err();
        assert!(
            matches!(
                e,
                TrafficError::RecordLimit {
                    records: 3,
                    limit: 4
                }
            ),
            "{e}"
        );
        traffic.close_notify().unwrap();
        // 16 KiB records: a write the limit cuts short is taken in part.
        let (_, server) = connected(Some(SupportedCipherSuite::Tls13(low)));
        let mut traffic = Traffic::take(server, None, 0).unwrap();
        let big = vec![0u8; 5 * MAX_RECORD_PLAINTEXT];
        assert_eq!(
            traffic.seal(&[IoSlice::new(&big)]).unwrap(),
            3 * MAX_RECORD_PLAINTEXT
        );
    }

    #[test]
    fn unsent_records_or_a_record_begun_keep_the_connection_in_rustls() {
        let (_, mut server) = connected(None);
        server.writer().write_all(b"queued").unwrap();
        assert!(matches!(
            Traffic::take(server, None, 0),
            Err(TrafficError::RecordsUnsent)
        ));
        let (_, server) = connected(None);
        let mut boundary = RecordBoundary::default();
        let mut half = &[23u8, 3, 3][..];
        let mut sink = [0u8; 8];
        let _ = boundary.reader(&mut half).read(&mut sink).unwrap();
        assert!(matches!(
            Traffic::take(server, Some(&boundary), 0),
            Err(TrafficError::MidRecord)
        ));
    }

    #[test]
    fn sealing_stops_at_the_bound_of_records_waiting_and_resumes_once_sent() {
        let (_, server) = connected(None);
        let mut traffic = Traffic::take(server, None, 0).unwrap();
        let big = vec![1u8; 2 * MAX_PENDING];
        let first = traffic.seal(&[IoSlice::new(&big)]).unwrap();
        assert!(
            first >= MAX_PENDING - MAX_RECORD_PLAINTEXT && first < big.len(),
            "{first}"
        );
        assert_eq!(traffic.seal(&[IoSlice::new(&big[first..])]).unwrap(), 0);
        // A socket that takes 1000 bytes, then would block.
        struct Trickle(usize);
        impl Write for Trickle {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = b.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let e = traffic.write_to(Trickle(1000)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(traffic.wants_write());
        traffic.write_to(io::sink()).unwrap();
        assert!(!traffic.wants_write());
        assert!(traffic.seal(&[IoSlice::new(&big[first..])]).unwrap() > 0);
    }
}
