//! The one namespace of exported devices.
//!
//! Every exported device, emulated or real, has exactly one slot here, named
//! by its bus id. A slot is reserved before it is filled, so that two
//! exporters racing for one name get a clean EEXIST rather than two
//! half-made devices, and an operation on a slot that is still changing gets
//! a clean EAGAIN. Importing moves the backend out of the slot into the
//! importing session, so no lock is held while URBs run; releasing moves it
//! back.
//!
//! An import does not end at one instant: its client closes the connection,
//! the session notices, and the device is reset before it is given back. A
//! client that re-imports at once, or a script that runs `usbip unbind`
//! right after `usbip detach`, arrives in the middle of that. So an import
//! or unbind that finds the device imported waits, bounded by
//! [`WaitBounds`], for the release instead of being refused: it is woken by
//! the release itself, and it looks at the importer's socket to tell an
//! import that is ending (the client's close has arrived, even if the
//! session has not read that far) from one that is still in use.

use std::collections::BTreeMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::info;
use usbwire_proto::{BusId, DeviceInfo, Errno, OpStatus};

use crate::acl::ClientIdentity;
use crate::state::{ExportState, ImportRecord, ImportState};
use crate::Backend;

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("bus id {0} is already exported (EEXIST)")]
    Exists(String),
    #[error("bus id {0} is changing state right now; try again (EAGAIN)")]
    Busy(String),
    #[error("no exported device has bus id {0} (ENODEV)")]
    NotFound(String),
    #[error("device {busid} is imported by {client} (EBUSY)")]
    InUse { busid: String, client: SocketAddr },
    #[error("device {busid} is still being given back after the import by {client} ended (EBUSY)")]
    Releasing { busid: String, client: SocketAddr },
    #[error(
        "invalid bus id {0:?}: use the form BUS-PORT[.PORT...] (or usbip-vudc.N), at most 31 bytes"
    )]
    BadBusid(String),
}

impl RegistryError {
    pub fn errno(&self) -> Errno {
        match self {
            RegistryError::Exists(_) => Errno::EEXIST,
            RegistryError::Busy(_) => Errno::EAGAIN,
            RegistryError::NotFound(_) => Errno::ENODEV,
            RegistryError::InUse { .. } | RegistryError::Releasing { .. } => Errno::EBUSY,
            RegistryError::BadBusid(_) => Errno::EINVAL,
        }
    }

    /// The OP_REP_IMPORT status that tells an importer the same thing.
    pub fn op_status(&self) -> OpStatus {
        match self {
            RegistryError::NotFound(_) | RegistryError::BadBusid(_) => OpStatus::NoDev,
            RegistryError::InUse { .. }
            | RegistryError::Releasing { .. }
            | RegistryError::Busy(_) => OpStatus::DevBusy,
            RegistryError::Exists(_) => OpStatus::Error,
        }
    }
}

/// How long an import or an unbind waits for the device's current import
/// to end before it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitBounds {
    /// While the import still looks active. Its client may have closed it
    /// already without the close having reached us: vhci closes the socket
    /// from a kernel thread after `usbip detach` has returned, and on a
    /// network the close and the new connection travel separately.
    pub close: Duration,
    /// From the moment the import is known to be ending: how long giving
    /// the device back may take (a usbfs device discards its URBs, which
    /// the kernel bounds at 2 s here, and is reset).
    pub release: Duration,
}

impl Default for WaitBounds {
    fn default() -> Self {
        WaitBounds {
            close: Duration::from_secs(1),
            release: Duration::from_secs(5),
        }
    }
}

/// The connection that holds an imported device.
pub struct Importer {
    conn: u64,
    client: SocketAddr,
    /// A second descriptor of the connection's socket, to see whether the
    /// client has closed it without reading from it, and to shut it down
    /// when the import is ended from outside. Dropped when the session
    /// ends, so that it never keeps the connection open.
    socket: TcpStream,
    end: Arc<Notify>,
    record: Arc<ImportRecord>,
}

/// The session's half of an [`Importer`]: tells it to end the import.
pub struct EndRequest(Arc<Notify>);

impl EndRequest {
    /// Resolves once someone asked the import to end: `unbind --force`, or
    /// a waiter that saw the client's close before the session did.
    pub async fn requested(&self) {
        self.0.notified().await
    }
}

