//! How `usbipd` gets its listening sockets and says where it listens:
//! socket activation (the systemd protocol, from this test and from
//! Debian's `systemd-socket-activate`), `-t 0`, `--ready-fd` and sd_notify.
//! No test here guesses a port: each either owns its listener or reads the
//! port usbipd reports.

mod common;

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;
use nix::fcntl::OFlag;
use usbwire_tests::activation::Activated;
use usbwire_tests::daemon::{read_line, wait_exit, Usbipd};

const USBIPD: &str = env!("CARGO_BIN_EXE_usbipd");
const LIMIT: Duration = Duration::from_secs(60);

/// Our `usbip list -r HOST -t PORT`.
fn list(host: &str, port: u16) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["-t", &port.to_string(), "list", "-r", host])
        .output()
        .expect("running usbip")
}

/// The bus ids a `usbip list -r` printed (ours or the C tool's layout).
fn busids(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim_start().split_once(": ").map(|(b, _)| b))
        .filter(|b| b.starts_with("1-"))
        .map(str::to_string)
        .collect()
}

const DEMO: [&str; 4] = ["1-1", "1-2", "1-3", "1-4"];

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    match wait_exit(child, LIMIT).unwrap() {
        Some(s) => s,
        None => {
            let _ = child.kill();
            panic!("no exit within {LIMIT:?} of SIGTERM");
        }
    }
}

fn log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn port_zero_reports_one_ephemeral_port_and_serves_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("usbipd.log");
    let mut child = Command::new(USBIPD)
        .args(["--demo", "--no-control", "--listen", "127.0.0.1"])
        .args(["--listen", "::1", "-t", "0", "--ready-fd", "1"])
        .stdout(Stdio::piped())
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let line = read_line(&mut stdout, LIMIT)
        .unwrap_or_else(|e| panic!("no ready line ({e}):\n{}", log(&log_path)));
    let addrs: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|a| a.parse().unwrap())
        .collect();
    let v4 = addrs[0];
    assert_eq!(v4.ip(), Ipv4Addr::LOCALHOST, "{line}");
    assert_ne!(v4.port(), 0, "{line}");
    if addrs.len() == 2 {
        assert_eq!(addrs[1], SocketAddr::from((Ipv6Addr::LOCALHOST, v4.port())));
    } else {
        // No IPv6 loopback on this machine: usbipd said so and serves IPv4.
        assert!(log(&log_path).contains("cannot listen on [::1]:"));
    }
    assert!(
        log(&log_path).contains(&format!("ready: listening on {}", addrs[0])),
        "{}",
        log(&log_path)
    );
    for a in &addrs {
        let out = list(&a.ip().to_string(), a.port());
        assert_eq!(busids(&out), DEMO, "{a}: {out:?}");
    }
    assert!(sigterm_and_wait(&mut child).success());
    // One line and nothing else, to the end.
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn two_inherited_listeners_ipv4_and_ipv6_both_serve_and_the_ready_fd_names_them() {
    let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let v6 = match TcpListener::bind((Ipv6Addr::LOCALHOST, 0)) {
        Ok(l) => l,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: no IPv6 loopback here ({e})");
            return;
        }
        Err(e) => panic!("binding [::1]:0: {e} (CI=true makes this a failure)"),
    };
    let (a4, a6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("usbipd.log");
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    let mut child = Activated::new(USBIPD)
        .args(["--demo", "--no-control", "--ready-fd", "5"])
        .env("USBWIRE_LOG", "info")
        .listener(&v4)
        .unwrap()
        .listener(&v6)
        .unwrap()
        .fd_names(&["v4", "v6"])
        .fd(&ready_w, 5)
        .unwrap()
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    drop(ready_w);
    let mut ready = File::from(ready_r);
    let line = read_line(&mut ready, LIMIT)
        .unwrap_or_else(|e| panic!("no ready line ({e}):\n{}", log(&log_path)));
    assert_eq!(line, format!("{a4} {a6}\n"));
    let text = log(&log_path);
    assert!(
        text.contains(&format!(
            "listening on {a4} (fd 3 \"v4\" from the service manager)"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "listening on {a6} (fd 4 \"v6\" from the service manager)"
        )),
        "{text}"
    );
    // Close-on-exec, as the protocol asks: nothing usbipd might start
    // inherits the sockets.
    let fdinfo = std::fs::read_to_string(format!("/proc/{}/fdinfo/3", child.id())).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_ne!(
        flags & OFlag::O_CLOEXEC.bits() as u32,
        0,
        "fd 3 is close-on-exec: {fdinfo}"
    );
    assert_eq!(busids(&list("127.0.0.1", a4.port())), DEMO);
    assert_eq!(busids(&list("::1", a6.port())), DEMO);
    assert!(sigterm_and_wait(&mut child).success());
}

