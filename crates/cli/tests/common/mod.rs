//! Running the real binaries in tests.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitStatus;

use socket2::{Domain, Socket, Type};
use usbwire_tests::daemon::Usbipd;

pub mod scsi;

/// A `usbipd` child process on a listener the test owns (passed by socket
/// activation; see `usbwire_tests::daemon`), killed on drop.
pub struct Daemon {
    inner: Usbipd,
    pub port: u16,
    pub log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `usbipd ARGS` on a listener on 127.0.0.1 and returns once it
    /// reports that it serves.
    pub fn start(args: &[&str], log_dir: &Path) -> Daemon {
        let inner = Usbipd::start(Path::new(env!("CARGO_BIN_EXE_usbipd")), args, log_dir);
        Daemon {
            port: inner.port,
            log: inner.log.clone(),
            inner,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr()
    }

    pub fn log_text(&self) -> String {
        self.inner.log_text()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        match self.inner.terminate() {
            Some(s) => s,
            None => panic!(
                "usbipd did not exit after SIGTERM:\n{}",
                self.inner.log_text()
            ),
        }
    }
}

/// A port on 127.0.0.1 that refuses connections for as long as the socket
/// lives: bound, never listening, without SO_REUSEADDR, so no other socket
/// can take the port meanwhile (unlike a port that was free a moment ago).
pub fn refusing_port() -> (Socket, u16) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("binding 127.0.0.1:0");
    let port = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("a bound address")
        .port();
    (s, port)
}

/// The path of a peer binary, or `None` with a note. Under CI a missing
/// peer is a failure, never a silent skip.
pub fn peer_binary(path: &str, package: &str) -> Option<std::path::PathBuf> {
    let p = std::path::PathBuf::from(path);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{path} is missing: install the Debian package `{package}` (CI=true makes this a failure)");
    }
    eprintln!("SKIPPED: {path} is missing (apt-get install {package})");
    None
}
