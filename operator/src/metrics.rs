//! The operator's Prometheus metrics, shared by the kube backend ([`crate::controller`]) and
//! the local one ([`crate::local`]): both record the same plan, reconcile and gauge series.
//!
//! Labels are bounded by construction: controller and error labels are `&'static str`,
//! decision kinds a fixed set, and pool / region / session labels are bounded by the
//! ReflectorPool and Session objects (series of a deleted Session are removed on the next sync
//! of its pool).
//!
//! Every label set with a fixed set of values (controller, error kind, decision kind, shard
//! state, reflector state, resource) exists at 0 from start-up or from the first sync of its
//! pool, so dashboards and alert rules see a 0 instead of no series. Only the leader records
//! pool and Session gauges; an instance that loses the lead drops them, so summing over all
//! operator instances never counts a pool twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::{Capacity, ReflectorPoolSpec, ShardPhase};
use refleet_core::planner::{Decision, Plan};

/// Name of the ReflectorPool controller (`controller` label), in the kube and local backends.
pub const POOL_CONTROLLER: &str = "reflectorpool";
/// Name of the Session controller (`controller` label).
pub const SESSION_CONTROLLER: &str = "session";

/// The `controller` label values.
pub const CONTROLLERS: &[&str] = &[POOL_CONTROLLER, SESSION_CONTROLLER];

/// The `error` label values of `refleet_operator_reconcile_errors_total`, as
/// the kube backend's `controller::Error::metric_label` names them.
pub const ERROR_KINDS: &[&str] = &[
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "invalid",
    "throttled",
    "server_error",
    "api_error",
    "transport",
    "serialize",
    "credential",
    "cache_closed",
];

/// The `kind` label values of `refleet_operator_planner_decisions_total` ([`decision_kind`]).
pub const DECISION_KINDS: &[&str] = &[
    "open_shard",
    "close_shard",
    "remove_shard",
    "scale_up",
    "scale_held",
    "drain_reflector",
    "remove_reflector",
    "session_degraded",
    "move_shard",
    "move_aborted",
    "move_held",
    "reassign_shard",
];

/// The `state` label values of `refleet_operator_shards`.
pub const SHARD_STATES: &[&str] = &["Pending", "Open", "Full", "Closing", "Moving"];

/// The `state` label values of `refleet_operator_reflectors`.
pub const REFLECTOR_STATES: &[&str] = &["starting", "ready", "draining"];

/// The `resource` label values of the region capacity gauges.
pub const RESOURCES: &[&str] = &["sessions", "users"];

/// Every metric of the operator, registered in its own [`Registry`].
pub struct OperatorMetrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    reconciles: IntCounterVec,
    coalesced: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    decisions: IntCounterVec,
    shards: IntGaugeVec,
    reflectors: IntGaugeVec,
    session_shards: IntGaugeVec,
    session_users: IntGaugeVec,
    leader: IntGauge,
    region_used: IntGaugeVec,
    region_capacity: IntGaugeVec,
    region_limit: IntGaugeVec,
    region_desired: IntGaugeVec,
    region_growth_buffer: IntGaugeVec,
    over_cap: IntGaugeVec,
    /// Per pool: the (namespace, session) label pairs set by its last sync.
    session_series: Mutex<HashMap<String, BTreeSet<(String, String)>>>,
    /// Per (namespace, pool, region): the capacity of one reflector, from
    /// [`OperatorMetrics::record_pool_limits`].
    per_reflector: Mutex<HashMap<(String, String, String), Capacity>>,
}

impl std::fmt::Debug for OperatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorMetrics").finish_non_exhaustive()
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    // Registration only fails for duplicate names, which `new` never produces.
    let _ = r.register(Box::new(m.clone()));
    m
}

