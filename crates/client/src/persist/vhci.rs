//! [`Attach`] through vhci-hcd: each import's connection goes to the kernel
//! and the supervisor watches a duplicate of the socket to learn when the
//! kernel's connection ends.
//!
//! vhci-hcd announces nothing when a port's connection dies, but it shuts
//! the socket down (`vhci_shutdown_connection`), and so do a peer's FIN or
//! RST and a keepalive or user timeout: a duplicate descriptor polled for
//! POLLRDHUP (POLLHUP and POLLERR come unasked) sees every one of them,
//! without reading a byte of what belongs to the kernel.

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use usbwire_proto::{DeviceInfo, OpStatus};
use usbwire_tls::ktls::{self, KtlsError};

use super::{Attach, AttemptError, Keepalive, CLIENT_KEEPALIVE, CONNECT_TIMEOUT, IMPORT_TIMEOUT};
use crate::blocking::{import_blocking, import_blocking_tls};
use crate::error::ClientError;
use crate::tls::{TlsClientConfig, TlsError};
use crate::vhci::remote::client_message;
use crate::vhci::{AttachError, SysfsWriter, Vhci, VhciError};

/// Keeps `busid` of `host:tcp_port` attached to vhci-hcd.
#[derive(Debug, Clone)]
pub struct VhciAttach {
    pub vhci: Vhci,
    pub host: String,
    pub tcp_port: u16,
    pub busid: String,
    pub tls: Option<TlsClientConfig>,
    pub connect_timeout: Duration,
    pub import_timeout: Duration,
    pub keepalive: Keepalive,
}

impl VhciAttach {
    pub fn new(vhci: Vhci, host: &str, tcp_port: u16, busid: &str) -> VhciAttach {
        VhciAttach {
            vhci,
            host: host.to_string(),
            tcp_port,
            busid: busid.to_string(),
            tls: None,
            connect_timeout: CONNECT_TIMEOUT,
            import_timeout: IMPORT_TIMEOUT,
            keepalive: CLIENT_KEEPALIVE,
        }
    }

    fn name(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.tcp_port)
        } else {
            format!("{}:{}", self.host, self.tcp_port)
        }
    }
}

/// An import ready for vhci-hcd.
#[derive(Debug)]
pub struct VhciImport {
    stream: TcpStream,
    device: DeviceInfo,
}

/// A device on a vhci-hcd port, and what tells when its connection ends.
#[derive(Debug)]
pub struct VhciSession {
    pub port: u32,
    /// The same socket the kernel holds; polled, never read.
    socket: OwnedFd,
    /// Dropping it wakes the thread polling `socket` (its other end
    /// reports POLLHUP), so a stopped supervisor leaves no thread behind.
    waker: Option<OwnedFd>,
    wake_rx: Option<OwnedFd>,
}

impl Drop for VhciSession {
    fn drop(&mut self) {
        self.waker.take();
    }
}

