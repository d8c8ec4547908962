//! `usbip reserve`, `usbip release` and `usbip attach --fleet`: a client's
//! side of fleet reservations (crates/fleet's `reserve` module).
//!
//! A reservation lives as long as a holder process keeps its lease alive.
//! `reserve` makes the reservation itself, then (unless `--foreground`)
//! starts a detached holder (`usbip reserve --hold NAME`, its own process
//! group) that keeps the lease alive and revokes it on SIGTERM, and
//! returns. The local record (`$USBWIRE_RESERVATION_DIR`, default
//! /run/usbwire/reservations, one JSON file per device) holds the lease,
//! the token and the holder's pid, for `attach --fleet` and `release`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use usbwire_fleet::reserve::{Fleet, ReserveError, Reserved, Want};
use usbwire_proto::ImportToken;

/// Where local reservation records live unless the environment says.
pub const DEFAULT_DIR: &str = "/run/usbwire/reservations";
pub const DIR_ENV: &str = "USBWIRE_RESERVATION_DIR";

/// A reservation this client holds, as recorded locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReservation {
    pub name: String,
    pub endpoints: String,
    pub lease: i64,
    pub ttl: i64,
    /// The token (hex): the proof at import. Only in this file (mode 0600).
    pub token: String,
    pub holder: String,
    /// The holder process keeping the lease alive.
    pub pid: Option<u32>,
    pub address: String,
    pub busid: String,
}

impl LocalReservation {
    pub fn token(&self) -> Option<ImportToken> {
        ImportToken::from_hex(&self.token)
    }
}

