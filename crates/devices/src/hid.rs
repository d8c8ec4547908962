//! A boot-protocol HID keyboard that types text given to it from outside.
//!
//! The keyboard itself ([`HidKeyboard`]) lives in the server's connection
//! task; text arrives through a [`KeyboardHandle`] from anywhere (a FIFO, a
//! CLI, a test). Between them sits a bounded queue of 8-byte input reports,
//! which the interrupt IN endpoint drains one report per transfer.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};
use usbwire_proto::{Errno, SetupPacket, Speed};

use usbwire_usb::{Recipient, Request, RequestType, StandardRequest};

use crate::core::{reply, Function};
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

/// Reports queued at most; a press and a release per character, so about
/// 2000 characters of typing ahead.
pub const QUEUE_CAPACITY: usize = 4096;

/// The interrupt IN endpoint.
pub const EP_IN: u8 = 0x81;

/// The length of every input report, as the report descriptor declares it.
/// Linux's hid-core discards shorter reports, which would leave keys stuck.
pub const REPORT_LEN: usize = 8;

/// Modifier bits of byte 0 of a report.
pub mod modifier {
    pub const LEFT_CTRL: u8 = 0x01;
    pub const LEFT_SHIFT: u8 = 0x02;
    pub const LEFT_ALT: u8 = 0x04;
    pub const LEFT_GUI: u8 = 0x08;
    pub const RIGHT_CTRL: u8 = 0x10;
    pub const RIGHT_SHIFT: u8 = 0x20;
    pub const RIGHT_ALT: u8 = 0x40;
    pub const RIGHT_GUI: u8 = 0x80;
}

/// HID class requests (HID 1.11 section 7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HidRequest {
    GetReport,
    GetIdle,
    GetProtocol,
    SetReport,
    SetIdle,
    SetProtocol,
}

impl HidRequest {
    pub fn from_code(code: u8) -> Option<HidRequest> {
        Some(match code {
            0x01 => HidRequest::GetReport,
            0x02 => HidRequest::GetIdle,
            0x03 => HidRequest::GetProtocol,
            0x09 => HidRequest::SetReport,
            0x0a => HidRequest::SetIdle,
            0x0b => HidRequest::SetProtocol,
            _ => return None,
        })
    }

    /// bRequest.
    pub const fn code(self) -> u8 {
        match self {
            HidRequest::GetReport => 0x01,
            HidRequest::GetIdle => 0x02,
            HidRequest::GetProtocol => 0x03,
            HidRequest::SetReport => 0x09,
            HidRequest::SetIdle => 0x0a,
            HidRequest::SetProtocol => 0x0b,
        }
    }
}

/// Report types, the high byte of wValue in GET_REPORT/SET_REPORT.
const REPORT_INPUT: u8 = 1;
const REPORT_OUTPUT: u8 = 2;

/// Class descriptor types.
pub const DT_HID: u8 = 0x21;
pub const DT_REPORT: u8 = 0x22;

/// The boot keyboard report descriptor of HID 1.11 appendix B.1 / E.6:
/// modifiers, a reserved byte, 5 LED output bits and 3 of padding, and a
/// 6-key array; 8 bytes in, 1 byte out.
pub const REPORT_DESCRIPTOR: [u8; 63] = [
    0x05, 0x01, // Usage Page (Generic Desktop)
    0x09, 0x06, // Usage (Keyboard)
    0xa1, 0x01, // Collection (Application)
    0x05, 0x07, //   Usage Page (Keyboard/Keypad)
    0x19, 0xe0, //   Usage Minimum (Left Control)
    0x29, 0xe7, //   Usage Maximum (Right GUI)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x01, //   Logical Maximum (1)
    0x75, 0x01, //   Report Size (1)
    0x95, 0x08, //   Report Count (8)
    0x81, 0x02, //   Input (Data, Variable, Absolute): modifiers
    0x95, 0x01, //   Report Count (1)
    0x75, 0x08, //   Report Size (8)
    0x81, 0x01, //   Input (Constant): reserved byte
    0x95, 0x05, //   Report Count (5)
    0x75, 0x01, //   Report Size (1)
    0x05, 0x08, //   Usage Page (LEDs)
    0x19, 0x01, //   Usage Minimum (Num Lock)
    0x29, 0x05, //   Usage Maximum (Kana)
    0x91, 0x02, //   Output (Data, Variable, Absolute): LEDs
    0x95, 0x01, //   Report Count (1)
    0x75, 0x03, //   Report Size (3)
    0x91, 0x01, //   Output (Constant): padding
    0x95, 0x06, //   Report Count (6)
    0x75, 0x08, //   Report Size (8)
    0x15, 0x00, //   Logical Minimum (0)
    0x25, 0x65, //   Logical Maximum (101)
    0x05, 0x07, //   Usage Page (Keyboard/Keypad)
    0x19, 0x00, //   Usage Minimum (0)
    0x29, 0x65, //   Usage Maximum (101)
    0x81, 0x00, //   Input (Data, Array): key array
    0xc0, // End Collection
];

