//! The `usbipd` engine: accepts connections, answers device lists and
//! imports from one [`Registry`], and runs each import's URBs.
//!
//! The entry point is [`run`], which serves a listener until a shutdown
//! future resolves, in the manner of mini-redis.
#![deny(unsafe_code)]

pub mod abuse;
pub mod acl;
pub mod capture;
pub mod gate;
pub mod metrics;
pub mod queue;
pub mod registry;
pub mod session;
pub mod state;
mod sys;
pub mod tls;
mod workers;

use workers::{Job, Workers};

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use usbwire_proto::{DecodeError, Limits};

pub use registry::{
    EndRequest, Importer, Registry, RegistryError, Removed, Reservation, WaitBounds,
};
pub use usbwire_usb::{Backend, Completion, TransferType, Urb, UrbId};

/// Bounds and policies of a server. [`ServerConfig::validate`] refuses
/// values that would let a client exhaust the machine.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Concurrent connections; further ones wait in the accept queue.
    pub max_connections: usize,
    /// URBs one connection may have in flight before the server stops
    /// reading from it.
    pub max_urbs_in_flight: usize,
    /// Transfer-buffer bytes one connection may have in flight.
    pub max_bytes_in_flight: usize,
    /// Bytes all connections together may have in flight (transfer
    /// buffers and replies not yet sent); a connection that would go over
    /// waits for its turn.
    pub max_inflight_bytes: usize,
    /// Hold an endpoint's queue after an error until the importer reacts
    /// (see `queue.rs`). Off only for debugging: it shows what breaks.
    pub hold_on_error: bool,
    /// The shortest error hold, whatever the measured round-trip time.
    pub hold_floor: Duration,
    /// The longest error hold.
    pub hold_ceiling: Duration,
    /// Threads that serve connections; 0 means one per CPU this process
    /// may run on.
    pub workers: usize,
    /// How long an import waits for the device's previous import to end.
    pub import_wait: WaitBounds,
    /// TLS, and which sources may still use plaintext.
    pub access: tls::Access,
    /// Which clients may see and import which devices.
    pub acl: acl::AccessControl,
    /// How long a client may take to complete its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// How long an import's replies may wait with the client reading
    /// none of them before the connection is ended (what they cost of
    /// `max_inflight_bytes` is then free for others).
    pub reply_stall_timeout: Duration,
    /// How refusals are counted, logged and, for failed handshakes,
    /// throttled per source.
    pub refusals: abuse::RefusalLimits,
    /// A check every import passes first (a fleet's reservations).
    pub import_gate: gate::Gate,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            max_connections: 1024,
            max_urbs_in_flight: 1024,
            max_bytes_in_flight: 64 * 1024 * 1024,
            max_inflight_bytes: 256 * 1024 * 1024,
            hold_on_error: true,
            hold_floor: Duration::from_millis(20),
            hold_ceiling: Duration::from_secs(1),
            workers: 0,
            import_wait: WaitBounds::default(),
            access: tls::Access::default(),
            acl: acl::AccessControl::default(),
            tls_handshake_timeout: tls::HANDSHAKE_TIMEOUT,
            reply_stall_timeout: Duration::from_secs(60),
            refusals: abuse::RefusalLimits::default(),
            import_gate: gate::Gate::default(),
        }
    }
}

