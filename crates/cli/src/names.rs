//! Vendor, product and class names, worded as the C usbip tools word them
//! (`usbip_names_get_product` and `usbip_names_get_class` in names.c), so
//! that scripts parsing either tool's output work with both.

use usb_ids::FromId;

/// `"Vendor : Product (vvvv:pppp)"`.
pub fn product(vendor: u16, product: u16) -> String {
    let v = usb_ids::Vendor::from_id(vendor);
    let vend = v.map(|v| v.name()).unwrap_or("unknown vendor");
    let prod = usb_ids::Device::from_vid_pid(vendor, product)
        .map(|d| d.name())
        .unwrap_or("unknown product");
    format!("{vend} : {prod} ({vendor:04x}:{product:04x})")
}

/// `"Class / Subclass / Protocol (cc/ss/pp)"`.
pub fn class(class: u8, subclass: u8, protocol: u8) -> String {
    if class == 0 && subclass == 0 && protocol == 0 {
        return format!("(Defined at Interface level) ({class:02x}/{subclass:02x}/{protocol:02x})");
    }
    let c = usb_ids::Class::from_id(class)
        .map(|c| c.name())
        .unwrap_or("unknown class");
    let s = usb_ids::SubClass::from_cid_scid(class, subclass)
        .map(|s| s.name())
        .unwrap_or("unknown subclass");
    let p = usb_ids::Protocol::from_cid_scid_pid(class, subclass, protocol)
        .map(|p| p.name())
        .unwrap_or("unknown protocol");
    format!("{c} / {s} / {p} ({class:02x}/{subclass:02x}/{protocol:02x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worded_like_the_c_tool() {
        assert_eq!(class(0, 0, 0), "(Defined at Interface level) (00/00/00)");
        assert!(
            class(8, 6, 0x50).starts_with("Mass Storage / SCSI / Bulk-Only"),
            "{}",
            class(8, 6, 0x50)
        );
        assert!(product(0x1d6b, 0x0002).starts_with("Linux Foundation : 2.0 root hub (1d6b:0002)"));
        assert_eq!(
            product(0xfffe, 0xfffe),
            "unknown vendor : unknown product (fffe:fffe)"
        );
    }
}
