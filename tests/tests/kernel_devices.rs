//! The real Linux kernel (Debian's, in qemu) attaches usbwire's emulated
//! devices with Debian's C `usbip` and uses them through its own drivers:
//! usb-storage + ext4, usbhid + evdev, cdc-acm. Our `usbipd` runs on the
//! host; the guest reaches it at 10.0.2.100:3240 through a guestfwd.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use usbwire_tests::daemon::Usbipd;
use usbwire_tests::image::{debugfs_cat, e2fsck_clean, input_events, run};
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::support::{output_value, sha256_hex};

const SIGNAL_PORT: u16 = 5555;
const SIGNAL_PORT_2: u16 = 5556;
const SIGNAL_PORT_3: u16 = 5557;

/// An ext4 image of `mib` MiB holding a few files with known contents and
/// a SHA256SUMS file listing them.
fn make_image(dir: &Path, mib: u64) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    let mut sums = String::new();
    for (i, size) in [1000usize, 65536, 300_000].iter().enumerate() {
        let name = format!("file{i}.bin");
        let data: Vec<u8> = (0..*size).map(|k| (k * 7 + i * 13) as u8).collect();
        std::fs::write(content.join(&name), &data).unwrap();
        let sum = run(Command::new("sha256sum").arg(content.join(&name)));
        sums.push_str(&format!(
            "{}  {name}\n",
            sum.split_whitespace().next().unwrap()
        ));
    }
    std::fs::write(content.join("SHA256SUMS"), sums).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(mib * 1024 * 1024)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image));
    image
}

const GUEST_PRELUDE: &str = r#"set -e
modprobe vhci-hcd
server=SERVER
attach() { usbip attach -r $server -b "$1"; }
port_of() { usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }
detach_all() { for p in $(usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p'); do usbip detach -p "$p"; done; }
disk() { for i in $(seq 1 300); do for d in /dev/sd?; do [ -b "$d" ] && { echo "$d"; return 0; }; done; sleep 0.1; done; return 1; }
"#;

#[test]
fn kernel_uses_our_disk_keyboard_and_serial_port() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), 64);
    let fifo = dir.path().join("keyboard");
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\n\n[[device]]\nkind = \"keyboard\"\nfifo = \"{}\"\n\n[[device]]\nkind = \"serial\"\nbackend = \"echo\"\n",
            image.display(),
            fifo.display()
        ),
    )
    .unwrap();
    let mut daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &["--config", config.to_str().unwrap()],
        dir.path(),
    );
    let port = daemon.port;

    let script = GUEST_PRELUDE.replace("SERVER", &GUESTFWD_ADDR.to_string())
        + &format!(
            r#"
echo "== list"
usbip list -r $server
usbip list -r $server | grep -q '1-1: .*(0525:a4a5)'

echo "== mass storage"
attach 1-1
dev=$(disk)
echo "DISK=$dev"
mkdir -p /mnt/disk
mount -t ext4 "$dev" /mnt/disk
(cd /mnt/disk && sha256sum -c SHA256SUMS)
dd if=/dev/urandom of=/mnt/disk/new.bin bs=4096 count=256 2>/dev/null
echo "NEWSUM=$(sha256sum /mnt/disk/new.bin | cut -d' ' -f1)"
sync
umount /mnt/disk
usbip port
usbip detach -p "$(port_of)"

echo "== detach and re-attach"
usbwire_wait_cmd 30 sh -c "usbip list -r $server | grep -q ' 1-1: '"
echo REEXPORTED
attach 1-1
dev=$(disk)
mount -t ext4 -o ro "$dev" /mnt/disk
echo "READBACK=$(sha256sum /mnt/disk/new.bin | cut -d' ' -f1)"
umount /mnt/disk
detach_all

echo "== serial"
attach 1-3
usbwire_wait_path /dev/ttyACM0 30
stty -F /dev/ttyACM0 raw -echo
exec 3<>/dev/ttyACM0
printf 'usbwire-echo-42' >&3
echo "ACM=$(timeout 10 dd bs=15 count=1 <&3 2>/dev/null)"
exec 3>&-
detach_all

echo "== keyboard"
attach 1-2
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
# The console's keyboard handler already has the device open, so keys
# typed before cat opens it would go there: wait until cat holds it.
usbwire_wait_cmd 20 sh -c "ls -l /proc/$catpid/fd | grep -q /dev/input/$ev"
echo KBD-READY
usbwire_wait_signal {sig} 120
# The last of the typed events is the release of Enter (EV_KEY, KEY_ENTER,
# value 0, the tail of a 24-byte input_event); evdev hands cat whole packets,
# so once it is in the file every event before it is too.
usbwire_wait_cmd 60 sh -c 'od -An -tx1 -v -w24 /tmp/events | grep -q " 01 00 1c 00 00 00 00 00$"' || echo "no release of Enter seen"
kill $catpid || true
echo EV-BEGIN
od -An -tx1 -v /tmp/events
echo EV-END
detach_all
dmesg | grep -iE 'vhci|usb-storage|input|ttyACM|usbip' | tail -n 30
"#,
            sig = SIGNAL_PORT
        );

    let g = guest
        .script(&script)
        .guestfwd(port)
        .hostfwd(SIGNAL_PORT)
        .timeout(Duration::from_secs(400))
        .spawn()
        .expect("boot the guest");
    g.wait_for_output("KBD-READY", Duration::from_secs(360))
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the keyboard FIFO");
        f.write_all(b"hello\n").unwrap();
    }
    g.signal(SIGNAL_PORT, "typed", Duration::from_secs(30))
        .expect("signal the guest");
    let out = g.wait().expect("guest run");
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    out.assert_success();
    let o = &out.output;

    // The file the guest wrote is in the image, intact, and the image is clean.
    assert!(daemon.stop(), "usbipd did not exit cleanly");
    let newsum = output_value(o, "NEWSUM=");
    assert_eq!(
        output_value(o, "READBACK="),
        newsum,
        "re-attached disk reads the file back differently"
    );
    let on_host = debugfs_cat(&image, "/new.bin");
    assert_eq!(
        on_host.len(),
        1024 * 1024,
        "new.bin is missing or short in the image"
    );
    assert_eq!(
        sha256_hex(&on_host),
        newsum,
        "new.bin in the image differs from what the guest wrote"
    );
    e2fsck_clean(&image);

    assert!(o.contains("REEXPORTED"));
    assert_eq!(
        output_value(o, "ACM="),
        "usbwire-echo-42",
        "bytes did not come back through the echo port"
    );

    // "hello\n" typed on the host arrives in order as key presses.
    const KEY_H: u16 = 35;
    const KEY_E: u16 = 18;
    const KEY_L: u16 = 38;
    const KEY_O: u16 = 24;
    const KEY_ENTER: u16 = 28;
    let presses: Vec<u16> = input_events(o)
        .into_iter()
        .filter(|(t, _, v)| *t == 1 && *v == 1)
        .map(|(_, c, _)| c)
        .collect();
    assert_eq!(
        presses,
        vec![KEY_H, KEY_E, KEY_L, KEY_L, KEY_O, KEY_ENTER],
        "key presses seen by the guest; all events: {:?}\n--- guest ---\n{}\n--- usbipd log ---\n{}",
        input_events(o),
        &o[o.find("== keyboard").unwrap_or(0)..],
        daemon.log_text()
    );
    let releases = input_events(o)
        .into_iter()
        .filter(|(t, _, v)| *t == 1 && *v == 0)
        .count();
    assert_eq!(releases, 6, "every key is released (no stuck keys)");
    println!(
        "kernel device test took {:.1}s (guest {:.1}s)",
        t0.elapsed().as_secs_f64(),
        out.duration.as_secs_f64()
    );
}

