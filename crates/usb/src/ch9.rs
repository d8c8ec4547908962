//! Control requests as typed values (USB 2.0 chapter 9).
//!
//! `usbwire-proto` keeps the 8 raw bytes of a setup packet
//! ([`SetupPacket`]); [`Request`] is what they mean: the bmRequestType
//! bit fields as enums, so that handlers match on names, not numbers.
//! [`StateChange`] is the one recogniser of the requests that change
//! device state, which the engine (error holds) and every backend act on.

use usbwire_proto::{Direction, SetupPacket};

/// Bits 5..6 of bmRequestType.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestType {
    Standard,
    Class,
    Vendor,
    Reserved,
}

/// Bits 0..4 of bmRequestType; values 4..31 are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recipient {
    Device,
    Interface,
    Endpoint,
    /// A hub's ports, among others.
    Other,
    Reserved,
}

/// The standard request codes (USB 2.0 table 9-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StandardRequest {
    GetStatus,
    ClearFeature,
    SetFeature,
    SetAddress,
    GetDescriptor,
    SetDescriptor,
    GetConfiguration,
    SetConfiguration,
    GetInterface,
    SetInterface,
    SynchFrame,
}

impl StandardRequest {
    /// `None` for a code table 9-4 does not have (2 and 4 are reserved).
    pub fn from_code(code: u8) -> Option<StandardRequest> {
        Some(match code {
            0 => StandardRequest::GetStatus,
            1 => StandardRequest::ClearFeature,
            3 => StandardRequest::SetFeature,
            5 => StandardRequest::SetAddress,
            6 => StandardRequest::GetDescriptor,
            7 => StandardRequest::SetDescriptor,
            8 => StandardRequest::GetConfiguration,
            9 => StandardRequest::SetConfiguration,
            10 => StandardRequest::GetInterface,
            11 => StandardRequest::SetInterface,
            12 => StandardRequest::SynchFrame,
            _ => return None,
        })
    }

    /// bRequest.
    pub const fn code(self) -> u8 {
        match self {
            StandardRequest::GetStatus => 0,
            StandardRequest::ClearFeature => 1,
            StandardRequest::SetFeature => 3,
            StandardRequest::SetAddress => 5,
            StandardRequest::GetDescriptor => 6,
            StandardRequest::SetDescriptor => 7,
            StandardRequest::GetConfiguration => 8,
            StandardRequest::SetConfiguration => 9,
            StandardRequest::GetInterface => 10,
            StandardRequest::SetInterface => 11,
            StandardRequest::SynchFrame => 12,
        }
    }
}

/// Feature selectors of CLEAR_FEATURE/SET_FEATURE (USB 2.0 table 9-6, and
/// the hub class's port features, USB 2.0 table 11-17).
pub mod feature {
    /// To an endpoint.
    pub const ENDPOINT_HALT: u16 = 0;
    /// To the device.
    pub const DEVICE_REMOTE_WAKEUP: u16 = 1;
    /// To a hub port (recipient Other, class request).
    pub const PORT_RESET: u16 = 4;
}

/// A setup packet with its bmRequestType decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub direction: Direction,
    pub request_type: RequestType,
    pub recipient: Recipient,
    /// bRequest; its meaning depends on `request_type`.
    pub request: u8,
    pub value: u16,
    pub index: u16,
    /// wLength: the most the data stage may carry.
    pub length: u16,
}

impl From<&SetupPacket> for Request {
    fn from(s: &SetupPacket) -> Request {
        let request_type = match (s.request_type >> 5) & 3 {
            0 => RequestType::Standard,
            1 => RequestType::Class,
            2 => RequestType::Vendor,
            _ => RequestType::Reserved,
        };
        let recipient = match s.request_type & 0x1f {
            0 => Recipient::Device,
            1 => Recipient::Interface,
            2 => Recipient::Endpoint,
            3 => Recipient::Other,
            _ => Recipient::Reserved,
        };
        Request {
            direction: s.direction(),
            request_type,
            recipient,
            request: s.request,
            value: s.value,
            index: s.index,
            length: s.length,
        }
    }
}

