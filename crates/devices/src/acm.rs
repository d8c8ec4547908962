//! CDC-ACM serial, the user-space twin of the kernel's `f_acm` gadget.
//!
//! The host sees a plain ACM modem (`/dev/ttyACM*` with Linux's cdc-acm
//! driver). What the host writes goes to a [`AcmBackend`]: straight back
//! (Echo), a local pseudo-terminal (Pty) or one TCP client on loopback (Tcp).
//!
//! The device and its backend meet in two bounded [`ByteQueue`]s, so a slow
//! side makes the other wait (the OUT transfer stays pending, as a device
//! NAKs) instead of making memory grow.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use usbwire_proto::{Errno, SetupPacket, Speed};
use usbwire_usb::Request;

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

/// Bytes buffered in each direction between the device and its backend.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Endpoint addresses, the ones `f_acm` ends up with on most controllers.
pub const EP_NOTIFY: u8 = 0x83;
pub const EP_DATA_IN: u8 = 0x81;
pub const EP_DATA_OUT: u8 = 0x02;

/// CDC class requests (CDC PSTN 1.2, table 13).
pub mod request {
    pub const SEND_ENCAPSULATED_COMMAND: u8 = 0x00;
    pub const GET_ENCAPSULATED_RESPONSE: u8 = 0x01;
    pub const SET_LINE_CODING: u8 = 0x20;
    pub const GET_LINE_CODING: u8 = 0x21;
    pub const SET_CONTROL_LINE_STATE: u8 = 0x22;
    pub const SEND_BREAK: u8 = 0x23;
}

/// Largest chunk a bridge task moves at once; a stack buffer of this size
/// lives in each task.
const CHUNK: usize = 4096;

// ---------------------------------------------------------------------------
// ByteQueue: the shared helper.
// ---------------------------------------------------------------------------

/// A bounded byte FIFO between one producer and one consumer that may live
/// on different tasks or threads, each side parking its waker when it cannot
/// make progress. A `std` mutex is enough: it is never held across an await
/// and critical sections are a memcpy.
#[derive(Clone)]
pub(crate) struct ByteQueue {
    inner: Arc<Mutex<QueueState>>,
}

struct QueueState {
    buf: VecDeque<u8>,
    cap: usize,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// Writes are accepted and dropped: nobody is there to read (a TCP
    /// backend with no client), and a serial line without a listener loses
    /// bytes rather than stalling the host's writer forever.
    discard: bool,
}

fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl ByteQueue {
    pub(crate) fn new(cap: usize) -> Self {
        ByteQueue {
            inner: Arc::new(Mutex::new(QueueState {
                buf: VecDeque::new(),
                cap: cap.max(1),
                reader: None,
                writer: None,
                discard: false,
            })),
        }
    }

    /// A poisoned lock only means another thread panicked mid-memcpy; the
    /// queue is still structurally valid, so keep going rather than
    /// propagating the panic into the server.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().buf.len()
    }

    /// Takes up to `out.len()` bytes; pending while empty (an empty `out`
    /// completes at once, since the caller asked for nothing).
    pub(crate) fn poll_read(&self, out: &mut [u8], cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        if out.is_empty() {
            return Poll::Ready(0);
        }
        if s.buf.is_empty() {
            park(&mut s.reader, cx);
            return Poll::Pending;
        }
        let n = out.len().min(s.buf.len());
        let (a, b) = s.buf.as_slices();
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.buf.drain(..n);
        let w = s.writer.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Poll::Ready(n)
    }

    /// Takes the whole of `data` or nothing, so that an OUT transfer is
    /// either accepted or NAKed, never half-done. An empty queue accepts any
    /// size, otherwise a transfer larger than the capacity would wait forever;
    /// the bytes are already in memory, so this does not raise the bound by
    /// more than one transfer.
    pub(crate) fn poll_write_all(&self, data: &[u8], cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        if s.discard {
            if !data.is_empty() {
                tracing::debug!(
                    len = data.len(),
                    "serial: no reader connected, bytes dropped"
                );
            }
            return Poll::Ready(data.len());
        }
        if data.is_empty() {
            return Poll::Ready(0);
        }
        if !s.buf.is_empty() && s.buf.len() + data.len() > s.cap {
            park(&mut s.writer, cx);
            return Poll::Pending;
        }
        s.buf.extend(data);
        let w = s.reader.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Poll::Ready(data.len())
    }

    /// Waits for free space and says how much; a producer then reads at
    /// most that much from its source, so [`ByteQueue::push`] never drops.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.lock();
        let room = s.cap.saturating_sub(s.buf.len());
        if room == 0 {
            park(&mut s.writer, cx);
            return Poll::Pending;
        }
        Poll::Ready(room)
    }

    /// Appends as much of `data` as fits and returns how much that was.
    pub(crate) fn push(&self, data: &[u8]) -> usize {
        let mut s = self.lock();
        let n = data.len().min(s.cap.saturating_sub(s.buf.len()));
        s.buf.extend(&data[..n]);
        let w = if n > 0 { s.reader.take() } else { None };
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        n
    }

    /// Switches discard mode; entering it drops what is buffered (nobody will
    /// ever read it) and releases a waiting writer.
    pub(crate) fn set_discard(&self, discard: bool) {
        let mut s = self.lock();
        s.discard = discard;
        let w = if discard {
            if !s.buf.is_empty() {
                tracing::debug!(
                    len = s.buf.len(),
                    "serial: reader gone, buffered bytes dropped"
                );
            }
            s.buf.clear();
            s.writer.take()
        } else {
            None
        };
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }

    pub(crate) fn clear(&self) {
        let mut s = self.lock();
        s.buf.clear();
        let w = s.writer.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------

/// Where the serial data goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AcmBackend {
    /// Everything the host writes comes back to it.
    #[default]
    Echo,
    /// A local pseudo-terminal: programs on this machine open its slave side.
    Pty,
    /// One TCP client at a time on this address, which must be loopback:
    /// the port is an unauthenticated door into the host's serial port.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmConfig {
    pub backend: AcmBackend,
    /// With the Pty backend, a symlink to create pointing at the slave, so
    /// scripts need not parse `/dev/pts/N`. An existing symlink there is
    /// replaced; any other existing file is an error.
    pub pty_link: Option<PathBuf>,
    /// The iSerialNumber string; distinct values keep udev's
    /// `/dev/serial/by-id` names apart when several are exported.
    pub serial: Option<String>,
}

/// The 7-byte CDC line coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCoding {
    pub rate: u32,
    /// 0 = 1, 1 = 1.5, 2 = 2 stop bits.
    pub stop_bits: u8,
    /// 0 none, 1 odd, 2 even, 3 mark, 4 space.
    pub parity: u8,
    pub data_bits: u8,
}

impl Default for LineCoding {
    fn default() -> Self {
        LineCoding {
            rate: 115_200,
            stop_bits: 0,
            parity: 0,
            data_bits: 8,
        }
    }
}

impl LineCoding {
    pub fn to_bytes(self) -> [u8; 7] {
        let r = self.rate.to_le_bytes();
        [
            r[0],
            r[1],
            r[2],
            r[3],
            self.stop_bits,
            self.parity,
            self.data_bits,
        ]
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 7] = b.get(..7)?.try_into().ok()?;
        Some(LineCoding {
            rate: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            stop_bits: b[4],
            parity: b[5],
            data_bits: b[6],
        })
    }
}

// ---------------------------------------------------------------------------
// The device.
// ---------------------------------------------------------------------------

/// A CDC-ACM serial function.
pub struct CdcAcm {
    descriptors: Descriptors,
    /// Backend to host (IN 0x81). In Echo mode the same queue as `from_host`.
    to_host: ByteQueue,
    /// Host to backend (OUT 0x02).
    from_host: ByteQueue,
    echo: bool,
    line_coding: LineCoding,
    /// Bit 0 DTR, bit 1 RTS, as SET_CONTROL_LINE_STATE sent them.
    control_lines: u16,
    breaks: u64,
    pty_path: Option<PathBuf>,
    pty_link: Option<PathBuf>,
    local_addr: Option<SocketAddr>,
    /// Kept open so that the master never sees a hangup (EIO) when the last
    /// local program closes the slave: the port stays usable across opens.
    _pty_slave: Option<OwnedFd>,
    tasks: Vec<JoinHandle<()>>,
}

