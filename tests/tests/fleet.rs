//! The fleet on a real 3-member etcd cluster (Debian's etcd-server), with
//! three `usbipd --fleet` servers and a client, each in a network
//! namespace of its own (tests/src/fabric.rs, tests/src/etcd.rs).
//!
//! One test function, one cluster and one set of servers, scenario after
//! scenario, each starting from the state the one before left (all
//! published): the listing, a duplicate name (EEXIST), a killed server, a
//! killed etcd member (no record changes lease; reserving and the import
//! check go on), the whole cluster down (an attached device keeps working,
//! a new import works, a reservation fails saying why, publishing resumes
//! on the same lease), and one server cut off.
//! The times printed are measured, not asserted: the TTL is etcd's; only
//! generous hang bounds are asserted.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use usbwire_tests::etcd::{self, Cluster};
use usbwire_tests::fabric::{Fabric, Host};
use usbwire_tests::fleet::{import, import_once_free, usbip, FleetServer as Server, PORT};

/// The servers' lease TTL (seconds).
const TTL: u64 = 3;
/// How long any awaited change may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
const SCHEMA: &str = include_str!("../../schema/usbip-list-fleet.schema.json");

/// The names of the devices published now, and by which server.
fn published(cluster: &Cluster) -> BTreeSet<(String, String)> {
    cluster
        .keys("/usbwire/v1/devices/")
        .iter()
        .filter_map(|k| {
            let name = k.strip_prefix("/usbwire/v1/devices/")?;
            let value = cluster.get(k)?;
            let v: serde_json::Value = serde_json::from_str(&value).ok()?;
            Some((name.to_string(), v["server"].as_str()?.to_string()))
        })
        .collect()
}

/// Polls (bounded by [`HANG`]) until `done` holds; returns how long it took.
fn wait_for(what: &str, cluster: &Cluster, mut done: impl FnMut(&Cluster) -> bool) -> Duration {
    let start = Instant::now();
    // Each round is one etcdctl exchange; the loop ends by HANG.
    while start.elapsed() < HANG {
        if done(cluster) {
            return start.elapsed();
        }
        std::thread::sleep(POLL);
    }
    panic!(
        "{what}: not within {HANG:?}; published now: {:?}\n{}",
        published(cluster),
        cluster.logs()
    );
}

