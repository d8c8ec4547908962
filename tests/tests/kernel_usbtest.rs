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
/// `-c -s -v -g`). Under TCG a round trip through vhci, slirp and our server costs
/// milliseconds, and tests 9, 12 and 13 make thousands: 100 iterations took the
/// usbwire run alone past three minutes, so 40.
const PARAMS: &str = "-c 40 -s 4096 -v 512 -g 32";

/// Tests 9 and 10 on every demo device: control requests only, the same ones each
/// iteration, so fewer iterations say as much.
const CH9_PARAMS: &str = "-c 20 -s 4096 -v 512 -g 32";

/// usbtest's tests for an altsetting with isochronous endpoints, as a runner list.
const ISO_LIST: &str = "15,16,22,23";

/// The demo devices (`usbipd --demo`): busid, vendor, product, what it is.
const DEMO_DEVICES: [(&str, u16, u16, &str); 4] = [
    ("1-1", 0x0525, 0xa4a5, "disk"),
    ("1-2", 0x0525, 0xa4ac, "keyboard"),
    ("1-3", 0x0525, 0xa4a7, "serial"),
    ("1-4", 0x0525, 0xa4a0, "test-device"),
];

/// The busid of the test device in the demo set.
const TEST_DEVICE_BUSID: &str = "1-4";

/// Printed instead of results when usbtest finds no interface to test with `alt=1`.
const UNBOUND: &str = "USBTEST-UNBOUND";

/// usbtest binds Gadget Zero by the endpoints of its first altsetting with a bulk
/// pair (altsetting 0, tests 0..=29 but ISO), and only with `alt=1` looks at
/// altsetting 1, where f_sourcesink (and our test device) add the ISO endpoints.
/// So each target runs twice: 0..=29 by default, then the ISO tests with `alt=1`.
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
# usbtest_for BUSID [MODULE PARAMETERS]: load usbtest afresh; fails unless it binds
# an interface of BUSID. Probing is synchronous with the driver's registration, and
# interface 0 exists first, so a short wait is enough.
usbtest_for() {{
	_busid=$1; shift
	usbwire_wait_path /sys/bus/usb/devices/$_busid:1.0 30
	rmmod usbtest 2>/dev/null || true
	modprobe usbtest "$@"
	usbwire_wait_cmd 5 sh -c "ls -d /sys/bus/usb/drivers/usbtest/$_busid:*"
}}
# suite LABEL BUSID: tests 0..=29, then the ISO tests with alt=1.
suite() {{
	usbtest_for "$2"
	dmesg | grep 'usbtest.*tests' | tail -n 2
	usbtest-run -b "$2" -l "$1" {PARAMS} || echo "runner: $1 had failures"
	if usbtest_for "$2" alt=1; then
		dmesg | grep 'usbtest.*tests' | tail -n 2
		usbtest-run -b "$2" -l "$1-alt1" -t {ISO_LIST} {PARAMS} || echo "runner: $1-alt1 had failures"
	else
		echo "{UNBOUND} $1-alt1: usbtest alt=1 found no interface to test"
		dmesg | grep usbtest | tail -n 3
	fi
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
suite direct "$direct"

echo "== usbtest: usbwire test device through vhci"
usbip attach -r $server -b {TEST_DEVICE_BUSID}
vhci=$(vhci_busid)
suite usbwire "$vhci"
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
usbtest-run -b "$dev" -l ch9-{name} -t 9,10 {CH9_PARAMS} || echo "runner: ch9-{name} had failures"
detach_all
"#
        ));
    }
    s.push_str("echo USBTEST-DONE\n");
    s
}

/// The runner's results for `label`: `expected` tests, or none when the script
/// says usbtest did not bind.
fn column(
    output: &str,
    label: &str,
    expected: usize,
    context: &dyn Fn() -> String,
) -> BTreeMap<u8, TestResult> {
    let r = usbtest::parse(output, label).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let unbound = output.contains(&format!("{UNBOUND} {label}:"));
    assert!(
        r.len() == expected || (unbound && r.is_empty()),
        "the runner reported {} of {expected} tests for {label}\n{}",
        r.len(),
        context()
    );
    r
}

