//! Try-disconnect: is a local USB device in use, and by what?
//!
//! Detaching the kernel drivers from a device that is in use pulls it out
//! from under its user: a mounted file system loses its disk, a terminal
//! its port. Before binding, these checks name what holds the device:
//!
//! * a block device of it (or a partition) that is mounted, or that is a
//!   holder of a dm/md device (`/sys/block/*/holders`);
//! * a block device, tty, hidraw or input node of it that a process has
//!   open (`/proc/*/fd`);
//! * an interface claimed through usbfs by another program.
//!
//! `--force` overrides the first two, whose users the kernel tells that
//! the device went away. It does not override the third: that program
//! drives the device itself, and two drivers of one device corrupt each
//! other's transfers.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::sysfs::{LocalDevice, Roots};

/// One reason a device is busy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Mounted {
        dev: String,
        mountpoint: String,
    },
    HeldBy {
        dev: String,
        holder: String,
    },
    Open {
        node: String,
        pid: u32,
        comm: String,
    },
    Usbfs {
        interface: u8,
        users: Vec<(u32, String)>,
    },
}

impl Holder {
    /// Whether `--force` may override it.
    pub fn forcible(&self) -> bool {
        !matches!(self, Holder::Usbfs { .. })
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::Mounted { dev, mountpoint } => {
                write!(f, "/dev/{dev} is mounted on {mountpoint}")
            }
            Holder::HeldBy { dev, holder } => write!(
                f,
                "/dev/{dev} is in use by {holder} (device mapper or RAID)"
            ),
            Holder::Open { node, pid, comm } => {
                write!(f, "{node} is open by process {pid} ({comm})")
            }
            Holder::Usbfs { interface, users } => {
                write!(
                    f,
                    "interface {interface} is claimed through usbfs by another program"
                )?;
                for (pid, comm) in users {
                    write!(f, " [process {pid} ({comm})]")?;
                }
                Ok(())
            }
        }
    }
}

/// The kernel devices under a USB device: block devices (with their
/// partitions) and character nodes (tty, hidraw, input).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Nodes {
    /// (name, "major:minor"), disks and partitions.
    pub block: Vec<(String, String)>,
    /// (/dev path, "major:minor").
    pub chr: Vec<(String, String)>,
}

