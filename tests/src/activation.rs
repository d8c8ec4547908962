//! Starting a program on listening sockets the test owns, passed the way a
//! systemd `.socket` unit passes them (socket activation): the sockets as
//! fds 3, 4, ..., `LISTEN_FDS` (how many), `LISTEN_PID` (the child's own
//! pid) and optionally `LISTEN_FDNAMES`.
//!
//! The test binds `127.0.0.1:0` itself and keeps the listener, so the port
//! is known before the child starts, no other process can take it, and a
//! restarted child gets the very same socket again. Connections made while
//! no child runs wait in the listener's backlog instead of being refused.
//!
//! `LISTEN_PID` is known only after `fork`, so it is written between `fork`
//! and `exec`: the child formats its pid into an environment entry prepared
//! beforehand and calls `execve` itself, with nothing allocated on that path
//! (only `fcntl`, `dup2`, `getpid`, `execve`, `write` and `_exit`, which are
//! async-signal-safe).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The first fd of the protocol (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// A program to start with inherited listening sockets.
pub struct Activated {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    listeners: Vec<OwnedFd>,
    names: Option<Vec<String>>,
    extra: Vec<(OwnedFd, RawFd)>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
}

impl Activated {
    /// `program` must be a path (it is run with `execve`, no `PATH` search).
    pub fn new(program: impl AsRef<Path>) -> Activated {
        Activated {
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            listeners: Vec::new(),
            names: None,
            extra: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets one variable in the child's environment (otherwise this
    /// process's, without any `LISTEN_*` of its own).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Passes a listening socket: the first becomes fd 3, the next fd 4, ...
    /// The socket is duplicated, so the caller keeps its own.
    pub fn listener(mut self, socket: impl AsFd) -> io::Result<Self> {
        self.listeners.push(socket.as_fd().try_clone_to_owned()?);
        Ok(self)
    }

    /// `LISTEN_FDNAMES`, one name per listener.
    pub fn fd_names<S: AsRef<str>>(mut self, names: &[S]) -> Self {
        self.names = Some(names.iter().map(|s| s.as_ref().to_string()).collect());
        self
    }

    /// Passes any other fd as `target` in the child (after the listeners).
    pub fn fd(mut self, fd: impl AsFd, target: RawFd) -> io::Result<Self> {
        self.extra.push((fd.as_fd().try_clone_to_owned()?, target));
        Ok(self)
    }

    pub fn stdin(mut self, s: impl Into<Stdio>) -> Self {
        self.stdin = Some(s.into());
        self
    }

    pub fn stdout(mut self, s: impl Into<Stdio>) -> Self {
        self.stdout = Some(s.into());
        self
    }

    pub fn stderr(mut self, s: impl Into<Stdio>) -> Self {
        self.stderr = Some(s.into());
        self
    }

    pub fn spawn(self) -> io::Result<Child> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        let n = self.listeners.len();
        if let Some(names) = &self.names {
            if names.len() != n {
                return Err(invalid(format!(
                    "{} LISTEN_FDNAMES for {n} listeners",
                    names.len()
                )));
            }
        }
        if let Some((k, _)) = self.env.iter().find(|(k, _)| is_listen_var(k)) {
            return Err(invalid(format!(
                "{} is set by the activation itself",
                k.to_string_lossy()
            )));
        }
        let first_extra = LISTEN_FDS_START + n as RawFd;
        let mut sources: Vec<RawFd> = self.listeners.iter().map(|f| f.as_raw_fd()).collect();
        let mut targets: Vec<RawFd> = (0..n as RawFd).map(|i| LISTEN_FDS_START + i).collect();
        for (fd, target) in &self.extra {
            if *target < first_extra || targets.contains(target) {
                return Err(invalid(format!(
                    "fd {target} for the child is taken (the listeners are fds {LISTEN_FDS_START} to {})",
                    first_extra - 1
                )));
            }
            sources.push(fd.as_raw_fd());
            targets.push(*target);
        }
        // Above every target: the first step moves the sources there, so
        // that no dup2 overwrites a source another one still needs.
        let floor = targets.iter().copied().max().unwrap_or(LISTEN_FDS_START) + 1;

        let cstr = |b: Vec<u8>| CString::new(b).map_err(|e| invalid(e.to_string()));
        let program = cstr(self.program.as_os_str().as_bytes().to_vec())?;
        let mut argv = vec![program.clone()];
        for a in &self.args {
            argv.push(cstr(a.as_bytes().to_vec())?);
        }
        let mut env: Vec<CString> = Vec::new();
        let overridden = |k: &OsStr| is_listen_var(k) || self.env.iter().any(|(o, _)| o == k);
        for (k, v) in std::env::vars_os() {
            if !overridden(&k) {
                env.push(cstr(env_entry(&k, &v))?);
            }
        }
        for (k, v) in &self.env {
            env.push(cstr(env_entry(k, v))?);
        }
        env.push(cstr(format!("LISTEN_FDS={n}").into_bytes())?);
        if let Some(names) = &self.names {
            env.push(cstr(
                format!("LISTEN_FDNAMES={}", names.join(":")).into_bytes(),
            )?);
        }
        // LISTEN_PID=, room for any pid, NUL-terminated wherever the digits
        // end; filled in by the child.
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + 21, 0);
        let mut image = ExecImage::new(argv, env, listen_pid, sources, targets, floor);

        let mut cmd = Command::new(&self.program);
        if let Some(s) = self.stdin {
            cmd.stdin(s);
        }
        if let Some(s) = self.stdout {
            cmd.stdout(s);
        }
        if let Some(s) = self.stderr {
            cmd.stderr(s);
        }
        // SAFETY: the closure runs in the forked child and only makes the
        // async-signal-safe calls listed in the module documentation, on
        // memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || image.exec());
        }
        let child = cmd.spawn();
        // The parent's duplicates close here; the child has its own.
        drop(self.listeners);
        drop(self.extra);
        child
    }
}

