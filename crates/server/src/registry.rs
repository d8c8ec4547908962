//! The one namespace of exported devices.
//!
//! Every exported device, emulated or real, has exactly one slot here, named
//! by its bus id. A slot is reserved before it is filled, so that two
//! exporters racing for one name get a clean EEXIST rather than two
//! half-made devices, and an operation on a slot that is still changing gets
//! a clean EAGAIN. Importing moves the backend out of the slot into the
//! importing session, so no lock is held while URBs run; releasing moves it
//! back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use usbwire_proto::{BusId, DeviceInfo, Errno, OpStatus};

use crate::backend::Backend;

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("bus id {0} is already exported (EEXIST)")]
    Exists(String),
    #[error("bus id {0} is changing state right now; try again (EAGAIN)")]
    Busy(String),
    #[error("no exported device has bus id {0} (ENODEV)")]
    NotFound(String),
    #[error("device {0} is imported by a client (EBUSY)")]
    InUse(String),
    #[error("invalid bus id {0:?}: use the form BUS-PORT[.PORT...], at most 31 bytes")]
    BadBusid(String),
}

impl RegistryError {
    pub fn errno(&self) -> Errno {
        match self {
            RegistryError::Exists(_) => Errno::EEXIST,
            RegistryError::Busy(_) => Errno::EAGAIN,
            RegistryError::NotFound(_) => Errno::ENODEV,
            RegistryError::InUse(_) => Errno::EBUSY,
            RegistryError::BadBusid(_) => Errno::EINVAL,
        }
    }

    /// The OP_REP_IMPORT status that tells an importer the same thing.
    pub fn op_status(&self) -> OpStatus {
        match self {
            RegistryError::NotFound(_) | RegistryError::BadBusid(_) => OpStatus::NoDev,
            RegistryError::InUse(_) | RegistryError::Busy(_) => OpStatus::DevBusy,
            RegistryError::Exists(_) => OpStatus::Error,
        }
    }
}

enum SlotState {
    /// Reserved, not yet filled (or being removed).
    Transitional,
    Available(Box<dyn Backend>),
    Imported {
        conn: u64,
    },
}

struct Slot {
    info: DeviceInfo,
    state: SlotState,
}

/// Shared handle to the registry.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<String, Slot>>>,
}

/// A reserved name. Dropping it without [`Reservation::commit`] frees the name.
pub struct Reservation {
    registry: Registry,
    busid: String,
    done: bool,
}

impl Reservation {
    pub fn busid(&self) -> &str {
        &self.busid
    }

    /// Fills the slot: the device becomes visible and importable.
    pub fn commit(mut self, info: DeviceInfo, backend: Box<dyn Backend>) {
        let mut map = self.registry.lock();
        if let Some(slot) = map.get_mut(&self.busid) {
            slot.info = info;
            slot.state = SlotState::Available(backend);
        }
        self.done = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let mut map = self.registry.lock();
            if matches!(
                map.get(&self.busid),
                Some(Slot {
                    state: SlotState::Transitional,
                    ..
                })
            ) {
                map.remove(&self.busid);
            }
        }
    }
}

