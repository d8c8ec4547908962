//! The `usbipd --config FILE` format (TOML).
//!
//! ```toml
//! [server]
//! tcp_port = 3240
//! max_inflight_bytes = 268435456  # all connections together (256 MiB)
//! reply_stall_timeout_secs = 60   # an import whose client reads no reply that long ends
//! failed_handshake_burst = 16     # failed TLS handshakes, then a source's
//! failed_handshake_refill_ms = 1000  # connections are closed at accept
//! device_mode = false       # like -e: also export gadgets bound to usbip-vudc
//! metrics = "127.0.0.1:9240" # like --metrics: Prometheus text at /metrics
//! capture = "urbs.pcapng"   # like --capture: every URB into a pcapng file
//! capture_busid = "1-1"     # like --capture-busid: only this device's
//! capture_limit = 268435456 # like --capture-limit: the file's size cap
//!
//! [[device]]
//! kind = "mass-storage"
//! image = "disk.img"        # relative paths are relative to this file
//! read_only = false
//!
//! [[device]]
//! kind = "keyboard"
//! fifo = "/run/usbwire/keyboard"
//!
//! [[device]]
//! kind = "serial"
//! backend = "echo"          # or "pty", or "tcp" with listen = "127.0.0.1:4000"
//!
//! [[device]]
//! kind = "test"
//! pattern = 0               # source/sink data: 0 zeros, 1 mod63, 2 none
//! name = "lab2/sourcesink"  # any device: its fleet name (default HOST/BUSID)
//! labels = ["pixel-7", "lab-2"]  # any device: labels published to the fleet
//!
//! [fleet]                   # like --fleet: publish the devices to etcd
//! endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
//! name = "lab2"             # this server's id and HOST in HOST/BUSID (default: host name)
//! ttl_secs = 5              # a dead server's devices leave the fleet after this
//! address = "lab2.example:3240"  # where clients reach this server (default: the listening address)
//!
//! [tls]                     # mutual TLS 1.3; plaintext is then refused...
//! cert = "server.pem"
//! key = "server.key"
//! client_ca = "clients-ca.pem"            # and/or pinned client certificates:
//! client_fingerprints = ["3F:A2:...:09"]   # SHA-256, 64 hex digits
//! allow_plaintext = ["127.0.0.0/8"]   # ...except from these sources
//! kernel = "auto"           # URB phase on kernel TLS where the kernel has it;
//!                           # "on": required (no start without it), "off": never
//! handshake_timeout_secs = 10         # a client's handshake deadline
//!
//! [[access]]                # once there is a rule, only what rules grant
//! devices = ["1-1", "046d:*", "*:c52b"]    # bus id, VID:PID (hex, * wildcard), or *
//! clients = ["fingerprint:3F:A2:...:09",   # a TLS client certificate's SHA-256
//!            "subject:CN=alice*,O=Example", # its CA-verified subject
//!            "cidr:127.0.0.0/8"]            # plaintext clients from there; or *
//!
//! [discovery]               # DNS-SD (mDNS _usbip._tcp), for `usbip list --discover`
//! advertise = true          # false as --no-advertise
//! name = "lab-rack-3"       # the instance name; default: the host name
//! ```
//!
//! The `[[access]]` rules are the one part that `SIGHUP` reloads.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use usbwire_devices::testdev::Pattern;
use usbwire_server::acl::{ClientMatch, DeviceMatch, Policy, Rule};
use usbwire_server::ServerConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub tls: TlsSection,
    /// Per-device access control: with no rule, every admitted client may
    /// use every device.
    #[serde(default, rename = "access")]
    pub access: Vec<AccessRule>,
    #[serde(default)]
    pub discovery: DiscoverySection,
    #[serde(default)]
    pub fleet: FleetSection,
}

/// DNS-SD advertisement (`_usbip._tcp` over mDNS), read by usbipd.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySection {
    /// `false` as `--no-advertise`: not advertised. Default: advertised.
    pub advertise: Option<bool>,
    /// The instance name, as `--advertise-name` (default: the host name).
    pub name: Option<String>,
}

/// Publishing to the fleet (etcd); the `--fleet*` flags override each field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// etcd client URLs; none: no publishing.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// This server's id, and HOST in the default device names HOST/BUSID.
    pub name: Option<String>,
    /// The lease's time to live (seconds).
    pub ttl_secs: Option<u64>,
    /// HOST:PORT where clients reach this server.
    pub address: Option<String>,
}

/// One `[[access]]` rule: these clients may see and import these devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "AccessSection")]
pub struct AccessRule(pub Rule);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessSection {
    #[serde(deserialize_with = "parsed")]
    devices: Vec<DeviceMatch>,
    #[serde(deserialize_with = "parsed")]
    clients: Vec<ClientMatch>,
}

