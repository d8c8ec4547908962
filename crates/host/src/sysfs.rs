//! What sysfs says about a local USB device, and its raw descriptors.
//!
//! Every path is under a root (`/` on a real system) so that tests can use
//! a fake tree.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use usbwire_proto::{DeviceInfo, InterfaceInfo, Speed};
use usbwire_usb::TransferType;

/// Where the system's trees are.
#[derive(Debug, Clone)]
pub struct Roots {
    /// `/sys`.
    pub sys: PathBuf,
    /// `/proc`.
    pub proc: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            sys: "/sys".into(),
            proc: "/proc".into(),
            dev: "/dev".into(),
        }
    }
}

impl Roots {
    /// A fake tree with `sys`, `proc` and `dev` under `root`.
    pub fn under(root: &Path) -> Roots {
        Roots {
            sys: root.join("sys"),
            proc: root.join("proc"),
            dev: root.join("dev"),
        }
    }

    pub fn usb_device(&self, busid: &str) -> PathBuf {
        self.sys.join("bus/usb/devices").join(busid)
    }
}

fn read_attr(dir: &Path, name: &str) -> io::Result<String> {
    Ok(fs::read_to_string(dir.join(name))?.trim().to_string())
}

fn dec(dir: &Path, name: &str) -> io::Result<u32> {
    let s = read_attr(dir, name)?;
    s.parse().map_err(|_| bad(dir, name, &s))
}

fn hex(dir: &Path, name: &str) -> io::Result<u32> {
    let s = read_attr(dir, name)?;
    u32::from_str_radix(&s, 16).map_err(|_| bad(dir, name, &s))
}

fn bad(dir: &Path, name: &str, v: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected value {v:?} in {}", dir.join(name).display()),
    )
}

/// One interface of the active configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysInterface {
    pub number: u8,
    pub alt: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub driver: Option<String>,
}

/// A USB device as sysfs shows it.
#[derive(Debug, Clone)]
pub struct SysDevice {
    pub busid: String,
    /// The canonical sysfs directory.
    pub path: PathBuf,
    pub busnum: u32,
    pub devnum: u32,
    pub speed: Speed,
    pub vendor: u16,
    pub product: u16,
    pub bcd_device: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub config_value: u8,
    pub num_configs: u8,
    pub serial: Option<String>,
    pub interfaces: Vec<SysInterface>,
}

impl SysDevice {
    pub fn read(roots: &Roots, busid: &str) -> io::Result<SysDevice> {
        let link = roots.usb_device(busid);
        let dir = fs::canonicalize(&link)?;
        let config_value = read_attr(&dir, "bConfigurationValue")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut interfaces = Vec::new();
        let prefix = format!("{busid}:{config_value}.");
        if let Ok(rd) = fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(n) = name.strip_prefix(&prefix) else {
                    continue;
                };
                let Ok(number) = n.parse::<u8>() else {
                    continue;
                };
                let idir = e.path();
                interfaces.push(SysInterface {
                    number,
                    alt: dec(&idir, "bAlternateSetting").unwrap_or(0) as u8,
                    class: hex(&idir, "bInterfaceClass")? as u8,
                    subclass: hex(&idir, "bInterfaceSubClass")? as u8,
                    protocol: hex(&idir, "bInterfaceProtocol")? as u8,
                    driver: driver_of(&idir),
                });
            }
        }
        interfaces.sort_by_key(|i| i.number);
        Ok(SysDevice {
            busid: busid.to_string(),
            busnum: dec(&dir, "busnum")?,
            devnum: dec(&dir, "devnum")?,
            speed: Speed::from_sysfs(&read_attr(&dir, "speed").unwrap_or_default()),
            vendor: hex(&dir, "idVendor")? as u16,
            product: hex(&dir, "idProduct")? as u16,
            bcd_device: hex(&dir, "bcdDevice").unwrap_or(0) as u16,
            class: hex(&dir, "bDeviceClass")? as u8,
            subclass: hex(&dir, "bDeviceSubClass").unwrap_or(0) as u8,
            protocol: hex(&dir, "bDeviceProtocol").unwrap_or(0) as u8,
            config_value,
            num_configs: dec(&dir, "bNumConfigurations").unwrap_or(1) as u8,
            serial: read_attr(&dir, "serial").ok(),
            interfaces,
            path: dir,
        })
    }

    /// A hub, or a root hub (`usbN`), is never exported.
    pub fn is_hub(&self) -> bool {
        self.class == 0x09
            || self.busid.starts_with("usb")
            || self.interfaces.iter().any(|i| i.class == 0x09)
    }

    /// The usbfs node, `/dev/bus/usb/BBB/DDD`.
    pub fn devnode(&self, roots: &Roots) -> PathBuf {
        roots
            .dev
            .join(format!("bus/usb/{:03}/{:03}", self.busnum, self.devnum))
    }

    /// The sysfs name of interface `n`, `BUSID:C.N`.
    pub fn interface_name(&self, n: u8) -> String {
        format!("{}:{}.{}", self.busid, self.config_value, n)
    }

    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            path: self.path.to_string_lossy().as_ref().into(),
            busid: self.busid.as_str().into(),
            busnum: self.busnum,
            devnum: self.devnum,
            speed: self.speed,
            id_vendor: self.vendor,
            id_product: self.product,
            bcd_device: self.bcd_device,
            device_class: self.class,
            device_subclass: self.subclass,
            device_protocol: self.protocol,
            configuration_value: self.config_value,
            num_configurations: self.num_configs,
            num_interfaces: self.interfaces.len() as u8,
            interfaces: self
                .interfaces
                .iter()
                .map(|i| InterfaceInfo {
                    class: i.class,
                    subclass: i.subclass,
                    protocol: i.protocol,
                })
                .collect(),
        }
    }

    /// The raw descriptors (device descriptor, then every configuration).
    pub fn descriptors(&self) -> io::Result<Vec<u8>> {
        fs::read(self.path.join("descriptors"))
    }
}

