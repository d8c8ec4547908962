//! The tokio driver: runs an [`OpSession`] and then an [`UrbSession`] over
//! a [`Transport`], and answers their events from the registry.

use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};
use usbwire_proto::{BusId, OpStatus};
use usbwire_usb::{KernelHandoff, KernelState};

use super::{OpEvent, OpSession, SessionConfig, UrbSession};
use crate::abuse::Refusal;
use crate::acl::{self, ClientIdentity, Peer, Policy};
use crate::registry::{Importer, RegistryError};
use crate::tls::{KernelTls, TlsStream, UrbCarrier, TLS_HANDSHAKE_RECORD};
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
    /// Whether bytes the transport took still wait for the socket (TLS
    /// records).
    fn wants_flush(&self) -> bool {
        false
    }
    /// Sends what [`Transport::wants_flush`] reports; `WouldBlock` if some
    /// remains.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    /// Queues the transport's own end-of-stream message, if it has one.
    fn close(&self) {}
    /// The TCP connection underneath.
    fn socket(&self) -> &TcpStream;
    /// What carries the URB phase that follows a successful import: this
    /// transport, or kernel TLS in its place.
    fn urb_carrier(self, _kernel: KernelTls) -> impl Future<Output = UrbCarrier<Self>>
    where
        Self: Sized,
    {
        async move { UrbCarrier::Same(self) }
    }
    /// What protects the bytes, for the log.
    fn carrier(&self) -> String {
        "plaintext".into()
    }
    /// Whether what is written to the socket underneath is what the peer
    /// reads (plaintext, or TLS the kernel runs below the socket): only
    /// such a socket can be handed to a kernel driver.
    fn kernel_may_hold(&self) -> bool {
        false
    }
    /// Whether [`Transport::urb_carrier`] with [`KernelTls::On`] will give
    /// a socket a kernel driver may hold, asked before the import is
    /// answered so that a client this cannot serve gets a status: why not.
    fn kernel_carrier_possible(
        &self,
        _kernel: KernelTls,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async { Err("this transport cannot be handed to the kernel".into()) }
    }
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
    fn socket(&self) -> &TcpStream {
        self
    }
    fn kernel_may_hold(&self) -> bool {
        true
    }
    async fn kernel_carrier_possible(&self, _kernel: KernelTls) -> Result<(), String> {
        Ok(())
    }
}

/// Serves one connection: TLS or plaintext by its first byte, as the
/// server's access policy allows, then its OP request and the import that
/// may follow.
pub(crate) async fn serve(
    stream: TcpStream,
    state: Arc<ServerState>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr()?;
    // The OP deadline runs from here: peeking is part of the OP phase.
    let started = Instant::now();
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(super::OP_TIMEOUT, stream.peek(&mut first)) => r,
        _ = shutdown.changed() => return Ok(()),
    };
    match peeked {
        Err(_) => return Err(SessionError::Timeout),
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.into()),
    }
    let access = &state.config.access;
    if first[0] == TLS_HANDSHAKE_RECORD {
        let Some(tls) = access.tls.clone() else {
            if state.refusals.count(peer.ip(), Refusal::RefusedConnection) {
                warn!(
                    conn, %peer,
                    "refused a TLS connection: this server has no TLS configured \
                     (start it with --tls-cert, --tls-key and --tls-client-ca, or connect without TLS)"
                );
            }
            return Ok(());
        };
        let stream = match TlsStream::new(stream, tls, conn) {
            Ok(s) => s,
            Err(e) => {
                warn!(conn, %peer, "cannot start a TLS session: {e}");
                return Ok(());
            }
        };
        let accepted = tokio::select! {
            r = stream.accept(state.config.tls_handshake_timeout) => r,
            _ = shutdown.changed() => return Ok(()),
        };
        state.metrics.tls_handshake(accepted.is_ok());
        if let Err(e) = accepted {
            if state.refusals.count(peer.ip(), Refusal::FailedHandshake) {
                warn!(conn, %peer, "refused a TLS connection: {e}");
            }
            stream.send_alert();
            return Ok(());
        }
        let peer = Peer {
            addr: peer,
            tls: stream
                .peer_certificate()
                .map(|cert| ClientIdentity::of(&cert, &state.config.acl.pinned)),
        };
        info!(conn, client = %peer, "TLS client authenticated");
        return serve_on(stream, Instant::now(), state, conn, peer, shutdown).await;
    }
    if !access.plaintext_allowed(peer.ip()) {
        if state.refusals.count(peer.ip(), Refusal::RefusedConnection) {
            warn!(
                conn, %peer,
                "refused a plaintext connection: this server requires TLS; \
                 to let this source use plaintext, add --allow-plaintext {}/{}",
                peer.ip().to_canonical(),
                if peer.ip().to_canonical().is_ipv4() { 32 } else { 128 }
            );
        }
        return Ok(());
    }
    serve_on(
        stream,
        started,
        state,
        conn,
        Peer::plaintext(peer),
        shutdown,
    )
    .await
}

