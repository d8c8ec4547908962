//! Gadgets bound to the kernel's `usbip-vudc` UDC, exported as the C
//! `usbipd --device` (`-e`) exports them.
//!
//! `usbip-vudc` is a virtual USB device controller: a gadget (a configfs
//! gadget, `g_mass_storage`...) binds to it like to any UDC, and the kernel
//! itself then serves that gadget's URBs over a USB/IP connection. The
//! daemon's part is small, and this module follows the C tool's
//! (`tools/usb/usbip/libsrc/usbip_device_driver.c` and
//! `usbip_host_common.c` in the kernel sources):
//!
//! * every device of the `udc` class whose uevent says
//!   `USB_UDC_NAME=usbip-vudc` is a vudc; its bus id is the name of its
//!   parent, the platform device (`usbip-vudc.0`);
//! * the device record comes from the parent's `dev_desc` (the gadget's
//!   18-byte device descriptor, little-endian, which the kernel caches
//!   once a gadget is bound and its pull-up on; reading it fails with
//!   ENODEV before), the UDC's `current_speed` ("high-speed"...), and the
//!   parent's syspath; configuration, interface count, bus and device
//!   numbers are 0 and there are no interface triples, as the C tool
//!   sends them ("only used for user output");
//! * the parent's `usbip_status` is `SDEV_ST_*` (1 available, 2 used,
//!   3 error), and an import is handed to the kernel by writing the
//!   socket's descriptor number to the parent's `usbip_sockfd`
//!   (`drivers/usb/usbip/vudc_sysfs.c`).
//!
//! The C daemon lists every vudc, bound or not (an unbound one with
//! whatever its failed `dev_desc` read left in the record); here only
//! vudcs with a bound gadget are exported, since nothing can import the
//! others. Gadgets are bound and unbound with no event to usbipd, so
//! [`VudcExports::refresh`] re-reads sysfs each time a client lists or
//! imports, as the C daemon does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, info, warn};
use usbwire_proto::{DeviceInfo, Errno, Speed};
use usbwire_usb::KernelState;

use crate::export::ExportTable;
use crate::handoff::{KernelRunDevice, SysfsHandoff, STATUS_ATTR};
use crate::sysfs::{attr, LocalError, Roots};

/// The gadget name vudc gives its UDC (`USB_UDC_NAME`), and the prefix of
/// its platform devices' names.
pub const VUDC_NAME: &str = "usbip-vudc";

/// Length of a USB device descriptor, what `dev_desc` holds.
const DEVICE_DESCRIPTOR_LEN: usize = 18;

/// The C tool's table of `current_speed` names (`speed_names` in
/// `usbip_device_driver.c`); a name outside it is `Unknown` there too.
fn speed_from_name(name: &str) -> Speed {
    match name {
        "low-speed" => Speed::Low,
        "full-speed" => Speed::Full,
        "high-speed" => Speed::High,
        "wireless" => Speed::Wireless,
        "super-speed" => Speed::Super,
        _ => Speed::Unknown,
    }
}

/// A vudc with a bound gadget, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VudcGadget {
    /// The platform device's name, `usbip-vudc.N`.
    pub busid: String,
    /// The platform device's canonical directory, which holds `dev_desc`,
    /// `usbip_status` and `usbip_sockfd`.
    pub dir: PathBuf,
    /// The bound gadget driver (`USB_UDC_DRIVER`: a configfs gadget's
    /// directory name), for the log.
    pub function: Option<String>,
    pub status: KernelState,
    /// The record devlist and import send.
    pub info: DeviceInfo,
}

/// What [`Roots::vudc_gadgets`] found.
#[derive(Debug, Default)]
pub struct VudcScan {
    /// The vudcs with a bound gadget, by bus id.
    pub gadgets: Vec<VudcGadget>,
    /// Why the vudcs left out were: their sysfs could not be read.
    pub unreadable: Vec<LocalError>,
}

