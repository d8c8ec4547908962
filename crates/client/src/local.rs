//! Local USB devices, read from sysfs (`/sys/bus/usb/devices`) the way the
//! C tools read them through libudev.
//!
//! Everything takes a root directory ([`Sysfs::new`]), `/` on a real
//! system, so that tests can build a fake tree in a temporary directory.

use std::cmp::Ordering;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use usbwire_proto::{DeviceInfo, InterfaceInfo, Speed};

/// Why local devices could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("no USB device with bus id {busid} (nothing at {})", .path.display())]
    NotFound { busid: String, path: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("problem getting device attributes: {busid} has no {attr}")]
    MissingAttr { busid: String, attr: &'static str },
    #[error("unexpected value {value:?} in {}", .path.display())]
    BadValue { path: PathBuf, value: String },
}

/// A sysfs tree: `root/sys/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new("/")
    }
}

/// One interface of a local device (`1-1:1.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalInterface {
    /// The interface's sysfs name, `<busid>:<config>.<number>`.
    pub name: String,
    pub number: u8,
    pub alternate_setting: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    /// The driver bound to the interface (`usb-storage`), if any.
    pub driver: Option<String>,
}

/// A USB device (not an interface) as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDevice {
    /// The sysfs name, e.g. `1-1.2`.
    pub busid: String,
    /// The kernel's device path, `/devices/pci0000:00/.../usb1/1-1`,
    /// whatever the root of the tree it was read from.
    pub devpath: String,
    /// Where it was read.
    pub syspath: PathBuf,
    pub busnum: u32,
    pub devnum: u32,
    pub speed: Speed,
    pub id_vendor: u16,
    pub id_product: u16,
    pub bcd_device: u16,
    pub device_class: u8,
    pub device_subclass: u8,
    pub device_protocol: u8,
    /// Empty in sysfs while the device is unconfigured.
    pub configuration_value: Option<u8>,
    pub num_configurations: u8,
    /// Empty in sysfs while the device is unconfigured.
    pub num_interfaces: Option<u8>,
    /// The driver bound to the device itself (`usb`, or `usbip-host` once bound).
    pub driver: Option<String>,
    /// Interfaces of the active configuration, in (config, number) order.
    pub interfaces: Vec<LocalInterface>,
}

/// Why a device cannot be exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotExportable {
    /// Hubs are never exported (the C `usbip bind` refuses them too).
    #[error("it is a hub")]
    Hub,
    /// The device is itself imported through vhci-hcd.
    #[error("it is attached through vhci_hcd (imported from another host)")]
    Imported,
}

/// Where a local device stands for export, as `usbip list -l --mark` and
/// `--json` report it ([`LocalDevice::export_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportStatus {
    /// `usbip bind` would export it.
    Exportable,
    /// Already bound in our usbipd (exported, in use by a client, or
    /// waiting for the device to come back).
    Exported,
    /// Bound to the kernel's `usbip-host` driver: exported by the kernel's
    /// usbipd, not ours.
    KernelExported,
    /// Never exportable: a hub, or a device imported through vhci_hcd.
    Not(NotExportable),
}

impl ExportStatus {
    /// `usbip bind` would accept it.
    pub fn is_exportable(self) -> bool {
        self == ExportStatus::Exportable
    }

    /// Bound in our usbipd.
    pub fn is_exported(self) -> bool {
        self == ExportStatus::Exported
    }

    /// One word for scripts: `exportable`, `exported`, `usbip-host`, `hub`
    /// or `imported`.
    pub fn keyword(self) -> &'static str {
        match self {
            ExportStatus::Exportable => "exportable",
            ExportStatus::Exported => "exported",
            ExportStatus::KernelExported => "usbip-host",
            ExportStatus::Not(NotExportable::Hub) => "hub",
            ExportStatus::Not(NotExportable::Imported) => "imported",
        }
    }

    /// Why `usbip bind` would not export it now, as [`Self::keyword`]; `None`
    /// when it would.
    pub fn reason(self) -> Option<&'static str> {
        (!self.is_exportable()).then(|| self.keyword())
    }

    /// For people: `exportable`, `exported by usbipd`, `hub: not exportable`...
    pub fn describe(self) -> &'static str {
        match self {
            ExportStatus::Exportable => "exportable",
            ExportStatus::Exported => "exported by usbipd",
            ExportStatus::KernelExported => "bound to usbip-host: exported by the kernel",
            ExportStatus::Not(NotExportable::Hub) => "hub: not exportable",
            ExportStatus::Not(NotExportable::Imported) => {
                "imported through vhci_hcd: not exportable"
            }
        }
    }
}

