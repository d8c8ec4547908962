//! Standard descriptors: one parser, one builder (USB 2.0 9.6).
//!
//! In the manner of smoltcp's `wire` module: each standard descriptor has
//! a plain value type (`Device`, `Configuration`, `Interface`, `Endpoint`)
//! with `parse` (length and type checked once, `None` if they do not fit)
//! and `emit`, and [`walk`] splits a blob (a configuration descriptor, or
//! everything sysfs' `descriptors` file holds) into descriptors, keeping
//! the ones it has no type for raw. Hostile input never panics: the walk
//! stops at the first descriptor whose bLength is impossible.

use usbwire_proto::Speed;

pub const DT_DEVICE: u8 = 1;
pub const DT_CONFIG: u8 = 2;
pub const DT_STRING: u8 = 3;
pub const DT_INTERFACE: u8 = 4;
pub const DT_ENDPOINT: u8 = 5;
pub const DT_DEVICE_QUALIFIER: u8 = 6;
pub const DT_OTHER_SPEED_CONFIG: u8 = 7;
pub const DT_BOS: u8 = 0x0f;
pub const DT_SS_ENDPOINT_COMP: u8 = 0x30;

/// The transfer type of an endpoint, from bits 0..1 of bmAttributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferType {
    Control,
    Isochronous,
    Bulk,
    Interrupt,
}

impl TransferType {
    pub fn from_attributes(attr: u8) -> Self {
        match attr & 3 {
            0 => TransferType::Control,
            1 => TransferType::Isochronous,
            2 => TransferType::Bulk,
            _ => TransferType::Interrupt,
        }
    }

    pub fn attributes(self) -> u8 {
        match self {
            TransferType::Control => 0,
            TransferType::Isochronous => 1,
            TransferType::Bulk => 2,
            TransferType::Interrupt => 3,
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The bytes of a descriptor of type `kind` if they hold at least `len`.
fn checked(bytes: &[u8], kind: u8, len: usize) -> Option<&[u8]> {
    (bytes.len() >= len && usize::from(bytes[0]) >= len && bytes[1] == kind).then_some(bytes)
}

/// The 18-byte device descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// bcdUSB.
    pub usb_version: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub max_packet_size0: u8,
    pub vendor_id: u16,
    pub product_id: u16,
    /// bcdDevice.
    pub device_version: u16,
    /// String indexes; 0 for none.
    pub manufacturer: u8,
    pub product: u8,
    pub serial: u8,
    pub num_configurations: u8,
}

impl Device {
    pub const LEN: usize = 18;

    pub fn parse(bytes: &[u8]) -> Option<Device> {
        let b = checked(bytes, DT_DEVICE, Self::LEN)?;
        Some(Device {
            usb_version: le16(b, 2),
            class: b[4],
            subclass: b[5],
            protocol: b[6],
            max_packet_size0: b[7],
            vendor_id: le16(b, 8),
            product_id: le16(b, 10),
            device_version: le16(b, 12),
            manufacturer: b[14],
            product: b[15],
            serial: b[16],
            num_configurations: b[17],
        })
    }

    pub fn emit(&self) -> [u8; Self::LEN] {
        let [usb_lo, usb_hi] = self.usb_version.to_le_bytes();
        let [vid_lo, vid_hi] = self.vendor_id.to_le_bytes();
        let [pid_lo, pid_hi] = self.product_id.to_le_bytes();
        let [dev_lo, dev_hi] = self.device_version.to_le_bytes();
        [
            Self::LEN as u8,
            DT_DEVICE,
            usb_lo,
            usb_hi,
            self.class,
            self.subclass,
            self.protocol,
            self.max_packet_size0,
            vid_lo,
            vid_hi,
            pid_lo,
            pid_hi,
            dev_lo,
            dev_hi,
            self.manufacturer,
            self.product,
            self.serial,
            self.num_configurations,
        ]
    }

    /// The device qualifier of a device that can run at another speed
    /// (USB 2.0 9.6.2): its class fields and ep0 packet size, and one
    /// other-speed configuration.
    pub fn qualifier(&self) -> [u8; 10] {
        let [usb_lo, usb_hi] = self.usb_version.to_le_bytes();
        [
            10,
            DT_DEVICE_QUALIFIER,
            usb_lo,
            usb_hi,
            self.class,
            self.subclass,
            self.protocol,
            self.max_packet_size0,
            self.num_configurations,
            0,
        ]
    }
}

/// The 9-byte header of a configuration descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configuration {
    /// wTotalLength: this header and everything that follows it.
    pub total_length: u16,
    pub num_interfaces: u8,
    /// bConfigurationValue, what SET_CONFIGURATION selects it by.
    pub value: u8,
    pub string: u8,
    /// bmAttributes, bit 7 (reserved, set) included.
    pub attributes: u8,
    /// bMaxPower, in the speed's units (2 mA, or 8 mA for SuperSpeed).
    pub max_power: u8,
}

impl Configuration {
    pub const LEN: usize = 9;
    /// bmAttributes: powered by itself rather than the bus.
    pub const SELF_POWERED: u8 = 0x40;
    /// bmAttributes: can wake the host.
    pub const REMOTE_WAKEUP: u8 = 0x20;

