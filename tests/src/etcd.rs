//! A real etcd cluster (Debian's `etcd-server`, v3 API) for the fleet
//! tests: each member in its own host of a [`Fabric`], on the fixed etcd
//! ports of its private namespace, data in a temporary directory, every
//! member killed on drop.
//!
//! ```no_run
//! # use usbwire_tests::{etcd, fabric};
//! if !etcd::require() { return; }
//! let mut fabric = fabric::Fabric::new();
//! let mut cluster = etcd::Cluster::start(&mut fabric, 3);
//! let client = fabric.add_host("client");
//! // `cluster.endpoints()`: "http://10.77.0.10:2379,http://10.77.0.11:2379,..."
//! cluster.etcdctl(&client, &["put", "k", "v"]);
//! cluster.kill_member(0);            // SIGKILL one member
//! cluster.restart_member(0);         // back, waits until it is healthy
//! cluster.stop();                    // every member killed
//! cluster.start_again();             // back from the same data
//! cluster.disconnect();              // black-holed: reachable by nobody
//! cluster.reconnect();
//! ```
//!
//! Waiting for the cluster polls `etcdctl endpoint health` in a loop
//! bounded in count and time; nothing else waits on the clock.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::fabric::{self, Fabric, Host};
use crate::kernel::on_ci;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// How long a (re)started cluster or member may take to become healthy.
/// Generous: the machine may be busy with qemu guests.
const HEALTH_LIMIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(100);

/// Whether this machine can run an etcd cluster test: root and `ip` (see
/// [`fabric::require`]), `etcd` and `etcdctl`. Prints why not and returns
/// false (skip), or panics under `CI=true`.
pub fn require() -> bool {
    if !fabric::require() {
        return false;
    }
    for (tool, version, package) in [
        ("etcd", "--version", "etcd-server"),
        ("etcdctl", "version", "etcd-client"),
    ] {
        let found = Command::new(tool)
            .arg(version)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = format!("`{tool}` not found: apt-get install {package} (.ci/install-deps)");
            if on_ci() {
                panic!("etcd test prerequisite missing on CI: {why}");
            }
            eprintln!("SKIPPED: {why} (set CI=true to make this a failure)");
            return false;
        }
    }
    true
}

struct Member {
    name: String,
    host: Host,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.host.addr())
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{PEER_PORT}", self.host.addr())
    }

    fn spawn(&mut self, initial_cluster: &str, token: &str) {
        assert!(self.child.is_none(), "member {} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log file");
        let client_url = self.client_url();
        let peer_url = self.peer_url();
        // Once its data directory exists, a member ignores the --initial-*
        // flags and rejoins as what it was.
        let child = self
            .host
            .command("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", token])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running etcd cluster; every member is killed on drop.
