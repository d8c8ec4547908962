//! The one model of local USB devices: what sysfs (`/sys/bus/usb/devices`)
//! says about them, read the way the C tools read it through libudev, and
//! the one rule for what may be exported. `usbip list -l` and `bind` both
//! use it, so `list -l --mark` never calls exportable what `bind` refuses.
//!
//! Every path is under [`Roots`] (`/` on a real system) so that tests can
//! use a fake tree (`sysfs::fake`, behind the `test-util` feature).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use usbwire_proto::{DeviceInfo, InterfaceInfo, Speed};
use usbwire_usb::TransferType;

/// Where the system's trees are.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        Roots::under(Path::new("/"))
    }
}

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

/// One interface of the active configuration (`1-1:1.0`).
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
    /// The canonical sysfs directory it was read from.
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
    pub serial: Option<String>,
    /// The driver bound to the device itself (`usb`, or `usbip-host` once
    /// the kernel's stub holds it).
    pub driver: Option<String>,
    /// Interfaces of the active configuration, by number.
    pub interfaces: Vec<LocalInterface>,
}

/// Why a device can never be exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotExportable {
    /// Hubs and root hubs are never exported (the C `usbip bind` refuses
    /// them too).
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
    /// Held by the kernel's `usbip-host` driver: exported by the kernel's
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
        } else if self.is_kernel_exported() {
            ExportStatus::KernelExported
        } else {
            ExportStatus::Exportable
        }
    }

    /// `/sys/devices/...`, as the C tools put it in a device record.
    pub fn sysfs_path(&self) -> String {
        format!("/sys{}", self.devpath)
    }

    /// The hub rule, the only one: a hub class device, a root hub (`usbN`),
    /// or a device with a hub interface. None of them is ever exported.
    pub fn is_hub(&self) -> bool {
        self.device_class == 0x09
            || self.busid.starts_with("usb")
            || self.interfaces.iter().any(|i| i.class == 0x09)
    }

    /// The device hangs below a vhci_hcd controller (the C tool tests the
    /// devpath for `vhci_hcd`).
    pub fn is_imported(&self) -> bool {
        Path::new(&self.devpath).components().any(|c| {
            matches!(c, Component::Normal(name) if name.to_string_lossy().starts_with("vhci_hcd"))
        })
    }

    /// The kernel's `usbip-host` holds the device (a device driver today;
    /// an interface driver in old kernels).
    pub fn is_kernel_exported(&self) -> bool {
        let stub = Some("usbip-host");
        self.driver.as_deref() == stub
            || self.interfaces.iter().any(|i| i.driver.as_deref() == stub)
    }

    /// Why this device may never be exported, if it may not.
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

    /// The active configuration, 0 while unconfigured.
    pub fn active_configuration(&self) -> u8 {
        self.configuration_value.unwrap_or(0)
    }

    /// The usbfs node, `/dev/bus/usb/BBB/DDD`.
    pub fn devnode(&self, roots: &Roots) -> PathBuf {
        roots
            .dev
            .join(format!("bus/usb/{:03}/{:03}", self.busnum, self.devnum))
    }

    /// The sysfs name of interface `n` of the active configuration, `BUSID:C.N`.
    pub fn interface_name(&self, n: u8) -> String {
        format!("{}:{}.{}", self.busid, self.active_configuration(), n)
    }

    /// The device record a server sends for it.
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
            configuration_value: self.active_configuration(),
            num_configurations: self.num_configurations,
            num_interfaces: self.num_interfaces.unwrap_or(self.interfaces.len() as u8),
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
        fs::read(self.syspath.join("descriptors"))
    }
}

