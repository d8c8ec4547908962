//! The kernel's own USB test driver (`usbtest`) judges usbwire: in one Debian guest,
//! usbtest's tests 0..=29 run against a configfs SourceSink gadget on dummy_hcd (the
//! baseline: what a Linux Gadget Zero does on a local bus) and against usbwire's test
//! device, exported by our `usbipd --demo` on the host and attached through the real
//! vhci-hcd with Debian's C `usbip attach`. Every test that passes on the gadget must
//! pass through usbwire, and so must the ISO tests, which dummy_hcd cannot run.
//! Then usbtest's chapter-9 tests (9 and 10) run against every demo device, bound
//! through usbtest's `vendor=`/`product=` module parameters.

use std::collections::BTreeMap;
use std::time::Duration;

use usbwire_tests::daemon::Usbipd;
use usbwire_tests::kernel::usbtest::{self, Outcome, TestResult, ISO_TESTS, RUNNER_GUEST_PATH};
use usbwire_tests::kernel::{self, gadget_sourcesink_sh, DUMMY_UDC, GUESTFWD_ADDR};

/// The same parameters for both targets: iterations, length, vary, sglen (testusb's
/// `-c -s -v -g`).
const PARAMS: &str = "-c 100 -s 4096 -v 512 -g 32";

/// The demo devices (`usbipd --demo`): busid, vendor, product, what it is.
const DEMO_DEVICES: [(&str, u16, u16, &str); 4] = [
    ("1-1", 0x0525, 0xa4a5, "disk"),
    ("1-2", 0x0525, 0xa4ac, "keyboard"),
    ("1-3", 0x0525, 0xa4a7, "serial"),
    ("1-4", 0x0525, 0xa4a0, "test-device"),
];

/// The busid of the test device in the demo set.
const TEST_DEVICE_BUSID: &str = "1-4";

fn script() -> String {
    let mut s = format!(
        r#"set -e
server={server}
# Wait for the one device attached through vhci to be configured; print its busid.
vhci_busid() {{
	usbwire_wait_cmd 30 sh -c 'ls /sys/devices/platform/vhci_hcd.0/usb*/*-*/bConfigurationValue' || return 1
	_d=$(dirname "$(ls /sys/devices/platform/vhci_hcd.0/usb*/*-*/bConfigurationValue | head -n 1)")
	usbwire_wait_cmd 30 sh -c "[ -n \"\$(cat $_d/bConfigurationValue)\" ]" || return 1
	basename "$_d"
}}
detach_all() {{
	for p in $(usbip port | sed -n 's/^Port \([0-9]*\):.*/\1/p'); do usbip detach -p "$p"; done
	usbwire_wait_cmd 30 sh -c '! ls /sys/devices/platform/vhci_hcd.0/usb*/*-*/bConfigurationValue'
}}
# Load usbtest (with module parameters ARGS) afresh and wait until it holds BUSID.
usbtest_for() {{
	_busid=$1; shift
	rmmod usbtest 2>/dev/null || true
	modprobe usbtest "$@"
	usbwire_wait_cmd 30 sh -c "ls -d /sys/bus/usb/drivers/usbtest/$_busid:*"
}}
modprobe dummy_hcd
modprobe vhci-hcd

echo "== usbtest: SourceSink gadget on dummy_hcd"
"#,
        server = GUESTFWD_ADDR
    );
    s.push_str(&gadget_sourcesink_sh("zero", DUMMY_UDC));
    s.push_str(&format!(
        r#"direct=$(usbwire_udc_busid {DUMMY_UDC} 30)
usbtest_for "$direct"
dmesg | grep usbtest | tail -n 3
usbtest-run -b "$direct" -l direct {PARAMS} || echo "runner: direct had failures"

echo "== usbtest: usbwire test device through vhci"
usbip attach -r $server -b {TEST_DEVICE_BUSID}
vhci=$(vhci_busid)
usbtest_for "$vhci"
dmesg | grep usbtest | tail -n 3
usbtest-run -b "$vhci" -l usbwire {PARAMS} || echo "runner: usbwire had failures"
detach_all
"#
    ));
    for (busid, vid, pid, name) in DEMO_DEVICES {
        s.push_str(&format!(
            r#"
echo "== usbtest chapter 9: {name} ({busid}, {vid:04x}:{pid:04x}) through vhci"
usbip attach -r $server -b {busid}
dev=$(vhci_busid)
usbtest_for "$dev" vendor=0x{vid:04x} product=0x{pid:04x}
usbtest-run -b "$dev" -l ch9-{name} -t 9,10 {PARAMS} || echo "runner: ch9-{name} had failures"
detach_all
"#
        ));
    }
    s.push_str("echo USBTEST-DONE\n");
    s
}