impl Importer {
    /// The importer of connection `conn` on `socket`.
    pub fn new(conn: u64, socket: &impl AsFd) -> io::Result<(Importer, EndRequest)> {
        let socket = TcpStream::from(socket.as_fd().try_clone_to_owned()?);
        let client = socket.peer_addr()?;
        let end = Arc::new(Notify::new());
        Ok((
            Importer {
                conn,
                client,
                socket,
                end: end.clone(),
                record: Arc::new(ImportRecord::new(None)),
            },
            EndRequest(end),
        ))
    }

    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The same importer, known by the verified certificate of its TLS
    /// client.
    pub fn identified(mut self, tls: Option<ClientIdentity>) -> Importer {
        self.record = Arc::new(ImportRecord::new(tls));
        self
    }

    /// What the session counts for `usbip state`.
    pub fn record(&self) -> Arc<ImportRecord> {
        self.record.clone()
    }

    /// The client closed or reset the connection: no command can follow,
    /// whatever the session has read so far.
    fn client_closed(&self) -> bool {
        crate::sys::peer_closed(self.socket.as_fd())
    }

    /// Ends the import as the kernel's stub does when unbound: the socket
    /// is shut down (the client sees the disconnect now, whatever the
    /// session is doing) and the session stops.
    fn end(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        self.end.notify_one();
    }
}

enum SlotState {
    /// Reserved, not yet filled (or being removed).
    Transitional,
    Available(Box<dyn Backend>),
    Imported(Importer),
    /// The import's session has ended; its backend is being reset and
    /// comes back with [`Registry::release`].
    Releasing {
        conn: u64,
        client: SocketAddr,
        record: Arc<ImportRecord>,
    },
}

struct Slot {
    info: DeviceInfo,
    /// The backend's serial number, read when it was added.
    serial: Option<String>,
    state: SlotState,
}

type Map = BTreeMap<String, Slot>;

struct Inner {
    map: Mutex<Map>,
    /// Wakes the waiters that block a thread (unbind) when a slot changes.
    changed: Condvar,
    /// Wakes the waiters that are tasks (imports) when a slot changes.
    changes: watch::Sender<()>,
    /// What [`Registry::refresh`] runs.
    refreshers: Mutex<Vec<Refresher>>,
    /// One refresh at a time: a burst of requests queues here rather than
    /// on the blocking pool.
    refreshing: tokio::sync::Mutex<()>,
}

/// Brings some devices of the registry up to date with the system; blocks.
type Refresher = Arc<dyn Fn() + Send + Sync>;

/// Shared handle to the registry.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Arc::new(Inner {
                map: Mutex::new(BTreeMap::new()),
                changed: Condvar::new(),
                changes: watch::Sender::new(()),
                refreshers: Mutex::new(Vec::new()),
                refreshing: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

/// A reserved name. Dropping it without [`Reservation::commit`] frees the name.
pub struct Reservation {
    registry: Registry,
    busid: String,
    done: bool,
}

impl Reservation {
    pub fn busid(&self) -> &str {
        &self.busid
    }

    /// Fills the slot: the device becomes visible and importable.
    pub fn commit(mut self, info: DeviceInfo, backend: Box<dyn Backend>) {
        let mut map = self.registry.lock();
        if let Some(slot) = map.get_mut(&self.busid) {
            slot.info = info;
            slot.serial = backend.serial();
            slot.state = SlotState::Available(backend);
        }
        self.registry.notify();
        self.done = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let mut map = self.registry.lock();
            if matches!(
                map.get(&self.busid),
                Some(Slot {
                    state: SlotState::Transitional,
                    ..
                })
            ) {
                map.remove(&self.busid);
                self.registry.notify();
            }
        }
    }
}

