//! CDC-ACM serial, the user-space twin of the kernel's `f_acm` gadget.
//!
//! The host sees a plain ACM modem (`/dev/ttyACM*` with Linux's cdc-acm
//! driver). What the host writes goes to a [`AcmBackend`]: straight back
//! (Echo), a local pseudo-terminal (Pty) or one TCP client on loopback (Tcp).
//!
//! The device and its backend meet in two bounded [`ByteQueue`]s, so a slow
//! side makes the other wait (the OUT transfer stays pending, as a device
//! NAKs) instead of making memory grow.
//!
//! This module is the function; `pty` and `tcp` are the bridges that own
//! the other end of the line (a pty, a listener) and the tasks that move
//! its bytes, and `queue` is the FIFO they meet the function in.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::task::{Context, Poll};

use usbwire_proto::{Errno, SetupPacket, Speed};
use usbwire_usb::Request;

use crate::core::Function;
use crate::descriptors::{self, Descriptors, DeviceDescriptor, TransferType};

mod pty;
mod queue;
mod tcp;
#[cfg(test)]
mod tests;

use pty::PtyBridge;
use queue::ByteQueue;
use tcp::TcpBridge;

/// Bytes buffered in each direction between the device and its backend.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Endpoint addresses, the ones `f_acm` ends up with on most controllers.
pub const EP_NOTIFY: u8 = 0x83;
pub const EP_DATA_IN: u8 = 0x81;
pub const EP_DATA_OUT: u8 = 0x02;

/// CDC class requests (CDC PSTN 1.2, table 13).
pub mod request {
    pub const SEND_ENCAPSULATED_COMMAND: u8 = 0x00;
    pub const GET_ENCAPSULATED_RESPONSE: u8 = 0x01;
    pub const SET_LINE_CODING: u8 = 0x20;
    pub const GET_LINE_CODING: u8 = 0x21;
    pub const SET_CONTROL_LINE_STATE: u8 = 0x22;
    pub const SEND_BREAK: u8 = 0x23;
}

/// Largest chunk a bridge task moves at once; a stack buffer of this size
/// lives in each task.
const CHUNK: usize = 4096;

// ---------------------------------------------------------------------------
// Configuration.
// ---------------------------------------------------------------------------

/// Where the serial data goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AcmBackend {
    /// Everything the host writes comes back to it.
    #[default]
    Echo,
    /// A local pseudo-terminal: programs on this machine open its slave side.
    Pty,
    /// One TCP client at a time on this address, which must be loopback:
    /// the port is an unauthenticated door into the host's serial port.
    Tcp(SocketAddr),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmConfig {
    pub backend: AcmBackend,
    /// With the Pty backend, a symlink to create pointing at the slave, so
    /// scripts need not parse `/dev/pts/N`. An existing symlink there is
    /// replaced; any other existing file is an error.
    pub pty_link: Option<PathBuf>,
    /// The iSerialNumber string; distinct values keep udev's
    /// `/dev/serial/by-id` names apart when several are exported.
    pub serial: Option<String>,
}

/// The 7-byte CDC line coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineCoding {
    pub rate: u32,
    /// 0 = 1, 1 = 1.5, 2 = 2 stop bits.
    pub stop_bits: u8,
    /// 0 none, 1 odd, 2 even, 3 mark, 4 space.
    pub parity: u8,
    pub data_bits: u8,
}

impl Default for LineCoding {
    fn default() -> Self {
        LineCoding {
            rate: 115_200,
            stop_bits: 0,
            parity: 0,
            data_bits: 8,
        }
    }
}

impl LineCoding {
    pub fn to_bytes(self) -> [u8; 7] {
        let r = self.rate.to_le_bytes();
        [
            r[0],
            r[1],
            r[2],
            r[3],
            self.stop_bits,
            self.parity,
            self.data_bits,
        ]
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; 7] = b.get(..7)?.try_into().ok()?;
        Some(LineCoding {
            rate: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            stop_bits: b[4],
            parity: b[5],
            data_bits: b[6],
        })
    }
}

