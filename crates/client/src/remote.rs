//! The tokio driver: `list`, `import`, and a [`RemoteDevice`] whose
//! connection task moves bytes between a `TcpStream` and the sans-IO
//! cores ([`OpExchange`], [`Connection`]).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use usbwire_proto::{DeviceInfo, OpReply, SetupPacket};

use crate::connection::{Connection, ConnectionConfig, ConnectionError, MAX_TRANSMIT_SLICES};
use crate::error::{ClientError, TransferError};
use crate::op::OpExchange;
use crate::tls::{TlsClientConfig, TlsError};
use crate::transfer::{TransferOutcome, TransferRequest};
use crate::transport::{TlsTransport, Transport};

/// Reads one wake of the connection task takes at most before it looks at
/// its other sources again.
const MAX_READS_PER_WAKE: usize = 16;

/// Writes one flush makes at most before it looks at its other sources again.
const MAX_WRITES_PER_FLUSH: usize = 16;

async fn connect(
    addr: impl ToSocketAddrs + std::fmt::Display,
) -> Result<(TcpStream, String), ClientError> {
    let name = addr.to_string();
    let s = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: name.clone(),
            source,
        })?;
    let _ = s.set_nodelay(true);
    Ok((s, name))
}

/// Runs one OP exchange on `transport`: sends the request, reads the reply.
async fn exchange<T: Transport>(
    transport: &mut T,
    op: &mut OpExchange,
    name: &str,
) -> Result<OpReply, ClientError> {
    let io_error = |e| ClientError::from_io(name, e);
    // Bounded: each write takes at least one byte of the request.
    while !op.poll_transmit().is_empty() {
        match transport.try_write_vectored(&[IoSlice::new(op.poll_transmit())]) {
            Ok(0) => return Err(io_error(io::ErrorKind::WriteZero.into())),
            Ok(n) => op.transmitted(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                transport.writable().await.map_err(io_error)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    // Bounded: each turn sends some of what the transport holds, or reads
    // at least one byte of a reply whose length the decoder bounds.
    loop {
        match transport.flush_pending() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                transport.writable().await.map_err(io_error)?;
                continue;
            }
            Err(e) => return Err(io_error(e)),
        }
        let n = match transport.try_read(op.read_buffer()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A TLS handshake may have made records to send first.
                if !transport.wants_write() {
                    transport.readable().await.map_err(io_error)?;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e)),
        };
        if n == 0 {
            return Err(ClientError::Closed { addr: name.into() });
        }
        let decoded = op.handle_input(n).map_err(|source| ClientError::Protocol {
            addr: name.into(),
            source,
        })?;
        if let Some(reply) = decoded {
            return Ok(reply);
        }
    }
}

/// Asks a server for its exportable devices.
pub async fn list(
    addr: impl ToSocketAddrs + std::fmt::Display,
) -> Result<Vec<DeviceInfo>, ClientError> {
    let (mut stream, name) = connect(addr).await?;
    let mut op = OpExchange::devlist();
    let reply = exchange(&mut stream, &mut op, &name).await?;
    op.devices(reply, &name)
}

/// Imports `busid` and returns the device with the connection ready for URBs.
pub async fn import(
    addr: impl ToSocketAddrs + std::fmt::Display,
    busid: &str,
) -> Result<RemoteDevice, ClientError> {
    let (stream, name) = connect(addr).await?;
    import_stream(stream, &name, busid).await
}

/// Imports over a connection the caller opened.
pub async fn import_stream(
    mut stream: TcpStream,
    name: &str,
    busid: &str,
) -> Result<RemoteDevice, ClientError> {
    let mut op = OpExchange::import(busid);
    let reply = exchange(&mut stream, &mut op, name).await?;
    let info = op.imported(reply, name)?;
    Ok(RemoteDevice::start(stream, info, name.to_string()))
}

