//! The chapter-9 core shared by every emulated device.

use std::io;
use std::task::{Context, Poll};

use usbwire_proto::{Direction, Errno, IsoPacket, SetupPacket};
use usbwire_usb::ch9::feature;
use usbwire_usb::descriptor::Configuration;
use usbwire_usb::{Recipient, Request, RequestType, StandardRequest};

use crate::descriptors::{self, Descriptors, TransferType};

/// Copies a control reply into the data-stage buffer, truncated to the
/// host's wLength as USB requires, and returns the length sent.
pub fn reply(src: &[u8], buf: &mut [u8]) -> usize {
    let n = src.len().min(buf.len());
    buf[..n].copy_from_slice(&src[..n]);
    n
}

/// The class- or vendor-specific part of an emulated device.
///
/// Control handlers return `None` for a request that is not theirs; the
/// core then STALLs it with -EPIPE. Data handlers follow `Future::poll`:
/// `Pending` means the device has nothing to give (or no room to take) yet,
/// the way a real device NAKs, and the function must wake `cx` when that
/// changes. An IN transfer must never complete empty just because there is
/// no data: drivers such as usbhid resubmit at once, and an empty completion
/// becomes a storm of round trips.
pub trait Function: Send + 'static {
    fn descriptors(&self) -> &Descriptors;

    /// A class or vendor request with an IN data stage (or none), and
    /// GET_DESCRIPTOR of a type the core does not know (a HID report
    /// descriptor). Writes at most `buf.len()` bytes and returns how many.
    fn control_in(
        &mut self,
        _setup: &SetupPacket,
        _buf: &mut [u8],
    ) -> Option<Result<usize, Errno>> {
        None
    }

    /// A class or vendor request with an OUT data stage (or none).
    fn control_out(&mut self, _setup: &SetupPacket, _data: &[u8]) -> Option<Result<(), Errno>> {
        None
    }

    /// An IN transfer on endpoint `ep` (address with 0x80). Fills `buf`,
    /// whose length is the URB's transfer_buffer_length, and returns how many
    /// bytes it wrote. Returning -EPIPE halts the endpoint until the host
    /// clears it.
    fn transfer_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>>;

    /// An OUT transfer on endpoint `ep`. Returns how many bytes it took.
    fn transfer_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>>;

    /// An isochronous IN transfer on `ep`. For each packet the function
    /// writes its data at the packet's offset in `buf` (the URB's transfer
    /// buffer) and sets its `actual_length` and `status`, as a host
    /// controller reports them; the core has checked that every packet lies
    /// inside `buf`. An error fails the whole URB instead. Isochronous
    /// transfers never wait: a device that has nothing sends nothing.
    fn iso_in(
        &mut self,
        _ep: u8,
        _packets: &mut [IsoPacket],
        _buf: &mut [u8],
    ) -> Result<(), Errno> {
        Err(Errno::EPIPE)
    }

    /// An isochronous OUT transfer: packet data at the packets' offsets in
    /// `buf`; the function sets each packet's `actual_length` and `status`.
    fn iso_out(&mut self, _ep: u8, _packets: &mut [IsoPacket], _buf: &[u8]) -> Result<(), Errno> {
        Err(Errno::EPIPE)
    }

    /// Asked after each transfer on `ep` that succeeded: `true` halts the
    /// endpoint from then on, the way a gadget calls usb_ep_set_halt() after
    /// looking at data it already acknowledged (f_sourcesink's sink when the
    /// data breaks the pattern). The host sees that transfer succeed and the
    /// next one STALL.
    fn halt_after(&mut self, _ep: u8) -> bool {
        false
    }

    /// The host cleared the endpoint's halt (CLEAR_FEATURE(ENDPOINT_HALT)).
    /// Returns whether the endpoint must stay halted (Bulk-Only Transport
    /// keeps its endpoints stalled until a reset after an invalid CBW).
    fn clear_halt(&mut self, _ep: u8) -> bool {
        false
    }

    /// SET_INTERFACE. The core has checked that the setting exists.
    fn set_interface(&mut self, _interface: u8, _alt: u8) -> Result<(), Errno> {
        Ok(())
    }

    /// SET_CONFIGURATION; 0 deconfigures.
    fn set_configuration(&mut self, _config: u8) {}

    /// A USB port reset: back to the default state, pending work dropped.
    fn reset(&mut self) {}

    /// Makes acknowledged writes durable (a clean shutdown or SYNCHRONIZE CACHE).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A [`Function`] plus the state every USB device has: its configuration,
