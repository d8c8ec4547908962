//! A check every import passes before the registry hands the device out:
//! the hook through which a fleet's reservations (crates/fleet) keep a
//! reserved device for its holder. Without a gate every import goes on as
//! before.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use usbwire_proto::{ImportToken, OpStatus};

use crate::acl::Peer;

/// The longest a gate may take to answer; past it the import is refused,
/// so that a hung store cannot hold a session (and its client) forever.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a gate's answer is, boxed so that the trait stays object-safe.
pub type GateFuture<'a> = Pin<Box<dyn Future<Output = Result<(), GateRefusal>> + Send + 'a>>;

/// Decides whether `peer` may import the device exported as `busid`,
/// given the reservation token its request carried (see [`ImportToken`]).
pub trait ImportGate: Send + Sync + 'static {
    fn admit<'a>(
        &'a self,
        busid: &'a str,
        peer: &'a Peer,
        token: Option<ImportToken>,
    ) -> GateFuture<'a>;
}

/// Why a gate refused an import: the status the client gets, and the
/// reason, for the server's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct GateRefusal {
    pub status: OpStatus,
    pub why: String,
}

/// The server's gate, if any.
#[derive(Clone, Default)]
pub struct Gate(pub Option<Arc<dyn ImportGate>>);

impl Gate {
    pub fn new(gate: Arc<dyn ImportGate>) -> Gate {
        Gate(Some(gate))
    }

    /// Asks the gate, bounded by [`GATE_TIMEOUT`].
    pub async fn admit(
        &self,
        busid: &str,
        peer: &Peer,
        token: Option<ImportToken>,
    ) -> Result<(), GateRefusal> {
        let Some(gate) = &self.0 else {
            return Ok(());
        };
        match tokio::time::timeout(GATE_TIMEOUT, gate.admit(busid, peer, token)).await {
            Ok(answer) => answer,
            Err(_) => Err(GateRefusal {
                status: OpStatus::Na,
                why: format!(
                    "the import check (fleet reservations) did not answer within {GATE_TIMEOUT:?}"
                ),
            }),
        }
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Gate(on)"
        } else {
            "Gate(none)"
        })
    }
}
