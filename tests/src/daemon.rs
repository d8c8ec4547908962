//! Our `usbipd` as a child process on 127.0.0.1, for tests that need the
//! real binary (kernel interop, restarts, SIGKILL).
//!
//! The test binds the listener (port chosen by the OS) and passes it by
//! socket activation ([`crate::activation`]); `usbipd` reports on its stdout
//! (`--ready-fd 1`) once it serves. No port is guessed and none is polled:
//! the port is the test's from the start, and a restart gets the same
//! socket back.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::activation::Activated;

/// How long `usbipd` may take to start serving, or to exit after SIGTERM.
/// Generous: the machine may be busy with qemu guests.
const START_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(20);

/// A running `usbipd`, killed on drop.
pub struct Usbipd {
    child: Option<Child>,
    // Kept open so that usbipd's stdout never becomes a broken pipe.
    stdout: Option<ChildStdout>,
    listener: TcpListener,
    pub port: u16,
    addr: SocketAddr,
    pub log: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
}

impl Usbipd {
    /// Starts `bin ARGS` serving a listener on 127.0.0.1 that this test
    /// binds, and returns once it reports that it serves.
    pub fn start(bin: &Path, args: &[&str], log_dir: &Path) -> Usbipd {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding a listener on 127.0.0.1");
        let addr = listener.local_addr().expect("the listener's address");
        let mut d = Usbipd {
            child: None,
            stdout: None,
            listener,
            port: addr.port(),
            addr,
            log: log_dir.join(format!("usbipd-{}.log", addr.port())),
            args: args.iter().map(|s| s.to_string()).collect(),
            bin: bin.to_path_buf(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("usbipd log file");
        let mut child = Activated::new(&self.bin)
            .args(&self.args)
            .args(["--ready-fd", "1"])
            .env("USBWIRE_LOG", "debug")
            .listener(&self.listener)
            .expect("duplicating the listener")
            .fd_names(&["usbipd"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning usbipd");
        let mut stdout = child.stdout.take().expect("usbipd's stdout");
        self.child = Some(child);
        let line = read_line(&mut stdout, START_LIMIT);
        self.stdout = Some(stdout);
        match line {
            Ok(line) => assert_eq!(
                line.trim_end(),
                self.addr.to_string(),
                "usbipd reported other addresses than the socket it was given:\n{}",
                self.log_text()
            ),
            Err(e) => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.kill();
                panic!(
                    "usbipd did not report that it serves ({e}; exit status {status:?}):\n{}",
                    self.log_text()
                );
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no flush. The listener stays the test's:
    /// connections made now wait for [`Usbipd::restart`].
    pub fn kill(&mut self) {
        kill_and_reap(self.child.take());
        self.stdout = None;
    }

    /// SIGSTOP, and returns once every thread has stopped: from then on
    /// the process, its sockets still open, answers nothing until it is
    /// killed ([`Usbipd::kill`] works on a stopped process), so what a
    /// client has in flight stays in flight.
    pub fn pause(&mut self) {
        let Some(c) = &self.child else { return };
        let pid = c.id() as libc::pid_t;
        let mut status = 0;
        // SAFETY: kill(2) and waitpid(2) on our own child, not reaped yet;
        // WUNTRACED reports the group stop, which SIGSTOP cannot escape,
        // and leaves the child to be reaped by `Child::wait` later.
        let stopped = unsafe {
            libc::kill(pid, libc::SIGSTOP) == 0
                && libc::waitpid(pid, &mut status, libc::WUNTRACED) == pid
        };
        assert!(
            stopped && libc::WIFSTOPPED(status),
            "usbipd did not stop (wait status {status:#x}):\n{}",
            self.log_text()
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> bool {
        self.terminate().is_some_and(|s| s.success())
    }

    /// SIGTERM; the exit status, or `None` (and SIGKILL) when it did not
    /// exit within 20 s.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let status = terminate(self.child.take()?, STOP_LIMIT);
        self.stdout = None;
        status
    }

    /// Starts it again with the same arguments on the same socket.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Usbipd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL, and reaps it.
pub fn kill_and_reap(child: Option<Child>) {
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM; the exit status, or `None` (and SIGKILL) when it did not exit
/// within `limit`.
pub fn terminate(mut child: Child, limit: Duration) -> Option<ExitStatus> {
    // SAFETY: plain kill(2) on our own child's pid, not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = wait_exit(&mut child, limit).ok().flatten();
    if status.is_none() {
        kill_and_reap(Some(child));
    }
    status
}

/// Reads up to and including the first newline, or fails at EOF (the child
/// exited) or after `limit`.
pub fn read_line(r: &mut (impl Read + AsFd), limit: Duration) -> io::Result<String> {
    let deadline = Instant::now() + limit;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    // Each round reads at least one byte or ends; the line is bounded too.
    while line.len() < 64 * 1024 {
        wait_readable(r.as_fd().as_raw_fd(), deadline)?;
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of output after {:?}", String::from_utf8_lossy(&line)),
            ));
        }
        line.extend_from_slice(&buf[..n]);
        if line.contains(&b'\n') {
            return String::from_utf8(line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "no newline in 64 KiB",
    ))
}

fn wait_readable(fd: i32, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call.
        match unsafe { libc::poll(&mut p, 1, ms.max(1)) } {
            n if n > 0 => return Ok(()),
            0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Waits for `child` to exit, at most `limit`: `Ok(None)` when it still
/// runs. Waits on a pidfd, which becomes readable when the process exits.
pub fn wait_exit(child: &mut Child, limit: Duration) -> io::Result<Option<ExitStatus>> {
    if let Some(s) = child.try_wait()? {
        return Ok(Some(s));
    }
    // SAFETY: pidfd_open(2) on our own unreaped child; the fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    match wait_readable(pidfd.as_raw_fd(), Instant::now() + limit) {
        Ok(()) => child.wait().map(Some),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(None),
        Err(e) => Err(e),
    }
}