/// The driver bound to a sysfs device directory.
pub fn driver_of(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The endpoints of every configuration, interface and alternate setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptors {
    /// (config value, interface, alt) → endpoints (address, type).
    pub alts: BTreeMap<(u8, u8, u8), Vec<(u8, TransferType)>>,
}

impl Descriptors {
    pub fn parse(raw: &[u8]) -> Descriptors {
        let mut d = Descriptors::default();
        let mut at = 0;
        let (mut config, mut iface, mut alt) = (0u8, 0u8, 0u8);
        while at + 2 <= raw.len() {
            let len = raw[at] as usize;
            if len < 2 || at + len > raw.len() {
                break;
            }
            let b = &raw[at..at + len];
            match b[1] {
                2 if len >= 9 => {
                    config = b[5];
                }
                4 if len >= 9 => {
                    iface = b[2];
                    alt = b[3];
                    d.alts.entry((config, iface, alt)).or_default();
                }
                5 if len >= 7 => {
                    d.alts
                        .entry((config, iface, alt))
                        .or_default()
                        .push((b[2], TransferType::from_attributes(b[3])));
                }
                _ => {}
            }
            at += len;
        }
        d
    }

    /// The type of `ep` in configuration `config` with the interfaces at
    /// alternate settings `alts` (interface → alt; missing means 0).
    pub fn endpoint_type(
        &self,
        config: u8,
        alts: &BTreeMap<u8, u8>,
        ep: u8,
    ) -> Option<TransferType> {
        self.alts
            .iter()
            .filter(|((c, i, a), _)| *c == config && alts.get(i).copied().unwrap_or(0) == *a)
            .flat_map(|(_, eps)| eps.iter())
            .find(|(addr, _)| *addr == ep)
            .map(|(_, t)| *t)
    }

    /// Interface numbers of configuration `config`.
    pub fn interfaces(&self, config: u8) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .alts
            .keys()
            .filter(|(c, _, _)| *c == config)
            .map(|(_, i, _)| *i)
            .collect();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints_per_alt_setting() {
        let mut raw = vec![18, 1];
        raw.extend_from_slice(&[0; 16]);
        // config 1, two interfaces
        raw.extend_from_slice(&[9, 2, 0, 0, 2, 1, 0, 0x80, 50]);
        raw.extend_from_slice(&[9, 4, 0, 0, 2, 8, 6, 80, 0]);
        raw.extend_from_slice(&[7, 5, 0x81, 2, 0, 2, 0]);
        raw.extend_from_slice(&[7, 5, 0x02, 2, 0, 2, 0]);
        raw.extend_from_slice(&[9, 4, 1, 0, 0, 1, 2, 0, 0]);
        raw.extend_from_slice(&[9, 4, 1, 1, 1, 1, 2, 0, 0]);
        raw.extend_from_slice(&[7, 5, 0x83, 1, 0, 2, 1]);
        let d = Descriptors::parse(&raw);
        let mut alts = BTreeMap::new();
        assert_eq!(d.endpoint_type(1, &alts, 0x81), Some(TransferType::Bulk));
        assert_eq!(d.endpoint_type(1, &alts, 0x02), Some(TransferType::Bulk));
        assert_eq!(d.endpoint_type(1, &alts, 0x83), None);
        alts.insert(1, 1);
        assert_eq!(
            d.endpoint_type(1, &alts, 0x83),
            Some(TransferType::Isochronous)
        );
        assert_eq!(d.interfaces(1), vec![0, 1]);
    }
}
