//! The client half against the real kernel: our userspace library against
//! the kernel's usbip-host and Debian's usbipd, and our `usbip attach`,
//! `port`, `detach` and `list -l` against vhci-hcd, side by side with
//! Debian's C tool.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use usbwire_client::{ClientError, RemoteDevice, TransferError, TransferRequest};
use usbwire_proto::OpStatus;
use usbwire_tests::daemon::Usbipd;
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::support::{bulk_endpoints, output_value};

const SIGNAL_1: u16 = 5555;
const SIGNAL_2: u16 = 5556;

/// A gadget with one configfs function on `udc`, named `name`.
fn gadget(name: &str, udc: &str, pid: u16, function: &str, setup: &str) -> String {
    format!(
        r#"G=/sys/kernel/config/usb_gadget/{name}
mkdir -p $G/strings/0x409 $G/configs/c.1/strings/0x409
echo 0x0525 > $G/idVendor
echo {pid:#06x} > $G/idProduct
echo usbwire-test > $G/strings/0x409/manufacturer
echo {name} > $G/strings/0x409/product
echo {name}0001 > $G/strings/0x409/serialnumber
echo c1 > $G/configs/c.1/strings/0x409/configuration
mkdir $G/functions/{function}
{setup}
ln -s $G/functions/{function} $G/configs/c.1/
echo {udc} > $G/UDC
"#
    )
}

fn gadget_remove(name: &str) -> String {
    kernel::gadget_remove_sh(name)
}

/// Imports and configures a device, as a host does after enumeration:
/// binding usbip-host leaves the device unconfigured.
///
/// usbip-host takes a moment to release a device after its last importer
/// left (it resets the device first), and the kernel's usbipd answers
/// "busy" until then; nothing announces the release, so it is polled for,
/// as lib.sh's usbwire_wait_cmd polls. Any other refusal is a failure.
async fn import_when_available(addr: SocketAddr, busid: &str) -> RemoteDevice {
    for _ in 0..300 {
        match usbwire_client::import(addr, busid).await {
            Ok(d) => {
                d.set_configuration(1)
                    .await
                    .expect("SET_CONFIGURATION through usbip-host");
                return d;
            }
            Err(ClientError::ImportRefused {
                status: OpStatus::DevBusy,
                ..
            }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("import of {busid} from the kernel's usbipd: {e}"),
        }
    }
    panic!("{busid} stayed busy on the kernel's usbipd for 30 s");
}

fn our_list(port: u16) -> String {
    let out = Command::new(kernel::cargo_bin("usbip"))
        .args(["-t", &port.to_string(), "list", "-r", "127.0.0.1"])
        .output()
        .expect("run our usbip");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// One BOT command through the library: CBW, IN data phase, CSW status.
async fn bot_in(
    dev: &RemoteDevice,
    ep_in: u8,
    ep_out: u8,
    tag: u32,
    cdb: &[u8],
    len: u32,
) -> (Vec<u8>, u8) {
    let mut cbw = Vec::with_capacity(31);
    cbw.extend_from_slice(&0x4342_5355u32.to_le_bytes());
    cbw.extend_from_slice(&tag.to_le_bytes());
    cbw.extend_from_slice(&len.to_le_bytes());
    cbw.extend_from_slice(&[0x80, 0, cdb.len() as u8]);
    let mut cb = [0u8; 16];
    cb[..cdb.len()].copy_from_slice(cdb);
    cbw.extend_from_slice(&cb);
    dev.bulk_out(ep_out, &cbw).await.expect("CBW");
    let data = match dev.bulk_in(ep_in, len).await {
        Ok(d) => d,
        Err(TransferError::Stall) => {
            dev.clear_halt(ep_in).await.expect("clear halt");
            Vec::new()
        }
        Err(e) => panic!("data phase: {e}"),
    };
    let csw = dev.bulk_in(ep_in, 13).await.expect("CSW");
    assert_eq!(&csw[..4], b"USBS");
    (data, csw[12])
}

/// READ(10) of one block. A real disk reports UNIT ATTENTION once after a
/// reset (binding usbip-host resets it): read the sense and retry, as
/// usb-storage does.
async fn read_block(dev: &RemoteDevice, ep_in: u8, ep_out: u8, lba: u32) -> Vec<u8> {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[8] = 1;
    for attempt in 0..3 {
        let (data, status) = bot_in(dev, ep_in, ep_out, 10 + attempt, &cdb, 512).await;
        if status == 0 {
            return data;
        }
        let (sense, _) = bot_in(
            dev,
            ep_in,
            ep_out,
            100 + attempt,
            &[0x03, 0, 0, 0, 18, 0],
            18,
        )
        .await;
        eprintln!(
            "READ(10) of LBA {lba}: CHECK CONDITION, sense {:02x?}; retrying",
            &sense[..sense.len().min(14)]
        );
    }
    panic!("READ(10) of LBA {lba} kept failing");
}

#[test]
fn our_library_drives_devices_exported_by_the_kernel() {
    let Some(guest) = kernel::require() else {
        return;
    };
    // The disk the mass-storage gadget exports: distinct bytes in every block.
    let disk: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| ((i / 512) as u8) ^ (i as u8).rotate_left(3))
        .collect();
    let script = format!(
        r#"set -e
modprobe dummy_hcd num=2
modprobe usbip-host
modprobe libcomposite
{ss}
{lb}
ss=$(usbwire_udc_busid dummy_udc.0)
lb=$(usbwire_udc_busid dummy_udc.1)
usbip bind -b $ss
usbip bind -b $lb
usbipd -D
usbwire_wait_listen 3240 20
echo "SS=$ss"
echo "LB=$lb"
echo READY
usbwire_wait_signal {s1} 300
usbip unbind -b $ss
{rm}
{ms}
ms=$(usbwire_udc_busid dummy_udc.0)
usbip bind -b $ms
echo "MS=$ms"
echo READY2
usbwire_wait_signal {s2} 300
echo DONE
"#,
        ss = gadget(
            "ss",
            "dummy_udc.0",
            0xa4a0,
            "SourceSink.0",
            "echo 1 > $G/functions/SourceSink.0/pattern; echo 512 > $G/functions/SourceSink.0/bulk_buflen"
        ),
        lb = gadget("lb", "dummy_udc.1", 0xa4a1, "Loopback.0", ""),
        rm = gadget_remove("ss"),
        ms = gadget(
            "ms",
            "dummy_udc.0",
            0xa4a5,
            "mass_storage.0",
            "echo /disk.img > $G/functions/mass_storage.0/lun.0/file"
        ),
        s1 = SIGNAL_1,
        s2 = SIGNAL_2,
    );
    let g = guest
        .script(&script)
        .file("/disk.img", &disk, 0o644)
        .hostfwd(3240)
        .hostfwd(SIGNAL_1)
        .hostfwd(SIGNAL_2)
        .timeout(Duration::from_secs(300))
        .spawn()
        .expect("boot the guest");
    g.wait_for_output("READY\n", Duration::from_secs(200))
        .expect("guest ready");
    let out = g.output();
    let get = |o: &str, k: &str| output_value(o, k).to_string();
    let (ss, lb) = (get(&out, "SS="), get(&out, "LB="));
    let port = g.host_port(3240);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Our `usbip list -r` lists what the kernel exports.
    let listed = our_list(port);
    assert!(
        listed.contains(&format!("{ss}: ")) && listed.contains("(0525:a4a0)"),
        "{listed}"
    );

    let guest_log = |what: &str| -> String {
        format!(
            "{what}\n--- guest output ---\n{}\n--- guest console ---\n{}",
            g.output(),
            g.console()
        )
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            // SourceSink: a known pattern, many transfers in flight.
            let dev = import_when_available(addr, &ss).await;
            let (ep_in, ep_out) =
                bulk_endpoints(&dev.config_descriptor().await.expect("config descriptor"));
            let ins: Vec<_> = (0..16)
                .map(|_| dev.submit(TransferRequest::bulk_in(ep_in, 4096)))
                .collect();
            // pattern=1: i % 63 within each 512-byte gadget request (bulk_buflen).
            let pattern: Vec<u8> = (0..4096).map(|i| ((i % 512) % 63) as u8).collect();
            let outs: Vec<_> = (0..16)
                .map(|_| dev.submit(TransferRequest::bulk_out(ep_out, pattern.clone())))
                .collect();
            for t in ins {
                let data = t.await.into_result().expect("source IN");
                let bad = data.iter().zip(&pattern).position(|(a, b)| a != b);
                assert!(
                    data.len() == pattern.len() && bad.is_none(),
                    "SourceSink data is not the pattern: {} bytes, first difference at {bad:?}",
                    data.len()
                );
            }
            for t in outs {
                let c = t.await;
                assert_eq!(c.status, Ok(()), "sink OUT");
                assert_eq!(c.actual_length, 4096);
            }
            drop(dev);
            // Released on the kernel side: it can be imported again.
            drop(import_when_available(addr, &ss).await);

            // Loopback: an IN with nothing to loop back stays pending and is unlinked.
            let dev = import_when_available(addr, &lb).await;
            let (ep_in, ep_out) = bulk_endpoints(&dev.config_descriptor().await.unwrap());
            let mut pending = dev.submit(TransferRequest::bulk_in(ep_in, 512));
            // A round trip on ep0: usbip-host submits a connection's URBs in
            // the order they come, so once this is answered the IN has
            // reached the device, and the unlink below finds it there.
            dev.device_descriptor().await.expect("device descriptor");
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                std::pin::Pin::new(&mut pending).poll(&mut cx).is_pending(),
                "loopback IN completed with nothing written"
            );
            pending.cancel().await;
            let c = tokio::time::timeout(Duration::from_secs(20), pending)
                .await
                .expect("unlink answered");
            assert_eq!(c.status, Err(TransferError::Cancelled));
            // The device still works after the unlink.
            let echo = dev.submit(TransferRequest::bulk_in(ep_in, 512));
            dev.bulk_out(ep_out, b"usbwire loopback").await.unwrap();
            let data = tokio::time::timeout(Duration::from_secs(20), echo)
                .await
                .unwrap()
                .into_result()
                .unwrap();
            assert!(data.starts_with(b"usbwire loopback"), "{data:?}");
        })
    }));
    if r.is_err() {
        panic!(
            "{}",
            guest_log("the library part failed (see the panic above)")
        );
    }

    g.signal(SIGNAL_1, "next", Duration::from_secs(30)).unwrap();
    g.wait_for_output("READY2", Duration::from_secs(120))
        .expect("mass-storage gadget ready");
    let ms = get(&g.output(), "MS=");
    rt.block_on(async {
        let dev = import_when_available(addr, &ms).await;
        let (ep_in, ep_out) = bulk_endpoints(&dev.config_descriptor().await.unwrap());
        for lba in [0u32, 100, 2047] {
            let got = read_block(&dev, ep_in, ep_out, lba).await;
            let at = lba as usize * 512;
            assert!(
                got == disk[at..at + 512],
                "block {lba} read through the kernel's usbip-host differs"
            );
        }
    });
    g.signal(SIGNAL_2, "done", Duration::from_secs(30)).unwrap();
    let out = g.wait().expect("guest run");
    out.assert_success();
}

