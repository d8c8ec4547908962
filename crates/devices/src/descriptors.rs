//! The descriptor set of an emulated device.
//!
//! Functions build their configuration descriptor as bytes with the
//! builder of `usbwire_usb::descriptor` (through [`interface`] and
//! [`endpoint`] here); [`Descriptors::new`] parses it back once with the
//! same module, so that the endpoint table the server schedules by and the
//! descriptors the host reads can never disagree.

use usbwire_proto::{InterfaceInfo, Speed};

use usbwire_usb::descriptor::{self, Configuration, Endpoint, Interface};
pub use usbwire_usb::descriptor::{
    bulk_max_packet, EndpointInfo, TransferType, DT_BOS, DT_CONFIG, DT_DEVICE, DT_DEVICE_QUALIFIER,
    DT_ENDPOINT, DT_INTERFACE, DT_OTHER_SPEED_CONFIG, DT_SS_ENDPOINT_COMP, DT_STRING,
};

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
        let power_unit = if matches!(speed, Speed::Super | Speed::SuperPlus) {
            8
        } else {
            2
        };
        let header = Configuration {
            total_length: 0,
            num_interfaces: 0,
            value: 1,
            string: 0,
            attributes: 0x80 | attributes,
            max_power: (max_power_ma / power_unit).min(255) as u8,
        };
        let configuration = descriptor::configuration(header, body);
        let string_index = |s: &Option<String>, i: u8| if s.is_some() { i } else { 0 };
        let device_bytes = descriptor::Device {
            usb_version: device.usb_version,
            class: device.class,
            subclass: device.subclass,
            protocol: device.protocol,
            max_packet_size0: device.max_packet_size0,
            vendor_id: device.vendor_id,
            product_id: device.product_id,
            device_version: device.device_version,
            manufacturer: string_index(&device.manufacturer, 1),
            product: string_index(&device.product, 2),
            serial: string_index(&device.serial, 3),
            num_configurations: 1,
        }
        .emit();
        let endpoints = descriptor::endpoints(&configuration).collect();
        let alt_settings = descriptor::interfaces(&configuration)
            .map(|i| (i.number, i.alt_setting))
            .collect();
        let interfaces = descriptor::interfaces(body)
            .filter(|i| i.alt_setting == 0)
            .map(|i| InterfaceInfo {
                class: i.class,
                subclass: i.subclass,
                protocol: i.protocol,
            })
            .collect();
        let other_speed =
            (speed == Speed::High).then(|| descriptor::full_speed_configuration(&configuration));
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
            return Some(descriptor::LANGUAGES.to_vec());
        }
        self.strings
            .get(index as usize - 1)
            .map(|s| descriptor::string(s))
    }

    /// The device qualifier a high-speed capable device must return (USB
    /// 2.0 9.6.2). A full- or low-speed only device has none, and neither
    /// does a SuperSpeed one (USB 3.2 9.6.2): both STALL the request.
    pub fn device_qualifier(&self) -> Option<[u8; 10]> {
        if self.speed != Speed::High {
            return None;
        }
        descriptor::Device::parse(&self.device_bytes).map(|d| d.qualifier())
    }
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
    Interface {
        number,
        alt_setting: alt,
        num_endpoints,
        class,
        subclass,
        protocol,
        string,
    }
    .emit()
}

/// A 7-byte endpoint descriptor.
pub fn endpoint(address: u8, ty: TransferType, max_packet: u16, interval: u8) -> [u8; 7] {
    Endpoint::new(address, ty, max_packet, interval).emit()
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

    /// Every demo device's descriptor set, at every speed it runs at.
    fn demo_devices() -> Vec<(String, Descriptors)> {
        use crate::core::Function;
        let mut out = Vec::new();
        let (kbd, _handle) = crate::hid::HidKeyboard::new();
        out.push(("keyboard".into(), kbd.descriptors().clone()));
        let test = crate::testdev::TestDevice::new();
        out.push(("test device".into(), test.descriptors().clone()));
        let acm = crate::acm::CdcAcm::new(Default::default()).unwrap();
        out.push(("serial".into(), acm.descriptors().clone()));
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(1 << 20).unwrap();
        for speed in [Speed::Full, Speed::High, Speed::Super] {
            let cfg = crate::msc::MscConfig {
                speed,
                ..Default::default()
            };
            let msc = crate::msc::MassStorage::open(image.path(), cfg).unwrap();
            out.push((format!("disk at {speed:?}"), msc.descriptors().clone()));
        }
        out
    }

    #[test]
    fn every_demo_device_parses_back_into_what_built_it() {
        for (name, d) in demo_devices() {
            let mut walk = descriptor::walk(&d.configuration);
            let parsed: Vec<descriptor::Descriptor<'_>> =
                walk.by_ref().map(|r| r.parse()).collect();
            assert!(walk.rest().is_empty(), "{name}: trailing bytes");
            let descriptor::Descriptor::Configuration(header) = parsed[0] else {
                panic!("{name}: no configuration header first");
            };
            assert_eq!(
                usize::from(header.total_length),
                d.configuration.len(),
                "{name}"
            );
            assert_eq!(
                usize::from(header.num_interfaces),
                d.interfaces().len(),
                "{name}"
            );
            let endpoints = parsed
                .iter()
                .filter(|p| matches!(p, descriptor::Descriptor::Endpoint(_)))
                .count();
            assert_eq!(endpoints, d.endpoints().len(), "{name}");
            let device = descriptor::Device::parse(d.device_bytes()).unwrap();
            assert_eq!(device.vendor_id, d.device.vendor_id, "{name}");
            assert_eq!(device.usb_version, d.device.usb_version, "{name}");
            assert_eq!(device.emit(), *d.device_bytes(), "{name}");
            if let Some(other) = d.other_speed_configuration() {
                let mut walk = descriptor::walk(other);
                assert_eq!(walk.by_ref().count(), parsed.len(), "{name}: other speed");
                assert!(walk.rest().is_empty(), "{name}: other speed");
            }
        }
    }
}
