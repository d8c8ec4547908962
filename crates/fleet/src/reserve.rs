//! Reservations: a client takes a published device under its own lease,
//! in one etcd transaction, and holds it while it keeps that lease alive.
//!
//! `reservations/<name>` is created only if `devices/<name>` exists,
//! `transition/<name>` does not (else EAGAIN) and `reservations/<name>`
//! does not (else EBUSY); it lives under the holder's lease, so a holder
//! that dies frees the device when the lease's TTL runs out, and a release
//! (revoking the lease) frees it at once.
//!
//! The record names the holder and carries the SHA-256 of a random
//! 128-bit token; the token itself stays with the holder (its local
//! record), which sends it with its import (see
//! [`usbwire_proto::ImportToken`]) so that the device's server can tell
//! it from anyone else. Over TLS the holder's certificate is the proof:
//! its holder identity is `tls:` and the certificate's SHA-256
//! fingerprint. Anyone who can read etcd sees who holds what, but not a
//! token to import with.
//!
//! [`ReservationGate`] is the server's side: it refuses an import of a
//! reserved device from anyone but its holder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use rand::seq::SliceRandom;
use ring::digest;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use usbwire_proto::{ImportToken, OpStatus};
use usbwire_server::acl::Peer;
use usbwire_server::gate::{GateFuture, GateRefusal, ImportGate};

use crate::record::{connect_live, parse_endpoints, FleetError};
use crate::PREFIX;

/// How long one etcd request may take before the operation fails with a
/// clear message instead of hanging.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server's import check waits for a linearizable read before
/// it falls back to its watched copy of the reservations.
pub const GATE_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The shortest and longest reservation TTL, in seconds.
pub const TTL_MIN: i64 = 2;
pub const TTL_MAX: i64 = 3600;

pub use crate::record::{device_key, reservation_key, transition_key};

/// What reserve reads of a `devices/<name>` record (fleet's publisher
/// writes more, see `record::DeviceRecord`; unknown fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishedDevice {
    /// The owner server's id.
    pub server: String,
    /// Where clients reach the server.
    pub host: String,
    pub port: u16,
    pub busid: String,
    /// Hex, as "046d".
    pub vendor_id: String,
    pub product_id: String,
    pub labels: Vec<String>,
    /// Whether the server requires TLS.
    pub tls: bool,
    pub fingerprint: Option<String>,
}

impl PublishedDevice {
    /// `HOST:PORT` (an IPv6 host in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn ids(&self) -> Option<(u16, u16)> {
        Some((
            u16::from_str_radix(&self.vendor_id, 16).ok()?,
            u16::from_str_radix(&self.product_id, 16).ok()?,
        ))
    }
}

/// `reservations/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// `tls:<certificate SHA-256>` over TLS, else the client's id.
    pub holder: String,
    /// SHA-256 (hex) of the token the holder imports with.
    pub token_sha256: String,
    /// Unix seconds.
    pub since: u64,
    pub ttl: i64,
    pub client_host: String,
    pub lease: i64,
}

impl ReservationRecord {
    /// Whether `token` is this reservation's.
    pub fn token_matches(&self, token: &ImportToken) -> bool {
        token_sha256(token) == self.token_sha256
    }

    /// Whether `peer` is the holder by its TLS certificate.
    pub fn held_by_tls(&self, peer: &Peer) -> bool {
        peer.tls
            .as_ref()
            .is_some_and(|id| self.holder == tls_holder(&id.fingerprint.to_string()))
    }
}

/// The holder identity of a TLS client with this certificate fingerprint.
pub fn tls_holder(fingerprint: &str) -> String {
    format!("tls:{fingerprint}")
}

