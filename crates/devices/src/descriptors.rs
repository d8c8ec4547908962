//! Descriptor building and parsing.
//!
//! Functions build their configuration descriptor as bytes with these
//! helpers; the core parses it back once, so that the endpoint table the
//! server schedules by and the descriptors the host reads can never disagree.

use usbwire_proto::{InterfaceInfo, Speed};

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

/// One endpoint of an interface alternate setting.
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

/// The fields of the 18-byte device descriptor that vary between devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescriptor {
    pub usb_version: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub max_packet_size0: u8,
    pub vendor_id: u16,
    pub product_id: u16,
    pub device_version: u16,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
}

/// Everything the host can read about a device, built once.
#[derive(Debug, Clone)]
pub struct Descriptors {
    pub speed: Speed,
    pub device: DeviceDescriptor,
    /// The full configuration descriptor (configuration, interfaces,
    /// class-specific descriptors and endpoints), without wTotalLength and
    /// string indexes filled in: [`Descriptors::new`] fixes those.
    pub configuration: Vec<u8>,
    /// String table; index 1 is `strings[0]`. Index 0 (language IDs) is implied.
    pub strings: Vec<String>,
    device_bytes: [u8; 18],
    /// The configuration as it would be at full speed, for
    /// GET_DESCRIPTOR(OTHER_SPEED_CONFIGURATION); only a high-speed device
    /// has one (it can also run at full speed).
    other_speed: Option<Vec<u8>>,
    endpoints: Vec<EndpointInfo>,
    interfaces: Vec<InterfaceInfo>,
    /// Every (interface, alternate setting) the configuration describes.
    alt_settings: Vec<(u8, u8)>,
    config_value: u8,
}

impl Descriptors {
    /// Builds the descriptor set. `configuration` is the body after the
    /// 9-byte configuration header (interfaces, class descriptors,
    /// endpoints); `extra_strings` are added to the string table after the
    /// manufacturer, product and serial, and functions refer to them by
    /// index starting at 4.
    pub fn new(
        speed: Speed,
        device: DeviceDescriptor,
        attributes: u8,
        max_power_ma: u16,
        body: &[u8],
        extra_strings: &[&str],
    ) -> Self {
        let mut strings = vec![
            device.manufacturer.clone().unwrap_or_default(),
            device.product.clone().unwrap_or_default(),
            device.serial.clone().unwrap_or_default(),
        ];
        strings.extend(extra_strings.iter().map(|s| s.to_string()));
        let interfaces = parse_interfaces(body);
        let num_interfaces = interfaces.len() as u8;
        let mut configuration = Vec::with_capacity(9 + body.len());
        let total = (9 + body.len()) as u16;
        let power_unit = if matches!(speed, Speed::Super | Speed::SuperPlus) {
            8
        } else {
            2
        };
        configuration.extend_from_slice(&[
            9,
            DT_CONFIG,
            total as u8,
            (total >> 8) as u8,
            num_interfaces,
            1,
            0,
            0x80 | attributes,
            (max_power_ma / power_unit).min(255) as u8,
        ]);
        configuration.extend_from_slice(body);
        let d = &device;
        let idx = |s: &Option<String>, i: u8| if s.is_some() { i } else { 0 };
        let device_bytes = [
            18,
            DT_DEVICE,
            d.usb_version as u8,
            (d.usb_version >> 8) as u8,
            d.class,
            d.subclass,
            d.protocol,
            d.max_packet_size0,
            d.vendor_id as u8,
            (d.vendor_id >> 8) as u8,
            d.product_id as u8,
            (d.product_id >> 8) as u8,
            d.device_version as u8,
            (d.device_version >> 8) as u8,
            idx(&d.manufacturer, 1),
            idx(&d.product, 2),
            idx(&d.serial, 3),
            1,
        ];
        let endpoints = parse_endpoints(&configuration);
        let alt_settings = walk(&configuration)
            .filter(|d| d[1] == DT_INTERFACE && d.len() >= 9)
            .map(|d| (d[2], d[3]))
            .collect();
        let other_speed = (speed == Speed::High).then(|| full_speed_configuration(&configuration));
        Descriptors {
            speed,
            device,
            configuration,
            strings,
            device_bytes,
            other_speed,
            endpoints,
            interfaces,
            alt_settings,
            config_value: 1,
        }
    }

