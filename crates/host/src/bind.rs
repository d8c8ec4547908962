//! Binding and unbinding local devices, and keeping the bindings alive
//! across unplugs and daemon restarts.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::backend::UsbfsBackend;
use crate::busy::{self, Holder};
use crate::export::{ExportRefusal, ExportReservation, ExportTable};
use crate::state::{Binding, State};
use crate::stub::{self, kernel_stub_backend, STUB_DRIVER};
use crate::sysfs::{driver_of, LocalDevice, NotExportable, Roots};

/// Why a bind or unbind was refused. [`BindError::errno`] gives the
/// errno-style name the control protocol reports.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BindError {
    #[error("{busid}: no such USB device")]
    NotFound { busid: String },
    #[error("{busid} is a hub; hubs and root hubs cannot be exported")]
    Hub { busid: String },
    #[error("{busid} is busy (EBUSY): {}{}", join(.holders), if *.forcible { "; --force overrides this" } else { "" })]
    Busy {
        busid: String,
        holders: Vec<Holder>,
        forcible: bool,
    },
    #[error("{busid} is already bound and exported (EEXIST)")]
    AlreadyExported { busid: String },
    #[error(
        "{busid} is imported by {client} right now (EBUSY); detach it on that client, \
         or end the import with `usbip unbind --force`"
    )]
    Imported { busid: String, client: SocketAddr },
    #[error(
        "{busid} is still being given back after the import by {client} ended (EBUSY); try again"
    )]
    Releasing { busid: String, client: SocketAddr },
    #[error(
        "{busid} is itself imported from a USB/IP server (vhci_hcd); it cannot be exported again"
    )]
    Vhci { busid: String },
    #[error(
        "{busid} is bound to the kernel's usbip-host, and usbipd exports it through the \
         kernel's stub as it is; `usbip unbind -b {busid}` gives it back to its driver first"
    )]
    KernelStub { busid: String },
    #[error("{busid} is not bound")]
    NotBound { busid: String },
    #[error("{busid} is changing state right now (EAGAIN); try again")]
    Again { busid: String },
    #[error("{0}")]
    Io(String),
}

fn join(h: &[Holder]) -> String {
    h.iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl BindError {
    pub fn errno(&self) -> &'static str {
        match self {
            BindError::NotFound { .. } | BindError::NotBound { .. } => "ENODEV",
            BindError::Hub { .. } | BindError::Vhci { .. } => "EINVAL",
            BindError::Busy { .. }
            | BindError::Imported { .. }
            | BindError::Releasing { .. }
            | BindError::KernelStub { .. } => "EBUSY",
            BindError::AlreadyExported { .. } => "EEXIST",
            BindError::Again { .. } => "EAGAIN",
            BindError::Io(_) => "EIO",
        }
    }
}

/// A binding's state as `usbip bind`/`list` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingStatus {
    pub busid: String,
    pub vendor: u16,
    pub product: u16,
    /// exported, imported or absent (unplugged).
    pub state: &'static str,
}

/// Puts back drivers that `USBDEVFS_CONNECT` did not re-probe.
pub(crate) fn restore_drivers(roots: &Roots, sys: &LocalDevice, claimed: &[(u8, Option<String>)]) {
    for (n, driver) in claimed {
        let Some(driver) = driver else { continue };
        if driver == "usbfs" {
            continue;
        }
        let name = sys.interface_name(*n);
        let dir = sys.syspath.join(&name);
        if driver_of(&dir).is_some() {
            continue;
        }
        let bind = roots.sys.join("bus/usb/drivers").join(driver).join("bind");
        match fs::write(&bind, &name) {
            Ok(()) => debug!("re-bound {name} to {driver}"),
            Err(e) => debug!("binding {name} to {driver}: {e}"),
        }
    }
}

