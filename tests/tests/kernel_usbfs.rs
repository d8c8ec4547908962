//! Real USB devices exported through usbfs by our `usbipd`, in the qemu
//! guest: configfs gadgets on dummy_hcd are the "physical" devices, our
//! `usbipd-rs`/`usbip-rs` run in the guest, and the guest's own vhci-hcd
//! (driven by Debian's C `usbip attach`) imports over 127.0.0.1.

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use usbwire_client::{SetupPacket, TransferError, TransferRequest};
use usbwire_tests::kernel::{self, DUMMY_UDC};
use usbwire_tests::support::{bulk_endpoints, output_value};

fn run(c: &mut Command) -> String {
    let o = c.output().expect("run");
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An 8 MiB ext4 image with a known file.
fn make_image(dir: &std::path::Path) -> Vec<u8> {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    let data: Vec<u8> = (0..200_000usize).map(|k| (k * 7 + 3) as u8).collect();
    std::fs::write(content.join("known.bin"), &data).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image));
    std::fs::read(&image).unwrap()
}

/// Our binaries, under names that do not shadow Debian's C tools.
fn with_our_tools(g: kernel::Guest) -> kernel::Guest {
    g.host_binary(&kernel::stripped_bin("usbipd"), "/usr/bin/usbipd-rs")
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .memory_mib(1024)
}

/// The output of a guest run that must have succeeded and reached its
/// final `echo DONE`; printed, with the time it took, for the test log.
fn finished(out: kernel::GuestOutput, t0: Instant) -> String {
    let text = out.output.clone();
    println!("{text}");
    println!("guest run took {:.1}s", t0.elapsed().as_secs_f64());
    out.assert_success();
    assert!(text.contains("DONE"));
    text
}

const PRELUDE: &str = r#"set -e
modprobe vhci-hcd
modprobe usb-storage
disk() { for i in $(seq 1 300); do for d in /dev/sd?; do [ -b "$d" ] && { echo "$d"; return 0; }; done; sleep 0.1; done; return 1; }
no_disk() { for i in $(seq 1 300); do ls /dev/sd? >/dev/null 2>&1 || return 0; sleep 0.1; done; return 1; }
port_of() { usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1; }
start_daemon() { usbipd-rs --state-file /var/lib/usbwire/bindings.json --hotplug-interval-ms 200 >>/tmp/usbipd.log 2>&1 & DAEMON=$!; usbwire_wait_path /run/usbwire/usbipd.sock 20; usbwire_wait_listen 3240 20; }
dump_log() { echo "--- usbipd log"; cat /tmp/usbipd.log; echo "--- end log"; }
trap dump_log EXIT
"#;

#[test]
fn kernel_usbfs_mass_storage_bind_attach_unbind() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path());
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd
{gadget}
busid=$(usbwire_udc_busid {udc})
echo "BUSID=$busid"
dev=$(disk)
mkdir -p /mnt/usb
mount -t ext4 "$dev" /mnt/usb
start_daemon

echo "== bind while mounted"
if usbip-rs bind -b "$busid" 2>/tmp/bind.err; then echo "BIND-WHILE-MOUNTED-SUCCEEDED"; exit 11; fi
echo "REFUSED: $(cat /tmp/bind.err)"
grep -q "mounted on /mnt/usb" /tmp/bind.err
grep -q "EBUSY" /tmp/bind.err

echo "== hubs"
roothub=$(basename $(ls -d /sys/devices/platform/dummy_hcd.0/usb*))
if usbip-rs bind -b "$roothub" 2>/tmp/hub.err; then echo "ROOT-HUB-BOUND"; exit 12; fi
echo "HUB-REFUSED: $(cat /tmp/hub.err)"
grep -q "hub" /tmp/hub.err

echo "== bind"
umount /mnt/usb
sha256sum /tmp/disk.img | cut -d' ' -f1 > /tmp/ref.sum
t=$(date +%s%N 2>/dev/null || echo 0)
usbip-rs bind -b "$busid"
echo "DRIVER-AFTER-BIND=$(basename $(readlink /sys/bus/usb/devices/$busid:1.0/driver))"
no_disk
if usbip-rs bind -b "$busid" 2>/tmp/twice.err; then echo "BOUND-TWICE"; exit 13; fi
echo "TWICE: $(cat /tmp/twice.err)"
usbip list -r 127.0.0.1
usbip list -r 127.0.0.1 | grep -q "$busid"

echo "== attach through vhci"
usbip attach -r 127.0.0.1 -b "$busid"
dev=$(disk)
echo "IMPORTED=$dev"
echo "IMPORTED-SUM=$(dd if=$dev bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "REF-SUM=$(cat /tmp/ref.sum)"
[ "$(dd if=$dev bs=64k 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(cat /tmp/ref.sum)" ]
mkdir -p /mnt/imp
mount -t ext4 -o ro "$dev" /mnt/imp
echo "KNOWN-SUM=$(sha256sum /mnt/imp/known.bin | cut -d' ' -f1)"
umount /mnt/imp
printf 'USBWIRE-WRITE-MARK-0123456789' | dd of=$dev bs=512 seek=16000 conv=notrunc 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo "BACKING=$(dd if=/tmp/disk.img bs=512 skip=16000 count=1 2>/dev/null | head -c 29)"
if usbip-rs unbind -b "$busid" 2>/tmp/unb.err; then echo "UNBOUND-WHILE-IMPORTED"; exit 14; fi
echo "UNBIND-IMPORTED: $(cat /tmp/unb.err)"

