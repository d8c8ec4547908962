//! Helpers shared by the fuzz targets (included with `mod common;`).
#![allow(dead_code)]

/// A NUL-padded text field as it must come back from a decode-encode trip:
/// its bytes up to the first NUL, then NULs (what followed the first NUL is
/// padding). Written from the protocol, independently of the codec.
pub fn canonical_field(field: &[u8]) -> Vec<u8> {
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    let mut out = field[..end].to_vec();
    out.resize(field.len(), 0);
    out
}

/// Checks what every decoder result must satisfy, whatever the input.
pub fn check_decoded<T>(
    len: usize,
    r: &Result<usbwire_proto::Decoded<T>, usbwire_proto::DecodeError>,
) {
    match r {
        Ok(usbwire_proto::Decoded::Message(_, n)) => {
            assert!(*n > 0 && *n <= len, "consumed {n} of {len} bytes")
        }
        Ok(usbwire_proto::Decoded::NeedMore(n)) => {
            assert!(*n > len, "NeedMore({n}) with {len} bytes buffered")
        }
        Err(_) => {}
    }
}
