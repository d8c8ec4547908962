//! Boot a real Debian Linux kernel in qemu (TCG, no KVM needed) to test usbwire against
//! the kernel's own USB/IP drivers (vhci-hcd, usbip-host) and Debian's C `usbip` tools.
//!
//! * Guest assets (an ELF `vmlinux` and a base initramfs with busybox, the USB/IP, gadget
//!   and class-driver modules, Debian's `usbip`/`usbipd`) are built from Debian packages
//!   on first use and cached under `target/kernel-guest/<key>/` (see [`assets`]).
//! * Each run appends a small second cpio with the test script, files and host binaries.
//! * The script's stdout/stderr come back on the second serial port (ttyS1,
//!   [`GuestOutput::output`]); the kernel log is the console on ttyS0
//!   ([`GuestOutput::console`]).
//! * Networking is qemu user mode with `restrict=on`; only explicit forwards exist:
//!   [`Guest::hostfwd`] (host 127.0.0.1:<port qemu binds, chosen by the OS and read back
//!   over QMP> -> guest port) and
//!   [`Guest::guestfwd`] (guest 10.0.2.100:<port> -> host 127.0.0.1:<port>, via `socat`).
//! * Emulated USB hardware: [`Guest::xhci`] adds a `qemu-xhci` controller with
//!   [`UsbDevice`]s (keyboard, serial, storage, UAS, audio, any `usb-*`) and their
//!   backends; [`RunningGuest::qmp`], [`RunningGuest::send_keys`] and
//!   [`RunningGuest::usb_stream`] drive them while the guest runs.
//!
//! ```no_run
//! use usbwire_tests::kernel;
//! let Some(guest) = kernel::require() else { return }; // skip (or fail on CI=true)
//! let out = guest.script("modprobe vhci-hcd && ls /sys/devices/platform").run().unwrap();
//! out.assert_success();
//! ```
//!
//! Environment variables: `CI=true` (missing prerequisites fail instead of skip),
//! `USBWIRE_SKIP_KERNEL_TESTS=1` (skip, even on CI), `USBWIRE_KERNEL_CACHE=<dir>`,
//! `USBWIRE_KERNEL_DEB=<linux-image .deb>` (offline), `USBWIRE_KERNEL_PACKAGE=<apt name>`,
//! `USBWIRE_QEMU=<qemu-system-x86_64 path>`, `USBWIRE_KEEP_GUEST_TMP=1` (keep run dirs).

pub mod assets;
pub mod cpio;
pub mod gadget;
pub mod hardware;
mod qmp;
pub mod usbtest;

pub use assets::{shared_libs, Assets, GUEST_MODULES};
pub use gadget::{
    gadget_acm_sh, gadget_hid_sh, gadget_mass_storage_sh, gadget_remove_sh, gadget_sourcesink_sh,
    ACM_IDS, DUMMY_UDC, HID_IDS, MASS_STORAGE_IDS, SOURCESINK_IDS,
};
pub use hardware::UsbDevice;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use assets::{add_elf_with_libs, guest_path, merged_usr};
use cpio::Archive;

/// The shell library sourced before every test script (`/usbwire/lib.sh` in the guest).
pub const GUEST_LIB_SH: &str = include_str!("lib.sh");

/// Printed by `/init` on ttyS1 (and /dev/kmsg) after the script: `USBWIRE-GUEST-EXIT <rc>`.
pub const EXIT_MARKER: &str = "USBWIRE-GUEST-EXIT ";
/// Printed by `/init` on ttyS1 just before the script starts (followed by guest uptime).
pub const START_MARKER: &str = "USBWIRE-GUEST-START ";

/// The guest-side address that [`Guest::guestfwd`] forwards to the host.
pub const GUESTFWD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// The guest's own address on the qemu user network.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Default hard limit for one guest run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("kernel harness unsupported here: {0}")]
    Unsupported(String),
    #[error("required tool `{tool}` not found: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("required Debian package `{package}` missing: {hint}")]
    MissingPackage { package: String, hint: String },
    #[error("cannot obtain the Debian kernel: {0}")]
    KernelUnavailable(String),
    #[error("kernel harness skipped by USBWIRE_SKIP_KERNEL_TESTS")]
    Skipped,
    #[error("command failed: {command}: {status}\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest asset error: {0}")]
    Asset(String),
    #[error("invalid guest configuration: {0}")]
    Config(String),
    #[error("qemu failed to start: {0}")]
    QemuStart(String),
    #[error("qemu monitor (QMP): {0}")]
    Qmp(String),
    #[error(
        "timed out after {after:?} waiting for {what}\n{}",
        dump(output, console, qemu_stderr)
    )]
    Timeout {
        what: String,
        after: Duration,
        output: String,
        console: String,
        qemu_stderr: String,
    },
    #[error(
        "guest stopped ({status}) while waiting for {what}\n{}",
        dump(output, console, qemu_stderr)
    )]
    GuestExited {
        what: String,
        status: String,
        output: String,
        console: String,
        qemu_stderr: String,
    },
}

