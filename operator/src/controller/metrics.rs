//! The operator's Prometheus metrics. Labels are bounded by construction: controller and
//! error labels are `&'static str`, decision kinds a fixed set, and pool / region / session
//! labels are bounded by the ReflectorPool and Session objects (series of a deleted Session
//! are removed on the next sync of its pool).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::planner::{Decision, Plan};

/// Every metric of the operator, registered in its own [`Registry`].
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    decisions: IntCounterVec,
    shards: IntGaugeVec,
    reflectors: IntGaugeVec,
    session_shards: IntGaugeVec,
    session_users: IntGaugeVec,
    leader: IntGauge,
    /// Per pool: the (namespace, session) label pairs set by its last sync.
    session_series: Mutex<HashMap<String, BTreeSet<(String, String)>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Registration only fails for duplicate names, which `new` never produces.
    let _ = r.register(Box::new(m.clone()));
    m
}

impl Metrics {
    /// Creates and registers every metric.
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "refleet_build_info",
                    "Build information of the operator; always 1.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Self {
            reconciles: counter(
                "refleet_operator_reconciles_total",
                "Reconciliations started, by controller.",
                &["controller"],
            ),
            failures: counter(
                "refleet_operator_reconcile_errors_total",
                "Reconciliations that failed, by controller and error kind.",
                &["controller", "error"],
            ),
            duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "refleet_operator_reconcile_duration_seconds",
                        "Time one reconciliation took, by controller.",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ]),
                    &["controller"],
                )
                .expect("valid metric"),
            ),
            decisions: counter(
                "refleet_operator_planner_decisions_total",
                "Decisions of the planner that the operator applied, by kind.",
                &["kind"],
            ),
            shards: gauge(
                "refleet_operator_shards",
                "Shards of a pool, by state.",
                &["namespace", "pool", "state"],
            ),
            reflectors: gauge(
                "refleet_operator_reflectors",
                "Reflector pods of a pool, by region and state.",
                &["namespace", "pool", "region", "state"],
            ),
            session_shards: gauge(
                "refleet_operator_session_shards",
                "Open shards of a Session (all its session names, for a pattern).",
                &["namespace", "session"],
            ),
            session_users: gauge(
                "refleet_operator_session_users",
                "Connected users over the shards of a Session.",
                &["namespace", "session"],
            ),
            leader: reg(
                &r,
                IntGauge::new(
                    "refleet_operator_leader",
                    "1 while this operator instance holds the leader Lease, else 0.",
                )
                .expect("valid metric"),
            ),
            session_series: Mutex::default(),
            registry: r,
        }
    }

    /// Counts the start of a reconciliation and returns a timer that records its duration
    /// when dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> prometheus::HistogramTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        self.duration.with_label_values(&[controller]).start_timer()
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, controller: &'static str, error: &'static str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Sets whether this instance leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records a pool's plan: decisions by kind, shards by state, reflectors by region and
    /// state (as the plan counts them: to-create ones count as starting).
    pub fn record_plan(&self, namespace: &str, pool: &str, plan: &Plan) {
        for d in &plan.decisions {
            self.decisions.with_label_values(&[decision_kind(d)]).inc();
        }
        for state in ["Pending", "Open", "Full", "Closing"] {
            let n = plan
                .shards
                .iter()
                .filter(|s| format!("{:?}", s.phase) == state)
                .count();
            self.shards
                .with_label_values(&[namespace, pool, state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for region in &plan.regions {
            let counts = [
                i64::from(region.starting) + i64::from(region.create),
                i64::from(region.ready),
                i64::from(region.draining),
            ];
            for (state, n) in ["starting", "ready", "draining"].iter().zip(counts) {
                self.reflectors
                    .with_label_values(&[namespace, pool, &region.region, state])
                    .set(n);
            }
        }
    }

    /// Sets the per-Session gauges of the Sessions of one pool and removes the series of
    /// Sessions of that pool that are gone.
    pub fn record_sessions(&self, pool_key: &str, sessions: &[(String, String, u32, u64)]) {
        let now: BTreeSet<(String, String)> = sessions
            .iter()
            .map(|(ns, name, _, _)| (ns.clone(), name.clone()))
            .collect();
        for (ns, name, shards, users) in sessions {
            self.session_shards
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(i64::from(*shards));
            self.session_users
                .with_label_values(&[ns.as_str(), name.as_str()])
                .set(i64::try_from(*users).unwrap_or(i64::MAX));
        }
        let mut series = match self.session_series.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let before = series
            .insert(pool_key.to_owned(), now.clone())
            .unwrap_or_default();
        for (ns, name) in before.difference(&now) {
            let _ = self
                .session_shards
                .remove_label_values(&[ns.as_str(), name.as_str()]);
            let _ = self
                .session_users
                .remove_label_values(&[ns.as_str(), name.as_str()]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The bounded `kind` label of a decision.
pub fn decision_kind(d: &Decision) -> &'static str {
    match d {
        Decision::OpenShard { .. } => "open_shard",
        Decision::CloseShard { .. } => "close_shard",
        Decision::RemoveShard { .. } => "remove_shard",
        Decision::ScaleUp { .. } => "scale_up",
        Decision::ScaleHeld { .. } => "scale_held",
        Decision::DrainReflector { .. } => "drain_reflector",
        Decision::RemoveReflector { .. } => "remove_reflector",
        Decision::SessionDegraded { .. } => "session_degraded",
    }
}
