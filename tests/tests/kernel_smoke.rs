//! The kernel harness' own test: boots the Debian kernel once and checks modules,
//! a configfs SourceSink gadget on dummy_hcd, Debian's usbip/usbipd in the guest, a
//! host -> guest forward (host `usbip list -r`) and a guest -> host forward (two
//! connections to a banner server on the host).

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use usbwire_tests::kernel::{self, DUMMY_UDC, SOURCESINK_IDS};

/// A banner server on 127.0.0.1 that answers each connection with
/// `USBWIRE-BANNER <n>` and closes it, for at most `max` connections.
struct BannerServer {
    port: u16,
    served: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl BannerServer {
    fn start(max: u32) -> BannerServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU32::new(0));
        let (stop_seen, count) = (stop.clone(), served.clone());
        // A blocking accept: it wakes for a client, or for the connection
        // `finish` makes after raising `stop`.
        let thread = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop_seen.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { break };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = conn.write_all(format!("USBWIRE-BANNER {n}\n").as_bytes());
                if n >= max {
                    break;
                }
            }
        });
        BannerServer {
            port,
            served,
            stop,
            thread,
        }
    }

    /// Stops the server and says how many clients it answered.
    fn finish(self) -> u32 {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept; refused when the server already stopped at `max`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        self.thread.join().expect("the banner server panicked");
        self.served.load(Ordering::SeqCst)
    }
}

