//! vhci-hcd played by fake sysfs trees and scripted attribute writes.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno as NixErrno;
use usbwire_proto::Speed;

use super::fake::*;
use super::*;

fn used(port: u32, speed: Speed) -> Used<'static> {
    Used {
        port,
        speed,
        devid: 0x0001_0002,
        sockfd: 3,
        local_busid: "3-1",
        state: PortState::Used,
    }
}

/// Plays the kernel: answers each write with the next scripted result
/// (Ok once the script runs out) and keeps what was written.
struct Scripted {
    answers: VecDeque<Option<NixErrno>>,
    writes: Vec<(PathBuf, String)>,
}

impl Scripted {
    fn new(answers: &[Option<NixErrno>]) -> Self {
        Scripted {
            answers: answers.iter().copied().collect(),
            writes: Vec::new(),
        }
    }
}

impl AttrWriter for Scripted {
    fn write_attr(&mut self, path: &Path, value: &str) -> io::Result<()> {
        self.writes.push((path.to_path_buf(), value.to_string()));
        match self.answers.pop_front().flatten() {
            Some(e) => Err(io::Error::from_raw_os_error(e as i32)),
            None => Ok(()),
        }
    }
}

#[test]
fn parses_every_controller_with_hs_and_ss_ports() {
    let t = tempfile::tempdir().unwrap();
    vhci(
        t.path(),
        8,
        8,
        &[used(0, Speed::High), used(24, Speed::Super), {
            let mut u = used(113, Speed::Full);
            u.state = PortState::Initializing;
            u
        }],
    );
    let v = Vhci::new(t.path());
    assert_eq!(v.nports().unwrap(), 128);
    assert_eq!(v.controllers().len(), 8);
    assert_eq!(v.status_files().unwrap().len(), 8);
    let ports = v.ports().unwrap();
    assert_eq!(ports.len(), 128);
    assert!(ports.iter().enumerate().all(|(i, p)| p.port == i as u32));
    // Controller 1 owns 16..24 (hs) and 24..32 (ss).
    assert_eq!(ports[23].hub, Hub::High);
    assert_eq!(ports[24].hub, Hub::Super);
    assert_eq!(ports[24].state, PortState::Used);
    assert_eq!(ports[24].speed, Speed::Super);
    assert_eq!(ports[24].local_busid, "3-1");
    assert_eq!((ports[24].busnum(), ports[24].devnum()), (1, 2));
    assert_eq!(ports[0].sockfd, 3);
    assert_eq!(ports[113].state, PortState::Initializing);
    assert_eq!(ports[127].hub, Hub::Super);
    assert!(ports[127].is_free());
}

#[test]
fn parses_kernel_lines_literally() {
    let text = "hub port sta spd dev      sockfd local_busid\n\
                hs  0000 006 003 0001000a 000005 3-1\n\
                hs  0001 004 000 00000000 000000 0-0\n\
                ss  0002 004 000 00000000 0000000000000000 0-0\n";
    let p = parse_status(text).unwrap();
    assert_eq!(p[0].devid, 0x1000a);
    assert_eq!(p[0].devnum(), 10);
    assert_eq!(p[0].sockfd, 5);
    assert_eq!(p[0].state.describe(), "Port in Use");
    assert_eq!(p[2].hub, Hub::Super);
    // Old single-hub format.
    let old = "port sta spd dev      socket           local_busid\n\
               0000 006 002 00020003 ffff8800c5a7bb80 1-2.3\n";
    let p = parse_status(old).unwrap();
    assert_eq!(
        (p[0].hub, p[0].port, p[0].speed),
        (Hub::High, 0, Speed::Full)
    );
    assert_eq!(p[0].local_busid, "1-2.3");
    assert!(parse_status("hdr\nhs 1 2\n").is_err());
}

#[test]
fn free_port_by_speed() {
    let t = tempfile::tempdir().unwrap();
    let taken: Vec<Used> = (0..8)
        .map(|p| used(p, Speed::High))
        .chain([used(8, Speed::Super)])
        .collect();
    vhci(t.path(), 2, 8, &taken);
    let ports = Vhci::new(t.path()).ports().unwrap();
    let none = BTreeSet::new();
    // Controller 0's hs ports are full: the next hs port is on controller 1.
    assert_eq!(pick_free_port(&ports, Hub::High, &none), Some(16));
    assert_eq!(pick_free_port(&ports, Hub::Super, &none), Some(9));
    for (speed, hub) in [
        (Speed::Low, Hub::High),
        (Speed::Full, Hub::High),
        (Speed::High, Hub::High),
        (Speed::Wireless, Hub::High),
        (Speed::Super, Hub::Super),
        (Speed::SuperPlus, Hub::Super),
    ] {
        assert_eq!(Hub::for_speed(speed), Some(hub), "{speed:?}");
    }
    assert_eq!(Hub::for_speed(Speed::Unknown), None);
}