pub fn token_sha256(token: &ImportToken) -> String {
    digest::digest(&digest::SHA256, &token.0)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh random token.
pub fn new_token() -> Result<ImportToken, ReserveError> {
    let mut token = [0u8; usbwire_proto::op::IMPORT_TOKEN_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
        .map_err(|_| ReserveError::Random)?;
    Ok(ImportToken(token))
}

/// Which device a client wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Name(String),
    /// `--match VID:PID`
    Match {
        vendor: u16,
        product: u16,
    },
    /// `--label L`
    Label(String),
}

impl Want {
    fn matches(&self, name: &str, device: &PublishedDevice) -> bool {
        match self {
            Want::Name(n) => n == name,
            Want::Match { vendor, product } => device.ids() == Some((*vendor, *product)),
            Want::Label(l) => device.labels.iter().any(|x| x == l),
        }
    }
}

impl std::fmt::Display for Want {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Want::Name(n) => write!(f, "{n}"),
            Want::Match { vendor, product } => write!(f, "--match {vendor:04x}:{product:04x}"),
            Want::Label(l) => write!(f, "--label {l}"),
        }
    }
}

/// Parses `VID:PID` (hex).
pub fn parse_match(s: &str) -> Option<Want> {
    let (v, p) = s.split_once(':')?;
    Some(Want::Match {
        vendor: u16::from_str_radix(v, 16).ok()?,
        product: u16::from_str_radix(p, 16).ok()?,
    })
}

/// Why a reservation (or release) failed. [`ReserveError::errno`] is what
/// the CLI exits and prints with.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("etcd ({endpoints}): {source}; is the fleet's etcd reachable from here?")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error(
        "etcd ({endpoints}) did not answer within {ETCD_TIMEOUT:?}; is it reachable from here?"
    )]
    EtcdTimeout { endpoints: String },
    /// Reaching the cluster at all failed (no member answered).
    #[error(transparent)]
    Connect(#[from] FleetError),
    #[error("{name} is already reserved by {holder} (EBUSY)")]
    Busy { name: String, holder: String },
    #[error("no device matching {want} is free: all {count} are reserved (EBUSY)")]
    NoneLeft { want: String, count: usize },
    #[error(
        "{name} is in transition (its server is withdrawing or re-publishing it); \
         try again in a moment (EAGAIN)"
    )]
    InTransition { name: String },
    #[error("no device matching {want} is free: the only ones left are in transition; try again in a moment (EAGAIN)")]
    AllInTransition { want: String },
    #[error("no device named {name} is published in the fleet (ENODEV)")]
    NoSuchDevice { name: String },
    #[error("no device in the fleet matches {want} (ENODEV)")]
    NoMatch { want: String },
    #[error("{name} is not reserved (ENOENT)")]
    NotReserved { name: String },
    #[error("the fleet record {key} is not valid JSON: {source}")]
    BadRecord {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the reservation TTL must be between {TTL_MIN} and {TTL_MAX} seconds, not {0}")]
    BadTtl(i64),
    #[error("the reservation of {name} was lost: its lease expired or was revoked")]
    Lost { name: String },
    #[error("the system's random number generator failed")]
    Random,
}

impl ReserveError {
    /// The errno this failure is reported with.
    pub fn errno(&self) -> i32 {
        match self {
            ReserveError::Etcd { .. } => libc::ECONNREFUSED,
            ReserveError::EtcdTimeout { .. } => libc::ETIMEDOUT,
            ReserveError::Connect(FleetError::Timeout { .. }) => libc::ETIMEDOUT,
            ReserveError::Connect(_) => libc::ECONNREFUSED,
            ReserveError::Busy { .. } | ReserveError::NoneLeft { .. } => libc::EBUSY,
            ReserveError::InTransition { .. } | ReserveError::AllInTransition { .. } => {
                libc::EAGAIN
            }
            ReserveError::NoSuchDevice { .. } | ReserveError::NoMatch { .. } => libc::ENODEV,
            ReserveError::NotReserved { .. } => libc::ENOENT,
            ReserveError::BadRecord { .. } => libc::EPROTO,
            ReserveError::BadTtl(_) => libc::EINVAL,
            ReserveError::Lost { .. } => libc::ENOLCK,
            ReserveError::Random => libc::EIO,
        }
    }
}