#[test]
fn daemon_killed_during_a_read_leaves_no_hang_and_a_consistent_image() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), 256);
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\n",
            image.display()
        ),
    )
    .unwrap();
    let mut daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &["--config", config.to_str().unwrap()],
        dir.path(),
    );
    let port = daemon.port;

    let script = GUEST_PRELUDE.replace("SERVER", &GUESTFWD_ADDR.to_string())
        + &format!(
            r#"
attach 1-1
dev=$(disk)
dd if="$dev" of=/dev/null bs=65536 &
ddpid=$!
# Data flows: dd has read something (rchar counts what read(2) returned).
usbwire_wait_cmd 60 sh -c "grep -q '^rchar: [1-9]' /proc/$ddpid/io"
echo DD-RUNNING
# The host stops the server: nothing completes any more, so dd, far from
# the end of the disk, is soon blocked (state D) in a read whose URBs are in
# flight, and stays so until the server is killed.
usbwire_wait_signal {sig_stopped} 120
usbwire_wait_blocked $ddpid 60 || {{ echo "dd is not blocked in a read: $(cat /proc/$ddpid/stat 2>&1)"; exit 6; }}
echo DD-BLOCKED
usbwire_wait_signal {sig1} 120
n=0
while kill -0 $ddpid 2>/dev/null; do
  n=$((n + 1)); [ $n -gt 1200 ] && {{ echo "dd still running 120 s after the server died"; exit 5; }}
  sleep 0.1
done
echo DD-ENDED
if wait $ddpid; then echo "dd read the whole disk: the server died after the read, not during it"; exit 7; fi
dmesg | grep -iE 'vhci|disconnect|connection' | tail -n 20
usbwire_wait_cmd 30 sh -c '[ -z "$(usbip port | grep "^Port")" ]'
echo PORT-FREED
usbwire_wait_signal {sig2} 120
attach 1-1
dev=$(disk)
mkdir -p /mnt/disk
mount -t ext4 -o ro "$dev" /mnt/disk
(cd /mnt/disk && sha256sum -c SHA256SUMS)
umount /mnt/disk
detach_all
echo REATTACHED-OK
"#,
            sig_stopped = SIGNAL_PORT_3,
            sig1 = SIGNAL_PORT,
            sig2 = SIGNAL_PORT_2
        );
    let g = guest
        .script(&script)
        .guestfwd(port)
        .hostfwd(SIGNAL_PORT)
        .hostfwd(SIGNAL_PORT_2)
        .hostfwd(SIGNAL_PORT_3)
        .timeout(Duration::from_secs(400))
        .spawn()
        .expect("boot the guest");
    g.wait_for_output("DD-RUNNING", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    // Kill it while a read waits on it: stopped first, so the read cannot
    // finish before the kill, and killed once the guest sees dd blocked.
    daemon.pause();
    g.signal(SIGNAL_PORT_3, "stopped", Duration::from_secs(30))
        .expect("signal the guest");
    g.wait_for_output("DD-BLOCKED", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    daemon.kill();
    g.signal(SIGNAL_PORT, "killed", Duration::from_secs(30))
        .expect("signal the guest");
    g.wait_for_output("PORT-FREED", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    daemon.restart();
    g.signal(SIGNAL_PORT_2, "restarted", Duration::from_secs(30))
        .expect("signal the guest");
    let out = g.wait().expect("guest run");
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    assert!(out.output.contains("REATTACHED-OK"));
    let dmesg_disconnect = out.output.contains("disconnect") || out.console.contains("disconnect");
    assert!(
        dmesg_disconnect,
        "the guest kernel did not report a disconnect:\n{}",
        out.output
    );
    assert!(daemon.stop());
    e2fsck_clean(&image);
}
