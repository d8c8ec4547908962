//! Handing an import's connection to a kernel driver through sysfs, as the
//! C usbipd does for usbip-host (`/sys/bus/usb/devices/BUSID/`) and
//! usbip-vudc (`/sys/devices/platform/usbip-vudc.N/`): both drivers have
//! the same two attributes in their device's directory.
//!
//! * `usbip_status`: the driver's `enum usbip_device_status` as a decimal
//!   number (1 available, 2 used, 3 error).
//! * `usbip_sockfd`: write-only; writing a descriptor number of the
//!   writing process (the C tool writes `"%d\n"`) makes the driver look it
//!   up (`sockfd_lookup`), keep its own reference to the socket, start its
//!   receive and transmit threads and set the status to used. The writer
//!   may close its descriptor afterwards. The driver shuts the socket down
//!   and goes back to available when the connection fails or ends.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use std::task::{Context, Poll};

use usbwire_proto::{DeviceInfo, Errno};
use usbwire_usb::{Backend, Completion, KernelHandoff, KernelState, TransferType, Urb};

/// The status attribute of a driver that takes USB/IP connections.
pub const STATUS_ATTR: &str = "usbip_status";
/// The attribute that takes a connection's descriptor number.
pub const SOCKFD_ATTR: &str = "usbip_sockfd";

/// The sysfs attributes of one device of a USB/IP kernel driver.
#[derive(Debug, Clone)]
pub struct SysfsHandoff {
    driver: String,
    dir: PathBuf,
}

impl SysfsHandoff {
    /// The device whose `usbip_status` and `usbip_sockfd` are in `dir`,
    /// run by `driver` (for the log).
    pub fn new(driver: impl Into<String>, dir: impl Into<PathBuf>) -> SysfsHandoff {
        SysfsHandoff {
            driver: driver.into(),
            dir: dir.into(),
        }
    }

    /// The device's sysfs directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn attr(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A device a kernel driver runs (the stub's device, a vudc's gadget), as
/// the export table holds it: its record, and the driver's attributes that
/// take an import's socket. usbipd never runs an URB for it.
pub struct KernelRunDevice {
    info: DeviceInfo,
    handoff: SysfsHandoff,
}

impl KernelRunDevice {
    pub fn new(info: DeviceInfo, handoff: SysfsHandoff) -> KernelRunDevice {
        KernelRunDevice { info, handoff }
    }

    /// The device's sysfs directory.
    pub fn dir(&self) -> &Path {
        self.handoff.dir()
    }
}

impl Backend for KernelRunDevice {
    fn device_info(&self, busid: &str, _busnum: u32, _devnum: u32) -> DeviceInfo {
        DeviceInfo {
            busid: busid.into(),
            ..self.info.clone()
        }
    }

    /// The kernel knows the endpoints; usbipd never sees an URB.
    fn transfer_type(&self, _ep_address: u8) -> Option<TransferType> {
        None
    }

    /// Never called: a device with a kernel handoff gets no URBs. Were
    /// one to come, ENODEV answers it rather than a hang.
    fn poll_urb(&mut self, _urb: &mut Urb, _cx: &mut Context<'_>) -> Poll<Completion> {
        Poll::Ready(Completion::failed(Errno::ENODEV))
    }

    /// The drivers reset the device themselves when a connection ends
    /// (the stub's `stub_device_reset`, vudc's `vudc_device_reset`).
    fn release(&mut self) {}

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn kernel_handoff(&mut self) -> Option<&mut dyn KernelHandoff> {
        Some(&mut self.handoff)
    }
}

impl KernelHandoff for SysfsHandoff {
    fn driver(&self) -> &str {
        &self.driver
    }

    fn state(&self) -> io::Result<KernelState> {
        let path = self.attr(STATUS_ATTR);
        let text = fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        KernelState::parse(&text)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    fn hand_over(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let path = self.attr(SOCKFD_ATTR);
        // One write of the whole number: sysfs hands each write(2) to the
        // driver's store function as it comes. No O_CREAT: the attribute
        // exists while the device is bound to the driver, and nothing
        // else may be written in its place.
        let mut attr = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        attr.write_all(format!("{}\n", socket.as_raw_fd()).as_bytes())
            .map_err(|e| {
                // The stub answers a status other than available with
                // EINVAL ("not ready"), and a descriptor that is not a
                // stream socket the same way.
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: the kernel's {} refused the connection: {e}",
                        path.display(),
                        self.driver
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn the_status_is_read_as_the_kernel_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let h = SysfsHandoff::new("usbip-host", dir.path());
        assert!(
            h.state().is_err(),
            "no attribute: the device left the driver"
        );
        for (text, state) in [
            ("1\n", KernelState::Available),
            ("2\n", KernelState::Used),
            ("3\n", KernelState::Unusable(3)),
        ] {
            fs::write(dir.path().join(STATUS_ATTR), text).unwrap();
            assert_eq!(h.state().unwrap(), state, "{text:?}");
        }
        fs::write(dir.path().join(STATUS_ATTR), "used\n").unwrap();
        let e = h.state().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains(STATUS_ATTR), "{e}");
    }

    #[test]
    fn hand_over_writes_the_descriptor_number_as_the_c_tool_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = SysfsHandoff::new("usbip-host", dir.path());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let socket = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // Not created in place of a missing attribute.
        let e = h.hand_over(socket.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!dir.path().join(SOCKFD_ATTR).exists());
        fs::write(dir.path().join(SOCKFD_ATTR), "").unwrap();
        h.hand_over(socket.as_fd()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join(SOCKFD_ATTR)).unwrap(),
            format!("{}\n", socket.as_raw_fd())
        );
    }
}