impl From<SetupPacket> for Request {
    fn from(s: SetupPacket) -> Request {
        Request::from(&s)
    }
}

impl Request {
    /// The standard request this is, `None` for class, vendor and
    /// reserved requests and for codes chapter 9 does not define.
    pub fn standard(&self) -> Option<StandardRequest> {
        match self.request_type {
            RequestType::Standard => StandardRequest::from_code(self.request),
            _ => None,
        }
    }

    /// A class request to an interface, whichever wIndex names: its
    /// bRequest. For a class whose requests check wIndex themselves.
    pub fn interface_class_request(&self) -> Option<u8> {
        let is = self.request_type == RequestType::Class && self.recipient == Recipient::Interface;
        is.then_some(self.request)
    }

    /// A class request to interface `interface` (the low byte of wIndex,
    /// where class specifications put the interface number): its bRequest.
    pub fn class_to_interface(&self, interface: u8) -> Option<u8> {
        self.interface_class_request()
            .filter(|_| self.index as u8 == interface)
    }

    /// GET_DESCRIPTOR's descriptor type: the high byte of wValue.
    pub fn descriptor_type(&self) -> u8 {
        (self.value >> 8) as u8
    }

    /// GET_DESCRIPTOR's descriptor index: the low byte of wValue.
    pub fn descriptor_index(&self) -> u8 {
        self.value as u8
    }

    /// A standard GET_DESCRIPTOR to the device: (type, index).
    pub fn device_descriptor_request(&self) -> Option<(u8, u8)> {
        let is = self.standard() == Some(StandardRequest::GetDescriptor)
            && self.recipient == Recipient::Device;
        is.then(|| (self.descriptor_type(), self.descriptor_index()))
    }
}

/// The control requests that change device state, which whoever runs the
/// device must act on beyond passing them through: the engine ends error
/// holds on them, usbfs has an ioctl for each (the kernel's stub_rx.c
/// recognises the same four), an emulated device resets on the first.
///
/// Only the exact bmRequestType of each is recognised (host to device,
/// standard, and the recipient the request is defined for), as stub_rx.c
/// does: anything else goes through as an ordinary control transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// SET_FEATURE(PORT_RESET) to a hub port: how the importer's hub driver
    /// resets the device (`is_reset_device_cmd` in stub_rx.c).
    PortReset,
    /// CLEAR_FEATURE(ENDPOINT_HALT) of this endpoint address (0x80 for IN).
    ClearHalt { endpoint: u8 },
    /// SET_CONFIGURATION with this wValue; 0 deconfigures.
    SetConfiguration { value: u16 },
    /// SET_INTERFACE: alternate setting wValue of interface wIndex.
    SetInterface { interface: u16, alt_setting: u16 },
}

