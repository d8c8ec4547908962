//! Reading the fleet's namespace (`usbip list --fleet`).

use std::collections::BTreeMap;

use etcd_client::GetOptions;
use serde::Serialize;

use crate::record::{bounded, connect, kind_prefix, DeviceRecord, FleetError};

/// One device of the fleet, with who holds it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub device: DeviceRecord,
    /// The `holder` of its reservation (`reservations/<name>`), if any.
    pub holder: Option<String>,
    /// Being withdrawn or re-published (`transition/<name>`): a
    /// reservation now answers EAGAIN.
    pub in_transition: bool,
}

/// Every device of the fleet once, in name order. The three ranges are
/// read at one revision, so the listing is one consistent snapshot.
pub async fn list(endpoints: &[String]) -> Result<Vec<Listed>, FleetError> {
    let mut client = connect(endpoints).await?;
    let devices = bounded(
        endpoints,
        client.get(
            kind_prefix("devices"),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    let revision = devices.header().map(|h| h.revision()).unwrap_or(0);
    let at = |o: GetOptions| {
        if revision > 0 {
            o.with_revision(revision)
        } else {
            o
        }
    };
    let reservations = bounded(
        endpoints,
        client.get(
            kind_prefix("reservations"),
            Some(at(GetOptions::new().with_prefix())),
        ),
    )
    .await?;
    let transitions = bounded(
        endpoints,
        client.get(
            kind_prefix("transition"),
            Some(at(GetOptions::new().with_prefix().with_keys_only())),
        ),
    )
    .await?;
    let name_of = |key: &[u8], kind: &str| -> Option<String> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&kind_prefix(kind)).map(str::to_string)
    };
    let holders: BTreeMap<String, String> = reservations
        .kvs()
        .iter()
        .filter_map(|kv| {
            let name = name_of(kv.key(), "reservations")?;
            let value: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
            let holder = match value.get("holder") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "(unknown holder)".to_string(),
            };
            Some((name, holder))
        })
        .collect();
    let transition: Vec<String> = transitions
        .kvs()
        .iter()
        .filter_map(|kv| name_of(kv.key(), "transition"))
        .collect();
    let mut out = Vec::new();
    for kv in devices.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let device: DeviceRecord = serde_json::from_slice(kv.value())
            .map_err(|source| FleetError::BadRecord { key, source })?;
        out.push(Listed {
            holder: holders.get(&device.name).cloned(),
            in_transition: transition.contains(&device.name),
            device,
        });
    }
    Ok(out)
}