/// The `KEY=VALUE` lines of a sysfs `uevent` file.
fn uevent_vars(dir: &Path) -> Result<BTreeMap<String, String>, LocalError> {
    Ok(attr(dir, "uevent")?
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// What a vudc's `usbip_status` says.
pub fn read_status(dir: &Path) -> Result<KernelState, LocalError> {
    let path = dir.join(STATUS_ATTR);
    let value = attr(dir, STATUS_ATTR)?.ok_or_else(|| LocalError::Read {
        path: path.clone(),
        source: io::ErrorKind::NotFound.into(),
    })?;
    KernelState::parse(&value).map_err(|_| LocalError::BadValue { path, value })
}

impl Roots {
    /// `sys/class/udc`: a link to every USB device controller.
    pub fn udc_class_dir(&self) -> PathBuf {
        self.sys.join("class/udc")
    }

    /// Every vudc with a bound gadget, by bus id. No UDC class at all (no
    /// gadget support, no vudc loaded) is an empty list. A vudc that
    /// cannot be read is left out, as the C daemon leaves it out, so that
    /// one bad device does not hide the others; its error is in
    /// [`VudcScan::unreadable`].
    pub fn vudc_gadgets(&self) -> Result<VudcScan, LocalError> {
        let class = self.udc_class_dir();
        let entries = match fs::read_dir(&class) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VudcScan::default()),
            Err(source) => {
                return Err(LocalError::Read {
                    path: class,
                    source,
                })
            }
        };
        let mut scan = VudcScan::default();
        for entry in entries {
            let entry = entry.map_err(|source| LocalError::Read {
                path: class.clone(),
                source,
            })?;
            match self.read_vudc(&entry.path()) {
                Ok(Some(g)) => scan.gadgets.push(g),
                Ok(None) => {}
                Err(e) => scan.unreadable.push(e),
            }
        }
        scan.gadgets.sort_by(|a, b| a.busid.cmp(&b.busid));
        Ok(scan)
    }

    /// One UDC: `None` if it is not a vudc or has no bound gadget.
    fn read_vudc(&self, udc: &Path) -> Result<Option<VudcGadget>, LocalError> {
        let vars = uevent_vars(udc)?;
        if vars.get("USB_UDC_NAME").map(String::as_str) != Some(VUDC_NAME) {
            return Ok(None);
        }
        // The UDC's parent, which the kernel links as `device`.
        let link = udc.join("device");
        let dir = fs::canonicalize(&link).map_err(|source| LocalError::Read {
            path: link.clone(),
            source,
        })?;
        let busid = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let function = vars.get("USB_UDC_DRIVER").cloned();
        if function.is_none() {
            debug!("{busid}: no gadget bound");
            return Ok(None);
        }
        let desc_path = dir.join("dev_desc");
        let desc = match fs::read(&desc_path) {
            Ok(d) => d,
            // Bound but not pulled up, or unbound since the uevent was read.
            Err(e) if e.raw_os_error() == Some(Errno::ENODEV.0) => {
                debug!("{busid}: the gadget's descriptor is not available (not connected)");
                return Ok(None);
            }
            Err(source) => {
                return Err(LocalError::Read {
                    path: desc_path,
                    source,
                })
            }
        };
        if desc.len() < DEVICE_DESCRIPTOR_LEN {
            return Err(LocalError::BadValue {
                path: desc_path,
                value: format!("{} bytes, not a device descriptor", desc.len()),
            });
        }
        let le16 = |at: usize| u16::from_le_bytes([desc[at], desc[at + 1]]);
        let speed = attr(udc, "current_speed")?
            .map(|s| speed_from_name(s.trim()))
            .unwrap_or(Speed::Unknown);
        let info = DeviceInfo {
            path: format!("/sys{}", self.devpath(&dir)).as_str().into(),
            busid: busid.as_str().into(),
            busnum: 0,
            devnum: 0,
            speed,
            id_vendor: le16(8),
            id_product: le16(10),
            bcd_device: le16(12),
            device_class: desc[4],
            device_subclass: desc[5],
            device_protocol: desc[6],
            configuration_value: 0,
            num_configurations: desc[17],
            num_interfaces: 0,
            interfaces: Vec::new(),
        };
        Ok(Some(VudcGadget {
            status: read_status(&dir)?,
            busid,
            dir,
            function,
            info,
        }))
    }
}

