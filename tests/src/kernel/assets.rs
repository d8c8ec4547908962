//! Guest assets (kernel + base initramfs), built from Debian packages and cached.
//!
//! Layout of the cache (`<target>/kernel-guest/`, or `$USBWIRE_KERNEL_CACHE`):
//!
//! ```text
//! <key>.lock            flock(2) held while building <key>
//! <key>/vmlinux         uncompressed ELF kernel (PVH-bootable)
//! <key>/initramfs.cpio  uncompressed newc archive: busybox, modules, usbip, /init
//! <key>/config          the kernel's .config
//! <key>/KEY             the human readable key (package versions, harness hash)
//! <key>/MODULES         the module files that were included
//! <key>/READY           written last; the directory is complete
//! ```
//!
//! `<key>` is `<kernel package>-<16 hex digits of a hash>` over the kernel package
//! version, the versions of the host packages copied into the guest and a hash of the
//! harness' own build recipe, so any change rebuilds a fresh directory. After a
//! build, complete directories of other keys are deleted but for the newest two.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::cpio::Archive;
use super::HarnessError;

/// Bump to invalidate every cache directory (also done implicitly by the recipe hash).
const FORMAT: &str = "usbwire-kernel-guest-v1";

pub(crate) const INIT_SH: &str = include_str!("init.sh");

/// Run by busybox `uevent` for every kernel uevent: load drivers for new devices.
pub(crate) const HOTPLUG_SH: &str = "#!/bin/sh\n\
[ \"$ACTION\" = add ] && [ -n \"$MODALIAS\" ] && exec /sbin/modprobe -q \"$MODALIAS\"\n\
exit 0\n";

/// Kernel modules wanted in the guest (names as in modules.dep; `-` and `_` are equal).
/// Dependencies are added from modules.dep/modules.softdep; built-in ones are skipped.
pub const GUEST_MODULES: &[&str] = &[
    "configfs",
    "virtio_pci",
    "virtio_net",
    // USB/IP
    "usbip-core",
    "vhci-hcd",
    "usbip-host",
    "usbip-vudc",
    // gadgets on the dummy UDC
    "dummy_hcd",
    "libcomposite",
    "usb_f_ss_lb",
    "usb_f_mass_storage",
    "usb_f_acm",
    "usb_f_serial",
    "usb_f_obex",
    "usb_f_hid",
    "usb_f_fs",
    // host-side class drivers
    "usb-storage",
    "uas",
    "sd_mod",
    "cdc-acm",
    "usbhid",
    "hid-generic",
    "evdev",
    "usbtest",
    "usbmon",
    // qemu-emulated USB hardware (Guest::xhci)
    "xhci_pci",
    "xhci_hcd",
    "snd-usb-audio",
    "usbserial",
    "ftdi_sio",
    "pl2303",
    // filesystems and block
    "ext4",
    "vfat",
    "msdos",
    "nls_ascii",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "crc32c_generic",
    "loop",
    // kernel TLS with AES-GCM (AES itself is built in): without gcm,
    // setsockopt(TLS_TX) fails with ENOENT
    "gf128mul",
    "ghash-generic",
    "ctr",
    "gcm",
    "tls",
];

/// Host files copied into the base image (guest path = host path, but under /usr for
/// /bin, /sbin, /lib, /lib64 because the image uses a merged-/usr layout).
const HOST_ELFS: &[&str] = &["/usr/sbin/usbip", "/usr/sbin/usbipd"];

/// Host packages whose files end up in the guest (their versions are part of the key).
const HOST_PACKAGES: &[&str] = &[
    "busybox-static",
    "usbip",
    "usb.ids",
    "libc6",
    "libudev1",
    "libwrap0",
];

#[derive(Debug, Clone)]
pub struct Assets {
    pub dir: PathBuf,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_release: String,
    pub key: String,
    /// How long `ensure` took (build or cache hit).
    pub prepare_time: Duration,
    /// Whether this call built the assets (false: cache hit).
    pub built: bool,
}