/// The kernel log lines that tell why a usbtest test failed (usbtest's own, vhci's),
/// without the floods of the unlink tests (usbtest's "unlink retry", vhci's
/// "unlink->seqnum" and "already given back").
fn usbtest_kernel_lines(console: &str) -> String {
    const FLOODS: [&str; 3] = ["unlink retry", "unlink->seqnum", "already given back"];
    let mut left_out = 0;
    let lines: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("usbtest") || l.contains("vhci"))
        .filter(|l| {
            let flood = FLOODS.iter().any(|f| l.contains(f));
            left_out += usize::from(flood);
            !flood
        })
        .collect();
    format!(
        "{}\n({left_out} lines of the unlink tests left out)",
        lines[lines.len().saturating_sub(200)..].join("\n")
    )
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
    let mut daemon = Usbipd::start(&kernel::cargo_bin("usbipd"), &["--demo"], dir.path());

    let out = guest
        .script(&script())
        .host_binary(&runner, RUNNER_GUEST_PATH)
        .guestfwd(daemon.addr().port())
        // Class drivers would claim the demo devices before usbtest could.
        .module_autoload(false)
        // usbtest's test 11 retries usb_unlink_urb without sleeping while vhci
        // answers -EIDRM: its rx thread has taken the URB and waits for the rest
        // of the RET_SUBMIT. With one CPU and Debian's voluntary preemption that
        // thread never runs again (seen: 700 s of "unlink retry").
        .cpus(2)
        .timeout(Duration::from_secs(480))
        .run()
        .unwrap_or_else(|e| panic!("{e}\n--- usbipd log ---\n{}", daemon.log_text()));
    let context = || {
        format!(
            "--- guest ---\n{}\n--- kernel log: usbtest and vhci ---\n{}\n--- usbipd log (tail) ---\n{}",
            out.output,
            usbtest_kernel_lines(&out.console),
            tail(&daemon.log_text(), 80)
        )
    };
    if !out.success() || !out.output.contains("USBTEST-DONE") {
        panic!("guest script failed ({:?})\n{}", out.exit_code, context());
    }

    let all = usize::from(usbtest::TEST_CASES);
    let iso = ISO_TESTS.len();
    let direct = column(&out.output, "direct", all, &context);
    let usbwire = column(&out.output, "usbwire", all, &context);
    let direct_iso = column(&out.output, "direct-alt1", iso, &context);
    let usbwire_iso = column(&out.output, "usbwire-alt1", iso, &context);
    let mut ch9 = Vec::new();
    for (_, _, _, name) in DEMO_DEVICES {
        let label = format!("ch9-{name}");
        ch9.push((label.clone(), column(&out.output, &label, 2, &context)));
    }
    let ch9_columns: Vec<(&str, &BTreeMap<u8, TestResult>)> =
        ch9.iter().map(|(l, r)| (l.as_str(), r)).collect();
    let tables = format!(
        "usbtest {PARAMS}, tests 0..=29, usbtest's default altsetting choice (guest {:.0} s):\n{}\n\
         usbtest alt=1 {PARAMS}, the ISO tests (\"-\": usbtest found no altsetting 1):\n{}\n\
         usbtest {CH9_PARAMS}, tests 9 and 10 through vhci, every demo device:\n{}",
        out.duration.as_secs_f64(),
        usbtest::table(&[
            ("gadget on dummy_hcd", &direct),
            ("usbwire through vhci", &usbwire)
        ]),
        usbtest::table(&[
            ("gadget on dummy_hcd", &direct_iso),
            ("usbwire through vhci", &usbwire_iso)
        ]),
        usbtest::table(&ch9_columns)
    );
    println!("{tables}");
    // A passing test's output is captured: the tables of the last run stay here.
    let saved = kernel::assets::target_dir().join("kernel-usbtest-tables.txt");
    std::fs::write(&saved, &tables).unwrap_or_else(|e| panic!("writing {}: {e}", saved.display()));

    let mut failures = Vec::new();
    for (alt, direct, usbwire) in [
        ("", &direct, &usbwire),
        (" (alt=1)", &direct_iso, &usbwire_iso),
    ] {
        for (test, w) in usbwire {
            let d = direct.get(test).map(|d| &d.outcome);
            if d == Some(&Outcome::Passed) && w.outcome != Outcome::Passed {
                failures.push(format!(
                    "test {test}{alt}: passes on the gadget, through usbwire {}",
                    w.outcome
                ));
            } else if matches!(w.outcome, Outcome::Failed { .. }) {
                // A test the gadget does not run must not fail either: the device
                // should not advertise what it cannot do.
                failures.push(format!("test {test}{alt}: through usbwire {}", w.outcome));
            }
        }
    }
    // (A failing ISO test is reported above.)
    for test in ISO_TESTS {
        match usbwire_iso.get(&test).map(|r| &r.outcome) {
            Some(Outcome::NotApplicable) => {
                failures.push(format!("ISO test {test} through usbwire: n/a"))
            }
            None => failures.push(format!(
                "ISO test {test} through usbwire: usbtest alt=1 found no ISO altsetting"
            )),
            Some(_) => {}
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
