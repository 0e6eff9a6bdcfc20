//! # The router: where should this client join this session?
//!
//! ```text
//!  Route ──► Router::route ──► catalog (Session / namePattern) ──► shards of the session
//!                │                                                   │ users (reports) + reservations (ledger)
//!                │                      pick: preferred region, fullest shard below threshold
//!                ├── none below ──► planner::plan_shards(session alone, waiting) ──► new shard at once
//!                │                   (pending ⇒ wake the backend, wait for its reflector)
//!                └── reserve (ledger) + sign a join token ──► answer
//!  backend loop (local fleet / controllers): prepare(input) → plan → publish(fleet view)
//!  report stream: observe_report(..) → users per shard, reservations that turned into users
//!                 (a reflector's load counts until `report_grace` after its last report),
//!                 hand-off outcomes of moves
//!  moves: a published plan's moving shard ──► HandOff on its source's stream ──► outcome
//!         ──► the published view points at the target at once; the next prepare carries it
//! ```
//!
//! The router owns no reflectors: a backend (the local fleet, or the kube controllers)
//! publishes after every plan what exists ([`Router::publish`]), and before every plan
//! adds what the router did since ([`Router::prepare`]: the shards it opened, its
//! reservations, the pattern sessions clients asked for). Between two plans the router
//! opens shards itself by calling the same pure planner on the session concerned alone
//! (`open`), so a burst of clients is never refused for lack of a reconcile.
//!
//! **Who reserves.** A caller with a known API key is its app's; anyone else is an
//! anonymous caller, known by its address ([`client`]). Reservations are released when
//! not used within the claim window (shorter than the token's lifetime), an anonymous
//! caller may hold only a few per session, and anonymous callers together hold at most a
//! share of a session's free places: past it they are still answered, but without a
//! reserved place and never with a new shard, so waves of anonymous Routes can neither
//! lock a session for everyone nor scale it up without end.
//!
//! **After a leader change** the new router cannot know the reservations the old one
//! handed out and that are still in flight (tokens live `token_ttl`). Until one token
//! lifetime has passed since it started (the warm-up), a shard it did not open itself
//! takes new users only once its reflector has reported to it, and then only its margin:
//! the places between its threshold and its hard cap. The old router kept users plus
//! reservations at or below the threshold, so the reported users plus the old tokens still
//! out plus the margin stay within the cap; past the margin new users go to new shards. A
//! small session so keeps its users together across a failover instead of starting a new
//! shard for every newcomer, and the reflector's hard cap refuses whatever a token older
//! than its reservation's claim window brings past it, as at any other time.
//!
//! **Modules.** This one owns the [`Router`] type, its API for backends, report streams and
//! transports, and the lock that makes one Route's decisions atomic. What the router knows
//! is `view` (published [`FleetView`]s with their indexes, reported load and its expiry);
//! what it decides is `route` (the Route policy: shard load, held places, anonymous
//! limits, reserving) and `open` (opening a shard for one session), on [`pick`] (the pure
//! choice among shards) and
//! [`ledger`] (reservations). [`moves`] carries out the planner's moves. [`service`] and
//! [`reports`] are the gRPC/JSON front ends, [`client`] tells callers apart, [`metrics`]
//! counts.

