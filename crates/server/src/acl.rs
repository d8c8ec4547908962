//! Per-device access control: which clients may see and import which
//! devices.
//!
//! A [`Policy`] is a list of [`Rule`]s, each granting some devices to some
//! clients. With no rule at all every client the connection policy admits
//! (TLS, `--allow-plaintext`) sees and imports every device, as before
//! access control existed. Once there is a rule, nothing is granted that
//! no rule grants: a device is listed to, and importable by, exactly the
//! clients that some rule names together with it.
//!
//! Devices are named by bus id (`1-1`), by `VID:PID` in hex, either half
//! possibly `*` (`046d:*`), or `*` for every device. Clients are named by
//! what identifies them: a TLS client by its certificate, either its
//! SHA-256 fingerprint or attributes of its subject as the client CA
//! vouched for them; a plaintext client only by its source address. A
//! source network never grants anything to a TLS client, and a subject
//! never matches a certificate that was accepted by its pinned fingerprint
//! (whoever made it chose its subject freely).
//!
//! The policy in force lives in a [`SharedPolicy`], replaced whole when
//! the configuration is reloaded: a connection sees either the old rules
//! or the new ones, never a mix, and running imports are told of the
//! change so that those the new rules do not grant end.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::watch;
use usbwire_proto::DeviceInfo;

use crate::tls::{Fingerprint, FingerprintError};

/// Which devices a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMatch {
    /// Every device.
    Any,
    /// The device exported under this bus id.
    Busid(String),
    /// Devices with this vendor and product id; `None` matches any.
    Ids {
        vendor: Option<u16>,
        product: Option<u16>,
    },
}

/// A device pattern that is neither a bus id nor `VID:PID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} names no device: give a bus id (1-1, 2-1.4), VID:PID in hex with \
     either half possibly * (046d:c52b, 046d:*, *:c52b), or * for every device"
)]
pub struct DeviceMatchError(String);

impl FromStr for DeviceMatch {
    type Err = DeviceMatchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DeviceMatchError(s.to_string());
        if s == "*" {
            return Ok(DeviceMatch::Any);
        }
        if let Some((vendor, product)) = s.split_once(':') {
            let id = |half: &str| match half {
                "*" => Ok(None),
                h if h.len() == 4 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    u16::from_str_radix(h, 16).map(Some).map_err(|_| bad())
                }
                _ => Err(bad()),
            };
            return Ok(DeviceMatch::Ids {
                vendor: id(vendor)?,
                product: id(product)?,
            });
        }
        if crate::registry::valid_busid(s) {
            return Ok(DeviceMatch::Busid(s.to_string()));
        }
        Err(bad())
    }
}

impl fmt::Display for DeviceMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let half = |h: Option<u16>| h.map_or("*".to_string(), |v| format!("{v:04x}"));
        match self {
            DeviceMatch::Any => f.write_str("*"),
            DeviceMatch::Busid(b) => f.write_str(b),
            DeviceMatch::Ids { vendor, product } => {
                write!(f, "{}:{}", half(*vendor), half(*product))
            }
        }
    }
}

impl DeviceMatch {
    pub fn matches(&self, device: &DeviceInfo) -> bool {
        match self {
            DeviceMatch::Any => true,
            // Exported names are ASCII: one that is not names no busid rule.
            DeviceMatch::Busid(b) => device.busid.as_str() == Some(b.as_str()),
            DeviceMatch::Ids { vendor, product } => {
                vendor.is_none_or(|v| v == device.id_vendor)
                    && product.is_none_or(|p| p == device.id_product)
            }
        }
    }
}

/// One `KEY=VALUE` requirement of a subject pattern; `*` in the value
/// matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectAttribute {
    /// Upper case, as [`Subject`] keeps its attribute names.
    key: String,
    value: String,
}

/// Which clients a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMatch {
    /// Every client the server lets in.
    Any,
    /// The TLS client whose certificate has this SHA-256 fingerprint.
    Fingerprint(Fingerprint),
    /// TLS clients whose CA-verified subject has every one of these
    /// attributes (e.g. `CN=alice*,O=Example`).
    Subject(Vec<SubjectAttribute>),
    /// Plaintext clients from this source network.
    Cidr(IpNet),
}