/// The 9-byte HID descriptor: bcdHID 1.11, no country, one report descriptor.
pub const HID_DESCRIPTOR: [u8; 9] = [
    9,
    DT_HID,
    0x11,
    0x01,
    0,
    1,
    DT_REPORT,
    REPORT_DESCRIPTOR.len() as u8,
    0,
];

/// Why text or a report could not be queued. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyboardError {
    #[error("no key on a US keyboard types {0:?}")]
    UnmappedChar(char),
    #[error("keyboard queue full: {needed} reports needed, {free} free")]
    QueueFull { needed: usize, free: usize },
    #[error("a report holds at most 6 keys, got {0}")]
    TooManyKeys(usize),
}

/// The modifiers and usage ID that type `c` on a US keyboard.
pub fn keystroke(c: char) -> Option<(u8, u8)> {
    const SHIFT: u8 = modifier::LEFT_SHIFT;
    let k = match c {
        'a'..='z' => (0, 0x04 + (c as u8 - b'a')),
        'A'..='Z' => (SHIFT, 0x04 + (c as u8 - b'A')),
        '1'..='9' => (0, 0x1e + (c as u8 - b'1')),
        '0' => (0, 0x27),
        '\n' => (0, 0x28),
        '\x1b' => (0, 0x29),
        '\x08' => (0, 0x2a),
        '\t' => (0, 0x2b),
        ' ' => (0, 0x2c),
        '!' => (SHIFT, 0x1e),
        '@' => (SHIFT, 0x1f),
        '#' => (SHIFT, 0x20),
        '$' => (SHIFT, 0x21),
        '%' => (SHIFT, 0x22),
        '^' => (SHIFT, 0x23),
        '&' => (SHIFT, 0x24),
        '*' => (SHIFT, 0x25),
        '(' => (SHIFT, 0x26),
        ')' => (SHIFT, 0x27),
        '-' => (0, 0x2d),
        '_' => (SHIFT, 0x2d),
        '=' => (0, 0x2e),
        '+' => (SHIFT, 0x2e),
        '[' => (0, 0x2f),
        '{' => (SHIFT, 0x2f),
        ']' => (0, 0x30),
        '}' => (SHIFT, 0x30),
        '\\' => (0, 0x31),
        '|' => (SHIFT, 0x31),
        ';' => (0, 0x33),
        ':' => (SHIFT, 0x33),
        '\'' => (0, 0x34),
        '"' => (SHIFT, 0x34),
        '`' => (0, 0x35),
        '~' => (SHIFT, 0x35),
        ',' => (0, 0x36),
        '<' => (SHIFT, 0x36),
        '.' => (0, 0x37),
        '>' => (SHIFT, 0x37),
        '/' => (0, 0x38),
        '?' => (SHIFT, 0x38),
        _ => return None,
    };
    Some(k)
}

/// What the keyboard and its handles share: the reports typed ahead and
/// the LEDs the host last set.
struct KeyQueue {
    reports: VecDeque<[u8; REPORT_LEN]>,
    /// The IN transfer waiting for a report.
    waker: Option<Waker>,
    /// Typists waiting for the host to make room in a full queue.
    room: Arc<tokio::sync::Notify>,
    leds: u8,
}

/// Types on the keyboard from any thread or task. Cheap to clone.
#[derive(Clone)]
pub struct KeyboardHandle {
    queue: Arc<Mutex<KeyQueue>>,
}

