//! Builds fake vhci-hcd trees, laid out and worded like the kernel's.

use std::fs;
use std::path::{Path, PathBuf};

use usbwire_proto::Speed;

use super::PortState;

/// One port's state in a fake status file.
#[derive(Debug, Clone)]
pub struct Used<'a> {
    pub port: u32,
    pub speed: Speed,
    pub devid: u32,
    pub sockfd: u32,
    pub local_busid: &'a str,
    pub state: PortState,
}

/// `controllers` controllers of `hc_ports` ports per hub, ports in
/// `used` taken. Writes `vhci_hcd.N` dirs and every attribute on
/// `vhci_hcd.0` as the kernel does.
pub fn vhci(root: &Path, controllers: u32, hc_ports: u32, used: &[Used<'_>]) -> PathBuf {
    let platform = root.join("sys/devices/platform");
    for c in 0..controllers {
        fs::create_dir_all(platform.join(format!("vhci_hcd.{c}"))).unwrap();
    }
    let hc = platform.join("vhci_hcd.0");
    fs::write(
        hc.join("nports"),
        format!("{}\n", controllers * hc_ports * 2),
    )
    .unwrap();
    fs::write(hc.join("attach"), "").unwrap();
    fs::write(hc.join("detach"), "").unwrap();
    set_status(root, controllers, hc_ports, used);
    hc
}

/// Rewrites the status files.
pub fn set_status(root: &Path, controllers: u32, hc_ports: u32, used: &[Used<'_>]) {
    let hc = root.join("sys/devices/platform/vhci_hcd.0");
    for c in 0..controllers {
        let mut s = String::from("hub port sta spd dev      sockfd local_busid\n");
        for (hub, base) in [("hs", 0), ("ss", hc_ports)] {
            for i in 0..hc_ports {
                let port = c * hc_ports * 2 + base + i;
                match used.iter().find(|u| u.port == port) {
                    Some(u) if u.state == PortState::Used => s.push_str(&format!(
                        "{hub}  {port:04} {:03} {:03} {:08x} {:06} {}\n",
                        u.state.to_u32(),
                        u.speed.to_u32(),
                        u.devid,
                        u.sockfd,
                        u.local_busid
                    )),
                    Some(u) => s.push_str(&format!(
                        "{hub}  {port:04} {:03} 000 00000000 000000 0-0\n",
                        u.state.to_u32()
                    )),
                    None => s.push_str(&format!("{hub}  {port:04} 004 000 00000000 000000 0-0\n")),
                }
            }
        }
        let name = if c == 0 {
            "status".to_string()
        } else {
            format!("status.{c}")
        };
        fs::write(hc.join(name), s).unwrap();
    }
}
