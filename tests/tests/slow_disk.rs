//! A slow disk stalls only its own import. Two imports share the server's
//! one worker thread: one on a mass-storage device whose image holds a
//! read, a write or an fdatasync (a SYNCHRONIZE CACHE, or the flush at the
//! end of the import) until the test lets it go, the other on the test
//! device. While the disk I/O is held, the second import keeps completing
//! control and bulk URBs.
//!
//! The held operation is observed as an event (the image reports that it
//! is blocked), never guessed from a delay; the only time bound is the
//! generous one after which a reply that never comes fails the test, which
//! is what happens when disk I/O runs on the worker thread.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use usbwire_devices::msc::{DiskImage, MassStorage, MscConfig};
use usbwire_devices::testdev::{TestDevice, EP_SINK, EP_SOURCE};
use usbwire_devices::EmulatedDevice;
use usbwire_proto::{Direction, SetupPacket};
use usbwire_server::ServerConfig;
use usbwire_tests::support::{control, set_configuration, submit, RawPeer, Reply, TestServer};

const BLOCK: usize = 512;
const BLOCKS: usize = 64;
/// How long a test waits for the image to report a held operation before
/// it fails.
const HELD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Sync,
}

#[derive(Default)]
struct GateState {
    /// The operation to hold, if any.
    hold: Option<Op>,
    /// Operations blocked in the image right now.
    blocked: usize,
}

/// Holds the image's operations of one kind until released.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<GateState>, Condvar)>);

impl Gate {
    fn hold(&self, op: Op) {
        self.0 .0.lock().unwrap().hold = Some(op);
    }

    /// Lets every held operation go on, and stops holding.
    fn release(&self) {
        self.0 .0.lock().unwrap().hold = None;
        self.0 .1.notify_all();
    }

    fn blocked(&self) -> usize {
        self.0 .0.lock().unwrap().blocked
    }

    /// Called by the image: blocks while `op` is held.
    fn pass(&self, op: Op) {
        let (lock, cv) = &*self.0;
        let mut s = lock.lock().unwrap();
        if s.hold != Some(op) {
            return;
        }
        s.blocked += 1;
        cv.notify_all();
        while s.hold == Some(op) {
            s = cv.wait(s).unwrap();
        }
        s.blocked -= 1;
        cv.notify_all();
    }

    /// Waits (bounded) until an operation is held in the image.
    async fn wait_held(&self) {
        let gate = self.clone();
        let held = tokio::task::spawn_blocking(move || {
            let (lock, cv) = &*gate.0;
            let s = lock.lock().unwrap();
            let (s, _) = cv
                .wait_timeout_while(s, HELD_TIMEOUT, |s| s.blocked == 0)
                .unwrap();
            s.blocked > 0
        })
        .await
        .unwrap();
        assert!(held, "the disk I/O never started within {HELD_TIMEOUT:?}");
    }
}

/// An in-memory image whose every block starts with its LBA, behind a gate.
struct HeldImage {
    data: Mutex<Vec<u8>>,
    gate: Gate,
}

impl HeldImage {
    fn new(gate: Gate) -> HeldImage {
        let mut data = vec![0u8; BLOCKS * BLOCK];
        for (lba, b) in data.chunks_mut(BLOCK).enumerate() {
            b[..8].copy_from_slice(&(lba as u64).to_le_bytes());
        }
        HeldImage {
            data: Mutex::new(data),
            gate,
        }
    }
}

impl DiskImage for HeldImage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.gate.pass(Op::Read);
        let data = self.data.lock().unwrap();
        let at = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - at);
        buf[..n].copy_from_slice(&data[at..at + n]);
        Ok(n)
    }

    fn write_at(&self, src: &[u8], offset: u64) -> std::io::Result<usize> {
        self.gate.pass(Op::Write);
        let mut data = self.data.lock().unwrap();
        let at = (offset as usize).min(data.len());
        let n = src.len().min(data.len() - at);
        data[at..at + n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.gate.pass(Op::Sync);
        Ok(())
    }
}

