//! The servers under test, each a child process: usbwire's `usbipd` and
//! this binary re-executed as the `usbip` crate's server. Each binds an
//! ephemeral port on 127.0.0.1 and prints its address on stdout once it
//! serves; nothing guesses a port or polls one.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct ServerProc {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Option<Child>,
    // Held open so that the server's stdout never becomes a broken pipe.
    _stdout: Option<BufReader<ChildStdout>>,
    log: PathBuf,
}

/// Finds `usbipd` next to this binary; if it is missing and we run under
/// cargo (`cargo run`), builds it with the same profile first.
pub fn find_usbipd(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("--usbipd {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("the bench binary has no parent directory")?
        .to_path_buf();
    let candidate = dir.join("usbipd");
    if candidate.is_file() {
        return Ok(candidate);
    }
    let hint = "build it first: cargo build --release --bins \
                (then run ./target/release/usbwire-bench), or pass --usbipd PATH";
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        eprintln!(
            "usbwire-bench: {} not found; building it with cargo ({} profile)",
            candidate.display(),
            if release { "release" } else { "dev" }
        );
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "usbwire-cli", "--bin", "usbipd"]);
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() && candidate.is_file() => return Ok(candidate),
            Ok(s) => return Err(format!("building usbipd failed ({s}); {hint}")),
            Err(e) => return Err(format!("cannot run cargo to build usbipd: {e}; {hint}")),
        }
    }
    Err(format!("{} not found; {hint}", candidate.display()))
}

impl ServerProc {
    /// `usbipd --config FILE --listen 127.0.0.1 -t 0 --ready-fd 1`, logging
    /// to `log`.
    pub fn usbipd(exe: &Path, config: &Path, log: &Path) -> Result<ServerProc, String> {
        Self::usbipd_named("usbwire", exe, config, log)
    }

    /// [`ServerProc::usbipd`], under another name in the results.
    pub fn usbipd_named(
        name: &'static str,
        exe: &Path,
        config: &Path,
        log: &Path,
    ) -> Result<ServerProc, String> {
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1", "-t", "0", "--ready-fd", "1"])
            // Per-connection log lines only; nothing per URB either way.
            .env("USBWIRE_LOG", "warn");
        Self::spawn(name, cmd, log)
    }

    /// This binary as the `usbip` crate's server with `devices` devices.
    pub fn usbip_crate(devices: usize, log: &Path) -> Result<ServerProc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "--serve-usbip-crate",
            "--crate-devices",
            &devices.to_string(),
        ]);
        Self::spawn("usbip-crate", cmd, log)
    }

    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<ServerProc, String> {
        let err = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        // If the bench dies (Ctrl-C, a kill), its servers die with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the {name} server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut p = ServerProc {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Some(child),
            _stdout: None,
            log: log.to_path_buf(),
        };
        let (addr, stdout) = p.wait_ready(stdout, Duration::from_secs(30))?;
        p.addr = addr;
        p._stdout = Some(stdout);
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Until the server prints the address it serves on (its ready line),
    /// or exits (end of its stdout), or `limit` passes.
    fn wait_ready(
        &mut self,
        stdout: ChildStdout,
        limit: Duration,
    ) -> Result<(SocketAddr, BufReader<ChildStdout>), String> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let got = r.read_line(&mut line).map(|_| line);
            let _ = tx.send((got, r));
        });
        let (got, reader) = match rx.recv_timeout(limit) {
            Ok(v) => v,
            Err(_) => {
                self.terminate();
                return Err(format!(
                    "the {} server did not report its address within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
        };
        let line = got.map_err(|e| format!("reading the {} server's stdout: {e}", self.name))?;
        // The first address is 127.0.0.1:<port>, the only one it listens on.
        match line.split_whitespace().next().map(str::parse::<SocketAddr>) {
            Some(Ok(addr)) => Ok((addr, reader)),
            _ => {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                self.terminate();
                Err(format!(
                    "the {} server exited at start or printed no address ({line:?}, exit status {status:?}); its log:\n{}",
                    self.name,
                    self.log_tail()
                ))
            }
        }
    }

    /// Is it still running? (A crash during a workload shows here.)
    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Err(format!(
                    "the {} server died ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
        }
        Ok(())
    }

    /// SIGTERM, up to 5 s of grace, then SIGKILL.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.terminate();
    }
}
