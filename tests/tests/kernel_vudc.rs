//! `usbipd --device` (`-e`) in the Debian guest: a configfs mass-storage
//! gadget bound to the kernel's `usbip-vudc.0`, exported by our usbipd
//! (the kernel serves its URBs once the import's socket is handed over),
//! imported over 127.0.0.1 by the guest's own vhci-hcd through Debian's C
//! `usbip attach`, then through ours, then over TLS with kernel TLS on
//! both sockets. One boot for all of it:
//!
//! 1. our `-e` (plaintext, and a second one with TLS) with no gadget bound
//!    lists nothing; a gadget bound later is listed at the next request,
//!    and C `usbip list -r` prints it exactly as it prints the list of the
//!    C `usbipd -e`;
//! 2. C `usbip attach -d usbip-vudc.0`: the vhci disk reads back the
//!    backing file's exact bytes while vudc's `usbip_status` says used;
//!    after detach the vudc is available and listed again;
//! 3. the same through our `usbip attach`;
//! 4. our `usbip attach --tls` to the TLS usbipd (kernel TLS required):
//!    the data reads back and /proc/net/tls_stat counts the kernel's TLS
//!    sockets at both ends, with no decryption error; that usbipd stopped
//!    while the kernel serves the import does not hang: the connection
//!    ends, vhci drops the disk and vudc is available again;
//! 5. the gadget unbound: no longer listed.

use std::time::{Duration, Instant};

use usbwire_tests::kernel;
use usbwire_tests::support::{output_value, sha256_hex};
use usbwire_tests::tls::Ca;

/// The backing file's size: large enough that the disk is read through
/// many bulk transfers, small enough for TCG.
const DISK_BYTES: usize = 1 << 20;
const PLAIN_PORT: u16 = 3240;
const TLS_PORT: u16 = 3241;
/// The C usbipd -e, for its list.
const C_PORT: u16 = 3242;

/// Bytes nobody would mistake for a pattern the path could make up
/// (xorshift).
fn disk_contents() -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..DISK_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The value of `name` in /proc/net/tls_stat's text.
fn tls_stat(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/net/tls_stat:\n{text}"))
}

/// The text a script printed between `{name}-BEGIN` and `{name}-END`.
fn section<'a>(output: &'a str, name: &str) -> &'a str {
    let begin = format!("{name}-BEGIN\n");
    let start = output
        .find(&begin)
        .unwrap_or_else(|| panic!("no {name} section:\n{output}"))
        + begin.len();
    let end = output[start..]
        .find(&format!("{name}-END"))
        .unwrap_or_else(|| panic!("{name} section not closed:\n{output}"));
    &output[start..start + end]
}

