//! `usbip attach/detach/port/list -l` end to end, against our usbipd and
//! a fake sysfs tree (`USBWIRE_SYSFS_ROOT`): this machine has no vhci-hcd.

mod common;

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use usbwire_client::vhci::fake::{set_status, vhci, Used};
use usbwire_client::{PortState, Speed};
use usbwire_host::sysfs::fake::{device, interface, root_hub, FakeDevice};

fn usbip(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usbip"))
        .env("USBWIRE_SYSFS_ROOT", root)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn attach_hands_the_socket_to_vhci_and_records_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&["--demo"], dir.path());
    let root = dir.path().join("root");
    let hc = vhci(&root, 2, 8, &[]);
    let port = d.port.to_string();
    let out = usbip(
        &root,
        &["-t", &port, "attach", "-r", "127.0.0.1", "-b", "1-1"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "", "silent on success, like the C tool");
    let written = fs::read_to_string(hc.join("attach")).unwrap();
    let f: Vec<u32> = written.split(' ').map(|s| s.parse().unwrap()).collect();
    assert_eq!(f.len(), 4, "{written:?}");
    assert_eq!(f[0], 0, "first free high-speed port");
    assert!(f[1] > 2, "a socket fd: {written:?}");
    assert_eq!(f[2] >> 16, 1, "devid = busnum << 16 | devnum: {written:?}");
    assert_eq!(f[3], 3, "high speed: {written:?}");
    assert_eq!(
        fs::read_to_string(root.join("var/run/vhci_hcd/port0")).unwrap(),
        format!("127.0.0.1 {port} 1-1\n")
    );

    // -d (the vudc spelling) imports the same way; port 0 is taken now.
    set_status(
        &root,
        2,
        8,
        &[Used {
            port: 0,
            speed: Speed::High,
            devid: f[2],
            sockfd: f[1],
            local_busid: "3-1",
            state: PortState::Used,
        }],
    );
    let out = usbip(
        &root,
        &[
            "--tcp-port",
            &port,
            "attach",
            "-r",
            "127.0.0.1",
            "-d",
            "1-4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(fs::read_to_string(hc.join("attach"))
        .unwrap()
        .starts_with("1 "));
    assert!(root.join("var/run/vhci_hcd/port1").exists());

    // `usbip port` shows port 0 from the status, sysfs and the record.
    root_hub(&root, "platform/vhci_hcd.0/usb3", 3);
    device(
        &root,
        &FakeDevice {
            devpath: "platform/vhci_hcd.0/usb3/3-1",
            id_vendor: 0x0525,
            id_product: 0xa4a5,
            busnum: 3,
            ..Default::default()
        },
    );
    let out = usbip(&root, &["port"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[0], "Imported USB devices");
    assert_eq!(lines[1], "====================");
    assert_eq!(lines[2], "Port 00: <Port in Use> at High Speed(480Mbps)");
    assert!(
        lines[3].starts_with("       ") && lines[3].ends_with("(0525:a4a5)"),
        "{shown}"
    );
    assert_eq!(
        lines[4],
        format!("       3-1 -> usbip://127.0.0.1:{port}/1-1")
    );
    assert_eq!(
        lines[5],
        format!("           -> remote bus/dev 001/{:03}", f[2] & 0xffff)
    );
    assert_eq!(lines.len(), 6, "{shown}");
    let out = usbip(&root, &["port", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["remote"]["busid"], "1-1");

    // Detach: writes the port to vhci_hcd.0/detach and drops the record.
    let out = usbip(&root, &["detach", "-p", "0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "usbip: info: Port 0 is now detached!\n\n"
    );
    assert_eq!(fs::read_to_string(hc.join("detach")).unwrap(), "0");
    assert!(!root.join("var/run/vhci_hcd/port0").exists());
    assert!(root.join("var/run/vhci_hcd/port1").exists());

    let out = usbip(&root, &["detach", "-p", "5"]);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "usbip: error: port 5 is not in use (already detached)\n"
    );
    let out = usbip(&root, &["detach", "-p", "x1"]);
    assert_eq!(text(&out.stderr), "usbip: error: invalid port x1\n");
    let out = usbip(&root, &["detach", "-p", "99"]);
    assert_eq!(
        text(&out.stderr),
        "usbip: error: invalid port 99: vhci-hcd has ports 0 to 31\n"
    );
}

#[test]
fn attach_errors_say_what_went_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&["--demo"], dir.path());
    let port = d.port.to_string();
    let root = dir.path().join("root");

    // No vhci-hcd: fails before connecting.
    let out = usbip(
        &root,
        &["-t", &port, "attach", "-r", "127.0.0.1", "-b", "1-1"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with("usbip: error: vhci-hcd not loaded: run modprobe vhci-hcd"),
        "{}",
        text(&out.stderr)
    );

    vhci(&root, 1, 8, &[]);
    let (_reserved, closed) = refusing_port();
    let closed = closed.to_string();
    let out = usbip(
        &root,
        &["-t", &closed, "attach", "-r", "127.0.0.1", "-b", "1-1"],
    );
    assert_eq!(
        text(&out.stderr),
        format!("usbip: error: connection refused by 127.0.0.1:{closed}\n")
    );

    let out = usbip(
        &root,
        &["-t", &port, "attach", "-r", "127.0.0.1", "-b", "9-9"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ST_NODEV"),
        "{}",
        text(&out.stderr)
    );

    // Someone else holds 1-2.
    let mut held = TcpStream::connect(d.addr()).unwrap();
    usbwire_client::vhci::import_blocking(&mut held, "x", "1-2").unwrap();
    let out = usbip(
        &root,
        &["-t", &port, "attach", "-r", "127.0.0.1", "-b", "1-2"],
    );
    assert_eq!(
        text(&out.stderr),
        format!("usbip: error: device 1-2 on 127.0.0.1:{port} is already in use (ST_DEV_BUSY)\n")
    );
    drop(held);

    // All high-speed ports taken.
    let used: Vec<Used> = (0..8)
        .map(|p| Used {
            port: p,
            speed: Speed::High,
            devid: 0x10002,
            sockfd: 3,
            local_busid: "3-1",
            state: PortState::Used,
        })
        .collect();
    vhci(&root, 1, 8, &used);
    let out = usbip(
        &root,
        &["-t", &port, "attach", "-r", "127.0.0.1", "-b", "1-1"],
    );
    assert_eq!(
        text(&out.stderr),
        "usbip: error: no free high-speed port (8 in use)\n"
    );
}

#[test]
fn list_local_skips_hubs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = usbip(root, &["list", "-l"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "", "no USB: nothing, like the C tool");

    root_hub(root, "pci0000:00/0000:00:14.0/usb1", 1);
    let disk = device(
        root,
        &FakeDevice {
            devpath: "pci0000:00/0000:00:14.0/usb1/1-2",
            id_vendor: 0x0781,
            id_product: 0x5567,
            ..Default::default()
        },
    );
    interface(root, &disk, 1, 0, (8, 6, 0x50), Some("usb-storage"));
    let out = usbip(root, &["list", "-l"]);
    let shown = text(&out.stdout);
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[0], " - busid 1-2 (0781:5567)");
    assert!(
        lines[1].starts_with("   ") && lines[1].ends_with(" (0781:5567)"),
        "{shown}"
    );
    assert_eq!(lines[2], "");
    assert_eq!(lines.len(), 3, "{shown}");
    let out = usbip(root, &["list", "-p", "-l"]);
    assert_eq!(text(&out.stdout), "busid=1-2#usbid=0781:5567#\n");
    let out = usbip(root, &["list", "-l", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j[0]["interfaces"][0]["driver"], "usb-storage");
}
