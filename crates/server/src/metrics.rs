//! What a server counts for its operators (`usbipd --metrics`), kept as
//! plain atomics so that the URB path pays a few uncontended relaxed
//! additions and takes no lock: the per-device counters are found once per
//! import, and only a scrape walks the table of devices.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use usbwire_proto::Direction;
use usbwire_usb::TransferType;

/// URB statuses counted by name; any other goes to `other`.
pub const STATUSES: [(&str, i32); 10] = [
    ("ok", 0),
    ("EPIPE", -32),
    ("ENOENT", -2),
    ("ECONNRESET", -104),
    ("ESHUTDOWN", -108),
    ("ENODEV", -19),
    ("EPROTO", -71),
    ("EOVERFLOW", -75),
    ("ETIMEDOUT", -110),
    ("EREMOTEIO", -121),
];
const OTHER_STATUS: usize = STATUSES.len();

pub const DIRECTIONS: [&str; 2] = ["out", "in"];
pub const TRANSFER_TYPES: [&str; 4] = ["control", "isochronous", "bulk", "interrupt"];

pub(crate) fn transfer_type_index(t: TransferType) -> usize {
    match t {
        TransferType::Control => 0,
        TransferType::Isochronous => 1,
        TransferType::Bulk => 2,
        TransferType::Interrupt => 3,
    }
}

fn direction_index(d: Direction) -> usize {
    match d {
        Direction::Out => 0,
        Direction::In => 1,
    }
}

/// The counters of one exported device, over all its imports.
#[derive(Default)]
pub struct DeviceMetrics {
    /// Completed URBs, by direction and transfer type.
    urbs: [[AtomicU64; 4]; 2],
    /// Bytes moved (actual length), by direction and transfer type.
    bytes: [[AtomicU64; 4]; 2],
    /// Completed URBs by status, [`STATUSES`] then one for any other.
    statuses: [AtomicU64; STATUSES.len() + 1],
    /// URBs submitted and not yet completed.
    in_flight: AtomicI64,
    imports: AtomicU64,
}

impl DeviceMetrics {
    pub(crate) fn submitted(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// URBs that end without a RET_SUBMIT (unlinked in time, or still in
    /// flight when the import ended).
    pub(crate) fn dropped(&self, n: usize) {
        self.in_flight.fetch_sub(n as i64, Ordering::Relaxed);
    }

    pub(crate) fn completed(&self, dir: Direction, ty: usize, actual: usize, status: i32) {
        let d = direction_index(dir);
        self.urbs[d][ty].fetch_add(1, Ordering::Relaxed);
        if actual > 0 {
            self.bytes[d][ty].fetch_add(actual as u64, Ordering::Relaxed);
        }
        let s = STATUSES
            .iter()
            .position(|&(_, v)| v == status)
            .unwrap_or(OTHER_STATUS);
        self.statuses[s].fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Completed URBs of a direction ([`DIRECTIONS`]) and transfer type
    /// ([`TRANSFER_TYPES`]).
    pub fn urbs(&self, dir: usize, ty: usize) -> u64 {
        self.urbs[dir][ty].load(Ordering::Relaxed)
    }

    pub fn bytes(&self, dir: usize, ty: usize) -> u64 {
        self.bytes[dir][ty].load(Ordering::Relaxed)
    }

    /// URBs completed with each status of [`STATUSES`], then "other".
    pub fn statuses(&self) -> Vec<(&'static str, u64)> {
        STATUSES
            .iter()
            .map(|&(name, _)| name)
            .chain(["other"])
            .zip(&self.statuses)
            .map(|(name, n)| (name, n.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn imports(&self) -> u64 {
        self.imports.load(Ordering::Relaxed)
    }
}

/// How an error hold ended (see `queue.rs`).
#[derive(Debug, Clone, Copy)]
pub enum HoldEnd {
    /// The importer cleared the halt, changed the interface or
    /// configuration, or reset the device.
    Released,
    /// Its grace window ran out.
    Expired,
    /// The import ended while it was on.
    ImportEnded,
}

/// Server-wide counters.
#[derive(Default)]
pub struct Metrics {
    connections: AtomicU64,
    tls_ok: AtomicU64,
    tls_failed: AtomicU64,
    holds_started: AtomicU64,
    holds_ended: [AtomicU64; 3],
    /// Never shrinks: a device's counters outlive its export, as a counter
    /// must not go back. Bounded by the devices ever exported.
    devices: Mutex<BTreeMap<String, Arc<DeviceMetrics>>>,
}

impl Metrics {
    pub(crate) fn connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake(&self, ok: bool) {
        let c = if ok { &self.tls_ok } else { &self.tls_failed };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn hold_started(&self) {
        self.holds_started.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn hold_ended(&self, how: HoldEnd, n: usize) {
        if n > 0 {
            self.holds_ended[how as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The counters of `busid`.
    pub(crate) fn device(&self, busid: &str) -> Arc<DeviceMetrics> {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices.entry(busid.to_string()).or_default().clone()
    }

    /// One more import of `busid` accepted.
    pub(crate) fn imported(&self, busid: &str) {
        self.device(busid).imports.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections accepted, refused and throttled ones included.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// TLS handshakes completed and failed.
    pub fn tls_handshakes(&self) -> (u64, u64) {
        (
            self.tls_ok.load(Ordering::Relaxed),
            self.tls_failed.load(Ordering::Relaxed),
        )
    }

    pub fn holds_started(&self) -> u64 {
        self.holds_started.load(Ordering::Relaxed)
    }

    /// Error holds ended, by how: "released", "expired", "import_ended".
    pub fn holds_ended(&self) -> [(&'static str, u64); 3] {
        let n = |i: usize| self.holds_ended[i].load(Ordering::Relaxed);
        [
            ("released", n(HoldEnd::Released as usize)),
            ("expired", n(HoldEnd::Expired as usize)),
            ("import_ended", n(HoldEnd::ImportEnded as usize)),
        ]
    }

    /// Every device imported so far, by bus id.
    pub fn devices(&self) -> Vec<(String, Arc<DeviceMetrics>)> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