impl OperatorMetrics {
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
        let region_gauge = |name: &str, help: &str| {
            gauge(name, help, &["namespace", "pool", "region", "resource"])
        };
        let metrics = Self {
            reconciles: counter(
                "refleet_operator_reconciles_total",
                "Reconciliations started, by controller.",
                &["controller"],
            ),
            coalesced: counter(
                "refleet_operator_syncs_coalesced_total",
                "Reconciliations that left their pool's sync to one already waiting for it, by controller.",
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
                        "Time one reconciliation that synced its pool took (its wait for the pool's lock and pace included), by controller.",
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
            region_used: region_gauge(
                "refleet_operator_region_used",
                "Shards (resource=sessions) and users committed on a region's reflectors, pending shards included.",
            ),
            region_capacity: region_gauge(
                "refleet_operator_region_capacity",
                "What a region's ready reflectors carry: ready reflectors times one reflector's capacity.",
            ),
            region_limit: region_gauge(
                "refleet_operator_region_capacity_limit",
                "What a region carries at most: maxReflectors times one reflector's capacity.",
            ),
            region_desired: gauge(
                "refleet_operator_region_desired_reflectors",
                "Reflectors accepting shards the planner wants in a region: busy, plus those pending shards need, plus the larger of warmBuffer and the growth buffer, within minReflectors and maxReflectors.",
                &["namespace", "pool", "region"],
            ),
            region_growth_buffer: gauge(
                "refleet_operator_region_growth_buffer",
                "Empty reflectors a region keeps for its demand's growth over growthBufferSeconds (0 when off or not growing).",
                &["namespace", "pool", "region"],
            ),
            over_cap: gauge(
                "refleet_operator_shards_over_cap",
                "Shards with more connected users than their session's maxUsersPerShard.",
                &["namespace", "pool", "region"],
            ),
            session_series: Mutex::default(),
            per_reflector: Mutex::default(),
            registry: r,
        };
        for controller in CONTROLLERS {
            metrics.reconciles.with_label_values(&[controller]);
            metrics.coalesced.with_label_values(&[controller]);
            metrics.duration.with_label_values(&[controller]);
            for error in ERROR_KINDS {
                metrics.failures.with_label_values(&[controller, error]);
            }
        }
        for kind in DECISION_KINDS {
            metrics.decisions.with_label_values(&[kind]);
        }
        metrics
    }

