//! The files endpoint's Prometheus metrics. The reflector registers them in its own registry
//! (they keep their `refleet_reflector_` names, which dashboards and alerts use); `refleet up`
//! keeps them unexported.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// Counters and gauges of one files endpoint.
#[derive(Debug, Clone)]
pub struct FilesMetrics {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    /// Uploads being read now.
    pub uploads_in_progress: IntGauge,
}

impl FilesMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Self {
        Self {
            requests: counter_vec(
                registry,
                "refleet_reflector_files_requests_total",
                "Requests to the files endpoint, by method and status class.",
                &[
                    &["GET", "HEAD", "PUT", "OPTIONS", "other"],
                    &["2xx", "3xx", "4xx", "5xx"],
                ],
                &["method", "status"],
            ),
            bytes: counter_vec(
                registry,
                "refleet_reflector_files_bytes_total",
                "Bytes moved by the files endpoint (in: uploads, out: downloads).",
                &[&["in", "out"]],
                &["direction"],
            ),
            uploads_in_progress: gauge(
                registry,
                "refleet_reflector_uploads_in_progress",
                "Uploads to the files endpoint being read now (capped by --max-uploads).",
            ),
        }
    }

    /// Metrics that no registry exports (`refleet up`, tests).
    pub fn unexported() -> Self {
        Self::register(&Registry::new())
    }

    /// Counts a files request.
    pub fn request(&self, method: &str, status: u16) {
        let method = match method {
            "GET" | "HEAD" | "PUT" | "OPTIONS" => method,
            _ => "other",
        };
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.with_label_values(&[method, class]).inc();
    }

    /// Counts bytes through the files endpoint.
    pub fn bytes(&self, upload: bool, n: u64) {
        self.bytes
            .with_label_values(&[if upload { "in" } else { "out" }])
            .inc_by(n);
    }
}

/// An integer gauge registered in `registry`.
pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric name");
    g
}

/// A counter vector registered in `registry`, with every combination of `labels` (one list
/// of values per label in `names`) created at 0, so each series exists before its first event.
pub fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&[&str]],
    names: &[&str],
) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), names).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    let mut combos: Vec<Vec<&str>> = vec![vec![]];
    for values in labels {
        combos = combos
            .iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut next = prefix.clone();
                    next.push(v);
                    next
                })
            })
            .collect();
    }
    for combo in combos {
        c.with_label_values(&combo);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_exists_at_zero_and_unknown_methods_share_one() {
        let registry = Registry::new();
        let m = FilesMetrics::register(&registry);
        m.request("PATCH", 405);
        m.bytes(true, 7);
        let families = registry.gather();
        let requests = families
            .iter()
            .find(|f| f.name() == "refleet_reflector_files_requests_total")
            .expect("registered");
        assert_eq!(requests.get_metric().len(), 5 * 4);
        let bytes = families
            .iter()
            .find(|f| f.name() == "refleet_reflector_files_bytes_total")
            .expect("registered");
        let total: f64 = bytes
            .get_metric()
            .iter()
            .map(|m| m.get_counter().get_value())
            .sum();
        assert_eq!(total, 7.0);
    }
}
