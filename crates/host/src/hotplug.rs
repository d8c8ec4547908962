//! Following hotplug: the kernel announces every USB device that comes,
//! goes, or gets or loses its driver with a uevent on a
//! `NETLINK_KOBJECT_UEVENT` socket, and each announcement of a USB device
//! makes the bind manager run one hotplug pass ([`crate::Manager::poll`]),
//! which compares the bindings with sysfs. The pass is the only judge:
//! an event only says "look now", so a lost event costs nothing once the
//! next one comes, and a queue that overflowed (`ENOBUFS`) means "look now"
//! too.
//!
//! Where uevents never arrive the manager polls instead, every
//! `--hotplug-interval-ms`: when the socket cannot be opened, or when this
//! process runs in a user namespace other than the initial one. The kernel
//! broadcasts uevents only to sockets in network namespaces that the
//! initial user namespace owns (`uevent_net_init`), so a container with a
//! user namespace of its own (rootless podman, unprivileged LXC) hears
//! nothing, while a container with only its own network namespace does.
//!
//! The messages are the kernel's own (multicast group 1, `ACTION@DEVPATH`
//! then `KEY=VALUE` strings), not udevd's (group 2), so no udevd is needed.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{
    bind, recvfrom, socket_with, AddressFamily, RecvFlags, SocketAddrAny, SocketFlags, SocketType,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, info, warn};

use crate::bind::Manager;
use crate::sysfs::Roots;

/// The multicast group the kernel sends uevents to (udevd resends its own
/// on group 2).
const KERNEL_GROUP: u32 = 1;
/// A uevent is at most `UEVENT_BUFFER_SIZE` (2048) bytes of variables plus
/// its header; anything longer is not the kernel's.
const DATAGRAM_MAX: usize = 8192;
/// Datagrams read per wake-up before the pass runs: a burst (a hub with
/// many devices) is taken as one change, and the loop stays bounded.
const DATAGRAMS_PER_WAKE: usize = 256;
/// Room for bursts in the socket's queue. Asked for with
/// `SO_RCVBUFFORCE` (root) and else `SO_RCVBUF` (capped by
/// `net.core.rmem_max`); an overflow anyway is `ENOBUFS`, a rescan.
const RECEIVE_BUFFER: usize = 1 << 20;

/// One kernel uevent, borrowed from its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uevent<'a> {
    /// `add`, `remove`, `bind`, `unbind`, `change`, `move`...
    pub action: &'a str,
    /// The device path below `/sys`, `/devices/.../usb1/1-1`.
    pub devpath: &'a str,
    pub subsystem: Option<&'a str>,
    pub devtype: Option<&'a str>,
}

impl<'a> Uevent<'a> {
    /// A kernel uevent: an `ACTION@DEVPATH` header, then NUL-terminated
    /// `KEY=VALUE` strings with at least `ACTION` and `DEVPATH`. `None`
    /// for anything else (udevd's `libudev` messages included).
    pub fn parse(datagram: &'a [u8]) -> Option<Uevent<'a>> {
        let mut fields = datagram
            .split(|&b| b == 0)
            .filter(|f| !f.is_empty())
            .map(std::str::from_utf8);
        let header = fields.next()?.ok()?;
        let (header_action, header_devpath) = header.split_once('@')?;
        let (mut action, mut devpath, mut subsystem, mut devtype) = (None, None, None, None);
        for field in fields {
            let Some((key, value)) = field.ok().and_then(|f| f.split_once('=')) else {
                continue;
            };
            match key {
                "ACTION" => action = Some(value),
                "DEVPATH" => devpath = Some(value),
                "SUBSYSTEM" => subsystem = Some(value),
                "DEVTYPE" => devtype = Some(value),
                _ => {}
            }
        }
        let (action, devpath) = (action?, devpath?);
        if action != header_action || devpath != header_devpath {
            return None;
        }
        Some(Uevent {
            action,
            devpath,
            subsystem,
            devtype,
        })
    }

    /// The bus id of the USB device (not interface) this event is about.
    /// Interfaces are left out on purpose: claiming a device's interfaces
    /// makes events of its own, and a device's configuration is settled
    /// when the device's `bind` comes.
    pub fn usb_device(&self) -> Option<&'a str> {
        if self.subsystem != Some("usb") || self.devtype != Some("usb_device") {
            return None;
        }
        self.devpath.rsplit('/').next().filter(|b| !b.is_empty())
    }
}

