//! The kernel's USB test driver (`usbtest`, drivers/usb/misc/usbtest.c) from the
//! guest: a small static C runner ([`runner`], source `usbtest-run.c`) that issues
//! `USBTEST_REQUEST` through `USBDEVFS_IOCTL` like the kernel's tools/usb/testusb.c,
//! and the parsing of its one-line-per-test output ([`parse`], [`table`]).
//!
//! The runner is compiled on the host at test time (`gcc -static`, so the guest needs
//! no libraries) into `<target>/kernel-guest-bin/`, keyed by a hash of its source.
//! In the guest: `usbtest-run -b BUSID -l LABEL [-t 0-29] -c .. -s .. -v .. -g ..`;
//! it prints `USBTEST <label> <test> <result> <seconds>` per test.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::assets::{fnv1a, require_tool, target_dir};
use super::HarnessError;

/// The runner's C source.
pub const RUNNER_SOURCE: &str = include_str!("usbtest-run.c");

/// Where the tests put the runner in the guest ([`Guest::host_binary`](super::Guest::host_binary)).
pub const RUNNER_GUEST_PATH: &str = "/usr/bin/usbtest-run";

/// usbtest's tests are numbered 0..TEST_CASES.
pub const TEST_CASES: u8 = 30;

/// usbtest's isochronous tests: write, read, unaligned write, unaligned read.
pub const ISO_TESTS: [u8; 4] = [15, 16, 22, 23];

const CFLAGS: &[&str] = &["-static", "-O2", "-Wall", "-Wextra", "-Werror"];

/// The runner, built for the guest (cached by source hash). A missing compiler or
/// static libc is an environment error (a skip off CI, a failure on CI).
pub fn runner() -> Result<PathBuf, HarnessError> {
    let gcc = require_tool("gcc", "gcc")?;
    let key = fnv1a(format!("{}\n{}", CFLAGS.join(" "), RUNNER_SOURCE).as_bytes());
    let dir = target_dir().join("kernel-guest-bin");
    let bin = dir.join(format!("usbtest-run-{key:016x}"));
    if bin.is_file() {
        return Ok(bin);
    }
    let io = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |source| HarnessError::Io { context, source }
    };
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let src = dir.join(format!("usbtest-run-{key:016x}.c"));
    fs::write(&src, RUNNER_SOURCE).map_err(io("writing", &src))?;
    // Build under a private name and rename: concurrent test processes never
    // see a half-written binary.
    let tmp = dir.join(format!("usbtest-run-{key:016x}.tmp{}", std::process::id()));
    let out = Command::new(&gcc)
        .args(CFLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(io("running", &gcc))?;
    if !out.status.success() {
        let _ = fs::remove_file(&tmp);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // Without libc6-dev there is no libc.a (and no linux/usbdevice_fs.h).
        if stderr.contains("cannot find -lc") || stderr.contains("usbdevice_fs.h") {
            return Err(HarnessError::MissingPackage {
                package: "libc6-dev".into(),
                hint: format!("gcc -static needs it (see .ci/install-kernel-deps):\n{stderr}"),
            });
        }
        return Err(HarnessError::Command {
            command: format!(
                "{} {} -o {} {}",
                gcc.display(),
                CFLAGS.join(" "),
                tmp.display(),
                src.display()
            ),
            status: out.status.to_string(),
            stderr,
        });
    }
    fs::rename(&tmp, &bin).map_err(io("renaming into", &bin))?;
    Ok(bin)
}

/// What usbtest answered for one test.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed,
    /// EOPNOTSUPP: the test does not apply to this device (no such endpoint, ...).
    NotApplicable,
    /// The errno's name (e.g. `EPIPE`) and number.
    Failed {
        errno: String,
        code: i32,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Passed => f.write_str("ok"),
            Outcome::NotApplicable => f.write_str("n/a"),
            Outcome::Failed { errno, code } => write!(f, "{errno} ({code})"),
        }
    }
}

/// One line of the runner.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    pub outcome: Outcome,
    pub seconds: f64,
}

/// The runner's results for `label`, by test number. Lines of other labels and
/// other output are ignored; a malformed `USBTEST` line is an error.
pub fn parse(output: &str, label: &str) -> Result<BTreeMap<u8, TestResult>, String> {
    let mut results = BTreeMap::new();
    for line in output.lines() {
        let mut f = line.split_whitespace();
        if f.next() != Some("USBTEST") || f.next() != Some(label) {
            continue;
        }
        let bad = || format!("malformed runner line {line:?}");
        let test: u8 = f.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let outcome = match f.next().ok_or_else(bad)? {
            "ok" => Outcome::Passed,
            "n/a" => Outcome::NotApplicable,
            other => {
                let (errno, code) = other
                    .strip_suffix(')')
                    .and_then(|s| s.split_once('('))
                    .ok_or_else(bad)?;
                Outcome::Failed {
                    errno: errno.to_string(),
                    code: code.parse().map_err(|_| bad())?,
                }
            }
        };
        let seconds: f64 = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if test >= TEST_CASES || f.next().is_some() {
            return Err(bad());
        }
        if results
            .insert(test, TestResult { outcome, seconds })
            .is_some()
        {
            return Err(format!("test {test} of {label} reported twice"));
        }
    }
    Ok(results)
}

/// A table with one row per test and one column per labelled result set.
pub fn table(columns: &[(&str, &BTreeMap<u8, TestResult>)]) -> String {
    let mut s = format!("{:>4}", "test");
    for (label, _) in columns {
        s.push_str(&format!("  {label:<26}"));
    }
    s.push('\n');
    let tests: std::collections::BTreeSet<u8> = columns
        .iter()
        .flat_map(|(_, r)| r.keys().copied())
        .collect();
    for t in tests {
        s.push_str(&format!("{t:>4}"));
        for (_, results) in columns {
            let cell = match results.get(&t) {
                Some(r) if r.outcome == Outcome::NotApplicable => "n/a".to_string(),
                Some(r) => format!("{} {:.3} s", r.outcome, r.seconds),
                None => "-".to_string(),
            };
            s.push_str(&format!("  {cell:<26}"));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_runner_lines() {
        let out = "USBTEST-DEVICE direct 3-1 /dev/bus/usb/003/002 interface 0: -c 1\n\
                   USBTEST direct 0 ok 0.000012\n\
                   USBTEST vhci 0 ok 0.5\n\
                   USBTEST direct 14 EPIPE(32) 0.250000\n\
                   USBTEST direct 15 n/a 0.000001\n\
                   noise\n";
        let r = parse(out, "direct").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[&0].outcome, Outcome::Passed);
        assert_eq!(
            r[&14].outcome,
            Outcome::Failed {
                errno: "EPIPE".into(),
                code: 32
            }
        );
        assert_eq!(r[&15].outcome, Outcome::NotApplicable);
        assert_eq!(r[&14].seconds, 0.25);
        let t = table(&[("direct", &r)]);
        assert!(t.contains("EPIPE (32) 0.250 s"), "{t}");
        assert!(parse("USBTEST direct 31 ok 0.1\n", "direct").is_err());
        assert!(parse("USBTEST direct 1 EPIPE 0.1\n", "direct").is_err());
        assert!(parse(
            "USBTEST direct 1 ok 0.1\nUSBTEST direct 1 ok 0.1\n",
            "direct"
        )
        .is_err());
    }

    #[test]
    fn runner_builds_when_gcc_is_there() {
        match runner() {
            Ok(bin) => assert!(bin.is_file()),
            Err(e) => {
                assert!(super::super::or_skip(Err::<(), _>(e)).is_none());
            }
        }
    }
}
