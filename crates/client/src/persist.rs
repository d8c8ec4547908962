//! Attachments that come back: a supervisor that keeps one remote device
//! imported, re-importing it with bounded exponential backoff whenever its
//! connection ends (server restart, network loss, the server asleep).
//!
//! The supervisor ([`supervise`]) only sequences; what an attachment is
//! comes from an [`Attach`]: [`VhciAttach`] hands each import to the
//! kernel's vhci-hcd (`usbip attach --persist`), [`PersistentDevice`]
//! keeps a userspace [`crate::RemoteDevice`]. Every state change goes
//! to a callback as a [`PersistState`] and to `tracing`.
//!
//! Each attempt is bounded: connecting by [`CONNECT_TIMEOUT`], the import
//! reply by [`IMPORT_TIMEOUT`], so a black-holed path costs one timed-out
//! attempt, never a hang. Between attempts the supervisor waits
//! [`Backoff::DEFAULT`]: 0.5 s, doubling, capped at 2 s, and back to
//! 0.5 s after every successful attach. A server that comes back (and
//! refuses connections while it is down) is therefore re-imported within
//! 2 s of listening again, plus one import.
//!
//! A dead path must also end the kernel's connection, or vhci-hcd would
//! keep the port (and the supervisor would wait) until TCP gives up after
//! many minutes: every socket a supervisor attaches carries
//! [`CLIENT_KEEPALIVE`] (probes after 5 s idle, every 2 s, 3 of them; and
//! TCP_USER_TIMEOUT 10 s for data left unacknowledged), so the kernel
//! frees the port within about 11 s of the path going silent.

mod record;
mod remote;
mod vhci;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

pub use record::{PersistRecord, Transition, MAX_TRANSITIONS, PERSIST_DIR};
pub use remote::{PersistError, PersistentDevice};
pub use vhci::{VhciAttach, VhciSession};

/// How long connecting to the server may take in one attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server may take to answer OP_REQ_IMPORT in one attempt
/// (over TLS: the handshake and the answer).
pub const IMPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalive and user timeout of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (TCP_KEEPIDLE).
    pub idle: Duration,
    /// Time between probes (TCP_KEEPINTVL).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    pub count: u32,
    /// How long sent data may stay unacknowledged (TCP_USER_TIMEOUT).
    pub user_timeout: Duration,
}

/// What a persistent attachment's socket carries: a silent path ends the
/// connection after 5 + 3 * 2 = 11 s idle, or 10 s with data unacknowledged.
pub const CLIENT_KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(5),
    interval: Duration::from_secs(2),
    count: 3,
    user_timeout: Duration::from_secs(10),
};

impl Keepalive {
    /// Sets SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT.
    pub fn apply(&self, socket: &impl AsFd) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        let secs = |d: Duration| d.as_secs().clamp(1, u32::MAX as u64) as u32;
        setsockopt(socket, sockopt::KeepAlive, &true)?;
        setsockopt(socket, sockopt::TcpKeepIdle, &secs(self.idle))?;
        setsockopt(socket, sockopt::TcpKeepInterval, &secs(self.interval))?;
        setsockopt(socket, sockopt::TcpKeepCount, &self.count)?;
        let ms = self.user_timeout.as_millis().min(u32::MAX as u128) as u32;
        setsockopt(socket, sockopt::TcpUserTimeout, &ms)?;
        Ok(())
    }
}

/// The wait before each retry: `first`, doubling up to `cap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// 0.5 s doubling to 2 s: a restarted server is re-imported within
    /// 5 s of its restart even when it restarts just after an attempt.
    pub const DEFAULT: Backoff = Backoff {
        first: Duration::from_millis(500),
        cap: Duration::from_secs(2),
        next: Duration::from_millis(500),
    };

    pub fn new(first: Duration, cap: Duration) -> Backoff {
        let first = first.min(cap);
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The wait before the next attempt; each call doubles the one after,
    /// up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }

    /// After a successful attach: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    pub fn cap(&self) -> Duration {
        self.cap
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::DEFAULT
    }
}

/// Where a supervised attachment stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersistState {
    /// Attempt `attempt` (counted from 1 since the supervisor started) is
    /// connecting and importing.
    Connecting { attempt: u32 },
    /// Imported and handed over; `port` is the vhci-hcd port when the
    /// session went to the kernel.
    Attached {
        port: Option<u32>,
        since: SystemTime,
    },
    /// The session ended, or an attempt failed: why.
    Disconnected { reason: String },
    /// Waiting before attempt `attempt`, until `until`.
    Waiting { until: SystemTime, attempt: u32 },
    /// Stopped for good (asked to, or the first attempt failed for a
    /// permanent reason).
    Stopped,
}