/// A configuration value outside what the server accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} = {value} is out of range: it must be between {min} and {max}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError {
            name,
            value,
            min,
            max,
        });
    }
    Ok(())
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        check("max_connections", self.max_connections as u64, 1, 65_536)?;
        check(
            "max_urbs_in_flight",
            self.max_urbs_in_flight as u64,
            1,
            65_536,
        )?;
        check(
            "max_transfer_length",
            self.limits.max_transfer_length.into(),
            4096,
            64 << 20,
        )?;
        check(
            "max_bytes_in_flight",
            self.max_bytes_in_flight as u64,
            self.limits.max_transfer_length.into(),
            1 << 30,
        )?;
        check(
            "max_inflight_bytes",
            self.max_inflight_bytes as u64,
            self.limits.max_transfer_length.into(),
            1 << 40,
        )?;
        check(
            "max_iso_packets",
            self.limits.max_iso_packets.into(),
            1,
            4096,
        )?;
        check("workers", self.workers as u64, 0, 1024)?;
        check(
            "hold_floor_ms",
            self.hold_floor.as_millis() as u64,
            0,
            10_000,
        )?;
        check(
            "hold_ceiling_ms",
            self.hold_ceiling.as_millis() as u64,
            self.hold_floor.as_millis() as u64,
            60_000,
        )?;
        check(
            "reply_stall_timeout_secs",
            self.reply_stall_timeout.as_secs(),
            1,
            3600,
        )?;
        check(
            "tls_handshake_timeout_ms",
            self.tls_handshake_timeout.as_millis() as u64,
            100,
            300_000,
        )?;
        check(
            "failed_handshake_burst",
            self.refusals.failed_handshake_burst.into(),
            0,
            1_000_000,
        )?;
        check(
            "failed_handshake_refill_ms",
            self.refusals.failed_handshake_refill.as_millis() as u64,
            1,
            3_600_000,
        )?;
        check(
            "import_wait_close_ms",
            self.import_wait.close.as_millis() as u64,
            0,
            60_000,
        )?;
        check(
            "import_wait_release_ms",
            self.import_wait.release.as_millis() as u64,
            0,
            600_000,
        )?;
        Ok(())
    }

    /// The error-hold window for a connection: long enough for the
    /// importer's completion handler to react, which takes a round trip
    /// and its own processing, so several RTTs above a floor.
    pub fn hold_grace(&self, rtt: Option<Duration>) -> Duration {
        let from_rtt = rtt.map(|r| r * 4).unwrap_or_default();
        (self.hold_floor + from_rtt).min(self.hold_ceiling)
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("network I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] DecodeError),
    #[error("the client sent no request in time")]
    Timeout,
    #[error("CMD_SUBMIT with seqnum {0}, which an URB still in flight already has")]
    DuplicateSeqnum(u32),
    #[error(
        "the client read none of its replies for {0:?}: connection ended, so that what they \
         held of the server's in-flight budget goes to other imports ([server] \
         reply_stall_timeout_secs)"
    )]
    RepliesNotRead(Duration),
}

/// What every connection of a server shares: the exported devices and
/// the bounds they are served with.
pub(crate) struct ServerState {
    pub registry: Registry,
    pub config: ServerConfig,
    /// The bytes in flight all imports share.
    pub budget: Arc<abuse::ByteBudget>,
    /// Refusals per source, and their rate-limited log.
    pub refusals: abuse::RefusalLog,
    pub metrics: Arc<metrics::Metrics>,
    /// Where every import's URBs are recorded, if anywhere.
    pub capture: std::sync::OnceLock<Arc<capture::Capture>>,
}

impl ServerState {
    pub fn new(registry: Registry, config: ServerConfig) -> ServerState {
        ServerState {
            registry,
            budget: abuse::ByteBudget::new(config.max_inflight_bytes),
            refusals: abuse::RefusalLog::new(config.refusals),
            metrics: Arc::default(),
            capture: std::sync::OnceLock::new(),
            config,
        }
    }

    /// Puts the device back in the registry once `Backend::release` has
    /// readied it for the next importer. Waiters already know it is coming
    /// ([`Registry::ending`]). Releasing may block (a usbfs drain waits for
    /// the kernel, a disk flushes its image), so it runs on the blocking
    /// pool, never on the worker thread that serves other imports; the
    /// device is back the moment it is done.
    pub async fn release(self: &Arc<Self>, busid: &str, conn: u64, mut backend: Box<dyn Backend>) {
        self.registry.ending(busid, conn);
        let state = self.clone();
        let slot = busid.to_string();
        let released = tokio::task::spawn_blocking(move || {
            backend.release();
            state.registry.release(&slot, conn, backend);
        })
        .await;
        if let Err(e) = released {
            // The device stays marked as releasing, and waiters give up
            // on it: nothing can use it safely.
            error!(conn, %busid, "releasing the device failed: {e}");
        }
    }
}

/// A server: a registry of exported devices and the bounds it serves them with.
#[derive(Clone)]
pub struct Server {
    state: Arc<ServerState>,
    next_conn: Arc<AtomicU64>,
}

impl Server {
    pub fn new(registry: Registry, config: ServerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Server {
            state: Arc::new(ServerState::new(registry, config)),
            next_conn: Arc::new(AtomicU64::new(1)),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.state.registry
    }

    pub fn config(&self) -> &ServerConfig {
        &self.state.config
    }

    /// Refusals counted per source so far.
    pub fn refusals(&self) -> abuse::RefusalSnapshot {
        self.state.refusals.snapshot()
    }

    /// What the server has counted (connections, URBs by device, error
    /// holds, TLS handshakes) since it started.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.state.metrics
    }

    /// Records every import's URBs, from the next import on, into
    /// `capture` (see [`capture`]). A server captures into one file at
    /// most: `false` if it already has one.
    pub fn set_capture(&self, capture: Arc<capture::Capture>) -> bool {
        self.state.capture.set(capture).is_ok()
    }

