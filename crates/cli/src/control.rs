//! The control socket between `usbip bind/unbind` and a running `usbipd`.
//!
//! A Unix stream socket (default [`DEFAULT_SOCKET`]), mode 0600 (root
//! only), or 0660 with `--control-group GROUP`. One JSON request per line,
//! one JSON response per line:
//!
//! ```text
//! {"op":"bind","busid":"1-1","force":false}
//! {"ok":true,"message":"bind device on busid 1-1: complete","warnings":[]}
//! {"op":"unbind","busid":"1-1","force":false}
//! {"ok":false,"errno":"EBUSY","message":"1-1 is imported by 10.0.0.2:40986 right now (EBUSY); ..."}
//! {"op":"list"}
//! {"ok":true,"message":"","bindings":[{"busid":"1-1","vendor":1317,"product":42149,"state":"exported"}]}
//! {"op":"state"}
//! {"ok":true,"message":"","state":{"schema":1,"devices":[...]}}
//! ```
//!
//! The `state` object is what `usbip state --json` prints; its shape is
//! `schema/usbip-state.schema.json`, and changes to it only add fields.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};
use usbwire_host::{ExportRefusal, ExportReservation, ExportTable, Manager, Unexported};
use usbwire_proto::DeviceInfo;
use usbwire_server::{Backend, Registry, RegistryError, Reservation, WaitBounds};

/// Where `usbipd` listens and `usbip bind` connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/usbwire/usbipd.sock";
/// Environment variable that overrides [`DEFAULT_SOCKET`] for `usbip`.
pub const SOCKET_ENV: &str = "USBWIRE_CONTROL_SOCKET";
/// Longest request line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Bind {
        busid: String,
        #[serde(default)]
        force: bool,
        /// Bind to the kernel's usbip-host instead of usbfs (`usbip bind
        /// --kernel`); left out of the line when false, as before it existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        kernel: bool,
    },
    Unbind {
        busid: String,
        /// End the device's import if a client holds it.
        #[serde(default)]
        force: bool,
    },
    List,
    /// Every exported device and its import: `usbip state`.
    State,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingEntry {
    pub busid: String,
    pub vendor: u16,
    pub product: u16,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<BindingEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DaemonState>,
}

/// Version of the `state` object's shape, raised only when a field changes
/// meaning or goes away.
pub const STATE_SCHEMA: u32 = 1;