// ---------------------------------------------------------------------------
// The device.
// ---------------------------------------------------------------------------

/// A CDC-ACM serial function.
pub struct CdcAcm {
    descriptors: Descriptors,
    /// Backend to host (IN 0x81). In Echo mode the same queue as `from_host`.
    to_host: ByteQueue,
    /// Host to backend (OUT 0x02).
    from_host: ByteQueue,
    bridge: Bridge,
    line_coding: LineCoding,
    /// Bit 0 DTR, bit 1 RTS, as SET_CONTROL_LINE_STATE sent them.
    control_lines: u16,
    breaks: u64,
}

/// The other end of the serial line, which owns whatever moves its bytes.
enum Bridge {
    /// `to_host` and `from_host` are one queue.
    Echo,
    Pty(PtyBridge),
    Tcp(TcpBridge),
}

impl CdcAcm {
    /// Builds the device and starts its backend. The Pty and Tcp backends
    /// spawn tokio tasks, so they must be created inside a tokio runtime
    /// (any flavour); without one they return an error. Echo needs none.
    pub fn new(cfg: AcmConfig) -> io::Result<CdcAcm> {
        let descriptors = build_descriptors(cfg.serial.as_deref());
        let to_host = ByteQueue::new(BUFFER_SIZE);
        let (from_host, bridge) = match cfg.backend {
            AcmBackend::Echo => (to_host.clone(), Bridge::Echo),
            AcmBackend::Pty => {
                let from_host = ByteQueue::new(BUFFER_SIZE);
                let pty = PtyBridge::start(cfg.pty_link, &to_host, &from_host)?;
                (from_host, Bridge::Pty(pty))
            }
            AcmBackend::Tcp(addr) => {
                let from_host = ByteQueue::new(BUFFER_SIZE);
                let tcp = TcpBridge::start(addr, &to_host, &from_host)?;
                (from_host, Bridge::Tcp(tcp))
            }
        };
        Ok(CdcAcm {
            descriptors,
            to_host,
            from_host,
            bridge,
            line_coding: LineCoding::default(),
            control_lines: 0,
            breaks: 0,
        })
    }

    /// The slave side of the Pty backend (`/dev/pts/N`).
    pub fn pty_path(&self) -> Option<PathBuf> {
        match &self.bridge {
            Bridge::Pty(pty) => Some(pty.path().to_path_buf()),
            _ => None,
        }
    }

    /// The address the Tcp backend listens on, with the real port when the
    /// configuration asked for port 0.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.bridge {
            Bridge::Tcp(tcp) => Some(tcp.local_addr()),
            _ => None,
        }
    }

    pub fn line_coding(&self) -> LineCoding {
        self.line_coding
    }

    /// DTR as the host last set it; cdc-acm raises it when the tty is opened.
    pub fn dtr(&self) -> bool {
        self.control_lines & 1 != 0
    }

    pub fn rts(&self) -> bool {
        self.control_lines & 2 != 0
    }

    /// How many SEND_BREAK requests the host has made.
    pub fn breaks(&self) -> u64 {
        self.breaks
    }
}

fn runtime() -> io::Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current().map_err(|_| {
        io::Error::other("the serial Pty and Tcp backends must be created inside a tokio runtime")
    })
}