#[test]
fn attach_writes_port_fd_devid_speed_to_vhci_hcd_0() {
    let t = tempfile::tempdir().unwrap();
    vhci(t.path(), 2, 8, &[used(16, Speed::Super)]);
    let v = Vhci::new(t.path());
    let mut w = Scripted::new(&[]);
    // Super speed plus goes on the ss hub: controller 0's ss ports are 8..16.
    assert_eq!(
        v.attach_with(&mut w, 7, 0x0002_0003, Speed::SuperPlus)
            .unwrap(),
        8
    );
    assert_eq!(
        w.writes,
        [(
            t.path().join("sys/devices/platform/vhci_hcd.0/attach"),
            "8 7 131075 6".to_string()
        )]
    );
    // The real writer, on the fake file.
    assert_eq!(v.attach(5, 0x0001_0002, Speed::High).unwrap(), 0);
    assert_eq!(
        fs::read_to_string(t.path().join("sys/devices/platform/vhci_hcd.0/attach")).unwrap(),
        "0 5 65538 3"
    );
}

#[test]
fn ebusy_moves_on_to_another_port() {
    let t = tempfile::tempdir().unwrap();
    vhci(t.path(), 2, 8, &[used(1, Speed::High)]);
    let v = Vhci::new(t.path());
    let mut w = Scripted::new(&[
        Some(NixErrno::EBUSY),
        Some(NixErrno::EBUSY),
        Some(NixErrno::EBUSY),
    ]);
    let port = v.attach_with(&mut w, 9, 0x10002, Speed::High).unwrap();
    let tried: Vec<&str> = w.writes.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        tried,
        ["0 9 65538 3", "2 9 65538 3", "3 9 65538 3", "4 9 65538 3"]
    );
    assert_eq!(port, 4);
}

#[test]
fn ebusy_after_a_real_race_rereads_the_status() {
    // The other attacher's port shows up as used in the re-read status.
    struct Racer<'a> {
        root: &'a Path,
        first: bool,
        writes: Vec<String>,
    }
    impl AttrWriter for Racer<'_> {
        fn write_attr(&mut self, _: &Path, value: &str) -> io::Result<()> {
            self.writes.push(value.to_string());
            if std::mem::take(&mut self.first) {
                // Someone else took ports 0 and 2 meanwhile.
                set_status(
                    self.root,
                    1,
                    4,
                    &[used(0, Speed::High), used(2, Speed::High)],
                );
                return Err(io::Error::from_raw_os_error(NixErrno::EBUSY as i32));
            }
            Ok(())
        }
    }
    let t = tempfile::tempdir().unwrap();
    vhci(t.path(), 1, 4, &[]);
    let mut w = Racer {
        root: t.path(),
        first: true,
        writes: vec![],
    };
    assert_eq!(
        Vhci::new(t.path())
            .attach_with(&mut w, 3, 1, Speed::Full)
            .unwrap(),
        1
    );
    assert_eq!(w.writes, ["0 3 1 2", "1 3 1 2"]);
}

