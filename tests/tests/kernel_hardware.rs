//! qemu-emulated USB hardware on a real host controller (qemu-xhci driven by
//! the guest's `xhci_hcd`), exported through usbfs by OUR `usbipd` in the
//! guest and imported by the guest's own vhci-hcd (Debian's C `usbip attach`)
//! over 127.0.0.1:
//!
//! * SuperSpeed: qemu's `usb-storage` (Bulk-Only, SuperSpeed descriptors)
//!   lands on vhci's SuperSpeed root hub at 5000M and its disk reads back
//!   and takes a write; qemu's `usb-uas` (UAS only: its one interface has no
//!   Bulk-Only alternate setting) is offered to the `uas` driver, which turns
//!   it down because vhci cannot do streams; nothing else may claim it and
//!   nothing may break.
//! * HID and serial: `usb-kbd` keys typed over QMP arrive in the vhci-side
//!   `/dev/input/event*` in order; bytes written into `usb-serial`'s chardev
//!   arrive through the vhci-side `ttyUSB` in order, and bytes the guest
//!   writes come out of the chardev.
//!
//! One guest boot checks all of it (CI time).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use usbwire_tests::image::input_events;
use usbwire_tests::kernel::{self, UsbDevice};
use usbwire_tests::support::{output_value, sha256_hex};

/// Deterministic, position-dependent bytes: a misplaced or repeated block
/// changes the checksum.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Where the guest writes through the imported SuperSpeed disk (sector 100).
const MARK_OFFSET: usize = 100 * 512;
const MARK: &[u8] = b"USBWIRE-SUPERSPEED-WRITE";

/// Keys typed on the emulated keyboard (12 HID events: within qemu's queue
/// of 16 even if the guest read none of them yet) and their evdev codes.
const KEYS: &[&str] = &["u", "s", "b", "1", "2", "ret"];
const KEY_CODES: &[u16] = &[22, 31, 48, 2, 3, 28];

const SERIAL_LEN: usize = 4096;
const GUEST_TO_HOST: &[u8] = b"usbwire serial: guest to host 0123456789\n";

const SCRIPT: &str = r#"set -e
modprobe vhci-hcd
daemon_log() { echo "--- usbipd log"; cat /tmp/usbipd.log; echo "--- end log"; }
trap daemon_log EXIT
usbipd-rs --state-file /var/lib/usbwire/bindings.json --hotplug-interval-ms 200 >>/tmp/usbipd.log 2>&1 &
usbwire_wait_path /run/usbwire/usbipd.sock 30
usbwire_wait_listen 3240 30

