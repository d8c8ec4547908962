//! `usbwire-docs OUT_DIR`: the man pages and shell completions of `usbipd`
//! and `usbip`, generated from their clap definitions so that they never
//! drift from the flags the binaries accept. Writes
//! `OUT_DIR/man/*.8` (one page per command and `usbip` subcommand, section 8
//! as for Debian's C tools in /usr/sbin) and
//! `OUT_DIR/completions/{bash,zsh,fish}/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

// The binaries' own sources, compiled as modules so that their `Args` and
// `Cli` are reachable here; the rest of them is unused in this binary.
#[allow(dead_code, unused_imports)]
#[path = "usbipd.rs"]
mod usbipd;

#[allow(dead_code, unused_imports)]
#[path = "usbip.rs"]
mod usbip;

const SECTION: &str = "8";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: usbwire-docs OUT_DIR");
        return ExitCode::from(2);
    };
    match write_all(Path::new(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbwire-docs: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(out: &Path) -> Result<(), String> {
    let man = out.join("man");
    create_dir(&man)?;
    for cmd in [usbipd::Args::command(), usbip::Cli::command()] {
        write_man_pages(&man, cmd)?;
    }
    for (shell, dir) in [
        (Shell::Bash, "bash"),
        (Shell::Zsh, "zsh"),
        (Shell::Fish, "fish"),
    ] {
        let dir = out.join("completions").join(dir);
        create_dir(&dir)?;
        for mut cmd in [usbipd::Args::command(), usbip::Cli::command()] {
            let name = cmd.get_name().to_string();
            clap_complete::generate_to(shell, &mut cmd, name, &dir).map_err(|e| {
                format!(
                    "cannot write the {shell} completion in {}: {e}",
                    dir.display()
                )
            })?;
        }
    }
    Ok(())
}

/// One page for `cmd` and one for each of its subcommands, named as git's
/// and Debian's usbip's are: `usbip-attach(8)`.
fn write_man_pages(dir: &Path, cmd: Command) -> Result<(), String> {
    let name = cmd.get_name().to_string();
    render(&dir.join(format!("{name}.{SECTION}")), &cmd)?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let full = format!("{name}-{}", sub.get_name());
        // The page is usbip-attach(8); its synopsis reads `usbip attach`.
        let sub = sub
            .clone()
            .display_name(full.clone())
            .bin_name(format!("{name} {}", sub.get_name()));
        render(&dir.join(format!("{full}.{SECTION}")), &sub)?;
    }
    Ok(())
}

fn render(path: &PathBuf, cmd: &Command) -> Result<(), String> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .render(&mut page)
        .map_err(|e| format!("cannot render {}: {e}", path.display()))?;
    fs::write(path, page).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn create_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}
