//! The publisher on its own (crates/fleet/src/publish.rs) against a real
//! one-member etcd: a device that goes away is withdrawn at once, one that
//! comes back is published again with no transition key left behind, and
//! the goodbye takes everything out at once.

use std::time::{Duration, Instant};

use usbwire_fleet::list::list;
use usbwire_fleet::publish::{Publisher, PublisherConfig};
use usbwire_fleet::record::{DeviceRecord, InterfaceClass, ServerRecord};
use usbwire_tests::etcd::{self, Cluster};
use usbwire_tests::fabric::Fabric;

const HANG: Duration = Duration::from_secs(60);

fn device(name: &str, busid: &str) -> DeviceRecord {
    DeviceRecord {
        name: name.into(),
        server: "pub".into(),
        host: "10.77.0.99".into(),
        port: 3240,
        busid: busid.into(),
        vendor_id: "1d6b".into(),
        product_id: "0104".into(),
        device_class: InterfaceClass {
            class: 0,
            subclass: 0,
            protocol: 0,
        },
        interfaces: vec![InterfaceClass {
            class: 0xff,
            subclass: 0,
            protocol: 0,
        }],
        speed: "high".into(),
        serial: None,
        labels: vec!["lab-1".into()],
        tls: false,
        fingerprint: None,
    }
}

/// Polls the fleet's listing (bounded) until its names are `want`.
async fn wait_names(eps: &[String], want: &[&str]) -> Duration {
    let start = Instant::now();
    // Each round is one listing; the loop ends by HANG.
    loop {
        let listed = list(eps).await.expect("listing the fleet");
        let names: Vec<&str> = listed.iter().map(|d| d.device.name.as_str()).collect();
        if names == want {
            assert!(
                listed.iter().all(|d| !d.in_transition),
                "a transition key was left: {listed:?}"
            );
            return start.elapsed();
        }
        assert!(
            start.elapsed() < HANG,
            "the fleet lists {names:?}, not {want:?}, after {HANG:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn publisher_withdraws_at_once_and_publishes_again() {
    if !etcd::require() {
        return;
    }
    let mut fabric = Fabric::new();
    let cluster = Cluster::start(&mut fabric, 1);
    let host = fabric.add_host("pub");
    let eps = cluster.endpoint_list();
    host.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let publisher = Publisher::spawn(PublisherConfig {
                endpoints: eps.clone(),
                server: ServerRecord {
                    id: "pub".into(),
                    host: "10.77.0.99".into(),
                    port: 3240,
                    tls: false,
                    fingerprint: None,
                    version: "test".into(),
                },
                ttl: Duration::from_secs(3),
            });
            let (a, b) = (device("pub/1-1", "1-1"), device("pub/1-2", "1-2"));
            publisher.set_devices([a.clone(), b.clone()]);
            let t = wait_names(&eps, &["pub/1-1", "pub/1-2"]).await;
            println!("published in {t:?}");
            publisher.set_devices([a.clone()]);
            let t = wait_names(&eps, &["pub/1-1"]).await;
            println!("unplugged device withdrawn in {t:?}");
            publisher.set_devices([a, b]);
            let t = wait_names(&eps, &["pub/1-1", "pub/1-2"]).await;
            println!("replugged device published again in {t:?}");
            publisher.shutdown().await;
            let left = list(&eps).await.expect("listing the fleet");
            assert!(left.is_empty(), "the goodbye left {left:?}");
        });
    });
    assert!(
        cluster.keys("/usbwire/v1/").is_empty(),
        "keys left after the goodbye"
    );
}
