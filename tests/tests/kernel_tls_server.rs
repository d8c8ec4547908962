//! Our usbipd inside the Debian guest, whose kernel has TLS (`tls.ko`),
//! with `[tls] kernel = "on"`: after the TLS handshake and the import in
//! user space, the kernel carries the URB phase. Our library client on the
//! host (user-space TLS, through the guest's port forward) writes and reads
//! the emulated disk through it; the log and /proc/net/tls_stat say the
//! kernel did the work, and the image holds what was written.
//!
//! The same run measures 64 KiB bulk through the guest's usbipd over
//! plaintext, kernel TLS and user-space TLS (printed, not asserted: qemu
//! TCG timings are only good for ratios; `USBWIRE_GUEST_USBIPD=PATH` runs
//! another usbipd build in the guest, e.g. a stripped release build).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use usbwire_client::{RemoteDevice, ServerTrust, TlsClientConfig, TransferRequest};
use usbwire_proto::urb::InFlight;
use usbwire_proto::{
    Decoded, Direction, Limits, OpReply, OpRequest, OpStatus, UrbReply, USBIP_VERSION,
};
use usbwire_tests::kernel;
use usbwire_tests::support::{bulk_endpoints, output_value, set_configuration, sha256_hex};
use usbwire_tests::tls::Ca;

/// usbipd with kernel TLS on: the disk and a source/sink test device.
const KERNEL_PORT: u16 = 3240;
/// usbipd with kernel TLS off: a test device, to compare with.
const USER_PORT: u16 = 3241;
const SIGNAL_STAT: u16 = 5555;
const SIGNAL_END: u16 = 5556;
/// usbipd with kernel TLS "auto", while the kernel has tls but not gcm.
const AUTO_PORT: u16 = 3242;
const SIGNAL_AUTO: u16 = 5557;
/// Where the host writes on the disk, in 512-byte blocks.
const LBA: u32 = 2048;
const BLOCKS: u16 = 128;
const WITHIN: Duration = Duration::from_secs(60);