/// A sysfs attribute as libudev returns it: trailing newlines dropped;
/// `None` when absent.
pub(crate) fn attr(dir: &Path, name: &str) -> Result<Option<String>, LocalError> {
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

/// A numeric attribute in `radix` (sysfs prints ids and classes in hex,
/// counts and numbers in decimal, some padded with spaces); `None` when
/// absent or empty (an unconfigured device's configuration).
fn number_attr(dir: &Path, name: &str, radix: u32) -> Result<Option<u32>, LocalError> {
    match attr(dir, name)? {
        None => Ok(None),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => {
            u32::from_str_radix(v.trim(), radix)
                .map(Some)
                .map_err(|_| LocalError::BadValue {
                    path: dir.join(name),
                    value: v,
                })
        }
    }
}

fn hex_attr(dir: &Path, name: &str) -> Result<Option<u32>, LocalError> {
    number_attr(dir, name, 16)
}

fn dec_attr(dir: &Path, name: &str) -> Result<Option<u32>, LocalError> {
    number_attr(dir, name, 10)
}

/// The name of the driver bound to a sysfs device directory.
pub fn driver_of(dir: &Path) -> Option<String> {
    fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Sorts like libudev's enumerator: by devpath, one path component at a
/// time (so `1-1/1-1.2` comes before `1-1.3`).
fn devpath_cmp(a: &str, b: &str) -> Ordering {
    Path::new(a).cmp(Path::new(b))
}

/// `(config, number)` of an interface named `<busid>:<config>.<number>`.
fn interface_address(name: &str) -> Option<(u8, u8)> {
    let (_, at) = name.rsplit_once(':')?;
    let (config, number) = at.split_once('.')?;
    Some((config.parse().ok()?, number.parse().ok()?))
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

    /// `sys/bus/usb/devices`: a link to every USB device and interface.
    pub fn usb_devices_dir(&self) -> PathBuf {
        self.sys.join("bus/usb/devices")
    }

    /// The devpath (`/devices/...`) of a syspath under this root.
    pub(crate) fn devpath(&self, syspath: &Path) -> String {
        let sys = fs::canonicalize(&self.sys).unwrap_or_else(|_| self.sys.clone());
        match syspath.strip_prefix(&sys) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => syspath.display().to_string(),
        }
    }

    /// Every USB device (interfaces excluded), hubs included, in libudev's
    /// order. No USB subsystem at all is an empty list, as it is for the C
    /// tool.
    pub fn local_devices(&self) -> Result<Vec<LocalDevice>, LocalError> {
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
            if name.contains(':') {
                // An interface.
                continue;
            }
            out.push(self.read_device(&name, &entry.path())?);
        }
        out.sort_by(|a, b| devpath_cmp(&a.devpath, &b.devpath));
        Ok(out)
    }

    /// The devices `usbip list -l` shows: the exportable ones, as the one
    /// hub rule and vhci_hcd say.
    pub fn listed_devices(&self) -> Result<Vec<LocalDevice>, LocalError> {
        Ok(self
            .local_devices()?
            .into_iter()
            .filter(LocalDevice::is_exportable)
            .collect())
    }

    /// One device by bus id.
    pub fn local_device(&self, busid: &str) -> Result<LocalDevice, LocalError> {
        let path = self.usb_devices_dir().join(busid);
        if busid.is_empty()
            || busid.contains(['/', ':'])
            || busid.starts_with('.')
            || !path.exists()
        {
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
        let required = |name: &'static str| -> Result<u16, LocalError> {
            let value = hex_attr(dir, name)?.ok_or(LocalError::MissingAttr {
                busid: busid.to_string(),
                attr: name,
            })?;
            Ok(value as u16)
        };
        let byte = |value: Option<u32>| value.map(|v| v as u8);
        let busnum = match dec_attr(dir, "busnum")? {
            Some(n) => n,
            // What the C tool does: sscanf(busid, "%u-%u").
            None => busid
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        };
        Ok(LocalDevice {
            busid: busid.to_string(),
            devpath: self.devpath(dir),
            busnum,
            devnum: dec_attr(dir, "devnum")?.unwrap_or(0),
            speed: attr(dir, "speed")?
                .map(|s| Speed::from_sysfs(s.trim()))
                .unwrap_or(Speed::Unknown),
            id_vendor: required("idVendor")?,
            id_product: required("idProduct")?,
            bcd_device: hex_attr(dir, "bcdDevice")?.unwrap_or(0) as u16,
            device_class: byte(hex_attr(dir, "bDeviceClass")?).unwrap_or(0),
            device_subclass: byte(hex_attr(dir, "bDeviceSubClass")?).unwrap_or(0),
            device_protocol: byte(hex_attr(dir, "bDeviceProtocol")?).unwrap_or(0),
            configuration_value: byte(dec_attr(dir, "bConfigurationValue")?),
            num_configurations: byte(dec_attr(dir, "bNumConfigurations")?).unwrap_or(0),
            num_interfaces: byte(dec_attr(dir, "bNumInterfaces")?),
            serial: attr(dir, "serial")?,
            driver: driver_of(dir),
            interfaces: read_interfaces(busid, dir)?,
            syspath,
        })
    }
}

/// The interface directories (`<busid>:<config>.<number>`) below a device.
fn read_interfaces(busid: &str, dir: &Path) -> Result<Vec<LocalInterface>, LocalError> {
    let mut interfaces = Vec::new();
    let Ok(children) = fs::read_dir(dir) else {
        return Ok(interfaces);
    };
    let prefix = format!("{busid}:");
    for child in children.flatten() {
        let name = child.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) {
            continue;
        }
        let Some((_, number)) = interface_address(&name) else {
            continue;
        };
        let idir = child.path();
        let byte = |attr: &str| -> Result<u8, LocalError> {
            Ok(hex_attr(&idir, attr)?.unwrap_or(0) as u8)
        };
        interfaces.push(LocalInterface {
            number,
            alternate_setting: dec_attr(&idir, "bAlternateSetting")?.unwrap_or(0) as u8,
            class: byte("bInterfaceClass")?,
            subclass: byte("bInterfaceSubClass")?,
            protocol: byte("bInterfaceProtocol")?,
            driver: driver_of(&idir),
            name,
        });
    }
    interfaces.sort_by_key(|i| interface_address(&i.name));
    Ok(interfaces)
}