fn column(
    output: &str,
    label: &str,
    expected: usize,
    context: &dyn Fn() -> String,
) -> BTreeMap<u8, TestResult> {
    let r = usbtest::parse(output, label).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert_eq!(
        r.len(),
        expected,
        "the runner reported {} of {expected} tests for {label}\n{}",
        r.len(),
        context()
    );
    r
}

#[test]
fn usbtest_passes_through_usbwire_wherever_it_passes_on_a_local_gadget() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let Some(runner) = kernel::or_skip(usbtest::runner()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = kernel::free_port();
    let mut daemon = Usbipd::start(&kernel::cargo_bin("usbipd"), &["--demo"], port, dir.path());

    let out = guest
        .script(&script())
        .host_binary(&runner, RUNNER_GUEST_PATH)
        .guestfwd(port)
        // Class drivers would claim the demo devices before usbtest could.
        .module_autoload(false)
        // usbtest's test 11 retries usb_unlink_urb in a loop that never sleeps while
        // vhci's rx thread, which holds the URB, waits for the rest of its
        // RET_SUBMIT: with one CPU and a kernel without forced preemption
        // (Debian's), that thread never runs again.
        .cpus(2)
        .timeout(Duration::from_secs(900))
        .run()
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    let context = || {
        format!(
            "--- guest ---\n{}\n--- kernel log (tail) ---\n{}\n--- usbipd log (tail) ---\n{}",
            out.output,
            tail(&out.console, 80),
            tail(&daemon.log_text(), 80)
        )
    };
    if !out.success() || !out.output.contains("USBTEST-DONE") {
        panic!("guest script failed ({:?})\n{}", out.exit_code, context());
    }

    let all = usize::from(usbtest::TEST_CASES);
    let direct = column(&out.output, "direct", all, &context);
    let usbwire = column(&out.output, "usbwire", all, &context);
    println!(
        "usbtest {PARAMS}, tests 0..=29 (guest {:.0} s):\n{}",
        out.duration.as_secs_f64(),
        usbtest::table(&[
            ("gadget on dummy_hcd", &direct),
            ("usbwire through vhci", &usbwire)
        ])
    );
    let mut ch9 = Vec::new();
    for (_, _, _, name) in DEMO_DEVICES {
        let label = format!("ch9-{name}");
        ch9.push((label.clone(), column(&out.output, &label, 2, &context)));
    }
    let ch9_columns: Vec<(&str, &BTreeMap<u8, TestResult>)> =
        ch9.iter().map(|(l, r)| (l.as_str(), r)).collect();
    println!(
        "usbtest chapter-9 tests through vhci, every demo device:\n{}",
        usbtest::table(&ch9_columns)
    );

    let mut failures = Vec::new();
    for (test, d) in &direct {
        let w = &usbwire[test];
        if d.outcome == Outcome::Passed && w.outcome != Outcome::Passed {
            failures.push(format!(
                "test {test}: passes on the gadget, through usbwire {}",
                w.outcome
            ));
        } else if matches!(w.outcome, Outcome::Failed { .. }) {
            // A test the gadget does not offer (interrupt endpoints) must not
            // fail either: the device should not advertise what it cannot do.
            failures.push(format!(
                "test {test}: {} on the gadget, through usbwire {}",
                d.outcome, w.outcome
            ));
        }
    }
    for test in ISO_TESTS {
        if usbwire[&test].outcome != Outcome::Passed {
            failures.push(format!(
                "ISO test {test} through usbwire: {}",
                usbwire[&test].outcome
            ));
        }
    }
    for (label, results) in &ch9 {
        for (test, r) in results {
            if r.outcome != Outcome::Passed {
                failures.push(format!("{label} test {test}: {}", r.outcome));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "usbtest through usbwire:\n  {}\n{}",
        failures.join("\n  "),
        context()
    );
    assert!(daemon.stop(), "usbipd did not exit cleanly");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
