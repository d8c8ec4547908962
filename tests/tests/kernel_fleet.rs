//! A fleet reservation end to end through the kernel, in one guest run:
//! a real etcd (Debian's etcd-server) and our `usbipd --fleet` exporting a
//! disk, each in a network namespace of a [`Fabric`], and in the Debian
//! guest our `usbip`:
//!
//! 1. `usbip reserve --fleet` takes the disk; its detached holder keeps
//!    the lease;
//! 2. nobody else can import it: the host's client library (from another
//!    namespace) is refused with ST_DEV_BUSY, and so are Debian's C
//!    `usbip attach` and our plain `usbip attach -r` in the guest, while
//!    the server lists the disk as exported and free;
//! 3. the holder's `usbip attach --fleet` attaches it through vhci-hcd
//!    (its token in the import) and the guest reads the disk: the image's
//!    bytes;
//! 4. after `usbip detach` and `usbip release`, Debian's C tool attaches
//!    it and reads the same bytes, and the host's library imports it.
//!
//! The guest reaches the fabric through two relays on the host's loopback
//! whose upstream sockets are made inside a fabric host's namespace
//! ([`Relay::start_into`]); its guestfwd sends 10.0.2.100:2379 to etcd and
//! 10.0.2.100:3240 to usbipd, which publishes 10.0.2.100:3240 as its
//! address (`--fleet-address`), so the fleet record is what the guest
//! dials.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use usbwire_fleet::record::{device_key, kind_prefix, DeviceRecord};
use usbwire_proto::OpStatus;
use usbwire_tests::etcd::{self, Cluster, CLIENT_PORT};
use usbwire_tests::fabric::Fabric;
// usbipd's port in its namespace, and the guest's port forwarded to it.
use usbwire_tests::fleet::{import, import_once_free, FleetServer, PORT as USBIP_PORT};
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::relay::Relay;
use usbwire_tests::support::output_value;

/// The guest signals port: the host has checked its import is refused.
const SIG_CHECKED: u16 = 5555;
const NAME: &str = "lab/disk";
const BUSID: &str = "1-1";
/// The server's lease TTL (seconds).
const TTL: u64 = 5;
/// How long the server and the fleet may take to come up.
const HANG: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
const DISK_BYTES: u32 = 1024 * 1024;

