//! `usbipd --metrics ADDR`: what the server counted, in the Prometheus
//! text format (0.0.4), over HTTP at `/metrics`.
//!
//! The server keeps its counters as atomics (`usbwire_server::metrics`); a
//! scrape copies them into a `prometheus` registry made for it, so nothing
//! on the URB path knows about the exposition format. The `prometheus`
//! crate rather than `prometheus-client`: the latter writes only
//! OpenMetrics, whose counter families (`# TYPE x counter` over samples
//! named `x_total`) `promtool check metrics` rejects as untyped.
//!
//! The HTTP side is the least a scraper needs: one GET, one response, then
//! the connection closes. Its input is bounded like the USB/IP port's: a
//! request head of at most [`MAX_REQUEST`] bytes, read within
//! [`REQUEST_TIMEOUT`], and at most [`MAX_SCRAPES`] connections at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use usbwire_server::metrics::{DIRECTIONS, TRANSFER_TYPES};
use usbwire_server::Server;

/// The longest request head read; scrapers send a few hundred bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes served at once; further connections wait in the accept queue.
pub const MAX_SCRAPES: usize = 8;

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn counter(r: &Registry, name: &str, help: &str, n: u64) -> prometheus::Result<()> {
    let c = IntCounter::with_opts(Opts::new(name, help).namespace("usbwire"))?;
    c.inc_by(n);
    r.register(Box::new(c))
}

fn counters(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("usbwire"), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// The server's counters now, in the Prometheus text format.
pub fn render(server: &Server) -> prometheus::Result<String> {
    let r = Registry::new();
    let m = server.metrics();

    counter(
        &r,
        "connections_total",
        "Connections accepted, refused and throttled ones included.",
        m.connections(),
    )?;

    let refusals = counters(
        &r,
        "refusals_total",
        "Connections and imports refused, by reason.",
        &["reason"],
    )?;
    let total = server.refusals().total;
    for (reason, n) in [
        ("failed_handshake", total.failed_handshakes),
        ("refused_connection", total.refused_connections),
        ("refused_import", total.refused_imports),
        ("throttled_connection", total.throttled_connections),
    ] {
        refusals.with_label_values(&[reason]).inc_by(n);
    }

    let tls = counters(
        &r,
        "tls_handshakes_total",
        "TLS handshakes, by result.",
        &["result"],
    )?;
    let (ok, failed) = m.tls_handshakes();
    tls.with_label_values(&["ok"]).inc_by(ok);
    tls.with_label_values(&["failed"]).inc_by(failed);

    counter(
        &r,
        "error_holds_started_total",
        "Endpoint queues held after an URB error until the importer reacts.",
        m.holds_started(),
    )?;
    let ended = counters(
        &r,
        "error_holds_ended_total",
        "Error holds ended: released by the importer, expired, or with the import.",
        &["how"],
    )?;
    for (how, n) in m.holds_ended() {
        ended.with_label_values(&[how]).inc_by(n);
    }

    let imports = counters(
        &r,
        "imports_total",
        "Imports accepted, by device.",
        &["device"],
    )?;
    let urb_labels = ["device", "direction", "type"];
    let urbs = counters(
        &r,
        "urbs_total",
        "URBs completed, by device, direction and transfer type.",
        &urb_labels,
    )?;
    let bytes = counters(
        &r,
        "urb_bytes_total",
        "Bytes moved by completed URBs, by device, direction and transfer type.",
        &urb_labels,
    )?;
    let statuses = counters(
        &r,
        "urb_statuses_total",
        "URBs completed, by device and status (ok, an errno name, or other).",
        &["device", "status"],
    )?;
    let in_flight = IntGaugeVec::new(
        Opts::new(
            "urbs_in_flight",
            "URBs submitted and not yet completed, by device.",
        )
        .namespace("usbwire"),
        &["device"],
    )?;
    r.register(Box::new(in_flight.clone()))?;
    for (busid, d) in m.devices() {
        imports
            .with_label_values(&[busid.as_str()])
            .inc_by(d.imports());
        in_flight
            .with_label_values(&[busid.as_str()])
            .set(d.in_flight());
        for (di, dir) in DIRECTIONS.iter().enumerate() {
            for (ti, ty) in TRANSFER_TYPES.iter().enumerate() {
                let n = d.urbs(di, ti);
                if n > 0 {
                    urbs.with_label_values(&[busid.as_str(), dir, ty]).inc_by(n);
                    bytes
                        .with_label_values(&[busid.as_str(), dir, ty])
                        .inc_by(d.bytes(di, ti));
                }
            }
        }
        for (status, n) in d.statuses() {
            if n > 0 {
                statuses
                    .with_label_values(&[busid.as_str(), status])
                    .inc_by(n);
            }
        }
    }

    let budget = IntGauge::with_opts(
        Opts::new(
            "inflight_budget_available_bytes",
            "Bytes of the server-wide in-flight budget no import holds.",
        )
        .namespace("usbwire"),
    )?;
    budget.set(server.inflight_budget_available());
    r.register(Box::new(budget))?;

    TextEncoder::new().encode_to_string(&r.gather())
}

/// Binds the metrics listener (before the daemon announces it is ready,
/// so that a bad address stops it from starting).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr} (--metrics): {e}"))?;
    if let Ok(a) = listener.local_addr() {
        info!("metrics on http://{a}/metrics");
    }
    Ok(listener)
}

/// Serves scrapes on `listener` for as long as the task runs.
pub async fn serve(listener: TcpListener, server: Server) {
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off rather than spin.
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &server).await {
                debug!(%peer, "metrics: {e}");
            }
            drop(permit);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, server: &Server) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&chunk[..n.min(MAX_REQUEST - head.len())]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await
    .unwrap_or(Ok(false))?;
    let (status, content_type, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut parts = line.split(|&b| b == b' ');
        match (parts.next(), parts.next()) {
            (Some(b"GET"), Some(b"/metrics")) => match render(server) {
                Ok(text) => ("200 OK", CONTENT_TYPE, text),
                Err(e) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("cannot render the metrics: {e}\n"),
                ),
            },
            (Some(b"GET"), _) => (
                "404 Not Found",
                "text/plain",
                "not found: the metrics are at /metrics\n".to_string(),
            ),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "only GET is served\n".to_string(),
            ),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
