//! A pcapng capture of every URB the server runs, in the format Linux's
//! usbmon gives through its binary interface (`LINKTYPE_USB_LINUX_MMAPPED`,
//! 220): what Wireshark and tshark read for a USB capture, and what
//! usbipd-win writes too.
//!
//! Each URB gives two records, its submission (`S`) and its completion
//! (`C`), each a 64-byte `struct mon_bin_hdr` ([`MonHeader`]) followed by
//! the isochronous packet descriptors (ISO only) and the data: OUT data on
//! `S`, IN data on `C`, cut to [`SNAPLEN`] bytes as usbmon cuts long
//! transfers (`len_cap` < `len_urb` then). An URB unlinked before it ran
//! completes with -ECONNRESET, as on a local host controller.
//!
//! Bus and device numbers are those the device record gives the importer
//! (`busnum`, `devnum` of OP_REP_IMPORT): the capture's addresses are the
//! device's as the client sees it. URB ids are unique within a capture:
//! each import gets its own range.
//!
//! Wireshark learns what an endpoint carries (mass storage, HID...) from
//! the GET_DESCRIPTOR exchanges it saw. A client that enumerated the device
//! earlier, or a userspace one, sends none on this connection; so each
//! import's capture starts with a synthetic GET_DESCRIPTOR pair for the
//! device and the configuration descriptors the backend holds, as
//! usbipd-win does.
//!
//! The data path never waits for the file: records go to a writer thread
//! over a queue bounded in records and in bytes, and what does not fit is
//! dropped and counted. So is what would take the file past its size limit;
//! the file then ends with the last whole record before it. Once the file
//! is full, records are dropped before they are built. The writer drains
//! its queue in batches and flushes once it has been empty for
//! [`FLUSH_AFTER`]: a crash loses at most the records of that moment, and
//! leaves a file readable up to its last whole block.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};
use tracing::{info, warn};
use usbwire_proto::{Direction, IsoPacket, SetupPacket};

use crate::{TransferType, Urb};

/// Length of a usbmon event header (`struct mon_bin_hdr`, `PKT_SZ_API1`).
pub const HEADER_LEN: usize = 64;
/// Length of one isochronous descriptor (`struct mon_bin_isodesc`).
pub const ISO_DESC_LEN: usize = 16;
/// Isochronous descriptors kept per record at most (usbmon's `ISODESC_MAX`).
pub const MAX_ISO_DESCS: usize = 128;
/// Data bytes kept per record at most; the rest is counted in `len_urb`
/// only, as usbmon does with transfers longer than its buffer allows.
pub const SNAPLEN: usize = 64 * 1024;
/// The default size limit of a capture file.
pub const DEFAULT_LIMIT: u64 = 256 * 1024 * 1024;
/// Records waiting for the writer, at most.
const QUEUE_RECORDS: usize = 8192;
/// Bytes of records waiting for the writer, at most.
const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Ids of one import's URBs: its own range below the import's number.
const IMPORT_ID_SHIFT: u32 = 40;
/// The part of an id that is the URB's own; the synthetic descriptor
/// requests take the top of an import's range.
const URB_ID_MASK: u64 = (1 << IMPORT_ID_SHIFT) - 1;

/// usbmon's `flag_data` and `flag_setup` values.
const FLAG_PRESENT: u8 = 0;
const FLAG_NO_SETUP: u8 = b'-';
const FLAG_IN_SUBMIT: u8 = b'<';
const FLAG_OUT_COMPLETE: u8 = b'>';

/// What to capture, and where.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    pub path: PathBuf,
    /// Only this device's URBs; every device's if `None`.
    pub busid: Option<String>,
    /// Size of the file, in bytes, past which records are dropped. The
    /// file's headers are written whatever the limit.
    pub limit: u64,
}

impl CaptureConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CaptureConfig {
            path: path.into(),
            busid: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// Why a capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot create the capture file {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write the capture file's headers to {path}: {source}")]
    Header { path: PathBuf, source: io::Error },
    #[error("cannot start the capture's writer thread: {0}")]
    Thread(io::Error),
}

/// usbmon's transfer types (`xfer_to_pipe` in mon_bin.c), as Wireshark
/// reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum XferType {
    Isochronous = 0,
    Interrupt = 1,
    Control = 2,
    Bulk = 3,
}

