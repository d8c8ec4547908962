//! Writing vhci-hcd's `attach` and `detach` attributes, race-free.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno as NixErrno;
use usbwire_proto::Speed;

use super::status::{pick_free_port, Hub, PortStatus};
use super::Vhci;

/// How many times an attach is tried when other attachers keep taking the
/// port we picked. Each EBUSY also rules that port out, so a loop ends
/// anyway once every port of the right hub has been tried.
pub const MAX_ATTACH_ATTEMPTS: usize = 64;

/// Why talking to vhci-hcd failed.
#[derive(Debug, thiserror::Error)]
pub enum VhciError {
    #[error("vhci-hcd not loaded: run modprobe vhci-hcd (no {})", .dir.display())]
    NotLoaded { dir: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unexpected line in {}: {line:?}", .path.display())]
    BadStatus { path: PathBuf, line: String },
    #[error("vhci-hcd has no {hub} ports")]
    NoPorts { hub: Hub },
    #[error("no free {hub} port ({in_use} in use)")]
    NoFreePort { hub: Hub, in_use: usize },
    #[error("gave up after {attempts} attempts: other attachers kept taking the free {hub} ports")]
    TooManyRaces { hub: Hub, attempts: usize },
    #[error("vhci-hcd cannot take a device of {} (speed {})", .speed.describe(), .speed.to_u32())]
    UnsupportedSpeed { speed: Speed },
    #[error("writing {} needs root", .path.display())]
    NeedsRoot { path: PathBuf },
    #[error("vhci-hcd refused port {port} ({errno}): {why}")]
    Refused {
        port: u32,
        errno: &'static str,
        why: &'static str,
    },
    #[error("writing {} failed: {source}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid port {port}: vhci-hcd has ports 0 to {}", .nports.saturating_sub(1))]
    InvalidPort { port: u32, nports: u32 },
    #[error("port {port} is not in use (already detached)")]
    PortNotInUse { port: u32 },
}

/// Writes one sysfs attribute. The attach loop goes through this so that
/// tests can play the kernel (EBUSY, EINVAL ...).
pub trait AttrWriter {
    fn write_attr(&mut self, path: &Path, value: &str) -> io::Result<()>;
}

/// The real thing: open write-only, one write(2), as the C tool does.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysfsWriter;

impl AttrWriter for SysfsWriter {
    fn write_attr(&mut self, path: &Path, value: &str) -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(path)?;
        let n = f.write(value.as_bytes())?;
        if n != value.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write ({n} of {} bytes)", value.len()),
            ));
        }
        Ok(())
    }
}

/// The errno a failed sysfs attribute write carries.
fn sysfs_errno(e: &io::Error) -> Option<NixErrno> {
    e.raw_os_error().map(NixErrno::from_raw)
}

/// Turns a failed attach/detach write into an error that says what it means.
fn write_error(path: &Path, port: u32, e: io::Error, detach: bool) -> VhciError {
    match sysfs_errno(&e) {
        Some(NixErrno::EACCES | NixErrno::EPERM) => VhciError::NeedsRoot {
            path: path.to_path_buf(),
        },
        Some(NixErrno::ENOENT) => VhciError::NotLoaded {
            dir: path.to_path_buf(),
        },
        Some(NixErrno::EINVAL) if detach => VhciError::PortNotInUse { port },
        Some(NixErrno::EINVAL) => VhciError::Refused {
            port,
            errno: "EINVAL",
            why: "invalid port or speed, or the socket is not a connected TCP stream",
        },
        Some(NixErrno::EAGAIN) => VhciError::Refused {
            port,
            errno: "EAGAIN",
            why: "the controller owning that port is not ready",
        },
        Some(NixErrno::EBUSY) => VhciError::Refused {
            port,
            errno: "EBUSY",
            why: "the port is busy",
        },
        _ => VhciError::Write {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

impl Vhci {
    /// Hands a connected socket (after a successful OP_REQ_IMPORT) to
    /// vhci-hcd on a free port of the right hub; returns the port.
    pub fn attach(&self, sockfd: RawFd, devid: u32, speed: Speed) -> Result<u32, VhciError> {
        self.attach_with(&mut SysfsWriter, sockfd, devid, speed)
    }

    /// [`Vhci::attach`] through a given writer.
    ///
    /// Race-free: the kernel answers EBUSY when another attacher took the
    /// port between our read of the status and our write. Then the status
    /// is read again and the next free port tried, that port excluded,
    /// until one takes, none is left, or [`MAX_ATTACH_ATTEMPTS`] is reached.
    /// Any other error ends the attach at once.
    pub fn attach_with(
        &self,
        writer: &mut dyn AttrWriter,
        sockfd: RawFd,
        devid: u32,
        speed: Speed,
    ) -> Result<u32, VhciError> {
        let hub = Hub::for_speed(speed).ok_or(VhciError::UnsupportedSpeed { speed })?;
        let attach = self.hc_dir()?.join("attach");
        let mut raced = BTreeSet::new();
        for attempt in 1..=MAX_ATTACH_ATTEMPTS {
            let ports = self.ports()?;
            let on_hub: Vec<&PortStatus> = ports.iter().filter(|p| p.hub == hub).collect();
            if on_hub.is_empty() {
                return Err(VhciError::NoPorts { hub });
            }
            let Some(port) = pick_free_port(&ports, hub, &raced) else {
                return Err(VhciError::NoFreePort {
                    hub,
                    in_use: on_hub.len(),
                });
            };
            let value = format!("{port} {sockfd} {devid} {}", speed.to_u32());
            tracing::debug!(attempt, path = %attach.display(), %value, "attaching");
            match writer.write_attr(&attach, &value) {
                Ok(()) => return Ok(port),
                Err(e) if sysfs_errno(&e) == Some(NixErrno::EBUSY) => {
                    tracing::debug!(port, "port taken by another attacher, trying another");
                    raced.insert(port);
                }
                Err(e) => return Err(write_error(&attach, port, e, false)),
            }
        }
        Err(VhciError::TooManyRaces {
            hub,
            attempts: MAX_ATTACH_ATTEMPTS,
        })
    }

    /// Detaches whatever is on `port` and removes its record.
    pub fn detach(&self, port: u32) -> Result<(), VhciError> {
        self.detach_with(&mut SysfsWriter, port)
    }

    pub fn detach_with(&self, writer: &mut dyn AttrWriter, port: u32) -> Result<(), VhciError> {
        let ports = self.ports()?;
        match ports.iter().find(|p| p.port == port) {
            None => {
                let nports = self
                    .nports()
                    .unwrap_or_else(|_| ports.iter().map(|p| p.port + 1).max().unwrap_or(0));
                return Err(VhciError::InvalidPort { port, nports });
            }
            Some(p) if p.is_free() => return Err(VhciError::PortNotInUse { port }),
            Some(_) => {}
        }
        let detach = self.hc_dir()?.join("detach");
        writer
            .write_attr(&detach, &port.to_string())
            .map_err(|e| write_error(&detach, port, e, true))?;
        self.remove_record(port);
        Ok(())
    }
}
