//! Publishing a server's devices to the fleet (`usbipd --fleet`).
//!
//! A [`Publisher`] is a task of its own: usbipd hands it the full set of
//! devices it exports ([`Publisher::set_devices`]) whenever that set
//! changes, and the task brings etcd in line with it, so nothing of this
//! ever waits on etcd in a session worker or in the registry.
//!
//! - Everything it writes hangs on one lease it keeps alive (`ttl`): a
//!   server that dies leaves the namespace when the lease expires.
//! - `servers/<id>`, then one transaction per device: `devices/<name>` is
//!   created only if no such key exists (`create_revision == 0`), or
//!   overwritten only if the record there is this server's own and has not
//!   changed since it was read (`mod_revision`). A name another server
//!   holds is refused with EEXIST: logged, the device stays exported
//!   locally, nothing of it is written. A refused name is tried again
//!   when this server's device set changes or its fleet session restarts
//!   (an etcd outage, a restart), never by polling.
//! - A device that goes away is withdrawn at once: `transition/<name>`
//!   first, then `devices/<name>` and `transition/<name>` deleted in one
//!   transaction. A name withdrawn earlier in this run that comes back
//!   (hotplug) is re-published the same way round: `transition/<name>`,
//!   then the record and the transition's removal in one transaction. In
//!   between, a reservation sees EAGAIN.
//! - The session's connection lost (its etcd member died, or stopped
//!   answering keep-alives for a third of the TTL): local export goes on
//!   untouched and a new session connects to the members that answer. It
//!   keeps the same lease alive if that is still possible, so the records
//!   never leave the namespace for a member's death; only a lease that
//!   expired (the whole cluster gone for longer than the TTL) makes it
//!   grant a new one and publish everything again. Tries are spaced by a
//!   bounded exponential backoff, kept shorter than the TTL while the old
//!   lease may still be saved.
//! - [`Publisher::shutdown`] revokes the lease: every key of this server
//!   goes at once (the goodbye).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::record::{
    bounded, connect_live, device_key, server_key, transition_key, DeviceRecord, FleetError,
    ServerRecord,
};

/// What a server publishes, and where.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub endpoints: Vec<String>,
    pub server: ServerRecord,
    /// The lease's time to live: how long a dead server's devices stay.
    pub ttl: Duration,
}

/// The lease's default time to live.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// The first and the longest wait before a new session after a failure.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(4);
/// Attempts at one device's transaction when the key changes under it.
const TXN_ATTEMPTS: usize = 3;

type DeviceSet = BTreeMap<String, DeviceRecord>;
/// Name -> the record published and the revision that wrote it.
type Published = BTreeMap<String, (DeviceRecord, i64)>;

/// What outlives a session whose connection was lost: the lease, maybe
/// still alive, and what hangs on it.
struct Held {
    lease: i64,
    published: Published,
}

/// The names this server's devices were refused (EEXIST: another server
/// publishes them), so that nothing of this server treats them as its own
/// in the fleet (the import check must not apply another server's
/// reservation of the name to a device that is exported locally only).
#[derive(Clone, Default)]
pub struct RefusedNames(Arc<Mutex<BTreeSet<String>>>);

impl RefusedNames {
    pub fn contains(&self, name: &str) -> bool {
        self.0.lock().expect("not poisoned").contains(name)
    }

    fn set(&self, name: &str, refused: bool) {
        let mut names = self.0.lock().expect("not poisoned");
        if refused {
            names.insert(name.to_string());
        } else {
            names.remove(name);
        }
    }
}

/// The publishing task's handle.
pub struct Publisher {
    desired: DeviceSetter,
    refused: RefusedNames,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts publishing (nothing yet: see [`Publisher::set_devices`]) on
    /// the current tokio runtime.
    pub fn spawn(config: PublisherConfig) -> Publisher {
        let (desired, rx) = watch::channel(DeviceSet::new());
        let (stop, stop_rx) = oneshot::channel();
        let refused = RefusedNames::default();
        let task = tokio::spawn(run(config, rx, stop_rx, refused.clone()));
        Publisher {
            desired: DeviceSetter(Arc::new(desired)),
            refused,
            stop: Some(stop),
            task,
        }
    }

    /// The devices this server exports now, each under its fleet name.
    pub fn set_devices(&self, devices: impl IntoIterator<Item = DeviceRecord>) {
        self.desired.set_devices(devices);
    }

    /// The names refused with EEXIST now.
    pub fn refused_names(&self) -> RefusedNames {
        self.refused.clone()
    }

