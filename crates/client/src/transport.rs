//! What the tokio driver moves bytes through: a plain `TcpStream`, or a
//! `TcpStream` with a rustls [`ClientConnection`] between it and the
//! protocol cores. The cores and their one decode loop stay the same;
//! only this layer knows whether the bytes are encrypted.

use std::future::Future;
use std::io::{self, IoSlice, Read, Write};

use rustls::ClientConnection;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use usbwire_tls::TryIo;

use crate::tls::TlsError;

/// A non-blocking byte stream with readiness, as `TcpStream` offers it.
/// `try_*` return `WouldBlock` when the caller should wait for readiness.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Resolves when [`Transport::try_read`] may make progress.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Resolves when the socket takes bytes.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Application bytes; `Ok(0)` is the end of the stream.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Application bytes taken, to go out now or in [`Transport::flush_pending`].
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Whether the transport holds bytes of its own for the socket (TLS records).
    fn wants_write(&self) -> bool;
    /// Writes what [`Transport::wants_write`] says is held, as far as the socket takes it.
    fn flush_pending(&mut self) -> io::Result<()>;
    /// Ends the stream in the way the peer expects (close_notify for TLS).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

impl Transport for TcpStream {
    async fn readable(&self) -> io::Result<()> {
        TcpStream::readable(self).await
    }
    async fn writable(&self) -> io::Result<()> {
        TcpStream::writable(self).await
    }
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
    fn wants_write(&self) -> bool {
        false
    }
    fn flush_pending(&mut self) -> io::Result<()> {
        Ok(())
    }
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

/// Wraps a TLS failure so that it crosses `io::Error` and comes out typed
/// in [`crate::ClientError::Tls`].
pub(crate) fn tls_io_error(e: TlsError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TLS client session over a TCP socket, driven without blocking.
pub(crate) struct TlsTransport {
    stream: TcpStream,
    tls: ClientConnection,
    /// Decrypted bytes wait in rustls: the socket need not become readable
    /// for [`Transport::try_read`] to make progress.
    plaintext_waiting: bool,
}

impl TlsTransport {
    pub(crate) fn new(stream: TcpStream, tls: ClientConnection) -> Self {
        TlsTransport {
            stream,
            tls,
            plaintext_waiting: false,
        }
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Reads one batch of records from the socket and decrypts it.
    fn receive(&mut self) -> io::Result<()> {
        let read = self.tls.read_tls(&mut TryIo(&self.stream));
        records_read(read, self.tls.is_handshaking())?;
        let processed = self.tls.process_new_packets();
        // Alerts rustls queued on failure, handshake records on success:
        // sent as far as the socket takes them now, the rest when writable.
        let _ = self.flush_pending();
        let state = processed.map_err(|e| tls_io_error(TlsError::from_rustls(e)))?;
        // A socket that ended without close_notify: reader() says
        // UnexpectedEof, which the caller sees as a lost peer.
        self.plaintext_waiting = state.plaintext_bytes_to_read() > 0;
        Ok(())
    }
}

impl Transport for TlsTransport {
    async fn readable(&self) -> io::Result<()> {
        if self.plaintext_waiting {
            return Ok(());
        }
        self.stream.readable().await
    }
    async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
    }
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Bounded: at most one receive between two attempts to take plaintext.
        for _ in 0..2 {
            match self.tls.reader().read(buf) {
                Ok(n) => {
                    if n < buf.len() {
                        self.plaintext_waiting = false;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext_waiting = false;
                }
                Err(e) => return Err(e),
            }
            self.receive()?;
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Records already made go first, so that rustls' buffer has room.
        match self.flush_pending() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        let taken = self.tls.writer().write_vectored(bufs)?;
        let _ = self.flush_pending();
        if taken == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }
    fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }
    fn flush_pending(&mut self) -> io::Result<()> {
        // Bounded: each write takes at least one byte of what rustls holds.
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut TryIo(&self.stream))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
    async fn shutdown(&mut self) {
        self.tls.send_close_notify();
        // Bounded by what rustls holds; a socket that stops taking bytes
        // fails the write and ends the loop.
        while self.tls.wants_write() {
            match self.flush_pending() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.stream.writable().await.is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = AsyncWriteExt::shutdown(&mut self.stream).await;
    }
}

/// What reading the server's records came to: a close, or a reset, during
/// the handshake is the server's refusal. A server that does not speak
/// TLS may answer a ClientHello with a reset rather than an orderly close;
/// to the person it is the same refusal.
pub(crate) fn records_read(read: io::Result<usize>, handshaking: bool) -> io::Result<usize> {
    match read {
        Ok(0) if handshaking => Err(tls_io_error(TlsError::ClosedDuringHandshake)),
        Err(e) if handshaking && is_reset(&e) => Err(tls_io_error(TlsError::ClosedDuringHandshake)),
        read => read,
    }
}

/// The peer dropped the connection without an orderly close.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}
