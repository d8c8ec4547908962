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

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno as NixErrno;
use usbwire_proto::{
    Decoded, DeviceInfo, Limits, OpReply, OpRequest, OpStatus, Speed, USBIP_VERSION,
};

use crate::error::ClientError;

/// Where the C tool keeps its port records, relative to the root.
pub const STATE_DIR: &str = "var/run/vhci_hcd";

/// How many times an attach is tried when other attachers keep taking the
/// port we picked. Each EBUSY also rules that port out, so a loop ends
/// anyway once every port of the right hub has been tried.
pub const MAX_ATTACH_ATTEMPTS: usize = 64;

/// The root hub a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hub {
    /// `hs`: takes low, full, high speed (and wireless) devices.
    High,
    /// `ss`: takes super speed and super speed plus devices.
    Super,
}

impl Hub {
    /// The hub a device of this speed goes on; `None` for speeds vhci-hcd refuses.
    pub fn for_speed(speed: Speed) -> Option<Hub> {
        match speed {
            Speed::Low | Speed::Full | Speed::High | Speed::Wireless => Some(Hub::High),
            Speed::Super | Speed::SuperPlus => Some(Hub::Super),
            Speed::Unknown | Speed::Other(_) => None,
        }
    }

    /// `hs` or `ss`, as in the status file.
    pub fn short(self) -> &'static str {
        match self {
            Hub::High => "hs",
            Hub::Super => "ss",
        }
    }
}

impl fmt::Display for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hub::High => "high-speed",
            Hub::Super => "super-speed",
        })
    }
}

/// `enum usbip_device_status` as vhci-hcd reports a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortState {
    /// VDEV_ST_NULL (4): free.
    Free,
    /// VDEV_ST_NOTASSIGNED (5): being attached.
    Initializing,
    /// VDEV_ST_USED (6).
    Used,
    /// VDEV_ST_ERROR (7).
    Error,
    Other(u32),
}

impl PortState {
    pub fn from_u32(v: u32) -> Self {
        match v {
            4 => PortState::Free,
            5 => PortState::Initializing,
            6 => PortState::Used,
            7 => PortState::Error,
            v => PortState::Other(v),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            PortState::Free => 4,
            PortState::Initializing => 5,
            PortState::Used => 6,
            PortState::Error => 7,
            PortState::Other(v) => v,
        }
    }

    /// The C tools' wording (`usbip_status_string`).
    pub fn describe(self) -> &'static str {
        match self.to_u32() {
            1 => "Device Available",
            2 => "Device in Use",
            3 => "Device Error",
            4 => "Port Available",
            5 => "Port Initializing",
            6 => "Port in Use",
            7 => "Port Error",
            _ => "Unknown Status",
        }
    }
}

/// One line of a vhci-hcd status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    pub hub: Hub,
    /// The global port number, the one `attach` and `detach` take.
    pub port: u32,
    pub state: PortState,
    /// The speed the device was attached with.
    pub speed: Speed,
    /// busnum << 16 | devnum on the remote host.
    pub devid: u32,
    /// The attacher's fd number at the time (informational).
    pub sockfd: u32,
    /// The local bus id of the attached device, `0-0` when none.
    pub local_busid: String,
}

impl PortStatus {
    pub fn is_free(&self) -> bool {
        self.state == PortState::Free
    }

    /// Remote bus number.
    pub fn busnum(&self) -> u32 {
        self.devid >> 16
    }

    /// Remote device number.
    pub fn devnum(&self) -> u32 {
        self.devid & 0xffff
    }
}

/// Parses one status file (header line first). Kernels before 4.13 had no
/// `hub` column and one hub; their lines are read as high-speed ports.
pub fn parse_status(text: &str) -> Result<Vec<PortStatus>, String> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (hub, rest) = match f.first().copied() {
            Some("hs") => (Hub::High, &f[1..]),
            Some("ss") => (Hub::Super, &f[1..]),
            Some(_) => (Hub::High, &f[..]),
            None => continue,
        };
        if rest.len() < 4 {
            return Err(line.to_string());
        }
        let dec = |s: &str| s.parse::<u32>().map_err(|_| line.to_string());
        out.push(PortStatus {
            hub,
            port: dec(rest[0])?,
            state: PortState::from_u32(dec(rest[1])?),
            speed: Speed::from_u32(dec(rest[2])?),
            devid: u32::from_str_radix(rest[3], 16).map_err(|_| line.to_string())?,
            // Pre-4.13 kernels printed a socket pointer here.
            sockfd: rest.get(4).and_then(|s| s.parse().ok()).unwrap_or(0),
            local_busid: rest.get(5).unwrap_or(&"0-0").to_string(),
        });
    }
    Ok(out)
}

