//! What the server is doing, for `usbip state`: every exported device and,
//! for each import, who holds it, since when and how much it has moved.
//!
//! The session adds to an import's counters once per read or write system
//! call (relaxed atomics, no lock); readers take a snapshot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use usbwire_proto::DeviceInfo;

use crate::acl::ClientIdentity;

/// One import's identity and traffic, shared by its session (which counts)
/// and the registry (which reports).
#[derive(Debug)]
pub struct ImportRecord {
    pub since: SystemTime,
    pub tls: Option<ClientIdentity>,
    /// Whether the session counts this import's traffic: not when a kernel
    /// driver carries its URBs.
    counted: std::sync::atomic::AtomicBool,
    urbs: AtomicU64,
    bytes_from_client: AtomicU64,
    bytes_to_client: AtomicU64,
}

impl ImportRecord {
    pub fn new(tls: Option<ClientIdentity>) -> ImportRecord {
        ImportRecord {
            since: SystemTime::now(),
            tls,
            counted: Default::default(),
            urbs: AtomicU64::new(0),
            bytes_from_client: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
        }
    }

    /// The session serves the URBs itself: from now on its traffic counts.
    pub fn start_counting(&self) {
        self.counted.store(true, Ordering::Relaxed);
    }

    pub fn add_from_client(&self, bytes: usize) {
        self.bytes_from_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_to_client(&self, bytes: usize) {
        self.bytes_to_client
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The session's running total of CMD_SUBMITs taken.
    pub fn set_urbs(&self, urbs: u64) {
        self.urbs.store(urbs, Ordering::Relaxed);
    }

    /// The counters now; `None` while nothing counts them.
    pub fn traffic(&self) -> Option<Traffic> {
        self.counted.load(Ordering::Relaxed).then(|| Traffic {
            urbs: self.urbs.load(Ordering::Relaxed),
            bytes_from_client: self.bytes_from_client.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
        })
    }
}

/// An import's traffic so far, USB/IP headers included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub urbs: u64,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// One exported device as [`crate::Registry::state`] sees it.
#[derive(Debug, Clone)]
pub struct ExportState {
    pub info: DeviceInfo,
    pub import: Option<ImportState>,
}

/// Who holds an exported device.
#[derive(Debug, Clone)]
pub struct ImportState {
    pub client: SocketAddr,
    /// The session has ended and the device is being reset.
    pub releasing: bool,
    pub since: SystemTime,
    pub tls: Option<ClientIdentity>,
    pub traffic: Option<Traffic>,
}