impl CdcAcm {
    /// Builds the device and starts its backend. The Pty and Tcp backends
    /// spawn tokio tasks, so they must be created inside a tokio runtime
    /// (any flavour); without one they return an error. Echo needs none.
    pub fn new(cfg: AcmConfig) -> io::Result<CdcAcm> {
        let descriptors = build_descriptors(cfg.serial.as_deref());
        let mut dev = CdcAcm {
            descriptors,
            to_host: ByteQueue::new(BUFFER_SIZE),
            from_host: ByteQueue::new(BUFFER_SIZE),
            echo: false,
            line_coding: LineCoding::default(),
            control_lines: 0,
            breaks: 0,
            pty_path: None,
            pty_link: None,
            local_addr: None,
            _pty_slave: None,
            tasks: Vec::new(),
        };
        match cfg.backend {
            AcmBackend::Echo => {
                dev.echo = true;
                dev.from_host = dev.to_host.clone();
            }
            AcmBackend::Pty => dev.start_pty(cfg.pty_link)?,
            AcmBackend::Tcp(addr) => dev.start_tcp(addr)?,
        }
        Ok(dev)
    }

    /// The slave side of the Pty backend (`/dev/pts/N`).
    pub fn pty_path(&self) -> Option<PathBuf> {
        self.pty_path.clone()
    }

    /// The address the Tcp backend listens on, with the real port when the
    /// configuration asked for port 0.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    pub fn line_coding(&self) -> LineCoding {
        self.line_coding
    }

    /// DTR as the host last set it; cdc-acm raises it when the tty is opened.
    pub fn dtr(&self) -> bool {
        self.control_lines & 1 != 0
    }

    pub fn rts(&self) -> bool {
        self.control_lines & 2 != 0
    }

    /// How many SEND_BREAK requests the host has made.
    pub fn breaks(&self) -> u64 {
        self.breaks
    }

    fn start_pty(&mut self, link: Option<PathBuf>) -> io::Result<()> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let rt = runtime()?;
        let pty = nix::pty::openpty(
            None::<&nix::pty::Winsize>,
            None::<&nix::sys::termios::Termios>,
        )?;
        // The slave starts cooked with ECHO on: what the host sends would be
        // echoed back to it and line-buffered. Raw is what a serial port is.
        for fd in [&pty.slave, &pty.master] {
            let mut t = tcgetattr(fd)?;
            cfmakeraw(&mut t);
            tcsetattr(fd, SetArg::TCSANOW, &t)?;
        }
        let path = nix::unistd::ttyname(&pty.slave)?;
        nix::fcntl::fcntl(
            pty.master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(
                nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_RDWR,
            ),
        )?;
        if let Some(link) = &link {
            make_link(&path, link)?;
        }
        // Two descriptors for the master so that reading and writing each
        // get their own readiness registration. tokio's pipe types do plain
        // non-blocking read(2)/write(2), which is all a pty master needs.
        let master_w = pty.master.try_clone()?;
        let (rx, tx) = {
            let _guard = rt.enter();
            (
                pipe::Receiver::from_owned_fd_unchecked(pty.master)?,
                pipe::Sender::from_owned_fd_unchecked(master_w)?,
            )
        };
        self.tasks
            .push(rt.spawn(pty_to_host(rx, self.to_host.clone())));
        self.tasks
            .push(rt.spawn(host_to_pty(tx, self.from_host.clone())));
        tracing::info!(path = %path.display(), "serial: pty ready");
        self.pty_path = Some(path);
        self.pty_link = link;
        self._pty_slave = Some(pty.slave);
        Ok(())
    }

    fn start_tcp(&mut self, addr: SocketAddr) -> io::Result<()> {
        if !addr.ip().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("serial TCP backend must listen on loopback, not {addr}"),
            ));
        }
        let rt = runtime()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        self.from_host.set_discard(true);
        self.tasks.push(rt.spawn(tcp_serve(
            listener,
            self.to_host.clone(),
            self.from_host.clone(),
        )));
        tracing::info!(%local, "serial: listening");
        self.local_addr = Some(local);
        Ok(())
    }
}

