//! The comparison server: the `usbip` crate (0.9, by jiegec) with a
//! simulated vendor device whose interface has a bulk IN source (0x81)
//! and a bulk OUT sink (0x02), written against its `UsbInterfaceHandler`.
//! Runs in a child process (`usbwire-bench --serve-usbip-crate`), so that
//! its CPU time and memory are its own.

use std::any::Any;
use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use usbip::{
    EndpointAttributes, SetupPacket, UsbDevice, UsbEndpoint, UsbInterface, UsbInterfaceHandler,
    UsbIpServer,
};

/// Source and sink: IN returns a full buffer of a constant byte, OUT
/// discards.
#[derive(Debug, Default)]
struct SourceSink {
    sunk: u64,
}

impl UsbInterfaceHandler for SourceSink {
    fn get_class_specific_descriptor(&self) -> Vec<u8> {
        Vec::new()
    }

    fn handle_urb(
        &mut self,
        _interface: &UsbInterface,
        ep: UsbEndpoint,
        transfer_buffer_length: u32,
        _setup: SetupPacket,
        req: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        if ep.address & 0x80 != 0 {
            Ok(vec![0x5a; transfer_buffer_length as usize])
        } else {
            self.sunk += req.len() as u64;
            Ok(Vec::new())
        }
    }

    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

/// The bus id of device `i` (0-based): `1-1`..`1-100`, `2-1`.., as usbipd's
/// scale configuration names them.
pub fn busid(i: usize) -> String {
    format!("{}-{}", i / 100 + 1, i % 100 + 1)
}

fn device(i: usize) -> UsbDevice {
    let handler = Arc::new(Mutex::new(
        Box::new(SourceSink::default()) as Box<dyn UsbInterfaceHandler + Send>
    ));
    let mut d = UsbDevice::new(i as u32 + 2).with_interface(
        0xff,
        0,
        0,
        Some("bench source/sink"),
        vec![
            UsbEndpoint {
                address: 0x81,
                attributes: EndpointAttributes::Bulk as u8,
                max_packet_size: 512,
                interval: 0,
            },
            UsbEndpoint {
                address: 0x02,
                attributes: EndpointAttributes::Bulk as u8,
                max_packet_size: 512,
                interval: 0,
            },
        ],
        handler,
    );
    d.bus_id = busid(i);
    d.bus_num = (i / 100 + 1) as u32;
    d.path = format!("/sys/devices/bench/{}", d.bus_id);
    d.vendor_id = 0x1209;
    d.product_id = 0x0001;
    d
}

/// Serves `devices` devices on an ephemeral port of 127.0.0.1 until killed;
/// prints the address on stdout once it listens. The accept loop is
/// `usbip::server`'s, on a listener bound here (that function binds a fixed
/// address itself).
pub fn serve(devices: usize) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let devs = (0..devices.max(1)).map(device).collect();
        let server = Arc::new(UsbIpServer::new_simulated(devs));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("the listener's address");
        let mut out = std::io::stdout();
        writeln!(out, "{addr}")
            .and_then(|_| out.flush())
            .expect("writing the ready line");
        loop {
            match listener.accept().await {
                Ok((mut socket, _)) => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        let _ = usbip::handler(&mut socket, server).await;
                    });
                }
                Err(e) => eprintln!("usbip crate server: accept: {e}"),
            }
        }
    })
}
