//! The `OP_*` phase: device list and import, sent before any URB.
//!
//! Every message starts with an 8-byte common header: `version` (u16),
//! `command` (u16) and `status` (u32). Requests have bit 15 of the command
//! set (`0x8005`), replies have it clear (`0x0005`).

use crate::wire::*;
use crate::{BusId, DecodeError, Decoded, DevicePath, Limits};

/// The protocol version Linux sends: BCD 1.1.1.
pub const USBIP_VERSION: u16 = 0x0111;
pub const OP_REQ_DEVLIST: u16 = 0x8005;
pub const OP_REP_DEVLIST: u16 = 0x0005;
pub const OP_REQ_IMPORT: u16 = 0x8003;
pub const OP_REP_IMPORT: u16 = 0x0003;

/// Length of the common `OP_*` header.
pub const OP_HEADER_LEN: usize = 8;
/// Length of a device record (`struct usbip_usb_device`).
pub const DEVICE_INFO_LEN: usize = 312;
/// Length of an interface record in `OP_REP_DEVLIST`.
pub const INTERFACE_INFO_LEN: usize = 4;
/// Length of the `path` field.
pub const PATH_LEN: usize = 256;
/// Length of the `busid` field.
pub const BUSID_LEN: usize = 32;

/// `status` of an `OP_REP_*`, as in `tools/usb/usbip/libsrc/usbip_common.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpStatus {
    /// ST_OK: request completed successfully.
    Ok,
    /// ST_NA: request failed, or the device is not available.
    Na,
    /// ST_DEV_BUSY: the device is already in use.
    DevBusy,
    /// ST_DEV_ERR: the device is in an error state.
    DevErr,
    /// ST_NODEV: no device with that bus id.
    NoDev,
    /// ST_ERROR: unexpected response.
    Error,
    /// A value outside the table, kept so that it is not mistaken for success.
    Other(u32),
}

impl OpStatus {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => OpStatus::Ok,
            1 => OpStatus::Na,
            2 => OpStatus::DevBusy,
            3 => OpStatus::DevErr,
            4 => OpStatus::NoDev,
            5 => OpStatus::Error,
            v => OpStatus::Other(v),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            OpStatus::Ok => 0,
            OpStatus::Na => 1,
            OpStatus::DevBusy => 2,
            OpStatus::DevErr => 3,
            OpStatus::NoDev => 4,
            OpStatus::Error => 5,
            OpStatus::Other(v) => v,
        }
    }

    /// The C tools' name for the status (`ST_DEV_BUSY`), for error messages.
    pub fn name(self) -> &'static str {
        match self {
            OpStatus::Ok => "ST_OK",
            OpStatus::Na => "ST_NA",
            OpStatus::DevBusy => "ST_DEV_BUSY",
            OpStatus::DevErr => "ST_DEV_ERR",
            OpStatus::NoDev => "ST_NODEV",
            OpStatus::Error => "ST_ERROR",
            OpStatus::Other(_) => "unknown status",
        }
    }

    /// The C tools' description (`usbip_op_common_status_string`).
    pub fn describe(self) -> &'static str {
        match self {
            OpStatus::Ok => "Request Completed Successfully",
            OpStatus::Na => "Request Failed",
            OpStatus::DevBusy => "Device busy (exported)",
            OpStatus::DevErr => "Device in error state",
            OpStatus::NoDev => "Device not found",
            OpStatus::Error => "Unexpected response",
            OpStatus::Other(_) => "Unknown Op Common Status",
        }
    }
}

/// `enum usb_device_speed`, as the kernel numbers it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Speed {
    Unknown,
    Low,
    Full,
    High,
    Wireless,
    Super,
    SuperPlus,
    /// A number outside the table.
    Other(u32),
}

