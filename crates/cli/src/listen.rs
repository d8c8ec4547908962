//! Where `usbipd`'s listening sockets come from, and how it tells whoever
//! started it where it listens.
//!
//! The sockets are either passed by a service manager through the systemd
//! socket-activation protocol (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`;
//! fds from 3; a `usbipd.socket` unit or `systemd-socket-activate`), or bound
//! here (`-t`, `--listen`; `-t 0` takes ephemeral ports). Once it serves,
//! `usbipd` reports the bound addresses: a log line, `READY=1` and `STATUS=`
//! to `NOTIFY_SOCKET` (a `Type=notify` unit), and one line on `--ready-fd`.
//! A parent that passes its own listener, or waits for that report, never has
//! to guess a free port or poll one with connects.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use socket2::{Domain, Socket, Type};

/// The first fd of the socket-activation protocol (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "the socket-activation environment is invalid (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES): {0}"
    )]
    Environment(#[source] io::Error),
    #[error(
        "fd {fd} ({name}) from the service manager is not a listening TCP socket: {problem}; \
         usbipd serves TCP only (ListenStream= in the .socket unit)"
    )]
    NotTcpListener {
        fd: RawFd,
        name: String,
        problem: String,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("--ready-fd {fd}: {problem}")]
    ReadyFd { fd: RawFd, problem: String },
}

/// Where a listener came from, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the service manager as `fd`, named `name` in
    /// `LISTEN_FDNAMES` (`unknown` when it gave no names).
    Inherited { fd: RawFd, name: String },
    /// Bound by `usbipd` itself.
    Bound,
}

/// One listening socket, non-blocking, ready for the runtime.
#[derive(Debug)]
pub struct Listener {
    pub socket: TcpListener,
    pub addr: SocketAddr,
    pub origin: Origin,
}

/// Takes the listening sockets a service manager passed to this process, and
/// clears `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` so that no child
/// takes them for its own. Empty when none were passed (or they were meant
/// for another process: `LISTEN_PID` is not ours).
///
/// # Safety
///
/// Changes the environment: call it before any other thread exists.
pub unsafe fn take_inherited() -> Result<Vec<Listener>, ListenError> {
    // SAFETY: the caller guarantees that no other thread runs.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(ListenError::Environment)?;
    // Own every fd first, so that all of them are closed if one is refused.
    let owned: Vec<(OwnedFd, RawFd, String)> = fds
        .map(|(fd, name)| {
            // SAFETY: the service manager handed fds LISTEN_FDS_START.. to
            // this process (LISTEN_PID is ours), sd_notify made sure each is
            // open (it set CLOEXEC on it), and nothing else here owns them.
            (unsafe { OwnedFd::from_raw_fd(fd) }, fd, name)
        })
        .collect();
    owned
        .into_iter()
        .map(|(owned, fd, name)| adopt(owned, fd, name))
        .collect()
}

fn adopt(owned: OwnedFd, fd: RawFd, name: String) -> Result<Listener, ListenError> {
    let socket = Socket::from(owned);
    let refuse = |problem: String| ListenError::NotTcpListener {
        fd,
        name: name.clone(),
        problem,
    };
    match socket.domain() {
        Ok(d) if d == Domain::IPV4 || d == Domain::IPV6 => {}
        Ok(d) => return Err(refuse(format!("its address family is {d:?}"))),
        Err(e) => return Err(refuse(format!("not a socket ({e})"))),
    }
    match socket.r#type() {
        Ok(t) if t == Type::STREAM => {}
        Ok(t) => return Err(refuse(format!("its type is {t:?}, not a stream"))),
        Err(e) => return Err(refuse(e.to_string())),
    }
    match socket.is_listener() {
        Ok(true) => {}
        Ok(false) => return Err(refuse("it is not listening".into())),
        Err(e) => return Err(refuse(e.to_string())),
    }
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| refuse("it has no IP address".into()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| refuse(format!("cannot make it non-blocking: {e}")))?;
    Ok(Listener {
        socket: socket.into(),
        addr,
        origin: Origin::Inherited { fd, name },
    })
}

