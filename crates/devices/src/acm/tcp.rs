//! The Tcp bridge: the serial data to and from one TCP client at a time
//! on a loopback address.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use super::queue::ByteQueue;
use super::{runtime, CHUNK};

/// A loopback listener and the task that serves its clients; dropping it
/// stops the task, which closes the listener and the client.
pub(super) struct TcpBridge {
    /// Where it listens, with the real port when port 0 was asked for.
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpBridge {
    /// Listens on `addr`, which must be loopback, and starts serving.
    /// Must run inside a tokio runtime.
    pub(super) fn start(
        addr: SocketAddr,
        to_host: &ByteQueue,
        from_host: &ByteQueue,
    ) -> io::Result<TcpBridge> {
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
        from_host.set_discard(true);
        let task = rt.spawn(tcp_serve(listener, to_host.clone(), from_host.clone()));
        tracing::info!(%local, "serial: listening");
        Ok(TcpBridge {
            local_addr: local,
            task,
        })
    }

    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for TcpBridge {
    fn drop(&mut self) {
        self.task.abort();
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
    let (mut reader, mut writer) = stream.into_split();
    let up = async {
        let mut tmp = [0u8; CHUNK];
        loop {
            let room = poll_fn(|cx| to_host.poll_room(cx)).await;
            match reader.read(&mut tmp[..room.min(CHUNK)]).await {
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
            if writer.write_all(&tmp[..n]).await.is_err() {
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
