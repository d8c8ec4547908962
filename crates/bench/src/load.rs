//! The load client: a blocking USB/IP peer written directly on the proto
//! crate, built so that it is not the bottleneck. One connection per
//! import; K URBs kept in flight; every CMD_SUBMIT that is ready goes out in
//! one vectored write (header and a shared payload buffer, never copied);
//! one reusable read buffer from which as many replies as arrived are
//! parsed per read; latencies go into a preallocated Vec.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use usbwire_proto::urb::InFlight;
use usbwire_proto::{
    CmdSubmit, Decoded, Direction, Limits, OpReply, OpRequest, OpStatus, UrbReply, URB_HEADER_LEN,
    USBIP_VERSION,
};

/// SET_CONFIGURATION(1), control OUT, no data.
pub const SET_CONFIGURATION_1: [u8; 8] = [0x00, 0x09, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00];
/// GET_DESCRIPTOR(DEVICE), 18 bytes.
pub const GET_DEVICE_DESCRIPTOR: [u8; 8] = [0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 18, 0x00];

/// Seqnums in flight are looked up in a ring indexed by their low bits.
const RING: usize = 4096;
const READ_BUF: usize = 4 << 20;
/// Most bytes asked of one read (usbipd's read chunk is the same).
const READ_MAX: usize = 256 << 10;
/// Move the unparsed tail to the front once the data reaches this far.
const COMPACT_AT: usize = 512 << 10;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Adds one latency sample (ns, saturating) to a Vec allocated before the
/// run: samples beyond its capacity are dropped rather than reallocating in
/// the middle of a measurement.
pub fn record_latency(lat: &mut Vec<u32>, d: Duration) {
    if lat.len() < lat.capacity() {
        lat.push(d.as_nanos().min(u32::MAX as u128) as u32);
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// A TCP connection to a USB/IP server with TCP_NODELAY and timeouts, so
/// that a stuck server cannot hang the bench.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// What a connection runs over: plain TCP, or TLS in user space.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<crate::tls::TlsStream>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Sends one OP_* request and reads its reply in full.
pub fn op_roundtrip(s: &mut (impl Read + Write), req: &OpRequest) -> io::Result<OpReply> {
    let mut out = Vec::with_capacity(64);
    req.encode(&mut out);
    s.write_all(&out)?;
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut tmp = vec![0u8; 256 << 10];
    // Bounded: a reply larger than 64 MiB is an error anyway.
    while buf.len() < 64 << 20 {
        if let Decoded::Message(m, _) = OpReply::decode(&buf, &limits).map_err(invalid)? {
            return Ok(m);
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection during the OP phase",
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Err(invalid("OP reply too large"))
}

/// OP_REQ_DEVLIST on a fresh connection: the number of devices.
pub fn devlist(addr: SocketAddr) -> io::Result<usize> {
    let mut s = connect(addr)?;
    match op_roundtrip(
        &mut s,
        &OpRequest::Devlist {
            version: USBIP_VERSION,
        },
    )? {
        OpReply::Devlist {
            status: OpStatus::Ok,
            devices,
            ..
        } => Ok(devices.len()),
        other => Err(invalid(format!("unexpected devlist reply {other:?}"))),
    }
}

/// What one workload submits.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub dir: Direction,
    /// Endpoint number (no direction bit).
    pub ep: u8,
    pub len: u32,
    pub setup: [u8; 8],
    /// URBs kept in flight.
    pub depth: usize,
    /// A reply moving another length counts as an error.
    pub expect_len: Option<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub urbs: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

#[derive(Clone, Copy)]
struct Slot {
    seq: u32,
    dir: Direction,
    len: u32,
    at: Option<Instant>,
}

/// An imported device, ready for URBs.
pub struct Conn {
    stream: Stream,
    devid: u32,
    rbuf: Vec<u8>,
    lo: usize,
    hi: usize,
    seq: u32,
    limits: Limits,
    slots: Vec<Slot>,
}

impl Conn {
    /// OP_REQ_IMPORT of `busid`, then (if asked) SET_CONFIGURATION(1).
    pub fn import(addr: SocketAddr, busid: &str, set_config: bool) -> io::Result<Conn> {
        Self::import_on(Stream::Tcp(connect(addr)?), busid, set_config)
    }

    /// [`Conn::import`] on a connection already made (TLS).
    pub fn import_on(mut stream: Stream, busid: &str, set_config: bool) -> io::Result<Conn> {
        let reply = op_roundtrip(
            &mut stream,
            &OpRequest::Import {
                version: USBIP_VERSION,
                busid: busid.into(),
            },
        )?;
        let info = match reply {
            OpReply::Import {
                status: OpStatus::Ok,
                device: Some(info),
                ..
            } => info,
            other => return Err(invalid(format!("import of {busid} refused: {other:?}"))),
        };
        let mut conn = Conn {
            stream,
            devid: info.devid(),
            rbuf: vec![0u8; READ_BUF],
            lo: 0,
            hi: 0,
            seq: 0,
            limits: Limits::default(),
            slots: vec![
                Slot {
                    seq: 0,
                    dir: Direction::Out,
                    len: 0,
                    at: None,
                };
                RING
            ],
        };
        if set_config {
            let spec = Spec {
                dir: Direction::Out,
                ep: 0,
                len: 0,
                setup: SET_CONFIGURATION_1,
                depth: 1,
                expect_len: Some(0),
            };
            let st = conn.run_count(&spec, 1)?;
            if st.errors != 0 {
                return Err(invalid(format!(
                    "SET_CONFIGURATION(1) failed: {}",
                    st.first_error.unwrap_or_default()
                )));
            }
        }
        Ok(conn)
    }

    /// Runs `spec` for `dur` (then drains what is in flight).
    pub fn run(&mut self, spec: &Spec, dur: Duration, lat: &mut Vec<u32>) -> io::Result<RunStats> {
        self.run_inner(spec, Some(dur), u64::MAX, lat)
    }

    /// Runs exactly `n` URBs of `spec`.
    pub fn run_count(&mut self, spec: &Spec, n: u64) -> io::Result<RunStats> {
        let mut lat = Vec::new();
        self.run_inner(spec, None, n, &mut lat)
    }

    fn run_inner(
        &mut self,
        spec: &Spec,
        dur: Option<Duration>,
        max_urbs: u64,
        lat: &mut Vec<u32>,
    ) -> io::Result<RunStats> {
        assert!(spec.depth >= 1 && spec.depth < RING / 2);
        lat.clear();
        let payload = if spec.dir == Direction::Out {
            // Zeros: usbwire's test device checks Gadget Zero's default
            // pattern on its sink, and halts it on anything else.
            vec![0u8; spec.len as usize]
        } else {
            Vec::new()
        };
        let mut hdrs = vec![0u8; spec.depth * URB_HEADER_LEN];
        let mut st = RunStats::default();
        let start = Instant::now();
        // Absolute bound even for counted runs.
        let deadline = start + dur.unwrap_or(Duration::from_secs(60));
        let mut inflight = 0usize;
        let mut submitted = 0u64;
        let mut stopping = false;
        loop {
            if !stopping && inflight < spec.depth {
                let now = Instant::now();
                let n = (spec.depth - inflight).min((max_urbs - submitted) as usize);
                if now >= deadline || n == 0 {
                    stopping = true;
                } else {
                    for i in 0..n {
                        self.seq = self.seq.wrapping_add(1).max(1);
                        let cmd = CmdSubmit {
                            seqnum: self.seq,
                            devid: self.devid,
                            direction: spec.dir,
                            ep: u32::from(spec.ep),
                            transfer_flags: 0,
                            transfer_buffer_length: spec.len,
                            start_frame: 0,
                            number_of_packets: 0,
                            interval: 0,
                            setup: spec.setup,
                        };
                        cmd.write_header(&mut hdrs[i * URB_HEADER_LEN..(i + 1) * URB_HEADER_LEN]);
                        let slot = &mut self.slots[self.seq as usize % RING];
                        if slot.at.is_some() {
                            return Err(io::Error::other("seqnum ring overflow"));
                        }
                        *slot = Slot {
                            seq: self.seq,
                            dir: spec.dir,
                            len: spec.len,
                            at: Some(now),
                        };
                    }
                    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(2 * n);
                    for h in hdrs[..n * URB_HEADER_LEN].chunks(URB_HEADER_LEN) {
                        iov.push(IoSlice::new(h));
                        if !payload.is_empty() {
                            iov.push(IoSlice::new(&payload));
                        }
                    }
                    write_all_vectored(&mut self.stream, &mut iov)?;
                    inflight += n;
                    submitted += n as u64;
                }
            }
            if inflight == 0 {
                break;
            }
            self.fill()?;
            let now = Instant::now();
            loop {
                let slots = &self.slots;
                let decoded = UrbReply::decode(&self.rbuf[self.lo..self.hi], &self.limits, |s| {
                    let sl = &slots[s as usize % RING];
                    (sl.at.is_some() && sl.seq == s).then_some(InFlight {
                        direction: sl.dir,
                        iso: false,
                        length: sl.len,
                    })
                })
                .map_err(invalid)?;
                match decoded {
                    Decoded::NeedMore(need) => {
                        if need > self.rbuf.len() {
                            self.rbuf.resize(need.next_power_of_two(), 0);
                        }
                        break;
                    }
                    Decoded::Message(UrbReply::Submit { ret, .. }, used) => {
                        self.lo += used;
                        let slot = &mut self.slots[ret.seqnum as usize % RING];
                        let at = slot.at.take().expect("checked by decode");
                        record_latency(lat, now.saturating_duration_since(at));
                        inflight -= 1;
                        st.urbs += 1;
                        st.bytes += u64::from(ret.actual_length);
                        if ret.status != 0 {
                            st.errors += 1;
                            st.first_error.get_or_insert_with(|| {
                                format!("URB seqnum {} status {}", ret.seqnum, ret.status)
                            });
                        } else if let Some(e) = spec.expect_len {
                            if ret.actual_length != e {
                                st.errors += 1;
                                st.first_error.get_or_insert_with(|| {
                                    format!(
                                        "URB seqnum {} moved {} bytes, expected {e}",
                                        ret.seqnum, ret.actual_length
                                    )
                                });
                            }
                        }
                    }
                    Decoded::Message(UrbReply::Unlink(u), _) => {
                        return Err(invalid(format!("unexpected RET_UNLINK {u:?}")));
                    }
                }
            }
        }
        st.elapsed = start.elapsed();
        Ok(st)
    }

    /// One read into the buffer. Reads are capped at [`READ_MAX`] and the
    /// unparsed tail moves back to the front once past [`COMPACT_AT`], so
    /// the bytes the kernel copies into stay in cache: walking the whole
    /// buffer when replies straddle reads (deep IN queues) costs a lot.
    fn fill(&mut self) -> io::Result<()> {
        if self.lo == self.hi {
            self.lo = 0;
            self.hi = 0;
        } else if self.hi >= COMPACT_AT || self.rbuf.len() - self.hi < READ_MAX {
            self.rbuf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        let end = (self.hi + READ_MAX).min(self.rbuf.len());
        let n = self.stream.read(&mut self.rbuf[self.hi..end])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.hi += n;
        Ok(())
    }
}

pub fn write_all_vectored(s: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    // Bounded by the socket's write timeout: every pass writes something.
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