#[test]
fn a_restart_keeps_the_port_and_a_client_that_connects_meanwhile_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Usbipd::start(Path::new(USBIPD), &["--demo", "--no-control"], dir.path());
    let port = d.port;
    assert_eq!(busids(&list("127.0.0.1", port)), DEMO);
    d.kill();
    // Nothing serves now, but the listener is the test's: this client's
    // connection waits in its backlog rather than being refused.
    let waiting = Command::new(env!("CARGO_BIN_EXE_usbip"))
        .args(["-t", &port.to_string(), "list", "-r", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.restart();
    assert_eq!(d.port, port);
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(busids(&out), DEMO, "{out:?}\n{}", d.log_text());
    assert_eq!(busids(&list("127.0.0.1", port)), DEMO);
    assert!(d.stop(), "{}", d.log_text());
}

#[test]
fn sd_notify_gets_ready_with_the_addresses_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(LIMIT)).unwrap();
    let log_path = dir.path().join("usbipd.log");
    let mut child = Command::new(USBIPD)
        .args(["--demo", "--no-control", "--listen", "127.0.0.1", "-t", "0"])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = notify
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", log(&log_path)));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = msg
        .lines()
        .find_map(|l| l.strip_prefix("STATUS=listening on "))
        .unwrap_or_else(|| panic!("{msg:?}"));
    assert!(msg.starts_with("READY=1\n"), "{msg:?}");
    let addr: SocketAddr = status.parse().unwrap();
    assert_eq!(addr.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(busids(&list("127.0.0.1", addr.port())), DEMO);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(wait_exit(&mut child, LIMIT).unwrap().unwrap().success());
}

/// `WatchdogSec=` in a unit: systemd sets WATCHDOG_USEC (and WATCHDOG_PID)
/// and restarts the service unless it pings `WATCHDOG=1` in time.
#[test]
fn with_watchdog_usec_set_usbipd_pings_the_watchdog_after_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(LIMIT)).unwrap();
    let log_path = dir.path().join("usbipd.log");
    let mut child = Command::new(USBIPD)
        .args(["--demo", "--no-control", "--listen", "127.0.0.1", "-t", "0"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .env_remove("WATCHDOG_PID")
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification ({e}):\n{}", log(&log_path)));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(recv().starts_with("READY=1\n"));
    // Two pings: the watchdog keeps going rather than pinging once.
    assert_eq!(recv(), "WATCHDOG=1\n");
    assert_eq!(recv(), "WATCHDOG=1\n");
    assert!(sigterm_and_wait(&mut child).success(), "{}", log(&log_path));
}

#[test]
fn options_that_bind_are_refused_with_inherited_sockets() {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let out = Activated::new(USBIPD)
        .args(["--demo", "--no-control", "-t", "3240"])
        .listener(&l)
        .unwrap()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "usbipd: error: the service manager passed 1 listening socket(s) (LISTEN_FDS); \
             -t, --listen, -4 and -6 choose sockets to bind, so leave them out"
        ),
        "{out:?}"
    );
}

#[test]
fn an_inherited_fd_that_is_not_a_tcp_listener_is_refused_by_name() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let out = Activated::new(USBIPD)
        .args(["--demo", "--no-control"])
        .listener(&a)
        .unwrap()
        .fd_names(&["control"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "usbipd: error: fd 3 (control) from the service manager is not a listening TCP socket: \
             its address family is AF_UNIX"
        ),
        "{out:?}"
    );
}