impl HarnessError {
    /// True when the error means "this machine cannot run kernel tests" (missing qemu,
    /// packages, kernel download) rather than a harness or test bug.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            HarnessError::Unsupported(_)
                | HarnessError::MissingTool { .. }
                | HarnessError::MissingPackage { .. }
                | HarnessError::KernelUnavailable(_)
                | HarnessError::Skipped
        )
    }
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= n {
        return s.to_string();
    }
    format!(
        "[... {} earlier lines omitted ...]\n{}",
        lines.len() - n,
        lines[lines.len() - n..].join("\n")
    )
}

fn dump(output: &str, console: &str, qemu_stderr: &str) -> String {
    let mut s = format!(
        "===== guest script output (ttyS1) =====\n{}\n===== guest console / kernel log (ttyS0) =====\n{}\n",
        tail_lines(output, 400),
        tail_lines(console, 300)
    );
    if !qemu_stderr.trim().is_empty() {
        s.push_str(&format!(
            "===== qemu stderr =====\n{}\n",
            tail_lines(qemu_stderr, 50)
        ));
    }
    s.push_str("===== end =====");
    s
}

/// True when `CI=true` (or `CI=1`): missing prerequisites are failures, not skips.
pub fn on_ci() -> bool {
    matches!(
        std::env::var("CI")
            .ok()
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("true") | Some("1") | Some("yes")
    )
}

/// A [`Guest`] if this machine can run kernel tests. Otherwise prints why and returns
/// `None` (the test should return early = skip), or panics when `CI=true`.
/// Harness bugs (anything but a missing prerequisite) always panic.
pub fn require() -> Option<Guest> {
    or_skip(Guest::new())
}

/// `Some` on success. A missing prerequisite prints why and gives `None` (the test
/// should return early = skip), or panics when `CI=true`; any other error panics.
pub fn or_skip<T>(result: Result<T, HarnessError>) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(HarnessError::Skipped) => {
            eprintln!("SKIPPED kernel test: USBWIRE_SKIP_KERNEL_TESTS is set");
            None
        }
        Err(e) if e.is_environment() && !on_ci() => {
            eprintln!("SKIPPED kernel test: {e} (set CI=true to make this a failure)");
            None
        }
        Err(e) if e.is_environment() => panic!(
            "kernel test prerequisites missing on CI (CI=true): {e}\n\
             run .ci/install-kernel-deps as root, or set USBWIRE_SKIP_KERNEL_TESTS=1"
        ),
        Err(e) => panic!("kernel harness failed: {e}"),
    }
}

/// Assets are prepared once per process (and once per machine, via the cache + lock).
fn shared_assets() -> Result<Arc<Assets>, HarnessError> {
    static ASSETS: OnceLock<Mutex<Option<Arc<Assets>>>> = OnceLock::new();
    let m = ASSETS.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = g.as_ref() {
        return Ok(a.clone());
    }
    let a = Arc::new(assets::ensure()?);
    eprintln!(
        "usbwire kernel harness: assets {} ({}, {:.2}s) in {}",
        a.key,
        if a.built { "built" } else { "cached" },
        a.prepare_time.as_secs_f64(),
        a.dir.display()
    );
    *g = Some(a.clone());
    Ok(a)
}

/// A stripped copy of one of our binaries ([`cargo_bin`]), for the guest:
/// debug builds are tens of MiB each, too much for its initramfs. Falls
/// back to the unstripped binary when `strip` is not available.
pub fn stripped_bin(name: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let src = cargo_bin(name);
    let dst = src.with_file_name(format!("{name}.guest-stripped"));
    // Strip to a private name, then rename over the shared one: tests in
    // parallel threads never read a half-written file.
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = src.with_file_name(format!("{name}.guest-stripped.{}.{n}", std::process::id()));
    match Command::new("strip").arg("-o").arg(&tmp).arg(&src).output() {
        Ok(o) if o.status.success() && fs::rename(&tmp, &dst).is_ok() => dst,
        _ => {
            let _ = fs::remove_file(&tmp);
            src
        }
    }
}