# vhci_dev VID:PID: the sysfs dir of the imported device with those ids.
vhci_dev() {
	for i in $(seq 1 300); do
		for d in /sys/devices/platform/vhci_hcd.0/usb*/*-*; do
			[ -f "$d/idVendor" ] || continue
			[ "$(cat $d/idVendor):$(cat $d/idProduct)" = "$1" ] && [ -n "$(cat $d/bConfigurationValue)" ] && { echo "$d"; return 0; }
		done
		sleep 0.1
	done
	echo "no imported $1" >&2; return 1
}
# holds PID FILE: PID has FILE open.
holds() { ls -l /proc/$1/fd 2>/dev/null | grep -q "$2"; }

echo "== local devices"
usbwire_xhci_devices
bot=$(usbwire_xhci_busid 46f4:0001)
uas=$(usbwire_xhci_busid 46f4:0003)
kbd=$(usbwire_xhci_busid 0627:0001)
ser=$(usbwire_xhci_busid 0403:6001)
echo "LOCAL-BOT-SPEED=$(cat /sys/bus/usb/devices/$bot/speed)"
echo "LOCAL-UAS-SPEED=$(cat /sys/bus/usb/devices/$uas/speed)"
echo "LOCAL-UAS-DRIVER=$(basename $(readlink /sys/bus/usb/devices/$uas:1.0/driver))"
# local_probes: how often the xHCI-side class drivers took the devices
# (in the kernel log from stdin).
local_probes() {
	grep -cE "usb-storage $bot:1.0: USB Mass Storage device detected|scsi host[0-9]+: uas|input: QEMU QEMU USB Keyboard as /devices/pci|ftdi_sio $ser:1.0: FTDI USB Serial Device converter detected"
}
local_drivers() {
	for b in $bot $uas $kbd $ser; do echo -n "$(basename $(readlink /sys/bus/usb/devices/$b:1.0/driver)) "; done
}
echo "LOCAL-PROBES-BEFORE=$(dmesg | local_probes)"
for b in $bot $uas $kbd $ser; do usbip-rs bind -b "$b"; done
usbip list -r 127.0.0.1

echo "== SuperSpeed Bulk-Only disk"
usbip attach -r 127.0.0.1 -b "$bot"
dev=$(vhci_dev 46f4:0001)
echo "VHCI-BOT-SPEED=$(cat $dev/speed)"
echo "VHCI-BOT-HUB-SPEED=$(cat $(dirname $dev)/speed)"
echo "VHCI-BOT-DRIVER=$(basename $(readlink $dev/$(basename $dev):1.0/driver))"
usbip port
sd=
for i in $(seq 1 300); do
	for b in /sys/block/sd*; do
		readlink -f "$b" | grep -q "$dev/" && sd=$(basename "$b")
	done
	[ -n "$sd" ] && [ "$(cat /sys/block/$sd/size 2>/dev/null || echo 0)" != 0 ] && break
	sleep 0.1
done
echo "VHCI-DISK=$sd"
echo "IMPORTED-SUM=$(dd if=/dev/$sd bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)"
printf "$MARK" | dd of=/dev/$sd bs=512 seek=100 conv=notrunc,fsync 2>/dev/null
sync
echo "== UAS-only device on vhci (no streams)"
usbip attach -r 127.0.0.1 -b "$uas"
udev=$(vhci_dev 46f4:0003)
echo "VHCI-UAS-SPEED=$(cat $udev/speed)"
usbwire_wait_cmd 60 sh -c "dmesg | grep -qE 'does not support (streams|scatter-gather)'"
dmesg | grep -E 'uas|streams|scatter' | tail -n 5
if [ -e $udev/$(basename $udev):1.0/driver ]; then
	echo "VHCI-UAS-DRIVER=$(basename $(readlink $udev/$(basename $udev):1.0/driver))"
else
	echo "VHCI-UAS-DRIVER=none"
fi
echo "VHCI-UAS-ERRORS=$(dmesg | grep " $(basename $udev)[: ]" | grep -ciE 'error|fail|timeout|reset' || true)"

echo "== keyboard"
usbip attach -r 127.0.0.1 -b "$kbd"
kdev=$(vhci_dev 0627:0001)
ev=
for i in $(seq 1 300); do
	for e in /sys/class/input/event*; do
		readlink -f "$e" | grep -q "$kdev/" && ev=$(basename "$e")
	done
	[ -n "$ev" ] && [ -c /dev/input/$ev ] && break
	sleep 0.1
done
echo "EVDEV=$ev"
cat /dev/input/$ev > /tmp/events &
catpid=$!
usbwire_wait_cmd 20 holds $catpid /dev/input/$ev
echo KBD-READY
# The last typed event is the release of Enter (EV_KEY, KEY_ENTER, 0).
usbwire_wait_cmd 60 sh -c 'od -An -tx1 -v -w24 /tmp/events | grep -q " 01 00 1c 00 00 00 00 00$"' || echo "no release of Enter seen"
echo KBD-MORE
# then one key as raw input events: the release of A (KEY_A = 30)
usbwire_wait_cmd 60 sh -c 'od -An -tx1 -v -w24 /tmp/events | grep -q " 01 00 1e 00 00 00 00 00$"' || echo "no release of A seen"
kill $catpid
echo EV-BEGIN
od -An -tx1 -v /tmp/events
echo EV-END

echo "== serial"
usbip attach -r 127.0.0.1 -b "$ser"
sdev=$(vhci_dev 0403:6001)
usbwire_wait_cmd 30 sh -c "ls $sdev/*:1.0/ | grep -q ttyUSB"
tty=$(ls $sdev/*:1.0/ | grep ttyUSB)
echo "TTY=$tty"
# raw, no echo, set on the descriptor cat reads from, so nothing is translated
(stty raw -echo 115200 && exec cat) < /dev/$tty > /tmp/serial &
serpid=$!
usbwire_wait_cmd 20 holds $serpid /dev/$tty
echo SER-READY
usbwire_wait_cmd 60 sh -c "[ \$(stat -c %s /tmp/serial) -ge $SERIAL_LEN ]" || echo "serial data incomplete"
echo "SERIAL-SIZE=$(stat -c %s /tmp/serial)"
echo "SERIAL-SUM=$(sha256sum < /tmp/serial | cut -d' ' -f1)"
printf "$GUEST_TO_HOST" > /dev/$tty
echo SER-SENT
usbwire_wait_signal 5600 120 > /dev/null
kill $serpid

echo "== detach"
echo "usbwire: detaching all" > /dev/kmsg
for p in $(usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p'); do usbip detach -p "$p"; done
usbwire_wait_cmd 30 sh -c '! ls -d /sys/devices/platform/vhci_hcd.0/usb*/*-[1-9]* 2>/dev/null'
# Each import's end resets its device; the class drivers must not get it.
usbwire_wait_cmd 30 sh -c '[ $(grep -c "released conn=" /tmp/usbipd.log) -ge 4 ]'
echo "LOCAL-PROBES-AFTER-DETACH=$(dmesg | sed -n '/usbwire: detaching all/,$p' | local_probes || true)"
echo "LOCAL-DRIVERS-AFTER=$(local_drivers)"
echo "KERNEL-TRACES=$(dmesg | grep -cE 'BUG:|Oops|WARNING:|Call Trace' || true)"
echo DONE
"#;

#[test]
fn kernel_xhci_superspeed_disk_keyboard_and_serial_through_usbfs() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let bot_image = dir.path().join("bot.img");
    let disk = pattern(8 << 20, 1);
    std::fs::write(&bot_image, &disk).unwrap();
    let uas_image = dir.path().join("uas.img");
    std::fs::write(&uas_image, pattern(1 << 20, 2)).unwrap();
    let serial_data = pattern(SERIAL_LEN, 3);

    let guest_to_host = std::str::from_utf8(GUEST_TO_HOST)
        .unwrap()
        .replace('\n', "\\n");
    let g = guest
        .xhci([
            UsbDevice::storage(&bot_image),
            UsbDevice::uas(&uas_image),
            UsbDevice::keyboard(),
            UsbDevice::serial().id("serial"),
        ])
        .host_binary(&kernel::stripped_bin("usbipd"), "/usr/bin/usbipd-rs")
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .env("SERIAL_LEN", &SERIAL_LEN.to_string())
        .env("GUEST_TO_HOST", &guest_to_host)
        .hostfwd(5600)
        .memory_mib(1024)
        .timeout(Duration::from_secs(300))
        .env("MARK", std::str::from_utf8(MARK).unwrap())
        .script(SCRIPT)
        .spawn()
        .unwrap();

    g.wait_for_output("KBD-READY", Duration::from_secs(240))
        .unwrap();
    g.send_keys(KEYS).unwrap();
    // input-send-event bypasses send-key's queue of delayed releases: only
    // once the guest has seen the last of those does it keep the order.
    g.wait_for_output("KBD-MORE", Duration::from_secs(120))
        .unwrap();
    let key_a = |down: bool| serde_json::json!({"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": "a"}}});
    g.input_send_event(serde_json::json!([key_a(true), key_a(false)]))
        .unwrap();

    g.wait_for_output("SER-READY", Duration::from_secs(120))
        .unwrap();
    let mut serial = g.usb_stream("serial").unwrap();
    serial
        .set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    serial.write_all(&serial_data).unwrap();
    g.wait_for_output("SER-SENT", Duration::from_secs(120))
        .unwrap();
    serial
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut from_guest = vec![0u8; GUEST_TO_HOST.len()];
    let read = serial.read_exact(&mut from_guest);
    g.signal(5600, "read", Duration::from_secs(60)).unwrap();

    let out = g.wait().unwrap();
    let text = out.output.clone();
    println!("{text}");
    println!(
        "guest run took {:.1}s ({:.1}s from starting qemu to its exit)",
        t0.elapsed().as_secs_f64(),
        out.duration.as_secs_f64()
    );
    out.assert_success();
    assert!(text.contains("DONE"));
    assert_eq!(output_value(&text, "KERNEL-TRACES="), "0");

    // SuperSpeed end to end: a 5000M device on xHCI, a 5000M device on vhci's
    // SuperSpeed root hub, usb-storage bound, the data intact both ways.
    assert_eq!(output_value(&text, "LOCAL-BOT-SPEED="), "5000");
    assert_eq!(output_value(&text, "VHCI-BOT-SPEED="), "5000");
    assert_eq!(output_value(&text, "VHCI-BOT-HUB-SPEED="), "5000");
    assert_eq!(output_value(&text, "VHCI-BOT-DRIVER="), "usb-storage");
    assert_eq!(output_value(&text, "IMPORTED-SUM="), sha256_hex(&disk));
    let after = std::fs::read(&bot_image).unwrap();
    assert_eq!(&after[MARK_OFFSET..MARK_OFFSET + MARK.len()], MARK);
    assert_eq!(
        after[MARK_OFFSET + MARK.len()..],
        disk[MARK_OFFSET + MARK.len()..]
    );
    assert_eq!(after[..MARK_OFFSET], disk[..MARK_OFFSET]);

    // UAS: the xHCI-side uas driver takes it (xhci has streams); through
    // vhci it is turned down, and nothing else claims a UAS-only interface.
    assert_eq!(output_value(&text, "LOCAL-UAS-SPEED="), "5000");
    assert_eq!(output_value(&text, "LOCAL-UAS-DRIVER="), "uas");
    assert_eq!(output_value(&text, "VHCI-UAS-SPEED="), "5000");
    assert_eq!(output_value(&text, "VHCI-UAS-DRIVER="), "none");
    assert_eq!(output_value(&text, "VHCI-UAS-ERRORS="), "0");

    // Our usbipd saw nothing go wrong: no warning but the one for running
    // without TLS, no error.
    let log = &text[text.find("--- usbipd log").expect("usbipd log")..];
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("no TLS configured"))
        .collect();
    assert!(complaints.is_empty(), "usbipd complained: {complaints:#?}");

    // The end of each import resets the device (as the kernel's stub does);
    // the xHCI-side class drivers did not take any of them back meanwhile.
    assert_eq!(output_value(&text, "LOCAL-PROBES-BEFORE="), "4");
    assert_eq!(output_value(&text, "LOCAL-PROBES-AFTER-DETACH="), "0");
    assert_eq!(
        output_value(&text, "LOCAL-DRIVERS-AFTER="),
        "usbfs usbfs usbfs usbfs"
    );

    // Keys in order: each a press then a release, nothing else but SYN.
    let keys: Vec<(u16, i32)> = input_events(&text)
        .into_iter()
        .filter(|(ty, _, _)| *ty == 1)
        .map(|(_, code, value)| (code, value))
        .collect();
    let want: Vec<(u16, i32)> = KEY_CODES
        .iter()
        .chain(&[30])
        .flat_map(|&c| [(c, 1), (c, 0)])
        .collect();
    assert_eq!(keys, want);

    // Serial bytes in order, both ways.
    assert_eq!(output_value(&text, "SERIAL-SIZE="), SERIAL_LEN.to_string());
    assert_eq!(output_value(&text, "SERIAL-SUM="), sha256_hex(&serial_data));
    read.unwrap();
    assert_eq!(from_guest, GUEST_TO_HOST);
}
