//! DNS-SD over multicast DNS: `usbipd` advertises itself as `_usbip._tcp`,
//! and `usbip list --discover` browses for it (the `mdns-sd` crate, whose
//! own thread does all the network work; nothing here blocks a runtime).
//!
//! The advertisement is one service instance per listening port, named
//! after the host unless configured, with these TXT keys:
//!
//! | key       | value                                                   |
//! |-----------|---------------------------------------------------------|
//! | `txtvers` | `1`, the version of this set of keys (RFC 6763 §6.7)    |
//! | `proto`   | `1.1.1`, the USB/IP protocol version (0x0111 on the wire) |
//! | `tls`     | `required` or `off`                                     |
//! | `fp`      | with TLS: the server certificate's SHA-256, `AB:CD:…`   |
//! | `devices` | how many devices are exported now (imported ones too)   |
//!
//! It goes out on every interface with an address except loopback, which
//! has no MULTICAST flag and whose peers can reach the port directly
//! anyway; a daemon listening on specific addresses only advertises those,
//! and one listening on loopback alone is not advertised at all.
//!
//! mDNS is unauthenticated: anyone on the link can answer for any name.
//! The advertised fingerprint tells a person what to pin; `usbip` never
//! trusts a server because of it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use mdns_sd::{IfKind, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo, UnregisterStatus};
use usbwire_server::tls::Fingerprint;

/// The DNS-SD service type, in the form mDNS queries name it.
pub const SERVICE_TYPE: &str = "_usbip._tcp.local.";

/// The protocol version the `proto` key carries.
pub const PROTOCOL_VERSION: &str = "1.1.1";

/// How long `usbipd` waits for its goodbye packets to go out at shutdown.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot start mDNS (DNS-SD): {0}")]
    Daemon(mdns_sd::Error),
    #[error("cannot advertise {name:?} over mDNS: {source}")]
    Register {
        name: String,
        source: mdns_sd::Error,
    },
    #[error("cannot browse for {SERVICE_TYPE} over mDNS: {0}")]
    Browse(mdns_sd::Error),
}

/// Whether clients must speak TLS, as the `tls` key says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Required,
    Off,
}

/// What the TXT record says about a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txt {
    pub tls: TlsMode,
    /// The server certificate's, with TLS on.
    pub fingerprint: Option<Fingerprint>,
    pub devices: usize,
}

impl Txt {
    /// The key/value pairs, in the order they are sent.
    pub fn records(&self) -> Vec<(&'static str, String)> {
        let mut r = vec![
            ("txtvers", "1".to_string()),
            ("proto", PROTOCOL_VERSION.to_string()),
            (
                "tls",
                match self.tls {
                    TlsMode::Required => "required",
                    TlsMode::Off => "off",
                }
                .to_string(),
            ),
        ];
        if let Some(fp) = self.fingerprint {
            r.push(("fp", fp.to_string()));
        }
        r.push(("devices", self.devices.to_string()));
        r
    }
}

/// This host's name, the default instance name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "usbwire".into())
}

/// The services `usbipd` advertises, kept current by [`Advertiser::set_devices`].
pub struct Advertiser {
    daemon: ServiceDaemon,
    services: Vec<Service>,
    txt: Txt,
}

/// One advertised instance, enough to announce it again.
struct Service {
    instance: String,
    host: String,
    port: u16,
    addrs: PortAddrs,
    fullname: String,
}

impl Service {
    /// Its record with `txt`; `first` asks mdns-sd to probe for a name
    /// conflict, which only a name's first announcement needs.
    fn info(&self, txt: &Txt, first: bool) -> Result<ServiceInfo, mdns_sd::Error> {
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.instance,
            &self.host,
            self.addrs.specific.as_slice(),
            self.port,
            &txt.records()[..],
        )?;
        if self.addrs.any_v4 || self.addrs.any_v6 {
            info = info.enable_addr_auto();
            info.set_interfaces(match (self.addrs.any_v4, self.addrs.any_v6) {
                (true, false) => vec![IfKind::IPv4],
                (false, true) => vec![IfKind::IPv6],
                _ => vec![IfKind::All],
            });
        }
        info.set_requires_probe(first);
        Ok(info)
    }
}

