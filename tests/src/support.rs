//! An in-process server on loopback and a raw USB/IP peer, for tests that
//! need to put exact bytes on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usbwire_devices::{EmulatedBackend, EmulatedDevice};
use usbwire_proto::urb::{InFlight, URB_HEADER_LEN};
use usbwire_proto::{
    CmdSubmit, CmdUnlink, Decoded, DeviceInfo, Direction, Limits, OpReply, OpRequest, OpStatus,
    RetSubmit, RetUnlink, SetupPacket, Speed, UrbReply, USBIP_VERSION,
};
use usbwire_server::{Registry, Server, ServerConfig};
use usbwire_usb::descriptor::{self, TransferType};

/// A server running in this process on 127.0.0.1, port chosen by the OS.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Server,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Exports `devices` as 1-1, 1-2, ... and serves them.
    pub async fn start(devices: Vec<EmulatedDevice>, config: ServerConfig) -> TestServer {
        let backends = devices
            .into_iter()
            .map(|d| Box::new(EmulatedBackend::new(d)) as Box<dyn usbwire_server::Backend>)
            .collect();
        Self::start_backends(backends, config).await
    }

    /// Exports arbitrary backends as 1-1, 1-2, ... and serves them.
    pub async fn start_backends(
        backends: Vec<Box<dyn usbwire_server::Backend>>,
        config: ServerConfig,
    ) -> TestServer {
        let registry = Registry::new();
        for (i, backend) in backends.into_iter().enumerate() {
            let busid = format!("1-{}", i + 1);
            let info = backend.device_info(&busid, 1, i as u32 + 2);
            registry.add(info, backend).expect("fresh registry");
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let server = Server::new(registry, config).expect("valid config");
        let (tx, rx) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            s.run(vec![listener], async {
                let _ = rx.await;
            })
            .await;
        });
        TestServer {
            addr,
            server,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits until it has flushed every device.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// What a raw peer reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Submit(RetSubmit, Vec<u8>),
    Unlink(RetUnlink),
}

/// A USB/IP peer that writes exactly what a test tells it to.
pub struct RawPeer {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Directions of submitted URBs, to frame replies.
    inflight: std::collections::HashMap<u32, (Direction, u32)>,
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to test server");
        stream.set_nodelay(true).unwrap();
        RawPeer {
            stream,
            buf: Vec::new(),
            inflight: Default::default(),
        }
    }

    /// Connects and imports `busid`, panicking unless it succeeds.
    pub async fn import(addr: SocketAddr, busid: &str) -> RawPeer {
        let mut p = RawPeer::connect(addr).await;
        let mut out = Vec::new();
        OpRequest::Import {
            version: USBIP_VERSION,
            busid: busid.into(),
        }
        .encode(&mut out);
        p.send(&out).await;
        match p.read_op().await {
            OpReply::Import {
                status: OpStatus::Ok,
                device: Some(d),
                ..
            } => assert_eq!(d.busid, busid),
            other => panic!("import of {busid} failed: {other:?}"),
        }
        p
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to server");
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; 65536];
        match tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("server sent nothing for {TIMEOUT:?}"),
        }
    }

    pub async fn read_op(&mut self) -> OpReply {
        loop {
            if let Decoded::Message(m, n) =
                OpReply::decode(&self.buf, &Limits::default()).expect("valid OP reply")
            {
                self.buf.drain(..n);
                return m;
            }
            assert!(
                self.fill().await,
                "server closed the connection during the OP phase"
            );
        }
    }

    pub async fn submit(&mut self, cmd: CmdSubmit, data: &[u8]) {
        let mut out = Vec::new();
        self.encode_submit(cmd, data, &mut out);
        self.send(&out).await;
    }

    /// Appends a CMD_SUBMIT to `out` and expects its reply, for tests that
    /// send the bytes themselves (split, delayed).
    pub fn encode_submit(&mut self, cmd: CmdSubmit, data: &[u8], out: &mut Vec<u8>) {
        self.inflight
            .insert(cmd.seqnum, (cmd.direction, cmd.transfer_buffer_length));
        cmd.encode(data, &[], out);
    }

    pub async fn unlink(&mut self, seqnum: u32, target: u32) {
        let mut out = Vec::new();
        CmdUnlink {
            seqnum,
            unlink_seqnum: target,
            ..Default::default()
        }
        .encode(&mut out);
        self.send(&out).await;
    }

    /// The next reply; panics on timeout or close.
    pub async fn next(&mut self) -> Reply {
        loop {
            let inflight = &self.inflight;
            let d = UrbReply::decode(&self.buf, &Limits::default(), |s| {
                inflight.get(&s).map(|(d, len)| InFlight {
                    direction: *d,
                    iso: false,
                    length: *len,
                })
            })
            .expect("valid URB reply");
            if let Decoded::Message(r, n) = d {
                let reply = match r {
                    UrbReply::Submit { ret, data, .. } => {
                        self.inflight.remove(&ret.seqnum);
                        Reply::Submit(ret, self.buf[data].to_vec())
                    }
                    UrbReply::Unlink(u) => Reply::Unlink(u),
                };
                self.buf.drain(..n);
                return reply;
            }
            assert!(self.fill().await, "server closed the connection");
        }
    }

    /// Waits briefly and reports whether any byte arrived.
    pub async fn quiet_for(&mut self, d: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut b = [0u8; 1];
        match tokio::time::timeout(d, self.stream.peek(&mut b)).await {
            Err(_) => true,
            Ok(Ok(0)) => true,
            Ok(_) => false,
        }
    }

    /// Whether the server closed the connection (within the timeout).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        for _ in 0..1000 {
            match tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The device record of a hand-written test backend: vendor 1, product
