//! `usbip`: the USB/IP client, flag-compatible with the C usbip-utils.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand};
use usbwire_cli::{control, names, persist};
use usbwire_client::persist::PersistRecord;
use usbwire_client::{
    certificate_fingerprint, self_signed, ImportedDevice, ServerTrust, TlsClientConfig, Vhci,
    VhciError,
};
use usbwire_host::{ExportStatus, LocalDevice, Roots};
use usbwire_proto::{DeviceInfo, Speed};

/// Where `/sys` and `/var/run` are looked for; `/` unless this environment
/// variable says otherwise (tests run against fake trees).
const ROOT_ENV: &str = "USBWIRE_SYSFS_ROOT";

fn root() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[derive(Parser, Debug)]
#[command(name = "usbip", version, about = "USB/IP client")]
pub(crate) struct Cli {
    /// Print debugging information (before the command, as with the C tool).
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// Accepted for compatibility with the C tool; messages still go to stderr.
    #[arg(long = "log", hide = true)]
    log: bool,
    /// TCP port of the server.
    #[arg(short = 't', long = "tcp-port", default_value_t = 3240, global = true)]
    tcp_port: u16,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// TLS 1.3 with a client certificate (not in the C tool). With any of
/// these, the client never talks plaintext.
#[derive(ClapArgs, Debug, Default)]
struct TlsArgs {
    /// This client's certificate (PEM), e.g. from `usbip cert new`.
    #[arg(long = "tls-cert", value_name = "FILE", global = true)]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long = "tls-key", value_name = "FILE", global = true)]
    tls_key: Option<PathBuf>,
    /// Trust a server whose certificate this CA (PEM) signed for HOST.
    #[arg(long = "tls-ca", value_name = "FILE", global = true)]
    tls_ca: Option<PathBuf>,
    /// Trust only the server certificate with this SHA-256 fingerprint
    /// (as `usbip cert new` or `usbip cert fingerprint` prints it).
    #[arg(long = "tls-fingerprint", value_name = "HEX", global = true)]
    tls_fingerprint: Option<String>,
}

impl TlsArgs {
    fn given(&self) -> bool {
        self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || self.tls_fingerprint.is_some()
    }

    /// `None` without any TLS option; an error naming what is missing
    /// when only some are given.
    fn config(&self) -> Result<Option<TlsClientConfig>, String> {
        if !self.given() {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Err("TLS needs both --tls-cert FILE and --tls-key FILE \
                 (make them with `usbip cert new --out DIR`)"
                .into());
        };
        let trust = match (&self.tls_ca, &self.tls_fingerprint) {
            (Some(ca), None) => ServerTrust::CaFile(ca.clone()),
            (None, Some(hex)) => ServerTrust::Fingerprint(
                hex.parse().map_err(|e| format!("--tls-fingerprint: {e}"))?,
            ),
            (None, None) => {
                return Err("TLS needs a way to recognise the server: \
                     --tls-ca FILE or --tls-fingerprint HEX"
                    .into())
            }
            (Some(_), Some(_)) => return Err("give --tls-ca or --tls-fingerprint, not both".into()),
        };
        TlsClientConfig::from_files(Some((cert, key)), &trust)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List exportable (remote) or local USB devices.
    List(ListArgs),
    /// Attach a remote USB device to this host's vhci-hcd.
    Attach(AttachArgs),
    /// Detach a device from a vhci-hcd port.
    Detach(DetachArgs),
    /// Show the devices imported through vhci-hcd.
    Port(PortArgs),
    /// Export a local USB device through the running usbipd.
    Bind(BindArgs),
    /// Stop exporting a local USB device and give it back to its drivers.
    Unbind(UnbindArgs),
    /// Show what the running usbipd exports and who imports each device
    /// (not in the C tool).
    State(StateArgs),
    /// Make or inspect TLS certificates (not in the C tool).
    #[command(subcommand)]
    Cert(CertCommand),
    /// Reserve a device of a fleet (etcd) and hold it (not in the C tool).
    Reserve(ReserveArgs),
    /// Give back a reserved device (not in the C tool).
    Release(ReleaseArgs),
}

#[derive(ClapArgs, Debug)]
#[command(group(ArgGroup::new("want").required(true).args(["name", "matching", "label", "hold"])))]
struct ReserveArgs {
    /// The fleet's etcd endpoints, comma-separated (host:port or URLs).
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    fleet: String,
    /// The device's fleet name.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Any free device with this vendor:product (hex).
    #[arg(long = "match", value_name = "VID:PID")]
    matching: Option<String>,
    /// Any free device with this label.
    #[arg(long = "label", value_name = "LABEL")]
    label: Option<String>,
    /// Seconds the device stays reserved after its holder dies.
    #[arg(long = "ttl", value_name = "S", default_value_t = 10)]
    ttl: i64,
    /// Print the reservation as JSON.
    #[arg(long = "json")]
    json: bool,
    /// Hold the reservation in this process until SIGTERM or ^C, instead of
    /// a detached holder.
    #[arg(long = "foreground")]
    foreground: bool,
    /// Who holds it, without TLS (default USER@HOST); with --tls-cert the
    /// certificate's fingerprint.
    #[arg(long = "client-id", value_name = "ID")]
    client_id: Option<String>,
    /// The detached holder of a reservation made already (internal).
    #[arg(long = "hold", value_name = "NAME", hide = true)]
    hold: Option<String>,
}

#[derive(ClapArgs, Debug)]
struct ReleaseArgs {
    /// The fleet's etcd endpoints (default: those it was reserved through).
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    fleet: Option<String>,
    /// The device's fleet name.
    #[arg(value_name = "NAME")]
    name: String,
    /// Release it although this client does not hold it.
    #[arg(long = "force")]
    force: bool,
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Make a key and a self-signed certificate in DIR (cert.pem, key.pem)
    /// and print the certificate's SHA-256 fingerprint, which the other
    /// side pins.
    New {
        /// Where to write cert.pem and key.pem; existing files are not replaced.
        #[arg(long = "out", value_name = "DIR")]
        out: PathBuf,
        /// The name the certificate holds (common name and subject
        /// alternative name: a DNS name or an IP address); default: this host's name.
        #[arg(long = "name", value_name = "NAME")]
        name: Option<String>,
    },
    /// Print the SHA-256 fingerprint of a PEM certificate.
    Fingerprint {
        #[arg(value_name = "FILE")]
        cert: PathBuf,
    },
}

#[derive(ClapArgs, Debug)]
struct BindArgs {
    /// Bus id of the local device (see `usbip list -l`).
    #[arg(short = 'b', long = "busid")]
    busid: String,
    /// Bind although the device is busy: a file system on it mounted or
    /// held by dm/md, or one of its disk, tty, hidraw or input nodes open.
    /// Never over another program's usbfs claim.
    #[arg(short = 'f', long = "force")]
    force: bool,
    /// Bind the device to the kernel's usbip-host driver, as the C `usbip
    /// bind` does, instead of claiming it through usbfs; usbipd exports it
    /// by handing each import's connection to the kernel. Copies less; the
    /// usbfs default keeps the stub's URB handling out of the kernel.
    #[arg(long = "kernel")]
    kernel: bool,
    /// usbipd's control socket (default $USBWIRE_CONTROL_SOCKET or /run/usbwire/usbipd.sock).
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
struct StateArgs {
    /// JSON output, in the shape of schema/usbip-state.schema.json.
    #[arg(long = "json")]
    json: bool,
    /// usbipd's control socket.
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
struct UnbindArgs {
    /// Bus id of the local device.
    #[arg(short = 'b', long = "busid")]
    busid: String,
    /// Unbind although a client has the device imported: usbipd closes
    /// that connection, as the kernel's usbip-host does when unbound, and
    /// the client sees the device disconnected. Without it, an active
    /// import is refused naming its client (one that is ending, after a
    /// detach, is waited for).
    #[arg(short = 'f', long = "force")]
    force: bool,
    /// usbipd's control socket.
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
#[command(group(ArgGroup::new("what").args(["remote", "local", "discover", "fleet"])))]
struct ListArgs {
    /// List every device published to the fleet: the etcd cluster at these
    /// client URLs (comma-separated), with its server, labels and holder.
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    fleet: Option<String>,
    /// List the exportable devices of a remote host.
    #[arg(short = 'r', long = "remote", value_name = "HOST")]
    remote: Option<String>,
    /// List the local USB devices.
    #[arg(short = 'l', long = "local")]
    local: bool,
    /// Find USB/IP servers on the local network (DNS-SD, `_usbip._tcp`
    /// over mDNS) and list each one's devices (not in the C tool).
    #[arg(long = "discover")]
    discover: bool,
    /// With --discover: how long to look for servers (seconds). The
    /// default covers three queries (at about 0.1, 1.1 and 3.1 s): a
    /// server does not answer a query within a second of multicasting
    /// the same records (RFC 6762 section 6), so one may go unanswered.
    #[arg(long = "timeout", value_name = "S", default_value_t = 4,
          conflicts_with_all = ["remote", "local"], value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout: u64,
    /// Parsable output, one device per line.
    #[arg(short = 'p', long = "parsable", conflicts_with = "discover")]
    parsable: bool,
    /// JSON output (with -l: each device's export status too).
    #[arg(long = "json")]
    json: bool,
    /// With -l: mark each device exportable, exported by usbipd or not
    /// exportable (not in the C tool).
    #[arg(long = "mark", conflicts_with = "remote")]
    mark: bool,
    /// With -l: list hubs and devices imported through vhci_hcd too, which
    /// are never exportable (not in the C tool).
    #[arg(long = "all", conflicts_with = "remote")]
    all: bool,
    /// usbipd's control socket, asked which devices it exports (with -l).
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

#[derive(ClapArgs, Debug)]
#[command(group(ArgGroup::new("dev").required(true).args(["busid", "device", "name"])))]
struct AttachArgs {
    /// The machine with exported USB devices.
    #[arg(
        short = 'r',
        long = "remote",
        value_name = "HOST",
        required_unless_present = "fleet"
    )]
    remote: Option<String>,
    /// Attach the fleet device NAME, which this client reserved (or
    /// reserves now): its server comes from the fleet's etcd (ENDPOINTS).
    #[arg(
        long = "fleet",
        value_name = "ENDPOINTS",
        requires = "name",
        conflicts_with = "remote"
    )]
    fleet: Option<String>,
    /// With --fleet: the device's fleet name.
    #[arg(value_name = "NAME", requires = "fleet")]
    name: Option<String>,
    /// Bus id of the device on HOST.
    #[arg(short = 'b', long = "busid")]
    busid: Option<String>,
    /// Id of the virtual UDC on HOST (imported the same way).
    #[arg(short = 'd', long = "device")]
    device: Option<String>,
    /// Import over TLS 1.3 and hand the session to kernel TLS (modprobe
    /// tls), so that vhci-hcd's traffic is encrypted too. Implied by any
    /// --tls-* option; never falls back to plaintext.
    #[arg(long = "tls")]
    tls: bool,
    /// Keep the device attached (not in the C tool): a supervisor process
    /// imports it again, with backoff, whenever its connection ends, until
    /// `usbip detach` of its port. Its state shows in `usbip port`.
    #[arg(long = "persist")]
    persist: bool,
    /// With --persist: run the supervisor in this process (for systemd,
    /// which it tells READY=1 after the first attach) instead of detached.
    #[arg(long = "foreground", requires = "persist")]
    foreground: bool,
    /// With --persist --foreground: report the first attempt on this
    /// descriptor (how the detaching parent learns it).
    #[arg(
        long = "ready-fd",
        value_name = "FD",
        requires = "foreground",
        hide = true
    )]
    ready_fd: Option<i32>,
}

