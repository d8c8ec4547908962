//! `usbip attach --persist` (our binary) in the Debian guest keeps our
//! `usbipd`'s keyboard attached through what ends connections, in one
//! guest run:
//!
//! a) `usbipd` killed with SIGKILL and started again on the same (the
//!    test's) listener: the keyboard comes back and typed keys arrive;
//! b) a relay between the guest and `usbipd` resets every connection and
//!    then black-holes for 10 s: vhci-hcd frees the port, the supervisor's
//!    attempts time out and are retried (`usbip port --json` says so
//!    meanwhile), and the keyboard comes back once the relay forwards;
//! c) `usbip detach -p` of the kept port stops the supervisor for good:
//!    its process is gone, and nothing is attached again although the
//!    server is there.

use std::io::Write;
use std::time::{Duration, Instant};

use usbwire_tests::daemon::Usbipd;
use usbwire_tests::image::input_events;
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::relay::Relay;
use usbwire_tests::support::output_value;

const SIG_TYPED: u16 = 5555;
const SIG_SEVERED: u16 = 5556;
const SIG_FORWARDING: u16 = 5557;

/// How long the relay black-holes in (b).
const BLACK_HOLE: Duration = Duration::from_secs(10);

const KEY_H: u16 = 35;
const KEY_E: u16 = 18;
const KEY_L: u16 = 38;
const KEY_O: u16 = 24;
const KEY_ENTER: u16 = 28;

