//! What the fleet keeps in etcd: the keys, their JSON values, and the
//! connection to the cluster.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use serde::{Deserialize, Serialize};

use crate::PREFIX;

/// `servers/<id>`.
pub fn server_key(id: &str) -> String {
    format!("{PREFIX}servers/{id}")
}

/// `devices/<name>`.
pub fn device_key(name: &str) -> String {
    format!("{PREFIX}devices/{name}")
}

/// `transition/<name>`.
pub fn transition_key(name: &str) -> String {
    format!("{PREFIX}transition/{name}")
}

/// `reservations/<name>` (written by `usbip reserve`, read by the listing).
pub fn reservation_key(name: &str) -> String {
    format!("{PREFIX}reservations/{name}")
}

/// The prefix of every key of `kind` ("devices", "servers", ...).
pub fn kind_prefix(kind: &str) -> String {
    format!("{PREFIX}{kind}/")
}

/// One interface's class triple.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceClass {
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

/// `devices/<name>`: one exported device as a client needs it to pick and
/// import it. Later versions only add fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The fleet name (unique across the fleet).
    pub name: String,
    /// The id of the server that exports it (its `servers/<id>` key).
    pub server: String,
    /// Host name or address, and port, where clients reach that server.
    pub host: String,
    pub port: u16,
    /// The bus id to import on that server.
    pub busid: String,
    /// Four lowercase hex digits each.
    pub vendor_id: String,
    pub product_id: String,
    /// The device's class triple (0/0/0: per interface).
    pub device_class: InterfaceClass,
    pub interfaces: Vec<InterfaceClass>,
    /// "low", "full", "high", "wireless", "super", "super-plus" or "unknown".
    pub speed: String,
    pub serial: Option<String>,
    pub labels: Vec<String>,
    /// Whether the server requires TLS (clients then need a certificate
    /// it accepts).
    pub tls: bool,
    /// The server certificate's SHA-256 fingerprint (`AB:CD:...`), to pin.
    pub fingerprint: Option<String>,
}

/// `servers/<id>`: one usbipd of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub fingerprint: Option<String>,
    /// usbipd's version.
    pub version: String,
}

/// Connecting to the cluster failed, or it did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no etcd endpoint given: pass --fleet http://HOST:2379[,http://HOST:2379...]")]
    NoEndpoints,
    #[error(
        "etcd at {endpoints}: {source} (is the cluster up and reachable from here? \
         `etcdctl --endpoints {endpoints} endpoint health` tells)"
    )]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} did not answer within {limit:?} (is the cluster up and reachable from here?)")]
    Timeout { endpoints: String, limit: Duration },
    #[error("no etcd member of {endpoints} answered; the first said: {first}")]
    NoneAnswered {
        endpoints: String,
        first: Box<FleetError>,
    },
    #[error("probing the etcd members failed: {0}")]
    Probe(String),
    #[error("etcd key {key} kept changing under this server's transaction; giving up for now")]
    Contended { key: String },
    #[error("etcd key {key}: the value is not a valid record: {source}")]
    BadRecord {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A comma-separated endpoint list, as `--fleet` takes it; a bare
/// `HOST:PORT` gets `http://`.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, FleetError> {
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        return Err(FleetError::NoEndpoints);
    }
    Ok(endpoints)
}

/// Every request to etcd ends within this; a member that died makes a
/// request fail over to another, a cluster that is gone makes it fail.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of the cluster at `endpoints`, each request bounded in time.
pub async fn connect(endpoints: &[String]) -> Result<Client, FleetError> {
    connect_live(endpoints).await.map(|(client, _)| client)
}

/// How long the members' answers are awaited after the first one came.
const STRAGGLER_GRACE: Duration = Duration::from_millis(500);

/// A client of the members of `endpoints` that answer now, and which
/// those are.
///
/// etcd-client balances over its endpoints but sends a request to a dead
/// one all the same (tcp connect error), so a member that is down would
/// fail a share of the requests. Each member is asked for its status
/// first, all at once; one that has not answered [`STRAGGLER_GRACE`] after
/// the first did is left out, so a member that black-holes its traffic
/// delays a reconnect by that, not by the connect timeout. A member that
/// dies later fails the session's requests, and the session connects again
/// (publishing) or the command fails (listing).
pub async fn connect_live(endpoints: &[String]) -> Result<(Client, Vec<String>), FleetError> {
    let mut probes = tokio::task::JoinSet::new();
    for (i, e) in endpoints.iter().enumerate() {
        let e = e.clone();
        probes.spawn(async move { (i, answers(&e).await) });
    }
    let mut live = Vec::new();
    let mut first_error = None;
    let mut deadline: Option<tokio::time::Instant> = None;
    // One result per endpoint, each probe bounded in time; after the first
    // live one, bounded by the grace.
    loop {
        let joined = match deadline {
            None => probes.join_next().await,
            Some(d) => match tokio::time::timeout_at(d, probes.join_next()).await {
                Ok(j) => j,
                Err(_) => break,
            },
        };
        let Some(joined) = joined else { break };
        match joined {
            Ok((i, Ok(()))) => {
                live.push(i);
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
            Ok((_, Err(e))) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(FleetError::Probe(e.to_string()));
            }
        }
    }
    probes.abort_all();
    live.sort_unstable();
    let live: Vec<String> = live.into_iter().map(|i| endpoints[i].clone()).collect();
    if live.is_empty() {
        return Err(match first_error {
            None => FleetError::NoEndpoints,
            Some(first) if endpoints.len() == 1 => first,
            Some(first) => FleetError::NoneAnswered {
                endpoints: endpoints.join(","),
                first: Box::new(first),
            },
        });
    }
    Ok((connect_to(&live).await?, live))
}

/// Whether the member at `endpoint` answers a status request.
async fn answers(endpoint: &str) -> Result<(), FleetError> {
    let one = [endpoint.to_string()];
    let mut client = connect_to(&one).await?;
    bounded(&one, client.status()).await.map(|_| ())
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
}

async fn connect_to(endpoints: &[String]) -> Result<Client, FleetError> {
    let all = endpoints.join(",");
    let limit = CONNECT_TIMEOUT + REQUEST_TIMEOUT;
    match tokio::time::timeout(limit, Client::connect(endpoints, Some(options()))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(FleetError::Etcd {
            endpoints: all,
            source,
        }),
        Err(_) => Err(FleetError::Timeout {
            endpoints: all,
            limit,
        }),
    }
}

/// Runs one etcd request, bounded by [`REQUEST_TIMEOUT`] even where the
/// client's own timeout does not reach (a connection that hangs).
pub async fn bounded<T>(
    endpoints: &[String],
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FleetError> {
    let limit = REQUEST_TIMEOUT + Duration::from_secs(1);
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(FleetError::Etcd {
            endpoints: endpoints.join(","),
            source,
        }),
        Err(_) => Err(FleetError::Timeout {
            endpoints: endpoints.join(","),
            limit,
        }),
    }
}
