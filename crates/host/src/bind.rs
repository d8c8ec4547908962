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
    #[error("{busid} is exported by the kernel's usbip-host; run the C `usbip unbind` first")]
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

struct Inner {
    state: State,
    /// Exported bus ids and the (busnum, devnum) the backend opened.
    exported: HashMap<String, (u32, u32)>,
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
                if inner.state.get(busid).is_none() {
                    return Err(BindError::NotBound {
                        busid: busid.into(),
                    });
                }
            }
        }
        inner.state.remove(busid);
        self.save(&inner);
        info!("unbound {busid}");
        Ok(warnings)
    }

    /// Every binding and its state.
    pub fn bindings(&self) -> Vec<BindingStatus> {
        let inner = self.lock();
        inner
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
            .collect()
    }

    /// One hotplug pass: stop exporting bound devices that are gone (or
    /// were replaced), export bound devices that are (back) present.
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
    }

    /// Follows hotplug until the task is aborted: a pass per kernel uevent
    /// about a USB device, or, where no uevents arrive, a pass every
    /// `poll_every` ([`crate::hotplug`]).
    pub fn spawn_hotplug(self: &Arc<Self>, poll_every: Duration) -> tokio::task::JoinHandle<()> {
        crate::hotplug::spawn(self.clone(), &self.roots, poll_every)
    }

    /// Gives every exported device back to its kernel drivers, keeping the
    /// bindings in the state file for the next start.
    pub fn shutdown(&self) {
        let mut inner = self.lock();
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
}