echo "== detach and unbind"
usbip detach -p "$(port_of)"
no_disk
# Right after detach: unbind waits for the server to release the import.
usbip-rs unbind -b "$busid"
dev=$(disk)
echo "LOCAL-AGAIN=$dev"
echo "DRIVER-AFTER-UNBIND=$(basename $(readlink /sys/bus/usb/devices/$busid:1.0/driver))"
cat /var/lib/usbwire/bindings.json
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            gadget = kernel::gadget_mass_storage_sh("ms", DUMMY_UDC, "/tmp/disk.img"),
            udc = DUMMY_UDC,
        );
    let out = with_our_tools(guest)
        .file("/tmp/disk.img", &image, 0o644)
        .script(&script)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("guest run");
    let text = finished(out, t0);
    let known: Vec<u8> = (0..200_000usize).map(|k| (k * 7 + 3) as u8).collect();
    let known_sum = run(Command::new("sh").arg("-c").arg(format!(
        "printf '' | cat {} | sha256sum",
        dir.path().join("content/known.bin").display()
    )));
    assert_eq!(known.len(), 200_000);
    let line = |key: &str| output_value(&text, key).to_string();
    assert!(line("REFUSED: ").contains("/mnt/usb"));
    assert!(line("HUB-REFUSED: ").contains("hub"));
    assert_eq!(line("DRIVER-AFTER-BIND="), "usbfs");
    assert!(line("TWICE: ").contains("EEXIST") || line("TWICE: ").contains("already"));
    assert_eq!(line("IMPORTED-SUM="), line("REF-SUM="));
    assert_eq!(
        line("KNOWN-SUM="),
        known_sum.split_whitespace().next().unwrap()
    );
    assert_eq!(line("BACKING="), "USBWIRE-WRITE-MARK-0123456789");
    assert!(line("UNBIND-IMPORTED: ").contains("imported"));
    assert_eq!(line("DRIVER-AFTER-UNBIND="), "usb-storage");
}

#[test]
fn kernel_usbfs_sourcesink_unplug_and_restart() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    const SIG: u16 = 5556;
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd num=2
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
{ss}
ss=$(usbwire_udc_busid dummy_udc.0)
{ms}
ms=$(usbwire_udc_busid dummy_udc.1)
echo "SS=$ss MS=$ms"
start_daemon
usbip-rs bind -b "$ss"
usbip-rs bind -b "$ms"
usbip list -r 127.0.0.1
echo READY
usbwire_wait_signal {sig} 120

echo "== unplug during transfer"
usbip attach -r 127.0.0.1 -b "$ms"
dev=$(disk)
echo "IMPORTED=$dev"
dd if=$dev of=/dev/null bs=4k 2>/tmp/dd.err &
ddpid=$!
# Pull the plug while dd waits in a read: once data flows (dd has read
# something), the server is stopped, so dd cannot reach the end of the disk
# and soon blocks (state D) on commands the server holds; the server goes on
# once the device is gone.
usbwire_wait_cmd 60 sh -c "grep -q '^rchar: [1-9]' /proc/$ddpid/io"
kill -STOP $DAEMON
usbwire_wait_stopped $DAEMON 20
usbwire_wait_blocked $ddpid 60 || {{ echo "dd is not blocked in a read: $(cat /proc/$ddpid/stat 2>&1)"; exit 6; }}
t0=$(cat /proc/uptime | cut -d' ' -f1)
echo '' > /sys/kernel/config/usb_gadget/ms/UDC
kill -CONT $DAEMON
for i in $(seq 1 600); do kill -0 $ddpid 2>/dev/null || break; sleep 0.1; done
t1=$(cat /proc/uptime | cut -d' ' -f1)
echo "DD-ENDED-AFTER=$t0..$t1"
if kill -0 $ddpid 2>/dev/null; then echo "DD-HUNG"; elif wait $ddpid; then echo DD-RC=0; else echo DD-RC=1; fi
cat /tmp/dd.err | tail -n 3
kill -0 $DAEMON && echo "DAEMON-ALIVE"
# The server closes the import of an unplugged device by itself: vhci sees
# the connection close and frees the port (status 006 is VDEV_ST_USED).
if usbwire_wait_cmd 30 sh -c "! cat /sys/devices/platform/vhci_hcd.0/status* | awk '\$3 == \"006\"' | grep -q ."; then
  echo "IMPORT-CLOSED-BY-SERVER"
fi
dmesg | grep -i "connection closed" | tail -n 2
usbwire_wait_cmd 30 sh -c "usbip list -r 127.0.0.1 | grep -q ' $ss:'" || true
usbip list -r 127.0.0.1
usbip list -r 127.0.0.1 | grep -q "$ss" && echo "SS-STILL-EXPORTED"
usbip list -r 127.0.0.1 | grep -q "$ms" || echo "MS-GONE-FROM-DEVLIST"

echo "== replug"
echo dummy_udc.1 > /sys/kernel/config/usb_gadget/ms/UDC
usbwire_wait_cmd 30 sh -c "usbip list -r 127.0.0.1 | grep -q ' $ms:'" && echo "MS-REEXPORTED"
echo READY2
usbwire_wait_signal {sig} 120

