//! The bindings that survive a daemon restart: a small JSON file, written
//! atomically (temporary file, then rename).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One bound device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub busid: String,
    pub vendor: u16,
    pub product: u16,
    #[serde(default)]
    pub serial: Option<String>,
    /// The driver each interface had before the bind, `(interface, driver)`.
    #[serde(default)]
    pub drivers: Vec<(u8, Option<String>)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub bindings: Vec<Binding>,
}

impl State {
    /// Reads the file; a missing file is an empty state.
    pub fn load(path: &Path) -> io::Result<State> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let mut text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        text.push(b'\n');
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)
    }

    pub fn get(&self, busid: &str) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.busid == busid)
    }

    pub fn upsert(&mut self, b: Binding) {
        self.bindings.retain(|x| x.busid != b.busid);
        self.bindings.push(b);
        self.bindings.sort_by(|a, b| a.busid.cmp(&b.busid));
    }

    pub fn remove(&mut self, busid: &str) -> bool {
        let n = self.bindings.len();
        self.bindings.retain(|x| x.busid != busid);
        n != self.bindings.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_a_missing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/bindings.json");
        assert_eq!(State::load(&p).unwrap(), State::default());
        let mut s = State::default();
        s.upsert(Binding {
            busid: "2-1".into(),
            vendor: 0x0525,
            product: 0xa4a5,
            serial: Some("x".into()),
            drivers: vec![(0, Some("usb-storage".into()))],
        });
        s.upsert(Binding {
            busid: "1-1".into(),
            vendor: 1,
            product: 2,
            serial: None,
            drivers: vec![],
        });
        s.save(&p).unwrap();
        let l = State::load(&p).unwrap();
        assert_eq!(l, s);
        assert_eq!(l.bindings[0].busid, "1-1");
        let mut l = l;
        assert!(l.remove("1-1"));
        assert!(!l.remove("1-1"));
        fs::write(&p, b"not json").unwrap();
        assert!(State::load(&p).is_err());
    }
}
