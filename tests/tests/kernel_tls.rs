//! `usbip attach --tls` in the Debian guest: the kernel's vhci-hcd speaks
//! USB/IP through kernel TLS to our usbipd on the host (TLS 1.3, mutual,
//! the server pinned by fingerprint since the guest reaches it as
//! 10.0.2.100 through a guestfwd). The disk and the keyboard work through
//! it; a capture of the port on the host's loopback holds TLS records only;
//! and a guest without the tls module, or without the cipher's, refuses
//! with a message naming the module and holds nothing.

use std::io::Write;
use std::time::{Duration, Instant};

use usbwire_tests::capture::{self, Capture};
use usbwire_tests::daemon::Usbipd;
use usbwire_tests::image::{debugfs_cat, e2fsck_clean, empty_ext4, input_events};
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::support::{output_value, sha256_hex};
use usbwire_tests::tls::self_signed;

const SIGNAL_TYPED: u16 = 5555;
const SIGNAL_CAPTURE_SWAPPED: u16 = 5556;

/// What the guest writes to the disk, `yes`-style: a line no encrypted
/// stream would hold by chance.
const PATTERN_LINE: &str = "USBWIRE-KTLS-PATTERN-0123456789";
const PATTERN_FILE_LEN: usize = 1 << 20;

fn pattern_file() -> Vec<u8> {
    format!("{PATTERN_LINE}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(PATTERN_FILE_LEN)
        .collect()
}

/// Key presses (EV_KEY, value 1) in the guest's hex dump of evdev events
/// (24-byte `struct input_event` on x86-64).
fn key_presses(output: &str) -> Vec<u16> {
    input_events(output)
        .into_iter()
        .filter(|&(kind, _, value)| kind == 1 && value == 1)
        .map(|(_, code, _)| code)
        .collect()
}

#[test]
fn attach_over_kernel_tls_disk_keyboard_capture_and_missing_modules() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let (tcpdump, tshark) = match capture::tools() {
        Ok(t) => t,
        Err(e) if kernel::on_ci() => panic!("{e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    empty_ext4(&image, 32);
    let fifo = dir.path().join("keyboard");
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\n\n[[device]]\nkind = \"keyboard\"\nfifo = \"{}\"\n",
            image.display(),
            fifo.display()
        ),
    )
    .unwrap();
    // The server names the address the guest connects to; the guest pins
    // it by fingerprint anyway, and the server pins the guest's.
    let server = self_signed(&GUESTFWD_ADDR.to_string());
    let (server_cert, server_key) = server.write(dir.path(), "server");
    let client = self_signed("usbwire-guest");
    let client_fingerprint = client.fingerprint().to_string();
    let mut daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
            "--tls-client-fingerprint",
            &client_fingerprint,
            // The guest's connections arrive from the guestfwd's socat on
            // 127.0.0.1: the one plaintext attach at the end, which shows
            // that the capture check sees plaintext, comes in this way.
            "--allow-plaintext",
            "127.0.0.1/32",
        ],
        dir.path(),
    );
    let port = daemon.port;
    let tls_capture = Capture::start(&tcpdump, &dir.path().join("tls.pcap"), port);

    let tls_opts = format!(
        "--tls-cert /usbwire/client.crt --tls-key /usbwire/client.key --tls-fingerprint {}",
        server.fingerprint()
    );
    let script = format!(
        r#"set -e
modprobe vhci-hcd
server={server}
TLSOPTS="{tls_opts}"
used_ports() {{ cat /sys/devices/platform/vhci_hcd.0/status* | awk '($1 == "hs" || $1 == "ss") && $3 != "004" {{ print $2 + 0 }}'; }}
port_of() {{ usbip-rs port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }}
detach_all() {{ for p in $(usbip-rs port | sed -n 's/^Port \([0-9]*\):.*/\1/p'); do usbip-rs detach -p "$p"; done; }}
disk() {{ for i in $(seq 1 300); do for d in /dev/sd?; do [ -b "$d" ] && {{ echo "$d"; return 0; }}; done; sleep 0.1; done; return 1; }}
exported() {{ usbwire_wait_cmd 60 sh -c "usbip-rs list -r $server $TLSOPTS | grep -q ' $1: '"; }}

echo "== attach --tls without the tls module"
if grep -q '^tls ' /proc/modules; then rmmod tls; fi
ko=$(find /lib/modules -name 'tls.ko*' | head -n 1)
[ -n "$ko" ]
mv "$ko" /tmp/tls.ko.away
rc=0
usbip-rs attach -r $server -b 1-1 --tls $TLSOPTS > /tmp/notls 2>&1 || rc=$?
echo "NOTLS-RC=$rc"
echo "NOTLS-MSG=$(head -n 1 /tmp/notls)"
echo "NOTLS-USED=$(used_ports | wc -l)"
grep -q '^tls ' /proc/modules && echo "TLS-LOADED-ANYWAY"
mv /tmp/tls.ko.away "$ko"
exported 1-1
echo NOTLS-STILL-EXPORTED

echo "== attach --tls without the gcm module: refused after the import"
modprobe tls
if grep -q '^gcm ' /proc/modules; then rmmod gcm; fi
gko=$(find /lib/modules -name 'gcm.ko*' | head -n 1)
[ -n "$gko" ]
mv "$gko" /tmp/gcm.ko.away
rc=0
usbip-rs attach -r $server -b 1-1 --tls $TLSOPTS > /tmp/nogcm 2>&1 || rc=$?
echo "NOGCM-RC=$rc"
echo "NOGCM-MSG=$(head -n 1 /tmp/nogcm)"
echo "NOGCM-USED=$(used_ports | wc -l)"
mv /tmp/gcm.ko.away "$gko"
# The server saw the connection end and released the device.
exported 1-1
echo NOGCM-STILL-EXPORTED

echo "== disk over kernel TLS"
for m in gf128mul ghash-generic ctr gcm; do modprobe $m; done
usbip-rs -d attach -r $server -b 1-1 --tls $TLSOPTS 2> /tmp/attach.log
echo "CIPHER=$(grep -o 'cipher=[A-Za-z0-9]*' /tmp/attach.log | cut -d= -f2)"
# The kernel's count of sockets whose TLS it does in software, each way.
echo "KTLS-TX=$(awk '$1 == "TlsCurrTxSw" {{ print $2 }}' /proc/net/tls_stat)"
echo "KTLS-RX=$(awk '$1 == "TlsCurrRxSw" {{ print $2 }}' /proc/net/tls_stat)"
dev=$(disk)
mkdir -p /mnt/disk
mount -t ext4 "$dev" /mnt/disk
yes {pattern} | head -c {len} > /mnt/disk/pattern.txt
echo "PATSUM=$(sha256sum /mnt/disk/pattern.txt | cut -d' ' -f1)"
sync
umount /mnt/disk
echo "PORT-BEGIN"; usbip-rs port; echo "PORT-END"
usbip-rs detach -p "$(port_of)"
usbwire_wait_cmd 30 sh -c '[ -z "$(used_ports)" ]'
exported 1-1
usbip-rs attach -r $server -b 1-1 --tls $TLSOPTS
dev=$(disk)
mount -t ext4 -o ro "$dev" /mnt/disk
echo "READBACK=$(sha256sum /mnt/disk/pattern.txt | cut -d' ' -f1)"
umount /mnt/disk
detach_all
usbwire_wait_cmd 30 sh -c '[ -z "$(used_ports)" ]'

echo "== keyboard over kernel TLS"
usbip-rs attach -r $server -b 1-2 --tls $TLSOPTS
ev=""
for i in $(seq 1 300); do
  for n in /sys/class/input/event*; do
    if grep -q "usbwire" "$n/device/name" 2>/dev/null; then ev=$(basename "$n"); fi
  done
  [ -n "$ev" ] && [ -c "/dev/input/$ev" ] && break
  sleep 0.1
done
echo "EVDEV=$ev"
cat "/dev/input/$ev" > /tmp/events &
catpid=$!
# Keys typed before cat holds the device would go to the console only.
usbwire_wait_cmd 20 sh -c "ls -l /proc/$catpid/fd | grep -q /dev/input/$ev"
echo KBD-READY
usbwire_wait_signal {typed} 120
# The last event typed is the release of Enter (EV_KEY, KEY_ENTER, 0).
usbwire_wait_cmd 60 sh -c 'od -An -tx1 -v -w24 /tmp/events | grep -q " 01 00 1c 00 00 00 00 00$"' || echo "no release of Enter seen"
kill $catpid || true
echo EV-BEGIN
od -An -tx1 -v /tmp/events
echo EV-END
detach_all
usbwire_wait_cmd 30 sh -c '[ -z "$(used_ports)" ]'
echo TLS-DONE

echo "== the same disk in plaintext, into a second capture"
usbwire_wait_signal {swapped} 120
exported 1-1
usbip-rs attach -r $server -b 1-1
dev=$(disk)
mount -t ext4 -o ro "$dev" /mnt/disk
echo "PLAINREAD=$(sha256sum /mnt/disk/pattern.txt | cut -d' ' -f1)"
umount /mnt/disk
detach_all
dmesg | grep -iE 'vhci|usb-storage|tls' | tail -n 20
"#,
        server = GUESTFWD_ADDR,
        pattern = PATTERN_LINE,
        len = PATTERN_FILE_LEN,
        typed = SIGNAL_TYPED,
        swapped = SIGNAL_CAPTURE_SWAPPED,
    );

    let g = guest
        .script(&script)
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .file("/usbwire/client.crt", client.cert.as_bytes(), 0o644)
        .file("/usbwire/client.key", client.key.as_bytes(), 0o600)
        .guestfwd(port)
        .hostfwd(SIGNAL_TYPED)
        .hostfwd(SIGNAL_CAPTURE_SWAPPED)
        .timeout(Duration::from_secs(600))
        .spawn()
        .expect("boot the guest");
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        panic!("{what}: {e}\n--- usbipd log ---\n{}", daemon.log_text())
    };
    g.wait_for_output("KBD-READY", Duration::from_secs(480))
        .unwrap_or_else(|e| fail("waiting for the keyboard", &e));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the keyboard FIFO");
        f.write_all(b"hello\n").unwrap();
    }
    g.signal(SIGNAL_TYPED, "typed", Duration::from_secs(30))
        .unwrap_or_else(|e| fail("signalling the guest", &e));
    g.wait_for_output("TLS-DONE", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("waiting for the end of the TLS part", &e));
    let tls_pcap = tls_capture.stop();
    let plain_capture = Capture::start(&tcpdump, &dir.path().join("plain.pcap"), port);
    g.signal(SIGNAL_CAPTURE_SWAPPED, "swapped", Duration::from_secs(30))
        .unwrap_or_else(|e| fail("signalling the guest", &e));
    let out = g.wait().expect("guest run");
    let plain_pcap = plain_capture.stop();
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    let o = &out.output;

    // Without tls.ko: refused with the message, nothing attached, and
    // nothing held on the server (the device was listed again at once).
    assert_ne!(output_value(o, "NOTLS-RC="), "0", "{o}");
    assert!(
        output_value(o, "NOTLS-MSG=")
            .starts_with("usbip: error: kernel TLS is not available: modprobe tls"),
        "{o}"
    );
    assert_eq!(output_value(o, "NOTLS-USED="), "0", "{o}");
    assert!(!o.contains("TLS-LOADED-ANYWAY"), "{o}");
    assert!(o.contains("NOTLS-STILL-EXPORTED"), "{o}");

    // Without the cipher's module the keys are refused after the import:
    // the message names the module, no port is used, and the server let
    // the device go.
    assert_ne!(output_value(o, "NOGCM-RC="), "0", "{o}");
    let nogcm = output_value(o, "NOGCM-MSG=");
    assert!(
        nogcm.starts_with("usbip: error: kernel TLS has no ") && nogcm.contains("modprobe gcm"),
        "{o}"
    );
    assert_eq!(output_value(o, "NOGCM-USED="), "0", "{o}");
    assert!(o.contains("NOGCM-STILL-EXPORTED"), "{o}");

    // The kernel carries the session: one socket with kernel TLS each way,
    // with a cipher of the AES-GCM family the guest has modules for.
    assert_eq!(output_value(o, "KTLS-TX="), "1", "{o}");
    assert_eq!(output_value(o, "KTLS-RX="), "1", "{o}");
    let cipher = output_value(o, "CIPHER=");
    assert!(cipher == "Aes128Gcm" || cipher == "Aes256Gcm", "{o}");

    // `usbip port` shows where the TLS-attached disk came from.
    let ports = &o[o.find("PORT-BEGIN").unwrap()..o.find("PORT-END").unwrap()];
    assert!(
        // The guest's side of the guestfwd: 10.0.2.100:3240.
        ports.contains(&format!("usbip://{GUESTFWD_ADDR}:3240/1-1")),
        "{ports}"
    );

    // The file the guest wrote over kernel TLS is intact in the image, and
    // read back the same over kernel TLS and (later) in plaintext.
    assert!(daemon.stop(), "usbipd did not exit cleanly");
    let expected = pattern_file();
    let sum = sha256_hex(&expected);
    assert_eq!(output_value(o, "PATSUM="), sum, "{o}");
    assert_eq!(output_value(o, "READBACK="), sum, "{o}");
    assert_eq!(output_value(o, "PLAINREAD="), sum, "{o}");
    let on_host = debugfs_cat(&image, "/pattern.txt");
    assert!(
        on_host == expected,
        "pattern.txt in the image differs from what the guest wrote ({} bytes)",
        on_host.len()
    );
    e2fsck_clean(&image);

    // "hello\n" typed on the host arrives as key presses.
    const KEYS: [u16; 6] = [35, 18, 38, 38, 24, 28]; // h e l l o Enter
    assert_eq!(
        key_presses(o),
        KEYS,
        "{}",
        &o[o.find("== keyboard").unwrap_or(0)..]
    );

    // The TLS capture: TLS records only, and at least the file's worth of
    // application data; the plaintext one fails every check, which shows
    // that the checks see plaintext.
    let pattern = PATTERN_LINE.as_bytes();
    let tls = capture::check_tls_only(&tshark, &tls_pcap, port, pattern)
        .unwrap_or_else(|f| panic!("the TLS capture is not TLS only:\n{}", f.join("\n")));
    assert!(
        tls.application_bytes > PATTERN_FILE_LEN,
        "less TLS application data than the file written: {tls:?}"
    );
    let plain = capture::check_tls_only(&tshark, &plain_pcap, port, pattern)
        .expect_err("the plaintext capture passed the TLS-only check");
    for finding in [
        "in clear",
        "as USB/IP",
        "starts with the USB/IP version",
        "is not TLS records",
    ] {
        assert!(
            plain.iter().any(|f| f.contains(finding)),
            "the plaintext capture was not caught by the {finding:?} check: {plain:?}"
        );
    }
    println!(
        "kernel TLS test took {:.1}s (guest {:.1}s); cipher {cipher}; TLS capture {tls:?}; \
         plaintext capture: {plain:?}\nwithout tls.ko: {}\nwithout gcm.ko: {nogcm}",
        t0.elapsed().as_secs_f64(),
        out.duration.as_secs_f64(),
        output_value(o, "NOTLS-MSG="),
    );
}
