use super::bot::{CBW_LEN, CBW_SIGNATURE, CSW_LEN, CSW_SIGNATURE};
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
fn cmd_in(dev: &mut EmulatedDevice, tag: u32, len: u32, cdb: &[u8]) -> (Vec<u8>, u32, u8, bool) {
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
    let (_, residue, status, stalled) = cmd_in(&mut dev, 2, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
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