impl Advertiser {
    /// Advertises `name` on the ports of `listeners`; `None` (and a log
    /// line saying why) when every listener is on loopback.
    pub fn start(
        name: &str,
        listeners: &[SocketAddr],
        txt: Txt,
    ) -> Result<Option<Advertiser>, DiscoveryError> {
        let ports = advertised_ports(listeners);
        if ports.is_empty() {
            tracing::info!(
                "not advertised over DNS-SD: usbipd listens on loopback only, \
                 which no other host can reach"
            );
            return Ok(None);
        }
        let daemon = ServiceDaemon::new().map_err(DiscoveryError::Daemon)?;
        // Loopback carries no multicast; local clients connect directly.
        daemon
            .disable_interface(vec![IfKind::LoopbackV4, IfKind::LoopbackV6])
            .map_err(DiscoveryError::Daemon)?;
        let host = format!("{}.local.", host_name());
        let several = ports.len() > 1;
        let mut services = Vec::new();
        for (port, addrs) in ports {
            let instance = if several {
                format!("{name} (port {port})")
            } else {
                name.to_string()
            };
            let register = |source| DiscoveryError::Register {
                name: instance.clone(),
                source,
            };
            let mut service = Service {
                instance: instance.clone(),
                host: host.clone(),
                port,
                addrs,
                fullname: String::new(),
            };
            let info = service.info(&txt, true).map_err(register)?;
            service.fullname = info.get_fullname().to_string();
            daemon.register(info).map_err(register)?;
            tracing::info!(
                "advertising {instance:?} as {SERVICE_TYPE} on port {port} over mDNS ({})",
                txt_line(&txt)
            );
            services.push(service);
        }
        Ok(Some(Advertiser {
            daemon,
            services,
            txt,
        }))
    }

    /// Re-announces with `devices` in the TXT record, if that changed.
    pub fn set_devices(&mut self, devices: usize) {
        if self.txt.devices == devices {
            return;
        }
        self.txt.devices = devices;
        for service in &self.services {
            let announced = service
                .info(&self.txt, false)
                .and_then(|info| self.daemon.register(info));
            if let Err(e) = announced {
                tracing::warn!("DNS-SD: cannot re-announce {:?}: {e}", service.instance);
            }
        }
        tracing::info!("DNS-SD: re-announced ({})", txt_line(&self.txt));
    }

    /// Says goodbye for every service (so browsers drop them at once),
    /// waiting a bounded time for the packets to go, then stops mDNS.
    pub async fn stop(self) {
        for service in &self.services {
            let Ok(status) = self.daemon.unregister(&service.fullname) else {
                continue;
            };
            match tokio::time::timeout(GOODBYE_TIMEOUT, status.recv_async()).await {
                Ok(Ok(UnregisterStatus::OK)) => {}
                other => tracing::warn!(
                    "DNS-SD: no confirmation that {} was withdrawn: {other:?}",
                    service.fullname
                ),
            }
        }
        let _ = self.daemon.shutdown();
    }
}

fn txt_line(txt: &Txt) -> String {
    txt.records()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The instance label of a full service name, unescaped.
fn instance_of(fullname: &str) -> String {
    let label = fullname
        .strip_suffix(SERVICE_TYPE)
        .map(|s| s.trim_end_matches('.'))
        .unwrap_or(fullname);
    label.replace("\\.", ".").replace("\\\\", "\\")
}

/// The addresses one advertised port is reachable on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PortAddrs {
    any_v4: bool,
    any_v6: bool,
    specific: Vec<IpAddr>,
}

/// The listeners' ports, each with what it listens on, loopback left out.
fn advertised_ports(listeners: &[SocketAddr]) -> BTreeMap<u16, PortAddrs> {
    let mut ports: BTreeMap<u16, PortAddrs> = BTreeMap::new();
    for l in listeners {
        let ip = l.ip();
        if ip.is_loopback() {
            continue;
        }
        let p = ports.entry(l.port()).or_default();
        match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => p.any_v4 = true,
            IpAddr::V6(v6) if v6.is_unspecified() => p.any_v6 = true,
            ip => p.specific.push(ip),
        }
    }
    ports
}

/// A server found by [`browse`].
#[derive(Debug, Clone)]
pub struct Found {
    /// The instance name (the host's name unless configured).
    pub instance: String,
    /// The host name its addresses are published under.
    pub host: String,
    /// Where it listens: IPv4 first, then IPv6 (link-local ones scoped).
    pub addresses: Vec<SocketAddr>,
    pub port: u16,
    pub txt: BTreeMap<String, String>,
}