/// A vudc, as the daemon exports it: the kernel serves its URBs, so an
/// import hands the connection to it through `usbip_sockfd`
/// ([`SysfsHandoff`]) instead of running them.
pub fn vudc_backend(gadget: &VudcGadget) -> KernelRunDevice {
    KernelRunDevice::new(
        gadget.info.clone(),
        SysfsHandoff::new(VUDC_NAME, &gadget.dir),
    )
}

/// Keeps an export table in step with the vudcs: every vudc whose gadget
/// is bound and available is exported; one whose gadget went away, changed,
/// or was taken by another server is withdrawn, unless our own import
/// holds it (the session gives it back when the kernel lets go).
pub struct VudcExports {
    roots: Roots,
    table: Box<dyn ExportTable>,
    state: Mutex<ExportState>,
}

#[derive(Default)]
struct ExportState {
    /// What this exporter put in the table, as it was put there.
    exported: BTreeMap<String, DeviceInfo>,
    /// The problems the last refresh met, each logged once while it lasts:
    /// clients' requests drive refreshes, and must not flood the log.
    problems: BTreeSet<String>,
}

impl VudcExports {
    pub fn new(roots: Roots, table: impl ExportTable) -> VudcExports {
        VudcExports {
            roots,
            table: Box::new(table),
            state: Mutex::new(ExportState::default()),
        }
    }

    /// The bus ids exported now, in order.
    pub fn exported(&self) -> Vec<String> {
        self.lock().exported.keys().cloned().collect()
    }

    /// What kept the last refresh from exporting a vudc, if anything.
    pub fn problems(&self) -> Vec<String> {
        self.lock().problems.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExportState> {
        // Every update is one insert, remove or assignment: a panic cannot
        // leave the state half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads sysfs and updates the table. Blocks on sysfs reads (a few
    /// small attributes per vudc); refreshes are serialised.
    pub fn refresh(&self) {
        let mut state = self.lock();
        let mut problems = BTreeSet::new();
        self.update(&mut state.exported, &mut problems);
        for p in problems.difference(&state.problems) {
            warn!("{p}");
        }
        state.problems = problems;
    }

    fn update(&self, exported: &mut BTreeMap<String, DeviceInfo>, problems: &mut BTreeSet<String>) {
        let scan = match self.roots.vudc_gadgets() {
            Ok(s) => s,
            Err(e) => {
                problems.insert(format!("cannot read the gadgets bound to {VUDC_NAME}: {e}"));
                return;
            }
        };
        for e in &scan.unreadable {
            problems.insert(format!("left out of the exported gadgets: {e}"));
        }
        let gadgets: BTreeMap<&str, &VudcGadget> =
            scan.gadgets.iter().map(|g| (g.busid.as_str(), g)).collect();
        let was: Vec<(String, DeviceInfo)> = exported
            .iter()
            .map(|(b, i)| (b.clone(), i.clone()))
            .collect();
        for (busid, info) in was {
            match self.table.is_imported(&busid) {
                None => {
                    exported.remove(&busid);
                    continue;
                }
                Some(true) => continue,
                Some(false) => {}
            }
            let why = match gadgets.get(busid.as_str()).map(|g| (g.status, g)) {
                None => "no gadget is bound to it any more".to_string(),
                Some((KernelState::Used, _)) => {
                    "the kernel serves a connection another server handed it".to_string()
                }
                Some((KernelState::Unusable(n), _)) => {
                    format!("its usbip_status is {n}, not available")
                }
                Some((_, g)) if g.info != info => "a different gadget is bound to it now".into(),
                Some(_) => continue,
            };
            match self.table.remove(&busid) {
                Ok(_) => {
                    exported.remove(&busid);
                    info!("{busid} no longer exported: {why}");
                }
                // Imported in the meantime: looked at again next time.
                Err(e) => debug!("{busid} stays exported for now: {e}"),
            }
        }
        for g in gadgets.values() {
            if g.status != KernelState::Available || exported.contains_key(&g.busid) {
                continue;
            }
            match self.table.reserve(&g.busid) {
                Ok(slot) => {
                    slot.commit(g.info.clone(), Box::new(vudc_backend(g)));
                    exported.insert(g.busid.clone(), g.info.clone());
                    info!(
                        "exporting {} (gadget {}, {:04x}:{:04x}, {})",
                        g.busid,
                        g.function.as_deref().unwrap_or("?"),
                        g.info.id_vendor,
                        g.info.id_product,
                        g.info.speed.describe()
                    );
                }
                Err(e) => {
                    problems.insert(format!("cannot export {}: {e}", g.busid));
                }
            }
        }
    }
}

/// Fake vudcs laid out as the kernel lays them out: the platform device
/// `sys/devices/platform/usbip-vudc.N` (from `platform_device_alloc` in
/// `drivers/usb/usbip/vudc_main.c`) holds `dev_desc`, `usbip_status` and
/// `usbip_sockfd` (`vudc_sysfs.c`); its UDC class device is the child
/// `udc/usbip-vudc.N` (`usb_add_gadget` in `drivers/usb/gadget/udc/core.c`
/// names it after the parent) with `uevent`, `current_speed` and a
/// `device` link to the parent, linked from `sys/class/udc`.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};

    /// A vudc to create.
    #[derive(Debug, Clone)]
    pub struct FakeVudc<'a> {
        pub index: u32,
        /// The bound gadget (`USB_UDC_DRIVER`), if any.
        pub function: Option<&'a str>,
        /// The 18-byte device descriptor; written only with a gadget.
        pub descriptor: [u8; 18],
        pub speed: &'a str,
        pub status: i32,
    }