/// The disk usbipd exports, and its configuration.
fn disk_config(dir: &Path) -> String {
    let image = dir.join("disk.img");
    // Distinct bytes in every block: a read of the wrong block shows.
    let disk: Vec<u8> = (0..DISK_BYTES)
        .map(|i| ((i / 512) as u8) ^ (i as u8).rotate_left(3) ^ 0x5a)
        .collect();
    std::fs::write(&image, &disk).expect("writing the disk image");
    format!(
        "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\nread_only = true\n\
         name = \"{NAME}\"\nlabels = [\"kernel-fleet\"]\n",
        image.display()
    )
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("running sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn reserved_device_is_refused_to_others_and_attached_by_its_holder_through_vhci() {
    if !etcd::require() {
        return;
    }
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fabric = Fabric::new();
    let cluster = Cluster::start(&mut fabric, 1);
    let endpoints = cluster.endpoints();
    let srv = fabric.add_host("srv");
    // The guest's side of the fabric, and the host library's client.
    let gw = fabric.add_host("gw");
    let ttl = TTL.to_string();
    let published_addr = format!("{GUESTFWD_ADDR}:{USBIP_PORT}");
    let server = FleetServer::start(
        "srv",
        srv.clone(),
        dir.path(),
        &disk_config(dir.path()),
        &endpoints,
        &["--fleet-ttl", &ttl, "--fleet-address", &published_addr],
    );
    let server_addr = SocketAddr::from((srv.addr(), USBIP_PORT));
    let etcd_addr = SocketAddr::from((cluster.member_host(0).addr(), CLIENT_PORT));
    let etcd_relay = Relay::start_into(etcd_addr, &gw).expect("the relay to etcd");
    let usbip_relay = Relay::start_into(server_addr, &gw).expect("the relay to usbipd");

    // Published, with the address the guest dials.
    let key = device_key(NAME);
    let published = Instant::now();
    let record: DeviceRecord = loop {
        if let Some(v) = cluster.get(&key) {
            break serde_json::from_str(&v).expect("a device record");
        }
        assert!(
            published.elapsed() < HANG,
            "{NAME} not published within {HANG:?}\n{}\n{}",
            server.log_text(),
            cluster.logs()
        );
        std::thread::sleep(POLL);
    };
    assert_eq!(
        (record.host.as_str(), record.port, record.busid.as_str()),
        (GUESTFWD_ADDR.to_string().as_str(), USBIP_PORT, BUSID),
        "{record:?}"
    );

    let script = format!(
        r#"set -e
modprobe vhci-hcd
E=http://{fwd}:{etcd_port}
S={fwd}
U=usbip-rs
disk() {{ usbwire_wait_cmd 60 sh -c 'ls /dev/sd?' && ls /dev/sd? | head -n 1; }}
no_disk() {{ ! ls /dev/sd? >/dev/null 2>&1; }}
no_port() {{ ! $U port | grep -q '^Port [0-9]'; }}
first_port() {{ $U port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }}
exported() {{ $U list -r $S | grep -q ' {busid}: '; }}
dead() {{ [ ! -e /proc/$1 ] || [ "$(sed 's/.*) \(.\).*/\1/' /proc/$1/stat)" = Z ]; }}
sum() {{ dd if="$1" bs=65536 2>/dev/null | sha256sum | cut -d' ' -f1; }}

echo "== fleet list"
$U list --fleet $E

echo "== (1) reserve"
$U reserve --fleet $E {name} --ttl 30 >/tmp/reserve.out 2>&1 || {{ cat /tmp/reserve.out; exit 3; }}
echo "RESERVE-OUT=$(cat /tmp/reserve.out)"
holder=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' $USBWIRE_RESERVATION_DIR/*.json)
echo "HOLDER=$holder"
echo "LISTED-HELD=$($U list --fleet $E | grep -o 'held by .*')"
if [ -z "$holder" ] || dead "$holder"; then echo "no holder keeps the lease"; exit 3; fi
echo RESERVED
usbwire_wait_signal {sig} 300

echo "== (2) others are refused"
# Exported, and no session holds it: a refusal now is the reservation's.
exported
rc=0; usbip attach -r $S -b {busid} >/tmp/c.out 2>&1 || rc=$?
echo "C-ATTACH-RC=$rc"
echo "C-ATTACH-OUT=$(cat /tmp/c.out | tr '\n' ' ')"
rc=0; $U attach -r $S -b {busid} >/tmp/rs.out 2>&1 || rc=$?
echo "RS-ATTACH-RC=$rc"
echo "RS-ATTACH-OUT=$(cat /tmp/rs.out | tr '\n' ' ')"
no_port
no_disk

echo "== (3) the holder attaches it"
$U attach --fleet $E {name}
dev=$(disk)
echo "DISK-HOLDER=$(sum $dev)"
$U port
$U detach -p "$(first_port)"
usbwire_wait_cmd 60 no_disk

echo "== (4) released: anyone may import it"
$U release {name}
# The holder revokes the lease too on SIGTERM, and exits.
usbwire_wait_cmd 30 dead "$holder"
echo HOLDER-GONE
echo "RECORDS-LEFT=[$(ls $USBWIRE_RESERVATION_DIR)]"
echo "LISTED-RELEASED=$($U list --fleet $E | grep -o 'free$')"
# The holder's session ends at the server a moment after the detach.
usbwire_wait_cmd 60 exported
usbip attach -r $S -b {busid}
dev=$(disk)
echo "DISK-ANYONE=$(sum $dev)"
usbip detach -p "$(first_port)"
usbwire_wait_cmd 60 no_disk
usbwire_wait_cmd 60 exported
echo DONE
"#,
        fwd = GUESTFWD_ADDR,
        etcd_port = CLIENT_PORT,
        name = NAME,
        busid = BUSID,
        sig = SIG_CHECKED,
    );
    let g = guest
        .script(&script)
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .env("USBWIRE_RESERVATION_DIR", "/tmp/reservations")
        .guestfwd_port(CLIENT_PORT, etcd_relay.port())
        .guestfwd_port(USBIP_PORT, usbip_relay.port())
        .hostfwd(SIG_CHECKED)
        .timeout(Duration::from_secs(600))
        .spawn()
        .expect("boot the guest");
    let logs = || format!("--- usbipd log ---\n{}", server.log_text());
    g.wait_for_output("RESERVED\n", Duration::from_secs(400))
        .unwrap_or_else(|e| panic!("reserve in the guest: {e}\n{}", logs()));
    let reserved = Instant::now();

    // (2) from the host's library, in another namespace: refused as busy.
    let reservations = cluster.keys(&kind_prefix("reservations"));
    assert_eq!(
        reservations,
        vec![format!("{}{NAME}", kind_prefix("reservations"))],
        "{}",
        g.output()
    );
    assert_eq!(
        import(&gw, server_addr, None, BUSID),
        Err(OpStatus::DevBusy),
        "import of the reserved {NAME} by another client\n{}",
        logs()
    );
    g.signal(SIG_CHECKED, "checked", Duration::from_secs(60))
        .expect("signal the guest");

    let out = g.wait().expect("guest run");
    if !out.success() {
        panic!("guest failed\n{}\n{}", logs(), out.output);
    }
    let o = &out.output;
    let held_for = reserved.elapsed();

    // (1) the reservation the guest made, as it printed it.
    let said = output_value(o, "RESERVE-OUT=");
    assert!(
        said.starts_with(&format!(
            "reserved {NAME} (server {GUESTFWD_ADDR}:{USBIP_PORT}, busid {BUSID})"
        )),
        "{said}"
    );

    let holder = said
        .split(" for ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default();
    assert!(holder.starts_with("root@"), "{said}");
    assert_eq!(
        output_value(o, "LISTED-HELD="),
        format!("held by {holder}"),
        "{o}"
    );
    assert_eq!(output_value(o, "LISTED-RELEASED="), "free", "{o}");

    // (2) Debian's C tool and our plain attach were refused as busy.
    assert_ne!(output_value(o, "C-ATTACH-RC="), "0", "{o}");
    assert!(
        output_value(o, "C-ATTACH-OUT=").contains("Device busy"),
        "{o}"
    );
    assert_ne!(output_value(o, "RS-ATTACH-RC="), "0", "{o}");
    assert!(
        output_value(o, "RS-ATTACH-OUT=").contains("ST_DEV_BUSY"),
        "{o}"
    );
    let server_log = server.log_text();
    assert!(
        server_log.contains("no reservation token"),
        "the server logged no refusal for want of a token:\n{server_log}"
    );

    // (3), (4) the guest read the image's bytes, through its holder's
    // attach and, once released, through anyone's.
    let image = sha256_of(&dir.path().join("disk.img"));
    assert_eq!(output_value(o, "DISK-HOLDER="), image, "{o}");
    assert_eq!(output_value(o, "DISK-ANYONE="), image, "{o}");
    assert!(o.contains("\nHOLDER-GONE\n"), "{o}");
    assert_eq!(output_value(o, "RECORDS-LEFT="), "[]", "{o}");
    assert!(o.contains("\nDONE"), "{o}");
    assert!(
        cluster.keys(&kind_prefix("reservations")).is_empty(),
        "a reservation is left after release"
    );
    // The guest's last import ended with the guest; the server frees the
    // disk when it sees that connection end.
    assert_eq!(
        import_once_free(&gw, server_addr, || None, BUSID),
        Ok(BUSID.to_string()),
        "import after the release\n{}",
        logs()
    );

    println!(
        "guest: {said}\n  Debian's C usbip attach: exit {}, {}\n  our plain usbip attach: exit {}, {}",
        output_value(o, "C-ATTACH-RC="),
        output_value(o, "C-ATTACH-OUT=").trim(),
        output_value(o, "RS-ATTACH-RC="),
        output_value(o, "RS-ATTACH-OUT=").trim()
    );
    println!(
        "reserved, refused, attached by its holder, released and attached by anyone: \
         {:.1}s from the reservation to the guest's end; test took {:.1}s (guest {:.1}s)",
        held_for.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        out.duration.as_secs_f64()
    );
}