/// A client pattern that cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientMatchError {
    #[error(
        "{0:?} names no client: give fingerprint:HEX (a TLS client certificate's \
         SHA-256), subject:KEY=VALUE[,KEY=VALUE...] (its CA-verified subject, * as \
         wildcard, e.g. subject:CN=alice*,O=Example), cidr:NETWORK (plaintext \
         clients from there, e.g. cidr:127.0.0.0/8), or * for every client"
    )]
    Unknown(String),
    #[error("{0}")]
    Fingerprint(#[from] FingerprintError),
    #[error(
        "subject pattern {0:?} is not a comma-separated list of KEY=VALUE \
         (e.g. CN=alice*,O=Example); KEY is an attribute such as CN, O, OU, C, L, ST, DC"
    )]
    Subject(String),
    #[error("{0:?} is not a network: give an address or ADDRESS/PREFIX, e.g. 10.0.0.0/8")]
    Cidr(String),
}

impl FromStr for ClientMatch {
    type Err = ClientMatchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "*" {
            return Ok(ClientMatch::Any);
        }
        let Some((kind, arg)) = s.split_once(':') else {
            return Err(ClientMatchError::Unknown(s.to_string()));
        };
        match kind {
            "fingerprint" => Ok(ClientMatch::Fingerprint(arg.parse()?)),
            "subject" => {
                let bad = || ClientMatchError::Subject(arg.to_string());
                let attributes = arg
                    .split(',')
                    .map(|kv| {
                        let (key, value) = kv.split_once('=').ok_or_else(bad)?;
                        let key = key.trim();
                        // A name (CN) or, for an attribute without one, its
                        // dotted OID (2.5.4.97).
                        if key.is_empty()
                            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
                        {
                            return Err(bad());
                        }
                        Ok(SubjectAttribute {
                            key: key.to_ascii_uppercase(),
                            value: value.trim().to_string(),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ClientMatch::Subject(attributes))
            }
            "cidr" => {
                let net = arg
                    .parse::<IpNet>()
                    .or_else(|_| arg.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| ClientMatchError::Cidr(arg.to_string()))?;
                Ok(ClientMatch::Cidr(net))
            }
            _ => Err(ClientMatchError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for ClientMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientMatch::Any => f.write_str("*"),
            ClientMatch::Fingerprint(fp) => write!(f, "fingerprint:{fp}"),
            ClientMatch::Subject(attrs) => {
                f.write_str("subject:")?;
                for (i, a) in attrs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}={}", a.key, a.value)?;
                }
                Ok(())
            }
            ClientMatch::Cidr(net) => write!(f, "cidr:{net}"),
        }
    }
}

/// Whether `text` matches `pattern`, in which `*` stands for any run of
/// characters (possibly empty) and everything else for itself.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Greedy, backtracking only to the last star: at most |p| * |t| steps.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl ClientMatch {
    pub fn matches(&self, peer: &Peer) -> bool {
        match (self, &peer.tls) {
            (ClientMatch::Any, _) => true,
            (ClientMatch::Fingerprint(fp), Some(id)) => id.fingerprint == *fp,
            (ClientMatch::Subject(attrs), Some(id)) => {
                id.subject_verified
                    && attrs.iter().all(|a| {
                        id.subject
                            .0
                            .iter()
                            .any(|(k, v)| *k == a.key && wildcard_match(&a.value, v))
                    })
            }
            // A proven identity is not widened by where it connects from.
            (ClientMatch::Cidr(net), None) => net.contains(&peer.addr.ip().to_canonical()),
            _ => false,
        }
    }
}

/// A certificate subject: its attributes in certificate order, names in
/// upper case (CN, O, OU, C, L, ST, DC, EMAIL, or the OID's short name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject(Vec<(String, String)>);

impl Subject {
    /// The subject of a DER certificate; attributes whose value is not a
    /// string are left out. `None` if the certificate cannot be parsed.
    pub fn of(cert: &[u8]) -> Option<Subject> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(cert).ok()?;
        let registry = x509_parser::objects::oid_registry();
        let attributes = cert
            .subject()
            .iter_attributes()
            .filter_map(|a| {
                let key = x509_parser::objects::oid2abbrev(a.attr_type(), registry)
                    .map(str::to_ascii_uppercase)
                    .unwrap_or_else(|_| a.attr_type().to_id_string());
                Some((key, a.as_str().ok()?.to_string()))
            })
            .collect();
        Some(Subject(attributes))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// What a verified TLS client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub fingerprint: Fingerprint,
    pub subject: Subject,
    /// Whether the client CA vouched for the subject. A certificate
    /// accepted by its pinned fingerprint has a subject its maker chose,
    /// which `subject:` rules must not trust.
    pub subject_verified: bool,
}

