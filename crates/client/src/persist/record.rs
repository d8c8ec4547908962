//! The state file of a supervisor (`usbip attach --persist`), next to the
//! C tool's port records: `/var/run/vhci_hcd/persist/<host>_<port>_<busid>.json`.
//! `usbip port` reads them to show which ports are kept and which devices
//! are being re-attached; `usbip detach` to find the supervisor to stop.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::PersistState;
use crate::vhci::{Vhci, STATE_DIR};

/// Where the state files are, relative to the root.
pub const PERSIST_DIR: &str = "persist";

/// How many recent transitions a state file keeps.
pub const MAX_TRANSITIONS: usize = 32;

/// The largest state file read back: a few KiB in practice.
const MAX_RECORD_BYTES: u64 = 256 * 1024;

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Seconds since the epoch, UTC, with milliseconds.
    pub at: epoch::Ms,
    pub state: String,
    /// The port when attached, the reason when disconnected, the next
    /// attempt when connecting or waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Milliseconds since the epoch, written as seconds with a fraction.
pub mod epoch {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Ms(pub u64);

    impl Serialize for Ms {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            (self.0 as f64 / 1000.0).serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for Ms {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ms, D::Error> {
            let secs = f64::deserialize(d)?;
            if !(0.0..=1e12).contains(&secs) {
                return Err(serde::de::Error::custom("time out of range"));
            }
            Ok(Ms((secs * 1000.0).round() as u64))
        }
    }
}

use epoch::Ms;

fn ms(t: SystemTime) -> Ms {
    Ms(t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64)
}

/// What a supervisor says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistRecord {
    pub pid: u32,
    pub host: String,
    /// The TCP port as the user gave it.
    pub tcp_port: u16,
    pub busid: String,
    /// The vhci-hcd port the device is on now.
    pub port: Option<u32>,
    /// The port it was on last (kept while re-attaching), so that
    /// `usbip detach -p` of that port finds the supervisor.
    pub last_port: Option<u32>,
    /// connecting, attached, disconnected, waiting or stopped.
    pub state: String,
    /// Attempts made since the supervisor started.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the current state began.
    pub since: Ms,
    /// The next attempt's time, while waiting.
    pub next_attempt_at: Option<Ms>,
    /// The most recent transitions, oldest first.
    pub transitions: Vec<Transition>,
}

impl PersistRecord {
    pub fn new(pid: u32, host: &str, tcp_port: u16, busid: &str) -> PersistRecord {
        PersistRecord {
            pid,
            host: host.to_string(),
            tcp_port,
            busid: busid.to_string(),
            port: None,
            last_port: None,
            state: "connecting".into(),
            attempts: 0,
            last_error: None,
            since: ms(SystemTime::now()),
            next_attempt_at: None,
            transitions: Vec::new(),
        }
    }

    /// Folds a state change in, at `now`.
    pub fn apply(&mut self, state: &PersistState, now: SystemTime) {
        let detail = match state {
            PersistState::Connecting { attempt } => {
                self.attempts = *attempt;
                self.next_attempt_at = None;
                Some(format!("attempt {attempt}"))
            }
            PersistState::Attached { port, .. } => {
                self.port = *port;
                if port.is_some() {
                    self.last_port = *port;
                }
                self.last_error = None;
                port.map(|p| format!("port {p}"))
            }
            PersistState::Disconnected { reason } => {
                self.port = None;
                self.last_error = Some(reason.clone());
                Some(reason.clone())
            }
            PersistState::Waiting { until, attempt } => {
                self.next_attempt_at = Some(ms(*until));
                Some(format!("attempt {attempt}"))
            }
            PersistState::Stopped => {
                self.next_attempt_at = None;
                None
            }
        };
        self.state = state.name().to_string();
        self.since = ms(now);
        self.transitions.push(Transition {
            at: self.since,
            state: self.state.clone(),
            detail,
        });
        if self.transitions.len() > MAX_TRANSITIONS {
            let extra = self.transitions.len() - MAX_TRANSITIONS;
            self.transitions.drain(..extra);
        }
    }

    /// The file name: the device's identity, so that one device has one
    /// supervisor.
    pub fn file_name(host: &str, tcp_port: u16, busid: &str) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("{}_{tcp_port}_{}.json", clean(host), clean(busid))
    }

    /// This record's file under `vhci`'s root.
    pub fn path(&self, vhci: &Vhci) -> PathBuf {
        persist_dir(vhci).join(Self::file_name(&self.host, self.tcp_port, &self.busid))
    }

    /// Writes the file whole (temporary file and rename), so that readers
    /// never see half of it.
    pub fn write(&self, vhci: &Vhci) -> io::Result<PathBuf> {
        let dir = persist_dir(vhci);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)?;
        let path = self.path(vhci);
        let tmp = dir.join(format!(".{}.tmp", self.pid));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        f.write_all(&text)?;
        drop(f);
        fs::rename(&tmp, &path)?;
        Ok(path)
    }

    pub fn read(path: &Path) -> io::Result<PersistRecord> {
        use std::io::Read;
        let mut text = Vec::new();
        fs::File::open(path)?
            .take(MAX_RECORD_BYTES)
            .read_to_end(&mut text)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Every readable record under `vhci`'s root, by file name.
    pub fn read_all(vhci: &Vhci) -> Vec<(PathBuf, PersistRecord)> {
        let mut out: Vec<(PathBuf, PersistRecord)> = fs::read_dir(persist_dir(vhci))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| PersistRecord::read(&p).ok().map(|r| (p, r)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Its process still runs: signal 0 reaches it and it is not a zombie
    /// (a supervisor's parent exits at once; whoever adopts it may be slow
    /// to reap it).
    pub fn alive(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        if pid <= 0
            || !matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Ok(()) | Err(nix::errno::Errno::EPERM)
            )
        {
            return false;
        }
        // /proc/PID/stat: "pid (comm) S ...", comm may hold anything.
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next())
                .is_some_and(|state| state != 'Z' && state != 'X'),
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }
}

/// `root/var/run/vhci_hcd/persist`.
pub fn persist_dir(vhci: &Vhci) -> PathBuf {
    vhci.root().join(STATE_DIR).join(PERSIST_DIR)
}
