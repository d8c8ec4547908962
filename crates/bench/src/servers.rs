//! The servers under test, each a child process: usbwire's `usbipd` and
//! this binary re-executed as the `usbip` crate's server.

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProc {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

/// A port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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
    /// `usbipd --config FILE --listen 127.0.0.1 -t PORT`, logging to `log`.
    pub fn usbipd(exe: &Path, config: &Path, log: &Path) -> Result<ServerProc, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(config)
            .args(["--listen", "127.0.0.1", "-t", &port.to_string()])
            // Per-connection log lines only; nothing per URB either way.
            .env("USBWIRE_LOG", "warn");
        Self::spawn("usbwire", cmd, port, log)
    }

    /// This binary as the `usbip` crate's server with `devices` devices.
    pub fn usbip_crate(devices: usize, log: &Path) -> Result<ServerProc, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args([
            "--serve-usbip-crate",
            &port.to_string(),
            "--crate-devices",
            &devices.to_string(),
        ]);
        Self::spawn("usbip-crate", cmd, port, log)
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        port: u16,
        log: &Path,
    ) -> Result<ServerProc, String> {
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // If the bench dies (Ctrl-C, a kill), its servers die with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the {name} server: {e}"))?;
        let mut p = ServerProc {
            name,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            log: log.to_path_buf(),
        };
        p.wait_ready(Duration::from_secs(30))?;
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

    /// Until the port accepts a connection, or the child exits, or `limit`.
    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "the {} server exited at start ({status}); its log:\n{}",
                        self.name,
                        self.log_tail()
                    ));
                }
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the {} server did not listen on {} within {limit:?}; its log:\n{}",
            self.name,
            self.addr,
            self.log_tail()
        ))
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
