//! CPU time and memory of a process, read from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use std::time::Instant;

use serde::Serialize;

/// Linux reports `utime`/`stime` in USER_HZ, which is 100 on every architecture's ABI.
const USER_HZ: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// User plus system CPU seconds, all threads.
    pub cpu_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
}

/// A process to read: `self` or a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    /// The bench itself.
    Own,
    /// Another process.
    Pid(u32),
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Own => "/proc/self".to_string(),
            Proc::Pid(p) => format!("/proc/{p}"),
        }
    }

    /// Reads the process now; `None` when it is gone or `/proc` is unreadable.
    pub fn sample(self) -> Option<Sample> {
        let dir = self.dir();
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        Some(Sample {
            at: Instant::now(),
            cpu_s: cpu_seconds(&stat)?,
            rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
            hwm_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        })
    }
}

/// utime + stime from a `stat` line (fields 14 and 15, counted after the `(comm)`).
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut f = after.split_ascii_whitespace();
    // After the comm, field 3 (state) is the first; utime is field 14.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// A `Key:   123 kB` line of `status`.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What a process did between two samples.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// CPU seconds used.
    pub cpu_s: f64,
    /// CPU use as a fraction of one core.
    pub cores: f64,
    /// RSS at the start, KiB.
    pub rss_start_kib: u64,
    /// RSS at the end, KiB.
    pub rss_end_kib: u64,
    /// Peak RSS of the process so far, KiB.
    pub hwm_kib: u64,
}

impl Usage {
    /// The difference between two samples of one process.
    pub fn between(a: &Sample, b: &Sample) -> Usage {
        let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
        let wall = b.at.duration_since(a.at).as_secs_f64();
        Usage {
            cpu_s,
            cores: if wall > 0.0 { cpu_s / wall } else { 0.0 },
            rss_start_kib: a.rss_kib,
            rss_end_kib: b.rss_kib,
            hwm_kib: b.hwm_kib,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_and_status_lines_are_read() {
        let stat =
            "1234 (refleet reflec) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 1 2 3";
        assert_eq!(cpu_seconds(stat), Some(3.25));
        let status = "Name:\tx\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1024));
        assert_eq!(status_kib(status, "VmHWM:"), Some(2048));
    }

    #[test]
    fn this_process_can_be_read() {
        let s = Proc::Own.sample().unwrap();
        assert!(s.rss_kib > 0);
    }
}