#[derive(ClapArgs, Debug)]
struct DetachArgs {
    /// The vhci_hcd port the device is on.
    #[arg(short = 'p', long = "port")]
    port: String,
}

#[derive(ClapArgs, Debug)]
struct PortArgs {
    /// JSON output.
    #[arg(long = "json")]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(if cli.debug {
            "debug"
        } else if matches!(&cli.command, Command::Attach(a) if a.persist) {
            // A supervisor logs each transition.
            "info"
        } else {
            "warn"
        })
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usbip: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbip: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::List(a) => match a.remote {
            None if a.discover => {
                let tls = cli.tls.config()?;
                discover::list(
                    std::time::Duration::from_secs(a.timeout),
                    tls.as_ref(),
                    a.json,
                )
                .await
            }
            None if a.fleet.is_some() => {
                usbwire_cli::fleet::list_command(a.fleet.as_deref().unwrap_or_default(), a.json)
                    .await
            }
            Some(host) => {
                let tls = cli.tls.config()?;
                list_remote(&host, cli.tcp_port, tls.as_ref(), a.parsable, a.json).await
            }
            None if a.local => {
                let opts = LocalListing {
                    parsable: a.parsable,
                    json: a.json,
                    mark: a.mark,
                    all: a.all,
                };
                // Plain `list -l` does not need usbipd: the C tool's output.
                let bindings = if a.json || a.mark {
                    control::bindings_or_none(
                        &control::socket_path(a.control_socket),
                        std::time::Duration::from_secs(3),
                    )
                    .await
                } else {
                    Vec::new()
                };
                list_local(&Roots::under(&root()), &bindings, opts)
            }
            None => Err("list: give -r HOST, -l, --discover or --fleet ENDPOINTS".into()),
        },
        Command::Attach(a) => {
            // Any TLS option means TLS, as for `list -r`: a client given a
            // certificate never attaches in plaintext.
            let tls = match cli.tls.config()? {
                Some(tls) => Some(tls),
                None if a.tls => return Err(ATTACH_TLS_NEEDS_OPTIONS.into()),
                None => None,
            };
            if let (Some(endpoints), Some(name)) = (&a.fleet, &a.name) {
                let holder =
                    usbwire_cli::reserve::holder_identity(cli.tls.tls_cert.as_deref(), None)?;
                return attach_fleet(endpoints, name, &holder, tls.as_ref()).await;
            }
            let busid = a.busid.or(a.device).unwrap_or_default();
            let vhci = Vhci::new(root());
            if a.persist && !a.foreground {
                return persist::spawn_detached(
                    &vhci,
                    a.remote.as_deref().unwrap_or_default(),
                    cli.tcp_port,
                    &busid,
                );
            }
            if a.persist {
                return persist::run_foreground(persist::PersistAttach {
                    vhci,
                    host: a.remote.unwrap_or_default(),
                    tcp_port: cli.tcp_port,
                    busid,
                    tls,
                    ready_fd: a.ready_fd,
                })
                .await;
            }
            attach(
                &vhci,
                a.remote.as_deref().unwrap_or_default(),
                cli.tcp_port,
                &busid,
                tls.as_ref(),
            )
        }
        Command::Detach(a) => detach(&Vhci::new(root()), &a.port),
        Command::Reserve(a) => {
            let holder = usbwire_cli::reserve::holder_identity(
                cli.tls.tls_cert.as_deref(),
                a.client_id.as_deref(),
            )?;
            reserve(a, &holder).await
        }
        Command::Release(a) => {
            match usbwire_cli::reserve::release(a.fleet.as_deref(), &a.name, a.force).await {
                Ok(done) => {
                    println!("{done}");
                    Ok(())
                }
                Err(f) => fail(f),
            }
        }
        Command::Port(a) => port(&Vhci::new(root()), &Roots::under(&root()), a.json),
        Command::Bind(a) => {
            let path = control::socket_path(a.control_socket);
            match control::bind_command(&path, &a.busid, a.force, a.kernel).await {
                0 => Ok(()),
                _ => std::process::exit(1),
            }
        }
        Command::State(a) => {
            control::state_command(&control::socket_path(a.control_socket), a.json).await
        }
        Command::Unbind(a) => {
            let path = control::socket_path(a.control_socket);
            match control::unbind_command(&path, &a.busid, a.force).await {
                0 => Ok(()),
                _ => std::process::exit(1),
            }
        }
        Command::Cert(CertCommand::New { out, name }) => cert_new(&out, name),
        Command::Cert(CertCommand::Fingerprint { cert }) => {
            let f = certificate_fingerprint(&cert).map_err(|e| e.to_string())?;
            println!("{f}");
            Ok(())
        }
    }
}

