//! `usbip attach --persist`: a supervisor process that keeps one remote
//! device attached (`usbwire_client::persist`), and what `usbip detach`
//! and `usbip port` need to know about it.
//!
//! Without `--foreground` the command starts itself again detached
//! (`setsid`, stdin/stdout to /dev/null, stderr to a log file next to the
//! state file) and waits on a pipe for the first attempt's outcome: it
//! prints where the device went and exits 0, or exits 1 when the first
//! attempt failed for a permanent reason (no such device on the server,
//! vhci-hcd not loaded, not root, TLS refused). A first attempt that
//! failed otherwise (server unreachable) is retried in the background and
//! the command says so and exits 0.
//!
//! The supervisor records itself in
//! `/var/run/vhci_hcd/persist/<host>_<port>_<busid>.json`
//! ([`PersistRecord`]), rewritten at each transition; SIGTERM or SIGINT
//! stops it and leaves the device attached. `usbip detach -p N` stops the
//! supervisor of port N first, waits for it to exit and then detaches, so
//! it cannot attach again behind the detach's back.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use usbwire_client::persist::{
    supervise, PersistRecord, PersistState, SuperviseOptions, Supervised, VhciAttach,
};
use usbwire_client::{TlsClientConfig, Vhci};

/// How long `usbip attach --persist` waits for its supervisor's first
/// attempt: far more than one bounded attempt takes.
const FIRST_ATTEMPT_LIMIT: Duration = Duration::from_secs(60);
/// How long `usbip detach` waits for a supervisor to exit after SIGTERM:
/// more than an attempt's hand-over, which a stop waits for.
const STOP_LIMIT: Duration = Duration::from_secs(30);

/// What `usbip attach --persist` was given.
pub struct PersistAttach {
    pub vhci: Vhci,
    pub host: String,
    pub tcp_port: u16,
    pub busid: String,
    pub tls: Option<TlsClientConfig>,
    /// The pipe to report the first attempt's outcome on (set by the
    /// detaching parent).
    pub ready_fd: Option<i32>,
}

/// `usbip attach --persist` without `--foreground`: starts the supervisor
/// detached and reports its first attempt.
pub fn spawn_detached(vhci: &Vhci, host: &str, tcp_port: u16, busid: &str) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    let log = log_path(vhci, host, tcp_port, busid);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let tx_raw = tx.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .arg("--ready-fd")
        .arg(tx_raw.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file);
    // SAFETY: between fork and exec only async-signal-safe calls:
    // setsid(2) and fcntl(2).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            let fd = std::os::fd::BorrowedFd::borrow_raw(tx_raw);
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )?;
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the supervisor: {e}"))?;
    drop(tx);
    let pid = child.id();
    // Not waited for: it outlives this command (init adopts it).
    drop(child);
    let line = read_report(rx, FIRST_ATTEMPT_LIMIT)
        .map_err(|e| format!("{e} (supervisor pid {pid}; log: {})", log.display()))?;
    match line.split_once(' ') {
        Some(("attached", port)) => {
            eprintln!(
                "usbip: info: {busid} from {host} attached on port {port}; \
                 kept attached by pid {pid} (usbip detach -p {port} stops it)"
            );
            Ok(())
        }
        Some(("retrying", why)) => {
            eprintln!(
                "usbip: warning: {busid} from {host} not attached yet ({why}); \
                 retrying in the background, pid {pid} (log: {})",
                log.display()
            );
            Ok(())
        }
        Some(("failed", why)) => Err(why.to_string()),
        _ => Err(format!(
            "the supervisor (pid {pid}) said {line:?}; log: {}",
            log.display()
        )),
    }
}

