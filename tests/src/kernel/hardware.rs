//! qemu-emulated USB hardware for a guest: one `qemu-xhci` controller and the
//! `usb-*` devices a test asks for with [`Guest::xhci`](super::Guest::xhci),
//! each with its backend (a disk image, a WAV file, a byte stream to the host).
//!
//! The devices are real to the guest: its `xhci_hcd` enumerates them, and
//! `/init` waits until every one is configured and its class driver loaded
//! before the test script starts (see `usbwire_xhci_settle` in init.sh).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::HarnessError;

/// What backs a device on the host side.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// A raw disk image (`-drive if=none,format=raw`).
    Drive { image: PathBuf, read_only: bool },
    /// qemu's `wav` audio backend: what the device plays is written to `path`.
    AudioWav { path: PathBuf },
    /// A `socket` chardev on one end of a socket pair; the host keeps the other
    /// end ([`RunningGuest::usb_stream`](super::RunningGuest::usb_stream)).
    Stream,
}

/// One `-device usb-*` on the guest's xHCI controller.
#[derive(Debug, Clone)]
pub struct UsbDevice {
    pub(crate) driver: String,
    pub(crate) id: Option<String>,
    pub(crate) props: Vec<(String, String)>,
    pub(crate) backend: Option<Backend>,
    pub(crate) backend_props: Vec<(String, String)>,
}

impl UsbDevice {
    /// Any qemu USB device (`qemu-system-x86_64 -device help`) without a backend,
    /// e.g. `usb-mouse`; add properties with [`UsbDevice::prop`].
    pub fn new(driver: &str) -> UsbDevice {
        UsbDevice {
            driver: driver.to_string(),
            id: None,
            props: Vec::new(),
            backend: None,
            backend_props: Vec::new(),
        }
    }

    /// `usb-kbd`, a full-speed HID boot keyboard; type on it with
    /// [`RunningGuest::send_keys`](super::RunningGuest::send_keys).
    pub fn keyboard() -> UsbDevice {
        UsbDevice::new("usb-kbd")
    }

    /// `usb-tablet`, a full-speed HID pointer with absolute coordinates.
    pub fn tablet() -> UsbDevice {
        UsbDevice::new("usb-tablet")
    }

    /// `usb-serial`, an FTDI FT232 (0403:6001; the guest's `ftdi_sio` drives it),
    /// whose data goes both ways through a byte stream the host holds:
    /// [`RunningGuest::usb_stream`](super::RunningGuest::usb_stream).
    pub fn serial() -> UsbDevice {
        UsbDevice {
            backend: Some(Backend::Stream),
            ..UsbDevice::new("usb-serial")
        }
    }

    /// `usb-storage` (Bulk-Only) with `image` as a raw disk. On qemu-xhci it
    /// connects at SuperSpeed (qemu's device has SuperSpeed descriptors and
    /// picks the fastest speed the port offers).
    pub fn storage(image: &Path) -> UsbDevice {
        UsbDevice {
            backend: Some(Backend::Drive {
                image: image.to_path_buf(),
                read_only: false,
            }),
            ..UsbDevice::new("usb-storage")
        }
    }

    /// `usb-uas` (USB Attached SCSI, with Bulk-Only as alternate setting 0) with
    /// `image` as a raw disk on LUN 0 (`scsi-hd`). SuperSpeed on qemu-xhci.
    pub fn uas(image: &Path) -> UsbDevice {
        UsbDevice {
            backend: Some(Backend::Drive {
                image: image.to_path_buf(),
                read_only: false,
            }),
            ..UsbDevice::new("usb-uas")
        }
    }

    /// `usb-audio` (USB Audio Class 1, isochronous OUT) recording what the guest
    /// plays into the WAV file `wav` (written by qemu; complete once qemu exited).
    pub fn audio_wav(wav: &Path) -> UsbDevice {
        UsbDevice {
            backend: Some(Backend::AudioWav {
                path: wav.to_path_buf(),
            }),
            ..UsbDevice::new("usb-audio")
        }
    }