/// The device `busid` names, if it is one this daemon may export: not a
/// hub, not itself imported through vhci, not exported by the kernel's stub.
fn exportable(roots: &Roots, busid: &str) -> Result<LocalDevice, BindError> {
    let not_found = || BindError::NotFound {
        busid: busid.to_string(),
    };
    if busid.is_empty() || busid.contains('/') || busid.contains("..") {
        return Err(not_found());
    }
    let sys = roots.local_device(busid).map_err(|_| not_found())?;
    match sys.not_exportable() {
        Some(NotExportable::Hub) => {
            return Err(BindError::Hub {
                busid: busid.into(),
            })
        }
        Some(NotExportable::Imported) => {
            return Err(BindError::Vhci {
                busid: busid.into(),
            })
        }
        None => {}
    }
    if sys.is_kernel_exported() {
        return Err(BindError::KernelStub {
            busid: busid.into(),
        });
    }
    Ok(sys)
}

/// Who else uses the device: refused if anyone `--force` may not override,
/// or anyone at all without `force`. Returns the warnings for what `force`
/// overrode.
fn busy_check(
    roots: &Roots,
    sys: &LocalDevice,
    busid: &str,
    force: bool,
) -> Result<Vec<String>, BindError> {
    let holders = busy::check(roots, sys);
    let (forcible, hard): (Vec<Holder>, Vec<Holder>) =
        holders.into_iter().partition(|h| h.forcible());
    if !hard.is_empty() {
        let mut all = hard;
        all.extend(forcible);
        return Err(BindError::Busy {
            busid: busid.into(),
            holders: all,
            forcible: false,
        });
    }
    if !forcible.is_empty() && !force {
        return Err(BindError::Busy {
            busid: busid.into(),
            holders: forcible,
            forcible: true,
        });
    }
    let warnings = forcible
        .iter()
        .map(|h| format!("--force: binding {busid} although {h}"))
        .inspect(|w| warn!("{w}"))
        .collect();
    Ok(warnings)
}

/// A device bound to the kernel's stub that the export table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KernelExport {
    busnum: u32,
    devnum: u32,
    vendor: u16,
    product: u16,
}

impl KernelExport {
    fn of(dev: &LocalDevice) -> KernelExport {
        KernelExport {
            busnum: dev.busnum,
            devnum: dev.devnum,
            vendor: dev.id_vendor,
            product: dev.id_product,
        }
    }
}

struct Inner {
    state: State,
    /// Exported bus ids and the (busnum, devnum) the backend opened.
    exported: HashMap<String, (u32, u32)>,
    /// Devices bound to the kernel's stub (by us or by the C tool) that
    /// are exported: the kernel keeps that binding, so it is not in the
    /// state file.
    kernel: HashMap<String, KernelExport>,
    /// Last hotplug error per bus id, so each is logged once.
    last_error: HashMap<String, String>,
}