fn lock(queue: &Mutex<KeyQueue>) -> MutexGuard<'_, KeyQueue> {
    // A poisoned lock means a panic elsewhere mid-push; the queue is still
    // a valid queue.
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeyboardHandle {
    /// Queues all `reports` or none, then wakes the waiting IN transfer.
    fn queue(&self, reports: &[[u8; REPORT_LEN]]) -> Result<(), KeyboardError> {
        let mut s = lock(&self.queue);
        let free = QUEUE_CAPACITY - s.reports.len().min(QUEUE_CAPACITY);
        if reports.len() > free {
            return Err(KeyboardError::QueueFull {
                needed: reports.len(),
                free,
            });
        }
        s.reports.extend(reports.iter().copied());
        let w = s.waker.take();
        drop(s);
        if let Some(w) = w {
            w.wake();
        }
        Ok(())
    }

    /// Types `text` on a US layout: a press and a release report per
    /// character. All of it is queued or none of it.
    pub fn type_text(&self, text: &str) -> Result<(), KeyboardError> {
        let chars = text.chars().count();
        // Check the bound before allocating for hostile-sized input.
        let needed = chars.saturating_mul(2);
        if needed > QUEUE_CAPACITY {
            return Err(KeyboardError::QueueFull {
                needed,
                free: QUEUE_CAPACITY - self.queued().min(QUEUE_CAPACITY),
            });
        }
        let mut reports = Vec::with_capacity(needed);
        for c in text.chars() {
            let (m, k) = keystroke(c).ok_or(KeyboardError::UnmappedChar(c))?;
            reports.push([m, 0, k, 0, 0, 0, 0, 0]);
            reports.push([0; REPORT_LEN]);
        }
        self.queue(&reports)
    }

    /// Queues one report holding these modifiers and keys down (usage IDs
    /// of the keyboard page), until a later report releases them. The boot
    /// report descriptor declares usages 0..=0x65; the host ignores others.
    pub fn press(&self, modifiers: u8, keys: &[u8]) -> Result<(), KeyboardError> {
        if keys.len() > 6 {
            return Err(KeyboardError::TooManyKeys(keys.len()));
        }
        let mut r = [0u8; REPORT_LEN];
        r[0] = modifiers;
        r[2..2 + keys.len()].copy_from_slice(keys);
        self.queue(&[r])
    }

    /// Queues a report with every key up.
    pub fn release_all(&self) -> Result<(), KeyboardError> {
        self.queue(&[[0; REPORT_LEN]])
    }

    /// Queues a raw 8-byte input report as is.
    pub fn send_report(&self, report: [u8; REPORT_LEN]) -> Result<(), KeyboardError> {
        self.queue(&[report])
    }

    /// The LED state the host last set (bit 0 Num Lock, 1 Caps Lock,
    /// 2 Scroll Lock, 3 Compose, 4 Kana).
    pub fn leds(&self) -> u8 {
        lock(&self.queue).leds
    }

    /// Reports waiting for the host.
    pub fn queued(&self) -> usize {
        lock(&self.queue).reports.len()
    }

    /// Drops everything not yet delivered.
    pub fn clear(&self) {
        lock(&self.queue).reports.clear();
    }
}

/// The keyboard function.
pub struct HidKeyboard {
    descriptors: Descriptors,
    queue: Arc<Mutex<KeyQueue>>,
    /// The last report the host received: what GET_REPORT answers, since it
    /// is the key state the host believes in.
    current: [u8; REPORT_LEN],
    /// SET_IDLE duration in 4 ms units. Remembered and reported, but no
    /// repeats are sent: they would only restate a key state the host has.
    idle: u8,
    /// 0 boot, 1 report; both use the same 8-byte report here.
    protocol: u8,
}

/// HID 1.11 7.2.4: keyboards start with a 500 ms idle rate.
const DEFAULT_IDLE: u8 = 125;

impl HidKeyboard {
    pub fn new() -> (HidKeyboard, KeyboardHandle) {
        Self::with_serial("0001")
    }

    /// As [`HidKeyboard::new`] with another iSerialNumber, so that several
    /// keyboards get distinct udev names.
    pub fn with_serial(serial: &str) -> (HidKeyboard, KeyboardHandle) {
        let queue = Arc::new(Mutex::new(KeyQueue {
            reports: VecDeque::new(),
            waker: None,
            room: Arc::new(tokio::sync::Notify::new()),
            leds: 0,
        }));
        let kbd = HidKeyboard {
            descriptors: build_descriptors(serial),
            queue: queue.clone(),
            current: [0; REPORT_LEN],
            idle: DEFAULT_IDLE,
            protocol: 1,
        };
        (kbd, KeyboardHandle { queue })
    }

    pub fn handle(&self) -> KeyboardHandle {
        KeyboardHandle {
            queue: self.queue.clone(),
        }
    }

    pub fn leds(&self) -> u8 {
        lock(&self.queue).leds
    }

    /// 0 boot, 1 report.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    pub fn idle(&self) -> u8 {
        self.idle
    }
}