impl Found {
    /// The `tls` key says clients must use TLS.
    pub fn tls_required(&self) -> bool {
        self.txt.get("tls").map(String::as_str) == Some("required")
    }
}

/// Browses for `_usbip._tcp` for `window`, and gives every server
/// resolved meanwhile and not withdrawn, ordered by instance name.
pub async fn browse(window: Duration) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new().map_err(DiscoveryError::Daemon)?;
    let events = daemon
        .browse(SERVICE_TYPE)
        .map_err(DiscoveryError::Browse)?;
    let deadline = tokio::time::Instant::now() + window;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    // Each turn takes one event; the deadline ends the loop.
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv_async()).await {
        match event {
            ServiceEvent::ServiceResolved(s) => {
                let mut addresses: Vec<SocketAddr> =
                    s.addresses.iter().map(|a| socket_addr(a, s.port)).collect();
                addresses.sort_by_key(|a| (a.is_ipv6(), *a));
                let found_one = Found {
                    instance: instance_of(&s.fullname),
                    host: s.host.clone(),
                    addresses,
                    port: s.port,
                    txt: s
                        .txt_properties
                        .iter()
                        .map(|p| (p.key().to_string(), p.val_str().to_string()))
                        .collect(),
                };
                found.insert(s.fullname.clone(), found_one);
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                found.remove(&fullname);
            }
            _ => {}
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    let mut servers: Vec<Found> = found.into_values().collect();
    servers.sort_by(|a, b| a.instance.cmp(&b.instance));
    Ok(servers)
}

fn socket_addr(ip: &ScopedIp, port: u16) -> SocketAddr {
    match (ip.to_ip_addr(), ip) {
        (IpAddr::V6(v6), ScopedIp::V6(scoped)) if v6.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(v6, port, 0, scoped.scope_id().index))
        }
        (addr, _) => SocketAddr::new(addr, port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records_say_version_tls_fingerprint_and_devices() {
        let fp = Fingerprint::of(b"certificate");
        let txt = Txt {
            tls: TlsMode::Required,
            fingerprint: Some(fp),
            devices: 4,
        };
        assert_eq!(
            txt.records(),
            vec![
                ("txtvers", "1".into()),
                ("proto", "1.1.1".into()),
                ("tls", "required".into()),
                ("fp", fp.to_string()),
                ("devices", "4".into()),
            ]
        );
        let off = Txt {
            tls: TlsMode::Off,
            fingerprint: None,
            devices: 0,
        };
        assert_eq!(txt_line(&off), "txtvers=1 proto=1.1.1 tls=off devices=0");
        // The longest record fits DNS's 255-byte character string.
        assert!(txt
            .records()
            .iter()
            .all(|(k, v)| k.len() + 1 + v.len() <= 255));
        // mdns-sd takes them as they are.
        ServiceInfo::new(
            SERVICE_TYPE,
            "a.b",
            "h.local.",
            "10.0.0.1",
            3240,
            &txt.records()[..],
        )
        .unwrap();
    }

    #[test]
    fn loopback_listeners_are_not_advertised() {
        let addrs =
            |s: &[&str]| -> Vec<SocketAddr> { s.iter().map(|a| a.parse().unwrap()).collect() };
        assert!(advertised_ports(&addrs(&["127.0.0.1:3240", "[::1]:3240"])).is_empty());
        let p = advertised_ports(&addrs(&["0.0.0.0:3240", "[::]:3240", "127.0.0.1:4000"]));
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[&3240],
            PortAddrs {
                any_v4: true,
                any_v6: true,
                specific: vec![]
            }
        );
        let p = advertised_ports(&addrs(&["10.77.0.1:3240", "0.0.0.0:3241"]));
        assert_eq!(
            p[&3240].specific,
            vec!["10.77.0.1".parse::<IpAddr>().unwrap()]
        );
        assert!(p[&3241].any_v4 && !p[&3241].any_v6);
    }

    #[test]
    fn instance_names_come_back_unescaped() {
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            "lab.rack 3",
            "h.local.",
            "10.0.0.1",
            1,
            None::<std::collections::HashMap<String, String>>,
        )
        .unwrap();
        assert_eq!(instance_of(info.get_fullname()), "lab.rack 3");
    }
}
