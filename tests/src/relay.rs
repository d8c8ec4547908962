//! A TCP relay the test controls, between a client (a guest's guestfwd)
//! and a server: it forwards, severs every connection with a reset on both
//! sides (as a rebooting NAT or router does), or black-holes (accepts and
//! then neither forwards nor closes), on the test's word.
//!
//! Plain threads and blocking sockets: each connection is two copying
//! threads that end when either side closes or the relay severs them.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::fabric::Host;

/// How long connecting to the server may take.
const UPSTREAM_CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// The most connections one relay accepts (a bound on its accept loop).
const MAX_CONNECTIONS: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    BlackHole,
}

/// One relayed connection: both sockets, and whether it was severed (then
/// its threads propagate nothing).
struct Pair {
    down: TcpStream,
    up: TcpStream,
    severed: Arc<AtomicBool>,
}

struct State {
    mode: Mode,
    pairs: Vec<Pair>,
    /// Connections accepted while black-holed: held open, never read.
    held: Vec<TcpStream>,
}

struct Inner {
    upstream: SocketAddr,
    state: Mutex<State>,
    accepted: AtomicU64,
    accepted_black_holed: AtomicU64,
    closing: AtomicBool,
}

/// A relay on 127.0.0.1 (port chosen by the OS) to `upstream`; stops on drop.
pub struct Relay {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> io::Result<Relay> {
        Relay::start_via(upstream, None)
    }

    /// A relay on the host's 127.0.0.1 to `upstream` inside `host`'s
    /// namespace (a fabric host's address, unreachable from the root
    /// namespace): its upstream connections are made from there. This is
    /// how a guest's guestfwd reaches a server of a [`Fabric`].
    ///
    /// [`Fabric`]: crate::fabric::Fabric
    pub fn start_into(upstream: SocketAddr, host: &Host) -> io::Result<Relay> {
        Relay::start_via(upstream, Some(host))
    }

    fn start_via(upstream: SocketAddr, host: Option<&Host>) -> io::Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            upstream,
            state: Mutex::new(State {
                mode: Mode::Forward,
                pairs: Vec::new(),
                held: Vec::new(),
            }),
            accepted: AtomicU64::new(0),
            accepted_black_holed: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        });
        let i = inner.clone();
        // The listener is made here, in this thread's namespace; the accept
        // thread, which connects upstream, may be in another one.
        let accept = match host {
            Some(host) => host.spawn(move || accept_loop(listener, i)),
            None => std::thread::spawn(move || accept_loop(listener, i)),
        };
        Ok(Relay {
            addr,
            inner,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted while black-holed.
    pub fn accepted_black_holed(&self) -> u64 {
        self.inner.accepted_black_holed.load(Ordering::SeqCst)
    }

    /// Connections being forwarded now.
    pub fn forwarding(&self) -> usize {
        self.lock().pairs.len()
    }

    /// Resets every relayed connection on both sides, then black-holes
    /// new ones until [`Relay::forward`].
    pub fn sever_and_black_hole(&self) {
        let mut st = self.lock();
        st.mode = Mode::BlackHole;
        for pair in st.pairs.drain(..) {
            pair.severed.store(true, Ordering::SeqCst);
            for s in [&pair.down, &pair.up] {
                // Closed with SO_LINGER 0: a reset, not a FIN.
                let _ = nix::sys::socket::setsockopt(
                    s,
                    nix::sys::socket::sockopt::Linger,
                    &libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                );
                // Wakes the copying threads (their reads return 0) without
                // sending anything; the last descriptor closed sends the
                // reset.
                let _ = s.shutdown(Shutdown::Read);
            }
        }
    }

    /// Forwards again; the connections held while black-holed are closed.
    pub fn forward(&self) {
        let mut st = self.lock();
        st.mode = Mode::Forward;
        st.held.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let mut st = self.lock();
        for pair in st.pairs.drain(..) {
            let _ = pair.down.shutdown(Shutdown::Both);
            let _ = pair.up.shutdown(Shutdown::Both);
        }
        st.held.clear();
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    for _ in 0..MAX_CONNECTIONS {
        let Ok((down, _)) = listener.accept() else {
            continue;
        };
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        let mode = inner.state.lock().unwrap_or_else(|p| p.into_inner()).mode;
        if mode == Mode::BlackHole {
            inner.accepted_black_holed.fetch_add(1, Ordering::SeqCst);
            inner
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .held
                .push(down);
            continue;
        }
        let Ok(up) = TcpStream::connect_timeout(&inner.upstream, UPSTREAM_CONNECT_LIMIT) else {
            // The server is not there: the client sees its connection closed.
            continue;
        };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let severed = Arc::new(AtomicBool::new(false));
        let clones = (
            down.try_clone(),
            up.try_clone(),
            down.try_clone(),
            up.try_clone(),
        );
        let (Ok(d1), Ok(u1), Ok(d2), Ok(u2)) = clones else {
            continue;
        };
        let s1 = severed.clone();
        let s2 = severed.clone();
        std::thread::spawn(move || copy(d1, u1, s1));
        std::thread::spawn(move || copy(u2, d2, s2));
        inner
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pairs
            .push(Pair { down, up, severed });
    }
}

/// Copies `from` to `to` until `from` ends; then passes the end on (a FIN)
/// unless the relay severed the pair.
fn copy(mut from: TcpStream, mut to: TcpStream, severed: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if severed.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    if !severed.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