fn build_descriptors(serial: &str) -> Descriptors {
    let mut body = Vec::with_capacity(25);
    body.extend_from_slice(&descriptors::interface(0, 0, 1, 3, 1, 1, 0));
    body.extend_from_slice(&HID_DESCRIPTOR);
    body.extend_from_slice(&descriptors::endpoint(
        EP_IN,
        TransferType::Interrupt,
        REPORT_LEN as u16,
        10,
    ));
    Descriptors::new(
        Speed::Full,
        DeviceDescriptor {
            usb_version: 0x0200,
            class: 0,
            subclass: 0,
            protocol: 0,
            max_packet_size0: 64,
            vendor_id: 0x0525,
            product_id: 0xa4ac,
            device_version: 0x0100,
            manufacturer: Some("usbwire".into()),
            product: Some("usbwire keyboard".into()),
            serial: Some(serial.into()),
        },
        0,
        100,
        &body,
        &[],
    )
}

impl Function for HidKeyboard {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control_in(&mut self, s: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        let r = Request::from(s);
        if r.recipient != Recipient::Interface || r.index != 0 {
            return None;
        }
        match r.request_type {
            RequestType::Standard => match (r.standard()?, r.descriptor_type()) {
                (StandardRequest::GetDescriptor, DT_REPORT) => {
                    Some(Ok(reply(&REPORT_DESCRIPTOR, buf)))
                }
                (StandardRequest::GetDescriptor, DT_HID) => Some(Ok(reply(&HID_DESCRIPTOR, buf))),
                _ => None,
            },
            RequestType::Class => match HidRequest::from_code(r.request)? {
                HidRequest::GetReport => match (r.value >> 8) as u8 {
                    REPORT_INPUT => Some(Ok(reply(&self.current, buf))),
                    REPORT_OUTPUT => Some(Ok(reply(&[self.leds()], buf))),
                    _ => Some(Err(Errno::EPIPE)),
                },
                HidRequest::GetIdle => Some(Ok(reply(&[self.idle], buf))),
                HidRequest::GetProtocol => Some(Ok(reply(&[self.protocol], buf))),
                _ => None,
            },
            _ => None,
        }
    }

    fn control_out(&mut self, s: &SetupPacket, data: &[u8]) -> Option<Result<(), Errno>> {
        let r = Request::from(s);
        // wIndex is the interface, all 16 bits of it (HID 1.11 7.2).
        if r.index != 0 {
            return None;
        }
        match HidRequest::from_code(r.class_to_interface(0)?)? {
            HidRequest::SetReport => {
                // Only the LED output report exists.
                if (r.value >> 8) as u8 != REPORT_OUTPUT || data.is_empty() {
                    return Some(Err(Errno::EPIPE));
                }
                lock(&self.queue).leds = data[0] & 0x1f;
                tracing::debug!(leds = data[0], "keyboard: LEDs");
                Some(Ok(()))
            }
            HidRequest::SetIdle => {
                self.idle = (r.value >> 8) as u8;
                Some(Ok(()))
            }
            HidRequest::SetProtocol => match r.value {
                0 | 1 => {
                    self.protocol = r.value as u8;
                    Some(Ok(()))
                }
                _ => Some(Err(Errno::EPIPE)),
            },
            _ => None,
        }
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
        let mut s = lock(&self.queue);
        let Some(report) = s.reports.pop_front() else {
            match &s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => s.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        };
        s.room.notify_waiters();
        drop(s);
        if buf.len() < REPORT_LEN {
            // Babble, as a real keyboard would: the report is lost rather
            // than kept, or a host stuck on small buffers would loop on it.
            return Poll::Ready(Err(Errno::EOVERFLOW));
        }
        buf[..REPORT_LEN].copy_from_slice(&report);
        self.current = report;
        Poll::Ready(Ok(REPORT_LEN))
    }

    fn transfer_out(
        &mut self,
        _ep: u8,
        _data: &[u8],
        _cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        Poll::Ready(Err(Errno::EPIPE))
    }

    fn reset(&mut self) {
        // Typed-ahead text stays queued: it was typed for whoever imports
        // the keyboard, and enumeration resets it.
        self.current = [0; REPORT_LEN];
        self.idle = DEFAULT_IDLE;
        self.protocol = 1;
        lock(&self.queue).leds = 0;
    }
}

/// Longest line typed in one piece; longer lines are typed in several.
const MAX_CHUNK_CHARS: usize = 256;
/// Bytes read at most before typing what has arrived, newline or not.
const MAX_LINE_BYTES: u64 = 4096;

