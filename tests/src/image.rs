//! Disk images and input events as the kernel tests check them: made and
//! judged on the host with e2fsprogs, read from the guest's hex dumps.

use std::path::Path;
use std::process::Command;

/// Runs a host command that must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty ext4 file system of `mib` MiB at `path`.
pub fn empty_ext4(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib * 1024 * 1024)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(path));
}

/// Panics with e2fsck's report unless the image's file system is clean.
pub fn e2fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .output()
        .expect("e2fsck");
    assert!(
        out.status.success(),
        "e2fsck reports the image damaged:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file's contents, read from an ext4 image without mounting it.
pub fn debugfs_cat(image: &Path, path: &str) -> Vec<u8> {
    Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs")
        .stdout
}

/// Input events from the guest's hex dump between `EV-BEGIN` and
/// `EV-END`: (type, code, value) of each 24-byte `struct input_event`
/// (x86-64).
pub fn input_events(output: &str) -> Vec<(u16, u16, i32)> {
    let start = output.find("EV-BEGIN").expect("EV-BEGIN marker");
    let end = output.find("EV-END").expect("EV-END marker");
    let bytes: Vec<u8> = output[start + 8..end]
        .split_whitespace()
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes
        .chunks_exact(24)
        .map(|e| {
            (
                u16::from_le_bytes([e[16], e[17]]),
                u16::from_le_bytes([e[18], e[19]]),
                i32::from_le_bytes([e[20], e[21], e[22], e[23]]),
            )
        })
        .collect()
}
