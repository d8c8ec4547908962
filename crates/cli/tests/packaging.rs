//! The Debian package that `packaging/build-deb.sh` makes, judged by
//! Debian's own tools: `lintian` finds no error in it, `dpkg` installs it
//! into a throwaway root (`--root`, so this machine's own packages, such as
//! Debian's `usbip` that it replaces, are left alone) and removes and purges
//! it leaving nothing behind, and `systemd-analyze verify` accepts its units
//! as installed. The installed `usbipd` then serves with the shipped
//! configuration.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::peer_binary;
use usbwire_tests::daemon::Usbipd;

const PACKAGE: &str = "usbwire";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, which must succeed, and returns its standard output.
fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tools every test here needs: `None` (skip) when one is missing
/// outside CI.
fn tools() -> Option<()> {
    for (path, package) in [
        ("/usr/bin/dpkg-deb", "dpkg"),
        ("/usr/bin/dpkg-shlibdeps", "dpkg-dev"),
        ("/usr/bin/strip", "binutils"),
        ("/usr/bin/lintian", "lintian"),
        ("/usr/bin/systemd-analyze", "systemd"),
    ] {
        peer_binary(path, package)?;
    }
    Some(())
}

/// The package, built once per test run from the binaries this test run
/// built (unoptimised, which changes nothing that is checked here).
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let bins = Path::new(env!("CARGO_BIN_EXE_usbipd")).parent().unwrap();
        assert!(Path::new(env!("CARGO_BIN_EXE_usbwire-docs")).exists());
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging");
        let _ = fs::remove_dir_all(&out);
        let stdout = check(
            Command::new("bash")
                .arg(repo.join("packaging/build-deb.sh"))
                .arg("--bins")
                .arg(bins)
                .arg("--out")
                .arg(&out)
                .arg("--fast"),
        );
        let deb = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("build-deb.sh printed the .deb's path"),
        );
        assert!(deb.is_file(), "{}", deb.display());
        deb
    })
}

#[test]
fn lintian_reports_no_error() {
    if tools().is_none() {
        return;
    }
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(deb()));
    // Warnings are printed for whoever reads the log; errors fail.
    eprintln!("{}", text(&out));
    assert!(
        out.status.success(),
        "lintian found errors:\n{}",
        text(&out)
    );
    assert!(
        !text(&out).lines().any(|l| l.starts_with("E: ")),
        "{}",
        text(&out)
    );
}

/// Every file under `root`, relative to it, except dpkg's own database.
fn files(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeSet<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("var/lib/dpkg") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(root, &e.path(), into);
            } else {
                into.insert(rel);
            }
        }
    }
    let mut all = BTreeSet::new();
    walk(root, root, &mut all);
    all
}

/// A dpkg database in `root` that knows the packages the .deb depends on as
/// they are installed on this machine, so that dpkg checks the dependencies
/// for real instead of being told to ignore them.
fn dpkg_root_with_dependencies(root: &Path, deb: &Path) {
    let admin = root.join("var/lib/dpkg");
    fs::create_dir_all(admin.join("info")).unwrap();
    fs::create_dir_all(admin.join("updates")).unwrap();
    let depends = check(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Depends"),
    );
    let mut status = String::new();
    for name in depends
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .collect::<BTreeSet<_>>()
    {
        let out = run(Command::new("dpkg-query").args(["-s", name]));
        if out.status.success() {
            status.push_str(String::from_utf8_lossy(&out.stdout).trim_end());
            status.push_str("\n\n");
        }
    }
    assert!(!status.is_empty(), "none of {depends:?} is installed here");
    fs::write(admin.join("status"), status).unwrap();
}

fn dpkg(root: &Path) -> Command {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        // Maintainer scripts run here, not chrooted into a root that has no
        // shell; they see DPKG_ROOT and leave this machine's systemd alone.
        .arg("--force-script-chrootless")
        .arg("--log=/dev/null");
    cmd
}

