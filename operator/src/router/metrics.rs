//! Routing and report-stream metrics. Labels have bounded values: transport, gRPC code,
//! region (the regions of the published pools, or of the operator's own credentials), and
//! the refusal reasons below.

use prometheus::core::Collector as _;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The transports Route is served on.
pub const TRANSPORTS: &[&str] = &["grpc", "grpc_web", "json"];
/// The result codes Route answers with.
pub const CODES: &[&str] = &[
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "UNAVAILABLE",
    "INTERNAL",
];

/// Why a report stream, or a report on it, was refused.
pub const REPORT_REFUSALS: &[&str] = &[
    // No `authorization: Bearer <credential>` although the operator has a report key.
    "missing_credential",
    // Not shaped like a credential (e.g. the old shared secret).
    "malformed_credential",
    // Not minted with the operator's key.
    "bad_credential",
    // A report about another reflector than the one the stream speaks for.
    "other_reflector",
    // A report with another region than the one assigned to the reflector.
    "wrong_region",
    // A region no published pool has (streams without credentials only).
    "unknown_region",
    // No report within the grace period: the stream was closed.
    "silent",
];

/// Routing metrics.
#[derive(Clone, Debug)]
pub struct RouterMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    reservations: IntGaugeVec,
    shard_opens: IntCounterVec,
    streams: IntGaugeVec,
    /// Report streams that ended.
    pub stream_disconnects: IntCounter,
    report_refusals: IntCounterVec,
    moves: IntCounterVec,
    moves_in_flight: prometheus::IntGauge,
    /// Routes waiting for a shard now.
    pub(crate) waiting_routes: prometheus::IntGauge,
    route_retries: IntCounterVec,
}

/// Why a waiting Route tried again (`refleet_router_route_retries_total{cause}`): a change
/// of its session (a report of a reflector hosting one of its shards, a move that ended),
/// a change of the whole fleet (a plan published, a new leader catching up), or time.
pub const RETRY_CAUSES: &[&str] = &["session", "fleet", "tick"];

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

/// A counter by `label`, registered in `registry` with a series at 0 for each of `values`
/// (so they exist before the first event).
fn counter_by(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let c = register(
        registry,
        IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
    );
    for v in values {
        c.with_label_values(&[v]);
    }
    c
}