fn build_descriptors(serial: Option<&str>) -> Descriptors {
    let speed = Speed::High;
    let bulk = descriptors::bulk_max_packet(speed);
    let mut body = Vec::with_capacity(80);
    body.extend_from_slice(&descriptors::interface(0, 0, 1, 0x02, 0x02, 0x01, 0));
    // Header, bcdCDC 1.10.
    body.extend_from_slice(&[5, 0x24, 0x00, 0x10, 0x01]);
    // Call Management: no call management, data interface 1.
    body.extend_from_slice(&[5, 0x24, 0x01, 0x00, 0x01]);
    // ACM: line coding/serial state (0x02) and SEND_BREAK (0x04).
    body.extend_from_slice(&[4, 0x24, 0x02, 0x06]);
    // Union: master 0, slave 1.
    body.extend_from_slice(&[5, 0x24, 0x06, 0x00, 0x01]);
    // 10-byte SERIAL_STATE notifications every 32 ms (2^(9-1) microframes),
    // the values f_acm uses.
    body.extend_from_slice(&descriptors::endpoint(
        EP_NOTIFY,
        TransferType::Interrupt,
        10,
        9,
    ));
    body.extend_from_slice(&descriptors::interface(1, 0, 2, 0x0a, 0, 0, 0));
    body.extend_from_slice(&descriptors::endpoint(
        EP_DATA_IN,
        TransferType::Bulk,
        bulk,
        0,
    ));
    body.extend_from_slice(&descriptors::endpoint(
        EP_DATA_OUT,
        TransferType::Bulk,
        bulk,
        0,
    ));
    Descriptors::new(
        speed,
        DeviceDescriptor {
            usb_version: 0x0200,
            class: 0x02,
            subclass: 0,
            protocol: 0,
            max_packet_size0: 64,
            vendor_id: 0x0525,
            product_id: 0xa4a7,
            device_version: 0x0100,
            manufacturer: Some("usbwire".into()),
            product: Some("usbwire serial".into()),
            serial: Some(serial.unwrap_or("0001").into()),
        },
        0,
        100,
        &body,
        &[],
    )
}

impl Function for CdcAcm {
    fn descriptors(&self) -> &Descriptors {
        &self.descriptors
    }

    fn control_in(&mut self, setup: &SetupPacket, buf: &mut [u8]) -> Option<Result<usize, Errno>> {
        if !is_acm_request(setup) {
            return None;
        }
        match setup.request {
            request::GET_LINE_CODING => {
                let b = self.line_coding.to_bytes();
                let n = crate::core::reply(&b, buf);
                Some(Ok(n))
            }
            _ => None,
        }
    }

    fn control_out(&mut self, setup: &SetupPacket, data: &[u8]) -> Option<Result<(), Errno>> {
        if !is_acm_request(setup) {
            return None;
        }
        match setup.request {
            request::SET_LINE_CODING => Some(match LineCoding::from_bytes(data) {
                Some(lc) if data.len() == 7 => {
                    tracing::debug!(?lc, "serial: line coding");
                    self.line_coding = lc;
                    Ok(())
                }
                _ => Err(Errno::EPIPE),
            }),
            request::SET_CONTROL_LINE_STATE => {
                self.control_lines = setup.value & 3;
                tracing::debug!(dtr = self.dtr(), rts = self.rts(), "serial: control lines");
                Some(Ok(()))
            }
            request::SEND_BREAK => {
                self.breaks = self.breaks.saturating_add(1);
                tracing::debug!(ms = setup.value, "serial: break");
                Some(Ok(()))
            }
            _ => None,
        }
    }

    fn transfer_in(
        &mut self,
        ep: u8,
        buf: &mut [u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match ep {
            EP_DATA_IN => self.to_host.poll_read(buf, cx).map(Ok),
            // No SERIAL_STATE changes to report, ever: the URB waits, as on
            // a real modem with no carrier changes.
            EP_NOTIFY => Poll::Pending,
            _ => Poll::Ready(Err(Errno::EPIPE)),
        }
    }

    fn transfer_out(
        &mut self,
        ep: u8,
        data: &[u8],
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, Errno>> {
        match ep {
            EP_DATA_OUT => self.from_host.poll_write_all(data, cx).map(Ok),
            _ => Poll::Ready(Err(Errno::EPIPE)),
        }
    }

    fn reset(&mut self) {
        self.control_lines = 0;
        // An echo in flight is pending work of this device; bytes from a
        // pty or TCP client belong to the other side and are kept.
        if matches!(self.bridge, Bridge::Echo) {
            self.to_host.clear();
        }
    }
}

/// A class request to the communication interface (interface 0).
fn is_acm_request(s: &SetupPacket) -> bool {
    Request::from(s).class_to_interface(0).is_some()
}