fn is_under(path: &Path, dev: &Path) -> bool {
    fs::canonicalize(path).is_ok_and(|p| p.starts_with(dev))
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Finds the block and character devices belonging to `dev`.
pub fn nodes_of(roots: &Roots, dev: &LocalDevice) -> Nodes {
    let mut n = Nodes::default();
    if let Ok(rd) = fs::read_dir(roots.sys.join("block")) {
        for e in rd.flatten() {
            let p = e.path();
            if !is_under(&p, &dev.syspath) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(mm) = read_trim(&p.join("dev")) {
                n.block.push((name.clone(), mm));
            }
            if let Ok(parts) = fs::read_dir(&p) {
                for part in parts.flatten() {
                    let pn = part.file_name().to_string_lossy().into_owned();
                    if pn.starts_with(&name) {
                        if let Some(mm) = read_trim(&part.path().join("dev")) {
                            n.block.push((pn, mm));
                        }
                    }
                }
            }
        }
    }
    for (class, devdir) in [("tty", ""), ("hidraw", ""), ("input", "input/")] {
        let Ok(rd) = fs::read_dir(roots.sys.join("class").join(class)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if class == "input"
                && !(name.starts_with("event")
                    || name.starts_with("mouse")
                    || name.starts_with("js"))
            {
                continue;
            }
            let p = e.path();
            if !is_under(&p, &dev.syspath) {
                continue;
            }
            if let Some(mm) = read_trim(&p.join("dev")) {
                n.chr.push((format!("/dev/{devdir}{name}"), mm));
            }
        }
    }
    n.block.sort();
    n.block.dedup();
    n.chr.sort();
    n
}

/// Mounted block devices among `block`, from `/proc/self/mountinfo`.
pub fn mounted(roots: &Roots, block: &[(String, String)]) -> Vec<Holder> {
    let Ok(text) = fs::read_to_string(roots.proc.join("self/mountinfo")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        if let Some((name, _)) = block.iter().find(|(_, mm)| mm == f[2]) {
            out.push(Holder::Mounted {
                dev: name.clone(),
                mountpoint: unescape(f[4]),
            });
        }
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Block devices among `block` that another block device (dm, md) holds.
pub fn held(roots: &Roots, block: &[(String, String)]) -> Vec<Holder> {
    let mut out = Vec::new();
    for (name, _) in block {
        let disk = roots.sys.join("class/block").join(name);
        let Ok(rd) = fs::read_dir(disk.join("holders")) else {
            continue;
        };
        for h in rd.flatten() {
            out.push(Holder::HeldBy {
                dev: name.clone(),
                holder: h.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    out
}

fn parse_mm(mm: &str) -> Option<(u64, u64)> {
    let (a, b) = mm.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn dev_mm(rdev: u64) -> (u64, u64) {
    (
        ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
        ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
    )
}

/// Processes with one of `targets` (path, "major:minor", is_block) open.
/// A match is by the link text (`/dev/sda`) or by the device number.
pub fn openers(roots: &Roots, targets: &[(String, String, bool)]) -> Vec<Holder> {
    let mut out = Vec::new();
    let me = std::process::id();
    let Ok(rd) = fs::read_dir(&roots.proc) else {
        return out;
    };
    type Wanted = (String, Option<(u64, u64)>, bool);
    let wanted: Vec<Wanted> = targets
        .iter()
        .map(|(p, mm, b)| (p.clone(), parse_mm(mm), *b))
        .collect();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        let mut seen = BTreeSet::new();
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let hit = wanted.iter().find(|(p, mm, is_block)| {
                if *p == t {
                    return true;
                }
                let Some(mm) = mm else { return false };
                // Only stat things that look like device nodes.
                if !t.starts_with("/dev/") {
                    return false;
                }
                fs::metadata(fd.path()).is_ok_and(|m| {
                    let ft = m.file_type();
                    (if *is_block {
                        ft.is_block_device()
                    } else {
                        ft.is_char_device()
                    }) && dev_mm(m.rdev()) == *mm
                })
            });
            if let Some((p, _, _)) = hit {
                if seen.insert(p.clone()) {
                    out.push(Holder::Open {
                        node: p.clone(),
                        pid,
                        comm: read_trim(&e.path().join("comm")).unwrap_or_default(),
                    });
                }
            }
        }
    }
    out
}

/// Every reason `dev` is busy. Holders that `--force` overrides come first.
pub fn check(roots: &Roots, dev: &LocalDevice) -> Vec<Holder> {
    let nodes = nodes_of(roots, dev);
    let mut out = mounted(roots, &nodes.block);
    out.extend(held(roots, &nodes.block));
    let mut targets: Vec<(String, String, bool)> = nodes
        .block
        .iter()
        .map(|(n, mm)| (format!("/dev/{n}"), mm.clone(), true))
        .collect();
    targets.extend(
        nodes
            .chr
            .iter()
            .map(|(p, mm)| (p.clone(), mm.clone(), false)),
    );
    let mut open = openers(roots, &targets);
    // A mounted disk also shows as open by nobody; keep only real openers.
    out.append(&mut open);
    for i in &dev.interfaces {
        if i.driver.as_deref() == Some("usbfs") {
            let node = format!("/dev/bus/usb/{:03}/{:03}", dev.busnum, dev.devnum);
            let users = openers(
                roots,
                &[(
                    node,
                    format!("189:{}", (dev.busnum - 1) * 128 + dev.devnum - 1),
                    false,
                )],
            )
            .into_iter()
            .filter_map(|h| match h {
                Holder::Open { pid, comm, .. } => Some((pid, comm)),
                _ => None,
            })
            .collect();
            out.push(Holder::Usbfs {
                interface: i.number,
                users,
            });
        }
    }
    out
}

/// A path helper for tests and callers: `/dev/<name>`.
pub fn dev_path(roots: &Roots, name: &str) -> PathBuf {
    roots.dev.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn w(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    /// A fake tree: USB device 1-1 with a disk sda (partition sda1) and a
    /// ttyACM0; another device 1-2 with sdb.
    fn tree() -> (tempfile::TempDir, Roots, LocalDevice) {
        let t = tempfile::tempdir().unwrap();
        let r = Roots::under(t.path());
        let d = r.sys.join("devices/pci0000:00/usb1/1-1");
        for (k, v) in [
            ("busnum", "1"),
            ("devnum", "2"),
            ("idVendor", "0525"),
            ("idProduct", "a4a5"),
            ("bDeviceClass", "00"),
            ("bConfigurationValue", "1"),
        ] {
            w(&d.join(k), v);
        }
        let i = d.join("1-1:1.0");
        for (k, v) in [
            ("bInterfaceClass", "08"),
            ("bInterfaceSubClass", "06"),
            ("bInterfaceProtocol", "50"),
        ] {
            w(&i.join(k), v);
        }
        let disk = i.join("host0/target0:0:0/0:0:0:0/block/sda");
        w(&disk.join("dev"), "8:0");
        w(&disk.join("sda1/dev"), "8:1");
        fs::create_dir_all(disk.join("holders")).unwrap();
        fs::create_dir_all(disk.join("sda1/holders")).unwrap();
        let other = r
            .sys
            .join("devices/pci0000:00/usb1/1-2/1-2:1.0/host1/block/sdb");
        w(&other.join("dev"), "8:16");
        let tty = i.join("tty/ttyACM0");
        w(&tty.join("dev"), "166:0");
        fs::create_dir_all(r.sys.join("block")).unwrap();
        fs::create_dir_all(r.sys.join("class/block")).unwrap();
        fs::create_dir_all(r.sys.join("class/tty")).unwrap();
        fs::create_dir_all(r.sys.join("bus/usb/devices")).unwrap();
        symlink(&disk, r.sys.join("block/sda")).unwrap();
        symlink(&other, r.sys.join("block/sdb")).unwrap();
        symlink(&disk, r.sys.join("class/block/sda")).unwrap();
        symlink(disk.join("sda1"), r.sys.join("class/block/sda1")).unwrap();
        symlink(&tty, r.sys.join("class/tty/ttyACM0")).unwrap();
        symlink(&d, r.sys.join("bus/usb/devices/1-1")).unwrap();
        w(&r.proc.join("self/mountinfo"), "22 1 8:1 / /mnt/usb\\040disk rw,relatime - vfat /dev/sda1 rw\n23 1 8:16 / /other rw - ext4 /dev/sdb rw\n");
        let dev = r.local_device("1-1").unwrap();
        (t, r, dev)
    }

    #[test]
    fn finds_nodes_of_the_device_only() {
        let (_t, r, dev) = tree();
        let n = nodes_of(&r, &dev);
        assert_eq!(
            n.block,
            vec![("sda".into(), "8:0".into()), ("sda1".into(), "8:1".into())]
        );
        assert_eq!(n.chr, vec![("/dev/ttyACM0".into(), "166:0".into())]);
    }

    #[test]
    fn names_the_mount_and_holders_and_openers() {
        let (_t, r, dev) = tree();
        let h = check(&r, &dev);
        assert_eq!(
            h,
            vec![Holder::Mounted {
                dev: "sda1".into(),
                mountpoint: "/mnt/usb disk".into()
            }]
        );
        assert_eq!(h[0].to_string(), "/dev/sda1 is mounted on /mnt/usb disk");
        assert!(h[0].forcible());

        // A dm device holding the partition.
        fs::create_dir_all(r.sys.join("devices/pci0000:00/usb1/1-1/1-1:1.0/host0/target0:0:0/0:0:0:0/block/sda/sda1/holders/dm-0")).unwrap();
        // A process with the tty open.
        let p = r.proc.join("4242");
        w(&p.join("comm"), "minicom");
        fs::create_dir_all(p.join("fd")).unwrap();
        symlink("/dev/ttyACM0", p.join("fd/3")).unwrap();
        symlink("/dev/null", p.join("fd/0")).unwrap();
        let h = check(&r, &dev);
        assert!(
            h.contains(&Holder::HeldBy {
                dev: "sda1".into(),
                holder: "dm-0".into()
            }),
            "{h:?}"
        );
        let open = Holder::Open {
            node: "/dev/ttyACM0".into(),
            pid: 4242,
            comm: "minicom".into(),
        };
        assert!(h.contains(&open), "{h:?}");
        assert!(open.forcible());
        assert_eq!(
            open.to_string(),
            "/dev/ttyACM0 is open by process 4242 (minicom)"
        );
    }

    #[test]
    fn usbfs_claims_by_other_programs_are_reported() {
        let (_t, r, _) = tree();
        let i = r.sys.join("devices/pci0000:00/usb1/1-1/1-1:1.0");
        fs::create_dir_all(r.sys.join("bus/usb/drivers/usbfs")).unwrap();
        symlink(r.sys.join("bus/usb/drivers/usbfs"), i.join("driver")).unwrap();
        let p = r.proc.join("77");
        w(&p.join("comm"), "libusb-app");
        fs::create_dir_all(p.join("fd")).unwrap();
        symlink("/dev/bus/usb/001/002", p.join("fd/5")).unwrap();
        let dev = r.local_device("1-1").unwrap();
        let h = check(&r, &dev);
        let u = Holder::Usbfs {
            interface: 0,
            users: vec![(77, "libusb-app".into())],
        };
        assert!(h.contains(&u), "{h:?}");
        assert!(!u.forcible());
    }
}
