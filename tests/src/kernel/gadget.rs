//! Shell snippets (busybox sh) that build USB gadgets through configfs/libcomposite on the
//! guest's dummy UDC, for tests that need a real kernel-side USB device to export with
//! usbip-host. Every snippet is self-contained (only needs `modprobe libcomposite`, done
//! inside) and can be pasted into a guest script; they stop the script with `exit 90`
//! when a step fails (so use them at top level, not in a subshell you want to survive).
//!
//! Typical use:
//!
//! ```text
//! modprobe dummy_hcd
//! {gadget_sourcesink_sh("zero", DUMMY_UDC)}
//! busid=$(usbwire_udc_busid dummy_udc.0)   # from /usbwire/lib.sh, e.g. 17-1
//! ```

/// The UDC created by `modprobe dummy_hcd` (one instance, the default `num=1`).
pub const DUMMY_UDC: &str = "dummy_udc.0";

/// Vendor/product of the SourceSink gadget (the ids of Linux's g_zero "Gadget Zero").
pub const SOURCESINK_IDS: (u16, u16) = (0x0525, 0xa4a0);
/// Vendor/product of the mass-storage gadget (Linux's g_mass_storage ids).
pub const MASS_STORAGE_IDS: (u16, u16) = (0x0525, 0xa4a5);
/// Vendor/product of the ACM gadget (Linux's g_serial ids in CDC ACM mode).
pub const ACM_IDS: (u16, u16) = (0x0525, 0xa4a7);
/// Vendor/product of the HID gadget (Linux's g_hid ids).
pub const HID_IDS: (u16, u16) = (0x0525, 0xa4ac);

/// A boot keyboard's report descriptor (the HID 1.11 appendix example, as
/// Linux's gadget HID documentation uses it): 8-byte input reports.
const KEYBOARD_REPORT_DESC: [u8; 63] = [
    0x05, 0x01, 0x09, 0x06, 0xa1, 0x01, 0x05, 0x07, 0x19, 0xe0, 0x29, 0xe7, 0x15, 0x00, 0x25, 0x01,
    0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x03, 0x95, 0x05, 0x75, 0x01,
    0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91, 0x03, 0x95, 0x06,
    0x75, 0x08, 0x15, 0x00, 0x25, 0x65, 0x05, 0x07, 0x19, 0x00, 0x29, 0x65, 0x81, 0x00, 0xc0,
];

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The common prologue: create gadget `name` with ids and strings and one configuration.
fn gadget_begin(name: &str, ids: (u16, u16), product: &str, class: Option<u8>) -> String {
    let g = format!("/sys/kernel/config/usb_gadget/{name}");
    let mut s = String::new();
    s.push_str(&format!(
        "# --- usbwire gadget {name} ---\n\
         modprobe libcomposite || exit 90\n\
         [ -d /sys/kernel/config/usb_gadget ] || {{ echo 'usbwire: configfs usb_gadget missing' >&2; exit 90; }}\n\
         G={g}\n\
         mkdir \"$G\" || exit 90\n\
         echo 0x{:04x} > \"$G/idVendor\"\n\
         echo 0x{:04x} > \"$G/idProduct\"\n\
         echo 0x0100 > \"$G/bcdDevice\"\n\
         echo 0x0200 > \"$G/bcdUSB\"\n",
        ids.0, ids.1
    ));
    if let Some(c) = class {
        s.push_str(&format!("echo 0x{c:02x} > \"$G/bDeviceClass\"\n"));
    }
    s.push_str(&format!(
        "mkdir \"$G/strings/0x409\"\n\
         echo usbwire-{name} > \"$G/strings/0x409/serialnumber\"\n\
         echo usbwire > \"$G/strings/0x409/manufacturer\"\n\
         echo {} > \"$G/strings/0x409/product\"\n\
         mkdir \"$G/configs/c.1\"\n\
         mkdir \"$G/configs/c.1/strings/0x409\"\n\
         echo {} > \"$G/configs/c.1/strings/0x409/configuration\"\n\
         echo 120 > \"$G/configs/c.1/MaxPower\"\n",
        quote(product),
        quote(&format!("{product} config"))
    ));
    s
}

/// Link function `func` (e.g. `SourceSink.0`) into the configuration (must exist).
fn gadget_link(func: &str) -> String {
    format!("ln -s \"$G/functions/{func}\" \"$G/configs/c.1/\" || exit 90\n")
}

fn gadget_bind(udc: &str) -> String {
    format!(
        "echo {udc} > \"$G/UDC\" || {{ echo 'usbwire: binding to UDC {udc} failed' >&2; ls /sys/class/udc >&2; exit 90; }}\n\
         # --- end gadget ---\n"
    )
}