/// What a wake-up of the uevent socket found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These USB devices (bus ids, in arrival order) came, went or changed.
    Devices(Vec<String>),
    /// Anything may have changed: the kernel dropped events (`ENOBUFS`),
    /// or nothing has been heard yet (the first pass, and every pass where
    /// hotplug is polled).
    Unknown,
}

/// What one receive attempt means.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Received {
    Device(String),
    Ignored,
    Overflow,
    Drained,
}

/// Sorts one `recvfrom` result: a USB device's event from the kernel, one
/// to ignore, an overflow, or nothing left to read.
fn classify(
    result: Result<(&[u8], Option<SocketAddrAny>), Errno>,
    kernel_only: bool,
) -> Result<Received, Errno> {
    match result {
        Ok((datagram, sender)) => {
            if kernel_only && !from_kernel(sender) {
                return Ok(Received::Ignored);
            }
            Ok(Uevent::parse(datagram)
                .and_then(|e| e.usb_device())
                .map_or(Received::Ignored, |busid| Received::Device(busid.into())))
        }
        Err(Errno::NOBUFS) => Ok(Received::Overflow),
        Err(Errno::AGAIN) => Ok(Received::Drained),
        Err(e) => Err(e),
    }
}

/// Only the kernel (port id 0) speaks on the uevent group; a process
/// could send look-alike messages to our port id.
fn from_kernel(sender: Option<SocketAddrAny>) -> bool {
    sender
        .and_then(|a| SocketAddrNetlink::try_from(a).ok())
        .is_some_and(|nl| nl.pid() == 0)
}

/// Why this process would hear no uevents, if it would not: it runs in a
/// user namespace other than the initial one (whose `uid_map` maps every
/// id to itself).
pub fn uevents_unavailable(roots: &Roots) -> Option<String> {
    let path = roots.proc.join("self/uid_map");
    let map = match std::fs::read_to_string(&path) {
        Ok(m) => m,
        // No user namespaces in this kernel: everything is the initial one.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    let identity = map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    (!identity).then(|| {
        "this process runs in a user namespace of its own, which the kernel sends no uevents"
            .to_string()
    })
}

/// A socket the kernel's uevents arrive on.
pub struct UeventSocket {
    fd: AsyncFd<OwnedFd>,
    /// Accept datagrams from the kernel only (not in tests, which inject
    /// events through a socket pair).
    kernel_only: bool,
}

