//! Packet captures of a USB/IP port on the host's loopback (tcpdump), and
//! the check that such a capture holds TLS records and nothing a USB/IP
//! reader or a person looking for the data could use (tshark, and a walk
//! over the TLS record headers of every reassembled stream).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::daemon::wait_exit;

/// How long tcpdump may take to start listening or to exit.
const TCPDUMP_LIMIT: Duration = Duration::from_secs(30);

/// The largest TLS record body: 2^14 bytes of plaintext plus what the
/// cipher adds (RFC 8446 5.2).
const MAX_RECORD_BODY: usize = (1 << 14) + 256;

/// `tcpdump` and `tshark`, or what is missing.
pub fn tools() -> Result<(PathBuf, PathBuf), String> {
    let find = |name: &str| {
        ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| format!("{name} not found (.ci/install-deps installs it)"))
    };
    Ok((find("tcpdump")?, find("tshark")?))
}

/// A running tcpdump writing one TCP port's packets on `lo` to a file.
pub struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    /// Starts capturing and returns once tcpdump says it listens.
    pub fn start(tcpdump: &Path, path: &Path, port: u16) -> Capture {
        let mut child = Command::new(tcpdump)
            .args(["-i", "lo", "-U", "-s", "0", "-n", "-w"])
            .arg(path)
            .args(["tcp", "port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let stderr = child.stderr.take().expect("tcpdump's stderr");
        // tcpdump says "listening on lo" once its filter is installed;
        // read on a thread so that a silent tcpdump cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut said = String::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let listening = line.contains("listening on");
                said.push_str(&line);
                said.push('\n');
                if listening {
                    let _ = tx.send(Ok(()));
                    // Keep draining so that tcpdump never blocks on stderr.
                    continue;
                }
            }
            let _ = tx.send(Err(said));
        });
        match rx.recv_timeout(TCPDUMP_LIMIT) {
            Ok(Ok(())) => Capture {
                child,
                path: path.to_path_buf(),
            },
            other => {
                let _ = child.kill();
                panic!("tcpdump did not start listening on lo: {other:?}");
            }
        }
    }

    /// Stops tcpdump (SIGINT: it flushes and exits) and returns the file.
    pub fn stop(mut self) -> PathBuf {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT to tcpdump");
        match wait_exit(&mut self.child, TCPDUMP_LIMIT) {
            Ok(Some(_)) => {}
            other => {
                let _ = self.child.kill();
                panic!("tcpdump did not exit after SIGINT: {other:?}");
            }
        }
        self.path.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a capture of TLS connections held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsCapture {
    /// TCP connections that carried data.
    pub streams: usize,
    /// TLS records, both directions.
    pub records: usize,
    /// Bytes of application-data record bodies (content type 23).
    pub application_bytes: usize,
}

/// Checks that every connection to `port` in `pcap` is TLS records from its
/// first byte to its last, in both directions, that tshark decodes none of
/// it as USB/IP, and that `pattern` (something written in clear by the
/// test) appears nowhere in the file. Each failing check is one line of
/// the error.
pub fn check_tls_only(
    tshark: &Path,
    pcap: &Path,
    port: u16,
    pattern: &[u8],
) -> Result<TlsCapture, Vec<String>> {
    let mut findings = Vec::new();
    let raw = std::fs::read(pcap).expect("reading the capture");
    if raw.windows(pattern.len()).any(|w| w == pattern) {
        findings.push(format!(
            "the data pattern {:?} is in the capture in clear",
            String::from_utf8_lossy(pattern)
        ));
    }
    let usbip = tshark_lines(
        tshark,
        pcap,
        &[
            "-d",
            &format!("tcp.port=={port},usbip"),
            // Frames the dissector understood: an OP header (version
            // 01 11) or a URB header (a command). It takes anything it is
            // given, and calls what it cannot read "Undecoded" with only
            // usbip.unsupported_version, as it does every TLS record.
            "-Y",
            "usbip.version || usbip.urb",
            "-T",
            "fields",
            "-e",
            "frame.number",
        ],
    );
    if !usbip.is_empty() {
        findings.push(format!(
            "tshark decodes {} frames as USB/IP (first: frame {})",
            usbip.len(),
            usbip[0]
        ));
    }
    let mut streams: Vec<u32> = tshark_lines(
        tshark,
        pcap,
        &["-Y", "tcp.len > 0", "-T", "fields", "-e", "tcp.stream"],
    )
    .iter()
    .map(|s| s.parse().expect("a tcp.stream number"))
    .collect();
    streams.sort_unstable();
    streams.dedup();
    let mut summary = TlsCapture {
        streams: streams.len(),
        ..Default::default()
    };
    if streams.is_empty() {
        findings.push("the capture holds no connection with data".into());
    }
    for stream in streams {
        let (to_server, to_client) = follow(tshark, pcap, stream);
        for (direction, bytes) in [("to the server", to_server), ("to the client", to_client)] {
            if bytes.starts_with(&[0x01, 0x11]) {
                findings.push(format!(
                    "stream {stream} {direction} starts with the USB/IP version 01 11"
                ));
            }
            match walk_records(&bytes) {
                Ok((records, application)) => {
                    summary.records += records;
                    summary.application_bytes += application;
                }
                Err(e) => findings.push(format!(
                    "stream {stream} {direction} is not TLS records: {e}"
                )),
            }
        }
    }
    if findings.is_empty() {
        Ok(summary)
    } else {
        Err(findings)
    }
}

/// Walks `bytes` as back-to-back TLS records: (records, application-data
/// body bytes), or where the walk found something else.
pub fn walk_records(bytes: &[u8]) -> Result<(usize, usize), String> {
    let (mut at, mut records, mut application) = (0, 0, 0);
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 5) else {
            return Err(format!(
                "{} bytes at offset {at} are less than a record header",
                bytes.len() - at
            ));
        };
        let kind = header[0];
        let version = u16::from_be_bytes([header[1], header[2]]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // change_cipher_spec, alert, handshake, application_data; TLS 1.3
        // writes 0x0303 (0x0301 in a first ClientHello).
        if !(20..=23).contains(&kind) || !matches!(version, 0x0301 | 0x0303) {
            return Err(format!(
                "offset {at}: {:02x?} is not a TLS record header",
                header
            ));
        }
        if len > MAX_RECORD_BODY {
            return Err(format!("offset {at}: a {len}-byte record body"));
        }
        if at + 5 + len > bytes.len() {
            return Err(format!(
                "offset {at}: the stream ends inside a {len}-byte record"
            ));
        }
        records += 1;
        if kind == 23 {
            application += len;
        }
        at += 5 + len;
    }
    Ok((records, application))
}