pub fn dir() -> PathBuf {
    std::env::var_os(DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// A fleet name as a file name: `/` (as in `HOST/BUSID`) and `%` escaped.
fn record_path(dir: &Path, name: &str) -> PathBuf {
    let escaped = name.replace('%', "%25").replace('/', "%2F");
    dir.join(format!("{escaped}.json"))
}

pub fn load(dir: &Path, name: &str) -> Option<LocalReservation> {
    let text = std::fs::read_to_string(record_path(dir, name)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn store(dir: &Path, record: &LocalReservation) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = record_path(dir, &record.name);
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    file.write_all(
        serde_json::to_string_pretty(record)
            .expect("a record serializes")
            .as_bytes(),
    )
    .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

pub fn remove(dir: &Path, name: &str) {
    let _ = std::fs::remove_file(record_path(dir, name));
}

/// A failure with the process exit status it maps to (an errno for fleet
/// failures, so that scripts can tell EBUSY from EAGAIN).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub status: u8,
}

impl From<ReserveError> for Failure {
    fn from(e: ReserveError) -> Failure {
        Failure {
            status: u8::try_from(e.errno()).unwrap_or(1),
            message: e.to_string(),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { message, status: 1 }
    }
}

/// Who this client is in a reservation: its certificate with TLS, else
/// `--client-id` or `user@host`.
pub fn holder_identity(tls_cert: Option<&Path>, client_id: Option<&str>) -> Result<String, String> {
    if let Some(cert) = tls_cert {
        let f = usbwire_client::certificate_fingerprint(cert).map_err(|e| e.to_string())?;
        return Ok(usbwire_fleet::reserve::tls_holder(&f.to_string()));
    }
    if let Some(id) = client_id {
        return Ok(id.to_string());
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    Ok(format!("{user}@{}", host_name()))
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// What `reserve` prints.
pub fn describe(r: &LocalReservation, json: bool) -> String {
    if json {
        serde_json::json!({
            "name": r.name,
            "address": r.address,
            "busid": r.busid,
            "holder": r.holder,
            "lease": r.lease,
            "ttl": r.ttl,
            "pid": r.pid,
        })
        .to_string()
    } else {
        format!(
            "reserved {} (server {}, busid {}) for {}, lease {:x}, TTL {} s",
            r.name, r.address, r.busid, r.holder, r.lease, r.ttl
        )
    }
}

/// Makes a reservation and records it locally (without a holder yet).
pub async fn take(
    fleet: &Fleet,
    endpoints: &str,
    want: &Want,
    holder: &str,
    ttl: i64,
) -> Result<LocalReservation, Failure> {
    let Reserved {
        name,
        device,
        token,
        record,
    } = fleet.reserve(want, holder, &host_name(), ttl).await?;
    let local = LocalReservation {
        name,
        endpoints: endpoints.into(),
        lease: record.lease,
        ttl,
        token: token.to_hex(),
        holder: holder.into(),
        pid: None,
        address: device.address(),
        busid: device.busid,
    };
    if let Err(e) = store(&dir(), &local) {
        let _ = fleet.revoke(local.lease).await;
        return Err(e.into());
    }
    Ok(local)
}

/// Starts the detached holder of `local` and records its pid.
pub fn spawn_holder(mut local: LocalReservation) -> Result<LocalReservation, Failure> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let child = std::process::Command::new(exe)
        .args([
            "reserve",
            "--fleet",
            &local.endpoints,
            "--hold",
            &local.name,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the terminal's process group: a ^C meant for the shell
        // does not end the reservation.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the reservation's holder: {e}"))?;
    local.pid = Some(child.id());
    store(&dir(), &local)?;
    Ok(local)
}

/// The holder: keeps `name`'s lease alive until SIGTERM/SIGINT (then
/// revokes it and removes the local record) or until the lease is lost.
pub async fn hold(fleet: &Fleet, name: &str) -> Result<(), Failure> {
    let dir = dir();
    let Some(mut local) = load(&dir, name) else {
        return Err(format!("no local reservation of {name} in {}", dir.display()).into());
    };
    if local.pid != Some(std::process::id()) {
        local.pid = Some(std::process::id());
        store(&dir, &local)?;
    }
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    };
    let held = fleet.hold(name, local.lease, local.ttl, stop).await;
    if load(&dir, name).is_some_and(|r| r.lease == local.lease) {
        remove(&dir, name);
    }
    held.map_err(Into::into)
}

/// `usbip release`: stops the holder and revokes the lease (the local
/// record's; with `force`, whoever's).
pub async fn release(endpoints: Option<&str>, name: &str, force: bool) -> Result<String, Failure> {
    let dir = dir();
    match load(&dir, name) {
        Some(local) => {
            if let Some(pid) = local.pid {
                stop_holder(pid);
            }
            let fleet = Fleet::connect(endpoints.unwrap_or(&local.endpoints)).await?;
            fleet.revoke(local.lease).await?;
            remove(&dir, name);
            Ok(format!("released {name}"))
        }
        None if force => {
            let Some(endpoints) = endpoints else {
                return Err("release --force needs --fleet ENDPOINTS".to_string().into());
            };
            let fleet = Fleet::connect(endpoints).await?;
            let record = fleet.release_any(name).await?;
            Ok(format!(
                "released {name} (it was held by {})",
                record.holder
            ))
        }
        None => Err(format!(
            "this client holds no reservation of {name} (no record in {}); \
             `usbip release --force --fleet ENDPOINTS {name}` releases another holder's",
            dir.display()
        )
        .into()),
    }
}

/// SIGTERM to a holder, if that pid still is a `usbip` (not a recycled
/// pid).
fn stop_holder(pid: u32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let is_holder = cmdline.split(|&b| b == 0).any(|arg| arg == b"--hold");
    if is_holder {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_under_escaped_names() {
        let dir = tempfile::tempdir().unwrap();
        let r = LocalReservation {
            name: "lab-2/1-1".into(),
            endpoints: "10.0.0.1:2379".into(),
            lease: 7,
            ttl: 5,
            token: "00112233445566778899aabbccddeeff".into(),
            holder: "ci@host".into(),
            pid: None,
            address: "10.0.0.2:3240".into(),
            busid: "1-1".into(),
        };
        store(dir.path(), &r).unwrap();
        assert!(dir.path().join("lab-2%2F1-1.json").exists());
        assert_eq!(load(dir.path(), "lab-2/1-1"), Some(r.clone()));
        assert!(r.token().is_some());
        remove(dir.path(), "lab-2/1-1");
        assert_eq!(load(dir.path(), "lab-2/1-1"), None);
    }
}