/// The device descriptor and configuration `config`'s full descriptor,
/// cut from a device's raw descriptors (the `descriptors` sysfs file: the
/// device descriptor, then every configuration, each `wTotalLength` long).
/// `None` if the blob has no such configuration, or is not what the kernel
/// writes there.
pub fn split_descriptors(raw: &[u8], config: u8) -> Option<(Vec<u8>, Vec<u8>)> {
    const DEVICE_LEN: usize = 18;
    if raw.len() < DEVICE_LEN || raw[0] as usize != DEVICE_LEN || raw[1] != 1 {
        return None;
    }
    let mut at = DEVICE_LEN;
    // Bounded by the blob: every step moves on by at least a header.
    while at + 9 <= raw.len() {
        if raw[at + 1] != 2 {
            return None;
        }
        let total = u16::from_le_bytes([raw[at + 2], raw[at + 3]]) as usize;
        if total < 9 {
            return None;
        }
        let end = (at + total).min(raw.len());
        if raw[at + 5] == config {
            return Some((raw[..DEVICE_LEN].to_vec(), raw[at..end].to_vec()));
        }
        at = end;
    }
    None
}

/// The endpoints of every configuration, interface and alternate setting,
/// from a device's raw descriptors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointTypes {
    /// (config value, interface, alt) → endpoints (address, type).
    alts: BTreeMap<(u8, u8, u8), Vec<(u8, TransferType)>>,
}

/// The endpoints of every (configuration, interface, alternate setting) in
/// a descriptor blob (the `descriptors` sysfs file), read with the
/// workspace's one descriptor parser.
fn walk_descriptors(raw: &[u8]) -> BTreeMap<(u8, u8, u8), Vec<(u8, TransferType)>> {
    use usbwire_usb::descriptor::{self, Descriptor};
    let mut alts: BTreeMap<(u8, u8, u8), Vec<(u8, TransferType)>> = BTreeMap::new();
    let (mut config, mut iface, mut alt) = (0u8, 0u8, 0u8);
    for desc in descriptor::walk(raw).parsed() {
        match desc {
            Descriptor::Configuration(c) => config = c.value,
            Descriptor::Interface(i) => {
                (iface, alt) = (i.number, i.alt_setting);
                alts.entry((config, iface, alt)).or_default();
            }
            Descriptor::Endpoint(e) => alts
                .entry((config, iface, alt))
                .or_default()
                .push((e.address, e.transfer_type())),
            _ => {}
        }
    }
    alts
}

