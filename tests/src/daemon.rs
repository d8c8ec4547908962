//! Our `usbipd` as a child process on 127.0.0.1, for tests that need the
//! real binary (kernel interop, restarts, SIGKILL).

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `usbipd`, killed on drop.
pub struct Usbipd {
    child: Option<Child>,
    pub port: u16,
    pub log: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
}

impl Usbipd {
    /// Starts `bin ARGS --listen 127.0.0.1 -t PORT` and waits until it accepts.
    pub fn start(bin: &Path, args: &[&str], port: u16, log_dir: &Path) -> Usbipd {
        let mut d = Usbipd {
            child: None,
            port,
            log: log_dir.join(format!("usbipd-{port}.log")),
            args: args.iter().map(|s| s.to_string()).collect(),
            bin: bin.to_path_buf(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("usbipd log file");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .args(["--listen", "127.0.0.1", "-t", &self.port.to_string()])
            .env("USBWIRE_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning usbipd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("usbipd exited early ({status}):\n{}", self.log_text());
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("usbipd did not start listening:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts it again with the same arguments and port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Usbipd {
    fn drop(&mut self) {
        self.kill();
    }
}