/// What `usbip state --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonState {
    pub schema: u32,
    pub devices: Vec<ExportedDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedDevice {
    pub busid: String,
    /// Four hex digits, as `usbip list --json` writes them.
    pub vendor_id: String,
    pub product_id: String,
    pub speed: String,
    /// `None` while nobody imports the device.
    pub import: Option<ImportEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportEntry {
    /// `ADDRESS:PORT` of the client's connection.
    pub client: String,
    /// `imported`, or `releasing` while the device is reset after its
    /// connection ended.
    pub state: String,
    /// When the import began, in seconds since the Unix epoch.
    pub since_unix: u64,
    /// The verified certificate of a TLS client; `None` in plaintext or
    /// when the client showed no certificate.
    pub tls: Option<TlsClient>,
    /// `None` when a kernel driver (usbip-host, usbip-vudc) carries the
    /// URBs: usbipd does not see them.
    pub traffic: Option<TrafficEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsClient {
    /// SHA-256 of the certificate, as `usbip cert` prints it.
    pub fingerprint: String,
    pub subject: String,
    /// Whether the client CA vouched for the subject (not for a
    /// certificate accepted by its pinned fingerprint).
    pub subject_verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficEntry {
    pub urbs: u64,
    /// USB/IP bytes read from and written to the client, headers included.
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

/// The registry as `usbip state` shows it.
pub fn daemon_state(registry: &Registry) -> DaemonState {
    let devices = registry
        .state()
        .into_iter()
        .map(|d| ExportedDevice {
            busid: d.info.busid.to_string(),
            vendor_id: format!("{:04x}", d.info.id_vendor),
            product_id: format!("{:04x}", d.info.id_product),
            speed: d.info.speed.describe().into(),
            import: d.import.map(|i| ImportEntry {
                client: i.client.to_string(),
                state: if i.releasing { "releasing" } else { "imported" }.into(),
                since_unix: i
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                tls: i.tls.map(|t| TlsClient {
                    fingerprint: t.fingerprint.to_string(),
                    subject: t.subject.to_string(),
                    subject_verified: t.subject_verified,
                }),
                traffic: i.traffic.map(|t| TrafficEntry {
                    urbs: t.urbs,
                    bytes_from_client: t.bytes_from_client,
                    bytes_to_client: t.bytes_to_client,
                }),
            }),
        })
        .collect();
    DaemonState {
        schema: STATE_SCHEMA,
        devices,
    }
}

/// The server's registry as the bind manager's export table: what the
/// manager binds is registered here, ready to import.
pub struct RegistryExports(pub Registry);

/// A registry reservation held for the bind manager.
struct ReservedSlot(Reservation);

impl ExportReservation for ReservedSlot {
    fn commit(self: Box<Self>, info: DeviceInfo, backend: Box<dyn Backend>) {
        self.0.commit(info, backend);
    }
}

impl RegistryExports {
    fn refusal(&self, e: RegistryError) -> ExportRefusal {
        match e {
            RegistryError::Exists(busid) => ExportRefusal::Exported {
                client: self.0.client_of(&busid),
                busid,
            },
            RegistryError::Busy(busid) => ExportRefusal::Changing { busid },
            RegistryError::NotFound(busid) => ExportRefusal::NotExported { busid },
            RegistryError::InUse { busid, client } => ExportRefusal::Imported { busid, client },
            RegistryError::Releasing { busid, client } => {
                ExportRefusal::Releasing { busid, client }
            }
            e @ RegistryError::BadBusid(_) => ExportRefusal::Other(e.to_string()),
        }
    }
}

impl ExportTable for RegistryExports {
    fn reserve(&self, busid: &str) -> Result<Box<dyn ExportReservation>, ExportRefusal> {
        match self.0.reserve(busid) {
            Ok(r) => Ok(Box::new(ReservedSlot(r))),
            Err(e) => Err(self.refusal(e)),
        }
    }

    fn remove(&self, busid: &str) -> Result<Box<dyn Backend>, ExportRefusal> {
        self.0.remove(busid).map_err(|e| self.refusal(e))
    }

    fn remove_when_free(&self, busid: &str, force: bool) -> Result<Unexported, ExportRefusal> {
        match self.0.remove_when_free(busid, force, WaitBounds::default()) {
            Ok(removed) => Ok(Unexported {
                backend: removed.backend,
                forced: removed.forced,
            }),
            Err(e) => Err(self.refusal(e)),
        }
    }

    fn is_imported(&self, busid: &str) -> Option<bool> {
        self.0
            .all()
            .into_iter()
            .find(|(d, _)| d.busid == busid)
            .map(|(_, imported)| imported)
    }
}

/// Runs one request against the manager (blocking: sysfs and ioctls).
pub fn handle(m: &Manager, req: Request) -> Response {
    match req {
        // Answered by `serve_one` from the registry, which the manager
        // does not show.
        Request::State => Response {
            errno: Some("EINVAL".into()),
            message: "state is answered by the control socket, not the bind manager".into(),
            ..Default::default()
        },
        Request::Bind {
            busid,
            force,
            kernel,
        } => match if kernel {
            m.bind_kernel(&busid, force)
        } else {
            m.bind(&busid, force)
        } {
            Ok(warnings) => Response {
                ok: true,
                message: format!("bind device on busid {busid}: complete"),
                warnings,
                ..Default::default()
            },
            Err(e) => Response {
                errno: Some(e.errno().into()),
                message: e.to_string(),
                ..Default::default()
            },
        },
        Request::Unbind { busid, force } => match m.unbind(&busid, force) {
            Ok(warnings) => Response {
                ok: true,
                message: format!("unbind device on busid {busid}: complete"),
                warnings,
                ..Default::default()
            },
            Err(e) => Response {
                errno: Some(e.errno().into()),
                message: e.to_string(),
                ..Default::default()
            },
        },
        Request::List => Response {
            ok: true,
            bindings: m
                .bindings()
                .into_iter()
                .map(|b| BindingEntry {
                    busid: b.busid,
                    vendor: b.vendor,
                    product: b.product,
                    state: b.state.into(),
                })
                .collect(),
            ..Default::default()
        },
    }
}

/// Creates the socket: its directory (0755), the socket with mode 0600, or
/// 0660 and group `group`. A stale socket file is replaced; a live one
/// (another usbipd) is an error.
pub fn listen(path: &Path, group: Option<&str>) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another usbipd", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created with no access for anyone but the owner, then opened up.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    let mode = if let Some(g) = group {
        let gid = group_id(g)?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A group's id: a number, or a name from `/etc/group`.
fn group_id(g: &str) -> io::Result<u32> {
    if let Ok(n) = g.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group")?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse().ok()?;
            (name == g).then_some(gid)
        })
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no group named {g}")))
}

/// Serves the control socket until the task is aborted.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    manager: Arc<Manager>,
    registry: Registry,
) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("control socket: {e}");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = manager.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, m, registry).await {
                debug!("control connection: {e}");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, m: Arc<Manager>, registry: Registry) -> io::Result<()> {
    let peer = stream.peer_cred().ok();
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_LINE as u64 * 16)).lines();
    while let Some(line) = lines.next_line().await? {
        if line.len() > MAX_LINE {
            break;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            // Read-only and quick (one lock of the registry): not logged,
            // so that a monitoring loop does not fill the log.
            Ok(Request::State) => Response {
                ok: true,
                state: Some(daemon_state(&registry)),
                ..Default::default()
            },
            Ok(req) => {
                info!(uid = peer.map(|p| p.uid()), "control request: {req:?}");
                let m = m.clone();
                tokio::task::spawn_blocking(move || handle(&m, req))
                    .await
                    .unwrap_or_else(|_| Response {
                        errno: Some("EIO".into()),
                        message: "the request failed inside usbipd".into(),
                        ..Default::default()
                    })
            }
            Err(e) => Response {
                errno: Some("EINVAL".into()),
                message: format!("bad request: {e}"),
                ..Default::default()
            },
        };
        let mut out = serde_json::to_vec(&resp).map_err(io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt as _;

/// The socket path `usbip` uses: `--control-socket`, then
/// `$USBWIRE_CONTROL_SOCKET`, then the default.
pub fn socket_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Sends one request and reads the response.
pub async fn request(path: &Path, req: &Request) -> io::Result<Response> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach usbipd on {}: {e} (is usbipd running, and are you root or in its control group?)",
                path.display()
            ),
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line).await?;
    let mut r = BufReader::new(s);
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_line(&mut resp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "usbipd did not answer"))??;
    serde_json::from_str(&resp).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// What usbipd has bound, for `usbip list -l` to mark exported devices.
