//! Network namespaces joined by veth links, for tests that need more than
//! loopback: multicast (DNS-SD), several hosts, links that go down.
//!
//! [`Network::require`] makes `n` namespaces named `uw-<pid>-<seq>-<i>`
//! (unique per process and per network, so tests running at the same time
//! never meet), each with `lo` up and one interface `uw0` holding
//! `10.77.0.<i+1>/24` and its IPv6 link-local address. Two namespaces are
//! joined by one veth pair; three or more by a bridge in a namespace of its
//! own (`uw-<pid>-<seq>-sw`), with multicast snooping off so that mDNS
//! reaches every member. Nothing is created in the caller's namespace, so
//! interface names cannot collide with the host's or another test's.
//!
//! Dropping the [`Network`] deletes its namespaces (and so their links),
//! also while a test unwinds from a panic. Processes started in a namespace
//! keep it alive until they exit: kill them before the network drops.
//! Namespaces left behind by a test process that was killed outright are
//! removed by the next `Network` made on the machine (their pid is gone).
//!
//! Needs root and `ip` (iproute2). Outside CI a missing prerequisite is a
//! skip (`None`); under `CI=true` it is a failure, as in [`crate::kernel`].

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::kernel::on_ci;

/// The interface each member namespace has on the network.
pub const INTERFACE: &str = "uw0";

/// Why a network could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The machine cannot make namespaces here: a skip outside CI.
    #[error("network namespaces need {0}")]
    Missing(String),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// A set of network namespaces on one link; see the module doc.
#[derive(Debug)]
pub struct Network {
    members: Vec<Netns>,
    /// The namespace of the bridge, with three or more members.
    switch: Option<String>,
}

/// One member of a [`Network`].
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    addr: Ipv4Addr,
}

impl Netns {
    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IPv4 address of its interface [`INTERFACE`].
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// `program` to be run inside the namespace (`ip netns exec`, which
    /// execs it: the child's pid is the program's). Add arguments,
    /// environment and stdio as with any `Command`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `ip ARGS` inside the namespace (`ip -n NAME ARGS`) and fails
    /// on a non-zero exit, e.g. `ns.ip(&["link", "set", "uw0", "down"])`.
    pub fn ip(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }
}

impl Network {
    /// `n` (at least 2) namespaces on one link, or `None` (after saying
    /// why on stderr) where this machine cannot make them outside CI.
    /// Panics under `CI=true` when a prerequisite is missing, and always
    /// when creating them fails for another reason.
    pub fn require(n: usize) -> Option<Network> {
        match Network::new(n) {
            Ok(net) => Some(net),
            Err(NetnsError::Missing(what)) if !on_ci() => {
                eprintln!(
                    "SKIPPED: network namespaces need {what} (set CI=true to make this a failure)"
                );
                None
            }
            Err(e) => panic!("cannot make {n} network namespaces: {e}"),
        }
    }

    /// As [`Network::require`], with the error instead of a skip or panic.
    pub fn new(n: usize) -> Result<Network, NetnsError> {
        assert!(n >= 2, "a network of {n} namespace(s) has nothing to join");
        assert!(n <= 250, "10.77.0.0/24 holds at most 250 members");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetnsError::Missing("root".into()));
        }
        if Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(NetnsError::Missing("`ip` (iproute2)".into()));
        }
        remove_orphans();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "uw-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        // Each namespace joins `net` as it is made, so that an error part
        // way deletes what was made so far.
        let mut net = Network {
            members: Vec::new(),
            switch: None,
        };
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            ip(&["netns", "add", &name])?;
            net.members.push(Netns {
                name,
                addr: Ipv4Addr::new(10, 77, 0, i as u8 + 1),
            });
        }
        if n == 2 {
            let (a, b) = (&net.members[0].name, &net.members[1].name);
            ip(&[
                "-n", a, "link", "add", INTERFACE, "type", "veth", "peer", "name", INTERFACE,
                "netns", b,
            ])?;
        } else {
            let sw = format!("{prefix}-sw");
            ip(&["netns", "add", &sw])?;
            net.switch = Some(sw.clone());
            ip(&[
                "-n",
                &sw,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])?;
            ip(&["-n", &sw, "link", "set", "br0", "up"])?;
            for (i, m) in net.members.iter().enumerate() {
                let port = format!("p{i}");
                ip(&[
                    "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", INTERFACE,
                    "netns", &m.name,
                ])?;
                ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            }
        }
        for m in &net.members {
            let cidr = format!("{}/24", m.addr);
            m.ip(&["link", "set", "lo", "up"])?;
            m.ip(&["addr", "add", &cidr, "dev", INTERFACE])?;
            m.ip(&["link", "set", INTERFACE, "up"])?;
        }
        Ok(net)
    }

    /// The member namespaces, in order (member `i` has `10.77.0.<i+1>`).
    pub fn members(&self) -> &[Netns] {
        &self.members
    }

    /// Member `i`.
    pub fn ns(&self, i: usize) -> &Netns {
        &self.members[i]
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let names = self
            .members
            .iter()
            .map(|m| m.name.clone())
            .chain(self.switch.clone());
        for name in names {
            if let Err(e) = ip(&["netns", "del", &name]) {
                eprintln!("netns: leaving {name} behind: {e}");
            }
        }
    }
}

/// Runs `ip ARGS`; its stderr becomes the error.
fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let command = format!("ip {}", args.join(" "));
    let Output { status, stderr, .. } = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(NetnsError::Command {
            command,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        })
    }
}

/// Deletes the namespaces of test processes that are gone (killed before
/// their `Network` dropped): `uw-<pid>-…` whose pid no longer runs.
fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("uw-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_reach_each_other_and_are_gone_after_drop() {
        for n in [2, 3] {
            let Some(net) = Network::require(n) else {
                return;
            };
            let names: Vec<String> = net.members().iter().map(|m| m.name().into()).collect();
            for m in net.members() {
                for peer in net.members() {
                    // busybox's ping: .ci/install-kernel-deps installs it.
                    let out = m
                        .command("busybox")
                        .args(["ping", "-c", "1", "-W", "5", &peer.addr().to_string()])
                        .output()
                        .expect("running ping");
                    assert!(
                        out.status.success(),
                        "{} cannot reach {}: {}",
                        m.name(),
                        peer.addr(),
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
            drop(net);
            for name in names {
                assert!(
                    !Path::new("/run/netns").join(&name).exists(),
                    "{name} outlived its network"
                );
            }
        }
    }
}