#[test]
fn usbipd_device_mode_exports_a_vudc_gadget_to_c_and_our_attach_plain_and_tls() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let usbipd = kernel::stripped_bin("usbipd");
    let usbip = kernel::stripped_bin("usbip");
    let disk = disk_contents();
    let want = sha256_hex(&disk);
    let ca = Ca::new("usbwire test CA");
    let server = ca.issue(&["usbwire-guest"]);
    let client = ca.issue(&["usbwire-client"]);
    let tls_config = format!(
        "[server]\ntcp_port = {TLS_PORT}\ndevice_mode = true\n\n\
         [tls]\ncert = \"/etc/usbwire/server.crt\"\nkey = \"/etc/usbwire/server.key\"\n\
         client_ca = \"/etc/usbwire/ca.crt\"\nkernel = \"on\"\n"
    );
    let gadget = kernel::gadget_mass_storage_sh("ms", "usbip-vudc.0", "/tmp/disk.img");
    let server_fingerprint = server.fingerprint();
    let script = format!(
        r#"set -e
V=/sys/devices/platform/usbip-vudc.0
G=/sys/kernel/config/usb_gadget/ms
modprobe usbip-vudc
modprobe vhci-hcd
modprobe usb-storage
for m in tls gf128mul ghash-generic ctr gcm; do modprobe $m; done
disk() {{ usbwire_wait_cmd 60 sh -c 'ls /dev/sd? >/dev/null 2>&1' && ls /dev/sd? | head -n 1; }}
no_disk() {{ usbwire_wait_cmd 60 sh -c '! ls /dev/sd? >/dev/null 2>&1'; }}
status_is() {{ usbwire_wait_cmd 60 sh -c "[ \"\$(cat $V/usbip_status)\" = $1 ]"; }}
# Our client's parsable list: the C one reads usb.ids for names, seconds under TCG.
listed() {{ usbip-rs list -r 127.0.0.1 -p >/tmp/parsable 2>&1; grep -q '^busid=usbip-vudc.0#' /tmp/parsable; }}
port_of() {{ usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }}
# SIGTERM, then the daemon's exit (which must not hang on the vudc).
stop() {{ kill $1; wait $1 || true; }}
trap 'echo USBIPD-LOG-BEGIN; cat /tmp/usbipd.log; echo USBIPD-LOG-END; echo TLS-LOG-BEGIN; cat /tmp/tls.log; echo TLS-LOG-END' EXIT
mark() {{ echo "MARK $1 $(cut -d' ' -f1 /proc/uptime)"; }}
echo "FILE=$(sha256sum /tmp/disk.img | cut -d' ' -f1)"
mark start

echo "== our usbipd -e, plaintext and TLS; no gadget bound yet"
usbipd-rs -e --no-control >/tmp/usbipd.log 2>&1 &
OURS=$!
usbipd-rs --no-control --config /etc/usbwire/tls.toml >/tmp/tls.log 2>&1 &
TLS=$!
usbwire_wait_listen {PLAIN_PORT} 60
usbwire_wait_listen {TLS_PORT} 60
if listed; then echo "LISTED-UNBOUND"; exit 10; fi
{gadget}
status_is 1
usbip list -r 127.0.0.1 > /tmp/ours.list
listed
echo "PARSABLE=$(cat /tmp/parsable)"
mark bound

echo "== the C usbipd -e's list, to compare"
usbipd -e -t {C_PORT} >/tmp/c-usbipd.log 2>&1 &
C=$!
usbwire_wait_listen {C_PORT} 60
usbip -t {C_PORT} list -r 127.0.0.1 > /tmp/c.list
stop $C
echo C-LIST-BEGIN; cat /tmp/c.list; echo C-LIST-END
echo OUR-LIST-BEGIN; cat /tmp/ours.list; echo OUR-LIST-END
cmp /tmp/c.list /tmp/ours.list
mark listed

echo "== C usbip attach"
usbip attach -r 127.0.0.1 -d usbip-vudc.0
dev=$(disk)
echo "C-STATUS=$(cat $V/usbip_status)"
echo "C-READ=$(dd if=$dev bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)"
usbip detach -p "$(port_of)"
no_disk
status_is 1
usbwire_wait_cmd 60 listed
mark c-attach

echo "== our usbip attach"
usbip-rs attach -r 127.0.0.1 -d usbip-vudc.0
dev=$(disk)
echo "RS-STATUS=$(cat $V/usbip_status)"
echo "RS-READ=$(dd if=$dev bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)"
usbip-rs detach -p "$(port_of)"
no_disk
status_is 1
usbwire_wait_cmd 60 listed
mark rs-attach

echo "== our usbip attach --tls"
TLSOPTS="--tls-cert /etc/usbwire/client.crt --tls-key /etc/usbwire/client.key --tls-fingerprint {server_fingerprint}"
echo TLS-BEFORE-BEGIN; cat /proc/net/tls_stat; echo TLS-BEFORE-END
usbip-rs -t {TLS_PORT} attach -r 127.0.0.1 -d usbip-vudc.0 --tls $TLSOPTS
dev=$(disk)
echo "TLS-STATUS=$(cat $V/usbip_status)"
echo "TLS-READ=$(dd if=$dev bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo TLS-ATTACHED-BEGIN; cat /proc/net/tls_stat; echo TLS-ATTACHED-END
echo "== usbipd stopped while the kernel serves the import"
stop $TLS
no_disk
status_is 1
usbwire_wait_cmd 60 sh -c '[ -z "$(port_of)" ]'
mark tls-attach

echo "== the gadget unbound: no longer listed"
echo "" > $G/UDC
mark unbound
if listed; then echo "LISTED-AFTER-UNBIND"; exit 11; fi
stop $OURS
mark stopped
echo DONE
"#
    );
    let t0 = Instant::now();
    let out = guest
        .script(&script)
        .file("/tmp/disk.img", &disk, 0o644)
        .file("/etc/usbwire/tls.toml", tls_config.as_bytes(), 0o644)
        .file("/etc/usbwire/server.crt", server.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/server.key", server.key.as_bytes(), 0o600)
        .file("/etc/usbwire/ca.crt", ca.pem().as_bytes(), 0o644)
        .file("/etc/usbwire/client.crt", client.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/client.key", client.key.as_bytes(), 0o600)
        .host_binary(&usbipd, "/usr/bin/usbipd-rs")
        .host_binary(&usbip, "/usr/bin/usbip-rs")
        .memory_mib(1024)
        .timeout(Duration::from_secs(600))
        .run()
        .expect("guest run");
    let text = out.output.clone();
    println!("{text}");
    println!("guest run took {:.1}s", t0.elapsed().as_secs_f64());
    out.assert_success();
    assert!(text.contains("DONE"), "{text}");

    assert_eq!(output_value(&text, "FILE="), want, "the backing file");
    let ours = section(&text, "OUR-LIST");
    assert!(ours.contains("usbip-vudc.0: "), "{ours}");
    assert_eq!(
        ours,
        section(&text, "C-LIST"),
        "C usbip list -r: ours vs C usbipd -e"
    );
    for who in ["C", "RS", "TLS"] {
        assert_eq!(
            output_value(&text, &format!("{who}-READ=")),
            want,
            "{who}: the vhci disk read the gadget's file"
        );
        assert_eq!(
            output_value(&text, &format!("{who}-STATUS=")),
            "2",
            "{who}: vudc's usbip_status while attached (SDEV_ST_USED)"
        );
    }
    assert!(
        section(&text, "TLS-LOG").contains("via=kernel TLS"),
        "the TLS import went to the kernel on kernel TLS:\n{text}"
    );
    // The record as the C daemon builds it: ids and class from the
    // gadget's device descriptor, high speed, no interfaces.
    assert_eq!(
        output_value(&text, "PARSABLE="),
        "busid=usbip-vudc.0#usbid=0525:a4a5#class=00/00/00#speed=3#interfaces=#"
    );
    let log = section(&text, "USBIPD-LOG");
    assert!(log.contains("exporting usbip-vudc.0"), "{log}");
    assert!(
        log.contains("usbip-vudc.0 no longer exported: no gadget is bound to it any more"),
        "{log}"
    );
    // Kernel TLS at both ends of the import: vudc's socket (usbipd's, handed
    // over) and vhci's (our attach's). Each has TX and RX in software kTLS.
    let before = section(&text, "TLS-BEFORE");
    let attached = section(&text, "TLS-ATTACHED");
    for stat in ["TlsTxSw", "TlsRxSw"] {
        assert!(
            tls_stat(attached, stat) >= tls_stat(before, stat) + 2,
            "{stat}: before\n{before}\nattached\n{attached}"
        );
    }
    assert!(tls_stat(attached, "TlsCurrTxSw") >= 2, "{attached}");
    assert!(tls_stat(attached, "TlsCurrRxSw") >= 2, "{attached}");
    assert_eq!(tls_stat(attached, "TlsDecryptError"), 0, "{attached}");
}