/// `usbip list --discover`.
mod discover {
    use std::time::Duration;

    use usbwire_cli::discovery::{self, Found};
    use usbwire_client::TlsClientConfig;
    use usbwire_proto::DeviceInfo;

    /// How long one server may take to answer its device list.
    const LIST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Browses for `window`, then asks every server found for its
    /// devices, all at once, each bounded by [`LIST_TIMEOUT`].
    pub(super) async fn list(
        window: Duration,
        tls: Option<&TlsClientConfig>,
        json: bool,
    ) -> Result<(), String> {
        let servers = discovery::browse(window).await.map_err(|e| e.to_string())?;
        let mut lists = tokio::task::JoinSet::new();
        for (i, server) in servers.iter().enumerate() {
            let server = server.clone();
            let tls = tls.cloned();
            lists.spawn(async move { (i, devices(&server, tls.as_ref()).await) });
        }
        let mut results: Vec<Result<Vec<DeviceInfo>, String>> =
            vec![Err("not asked".into()); servers.len()];
        while let Some(done) = lists.join_next().await {
            if let Ok((i, r)) = done {
                results[i] = r;
            }
        }
        if json {
            println!("{}", render_json(&servers, &results));
        } else if servers.is_empty() {
            return Err(format!(
                "no USB/IP server answered on the local network within {}s \
                 (DNS-SD {}; servers advertise unless started with --no-advertise)",
                window.as_secs(),
                discovery::SERVICE_TYPE
            ));
        } else {
            print!("{}", render_text(&servers, &results));
        }
        Ok(())
    }

    /// The server's devices, through its first address that answers.
    async fn devices(
        server: &Found,
        tls: Option<&TlsClientConfig>,
    ) -> Result<Vec<DeviceInfo>, String> {
        let tls = match (server.tls_required(), tls) {
            (true, None) => {
                return Err(format!(
                    "TLS required: give --tls-cert, --tls-key and --tls-ca or \
                     --tls-fingerprint{}",
                    server
                        .txt
                        .get("fp")
                        .map(|fp| format!(
                            " (advertised fingerprint {fp}; check it before pinning)"
                        ))
                        .unwrap_or_default()
                ))
            }
            (_, tls) => tls,
        };
        let mut errors = Vec::new();
        for addr in &server.addresses {
            let asked = match tls {
                Some(tls) => {
                    let host = addr.ip().to_string();
                    tokio::time::timeout(
                        LIST_TIMEOUT,
                        usbwire_client::list_tls(&host, addr.port(), tls),
                    )
                    .await
                }
                None => tokio::time::timeout(LIST_TIMEOUT, usbwire_client::list(*addr)).await,
            };
            match asked {
                Ok(Ok(devices)) => return Ok(devices),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push(format!("{addr}: no answer within {LIST_TIMEOUT:?}")),
            }
        }
        if errors.is_empty() {
            errors.push("no address was advertised".into());
        }
        Err(errors.join("; "))
    }

    fn render_text(servers: &[Found], results: &[Result<Vec<DeviceInfo>, String>]) -> String {
        let mut s = String::new();
        for (server, result) in servers.iter().zip(results) {
            let addr = server
                .addresses
                .first()
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("{}:{}", server.host, server.port));
            let txt: Vec<String> = server.txt.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!(
                "Server \"{}\" at {addr} ({})\n",
                server.instance,
                txt.join(" ")
            ));
            match result {
                Ok(devices) if devices.is_empty() => s.push_str("  no exportable devices\n\n"),
                Ok(devices) => {
                    let host = server.addresses.first().map(|a| a.ip().to_string());
                    s.push_str(&super::render_remote(
                        host.as_deref().unwrap_or(&server.host),
                        devices,
                    ))
                }
                Err(e) => s.push_str(&format!("  error: {e}\n\n")),
            }
        }
        s
    }

    /// An address as a person types it: a link-local IPv6 one with its
    /// interface (`fe80::1%2`), which it is useless without.
    fn address(a: &std::net::SocketAddr) -> String {
        match a {
            std::net::SocketAddr::V6(v6) if v6.scope_id() != 0 => {
                format!("{}%{}", v6.ip(), v6.scope_id())
            }
            a => a.ip().to_string(),
        }
    }

    /// One object per server, in the shape of schema/usbip-discover.schema.json.
    fn render_json(servers: &[Found], results: &[Result<Vec<DeviceInfo>, String>]) -> String {
        let v: Vec<serde_json::Value> = servers
            .iter()
            .zip(results)
            .map(|(server, result)| {
                serde_json::json!({
                    "instance": server.instance,
                    "host": server.host,
                    "addresses": server.addresses.iter().map(address).collect::<Vec<_>>(),
                    "port": server.port,
                    "txt": server.txt,
                    "devices": result.as_ref().ok().map(|d| super::devices_value(d)),
                    "error": result.as_ref().err(),
                })
            })
            .collect();
        serde_json::Value::Array(v).to_string()
    }
}