/// The variables of the protocol, which this module sets and the child
/// must not inherit from this process.
fn is_listen_var(k: &OsStr) -> bool {
    k.as_bytes().starts_with(b"LISTEN_")
}

fn env_entry(k: &OsStr, v: &OsStr) -> Vec<u8> {
    let mut e = k.to_os_string().into_vec();
    e.push(b'=');
    e.extend_from_slice(v.as_bytes());
    e
}

/// Everything the child needs between fork and exec, prepared before the
/// fork; `exec` allocates nothing.
struct ExecImage {
    // Owned storage the pointer arrays point into.
    _argv: Vec<CString>,
    _env: Vec<CString>,
    _listen_pid: Vec<u8>,
    listen_pid: *mut u8,
    listen_pid_len: usize,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    sources: Vec<RawFd>,
    moved: Vec<RawFd>,
    targets: Vec<RawFd>,
    floor: RawFd,
}

// SAFETY: the raw pointers point into buffers the image owns; it is moved
// into the pre_exec closure and used only by the forked child.
unsafe impl Send for ExecImage {}
// SAFETY: as above; the parent never uses the pointers.
unsafe impl Sync for ExecImage {}

impl ExecImage {
    fn new(
        argv: Vec<CString>,
        env: Vec<CString>,
        mut listen_pid: Vec<u8>,
        sources: Vec<RawFd>,
        targets: Vec<RawFd>,
        floor: RawFd,
    ) -> ExecImage {
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        // The child writes the pid through this pointer, and execve reads
        // the entry through the same one.
        let pid_ptr = listen_pid.as_mut_ptr();
        let mut envp_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp_ptrs.push(pid_ptr as *const libc::c_char);
        envp_ptrs.push(std::ptr::null());
        let moved = vec![-1; sources.len()];
        ExecImage {
            _argv: argv,
            _env: env,
            listen_pid_len: listen_pid.len(),
            _listen_pid: listen_pid,
            listen_pid: pid_ptr,
            argv_ptrs,
            envp_ptrs,
            sources,
            moved,
            targets,
            floor,
        }
    }

    /// In the child: puts the fds in place, writes LISTEN_PID, execs. Never
    /// returns on success; on failure it says so on stderr and exits 127
    /// (not an error return: a dup2 may have replaced std's own status pipe,
    /// so std could not report one).
    fn exec(&mut self) -> io::Result<()> {
        // SAFETY (whole function): async-signal-safe calls on fds and
        // memory owned by this image; see the module documentation.
        unsafe {
            for (i, &src) in self.sources.iter().enumerate() {
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, self.floor);
                if fd < 0 {
                    fail(b"activation: cannot duplicate an fd for the child\n");
                }
                self.moved[i] = fd;
            }
            for (&fd, &target) in self.moved.iter().zip(&self.targets) {
                // dup2 leaves the target without FD_CLOEXEC: it survives exec.
                if libc::dup2(fd, target) < 0 {
                    fail(b"activation: dup2 failed\n");
                }
            }
            let digits = self.listen_pid.add(LISTEN_PID_PREFIX.len());
            let room = self.listen_pid_len - LISTEN_PID_PREFIX.len();
            write_decimal(libc::getpid() as u64, digits, room);
            libc::execve(
                self.argv_ptrs[0],
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
            fail(b"activation: execve failed\n");
        }
    }
}

