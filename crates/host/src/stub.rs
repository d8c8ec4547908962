//! Devices bound to the kernel's `usbip-host` driver (the stub): the C
//! `usbip bind` puts them there, and the C usbipd exports them by handing
//! each import's socket to the stub. Ours does the same through
//! [`Backend::kernel_handoff`], so such a device is one more entry of the
//! same export table, with the same imports, access policy and refusals.
//!
//! Binding a device to the stub is what the C tool does
//! (`tools/usb/usbip/src/usbip_bind.c`, `usbip_unbind.c`): the bus id is
//! added to the stub's `match_busid` table, the device's current driver
//! lets go of it, and the stub's `bind` takes it; unbinding undoes that
//! and asks the stub to `rebind` the device to the driver it would have
//! had.

use std::fs;
use std::io;
use std::path::PathBuf;

use crate::handoff::{KernelRunDevice, SysfsHandoff};
use crate::sysfs::{driver_of, LocalDevice, Roots};

/// The kernel's stub driver.
pub const STUB_DRIVER: &str = "usbip-host";

/// Why a device could not be moved to or from the stub.
#[derive(Debug, thiserror::Error)]
pub enum StubError {
    #[error("the kernel's {STUB_DRIVER} driver is not loaded (no {}): modprobe usbip-host", .0.display())]
    NotLoaded(PathBuf),
    #[error("writing {value:?} to {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
}

fn write_attr(path: PathBuf, value: &str) -> Result<(), StubError> {
    fs::write(&path, value).map_err(|source| StubError::Write {
        path,
        value: value.to_string(),
        source,
    })
}

/// The stub driver's directory, if the module is loaded.
fn stub_dir(roots: &Roots) -> Result<PathBuf, StubError> {
    let dir = roots.sys.join("bus/usb/drivers").join(STUB_DRIVER);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(StubError::NotLoaded(dir))
    }
}

/// Moves `dev` from its driver to the stub. On failure the bus id leaves
/// the stub's table again and the device goes back to a driver of its
/// own (the stub's `rebind`).
pub fn bind(roots: &Roots, dev: &LocalDevice) -> Result<(), StubError> {
    let stub = stub_dir(roots)?;
    let busid = dev.busid.as_str();
    write_attr(stub.join("match_busid"), &format!("add {busid}"))?;
    let moved = (|| {
        if let Some(driver) = driver_of(&dev.syspath).filter(|d| d != STUB_DRIVER) {
            write_attr(
                roots
                    .sys
                    .join("bus/usb/drivers")
                    .join(driver)
                    .join("unbind"),
                busid,
            )?;
        }
        write_attr(stub.join("bind"), busid)
    })();
    if moved.is_err() {
        // rebind takes the bus id out of the table and probes the device
        // again, which gives it back to its usual driver.
        if write_attr(stub.join("rebind"), busid).is_err() {
            let _ = write_attr(stub.join("match_busid"), &format!("del {busid}"));
            let _ = write_attr(roots.sys.join("bus/usb/drivers_probe"), busid);
        }
    }
    moved
}

/// Takes `busid` from the stub and gives it back to the driver it would
/// have without the stub, as the C `usbip unbind` does: the stub lets go,
/// the bus id leaves its table, and `rebind` probes the device again.
/// Where the stub refuses the rebind (the bus id already left its table),
/// the bus's `drivers_probe` does the same.
pub fn unbind(roots: &Roots, busid: &str) -> Result<(), StubError> {
    let stub = stub_dir(roots)?;
    write_attr(stub.join("unbind"), busid)?;
    write_attr(stub.join("match_busid"), &format!("del {busid}"))?;
    if write_attr(stub.join("rebind"), busid).is_err() {
        write_attr(roots.sys.join("bus/usb/drivers_probe"), busid)?;
    }
    Ok(())
}

/// A device bound to the stub (`dev`, bound to [`STUB_DRIVER`]), as the
/// export table holds it: the stub runs its URBs.
pub fn kernel_stub_backend(dev: &LocalDevice) -> KernelRunDevice {
    KernelRunDevice::new(
        dev.device_info(),
        SysfsHandoff::new(STUB_DRIVER, dev.syspath.clone()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sysfs::fake;
    use usbwire_usb::Backend;

    fn tree(driver: Option<&str>) -> (tempfile::TempDir, Roots, LocalDevice) {
        let t = tempfile::tempdir().unwrap();
        let roots = Roots::under(t.path());
        fake::device(
            t.path(),
            &fake::FakeDevice {
                driver,
                ..Default::default()
            },
        );
        let dev = roots.local_device("1-1").unwrap();
        (t, roots, dev)
    }

    fn read(p: PathBuf) -> String {
        fs::read_to_string(p).unwrap()
    }

    #[test]
    fn bind_needs_the_stub_module() {
        let (_t, roots, dev) = tree(Some("usb"));
        let e = bind(&roots, &dev).unwrap_err();
        assert!(e.to_string().contains("modprobe usbip-host"), "{e}");
    }

    #[test]
    fn bind_and_unbind_write_what_the_c_tool_writes() {
        let (t, roots, dev) = tree(Some("usb"));
        let stub = t.path().join("sys/bus/usb/drivers/usbip-host");
        fs::create_dir_all(&stub).unwrap();
        bind(&roots, &dev).unwrap();
        assert_eq!(read(stub.join("match_busid")), "add 1-1");
        assert_eq!(read(t.path().join("sys/bus/usb/drivers/usb/unbind")), "1-1");
        assert_eq!(read(stub.join("bind")), "1-1");
        unbind(&roots, "1-1").unwrap();
        assert_eq!(read(stub.join("unbind")), "1-1");
        assert_eq!(read(stub.join("match_busid")), "del 1-1");
        assert_eq!(read(stub.join("rebind")), "1-1");
    }

    #[test]
    fn the_backend_hands_imports_to_the_devices_stub_attributes() {
        let (_t, _roots, dev) = tree(Some(STUB_DRIVER));
        let mut b = kernel_stub_backend(&dev);
        assert_eq!(b.device_info("1-1", 0, 0).id_vendor, 0x1234);
        assert_eq!(b.dir(), dev.syspath);
        let h = b.kernel_handoff().unwrap();
        assert_eq!(h.driver(), STUB_DRIVER);
        fs::write(dev.syspath.join("usbip_status"), "1\n").unwrap();
        assert_eq!(h.state().unwrap(), usbwire_usb::KernelState::Available);
    }
}