/// `attach --tls` without anything to do TLS with.
const ATTACH_TLS_NEEDS_OPTIONS: &str = "attach --tls needs --tls-cert FILE, --tls-key FILE and \
     --tls-ca FILE or --tls-fingerprint HEX (make a certificate with `usbip cert new --out DIR`)";

/// `usbip cert new`: the key is written readable by its owner only, and
/// nothing is overwritten.
fn cert_new(out: &Path, name: Option<String>) -> Result<(), String> {
    let name = match name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "usbwire".into()),
    };
    let made = self_signed(&name).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let cert_path = out.join("cert.pem");
    let key_path = out.join("key.pem");
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(format!(
                "{} exists; not replacing it (remove it or choose another --out)",
                path.display()
            ));
        }
    }
    write_new(&key_path, made.key_pem.as_bytes(), 0o600)?;
    write_new(&cert_path, made.cert_pem.as_bytes(), 0o644)?;
    println!("certificate: {}", cert_path.display());
    println!("key: {}", key_path.display());
    println!("name: {name}");
    println!("SHA-256 fingerprint: {}", made.fingerprint);
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `usbip attach`: silent on success, as the C tool is.
fn attach(
    vhci: &Vhci,
    host: &str,
    tcp_port: u16,
    busid: &str,
    tls: Option<&TlsClientConfig>,
) -> Result<(), String> {
    let a = match tls {
        Some(tls) => vhci.attach_remote_tls(host, tcp_port, busid, tls),
        None => vhci.attach_remote(host, tcp_port, busid),
    }
    .map_err(|e| e.to_string())?;
    tracing::debug!(port = a.port, "attached {busid} from {host}");
    Ok(())
}

/// Ends the process with a fleet failure's status (its errno).
fn fail(f: usbwire_cli::reserve::Failure) -> ! {
    eprintln!("usbip: error: {}", f.message);
    std::process::exit(f.status.into())
}

/// `usbip reserve`.
async fn reserve(a: ReserveArgs, holder: &str) -> Result<(), String> {
    use usbwire_cli::reserve as r;
    use usbwire_fleet::reserve::{parse_match, Fleet, Want};
    let fleet = match Fleet::connect(&a.fleet).await {
        Ok(f) => f,
        Err(e) => fail(e.into()),
    };
    if let Some(name) = &a.hold {
        return r::hold(&fleet, name).await.or_else(|f| fail(f));
    }
    let want = match (&a.name, &a.matching, &a.label) {
        (Some(n), _, _) => Want::Name(n.clone()),
        (_, Some(m), _) => parse_match(m)
            .ok_or_else(|| format!("--match {m}: expected VID:PID in hex, e.g. 1d6b:0104"))?,
        (_, _, Some(l)) => Want::Label(l.clone()),
        _ => return Err("name a device, or give --match VID:PID or --label LABEL".into()),
    };
    let local = match r::take(&fleet, &a.fleet, &want, holder, a.ttl).await {
        Ok(l) => l,
        Err(f) => fail(f),
    };
    if a.foreground {
        println!("{}", r::describe(&local, a.json));
        return r::hold(&fleet, &local.name).await.or_else(|f| fail(f));
    }
    let local = r::spawn_holder(local).unwrap_or_else(|f| fail(f));
    println!("{}", r::describe(&local, a.json));
    Ok(())
}

/// `usbip attach --fleet ENDPOINTS NAME`: the device this client reserved
/// (or reserves now, with a detached holder), imported with its token.
async fn attach_fleet(
    endpoints: &str,
    name: &str,
    holder: &str,
    tls: Option<&TlsClientConfig>,
) -> Result<(), String> {
    use usbwire_cli::reserve as r;
    use usbwire_fleet::reserve::{Fleet, Want};
    let fleet = Fleet::connect(endpoints)
        .await
        .unwrap_or_else(|e| fail(e.into()));
    let local = match r::load(&r::dir(), name) {
        Some(local) => local,
        None => {
            let local = r::take(&fleet, endpoints, &Want::Name(name.into()), holder, 10)
                .await
                .unwrap_or_else(|f| fail(f));
            let local = r::spawn_holder(local).unwrap_or_else(|f| fail(f));
            eprintln!("usbip: info: {}", r::describe(&local, false));
            local
        }
    };
    let device = fleet.device(name).await.unwrap_or_else(|e| fail(e.into()));
    if device.host.is_empty() || device.port == 0 {
        return Err(format!(
            "the fleet record of {name} has no usable address: {:?}",
            device.address()
        ));
    }
    let (host, port) = (device.host.as_str(), device.port);
    let busid = format!("{}#{}", device.busid, local.token);
    attach(&Vhci::new(root()), host, port, &busid, tls).map_err(|e| {
        // The server's status says busy; etcd says by whom.
        match current_holder(&fleet, name) {
            Some(h) if h != holder => format!("{e}: {name} is reserved by {h}"),
            _ => e,
        }
    })
}

/// Who holds `name` now, best effort (for an error message).
fn current_holder(fleet: &usbwire_fleet::reserve::Fleet, name: &str) -> Option<String> {
    let fleet = fleet.clone();
    let name = name.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(fleet.reservation(&name))
            .ok()
            .flatten()
            .map(|r| r.holder)
    })
    .join()
    .ok()
    .flatten()
}