/// A connection to the fleet's etcd, every request bounded by
/// [`ETCD_TIMEOUT`].
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    /// The members that answered when it connected.
    endpoints: String,
    /// Every member it was given, to connect again from.
    requested: String,
}

impl Fleet {
    /// `endpoints`: comma-separated `host:port` or URLs of etcd members;
    /// only those that answer now are used (a dead member would fail a
    /// share of the requests otherwise).
    pub async fn connect(endpoints: &str) -> Result<Fleet, ReserveError> {
        let (client, live) = connect_live(&parse_endpoints(endpoints)?).await?;
        Ok(Fleet {
            client,
            endpoints: live.join(","),
            requested: endpoints.to_string(),
        })
    }

    /// A new connection to the members that answer now, from every member
    /// this one was given (one it used may have died since).
    pub async fn reconnect(&self) -> Result<Fleet, ReserveError> {
        Fleet::connect(&self.requested).await
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ReserveError> {
        bounded(&self.endpoints, f).await
    }

    /// Every published device, by name.
    pub async fn devices(&self) -> Result<Vec<(String, PublishedDevice)>, ReserveError> {
        let prefix = format!("{PREFIX}devices/");
        let mut client = self.client.clone();
        let got = self
            .run(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
            .await?;
        got.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let device = parse(&key, kv.value())?;
                Ok((key[prefix.len()..].to_string(), device))
            })
            .collect()
    }

    /// The device published as `name`.
    pub async fn device(&self, name: &str) -> Result<PublishedDevice, ReserveError> {
        let key = device_key(name);
        let mut client = self.client.clone();
        let got = self.run(client.get(key.as_str(), None)).await?;
        match got.kvs().first() {
            Some(kv) => parse(&key, kv.value()),
            None => Err(ReserveError::NoSuchDevice { name: name.into() }),
        }
    }

    /// `reservations/<name>`, read linearizably.
    pub async fn reservation(&self, name: &str) -> Result<Option<ReservationRecord>, ReserveError> {
        let key = reservation_key(name);
        let mut client = self.client.clone();
        let got = self.run(client.get(key.as_str(), None)).await?;
        got.kvs()
            .first()
            .map(|kv| parse(&key, kv.value()))
            .transpose()
    }