impl Speed {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Speed::Unknown,
            1 => Speed::Low,
            2 => Speed::Full,
            3 => Speed::High,
            4 => Speed::Wireless,
            5 => Speed::Super,
            6 => Speed::SuperPlus,
            v => Speed::Other(v),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Speed::Unknown => 0,
            Speed::Low => 1,
            Speed::Full => 2,
            Speed::High => 3,
            Speed::Wireless => 4,
            Speed::Super => 5,
            Speed::SuperPlus => 6,
            Speed::Other(v) => v,
        }
    }

    /// The C tools' wording (`usbip_speed_string`).
    pub fn describe(self) -> &'static str {
        match self {
            Speed::Low => "Low Speed(1.5Mbps)",
            Speed::Full => "Full Speed(12Mbps)",
            Speed::High => "High Speed(480Mbps)",
            Speed::Wireless => "Wireless",
            Speed::Super => "Super Speed(5000Mbps)",
            Speed::SuperPlus => "Super Speed Plus(10000Mbps)",
            Speed::Unknown | Speed::Other(_) => "Unknown Speed",
        }
    }

    /// The sysfs spelling (`/sys/bus/usb/devices/*/speed`).
    pub fn sysfs(self) -> &'static str {
        match self {
            Speed::Low => "1.5",
            Speed::Full => "12",
            Speed::High => "480",
            Speed::Wireless => "53.3-480",
            Speed::Super => "5000",
            Speed::SuperPlus => "10000",
            Speed::Unknown | Speed::Other(_) => "unknown",
        }
    }

    /// Parses the sysfs spelling; the inverse of [`Speed::sysfs`].
    pub fn from_sysfs(s: &str) -> Self {
        match s.trim() {
            "1.5" => Speed::Low,
            "12" => Speed::Full,
            "480" => Speed::High,
            "53.3-480" => Speed::Wireless,
            "5000" => Speed::Super,
            "10000" | "20000" => Speed::SuperPlus,
            _ => Speed::Unknown,
        }
    }
}

/// One interface triple in `OP_REP_DEVLIST` (`struct usbip_usb_interface`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InterfaceInfo {
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
}

/// A device record (`struct usbip_usb_device`), shared by devlist and import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The sysfs path on the server; informational.
    pub path: DevicePath,
    /// The bus id that an import names, e.g. `1-1`.
    pub busid: BusId,
    pub busnum: u32,
    pub devnum: u32,
    pub speed: Speed,
    pub id_vendor: u16,
    pub id_product: u16,
    pub bcd_device: u16,
    pub device_class: u8,
    pub device_subclass: u8,
    pub device_protocol: u8,
    pub configuration_value: u8,
    pub num_configurations: u8,
    pub num_interfaces: u8,
    /// Sent only in `OP_REP_DEVLIST`, one per `num_interfaces`.
    pub interfaces: Vec<InterfaceInfo>,
}

impl DeviceInfo {
    /// `devid` as vhci-hcd and the stub put it in URB headers: busnum << 16 | devnum.
    pub fn devid(&self) -> u32 {
        (self.busnum << 16) | (self.devnum & 0xffff)
    }

    /// Checks the fixed 312-byte record, then reads it. Interfaces are not part of it.
    fn decode_fixed(b: &[u8]) -> DeviceInfo {
        debug_assert!(b.len() >= DEVICE_INFO_LEN);
        DeviceInfo {
            path: DevicePath::from_field(&b[0..PATH_LEN]),
            busid: BusId::from_field(&b[256..256 + BUSID_LEN]),
            busnum: u32_at(b, 288),
            devnum: u32_at(b, 292),
            speed: Speed::from_u32(u32_at(b, 296)),
            id_vendor: u16_at(b, 300),
            id_product: u16_at(b, 302),
            bcd_device: u16_at(b, 304),
            device_class: b[306],
            device_subclass: b[307],
            device_protocol: b[308],
            configuration_value: b[309],
            num_configurations: b[310],
            num_interfaces: b[311],
            interfaces: Vec::new(),
        }
    }

