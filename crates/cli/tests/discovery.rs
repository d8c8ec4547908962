//! DNS-SD across two network namespaces joined by a veth pair: our
//! `usbipd` advertises in one; in the other, Debian's `avahi-browse` (with
//! its own `avahi-daemon` on a private D-Bus) and our `usbip list
//! --discover` find it, with the TXT records it should have, and find
//! nothing of the daemons told not to advertise.
//!
//! Needs root, iproute2, avahi-daemon, avahi-utils and dbus: a skip outside
//! CI without them, a failure under `CI=true`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use usbwire_tests::kernel::on_ci;
use usbwire_tests::netns::{Netns, Network};

/// How long a daemon may take to be ready, or a browser to report what
/// it is waiting for. Generous: the machine may be busy with qemu guests.
const LIMIT: Duration = Duration::from_secs(30);

const SCHEMA: &str = include_str!("../../../schema/usbip-discover.schema.json");

/// A child process, killed and reaped on drop (also on panic).
struct Proc {
    child: Child,
    what: &'static str,
}

impl Proc {
    fn spawn(mut command: Command, what: &'static str) -> Proc {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc { child, what }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + LIMIT;
        // Each turn polls once; the deadline bounds the turns.
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not exit within {LIMIT:?} of SIGTERM", self.what);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of a child's output, as they come, on a channel.
fn lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded by [`LIMIT`]) for the first line that `wanted` accepts,
/// and gives it with every line seen before it.
fn wait_for_line(
    rx: &mpsc::Receiver<String>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + LIMIT;
    let mut seen = Vec::new();
    // Each turn takes one line; the deadline bounds the wait.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if wanted(&line) => return (line, seen),
            Ok(line) => seen.push(line),
            Err(e) => panic!("no {what} within {LIMIT:?} ({e}); lines so far: {seen:#?}"),
        }
    }
}

/// The programs this test runs, or why it cannot.
fn tools_present() -> Result<(), String> {
    for tool in ["avahi-daemon", "avahi-browse", "dbus-daemon"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).exists();
        if !found {
            return Err(format!(
                "{tool} (apt-get install avahi-daemon avahi-utils dbus)"
            ));
        }
    }
    Ok(())
}

/// A private system bus and an avahi-daemon on it, inside `ns`. The
/// daemon runs as root with no chroot and its own `/run` (a tmpfs in the
/// mount namespace `ip netns exec` makes), so the host's avahi, D-Bus and
/// their files are never touched.
struct Avahi {
    bus: String,
    // Declared before the bus: dropped (killed) first.
    _daemon: Proc,
    _dbus: Proc,
}

