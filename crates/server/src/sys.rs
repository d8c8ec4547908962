//! The one place this crate talks to the OS below tokio.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// The kernel's smoothed round-trip estimate for a TCP connection
/// (`tcpi_rtt` from TCP_INFO), if it has one.
pub fn rtt(stream: &tokio::net::TcpStream) -> Option<Duration> {
    // SAFETY: `tcp_info` is plain old data, so a zeroed value is valid; the
    // length passed is its size, and the kernel writes at most that much.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a live TCP socket owned by `stream` for this call,
    // and `info`/`len` are valid for writes of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 || info.tcpi_rtt == 0 {
        return None;
    }
    Some(Duration::from_micros(info.tcpi_rtt.into()))
}

/// Whether the peer of a TCP socket has closed its side of the connection
/// or reset it, seen without reading anything from the socket.
pub fn peer_closed(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd on a descriptor borrowed for this call, and
    // a zero timeout: poll(2) only reports the socket's state.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Raises the calling thread's nice value by `by` (less CPU when threads
/// compete; an unprivileged thread may always lower its own priority).
pub fn lower_thread_priority(by: i32) -> std::io::Result<()> {
    // SAFETY: getpriority/setpriority take plain integers; with
    // PRIO_PROCESS and 0 they act on the calling thread alone (Linux).
    // errno is cleared first: -1 is also a valid priority.
    let now = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    if now == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, (now + by).min(19)) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
