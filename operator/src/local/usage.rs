//! CPU and memory of the reflector children, read from `/proc` (Linux) on each tick of the
//! fleet loop, for the status and the fleet view. Anything unreadable (another OS, a child
//! that just exited) is simply unknown.

use std::time::Instant;

/// One reading of a process.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// CPU time used so far (user + system, every thread), in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
}

/// Reads process `pid` now.
pub fn read(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse(&stat, &status, clock_ticks())
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s CPU times.
fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        // The value on every Linux architecture in use.
        _ => 100.0,
    }
}

/// `stat` and `status` are the texts of `/proc/<pid>/stat` and `/proc/<pid>/status`.
fn parse(stat: &str, status: &str, ticks: f64) -> Option<Usage> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(Usage {
        cpu_seconds: (utime + stime) as f64 / ticks,
        rss_bytes: rss_kb * 1024,
    })
}

/// CPU used between two readings, in percent of one core (whole percents); `None` when
/// no time passed.
pub fn cpu_percent(before: (f64, Instant), after: (f64, Instant)) -> Option<f64> {
    let wall = after.1.checked_duration_since(before.1)?.as_secs_f64();
    (wall > 0.0).then(|| ((after.0 - before.0).max(0.0) / wall * 100.0).round())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn stat_and_status_are_read_past_a_command_name_with_spaces() {
        let stat =
            "4242 (refleet (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        let status = "Name:\trefleet\nVmPeak:\t  99999 kB\nVmRSS:\t   20480 kB\nThreads:\t9\n";
        let u = parse(stat, status, 100.0).unwrap();
        assert_eq!(u.cpu_seconds, 3.0);
        assert_eq!(u.rss_bytes, 20 * 1024 * 1024);
        assert!(parse("garbage", status, 100.0).is_none());
        assert!(
            parse(stat, "Name:\tx\n", 100.0).is_none(),
            "a zombie has no VmRSS"
        );
    }

    #[test]
    fn this_process_is_readable_and_cpu_is_a_share_of_one_core() {
        let me = read(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0);
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(cpu_percent((1.0, t0), (2.0, t1)), Some(50.0));
        assert_eq!(cpu_percent((1.0, t1), (2.0, t0)), None);
    }
}