/// Binds `port` on each of `addrs` (address, IPv6-only). Port 0 takes an
/// ephemeral port on the first address and the same port on the others where
/// it is free, so that `-t 0` usually gives one port number for every address
/// family. Fails only when no address could be bound; the other failures come
/// back as warnings for the log.
pub fn bind(
    addrs: &[(IpAddr, bool)],
    port: u16,
) -> Result<(Vec<Listener>, Vec<ListenError>), ListenError> {
    let mut out: Vec<Listener> = Vec::new();
    let mut warnings = Vec::new();
    for &(ip, v6only) in addrs {
        let shared = match out.first() {
            Some(first) if port == 0 => first.addr.port(),
            _ => port,
        };
        let mut result = listen(SocketAddr::new(ip, shared), v6only);
        if result.is_err() && shared != port {
            // The first family's ephemeral port is taken on this one: any
            // other free port will do, and the report names it.
            result = listen(SocketAddr::new(ip, 0), v6only);
        }
        match result {
            Ok(l) => out.push(l),
            Err(e) => warnings.push(e),
        }
    }
    if out.is_empty() {
        let mut errors = warnings.into_iter();
        let first = errors.next().unwrap_or_else(|| ListenError::Bind {
            addr: SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on"),
        });
        for e in errors {
            tracing::warn!("{e}");
        }
        return Err(first);
    }
    Ok((out, warnings))
}

fn listen(addr: SocketAddr, v6only: bool) -> Result<Listener, ListenError> {
    let bind_error = |source| ListenError::Bind { addr, source };
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(bind_error)?;
    if addr.is_ipv6() {
        s.set_only_v6(v6only).map_err(bind_error)?;
    }
    s.set_reuse_address(true).map_err(bind_error)?;
    s.bind(&addr.into()).map_err(bind_error)?;
    s.listen(1024).map_err(bind_error)?;
    s.set_nonblocking(true).map_err(bind_error)?;
    let bound = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    Ok(Listener {
        socket: s.into(),
        addr: bound,
        origin: Origin::Bound,
    })
}

/// Takes over fd `fd` (`--ready-fd`) for the readiness line. `inherited` is
/// how many listeners the service manager passed: their fds are not ours to
/// write to.
pub fn take_ready_fd(fd: RawFd, inherited: usize) -> Result<File, ListenError> {
    let problem = |problem: String| ListenError::ReadyFd { fd, problem };
    if fd < 0 {
        return Err(problem("not a file descriptor".into()));
    }
    let last_inherited = LISTEN_FDS_START + inherited as RawFd - 1;
    if inherited > 0 && (LISTEN_FDS_START..=last_inherited).contains(&fd) {
        return Err(problem(format!(
            "it is one of the listening sockets the service manager passed (fds {LISTEN_FDS_START} to {last_inherited})"
        )));
    }
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| {
        problem(format!(
            "not open ({e}); the parent must leave it open for usbipd, e.g. `--ready-fd 3 3>&1`"
        ))
    })?;
    if fd <= 2 {
        // A standard stream stays open for its usual use (and is replaced by
        // /dev/null under -D); the report goes to a duplicate.
        // SAFETY: fd is open (checked above) and only borrowed to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let dup = borrowed
            .try_clone_to_owned()
            .map_err(|e| problem(format!("cannot duplicate it: {e}")))?;
        return Ok(File::from(dup));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| problem(format!("cannot set close-on-exec: {e}")))?;
    // SAFETY: fd is open and was passed to this process for this one use.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The report that `usbipd` serves on `addrs`: a log line, `READY=1` and
/// `STATUS=` to the service manager (when `NOTIFY_SOCKET` is set), and one
/// line on the ready fd, which is then closed. None of these failing stops
/// the server: it serves either way, and says what went wrong.
pub fn announce_ready(addrs: &[SocketAddr], ready_fd: Option<File>) {
    let status = format!("listening on {}", join(addrs, ", "));
    tracing::info!("ready: {status}");
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        tracing::warn!("cannot tell the service manager we are ready (NOTIFY_SOCKET): {e}");
    }
    if let Some(mut f) = ready_fd {
        if let Err(e) = f.write_all(ready_line(addrs).as_bytes()) {
            tracing::warn!("cannot write the ready line to --ready-fd: {e}");
        }
    }
}

/// Pings the service manager's watchdog (`WATCHDOG=1`) at half the
/// interval the unit set with `WatchdogSec=`, from a task on the runtime
/// that accepts connections and runs the control socket: if that runtime
/// stalls, the pings stop and systemd restarts `usbipd`. Does nothing when
/// no watchdog is asked for (`WATCHDOG_USEC` unset, or meant for another
/// process). Must be called from within the runtime.
pub fn spawn_watchdog() {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    // systemd's own advice (sd_watchdog_enabled(3)): ping at half the
    // timeout, so one late wakeup does not cost a restart.
    let period = (timeout / 2).max(std::time::Duration::from_millis(1));
    tracing::info!("service manager watchdog: pinging every {period:?}");
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                tracing::warn!("cannot ping the service manager's watchdog (NOTIFY_SOCKET): {e}; no more pings");
                return;
            }
        }
    });
}