#[test]
fn kernel_smoke() {
    let t_total = Instant::now();
    let Some(guest) = kernel::require() else {
        return;
    };
    let a = guest.assets();
    println!(
        "assets: {} ({}) prepared in {:.2}s, kernel {}",
        a.key,
        if a.built { "built now" } else { "cached" },
        a.prepare_time.as_secs_f64(),
        a.kernel_release
    );
    let usbip = kernel::host_usbip().expect("Debian's usbip (package usbip) on the host");

    let banner = BannerServer::start(10);
    let banner_port = banner.port;
    const SIGNAL_PORT: u16 = 5555;
    let (vid, pid) = SOURCESINK_IDS;
    let script = format!(
        r#"set -e
echo "kernel $(uname -r)"
modprobe vhci-hcd
modprobe dummy_hcd
echo "vhci controllers: $(ls -d /sys/devices/platform/vhci_hcd.* | wc -l)"
cat /sys/devices/platform/vhci_hcd.0/nports 2>/dev/null | sed 's/^/vhci nports: /' || true
ls /sys/class/udc
{gadget}
busid=$(usbwire_udc_busid {udc})
echo "BUSID=$busid"
cat /sys/bus/usb/devices/$busid/idVendor /sys/bus/usb/devices/$busid/idProduct
usbip list -l
usbip list -l | grep -q "busid $busid ({vid:04x}:{pid:04x})"
modprobe usbip-host
usbip bind -b "$busid"
[ "$(readlink /sys/bus/usb/devices/$busid/driver)" != "" ]
basename "$(readlink /sys/bus/usb/devices/$busid/driver)"
usbipd -D
usbwire_wait_listen 3240 20
# guest -> host forward: two separate connections must both work
b1=$(timeout 20 nc {fwd} 3240 </dev/null)
b2=$(timeout 20 nc {fwd} 3240 </dev/null)
echo "banner1: $b1"
echo "banner2: $b2"
case "$b1" in USBWIRE-BANNER*) ;; *) echo "first guestfwd connection failed"; exit 3;; esac
case "$b2" in USBWIRE-BANNER*) ;; *) echo "second guestfwd connection failed"; exit 4;; esac
[ "$b1" != "$b2" ]
echo READY
usbwire_wait_signal {sig} 120
echo "host signalled"
usbip unbind -b "$busid"
dmesg | grep -iE 'usbip|vhci|dummy' | tail -n 20
echo DONE
"#,
        gadget = kernel::gadget_sourcesink_sh("zero", DUMMY_UDC),
        udc = DUMMY_UDC,
        fwd = kernel::GUESTFWD_ADDR,
        sig = SIGNAL_PORT,
    );

    let t_boot = Instant::now();
    let g = guest
        .script(&script)
        .hostfwd(3240)
        .hostfwd(SIGNAL_PORT)
        .guestfwd(banner_port)
        .timeout(Duration::from_secs(240))
        .spawn()
        .expect("spawn guest");
    if let Err(e) = g.wait_for_output("READY", Duration::from_secs(200)) {
        panic!("guest did not get ready: {e}");
    }
    let t_ready = t_boot.elapsed();
    let out = g.output();
    let busid = out
        .lines()
        .find_map(|l| l.strip_prefix("BUSID="))
        .expect("BUSID line")
        .trim()
        .to_string();

    // From the host: Debian's usbip lists the gadget exported by the guest's usbipd.
    let port = g.host_port(3240);
    let t_list = Instant::now();
    let list = Command::new("timeout")
        .args([
            "60",
            usbip.to_str().unwrap(),
            "--tcp-port",
            &port.to_string(),
        ])
        .args(["list", "-r", "127.0.0.1"])
        .output()
        .expect("run host usbip");
    let list_stdout = String::from_utf8_lossy(&list.stdout).into_owned();
    let list_stderr = String::from_utf8_lossy(&list.stderr).into_owned();
    println!(
        "host `usbip list -r` ({:.2}s):\n{list_stdout}{list_stderr}",
        t_list.elapsed().as_secs_f64()
    );
    let listed = list.status.success()
        && list_stdout.contains(&format!("{busid}:"))
        && list_stdout.contains(&format!("{vid:04x}:{pid:04x}"));

    let signalled = g.signal(SIGNAL_PORT, "go", Duration::from_secs(30));
    let result = g.wait().expect("guest run");
    let banners_served = banner.finish();

    println!("----- guest output -----\n{}", result.output);
    println!(
        "timings: boot-to-script {:.2}s (guest uptime {:.2}s), to READY {:.2}s, guest total {:.2}s, test total {:.2}s",
        result.boot_time.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
        result.guest_uptime_at_start.unwrap_or(f64::NAN),
        t_ready.as_secs_f64(),
        result.duration.as_secs_f64(),
        t_total.elapsed().as_secs_f64()
    );
    result.assert_success();
    assert!(
        listed,
        "host `usbip list -r 127.0.0.1 --tcp-port {port}` did not list {busid} \
         ({vid:04x}:{pid:04x}): status {}\nstdout:\n{list_stdout}\nstderr:\n{list_stderr}",
        list.status
    );
    signalled.expect("signal the guest");
    result.assert_output_contains("host signalled");
    result.assert_output_contains("DONE");
    assert!(banners_served >= 2, "{banners_served} banners served");
}

/// A trivial script: measures the bare boot, checks exit codes and the marker parsing.
#[test]
fn kernel_exit_code_and_files() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let out = guest
        .file("/root/data.txt", b"hello from the host\n", 0o644)
        .env("GREETING", "it's fine")
        .script("cat /root/data.txt; echo \"$GREETING\"; lsmod | head -n 3; exit 7")
        .timeout(Duration::from_secs(120))
        .run()
        .expect("guest run");
    println!(
        "trivial boot: total {:.2}s, boot-to-script {:.2}s (guest uptime {:.2}s)\n{}",
        t0.elapsed().as_secs_f64(),
        out.boot_time.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
        out.guest_uptime_at_start.unwrap_or(f64::NAN),
        out.output
    );
    assert_eq!(out.exit_code, Some(7), "{}", out.console);
    // /init also logs the exit code through /dev/kmsg, so the console must show it
    assert!(
        out.console.contains("USBWIRE-GUEST-EXIT 7"),
        "console:\n{}",
        out.console
    );
    out.assert_output_contains("hello from the host");
    out.assert_output_contains("it's fine");
}

