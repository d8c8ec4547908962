//! USB mass storage: Bulk-Only Transport (BOT) carrying the SCSI transparent
//! command set, backed by a raw disk image.
//!
//! The state machine follows the Linux gadget driver `f_mass_storage.c`,
//! because Linux usb-storage and Windows usbstor are both known to get along
//! with it: an invalid CBW wedges both bulk endpoints until a Bulk-Only Mass
//! Storage Reset; when the device has less data than the host asked for, the
//! data phase ends with a short transfer (or, if a URB arrives after all the
//! data went out, a STALL) and the CSW carries the residue; a host/device
//! length or direction conflict is a phase error.
//!
//! The image is read and written on the disk's own thread (see `disk`),
//! never in `poll`: a slow image or a long `fdatasync` keeps the device's
//! transfers `Pending`, not the thread that polls them, which serves other
//! devices too. The one exception is READ data already in the page cache,
//! read with `RWF_NOWAIT` straight into the IN buffer: no wait, no copy.
//! Other READ data is read on the thread into one reused buffer, ahead of
//! the host, and copied into the IN transfer; WRITE data is copied into it
//! and written while the host moves on, the CSW waiting until the write
//! (and a FUA or SYNCHRONIZE CACHE flush) is done, so that its status is
//! the truth.
//!
//! The module is split by concern: `bot` is the transport (CBW, data
//! phase, CSW, phase errors), `scsi` the command set, `sense` what REQUEST
//! SENSE reports, `image` the storage a disk reads and writes, and `disk`
//! the I/O thread that keeps that storage off the polling thread.

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;
use std::task::{Context, Poll, Waker};

use usbwire_proto::{Errno, SetupPacket, Speed};
use usbwire_usb::Request;

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

mod bot;
mod disk;
mod image;
mod scsi;
mod sense;
#[cfg(test)]
mod tests;

pub use bot::{CSW_FAILED, CSW_GOOD, CSW_PHASE_ERROR};
pub use image::DiskImage;

use bot::{Io, Phase};
use disk::{Disk, Finished};
use scsi::ascii_field;
use sense::Sense;

/// Logical block size. 512 is what every host assumes of a USB stick, and
/// what Windows needs to boot from or partition an image without surprises.
pub const BLOCK_SIZE: u64 = 512;
/// Bulk IN endpoint address.
pub const EP_IN: u8 = 0x81;
/// Bulk OUT endpoint address.
pub const EP_OUT: u8 = 0x02;

/// The Linux file-backed storage gadget IDs: hosts already know them as a
/// well-behaved BOT device, so no quirk table entry is triggered.
pub const VENDOR_ID: u16 = 0x0525;
pub const PRODUCT_ID: u16 = 0xa4a5;

/// The BOS a USB 3 device must have, or Linux refuses to enumerate it at
/// that speed: a USB 2.0 extension (no LPM) and the SuperSpeed device
/// capability (full, high and super speed; no U1/U2 exit latency).
#[rustfmt::skip]
const SS_BOS: [u8; 22] = [
    5, descriptors::DT_BOS, 22, 0, 2,
    7, 0x10, 0x02, 0, 0, 0, 0,
    10, 0x10, 0x03, 0, 0x0e, 0, 1, 0, 0, 0,
];

/// Class requests (BOT 3.1 and 3.2).
const REQ_BOT_RESET: u8 = 0xff;
const REQ_GET_MAX_LUN: u8 = 0xfe;

/// How the mass-storage device presents itself and which faults it fakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MscConfig {
    /// Open the image O_RDONLY and report the medium write-protected.
    pub read_only: bool,
    /// USB product string; also the INQUIRY product (without a leading
    /// "usbwire ", which the INQUIRY vendor field already says).
    pub product: String,
    /// USB serial string and VPD page 0x80. Empty: derived from the image's
    /// canonical path, so the same image keeps its serial across runs and
    /// hosts keep their per-device settings (Windows drive letters, udev
    /// by-id links).
    pub serial: String,
    /// LBAs that fail to read with MEDIUM ERROR / UNRECOVERED READ ERROR.
    pub bad_lbas: Option<Range<u64>>,
    pub speed: Speed,
}

