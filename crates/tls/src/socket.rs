use std::io::{self, IoSlice, Read, Write};

use tokio::net::TcpStream;

/// `std::io` over a non-blocking tokio socket, for rustls' `read_tls` and
/// `write_tls`: `WouldBlock` means wait for the socket's readiness.
pub struct TryIo<'a>(pub &'a TcpStream);

impl Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TryIo<'_> {
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