/// the alternate setting of each interface, and which endpoints are halted.
pub struct EmulatedDevice {
    function: Box<dyn Function>,
    configuration: u8,
    alt: [u8; 32],
    /// Bit n: OUT endpoint n halted; bit 16+n: IN endpoint n halted.
    halted: u32,
    /// SET_FEATURE(DEVICE_REMOTE_WAKEUP), on a configuration that can.
    remote_wakeup: bool,
}

fn ep_bit(ep: u8) -> u32 {
    let n = u32::from(ep & 0x0f);
    if ep & 0x80 != 0 {
        1 << (16 + n)
    } else {
        1 << n
    }
}

impl EmulatedDevice {
    pub fn new(function: impl Function) -> Self {
        Self::from_box(Box::new(function))
    }

    pub fn from_box(function: Box<dyn Function>) -> Self {
        EmulatedDevice {
            function,
            configuration: 0,
            alt: [0; 32],
            halted: 0,
            remote_wakeup: false,
        }
    }

    pub fn descriptors(&self) -> &Descriptors {
        self.function.descriptors()
    }

    pub fn configuration(&self) -> u8 {
        self.configuration
    }

    pub fn function_mut(&mut self) -> &mut dyn Function {
        &mut *self.function
    }

    /// The transfer type of endpoint `ep` (address with 0x80 for IN) in the
    /// current alternate settings; endpoint 0 is control.
    pub fn endpoint_type(&self, ep: u8) -> Option<TransferType> {
        if ep & 0x0f == 0 {
            return Some(TransferType::Control);
        }
        self.descriptors()
            .endpoint(ep, |i| self.alt.get(i as usize).copied().unwrap_or(0))
            .map(|e| e.transfer_type)
    }

    pub fn is_halted(&self, ep: u8) -> bool {
        self.halted & ep_bit(ep) != 0
    }

    /// A port reset: default state, halts cleared, configuration dropped.
    pub fn reset(&mut self) {
        self.configuration = 0;
        self.alt = [0; 32];
        self.halted = 0;
        self.remote_wakeup = false;
        self.function.reset();
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.function.flush()
    }

    /// Runs a control transfer on endpoint 0. `out` is the OUT data stage;
    /// for IN, `buf` receives the data stage and its length is wLength
    /// (or less). Returns the data stage's length, as a host controller
    /// reports it in actual_length: bytes sent for IN, bytes taken for OUT
    /// (usb_control_msg returns it, and usbtest's control write test checks
    /// it). Control transfers complete at once.
    pub fn control(
        &mut self,
        setup: &SetupPacket,
        out: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let request = Request::from(setup);
        if request.request_type == RequestType::Standard {
            if let Some(r) = self.standard(&request, buf) {
                return r;
            }
        }
        let r = if request.direction == Direction::In {
            let n = buf.len().min(setup.length as usize);
            self.function.control_in(setup, &mut buf[..n])
        } else {
            let data = &out[..out.len().min(usize::from(setup.length))];
            self.function
                .control_out(setup, data)
                .map(|r| r.map(|()| data.len()))
        };
        r.unwrap_or(Err(Errno::EPIPE))
    }

    /// Chapter 9 requests (USB 2.0 9.4). `None` hands the request to the
    /// function (class descriptors reached through GET_DESCRIPTOR, for
    /// example). Requests about interfaces and endpoints other than 0 are
    /// only valid once configured, and wIndex must name one that exists in
    /// the current settings; anything else is a request error, a STALL.
    fn standard(&mut self, r: &Request, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        let Some(request) = r.standard() else {
            return Some(Err(Errno::EPIPE));
        };
        let w_length = buf.len().min(usize::from(r.length));
        let buf = &mut buf[..w_length];
        let result = match (request, r.recipient) {
            (StandardRequest::GetDescriptor, Recipient::Device) => {
                return self.get_descriptor(r, buf)
            }
            // Interface-recipient GET_DESCRIPTOR is class territory (HID).
            (StandardRequest::GetDescriptor, _) => return None,
            (StandardRequest::GetConfiguration, Recipient::Device) => {
                Ok(reply(&[self.configuration], buf))
            }
            (StandardRequest::SetConfiguration, Recipient::Device) => {
                self.set_configuration(r.value)
            }
            (StandardRequest::GetInterface, Recipient::Interface) => {
                match self.interface(r.index) {
                    Some(i) => Ok(reply(&[self.alt[i]], buf)),
                    None => Err(Errno::EPIPE),
                }
            }
            (StandardRequest::SetInterface, Recipient::Interface) => {
                self.set_interface(r.index, r.value)
            }
            (StandardRequest::GetStatus, recipient) => self.get_status(recipient, r.index, buf),
            (StandardRequest::ClearFeature, recipient) => {
                self.set_feature(recipient, r.value, r.index, false)
            }
            (StandardRequest::SetFeature, recipient) => {
                self.set_feature(recipient, r.value, r.index, true)
            }
            // The address is the host controller's business; over USB/IP
            // vhci never forwards it, but a raw client may send it.
            (StandardRequest::SetAddress, Recipient::Device) => Ok(0),
            _ => Err(Errno::EPIPE),
        };
        Some(result)
    }

