//! Handing imported devices to the kernel's vhci-hcd, as the C `usbip
//! attach/detach/port` do, but race-free.
//!
//! What the kernel offers (drivers/usb/usbip/vhci_sysfs.c): every attribute
//! lives on the first controller, `/sys/devices/platform/vhci_hcd.0`, even
//! with several controllers:
//!
//! * `nports`: the number of ports over every controller;
//! * `status`, `status.1` ... `status.N-1`: one file per controller, a
//!   header line then one line per port,
//!   `hub port sta spd dev sockfd local_busid`, e.g.
//!   `hs  0000 006 003 00010002 000003 3-1`: hub `hs` or `ss`, the global
//!   port number (decimal), the `VDEV_ST_*` status (decimal), the speed
//!   (decimal `enum usb_device_speed`), the devid (hex), the socket fd that
//!   attached it (decimal) and the local bus id of the device. Controller
//!   `c` owns ports `c*2*P .. c*2*P+P-1` on its high-speed hub and the next
//!   `P` on its super-speed hub;
//! * `attach`: write `"<port> <sockfd> <devid> <speed>"` with a global port
//!   number. The kernel picks the HS or SS hub by the speed, and answers
//!   EBUSY if another attacher took the port first, EINVAL for bad
//!   arguments or a socket that is not a TCP stream;
//! * `detach`: write `"<port>"`; EINVAL if nothing is attached there.
//!
//! Port records (`/var/run/vhci_hcd/port<N>`, `"host service busid\n"`)
//! are written exactly as the C tool writes them, so either tool's
//! `usbip port` shows where a device came from.

mod attach;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
mod record;
pub(crate) mod remote;
mod status;
#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};

pub use crate::blocking::import_blocking;
pub use attach::{AttrWriter, SysfsWriter, VhciError, MAX_ATTACH_ATTEMPTS};
pub use record::{PortRecord, STATE_DIR};
pub use remote::{AttachError, Attached};
pub use status::{parse_status, pick_free_port, Hub, ImportedDevice, PortState, PortStatus};

/// A vhci-hcd instance, found under a root directory (`/` on a real system).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vhci {
    root: PathBuf,
}

impl Default for Vhci {
    fn default() -> Self {
        Vhci::new("/")
    }
}

impl Vhci {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Vhci { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/sys/devices/platform`.
    pub fn platform_dir(&self) -> PathBuf {
        self.root.join("sys/devices/platform")
    }

    /// The `vhci_hcd.N` directories, by N.
    pub fn controllers(&self) -> Vec<PathBuf> {
        let mut v: Vec<(u32, PathBuf)> = fs::read_dir(self.platform_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix("vhci_hcd.")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    /// `vhci_hcd.0`, which carries every attribute.
    pub fn hc_dir(&self) -> Result<PathBuf, VhciError> {
        let dir = self.platform_dir().join("vhci_hcd.0");
        if dir.join("attach").exists() || dir.join("status").exists() {
            Ok(dir)
        } else {
            Err(VhciError::NotLoaded { dir })
        }
    }

    /// `nports`: ports over every controller, both hubs.
    pub fn nports(&self) -> Result<u32, VhciError> {
        let path = self.hc_dir()?.join("nports");
        let text = fs::read_to_string(&path).map_err(|source| VhciError::Read {
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| VhciError::BadStatus {
            path,
            line: text.trim().to_string(),
        })
    }

    /// `status`, `status.1`, ...: one per controller, in order.
    pub fn status_files(&self) -> Result<Vec<PathBuf>, VhciError> {
        let dir = self.hc_dir()?;
        let mut out = vec![dir.join("status")];
        for i in 1.. {
            let p = dir.join(format!("status.{i}"));
            if !p.exists() {
                break;
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Every port of every controller, by port number.
    pub fn ports(&self) -> Result<Vec<PortStatus>, VhciError> {
        let mut out = Vec::new();
        for path in self.status_files()? {
            let text = fs::read_to_string(&path).map_err(|source| VhciError::Read {
                path: path.clone(),
                source,
            })?;
            out.extend(parse_status(&text).map_err(|line| VhciError::BadStatus { path, line })?);
        }
        out.sort_by_key(|p| p.port);
        Ok(out)
    }

    /// The ports in use, with their record, by port. Ports being attached
    /// (and free ones) are left out, as the C tool does.
    pub fn imported(&self) -> Result<Vec<ImportedDevice>, VhciError> {
        Ok(self
            .ports()?
            .into_iter()
            .filter(|p| !matches!(p.state, PortState::Free | PortState::Initializing))
            .map(|status| ImportedDevice {
                record: self.read_record(status.port),
                status,
            })
            .collect())
    }
}
