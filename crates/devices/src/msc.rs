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

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::task::{ready, Context, Poll, Waker};

use usbwire_proto::{Errno, SetupPacket, Speed};
use usbwire_usb::Request;

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

mod disk;
use disk::{Disk, Finished, Side};

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

const CBW_LEN: usize = 31;
const CSW_LEN: usize = 13;
const CBW_SIGNATURE: u32 = 0x4342_5355;
const CSW_SIGNATURE: u32 = 0x5342_5355;

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

/// CSW bCSWStatus values.
pub const CSW_GOOD: u8 = 0;
pub const CSW_FAILED: u8 = 1;
pub const CSW_PHASE_ERROR: u8 = 2;

/// SCSI operation codes this device implements.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_FORMAT_CAPACITIES: u8 = 0x23;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
}

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

/// Fixed-format sense data: the outcome of the last command, kept for
/// REQUEST SENSE because BOT's CSW can only say "failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sense {
    key: u8,
    asc: u8,
    ascq: u8,
    /// The INFORMATION field (the failing LBA for medium errors).
    info: Option<u64>,
}

impl Sense {
    const NONE: Sense = Sense::new(0x00, 0x00, 0x00);
    const NOT_PRESENT: Sense = Sense::new(0x02, 0x3a, 0x00);
    const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    const INVALID_FIELD: Sense = Sense::new(0x05, 0x24, 0x00);
    const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);

    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    fn unrecovered_read(lba: u64) -> Sense {
        Sense {
            info: Some(lba),
            ..Sense::new(0x03, 0x11, 0x00)
        }
    }

    fn write_error(lba: Option<u64>) -> Sense {
        Sense {
            info: lba,
            ..Sense::new(0x03, 0x0c, 0x00)
        }
    }

    /// 18 bytes of fixed-format sense (SPC-4 4.5.3). INFORMATION is four
    /// bytes wide, so an LBA beyond 2^32 is reported without the VALID bit
    /// rather than truncated into a wrong block number.
    fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    None,
    In,
    Out,
}

/// What a command needs of the transport, known from the CDB before it runs.
struct Shape {
    cdb_len: usize,
    dir: Dir,
    /// Bytes the device intends to move (allocation or transfer length).
    len: u64,
    needs_medium: bool,
}

/// What a command that ran wants moved in the data phase.
enum Exec {
    Nothing,
    /// `reply` holds the bytes.
    Reply,
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
}

/// Where the data phase takes its bytes from or puts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    Nothing,
    Reply,
    /// From the disk's read window.
    Read,
    Write {
        offset: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a CBW on bulk OUT.
    Idle,
    DataIn,
    DataOut,
    /// The CSW waits for the next IN transfer.
    Status,
    /// An invalid CBW arrived: both bulk endpoints stall, even through
    /// CLEAR_FEATURE(HALT), until a Bulk-Only Mass Storage Reset (BOT 6.6.1).
    Wedged,
}

/// Where a mass-storage device keeps its blocks: a raw image file, or
/// anything else that reads and writes at offsets (a test's image that
/// holds its I/O until told to go on). Its reads, writes and syncs run on
/// the disk's own I/O thread, so they may block; only
/// [`DiskImage::read_at_nowait`] runs on the thread that polls the device.
pub trait DiskImage: Send + Sync + 'static {
    /// Reads into `buf` at `offset`; fewer bytes than asked, or 0 at the
    /// end of the image, as `pread` does.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Reads what can be read without waiting for the storage (what is in
    /// the page cache), as `preadv2(RWF_NOWAIT)` does: `WouldBlock` when
    /// that is not all of it (then `read_at` runs on the I/O thread), or
    /// `Unsupported`. The default never tries.
    fn read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Writes from `data` at `offset`; possibly fewer bytes, as `pwrite`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

impl DiskImage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        use rustix::io::{preadv2, ReadWriteFlags};
        let mut bufs = [io::IoSliceMut::new(buf)];
        Ok(preadv2(self, &mut bufs, offset, ReadWriteFlags::NOWAIT)?)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<usize> {
        FileExt::write_at(self, data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
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

/// SCSI ASCII fields admit printable ASCII only, space padded.
fn ascii_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    for (o, c) in out.iter_mut().zip(s.bytes()) {
        *o = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
    out
}

fn be16(cdb: &[u8; 16], i: usize) -> u64 {
    u64::from(u16::from_be_bytes([cdb[i], cdb[i + 1]]))
}

fn be32(cdb: &[u8; 16], i: usize) -> u64 {
    u64::from(u32::from_be_bytes([
        cdb[i],
        cdb[i + 1],
        cdb[i + 2],
        cdb[i + 3],
    ]))
}

fn be64(cdb: &[u8; 16], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&cdb[i..i + 8]);
    u64::from_be_bytes(b)
}

/// LBA, block count and FUA of a READ/WRITE/VERIFY CDB.
fn rw_params(cdb: &[u8; 16]) -> (u64, u64, bool) {
    let fua = cdb[1] & 0x08 != 0;
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = (u64::from(cdb[1] & 0x1f) << 16) | be16(cdb, 2);
            // A transfer length of 0 means 256 blocks in the 6-byte commands.
            let count = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, count, false)
        }
        op::READ_12 | op::WRITE_12 => (be32(cdb, 2), be32(cdb, 6), fua),
        op::READ_16 | op::WRITE_16 | op::VERIFY_16 => (be64(cdb, 2), be32(cdb, 10), fua),
        // READ(10), WRITE(10), VERIFY(10)
        _ => (be32(cdb, 2), be16(cdb, 7), fua),
    }
}

fn shape(cdb: &[u8; 16], given_len: usize) -> Shape {
    let s = |cdb_len, dir, len, needs_medium| Shape {
        cdb_len,
        dir,
        len,
        needs_medium,
    };
    let blocks = || rw_params(cdb).1 * BLOCK_SIZE;
    match cdb[0] {
        op::TEST_UNIT_READY => s(6, Dir::None, 0, true),
        op::REQUEST_SENSE => s(6, Dir::In, u64::from(cdb[4]), false),
        op::READ_6 => s(6, Dir::In, blocks(), true),
        op::WRITE_6 => s(6, Dir::Out, blocks(), true),
        op::INQUIRY => s(6, Dir::In, be16(cdb, 3), false),
        op::MODE_SENSE_6 => s(6, Dir::In, u64::from(cdb[4]), false),
        op::START_STOP_UNIT | op::PREVENT_ALLOW => s(6, Dir::None, 0, false),
        op::READ_FORMAT_CAPACITIES => s(10, Dir::In, be16(cdb, 7), false),
        op::READ_CAPACITY_10 => s(10, Dir::In, 8, true),
        op::READ_10 => s(10, Dir::In, blocks(), true),
        op::WRITE_10 => s(10, Dir::Out, blocks(), true),
        op::VERIFY_10 | op::SYNCHRONIZE_CACHE_10 => s(10, Dir::None, 0, true),
        op::MODE_SENSE_10 => s(10, Dir::In, be16(cdb, 7), false),
        op::READ_12 => s(12, Dir::In, blocks(), true),
        op::WRITE_12 => s(12, Dir::Out, blocks(), true),
        op::READ_16 => s(16, Dir::In, blocks(), true),
        op::WRITE_16 => s(16, Dir::Out, blocks(), true),
        op::VERIFY_16 | op::SYNCHRONIZE_CACHE_16 => s(16, Dir::None, 0, true),
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SAI_READ_CAPACITY_16 => {
            s(16, Dir::In, be32(cdb, 10), true)
        }
        // Unknown commands (and service actions) move no data; whatever
        // the host expected is stalled or discarded, and the sense says why.
        _ => s(given_len, Dir::None, 0, false),
    }
}

/// A parsed Command Block Wrapper (BOT 5.1).
struct Cbw {
    tag: u32,
    length: u32,
    flags: u8,
    lun: u8,
    cb_len: usize,
    cb: [u8; 16],
}