    /// The qdev id (default `usb<index>`); names the device for
    /// [`RunningGuest::usb_stream`](super::RunningGuest::usb_stream).
    pub fn id(mut self, id: &str) -> UsbDevice {
        self.id = Some(id.to_string());
        self
    }

    /// A qemu property of the device (`-device DRIVER,KEY=VALUE`), e.g.
    /// `("serial", "USBWIRE1")`, `("port", "2")`, `("pcap", "/tmp/x.pcap")`.
    pub fn prop(mut self, key: &str, value: &str) -> UsbDevice {
        self.props.push((key.to_string(), value.to_string()));
        self
    }

    /// An option of the backend (`-audiodev`, `-drive` or `-chardev`), e.g.
    /// `("out.frequency", "48000")` or `("timer-period", "1000")` for
    /// [`UsbDevice::audio_wav`], `("cache", "unsafe")` for a drive.
    pub fn backend_prop(mut self, key: &str, value: &str) -> UsbDevice {
        self.backend_props
            .push((key.to_string(), value.to_string()));
        self
    }

    /// A drive backend opened read-only by qemu (storage and uas only).
    pub fn read_only(mut self) -> UsbDevice {
        if let Some(Backend::Drive { read_only, .. }) = &mut self.backend {
            *read_only = true;
        }
        self
    }
}

/// A value inside a qemu option list: commas are doubled, qemu's escape.
fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

fn opt_path(p: &Path) -> Result<String, HarnessError> {
    let s = p.to_str().ok_or_else(|| {
        HarnessError::Config(format!("backend path {} is not UTF-8", p.display()))
    })?;
    if !p.is_absolute() {
        return Err(HarnessError::Config(format!(
            "backend path {s:?} must be absolute (qemu runs in the run dir)"
        )));
    }
    Ok(opt_value(s))
}

/// The qemu arguments for the controller and `devices`, and the host ends of
/// the stream backends (device id -> stream). `fds` collects the qemu ends,
/// which must survive `exec` in qemu alone.
pub(crate) struct QemuUsb {
    pub args: Vec<String>,
    pub streams: Vec<(String, UnixStream)>,
    pub qemu_ends: Vec<UnixStream>,
}

/// Root ports of the controller (each both USB 2 and USB 3): qemu's default of 4
/// makes it chain a hub in front of the fourth device when there are more.
pub const MAX_DEVICES: usize = 8;

