//! Abuse resistance shared by every connection of a server: one budget of
//! bytes in flight across all imports, and per-source counts of refusals,
//! logged at a bounded rate.
//!
//! Both are sans-IO: time is an argument, and a session that has to wait
//! for budget is told through the waker it already gives its backend.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use tracing::warn;

/// The bytes every import of a server may hold in flight together:
/// transfer buffers of URBs not yet completed and replies not yet sent.
///
/// A session that cannot get what its next command needs stops taking
/// commands (and so, once its read buffer is full, stops reading): it is
/// backpressure, not an error. Waiters are served first come, first
/// served: while one waits, no later session takes budget ahead of it, so
/// none waits forever while others keep going.
pub struct ByteBudget {
    total: usize,
    next_id: AtomicU64,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    /// May go below zero: a completed URB's reply can hold a little more
    /// than its transfer length (its buffer's spare room), and that is
    /// charged after the fact.
    available: i64,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    id: u64,
    needs: usize,
    waker: Waker,
}

impl ByteBudget {
    pub fn new(total: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            total,
            next_id: AtomicU64::new(0),
            state: Mutex::new(BudgetState {
                available: total as i64,
                waiters: VecDeque::new(),
            }),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes no session holds now.
    pub fn available(&self) -> i64 {
        self.lock().available
    }

    /// Sessions waiting for budget now.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }

    /// A share for one session: it starts holding nothing, and gives back
    /// what it holds when dropped.
    pub fn share(self: &Arc<Self>) -> BudgetShare {
        BudgetShare {
            budget: self.clone(),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            held: 0,
            queued: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BudgetState {
    /// Wakes the first waiter if what it needs is there now.
    fn wake_front(&self) {
        if let Some(w) = self.waiters.front() {
            if self.available >= w.needs as i64 {
                w.waker.wake_by_ref();
            }
        }
    }
}

/// What one session holds of a [`ByteBudget`].
pub struct BudgetShare {
    budget: Arc<ByteBudget>,
    id: u64,
    held: usize,
    /// Whether this share is in the budget's queue of waiters.
    queued: bool,
}

impl BudgetShare {
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether this share waits in the budget's queue.
    pub fn is_waiting(&self) -> bool {
        self.queued
    }

    /// Makes this share hold at least `bytes`, if the budget has the
    /// difference and no earlier session waits for it. If not, `waker` is
    /// woken when it may have: ask again then.
    pub fn try_hold(&mut self, bytes: usize, waker: &Waker) -> bool {
        if bytes <= self.held {
            if self.queued {
                // What it waited for came back from its own session: it
                // must not hold up those behind it.
                let mut s = self.budget.lock();
                s.waiters.retain(|w| w.id != self.id);
                s.wake_front();
                self.queued = false;
            }
            return true;
        }
        let more = bytes - self.held;
        let mut s = self.budget.lock();
        let first = s.waiters.front().is_none_or(|w| w.id == self.id);
        if first && s.available >= more as i64 {
            s.available -= more as i64;
            self.held = bytes;
            if self.queued {
                s.waiters.pop_front();
                s.wake_front();
                self.queued = false;
            }
            return true;
        }
        self.queued = true;
        match s.waiters.iter_mut().find(|w| w.id == self.id) {
            Some(w) => {
                w.needs = more;
                w.waker.clone_from(waker);
            }
            None => s.waiters.push_back(Waiter {
                id: self.id,
                needs: more,
                waker: waker.clone(),
            }),
        }
        false
    }

    /// Makes this share hold exactly `bytes`: gives back any excess, and
    /// takes a shortfall even beyond what is available (for memory the
    /// session already uses; it is charged so that others wait for it).
    pub fn settle(&mut self, bytes: usize) {
        if bytes == self.held {
            return;
        }
        let mut s = self.budget.lock();
        s.available += self.held as i64 - bytes as i64;
        self.held = bytes;
        s.wake_front();
    }
}

impl Drop for BudgetShare {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        s.available += self.held as i64;
        s.waiters.retain(|w| w.id != self.id);
        s.wake_front();
    }
}

/// Why a connection or a request was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A TLS handshake that failed or did not finish in time.
    FailedHandshake,
    /// A connection refused before its request: TLS not configured,
    /// plaintext not allowed from its source.
    RefusedConnection,
    /// An import refused (no such device, busy, not allowed).
    RefusedImport,
    /// A connection closed as it was accepted: its source failed too
    /// many TLS handshakes lately.
    Throttled,
}

/// Refusals of one source (or of all sources together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    pub failed_handshakes: u64,
    pub refused_connections: u64,
    pub refused_imports: u64,
    pub throttled_connections: u64,
}

impl RefusalCounts {
    fn add(&mut self, kind: Refusal) {
        let n = match kind {
            Refusal::FailedHandshake => &mut self.failed_handshakes,
            Refusal::RefusedConnection => &mut self.refused_connections,
            Refusal::RefusedImport => &mut self.refused_imports,
            Refusal::Throttled => &mut self.throttled_connections,
        };
        *n = n.saturating_add(1);
    }