    /// Counts the start of a reconciliation and returns a timer that records its duration
    /// when dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> prometheus::HistogramTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        self.duration.with_label_values(&[controller]).start_timer()
    }

    /// Counts a reconciliation that left its sync to one already waiting.
    pub fn sync_coalesced(&self, controller: &'static str) {
        self.coalesced.with_label_values(&[controller]).inc();
    }

    /// Counts a failed reconciliation.
    pub fn reconcile_failed(&self, controller: &'static str, error: &'static str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Sets whether this instance leads. An instance that stops leading drops its pool and
    /// Session gauges (the new leader reports them).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        if !leading {
            for g in [
                &self.shards,
                &self.reflectors,
                &self.session_shards,
                &self.session_users,
                &self.region_used,
                &self.region_capacity,
                &self.region_limit,
                &self.region_desired,
                &self.region_growth_buffer,
                &self.over_cap,
            ] {
                g.reset();
            }
            lock(&self.session_series).clear();
        }
    }

    /// Records the limits of a pool's regions: one reflector's capacity and the capacity at
    /// `maxReflectors` (`refleet_operator_region_capacity_limit`). Call it before
    /// [`OperatorMetrics::record_plan`] so the ready capacity (`refleet_operator_region_capacity`)
    /// can be derived from the plan.
    pub fn record_pool_limits(&self, namespace: &str, pool: &str, spec: &ReflectorPoolSpec) {
        let mut per = lock(&self.per_reflector);
        for region in spec.resolved_regions() {
            let cap = region.capacity;
            let limits = [
                u64::from(region.max_reflectors) * u64::from(cap.sessions),
                u64::from(region.max_reflectors) * u64::from(cap.users),
            ];
            for (resource, n) in RESOURCES.iter().zip(limits) {
                self.region_limit
                    .with_label_values(&[namespace, pool, &region.name, resource])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            per.insert(
                (namespace.to_owned(), pool.to_owned(), region.name.clone()),
                cap,
            );
        }
    }

    /// Records a pool's plan (only the parts of `plan` that belong to pool `namespace/pool`):
    /// decisions by kind, shards by state, reflectors by region and state (as the plan counts
    /// them: to-create ones count as starting), committed and ready capacity by region, and
    /// shards over their cap by region.
    pub fn record_plan(&self, namespace: &str, pool: &str, plan: &Plan) {
        let id = format!("{namespace}/{pool}");
        for d in &plan.decisions {
            self.decisions.with_label_values(&[decision_kind(d)]).inc();
        }
        let shards: Vec<_> = plan.shards.iter().filter(|s| s.pool == id).collect();
        for state in SHARD_STATES {
            let n = shards
                .iter()
                .filter(|s| shard_state(s.phase) == *state)
                .count();
            self.shards
                .with_label_values(&[namespace, pool, state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let per = lock(&self.per_reflector);
        for region in plan.regions.iter().filter(|r| r.pool == id) {
            let counts = [
                i64::from(region.starting) + i64::from(region.create),
                i64::from(region.ready),
                i64::from(region.draining),
            ];
            for (state, n) in REFLECTOR_STATES.iter().zip(counts) {
                self.reflectors
                    .with_label_values(&[namespace, pool, &region.region, state])
                    .set(n);
            }
            let labels = [namespace, pool, region.region.as_str()];
            self.region_desired
                .with_label_values(&labels)
                .set(i64::from(region.desired));
            self.region_growth_buffer
                .with_label_values(&labels)
                .set(i64::from(region.growth_buffer));
            let used = [region.committed_shards, region.committed_users];
            for (resource, n) in RESOURCES.iter().zip(used) {
                self.region_used
                    .with_label_values(&[namespace, pool, &region.region, resource])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            let key = (namespace.to_owned(), pool.to_owned(), region.region.clone());
            if let Some(cap) = per.get(&key) {
                let ready = u64::from(region.ready);
                let capacity = [
                    ready * u64::from(cap.sessions),
                    ready * u64::from(cap.users),
                ];
                for (resource, n) in RESOURCES.iter().zip(capacity) {
                    self.region_capacity
                        .with_label_values(&[namespace, pool, &region.region, resource])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
            let over = shards
                .iter()
                .filter(|s| {
                    s.region == region.region
                        && s.committed_users > 0
                        && s.users > s.committed_users
                })
                .count();
            self.over_cap
                .with_label_values(&[namespace, pool, &region.region])
                .set(i64::try_from(over).unwrap_or(i64::MAX));
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
        let mut series = lock(&self.session_series);
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `state` label of a shard phase.
fn shard_state(phase: ShardPhase) -> &'static str {
    match phase {
        ShardPhase::Pending => "Pending",
        ShardPhase::Open => "Open",
        ShardPhase::Full => "Full",
        ShardPhase::Closing => "Closing",
        ShardPhase::Moving => "Moving",
    }
}

/// The bounded `kind` label of a decision (one of [`DECISION_KINDS`]).
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
        Decision::MoveShard { .. } => "move_shard",
        Decision::MoveAborted { .. } => "move_aborted",
        Decision::MoveHeld { .. } => "move_held",
        Decision::ReassignShard { .. } => "reassign_shard",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use refleet_core::planner::{RegionPlan, ShardRecord};

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    fn shard(pool: &str, region: &str, users: u32, phase: ShardPhase) -> ShardRecord {
        ShardRecord {
            session: "default/app/lobby".into(),
            name: "lobby".into(),
            index: 0,
            pool: pool.into(),
            region: region.into(),
            reflector: Some("r".into()),
            committed_users: 10,
            users,
            reserved: 0,
            phase,
            empty_since: None,
            moving_to: None,
            moved_at: None,
        }
    }

    #[test]
    fn bounded_label_sets_exist_at_zero_from_the_start() {
        let text = OperatorMetrics::new().render();
        for series in [
            r#"refleet_operator_reconciles_total{controller="reflectorpool"}"#,
            r#"refleet_operator_reconciles_total{controller="session"}"#,
            r#"refleet_operator_syncs_coalesced_total{controller="session"}"#,
            r#"refleet_operator_reconcile_errors_total{controller="session",error="conflict"}"#,
            r#"refleet_operator_reconcile_duration_seconds_count{controller="reflectorpool"}"#,
            r#"refleet_operator_planner_decisions_total{kind="open_shard"}"#,
            r#"refleet_operator_planner_decisions_total{kind="session_degraded"}"#,
            "refleet_operator_leader",
        ] {
            assert_eq!(value(&text, series), Some(0.0), "{series} in\n{text}");
        }
    }

    #[test]
    fn a_plan_records_only_its_own_pool_with_capacity_and_over_cap_shards() {
        let m = OperatorMetrics::new();
        let spec: ReflectorPoolSpec = serde_json::from_value(serde_json::json!({
            "defaults": { "image": "i", "capacity": { "sessions": 5, "users": 50 }, "maxReflectors": 4 },
            "regions": [{ "name": "eu" }, { "name": "us", "maxReflectors": 2 }],
            "files": { "publicURL": "https://files.test/" },
            "reflectorURL": { "template": "ws://{pod}.test/" },
        }))
        .unwrap();
        m.record_pool_limits("ns", "p", &spec);
        let region = |pool: &str, region: &str, ready| RegionPlan {
            pool: pool.into(),
            region: region.into(),
            ready,
            committed_shards: 2,
            committed_users: 20,
            ..RegionPlan::default()
        };
        let plan = Plan {
            shards: vec![
                shard("ns/p", "eu", 12, ShardPhase::Full),
                shard("ns/p", "eu", 3, ShardPhase::Open),
                shard("ns/other", "eu", 30, ShardPhase::Full),
            ],
            regions: vec![
                RegionPlan {
                    desired: 7,
                    growth_buffer: 4,
                    ..region("ns/p", "eu", 2)
                },
                region("ns/p", "us", 1),
                region("ns/other", "eu", 9),
            ],
            ..Plan::default()
        };
        m.record_plan("ns", "p", &plan);
        let text = m.render();
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v(r#"refleet_operator_shards{namespace="ns",pool="p",state="Full"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"refleet_operator_shards{namespace="ns",pool="p",state="Pending"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"refleet_operator_reflectors{namespace="ns",pool="p",region="eu",state="ready"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(
                r#"refleet_operator_region_capacity{namespace="ns",pool="p",region="eu",resource="users"}"#
            ),
            Some(100.0)
        );
        assert_eq!(
            v(
                r#"refleet_operator_region_capacity_limit{namespace="ns",pool="p",region="us",resource="sessions"}"#
            ),
            Some(10.0)
        );
        assert_eq!(
            v(
                r#"refleet_operator_region_used{namespace="ns",pool="p",region="eu",resource="users"}"#
            ),
            Some(20.0)
        );
        assert_eq!(
            v(r#"refleet_operator_shards_over_cap{namespace="ns",pool="p",region="eu"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"refleet_operator_shards_over_cap{namespace="ns",pool="p",region="us"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(r#"refleet_operator_region_desired_reflectors{namespace="ns",pool="p",region="eu"}"#),
            Some(7.0)
        );
        assert_eq!(
            v(r#"refleet_operator_region_growth_buffer{namespace="ns",pool="p",region="eu"}"#),
            Some(4.0)
        );
        assert_eq!(
            v(r#"refleet_operator_region_growth_buffer{namespace="ns",pool="p",region="us"}"#),
            Some(0.0)
        );
        assert!(!text.contains(r#"pool="other""#), "{text}");
    }

    #[test]
    fn losing_the_lead_drops_pool_and_session_gauges() {
        let m = OperatorMetrics::new();
        m.set_leader(true);
        m.record_plan(
            "ns",
            "p",
            &Plan {
                shards: vec![shard("ns/p", "eu", 1, ShardPhase::Open)],
                ..Plan::default()
            },
        );
        m.record_sessions("ns/p", &[("ns".into(), "lobby".into(), 1, 1)]);
        assert!(m.render().contains("refleet_operator_session_users{"));
        m.set_leader(false);
        let text = m.render();
        assert!(!text.contains("refleet_operator_session_users{"), "{text}");
        assert!(!text.contains("refleet_operator_shards{"), "{text}");
        assert_eq!(value(&text, "refleet_operator_leader"), Some(0.0));
        // Counters stay.
        assert!(text.contains(r#"refleet_operator_reconciles_total{controller="session"} 0"#));
    }
}