pub mod client;
pub mod ledger;
pub mod listen;
pub mod metrics;
pub mod moves;
mod open;
mod opened;
pub mod pick;
pub mod placement;
pub mod placement_watch;
pub mod reports;
mod route;
pub mod service;
pub mod snapshot;
mod view;
mod waits;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use foldhash::HashSet as FastSet;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use refleet_api::report::{
    Instruction, ReflectorReport, ReflectorState as ReportedState, instruction::Kind,
};
use refleet_api::routing::{RouteRequest, RouteResponse, ShardInfo};
use refleet_api::token::{JoinClaims, Signer};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use self::ledger::{Ledger, Millis};
use self::metrics::RouterMetrics;
use self::moves::{Ended, MoveBook, Outcome};
use self::pick::threshold_load;
pub use self::placement::{Placement, PlacementError};
use self::route::{Attempt, Routed, fill_load, validate};
use self::view::{FleetState, ShardUsers, app_ids};
pub use self::view::{FleetView, SessionDef};
use self::waits::{Waiting, Waits};
use refleet_core::planner::{
    MoveRequest, PlanInput, SessionInput, ShardRecord, session_key, split_session_key,
};

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// How long a join token (and its reservation) is valid.
    pub token_ttl: Duration,
    /// How long a Route waits for a new shard's reflector before RESOURCE_EXHAUSTED.
    pub route_wait: Duration,
    /// How long after its last report a reflector's reported load still counts and it
    /// still gets routes; a stream silent that long is closed. Longer than the reflectors'
    /// report interval (1 s by default).
    pub report_grace: Duration,
    /// Start in the post-failover warm-up (a replica that just became leader).
    pub warm_up: bool,
    /// How long a reservation holds its place when nobody joins with it (capped at
    /// `token_ttl`; the token itself stays valid for `token_ttl`).
    pub claim_window: Duration,
    /// Reservations one anonymous caller may hold per session within their claim window;
    /// 0: no limit.
    pub max_per_client: u32,
    /// The share (0..=1) of a session's free places that anonymous callers may hold
    /// together; past it they are answered without a reserved place. 1: no limit.
    pub anonymous_share: f64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(60),
            route_wait: Duration::from_secs(5),
            report_grace: Duration::from_secs(5),
            warm_up: false,
            claim_window: Duration::from_secs(15),
            max_per_client: 4,
            anonymous_share: 0.5,
        }
    }
}

impl RouterConfig {
    /// How long a reservation holds its place.
    fn claim_ms(&self) -> Millis {
        self.claim_window.min(self.token_ttl).as_millis() as Millis
    }
}

/// Who is calling Route.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// Presented an API key the router knows; the key's appId.
    Keyed(Arc<str>),
    /// No known key: the client's address (IPv6 by /64), through trusted proxies.
    Anonymous(IpAddr),
    /// In-process (the local fleet's own calls, tests): no per-caller limits.
    Internal,
}

/// Why a Route failed. Every transport maps these to its own status.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The proto field name.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No Session covers the name.
    #[error("{0}")]
    NotFound(String),
    /// Nothing has room now.
    #[error("{message}")]
    Exhausted {
        /// Why.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// No or unknown API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The key or origin is not allowed for this app.
    #[error("{0}")]
    PermissionDenied(String),
    /// This replica is not the leader.
    #[error("{0}")]
    Unavailable(String),
}

impl RouteError {
    /// The gRPC code name (metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::Exhausted { .. } => "RESOURCE_EXHAUSTED",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::Unavailable(_) => "UNAVAILABLE",
        }
    }

    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

/// Everything a Route reads and changes, under one lock: a Route must reserve against the
/// load it just counted, or two concurrent Routes could both take a shard's last place.
#[derive(Default)]
struct Inner {
    /// What backends published and reflectors reported.
    fleet: FleetState,
    /// Shards this router opened that no published view holds yet.
    opened: opened::Opened,
    /// Shards this router opened (exempt from the warm-up rule).
    mine: FastSet<(String, String)>,
    /// Pattern sessions clients asked for, not yet holding a shard.
    demanded: BTreeMap<String, SessionInput>,
    ledger: Ledger,
    /// End of the post-failover warm-up (see the module docs).
    warm_until: Millis,
    /// Places inherited shards gave during the warm-up, each at most its margin
    /// ([`route::Inherited`]).
    warm_taken: route::WarmTaken,
    /// When this router took over from another (or restarted), if it did: from then on, an
    /// inherited shard whose reflector has not reported to it yet counts as full, its load
    /// unknown, and for a while no shard opens before every ready reflector has reported
    /// (see [`route`]).
    taken_over: Option<Millis>,
    /// Whether a backend published a view since the takeover: before that, and for one
    /// report grace after the takeover, a Session not found may be one not loaded yet.
    published_since_takeover: bool,
    /// Moves in flight and recently ended.
    moves: MoveBook,
    /// Moves asked for by hand, with when; offered to every plan until one starts the move
    /// or [`MOVE_REQUEST_TTL`] passes.
    move_requests: Vec<(MoveRequest, Millis)>,
}

/// The longest a waiting Route goes without trying again.
const RETRY_TICK: Duration = Duration::from_secs(1);

/// How long a move asked for by hand waits for a plan to start it.
const MOVE_REQUEST_TTL: Millis = 60_000;

/// Where the report stream of one reflector takes instructions.
type InstructionSender = tokio::sync::mpsc::Sender<Result<Instruction, tonic::Status>>;