/// Types every line read from `reader`, newline included, until end of
/// file. Characters with no US key are skipped with a warning rather than
/// losing the whole line; a full queue is waited out, not an error.
pub async fn feed_lines<R: AsyncBufRead + Unpin>(
    mut reader: R,
    handle: KeyboardHandle,
) -> io::Result<()> {
    let mut line = Vec::new();
    // Bytes of a UTF-8 character cut by the line-length bound.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        line.clear();
        line.append(&mut carry);
        let n = (&mut reader)
            .take(MAX_LINE_BYTES)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 && line.is_empty() {
            return Ok(());
        }
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t.to_owned(),
            Err(e) if e.error_len().is_none() && n > 0 => {
                carry = line.split_off(e.valid_up_to());
                String::from_utf8_lossy(&line).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&line).into_owned(),
        };
        // CRLF input types one Enter, not a stray unmapped '\r'.
        let text = match text.strip_suffix("\r\n") {
            Some(t) => format!("{t}\n"),
            None => text,
        };
        type_waiting(&handle, &text).await;
        if n == 0 {
            return Ok(());
        }
    }
}

async fn type_waiting(handle: &KeyboardHandle, text: &str) {
    let mut chunk = String::new();
    let mut count = 0;
    for c in text.chars() {
        if keystroke(c).is_none() {
            tracing::warn!(char = ?c, "keyboard: no US key for character, skipped");
            continue;
        }
        chunk.push(c);
        count += 1;
        if count == MAX_CHUNK_CHARS {
            type_chunk(handle, &chunk).await;
            chunk.clear();
            count = 0;
        }
    }
    if !chunk.is_empty() {
        type_chunk(handle, &chunk).await;
    }
}

async fn type_chunk(handle: &KeyboardHandle, chunk: &str) {
    let room = lock(&handle.queue).room.clone();
    loop {
        // Registered before the attempt, so that a report the host takes
        // between a refusal and the wait still wakes it.
        let made_room = room.notified();
        tokio::pin!(made_room);
        made_room.as_mut().enable();
        match handle.type_text(chunk) {
            Ok(()) => return,
            // The host drains the queue at its own pace.
            Err(KeyboardError::QueueFull { .. }) => made_room.await,
            Err(e) => {
                tracing::warn!(error = %e, "keyboard: text dropped");
                return;
            }
        }
    }
}

