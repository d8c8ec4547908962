//! A private network of network namespaces for multi-host tests: a
//! "switch" namespace holding a bridge, and one namespace per host, each
//! joined to the bridge by a veth pair and given an address in
//! 10.77.0.0/24.
//!
//! Nothing is added to the host's own namespace, so fixed ports and fixed
//! addresses inside the fabric cannot collide with anything else on the
//! machine; only the namespace names are host-wide, and they carry the
//! test's pid and a per-process counter (`uw-<pid>-<n>-<host>`).
//!
//! A process runs in a host's namespace through [`Host::command`] (a
//! `setns` between fork and exec, so its pid is the child's own) and Rust
//! code through [`Host::run`] (a thread that enters the namespace first:
//! every socket it opens lives there).
//!
//! Needs root and `ip` (iproute2); [`require`] says whether this machine
//! can, and under `CI=true` a missing prerequisite is a failure.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::kernel::on_ci;

/// The prefix length of the fabric's subnet.
pub const PREFIX_LEN: u8 = 24;

static FABRICS: AtomicU32 = AtomicU32::new(0);

/// Whether this machine can build a fabric (root, `ip`). Prints why not and
/// returns false (the test should skip), or panics under `CI=true`.
pub fn require() -> bool {
    let missing = prerequisite_missing();
    match missing {
        None => true,
        Some(why) if on_ci() => panic!("network-namespace test prerequisite missing on CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED: {why} (set CI=true to make this a failure)");
            false
        }
    }
}

fn prerequisite_missing() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("`ip` (iproute2) is not installed".into()),
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The switch namespace and its bridge; every host namespace made from it
/// is deleted on drop (which also destroys their veths). Processes still
/// running in them must be killed first (the owners of [`Host::command`]
/// children do that on their own drop; declare the fabric before them).
pub struct Fabric {
    prefix: String,
    switch: String,
    namespaces: Vec<String>,
    next_host: u8,
}

impl Fabric {
    pub fn new() -> Fabric {
        let n = FABRICS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("uw-{}-{n}", std::process::id());
        let switch = format!("{prefix}-sw");
        ip(&["netns", "add", &switch]);
        let fabric = Fabric {
            prefix,
            switch: switch.clone(),
            namespaces: vec![switch.clone()],
            next_host: 10,
        };
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        fabric
    }

    /// A new host `name` (short: it ends the namespace name) on the bridge,
    /// with the next free address.
    pub fn add_host(&mut self, name: &str) -> Host {
        assert!(self.next_host < 250, "the fabric's /24 is full");
        let octet = self.next_host;
        self.next_host += 1;
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let port = format!("p{octet}");
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // Both ends are made in the switch namespace, then one moves: the
        // names are private to their namespaces, so they cannot collide
        // with another test's.
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&["-n", &self.switch, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &self.switch, "link", "set", &port, "up"]);
        let addr = Ipv4Addr::new(10, 77, 0, octet);
        let cidr = format!("{addr}/{PREFIX_LEN}");
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        let file = File::open(format!("/run/netns/{ns}")).expect("opening the namespace");
        Host {
            inner: Arc::new(HostInner {
                name: name.to_string(),
                ns,
                addr,
                switch: self.switch.clone(),
                port,
                file,
            }),
        }
    }
}

impl Default for Fabric {
    fn default() -> Self {
        Fabric::new()
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

struct HostInner {
    name: String,
    ns: String,
    addr: Ipv4Addr,
    switch: String,
    /// The bridge port (switch side of the veth) that connects this host.
    port: String,
    /// Holds the namespace, for `setns`.
    file: File,
}

/// One host of a [`Fabric`]: a namespace with an address on the bridge.
/// Cheap to clone; the namespace lives as long as the fabric.
#[derive(Clone)]
pub struct Host {
    inner: Arc<HostInner>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The namespace's name, for `ip netns exec` / `ip -n`.
    pub fn netns(&self) -> &str {
        &self.inner.ns
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.inner.addr
    }

    /// `program` to be run in this host's namespace (a `setns` between
    /// fork and exec: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd: RawFd = self.inner.file.as_raw_fd();
        let keep = self.inner.clone();
        // SAFETY: setns(2) is async-signal-safe; the fd stays open as long
        // as `keep` (moved into the closure) lives, which the Command does.
        unsafe {
            c.pre_exec(move || {
                let _ = &keep;
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Runs `program ARGS` in this namespace to completion.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program} in {}: {e}", self.inner.ns))
    }

    /// Runs `f` on a new thread that has entered this namespace first, so
    /// every socket it (or a current-thread tokio runtime it builds) opens
    /// is in this namespace; returns what `f` returns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`Host::run`] without waiting: `f` runs on a new thread that
    /// has entered this namespace first. Sockets made before (and passed
    /// in) stay in their own namespaces, so a listener of the host's root
    /// namespace can hand its connections to sockets made in here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let inner = self.inner.clone();
        std::thread::spawn(move || {
            // SAFETY: setns(2) with an open namespace fd changes only this
            // thread's network namespace.
            let r = unsafe { libc::setns(inner.file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "entering {}: {}",
                inner.ns,
                std::io::Error::last_os_error()
            );
            f()
        })
    }

    /// Cuts this host off the bridge (its packets are dropped from now on,
    /// nothing is refused): a black hole, for an unreachable peer.
    pub fn disconnect(&self) {
        ip(&[
            "-n",
            &self.inner.switch,
            "link",
            "set",
            &self.inner.port,
            "down",
        ]);
    }

    /// Joins it to the bridge again after [`Host::disconnect`].
    pub fn reconnect(&self) {
        ip(&[
            "-n",
            &self.inner.switch,
            "link",
            "set",
            &self.inner.port,
            "up",
        ]);
    }
}