/// One bulk-only mass-storage command: CBW, data stage, CSW. Returns the
/// IN data and the CSW status.
async fn bot(
    dev: &RemoteDevice,
    (ep_in, ep_out): (u8, u8),
    tag: u32,
    cdb: &[u8],
    out: Option<&[u8]>,
    in_len: u32,
) -> (Vec<u8>, u8) {
    let mut cbw = Vec::with_capacity(31);
    cbw.extend_from_slice(b"USBC");
    cbw.extend_from_slice(&tag.to_le_bytes());
    let len = out.map_or(in_len, |d| d.len() as u32);
    cbw.extend_from_slice(&len.to_le_bytes());
    cbw.push(if out.is_some() { 0x00 } else { 0x80 });
    cbw.push(0);
    cbw.push(cdb.len() as u8);
    let mut block = [0u8; 16];
    block[..cdb.len()].copy_from_slice(cdb);
    cbw.extend_from_slice(&block);
    tokio::time::timeout(WITHIN, dev.bulk_out(ep_out, &cbw))
        .await
        .expect("CBW in time")
        .expect("CBW");
    let data = match out {
        Some(d) => {
            tokio::time::timeout(WITHIN, dev.bulk_out(ep_out, d))
                .await
                .expect("data OUT in time")
                .expect("data OUT");
            Vec::new()
        }
        None => tokio::time::timeout(WITHIN, dev.bulk_in(ep_in, in_len))
            .await
            .expect("data IN in time")
            .expect("data IN"),
    };
    let csw = tokio::time::timeout(WITHIN, dev.bulk_in(ep_in, 13))
        .await
        .expect("CSW in time")
        .expect("CSW");
    assert_eq!(&csw[..4], b"USBS", "CSW signature: {csw:02x?}");
    assert_eq!(csw[4..8], tag.to_le_bytes(), "CSW tag");
    (data, csw[12])
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = opcode;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// MB/s of 64 KiB bulk OUT, then IN, eight transfers in flight, `rounds`
/// times each way.
async fn bulk_rate(dev: &RemoteDevice, (ep_in, ep_out): (u8, u8), rounds: usize) -> (f64, f64) {
    const LEN: usize = 64 * 1024;
    const IN_FLIGHT: usize = 8;
    let mut rates = [0.0; 2];
    for (i, rate) in rates.iter_mut().enumerate() {
        let start = Instant::now();
        for _ in 0..rounds {
            let pending: Vec<_> = (0..IN_FLIGHT)
                .map(|_| {
                    dev.submit(if i == 0 {
                        TransferRequest::bulk_out(ep_out, vec![0u8; LEN])
                    } else {
                        TransferRequest::bulk_in(ep_in, LEN as u32)
                    })
                })
                .collect();
            for p in pending {
                let done = tokio::time::timeout(WITHIN, p).await.expect("64 KiB bulk");
                assert_eq!(done.status, Ok(()));
                assert_eq!(done.actual_length as usize, LEN);
            }
        }
        let bytes = (rounds * IN_FLIGHT * LEN) as f64;
        *rate = bytes / start.elapsed().as_secs_f64() / 1e6;
    }
    (rates[0], rates[1])
}

/// The first exported device whose first interface has `class`.
async fn busid_of(addr: SocketAddr, tls: &TlsClientConfig, class: u8) -> String {
    let devices = usbwire_client::list_tls(&addr.ip().to_string(), addr.port(), tls)
        .await
        .expect("devlist over TLS");
    devices
        .iter()
        .find(|d| d.interfaces.first().is_some_and(|i| i.class == class))
        .unwrap_or_else(|| panic!("no device of class {class:#x} in {devices:?}"))
        .busid
        .to_string()
}

/// A rustls client that sends OP_REQ_IMPORT and, without waiting for its
/// reply, a SET_CONFIGURATION CMD_SUBMIT: in one TLS record (user space
/// then holds the URB when the import is answered, so the server must stay
/// in user space) or in two (the second must stay whole in the socket for
/// the server's kernel). Returns the URB's status.
fn pipelined_import(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    busid: &str,
    one_record: bool,
) -> i32 {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(WITHIN)).unwrap();
    tcp.set_write_timeout(Some(WITHIN)).unwrap();
    let conn = rustls::ClientConnection::new(config, "usbwire-guest".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // Bounded: a TLS 1.3 handshake is a few flights, each read in time.
    for _ in 0..8 {
        if !tls.conn.is_handshaking() {
            break;
        }
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    let mut import = Vec::new();
    OpRequest::Import {
        version: USBIP_VERSION,
        busid: busid.into(),
    }
    .encode(&mut import);
    let mut urb = Vec::new();
    set_configuration(1).encode(&[], &[], &mut urb);
    if one_record {
        import.extend_from_slice(&urb);
        tls.conn.writer().write_all(&import).unwrap();
    } else {
        tls.conn.writer().write_all(&import).unwrap();
        tls.conn.writer().write_all(&urb).unwrap();
    }
    // Both records in one write to the socket.
    let mut wire = Vec::new();
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut wire).unwrap();
    }
    tls.sock.write_all(&wire).unwrap();

    let mut buf = Vec::new();
    let fill = |tls: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
                buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 4096];
        let n = tls.read(&mut chunk).expect("read over TLS");
        assert!(n > 0, "usbipd closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    };
    // Bounded: every turn reads at least one byte, each in time.
    let reply = loop {
        match OpReply::decode(&buf, &Limits::default()).expect("an OP reply") {
            Decoded::Message(m, n) => {
                buf.drain(..n);
                break m;
            }
            _ => fill(&mut tls, &mut buf),
        }
    };
    assert!(
        matches!(
            reply,
            OpReply::Import {
                status: OpStatus::Ok,
                ..
            }
        ),
        "{reply:?}"
    );
    loop {
        let decoded = UrbReply::decode(&buf, &Limits::default(), |_| {
            Some(InFlight {
                direction: Direction::Out,
                iso: false,
                length: 0,
            })
        })
        .expect("a URB reply");
        match decoded {
            Decoded::Message(UrbReply::Submit { ret, .. }, _) => {
                assert_eq!(ret.seqnum, 1);
                return ret.status;
            }
            Decoded::Message(other, _) => panic!("{other:?}"),
            _ => fill(&mut tls, &mut buf),
        }
    }
}

/// The value of `name` in /proc/net/tls_stat's text.
fn tls_stat(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/net/tls_stat:\n{text}"))
}

