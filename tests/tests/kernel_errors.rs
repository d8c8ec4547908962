//! Endpoint errors through the real kernel: a READ that spans bad LBAs on
//! the emulated disk fails the way a real disk's medium error does (EIO or
//! ENODATA, as Linux reports a medium error), with
//! no USB reset and no timeout, and the disk keeps working.

use std::time::Duration;

use usbwire_tests::daemon::Usbipd;
use usbwire_tests::kernel::{self, GUESTFWD_ADDR};
use usbwire_tests::support::{output_value, sha256_hex};

const MIB: usize = 1024 * 1024;
/// LBAs [8200, 8208): inside the fifth MiB of the disk.
const BAD: (u64, u64) = (8200, 8208);

/// Distinct contents everywhere (xorshift), so that reading the wrong
/// block can never match by accident.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn medium_error_is_a_clean_eio_without_reset_or_timeout() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let data = pattern(16 * MIB);
    std::fs::write(&image, &data).unwrap();
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nkind = \"mass-storage\"\nimage = \"{}\"\nbad_lbas = [{}, {}]\n",
            image.display(),
            BAD.0,
            BAD.1
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
usbip attach -r {server} -b 1-1
dev=""
for i in $(seq 1 300); do [ -b /dev/sda ] && {{ dev=/dev/sda; break; }}; sleep 0.1; done
[ -n "$dev" ]
dmesg -c > /dev/null
# 1 MiB at 4 MiB spans LBAs 8192..10240, which include the bad ones.
if dd if=$dev of=/dev/null bs=1M count=1 skip=4 iflag=direct 2> /tmp/dd.err; then
  echo "BAD-READ=succeeded"
else
  echo "BAD-READ=failed"
fi
cat /tmp/dd.err
echo "== dmesg after the bad read"
dmesg
echo "== end dmesg"
echo "GOOD2=$(dd if=$dev bs=1M count=1 skip=2 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "GOOD5=$(dd if=$dev bs=1M count=1 skip=5 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "LEAD=$(dd if=$dev bs=512 count=8 skip=8192 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
usbip detach -p 0
"#,
        server = GUESTFWD_ADDR
    );
    let out = guest
        .script(&script)
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
    let get = |k: &str| output_value(o, k);
    assert_eq!(
        get("BAD-READ="),
        "failed",
        "a read across bad LBAs must fail:\n{o}"
    );
    // Linux turns a medium error into BLK_STS_MEDIUM, which reaches user
    // space as ENODATA ("No data available"); other paths give EIO.
    assert!(
        o.contains("Input/output error") || o.contains("No data available"),
        "dd must fail with an I/O error:\n{o}"
    );
    let dmesg = &o[o.find("== dmesg after").unwrap()..o.find("== end dmesg").unwrap()];
    assert!(
        dmesg.contains("Medium Error") && dmesg.contains("Unrecovered read error"),
        "dmesg lacks the medium-error sense:\n{dmesg}"
    );
    for bad in ["reset", "timing out", "timed out", "abort"] {
        assert!(
            !dmesg.to_lowercase().contains(bad),
            "dmesg shows a {bad}:\n{dmesg}"
        );
    }
    assert_eq!(
        get("GOOD2="),
        sha256_hex(&data[2 * MIB..3 * MIB]),
        "good blocks before differ from the image"
    );
    assert_eq!(
        get("GOOD5="),
        sha256_hex(&data[5 * MIB..6 * MIB]),
        "good blocks after differ from the image"
    );
    // The good blocks just before the bad range, read alone, succeed.
    assert_eq!(get("LEAD="), sha256_hex(&data[8192 * 512..8200 * 512]));
}