fn which(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // root tools are not always on a test runner's PATH
    for extra in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

pub(crate) fn require_tool(tool: &str, package: &str) -> Result<PathBuf, HarnessError> {
    which(tool).ok_or_else(|| HarnessError::MissingTool {
        tool: tool.to_string(),
        hint: format!("install the Debian package `{package}` (see .ci/install-kernel-deps)"),
    })
}

pub(crate) fn run_cmd(cmd: &mut Command) -> Result<String, HarnessError> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| HarnessError::Io {
        context: format!("running {desc}"),
        source: e,
    })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command: desc,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Io { context, source }
}

/// 64-bit FNV-1a, stable across Rust versions (unlike `DefaultHasher`).
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Field `field` of the first stanza of `apt-cache show --no-all-versions`-style output.
fn control_field(text: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}:");
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
}

/// The first `linux-image-*` package named in a Depends field, with its version when
/// the dependency is exact (`name (= version)`, as in Debian's metapackages).
fn image_dependency(depends: &str) -> Option<(String, Option<String>)> {
    depends.split([',', '|']).find_map(|d| {
        let d = d.trim();
        let name = d.split_whitespace().next()?;
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = d
            .split_once("(=")
            .and_then(|(_, v)| v.split(')').next())
            .map(|v| v.trim().to_string());
        Some((name.to_string(), version))
    })
}

/// Which kernel .deb to use: (package name, version, Some(local .deb) when given).
pub(crate) struct KernelSource {
    package: String,
    version: String,
    local_deb: Option<PathBuf>,
}

