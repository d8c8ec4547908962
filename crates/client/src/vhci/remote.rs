//! `usbip attach`: import a remote device and hand its connection to vhci-hcd.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use usbwire_proto::DeviceInfo;

use super::attach::{AttrWriter, SysfsWriter, VhciError};
use super::record::PortRecord;
use super::Vhci;
use crate::blocking::import_blocking;
use crate::error::ClientError;

impl Vhci {
    /// `usbip attach`: connects to `host`, imports `busid`, hands the
    /// connection to vhci-hcd and records the port.
    pub fn attach_remote(
        &self,
        host: &str,
        tcp_port: u16,
        busid: &str,
    ) -> Result<Attached, AttachError> {
        self.attach_remote_with(&mut SysfsWriter, host, tcp_port, busid)
    }

    pub fn attach_remote_with(
        &self,
        writer: &mut dyn AttrWriter,
        host: &str,
        tcp_port: u16,
        busid: &str,
    ) -> Result<Attached, AttachError> {
        // Fail before importing: an import holds the device on the server.
        self.hc_dir()?;
        let name = host_port(host, tcp_port);
        let mut stream =
            TcpStream::connect((host, tcp_port)).map_err(|source| ClientError::Connect {
                addr: name.clone(),
                source,
            })?;
        // As usbip_net_tcp_connect does.
        let _ = stream.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::KeepAlive, &true);
        let device = import_blocking(&mut stream, &name, busid)?;
        if device.busid != busid {
            return Err(AttachError::WrongDevice {
                asked: busid.to_string(),
                got: device.busid.to_string(),
            });
        }
        let port = self.attach_with(writer, stream.as_raw_fd(), device.devid(), device.speed)?;
        // The kernel holds its own reference to the socket now.
        drop(stream);
        let record = PortRecord {
            host: host.to_string(),
            service: tcp_port.to_string(),
            busid: busid.to_string(),
        };
        self.write_record(port, &record)
            .map_err(|source| AttachError::Record {
                port,
                path: self.record_path(port),
                source,
            })?;
        Ok(Attached { port, device })
    }
}

/// A device attached to vhci-hcd.
#[derive(Debug, Clone)]
pub struct Attached {
    pub port: u32,
    /// The record the server sent with its import reply.
    pub device: DeviceInfo,
}

/// Why `usbip attach` failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Vhci(#[from] VhciError),
    #[error("{}", client_message(.0))]
    Client(#[from] ClientError),
    #[error("asked for device {asked} but the server sent {got}")]
    WrongDevice { asked: String, got: String },
    #[error("attached on port {port}, but cannot record the connection in {}: {source}", .path.display())]
    Record {
        port: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn client_message(e: &ClientError) -> String {
    match e {
        ClientError::Connect { addr, source }
            if source.kind() == io::ErrorKind::ConnectionRefused =>
        {
            format!("connection refused by {addr}")
        }
        e => e.to_string(),
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
