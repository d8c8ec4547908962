//! Importing a device and running transfers on it over TCP.

use std::collections::HashMap;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use usbwire_proto::urb::{InFlight, URB_HEADER_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, Decoded, DeviceInfo, Direction, IsoPacket, Limits, OpReply, OpRequest,
    OpStatus, SetupPacket, UrbReply, USBIP_VERSION,
};

use crate::error::{ClientError, TransferError};

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

async fn read_reply(stream: &mut TcpStream, name: &str) -> Result<OpReply, ClientError> {
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(4096);
    loop {
        match OpReply::decode(&buf, &limits) {
            Ok(Decoded::Message(m, _)) => return Ok(m),
            Ok(Decoded::NeedMore(n)) => {
                buf.reserve(n - buf.len());
                let got = stream
                    .read_buf(&mut buf)
                    .await
                    .map_err(|source| ClientError::Io {
                        addr: name.into(),
                        source,
                    })?;
                if got == 0 {
                    return Err(ClientError::Closed { addr: name.into() });
                }
            }
            Err(source) => {
                return Err(ClientError::Protocol {
                    addr: name.into(),
                    source,
                })
            }
        }
    }
}

/// Asks a server for its exportable devices.
pub async fn list(
    addr: impl ToSocketAddrs + std::fmt::Display,
) -> Result<Vec<DeviceInfo>, ClientError> {
    let (mut stream, name) = connect(addr).await?;
    let mut out = Vec::new();
    OpRequest::Devlist {
        version: USBIP_VERSION,
    }
    .encode(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|source| ClientError::Io {
            addr: name.clone(),
            source,
        })?;
    match read_reply(&mut stream, &name).await? {
        OpReply::Devlist {
            status: OpStatus::Ok,
            devices,
            ..
        } => Ok(devices),
        OpReply::Devlist { status, .. } => Err(ClientError::ListRefused { addr: name, status }),
        OpReply::Import { .. } => Err(ClientError::Protocol {
            addr: name,
            source: usbwire_proto::DecodeError::UnknownOpCode(usbwire_proto::OP_REP_IMPORT),
        }),
    }
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
    let mut out = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: busid.into(),
    }
    .encode(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|source| ClientError::Io {
            addr: name.into(),
            source,
        })?;
    match read_reply(&mut stream, name).await? {
        OpReply::Import {
            status: OpStatus::Ok,
            device: Some(info),
            ..
        } => Ok(RemoteDevice::start(stream, info, name.to_string())),
        OpReply::Import { status, .. } => Err(ClientError::ImportRefused {
            addr: name.into(),
            busid: busid.into(),
            status,
        }),
        OpReply::Devlist { .. } => Err(ClientError::Protocol {
            addr: name.into(),
            source: usbwire_proto::DecodeError::UnknownOpCode(usbwire_proto::OP_REP_DEVLIST),
        }),
    }
}

/// One transfer to submit.
#[derive(Debug, Clone, Default)]
pub struct TransferRequest {
    /// Endpoint address: 0x80 set for IN. Control is 0x00 (OUT) or 0x80 (IN).
    pub endpoint: u8,
    /// Linux URB_* transfer flags (e.g. URB_SHORT_NOT_OK).
    pub flags: u32,
    /// Setup packet, for control transfers.
    pub setup: Option<SetupPacket>,
    /// OUT payload.
    pub data: Vec<u8>,
    /// IN length to ask for.
    pub length: u32,
    pub iso: Vec<IsoPacket>,
    pub start_frame: i32,
    pub interval: i32,
}

impl TransferRequest {
    pub fn bulk_in(endpoint: u8, length: u32) -> Self {
        TransferRequest {
            endpoint: endpoint | 0x80,
            length,
            ..Default::default()
        }
    }

    pub fn bulk_out(endpoint: u8, data: Vec<u8>) -> Self {
        TransferRequest {
            endpoint: endpoint & 0x7f,
            data,
            ..Default::default()
        }
    }