/// A SourceSink (g_zero style, `usb_f_ss_lb`) gadget named `name` bound to `udc`.
/// Vendor-specific interface with bulk IN (source) / bulk OUT (sink) endpoints;
/// the host-side `usbtest` driver can exercise it.
pub fn gadget_sourcesink_sh(name: &str, udc: &str) -> String {
    let mut s = gadget_begin(name, SOURCESINK_IDS, "Gadget Zero", None);
    s.push_str("mkdir \"$G/functions/SourceSink.0\" || exit 90\n");
    s.push_str(&gadget_link("SourceSink.0"));
    s.push_str(&gadget_bind(udc));
    s
}

/// A mass-storage gadget (`usb_f_mass_storage`) named `name` exporting `backing_file`
/// (a regular file or block device in the guest; create one e.g. with
/// `dd if=/dev/zero of=/tmp/disk.img bs=1M count=16`) as a single removable, writable LUN.
pub fn gadget_mass_storage_sh(name: &str, udc: &str, backing_file: &str) -> String {
    let mut s = gadget_begin(name, MASS_STORAGE_IDS, "Mass Storage", None);
    s.push_str("mkdir \"$G/functions/mass_storage.0\" || exit 90\n");
    s.push_str("echo 1 > \"$G/functions/mass_storage.0/stall\"\n");
    s.push_str("echo 1 > \"$G/functions/mass_storage.0/lun.0/removable\"\n");
    s.push_str("echo 0 > \"$G/functions/mass_storage.0/lun.0/ro\"\n");
    s.push_str(&format!(
        "echo {} > \"$G/functions/mass_storage.0/lun.0/file\" || exit 90\n",
        quote(backing_file)
    ));
    s.push_str(&gadget_link("mass_storage.0"));
    s.push_str(&gadget_bind(udc));
    s
}

/// A CDC ACM serial gadget (`usb_f_acm`) named `name`; the guest's gadget side is
/// `/dev/ttyGS0`, the host side (cdc-acm) appears as `/dev/ttyACM0`.
pub fn gadget_acm_sh(name: &str, udc: &str) -> String {
    // bDeviceClass 0x02 (CDC) like g_serial; IAD-less single function.
    let mut s = gadget_begin(name, ACM_IDS, "Serial", Some(0x02));
    s.push_str("mkdir \"$G/functions/acm.GS0\" || exit 90\n");
    s.push_str(&gadget_link("acm.GS0"));
    s.push_str(&gadget_bind(udc));
    s
}

/// A HID boot keyboard gadget (`usb_f_hid`) named `name`; the host side
/// (usbhid) gets a `/dev/hidraw*` node and an input device.
pub fn gadget_hid_sh(name: &str, udc: &str) -> String {
    let mut s = gadget_begin(name, HID_IDS, "Keyboard", None);
    let f = "\"$G/functions/hid.usb0\"";
    s.push_str(&format!("mkdir {f} || exit 90\n"));
    s.push_str(&format!("echo 1 > {f}/protocol\n"));
    s.push_str(&format!("echo 1 > {f}/subclass\n"));
    s.push_str(&format!("echo 8 > {f}/report_length\n"));
    // Octal escapes: the one binary notation every printf(1) has.
    let desc: String = KEYBOARD_REPORT_DESC
        .iter()
        .map(|b| format!("\\{b:03o}"))
        .collect();
    s.push_str(&format!("printf '{desc}' > {f}/report_desc || exit 90\n"));
    s.push_str(&gadget_link("hid.usb0"));
    s.push_str(&gadget_bind(udc));
    s
}

/// Unbind and remove gadget `name` (undoes the snippets above; best effort).
pub fn gadget_remove_sh(name: &str) -> String {
    let g = format!("/sys/kernel/config/usb_gadget/{name}");
    format!(
        "G={g}\n\
         if [ -d \"$G\" ]; then\n\
         \techo '' > \"$G/UDC\" 2>/dev/null\n\
         \tfor l in \"$G\"/configs/c.1/*.*; do [ -L \"$l\" ] && rm \"$l\"; done\n\
         \trmdir \"$G\"/configs/c.1/strings/0x409 \"$G\"/configs/c.1 2>/dev/null\n\
         \tfor f in \"$G\"/functions/*; do [ -d \"$f\" ] && rmdir \"$f\"; done\n\
         \trmdir \"$G\"/strings/0x409 \"$G\" 2>/dev/null\n\
         fi\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snippets_mention_their_functions() {
        assert!(gadget_sourcesink_sh("z", DUMMY_UDC).contains("SourceSink.0"));
        let ms = gadget_mass_storage_sh("m", DUMMY_UDC, "/tmp/it's.img");
        assert!(ms.contains("lun.0/file"));
        assert!(ms.contains(r"'/tmp/it'\''s.img'"));
        assert!(gadget_acm_sh("a", DUMMY_UDC).contains("acm.GS0"));
        let hid = gadget_hid_sh("h", DUMMY_UDC);
        assert!(hid.contains("hid.usb0"));
        // 0x05 0x01 ... 0xc0 in octal.
        assert!(hid.contains(r"printf '\005\001\011\006"));
        assert!(hid.contains(r"\300' >"));
        assert!(gadget_remove_sh("a").contains("UDC"));
    }
}