/// The lowest-numbered free port on `hub`, skipping `skip`: the C tool's
/// choice, minus ports we already lost a race for.
pub fn pick_free_port(ports: &[PortStatus], hub: Hub, skip: &BTreeSet<u32>) -> Option<u32> {
    ports
        .iter()
        .filter(|p| p.hub == hub && p.is_free() && !skip.contains(&p.port))
        .map(|p| p.port)
        .min()
}

/// What a port record says: where the device on a port came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    pub host: String,
    /// The TCP port, as the user gave it.
    pub service: String,
    /// The bus id on the remote host.
    pub busid: String,
}

impl PortRecord {
    /// `"%s %s %s\n"`, as `record_connection` writes it.
    pub fn to_line(&self) -> String {
        format!("{} {} {}\n", self.host, self.service, self.busid)
    }

    /// Reads a record line with the C tool's checks (`read_record`): three
    /// fields separated by one space and ended by a newline, each within
    /// NI_MAXHOST, NI_MAXSERV and SYSFS_BUS_ID_SIZE.
    pub fn parse(text: &str) -> Option<PortRecord> {
        const MAX: [usize; 3] = [1025, 32, 32];
        let line = text.split_inclusive('\n').next()?;
        let mut parts = Vec::with_capacity(3);
        let mut rest = line;
        for (i, delim) in [' ', ' ', '\n'].into_iter().enumerate() {
            let end = rest.find(delim)?;
            if end > MAX[i] {
                return None;
            }
            parts.push(&rest[..end]);
            rest = &rest[end + 1..];
        }
        // sscanf("%s %s %s") then takes whitespace-separated words.
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 3 || parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(PortRecord {
            host: words[0].to_string(),
            service: words[1].to_string(),
            busid: words[2].to_string(),
        })
    }
}

/// A used port with what vhci-hcd and the port record say about it. What
/// `usbip port` shows also takes the local device vhci-hcd created
/// (`status.local_busid`), which `usbwire_host::sysfs` reads.
#[derive(Debug, Clone)]
pub struct ImportedDevice {
    pub status: PortStatus,
    /// The port record, or why it could not be read.
    pub record: Result<PortRecord, String>,
}

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

fn errno_of(e: &io::Error) -> Option<NixErrno> {
    e.raw_os_error().map(NixErrno::from_raw)
}