    pub fn device_bytes(&self) -> &[u8; 18] {
        &self.device_bytes
    }

    /// Every endpoint of every alternate setting.
    pub fn endpoints(&self) -> &[EndpointInfo] {
        &self.endpoints
    }

    /// Interface triples of alternate setting 0, in interface order.
    pub fn interfaces(&self) -> &[InterfaceInfo] {
        &self.interfaces
    }

    pub fn config_value(&self) -> u8 {
        self.config_value
    }

    /// Whether the configuration describes alternate setting `alt` of
    /// interface `interface` (with or without endpoints).
    pub fn has_alt_setting(&self, interface: u8, alt: u8) -> bool {
        self.alt_settings.contains(&(interface, alt))
    }

    /// The other-speed configuration descriptor (USB 2.0 9.6.4): present
    /// exactly when [`Descriptors::device_qualifier`] is.
    pub fn other_speed_configuration(&self) -> Option<&[u8]> {
        self.other_speed.as_deref()
    }

    /// The endpoint with this address in the given alternate settings.
    pub fn endpoint(&self, address: u8, alt_of: impl Fn(u8) -> u8) -> Option<&EndpointInfo> {
        self.endpoints
            .iter()
            .find(|e| e.address == address && e.alt_setting == alt_of(e.interface))
    }

    /// String descriptor `index` in US English; index 0 is the language table.
    pub fn string(&self, index: u8) -> Option<Vec<u8>> {
        if index == 0 {
            return Some(vec![4, DT_STRING, 0x09, 0x04]);
        }
        let s = self.strings.get(index as usize - 1)?;
        let units: Vec<u16> = s.encode_utf16().take(126).collect();
        let mut out = Vec::with_capacity(2 + units.len() * 2);
        out.push((2 + units.len() * 2) as u8);
        out.push(DT_STRING);
        for u in units {
            out.extend_from_slice(&u.to_le_bytes());
        }
        Some(out)
    }

    /// The device qualifier a high-speed capable device must return (USB
    /// 2.0 9.6.2). A full- or low-speed only device has none, and neither
    /// does a SuperSpeed one (USB 3.2 9.6.2): both STALL the request.
    pub fn device_qualifier(&self) -> Option<[u8; 10]> {
        if self.speed != Speed::High {
            return None;
        }
        let d = &self.device_bytes;
        Some([
            10,
            DT_DEVICE_QUALIFIER,
            d[2],
            d[3],
            d[4],
            d[5],
            d[6],
            d[7],
            1,
            0,
        ])
    }
}

fn walk(desc: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 2 > desc.len() {
            return None;
        }
        let len = desc[at] as usize;
        if len < 2 || at + len > desc.len() {
            return None;
        }
        let d = &desc[at..at + len];
        at += len;
        Some(d)
    })
}

/// A high-speed configuration re-described for full speed (USB 2.0 9.6.4):
/// bDescriptorType OTHER_SPEED_CONFIGURATION, and each endpoint with the
/// largest packet and the polling period that speed allows. Everything else
/// (interfaces, class descriptors) is the same at both speeds.
fn full_speed_configuration(configuration: &[u8]) -> Vec<u8> {
    let mut out = configuration.to_vec();
    let mut at = 0;
    while at + 2 <= out.len() {
        let len = out[at] as usize;
        if len < 2 || at + len > out.len() {
            break;
        }
        let d = &mut out[at..at + len];
        match d[1] {
            DT_CONFIG if at == 0 => d[1] = DT_OTHER_SPEED_CONFIG,
            DT_ENDPOINT if len >= 7 => {
                let ty = TransferType::from_attributes(d[3]);
                // Bits 11..12 are high-bandwidth transactions per microframe,
                // which full speed does not have.
                let mps = u16::from_le_bytes([d[4], d[5]]) & 0x7ff;
                let (mps, interval) = match ty {
                    TransferType::Bulk | TransferType::Control => (mps.min(64), 0),
                    // 2^(b-1) microframes become that many eighths of a frame.
                    TransferType::Interrupt => {
                        let micro = 1u32 << (d[6].clamp(1, 16) - 1);
                        (mps.min(64), (micro / 8).clamp(1, 255) as u8)
                    }
                    // Both speeds count 2^(b-1) of their own (micro)frames.
                    TransferType::Isochronous => (mps.min(1023), d[6].clamp(4, 16) - 3),
                };
                d[4..6].copy_from_slice(&mps.to_le_bytes());
                d[6] = interval;
            }
            _ => {}
        }
        at += len;
    }
    out
}

