//! `usbipd`: the USB/IP server, flag-compatible with the C usbipd.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use usbwire_cli::config::Config;
use usbwire_cli::control;
use usbwire_cli::devices::{self, Exported};
use usbwire_cli::discovery::{self, Advertiser};
use usbwire_cli::fleet::{self, Fleet};
use usbwire_cli::listen::{self, ListenError, Listener, Origin};
use usbwire_host::{Manager, Roots, VudcExports};
use usbwire_server::acl::{AccessControl, ClientMatch, Policy, SharedPolicy};
use usbwire_server::tls::{self, Access, Fingerprint, KernelTls, TlsFiles};
use usbwire_server::{Registry, Server, ServerConfig};

/// USB/IP server: exports emulated USB devices, local ones bound with
/// `usbip bind`, and (--device) gadgets bound to usbip-vudc, to USB/IP
/// clients such as Linux's vhci-hcd.
#[derive(Parser, Debug)]
#[command(name = "usbipd", version, about)]
pub(crate) struct Args {
    /// Listen on IPv4 only.
    #[arg(short = '4', long = "ipv4")]
    ipv4: bool,
    /// Listen on IPv6 only.
    #[arg(short = '6', long = "ipv6")]
    ipv6: bool,
    /// TCP port to listen on; 0 takes an ephemeral port, reported once
    /// ready (log, sd_notify STATUS=, --ready-fd).
    #[arg(short = 't', long = "tcp-port")]
    tcp_port: Option<u16>,
    /// Listen on this address only (may be repeated), e.g. 127.0.0.1.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<IpAddr>,
    /// Once serving, write the listening addresses and a newline to this
    /// file descriptor, then close it (e.g. `--ready-fd 3 3>&1`).
    #[arg(long = "ready-fd", value_name = "FD")]
    ready_fd: Option<RawFd>,
    /// Run as a daemon in the background.
    #[arg(short = 'D', long = "daemon")]
    daemon: bool,
    /// Write the process id to FILE (default /var/run/usbipd.pid).
    #[arg(short = 'P', long = "pid", value_name = "FILE", num_args = 0..=1,
          default_missing_value = "/var/run/usbipd.pid")]
    pid: Option<PathBuf>,
    /// Print debugging information.
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// TOML file listing the emulated devices to export, and the access
    /// rules (its [[access]] rules are reloaded on SIGHUP).
    #[arg(long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Export a demo set with no files needed: a 64 MiB disk, a keyboard,
    /// a serial echo port and the test device.
    #[arg(long = "demo")]
    demo: bool,
    /// Control socket for `usbip bind/unbind` (real USB devices).
    #[arg(long = "control-socket", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Let members of GROUP use the control socket (mode 0660 instead of 0600).
    #[arg(long = "control-group", value_name = "GROUP")]
    control_group: Option<String>,
    /// Device mode, as the C usbipd's -e: also export every gadget bound
    /// to the kernel's usbip-vudc UDC (modprobe usbip-vudc, then bind a
    /// gadget to usbip-vudc.N), under that name; the kernel serves its
    /// URBs. Gadgets bound or unbound later are followed at each device
    /// list and import. Emulated devices and usbfs bindings are exported
    /// beside them (the C daemon's -e exports only the gadgets).
    #[arg(short = 'e', long = "device")]
    device: bool,
    /// No control socket: export only the configured emulated devices.
    #[arg(long = "no-control")]
    no_control: bool,
    /// Where bindings of real devices persist across restarts.
    #[arg(long = "state-file", value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    state_file: PathBuf,
    /// Where no kernel uevents arrive (a user namespace of its own, no
    /// netlink), how often to look for bound devices that were unplugged or
    /// plugged in (ms). With uevents, hotplug is followed as it happens.
    #[arg(long = "hotplug-interval-ms", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    hotplug_interval_ms: u64,
    /// Serve TLS 1.3 with this certificate chain (PEM); needs --tls-key and
    /// --tls-client-ca. Plaintext connections are then refused unless
    /// --allow-plaintext lets their source in.
    #[arg(long = "tls-cert", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (PEM).
    #[arg(long = "tls-client-ca", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Also accept the client certificate with this SHA-256 fingerprint
    /// (64 hex digits, colons optional; may be repeated), with or instead
    /// of a client CA.
    #[arg(long = "tls-client-fingerprint", value_name = "HEX")]
    tls_client_fingerprint: Vec<Fingerprint>,
    /// With TLS on, let plaintext USB/IP in from this source network (may
    /// be repeated), e.g. 127.0.0.0/8 for local tools.
    #[arg(long = "allow-plaintext", value_name = "CIDR")]
    allow_plaintext: Vec<ipnet::IpNet>,
    /// Move each TLS import's URB phase to kernel TLS: "auto" where this
    /// kernel has it (modprobe tls), "on" to refuse to start without it,
    /// "off" to keep TLS in user space.
    #[arg(long = "tls-kernel", value_name = "auto|on|off")]
    tls_kernel: Option<KernelTls>,
    /// Seconds a client may take to complete its TLS handshake (default 10).
    #[arg(long = "tls-handshake-timeout", value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=300))]
    tls_handshake_timeout: Option<u64>,
    /// Bytes all connections together may have in flight (transfer
    /// buffers and unsent replies); a connection that would go over waits
    /// its turn. Default 256 MiB.
    #[arg(long = "max-inflight-bytes", value_name = "BYTES")]
    max_inflight_bytes: Option<usize>,
    /// Serve Prometheus metrics (connections, imports, refusals, URBs and
    /// bytes by device, error holds, TLS handshakes) over HTTP at
    /// http://ADDR/metrics, e.g. 127.0.0.1:9240; port 0 takes an ephemeral
    /// port, logged once bound.
    #[arg(long = "metrics", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Do not advertise this server over DNS-SD (mDNS `_usbip._tcp`, which
    /// `usbip list --discover` browses); the config's `[discovery]
    /// advertise = false` does the same.
    #[arg(long = "no-advertise")]
    no_advertise: bool,
    /// The DNS-SD instance name to advertise (default: the host name).
    #[arg(long = "advertise-name", value_name = "NAME")]
    advertise_name: Option<String>,
    /// Record every URB (submission and completion, with its data) into
    /// FILE, a pcapng in Linux usbmon's format that Wireshark and tshark
    /// open. Recording never slows the devices down: what the writer
    /// cannot keep up with is dropped and counted.
    #[arg(long = "capture", value_name = "FILE")]
    capture: Option<PathBuf>,
    /// With --capture: record only this device's URBs.
    #[arg(long = "capture-busid", value_name = "BUSID")]
    capture_busid: Option<String>,
    /// With --capture: the file's size limit in bytes, past which URBs are
    /// no longer recorded (default 256 MiB).
    #[arg(long = "capture-limit", value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1..))]
    capture_limit: Option<u64>,
    /// Publish the exported devices to the fleet: the etcd cluster at these
    /// client URLs (comma-separated, e.g. http://10.0.0.1:2379,...), under a
    /// lease kept alive. Publishing never holds up local export: while
    /// etcd is unreachable the devices stay exported here, and publishing
    /// resumes by itself.
    #[arg(long = "fleet", value_name = "ENDPOINTS")]
    fleet: Option<String>,
    /// This server's id in the fleet, and HOST of its devices' default
    /// names HOST/BUSID (default: the host name).
    #[arg(long = "fleet-name", value_name = "NAME")]
    fleet_name: Option<String>,
    /// Seconds a dead server's devices stay in the fleet (the lease's TTL;
    /// default 5).
    #[arg(long = "fleet-ttl", value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    fleet_ttl: Option<u64>,
    /// HOST:PORT where clients reach this server (default: the listening
    /// address, or the host name when listening on every address).
    #[arg(long = "fleet-address", value_name = "HOST:PORT")]
    fleet_address: Option<String>,
}