impl PersistState {
    /// The state's name in the state file and `usbip port --json`.
    pub fn name(&self) -> &'static str {
        match self {
            PersistState::Connecting { .. } => "connecting",
            PersistState::Attached { .. } => "attached",
            PersistState::Disconnected { .. } => "disconnected",
            PersistState::Waiting { .. } => "waiting",
            PersistState::Stopped => "stopped",
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AttemptError {
    pub message: String,
    /// Retrying cannot help as things stand (no such device on the
    /// server, vhci-hcd not loaded, not root, the server's certificate not
    /// the one trusted ...). Only decides whether a *first* attempt ends
    /// the supervisor ([`SuperviseOptions::stop_on_permanent_first`]):
    /// later, the server may export the device again.
    pub permanent: bool,
}

impl AttemptError {
    pub fn transient(message: impl Into<String>) -> AttemptError {
        AttemptError {
            message: message.into(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl Into<String>) -> AttemptError {
        AttemptError {
            message: message.into(),
            permanent: true,
        }
    }
}

/// One kind of attachment the supervisor keeps alive.
pub trait Attach {
    /// An imported device not yet handed over.
    type Imported: Send + 'static;
    /// A handed-over device whose end can be awaited.
    type Session: Send + 'static;

    /// Connects and imports, bounded in time. Dropped (cancelled) when the
    /// supervisor is stopped meanwhile: nothing may be attached then.
    fn import(&mut self) -> impl Future<Output = Result<Self::Imported, AttemptError>> + Send;

    /// Hands the import over (to vhci-hcd ...): never cancelled, so that
    /// a stop can report the port it ended up on. Returns the session and
    /// its vhci port, if any.
    fn hand_over(
        &mut self,
        imported: Self::Imported,
    ) -> impl Future<Output = Result<(Self::Session, Option<u32>), AttemptError>> + Send;

    /// Resolves when the session has ended, with why. Cancelled on stop.
    fn ended(&mut self, session: &mut Self::Session) -> impl Future<Output = String> + Send;

    /// After a session ended (before the next attempt): forget it, e.g.
    /// remove its port record.
    fn cleanup(&mut self, _session: Self::Session) {}
}

/// How [`supervise`] behaves.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    pub backoff: Backoff,
    /// Give up when the very first attempt fails for a permanent reason
    /// (`usbip attach --persist` then fails as `usbip attach` would).
    pub stop_on_permanent_first: bool,
}

impl Default for SuperviseOptions {
    fn default() -> Self {
        SuperviseOptions {
            backoff: Backoff::DEFAULT,
            stop_on_permanent_first: true,
        }
    }
}

/// How a supervisor ended.
#[derive(Debug)]
pub enum Supervised<S> {
    /// Asked to stop; the session attached at that time, if any (still
    /// attached: stopping does not detach), and its port.
    Stopped {
        session: Option<S>,
        port: Option<u32>,
    },
    /// The first attempt failed for a permanent reason.
    FirstAttemptFailed(AttemptError),
}

/// Keeps `attach` attached until `stop` turns true (or its sender is
/// dropped), reporting every state change to `report`.
pub async fn supervise<A: Attach>(
    attach: &mut A,
    options: SuperviseOptions,
    mut stop: watch::Receiver<bool>,
    mut report: impl FnMut(&PersistState),
) -> Supervised<A::Session> {
    let mut backoff = options.backoff;
    let mut set = |s: PersistState| {
        match &s {
            PersistState::Connecting { attempt } => tracing::info!(attempt, "connecting"),
            PersistState::Attached { port, .. } => tracing::info!(?port, "attached"),
            PersistState::Disconnected { reason } => tracing::warn!(%reason, "disconnected"),
            PersistState::Waiting { attempt, .. } => {
                tracing::info!(next_attempt = attempt, "waiting")
            }
            PersistState::Stopped => tracing::info!("stopped"),
        }
        report(&s);
    };
    let mut attempt: u32 = 0;
    loop {
        attempt = attempt.saturating_add(1);
        set(PersistState::Connecting { attempt });
        let imported = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            r = attach.import() => r,
        };
        let handed = match imported {
            Ok(i) => attach.hand_over(i).await,
            Err(e) => Err(e),
        };
        match handed {
            Ok((mut session, port)) => {
                backoff.reset();
                set(PersistState::Attached {
                    port,
                    since: SystemTime::now(),
                });
                let reason = tokio::select! {
                    biased;
                    _ = stopped(&mut stop) => {
                        set(PersistState::Stopped);
                        return Supervised::Stopped { session: Some(session), port };
                    }
                    r = attach.ended(&mut session) => r,
                };
                attach.cleanup(session);
                set(PersistState::Disconnected { reason });
            }
            Err(e) => {
                if attempt == 1 && e.permanent && options.stop_on_permanent_first {
                    set(PersistState::Disconnected {
                        reason: e.message.clone(),
                    });
                    set(PersistState::Stopped);
                    return Supervised::FirstAttemptFailed(e);
                }
                set(PersistState::Disconnected { reason: e.message });
            }
        }
        let delay = backoff.next_delay();
        set(PersistState::Waiting {
            until: SystemTime::now() + delay,
            attempt: attempt.saturating_add(1),
        });
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    set(PersistState::Stopped);
    Supervised::Stopped {
        session: None,
        port: None,
    }
}

/// Resolves once `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests;