impl Cbw {
    /// `None` for a CBW that is not valid (wrong size or signature) or
    /// not meaningful (BOT 6.2): both wedge the device.
    fn parse(data: &[u8]) -> Option<Cbw> {
        let d: &[u8; CBW_LEN] = data.try_into().ok()?;
        if u32::from_le_bytes([d[0], d[1], d[2], d[3]]) != CBW_SIGNATURE {
            return None;
        }
        let mut cb = [0u8; 16];
        cb.copy_from_slice(&d[15..31]);
        let cbw = Cbw {
            tag: u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
            length: u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
            flags: d[12],
            lun: d[13] & 0x0f,
            cb_len: usize::from(d[14] & 0x1f),
            cb,
        };
        // Reserved bits set, a LUN we do not have, or a command block
        // length outside 1..=16 (BOT 6.2.2).
        if d[12] & 0x7f != 0 || d[13] & 0xf0 != 0 || d[14] & 0xe0 != 0 {
            return None;
        }
        if cbw.lun != 0 || cbw.cb_len == 0 || cbw.cb_len > 16 {
            return None;
        }
        Some(cbw)
    }
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

    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        // Either side may have a transfer parked on the old phase.
        if let Some(w) = self.in_waker.take() {
            w.wake();
        }
        if let Some(w) = self.out_waker.take() {
            w.wake();
        }
    }

    fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
        match slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
    }

    /// Back to waiting for a CBW, whatever was in progress: the
    /// Bulk-Only Mass Storage Reset, a port reset, or a new configuration.
    fn reset_protocol(&mut self) {
        self.io = Io::Nothing;
        self.disk.abandon();
        self.host_left = 0;
        self.residue = 0;
        self.dev_left = 0;
        self.sync_after_write = false;
        self.sync_pending = false;
        self.reply.clear();
        self.reply_pos = 0;
        self.sense = Sense::NONE;
        self.set_phase(Phase::Idle);
    }

    fn fail(&mut self, sense: Sense) {
        self.sense = sense;
        if self.status == CSW_GOOD {
            self.status = CSW_FAILED;
        }
    }

    fn handle_cbw(&mut self, data: &[u8]) {
        let cbw = match Cbw::parse(data) {
            Some(c) => c,
            None => {
                tracing::debug!(len = data.len(), "invalid or not meaningful CBW; wedging");
                self.io = Io::Nothing;
                self.set_phase(Phase::Wedged);
                return;
            }
        };
        self.tag = cbw.tag;
        self.status = CSW_GOOD;
        self.host_left = u64::from(cbw.length);
        self.residue = self.host_left;
        self.sync_after_write = false;
        self.sync_pending = false;
        self.reply.clear();
        self.reply_pos = 0;
        let host_dir = match (cbw.length, cbw.flags & 0x80 != 0) {
            (0, _) => Dir::None,
            (_, true) => Dir::In,
            (_, false) => Dir::Out,
        };

        let cdb = &cbw.cb;
        let sh = shape(cdb, cbw.cb_len);
        let dir = if sh.len == 0 { Dir::None } else { sh.dir };
        let mut len = sh.len;
        // Host expects less than the device intends (BOT cases 2, 3, 7, 13):
        // do the command, move only what the host allows, report a phase error.
        if self.host_left < len {
            len = self.host_left;
            self.status = CSW_PHASE_ERROR;
        }
        let exec = if (host_dir != dir && len > 0) || cbw.cb_len < sh.cdb_len {
            // Opposite directions (cases 8, 10), or a command block too
            // short for its opcode: the command is not run at all.
            self.status = CSW_PHASE_ERROR;
            Exec::Nothing
        } else {
            if cdb[0] != op::REQUEST_SENSE {
                self.sense = Sense::NONE;
            }
            if sh.needs_medium && self.blocks == 0 {
                self.fail(Sense::NOT_PRESENT);
                Exec::Nothing
            } else {
                self.execute(cdb, len)
            }
        };

        let (io, dev_left) = match exec {
            Exec::Nothing => (Io::Nothing, 0),
            Exec::Reply => {
                let n = (self.reply.len() as u64).min(len);
                (Io::Reply, n)
            }
            Exec::Read { offset, len: l } => {
                let n = l.min(len);
                self.disk.begin_read(offset, n);
                (Io::Read, n)
            }
            Exec::Write {
                offset,
                len: l,
                fua,
            } => {
                self.sync_after_write = fua;
                (Io::Write { offset }, l.min(len))
            }
        };
        self.io = io;
        self.dev_left = dev_left;
        match host_dir {
            Dir::None => self.finish_data(),
            Dir::In => self.set_phase(Phase::DataIn),
            Dir::Out => self.set_phase(Phase::DataOut),
        }
    }

    /// The data phase is over: the CSW follows once the writes are done
    /// (and, after a FUA write, flushed).
    fn finish_data(&mut self) {
        if std::mem::take(&mut self.sync_after_write) {
            self.sync_pending = true;
        }
        if self.io == Io::Read {
            self.disk.end_read();
        }
        self.io = Io::Nothing;
        self.set_phase(Phase::Status);
    }

    /// Applies what the disk finished to the command it was for.
    fn apply(&mut self, f: Finished) {
        match f {
            Finished::Write(Err((at, e))) => self.write_failed(at, e),
            Finished::Sync(Err(e)) => {
                tracing::warn!(error = %e, "fdatasync of the disk image failed");
                self.fail(Sense::write_error(None));
            }
            // A read's data or failure is in the disk's window.
            Finished::Read | Finished::Stale | Finished::Write(Ok(())) | Finished::Sync(Ok(())) => {
            }
        }
    }

    /// Ready once the disk is idle, with what it finished applied.
    fn poll_disk_idle(&mut self, side: Side, cx: &Context<'_>) -> Poll<()> {
        // One operation at a time: at most one result to collect.
        while let Some(f) = ready!(self.disk.poll_finished(side, cx)) {
            self.apply(f);
        }
        Poll::Ready(())
    }

    /// Ready once the READ's window holds `want` bytes, or all it ever
    /// will (a read failed), with the disk idle.
    fn poll_disk_read(&mut self, want: usize, cx: &Context<'_>) -> Poll<()> {
        // Each turn collects a read or starts one; two reads at most fill
        // any window, the third turn finds it full.
        for _ in 0..4 {
            ready!(self.poll_disk_idle(Side::In, cx));
            let have = self.disk.window().len();
            if have >= want || self.disk.read_error().is_some() || self.disk.read_exhausted() {
                return Poll::Ready(());
            }
            self.disk.read_more(want - have);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn csw(&self) -> [u8; CSW_LEN] {
        let mut b = [0u8; CSW_LEN];
        b[0..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        let residue = u32::try_from(self.residue).unwrap_or(u32::MAX);
        b[8..12].copy_from_slice(&residue.to_le_bytes());
        b[12] = self.status;
        b
    }

    /// Runs one command whose transport checks passed. `len` is how many
    /// bytes the data phase may carry. Replies are built in full and cut to
    /// `len` by the caller, which is how allocation lengths truncate.
    fn execute(&mut self, cdb: &[u8; 16], len: u64) -> Exec {
        match cdb[0] {
            op::TEST_UNIT_READY => Exec::Nothing,
            op::REQUEST_SENSE => {
                let s = self.sense.fixed();
                self.reply.extend_from_slice(&s);
                self.sense = Sense::NONE;
                Exec::Reply
            }
            op::INQUIRY => self.inquiry(cdb),
            op::MODE_SENSE_6 => self.mode_sense(cdb, false),
            op::MODE_SENSE_10 => self.mode_sense(cdb, true),
            op::PREVENT_ALLOW => {
                // Nothing can pull an emulated medium out from under the
                // host, so PREVENT has nothing to prevent.
                if cdb[4] & !0x01 != 0 {
                    self.fail(Sense::INVALID_FIELD);
                }
                Exec::Nothing
            }
            op::START_STOP_UNIT => {
                // Nothing spins; but a host stopping the unit is about to
                // unplug it, so this is the moment to be durable.
                if cdb[4] & 0x01 == 0 {
                    self.sync_before_csw();
                }
                Exec::Nothing
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                self.sync_before_csw();
                Exec::Nothing
            }
            op::READ_FORMAT_CAPACITIES => {
                let blocks = u32::try_from(self.blocks).unwrap_or(u32::MAX);
                // Descriptor type 2 "formatted media", 3 "no media present".
                let code = if self.blocks > 0 { 0x02 } else { 0x03 };
                self.reply.extend_from_slice(&[0, 0, 0, 8]);
                self.reply.extend_from_slice(&blocks.to_be_bytes());
                self.reply.push(code);
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes()[1..]);
                Exec::Reply
            }
            op::READ_CAPACITY_10 => {
                // 0xffffffff tells the host to use READ CAPACITY(16).
                let last = u32::try_from(self.blocks.saturating_sub(1)).unwrap_or(u32::MAX);
                self.reply.extend_from_slice(&last.to_be_bytes());
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                Exec::Reply
            }
            op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SAI_READ_CAPACITY_16 => {
                self.reply
                    .extend_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
                self.reply
                    .extend_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
                self.reply.extend_from_slice(&[0u8; 20]);
                Exec::Reply
            }
            op::SERVICE_ACTION_IN_16 => {
                self.fail(Sense::INVALID_FIELD);
                Exec::Nothing
            }
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
                let (lba, count, _) = rw_params(cdb);
                if !self.in_range(lba, count) {
                    return Exec::Nothing;
                }
                let mut bytes = count * BLOCK_SIZE;
                if let Some(bad) = self.first_bad(lba, count) {
                    self.fail(Sense::unrecovered_read(bad));
                    bytes = (bad - lba) * BLOCK_SIZE;
                }
                Exec::Read {
                    offset: lba * BLOCK_SIZE,
                    len: bytes.min(len),
                }
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                let (lba, count, fua) = rw_params(cdb);
                if self.read_only {
                    self.fail(Sense::WRITE_PROTECTED);
                    return Exec::Nothing;
                }
                if !self.in_range(lba, count) {
                    return Exec::Nothing;
                }
                Exec::Write {
                    offset: lba * BLOCK_SIZE,
                    len: (count * BLOCK_SIZE).min(len),
                    fua,
                }
            }
            op::VERIFY_10 | op::VERIFY_16 => {
                // BYTCHK asks us to compare against data the host sends;
                // only the medium check (BYTCHK=0) is offered.
                if cdb[1] & 0x06 != 0 {
                    self.fail(Sense::INVALID_FIELD);
                    return Exec::Nothing;
                }
                let (lba, count, _) = rw_params(cdb);
                if self.in_range(lba, count) {
                    if let Some(bad) = self.first_bad(lba, count) {
                        self.fail(Sense::unrecovered_read(bad));
                    }
                }
                Exec::Nothing
            }
            _ => {
                self.fail(Sense::INVALID_OPCODE);
                Exec::Nothing
            }
        }
    }

    /// The command's CSW waits for an `fdatasync`; its failure fails the
    /// command.
    fn sync_before_csw(&mut self) {
        if !self.read_only {
            self.sync_pending = true;
        }
    }

    fn in_range(&mut self, lba: u64, count: u64) -> bool {
        let ok = lba.checked_add(count).is_some_and(|end| end <= self.blocks);
        if !ok {
            self.fail(Sense::LBA_OUT_OF_RANGE);
        }
        ok
    }

    /// The first injected bad block in `lba..lba + count`.
    fn first_bad(&self, lba: u64, count: u64) -> Option<u64> {
        let bad = self.bad_lbas.as_ref()?;
        let end = lba.saturating_add(count);
        let first = bad.start.max(lba);
        (first < end && first < bad.end).then_some(first)
    }

    fn inquiry(&mut self, cdb: &[u8; 16]) -> Exec {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        // CMDDT is obsolete; a page code without EVPD is meaningless.
        if cdb[1] & 0x02 != 0 || (!evpd && page != 0) {
            self.fail(Sense::INVALID_FIELD);
            return Exec::Nothing;
        }
        let r = &mut self.reply;
        if !evpd {
            // Direct access, removable (what hosts expect of a stick; it
            // also makes an empty image a drive with no medium), SPC-4.
            r.extend_from_slice(&[0x00, 0x80, 0x06, 0x02, 31, 0, 0, 0]);
            r.extend_from_slice(b"usbwire ");
            r.extend_from_slice(&self.inquiry_product);
            r.extend_from_slice(b"0100");
            return Exec::Reply;
        }
        match page {
            0x00 => r.extend_from_slice(&[0x00, 0x00, 0x00, 2, 0x00, 0x80]),
            0x80 => {
                let serial: [u8; 64] = ascii_field(&self.serial);
                let n = self.serial.len().clamp(1, 64);
                r.extend_from_slice(&[0x00, 0x80, 0x00, n as u8]);
                r.extend_from_slice(&serial[..n]);
            }
            _ => {
                self.fail(Sense::INVALID_FIELD);
                return Exec::Nothing;
            }
        }
        Exec::Reply
    }

    fn mode_sense(&mut self, cdb: &[u8; 16], ten: bool) -> Exec {
        let control = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        if control == 3 {
            self.fail(Sense::SAVING_NOT_SUPPORTED);
            return Exec::Nothing;
        }
        let all = page == 0x3f;
        if !(page == 0x08 || all) || (subpage != 0 && !(all && subpage == 0xff)) {
            self.fail(Sense::INVALID_FIELD);
            return Exec::Nothing;
        }
        let wp = if self.read_only { 0x80 } else { 0 };
        let header = if ten { 8 } else { 4 };
        let r = &mut self.reply;
        // No block descriptors: their length field stays 0.
        r.resize(header, 0);
        if ten {
            r[3] = wp;
        } else {
            r[2] = wp;
        }
        // Caching page: write cache enabled, since acknowledged writes sit
        // in the page cache until SYNCHRONIZE CACHE. Nothing is changeable.
        let mut caching = [0u8; 20];
        caching[0] = 0x08;
        caching[1] = 0x12;
        if control != 1 {
            caching[2] = 0x04;
            caching[4..6].copy_from_slice(&[0xff, 0xff]);
            caching[8..12].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        }
        r.extend_from_slice(&caching);
        let total = r.len();
        if ten {
            r[0..2].copy_from_slice(&((total - 2) as u16).to_be_bytes());
        } else {
            r[0] = (total - 1) as u8;
        }
        Exec::Reply
    }

    fn write_failed(&mut self, at: u64, e: io::Error) {
        let lba = at / BLOCK_SIZE;
        tracing::warn!(error = %e, lba, "write to the disk image failed");
        self.fail(Sense::write_error(Some(lba)));
        self.dev_left = 0;
        if matches!(self.io, Io::Write { .. }) {
            self.io = Io::Nothing;
        }
        self.sync_after_write = false;
        self.sync_pending = false;
    }

    fn data_in(&mut self, buf: &mut [u8], cx: &Context<'_>) -> Poll<Result<usize, Errno>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = (buf.len() as u64).min(self.host_left).min(self.dev_left) as usize;
        if want == 0 {
            // The device has no more data but the host wants more, and the
            // last transfer did not end short: BOT 6.7.2 says stall.
            self.finish_data();
            return Poll::Ready(Err(Errno::EPIPE));
        }
        let n = match self.io {
            Io::Reply => {
                let end = self.reply_pos + want;
                match self.reply.get(self.reply_pos..end) {
                    Some(src) => {
                        buf[..want].copy_from_slice(src);
                        self.reply_pos = end;
                        want
                    }
                    None => 0,
                }
            }
            // Cached data comes at once, without a copy or a hop.
            Io::Read if self.disk.read_now(&mut buf[..want]) => want,
            Io::Read => {
                ready!(self.poll_disk_read(want, cx));
                let window = self.disk.window();
                let n = window.len().min(want);
                buf[..n].copy_from_slice(&window[..n]);
                self.disk.consume(n);
                if n < want {
                    if let Some(at) = self.disk.read_error() {
                        // Only the whole good blocks before it were delivered.
                        self.fail(Sense::unrecovered_read(at / BLOCK_SIZE));
                        self.dev_left = 0;
                    }
                }
                n
            }
            Io::Nothing | Io::Write { .. } => 0,
        };
        self.host_left -= n as u64;
        self.residue -= n as u64;
        self.dev_left = self.dev_left.saturating_sub(n as u64);
        if n == 0 {
            self.finish_data();
            return Poll::Ready(Err(Errno::EPIPE));
        }
        // A short transfer ends the data phase; so does a full host length.
        if n < buf.len() || self.host_left == 0 {
            self.finish_data();
        }
        Poll::Ready(Ok(n))
    }

    fn data_out(&mut self, data: &[u8], cx: &Context<'_>) -> Poll<Result<usize, Errno>> {
        if matches!(self.io, Io::Write { .. }) {
            // One buffer: the previous write must be done before this data
            // is taken, and if it failed, the rest is discarded.
            ready!(self.poll_disk_idle(Side::Out, cx));
        }
        let take = (data.len() as u64).min(self.host_left) as usize;
        let for_device = (take as u64).min(self.dev_left) as usize;
        if let Io::Write { offset } = self.io {
            if for_device > 0 {
                self.disk.submit_write(offset, &data[..for_device]);
                self.io = Io::Write {
                    offset: offset + for_device as u64,
                };
            }
        }
        // Bytes beyond what the command wants are read and thrown away
        // (BOT case 9), as the kernel gadget does.
        self.dev_left = self.dev_left.saturating_sub(for_device as u64);
        self.residue -= for_device as u64;
        self.host_left -= take as u64;
        // A packet shorter than wMaxPacketSize (or a zero-length one) ends
        // the transfer on the USB wire; max_packet is a power of two.
        let short = data.is_empty() || data.len() & (self.max_packet - 1) != 0;
        if self.host_left == 0 || short {
            if self.dev_left > 0 && self.status == CSW_GOOD {
                // The host ended the data phase before sending what its own
                // CBW promised: the two sides no longer agree.
                self.status = CSW_PHASE_ERROR;
            }
            self.finish_data();
        }
        Poll::Ready(Ok(take))
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
        match self.phase {
            Phase::Wedged => Poll::Ready(Err(Errno::EPIPE)),
            Phase::Idle | Phase::DataOut => {
                Self::park(&mut self.in_waker, cx);
                Poll::Pending
            }
            Phase::DataIn => self.data_in(buf, cx),
            Phase::Status => {
                if buf.len() < CSW_LEN {
                    // The 13-byte CSW does not fit: babble. The CSW stays
                    // for a retry with a proper buffer.
                    return Poll::Ready(Err(Errno::EOVERFLOW));
                }
                // The status reports the writes and the flush: both done.
                ready!(self.poll_disk_idle(Side::In, cx));
                if std::mem::take(&mut self.sync_pending) {
                    self.disk.submit_sync();
                    ready!(self.poll_disk_idle(Side::In, cx));
                }
                buf[..CSW_LEN].copy_from_slice(&self.csw());
                self.set_phase(Phase::Idle);
                Poll::Ready(Ok(CSW_LEN))
            }
        }
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
        match self.phase {
            Phase::Wedged => Poll::Ready(Err(Errno::EPIPE)),
            Phase::Idle => {
                // A command starts with the disk idle: what the last one
                // left running (a read ahead it did not need) is done.
                ready!(self.poll_disk_idle(Side::Out, cx));
                self.handle_cbw(data);
                Poll::Ready(Ok(data.len()))
            }
            Phase::DataOut => self.data_out(data, cx),
            // A CBW before the CSW was read: NAK it, as a real device would.
            Phase::DataIn | Phase::Status => {
                Self::park(&mut self.out_waker, cx);
                Poll::Pending
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EmulatedDevice;
    use crate::test_util::{setup, CountWaker};
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn noop() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// Wakes the test thread waiting in [`wait`].
    #[derive(Default)]
    struct Signal {
        woken: std::sync::Mutex<bool>,
        cv: std::sync::Condvar,
    }

    impl std::task::Wake for Signal {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            *self.woken.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    /// Polls until ready, waiting for a wake-up in between, as an executor
    /// would: a transfer waits for the disk's I/O thread, which wakes it.
    /// One that stays pending without a wake-up fails the test.
    fn wait<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        let signal = Arc::new(Signal::default());
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            if let Poll::Ready(r) = poll(&mut cx) {
                return Poll::Ready(r);
            }
            let woken = signal.woken.lock().unwrap();
            let (mut woken, t) = signal
                .cv
                .wait_timeout_while(woken, std::time::Duration::from_secs(30), |w| !*w)
                .unwrap();
            assert!(
                !t.timed_out(),
                "a transfer stayed pending without a wake-up"
            );
            *woken = false;
        }
        panic!("a transfer stayed pending through 1000 wake-ups");
    }

    /// xorshift64*: test data without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform-ish in 0..n.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// An image whose every byte is known: block b holds (b * 7 + i) as u8.
    fn image(blocks: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..blocks * BLOCK_SIZE)
            .map(|i| ((i / BLOCK_SIZE) * 7 + i % BLOCK_SIZE) as u8)
            .collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        f
    }

    fn device(img: &tempfile::NamedTempFile, cfg: MscConfig) -> EmulatedDevice {
        configured(MassStorage::open(img.path(), cfg).unwrap())
    }

    /// The disk as a host sees it after SET_CONFIGURATION(1).
    fn configured(ms: MassStorage) -> EmulatedDevice {
        let mut dev = EmulatedDevice::new(ms);
        assert_eq!(dev.control(&setup(0x00, 9, 1, 0, 0), &[], &mut []), Ok(0));
        dev
    }

    fn cbw(tag: u32, length: u32, dir_in: bool, cdb: &[u8]) -> [u8; CBW_LEN] {
        let mut b = [0u8; CBW_LEN];
        b[0..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&tag.to_le_bytes());
        b[8..12].copy_from_slice(&length.to_le_bytes());
        b[12] = if dir_in { 0x80 } else { 0 };
        b[14] = cdb.len() as u8;
        b[15..15 + cdb.len()].copy_from_slice(cdb);
        b
    }

    fn send_cbw(dev: &mut EmulatedDevice, tag: u32, length: u32, dir_in: bool, cdb: &[u8]) {
        let c = cbw(tag, length, dir_in, cdb);
        assert_eq!(wait(|cx| dev.poll_out(EP_OUT, &c, cx)), Poll::Ready(Ok(31)));
    }

    fn bulk_in(dev: &mut EmulatedDevice, len: usize) -> Poll<Result<Vec<u8>, Errno>> {
        let mut buf = vec![0u8; len];
        wait(|cx| dev.poll_in(EP_IN, &mut buf, cx)).map(|r| {
            r.map(|n| {
                buf.truncate(n);
                buf
            })
        })
    }

    fn clear_halt(dev: &mut EmulatedDevice, ep: u8) {
        let s = SetupPacket {
            request_type: 0x02,
            request: 1,
            value: 0,
            index: u16::from(ep),
            length: 0,
        };
        assert_eq!(dev.control(&s, &[], &mut []), Ok(0));
    }

    fn bot_reset(dev: &mut EmulatedDevice) {
        let s = SetupPacket {
            request_type: 0x21,
            request: REQ_BOT_RESET,
            value: 0,
            index: 0,
            length: 0,
        };
        assert_eq!(dev.control(&s, &[], &mut []), Ok(0));
    }

    /// Reads the CSW, checks signature and tag; returns (residue, status).
    fn read_csw(dev: &mut EmulatedDevice, tag: u32) -> (u32, u8) {
        let b = match bulk_in(dev, CSW_LEN) {
            Poll::Ready(Ok(b)) => b,
            other => panic!("expected a CSW, got {other:?}"),
        };
        assert_eq!(b.len(), CSW_LEN);
        assert_eq!(
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            CSW_SIGNATURE
        );
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), tag);
        (u32::from_le_bytes(b[8..12].try_into().unwrap()), b[12])
    }

    /// A whole IN command with the data phase in one URB the size of the
    /// host's transfer length, the way Linux submits it. A stall in the
    /// data phase is cleared the way usb-storage does. Returns (data,
    /// residue, status, stalled).
    fn cmd_in(
        dev: &mut EmulatedDevice,
        tag: u32,
        len: u32,
        cdb: &[u8],
    ) -> (Vec<u8>, u32, u8, bool) {
        send_cbw(dev, tag, len, true, cdb);
        let mut data = Vec::new();
        let mut stalled = false;
        if len > 0 {
            match bulk_in(dev, len as usize) {
                Poll::Ready(Ok(d)) => data = d,
                Poll::Ready(Err(Errno::EPIPE)) => {
                    stalled = true;
                    assert!(dev.is_halted(EP_IN));
                    clear_halt(dev, EP_IN);
                }
                other => panic!("data phase: {other:?}"),
            }
        }
        let (residue, status) = read_csw(dev, tag);
        (data, residue, status, stalled)
    }

    fn cmd_none(dev: &mut EmulatedDevice, tag: u32, cdb: &[u8]) -> u8 {
        send_cbw(dev, tag, 0, false, cdb);
        let (residue, status) = read_csw(dev, tag);
        assert_eq!(residue, 0);
        status
    }

    fn cmd_out(dev: &mut EmulatedDevice, tag: u32, data: &[u8], cdb: &[u8]) -> (u32, u8) {
        send_cbw(dev, tag, data.len() as u32, false, cdb);
        if !data.is_empty() {
            assert_eq!(
                wait(|cx| dev.poll_out(EP_OUT, data, cx)),
                Poll::Ready(Ok(data.len()))
            );
        }
        read_csw(dev, tag)
    }

    /// (key, asc, ascq, info if VALID)
    fn sense(dev: &mut EmulatedDevice) -> (u8, u8, u8, Option<u32>) {
        let (d, residue, status, _) = cmd_in(dev, 0x5e5e, 18, &[0x03, 0, 0, 0, 18, 0]);
        assert_eq!((residue, status), (0, CSW_GOOD));
        assert_eq!(d.len(), 18);
        assert_eq!(d[0] & 0x7f, 0x70);
        let info = (d[0] & 0x80 != 0).then(|| u32::from_be_bytes(d[3..7].try_into().unwrap()));
        (d[2] & 0x0f, d[12], d[13], info)
    }

    fn read10(lba: u32, count: u16) -> [u8; 10] {
        let l = lba.to_be_bytes();
        let c = count.to_be_bytes();
        [0x28, 0, l[0], l[1], l[2], l[3], 0, c[0], c[1], 0]
    }

    fn write10(lba: u32, count: u16) -> [u8; 10] {
        let mut c = read10(lba, count);
        c[0] = 0x2a;
        c
    }

    fn block(b: u64) -> Vec<u8> {
        (0..BLOCK_SIZE).map(|i| (b * 7 + i) as u8).collect()
    }

    #[test]
    fn descriptors_and_get_max_lun() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        let d = dev.descriptors();
        let dd = d.device_bytes();
        assert_eq!(u16::from_le_bytes([dd[8], dd[9]]), 0x0525);
        assert_eq!(u16::from_le_bytes([dd[10], dd[11]]), 0xa4a5);
        assert_eq!(u16::from_le_bytes([dd[2], dd[3]]), 0x0200);
        let i = d.interfaces()[0];
        assert_eq!((i.class, i.subclass, i.protocol), (0x08, 0x06, 0x50));
        let eps: Vec<_> = d
            .endpoints()
            .iter()
            .map(|e| (e.address, e.transfer_type, e.max_packet_size))
            .collect();
        assert_eq!(
            eps,
            vec![
                (EP_IN, TransferType::Bulk, 512),
                (EP_OUT, TransferType::Bulk, 512)
            ]
        );
        let serial = String::from_utf16(
            &d.string(3).unwrap()[2..]
                .chunks(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert!(serial.len() >= 12 && serial.chars().all(|c| c.is_ascii_hexdigit()));
        // Stable: the same image gives the same serial.
        let again = MassStorage::open(img.path(), MscConfig::default()).unwrap();
        assert_eq!(again.serial(), serial);

        let max_lun = SetupPacket {
            request_type: 0xa1,
            request: REQ_GET_MAX_LUN,
            value: 0,
            index: 0,
            length: 1,
        };
        let mut b = [0xffu8; 1];
        assert_eq!(dev.control(&max_lun, &[], &mut b), Ok(1));
        assert_eq!(b, [0]);
        let unknown = SetupPacket {
            request: 0xfc,
            ..max_lun
        };
        assert_eq!(dev.control(&unknown, &[], &mut b), Err(Errno::EPIPE));
    }

    #[test]
    fn inquiry_standard_and_vpd() {
        let img = image(8);
        let cfg = MscConfig {
            serial: "0123456789ABCDEF".into(),
            ..MscConfig::default()
        };
        let mut dev = device(&img, cfg);
        let (d, residue, status, stalled) = cmd_in(&mut dev, 1, 36, &[0x12, 0, 0, 0, 36, 0]);
        assert_eq!((residue, status, stalled), (0, CSW_GOOD, false));
        assert_eq!(d.len(), 36);
        assert_eq!(d[0], 0x00, "direct-access block device");
        assert_eq!(d[1], 0x80, "removable");
        assert_eq!(d[4], 31, "additional length");
        assert_eq!(&d[8..16], b"usbwire ");
        assert_eq!(&d[16..32], b"mass storage    ");
        assert_eq!(&d[32..36], b"0100");

        let (d, _, status, _) = cmd_in(&mut dev, 2, 255, &[0x12, 1, 0x00, 0, 255, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(d, vec![0, 0, 0, 2, 0x00, 0x80]);

        let (d, _, status, _) = cmd_in(&mut dev, 3, 255, &[0x12, 1, 0x80, 0, 255, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(&d[..4], &[0, 0x80, 0, 16]);
        assert_eq!(&d[4..], b"0123456789ABCDEF");

        let (d, residue, status, stalled) = cmd_in(&mut dev, 4, 255, &[0x12, 1, 0x83, 0, 255, 0]);
        assert!(d.is_empty() && stalled);
        assert_eq!((residue, status), (255, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x05, 0x24, 0x00, None));
    }

    #[test]
    fn short_reply_ends_with_a_short_transfer_and_residue() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        // Allocation length 36, host transfer length 512: 36 bytes come
        // back in the 512-byte URB, which is short, so no stall is needed.
        let (d, residue, status, stalled) = cmd_in(&mut dev, 9, 512, &[0x12, 0, 0, 0, 36, 0]);
        assert_eq!(d.len(), 36);
        assert!(!stalled);
        assert_eq!((residue, status), (476, CSW_GOOD));
        assert!(!dev.is_halted(EP_IN));

        // The same, but the host splits the data phase into 36 + 476 byte
        // URBs: the first fills exactly, the second finds nothing left and
        // stalls; the CSW follows once the halt is cleared.
        send_cbw(&mut dev, 10, 512, true, &[0x12, 0, 0, 0, 36, 0]);
        assert_eq!(bulk_in(&mut dev, 36), Poll::Ready(Ok(d.clone())));
        assert_eq!(bulk_in(&mut dev, 476), Poll::Ready(Err(Errno::EPIPE)));
        assert_eq!(
            bulk_in(&mut dev, 13),
            Poll::Ready(Err(Errno::EPIPE)),
            "halted until cleared"
        );
        clear_halt(&mut dev, EP_IN);
        assert_eq!(read_csw(&mut dev, 10), (476, CSW_GOOD));

        // Host expects data, the command has none (case 4): stall, residue.
        let (_, residue, status, stalled) = cmd_in(&mut dev, 11, 64, &[0, 0, 0, 0, 0, 0]);
        assert!(stalled);
        assert_eq!((residue, status), (64, CSW_GOOD));
    }

    #[test]
    fn read_capacity_10_and_16() {
        let img = image(100);
        let mut dev = device(&img, MscConfig::default());
        let (d, residue, status, _) = cmd_in(&mut dev, 1, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((residue, status), (0, CSW_GOOD));
        assert_eq!(d, vec![0, 0, 0, 99, 0, 0, 2, 0]);

        let mut rc16 = [0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        let (d, residue, status, _) = cmd_in(&mut dev, 2, 32, &rc16);
        assert_eq!((residue, status), (0, CSW_GOOD));
        assert_eq!(d.len(), 32);
        assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 99);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 512);

        // READ FORMAT CAPACITIES: one formatted-media descriptor.
        let (d, _, status, _) = cmd_in(&mut dev, 3, 252, &[0x23, 0, 0, 0, 0, 0, 0, 0, 252, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(d, vec![0, 0, 0, 8, 0, 0, 0, 100, 2, 0, 2, 0]);
    }

    #[test]
    fn write_then_read_back() {
        let img = image(64);
        let mut dev = device(&img, MscConfig::default());
        let data = Rng(0x1234_5678).bytes(16 * 512);
        assert_eq!(cmd_out(&mut dev, 1, &data, &write10(10, 16)), (0, CSW_GOOD));
        let (back, residue, status, _) = cmd_in(&mut dev, 2, data.len() as u32, &read10(10, 16));
        assert_eq!((residue, status), (0, CSW_GOOD));
        assert!(back == data, "read back differs from what was written");
        // Neighbours untouched.
        let (d, _, _, _) = cmd_in(&mut dev, 3, 512, &read10(9, 1));
        assert_eq!(d, block(9));
        let (d, _, _, _) = cmd_in(&mut dev, 4, 512, &read10(26, 1));
        assert_eq!(d, block(26));

        // A write split over several OUT URBs, each a multiple of 512.
        let data2 = Rng(99).bytes(8 * 512);
        send_cbw(&mut dev, 5, data2.len() as u32, false, &write10(40, 8));
        let mut at = 0;
        for chunk in [512, 1536, 2048] {
            assert_eq!(
                wait(|cx| dev.poll_out(EP_OUT, &data2[at..at + chunk], cx)),
                Poll::Ready(Ok(chunk))
            );
            at += chunk;
        }
        assert_eq!(read_csw(&mut dev, 5), (0, CSW_GOOD));
        let (back, _, status, _) = cmd_in(&mut dev, 6, data2.len() as u32, &read10(40, 8));
        assert_eq!(status, CSW_GOOD);
        assert!(back == data2);
    }

    #[test]
    fn data_in_split_over_small_urbs() {
        let img = image(32);
        let mut dev = device(&img, MscConfig::default());
        let expected: Vec<u8> = (4..20).flat_map(block).collect();
        for urb in [512usize, 1000, 4096, 13] {
            send_cbw(&mut dev, 7, expected.len() as u32, true, &read10(4, 16));
            let mut got = Vec::new();
            for _ in 0..10_000 {
                if got.len() == expected.len() {
                    break;
                }
                match bulk_in(&mut dev, urb) {
                    Poll::Ready(Ok(d)) => {
                        assert!(!d.is_empty());
                        got.extend_from_slice(&d);
                    }
                    other => panic!("urb size {urb}: {other:?}"),
                }
            }
            assert!(got == expected, "urb size {urb}");
            assert_eq!(read_csw(&mut dev, 7), (0, CSW_GOOD));
        }
    }

    #[test]
    fn read_beyond_capacity() {
        let img = image(16);
        let mut dev = device(&img, MscConfig::default());
        let (d, residue, status, stalled) = cmd_in(&mut dev, 1, 1024, &read10(15, 2));
        assert!(d.is_empty() && stalled);
        assert_eq!((residue, status), (1024, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x05, 0x21, 0x00, None));
        // REQUEST SENSE consumed it.
        assert_eq!(sense(&mut dev), (0x00, 0x00, 0x00, None));
        // The last block itself is fine; an overflowing LBA is not.
        let (d, _, status, _) = cmd_in(&mut dev, 2, 512, &read10(15, 1));
        assert_eq!((d, status), (block(15), CSW_GOOD));
        let mut r16 = [0u8; 16];
        r16[0] = 0x88;
        r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
        r16[13] = 1;
        let (_, _, status, _) = cmd_in(&mut dev, 3, 512, &r16);
        assert_eq!(status, CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x05, 0x21, 0x00, None));
    }

    #[test]
    fn unknown_opcode() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        assert_eq!(cmd_none(&mut dev, 1, &[0xd9, 0, 0, 0, 0, 0]), CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x05, 0x20, 0x00, None));
        // Unknown with a data-out phase: the data is taken and dropped.
        assert_eq!(
            cmd_out(&mut dev, 2, &[0u8; 512], &[0x55, 0, 0, 0, 0, 0, 0, 2, 0, 0]),
            (512, CSW_FAILED)
        );
        assert_eq!(sense(&mut dev).1, 0x20);
        // A following good command clears the sense.
        assert_eq!(cmd_none(&mut dev, 3, &[0, 0, 0, 0, 0, 0]), CSW_GOOD);
        assert_eq!(sense(&mut dev), (0, 0, 0, None));
    }

    #[test]
    fn invalid_cbw_wedges_until_reset() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        let mut bad = cbw(1, 0, false, &[0, 0, 0, 0, 0, 0]);
        bad[0] ^= 0xff;
        assert_eq!(
            wait(|cx| dev.poll_out(EP_OUT, &bad, cx)),
            Poll::Ready(Ok(31))
        );
        assert_eq!(bulk_in(&mut dev, 13), Poll::Ready(Err(Errno::EPIPE)));
        let good = cbw(2, 0, false, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(
            wait(|cx| dev.poll_out(EP_OUT, &good, cx)),
            Poll::Ready(Err(Errno::EPIPE))
        );
        assert!(dev.is_halted(EP_IN) && dev.is_halted(EP_OUT));
        // CLEAR_FEATURE(HALT) alone does not unwedge.
        clear_halt(&mut dev, EP_IN);
        clear_halt(&mut dev, EP_OUT);
        assert!(dev.is_halted(EP_IN) && dev.is_halted(EP_OUT));
        assert_eq!(bulk_in(&mut dev, 13), Poll::Ready(Err(Errno::EPIPE)));
        // Reset Recovery: class reset, then clear both halts.
        bot_reset(&mut dev);
        clear_halt(&mut dev, EP_IN);
        clear_halt(&mut dev, EP_OUT);
        assert!(!dev.is_halted(EP_IN) && !dev.is_halted(EP_OUT));
        assert_eq!(cmd_none(&mut dev, 3, &[0, 0, 0, 0, 0, 0]), CSW_GOOD);

        // Not meaningful CBWs wedge too: wrong size, LUN 1, CB length 0 or 17.
        let mut lun1 = cbw(4, 0, false, &[0; 6]);
        lun1[13] = 1;
        let mut cb0 = cbw(4, 0, false, &[0; 6]);
        cb0[14] = 0;
        let mut cb17 = cbw(4, 0, false, &[0; 6]);
        cb17[14] = 17;
        for c in [&good[..30], &lun1[..], &cb0[..], &cb17[..]] {
            assert_eq!(
                wait(|cx| dev.poll_out(EP_OUT, c, cx)),
                Poll::Ready(Ok(c.len()))
            );
            assert_eq!(bulk_in(&mut dev, 13), Poll::Ready(Err(Errno::EPIPE)));
            bot_reset(&mut dev);
            clear_halt(&mut dev, EP_IN);
            clear_halt(&mut dev, EP_OUT);
        }
        assert_eq!(cmd_none(&mut dev, 5, &[0, 0, 0, 0, 0, 0]), CSW_GOOD);
    }

    #[test]
    fn read_only_medium() {
        let img = image(8);
        let cfg = MscConfig {
            read_only: true,
            ..MscConfig::default()
        };
        let mut dev = device(&img, cfg);
        let data = vec![0xaau8; 512];
        assert_eq!(
            cmd_out(&mut dev, 1, &data, &write10(0, 1)),
            (512, CSW_FAILED)
        );
        assert_eq!(sense(&mut dev), (0x07, 0x27, 0x00, None));
        let (d, _, _, _) = cmd_in(&mut dev, 2, 512, &read10(0, 1));
        assert_eq!(d, block(0), "nothing was written");
        assert_eq!(std::fs::read(img.path()).unwrap()[..512], block(0)[..]);

        // MODE SENSE(6) and (10): WP set.
        let (d, _, status, _) = cmd_in(&mut dev, 3, 192, &[0x1a, 0, 0x3f, 0, 192, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(d[2] & 0x80, 0x80);
        assert_eq!(usize::from(d[0]) + 1, d.len());
        let (d, _, status, _) = cmd_in(&mut dev, 4, 192, &[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 192, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(d[3] & 0x80, 0x80);
        assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
        assert_eq!(d[8], 0x08, "caching page");
    }

    #[test]
    fn mode_sense_writable() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        let (d, residue, status, _) = cmd_in(&mut dev, 1, 192, &[0x1a, 0, 0x3f, 0, 192, 0]);
        assert_eq!(status, CSW_GOOD);
        assert_eq!(d.len(), 24);
        assert_eq!(residue, 192 - 24);
        assert_eq!(d[2] & 0x80, 0, "not write protected");
        assert_eq!(d[3], 0, "no block descriptors");
        assert_eq!(&d[4..6], &[0x08, 0x12]);
        assert_eq!(d[6] & 0x04, 0x04, "WCE");
        // A 4-byte allocation (Linux's first probe) gets just the header.
        let (d, residue, status, _) = cmd_in(&mut dev, 2, 4, &[0x1a, 0, 0x3f, 0, 4, 0]);
        assert_eq!((d.len(), residue, status), (4, 0, CSW_GOOD));
        assert_eq!(d[0], 23, "mode data length describes all the data");
        // Unsupported page and saved values fail.
        let (_, _, status, _) = cmd_in(&mut dev, 3, 192, &[0x1a, 0, 0x1c, 0, 192, 0]);
        assert_eq!(status, CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x05, 0x24, 0x00, None));
        let (_, _, status, _) = cmd_in(&mut dev, 4, 192, &[0x1a, 0, 0xff, 0, 192, 0]);
        assert_eq!(status, CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x05, 0x39, 0x00, None));
    }

    #[test]
    fn bad_lba_read_is_a_medium_error() {
        let img = image(32);
        let cfg = MscConfig {
            bad_lbas: Some(4..6),
            ..MscConfig::default()
        };
        let mut dev = device(&img, cfg);
        // Blocks 0..8 with 4 and 5 bad: blocks 0..4 arrive, then the data
        // phase ends short.
        let (d, residue, status, stalled) = cmd_in(&mut dev, 1, 8 * 512, &read10(0, 8));
        assert!(!stalled);
        assert!(d == (0..4).flat_map(block).collect::<Vec<_>>());
        assert_eq!((residue, status), (4 * 512, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(4)));

        // The bad block is the first one: no data at all, so the IN stalls.
        let (d, residue, status, stalled) = cmd_in(&mut dev, 2, 2 * 512, &read10(5, 2));
        assert!(d.is_empty() && stalled);
        assert_eq!((residue, status), (1024, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(5)));

        // Split URBs, the good data filling the first exactly: stall on the second.
        send_cbw(&mut dev, 3, 4 * 512, true, &read10(2, 4));
        assert_eq!(
            bulk_in(&mut dev, 1024),
            Poll::Ready(Ok((2..4).flat_map(block).collect()))
        );
        assert_eq!(bulk_in(&mut dev, 1024), Poll::Ready(Err(Errno::EPIPE)));
        clear_halt(&mut dev, EP_IN);
        assert_eq!(read_csw(&mut dev, 3), (1024, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(4)));

        // Around the bad range all is well; VERIFY over it fails.
        let (d, _, status, _) = cmd_in(&mut dev, 4, 512, &read10(6, 1));
        assert_eq!((d, status), (block(6), CSW_GOOD));
        assert_eq!(
            cmd_none(&mut dev, 5, &[0x2f, 0, 0, 0, 0, 0, 0, 0, 8, 0]),
            CSW_FAILED
        );
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(4)));
        assert_eq!(
            cmd_none(&mut dev, 6, &[0x2f, 0, 0, 0, 0, 8, 0, 0, 8, 0]),
            CSW_GOOD
        );
    }

    #[test]
    fn flush_makes_writes_durable() {
        let img = image(16);
        let data = Rng(7).bytes(4 * 512);
        {
            let mut dev = device(&img, MscConfig::default());
            assert_eq!(cmd_out(&mut dev, 1, &data, &write10(3, 4)), (0, CSW_GOOD));
            assert_eq!(
                cmd_none(&mut dev, 2, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                CSW_GOOD
            );
            let data2 = Rng(8).bytes(512);
            assert_eq!(cmd_out(&mut dev, 3, &data2, &write10(15, 1)), (0, CSW_GOOD));
            dev.flush().unwrap();
        }
        let on_disk = std::fs::read(img.path()).unwrap();
        assert_eq!(on_disk.len(), 16 * 512);
        assert!(on_disk[3 * 512..7 * 512] == data[..]);
        assert!(on_disk[15 * 512..] == Rng(8).bytes(512)[..]);
        assert_eq!(on_disk[..512], block(0)[..]);
        // Reopened, the device reads what was written.
        let mut dev = device(&img, MscConfig::default());
        let (d, _, _, _) = cmd_in(&mut dev, 4, 4 * 512, &read10(3, 4));
        assert!(d == data);
    }

    #[test]
    fn empty_image_has_no_medium() {
        let img = tempfile::NamedTempFile::new().unwrap();
        let mut dev = device(&img, MscConfig::default());
        assert_eq!(cmd_none(&mut dev, 1, &[0, 0, 0, 0, 0, 0]), CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x02, 0x3a, 0x00, None));
        let (_, residue, status, stalled) =
            cmd_in(&mut dev, 2, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(stalled);
        assert_eq!((residue, status), (8, CSW_FAILED));
        // INQUIRY still works.
        let (d, _, status, _) = cmd_in(&mut dev, 3, 36, &[0x12, 0, 0, 0, 36, 0]);
        assert_eq!((d.len(), status), (36, CSW_GOOD));
    }

    #[test]
    fn odd_sized_image_rounds_down() {
        let mut img = image(3);
        img.write_all(&[1, 2, 3]).unwrap();
        img.flush().unwrap();
        let ms = MassStorage::open(img.path(), MscConfig::default()).unwrap();
        assert_eq!(ms.blocks(), 3);
    }

    #[test]
    fn phase_errors() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        // Host expects 512 bytes, READ asks for 2 blocks (case 7).
        let (d, residue, status, _) = cmd_in(&mut dev, 1, 512, &read10(0, 2));
        assert_eq!(d, block(0));
        assert_eq!((residue, status), (0, CSW_PHASE_ERROR));
        // READ with a data-out phase (case 10): not run, data dropped.
        assert_eq!(
            cmd_out(&mut dev, 2, &[0u8; 512], &read10(0, 1)),
            (512, CSW_PHASE_ERROR)
        );
        // WRITE with a data-in phase (case 8): stall, phase error, no write.
        let (_, residue, status, stalled) = cmd_in(&mut dev, 3, 512, &write10(0, 1));
        assert!(stalled);
        assert_eq!((residue, status), (512, CSW_PHASE_ERROR));
        // Hn < Di (case 2).
        assert_eq!(cmd_none(&mut dev, 4, &read10(0, 1)), CSW_PHASE_ERROR);
        // A command block shorter than the opcode needs.
        send_cbw(&mut dev, 5, 512, true, &read10(0, 1)[..6]);
        assert_eq!(bulk_in(&mut dev, 512), Poll::Ready(Err(Errno::EPIPE)));
        clear_halt(&mut dev, EP_IN);
        assert_eq!(read_csw(&mut dev, 5), (512, CSW_PHASE_ERROR));
        // The host ending a write early with a short packet.
        send_cbw(&mut dev, 6, 1024, false, &write10(0, 2));
        assert_eq!(
            wait(|cx| dev.poll_out(EP_OUT, &[5u8; 100], cx)),
            Poll::Ready(Ok(100))
        );
        assert_eq!(read_csw(&mut dev, 6), (924, CSW_PHASE_ERROR));
        // Windows' REQUEST SENSE with a 12-byte command block is fine.
        let mut rs = [0u8; 12];
        rs[0] = 0x03;
        rs[4] = 18;
        let (d, _, status, _) = cmd_in(&mut dev, 7, 18, &rs);
        assert_eq!((d.len(), status), (18, CSW_GOOD));
    }

    #[test]
    fn misc_commands_succeed() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        assert_eq!(cmd_none(&mut dev, 1, &[0x1e, 0, 0, 0, 1, 0]), CSW_GOOD);
        assert_eq!(cmd_none(&mut dev, 2, &[0x1e, 0, 0, 0, 0, 0]), CSW_GOOD);
        assert_eq!(cmd_none(&mut dev, 3, &[0x1b, 0, 0, 0, 1, 0]), CSW_GOOD);
        assert_eq!(cmd_none(&mut dev, 4, &[0x1b, 0, 0, 0, 2, 0]), CSW_GOOD);
        let mut sc16 = [0u8; 16];
        sc16[0] = 0x91;
        assert_eq!(cmd_none(&mut dev, 5, &sc16), CSW_GOOD);
        // VERIFY(10) with BYTCHK is not offered.
        assert_eq!(
            cmd_none(&mut dev, 6, &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0]),
            CSW_FAILED
        );
        assert_eq!(sense(&mut dev), (0x05, 0x24, 0x00, None));
        // VERIFY out of range.
        assert_eq!(
            cmd_none(&mut dev, 7, &[0x2f, 0, 0, 0, 0, 7, 0, 0, 2, 0]),
            CSW_FAILED
        );
        assert_eq!(sense(&mut dev), (0x05, 0x21, 0x00, None));
    }

    #[test]
    fn idle_in_is_pending_and_woken_by_a_cbw() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        let counter = Arc::new(CountWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 13];
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Pending);
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Pending);
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        send_cbw(&mut dev, 1, 0, false, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        // A second CBW before the CSW is read is NAKed, then woken.
        let c = cbw(2, 0, false, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(dev.poll_out(EP_OUT, &c, &mut cx), Poll::Pending);
        assert_eq!(read_csw(&mut dev, 1), (0, CSW_GOOD));
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert_eq!(dev.poll_out(EP_OUT, &c, &mut cx), Poll::Ready(Ok(31)));
        assert_eq!(read_csw(&mut dev, 2), (0, CSW_GOOD));
        // A CSW buffer too small is babble, and the CSW is kept.
        send_cbw(&mut dev, 3, 0, false, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(bulk_in(&mut dev, 12), Poll::Ready(Err(Errno::EOVERFLOW)));
        assert_eq!(read_csw(&mut dev, 3), (0, CSW_GOOD));
    }

    #[test]
    fn bot_reset_abandons_a_command() {
        let img = image(8);
        let mut dev = device(&img, MscConfig::default());
        send_cbw(&mut dev, 1, 4096, true, &read10(0, 8));
        assert_eq!(bulk_in(&mut dev, 512), Poll::Ready(Ok(block(0))));
        bot_reset(&mut dev);
        let mut buf = [0u8; 512];
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut noop()), Poll::Pending);
        assert_eq!(cmd_none(&mut dev, 2, &[0, 0, 0, 0, 0, 0]), CSW_GOOD);
    }

    /// An in-memory image with the contents of [`image`], whose reads,
    /// writes or syncs fail at a chosen point, and whose reads can be held
    /// until the test lets them go.
    #[derive(Default)]
    struct MemImage {
        data: std::sync::Mutex<Vec<u8>>,
        /// Reads of this byte fail (with EIO), and everything after it.
        bad_read: Option<u64>,
        bad_write: Option<u64>,
        bad_sync: bool,
        /// The bytes `read_at_nowait` finds "in the page cache".
        cached: Option<Range<u64>>,
        /// While set, reads wait; `held` counts those waiting.
        hold: Hold,
    }

    impl MemImage {
        fn new(blocks: u64) -> MemImage {
            let data = (0..blocks * BLOCK_SIZE)
                .map(|i| ((i / BLOCK_SIZE) * 7 + i % BLOCK_SIZE) as u8)
                .collect();
            MemImage {
                data: std::sync::Mutex::new(data),
                ..MemImage::default()
            }
        }

        fn eio() -> io::Error {
            io::Error::from_raw_os_error(libc::EIO)
        }
    }

    impl DiskImage for MemImage {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let (lock, cv) = &*self.hold;
            let mut h = lock.lock().unwrap();
            if h.0 {
                h.1 += 1;
                cv.notify_all();
                while h.0 {
                    h = cv.wait(h).unwrap();
                }
                h.1 -= 1;
            }
            drop(h);
            let data = self.data.lock().unwrap();
            let mut end = (offset as usize + buf.len()).min(data.len());
            if let Some(bad) = self.bad_read {
                if bad <= offset {
                    return Err(Self::eio());
                }
                end = end.min(bad as usize);
            }
            let n = end.saturating_sub(offset as usize);
            buf[..n].copy_from_slice(&data[offset as usize..end]);
            Ok(n)
        }

        fn write_at(&self, src: &[u8], offset: u64) -> io::Result<usize> {
            let mut data = self.data.lock().unwrap();
            let mut end = (offset as usize + src.len()).min(data.len());
            if let Some(bad) = self.bad_write {
                if bad <= offset {
                    return Err(Self::eio());
                }
                end = end.min(bad as usize);
            }
            let n = end.saturating_sub(offset as usize);
            data[offset as usize..end].copy_from_slice(&src[..n]);
            Ok(n)
        }

        fn read_at_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let Some(cached) = &self.cached else {
                return Err(io::ErrorKind::Unsupported.into());
            };
            if !cached.contains(&offset) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let data = self.data.lock().unwrap();
            let end = (offset + buf.len() as u64).min(cached.end) as usize;
            let n = end - offset as usize;
            buf[..n].copy_from_slice(&data[offset as usize..end]);
            Ok(n)
        }

        fn sync_data(&self) -> io::Result<()> {
            if self.bad_sync {
                return Err(Self::eio());
            }
            Ok(())
        }
    }

    type Hold = Arc<(std::sync::Mutex<(bool, usize)>, std::sync::Condvar)>;

    /// Waits until a read is held in the image.
    fn wait_held(hold: &Hold) {
        let (lock, cv) = &**hold;
        let h = lock.lock().unwrap();
        let (h, t) = cv
            .wait_timeout_while(h, std::time::Duration::from_secs(30), |h| h.1 == 0)
            .unwrap();
        assert!(
            !t.timed_out() && h.1 == 1,
            "the read started on the disk thread"
        );
    }

    fn release(hold: &Hold) {
        hold.0.lock().unwrap().0 = false;
        hold.1.notify_all();
    }

    fn mem_device(img: MemImage, blocks: u64) -> EmulatedDevice {
        let cfg = MscConfig {
            serial: "MEM".into(),
            ..MscConfig::default()
        };
        configured(MassStorage::from_image(Box::new(img), blocks * BLOCK_SIZE, cfg).unwrap())
    }

    #[test]
    fn a_failing_image_read_is_a_medium_error_at_its_block() {
        let img = MemImage {
            bad_read: Some(3 * 512 + 100),
            ..MemImage::new(16)
        };
        let mut dev = mem_device(img, 16);
        // Blocks 0..3 arrive; block 3 failed partway, so it does not.
        let (d, residue, status, stalled) = cmd_in(&mut dev, 1, 8 * 512, &read10(0, 8));
        assert!(!stalled);
        assert!(d == (0..3).flat_map(block).collect::<Vec<_>>());
        assert_eq!((residue, status), (5 * 512, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(3)));
        // Starting on the failing block: no data, the IN stalls.
        let (d, residue, status, stalled) = cmd_in(&mut dev, 2, 1024, &read10(3, 2));
        assert!(d.is_empty() && stalled);
        assert_eq!((residue, status), (1024, CSW_FAILED));
        assert_eq!(sense(&mut dev), (0x03, 0x11, 0x00, Some(3)));
        // Before it, all is well.
        let (d, _, status, _) = cmd_in(&mut dev, 3, 1024, &read10(1, 2));
        assert_eq!(status, CSW_GOOD);
        assert!(d == (1..3).flat_map(block).collect::<Vec<_>>());
    }

    #[test]
    fn a_failing_image_write_or_sync_fails_the_command() {
        let img = MemImage {
            bad_write: Some(5 * 512),
            ..MemImage::new(16)
        };
        let mut dev = mem_device(img, 16);
        let data = Rng(3).bytes(4 * 512);
        // The OUT data is taken at once; the failure is in the CSW.
        assert_eq!(cmd_out(&mut dev, 1, &data, &write10(4, 4)).1, CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x03, 0x0c, 0x00, Some(5)));
        // Block 4 was written before the failure.
        let (d, _, _, _) = cmd_in(&mut dev, 2, 512, &read10(4, 1));
        assert!(d == data[..512]);
        // Writes elsewhere still work.
        assert_eq!(cmd_out(&mut dev, 3, &data, &write10(0, 4)), (0, CSW_GOOD));

        let img = MemImage {
            bad_sync: true,
            ..MemImage::new(16)
        };
        let mut dev = mem_device(img, 16);
        let sync = [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(cmd_none(&mut dev, 4, &sync), CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x03, 0x0c, 0x00, None));
        // A FUA write flushes before its CSW, and fails with the flush.
        let mut fua = write10(0, 1);
        fua[1] = 0x08;
        assert_eq!(cmd_out(&mut dev, 5, &data[..512], &fua).1, CSW_FAILED);
        assert_eq!(sense(&mut dev), (0x03, 0x0c, 0x00, None));
        assert!(dev.flush().is_err(), "flush reports the failed fdatasync");
    }

    #[test]
    fn disk_io_runs_off_the_polling_thread_and_wakes_the_transfer() {
        let img = MemImage::new(16);
        let hold = img.hold.clone();
        hold.0.lock().unwrap().0 = true;
        let mut dev = mem_device(img, 16);
        send_cbw(&mut dev, 1, 1024, true, &read10(2, 2));
        // The read is held in the image: the IN transfer is pending, and
        // polling it again does not block either.
        let signal = Arc::new(Signal::default());
        let waker = Waker::from(signal.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = vec![0u8; 1024];
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Pending);
        wait_held(&hold);
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Pending);
        assert!(!*signal.woken.lock().unwrap());
        // Let go, the disk thread finishes the read and wakes the transfer.
        release(&hold);
        let woken = signal.woken.lock().unwrap();
        let (woken, _) = signal
            .cv
            .wait_timeout_while(woken, std::time::Duration::from_secs(30), |w| !*w)
            .unwrap();
        assert!(*woken, "the waiting transfer was woken");
        drop(woken);
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Ready(Ok(1024)));
        assert!(buf == (2..4).flat_map(block).collect::<Vec<_>>());
        assert_eq!(read_csw(&mut dev, 1), (0, CSW_GOOD));
    }

    #[test]
    fn cached_reads_come_at_once_and_the_rest_from_the_disk_thread() {
        let img = MemImage {
            cached: Some(0..4 * 512),
            ..MemImage::new(16)
        };
        let hold = img.hold.clone();
        hold.0.lock().unwrap().0 = true;
        let mut dev = mem_device(img, 16);
        // Cached: the data is there on the first poll, reads held or not.
        send_cbw(&mut dev, 1, 1024, true, &read10(1, 2));
        let mut buf = vec![0u8; 1024];
        assert_eq!(
            dev.poll_in(EP_IN, &mut buf, &mut noop()),
            Poll::Ready(Ok(1024))
        );
        assert!(buf == (1..3).flat_map(block).collect::<Vec<_>>());
        assert_eq!(read_csw(&mut dev, 1), (0, CSW_GOOD));
        // Partly cached: all of it comes from the disk thread.
        send_cbw(&mut dev, 2, 2048, true, &read10(2, 4));
        let mut buf = vec![0u8; 2048];
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut noop()), Poll::Pending);
        wait_held(&hold);
        release(&hold);
        assert_eq!(
            bulk_in(&mut dev, 2048),
            Poll::Ready(Ok((2..6).flat_map(block).collect()))
        );
        assert_eq!(read_csw(&mut dev, 2), (0, CSW_GOOD));
    }

    #[test]
    fn a_reset_during_a_read_drops_its_result() {
        let img = MemImage::new(16);
        let hold = img.hold.clone();
        hold.0.lock().unwrap().0 = true;
        let mut dev = mem_device(img, 16);
        send_cbw(&mut dev, 1, 1024, true, &read10(2, 2));
        let mut buf = vec![0u8; 1024];
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut noop()), Poll::Pending);
        wait_held(&hold);
        bot_reset(&mut dev);
        release(&hold);
        // The next command waits for the abandoned read, then runs alone.
        let (d, residue, status, _) = cmd_in(&mut dev, 2, 512, &read10(9, 1));
        assert_eq!((d, residue, status), (block(9), 0, CSW_GOOD));
    }

    #[test]
    fn superspeed_descriptors() {
        let img = image(8);
        let cfg = MscConfig {
            speed: Speed::Super,
            ..MscConfig::default()
        };
        let mut dev = device(&img, cfg);
        assert!(dev
            .descriptors()
            .endpoints()
            .iter()
            .all(|e| e.max_packet_size == 1024));
        let bos = SetupPacket {
            request_type: 0x80,
            request: 6,
            value: 0x0f00,
            index: 0,
            length: 255,
        };
        let mut b = [0u8; 255];
        let n = dev.control(&bos, &[], &mut b).unwrap();
        assert_eq!(n, 22);
        assert_eq!(usize::from(u16::from_le_bytes([b[2], b[3]])), n);
        // High speed has no BOS.
        let mut dev = device(&img, MscConfig::default());
        assert_eq!(dev.control(&bos, &[], &mut b), Err(Errno::EPIPE));
    }

    /// Random CBWs and random transfers: nothing may panic, every CSW that
    /// comes back carries the tag of the command it answers.
    #[test]
    fn hostile_cbws_never_panic() {
        let img = image(64);
        let cfg = MscConfig {
            bad_lbas: Some(10..12),
            ..MscConfig::default()
        };
        let mut dev = device(&img, cfg);
        let mut rng = Rng(0xdead_beef);
        let mut buf = vec![0u8; 70_000];
        // OUT data from its own zeroed buffer, so no CSW read earlier can
        // be written to the image and come back looking like a fresh CSW.
        let zeros = vec![0u8; 70_000];
        for round in 0..3000u32 {
            let mut c = cbw(round, 0, false, &[]);
            let len = match rng.next() % 4 {
                0 => 0,
                1 => (rng.next() % 70_000) as u32,
                2 => 512 * (rng.next() % 9) as u32,
                _ => rng.next() as u32,
            };
            c[8..12].copy_from_slice(&len.to_le_bytes());
            c[12] = if rng.below(2) == 0 { 0x80 } else { 0 };
            if rng.below(50) == 0 {
                c[12] |= rng.next() as u8;
                c[13] = rng.next() as u8;
            }
            c[14] = (1 + rng.next() % 16) as u8;
            if rng.below(50) == 0 {
                c[14] = rng.next() as u8;
            }
            // Mostly known opcodes, with random fields.
            let ops = [
                0x00, 0x03, 0x08, 0x0a, 0x12, 0x1a, 0x1b, 0x1e, 0x23, 0x25, 0x28, 0x2a, 0x2f, 0x35,
                0x5a, 0x88, 0x8a, 0x8f, 0x91, 0x9e, 0xa8, 0xaa,
            ];
            for b in c[15..31].iter_mut() {
                *b = rng.next() as u8;
            }
            // Keep transfer lengths of READ/WRITE mostly small.
            if rng.below(4) != 0 {
                for b in c[19..31].iter_mut() {
                    *b &= 0x03;
                }
            }
            c[15] = if rng.below(8) == 0 {
                rng.next() as u8
            } else {
                ops[(rng.next() % ops.len() as u64) as usize]
            };
            if rng.below(100) == 0 {
                c[0] = 0;
            }
            let clen = if rng.below(100) == 0 {
                (rng.next() % 40) as usize
            } else {
                31
            };
            let _ = dev.poll_out(EP_OUT, &c[..clen.min(31)], &mut noop());
            let mut got_csw = false;
            for _ in 0..64 {
                let n = (rng.next() % 66_000) as usize;
                let r = if rng.below(3) == 0 {
                    let n = n / 512 * 512;
                    dev.poll_out(EP_OUT, &zeros[..n], &mut noop())
                } else {
                    dev.poll_in(EP_IN, &mut buf[..n], &mut noop())
                };
                if let Poll::Ready(Ok(13)) = r {
                    if buf[0..4] == CSW_SIGNATURE.to_le_bytes() {
                        assert_eq!(buf[4..8], round.to_le_bytes());
                        assert!(buf[12] <= 2);
                        got_csw = true;
                        break;
                    }
                }
                if dev.is_halted(EP_IN) {
                    clear_halt(&mut dev, EP_IN);
                }
                if dev.is_halted(EP_OUT) {
                    clear_halt(&mut dev, EP_OUT);
                }
                if dev.is_halted(EP_IN) || dev.is_halted(EP_OUT) {
                    bot_reset(&mut dev);
                    clear_halt(&mut dev, EP_IN);
                    clear_halt(&mut dev, EP_OUT);
                    break;
                }
            }
            if !got_csw {
                bot_reset(&mut dev);
            }
        }
        // Still a working device afterwards.
        assert_eq!(cmd_none(&mut dev, 1, &[0, 0, 0, 0, 0, 0]), CSW_GOOD);
    }
}