impl LocalDevice {
    /// Where this device stands for export; `bound_in_usbipd` says whether
    /// our usbipd holds a binding for its bus id (ask its control socket).
    /// Hubs and imported devices are never exportable, whatever usbipd says.
    pub fn export_status(&self, bound_in_usbipd: bool) -> ExportStatus {
        if let Some(why) = self.not_exportable() {
            ExportStatus::Not(why)
        } else if bound_in_usbipd {
            ExportStatus::Exported
        } else if self.driver.as_deref() == Some("usbip-host") {
            ExportStatus::KernelExported
        } else {
            ExportStatus::Exportable
        }
    }

    /// `/sys/devices/...`, as the C tools put it in a device record.
    pub fn sysfs_path(&self) -> String {
        format!("/sys{}", self.devpath)
    }

    /// bDeviceClass 09.
    pub fn is_hub(&self) -> bool {
        self.device_class == 0x09
    }

    /// The device hangs below a vhci_hcd controller (the C tool tests the
    /// devpath for `vhci_hcd`).
    pub fn is_imported(&self) -> bool {
        self.devpath.contains("vhci_hcd")
    }

    /// Why this device may not be exported, if it may not.
    pub fn not_exportable(&self) -> Option<NotExportable> {
        if self.is_hub() {
            Some(NotExportable::Hub)
        } else if self.is_imported() {
            Some(NotExportable::Imported)
        } else {
            None
        }
    }

    pub fn is_exportable(&self) -> bool {
        self.not_exportable().is_none()
    }

    /// The device record a server would send for it.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            path: self.sysfs_path().into(),
            busid: self.busid.as_str().into(),
            busnum: self.busnum,
            devnum: self.devnum,
            speed: self.speed,
            id_vendor: self.id_vendor,
            id_product: self.id_product,
            bcd_device: self.bcd_device,
            device_class: self.device_class,
            device_subclass: self.device_subclass,
            device_protocol: self.device_protocol,
            configuration_value: self.configuration_value.unwrap_or(0),
            num_configurations: self.num_configurations,
            num_interfaces: self.num_interfaces.unwrap_or(0),
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
}

/// A sysfs attribute as libudev returns it: trailing newlines dropped.
fn attr(dir: &Path, name: &str) -> Result<Option<String>, LocalError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(b) => Ok(Some(
            String::from_utf8_lossy(&b)
                .trim_end_matches('\n')
                .to_string(),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LocalError::Read { path, source }),
    }
}

fn hex_attr(dir: &Path, name: &str) -> Result<Option<u32>, LocalError> {
    match attr(dir, name)? {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => u32::from_str_radix(v.trim(), 16)
            .map(Some)
            .map_err(|_| LocalError::BadValue {
                path: dir.join(name),
                value: v,
            }),
    }
}

fn dec_attr(dir: &Path, name: &str) -> Result<Option<u32>, LocalError> {
    match attr(dir, name)? {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| LocalError::BadValue {
                path: dir.join(name),
                value: v,
            }),
    }
}

