//! vhci-hcd's status files: which port is on which hub, and what is on it.

use std::collections::BTreeSet;
use std::fmt;

use usbwire_proto::Speed;

use super::record::PortRecord;

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

/// A used port with what vhci-hcd and the port record say about it. What
/// `usbip port` shows also takes the local device vhci-hcd created
/// (`status.local_busid`), which `usbwire_host::sysfs` reads.
#[derive(Debug, Clone)]
pub struct ImportedDevice {
    pub status: PortStatus,
    /// The port record, or why it could not be read.
    pub record: Result<PortRecord, String>,
}
