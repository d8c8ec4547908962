//! Debian's C `usbip`, which nobody here wrote, lists what our usbipd exports.

mod common;

use std::process::Command;

use common::*;

struct Listed {
    busid: String,
    usbid: String,
    class: String,
    interfaces: Vec<String>,
}

/// Parses the C tool's `list -r` layout.
fn parse(out: &str) -> Vec<Listed> {
    let mut devices: Vec<Listed> = Vec::new();
    for line in out.lines() {
        let Some((left, right)) = line.split_once(": ") else {
            continue;
        };
        let left = left.trim();
        let right = right.trim();
        if !left.is_empty() {
            let usbid = right
                .rsplit_once('(')
                .map(|(_, r)| r.trim_end_matches(')').to_string())
                .unwrap_or_default();
            devices.push(Listed {
                busid: left.to_string(),
                usbid,
                class: String::new(),
                interfaces: vec![],
            });
        } else if let Some(d) = devices.last_mut() {
            let triple = right
                .rsplit_once('(')
                .map(|(_, r)| r.trim_end_matches(')').to_string());
            if right.starts_with('/') {
                continue;
            } else if d.class.is_empty() {
                d.class = triple.unwrap_or_default();
            } else {
                d.interfaces.push(triple.unwrap_or_default());
            }
        }
    }
    devices
}

#[test]
fn debian_usbip_lists_all_four_demo_devices() {
    let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&["--demo"], dir.path());
    let out = Command::new(&c_usbip)
        .args(["--tcp-port", &d.port.to_string(), "list", "-r", "127.0.0.1"])
        .output()
        .expect("running Debian's usbip");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "usbip list -r failed: {stdout}\n{stderr}\n{}",
        d.log_text()
    );
    let listed = parse(&stdout);
    let summary: Vec<(&str, &str, &str, Vec<&str>)> = listed
        .iter()
        .map(|l| {
            (
                l.busid.as_str(),
                l.usbid.as_str(),
                l.class.as_str(),
                l.interfaces.iter().map(|s| s.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("1-1", "0525:a4a5", "00/00/00", vec!["08/06/50"]),
            ("1-2", "0525:a4ac", "00/00/00", vec!["03/01/01"]),
            ("1-3", "0525:a4a7", "02/00/00", vec!["02/02/01", "0a/00/00"]),
            ("1-4", "0525:a4a0", "00/00/00", vec!["ff/00/00", "ff/00/00"]),
        ],
        "C usbip output:\n{stdout}"
    );
}

#[test]
fn our_list_matches_the_c_tool_line_for_line() {
    let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&["--demo"], dir.path());
    let port = d.port.to_string();
    let theirs = Command::new(&c_usbip)
        .args(["--tcp-port", &port, "list", "-r", "127.0.0.1"])
        .output()
        .unwrap();
    let ours = Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["--tcp-port", &port, "list", "-r", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let theirs = String::from_utf8_lossy(&theirs.stdout).to_string();
    let ours = String::from_utf8_lossy(&ours.stdout).to_string();
    // Names come from two copies of usb.ids that may differ in age; the
    // ids, triples, paths and layout must not.
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| match (l.split_once(": "), l.rfind('(')) {
                (Some((left, _)), Some(p)) => format!("{left}: {}", &l[p..]),
                _ => l.to_string(),
            })
            .collect()
    };
    assert_eq!(
        strip(&ours),
        strip(&theirs),
        "ours:\n{ours}\ntheirs:\n{theirs}"
    );
}
