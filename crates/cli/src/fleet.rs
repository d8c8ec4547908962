//! usbipd's side of the fleet (`--fleet`): the registry's devices, as
//! records for [`usbwire_fleet::publish::Publisher`], kept in step with
//! the registry as devices come and go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use usbwire_fleet::publish::{Publisher, PublisherConfig};
use usbwire_fleet::record::{DeviceRecord, InterfaceClass, ServerRecord};
use usbwire_fleet::reserve::NameOf;
use usbwire_proto::op::{DeviceInfo, Speed};
use usbwire_server::Registry;

/// What the configuration says of one device, for the fleet.
#[derive(Debug, Clone, Default)]
pub struct DeviceMeta {
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub serial: Option<String>,
}

/// Where and as whom this server publishes.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub endpoints: Vec<String>,
    /// The server id, and HOST of the default names HOST/BUSID.
    pub server_id: String,
    pub ttl: Duration,
    /// Where clients reach this server.
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub fingerprint: Option<String>,
}

/// The publishing task and the one that feeds it the registry's devices.
pub struct Fleet {
    publisher: Publisher,
    feeder: JoinHandle<()>,
    endpoints: String,
    name_of: NameOf,
}

impl Fleet {
    /// Starts publishing the registry's devices; `meta` (by bus id) adds
    /// the configured names, labels and serial numbers.
    pub fn start(
        settings: FleetSettings,
        registry: &Registry,
        meta: BTreeMap<String, DeviceMeta>,
    ) -> Fleet {
        let publisher = Publisher::spawn(PublisherConfig {
            endpoints: settings.endpoints.clone(),
            server: ServerRecord {
                id: settings.server_id.clone(),
                host: settings.host.clone(),
                port: settings.port,
                tls: settings.tls,
                fingerprint: settings.fingerprint.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            ttl: settings.ttl,
        });
        let desired = publisher.desired_handle();
        let endpoints = settings.endpoints.join(",");
        let name_of: NameOf = {
            let server_id = settings.server_id.clone();
            let refused = publisher.refused_names();
            let names: BTreeMap<String, String> = meta
                .iter()
                .filter_map(|(busid, m)| Some((busid.clone(), m.name.clone()?)))
                .collect();
            // The name record() publishes a device under; none for a
            // device whose name another server holds (exported locally
            // only, so no reservation in the fleet is about it).
            Arc::new(move |busid: &str| {
                let name = names
                    .get(busid)
                    .cloned()
                    .unwrap_or_else(|| format!("{server_id}/{busid}"));
                (!refused.contains(&name)).then_some(name)
            })
        };
        let registry = registry.clone();
        let mut changes = registry.changes();
        let feeder = tokio::spawn(async move {
            // Each turn republishes the set once per registry change; it
            // ends with the runtime (or the abort at shutdown).
            loop {
                let records = registry
                    .all()
                    .into_iter()
                    .map(|(info, _)| {
                        let serial = registry.serial(&info.busid.to_string());
                        record(&settings, &meta, &info, serial)
                    })
                    .collect::<Vec<_>>();
                desired.set_devices(records);
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Fleet {
            publisher,
            feeder,
            endpoints,
            name_of,
        }
    }

    /// The etcd endpoints, comma-separated.
    pub fn endpoints(&self) -> String {
        self.endpoints.clone()
    }

    /// The fleet name each exported bus id is published under.
    pub fn name_of(&self) -> NameOf {
        self.name_of.clone()
    }

    /// Stops following the registry and revokes the lease (bounded).
    pub async fn stop(self) {
        self.feeder.abort();
        self.publisher.shutdown().await;
    }
}

/// The fleet record of one exported device.
pub fn record(
    settings: &FleetSettings,
    meta: &BTreeMap<String, DeviceMeta>,
    info: &DeviceInfo,
    device_serial: Option<String>,
) -> DeviceRecord {
    let busid = info.busid.to_string();
    let m = meta.get(&busid).cloned().unwrap_or_default();
    DeviceRecord {
        name: m
            .name
            .unwrap_or_else(|| format!("{}/{busid}", settings.server_id)),
        server: settings.server_id.clone(),
        host: settings.host.clone(),
        port: settings.port,
        busid,
        vendor_id: format!("{:04x}", info.id_vendor),
        product_id: format!("{:04x}", info.id_product),
        device_class: InterfaceClass {
            class: info.device_class,
            subclass: info.device_subclass,
            protocol: info.device_protocol,
        },
        interfaces: info
            .interfaces
            .iter()
            .map(|i| InterfaceClass {
                class: i.class,
                subclass: i.subclass,
                protocol: i.protocol,
            })
            .collect(),
        speed: speed_name(info.speed).to_string(),
        // The configured one wins: it is what the operator labels by.
        serial: m.serial.or(device_serial),
        labels: m.labels,
        tls: settings.tls,
        fingerprint: settings.fingerprint.clone(),
    }
}

fn speed_name(speed: Speed) -> &'static str {
    match speed {
        Speed::Low => "low",
        Speed::Full => "full",
        Speed::High => "high",
        Speed::Wireless => "wireless",
        Speed::Super => "super",
        Speed::SuperPlus => "super-plus",
        Speed::Unknown | Speed::Other(_) => "unknown",
    }
}

/// This machine's host name: the default server id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Where clients reach this server: `address` (HOST:PORT) if given, else
/// the first listening address that is not a wildcard, else the host
/// name with the first listening port.
pub fn reach(address: Option<&str>, listening: &[SocketAddr]) -> Result<(String, u16), String> {
    if let Some(a) = address {
        let (host, port) = a.rsplit_once(':').ok_or_else(|| {
            format!("--fleet-address {a:?}: give HOST:PORT, e.g. lab2.example:3240")
        })?;
        let port = port
            .parse()
            .map_err(|_| format!("--fleet-address {a:?}: {port:?} is not a TCP port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("--fleet-address {a:?}: the host is missing"));
        }
        return Ok((host.to_string(), port));
    }
    let first = listening
        .first()
        .ok_or("--fleet: no listening address to publish; give --fleet-address HOST:PORT")?;
    Ok(match listening.iter().find(|a| !a.ip().is_unspecified()) {
        Some(a) => (a.ip().to_string(), a.port()),
        None => (host_name(), first.port()),
    })
}

/// `usbip list --fleet ENDPOINTS [--json]`: every device of the fleet
/// once, with its server, labels and holder.
pub async fn list_command(endpoints: &str, json: bool) -> Result<(), String> {
    let endpoints = usbwire_fleet::record::parse_endpoints(endpoints).map_err(|e| e.to_string())?;
    let devices = usbwire_fleet::list::list(&endpoints)
        .await
        .map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&devices).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    if devices.is_empty() {
        println!(
            "no device is published in the fleet at {}",
            endpoints.join(",")
        );
        return Ok(());
    }
    println!("Fleet devices ({}):", endpoints.join(","));
    for d in &devices {
        let r = &d.device;
        let state = match (&d.holder, d.in_transition) {
            (_, true) => "in transition".to_string(),
            (Some(h), false) => format!("held by {h}"),
            (None, false) => "free".to_string(),
        };
        println!(
            "  {}: server {} at {}:{}, busid {}, {}:{}, {} speed{}",
            r.name,
            r.server,
            r.host,
            r.port,
            r.busid,
            r.vendor_id,
            r.product_id,
            r.speed,
            if r.tls { ", TLS" } else { "" }
        );
        if !r.labels.is_empty() {
            println!("      labels: {}", r.labels.join(", "));
        }
        println!("      {state}");
    }
    Ok(())
}
