//! Latency histograms, error tallies and process readings.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 µs .. 10 min, 3 significant figures.
#[derive(Debug, Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records one duration (clamped to the bounds).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.clamp(1, 600_000_000));
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// How many were recorded.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The percentiles, in milliseconds.
    pub fn summary(&self) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |p: f64| ms(self.0.value_at_quantile(p));
        Summary {
            count: self.0.len(),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(self.0.max()),
            mean_ms: self.0.mean() / 1000.0,
        }
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms (n = {})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// The gRPC code name of a status, as the router's metrics spell it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Failed calls per gRPC code, with the first message seen for each.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Errors {
    /// Count per code name.
    pub by_code: BTreeMap<String, u64>,
    /// First message per code name.
    pub first_message: BTreeMap<String, String>,
}

impl Errors {
    /// Counts one failed call.
    pub fn add(&mut self, status: &tonic::Status) {
        let code = code_name(status.code()).to_owned();
        *self.by_code.entry(code.clone()).or_insert(0) += 1;
        self.first_message
            .entry(code)
            .or_insert_with(|| status.message().to_owned());
    }

    /// Adds another tally.
    pub fn merge(&mut self, other: &Errors) {
        for (k, v) in &other.by_code {
            *self.by_code.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &other.first_message {
            self.first_message
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
    }

    /// All failed calls.
    pub fn total(&self) -> u64 {
        self.by_code.values().sum()
    }
}

impl std::fmt::Display for Errors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.by_code.is_empty() {
            return write!(f, "none");
        }
        let mut first = true;
        for (code, n) in &self.by_code {
            if !first {
                write!(f, ", ")?;
            }
            first = false;
            write!(f, "{code} × {n}")?;
            if let Some(m) = self.first_message.get(code) {
                write!(f, " ({m:?})")?;
            }
        }
        Ok(())
    }
}

/// User + system CPU seconds of a process (`None`: `self`), all threads.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_owned(),
        |p| format!("/proc/{p}/stat"),
    );
    // The reflector load generator's parser of `stat` lines.
    refleet_bench::procstat::cpu_seconds(&std::fs::read_to_string(path).ok()?)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds a process used over a span, and as cores.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Cpu {
    /// CPU seconds.
    pub cpu_s: f64,
    /// Average cores busy.
    pub cores: f64,
}

/// Reads CPU of a process at the start of a span.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: Option<u32>,
    start: Option<f64>,
    at: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring `pid` (`None`: this process).
    pub fn start(pid: Option<u32>) -> Self {
        Self {
            pid,
            start: cpu_seconds(pid),
            at: std::time::Instant::now(),
        }
    }

    /// CPU used since the start (`None` when unreadable).
    pub fn stop(&self) -> Option<Cpu> {
        let cpu_s = cpu_seconds(self.pid)? - self.start?;
        let secs = self.at.elapsed().as_secs_f64();
        Some(Cpu {
            cpu_s,
            cores: if secs > 0.0 { cpu_s / secs } else { 0.0 },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn percentiles_and_errors() {
        let mut l = Latency::new();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.01, "{s:?}");
        let mut e = Errors::default();
        e.add(&tonic::Status::resource_exhausted("full"));
        e.add(&tonic::Status::resource_exhausted("full again"));
        e.add(&tonic::Status::not_found("no"));
        assert_eq!(e.total(), 3);
        assert_eq!(e.by_code["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(e.first_message["RESOURCE_EXHAUSTED"], "full");
        assert!(e.to_string().contains("NOT_FOUND × 1"));
    }

    #[test]
    fn cpu_from_stat() {
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0";
        assert_eq!(refleet_bench::procstat::cpu_seconds(stat), Some(3.0));
    }
}
