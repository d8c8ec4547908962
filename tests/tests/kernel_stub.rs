//! The kernel's own stub (`usbip-host`) behind our `usbipd`, in the qemu
//! guest: a configfs mass-storage gadget on dummy_hcd is the "physical"
//! device, Debian's C `usbip bind` (and later ours, `--kernel`) binds it to
//! usbip-host, our usbipd exports it by handing each import's socket to
//! the stub, and the guest's vhci-hcd imports it over 127.0.0.1, first
//! with Debian's C `usbip attach` (plaintext), then with ours over TLS,
//! where both ends of the connection run kernel TLS.
//!
//! One guest boot checks it all, in order: the busy refusal of `bind
//! --kernel`, the C bind, the plaintext import and its data, the release
//! when vhci detaches, the TLS import and its data with /proc/net/tls_stat
//! moving, our unbind giving the device back to usb-storage, and our own
//! `bind --kernel` with a C attach through it.

use std::process::Command;
use std::time::{Duration, Instant};

use usbwire_tests::kernel::{self, DUMMY_UDC};
use usbwire_tests::support::output_value;
use usbwire_tests::tls::Ca;

fn run(c: &mut Command) -> String {
    let o = c.output().expect("run");
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A 4 MiB ext4 image with a known file.
fn make_image(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    let known: Vec<u8> = (0..150_000usize).map(|k| (k * 13 + 5) as u8).collect();
    std::fs::write(content.join("known.bin"), &known).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image));
    (std::fs::read(&image).unwrap(), known)
}

/// The value of `name` in a copy of /proc/net/tls_stat.
fn tls_stat(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/net/tls_stat:\n{text}"))
}

/// The text between `begin` and `end` markers in the guest output.
fn section<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    let start = text
        .find(begin)
        .unwrap_or_else(|| panic!("no {begin} in the output"))
        + begin.len();
    let len = text[start..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end} in the output"));
    &text[start..start + len]
}