/// Debian's C `usbip` tool on the host (package `usbip`), if installed.
pub fn host_usbip() -> Option<PathBuf> {
    ["/usr/sbin/usbip", "/usr/bin/usbip", "/sbin/usbip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Path of a binary of this workspace, built with `cargo build --workspace --bin <name>` (same
/// profile as the running test) the first time it is asked for in this process.
/// Panics with cargo's output when the build fails or the binary does not appear.
pub fn cargo_bin(name: &str) -> PathBuf {
    cargo_bin_in(None, name)
}

/// Like [`cargo_bin`] but builds `--package <package> --bin <name>`.
pub fn cargo_bin_in(package: Option<&str>, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let exe = std::env::current_exe().ok();
    // target/<profile>/deps/<test-exe> -> target/<profile>
    let profile_dir = exe
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| assets::target_dir().join("debug"));
    let profile = profile_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "debug".into());
    let path = profile_dir.join(name);
    let built = BUILT.get_or_init(|| Mutex::new(HashSet::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if built.contains(name) {
        return path;
    }
    // The test script builds every binary before the tests start; building
    // again from each test process would relink them (cargo test links
    // them with the dev-dependencies' features, cargo build without), a
    // few seconds each time, while other tests run them.
    if std::env::var_os("USBWIRE_BINS_PREBUILT").is_some_and(|v| v == "1") && path.is_file() {
        built.insert(name.to_string());
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // --workspace: the features the whole workspace unifies, as the test
    // binaries and CI's `cargo build --workspace --bins` were built with;
    // one binary's own feature set would rebuild crates (tens of seconds)
    // and flip the build back and forth between the two.
    cmd.current_dir(assets::workspace_root())
        .args(["build", "--workspace"]);
    if let Some(p) = package {
        cmd.args(["--package", p]);
    }
    cmd.args(["--bin", name]);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(td) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", td);
    }
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) if path.is_file() => eprintln!(
            "warning: `cargo build --bin {name}` failed, using existing {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(o) => panic!(
            "`cargo build --bin {name}` failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if path.is_file() => {
            eprintln!("warning: cannot run cargo ({e}); using {}", path.display())
        }
        Err(e) => panic!("cannot run cargo to build {name}: {e}"),
    }
    assert!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    built.insert(name.to_string());
    path
}

/// Limits how many guests run at once in this process (TCG is CPU bound: more guests
/// than cores makes every one slower and timeouts flaky). `USBWIRE_MAX_GUESTS`
/// overrides the default (the number of CPUs). Waiting for a slot is bounded: after
/// 10 minutes the guest starts anyway.
struct Slots {
    used: Mutex<usize>,
    cv: std::sync::Condvar,
    max: usize,
}

fn slots() -> &'static Slots {
    static SLOTS: OnceLock<Slots> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let max = std::env::var("USBWIRE_MAX_GUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        Slots {
            used: Mutex::new(0),
            cv: std::sync::Condvar::new(),
            max,
        }
    })
}

struct SlotGuard;

impl SlotGuard {
    fn acquire() -> SlotGuard {
        let s = slots();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut used = s.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= s.max && Instant::now() < deadline {
            used =
                s.cv.wait_timeout(used, Duration::from_millis(500))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
        }
        *used += 1;
        SlotGuard
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let s = slots();
        let mut used = s.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(1);
        s.cv.notify_one();
    }
}

#[derive(Debug, Clone)]
struct GuestFwd {
    guest_port: u16,
    host_port: u16,
}

/// Builder for one guest boot. Cheap to create once the assets are cached.
#[derive(Debug, Clone)]
pub struct Guest {
    assets: Arc<Assets>,
    script: String,
    files: Vec<(String, Vec<u8>, u32)>,
    host_binaries: Vec<(PathBuf, String)>,
    env: BTreeMap<String, String>,
    hostfwds: Vec<u16>,
    guestfwds: Vec<GuestFwd>,
    timeout: Duration,
    memory_mib: u32,
    cpus: u32,
    loglevel: u8,
    autoload: bool,
    append: Vec<String>,
    usb: Option<Vec<UsbDevice>>,
}

impl Guest {
    /// Checks the host tools and ensures the guest assets exist (building them on first
    /// use, which downloads the Debian kernel package: ~1 min cold, ~0 s warm).
    pub fn new() -> Result<Guest, HarnessError> {
        if std::env::var_os("USBWIRE_SKIP_KERNEL_TESTS").is_some_and(|v| !v.is_empty() && v != "0")
        {
            return Err(HarnessError::Skipped);
        }
        let assets = shared_assets()?;
        Ok(Guest {
            assets,
            script: String::new(),
            files: Vec::new(),
            host_binaries: Vec::new(),
            env: BTreeMap::new(),
            hostfwds: Vec::new(),
            guestfwds: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            memory_mib: 1024,
            cpus: 1,
            loglevel: 7,
            autoload: true,
            append: Vec::new(),
            usb: None,
        })
    }

    /// The cached assets this guest boots.
    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    /// The test script, run by busybox `/bin/sh` in the guest (cwd `/root`, after
    /// `/usbwire/lib.sh` is sourced). Its exit code is the guest's exit code.
    pub fn script(mut self, sh: &str) -> Self {
        self.script = sh.to_string();
        self
    }

    /// Put a file into the guest (parent directories are created).
    pub fn file(mut self, guest_path: &str, contents: &[u8], mode: u32) -> Self {
        self.files
            .push((guest_path.to_string(), contents.to_vec(), mode));
        self
    }

    /// Copy a host ELF executable to `guest_path`, with the shared libraries `ldd`
    /// reports (and the ELF interpreter).
    pub fn host_binary(mut self, host_path: &Path, guest_path: &str) -> Self {
        self.host_binaries
            .push((host_path.to_path_buf(), guest_path.to_string()));
        self
    }

