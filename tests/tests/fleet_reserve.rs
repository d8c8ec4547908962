//! Fleet reservations (#17 point 3) against a real 3-member etcd cluster
//! in namespaces this test creates: 50 racing `usbip reserve --match` for
//! 10 devices, EAGAIN for a device in transition, release, a killed
//! holder's device coming free within its TTL, and the server's import
//! check (a reserved device only for its holder's token).
//!
//! The 10 matching devices (Gadget Zero test devices, 0525:a4a0) are
//! published by three `usbipd --fleet` servers, each in a namespace of its
//! own (4, 3 and 3 of them, with a keyboard that does not match); two more
//! records ("other", "guarded") are written by hand in the publisher's
//! schema, for the transition and the in-process import check. One
//! cluster serves every scenario, in an order in which each starts from a
//! known state.

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usbwire_devices::testdev::TestDevice;
use usbwire_devices::EmulatedDevice;
use usbwire_fleet::reserve::{Fleet, ReservationGate, Want};
use usbwire_proto::OpStatus;
use usbwire_server::gate::Gate;
use usbwire_server::ServerConfig;
use usbwire_tests::fabric::{Fabric, Host};
use usbwire_tests::fleet::FleetServer;
use usbwire_tests::support::TestServer;
use usbwire_tests::{etcd, kernel};

const RESERVATIONS: &str = "/usbwire/v1/reservations/";
const RACERS: usize = 50;
const MATCHING: usize = 10;
/// What the servers' test devices are (Gadget Zero's ids).
const MATCH: &str = "0525:a4a0";

/// A server's configuration: `tests` test devices and a keyboard.
fn server_config(tests: usize) -> String {
    let mut config = String::new();
    for _ in 0..tests {
        config.push_str("[[device]]\nkind = \"test\"\nlabels = [\"race\"]\n");
    }
    config.push_str("[[device]]\nkind = \"keyboard\"\n");
    config
}
/// Short, so that a killed holder's device comes free soon.
const TTL: i64 = 4;

fn device_json(host: &str, busid: &str, vendor: &str, product: &str) -> String {
    serde_json::json!({
        "name": "", "server": "test-server", "host": host, "port": 3240, "busid": busid,
        "vendor_id": vendor, "product_id": product, "labels": ["lab-2"], "tls": false,
        "fingerprint": null,
    })
    .to_string()
}