/// The router. Cheap to share (`Arc`).
pub struct Router {
    inner: Mutex<Inner>,
    config: RouterConfig,
    signer: RwLock<Option<Signer>>,
    started: Instant,
    /// Wall-clock Unix ms at `started`, to turn ledger times into token expiries.
    started_unix_ms: u64,
    /// Ticks when a plan is published or a reflector reports ([`Router::changes`]).
    changed: watch::Sender<u64>,
    /// Ticks when any waiting Route's answer may have changed: a plan published, or a
    /// reflector heard again while a new leader catches up. A report that may free room or
    /// change where a Route may go ([`view::ReportChange::wakes_routes`]) wakes only the
    /// sessions with a shard on its reflector ([`Router::waits`]), and one that only adds
    /// users none: with thousands of reflectors reporting every second, waking every
    /// waiting Route on each report kept the leader busy retrying them (docs/scale.md, runs
    /// E9 and H).
    routable: watch::Sender<u64>,
    /// The Routes waiting for a shard, by session.
    waits: Waits,
    /// Ticks when a shard's placement may have changed ([`placement`]).
    placement: watch::Sender<u64>,
    wake: Notify,
    /// Wakes every backend pacing its next plan (`backend_urgent`): a Route waits for it.
    urgent: Notify,
    /// The open report streams by reflector, each with the id of its stream.
    streams: Mutex<std::collections::HashMap<String, (u64, InstructionSender)>>,
    /// Routing metrics.
    pub metrics: RouterMetrics,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The `(session, name)` of each of `shards`, for membership tests that would otherwise
/// scan them once per shard looked for; empty when not `needed`.
fn shard_ids(shards: &[ShardRecord], needed: bool) -> FastSet<(&str, &str)> {
    if !needed {
        return FastSet::default();
    }
    shards
        .iter()
        .map(|s| (s.session.as_str(), s.name.as_str()))
        .collect()
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Router {
    /// A router; `signer` signs join tokens (`None`: tokens off).
    pub fn new(config: RouterConfig, signer: Option<Signer>, metrics: RouterMetrics) -> Arc<Self> {
        let router = Arc::new(Self {
            inner: Mutex::new(Inner {
                ledger: Ledger::new(rand::random::<u64>() >> 1),
                moves: MoveBook::starting_at(rand::random::<u64>() >> 1),
                ..Inner::default()
            }),
            config,
            signer: RwLock::new(signer),
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            changed: watch::channel(0).0,
            routable: watch::channel(0).0,
            waits: Waits::new(metrics.waiting_routes.clone()),
            placement: watch::channel(0).0,
            wake: Notify::new(),
            urgent: Notify::new(),
            streams: Mutex::default(),
            metrics,
        });
        if router.config.warm_up {
            router.reset();
        }
        router
    }

    /// The settings.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The token signer's public key and id, if tokens are on.
    pub fn signer(&self) -> Option<Signer> {
        self.signer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    /// Forgets every reservation and report and starts the post-failover warm-up: what a
    /// replica does when it becomes leader. Published fleet views stay (the backend
    /// republishes anyway).
    pub fn reset(&self) {
        let now = self.now();
        let mut inner = lock(&self.inner);
        inner.ledger = Ledger::new(rand::random::<u64>() >> 1);
        inner.fleet.forget_reports();
        inner.mine.clear();
        inner.warm_taken.clear();
        inner.opened.clear();
        inner.demanded.clear();
        inner.warm_until = now + self.config.token_ttl.as_millis() as Millis;
        inner.taken_over = Some(now);
        inner.published_since_takeover = false;
        drop(inner);
        self.metrics.reset_reservations();
        tracing::info!(warm_up = ?self.config.token_ttl, "router state reset; shards it did not open count as full until their reflector reports, and until the warm-up ends take no more than their margin (hard cap less threshold)");
    }

    /// Resolves when a route waits for the backend to act (start a reflector).
    pub async fn backend_wanted(&self) {
        self.wake.notified().await;
    }

    /// Resolves at the next moment a Route starts or keeps waiting for the backend (or a
    /// move is asked for): a backend that paces its plans plans at once instead. Unlike
    /// [`Router::backend_wanted`], every caller waiting now is woken and none is woken by
    /// a call made before it waited.
    pub async fn backend_urgent(&self) {
        self.urgent.notified().await;
    }

    /// Tells the backend it is wanted now.
    pub(crate) fn want_backend(&self) {
        self.wake.notify_one();
        self.urgent.notify_waiters();
    }

    // === backend side ===

    /// What every reflector reporting on the stream hosts now, by reflector name: `(appId,
    /// shard, users)` per shard. A backend takes it for reflectors it could not read itself,
    /// so a new leader learns what the fleet hosts as soon as the streams reconnect.
    pub fn reported_hosts(&self) -> HashMap<String, Vec<(String, String, u32)>> {
        let now = self.now();
        let mut inner = lock(&self.inner);
        self.expire_reports(&mut inner.fleet, now);
        inner
            .fleet
            .hosted()
            .map(|(name, shards)| {
                let shards = shards
                    .into_iter()
                    .map(|(app, shard, n)| (app.to_owned(), shard.to_owned(), n))
                    .collect();
                (name.to_owned(), shards)
            })
            .collect()
    }

    /// Adds what the router did since the last plan to `input`: the shards it opened, its
    /// reservations (`reserved`), and the pattern sessions clients asked for (`waiting`).
    pub fn prepare(&self, input: &mut PlanInput) {
        let now = self.now();
        let mut inner = lock(&self.inner);
        inner.ledger.expire(now);
        self.expire_reports(&mut inner.fleet, now);
        let pools: HashSet<&str> = input.pools.iter().map(|p| p.id.as_str()).collect();
        for d in inner.demanded.values() {
            if pools.contains(d.pool.as_str()) && !input.sessions.iter().any(|s| s.key == d.key) {
                input.sessions.push(d.clone());
            }
        }
        let planned = shard_ids(&input.shards, !inner.opened.is_empty());
        let new: Vec<ShardRecord> = inner
            .opened
            .iter()
            .filter(|sh| {
                pools.contains(sh.pool.as_str())
                    && !planned.contains(&(sh.session.as_str(), sh.name.as_str()))
            })
            .cloned()
            .collect();
        input.shards.extend(new);
        for e in inner.moves.expire(now) {
            self.settle_move(&mut inner, e);
        }
        inner.moves.apply(&mut input.shards, input.now);
        inner
            .move_requests
            .retain(|(_, at)| now < at + MOVE_REQUEST_TTL);
        for (req, _) in &inner.move_requests {
            let planned = input
                .shards
                .iter()
                .any(|s| s.session == req.session && s.name == req.shard);
            if planned && !input.move_requests.contains(req) {
                input.move_requests.push(req.clone());
            }
        }
        fill_load(&inner.fleet, &inner.ledger, input, now);
    }

    /// Which of `reflectors` host a shard this router opened that no published plan holds
    /// yet ([`crate::fleet::publish_plan`]).
    pub fn hosting_unplanned(&self, reflectors: &HashSet<&str>) -> HashSet<String> {
        lock(&self.inner)
            .opened
            .iter()
            .filter_map(|sh| sh.reflector.as_deref())
            .filter(|r| reflectors.contains(r))
            .map(str::to_owned)
            .collect()
    }

    /// Takes a backend's view after a plan. `key` names the publisher (`local`, or a pool
    /// id); a later view with the same key replaces it.
    pub fn publish(&self, key: &str, mut fleet: FleetView) {
        let now = self.now();
        let mut inner = lock(&self.inner);
        let pools: Vec<&str> = fleet.input.pools.iter().map(|p| p.id.as_str()).collect();
        for off in inner.moves.track(&pools, &fleet.input.shards, now) {
            tracing::info!(session = %off.session, shard = %off.shard, from = %off.from, to = %off.to, "move called off by the planner");
            self.metrics.move_ended("aborted");
        }
        inner.moves.apply(&mut fleet.input.shards, fleet.input.now);
        // A request is done once a plan started its move.
        inner.move_requests.retain(|(req, _)| {
            !fleet
                .input
                .shards
                .iter()
                .any(|s| s.session == req.session && s.name == req.shard && s.moving_to.is_some())
        });
        self.metrics.set_moves_in_flight(inner.moves.in_flight());
        let Inner {
            opened, demanded, ..
        } = &mut *inner;
        let planned = shard_ids(
            &fleet.input.shards,
            !opened.is_empty() || !demanded.is_empty(),
        );
        opened.retain(|o| !planned.contains(&(o.session.as_str(), o.name.as_str())));
        if !demanded.is_empty() {
            let sessions: FastSet<&str> = planned.iter().map(|(session, _)| *session).collect();
            demanded.retain(|k, _| !sessions.contains(k.as_str()));
        }
        drop(planned);
        inner.fleet.publish(key, fleet);
        inner.published_since_takeover = true;
        drop(inner);
        // Routes only count the gauge up; each plan sets it to what the ledger still holds.
        self.metrics
            .set_reservations(&self.reservations_by_region());
        self.drive_moves();
        self.changed.send_modify(|g| *g += 1);
        self.routable.send_modify(|g| *g += 1);
        self.bump_placement();
    }

    /// Takes one load report of a reflector. The report stream has already checked that it
    /// speaks for this reflector and region; its `public_url` is ignored.
    pub fn observe_report(&self, report: &ReflectorReport) {
        let now = self.now();
        let grace = self.grace();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let mut users = ShardUsers::default();
        for s in report.shards.iter().filter(|s| !s.shard.is_empty()) {
            inner.ledger.joined(
                (&s.app_id, &s.shard),
                &s.admitted_reservations,
                s.joins,
                now,
            );
            // Saturating, as the tally over reflectors is: a report may name a shard twice.
            let n = users
                .entry(s.app_id.clone())
                .or_default()
                .entry(s.shard.clone())
                .or_insert(0);
            *n = n.saturating_add(s.users);
        }
        let change = inner.fleet.observe(
            &report.reflector,
            &report.region,
            report.state == ReportedState::Draining as i32,
            users,
            now,
            grace,
        );
        let mut ended: Vec<Ended> = report
            .hand_offs
            .iter()
            .filter_map(|r| inner.moves.observe(&report.reflector, r))
            .collect();
        ended.extend(inner.moves.expire(now));
        if !ended.is_empty() {
            self.waits.wake(ended.iter().map(|e| e.session.as_str()));
        }
        for e in ended {
            self.settle_move(inner, e);
        }
        // A new leader waits for every ready reflector of a pool before it opens a shard
        // there (`catching_up`): any one heard again may end the wait of any session.
        let wake_all = change.revived && inner.taken_over.is_some_and(|at| now < at + grace);
        if change.wakes_routes() && !wake_all {
            self.waits.wake(
                inner
                    .fleet
                    .shards_on(&report.reflector)
                    .chain(inner.opened.on(&report.reflector))
                    .map(|sh| sh.session.as_str()),
            );
        }
        let unanswered = inner.moves.has_unanswered();
        drop(guard);
        if unanswered {
            self.drive_moves();
        }
        self.changed.send_modify(|g| *g += 1);
        if wake_all {
            self.routable.send_modify(|g| *g += 1);
        }
        if change.revived {
            self.bump_placement();
        }
    }

    // === moves ===

    /// Shows a move that ended in the published view at once: a landed shard on its target,
    /// a failed one open again on its source.
    fn settle_move(&self, inner: &mut Inner, e: Ended) {
        inner.fleet.rewrite_shard(&e.session, &e.shard, |sh| {
            if sh.moving_to.as_deref() == Some(e.to.as_str()) {
                moves::settle(sh, &e.outcome);
            }
        });
        match &e.outcome {
            Outcome::Landed => {
                tracing::info!(session = %e.session, shard = %e.shard, from = %e.from, to = %e.to, "move landed");
            }
            Outcome::Failed(why) => {
                tracing::warn!(session = %e.session, shard = %e.shard, from = %e.from, to = %e.to, error = %why, "move failed: the shard stays on its reflector");
            }
            Outcome::TimedOut => {
                tracing::warn!(session = %e.session, shard = %e.shard, from = %e.from, to = %e.to, "move timed out: the shard stays where the plan has it");
            }
        }
        self.metrics.move_ended(e.outcome.label());
        self.metrics.set_moves_in_flight(inner.moves.in_flight());
        // Gateways answer the shard's new host (or its source again) from now on.
        self.bump_placement();
    }

    fn streams(&self) -> MutexGuard<'_, HashMap<String, (u64, InstructionSender)>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the sources of the moves that are due to hand their shards off.
    fn drive_moves(&self) {
        let streams: HashSet<String> = self.streams().keys().cloned().collect();
        let now = self.now();
        let due = {
            let mut guard = lock(&self.inner);
            let Inner { moves, fleet, .. } = &mut *guard;
            moves.due(
                now,
                |to| fleet.can_take_move(to),
                |from| streams.contains(from),
            )
        };
        if due.is_empty() {
            return;
        }
        let streams = self.streams();
        for moves::Due {
            source,
            target,
            hand_off,
        } in due
        {
            let Some((_, tx)) = streams.get(&source) else {
                continue;
            };
            // The target first: it may have handed this shard off itself not long ago and
            // still refuse its JOINs.
            if let Some((_, target_tx)) = streams.get(&target) {
                let _ = target_tx.try_send(Ok(Instruction {
                    kind: Some(Kind::Accept(refleet_api::report::Accept {
                        app_id: hand_off.app_id.clone(),
                        shard: hand_off.shard.clone(),
                    })),
                }));
            }
            tracing::info!(reflector = %source, target = %target, app = %hand_off.app_id, shard = %hand_off.shard, move_id = hand_off.move_id, "asking for a hand-off");
            // A full queue: the stream is stuck; the move is asked again later.
            let _ = tx.try_send(Ok(Instruction {
                kind: Some(Kind::HandOff(hand_off)),
            }));
        }
    }

    /// A report stream now speaks for `reflector`: instructions for it go to `tx`. Returns
    /// the id to [`Router::detach_stream`] it with.
    pub fn attach_stream(&self, reflector: &str, tx: InstructionSender) -> u64 {
        let id = rand::random::<u64>();
        self.streams().insert(reflector.to_owned(), (id, tx));
        self.drive_moves();
        id
    }

    /// The report stream `id` of `reflector` ended (a newer stream of it stays).
    pub fn detach_stream(&self, reflector: &str, id: u64) {
        let mut streams = self.streams();
        if streams.get(reflector).is_some_and(|(i, _)| *i == id) {
            streams.remove(reflector);
        }
    }

    /// Asks for a move by hand (maintenance): shard `shard` of Session `name` in `namespace`
    /// to reflector `to` (`None`: the planner picks one in its region). The next plans take
    /// it, within the pool's move policy; the answer names the shard's session key.
    pub fn request_move(
        &self,
        namespace: &str,
        name: &str,
        shard: &str,
        to: Option<String>,
    ) -> Result<String, RouteError> {
        let now = self.now();
        let mut inner = lock(&self.inner);
        let (view, at) = inner
            .fleet
            .find_session(namespace, name)
            .ok_or_else(|| RouteError::no_session(namespace, name))?;
        let def = &view.fleet.sessions[at];
        let key = session_key(namespace, &def.spec.app_id, name);
        let Some(sh) = view.session_shards(&key).find(|s| s.name == shard) else {
            return Err(RouteError::NotFound(format!(
                "session {namespace}/{name} has no shard {shard:?}"
            )));
        };
        let pool_moves = view
            .fleet
            .input
            .pools
            .iter()
            .find(|p| p.id == sh.pool)
            .is_some_and(|p| p.moves.enabled);
        if !pool_moves {
            return Err(RouteError::invalid(
                "shard",
                format!("pool {} has moves off (spec.moves.enabled)", sh.pool),
            ));
        }
        if let Some(to) = &to {
            let fits = view
                .reflector(to)
                .is_some_and(|r| r.region == sh.region && r.pool == sh.pool);
            if !fits {
                return Err(RouteError::invalid(
                    "to",
                    format!(
                        "{to:?} is not a reflector of region {} of the shard's pool",
                        sh.region
                    ),
                ));
            }
        }
        let req = MoveRequest {
            session: key.clone(),
            shard: shard.to_owned(),
            to,
        };
        inner
            .move_requests
            .retain(|(r, _)| !(r.session == req.session && r.shard == req.shard));
        inner.move_requests.push((req, now));
        drop(inner);
        // The backend plans again now rather than at its next round.
        self.want_backend();
        Ok(key)
    }

    /// The move of shard `shard` of session `session` the router knows, if any.
    pub fn move_of(&self, session: &str, shard: &str) -> Option<moves::Move> {
        lock(&self.inner).moves.get(session, shard).cloned()
    }

    /// A reflector's report stream ended: once the grace period after its last report has
    /// passed, its load no longer counts and it gets no new routes.
    pub fn report_lost(&self, reflector: &str) {
        lock(&self.inner).fleet.report_lost(reflector);
    }

    /// Whether a published pool has region `region`.
    pub fn knows_region(&self, region: &str) -> bool {
        lock(&self.inner).fleet.knows_region(region)
    }

    /// Drops the load of silent reflectors; their shards' placement changes.
    fn expire_reports(&self, fleet: &mut FleetState, now: Millis) {
        if fleet.expire_reports(now, self.grace()) {
            self.bump_placement();
        }
    }

    fn grace(&self) -> Millis {
        self.config.report_grace.as_millis() as Millis
    }

    /// What a reflector hosting shard `(app, shard)` must enforce, from the shard's Session:
    /// its hard user cap and whether it keeps persistent data. `None` for a shard no
    /// published plan or router-opened shard knows.
    pub fn shard_settings(&self, app: &str, shard: &str) -> Option<(u32, bool)> {
        self.shard_settings_of([(app, shard)]).pop().flatten()
    }

    /// [`Self::shard_settings`] of each `(app, shard)`, under one lock: a report names up to
    /// a reflector's capacity of shards, and a lock per shard was ~100 000 a second at
    /// ~4 000 reflectors, each one contended with Routes (run G4, docs/scale.md).
    pub fn shard_settings_of<'a>(
        &self,
        shards: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Vec<Option<(u32, bool)>> {
        let inner = lock(&self.inner);
        shards
            .into_iter()
            .map(|(app, shard)| {
                let (namespace, _, name) = inner
                    .fleet
                    .shards_named(shard)
                    .chain(inner.opened.named(shard))
                    .filter_map(|s| split_session_key(&s.session))
                    .find(|(_, a, _)| *a == app)?;
                let (view, at) = inner.fleet.find_session(namespace, name)?;
                let spec = &view.fleet.sessions[at].spec;
                Some((spec.max_users_per_shard, spec.persistence))
            })
            .collect()
    }

    /// Reflectors whose report stream is open and not silent, per region.
    pub fn live_streams(&self) -> BTreeMap<String, u32> {
        let now = self.now();
        let mut inner = lock(&self.inner);
        self.expire_reports(&mut inner.fleet, now);
        inner.fleet.live_streams()
    }

    // === Route ===

    /// Routes one in-process client ([`Caller::Internal`]). `authorize` is called with the
    /// Session's appId before anything is reserved (API keys are per app).
    pub async fn route(
        &self,
        req: &RouteRequest,
        authorize: impl Fn(&str) -> Result<(), RouteError>,
    ) -> Result<RouteResponse, RouteError> {
        self.route_as(req, &Caller::Internal, authorize).await
    }

    /// Routes one client for `caller`, whose kind decides the reservation limits.
    pub async fn route_as(
        &self,
        req: &RouteRequest,
        caller: &Caller,
        authorize: impl Fn(&str) -> Result<(), RouteError>,
    ) -> Result<RouteResponse, RouteError> {
        validate(req)?;
        let deadline = Instant::now() + self.config.route_wait;
        let mut changed = self.routable.subscribe();
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            changed.mark_unchanged();
            // Made before the attempt: a wake while it runs is not lost.
            let woken = waiting.as_ref().map(Waiting::notified);
            let session = match self.attempt(req, caller, &authorize)? {
                Attempt::Routed(r) => return Ok(self.answer(*r)),
                Attempt::Wait { session } => session,
            };
            self.want_backend();
            let woken = match woken {
                Some(woken) if waiting.as_ref().is_some_and(|w| w.session() == session) => woken,
                // First wait (or the request now resolves to another session): enter the
                // session's waiting Routes, then try again before waiting.
                other => {
                    drop(other);
                    waiting = Some(self.waits.enter(&session));
                    continue;
                }
            };
            // Tried again when its session or the fleet changes, and at least every
            // RETRY_TICK: some waits end with time alone (a takeover's catch-up, a
            // reservation expiring, a silent reflector's load dropped).
            let until = deadline.min(Instant::now() + RETRY_TICK);
            let cause = tokio::select! {
                () = woken => "session",
                _ = changed.changed() => "fleet",
                () = tokio::time::sleep_until(until) => "tick",
            };
            if cause == "tick" && Instant::now() >= deadline {
                return Err(RouteError::Exhausted {
                    message: format!(
                        "session {:?}: a new shard is starting and was not ready within {:?}",
                        req.session, self.config.route_wait
                    ),
                    retry_after: Duration::from_secs(1),
                });
            }
            self.metrics.route_retried(cause);
        }
    }

    fn answer(&self, r: Routed) -> RouteResponse {
        let expires_unix_ms = self.started_unix_ms + r.token_expires;
        let expires_at = i64::try_from(expires_unix_ms / 1000).unwrap_or(i64::MAX);
        let token: Option<Arc<str>> = match r.token {
            Some(t) => Some(t),
            None => self.signer().map(|s| {
                let t: Arc<str> = s
                    .sign(JoinClaims {
                        app_id: r.app_id.clone(),
                        shard: r.shard.clone(),
                        persistence: r.persistence,
                        expires_at,
                        key_id: String::new(),
                        max_users: r.max_users,
                        reservation_id: r.reservation,
                    })
                    .into();
                // Signed outside the lock (it is the costliest step of a Route); a user's
                // repeated Route gets this token back instead of a new signature.
                if let Some((scope, user)) = &r.user {
                    lock(&self.inner)
                        .ledger
                        .attach_token(scope, user, r.reservation, t.clone());
                }
                t
            }),
        };
        let mut url = r.url;
        if !url.ends_with('/') {
            url.push('/');
        }
        if let Some(t) = &token {
            url.push_str(t);
            url.push('/');
        }
        RouteResponse {
            shard: r.shard,
            reflector_url: url,
            files_url: r.files_url,
            region: r.region,
            join_token: token.as_deref().unwrap_or_default().to_owned(),
            token_expires_at: Some(prost_types::Timestamp {
                seconds: expires_at,
                nanos: 0,
            }),
            app_id: r.app_id,
        }
    }

    /// The shards of a session with their load (ListShards), for an in-process caller.
    pub fn list_shards(
        &self,
        namespace: &str,
        session: &str,
    ) -> Result<Vec<ShardInfo>, RouteError> {
        self.list_shards_as(namespace, session, |_| Ok(()))
    }

    /// [`Router::list_shards`] for a caller that `authorize` (given the Session's appId) must
    /// let read that app's shards, as Route does: one app's API key does not list another's.
    pub fn list_shards_as(
        &self,
        namespace: &str,
        session: &str,
        authorize: impl FnOnce(&str) -> Result<(), RouteError>,
    ) -> Result<Vec<ShardInfo>, RouteError> {
        if namespace.is_empty() {
            return Err(RouteError::invalid("namespace", "required"));
        }
        if session.is_empty() {
            return Err(RouteError::invalid("session", "required"));
        }
        let now = self.now();
        let mut inner = lock(&self.inner);
        self.expire_reports(&mut inner.fleet, now);
        let (view, at) = inner
            .fleet
            .find_session(namespace, session)
            .ok_or_else(|| RouteError::no_session(namespace, session))?;
        let def = &view.fleet.sessions[at];
        let app = def.spec.app_id.as_str();
        authorize(app)?;
        let key = session_key(namespace, app, session);
        let max = def.spec.max_users_per_shard;
        Ok(view
            .session_shards(&key)
            .chain(inner.opened.of_session(&key))
            .map(|s| ShardInfo {
                shard: s.name.clone(),
                region: s.region.clone(),
                reflector: s.reflector.clone().unwrap_or_default(),
                users: inner.fleet.users(app, &s.name).unwrap_or(s.users),
                reserved: inner.ledger.pending(app, &s.name, now),
                max_users: max,
                threshold_users: threshold_load(max, def.spec.scale_up_threshold) as u32,
                state: format!("{:?}", s.phase),
                url: s
                    .reflector
                    .as_ref()
                    .and_then(|r| view.fleet.urls.get(r))
                    .cloned()
                    .unwrap_or_default(),
                files_url: def.files_url.clone(),
            })
            .collect())
    }

    /// Pending reservations per region (for the gauge).
    pub fn reservations_by_region(&self) -> BTreeMap<String, u64> {
        let now = self.now();
        let inner = lock(&self.inner);
        let mut out = BTreeMap::new();
        for view in inner.fleet.published() {
            let apps = app_ids(&view.fleet.input.sessions);
            for sh in view.fleet.input.shards.iter().chain(inner.opened.iter()) {
                if let Some(app) = apps.get(sh.session.as_str()) {
                    let n = inner.ledger.pending(app, &sh.name, now);
                    *out.entry(sh.region.clone()).or_insert(0) += u64::from(n);
                }
            }
        }
        out
    }
}
