//! Scale: a server with many exported devices. Devlist time, RSS per idle
//! connection, and aggregate bulk IN throughput over concurrent imports.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use usbwire_proto::Direction;

use crate::load::{self, Conn, Spec};
use crate::servers::ServerProc;
use crate::sys::{self, CpuSample};

/// `1-1`..`1-100`, `2-1`..: device `i` (0-based).
pub fn busid(i: usize) -> String {
    crate::crate_server::busid(i)
}

/// A usbipd config exporting `n` test devices with explicit bus ids.
pub fn config(n: usize) -> String {
    let mut s = String::with_capacity(n * 40);
    for i in 0..n {
        s.push_str(&format!(
            "[[device]]\nkind = \"test\"\nbusid = \"{}\"\n",
            busid(i)
        ));
    }
    s
}

#[derive(Debug, Clone)]
pub struct AggPoint {
    pub imports: usize,
    pub mb_s: f64,
    pub urb_s: f64,
    pub server_cpu_us_per_urb: f64,
    /// Server and client CPU use over the run, in CPUs (1.0 = one core busy).
    pub server_cpus: f64,
    pub client_cpus: f64,
    pub errors: u64,
}

#[derive(Debug, Clone)]
pub struct ScaleResult {
    pub server: &'static str,
    pub devices: usize,
    pub devices_listed: usize,
    pub devlist_ms_min: f64,
    pub devlist_ms_p50: f64,
    pub devlist_ms_max: f64,
    pub conns: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_per_conn_kib: f64,
    pub agg: Vec<AggPoint>,
    pub errors: Vec<String>,
}

impl ScaleResult {
    pub fn to_json(&self) -> Value {
        json!({
            "server": self.server,
            "devices": self.devices,
            "devices_listed": self.devices_listed,
            "devlist_ms": {"min": self.devlist_ms_min, "p50": self.devlist_ms_p50, "max": self.devlist_ms_max},
            "idle_connections": self.conns,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "rss_per_idle_connection_kib": self.rss_per_conn_kib,
            "aggregate_bulk_in_64k_k8": self.agg.iter().map(|a| json!({
                "imports": a.imports, "mb_s": a.mb_s, "urb_s": a.urb_s,
                "server_cpu_us_per_urb": a.server_cpu_us_per_urb,
                "server_cpus": a.server_cpus, "client_cpus": a.client_cpus,
                "errors": a.errors,
            })).collect::<Vec<_>>(),
            "errors": self.errors,
        })
    }
}

pub struct ScaleOpts {
    pub devices: usize,
    pub conns: usize,
    pub devlist_reps: usize,
    pub dur: Duration,
    pub warm: Duration,
}

