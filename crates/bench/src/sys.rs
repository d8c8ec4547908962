//! Linux process accounting and CPU pinning: `/proc` readers and
//! `sched_setaffinity`.

use std::fs;
use std::io;

/// CPU time a process has used, two ways: the per-thread scheduler
/// statistics (ns precision, but a thread that exits takes its time with it)
/// and `utime + stime` from `/proc/<pid>/stat` (clock ticks, but it keeps
/// the time of exited threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub sched_ns: u64,
    pub stat_ns: u64,
}

impl CpuSample {
    pub fn take(pid: u32) -> CpuSample {
        CpuSample {
            sched_ns: schedstat_sum(pid).unwrap_or(0),
            stat_ns: stat_ns(pid).unwrap_or(0),
        }
    }

    /// CPU time used between `self` and `later`, in ns: the schedstat
    /// figure, unless a thread exited in between and the tick count says
    /// clearly more (by over two ticks).
    pub fn delta_ns(&self, later: &CpuSample) -> u64 {
        let sched = later.sched_ns.saturating_sub(self.sched_ns);
        let stat = later.stat_ns.saturating_sub(self.stat_ns);
        let tick = 1_000_000_000 / clk_tck();
        if stat > sched + 2 * tick {
            stat
        } else {
            sched
        }
    }
}

pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Sum of the first field (time on CPU, ns) of every thread's schedstat.
fn schedstat_sum(pid: u32) -> io::Result<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let mut path = entry.path();
        path.push("schedstat");
        if let Ok(s) = fs::read_to_string(&path) {
            if let Some(v) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
            {
                total += v;
            }
        }
    }
    Ok(total)
}

/// utime + stime of a whole process, in ns.
fn stat_ns(pid: u32) -> io::Result<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| io::Error::other("bad /proc/pid/stat"))?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (1-based) of stat; `after` starts at field 3.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((utime + stime) * (1_000_000_000 / clk_tck()))
}

/// CPU time of the calling thread, ns.
pub fn thread_cpu_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Resident set size in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Pins one thread (0: the caller) to `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::other(format!("CPU {cpu} out of range")));
    }
    // SAFETY: cpu is in range of the set, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the calling thread real-time (SCHED_FIFO at the lowest
/// priority): it then runs the moment it wakes, ahead of every ordinary
/// thread. Needs root or CAP_SYS_NICE.
pub fn realtime_thread() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: param is a valid sched_param; 0 is the calling thread.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pins every current thread of a process; threads it creates later
/// inherit the mask of their creator.
pub fn pin_process(pid: u32, cpu: usize) -> io::Result<()> {
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        {
            pin_thread(tid, cpu)?;
        }
    }
    Ok(())
}

/// "Intel(R) Xeon(R) Processor, 2 CPUs" or so.
pub fn machine() -> String {
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let n = online_cpus();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{model}, {n} CPUs, Linux {kernel}")
}

/// CPUs online (not only those this process may run on).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 {
        n as usize
    } else {
        1
    }
}

/// Steal time of all CPUs so far, in ms: time the hypervisor ran something
/// else while this VM had work. A latency maximum of several ms in a run
/// with steal time is the host's doing, not the server's.
pub fn steal_ms() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let steal = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    match steal {
        Some(t) if hz > 0 => t * 1000.0 / hz as f64,
        _ => f64::NAN,
    }
}

/// The 1-minute load average: other work on the machine skews everything.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}