    /// The capture set with [`Server::set_capture`], if any.
    pub fn capture(&self) -> Option<&Arc<capture::Capture>> {
        self.state.capture.get()
    }

    /// Bytes of the global in-flight budget no import holds now.
    pub fn inflight_budget_available(&self) -> i64 {
        self.state.budget.available()
    }

    /// Imports waiting for the global in-flight budget now.
    pub fn inflight_budget_waiters(&self) -> usize {
        self.state.budget.waiting()
    }

    /// Serves `listeners` until `shutdown` resolves, then ends every
    /// connection, gives every device back and flushes them all, so that no
    /// acknowledged write is lost.
    pub async fn run(&self, listeners: Vec<TcpListener>, shutdown: impl Future) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(self.state.config.max_connections));
        let workers = Arc::new(Workers::start(self.worker_count(), &self.state, &stop_rx));
        // Only if no worker thread could start.
        let local = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let acceptor =
            self.start_acceptor(listeners, permits, workers.clone(), local.clone(), &stop_rx);
        let refusals = self.state.clone();
        let summaries = async move {
            // Bounded by the server's life: the select below ends it. It
            // sleeps only after a refusal went unlogged, so an idle server
            // has no timer running.
            loop {
                refusals.refusals.suppressed().await;
                tokio::time::sleep(refusals.refusals.window()).await;
                refusals.refusals.log_flushed(std::time::Instant::now());
            }
        };
        tokio::select! {
            _ = shutdown => {}
            () = summaries => {}
        }
        info!("shutting down");
        let _ = stop_tx.send(true);
        acceptor.stop().await;
        match Arc::into_inner(workers) {
            Some(w) => w.join().await,
            None => error!("worker threads still referenced at shutdown"),
        }
        let mut local = std::mem::take(&mut *local.lock().unwrap_or_else(|e| e.into_inner()));
        while local.join_next().await.is_some() {}
        self.flush_all();
    }

    fn worker_count(&self) -> usize {
        match self.state.config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Flushes every device that is not imported.
    pub fn flush_all(&self) {
        for (busid, mut b) in self.state.registry.drain_available() {
            if let Err(e) = b.flush() {
                error!(%busid, "flushing device failed: {e}");
            }
            // Put it back so that a later run on the same registry still sees it.
            self.state.registry.restore(&busid, b);
        }
    }

    /// Accepts on `listeners` until `stop`, on a thread of its own at a
    /// lower priority than the workers (see [`ACCEPT_NICE`]); on the
    /// calling runtime if that thread cannot start.
    fn start_acceptor(
        &self,
        listeners: Vec<TcpListener>,
        permits: Arc<Semaphore>,
        workers: Arc<Workers>,
        local: Arc<std::sync::Mutex<JoinSet<()>>>,
        stop: &watch::Receiver<bool>,
    ) -> Acceptor {
        let loops = AcceptLoops {
            server: self.clone(),
            permits,
            workers,
            local,
            here: tokio::runtime::Handle::current(),
            stop: stop.clone(),
        };
        let (give, take) = std::sync::mpsc::channel::<Vec<std::net::TcpListener>>();
        let on_thread = loops.clone();
        let spawned = std::thread::Builder::new()
            .name("usbipd-accept".into())
            .spawn(move || {
                if let Err(e) = sys::lower_thread_priority(ACCEPT_NICE) {
                    warn!("the accepting thread keeps the workers' priority: {e}");
                }
                let Ok(listeners) = take.recv() else {
                    return;
                };
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        error!("cannot start the accepting thread's runtime, so nothing is accepted: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listeners = listeners
                        .into_iter()
                        .filter_map(|l| {
                            TcpListener::from_std(l)
                                .map_err(|e| error!("cannot accept on a listener: {e}"))
                                .ok()
                        })
                        .collect();
                    let mut accepting = on_thread.spawn(listeners);
                    while accepting.join_next().await.is_some() {}
                });
            });
        match spawned {
            Ok(thread) => {
                // Listeners leave this runtime's reactor for the thread's.
                let listeners = listeners
                    .into_iter()
                    .filter_map(|l| {
                        l.into_std()
                            .map_err(|e| {
                                error!("cannot move a listener to the accepting thread: {e}")
                            })
                            .ok()
                    })
                    .collect();
                let _ = give.send(listeners);
                Acceptor::Thread(thread)
            }
            Err(e) => {
                warn!("accepting on the main runtime: cannot start a thread for it: {e}");
                Acceptor::Here(loops.spawn(listeners))
            }
        }
    }

    async fn accept_loop(
        &self,
        listener: TcpListener,
        permits: Arc<Semaphore>,
        workers: Arc<Workers>,
        local: Arc<std::sync::Mutex<JoinSet<()>>>,
        here: tokio::runtime::Handle,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.changed() => return,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors and the like: back off rather than spin.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
            self.state.metrics.connection();
            debug!(conn, %peer, "connection");
            if let Err(wait) = self.state.refusals.may_handshake(peer.ip(), Instant::now()) {
                // Closed here, before a worker sees it: a flood of them
                // costs the connections being served as little as it can.
                if self
                    .state
                    .refusals
                    .count(peer.ip(), abuse::Refusal::Throttled)
                {
                    warn!(
                        conn, %peer,
                        "refused a connection unread: too many failed TLS handshakes from \
                         this source lately (it may connect again in {wait:?})"
                    );
                }
                // A reset, not a close: no FIN exchange and no TIME_WAIT
                // socket for the kernel to keep per refused connection.
                let _ = stream.set_zero_linger();
                continue;
            }
            if let Err(e) = set_keepalive(&stream) {
                debug!(conn, %peer, "cannot set TCP keepalive: {e}");
            }
            // Leaves this runtime's reactor; the worker registers it with its own.
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    warn!(conn, %peer, "cannot hand the connection over: {e}");
                    continue;
                }
            };
            let job = Job {
                stream,
                peer,
                conn,
                permit,
            };
            if let Err(job) = workers.dispatch(job) {
                let (state, stop) = (self.state.clone(), stop.clone());
                let load = Arc::new(AtomicUsize::new(0));
                local
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .spawn_on(workers::serve(job, state, stop, load), &here);
            }
        }
    }
}