async fn serve_on(
    stream: impl Transport,
    started: Instant,
    state: Arc<ServerState>,
    conn: u64,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut op = OpSession::new(started);
    let request = tokio::select! {
        r = read_request(&stream, &mut op) => r,
        _ = shutdown.changed() => return Ok(()),
    };
    let event = match request {
        Ok(Some(event)) => event,
        Ok(None) => return Ok(()),
        Err(e) => {
            // A parting reply (to an unknown request), best effort.
            let _ = write_all(&stream, op.poll_transmit()).await;
            return Err(e);
        }
    };
    match event {
        OpEvent::DevlistRequested => {
            let policy = state.config.acl.policy.current();
            state.registry.refresh().await;
            let mut devices = state.registry.devlist();
            let exported = devices.len();
            devices.retain(|d| policy.allows(&peer, d));
            debug!(
                conn, client = %peer,
                "device list: {} of {exported} available device(s) granted",
                devices.len()
            );
            op.answer_devlist(devices);
            write_all(&stream, op.poll_transmit()).await?;
            stream.close();
            write_all(&stream, &[]).await?;
            let _ = socket2::SockRef::from(stream.socket()).shutdown(std::net::Shutdown::Write);
            Ok(())
        }
        OpEvent::ImportRequested(busid) => {
            import(stream, op, busid, state, conn, peer, shutdown).await
        }
    }
}