    /// An environment variable exported to the script.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Forward a host port on 127.0.0.1 to `guest_port` (TCP); read the host port
    /// with [`RunningGuest::host_port`]. qemu binds port 0 (the OS picks a free one) and
    /// the harness reads the port it got from qemu's monitor, so no port is guessed.
    pub fn hostfwd(mut self, guest_port: u16) -> Self {
        if !self.hostfwds.contains(&guest_port) {
            self.hostfwds.push(guest_port);
        }
        self
    }

    /// Guest connections to 10.0.2.100:3240 reach host 127.0.0.1:`host_port`.
    pub fn guestfwd(self, host_port: u16) -> Self {
        self.guestfwd_port(3240, host_port)
    }

    /// Guest connections to 10.0.2.100:`guest_port` reach host 127.0.0.1:`host_port`
    /// (one `socat` relay per connection, so any number of connections work).
    pub fn guestfwd_port(mut self, guest_port: u16, host_port: u16) -> Self {
        self.guestfwds.push(GuestFwd {
            guest_port,
            host_port,
        });
        self
    }

    /// Hard limit for the whole boot + script; qemu is killed when exceeded.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Guest RAM (default 1024 MiB). The initramfs, with our debug
    /// binaries (tens of MiB each since etcd-client), unpacks into a root
    /// file system limited to half of it.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Guest vCPUs (default 1; TCG is multi-threaded, so 2 uses 2 host cores).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n.max(1);
        self
    }

    /// Console log level set before the script runs (default 7: info, which includes
    /// USB enumeration and usbip messages; 8 adds debug).
    pub fn console_loglevel(mut self, level: u8) -> Self {
        self.loglevel = level.min(8);
        self
    }

    /// Load drivers for hotplugged devices by their modalias, like udev (default on).
    /// Off: class drivers (usb-storage, usbhid, cdc-acm, usbtest, ...) bind only after an
    /// explicit `modprobe`.
    pub fn module_autoload(mut self, on: bool) -> Self {
        self.autoload = on;
        self
    }

    /// Extra kernel command line parameters (e.g. `usbip_core.usbip_debug_flag=0xffffffff`).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.append.push(arg.to_string());
        self
    }

    /// Give the guest a `qemu-xhci` controller with `devices` on it (see
    /// [`UsbDevice`]; called again, the devices are added; at most
    /// [`hardware::MAX_DEVICES`], each on its own root port). The guest loads
    /// `xhci_pci`, and `/init` starts the script only once every device is
    /// configured (waiting at most 60 s) and (with [`Guest::module_autoload`],
    /// the default) every interface some module is for has its driver bound
    /// (at most 30 s more); the script sees what is missing. Guests without
    /// this have no xHCI controller.
    pub fn xhci(mut self, devices: impl IntoIterator<Item = UsbDevice>) -> Self {
        self.usb.get_or_insert_with(Vec::new).extend(devices);
        self
    }

    /// Boot, wait for the script to finish (or the timeout), return its output.
    /// A timeout is an `Err` (with the output and console in its message); a guest that
    /// stops without reporting an exit code is `Ok` with `exit_code: None`.
    pub fn run(self) -> Result<GuestOutput, HarnessError> {
        self.spawn()?.wait()
    }

    fn build_extra(&self) -> Result<Vec<u8>, HarnessError> {
        let mut a = Archive::new();
        merged_usr(&mut a);
        for d in [
            "usr",
            "usr/lib",
            "usr/bin",
            "usr/sbin",
            "usr/lib64",
            "etc",
            "usbwire",
        ] {
            a.assume_exists(d);
        }
        let mut run = String::from("# generated by usbwire_tests::kernel\n. /usbwire/lib.sh\n");
        for (k, v) in &self.env {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(HarnessError::Config(format!("bad environment name {k:?}")));
            }
            run.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
        run.push_str(". /usbwire/test.sh\n");
        a.file("usbwire/lib.sh", GUEST_LIB_SH.as_bytes().to_vec(), 0o644);
        a.file("usbwire/run.sh", run.into_bytes(), 0o755);
        a.file("usbwire/test.sh", self.script.as_bytes().to_vec(), 0o755);
        for (host, guest) in &self.host_binaries {
            if !guest.starts_with('/') {
                return Err(HarnessError::Config(format!(
                    "guest path {guest:?} must be absolute"
                )));
            }
            add_elf_with_libs(&mut a, host, guest)?;
        }
        for (path, data, mode) in &self.files {
            if !path.starts_with('/') {
                return Err(HarnessError::Config(format!(
                    "guest path {path:?} must be absolute"
                )));
            }
            a.file(&guest_path(path), data.clone(), *mode);
        }
        let mut buf = Vec::new();
        a.write_to(&mut buf).map_err(|e| HarnessError::Io {
            context: "writing the per-run cpio".into(),
            source: e,
        })?;
        Ok(buf)
    }

    /// Boot in the background. The returned guest is killed when dropped.
    ///
    /// qemu gets `PR_SET_PDEATHSIG`: it dies when the *thread* that called `spawn`
    /// exits, so keep the [`RunningGuest`] on that thread (the normal test layout).
    pub fn spawn(self) -> Result<RunningGuest, HarnessError> {
        let slot = SlotGuard::acquire();
        let qemu = match std::env::var_os("USBWIRE_QEMU") {
            Some(q) => PathBuf::from(q),
            None => assets::require_tool("qemu-system-x86_64", "qemu-system-x86")?,
        };
        let socat = if self.guestfwds.is_empty() {
            None
        } else {
            Some(assets::require_tool("socat", "socat")?)
        };
        let tmp = tempfile::Builder::new()
            .prefix("usbwire-guest-")
            .tempdir()
            .map_err(|e| HarnessError::Io {
                context: "creating temp dir".into(),
                source: e,
            })?;
        let dir = tmp.path().to_path_buf();
        if dir.to_string_lossy().contains(',') {
            return Err(HarnessError::Config(format!(
                "temp dir {} contains a comma (qemu option syntax)",
                dir.display()
            )));
        }
        let io = |ctx: &str| {
            let ctx = ctx.to_string();
            move |e| HarnessError::Io {
                context: ctx,
                source: e,
            }
        };
        // initrd = cached base archive + per-run archive
        let initrd = dir.join("initrd.cpio");
        {
            let mut f = fs::File::create(&initrd).map_err(io("creating initrd"))?;
            let mut base =
                fs::File::open(&self.assets.initramfs).map_err(io("opening base initramfs"))?;
            std::io::copy(&mut base, &mut f).map_err(io("copying base initramfs"))?;
            f.write_all(&self.build_extra()?)
                .map_err(io("writing per-run initramfs"))?;
        }
        let console_path = dir.join("console.log");
        let output_path = dir.join("output.log");
        let stderr_path = dir.join("qemu-stderr.log");

        let mut netdev = String::from("user,id=n0,restrict=on,net=10.0.2.0/24");
        for gp in &self.hostfwds {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:0-:{gp}"));
        }
        // qemu's monitor (QMP) on one end of a socket pair: it tells which ports the
        // forwards got, and takes a test's commands to USB devices. Connected before
        // qemu starts, so there is nothing to wait for but qemu's answer (or its
        // exit, which ends the stream).
        let qmp = if self.hostfwds.is_empty() && self.usb.is_none() {
            None
        } else {
            Some(UnixStream::pair().map_err(io("creating the QMP socket pair"))?)
        };
        if let Some(socat) = &socat {
            for f in &self.guestfwds {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{GUESTFWD_ADDR}:{}-cmd:{} - TCP:127.0.0.1:{}",
                    f.guest_port,
                    socat.display(),
                    f.host_port
                ));
            }
        }
        let mut append = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "loglevel=4".into(),
            "panic=-1".into(),
            "oops=panic".into(),
            "i8042.noaux=1".into(),
            "i8042.nomux=1".into(),
            "i8042.nopnp=1".into(),
            "8250.nr_uarts=2".into(),
            "tsc=unstable".into(),
            // The boot-time check that the IO-APIC delivers timer interrupts
            // counts ticks over a short busy-wait; on a loaded host a TCG vCPU
            // misses that window and the kernel panics with "IO-APIC + timer
            // doesn't work" (seen with load ~12 on 2 CPUs). The emulated
            // timer is known good, so skip the check.
            "no_timer_check".into(),
            "random.trust_cpu=on".into(),
            format!("USBWIRE_LOGLEVEL={}", self.loglevel),
            format!("USBWIRE_AUTOLOAD={}", u8::from(self.autoload)),
        ];
        let usb = match &self.usb {
            Some(devices) => {
                append.push(format!("USBWIRE_XHCI={}", devices.len()));
                Some(hardware::qemu_args(devices)?)
            }
            None => None,
        };
        append.extend(self.append.iter().cloned());

        let mut cmd = Command::new(&qemu);
        cmd.arg("-accel")
            .arg("tcg")
            .args(["-machine", "pc", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot"])
            .args(["-m", &format!("{}M", self.memory_mib)])
            .args(["-smp", &self.cpus.to_string()])
            .arg("-kernel")
            .arg(&self.assets.vmlinux)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append.join(" ")])
            .arg("-chardev")
            .arg(format!("file,id=con0,path={}", console_path.display()))
            .args(["-serial", "chardev:con0"])
            .arg("-chardev")
            .arg(format!("file,id=out0,path={}", output_path.display()))
            .args(["-serial", "chardev:out0"])
            .args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        if let Some(usb) = &usb {
            cmd.args(&usb.args);
        }
        let qemu_qmp_fd = qmp.as_ref().map(|(_, theirs)| theirs.as_raw_fd());
        // qemu's ends of the USB devices' byte streams, kept open across exec as
        // the QMP end is.
        let qemu_usb_fds: Vec<i32> = usb
            .as_ref()
            .map(|u| u.qemu_ends.iter().map(|s| s.as_raw_fd()).collect())
            .unwrap_or_default();
        if let Some(fd) = qemu_qmp_fd {
            cmd.arg("-chardev")
                .arg(format!("socket,id=qmp0,fd={fd}"))
                .args(["-mon", "chardev=qmp0,mode=control"]);
        }
        cmd.current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).map_err(io("creating qemu stderr log"))?)
            .process_group(0);
        // SAFETY: prctl and fcntl are async-signal-safe; no allocation in the closure.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // qemu's end of the QMP pair keeps its number and loses only
                // close-on-exec, in this child alone: no other child inherits it.
                for fd in qemu_qmp_fd.iter().chain(&qemu_usb_fds) {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| HarnessError::QemuStart(format!("{}: {e}", qemu.display())))?;
        let mut guest = RunningGuest {
            child: Mutex::new(Some(child)),
            tmp: Some(tmp),
            ports: BTreeMap::new(),
            started,
            deadline: started + self.timeout,
            timeout: self.timeout,
            console_path,
            output_path,
            stderr_path,
            boot_seen: Mutex::new(None),
            qmp: None,
            usb_streams: BTreeMap::new(),
            _slot: slot,
        };
        if let Some(usb) = usb {
            drop(usb.qemu_ends);
            guest.usb_streams = usb.streams.into_iter().collect();
        }
        if let Some((ours, theirs)) = qmp {
            drop(theirs);
            let mut monitor = match qmp::Qmp::connect(ours) {
                Ok(m) => m,
                Err(e) => {
                    guest.kill_now();
                    return Err(HarnessError::QemuStart(format!(
                        "connecting to qemu's monitor: {e}\n{}",
                        read_lossy(&guest.stderr_path)
                    )));
                }
            };
            let ports = match monitor.host_forwards() {
                Ok(got) => got,
                Err(e) => {
                    guest.kill_now();
                    return Err(HarnessError::QemuStart(format!(
                        "reading the host ports of the forwards from qemu's monitor: {e}\n{}",
                        read_lossy(&guest.stderr_path)
                    )));
                }
            };
            for gp in &self.hostfwds {
                if !ports.contains_key(gp) {
                    guest.kill_now();
                    return Err(HarnessError::QemuStart(format!(
                        "qemu reports no host forward to guest port {gp}: {ports:?}"
                    )));
                }
            }
            guest.ports = ports;
            guest.qmp = Some(Mutex::new(monitor));
        }
        Ok(guest)
    }
}

