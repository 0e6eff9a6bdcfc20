//! The observe → plan → act loop of the local backend.
//!
//! Each [`Fleet::tick`] asks the [`Launcher`] what every reflector is doing (starting,
//! running with its `/sessions`, exited), turns that and the config into a [`PlanInput`](refleet_core::planner::PlanInput)
//! (load per shard comes from the sessions' JOIN names, `<appId>/<shard>`), runs the pure
//! [`plan`], and carries the plan out: starts the reflectors a region should add, drains
//! (SIGTERM) those the planner drains, forgets those that exited. The plan's shards and
//! scaling history are kept for the next tick, exactly as the kube controllers keep them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::config::{LocalPool, LocalSession};
use super::launcher::{Launcher, Observed, ReportedSession, StartRequest};
use super::usage;
use crate::fleet;
use crate::metrics::OperatorMetrics;
use crate::metrics::POOL_CONTROLLER;
use crate::router::Router;
pub use crate::view::status::{
    DecisionView, GatewayView, ReflectorView, RegionView, ShardView, Status,
};
use refleet_core::planner::{
    Decision, ReflectorAction, ReflectorState, RegionPlan, ScaleHistory, Seconds, ShardRecord, plan,
};

/// How many recent decisions the status keeps.
const RECENT_DECISIONS: usize = 50;
/// How long after its drain deadline a reflector that has not exited is killed.
const KILL_AFTER_DEADLINE: Seconds = 10;

/// A pool as the local backend runs it.
#[derive(Clone, Debug)]
pub struct PoolRuntime {
    /// The pool from the config.
    pub pool: LocalPool,
    /// Storage shared by its reflectors (`--storage`).
    pub storage: String,
    /// Its stable files base URL (`--files-url`).
    pub files_url: String,
}

/// One reflector the fleet started.
#[derive(Clone, Debug)]
struct Reflector {
    pool: String,
    region: String,
    image: String,
    state: ReflectorState,
    url: Option<String>,
    sessions: Vec<ReportedSession>,
    drain_deadline: Option<Seconds>,
}

/// The local fleet: config, reflectors, the planner's carried state.
pub struct Fleet<L> {
    launcher: L,
    pools: Vec<PoolRuntime>,
    sessions: Vec<LocalSession>,
    reflectors: BTreeMap<String, Reflector>,
    shards: Vec<ShardRecord>,
    history: ScaleHistory,
    regions: Vec<RegionPlan>,
    started: BTreeMap<String, u32>,
    decisions: VecDeque<DecisionView>,
    router: Option<Arc<Router>>,
    metrics: Arc<OperatorMetrics>,
    /// Region → the URL of its gateway, for pools whose gateway is on.
    gateways: BTreeMap<String, String>,
    /// The last CPU and memory reading of each reflector with a process.
    usage: BTreeMap<String, Sampled>,
}

/// A reflector's last [`usage::Usage`] reading, when, and the CPU use since the one before.
#[derive(Clone, Copy, Debug)]
struct Sampled {
    now: usage::Usage,
    at: std::time::Instant,
    cpu_percent: Option<f64>,
}

impl<L: Launcher> Fleet<L> {
    /// A fleet with no reflectors yet; the first [`Fleet::tick`] starts them.
    pub fn new(launcher: L, pools: Vec<PoolRuntime>, sessions: Vec<LocalSession>) -> Self {
        let metrics = Arc::new(OperatorMetrics::new());
        Self {
            launcher,
            pools,
            sessions,
            reflectors: BTreeMap::new(),
            shards: Vec::new(),
            history: ScaleHistory::new(),
            regions: Vec::new(),
            started: BTreeMap::new(),
            decisions: VecDeque::new(),
            router: None,
            metrics: metrics.clone(),
            gateways: BTreeMap::new(),
            usage: BTreeMap::new(),
        }
        .with_metrics(metrics)
    }

    /// Records the operator's metrics into `metrics` (what `/metrics` serves): the local
    /// fleet is its one leader, each tick is a reconciliation of every pool.
    pub fn with_metrics(mut self, metrics: Arc<OperatorMetrics>) -> Self {
        metrics.set_leader(true);
        for rt in &self.pools {
            metrics.record_pool_limits(&rt.pool.namespace, &rt.pool.name, &rt.pool.spec);
        }
        self.metrics = metrics;
        self
    }

    /// The metrics this fleet records.
    pub fn metrics(&self) -> &Arc<OperatorMetrics> {
        &self.metrics
    }