impl Default for MscConfig {
    fn default() -> Self {
        MscConfig {
            read_only: false,
            product: "usbwire mass storage".into(),
            serial: String::new(),
            bad_lbas: None,
            speed: Speed::High,
        }
    }
}

/// A USB flash drive backed by a disk image.
pub struct MassStorage {
    descriptors: Descriptors,
    bos: Option<Vec<u8>>,
    disk: Disk,
    read_only: bool,
    blocks: u64,
    bad_lbas: Option<Range<u64>>,
    inquiry_product: [u8; 16],
    serial: String,
    max_packet: usize,

    phase: Phase,
    tag: u32,
    status: u8,
    /// Bytes of dCBWDataTransferLength not yet on the wire.
    host_left: u64,
    /// dCBWDataTransferLength less the bytes the command actually sent or
    /// used (BOT 6.7): discarded OUT data still counts as residue.
    residue: u64,
    /// Bytes the command still has to send or take.
    dev_left: u64,
    io: Io,
    /// FUA write: make it durable before the CSW reports success.
    sync_after_write: bool,
    /// The command asked for a flush, which runs before its CSW goes.
    sync_pending: bool,
    sense: Sense,
    /// Replies of the non-READ commands; a few dozen bytes, reused.
    reply: Vec<u8>,
    reply_pos: usize,
    in_waker: Option<Waker>,
    out_waker: Option<Waker>,
}

impl std::fmt::Debug for MassStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MassStorage")
            .field("blocks", &self.blocks)
            .field("read_only", &self.read_only)
            .field("serial", &self.serial)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// A stable serial from the image path (FNV-1a, 64 bits, 16 hex digits).
fn derived_serial(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016X}")
}

impl MassStorage {
    /// Opens a raw disk image. Its size, rounded down to whole 512-byte
    /// blocks, is the capacity; an empty image is a drive with no medium.
    pub fn open(path: &Path, cfg: MscConfig) -> io::Result<MassStorage> {
        let mut file = if cfg.read_only {
            OpenOptions::new().read(true).open(path)?
        } else {
            OpenOptions::new().read(true).write(true).open(path)?
        };
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a directory, not a disk image", path.display()),
            ));
        }
        // Seeking to the end also sizes block devices, whose metadata says 0.
        let size = file.seek(SeekFrom::End(0))?;
        let cfg = MscConfig {
            serial: if cfg.serial.is_empty() {
                derived_serial(path)
            } else {
                cfg.serial
            },
            ..cfg
        };
        Self::from_image(Box::new(file), size, cfg)
    }

    /// A drive on `image`, which holds `size` bytes (rounded down to whole
    /// blocks, as in [`MassStorage::open`]). `cfg.serial` should be set:
    /// there is no path to derive a stable one from.
    pub fn from_image(
        image: Box<dyn DiskImage>,
        size: u64,
        cfg: MscConfig,
    ) -> io::Result<MassStorage> {
        let serial = if cfg.serial.is_empty() {
            "0".repeat(16)
        } else {
            cfg.serial.clone()
        };
        let inquiry_product =
            ascii_field(cfg.product.strip_prefix("usbwire ").unwrap_or(&cfg.product));
        let (descriptors, bos) = Self::build_descriptors(cfg.speed, &cfg.product, &serial);
        Ok(MassStorage {
            descriptors,
            bos,
            disk: Disk::start(image)?,
            read_only: cfg.read_only,
            blocks: size / BLOCK_SIZE,
            bad_lbas: cfg.bad_lbas.filter(|r| !r.is_empty()),
            inquiry_product,
            serial,
            max_packet: usize::from(descriptors::bulk_max_packet(cfg.speed)),
            phase: Phase::Idle,
            tag: 0,
            status: CSW_GOOD,
            host_left: 0,
            residue: 0,
            dev_left: 0,
            io: Io::Nothing,
            sync_after_write: false,
            sync_pending: false,
            sense: Sense::NONE,
            reply: Vec::with_capacity(256),
            reply_pos: 0,
            in_waker: None,
            out_waker: None,
        })
    }

    fn build_descriptors(
        speed: Speed,
        product: &str,
        serial: &str,
    ) -> (Descriptors, Option<Vec<u8>>) {
        let superspeed = matches!(speed, Speed::Super | Speed::SuperPlus);
        let mps = descriptors::bulk_max_packet(speed);
        // SuperSpeed endpoints need a companion descriptor (USB 3.2 9.6.7).
        let companion = [6, descriptors::DT_SS_ENDPOINT_COMP, 0, 0, 0, 0];
        let mut body = Vec::new();
        body.extend_from_slice(&descriptors::interface(0, 0, 2, 0x08, 0x06, 0x50, 0));
        body.extend_from_slice(&descriptors::endpoint(EP_IN, TransferType::Bulk, mps, 0));
        if superspeed {
            body.extend_from_slice(&companion);
        }
        body.extend_from_slice(&descriptors::endpoint(EP_OUT, TransferType::Bulk, mps, 0));
        if superspeed {
            body.extend_from_slice(&companion);
        }
        let device = DeviceDescriptor {
            usb_version: if superspeed { 0x0300 } else { 0x0200 },
            class: 0,
            subclass: 0,
            protocol: 0,
            // USB 3 encodes ep0's 512 bytes as the exponent 9.
            max_packet_size0: if superspeed { 9 } else { 64 },
            vendor_id: VENDOR_ID,
            product_id: PRODUCT_ID,
            device_version: 0x0100,
            manufacturer: Some("usbwire".into()),
            product: Some(product.to_string()),
            serial: Some(serial.to_string()),
        };
        let bos = superspeed.then(|| SS_BOS.to_vec());
        let d = Descriptors::new(speed, device, 0x40, 0, &body, &[]);
        (d, bos)
    }

    /// Capacity in 512-byte blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The serial number reported over USB and in VPD page 0x80.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Changes the LBAs that fail to read; takes effect from the next command.
    pub fn set_bad_lbas(&mut self, bad: Option<Range<u64>>) {
        self.bad_lbas = bad.filter(|r| !r.is_empty());
    }
}