/// `product`, high speed, vendor-specific, configured, no interfaces listed.
pub fn test_device_info(busid: &str, busnum: u32, devnum: u32, product: u16) -> DeviceInfo {
    DeviceInfo {
        path: Default::default(),
        busid: busid.into(),
        busnum,
        devnum,
        speed: Speed::High,
        id_vendor: 1,
        id_product: product,
        bcd_device: 0,
        device_class: 0xff,
        device_subclass: 0,
        device_protocol: 0,
        configuration_value: 1,
        num_configurations: 1,
        num_interfaces: 0,
        interfaces: vec![],
    }
}

/// A CMD_SUBMIT with the fields tests vary.
pub fn submit(seqnum: u32, ep: u32, direction: Direction, len: u32) -> CmdSubmit {
    CmdSubmit {
        seqnum,
        devid: 0x0001_0002,
        direction,
        ep,
        transfer_flags: 0,
        transfer_buffer_length: len,
        start_frame: 0,
        number_of_packets: 0,
        interval: 0,
        setup: [0; 8],
    }
}

/// A control CMD_SUBMIT on endpoint 0.
pub fn control(seqnum: u32, setup: SetupPacket) -> CmdSubmit {
    let dir = setup.direction();
    let mut c = submit(seqnum, 0, dir, u32::from(setup.length));
    c.setup = setup.to_bytes();
    c
}

pub fn set_configuration(seqnum: u32) -> CmdSubmit {
    control(
        seqnum,
        SetupPacket {
            request_type: 0,
            request: 9,
            value: 1,
            index: 0,
            length: 0,
        },
    )
}

pub const HEADER: usize = URB_HEADER_LEN;

/// Bulk endpoint addresses (IN, OUT) of interface 0, alternate setting 0,
/// from a configuration descriptor.
pub fn bulk_endpoints(config: &[u8]) -> (u8, u8) {
    let (mut ep_in, mut ep_out) = (0u8, 0u8);
    let bulk = descriptor::endpoints(config)
        .filter(|e| e.interface == 0 && e.alt_setting == 0)
        .filter(|e| e.transfer_type == TransferType::Bulk);
    for e in bulk {
        if e.address & 0x80 != 0 {
            ep_in = e.address;
        } else {
            ep_out = e.address;
        }
    }
    assert!(
        ep_in != 0 && ep_out != 0,
        "no bulk endpoints in {config:02x?}"
    );
    (ep_in, ep_out)
}

/// The hex SHA-256 of `data`, computed by `sha256sum` so that it is the
/// same tool the guest scripts use.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The value of a `KEY=value` line a guest script printed; panics with the
/// whole output when there is none.
pub fn output_value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("guest output has no {key} line:\n{output}"))
}
