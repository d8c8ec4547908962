//! `usbipd --metrics`: Debian's `promtool check metrics` accepts what it
//! serves, and the counters move exactly as a known workload on the demo
//! test device says they must.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{peer_binary, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use usbwire_cli::metrics::MAX_REQUEST;
use usbwire_client::TransferError;
use usbwire_devices::testdev::{Fault, EP_SINK, EP_SOURCE};

const LIMIT: Duration = Duration::from_secs(30);
/// The demo set's test device.
const TEST_DEVICE: &str = "1-4";

/// The metrics address usbipd logged: it binds before it reports ready.
fn metrics_addr(d: &Daemon) -> SocketAddr {
    let log = d.log_text();
    let at = log
        .find("metrics on http://")
        .unwrap_or_else(|| panic!("usbipd logged no metrics address:\n{log}"));
    let rest = &log[at + "metrics on http://".len()..];
    rest[..rest.find('/').unwrap()].parse().unwrap()
}

/// One HTTP GET; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: usbipd\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(LIMIT, fetch)
        .await
        .expect("a response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Samples by name and sorted labels, e.g. `urbs_total{device="1-4",...}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (metric, value) = l.rsplit_once(' ').unwrap();
            let key = match metric.split_once('{') {
                Some((name, labels)) => {
                    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                    labels.sort();
                    format!("{name}{{{}}}", labels.join(","))
                }
                None => metric.to_string(),
            };
            (key, value.parse().unwrap())
        })
        .collect()
}

fn value(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {s:#?}"))
}

async fn scrape(addr: SocketAddr) -> (String, BTreeMap<String, f64>) {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let s = samples(&body);
    (body, s)
}

fn promtool_accepts(text: &str) {
    let Some(promtool) = peer_binary("/usr/bin/promtool", "prometheus") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\non:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_a_known_workload_and_promtool_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &["--demo", "--no-control", "--metrics", "127.0.0.1:0"],
        dir.path(),
    );
    let addr = metrics_addr(&d);

    let (text, before) = scrape(addr).await;
    promtool_accepts(&text);
    assert_eq!(value(&before, "usbwire_connections_total"), 0.0);

    let device = format!("device=\"{TEST_DEVICE}\"");
    let dev = tokio::time::timeout(LIMIT, usbwire_client::import(d.addr(), TEST_DEVICE))
        .await
        .unwrap()
        .expect("import the test device");
    let workload = async {
        dev.set_configuration(1).await.unwrap();
        for _ in 0..10 {
            assert_eq!(dev.bulk_out(EP_SINK, &[0u8; 4096]).await, Ok(4096));
        }
        for _ in 0..5 {
            assert_eq!(dev.bulk_in(EP_SOURCE, 512).await.unwrap().len(), 512);
        }
        // A stall holds the sink's queue until the importer clears it.
        let (setup, data) = Fault::Stall.request(EP_SINK, 0);
        dev.control_out(setup, &data).await.unwrap();
        assert_eq!(
            dev.bulk_out(EP_SINK, &[0u8; 4096]).await,
            Err(TransferError::Stall)
        );
        dev.clear_halt(EP_SINK).await.unwrap();
    };
    tokio::time::timeout(LIMIT, workload).await.unwrap();

    let (text, during) = scrape(addr).await;
    promtool_accepts(&text);
    let out_bulk = format!("usbwire_urbs_total{{{device},direction=\"out\",type=\"bulk\"}}");
    let in_bulk = format!("usbwire_urbs_total{{{device},direction=\"in\",type=\"bulk\"}}");
    assert_eq!(value(&during, &out_bulk), 11.0);
    assert_eq!(value(&during, &in_bulk), 5.0);
    assert_eq!(
        value(
            &during,
            &format!("usbwire_urb_bytes_total{{{device},direction=\"out\",type=\"bulk\"}}")
        ),
        40960.0
    );
    assert_eq!(
        value(
            &during,
            &format!("usbwire_urb_bytes_total{{{device},direction=\"in\",type=\"bulk\"}}")
        ),
        2560.0
    );
    // SET_CONFIGURATION, the FAULT request and CLEAR_FEATURE(HALT).
    assert_eq!(
        value(
            &during,
            &format!("usbwire_urbs_total{{{device},direction=\"out\",type=\"control\"}}")
        ),
        3.0
    );
    assert_eq!(
        value(
            &during,
            &format!("usbwire_urb_statuses_total{{{device},status=\"EPIPE\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &during,
            &format!("usbwire_urb_statuses_total{{{device},status=\"ok\"}}")
        ),
        18.0
    );
    assert_eq!(value(&during, "usbwire_error_holds_started_total"), 1.0);
    assert_eq!(
        value(&during, "usbwire_error_holds_ended_total{how=\"released\"}"),
        1.0
    );
    assert_eq!(
        value(&during, "usbwire_error_holds_ended_total{how=\"expired\"}"),
        0.0
    );
    assert_eq!(
        value(&during, &format!("usbwire_imports_total{{{device}}}")),
        1.0
    );
    assert_eq!(
        value(&during, &format!("usbwire_urbs_in_flight{{{device}}}")),
        0.0
    );
    assert_eq!(value(&during, "usbwire_connections_total"), 1.0);

    // An import of a device nobody exports is refused, and counted so.
    let refused = tokio::time::timeout(LIMIT, usbwire_client::import(d.addr(), "9-9"))
        .await
        .unwrap();
    assert!(refused.is_err(), "imported a device nobody exports");
    let (_, after) = scrape(addr).await;
    assert_eq!(
        value(&after, "usbwire_refusals_total{reason=\"refused_import\"}"),
        value(&before, "usbwire_refusals_total{reason=\"refused_import\"}") + 1.0
    );
    assert_eq!(value(&after, "usbwire_connections_total"), 2.0);
    assert_eq!(
        value(&after, "usbwire_tls_handshakes_total{result=\"failed\"}"),
        0.0
    );

    // Anything but /metrics is not found.
    let (status, _) = get(addr, "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    // A request head longer than the bound, still unfinished, is answered
    // then: the server buffers no more of it.
    let oversized = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&[b'a'; MAX_REQUEST]).await.unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(LIMIT, oversized).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
    // And scrapes still work after it.
    scrape(addr).await;
    drop(dev);
    assert!(d.stop().success());
}