echo "== restart"
kill $DAEMON; wait $DAEMON || true
echo "SS-DRIVER-AFTER-STOP=$(basename $(readlink /sys/bus/usb/devices/$ss:1.0/driver 2>/dev/null) 2>/dev/null)"
cat /var/lib/usbwire/bindings.json
start_daemon
usbwire_wait_cmd 30 sh -c "usbip list -r 127.0.0.1 | grep -q ' $ms:'"
usbip list -r 127.0.0.1
echo "SS-DRIVER-AFTER-RESTART=$(basename $(readlink /sys/bus/usb/devices/$ss:1.0/driver))"
usbip attach -r 127.0.0.1 -b "$ms"
dev=$(disk)
echo "REATTACHED=$dev"
dd if=$dev of=/dev/null bs=64k count=16 2>/dev/null && echo "READ-AFTER-RESTART-OK"
usbip detach -p "$(port_of)"
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            ss = kernel::gadget_sourcesink_sh("ss", "dummy_udc.0"),
            ms = kernel::gadget_mass_storage_sh("ms", "dummy_udc.1", "/tmp/disk.img"),
            sig = SIG,
        );
    let g = with_our_tools(guest)
        .script(&script)
        .hostfwd(3240)
        .hostfwd(SIG)
        .timeout(Duration::from_secs(400))
        .spawn()
        .expect("spawn guest");
    g.wait_for_output("READY\n", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e}"));
    let t_ready = t0.elapsed();
    let out = g.output();
    let ss = out
        .lines()
        .find_map(|l| l.strip_prefix("SS="))
        .and_then(|l| l.split_whitespace().next())
        .expect("SS line")
        .to_string();
    let port = g.host_port(3240);
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    // A runtime per phase: dropping it closes the import's connection.
    // Caught so that a failure shows the guest's side too.
    let bulk_report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt().block_on(async {
            let dev = usbwire_client::import(format!("127.0.0.1:{port}"), &ss)
                .await
                .expect("import the SourceSink gadget");
            let cfg = dev.config_descriptor().await.expect("config descriptor");
            let (ep_in, ep_out) = bulk_endpoints(&cfg);
            assert!(
                ep_in & 0x80 != 0 && ep_out != 0,
                "bulk endpoints in {cfg:?}"
            );
            // SET_CONFIGURATION 1 (the active one) goes through harmlessly.
            dev.set_configuration(1).await.expect("set configuration");
            let t = Instant::now();
            // Several URBs in flight on each endpoint; unlink one pending IN.
            const N: usize = 24;
            const LEN: u32 = 1024 * 1024;
            let mut ins: Vec<_> = (0..N)
                .map(|_| dev.submit(TransferRequest::bulk_in(ep_in, LEN)))
                .collect();
            let outs: Vec<_> = (0..4)
                .map(|k| dev.submit(TransferRequest::bulk_out(ep_out, vec![0u8; 64 * 1024 + k])))
                .collect();
            ins[N - 2].cancel().await;
            let mut ok = 0;
            let mut cancelled = 0;
            let mut bytes = 0usize;
            for (k, tr) in ins.into_iter().enumerate() {
                let c = tr.await;
                match c.status {
                    Ok(()) => {
                        ok += 1;
                        bytes += c.data.len();
                        assert_eq!(c.data.len(), LEN as usize, "URB {k} short");
                    }
                    Err(TransferError::Cancelled) if k == N - 2 => cancelled += 1,
                    Err(e) => panic!("IN URB {k}: {e:?}"),
                }
            }
            for (k, tr) in outs.into_iter().enumerate() {
                let c = tr.await;
                assert!(c.status.is_ok(), "OUT URB {k}: {:?}", c.status);
                assert_eq!(c.actual_length as usize, 64 * 1024 + k);
            }
            let elapsed = t.elapsed();
            // The endpoint still works after the unlink.
            let again = dev
                .bulk_in(ep_in, 4096)
                .await
                .expect("bulk IN after the unlink");
            assert_eq!(again.len(), 4096);
            // A request the device stalls comes back as -EPIPE, not a hang.
            let bogus = dev
                .control_in(SetupPacket {
                    request_type: 0xc0,
                    request: 0x7f,
                    value: 0,
                    index: 0,
                    length: 4,
                })
                .await;
            format!(
            "in ok={ok} cancelled={cancelled} bytes={bytes} in {:.2}s; vendor request -> {bogus:?}",
            elapsed.as_secs_f64()
        )
        })
    }));
    if bulk_report.is_err() {
        println!(
            "--- guest output ---\n{}\n--- guest console ---\n{}",
            g.output(),
            g.console()
        );
    }
    let bulk_report = bulk_report.unwrap_or_else(|e| std::panic::resume_unwind(e));
    println!("bulk: {bulk_report}");
    g.signal(SIG, "go", Duration::from_secs(30))
        .expect("signal the guest");
    g.wait_for_output("READY2", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e}"));
    // The second device still works after the first was unplugged.
    let second = rt().block_on(async {
        let dev = usbwire_client::import(format!("127.0.0.1:{port}"), &ss)
            .await
            .expect("import again");
        let cfg = dev.config_descriptor().await.expect("config descriptor");
        let (ep_in, _) = bulk_endpoints(&cfg);
        dev.bulk_in(ep_in, 65536).await.map(|d| d.len())
    });
    println!("second device after unplug: {second:?}");
    g.signal(SIG, "go", Duration::from_secs(30))
        .expect("signal the guest");
    let res = g.wait().expect("guest");
    let text = res.output.clone();
    println!("{text}");
    println!(
        "ready after {:.1}s, total {:.1}s",
        t_ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    res.assert_success();
    assert_eq!(second.expect("bulk IN on the second device"), 65536);
    // dd ends with an I/O error, or with an early end of the disk (the
    // block layer drops the capacity to 0 when the device goes away).
    let short_read = text
        .lines()
        .find_map(|l| l.strip_suffix(" records in"))
        .and_then(|n| n.split('+').next()?.parse::<u64>().ok())
        .is_some_and(|n| n < 4096);
    assert!(
        text.contains("DD-RC=1") || short_read,
        "dd read the whole disk after the unplug"
    );
    for needle in [
        "DAEMON-ALIVE",
        "SS-STILL-EXPORTED",
        "IMPORT-CLOSED-BY-SERVER",
        "MS-GONE-FROM-DEVLIST",
        "MS-REEXPORTED",
        "READ-AFTER-RESTART-OK",
        "DONE",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    assert!(!text.contains("DD-HUNG"));
    // Linux semantics: the unlinked URB is either cancelled or, if the
    // device finished it first, completes with its data; every other URB
    // completes intact either way (checked above).
    assert!(
        bulk_report.contains("cancelled=1") || bulk_report.contains("ok=24"),
        "{bulk_report}"
    );
}

/// A Loopback gadget (`usb_f_ss_lb`, function `Loopback.0`) named `name`
/// on `udc`: what is written to its bulk OUT comes back on its bulk IN, so
/// an IN URB stays pending until something is written.
fn gadget_loopback_sh(name: &str, udc: &str) -> String {
    format!(
        r#"# --- usbwire loopback gadget {name} ---
modprobe libcomposite || exit 90
G=/sys/kernel/config/usb_gadget/{name}
mkdir -p $G/strings/0x409 $G/configs/c.1/strings/0x409 || exit 90
echo 0x0525 > $G/idVendor
echo 0xa4a1 > $G/idProduct
echo usbwire > $G/strings/0x409/manufacturer
echo Loopback > $G/strings/0x409/product
echo usbwire-{name} > $G/strings/0x409/serialnumber
echo c1 > $G/configs/c.1/strings/0x409/configuration
mkdir $G/functions/Loopback.0 || exit 90
ln -s $G/functions/Loopback.0 $G/configs/c.1/ || exit 90
echo {udc} > $G/UDC || exit 90
# --- end gadget ---
"#
    )
}

/// The top-level objects of a JSON array (as `usbip list --json` prints
/// it), as text: enough to find one device's object without a JSON parser.
fn json_objects(text: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    let (mut in_str, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => {
                if depth == 0 {
                    start = i;
                }
                depth += 1;
            }
            '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    out.push(&text[start..=i]);
                }
            }
            _ => {}
        }
    }
    out
}