impl TryFrom<AccessSection> for AccessRule {
    type Error = usbwire_server::acl::RuleError;
    fn try_from(a: AccessSection) -> Result<Self, Self::Error> {
        Rule::new(a.devices, a.clients).map(AccessRule)
    }
}

/// A list of strings, each read with `FromStr`; a bad one is an error of
/// this field, which the TOML error locates.
fn parsed<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// TLS 1.3 with client certificates; the flags of the same names override
/// each field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The server's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The server's private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA (PEM) that client certificates must be signed by.
    pub client_ca: Option<PathBuf>,
    /// SHA-256 fingerprints of client certificates accepted without a CA.
    #[serde(default)]
    pub client_fingerprints: Vec<String>,
    /// Sources that may still use plaintext once TLS is on.
    #[serde(default)]
    pub allow_plaintext: Vec<ipnet::IpNet>,
    /// Kernel TLS for the URB phase: "auto" (default), "on" or "off".
    pub kernel: Option<String>,
    /// Seconds a client may take to complete its TLS handshake.
    pub handshake_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub tcp_port: Option<u16>,
    /// As `usbipd --device` (`-e`): export the gadgets bound to the
    /// kernel's usbip-vudc too. Read by usbipd, not the server.
    pub device_mode: Option<bool>,
    /// As `usbipd --metrics`: serve Prometheus metrics on this address.
    /// Read by usbipd, not the server.
    pub metrics: Option<std::net::SocketAddr>,
    /// As `usbipd --capture`: record every URB into this pcapng file
    /// (relative to the config file's folder). Read by usbipd.
    pub capture: Option<PathBuf>,
    /// As `usbipd --capture-busid`.
    pub capture_busid: Option<String>,
    /// As `usbipd --capture-limit`, in bytes.
    pub capture_limit: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_urbs_in_flight: Option<usize>,
    pub max_bytes_in_flight: Option<usize>,
    /// Bytes in flight across all connections together.
    pub max_inflight_bytes: Option<usize>,
    /// Failed TLS handshakes a source may have in a row before its
    /// connections are closed as they are accepted (0: no throttle).
    pub failed_handshake_burst: Option<u32>,
    /// How long until one failed handshake is forgiven.
    pub failed_handshake_refill_ms: Option<u64>,
    pub max_transfer_length: Option<u32>,
    /// Debug only: turning it off lets URBs run past an endpoint error.
    pub hold_on_error: Option<bool>,
    pub hold_floor_ms: Option<u64>,
    pub hold_ceiling_ms: Option<u64>,
    /// Threads serving connections (0: one per CPU).
    pub workers: Option<usize>,
    /// Seconds an import's replies may wait unread before it is ended.
    pub reply_stall_timeout_secs: Option<u64>,
}

impl ServerSection {
    pub fn apply(&self, c: &mut ServerConfig) {
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        if let Some(v) = self.max_urbs_in_flight {
            c.max_urbs_in_flight = v;
        }
        if let Some(v) = self.max_bytes_in_flight {
            c.max_bytes_in_flight = v;
        }
        if let Some(v) = self.max_inflight_bytes {
            c.max_inflight_bytes = v;
        }
        if let Some(v) = self.reply_stall_timeout_secs {
            c.reply_stall_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.failed_handshake_burst {
            c.refusals.failed_handshake_burst = v;
        }
        if let Some(v) = self.failed_handshake_refill_ms {
            c.refusals.failed_handshake_refill = Duration::from_millis(v);
        }
        if let Some(v) = self.max_transfer_length {
            c.limits.max_transfer_length = v;
        }
        if let Some(v) = self.hold_on_error {
            c.hold_on_error = v;
        }
        if let Some(v) = self.hold_floor_ms {
            c.hold_floor = Duration::from_millis(v);
        }
        if let Some(v) = self.hold_ceiling_ms {
            c.hold_ceiling = Duration::from_millis(v);
        }
        if let Some(v) = self.workers {
            c.workers = v;
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeviceConfig {
    MassStorage {
        busid: Option<String>,
        /// The device's fleet name (`usbipd --fleet`); default HOST/BUSID.
        name: Option<String>,
        /// Labels published with it to the fleet, e.g. ["pixel-7", "lab-2"].
        #[serde(default)]
        labels: Vec<String>,
        image: PathBuf,
        #[serde(default)]
        read_only: bool,
        product: Option<String>,
        serial: Option<String>,
        /// `[first, end)`: LBAs that fail with a medium error, for testing.
        bad_lbas: Option<[u64; 2]>,
    },
    Keyboard {
        busid: Option<String>,
        /// The device's fleet name (`usbipd --fleet`); default HOST/BUSID.
        name: Option<String>,
        /// Labels published with it to the fleet, e.g. ["pixel-7", "lab-2"].
        #[serde(default)]
        labels: Vec<String>,
        /// Lines written to this FIFO are typed.
        fifo: Option<PathBuf>,
        /// Text queued at start.
        #[serde(rename = "type")]
        type_text: Option<String>,
    },
    Serial {
        busid: Option<String>,
        /// The device's fleet name (`usbipd --fleet`); default HOST/BUSID.
        name: Option<String>,
        /// Labels published with it to the fleet, e.g. ["pixel-7", "lab-2"].
        #[serde(default)]
        labels: Vec<String>,
        #[serde(default)]
        backend: SerialBackend,
        /// For `backend = "tcp"`: a loopback address to listen on.
        listen: Option<SocketAddr>,
        /// For `backend = "pty"`: a symlink to create to the PTY.
        link: Option<PathBuf>,
    },
    Test {
        busid: Option<String>,
        /// The device's fleet name (`usbipd --fleet`); default HOST/BUSID.
        name: Option<String>,
        /// Labels published with it to the fleet, e.g. ["pixel-7", "lab-2"].
        #[serde(default)]
        labels: Vec<String>,
        /// What the source sends and the sink checks, as f_sourcesink's
        /// `pattern`: 0 zeros (the default), 1 `(i % 512) % 63`, 2 none.
        #[serde(default, deserialize_with = "test_pattern")]
        pattern: Pattern,
    },
}

fn test_pattern<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
    let v = u8::deserialize(d)?;
    Pattern::from_attribute(v).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "pattern = {v}: use 0 (zeros), 1 (mod63) or 2 (none), as f_sourcesink's pattern"
        ))
    })
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialBackend {
    #[default]
    Echo,
    Pty,
    Tcp,
}