fn ext4_image(dir: &std::path::Path) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), b"hello from usbwire\n").unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 * 1024 * 1024)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    image
}

#[test]
fn our_attach_port_detach_and_list_match_the_c_tool() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = ext4_image(dir.path());
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\n",
            image.display()
        ),
    )
    .unwrap();
    let daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &["--config", config.to_str().unwrap()],
        dir.path(),
    );
    let port = daemon.port;
    let script = format!(
        r#"set -e
modprobe vhci-hcd
modprobe dummy_hcd
modprobe libcomposite
{ss}
usbwire_udc_busid dummy_udc.0 > /dev/null
usbip-rs attach -r {server} -b 1-1
dev=""
for i in $(seq 1 300); do [ -b /dev/sda ] && {{ dev=/dev/sda; break; }}; sleep 0.1; done
[ -n "$dev" ]
mkdir -p /mnt/d
mount -t ext4 -o ro $dev /mnt/d
echo "HELLO=$(cat /mnt/d/hello.txt)"
umount /mnt/d
usbip-rs port > /tmp/ours
usbip port > /tmp/theirs
echo "== port: ours"; cat /tmp/ours; echo "== port: theirs"; cat /tmp/theirs; echo "== end"
cmp /tmp/ours /tmp/theirs && echo PORT-SAME
usbip-rs list -l > /tmp/ours
usbip list -l > /tmp/theirs
echo "== list: ours"; cat /tmp/ours; echo "== list: theirs"; cat /tmp/theirs; echo "== end"
cmp /tmp/ours /tmp/theirs && echo LIST-SAME
usbip-rs list -p -l > /tmp/ours
usbip list -p -l > /tmp/theirs
cmp /tmp/ours /tmp/theirs && echo LISTP-SAME
p=$(usbip-rs port | sed -n 's/^Port \([0-9]*\):.*/\1/p')
usbip-rs detach -p "$p"
usbwire_wait_cmd 20 sh -c '[ ! -b /dev/sda ]'
[ -z "$(usbip port | grep '^Port')" ]
echo DETACHED
"#,
        ss = kernel::gadget_sourcesink_sh("zero", kernel::DUMMY_UDC),
        server = GUESTFWD_ADDR
    );
    let out = guest
        .script(&script)
        .host_binary(&kernel::cargo_bin("usbip"), "/usr/bin/usbip-rs")
        .guestfwd(port)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("guest run");
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    let o = &out.output;
    assert!(o.contains("HELLO=hello from usbwire"), "{o}");
    assert!(
        o.contains("PORT-SAME"),
        "`usbip port` output differs from the C tool:\n{o}"
    );
    assert!(
        o.contains("LIST-SAME"),
        "`usbip list -l` output differs from the C tool:\n{o}"
    );
    assert!(
        o.contains("LISTP-SAME"),
        "`usbip list -p -l` output differs from the C tool:\n{o}"
    );
    assert!(o.contains("DETACHED"));
}

