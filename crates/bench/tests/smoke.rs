//! The benchmark's smoke mode as a test: every workload runs briefly and
//! must move data without errors. No timing is checked.
//!
//! Ignored in a plain `cargo test` because it needs `usbipd` (it builds it
//! through cargo when missing) and takes a while; `scripts/test.sh`, and so
//! CI, runs it with `cargo test -p usbwire-bench --test smoke -- --ignored`.
//! `cargo run --release -p usbwire-bench -- --smoke` shows the same run as
//! a table.

use std::process::Command;

#[test]
#[ignore = "builds and runs usbipd; run with --ignored"]
fn smoke_mode_runs_clean() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bulk.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_usbwire-bench"))
        .args(["--smoke", "--json-only", "--hiccup-meter", "--plot"])
        .arg(&svg)
        .output()
        .expect("run usbwire-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usbwire-bench --smoke failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{line}");
    let results = v["results"].as_array().expect("results");
    assert!(results.len() >= 20, "{line}");
    for r in results {
        assert!(r["ops"].as_u64().unwrap_or(0) > 0, "{r}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
        assert!(
            r["machine_stall_max_us"].as_f64().unwrap_or(-1.0) >= 0.0,
            "{r}"
        );
    }
    plot_is_drawn(&std::fs::read_to_string(&svg).expect("--plot wrote the SVG"));
}

/// The chart has its three kinds of lines, each with points, and labelled
/// axes: what a reader of the README's command gets.
fn plot_is_drawn(svg: &str) {
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    for label in [
        "usbwire, bulk IN 64 KiB",
        "usbwire, bulk OUT 64 KiB",
        "usbip crate, bulk IN 64 KiB",
        "usbip crate, bulk OUT 64 KiB",
        "raw TCP, 64 KiB writes",
        "URBs in flight",
        "MB/s",
    ] {
        assert!(svg.contains(label), "no {label:?} in the plot:\n{svg}");
    }
    // A dot per measured point: four bulk lines at three depths, and the
    // raw TCP line's two ends.
    assert!(svg.matches("<circle").count() >= 4 * 3 + 2, "{svg}");
}
