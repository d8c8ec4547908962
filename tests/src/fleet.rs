//! A `usbipd --fleet` run in a network namespace of the fabric (see
//! [`crate::fabric`]), for the fleet tests: it serves on the namespace's
//! address and port 3240, publishes to the given etcd endpoints under its
//! id, and logs to a file the test can show.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use usbwire_client::{ClientError, RemoteDevice, TlsClientConfig};
use usbwire_proto::OpStatus;

use crate::daemon::{kill_and_reap, read_line, terminate};
use crate::fabric::Host;
use crate::kernel::cargo_bin;

/// The port every fleet server listens on, in its own namespace.
pub const PORT: u16 = 3240;
/// How long a start or a stop may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);

/// `usbip ARGS` run on `client`, its reservations recorded in `dir`.
pub fn usbip(client: &Host, dir: &Path, args: &[&str]) -> std::process::Output {
    client
        .command(cargo_bin("usbip"))
        .args(args)
        .env("USBWIRE_RESERVATION_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .expect("running usbip")
}

/// A `usbipd --fleet` in its own namespace, killed on drop.
pub struct FleetServer {
    pub id: String,
    host: Host,
    config: PathBuf,
    endpoints: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    stdout: Option<ChildStdout>,
}

impl FleetServer {
    /// Writes `config` (usbipd's TOML) into `dir` and starts usbipd on
    /// `host` with `args` added to the fleet's own; returns once it serves.
    pub fn start(
        id: &str,
        host: Host,
        dir: &Path,
        config: &str,
        endpoints: &str,
        args: &[&str],
    ) -> FleetServer {
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, config).expect("writing the server's config");
        let mut s = FleetServer {
            id: id.to_string(),
            host,
            config: path,
            endpoints: endpoints.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: dir.join(format!("{id}.log")),
            child: None,
            stdout: None,
        };
        s.spawn();
        s
    }

    /// Starts it (again, after [`FleetServer::kill`] or
    /// [`FleetServer::terminate`]) with the same arguments.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let addr = self.host.addr().to_string();
        let mut child = self
            .host
            .command(cargo_bin("usbipd"))
            .arg("--config")
            .arg(&self.config)
            .args(["--no-control", "--listen", &addr, "-t", &PORT.to_string()])
            .args(["--fleet", &self.endpoints, "--fleet-name", &self.id])
            .args(["--ready-fd", "1"])
            .args(&self.args)
            .env("USBWIRE_LOG", "info,usbwire_fleet=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawning usbipd");
        let mut stdout = child.stdout.take().expect("usbipd's stdout");
        let line = read_line(&mut stdout, HANG);
        self.child = Some(child);
        self.stdout = Some(stdout);
        assert!(
            line.is_ok(),
            "{} did not report that it serves: {line:?}\n{}",
            self.id,
            self.log_text()
        );
    }

    /// SIGKILL: no goodbye to etcd.
    pub fn kill(&mut self) {
        kill_and_reap(self.child.take());
        self.stdout = None;
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn terminate(&mut self) {
        let c = self.child.take().expect("the server runs");
        let status = terminate(c, HANG)
            .unwrap_or_else(|| panic!("{} did not exit on SIGTERM\n{}", self.id, self.log_text()));
        assert!(
            status.success(),
            "{}: {status}\n{}",
            self.id,
            self.log_text()
        );
        self.stdout = None;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FleetServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How an import from `client` went: the device's busid, or the status
/// the server refused it with.
pub fn import(
    client: &Host,
    server: SocketAddr,
    tls: Option<TlsClientConfig>,
    busid: &str,
) -> Result<String, OpStatus> {
    let busid = busid.to_string();
    client.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let imported = async {
                match &tls {
                    Some(tls) => {
                        usbwire_client::import_tls(
                            &server.ip().to_string(),
                            server.port(),
                            tls,
                            &busid,
                        )
                        .await
                    }
                    None => usbwire_client::import(server, &busid).await,
                }
            };
            let device: Result<RemoteDevice, ClientError> = tokio::time::timeout(HANG, imported)
                .await
                .expect("the import did not end within the hang bound");
            match device {
                Ok(d) => {
                    // Used, not only imported.
                    let descriptor = d.device_descriptor().await.expect("GET_DESCRIPTOR");
                    assert_eq!(descriptor[1], 1, "a device descriptor");
                    let busid = d.info().busid.to_string();
                    drop(d);
                    Ok(busid)
                }
                Err(ClientError::ImportRefused { status, .. }) => Err(status),
                Err(e) => panic!("the import failed otherwise than refused: {e}"),
            }
        })
    })
}

/// [`import`], until the server has freed the device from an earlier
/// import (it does when it sees that connection end, which the client
/// cannot wait for): DevBusy meanwhile, bounded by [`HANG`].
pub fn import_once_free(
    client: &Host,
    server: SocketAddr,
    tls: impl Fn() -> Option<TlsClientConfig>,
    busid: &str,
) -> Result<String, OpStatus> {
    let start = Instant::now();
    // Each round is one import; the loop ends by HANG.
    loop {
        match import(client, server, tls(), busid) {
            Err(OpStatus::DevBusy) if start.elapsed() < HANG => {
                std::thread::sleep(Duration::from_millis(50))
            }
            done => return done,
        }
    }
}