/// Connects to `host:port` and starts a TLS 1.3 session with `tls`; the
/// handshake completes with the first exchange.
async fn connect_tls(
    host: &str,
    port: u16,
    tls: &TlsClientConfig,
) -> Result<(TlsTransport, String), ClientError> {
    let session = tls.session(host).map_err(|source| ClientError::Tls {
        addr: format!("{host}:{port}"),
        source,
    })?;
    let name = format!("{host}:{port}");
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|source| ClientError::Connect {
            addr: name.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    Ok((TlsTransport::new(stream, session), name))
}

/// How long a TLS server may take to complete the handshake and answer
/// the OP request, as the blocking import bounds its wait.
const TLS_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// [`exchange`] with a deadline: a server that accepts and then stalls the
/// handshake is an error, not a client that waits forever.
async fn exchange_tls(
    transport: &mut TlsTransport,
    op: &mut OpExchange,
    name: &str,
) -> Result<OpReply, ClientError> {
    match tokio::time::timeout(TLS_EXCHANGE_TIMEOUT, exchange(transport, op, name)).await {
        Ok(reply) => reply,
        Err(_) if transport.is_handshaking() => Err(ClientError::Tls {
            addr: name.into(),
            source: TlsError::HandshakeTimeout(TLS_EXCHANGE_TIMEOUT),
        }),
        Err(_) => Err(ClientError::Io {
            addr: name.into(),
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {TLS_EXCHANGE_TIMEOUT:?}"),
            ),
        }),
    }
}

/// [`list`] over TLS 1.3 with a client certificate; never in plaintext.
pub async fn list_tls(
    host: &str,
    port: u16,
    tls: &TlsClientConfig,
) -> Result<Vec<DeviceInfo>, ClientError> {
    let (mut transport, name) = connect_tls(host, port, tls).await?;
    let mut op = OpExchange::devlist();
    let reply = exchange_tls(&mut transport, &mut op, &name).await;
    transport.shutdown().await;
    op.devices(reply?, &name)
}

/// [`import`] over TLS 1.3 with a client certificate; the URBs that follow
/// travel in the same TLS session.
pub async fn import_tls(
    host: &str,
    port: u16,
    tls: &TlsClientConfig,
    busid: &str,
) -> Result<RemoteDevice, ClientError> {
    let (mut transport, name) = connect_tls(host, port, tls).await?;
    let mut op = OpExchange::import(busid);
    let reply = exchange_tls(&mut transport, &mut op, &name).await?;
    let info = op.imported(reply, &name)?;
    Ok(RemoteDevice::start(transport, info, name))
}

/// What the connection task needs to finish a transfer.
struct Waiter {
    seqnum: oneshot::Sender<u32>,
    done: oneshot::Sender<TransferOutcome>,
}

/// A device imported from a server. Dropping it (and every
/// [`PendingTransfer`]) closes the connection, which releases the device
/// on the server.
pub struct RemoteDevice {
    info: DeviceInfo,
    submits: mpsc::UnboundedSender<(TransferRequest, Waiter)>,
    unlinks: mpsc::UnboundedSender<u32>,
}

/// A submitted transfer: await it for its [`TransferOutcome`], or cancel it.
pub struct PendingTransfer {
    seqnum: oneshot::Receiver<u32>,
    known_seqnum: Option<u32>,
    done: oneshot::Receiver<TransferOutcome>,
    unlinks: mpsc::UnboundedSender<u32>,
}

impl PendingTransfer {
    /// The URB's seqnum on the wire, once the connection took it.
    pub async fn seqnum(&mut self) -> Option<u32> {
        if self.known_seqnum.is_none() {
            self.known_seqnum = (&mut self.seqnum).await.ok();
        }
        self.known_seqnum
    }

    /// Sends CMD_UNLINK. Linux semantics follow: if the server still had
    /// the URB the transfer completes with [`TransferError::Cancelled`];
    /// if it had already completed, its real result arrives instead.
    pub async fn cancel(&mut self) {
        if let Some(seqnum) = self.seqnum().await {
            let _ = self.unlinks.send(seqnum);
        }
    }
}

impl Future for PendingTransfer {
    type Output = TransferOutcome;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TransferOutcome> {
        Pin::new(&mut self.done).poll(cx).map(|r| {
            r.unwrap_or_else(|_| TransferOutcome::failed(TransferError::Disconnected(None)))
        })
    }
}