fn parse_interfaces(body: &[u8]) -> Vec<InterfaceInfo> {
    walk(body)
        .filter(|d| d[1] == DT_INTERFACE && d.len() >= 9 && d[3] == 0)
        .map(|d| InterfaceInfo {
            class: d[5],
            subclass: d[6],
            protocol: d[7],
        })
        .collect()
}

fn parse_endpoints(config: &[u8]) -> Vec<EndpointInfo> {
    let mut out = Vec::new();
    let (mut iface, mut alt) = (0, 0);
    for d in walk(config) {
        match d[1] {
            DT_INTERFACE if d.len() >= 9 => {
                iface = d[2];
                alt = d[3];
            }
            DT_ENDPOINT if d.len() >= 7 => out.push(EndpointInfo {
                address: d[2],
                transfer_type: TransferType::from_attributes(d[3]),
                max_packet_size: u16::from_le_bytes([d[4], d[5]]),
                interval: d[6],
                interface: iface,
                alt_setting: alt,
            }),
            _ => {}
        }
    }
    out
}

/// A 9-byte interface descriptor.
pub fn interface(
    number: u8,
    alt: u8,
    num_endpoints: u8,
    class: u8,
    subclass: u8,
    protocol: u8,
    string: u8,
) -> [u8; 9] {
    [
        9,
        DT_INTERFACE,
        number,
        alt,
        num_endpoints,
        class,
        subclass,
        protocol,
        string,
    ]
}

/// A 7-byte endpoint descriptor.
pub fn endpoint(address: u8, ty: TransferType, max_packet: u16, interval: u8) -> [u8; 7] {
    [
        7,
        DT_ENDPOINT,
        address,
        ty.attributes(),
        max_packet as u8,
        (max_packet >> 8) as u8,
        interval,
    ]
}

/// The bulk max packet size for a speed.
pub fn bulk_max_packet(speed: Speed) -> u16 {
    match speed {
        Speed::Super | Speed::SuperPlus => 1024,
        Speed::High => 512,
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptors {
        let mut body = Vec::new();
        body.extend_from_slice(&interface(0, 0, 2, 0xff, 0, 0, 0));
        body.extend_from_slice(&endpoint(0x81, TransferType::Bulk, 512, 0));
        body.extend_from_slice(&endpoint(0x02, TransferType::Bulk, 512, 0));
        Descriptors::new(
            Speed::High,
            DeviceDescriptor {
                usb_version: 0x0200,
                class: 0,
                subclass: 0,
                protocol: 0,
                max_packet_size0: 64,
                vendor_id: 0x1d6b,
                product_id: 0x0104,
                device_version: 0x0100,
                manufacturer: Some("usbwire".into()),
                product: Some("Test".into()),
                serial: None,
            },
            0,
            100,
            &body,
            &[],
        )
    }

    #[test]
    fn configuration_is_consistent() {
        let d = sample();
        assert_eq!(d.configuration.len(), 9 + 9 + 7 + 7);
        assert_eq!(
            u16::from_le_bytes([d.configuration[2], d.configuration[3]]) as usize,
            d.configuration.len()
        );
        assert_eq!(d.configuration[4], 1, "bNumInterfaces");
        assert_eq!(d.configuration[8], 50, "bMaxPower in 2 mA units");
        assert_eq!(d.endpoints().len(), 2);
        assert_eq!(d.endpoints()[0].transfer_type, TransferType::Bulk);
        assert_eq!(d.device_bytes()[16], 0, "no serial string");
        assert_eq!(d.device_bytes()[8..10], [0x6b, 0x1d]);
    }

    #[test]
    fn strings_are_utf16le() {
        let d = sample();
        assert_eq!(d.string(0).unwrap(), vec![4, 3, 9, 4]);
        assert_eq!(
            d.string(2).unwrap(),
            vec![10, 3, b'T', 0, b'e', 0, b's', 0, b't', 0]
        );
        assert!(d.string(9).is_none());
        assert!(d.device_qualifier().is_some());
    }
}
