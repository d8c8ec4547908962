//! Helpers shared by the fuzz targets (included with `mod common;`).
#![allow(dead_code)]

use usbwire_proto::{DeviceInfo, OpReply, OpRequest};

/// What a string becomes after one trip through a NUL-padded C field of
/// `width` bytes, as the protocol defines it: cut to `width - 1` bytes so a
/// NUL always ends it, read back up to the first NUL, invalid UTF-8 replaced.
/// Written from the protocol, independently of the codec's own helpers.
pub fn c_field(s: &str, width: usize) -> String {
    let b = s.as_bytes();
    let b = &b[..b.len().min(width - 1)];
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn normalize_device(d: &DeviceInfo) -> DeviceInfo {
    DeviceInfo {
        path: c_field(&d.path, 256),
        busid: c_field(&d.busid, 32),
        ..d.clone()
    }
}

pub fn normalize_request(m: &OpRequest) -> OpRequest {
    match m {
        OpRequest::Devlist { version } => OpRequest::Devlist { version: *version },
        OpRequest::Import { version, busid } => OpRequest::Import {
            version: *version,
            busid: c_field(busid, 32),
        },
    }
}

pub fn normalize_reply(m: &OpReply) -> OpReply {
    match m {
        OpReply::Devlist {
            version,
            status,
            devices,
        } => OpReply::Devlist {
            version: *version,
            status: *status,
            devices: devices.iter().map(normalize_device).collect(),
        },
        OpReply::Import {
            version,
            status,
            device,
        } => OpReply::Import {
            version: *version,
            status: *status,
            device: device.as_ref().map(normalize_device),
        },
    }
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