fn names_of(cluster: &Cluster, server: &str) -> BTreeSet<String> {
    published(cluster)
        .into_iter()
        .filter(|(_, s)| s == server)
        .map(|(n, _)| n)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn stdout_of(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lease a key is attached to (0: none or no key).
fn lease_of(cluster: &Cluster, from: &Host, key: &str) -> i64 {
    let out = cluster.etcdctl(from, &["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl -w json");
    v["kvs"][0]["lease"].as_i64().unwrap_or(0)
}

const CONFIG_A: &str = r#"
[[device]]
kind = "test"
name = "bench/sourcesink"
labels = ["pixel-7", "lab-2"]
[[device]]
kind = "keyboard"
labels = ["lab-2"]
"#;

const CONFIG_B: &str = r#"
[[device]]
kind = "test"
labels = ["lab-1"]
[[device]]
kind = "serial"
labels = ["lab-1", "uart"]
"#;

// Its test device takes a name srv-a holds already.
const CONFIG_C: &str = r#"
[[device]]
kind = "test"
name = "bench/sourcesink"
labels = ["duplicate"]
[[device]]
kind = "keyboard"
labels = ["lab-3"]
"#;

#[test]
fn fleet_publishes_lists_and_survives_failures() {
    if !etcd::require() {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let held = dir.path().join("reservations");
    std::fs::create_dir_all(&held).unwrap();
    let mut fabric = Fabric::new();
    let mut cluster = Cluster::start(&mut fabric, 3);
    let eps = cluster.endpoints();
    let client = fabric.add_host("client");
    let (ha, hb, hc) = (
        fabric.add_host("srv-a"),
        fabric.add_host("srv-b"),
        fabric.add_host("srv-c"),
    );
    println!("cluster of 3 up in {:?}", t0.elapsed());

    let ttl_secs = TTL.to_string();
    let ttl = ["--fleet-ttl", ttl_secs.as_str()];
    // srv-a first: the name bench/sourcesink is its.
    let mut a = Server::start("srv-a", ha.clone(), dir.path(), CONFIG_A, &eps, &ttl);
    let a_names = set(&["bench/sourcesink", "srv-a/1-2"]);
    wait_for("srv-a published", &cluster, |c| {
        names_of(c, "srv-a") == a_names
    });
    let mut b = Server::start("srv-b", hb.clone(), dir.path(), CONFIG_B, &eps, &ttl);
    let mut c = Server::start("srv-c", hc.clone(), dir.path(), CONFIG_C, &eps, &ttl);
    let b_names = set(&["srv-b/1-1", "srv-b/1-2"]);
    let c_names = set(&["srv-c/1-2"]);
    wait_for("srv-b and srv-c published", &cluster, |cl| {
        names_of(cl, "srv-b") == b_names && names_of(cl, "srv-c") == c_names
    });

    // --- A duplicate configured name: EEXIST on srv-c, nothing of it left.
    wait_for("srv-c logs EEXIST", &cluster, |_| {
        c.log_text().contains("EEXIST")
    });
    let log = c.log_text();
    assert!(
        log.contains("\"bench/sourcesink\" is already published by server srv-a (EEXIST)"),
        "{log}"
    );
    let record: serde_json::Value = serde_json::from_str(
        &cluster
            .get("/usbwire/v1/devices/bench/sourcesink")
            .expect("the record"),
    )
    .unwrap();
    assert_eq!(record["server"], "srv-a");
    assert_eq!(record["labels"], serde_json::json!(["pixel-7", "lab-2"]));
    // The device's own iSerialNumber string (Gadget Zero's), none configured.
    assert_eq!(record["serial"], "0001", "{record}");
    assert!(
        cluster.keys("/usbwire/v1/transition/").is_empty(),
        "a transition key was left"
    );
    let all_keys = cluster.keys("/usbwire/v1/");
    let expected_keys: Vec<String> = [
        "devices/bench/sourcesink",
        "devices/srv-a/1-2",
        "devices/srv-b/1-1",
        "devices/srv-b/1-2",
        "devices/srv-c/1-2",
        "servers/srv-a",
        "servers/srv-b",
        "servers/srv-c",
    ]
    .iter()
    .map(|k| format!("/usbwire/v1/{k}"))
    .collect();
    assert_eq!(all_keys, expected_keys, "the whole keyspace");
    // srv-c's device refused the name is exported locally only: a
    // reservation of srv-a's bench/sourcesink is not about it.
    let out = usbip(
        &client,
        &held,
        &["reserve", "--fleet", &eps, "bench/sourcesink"],
    );
    assert!(out.status.success(), "reserving bench/sourcesink: {out:?}");
    let a_addr = std::net::SocketAddr::from((ha.addr(), PORT));
    let c_addr = std::net::SocketAddr::from((hc.addr(), PORT));
    assert_eq!(
        import(&client, a_addr, None, "1-1"),
        Err(usbwire_proto::OpStatus::DevBusy),
        "srv-a's reserved device imported without a token"
    );
    assert_eq!(
        import(&client, c_addr, None, "1-1"),
        Ok("1-1".into()),
        "srv-c's local-only device refused for another server's reservation\n{}",
        c.log_text()
    );
    let out = usbip(&client, &held, &["release", "bench/sourcesink"]);
    assert!(out.status.success(), "usbip release: {out:?}");

    // --- Listing: every device once, text and JSON (schema-checked).
    let json = stdout_of(
        &usbip(&client, &held, &["list", "--fleet", &eps, "--json"]),
        "usbip list --fleet --json",
    );
    let listed: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("a valid schema");
    if let Err(e) = validator.validate(&listed) {
        panic!("list --fleet --json does not match its schema: {e}\n{json}");
    }
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "bench/sourcesink",
            "srv-a/1-2",
            "srv-b/1-1",
            "srv-b/1-2",
            "srv-c/1-2"
        ]
    );
    let bench = &listed[0];
    assert_eq!(bench["host"], ha.addr().to_string());
    assert_eq!(bench["port"], PORT);
    assert_eq!(bench["busid"], "1-1");
    assert_eq!(bench["holder"], serde_json::Value::Null);
    assert_eq!(bench["tls"], false);
    let text = stdout_of(
        &usbip(&client, &held, &["list", "--fleet", &eps]),
        "usbip list --fleet",
    );
    for name in &names {
        assert_eq!(
            text.matches(&format!("  {name}: ")).count(),
            1,
            "{name} not listed exactly once:\n{text}"
        );
    }
    assert!(text.contains("labels: pixel-7, lab-2"), "{text}");
    println!("listing and EEXIST checked at {:?}", t0.elapsed());

    // --- A killed server leaves within the TTL, and comes back.
    b.kill();
    let gone = wait_for("srv-b's devices gone", &cluster, |cl| {
        names_of(cl, "srv-b").is_empty() && cl.get("/usbwire/v1/servers/srv-b").is_none()
    });
    println!("srv-b SIGKILLed: its devices left the fleet after {gone:?} (lease ttl {TTL} s)");
    let restart = Instant::now();
    b.spawn();
    wait_for("srv-b back", &cluster, |cl| {
        names_of(cl, "srv-b") == b_names
    });
    println!(
        "srv-b restarted: its devices back after {:?}",
        restart.elapsed()
    );

    // --- SIGTERM: the goodbye revokes the lease, the keys go at once.
    c.terminate();
    assert!(
        names_of(&cluster, "srv-c").is_empty(),
        "srv-c left keys behind"
    );
    assert!(cluster.get("/usbwire/v1/servers/srv-c").is_none());

    // --- An etcd member killed: publishing and listing go on, and no
    // record loses its lease (a server whose session was on that member
    // keeps the same lease alive through another one).
    let a_key = "/usbwire/v1/devices/srv-a/1-2";
    let b_key = "/usbwire/v1/devices/srv-b/1-1";
    let a_lease = lease_of(&cluster, &client, a_key);
    let b_lease = lease_of(&cluster, &client, b_key);
    assert!(a_lease != 0 && b_lease != 0, "records without a lease");
    // srv-b's import check connects to etcd at its first import: now,
    // while every member is up.
    let b_addr = std::net::SocketAddr::from((hb.addr(), PORT));
    assert_eq!(import(&client, b_addr, None, "1-1"), Ok("1-1".into()));
    cluster.kill_member(0);
    let republish = Instant::now();
    c.spawn();
    wait_for("srv-c published with a member down", &cluster, |cl| {
        names_of(cl, "srv-c") == c_names
    });
    println!(
        "etcd member 0 killed: srv-c restarted and published in {:?}",
        republish.elapsed()
    );
    let listed = stdout_of(
        &usbip(&client, &held, &["list", "--fleet", &eps, "--json"]),
        "usbip list --fleet with a member down",
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let logs = || {
        format!(
            "--- srv-a\n{}\n--- srv-b\n{}\n--- srv-c\n{}",
            a.log_text(),
            b.log_text(),
            c.log_text()
        )
    };
    assert_eq!(listed.as_array().unwrap().len(), 5, "{listed}\n{}", logs());
    assert_eq!(
        (
            lease_of(&cluster, &client, a_key),
            lease_of(&cluster, &client, b_key)
        ),
        (a_lease, b_lease),
        "a record changed lease when a member died\n{}",
        logs()
    );
    for s in [&a, &b] {
        let lost = s.log_text().contains("fleet: publishing stopped");
        println!(
            "{}: {}",
            s.id,
            if lost {
                "its session was on member 0; it kept its lease through another member"
            } else {
                "its session was on another member"
            }
        );
    }
    // Reserving and the servers' import check go on too.
    let reserved = stdout_of(
        &usbip(
            &client,
            &held,
            &["reserve", "--fleet", &eps, "srv-b/1-1", "--json"],
        ),
        "usbip reserve with a member down",
    );
    let reserved: serde_json::Value = serde_json::from_str(&reserved).expect("JSON");
    assert_eq!(reserved["name"], "srv-b/1-1", "{reserved}");
    let token = std::fs::read_dir(&held)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let r: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap())
                .expect("the local reservation record");
            r["token"].as_str().expect("a token").to_string()
        })
        .expect("a local reservation record");
    assert_eq!(
        import(&client, b_addr, None, "1-1"),
        Err(usbwire_proto::OpStatus::DevBusy),
        "a reserved device was imported without its token, a member down\n{}",
        b.log_text()
    );
    assert_eq!(
        import_once_free(&client, b_addr, || None, &format!("1-1#{token}")),
        Ok("1-1".into()),
        "{}",
        b.log_text()
    );
    let out = usbip(&client, &held, &["release", "srv-b/1-1"]);
    assert!(out.status.success(), "usbip release: {out:?}");
    println!("etcd member 0 down: reserved, refused, imported by the holder, released");
    cluster.restart_member(0);

    // --- The whole cluster down: local export goes on; publishing resumes
    // on the same lease (etcd keeps leases through its own restart).
    // An import made before the outage, used during it.
    let (imported_tx, imported_rx) = std::sync::mpsc::channel();
    let (down_tx, down_rx) = std::sync::mpsc::channel::<()>();
    let attached = client.spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let device = tokio::time::timeout(HANG, usbwire_client::import(a_addr, "1-1"))
                .await
                .expect("import hang")
                .expect("import from srv-a before the outage");
            imported_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || down_rx.recv_timeout(HANG))
                .await
                .unwrap()
                .expect("told that etcd is down");
            let used = tokio::time::timeout(HANG, device.device_descriptor()).await;
            used.map(|d| d.map(|d| d[1]))
        })
    });
    imported_rx
        .recv_timeout(HANG)
        .expect("the import before the outage");
    cluster.stop();
    let down = Instant::now();
    down_tx.send(()).unwrap();
    match attached.join().expect("the attached client's thread") {
        Ok(Ok(1)) => {}
        other => panic!("an attached device stopped working with etcd down: {other:?}"),
    }
    // A new reservation fails, and says why.
    let refused = usbip(&client, &held, &["reserve", "--fleet", &eps, "srv-a/1-2"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("etcd") && said.contains("reachable"),
        "usbip reserve with etcd down: {refused:?}"
    );
    println!(
        "etcd down: a reservation fails at once ({:?}, {:?}): {}",
        refused.status,
        down.elapsed(),
        said.trim()
    );
    let remote = stdout_of(
        &usbip(&client, &held, &["list", "-r", &ha.addr().to_string()]),
        "usbip list -r srv-a with etcd down",
    );
    assert!(
        remote.contains("1-1:") && remote.contains("1-2:"),
        "{remote}"
    );
    assert_eq!(
        import(&client, a_addr, None, "1-2"),
        Ok("1-2".into()),
        "import from srv-a with etcd down\n{}",
        a.log_text()
    );
    println!(
        "etcd down: srv-a listed and imported from in {:?}",
        down.elapsed()
    );
    // Let srv-a see the outage before the cluster comes back.
    let sessions_before = a.log_text().matches("fleet: publishing as server").count();
    let seen = Instant::now();
    while a.log_text().matches("fleet: publishing stopped").count() < sessions_before {
        assert!(
            seen.elapsed() < HANG,
            "srv-a never noticed the outage\n{}",
            a.log_text()
        );
        std::thread::sleep(POLL);
    }
    println!("srv-a noticed the outage after {:?}", down.elapsed());
    // A server that dies while etcd is down: its lease is restored with the
    // cluster and then expires, as nobody keeps it alive.
    b.kill();
    let back = Instant::now();
    cluster.start_again();
    let healthy = back.elapsed();
    let b_gone = wait_for(
        "srv-b's records expired after the cluster's return",
        &cluster,
        |cl| names_of(cl, "srv-b").is_empty(),
    );
    assert_eq!(
        names_of(&cluster, "srv-a"),
        a_names,
        "srv-a's records went with srv-b's: it did not resume\n{}",
        a.log_text()
    );
    assert_eq!(lease_of(&cluster, &client, a_key), a_lease);
    let log = a.log_text();
    assert!(log.contains(", kept, ttl"), "{log}");
    println!(
        "etcd back (healthy after {healthy:?}): srv-b (killed meanwhile) left {b_gone:?} later; \
         srv-a publishing again on its lease"
    );

    // --- A server cut off from the cluster for longer than the TTL: its
    // records leave; back, it publishes everything under a new lease.
    b.spawn();
    wait_for("srv-b back", &cluster, |cl| {
        names_of(cl, "srv-b") == b_names
    });
    ha.disconnect();
    let left = wait_for(
        "srv-a's records expired while it is cut off",
        &cluster,
        |cl| names_of(cl, "srv-a").is_empty(),
    );
    println!("srv-a cut off: its devices left the fleet after {left:?} (lease ttl {TTL} s)");
    ha.reconnect();
    let rejoined = Instant::now();
    wait_for("srv-a re-published under a new lease", &cluster, |cl| {
        let lease = lease_of(cl, &client, a_key);
        lease != 0 && lease != a_lease && names_of(cl, "srv-a") == a_names
    });
    println!(
        "srv-a reconnected: published again under a new lease {:?} later",
        rejoined.elapsed()
    );
    assert!(
        a.log_text().contains("is gone"),
        "srv-a did not say its lease was gone\n{}",
        a.log_text()
    );
    assert_eq!(names_of(&cluster, "srv-b"), b_names);
    assert_eq!(names_of(&cluster, "srv-c"), c_names);
    a.terminate();
    assert!(
        names_of(&cluster, "srv-a").is_empty(),
        "srv-a left keys behind"
    );
    println!("whole scenario took {:?}", t0.elapsed());
}
