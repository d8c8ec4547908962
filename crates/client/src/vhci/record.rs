//! Port records (`/var/run/vhci_hcd/port<N>`): where the device on a port
//! came from, kept exactly as the C tool keeps them.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use super::Vhci;

/// Where the C tool keeps its port records, relative to the root.
pub const STATE_DIR: &str = "var/run/vhci_hcd";

/// What a port record says: where the device on a port came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRecord {
    pub host: String,
    /// The TCP port, as the user gave it.
    pub service: String,
    /// The bus id on the remote host.
    pub busid: String,
}

impl PortRecord {
    /// `"%s %s %s\n"`, as `record_connection` writes it.
    pub fn to_line(&self) -> String {
        format!("{} {} {}\n", self.host, self.service, self.busid)
    }

    /// Reads a record line with the C tool's checks (`read_record`): three
    /// fields separated by one space and ended by a newline, each within
    /// NI_MAXHOST, NI_MAXSERV and SYSFS_BUS_ID_SIZE.
    pub fn parse(text: &str) -> Option<PortRecord> {
        const MAX: [usize; 3] = [1025, 32, 32];
        let line = text.split_inclusive('\n').next()?;
        let mut parts = Vec::with_capacity(3);
        let mut rest = line;
        for (i, delim) in [' ', ' ', '\n'].into_iter().enumerate() {
            let end = rest.find(delim)?;
            if end > MAX[i] {
                return None;
            }
            parts.push(&rest[..end]);
            rest = &rest[end + 1..];
        }
        // sscanf("%s %s %s") then takes whitespace-separated words.
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 3 || parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(PortRecord {
            host: words[0].to_string(),
            service: words[1].to_string(),
            busid: words[2].to_string(),
        })
    }
}

impl Vhci {
    /// `root/var/run/vhci_hcd`.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(STATE_DIR)
    }

    /// `root/var/run/vhci_hcd/port<N>`.
    pub fn record_path(&self, port: u32) -> PathBuf {
        self.state_dir().join(format!("port{port}"))
    }

    /// Writes a port record as `record_connection` does: directory mode
    /// 0700, file mode 0700, `"host service busid\n"`.
    pub fn write_record(&self, port: u32, record: &PortRecord) -> io::Result<()> {
        let dir = self.state_dir();
        if let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        if !dir.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(self.record_path(port))?;
        f.write_all(record.to_line().as_bytes())
    }

    /// Reads a port record; the error says why not (as text, for display).
    pub fn read_record(&self, port: u32) -> Result<PortRecord, String> {
        let path = self.record_path(port);
        let mut text = String::new();
        fs::File::open(&path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        PortRecord::parse(&text).ok_or_else(|| format!("malformed record in {}", path.display()))
    }

    /// Removes a port record, and the directory if that was the last one,
    /// as `usbip detach` does. Errors are ignored, as there.
    pub fn remove_record(&self, port: u32) {
        let _ = fs::remove_file(self.record_path(port));
        let _ = fs::remove_dir(self.state_dir());
    }
}