    /// Takes a device matching `want` for `holder` under a new lease of
    /// `ttl` seconds, which the caller then keeps alive with
    /// [`Fleet::hold`]. For a match or label, the candidates are tried in
    /// random order, so that clients racing for the same match spread over
    /// the devices instead of all trying the same one first.
    pub async fn reserve(
        &self,
        want: &Want,
        holder: &str,
        client_host: &str,
        ttl: i64,
    ) -> Result<Reserved, ReserveError> {
        if !(TTL_MIN..=TTL_MAX).contains(&ttl) {
            return Err(ReserveError::BadTtl(ttl));
        }
        let mut candidates: Vec<String> = match want {
            Want::Name(name) => vec![name.clone()],
            _ => self
                .devices()
                .await?
                .into_iter()
                .filter(|(name, d)| want.matches(name, d))
                .map(|(name, _)| name)
                .collect(),
        };
        if candidates.is_empty() {
            return Err(ReserveError::NoMatch {
                want: want.to_string(),
            });
        }
        candidates.shuffle(&mut rand::thread_rng());
        let token = new_token()?;
        let mut client = self.client.clone();
        let lease = self.run(client.lease_grant(ttl, None)).await?.id();
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let record = ReservationRecord {
            holder: holder.into(),
            token_sha256: token_sha256(&token),
            since,
            ttl,
            client_host: client_host.into(),
            lease,
        };
        let value = serde_json::to_string(&record).expect("a reservation serializes");
        let (mut busy, mut in_transition) = (0, 0);
        let mut last_error = None;
        for name in &candidates {
            match self.try_reserve(name, &value, lease).await {
                Ok(Some(device)) => {
                    info!(%name, holder, lease, "reserved");
                    return Ok(Reserved {
                        name: name.clone(),
                        device,
                        token,
                        record,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    match &e {
                        ReserveError::Busy { .. } => busy += 1,
                        ReserveError::InTransition { .. } => in_transition += 1,
                        _ => {}
                    }
                    last_error = Some(e);
                }
            }
        }
        // Nothing taken: the lease would only expire, so give it back now.
        let _ = self.run(client.lease_revoke(lease)).await;
        let last_error = last_error.unwrap_or(ReserveError::NoMatch {
            want: want.to_string(),
        });
        Err(match want {
            Want::Name(_) => last_error,
            _ if busy > 0 => ReserveError::NoneLeft {
                want: want.to_string(),
                count: busy,
            },
            _ if in_transition > 0 => ReserveError::AllInTransition {
                want: want.to_string(),
            },
            _ => last_error,
        })
    }

    /// One transaction for `name`: the device if it was taken.
    async fn try_reserve(
        &self,
        name: &str,
        value: &str,
        lease: i64,
    ) -> Result<Option<PublishedDevice>, ReserveError> {
        let (device, transition, reservation) = (
            device_key(name),
            transition_key(name),
            reservation_key(name),
        );
        let txn = Txn::new()
            .when([
                Compare::version(device.as_str(), CompareOp::Greater, 0),
                Compare::version(transition.as_str(), CompareOp::Equal, 0),
                Compare::version(reservation.as_str(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    reservation.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::get(device.as_str(), None),
            ])
            .or_else([
                TxnOp::get(device.as_str(), None),
                TxnOp::get(transition.as_str(), None),
                TxnOp::get(reservation.as_str(), None),
            ]);
        let mut client = self.client.clone();
        let answer = self.run(client.txn(txn)).await?;
        let gets: Vec<Option<Vec<u8>>> = answer
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.value().to_vec())),
                _ => None,
            })
            .collect();
        if answer.succeeded() {
            return match gets.first() {
                Some(Some(v)) => Ok(Some(parse(&device, v)?)),
                // Withdrawn between our compare and get: impossible in one
                // transaction, but never a panic on what the store says.
                _ => Ok(Some(PublishedDevice::default())),
            };
        }
        match gets.as_slice() {
            [None, ..] => Err(ReserveError::NoSuchDevice { name: name.into() }),
            [_, Some(_), _] => Err(ReserveError::InTransition { name: name.into() }),
            [_, _, Some(r)] => {
                let holder = parse::<ReservationRecord>(&reservation, r)
                    .map_or_else(|_| "an unreadable record".into(), |r| r.holder);
                Err(ReserveError::Busy {
                    name: name.into(),
                    holder,
                })
            }
            _ => Ok(None),
        }
    }