const DEFAULT_STATE_FILE: &str = "/var/lib/usbwire/bindings.json";

fn main() -> ExitCode {
    // Taking the sockets a service manager passed clears LISTEN_* from the
    // environment, which is sound only while this is the only thread.
    // SAFETY: nothing has started another thread yet.
    let inherited = unsafe { listen::take_inherited() };
    let args = Args::parse();
    let filter = if args.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("USBWIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(args, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("usbipd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args, inherited: Result<Vec<Listener>, ListenError>) -> Result<(), String> {
    let inherited = inherited.map_err(|e| e.to_string())?;
    let (config, server_config) = load_config(&args)?;
    if args.config.is_none() && !args.demo && args.no_control && !args.device {
        return Err(
            "nothing to export: pass --demo, --device (gadgets on usbip-vudc), \
             or --config FILE listing devices"
                .into(),
        );
    }
    let ready_fd = args
        .ready_fd
        .map(|fd| listen::take_ready_fd(fd, inherited.len()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let listeners = choose_listeners(&args, &config, inherited)?;
    let control = open_control_socket(&args)?;
    detach(&args)?;
    // Connections run on the server's own worker threads; this runtime
    // only accepts them and runs the control socket, hotplug and the
    // device feeders.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let result = runtime.block_on(serve(
        &args,
        config,
        server_config,
        listeners,
        control,
        ready_fd,
    ));
    if let Some(pid) = &args.pid {
        let _ = std::fs::remove_file(pid);
    }
    result
}

/// The configuration file (or none), and the server settings it makes.
fn load_config(args: &Args) -> Result<(Config, ServerConfig), String> {
    let config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let mut server_config = ServerConfig::default();
    config.server.apply(&mut server_config);
    if let Some(v) = args.max_inflight_bytes {
        server_config.max_inflight_bytes = v;
    }
    if let Some(s) = args
        .tls_handshake_timeout
        .or(config.tls.handshake_timeout_secs)
    {
        server_config.tls_handshake_timeout = std::time::Duration::from_secs(s);
    }
    let (access, pinned) = access(args, &config)?;
    server_config.access = access;
    let policy = config.policy();
    log_policy(
        &policy,
        "in force",
        Identities::of(args, &config, &server_config),
    );
    server_config.acl = AccessControl {
        policy: SharedPolicy::new(policy),
        pinned,
    };
    server_config
        .validate()
        .map_err(|e| format!("invalid configuration: {e}"))?;
    Ok((config, server_config))
}

/// What identifies this server's clients, to tell which access rules can
/// match.
#[derive(Debug, Clone, Copy)]
struct Identities {
    tls: bool,
    client_ca: bool,
}

impl Identities {
    fn of(args: &Args, config: &Config, server: &ServerConfig) -> Identities {
        Identities {
            tls: server.access.tls.is_some(),
            client_ca: args.tls_client_ca.is_some() || config.tls.client_ca.is_some(),
        }
    }
}

/// Says which access rules are in force (`what`: how they came to be), and
/// which of their clients no connection can ever be.
fn log_policy(policy: &Policy, what: &str, identities: Identities) {
    if policy.is_open() {
        info!(
            "access policy {what}: no [[access]] rules, every admitted client \
             may see and import every device"
        );
        return;
    }
    info!(
        "access policy {what}: {} rule(s); a device is listed to and importable \
         by only the clients a rule grants it to",
        policy.rules().len()
    );
    for (i, rule) in policy.rules().iter().enumerate() {
        info!("access rule {}: {rule}", i + 1);
        for client in rule.clients() {
            let tls_client = matches!(
                client,
                ClientMatch::Fingerprint(_) | ClientMatch::Subject(_)
            );
            if tls_client && !identities.tls {
                warn!(
                    "access rule {}: {client} names a TLS client, but TLS is off: it grants nothing",
                    i + 1
                );
            } else if matches!(client, ClientMatch::Subject(_)) && !identities.client_ca {
                warn!(
                    "access rule {}: {client} matches only subjects a client CA verified, \
                     and there is no --tls-client-ca: it grants nothing (pin by fingerprint:)",
                    i + 1
                );
            }
        }
    }
}

/// TLS and the plaintext policy, from the flags over the `[tls]` section,
/// and the client fingerprints accepted without the client CA.
fn access(args: &Args, config: &Config) -> Result<(Access, Vec<Fingerprint>), String> {
    let t = &config.tls;
    let cert = args.tls_cert.clone().or_else(|| t.cert.clone());
    let key = args.tls_key.clone().or_else(|| t.key.clone());
    let client_ca = args.tls_client_ca.clone().or_else(|| t.client_ca.clone());
    let mut client_fingerprints = t
        .client_fingerprints
        .iter()
        .map(|f| {
            f.parse()
                .map_err(|e| format!("tls.client_fingerprints: {e}"))
        })
        .collect::<Result<Vec<Fingerprint>, String>>()?;
    client_fingerprints.extend(args.tls_client_fingerprint.iter().copied());
    let mut allow_plaintext = t.allow_plaintext.clone();
    allow_plaintext.extend(args.allow_plaintext.iter().copied());
    let any_client_policy = client_ca.is_some() || !client_fingerprints.is_empty();
    let kernel = match (args.tls_kernel, &t.kernel) {
        (Some(k), _) => Some(k),
        (None, Some(k)) => Some(k.parse().map_err(|e| format!("tls.kernel: {e}"))?),
        (None, None) => None,
    };
    let tls = match (cert, key) {
        (None, None) if !any_client_policy => {
            if !allow_plaintext.is_empty() {
                return Err("--allow-plaintext only means something with TLS on: \
                     also give --tls-cert, --tls-key and --tls-client-ca"
                    .into());
            }
            if kernel.is_some() {
                return Err(
                    "--tls-kernel (tls.kernel) only means something with TLS on: \
                     also give --tls-cert, --tls-key and --tls-client-ca"
                        .into(),
                );
            }
            warn!(
                "no TLS configured: every exported device is open to anyone who can \
                 reach this port, unauthenticated and unencrypted \
                 (see --tls-cert, --tls-key, --tls-client-ca)"
            );
            None
        }
        (Some(cert), Some(key)) if any_client_policy => {
            let files = TlsFiles {
                cert,
                key,
                client_ca,
                client_fingerprints: client_fingerprints.clone(),
            };
            let tls = tls::server_config(&files).map_err(|e| format!("TLS: {e}"))?;
            let own = tls::cert_fingerprint(&files.cert).map_err(|e| format!("TLS: {e}"))?;
            info!("server certificate SHA-256 fingerprint: {own} (clients may pin it)");
            let clients = match (&files.client_ca, files.client_fingerprints.len()) {
                (Some(ca), 0) => format!("signed by {}", ca.display()),
                (None, n) => format!("with one of {n} pinned fingerprint(s)"),
                (Some(ca), n) => {
                    format!(
                        "signed by {} or with one of {n} pinned fingerprint(s)",
                        ca.display()
                    )
                }
            };
            info!(
                "TLS 1.3 required, for clients with a certificate {clients}; \
                 plaintext allowed from: {}",
                if allow_plaintext.is_empty() {
                    "nowhere".to_string()
                } else {
                    allow_plaintext
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
            match kernel.unwrap_or_default() {
                KernelTls::On => {
                    tls::probe_kernel_tls().map_err(|e| {
                        format!(
                            "kernel TLS is required (--tls-kernel on, tls.kernel = \"on\"): {e}"
                        )
                    })?;
                    info!("kernel TLS carries the URB phase of every TLS import");
                }
                KernelTls::Auto => {}
                KernelTls::Off => info!("kernel TLS off: TLS runs in user space (rustls)"),
            }
            Some(tls)
        }
        (cert, key) => {
            let missing: Vec<&str> = [
                (cert.is_none(), "--tls-cert (tls.cert)"),
                (key.is_none(), "--tls-key (tls.key)"),
                (
                    !any_client_policy,
                    "--tls-client-ca or --tls-client-fingerprint \
                     (tls.client_ca, tls.client_fingerprints)",
                ),
            ]
            .into_iter()
            .filter_map(|(m, name)| m.then_some(name))
            .collect();
            return Err(format!(
                "TLS needs a certificate, its key and a way to accept clients; missing: {}",
                missing.join(", ")
            ));
        }
    };
    Ok((
        Access {
            tls,
            allow_plaintext,
            kernel: kernel.unwrap_or_default(),
        },
        client_fingerprints,
    ))
}

/// The sockets the service manager passed, or else new ones bound as the
/// flags and the configuration say.
fn choose_listeners(
    args: &Args,
    config: &Config,
    inherited: Vec<Listener>,
) -> Result<Vec<Listener>, String> {
    if inherited.is_empty() {
        let port = args.tcp_port.or(config.server.tcp_port).unwrap_or(3240);
        // Bind before daemonising, so that a port already in use is
        // reported to the person who started us.
        return bind(args, port);
    }
    if args.tcp_port.is_some() || !args.listen.is_empty() || args.ipv4 || args.ipv6 {
        return Err(format!(
            "the service manager passed {} listening socket(s) (LISTEN_FDS); \
             -t, --listen, -4 and -6 choose sockets to bind, so leave them out",
            inherited.len()
        ));
    }
    if config.server.tcp_port.is_some() {
        info!("server.tcp_port is ignored: serving the sockets the service manager passed");
    }
    Ok(inherited)
}

/// The control socket's listener, before anything serves it.
struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// The control socket, unless `--no-control`. Without the flags that ask
/// for one, failing to create the default socket is only a warning.
fn open_control_socket(args: &Args) -> Result<Option<ControlSocket>, String> {
    if args.no_control {
        return Ok(None);
    }
    let path = args
        .control_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(control::DEFAULT_SOCKET));
    match control::listen(&path, args.control_group.as_deref()) {
        Ok(listener) => Ok(Some(ControlSocket { listener, path })),
        Err(e) if args.control_socket.is_none() && args.control_group.is_none() => {
            tracing::warn!(
                "no control socket ({}: {e}); real USB devices cannot be bound",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(format!(
            "cannot create the control socket {}: {e}",
            path.display()
        )),
    }
}

/// Daemonises if asked to, then writes the pid file.
fn detach(args: &Args) -> Result<(), String> {
    if args.daemon {
        nix::unistd::daemon(false, false).map_err(|e| format!("cannot daemonise: {e}"))?;
    }
    if let Some(pid) = &args.pid {
        std::fs::write(pid, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file {}: {e}", pid.display()))?;
    }
    Ok(())
}

/// Exports the devices, serves until a signal, then takes everything down
/// in order: real devices back to their drivers, emulated ones flushed,
/// and only then the demo image deleted.
async fn serve(
    args: &Args,
    mut config: Config,
    server_config: ServerConfig,
    listeners: Vec<Listener>,
    control: Option<ControlSocket>,
    ready_fd: Option<File>,
) -> Result<(), String> {
    let registry = Registry::new();
    let (exported, demo_image) = export_devices(&registry, &mut config, args.demo)?;
    if args.device || config.server.device_mode == Some(true) {
        export_gadgets(&registry).await;
    }
    let (addrs, sockets) = tokio_listeners(listeners)?;
    // Bound before the control plane starts, which a failure here would
    // leave without its orderly stop.
    let metrics_listener = match args.metrics.or(config.server.metrics) {
        Some(addr) => Some(usbwire_cli::metrics::bind(addr).await?),
        None => None,
    };
    let control_plane = match control {
        Some(socket) => Some(ControlPlane::start(socket, &registry, args).await?),
        None => None,
    };
    let policy = server_config.acl.policy.clone();
    let identities = Identities::of(args, &config, &server_config);
    let advertising = advertise(args, &config, &server_config, &addrs, &registry)?;
    let fleet = start_fleet(args, &config, &registry, &exported, &addrs)?;
    let mut server_config = server_config;
    if let Some(fleet) = &fleet {
        // A reserved device is imported only by its holder.
        server_config.import_gate = usbwire_server::gate::Gate::new(Arc::new(
            usbwire_fleet::reserve::FleetGate::new(fleet.endpoints(), fleet.name_of()),
        ));
    }
    let server = Server::new(registry, server_config).map_err(|e| e.to_string())?;
    let capture = start_capture(args, &config).await?;
    if let Some(capture) = &capture {
        server.set_capture(capture.clone());
    }
    let metrics = metrics_listener
        .map(|listener| tokio::spawn(usbwire_cli::metrics::serve(listener, server.clone())));
    listen::announce_ready(&addrs, ready_fd);
    listen::spawn_watchdog();
    server
        .run(sockets, async {
            shutdown_signal(args.config.as_deref(), &policy, identities).await;
            listen::announce_stopping();
        })
        .await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    // The goodbye first: clients stop picking devices about to go away.
    if let Some(fleet) = fleet {
        fleet.stop().await;
    }
    if let Some(advertising) = advertising {
        advertising.stop().await;
    }
    if let Some(capture) = capture {
        // Every import has ended: what they recorded is all queued.
        let _ = tokio::task::spawn_blocking(move || capture.finish()).await;
    }
    if let Some(control_plane) = control_plane {
        control_plane.stop().await;
    }
    drop(exported);
    // The demo image is deleted only after the devices are flushed and gone.
    drop(demo_image);
    Ok(())
}

/// The DNS-SD advertisement, following the registry's device count.
struct Advertising {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Advertising {
    /// Withdraws the advertisement (goodbye packets, bounded in time).
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Starts advertising over DNS-SD unless switched off (`--no-advertise`,
/// `[discovery] advertise = false`). A host where mDNS cannot start
/// (no multicast-capable socket) serves all the same, with a warning.
fn advertise(
    args: &Args,
    config: &Config,
    server_config: &ServerConfig,
    addrs: &[SocketAddr],
    registry: &Registry,
) -> Result<Option<Advertising>, String> {
    if args.no_advertise || config.discovery.advertise == Some(false) {
        info!("not advertised over DNS-SD (switched off)");
        return Ok(None);
    }
    let fingerprint = match (
        &server_config.access.tls,
        args.tls_cert.as_ref().or(config.tls.cert.as_ref()),
    ) {
        (Some(_), Some(cert)) => {
            Some(tls::cert_fingerprint(cert).map_err(|e| format!("TLS: {e}"))?)
        }
        _ => None,
    };
    let txt = discovery::Txt {
        tls: if server_config.access.tls.is_some() {
            discovery::TlsMode::Required
        } else {
            discovery::TlsMode::Off
        },
        fingerprint,
        devices: registry.all().len(),
    };
    let name = args
        .advertise_name
        .clone()
        .or_else(|| config.discovery.name.clone())
        .unwrap_or_else(discovery::host_name);
    let mut advertiser = match Advertiser::start(&name, addrs, txt) {
        Ok(Some(a)) => a,
        Ok(None) => return Ok(None),
        Err(e) => {
            warn!("{e}; serving without DNS-SD (--no-advertise silences this)");
            return Ok(None);
        }
    };
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let mut changes = registry.changes();
    let registry = registry.clone();
    let task = tokio::spawn(async move {
        // Each turn waits for a change of the registry or the stop.
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    advertiser.set_devices(registry.all().len());
                }
                _ = &mut stopped => break,
            }
        }
        advertiser.stop().await;
    });
    Ok(Some(Advertising { stop, task }))
}

/// Starts the URB capture that `--capture` or the config's `capture`
/// asks for.
async fn start_capture(
    args: &Args,
    config: &Config,
) -> Result<Option<Arc<usbwire_server::capture::Capture>>, String> {
    use usbwire_server::capture::{Capture, CaptureConfig, DEFAULT_LIMIT};
    let server = &config.server;
    let busid = args.capture_busid.clone().or(server.capture_busid.clone());
    let limit = args.capture_limit.or(server.capture_limit);
    let Some(path) = args.capture.clone().or(server.capture.clone()) else {
        if busid.is_some() || limit.is_some() {
            return Err(
                "--capture-busid and --capture-limit (capture_busid, capture_limit) \
                        need a capture file: add --capture FILE"
                    .into(),
            );
        }
        return Ok(None);
    };
    let capture = CaptureConfig {
        path,
        busid,
        limit: limit.unwrap_or(DEFAULT_LIMIT),
    };
    // Creating the file and its first blocks touches the disk.
    let started = tokio::task::spawn_blocking(move || Capture::start(capture))
        .await
        .map_err(|e| format!("starting the capture panicked: {e}"))?;
    started
        .map(|c| Some(Arc::new(c)))
        .map_err(|e| e.to_string())
}

/// With `--fleet` (or `[fleet] endpoints`), starts publishing the
/// registry's devices to etcd, on a task of its own.
fn start_fleet(
    args: &Args,
    config: &Config,
    registry: &Registry,
    exported: &[Exported],
    listening: &[SocketAddr],
) -> Result<Option<Fleet>, String> {
    let endpoints = match (&args.fleet, config.fleet.endpoints.is_empty()) {
        (Some(list), _) => list.clone(),
        (None, false) => config.fleet.endpoints.join(","),
        (None, true) => {
            if args.fleet_name.is_some() || args.fleet_ttl.is_some() || args.fleet_address.is_some()
            {
                return Err(
                    "--fleet-name, --fleet-ttl and --fleet-address only mean something \
                     with --fleet ENDPOINTS (or [fleet] endpoints)"
                        .into(),
                );
            }
            return Ok(None);
        }
    };
    let endpoints =
        usbwire_fleet::record::parse_endpoints(&endpoints).map_err(|e| e.to_string())?;
    let server_id = args
        .fleet_name
        .clone()
        .or_else(|| config.fleet.name.clone())
        .unwrap_or_else(fleet::host_name);
    let (host, port) = fleet::reach(
        args.fleet_address
            .as_deref()
            .or(config.fleet.address.as_deref()),
        listening,
    )?;
    let cert = args.tls_cert.clone().or_else(|| config.tls.cert.clone());
    let fingerprint = match &cert {
        Some(cert) => Some(
            tls::cert_fingerprint(cert)
                .map_err(|e| format!("TLS: {e}"))?
                .to_string(),
        ),
        None => None,
    };
    let ttl = args
        .fleet_ttl
        .or(config.fleet.ttl_secs)
        .map(Duration::from_secs)
        .unwrap_or(usbwire_fleet::publish::DEFAULT_TTL);
    let meta = exported
        .iter()
        .zip(&config.devices)
        .map(|(e, d)| {
            (
                e.busid.clone(),
                fleet::DeviceMeta {
                    name: d.fleet_name().map(str::to_string),
                    labels: d.labels().to_vec(),
                    serial: d.serial().map(str::to_string),
                },
            )
        })
        .collect();
    info!(
        "fleet: publishing to {} as server {server_id}, reached at {host}:{port}, lease ttl {ttl:?}",
        endpoints.join(",")
    );
    let settings = fleet::FleetSettings {
        endpoints,
        server_id,
        ttl,
        host,
        port,
        tls: cert.is_some(),
        fingerprint,
    };
    Ok(Some(Fleet::start(settings, registry, meta)))
}

/// Exports the configured devices (and the demo set with `--demo`, whose
/// image file lives as long as the returned path).
fn export_devices(
    registry: &Registry,
    config: &mut Config,
    demo: bool,
) -> Result<(Vec<Exported>, Option<tempfile::TempPath>), String> {
    let mut demo_image = None;
    if demo {
        let (set, image) = devices::demo_set().map_err(|e| e.to_string())?;
        config.devices.extend(set);
        demo_image = Some(image);
    }
    let mut exported = Vec::new();
    for (i, d) in config.devices.iter().enumerate() {
        let e = devices::export(registry, d, i).map_err(|e| e.to_string())?;
        info!("exporting {} as {}", e.description, e.busid);
        exported.push(e);
    }
    Ok((exported, demo_image))
}

/// Device mode: exports the gadgets bound to usbip-vudc now, and keeps
/// the registry in step with them before each device list and import.
async fn export_gadgets(registry: &Registry) {
    let roots = Roots::default();
    let loaded = roots
        .sys
        .join("bus/platform/drivers")
        .join(usbwire_host::vudc::VUDC_NAME)
        .exists();
    let gadgets = Arc::new(VudcExports::new(
        roots,
        control::RegistryExports(registry.clone()),
    ));
    let first = gadgets.clone();
    let _ = tokio::task::spawn_blocking(move || first.refresh()).await;
    if !loaded {
        warn!(
            "device mode: the usbip-vudc driver is not loaded (modprobe usbip-vudc); \
             no gadget can be exported until it is"
        );
    } else if gadgets.exported().is_empty() {
        info!(
            "device mode: no gadget is bound to usbip-vudc yet; one bound later \
             is exported at the next device list or import"
        );
    }
    registry.add_refresher(move || gadgets.refresh());
}

/// The listeners as tokio sockets, with their addresses, logged.
fn tokio_listeners(
    listeners: Vec<Listener>,
) -> Result<(Vec<SocketAddr>, Vec<TcpListener>), String> {
    let mut addrs = Vec::new();
    let mut sockets = Vec::new();
    for l in listeners {
        match &l.origin {
            Origin::Inherited { fd, name } => info!(
                "listening on {} (fd {fd} \"{name}\" from the service manager)",
                l.addr
            ),
            Origin::Bound => info!("listening on {}", l.addr),
        }
        addrs.push(l.addr);
        sockets.push(TcpListener::from_std(l.socket).map_err(|e| e.to_string())?);
    }
    Ok((addrs, sockets))
}

/// The bind manager for real USB devices, with the control socket and
/// hotplug tasks that drive it.
struct ControlPlane {
    manager: Arc<Manager>,
    path: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ControlPlane {
    async fn start(
        socket: ControlSocket,
        registry: &Registry,
        args: &Args,
    ) -> Result<ControlPlane, String> {
        let manager = Arc::new(
            Manager::new(
                Roots::default(),
                control::RegistryExports(registry.clone()),
                Some(args.state_file.clone()),
            )
            .map_err(|e| format!("cannot read the state file: {e}"))?,
        );
        // Bindings from the last run come back before anyone connects.
        let restoring = manager.clone();
        let _ = tokio::task::spawn_blocking(move || restoring.poll()).await;
        let tasks = vec![
            manager.spawn_hotplug(Duration::from_millis(args.hotplug_interval_ms)),
            tokio::spawn(control::serve(
                socket.listener,
                manager.clone(),
                registry.clone(),
            )),
        ];
        info!("control socket on {}", socket.path.display());
        Ok(ControlPlane {
            manager,
            path: socket.path,
            tasks,
        })
    }

    async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        // Every real device goes back to its kernel drivers; the
        // bindings stay in the state file for the next start.
        let manager = self.manager;
        let _ = tokio::task::spawn_blocking(move || manager.shutdown()).await;
        let _ = std::fs::remove_file(self.path);
    }
}

fn bind(args: &Args, port: u16) -> Result<Vec<Listener>, String> {
    let addrs: Vec<(IpAddr, bool)> = if !args.listen.is_empty() {
        args.listen.iter().map(|a| (*a, a.is_ipv6())).collect()
    } else if args.ipv4 && !args.ipv6 {
        vec![(Ipv4Addr::UNSPECIFIED.into(), false)]
    } else if args.ipv6 && !args.ipv4 {
        vec![(Ipv6Addr::UNSPECIFIED.into(), true)]
    } else {
        // Like the C usbipd: every address family.
        vec![
            (Ipv4Addr::UNSPECIFIED.into(), false),
            (Ipv6Addr::UNSPECIFIED.into(), true),
        ]
    };
    let (listeners, warnings) = listen::bind(&addrs, port).map_err(|e| e.to_string())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok(listeners)
}

/// Resolves on SIGINT or SIGTERM; on each SIGHUP meanwhile, reloads the
/// access rules from `config` into `policy`.
async fn shutdown_signal(
    config: Option<&std::path::Path>,
    policy: &SharedPolicy,
    identities: Identities,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("installing a SIGHUP handler");
    // Each turn waits for a signal; only SIGINT and SIGTERM end it.
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return info!("SIGINT received"),
            _ = term.recv() => return info!("SIGTERM received"),
            _ = hup.recv() => reload_policy(config, policy, identities).await,
        }
    }
}

/// SIGHUP: the `[[access]]` rules of the configuration file replace the
/// policy in force, for new connections and running imports alike (an
/// import they no longer grant ends). Nothing else is reloaded. A file that
/// cannot be read or is invalid leaves the policy in force as it was.
async fn reload_policy(
    config: Option<&std::path::Path>,
    policy: &SharedPolicy,
    identities: Identities,
) {
    let Some(path) = config.map(|p| p.to_path_buf()) else {
        warn!("SIGHUP: no --config file to reload the access rules from; nothing changed");
        return;
    };
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
    match loaded {
        Ok(Ok(config)) => {
            let new = config.policy();
            policy.replace(new.clone());
            log_policy(
                &new,
                "reloaded on SIGHUP (only [[access]] is reloaded)",
                identities,
            );
        }
        Ok(Err(e)) => warn!("SIGHUP: the access policy in force is kept: {e}"),
        Err(e) => warn!("SIGHUP: the access policy in force is kept: reading the file failed: {e}"),
    }
}