/// Turns a failed attach/detach write into an error that says what it means.
fn write_error(path: &Path, port: u32, e: io::Error, detach: bool) -> VhciError {
    match errno_of(&e) {
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
                Err(e) if errno_of(&e) == Some(NixErrno::EBUSY) => {
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

    /// `root/var/run/vhci_hcd`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    /// `root/var/run/vhci_hcd/port<N>`.
    pub fn record_path(&self, port: u32) -> PathBuf {
        self.state_dir().join(format!("port{port}"))
    }

    /// Writes a port record as `record_connection` does: directory mode
    /// 0700, file mode 0700, `"host service busid\n"`.
    pub fn write_record(&self, port: u32, record: &PortRecord) -> io::Result<()> {
        let dir = self.state_dir();
        if let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(self.record_path(port))?;
        f.write_all(record.to_line().as_bytes())
    }

    /// Reads a port record; the error says why not (as text, for display).
    pub fn read_record(&self, port: u32) -> Result<PortRecord, String> {
        let path = self.record_path(port);
        let mut text = String::new();
        fs::File::open(&path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        PortRecord::parse(&text).ok_or_else(|| format!("malformed record in {}", path.display()))
    }

    /// Removes a port record, and the directory if that was the last one,
    /// as `usbip detach` does. Errors are ignored, as there.
    pub fn remove_record(&self, port: u32) {
        let _ = fs::remove_file(self.record_path(port));
        let _ = fs::remove_dir(self.state_dir());
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

    /// `usbip attach`: connects to `host`, imports `busid`, hands the
    /// connection to vhci-hcd and records the port.
    pub fn attach_remote(
        &self,
        host: &str,
        tcp_port: u16,
        busid: &str,
    ) -> Result<Attached, AttachError> {
        self.attach_remote_with(&mut SysfsWriter, host, tcp_port, busid)
    }

    pub fn attach_remote_with(
        &self,
        writer: &mut dyn AttrWriter,
        host: &str,
        tcp_port: u16,
        busid: &str,
    ) -> Result<Attached, AttachError> {
        // Fail before importing: an import holds the device on the server.
        self.hc_dir()?;
        let name = host_port(host, tcp_port);
        let mut stream =
            TcpStream::connect((host, tcp_port)).map_err(|source| ClientError::Connect {
                addr: name.clone(),
                source,
            })?;
        // As usbip_net_tcp_connect does.
        let _ = stream.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::KeepAlive, &true);
        let device = import_blocking(&mut stream, &name, busid)?;
        if device.busid != busid {
            return Err(AttachError::WrongDevice {
                asked: busid.to_string(),
                got: device.busid.to_string(),
            });
        }
        let port = self.attach_with(writer, stream.as_raw_fd(), device.devid(), device.speed)?;
        // The kernel holds its own reference to the socket now.
        drop(stream);
        let record = PortRecord {
            host: host.to_string(),
            service: tcp_port.to_string(),
            busid: busid.to_string(),
        };
        self.write_record(port, &record)
            .map_err(|source| AttachError::Record {
                port,
                path: self.record_path(port),
                source,
            })?;
        Ok(Attached { port, device })
    }
}

/// A device attached to vhci-hcd.
#[derive(Debug, Clone)]
pub struct Attached {
    pub port: u32,
    /// The record the server sent with its import reply.
    pub device: DeviceInfo,
}

/// Why `usbip attach` failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Vhci(#[from] VhciError),
    #[error("{}", client_message(.0))]
    Client(#[from] ClientError),
    #[error("asked for device {asked} but the server sent {got}")]
    WrongDevice { asked: String, got: String },
    #[error("attached on port {port}, but cannot record the connection in {}: {source}", .path.display())]
    Record {
        port: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn client_message(e: &ClientError) -> String {
    match e {
        ClientError::Connect { addr, source }
            if source.kind() == io::ErrorKind::ConnectionRefused =>
        {
            format!("connection refused by {addr}")
        }
        e => e.to_string(),
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// OP_REQ_IMPORT on a blocking socket, reading exactly the reply and not
/// a byte more: what follows belongs to whoever takes the socket next.
pub fn import_blocking(
    stream: &mut TcpStream,
    name: &str,
    busid: &str,
) -> Result<DeviceInfo, ClientError> {
    let io_err = |source| ClientError::Io {
        addr: name.to_string(),
        source,
    };
    let mut out = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: busid.into(),
    }
    .encode(&mut out);
    stream.write_all(&out).map_err(io_err)?;
    // Bounded wait for the answer; cleared afterwards, as the kernel would
    // inherit SO_RCVTIMEO.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(512);
    let reply = loop {
        match OpReply::decode(&buf, &limits) {
            Ok(Decoded::Message(m, _)) => break m,
            Ok(Decoded::NeedMore(n)) => {
                let at = buf.len();
                buf.resize(n, 0);
                let mut filled = at;
                while filled < n {
                    match stream.read(&mut buf[filled..n]) {
                        Ok(0) => {
                            return Err(ClientError::Closed {
                                addr: name.to_string(),
                            })
                        }
                        Ok(k) => filled += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(io_err(e)),
                    }
                }
            }
            Err(source) => {
                return Err(ClientError::Protocol {
                    addr: name.to_string(),
                    source,
                })
            }
        }
    };
    stream.set_read_timeout(None).map_err(io_err)?;
    match reply {
        OpReply::Import {
            status: OpStatus::Ok,
            device: Some(info),
            ..
        } => Ok(info),
        OpReply::Import { status, .. } => Err(ClientError::ImportRefused {
            addr: name.to_string(),
            busid: busid.to_string(),
            status,
        }),
        OpReply::Devlist { .. } => Err(ClientError::Protocol {
            addr: name.to_string(),
            source: usbwire_proto::DecodeError::UnknownOpCode(usbwire_proto::OP_REP_DEVLIST),
        }),
    }
}

/// Builds fake vhci-hcd trees, laid out and worded like the kernel's.
#[doc(hidden)]
pub mod fake {
    use super::*;

    /// One port's state in a fake status file.
    #[derive(Debug, Clone)]
    pub struct Used<'a> {
        pub port: u32,
        pub speed: Speed,
        pub devid: u32,
        pub sockfd: u32,
        pub local_busid: &'a str,
        pub state: PortState,
    }

    /// `controllers` controllers of `hc_ports` ports per hub, ports in
    /// `used` taken. Writes `vhci_hcd.N` dirs and every attribute on
    /// `vhci_hcd.0` as the kernel does.
    pub fn vhci(root: &Path, controllers: u32, hc_ports: u32, used: &[Used<'_>]) -> PathBuf {
        let platform = root.join("sys/devices/platform");
        for c in 0..controllers {
            fs::create_dir_all(platform.join(format!("vhci_hcd.{c}"))).unwrap();
        }
        let hc = platform.join("vhci_hcd.0");
        fs::write(
            hc.join("nports"),
            format!("{}\n", controllers * hc_ports * 2),
        )
        .unwrap();
        fs::write(hc.join("attach"), "").unwrap();
        fs::write(hc.join("detach"), "").unwrap();
        set_status(root, controllers, hc_ports, used);
        hc
    }

    /// Rewrites the status files.
    pub fn set_status(root: &Path, controllers: u32, hc_ports: u32, used: &[Used<'_>]) {
        let hc = root.join("sys/devices/platform/vhci_hcd.0");
        for c in 0..controllers {
            let mut s = String::from("hub port sta spd dev      sockfd local_busid\n");
            for (hub, base) in [("hs", 0), ("ss", hc_ports)] {
                for i in 0..hc_ports {
                    let port = c * hc_ports * 2 + base + i;
                    match used.iter().find(|u| u.port == port) {
                        Some(u) if u.state == PortState::Used => s.push_str(&format!(
                            "{hub}  {port:04} {:03} {:03} {:08x} {:06} {}\n",
                            u.state.to_u32(),
                            u.speed.to_u32(),
                            u.devid,
                            u.sockfd,
                            u.local_busid
                        )),
                        Some(u) => s.push_str(&format!(
                            "{hub}  {port:04} {:03} 000 00000000 000000 0-0\n",
                            u.state.to_u32()
                        )),
                        None => {
                            s.push_str(&format!("{hub}  {port:04} 004 000 00000000 000000 0-0\n"))
                        }
                    }
                }
            }
            let name = if c == 0 {
                "status".to_string()
            } else {
                format!("status.{c}")
            };
            fs::write(hc.join(name), s).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use std::collections::VecDeque;

    fn used(port: u32, speed: Speed) -> Used<'static> {
        Used {
            port,
            speed,
            devid: 0x0001_0002,
            sockfd: 3,
            local_busid: "3-1",
            state: PortState::Used,
        }
    }

    /// Plays the kernel: answers each write with the next scripted result
    /// (Ok once the script runs out) and keeps what was written.
    struct Scripted {
        answers: VecDeque<Option<NixErrno>>,
        writes: Vec<(PathBuf, String)>,
    }

    impl Scripted {
        fn new(answers: &[Option<NixErrno>]) -> Self {
            Scripted {
                answers: answers.iter().copied().collect(),
                writes: Vec::new(),
            }
        }
    }

    impl AttrWriter for Scripted {
        fn write_attr(&mut self, path: &Path, value: &str) -> io::Result<()> {
            self.writes.push((path.to_path_buf(), value.to_string()));
            match self.answers.pop_front().flatten() {
                Some(e) => Err(io::Error::from_raw_os_error(e as i32)),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn parses_every_controller_with_hs_and_ss_ports() {
        let t = tempfile::tempdir().unwrap();
        vhci(
            t.path(),
            8,
            8,
            &[used(0, Speed::High), used(24, Speed::Super), {
                let mut u = used(113, Speed::Full);
                u.state = PortState::Initializing;
                u
            }],
        );
        let v = Vhci::new(t.path());
        assert_eq!(v.nports().unwrap(), 128);
        assert_eq!(v.controllers().len(), 8);
        assert_eq!(v.status_files().unwrap().len(), 8);
        let ports = v.ports().unwrap();
        assert_eq!(ports.len(), 128);
        assert!(ports.iter().enumerate().all(|(i, p)| p.port == i as u32));
        // Controller 1 owns 16..24 (hs) and 24..32 (ss).
        assert_eq!(ports[23].hub, Hub::High);
        assert_eq!(ports[24].hub, Hub::Super);
        assert_eq!(ports[24].state, PortState::Used);
        assert_eq!(ports[24].speed, Speed::Super);
        assert_eq!(ports[24].local_busid, "3-1");
        assert_eq!((ports[24].busnum(), ports[24].devnum()), (1, 2));
        assert_eq!(ports[0].sockfd, 3);
        assert_eq!(ports[113].state, PortState::Initializing);
        assert_eq!(ports[127].hub, Hub::Super);
        assert!(ports[127].is_free());
    }

    #[test]
    fn parses_kernel_lines_literally() {
        let text = "hub port sta spd dev      sockfd local_busid\n\
                    hs  0000 006 003 0001000a 000005 3-1\n\
                    hs  0001 004 000 00000000 000000 0-0\n\
                    ss  0002 004 000 00000000 0000000000000000 0-0\n";
        let p = parse_status(text).unwrap();
        assert_eq!(p[0].devid, 0x1000a);
        assert_eq!(p[0].devnum(), 10);
        assert_eq!(p[0].sockfd, 5);
        assert_eq!(p[0].state.describe(), "Port in Use");
        assert_eq!(p[2].hub, Hub::Super);
        // Old single-hub format.
        let old = "port sta spd dev      socket           local_busid\n\
                   0000 006 002 00020003 ffff8800c5a7bb80 1-2.3\n";
        let p = parse_status(old).unwrap();
        assert_eq!(
            (p[0].hub, p[0].port, p[0].speed),
            (Hub::High, 0, Speed::Full)
        );
        assert_eq!(p[0].local_busid, "1-2.3");
        assert!(parse_status("hdr\nhs 1 2\n").is_err());
    }

    #[test]
    fn free_port_by_speed() {
        let t = tempfile::tempdir().unwrap();
        let taken: Vec<Used> = (0..8)
            .map(|p| used(p, Speed::High))
            .chain([used(8, Speed::Super)])
            .collect();
        vhci(t.path(), 2, 8, &taken);
        let ports = Vhci::new(t.path()).ports().unwrap();
        let none = BTreeSet::new();
        // Controller 0's hs ports are full: the next hs port is on controller 1.
        assert_eq!(pick_free_port(&ports, Hub::High, &none), Some(16));
        assert_eq!(pick_free_port(&ports, Hub::Super, &none), Some(9));
        for (speed, hub) in [
            (Speed::Low, Hub::High),
            (Speed::Full, Hub::High),
            (Speed::High, Hub::High),
            (Speed::Wireless, Hub::High),
            (Speed::Super, Hub::Super),
            (Speed::SuperPlus, Hub::Super),
        ] {
            assert_eq!(Hub::for_speed(speed), Some(hub), "{speed:?}");
        }
        assert_eq!(Hub::for_speed(Speed::Unknown), None);
    }

    #[test]
    fn attach_writes_port_fd_devid_speed_to_vhci_hcd_0() {
        let t = tempfile::tempdir().unwrap();
        vhci(t.path(), 2, 8, &[used(16, Speed::Super)]);
        let v = Vhci::new(t.path());
        let mut w = Scripted::new(&[]);
        // Super speed plus goes on the ss hub: controller 0's ss ports are 8..16.
        assert_eq!(
            v.attach_with(&mut w, 7, 0x0002_0003, Speed::SuperPlus)
                .unwrap(),
            8
        );
        assert_eq!(
            w.writes,
            [(
                t.path().join("sys/devices/platform/vhci_hcd.0/attach"),
                "8 7 131075 6".to_string()
            )]
        );
        // The real writer, on the fake file.
        assert_eq!(v.attach(5, 0x0001_0002, Speed::High).unwrap(), 0);
        assert_eq!(
            fs::read_to_string(t.path().join("sys/devices/platform/vhci_hcd.0/attach")).unwrap(),
            "0 5 65538 3"
        );
    }

    #[test]
    fn ebusy_moves_on_to_another_port() {
        let t = tempfile::tempdir().unwrap();
        vhci(t.path(), 2, 8, &[used(1, Speed::High)]);
        let v = Vhci::new(t.path());
        let mut w = Scripted::new(&[
            Some(NixErrno::EBUSY),
            Some(NixErrno::EBUSY),
            Some(NixErrno::EBUSY),
        ]);
        let port = v.attach_with(&mut w, 9, 0x10002, Speed::High).unwrap();
        let tried: Vec<&str> = w.writes.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(
            tried,
            ["0 9 65538 3", "2 9 65538 3", "3 9 65538 3", "4 9 65538 3"]
        );
        assert_eq!(port, 4);
    }

    #[test]
    fn ebusy_after_a_real_race_rereads_the_status() {
        // The other attacher's port shows up as used in the re-read status.
        struct Racer<'a> {
            root: &'a Path,
            first: bool,
            writes: Vec<String>,
        }
        impl AttrWriter for Racer<'_> {
            fn write_attr(&mut self, _: &Path, value: &str) -> io::Result<()> {
                self.writes.push(value.to_string());
                if std::mem::take(&mut self.first) {
                    // Someone else took ports 0 and 2 meanwhile.
                    set_status(
                        self.root,
                        1,
                        4,
                        &[used(0, Speed::High), used(2, Speed::High)],
                    );
                    return Err(io::Error::from_raw_os_error(NixErrno::EBUSY as i32));
                }
                Ok(())
            }
        }
        let t = tempfile::tempdir().unwrap();
        vhci(t.path(), 1, 4, &[]);
        let mut w = Racer {
            root: t.path(),
            first: true,
            writes: vec![],
        };
        assert_eq!(
            Vhci::new(t.path())
                .attach_with(&mut w, 3, 1, Speed::Full)
                .unwrap(),
            1
        );
        assert_eq!(w.writes, ["0 3 1 2", "1 3 1 2"]);
    }

    #[test]
    fn einval_and_eacces_fail_at_once() {
        let t = tempfile::tempdir().unwrap();
        vhci(t.path(), 1, 8, &[]);
        let v = Vhci::new(t.path());
        let mut w = Scripted::new(&[Some(NixErrno::EINVAL)]);
        let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
        assert_eq!(w.writes.len(), 1, "EINVAL is not busy: no retry");
        assert!(
            matches!(
                e,
                VhciError::Refused {
                    errno: "EINVAL",
                    port: 0,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("not a connected TCP stream"), "{e}");
        let mut w = Scripted::new(&[Some(NixErrno::EACCES)]);
        let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
        assert_eq!(w.writes.len(), 1);
        assert!(
            e.to_string().ends_with("vhci_hcd.0/attach needs root"),
            "{e}"
        );
        let e = v
            .attach_with(&mut Scripted::new(&[]), 3, 1, Speed::Unknown)
            .unwrap_err();
        assert!(matches!(e, VhciError::UnsupportedSpeed { .. }), "{e:?}");
    }

    #[test]
    fn no_free_port_says_which_hub_and_how_many() {
        let t = tempfile::tempdir().unwrap();
        let all_hs: Vec<Used> = (0..8).map(|p| used(p, Speed::High)).collect();
        vhci(t.path(), 1, 8, &all_hs);
        let v = Vhci::new(t.path());
        let mut w = Scripted::new(&[]);
        let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
        assert_eq!(e.to_string(), "no free high-speed port (8 in use)");
        assert!(w.writes.is_empty());
        // Ss ports are still free for a super-speed device.
        assert_eq!(v.attach_with(&mut w, 3, 1, Speed::Super).unwrap(), 8);
        // Every remaining ss port raced away.
        let busy = [Some(NixErrno::EBUSY); 8];
        let mut w = Scripted::new(&busy);
        let e = v.attach_with(&mut w, 3, 1, Speed::Super).unwrap_err();
        assert_eq!(e.to_string(), "no free super-speed port (8 in use)");
        assert_eq!(w.writes.len(), 8);
    }

    #[test]
    fn not_loaded() {
        let t = tempfile::tempdir().unwrap();
        let v = Vhci::new(t.path());
        let e = v.ports().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("vhci-hcd not loaded: run modprobe vhci-hcd"),
            "{e}"
        );
        let e = v.attach_remote("127.0.0.1", 1, "1-1").unwrap_err();
        assert!(e.to_string().starts_with("vhci-hcd not loaded"), "{e}");
    }

    #[test]
    fn port_records_round_trip_like_the_c_tool() {
        let t = tempfile::tempdir().unwrap();
        let v = Vhci::new(t.path());
        let r = PortRecord {
            host: "server.example".into(),
            service: "3240".into(),
            busid: "1-1.2".into(),
        };
        v.write_record(3, &r).unwrap();
        let path = t.path().join("var/run/vhci_hcd/port3");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "server.example 3240 1-1.2\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(v.state_dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(v.read_record(3).unwrap(), r);
        // Overwritten, not appended.
        v.write_record(
            3,
            &PortRecord {
                host: "h".into(),
                ..r.clone()
            },
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "h 3240 1-1.2\n");
        assert!(v.read_record(4).is_err());
        assert_eq!(PortRecord::parse("h 3240 1-1"), None, "no newline");
        assert_eq!(
            PortRecord::parse(&format!("h 3240 {}\n", "1".repeat(40))),
            None
        );
        v.remove_record(3);
        assert!(!path.exists());
        assert!(
            !v.state_dir().exists(),
            "last record gone: directory removed"
        );
    }

    #[test]
    fn detach_checks_the_port_then_writes_it() {
        let t = tempfile::tempdir().unwrap();
        vhci(t.path(), 2, 8, &[used(17, Speed::High)]);
        let v = Vhci::new(t.path());
        v.write_record(
            17,
            &PortRecord {
                host: "h".into(),
                service: "3240".into(),
                busid: "1-1".into(),
            },
        )
        .unwrap();
        let mut w = Scripted::new(&[]);
        assert_eq!(
            v.detach_with(&mut w, 3).unwrap_err().to_string(),
            "port 3 is not in use (already detached)"
        );
        assert_eq!(
            v.detach_with(&mut w, 32).unwrap_err().to_string(),
            "invalid port 32: vhci-hcd has ports 0 to 31"
        );
        assert!(w.writes.is_empty());
        v.detach_with(&mut w, 17).unwrap();
        assert_eq!(
            w.writes,
            [(
                t.path().join("sys/devices/platform/vhci_hcd.0/detach"),
                "17".to_string()
            )]
        );
        assert!(!v.record_path(17).exists());
        // The kernel says EINVAL when it was detached meanwhile.
        let mut w = Scripted::new(&[Some(NixErrno::EINVAL)]);
        v.write_record(
            17,
            &PortRecord {
                host: "h".into(),
                service: "3240".into(),
                busid: "1-1".into(),
            },
        )
        .unwrap();
        assert!(matches!(
            v.detach_with(&mut w, 17),
            Err(VhciError::PortNotInUse { port: 17 })
        ));
    }

    #[test]
    fn imported_devices_join_status_and_records() {
        let t = tempfile::tempdir().unwrap();
        vhci(
            t.path(),
            1,
            8,
            &[
                used(0, Speed::High),
                Used {
                    port: 9,
                    local_busid: "4-1",
                    speed: Speed::Super,
                    devid: 0x0002_0005,
                    ..used(9, Speed::Super)
                },
                Used {
                    state: PortState::Initializing,
                    ..used(2, Speed::High)
                },
            ],
        );
        let v = Vhci::new(t.path());
        v.write_record(
            0,
            &PortRecord {
                host: "10.0.0.1".into(),
                service: "3240".into(),
                busid: "1-1".into(),
            },
        )
        .unwrap();
        let got = v.imported().unwrap();
        assert_eq!(got.len(), 2, "initializing port left out");
        assert_eq!(got[0].status.port, 0);
        assert_eq!(got[0].status.local_busid, "3-1");
        assert_eq!(got[0].record.as_ref().unwrap().host, "10.0.0.1");
        assert_eq!(got[1].status.port, 9);
        assert_eq!(got[1].status.local_busid, "4-1");
        assert!(got[1].record.is_err());
        assert_eq!((got[1].status.busnum(), got[1].status.devnum()), (2, 5));
    }
}