impl DeviceConfig {
    pub fn busid(&self) -> Option<&str> {
        match self {
            DeviceConfig::MassStorage { busid, .. }
            | DeviceConfig::Keyboard { busid, .. }
            | DeviceConfig::Serial { busid, .. }
            | DeviceConfig::Test { busid, .. } => busid.as_deref(),
        }
    }

    /// The fleet name the configuration gives the device, if any.
    pub fn fleet_name(&self) -> Option<&str> {
        match self {
            DeviceConfig::MassStorage { name, .. }
            | DeviceConfig::Keyboard { name, .. }
            | DeviceConfig::Serial { name, .. }
            | DeviceConfig::Test { name, .. } => name.as_deref(),
        }
    }

    /// The labels published with the device to the fleet.
    pub fn labels(&self) -> &[String] {
        match self {
            DeviceConfig::MassStorage { labels, .. }
            | DeviceConfig::Keyboard { labels, .. }
            | DeviceConfig::Serial { labels, .. }
            | DeviceConfig::Test { labels, .. } => labels,
        }
    }

    /// The serial number the configuration gives the device, if any.
    pub fn serial(&self) -> Option<&str> {
        match self {
            DeviceConfig::MassStorage { serial, .. } => serial.as_deref(),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    /// The access policy of the `[[access]]` rules.
    pub fn policy(&self) -> Policy {
        Policy::new(self.access.iter().map(|r| r.0.clone()).collect())
    }

    /// Reads a file; relative image paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.into(),
            source,
        })?;
        let mut c: Config = toml::from_str(&text).map_err(|source| ConfigFileError::Parse {
            path: path.into(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [
            &mut c.tls.cert,
            &mut c.tls.key,
            &mut c.tls.client_ca,
            &mut c.server.capture,
        ]
        .into_iter()
        .flatten()
        {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        for d in &mut c.devices {
            if let DeviceConfig::MassStorage { image, .. } = d {
                if image.is_relative() {
                    *image = base.join(&*image);
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let c: Config = toml::from_str(
            r#"
            [server]
            tcp_port = 3241
            hold_on_error = false
            device_mode = true
            metrics = "127.0.0.1:9240"
            [[device]]
            kind = "mass-storage"
            image = "d.img"
            read_only = true
            bad_lbas = [10, 20]
            [[device]]
            kind = "keyboard"
            type = "hi"
            [[device]]
            kind = "serial"
            backend = "tcp"
            listen = "127.0.0.1:4000"
            [[device]]
            kind = "test"
            busid = "2-1"
            pattern = 1
            [discovery]
            advertise = false
            name = "lab"
            "#,
        )
        .unwrap();
        assert_eq!(c.discovery.advertise, Some(false));
        assert_eq!(c.discovery.name.as_deref(), Some("lab"));
        assert_eq!(c.server.tcp_port, Some(3241));
        assert_eq!(c.server.device_mode, Some(true));
        assert_eq!(c.server.metrics, Some("127.0.0.1:9240".parse().unwrap()));
        assert_eq!(c.devices.len(), 4);
        assert_eq!(c.devices[3].busid(), Some("2-1"));
        assert!(matches!(
            c.devices[3],
            DeviceConfig::Test {
                pattern: Pattern::Mod63,
                ..
            }
        ));
        assert!(matches!(
            c.devices[2],
            DeviceConfig::Serial {
                backend: SerialBackend::Tcp,
                ..
            }
        ));
        let mut sc = ServerConfig::default();
        c.server.apply(&mut sc);
        assert!(!sc.hold_on_error);
    }

    #[test]
    fn fleet_section_and_device_names_and_labels() {
        let c: Config = toml::from_str(
            r#"
            [fleet]
            endpoints = ["http://10.0.0.1:2379"]
            name = "lab2"
            ttl_secs = 7
            [[device]]
            kind = "test"
            name = "lab2/sourcesink"
            labels = ["pixel-7", "lab-2"]
            [[device]]
            kind = "keyboard"
            "#,
        )
        .unwrap();
        assert_eq!(c.fleet.endpoints, ["http://10.0.0.1:2379"]);
        assert_eq!(c.fleet.name.as_deref(), Some("lab2"));
        assert_eq!(c.fleet.ttl_secs, Some(7));
        assert_eq!(c.devices[0].fleet_name(), Some("lab2/sourcesink"));
        assert_eq!(c.devices[0].labels(), ["pixel-7", "lab-2"]);
        assert_eq!(c.devices[1].fleet_name(), None);
        assert!(c.devices[1].labels().is_empty());
        let e = toml::from_str::<Config>("[fleet]\nendpoint = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn test_pattern_defaults_to_zeros_and_is_checked() {
        let c: Config = toml::from_str("[[device]]\nkind = \"test\"\n").unwrap();
        assert!(matches!(
            c.devices[0],
            DeviceConfig::Test {
                pattern: Pattern::Zeros,
                ..
            }
        ));
        let e = toml::from_str::<Config>("[[device]]\nkind = \"test\"\npattern = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("use 0 (zeros), 1 (mod63) or 2 (none)"), "{e}");
    }

    #[test]
    fn access_rules() {
        let c: Config = toml::from_str(
            r#"
            [[access]]
            devices = ["1-1", "046d:*"]
            clients = ["subject:CN=alice", "cidr:127.0.0.0/8"]
            [[access]]
            devices = ["*"]
            clients = ["*"]
            "#,
        )
        .unwrap();
        let p = c.policy();
        assert_eq!(p.rules().len(), 2);
        assert_eq!(
            p.rules()[0].to_string(),
            "[1-1, 046d:*] to [subject:CN=alice, cidr:127.0.0.0/8]"
        );
        assert!(Config::default().policy().is_open());
    }

    #[test]
    fn a_bad_access_rule_is_located() {
        let bad = |text: &str| toml::from_str::<Config>(text).unwrap_err().to_string();
        let e = bad("[server]\n\n[[access]]\ndevices = [\"1-1\"]\nclients = [\"alice\"]\n");
        assert!(e.contains("line 5"), "{e}");
        assert!(e.contains("\"alice\" names no client"), "{e}");
        let e = bad("[[access]]\ndevices = [\"046d:c5\"]\nclients = [\"*\"]\n");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("names no device"), "{e}");
        let e = bad("[[access]]\ndevices = []\nclients = [\"*\"]\n");
        assert!(e.contains("line 1"), "{e}");
        assert!(e.contains("the rule names no device"), "{e}");
        let e = bad("[[access]]\ndevices = [\"1-1\"]\n");
        assert!(e.contains("missing field `clients`"), "{e}");
        let e = bad("[[access]]\ndevices = [\"1-1\"]\nclients = [\"*\"]\nclient = []\n");
        assert!(e.contains("unknown field `client`"), "{e}");
    }

    #[test]
    fn rejects_unknown_fields() {
        assert!(toml::from_str::<Config>("[[device]]\nkind = \"test\"\ncolour = 1\n").is_err());
        assert!(toml::from_str::<Config>("[[device]]\nkind = \"toaster\"\n").is_err());
    }

    #[test]
    fn capture_keys_and_a_capture_file_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usbipd.toml");
        std::fs::write(
            &path,
            "[server]\ncapture = \"urbs.pcapng\"\ncapture_busid = \"1-2\"\ncapture_limit = 4096\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.server.capture, Some(dir.path().join("urbs.pcapng")));
        assert_eq!(c.server.capture_busid.as_deref(), Some("1-2"));
        assert_eq!(c.server.capture_limit, Some(4096));
    }
}