    pub fn parse(bytes: &[u8]) -> Option<Configuration> {
        let b = checked(bytes, DT_CONFIG, Self::LEN)?;
        Some(Configuration {
            total_length: le16(b, 2),
            num_interfaces: b[4],
            value: b[5],
            string: b[6],
            attributes: b[7],
            max_power: b[8],
        })
    }

    pub fn emit(&self) -> [u8; Self::LEN] {
        let [total_lo, total_hi] = self.total_length.to_le_bytes();
        [
            Self::LEN as u8,
            DT_CONFIG,
            total_lo,
            total_hi,
            self.num_interfaces,
            self.value,
            self.string,
            self.attributes,
            self.max_power,
        ]
    }
}

/// A 9-byte interface descriptor: one alternate setting of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub number: u8,
    pub alt_setting: u8,
    pub num_endpoints: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub string: u8,
}

impl Interface {
    pub const LEN: usize = 9;

    pub fn parse(bytes: &[u8]) -> Option<Interface> {
        let b = checked(bytes, DT_INTERFACE, Self::LEN)?;
        Some(Interface {
            number: b[2],
            alt_setting: b[3],
            num_endpoints: b[4],
            class: b[5],
            subclass: b[6],
            protocol: b[7],
            string: b[8],
        })
    }

    pub fn emit(&self) -> [u8; Self::LEN] {
        [
            Self::LEN as u8,
            DT_INTERFACE,
            self.number,
            self.alt_setting,
            self.num_endpoints,
            self.class,
            self.subclass,
            self.protocol,
            self.string,
        ]
    }
}

/// A 7-byte endpoint descriptor (audio class ones are 9 bytes long; the
/// first 7 mean the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Endpoint address, with 0x80 for IN.
    pub address: u8,
    pub attributes: u8,
    /// wMaxPacketSize, with the high-bandwidth bits 11..12.
    pub max_packet_size: u16,
    pub interval: u8,
}

impl Endpoint {
    pub const LEN: usize = 7;

    pub fn new(address: u8, ty: TransferType, max_packet_size: u16, interval: u8) -> Endpoint {
        Endpoint {
            address,
            attributes: ty.attributes(),
            max_packet_size,
            interval,
        }
    }

    pub fn transfer_type(&self) -> TransferType {
        TransferType::from_attributes(self.attributes)
    }

    pub fn is_in(&self) -> bool {
        self.address & 0x80 != 0
    }

    pub fn parse(bytes: &[u8]) -> Option<Endpoint> {
        let b = checked(bytes, DT_ENDPOINT, Self::LEN)?;
        Some(Endpoint {
            address: b[2],
            attributes: b[3],
            max_packet_size: le16(b, 4),
            interval: b[6],
        })
    }

    pub fn emit(&self) -> [u8; Self::LEN] {
        let [mps_lo, mps_hi] = self.max_packet_size.to_le_bytes();
        [
            Self::LEN as u8,
            DT_ENDPOINT,
            self.address,
            self.attributes,
            mps_lo,
            mps_hi,
            self.interval,
        ]
    }
}

/// One descriptor of a blob, typed where it is a standard one this module
/// knows and long enough to be one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor<'a> {
    Device(Device),
    Configuration(Configuration),
    Interface(Interface),
    Endpoint(Endpoint),
    /// Anything else (strings, class descriptors, companions), or a
    /// standard type too short to be one: its bytes, bLength of them.
    Other(&'a [u8]),
}