impl From<TransferType> for XferType {
    fn from(t: TransferType) -> Self {
        match t {
            TransferType::Control => XferType::Control,
            TransferType::Isochronous => XferType::Isochronous,
            TransferType::Bulk => XferType::Bulk,
            TransferType::Interrupt => XferType::Interrupt,
        }
    }
}

/// One usbmon event header, `struct mon_bin_hdr` of the kernel's
/// drivers/usb/mon/mon_bin.c, in the byte order of the capture file
/// (little-endian, as the file's section header says).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonHeader {
    /// Pairs an URB's submission with its completion.
    pub id: u64,
    /// `S`ubmission or `C`ompletion.
    pub kind: u8,
    pub xfer_type: u8,
    /// Endpoint number with 0x80 for IN (control transfers included).
    pub epnum: u8,
    pub devnum: u8,
    pub busnum: u16,
    /// 0 when `setup` holds the setup packet, `-` otherwise.
    pub flag_setup: u8,
    /// 0 when data follows, `<` (IN submission) or `>` (OUT completion)
    /// when the direction has none to give.
    pub flag_data: u8,
    pub ts_sec: i64,
    pub ts_usec: i32,
    /// -EINPROGRESS on submission, the URB's status on completion.
    pub status: i32,
    /// transfer_buffer_length on submission, actual_length on completion.
    pub len_urb: u32,
    /// Bytes that follow the header: ISO descriptors and data.
    pub len_cap: u32,
    /// The setup packet, or for ISO: error_count (LE i32) then numdesc.
    pub setup: [u8; 8],
    pub interval: i32,
    pub start_frame: i32,
    pub xfer_flags: u32,
    /// ISO descriptors that follow the header.
    pub ndesc: u32,
}

impl MonHeader {
    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8] = self.kind;
        b[9] = self.xfer_type;
        b[10] = self.epnum;
        b[11] = self.devnum;
        b[12..14].copy_from_slice(&self.busnum.to_le_bytes());
        b[14] = self.flag_setup;
        b[15] = self.flag_data;
        b[16..24].copy_from_slice(&self.ts_sec.to_le_bytes());
        b[24..28].copy_from_slice(&self.ts_usec.to_le_bytes());
        b[28..32].copy_from_slice(&self.status.to_le_bytes());
        b[32..36].copy_from_slice(&self.len_urb.to_le_bytes());
        b[36..40].copy_from_slice(&self.len_cap.to_le_bytes());
        b[40..48].copy_from_slice(&self.setup);
        b[48..52].copy_from_slice(&self.interval.to_le_bytes());
        b[52..56].copy_from_slice(&self.start_frame.to_le_bytes());
        b[56..60].copy_from_slice(&self.xfer_flags.to_le_bytes());
        b[60..64].copy_from_slice(&self.ndesc.to_le_bytes());
        b
    }

    pub fn parse(b: &[u8; HEADER_LEN]) -> MonHeader {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[0..8]);
        let mut ts_sec = [0u8; 8];
        ts_sec.copy_from_slice(&b[16..24]);
        let mut setup = [0u8; 8];
        setup.copy_from_slice(&b[40..48]);
        MonHeader {
            id: u64::from_le_bytes(id),
            kind: b[8],
            xfer_type: b[9],
            epnum: b[10],
            devnum: b[11],
            busnum: u16::from_le_bytes([b[12], b[13]]),
            flag_setup: b[14],
            flag_data: b[15],
            ts_sec: i64::from_le_bytes(ts_sec),
            ts_usec: u32_at(24) as i32,
            status: u32_at(28) as i32,
            len_urb: u32_at(32),
            len_cap: u32_at(36),
            setup,
            interval: u32_at(48) as i32,
            start_frame: u32_at(52) as i32,
            xfer_flags: u32_at(56),
            ndesc: u32_at(60),
        }
    }
}