/// No socket, no daemon, no permission or no answer within `wait` is an
/// empty list, silently: nothing is known to be exported.
pub async fn bindings_or_none(path: &Path, wait: Duration) -> Vec<BindingEntry> {
    match tokio::time::timeout(wait, request(path, &Request::List)).await {
        Ok(Ok(r)) if r.ok => r.bindings,
        Ok(Ok(r)) => {
            debug!("usbipd refused to list its bindings: {}", r.message);
            Vec::new()
        }
        Ok(Err(e)) => {
            debug!("no bindings from usbipd: {e}");
            Vec::new()
        }
        Err(_) => {
            debug!("usbipd did not list its bindings within {wait:?}");
            Vec::new()
        }
    }
}

/// `usbip bind -b BUSID [--force] [--kernel]`: prints the result like the
/// C tool; returns the process exit status.
pub async fn bind_command(socket: &Path, busid: &str, force: bool, kernel: bool) -> i32 {
    print_response(
        request(
            socket,
            &Request::Bind {
                busid: busid.into(),
                force,
                kernel,
            },
        )
        .await,
    )
}

/// `usbip unbind -b BUSID [--force]`.
pub async fn unbind_command(socket: &Path, busid: &str, force: bool) -> i32 {
    print_response(
        request(
            socket,
            &Request::Unbind {
                busid: busid.into(),
                force,
            },
        )
        .await,
    )
}

/// `usbip state [--json]`: what the daemon exports and who imports it.
pub async fn state_command(socket: &Path, json: bool) -> Result<(), String> {
    let r = request(socket, &Request::State)
        .await
        .map_err(|e| e.to_string())?;
    let state = match r {
        Response {
            ok: true,
            state: Some(state),
            ..
        } => state,
        r if r.ok => {
            return Err("usbipd answered without its state (is it older than this usbip?)".into())
        }
        r => return Err(r.message),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&state).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render_state(&state, std::time::SystemTime::now()));
    }
    Ok(())
}