/// The name of whatever the `driver` symlink in `dir` points at.
fn driver(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Sorts like libudev's enumerator: by devpath, one path component at a
/// time (so `1-1/1-1.2` comes before `1-1.3`).
fn devpath_cmp(a: &str, b: &str) -> Ordering {
    Path::new(a).cmp(Path::new(b))
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/sys/bus/usb/devices`.
    pub fn usb_devices_dir(&self) -> PathBuf {
        self.root.join("sys/bus/usb/devices")
    }

    /// The devpath (`/devices/...`) of a syspath under this root.
    fn devpath(&self, syspath: &Path) -> String {
        let sys = fs::canonicalize(self.root.join("sys")).unwrap_or_else(|_| self.root.join("sys"));
        match syspath.strip_prefix(&sys) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => syspath.display().to_string(),
        }
    }

    /// Every USB device (interfaces excluded), hubs included, in libudev's order.
    /// No USB subsystem at all is an empty list, as it is for the C tool.
    pub fn devices(&self) -> Result<Vec<LocalDevice>, LocalError> {
        let dir = self.usb_devices_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LocalError::Read { path: dir, source }),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| LocalError::Read {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.join("bInterfaceNumber").exists() {
                continue;
            }
            out.push(self.read_device(&name, &path)?);
        }
        out.sort_by(|a, b| devpath_cmp(&a.devpath, &b.devpath));
        Ok(out)
    }

    /// The devices `usbip list -l` shows: not hubs, not imported through vhci_hcd.
    pub fn listed_devices(&self) -> Result<Vec<LocalDevice>, LocalError> {
        Ok(self
            .devices()?
            .into_iter()
            .filter(|d| !d.is_hub() && !d.is_imported())
            .collect())
    }

    /// One device by bus id.
    pub fn device(&self, busid: &str) -> Result<LocalDevice, LocalError> {
        let path = self.usb_devices_dir().join(busid);
        if busid.is_empty() || busid.contains('/') || !path.exists() {
            return Err(LocalError::NotFound {
                busid: busid.to_string(),
                path,
            });
        }
        self.read_device(busid, &path)
    }

    fn read_device(&self, busid: &str, path: &Path) -> Result<LocalDevice, LocalError> {
        let syspath = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let dir = syspath.as_path();
        let need = |name: &'static str| -> Result<u32, LocalError> {
            hex_attr(dir, name)?.ok_or(LocalError::MissingAttr {
                busid: busid.to_string(),
                attr: name,
            })
        };
        let id_vendor = need("idVendor")? as u16;
        let id_product = need("idProduct")? as u16;
        let hex8 = |name: &str| -> Result<Option<u8>, LocalError> {
            Ok(hex_attr(dir, name)?.map(|v| v as u8))
        };
        let busnum = match dec_attr(dir, "busnum")? {
            Some(n) => n,
            // What the C tool does: sscanf(busid, "%u-%u").
            None => busid
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        };
        let mut interfaces = Vec::new();
        if let Ok(children) = fs::read_dir(dir) {
            let prefix = format!("{busid}:");
            for c in children.flatten() {
                let name = c.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&prefix) {
                    continue;
                }
                let idir = c.path();
                let Some(number) = hex_attr(&idir, "bInterfaceNumber")? else {
                    continue;
                };
                interfaces.push(LocalInterface {
                    number: number as u8,
                    alternate_setting: dec_attr(&idir, "bAlternateSetting")?.unwrap_or(0) as u8,
                    class: hex_attr(&idir, "bInterfaceClass")?.unwrap_or(0) as u8,
                    subclass: hex_attr(&idir, "bInterfaceSubClass")?.unwrap_or(0) as u8,
                    protocol: hex_attr(&idir, "bInterfaceProtocol")?.unwrap_or(0) as u8,
                    driver: driver(&idir),
                    name,
                });
            }
        }
        let config_of = |name: &str| -> u32 {
            name.rsplit_once(':')
                .and_then(|(_, r)| r.split('.').next())
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        };
        interfaces.sort_by_key(|i| (config_of(&i.name), i.number));
        Ok(LocalDevice {
            busid: busid.to_string(),
            devpath: self.devpath(dir),
            syspath: dir.to_path_buf(),
            busnum,
            devnum: dec_attr(dir, "devnum")?.unwrap_or(0),
            speed: attr(dir, "speed")?
                .map(|s| Speed::from_sysfs(&s))
                .unwrap_or(Speed::Unknown),
            id_vendor,
            id_product,
            bcd_device: hex_attr(dir, "bcdDevice")?.unwrap_or(0) as u16,
            device_class: hex8("bDeviceClass")?.unwrap_or(0),
            device_subclass: hex8("bDeviceSubClass")?.unwrap_or(0),
            device_protocol: hex8("bDeviceProtocol")?.unwrap_or(0),
            configuration_value: hex8("bConfigurationValue")?,
            num_configurations: hex8("bNumConfigurations")?.unwrap_or(0),
            num_interfaces: hex8("bNumInterfaces")?,
            driver: driver(dir),
            interfaces,
        })
    }
}

/// Builds fake sysfs trees laid out like the kernel's: device directories
/// under `sys/devices/...`, symlinks to them from `sys/bus/usb/devices`,
/// `driver` symlinks into `sys/bus/usb/drivers`. For tests, here and in
/// other crates.
#[doc(hidden)]
pub mod fake {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    /// A device to create.
    #[derive(Debug, Clone)]
    pub struct FakeDevice<'a> {
        /// The devpath without `/devices/`, e.g. `pci0000:00/0000:00:14.0/usb1/1-1`.
        pub devpath: &'a str,
        pub id_vendor: u16,
        pub id_product: u16,
        pub class: u8,
        pub speed: &'a str,
        pub busnum: u32,
        pub devnum: u32,
        pub config: Option<u8>,
        pub driver: Option<&'a str>,
    }

    impl Default for FakeDevice<'_> {
        fn default() -> Self {
            FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-1",
                id_vendor: 0x1234,
                id_product: 0x5678,
                class: 0,
                speed: "480",
                busnum: 1,
                devnum: 2,
                config: Some(1),
                driver: Some("usb"),
            }
        }
    }

    fn write(dir: &Path, name: &str, value: &str) {
        fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }

    fn link_driver(root: &Path, dir: &Path, driver: &str) {
        let drivers = root.join("sys/bus/usb/drivers").join(driver);
        fs::create_dir_all(&drivers).unwrap();
        symlink(&drivers, dir.join("driver")).unwrap();
    }

    /// Adds a device; returns its directory.
    pub fn device(root: &Path, d: &FakeDevice<'_>) -> PathBuf {
        let dir = root.join("sys/devices").join(d.devpath);
        fs::create_dir_all(&dir).unwrap();
        write(&dir, "idVendor", &format!("{:04x}", d.id_vendor));
        write(&dir, "idProduct", &format!("{:04x}", d.id_product));
        write(&dir, "bcdDevice", "0100");
        write(&dir, "bDeviceClass", &format!("{:02x}", d.class));
        write(&dir, "bDeviceSubClass", "00");
        write(&dir, "bDeviceProtocol", "00");
        write(&dir, "bNumConfigurations", "1");
        match d.config {
            Some(c) => {
                write(&dir, "bConfigurationValue", &c.to_string());
                write(&dir, "bNumInterfaces", " 0");
            }
            None => {
                write(&dir, "bConfigurationValue", "");
                write(&dir, "bNumInterfaces", "");
            }
        }
        write(&dir, "speed", d.speed);
        write(&dir, "busnum", &d.busnum.to_string());
        write(&dir, "devnum", &d.devnum.to_string());
        if let Some(drv) = d.driver {
            link_driver(root, &dir, drv);
        }
        let name = dir.file_name().unwrap().to_owned();
        let bus = root.join("sys/bus/usb/devices");
        fs::create_dir_all(&bus).unwrap();
        symlink(&dir, bus.join(name)).unwrap();
        dir
    }

    /// Adds interface `number` of configuration `config` to the device at `dev`.
    pub fn interface(
        root: &Path,
        dev: &Path,
        config: u8,
        number: u8,
        triple: (u8, u8, u8),
        driver: Option<&str>,
    ) -> PathBuf {
        let busid = dev.file_name().unwrap().to_string_lossy().into_owned();
        let name = format!("{busid}:{config}.{number}");
        let dir = dev.join(&name);
        fs::create_dir_all(&dir).unwrap();
        write(&dir, "bInterfaceNumber", &format!("{number:02x}"));
        write(&dir, "bAlternateSetting", " 0");
        write(&dir, "bInterfaceClass", &format!("{:02x}", triple.0));
        write(&dir, "bInterfaceSubClass", &format!("{:02x}", triple.1));
        write(&dir, "bInterfaceProtocol", &format!("{:02x}", triple.2));
        if let Some(drv) = driver {
            link_driver(root, &dir, drv);
        }
        let n = fs::read_dir(dev)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{busid}:"))
            })
            .count();
        write(dev, "bNumInterfaces", &format!("{n:2}"));
        symlink(&dir, root.join("sys/bus/usb/devices").join(&name)).unwrap();
        dir
    }

    /// A root hub (`usbN`, class 09) with its hub interface.
    pub fn root_hub(root: &Path, devpath: &str, busnum: u32) -> PathBuf {
        let dev = device(
            root,
            &FakeDevice {
                devpath,
                id_vendor: 0x1d6b,
                id_product: 0x0002,
                class: 9,
                busnum,
                devnum: 1,
                ..Default::default()
            },
        );
        interface(root, &dev, 1, 0, (9, 0, 0), Some("hub"));
        dev
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        root_hub(root, "pci0000:00/0000:00:14.0/usb1", 1);
        // An external hub at 1-1 with a disk behind it at 1-1.2.
        let hub = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-1",
                class: 9,
                id_vendor: 0x05e3,
                id_product: 0x0608,
                devnum: 2,
                ..Default::default()
            },
        );
        interface(root, &hub, 1, 0, (9, 0, 0), Some("hub"));
        let disk = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-1/1-1.2",
                id_vendor: 0x0781,
                id_product: 0x5567,
                devnum: 3,
                ..Default::default()
            },
        );
        interface(root, &disk, 1, 0, (8, 6, 0x50), Some("usb-storage"));
        // A keyboard at 1-3 with two interfaces, the second unbound.
        let kbd = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-3",
                id_vendor: 0x046d,
                id_product: 0xc31c,
                speed: "1.5",
                devnum: 4,
                ..Default::default()
            },
        );
        interface(root, &kbd, 1, 1, (3, 0, 0), None);
        interface(root, &kbd, 1, 0, (3, 1, 1), Some("usbhid"));
        // An imported device on vhci_hcd.
        root_hub(root, "platform/vhci_hcd.0/usb3", 3);
        device(
            root,
            &FakeDevice {
                devpath: "platform/vhci_hcd.0/usb3/3-1",
                busnum: 3,
                devnum: 2,
                ..Default::default()
            },
        );
        t
    }

    #[test]
    fn reads_devices_in_udev_order_with_interfaces_and_drivers() {
        let t = tree();
        let all = Sysfs::new(t.path()).devices().unwrap();
        let ids: Vec<&str> = all.iter().map(|d| d.busid.as_str()).collect();
        // Component-wise devpath order: 1-1/1-1.2 before 1-3; pci before platform.
        assert_eq!(ids, ["usb1", "1-1", "1-1.2", "1-3", "usb3", "3-1"]);
        let disk = &all[2];
        assert_eq!(
            disk.devpath,
            "/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2"
        );
        assert_eq!(
            disk.sysfs_path(),
            "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2"
        );
        assert_eq!((disk.id_vendor, disk.id_product), (0x0781, 0x5567));
        assert_eq!((disk.busnum, disk.devnum), (1, 3));
        assert_eq!(disk.speed, Speed::High);
        assert_eq!(disk.configuration_value, Some(1));
        assert_eq!(disk.num_interfaces, Some(1));
        assert_eq!(disk.driver.as_deref(), Some("usb"));
        assert_eq!(disk.interfaces.len(), 1);
        assert_eq!(disk.interfaces[0].name, "1-1.2:1.0");
        assert_eq!(disk.interfaces[0].driver.as_deref(), Some("usb-storage"));
        assert_eq!(
            (
                disk.interfaces[0].class,
                disk.interfaces[0].subclass,
                disk.interfaces[0].protocol
            ),
            (8, 6, 0x50)
        );
        let kbd = &all[3];
        assert_eq!(kbd.speed, Speed::Low);
        let names: Vec<_> = kbd
            .interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.driver.as_deref()))
            .collect();
        assert_eq!(names, [("1-3:1.0", Some("usbhid")), ("1-3:1.1", None)]);
        let info = kbd.device_info();
        assert_eq!(info.busid, "1-3");
        assert_eq!(info.num_interfaces, 2);
        assert_eq!(info.interfaces[0].class, 3);
    }

    #[test]
    fn listing_skips_hubs_and_imported_devices_and_knows_what_is_exportable() {
        let t = tree();
        let s = Sysfs::new(t.path());
        let listed: Vec<String> = s
            .listed_devices()
            .unwrap()
            .into_iter()
            .map(|d| d.busid)
            .collect();
        assert_eq!(listed, ["1-1.2", "1-3"]);
        assert_eq!(
            s.device("1-1").unwrap().not_exportable(),
            Some(NotExportable::Hub)
        );
        assert_eq!(
            s.device("usb1").unwrap().not_exportable(),
            Some(NotExportable::Hub)
        );
        assert_eq!(
            s.device("3-1").unwrap().not_exportable(),
            Some(NotExportable::Imported)
        );
        assert!(s.device("1-1.2").unwrap().is_exportable());
    }

    #[test]
    fn export_status_marks_hubs_imported_bound_and_free_devices() {
        let t = tree();
        let root = t.path();
        // A device the kernel's usbip-host holds.
        device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-4",
                driver: Some("usbip-host"),
                devnum: 5,
                ..Default::default()
            },
        );
        let s = Sysfs::new(root);
        // usbipd holds a binding for 1-3, and (bogusly) for the hub 1-1 and
        // the imported 3-1: those stay not exportable.
        let bound = ["1-3", "1-1", "3-1"];
        let marks: Vec<(String, ExportStatus)> = s
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| {
                let st = d.export_status(bound.contains(&d.busid.as_str()));
                (d.busid, st)
            })
            .collect();
        let want = [
            ("usb1", ExportStatus::Not(NotExportable::Hub)),
            ("1-1", ExportStatus::Not(NotExportable::Hub)),
            ("1-1.2", ExportStatus::Exportable),
            ("1-3", ExportStatus::Exported),
            ("1-4", ExportStatus::KernelExported),
            ("usb3", ExportStatus::Not(NotExportable::Hub)),
            ("3-1", ExportStatus::Not(NotExportable::Imported)),
        ];
        let got: Vec<(&str, ExportStatus)> =
            marks.iter().map(|(b, st)| (b.as_str(), *st)).collect();
        assert_eq!(got, want);
        let words: Vec<(Option<&str>, bool, bool)> = want
            .iter()
            .map(|(_, st)| (st.reason(), st.is_exportable(), st.is_exported()))
            .collect();
        assert_eq!(
            words,
            [
                (Some("hub"), false, false),
                (Some("hub"), false, false),
                (None, true, false),
                (Some("exported"), false, true),
                (Some("usbip-host"), false, false),
                (Some("hub"), false, false),
                (Some("imported"), false, false),
            ]
        );
        assert_eq!(ExportStatus::Exportable.describe(), "exportable");
        assert_eq!(ExportStatus::Exported.describe(), "exported by usbipd");
        assert_eq!(
            ExportStatus::Not(NotExportable::Hub).describe(),
            "hub: not exportable"
        );
        // Unbound again: exportable again.
        assert_eq!(
            s.device("1-3").unwrap().export_status(false),
            ExportStatus::Exportable
        );
    }

    #[test]
    fn unconfigured_device_and_missing_things() {
        let t = tempfile::tempdir().unwrap();
        let s = Sysfs::new(t.path());
        assert!(
            s.devices().unwrap().is_empty(),
            "no USB at all is an empty list"
        );
        device(
            t.path(),
            &FakeDevice {
                devpath: "pci0000:00/usb2/2-4",
                config: None,
                driver: Some("usbip-host"),
                ..Default::default()
            },
        );
        let d = s.device("2-4").unwrap();
        assert_eq!(d.configuration_value, None);
        assert_eq!(d.num_interfaces, None);
        assert_eq!(d.driver.as_deref(), Some("usbip-host"));
        assert!(matches!(s.device("9-9"), Err(LocalError::NotFound { .. })));
        assert!(matches!(s.device("../x"), Err(LocalError::NotFound { .. })));
        fs::remove_file(t.path().join("sys/devices/pci0000:00/usb2/2-4/idVendor")).unwrap();
        let e = s.devices().unwrap_err();
        assert!(
            e.to_string().contains("problem getting device attributes"),
            "{e}"
        );
    }
}
