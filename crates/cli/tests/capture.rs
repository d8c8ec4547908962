//! `usbipd --capture`: a mass-storage session recorded as pcapng and read
//! back by Wireshark's tshark, which must decode its SCSI commands and find
//! no malformed packet.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::scsi::{rw10, scsi};
use common::*;

const DISK: &str = "1-1";
/// The config's second device, a test device.
const OTHER: &str = "1-2";

/// A folder with a disk image and a config that exports it as 1-1 and a
/// test device as 1-2.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(4 * 1024 * 1024)
        .unwrap();
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        "[[device]]\nkind = \"mass-storage\"\nimage = \"disk.img\"\n\n\
         [[device]]\nkind = \"test\"\n",
    )
    .unwrap();
    (dir, config)
}

/// INQUIRY, WRITE(10) and READ(10) on the disk of the daemon at `addr`.
async fn disk_session(addr: std::net::SocketAddr) {
    let dev = usbwire_client::import(addr, DISK)
        .await
        .expect("import the disk");
    dev.set_configuration(1).await.expect("SET_CONFIGURATION");
    let (inq, csw) = scsi(&dev, 1, &[0x12, 0, 0, 0, 36, 0], 36, &[]).await;
    assert_eq!((csw.status, inq.len()), (0, 36));
    let payload: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
    let (_, csw) = scsi(&dev, 2, &rw10(0x2a, 100, 8), 0, &payload).await;
    assert_eq!(csw.status, 0);
    let (back, csw) = scsi(&dev, 3, &rw10(0x28, 100, 8), 8 * 512, &[]).await;
    assert_eq!(csw.status, 0);
    assert!(back == payload, "READ(10) gave back other data");
}

/// Runs `usbipd --config CONFIG ARGS`, gives it to `session`, and stops
/// it with SIGTERM; returns its log.
async fn run_daemon<F: std::future::Future<Output = ()>>(
    dir: &Path,
    config: &Path,
    args: &[&str],
    session: impl FnOnce(std::net::SocketAddr) -> F,
) -> String {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let d = Daemon::start(&all, dir);
    session(d.addr()).await;
    let log_path = d.log.clone();
    assert!(d.stop().success(), "usbipd must exit cleanly on SIGTERM");
    std::fs::read_to_string(log_path).unwrap_or_default()
}

/// `tshark -r FILE ARGS`: its output, after checking that it succeeded.
fn tshark(tshark: &Path, file: &Path, args: &[&str]) -> String {
    let out = Command::new(tshark)
        .arg("-n")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .expect("running tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tshark {args:?} on {} failed ({}): {stderr}",
        file.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One packet as tshark decodes it.
struct Packet {
    /// (bus, device address)
    address: (String, String),
    interface_class: String,
    info: String,
}

/// Checks that tshark reads `file` with no malformed packet, and returns
/// what it decodes of each packet.
fn decode(t: &Path, file: &Path) -> Vec<Packet> {
    let malformed = tshark(t, file, &["-Y", "_ws.malformed"]);
    assert!(
        malformed.trim().is_empty(),
        "tshark finds malformed packets in {}:\n{malformed}",
        file.display()
    );
    let fields = [
        "usb.bus_id",
        "usb.device_address",
        "usb.bInterfaceClass",
        "_ws.col.Info",
    ];
    let mut args = vec!["-T", "fields"];
    for f in &fields {
        args.extend(["-e", f]);
    }
    tshark(t, file, &args)
        .lines()
        .map(|l| {
            let mut f = l.splitn(fields.len(), '\t').map(str::to_string);
            let mut next = || f.next().unwrap_or_default();
            Packet {
                address: (next(), next()),
                interface_class: next(),
                info: next(),
            }
        })
        .collect()
}

fn addresses(packets: &[Packet]) -> BTreeSet<(String, String)> {
    packets.iter().map(|p| p.address.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tshark_decodes_the_scsi_commands_of_a_captured_session() {
    let Some(t) = peer_binary("/usr/bin/tshark", "tshark") else {
        return;
    };
    let (dir, config) = setup();
    let file = dir.path().join("disk.pcapng");
    let log = run_daemon(
        dir.path(),
        &config,
        &["--capture", file.to_str().unwrap()],
        disk_session,
    )
    .await;
    assert!(log.contains("capture finished"), "{log}");

    let packets = decode(&t, &file);
    let used = addresses(&packets);
    assert_eq!(used.len(), 1, "one device was used: {used:?}");
    // The SCSI commands, as Wireshark's mass-storage dissector decodes
    // them from the bulk transfers.
    for want in ["Inquiry", "Write(10)", "Read(10)"] {
        assert!(
            packets
                .iter()
                .any(|p| p.info.contains(&format!("SCSI: {want} LUN"))),
            "tshark did not decode a SCSI {want} command:\n{}",
            tshark(&t, &file, &[])
        );
    }
    // It knew the interface class from the replayed descriptors, not
    // from a guess.
    assert!(
        packets.iter().any(|p| p.interface_class.contains("0x08")),
        "no mass-storage interface descriptor in the capture:\n{}",
        tshark(&t, &file, &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busid_filter_captures_only_that_device() {
    let Some(t) = peer_binary("/usr/bin/tshark", "tshark") else {
        return;
    };
    let (dir, config) = setup();
    let all = dir.path().join("all.pcapng");
    let other = dir.path().join("other.pcapng");
    let both = |addr| async move {
        disk_session(addr).await;
        let dev = usbwire_client::import(addr, OTHER)
            .await
            .expect("import the test device");
        dev.device_descriptor().await.expect("GET_DESCRIPTOR");
    };
    run_daemon(
        dir.path(),
        &config,
        &["--capture", all.to_str().unwrap()],
        both,
    )
    .await;
    run_daemon(
        dir.path(),
        &config,
        &[
            "--capture",
            other.to_str().unwrap(),
            "--capture-busid",
            OTHER,
        ],
        both,
    )
    .await;
    let everything = addresses(&decode(&t, &all));
    assert_eq!(everything.len(), 2, "both devices: {everything:?}");
    let packets = decode(&t, &other);
    let only = addresses(&packets);
    assert_eq!(only.len(), 1, "one device only: {only:?}");
    assert!(only.is_subset(&everything));
    assert!(
        !packets.iter().any(|p| p.info.contains("SCSI")),
        "the disk's commands are in a capture of {OTHER}:\n{}",
        tshark(&t, &other, &[])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_stops_at_its_limit_and_stays_readable() {
    let Some(t) = peer_binary("/usr/bin/tshark", "tshark") else {
        return;
    };
    let (dir, config) = setup();
    let file = dir.path().join("small.pcapng");
    let limit = 4096u64;
    let log = run_daemon(
        dir.path(),
        &config,
        &[
            "--capture",
            file.to_str().unwrap(),
            "--capture-limit",
            &limit.to_string(),
        ],
        disk_session,
    )
    .await;
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size <= limit, "{size} bytes, over the {limit}-byte limit");
    assert!(log.contains("reached its size limit"), "{log}");
    let packets = decode(&t, &file);
    assert_eq!(addresses(&packets).len(), 1);
    assert!(packets.len() > 2, "too few packets: {}", packets.len());
}