    /// A mass-storage gadget's device descriptor: 1d6b:0104, bcdDevice
    /// 0x0510, class 0 (per interface), one configuration.
    pub const MASS_STORAGE_DESCRIPTOR: [u8; 18] = [
        18, 1, 0x00, 0x02, 0, 0, 0, 64, 0x6b, 0x1d, 0x04, 0x01, 0x10, 0x05, 1, 2, 3, 1,
    ];

    impl Default for FakeVudc<'_> {
        fn default() -> Self {
            FakeVudc {
                index: 0,
                function: Some("g1"),
                descriptor: MASS_STORAGE_DESCRIPTOR,
                speed: "high-speed",
                status: 1,
            }
        }
    }

    /// The platform device directory of vudc `index`.
    pub fn platform_dir(root: &Path, index: u32) -> PathBuf {
        root.join(format!("sys/devices/platform/usbip-vudc.{index}"))
    }

    /// Adds a vudc; returns its platform device directory.
    pub fn vudc(root: &Path, v: &FakeVudc<'_>) -> PathBuf {
        let name = format!("usbip-vudc.{}", v.index);
        let dir = platform_dir(root, v.index);
        let udc = dir.join("udc").join(&name);
        fs::create_dir_all(&udc).unwrap();
        fs::write(dir.join("usbip_status"), format!("{}\n", v.status)).unwrap();
        fs::write(dir.join("usbip_sockfd"), "").unwrap();
        let mut uevent = "USB_UDC_NAME=usbip-vudc\n".to_string();
        if let Some(f) = v.function {
            uevent.push_str(&format!("USB_UDC_DRIVER={f}\n"));
            fs::write(dir.join("dev_desc"), v.descriptor).unwrap();
        }
        fs::write(udc.join("uevent"), uevent).unwrap();
        fs::write(udc.join("current_speed"), format!("{}\n", v.speed)).unwrap();
        symlink(format!("../../../{name}"), udc.join("device")).unwrap();
        let class = root.join("sys/class/udc");
        fs::create_dir_all(&class).unwrap();
        let _ = fs::remove_file(class.join(&name));
        symlink(
            format!("../../devices/platform/{name}/udc/{name}"),
            class.join(&name),
        )
        .unwrap();
        dir
    }

    /// Another UDC (a real controller, or dummy_hcd's) that is no vudc.
    pub fn other_udc(root: &Path, name: &str, gadget_name: &str) {
        let dir = root.join("sys/devices/platform").join(name);
        let udc = dir.join("udc").join(name);
        fs::create_dir_all(&udc).unwrap();
        fs::write(
            udc.join("uevent"),
            format!("USB_UDC_NAME={gadget_name}\nUSB_UDC_DRIVER=g2\n"),
        )
        .unwrap();
        symlink(format!("../../../{name}"), udc.join("device")).unwrap();
        let class = root.join("sys/class/udc");
        fs::create_dir_all(&class).unwrap();
        symlink(
            format!("../../devices/platform/{name}/udc/{name}"),
            class.join(name),
        )
        .unwrap();
    }

    /// Binds (`Some`) or unbinds (`None`) the gadget of vudc `index`.
    pub fn bind(root: &Path, index: u32, function: Option<&str>, descriptor: [u8; 18]) {
        let dir = platform_dir(root, index);
        let udc = dir.join(format!("udc/usbip-vudc.{index}"));
        let mut uevent = "USB_UDC_NAME=usbip-vudc\n".to_string();
        match function {
            Some(f) => {
                uevent.push_str(&format!("USB_UDC_DRIVER={f}\n"));
                fs::write(dir.join("dev_desc"), descriptor).unwrap();
            }
            None => {
                let _ = fs::remove_file(dir.join("dev_desc"));
            }
        }
        fs::write(udc.join("uevent"), uevent).unwrap();
    }

    /// Sets `usbip_status` of vudc `index`.
    pub fn set_status(root: &Path, index: u32, status: i32) {
        fs::write(
            platform_dir(root, index).join("usbip_status"),
            format!("{status}\n"),
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use crate::export::{ExportRefusal, ExportReservation, Unexported};
    use std::sync::Arc;
    use usbwire_usb::Backend;

    #[test]
    fn reads_a_bound_vudc_as_the_c_tool_does() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        vudc(root, &FakeVudc::default());
        vudc(
            root,
            &FakeVudc {
                index: 1,
                function: None,
                ..Default::default()
            },
        );
        other_udc(root, "dummy_udc.0", "dummy_udc");
        let gadgets = Roots::under(root).vudc_gadgets().unwrap().gadgets;
        assert_eq!(gadgets.len(), 1, "{gadgets:?}");
        let g = &gadgets[0];
        assert_eq!(g.busid, "usbip-vudc.0");
        assert_eq!(g.function.as_deref(), Some("g1"));
        assert_eq!(g.status, KernelState::Available);
        assert_eq!(g.dir, fs::canonicalize(platform_dir(root, 0)).unwrap());
        let want = DeviceInfo {
            path: "/sys/devices/platform/usbip-vudc.0".into(),
            busid: "usbip-vudc.0".into(),
            busnum: 0,
            devnum: 0,
            speed: Speed::High,
            id_vendor: 0x1d6b,
            id_product: 0x0104,
            bcd_device: 0x0510,
            device_class: 0,
            device_subclass: 0,
            device_protocol: 0,
            configuration_value: 0,
            num_configurations: 1,
            num_interfaces: 0,
            interfaces: Vec::new(),
        };
        assert_eq!(g.info, want);
        let b = vudc_backend(g);
        assert_eq!(b.device_info("usbip-vudc.0", 9, 9), want);
        assert_eq!(b.transfer_type(0x81), None);
    }

    #[test]
    fn speeds_statuses_and_broken_vudcs() {
        assert_eq!(speed_from_name("full-speed"), Speed::Full);
        assert_eq!(speed_from_name("super-speed"), Speed::Super);
        // Not in the C tool's table.
        assert_eq!(speed_from_name("super-speed-plus"), Speed::Unknown);
        assert_eq!(speed_from_name("UNKNOWN"), Speed::Unknown);
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert!(
            Roots::under(root)
                .vudc_gadgets()
                .unwrap()
                .gadgets
                .is_empty(),
            "no udc class: no gadgets"
        );
        vudc(root, &FakeVudc::default());
        vudc(
            root,
            &FakeVudc {
                index: 1,
                status: 2,
                speed: "full-speed",
                ..Default::default()
            },
        );
        vudc(
            root,
            &FakeVudc {
                index: 2,
                ..Default::default()
            },
        );
        // A short descriptor and a garbled status leave out only their vudc.
        fs::write(platform_dir(root, 2).join("dev_desc"), [18, 1, 0]).unwrap();
        let got = Roots::under(root).vudc_gadgets().unwrap();
        assert_eq!(got.unreadable.len(), 1, "{:?}", got.unreadable);
        let got = got.gadgets;
        let seen: Vec<(&str, KernelState, Speed)> = got
            .iter()
            .map(|g| (g.busid.as_str(), g.status, g.info.speed))
            .collect();
        assert_eq!(
            seen,
            [
                ("usbip-vudc.0", KernelState::Available, Speed::High),
                ("usbip-vudc.1", KernelState::Used, Speed::Full),
            ]
        );
        set_status(root, 1, 7);
        assert_eq!(
            read_status(&platform_dir(root, 1)).unwrap(),
            KernelState::Unusable(7)
        );
        fs::write(platform_dir(root, 1).join("usbip_status"), "x\n").unwrap();
        assert!(matches!(
            read_status(&platform_dir(root, 1)),
            Err(LocalError::BadValue { .. })
        ));
        assert_eq!(
            Roots::under(root).vudc_gadgets().unwrap().gadgets.len(),
            1,
            "a garbled status leaves that vudc out"
        );
    }

    #[test]
    fn the_kernel_runs_the_gadget_through_its_sysfs_attributes() {
        let t = tempfile::tempdir().unwrap();
        vudc(t.path(), &FakeVudc::default());
        let g = Roots::under(t.path())
            .vudc_gadgets()
            .unwrap()
            .gadgets
            .remove(0);
        let mut b = vudc_backend(&g);
        let h = b.kernel_handoff().expect("a vudc is run by the kernel");
        assert_eq!(h.driver(), "usbip-vudc");
        assert_eq!(h.state().unwrap(), KernelState::Available);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::{AsFd, AsRawFd};
        h.hand_over(a.as_fd()).unwrap();
        assert_eq!(
            fs::read_to_string(g.dir.join("usbip_sockfd")).unwrap(),
            format!("{}\n", a.as_raw_fd())
        );
    }

    /// An export table as the registry keeps one: reserved, exported, or
    /// imported.
    #[derive(Default, Clone)]
    struct Table(Arc<Mutex<BTreeMap<String, (DeviceInfo, bool)>>>);

    struct Slot(Table, String);

    impl ExportReservation for Slot {
        fn commit(self: Box<Self>, info: DeviceInfo, _backend: Box<dyn Backend>) {
            self.0
                 .0
                .lock()
                .unwrap()
                .insert(self.1.clone(), (info, false));
        }
    }

    impl Table {
        fn import(&self, busid: &str, imported: bool) {
            self.0.lock().unwrap().get_mut(busid).unwrap().1 = imported;
        }
        fn names(&self) -> Vec<String> {
            self.0.lock().unwrap().keys().cloned().collect()
        }
        fn info(&self, busid: &str) -> DeviceInfo {
            self.0.lock().unwrap()[busid].0.clone()
        }
    }

    impl ExportTable for Table {
        fn reserve(&self, busid: &str) -> Result<Box<dyn ExportReservation>, ExportRefusal> {
            if self.0.lock().unwrap().contains_key(busid) {
                return Err(ExportRefusal::Exported {
                    busid: busid.into(),
                    client: None,
                });
            }
            Ok(Box::new(Slot(self.clone(), busid.into())))
        }
        fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, ExportRefusal> {
            let mut map = self.0.lock().unwrap();
            match map.get(busid) {
                None => Err(ExportRefusal::NotExported {
                    busid: busid.into(),
                }),
                Some((_, true)) => Err(ExportRefusal::Imported {
                    busid: busid.into(),
                    client: "127.0.0.1:1".parse().unwrap(),
                }),
                Some((info, false)) => {
                    let info = info.clone();
                    map.remove(busid);
                    Ok(Box::new(KernelRunDevice::new(
                        info,
                        SysfsHandoff::new(VUDC_NAME, PathBuf::new()),
                    )))
                }
            }
        }
        fn remove_when_free(&self, _: &str, _: bool) -> Result<Unexported, ExportRefusal> {
            unreachable!("the vudc exporter never waits for an import")
        }
        fn is_imported(&self, busid: &str) -> Option<bool> {
            self.0.lock().unwrap().get(busid).map(|e| e.1)
        }
    }

    #[test]
    fn follows_gadgets_bound_and_unbound_between_refreshes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let table = Table::default();
        let exports = VudcExports::new(Roots::under(root), table.clone());
        exports.refresh();
        assert!(table.names().is_empty(), "no vudc loaded");
        vudc(root, &FakeVudc::default());
        vudc(
            root,
            &FakeVudc {
                index: 1,
                function: None,
                ..Default::default()
            },
        );
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.0"]);
        // A gadget bound later appears at the next refresh.
        bind(root, 1, Some("g2"), MASS_STORAGE_DESCRIPTOR);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.0", "usbip-vudc.1"]);
        assert_eq!(exports.exported(), table.names());
        // Our import holds vudc.0 and the kernel serves it: it stays,
        // however sysfs looks meanwhile, even unbound.
        table.import("usbip-vudc.0", true);
        set_status(root, 0, 2);
        bind(root, 0, None, MASS_STORAGE_DESCRIPTOR);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.0", "usbip-vudc.1"]);
        // Given back, and its gadget gone: withdrawn.
        table.import("usbip-vudc.0", false);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.1"]);
        // Another server hands vudc.1 a connection: withdrawn while used,
        // back once available.
        set_status(root, 1, 2);
        exports.refresh();
        assert!(table.names().is_empty());
        set_status(root, 1, 1);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.1"]);
        // SDEV_ST_ERROR: nothing can import it until vudc has reset.
        set_status(root, 1, 3);
        exports.refresh();
        assert!(table.names().is_empty());
        set_status(root, 1, 1);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.1"]);
        // A different gadget bound in its place: the record follows.
        let mut other = MASS_STORAGE_DESCRIPTOR;
        other[10] = 0x05;
        bind(root, 1, Some("g3"), other);
        exports.refresh();
        assert_eq!(table.info("usbip-vudc.1").id_product, 0x0105);
        // Removed from the table by someone else: forgotten, then exported
        // again.
        table.0.lock().unwrap().clear();
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.1"]);
        assert!(exports.problems().is_empty());
        // A vudc whose sysfs makes no sense is a problem, named once while it
        // lasts, and does not hide the others.
        fs::write(platform_dir(root, 1).join("usbip_status"), "garbled\n").unwrap();
        vudc(
            root,
            &FakeVudc {
                index: 2,
                ..Default::default()
            },
        );
        exports.refresh();
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.2"]);
        let problems = exports.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("usbip-vudc.1/usbip_status"),
            "{problems:?}"
        );
        set_status(root, 1, 1);
        exports.refresh();
        assert_eq!(table.names(), ["usbip-vudc.1", "usbip-vudc.2"]);
        assert!(exports.problems().is_empty());
    }
}
