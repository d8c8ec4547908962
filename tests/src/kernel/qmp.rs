//! Just enough of qemu's machine protocol (QMP) for the harness: learning which
//! host ports qemu bound for `hostfwd=tcp:127.0.0.1:0-:<guest port>` (qemu
//! (libslirp) accepts port 0, lets the OS choose, and shows the result in the human
//! monitor's `info usernet`), and the commands a test sends to a running guest
//! (`send-key`, `input-send-event`, ...).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Generous: qemu answers as soon as it runs, but the machine may be busy.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// One QMP session in command mode (greeting read, capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting and leaves capabilities negotiation mode, over `stream`
    /// (connected to a `-mon chardev=...,mode=control` monitor).
    pub fn connect(stream: UnixStream) -> Result<Qmp, String> {
        stream
            .set_read_timeout(Some(ANSWER_LIMIT))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = read_message(&mut qmp.reader)?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::Value::Null)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` (`Null`: none) and returns its `return` value;
    /// a QMP `error` answer is an `Err` with qemu's description.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let mut request = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let json = request.to_string();
        self.writer
            .write_all(format!("{json}\n").as_bytes())
            .map_err(|e| format!("sending {json}: {e}"))?;
        // Asynchronous events may come first; a bounded number of them.
        for _ in 0..1000 {
            let mut m = read_message(&mut self.reader)?;
            if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = m.get("error") {
                return Err(format!("{json} failed: {e}"));
            }
        }
        Err(format!("no answer to {json} among 1000 messages"))
    }

    /// Guest port -> host port of every TCP host forward.
    pub fn host_forwards(&mut self) -> Result<BTreeMap<u16, u16>, String> {
        let text = self.execute(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info usernet" }),
        )?;
        let text = text
            .as_str()
            .ok_or_else(|| format!("`info usernet` returned {text}"))?;
        parse_usernet(text)
    }
}

fn read_message(reader: &mut impl BufRead) -> Result<serde_json::Value, String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err("qemu closed its monitor (it exited; see its stderr)".into()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("{e} in {line:?}")),
        Err(e) => Err(format!("reading from qemu's monitor: {e}")),
    }
}

/// The `TCP[HOST_FORWARD]` rows of `info usernet`:
/// `Protocol[State] FD Source-Address Port Dest.-Address Port RecvQ SendQ`.
fn parse_usernet(text: &str) -> Result<BTreeMap<u16, u16>, String> {
    let mut ports = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"TCP[HOST_FORWARD]") {
            continue;
        }
        let port = |i: usize| {
            f.get(i)
                .and_then(|p| p.parse::<u16>().ok())
                .ok_or_else(|| format!("unexpected `info usernet` row {line:?}"))
        };
        let (host, guest) = (port(3)?, port(5)?);
        if host == 0 {
            return Err(format!("qemu did not bind a host port: {line:?}"));
        }
        ports.insert(guest, host);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernet_rows_map_guest_ports_to_host_ports() {
        let text = "Hub -1 (n0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]   9       127.0.0.1 38403       10.0.2.15  3240     0     0\r\n  TCP[HOST_FORWARD]   8       127.0.0.1 33445       10.0.2.15  5000     0     0\r\n  TCP[ESTABLISHED]   12       10.0.2.15 40000       10.0.2.2  3240     0     0\r\n";
        let got = parse_usernet(text).unwrap();
        assert_eq!(got, BTreeMap::from([(3240, 38403), (5000, 33445)]));
        assert!(parse_usernet("  TCP[HOST_FORWARD] 9 127.0.0.1 x 10.0.2.15 1 0 0").is_err());
    }
}
