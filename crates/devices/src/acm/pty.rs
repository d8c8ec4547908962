//! The Pty bridge: the serial data to and from a local pseudo-terminal,
//! whose slave side programs on this machine open.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use super::queue::ByteQueue;
use super::{runtime, CHUNK};

/// A pty and the two tasks that move bytes between its master side and
/// the function's queues; dropping it stops them and removes the link.
pub(super) struct PtyBridge {
    /// The slave side (`/dev/pts/N`).
    path: PathBuf,
    /// The symlink made to `path`, if one was asked for.
    link: Option<PathBuf>,
    /// Kept open so that the master never sees a hangup (EIO) when the last
    /// local program closes the slave: the port stays usable across opens.
    _slave: OwnedFd,
    tasks: [JoinHandle<()>; 2],
}

impl PtyBridge {
    /// Opens a raw pty, links `link` to its slave and starts moving bytes.
    /// Must run inside a tokio runtime.
    pub(super) fn start(
        link: Option<PathBuf>,
        to_host: &ByteQueue,
        from_host: &ByteQueue,
    ) -> io::Result<PtyBridge> {
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
        let master_for_writes = pty.master.try_clone()?;
        let (rx, tx) = {
            let _guard = rt.enter();
            (
                pipe::Receiver::from_owned_fd_unchecked(pty.master)?,
                pipe::Sender::from_owned_fd_unchecked(master_for_writes)?,
            )
        };
        let tasks = [
            rt.spawn(pty_to_host(rx, to_host.clone())),
            rt.spawn(host_to_pty(tx, from_host.clone())),
        ];
        tracing::info!(path = %path.display(), "serial: pty ready");
        Ok(PtyBridge {
            path,
            link,
            _slave: pty.slave,
            tasks,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PtyBridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(link) = &self.link {
            // Only remove the link if it is still ours.
            if std::fs::read_link(link).ok().as_deref() == Some(self.path.as_path()) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
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