    /// Routes clients with `router`: each tick adds its reservations and the shards it
    /// opened to the plan's input and publishes the result to it.
    pub fn with_router(mut self, router: Arc<Router>) -> Self {
        router.metrics.init_regions(
            self.pools
                .iter()
                .flat_map(|p| p.pool.spec.regions.iter().map(|r| r.name.as_str())),
        );
        self.router = Some(router);
        self
    }

    /// Has Route answer `gateways` (region → the URL of its gateway) instead of reflector
    /// URLs, and shows them in the status.
    pub fn with_gateways(mut self, gateways: BTreeMap<String, String>) -> Self {
        self.gateways = gateways;
        self
    }

    /// The launcher (tests drive their fake through it).
    pub fn launcher_mut(&mut self) -> &mut L {
        &mut self.launcher
    }

    /// One round: observe, plan, act. `now` is in seconds on any monotonic clock.
    pub async fn tick(&mut self, now: Seconds) -> Vec<Decision> {
        let metrics = self.metrics.clone();
        let _timer = metrics.reconcile_started(POOL_CONTROLLER);
        self.observe(now).await;
        self.read_usage();
        let observed = self.observed();
        let mut input = fleet::plan_input(&observed, &self.shards, &self.history, now);
        if let Some(router) = &self.router {
            router.prepare(&mut input);
        }
        let mut plan = plan(&input);
        // Published before the plan is acted on, as the kube backend does: a reflector it
        // drains takes no new shard from then on, and one a Route opened a shard on while
        // the plan was made is kept.
        if let Some(router) = &self.router {
            let mut view = fleet::fleet_view(&observed, input, &plan);
            view.gateways = self.gateways.clone().into_iter().collect();
            fleet::publish_plan(router, "local", view, &mut plan);
        }
        self.record_metrics(&observed, &plan);
        for rp in &plan.reflectors {
            let Some(r) = self.reflectors.get_mut(&rp.name) else {
                continue;
            };
            match rp.action {
                ReflectorAction::Keep => {}
                ReflectorAction::Drain { deadline } => {
                    if r.state != ReflectorState::Draining {
                        self.launcher.drain(&rp.name);
                        r.state = ReflectorState::Draining;
                        r.drain_deadline = Some(deadline);
                    }
                }
                // Draining and empty: its process exits by itself once its sessions have
                // ended (or is killed after its deadline); it is forgotten when it has.
                ReflectorAction::Remove => {}
            }
        }
        for region in &plan.regions {
            for _ in 0..region.create {
                self.start(&region.pool, &region.region, &region.image);
            }
        }
        for d in &plan.decisions {
            log_decision(d);
            if self.decisions.len() == RECENT_DECISIONS {
                self.decisions.pop_front();
            }
            self.decisions.push_back(DecisionView {
                at: now,
                decision: format!("{d:?}"),
            });
        }
        self.shards = plan.shards;
        self.history = plan.history;
        self.regions = plan.regions;
        plan.decisions
    }

    /// Records one plan in the operator's metrics, pool by pool, as the pool controller does.
    fn record_metrics(&self, observed: &fleet::Observed, plan: &refleet_core::planner::Plan) {
        for rt in &self.pools {
            let id = rt.pool.id();
            self.metrics
                .record_plan(&rt.pool.namespace, &rt.pool.name, plan);
            self.metrics
                .record_sessions(&id, &fleet::session_gauges(observed, &id, &plan.shards));
        }
    }

