//! The synthetic users. Each region has its own arrival rate on a diurnal curve compressed to
//! `--day` (regions are spread evenly around the day, so the world total stays level while
//! each region rises and falls); a flash crowd sends `--flash-users` into one big session at
//! once. A user calls Route for real (gRPC, `refleet.routing.v1.Routing/Route`, with the
//! app's API key), "joins" the shard Route answered on the reflector it named (after a short
//! connect delay, presenting the join token), stays for an exponentially distributed time and
//! leaves. A user whose reflector goes away reconnects through Route, as a client does.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use refleet_api::routing::RouteRequest;
use refleet_api::routing::routing_client::RoutingClient;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::cluster::{ARENA_APP, ROOMS_APP, region};
use crate::fleet::{Fleet, JoinError, lock};

/// How the users behave.
#[derive(Debug, Clone)]
pub struct Model {
    pub namespace: String,
    pub regions: usize,
    /// Concurrent users aimed at (arrivals = users / stay, Little's law).
    pub users: u64,
    pub stay: Duration,
    pub ramp: Duration,
    pub day: Duration,
    pub diurnal_amplitude: f64,
    pub rooms: usize,
    pub zipf: f64,
    pub arenas: usize,
    pub arena_share: f64,
    pub abandon: f64,
    pub flash_at: Option<Duration>,
    pub flash_users: u64,
    pub flash_over: Duration,
    pub seed: u64,
}

/// Route calls against the operators: whichever answers (only the leader routes). Each
/// operator is reached over several HTTP/2 connections, as the Routes of many app backends
/// would be: one connection carrying every user's Route (up to thousands waiting for a new
/// shard at once) is a client no deployment has, and the server's guard against floods of
/// cancelled streams ends such a connection with every call on it.
pub struct Router {
    /// Per operator address, its connections.
    clients: Vec<Vec<RoutingClient<Channel>>>,
    hint: std::sync::atomic::AtomicUsize,
    /// Round-robin over each operator's connections.
    next: std::sync::atomic::AtomicUsize,
}

/// The API key of `app`'s backend (the router maps each key to one appId).
pub fn api_key(app: &str) -> String {
    format!("{app}-backend-key")
}