/// Debian's `systemd-socket-activate`, given the listener this test owns
/// (it passes sockets it inherits on to the program it starts), starts
/// usbipd on the first connection, and Debian's `usbip list -r` lists the
/// demo devices. Its own `-l` cannot bind port 0, so a listener the test
/// owns is the race-free way to give it a port on this machine's loopback
/// (the next test uses `-l` in a network namespace of its own).
#[test]
fn systemd_socket_activate_starts_usbipd_and_debian_usbip_lists_the_demo() {
    let Some(activate) = peer_binary("/usr/bin/systemd-socket-activate", "systemd") else {
        return;
    };
    let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("activate.log");
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let mut child = Activated::new(&activate)
        .args(["--fdname=usbipd", "-E", "USBWIRE_LOG=info", USBIPD])
        .args(["--demo", "--no-control"])
        .listener(&l)
        .unwrap()
        .stdout(Stdio::null())
        .stderr(File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    // Only the child holds the socket now: if usbipd fails to start, the
    // client's connection is reset instead of waiting in a backlog forever.
    drop(l);
    let out = Command::new(&c_usbip)
        .args(["--tcp-port", &port.to_string(), "list", "-r", "127.0.0.1"])
        .output()
        .unwrap();
    let text = log(&log_path);
    assert!(out.status.success(), "{out:?}\n{text}");
    assert_eq!(busids(&out), DEMO, "{out:?}\n{text}");
    assert!(
        text.contains("Received 1 descriptors via the environment."),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "listening on 127.0.0.1:{port} (fd 3 \"usbipd\" from the service manager)"
        )),
        "{text}"
    );
    assert!(sigterm_and_wait(&mut child).success(), "{}", log(&log_path));
}

/// The line from the issue, as written: `systemd-socket-activate -l
/// 127.0.0.1:3240 usbipd ...` binds the port itself, which is race-free only
/// where no one else can hold it: a network namespace this test creates
/// (`unshare --net`), whose loopback nothing else uses. Debian's `usbip list
/// -r` runs in the same namespace (`nsenter`).
#[test]
fn systemd_socket_activate_listens_on_3240_in_a_private_netns() {
    let Some(activate) = peer_binary("/usr/bin/systemd-socket-activate", "systemd") else {
        return;
    };
    let Some(c_usbip) = peer_binary("/usr/sbin/usbip", "usbip") else {
        return;
    };
    let Some(ip) = peer_binary("/usr/sbin/ip", "iproute2") else {
        return;
    };
    let script = format!(
        "{ip} link set lo up && exec {activate} -l 127.0.0.1:3240 -E USBWIRE_LOG=info {USBIPD} --demo --no-control",
        ip = ip.display(),
        activate = activate.display(),
    );
    let mut child = Command::new("unshare")
        .args(["--net", "--", "/bin/sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running unshare (util-linux)");
    let mut stderr = child.stderr.take().unwrap();
    // socket-activate says when it listens; until then a client would be
    // refused. The namespace is this child's: unshare and sh exec in place.
    let mut seen = String::new();
    let mut listening = false;
    for _ in 0..20 {
        match read_line(&mut stderr, LIMIT) {
            Ok(l) => {
                seen.push_str(&l);
                if seen.contains("Listening on 127.0.0.1:3240 as 3.") {
                    listening = true;
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                if seen.contains("unshare failed") && std::env::var("CI").as_deref() != Ok("true") {
                    eprintln!("SKIPPED: cannot create a network namespace here: {seen}");
                    return;
                }
                panic!("no \"Listening on\" from systemd-socket-activate ({e}):\n{seen}");
            }
        }
    }
    assert!(listening, "{seen}");
    let netns = format!("--net=/proc/{}/ns/net", child.id());
    let out = Command::new("nsenter")
        .args([netns.as_str(), "--"])
        .arg(&c_usbip)
        .args(["list", "-r", "127.0.0.1"])
        .output()
        .expect("running nsenter (util-linux)");
    assert!(out.status.success(), "{out:?}\n{seen}");
    assert_eq!(busids(&out), DEMO, "{out:?}");
    assert!(sigterm_and_wait(&mut child).success());
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    let rest = seen.clone() + &rest;
    assert!(
        rest.contains("listening on 127.0.0.1:3240 (fd 3 \"unknown\" from the service manager)"),
        "{rest}"
    );
}