    /// A handle that sets the devices from another task.
    pub fn desired_handle(&self) -> DeviceSetter {
        self.desired.clone()
    }

    /// Revokes the lease (every key of this server goes at once) and ends
    /// the task; bounded in time, whatever etcd does.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let limit = crate::record::REQUEST_TIMEOUT + Duration::from_secs(2);
        if tokio::time::timeout(limit, &mut self.task).await.is_err() {
            warn!("fleet: the goodbye to etcd did not finish within {limit:?}; the lease expires by itself");
            self.task.abort();
        }
    }
}

/// Sets what a [`Publisher`] publishes; cheap to clone.
#[derive(Clone)]
pub struct DeviceSetter(Arc<watch::Sender<DeviceSet>>);

impl DeviceSetter {
    /// The devices this server exports now, each under its fleet name
    /// (a second device under the same name is left out, and logged).
    pub fn set_devices(&self, devices: impl IntoIterator<Item = DeviceRecord>) {
        let mut set = DeviceSet::new();
        for d in devices {
            if let Some(first) = set.get(&d.name) {
                warn!(
                    "fleet: {} and {} are both named \"{}\" on this server (EEXIST): \
                     only {} is published; give each a `name` of its own",
                    first.busid, d.busid, d.name, first.busid
                );
                continue;
            }
            set.insert(d.name.clone(), d);
        }
        self.0.send_if_modified(|current| {
            if *current == set {
                return false;
            }
            *current = set;
            true
        });
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a session ended.
enum End {
    Stop,
    Lost(String),
}

async fn run(
    config: PublisherConfig,
    mut desired: watch::Receiver<DeviceSet>,
    mut stop: oneshot::Receiver<()>,
    refused: RefusedNames,
) {
    let mut delay = BACKOFF_FIRST;
    // Names withdrawn in this run: coming back, they pass through
    // transition/ (a hotplug), not straight to devices/.
    let mut withdrawn = BTreeSet::new();
    let mut held: Option<Held> = None;
    let mut last_error: Option<String> = None;
    // While a lease may still be saved, a try comes well within its TTL.
    let saving = ttl_of(&config) / 6;
    loop {
        let opened = tokio::select! {
            s = Session::open(&config, &mut held, &refused) => s,
            _ = &mut stop => return,
        };
        match opened {
            Ok(mut session) => {
                delay = BACKOFF_FIRST;
                last_error = None;
                info!(
                    "fleet: publishing as server {} to {} (lease {:x}{}, ttl {:?})",
                    config.server.id,
                    session.endpoints.join(","),
                    session.lease,
                    if session.kept { ", kept" } else { "" },
                    config.ttl
                );
                match session.serve(&mut desired, &mut stop, &mut withdrawn).await {
                    End::Stop => {
                        session.goodbye().await;
                        return;
                    }
                    End::Lost(why) => {
                        warn!(
                            "fleet: publishing stopped: {why}; the devices stay exported \
                             locally, publishing starts again by itself on the lease {:x} \
                             if it is still alive",
                            session.lease
                        );
                        held = Some(session.into_held());
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                // An outage fails every try the same way: said once.
                if last_error.as_ref() != Some(&why) {
                    warn!(
                        "fleet: cannot publish: {why}; the devices stay exported locally, \
                         trying again by itself (said once while it fails this way)"
                    );
                } else {
                    debug!("fleet: cannot publish yet: {why}");
                }
                last_error = Some(why);
            }
        }
        let wait = if held.is_some() {
            delay.min(saving)
        } else {
            delay
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => return,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

fn ttl_of(config: &PublisherConfig) -> Duration {
    config.ttl.max(Duration::from_secs(1))
}

/// One lease and what was published under it.
struct Session<'a> {
    config: &'a PublisherConfig,
    /// The members that answered when it connected.
    endpoints: Vec<String>,
    client: Client,
    lease: i64,
    /// Whether the lease is one an earlier session granted.
    kept: bool,
    keeper: LeaseKeeper,
    acks: LeaseKeepAliveStream,
    published: Published,
    refused: RefusedNames,
}

/// What became of one device's publication.
enum Outcome {
    Published(i64),
    /// EEXIST: another server's record holds the name.
    Taken(String),
}

impl<'a> Session<'a> {
    /// Connects to the members that answer; keeps `held`'s lease alive if
    /// it still is (taking it, with what was published under it), grants a
    /// new one if it expired. `held` is left as it was on an error.
    async fn open(
        config: &'a PublisherConfig,
        held: &mut Option<Held>,
        refused: &RefusedNames,
    ) -> Result<Session<'a>, FleetError> {
        let (mut client, endpoints) = connect_live(&config.endpoints).await?;
        let eps = &endpoints;
        let kept = match held.as_ref() {
            None => None,
            Some(h) => match bounded(eps, client.lease_keep_alive(h.lease)).await {
                Ok(stream) => Some((h.lease, stream)),
                // Nothing hangs on an expired lease any more: what was
                // published is gone with it.
                Err(FleetError::Etcd {
                    source: etcd_client::Error::LeaseKeepAliveError(why),
                    ..
                }) => {
                    info!(
                        "fleet: the lease {:x} is gone ({why}): everything is published again \
                         under a new one",
                        h.lease
                    );
                    *held = None;
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let kept_lease = kept.is_some();
        let (lease, (keeper, acks)) = match kept {
            Some(k) => k,
            None => {
                let ttl = ttl_of(config).as_secs() as i64;
                let lease = bounded(eps, client.lease_grant(ttl, None)).await?.id();
                (lease, bounded(eps, client.lease_keep_alive(lease)).await?)
            }
        };
        let value = serde_json::to_vec(&config.server).expect("a server record serialises");
        bounded(
            eps,
            client.put(
                server_key(&config.server.id),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
        )
        .await?;
        let published = match held.take() {
            Some(h) if h.lease == lease => h.published,
            _ => Published::new(),
        };
        Ok(Session {
            config,
            kept: kept_lease,
            endpoints,
            client,
            lease,
            keeper,
            acks,
            published,
            refused: refused.clone(),
        })
    }

    fn into_held(self) -> Held {
        Held {
            lease: self.lease,
            published: self.published,
        }
    }

    async fn serve(
        &mut self,
        desired: &mut watch::Receiver<DeviceSet>,
        stop: &mut oneshot::Receiver<()>,
        withdrawn: &mut BTreeSet<String>,
    ) -> End {
        let ttl = ttl_of(self.config);
        // A keep-alive every sixth of the TTL; a third of it without an
        // answer ends the session, which leaves half the TTL to save the
        // lease through another member.
        let silence = ttl / 3;
        let mut ticks = tokio::time::interval(ttl / 6);
        let mut last_ack = Instant::now();
        let set = desired.borrow_and_update().clone();
        if let Err(e) = self.reconcile(&set, withdrawn).await {
            return End::Lost(e.to_string());
        }
        // Each turn handles one event; the lease's acks bound how long a
        // silent cluster goes unnoticed.
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if last_ack.elapsed() > silence {
                        return End::Lost(format!("no lease keep-alive answered for {silence:?}"));
                    }
                    let sent = tokio::time::timeout(silence, self.keeper.keep_alive()).await;
                    if let Ok(Err(e)) = sent {
                        return End::Lost(format!("lease keep-alive: {e}"));
                    }
                }
                ack = self.acks.message() => match ack {
                    Ok(Some(r)) if r.ttl() > 0 => last_ack = Instant::now(),
                    Ok(Some(_)) => return End::Lost("the lease expired".into()),
                    Ok(None) => return End::Lost("the lease keep-alive stream ended".into()),
                    Err(e) => return End::Lost(format!("lease keep-alive: {e}")),
                },
                changed = desired.changed() => {
                    if changed.is_err() {
                        return End::Stop;
                    }
                    let set = desired.borrow_and_update().clone();
                    if let Err(e) = self.reconcile(&set, withdrawn).await {
                        return End::Lost(e.to_string());
                    }
                }
                _ = &mut *stop => return End::Stop,
            }
        }
    }

    /// Brings etcd in line with `set`: what went away (or changed) is
    /// withdrawn first, then what is new is published.
    async fn reconcile(
        &mut self,
        set: &DeviceSet,
        withdrawn: &mut BTreeSet<String>,
    ) -> Result<(), FleetError> {
        let gone: Vec<String> = self
            .published
            .iter()
            .filter(|(name, (rec, _))| set.get(*name) != Some(rec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let rev = self.published[&name].1;
            // Forgotten only once withdrawn: a session lost in between
            // leaves it for the next one on the same lease to finish.
            self.withdraw(&name, rev).await?;
            self.published.remove(&name);
            withdrawn.insert(name);
        }
        for (name, rec) in set {
            if self.published.contains_key(name) {
                continue;
            }
            match self.publish(rec, withdrawn.contains(name)).await? {
                Outcome::Published(rev) => {
                    self.refused.set(name, false);
                    info!(
                        "fleet: published {name} ({} on {}:{}, labels [{}])",
                        rec.busid,
                        rec.host,
                        rec.port,
                        rec.labels.join(", ")
                    );
                    self.published.insert(name.clone(), (rec.clone(), rev));
                }
                Outcome::Taken(owner) => {
                    self.refused.set(name, true);
                    warn!(
                        "fleet: the name \"{name}\" is already published by server {owner} \
                         (EEXIST): {} stays exported locally only and nothing of it is written \
                         to etcd; give it a `name` of its own in its [[device]] section. \
                         It is tried again when this server's devices change or publishing \
                         restarts",
                        rec.busid
                    )
                }
            }
        }
        Ok(())
    }

    /// One device's record into `devices/<name>`, under this lease.
    async fn publish(&mut self, rec: &DeviceRecord, hotplug: bool) -> Result<Outcome, FleetError> {
        let eps = self.endpoints.clone();
        let key = device_key(&rec.name);
        let transition = transition_key(&rec.name);
        let value = serde_json::to_vec(rec).expect("a device record serialises");
        let leased = || Some(PutOptions::new().with_lease(self.lease));
        for _ in 0..TXN_ATTEMPTS {
            let current = bounded(&eps, self.client.get(key.as_str(), None)).await?;
            // The guard: the key is as read (absent, or this server's own
            // record at that revision).
            let guard = match current.kvs().first() {
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Some(kv) => {
                    let owner = serde_json::from_slice::<DeviceRecord>(kv.value())
                        .map(|r| r.server)
                        .unwrap_or_else(|_| "(unreadable record)".into());
                    if owner != self.config.server.id {
                        return Ok(Outcome::Taken(owner));
                    }
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
            };
            if hotplug {
                let txn = Txn::new().when([guard.clone()]).and_then([TxnOp::put(
                    transition.as_str(),
                    rec.name.as_str(),
                    leased(),
                )]);
                let r = bounded(&eps, self.client.txn(txn)).await?;
                if !r.succeeded() {
                    continue;
                }
                debug!("fleet: {} in transition (re-published)", rec.name);
            }
            let txn = Txn::new().when([guard]).and_then([
                TxnOp::put(key.as_str(), value.clone(), leased()),
                TxnOp::delete(transition.as_str(), None),
            ]);
            let r = bounded(&eps, self.client.txn(txn)).await?;
            if r.succeeded() {
                let rev = r.op_responses().into_iter().find_map(|op| match op {
                    TxnOpResponse::Put(p) => p.header().map(|h| h.revision()),
                    _ => None,
                });
                let rev = rev
                    .or_else(|| r.header().map(|h| h.revision()))
                    .unwrap_or(0);
                return Ok(Outcome::Published(rev));
            }
        }
        Err(FleetError::Contended { key })
    }

    /// Takes `devices/<name>` (written at `rev`) out: `transition/<name>`
    /// first, then both deleted in one transaction.
    async fn withdraw(&mut self, name: &str, rev: i64) -> Result<(), FleetError> {
        let eps = self.endpoints.clone();
        let key = device_key(name);
        let transition = transition_key(name);
        let ours = Compare::mod_revision(key.as_str(), CompareOp::Equal, rev);
        let mark = Txn::new().when([ours.clone()]).and_then([TxnOp::put(
            transition.as_str(),
            name,
            Some(PutOptions::new().with_lease(self.lease)),
        )]);
        let marked = bounded(&eps, self.client.txn(mark)).await?.succeeded();
        if !marked {
            // The record is not the one this session wrote any more (its
            // lease expired meanwhile and another server took the name):
            // nothing of ours to withdraw.
            info!("fleet: {name} was no longer this server's record; nothing withdrawn");
            return Ok(());
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([
                TxnOp::delete(key.as_str(), None),
                TxnOp::delete(transition.as_str(), None),
            ])
            .or_else([TxnOp::delete(transition.as_str(), None)]);
        bounded(&eps, self.client.txn(txn)).await?;
        info!("fleet: withdrew {name}");
        Ok(())
    }

    /// Revokes the lease: this server and its devices leave the fleet.
    async fn goodbye(&mut self) {
        let eps = self.endpoints.clone();
        match bounded(&eps, self.client.lease_revoke(self.lease)).await {
            Ok(_) => info!(
                "fleet: revoked lease {:x}: server {} and its devices left the fleet",
                self.lease, self.config.server.id
            ),
            Err(e) => warn!("fleet: revoking the lease failed ({e}); it expires by itself"),
        }
    }
}
