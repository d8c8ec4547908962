//! A hiccup meter, after jHiccup: one thread per CPU asks to sleep 1 ms,
//! again and again, and records how late it wakes up. It does no work, so
//! when it wakes 10 ms late the CPU was taken from every thread on it (the
//! hypervisor running another guest, the kernel busy elsewhere). A request
//! that took 10 ms in the same interval tells nothing about the server
//! that answered it; one that took 10 ms while the meter saw nothing
//! above 1 ms does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys;

const PERIOD: Duration = Duration::from_millis(1);

pub struct Hiccups {
    stop: Arc<AtomicBool>,
    /// Largest lateness since the last reset, ns, one per CPU.
    worst: Vec<Arc<AtomicU64>>,
    /// Every meter thread runs real-time.
    realtime: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Hiccups {
    /// One meter thread pinned to each online CPU, real-time where allowed
    /// so that its own wait for a busy CPU does not count. A CPU that
    /// refuses the pin still gets its thread, unpinned: it then measures
    /// the machine as a whole.
    pub fn start() -> Hiccups {
        let stop = Arc::new(AtomicBool::new(false));
        let realtime = Arc::new(AtomicBool::new(true));
        let mut worst = Vec::new();
        let mut threads = Vec::new();
        for cpu in 0..sys::online_cpus() {
            let w = Arc::new(AtomicU64::new(0));
            let (stop2, w2, rt2) = (stop.clone(), w.clone(), realtime.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("hiccup-{cpu}"))
                .spawn(move || {
                    let _ = sys::pin_thread(0, cpu);
                    rt2.fetch_and(sys::realtime_thread().is_ok(), Ordering::Relaxed);
                    meter(&stop2, &w2, std::thread::sleep);
                });
            if let Ok(h) = spawned {
                worst.push(w);
                threads.push(h);
            }
        }
        Hiccups {
            stop,
            worst,
            realtime,
            threads,
        }
    }

    /// Whether the meter threads run real-time. When they cannot (not
    /// root), they also measure how long an ordinary thread waits for a
    /// busy CPU, which inflates the figure.
    pub fn realtime(&self) -> bool {
        self.realtime.load(Ordering::Relaxed)
    }

    /// Starts a new interval.
    pub fn reset(&self) {
        for w in &self.worst {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// The longest any meter thread woke late since the last reset, µs
    /// (None when no meter thread runs).
    pub fn worst_us(&self) -> Option<f64> {
        self.worst
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .max()
            .map(|ns| ns as f64 / 1e3)
    }
}

/// Sleeps `PERIOD` until `stop`, keeping in `worst` the longest it woke
/// late (ns). The sleep is a parameter so that tests can be late on cue.
fn meter(stop: &AtomicBool, worst: &AtomicU64, sleep: impl Fn(Duration)) {
    // Bounded by the stop flag, which Drop sets.
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        sleep(PERIOD);
        let late = t.elapsed().saturating_sub(PERIOD).as_nanos() as u64;
        worst.fetch_max(late, Ordering::Relaxed);
    }
}

impl Drop for Hiccups {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn keeps_the_longest_lateness_and_stops_when_told() {
        let stop = AtomicBool::new(false);
        let worst = AtomicU64::new(0);
        let calls = AtomicUsize::new(0);
        meter(&stop, &worst, |d| {
            // The third sleep is 12 ms late, the fifth 4 ms; the tenth is
            // the last (bounded).
            let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
            let extra = match n {
                3 => Duration::from_millis(12),
                5 => Duration::from_millis(4),
                _ => Duration::ZERO,
            };
            std::thread::sleep(d + extra);
            if n == 10 {
                stop.store(true, Ordering::Relaxed);
            }
        });
        assert_eq!(calls.load(Ordering::Relaxed), 10);
        let late = Duration::from_nanos(worst.load(Ordering::Relaxed));
        assert!(late >= Duration::from_millis(12), "recorded {late:?}");
    }

    #[test]
    fn one_meter_per_cpu_and_reset_starts_over() {
        let h = Hiccups::start();
        assert_eq!(h.worst.len(), sys::online_cpus());
        for w in &h.worst {
            w.store(50_000_000_000, Ordering::Relaxed);
        }
        assert_eq!(h.worst_us(), Some(50_000_000.0));
        h.reset();
        // A meter thread may have woken late since, but not by 50 s.
        assert!(h.worst_us().unwrap() < 50_000_000.0);
        drop(h);
    }
}