    pub fn total(&self) -> u64 {
        self.failed_handshakes
            .saturating_add(self.refused_connections)
            .saturating_add(self.refused_imports)
            .saturating_add(self.throttled_connections)
    }
}

/// The counters at one moment, for metrics (issue #16) and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusalSnapshot {
    /// Every refusal since start, tracked sources or not.
    pub total: RefusalCounts,
    /// The sources tracked now, most refusals first.
    pub sources: Vec<(IpAddr, RefusalCounts)>,
    /// Sources forgotten to make room for newer ones.
    pub evicted_sources: u64,
}

/// The bounds of a [`RefusalLog`].
#[derive(Debug, Clone, Copy)]
pub struct RefusalLimits {
    /// Sources tracked at most; the one seen least recently makes room.
    pub max_sources: usize,
    /// Refusals logged per source per window; the rest are counted and
    /// summed up in one line when the window is over.
    pub logged_per_window: u32,
    pub window: Duration,
    /// Failed TLS handshakes a source may have in a row; beyond that its
    /// connections are closed as they are accepted (no worker, no
    /// handshake) until it has earned credit back. 0 turns the throttle
    /// off.
    pub failed_handshake_burst: u32,
    /// One failed handshake's credit comes back after this long.
    pub failed_handshake_refill: Duration,
}

impl Default for RefusalLimits {
    fn default() -> Self {
        RefusalLimits {
            max_sources: 4096,
            logged_per_window: 10,
            window: Duration::from_secs(60),
            failed_handshake_burst: 16,
            failed_handshake_refill: Duration::from_secs(1),
        }
    }
}

struct Source {
    counts: RefusalCounts,
    last_seen: Instant,
    window_start: Instant,
    logged: u32,
    suppressed: u64,
    /// Failed handshakes the source may still have (a token bucket).
    credit: u32,
    /// When `credit` was last topped up.
    credit_at: Instant,
}

impl Source {
    fn new(now: Instant, limits: &RefusalLimits) -> Source {
        Source {
            counts: RefusalCounts::default(),
            last_seen: now,
            window_start: now,
            logged: 0,
            suppressed: 0,
            credit: limits.failed_handshake_burst,
            credit_at: now,
        }
    }

    fn refill(&mut self, limits: &RefusalLimits, now: Instant) {
        let every = limits.failed_handshake_refill.as_nanos().max(1);
        let earned = now.saturating_duration_since(self.credit_at).as_nanos() / every;
        if earned == 0 {
            return;
        }
        let credit = (u128::from(self.credit) + earned).min(limits.failed_handshake_burst.into());
        self.credit = credit as u32;
        self.credit_at = if self.credit == limits.failed_handshake_burst {
            now
        } else {
            self.credit_at + limits.failed_handshake_refill * earned as u32
        };
    }
}

/// What to log for one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogDecision {
    /// Log this refusal's own line.
    pub log: bool,
    /// Before it, one line saying this many refusals of the source's last
    /// window went unlogged.
    pub suppressed_before: u64,
}

/// Refusals counted per source IP, in a bounded table, and the decision
/// which of them to log so that a flood cannot fill the disk or slow the
/// server with its own log lines.
pub struct RefusalLog {
    limits: RefusalLimits,
    state: Mutex<RefusalState>,
    /// Told when a source's window first leaves a refusal unlogged.
    suppressing: tokio::sync::Notify,
}

#[derive(Default)]
struct RefusalState {
    total: RefusalCounts,
    sources: HashMap<IpAddr, Source>,
    evicted: u64,
}