#[test]
fn persistent_attach_survives_restart_and_outage_and_detach_stops_it() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("keyboard");
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"keyboard\"\nfifo = \"{}\"\n",
            fifo.display()
        ),
    )
    .unwrap();
    let mut daemon = Usbipd::start(
        &kernel::cargo_bin("usbipd"),
        &["--config", config.to_str().unwrap()],
        dir.path(),
    );
    let relay = Relay::start(daemon.addr()).expect("start the relay");
    let port = relay.port();

    let script = format!(
        r#"set -e
modprobe vhci-hcd
server={server}
# The guestfwd: 10.0.2.100:3240 is the relay on the host.
U=usbip-rs
# The keyboard's evdev node, once usbhid has bound it.
kbd() {{
  for n in /sys/class/input/event*; do
    if grep -q usbwire "$n/device/name" 2>/dev/null && [ -c "/dev/input/$(basename "$n")" ]; then basename "$n"; return 0; fi
  done
  return 1
}}
in_use() {{ usbip-rs port | grep -q '^Port [0-9]'; }}
no_port() {{ ! in_use; }}
json() {{ usbip-rs port --json; }}
# A field of the supervisor's object in `usbip port --json` (one device
# kept; keys come sorted, its transitions last, so the text up to the
# first closing brace holds every scalar field once).
field() {{
  json | sed -n 's/.*"persist":{{\([^}}]*\)}}.*/\1/p' | head -n 1 \
    | sed -n "s/.*\"$1\":\([^,]*\).*/\1/p" | tr -d '"'
}}
attempts_at_least() {{ [ "$(field attempts)" -ge "$1" ]; }}
dead() {{ [ ! -e /proc/$1 ] || [ "$(sed 's/.*) \(.\).*/\1/' /proc/$1/stat)" = Z ]; }}

echo "== attach --persist"
$U attach --persist -r $server -b 1-1 2>/tmp/attach.err || {{ cat /tmp/attach.err; exit 3; }}
cat /tmp/attach.err
usbwire_wait_cmd 60 kbd
pid=$(field pid)
echo "PORT1=$(field port)"
echo "PID=$pid"
usbip-rs port
echo READY-A

echo "== (a) server killed"
# The host kills usbipd now: the connection ends, vhci-hcd frees the port.
usbwire_wait_cmd 60 no_port
echo GONE-A
json
# The host starts usbipd again: the supervisor attaches the keyboard again.
usbwire_wait_cmd 120 kbd
echo KBD-BACK-A
ev=$(kbd)
cat "/dev/input/$ev" > /tmp/events &
catpid=$!
usbwire_wait_cmd 20 sh -c "ls -l /proc/$catpid/fd | grep -q /dev/input/$ev"
echo "PORT2=$(field port)"
echo KBD-READY-A
usbwire_wait_signal {sig_typed} 120
usbwire_wait_cmd 60 sh -c 'od -An -tx1 -v -w24 /tmp/events | grep -q " 01 00 1c 00 00 00 00 00$"' || echo "no release of Enter seen"
kill $catpid || true
echo EV-BEGIN
od -An -tx1 -v /tmp/events
echo EV-END
[ "$(field pid)" = "$pid" ] || {{ echo "another supervisor: $(field pid)"; exit 4; }}

echo "== (b) outage"
a0=$(field attempts)
echo READY-B
usbwire_wait_signal {sig_severed} 120
# The relay reset the connection: vhci-hcd frees the port.
usbwire_wait_cmd 60 no_port
echo PORT-FREED-B
# Two more attempts, each timing out in the black hole; the supervisor
# answers for itself meanwhile.
usbwire_wait_cmd 60 attempts_at_least $((a0 + 2))
json
echo RETRIED-B
usbwire_wait_signal {sig_forwarding} 120
usbwire_wait_cmd 120 kbd
echo KBD-BACK-B
json

echo "== (c) detach"
echo "--- supervisor log"
cat /var/run/vhci_hcd/persist/*.log || true
echo "---"
p=$(field port)
$U detach -p "$p"
dead $pid || {{ echo "supervisor $pid still running after detach"; exit 5; }}
echo SUPERVISOR-GONE
no_port || {{ usbip-rs port; exit 6; }}
[ -z "$(ls /var/run/vhci_hcd/persist/ 2>/dev/null | grep json)" ] || {{ ls -l /var/run/vhci_hcd/persist/; exit 7; }}
# The server is there (the device is exported, and free)...
$U list -r $server | grep -q ' 1-1: '
# ... and nothing attaches it any more: no process is left that could.
ps | grep -v grep | grep -q 'usbip-rs.*--persist' && {{ ps; exit 8; }}
no_port
echo "PORTS-AFTER=[$(json)]"
echo DETACHED-C
dmesg | grep -iE 'vhci|usbip' | tail -n 30
"#,
        server = GUESTFWD_ADDR,
        sig_typed = SIG_TYPED,
        sig_severed = SIG_SEVERED,
        sig_forwarding = SIG_FORWARDING,
    );

    let g = guest
        .script(&script)
        .host_binary(&kernel::cargo_bin("usbip"), "/usr/bin/usbip-rs")
        .guestfwd(port)
        .hostfwd(SIG_TYPED)
        .hostfwd(SIG_SEVERED)
        .hostfwd(SIG_FORWARDING)
        .timeout(Duration::from_secs(600))
        .spawn()
        .expect("boot the guest");
    let fail = |what: &str, e: &dyn std::fmt::Display, daemon: &Usbipd| -> ! {
        panic!("{what}: {e}\n--- usbipd log ---\n{}", daemon.log_text())
    };
    g.wait_for_output("READY-A", Duration::from_secs(360))
        .unwrap_or_else(|e| fail("attach --persist", &e, &daemon));

    // (a) SIGKILL, then the same listener again.
    daemon.kill();
    g.wait_for_output("GONE-A", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("port freed after the kill", &e, &daemon));
    daemon.restart();
    let restarted = Instant::now();
    g.wait_for_output("KBD-BACK-A", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("keyboard back after the restart", &e, &daemon));
    let back_a = restarted.elapsed();
    g.wait_for_output("KBD-READY-A", Duration::from_secs(60))
        .unwrap_or_else(|e| fail("reading the keyboard", &e, &daemon));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the keyboard FIFO");
        f.write_all(b"hello\n").unwrap();
    }
    g.signal(SIG_TYPED, "typed", Duration::from_secs(30))
        .expect("signal the guest");

    // (b) reset both sides, black-hole, forward again.
    g.wait_for_output("READY-B", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("keys typed after the restart", &e, &daemon));
    let forwarded_before = relay.forwarding();
    relay.sever_and_black_hole();
    let severed = Instant::now();
    g.signal(SIG_SEVERED, "severed", Duration::from_secs(30))
        .expect("signal the guest");
    g.wait_for_output("RETRIED-B", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("attempts during the black hole", &e, &daemon));
    // The outage lasts its full length, whatever the guest saw first.
    if let Some(rest) = BLACK_HOLE.checked_sub(severed.elapsed()) {
        std::thread::sleep(rest);
    }
    let black_holed = relay.accepted_black_holed();
    relay.forward();
    let forwarding = Instant::now();
    g.signal(SIG_FORWARDING, "forwarding", Duration::from_secs(30))
        .expect("signal the guest");
    g.wait_for_output("KBD-BACK-B", Duration::from_secs(120))
        .unwrap_or_else(|e| fail("keyboard back after the outage", &e, &daemon));
    let back_b = forwarding.elapsed();

    let out = g.wait().expect("guest run");
    if !out.success() {
        panic!(
            "guest failed\n--- usbipd log ---\n{}\n{}",
            daemon.log_text(),
            out.output
        );
    }
    let o = &out.output;

    // (a) "hello\n" typed after the restart arrives, in order.
    let presses: Vec<u16> = input_events(o)
        .into_iter()
        .filter(|(t, _, v)| *t == 1 && *v == 1)
        .map(|(_, c, _)| c)
        .collect();
    assert_eq!(
        presses,
        vec![KEY_H, KEY_E, KEY_L, KEY_L, KEY_O, KEY_ENTER],
        "key presses after the restart; guest:\n{o}"
    );
    assert!(!output_value(o, "PORT2=").is_empty(), "{o}");

    // (b) the relayed connection was reset, and the supervisor kept trying
    // into the black hole.
    assert!(
        forwarded_before >= 1,
        "nothing was relayed before the outage"
    );
    assert!(
        black_holed >= 2,
        "{black_holed} connection(s) reached the black hole; guest:\n{o}"
    );
    let during = &o[o.find("PORT-FREED-B").unwrap()..o.find("RETRIED-B").unwrap()];
    assert!(
        during.contains("\"port\":null") && during.contains("did not answer the import"),
        "port --json during the outage: {during}"
    );

    // (c) detached for good.
    assert!(
        o.contains("SUPERVISOR-GONE") && o.contains("DETACHED-C"),
        "{o}"
    );
    assert_eq!(output_value(o, "PORTS-AFTER="), "[[]]");

    println!(
        "keyboard back {:.2}s after usbipd's restart, {:.2}s after the relay forwarded again; \
         test took {:.1}s (guest {:.1}s)",
        back_a.as_secs_f64(),
        back_b.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        out.duration.as_secs_f64()
    );
}
