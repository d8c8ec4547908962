//! The data path makes no heap allocation per URB once it is warm: buffers
//! come from the session's pool and replies are written from them.
//!
//! Every allocation in this process is counted. The server runs in this
//! process; the load is a blocking peer that allocates nothing in its loop
//! (frames encoded once, replies read into one fixed buffer), so what the
//! counter sees during the measured section is the server's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use usbwire_devices::testdev::TestDevice;
use usbwire_devices::EmulatedDevice;
use usbwire_proto::{
    CmdSubmit, Decoded, Direction, Limits, OpReply, OpRequest, OpStatus, URB_HEADER_LEN,
    USBIP_VERSION,
};
use usbwire_server::ServerConfig;
use usbwire_tests::support::{control, set_configuration, submit, TestServer};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: tests that measure it take turns.
static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// K URBs per batch, all written in one go, all replies read back.
const K: usize = 32;
const BATCHES: usize = 300;

struct Peer {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    fn import(addr: std::net::SocketAddr) -> Peer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "1-1".into(),
        }
        .encode(&mut out);
        s.write_all(&out).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            if let Decoded::Message(reply, n) = OpReply::decode(&buf, &Limits::default()).unwrap() {
                assert!(matches!(
                    reply,
                    OpReply::Import {
                        status: OpStatus::Ok,
                        ..
                    }
                ));
                assert_eq!(n, buf.len(), "nothing after the import reply yet");
                break;
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "server closed during import");
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut p = Peer {
            s,
            buf: vec![0u8; 1 << 20],
        };
        let mut frame = Vec::new();
        set_configuration(1).encode(&[], &[], &mut frame);
        p.round(&frame, URB_HEADER_LEN);
        p
    }

    /// Writes `frames` and reads `reply_bytes` back, checking every status.
    fn round(&mut self, frames: &[u8], reply_bytes: usize) {
        self.s.write_all(frames).unwrap();
        self.s.read_exact(&mut self.buf[..reply_bytes]).unwrap();
    }
}

/// `K` copies of one command, encoded once.
fn batch(cmd: CmdSubmit, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..K {
        CmdSubmit {
            seqnum: 100 + i as u32,
            ..cmd
        }
        .encode(data, &[], &mut out);
    }
    out
}

fn allocations_per_urb(peer: &mut Peer, frames: &[u8], reply_len: usize) -> f64 {
    // Warm: the pool fills, the queues and the output queue reach their size.
    for _ in 0..50 {
        peer.round(frames, reply_len * K);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..BATCHES {
        peer.round(frames, reply_len * K);
        // Every reply came back with status 0: status is at offset 20.
        for r in 0..K {
            let at = r * reply_len;
            assert_eq!(&peer.buf[at + 20..at + 24], &[0, 0, 0, 0], "reply {r}");
        }
    }
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    eprintln!("{n} allocations over {} URBs", BATCHES * K);
    n as f64 / (BATCHES * K) as f64
}

#[test]
fn the_warm_data_path_allocates_nothing_per_urb() {
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start(
        vec![EmulatedDevice::new(TestDevice::new())],
        ServerConfig::default(),
    ));
    let mut peer = Peer::import(server.addr);

    // Zeros: the sink checks Gadget Zero's default pattern.
    let out = batch(submit(0, 2, Direction::Out, 512), &[0; 512]);
    let per_urb = allocations_per_urb(&mut peer, &out, URB_HEADER_LEN);
    assert!(per_urb < 0.01, "bulk OUT: {per_urb:.3} allocations per URB");

    let big = vec![0u8; 64 << 10];
    let out = batch(submit(0, 2, Direction::Out, big.len() as u32), &big);
    let per_urb = allocations_per_urb(&mut peer, &out, URB_HEADER_LEN);
    assert!(
        per_urb < 0.01,
        "64 KiB bulk OUT (read straight into URB buffers): {per_urb:.3} allocations per URB"
    );

    let input = batch(submit(0, 1, Direction::In, 512), &[]);
    let per_urb = allocations_per_urb(&mut peer, &input, URB_HEADER_LEN + 512);
    assert!(per_urb < 0.01, "bulk IN: {per_urb:.3} allocations per URB");

    // GET_DESCRIPTOR(DEVICE), as the bench's control workload.
    let setup = usbwire_proto::SetupPacket::from_bytes([0x80, 6, 0, 1, 0, 0, 18, 0]);
    let input = batch(control(0, setup), &[]);
    let per_urb = allocations_per_urb(&mut peer, &input, URB_HEADER_LEN + 18);
    assert!(
        per_urb < 0.01,
        "control IN: {per_urb:.3} allocations per URB"
    );

    drop(peer);
    rt.block_on(server.stop());
}