impl RouterMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let requests = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "refleet_router_requests_total",
                    "Route calls by transport and result code.",
                ),
                &["transport", "code"],
            )
            .expect("valid metric"),
        );
        for t in TRANSPORTS {
            for c in CODES {
                requests.with_label_values(&[t, c]);
            }
        }
        let duration = register(
            registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "refleet_router_request_duration_seconds",
                    "Time to answer a Route call, by transport (waits for a starting shard included).",
                )
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
                &["transport"],
            )
            .expect("valid metric"),
        );
        for t in TRANSPORTS {
            duration.with_label_values(&[t]);
        }
        Self {
            requests,
            duration,
            reservations: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "refleet_router_reservations",
                        "Places handed out by Route that have not yet joined or expired, by region.",
                    ),
                    &["region"],
                )
                .expect("valid metric"),
            ),
            shard_opens: register(
                registry,
                IntCounterVec::new(
                    Opts::new("refleet_router_shard_opens_total", "Shards the router opened at once for waiting clients, by region."),
                    &["region"],
                )
                .expect("valid metric"),
            ),
            streams: register(
                registry,
                IntGaugeVec::new(
                    Opts::new("refleet_report_streams", "Reflectors with an open report stream, by region."),
                    &["region"],
                )
                .expect("valid metric"),
            ),
            stream_disconnects: register(
                registry,
                IntCounter::new("refleet_report_stream_disconnects_total", "Report streams that ended.")
                    .expect("valid metric"),
            ),
            report_refusals: counter_by(
                registry,
                "refleet_report_refusals_total",
                "Report streams refused or closed by the operator, by reason.",
                "reason",
                REPORT_REFUSALS,
            ),
            moves: counter_by(
                registry,
                "refleet_router_moves_total",
                "Shard moves that ended, by outcome: landed (on its target), failed (the \
                 source could not store it; it stays), timed_out (no outcome in time; it \
                 stays), aborted (the planner called it off).",
                "outcome",
                super::moves::MOVE_OUTCOMES,
            ),
            moves_in_flight: register(
                registry,
                prometheus::IntGauge::new(
                    "refleet_router_moves_in_flight",
                    "Shard moves asked for or waiting for their target, with no outcome yet.",
                )
                .expect("valid metric"),
            ),
            waiting_routes: register(
                registry,
                prometheus::IntGauge::new(
                    "refleet_router_waiting_routes",
                    "Route calls waiting for a shard that is opening.",
                )
                .expect("valid metric"),
            ),
            route_retries: counter_by(
                registry,
                "refleet_router_route_retries_total",
                "Attempts of waiting Route calls after their first, by what woke them: session, fleet or tick.",
                "cause",
                RETRY_CAUSES,
            ),
        }
    }

    /// Counts one more attempt of a waiting Route; `cause` is one of [`RETRY_CAUSES`].
    pub(crate) fn route_retried(&self, cause: &'static str) {
        debug_assert!(RETRY_CAUSES.contains(&cause), "{cause}");
        self.route_retries.with_label_values(&[cause]).inc();
    }

    /// Routes waiting for a shard now.
    pub fn waiting_routes(&self) -> i64 {
        self.waiting_routes.get()
    }

    /// Attempts of waiting Routes woken by `cause` so far.
    pub fn route_retries(&self, cause: &str) -> u64 {
        self.route_retries.with_label_values(&[cause]).get()
    }

    pub(crate) fn move_ended(&self, outcome: &'static str) {
        debug_assert!(super::moves::MOVE_OUTCOMES.contains(&outcome), "{outcome}");
        self.moves.with_label_values(&[outcome]).inc();
    }

    /// Moves that ended with `outcome` so far.
    pub fn moves_ended(&self, outcome: &str) -> u64 {
        self.moves.with_label_values(&[outcome]).get()
    }

    pub(crate) fn set_moves_in_flight(&self, n: usize) {
        self.moves_in_flight
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one refused report stream; `reason` is one of [`REPORT_REFUSALS`].
    pub(crate) fn report_refused(&self, reason: &'static str) {
        debug_assert!(REPORT_REFUSALS.contains(&reason), "{reason}");
        self.report_refusals.with_label_values(&[reason]).inc();
    }

    /// Report streams refused for `reason` so far.
    pub fn report_refusals(&self, reason: &str) -> u64 {
        self.report_refusals.with_label_values(&[reason]).get()
    }

    /// The report-stream gauge of `region` now.
    pub fn report_streams(&self, region: &str) -> i64 {
        self.streams.with_label_values(&[region]).get()
    }

    /// The reservation gauge of `region` now.
    pub fn reservations(&self, region: &str) -> i64 {
        self.reservations.with_label_values(&[region]).get()
    }

    /// Creates the per-region series at 0 (so they exist before the first event).
    pub fn init_regions<'a>(&self, regions: impl IntoIterator<Item = &'a str>) {
        for r in regions {
            self.reservations.with_label_values(&[r]);
            self.shard_opens.with_label_values(&[r]);
            self.streams.with_label_values(&[r]);
        }
    }

    /// Route calls answered so far, on every transport and with every code (the fleet
    /// view's Route rate).
    pub fn routes_total(&self) -> u64 {
        self.requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Counts one Route call.
    pub fn request(&self, transport: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[transport, code]).inc();
        self.timer(transport).observe(seconds);
    }

    fn timer(&self, transport: &str) -> Histogram {
        self.duration.with_label_values(&[transport])
    }

    pub(crate) fn reserved(&self, region: &str) {
        self.reservations.with_label_values(&[region]).inc();
    }

    pub(crate) fn shard_opened(&self, region: &str) {
        self.shard_opens.with_label_values(&[region]).inc();
    }

    pub(crate) fn reset_reservations(&self) {
        zero(&self.reservations);
    }

    /// Sets the reservation gauge from the ledger.
    pub fn set_reservations(&self, by_region: &std::collections::BTreeMap<String, u64>) {
        self.reset_reservations();
        for (r, n) in by_region {
            self.reservations
                .with_label_values(&[r])
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    /// Sets the open-stream gauge.
    pub fn set_streams(&self, by_region: &std::collections::BTreeMap<String, u32>) {
        zero(&self.streams);
        for (r, n) in by_region {
            self.streams.with_label_values(&[r]).set(i64::from(*n));
        }
    }
}

/// Sets every series of a single-label gauge to 0 (values are then set from a full count).
fn zero(gauge: &IntGaugeVec) {
    for m in gauge.collect().iter().flat_map(|f| f.get_metric()) {
        if let Some(l) = m.get_label().first() {
            gauge.with_label_values(&[l.value()]).set(0);
        }
    }
}