/// Reads one line from the supervisor, bounded in time; EOF first means it
/// died.
fn read_report(rx: OwnedFd, limit: Duration) -> Result<String, String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + limit;
    let mut file = std::fs::File::from(rx);
    let mut got = Vec::new();
    while !got.contains(&b'\n') && got.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no word from the supervisor within {limit:?}"));
        }
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot wait for the supervisor: {e}")),
        }
        let mut buf = [0u8; 512];
        match file.read(&mut buf) {
            Ok(0) => return Err("the supervisor exited before its first attempt ended".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("cannot read from the supervisor: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&got);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

fn log_path(vhci: &Vhci, host: &str, tcp_port: u16, busid: &str) -> PathBuf {
    let rec = PersistRecord::new(0, host, tcp_port, busid);
    rec.path(vhci).with_extension("log")
}

/// What the state-writing thread is told.
enum Event {
    State(PersistState),
}

/// `usbip attach --persist --foreground`: the supervisor itself.
pub async fn run_foreground(a: PersistAttach) -> Result<(), String> {
    let pid = std::process::id();
    let record = PersistRecord::new(pid, &a.host, a.tcp_port, &a.busid);
    let path = record.path(&a.vhci);
    if let Ok(other) = PersistRecord::read(&path) {
        if other.pid != pid && other.alive() {
            let how = match other.port.or(other.last_port) {
                Some(p) => format!("usbip detach -p {p} stops it"),
                None => format!("kill {} stops it", other.pid),
            };
            let msg = format!(
                "{} from {} is already kept attached by pid {} ({how})",
                a.busid, a.host, other.pid
            );
            report_ready(a.ready_fd, &format!("failed {msg}"));
            return Err(msg);
        }
    }
    record
        .write(&a.vhci)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
    });

    // The state file, the first-attempt report and systemd's status are
    // written on their own thread: file I/O stays off the runtime.
    let (tx, rx) = mpsc::channel::<Event>();
    let vhci = a.vhci.clone();
    let ready_fd = a.ready_fd;
    let writer = std::thread::spawn(move || write_states(rx, record, vhci, ready_fd));

    let mut attach = VhciAttach::new(a.vhci.clone(), &a.host, a.tcp_port, &a.busid);
    attach.tls = a.tls;
    let outcome = supervise(&mut attach, SuperviseOptions::default(), stop_rx, |s| {
        let _ = tx.send(Event::State(s.clone()));
    })
    .await;
    drop(tx);
    signals.abort();
    let _ = writer.join();
    match outcome {
        Supervised::Stopped { session, port } => {
            // The device stays attached: `usbip detach` (or the kernel)
            // ends it; the session's watcher thread ends with it.
            drop(session);
            if let Some(port) = port {
                tracing::info!(port, "stopped; the device stays attached");
            }
            Ok(())
        }
        // Its state file is gone already (see write_states).
        Supervised::FirstAttemptFailed(e) => Err(e.message),
    }
}

fn report_ready(fd: Option<i32>, line: &str) {
    let Some(fd) = fd else { return };
    // SAFETY: the fd was passed to us by the parent for this one report
    // and is not used elsewhere; it is closed here.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = f.write_all(format!("{line}\n").as_bytes());
}

fn write_states(
    rx: mpsc::Receiver<Event>,
    mut record: PersistRecord,
    vhci: Vhci,
    mut ready_fd: Option<i32>,
) {
    let mut ready = false;
    let mut first_error: Option<String> = None;
    for Event::State(state) in rx {
        record.apply(&state, SystemTime::now());
        if let Err(e) = record.write(&vhci) {
            tracing::warn!("cannot write {}: {e}", record.path(&vhci).display());
        }
        let status = match &state {
            PersistState::Attached { port: Some(p), .. } => format!("attached on port {p}"),
            PersistState::Disconnected { reason } => format!("disconnected: {reason}"),
            s => s.name().to_string(),
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        if ready {
            continue;
        }
        let line = match &state {
            PersistState::Attached { port, .. } => Some(format!(
                "attached {}",
                port.map(|p| p.to_string()).unwrap_or_default()
            )),
            PersistState::Disconnected { reason } => {
                first_error = Some(reason.clone());
                None
            }
            PersistState::Waiting { .. } => Some(format!(
                "retrying {}",
                first_error.take().unwrap_or_default()
            )),
            PersistState::Stopped => Some(format!(
                "failed {}",
                first_error
                    .take()
                    .unwrap_or_else(|| "stopped before the first attempt ended".into())
            )),
            PersistState::Connecting { .. } => None,
        };
        if let Some(line) = line {
            ready = true;
            if line.starts_with("failed") {
                // Nothing is kept: gone before the command returns.
                let _ = std::fs::remove_file(record.path(&vhci));
            }
            report_ready(ready_fd.take(), &line);
            // systemd's start ends with the first attach, or with a first
            // attempt that failed only for now: a server away at boot must
            // not fail the unit, the supervisor is there to wait for it.
            if !line.starts_with("failed") {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// The supervisors whose process runs, with their state files.
pub fn live_supervisors(vhci: &Vhci) -> Vec<(PathBuf, PersistRecord)> {
    PersistRecord::read_all(vhci)
        .into_iter()
        .filter(|(_, r)| r.alive())
        .collect()
}

/// What `usbip detach -p PORT` did about supervisors.
#[derive(Debug, Default)]
pub struct Stopped {
    /// Ports the stopped supervisors ended up on (still attached).
    pub ports: Vec<u32>,
    /// Their pids.
    pub pids: Vec<u32>,
}

/// Stops, for good, every supervisor keeping `port` (on it now, or last on
/// it and re-attaching): SIGTERM, then waits for its exit (bounded), and
/// removes its state file. Returns the ports they left attached, which
/// the caller detaches: no supervisor is left to attach them again.
pub fn stop_supervisors_of(vhci: &Vhci, port: u32) -> Result<Stopped, String> {
    let mut out = Stopped::default();
    for (path, rec) in live_supervisors(vhci) {
        let keeps = rec.port == Some(port) || (rec.port.is_none() && rec.last_port == Some(port));
        if !keeps {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(rec.pid as i32);
        match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(format!(
                    "cannot stop the supervisor of port {port} (pid {}): {e}",
                    rec.pid
                ))
            }
        }
        // Not our child: no exit status to wait on, so its pid is watched.
        let deadline = Instant::now() + STOP_LIMIT;
        while rec.alive() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the supervisor of port {port} (pid {}) did not exit within {STOP_LIMIT:?}",
                    rec.pid
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its last word: the port it left attached, if any.
        if let Some(p) = PersistRecord::read(&path).ok().and_then(|r| r.port) {
            out.ports.push(p);
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("log"));
        out.pids.push(rec.pid);
    }
    Ok(out)
}

/// `usbip port --json`'s `persist` object.
pub fn persist_json(r: &PersistRecord) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}
