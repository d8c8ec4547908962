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
//! HTTP is hyper's (HTTP/1.1): one GET, one response, then the connection
//! closes. Its input is bounded like the USB/IP port's: a request head of
//! at most [`MAX_REQUEST`] bytes (431 beyond), read within
//! [`REQUEST_TIMEOUT`], and at most [`MAX_SCRAPES`] connections at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::convert::Infallible;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
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

    if let Some(capture) = server.capture() {
        let stats = capture.stats();
        let records = counters(
            &r,
            "capture_records_total",
            "URB records of the packet capture (--capture) by what became of them: written, \
             or dropped because the writer fell behind or the file reached its size limit.",
            &["result"],
        )?;
        for (result, n) in [
            ("written", stats.written),
            ("dropped_queue_full", stats.dropped_queue),
            ("dropped_size_limit", stats.dropped_limit),
        ] {
            records.with_label_values(&[result]).inc_by(n);
        }
    }

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

/// Serves one connection with hyper (HTTP/1.1, one request, then close).
async fn answer(stream: TcpStream, server: &Server) -> Result<(), hyper::Error> {
    let server = server.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &server);
        async move { Ok::<_, Infallible>(response) }
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

fn respond(request: &Request<Incoming>, server: &Server) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => match render(server) {
            Ok(text) => (StatusCode::OK, CONTENT_TYPE, text),
            Err(e) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot render the metrics: {e}\n"),
            ),
        },
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: the metrics are at /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is served\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use usbwire_server::capture::{Capture, CaptureConfig};
    use usbwire_server::{Registry as Devices, ServerConfig};

    #[test]
    fn a_capture_adds_its_record_counts() {
        let server = Server::new(Devices::new(), ServerConfig::default()).unwrap();
        assert!(!render(&server).unwrap().contains("capture_records_total"));
        let dir = tempfile::tempdir().unwrap();
        let capture = Capture::start(CaptureConfig::new(dir.path().join("c.pcapng"))).unwrap();
        let capture = Arc::new(capture);
        assert!(server.set_capture(capture.clone()));
        let text = render(&server).unwrap();
        for result in ["written", "dropped_queue_full", "dropped_size_limit"] {
            let line = format!("usbwire_capture_records_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&line), "no {line:?} in\n{text}");
        }
        capture.finish();
    }
}