pub fn run(server: &mut ServerProc, o: &ScaleOpts) -> ScaleResult {
    let mut r = ScaleResult {
        server: server.name,
        devices: o.devices,
        devices_listed: 0,
        devlist_ms_min: f64::NAN,
        devlist_ms_p50: f64::NAN,
        devlist_ms_max: f64::NAN,
        conns: 0,
        rss_before_kib: 0,
        rss_after_kib: 0,
        rss_per_conn_kib: f64::NAN,
        agg: Vec::new(),
        errors: Vec::new(),
    };
    let addr = server.addr;
    let pid = server.pid();

    // Devlist: connect, OP_REQ_DEVLIST, the whole reply parsed.
    let mut times = Vec::new();
    for _ in 0..o.devlist_reps {
        let t = Instant::now();
        match load::devlist(addr) {
            Ok(n) => {
                times.push(t.elapsed().as_secs_f64() * 1e3);
                r.devices_listed = n;
            }
            Err(e) => {
                r.errors.push(format!("devlist: {e}"));
                break;
            }
        }
    }
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        r.devlist_ms_min = times[0];
        r.devlist_ms_p50 = times[(times.len() - 1) / 2];
        r.devlist_ms_max = times[times.len() - 1];
    }
    if r.devices_listed != o.devices {
        r.errors.push(format!(
            "devlist listed {} devices, expected {}",
            r.devices_listed, o.devices
        ));
    }

    // Idle connections, each holding a distinct imported device.
    thread::sleep(Duration::from_millis(300));
    r.rss_before_kib = sys::rss_kib(pid).unwrap_or(0);
    let mut conns = Vec::with_capacity(o.conns);
    for i in 0..o.conns.min(o.devices) {
        match Conn::import(addr, &busid(i), false) {
            Ok(c) => conns.push(c),
            Err(e) => {
                r.errors.push(format!("idle import {}: {e}", busid(i)));
                break;
            }
        }
    }
    thread::sleep(Duration::from_millis(500));
    r.conns = conns.len();
    r.rss_after_kib = sys::rss_kib(pid).unwrap_or(0);
    if r.conns > 0 {
        r.rss_per_conn_kib = (r.rss_after_kib as f64 - r.rss_before_kib as f64) / r.conns as f64;
    }
    drop(conns);
    thread::sleep(Duration::from_millis(300));
    if let Err(e) = server.check_alive() {
        r.errors.push(e);
        return r;
    }

    // Aggregate throughput: n imports, each on its own device, 64 KiB IN x 8.
    for n in [1usize, 2, 4, 8] {
        if n > o.devices {
            break;
        }
        match aggregate(addr, pid, o, n) {
            Ok(a) => r.agg.push(a),
            Err(e) => r.errors.push(format!("aggregate x{n}: {e}")),
        }
    }
    r
}

fn aggregate(
    addr: std::net::SocketAddr,
    pid: u32,
    o: &ScaleOpts,
    n: usize,
) -> Result<AggPoint, String> {
    let spec = Spec {
        dir: Direction::In,
        ep: 1,
        len: 64 << 10,
        setup: [0; 8],
        depth: 8,
        expect_len: Some(64 << 10),
    };
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut handles = Vec::new();
    for i in 0..n {
        // The last devices, away from the ones the idle test used.
        let id = busid(o.devices - 1 - i);
        let b = barrier.clone();
        let (dur, warm) = (o.dur, o.warm);
        handles.push(thread::spawn(move || -> Result<load::RunStats, String> {
            let setup = (|| {
                let mut c = Conn::import(addr, &id, true)?;
                c.run(&spec, warm, &mut Vec::new())?;
                Ok::<_, std::io::Error>(c)
            })();
            b.wait();
            let mut c = setup.map_err(|e| format!("{id}: {e}"))?;
            c.run(&spec, dur, &mut Vec::new())
                .map_err(|e| format!("{id}: {e}"))
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let s0 = CpuSample::take(pid);
    let c0 = CpuSample::take(std::process::id());
    let mut urbs = 0u64;
    let mut bytes = 0u64;
    let mut errors = 0u64;
    let mut longest = Duration::ZERO;
    let mut first_err = None;
    for h in handles {
        match h.join().map_err(|_| "load thread panicked".to_string())? {
            Ok(st) => {
                urbs += st.urbs;
                bytes += st.bytes;
                errors += st.errors;
                longest = longest.max(st.elapsed);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let s1 = CpuSample::take(pid);
    let c1 = CpuSample::take(std::process::id());
    if let Some(e) = first_err {
        return Err(e);
    }
    let secs = longest.as_secs_f64().max(1e-9);
    let server_ns = s0.delta_ns(&s1) as f64;
    Ok(AggPoint {
        imports: n,
        mb_s: bytes as f64 / secs / 1e6,
        urb_s: urbs as f64 / secs,
        server_cpu_us_per_urb: server_ns / 1e3 / urbs.max(1) as f64,
        server_cpus: server_ns / 1e9 / wall,
        client_cpus: c0.delta_ns(&c1) as f64 / 1e9 / wall,
        errors,
    })
}
