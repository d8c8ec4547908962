//! A minimal writer for the `newc` cpio format the kernel unpacks as an initramfs.
//!
//! Parent directories are emitted automatically (the kernel's unpacker does not create
//! them), entries are kept in insertion order, and later entries with the same path replace
//! earlier ones (so a test can override a file of the base image in the appended archive).

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};

#[derive(Debug, Clone)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    mode: u32,
    kind: Kind,
}

/// An in-memory newc archive under construction.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
    dirs: BTreeSet<String>,
    /// Directories that must never be emitted as directories (they are symlinks in the
    /// base image, e.g. `lib -> usr/lib`).
    skip_dirs: BTreeSet<String>,
}

fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Never emit a directory entry for `path` (it exists as a symlink elsewhere).
    pub fn assume_exists(&mut self, path: &str) {
        self.skip_dirs.insert(normalize(path));
    }

    fn ensure_parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            if !self.dirs.contains(&acc) && !self.skip_dirs.contains(&acc) {
                self.dirs.insert(acc.clone());
                self.push(Entry {
                    path: acc.clone(),
                    mode: 0o755,
                    kind: Kind::Dir,
                });
            }
        }
    }

    fn push(&mut self, e: Entry) {
        if let Some(&i) = self.index.get(&e.path) {
            self.entries[i] = e;
        } else {
            self.index.insert(e.path.clone(), self.entries.len());
            self.entries.push(e);
        }
    }

    pub fn dir(&mut self, path: &str, mode: u32) {
        let p = normalize(path);
        if p.is_empty() {
            return;
        }
        self.ensure_parents(&p);
        self.dirs.insert(p.clone());
        self.push(Entry {
            path: p,
            mode: mode & 0o7777,
            kind: Kind::Dir,
        });
    }

    pub fn file(&mut self, path: &str, contents: Vec<u8>, mode: u32) {
        let p = normalize(path);
        self.ensure_parents(&p);
        self.push(Entry {
            path: p,
            mode: mode & 0o7777,
            kind: Kind::File(contents),
        });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let p = normalize(path);
        self.ensure_parents(&p);
        self.push(Entry {
            path: p,
            mode: 0o777,
            kind: Kind::Symlink(target.to_string()),
        });
    }

    pub fn contains(&self, path: &str) -> bool {
        self.index.contains_key(&normalize(path))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Serialize (the result's length is a multiple of 4, so archives can be concatenated).
    pub fn write_to<W: Write>(&self, mut w: W) -> io::Result<()> {
        for (ino, e) in (1u32..).zip(self.entries.iter()) {
            let (mode, data): (u32, &[u8]) = match &e.kind {
                Kind::Dir => (0o040000 | e.mode, &[]),
                Kind::File(d) => (0o100000 | e.mode, d),
                Kind::Symlink(t) => (0o120000 | e.mode, t.as_bytes()),
            };
            let nlink = if matches!(e.kind, Kind::Dir) { 2 } else { 1 };
            write_entry(&mut w, ino, mode, nlink, &e.path, data)?;
        }
        write_entry(&mut w, 0, 0, 1, "TRAILER!!!", &[])?;
        w.flush()
    }
}

fn write_entry<W: Write>(
    w: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
) -> io::Result<()> {
    let namesize = name.len() + 1;
    let header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len(),
        0,
        0,
        0,
        0,
        namesize,
        0
    );
    debug_assert_eq!(header.len(), 110);
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let pad = (4 - (110 + namesize) % 4) % 4;
    w.write_all(&[0u8; 4][..pad])?;
    w.write_all(data)?;
    let pad = (4 - data.len() % 4) % 4;
    w.write_all(&[0u8; 4][..pad])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_has_parents() {
        let mut a = Archive::new();
        a.file("/a/b/c.txt", b"hello".to_vec(), 0o644);
        a.symlink("a/l", "b/c.txt");
        let mut out = Vec::new();
        a.write_to(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let s = String::from_utf8_lossy(&out);
        let pa = s.find("a\0").unwrap();
        let pb = s.find("a/b\0").unwrap();
        let pc = s.find("a/b/c.txt\0").unwrap();
        assert!(pa < pb && pb < pc);
        assert!(s.contains("TRAILER!!!"));
    }
}