/// Owns the bindings: binds and unbinds, persists them, follows hotplug.
pub struct Manager {
    roots: Roots,
    exports: Box<dyn ExportTable>,
    state_path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl Manager {
    /// A manager that exports what it binds into `exports`. The state
    /// file is read now; a missing file is an empty state.
    pub fn new(
        roots: Roots,
        exports: impl ExportTable,
        state_path: Option<PathBuf>,
    ) -> std::io::Result<Manager> {
        let state = match &state_path {
            Some(p) => State::load(p)?,
            None => State::default(),
        };
        Ok(Manager {
            roots,
            exports: Box::new(exports),
            state_path,
            inner: Mutex::new(Inner {
                state,
                exported: HashMap::new(),
                kernel: HashMap::new(),
                last_error: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, inner: &Inner) {
        if let Some(p) = &self.state_path {
            if let Err(e) = inner.state.save(p) {
                warn!("cannot write the state file {}: {e}", p.display());
            }
        }
    }

    /// Binds `busid`: busy checks, claim through usbfs, export. Returns the
    /// warnings (what `force` overrode).
    pub fn bind(&self, busid: &str, force: bool) -> Result<Vec<String>, BindError> {
        let mut inner = self.lock();
        let (warnings, binding) = self.bind_locked(&mut inner, busid, force)?;
        inner.state.upsert(binding);
        self.save(&inner);
        Ok(warnings)
    }

    /// Binds `busid` with the manager's lock held: the checks that need
    /// no claim, then a reservation (so that nothing else exports it
    /// meanwhile), the busy checks, the claim, and the export.
    fn bind_locked(
        &self,
        inner: &mut Inner,
        busid: &str,
        force: bool,
    ) -> Result<(Vec<String>, Binding), BindError> {
        let sys = exportable(&self.roots, busid)?;
        let reservation = self.reserve(busid)?;
        let warnings = busy_check(&self.roots, &sys, busid, force)?;
        let backend = UsbfsBackend::claim(&self.roots, sys.clone())
            .map_err(|e| BindError::Io(format!("{busid}: {e}")))?;
        let binding = Binding {
            busid: busid.to_string(),
            vendor: sys.id_vendor,
            product: sys.id_product,
            serial: sys.serial.clone(),
            drivers: backend.original_drivers().to_vec(),
        };
        let mut info = sys.device_info();
        info.busid = busid.into();
        reservation.commit(info, Box::new(backend));
        inner
            .exported
            .insert(busid.to_string(), (sys.busnum, sys.devnum));
        inner.last_error.remove(busid);
        info!(
            "bound {busid} ({:04x}:{:04x}) and exported it",
            sys.id_vendor, sys.id_product
        );
        Ok((warnings, binding))
    }

    /// Binds `busid` to the kernel's stub (`usbip-host`) instead of
    /// claiming it through usbfs, with the same checks and busy
    /// protection, and exports it: imports then go to the stub. Returns
    /// the warnings (what `force` overrode).
    pub fn bind_kernel(&self, busid: &str, force: bool) -> Result<Vec<String>, BindError> {
        let mut inner = self.lock();
        let sys = match exportable(&self.roots, busid) {
            Err(BindError::KernelStub { .. }) => {
                return Err(BindError::AlreadyExported {
                    busid: busid.into(),
                })
            }
            r => r?,
        };
        let reservation = self.reserve(busid)?;
        let warnings = busy_check(&self.roots, &sys, busid, force)?;
        stub::bind(&self.roots, &sys).map_err(|e| BindError::Io(format!("{busid}: {e}")))?;
        let dev = self
            .roots
            .local_device(busid)
            .map_err(|e| BindError::Io(format!("{busid}: {e}")))?;
        if dev.driver.as_deref() != Some(STUB_DRIVER) {
            let _ = stub::unbind(&self.roots, busid);
            return Err(BindError::Io(format!(
                "{busid}: the kernel's {STUB_DRIVER} did not take the device (it has {}); \
                 see the kernel log",
                dev.driver.as_deref().unwrap_or("no driver")
            )));
        }
        let mut info = dev.device_info();
        info.busid = busid.into();
        reservation.commit(info, Box::new(kernel_stub_backend(&dev)));
        inner
            .kernel
            .insert(busid.to_string(), KernelExport::of(&dev));
        inner.last_error.remove(busid);
        info!(
            "bound {busid} ({:04x}:{:04x}) to the kernel's {STUB_DRIVER} and exported it",
            dev.id_vendor, dev.id_product
        );
        Ok(warnings)
    }

    /// Exports every device the kernel's stub holds that is not exported
    /// yet, and stops exporting those it no longer holds (unbound, or
    /// unplugged and replaced): an import of such a device is over, so it
    /// is ended, as the stub ended its connection.
    fn follow_kernel_stub(&self, inner: &mut Inner) {
        let devices = match self.roots.local_devices() {
            Ok(d) => d,
            Err(e) => {
                debug!("cannot look for devices bound to {STUB_DRIVER}: {e}");
                return;
            }
        };
        // A device whose `devnum` read as missing (0: no addressed device
        // has it) was caught mid-change, e.g. while the stub resets it
        // after a connection: its record would carry a devid the stub
        // refuses ("recv invalid request"). It is left as it was until a
        // later pass reads it whole.
        let (on_stub, unsettled): (HashMap<String, LocalDevice>, Vec<String>) = {
            let mut unsettled = Vec::new();
            let on_stub = devices
                .into_iter()
                .filter(|d| d.driver.as_deref() == Some(STUB_DRIVER) && d.is_exportable())
                .filter(|d| {
                    if d.devnum == 0 {
                        debug!("{}: its devnum did not read; looking again later", d.busid);
                        unsettled.push(d.busid.clone());
                    }
                    d.devnum != 0
                })
                .map(|d| (d.busid.clone(), d))
                .collect();
            (on_stub, unsettled)
        };
        let known: Vec<(String, KernelExport)> =
            inner.kernel.iter().map(|(b, k)| (b.clone(), *k)).collect();
        for (busid, k) in known {
            let same = on_stub
                .get(&busid)
                .is_some_and(|d| d.busnum == k.busnum && d.devnum == k.devnum);
            if same || unsettled.contains(&busid) {
                continue;
            }
            match self.exports.remove_when_free(&busid, true) {
                Ok(_) | Err(ExportRefusal::NotExported { .. }) => {
                    inner.kernel.remove(&busid);
                    info!("{busid} left the kernel's {STUB_DRIVER}; it is no longer exported");
                }
                Err(e) => warn!("{busid} left the kernel's {STUB_DRIVER}, but stays exported: {e}"),
            }
        }
        for (busid, dev) in on_stub {
            if inner.kernel.contains_key(&busid) {
                continue;
            }
            let reservation = match self.exports.reserve(&busid) {
                Ok(r) => r,
                Err(e) => {
                    let msg = e.to_string();
                    if inner.last_error.get(&busid) != Some(&msg) {
                        warn!("cannot export {busid}, bound to {STUB_DRIVER}: {msg}");
                        inner.last_error.insert(busid.clone(), msg);
                    }
                    continue;
                }
            };
            let mut info = dev.device_info();
            info.busid = busid.as_str().into();
            reservation.commit(info, Box::new(kernel_stub_backend(&dev)));
            inner.kernel.insert(busid.clone(), KernelExport::of(&dev));
            inner.last_error.remove(&busid);
            info!(
                "{busid} ({:04x}:{:04x}) is bound to the kernel's {STUB_DRIVER}: exported, \
                 its imports go to the kernel's stub",
                dev.id_vendor, dev.id_product
            );
        }
    }

    /// Holds `busid` in the export table for the device about to be claimed.
    fn reserve(&self, busid: &str) -> Result<Box<dyn ExportReservation>, BindError> {
        self.exports.reserve(busid).map_err(|e| match e {
            ExportRefusal::Exported {
                client: Some(client),
                ..
            } => BindError::Imported {
                busid: busid.into(),
                client,
            },
            ExportRefusal::Exported { client: None, .. } => BindError::AlreadyExported {
                busid: busid.into(),
            },
            ExportRefusal::Changing { .. } => BindError::Again {
                busid: busid.into(),
            },
            e => BindError::Io(e.to_string()),
        })
    }

    /// Unbinds `busid`: stops exporting it, releases its interfaces and
    /// lets the original drivers bind again. An import that is ending (its
    /// client detached) is waited for; an active one is refused, or with
    /// `force` ended first. Returns the warnings (what `force` ended).
    pub fn unbind(&self, busid: &str, force: bool) -> Result<Vec<String>, BindError> {
        // Waits without the manager's lock: binds and hotplug go on meanwhile.
        let removed = self.exports.remove_when_free(busid, force);
        let mut inner = self.lock();
        let mut warnings = Vec::new();
        let on_stub = self
            .roots
            .local_device(busid)
            .is_ok_and(|d| d.driver.as_deref() == Some(STUB_DRIVER));
        match removed {
            Ok(removed) => {
                if let Some(client) = removed.forced {
                    let w = format!("--force: ended the import of {busid} by {client}");
                    warn!("{w}");
                    warnings.push(w);
                }
                drop(removed.backend);
                inner.exported.remove(busid);
            }
            Err(ExportRefusal::Imported { client, .. }) => {
                return Err(BindError::Imported {
                    busid: busid.into(),
                    client,
                })
            }
            Err(ExportRefusal::Releasing { client, .. }) => {
                return Err(BindError::Releasing {
                    busid: busid.into(),
                    client,
                })
            }
            Err(ExportRefusal::Changing { .. }) => {
                return Err(BindError::Again {
                    busid: busid.into(),
                })
            }
            Err(_) => {
                if inner.state.get(busid).is_none() && !on_stub {
                    return Err(BindError::NotBound {
                        busid: busid.into(),
                    });
                }
            }
        }
        inner.kernel.remove(busid);
        if on_stub {
            // Whoever bound it there (this manager or the C tool).
            stub::unbind(&self.roots, busid).map_err(|e| BindError::Io(format!("{busid}: {e}")))?;
            info!("gave {busid} back from the kernel's {STUB_DRIVER} to its driver");
        }
        inner.state.remove(busid);
        self.save(&inner);
        info!("unbound {busid}");
        Ok(warnings)
    }

    /// Every binding and its state.
    pub fn bindings(&self) -> Vec<BindingStatus> {
        let inner = self.lock();
        let mut all: Vec<BindingStatus> = inner
            .state
            .bindings
            .iter()
            .map(|b| {
                let state = match self.exports.is_imported(&b.busid) {
                    Some(true) => "imported",
                    Some(false) if inner.exported.contains_key(&b.busid) => "exported",
                    _ => "absent",
                };
                BindingStatus {
                    busid: b.busid.clone(),
                    vendor: b.vendor,
                    product: b.product,
                    state,
                }
            })
            .collect();
        for (busid, k) in &inner.kernel {
            let state = match self.exports.is_imported(busid) {
                Some(true) => "imported",
                _ => "exported",
            };
            all.push(BindingStatus {
                busid: busid.clone(),
                vendor: k.vendor,
                product: k.product,
                state,
            });
        }
        all
    }

    /// One hotplug pass: stop exporting bound devices that are gone (or
    /// were replaced), export bound devices that are (back) present, and
    /// follow the devices bound to the kernel's stub (a driver bind or
    /// unbind is a uevent of the device too).
    pub fn poll(&self) {
        let mut inner = self.lock();
        let bindings = inner.state.bindings.clone();
        for b in bindings {
            let sys = self.roots.local_device(&b.busid).ok();
            if let Some(&(busnum, devnum)) = inner.exported.get(&b.busid) {
                let same = sys
                    .as_ref()
                    .is_some_and(|s| s.busnum == busnum && s.devnum == devnum);
                if same {
                    continue;
                }
                match self.exports.remove(&b.busid) {
                    Ok(backend) => {
                        drop(backend);
                        inner.exported.remove(&b.busid);
                        info!("{} was unplugged; it is no longer exported", b.busid);
                    }
                    Err(ExportRefusal::NotExported { .. }) => {
                        inner.exported.remove(&b.busid);
                    }
                    // Imported: the session ends its URBs with -ENODEV; we
                    // take the device back once the importer lets go.
                    Err(_) => continue,
                }
            }
            let Some(sys) = sys else { continue };
            if sys.id_vendor != b.vendor || sys.id_product != b.product {
                continue;
            }
            if sys.active_configuration() == 0 {
                // Still enumerating.
                continue;
            }
            match self.bind_locked(&mut inner, &b.busid, false) {
                Ok(_) => info!("{} is present again and exported", b.busid),
                Err(e) => {
                    let msg = e.to_string();
                    if inner.last_error.get(&b.busid) != Some(&msg) {
                        warn!("cannot export bound device {}: {msg}", b.busid);
                        inner.last_error.insert(b.busid.clone(), msg);
                    }
                }
            }
        }
        self.follow_kernel_stub(&mut inner);
    }

    /// Follows hotplug until the task is aborted: a pass per kernel uevent
    /// about a USB device, or, where no uevents arrive, a pass every
    /// `poll_every` ([`crate::hotplug`]).
    pub fn spawn_hotplug(self: &Arc<Self>, poll_every: Duration) -> tokio::task::JoinHandle<()> {
        crate::hotplug::spawn(self.clone(), &self.roots, poll_every)
    }

    /// Gives every exported device back to its kernel drivers, keeping the
    /// bindings in the state file for the next start. Devices bound to the
    /// kernel's stub stay there, as the C usbipd leaves them.
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        let kernel: Vec<String> = inner.kernel.drain().map(|(b, _)| b).collect();
        for busid in kernel {
            if let Err(e) = self.exports.remove(&busid) {
                debug!("{busid} stays in the export table at shutdown: {e}");
            }
        }
        let ids: Vec<String> = inner.exported.keys().cloned().collect();
        for busid in ids {
            match self.exports.remove(&busid) {
                Ok(b) => {
                    drop(b);
                    info!("released {busid}");
                }
                Err(e) => warn!("cannot release {busid}: {e}"),
            }
            inner.exported.remove(&busid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Unexported;
    use usbwire_proto::DeviceInfo;
    use usbwire_usb::Backend;

    /// An export table that refuses reservations as told, and records
    /// what happened to the ones it granted.
    #[derive(Default)]
    struct Table {
        refusal: Mutex<Option<ExportRefusal>>,
        events: Arc<Mutex<Vec<&'static str>>>,
    }

    struct Held(Arc<Mutex<Vec<&'static str>>>, bool);

    impl ExportReservation for Held {
        fn commit(mut self: Box<Self>, _: DeviceInfo, _: Box<dyn Backend>) {
            self.1 = true;
            self.0.lock().unwrap().push("committed");
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            if !self.1 {
                self.0.lock().unwrap().push("given back");
            }
        }
    }

    impl ExportTable for Arc<Table> {
        fn reserve(&self, _: &str) -> Result<Box<dyn ExportReservation>, ExportRefusal> {
            if let Some(e) = self.refusal.lock().unwrap().clone() {
                return Err(e);
            }
            self.events.lock().unwrap().push("reserved");
            Ok(Box::new(Held(self.events.clone(), false)))
        }
        fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, ExportRefusal> {
            Err(ExportRefusal::NotExported {
                busid: busid.into(),
            })
        }
        fn remove_when_free(&self, busid: &str, _: bool) -> Result<Unexported, ExportRefusal> {
            Err(ExportRefusal::NotExported {
                busid: busid.into(),
            })
        }
        fn is_imported(&self, _: &str) -> Option<bool> {
            None
        }
    }

    /// A fake sysfs with device 1-1 (a vendor-class device, no driver) and
    /// no device node, so that claiming it fails.
    fn tree() -> (tempfile::TempDir, Roots) {
        use crate::sysfs::fake;
        let t = tempfile::tempdir().unwrap();
        let roots = Roots::under(t.path());
        let dev = fake::device(
            t.path(),
            &fake::FakeDevice {
                devpath: "pci0000:00/usb1/1-1",
                driver: None,
                ..Default::default()
            },
        );
        fake::interface(t.path(), &dev, 1, 0, (0xff, 0xff, 0xff), None);
        (t, roots)
    }

    #[test]
    fn refusals_of_the_export_table_become_bind_errors() {
        let (_t, roots) = tree();
        let table = Arc::new(Table::default());
        let m = Manager::new(roots, table.clone(), None).unwrap();
        let client: SocketAddr = "10.0.0.2:40986".parse().unwrap();
        let cases = [
            (
                ExportRefusal::Exported {
                    busid: "1-1".into(),
                    client: None,
                },
                "EEXIST",
            ),
            (
                ExportRefusal::Exported {
                    busid: "1-1".into(),
                    client: Some(client),
                },
                "EBUSY",
            ),
            (
                ExportRefusal::Changing {
                    busid: "1-1".into(),
                },
                "EAGAIN",
            ),
        ];
        for (refusal, errno) in cases {
            *table.refusal.lock().unwrap() = Some(refusal.clone());
            let e = m.bind("1-1", false).unwrap_err();
            assert_eq!(e.errno(), errno, "{refusal:?}: {e}");
        }
        assert!(m.bindings().is_empty(), "a refused bind is not recorded");
        assert_eq!(m.bind("9-9", false).unwrap_err().errno(), "ENODEV");
    }

    #[test]
    fn a_failed_claim_gives_the_reservation_back() {
        let (_t, roots) = tree();
        let table = Arc::new(Table::default());
        let m = Manager::new(roots, table.clone(), None).unwrap();
        let e = m.bind("1-1", false).unwrap_err();
        assert_eq!(e.errno(), "EIO", "{e}");
        assert_eq!(*table.events.lock().unwrap(), ["reserved", "given back"]);
        assert!(m.bindings().is_empty());
    }

    /// An export table that holds what it is given, as the registry does.
    #[derive(Default, Clone)]
    struct Holding(Arc<Mutex<HashMap<String, Box<dyn Backend>>>>);

    struct Slot(Holding, String);

    impl ExportReservation for Slot {
        fn commit(self: Box<Self>, _: DeviceInfo, backend: Box<dyn Backend>) {
            (self.0).0.lock().unwrap().insert(self.1.clone(), backend);
        }
    }

    impl ExportTable for Holding {
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
            self.0
                .lock()
                .unwrap()
                .remove(busid)
                .ok_or(ExportRefusal::NotExported {
                    busid: busid.into(),
                })
        }
        fn remove_when_free(&self, busid: &str, _: bool) -> Result<Unexported, ExportRefusal> {
            self.remove(busid).map(|backend| Unexported {
                backend,
                forced: None,
            })
        }
        fn is_imported(&self, busid: &str) -> Option<bool> {
            self.0.lock().unwrap().contains_key(busid).then_some(false)
        }
    }

    #[test]
    fn devices_bound_to_the_kernels_stub_are_exported_while_they_stay_there() {
        use crate::sysfs::fake;
        let t = tempfile::tempdir().unwrap();
        let roots = Roots::under(t.path());
        let dev = fake::device(
            t.path(),
            &fake::FakeDevice {
                devpath: "pci0000:00/usb1/1-1",
                driver: Some(STUB_DRIVER),
                ..Default::default()
            },
        );
        fake::interface(t.path(), &dev, 1, 0, (8, 6, 0x50), None);
        let table = Holding::default();
        let m = Manager::new(roots, table.clone(), None).unwrap();
        m.poll();
        {
            let mut held = table.0.lock().unwrap();
            let backend = held.get_mut("1-1").expect("exported at the first pass");
            let info = backend.device_info("1-1", 0, 0);
            assert_eq!((info.id_vendor, info.id_product), (0x1234, 0x5678));
            assert_eq!(info.interfaces.len(), 1);
            let handoff = backend.kernel_handoff().expect("imports go to the stub");
            assert_eq!(handoff.driver(), STUB_DRIVER);
        }
        assert_eq!(
            m.bindings(),
            vec![BindingStatus {
                busid: "1-1".into(),
                vendor: 0x1234,
                product: 0x5678,
                state: "exported"
            }]
        );
        // A second pass changes nothing.
        m.poll();
        assert_eq!(table.0.lock().unwrap().len(), 1);
        // A usbfs bind of it is refused: the stub has it.
        assert_eq!(m.bind("1-1", false).unwrap_err().errno(), "EBUSY");
        assert_eq!(m.bind_kernel("1-1", false).unwrap_err().errno(), "EEXIST");
        // Read mid-change (no devnum): neither withdrawn nor re-exported
        // with a record the stub would refuse.
        fs::remove_file(dev.join("devnum")).unwrap();
        m.poll();
        {
            let held = table.0.lock().unwrap();
            assert_eq!(held.get("1-1").unwrap().device_info("1-1", 0, 0).devnum, 2);
        }
        fs::write(dev.join("devnum"), "2\n").unwrap();
        // The stub lets go of it (the C `usbip unbind`): no longer exported.
        fs::remove_file(dev.join("driver")).unwrap();
        m.poll();
        assert!(table.0.lock().unwrap().is_empty());
        assert!(m.bindings().is_empty());
    }
}