impl Drop for CdcAcm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let (Some(link), Some(path)) = (&self.pty_link, &self.pty_path) {
            // Only remove the link if it is still ours.
            if std::fs::read_link(link).ok().as_deref() == Some(path.as_path()) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
}

fn runtime() -> io::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other("the serial Pty and Tcp backends must be created inside a tokio runtime")
    })
}

fn make_link(target: &Path, link: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", link.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, link)
}

async fn pty_to_host(mut master: pipe::Receiver, to_host: ByteQueue) {
    let mut tmp = [0u8; CHUNK];
    loop {
        let room = poll_fn(|cx| to_host.poll_room(cx)).await;
        match master.read(&mut tmp[..room.min(CHUNK)]).await {
            Ok(0) => {
                // Cannot happen while we hold the slave open; do not spin.
                tracing::warn!("serial: pty master reached end of file");
                return;
            }
            Ok(n) => {
                to_host.push(&tmp[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "serial: pty read failed");
                return;
            }
        }
    }
}

async fn host_to_pty(mut master: pipe::Sender, from_host: ByteQueue) {
    let mut tmp = [0u8; CHUNK];
    loop {
        let n = poll_fn(|cx| from_host.poll_read(&mut tmp, cx)).await;
        if let Err(e) = master.write_all(&tmp[..n]).await {
            tracing::warn!(error = %e, "serial: pty write failed");
            return;
        }
    }
}

async fn tcp_serve(listener: tokio::net::TcpListener, to_host: ByteQueue, from_host: ByteQueue) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "serial: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tracing::info!(%peer, "serial: client connected");
        from_host.set_discard(false);
        tcp_client(stream, &listener, &to_host, &from_host).await;
        from_host.set_discard(true);
        tracing::info!(%peer, "serial: client disconnected");
    }
}