pub struct Cluster {
    members: Vec<Member>,
    /// Where `etcdctl` runs for the harness's own checks.
    probe: Host,
    initial_cluster: String,
    token: String,
    // Dropped after the members are killed (fields drop in order).
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `size` members (1 or 3, say), each a new host of `fabric` named
    /// `etcdN`, and returns once every one reports healthy.
    pub fn start(fabric: &mut Fabric, size: usize) -> Cluster {
        assert!(size >= 1, "a cluster has at least one member");
        let dir = tempfile::Builder::new()
            .prefix("usbwire-etcd-")
            .tempdir()
            .expect("etcd temp dir");
        let members: Vec<Member> = (0..size)
            .map(|i| {
                let name = format!("etcd{i}");
                let host = fabric.add_host(&name);
                Member {
                    data: dir.path().join(format!("{name}.data")),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    host,
                    child: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let probe = fabric.add_host("etcdprobe");
        let token = format!("usbwire-{}", std::process::id());
        let mut cluster = Cluster {
            members,
            probe,
            initial_cluster,
            token,
            dir,
        };
        cluster.start_again();
        cluster
    }

    /// Every member's client URL, comma-separated: what `--fleet` takes.
    pub fn endpoints(&self) -> String {
        self.endpoint_list().join(",")
    }

    pub fn endpoint_list(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Member `i`'s host (for [`Host::disconnect`] of one member, say).
    pub fn member_host(&self, i: usize) -> &Host {
        &self.members[i].host
    }

    /// SIGKILL member `i`: no goodbye to its peers.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again from its data and waits until the members
    /// that run are healthy.
    pub fn restart_member(&mut self, i: usize) {
        let (ic, token) = (self.initial_cluster.clone(), self.token.clone());
        self.members[i].spawn(&ic, &token);
        self.wait_healthy();
    }

    /// Kills every member.
    pub fn stop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }

    /// Starts every member that does not run (from its data, if it has
    /// some) and waits until all are healthy.
    pub fn start_again(&mut self) {
        let (ic, token) = (self.initial_cluster.clone(), self.token.clone());
        for m in &mut self.members {
            if m.child.is_none() {
                m.spawn(&ic, &token);
            }
        }
        self.wait_healthy();
    }

    /// Black-holes every member: they keep running, but nothing reaches
    /// them (connections hang rather than being refused).
    pub fn disconnect(&self) {
        for m in &self.members {
            m.host.disconnect();
        }
    }

    /// Undoes [`Cluster::disconnect`] and waits until all are healthy.
    pub fn reconnect(&self) {
        for m in &self.members {
            m.host.reconnect();
        }
        self.wait_healthy();
    }

    /// The client URLs of the members the harness has not killed.
    fn running_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::client_url)
            .collect()
    }

    /// Waits until every running member answers healthy (a bounded poll).
    pub fn wait_healthy(&self) {
        let running = self.running_endpoints();
        if running.is_empty() {
            return;
        }
        let endpoints = running.join(",");
        let deadline = Instant::now() + HEALTH_LIMIT;
        let mut last = String::new();
        // Each round runs one bounded etcdctl; the loop ends by the deadline.
        while Instant::now() < deadline {
            let out = self.probe.output(
                "etcdctl",
                &[
                    "--endpoints",
                    &endpoints,
                    "--dial-timeout",
                    "2s",
                    "--command-timeout",
                    "3s",
                    "endpoint",
                    "health",
                ],
            );
            if out.status.success() {
                return;
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(POLL);
        }
        panic!(
            "etcd members {endpoints} not healthy within {HEALTH_LIMIT:?}: {last}\n{}",
            self.logs()
        );
    }

    /// `etcdctl --endpoints RUNNING ARGS` run in `from`'s namespace (the
    /// members the harness has not killed, so that a check does not wait
    /// out a dial timeout on a dead one); panics with its output when it
    /// fails.
    pub fn etcdctl(&self, from: &Host, args: &[&str]) -> String {
        let out = self.etcdctl_output(from, args);
        assert!(
            out.status.success(),
            "etcdctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// As [`Cluster::etcdctl`], but returns the output whatever happened.
    pub fn etcdctl_output(&self, from: &Host, args: &[&str]) -> Output {
        let running = self.running_endpoints();
        // With none running, etcdctl fails as a client would.
        let endpoints = if running.is_empty() {
            self.endpoints()
        } else {
            running.join(",")
        };
        let mut all = vec![
            "--endpoints",
            &endpoints,
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "10s",
        ];
        all.extend_from_slice(args);
        from.output("etcdctl", &all)
    }

    /// Every key under `prefix`, sorted (from the harness's own host).
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.etcdctl(&self.probe, &["get", "--prefix", "--keys-only", prefix]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// The value of `key`, if it exists.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&self.probe, &["get", "--print-value-only", key]);
        let v = out.strip_suffix('\n').unwrap_or(&out);
        (!out.is_empty()).then(|| v.to_string())
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(&m.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} (last 30 lines) ---\n{}", m.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The cluster's temporary directory (data and logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