impl Router {
    /// `connections` HTTP/2 connections to each of `addrs` (at least one).
    pub fn new(addrs: &[String], connections: usize) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for a in addrs {
            let endpoint = tonic::transport::Endpoint::from_shared(a.clone())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .tcp_nodelay(true);
            // One Endpoint connected lazily `connections` times: each its own connection.
            let conns = (0..connections.max(1))
                .map(|_| RoutingClient::new(endpoint.connect_lazy()))
                .collect();
            clients.push(conns);
        }
        Ok(Self {
            clients,
            hint: std::sync::atomic::AtomicUsize::new(0),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// ListShards of `session` from whichever operator answers.
    pub async fn list_shards(
        &self,
        namespace: &str,
        session: &str,
    ) -> Option<Vec<refleet_api::routing::ShardInfo>> {
        for c in self.clients.iter().filter_map(|conns| conns.first()) {
            let mut c = c.clone();
            let req = refleet_api::routing::ListShardsRequest {
                namespace: namespace.to_owned(),
                session: session.to_owned(),
            };
            let mut request = tonic::Request::new(req);
            let key = api_key(ARENA_APP).parse().ok()?;
            request.metadata_mut().insert("x-api-key", key);
            if let Ok(r) = c.list_shards(request).await {
                return Some(r.into_inner().shards);
            }
        }
        None
    }

    /// One Route on the next connection in turn; an UNAVAILABLE answer (not the leader, or
    /// down) moves the hint on.
    pub async fn route(
        &self,
        app: &str,
        req: RouteRequest,
    ) -> Result<refleet_api::routing::RouteResponse, tonic::Status> {
        let conn = self.next.fetch_add(1, Ordering::Relaxed);
        self.route_via(conn, app, req).await
    }

    /// One Route on each operator's connection `conn` (modulo their number).
    pub async fn route_via(
        &self,
        conn: usize,
        app: &str,
        req: RouteRequest,
    ) -> Result<refleet_api::routing::RouteResponse, tonic::Status> {
        let key: tonic::metadata::MetadataValue<_> = api_key(app)
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("API key is not header text"))?;
        // A replica that is not the leader answers UNAVAILABLE at once; the next one is tried
        // in the same call, as the Service in front of the router would only reach the leader.
        let mut last = tonic::Status::unavailable("no operator");
        for _ in 0..self.clients.len() {
            let raw = self.hint.load(Ordering::Relaxed);
            let conns = &self.clients[raw % self.clients.len()];
            let mut client = conns[conn % conns.len()].clone();
            let mut request = tonic::Request::new(req.clone());
            request.metadata_mut().insert("x-api-key", key.clone());
            match client.route(request).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    // Compared with the raw value read, so only one failed call moves it on.
                    let _ = self.hint.compare_exchange(
                        raw,
                        raw.wrapping_add(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

/// Latency histogram, µs.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// How many of the slowest warm overflow Routes the summary lists.
const SLOWEST_KEPT: usize = 10;

/// One Route kept for the summary's list of the slowest.
struct SlowRoute {
    sent: Instant,
    us: u64,
    shard: String,
}

/// Keeps the [`SLOWEST_KEPT`] slowest of `kept` and `r`.
fn keep_slowest(kept: &mut Vec<SlowRoute>, r: SlowRoute) {
    kept.push(r);
    kept.sort_by_key(|r| std::cmp::Reverse(r.us));
    kept.truncate(SLOWEST_KEPT);
}

/// A slow Route in the summary: when it was sent (seconds into the run), how long it took,
/// and the shard it got.
#[derive(Debug, Clone, Serialize)]
pub struct SlowRouteSummary {
    pub sent_at_s: f64,
    pub ms: f64,
    pub shard: String,
}

/// What the users counted.
pub struct UserStats {
    pub route: Mutex<Histogram<u64>>,
    /// Routes answered with an overflow shard (`<name>~N`) that first appeared while the call
    /// was in flight: the wait of a user who found every shard at its threshold.
    pub overflow: Mutex<Histogram<u64>>,
    /// `overflow` in three parts: the new shard went to a reflector that was already up
    /// when the call was sent (a warm reflector) before any injected failure; the same after
    /// one (the new leader's warm-up, a lost region); or it waited for a new reflector pod.
    pub overflow_warm: Mutex<Histogram<u64>>,
    pub overflow_after_failure: Mutex<Histogram<u64>>,
    pub overflow_new_reflector: Mutex<Histogram<u64>>,
    /// The slowest warm overflow Routes (at most [`SLOWEST_KEPT`]), to tell when and where
    /// the tail of `overflow_warm` came from.
    slowest_warm: Mutex<Vec<SlowRoute>>,
    /// When the first injected failure (leader kill, region down, apiserver restart) began.
    pub disturbed_at: Mutex<Option<Instant>>,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub arrivals: AtomicU64,
    pub routes_ok: AtomicU64,
    pub routes_failed: AtomicU64,
    pub gave_up: AtomicU64,
    /// Users whose Routes were refused (RESOURCE_EXHAUSTED: no room) more than once: a
    /// client that retries once must not be turned away again.
    pub refused_more_than_once: AtomicU64,
    /// The most refusals one user got.
    pub most_refusals: AtomicU32,
    /// Users refused more than once only because the Session was at its `maxShards`: the
    /// limit its owner set, so not counted in `refused_more_than_once`.
    pub refused_at_max_shards: AtomicU64,
    pub abandoned: AtomicU64,
    pub reconnects: AtomicU64,
    pub active: AtomicI64,
    /// Routes by (user's region, answered region), counted from `since_mark`.
    pub regions: Mutex<BTreeMap<(String, String), u64>>,
    /// Per session: each shard's first answer time.
    shards: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Last successful Route, for the failover gap.
    pub last_ok: Mutex<Option<Instant>>,
    /// Longest time between two successful Routes (while users kept calling).
    pub longest_gap: Mutex<Duration>,
}

impl Default for UserStats {
    fn default() -> Self {
        Self {
            route: Mutex::new(histogram()),
            overflow: Mutex::new(histogram()),
            overflow_warm: Mutex::new(histogram()),
            overflow_after_failure: Mutex::new(histogram()),
            overflow_new_reflector: Mutex::new(histogram()),
            slowest_warm: Mutex::default(),
            disturbed_at: Mutex::default(),
            errors: Mutex::default(),
            arrivals: AtomicU64::default(),
            routes_ok: AtomicU64::default(),
            routes_failed: AtomicU64::default(),
            gave_up: AtomicU64::default(),
            refused_more_than_once: AtomicU64::default(),
            most_refusals: AtomicU32::default(),
            refused_at_max_shards: AtomicU64::default(),
            abandoned: AtomicU64::default(),
            reconnects: AtomicU64::default(),
            active: AtomicI64::default(),
            regions: Mutex::default(),
            shards: Mutex::default(),
            last_ok: Mutex::default(),
            longest_gap: Mutex::default(),
        }
    }
}

impl UserStats {
    /// Marks the start of an injected failure (only the first one counts).
    pub fn disturbed(&self) {
        lock(&self.disturbed_at).get_or_insert_with(Instant::now);
    }

    /// Shards seen so far, and how many of them are overflow shards (`~N`).
    pub fn shard_counts(&self) -> (u64, u64) {
        let shards = lock(&self.shards);
        let all: u64 = shards.values().map(|m| m.len() as u64).sum();
        let overflow: u64 = shards
            .values()
            .flat_map(|m| m.keys())
            .filter(|s| s.contains('~'))
            .count() as u64;
        (all, overflow)
    }

    pub fn sessions_seen(&self) -> u64 {
        lock(&self.shards).len() as u64
    }

    /// `warm`: the reflector Route named was up before the call was sent.
    fn record_ok(&self, session: &str, shard: &str, warm: bool, sent: Instant, now: Instant) {
        let us = (now - sent).as_micros() as u64;
        let _ = lock(&self.route).record(us.max(1));
        let first = {
            let mut shards = lock(&self.shards);
            *shards
                .entry(session.to_owned())
                .or_default()
                .entry(shard.to_owned())
                .or_insert(now)
        };
        if shard.contains('~') && first >= sent {
            let _ = lock(&self.overflow).record(us.max(1));
            let disturbed = lock(&self.disturbed_at).is_some_and(|t| sent >= t);
            let part = match (warm, disturbed) {
                (false, _) => &self.overflow_new_reflector,
                (true, false) => &self.overflow_warm,
                (true, true) => &self.overflow_after_failure,
            };
            let _ = lock(part).record(us.max(1));
            if warm && !disturbed {
                keep_slowest(
                    &mut lock(&self.slowest_warm),
                    SlowRoute {
                        sent,
                        us,
                        shard: shard.to_owned(),
                    },
                );
            }
        }
        self.routes_ok.fetch_add(1, Ordering::Relaxed);
        let mut last = lock(&self.last_ok);
        if let Some(prev) = *last {
            let gap = now.saturating_duration_since(prev);
            let mut longest = lock(&self.longest_gap);
            if gap > *longest {
                *longest = gap;
            }
        }
        *last = Some(now);
    }
}

/// Zipf-distributed room picks: a few busy rooms, a long tail of small ones.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n.max(1))
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(s);
                total
            })
            .collect();
        Self { cumulative }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let x = rng.random::<f64>() * total;
        self.cumulative.partition_point(|c| *c < x)
    }
}

fn exp(rng: &mut SmallRng, mean: Duration) -> Duration {
    let u: f64 = rng.random::<f64>().max(1e-12);
    mean.mul_f64(-u.ln()).min(mean * 20)
}

/// Generates arrivals until `stop`, spawning one task per user.
pub async fn run_arrivals(
    model: Arc<Model>,
    router: Arc<Router>,
    fleet: Arc<Fleet>,
    stats: Arc<UserStats>,
    started: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = SmallRng::seed_from_u64(model.seed);
    let zipf = Arc::new(Zipf::new(model.rooms, model.zipf));
    let tick = Duration::from_millis(20);
    let base = model.users as f64 / model.stay.as_secs_f64();
    let mut owed = vec![0.0f64; model.regions];
    let mut flash_owed = 0.0f64;
    let mut next_id = 0u64;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let t = started.elapsed();
        let dt = tick.as_secs_f64();
        // While ramping up, users arrive fast enough to fill the target in `ramp`.
        let rate = if t < model.ramp {
            model.users as f64 / model.ramp.as_secs_f64().max(1.0)
        } else {
            base
        };
        for (r, owed_r) in owed.iter_mut().enumerate() {
            let phase = t.as_secs_f64() / model.day.as_secs_f64().max(1.0)
                + r as f64 / model.regions as f64;
            let m = 1.0 + model.diurnal_amplitude * (std::f64::consts::TAU * phase).sin();
            *owed_r += rate / model.regions as f64 * m * dt;
            while *owed_r >= 1.0 {
                *owed_r -= 1.0;
                let (session, app) = if rng.random::<f64>() < model.arena_share && model.arenas > 0
                {
                    (
                        format!("arena-{}", rng.random_range(0..model.arenas)),
                        ARENA_APP,
                    )
                } else {
                    (format!("room-{}", zipf.sample(&mut rng)), ROOMS_APP)
                };
                next_id += 1;
                spawn_user(
                    &model, &router, &fleet, &stats, next_id, r, session, app, &mut rng,
                );
            }
        }
        if let Some(at) = model.flash_at
            && t >= at
            && t < at + model.flash_over
        {
            flash_owed += model.flash_users as f64 / model.flash_over.as_secs_f64().max(0.001) * dt;
            while flash_owed >= 1.0 {
                flash_owed -= 1.0;
                next_id += 1;
                let r = rng.random_range(0..model.regions);
                spawn_user(
                    &model,
                    &router,
                    &fleet,
                    &stats,
                    next_id,
                    r,
                    "arena-0".into(),
                    ARENA_APP,
                    &mut rng,
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_user(
    model: &Arc<Model>,
    router: &Arc<Router>,
    fleet: &Arc<Fleet>,
    stats: &Arc<UserStats>,
    id: u64,
    r: usize,
    session: String,
    app: &'static str,
    rng: &mut SmallRng,
) {
    stats.arrivals.fetch_add(1, Ordering::Relaxed);
    let stay = exp(rng, model.stay);
    let abandon = rng.random::<f64>() < model.abandon;
    let connect = Duration::from_millis(rng.random_range(20..200));
    let (model, router, fleet, stats) =
        (model.clone(), router.clone(), fleet.clone(), stats.clone());
    tokio::spawn(async move {
        let user = format!("u{id}");
        let home = region(r);
        let deadline = Instant::now() + stay;
        let mut failures = 0u32;
        // Refusals for lack of room, and those at the Session's own maxShards.
        let mut refusals = 0u32;
        let mut at_max = 0u32;
        let refused = |refusals: u32, at_max: u32| {
            if refusals > 1 {
                stats.refused_more_than_once.fetch_add(1, Ordering::Relaxed);
            } else if refusals + at_max > 1 {
                stats.refused_at_max_shards.fetch_add(1, Ordering::Relaxed);
            }
            stats
                .most_refusals
                .fetch_max(refusals + at_max, Ordering::Relaxed);
        };
        loop {
            if failures >= 8 {
                stats.gave_up.fetch_add(1, Ordering::Relaxed);
                refused(refusals, at_max);
                return;
            }
            let sent = Instant::now();
            // Boxed: the gRPC call's future is large, and a task of each of a million users
            // would otherwise carry its space for the whole stay.
            let answer = Box::pin(router.route(
                app,
                RouteRequest {
                    namespace: model.namespace.clone(),
                    session: session.clone(),
                    preferred_region: home.clone(),
                    user_id: user.clone(),
                },
            ))
            .await;
            let now = Instant::now();
            let resp = match answer {
                Ok(resp) => resp,
                Err(status) => {
                    stats.routes_failed.fetch_add(1, Ordering::Relaxed);
                    // The code and the start of the message (the reason; ids come later).
                    let why: String = status.message().chars().take(48).collect();
                    let key = format!("{:?}: {why}", status.code());
                    *lock(&stats.errors).entry(key).or_default() += 1;
                    failures += 1;
                    if status.code() == tonic::Code::ResourceExhausted {
                        if status.message().contains("maxShards is") {
                            at_max += 1;
                        } else {
                            refusals += 1;
                        }
                    }
                    // Back-off like a client: 100 ms, 200 ms, … up to 3.2 s.
                    tokio::time::sleep(Duration::from_millis(100 << failures.min(5))).await;
                    continue;
                }
            };
            let pod = resp
                .reflector_url
                .strip_prefix("ws://")
                .and_then(|u| u.split('.').next())
                .unwrap_or_default()
                .to_owned();
            let warm = fleet.reflector(&pod).is_some_and(|r| r.started < sent);
            stats.record_ok(&session, &resp.shard, warm, sent, now);
            refused(std::mem::take(&mut refusals), std::mem::take(&mut at_max));
            *lock(&stats.regions)
                .entry((home.clone(), resp.region.clone()))
                .or_default() += 1;
            if abandon {
                // Never joins: the reservation expires at the end of its claim window.
                stats.abandoned.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(connect).await;
            let reflector = match fleet.join(&pod, app, &resp.shard, &resp.join_token) {
                Ok(r) => r,
                Err(JoinError::Lost) => {
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(100 << failures.min(5))).await;
                    continue;
                }
                Err(JoinError::BadToken) => return,
            };
            stats.active.fetch_add(1, Ordering::Relaxed);
            let mut gone = reflector.gone();
            let ended = tokio::select! {
                () = tokio::time::sleep_until(deadline) => false,
                _ = gone.wait_for(|g| *g) => true,
            };
            stats.active.fetch_sub(1, Ordering::Relaxed);
            if !ended {
                fleet.leave(&reflector, app, &resp.shard);
                return;
            }
            // The reflector went away: reconnect through Route if the stay is not over.
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= deadline {
                return;
            }
            failures = 0;
        }
    });
}

/// A summary of the users' side.
#[derive(Debug, Clone, Serialize)]
pub struct UserSummary {
    pub arrivals: u64,
    pub routes_ok: u64,
    pub routes_failed: u64,
    pub gave_up: u64,
    pub refused_more_than_once: u64,
    pub most_refusals: u32,
    pub refused_at_max_shards: u64,
    pub abandoned: u64,
    pub reconnects: u64,
    pub active_now: i64,
    pub route_p50_ms: f64,
    pub route_p99_ms: f64,
    pub route_max_ms: f64,
    pub overflow_routes: u64,
    pub overflow_p50_ms: f64,
    pub overflow_p99_ms: f64,
    pub overflow_max_ms: f64,
    /// Overflow Routes whose new shard went to a reflector already up (warm), sent before
    /// any injected failure.
    pub overflow_warm_routes: u64,
    pub overflow_warm_p50_ms: f64,
    pub overflow_warm_p99_ms: f64,
    /// The same, sent after an injected failure began.
    pub overflow_after_failure_routes: u64,
    pub overflow_after_failure_p50_ms: f64,
    pub overflow_after_failure_p99_ms: f64,
    /// Overflow Routes that waited for a new reflector pod.
    pub overflow_new_reflector_routes: u64,
    pub overflow_new_reflector_p50_ms: f64,
    pub overflow_new_reflector_p99_ms: f64,
    /// The slowest warm overflow Routes, slowest first.
    pub overflow_warm_slowest: Vec<SlowRouteSummary>,
    pub errors: BTreeMap<String, u64>,
    pub sessions_seen: u64,
    pub shards_seen: u64,
    pub overflow_shards_seen: u64,
    pub longest_gap_between_routes_ms: f64,
}

pub fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(q) as f64 / 1000.0
}

impl UserStats {
    /// The counts; times in the run are seconds after `started`.
    pub fn summary(&self, started: Instant) -> UserSummary {
        let route = lock(&self.route);
        let overflow = lock(&self.overflow);
        let warm = lock(&self.overflow_warm);
        let after = lock(&self.overflow_after_failure);
        let cold = lock(&self.overflow_new_reflector);
        let (shards, overflow_shards) = self.shard_counts();
        UserSummary {
            arrivals: self.arrivals.load(Ordering::Relaxed),
            routes_ok: self.routes_ok.load(Ordering::Relaxed),
            routes_failed: self.routes_failed.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
            refused_more_than_once: self.refused_more_than_once.load(Ordering::Relaxed),
            most_refusals: self.most_refusals.load(Ordering::Relaxed),
            refused_at_max_shards: self.refused_at_max_shards.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            active_now: self.active.load(Ordering::Relaxed),
            route_p50_ms: ms(&route, 0.5),
            route_p99_ms: ms(&route, 0.99),
            route_max_ms: route.max() as f64 / 1000.0,
            overflow_routes: overflow.len(),
            overflow_p50_ms: ms(&overflow, 0.5),
            overflow_p99_ms: ms(&overflow, 0.99),
            overflow_max_ms: overflow.max() as f64 / 1000.0,
            overflow_warm_routes: warm.len(),
            overflow_warm_p50_ms: ms(&warm, 0.5),
            overflow_warm_p99_ms: ms(&warm, 0.99),
            overflow_after_failure_routes: after.len(),
            overflow_after_failure_p50_ms: ms(&after, 0.5),
            overflow_after_failure_p99_ms: ms(&after, 0.99),
            overflow_new_reflector_routes: cold.len(),
            overflow_new_reflector_p50_ms: ms(&cold, 0.5),
            overflow_new_reflector_p99_ms: ms(&cold, 0.99),
            overflow_warm_slowest: lock(&self.slowest_warm)
                .iter()
                .map(|r| SlowRouteSummary {
                    sent_at_s: r.sent.saturating_duration_since(started).as_secs_f64(),
                    ms: r.us as f64 / 1000.0,
                    shard: r.shard.clone(),
                })
                .collect(),
            errors: lock(&self.errors).clone(),
            sessions_seen: self.sessions_seen(),
            shards_seen: shards,
            overflow_shards_seen: overflow_shards,
            longest_gap_between_routes_ms: lock(&self.longest_gap).as_secs_f64() * 1000.0,
        }
    }
}

/// What the Route throughput probe measured.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeSummary {
    pub offered_per_s: u64,
    pub achieved_per_s: f64,
    pub calls: u64,
    pub errors: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Route at `rate`/s for `duration` on session `lookup` (open loop, paced every millisecond,
/// at most 256 in flight), cycling through `users` ids: the method of bench/ROUTING.md's
/// sustained-rate runs, here against the leader of a live fleet.
pub async fn probe(
    router: Arc<Router>,
    namespace: String,
    rate: u64,
    duration: Duration,
    users: u64,
) -> ProbeSummary {
    let hist = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let inflight = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            sent += 1;
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break;
            };
            let (router, hist, errors, namespace) = (
                router.clone(),
                hist.clone(),
                errors.clone(),
                namespace.clone(),
            );
            let user = format!("probe-{}", sent % users.max(1));
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                // One connection, as bench/ROUTING.md's floor was measured.
                let r = router
                    .route_via(
                        0,
                        ARENA_APP,
                        RouteRequest {
                            namespace,
                            session: "lookup".into(),
                            preferred_region: String::new(),
                            user_id: user,
                        },
                    )
                    .await;
                let us = t0.elapsed().as_micros() as u64;
                match r {
                    Ok(_) => {
                        let _ = lock(&hist).record(us.max(1));
                    }
                    Err(s) => {
                        let key = format!("{:?}: {}", s.code(), s.message());
                        *lock(&errors).entry(key).or_default() += 1;
                    }
                }
                drop(permit);
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = started.elapsed().as_secs_f64();
    let h = lock(&hist);
    ProbeSummary {
        offered_per_s: rate,
        achieved_per_s: (h.len() as f64 / wall).round(),
        calls: sent,
        errors: lock(&errors).clone(),
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
        max_ms: h.max() as f64 / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_slowest_keeps_the_slowest_ten_slowest_first() {
        let t = Instant::now();
        let mut kept = Vec::new();
        for us in [5, 50, 1, 40, 30, 20, 10, 60, 70, 80, 90, 100, 2] {
            keep_slowest(
                &mut kept,
                SlowRoute {
                    sent: t,
                    us,
                    shard: format!("s~{us}"),
                },
            );
        }
        let us: Vec<u64> = kept.iter().map(|r| r.us).collect();
        assert_eq!(us, [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]);
    }
}
