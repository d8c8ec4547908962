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