impl Function for MassStorage {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control_in(&mut self, setup: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        let request = Request::from(setup);
        if let Some((descriptor_type, _)) = request.device_descriptor_request() {
            if descriptor_type != descriptors::DT_BOS {
                return None;
            }
            let bos = self.bos.as_ref()?;
            let n = crate::core::reply(bos, buf);
            return Some(Ok(n));
        }
        if request.interface_class_request() != Some(REQ_GET_MAX_LUN) {
            return None;
        }
        if setup.index != 0 || setup.value != 0 || buf.is_empty() {
            return Some(Err(Errno::EPIPE));
        }
        // One LUN: the highest LUN number is 0.
        buf[0] = 0;
        Some(Ok(1))
    }

    fn control_out(&mut self, setup: &SetupPacket, _data: &[u8]) -> Option<Result<(), Errno>> {
        let request = Request::from(setup);
        if request.interface_class_request() != Some(REQ_BOT_RESET) {
            return None;
        }
        if setup.index != 0 || setup.value != 0 || setup.length != 0 {
            return Some(Err(Errno::EPIPE));
        }
        self.reset_protocol();
        Some(Ok(()))
    }

    fn transfer_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        if ep != EP_IN {
            return Poll::Ready(Err(Errno::EPIPE));
        }
        self.poll_bulk_in(buf, cx)
    }

    fn transfer_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        if ep != EP_OUT {
            return Poll::Ready(Err(Errno::EPIPE));
        }
        self.poll_bulk_out(data, cx)
    }

    fn clear_halt(&mut self, _ep: u8) -> bool {
        self.phase == Phase::Wedged
    }

    fn set_configuration(&mut self, _config: u8) {
        self.reset_protocol();
    }

    fn reset(&mut self) {
        self.reset_protocol();
    }

    /// Blocks until what was written is durable: the write under way
    /// finishes, then an `fdatasync`.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(f) = self.disk.wait_finished() {
            self.apply(f);
        }
        if self.read_only {
            return Ok(());
        }
        self.disk.submit_sync();
        match self.disk.wait_finished() {
            Some(Finished::Sync(r)) => r,
            // Only the sync was under way.
            _ => Ok(()),
        }
    }
}