fn tshark_lines(tshark: &Path, pcap: &Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(tshark)
        .arg("-r")
        .arg(pcap)
        .args(args)
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// One TCP stream's bytes, reassembled by tshark: (from the first talker,
/// from the other), the first talker being the one that connected.
fn follow(tshark: &Path, pcap: &Path, stream: u32) -> (Vec<u8>, Vec<u8>) {
    let out = Command::new(tshark)
        .arg("-r")
        .arg(pcap)
        .args(["-q", "-z", &format!("follow,tcp,raw,{stream}")])
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark follow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    // The raw dump: one line of hex per segment after the "Node 1:" line,
    // the second talker's lines indented with a tab, then a ==== line.
    let body = text
        .split_once("Node 1:")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .map(|(_, rest)| rest)
        .unwrap_or("");
    for line in body.lines() {
        if line.starts_with('=') {
            break;
        }
        let (to, hex) = match line.strip_prefix('\t') {
            Some(hex) => (&mut second, hex),
            None => (&mut first, line),
        };
        let hex = hex.trim();
        assert!(
            hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "tshark follow printed {line:?}"
        );
        for pair in hex.as_bytes().chunks(2) {
            let pair = std::str::from_utf8(pair).expect("hex digits");
            to.push(u8::from_str_radix(pair, 16).expect("hex digits"));
        }
    }
    (first, second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn records_back_to_back_pass_and_usbip_does_not() {
        let tls = [
            record(22, &[1; 200]),
            record(23, &[7; 1000]),
            record(23, &[]),
        ]
        .concat();
        assert_eq!(walk_records(&tls), Ok((3, 1000)));
        // OP_REQ_DEVLIST: 01 11 80 05, status 0.
        let usbip = [0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0];
        assert!(walk_records(&usbip).is_err());
        // A record cut short, and one too long for TLS.
        assert!(walk_records(&tls[..tls.len() - 1]).is_err());
        let mut long = record(23, &[0; 10]);
        long[3..5].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(walk_records(&long).is_err());
    }
}