impl RefusalLog {
    pub fn new(limits: RefusalLimits) -> RefusalLog {
        RefusalLog {
            limits,
            state: Mutex::new(RefusalState::default()),
            suppressing: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RefusalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refusal of `source` at `now`, and says what to log.
    pub fn record(&self, source: IpAddr, kind: Refusal, now: Instant) -> LogDecision {
        // A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
        let source = source.to_canonical();
        let mut s = self.lock();
        s.total.add(kind);
        if !s.sources.contains_key(&source) && s.sources.len() >= self.limits.max_sources.max(1) {
            // Bounded by max_sources; only when the table is full.
            let oldest = s
                .sources
                .iter()
                .min_by_key(|(_, src)| src.last_seen)
                .map(|(ip, _)| *ip);
            if let Some(ip) = oldest {
                s.sources.remove(&ip);
                s.evicted += 1;
            }
        }
        let limits = &self.limits;
        let src = s
            .sources
            .entry(source)
            .or_insert_with(|| Source::new(now, limits));
        src.counts.add(kind);
        if kind == Refusal::FailedHandshake {
            src.refill(limits, now);
            src.credit = src.credit.saturating_sub(1);
        }
        src.last_seen = now;
        let mut suppressed_before = 0;
        if now.saturating_duration_since(src.window_start) >= self.limits.window {
            suppressed_before = std::mem::take(&mut src.suppressed);
            src.window_start = now;
            src.logged = 0;
        }
        let log = src.logged < self.limits.logged_per_window;
        if log {
            src.logged += 1;
        } else {
            src.suppressed += 1;
            if src.suppressed == 1 {
                self.suppressing.notify_one();
            }
        }
        LogDecision {
            log,
            suppressed_before,
        }
    }

    /// Whether a connection from `source` may be served at `now`; if not,
    /// how long until it may. A source that keeps failing handshakes costs
    /// the server an accept and a close, not a handshake each.
    pub fn may_handshake(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limits.failed_handshake_burst == 0 {
            return Ok(());
        }
        let mut s = self.lock();
        let Some(src) = s.sources.get_mut(&source.to_canonical()) else {
            return Ok(());
        };
        src.refill(&self.limits, now);
        if src.credit > 0 {
            return Ok(());
        }
        let since = now.saturating_duration_since(src.credit_at);
        Err(self.limits.failed_handshake_refill.saturating_sub(since))
    }

    /// Ends the windows that are over at `now` and returns, per source,
    /// how many of its refusals went unlogged in it, so that a flood that
    /// stopped is still summed up.
    pub fn flush(&self, now: Instant) -> Vec<(IpAddr, u64)> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for (ip, src) in &mut s.sources {
            if src.suppressed > 0
                && now.saturating_duration_since(src.window_start) >= self.limits.window
            {
                out.push((*ip, std::mem::take(&mut src.suppressed)));
                src.window_start = now;
                src.logged = 0;
            }
        }
        out.sort();
        out
    }

    pub fn snapshot(&self) -> RefusalSnapshot {
        let s = self.lock();
        let mut sources: Vec<_> = s.sources.iter().map(|(ip, s)| (*ip, s.counts)).collect();
        sources.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(&b.0)));
        RefusalSnapshot {
            total: s.total,
            sources,
            evicted_sources: s.evicted,
        }
    }

    /// Counts a refusal of `source` now; whether its own line may be
    /// logged (a summary of the source's last window is logged here).
    pub fn count(&self, source: IpAddr, kind: Refusal) -> bool {
        let d = self.record(source, kind, Instant::now());
        log_suppressed(source.to_canonical(), d.suppressed_before);
        d.log
    }

    /// Logs the summaries of windows that are over (see
    /// [`RefusalLog::flush`]).
    pub fn log_flushed(&self, now: Instant) {
        for (ip, n) in self.flush(now) {
            log_suppressed(ip, n);
        }
    }

    /// Resolves once a refusal went unlogged since the last call: a
    /// window will need its summary.
    pub async fn suppressed(&self) {
        self.suppressing.notified().await;
    }

    pub fn window(&self) -> Duration {
        self.limits.window
    }
}