fn cbw(tag: u32, len: u32, dir_in: bool, cdb: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(31);
    c.extend_from_slice(&0x4342_5355u32.to_le_bytes());
    c.extend_from_slice(&tag.to_le_bytes());
    c.extend_from_slice(&len.to_le_bytes());
    c.push(if dir_in { 0x80 } else { 0 });
    c.push(0);
    c.push(cdb.len() as u8);
    let mut cb = [0u8; 16];
    cb[..cdb.len()].copy_from_slice(cdb);
    c.extend_from_slice(&cb);
    c
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let l = lba.to_be_bytes();
    let n = blocks.to_be_bytes();
    [opcode, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
}

/// The next reply must answer `seqnum` with status 0; returns its data.
async fn expect_ok(peer: &mut RawPeer, seqnum: u32) -> Vec<u8> {
    match peer.next().await {
        Reply::Submit(ret, data) => {
            assert_eq!(ret.seqnum, seqnum, "replies come in order");
            assert_eq!(ret.status, 0, "URB {seqnum} failed");
            data
        }
        other => panic!("expected RET_SUBMIT for {seqnum}, got {other:?}"),
    }
}

/// Checks a CSW: the command's tag, no residue, GOOD.
fn check_csw(csw: &[u8], tag: u32) {
    assert_eq!(csw.len(), 13, "CSW length");
    assert_eq!(csw[..4], 0x5342_5355u32.to_le_bytes(), "CSW signature");
    assert_eq!(csw[4..8], tag.to_le_bytes(), "CSW tag");
    assert_eq!(csw[8..13], [0, 0, 0, 0, 0], "residue 0, status GOOD");
}

/// Rounds of control, bulk IN and bulk OUT URBs on the test device, each
/// answered before the next is sent.
async fn test_device_keeps_going(peer: &mut RawPeer, seq: &mut u32) {
    let get_device = SetupPacket {
        request_type: 0x80,
        request: 6,
        value: 0x0100,
        index: 0,
        length: 18,
    };
    for _ in 0..50 {
        *seq += 1;
        peer.submit(control(*seq, get_device), &[]).await;
        let d = expect_ok(peer, *seq).await;
        assert_eq!(d.len(), 18, "device descriptor");
        *seq += 1;
        peer.submit(
            submit(*seq, u32::from(EP_SOURCE & 0x0f), Direction::In, 512),
            &[],
        )
        .await;
        assert_eq!(expect_ok(peer, *seq).await.len(), 512, "bulk IN");
        *seq += 1;
        peer.submit(
            submit(*seq, u32::from(EP_SINK), Direction::Out, 512),
            &[0u8; 512],
        )
        .await;
        expect_ok(peer, *seq).await;
    }
}

struct Setup {
    server: TestServer,
    gate: Gate,
    disk: RawPeer,
    other: RawPeer,
    disk_seq: u32,
    other_seq: u32,
}

async fn setup() -> Setup {
    let gate = Gate::default();
    let image = HeldImage::new(gate.clone());
    let cfg = MscConfig {
        serial: "5L0WD15K".into(),
        ..MscConfig::default()
    };
    let msc = MassStorage::from_image(Box::new(image), (BLOCKS * BLOCK) as u64, cfg).unwrap();
    let config = ServerConfig {
        // Both imports on the same thread: the point of the test.
        workers: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(
        vec![
            EmulatedDevice::new(msc),
            EmulatedDevice::new(TestDevice::new()),
        ],
        config,
    )
    .await;
    let mut disk = RawPeer::import(server.addr, "1-1").await;
    disk.submit(set_configuration(1), &[]).await;
    expect_ok(&mut disk, 1).await;
    let mut other = RawPeer::import(server.addr, "1-2").await;
    other.submit(set_configuration(1), &[]).await;
    expect_ok(&mut other, 1).await;
    Setup {
        server,
        gate,
        disk,
        other,
        disk_seq: 1,
        other_seq: 1,
    }
}

impl Setup {
    fn next_disk_seq(&mut self) -> u32 {
        self.disk_seq += 1;
        self.disk_seq
    }

    /// Sends a whole BOT command at once, CBW, data and CSW URBs queued
    /// together as Linux and the bench do. Returns the seqnums of the CBW,
    /// the data stage (if any) and the CSW.
    async fn send_command(
        &mut self,
        tag: u32,
        cdb: &[u8],
        data_in: Option<u32>,
        data_out: &[u8],
    ) -> (u32, Option<u32>, u32) {
        let len = data_in.unwrap_or(data_out.len() as u32);
        let c = self.next_disk_seq();
        let wrapper = cbw(tag, len, data_in.is_some(), cdb);
        let mut out = Vec::new();
        self.disk.encode_submit(
            submit(c, 2, Direction::Out, wrapper.len() as u32),
            &wrapper,
            &mut out,
        );
        let data = if let Some(n) = data_in {
            let d = self.next_disk_seq();
            self.disk
                .encode_submit(submit(d, 1, Direction::In, n), &[], &mut out);
            Some(d)
        } else if !data_out.is_empty() {
            let d = self.next_disk_seq();
            self.disk.encode_submit(
                submit(d, 2, Direction::Out, data_out.len() as u32),
                data_out,
                &mut out,
            );
            Some(d)
        } else {
            None
        };
        let s = self.next_disk_seq();
        self.disk
            .encode_submit(submit(s, 1, Direction::In, 13), &[], &mut out);
        self.disk.send(&out).await;
        (c, data, s)
    }

    /// With the disk's `op` held: the other import's URBs still complete.
    async fn other_import_runs_while_held(&mut self) {
        self.gate.wait_held().await;
        test_device_keeps_going(&mut self.other, &mut self.other_seq).await;
        assert_eq!(
            self.gate.blocked(),
            1,
            "the disk I/O is still held while the other import ran"
        );
    }
}

#[tokio::test]
async fn a_held_disk_read_does_not_stall_the_other_import() {
    let mut t = setup().await;
    t.gate.hold(Op::Read);
    let (c, d, s) = t.send_command(7, &rw10(0x28, 5, 2), Some(1024), &[]).await;
    t.other_import_runs_while_held().await;
    t.gate.release();
    expect_ok(&mut t.disk, c).await;
    let data = expect_ok(&mut t.disk, d.unwrap()).await;
    assert_eq!(data.len(), 1024);
    assert_eq!(data[..8], 5u64.to_le_bytes(), "LBA 5");
    assert_eq!(data[512..520], 6u64.to_le_bytes(), "LBA 6");
    check_csw(&expect_ok(&mut t.disk, s).await, 7);
    drop((t.disk, t.other));
    t.server.stop().await;
}

#[tokio::test]
async fn a_held_disk_write_and_sync_do_not_stall_the_other_import() {
    let mut t = setup().await;
    // WRITE(10), then SYNCHRONIZE CACHE(10): each held in turn.
    t.gate.hold(Op::Write);
    let payload: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
    let (c, d, s) = t.send_command(8, &rw10(0x2a, 9, 2), None, &payload).await;
    t.other_import_runs_while_held().await;
    t.gate.release();
    expect_ok(&mut t.disk, c).await;
    expect_ok(&mut t.disk, d.unwrap()).await;
    check_csw(&expect_ok(&mut t.disk, s).await, 8);

    t.gate.hold(Op::Sync);
    let (c, _, s) = t
        .send_command(9, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], None, &[])
        .await;
    t.other_import_runs_while_held().await;
    t.gate.release();
    expect_ok(&mut t.disk, c).await;
    check_csw(&expect_ok(&mut t.disk, s).await, 9);

    // What was written reads back.
    let (c, d, s) = t.send_command(10, &rw10(0x28, 9, 2), Some(1024), &[]).await;
    expect_ok(&mut t.disk, c).await;
    assert!(expect_ok(&mut t.disk, d.unwrap()).await == payload);
    check_csw(&expect_ok(&mut t.disk, s).await, 10);
    drop((t.disk, t.other));
    t.server.stop().await;
}

#[tokio::test]
async fn a_held_flush_at_release_does_not_stall_the_other_import() {
    let mut t = setup().await;
    // The end of an import flushes its disk; that fdatasync is held.
    t.gate.hold(Op::Sync);
    t.disk.stream.shutdown().await.unwrap();
    t.other_import_runs_while_held().await;
    t.gate.release();
    drop(t.other);
    t.server.stop().await;
}