#[test]
fn usbipd_in_the_guest_carries_imports_on_kernel_tls() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let ca = Ca::new("usbwire test CA");
    let server = ca.issue(&["usbwire-guest"]);
    let client = ca.issue(&["usbwire-host"]);
    let dir = tempfile::tempdir().unwrap();
    let (client_cert, client_key) = client.write(dir.path(), "client");
    let tls = TlsClientConfig::from_files(
        Some((&client_cert, &client_key)),
        &ServerTrust::Fingerprint(server.fingerprint()),
    )
    .unwrap();

    let tls_section = |kernel: &str| {
        format!(
            "[tls]\ncert = \"/etc/usbwire/server.crt\"\nkey = \"/etc/usbwire/server.key\"\n\
             client_ca = \"/etc/usbwire/ca.crt\"\nkernel = \"{kernel}\"\n"
        )
    };
    // Plaintext from the host (qemu's user network shows it as 10.0.2.2),
    // for the comparison.
    let kernel_config = format!(
        "[server]\ntcp_port = {KERNEL_PORT}\n\n\
         [[device]]\nkind = \"mass-storage\"\nimage = \"/tmp/disk.img\"\n\n\
         [[device]]\nkind = \"test\"\n\n{}allow_plaintext = [\"10.0.2.0/24\"]\n",
        tls_section("on")
    );
    let user_config = format!(
        "[server]\ntcp_port = {USER_PORT}\n\n[[device]]\nkind = \"test\"\n\n{}",
        tls_section("off")
    );
    let auto_config = format!(
        "[server]\ntcp_port = {AUTO_PORT}\n\n[[device]]\nkind = \"test\"\n\n{}",
        tls_section("auto")
    );
    let server_fingerprint = server.fingerprint();
    let script = format!(
        r#"set -e
# The kernel loads no module by itself: each refusal below is for the
# module named.
autoload=$(cat /proc/sys/kernel/modprobe)
echo /bin/false > /proc/sys/kernel/modprobe
set +e
timeout 120 usbipd-rs --no-control --config /etc/usbwire/kernel.toml >/tmp/no-tls.log 2>&1
echo "NO_TLS_RC=$?"
modprobe tls
timeout 120 usbipd-rs --no-control --config /etc/usbwire/kernel.toml >/tmp/no-gcm.log 2>&1
echo "NO_GCM_RC=$?"
set -e
echo NO-TLS-LOG-BEGIN
cat /tmp/no-tls.log
echo NO-GCM-LOG-BEGIN
cat /tmp/no-gcm.log
echo NO-LOGS-END
usbipd-rs --no-control --config /etc/usbwire/auto.toml >/tmp/auto.log 2>&1 &
auto=$!
usbwire_wait_listen {AUTO_PORT} 60
echo AUTO-LISTENING
usbwire_wait_signal {SIGNAL_AUTO} 600 >/dev/null
kill $auto
wait $auto || true
echo AUTO-LOG-BEGIN
cat /tmp/auto.log
echo AUTO-LOG-END
for m in gf128mul ghash-generic ctr gcm; do modprobe $m; done
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
usbipd-rs --no-control --config /etc/usbwire/kernel.toml >/tmp/kernel.log 2>&1 &
usbipd-rs --no-control --config /etc/usbwire/user.toml >/tmp/user.log 2>&1 &
usbwire_wait_listen {KERNEL_PORT} 60
usbwire_wait_listen {USER_PORT} 60
echo SERVING
usbwire_wait_signal {SIGNAL_STAT} 600 >/dev/null
echo TLS_STAT-BEGIN
cat /proc/net/tls_stat
echo TLS_STAT-END
usbwire_wait_signal {SIGNAL_END} 600 >/dev/null
echo "IMAGE=$(dd if=/tmp/disk.img bs=512 skip={LBA} count={BLOCKS} 2>/dev/null | sha256sum | cut -d' ' -f1)"
# Kernel TLS at both ends: the guest's own vhci-hcd imports the disk
# from this usbipd, each over a socket whose TLS the kernel does.
echo "$autoload" > /proc/sys/kernel/modprobe
modprobe vhci-hcd
TLSOPTS="--tls-cert /etc/usbwire/client.crt --tls-key /etc/usbwire/client.key --tls-fingerprint {server_fingerprint}"
usbwire_wait_cmd 60 sh -c "usbip-rs list -r 127.0.0.1 $TLSOPTS | grep -q ' 1-1: '"
usbip-rs attach -r 127.0.0.1 -b 1-1 --tls $TLSOPTS
usbwire_wait_cmd 60 sh -c 'ls /dev/sd? >/dev/null 2>&1'
dev=$(ls /dev/sd? | head -n 1)
usbwire_wait_cmd 30 sh -c "dd if=$dev bs=512 count=1 of=/dev/null 2>/dev/null"
echo "VHCI_READ=$(dd if=$dev bs=512 skip={LBA} count={BLOCKS} 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo VHCI_STAT-BEGIN
cat /proc/net/tls_stat
echo VHCI_STAT-END
usbip-rs detach -p "$(usbip-rs port | sed -n 's/^Port \([0-9]*\):.*/\1/p' | head -n 1)"
echo KERNEL-LOG-BEGIN
cat /tmp/kernel.log
echo USER-LOG-BEGIN
cat /tmp/user.log
"#
    );
    // The throughput of user-space TLS is that of this build's rustls
    // and ring: a debug build's is no measure of it.
    let usbipd = std::env::var_os("USBWIRE_GUEST_USBIPD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| kernel::stripped_bin("usbipd"));
    let g = guest
        .script(&script)
        .file("/etc/usbwire/server.crt", server.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/server.key", server.key.as_bytes(), 0o600)
        .file("/etc/usbwire/ca.crt", ca.pem().as_bytes(), 0o644)
        .file("/etc/usbwire/kernel.toml", kernel_config.as_bytes(), 0o644)
        .file("/etc/usbwire/user.toml", user_config.as_bytes(), 0o644)
        .file("/etc/usbwire/auto.toml", auto_config.as_bytes(), 0o644)
        .file("/etc/usbwire/client.crt", client.cert.as_bytes(), 0o644)
        .file("/etc/usbwire/client.key", client.key.as_bytes(), 0o600)
        .host_binary(&usbipd, "/usr/bin/usbipd-rs")
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .memory_mib(1024)
        .hostfwd(KERNEL_PORT)
        .hostfwd(USER_PORT)
        .hostfwd(SIGNAL_STAT)
        .hostfwd(SIGNAL_END)
        .hostfwd(AUTO_PORT)
        .hostfwd(SIGNAL_AUTO)
        .timeout(Duration::from_secs(900))
        .spawn()
        .expect("boot the guest");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // kernel = "auto" on a kernel with tls but without gcm: the imports
    // are served in user space, and the log says why once.
    g.wait_for_output("AUTO-LISTENING", Duration::from_secs(300))
        .expect("usbipd (auto) listening in the guest");
    let auto_addr = SocketAddr::from(([127, 0, 0, 1], g.host_port(AUTO_PORT)));
    rt.block_on(async {
        let busid = busid_of(auto_addr, &tls, 0xff).await;
        for _ in 0..2 {
            let dev = usbwire_client::import_tls("127.0.0.1", auto_addr.port(), &tls, &busid)
                .await
                .expect("import over TLS from usbipd (auto)");
            dev.set_configuration(1).await.unwrap();
            let (ep_in, ep_out) = bulk_endpoints(&dev.config_descriptor().await.unwrap());
            dev.bulk_out(ep_out, &[0u8; 4096]).await.expect("bulk OUT");
            let data = dev.bulk_in(ep_in, 4096).await.expect("bulk IN");
            assert_eq!(data, vec![0u8; 4096]);
        }
    });
    g.signal(SIGNAL_AUTO, "done", WITHIN).expect("signal auto");

    g.wait_for_output("SERVING", Duration::from_secs(300))
        .expect("usbipd listening in the guest");
    let kernel_addr = SocketAddr::from(([127, 0, 0, 1], g.host_port(KERNEL_PORT)));
    let user_addr = SocketAddr::from(([127, 0, 0, 1], g.host_port(USER_PORT)));

    // A block pattern no zeroed image holds by chance.
    let pattern: Vec<u8> = (0..usize::from(BLOCKS) * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8).wrapping_mul(31) ^ 0xa5)
        .collect();
    let rates = rt.block_on(async {
        let host = kernel_addr.ip().to_string();
        let disk = busid_of(kernel_addr, &tls, 0x08).await;
        let dev = usbwire_client::import_tls(&host, kernel_addr.port(), &tls, &disk)
            .await
            .expect("import the disk over TLS");
        dev.set_configuration(1).await.expect("SET_CONFIGURATION");
        let eps = bulk_endpoints(&dev.config_descriptor().await.unwrap());
        let (_, status) = bot(&dev, eps, 1, &rw10(0x2a, LBA, BLOCKS), Some(&pattern), 0).await;
        assert_eq!(status, 0, "WRITE(10)");
        let (back, status) = bot(
            &dev,
            eps,
            2,
            &rw10(0x28, LBA, BLOCKS),
            None,
            pattern.len() as u32,
        )
        .await;
        assert_eq!(status, 0, "READ(10)");
        assert!(back == pattern, "the disk gave back other data");

        // The connection is open: the kernel holds its TLS state now.
        g.signal(SIGNAL_STAT, "stat", WITHIN).expect("signal stat");
        g.wait_for_output("TLS_STAT-END", WITHIN)
            .expect("/proc/net/tls_stat");
        drop(dev);

        // Throughput, for the report: the same test device through one
        // usbipd, plaintext then kernel TLS, and through the other in
        // user-space TLS.
        let test_dev = busid_of(kernel_addr, &tls, 0xff).await;
        let plain = usbwire_client::import(kernel_addr, &test_dev)
            .await
            .expect("plaintext import from 10.0.2.0/24");
        plain.set_configuration(1).await.unwrap();
        let eps = bulk_endpoints(&plain.config_descriptor().await.unwrap());
        bulk_rate(&plain, eps, 1).await;
        let plaintext = bulk_rate(&plain, eps, 8).await;
        drop(plain);
        let ktls = usbwire_client::import_tls(&host, kernel_addr.port(), &tls, &test_dev)
            .await
            .expect("import the test device over kernel TLS");
        ktls.set_configuration(1).await.unwrap();
        bulk_rate(&ktls, eps, 1).await;
        let kernel_tls = bulk_rate(&ktls, eps, 8).await;
        drop(ktls);
        let user_dev = busid_of(user_addr, &tls, 0xff).await;
        let user = usbwire_client::import_tls(&host, user_addr.port(), &tls, &user_dev)
            .await
            .expect("import the test device over user-space TLS");
        user.set_configuration(1).await.unwrap();
        let eps = bulk_endpoints(&user.config_descriptor().await.unwrap());
        bulk_rate(&user, eps, 1).await;
        let user_tls = bulk_rate(&user, eps, 8).await;
        drop(user);
        (plaintext, kernel_tls, user_tls, test_dev)
    });
    let (plaintext, kernel_tls, user_tls, test_dev) = rates;
    let rates = (plaintext, kernel_tls, user_tls);
    // Clients that send a URB before the import is answered.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let raw_client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(client.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(client.key.as_bytes()).unwrap(),
        )
        .unwrap(),
    );
    assert_eq!(
        pipelined_import(kernel_addr, raw_client.clone(), &test_dev, false),
        0,
        "URB in its own record, after the import's"
    );
    assert_eq!(
        pipelined_import(kernel_addr, raw_client, &test_dev, true),
        0,
        "URB in the import's record"
    );
    g.signal(SIGNAL_END, "end", WITHIN).expect("signal end");
    let out = g.wait().expect("guest run");
    out.assert_success();
    let text = out.output.clone();

    // kernel = "on" without the tls module, then without gcm: no start,
    // and the modprobe that is missing.
    assert_eq!(output_value(&text, "NO_TLS_RC="), "1");
    assert_eq!(output_value(&text, "NO_GCM_RC="), "1");
    let (no_tls, no_gcm) = text
        .split("NO-TLS-LOG-BEGIN")
        .nth(1)
        .and_then(|s| s.split("NO-LOGS-END").next())
        .and_then(|s| s.split_once("NO-GCM-LOG-BEGIN"))
        .expect("the refusals' logs");
    assert!(
        no_tls.contains(
            "kernel TLS is required (--tls-kernel on, tls.kernel = \"on\"): \
             kernel TLS is not available: modprobe tls"
        ),
        "{no_tls}"
    );
    assert!(
        no_gcm.contains(
            "kernel TLS is required (--tls-kernel on, tls.kernel = \"on\"): \
             kernel TLS has no AES-128-GCM cipher: modprobe gcm (TLS_TX failed: ENOENT"
        ),
        "{no_gcm}"
    );

    let auto_log = text
        .split("AUTO-LOG-BEGIN")
        .nth(1)
        .and_then(|s| s.split("AUTO-LOG-END").next())
        .expect("the auto usbipd's log");
    assert_eq!(
        auto_log
            .matches("kernel TLS has no AES-128-GCM cipher: modprobe gcm (TLS_TX failed: ENOENT")
            .count(),
        1,
        "said once:\n{auto_log}"
    );
    assert!(
        auto_log.contains("TLS imports use user-space TLS (rustls) instead"),
        "{auto_log}"
    );
    assert_eq!(
        auto_log
            .lines()
            .filter(|l| l.contains(" imported")
                && l.contains("via=user-space TLS, TLS13_AES_128_GCM_SHA256"))
            .count(),
        2,
        "{auto_log}"
    );

    let stat = text
        .split("TLS_STAT-BEGIN")
        .nth(1)
        .and_then(|s| s.split("TLS_STAT-END").next())
        .expect("tls_stat printed");
    // While the disk's connection was open: its TLS was the kernel's, in
    // software (no NIC offload under qemu), both ways.
    assert!(tls_stat(stat, "TlsCurrTxSw") >= 1, "{stat}");
    assert!(tls_stat(stat, "TlsCurrRxSw") >= 1, "{stat}");
    assert_eq!(tls_stat(stat, "TlsDecryptError"), 0, "{stat}");

    assert_eq!(
        output_value(&text, "IMAGE="),
        sha256_hex(&pattern),
        "the image holds what was written through kernel TLS"
    );
    // vhci-hcd read back, through kernel TLS at both ends, what the host
    // wrote.
    assert_eq!(
        output_value(&text, "VHCI_READ="),
        sha256_hex(&pattern),
        "vhci-hcd over kernel TLS to usbipd over kernel TLS"
    );
    let vhci_stat = text
        .split("VHCI_STAT-BEGIN")
        .nth(1)
        .and_then(|s| s.split("VHCI_STAT-END").next())
        .expect("tls_stat printed while vhci-hcd held the disk");
    // The client's socket and the server's, each both ways.
    assert!(tls_stat(vhci_stat, "TlsCurrTxSw") >= 2, "{vhci_stat}");
    assert!(tls_stat(vhci_stat, "TlsCurrRxSw") >= 2, "{vhci_stat}");
    assert_eq!(tls_stat(vhci_stat, "TlsDecryptError"), 0, "{vhci_stat}");
    let (kernel_log, user_log) = text
        .split("KERNEL-LOG-BEGIN")
        .nth(1)
        .and_then(|s| s.split_once("USER-LOG-BEGIN"))
        .expect("usbipd logs printed");
    assert!(
        kernel_log.contains("kernel TLS carries the URB phase of every TLS import"),
        "{kernel_log}"
    );
    let imports: Vec<&str> = kernel_log
        .lines()
        .filter(|l| l.contains(" imported"))
        .collect();
    eprintln!("{}", imports.join("\n"));
    assert_eq!(imports.len(), 6, "{kernel_log}");
    // The disk, the test device, the URB sent in its own record, and the
    // disk again for vhci-hcd.
    assert_eq!(
        imports
            .iter()
            .filter(|l| l.contains("via=kernel TLS, AES-128-GCM"))
            .count(),
        4,
        "{kernel_log}"
    );
    // The URB that shared the import's record: it was in user space.
    assert!(
        imports[4].contains("via=user-space TLS, TLS13_AES_128_GCM_SHA256"),
        "{kernel_log}"
    );
    assert_eq!(
        imports
            .iter()
            .filter(|l| l.contains("via=plaintext"))
            .count(),
        1,
        "{kernel_log}"
    );
    assert!(!kernel_log.contains("WARN"), "{kernel_log}");
    assert!(!kernel_log.contains("ERROR"), "{kernel_log}");
    assert!(
        user_log.contains("via=user-space TLS, TLS13_AES_128_GCM_SHA256"),
        "{user_log}"
    );

    let ((p_out, p_in), (k_out, k_in), (u_out, u_in)) = rates;
    eprintln!(
        "64 KiB bulk through usbipd ({}) in the guest (qemu TCG, 8 in flight, 4 MiB each way), MB/s:\n\
         plaintext        OUT {p_out:6.2}  IN {p_in:6.2}\n\
         kernel TLS       OUT {k_out:6.2}  IN {k_in:6.2}  ({:.0} % / {:.0} % of plaintext)\n\
         user-space TLS   OUT {u_out:6.2}  IN {u_in:6.2}  ({:.0} % / {:.0} % of plaintext)",
        usbipd.display(),
        100.0 * k_out / p_out,
        100.0 * k_in / p_in,
        100.0 * u_out / p_out,
        100.0 * u_in / p_in,
    );
}