/// Writes all of `bytes` and whatever the transport still holds.
async fn write_all(transport: &impl Transport, mut bytes: &[u8]) -> io::Result<()> {
    // Bounded by the bytes to send: every turn sends some or waits.
    loop {
        if !bytes.is_empty() {
            match transport.try_write_vectored(&[IoSlice::new(bytes)]) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        } else {
            match transport.flush() {
                Ok(()) if !transport.wants_flush() => return Ok(()),
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if !bytes.is_empty() || transport.wants_flush() {
            transport.writable().await?;
        }
    }
}

/// Reads the OP request. `None` if the peer closed first.
async fn read_request(
    stream: &impl Transport,
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
        match stream.try_read_vectored(&mut [IoSliceMut::new(op.read_buffer())]) {
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
    stream: impl Transport,
    mut op: OpSession,
    busid: BusId,
    state: Arc<ServerState>,
    conn: u64,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    // Subscribed before the policy is read: a reload from here on reaches
    // the session.
    let policy_updates = state.config.acl.policy.subscribe();
    let policy = policy_updates.borrow().clone();
    let (importer, end) = match Importer::new(conn, stream.socket()) {
        Ok((importer, end)) => (importer.identified(peer.tls.clone()), end),
        Err(e) => {
            // Out of descriptors, or the client is gone already.
            warn!(conn, %busid, "cannot take the import: {e}");
            return Err(e.into());
        }
    };
    let record = importer.record();
    let token = op.import_token();
    let asked = busid.to_string_lossy();
    let admitted = tokio::select! {
        r = state.config.import_gate.admit(&asked, &peer, token) => r,
        _ = shutdown.changed() => return Ok(()),
    };
    if let Err(refusal) = admitted {
        if state.refusals.count(peer.addr.ip(), Refusal::RefusedImport) {
            info!(
                conn, %busid, client = %peer,
                "import refused: {refusal} (answered {})", refusal.status.name()
            );
        }
        op.refuse_import(refusal.status);
        write_all(&stream, op.poll_transmit()).await?;
        return Ok(());
    }
    let denied = AtomicBool::new(false);
    let granted = |info: &usbwire_proto::DeviceInfo| {
        let allowed = policy.allows(&peer, info);
        denied.store(!allowed, Ordering::Relaxed);
        allowed
    };
    let imported = tokio::select! {
        r = async {
            state.registry.refresh().await;
            state.registry.import_granted(&busid, importer, state.config.import_wait, granted).await
        } => r,
        _ = shutdown.changed() => return Ok(()),
    };
    let (info, mut backend) = match imported {
        Ok(x) => x,
        Err(e) => {
            // Under access control, a device this client may not use and
            // one that does not exist get the same answer: it learns
            // nothing of devices it was not granted.
            let status = match &e {
                RegistryError::NotFound(_) | RegistryError::BadBusid(_) if !policy.is_open() => {
                    OpStatus::Na
                }
                e => e.op_status(),
            };
            let log = match stream.socket().peer_addr() {
                Ok(a) => state.refusals.count(a.ip(), Refusal::RefusedImport),
                Err(_) => true,
            };
            if !log {
            } else if denied.load(Ordering::Relaxed) {
                info!(
                    conn, %busid, client = %peer,
                    "import refused: the access policy does not grant this device to this client \
                     (answered {})", status.name()
                );
            } else {
                info!(conn, %busid, client = %peer, "import refused: {e} (answered {})", status.name());
            }
            op.refuse_import(status);
            write_all(&stream, op.poll_transmit()).await?;
            return Ok(());
        }
    };
    // It named an exported device: from here on, that device's name.
    let busid = busid.to_string();
    let handoff = backend.kernel_handoff().is_some();
    if handoff {
        match kernel_refusal(&stream, backend, state.config.access.kernel).await {
            Ok(kept) => backend = kept,
            Err((kept, status, why)) => {
                if state.refusals.count(peer.addr.ip(), Refusal::RefusedImport) {
                    warn!(
                        conn, %busid, client = %peer,
                        "import refused: {why} (answered {})", status.name()
                    );
                }
                op.refuse_import(status);
                let sent = write_all(&stream, op.poll_transmit()).await;
                match kept {
                    Some(backend) => state.release(&busid, conn, backend).await,
                    // Lost with a panic: the slot stays in transition.
                    None => state.registry.ending(&busid, conn),
                }
                return sent.map_err(Into::into);
            }
        }
    }
    let device = info.clone();
    op.accept_import(info);
    if let Err(e) = write_all(&stream, op.poll_transmit()).await {
        state.release(&busid, conn, backend).await;
        return Err(e.into());
    }
    state.metrics.imported(&busid);
    let grant = Grant {
        peer,
        device,
        updates: policy_updates,
        record,
    };
    if handoff {
        return kernel_phase(stream, busid, backend, end, grant, state, conn, shutdown).await;
    }
    match stream.urb_carrier(state.config.access.kernel).await {
        UrbCarrier::Same(stream) => {
            urb_phase(stream, busid, backend, end, grant, state, conn, shutdown).await
        }
        UrbCarrier::Kernel(stream) => {
            urb_phase(stream, busid, backend, end, grant, state, conn, shutdown).await
        }
        UrbCarrier::User(stream) => {
            urb_phase(stream, busid, backend, end, grant, state, conn, shutdown).await
        }
        UrbCarrier::Closed => {
            state.release(&busid, conn, backend).await;
            Ok(())
        }
    }
}

/// Who an import was granted to, and what would revoke it.
struct Grant {
    peer: Peer,
    device: usbwire_proto::DeviceInfo,
    updates: watch::Receiver<Arc<Policy>>,
    /// Where the session counts the import's traffic.
    record: Arc<crate::state::ImportRecord>,
}

/// Runs an import's URB phase, then gives its device back.
#[allow(clippy::too_many_arguments)]
async fn urb_phase(
    stream: impl Transport,
    busid: String,
    backend: Box<dyn crate::Backend>,
    end: crate::registry::EndRequest,
    mut grant: Grant,
    state: Arc<ServerState>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let peer = &grant.peer;
    info!(conn, %busid, client = %peer, via = %stream.carrier(), "imported");
    let config = SessionConfig::new(&state.config, crate::sys::rtt(stream.socket()));
    tracing::debug!(grace = ?config.hold_grace, "error hold grace window");
    let wake = Arc::new(SessionWake(Notify::new()));
    let client = stream
        .socket()
        .peer_addr()
        .map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    let mut session = UrbSession::new(
        config,
        backend,
        Waker::from(wake.clone()),
        &busid,
        client,
        Instant::now(),
    )
    .with_budget(state.budget.share())
    .with_metrics(state.metrics.device(&busid), state.metrics.clone());
    let capture = state
        .capture
        .get()
        .and_then(|c| c.device(&busid, grant.device.busnum, grant.device.devnum));
    if let Some(capture) = capture {
        session = session.with_capture(capture);
    }
    grant.record.start_counting();
    let r = tokio::select! {
        r = run(&stream, &mut session, &wake, &grant.record, &mut shutdown) => r,
        () = end.requested() => {
            info!(conn, %busid, "import ended from outside");
            Ok(())
        }
        () = acl::revoked(&mut grant.updates, &grant.peer, &grant.device) => {
            // As if unbound: the client sees the connection close.
            info!(
                conn, %busid, client = %grant.peer,
                "import ended: the reloaded access policy no longer grants this device to this client"
            );
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
    record: &crate::state::ImportRecord,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut eof = false;
    loop {
        // Before any reply goes out: a client that has its reply sees
        // its URB counted.
        record.set_urbs(session.urbs_taken());
        if session.has_output() || transport.wants_flush() {
            write_some(transport, session, record)?;
        }
        if eof {
            return Ok(());
        }
        if session.poll_device_gone() {
            return Ok(());
        }
        let want_read = session.wants_input();
        let want_write = session.has_output() || transport.wants_flush();
        let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            // Fixed order: no random draw per turn, and input first.
            biased;
            r = transport.readable(), if want_read => {
                r?;
                let read = transport.try_read_vectored(&mut session.read_buffers());
                match read {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        record.add_from_client(n);
                        session.input_filled(Instant::now(), n)?
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            r = transport.writable(), if want_write => r?,
            () = wake.0.notified() => session.poll_backend(Instant::now())?,
            () = sleep_until_opt(deadline), if deadline.is_some() => {
                let now = Instant::now();
                if session.replies_stalled(now) {
                    return Err(SessionError::RepliesNotRead(session.config().reply_stall_timeout));
                }
                session.handle_timeout(now);
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Writes as much of the session's output as the transport takes now,
/// many replies per system call.
fn write_some(
    transport: &impl Transport,
    session: &mut UrbSession,
    record: &crate::state::ImportRecord,
) -> Result<(), SessionError> {
    while session.has_output() {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let used = session.poll_transmit(&mut slices);
        let n = match transport.try_write_vectored(&slices[..used]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        record.add_to_client(n);
        session.transmitted(Instant::now(), n)?;
    }
    match transport.flush() {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e.into()),
        _ => Ok(()),
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// How often the status of a device a kernel driver holds is read: the
/// kernel's stub and vudc signal nothing when a connection ends, so the
/// release is seen within this long.
const KERNEL_STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);
/// How long the kernel may take to give a device back once its connection
/// was shut down from here (the stub resets the device first).
const KERNEL_LET_GO: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `f` with a backend's kernel handoff on the blocking pool: it reads
/// and writes sysfs, and the driver starts its threads inside the write.
/// `None` if `f` panicked (the backend is then lost).
async fn with_handoff<R: Send + 'static>(
    mut backend: Box<dyn crate::Backend>,
    f: impl FnOnce(&mut dyn KernelHandoff) -> io::Result<R> + Send + 'static,
) -> Option<(Box<dyn crate::Backend>, io::Result<R>)> {
    tokio::task::spawn_blocking(move || {
        let r = match backend.kernel_handoff() {
            Some(h) => f(h),
            None => Err(io::Error::other("the device is not run by a kernel driver")),
        };
        (backend, r)
    })
    .await
    .ok()
}

/// Why a device a kernel driver runs cannot take this import, checked
/// before the import is answered so that the client gets a status, not a
/// reset: the driver must be free, and a TLS connection must be able to
/// move to kernel TLS (the driver reads and writes the socket itself).
/// The backend comes back unless a panic on the blocking pool took it.
async fn kernel_refusal(
    stream: &impl Transport,
    mut backend: Box<dyn crate::Backend>,
    kernel: KernelTls,
) -> Result<Box<dyn crate::Backend>, KernelRefusal> {
    let driver = backend
        .kernel_handoff()
        .map_or_else(String::new, |h| h.driver().to_string());
    if let Err(why) = stream.kernel_carrier_possible(kernel).await {
        let why = format!(
            "the device is run by the kernel's {driver}, which needs kernel TLS on a TLS \
             connection, and this one cannot have it: {why}"
        );
        return Err((Some(backend), OpStatus::Na, why));
    }
    let Some((backend, state)) = with_handoff(backend, |h| h.state()).await else {
        let why = format!("reading the state of the kernel's {driver} panicked");
        return Err((None, OpStatus::Error, why));
    };
    let (status, why) = match state {
        Ok(KernelState::Available) => return Ok(backend),
        Ok(KernelState::Used) => (
            OpStatus::DevBusy,
            format!(
                "the kernel's {driver} already runs a connection for it (usbip_status: used), \
                 one this usbipd did not hand over"
            ),
        ),
        Ok(KernelState::Unusable(v)) => (
            OpStatus::DevErr,
            format!(
                "the kernel's {driver} reports the device unusable (usbip_status {v}); \
                 unbind and bind it again"
            ),
        ),
        Err(e) => (
            OpStatus::Na,
            format!("cannot read the kernel's {driver} status of the device: {e}"),
        ),
    };
    Err((Some(backend), status, why))
}

/// A refused import of a kernel driver's device: the backend (unless a
/// panic took it), the status the client gets and why, for the log.
type KernelRefusal = (Option<Box<dyn crate::Backend>>, OpStatus, String);

/// An accepted import of a device a kernel driver runs: the connection
/// (moved to kernel TLS first if it came over TLS) goes to the driver, and
/// the device stays imported by this client until the driver's status
/// says it let go. Ending the import from here (unbind --force, a policy
/// reload, the server's shutdown) shuts the socket down, which ends the
/// driver's connection as a client's close would.
#[allow(clippy::too_many_arguments)]
async fn kernel_phase<T: Transport>(
    stream: T,
    busid: String,
    mut backend: Box<dyn crate::Backend>,
    end: crate::registry::EndRequest,
    mut grant: Grant,
    state: Arc<ServerState>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let driver = backend
        .kernel_handoff()
        .map_or_else(String::new, |h| h.driver().to_string());
    let (carrier, socket) = match stream.urb_carrier(KernelTls::On).await {
        UrbCarrier::Same(s) if s.kernel_may_hold() => (s.carrier(), own_socket(s.socket())),
        UrbCarrier::Kernel(k) => (k.carrier(), own_socket(k.socket())),
        UrbCarrier::Same(_) | UrbCarrier::User(_) => {
            warn!(
                conn, %busid,
                "closing the connection: it could not move to kernel TLS, which the kernel's \
                 {driver} needs"
            );
            state.release(&busid, conn, backend).await;
            return Ok(());
        }
        UrbCarrier::Closed => {
            state.release(&busid, conn, backend).await;
            return Ok(());
        }
    };
    // Our own descriptor of the socket, out of tokio's reactor (the
    // transport was dropped above): the kernel reads it from now on.
    let socket = match socket {
        Ok(s) => s,
        Err(e) => {
            warn!(conn, %busid, "cannot take the connection out of the runtime: {e}");
            state.release(&busid, conn, backend).await;
            return Err(e.into());
        }
    };
    let handed = with_handoff(backend, move |h| {
        h.hand_over(socket.as_fd())?;
        Ok(socket)
    })
    .await;
    let (b, socket) = match handed {
        Some((b, Ok(socket))) => (b, socket),
        Some((b, Err(e))) => {
            // The client got its OK already; it sees the connection close.
            error!(
                conn, %busid, client = %grant.peer,
                "cannot hand the connection to the kernel's {driver}: {e}"
            );
            state.release(&busid, conn, b).await;
            return Ok(());
        }
        None => {
            error!(conn, %busid, "handing the connection to the kernel's {driver} panicked");
            state.registry.ending(&busid, conn);
            return Ok(());
        }
    };
    backend = b;
    info!(
        conn, %busid, client = %grant.peer, via = %carrier,
        "imported: the kernel's {driver} runs the connection"
    );
    // When this side shut the connection down, if it did.
    let mut ended: Option<Instant> = None;
    // Bounded by the kernel's hold of the connection, and once this side
    // has ended it, by KERNEL_LET_GO.
    loop {
        let why = tokio::select! {
            () = tokio::time::sleep(KERNEL_STATUS_INTERVAL) => None,
            () = end.requested(), if ended.is_none() => Some("ended from outside"),
            () = acl::revoked(&mut grant.updates, &grant.peer, &grant.device), if ended.is_none() => {
                Some("the reloaded access policy no longer grants this device to this client")
            }
            _ = shutdown.changed(), if ended.is_none() => Some("the server is shutting down"),
        };
        if let Some(why) = why {
            info!(conn, %busid, client = %grant.peer, "import ended: {why}; ending the kernel's connection");
            let _ = socket.shutdown(std::net::Shutdown::Both);
            ended = Some(Instant::now());
        }
        let Some((b, kernel)) = with_handoff(backend, |h| h.state()).await else {
            error!(conn, %busid, "reading the state of the kernel's {driver} panicked");
            state.registry.ending(&busid, conn);
            return Ok(());
        };
        backend = b;
        match kernel {
            Ok(KernelState::Used) => {
                if ended.is_some_and(|t| t.elapsed() >= KERNEL_LET_GO) {
                    warn!(
                        conn, %busid,
                        "the kernel's {driver} still holds the device {KERNEL_LET_GO:?} after its \
                         connection was shut down; imports are refused until it lets go"
                    );
                    break;
                }
            }
            Ok(KernelState::Available) => {
                info!(conn, %busid, "the kernel's {driver} ended the connection");
                break;
            }
            Ok(KernelState::Unusable(v)) => {
                warn!(
                    conn, %busid,
                    "the kernel's {driver} ended the connection and reports the device unusable \
                     (usbip_status {v}); unbind and bind it again"
                );
                break;
            }
            Err(e) => {
                warn!(conn, %busid, "the kernel's {driver} status is gone ({e}): the device left it");
                break;
            }
        }
    }
    state.registry.ending(&busid, conn);
    drop(socket);
    state.release(&busid, conn, backend).await;
    info!(conn, %busid, "released");
    Ok(())
}

/// A descriptor of `socket` of our own, blocking as the C usbipd hands it.
fn own_socket(socket: &TcpStream) -> io::Result<std::net::TcpStream> {
    let owned = std::net::TcpStream::from(socket.as_fd().try_clone_to_owned()?);
    owned.set_nonblocking(false)?;
    Ok(owned)
}