    /// GET_DESCRIPTOR to the device, `buf` already cut to wLength. `None`
    /// for the types the function answers.
    fn get_descriptor(&self, r: &Request, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        let d = self.function.descriptors();
        let index = r.descriptor_index();
        // Borrowed where the bytes already exist: enumeration and
        // benchmarks ask for descriptors in a loop.
        let bytes: Option<std::borrow::Cow<'_, [u8]>> = match r.descriptor_type() {
            descriptors::DT_DEVICE => Some(d.device_bytes()[..].into()),
            descriptors::DT_CONFIG if index == 0 => Some(d.configuration[..].into()),
            descriptors::DT_STRING => d.string(index).map(Into::into),
            // Both or neither (USB 2.0 9.6.2): only a device that can
            // also run at the other speed describes it.
            descriptors::DT_DEVICE_QUALIFIER => d.device_qualifier().map(|q| q.to_vec().into()),
            descriptors::DT_OTHER_SPEED_CONFIG if index == 0 => {
                d.other_speed_configuration().map(Into::into)
            }
            // BOS exists from bcdUSB 0x0201 (USB 2.0 LPM) on; the
            // function has it if the device has one.
            descriptors::DT_BOS if d.device.usb_version >= 0x0201 => return None,
            // Not a standard type: a class type the function may have.
            t if t >= 0x20 => return None,
            _ => None,
        };
        Some(match bytes {
            Some(b) => Ok(reply(&b, buf)),
            None => Err(Errno::EPIPE),
        })
    }

    /// SET_CONFIGURATION: the one configuration, or 0 to deconfigure.
    fn set_configuration(&mut self, value: u16) -> Result<usize, Errno> {
        if value != 0 && value != u16::from(self.descriptors().config_value()) {
            return Err(Errno::EPIPE);
        }
        self.configuration = value as u8;
        self.alt = [0; 32];
        self.halted = 0;
        self.function.set_configuration(value as u8);
        Ok(0)
    }

    /// SET_INTERFACE: a setting the configuration has, if the function
    /// takes it.
    fn set_interface(&mut self, w_index: u16, w_value: u16) -> Result<usize, Errno> {
        let Some(i) = self.interface(w_index) else {
            return Err(Errno::EPIPE);
        };
        let Ok(alt) = u8::try_from(w_value) else {
            return Err(Errno::EPIPE);
        };
        if !self.descriptors().has_alt_setting(i as u8, alt) {
            return Err(Errno::EPIPE);
        }
        self.function.set_interface(i as u8, alt)?;
        self.alt[i] = alt;
        // Endpoints of the interface restart with DATA0 and no halt.
        let halted = self
            .descriptors()
            .endpoints()
            .iter()
            .filter(|e| usize::from(e.interface) == i)
            .fold(0, |m, e| m | ep_bit(e.address));
        self.halted &= !halted;
        Ok(0)
    }

    /// GET_STATUS of the device, an interface or an endpoint.
    fn get_status(
        &self,
        recipient: Recipient,
        w_index: u16,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let status = match recipient {
            Recipient::Device => {
                // Self-powered from bmAttributes; remote wakeup as the host set it.
                let self_powered = self.attributes() & Configuration::SELF_POWERED != 0;
                u8::from(self_powered) | u8::from(self.remote_wakeup) << 1
            }
            Recipient::Interface => match self.interface(w_index) {
                Some(_) => 0,
                None => return Err(Errno::EPIPE),
            },
            Recipient::Endpoint => match self.endpoint_index(w_index) {
                Some(ep) => u8::from(self.is_halted(ep)),
                None => return Err(Errno::EPIPE),
            },
            Recipient::Other | Recipient::Reserved => return Err(Errno::EPIPE),
        };
        Ok(reply(&[status, 0], buf))
    }

    /// SET_FEATURE (`set`) or CLEAR_FEATURE: an endpoint's halt, or the
    /// device's remote wakeup.
    fn set_feature(
        &mut self,
        recipient: Recipient,
        selector: u16,
        w_index: u16,
        set: bool,
    ) -> Result<usize, Errno> {
        match (recipient, selector) {
            (Recipient::Endpoint, feature::ENDPOINT_HALT) => {
                let Some(ep) = self.endpoint_index(w_index) else {
                    return Err(Errno::EPIPE);
                };
                if set {
                    // Endpoint 0 never halts.
                    if ep & 0x0f == 0 {
                        return Err(Errno::EPIPE);
                    }
                    self.halted |= ep_bit(ep);
                } else {
                    self.halted &= !ep_bit(ep);
                    if ep & 0x0f != 0 && self.function.clear_halt(ep) {
                        self.halted |= ep_bit(ep);
                    }
                }
                Ok(0)
            }
            // Only a configuration that says it can wake the host has the
            // feature; setting one that does not exist is a request error.
            (Recipient::Device, feature::DEVICE_REMOTE_WAKEUP)
                if self.attributes() & Configuration::REMOTE_WAKEUP != 0 =>
            {
                self.remote_wakeup = set;
                Ok(0)
            }
            _ => Err(Errno::EPIPE),
        }
    }

    /// bmAttributes of the configuration.
    fn attributes(&self) -> u8 {
        Configuration::parse(&self.descriptors().configuration).map_or(0, |c| c.attributes)
    }

    /// The interface wIndex names, if configured and the configuration has it.
    fn interface(&self, w_index: u16) -> Option<usize> {
        let i = usize::from(w_index);
        let exists = i < self.descriptors().interfaces().len() && i < self.alt.len();
        (self.configuration != 0 && exists).then_some(i)
    }

    /// The endpoint wIndex names (address with 0x80 for IN): endpoint 0
    /// always, others once configured and present in the current settings.
    fn endpoint_index(&self, w_index: u16) -> Option<u8> {
        // The upper byte and bits 4..6 are reserved (USB 2.0 figure 9-2).
        if w_index & 0xff70 != 0 {
            return None;
        }
        let ep = w_index as u8;
        let exists =
            ep & 0x0f == 0 || (self.configuration != 0 && self.endpoint_type(ep).is_some());
        exists.then_some(ep)
    }

    /// Checks that a data transfer may run: configured, endpoint present in
    /// the current settings, not halted.
    fn check_data(&self, ep: u8) -> Result<(), Errno> {
        if self.configuration == 0 || self.endpoint_type(ep).is_none() {
            return Err(Errno::EPIPE);
        }
        if self.is_halted(ep) {
            return Err(Errno::EPIPE);
        }
        Ok(())
    }

    /// Halts `ep` after a transfer that stalled, or one after which the
    /// function wants it halted.
    fn track_halt(&mut self, ep: u8, r: Poll<Result<usize, Errno>>) -> Poll<Result<usize, Errno>> {
        match r {
            Poll::Ready(Err(Errno::EPIPE)) => self.halted |= ep_bit(ep),
            Poll::Ready(Ok(_)) if self.function.halt_after(ep) => self.halted |= ep_bit(ep),
            _ => {}
        }
        r
    }

    /// Checks an isochronous transfer: an isochronous endpoint of the
    /// current settings, at least one packet, every packet inside `len` and
    /// all of them together no longer than it (overlapping packets could
    /// otherwise add up to more data than the buffer holds).
    fn check_iso(&self, ep: u8, packets: &[IsoPacket], len: usize) -> Result<(), Errno> {
        self.check_data(ep)?;
        if self.endpoint_type(ep) != Some(TransferType::Isochronous) {
            return Err(Errno::EPIPE);
        }
        let inside = |p: &IsoPacket| {
            (p.offset as usize)
                .checked_add(p.length as usize)
                .is_some_and(|end| end <= len)
        };
        let total = packets
            .iter()
            .try_fold(0usize, |sum, p| sum.checked_add(p.length as usize));
        if packets.is_empty() || !packets.iter().all(inside) || total.is_none_or(|t| t > len) {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// An isochronous IN transfer on `ep`: each packet's data lands at its
    /// offset in `buf`, with its `actual_length` and `status` set.
    pub fn iso_in(
        &mut self,
        ep: u8,
        packets: &mut [IsoPacket],
        buf: &mut [u8],
    ) -> Result<(), Errno> {
        self.check_iso(ep, packets, buf.len())?;
        self.function.iso_in(ep, packets, buf)
    }

    /// An isochronous OUT transfer on `ep`, packet data at the packets'
    /// offsets in `buf`.
    pub fn iso_out(&mut self, ep: u8, packets: &mut [IsoPacket], buf: &[u8]) -> Result<(), Errno> {
        self.check_iso(ep, packets, buf.len())?;
        self.function.iso_out(ep, packets, buf)
    }

    /// An IN data transfer on endpoint `ep` (address with 0x80).
    pub fn poll_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        if let Err(e) = self.check_data(ep) {
            return Poll::Ready(Err(e));
        }
        let r = self.function.transfer_in(ep, buf, cx);
        self.track_halt(ep, r)
    }

    /// An OUT data transfer on endpoint `ep`.
    pub fn poll_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        if let Err(e) = self.check_data(ep) {
            return Poll::Ready(Err(e));
        }
        let r = self.function.transfer_out(ep, data, cx);
        self.track_halt(ep, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptors::{endpoint, interface, DeviceDescriptor};
    use crate::test_util::setup;
    use usbwire_proto::Speed;

    /// Request codes and feature selectors as the tests send them.
    mod req {
        pub use usbwire_usb::ch9::feature::{DEVICE_REMOTE_WAKEUP, ENDPOINT_HALT};
        use usbwire_usb::StandardRequest;
        pub const GET_STATUS: u8 = StandardRequest::GetStatus.code();
        pub const CLEAR_FEATURE: u8 = StandardRequest::ClearFeature.code();
        pub const SET_FEATURE: u8 = StandardRequest::SetFeature.code();
        pub const GET_DESCRIPTOR: u8 = StandardRequest::GetDescriptor.code();
        pub const GET_CONFIGURATION: u8 = StandardRequest::GetConfiguration.code();
        pub const SET_CONFIGURATION: u8 = StandardRequest::SetConfiguration.code();
        pub const GET_INTERFACE: u8 = StandardRequest::GetInterface.code();
        pub const SET_INTERFACE: u8 = StandardRequest::SetInterface.code();
    }

    /// A function with a chosen speed, bcdUSB and configuration attributes:
    /// interface 0 with bulk IN 0x81, interrupt IN 0x82 (alt 0) and an
    /// isochronous OUT 0x03 in alt 1; interface 1 with no endpoints. It
    /// answers BOS itself, so that the core's gate on bcdUSB shows.
    struct Probe {
        descriptors: Descriptors,
    }

    impl Probe {
        fn new(speed: Speed, usb_version: u16, attributes: u8) -> Probe {
            let hs = speed == Speed::High;
            let mut body = Vec::new();
            body.extend_from_slice(&interface(0, 0, 2, 0xff, 0, 0, 0));
            let bulk = descriptors::bulk_max_packet(speed);
            body.extend_from_slice(&endpoint(0x81, TransferType::Bulk, bulk, 0));
            // Every 2^(6-1) = 32 microframes: 4 ms.
            let (int_mps, int_ival) = if hs { (512 | 1 << 11, 6) } else { (64, 4) };
            body.extend_from_slice(&endpoint(0x82, TransferType::Interrupt, int_mps, int_ival));
            body.extend_from_slice(&interface(0, 1, 1, 0xff, 0, 0, 0));
            body.extend_from_slice(&endpoint(
                0x03,
                TransferType::Isochronous,
                1024 | 2 << 11,
                4,
            ));
            // A class descriptor, which other speed keeps as it is.
            body.extend_from_slice(&[4, 0x24, 0x55, 0x66]);
            body.extend_from_slice(&interface(1, 0, 0, 0x0a, 0, 0, 0));
            let device = DeviceDescriptor {
                usb_version,
                class: 0,
                subclass: 0,
                protocol: 0,
                max_packet_size0: 64,
                vendor_id: 0x1234,
                product_id: 0x5678,
                device_version: 0x0100,
                manufacturer: Some("m".into()),
                product: None,
                serial: None,
            };
            Probe {
                descriptors: Descriptors::new(speed, device, attributes, 100, &body, &[]),
            }
        }
    }

    impl Function for Probe {
        fn descriptors(&self) -> &Descriptors {
            &self.descriptors
        }

        fn control_in(&mut self, s: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
            ((s.value >> 8) as u8 == descriptors::DT_BOS)
                .then(|| Ok(reply(&[5, descriptors::DT_BOS, 5, 0, 0], buf)))
        }

        fn transfer_in(
            &mut self,
            _: u8,
            _: &mut [u8],
            _: &mut Context<'_>,
        ) -> Poll<Result<usize, Errno>> {
            Poll::Ready(Ok(0))
        }

        fn transfer_out(
            &mut self,
            _: u8,
            d: &[u8],
            _: &mut Context<'_>,
        ) -> Poll<Result<usize, Errno>> {
            Poll::Ready(Ok(d.len()))
        }
    }

    fn device(speed: Speed) -> EmulatedDevice {
        EmulatedDevice::new(Probe::new(speed, 0x0200, 0))
    }

    fn get(
        dev: &mut EmulatedDevice,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        len: u16,
    ) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; usize::from(len)];
        let n = dev.control(
            &setup(request_type, request, value, index, len),
            &[],
            &mut buf,
        )?;
        buf.truncate(n);
        Ok(buf)
    }

    fn descriptor(dev: &mut EmulatedDevice, ty: u8, index: u8, len: u16) -> Result<Vec<u8>, Errno> {
        get(
            dev,
            0x80,
            req::GET_DESCRIPTOR,
            u16::from(ty) << 8 | u16::from(index),
            0,
            len,
        )
    }

    fn set(
        dev: &mut EmulatedDevice,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
    ) -> Result<usize, Errno> {
        dev.control(&setup(request_type, request, value, index, 0), &[], &mut [])
    }

    #[test]
    fn other_speed_configuration_is_the_full_speed_one() {
        let mut dev = device(Speed::High);
        let config = descriptor(&mut dev, descriptors::DT_CONFIG, 0, 255).unwrap();
        let other = descriptor(&mut dev, descriptors::DT_OTHER_SPEED_CONFIG, 0, 255).unwrap();
        assert_eq!(
            other.len(),
            config.len(),
            "same descriptors, same wTotalLength"
        );
        assert_eq!(other[1], 7, "bDescriptorType OTHER_SPEED_CONFIGURATION");
        assert_eq!(other[0], 9);
        assert_eq!(
            other[2..9],
            config[2..9],
            "totals, interfaces, value, attributes, power"
        );
        // Interface 0 alt 0: bulk 512 -> 64; interrupt 512 x2 every 4 ms -> 64 every 4 frames.
        let at = 9 + 9;
        assert_eq!(other[at..at + 7], [7, 5, 0x81, 2, 64, 0, 0]);
        assert_eq!(other[at + 7..at + 14], [7, 5, 0x82, 3, 64, 0, 4]);
        // Alt 1: isochronous 1024 x3 every 8 microframes -> 1023 every frame.
        let at = at + 14 + 9;
        assert_eq!(other[at..at + 7], [7, 5, 0x03, 1, 0xff, 0x03, 1]);
        // Interfaces and the class descriptor are unchanged.
        assert_eq!(other[9..18], config[9..18]);
        assert_eq!(other[at + 7..], config[at + 7..]);
        // Truncated to wLength like any descriptor; index 1 does not exist.
        assert_eq!(descriptor(&mut dev, 7, 0, 9).unwrap(), other[..9]);
        assert_eq!(descriptor(&mut dev, 7, 1, 255), Err(Errno::EPIPE));
        // The qualifier that goes with it.
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_DEVICE_QUALIFIER, 0, 10).unwrap(),
            [10, 6, 0x00, 0x02, 0, 0, 0, 64, 1, 0]
        );
    }

    #[test]
    fn a_device_that_runs_at_one_speed_stalls_qualifier_and_other_speed() {
        for speed in [Speed::Full, Speed::Low, Speed::Super] {
            let mut dev = device(speed);
            assert_eq!(
                descriptor(&mut dev, 6, 0, 10),
                Err(Errno::EPIPE),
                "{speed:?}"
            );
            assert_eq!(
                descriptor(&mut dev, 7, 0, 255),
                Err(Errno::EPIPE),
                "{speed:?}"
            );
            assert!(dev.descriptors().other_speed_configuration().is_none());
        }
    }

    #[test]
    fn bos_only_from_bcd_usb_0201() {
        let mut dev = device(Speed::High);
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_BOS, 0, 5),
            Err(Errno::EPIPE)
        );
        for version in [0x0201, 0x0210, 0x0300] {
            let mut dev = EmulatedDevice::new(Probe::new(Speed::High, version, 0));
            assert_eq!(
                descriptor(&mut dev, descriptors::DT_BOS, 0, 5)
                    .unwrap()
                    .len(),
                5
            );
        }
    }

    #[test]
    fn descriptor_requests_usbtest_expects_to_stall_do() {
        let mut dev = device(Speed::High);
        set(&mut dev, 0, req::SET_CONFIGURATION, 1, 0).unwrap();
        // Test 10's subcases 7 and 11, and what no device has.
        for ty in [
            descriptors::DT_INTERFACE,
            descriptors::DT_ENDPOINT,
            0x0b,
            0x10,
        ] {
            assert_eq!(
                descriptor(&mut dev, ty, 0, 9),
                Err(Errno::EPIPE),
                "type {ty}"
            );
        }
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_CONFIG, 1, 9),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_STRING, 4, 255),
            Err(Errno::EPIPE)
        );
        // String 0 is the language list; asked for 9 bytes it is short.
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_STRING, 0, 9).unwrap(),
            [4, 3, 9, 4]
        );
        assert_eq!(
            descriptor(&mut dev, descriptors::DT_STRING, 1, 255).unwrap(),
            [4, 3, b'm', 0]
        );
    }

    #[test]
    fn get_status_of_device_interface_and_endpoint() {
        let mut dev = EmulatedDevice::new(Probe::new(Speed::High, 0x0200, 0x40));
        // Device: self-powered from bmAttributes, no remote wakeup.
        assert_eq!(
            get(&mut dev, 0x80, req::GET_STATUS, 0, 0, 2).unwrap(),
            [1, 0]
        );
        // Before SET_CONFIGURATION only endpoint 0 answers.
        assert_eq!(
            get(&mut dev, 0x81, req::GET_STATUS, 0, 0, 2),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0x81, 2),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0, 2).unwrap(),
            [0, 0]
        );
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0x80, 2).unwrap(),
            [0, 0]
        );
        set(&mut dev, 0, req::SET_CONFIGURATION, 1, 0).unwrap();
        for i in [0, 1] {
            assert_eq!(
                get(&mut dev, 0x81, req::GET_STATUS, 0, i, 2).unwrap(),
                [0, 0]
            );
        }
        assert_eq!(
            get(&mut dev, 0x81, req::GET_STATUS, 0, 2, 2),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0x81, 2).unwrap(),
            [0, 0]
        );
        set(&mut dev, 0x02, req::SET_FEATURE, req::ENDPOINT_HALT, 0x81).unwrap();
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0x81, 2).unwrap(),
            [1, 0]
        );
        // Not in the current settings, the wrong direction, reserved bits.
        for ep in [0x03, 0x01, 0x91, 0x0181] {
            assert_eq!(
                get(&mut dev, 0x82, req::GET_STATUS, 0, ep, 2),
                Err(Errno::EPIPE),
                "{ep:#x}"
            );
        }
        // The isochronous endpoint exists once its alternate setting is chosen.
        set(&mut dev, 0x01, req::SET_INTERFACE, 1, 0).unwrap();
        assert_eq!(
            get(&mut dev, 0x82, req::GET_STATUS, 0, 0x03, 2).unwrap(),
            [0, 0]
        );
        // Endpoint 0 never halts.
        assert_eq!(
            set(&mut dev, 0x02, req::SET_FEATURE, req::ENDPOINT_HALT, 0),
            Err(Errno::EPIPE)
        );
    }

    #[test]
    fn remote_wakeup_only_where_the_configuration_has_it() {
        let mut dev = device(Speed::High);
        assert_eq!(
            set(&mut dev, 0, req::SET_FEATURE, req::DEVICE_REMOTE_WAKEUP, 0),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            get(&mut dev, 0x80, req::GET_STATUS, 0, 0, 2).unwrap(),
            [0, 0]
        );
        let mut dev = EmulatedDevice::new(Probe::new(Speed::High, 0x0200, 0x20));
        set(&mut dev, 0, req::SET_FEATURE, req::DEVICE_REMOTE_WAKEUP, 0).unwrap();
        assert_eq!(
            get(&mut dev, 0x80, req::GET_STATUS, 0, 0, 2).unwrap(),
            [2, 0]
        );
        set(
            &mut dev,
            0,
            req::CLEAR_FEATURE,
            req::DEVICE_REMOTE_WAKEUP,
            0,
        )
        .unwrap();
        assert_eq!(
            get(&mut dev, 0x80, req::GET_STATUS, 0, 0, 2).unwrap(),
            [0, 0]
        );
        set(&mut dev, 0, req::SET_FEATURE, req::DEVICE_REMOTE_WAKEUP, 0).unwrap();
        dev.reset();
        assert_eq!(
            get(&mut dev, 0x80, req::GET_STATUS, 0, 0, 2).unwrap(),
            [0, 0]
        );
    }

    #[test]
    fn get_and_set_interface_and_configuration() {
        let mut dev = device(Speed::High);
        assert_eq!(
            get(&mut dev, 0x80, req::GET_CONFIGURATION, 0, 0, 1).unwrap(),
            [0]
        );
        // Interfaces exist only in the configured state.
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 0, 1),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            set(&mut dev, 0x01, req::SET_INTERFACE, 0, 0),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            set(&mut dev, 0, req::SET_CONFIGURATION, 2, 0),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            set(&mut dev, 0, req::SET_CONFIGURATION, 0x0101, 0),
            Err(Errno::EPIPE)
        );
        set(&mut dev, 0, req::SET_CONFIGURATION, 1, 0).unwrap();
        assert_eq!(
            get(&mut dev, 0x80, req::GET_CONFIGURATION, 0, 0, 1).unwrap(),
            [1]
        );
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 0, 1).unwrap(),
            [0]
        );
        set(&mut dev, 0x01, req::SET_INTERFACE, 1, 0).unwrap();
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 0, 1).unwrap(),
            [1]
        );
        assert_eq!(dev.endpoint_type(0x03), Some(TransferType::Isochronous));
        assert_eq!(dev.endpoint_type(0x81), None, "alt 1 has no bulk endpoint");
        // An alternate setting without endpoints exists too.
        set(&mut dev, 0x01, req::SET_INTERFACE, 0, 1).unwrap();
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 1, 1).unwrap(),
            [0]
        );
        for (alt, i) in [(2, 0), (1, 1), (0, 2), (0x0100, 0)] {
            assert_eq!(
                set(&mut dev, 0x01, req::SET_INTERFACE, alt, i),
                Err(Errno::EPIPE),
                "alt {alt} of {i}"
            );
        }
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 2, 1),
            Err(Errno::EPIPE)
        );
        assert_eq!(
            get(&mut dev, 0x81, req::GET_INTERFACE, 0, 0x0100, 1),
            Err(Errno::EPIPE)
        );
        // Deconfigured: back to the address state.
        set(&mut dev, 0, req::SET_CONFIGURATION, 0, 0).unwrap();
        assert_eq!(
            get(&mut dev, 0x81, req::GET_STATUS, 0, 0, 2),
            Err(Errno::EPIPE)
        );
    }

    #[test]
    fn iso_transfers_are_checked_before_the_function_sees_them() {
        let mut dev = device(Speed::High);
        set(&mut dev, 0, req::SET_CONFIGURATION, 1, 0).unwrap();
        let packet = |offset, length| IsoPacket {
            offset,
            length,
            actual_length: 0,
            status: 0,
        };
        let buf = [0u8; 100];
        // Not in the current alternate setting.
        assert_eq!(
            dev.iso_out(0x03, &mut [packet(0, 10)], &buf),
            Err(Errno::EPIPE)
        );
        set(&mut dev, 0x01, req::SET_INTERFACE, 1, 0).unwrap();
        // No packets, one past the buffer, overlapping ones that add up to more.
        assert_eq!(dev.iso_out(0x03, &mut [], &buf), Err(Errno::EINVAL));
        assert_eq!(
            dev.iso_out(0x03, &mut [packet(95, 10)], &buf),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dev.iso_out(0x03, &mut [packet(u32::MAX, 2)], &buf),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dev.iso_out(0x03, &mut [packet(0, 60), packet(0, 60)], &buf),
            Err(Errno::EINVAL)
        );
        // Not isochronous: the bulk path is the one for it.
        set(&mut dev, 0x01, req::SET_INTERFACE, 0, 0).unwrap();
        assert_eq!(
            dev.iso_out(0x81, &mut [packet(0, 10)], &buf),
            Err(Errno::EPIPE)
        );
    }
}