/// Tells the service manager (if any) that `usbipd` is shutting down.
pub fn announce_stopping() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::warn!("cannot tell the service manager we are stopping (NOTIFY_SOCKET): {e}");
    }
}

/// The line `--ready-fd` gets: every address, space-separated, then a newline
/// (`127.0.0.1:3240 [::1]:3240`).
pub fn ready_line(addrs: &[SocketAddr]) -> String {
    format!("{}\n", join(addrs, " "))
}

fn join(addrs: &[SocketAddr], sep: &str) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(sep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::AsRawFd;

    #[test]
    fn port_zero_binds_one_ephemeral_port_for_both_families() {
        let addrs = [
            (IpAddr::from(Ipv4Addr::LOCALHOST), false),
            (IpAddr::from(Ipv6Addr::LOCALHOST), true),
        ];
        let (ls, warnings) = bind(&addrs, 0).unwrap();
        if ls.len() == 1 {
            // No IPv6 loopback here; the IPv4 listener still serves.
            assert!(warnings.len() == 1, "{warnings:?}");
            return;
        }
        assert_ne!(ls[0].addr.port(), 0);
        assert_eq!(ls[0].addr.port(), ls[1].addr.port(), "{ls:?}");
        assert_eq!(ls[0].origin, Origin::Bound);
        for l in &ls {
            assert_eq!(l.socket.local_addr().unwrap(), l.addr);
        }
    }

    #[test]
    fn port_zero_falls_back_to_another_port_when_the_first_is_taken_on_the_second_family() {
        // An IPv4 address the ephemeral port cannot be shared on: the same
        // address twice, without SO_REUSEPORT, can never bind the same port.
        let lo = IpAddr::from(Ipv4Addr::LOCALHOST);
        let (ls, warnings) = bind(&[(lo, false), (lo, false)], 0).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(ls.len(), 2);
        assert_ne!(ls[0].addr.port(), ls[1].addr.port());
    }

    #[test]
    fn a_fixed_port_in_use_is_an_error_naming_the_address() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = held.local_addr().unwrap();
        let e = bind(&[(taken.ip(), false)], taken.port()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot listen on {taken}: ")),
            "{e}"
        );
    }

    #[test]
    fn adopt_takes_a_listening_tcp_socket_and_refuses_anything_else() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        let fd = l.as_raw_fd();
        let got = adopt(OwnedFd::from(l), fd, "usbipd".into()).unwrap();
        assert_eq!(got.addr, addr);
        assert_eq!(
            got.origin,
            Origin::Inherited {
                fd,
                name: "usbipd".into()
            }
        );

        let unlistened = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        unlistened
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        let e = adopt(OwnedFd::from(unlistened), 7, "x".into()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "fd 7 (x) from the service manager is not a listening TCP socket: it is not listening; \
             usbipd serves TCP only (ListenStream= in the .socket unit)"
        );

        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = adopt(OwnedFd::from(udp), 8, "y".into()).unwrap_err();
        assert!(e.to_string().contains("not a stream"), "{e}");

        let (unix, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = adopt(OwnedFd::from(unix), 9, "z".into()).unwrap_err();
        assert!(e.to_string().contains("address family is AF_UNIX"), "{e}");

        let file = File::open("/dev/null").unwrap();
        let e = adopt(OwnedFd::from(file), 10, "w".into()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }

    #[test]
    fn ready_fd_must_be_open_and_not_an_inherited_listener() {
        let e = take_ready_fd(4, 2).unwrap_err();
        assert!(
            e.to_string()
                .contains("one of the listening sockets the service manager passed (fds 3 to 4)"),
            "{e}"
        );
        let e = take_ready_fd(-1, 0).unwrap_err();
        assert_eq!(e.to_string(), "--ready-fd -1: not a file descriptor");
        // Beyond any fd limit, so never open (a number just closed could
        // be reused at once by another test thread).
        let e = take_ready_fd(RawFd::MAX, 0).unwrap_err();
        assert!(e.to_string().contains("not open"), "{e}");
    }

    #[test]
    fn the_ready_line_lists_every_address_and_ends_the_line() {
        let a: Vec<SocketAddr> = vec![
            "127.0.0.1:3240".parse().unwrap(),
            "[::1]:41000".parse().unwrap(),
        ];
        assert_eq!(ready_line(&a), "127.0.0.1:3240 [::1]:41000\n");
    }
}