/// The first of `transfers` that has completed, polled once each: this
/// does not wait for anything.
fn completed_now(
    transfers: &mut [usbwire_client::PendingTransfer],
) -> Option<(usize, usbwire_client::TransferOutcome)> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    transfers
        .iter_mut()
        .enumerate()
        .find_map(|(k, t)| match std::pin::Pin::new(t).poll(&mut cx) {
            std::task::Poll::Ready(c) => Some((k, c)),
            std::task::Poll::Pending => None,
        })
}

/// The object for `busid` in a `usbip list -l --json` line, if listed.
fn json_device<'a>(text: &'a str, busid: &str) -> Option<&'a str> {
    let key = format!("\"busid\":\"{busid}\"");
    json_objects(text).into_iter().find(|o| o.contains(&key))
}

/// CMD_UNLINK on a real device cancels exactly the URB it names (usbfs
/// DISCARDURB) and leaves the URBs queued around it on the endpoint alone;
/// and `usbip list -l` marks what our usbipd exports.
#[test]
fn kernel_usbfs_loopback_unlink_one_urb_and_list_marks() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    const SIG: u16 = 5557;
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd
{lb}
lb=$(usbwire_udc_busid {udc})
roothub=$(basename $(ls -d /sys/devices/platform/dummy_hcd.0/usb*))
echo "LB=$lb"
echo "ROOTHUB=$roothub"

echo "== list -l without a daemon"
usbip-rs list -l --json >/tmp/nod.json 2>/tmp/nod.err
echo "JSON-NO-DAEMON=$(cat /tmp/nod.json)"
echo "NO-DAEMON-STDERR=[$(cat /tmp/nod.err)]"
start_daemon
echo "JSON-UNBOUND=$(usbip-rs list -l --json)"
usbip-rs bind -b "$lb"