#[test]
fn dpkg_installs_it_systemd_accepts_its_units_and_it_is_removed_without_a_trace() {
    if tools().is_none() {
        return;
    }
    // dpkg installs files as root's, even in another root.
    if check(Command::new("id").arg("-u")).trim() != "0" {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root"
        );
        eprintln!("SKIPPED: dpkg -i needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    dpkg_root_with_dependencies(&root, deb());
    systemd_of_this_machine(&root);
    let before = files(&root);

    check(dpkg(&root).arg("-i").arg(deb()));
    for f in [
        "usr/sbin/usbipd",
        "usr/sbin/usbip",
        "etc/usbwire/usbipd.toml",
        "lib/systemd/system/usbipd.service",
        "lib/systemd/system/usbipd.socket",
        "lib/systemd/system/usbip-attach@.service",
        "usr/share/man/man8/usbipd.8.gz",
        "usr/share/man/man8/usbip.8.gz",
        "usr/share/man/man8/usbip-attach.8.gz",
        "usr/share/bash-completion/completions/usbip",
        "usr/share/zsh/vendor-completions/_usbipd",
        "usr/share/fish/vendor_completions.d/usbip.fish",
        "usr/share/doc/usbwire/copyright",
    ] {
        assert!(root.join(f).is_file(), "{f} not installed");
    }
    let status = check(dpkg(&root).args(["-s", PACKAGE]));
    assert!(status.contains("Status: install ok installed"), "{status}");

    // As installed: systemd-analyze resolves ExecStart= and the units they
    // name inside the root, so a binary missing from the package fails here.
    let units = root.join("lib/systemd/system");
    let verify = run(Command::new("systemd-analyze")
        .arg(format!("--root={}", root.display()))
        // Documentation= is checked by running man(1) on this machine,
        // which cannot see the root's pages (lintian checks those).
        .arg("--man=no")
        .arg("verify")
        .arg(units.join("usbipd.socket"))
        .arg(units.join("usbipd.service"))
        .arg(units.join("usbip-attach@.service")));
    // Any warning names its unit; each is a defect in the package.
    let said = text(&verify);
    assert!(verify.status.success(), "{said}");
    assert!(!said.contains("usbip"), "{said}");

    // The installed (stripped) usbipd serves with the shipped config, and
    // the installed usbip lists what it serves: nothing, as shipped.
    let config = root.join("etc/usbwire/usbipd.toml");
    let mut daemon = Usbipd::start(
        &root.join("usr/sbin/usbipd"),
        &["--config", config.to_str().unwrap(), "--no-control"],
        dir.path(),
    );
    let port = daemon.port.to_string();
    let list = run(Command::new(root.join("usr/sbin/usbip")).args([
        "list",
        "-r",
        "127.0.0.1",
        "-t",
        &port,
    ]));
    // As the C tool, usbip says so and exits 1 when the list is empty.
    assert!(
        text(&list).contains("no exportable devices found on 127.0.0.1"),
        "{}\n{}",
        text(&list),
        daemon.log_text()
    );
    assert!(daemon.stop(), "{}", daemon.log_text());

    // Removal keeps the administrator's configuration; purging takes it too
    // and leaves the root as it was.
    check(dpkg(&root).args(["-r", PACKAGE]));
    let mut kept = before.clone();
    kept.insert(PathBuf::from("etc/usbwire/usbipd.toml"));
    assert_eq!(files(&root), kept);
    check(dpkg(&root).args(["-P", PACKAGE]));
    assert_eq!(files(&root), before);
    let gone = run(dpkg(&root).args(["-s", PACKAGE]));
    assert!(!gone.status.success(), "{}", text(&gone));
}

/// What the units refer to on a Debian 12 system, as this machine has it: a
/// merged /usr (/lib/systemd/system is /usr/lib/systemd/system), the units
/// systemd itself ships (sysinit.target...) and kill(1) for ExecReload=.
fn systemd_of_this_machine(root: &Path) {
    let units = root.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    for e in fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), units.join(e.file_name())).unwrap();
        }
    }
    fs::copy("/usr/bin/kill", root.join("usr/bin/kill")).unwrap();
}
