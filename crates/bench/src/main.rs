//! `usbwire-bench`: raw TCP on loopback, usbwire's `usbipd` and the `usbip`
//! crate's server, measured side by side in one run under the same load
//! client.
//!
//! ```text
//! cargo build --release --bins && ./target/release/usbwire-bench
//! cargo run --release -p usbwire-bench -- --smoke        # CI: works, sane, no errors
//! ./target/release/usbwire-bench --scale                  # 1,000 devices, 256 idle connections
//! ./target/release/usbwire-bench --server-cpu 0 --client-cpu 0 --filter ctrl,pingpong
//! ./target/release/usbwire-bench --server-cpu 0 --client-cpu 0 --filter tls   # TLS beside plaintext
//! ./target/release/usbwire-bench --filter 64k --plot bulk.svg   # throughput vs URBs in flight
//! ```

mod crate_server;
mod hiccup;
mod load;
mod msc;
mod plot;
mod rawtcp;
mod scale;
mod servers;
mod sys;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use usbwire_proto::Direction;

use load::{Conn, Spec};
use servers::ServerProc;
use sys::CpuSample;

#[derive(Parser, Debug)]
#[command(
    name = "usbwire-bench",
    version,
    about = "USB/IP benchmarks: raw TCP vs usbwire vs the usbip crate"
)]
struct Args {
    /// Seconds per workload (after a short warm-up).
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// CI mode: very short runs; checks only that every workload works
    /// (non-zero rate, no errors) and exits non-zero otherwise.
    #[arg(long)]
    smoke: bool,
    /// Print only the final JSON line.
    #[arg(long)]
    json_only: bool,
    /// Run only workloads whose "server:workload" name contains one of
    /// these (comma-separated), e.g. `usbwire:bulk-in`, `ctrl,pingpong`.
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// Pin the server processes (and the raw-TCP peer thread) to this CPU.
    #[arg(long)]
    server_cpu: Option<usize>,
    /// Pin the load client (this process) to this CPU.
    #[arg(long)]
    client_cpu: Option<usize>,
    /// Run a hiccup meter: a real-time thread per CPU that sleeps 1 ms at
    /// a time and records how late it wakes, i.e. the machine's own
    /// stalls, shown beside each workload's maximum latency. Off by
    /// default: its wake-ups cost the workloads on this VM (p99 up, 64 KiB
    /// k32 throughput down by up to a fifth), so use it to explain tails,
    /// not for the table.
    #[arg(long)]
    hiccup_meter: bool,
    /// Scale mode: many devices, devlist time, RSS per idle connection,
    /// aggregate throughput of 1, 2, 4, 8 concurrent imports.
    #[arg(long)]
    scale: bool,
    /// Devices exported in scale mode.
    #[arg(long, default_value_t = 1000)]
    scale_devices: usize,
    /// Idle connections opened in scale mode.
    #[arg(long, default_value_t = 256)]
    scale_conns: usize,
    /// Size of the mass-storage image (MiB), written and read once first
    /// so that it is in the page cache.
    #[arg(long, default_value_t = 256)]
    msc_image_mib: u64,
    /// Bytes per READ(10) command in the mass-storage workload.
    #[arg(long, default_value_t = 128 * 1024)]
    msc_cmd_bytes: u32,
    /// READ(10) commands queued at once in the mass-storage workload.
    #[arg(long, default_value_t = 8)]
    msc_depth: usize,
    /// The usbipd binary (default: next to this one).
    #[arg(long)]
    usbipd: Option<PathBuf>,
    /// Internal: serve the usbip crate's device on an ephemeral port of
    /// 127.0.0.1, printed on stdout.
    #[arg(long, hide = true)]
    serve_usbip_crate: bool,
    /// Internal: devices the usbip crate's server exports.
    #[arg(long, hide = true, default_value_t = 1)]
    crate_devices: usize,
    /// Failed TLS handshakes (no client certificate, from this host) sent
    /// while a TLS import runs 64 KiB bulk IN, in the flood workload.
    #[arg(long, default_value_t = 1000)]
    flood_handshakes: u64,
    /// Draw 64 KiB bulk throughput against URBs in flight (1, 8, 32) for
    /// usbwire, the usbip crate and raw TCP from this run into FILE (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// One measured workload on one server.
#[derive(Debug, Clone)]
struct Row {
    server: &'static str,
    workload: String,
    ops: u64,
    bytes: u64,
    secs: f64,
    /// Microseconds.
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    cpu_us_per_op: Option<f64>,
    /// The hiccup meter's longest late wake-up during the run, µs.
    stall: Option<f64>,
    errors: u64,
    error: Option<String>,
}

impl Row {
    fn failed(server: &'static str, workload: &str, e: String) -> Row {
        Row {
            server,
            workload: workload.into(),
            ops: 0,
            bytes: 0,
            secs: 0.0,
            p50: None,
            p99: None,
            max: None,
            cpu_us_per_op: None,
            stall: None,
            errors: 1,
            error: Some(e),
        }
    }
    fn ops_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
    fn mb_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
    fn to_json(&self) -> Value {
        json!({
            "server": self.server, "workload": self.workload,
            "ops": self.ops, "bytes": self.bytes, "secs": self.secs,
            "ops_per_s": self.ops_s(), "mb_per_s": self.mb_s(),
            "p50_us": self.p50, "p99_us": self.p99, "max_us": self.max,
            "server_cpu_us_per_op": self.cpu_us_per_op,
            "machine_stall_max_us": self.stall,
            "errors": self.errors, "error": self.error,
        })
    }
}

/// p50, p99, max in µs of latencies in ns (sorts them).
fn percentiles(lat: &mut [u32]) -> (Option<f64>, Option<f64>, Option<f64>) {
    if lat.is_empty() {
        return (None, None, None);
    }
    lat.sort_unstable();
    let at = |q: usize| f64::from(lat[(lat.len() - 1) * q / 100]) / 1e3;
    (
        Some(at(50)),
        Some(at(99)),
        Some(f64::from(lat[lat.len() - 1]) / 1e3),
    )
}

struct Ctx {
    args: Args,
    dur: Duration,
    warm: Duration,
    lat: Vec<u32>,
    rows: Vec<Row>,
    quiet: bool,
    hiccups: Option<hiccup::Hiccups>,
}

impl Ctx {
    fn selected(&self, server: &str, workload: &str) -> bool {
        let name = format!("{server}:{workload}");
        self.args.filter.is_empty() || self.args.filter.iter().any(|f| name.contains(f.as_str()))
    }
    fn progress(&self, msg: &str) {
        if !self.quiet {
            eprintln!("  {msg}");
        }
    }
    /// Starts the hiccup meter's interval for the next row.
    fn measure_stalls(&self) {
        if let Some(h) = &self.hiccups {
            h.reset();
        }
    }
    fn push(&mut self, mut r: Row) {
        if r.error.is_none() && r.stall.is_none() {
            r.stall = self.hiccups.as_ref().and_then(|h| h.worst_us());
        }
        if !self.quiet {
            let e = r
                .error
                .as_deref()
                .map(|e| format!("  ERROR: {e}"))
                .unwrap_or_default();
            eprintln!(
                "  {:<12} {:<22} {:>10.0} op/s {:>8.1} MB/s  p50 {:>7}  p99 {:>7}  max {:>8}  cpu {:>6} us/op{}{e}",
                r.server,
                r.workload,
                r.ops_s(),
                r.mb_s(),
                fmt_us(r.p50),
                fmt_us(r.p99),
                fmt_us(r.max),
                fmt_opt(r.cpu_us_per_op, 2),
                r.stall
                    .map(|v| format!("  machine stall {}", fmt_us(Some(v))))
                    .unwrap_or_default(),
            );
        }
        self.rows.push(r);
    }
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.0}", v),
        Some(v) => format!("{:.1}", v),
        None => "-".into(),
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The URB workloads run against both servers.
fn urb_workloads() -> Vec<(String, Spec)> {
    let mut v = vec![(
        "ctrl-get-descriptor".to_string(),
        Spec {
            dir: Direction::In,
            ep: 0,
            len: 18,
            setup: load::GET_DEVICE_DESCRIPTOR,
            depth: 1,
            expect_len: Some(18),
        },
    )];
    for dir in [Direction::Out, Direction::In] {
        for (size, sname) in [(512u32, "512"), (64 << 10, "64k")] {
            for k in [1usize, 8, 32] {
                let (d, ep) = match dir {
                    Direction::Out => ("out", 2),
                    Direction::In => ("in", 1),
                };
                v.push((
                    format!("bulk-{d}-{sname}-k{k}"),
                    Spec {
                        dir,
                        ep,
                        len: size,
                        setup: [0; 8],
                        depth: k,
                        expect_len: Some(size),
                    },
                ));
            }
        }
    }
    v
}

fn run_raw(ctx: &mut Ctx) {
    let peer = ctx.args.server_cpu;
    for (name, size) in [("stream-64k", 64usize << 10), ("stream-1m", 1 << 20)] {
        if !ctx.selected("raw-tcp", name) {
            continue;
        }
        ctx.measure_stalls();
        let row = match rawtcp::stream(size, ctx.warm, ctx.dur, peer) {
            Ok(r) => Row {
                server: "raw-tcp",
                workload: name.into(),
                ops: r.ops,
                bytes: r.bytes,
                secs: r.elapsed.as_secs_f64(),
                p50: None,
                p99: None,
                max: None,
                cpu_us_per_op: Some(r.peer_cpu_ns as f64 / 1e3 / r.ops.max(1) as f64),
                stall: None,
                errors: 0,
                error: None,
            },
            Err(e) => Row::failed("raw-tcp", name, e.to_string()),
        };
        ctx.push(row);
    }
    // Latency workloads: a 64-byte ping-pong, and requests shaped like a
    // CMD_SUBMIT with 512 bytes or 64 KiB, each answered by 48 bytes (a
    // RET_SUBMIT), 32 in flight: bulk-out-512-k32 and bulk-out-64k-k32
    // against a server that does nothing.
    for (name, req) in [
        ("pingpong-64b", 0),
        ("pipelined-560b-k32", 48 + 512),
        ("pipelined-64k-k32", 48 + (64 << 10)),
    ] {
        if !ctx.selected("raw-tcp", name) {
            continue;
        }
        let mut lat = std::mem::take(&mut ctx.lat);
        ctx.measure_stalls();
        let r = if req == 0 {
            rawtcp::pingpong(ctx.warm, ctx.dur, peer, &mut lat)
        } else {
            rawtcp::pipelined(req, 48, 32, ctx.warm, ctx.dur, peer, &mut lat)
        };
        let row = match r {
            Ok(r) => {
                let (p50, p99, max) = percentiles(&mut lat);
                Row {
                    server: "raw-tcp",
                    workload: name.into(),
                    ops: r.ops,
                    bytes: r.bytes,
                    secs: r.elapsed.as_secs_f64(),
                    p50,
                    p99,
                    max,
                    cpu_us_per_op: Some(r.peer_cpu_ns as f64 / 1e3 / r.ops.max(1) as f64),
                    stall: None,
                    errors: 0,
                    error: None,
                }
            }
            Err(e) => Row::failed("raw-tcp", name, e.to_string()),
        };
        ctx.lat = lat;
        ctx.push(row);
    }
}

/// Every selected URB workload over one imported connection.
fn run_urb_suite(ctx: &mut Ctx, server: &mut ServerProc, busid: &str) {
    let name = server.name;
    let work: Vec<(String, Spec)> = urb_workloads()
        .into_iter()
        .filter(|(w, _)| ctx.selected(name, w))
        .collect();
    if work.is_empty() {
        return;
    }
    let mut conn = match Conn::import(server.addr, busid, true) {
        Ok(c) => c,
        Err(e) => {
            for (w, _) in &work {
                ctx.push(Row::failed(name, w, format!("import {busid}: {e}")));
            }
            return;
        }
    };
    let pid = server.pid();
    for (w, spec) in work {
        let row = measure(ctx, &mut conn, &spec, pid, name, &w);
        match row {
            Ok(r) => ctx.push(r),
            Err(e) => {
                let e = match server.check_alive() {
                    Err(dead) => format!("{e}; {dead}"),
                    Ok(()) => e,
                };
                ctx.push(Row::failed(name, &w, e));
                // The connection is out of step: a new one for the rest.
                match Conn::import(server.addr, busid, true) {
                    Ok(c) => conn = c,
                    Err(_) => return,
                }
            }
        }
    }
}

/// The server whose TLS rows are measured: usbipd with TLS on and
/// plaintext allowed from loopback, so that both run on one server.
const TLS_SERVER: &str = "usbwire-tls";
/// The workloads measured over TLS and, beside them, over plaintext.
const TLS_WORKLOADS: [&str; 5] = [
    "ctrl-get-descriptor",
    "bulk-out-512-k32",
    "bulk-out-64k-k8",
    "bulk-in-512-k32",
    "bulk-in-64k-k8",
];
const FLOOD_BASE: &str = "bulk-in-64k-k8";

fn flood_workload(n: u64) -> String {
    format!("tls-{FLOOD_BASE}-flood{n}")
}

fn after_flood_workload(n: u64) -> String {
    format!("tls-{FLOOD_BASE}-after-flood{n}")
}

/// Every TLS row's name, for --filter.
fn tls_rows(ctx: &Ctx) -> Vec<String> {
    let mut v = vec!["tls-handshake".to_string()];
    for w in TLS_WORKLOADS {
        v.push(format!("plain-{w}"));
        v.push(format!("tls-{w}"));
    }
    v.push(flood_workload(ctx.flood_count()));
    v.push(after_flood_workload(ctx.flood_count()));
    v
}

/// `spec` on `conn` after a warm-up, with the server's CPU time.
fn measure(
    ctx: &mut Ctx,
    conn: &mut Conn,
    spec: &Spec,
    pid: u32,
    server: &'static str,
    workload: &str,
) -> Result<Row, String> {
    let mut lat = std::mem::take(&mut ctx.lat);
    let row = (|| -> Result<Row, String> {
        conn.run(spec, ctx.warm, &mut lat)
            .map_err(|e| e.to_string())?;
        ctx.measure_stalls();
        let c0 = CpuSample::take(pid);
        let st = conn
            .run(spec, ctx.dur, &mut lat)
            .map_err(|e| e.to_string())?;
        let c1 = CpuSample::take(pid);
        let (p50, p99, max) = percentiles(&mut lat);
        Ok(Row {
            server,
            workload: workload.to_string(),
            ops: st.urbs,
            bytes: st.bytes,
            secs: st.elapsed.as_secs_f64(),
            p50,
            p99,
            max,
            cpu_us_per_op: Some(c0.delta_ns(&c1) as f64 / 1e3 / st.urbs.max(1) as f64),
            stall: None,
            errors: st.errors,
            error: st.first_error,
        })
    })();
    ctx.lat = lat;
    row
}

/// TLS handshakes one after the other for the run's duration: the
/// client's handshake time, and the server's CPU per handshake.
fn measure_handshakes(ctx: &mut Ctx, server: &ServerProc, pki: &tls::Pki) -> Row {
    let w = "tls-handshake";
    let mut lat = std::mem::take(&mut ctx.lat);
    lat.clear();
    let (addr, pid) = (server.addr, server.pid());
    let warm_end = std::time::Instant::now() + ctx.warm;
    // Bounded by time and by count.
    for _ in 0..100_000 {
        if std::time::Instant::now() >= warm_end {
            break;
        }
        if let Err(e) = tls::connect(addr, pki) {
            ctx.lat = lat;
            return Row::failed(TLS_SERVER, w, format!("TLS handshake: {e}"));
        }
    }
    ctx.measure_stalls();
    let c0 = CpuSample::take(pid);
    let start = std::time::Instant::now();
    let mut ops = 0u64;
    let mut error = None;
    while start.elapsed() < ctx.dur && ops < 1_000_000 {
        match tls::connect(addr, pki) {
            Ok((_, took)) => {
                load::record_latency(&mut lat, took);
                ops += 1;
            }
            Err(e) => {
                error = Some(format!("TLS handshake: {e}"));
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let c1 = CpuSample::take(pid);
    let (p50, p99, max) = percentiles(&mut lat);
    ctx.lat = lat;
    Row {
        server: TLS_SERVER,
        workload: w.into(),
        ops,
        bytes: 0,
        secs,
        p50,
        p99,
        max,
        cpu_us_per_op: Some(c0.delta_ns(&c1) as f64 / 1e3 / ops.max(1) as f64),
        stall: None,
        errors: u64::from(error.is_some()),
        error,
    }
}

/// The TLS rows, on a usbipd with TLS on: handshakes; each workload over
/// plaintext, then over TLS; then 64 KiB bulk IN over TLS while a flood
/// of refused handshakes from this host arrives.
fn run_tls_suite(ctx: &mut Ctx, server: &mut ServerProc, busid: &str, pki: &tls::Pki) {
    let name = server.name;
    let pid = server.pid();
    if ctx.selected(name, "tls-handshake") {
        let row = measure_handshakes(ctx, server, pki);
        ctx.push(row);
    }
    let all = urb_workloads();
    let spec_of = |w: &str| all.iter().find(|(n, _)| n == w).map(|(_, s)| *s);
    for transport in ["plain", "tls"] {
        let work: Vec<(String, Spec)> = TLS_WORKLOADS
            .iter()
            .map(|w| {
                (
                    format!("{transport}-{w}"),
                    spec_of(w).expect("a known workload"),
                )
            })
            .filter(|(w, _)| ctx.selected(name, w))
            .collect();
        let flood = transport == "tls" && ctx.selected(name, &flood_workload(ctx.flood_count()));
        if work.is_empty() && !flood {
            continue;
        }
        let connect = || -> std::io::Result<Conn> {
            let stream = if transport == "tls" {
                tls::connect(server.addr, pki)?.0
            } else {
                load::Stream::Tcp(load::connect(server.addr)?)
            };
            Conn::import_on(stream, busid, true)
        };
        let mut conn = match connect() {
            Ok(c) => c,
            Err(e) => {
                for (w, _) in &work {
                    ctx.push(Row::failed(
                        name,
                        w,
                        format!("{transport} import {busid}: {e}"),
                    ));
                }
                continue;
            }
        };
        for (w, spec) in &work {
            match measure(ctx, &mut conn, spec, pid, name, w) {
                Ok(r) => ctx.push(r),
                Err(e) => {
                    ctx.push(Row::failed(name, w, e));
                    match connect() {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                }
            }
        }
        if flood {
            let spec = spec_of(FLOOD_BASE).expect("a known workload");
            let row = measure_during_flood(ctx, &mut conn, &spec, server, pki);
            let flood_secs = row.secs;
            let flood_ok = row.error.is_none();
            ctx.push(row);
            if flood_ok {
                // The control: the same workload right after, for as long
                // as the flood lasted, so that both see the same machine.
                let dur = ctx.dur;
                ctx.dur = Duration::from_secs_f64(flood_secs.max(0.1));
                let w = after_flood_workload(ctx.flood_count());
                let row = measure(ctx, &mut conn, &spec, pid, name, &w)
                    .unwrap_or_else(|e| Row::failed(name, &w, e));
                ctx.dur = dur;
                ctx.push(row);
            }
        }
    }
}

impl Ctx {
    fn flood_count(&self) -> u64 {
        if self.args.smoke {
            self.args.flood_handshakes.min(50)
        } else {
            self.args.flood_handshakes
        }
        .max(1)
    }
}

/// `spec` on `conn` for as long as a flood of refused handshakes lasts.
/// The flood's thread runs on another CPU than the load client where the
/// machine has one, so that what the row shows is the server's share.
fn measure_during_flood(
    ctx: &mut Ctx,
    conn: &mut Conn,
    spec: &Spec,
    server: &ServerProc,
    pki: &tls::Pki,
) -> Row {
    let n = ctx.flood_count();
    let w = flood_workload(n);
    let (addr, pid) = (server.addr, server.pid());
    let mut lat = std::mem::take(&mut ctx.lat);
    let mut chunk = Vec::with_capacity(lat.capacity().min(1 << 20));
    if let Err(e) = conn.run(spec, ctx.warm, &mut chunk) {
        ctx.lat = lat;
        return Row::failed(TLS_SERVER, &w, e.to_string());
    }
    lat.clear();
    let other_cpu = ctx
        .args
        .client_cpu
        .map(|c| (c + 1) % sys::online_cpus().max(1))
        .filter(|o| Some(*o) != ctx.args.client_cpu);
    let anonymous = pki.anonymous.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    ctx.measure_stalls();
    let c0 = CpuSample::take(pid);
    let flooder = std::thread::spawn(move || {
        if let Some(cpu) = other_cpu {
            let _ = sys::pin_thread(0, cpu);
        }
        let f = tls::flood(addr, &anonymous, n);
        flag.store(true, std::sync::atomic::Ordering::Release);
        f
    });
    let mut total = load::RunStats::default();
    let start = std::time::Instant::now();
    // Bounded: the flood ends (each handshake has the socket timeouts),
    // and at most ten minutes in any case.
    let mut failed = None;
    // At least one turn, however quickly the flood is over.
    loop {
        if start.elapsed() > Duration::from_secs(600) {
            failed = Some("the flood did not end within ten minutes".into());
            break;
        }
        match conn.run(spec, Duration::from_millis(100), &mut chunk) {
            Ok(st) => {
                total.urbs += st.urbs;
                total.bytes += st.bytes;
                total.errors += st.errors;
                if total.first_error.is_none() {
                    total.first_error = st.first_error;
                }
                for &l in &chunk {
                    if lat.len() < lat.capacity() {
                        lat.push(l);
                    }
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
        if done.load(std::sync::atomic::Ordering::Acquire) {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let c1 = CpuSample::take(pid);
    let flood = flooder.join().unwrap_or_default();
    let (p50, p99, max) = percentiles(&mut lat);
    ctx.lat = lat;
    ctx.progress(&format!(
        "flood: {} handshakes refused, {} unexpected, in {:.2} s",
        flood.refused,
        flood.unexpected,
        flood.elapsed.as_secs_f64()
    ));
    let mut error = failed.or(total.first_error);
    if flood.refused != n {
        error.get_or_insert(format!(
            "the flood's handshakes: {} of {n} refused; {}",
            flood.refused,
            flood.first_unexpected.unwrap_or_default()
        ));
    }
    Row {
        server: TLS_SERVER,
        workload: w,
        ops: total.urbs,
        bytes: total.bytes,
        secs,
        p50,
        p99,
        max,
        cpu_us_per_op: Some(c0.delta_ns(&c1) as f64 / 1e3 / total.urbs.max(1) as f64),
        stall: None,
        errors: total.errors + u64::from(error.is_some() && total.errors == 0),
        error,
    }
}

fn run_msc(ctx: &mut Ctx, server: &ServerProc, busid: &str, image_bytes: u64) {
    let w = format!(
        "msc-read-{}k-q{}",
        ctx.args.msc_cmd_bytes / 1024,
        ctx.args.msc_depth
    );
    if !ctx.selected(server.name, &w) {
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return ctx.push(Row::failed(server.name, &w, e.to_string())),
    };
    let (addr, pid) = (server.addr, server.pid());
    let (warm, dur) = (ctx.warm, ctx.dur);
    let (depth, cmd) = (
        ctx.args.msc_depth.max(1),
        ctx.args.msc_cmd_bytes.max(512) / 512 * 512,
    );
    let cap = ctx.lat.capacity().min(1 << 20);
    let hiccups = ctx.hiccups.as_ref();
    let row = rt.block_on(async move {
        let dev = msc::prepare(addr, busid).await?;
        let _ = msc::read_loop(&dev, warm, depth, cmd, image_bytes, 0).await;
        if let Some(h) = hiccups {
            h.reset();
        }
        let c0 = CpuSample::take(pid);
        let mut r = msc::read_loop(&dev, dur, depth, cmd, image_bytes, cap).await;
        let c1 = CpuSample::take(pid);
        let (p50, p99, max) = percentiles(&mut r.lat);
        Ok::<Row, String>(Row {
            server: "usbwire",
            workload: String::new(),
            ops: r.commands,
            bytes: r.bytes,
            secs: r.elapsed.as_secs_f64(),
            p50,
            p99,
            max,
            cpu_us_per_op: Some(c0.delta_ns(&c1) as f64 / 1e3 / r.commands.max(1) as f64),
            stall: None,
            errors: r.errors,
            error: r.first_error,
        })
    });
    match row {
        Ok(mut r) => {
            r.workload = w;
            ctx.push(r)
        }
        Err(e) => ctx.push(Row::failed(server.name, &w, e)),
    }
}

fn print_tables(ctx: &Ctx, scale: &[scale::ScaleResult]) {
    let raw: Vec<&Row> = ctx.rows.iter().filter(|r| r.server == "raw-tcp").collect();
    if !raw.is_empty() {
        println!();
        println!("raw TCP on loopback (the limit)");
        println!(
            "{:<24} {:>9} {:>9} {:>8} {:>8} {:>8} {:>11}",
            "workload", "ops/s", "MB/s", "p50 us", "p99 us", "max us", "peer us/op"
        );
        for r in raw {
            println!(
                "{:<24} {:>9} {:>9.0} {:>8} {:>8} {:>8} {:>11}{}",
                r.workload,
                fmt_rate(r.ops_s()),
                r.mb_s(),
                fmt_us(r.p50),
                fmt_us(r.p99),
                fmt_us(r.max),
                fmt_opt(r.cpu_us_per_op, 2),
                r.error
                    .as_deref()
                    .map(|e| format!("  ERROR {e}"))
                    .unwrap_or_default()
            );
        }
    }
    let servers = ["usbwire", "usbip-crate"];
    let mut names: Vec<&str> = Vec::new();
    for r in &ctx.rows {
        if r.server != "raw-tcp" && r.server != TLS_SERVER && !names.contains(&r.workload.as_str())
        {
            names.push(&r.workload);
        }
    }
    if !names.is_empty() {
        println!();
        println!(
            "URB workloads (MB = 10^6 bytes; latency = submit to reply parsed, us; cpu = server CPU us per URB)"
        );
        let group = format!(
            "{:>8} {:>7} {:>7} {:>7} {:>7} {:>6}",
            "URB/s", "MB/s", "p50", "p99", "max", "cpu"
        );
        println!(
            "{:<22} | {:<46} | {:<46} | {:>6}",
            "", "usbwire", "usbip crate 0.9", "ratio"
        );
        println!("{:<22} | {group} | {group} | {:>6}", "workload", "uw/cr");
        for w in names {
            let mut line = format!("{w:<22}");
            let mut rates = [None, None];
            for (i, s) in servers.iter().enumerate() {
                match ctx.rows.iter().find(|r| r.server == *s && r.workload == w) {
                    Some(r) if r.error.is_some() && r.ops == 0 => {
                        line.push_str(&format!(" | {:<46}", "FAILED"));
                    }
                    Some(r) => {
                        rates[i] = Some(r.ops_s());
                        line.push_str(&format!(
                            " | {:>8} {:>7.1} {:>7} {:>7} {:>7} {:>6}",
                            fmt_rate(r.ops_s()),
                            r.mb_s(),
                            fmt_us(r.p50),
                            fmt_us(r.p99),
                            fmt_us(r.max),
                            fmt_opt(r.cpu_us_per_op, 2)
                        ));
                    }
                    None => line.push_str(&format!(" | {:<46}", "n/a")),
                }
            }
            match rates {
                [Some(a), Some(b)] if b > 0.0 => line.push_str(&format!(" | {:>5.2}x", a / b)),
                _ => line.push_str(&format!(" | {:>6}", "-")),
            }
            println!("{line}");
        }
        for r in ctx.rows.iter().filter(|r| r.server != TLS_SERVER) {
            if let Some(e) = &r.error {
                println!(
                    "  error in {}:{}: {e} ({} errors)",
                    r.server, r.workload, r.errors
                );
            }
        }
    }
    print_tls_table(ctx);
    for s in scale {
        println!();
        println!(
            "scale, {}: {} devices exported, devlist {} listed in {:.2} ms p50 (min {:.2}, max {:.2})",
            s.server, s.devices, s.devices_listed, s.devlist_ms_p50, s.devlist_ms_min, s.devlist_ms_max
        );
        println!(
            "  {} idle imported connections: RSS {} -> {} KiB, {:.1} KiB per connection",
            s.conns, s.rss_before_kib, s.rss_after_kib, s.rss_per_conn_kib
        );
        println!(
            "  {:>8} {:>9} {:>9} {:>12} {:>12} {:>12}",
            "imports", "MB/s", "URB/s", "srv us/URB", "server CPUs", "client CPUs"
        );
        for a in &s.agg {
            println!(
                "  {:>8} {:>9.0} {:>9} {:>12.2} {:>12.2} {:>12.2}",
                a.imports,
                a.mb_s,
                fmt_rate(a.urb_s),
                a.server_cpu_us_per_urb,
                a.server_cpus,
                a.client_cpus
            );
        }
        for e in &s.errors {
            println!("  error: {e}");
        }
    }
}

/// TLS beside plaintext, on one usbipd in one run.
fn print_tls_table(ctx: &Ctx) {
    let rows: Vec<&Row> = ctx.rows.iter().filter(|r| r.server == TLS_SERVER).collect();
    if rows.is_empty() {
        return;
    }
    let find = |w: &str| rows.iter().find(|r| r.workload == w);
    println!();
    println!(
        "TLS 1.3 in user space (rustls) beside plaintext, one usbipd (MB = 10^6 bytes; \
         latency us; cpu = server CPU us per URB)"
    );
    let group = format!(
        "{:>8} {:>7} {:>7} {:>7} {:>6}",
        "URB/s", "MB/s", "p50", "p99", "cpu"
    );
    println!(
        "{:<22} | {:<39} | {:<39} | {:>6}",
        "", "plaintext", "TLS", "ratio"
    );
    println!("{:<22} | {group} | {group} | {:>6}", "workload", "tls/pl");
    let cell = |r: Option<&&Row>| match r {
        Some(r) if r.error.is_some() && r.ops == 0 => format!("{:<39}", "FAILED"),
        Some(r) => format!(
            "{:>8} {:>7.1} {:>7} {:>7} {:>6}",
            fmt_rate(r.ops_s()),
            r.mb_s(),
            fmt_us(r.p50),
            fmt_us(r.p99),
            fmt_opt(r.cpu_us_per_op, 2)
        ),
        None => format!("{:<39}", "n/a"),
    };
    for w in TLS_WORKLOADS {
        let (p, t) = (find(&format!("plain-{w}")), find(&format!("tls-{w}")));
        let ratio = match (p, t) {
            (Some(p), Some(t)) if p.ops_s() > 0.0 => format!("{:>5.2}x", t.ops_s() / p.ops_s()),
            _ => format!("{:>6}", "-"),
        };
        println!("{w:<22} | {} | {} | {ratio}", cell(p), cell(t));
    }
    let flood = flood_workload(ctx.flood_count());
    if let Some(r) = find(&flood) {
        let after = find(&after_flood_workload(ctx.flood_count()));
        let ratio = match after {
            Some(b) if b.mb_s() > 0.0 => format!("{:>5.2}x", r.mb_s() / b.mb_s()),
            _ => format!("{:>6}", "-"),
        };
        println!(
            "{:<22} | {:<39} | {} | {ratio} of the same time right after",
            format!("{FLOOD_BASE}+flood"),
            format!("{} refused handshakes meanwhile", ctx.flood_count()),
            cell(Some(r))
        );
        println!(
            "{:<22} | {:<39} | {} |",
            format!("{FLOOD_BASE} after"),
            format!("no flood, {:.2} s as long", r.secs),
            cell(after)
        );
    }
    if let Some(r) = find("tls-handshake") {
        println!(
            "TLS handshake (TCP connected to handshake done, client side): p50 {} us, p99 {} us, \
             {} handshakes/s, server CPU {} us per handshake",
            fmt_us(r.p50),
            fmt_us(r.p99),
            fmt_rate(r.ops_s()),
            fmt_opt(r.cpu_us_per_op, 0)
        );
    }
    println!(
        "kernel TLS: {}",
        tls::ktls_unavailable().map_or_else(
            || "this kernel offers it, but usbipd's kernel TLS path is not measured by this bench"
                .to_string(),
            |why| format!("not available here: {why}")
        )
    );
    for r in &rows {
        if let Some(e) = &r.error {
            println!(
                "  error in {}:{}: {e} ({} errors)",
                r.server, r.workload, r.errors
            );
        }
    }
}

/// The project's performance targets, checked against what was measured.
fn targets(ctx: &Ctx, scale: &[scale::ScaleResult]) -> Vec<Value> {
    let find = |s: &str, w: &str| {
        ctx.rows
            .iter()
            .find(|r| r.server == s && r.workload == w && r.ops > 0)
    };
    let mut out = Vec::new();
    let mut verdict = |id: &str, what: String, pass: Option<bool>| {
        out.push(json!({"target": id, "check": what,
            "verdict": match pass { Some(true) => "PASS", Some(false) => "FAIL", None => "n/a" }}));
    };
    // P1
    let raw64 = find("raw-tcp", "stream-64k").map(|r| r.mb_s());
    for d in ["out", "in"] {
        for k in [8, 32] {
            let w = format!("bulk-{d}-64k-k{k}");
            let uw = find("usbwire", &w).map(|r| r.mb_s());
            let cr = find("usbip-crate", &format!("bulk-out-64k-k{k}")).map(|r| r.mb_s());
            let pass = match (uw, cr, raw64) {
                (Some(u), Some(c), Some(t)) => Some(u >= c && u >= 0.8 * t),
                _ => None,
            };
            verdict(
                "P1",
                format!(
                    "{w}: usbwire {} MB/s >= crate OUT {} MB/s and >= 80% of raw 64k stream {} MB/s",
                    fmt_opt(uw, 0),
                    fmt_opt(cr, 0),
                    fmt_opt(raw64, 0)
                ),
                pass,
            );
        }
    }
    // P2
    for d in ["out", "in"] {
        let w = format!("bulk-{d}-512-k32");
        let uw = find("usbwire", &w);
        let cr = find("usbip-crate", &w);
        let cpu = uw.and_then(|r| r.cpu_us_per_op);
        verdict(
            "P2",
            format!("{w}: usbwire server CPU {} us/URB <= 2", fmt_opt(cpu, 2)),
            cpu.map(|c| c <= 2.0),
        );
        let ratio = match (uw, cr) {
            (Some(u), Some(c)) if c.ops_s() > 0.0 => Some(u.ops_s() / c.ops_s()),
            _ => None,
        };
        verdict(
            "P2",
            format!(
                "{w}: usbwire {} URB/s >= 3x crate {} URB/s (ratio {})",
                fmt_rate(uw.map(|r| r.ops_s()).unwrap_or(0.0)),
                fmt_rate(cr.map(|r| r.ops_s()).unwrap_or(0.0)),
                fmt_opt(ratio, 2)
            ),
            ratio.map(|r| r >= 3.0),
        );
    }
    // P3
    let ctrl = find("usbwire", "ctrl-get-descriptor").and_then(|r| r.p50);
    let ping = find("raw-tcp", "pingpong-64b").and_then(|r| r.p50);
    let pinned = ctx.args.server_cpu.is_some() && ctx.args.server_cpu == ctx.args.client_cpu;
    verdict(
        "P3",
        format!(
            "control p50 {} us <= raw ping-pong p50 {} us + 3 ({})",
            fmt_opt(ctrl, 1),
            fmt_opt(ping, 1),
            if pinned {
                "pinned to one CPU"
            } else {
                "NOT pinned: run with --server-cpu 0 --client-cpu 0 for the real check"
            }
        ),
        match (ctrl, ping) {
            (Some(c), Some(p)) => Some(c <= p + 3.0),
            _ => None,
        },
    );
    let worst = ctx
        .rows
        .iter()
        .filter(|r| {
            r.server == "usbwire" && (r.workload.ends_with("-k8") || r.workload.ends_with("-k32"))
        })
        .filter_map(|r| r.max.map(|m| (m, r.workload.clone(), r.stall)))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    // The same machine's loopback TCP, answering at once, in this run: a
    // tail above 5 ms there is the machine's, not the server's.
    let raw_max = ["pipelined-560b-k32", "pipelined-64k-k32"]
        .iter()
        .filter_map(|w| find("raw-tcp", w).and_then(|r| r.max))
        .max_by(f64::total_cmp);
    verdict(
        "P3",
        match &worst {
            Some((m, w, stall)) => format!(
                "no pipelined usbwire run with max latency > 5 ms: worst {m:.0} us ({w}; \
                 the machine stalled a sleeping thread {} us during it); \
                 raw TCP pipelined max {} us",
                fmt_opt(*stall, 0),
                fmt_opt(raw_max, 0)
            ),
            None => "no pipelined usbwire run with max latency > 5 ms: not run".into(),
        },
        worst.as_ref().map(|(m, _, _)| *m <= 5000.0),
    );
    // P4
    let uws = scale.iter().find(|s| s.server == "usbwire");
    verdict(
        "P4",
        format!(
            "devlist of {} devices {} ms < 50",
            uws.map(|s| s.devices).unwrap_or(0),
            fmt_opt(uws.map(|s| s.devlist_ms_p50), 2)
        ),
        uws.filter(|s| s.devices >= 1000 && s.devlist_ms_p50.is_finite())
            .map(|s| s.devlist_ms_p50 < 50.0),
    );
    verdict(
        "P4",
        format!(
            "idle connection RSS {} KiB <= 64",
            fmt_opt(uws.map(|s| s.rss_per_conn_kib), 1)
        ),
        uws.filter(|s| s.rss_per_conn_kib.is_finite())
            .map(|s| s.rss_per_conn_kib <= 64.0),
    );
    let agg: Vec<f64> = uws
        .map(|s| s.agg.iter().map(|a| a.mb_s).collect())
        .unwrap_or_default();
    // Rising: each step keeps at least 95% of the previous one, unless the
    // previous step already had the CPUs saturated (server + client >= 90%).
    let ncpu = sys::online_cpus() as f64;
    let rising = uws.filter(|s| s.agg.len() == 4).map(|s| {
        s.agg.windows(2).all(|w| {
            w[1].mb_s >= 0.95 * w[0].mb_s || w[0].server_cpus + w[0].client_cpus >= 0.9 * ncpu
        })
    });
    verdict(
        "P4",
        format!(
            "aggregate 64k IN MB/s rising 1->8 imports until CPU saturates: {}",
            agg.iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        ),
        rising,
    );
    let m = ctx
        .rows
        .iter()
        .find(|r| r.server == "usbwire" && r.workload.starts_with("msc-read") && r.ops > 0)
        .map(|r| r.mb_s());
    verdict(
        "P4",
        format!(
            "MSC READ through the client library {} MB/s >= 1000",
            fmt_opt(m, 0)
        ),
        m.map(|v| v >= 1000.0),
    );
    // Issue #14: TLS.
    let tls_find = |w: &str| find(TLS_SERVER, w);
    for d in ["out", "in"] {
        let w = format!("bulk-{d}-64k-k8");
        let p = tls_find(&format!("plain-{w}")).map(|r| r.mb_s());
        let t = tls_find(&format!("tls-{w}")).map(|r| r.mb_s());
        verdict(
            "S1",
            format!(
                "{w}: userspace TLS {} MB/s >= 50% of plaintext {} MB/s, same server and run ({})",
                fmt_opt(t, 0),
                fmt_opt(p, 0),
                match (t, p) {
                    (Some(t), Some(p)) if p > 0.0 => format!("{:.0}%", 100.0 * t / p),
                    _ => "-".into(),
                }
            ),
            match (t, p) {
                (Some(t), Some(p)) => Some(t >= 0.5 * p),
                _ => None,
            },
        );
    }
    verdict(
        "S1",
        format!(
            "64 KiB bulk over kernel TLS >= 80% of plaintext: {}",
            tls::ktls_unavailable().map_or_else(
                || "not measured by this bench (usbipd's kernel TLS path)".to_string(),
                |why| format!("not available here: {why}")
            )
        ),
        None,
    );
    let n = ctx.flood_count();
    let base = tls_find(&after_flood_workload(n)).map(|r| r.mb_s());
    let flooded = tls_find(&flood_workload(n)).map(|r| r.mb_s());
    verdict(
        "S2",
        format!(
            "TLS {FLOOD_BASE} during {n} refused handshakes from one source {} MB/s >= 90% of \
             the same time right after, without {} MB/s ({}){}",
            fmt_opt(flooded, 0),
            fmt_opt(base, 0),
            match (flooded, base) {
                (Some(f), Some(b)) if b > 0.0 => format!("{:.0}%", 100.0 * f / b),
                _ => "-".into(),
            },
            if pinned {
                ""
            } else {
                "; NOT pinned: the flood's own thread then competes with the load client for \
                 the same CPUs, so the row shows the bench's cost as well as the server's: run \
                 with --server-cpu 0 --client-cpu 0 for the real check"
            }
        ),
        match (flooded, base) {
            (Some(f), Some(b)) if pinned => Some(f >= 0.9 * b),
            _ => None,
        },
    );
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.serve_usbip_crate {
        crate_server::serve(args.crate_devices);
    }
    match real_main(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("usbwire-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn real_main(args: Args) -> Result<bool, String> {
    if let Some(cpu) = args.client_cpu {
        sys::pin_thread(0, cpu).map_err(|e| format!("--client-cpu {cpu}: {e}"))?;
    }
    let (dur, warm) = if args.smoke {
        (Duration::from_millis(300), Duration::from_millis(50))
    } else {
        let d = Duration::from_secs_f64(args.duration.clamp(0.05, 600.0));
        (d, (d / 5).min(Duration::from_millis(300)))
    };
    let quiet = args.json_only;
    let machine = sys::machine();
    let load_start = sys::loadavg();
    let steal_start = sys::steal_ms();
    if !quiet {
        eprintln!(
            "usbwire-bench on {machine} (load average {load_start:.2}): \
             {dur:?} per workload after a {warm:?} warm-up"
        );
        if args.server_cpu.is_none() || args.server_cpu != args.client_cpu {
            eprintln!(
                "note: the P3 control-latency comparison is meant to be run pinned to one CPU: \
                 --server-cpu 0 --client-cpu 0 --filter ctrl,pingpong"
            );
        }
    }
    let mut ctx = Ctx {
        dur,
        warm,
        // Preallocated once: no allocation while measuring.
        lat: Vec::with_capacity(if args.smoke { 1 << 20 } else { 8 << 20 }),
        rows: Vec::new(),
        quiet,
        hiccups: args.hiccup_meter.then(hiccup::Hiccups::start),
        args,
    };
    if let Some(h) = &ctx.hiccups {
        // Give the meter threads a moment to set themselves up.
        std::thread::sleep(Duration::from_millis(20));
        if !h.realtime() && !quiet {
            eprintln!(
                "note: the hiccup meter could not run real-time (needs root or CAP_SYS_NICE): \
                 its stalls include waiting for busy CPUs"
            );
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("usbwire-bench")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;

    if !quiet
        && ["stream-64k", "stream-1m", "pingpong-64b"]
            .iter()
            .any(|w| ctx.selected("raw-tcp", w))
    {
        eprintln!("raw TCP:");
    }
    run_raw(&mut ctx);

    // usbwire's usbipd: test device 1-1, mass storage 1-2.
    let msc_w = format!(
        "msc-read-{}k-q{}",
        ctx.args.msc_cmd_bytes / 1024,
        ctx.args.msc_depth
    );
    let want_uw = urb_workloads()
        .iter()
        .any(|(w, _)| ctx.selected("usbwire", w))
        || ctx.selected("usbwire", &msc_w);
    let mut fatal: Option<String> = None;
    if want_uw {
        let exe = servers::find_usbipd(ctx.args.usbipd.as_deref())?;
        let mib = if ctx.args.smoke {
            ctx.args.msc_image_mib.min(32)
        } else {
            ctx.args.msc_image_mib
        }
        .max(1);
        let image = tmp.path().join("disk.img");
        if ctx.selected("usbwire", &msc_w) {
            ctx.progress(&format!(
                "writing a {mib} MiB disk image and reading it into the page cache"
            ));
            msc::make_image(&image, mib).map_err(|e| format!("{}: {e}", image.display()))?;
        } else {
            std::fs::write(&image, vec![0u8; 1 << 20]).map_err(|e| e.to_string())?;
        }
        let config = tmp.path().join("usbipd.toml");
        std::fs::write(
            &config,
            format!(
                "[[device]]\nkind = \"test\"\nbusid = \"1-1\"\n\n[[device]]\nkind = \"mass-storage\"\nbusid = \"1-2\"\nimage = \"{}\"\n",
                image.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        if !quiet {
            eprintln!("usbwire ({}):", exe.display());
        }
        match ServerProc::usbipd(&exe, &config, &tmp.path().join("usbipd.log")) {
            Ok(mut srv) => {
                if let Some(cpu) = ctx.args.server_cpu {
                    sys::pin_process(srv.pid(), cpu).map_err(|e| format!("--server-cpu: {e}"))?;
                }
                run_urb_suite(&mut ctx, &mut srv, "1-1");
                let image_bytes = std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
                run_msc(&mut ctx, &srv, "1-2", image_bytes);
                if let Err(e) = srv.check_alive() {
                    fatal = Some(e);
                }
                srv.stop();
            }
            Err(e) => fatal = Some(e),
        }
    }

    let want_tls = tls_rows(&ctx).iter().any(|w| ctx.selected(TLS_SERVER, w));
    if want_tls {
        let exe = servers::find_usbipd(ctx.args.usbipd.as_deref())?;
        let pki = tls::Pki::new(tmp.path())?;
        let config = tmp.path().join("usbipd-tls.toml");
        std::fs::write(
            &config,
            format!(
                "[[device]]\nkind = \"test\"\nbusid = \"1-1\"\n\n{}",
                pki.server_toml
            ),
        )
        .map_err(|e| e.to_string())?;
        if !quiet {
            eprintln!("usbwire with TLS on, plaintext allowed from 127.0.0.0/8:");
        }
        match ServerProc::usbipd_named(
            TLS_SERVER,
            &exe,
            &config,
            &tmp.path().join("usbipd-tls.log"),
        ) {
            Ok(mut srv) => {
                if let Some(cpu) = ctx.args.server_cpu {
                    sys::pin_process(srv.pid(), cpu).map_err(|e| format!("--server-cpu: {e}"))?;
                }
                run_tls_suite(&mut ctx, &mut srv, "1-1", &pki);
                if let Err(e) = srv.check_alive() {
                    fatal.get_or_insert(e);
                }
                srv.stop();
            }
            Err(e) => {
                fatal.get_or_insert(e);
            }
        }
    }

    let want_cr = urb_workloads()
        .iter()
        .any(|(w, _)| ctx.selected("usbip-crate", w));
    if want_cr {
        if !quiet {
            eprintln!("usbip crate 0.9 (child process):");
        }
        match ServerProc::usbip_crate(1, &tmp.path().join("usbip-crate.log")) {
            Ok(mut srv) => {
                if let Some(cpu) = ctx.args.server_cpu {
                    sys::pin_process(srv.pid(), cpu).map_err(|e| format!("--server-cpu: {e}"))?;
                }
                run_urb_suite(&mut ctx, &mut srv, "1-1");
                if let Err(e) = srv.check_alive() {
                    fatal.get_or_insert(e);
                }
                srv.stop();
            }
            Err(e) => {
                fatal.get_or_insert(e);
            }
        }
    }

    let mut scale_results = Vec::new();
    if ctx.args.scale {
        let (devices, conns, reps) = if ctx.args.smoke {
            (
                ctx.args.scale_devices.min(100),
                ctx.args.scale_conns.min(16),
                3,
            )
        } else {
            (ctx.args.scale_devices.max(8), ctx.args.scale_conns, 20)
        };
        let opts = scale::ScaleOpts {
            devices,
            conns,
            devlist_reps: reps,
            dur,
            warm,
        };
        if ctx.selected("usbwire", "scale") {
            let exe = servers::find_usbipd(ctx.args.usbipd.as_deref())?;
            let config = tmp.path().join("scale.toml");
            std::fs::write(&config, scale::config(devices)).map_err(|e| e.to_string())?;
            if !quiet {
                eprintln!("scale, usbwire: {devices} devices, {conns} idle connections");
            }
            match ServerProc::usbipd(&exe, &config, &tmp.path().join("usbipd-scale.log")) {
                Ok(mut srv) => {
                    if let Some(cpu) = ctx.args.server_cpu {
                        sys::pin_process(srv.pid(), cpu).map_err(|e| e.to_string())?;
                    }
                    scale_results.push(scale::run(&mut srv, &opts));
                    srv.stop();
                }
                Err(e) => {
                    fatal.get_or_insert(e);
                }
            }
        }
        if ctx.selected("usbip-crate", "scale") {
            if !quiet {
                eprintln!("scale, usbip crate: {devices} devices, {conns} idle connections");
            }
            match ServerProc::usbip_crate(devices, &tmp.path().join("usbip-crate-scale.log")) {
                Ok(mut srv) => {
                    if let Some(cpu) = ctx.args.server_cpu {
                        sys::pin_process(srv.pid(), cpu).map_err(|e| e.to_string())?;
                    }
                    scale_results.push(scale::run(&mut srv, &opts));
                    srv.stop();
                }
                Err(e) => {
                    fatal.get_or_insert(e);
                }
            }
        }
    }

    if !quiet {
        print_tables(&ctx, &scale_results);
    }
    let t = targets(&ctx, &scale_results);
    let steal = sys::steal_ms() - steal_start;
    if !quiet {
        println!();
        println!(
            "steal time during the run: {steal:.0} ms (the hypervisor running other guests \
             while this one had work; /proc/stat)"
        );
        println!();
        println!("targets (informational; the smoke test never checks timings):");
        for v in &t {
            println!(
                "  {} {:<5} {}",
                v["target"].as_str().unwrap_or(""),
                v["verdict"].as_str().unwrap_or(""),
                v["check"].as_str().unwrap_or("")
            );
        }
        println!();
    }

    // Sanity: everything selected ran, moved data, and saw no errors.
    let mut problems: Vec<String> = Vec::new();
    if let Some(e) = &fatal {
        problems.push(e.clone());
    }
    if ctx.rows.is_empty() && scale_results.is_empty() {
        problems.push("no workload matched --filter".into());
    }
    for r in &ctx.rows {
        if r.ops == 0 || r.errors > 0 || r.error.is_some() || r.ops_s().is_nan() || r.ops_s() <= 0.0
        {
            problems.push(format!(
                "{}:{}: {} ops, {} errors {}",
                r.server,
                r.workload,
                r.ops,
                r.errors,
                r.error.as_deref().unwrap_or("")
            ));
        }
        // A handshake moves no USB/IP data.
        if r.bytes == 0 && r.workload != "tls-handshake" {
            problems.push(format!("{}:{}: no data moved", r.server, r.workload));
        }
        if ctx.hiccups.is_some() && r.error.is_none() && !r.stall.is_some_and(f64::is_finite) {
            problems.push(format!(
                "{}:{}: no hiccup meter reading",
                r.server, r.workload
            ));
        }
    }
    for s in &scale_results {
        for e in &s.errors {
            problems.push(format!("scale {}: {e}", s.server));
        }
        if s.agg
            .iter()
            .any(|a| a.mb_s.is_nan() || a.mb_s <= 0.0 || a.errors > 0)
        {
            problems.push(format!(
                "scale {}: aggregate run moved no data or had errors",
                s.server
            ));
        }
    }

    if let Some(path) = &ctx.args.plot {
        let subtitle = format!(
            "{:.1} s per point{}",
            dur.as_secs_f64(),
            if ctx.args.smoke { ", smoke run" } else { "" }
        );
        if let Err(e) = plot::write(path, &ctx.rows, &subtitle) {
            problems.push(e);
        } else if !quiet {
            eprintln!("plot written to {}", path.display());
        }
    }

    let summary = json!({
        "bench": "usbwire-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "machine": machine,
        "loadavg_start": load_start,
        "loadavg_end": sys::loadavg(),
        "steal_ms": steal,
        "mode": if ctx.args.smoke { "smoke" } else { "full" },
        "duration_s": dur.as_secs_f64(),
        "server_cpu": ctx.args.server_cpu,
        "client_cpu": ctx.args.client_cpu,
        "msc": {"cmd_bytes": ctx.args.msc_cmd_bytes, "depth": ctx.args.msc_depth},
        "results": ctx.rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "scale": scale_results.iter().map(|s| s.to_json()).collect::<Vec<_>>(),
        "targets": t,
        "problems": problems,
    });
    println!("{summary}");
    if !problems.is_empty() {
        eprintln!("usbwire-bench: {} problem(s):", problems.len());
        for p in &problems {
            eprintln!("  {p}");
        }
        return Ok(false);
    }
    Ok(true)
}