impl EndpointTypes {
    pub fn parse(raw: &[u8]) -> EndpointTypes {
        EndpointTypes {
            alts: walk_descriptors(raw),
        }
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

/// Builds fake sysfs trees laid out like the kernel's: device directories
/// under `sys/devices/...`, symlinks to them from `sys/bus/usb/devices`,
/// `driver` symlinks into `sys/bus/usb/drivers`. For tests, here and in
/// other crates (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
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

    #[test]
    fn split_descriptors_finds_the_active_configuration() {
        let mut raw = vec![18, 1, 0, 2, 0, 0, 0, 64, 1, 2, 3, 4, 0, 1, 1, 2, 3, 2];
        let first = [9, 2, 18, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 0, 8, 6, 80, 0];
        let second = [9, 2, 9, 0, 0, 2, 0, 0x80, 50];
        raw.extend_from_slice(&first);
        raw.extend_from_slice(&second);
        let (device, config) = split_descriptors(&raw, 1).unwrap();
        assert_eq!(device, raw[..18]);
        assert_eq!(config, first);
        assert_eq!(split_descriptors(&raw, 2).unwrap().1, second);
        // Unconfigured, or a configuration the device does not have.
        assert_eq!(split_descriptors(&raw, 0), None);
        assert_eq!(split_descriptors(&raw, 3), None);
        // A wTotalLength past the end is cut at it; one below a header
        // ends the walk; a blob that is not descriptors gives nothing.
        let mut long = raw[..18 + 9].to_vec();
        long[18 + 2] = 200;
        assert_eq!(split_descriptors(&long, 1).unwrap().1.len(), 9);
        let mut short = raw.clone();
        short[18 + 2] = 3;
        assert_eq!(split_descriptors(&short, 2), None);
        assert_eq!(split_descriptors(&raw[..10], 1), None);
        assert_eq!(split_descriptors(&[0u8; 64], 1), None);
    }

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
        // A composite device whose second interface is a hub: a hub too.
        let dock = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-5",
                id_vendor: 0x17ef,
                id_product: 0x3060,
                devnum: 6,
                ..Default::default()
            },
        );
        interface(root, &dock, 1, 0, (0xff, 0, 0), None);
        interface(root, &dock, 1, 1, (9, 0, 0), Some("hub"));
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
        let all = Roots::under(t.path()).local_devices().unwrap();
        let ids: Vec<&str> = all.iter().map(|d| d.busid.as_str()).collect();
        // Component-wise devpath order: 1-1/1-1.2 before 1-3; pci before platform.
        assert_eq!(ids, ["usb1", "1-1", "1-1.2", "1-3", "1-5", "usb3", "3-1"]);
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
        assert_eq!(disk.interface_name(0), "1-1.2:1.0");
        assert_eq!(disk.interfaces[0].driver.as_deref(), Some("usb-storage"));
        assert_eq!(
            (
                disk.interfaces[0].class,
                disk.interfaces[0].subclass,
                disk.interfaces[0].protocol
            ),
            (8, 6, 0x50)
        );
        assert_eq!(
            disk.devnode(&Roots::under(Path::new("/x"))),
            Path::new("/x/dev/bus/usb/001/003")
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
        assert_eq!(
            info.path.to_string(),
            "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3"
        );
        assert_eq!(info.num_interfaces, 2);
        assert_eq!(info.configuration_value, 1);
        assert_eq!(info.interfaces[0].class, 3);
    }

    #[test]
    fn one_hub_rule_for_listing_and_binding() {
        let t = tree();
        let s = Roots::under(t.path());
        let listed: Vec<String> = s
            .listed_devices()
            .unwrap()
            .into_iter()
            .map(|d| d.busid)
            .collect();
        assert_eq!(listed, ["1-1.2", "1-3"]);
        let why = |busid: &str| s.local_device(busid).unwrap().not_exportable();
        assert_eq!(why("1-1"), Some(NotExportable::Hub), "hub class");
        assert_eq!(why("usb1"), Some(NotExportable::Hub), "root hub");
        assert_eq!(why("1-5"), Some(NotExportable::Hub), "hub interface");
        assert_eq!(why("3-1"), Some(NotExportable::Imported));
        assert_eq!(why("1-1.2"), None);
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
        let s = Roots::under(root);
        // usbipd holds a binding for 1-3, and (bogusly) for the hub 1-1 and
        // the imported 3-1: those stay not exportable.
        let bound = ["1-3", "1-1", "3-1"];
        let marks: Vec<(String, ExportStatus)> = s
            .local_devices()
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
            ("1-5", ExportStatus::Not(NotExportable::Hub)),
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
            s.local_device("1-3").unwrap().export_status(false),
            ExportStatus::Exportable
        );
    }

    #[test]
    fn unconfigured_device_and_missing_things() {
        let t = tempfile::tempdir().unwrap();
        let s = Roots::under(t.path());
        assert!(
            s.local_devices().unwrap().is_empty(),
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
        let d = s.local_device("2-4").unwrap();
        assert_eq!(d.configuration_value, None);
        assert_eq!(d.active_configuration(), 0);
        assert_eq!(d.num_interfaces, None);
        assert!(d.is_kernel_exported());
        for bogus in ["9-9", "../x", "", "2-4:1.0", ".."] {
            assert!(
                matches!(s.local_device(bogus), Err(LocalError::NotFound { .. })),
                "{bogus:?}"
            );
        }
        fs::remove_file(t.path().join("sys/devices/pci0000:00/usb2/2-4/idVendor")).unwrap();
        let e = s.local_devices().unwrap_err();
        assert!(
            e.to_string().contains("problem getting device attributes"),
            "{e}"
        );
    }

    #[test]
    fn configuration_values_are_decimal_and_ids_hex() {
        let t = tempfile::tempdir().unwrap();
        let dir = device(
            t.path(),
            &FakeDevice {
                devpath: "pci0000:00/usb2/2-4",
                config: Some(10),
                ..Default::default()
            },
        );
        fs::write(dir.join("bcdDevice"), "0a10\n").unwrap();
        let d = Roots::under(t.path()).local_device("2-4").unwrap();
        assert_eq!(d.configuration_value, Some(10));
        assert_eq!(d.bcd_device, 0x0a10);
        fs::write(dir.join("devnum"), "x\n").unwrap();
        let e = Roots::under(t.path()).local_device("2-4").unwrap_err();
        assert!(matches!(e, LocalError::BadValue { .. }), "{e}");
    }

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
        let d = EndpointTypes::parse(&raw);
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
