//! The limit: plain TCP on loopback between two threads of this process.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::load::record_latency;
use crate::sys;

pub struct RawResult {
    /// Writes (stream) or round trips (ping-pong).
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// CPU time of the peer thread (the receiver / the echoer), ns.
    pub peer_cpu_ns: u64,
}

fn pair() -> io::Result<(TcpStream, TcpListener)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    Ok((c, l))
}

fn setup(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(())
}

/// The peer thread: what its work returned and the CPU time it took (ns).
type Peer<T> = thread::JoinHandle<io::Result<(T, u64)>>;

/// A connected client socket, and a thread that accepts the other end and
/// runs `serve` on it, pinned to `peer_cpu`; the thread gives back what
/// `serve` returns and the CPU time it took (ns).
fn spawn_peer<T: Send + 'static>(
    peer_cpu: Option<usize>,
    serve: impl FnOnce(&mut TcpStream) -> io::Result<T> + Send + 'static,
) -> io::Result<(TcpStream, Peer<T>)> {
    let (c, l) = pair()?;
    setup(&c)?;
    let peer = thread::spawn(move || {
        if let Some(cpu) = peer_cpu {
            sys::pin_thread(0, cpu)?;
        }
        let (mut s, _) = l.accept()?;
        setup(&s)?;
        let cpu0 = sys::thread_cpu_ns();
        let r = serve(&mut s)?;
        Ok((r, sys::thread_cpu_ns() - cpu0))
    });
    Ok((c, peer))
}

fn join_peer<T>(peer: Peer<T>) -> io::Result<(T, u64)> {
    peer.join()
        .map_err(|_| io::Error::other("the peer thread panicked"))?
}

/// The peer's CPU time over the measured operations: it was sampled over
/// the warm-up too, so the measured ones get their share of it.
fn measured_share(cpu_ns: u64, ops: u64, warm_ops: u64) -> u64 {
    cpu_ns * ops / (warm_ops + ops).max(1)
}

/// A one-way stream in `write_size` writes: `warm` unmeasured, then `dur`
/// measured, on the same connection; the receiver reads into a 256 KiB
/// buffer. The peer's CPU time is averaged over every write.
pub fn stream(
    write_size: usize,
    warm: Duration,
    dur: Duration,
    peer_cpu: Option<usize>,
) -> io::Result<RawResult> {
    let (mut c, peer) = spawn_peer(peer_cpu, |s| {
        // As large as usbipd's read chunk (256 KiB).
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    })?;
    let buf = vec![0x5au8; write_size];
    let t0 = Instant::now();
    let mut warm_ops = 0u64;
    while t0.elapsed() < warm {
        c.write_all(&buf)?;
        warm_ops += 1;
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        c.write_all(&buf)?;
        ops += 1;
    }
    c.shutdown(std::net::Shutdown::Write)?;
    let (total, cpu) = join_peer(peer)?;
    // Measured until the receiver has read the last byte.
    let elapsed = start.elapsed();
    if total != (warm_ops + ops) * write_size as u64 {
        return Err(io::Error::other("receiver byte count mismatch"));
    }
    Ok(RawResult {
        ops,
        bytes: ops * write_size as u64,
        elapsed,
        peer_cpu_ns: measured_share(cpu, ops, warm_ops),
    })
}

/// 64-byte ping-pong, `warm` unmeasured then `dur` measured on the same
/// connection; per-round-trip latency in ns goes to `lat`.
pub fn pingpong(
    warm: Duration,
    dur: Duration,
    peer_cpu: Option<usize>,
    lat: &mut Vec<u32>,
) -> io::Result<RawResult> {
    lat.clear();
    let (mut c, peer) = spawn_peer(peer_cpu, |s| {
        let mut buf = [0u8; 64];
        // Ends when the client closes.
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        Ok(())
    })?;
    let mut buf = [0x5au8; 64];
    let t0 = Instant::now();
    let mut warm_ops = 0u64;
    while t0.elapsed() < warm {
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        warm_ops += 1;
    }
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < dur {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        record_latency(lat, t.elapsed());
        ops += 1;
    }
    let elapsed = start.elapsed();
    drop(c);
    let ((), cpu) = join_peer(peer)?;
    Ok(RawResult {
        ops,
        bytes: ops * 64,
        elapsed,
        peer_cpu_ns: measured_share(cpu, ops, warm_ops),
    })
}

/// `req`-byte requests, each answered by a `resp`-byte reply, `depth` in
/// flight; the client writes every request it may send in one write and
/// reads replies into one buffer, as the URB load client does. This is a
/// server that does nothing but answer: the limit for pipelined URB
/// workloads, and the tail latency that loopback TCP itself shows on this
/// machine. Latencies (send to reply, ns) go to `lat`.
pub fn pipelined(
    req: usize,
    resp: usize,
    depth: usize,
    warm: Duration,
    dur: Duration,
    peer_cpu: Option<usize>,
    lat: &mut Vec<u32>,
) -> io::Result<RawResult> {
    lat.clear();
    let (mut c, peer) = spawn_peer(peer_cpu, move |s| {
        let mut buf = vec![0u8; 256 << 10];
        let replies = vec![0u8; resp * depth];
        let mut partial = 0usize;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let done = (partial + n) / req;
            partial = (partial + n) % req;
            if done > 0 {
                s.write_all(&replies[..done * resp])?;
            }
        }
    })?;
    let requests = vec![0x5au8; req * depth];
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = std::collections::VecDeque::with_capacity(depth);
    let mut partial = 0usize;
    let t0 = Instant::now();
    let (mut warm_ops, mut ops) = (0u64, 0u64);
    let mut measuring = false;
    let mut start = t0;
    loop {
        if !measuring && t0.elapsed() >= warm {
            measuring = true;
            start = Instant::now();
        }
        let sending = !measuring || start.elapsed() < dur;
        if sending && sent.len() < depth {
            let n = depth - sent.len();
            let now = Instant::now();
            c.write_all(&requests[..n * req])?;
            sent.extend(std::iter::repeat_n((now, measuring), n));
        }
        if sent.is_empty() {
            break;
        }
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::other("the peer closed early"));
        }
        let done = (partial + n) / resp;
        partial = (partial + n) % resp;
        let now = Instant::now();
        for _ in 0..done {
            let (t, measured) = sent
                .pop_front()
                .ok_or_else(|| io::Error::other("extra reply"))?;
            if measured {
                ops += 1;
                record_latency(lat, now - t);
            } else {
                warm_ops += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    drop(c);
    let ((), cpu) = join_peer(peer)?;
    Ok(RawResult {
        ops,
        bytes: ops * req as u64,
        elapsed,
        peer_cpu_ns: measured_share(cpu, ops, warm_ops),
    })
}