impl Avahi {
    fn start(ns: &Netns, dir: &Path) -> Avahi {
        let socket = dir.join("system_bus_socket");
        let bus_conf = dir.join("bus.conf");
        std::fs::write(
            &bus_conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .unwrap();
        let mut dbus = ns.command("dbus-daemon");
        dbus.arg(format!("--config-file={}", bus_conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut dbus = Proc::spawn(dbus, "dbus-daemon");
        let address = lines(dbus.child.stdout.take().unwrap());
        let (bus, _) = wait_for_line(&address, "D-Bus address from dbus-daemon", |l| {
            l.starts_with("unix:")
        });

        let avahi_conf = dir.join("avahi-daemon.conf");
        // Publishing off: it only browses, and its host name can then
        // never conflict with the server's.
        std::fs::write(
            &avahi_conf,
            "[server]\nhost-name=uw-browser\nuse-ipv4=yes\nuse-ipv6=yes\n\
             allow-interfaces=uw0\nenable-dbus=yes\n\
             [wide-area]\nenable-wide-area=no\n\
             [publish]\ndisable-publishing=yes\n",
        )
        .unwrap();
        let mut daemon = ns.command("sh");
        daemon
            .arg("-c")
            .arg(
                "mount -t tmpfs tmpfs /run && mkdir -p /run/avahi-daemon && \
                 exec avahi-daemon -f \"$1\" --no-drop-root --no-chroot --no-rlimits --no-proc-title",
            )
            .arg("sh")
            .arg(&avahi_conf)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut daemon = Proc::spawn(daemon, "avahi-daemon");
        let log = lines(daemon.child.stderr.take().unwrap());
        wait_for_line(&log, "avahi-daemon start-up", |l| {
            l.starts_with("Server startup complete")
        });
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in log {});
        Avahi {
            bus,
            _daemon: daemon,
            _dbus: dbus,
        }
    }

    /// `avahi-browse ARGS _usbip._tcp` in `ns`, on this bus.
    fn browse(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut c = ns.command("avahi-browse");
        c.args(args)
            .arg("_usbip._tcp")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
            .stdin(Stdio::null());
        c
    }
}

/// A certificate and key made by `usbip cert new`, and its fingerprint.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let out = dir.join(name);
    let made = Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["cert", "new", "--name", name, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let fp = String::from_utf8(made.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 fingerprint: ").map(String::from))
        .expect("usbip cert new prints the fingerprint");
    (out.join("cert.pem"), out.join("key.pem"), fp)
}

/// `usbipd` in `ns` on an ephemeral port (all IPv4 addresses), exporting
/// the devices of `config`; returns with the port once it serves.
fn usbipd(ns: &Netns, config: &Path, extra: &[&str], log: &Path) -> (Proc, u16) {
    let mut c = ns.command(env!("CARGO_BIN_EXE_usbipd"));
    c.args([
        "-4",
        "-t",
        "0",
        "--no-control",
        "--ready-fd",
        "1",
        "--config",
    ])
    .arg(config)
    .args(extra)
    .env("USBWIRE_LOG", "debug")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(log).unwrap());
    let mut p = Proc::spawn(c, "usbipd");
    let ready = lines(p.child.stdout.take().unwrap());
    let (line, _) = wait_for_line(&ready, "ready line from usbipd", |_| true);
    let port = line
        .split_whitespace()
        .next()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("usbipd's ready line {line:?} names no address"))
        .port();
    // Keep its stdout open and drained.
    std::thread::spawn(move || for _ in ready {});
    (p, port)
}

/// `usbip list --discover` in `ns`, with `args`; its stdout. It browses
/// for its default window, the same for the positive and negative checks.
fn discover(ns: &Netns, args: &[&str]) -> String {
    let started = Instant::now();
    let out = ns
        .command(env!("CARGO_BIN_EXE_usbip"))
        .args(["list", "--discover"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        started.elapsed() < LIMIT,
        "usbip list --discover took {:?}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "usbip list --discover {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn avahi_and_usbip_discover_the_advertised_server_only() {
    let Some(net) = Network::require(2) else {
        return;
    };
    if let Err(missing) = tools_present() {
        if on_ci() {
            panic!("discovery test prerequisites missing on CI (CI=true): {missing}");
        }
        eprintln!("SKIPPED: needs {missing} (set CI=true to make this a failure)");
        return;
    }
    let started = Instant::now();
    let (server, browser) = (net.ns(0), net.ns(1));
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let avahi = Avahi::start(browser, dir);
    // Browsing from before the server starts: every event comes as it happens.
    let mut watch = avahi.browse(browser, &["-rp"]);
    watch.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut watch = Proc::spawn(watch, "avahi-browse -rp");
    let avahi_events = lines(watch.child.stdout.take().unwrap());

    let (server_cert, server_key, server_fp) = certificate(dir, "server");
    let (client_cert, client_key, client_fp) = certificate(dir, "client");
    let devices = dir.join("devices.toml");
    std::fs::write(
        &devices,
        "[[device]]\nkind = \"test\"\n[[device]]\nkind = \"test\"\n[[device]]\nkind = \"keyboard\"\n",
    )
    .unwrap();
    let unadvertised = dir.join("unadvertised.toml");
    std::fs::write(
        &unadvertised,
        "[discovery]\nadvertise = false\n[[device]]\nkind = \"test\"\n",
    )
    .unwrap();
    let instance = format!("uw-discovery-{}", std::process::id());
    let (mut advertised, port) = usbipd(
        server,
        &devices,
        &[
            "--advertise-name",
            &instance,
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--tls-client-fingerprint",
            &client_fp,
        ],
        &dir.join("usbipd-advertised.log"),
    );
    // Switched off by the flag and by the config key: if either were
    // advertised, it would be under the host's name on its own port.
    let (_flag_off, flag_off_port) = usbipd(
        server,
        &unadvertised,
        &["--no-advertise"],
        &dir.join("usbipd-flag-off.log"),
    );
    let (_config_off, config_off_port) = usbipd(
        server,
        &unadvertised,
        &[],
        &dir.join("usbipd-config-off.log"),
    );

    // 1. avahi resolves our server, TXT records and all.
    let (resolved, before) =
        wait_for_line(&avahi_events, "avahi-browse resolving the server", |l| {
            l.starts_with("=;") && l.contains(";IPv4;")
        });
    let fields: Vec<&str> = resolved.split(';').collect();
    assert_eq!(fields[3], instance, "{resolved}");
    assert_eq!(fields[4], "_usbip._tcp", "{resolved}");
    assert_eq!(fields[7], server.addr().to_string(), "{resolved}");
    assert_eq!(fields[8], port.to_string(), "{resolved}");
    for txt in [
        "\"txtvers=1\"".to_string(),
        "\"proto=1.1.1\"".into(),
        "\"tls=required\"".into(),
        format!("\"fp={server_fp}\""),
        "\"devices=3\"".into(),
    ] {
        assert!(fields[9].contains(&txt), "{txt} missing from {resolved}");
    }

    // 2. Our browser finds it and lists its devices: without TLS options
    // it says why it cannot (naming the advertised fingerprint)...
    let text = discover(browser, &[]);
    assert!(
        text.starts_with(&format!(
            "Server \"{instance}\" at {}:{port} (devices=3 fp={server_fp} proto=1.1.1 tls=required txtvers=1)\n",
            server.addr()
        )),
        "{text}"
    );
    assert!(text.contains("error: TLS required"), "{text}");
    assert!(text.contains(&server_fp), "{text}");
    // ...and with them, lists every device, as the schema says.
    let json = discover(
        browser,
        &[
            "--json",
            "--tls-cert",
            client_cert.to_str().unwrap(),
            "--tls-key",
            client_key.to_str().unwrap(),
            "--tls-fingerprint",
            &server_fp,
        ],
    );
    let found: Value = serde_json::from_str(&json).unwrap();
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&found)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{found} breaks the schema: {errors:#?}");
    // 3. Only the advertised daemon: the other two are not there.
    let servers = found.as_array().unwrap();
    assert_eq!(servers.len(), 1, "{found}");
    let s = &servers[0];
    assert_eq!(s["instance"], instance.as_str());
    assert_eq!(s["port"], port);
    assert_eq!(s["addresses"][0], server.addr().to_string());
    assert_eq!(s["txt"]["fp"], server_fp.as_str());
    assert_eq!(s["error"], Value::Null, "{s}");
    let busids: Vec<&str> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["busid"].as_str().unwrap())
        .collect();
    assert_eq!(busids, ["1-1", "1-2", "1-3"], "{s}");

    // A server that goes away says goodbye: avahi drops it at once.
    advertised.terminate();
    let (removed, during) = wait_for_line(&avahi_events, "avahi-browse seeing the goodbye", |l| {
        l.starts_with("-;") && l.contains(";IPv4;")
    });
    assert!(removed.contains(&format!(";{instance};")), "{removed}");
    // Over all that time, avahi never saw another _usbip._tcp instance.
    for line in before.iter().chain(&during) {
        let instance_field = line.split(';').nth(3).unwrap_or("");
        assert!(
            line.starts_with(['+', '=', '-']) && instance_field == instance,
            "unexpected avahi-browse line {line:?} (the unadvertised daemons \
             listen on ports {flag_off_port} and {config_off_port})"
        );
    }
    eprintln!("discovery test ran in {:?}", started.elapsed());
}

/// What the browser in [`a_changed_device_count_is_announced`] saw.
#[derive(Debug, PartialEq)]
enum Seen {
    Devices(String),
    Removed,
}

#[test]
fn a_changed_device_count_is_announced() {
    use mdns_sd::{ServiceDaemon, ServiceEvent};
    use usbwire_cli::discovery::{Advertiser, TlsMode, Txt, SERVICE_TYPE};

    let Some(net) = Network::require(2) else {
        return;
    };
    let instance = format!("uw-count-{}", std::process::id());
    let (server, browser) = (net.ns(0).clone(), net.ns(1).clone());

    // The advertiser, in the server's namespace: each count sent is
    // re-announced; `None` (or the test gone) withdraws it.
    let (counts, to_announce) = mpsc::channel::<Option<usize>>();
    let name = instance.clone();
    let advertiser = std::thread::spawn(move || {
        server.enter().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let txt = Txt {
            tls: TlsMode::Off,
            fingerprint: None,
            devices: 1,
        };
        let listening = ["0.0.0.0:3240".parse().unwrap()];
        let mut advertiser = Advertiser::start(&name, &listening, txt)
            .unwrap()
            .expect("a listener on 0.0.0.0 is advertised");
        while let Ok(Some(n)) = to_announce.recv() {
            advertiser.set_devices(n);
        }
        runtime.block_on(advertiser.stop());
    });

    // The browser, in the other namespace: what it sees of our instance.
    let (seen_tx, seen) = mpsc::channel::<Seen>();
    let (daemon_tx, daemon) = mpsc::channel::<ServiceDaemon>();
    let wanted = instance.clone();
    let browsing = std::thread::spawn(move || {
        browser.enter().unwrap();
        let daemon = ServiceDaemon::new().unwrap();
        let events = daemon.browse(SERVICE_TYPE).unwrap();
        daemon_tx.send(daemon.clone()).unwrap();
        // Each turn forwards one event; the test stopping the browse (or
        // gone), or LIMIT without an event, ends the loop.
        while let Ok(event) = events.recv_timeout(LIMIT) {
            let sent = match event {
                ServiceEvent::SearchStopped(_) => break,
                ServiceEvent::ServiceResolved(s) if s.fullname.starts_with(&wanted) => seen_tx
                    .send(Seen::Devices(
                        s.get_property_val_str("devices").unwrap_or("").into(),
                    )),
                ServiceEvent::ServiceRemoved(_, fullname) if fullname.starts_with(&wanted) => {
                    seen_tx.send(Seen::Removed)
                }
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = daemon.shutdown();
    });

    let started = Instant::now();
    let daemon = daemon.recv_timeout(LIMIT).expect("the browser started");
    let next = |what: &str| -> Seen {
        let got = seen
            .recv_timeout(LIMIT)
            .unwrap_or_else(|e| panic!("the browser saw no {what} within {LIMIT:?}: {e}"));
        eprintln!("{:?}: {what}: {got:?}", started.elapsed());
        got
    };
    assert_eq!(next("first announcement"), Seen::Devices("1".into()));
    counts.send(Some(3)).unwrap();
    // The old record may be resolved again before the new one arrives.
    let mut update = next("re-announcement");
    while update == Seen::Devices("1".into()) {
        update = next("re-announcement");
    }
    assert_eq!(update, Seen::Devices("3".into()));
    counts.send(None).unwrap();
    advertiser.join().unwrap();
    let mut goodbye = next("goodbye");
    while goodbye == Seen::Devices("3".into()) {
        goodbye = next("goodbye");
    }
    assert_eq!(goodbye, Seen::Removed);
    daemon.stop_browse(SERVICE_TYPE).unwrap();
    browsing.join().unwrap();
    eprintln!("device count test ran in {:?}", started.elapsed());
}