/// Checks the `BUS-PORT[.PORT]` shape that vhci and the C tools expect,
/// or the `usbip-vudc.N` name under which the C `usbipd -e` exports a
/// gadget (its platform device's name).
pub fn valid_busid(busid: &str) -> bool {
    if busid.len() >= usbwire_proto::op::BUSID_LEN {
        return false;
    }
    if let Some(n) = busid.strip_prefix("usbip-vudc.") {
        return !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    }
    let Some((bus, ports)) = busid.split_once('-') else {
        return false;
    };
    !bus.is_empty()
        && bus.bytes().all(|b| b.is_ascii_digit())
        && !ports.is_empty()
        && ports
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// What a waiter does after looking at the slot.
enum Turn {
    /// The device is available: take it.
    Take,
    /// Look again at the next change, or at this instant.
    Wait(Instant),
    Refuse(RegistryError),
}

/// One import's or unbind's wait for the device's current import to end.
struct Wait {
    bounds: WaitBounds,
    /// Ends an active import instead of waiting for its client (unbind --force).
    force: bool,
    close_deadline: Instant,
    release_deadline: Option<Instant>,
    /// Whether this waiter has asked the import to end (once is enough).
    asked_end: bool,
    /// The client whose import --force ended, to tell the user.
    forced: Option<SocketAddr>,
}

impl Wait {
    fn new(bounds: WaitBounds, force: bool) -> Wait {
        Wait {
            bounds,
            force,
            close_deadline: Instant::now() + bounds.close,
            release_deadline: None,
            asked_end: false,
            forced: None,
        }
    }

    fn turn(&mut self, busid: &str, slot: Option<&Slot>) -> Turn {
        let Some(slot) = slot else {
            return Turn::Refuse(RegistryError::NotFound(busid.to_string()));
        };
        let (client, ending) = match &slot.state {
            SlotState::Transitional => return Turn::Refuse(RegistryError::Busy(busid.to_string())),
            SlotState::Available(_) => return Turn::Take,
            SlotState::Releasing { client, .. } => (*client, true),
            SlotState::Imported(imp) => {
                let closed = imp.client_closed();
                if (closed || self.force) && !self.asked_end {
                    // The session ends on the client's close by itself, but
                    // not while it has stopped reading (commands fill the
                    // in-flight bounds): telling it costs nothing.
                    let why = if closed {
                        "its client closed the connection"
                    } else {
                        self.forced = Some(imp.client);
                        "unbind --force"
                    };
                    info!(conn = imp.conn, %busid, client = %imp.client, "ending the import: {why}");
                    imp.end();
                    self.asked_end = true;
                }
                (imp.client, closed || self.force)
            }
        };
        let now = Instant::now();
        if ending && self.release_deadline.is_none() {
            self.release_deadline = Some(now + self.bounds.release);
        }
        let deadline = self.release_deadline.unwrap_or(self.close_deadline);
        if now < deadline {
            return Turn::Wait(deadline);
        }
        let busid = busid.to_string();
        Turn::Refuse(if ending {
            RegistryError::Releasing { busid, client }
        } else {
            RegistryError::InUse { busid, client }
        })
    }
}

/// A device taken out by [`Registry::remove_when_free`].
pub struct Removed {
    pub backend: Box<dyn Backend>,
    /// The client whose import `force` ended, if it did.
    pub forced: Option<SocketAddr>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // A panic while holding this lock cannot leave a slot half-written
        // (every update is a single assignment), so a poisoned lock is safe
        // to keep using.
        self.inner.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever a slot does, for a task that waits on the registry.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.inner.changes.subscribe()
    }

    /// Wakes every waiter to look at its slot again.
    fn notify(&self) {
        self.inner.changed.notify_all();
        self.inner.changes.send_replace(());
    }

    /// Adds an exporter whose devices come and go with no event to tell
    /// the daemon (gadgets bound to `usbip-vudc`): `refresh` re-reads them
    /// and updates the registry. It may block on sysfs; it runs on the
    /// blocking pool before each device list and import, as the C usbipd
    /// re-reads sysfs for each request.
    pub fn add_refresher(&self, refresh: impl Fn() + Send + Sync + 'static) {
        self.inner
            .refreshers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(refresh));
    }

    /// Runs the refreshers (see [`Registry::add_refresher`]), one refresh
    /// at a time; at once when there are none.
    pub async fn refresh(&self) {
        let refreshers = self
            .inner
            .refreshers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if refreshers.is_empty() {
            return;
        }
        let _turn = self.inner.refreshing.lock().await;
        let ran = tokio::task::spawn_blocking(move || {
            for refresh in &refreshers {
                refresh();
            }
        })
        .await;
        if let Err(e) = ran {
            tracing::error!("refreshing the exported devices failed: {e}");
        }
    }

    /// Reserves a bus id.
    pub fn reserve(&self, busid: &str) -> Result<Reservation, RegistryError> {
        if !valid_busid(busid) {
            return Err(RegistryError::BadBusid(busid.to_string()));
        }
        let mut map = self.lock();
        if let Some(slot) = map.get(busid) {
            return Err(match slot.state {
                SlotState::Transitional => RegistryError::Busy(busid.to_string()),
                _ => RegistryError::Exists(busid.to_string()),
            });
        }
        map.insert(
            busid.to_string(),
            Slot {
                info: placeholder_info(busid),
                serial: None,
                state: SlotState::Transitional,
            },
        );
        Ok(Reservation {
            registry: self.clone(),
            busid: busid.to_string(),
            done: false,
        })
    }

    /// Reserves and fills in one step.
    pub fn add(&self, info: DeviceInfo, backend: Box<dyn Backend>) -> Result<(), RegistryError> {
        // A name that is not UTF-8 is not a valid bus id either: its
        // replacement characters fail the check.
        let r = self.reserve(&info.busid.to_string())?;
        r.commit(info, backend);
        Ok(())
    }

    /// Removes an available device and returns its backend, at once.
    pub fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, RegistryError> {
        let mut map = self.lock();
        let slot = map
            .get(busid)
            .ok_or_else(|| RegistryError::NotFound(busid.to_string()))?;
        let busid_s = busid.to_string();
        match &slot.state {
            SlotState::Transitional => return Err(RegistryError::Busy(busid_s)),
            SlotState::Imported(imp) => {
                return Err(RegistryError::InUse {
                    busid: busid_s,
                    client: imp.client,
                })
            }
            SlotState::Releasing { client, .. } => {
                return Err(RegistryError::Releasing {
                    busid: busid_s,
                    client: *client,
                })
            }
            SlotState::Available(_) => {}
        }
        let removed = map.remove(busid).map(|s| s.state);
        self.notify();
        match removed {
            Some(SlotState::Available(b)) => Ok(b),
            _ => unreachable!("checked above under the same lock"),
        }
    }

    /// Removes a device once no import holds it. An import that is ending
    /// is waited for, within `bounds`; an active one is refused naming its
    /// client, or with `force` ended (its connection shut down, as the
    /// kernel's stub does when unbound) and then waited for. Blocks the
    /// calling thread while it waits.
    pub fn remove_when_free(
        &self,
        busid: &str,
        force: bool,
        bounds: WaitBounds,
    ) -> Result<Removed, RegistryError> {
        let mut wait = Wait::new(bounds, force);
        let mut map = self.lock();
        loop {
            match wait.turn(busid, map.get(busid)) {
                Turn::Take => {
                    let Some(SlotState::Available(backend)) = map.remove(busid).map(|s| s.state)
                    else {
                        unreachable!("Take is only returned for an available slot")
                    };
                    self.notify();
                    return Ok(Removed {
                        backend,
                        forced: wait.forced,
                    });
                }
                Turn::Refuse(e) => return Err(e),
                Turn::Wait(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    map = self
                        .inner
                        .changed
                        .wait_timeout(map, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Takes a device for an importing connection. If another import holds
    /// it, waits within `bounds` for that import to end (see the module
    /// documentation); refused with the other client's address otherwise.
    /// The bus id is compared byte for byte: exported names are ASCII
    /// (`valid_busid`), so one that is not UTF-8 names none of them.
    pub async fn import(
        &self,
        busid: &BusId,
        importer: Importer,
        bounds: WaitBounds,
    ) -> Result<(DeviceInfo, Box<dyn Backend>), RegistryError> {
        self.import_granted(busid, importer, bounds, |_| true).await
    }

    /// [`Registry::import`] of a device that `granted` accepts: one it
    /// refuses is [`RegistryError::NotFound`] at once, whatever its state,
    /// so that the importer learns nothing of it. Asked under the same lock
    /// that takes the device, so what it accepted is what is imported.
    pub async fn import_granted(
        &self,
        busid: &BusId,
        importer: Importer,
        bounds: WaitBounds,
        granted: impl Fn(&DeviceInfo) -> bool,
    ) -> Result<(DeviceInfo, Box<dyn Backend>), RegistryError> {
        let Some(busid) = busid.as_str() else {
            return Err(RegistryError::NotFound(busid.to_string()));
        };
        let mut wait = Wait::new(bounds, false);
        loop {
            // Subscribed before looking: a change made after the look wakes us.
            let mut changes = self.inner.changes.subscribe();
            let deadline = {
                let mut map = self.lock();
                let slot = map.get(busid).filter(|s| granted(&s.info));
                match wait.turn(busid, slot) {
                    Turn::Take => {
                        let slot = map
                            .get_mut(busid)
                            .expect("Take is only returned for a slot");
                        let SlotState::Available(backend) =
                            std::mem::replace(&mut slot.state, SlotState::Imported(importer))
                        else {
                            unreachable!("Take is only returned for an available slot")
                        };
                        return Ok((slot.info.clone(), backend));
                    }
                    Turn::Refuse(e) => return Err(e),
                    Turn::Wait(deadline) => deadline,
                }
            };
            // A change or the deadline: either way the slot is looked at again.
            let _ = tokio::time::timeout_at(deadline.into(), changes.changed()).await;
        }
    }

    /// The session of connection `conn` has ended: its device is on its way
    /// back, and waiters may count on that.
    pub fn ending(&self, busid: &str, conn: u64) {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(busid) {
            if let SlotState::Imported(imp) = &slot.state {
                if imp.conn == conn {
                    let client = imp.client;
                    let record = imp.record.clone();
                    // Drops the importer's descriptor of the socket.
                    slot.state = SlotState::Releasing {
                        conn,
                        client,
                        record,
                    };
                    self.notify();
                }
            }
        }
    }

    /// Gives a device back after its importing connection ended.
    pub fn release(&self, busid: &str, conn: u64, backend: Box<dyn Backend>) {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(busid) {
            let ours = match &slot.state {
                SlotState::Imported(imp) => imp.conn == conn,
                SlotState::Releasing { conn: c, .. } => *c == conn,
                _ => false,
            };
            if ours {
                slot.state = SlotState::Available(backend);
                self.notify();
            }
        }
    }

    /// The client that holds `busid`, if it is imported or being released.
    pub fn client_of(&self, busid: &str) -> Option<SocketAddr> {
        match &self.lock().get(busid)?.state {
            SlotState::Imported(imp) => Some(imp.client),
            SlotState::Releasing { client, .. } => Some(*client),
            _ => None,
        }
    }

    /// Devices that can be imported now, in bus id order. Imported devices
    /// are left out, as the C usbipd does.
    pub fn devlist(&self) -> Vec<DeviceInfo> {
        self.lock()
            .values()
            .filter(|s| matches!(s.state, SlotState::Available(_)))
            .map(|s| s.info.clone())
            .collect()
    }

    /// The serial number of the device at `busid`, if its backend has one.
    pub fn serial(&self, busid: &str) -> Option<String> {
        self.lock().get(busid).and_then(|s| s.serial.clone())
    }

    /// Every committed device and whether it is imported.
    pub fn all(&self) -> Vec<(DeviceInfo, bool)> {
        self.lock()
            .values()
            .filter(|s| !matches!(s.state, SlotState::Transitional))
            .map(|s| {
                (
                    s.info.clone(),
                    matches!(
                        s.state,
                        SlotState::Imported(_) | SlotState::Releasing { .. }
                    ),
                )
            })
            .collect()
    }

    /// Every committed device, and who imports it, in bus id order.
    pub fn state(&self) -> Vec<ExportState> {
        let import = |client, releasing, record: &ImportRecord| ImportState {
            client,
            releasing,
            since: record.since,
            tls: record.tls.clone(),
            traffic: record.traffic(),
        };
        self.lock()
            .values()
            .filter_map(|s| {
                let import = match &s.state {
                    SlotState::Transitional => return None,
                    SlotState::Available(_) => None,
                    SlotState::Imported(imp) => Some(import(imp.client, false, &imp.record)),
                    SlotState::Releasing { client, record, .. } => {
                        Some(import(*client, true, record))
                    }
                };
                Some(ExportState {
                    info: s.info.clone(),
                    import,
                })
            })
            .collect()
    }

    /// Takes every available backend out (for a clean shutdown's flush).
    pub fn drain_available(&self) -> Vec<(String, Box<dyn Backend>)> {
        let mut map = self.lock();
        let mut out = Vec::new();
        for (busid, slot) in map.iter_mut() {
            if matches!(slot.state, SlotState::Available(_)) {
                if let SlotState::Available(b) =
                    std::mem::replace(&mut slot.state, SlotState::Transitional)
                {
                    out.push((busid.clone(), b));
                }
            }
        }
        out
    }

    /// Puts back a backend taken by [`Registry::drain_available`].
    pub fn restore(&self, busid: &str, backend: Box<dyn Backend>) {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(busid) {
            if matches!(slot.state, SlotState::Transitional) {
                slot.state = SlotState::Available(backend);
                self.notify();
            }
        }
    }
}

pub(crate) fn placeholder_info(busid: &str) -> DeviceInfo {
    DeviceInfo {
        path: Default::default(),
        busid: busid.into(),
        busnum: 0,
        devnum: 0,
        speed: usbwire_proto::Speed::Unknown,
        id_vendor: 0,
        id_product: 0,
        bcd_device: 0,
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 0,
        num_configurations: 0,
        num_interfaces: 0,
        interfaces: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Completion, TransferType, Urb};
    use std::io::Read;
    use std::task::{Context, Poll};

    /// A backend that only says which one it is.
    struct Marker(u16);

    impl Backend for Marker {
        fn device_info(&self, busid: &str, _: u32, _: u32) -> DeviceInfo {
            let mut info = placeholder_info(busid);
            info.id_product = self.0;
            info
        }
        fn transfer_type(&self, _: u8) -> Option<TransferType> {
            None
        }
        fn poll_urb(&mut self, _: &mut Urb, _: &mut Context<'_>) -> Poll<Completion> {
            Poll::Ready(Completion::failed(Errno::EPIPE))
        }
        fn release(&mut self) {}
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn marker_of(b: &dyn Backend) -> u16 {
        b.device_info("1-1", 0, 0).id_product
    }

    fn registry_with(marker: u16) -> Registry {
        let r = Registry::new();
        let b = Box::new(Marker(marker));
        r.add(b.device_info("1-1", 1, 2), b).unwrap();
        r
    }

    /// A loopback connection: (client end, server end).
    fn connection() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        (client, server)
    }

    const LONG: WaitBounds = WaitBounds {
        close: Duration::from_secs(60),
        release: Duration::from_secs(60),
    };
    const SHORT: WaitBounds = WaitBounds {
        close: Duration::from_millis(50),
        release: Duration::from_millis(50),
    };

    /// Imports 1-1 for connection `conn`: the client end, the server end and
    /// the session's end request.
    async fn import(
        r: &Registry,
        conn: u64,
    ) -> (TcpStream, TcpStream, EndRequest, Box<dyn Backend>) {
        let (client, server) = connection();
        let (imp, end) = Importer::new(conn, &server).unwrap();
        let (_, backend) = r.import(&BusId::from("1-1"), imp, SHORT).await.unwrap();
        (client, server, end, backend)
    }

    /// Yields until a task waits for a change of the registry (bounded).
    async fn until_someone_waits(r: &Registry) {
        for _ in 0..100_000 {
            if r.inner.changes.receiver_count() > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("no import started waiting");
    }

    fn second_importer(conn: u64) -> (TcpStream, Importer) {
        let (client, server) = connection();
        let (imp, _end) = Importer::new(conn, &server).unwrap();
        (client, imp)
    }

    /// `usbip state`'s view through an import's life: available, imported
    /// with what its session counted, releasing with the same record, and
    /// available again.
    #[tokio::test]
    async fn state_follows_an_import_and_keeps_its_record_while_releasing() {
        let r = registry_with(7);
        let one = |r: &Registry| {
            let mut s = r.state();
            assert_eq!(s.len(), 1);
            s.remove(0)
        };
        assert!(one(&r).import.is_none());
        let (client, server) = connection();
        let (imp, _end) = Importer::new(1, &server).unwrap();
        let record = imp.record();
        let (_, backend) = r.import(&BusId::from("1-1"), imp, SHORT).await.unwrap();
        let s = one(&r);
        assert_eq!(s.info.id_product, 7);
        let i = s.import.unwrap();
        assert_eq!(i.client, client.local_addr().unwrap());
        assert!(!i.releasing && i.tls.is_none());
        // Not counted until the session serves the URBs itself.
        assert_eq!(i.traffic, None);
        record.start_counting();
        record.add_from_client(48);
        record.add_to_client(66);
        record.set_urbs(1);
        let counted = Some(crate::state::Traffic {
            urbs: 1,
            bytes_from_client: 48,
            bytes_to_client: 66,
        });
        assert_eq!(one(&r).import.unwrap().traffic, counted);
        r.ending("1-1", 1);
        let i = one(&r).import.unwrap();
        assert!(i.releasing);
        assert_eq!(i.traffic, counted);
        r.release("1-1", 1, backend);
        assert!(one(&r).import.is_none());
    }

    #[tokio::test]
    async fn an_import_waits_for_the_release_under_way_and_gets_the_device() {
        let r = registry_with(7);
        let (_c1, _s1, _end1, backend) = import(&r, 1).await;
        r.ending("1-1", 1);
        let (c2, imp2) = second_importer(2);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move {
                r.import(&BusId::from("1-1"), imp2, LONG)
                    .await
                    .map(|(_, b)| marker_of(&*b))
            }
        });
        until_someone_waits(&r).await;
        assert!(
            !waiter.is_finished(),
            "the import did not wait for the release"
        );
        r.release("1-1", 1, backend);
        assert_eq!(waiter.await.unwrap(), Ok(7));
        assert_eq!(r.client_of("1-1"), Some(c2.local_addr().unwrap()));
    }

    #[tokio::test]
    async fn an_active_import_is_refused_naming_its_client_when_the_wait_ends() {
        let r = registry_with(7);
        let (c1, _s1, end1, _backend) = import(&r, 1).await;
        let client = c1.local_addr().unwrap();
        let (_c2, imp2) = second_importer(2);
        let e = r
            .import(&BusId::from("1-1"), imp2, SHORT)
            .await
            .err()
            .unwrap();
        assert_eq!(
            e,
            RegistryError::InUse {
                busid: "1-1".into(),
                client
            }
        );
        assert!(e.to_string().contains(&client.to_string()), "{e}");
        assert_eq!(e.op_status(), OpStatus::DevBusy);
        assert_eq!(e.errno(), Errno::EBUSY);
        let e = r.remove_when_free("1-1", false, SHORT).err().unwrap();
        assert_eq!(e.errno(), Errno::EBUSY);
        assert!(e.to_string().contains(&client.to_string()), "{e}");
        // The active import was left alone.
        assert!(!crate::sys::peer_closed(c1.as_fd()));
        tokio::select! {
            biased;
            () = end1.requested() => panic!("a refused import ended the active one"),
            () = std::future::ready(()) => {}
        }
    }

    #[tokio::test]
    async fn a_release_that_never_comes_is_refused_naming_the_client() {
        let r = registry_with(7);
        let (c1, _s1, _end1, _backend) = import(&r, 1).await;
        let client = c1.local_addr().unwrap();
        r.ending("1-1", 1);
        let (_c2, imp2) = second_importer(2);
        let e = r
            .import(&BusId::from("1-1"), imp2, SHORT)
            .await
            .err()
            .unwrap();
        assert_eq!(
            e,
            RegistryError::Releasing {
                busid: "1-1".into(),
                client
            }
        );
        assert_eq!(e.op_status(), OpStatus::DevBusy);
        let e = r.remove_when_free("1-1", true, SHORT).err().unwrap();
        assert!(matches!(e, RegistryError::Releasing { client: c, .. } if c == client));
    }

    #[tokio::test]
    async fn a_close_the_session_has_not_read_yet_ends_the_import_for_the_next_one() {
        let r = registry_with(7);
        let (c1, s1, end1, backend) = import(&r, 1).await;
        drop(c1);
        // The close has arrived (what the session has not read yet).
        s1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(s1.peek(&mut [0u8; 1]).unwrap(), 0);
        let (_c2, imp2) = second_importer(2);
        let waiter = tokio::spawn({
            let r = r.clone();
            async move {
                r.import(&BusId::from("1-1"), imp2, LONG)
                    .await
                    .map(|(_, b)| marker_of(&*b))
            }
        });
        // The waiter tells the session, which then ends as it would on EOF.
        end1.requested().await;
        r.ending("1-1", 1);
        drop(s1);
        r.release("1-1", 1, backend);
        assert_eq!(waiter.await.unwrap(), Ok(7));
    }

    #[tokio::test]
    async fn force_ends_an_active_import_and_removes_the_device_once_released() {
        let r = registry_with(7);
        let (mut c1, s1, end1, backend) = import(&r, 1).await;
        let client = c1.local_addr().unwrap();
        let remover = std::thread::spawn({
            let r = r.clone();
            move || {
                r.remove_when_free("1-1", true, LONG)
                    .map(|removed| (marker_of(&*removed.backend), removed.forced))
            }
        });
        end1.requested().await;
        // The client sees the connection shut down at once, as from the
        // kernel's stub, before the session has even ended.
        c1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(c1.read(&mut [0u8; 16]).unwrap(), 0);
        assert_eq!(r.client_of("1-1"), Some(client));
        r.ending("1-1", 1);
        drop(s1);
        r.release("1-1", 1, backend);
        assert_eq!(remover.join().unwrap(), Ok((7, Some(client))));
        assert!(r.all().is_empty());
        assert_eq!(
            r.remove("1-1").err(),
            Some(RegistryError::NotFound("1-1".into()))
        );
    }

    #[tokio::test]
    async fn a_device_not_granted_is_not_found_whatever_its_state() {
        let r = registry_with(7);
        let (_c1, _s1, _end1, backend) = import(&r, 1).await;
        // Imported by another client: refused at once, not after the wait
        // (which would tell that it exists and is in use).
        let (_c2, imp2) = second_importer(2);
        let e = r
            .import_granted(&BusId::from("1-1"), imp2, LONG, |_| false)
            .await
            .err()
            .unwrap();
        assert_eq!(e, RegistryError::NotFound("1-1".into()));
        r.ending("1-1", 1);
        r.release("1-1", 1, backend);
        let (_c3, imp3) = second_importer(3);
        let e = r
            .import_granted(&BusId::from("1-1"), imp3, SHORT, |d| d.id_product != 7)
            .await
            .err()
            .unwrap();
        assert_eq!(e, RegistryError::NotFound("1-1".into()));
        let (_c4, imp4) = second_importer(4);
        let (info, _) = r
            .import_granted(&BusId::from("1-1"), imp4, SHORT, |d| d.id_product == 7)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(info.id_product, 7);
    }

    #[tokio::test]
    async fn release_of_another_connection_changes_nothing() {
        let r = registry_with(7);
        let (_c1, _s1, _end1, backend) = import(&r, 1).await;
        r.ending("1-1", 2);
        r.release("1-1", 2, Box::new(Marker(9)));
        assert!(r.devlist().is_empty());
        r.release("1-1", 1, backend);
        assert_eq!(r.devlist()[0].id_product, 7);
    }

    #[tokio::test]
    async fn import_matches_the_bus_id_byte_for_byte() {
        let r = registry_with(7);
        let (_client, server) = connection();
        // What lossy UTF-8 made of these could have named another device;
        // as bytes, none names 1-1.
        for odd in [&b"1-1\xff"[..], b"1-1 ", &[0xff; 32]] {
            let (imp, _end) = Importer::new(1, &server).unwrap();
            match r.import(&BusId::from_field(odd), imp, SHORT).await {
                Err(e) => assert_eq!(e.op_status(), OpStatus::NoDev, "{odd:x?}"),
                Ok(_) => panic!("{odd:x?} imported 1-1"),
            }
        }
        let (imp, _end) = Importer::new(1, &server).unwrap();
        let (info, _backend) = r
            .import(&BusId::from_field(b"1-1\0after the NUL"), imp, SHORT)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(info.busid, "1-1");
    }

    #[test]
    fn bus_ids_are_usb_ports_or_vudc_names() {
        for good in ["1-1", "3-1.2.4", "usbip-vudc.0", "usbip-vudc.12"] {
            assert!(valid_busid(good), "{good}");
        }
        for bad in [
            "usbip-vudc.",
            "usbip-vudc.x",
            "usbip-vudc.0.1",
            "usbip-vudc",
            "dummy_udc.0",
            "1-",
            "-1",
            &format!("usbip-vudc.{}", "1".repeat(21)),
        ] {
            assert!(!valid_busid(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn refreshers_run_off_the_runtime_one_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::mpsc;
        let r = Registry::new();
        // No refresher: nothing to do, nothing spawned.
        r.refresh().await;
        let runs = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (go, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let (seen_runs, seen_running) = (runs.clone(), running.clone());
        let added = r.clone();
        r.add_refresher(move || {
            let overlapping = seen_running.fetch_add(1, Ordering::SeqCst);
            if seen_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                // Blocks until the test's task, on this test's only
                // runtime thread, says go: it could not if this ran there.
                let go = wait.lock().unwrap().recv_timeout(Duration::from_secs(30));
                assert!(go.is_ok(), "the refresh blocked the runtime");
                let _ = added.add(placeholder_info("usbip-vudc.0"), Box::new(Marker(1)));
            }
            seen_running.fetch_sub(1, Ordering::SeqCst);
            assert_eq!(overlapping, 0, "overlapping refreshes");
        });
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let r = r.clone();
            all.spawn(async move { r.refresh().await });
        }
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        while let Some(done) = all.join_next().await {
            done.unwrap();
        }
        assert_eq!(runs.load(Ordering::SeqCst), 8);
        let listed: Vec<_> = r.devlist().into_iter().map(|d| d.busid).collect();
        assert_eq!(listed, ["usbip-vudc.0"]);
    }
}