fn usbip(client: &Host, dir: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = client.command(kernel::cargo_bin("usbip"));
    cmd.args(args)
        .env("USBWIRE_RESERVATION_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The local record a `usbip reserve` left in `dir`.
fn record(dir: &std::path::Path) -> serde_json::Value {
    let file = std::fs::read_dir(dir)
        .expect("reservation dir")
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .expect("a local reservation record");
    serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap()
}

/// Waits (bounded) until `key` is gone from etcd; how long it took.
fn until_gone(cluster: &etcd::Cluster, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while cluster.get(key).is_some() {
        assert!(start.elapsed() < limit, "{key} still there after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn holder_pid(dir: &std::path::Path) -> i32 {
    record(dir)["pid"].as_i64().expect("a holder pid") as i32
}

#[test]
fn reservations_race_expire_release_and_guard_imports() {
    if !etcd::require() {
        return;
    }
    // Built (once per test process) before anything is timed.
    kernel::cargo_bin("usbip");
    let started = Instant::now();
    let mut fabric = Fabric::new();
    let cluster = etcd::Cluster::start(&mut fabric, 3);
    let client = fabric.add_host("client");
    let server = fabric.add_host("server");
    let endpoints = cluster.endpoints();
    println!("3-member etcd cluster up in {:?}", started.elapsed());
    let server_ip = server.addr().to_string();
    let configs = tempfile::tempdir().unwrap();
    let _servers: Vec<FleetServer> = [4, 3, 3]
        .iter()
        .enumerate()
        .map(|(i, &tests)| {
            let id = format!("srv-{i}");
            let host = fabric.add_host(&id);
            FleetServer::start(
                &id,
                host,
                configs.path(),
                &server_config(tests),
                &endpoints,
                &[],
            )
        })
        .collect();
    let published = Instant::now();
    // Each round is one etcdctl; bounded by its own limit.
    while cluster.keys("/usbwire/v1/devices/srv-").len() < MATCHING + 3 {
        assert!(
            published.elapsed() < Duration::from_secs(60),
            "the servers did not publish: {:?}",
            cluster.keys("/usbwire/v1/devices/")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "3 servers published {} devices in {:?}",
        MATCHING + 3,
        published.elapsed()
    );
    let other = device_json(&server_ip, "2-1", "046d", "c52b");
    cluster.etcdctl(&client, &["put", "/usbwire/v1/devices/other", &other]);

    // One reserve and release alone, for scale.
    let alone = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = usbip(
        &client,
        alone.path(),
        &["reserve", "--fleet", &endpoints, "other"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let reserved_in = t.elapsed();
    let out = usbip(&client, alone.path(), &["release", "other"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    println!(
        "one reserve alone: {reserved_in:?}, its release: {:?}",
        t.elapsed() - reserved_in
    );

    // 50 racers, each its own client (its own record dir).
    let dirs: Vec<tempfile::TempDir> = (0..RACERS).map(|_| tempfile::tempdir().unwrap()).collect();
    let race = Instant::now();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let id = format!("racer-{i}");
            let ttl = TTL.to_string();
            usbip(
                &client,
                dir.path(),
                &[
                    "reserve",
                    "--fleet",
                    &endpoints,
                    "--match",
                    MATCH,
                    "--ttl",
                    &ttl,
                    "--client-id",
                    &id,
                ],
            )
            .spawn()
            .expect("run usbip reserve")
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("usbip reserve ends"))
        .collect();
    println!("{RACERS} racing reserves done in {:?}", race.elapsed());
    let won: Vec<usize> = (0..RACERS)
        .filter(|&i| outputs[i].status.success())
        .collect();
    for (i, out) in outputs.iter().enumerate() {
        if !out.status.success() {
            assert_eq!(
                out.status.code(),
                Some(libc::EBUSY),
                "racer {i}: {}",
                text(out)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("EBUSY"),
                "racer {i}: {}",
                text(out)
            );
        }
    }
    assert_eq!(won.len(), MATCHING, "winners: {won:?}");
    let held = cluster.keys(RESERVATIONS);
    assert_eq!(held.len(), MATCHING, "{held:?}");
    let mut holders: Vec<String> = held
        .iter()
        .map(|k| {
            let v: serde_json::Value = serde_json::from_str(&cluster.get(k).unwrap()).unwrap();
            v["holder"].as_str().unwrap().to_string()
        })
        .collect();
    holders.sort();
    holders.dedup();
    assert_eq!(
        holders.len(),
        MATCHING,
        "a client holds two devices: {holders:?}"
    );
    for &i in &won {
        let name = record(dirs[i].path())["name"].as_str().unwrap().to_string();
        let device: serde_json::Value = serde_json::from_str(
            &cluster
                .get(&format!("/usbwire/v1/devices/{name}"))
                .unwrap_or_else(|| panic!("{name} is not published")),
        )
        .unwrap();
        assert_eq!(
            format!("{}:{}", device["vendor_id"], device["product_id"]).replace('"', ""),
            MATCH,
            "{name} does not match"
        );
        assert!(String::from_utf8_lossy(&outputs[i].stdout).contains(&name));
    }

    // Held past the TTL: the detached holders keep their leases alive.
    std::thread::sleep(Duration::from_secs(TTL as u64 + 2));
    assert_eq!(
        cluster.keys(RESERVATIONS).len(),
        MATCHING,
        "a holder let go"
    );

    // Release: gone at once, and its holder ends.
    let releaser = dirs[won[0]].path();
    let name = record(releaser)["name"].as_str().unwrap().to_string();
    let pid = holder_pid(releaser);
    let out = usbip(&client, releaser, &["release", &name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        cluster.get(&format!("{RESERVATIONS}{name}")),
        None,
        "released but still held"
    );
    let gone = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            gone.elapsed() < Duration::from_secs(30),
            "the holder {pid} did not end"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A killed holder: free within its TTL.
    let victim = dirs[won[1]].path();
    let name = record(victim)["name"].as_str().unwrap().to_string();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(holder_pid(victim)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let freed = until_gone(
        &cluster,
        &format!("{RESERVATIONS}{name}"),
        Duration::from_secs(60),
    );
    println!("killed holder (kill -9, TTL {TTL} s): {name} free again after {freed:?}");

    // In transition: EAGAIN.
    cluster.etcdctl(&client, &["put", "/usbwire/v1/transition/other", "{}"]);
    let dir = tempfile::tempdir().unwrap();
    let out = usbip(
        &client,
        dir.path(),
        &["reserve", "--fleet", &endpoints, "other"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(libc::EAGAIN), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("EAGAIN"),
        "{}",
        text(&out)
    );
    cluster.etcdctl(&client, &["del", "/usbwire/v1/transition/other"]);

    // The server's import check, with an in-process server in its own
    // namespace whose 1-1 is published as "guarded".
    let guarded = device_json("127.0.0.1", "1-1", "1d6b", "0104");
    cluster.etcdctl(&client, &["put", "/usbwire/v1/devices/guarded", &guarded]);
    let eps = endpoints.clone();
    server.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(import_check(&eps))
    });

    // Every holder stopped: nothing left held.
    for &i in &won[2..] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder_pid(dirs[i].path())),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let all = Instant::now();
    while !cluster.keys(RESERVATIONS).is_empty() {
        assert!(
            all.elapsed() < Duration::from_secs(60),
            "{:?}",
            cluster.keys(RESERVATIONS)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("whole test: {:?}", started.elapsed());
}

async fn import_check(endpoints: &str) {
    let fleet = Fleet::connect(endpoints).await.expect("etcd");
    let gate = ReservationGate::new(
        fleet.clone(),
        Arc::new(|busid: &str| (busid == "1-1").then(|| "guarded".to_string())),
    );
    let config = ServerConfig {
        workers: 1,
        import_gate: Gate::new(Arc::new(gate)),
        ..ServerConfig::default()
    };
    let s = TestServer::start(vec![EmulatedDevice::new(TestDevice::new())], config).await;

    // Unreserved: anyone.
    let device = usbwire_client::import(s.addr, "1-1")
        .await
        .expect("unreserved import");
    drop(device);

    let reserved = fleet
        .reserve(&Want::Name("guarded".into()), "holder-a", "client-a", 10)
        .await
        .expect("reserve guarded");
    let refused = |r: Result<usbwire_client::RemoteDevice, usbwire_client::ClientError>| match r {
        Err(usbwire_client::ClientError::ImportRefused { status, .. }) => status,
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("a reserved device was imported by another client"),
    };
    // The registry frees the previous import asynchronously; the gate's
    // answer comes first, so a refusal here is the gate's.
    assert_eq!(
        refused(usbwire_client::import(s.addr, "1-1").await),
        OpStatus::DevBusy
    );
    let wrong = usbwire_fleet::reserve::new_token().unwrap().to_hex();
    assert_eq!(
        refused(usbwire_client::import(s.addr, &format!("1-1#{wrong}")).await),
        OpStatus::DevBusy
    );
    let holder = usbwire_client::import(s.addr, &format!("1-1#{}", reserved.token.to_hex()))
        .await
        .expect("the holder imports its device");
    let descriptor = holder
        .device_descriptor()
        .await
        .expect("the holder uses it");
    assert_eq!(descriptor[1], 1, "a device descriptor");
    drop(holder);

    fleet.revoke(reserved.record.lease).await.expect("release");
    // The gate reads linearizably: released is importable at once.
    let again = usbwire_client::import(s.addr, "1-1")
        .await
        .expect("released, and importable");
    drop(again);
    s.stop().await;
}