/// Writes `v` in decimal and a NUL at `out` (which has `room` bytes, at
/// least 21: any u64 and its NUL).
///
/// # Safety
/// `out` must be valid for `room` bytes of writes.
unsafe fn write_decimal(mut v: u64, out: *mut u8, room: usize) {
    let mut tmp = [0u8; 20];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 || n == tmp.len() {
            break;
        }
    }
    debug_assert!(room > n);
    for i in 0..n {
        // SAFETY: i < n < room.
        unsafe { *out.add(i) = tmp[n - 1 - i] };
    }
    // SAFETY: n < room.
    unsafe { *out.add(n) = 0 };
}

fn fail(msg: &[u8]) -> ! {
    // SAFETY: write(2) and _exit(2) are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{Ipv4Addr, TcpListener};

    fn shell_report(a: Activated) -> String {
        let mut child = a.stdout(Stdio::piped()).spawn().expect("spawn sh");
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success(), "{out}");
        out
    }

    #[test]
    fn the_child_sees_its_own_pid_the_count_the_names_and_the_sockets() {
        let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (extra, _keep) = std::os::unix::net::UnixStream::pair().unwrap();
        let out = shell_report(
            Activated::new("/bin/sh")
                .args([
                    "-c",
                    r#"echo "pid=$$ fds=$LISTEN_FDS names=$LISTEN_FDNAMES x=$X"
                       for fd in 3 4 5 6; do
                         [ -e /proc/$$/fd/$fd ] && echo "$fd=$(readlink /proc/$$/fd/$fd)"
                       done; true"#,
                ])
                .env("X", "y")
                .listener(&a)
                .unwrap()
                .listener(&b)
                .unwrap()
                .fd_names(&["one", "two"])
                .fd(&extra, 6)
                .unwrap(),
        );
        let mut lines = out.lines();
        let first = lines.next().unwrap();
        // sh's $$ is the pid that execve kept: the one LISTEN_PID names.
        let pid = first
            .strip_prefix("pid=")
            .and_then(|r| r.split(' ').next())
            .unwrap();
        assert_eq!(first, format!("pid={pid} fds=2 names=one:two x=y"), "{out}");
        let rest: Vec<&str> = lines.collect();
        assert_eq!(rest.len(), 3, "fds 3, 4 and 6 only: {out}");
        assert!(rest[0].starts_with("3=socket:["), "{out}");
        assert!(rest[1].starts_with("4=socket:["), "{out}");
        assert!(rest[2].starts_with("6=socket:["), "{out}");
    }

    #[test]
    fn listen_pid_is_the_child_pid() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let mut child = Activated::new("/bin/sh")
            .args(["-c", "echo $LISTEN_PID"])
            .listener(&l)
            .unwrap()
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child.wait().unwrap();
        assert_eq!(out.trim(), pid.to_string());
    }

    #[test]
    fn a_missing_program_exits_127_saying_why() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let out = Activated::new("/nonexistent/usbwire-no-such-program")
            .listener(&l)
            .unwrap()
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|c| c.wait_with_output());
        let o = out.expect("spawn succeeds; the exec in the child fails");
        assert_eq!(o.status.code(), Some(127));
        assert_eq!(
            String::from_utf8_lossy(&o.stderr),
            "activation: execve failed\n"
        );
    }

    #[test]
    fn a_target_among_the_listeners_or_a_name_count_mismatch_is_refused() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = Activated::new("/bin/true")
            .listener(&l)
            .unwrap()
            .fd(&l, 3)
            .unwrap()
            .spawn()
            .unwrap_err();
        assert!(e.to_string().contains("fd 3 for the child is taken"), "{e}");
        let e = Activated::new("/bin/true")
            .listener(&l)
            .unwrap()
            .fd_names(&["a", "b"])
            .spawn()
            .unwrap_err();
        assert_eq!(e.to_string(), "2 LISTEN_FDNAMES for 1 listeners");
        let e = Activated::new("/bin/true")
            .env("LISTEN_PID", "1")
            .spawn()
            .unwrap_err();
        assert_eq!(e.to_string(), "LISTEN_PID is set by the activation itself");
    }

    #[test]
    fn decimal() {
        let mut b = [0xffu8; 21];
        // SAFETY: b has 21 bytes.
        unsafe { write_decimal(0, b.as_mut_ptr(), b.len()) };
        assert_eq!(&b[..2], b"0\0");
        unsafe { write_decimal(u64::MAX, b.as_mut_ptr(), b.len()) };
        assert_eq!(&b[..], b"18446744073709551615\0");
        unsafe { write_decimal(4_194_304, b.as_mut_ptr(), b.len()) };
        assert_eq!(&b[..8], b"4194304\0");
    }
}