/// One `struct mon_bin_isodesc`.
fn emit_iso_desc(out: &mut Vec<u8>, status: i32, offset: u32, len: u32) {
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// A record for the writer: one packet block's contents.
struct Record {
    timestamp: Duration,
    /// Header, ISO descriptors and captured data.
    bytes: Vec<u8>,
    /// What the record would be with all of its data.
    original_len: u32,
}

enum Message {
    Record(Record),
    Stop,
}

/// What the data path and the writer share.
#[derive(Default)]
struct Shared {
    queued_bytes: AtomicUsize,
    /// Records not queued: the writer was behind.
    dropped_queue: AtomicU64,
    /// Records not written: the file reached its limit.
    dropped_limit: AtomicU64,
    written: AtomicU64,
    warned_queue: AtomicBool,
    /// The file is full (or failed): records are dropped unbuilt.
    full: AtomicBool,
    /// The capture finished: records are no longer counted either.
    ended: AtomicBool,
    /// The next import's number, for its URB id range.
    next_import: AtomicU64,
}

/// A running capture: hands out per-import recorders, and ends with
/// [`Capture::finish`].
pub struct Capture {
    config: CaptureConfig,
    shared: Arc<Shared>,
    tx: SyncSender<Message>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a capture recorded, for the log and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub written: u64,
    /// Dropped because the writer fell behind.
    pub dropped_queue: u64,
    /// Dropped because the file reached its size limit.
    pub dropped_limit: u64,
}

impl Capture {
    /// Creates the file, writes its headers and starts the writer thread.
    pub fn start(config: CaptureConfig) -> Result<Capture, CaptureError> {
        let file = File::create(&config.path).map_err(|source| CaptureError::Create {
            path: config.path.clone(),
            source,
        })?;
        let (writer, header_len) = start_file(file).map_err(|source| CaptureError::Header {
            path: config.path.clone(),
            source,
        })?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(QUEUE_RECORDS);
        let on_thread = shared.clone();
        let limit = config.limit;
        let path = config.path.clone();
        let thread = std::thread::Builder::new()
            .name("usbipd-capture".into())
            .spawn(move || {
                Writer {
                    w: writer,
                    written: header_len,
                    limit,
                    path: &path,
                    shared: &on_thread,
                    stopped: false,
                }
                .run(rx)
            })
            .map_err(CaptureError::Thread)?;
        info!(
            path = %config.path.display(),
            busid = config.busid.as_deref().unwrap_or("every device"),
            limit = config.limit,
            "capturing URBs (pcapng, usbmon format)"
        );
        Ok(Capture {
            config,
            shared,
            tx,
            writer: Mutex::new(Some(thread)),
        })
    }

    /// A recorder for one import of `busid`, which the importer knows as
    /// `busnum`-`devnum`; `None` if this capture leaves that device out.
    pub fn device(&self, busid: &str, busnum: u32, devnum: u32) -> Option<DeviceCapture> {
        if self.config.busid.as_deref().is_some_and(|b| b != busid) {
            return None;
        }
        let import = self.shared.next_import.fetch_add(1, Ordering::Relaxed);
        Some(DeviceCapture {
            shared: self.shared.clone(),
            tx: self.tx.clone(),
            busnum: busnum.min(u16::MAX.into()) as u16,
            devnum: devnum.min(u8::MAX.into()) as u8,
            id_base: import << IMPORT_ID_SHIFT,
        })
    }

    pub fn stats(&self) -> CaptureStats {
        CaptureStats {
            written: self.shared.written.load(Ordering::Relaxed),
            dropped_queue: self.shared.dropped_queue.load(Ordering::Relaxed),
            dropped_limit: self.shared.dropped_limit.load(Ordering::Relaxed),
        }
    }

    /// Writes what is queued, flushes the file and stops the writer. It
    /// blocks until the file is complete: call it off the async workers.
    /// Records of imports still running are dropped from then on.
    pub fn finish(&self) -> CaptureStats {
        let thread = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.shared.ended.store(true, Ordering::Relaxed);
        if let Some(thread) = thread {
            // Blocks only while the writer drains a full queue.
            let _ = self.tx.send(Message::Stop);
            if thread.join().is_err() {
                warn!("the capture's writer thread panicked; the file may end early");
            }
        }
        let stats = self.stats();
        info!(
            path = %self.config.path.display(),
            written = stats.written,
            dropped_queue = stats.dropped_queue,
            dropped_limit = stats.dropped_limit,
            "capture finished"
        );
        stats
    }
}

/// The section and interface headers; returns the writer and the bytes
/// they took.
fn start_file(file: File) -> io::Result<(PcapNgWriter<BufWriter<File>>, u64)> {
    let mut w = PcapNgWriter::with_endianness(
        BufWriter::with_capacity(256 * 1024, file),
        Endianness::Little,
    )
    .map_err(pcap_io_error)?;
    let idb = InterfaceDescriptionBlock {
        linktype: DataLink::USB_LINUX_MMAPPED,
        snaplen: (HEADER_LEN + MAX_ISO_DESCS * ISO_DESC_LEN + SNAPLEN) as u32,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Borrowed("usbipd")),
            // pcap-file writes packet timestamps in nanoseconds.
            InterfaceDescriptionOption::IfTsResol(9),
        ],
    };
    w.write_pcapng_block(idb).map_err(pcap_io_error)?;
    w.get_mut().flush()?;
    let len = w.get_mut().get_ref().metadata()?.len();
    Ok((w, len))
}

