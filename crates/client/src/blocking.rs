//! The blocking std driver of the OP phase, for `usbip attach`: the socket
//! goes to vhci-hcd right after the import, so nothing past the reply may
//! be read from it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use usbwire_proto::DeviceInfo;

use crate::error::ClientError;
use crate::op::OpExchange;

/// How long the server may take to answer an import.
const IMPORT_REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// OP_REQ_IMPORT on a blocking socket, reading exactly the reply and not
/// a byte more: what follows belongs to whoever takes the socket next.
pub fn import_blocking(
    stream: &mut TcpStream,
    name: &str,
    busid: &str,
) -> Result<DeviceInfo, ClientError> {
    let io_error = |source| ClientError::Io {
        addr: name.to_string(),
        source,
    };
    let mut op = OpExchange::import(busid);
    stream.write_all(op.poll_transmit()).map_err(io_error)?;
    op.transmitted(op.poll_transmit().len());
    // Bounded wait for the answer; cleared afterwards, as the kernel would
    // inherit SO_RCVTIMEO.
    let _ = stream.set_read_timeout(Some(IMPORT_REPLY_TIMEOUT));
    // Bounded: each read brings at least one byte of a reply whose length
    // the decoder bounds.
    let reply = loop {
        let n = match stream.read(op.read_buffer()) {
            Ok(0) => {
                return Err(ClientError::Closed {
                    addr: name.to_string(),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        };
        let decoded = op.handle_input(n).map_err(|source| ClientError::Protocol {
            addr: name.to_string(),
            source,
        })?;
        if let Some(reply) = decoded {
            break reply;
        }
    };
    stream.set_read_timeout(None).map_err(io_error)?;
    op.imported(reply, name)
}