echo "== list -l with $lb exported"
usbip-rs list -l --mark
echo "JSON-BOUND=$(usbip-rs list -l --json)"
echo "JSON-BOUND-ALL=$(usbip-rs list -l --all --json)"
usbip-rs list -l --all --mark
echo "MARK-P=$(usbip-rs list -p -l --all --mark | tr '\n' ' ')"
# What the C tool prints, byte for byte, with usbipd running and a device bound.
usbip-rs list -l >/tmp/ours
usbip list -l >/tmp/theirs 2>/dev/null || true
usbip-rs list -p -l >/tmp/ours.p
usbip list -p -l >/tmp/theirs.p 2>/dev/null || true
if cmp -s /tmp/ours /tmp/theirs && cmp -s /tmp/ours.p /tmp/theirs.p; then echo "PLAIN-SAME-AS-C"; else diff /tmp/theirs /tmp/ours || true; diff /tmp/theirs.p /tmp/ours.p || true; fi
echo READY
usbwire_wait_signal {sig} 120
# The host has just closed its import: unbind waits for the release.
usbip-rs unbind -b "$lb"
echo "JSON-UNBOUND-AGAIN=$(usbip-rs list -l --json)"
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            lb = gadget_loopback_sh("lb", DUMMY_UDC),
            udc = DUMMY_UDC,
            sig = SIG,
        );
    let g = with_our_tools(guest)
        .script(&script)
        .hostfwd(3240)
        .hostfwd(SIG)
        .timeout(Duration::from_secs(300))
        .spawn()
        .expect("spawn guest");
    g.wait_for_output("READY\n", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e}"));
    let t_ready = t0.elapsed();
    let line = |text: &str, key: &str| output_value(text, key).to_string();
    let out = g.output();
    let lb = line(&out, "LB=");
    let port = g.host_port(3240);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let unlink = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let dev = usbwire_client::import(format!("127.0.0.1:{port}"), &lb)
                .await
                .expect("import the Loopback gadget");
            dev.set_configuration(1).await.expect("set configuration");
            let cfg = dev.config_descriptor().await.expect("config descriptor");
            let (ep_in, ep_out) = bulk_endpoints(&cfg);
            assert!(
                ep_in & 0x80 != 0 && ep_out != 0,
                "bulk endpoints in {cfg:?}"
            );
            let mut ins: Vec<_> = (0..3)
                .map(|_| dev.submit(TransferRequest::bulk_in(ep_in, 512)))
                .collect();
            // A round trip on ep0: the server takes a connection's commands in
            // order and hands each URB to the device as it takes it, so once
            // this is answered the three INs have reached the device.
            dev.device_descriptor().await.expect("device descriptor");
            // Nothing written: all three stay queued (and the messages below
            // come back in the two that stay, which they could not if either
            // had completed early).
            if let Some((k, c)) = completed_now(&mut ins) {
                panic!("loopback IN {k} completed with nothing written: {c:?}");
            }
            let t = Instant::now();
            ins[1].cancel().await;
            let c = tokio::time::timeout(Duration::from_secs(20), &mut ins[1])
                .await
                .expect("the unlink is answered");
            let unlink_ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(
                c.status,
                Err(TransferError::Cancelled),
                "the unlinked URB: {c:?}"
            );
            assert!(c.data.is_empty(), "{c:?}");
            let cancelled = ins.remove(1);
            drop(cancelled);
            // The other two are still queued, untouched.
            dev.device_descriptor().await.expect("device descriptor");
            if let Some((k, c)) = completed_now(&mut ins) {
                panic!("IN {k} completed after the unlink of another: {c:?}");
            }
            let msgs: [&[u8]; 2] = [b"first loopback message", b"the second one, longer"];
            for m in msgs {
                let n = dev.bulk_out(ep_out, m).await.expect("bulk OUT");
                assert_eq!(n as usize, m.len());
            }
            for (k, (t, m)) in ins.into_iter().zip(msgs).enumerate() {
                let c = tokio::time::timeout(Duration::from_secs(20), t)
                    .await
                    .unwrap_or_else(|_| panic!("IN {k} never completed"));
                assert_eq!(c.status, Ok(()), "IN {k}");
                assert_eq!(c.data, m, "IN {k}: {:?}", String::from_utf8_lossy(&c.data));
            }
            format!("unlink answered in {unlink_ms:.1} ms")
        })
    }));
    drop(rt);
    if unlink.is_err() {
        println!("--- guest output ---\n{}", g.output());
    }
    let unlink = unlink.unwrap_or_else(|e| std::panic::resume_unwind(e));
    println!("unlink: {unlink}");
    g.signal(SIG, "go", Duration::from_secs(30))
        .expect("signal the guest");
    let res = g.wait().expect("guest");
    let text = res.output.clone();
    println!("{text}");
    println!(
        "ready after {:.1}s, total {:.1}s",
        t_ready.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    res.assert_success();
    assert!(text.contains("DONE"));
    let roothub = line(&text, "ROOTHUB=");
    let dev_in = |json_line: &str| -> String {
        let j = line(&text, json_line);
        json_device(&j, &lb)
            .unwrap_or_else(|| panic!("{lb} not in {json_line} {j}"))
            .to_string()
    };
    // No daemon: not exported, and nothing said about it.
    let d = dev_in("JSON-NO-DAEMON=");
    assert!(
        d.contains(r#""exportable":true"#) && d.contains(r#""exported":false"#),
        "{d}"
    );
    assert_eq!(line(&text, "NO-DAEMON-STDERR="), "[]");
    let d = dev_in("JSON-UNBOUND=");
    assert!(
        d.contains(r#""exportable":true"#) && d.contains(r#""exported":false"#),
        "{d}"
    );
    let d = dev_in("JSON-BOUND=");
    assert!(
        d.contains(r#""exported":true"#)
            && d.contains(r#""exportable":false"#)
            && d.contains(r#""reason":"exported""#)
            && d.contains(r#""usbipd_state":"exported""#),
        "{d}"
    );
    // The root hub: not in the C tool's set, marked not exportable with --all.
    assert!(json_device(&line(&text, "JSON-BOUND="), &roothub).is_none());
    let all = line(&text, "JSON-BOUND-ALL=");
    let hub = json_device(&all, &roothub).expect("root hub listed with --all");
    assert!(
        hub.contains(r#""exportable":false"#) && hub.contains(r#""reason":"hub""#),
        "{hub}"
    );
    let mark_p = line(&text, "MARK-P=");
    assert!(
        mark_p.contains(&format!("busid={lb}#usbid=0525:a4a1#export=exported#")),
        "{mark_p}"
    );
    assert!(
        mark_p.contains(&format!("busid={roothub}#")) && mark_p.contains("export=hub#"),
        "{mark_p}"
    );
    assert!(
        text.contains(&format!(" - busid {lb} (0525:a4a1) (exported by usbipd)")),
        "no --mark line for {lb}"
    );
    assert!(
        text.contains("PLAIN-SAME-AS-C"),
        "plain list -l differs from the C tool"
    );
    let d = dev_in("JSON-UNBOUND-AGAIN=");
    assert!(
        d.contains(r#""exportable":true"#) && d.contains(r#""exported":false"#),
        "{d}"
    );
}

/// An import that ends with URBs in flight on a real device: the server
/// discards them (USBDEVFS_DISCARDURB) and waits, on its blocking pool and
/// woken by the kernel rather than by a timer, until usbfs gave every one
/// back; then the device is released, and a new import finds it working
/// (none of the old, discarded INs takes the new data).
#[test]
fn kernel_usbfs_import_closed_with_urbs_in_flight_is_drained() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    const SIG: u16 = 5558;
    const PENDING: usize = 8;
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd
{lb}
lb=$(usbwire_udc_busid {udc})
echo "LB=$lb"
export USBWIRE_LOG=info,usbwire_host::backend=debug
start_daemon
usbip-rs bind -b "$lb"
echo READY
usbwire_wait_signal {sig} 120
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            lb = gadget_loopback_sh("lb", DUMMY_UDC),
            udc = DUMMY_UDC,
            sig = SIG,
        );
    let g = with_our_tools(guest)
        .script(&script)
        .hostfwd(3240)
        .hostfwd(SIG)
        .timeout(Duration::from_secs(300))
        .spawn()
        .expect("spawn guest");
    g.wait_for_output("READY\n", Duration::from_secs(200))
        .unwrap_or_else(|e| panic!("{e}"));
    let lb = output_value(&g.output(), "LB=").to_string();
    let addr = format!("127.0.0.1:{}", g.host_port(3240));
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A runtime per import: dropping it closes the connection with the
        // INs still queued on the device.
        let pending = rt().block_on(async {
            let dev = usbwire_client::import(&addr, &lb)
                .await
                .expect("import the Loopback gadget");
            dev.set_configuration(1).await.expect("set configuration");
            let cfg = dev.config_descriptor().await.expect("config descriptor");
            let (ep_in, _) = bulk_endpoints(&cfg);
            let ins: Vec<_> = (0..PENDING)
                .map(|_| dev.submit(TransferRequest::bulk_in(ep_in, 512)))
                .collect();
            // The server takes a connection's URBs in order: once this
            // control transfer is answered, the INs were submitted to usbfs.
            dev.config_descriptor().await.expect("config descriptor");
            (dev, ins)
        });
        drop(pending);
        // The server waits for the drain and release before it answers a
        // re-import, so the first one succeeds.
        rt().block_on(async {
            let dev = usbwire_client::import(&addr, &lb)
                .await
                .expect("re-import right after the close");
            dev.set_configuration(1).await.expect("set configuration");
            let cfg = dev.config_descriptor().await.expect("config descriptor");
            let (ep_in, ep_out) = bulk_endpoints(&cfg);
            let msg = b"after the drain";
            let read = dev.submit(TransferRequest::bulk_in(ep_in, 512));
            assert_eq!(dev.bulk_out(ep_out, msg).await.expect("bulk OUT"), 15);
            let c = tokio::time::timeout(Duration::from_secs(20), read)
                .await
                .expect("the new IN completes");
            assert_eq!(c.status, Ok(()));
            assert_eq!(c.data, msg);
        });
    }));
    if checked.is_err() {
        println!("--- guest output ---\n{}", g.output());
    }
    checked.unwrap_or_else(|e| std::panic::resume_unwind(e));
    g.signal(SIG, "go", Duration::from_secs(30))
        .expect("signal the guest");
    let text = finished(g.wait().expect("guest"), t0);
    let drained = text
        .lines()
        .find(|l| l.contains("drained the URBs in flight"))
        .expect("the server drained the first import's URBs");
    println!("drain: {drained}");
    assert!(
        drained.contains(&format!("urbs={PENDING}")) && drained.contains("left=0"),
        "all {PENDING} discarded URBs came back: {drained}"
    );
    assert!(!text.contains("did not give back every discarded URB"));
}

/// The busy checks against real drivers: a serial port (cdc-acm's
/// /dev/ttyACM*) and a keyboard (usbhid's /dev/hidraw* and
/// /dev/input/event*) that a process holds open are refused, naming the
/// node and the process; closed, they bind; `--force` takes one while it
/// is open, and the holder loses its device.
#[test]
fn kernel_usbfs_open_tty_and_hidraw_refused_unless_forced() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd num=2
modprobe evdev
{acm}
acm=$(usbwire_udc_busid dummy_udc.0)
{hid}
hid=$(usbwire_udc_busid dummy_udc.1)
echo "ACM=$acm HID=$hid"
usbwire_wait_cmd 30 sh -c "ls /sys/bus/usb/devices/$acm:1.0/tty/ttyACM* >/dev/null 2>&1"
tty=/dev/$(basename $(ls -d /sys/bus/usb/devices/$acm:1.0/tty/ttyACM*))
usbwire_wait_cmd 30 sh -c "ls -d /sys/bus/usb/devices/$hid:1.0/*/hidraw/hidraw* >/dev/null 2>&1"
hidraw=/dev/$(basename $(ls -d /sys/bus/usb/devices/$hid:1.0/*/hidraw/hidraw*))
usbwire_wait_cmd 30 sh -c "ls -d /sys/bus/usb/devices/$hid:1.0/*/input/input*/event* >/dev/null 2>&1"
event=/dev/input/$(basename $(ls -d /sys/bus/usb/devices/$hid:1.0/*/input/input*/event*))
usbwire_wait_path "$tty" 10; usbwire_wait_path "$hidraw" 10; usbwire_wait_path "$event" 10
echo "NODES=$tty $hidraw $event"
start_daemon

echo "== open tty"
sleep 600 < "$tty" & TTYHOLD=$!
usbwire_wait_cmd 10 sh -c "ls -l /proc/$TTYHOLD/fd/0 | grep -q $tty"
if usbip-rs bind -b "$acm" 2>/tmp/acm.err; then echo "BOUND-WHILE-TTY-OPEN"; exit 11; fi
echo "TTY-REFUSED: $(cat /tmp/acm.err | tr '\n' ' ')"
kill $TTYHOLD; wait $TTYHOLD 2>/dev/null || true
usbip-rs bind -b "$acm"
echo "ACM-DRIVER-AFTER-BIND=$(basename $(readlink /sys/bus/usb/devices/$acm:1.0/driver))"
usbip list -r 127.0.0.1 | grep -q "$acm"
usbip-rs unbind -b "$acm"

echo "== open hidraw and input event"
sleep 600 < "$hidraw" & RAWHOLD=$!
usbwire_wait_cmd 10 sh -c "ls -l /proc/$RAWHOLD/fd/0 | grep -q $hidraw"
if usbip-rs bind -b "$hid" 2>/tmp/hid.err; then echo "BOUND-WHILE-HIDRAW-OPEN"; exit 12; fi
echo "HIDRAW-REFUSED: $(cat /tmp/hid.err | tr '\n' ' ')"
kill $RAWHOLD; wait $RAWHOLD 2>/dev/null || true
sleep 600 < "$event" & EVHOLD=$!
usbwire_wait_cmd 10 sh -c "ls -l /proc/$EVHOLD/fd/0 | grep -q $event"
if usbip-rs bind -b "$hid" 2>/tmp/ev.err; then echo "BOUND-WHILE-EVENT-OPEN"; exit 13; fi
echo "EVENT-REFUSED: $(cat /tmp/ev.err | tr '\n' ' ')"

echo "== forced"
usbip-rs bind --force -b "$hid"
echo "HID-DRIVER-AFTER-FORCE=$(basename $(readlink /sys/bus/usb/devices/$hid:1.0/driver))"
usbip list -r 127.0.0.1 | grep -q "$hid"
[ -e "$event" ] && echo "EVENT-NODE-STILL-THERE" || echo "EVENT-NODE-GONE"
usbip-rs unbind -b "$hid"
usbwire_wait_cmd 30 sh -c "ls -d /sys/bus/usb/devices/$hid:1.0/*/hidraw/hidraw* >/dev/null 2>&1"
echo "HID-DRIVER-AFTER-UNBIND=$(basename $(readlink /sys/bus/usb/devices/$hid:1.0/driver))"
kill $EVHOLD; wait $EVHOLD 2>/dev/null || true
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            acm = kernel::gadget_acm_sh("acm", "dummy_udc.0"),
            hid = kernel::gadget_hid_sh("kbd", "dummy_udc.1"),
        );
    let out = with_our_tools(guest)
        .script(&script)
        .timeout(Duration::from_secs(240))
        .run()
        .expect("guest run");
    let text = finished(out, t0);
    let line = |key: &str| output_value(&text, key).to_string();
    let nodes: Vec<String> = line("NODES=")
        .split_whitespace()
        .map(String::from)
        .collect();
    let (tty, hidraw, event) = (&nodes[0], &nodes[1], &nodes[2]);
    let refused = line("TTY-REFUSED: ");
    assert!(
        refused.contains(&format!("{tty} is open by process")) && refused.contains("(sleep)"),
        "{refused}"
    );
    assert!(refused.contains("EBUSY"), "{refused}");
    assert!(refused.contains("--force overrides this"), "{refused}");
    assert_eq!(line("ACM-DRIVER-AFTER-BIND="), "usbfs");
    let refused = line("HIDRAW-REFUSED: ");
    assert!(
        refused.contains(&format!("{hidraw} is open by process")),
        "{refused}"
    );
    let refused = line("EVENT-REFUSED: ");
    assert!(
        refused.contains(&format!("{event} is open by process")),
        "{refused}"
    );
    assert!(
        text.contains(&format!(
            "warning: --force: binding {} although {event} is open by process",
            line("ACM=")
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_start_matches("HID=")
        )),
        "the forced bind says what it overrode"
    );
    assert_eq!(line("HID-DRIVER-AFTER-FORCE="), "usbfs");
    assert!(
        text.contains("EVENT-NODE-GONE"),
        "usbhid let go of the device"
    );
    assert_eq!(line("HID-DRIVER-AFTER-UNBIND="), "usbhid");
}

/// usbipd's log lines in the guest output, in time order.
fn log_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| l.len() > 27 && l.as_bytes()[10] == b'T' && l.contains(" INFO "))
        .collect();
    // RFC 3339 timestamps in UTC sort as text.
    lines.sort();
    lines
}

/// The time of day (UTC, in seconds) of a log line's timestamp,
/// `2026-01-02T03:04:05.678901Z ...`.
fn seconds_of_day(line: &str) -> f64 {
    let hms = &line[11..26];
    let h: f64 = hms[0..2].parse().unwrap();
    let m: f64 = hms[3..5].parse().unwrap();
    let s: f64 = hms[6..].parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

/// Scripts written for the C tools detach and unbind at once; vhci closes
/// the connection from a kernel thread after `usbip detach` has returned,
/// so the unbind can arrive while the import is still ending. It must wait
/// for it, every time. An active import is refused naming its client, and
/// `--force` ends it the way the kernel's unbind does.
#[test]
fn kernel_usbfs_unbind_right_after_detach_and_unbind_force() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd
dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
{ms}
busid=$(usbwire_udc_busid {udc})
echo "BUSID=$busid"
disk >/dev/null
start_daemon
driver_is() {{ [ "$(basename "$(readlink /sys/bus/usb/devices/$busid:1.0/driver)")" = "$1" ]; }}
no_port() {{ ! usbip port 2>/dev/null | grep -q '^Port '; }}
now_ms() {{ awk '{{ print int($1 * 1000) }}' /proc/uptime; }}

echo "== detach, then unbind at once, 10 times"
ok=0
# Not i: the prelude's disk() uses it.
for cycle in $(seq 1 10); do
  usbip-rs bind -b "$busid"
  no_disk
  usbip attach -r 127.0.0.1 -b "$busid"
  disk >/dev/null
  usbip detach -p "$(port_of)"
  if usbip-rs unbind -b "$busid" 2>/tmp/unbind.err; then
    ok=$((ok + 1))
  else
    echo "UNBIND-AFTER-DETACH-FAILED $cycle: $(cat /tmp/unbind.err)"
  fi
  for n in $(seq 1 300); do driver_is usb-storage && break; sleep 0.1; done
  driver_is usb-storage || {{ echo "NOT-BACK-ON-USB-STORAGE $cycle"; exit 21; }}
  disk >/dev/null
done
echo "DETACH-UNBIND-OK=$ok"

echo "== unbind of an active import"
usbip-rs bind -b "$busid"
no_disk
usbip attach -r 127.0.0.1 -b "$busid"
dev=$(disk)
echo "CLIENT=$(netstat -tn | awk '$4 ~ /:3240$/ && $6 == "ESTABLISHED" {{ print $5 }}' | head -n 1)"
if usbip-rs unbind -b "$busid" 2>/tmp/active.err; then echo "UNBOUND-AN-ACTIVE-IMPORT"; exit 22; fi
echo "ACTIVE-REFUSED: $(cat /tmp/active.err)"
usbip port | grep -q '^Port ' && echo "STILL-ATTACHED-AFTER-REFUSAL"

echo "== unbind --force, with a reader on the imported disk"
(n=0; while [ $n -lt 1000 ] && dd if="$dev" of=/dev/null bs=256k iflag=direct 2>/dev/null; do n=$((n + 1)); done) & READER=$!
start=$(now_ms)
echo "usbwire: unbind --force starts" > /dev/kmsg
usbip-rs unbind --force -b "$busid" 2>/tmp/force.err
echo "FORCE-UNBIND-MS=$(( $(now_ms) - start ))"
echo "FORCE-WARNING: $(cat /tmp/force.err)"
for n in $(seq 1 300); do no_port && break; sleep 0.1; done
no_port || {{ echo "PORT-STILL-IN-USE"; usbip port; exit 23; }}
echo "PORT-AFTER-FORCE: $(usbip port | tr '\n' ' ')"
# When vhci saw the disconnect (its kernel log), on the clock of usbipd's
# log: the wall clock and the uptime read in one process.
echo "CLOCKS=$(adjtimex | awk '/tv_sec/ {{ s = $2 }} /tv_usec/ {{ u = $2 }} END {{ getline up < "/proc/uptime"; split(up, a, " "); printf "%d.%06d %s\n", s, u, a[1] }}')"
stamp() {{ dmesg | grep "$1" | tail -n 1 | sed 's/^\[ *\([0-9.]*\)\].*/\1/'; }}
echo "FORCE-START-UPTIME=$(stamp 'usbwire: unbind --force starts')"
echo "VHCI-DISCONNECT-UPTIME=$(stamp 'vhci_hcd: disconnect device')"
wait $READER || true
echo "READER-ENDED"
for n in $(seq 1 300); do driver_is usb-storage && break; sleep 0.1; done
echo "DRIVER-AFTER-FORCE=$(basename "$(readlink /sys/bus/usb/devices/$busid:1.0/driver)")"
echo "LOCAL-AFTER-FORCE=$(disk)"

echo "== the daemon goes on serving"
usbip-rs bind -b "$busid"
usbip list -r 127.0.0.1 | grep -q "$busid" && echo "SERVED-AGAIN"
usbip-rs unbind -b "$busid"
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            ms = kernel::gadget_mass_storage_sh("ms", DUMMY_UDC, "/tmp/disk.img"),
            udc = DUMMY_UDC,
        );
    let out = with_our_tools(guest)
        .script(&script)
        .timeout(Duration::from_secs(600))
        .run()
        .expect("guest run");
    let text = finished(out, t0);
    let line = |key: &str| output_value(&text, key).to_string();
    assert!(
        !text.contains("UNBIND-AFTER-DETACH-FAILED"),
        "usbip unbind right after usbip detach failed"
    );
    assert_eq!(line("DETACH-UNBIND-OK="), "10");
    // Whether an unbind arrived while the import was still being released
    // depends on the guest's speed (starting `usbip-rs` in TCG takes about
    // as long as the release); say how often the race was run.
    let mut held = false;
    let (mut unbinds, mut raced) = (0, 0);
    for l in log_lines(&text) {
        if l.contains("session: imported conn=") {
            held = true;
        } else if l.contains("session: released conn=") {
            held = false;
        } else if l.contains("control request: Unbind") && unbinds < 10 {
            unbinds += 1;
            raced += usize::from(held);
        }
    }
    println!(
        "{raced} of the {unbinds} unbinds after a detach arrived before usbipd had released \
         the device"
    );
    let client = line("CLIENT=");
    assert!(client.starts_with("127.0.0.1:"), "{client}");
    let refused = line("ACTIVE-REFUSED: ");
    assert!(
        refused.contains(&format!("imported by {client}")) && refused.contains("EBUSY"),
        "the refusal names the client {client}: {refused}"
    );
    assert!(refused.contains("--force"), "{refused}");
    assert!(text.contains("STILL-ATTACHED-AFTER-REFUSAL"));
    assert!(
        line("FORCE-WARNING: ").contains(&format!(
            "ended the import of {} by {client}",
            line("BUSID=")
        )),
        "{}",
        line("FORCE-WARNING: ")
    );
    // From the moment usbipd ended the import (its log line) to vhci's
    // "disconnect device" (the kernel log), both on the guest's wall clock.
    let ended_at = log_lines(&text)
        .into_iter()
        .find(|l| l.contains("ending the import: unbind --force"))
        .map(seconds_of_day)
        .expect("usbipd logged the forced end of the import");
    let clocks: Vec<f64> = line("CLOCKS=")
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let vhci_uptime: f64 = line("VHCI-DISCONNECT-UPTIME=").parse().unwrap();
    let vhci_at = (clocks[0] - (clocks[1] - vhci_uptime)) % 86_400.0;
    // Seconds, across midnight if need be; the uptime has 10 ms steps.
    let mut after = vhci_at - ended_at;
    if after > 43_200.0 {
        after -= 86_400.0;
    } else if after < -43_200.0 {
        after += 86_400.0;
    }
    let disconnect_ms = (after * 1000.0).round() as i64;
    let force_start: f64 = line("FORCE-START-UPTIME=").parse().unwrap();
    println!(
        "unbind --force took {} ms; vhci saw the disconnect {} ms after the command started \
         and {disconnect_ms} ms after usbipd ended the import",
        line("FORCE-UNBIND-MS="),
        ((vhci_uptime - force_start) * 1000.0).round(),
    );
    assert!(
        // Below zero only by how the two clocks were read.
        (-250..=2000).contains(&disconnect_ms),
        "vhci saw the disconnect {disconnect_ms} ms after usbipd ended the import"
    );
    assert!(!line("PORT-AFTER-FORCE: ").contains("Port "));
    assert!(text.contains("READER-ENDED"));
    assert_eq!(line("DRIVER-AFTER-FORCE="), "usb-storage");
    assert!(line("LOCAL-AFTER-FORCE=").starts_with("/dev/sd"));
    assert!(text.contains("SERVED-AGAIN"));
}