/// Result of a guest run.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The script's exit status as reported by `/init`; `None` if the guest stopped
    /// without reporting one (kernel panic, poweroff from the script, ...).
    pub exit_code: Option<i32>,
    /// The script's stdout+stderr (ttyS1), without the harness' marker lines.
    pub output: String,
    /// The serial console (ttyS0): kernel messages (level <= the console loglevel) and
    /// `/init` messages.
    pub console: String,
    /// qemu's own stderr.
    pub qemu_stderr: String,
    /// Wall time from starting qemu to qemu's exit.
    pub duration: Duration,
    /// Wall time from starting qemu until the script started (as observed by polling).
    pub boot_time: Option<Duration>,
    /// Guest uptime (seconds) when the script started.
    pub guest_uptime_at_start: Option<f64>,
}

impl GuestOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Panic unless the script exited 0; the message holds the script output and the
    /// console (kernel log).
    #[track_caller]
    pub fn assert_success(&self) {
        if !self.success() {
            panic!(
                "guest script failed: exit code {:?} after {:.1}s\n{}",
                self.exit_code,
                self.duration.as_secs_f64(),
                dump(&self.output, &self.console, &self.qemu_stderr)
            );
        }
    }

    /// Panic (with the full dump) unless `output` contains `needle`.
    #[track_caller]
    pub fn assert_output_contains(&self, needle: &str) {
        if !self.output.contains(needle) {
            panic!(
                "guest output lacks {needle:?}\n{}",
                dump(&self.output, &self.console, &self.qemu_stderr)
            );
        }
    }
}

