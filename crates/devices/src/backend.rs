//! [`EmulatedBackend`]: an emulated device as the engine's [`Backend`].

use std::io;
use std::task::{Context, Poll};

use usbwire_proto::{DeviceInfo, Direction};
use usbwire_usb::{Backend, Completion, StateChange, TransferType, Urb};

use crate::core::EmulatedDevice;

/// An emulated device exported as is.
pub struct EmulatedBackend {
    dev: EmulatedDevice,
}

impl EmulatedBackend {
    pub fn new(dev: EmulatedDevice) -> Self {
        EmulatedBackend { dev }
    }

    pub fn device(&mut self) -> &mut EmulatedDevice {
        &mut self.dev
    }

    /// An isochronous URB: per-packet results in `urb.iso`, and for IN the
    /// packets' data back to back at the front of the buffer, as usbip-host
    /// sends it (vhci spreads it out again, usbip_pad_iso). The URB itself
    /// succeeds; failed packets carry their own status.
    fn iso(&mut self, urb: &mut Urb, len: usize) -> Completion {
        let ep = urb.ep_address();
        let r = match urb.direction {
            Direction::In => self.dev.iso_in(ep, &mut urb.iso, &mut urb.buf[..len]),
            Direction::Out => self.dev.iso_out(ep, &mut urb.iso, &urb.buf[..len]),
        };
        if let Err(e) = r {
            return Completion::failed(e);
        }
        let mut actual = 0;
        for p in &urb.iso {
            let n = p.actual_length.min(p.length) as usize;
            if urb.direction == Direction::In {
                // Packets lie in ascending order (all a host builds), so the
                // packed data never overtakes data not yet moved; other
                // layouts garble only their own reply.
                let from = p.offset as usize;
                urb.buf.copy_within(from..from + n, actual);
            }
            actual += n;
        }
        Completion::Ran {
            actual,
            error: None,
        }
    }
}

impl Backend for EmulatedBackend {
    fn device_info(&self, busid: &str, busnum: u32, devnum: u32) -> DeviceInfo {
        let d = self.dev.descriptors();
        DeviceInfo {
            path: format!("/sys/devices/platform/usbwire/usb{busnum}/{busid}").into(),
            busid: busid.into(),
            busnum,
            devnum,
            speed: d.speed,
            id_vendor: d.device.vendor_id,
            id_product: d.device.product_id,
            bcd_device: d.device.device_version,
            device_class: d.device.class,
            device_subclass: d.device.subclass,
            device_protocol: d.device.protocol,
            configuration_value: d.config_value(),
            num_configurations: 1,
            num_interfaces: d.interfaces().len() as u8,
            interfaces: d.interfaces().to_vec(),
        }
    }

    fn transfer_type(&self, ep_address: u8) -> Option<TransferType> {
        self.dev.endpoint_type(ep_address)
    }

    fn descriptors(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        let d = self.dev.descriptors();
        Some((d.device_bytes().to_vec(), d.configuration.clone()))
    }

    fn serial(&self) -> Option<String> {
        self.dev
            .descriptors()
            .device
            .serial
            .clone()
            .filter(|s| !s.is_empty())
    }

    fn poll_urb(&mut self, urb: &mut Urb, cx: &mut Context<'_>) -> Poll<Completion> {
        let len = urb.length.min(urb.buf.len());
        if urb.ep == 0 {
            if StateChange::recognise(&urb.setup) == Some(StateChange::PortReset) {
                self.dev.reset();
                return Poll::Ready(Ok(0).into());
            }
            let r = match urb.setup.direction() {
                Direction::In => self.dev.control(&urb.setup, &[], &mut urb.buf[..len]),
                Direction::Out => self.dev.control(&urb.setup, &urb.buf[..len], &mut []),
            };
            return Poll::Ready(r.into());
        }
        let ep = urb.ep_address();
        if self.dev.endpoint_type(ep) == Some(TransferType::Isochronous) {
            return Poll::Ready(self.iso(urb, len));
        }
        match urb.direction {
            Direction::In => self.dev.poll_in(ep, &mut urb.buf[..len], cx),
            Direction::Out => self.dev.poll_out(ep, &urb.buf[..len], cx),
        }
        .map(Completion::from)
    }

    fn release(&mut self) {
        self.dev.reset();
        if let Err(e) = self.dev.flush() {
            tracing::error!("flushing a released device failed: {e}");
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.dev.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev::TestDevice;
    use usbwire_proto::SetupPacket;
    use usbwire_usb::UrbId;

    fn control_out(seqnum: u32, request_type: u8, request: u8, value: u16) -> Urb {
        Urb {
            id: UrbId(u64::from(seqnum)),
            seqnum,
            ep: 0,
            direction: Direction::Out,
            transfer_flags: 0,
            setup: SetupPacket {
                request_type,
                request,
                value,
                index: 1,
                length: 0,
            },
            length: 0,
            buf: Vec::new(),
            iso: Vec::new(),
            start_frame: 0,
            interval: 0,
            started: false,
        }
    }

    fn run(backend: &mut EmulatedBackend, mut urb: Urb) -> Completion {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match backend.poll_urb(&mut urb, &mut cx) {
            Poll::Ready(c) => c,
            Poll::Pending => panic!("a control transfer waited"),
        }
    }

    #[test]
    fn a_port_reset_through_ep0_resets_the_device() {
        let mut backend = EmulatedBackend::new(EmulatedDevice::new(TestDevice::new()));
        let done = Completion::Ran {
            actual: 0,
            error: None,
        };
        assert_eq!(run(&mut backend, control_out(1, 0x00, 9, 1)), done);
        assert_eq!(backend.device().configuration(), 1);
        // SET_FEATURE(PORT_RESET) to port 1 of the importer's hub.
        assert_eq!(run(&mut backend, control_out(2, 0x23, 3, 4)), done);
        assert_eq!(backend.device().configuration(), 0);
        // Another port feature is an ordinary (and here unknown) request.
        assert_eq!(run(&mut backend, control_out(3, 0x00, 9, 1)), done);
        assert_eq!(
            run(&mut backend, control_out(4, 0x23, 3, 8)),
            Completion::failed(usbwire_proto::Errno::EPIPE)
        );
        assert_eq!(backend.device().configuration(), 1);
    }
}