/// Creates the FIFO at `path` if missing (mode 0600) and types whatever is
/// written to it, forever: `echo hello > path` types "hello" and Enter.
/// Opened read-only and reopened after each writer closes, so a writer
/// sees the usual blocking-open FIFO behaviour and a partial last line is
/// typed when its writer closes.
pub async fn serve_fifo(path: &Path, handle: KeyboardHandle) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a FIFO", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        }
        Err(e) => return Err(e),
    }
    loop {
        let rx = tokio::net::unix::pipe::OpenOptions::new().open_receiver(path)?;
        let started = tokio::time::Instant::now();
        feed_lines(tokio::io::BufReader::new(rx), handle.clone()).await?;
        // An immediate end of file would otherwise turn this into a busy loop.
        if started.elapsed() < Duration::from_millis(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::EmulatedDevice;
    use crate::test_util::{setup, CountWaker};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn configured() -> (EmulatedDevice, KeyboardHandle) {
        let (kbd, h) = HidKeyboard::new();
        let mut dev = EmulatedDevice::new(kbd);
        dev.control(&setup(0, 9, 1, 0, 0), &[], &mut []).unwrap();
        (dev, h)
    }

    fn drain(dev: &mut EmulatedDevice) -> Vec<[u8; 8]> {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        for _ in 0..QUEUE_CAPACITY + 1 {
            let mut buf = [0u8; 64];
            match dev.poll_in(EP_IN, &mut buf, &mut cx) {
                Poll::Ready(Ok(n)) => {
                    assert_eq!(n, 8);
                    out.push(buf[..8].try_into().unwrap());
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
        }
        out
    }

    #[test]
    fn descriptors_parse() {
        let (mut dev, _) = configured();
        let mut buf = [0u8; 256];
        let n = dev
            .control(&setup(0x80, 6, 0x0100, 0, 18), &[], &mut buf)
            .unwrap();
        assert_eq!(n, 18);
        assert_eq!(&buf[8..12], &[0x25, 0x05, 0xac, 0xa4]);
        let n = dev
            .control(&setup(0x80, 6, 0x0200, 0, 256), &[], &mut buf)
            .unwrap();
        let cfg = &buf[..n];
        assert_eq!(n, 9 + 9 + 9 + 7);
        assert_eq!(&cfg[9..18], &[9, 4, 0, 0, 1, 3, 1, 1, 0]);
        let hid = &cfg[18..27];
        assert_eq!(hid[1], DT_HID);
        assert_eq!(u16::from_le_bytes([hid[2], hid[3]]), 0x0111);
        assert_eq!(hid[6], DT_REPORT);
        assert_eq!(
            u16::from_le_bytes([hid[7], hid[8]]) as usize,
            REPORT_DESCRIPTOR.len()
        );
        assert_eq!(&cfg[27..34], &[7, 5, 0x81, 3, 8, 0, 10]);
        assert_eq!(dev.descriptors().speed, Speed::Full);
        // Full speed only: no qualifier and no other-speed configuration.
        for ty in [6u16, 7] {
            assert_eq!(
                dev.control(&setup(0x80, 6, ty << 8, 0, 255), &[], &mut buf),
                Err(Errno::EPIPE)
            );
        }

        // Interface-recipient GET_DESCRIPTOR reaches the function.
        let n = dev
            .control(&setup(0x81, 6, 0x2200, 0, 255), &[], &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &REPORT_DESCRIPTOR);
        let n = dev
            .control(&setup(0x81, 6, 0x2100, 0, 255), &[], &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &HID_DESCRIPTOR);
        // wLength bounds the answer.
        let n = dev
            .control(&setup(0x81, 6, 0x2200, 0, 10), &[], &mut buf)
            .unwrap();
        assert_eq!(n, 10);
        assert_eq!(
            dev.control(&setup(0x81, 6, 0x2300, 0, 255), &[], &mut buf),
            Err(Errno::EPIPE)
        );
    }

    /// Sums the input and output bits the report descriptor declares, with
    /// the item grammar of HID 1.11 section 6.2.2 (short items only).
    fn report_bits(desc: &[u8]) -> (u32, u32) {
        let (mut size, mut count, mut input, mut output) = (0u32, 0u32, 0u32, 0u32);
        let mut i = 0;
        while i < desc.len() {
            let prefix = desc[i];
            let len = match prefix & 3 {
                3 => 4,
                n => n as usize,
            };
            let mut v = 0u32;
            for (k, b) in desc[i + 1..i + 1 + len].iter().enumerate() {
                v |= u32::from(*b) << (8 * k);
            }
            match prefix & 0xfc {
                0x74 => size = v,
                0x94 => count = v,
                0x80 => input += size * count,
                0x90 => output += size * count,
                _ => {}
            }
            i += 1 + len;
        }
        (input, output)
    }

    #[test]
    fn handle_crosses_threads_and_keyboard_is_a_function() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        fn function<T: Function>() {}
        send_sync::<KeyboardHandle>();
        function::<HidKeyboard>();
        let (kbd, h) = HidKeyboard::new();
        // A handle made later shares the same queue.
        kbd.handle().type_text("q").unwrap();
        assert_eq!(h.queued(), 2);
    }

    #[test]
    fn report_descriptor_declares_8_byte_input() {
        assert_eq!(report_bits(&REPORT_DESCRIPTOR), (64, 8));
    }

    #[test]
    fn typing_produces_press_release_pairs() {
        let (mut dev, h) = configured();
        h.type_text("Hi!\n").unwrap();
        assert_eq!(h.queued(), 8);
        let up = [0u8; 8];
        assert_eq!(
            drain(&mut dev),
            vec![
                [0x02, 0, 0x0b, 0, 0, 0, 0, 0],
                up,
                [0, 0, 0x0c, 0, 0, 0, 0, 0],
                up,
                [0x02, 0, 0x1e, 0, 0, 0, 0, 0],
                up,
                [0, 0, 0x28, 0, 0, 0, 0, 0],
                up,
            ]
        );
        h.type_text("\t0~ ").unwrap();
        let got: Vec<_> = drain(&mut dev)
            .iter()
            .step_by(2)
            .map(|r| (r[0], r[2]))
            .collect();
        assert_eq!(got, vec![(0, 0x2b), (0, 0x27), (2, 0x35), (0, 0x2c)]);
    }

    #[test]
    fn unknown_character_queues_nothing() {
        let (_kbd, h) = HidKeyboard::new();
        assert_eq!(h.type_text("abcé"), Err(KeyboardError::UnmappedChar('é')));
        assert_eq!(h.queued(), 0);
        let e = h.type_text("\u{1f600}").unwrap_err();
        assert!(e.to_string().contains('\u{1f600}'), "{e}");
    }

    #[test]
    fn in_pends_when_empty_and_typing_wakes_it() {
        let (mut dev, h) = configured();
        let count = Arc::new(CountWaker(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut buf = [0u8; 8];
        assert!(dev.poll_in(EP_IN, &mut buf, &mut cx).is_pending());
        assert!(dev.poll_in(EP_IN, &mut buf, &mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // From another thread, as the FIFO reader would.
        let h2 = h.clone();
        std::thread::spawn(move || h2.type_text("a").unwrap())
            .join()
            .unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(dev.poll_in(EP_IN, &mut buf, &mut cx), Poll::Ready(Ok(8)));
        assert_eq!(buf, [0, 0, 4, 0, 0, 0, 0, 0]);
        // A buffer shorter than a report is babble.
        assert_eq!(
            dev.poll_in(EP_IN, &mut buf[..4], &mut cx),
            Poll::Ready(Err(Errno::EOVERFLOW))
        );
        assert!(dev.poll_in(EP_IN, &mut buf, &mut cx).is_pending());
        // Short buffer with nothing queued: still just waits.
        assert!(dev.poll_in(EP_IN, &mut buf[..4], &mut cx).is_pending());
    }

    #[test]
    fn get_report_set_report_and_protocol() {
        let (mut dev, h) = configured();
        let mut buf = [0u8; 16];
        let get_input = setup(0xa1, HidRequest::GetReport.code(), 0x0100, 0, 8);
        assert_eq!(dev.control(&get_input, &[], &mut buf), Ok(8));
        assert_eq!(&buf[..8], &[0; 8]);
        h.press(modifier::LEFT_CTRL, &[0x06, 0x07]).unwrap();
        assert_eq!(drain(&mut dev).len(), 1);
        assert_eq!(dev.control(&get_input, &[], &mut buf), Ok(8));
        assert_eq!(&buf[..8], &[1, 0, 6, 7, 0, 0, 0, 0]);
        assert_eq!(h.press(0, &[1; 7]), Err(KeyboardError::TooManyKeys(7)));

        // LEDs: Caps Lock on.
        let set_leds = setup(0x21, HidRequest::SetReport.code(), 0x0200, 0, 1);
        assert_eq!(dev.control(&set_leds, &[0x02], &mut []), Ok(1));
        assert_eq!(h.leds(), 0x02);
        assert_eq!(
            dev.control(
                &setup(0xa1, HidRequest::GetReport.code(), 0x0200, 0, 1),
                &[],
                &mut buf
            ),
            Ok(1)
        );
        assert_eq!(buf[0], 0x02);
        assert_eq!(dev.control(&set_leds, &[], &mut []), Err(Errno::EPIPE));
        let set_feature = setup(0x21, HidRequest::SetReport.code(), 0x0300, 0, 1);
        assert_eq!(dev.control(&set_feature, &[1], &mut []), Err(Errno::EPIPE));

        // Protocol: report by default, boot after SET_PROTOCOL(0).
        let get_proto = setup(0xa1, HidRequest::GetProtocol.code(), 0, 0, 1);
        assert_eq!(dev.control(&get_proto, &[], &mut buf), Ok(1));
        assert_eq!(buf[0], 1);
        assert_eq!(
            dev.control(
                &setup(0x21, HidRequest::SetProtocol.code(), 0, 0, 0),
                &[],
                &mut []
            ),
            Ok(0)
        );
        assert_eq!(dev.control(&get_proto, &[], &mut buf), Ok(1));
        assert_eq!(buf[0], 0);
        assert_eq!(
            dev.control(
                &setup(0x21, HidRequest::SetProtocol.code(), 7, 0, 0),
                &[],
                &mut []
            ),
            Err(Errno::EPIPE)
        );

        // Idle.
        assert_eq!(
            dev.control(
                &setup(0x21, HidRequest::SetIdle.code(), 0, 0, 0),
                &[],
                &mut []
            ),
            Ok(0)
        );
        assert_eq!(
            dev.control(
                &setup(0xa1, HidRequest::GetIdle.code(), 0, 0, 1),
                &[],
                &mut buf
            ),
            Ok(1)
        );
        assert_eq!(buf[0], 0);

        // Reset restores the defaults.
        dev.reset();
        assert_eq!(dev.control(&get_proto, &[], &mut buf), Ok(1));
        assert_eq!(buf[0], 1);
        assert_eq!(h.leds(), 0);
    }

    #[test]
    fn unknown_requests_are_not_ours() {
        let (mut kbd, _) = HidKeyboard::new();
        let mut buf = [0u8; 8];
        assert_eq!(kbd.control_in(&setup(0xa1, 0x07, 0, 0, 8), &mut buf), None);
        assert_eq!(kbd.control_out(&setup(0x21, 0x0c, 0, 0, 0), &[]), None);
        // Vendor request, and a class request for another interface.
        assert_eq!(kbd.control_in(&setup(0xc1, 0x01, 0, 0, 8), &mut buf), None);
        assert_eq!(
            kbd.control_out(&setup(0x21, HidRequest::SetIdle.code(), 0, 1, 0), &[]),
            None
        );
    }

    #[test]
    fn queue_is_bounded() {
        let (_kbd, h) = HidKeyboard::new();
        let line = "x".repeat(1000);
        for _ in 0..2 {
            h.type_text(&line).unwrap();
        }
        assert_eq!(h.queued(), 4000);
        assert_eq!(
            h.type_text(&line),
            Err(KeyboardError::QueueFull {
                needed: 2000,
                free: 96
            })
        );
        assert_eq!(h.queued(), 4000, "nothing queued on failure");
        for _ in 0..96 {
            h.release_all().unwrap();
        }
        assert!(matches!(
            h.send_report([0; 8]),
            Err(KeyboardError::QueueFull { .. })
        ));
        // Far beyond the bound fails before allocating.
        assert!(h.type_text(&"y".repeat(1 << 20)).is_err());
        h.clear();
        assert_eq!(h.queued(), 0);
    }

    #[tokio::test]
    async fn feed_lines_types_each_line() {
        let (mut dev, h) = configured();
        let input: &[u8] = b"ab\r\nc\xc3\xa9d\n\nz";
        feed_lines(input, h.clone()).await.unwrap();
        let keys: Vec<u8> = drain(&mut dev).iter().step_by(2).map(|r| r[2]).collect();
        // 'é' is skipped, CRLF is one Enter, the unterminated last line is typed.
        assert_eq!(keys, vec![0x04, 0x05, 0x28, 0x06, 0x07, 0x28, 0x28, 0x1d]);
    }

    /// Text longer than the queue waits for the host to take reports, woken
    /// by each report taken, and loses nothing.
    #[tokio::test]
    async fn typing_past_a_full_queue_waits_for_room() {
        let (mut dev, h) = configured();
        let text = "a".repeat(QUEUE_CAPACITY);
        let typist = tokio::spawn(async move { type_waiting(&h, &text).await });
        let mut presses = 0;
        for _ in 0..100_000 {
            presses += drain(&mut dev).iter().step_by(2).count();
            if typist.is_finished() && presses == QUEUE_CAPACITY {
                break;
            }
            tokio::task::yield_now().await;
        }
        presses += drain(&mut dev).iter().step_by(2).count();
        assert!(typist.is_finished(), "the typist still waits for room");
        assert_eq!(presses, QUEUE_CAPACITY);
    }

    #[tokio::test]
    async fn serve_fifo_types_and_reopens() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kbd");
        let (mut dev, h) = configured();
        let task = tokio::spawn({
            let path = path.clone();
            async move { serve_fifo(&path, h).await }
        });
        // Two writers in turn, as two `echo > fifo` would.
        for word in ["hi\n", "yo"] {
            let p = path.clone();
            let mut ok = false;
            for _ in 0..200 {
                if p.exists() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(ok, "FIFO not created");
            // Non-blocking open: ENXIO until the reader is there, so this
            // loop is bounded instead of blocking a thread forever.
            let mut written = false;
            for _ in 0..500 {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&p);
                match f {
                    Ok(mut f) => {
                        f.write_all(word.as_bytes()).unwrap();
                        written = true;
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("open FIFO: {e}"),
                }
            }
            assert!(written, "no reader on the FIFO");
        }
        let mut keys = Vec::new();
        for _ in 0..200 {
            keys.extend(drain(&mut dev).iter().step_by(2).map(|r| r[2]));
            if keys.len() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keys, vec![0x0b, 0x0c, 0x28, 0x1c, 0x12]);
        task.abort();
        // A regular file in the way is refused.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let (_k, h) = HidKeyboard::new();
        assert!(serve_fifo(&file, h).await.is_err());
    }
}