fn pcap_io_error(e: pcap_file::PcapError) -> io::Error {
    match e {
        pcap_file::PcapError::IoError(e) => e,
        e => io::Error::other(e.to_string()),
    }
}

/// Length of the enhanced packet block that carries `data_len` bytes and
/// no options.
fn packet_block_len(data_len: usize) -> u64 {
    (32 + data_len.next_multiple_of(4)) as u64
}

/// How long the writer waits with nothing queued before it flushes what
/// it buffered to the file.
const FLUSH_AFTER: Duration = Duration::from_millis(100);
/// How long a busy writer lets records gather before it drains them: it
/// is not waiting on the queue meanwhile, so senders need not wake it
/// (a system call per record otherwise).
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// The writer thread's state.
struct Writer<'a> {
    w: PcapNgWriter<BufWriter<File>>,
    written: u64,
    limit: u64,
    path: &'a Path,
    shared: &'a Shared,
    /// Full or failed: nothing more is written.
    stopped: bool,
}

impl Writer<'_> {
    fn record(&mut self, r: Record) {
        self.shared
            .queued_bytes
            .fetch_sub(r.bytes.len(), Ordering::Relaxed);
        let len = packet_block_len(r.bytes.len());
        if !self.stopped && self.written + len > self.limit {
            self.stop();
            warn!(
                path = %self.path.display(), limit = self.limit,
                "the capture file reached its size limit: further URBs are not captured \
                 (raise --capture-limit)"
            );
        }
        if self.stopped {
            self.shared.dropped_limit.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: r.timestamp,
            original_len: r.original_len,
            data: Cow::Owned(r.bytes),
            options: vec![],
        };
        match self.w.write_pcapng_block(block) {
            Ok(n) => {
                self.written += n as u64;
                self.shared.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stop();
                warn!(path = %self.path.display(), "writing the capture failed, capture stopped: {e}");
            }
        }
    }

    /// From now on records are dropped, by the senders before they are
    /// even built.
    fn stop(&mut self) {
        self.stopped = true;
        self.shared.full.store(true, Ordering::Relaxed);
    }

    fn flush(&mut self) {
        if let Err(e) = self.w.get_mut().flush() {
            if !self.stopped {
                warn!(path = %self.path.display(), "writing the capture failed, capture stopped: {e}");
            }
            self.stop();
        }
    }

    /// Runs until [`Message::Stop`] or until every sender is gone, then
    /// flushes.
    fn run(mut self, rx: Receiver<Message>) {
        // Bounded by the senders: every turn takes a message or waits.
        loop {
            let mut taken = 0usize;
            // Bounded by the queue's capacity, refilled at most as fast
            // as this drains it.
            loop {
                match rx.try_recv() {
                    Ok(Message::Record(r)) => {
                        self.record(r);
                        taken += 1;
                    }
                    Ok(Message::Stop) | Err(TryRecvError::Disconnected) => {
                        self.flush();
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            if taken > 1 {
                std::thread::sleep(BATCH_PAUSE);
                continue;
            }
            let next = match rx.recv_timeout(FLUSH_AFTER) {
                Err(RecvTimeoutError::Timeout) => {
                    // Quiet: what is buffered reaches the file now.
                    self.flush();
                    rx.recv().ok()
                }
                m => m.ok(),
            };
            match next {
                Some(Message::Record(r)) => self.record(r),
                Some(Message::Stop) | None => {
                    self.flush();
                    return;
                }
            }
        }
    }
}

/// Where one import's URBs are recorded: builds each record on the
/// session's thread and hands it to the writer without waiting.
pub struct DeviceCapture {
    shared: Arc<Shared>,
    tx: SyncSender<Message>,
    busnum: u16,
    devnum: u8,
    id_base: u64,
}

/// What one usbmon event says of an URB.
struct Event<'a> {
    kind: u8,
    id: u64,
    ep: u8,
    direction: Direction,
    xfer: XferType,
    setup: SetupPacket,
    transfer_flags: u32,
    interval: i32,
    start_frame: i32,
    status: i32,
    len_urb: usize,
    data: &'a [u8],
    iso: &'a [IsoPacket],
    /// The IN data of a completed ISO URB lies packed, one packet after
    /// the other, as usbip-host sends it; the descriptors' offsets say so.
    iso_packed: bool,
}

impl DeviceCapture {
    /// `urb` was submitted to the device as an `xfer` transfer.
    pub fn submitted(&self, urb: &Urb, xfer: XferType) {
        let data = match urb.direction {
            Direction::Out => &urb.buf[..urb.length.min(urb.buf.len())],
            Direction::In => &[],
        };
        self.send(&Event {
            kind: b'S',
            id: self.id_base | (urb.id.0 & URB_ID_MASK),
            ep: urb.ep,
            direction: urb.direction,
            xfer,
            setup: urb.setup,
            transfer_flags: urb.transfer_flags,
            interval: urb.interval,
            start_frame: urb.start_frame,
            status: -115, // -EINPROGRESS, as usbmon reports a submission
            len_urb: urb.length,
            data,
            iso: &urb.iso,
            iso_packed: false,
        });
    }

    /// `urb` completed with `status` after moving `actual` bytes.
    pub fn completed(&self, urb: &Urb, xfer: XferType, actual: usize, status: i32) {
        let actual = actual.min(urb.buf.len());
        let data = match urb.direction {
            Direction::In => &urb.buf[..actual],
            Direction::Out => &[],
        };
        self.send(&Event {
            kind: b'C',
            id: self.id_base | (urb.id.0 & URB_ID_MASK),
            ep: urb.ep,
            direction: urb.direction,
            xfer,
            setup: urb.setup,
            transfer_flags: urb.transfer_flags,
            interval: urb.interval,
            start_frame: urb.start_frame,
            status,
            len_urb: actual,
            data,
            iso: &urb.iso,
            iso_packed: urb.direction == Direction::In,
        });
    }

    /// Synthetic GET_DESCRIPTOR exchanges for the device descriptor and
    /// the configuration descriptor, so that a dissector knows the
    /// device's interfaces before its first URB.
    pub fn replay_descriptors(&self, device: &[u8], configuration: &[u8]) {
        let requests = [(0x0100u16, device), (0x0200u16, configuration)];
        for (i, (value, bytes)) in requests.into_iter().enumerate() {
            let len = bytes.len().min(usize::from(u16::MAX));
            let setup = SetupPacket {
                request_type: 0x80,
                request: 6, // GET_DESCRIPTOR
                value,
                index: 0,
                length: len as u16,
            };
            let mut event = Event {
                kind: b'S',
                id: self.id_base | (URB_ID_MASK - i as u64),
                ep: 0,
                direction: Direction::In,
                xfer: XferType::Control,
                setup,
                transfer_flags: 0x200, // URB_DIR_IN
                interval: 0,
                start_frame: 0,
                status: -115,
                len_urb: len,
                data: &[],
                iso: &[],
                iso_packed: false,
            };
            self.send(&event);
            event.kind = b'C';
            event.status = 0;
            event.data = &bytes[..len];
            self.send(&event);
        }
    }

    fn send(&self, event: &Event<'_>) {
        if self.shared.full.load(Ordering::Relaxed) {
            if !self.shared.ended.load(Ordering::Relaxed) {
                self.shared.dropped_limit.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (bytes, original_len) = encode(event, self.busnum, self.devnum, timestamp);
        let len = bytes.len();
        let queued = self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let record = Record {
            timestamp,
            bytes,
            original_len,
        };
        let refused = if queued + len > QUEUE_BYTES {
            true
        } else {
            match self.tx.try_send(Message::Record(record)) {
                Ok(()) => false,
                Err(TrySendError::Full(_)) => true,
                // Finished: nothing more is captured, and that is no loss
                // to report.
                Err(TrySendError::Disconnected(_)) => {
                    self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                    return;
                }
            }
        };
        if refused {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.shared.dropped_queue.fetch_add(1, Ordering::Relaxed);
            if !self.shared.warned_queue.swap(true, Ordering::Relaxed) {
                warn!(
                    "the capture's writer falls behind: URB records are being dropped \
                     (counted; the total is logged when the capture ends)"
                );
            }
        }
    }
}

/// The bytes of one record: header, ISO descriptors, data cut to
/// [`SNAPLEN`]; and the record's length had nothing been cut.
fn encode(event: &Event<'_>, busnum: u16, devnum: u8, ts: Duration) -> (Vec<u8>, u32) {
    let captured = event.data.len().min(SNAPLEN);
    let ndesc = if event.xfer == XferType::Isochronous {
        event.iso.len().min(MAX_ISO_DESCS)
    } else {
        0
    };
    let lendesc = ndesc * ISO_DESC_LEN;
    let dir_bit = if event.direction == Direction::In {
        0x80
    } else {
        0
    };
    let mut h = MonHeader {
        id: event.id,
        kind: event.kind,
        xfer_type: event.xfer as u8,
        epnum: (event.ep & 0x7f) | dir_bit,
        devnum,
        busnum,
        flag_setup: FLAG_NO_SETUP,
        flag_data: FLAG_PRESENT,
        ts_sec: ts.as_secs() as i64,
        ts_usec: ts.subsec_micros() as i32,
        status: event.status,
        len_urb: event.len_urb.min(u32::MAX as usize) as u32,
        len_cap: (captured + lendesc) as u32,
        xfer_flags: event.transfer_flags,
        ..MonHeader::default()
    };
    if event.xfer == XferType::Control && event.kind == b'S' {
        h.flag_setup = FLAG_PRESENT;
        h.setup = event.setup.to_bytes();
    }
    if event.data.is_empty() {
        h.flag_data = match (event.kind, event.direction) {
            (b'S', Direction::In) => FLAG_IN_SUBMIT,
            (b'C', Direction::Out) => FLAG_OUT_COMPLETE,
            _ => FLAG_PRESENT,
        };
    }
    match event.xfer {
        XferType::Interrupt => h.interval = event.interval,
        XferType::Isochronous => {
            h.interval = event.interval;
            h.start_frame = event.start_frame;
            let errors = event.iso.iter().filter(|p| p.status != 0).count() as i32;
            h.setup[0..4].copy_from_slice(&errors.to_le_bytes());
            let numdesc = event.iso.len().min(i32::MAX as usize) as i32;
            h.setup[4..8].copy_from_slice(&numdesc.to_le_bytes());
            h.ndesc = ndesc as u32;
        }
        _ => {}
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + lendesc + captured);
    bytes.extend_from_slice(&h.emit());
    let mut packed_at = 0u32;
    for p in &event.iso[..ndesc] {
        let (offset, len) = if event.kind == b'S' {
            (p.offset, p.length)
        } else if event.iso_packed {
            let len = p.actual_length.min(p.length);
            let at = packed_at;
            packed_at = packed_at.saturating_add(len);
            (at, len)
        } else {
            (p.offset, p.actual_length)
        };
        emit_iso_desc(&mut bytes, p.status, offset, len);
    }
    bytes.extend_from_slice(&event.data[..captured]);
    let original = HEADER_LEN + lendesc + event.data.len();
    (bytes, original.min(u32::MAX as usize) as u32)
}

/// A recorder whose records the test reads, on a queue of `capacity`.
#[cfg(test)]
pub(crate) fn test_recorder(capacity: usize) -> (DeviceCapture, TestRecords) {
    let shared = Arc::new(Shared::default());
    let (tx, rx) = mpsc::sync_channel(capacity);
    let d = DeviceCapture {
        shared: shared.clone(),
        tx,
        busnum: 1,
        devnum: 4,
        id_base: 3 << IMPORT_ID_SHIFT,
    };
    (d, TestRecords { rx, shared })
}

/// What a [`test_recorder`] recorded.
#[cfg(test)]
pub(crate) struct TestRecords {
    rx: Receiver<Message>,
    shared: Arc<Shared>,
}

#[cfg(test)]
impl TestRecords {
    /// The records queued since the last call: header, what follows it,
    /// and the record's length had nothing been cut.
    pub(crate) fn take(&self) -> Vec<(MonHeader, Vec<u8>, u32)> {
        let mut out = Vec::new();
        while let Ok(Message::Record(r)) = self.rx.try_recv() {
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&r.bytes[..HEADER_LEN]);
            out.push((
                MonHeader::parse(&h),
                r.bytes[HEADER_LEN..].to_vec(),
                r.original_len,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests;