impl RemoteDevice {
    fn start<T: Transport>(transport: T, info: DeviceInfo, addr: String) -> Self {
        let (submits, submit_rx) = mpsc::unbounded_channel();
        let (unlinks, unlink_rx) = mpsc::unbounded_channel();
        let connection = Connection::new(&info, ConnectionConfig::default());
        tokio::spawn(async move {
            let mut task = ConnectionTask {
                transport,
                connection,
                submits: Some(submit_rx),
                unlinks: Some(unlink_rx),
            };
            match task.run().await {
                Ok(()) => tracing::debug!(%addr, "connection closed"),
                Err(e @ ConnectionError::PeerClosed) => tracing::debug!(%addr, "{e}"),
                Err(e) => tracing::warn!(%addr, "connection ended: {e}"),
            }
            task.connection.close();
            task.deliver_completions();
        });
        RemoteDevice {
            info,
            submits,
            unlinks,
        }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Resolves once the connection has ended (closed by the server, lost
    /// on the network): every transfer fails from then on.
    pub async fn closed(&self) {
        self.submits.closed().await
    }

    /// The connection has ended.
    pub fn is_closed(&self) -> bool {
        self.submits.is_closed()
    }

    /// Submits a transfer; many may be in flight at once.
    pub fn submit(&self, req: TransferRequest) -> PendingTransfer {
        let (seqnum_tx, seqnum) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let _ = self.submits.send((
            req,
            Waiter {
                seqnum: seqnum_tx,
                done: done_tx,
            },
        ));
        PendingTransfer {
            seqnum,
            known_seqnum: None,
            done,
            unlinks: self.unlinks.clone(),
        }
    }

    /// A control transfer with an IN data stage.
    pub async fn control_in(&self, setup: SetupPacket) -> Result<Vec<u8>, TransferError> {
        self.submit(TransferRequest::control(setup, Vec::new()))
            .await
            .into_result()
    }

    /// A control transfer with an OUT data stage (or none).
    pub async fn control_out(&self, setup: SetupPacket, data: &[u8]) -> Result<(), TransferError> {
        self.submit(TransferRequest::control(setup, data.to_vec()))
            .await
            .status
    }

    pub async fn bulk_in(&self, endpoint: u8, length: u32) -> Result<Vec<u8>, TransferError> {
        self.submit(TransferRequest::bulk_in(endpoint, length))
            .await
            .into_result()
    }

    pub async fn bulk_out(&self, endpoint: u8, data: &[u8]) -> Result<u32, TransferError> {
        let c = self
            .submit(TransferRequest::bulk_out(endpoint, data.to_vec()))
            .await;
        c.status.map(|()| c.actual_length)
    }

    /// Interrupt transfers look the same as bulk on the wire.
    pub async fn interrupt_in(&self, endpoint: u8, length: u32) -> Result<Vec<u8>, TransferError> {
        self.bulk_in(endpoint, length).await
    }

    pub async fn interrupt_out(&self, endpoint: u8, data: &[u8]) -> Result<u32, TransferError> {
        self.bulk_out(endpoint, data).await
    }

    /// GET_DESCRIPTOR from the device.
    pub async fn get_descriptor(
        &self,
        kind: u8,
        index: u8,
        length: u16,
    ) -> Result<Vec<u8>, TransferError> {
        self.control_in(SetupPacket {
            request_type: 0x80,
            request: 6,
            value: (u16::from(kind) << 8) | u16::from(index),
            index: 0,
            length,
        })
        .await
    }

    /// The 18-byte device descriptor.
    pub async fn device_descriptor(&self) -> Result<Vec<u8>, TransferError> {
        self.get_descriptor(1, 0, 18).await
    }

    /// The whole configuration descriptor (read twice: header, then wTotalLength).
    pub async fn config_descriptor(&self) -> Result<Vec<u8>, TransferError> {
        let head = self.get_descriptor(2, 0, 9).await?;
        if head.len() < 4 {
            return Err(TransferError::Protocol(usbwire_proto::Errno::EPROTO));
        }
        let total = u16::from_le_bytes([head[2], head[3]]);
        self.get_descriptor(2, 0, total).await
    }

    /// SET_CONFIGURATION.
    pub async fn set_configuration(&self, value: u8) -> Result<(), TransferError> {
        self.control_out(
            SetupPacket {
                request_type: 0,
                request: 9,
                value: value.into(),
                index: 0,
                length: 0,
            },
            &[],
        )
        .await
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT).
    pub async fn clear_halt(&self, endpoint: u8) -> Result<(), TransferError> {
        self.control_out(
            SetupPacket {
                request_type: 2,
                request: 1,
                value: 0,
                index: endpoint.into(),
                length: 0,
            },
            &[],
        )
        .await
    }
}

/// The task that owns a [`RemoteDevice`]'s socket. Each source is `None`
/// once every sender of it is gone.
struct ConnectionTask<T> {
    transport: T,
    connection: Connection<oneshot::Sender<TransferOutcome>>,
    submits: Option<mpsc::UnboundedReceiver<(TransferRequest, Waiter)>>,
    unlinks: Option<mpsc::UnboundedReceiver<u32>>,
}

impl<T: Transport> ConnectionTask<T> {
    /// Until every handle is gone (then the queued commands are flushed and
    /// the socket shut down, which releases the device) or the connection fails.
    async fn run(&mut self) -> Result<(), ConnectionError> {
        while self.submits.is_some() || self.unlinks.is_some() {
            tokio::select! {
                submit = recv(&mut self.submits), if self.connection.can_submit() => {
                    match submit {
                        Some(first) => self.take_submits(first),
                        None => self.submits = None,
                    }
                }
                unlink = recv(&mut self.unlinks) => {
                    match unlink {
                        Some(first) => self.take_unlinks(first),
                        None => self.unlinks = None,
                    }
                }
                readable = self.transport.readable() => {
                    readable.map_err(|e| self.lost(e))?;
                    self.read()?;
                }
                writable = self.transport.writable(),
                    if self.connection.has_transmit() || self.transport.wants_write() => {
                    writable.map_err(|e| self.lost(e))?;
                }
            }
            self.flush()?;
            self.deliver_completions();
        }
        // Bounded by what was queued: no more commands can come.
        while self.connection.has_transmit() || self.transport.wants_write() {
            self.transport.writable().await.map_err(|e| self.lost(e))?;
            self.flush()?;
        }
        self.transport.shutdown().await;
        Ok(())
    }

    /// Takes `first` and every submit already queued behind it, as far as
    /// the in-flight bound allows, so that they go out in one write.
    fn take_submits(&mut self, first: (TransferRequest, Waiter)) {
        let mut next = Some(first);
        while let Some((request, waiter)) = next.take() {
            match self.connection.submit(request, waiter.done) {
                Ok(seqnum) => {
                    let _ = waiter.seqnum.send(seqnum);
                }
                // Dropping the waiter fails the transfer as disconnected.
                Err((e, _)) => tracing::debug!("transfer not submitted: {e}"),
            }
            if self.connection.can_submit() {
                next = self.submits.as_mut().and_then(|rx| rx.try_recv().ok());
            }
        }
    }

    fn take_unlinks(&mut self, first: u32) {
        let mut next = Some(first);
        while let Some(seqnum) = next.take() {
            self.connection.unlink(seqnum);
            next = self.unlinks.as_mut().and_then(|rx| rx.try_recv().ok());
        }
    }

    fn read(&mut self) -> Result<(), ConnectionError> {
        for _ in 0..MAX_READS_PER_WAKE {
            match self.transport.try_read(self.connection.read_buffer()) {
                Ok(0) => return Err(self.lost(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.connection.handle_input(n)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConnectionError> {
        match self.transport.flush_pending() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(self.lost(e)),
            _ => {}
        }
        for _ in 0..MAX_WRITES_PER_FLUSH {
            if !self.connection.has_transmit() {
                break;
            }
            let mut slices = [IoSlice::new(&[]); MAX_TRANSMIT_SLICES];
            let filled = self.connection.poll_transmit(&mut slices);
            match self.transport.try_write_vectored(&slices[..filled]) {
                Ok(0) => return Err(self.lost(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.connection.transmitted(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.lost(e)),
            }
        }
        Ok(())
    }

    /// The socket failed or the server closed it.
    fn lost(&mut self, e: io::Error) -> ConnectionError {
        tracing::debug!("connection lost: {e}");
        self.connection.peer_closed();
        ConnectionError::PeerClosed
    }

    fn deliver_completions(&mut self) {
        while let Some(completed) = self.connection.poll_completed() {
            let _ = completed.token.send(completed.outcome);
        }
    }
}

/// Receives from a source that may be gone; a gone source never resolves
/// (its `select!` branch is disabled by the caller's loop condition).
async fn recv<T>(rx: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The tokio driver against a peer the test plays on loopback: it only
    //! moves bytes, so these check that it moves them and shuts down.

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use usbwire_proto::{
        Limits, OpRequest, OpStatus, RetSubmit, RetUnlink, Speed, UrbCommand, USBIP_VERSION,
    };

    use super::*;

    fn device() -> DeviceInfo {
        DeviceInfo {
            path: "/sys/devices/usb1/1-1".into(),
            busid: "1-1".into(),
            busnum: 1,
            devnum: 2,
            speed: Speed::High,
            id_vendor: 1,
            id_product: 2,
            bcd_device: 3,
            device_class: 0,
            device_subclass: 0,
            device_protocol: 0,
            configuration_value: 1,
            num_configurations: 1,
            num_interfaces: 0,
            interfaces: Vec::new(),
        }
    }

    /// Reads whole frames until `decode` returns one.
    async fn read_frame<T>(
        peer: &mut TcpStream,
        buffer: &mut Vec<u8>,
        decode: impl Fn(&[u8]) -> Option<(T, usize)>,
    ) -> T {
        loop {
            if let Some((frame, used)) = decode(buffer) {
                buffer.drain(..used);
                return frame;
            }
            let n = peer.read_buf(buffer).await.unwrap();
            assert!(n > 0, "the client closed mid-frame");
        }
    }

    async fn read_command(peer: &mut TcpStream, buffer: &mut Vec<u8>) -> UrbCommand {
        read_frame(peer, buffer, |b| {
            UrbCommand::decode(b, &Limits::default(), |_, _| false)
                .unwrap()
                .message()
        })
        .await
    }

    /// A peer that answers the import, then hands its socket to the test.
    async fn imported() -> (RemoteDevice, TcpStream, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = async {
            let (mut peer, _) = listener.accept().await.unwrap();
            let mut buffer = Vec::new();
            let request = read_frame(&mut peer, &mut buffer, |b| {
                OpRequest::decode(b).unwrap().message()
            })
            .await;
            assert!(matches!(request, OpRequest::Import { .. }), "{request:?}");
            let mut reply = Vec::new();
            OpReply::Import {
                version: USBIP_VERSION,
                status: OpStatus::Ok,
                device: Some(device()),
            }
            .encode(&mut reply);
            peer.write_all(&reply).await.unwrap();
            (peer, buffer)
        };
        let (device, (peer, buffer)) = tokio::join!(import(addr, "1-1"), peer);
        (device.unwrap(), peer, buffer)
    }

    #[tokio::test]
    async fn transfers_cancel_and_complete_through_the_socket() {
        let (device, mut peer, mut buffer) = imported().await;
        let mut long = device.submit(TransferRequest::bulk_in(1, 8));
        let out = device.submit(TransferRequest::bulk_out(2, vec![4; 40_000]));
        let Some(long_seqnum) = long.seqnum().await else {
            panic!("never submitted")
        };
        long.cancel().await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(read_command(&mut peer, &mut buffer).await);
        }
        let UrbCommand::Submit { cmd: out_cmd, .. } = &seen[1] else {
            panic!("{seen:?}")
        };
        assert_eq!(out_cmd.transfer_buffer_length, 40_000);
        let UrbCommand::Unlink(unlink) = &seen[2] else {
            panic!("{seen:?}")
        };
        assert_eq!(unlink.unlink_seqnum, long_seqnum);
        let mut replies = Vec::new();
        RetSubmit {
            seqnum: out_cmd.seqnum,
            actual_length: 40_000,
            ..Default::default()
        }
        .encode(&[], &[], &mut replies);
        RetUnlink {
            seqnum: unlink.seqnum,
            status: -104,
            ..Default::default()
        }
        .encode(&mut replies);
        peer.write_all(&replies).await.unwrap();
        assert_eq!(out.await.status, Ok(()));
        assert_eq!(long.await.status, Err(TransferError::Cancelled));
        // Every handle gone: the client closes, which releases the device.
        drop(device);
        assert_eq!(peer.read(&mut [0; 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_departed_server_fails_transfers_in_flight() {
        let (device, mut peer, mut buffer) = imported().await;
        let first = device.submit(TransferRequest::bulk_in(1, 8));
        let second = device.submit(TransferRequest::bulk_in(1, 8));
        read_command(&mut peer, &mut buffer).await;
        read_command(&mut peer, &mut buffer).await;
        drop(peer);
        for transfer in [first, second] {
            assert_eq!(
                transfer.await,
                TransferOutcome::failed(TransferError::Disconnected(None))
            );
        }
        assert_eq!(
            device.bulk_in(1, 1).await,
            Err(TransferError::Disconnected(None)),
            "a transfer after the connection ended"
        );
    }

    #[tokio::test]
    async fn a_reply_for_no_urb_ends_the_connection() {
        let (device, mut peer, mut buffer) = imported().await;
        let pending = device.submit(TransferRequest::bulk_in(1, 8));
        read_command(&mut peer, &mut buffer).await;
        let mut stray = Vec::new();
        RetSubmit {
            seqnum: 4242,
            ..Default::default()
        }
        .encode(&[], &[], &mut stray);
        peer.write_all(&stray).await.unwrap();
        assert_eq!(pending.await.status, Err(TransferError::Disconnected(None)));
        // The client hung up on the out-of-step stream.
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing sent after the stray reply");
    }
}