/// Hotplug follows the kernel's uevents: usbipd runs with a poll interval
/// far longer than the waits below, and says it follows uevents (it would
/// log `no kernel uevents` and poll otherwise), so only a uevent can make
/// it drop the unplugged device and export it again when it comes back.
/// Also: our `list -l` and the C tool's list the same devices.
#[test]
fn kernel_usbfs_hotplug_follows_uevents() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let script = PRELUDE.to_string()
        + &format!(
            r#"
modprobe dummy_hcd
{ss}
busid=$(usbwire_udc_busid {udc})
echo "BUSID=$busid"
echo "== list -l"
# The C tool lists as soon as it parses -l: -p goes first.
usbip list -p -l > /tmp/c.list
usbip-rs list -p -l > /tmp/rs.list
cat /tmp/c.list
echo "C-LIST=$(tr '\n' ' ' < /tmp/c.list)"
echo "RS-LIST=$(tr '\n' ' ' < /tmp/rs.list)"
usbipd-rs --state-file /var/lib/usbwire/bindings.json --hotplug-interval-ms 60000 >>/tmp/usbipd.log 2>&1 & DAEMON=$!
usbwire_wait_path /run/usbwire/usbipd.sock 20; usbwire_wait_listen 3240 20
usbip-rs bind -b "$busid"
usbip list -r 127.0.0.1 | grep -q " $busid:" && echo "EXPORTED"
echo "MARK=$(usbip-rs list -l --mark | grep -- "- busid $busid ")"

echo "== unplug"
echo '' > /sys/kernel/config/usb_gadget/ss/UDC
usbwire_wait_cmd 60 grep -q "$busid was unplugged" /tmp/usbipd.log && echo "DROPPED"
usbip list -r 127.0.0.1 2>&1 | grep -q " $busid:" || echo "GONE-FROM-DEVLIST"

echo "== replug"
echo {udc} > /sys/kernel/config/usb_gadget/ss/UDC
usbwire_wait_cmd 60 grep -q "$busid is present again and exported" /tmp/usbipd.log && echo "BACK"
usbip list -r 127.0.0.1 | grep -q " $busid:" && echo "EXPORTED-AGAIN"
grep -q "following hotplug through kernel uevents" /tmp/usbipd.log && echo "UEVENTS"
grep -q "no kernel uevents" /tmp/usbipd.log && echo "POLLED"
kill $DAEMON; wait $DAEMON || true
echo DONE
"#,
            ss = kernel::gadget_sourcesink_sh("ss", DUMMY_UDC),
            udc = DUMMY_UDC,
        );
    let out = with_our_tools(guest)
        .script(&script)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("guest run");
    let text = finished(out, t0);
    let line = |key: &str| output_value(&text, key).to_string();
    let said = |word: &str| text.lines().any(|l| l.trim() == word);
    let busid = line("BUSID=");
    assert!(line("C-LIST=").contains(&format!("busid={busid}#")));
    assert_eq!(
        line("RS-LIST="),
        line("C-LIST="),
        "list -l -p as the C tool"
    );
    assert!(said("EXPORTED"));
    assert!(line("MARK=").contains("(exported by usbipd)"), "{text}");
    assert!(said("UEVENTS"), "usbipd follows uevents");
    assert!(!said("POLLED"), "usbipd fell back to polling");
    assert!(said("DROPPED"), "the unplug was noticed");
    assert!(said("GONE-FROM-DEVLIST"));
    assert!(said("BACK"), "the replug was noticed");
    assert!(said("EXPORTED-AGAIN"));
}