/// Shuts a socket down when dropped unless disarmed: how a blocking import
/// is cut short when it takes too long or the supervisor stops.
struct ShutdownOnDrop(Option<TcpStream>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn attach_error(e: AttachError) -> AttemptError {
    let permanent = match &e {
        AttachError::Vhci(v) => matches!(
            v,
            VhciError::NotLoaded { .. }
                | VhciError::NeedsRoot { .. }
                | VhciError::NoPorts { .. }
                | VhciError::UnsupportedSpeed { .. }
        ),
        AttachError::Client(c) => client_permanent(c),
        AttachError::Ktls(k) => matches!(
            k,
            KtlsError::Unavailable(_) | KtlsError::CipherUnavailable { .. }
        ),
        AttachError::WrongDevice { .. } => true,
        AttachError::Record { .. } => false,
    };
    AttemptError {
        message: e.to_string(),
        permanent,
    }
}

fn client_permanent(e: &ClientError) -> bool {
    match e {
        ClientError::ImportRefused { status, .. } => *status == OpStatus::NoDev,
        ClientError::Tls { source, .. } => !matches!(source, TlsError::ReadFile { .. }),
        _ => false,
    }
}

fn client_error(e: ClientError) -> AttemptError {
    AttemptError {
        permanent: client_permanent(&e),
        message: client_message(&e),
    }
}

impl Attach for VhciAttach {
    type Imported = VhciImport;
    type Session = VhciSession;

    async fn import(&mut self) -> Result<VhciImport, AttemptError> {
        // Fail before importing: an import holds the device on the server.
        self.vhci
            .hc_dir()
            .map_err(|e| attach_error(AttachError::Vhci(e)))?;
        let name = self.name();
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        let session = match &self.tls {
            Some(tls) => Some(tls.kernel_tls_session(bare).map_err(|source| {
                client_error(ClientError::Tls {
                    addr: name.clone(),
                    source,
                })
            })?),
            None => None,
        };
        let connect = tokio::net::TcpStream::connect((bare, self.tcp_port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(client_error(ClientError::Connect { addr: name, source }))
            }
            Err(_) => {
                return Err(AttemptError::transient(format!(
                    "cannot connect to {name}: no answer within {:?}",
                    self.connect_timeout
                )))
            }
        };
        let stream = stream.into_std().map_err(|source| {
            client_error(ClientError::Io {
                addr: name.clone(),
                source,
            })
        })?;
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| self.keepalive.apply(&stream))
            .and_then(|()| stream.try_clone());
        let abort = ShutdownOnDrop(Some(prepared.map_err(|source| {
            client_error(ClientError::Io {
                addr: name.clone(),
                source,
            })
        })?));
        let busid = self.busid.clone();
        let what = name.clone();
        let job = tokio::task::spawn_blocking(move || -> Result<VhciImport, AttachError> {
            let mut stream = stream;
            let device = match session {
                None => import_blocking(&mut stream, &what, &busid)?,
                Some(session) => {
                    // Before anything is imported: a kernel without TLS
                    // fails here.
                    ktls::attach_ulp(&stream)?;
                    let import = import_blocking_tls(&stream, session, &what, &busid)?;
                    ktls::handoff(&stream, import.session, &import.boundary)?;
                    import.device
                }
            };
            if device.busid != busid.as_str() {
                return Err(AttachError::WrongDevice {
                    asked: busid,
                    got: device.busid.to_string(),
                });
            }
            Ok(VhciImport { stream, device })
        });
        // Dropped here (on timeout, or with this future on stop), `abort`
        // shuts the socket down and the blocking import returns at once.
        match tokio::time::timeout(self.import_timeout, job).await {
            Ok(Ok(Ok(imported))) => {
                let mut abort = abort;
                abort.0.take();
                Ok(imported)
            }
            Ok(Ok(Err(e))) => Err(attach_error(e)),
            Ok(Err(join)) => Err(AttemptError::transient(format!("import failed: {join}"))),
            Err(_) => Err(AttemptError::transient(format!(
                "{name} did not answer the import of {} within {:?}",
                self.busid, self.import_timeout
            ))),
        }
    }

    async fn hand_over(
        &mut self,
        imported: VhciImport,
    ) -> Result<(VhciSession, Option<u32>), AttemptError> {
        let vhci = self.vhci.clone();
        let (host, tcp_port, busid) = (self.host.clone(), self.tcp_port, self.busid.clone());
        let job = tokio::task::spawn_blocking(move || -> Result<VhciSession, AttachError> {
            let watch = imported.stream.try_clone().map_err(|source| {
                AttachError::Client(ClientError::Io {
                    addr: host.clone(),
                    source,
                })
            })?;
            let attached = vhci.hand_over(
                &mut SysfsWriter,
                imported.stream,
                imported.device,
                &host,
                tcp_port,
                &busid,
            )?;
            let (wake_rx, waker) = nix::unistd::pipe().map_err(|e| {
                AttachError::Client(ClientError::Io {
                    addr: host.clone(),
                    source: e.into(),
                })
            })?;
            Ok(VhciSession {
                port: attached.port,
                socket: watch.into(),
                waker: Some(waker),
                wake_rx: Some(wake_rx),
            })
        });
        match job.await {
            Ok(Ok(s)) => {
                let port = s.port;
                Ok((s, Some(port)))
            }
            Ok(Err(e)) => Err(attach_error(e)),
            Err(join) => Err(AttemptError::transient(format!("attach failed: {join}"))),
        }
    }

    async fn ended(&mut self, session: &mut VhciSession) -> String {
        let port = session.port;
        let (Ok(socket), Some(wake_rx)) = (session.socket.try_clone(), session.wake_rx.take())
        else {
            return format!("port {port}: cannot watch the connection");
        };
        let job = tokio::task::spawn_blocking(move || watch_socket(socket, wake_rx));
        match job.await {
            Ok(reason) => format!("port {port}: {reason}"),
            Err(e) => format!("port {port}: watching the connection failed: {e}"),
        }
    }

    fn cleanup(&mut self, session: VhciSession) {
        // The kernel keeps no record; ours would name a device gone from
        // the port (unless another attach has the port already).
        if let Ok(record) = self.vhci.read_record(session.port) {
            if record.busid == self.busid && record.host == self.host {
                let free = self
                    .vhci
                    .ports()
                    .ok()
                    .and_then(|ps| ps.into_iter().find(|p| p.port == session.port))
                    .is_some_and(|p| p.is_free());
                if free {
                    self.vhci.remove_record(session.port);
                }
            }
        }
    }
}

/// Blocks until the socket's connection has ended (or `wake_rx`'s other
/// end is closed) and says how it ended.
fn watch_socket(socket: OwnedFd, wake_rx: OwnedFd) -> String {
    use nix::libc;
    // Each round ends with an event; EINTR aside, the first one returns.
    for _ in 0..1000 {
        let mut fds = [
            libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, for descriptors this function owns.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return format!("cannot watch the connection: {e}");
        }
        let sock = fds[0].revents;
        if sock != 0 {
            let err = nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::SocketError)
                .unwrap_or(0);
            return if err != 0 {
                format!(
                    "connection lost: {}",
                    std::io::Error::from_raw_os_error(err)
                )
            } else if sock & libc::POLLHUP != 0 {
                "connection shut down (the kernel freed the port, or the server left)".into()
            } else {
                "the server closed the connection".into()
            };
        }
        if fds[1].revents != 0 {
            return "stopped watching".into();
        }
    }
    "stopped watching".into()
}