/// How much less CPU the accepting thread gets than the workers when they
/// compete for it (a nice value, relative to theirs): a flood of
/// connections, refused or throttled, then waits in the kernel's accept
/// queue rather than taking CPU from the imports being served, and past the
/// queue's backlog the kernel drops the flood's SYNs, which slows it down.
/// At 10 the acceptor still gets about a tenth of a busy CPU: hundreds of
/// connections a second.
pub const ACCEPT_NICE: i32 = 10;

/// What every accept loop shares.
#[derive(Clone)]
struct AcceptLoops {
    server: Server,
    permits: Arc<Semaphore>,
    workers: Arc<Workers>,
    local: Arc<std::sync::Mutex<JoinSet<()>>>,
    /// The server's own runtime, where a connection no worker took is served.
    here: tokio::runtime::Handle,
    stop: watch::Receiver<bool>,
}

impl AcceptLoops {
    /// One accept loop per listener, on the current runtime.
    fn spawn(&self, listeners: Vec<TcpListener>) -> JoinSet<()> {
        let mut accepting = JoinSet::new();
        for listener in listeners {
            let l = self.clone();
            accepting.spawn(async move {
                l.server
                    .accept_loop(listener, l.permits, l.workers, l.local, l.here, l.stop)
                    .await;
            });
        }
        accepting
    }
}

/// Where the accept loops run.
enum Acceptor {
    Thread(std::thread::JoinHandle<()>),
    Here(JoinSet<()>),
}

impl Acceptor {
    /// Waits for the loops, which end once the server's stop is sent.
    async fn stop(self) {
        match self {
            Acceptor::Thread(thread) => {
                if tokio::task::spawn_blocking(move || thread.join())
                    .await
                    .is_err()
                {
                    error!("the accepting thread panicked");
                }
            }
            Acceptor::Here(mut loops) => loops.shutdown().await,
        }
    }
}

/// Keepalive of every accepted connection, so that a device whose client
/// vanished (machine off, path black-holed) is freed for others: probes
/// after 10 s idle, every 5 s, 3 unanswered drop it (25 s), and data left
/// unacknowledged for 30 s does too. A client that comes back after a
/// network outage has forgotten the old connection: the next probe draws
/// its reset and frees the device for the new import. Never shorter than
/// a persistent client's (`usbwire_client::persist::CLIENT_KEEPALIVE`,
/// 11 s and 10 s): the client is the one that notices and comes back.
pub const SERVER_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
pub const SERVER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const SERVER_KEEPALIVE_COUNT: u32 = 3;
pub const SERVER_USER_TIMEOUT: Duration = Duration::from_secs(30);

fn set_keepalive(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(SERVER_KEEPALIVE_IDLE)
            .with_interval(SERVER_KEEPALIVE_INTERVAL)
            .with_retries(SERVER_KEEPALIVE_COUNT),
    )?;
    sock.set_tcp_user_timeout(Some(SERVER_USER_TIMEOUT))
}