/// Mass-storage commands queued at once: deeper than Linux (one at a time)
/// or the bench (8), and their 3 URBs each still within what the session's
/// buffer pool keeps.
const DISK_COMMANDS: usize = 16;

/// `DISK_COMMANDS` commands, each a CBW, a data stage and the CSW, encoded
/// once, and the status of every reply checked in the order they come:
/// the device answers one command before it takes the next CBW.
fn disk_allocations_per_urb(peer: &mut Peer, frames: &[u8], data_in: usize) -> f64 {
    let reply = [
        URB_HEADER_LEN,
        URB_HEADER_LEN + data_in,
        URB_HEADER_LEN + 13,
    ];
    let total: usize = reply.iter().sum::<usize>() * DISK_COMMANDS;
    for _ in 0..50 {
        peer.round(frames, total);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..BATCHES {
        peer.round(frames, total);
        let mut at = 0;
        for r in 0..3 * DISK_COMMANDS {
            let status = &peer.buf[at + 20..at + 24];
            assert_eq!(status, &[0, 0, 0, 0], "reply {r}");
            if r % 3 == 2 {
                // CSW: signature, then status GOOD.
                let csw = &peer.buf[at + URB_HEADER_LEN..at + URB_HEADER_LEN + 13];
                assert_eq!(csw[..4], 0x5342_5355u32.to_le_bytes());
                assert_eq!(csw[12], 0, "CSW status of command {}", r / 3);
            }
            at += reply[r % 3];
        }
    }
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    eprintln!("{n} allocations over {} URBs", BATCHES * DISK_COMMANDS * 3);
    n as f64 / (BATCHES * DISK_COMMANDS * 3) as f64
}

/// An image file whose reads all go to the disk's I/O thread, as if
/// nothing of it were in the page cache.
struct Uncached(std::fs::File);

impl usbwire_devices::msc::DiskImage for Uncached {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.0, buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(&self.0, data, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

/// The disk's image I/O runs on its own thread, apart from cached reads;
/// the hop there and back reuses one buffer and allocates nothing either.
#[test]
fn the_warm_disk_path_allocates_nothing_per_urb() {
    use usbwire_devices::msc::{MassStorage, MscConfig};
    let _turn = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The replies of all the commands fit the peer's buffer.
    const LEN: usize = 32 << 10;
    const SIZE: u64 = 4 << 20;
    let cbw = |tag: u32, opcode: u8, dir_in: bool| {
        let mut c = Vec::with_capacity(31);
        c.extend_from_slice(&0x4342_5355u32.to_le_bytes());
        c.extend_from_slice(&tag.to_le_bytes());
        c.extend_from_slice(&(LEN as u32).to_le_bytes());
        c.extend_from_slice(&[if dir_in { 0x80 } else { 0 }, 0, 10]);
        let blocks = (LEN / 512) as u16;
        let mut cdb = [0u8; 16];
        cdb[0] = opcode;
        cdb[2..6].copy_from_slice(&(tag * blocks as u32).to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        c.extend_from_slice(&cdb);
        c
    };
    let commands = |opcode: u8, dir_in: bool, payload: &[u8]| {
        let mut out = Vec::new();
        for i in 0..DISK_COMMANDS as u32 {
            let seq = 100 + 3 * i;
            let c = cbw(i, opcode, dir_in);
            submit(seq, 2, Direction::Out, 31).encode(&c, &[], &mut out);
            if dir_in {
                submit(seq + 1, 1, Direction::In, LEN as u32).encode(&[], &[], &mut out);
            } else {
                submit(seq + 1, 2, Direction::Out, LEN as u32).encode(payload, &[], &mut out);
            }
            submit(seq + 2, 1, Direction::In, 13).encode(&[], &[], &mut out);
        }
        out
    };
    let reads = commands(0x28, true, &[]);
    let writes = commands(0x2a, false, &vec![0x3cu8; LEN]);

    for cached in [true, false] {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(SIZE).unwrap();
        let msc = if cached {
            MassStorage::open(file.path(), MscConfig::default()).unwrap()
        } else {
            let image = Box::new(Uncached(file.reopen().unwrap()));
            MassStorage::from_image(image, SIZE, MscConfig::default()).unwrap()
        };
        let server = rt.block_on(TestServer::start(
            vec![EmulatedDevice::new(msc)],
            ServerConfig::default(),
        ));
        let mut peer = Peer::import(server.addr);

        let per_urb = disk_allocations_per_urb(&mut peer, &reads, LEN);
        assert!(
            per_urb < 0.01,
            "disk READ(10), cached {cached}: {per_urb:.3} allocations per URB"
        );
        let per_urb = disk_allocations_per_urb(&mut peer, &writes, 0);
        assert!(
            per_urb < 0.01,
            "disk WRITE(10): {per_urb:.3} allocations per URB"
        );

        drop(peer);
        rt.block_on(server.stop());
    }
}
