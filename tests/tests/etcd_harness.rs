//! The etcd test harness itself (tests/src/etcd.rs): a one-member cluster
//! in a namespace fabric keeps its data across a stop and a start, and a
//! black-holed cluster answers nobody until it is reconnected.

use usbwire_tests::{etcd, fabric::Fabric};

#[test]
fn one_member_cluster_keeps_its_data_and_can_be_black_holed() {
    if !etcd::require() {
        return;
    }
    let mut fabric = Fabric::new();
    let mut cluster = etcd::Cluster::start(&mut fabric, 1);
    let client = fabric.add_host("client");
    cluster.etcdctl(&client, &["put", "/harness/k", "v1"]);
    assert_eq!(cluster.get("/harness/k").as_deref(), Some("v1"));

    cluster.stop();
    let down = cluster.etcdctl_output(&client, &["get", "/harness/k"]);
    assert!(!down.status.success(), "a stopped cluster answered");
    cluster.start_again();
    assert_eq!(cluster.get("/harness/k").as_deref(), Some("v1"));

    cluster.disconnect();
    let cut = cluster.etcdctl_output(&client, &["get", "/harness/k"]);
    assert!(!cut.status.success(), "a black-holed cluster answered");
    cluster.reconnect();
    assert_eq!(cluster.keys("/harness/"), vec!["/harness/k".to_string()]);
}