/// Checks the `BUS-PORT[.PORT]` shape that vhci and the C tools expect.
pub fn valid_busid(busid: &str) -> bool {
    let Some((bus, ports)) = busid.split_once('-') else {
        return false;
    };
    busid.len() < usbwire_proto::op::BUSID_LEN
        && !bus.is_empty()
        && bus.bytes().all(|b| b.is_ascii_digit())
        && !ports.is_empty()
        && ports
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding this lock cannot leave a slot half-written
        // (every update is a single assignment), so a poisoned lock is safe
        // to keep using.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a bus id.
    pub fn reserve(&self, busid: &str) -> Result<Reservation, RegistryError> {
        if !valid_busid(busid) {
            return Err(RegistryError::BadBusid(busid.to_string()));
        }
        let mut map = self.lock();
        if let Some(slot) = map.get(busid) {
            return Err(match slot.state {
                SlotState::Transitional => RegistryError::Busy(busid.to_string()),
                _ => RegistryError::Exists(busid.to_string()),
            });
        }
        map.insert(
            busid.to_string(),
            Slot {
                info: placeholder_info(busid),
                state: SlotState::Transitional,
            },
        );
        Ok(Reservation {
            registry: self.clone(),
            busid: busid.to_string(),
            done: false,
        })
    }

    /// Reserves and fills in one step.
    pub fn add(&self, info: DeviceInfo, backend: Box<dyn Backend>) -> Result<(), RegistryError> {
        // A name that is not UTF-8 is not a valid bus id either: its
        // replacement characters fail the check.
        let r = self.reserve(&info.busid.to_string())?;
        r.commit(info, backend);
        Ok(())
    }

    /// Removes an available device and returns its backend.
    pub fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, RegistryError> {
        let mut map = self.lock();
        let slot = map
            .get(busid)
            .ok_or_else(|| RegistryError::NotFound(busid.to_string()))?;
        match slot.state {
            SlotState::Transitional => return Err(RegistryError::Busy(busid.to_string())),
            SlotState::Imported { .. } => return Err(RegistryError::InUse(busid.to_string())),
            SlotState::Available(_) => {}
        }
        match map.remove(busid).map(|s| s.state) {
            Some(SlotState::Available(b)) => Ok(b),
            _ => unreachable!("checked above under the same lock"),
        }
    }

    /// Takes a device for an importing connection. The bus id is compared
    /// byte for byte: exported names are ASCII (`valid_busid`), so one that
    /// is not UTF-8 names none of them.
    pub fn import(
        &self,
        busid: &BusId,
        conn: u64,
    ) -> Result<(DeviceInfo, Box<dyn Backend>), RegistryError> {
        let mut map = self.lock();
        let slot = busid
            .as_str()
            .and_then(|name| map.get_mut(name))
            .ok_or_else(|| RegistryError::NotFound(busid.to_string()))?;
        match std::mem::replace(&mut slot.state, SlotState::Imported { conn }) {
            SlotState::Available(b) => Ok((slot.info.clone(), b)),
            other => {
                let err = match &other {
                    SlotState::Transitional => RegistryError::Busy(busid.to_string()),
                    _ => RegistryError::InUse(busid.to_string()),
                };
                slot.state = other;
                Err(err)
            }
        }
    }

    /// Gives a device back after its importing connection ended.
    pub fn release(&self, busid: &str, conn: u64, backend: Box<dyn Backend>) {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(busid) {
            if matches!(slot.state, SlotState::Imported { conn: c } if c == conn) {
                slot.state = SlotState::Available(backend);
            }
        }
    }

    /// Devices that can be imported now, in bus id order. Imported devices
    /// are left out, as the C usbipd does.
    pub fn devlist(&self) -> Vec<DeviceInfo> {
        self.lock()
            .values()
            .filter(|s| matches!(s.state, SlotState::Available(_)))
            .map(|s| s.info.clone())
            .collect()
    }

    /// Every committed device and whether it is imported.
    pub fn all(&self) -> Vec<(DeviceInfo, bool)> {
        self.lock()
            .values()
            .filter(|s| !matches!(s.state, SlotState::Transitional))
            .map(|s| {
                (
                    s.info.clone(),
                    matches!(s.state, SlotState::Imported { .. }),
                )
            })
            .collect()
    }

    /// Takes every available backend out (for a clean shutdown's flush).
    pub fn drain_available(&self) -> Vec<(String, Box<dyn Backend>)> {
        let mut map = self.lock();
        let mut out = Vec::new();
        for (busid, slot) in map.iter_mut() {
            if matches!(slot.state, SlotState::Available(_)) {
                if let SlotState::Available(b) =
                    std::mem::replace(&mut slot.state, SlotState::Transitional)
                {
                    out.push((busid.clone(), b));
                }
            }
        }
        out
    }
}

fn placeholder_info(busid: &str) -> DeviceInfo {
    DeviceInfo {
        path: Default::default(),
        busid: busid.into(),
        busnum: 0,
        devnum: 0,
        speed: usbwire_proto::Speed::Unknown,
        id_vendor: 0,
        id_product: 0,
        bcd_device: 0,
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 0,
        num_configurations: 0,
        num_interfaces: 0,
        interfaces: Vec::new(),
    }
}

impl Registry {
    /// Puts back a backend taken by [`Registry::drain_available`].
    pub fn restore(&self, busid: &str, backend: Box<dyn Backend>) {
        let mut map = self.lock();
        if let Some(slot) = map.get_mut(busid) {
            if matches!(slot.state, SlotState::Transitional) {
                slot.state = SlotState::Available(backend);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use usbwire_devices::testdev::TestDevice;
    use usbwire_devices::EmulatedDevice;

    use super::*;
    use crate::backend::EmulatedBackend;

    #[test]
    fn import_matches_the_bus_id_byte_for_byte() {
        let registry = Registry::new();
        let backend = EmulatedBackend::new(EmulatedDevice::new(TestDevice::new()));
        registry
            .add(backend.device_info("1-1", 1, 2), Box::new(backend))
            .unwrap();
        // What lossy UTF-8 made of these could have named another device;
        // as bytes, none names 1-1.
        for odd in [&b"1-1\xff"[..], b"1-1 ", &[0xff; 32]] {
            match registry.import(&BusId::from_field(odd), 7) {
                Err(e) => assert_eq!(e.op_status(), OpStatus::NoDev, "{odd:x?}"),
                Ok(_) => panic!("{odd:x?} imported 1-1"),
            }
        }
        let (info, _backend) = registry
            .import(&BusId::from_field(b"1-1\0after the NUL"), 7)
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(info.busid, "1-1");
    }
}