/// One descriptor's bytes, exactly bLength of them (at least 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> RawDescriptor<'a> {
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Where it starts in the blob.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// bDescriptorType.
    pub fn descriptor_type(&self) -> u8 {
        self.bytes[1]
    }

    pub fn parse(&self) -> Descriptor<'a> {
        let b = self.bytes;
        let typed = match b[1] {
            DT_DEVICE => Device::parse(b).map(Descriptor::Device),
            DT_CONFIG => Configuration::parse(b).map(Descriptor::Configuration),
            DT_INTERFACE => Interface::parse(b).map(Descriptor::Interface),
            DT_ENDPOINT => Endpoint::parse(b).map(Descriptor::Endpoint),
            _ => None,
        };
        typed.unwrap_or(Descriptor::Other(b))
    }
}

/// The descriptors of `blob`, in order. Stops at a bLength below 2 or
/// past the end; [`Walk::rest`] is what it could not take.
pub fn walk(blob: &[u8]) -> Walk<'_> {
    Walk { blob, at: 0 }
}

#[derive(Debug, Clone)]
pub struct Walk<'a> {
    blob: &'a [u8],
    at: usize,
}

impl<'a> Walk<'a> {
    /// The bytes not (yet) walked: empty after a walk of a well-formed blob.
    pub fn rest(&self) -> &'a [u8] {
        &self.blob[self.at.min(self.blob.len())..]
    }

    /// The typed descriptors, raw ones included as [`Descriptor::Other`].
    pub fn parsed(self) -> impl Iterator<Item = Descriptor<'a>> {
        self.map(|d| d.parse())
    }
}

impl<'a> Iterator for Walk<'a> {
    type Item = RawDescriptor<'a>;

    fn next(&mut self) -> Option<RawDescriptor<'a>> {
        let rest = self.rest();
        let len = usize::from(*rest.first()?);
        if len < 2 || len > rest.len() {
            return None;
        }
        let d = RawDescriptor {
            bytes: &rest[..len],
            offset: self.at,
        };
        self.at += len;
        Some(d)
    }
}

/// An endpoint with the interface alternate setting it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint address, with 0x80 for IN.
    pub address: u8,
    pub transfer_type: TransferType,
    pub max_packet_size: u16,
    pub interval: u8,
    pub interface: u8,
    pub alt_setting: u8,
}

/// Every endpoint of a configuration descriptor (or of several, back to
/// back), each with its interface and alternate setting.
pub fn endpoints(blob: &[u8]) -> impl Iterator<Item = EndpointInfo> + '_ {
    let mut at = (0, 0);
    walk(blob).parsed().filter_map(move |d| match d {
        Descriptor::Interface(i) => {
            at = (i.number, i.alt_setting);
            None
        }
        Descriptor::Endpoint(e) => Some(EndpointInfo {
            address: e.address,
            transfer_type: e.transfer_type(),
            max_packet_size: e.max_packet_size,
            interval: e.interval,
            interface: at.0,
            alt_setting: at.1,
        }),
        _ => None,
    })
}

/// Every interface alternate setting of a configuration descriptor.
pub fn interfaces(blob: &[u8]) -> impl Iterator<Item = Interface> + '_ {
    walk(blob).parsed().filter_map(|d| match d {
        Descriptor::Interface(i) => Some(i),
        _ => None,
    })
}

// The builder.

/// A configuration descriptor: `header` with wTotalLength and
/// bNumInterfaces computed from `body` (interfaces, class descriptors and
/// endpoints), then `body`. bNumInterfaces counts alternate settings 0.
pub fn configuration(header: Configuration, body: &[u8]) -> Vec<u8> {
    let total = (Configuration::LEN + body.len()).min(usize::from(u16::MAX)) as u16;
    let num_interfaces = interfaces(body).filter(|i| i.alt_setting == 0).count() as u8;
    let header = Configuration {
        total_length: total,
        num_interfaces,
        ..header
    };
    let mut out = Vec::with_capacity(usize::from(total));
    out.extend_from_slice(&header.emit());
    out.extend_from_slice(body);
    out
}

/// String descriptor 0: the languages the others come in (US English).
pub const LANGUAGES: [u8; 4] = [4, DT_STRING, 0x09, 0x04];

/// A string descriptor: `s` in UTF-16LE, cut to the 126 code units a
/// descriptor holds.
pub fn string(s: &str) -> Vec<u8> {
    let units: Vec<u16> = s.encode_utf16().take(126).collect();
    let mut out = Vec::with_capacity(2 + units.len() * 2);
    out.push((2 + units.len() * 2) as u8);
    out.push(DT_STRING);
    for u in units {
        out.extend_from_slice(&u.to_le_bytes());
    }
    out
}