    fn encode_fixed(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + DEVICE_INFO_LEN, 0);
        let b = &mut out[start..];
        self.path.encode_field(&mut b[0..PATH_LEN]);
        self.busid.encode_field(&mut b[256..256 + BUSID_LEN]);
        put_u32(b, 288, self.busnum);
        put_u32(b, 292, self.devnum);
        put_u32(b, 296, self.speed.to_u32());
        put_u16(b, 300, self.id_vendor);
        put_u16(b, 302, self.id_product);
        put_u16(b, 304, self.bcd_device);
        b[306] = self.device_class;
        b[307] = self.device_subclass;
        b[308] = self.device_protocol;
        b[309] = self.configuration_value;
        b[310] = self.num_configurations;
        b[311] = self.num_interfaces;
    }
}

fn encode_header(out: &mut Vec<u8>, version: u16, code: u16, status: u32) {
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&status.to_be_bytes());
}

/// A request from client to server in the `OP_*` phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpRequest {
    /// `OP_REQ_DEVLIST`. The version is whatever the peer sent; it is not
    /// checked, because peers vary and the layout does not.
    Devlist { version: u16 },
    /// `OP_REQ_IMPORT` with the bus id to import.
    Import { version: u16, busid: BusId },
}

impl OpRequest {
    /// Decodes a request. An unknown code is an error that carries the code,
    /// so that the server can answer it with a clean status before closing.
    pub fn decode(b: &[u8]) -> Result<Decoded<OpRequest>, DecodeError> {
        if b.len() < OP_HEADER_LEN {
            return Ok(Decoded::NeedMore(OP_HEADER_LEN));
        }
        let version = u16_at(b, 0);
        match u16_at(b, 2) {
            OP_REQ_DEVLIST => Ok(Decoded::Message(
                OpRequest::Devlist { version },
                OP_HEADER_LEN,
            )),
            OP_REQ_IMPORT => {
                let need = OP_HEADER_LEN + BUSID_LEN;
                if b.len() < need {
                    return Ok(Decoded::NeedMore(need));
                }
                let busid = BusId::from_field(&b[OP_HEADER_LEN..need]);
                Ok(Decoded::Message(OpRequest::Import { version, busid }, need))
            }
            code => Err(DecodeError::UnknownOpCode(code)),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OpRequest::Devlist { version } => encode_header(out, *version, OP_REQ_DEVLIST, 0),
            OpRequest::Import { version, busid } => {
                encode_header(out, *version, OP_REQ_IMPORT, 0);
                let start = out.len();
                out.resize(start + BUSID_LEN, 0);
                busid.encode_field(&mut out[start..]);
            }
        }
    }
}

/// A reply from server to client in the `OP_*` phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpReply {
    /// `OP_REP_DEVLIST`: every exported device with its interfaces.
    Devlist {
        version: u16,
        status: OpStatus,
        devices: Vec<DeviceInfo>,
    },
    /// `OP_REP_IMPORT`. The device record follows only when the status is ST_OK.
    Import {
        version: u16,
        status: OpStatus,
        device: Option<DeviceInfo>,
    },
}