/// The state for a person: one block per exported device.
pub fn render_state(state: &DaemonState, now: std::time::SystemTime) -> String {
    use std::fmt::Write as _;
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut out = String::new();
    if state.devices.is_empty() {
        out.push_str("usbipd exports no device\n");
    }
    for d in &state.devices {
        let _ = writeln!(
            out,
            "{}: {}:{} ({})",
            d.busid, d.vendor_id, d.product_id, d.speed
        );
        let Some(i) = &d.import else {
            out.push_str("    available\n");
            continue;
        };
        let _ = writeln!(
            out,
            "    {} by {} for {} s",
            i.state,
            i.client,
            now.saturating_sub(i.since_unix)
        );
        match &i.tls {
            Some(t) => {
                let _ = writeln!(
                    out,
                    "    TLS client {} (SHA-256 {}{})",
                    t.subject,
                    t.fingerprint,
                    if t.subject_verified {
                        ""
                    } else {
                        ", subject not CA-verified"
                    }
                );
            }
            None => out.push_str("    no client certificate\n"),
        }
        match &i.traffic {
            Some(t) => {
                let _ = writeln!(
                    out,
                    "    {} URBs, {} bytes from the client, {} bytes to it",
                    t.urbs, t.bytes_from_client, t.bytes_to_client
                );
            }
            None => out.push_str("    URBs carried by the kernel, not counted\n"),
        }
    }
    out
}

fn print_response(r: io::Result<Response>) -> i32 {
    match r {
        Ok(r) if r.ok => {
            for w in &r.warnings {
                eprintln!("usbip: warning: {w}");
            }
            println!("usbip: info: {}", r.message);
            0
        }
        Ok(r) => {
            eprintln!("usbip: error: {}", r.message);
            1
        }
        Err(e) => {
            eprintln!("usbip: error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Bind {
            busid: "1-1".into(),
            force: true,
            kernel: false,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"bind","busid":"1-1","force":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"bind","busid":"2-1"}"#).unwrap(),
            Request::Bind {
                busid: "2-1".into(),
                force: false,
                kernel: false,
            }
        );
        let r = Request::Bind {
            busid: "1-1".into(),
            force: false,
            kernel: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"bind","busid":"1-1","force":false,"kernel":true}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        // A `usbip` from before --force still asks for a plain unbind.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"unbind","busid":"2-1"}"#).unwrap(),
            Request::Unbind {
                busid: "2-1".into(),
                force: false
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format"}"#).is_err());
    }

    #[tokio::test]
    async fn socket_is_owner_only_and_answers_requests() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/usbipd.sock");
        let l = listen(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second daemon on the same socket is refused.
        assert!(listen(&path, None).is_err());
        let fake = tempfile::tempdir().unwrap();
        let m = Arc::new(
            Manager::new(
                usbwire_host::Roots::under(fake.path()),
                RegistryExports(Registry::new()),
                None,
            )
            .unwrap(),
        );
        let t = tokio::spawn(serve(l, m, Registry::new()));
        let r = request(
            &path,
            &Request::Bind {
                kernel: false,
                busid: "9-9".into(),
                force: false,
            },
        )
        .await
        .unwrap();
        assert!(!r.ok);
        assert_eq!(r.errno.as_deref(), Some("ENODEV"));
        let r = request(
            &path,
            &Request::Unbind {
                busid: "9-9".into(),
                force: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(r.errno.as_deref(), Some("ENODEV"));
        let r = request(&path, &Request::List).await.unwrap();
        assert!(r.ok && r.bindings.is_empty());
        let wait = Duration::from_secs(5);
        assert!(bindings_or_none(&path, wait).await.is_empty());
        t.abort();
        // No daemon, no socket, a socket nobody answers on: quietly nothing.
        assert!(bindings_or_none(&d.path().join("none.sock"), wait)
            .await
            .is_empty());
    }

    /// A daemon that accepts but never answers costs the caller its own
    /// wait, not the request's minute-long read timeout. Virtual time: the
    /// clock jumps only while the runtime has nothing else to do.
    #[tokio::test(start_paused = true)]
    async fn a_mute_control_socket_costs_only_the_callers_wait() {
        let d = tempfile::tempdir().unwrap();
        let _mute = std::os::unix::net::UnixListener::bind(d.path().join("mute.sock")).unwrap();
        let t0 = tokio::time::Instant::now();
        let short = Duration::from_millis(200);
        assert!(bindings_or_none(&d.path().join("mute.sock"), short)
            .await
            .is_empty());
        assert_eq!(t0.elapsed(), short);
    }
}
