//! The chapter-9 core shared by every emulated device.

use std::io;
use std::task::{Context, Poll};

use usbwire_proto::{Errno, SetupPacket};

use crate::descriptors::{self, Descriptors, TransferType};

/// Standard request codes (USB 2.0 table 9-4).
pub mod req {
    pub const GET_STATUS: u8 = 0;
    pub const CLEAR_FEATURE: u8 = 1;
    pub const SET_FEATURE: u8 = 3;
    pub const SET_ADDRESS: u8 = 5;
    pub const GET_DESCRIPTOR: u8 = 6;
    pub const SET_DESCRIPTOR: u8 = 7;
    pub const GET_CONFIGURATION: u8 = 8;
    pub const SET_CONFIGURATION: u8 = 9;
    pub const GET_INTERFACE: u8 = 10;
    pub const SET_INTERFACE: u8 = 11;
    /// Feature selector for CLEAR/SET_FEATURE on an endpoint.
    pub const ENDPOINT_HALT: u16 = 0;
    pub const DEVICE_REMOTE_WAKEUP: u16 = 1;
}

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
        self.function.reset();
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.function.flush()
    }

    /// Runs a control transfer on endpoint 0. `out` is the OUT data stage;
    /// for IN, `buf` receives the data stage and its length is wLength
    /// (or less). Control transfers complete at once.
    pub fn control(
        &mut self,
        setup: &SetupPacket,
        out: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        if setup.kind() == 0 {
            if let Some(r) = self.standard(setup, buf) {
                return r;
            }
        }
        let r = if setup.direction() == usbwire_proto::Direction::In {
            let n = buf.len().min(setup.length as usize);
            self.function.control_in(setup, &mut buf[..n])
        } else {
            self.function.control_out(setup, out).map(|r| r.map(|()| 0))
        };
        r.unwrap_or(Err(Errno::EPIPE))
    }

    fn copy_out(data: &[u8], buf: &mut [u8], w_length: u16) -> Result<usize, Errno> {
        let n = buf.len().min(w_length as usize);
        Ok(reply(data, &mut buf[..n]))
    }

    /// Chapter 9 requests. `None` hands the request to the function
    /// (class descriptors reached through GET_DESCRIPTOR, for example).
    fn standard(&mut self, s: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        let recipient = s.recipient();
        let r = match (s.request, recipient) {
            (req::GET_DESCRIPTOR, 0) => {
                let d = self.function.descriptors();
                let index = s.value as u8;
                // Borrowed where the bytes already exist: enumeration and
                // benchmarks ask for descriptors in a loop.
                let bytes: Option<std::borrow::Cow<'_, [u8]>> = match (s.value >> 8) as u8 {
                    descriptors::DT_DEVICE => Some(d.device_bytes()[..].into()),
                    descriptors::DT_CONFIG if index == 0 => Some(d.configuration[..].into()),
                    descriptors::DT_STRING => d.string(index).map(Into::into),
                    descriptors::DT_DEVICE_QUALIFIER => {
                        d.device_qualifier().map(|q| q.to_vec().into())
                    }
                    // Not a standard type the core knows (BOS, or a
                    // class type): the function may have it.
                    descriptors::DT_BOS => return None,
                    t if t >= 0x20 => return None,
                    _ => None,
                };
                match bytes {
                    Some(b) => Self::copy_out(&b, buf, s.length),
                    None => Err(Errno::EPIPE),
                }
            }
            // Interface-recipient GET_DESCRIPTOR is class territory (HID).
            (req::GET_DESCRIPTOR, _) => return None,
            (req::GET_CONFIGURATION, 0) => Self::copy_out(&[self.configuration], buf, s.length),
            (req::SET_CONFIGURATION, 0) => {
                let v = s.value as u8;
                if v != 0 && v != self.descriptors().config_value() {
                    Err(Errno::EPIPE)
                } else {
                    self.configuration = v;
                    self.alt = [0; 32];
                    self.halted = 0;
                    self.function.set_configuration(v);
                    Ok(0)
                }
            }
            (req::GET_INTERFACE, 1) => {
                let i = s.index as u8;
                if self.configuration == 0 || i as usize >= self.descriptors().interfaces().len() {
                    Err(Errno::EPIPE)
                } else {
                    Self::copy_out(&[self.alt[i as usize % 32]], buf, s.length)
                }
            }
            (req::SET_INTERFACE, 1) => {
                let (i, alt) = (s.index as u8, s.value as u8);
                let exists = self
                    .descriptors()
                    .endpoints()
                    .iter()
                    .any(|e| e.interface == i && e.alt_setting == alt)
                    || (alt == 0 && (i as usize) < self.descriptors().interfaces().len());
                if !exists || i >= 32 {
                    Err(Errno::EPIPE)
                } else {
                    match self.function.set_interface(i, alt) {
                        Ok(()) => {
                            self.alt[i as usize] = alt;
                            // Endpoints of the interface restart with DATA0 and no halt.
                            let eps: Vec<u8> = self
                                .descriptors()
                                .endpoints()
                                .iter()
                                .filter(|e| e.interface == i)
                                .map(|e| e.address)
                                .collect();
                            for ep in eps {
                                self.halted &= !ep_bit(ep);
                            }
                            Ok(0)
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            (req::GET_STATUS, 0) => {
                // Self-powered bit from bmAttributes.
                let self_powered = (self.descriptors().configuration[7] >> 6) & 1;
                Self::copy_out(&[self_powered, 0], buf, s.length)
            }
            (req::GET_STATUS, 1) => Self::copy_out(&[0, 0], buf, s.length),
            (req::GET_STATUS, 2) => {
                let ep = s.index as u8;
                if !self.endpoint_exists(ep) {
                    Err(Errno::EPIPE)
                } else {
                    Self::copy_out(&[self.is_halted(ep) as u8, 0], buf, s.length)
                }
            }
            (req::CLEAR_FEATURE, 2) if s.value == req::ENDPOINT_HALT => {
                let ep = s.index as u8;
                if !self.endpoint_exists(ep) {
                    Err(Errno::EPIPE)
                } else {
                    self.halted &= !ep_bit(ep);
                    if ep & 0x0f != 0 && self.function.clear_halt(ep) {
                        self.halted |= ep_bit(ep);
                    }
                    Ok(0)
                }
            }
            (req::SET_FEATURE, 2) if s.value == req::ENDPOINT_HALT => {
                let ep = s.index as u8;
                if !self.endpoint_exists(ep) || ep & 0x0f == 0 {
                    Err(Errno::EPIPE)
                } else {
                    self.halted |= ep_bit(ep);
                    Ok(0)
                }
            }
            (req::CLEAR_FEATURE | req::SET_FEATURE, 0) if s.value == req::DEVICE_REMOTE_WAKEUP => {
                Ok(0)
            }
            // The address is the host controller's business; over USB/IP
            // vhci never forwards it, but a raw client may send it.
            (req::SET_ADDRESS, 0) => Ok(0),
            _ => Err(Errno::EPIPE),
        };
        Some(r)
    }

    fn endpoint_exists(&self, ep: u8) -> bool {
        ep & 0x0f == 0 || self.endpoint_type(ep).is_some()
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

    fn note(&mut self, ep: u8, r: Poll<Result<usize, Errno>>) -> Poll<Result<usize, Errno>> {
        if let Poll::Ready(Err(Errno::EPIPE)) = r {
            self.halted |= ep_bit(ep);
        }
        r
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
        self.note(ep, r)
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
        self.note(ep, r)
    }
}