/// `usbip detach -p PORT`.
fn detach(vhci: &Vhci, port: &str) -> Result<(), String> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid port {port}"));
    }
    let n: u32 = port.parse().map_err(|_| format!("invalid port {port}"))?;
    // A supervisor keeping this port is stopped first and waited for, so
    // that nothing attaches the device again once this returns.
    let stopped = persist::stop_supervisors_of(vhci, n)?;
    for p in stopped.ports.iter().filter(|p| **p != n) {
        // It had moved the device to another port meanwhile.
        match vhci.detach(*p) {
            Ok(()) | Err(VhciError::PortNotInUse { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    match vhci.detach(n) {
        Ok(()) => {}
        // Between attempts, the supervisor had no port: stopping it was
        // the detach; its record of the port is stale.
        Err(VhciError::PortNotInUse { .. }) if !stopped.pids.is_empty() => vhci.remove_record(n),
        Err(e) => return Err(e.to_string()),
    }
    for pid in &stopped.pids {
        eprintln!("usbip: info: stopped the supervisor of port {n} (pid {pid})");
    }
    // The C tool's info() line, its doubled newline included.
    eprint!("usbip: info: Port {n} is now detached!\n\n");
    Ok(())
}

/// An imported device as `usbip port` shows it: the port, and the local
/// device vhci-hcd created for it.
struct PortView {
    imported: ImportedDevice,
    local: Option<LocalDevice>,
}

impl PortView {
    /// The speed the C tool prints: the local device's, from sysfs.
    fn speed(&self) -> Speed {
        self.local
            .as_ref()
            .map(|d| d.speed)
            .unwrap_or(Speed::Unknown)
    }

    /// `(idVendor, idProduct)` of the local device, zeros when it is gone.
    fn ids(&self) -> (u16, u16) {
        self.local
            .as_ref()
            .map(|l| (l.id_vendor, l.id_product))
            .unwrap_or((0, 0))
    }
}

/// The ports in use, each with its local device.
fn imported_devices(vhci: &Vhci, sysfs: &Roots) -> Result<Vec<PortView>, String> {
    Ok(vhci
        .imported()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|imported| PortView {
            local: sysfs.local_device(&imported.status.local_busid).ok(),
            imported,
        })
        .collect())
}

/// `usbip port`.
fn port(vhci: &Vhci, sysfs: &Roots, json: bool) -> Result<(), String> {
    let devices = imported_devices(vhci, sysfs)?;
    let supervisors: Vec<PersistRecord> = persist::live_supervisors(vhci)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    if json {
        println!("{}", ports_json(&devices, &supervisors));
        return Ok(());
    }
    for d in &devices {
        if let Err(why) = &d.imported.record {
            eprintln!("usbip: warning: port {}: {why}", d.imported.status.port);
        }
    }
    print!("{}", render_ports(&devices));
    print!("{}", render_supervisors(&supervisors));
    Ok(())
}

/// The supervisors of `usbip attach --persist` (nothing without any, so
/// that the C tool's output stays as it is).
fn render_supervisors(supervisors: &[PersistRecord]) -> String {
    if supervisors.is_empty() {
        return String::new();
    }
    let mut out = String::from("Kept attached (usbip attach --persist)\n");
    for r in supervisors {
        let port = match r.port {
            Some(p) => format!("port {p:02}"),
            None => "no port".to_string(),
        };
        out.push_str(&format!(
            "  usbip://{}:{}/{}: {port}, {} (attempt {}, pid {})",
            r.host, r.tcp_port, r.busid, r.state, r.attempts, r.pid
        ));
        match &r.last_error {
            Some(e) if r.port.is_none() => out.push_str(&format!(": {e}\n")),
            _ => out.push('\n'),
        }
    }
    out
}

/// `usbip port --json`: the ports in use, each with a `persist` object
/// when a supervisor keeps it, then one `{"persist": ...}` item per
/// supervisor re-attaching (no port right now).
fn ports_json(devices: &[PortView], supervisors: &[PersistRecord]) -> String {
    let mut items = imported_values(devices);
    for (item, view) in items.iter_mut().zip(devices) {
        let port = view.imported.status.port;
        if let Some(r) = supervisors.iter().find(|r| r.port == Some(port)) {
            item["persist"] = persist::persist_json(r);
        }
    }
    let ports: Vec<u32> = devices.iter().map(|d| d.imported.status.port).collect();
    for r in supervisors {
        if !r.port.is_some_and(|p| ports.contains(&p)) {
            items.push(serde_json::json!({ "persist": persist::persist_json(r) }));
        }
    }
    serde_json::Value::Array(items).to_string()
}

/// What `snprintf(buf, size, ...)` keeps of `s`.
fn c_truncate(mut s: String, size: usize) -> String {
    if s.len() >= size {
        let mut end = size - 1;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `usbip port`'s text, line for line as `usbip_vhci_imported_device_dump` prints it.
fn render_ports(devices: &[PortView]) -> String {
    let mut out = String::from("Imported USB devices\n====================\n");
    for view in devices {
        let (vendor, product) = view.ids();
        let d = &view.imported;
        out.push_str(&format!(
            "Port {:02}: <{}> at {}\n",
            d.status.port,
            d.status.state.describe(),
            view.speed().describe()
        ));
        out.push_str(&format!(
            "       {}\n",
            c_truncate(names::product(vendor, product), 100)
        ));
        match &d.record {
            Ok(r) => out.push_str(&format!(
                "{:>10} -> usbip://{}:{}/{}\n",
                d.status.local_busid, r.host, r.service, r.busid
            )),
            Err(_) => out.push_str(&format!(
                "{:>10} -> unknown host, remote port and remote busid\n",
                d.status.local_busid
            )),
        }
        out.push_str(&format!(
            "{:>10} -> remote bus/dev {:03}/{:03}\n",
            " ",
            d.status.busnum(),
            d.status.devnum()
        ));
    }
    out
}

#[cfg(test)]
fn imported_json(devices: &[PortView]) -> String {
    serde_json::Value::Array(imported_values(devices)).to_string()
}

fn imported_values(devices: &[PortView]) -> Vec<serde_json::Value> {
    devices
        .iter()
        .map(|view| {
            let (vendor, product) = view.ids();
            let d = &view.imported;
            serde_json::json!({
                "port": d.status.port,
                "hub": d.status.hub.short(),
                "status": d.status.state.describe(),
                "speed": view.speed().describe(),
                "local_busid": d.status.local_busid,
                "vendor_id": format!("{vendor:04x}"),
                "product_id": format!("{product:04x}"),
                "product": names::product(vendor, product),
                "remote": d.record.as_ref().ok().map(|r| serde_json::json!({
                    "host": r.host,
                    "port": r.service,
                    "busid": r.busid,
                })),
                "remote_busnum": d.status.busnum(),
                "remote_devnum": d.status.devnum(),
            })
        })
        .collect()
}

/// How `usbip list -l` prints.
#[derive(Debug, Clone, Copy, Default)]
struct LocalListing {
    parsable: bool,
    json: bool,
    /// Append each device's export status (not in the C tool).
    mark: bool,
    /// Hubs and vhci_hcd devices too (not in the C tool).
    all: bool,
}

/// A local device and where it stands for export.
struct Marked {
    dev: LocalDevice,
    status: ExportStatus,
    /// usbipd's state for it when it is bound there: exported, imported
    /// (in use by a client) or absent.
    usbipd_state: Option<String>,
}

/// The devices to list, marked with what usbipd has bound.
fn mark_local(
    sysfs: &Roots,
    bindings: &[control::BindingEntry],
    all: bool,
) -> Result<Vec<Marked>, String> {
    let devices = if all {
        sysfs.local_devices()
    } else {
        sysfs.listed_devices()
    }
    .map_err(|e| e.to_string())?;
    Ok(devices
        .into_iter()
        .map(|dev| {
            let usbipd_state = bindings
                .iter()
                .find(|b| b.busid == dev.busid)
                .map(|b| b.state.clone());
            Marked {
                status: dev.export_status(usbipd_state.is_some()),
                usbipd_state,
                dev,
            }
        })
        .collect())
}

/// `usbip list -l`.
fn list_local(
    sysfs: &Roots,
    bindings: &[control::BindingEntry],
    opts: LocalListing,
) -> Result<(), String> {
    let devices = mark_local(sysfs, bindings, opts.all)?;
    if opts.json {
        println!("{}", local_json(&devices));
    } else {
        print!("{}", render_local(&devices, opts.parsable, opts.mark));
    }
    Ok(())
}

/// What `--mark` appends to a device's first line.
fn mark_text(m: &Marked) -> String {
    match (m.status, m.usbipd_state.as_deref()) {
        (ExportStatus::Exported, Some("imported")) => " (exported by usbipd, in use)".into(),
        (ExportStatus::Exported, Some("absent")) => {
            " (exported by usbipd, not yet available)".into()
        }
        (st, _) => format!(" ({})", st.describe()),
    }
}

/// `usbip list -l [-p]`'s text, as `list_devices` in usbip_list.c prints it;
/// `mark` (ours) appends the export status to the busid line, or an
/// `export=` field with -p.
fn render_local(devices: &[Marked], parsable: bool, mark: bool) -> String {
    let mut out = String::new();
    for m in devices {
        let d = &m.dev;
        if parsable {
            out.push_str(&format!(
                "busid={}#usbid={:04x}:{:04x}#",
                d.busid, d.id_vendor, d.id_product
            ));
            if mark {
                out.push_str(&format!("export={}#", m.status.keyword()));
            }
        } else {
            out.push_str(&format!(
                " - busid {} ({:04x}:{:04x}){}\n   {}\n",
                d.busid,
                d.id_vendor,
                d.id_product,
                if mark { mark_text(m) } else { String::new() },
                c_truncate(names::product(d.id_vendor, d.id_product), 128)
            ));
        }
        out.push('\n');
    }
    out
}

fn local_json(devices: &[Marked]) -> String {
    let v: Vec<serde_json::Value> = devices
        .iter()
        .map(|m| {
            let d = &m.dev;
            serde_json::json!({
                "busid": d.busid,
                "path": d.sysfs_path(),
                "busnum": d.busnum,
                "devnum": d.devnum,
                "speed": d.speed.describe(),
                "vendor_id": format!("{:04x}", d.id_vendor),
                "product_id": format!("{:04x}", d.id_product),
                "bcd_device": format!("{:04x}", d.bcd_device),
                "product": names::product(d.id_vendor, d.id_product),
                "class": format!("{:02x}/{:02x}/{:02x}", d.device_class, d.device_subclass, d.device_protocol),
                "driver": d.driver,
                "exportable": m.status.is_exportable(),
                "exported": m.status.is_exported(),
                "reason": m.status.reason(),
                "usbipd_state": m.usbipd_state,
                "interfaces": d.interfaces.iter().map(|i| serde_json::json!({
                    "name": i.name,
                    "class": format!("{:02x}/{:02x}/{:02x}", i.class, i.subclass, i.protocol),
                    "driver": i.driver,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::Value::Array(v).to_string()
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn list_remote(
    host: &str,
    port: u16,
    tls: Option<&TlsClientConfig>,
    parsable: bool,
    json: bool,
) -> Result<(), String> {
    let devices = match tls {
        Some(tls) => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            usbwire_client::list_tls(bare, port, tls).await
        }
        None => usbwire_client::list(host_port(host, port)).await,
    }
    .map_err(|e| e.to_string())?;
    if json {
        println!("{}", devices_json(&devices));
        return Ok(());
    }
    if parsable {
        for d in &devices {
            let ifs: Vec<String> = d
                .interfaces
                .iter()
                .map(|i| format!("{:02x}/{:02x}/{:02x}", i.class, i.subclass, i.protocol))
                .collect();
            println!(
                "busid={}#usbid={:04x}:{:04x}#class={:02x}/{:02x}/{:02x}#speed={}#interfaces={}#",
                d.busid,
                d.id_vendor,
                d.id_product,
                d.device_class,
                d.device_subclass,
                d.device_protocol,
                d.speed.to_u32(),
                ifs.join(",")
            );
        }
        return Ok(());
    }
    if devices.is_empty() {
        return Err(format!("no exportable devices found on {host}"));
    }
    print!("{}", render_remote(host, &devices));
    Ok(())
}

/// `list -r`'s listing: the C tool's layout, column for column.
fn render_remote(host: &str, devices: &[DeviceInfo]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "Exportable USB devices");
    let _ = writeln!(s, "======================");
    let _ = writeln!(s, " - {host}");
    for d in devices {
        let _ = writeln!(
            s,
            "{:>11}: {}",
            d.busid,
            names::product(d.id_vendor, d.id_product)
        );
        let _ = writeln!(s, "{:>11}: {}", "", d.path);
        let _ = writeln!(
            s,
            "{:>11}: {}",
            "",
            names::class(d.device_class, d.device_subclass, d.device_protocol)
        );
        for (j, i) in d.interfaces.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:>11}: {:>2} - {}",
                "",
                j,
                names::class(i.class, i.subclass, i.protocol)
            );
        }
        let _ = writeln!(s);
    }
    s
}

fn devices_json(devices: &[DeviceInfo]) -> String {
    devices_value(devices).to_string()
}

fn devices_value(devices: &[DeviceInfo]) -> serde_json::Value {
    let v: Vec<serde_json::Value> = devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "busid": d.busid.to_string(),
                "path": d.path.to_string(),
                "busnum": d.busnum,
                "devnum": d.devnum,
                "speed": d.speed.describe(),
                "vendor_id": format!("{:04x}", d.id_vendor),
                "product_id": format!("{:04x}", d.id_product),
                "bcd_device": format!("{:04x}", d.bcd_device),
                "product": names::product(d.id_vendor, d.id_product),
                "class": format!("{:02x}/{:02x}/{:02x}", d.device_class, d.device_subclass, d.device_protocol),
                "configuration_value": d.configuration_value,
                "num_configurations": d.num_configurations,
                "interfaces": d.interfaces.iter().map(|i| format!("{:02x}/{:02x}/{:02x}", i.class, i.subclass, i.protocol)).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::Value::Array(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use usbwire_client::vhci::fake::{vhci, Used};
    use usbwire_client::{PortRecord, PortState, Speed};
    use usbwire_host::sysfs::fake::{device, interface, root_hub, FakeDevice};

    #[test]
    fn cli_parses_like_the_c_tool() {
        let c = Cli::try_parse_from(["usbip", "-d", "attach", "-r", "h", "-d", "usbip-vudc.0"])
            .unwrap();
        assert!(c.debug);
        match c.command {
            Command::Attach(a) => assert_eq!(
                (a.remote.as_deref().unwrap_or_default(), a.device.as_deref()),
                ("h", Some("usbip-vudc.0"))
            ),
            c => panic!("{c:?}"),
        }
        let c = Cli::try_parse_from(["usbip", "attach", "--remote=h", "--busid=1-1", "-t", "3241"])
            .unwrap();
        assert_eq!(c.tcp_port, 3241);
        assert!(
            Cli::try_parse_from(["usbip", "attach", "-r", "h"]).is_err(),
            "needs -b or -d"
        );
        assert!(Cli::try_parse_from(["usbip", "list", "-r", "h", "-l"]).is_err());
        assert!(Cli::try_parse_from(["usbip", "list", "-p", "-l"]).is_ok());
        assert!(Cli::try_parse_from(["usbip", "detach", "-p", "3"]).is_ok());
        assert!(Cli::try_parse_from(["usbip", "attach", "--fleet", "e:2379", "lab/1-1"]).is_ok());
        assert!(
            Cli::try_parse_from(["usbip", "attach", "--fleet", "e:2379"]).is_err(),
            "--fleet needs a NAME"
        );
        assert!(
            Cli::try_parse_from(["usbip", "attach", "-b", "1-1"]).is_err(),
            "needs -r"
        );
        assert!(
            Cli::try_parse_from(["usbip", "reserve", "--fleet", "e", "--match", "1:2"]).is_ok()
        );
        assert!(
            Cli::try_parse_from(["usbip", "reserve", "--fleet", "e"]).is_err(),
            "reserve needs NAME, --match or --label"
        );
        assert!(Cli::try_parse_from(["usbip", "release", "lab/1-1"]).is_ok());
        assert!(Cli::try_parse_from(["usbip", "port", "--json"]).is_ok());
        // --discover: its own listing, with its window.
        assert!(
            Cli::try_parse_from(["usbip", "list", "--discover", "--timeout", "2", "--json"])
                .is_ok()
        );
        for bad in [
            &["usbip", "list", "--discover", "-r", "h"][..],
            &["usbip", "list", "--discover", "-p"],
            &["usbip", "list", "-r", "h", "--timeout", "2"],
            &["usbip", "list", "--discover", "--timeout", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    fn used(port: u32, local_busid: &'static str, devid: u32, speed: Speed) -> Used<'static> {
        Used {
            port,
            speed,
            devid,
            sockfd: 3,
            local_busid,
            state: PortState::Used,
        }
    }

    #[test]
    fn port_renders_like_usbip_vhci_imported_device_dump() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        vhci(
            root,
            2,
            8,
            &[
                used(0, "3-1", 0x0001_0002, Speed::High),
                used(24, "6-1", 0x0002_000c, Speed::Super),
                used(17, "5-1", 0x0001_0003, Speed::Full),
            ],
        );
        root_hub(root, "platform/vhci_hcd.0/usb3", 3);
        device(
            root,
            &FakeDevice {
                devpath: "platform/vhci_hcd.0/usb3/3-1",
                id_vendor: 0xfffe,
                id_product: 0xfffd,
                busnum: 3,
                ..Default::default()
            },
        );
        device(
            root,
            &FakeDevice {
                devpath: "platform/vhci_hcd.1/usb6/6-1",
                id_vendor: 0xfffe,
                id_product: 0x0001,
                speed: "5000",
                busnum: 6,
                ..Default::default()
            },
        );
        device(
            root,
            &FakeDevice {
                devpath: "platform/vhci_hcd.1/usb5/5-1",
                id_vendor: 0xfffe,
                id_product: 0x0002,
                speed: "12",
                busnum: 5,
                ..Default::default()
            },
        );
        let v = Vhci::new(root);
        let rec = |host: &str, busid: &str| PortRecord {
            host: host.into(),
            service: "3240".into(),
            busid: busid.into(),
        };
        v.write_record(0, &rec("10.0.0.2", "1-1")).unwrap();
        v.write_record(24, &rec("server", "2-12")).unwrap();
        let got = render_ports(&imported_devices(&v, &Roots::under(root)).unwrap());
        let want = "\
Imported USB devices
====================
Port 00: <Port in Use> at High Speed(480Mbps)
       unknown vendor : unknown product (fffe:fffd)
       3-1 -> usbip://10.0.0.2:3240/1-1
           -> remote bus/dev 001/002
Port 17: <Port in Use> at Full Speed(12Mbps)
       unknown vendor : unknown product (fffe:0002)
       5-1 -> unknown host, remote port and remote busid
           -> remote bus/dev 001/003
Port 24: <Port in Use> at Super Speed(5000Mbps)
       unknown vendor : unknown product (fffe:0001)
       6-1 -> usbip://server:3240/2-12
           -> remote bus/dev 002/012
";
        assert_eq!(got, want);
        let j: serde_json::Value = serde_json::from_str(&imported_json(
            &imported_devices(&v, &Roots::under(root)).unwrap(),
        ))
        .unwrap();
        assert_eq!(j[0]["remote"]["host"], "10.0.0.2");
        assert_eq!(j[1]["remote"], serde_json::Value::Null);
        assert_eq!(j[2]["hub"], "ss");
        // What the README promises for `usbip port --json`.
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../../schema/usbip-port.schema.json"))
                .unwrap();
        let schema = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = schema.iter_errors(&j).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{j} breaks the schema: {errors:#?}");
        let mut broken = j.clone();
        broken[0]["port"] = "00".into();
        assert!(!schema.is_valid(&broken));
        // Nothing imported: the header alone.
        let t2 = tempfile::tempdir().unwrap();
        vhci(t2.path(), 1, 8, &[]);
        assert_eq!(
            render_ports(
                &imported_devices(&Vhci::new(t2.path()), &Roots::under(t2.path())).unwrap()
            ),
            "Imported USB devices\n====================\n"
        );
    }

    #[test]
    fn port_json_shows_supervisors_and_fits_the_schema() {
        use std::time::{Duration, SystemTime};
        use usbwire_client::persist::PersistState;
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        vhci(root, 1, 8, &[used(2, "3-1", 0x0001_0002, Speed::High)]);
        let v = Vhci::new(root);
        v.write_record(
            2,
            &PortRecord {
                host: "server".into(),
                service: "3240".into(),
                busid: "1-2".into(),
            },
        )
        .unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // This process stands for both supervisors: alive.
        let me = std::process::id();
        let mut kept = PersistRecord::new(me, "server", 3240, "1-2");
        kept.apply(&PersistState::Connecting { attempt: 1 }, now);
        kept.apply(
            &PersistState::Attached {
                port: Some(2),
                since: now,
            },
            now,
        );
        kept.write(&v).unwrap();
        let mut away = PersistRecord::new(me, "server", 3240, "1-3");
        away.apply(&PersistState::Connecting { attempt: 1 }, now);
        away.apply(
            &PersistState::Attached {
                port: Some(5),
                since: now,
            },
            now,
        );
        away.apply(
            &PersistState::Disconnected {
                reason: "port 5: connection lost: Connection timed out".into(),
            },
            now,
        );
        away.apply(
            &PersistState::Waiting {
                until: now + Duration::from_secs(2),
                attempt: 2,
            },
            now,
        );
        away.write(&v).unwrap();
        // A dead supervisor's file is left out.
        PersistRecord::new(u32::MAX / 2, "server", 3240, "9-9")
            .write(&v)
            .unwrap();
        let sups: Vec<PersistRecord> = persist::live_supervisors(&v)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(sups.len(), 2);
        let devices = imported_devices(&v, &Roots::under(root)).unwrap();
        let j: serde_json::Value = serde_json::from_str(&ports_json(&devices, &sups)).unwrap();
        assert_eq!(j[0]["port"], 2);
        assert_eq!(j[0]["persist"]["state"], "attached");
        assert_eq!(j[0]["persist"]["pid"], me);
        assert_eq!(j[1]["port"], serde_json::Value::Null);
        assert_eq!(j[1]["persist"]["state"], "waiting");
        assert_eq!(j[1]["persist"]["last_port"], 5);
        assert_eq!(j[1]["persist"]["next_attempt_at"], 1_800_000_002.0);
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../../schema/usbip-port.schema.json"))
                .unwrap();
        let schema = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = schema.iter_errors(&j).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{j} breaks the schema: {errors:#?}");
        let mut broken = j.clone();
        broken[1]["persist"]["state"] = "sleeping".into();
        assert!(!schema.is_valid(&broken));
        let mut broken = j.clone();
        broken[1]["port"] = 3.into();
        assert!(!schema.is_valid(&broken), "a re-attaching item has no port");
        // Text: the C tool's lines, then one line per supervisor.
        let text = render_supervisors(&sups);
        assert_eq!(
            text,
            format!(
                "Kept attached (usbip attach --persist)\n  \
                 usbip://server:3240/1-2: port 02, attached (attempt 1, pid {me})\n  \
                 usbip://server:3240/1-3: no port, waiting (attempt 1, pid {me}): \
                 port 5: connection lost: Connection timed out\n"
            )
        );
        assert_eq!(render_supervisors(&[]), "");
        // The attach flags.
        let c = Cli::try_parse_from([
            "usbip",
            "attach",
            "-r",
            "h",
            "-b",
            "1-1",
            "--persist",
            "--foreground",
        ])
        .unwrap();
        assert!(matches!(c.command, Command::Attach(a) if a.persist && a.foreground));
        assert!(
            Cli::try_parse_from(["usbip", "attach", "-r", "h", "-b", "1-1", "--foreground"])
                .is_err(),
            "--foreground belongs to --persist"
        );
    }

    #[test]
    fn list_local_renders_like_list_devices() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        root_hub(root, "pci0000:00/0000:00:14.0/usb1", 1);
        let hub = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-1",
                class: 9,
                id_vendor: 0x05e3,
                id_product: 0x0608,
                ..Default::default()
            },
        );
        interface(root, &hub, 1, 0, (9, 0, 0), Some("hub"));
        let disk = device(
            root,
            &FakeDevice {
                devpath: "pci0000:00/0000:00:14.0/usb1/1-1/1-1.4",
                id_vendor: 0xfffe,
                id_product: 0x5567,
                ..Default::default()
            },
        );
        interface(root, &disk, 1, 0, (8, 6, 0x50), Some("usb-storage"));
        let s = Roots::under(root);
        let devs = mark_local(&s, &[], false).unwrap();
        assert_eq!(
            render_local(&devs, false, false),
            " - busid 1-1.4 (fffe:5567)\n   unknown vendor : unknown product (fffe:5567)\n\n"
        );
        assert_eq!(
            render_local(&devs, true, false),
            "busid=1-1.4#usbid=fffe:5567#\n"
        );
        let j: serde_json::Value = serde_json::from_str(&local_json(&devs)).unwrap();
        assert_eq!(j[0]["interfaces"][0]["driver"], "usb-storage");
        assert_eq!(j[0]["interfaces"][0]["name"], "1-1.4:1.0");
        assert_eq!(j[0]["exportable"], true);
        assert_eq!(j[0]["exported"], false);
        assert_eq!(j[0]["reason"], serde_json::Value::Null);
        assert_eq!(j.as_array().unwrap().len(), 1, "hubs are not listed");
    }

    fn binding(busid: &str, state: &str) -> control::BindingEntry {
        control::BindingEntry {
            busid: busid.into(),
            vendor: 0xfffe,
            product: 0,
            state: state.into(),
        }
    }

    #[test]
    fn list_local_marks_exportable_exported_and_hubs() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        root_hub(root, "platform/dummy_hcd.0/usb1", 1);
        for (n, pid) in [(1, 0x0001), (2, 0x0002), (3, 0x0003)] {
            let dev = device(
                root,
                &FakeDevice {
                    devpath: &format!("platform/dummy_hcd.0/usb1/1-{n}"),
                    id_vendor: 0xfffe,
                    id_product: pid,
                    devnum: n + 1,
                    ..Default::default()
                },
            );
            interface(root, &dev, 1, 0, (0xff, 0, 0), Some("usbfs"));
        }
        root_hub(root, "platform/vhci_hcd.0/usb3", 3);
        device(
            root,
            &FakeDevice {
                devpath: "platform/vhci_hcd.0/usb3/3-1",
                id_vendor: 0xfffe,
                id_product: 0x0009,
                busnum: 3,
                ..Default::default()
            },
        );
        let s = Roots::under(root);
        let bound = [
            binding("1-1", "exported"),
            binding("1-3", "imported"),
            binding("7-7", "absent"),
        ];
        // The C tool's listing stays as it is with a daemon around.
        let plain = mark_local(&s, &bound, false).unwrap();
        assert_eq!(
            render_local(&plain, true, false),
            "busid=1-1#usbid=fffe:0001#\nbusid=1-2#usbid=fffe:0002#\nbusid=1-3#usbid=fffe:0003#\n"
        );
        let marked = mark_local(&s, &bound, true).unwrap();
        let firsts: Vec<String> = render_local(&marked, false, true)
            .lines()
            .filter(|l| l.starts_with(" - "))
            .map(String::from)
            .collect();
        assert_eq!(
            firsts,
            [
                " - busid usb1 (1d6b:0002) (hub: not exportable)",
                " - busid 1-1 (fffe:0001) (exported by usbipd)",
                " - busid 1-2 (fffe:0002) (exportable)",
                " - busid 1-3 (fffe:0003) (exported by usbipd, in use)",
                " - busid usb3 (1d6b:0002) (hub: not exportable)",
                " - busid 3-1 (fffe:0009) (imported through vhci_hcd: not exportable)",
            ]
        );
        assert!(render_local(&marked, true, true).starts_with(
            "busid=usb1#usbid=1d6b:0002#export=hub#\nbusid=1-1#usbid=fffe:0001#export=exported#\n"
        ));
        let j: serde_json::Value = serde_json::from_str(&local_json(&marked)).unwrap();
        let rows: Vec<(String, bool, bool, serde_json::Value, serde_json::Value)> = j
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["busid"].as_str().unwrap().to_string(),
                    d["exportable"].as_bool().unwrap(),
                    d["exported"].as_bool().unwrap(),
                    d["reason"].clone(),
                    d["usbipd_state"].clone(),
                )
            })
            .collect();
        use serde_json::json;
        assert_eq!(
            rows,
            [
                ("usb1".into(), false, false, json!("hub"), json!(null)),
                (
                    "1-1".into(),
                    false,
                    true,
                    json!("exported"),
                    json!("exported")
                ),
                ("1-2".into(), true, false, json!(null), json!(null)),
                (
                    "1-3".into(),
                    false,
                    true,
                    json!("exported"),
                    json!("imported")
                ),
                ("usb3".into(), false, false, json!("hub"), json!(null)),
                ("3-1".into(), false, false, json!("imported"), json!(null)),
            ]
        );
        // Options: --mark and --all belong to -l.
        assert!(Cli::try_parse_from(["usbip", "list", "-l", "--mark", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["usbip", "list", "-r", "h", "--mark"]).is_err());
        assert!(Cli::try_parse_from(["usbip", "list", "-r", "h", "--all"]).is_err());
    }

    #[test]
    fn truncates_like_snprintf() {
        assert_eq!(c_truncate("abcdef".into(), 4), "abc");
        assert_eq!(c_truncate("abc".into(), 4), "abc");
        assert_eq!(c_truncate("aé".into(), 3), "a");
    }
}