impl StateChange {
    pub fn recognise(setup: &SetupPacket) -> Option<StateChange> {
        let r = Request::from(setup);
        if r.direction != Direction::Out {
            return None;
        }
        match (r.request_type, r.recipient) {
            (RequestType::Class, Recipient::Other)
                if r.request == StandardRequest::SetFeature.code()
                    && r.value == feature::PORT_RESET =>
            {
                Some(StateChange::PortReset)
            }
            (RequestType::Standard, recipient) => match (r.standard()?, recipient) {
                (StandardRequest::ClearFeature, Recipient::Endpoint)
                    if r.value == feature::ENDPOINT_HALT =>
                {
                    Some(StateChange::ClearHalt {
                        endpoint: r.index as u8,
                    })
                }
                (StandardRequest::SetConfiguration, Recipient::Device) => {
                    Some(StateChange::SetConfiguration { value: r.value })
                }
                (StandardRequest::SetInterface, Recipient::Interface) => {
                    Some(StateChange::SetInterface {
                        interface: r.index,
                        alt_setting: r.value,
                    })
                }
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(request_type: u8, request: u8, value: u16, index: u16) -> SetupPacket {
        SetupPacket {
            request_type,
            request,
            value,
            index,
            length: 0,
        }
    }

    #[test]
    fn request_type_bits_decode_to_names() {
        let r = Request::from(&setup(0xa1, 1, 0x0100, 2));
        assert_eq!(r.direction, Direction::In);
        assert_eq!(r.request_type, RequestType::Class);
        assert_eq!(r.recipient, Recipient::Interface);
        assert_eq!(r.standard(), None);
        assert_eq!(r.class_to_interface(2), Some(1));
        assert_eq!(r.class_to_interface(0), None);
        assert_eq!(r.interface_class_request(), Some(1));
        assert_eq!(
            Request::from(&setup(0xc1, 1, 0, 0)).interface_class_request(),
            None
        );
        let r = Request::from(&setup(0x80, 6, 0x0302, 0x0409));
        assert_eq!(r.standard(), Some(StandardRequest::GetDescriptor));
        assert_eq!(r.device_descriptor_request(), Some((3, 2)));
        assert_eq!(
            Request::from(&setup(0x43, 0, 0, 0)).recipient,
            Recipient::Other
        );
        assert_eq!(
            Request::from(&setup(0x44, 0, 0, 0)).recipient,
            Recipient::Reserved
        );
        assert_eq!(
            Request::from(&setup(0x60, 0, 0, 0)).request_type,
            RequestType::Reserved
        );
        // Reserved codes are no standard request.
        assert_eq!(Request::from(&setup(0x00, 2, 0, 0)).standard(), None);
        assert_eq!(Request::from(&setup(0x00, 13, 0, 0)).standard(), None);
    }

    #[test]
    fn standard_codes_round_trip() {
        for code in 0..=255u8 {
            if let Some(r) = StandardRequest::from_code(code) {
                assert_eq!(r.code(), code);
            }
        }
        assert_eq!(
            (0..=255u8).filter_map(StandardRequest::from_code).count(),
            11
        );
    }

    #[test]
    fn state_changes_are_recognised_with_their_operands() {
        let cases = [
            (setup(0x23, 3, 4, 1), Some(StateChange::PortReset)),
            (
                setup(0x02, 1, 0, 0x81),
                Some(StateChange::ClearHalt { endpoint: 0x81 }),
            ),
            (
                setup(0x00, 9, 1, 0),
                Some(StateChange::SetConfiguration { value: 1 }),
            ),
            (
                setup(0x01, 11, 2, 3),
                Some(StateChange::SetInterface {
                    interface: 3,
                    alt_setting: 2,
                }),
            ),
        ];
        for (s, want) in cases {
            assert_eq!(StateChange::recognise(&s), want, "{s:?}");
        }
    }

    #[test]
    fn near_misses_are_ordinary_requests() {
        for s in [
            // PORT_RESET's neighbours: another port feature, clear instead
            // of set, to the hub itself, a standard SET_FEATURE.
            setup(0x23, 3, 8, 1),
            setup(0x23, 1, 4, 1),
            setup(0x20, 3, 4, 0),
            setup(0x03, 3, 4, 1),
            // Device-to-host, other feature, other recipient.
            setup(0x82, 1, 0, 0x81),
            setup(0x02, 1, 1, 0x81),
            setup(0x00, 1, 0, 0),
            setup(0x01, 9, 1, 0),
            setup(0x80, 9, 1, 0),
            setup(0x00, 11, 0, 0),
            setup(0x21, 11, 0, 0),
            // Vendor request with a standard-looking code.
            setup(0x40, 9, 1, 0),
        ] {
            assert_eq!(StateChange::recognise(&s), None, "{s:?}");
        }
    }
}