fn kernel_source() -> Result<KernelSource, HarnessError> {
    if let Some(deb) = std::env::var_os("USBWIRE_KERNEL_DEB") {
        let deb = PathBuf::from(deb);
        require_tool("dpkg-deb", "dpkg")?;
        let pkg = run_cmd(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Package"))?;
        let ver = run_cmd(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
        return Ok(KernelSource {
            package: pkg.trim().to_string(),
            version: ver.trim().to_string(),
            local_deb: Some(deb),
        });
    }
    require_tool("apt-cache", "apt")?;
    let meta = std::env::var("USBWIRE_KERNEL_PACKAGE").unwrap_or("linux-image-amd64".into());
    let show = |pkg: &str| -> Result<String, HarnessError> {
        let out = Command::new("apt-cache")
            .args(["show", "--no-all-versions", pkg])
            .output()
            .map_err(io_err("running apt-cache"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.trim().is_empty() {
            return Err(HarnessError::KernelUnavailable(format!(
                "`apt-cache show {pkg}` found nothing ({}); run `apt-get update` \
                 (see .ci/install-kernel-deps) or set USBWIRE_KERNEL_DEB=/path/to/linux-image-*.deb",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(text)
    };
    let text = show(&meta)?;
    let (package, version) = match control_field(&text, "Depends")
        .as_deref()
        .and_then(image_dependency)
    {
        // a metapackage: its exact dependency is the real image package
        Some((dep, Some(ver))) => (dep, ver),
        Some((dep, None)) => {
            let t = show(&dep)?;
            let ver = control_field(&t, "Version").ok_or_else(|| {
                HarnessError::KernelUnavailable(format!("no Version in `apt-cache show {dep}`"))
            })?;
            (dep, ver)
        }
        None => {
            let ver = control_field(&text, "Version").ok_or_else(|| {
                HarnessError::KernelUnavailable(format!("no Version in `apt-cache show {meta}`"))
            })?;
            (meta.clone(), ver)
        }
    };
    Ok(KernelSource {
        package,
        version,
        local_deb: None,
    })
}

fn host_package_version(pkg: &str) -> Result<String, HarnessError> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .map_err(io_err("running dpkg-query"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || v.is_empty() {
        return Err(HarnessError::MissingPackage {
            package: pkg.to_string(),
            hint: "run .ci/install-kernel-deps as root".into(),
        });
    }
    Ok(v)
}

/// Where the workspace's build outputs live (`target/`), derived from the running test
/// executable (`target/<profile>/deps/<test>`), so `CARGO_TARGET_DIR` is respected.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1) {
            if anc.join("CACHEDIR.TAG").is_file() {
                return anc.to_path_buf();
            }
        }
    }
    workspace_root().join("target")
}

/// The workspace root (parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

pub fn cache_root() -> PathBuf {
    match std::env::var_os("USBWIRE_KERNEL_CACHE") {
        Some(d) => PathBuf::from(d),
        None => target_dir().join("kernel-guest"),
    }
}

/// Verify every host tool the harness needs, with a clear error naming the package.
pub(crate) fn check_host_tools() -> Result<(), HarnessError> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(HarnessError::Unsupported(
            "the kernel harness needs an x86_64 Linux host".into(),
        ));
    }
    for (tool, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("socat", "socat"),
        ("xz", "xz-utils"),
        ("depmod", "kmod"),
        ("dpkg-deb", "dpkg"),
        ("dpkg-query", "dpkg"),
        ("ldd", "libc-bin"),
    ] {
        require_tool(tool, pkg)?;
    }
    if !Path::new("/bin/busybox").is_file() && !Path::new("/usr/bin/busybox").is_file() {
        return Err(HarnessError::MissingPackage {
            package: "busybox-static".into(),
            hint: "run .ci/install-kernel-deps as root".into(),
        });
    }
    Ok(())
}

fn recipe_hash() -> u64 {
    let mut s = String::new();
    s.push_str(FORMAT);
    s.push_str(INIT_SH);
    s.push_str(HOTPLUG_SH);
    s.push_str(&GUEST_MODULES.join(","));
    s.push_str(&HOST_ELFS.join(","));
    fnv1a(s.as_bytes())
}

pub(crate) fn compute_key() -> Result<(String, String, KernelSource), HarnessError> {
    let ks = kernel_source()?;
    let mut desc = format!(
        "format={FORMAT}\nrecipe={:016x}\nkernel={}={}\n",
        recipe_hash(),
        ks.package,
        ks.version
    );
    if let Some(d) = &ks.local_deb {
        desc.push_str(&format!("kernel-deb={}\n", d.display()));
    }
    for p in HOST_PACKAGES {
        desc.push_str(&format!("{p}={}\n", host_package_version(p)?));
    }
    let key = format!("{}-{:016x}", ks.package, fnv1a(desc.as_bytes()));
    Ok((key, desc, ks))
}

/// Build (or reuse) the assets. Serialised across processes by a lock file.
pub fn ensure() -> Result<Assets, HarnessError> {
    let t0 = Instant::now();
    check_host_tools()?;
    let root = cache_root();
    fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    let (key, desc, ks) = match compute_key() {
        Ok(k) => k,
        Err(e @ HarnessError::KernelUnavailable(_)) => {
            // apt cannot tell us (offline, no package lists): reuse a complete cache
            // directory built by this same recipe, if any.
            let Some(dir) = newest_ready_dir(&root) else {
                return Err(e);
            };
            eprintln!(
                "usbwire kernel harness: {e}\n  -> reusing the cached guest {}",
                dir.display()
            );
            return finish(dir, t0, false);
        }
        Err(e) => return Err(e),
    };
    let dir = root.join(&key);
    let ready = dir.join("READY");
    let lock_path = root.join(format!("{key}.lock"));
    let mut built = false;
    // Twice at most: another checkout's build may prune this guest between
    // our build (or cache hit) and our shared lock.
    for _ in 0..2 {
        if !ready.is_file() {
            let _lock = FileLock::acquire(&lock_path, Duration::from_secs(900))?;
            if !ready.is_file() {
                build(&root, &dir, &key, &desc, &ks)?;
                built = true;
            }
        }
        // Held for the rest of this process, so that no other process'
        // prune deletes the guest this one boots.
        let in_use = FileLock::acquire_shared(&lock_path, Duration::from_secs(900))?;
        if ready.is_file() {
            static IN_USE: std::sync::Mutex<Vec<FileLock>> = std::sync::Mutex::new(Vec::new());
            IN_USE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(in_use);
            return finish(dir, t0, built);
        }
    }
    Err(HarnessError::Asset(format!(
        "{} was pruned by another process twice while this one built it",
        dir.display()
    )))
}

fn finish(dir: PathBuf, t0: Instant, built: bool) -> Result<Assets, HarnessError> {
    let kernel_release = fs::read_to_string(dir.join("RELEASE"))
        .map_err(io_err("reading RELEASE"))?
        .trim()
        .to_string();
    let key = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Assets {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio"),
        dir,
        kernel_release,
        key,
        prepare_time: t0.elapsed(),
        built,
    })
}

/// The most recently completed cache directory built by the current recipe.
fn newest_ready_dir(root: &Path) -> Option<PathBuf> {
    let recipe = format!("recipe={:016x}\n", recipe_hash());
    fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|d| d.join("READY").is_file())
        .filter(|d| fs::read_to_string(d.join("KEY")).is_ok_and(|k| k.contains(&recipe)))
        .filter_map(|d| {
            let t = fs::metadata(d.join("READY"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((t, d))
        })
        .max()
        .map(|(_, d)| d)
}

/// Complete guests of other recipes kept beside the current one, so that
/// switching between a few branches does not rebuild each time.
const KEEP_OTHER_GUESTS: usize = 2;

/// Deletes the complete guest directories other than `keep` and the `others`
/// newest besides it: each recipe change builds a new ~80 MB one. A directory
/// whose lock another process holds is left alone.
fn prune(root: &Path, keep: &Path, others: usize) {
    let Ok(rd) = fs::read_dir(root) else {
        return;
    };
    let mut ready: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|d| d != keep && d.join("READY").is_file())
        .filter_map(|d| {
            let t = fs::metadata(d.join("READY"))
                .and_then(|m| m.modified())
                .ok()?;
            Some((t, d))
        })
        .collect();
    ready.sort_by_key(|b| std::cmp::Reverse(b.0));
    for (_, d) in ready.into_iter().skip(others) {
        let Some(name) = d.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let lock_path = root.join(format!("{name}.lock"));
        let Ok(lock) = FileLock::acquire(&lock_path, Duration::ZERO) else {
            continue;
        };
        if fs::remove_dir_all(&d).is_ok() {
            eprintln!(
                "usbwire kernel harness: removed the old guest {}",
                d.display()
            );
        }
        drop(lock);
        let _ = fs::remove_file(&lock_path);
    }
}

/// An exclusive flock(2) on a file; released on drop. Acquisition is bounded in time.
pub(crate) struct FileLock {
    _file: fs::File,
}

impl FileLock {
    pub(crate) fn acquire(path: &Path, max_wait: Duration) -> Result<FileLock, HarnessError> {
        Self::acquire_mode(path, max_wait, libc::LOCK_EX)
    }

    /// A shared lock: held by every process that boots the guest of `<key>`,
    /// so that another process' [`prune`] (which needs the exclusive one)
    /// never deletes a guest in use.
    pub(crate) fn acquire_shared(
        path: &Path,
        max_wait: Duration,
    ) -> Result<FileLock, HarnessError> {
        Self::acquire_mode(path, max_wait, libc::LOCK_SH)
    }

    fn acquire_mode(path: &Path, max_wait: Duration, mode: i32) -> Result<FileLock, HarnessError> {
        use std::os::fd::AsRawFd;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("opening lock {}", path.display())))?;
        let deadline = Instant::now() + max_wait;
        let mut announced = false;
        loop {
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(HarnessError::Io {
                    context: format!("flock {}", path.display()),
                    source: err,
                });
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Asset(format!(
                    "timed out after {max_wait:?} waiting for lock {} (another build stuck?)",
                    path.display()
                )));
            }
            if !announced {
                eprintln!(
                    "usbwire kernel harness: waiting for {} (another process builds the guest)",
                    path.display()
                );
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Map a host path to the guest's merged-/usr layout (`/lib/x` -> `usr/lib/x`).
pub(crate) fn guest_path(path: &str) -> String {
    let p = path.trim_start_matches('/');
    for top in ["bin", "sbin", "lib", "lib64"] {
        if p == top || p.starts_with(&format!("{top}/")) {
            return format!("usr/{p}");
        }
    }
    p.to_string()
}

/// Mark the merged-/usr symlinks as existing so an archive never creates them as dirs.
pub(crate) fn merged_usr(a: &mut Archive) {
    for top in ["bin", "sbin", "lib", "lib64"] {
        a.assume_exists(top);
    }
}

/// Shared libraries (and ELF interpreter) of a dynamically linked host executable, as
/// reported by `ldd`. Static executables yield an empty list.
pub fn shared_libs(elf: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let out = Command::new("ldd")
        .arg(elf)
        .output()
        .map_err(io_err("running ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(vec![]);
        }
        return Err(HarnessError::Command {
            command: format!("ldd {}", elf.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(HarnessError::Asset(format!(
                "{}: shared library {line}",
                elf.display()
            )));
        }
        let path = if let Some((_, rhs)) = line.split_once("=>") {
            rhs.split_whitespace().next().unwrap_or("")
        } else {
            line.split_whitespace().next().unwrap_or("")
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Add an executable and its shared libraries to an archive (libraries at the path ldd
/// reports, where the guest's dynamic loader looks for them).
pub(crate) fn add_elf_with_libs(
    a: &mut Archive,
    host: &Path,
    guest: &str,
) -> Result<(), HarnessError> {
    let data = fs::read(host).map_err(io_err(format!("reading {}", host.display())))?;
    let mode = fs::metadata(host)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o755)
        | 0o555;
    a.file(&guest_path(guest), data, mode);
    for lib in shared_libs(host)? {
        let g = guest_path(&lib.to_string_lossy());
        if a.contains(&g) {
            continue;
        }
        let data = fs::read(&lib).map_err(io_err(format!("reading {}", lib.display())))?;
        a.file(&g, data, 0o755);
    }
    Ok(())
}

fn normalize_mod(name: &str) -> String {
    name.replace('-', "_")
}

fn mod_name_of(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    normalize_mod(base)
}

/// Resolve `wanted` modules plus dependencies (modules.dep) and soft dependencies
/// (modules.softdep, best effort) to paths relative to /lib/modules/<release>.
fn resolve_modules(modroot: &Path, wanted: &[&str]) -> Result<BTreeSet<String>, HarnessError> {
    let dep = fs::read_to_string(modroot.join("modules.dep")).map_err(io_err("modules.dep"))?;
    let builtin = fs::read_to_string(modroot.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(mod_name_of).collect();
    let mut by_name: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((m, deps)) = line.split_once(':') else {
            continue;
        };
        by_name.insert(
            mod_name_of(m),
            (
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    let softdep = fs::read_to_string(modroot.join("modules.softdep")).unwrap_or_default();
    let mut soft: HashMap<String, Vec<String>> = HashMap::new();
    for line in softdep.lines() {
        let mut it = line.split_whitespace();
        if it.next() != Some("softdep") {
            continue;
        }
        let Some(m) = it.next() else { continue };
        let list = it
            .filter(|w| !w.ends_with(':'))
            .map(normalize_mod)
            .collect();
        soft.insert(normalize_mod(m), list);
    }
    let mut out = BTreeSet::new();
    let mut todo: Vec<(String, bool)> = wanted.iter().map(|w| (normalize_mod(w), true)).collect();
    let mut seen = BTreeSet::new();
    let mut missing = Vec::new();
    while let Some((name, required)) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some((path, deps)) = by_name.get(&name) {
            out.insert(path.clone());
            for d in deps {
                out.insert(d.clone());
                todo.push((mod_name_of(d), true));
            }
            for s in soft.get(&name).into_iter().flatten() {
                todo.push((s.clone(), false));
            }
        } else if required && !builtin.contains(&name) {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(HarnessError::Asset(format!(
            "kernel modules neither in modules.dep nor built in: {}",
            missing.join(", ")
        )));
    }
    Ok(out)
}

/// Extract the uncompressed ELF vmlinux from a bzImage with an XZ payload (like the
/// kernel's scripts/extract-vmlinux).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), HarnessError> {
    let data = fs::read(bzimage).map_err(io_err(format!("reading {}", bzimage.display())))?;
    const XZ_MAGIC: &[u8] = &[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00];
    let mut pos = 0;
    let mut tries = 0;
    while let Some(off) = data[pos..].windows(6).position(|w| w == XZ_MAGIC) {
        tries += 1;
        let start = pos + off;
        let tmp = out.with_extension("xz");
        fs::write(&tmp, &data[start..]).map_err(io_err("writing xz payload"))?;
        let res = Command::new("xz")
            .args(["-dc", "--single-stream"])
            .arg(&tmp)
            .output()
            .map_err(io_err("running xz"))?;
        let _ = fs::remove_file(&tmp);
        if res.stdout.len() > 4 && &res.stdout[..4] == b"\x7fELF" {
            fs::write(out, &res.stdout).map_err(io_err("writing vmlinux"))?;
            return Ok(());
        }
        pos = start + 1;
        if tries > 16 {
            break;
        }
    }
    Err(HarnessError::Asset(format!(
        "no XZ-compressed ELF found in {} (is the kernel built with CONFIG_KERNEL_XZ?)",
        bzimage.display()
    )))
}

fn download_kernel(work: &Path, ks: &KernelSource) -> Result<PathBuf, HarnessError> {
    if let Some(d) = &ks.local_deb {
        return Ok(d.clone());
    }
    require_tool("apt-get", "apt")?;
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(work)
        .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{}={}", ks.package, ks.version));
    run_cmd(&mut cmd).map_err(|e| {
        HarnessError::KernelUnavailable(format!(
            "downloading {}={} failed (network? apt sources?): {e}",
            ks.package, ks.version
        ))
    })?;
    let deb = fs::read_dir(work)
        .map_err(io_err("listing download dir"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "deb")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&ks.package))
        })
        .ok_or_else(|| {
            HarnessError::KernelUnavailable("apt-get download produced no .deb".into())
        })?;
    Ok(deb)
}

fn busybox_path() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("/bin/busybox")
}

fn build(
    root: &Path,
    dir: &Path,
    key: &str,
    desc: &str,
    ks: &KernelSource,
) -> Result<(), HarnessError> {
    let t0 = Instant::now();
    eprintln!(
        "usbwire kernel harness: building guest assets in {}",
        dir.display()
    );
    // We hold the key's lock: any other work dir of this key is left over from a
    // killed build.
    if let Ok(rd) = fs::read_dir(root) {
        let prefix = format!("{key}.tmp-");
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let work = root.join(format!("{key}.tmp-{}", std::process::id()));
    fs::create_dir_all(&work).map_err(io_err("creating work dir"))?;
    let result = build_in(&work, desc, ks);
    if result.is_ok() {
        let _ = fs::remove_dir_all(dir);
        let out = work.join("out");
        fs::rename(&out, dir).map_err(io_err(format!("renaming into {}", dir.display())))?;
        fs::write(dir.join("READY"), format!("{:?}\n", t0.elapsed()))
            .map_err(io_err("writing READY"))?;
        eprintln!(
            "usbwire kernel harness: guest assets built in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        prune(root, dir, KEEP_OTHER_GUESTS);
    }
    let _ = fs::remove_dir_all(&work);
    result
}

fn build_in(work: &Path, desc: &str, ks: &KernelSource) -> Result<(), HarnessError> {
    let out = work.join("out");
    fs::create_dir_all(&out).map_err(io_err("creating out dir"))?;
    let dl = work.join("dl");
    fs::create_dir_all(&dl).map_err(io_err("creating dl dir"))?;
    let deb = download_kernel(&dl, ks)?;
    let x = work.join("x");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x))?;

    // Kernel release = the directory under lib/modules.
    let modules_base = x.join("lib/modules");
    let release = fs::read_dir(&modules_base)
        .map_err(io_err("listing lib/modules in the kernel package"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| HarnessError::Asset("kernel package has no lib/modules/<release>".into()))?;
    let modroot = modules_base.join(&release);
    run_cmd(Command::new("depmod").arg("-b").arg(&x).arg(&release))?;

    extract_vmlinux(
        &x.join(format!("boot/vmlinuz-{release}")),
        &out.join("vmlinux"),
    )?;
    let _ = fs::copy(x.join(format!("boot/config-{release}")), out.join("config"));

    let mut a = Archive::new();
    for top in ["usr/bin", "usr/sbin", "usr/lib", "usr/lib64"] {
        a.dir(top, 0o755);
    }
    for top in ["bin", "sbin", "lib", "lib64"] {
        a.symlink(top, &format!("usr/{top}"));
    }
    merged_usr(&mut a);
    for d in [
        "dev", "proc", "sys", "run", "tmp", "root", "mnt", "etc", "var", "var/run", "var/log",
        "var/tmp", "usbwire",
    ] {
        a.dir(d, if d.ends_with("tmp") { 0o1777 } else { 0o755 });
    }

    // busybox + applet links
    let bb = busybox_path();
    let bb_data = fs::read(&bb).map_err(io_err("reading busybox"))?;
    a.file("usr/bin/busybox", bb_data, 0o755);
    let list = run_cmd(Command::new(&bb).arg("--list-full"))?;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let g = guest_path(&format!("/{applet}"));
        if g == "usr/bin/busybox" {
            continue;
        }
        a.symlink(&g, "/usr/bin/busybox");
    }

    // kernel modules
    let mods = resolve_modules(&modroot, GUEST_MODULES)?;
    let gmod = format!("usr/lib/modules/{release}");
    for m in &mods {
        let data = fs::read(modroot.join(m)).map_err(io_err(format!("reading module {m}")))?;
        a.file(&format!("{gmod}/{m}"), data, 0o644);
    }
    // index files: regenerate for the subset so aliases only name present modules
    let sub = work.join("sub");
    let sub_mod = sub.join("lib/modules").join(&release);
    for m in &mods {
        let dst = sub_mod.join(m);
        fs::create_dir_all(dst.parent().unwrap()).map_err(io_err("creating module dir"))?;
        fs::hard_link(modroot.join(m), &dst)
            .or_else(|_| fs::copy(modroot.join(m), &dst).map(|_| ()))
            .map_err(io_err("linking module"))?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        let _ = fs::copy(modroot.join(f), sub_mod.join(f));
    }
    run_cmd(Command::new("depmod").arg("-b").arg(&sub).arg(&release))?;
    for e in fs::read_dir(&sub_mod)
        .map_err(io_err("listing modules index"))?
        .filter_map(|e| e.ok())
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("modules.") {
            let data = fs::read(e.path()).map_err(io_err("reading modules index"))?;
            a.file(&format!("{gmod}/{name}"), data, 0o644);
        }
    }
    let mut modlist = mods.iter().cloned().collect::<Vec<_>>().join("\n");
    modlist.push('\n');
    fs::write(out.join("MODULES"), modlist).map_err(io_err("writing MODULES"))?;

    // Debian's C usbip tools + libraries
    for elf in HOST_ELFS {
        add_elf_with_libs(&mut a, Path::new(elf), elf)?;
    }
    let ids = fs::read("/usr/share/misc/usb.ids").map_err(|e| HarnessError::MissingPackage {
        package: "usb.ids".into(),
        hint: format!("/usr/share/misc/usb.ids: {e}"),
    })?;
    a.file("usr/share/misc/usb.ids", ids, 0o644);
    a.symlink("usr/share/hwdata/usb.ids", "../misc/usb.ids");

    // /etc
    let etc: BTreeMap<&str, &str> = [
        ("etc/hosts.allow", "ALL: ALL\n"),
        ("etc/hosts.deny", ""),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n10.0.2.15 usbwire-guest\n10.0.2.2 host\n",
        ),
        ("etc/nsswitch.conf", "hosts: files\nservices: files\n"),
        ("etc/services", "usbip 3240/tcp\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/hostname", "usbwire-guest\n"),
    ]
    .into_iter()
    .collect();
    for (p, c) in etc {
        a.file(p, c.as_bytes().to_vec(), 0o644);
    }
    a.file("init", INIT_SH.as_bytes().to_vec(), 0o755);
    a.file(
        "usr/sbin/usbwire-hotplug",
        HOTPLUG_SH.as_bytes().to_vec(),
        0o755,
    );

    let f = fs::File::create(out.join("initramfs.cpio")).map_err(io_err("creating initramfs"))?;
    a.write_to(BufWriter::new(f))
        .map_err(io_err("writing initramfs"))?;
    fs::write(out.join("RELEASE"), format!("{release}\n")).map_err(io_err("writing RELEASE"))?;
    let mut kf = fs::File::create(out.join("KEY")).map_err(io_err("writing KEY"))?;
    kf.write_all(desc.as_bytes())
        .map_err(io_err("writing KEY"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_current_guest_the_newest_others_and_locked_ones() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let base = std::time::SystemTime::now() - Duration::from_secs(3600);
        let mk = |name: &str, age_min: u64| {
            let d = r.join(name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("vmlinux"), b"x").unwrap();
            let f = fs::File::create(d.join("READY")).unwrap();
            f.set_modified(base - Duration::from_secs(60 * age_min))
                .unwrap();
            fs::write(r.join(format!("{name}.lock")), b"").unwrap();
            d
        };
        let current = mk("k-current", 50);
        mk("k-new", 1);
        mk("k-newer", 0);
        mk("k-old", 10);
        mk("k-older", 20);
        mk("k-busy", 30);
        mk("k-used", 40);
        fs::create_dir_all(r.join("k-incomplete")).unwrap();
        let busy = FileLock::acquire(&r.join("k-busy.lock"), Duration::ZERO).unwrap();
        // a guest another process boots (ensure's shared lock)
        let used = FileLock::acquire_shared(&r.join("k-used.lock"), Duration::ZERO).unwrap();
        prune(r, &current, 2);
        drop(busy);
        drop(used);
        let mut left: Vec<String> = fs::read_dir(r)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "k-busy",
                "k-busy.lock",
                "k-current",
                "k-current.lock",
                "k-incomplete",
                "k-new",
                "k-new.lock",
                "k-newer",
                "k-newer.lock",
                "k-used",
                "k-used.lock"
            ]
        );
    }

    #[test]
    fn parses_control_fields() {
        let t = "Package: linux-image-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\n\nPackage: x\n";
        assert_eq!(control_field(t, "Version").unwrap(), "6.1.192-2");
        let d = control_field(t, "Depends").unwrap();
        assert_eq!(
            image_dependency(&d).unwrap(),
            (
                "linux-image-6.1.0-56-amd64".to_string(),
                Some("6.1.192-2".to_string())
            )
        );
        assert_eq!(
            image_dependency("linux-image-6.1.0-56-amd64").unwrap(),
            ("linux-image-6.1.0-56-amd64".to_string(), None)
        );
    }

    #[test]
    fn maps_merged_usr() {
        assert_eq!(
            guest_path("/lib/x86_64-linux-gnu/libc.so.6"),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(
            guest_path("/lib64/ld-linux-x86-64.so.2"),
            "usr/lib64/ld-linux-x86-64.so.2"
        );
        assert_eq!(guest_path("/usr/sbin/usbip"), "usr/sbin/usbip");
        assert_eq!(guest_path("/libexec/x"), "libexec/x");
        assert_eq!(guest_path("/opt/x"), "opt/x");
    }
}
