//! The tokio driver: runs an [`OpSession`] and then an [`UrbSession`] over
//! a [`Transport`], and answers their events from the registry.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};
use usbwire_proto::BusId;

use super::{OpEvent, OpSession, SessionConfig, UrbSession};
use crate::registry::Importer;
use crate::{ServerState, SessionError};

/// Replies per vectored write, at most: a fixed array, so no allocation
/// per write, and up to 64 header-only replies per system call.
const MAX_SLICES: usize = 64;

/// What carries an import's bytes: something that reads into buffers and
/// writes `IoSlice`s, readiness-based like a non-blocking socket.
pub(crate) trait Transport {
    fn readable(&self) -> impl Future<Output = io::Result<()>>;
    fn writable(&self) -> impl Future<Output = io::Result<()>>;
    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl Transport for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> {
        TcpStream::readable(self)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> {
        TcpStream::writable(self)
    }
    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        TcpStream::try_read_vectored(self, bufs)
    }
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
}

/// Serves one connection: its OP request, and the import that may follow.
pub(crate) async fn serve(
    mut stream: TcpStream,
    state: Arc<ServerState>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let _ = stream.set_nodelay(true);
    let mut op = OpSession::new(Instant::now());
    let request = tokio::select! {
        r = read_request(&stream, &mut op) => r,
        _ = shutdown.changed() => return Ok(()),
    };
    let event = match request {
        Ok(Some(event)) => event,
        Ok(None) => return Ok(()),
        Err(e) => {
            // A parting reply (to an unknown request), best effort.
            let _ = stream.write_all(op.poll_transmit()).await;
            return Err(e);
        }
    };
    match event {
        OpEvent::DevlistRequested => {
            op.answer_devlist(state.registry.devlist());
            stream.write_all(op.poll_transmit()).await?;
            let _ = stream.shutdown().await;
            Ok(())
        }
        OpEvent::ImportRequested(busid) => import(stream, op, busid, state, conn, shutdown).await,
    }
}

/// Reads the OP request. `None` if the peer closed first.
async fn read_request(
    stream: &TcpStream,
    op: &mut OpSession,
) -> Result<Option<OpEvent>, SessionError> {
    loop {
        let deadline = tokio::time::Instant::from_std(op.poll_timeout());
        tokio::select! {
            r = stream.readable() => r?,
            () = tokio::time::sleep_until(deadline) => {
                op.handle_timeout(Instant::now())?;
                continue;
            }
        }
        match stream.try_read(op.read_buffer()) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                if let Some(event) = op.input_filled(n)? {
                    return Ok(Some(event));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

async fn import(
    mut stream: TcpStream,
    mut op: OpSession,
    busid: BusId,
    state: Arc<ServerState>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let (importer, end) = match Importer::new(conn, &stream) {
        Ok(x) => x,
        Err(e) => {
            // Out of descriptors, or the client is gone already.
            warn!(conn, %busid, "cannot take the import: {e}");
            return Err(e.into());
        }
    };
    let imported = tokio::select! {
        r = state.registry.import(&busid, importer, state.config.import_wait) => r,
        _ = shutdown.changed() => return Ok(()),
    };
    let (info, backend) = match imported {
        Ok(x) => x,
        Err(e) => {
            info!(conn, %busid, "import refused: {e}");
            op.refuse_import(e.op_status());
            stream.write_all(op.poll_transmit()).await?;
            return Ok(());
        }
    };
    // It named an exported device: from here on, that device's name.
    let busid = busid.to_string();
    op.accept_import(info);
    if let Err(e) = stream.write_all(op.poll_transmit()).await {
        state.release(&busid, conn, backend).await;
        return Err(e.into());
    }
    info!(conn, %busid, "imported");
    let config = SessionConfig::new(&state.config, crate::sys::rtt(&stream));
    tracing::debug!(grace = ?config.hold_grace, "error hold grace window");
    let wake = Arc::new(SessionWake(Notify::new()));
    let client = stream
        .peer_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    let mut session = UrbSession::new(
        config,
        backend,
        Waker::from(wake.clone()),
        &busid,
        client,
        Instant::now(),
    );
    let r = tokio::select! {
        r = run(&stream, &mut session, &wake, &mut shutdown) => r,
        () = end.requested() => {
            info!(conn, %busid, "import ended from outside");
            Ok(())
        }
    };
    state.registry.ending(&busid, conn);
    // Nothing more goes to this client: it sees the close now, not
    // after the device has been reset.
    drop(stream);
    state.release(&busid, conn, session.into_backend()).await;
    info!(conn, %busid, "released");
    r
}

/// Wakes the driver when a backend can make progress.
struct SessionWake(Notify);

impl Wake for SessionWake {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

/// Runs an import's URB phase over `transport` until the peer closes, the
/// device goes away or the server shuts down.
async fn run(
    transport: &impl Transport,
    session: &mut UrbSession,
    wake: &SessionWake,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut eof = false;
    loop {
        if session.has_output() {
            write_some(transport, session)?;
        }
        if eof {
            return Ok(());
        }
        if session.poll_device_gone() {
            return Ok(());
        }
        let want_read = session.wants_input();
        let want_write = session.has_output();
        let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            // Fixed order: no random draw per turn, and input first.
            biased;
            r = transport.readable(), if want_read => {
                r?;
                let read = transport.try_read_vectored(&mut session.read_buffers());
                match read {
                    Ok(0) => eof = true,
                    Ok(n) => session.input_filled(Instant::now(), n)?,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            r = transport.writable(), if want_write => r?,
            () = wake.0.notified() => session.poll_backend(Instant::now())?,
            () = sleep_until_opt(deadline), if deadline.is_some() => {
                session.handle_timeout(Instant::now());
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Writes as much of the session's output as the transport takes now,
/// many replies per system call.
fn write_some(transport: &impl Transport, session: &mut UrbSession) -> Result<(), SessionError> {
    while session.has_output() {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let used = session.poll_transmit(&mut slices);
        let n = match transport.try_write_vectored(&slices[..used]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        session.transmitted(Instant::now(), n)?;
    }
    Ok(())
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