#[test]
fn eight_concurrent_attaches_all_succeed_five_times() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("usbipd.toml");
    std::fs::write(&config, "[[device]]\nkind = \"test\"\n".repeat(8)).unwrap();
    let daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &["--config", config.to_str().unwrap()],
        dir.path(),
    );
    let port = daemon.port;
    let script = format!(
        r#"set -e
modprobe vhci-hcd
cat > /tmp/used_ports <<'X'
#!/bin/sh
cat /sys/devices/platform/vhci_hcd.0/status* | awk '$3 == "006" {{ print $2 + 0 }}'
X
chmod +x /tmp/used_ports
retries=0
for round in 1 2 3 4 5; do
  for i in 1 2 3 4 5 6 7 8; do
    ( if usbip-rs -d attach -r {server} -b 1-$i > /tmp/attach.$i 2>&1; then echo 0; else echo 1; fi > /tmp/rc.$i ) &
  done
  wait
  for i in 1 2 3 4 5 6 7 8; do
    if [ "$(cat /tmp/rc.$i)" != 0 ]; then echo "round $round: attach of 1-$i failed:"; cat /tmp/attach.$i; exit 1; fi
  done
  # The kernel's port table: status 006 is VDEV_ST_USED. Enumeration of
  # eight devices under emulation takes a moment after attach returns.
  usbwire_wait_cmd 60 sh -c '[ "$(/tmp/used_ports | wc -l)" = 8 ]' || true
  used=$(/tmp/used_ports | wc -l)
  distinct=$(/tmp/used_ports | sort -u | wc -l)
  echo "ROUND $round: $used ports in use, $distinct distinct"
  [ "$used" = 8 ] && [ "$distinct" = 8 ]
  n=$(cat /tmp/attach.* | grep -c 'port taken by another attacher' || true)
  retries=$((retries + n))
  for p in $(/tmp/used_ports); do usbip-rs detach -p $p; done
  usbwire_wait_cmd 30 sh -c '[ -z "$(/tmp/used_ports)" ]'
  usbwire_wait_cmd 30 sh -c '[ $(usbip-rs list -r {server} | grep -c " 1-") = 8 ]'
done
echo "RETRIES=$retries"
echo "KERNEL-BUSY=$(dmesg | grep -c 'already used' || true)"
"#,
        server = GUESTFWD_ADDR
    );
    let out = guest
        .script(&script)
        .host_binary(&kernel::cargo_bin("usbip"), "/usr/bin/usbip-rs")
        .guestfwd(port)
        .timeout(Duration::from_secs(400))
        .run()
        .expect("guest run");
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    let o = &out.output;
    assert_eq!(o.matches("8 ports in use, 8 distinct").count(), 5, "{o}");
    let num = |k: &str| -> u32 {
        o.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // The retry path ran: the kernel refused a port another attacher had
    // just taken (EBUSY), and our attach picked another and succeeded.
    assert!(
        num("RETRIES=") > 0,
        "no EBUSY retry happened in 5 rounds of 8 racing attaches:\n{o}"
    );
    assert!(
        num("KERNEL-BUSY=") > 0,
        "the kernel never reported a busy port:\n{o}"
    );
}