    pub fn control(setup: SetupPacket, data: Vec<u8>) -> Self {
        let dir_in = setup.direction() == Direction::In;
        TransferRequest {
            endpoint: if dir_in { 0x80 } else { 0 },
            length: if dir_in {
                setup.length.into()
            } else {
                data.len() as u32
            },
            setup: Some(setup),
            data,
            ..Default::default()
        }
    }

    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags |= flags;
        self
    }

    fn direction(&self) -> Direction {
        if self.endpoint & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }
}

/// The outcome of a transfer. A failed IN transfer may still carry data
/// (a short transfer under URB_SHORT_NOT_OK does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub status: Result<(), TransferError>,
    /// IN data.
    pub data: Vec<u8>,
    pub actual_length: u32,
    pub iso: Vec<IsoPacket>,
    pub start_frame: i32,
    /// Isochronous packets that failed (each has its status in `iso`).
    pub error_count: i32,
}

impl Completion {
    /// The data, or the error.
    pub fn into_result(self) -> Result<Vec<u8>, TransferError> {
        self.status.map(|()| self.data)
    }

    fn failed(e: TransferError) -> Self {
        Completion {
            status: Err(e),
            data: Vec::new(),
            actual_length: 0,
            iso: Vec::new(),
            start_frame: 0,
            error_count: 0,
        }
    }
}

enum Command {
    Submit {
        req: TransferRequest,
        seqnum_tx: oneshot::Sender<u32>,
        done: oneshot::Sender<Completion>,
    },
    Unlink {
        seqnum: u32,
    },
}

/// A device imported from a server. Dropping it (and every [`Transfer`])
/// closes the connection, which releases the device on the server.
pub struct RemoteDevice {
    info: DeviceInfo,
    tx: mpsc::UnboundedSender<Command>,
}

/// A submitted transfer: await it for the [`Completion`], or cancel it.
pub struct Transfer {
    seqnum: oneshot::Receiver<u32>,
    known_seqnum: Option<u32>,
    done: oneshot::Receiver<Completion>,
    tx: mpsc::UnboundedSender<Command>,
}

impl Transfer {
    /// The URB's seqnum on the wire, once it has been sent.
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
            let _ = self.tx.send(Command::Unlink { seqnum });
        }
    }
}

impl Future for Transfer {
    type Output = Completion;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Completion> {
        Pin::new(&mut self.done)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Completion::failed(TransferError::Disconnected(None))))
    }
}