    /// Drains every reflector, waits for them to exit (at most `timeout`), kills the rest.
    pub async fn shutdown(&mut self, timeout: Duration) {
        for (name, r) in &mut self.reflectors {
            if r.state != ReflectorState::Draining {
                tracing::info!(reflector = %name, "draining reflector for shutdown");
                self.launcher.drain(name);
                r.state = ReflectorState::Draining;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let observed = self.launcher.observe().await;
            let running: Vec<String> = observed
                .iter()
                .filter(|(_, o)| !matches!(o, Observed::Exited { .. }))
                .map(|(n, _)| n.clone())
                .collect();
            for (name, o) in &observed {
                if let Observed::Exited { detail, .. } = o
                    && self.reflectors.remove(name).is_some()
                {
                    tracing::info!(reflector = %name, status = %detail, "reflector stopped");
                }
            }
            if running.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                for name in &running {
                    tracing::warn!(reflector = %name, "reflector still running after the shutdown timeout; killing it");
                    self.launcher.kill(name);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn observe(&mut self, now: Seconds) {
        let observed = self.launcher.observe().await;
        let lost: Vec<String> = self
            .reflectors
            .keys()
            .filter(|n| !observed.contains_key(*n))
            .cloned()
            .collect();
        for name in lost {
            tracing::warn!(reflector = %name, "reflector vanished");
            self.reflectors.remove(&name);
        }
        for (name, o) in observed {
            match o {
                Observed::Exited { success, detail } => {
                    if let Some(r) = self.reflectors.remove(&name) {
                        if r.state == ReflectorState::Draining && success {
                            tracing::info!(reflector = %name, region = %r.region, "reflector drained and exited");
                        } else {
                            tracing::warn!(reflector = %name, region = %r.region, status = %detail, "reflector exited unexpectedly");
                        }
                    }
                    self.launcher.forget(&name);
                }
                Observed::Starting => {}
                Observed::Running { url, sessions } => {
                    let Some(r) = self.reflectors.get_mut(&name) else {
                        continue;
                    };
                    if r.state == ReflectorState::Starting {
                        tracing::info!(reflector = %name, region = %r.region, %url, "reflector ready");
                        r.state = ReflectorState::Ready;
                    }
                    r.url = Some(url);
                    if let Some(sessions) = sessions {
                        r.sessions = sessions;
                    }
                    if r.drain_deadline
                        .is_some_and(|d| now > d.saturating_add(KILL_AFTER_DEADLINE))
                    {
                        tracing::warn!(reflector = %name, "reflector overran its drain deadline; killing it");
                        self.launcher.kill(&name);
                    }
                }
            }
        }
    }

    fn start(&mut self, pool: &str, region: &str, image: &str) {
        let Some(rt) = self.pools.iter().find(|p| p.pool.id() == pool) else {
            return;
        };
        if rt.pool.spec.resolved_region(region).is_none() {
            return;
        }
        let n = self.started.entry(region.to_owned()).or_insert(0);
        *n += 1;
        let name = format!("{region}-{n}");
        let req = StartRequest {
            name: name.clone(),
            region: region.to_owned(),
            storage: rt.storage.clone(),
            files_url: rt.files_url.clone(),
            drain_timeout: Duration::from_secs(u64::from(rt.pool.spec.drain_grace_period_seconds)),
        };
        match self.launcher.start(req) {
            Ok(()) => {
                self.reflectors.insert(
                    name,
                    Reflector {
                        pool: pool.to_owned(),
                        region: region.to_owned(),
                        image: image.to_owned(),
                        state: ReflectorState::Starting,
                        url: None,
                        sessions: Vec::new(),
                        drain_deadline: None,
                    },
                );
            }
            Err(error) => tracing::error!(reflector = %name, %error, "could not start reflector"),
        }
    }

    /// The fleet as the shared [`fleet::Observed`]: the config's pools and Sessions, the
    /// reflectors with the sessions they last reported.
    fn observed(&self) -> fleet::Observed {
        fleet::Observed {
            pools: self
                .pools
                .iter()
                .map(|rt| fleet::ObservedPool {
                    namespace: rt.pool.namespace.clone(),
                    name: rt.pool.name.clone(),
                    spec: rt.pool.spec.clone(),
                    files_url: rt.files_url.clone(),
                })
                .collect(),
            sessions: self
                .sessions
                .iter()
                .map(|s| fleet::ObservedSession {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    spec: s.spec.clone(),
                    deleted: false,
                })
                .collect(),
            reflectors: self
                .reflectors
                .iter()
                .map(|(name, r)| fleet::ObservedHost {
                    name: name.clone(),
                    pool: r.pool.clone(),
                    region: Some(r.region.clone()),
                    image: r.image.clone(),
                    state: Some(r.state),
                    url: r.url.clone(),
                    hosted: Some(
                        r.sessions
                            .iter()
                            .filter_map(|rs| {
                                Some(fleet::HostedShard {
                                    app_id: rs.app_id.clone()?,
                                    name: rs.shard()?.to_owned(),
                                    users: rs.users,
                                })
                            })
                            .collect(),
                    ),
                })
                .collect(),
        }
    }

    /// Every concrete session (see [`fleet::concrete_sessions`]).
    fn concrete_sessions(&self) -> BTreeMap<String, fleet::Concrete> {
        fleet::concrete_sessions(&self.observed(), &self.shards)
    }

    /// Reads every reflector process's CPU and memory (see [`usage`]); forgets those that
    /// have no process any more.
    fn read_usage(&mut self) {
        let at = std::time::Instant::now();
        let mut fresh = BTreeMap::new();
        for name in self.reflectors.keys() {
            let Some(now) = self.launcher.pid(name).and_then(usage::read) else {
                continue;
            };
            let cpu_percent = self.usage.get(name).and_then(|before| {
                usage::cpu_percent((before.now.cpu_seconds, before.at), (now.cpu_seconds, at))
            });
            fresh.insert(
                name.clone(),
                Sampled {
                    now,
                    at,
                    cpu_percent,
                },
            );
        }
        self.usage = fresh;
    }

    /// Sessions with connected users, for the files endpoint's upload check.
    pub fn live_sessions(&self) -> Vec<ReportedSession> {
        self.reflectors
            .values()
            .flat_map(|r| r.sessions.iter())
            .filter(|s| s.users > 0)
            .cloned()
            .collect()
    }

    /// What `/v1/status` shows and the table prints.
    pub fn status(&self) -> Status {
        let concrete = self.concrete_sessions();
        let mut regions: Vec<RegionView> = Vec::new();
        for rt in &self.pools {
            let pool = rt.pool.id();
            for spec in &rt.pool.spec.regions {
                let plan = self
                    .regions
                    .iter()
                    .find(|r| r.pool == pool && r.region == spec.name);
                let reflectors = self
                    .reflectors
                    .iter()
                    .filter(|(_, r)| r.pool == pool && r.region == spec.name)
                    .map(|(name, r)| ReflectorView {
                        name: name.clone(),
                        state: crate::view::status::state_name(r.state),
                        pid: self.launcher.pid(name),
                        cpu_percent: self.usage.get(name).and_then(|u| u.cpu_percent),
                        rss_bytes: self.usage.get(name).map(|u| u.now.rss_bytes),
                        url: r.url.clone(),
                        files_url: rt.files_url.clone(),
                        users: r.sessions.iter().map(|s| s.users).sum(),
                        shards: self
                            .shards
                            .iter()
                            .filter(|s| s.reflector.as_deref() == Some(name.as_str()))
                            .map(|s| s.name.clone())
                            .collect(),
                    })
                    .collect();
                regions.push(RegionView {
                    pool: pool.clone(),
                    name: spec.name.clone(),
                    desired: plan.map_or(0, |p| p.desired),
                    reflectors,
                });
            }
        }
        let shards = self
            .shards
            .iter()
            .map(|sh| {
                let (namespace, session, app_id, max_users, threshold) = concrete
                    .get(&sh.session)
                    .map(|c| {
                        let s = &self.sessions[c.session];
                        (
                            s.namespace.clone(),
                            s.name.clone(),
                            s.spec.app_id.clone(),
                            s.spec.max_users_per_shard,
                            s.spec.scale_up_threshold,
                        )
                    })
                    .unwrap_or_default();
                let reflector = sh.reflector.as_ref().and_then(|n| self.reflectors.get(n));
                ShardView {
                    namespace,
                    session,
                    app_id,
                    session_name: concrete
                        .get(&sh.session)
                        .map(|c| c.name.clone())
                        .unwrap_or_default(),
                    name: sh.name.clone(),
                    index: sh.index,
                    region: sh.region.clone(),
                    reflector: sh.reflector.clone(),
                    url: reflector.and_then(|r| r.url.clone()),
                    files_url: self
                        .pools
                        .iter()
                        .find(|p| p.pool.id() == sh.pool)
                        .map(|p| p.files_url.clone()),
                    users: sh.users,
                    max_users,
                    threshold_users: crate::view::status::threshold_users(max_users, threshold),
                    phase: sh.phase,
                }
            })
            .collect();
        Status {
            files_url: self.pools.first().map(|p| p.files_url.clone()),
            gateways: self
                .gateways
                .iter()
                .map(|(region, url)| GatewayView {
                    region: region.clone(),
                    url: url.clone(),
                })
                .collect(),
            regions,
            shards,
            decisions: self.decisions.iter().cloned().collect(),
        }
    }
}

fn log_decision(d: &Decision) {
    for s in fleet::summarize(d) {
        let about = match &s.about {
            fleet::About::Session(key) => format!("session {key}"),
            fleet::About::Pool(id) => format!("pool {id}"),
            fleet::About::Reflector(name) => format!("reflector {name}"),
        };
        match s.level {
            fleet::Level::Routine => tracing::debug!(%about, reason = s.reason, "{}", s.note),
            fleet::Level::Normal => tracing::info!(%about, reason = s.reason, "{}", s.note),
            fleet::Level::Warning => tracing::warn!(%about, reason = s.reason, "{}", s.note),
        }
    }
}
