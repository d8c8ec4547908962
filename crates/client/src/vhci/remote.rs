//! `usbip attach`: import a remote device and hand its connection to
//! vhci-hcd, in plaintext or, with `--tls`, under kernel TLS.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use usbwire_proto::DeviceInfo;

use super::attach::{AttrWriter, SysfsWriter, VhciError};
use super::record::PortRecord;
use super::Vhci;
use usbwire_tls::ktls::{self, KtlsError};

use crate::blocking::{import_blocking, import_blocking_tls};
use crate::error::ClientError;
use crate::tls::TlsClientConfig;

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
        let (mut stream, name) = connect(host, tcp_port)?;
        let device = import_blocking(&mut stream, &name, busid)?;
        self.hand_over(writer, stream, device, host, tcp_port, busid)
    }

    /// `usbip attach --tls`: as [`Vhci::attach_remote`], but the import
    /// runs over TLS 1.3 and the kernel's TLS then carries the session, so
    /// that vhci-hcd's URBs travel encrypted. Never in plaintext: without
    /// kernel TLS (`modprobe tls`) nothing is imported.
    pub fn attach_remote_tls(
        &self,
        host: &str,
        tcp_port: u16,
        busid: &str,
        tls: &TlsClientConfig,
    ) -> Result<Attached, AttachError> {
        self.attach_remote_tls_with(&mut SysfsWriter, host, tcp_port, busid, tls)
    }

    pub fn attach_remote_tls_with(
        &self,
        writer: &mut dyn AttrWriter,
        host: &str,
        tcp_port: u16,
        busid: &str,
        tls: &TlsClientConfig,
    ) -> Result<Attached, AttachError> {
        self.hc_dir()?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let session = tls
            .kernel_tls_session(bare)
            .map_err(|source| ClientError::Tls {
                addr: host_port(host, tcp_port),
                source,
            })?;
        let (stream, name) = connect(bare, tcp_port)?;
        // Before anything is imported: a kernel without TLS fails here,
        // and the server sees a connection that never spoke.
        ktls::attach_ulp(&stream)?;
        let import = import_blocking_tls(&stream, session, &name, busid)?;
        // From here on a failure drops the socket, which releases the
        // device on the server.
        let cipher = ktls::handoff(&stream, import.session, &import.boundary)?;
        tracing::debug!(?cipher, "kernel TLS carries the connection");
        self.hand_over(writer, stream, import.device, host, tcp_port, busid)
    }

    /// Gives an imported device's connection to vhci-hcd and records the port.
    pub(crate) fn hand_over(
        &self,
        writer: &mut dyn AttrWriter,
        stream: TcpStream,
        device: DeviceInfo,
        host: &str,
        tcp_port: u16,
        busid: &str,
    ) -> Result<Attached, AttachError> {
        // A reservation's token was for the import only; the port record
        // and the check name the device.
        let (busid, _) = crate::op::split_token(busid);
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

/// Connects as usbip_net_tcp_connect does.
fn connect(host: &str, tcp_port: u16) -> Result<(TcpStream, String), ClientError> {
    let name = host_port(host, tcp_port);
    let stream = TcpStream::connect((host, tcp_port)).map_err(|source| ClientError::Connect {
        addr: name.clone(),
        source,
    })?;
    let _ = stream.set_nodelay(true);
    let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::KeepAlive, &true);
    Ok((stream, name))
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
    #[error(transparent)]
    Ktls(#[from] KtlsError),
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

pub(crate) fn client_message(e: &ClientError) -> String {
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