impl RemoteDevice {
    fn start(stream: TcpStream, info: DeviceInfo, addr: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let devid = info.devid();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, rx, devid).await {
                tracing::debug!(%addr, "connection ended: {e}");
            }
        });
        RemoteDevice { info, tx }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Submits a transfer; many may be in flight at once.
    pub fn submit(&self, req: TransferRequest) -> Transfer {
        let (seqnum_tx, seqnum) = oneshot::channel();
        let (done_tx, done) = oneshot::channel();
        let _ = self.tx.send(Command::Submit {
            req,
            seqnum_tx,
            done: done_tx,
        });
        Transfer {
            seqnum,
            known_seqnum: None,
            done,
            tx: self.tx.clone(),
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

struct Pending {
    direction: Direction,
    iso: bool,
    length: u32,
    done: oneshot::Sender<Completion>,
}

async fn connection(
    mut stream: TcpStream,
    mut rx: mpsc::UnboundedReceiver<Command>,
    devid: u32,
) -> std::io::Result<()> {
    let limits = Limits::default();
    let mut next_seq: u32 = 1;
    let mut pending: HashMap<u32, Pending> = HashMap::new();
    // CMD_UNLINK seqnum -> the URB it cancels: RET_UNLINK names only the former.
    let mut unlinks: HashMap<u32, u32> = HashMap::new();
    let mut rbuf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut wbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut payloads: Vec<(usize, Vec<u8>)> = Vec::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let Some(cmd) = cmd else {
                    // Every handle is gone: close, which releases the device.
                    let _ = stream.shutdown().await;
                    return Ok(());
                };
                // Batch every command already queued into one write.
                let mut cmd = Some(cmd);
                while let Some(c) = cmd.take().or_else(|| rx.try_recv().ok()) {
                    match c {
                        Command::Submit { req, seqnum_tx, done } => {
                            let seqnum = next_seq;
                            next_seq = next_seq.wrapping_add(1).max(1);
                            let direction = req.direction();
                            let sub = CmdSubmit {
                                seqnum,
                                devid,
                                direction,
                                ep: u32::from(req.endpoint & 0x0f),
                                transfer_flags: req.flags,
                                transfer_buffer_length: if direction == Direction::Out { req.data.len() as u32 } else { req.length },
                                start_frame: req.start_frame,
                                number_of_packets: req.iso.len() as u32,
                                interval: req.interval,
                                setup: req.setup.unwrap_or_default().to_bytes(),
                            };
                            let start = wbuf.len();
                            wbuf.resize(start + URB_HEADER_LEN, 0);
                            sub.write_header(&mut wbuf[start..]);
                            if direction == Direction::Out && !req.data.is_empty() {
                                // Large payloads are written from their own buffer
                                // (vectored) rather than copied into wbuf.
                                payloads.push((wbuf.len(), req.data));
                            }
                            for p in &req.iso {
                                p.encode(&mut wbuf);
                            }
                            pending.insert(seqnum, Pending { direction, iso: !req.iso.is_empty(), length: sub.transfer_buffer_length, done });
                            let _ = seqnum_tx.send(seqnum);
                        }
                        Command::Unlink { seqnum } => {
                            if pending.contains_key(&seqnum) {
                                let s = next_seq;
                                next_seq = next_seq.wrapping_add(1).max(1);
                                CmdUnlink { seqnum: s, devid, unlink_seqnum: seqnum, ..Default::default() }.encode(&mut wbuf);
                                unlinks.insert(s, seqnum);
                            }
                        }
                    }
                }
                write_batch(&mut stream, &wbuf, &payloads).await?;
                wbuf.clear();
                payloads.clear();
            }
            r = stream.read_buf(&mut rbuf) => {
                if r? == 0 {
                    // Server closed: every pending transfer fails as disconnected.
                    return Ok(());
                }
                let mut at = 0;
                loop {
                    let decoded = UrbReply::decode(&rbuf[at..], &limits, |seq| {
                        pending.get(&seq).map(|p| InFlight { direction: p.direction, iso: p.iso, length: p.length })
                    });
                    match decoded {
                        Ok(Decoded::NeedMore(n)) => {
                            if rbuf.capacity() < at + n { rbuf.reserve(at + n - rbuf.len()); }
                            break;
                        }
                        Ok(Decoded::Message(reply, used)) => {
                            let base = at;
                            at += used;
                            match reply {
                                UrbReply::Submit { ret, data, iso } => {
                                    if let Some(p) = pending.remove(&ret.seqnum) {
                                        let c = Completion {
                                            status: TransferError::from_status(ret.status),
                                            data: rbuf[base + data.start..base + data.end].to_vec(),
                                            actual_length: ret.actual_length,
                                            iso: IsoPacket::iter(&rbuf[base + iso.start..base + iso.end]).collect(),
                                            start_frame: ret.start_frame,
                                            error_count: ret.error_count,
                                        };
                                        let _ = p.done.send(c);
                                    }
                                }
                                UrbReply::Unlink(u) => {
                                    // -ECONNRESET: the URB will never get a RET_SUBMIT.
                                    // 0: its RET_SUBMIT already came.
                                    let target = unlinks.remove(&u.seqnum);
                                    if let (Some(target), Err(e)) = (target, TransferError::from_status(u.status)) {
                                        if let Some(p) = pending.remove(&target) {
                                            let _ = p.done.send(Completion::failed(e));
                                        }
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!("server sent an invalid reply: {e}");
                            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                        }
                    }
                }
                rbuf.drain(..at);
            }
        }
    }
}

async fn write_batch(
    stream: &mut TcpStream,
    wbuf: &[u8],
    payloads: &[(usize, Vec<u8>)],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(payloads.len() * 2 + 1);
    let mut at = 0;
    for (pos, data) in payloads {
        slices.push(IoSlice::new(&wbuf[at..*pos]));
        slices.push(IoSlice::new(data));
        at = *pos;
    }
    slices.push(IoSlice::new(&wbuf[at..]));
    let mut slices: Vec<IoSlice<'_>> = slices.into_iter().filter(|s| !s.is_empty()).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = stream.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