impl ClientIdentity {
    /// The identity of a client whose certificate (DER) the handshake
    /// verified; `pinned` are the fingerprints the server accepts without
    /// its CA, which rustls looks at first.
    pub fn of(cert: &[u8], pinned: &[Fingerprint]) -> ClientIdentity {
        let fingerprint = Fingerprint::of(cert);
        let subject = Subject::of(cert);
        ClientIdentity {
            fingerprint,
            subject_verified: subject.is_some() && !pinned.contains(&fingerprint),
            subject: subject.unwrap_or_default(),
        }
    }
}

/// Who is asking: the source address, and the verified certificate of a
/// TLS client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: Option<ClientIdentity>,
}

impl Peer {
    pub fn plaintext(addr: SocketAddr) -> Peer {
        Peer { addr, tls: None }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tls {
            None => write!(f, "{} (plaintext)", self.addr),
            Some(id) => {
                write!(
                    f,
                    "{} (TLS, certificate SHA-256 {}, subject {}",
                    self.addr, id.fingerprint, id.subject
                )?;
                if !id.subject_verified {
                    f.write_str(" not CA-verified")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// One grant: every client in `clients` may see and import every device in
/// `devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    devices: Vec<DeviceMatch>,
    clients: Vec<ClientMatch>,
}

/// A rule that could grant nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("the rule names no device: give devices = [\"BUSID\" or \"VID:PID\", ...]")]
    NoDevices,
    #[error(
        "the rule names no client: give clients = [\"fingerprint:HEX\", \
         \"subject:CN=NAME\", \"cidr:NETWORK\", ...]"
    )]
    NoClients,
}

impl Rule {
    pub fn new(devices: Vec<DeviceMatch>, clients: Vec<ClientMatch>) -> Result<Rule, RuleError> {
        if devices.is_empty() {
            return Err(RuleError::NoDevices);
        }
        if clients.is_empty() {
            return Err(RuleError::NoClients);
        }
        Ok(Rule { devices, clients })
    }

    pub fn devices(&self) -> &[DeviceMatch] {
        &self.devices
    }

    pub fn clients(&self) -> &[ClientMatch] {
        &self.clients
    }

    fn grants(&self, peer: &Peer, device: &DeviceInfo) -> bool {
        self.devices.iter().any(|d| d.matches(device))
            && self.clients.iter().any(|c| c.matches(peer))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: Vec<String>| items.join(", ");
        write!(
            f,
            "[{}] to [{}]",
            list(self.devices.iter().map(ToString::to_string).collect()),
            list(self.clients.iter().map(ToString::to_string).collect())
        )
    }
}

/// Which devices each client may see and import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Every admitted client may use every device: no access control.
    pub fn open() -> Policy {
        Policy::default()
    }

    pub fn new(rules: Vec<Rule>) -> Policy {
        Policy { rules }
    }

    /// Whether access control is off (no rule).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `peer` may see and import `device`.
    pub fn allows(&self, peer: &Peer, device: &DeviceInfo) -> bool {
        self.is_open() || self.rules.iter().any(|r| r.grants(peer, device))
    }
}

/// The policy in force, replaced whole on reload; holders learn of each
/// replacement.
#[derive(Clone)]
pub struct SharedPolicy(Arc<watch::Sender<Arc<Policy>>>);

impl Default for SharedPolicy {
    fn default() -> Self {
        SharedPolicy::new(Policy::open())
    }
}

impl fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedPolicy")
            .field(&self.current())
            .finish()
    }
}

impl SharedPolicy {
    pub fn new(policy: Policy) -> SharedPolicy {
        SharedPolicy(Arc::new(watch::Sender::new(Arc::new(policy))))
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        self.0.borrow().clone()
    }

    /// Puts `policy` in force for every connection from now on, and tells
    /// the running imports.
    pub fn replace(&self, policy: Policy) {
        self.0.send_replace(Arc::new(policy));
    }

    /// Learns of every replacement from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.0.subscribe()
    }
}

/// Access control as a server applies it: the policy, and what it needs
/// to know of the TLS configuration to read client certificates.
#[derive(Debug, Clone, Default)]
pub struct AccessControl {
    pub policy: SharedPolicy,
    /// The client fingerprints the TLS configuration accepts without the
    /// client CA (`--tls-client-fingerprint`): their subjects are not
    /// verified.
    pub pinned: Vec<Fingerprint>,
}