async fn tcp_client(
    stream: tokio::net::TcpStream,
    listener: &tokio::net::TcpListener,
    to_host: &ByteQueue,
    from_host: &ByteQueue,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let up = async {
        let mut tmp = [0u8; CHUNK];
        loop {
            let room = poll_fn(|cx| to_host.poll_room(cx)).await;
            match rd.read(&mut tmp[..room.min(CHUNK)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    to_host.push(&tmp[..n]);
                }
            }
        }
    };
    let down = async {
        let mut tmp = [0u8; CHUNK];
        loop {
            let n = poll_fn(|cx| from_host.poll_read(&mut tmp, cx)).await;
            if wr.write_all(&tmp[..n]).await.is_err() {
                return;
            }
        }
    };
    // One client at a time: a second one is told so by being closed at
    // once, rather than left hanging in the backlog.
    let refuse = async {
        loop {
            match listener.accept().await {
                Ok((s, peer)) => {
                    tracing::info!(%peer, "serial: already have a client, refusing");
                    drop(s);
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = refuse => {}
    }
}

fn build_descriptors(serial: Option<&str>) -> Descriptors {
    let speed = Speed::High;
    let bulk = descriptors::bulk_max_packet(speed);
    let mut body = Vec::with_capacity(80);
    body.extend_from_slice(&descriptors::interface(0, 0, 1, 0x02, 0x02, 0x01, 0));
    // Header, bcdCDC 1.10.
    body.extend_from_slice(&[5, 0x24, 0x00, 0x10, 0x01]);
    // Call Management: no call management, data interface 1.
    body.extend_from_slice(&[5, 0x24, 0x01, 0x00, 0x01]);
    // ACM: line coding/serial state (0x02) and SEND_BREAK (0x04).
    body.extend_from_slice(&[4, 0x24, 0x02, 0x06]);
    // Union: master 0, slave 1.
    body.extend_from_slice(&[5, 0x24, 0x06, 0x00, 0x01]);
    // 10-byte SERIAL_STATE notifications every 32 ms (2^(9-1) microframes),
    // the values f_acm uses.
    body.extend_from_slice(&descriptors::endpoint(
        EP_NOTIFY,
        TransferType::Interrupt,
        10,
        9,
    ));
    body.extend_from_slice(&descriptors::interface(1, 0, 2, 0x0a, 0, 0, 0));
    body.extend_from_slice(&descriptors::endpoint(
        EP_DATA_IN,
        TransferType::Bulk,
        bulk,
        0,
    ));
    body.extend_from_slice(&descriptors::endpoint(
        EP_DATA_OUT,
        TransferType::Bulk,
        bulk,
        0,
    ));
    Descriptors::new(
        speed,
        DeviceDescriptor {
            usb_version: 0x0200,
            class: 0x02,
            subclass: 0,
            protocol: 0,
            max_packet_size0: 64,
            vendor_id: 0x0525,
            product_id: 0xa4a7,
            device_version: 0x0100,
            manufacturer: Some("usbwire".into()),
            product: Some("usbwire serial".into()),
            serial: Some(serial.unwrap_or("0001").into()),
        },
        0,
        100,
        &body,
        &[],
    )
}

impl Function for CdcAcm {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control_in(&mut self, setup: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        if !is_acm_request(setup) {
            return None;
        }
        match setup.request {
            request::GET_LINE_CODING => {
                let b = self.line_coding.to_bytes();
                let n = crate::core::reply(&b, buf);
                Some(Ok(n))
            }
            _ => None,
        }
    }

    fn control_out(&mut self, setup: &SetupPacket, data: &[u8]) -> Option<Result<(), Errno>> {
        if !is_acm_request(setup) {
            return None;
        }
        match setup.request {
            request::SET_LINE_CODING => Some(match LineCoding::from_bytes(data) {
                Some(lc) if data.len() == 7 => {
                    tracing::debug!(?lc, "serial: line coding");
                    self.line_coding = lc;
                    Ok(())
                }
                _ => Err(Errno::EPIPE),
            }),
            request::SET_CONTROL_LINE_STATE => {
                self.control_lines = setup.value & 3;
                tracing::debug!(dtr = self.dtr(), rts = self.rts(), "serial: control lines");
                Some(Ok(()))
            }
            request::SEND_BREAK => {
                self.breaks = self.breaks.saturating_add(1);
                tracing::debug!(ms = setup.value, "serial: break");
                Some(Ok(()))
            }
            _ => None,
        }
    }

    fn transfer_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match ep {
            EP_DATA_IN => self.to_host.poll_read(buf, cx).map(Ok),
            // No SERIAL_STATE changes to report, ever: the URB waits, as on
            // a real modem with no carrier changes.
            EP_NOTIFY => Poll::Pending,
            _ => Poll::Ready(Err(Errno::EPIPE)),
        }
    }

    fn transfer_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match ep {
            EP_DATA_OUT => self.from_host.poll_write_all(data, cx).map(Ok),
            _ => Poll::Ready(Err(Errno::EPIPE)),
        }
    }

    fn reset(&mut self) {
        self.control_lines = 0;
        // An echo in flight is pending work of this device; bytes from a
        // pty or TCP client belong to the other side and are kept.
        if self.echo {
            self.to_host.clear();
        }
    }
}

/// A class request to the communication interface (interface 0).
fn is_acm_request(s: &SetupPacket) -> bool {
    Request::from(s).class_to_interface(0).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EmulatedDevice;
    use crate::test_util::{setup, CountWaker};
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn counting() -> (Arc<CountWaker>, Waker) {
        let c = Arc::new(CountWaker(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    fn configured(acm: CdcAcm) -> EmulatedDevice {
        let mut dev = EmulatedDevice::new(acm);
        dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
        dev
    }

    fn walk(b: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 2 <= b.len() && b[at] >= 2 && at + b[at] as usize <= b.len() {
            out.push(&b[at..at + b[at] as usize]);
            at += b[at] as usize;
        }
        out
    }

    #[test]
    fn descriptors_have_two_interfaces_and_union() {
        let mut dev = EmulatedDevice::new(CdcAcm::new(AcmConfig::default()).unwrap());
        let mut buf = [0u8; 512];
        let n = dev
            .control(&setup(0x80, 6, 0x0100, 0, 18), &[], &mut buf)
            .unwrap();
        assert_eq!(n, 18);
        assert_eq!(buf[4], 0x02, "device class CDC");
        assert_eq!(&buf[8..12], &[0x25, 0x05, 0xa7, 0xa4]);
        let n = dev
            .control(&setup(0x80, 6, 0x0200, 0, 512), &[], &mut buf)
            .unwrap();
        let cfg = &buf[..n];
        assert_eq!(u16::from_le_bytes([cfg[2], cfg[3]]) as usize, n);
        assert_eq!(cfg[4], 2, "bNumInterfaces");
        let ds = walk(cfg);
        let ifaces: Vec<_> = ds.iter().filter(|d| d[1] == 4).collect();
        assert_eq!(ifaces.len(), 2);
        assert_eq!(&ifaces[0][5..8], &[2, 2, 1]);
        assert_eq!(ifaces[1][5], 0x0a);
        let cs: Vec<_> = ds.iter().filter(|d| d[1] == 0x24).collect();
        assert_eq!(
            cs.iter().map(|d| d[2]).collect::<Vec<_>>(),
            vec![0, 1, 2, 6]
        );
        assert_eq!(cs[3][3..5], [0, 1], "union master 0 slave 1");
        let eps: Vec<_> = ds
            .iter()
            .filter(|d| d[1] == 5)
            .map(|d| (d[2], d[3]))
            .collect();
        assert_eq!(eps, vec![(0x83, 3), (0x81, 2), (0x02, 2)]);
        // At full speed: f_acm's 32 ms notifications and 64-byte bulk packets.
        let mut other = [0u8; 512];
        let m = dev
            .control(&setup(0x80, 6, 0x0700, 0, 512), &[], &mut other)
            .unwrap();
        assert_eq!((m, other[1]), (n, 7));
        let eps: Vec<_> = walk(&other[..m])
            .iter()
            .filter(|d| d[1] == 5)
            .map(|d| (d[2], u16::from_le_bytes([d[4], d[5]]), d[6]))
            .collect();
        assert_eq!(eps, vec![(0x83, 10, 32), (0x81, 64, 0), (0x02, 64, 0)]);
        // The product string.
        let n = dev
            .control(&setup(0x80, 6, 0x0302, 0x0409, 255), &[], &mut buf)
            .unwrap();
        let s: Vec<u16> = buf[2..n]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(String::from_utf16(&s).unwrap(), "usbwire serial");
    }

    #[test]
    fn line_coding_and_control_lines() {
        let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
        let mut buf = [0u8; 7];
        let get = setup(0xa1, request::GET_LINE_CODING, 0, 0, 7);
        assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
        assert_eq!(LineCoding::from_bytes(&buf), Some(LineCoding::default()));
        assert_eq!(buf, [0x00, 0xc2, 0x01, 0x00, 0, 0, 8]);

        let lc = LineCoding {
            rate: 9600,
            stop_bits: 2,
            parity: 2,
            data_bits: 7,
        };
        let set = setup(0x21, request::SET_LINE_CODING, 0, 0, 7);
        assert_eq!(dev.control(&set, &lc.to_bytes(), &mut []), Ok(7));
        assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
        assert_eq!(LineCoding::from_bytes(&buf), Some(lc));
        // A short data stage is refused and changes nothing.
        assert_eq!(dev.control(&set, &[1, 2, 3], &mut []), Err(Errno::EPIPE));
        assert_eq!(dev.control(&get, &[], &mut buf), Ok(7));
        assert_eq!(LineCoding::from_bytes(&buf), Some(lc));

        let cls = setup(0x21, request::SET_CONTROL_LINE_STATE, 3, 0, 0);
        assert_eq!(dev.control(&cls, &[], &mut []), Ok(0));
        assert_eq!(
            dev.control(&setup(0x21, request::SEND_BREAK, 50, 0, 0), &[], &mut []),
            Ok(0)
        );
        // Unknown class request, and one aimed at the data interface: STALL.
        assert_eq!(
            dev.control(&setup(0x21, 0x42, 0, 0, 0), &[], &mut []),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            dev.control(&get.with_index(1), &[], &mut buf),
            Err(Errno::EPIPE)
        );

        let mut acm = CdcAcm::new(AcmConfig::default()).unwrap();
        assert_eq!(acm.control_out(&cls, &[]), Some(Ok(())));
        assert!(acm.dtr() && acm.rts());
        acm.control_out(&setup(0x21, request::SET_CONTROL_LINE_STATE, 1, 0, 0), &[]);
        assert!(acm.dtr() && !acm.rts());
        assert_eq!(acm.control_out(&setup(0x21, 0x50, 0, 0, 0), &[]), None);
        assert_eq!(acm.control_in(&setup(0xa1, 0x50, 0, 0, 4), &mut buf), None);
    }

    trait WithIndex {
        fn with_index(self, i: u16) -> Self;
    }
    impl WithIndex for SetupPacket {
        fn with_index(mut self, i: u16) -> Self {
            self.index = i;
            self
        }
    }

    #[test]
    fn echo_round_trip_pending_and_wake() {
        let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 512];
        assert!(dev.poll_in(EP_DATA_IN, &mut buf, &mut cx).is_pending());
        assert!(dev.poll_in(EP_NOTIFY, &mut buf[..10], &mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert_eq!(
            dev.poll_out(EP_DATA_OUT, b"hello", &mut cx),
            Poll::Ready(Ok(5))
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the pending IN was woken"
        );
        // A short read takes part, then the rest.
        assert_eq!(
            dev.poll_in(EP_DATA_IN, &mut buf[..3], &mut cx),
            Poll::Ready(Ok(3))
        );
        assert_eq!(&buf[..3], b"hel");
        assert_eq!(
            dev.poll_in(EP_DATA_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(2))
        );
        assert_eq!(&buf[..2], b"lo");
        assert!(dev.poll_in(EP_DATA_IN, &mut buf, &mut cx).is_pending());
        // The notification endpoint never completes empty.
        assert!(dev.poll_in(EP_NOTIFY, &mut buf[..10], &mut cx).is_pending());
    }

    #[test]
    fn backpressure_when_full() {
        let mut dev = configured(CdcAcm::new(AcmConfig::default()).unwrap());
        let (count, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let chunk = vec![0x5a; 16 * 1024];
        for _ in 0..BUFFER_SIZE / chunk.len() {
            assert_eq!(
                dev.poll_out(EP_DATA_OUT, &chunk, &mut cx),
                Poll::Ready(Ok(chunk.len()))
            );
        }
        assert!(dev.poll_out(EP_DATA_OUT, b"x", &mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        let mut buf = [0u8; 1];
        assert_eq!(
            dev.poll_in(EP_DATA_IN, &mut buf, &mut cx),
            Poll::Ready(Ok(1))
        );
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the pending OUT was woken"
        );
        assert_eq!(dev.poll_out(EP_DATA_OUT, b"x", &mut cx), Poll::Ready(Ok(1)));
        assert!(dev.poll_out(EP_DATA_OUT, b"y", &mut cx).is_pending());
    }

    #[test]
    fn oversized_out_is_accepted_when_empty() {
        let q = ByteQueue::new(8);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert_eq!(q.poll_write_all(&[1; 20], &mut cx), Poll::Ready(20));
        assert!(q.poll_write_all(&[2], &mut cx).is_pending());
        assert!(q.poll_room(&mut cx).is_pending());
        let mut out = [0u8; 32];
        assert_eq!(q.poll_read(&mut out, &mut cx), Poll::Ready(20));
        assert_eq!(q.push(&[3; 20]), 8, "push stops at the capacity");
        assert_eq!(q.len(), 8);
        q.set_discard(true);
        assert_eq!(q.len(), 0);
        assert_eq!(q.poll_write_all(&[4; 100], &mut cx), Poll::Ready(100));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn tcp_refuses_non_loopback() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let cfg = AcmConfig {
            backend: AcmBackend::Tcp("0.0.0.0:0".parse().unwrap()),
            ..Default::default()
        };
        let err = CdcAcm::new(cfg).err().expect("must refuse");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn pty_and_tcp_need_a_runtime() {
        let cfg = AcmConfig {
            backend: AcmBackend::Tcp("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        assert!(CdcAcm::new(cfg).is_err());
        let cfg = AcmConfig {
            backend: AcmBackend::Pty,
            ..Default::default()
        };
        assert!(CdcAcm::new(cfg).is_err());
    }

    /// Polls `dev` IN until `want` bytes arrived, driving it the way the
    /// server does: re-poll only after a wake (or a short timeout).
    async fn read_in(dev: &mut EmulatedDevice, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out, got {got:?}"
            );
            let mut buf = [0u8; 512];
            let r = tokio::time::timeout(
                Duration::from_millis(200),
                poll_fn(|cx| dev.poll_in(EP_DATA_IN, &mut buf, cx)),
            )
            .await;
            if let Ok(r) = r {
                let n = r.unwrap();
                assert!(n > 0, "IN must not complete empty");
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    }

    async fn write_out(dev: &mut EmulatedDevice, data: &[u8]) {
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            poll_fn(|cx| dev.poll_out(EP_DATA_OUT, data, cx)),
        )
        .await
        .expect("OUT timed out")
        .unwrap();
        assert_eq!(n, data.len());
    }

    #[tokio::test]
    async fn tcp_backend_bridges_both_ways() {
        use tokio::net::TcpStream;
        let cfg = AcmConfig {
            backend: AcmBackend::Tcp("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let acm = CdcAcm::new(cfg).unwrap();
        let addr = acm.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        let mut dev = configured(acm);

        // Without a client, host bytes are dropped, not queued.
        write_out(&mut dev, b"lost").await;

        let t = Duration::from_secs(5);
        let mut client = tokio::time::timeout(t, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        client.write_all(b"from client").await.unwrap();
        assert_eq!(read_in(&mut dev, 11).await, b"from client");

        // The accept may lag the connect; retry the OUT until the client sees it.
        let mut got = Vec::new();
        for _ in 0..50 {
            write_out(&mut dev, b"ping").await;
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await
            {
                got.extend_from_slice(&buf[..n]);
                break;
            }
        }
        assert!(got.starts_with(b"ping"), "client got {got:?}");
        assert!(!got.windows(4).any(|w| w == b"lost"));

        // A second client is turned away while the first is connected.
        let mut second = tokio::time::timeout(t, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(t, second.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "second client must be closed");

        // After the first leaves, a new client is served.
        drop(client);
        let mut third = None;
        for _ in 0..50 {
            let mut c = tokio::time::timeout(t, TcpStream::connect(addr))
                .await
                .unwrap()
                .unwrap();
            c.write_all(b"3").await.unwrap();
            let mut b = [0u8; 1];
            // Refused connections get closed; a served one stays open.
            match tokio::time::timeout(Duration::from_millis(100), c.read(&mut b)).await {
                Err(_) => {
                    third = Some(c);
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert!(third.is_some(), "no client accepted after the first left");
        assert_eq!(read_in(&mut dev, 1).await, b"3");
    }

    #[tokio::test]
    async fn pty_backend_bridges_both_ways() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ttyUSBWIRE");
        let cfg = AcmConfig {
            backend: AcmBackend::Pty,
            pty_link: Some(link.clone()),
            ..Default::default()
        };
        let acm = CdcAcm::new(cfg).unwrap();
        let path = acm.pty_path().unwrap();
        assert!(path.starts_with("/dev/pts"), "{path:?}");
        assert_eq!(std::fs::read_link(&link).unwrap(), path);
        let mut dev = configured(acm);

        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&link)
            .unwrap();
        (&slave).write_all(b"from pty\n").unwrap();
        assert_eq!(read_in(&mut dev, 9).await, b"from pty\n");

        write_out(&mut dev, b"to pty").await;
        // The slave is non-blocking so that this bounded loop cannot hang.
        let mut got = Vec::new();
        for _ in 0..500 {
            let mut buf = [0u8; 64];
            match (&slave).read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("slave read: {e}"),
            }
            if got.len() >= 6 {
                break;
            }
        }
        assert_eq!(got, b"to pty");
        // Raw mode: the host's bytes were not echoed back to it.
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(
            Duration::from_millis(200),
            poll_fn(|cx| dev.poll_in(EP_DATA_IN, &mut buf, cx)),
        )
        .await;
        assert!(r.is_err(), "unexpected echo: {r:?}");

        drop(dev);
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "link removed on drop"
        );
    }
}