#[test]
fn kernel_stub_devices_bound_by_the_c_tool_or_ours_are_served_plain_and_over_kernel_tls() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (image, known) = make_image(dir.path());
    let ca = Ca::new("usbwire test CA");
    let server = ca.issue(&["usbwire-guest"]);
    let client = ca.issue(&["usbwire-client"]);
    // TLS for remote clients; the C tool on 127.0.0.1 may use plaintext.
    let config = "[tls]\ncert = \"/etc/usbwire/server.crt\"\nkey = \"/etc/usbwire/server.key\"\n\
                  client_ca = \"/etc/usbwire/ca.crt\"\nkernel = \"on\"\n\
                  allow_plaintext = [\"127.0.0.0/8\"]\n";
    let script = format!(
        r#"set -e
for m in vhci-hcd usb-storage usbip-host dummy_hcd gf128mul ghash-generic ctr gcm tls; do modprobe $m; done
disk() {{ for i in $(seq 1 300); do for d in /dev/sd?; do [ -b "$d" ] && {{ echo "$d"; return 0; }}; done; sleep 0.1; done; return 1; }}
no_disk() {{ for i in $(seq 1 300); do ls /dev/sd? >/dev/null 2>&1 || return 0; sleep 0.1; done; return 1; }}
port_of() {{ usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }}
status() {{ cat /sys/bus/usb/devices/$busid/usbip_status; }}
driver() {{ basename "$(readlink /sys/bus/usb/devices/$1/driver)"; }}
listed() {{ usbip list -r 127.0.0.1 2>/dev/null | grep -q " $busid:"; }}
sum() {{ dd if=$1 bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1; }}
dump_log() {{ echo "--- usbipd log"; cat /tmp/usbipd.log; echo "--- end log"; }}
trap dump_log EXIT
TLSOPTS="--tls-cert /etc/usbwire/client.crt --tls-key /etc/usbwire/client.key --tls-fingerprint {fingerprint}"

{gadget}
busid=$(usbwire_udc_busid {udc})
echo "BUSID=$busid"
dev=$(disk)
mkdir -p /mnt/usb /mnt/imp
mount -t ext4 "$dev" /mnt/usb
usbipd-rs --config /etc/usbwire/usbipd.toml --state-file /var/lib/usbwire/bindings.json >>/tmp/usbipd.log 2>&1 &
DAEMON=$!
usbwire_wait_path /run/usbwire/usbipd.sock 60
usbwire_wait_listen 3240 60

echo "== bind --kernel while mounted"
if usbip-rs bind --kernel -b "$busid" 2>/tmp/bind.err; then echo "KERNEL-BIND-WHILE-MOUNTED"; exit 11; fi
echo "REFUSED: $(cat /tmp/bind.err)"
echo "DRIVER-AFTER-REFUSAL=$(driver $busid)"
umount /mnt/usb
sync
echo "REF-SUM=$(sum /tmp/disk.img)"

echo "== the C tool binds it to usbip-host"
usbip bind -b "$busid"
echo "DRIVER-AFTER-C-BIND=$(driver $busid)"
no_disk
usbwire_wait_cmd 60 listed
usbip list -r 127.0.0.1

echo "== the C tool attaches it"
usbip attach -r 127.0.0.1 -b "$busid"
dev=$(disk)
echo "PLAIN-SUM=$(sum $dev)"
echo "STATUS-WHILE-ATTACHED=$(status)"
listed && echo "LISTED-WHILE-ATTACHED"
if usbip attach -r 127.0.0.1 -b "$busid" 2>/tmp/second.err; then echo "ATTACHED-TWICE"; exit 12; fi
echo "SECOND-ATTACH: $(cat /tmp/second.err)"
usbip detach -p "$(port_of)"
no_disk
usbwire_wait_cmd 60 sh -c "[ \"\$(cat /sys/bus/usb/devices/$busid/usbip_status)\" = 1 ]"
usbwire_wait_cmd 60 listed
echo "STATUS-AFTER-DETACH=$(status)"

echo "== our attach over TLS, kernel TLS at both ends"
echo TLS-BEFORE-BEGIN
cat /proc/net/tls_stat
echo TLS-BEFORE-END
usbip-rs attach -r 127.0.0.1 -b "$busid" --tls $TLSOPTS
dev=$(disk)
echo "TLS-SUM=$(sum $dev)"
mount -t ext4 -o ro "$dev" /mnt/imp
echo "KNOWN-SUM=$(sha256sum /mnt/imp/known.bin | cut -d' ' -f1)"
umount /mnt/imp
echo TLS-DURING-BEGIN
cat /proc/net/tls_stat
echo TLS-DURING-END
usbip-rs detach -p "$(port_of)"
no_disk
usbwire_wait_cmd 60 listed

echo "== our unbind gives it back to its driver"
usbip-rs unbind -b "$busid"
dev=$(disk)
echo "DRIVER-AFTER-UNBIND=$(driver $busid:1.0)"
usbwire_wait_cmd 60 sh -c "! usbip list -r 127.0.0.1 2>/dev/null | grep -q ' $busid:'"
echo "UNLISTED-AFTER-UNBIND"

echo "== our bind --kernel"
mount -t ext4 -o ro "$dev" /mnt/usb
if usbip-rs bind --kernel -b "$busid" 2>/tmp/bind2.err; then echo "KERNEL-BIND-WHILE-MOUNTED-2"; exit 13; fi
umount /mnt/usb
usbip-rs bind --kernel -b "$busid"
echo "DRIVER-AFTER-OUR-BIND=$(driver $busid)"
no_disk
usbwire_wait_cmd 60 listed
usbip attach -r 127.0.0.1 -b "$busid"
dev=$(disk)
echo "OUR-BIND-SUM=$(sum $dev)"
usbip detach -p "$(port_of)"
no_disk
usbwire_wait_cmd 60 listed
usbip-rs unbind -b "$busid"
disk >/dev/null
kill $DAEMON
wait $DAEMON || true
echo DONE
"#,
        gadget = kernel::gadget_mass_storage_sh("ms", DUMMY_UDC, "/tmp/disk.img"),
        udc = DUMMY_UDC,
        fingerprint = server.fingerprint(),
    );
    let out = guest
        .file("/tmp/disk.img", &image, 0o644)
        .file("/etc/usbwire/usbipd.toml", config.as_bytes(), 0o644)
        .file("/etc/usbwire/server.crt", server.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/server.key", server.key.as_bytes(), 0o600)
        .file("/etc/usbwire/ca.crt", ca.pem().as_bytes(), 0o644)
        .file("/etc/usbwire/client.crt", client.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/client.key", client.key.as_bytes(), 0o600)
        .host_binary(&kernel::stripped_bin("usbipd"), "/usr/bin/usbipd-rs")
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .memory_mib(1024)
        .script(&script)
        .timeout(Duration::from_secs(600))
        .run()
        .expect("guest run");
    let text = out.output.clone();
    println!("{text}");
    println!("guest run took {:.1}s", t0.elapsed().as_secs_f64());
    out.assert_success();
    assert!(text.contains("DONE"));
    let line = |key: &str| output_value(&text, key).to_string();

    // Busy protection of bind --kernel, as for the usbfs bind.
    let refused = line("REFUSED: ");
    assert!(
        refused.contains("EBUSY") && refused.contains("mounted on /mnt/usb"),
        "{refused}"
    );
    assert_eq!(line("DRIVER-AFTER-REFUSAL="), "usb");

    // The C tool's binding is exported by ours, and the kernel's stub
    // serves the data.
    let reference = line("REF-SUM=");
    assert_eq!(line("DRIVER-AFTER-C-BIND="), "usbip-host");
    assert_eq!(line("PLAIN-SUM="), reference);
    assert_eq!(line("STATUS-WHILE-ATTACHED="), "2");
    assert!(
        !text.contains("LISTED-WHILE-ATTACHED"),
        "an imported device is left out of the device list"
    );
    assert!(!line("SECOND-ATTACH: ").is_empty());
    assert_eq!(line("STATUS-AFTER-DETACH="), "1");

    // Over TLS: the same bytes, with kernel TLS on the client's socket
    // (vhci) and on the server's (the stub) while the device was attached.
    assert_eq!(line("TLS-SUM="), reference);
    let known_sum = run(Command::new("sha256sum").arg(dir.path().join("content/known.bin")));
    assert_eq!(
        line("KNOWN-SUM="),
        known_sum.split_whitespace().next().unwrap()
    );
    assert_eq!(known.len(), 150_000);
    let before = section(&text, "TLS-BEFORE-BEGIN", "TLS-BEFORE-END");
    let during = section(&text, "TLS-DURING-BEGIN", "TLS-DURING-END");
    assert!(tls_stat(during, "TlsCurrTxSw") >= 2, "{during}");
    assert!(tls_stat(during, "TlsCurrRxSw") >= 2, "{during}");
    assert!(
        tls_stat(during, "TlsTxSw") >= tls_stat(before, "TlsTxSw") + 2,
        "{before}\n{during}"
    );
    assert!(
        tls_stat(during, "TlsRxSw") >= tls_stat(before, "TlsRxSw") + 2,
        "{before}\n{during}"
    );
    assert_eq!(tls_stat(during, "TlsDecryptError"), 0, "{during}");

    // Our unbind and bind --kernel.
    assert_eq!(line("DRIVER-AFTER-UNBIND="), "usb-storage");
    assert!(text.contains("UNLISTED-AFTER-UNBIND"));
    assert_eq!(line("DRIVER-AFTER-OUR-BIND="), "usbip-host");
    assert_eq!(line("OUR-BIND-SUM="), reference);

    // What our usbipd said it did.
    let log = section(&text, "--- usbipd log", "--- end log");
    assert!(
        log.contains("is bound to the kernel's usbip-host: exported"),
        "{log}"
    );
    assert!(
        log.contains("imported: the kernel's usbip-host runs the connection"),
        "{log}"
    );
    assert!(log.contains("via=kernel TLS"), "{log}");
    assert!(
        log.contains("the kernel's usbip-host ended the connection"),
        "{log}"
    );
    assert!(
        log.contains("bound") && log.contains("to the kernel's usbip-host and exported it"),
        "{log}"
    );
}