impl OpReply {
    /// Decodes a reply. Device counts are bounded by `limits.max_devices`
    /// before anything is allocated for them.
    pub fn decode(b: &[u8], limits: &Limits) -> Result<Decoded<OpReply>, DecodeError> {
        if b.len() < OP_HEADER_LEN {
            return Ok(Decoded::NeedMore(OP_HEADER_LEN));
        }
        let version = u16_at(b, 0);
        let status = OpStatus::from_u32(u32_at(b, 4));
        match u16_at(b, 2) {
            OP_REP_DEVLIST => {
                // The C server sends the count even on failure; without a
                // count there is nothing more to read.
                let mut at = OP_HEADER_LEN + 4;
                if b.len() < at {
                    return Ok(Decoded::NeedMore(at));
                }
                let n = u32_at(b, OP_HEADER_LEN);
                if n > limits.max_devices {
                    return Err(DecodeError::TooLong {
                        field: "number of devices",
                        value: n.into(),
                        limit: limits.max_devices.into(),
                    });
                }
                // Walk the records first: nothing is allocated for a
                // message that has not fully arrived.
                for _ in 0..n {
                    if b.len() < at + DEVICE_INFO_LEN {
                        return Ok(Decoded::NeedMore(at + DEVICE_INFO_LEN));
                    }
                    at += DEVICE_INFO_LEN + INTERFACE_INFO_LEN * b[at + 311] as usize;
                    if b.len() < at {
                        return Ok(Decoded::NeedMore(at));
                    }
                }
                let mut devices = Vec::with_capacity(n as usize);
                let mut at = OP_HEADER_LEN + 4;
                for _ in 0..n {
                    let mut d = DeviceInfo::decode_fixed(&b[at..]);
                    at += DEVICE_INFO_LEN;
                    for _ in 0..d.num_interfaces {
                        d.interfaces.push(InterfaceInfo {
                            class: b[at],
                            subclass: b[at + 1],
                            protocol: b[at + 2],
                        });
                        at += INTERFACE_INFO_LEN;
                    }
                    devices.push(d);
                }
                Ok(Decoded::Message(
                    OpReply::Devlist {
                        version,
                        status,
                        devices,
                    },
                    at,
                ))
            }
            OP_REP_IMPORT => {
                if status != OpStatus::Ok {
                    return Ok(Decoded::Message(
                        OpReply::Import {
                            version,
                            status,
                            device: None,
                        },
                        OP_HEADER_LEN,
                    ));
                }
                let need = OP_HEADER_LEN + DEVICE_INFO_LEN;
                if b.len() < need {
                    return Ok(Decoded::NeedMore(need));
                }
                let device = DeviceInfo::decode_fixed(&b[OP_HEADER_LEN..]);
                Ok(Decoded::Message(
                    OpReply::Import {
                        version,
                        status,
                        device: Some(device),
                    },
                    need,
                ))
            }
            code => Err(DecodeError::UnknownOpCode(code)),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OpReply::Devlist {
                version,
                status,
                devices,
            } => {
                encode_header(out, *version, OP_REP_DEVLIST, status.to_u32());
                out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
                for d in devices {
                    // The interface count on the wire must match the records
                    // that follow, or the peer loses framing.
                    let mut fixed = d.clone();
                    fixed.num_interfaces = d.interfaces.len().min(255) as u8;
                    fixed.encode_fixed(out);
                    for i in d.interfaces.iter().take(255) {
                        out.extend_from_slice(&[i.class, i.subclass, i.protocol, 0]);
                    }
                }
            }
            OpReply::Import {
                version,
                status,
                device,
            } => {
                // The record follows exactly when the status is ST_OK. A
                // success with no device would leave the peer waiting for
                // 312 bytes that never come, so it goes out as ST_ERROR.
                match (status, device) {
                    (OpStatus::Ok, Some(d)) => {
                        encode_header(out, *version, OP_REP_IMPORT, 0);
                        d.encode_fixed(out);
                    }
                    (OpStatus::Ok, None) => {
                        encode_header(out, *version, OP_REP_IMPORT, OpStatus::Error.to_u32())
                    }
                    (s, _) => encode_header(out, *version, OP_REP_IMPORT, s.to_u32()),
                }
            }
        }
    }
}

/// Bytes of a fleet reservation token (128 bits).
pub const IMPORT_TOKEN_LEN: usize = 16;
/// The longest bus id an `OP_REQ_IMPORT` can carry beside a token: the
/// token takes the field's last [`IMPORT_TOKEN_LEN`] bytes, and the bus id
/// its NUL before them. Linux bus ids (`10-1.2.3.4.5.6` at the deepest hub
/// chain) are shorter.
pub const IMPORT_TOKEN_BUSID_MAX: usize = BUSID_LEN - IMPORT_TOKEN_LEN - 1;