#[test]
fn einval_and_eacces_fail_at_once() {
    let t = tempfile::tempdir().unwrap();
    vhci(t.path(), 1, 8, &[]);
    let v = Vhci::new(t.path());
    let mut w = Scripted::new(&[Some(NixErrno::EINVAL)]);
    let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
    assert_eq!(w.writes.len(), 1, "EINVAL is not busy: no retry");
    assert!(
        matches!(
            e,
            VhciError::Refused {
                errno: "EINVAL",
                port: 0,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("not a connected TCP stream"), "{e}");
    let mut w = Scripted::new(&[Some(NixErrno::EACCES)]);
    let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
    assert_eq!(w.writes.len(), 1);
    assert!(
        e.to_string().ends_with("vhci_hcd.0/attach needs root"),
        "{e}"
    );
    let e = v
        .attach_with(&mut Scripted::new(&[]), 3, 1, Speed::Unknown)
        .unwrap_err();
    assert!(matches!(e, VhciError::UnsupportedSpeed { .. }), "{e:?}");
}

#[test]
fn no_free_port_says_which_hub_and_how_many() {
    let t = tempfile::tempdir().unwrap();
    let all_hs: Vec<Used> = (0..8).map(|p| used(p, Speed::High)).collect();
    vhci(t.path(), 1, 8, &all_hs);
    let v = Vhci::new(t.path());
    let mut w = Scripted::new(&[]);
    let e = v.attach_with(&mut w, 3, 1, Speed::High).unwrap_err();
    assert_eq!(e.to_string(), "no free high-speed port (8 in use)");
    assert!(w.writes.is_empty());
    // Ss ports are still free for a super-speed device.
    assert_eq!(v.attach_with(&mut w, 3, 1, Speed::Super).unwrap(), 8);
    // Every remaining ss port raced away.
    let busy = [Some(NixErrno::EBUSY); 8];
    let mut w = Scripted::new(&busy);
    let e = v.attach_with(&mut w, 3, 1, Speed::Super).unwrap_err();
    assert_eq!(e.to_string(), "no free super-speed port (8 in use)");
    assert_eq!(w.writes.len(), 8);
}

#[test]
fn not_loaded() {
    let t = tempfile::tempdir().unwrap();
    let v = Vhci::new(t.path());
    let e = v.ports().unwrap_err();
    assert!(
        e.to_string()
            .starts_with("vhci-hcd not loaded: run modprobe vhci-hcd"),
        "{e}"
    );
    let e = v.attach_remote("127.0.0.1", 1, "1-1").unwrap_err();
    assert!(e.to_string().starts_with("vhci-hcd not loaded"), "{e}");
}

#[test]
fn port_records_round_trip_like_the_c_tool() {
    let t = tempfile::tempdir().unwrap();
    let v = Vhci::new(t.path());
    let r = PortRecord {
        host: "server.example".into(),
        service: "3240".into(),
        busid: "1-1.2".into(),
    };
    v.write_record(3, &r).unwrap();
    let path = t.path().join("var/run/vhci_hcd/port3");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "server.example 3240 1-1.2\n"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(v.state_dir()).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(v.read_record(3).unwrap(), r);
    // Overwritten, not appended.
    v.write_record(
        3,
        &PortRecord {
            host: "h".into(),
            ..r.clone()
        },
    )
    .unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "h 3240 1-1.2\n");
    assert!(v.read_record(4).is_err());
    assert_eq!(PortRecord::parse("h 3240 1-1"), None, "no newline");
    assert_eq!(
        PortRecord::parse(&format!("h 3240 {}\n", "1".repeat(40))),
        None
    );
    v.remove_record(3);
    assert!(!path.exists());
    assert!(
        !v.state_dir().exists(),
        "last record gone: directory removed"
    );
}

#[test]
fn detach_checks_the_port_then_writes_it() {
    let t = tempfile::tempdir().unwrap();
    vhci(t.path(), 2, 8, &[used(17, Speed::High)]);
    let v = Vhci::new(t.path());
    v.write_record(
        17,
        &PortRecord {
            host: "h".into(),
            service: "3240".into(),
            busid: "1-1".into(),
        },
    )
    .unwrap();
    let mut w = Scripted::new(&[]);
    assert_eq!(
        v.detach_with(&mut w, 3).unwrap_err().to_string(),
        "port 3 is not in use (already detached)"
    );
    assert_eq!(
        v.detach_with(&mut w, 32).unwrap_err().to_string(),
        "invalid port 32: vhci-hcd has ports 0 to 31"
    );
    assert!(w.writes.is_empty());
    v.detach_with(&mut w, 17).unwrap();
    assert_eq!(
        w.writes,
        [(
            t.path().join("sys/devices/platform/vhci_hcd.0/detach"),
            "17".to_string()
        )]
    );
    assert!(!v.record_path(17).exists());
    // The kernel says EINVAL when it was detached meanwhile.
    let mut w = Scripted::new(&[Some(NixErrno::EINVAL)]);
    v.write_record(
        17,
        &PortRecord {
            host: "h".into(),
            service: "3240".into(),
            busid: "1-1".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        v.detach_with(&mut w, 17),
        Err(VhciError::PortNotInUse { port: 17 })
    ));
}

#[test]
fn imported_devices_join_status_and_records() {
    let t = tempfile::tempdir().unwrap();
    vhci(
        t.path(),
        1,
        8,
        &[
            used(0, Speed::High),
            Used {
                port: 9,
                local_busid: "4-1",
                speed: Speed::Super,
                devid: 0x0002_0005,
                ..used(9, Speed::Super)
            },
            Used {
                state: PortState::Initializing,
                ..used(2, Speed::High)
            },
        ],
    );
    let v = Vhci::new(t.path());
    v.write_record(
        0,
        &PortRecord {
            host: "10.0.0.1".into(),
            service: "3240".into(),
            busid: "1-1".into(),
        },
    )
    .unwrap();
    let got = v.imported().unwrap();
    assert_eq!(got.len(), 2, "initializing port left out");
    assert_eq!(got[0].status.port, 0);
    assert_eq!(got[0].status.local_busid, "3-1");
    assert_eq!(got[0].record.as_ref().unwrap().host, "10.0.0.1");
    assert_eq!(got[1].status.port, 9);
    assert_eq!(got[1].status.local_busid, "4-1");
    assert!(got[1].record.is_err());
    assert_eq!((got[1].status.busnum(), got[1].status.devnum()), (2, 5));
}