/// The gadget snippets later tests rely on: mass storage (vfat image, seen and mounted
/// through usb-storage on the dummy host) and CDC ACM (ttyGS0 <-> ttyACM0).
#[test]
fn kernel_gadget_snippets() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let script = format!(
        r#"set -e
modprobe dummy_hcd
dd if=/dev/zero of=/tmp/disk.img bs=1M count=8 2>/dev/null
mkdosfs /tmp/disk.img >/dev/null
{ms}
busid=$(usbwire_udc_busid {udc})
echo "MS BUSID=$busid"
usbwire_wait_cmd 20 sh -c 'ls /sys/bus/usb/devices/'$busid':1.0/host*/target*/*/block/ | grep -q sd'
dev=$(ls /sys/bus/usb/devices/$busid:1.0/host*/target*/*/block/ | head -n 1)
echo "BLOCK=$dev"
usbwire_wait_path /dev/$dev 10
mount -t vfat /dev/$dev /mnt
echo hello > /mnt/hello.txt
umount /mnt
echo "MS OK"
{rm}
usbwire_wait_cmd 10 sh -c '! ls /sys/bus/usb/devices/ | grep -q "^$busid\$"'
{acm}
busid=$(usbwire_udc_busid {udc})
echo "ACM BUSID=$busid"
usbwire_wait_path /dev/ttyACM0 20
usbwire_wait_path /dev/ttyGS0 20
echo "ACM OK"
"#,
        ms = kernel::gadget_mass_storage_sh("ms", DUMMY_UDC, "/tmp/disk.img"),
        rm = kernel::gadget_remove_sh("ms"),
        acm = kernel::gadget_acm_sh("acm", DUMMY_UDC),
        udc = DUMMY_UDC,
    );
    let out = guest
        .script(&script)
        .timeout(Duration::from_secs(180))
        .run()
        .expect("guest run");
    println!(
        "gadget snippets: {:.2}s\n{}",
        out.duration.as_secs_f64(),
        out.output
    );
    out.assert_success();
    assert!(
        out.console.contains("usb-storage"),
        "console:\n{}",
        out.console
    );
    out.assert_output_contains("MS OK");
    out.assert_output_contains("ACM OK");
}

/// The hard timeout kills qemu and reports the output collected so far.
#[test]
fn kernel_timeout_kills_qemu() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let g = guest
        .script("echo sleeping; sleep 600")
        .timeout(Duration::from_secs(15))
        .spawn()
        .expect("spawn");
    let pid = g.pid().expect("qemu pid");
    g.wait_for_output("sleeping", Duration::from_secs(20))
        .expect("script started");
    match g.wait() {
        // The guest's own limit fired, not the default one.
        Err(kernel::HarnessError::Timeout { output, after, .. }) => {
            assert!(output.contains("sleeping"), "{output}");
            assert_eq!(after, Duration::from_secs(15), "the limit that fired");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} survived the timeout"
    );

    // Dropping a running guest kills qemu too.
    let g = kernel::Guest::new()
        .expect("guest")
        .script("sleep 600")
        .spawn()
        .expect("spawn");
    let pid = g.pid().expect("qemu pid");
    // Running: the guest booted and started the script.
    g.wait_for_output(kernel::START_MARKER, Duration::from_secs(120))
        .expect("script started");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(g);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu {pid} survived drop"
    );
}

/// Host binaries with their shared libraries: a multi-library Debian binary (socat) runs
/// in the guest from a path the guest does not have.
#[test]
fn kernel_host_binary() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let socat = std::path::Path::new("/usr/bin/socat");
    let out = guest
        .host_binary(socat, "/opt/bin/socat")
        .script("/opt/bin/socat -V | head -n 2")
        .timeout(Duration::from_secs(120))
        .run()
        .expect("guest run");
    out.assert_success();
    out.assert_output_contains("socat version");
}