/// usbwire's extension of `OP_REQ_IMPORT`: the token of a fleet
/// reservation, which proves to a server that the importer is the
/// reservation's holder.
///
/// It travels in the `busid` field after the bus id's terminating NUL, in
/// the field's last 16 bytes. Linux's usbip tools and the kernel zero the
/// whole field and compare bus ids only up to the NUL, so they never send
/// a token, and a server that knows nothing of tokens ignores one. A field
/// whose tail is all zero carries none (a random token is never all zero).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImportToken(pub [u8; IMPORT_TOKEN_LEN]);

impl ImportToken {
    /// The token in the `busid` field of an `OP_REQ_IMPORT` (the field's
    /// 32 bytes), if it carries one.
    pub fn from_busid_field(field: &[u8]) -> Option<ImportToken> {
        if field.len() != BUSID_LEN {
            return None;
        }
        let (head, tail) = field.split_at(BUSID_LEN - IMPORT_TOKEN_LEN);
        // The bus id must end before the token: a long bus id is no token.
        if !head.contains(&0) || tail.iter().all(|&b| b == 0) {
            return None;
        }
        Some(ImportToken(tail.try_into().ok()?))
    }

    /// An `OP_REQ_IMPORT` of `busid` carrying this token; `None` if the bus
    /// id is too long to leave room for it.
    pub fn encode_import(&self, version: u16, busid: &str, out: &mut Vec<u8>) -> Option<()> {
        if busid.len() > IMPORT_TOKEN_BUSID_MAX || busid.contains('\0') {
            return None;
        }
        OpRequest::Import {
            version,
            busid: busid.into(),
        }
        .encode(out);
        let end = out.len();
        out[end - IMPORT_TOKEN_LEN..].copy_from_slice(&self.0);
        Some(())
    }

    /// The token from its 32 hex digits.
    pub fn from_hex(hex: &str) -> Option<ImportToken> {
        if hex.len() != 2 * IMPORT_TOKEN_LEN || !hex.is_ascii() {
            return None;
        }
        let mut token = [0; IMPORT_TOKEN_LEN];
        for (i, byte) in token.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ImportToken(token))
    }

    /// Lower-case hex, 32 digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Not the token itself: it is a secret, and debug output ends up in logs.
impl std::fmt::Debug for ImportToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImportToken(..)")
    }
}

#[cfg(test)]
mod import_token_tests {
    use super::*;

    #[test]
    fn a_token_travels_after_the_bus_id_and_decodes_as_the_same_bus_id() {
        let token = ImportToken::from_hex("00112233445566778899aabbccddeeff").unwrap();
        let mut out = Vec::new();
        token
            .encode_import(USBIP_VERSION, "10-1.2.3.4.5.6", &mut out)
            .unwrap();
        let Decoded::Message(OpRequest::Import { busid, .. }, n) = OpRequest::decode(&out).unwrap()
        else {
            panic!("not an import")
        };
        assert_eq!(n, out.len());
        assert_eq!(busid, "10-1.2.3.4.5.6");
        let field = &out[OP_HEADER_LEN..];
        assert_eq!(ImportToken::from_busid_field(field), Some(token));
        assert_eq!(token.to_hex(), "00112233445566778899aabbccddeeff");
    }

    #[test]
    fn what_linux_sends_carries_no_token_and_long_bus_ids_leave_no_room() {
        let mut plain = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "1-1".into(),
        }
        .encode(&mut plain);
        assert_eq!(ImportToken::from_busid_field(&plain[OP_HEADER_LEN..]), None);
        // A 31-byte bus id fills the field: its tail is the bus id's.
        let mut long = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: "x".repeat(31).as_str().into(),
        }
        .encode(&mut long);
        assert_eq!(ImportToken::from_busid_field(&long[OP_HEADER_LEN..]), None);
        let token = ImportToken([7; IMPORT_TOKEN_LEN]);
        assert!(token
            .encode_import(USBIP_VERSION, &"x".repeat(16), &mut Vec::new())
            .is_none());
        assert!(ImportToken::from_hex("zz112233445566778899aabbccddeeff").is_none());
        assert!(ImportToken::from_hex("0011").is_none());
    }
}