/// A booted guest. Killed (with its process group: qemu and its socat relays) on drop.
pub struct RunningGuest {
    child: Mutex<Option<Child>>,
    tmp: Option<tempfile::TempDir>,
    ports: BTreeMap<u16, u16>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    console_path: PathBuf,
    output_path: PathBuf,
    stderr_path: PathBuf,
    boot_seen: Mutex<Option<Duration>>,
    qmp: Option<Mutex<qmp::Qmp>>,
    usb_streams: BTreeMap<String, UnixStream>,
    _slot: SlotGuard,
}

fn read_lossy(p: &Path) -> String {
    let mut v = Vec::new();
    match fs::File::open(p) {
        Ok(mut f) => {
            if let Err(e) = f.read_to_end(&mut v) {
                return format!("<error reading {}: {e}>", p.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return format!("<cannot open {}: {e}>", p.display()),
    }
    String::from_utf8_lossy(&v).replace('\r', "")
}

impl RunningGuest {
    /// The host port (on 127.0.0.1) forwarded to `guest_port`. Panics if
    /// [`Guest::hostfwd`] was not called for that port.
    pub fn host_port(&self, guest_port: u16) -> u16 {
        *self
            .ports
            .get(&guest_port)
            .unwrap_or_else(|| panic!("no hostfwd for guest port {guest_port}"))
    }

    /// The run directory (console.log, output.log, initrd); removed on drop unless
    /// `USBWIRE_KEEP_GUEST_TMP=1`.
    pub fn run_dir(&self) -> &Path {
        self.tmp
            .as_ref()
            .map(|t| t.path())
            .unwrap_or(Path::new("/"))
    }

    /// qemu's process id (`None` once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        let c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        c.as_ref().map(|c| c.id())
    }

    /// Script output so far (raw, including marker lines).
    pub fn output(&self) -> String {
        read_lossy(&self.output_path)
    }

    /// Console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console_path)
    }

    fn note_boot(&self, out: &str) {
        if out.contains(START_MARKER) {
            let mut b = self.boot_seen.lock().unwrap_or_else(|p| p.into_inner());
            if b.is_none() {
                *b = Some(self.started.elapsed());
            }
        }
    }

    /// `Some(status)` once qemu has exited.
    fn try_exit(&self) -> Option<String> {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match c.as_mut() {
            None => Some("killed".into()),
            Some(ch) => match ch.try_wait() {
                Ok(Some(st)) => Some(st.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("wait error: {e}")),
            },
        }
    }

    /// Wait until the script output (ttyS1) contains `needle`. Fails when the guest
    /// stops or `timeout` (or the guest's own hard timeout) passes; the error holds the
    /// output and console.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<(), HarnessError> {
        let t0 = Instant::now();
        let limit = (t0 + timeout).min(self.deadline);
        loop {
            let out = self.output();
            self.note_boot(&out);
            if out.contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_exit() {
                // final read: output may have landed just before exit
                let out = self.output();
                if out.contains(needle) {
                    return Ok(());
                }
                return Err(HarnessError::GuestExited {
                    what: format!("{needle:?} in the guest output"),
                    status,
                    output: out,
                    console: self.console(),
                    qemu_stderr: read_lossy(&self.stderr_path),
                });
            }
            if Instant::now() >= limit {
                return Err(HarnessError::Timeout {
                    what: format!("{needle:?} in the guest output"),
                    after: t0.elapsed(),
                    output: out,
                    console: self.console(),
                    qemu_stderr: read_lossy(&self.stderr_path),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Connect to the guest's `guest_port` (which needs a [`Guest::hostfwd`]) and send
    /// `message`; pairs with `usbwire_wait_signal PORT` in the guest, which answers
    /// `ACK`. Retries (bounded by `timeout`) until the guest listens.
    pub fn signal(
        &self,
        guest_port: u16,
        message: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let port = self.host_port(guest_port);
        let t0 = Instant::now();
        let mut last_err = String::new();
        let mut attempts = 0u32;
        while t0.elapsed() < timeout && attempts < 1000 {
            attempts += 1;
            if let Some(status) = self.try_exit() {
                return Err(HarnessError::GuestExited {
                    what: format!("signal on guest port {guest_port}"),
                    status,
                    output: self.output(),
                    console: self.console(),
                    qemu_stderr: read_lossy(&self.stderr_path),
                });
            }
            match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = s.write_all(format!("{message}\n").as_bytes());
                    let mut buf = [0u8; 16];
                    match s.read(&mut buf) {
                        Ok(n) if n > 0 && buf[..n].starts_with(b"ACK") => return Ok(()),
                        Ok(n) => last_err = format!("read {n} bytes without ACK"),
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(HarnessError::Timeout {
            what: format!("the guest to accept a signal on port {guest_port} (last: {last_err})"),
            after: t0.elapsed(),
            output: self.output(),
            console: self.console(),
            qemu_stderr: read_lossy(&self.stderr_path),
        })
    }

    fn kill_now(&self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut ch) = c.take() {
            if ch.try_wait().ok().flatten().is_none() {
                // SAFETY: the child leads its own process group (process_group(0)).
                unsafe {
                    libc::killpg(ch.id() as libc::pid_t, libc::SIGKILL);
                }
                let _ = ch.kill();
            }
            let _ = ch.wait();
            // socat relays may outlive qemu briefly; the group kill above covers them
            // SAFETY: as above; ESRCH when the group is gone is fine.
            unsafe {
                libc::killpg(ch.id() as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Wait for the script to finish and qemu to exit (bounded by the guest timeout).
    pub fn wait(self) -> Result<GuestOutput, HarnessError> {
        let mut marker_at: Option<Instant> = None;
        let status = loop {
            let out = self.output();
            self.note_boot(&out);
            if let Some(st) = self.try_exit() {
                break st;
            }
            if out.contains(EXIT_MARKER) || self.console().contains(EXIT_MARKER) {
                let at = *marker_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(10) {
                    self.kill_now();
                    break "killed after the exit marker (poweroff hung)".to_string();
                }
            }
            if Instant::now() >= self.deadline {
                self.kill_now();
                return Err(HarnessError::Timeout {
                    what: "the guest script to finish (hard timeout; qemu killed)".into(),
                    after: self.timeout,
                    output: self.output(),
                    console: self.console(),
                    qemu_stderr: read_lossy(&self.stderr_path),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        };
        self.kill_now(); // reap + group cleanup
        let duration = self.started.elapsed();
        let raw = self.output();
        let console = self.console();
        let qemu_stderr = read_lossy(&self.stderr_path);
        let parse_exit = |s: &str| {
            s.lines()
                .filter_map(|l| l.trim().rsplit_once(EXIT_MARKER.trim_end()))
                .filter_map(|(_, rc)| rc.trim().parse::<i32>().ok())
                .next_back()
        };
        let exit_code = parse_exit(&raw).or_else(|| parse_exit(&console));
        let guest_uptime_at_start = raw
            .lines()
            .find_map(|l| l.strip_prefix(START_MARKER))
            .and_then(|u| u.trim().parse::<f64>().ok());
        let output: String = raw
            .lines()
            .filter(|l| !l.starts_with(START_MARKER) && !l.starts_with(EXIT_MARKER))
            .map(|l| format!("{l}\n"))
            .collect();
        if exit_code.is_none() && console.trim().is_empty() && raw.trim().is_empty() {
            return Err(HarnessError::QemuStart(format!(
                "qemu exited ({status}) without any output\n{qemu_stderr}"
            )));
        }
        let boot_time = *self.boot_seen.lock().unwrap_or_else(|p| p.into_inner());
        Ok(GuestOutput {
            exit_code,
            output,
            console,
            qemu_stderr,
            duration,
            boot_time,
            guest_uptime_at_start,
        })
    }

    /// Runs a QMP command (e.g. `"send-key"`, `"input-send-event"`, `"query-status"`)
    /// with `arguments` (`Value::Null`: none) and returns its `return` value. Needs a
    /// guest with [`Guest::xhci`] or a [`Guest::hostfwd`] (the others have no monitor).
    pub fn qmp(
        &self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, HarnessError> {
        let Some(qmp) = &self.qmp else {
            return Err(HarnessError::Config(
                "this guest has no QMP monitor (ask for Guest::xhci or Guest::hostfwd)".into(),
            ));
        };
        let mut qmp = qmp.lock().unwrap_or_else(|p| p.into_inner());
        qmp.execute(command, arguments)
            .map_err(|e| HarnessError::Qmp(format!("{e}\n{}", read_lossy(&self.stderr_path))))
    }

    /// Types `keys` one after the other (QMP `send-key`, one call per key: press,
    /// hold for qemu's default 100 ms of virtual time, release). Each is a QKeyCode
    /// name (`"a"`, `"1"`, `"ret"`, `"shift"`, ...; see qemu's qapi/ui.json). A key
    /// is a HID report queued in the emulated keyboard (qemu's queue holds 16
    /// events, so type at most 8 keys before the guest has read them).
    pub fn send_keys(&self, keys: &[&str]) -> Result<(), HarnessError> {
        for key in keys {
            self.qmp(
                "send-key",
                serde_json::json!({ "keys": [{ "type": "qcode", "data": key }] }),
            )?;
        }
        Ok(())
    }

    /// QMP `input-send-event` with `events` (a JSON array of InputEvent, e.g.
    /// `[{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"a"}}}]`),
    /// delivered at once and in order. It bypasses the queue that holds
    /// [`RunningGuest::send_keys`]' delayed releases: after `send_keys`, wait
    /// until the guest has seen its last key before sending events this way.
    pub fn input_send_event(&self, events: serde_json::Value) -> Result<(), HarnessError> {
        self.qmp("input-send-event", serde_json::json!({ "events": events }))
            .map(drop)
    }

    /// The host end of the byte stream of the [`UsbDevice::serial`] with qdev id
    /// `id` (`usb<index>` by default): what is written to it arrives at the
    /// emulated device, what the guest sends can be read from it. A clone; all
    /// clones share one stream.
    pub fn usb_stream(&self, id: &str) -> Result<UnixStream, HarnessError> {
        let s = self.usb_streams.get(id).ok_or_else(|| {
            HarnessError::Config(format!(
                "no USB device {id:?} with a byte stream (have {:?})",
                self.usb_streams.keys().collect::<Vec<_>>()
            ))
        })?;
        s.try_clone().map_err(|e| HarnessError::Io {
            context: format!("cloning the stream of USB device {id}"),
            source: e,
        })
    }

    /// Kill qemu now (also done on drop).
    pub fn kill(self) {
        self.kill_now();
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        self.kill_now();
        if let Some(t) = self.tmp.take() {
            if std::env::var_os("USBWIRE_KEEP_GUEST_TMP").is_some_and(|v| v != "0") {
                let p = t.keep();
                eprintln!("usbwire kernel harness: kept run dir {}", p.display());
            }
        }
    }
}