impl UeventSocket {
    /// Joins the kernel's uevent group. Must run inside a tokio runtime.
    pub fn open() -> io::Result<UeventSocket> {
        let fd = socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::KOBJECT_UEVENT),
        )?;
        if rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, RECEIVE_BUFFER).is_err() {
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, RECEIVE_BUFFER);
        }
        bind(&fd, &SocketAddrNetlink::new(0, KERNEL_GROUP))?;
        Ok(UeventSocket {
            fd: crate::usbfs::register_owned(fd, Interest::READABLE)?,
            kernel_only: true,
        })
    }

    /// Waits until the kernel announces a change of USB devices, then
    /// takes every event already queued with it.
    pub async fn changed(&mut self) -> io::Result<Change> {
        let mut buf = [MaybeUninit::<u8>::uninit(); DATAGRAM_MAX];
        let mut devices = Vec::new();
        loop {
            let mut guard = self.fd.readable().await?;
            for _ in 0..DATAGRAMS_PER_WAKE {
                let result = recvfrom(guard.get_inner(), &mut buf, RecvFlags::DONTWAIT)
                    .map(|((datagram, _), _, sender)| (&*datagram, sender));
                match classify(result, self.kernel_only) {
                    Ok(Received::Device(busid)) => devices.push(busid),
                    Ok(Received::Ignored) => {}
                    Ok(Received::Overflow) => return Ok(Change::Unknown),
                    Ok(Received::Drained) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !devices.is_empty() {
                return Ok(Change::Devices(devices));
            }
        }
    }
}

/// Runs `pass` once now, then once per change the socket announces; ends
/// only if the socket fails.
async fn follow_uevents<F, Fut>(mut socket: UeventSocket, mut pass: F) -> io::Error
where
    F: FnMut(Change) -> Fut,
    Fut: Future<Output = ()>,
{
    // Whatever changed before the socket joined the group.
    pass(Change::Unknown).await;
    loop {
        match socket.changed().await {
            Ok(change) => {
                if change == Change::Unknown {
                    info!("the kernel dropped uevents (ENOBUFS); looking at every binding");
                }
                pass(change).await;
            }
            Err(e) => return e,
        }
    }
}

/// One hotplug pass of `manager`, on the blocking pool (it reads sysfs
/// and may claim a device).
async fn pass_of(manager: &Arc<Manager>, change: Change) {
    debug!(?change, "hotplug pass");
    let manager = manager.clone();
    if tokio::task::spawn_blocking(move || manager.poll())
        .await
        .is_err()
    {
        warn!("hotplug pass panicked");
    }
}

/// Follows hotplug for `manager` until the task is aborted: by uevents
/// where they arrive, else by a pass every `poll_every`.
pub(crate) fn spawn(
    manager: Arc<Manager>,
    roots: &Roots,
    poll_every: Duration,
) -> tokio::task::JoinHandle<()> {
    let unavailable = uevents_unavailable(roots);
    tokio::spawn(async move {
        let why = match unavailable {
            Some(why) => why,
            None => match UeventSocket::open() {
                Ok(socket) => {
                    info!("following hotplug through kernel uevents");
                    let e = follow_uevents(socket, |c| pass_of(&manager, c)).await;
                    format!("the uevent socket failed: {e}")
                }
                Err(e) => format!("cannot open a uevent socket: {e}"),
            },
        };
        warn!("no kernel uevents ({why}); looking for hotplug every {poll_every:?} instead");
        let mut tick = tokio::time::interval(poll_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            pass_of(&manager, Change::Unknown).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{send, socketpair, SendFlags};
    use tokio::sync::mpsc;

    fn datagram(action: &str, devpath: &str, vars: &[&str]) -> Vec<u8> {
        let mut d =
            format!("{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0").into_bytes();
        for v in vars {
            d.extend_from_slice(v.as_bytes());
            d.push(0);
        }
        d
    }

    const DEVICE: &[&str] = &[
        "SUBSYSTEM=usb",
        "DEVNAME=bus/usb/001/002",
        "DEVTYPE=usb_device",
        "PRODUCT=525/a4a0/10",
        "BUSNUM=001",
        "DEVNUM=002",
        "SEQNUM=1234",
    ];

    #[test]
    fn parses_kernel_uevents() {
        let raw = datagram("remove", "/devices/platform/dummy_hcd.0/usb1/1-1", DEVICE);
        let e = Uevent::parse(&raw).unwrap();
        assert_eq!(e.action, "remove");
        assert_eq!(e.devpath, "/devices/platform/dummy_hcd.0/usb1/1-1");
        assert_eq!(e.subsystem, Some("usb"));
        assert_eq!(e.devtype, Some("usb_device"));
        assert_eq!(e.usb_device(), Some("1-1"));
        let bind = datagram(
            "bind",
            "/devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1.4",
            &["SUBSYSTEM=usb", "DEVTYPE=usb_device", "DRIVER=usb"],
        );
        assert_eq!(Uevent::parse(&bind).unwrap().usb_device(), Some("2-1.4"));
    }

    #[test]
    fn only_usb_devices_count() {
        let interface = datagram(
            "bind",
            "/devices/platform/dummy_hcd.0/usb1/1-1/1-1:1.0",
            &["SUBSYSTEM=usb", "DEVTYPE=usb_interface", "DRIVER=usbfs"],
        );
        let block = datagram("add", "/devices/virtual/block/loop0", &["SUBSYSTEM=block"]);
        let endpoint = datagram(
            "add",
            "/devices/platform/dummy_hcd.0/usb1/1-1/ep_00",
            &["SUBSYSTEM=usb_endpoint", "DEVTYPE=usb_endpoint"],
        );
        for raw in [interface, block, endpoint] {
            let e = Uevent::parse(&raw).unwrap();
            assert_eq!(e.usb_device(), None, "{e:?}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_kernel_uevent() {
        // udevd's messages start with "libudev\0" and a binary header.
        let mut udev = b"libudev\0\xfe\xed\xca\xfe".to_vec();
        udev.extend_from_slice(&[0u8; 28]);
        udev.extend_from_slice(b"ACTION=add\0DEVPATH=/devices/x\0");
        assert_eq!(Uevent::parse(&udev), None);
        // Header and variables disagree, or variables are missing.
        let mut lying = datagram("add", "/devices/a/1-1", DEVICE);
        lying.splice(0..3, b"rem".iter().copied());
        assert_eq!(Uevent::parse(&lying), None);
        assert_eq!(Uevent::parse(b"add@/devices/a\0ACTION=add\0"), None);
        assert_eq!(Uevent::parse(b""), None);
        assert_eq!(Uevent::parse(b"\0\0\0"), None);
        assert_eq!(Uevent::parse(b"no header\0ACTION=add\0DEVPATH=/d\0"), None);
        // Not UTF-8 in a variable: skipped, the rest still counts.
        let mut odd = datagram("add", "/devices/a/1-1", DEVICE);
        odd.extend_from_slice(b"MODALIAS=\xff\xfe\0");
        assert_eq!(Uevent::parse(&odd).unwrap().usb_device(), Some("1-1"));
        // A devpath ending in '/' names no device.
        let slash = datagram("add", "/devices/a/", DEVICE);
        assert_eq!(Uevent::parse(&slash).unwrap().usb_device(), None);
    }

    #[test]
    fn overflow_and_foreign_senders_are_told_apart() {
        let raw = datagram("add", "/devices/a/1-1", DEVICE);
        assert_eq!(
            classify(Ok((&raw, None)), false),
            Ok(Received::Device("1-1".into()))
        );
        // Not from the kernel's port id: ignored.
        let process = SocketAddrNetlink::new(4242, KERNEL_GROUP).into();
        assert_eq!(
            classify(Ok((&raw, Some(process))), true),
            Ok(Received::Ignored)
        );
        assert_eq!(classify(Ok((&raw, None)), true), Ok(Received::Ignored));
        let kernel = SocketAddrNetlink::new(0, KERNEL_GROUP).into();
        assert_eq!(
            classify(Ok((&raw, Some(kernel))), true),
            Ok(Received::Device("1-1".into()))
        );
        assert_eq!(classify(Err(Errno::NOBUFS), true), Ok(Received::Overflow));
        assert_eq!(classify(Err(Errno::AGAIN), true), Ok(Received::Drained));
        assert_eq!(classify(Err(Errno::BADF), true), Err(Errno::BADF));
    }

    #[test]
    fn user_namespaces_other_than_the_initial_one_hear_no_uevents() {
        let t = tempfile::tempdir().unwrap();
        let roots = Roots::under(t.path());
        assert_eq!(uevents_unavailable(&roots), None, "no user namespaces");
        std::fs::create_dir_all(roots.proc.join("self")).unwrap();
        let map = roots.proc.join("self/uid_map");
        std::fs::write(&map, "         0          0 4294967295\n").unwrap();
        assert_eq!(uevents_unavailable(&roots), None);
        std::fs::write(&map, "         0     100000      65536\n").unwrap();
        assert!(uevents_unavailable(&roots)
            .unwrap()
            .contains("user namespace"));
    }

    /// A socket pair standing in for the netlink socket: what is sent on
    /// the first end arrives as uevents.
    fn injected() -> (OwnedFd, UeventSocket) {
        let (kernel, ours) = socketpair(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let socket = UeventSocket {
            fd: crate::usbfs::register_owned(ours, Interest::READABLE).unwrap(),
            kernel_only: false,
        };
        (kernel, socket)
    }

    #[tokio::test]
    async fn a_pass_runs_at_start_and_per_usb_device_change_only() {
        let (kernel, socket) = injected();
        let (passes, mut passed) = mpsc::unbounded_channel();
        let follower = tokio::spawn(follow_uevents(socket, move |change| {
            passes.send(change).unwrap();
            async {}
        }));
        assert_eq!(passed.recv().await, Some(Change::Unknown), "the first pass");
        let interface = datagram(
            "unbind",
            "/devices/platform/dummy_hcd.0/usb1/1-1/1-1:1.0",
            &["SUBSYSTEM=usb", "DEVTYPE=usb_interface"],
        );
        let block = datagram("remove", "/devices/virtual/block/sda", &["SUBSYSTEM=block"]);
        for d in [interface, block, b"garbage".to_vec()] {
            send(&kernel, &d, SendFlags::empty()).unwrap();
        }
        let unplug = datagram("remove", "/devices/platform/dummy_hcd.0/usb1/1-1", DEVICE);
        send(&kernel, &unplug, SendFlags::empty()).unwrap();
        // Only the device's event made a pass: the others before it did not.
        assert_eq!(
            passed.recv().await,
            Some(Change::Devices(vec!["1-1".into()]))
        );
        let replug = datagram("add", "/devices/platform/dummy_hcd.0/usb1/1-2", DEVICE);
        let configured = datagram("bind", "/devices/platform/dummy_hcd.0/usb1/1-2", DEVICE);
        send(&kernel, &replug, SendFlags::empty()).unwrap();
        send(&kernel, &configured, SendFlags::empty()).unwrap();
        // One pass per wake-up, covering what was queued: both events, in
        // one or two passes.
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match passed.recv().await {
                Some(Change::Devices(d)) => seen.extend(d),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, ["1-2", "1-2"]);
        assert!(passed.try_recv().is_err(), "no pass without an event");
        follower.abort();
    }
}