/// The bulk max packet size for a speed.
pub fn bulk_max_packet(speed: Speed) -> u16 {
    match speed {
        Speed::Super | Speed::SuperPlus => 1024,
        Speed::High => 512,
        _ => 64,
    }
}

/// A high-speed configuration re-described for full speed (USB 2.0 9.6.4):
/// bDescriptorType OTHER_SPEED_CONFIGURATION, and each endpoint with the
/// largest packet and the polling period that speed allows. Everything else
/// (interfaces, class descriptors) is the same at both speeds.
pub fn full_speed_configuration(configuration: &[u8]) -> Vec<u8> {
    let mut out = configuration.to_vec();
    for d in walk(configuration) {
        let at = d.offset();
        match d.parse() {
            Descriptor::Configuration(_) if at == 0 => out[1] = DT_OTHER_SPEED_CONFIG,
            Descriptor::Endpoint(e) => {
                // Bits 11..12 are high-bandwidth transactions per microframe,
                // which full speed does not have.
                let mps = e.max_packet_size & 0x7ff;
                let (mps, interval) = match e.transfer_type() {
                    TransferType::Bulk | TransferType::Control => (mps.min(64), 0),
                    // 2^(b-1) microframes become that many eighths of a frame.
                    TransferType::Interrupt => {
                        let micro = 1u32 << (e.interval.clamp(1, 16) - 1);
                        (mps.min(64), (micro / 8).clamp(1, 255) as u8)
                    }
                    // Both speeds count 2^(b-1) of their own (micro)frames.
                    TransferType::Isochronous => (mps.min(1023), e.interval.clamp(4, 16) - 3),
                };
                let full_speed = Endpoint {
                    max_packet_size: mps,
                    interval,
                    ..e
                };
                // Only the first 7 bytes: audio endpoints' extra two stay.
                out[at + 2..at + Endpoint::LEN].copy_from_slice(&full_speed.emit()[2..]);
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_device() -> Device {
        Device {
            usb_version: 0x0200,
            class: 0xef,
            subclass: 2,
            protocol: 1,
            max_packet_size0: 64,
            vendor_id: 0x1d6b,
            product_id: 0x0104,
            device_version: 0x0100,
            manufacturer: 1,
            product: 2,
            serial: 0,
            num_configurations: 1,
        }
    }

    #[test]
    fn emit_then_parse_gives_back_the_same() {
        let dev = sample_device();
        assert_eq!(Device::parse(&dev.emit()), Some(dev));
        let config = Configuration {
            total_length: 32,
            num_interfaces: 1,
            value: 1,
            string: 0,
            attributes: 0xc0,
            max_power: 50,
        };
        assert_eq!(Configuration::parse(&config.emit()), Some(config));
        let iface = Interface {
            number: 2,
            alt_setting: 1,
            num_endpoints: 2,
            class: 8,
            subclass: 6,
            protocol: 0x50,
            string: 4,
        };
        assert_eq!(Interface::parse(&iface.emit()), Some(iface));
        let ep = Endpoint::new(0x81, TransferType::Isochronous, 1024 | 2 << 11, 4);
        assert_eq!(Endpoint::parse(&ep.emit()), Some(ep));
        assert_eq!(ep.transfer_type(), TransferType::Isochronous);
        assert!(ep.is_in());
    }

    #[test]
    fn a_built_configuration_walks_back_into_its_parts() {
        let iface = Interface {
            number: 0,
            alt_setting: 0,
            num_endpoints: 2,
            class: 0xff,
            subclass: 0,
            protocol: 0,
            string: 0,
        };
        let alt1 = Interface {
            alt_setting: 1,
            num_endpoints: 0,
            ..iface
        };
        let bulk_in = Endpoint::new(0x81, TransferType::Bulk, 512, 0);
        let bulk_out = Endpoint::new(0x02, TransferType::Bulk, 512, 0);
        let class_specific = [4u8, 0x24, 0x55, 0x66];
        let mut body = Vec::new();
        body.extend_from_slice(&iface.emit());
        body.extend_from_slice(&class_specific);
        body.extend_from_slice(&bulk_in.emit());
        body.extend_from_slice(&bulk_out.emit());
        body.extend_from_slice(&alt1.emit());
        let header = Configuration {
            total_length: 0,
            num_interfaces: 0,
            value: 1,
            string: 0,
            attributes: 0x80,
            max_power: 50,
        };
        let blob = configuration(header, &body);
        let walked: Vec<Descriptor<'_>> = walk(&blob).parsed().collect();
        assert_eq!(
            walked,
            [
                Descriptor::Configuration(Configuration {
                    total_length: blob.len() as u16,
                    num_interfaces: 1,
                    ..header
                }),
                Descriptor::Interface(iface),
                Descriptor::Other(&class_specific),
                Descriptor::Endpoint(bulk_in),
                Descriptor::Endpoint(bulk_out),
                Descriptor::Interface(alt1),
            ]
        );
        let eps: Vec<(u8, u8, u8)> = endpoints(&blob)
            .map(|e| (e.address, e.interface, e.alt_setting))
            .collect();
        assert_eq!(eps, [(0x81, 0, 0), (0x02, 0, 0)]);
    }

    #[test]
    fn a_real_flash_drive_parses() {
        // A bulk-only flash drive laid out as sysfs' `descriptors` file
        // holds it: the device descriptor, then configuration 1 with one
        // mass-storage interface and its two bulk endpoints.
        let blob = [
            18, 1, 0, 2, 0, 0, 0, 64, 0x81, 0x07, 0x51, 0x55, 0x00, 0x01, 1, 2, 3, 1, //
            9, 2, 32, 0, 1, 1, 0, 0x80, 100, //
            9, 4, 0, 0, 2, 8, 6, 0x50, 0, //
            7, 5, 0x81, 2, 0, 2, 0, //
            7, 5, 0x02, 2, 0, 2, 0,
        ];
        let mut w = walk(&blob);
        let parsed: Vec<Descriptor<'_>> = w.by_ref().map(|d| d.parse()).collect();
        assert!(w.rest().is_empty());
        assert!(
            matches!(parsed[0], Descriptor::Device(d) if d.vendor_id == 0x0781 && d.product_id == 0x5551)
        );
        assert!(
            matches!(parsed[1], Descriptor::Configuration(c) if c.total_length == 32 && c.value == 1)
        );
        assert!(
            matches!(parsed[2], Descriptor::Interface(i) if i.class == 8 && i.protocol == 0x50)
        );
        assert_eq!(
            parsed[3],
            Descriptor::Endpoint(Endpoint::new(0x81, TransferType::Bulk, 512, 0))
        );
        assert_eq!(parsed.len(), 5);
    }

    #[test]
    fn hostile_blobs_stop_the_walk_without_panicking() {
        // bLength 0, 1, past the end; standard types too short to be one.
        assert_eq!(walk(&[0, 4, 1, 2]).count(), 0);
        assert_eq!(walk(&[1, 4]).count(), 0);
        assert_eq!(walk(&[9, 4, 0]).count(), 0);
        assert_eq!(walk(&[9, 4, 0]).rest(), [9, 4, 0]);
        let short = [3u8, DT_ENDPOINT, 0x81, 9, DT_INTERFACE];
        let parsed: Vec<Descriptor<'_>> = walk(&short).parsed().collect();
        assert_eq!(parsed, [Descriptor::Other(&short[..3])]);
        // bLength says shorter than the type needs, though bytes follow.
        let lying = [5u8, DT_ENDPOINT, 0x81, 2, 0, 2, 0];
        assert_eq!(
            walk(&lying).parsed().next(),
            Some(Descriptor::Other(&lying[..5]))
        );
        // Every prefix of every byte pattern is safe to walk.
        for len in 0..64 {
            for seed in 0..64u8 {
                let blob: Vec<u8> = (0..len as u8)
                    .map(|i| i.wrapping_mul(37).wrapping_add(seed))
                    .collect();
                let n = walk(&blob).parsed().count();
                assert!(n <= len / 2);
                let _ = full_speed_configuration(&blob);
                let _ = endpoints(&blob).count();
            }
        }
    }

    #[test]
    fn strings_are_utf16le_and_bounded() {
        assert_eq!(string("Test"), [10, 3, b'T', 0, b'e', 0, b's', 0, b't', 0]);
        let long = "x".repeat(300);
        assert_eq!(string(&long).len(), 254);
        assert_eq!(string(&long)[0], 254);
    }

    #[test]
    fn the_qualifier_repeats_the_device_fields() {
        assert_eq!(
            sample_device().qualifier(),
            [10, 6, 0x00, 0x02, 0xef, 2, 1, 64, 1, 0]
        );
    }
}