/// Resolves once the policy in force no longer lets `peer` use `device`:
/// at once if it already does not.
pub(crate) async fn revoked(
    updates: &mut watch::Receiver<Arc<Policy>>,
    peer: &Peer,
    device: &DeviceInfo,
) {
    loop {
        if !updates.borrow_and_update().allows(peer, device) {
            return;
        }
        if updates.changed().await.is_err() {
            // The policy can no longer change.
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn device(busid: &str, vendor: u16, product: u16) -> DeviceInfo {
        let mut d = crate::registry::placeholder_info(busid);
        d.id_vendor = vendor;
        d.id_product = product;
        d
    }

    fn cert(cn: &str, org: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn tls_peer(cert: &[u8], pinned: &[Fingerprint]) -> Peer {
        Peer {
            addr: "192.0.2.7:40000".parse().unwrap(),
            tls: Some(ClientIdentity::of(cert, pinned)),
        }
    }

    fn plain_peer(addr: &str) -> Peer {
        Peer::plaintext(addr.parse().unwrap())
    }

    fn rule(devices: &[&str], clients: &[&str]) -> Rule {
        Rule::new(
            devices.iter().map(|d| d.parse().unwrap()).collect(),
            clients.iter().map(|c| c.parse().unwrap()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn device_patterns() {
        let logitech = device("1-1", 0x046d, 0xc52b);
        let other = device("2-1.4", 0x1d6b, 0x0104);
        let cases: &[(&str, bool, bool)] = &[
            ("1-1", true, false),
            ("2-1.4", false, true),
            ("046d:c52b", true, false),
            ("046D:C52B", true, false),
            ("046d:*", true, false),
            ("*:c52b", true, false),
            ("*:0104", false, true),
            ("*:*", true, true),
            ("*", true, true),
        ];
        for &(pattern, a, b) in cases {
            let m: DeviceMatch = pattern.parse().unwrap();
            assert_eq!(m.matches(&logitech), a, "{pattern} on 1-1");
            assert_eq!(m.matches(&other), b, "{pattern} on 2-1.4");
            assert_eq!(
                m.to_string().parse::<DeviceMatch>().unwrap(),
                m,
                "{pattern}"
            );
        }
        for bad in [
            "",
            "1",
            "1-",
            "046d:c52",
            "046d:c52bb",
            "g46d:*",
            "046d",
            "1-1*",
        ] {
            let e = bad.parse::<DeviceMatch>().unwrap_err().to_string();
            assert!(e.contains("names no device"), "{bad}: {e}");
        }
    }

    #[test]
    fn client_patterns_parse() {
        for good in [
            "*",
            "fingerprint:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF",
            "subject:CN=alice",
            "subject:cn=alice*, O=Example Corp",
            "subject:2.5.4.97=VATDE-123",
            "cidr:127.0.0.0/8",
            "cidr:::1/128",
            "cidr:192.0.2.1",
        ] {
            let m: ClientMatch = good.parse().unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(m.to_string().parse::<ClientMatch>().unwrap(), m, "{good}");
        }
        let e = |s: &str| s.parse::<ClientMatch>().unwrap_err().to_string();
        assert!(e("alice").contains("names no client"), "{}", e("alice"));
        assert!(e("cn:alice").contains("names no client"));
        assert!(e("fingerprint:0011").contains("not a SHA-256 fingerprint"));
        assert!(e("subject:alice").contains("KEY=VALUE"));
        assert!(e("subject:=alice").contains("KEY=VALUE"));
        assert!(e("cidr:10.0.0.0/33").contains("not a network"));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("alice", "alice"));
        assert!(!wildcard_match("alice", "alice2"));
        assert!(!wildcard_match("alice", "Alice"));
        assert!(wildcard_match("alice*", "alice"));
        assert!(wildcard_match("alice*", "alice-laptop"));
        assert!(wildcard_match("*@example.org", "bob@example.org"));
        assert!(!wildcard_match("*@example.org", "bob@example.org.evil"));
        assert!(wildcard_match("a*b*c", "a-b-b-c"));
        assert!(!wildcard_match("a*b*c", "a-c-b"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("", "x"));
    }

    #[test]
    fn open_policy_allows_everything() {
        let p = Policy::open();
        assert!(p.is_open());
        assert!(p.allows(&plain_peer("192.0.2.1:1"), &device("1-1", 1, 2)));
        assert!(p.allows(&tls_peer(&cert("x", None), &[]), &device("1-1", 1, 2)));
    }

    #[test]
    fn rules_grant_devices_to_identities() {
        let alice = cert("alice", Some("Example"));
        let bob = cert("bob", Some("Example"));
        let mallory = cert("alice", Some("Evil"));
        let bob_fp = Fingerprint::of(&bob).to_string();
        let p = Policy::new(vec![
            rule(&["1-1", "046d:*"], &["subject:CN=alice*,O=Example"]),
            rule(&["2-1"], &[&format!("fingerprint:{bob_fp}")]),
            rule(&["3-1"], &["cidr:127.0.0.0/8"]),
        ]);
        let disk = device("1-1", 0x1234, 1);
        let mouse = device("4-1", 0x046d, 0xc52b);
        let kbd = device("2-1", 0x1234, 2);
        let serial = device("3-1", 0x1234, 3);
        let (a, b, m) = (
            tls_peer(&alice, &[]),
            tls_peer(&bob, &[]),
            tls_peer(&mallory, &[]),
        );
        assert!(p.allows(&a, &disk) && p.allows(&a, &mouse));
        assert!(!p.allows(&a, &kbd) && !p.allows(&a, &serial));
        assert!(p.allows(&b, &kbd));
        assert!(!p.allows(&b, &disk) && !p.allows(&b, &mouse) && !p.allows(&b, &serial));
        assert!(!p.allows(&m, &disk), "O=Evil is not O=Example");
        let local = plain_peer("127.0.0.1:5000");
        assert!(p.allows(&local, &serial) && !p.allows(&local, &disk));
        // A dual-stack socket shows IPv4 sources as ::ffff:a.b.c.d.
        assert!(p.allows(&plain_peer("[::ffff:127.0.0.2]:5000"), &serial));
        assert!(!p.allows(&plain_peer("192.0.2.1:5000"), &serial));
    }

    #[test]
    fn a_network_grants_nothing_to_tls_clients() {
        let p = Policy::new(vec![rule(&["*"], &["cidr:0.0.0.0/0", "cidr:::/0"])]);
        let mut peer = tls_peer(&cert("alice", None), &[]);
        peer.addr = "127.0.0.1:1".parse().unwrap();
        assert!(!p.allows(&peer, &device("1-1", 1, 1)));
        assert!(p.allows(&plain_peer("127.0.0.1:1"), &device("1-1", 1, 1)));
    }

    #[test]
    fn the_subject_of_a_pinned_certificate_is_not_trusted() {
        let alice = cert("alice", None);
        let pin = Fingerprint::of(&alice);
        let by_subject = Policy::new(vec![rule(&["*"], &["subject:CN=alice"])]);
        let by_pin = Policy::new(vec![rule(&["*"], &[&format!("fingerprint:{pin}")])]);
        let verified = tls_peer(&alice, &[]);
        let pinned = tls_peer(&alice, &[pin]);
        let d = device("1-1", 1, 1);
        assert!(by_subject.allows(&verified, &d));
        assert!(!by_subject.allows(&pinned, &d));
        assert!(by_pin.allows(&pinned, &d));
        assert!(pinned.to_string().contains("not CA-verified"), "{pinned}");
        assert!(
            verified.to_string().contains("subject CN=alice)"),
            "{verified}"
        );
    }

    #[test]
    fn any_client() {
        let p = Policy::new(vec![rule(&["1-1"], &["*"])]);
        assert!(p.allows(&plain_peer("192.0.2.1:1"), &device("1-1", 1, 1)));
        assert!(p.allows(&tls_peer(&cert("x", None), &[]), &device("1-1", 1, 1)));
        assert!(!p.allows(&plain_peer("192.0.2.1:1"), &device("1-2", 1, 1)));
    }

    #[test]
    fn empty_rules_are_refused() {
        assert_eq!(
            Rule::new(vec![], vec![ClientMatch::Any]),
            Err(RuleError::NoDevices)
        );
        assert_eq!(
            Rule::new(vec![DeviceMatch::Any], vec![]),
            Err(RuleError::NoClients)
        );
    }

    #[tokio::test]
    async fn a_replaced_policy_revokes_what_it_no_longer_grants() {
        let shared = SharedPolicy::new(Policy::new(vec![rule(&["1-1", "1-2"], &["*"])]));
        let peer = plain_peer("127.0.0.1:1");
        let (one, two) = (device("1-1", 1, 1), device("1-2", 1, 2));
        let mut updates = shared.subscribe();
        let mut kept = shared.subscribe();
        let waiter = tokio::spawn(async move { revoked(&mut updates, &peer, &two).await });
        let peer = plain_peer("127.0.0.1:1");
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        shared.replace(Policy::new(vec![rule(&["1-1"], &["*"])]));
        waiter.await.unwrap();
        // 1-1 is still granted: its wait goes on.
        tokio::select! {
            biased;
            () = revoked(&mut kept, &peer, &one) => panic!("1-1 was revoked"),
            () = std::future::ready(()) => {}
        }
        assert!(shared.current().allows(&peer, &one));
    }
}