pub(crate) fn qemu_args(devices: &[UsbDevice]) -> Result<QemuUsb, HarnessError> {
    use std::os::fd::AsRawFd;
    if devices.len() > MAX_DEVICES {
        return Err(HarnessError::Config(format!(
            "{} USB devices; the xHCI controller has {MAX_DEVICES} root ports",
            devices.len()
        )));
    }
    let mut out = QemuUsb {
        args: vec![
            "-device".into(),
            format!("qemu-xhci,id=xhci,p2={MAX_DEVICES},p3={MAX_DEVICES}"),
        ],
        streams: Vec::new(),
        qemu_ends: Vec::new(),
    };
    let mut ids = std::collections::HashSet::new();
    for (n, d) in devices.iter().enumerate() {
        if !d.driver.starts_with("usb-") {
            return Err(HarnessError::Config(format!(
                "{:?} is not a qemu USB device (usb-*)",
                d.driver
            )));
        }
        let id = d.id.clone().unwrap_or_else(|| format!("usb{n}"));
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(HarnessError::Config(format!("bad USB device id {id:?}")));
        }
        if !ids.insert(id.clone()) {
            return Err(HarnessError::Config(format!(
                "USB device id {id:?} used twice"
            )));
        }
        if d.backend.is_none() && !d.backend_props.is_empty() {
            return Err(HarnessError::Config(format!(
                "USB device {id} has backend options but no backend"
            )));
        }
        let backend_opts: String = d
            .backend_props
            .iter()
            .map(|(k, v)| format!(",{}={}", opt_value(k), opt_value(v)))
            .collect();
        let mut dev = format!("{},id={id},bus=xhci.0", d.driver);
        let mut after = None;
        match &d.backend {
            None => {}
            Some(Backend::Drive { image, read_only }) => {
                let drive = format!("{id}-drive");
                out.args.push("-drive".into());
                out.args.push(format!(
                    "if=none,id={drive},format=raw,file={}{}{backend_opts}",
                    opt_path(image)?,
                    if *read_only { ",readonly=on" } else { "" }
                ));
                if d.driver == "usb-uas" {
                    // UAS is a SCSI bus: the disk is a scsi-hd on it.
                    after = Some(format!("scsi-hd,bus={id}.0,scsi-id=0,lun=0,drive={drive}"));
                } else {
                    dev.push_str(&format!(",drive={drive}"));
                }
            }
            Some(Backend::AudioWav { path }) => {
                let aud = format!("{id}-audio");
                out.args.push("-audiodev".into());
                out.args.push(format!(
                    "wav,id={aud},path={}{backend_opts}",
                    opt_path(path)?
                ));
                dev.push_str(&format!(",audiodev={aud}"));
            }
            Some(Backend::Stream) => {
                let (ours, theirs) = UnixStream::pair().map_err(|e| HarnessError::Io {
                    context: format!("creating the socket pair of USB device {id}"),
                    source: e,
                })?;
                let chr = format!("{id}-chr");
                out.args.push("-chardev".into());
                out.args.push(format!(
                    "socket,id={chr},fd={}{backend_opts}",
                    theirs.as_raw_fd()
                ));
                dev.push_str(&format!(",chardev={chr}"));
                out.streams.push((id.clone(), ours));
                out.qemu_ends.push(theirs);
            }
        }
        for (k, v) in &d.props {
            dev.push_str(&format!(",{}={}", opt_value(k), opt_value(v)));
        }
        out.args.push("-device".into());
        out.args.push(dev);
        if let Some(after) = after {
            out.args.push("-device".into());
            out.args.push(after);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_become_qemu_arguments_with_their_backends() {
        let q = qemu_args(&[
            UsbDevice::keyboard(),
            UsbDevice::uas(Path::new("/t/d,1.img"))
                .id("disk")
                .prop("serial", "S1"),
            UsbDevice::audio_wav(Path::new("/t/a.wav"))
                .prop("buffer", "8192")
                .backend_prop("out.frequency", "48000"),
            UsbDevice::serial(),
        ])
        .unwrap();
        let args = q.args.join(" ");
        assert!(args.starts_with(
            "-device qemu-xhci,id=xhci,p2=8,p3=8 -device usb-kbd,id=usb0,bus=xhci.0 "
        ));
        assert!(args.contains(
            "-drive if=none,id=disk-drive,format=raw,file=/t/d,,1.img -device usb-uas,id=disk,bus=xhci.0,serial=S1 \
             -device scsi-hd,bus=disk.0,scsi-id=0,lun=0,drive=disk-drive"
        ));
        assert!(args.contains(
            "-audiodev wav,id=usb2-audio,path=/t/a.wav,out.frequency=48000 -device usb-audio,id=usb2,bus=xhci.0,audiodev=usb2-audio,buffer=8192"
        ));
        assert!(args.contains("-device usb-serial,id=usb3,bus=xhci.0,chardev=usb3-chr"));
        assert_eq!(q.streams.len(), 1);
        assert_eq!(q.streams[0].0, "usb3");
        assert!(qemu_args(&[UsbDevice::storage(Path::new("rel.img"))]).is_err());
        assert!(qemu_args(&[UsbDevice::new("virtio-net")]).is_err());
        assert!(qemu_args(&[UsbDevice::keyboard().backend_prop("a", "b")]).is_err());
        assert!(qemu_args(&[UsbDevice::keyboard().id("k"), UsbDevice::tablet().id("k")]).is_err());
    }
}