fn log_suppressed(source: IpAddr, n: u64) {
    if n > 0 {
        warn!("{n} more refusals from {source} suppressed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn waker() -> (Arc<CountingWaker>, Waker) {
        let w = Arc::new(CountingWaker::default());
        (w.clone(), Waker::from(w))
    }

    #[test]
    fn a_waiter_is_served_before_later_sessions() {
        let budget = ByteBudget::new(100);
        let (a_woken, a_waker) = waker();
        let (_, b_waker) = waker();
        let (_, c_waker) = waker();
        let mut a = budget.share();
        let mut b = budget.share();
        let mut c = budget.share();
        assert!(b.try_hold(80, &b_waker));
        assert!(!a.try_hold(50, &a_waker), "only 20 left");
        // 20 are free, but A waits first: C must not overtake it.
        assert!(!c.try_hold(10, &c_waker));
        assert_eq!(budget.waiting(), 2);
        b.settle(40);
        assert_eq!(a_woken.0.load(Ordering::SeqCst), 1, "A's 50 fit now");
        assert!(!c.try_hold(10, &c_waker), "still A's turn");
        assert!(a.try_hold(50, &a_waker));
        assert!(c.try_hold(10, &c_waker));
        assert_eq!(budget.available(), 0);
        drop(a);
        drop(b);
        drop(c);
        assert_eq!(budget.available(), 100);
        assert_eq!(budget.waiting(), 0);
    }

    #[test]
    fn a_dropped_waiter_lets_the_next_one_in() {
        let budget = ByteBudget::new(10);
        let mut holder = budget.share();
        assert!(holder.try_hold(10, &waker().1));
        let mut first = budget.share();
        assert!(!first.try_hold(5, &waker().1));
        let (second_woken, second_waker) = waker();
        let mut second = budget.share();
        assert!(!second.try_hold(5, &second_waker));
        holder.settle(0);
        drop(first);
        assert!(second_woken.0.load(Ordering::SeqCst) >= 1);
        assert!(second.try_hold(5, &second_waker));
    }

    #[test]
    fn settle_charges_memory_already_used() {
        let budget = ByteBudget::new(10);
        let mut a = budget.share();
        a.settle(12);
        assert_eq!(budget.available(), -2);
        let mut b = budget.share();
        assert!(!b.try_hold(1, &waker().1));
        a.settle(0);
        assert!(b.try_hold(1, &waker().1));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate_per_source() {
        let log = RefusalLog::new(RefusalLimits {
            max_sources: 16,
            logged_per_window: 3,
            window: Duration::from_secs(60),
            ..RefusalLimits::default()
        });
        let t0 = Instant::now();
        let flood = ip("192.0.2.7");
        let logged = (0..1000)
            .filter(|i| {
                let d = log.record(
                    flood,
                    Refusal::FailedHandshake,
                    t0 + Duration::from_millis(*i),
                );
                assert_eq!(d.suppressed_before, 0);
                d.log
            })
            .count();
        assert_eq!(logged, 3);
        // Another source has its own allowance.
        assert!(log.record(ip("192.0.2.8"), Refusal::RefusedImport, t0).log);
        // Nothing to sum up before the window is over...
        assert!(log.flush(t0 + Duration::from_secs(59)).is_empty());
        // ...then one summary, once.
        let t1 = t0 + Duration::from_secs(61);
        assert_eq!(log.flush(t1), vec![(flood, 997)]);
        assert!(log.flush(t1).is_empty());
        let d = log.record(flood, Refusal::FailedHandshake, t1 + Duration::from_secs(1));
        assert_eq!(
            d,
            LogDecision {
                log: true,
                suppressed_before: 0
            }
        );
        let snap = log.snapshot();
        assert_eq!(snap.total.total(), 1002);
        assert_eq!(snap.sources[0].0, flood);
        assert_eq!(snap.sources[0].1.failed_handshakes, 1001);
        assert_eq!(snap.sources[1].1.refused_imports, 1);
    }

    #[test]
    fn the_next_refusal_after_a_window_carries_its_summary() {
        let log = RefusalLog::new(RefusalLimits {
            max_sources: 16,
            logged_per_window: 1,
            window: Duration::from_secs(60),
            ..RefusalLimits::default()
        });
        let t0 = Instant::now();
        let src = ip("::ffff:198.51.100.1");
        assert!(log.record(src, Refusal::RefusedConnection, t0).log);
        assert!(!log.record(src, Refusal::RefusedConnection, t0).log);
        assert!(!log.record(src, Refusal::RefusedConnection, t0).log);
        let d = log.record(
            src,
            Refusal::RefusedConnection,
            t0 + Duration::from_secs(60),
        );
        assert!(d.log);
        assert_eq!(d.suppressed_before, 2);
        // Counted as the IPv4 address it is.
        assert_eq!(log.snapshot().sources[0].0, ip("198.51.100.1"));
    }

    #[test]
    fn a_source_that_keeps_failing_handshakes_is_throttled() {
        let log = RefusalLog::new(RefusalLimits {
            failed_handshake_burst: 3,
            failed_handshake_refill: Duration::from_secs(1),
            ..RefusalLimits::default()
        });
        let t0 = Instant::now();
        let (bad, good) = (ip("192.0.2.66"), ip("192.0.2.1"));
        for _ in 0..3 {
            assert_eq!(log.may_handshake(bad, t0), Ok(()));
            log.record(bad, Refusal::FailedHandshake, t0);
        }
        assert_eq!(
            log.may_handshake(bad, t0 + Duration::from_millis(400)),
            Err(Duration::from_millis(600))
        );
        // Other sources, and refusals of other kinds, are not affected.
        log.record(good, Refusal::RefusedImport, t0);
        assert_eq!(log.may_handshake(good, t0), Ok(()));
        // One credit back per second, up to the burst.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.may_handshake(bad, t1), Ok(()));
        log.record(bad, Refusal::FailedHandshake, t1);
        assert!(log.may_handshake(bad, t1).is_err());
        let t2 = t1 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(log.may_handshake(bad, t2), Ok(()));
            log.record(bad, Refusal::FailedHandshake, t2);
        }
        assert!(log.may_handshake(bad, t2).is_err());
    }

    /// A server with TLS on whose failed-handshake throttle lets a source
    /// fail `burst` handshakes; its address.
    async fn throttling_server(burst: u32) -> (std::net::SocketAddr, crate::Server) {
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let mut config = crate::ServerConfig::default();
        config.access.tls = Some(Arc::new(tls));
        config.workers = 1;
        config.refusals.failed_handshake_burst = burst;
        config.refusals.failed_handshake_refill = Duration::from_secs(3600);
        let server = crate::Server::new(crate::Registry::new(), config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let run = server.clone();
        tokio::spawn(async move { run.run(vec![listener], std::future::pending::<()>()).await });
        (addr, server)
    }

    /// Connects, sends a TLS record that no handshake survives, and waits
    /// for the server's close.
    async fn fail_a_handshake(addr: std::net::SocketAddr) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A throttled connection is reset as soon as it is accepted, which
        // on loopback can come before connect() has seen the handshake end:
        // the server has counted it either way.
        let mut c = match tokio::net::TcpStream::connect(addr).await {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connecting to the test server: {e}"),
        };
        // A ClientHello of length 0.
        let _ = c.write_all(&[0x16, 3, 1, 0, 4, 1, 0, 0, 0]).await;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn a_source_that_keeps_failing_handshakes_is_closed_before_any_work() {
        let (addr, server) = throttling_server(2).await;
        fail_a_handshake(addr).await;
        fail_a_handshake(addr).await;
        let counts = server.refusals().total;
        assert_eq!(counts.failed_handshakes, 2);
        assert_eq!(counts.throttled_connections, 0);
        fail_a_handshake(addr).await;
        let counts = server.refusals().total;
        assert_eq!(counts.failed_handshakes, 2, "no third handshake was tried");
        assert_eq!(counts.throttled_connections, 1);
        // What `usbipd --metrics` shows of it.
        assert_eq!(server.metrics().tls_handshakes(), (0, 2));
        assert_eq!(server.metrics().connections(), 3);
    }

    /// The nice value of this process's thread named `name`, if there is one.
    fn nice_of_thread(name: &str) -> Option<i64> {
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .flatten()
            .find_map(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                if comm.trim_end() != name {
                    return None;
                }
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                // Fields after the parenthesised command name; nice is field 19.
                let after = &stat[stat.rfind(')')? + 2..];
                after.split(' ').nth(16)?.parse().ok()
            })
    }

    #[tokio::test]
    async fn connections_are_accepted_on_a_thread_that_yields_to_the_imports() {
        let (addr, server) = throttling_server(1).await;
        // Once one connection is served, the accepting thread runs.
        fail_a_handshake(addr).await;
        let ours = nice_of_thread(&std::fs::read_to_string("/proc/thread-self/comm").unwrap())
            .unwrap_or(0);
        let nice = nice_of_thread("usbipd-accept").expect("an accepting thread");
        assert_eq!(nice, (ours + i64::from(crate::ACCEPT_NICE)).min(19));
        assert_eq!(server.refusals().total.failed_handshakes, 1);
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let log = RefusalLog::new(RefusalLimits {
            max_sources: 4,
            logged_per_window: 1,
            window: Duration::from_secs(60),
            ..RefusalLimits::default()
        });
        let t0 = Instant::now();
        for i in 0..100u8 {
            let at = t0 + Duration::from_millis(i.into());
            log.record(IpAddr::from([10, 0, 0, i]), Refusal::FailedHandshake, at);
        }
        let snap = log.snapshot();
        assert_eq!(snap.sources.len(), 4);
        assert_eq!(snap.evicted_sources, 96);
        assert_eq!(snap.total.failed_handshakes, 100);
        // The most recent ones stay.
        assert!(snap
            .sources
            .iter()
            .all(|(ip, _)| matches!(ip, IpAddr::V4(v) if v.octets()[3] >= 96)));
    }
}