    /// Keeps `lease` alive until `stop` resolves (then revokes it) or the
    /// lease is lost. Refreshes at a third of the TTL; while etcd is
    /// unreachable it keeps trying, and the reservation survives as long
    /// as the lease has not run out.
    pub async fn hold(
        &self,
        name: &str,
        lease: i64,
        ttl: i64,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ReserveError> {
        let every = Duration::from_millis((ttl.max(1) as u64) * 1000 / 3);
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = &mut stop => {
                    let mut client = self.client.clone();
                    let _ = self.run(client.lease_revoke(lease)).await;
                    info!(name, lease, "released");
                    return Ok(());
                }
                _ = ticks.tick() => {}
            }
            match self.keep_alive_once(lease).await {
                Ok(true) => {}
                Ok(false) => return Err(ReserveError::Lost { name: name.into() }),
                Err(e) => warn!(name, lease, "cannot refresh the reservation's lease: {e}"),
            }
        }
    }

    /// One refresh: whether the lease still lives.
    async fn keep_alive_once(&self, lease: i64) -> Result<bool, ReserveError> {
        let mut client = self.client.clone();
        let (mut keeper, mut answers) = self.run(client.lease_keep_alive(lease)).await?;
        self.run(keeper.keep_alive()).await?;
        match self.run(answers.message()).await? {
            Some(answer) => Ok(answer.ttl() > 0),
            None => Ok(false),
        }
    }

    /// Revokes `lease`, which deletes the reservation made under it.
    pub async fn revoke(&self, lease: i64) -> Result<(), ReserveError> {
        let mut client = self.client.clone();
        match self.run(client.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Already gone (expired or revoked): released all the same.
            Err(ReserveError::Etcd {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.message().contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Releases `name` whoever holds it: revokes the lease its
    /// reservation lives under.
    pub async fn release_any(&self, name: &str) -> Result<ReservationRecord, ReserveError> {
        let record = self
            .reservation(name)
            .await?
            .ok_or_else(|| ReserveError::NotReserved { name: name.into() })?;
        self.revoke(record.lease).await?;
        Ok(record)
    }
}

/// A device taken: what a holder keeps (the token only locally).
#[derive(Debug, Clone)]
pub struct Reserved {
    pub name: String,
    pub device: PublishedDevice,
    pub token: ImportToken,
    pub record: ReservationRecord,
}

async fn bounded<T>(
    endpoints: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ReserveError> {
    match tokio::time::timeout(ETCD_TIMEOUT, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(source)) => Err(ReserveError::Etcd {
            endpoints: endpoints.into(),
            source,
        }),
        Err(_) => Err(ReserveError::EtcdTimeout {
            endpoints: endpoints.into(),
        }),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ReserveError> {
    serde_json::from_slice(value).map_err(|source| ReserveError::BadRecord {
        key: key.into(),
        source,
    })
}

/// Maps an exported bus id to the name it is published under in the
/// fleet; `None` for a device that is not in the fleet.
pub type NameOf = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The server's import check: a reserved device only for its holder (its
/// token, or its TLS certificate); an unreserved device, or one not in the
/// fleet, for anyone the access policy grants it to, as before.
///
/// The check reads `reservations/<name>` linearizably, so that a device
/// reserved a moment ago is already refused. If etcd does not answer within
/// [`GATE_READ_TIMEOUT`], it decides from a copy of all reservations that
/// a watch keeps current: reservations made during the outage cannot be
/// in it (nor be made: a client cannot reach etcd either, or the server
/// is cut off from it alone), and those made before it stay honoured.
pub struct ReservationGate {
    /// Replaced by a new connection when a read through it fails.
    fleet: Mutex<Fleet>,
    name_of: NameOf,
    watched: Arc<Mutex<HashMap<String, ReservationRecord>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl ReservationGate {
    /// Starts the watch; call within a Tokio runtime.
    pub fn new(fleet: Fleet, name_of: NameOf) -> ReservationGate {
        let watched = Arc::new(Mutex::new(HashMap::new()));
        let watcher = tokio::spawn(watch_reservations(fleet.clone(), watched.clone()));
        ReservationGate {
            fleet: Mutex::new(fleet),
            name_of,
            watched,
            watcher,
        }
    }

    async fn decide(
        &self,
        busid: &str,
        peer: &Peer,
        token: Option<ImportToken>,
    ) -> Result<(), GateRefusal> {
        let Some(name) = (self.name_of)(busid) else {
            return Ok(());
        };
        let record = match tokio::time::timeout(GATE_READ_TIMEOUT, self.read(&name)).await {
            Ok(Ok(record)) => record,
            Ok(Err(e)) => {
                warn!(%name, "reservation check falls back to the watched copy: {e}");
                self.watched
                    .lock()
                    .expect("not poisoned")
                    .get(&name)
                    .cloned()
            }
            Err(_) => {
                warn!(%name, "reservation check falls back to the watched copy: etcd did not answer within {GATE_READ_TIMEOUT:?}");
                self.watched
                    .lock()
                    .expect("not poisoned")
                    .get(&name)
                    .cloned()
            }
        };
        let Some(record) = record else {
            return Ok(());
        };
        if token.is_some_and(|t| record.token_matches(&t)) || record.held_by_tls(peer) {
            debug!(%name, holder = record.holder, "import by the reservation's holder");
            return Ok(());
        }
        let proof = match token {
            Some(_) => "a token that is not the reservation's",
            None => "no reservation token",
        };
        Err(GateRefusal {
            status: OpStatus::DevBusy,
            why: format!(
                "{name} is reserved by {} (from {}), and this client sent {proof}",
                record.holder, record.client_host
            ),
        })
    }
}

impl ReservationGate {
    /// `reservations/<name>`, read linearizably; when the connection fails
    /// (the member it used died), once more through a new one.
    async fn read(&self, name: &str) -> Result<Option<ReservationRecord>, ReserveError> {
        let fleet = self.fleet.lock().expect("not poisoned").clone();
        match fleet.reservation(name).await {
            Err(ReserveError::Etcd { .. }) => {
                let fresh = fleet.reconnect().await?;
                let record = fresh.reservation(name).await?;
                debug!(
                    endpoints = fresh.endpoints,
                    "the reservation check connected again"
                );
                *self.fleet.lock().expect("not poisoned") = fresh;
                Ok(record)
            }
            other => other,
        }
    }
}

impl Drop for ReservationGate {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl ImportGate for ReservationGate {
    fn admit<'a>(
        &'a self,
        busid: &'a str,
        peer: &'a Peer,
        token: Option<ImportToken>,
    ) -> GateFuture<'a> {
        Box::pin(self.decide(busid, peer, token))
    }
}

/// The gate usbipd runs with `--fleet`: a [`ReservationGate`] once etcd has
/// answered. usbipd must start and export with etcd down, so the
/// connection is made at the first import rather than at start; until it
/// succeeds, no reservation can be known and imports are admitted as for a
/// device outside the fleet (logged), which is what keeps local export
/// working through an etcd outage.
pub struct FleetGate {
    endpoints: String,
    name_of: NameOf,
    gate: tokio::sync::OnceCell<ReservationGate>,
}

impl FleetGate {
    pub fn new(endpoints: String, name_of: NameOf) -> FleetGate {
        FleetGate {
            endpoints,
            name_of,
            gate: tokio::sync::OnceCell::new(),
        }
    }

    async fn decide(
        &self,
        busid: &str,
        peer: &Peer,
        token: Option<ImportToken>,
    ) -> Result<(), GateRefusal> {
        let connected = self
            .gate
            .get_or_try_init(|| async {
                let fleet = Fleet::connect(&self.endpoints).await?;
                Ok::<_, ReserveError>(ReservationGate::new(fleet, self.name_of.clone()))
            })
            .await;
        match connected {
            Ok(gate) => gate.decide(busid, peer, token).await,
            Err(e) => {
                warn!(%busid, "import admitted without a reservation check: {e}");
                Ok(())
            }
        }
    }
}

impl ImportGate for FleetGate {
    fn admit<'a>(
        &'a self,
        busid: &'a str,
        peer: &'a Peer,
        token: Option<ImportToken>,
    ) -> GateFuture<'a> {
        Box::pin(self.decide(busid, peer, token))
    }
}

/// Keeps `watched` equal to `reservations/`: a full read, then a watch
/// from the revision after it; on any failure, again after a pause that
/// doubles up to 5 s.
async fn watch_reservations(fleet: Fleet, watched: Arc<Mutex<HashMap<String, ReservationRecord>>>) {
    let prefix = format!("{PREFIX}reservations/");
    let mut pause = Duration::from_millis(250);
    let mut fleet = fleet;
    loop {
        if let Err(e) = watch_once(&fleet, &prefix, &watched).await {
            debug!("watching the fleet's reservations: {e}; again in {pause:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
        // The member the watch was on may be the one that died.
        match fleet.reconnect().await {
            Ok(fresh) => fleet = fresh,
            Err(e) => debug!("watching the fleet's reservations: connecting again: {e}"),
        }
    }
}

async fn watch_once(
    fleet: &Fleet,
    prefix: &str,
    watched: &Mutex<HashMap<String, ReservationRecord>>,
) -> Result<(), ReserveError> {
    let mut client = fleet.client();
    let all = fleet
        .run(client.get(prefix, Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = all.header().map_or(0, |h| h.revision());
    let mut fresh = HashMap::new();
    for kv in all.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Ok(record) = parse(&key, kv.value()) {
            fresh.insert(key[prefix.len()..].to_string(), record);
        }
    }
    *watched.lock().expect("not poisoned") = fresh;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut events = fleet.run(client.watch(prefix, Some(options))).await?;
    // Ends when the stream does (etcd gone): the caller starts over.
    while let Some(answer) = events
        .message()
        .await
        .map_err(|source| ReserveError::Etcd {
            endpoints: fleet.endpoints.clone(),
            source,
        })?
    {
        let mut map = watched.lock().expect("not poisoned");
        for event in answer.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key.get(prefix.len()..).unwrap_or_default().to_string();
            match event.event_type() {
                EventType::Put => {
                    if let Ok(record) = parse(&key, kv.value()) {
                        map.insert(name, record);
                    }
                }
                EventType::Delete => {
                    map.remove(&name);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_only_its_own_hash() {
        let token = new_token().unwrap();
        let record = ReservationRecord {
            holder: "ci@host".into(),
            token_sha256: token_sha256(&token),
            since: 0,
            ttl: 5,
            client_host: "host".into(),
            lease: 1,
        };
        assert!(record.token_matches(&token));
        assert!(!record.token_matches(&new_token().unwrap()));
        assert_eq!(record.token_sha256.len(), 64);
    }

    #[test]
    fn over_tls_only_the_holders_certificate_is_the_holder() {
        use usbwire_server::acl::{ClientIdentity, Subject};
        let fingerprint = |b: &[u8]| usbwire_server::tls::Fingerprint::of(b);
        let peer = |cert: &[u8]| Peer {
            addr: "10.0.0.9:40000".parse().unwrap(),
            tls: Some(ClientIdentity {
                fingerprint: fingerprint(cert),
                subject: Subject::default(),
                subject_verified: false,
            }),
        };
        let record = ReservationRecord {
            holder: tls_holder(&fingerprint(b"holder's certificate").to_string()),
            token_sha256: String::new(),
            since: 0,
            ttl: 5,
            client_host: "a".into(),
            lease: 1,
        };
        assert!(record.held_by_tls(&peer(b"holder's certificate")));
        assert!(!record.held_by_tls(&peer(b"another certificate")));
        assert!(!record.held_by_tls(&Peer::plaintext("10.0.0.9:1".parse().unwrap())));
    }

    #[test]
    fn match_and_label_select_devices() {
        let device = PublishedDevice {
            vendor_id: "1d6b".into(),
            product_id: "0104".into(),
            labels: vec!["lab-2".into()],
            ..Default::default()
        };
        assert!(parse_match("1d6b:0104").unwrap().matches("x", &device));
        assert!(!parse_match("1d6b:0105").unwrap().matches("x", &device));
        assert!(Want::Label("lab-2".into()).matches("x", &device));
        assert!(!Want::Label("lab-3".into()).matches("x", &device));
        assert!(parse_match("1d6b").is_none());
        assert!(parse_match("zz:0104").is_none());
    }
}
