//! The planner's inputs and outputs: plain data, no kube API types (no `kube` or
//! `k8s_openapi` paths: `tests/layering.rs` checks), no clocks.
//!
//! A few value types ([`Capacity`], [`PlacementStrategy`], [`Reason`], [`ShardPhase`]) are
//! words of the CRDs too: they are defined here, with the serde and JSON-schema derives the
//! CRDs need (their doc comments are the CRD field descriptions), and the operator's `crd`
//! module re-exports them. The dependency goes one way only: this crate names nothing of the
//! operator.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A point in time or a duration, in whole seconds. The caller picks the epoch (the operator
/// uses Unix time); the planner only compares and subtracts.
pub type Seconds = u64;

/// Everything the planner looks at. The caller builds it from the CRDs, the reflectors'
/// reports and the previous [`Plan`] (its `shards` and `history` come back as input).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanInput {
    /// Every ReflectorPool, resolved.
    pub pools: Vec<PoolInput>,
    /// Every concrete session: one per exact-name Session, one per active name of a pattern.
    pub sessions: Vec<SessionInput>,
    /// Every reflector that exists (pods, or child processes of the local backend).
    pub reflectors: Vec<ObservedReflector>,
    /// Every shard the previous plan produced, with the load the reflectors and the router
    /// report now.
    pub shards: Vec<ShardRecord>,
    /// When each region last scaled, from the previous plan.
    pub history: ScaleHistory,
    /// Moves an operator asked for by hand (maintenance), handled before automatic ones.
    pub move_requests: Vec<MoveRequest>,
    /// The current time.
    pub now: Seconds,
}

/// An operator's request to move one shard off its reflector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveRequest {
    /// Key of the shard's session.
    pub session: String,
    /// Shard name.
    pub shard: String,
    /// The reflector to move it to; `None` lets the planner pick one in the shard's region.
    pub to: Option<String>,
}

/// A ReflectorPool as the planner needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolInput {
    /// Unique id of the pool (the operator uses `namespace/name`).
    pub id: String,
    /// Packing (default) or spreading.
    pub placement: PlacementStrategy,
    /// Regions in the pool's order.
    pub regions: Vec<RegionInput>,
    /// `scaleDownCooldownSeconds`: least time between two changes of scaling direction.
    pub cooldown: Seconds,
    /// `drainGracePeriodSeconds`: how long a draining reflector keeps serving.
    pub drain_grace: Seconds,
    /// Whether and how shards move between the pool's reflectors.
    pub moves: MovePolicy,
}

/// How a pool's shards move between its reflectors. A move hands a live shard from one
/// reflector to another in the same region: the source stores the shard and closes its
/// clients, which reconnect through the region's gateway to the target, where the shard
/// resumes. Moves need that stable address, so they are off unless the pool turns them on.
#[derive(Clone, Debug, PartialEq)]
pub struct MovePolicy {
    /// Moves are on: draining reflectors hand their shards over instead of waiting for
    /// them to empty, shards of a lost reflector are reassigned in their region, and a
    /// reflector over `rebalance_above` sheds shards to others.
    pub enabled: bool,
    /// Most moves in flight in the pool at once (requested moves count too).
    pub max_concurrent: u32,
    /// A ready reflector whose connected users exceed this fraction of its user capacity
    /// sheds shards. Values above 1 turn rebalancing off.
    pub rebalance_above: f64,
    /// A rebalancing move only goes to a reflector that stays at or below this fraction of
    /// its user capacity with the shard. Kept well below `rebalance_above` (hysteresis), so
    /// a moved shard never makes its target the next one to shed.
    pub rebalance_target: f64,
    /// A shard that moved is not moved again to rebalance for this long.
    pub cooldown: Seconds,
}

impl Default for MovePolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            max_concurrent: 4,
            rebalance_above: 0.9,
            rebalance_target: 0.7,
            cooldown: 300,
        }
    }
}

/// One region of a pool, after overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionInput {
    /// Region name.
    pub name: String,
    /// The image new reflectors get; reflectors running another image are drained.
    pub image: String,
    /// Capacity of a new reflector.
    pub capacity: Capacity,
    /// Fewest reflectors accepting shards.
    pub min_reflectors: u32,
    /// Most reflectors accepting shards.
    pub max_reflectors: u32,
    /// Empty reflectors kept on top of demand.
    pub warm_buffer: u32,
    /// Also keep as many empty reflectors as the region's demand grew over this many
    /// seconds (the larger of the two buffers applies); 0 turns it off.
    pub growth_buffer_seconds: u32,
}

/// The sharding policy of a Session.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPolicy {
    /// Hard user cap of a shard, and what it commits on its reflector.
    pub max_users_per_shard: u32,
    /// Fraction of the cap at which a shard stops taking new users.
    pub scale_up_threshold: f64,
    /// Shards kept open even when empty.
    pub min_shards: u32,
    /// Most shards.
    pub max_shards: u32,
    /// Allowed regions in preference order (empty: the pool's regions in its order).
    pub regions: Vec<String>,
    /// How long a shard must be empty before it closes.
    pub close_idle_after: Seconds,
}

impl Default for ShardPolicy {
    fn default() -> Self {
        Self {
            max_users_per_shard: 100,
            scale_up_threshold: 0.8,
            min_shards: 1,
            max_shards: 10,
            regions: Vec::new(),
            close_idle_after: 60,
        }
    }
}

/// One concrete session (a Croquet session name) and its policy.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInput {
    /// Unique key of the session (the operator uses `namespace/appId/name`).
    pub key: String,
    /// The Croquet session name; shard N is named from it.
    pub name: String,
    /// Id of the pool serving it.
    pub pool: String,
    /// Its sharding policy.
    pub policy: ShardPolicy,
    /// The Session was deleted: stop routing to it and let its shards empty.
    pub deleted: bool,
    /// A client is waiting for a route (set by the router). A session with `minShards: 0`
    /// and no shard opens one only then; otherwise a shard opens when all are at threshold.
    pub waiting: bool,
}

/// Planner key of session `name` of `app_id` in `namespace`.
pub fn session_key(namespace: &str, app_id: &str, name: &str) -> String {
    format!("{namespace}/{app_id}/{name}")
}

/// The parts of a [`session_key`]: `(namespace, appId, name)`.
pub fn split_session_key(key: &str) -> Option<(&str, &str, &str)> {
    let mut parts = key.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// Lifecycle of a reflector as observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReflectorState {
    /// Created, not ready yet (its capacity counts, shards wait for it).
    Starting,
    /// Ready: takes new shards if its image is current.
    Ready,
    /// Draining: takes no new shards, removed once it hosts none.
    Draining,
}

/// A reflector as observed (pod status plus its report).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedReflector {
    /// Unique name (the operator uses `namespace/pod`).
    pub name: String,
    /// Id of its pool.
    pub pool: String,
    /// Its region.
    pub region: String,
    /// The image it runs.
    pub image: String,
    /// What it can carry.
    pub capacity: Capacity,
    /// Its state.
    pub state: ReflectorState,
    /// Ready or draining, but what it hosts is not known: no report of its load reached
    /// this operator lately (after a restart or a new leader, before the reflector's report
    /// stream reconnected, or while its reports lag). Shards the plan does not know may live
    /// there, so a scale-down passes it over and, draining, it is not removed as empty. The
    /// backends clear it once it has been unheard for a while, so a reflector that never
    /// reports is still judged by the plan alone in the end.
    pub unreported: bool,
}

/// A shard: input (as the previous plan left it, with fresh load) and output.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardRecord {
    /// Key of its session.
    pub session: String,
    /// Shard name (`name` or `name~N`).
    pub name: String,
    /// Shard number.
    pub index: u32,
    /// Id of the pool.
    pub pool: String,
    /// Region it is placed (or waiting) in.
    pub region: String,
    /// The reflector hosting it; `None` while pending.
    pub reflector: Option<String>,
    /// Users it commits on its reflector (its session's `maxUsersPerShard` when placed).
    pub committed_users: u32,
    /// Connected users (reported).
    pub users: u32,
    /// Routes handed out and not yet seen joining (from the router).
    pub reserved: u32,
    /// Lifecycle phase.
    pub phase: ShardPhase,
    /// Since when it has had no users and no reservations.
    pub empty_since: Option<Seconds>,
    /// While it moves: the reflector it is being handed to. It keeps `reflector` (the
    /// source) until the controllers see the target host it, then they swap the two.
    pub moving_to: Option<String>,
    /// When it last moved (for the rebalancing cool-down).
    pub moved_at: Option<Seconds>,
}

impl ShardRecord {
    /// Users plus reservations: what the threshold is compared with.
    pub fn load(&self) -> u64 {
        u64::from(self.users) + u64::from(self.reserved)
    }

    /// The reflectors it holds room on: its host and, while it moves, its target.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.reflector
            .iter()
            .chain(&self.moving_to)
            .map(String::as_str)
    }

    /// Whether the router may send new users here.
    pub fn routable(&self) -> bool {
        self.phase == ShardPhase::Open
    }
}

/// Direction of a scaling step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScaleDirection {
    /// Reflectors were added.
    Up,
    /// Reflectors were drained to shrink the region.
    Down,
}

/// Scaling history of one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionHistory {
    /// Direction of the last step.
    pub last_direction: Option<ScaleDirection>,
    /// When the direction last changed.
    pub last_change_at: Seconds,
    /// When the region last scaled up.
    pub last_up_at: Option<Seconds>,
    /// When the region last scaled down.
    pub last_down_at: Option<Seconds>,
    /// The region's demand (busy reflectors plus the ones its pending shards need) at most
    /// once per second, over the last `growth_buffer_seconds`, oldest first: what the
    /// growth buffer measures the recent growth from. Empty when that buffer is off.
    pub demand: Vec<(Seconds, u32)>,
}

/// Scaling history of every region, keyed by `(pool id, region)`.
pub type ScaleHistory = BTreeMap<(String, String), RegionHistory>;

/// The desired state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Every shard that should exist, with its placement and phase. Existing shards keep
    /// their input order; new ones follow.
    pub shards: Vec<ShardRecord>,
    /// What to do with each observed reflector, in input order.
    pub reflectors: Vec<ReflectorPlan>,
    /// Per region: counts and how many reflectors to create.
    pub regions: Vec<RegionPlan>,
    /// Every decision, with its reason.
    pub decisions: Vec<Decision>,
    /// The history to pass to the next plan.
    pub history: ScaleHistory,
}

/// What happens to one observed reflector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReflectorPlan {
    /// Its name.
    pub name: String,
    /// The action.
    pub action: ReflectorAction,
}

/// Action on a reflector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReflectorAction {
    /// Leave it as it is.
    Keep,
    /// Start draining it; it must have stored its shards and exited by `deadline`.
    Drain {
        /// Drain deadline.
        deadline: Seconds,
    },
    /// Delete it: it is draining and hosts no shard.
    Remove,
}

/// The desired size of one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionPlan {
    /// Pool id.
    pub pool: String,
    /// Region name.
    pub region: String,
    /// Image of new reflectors.
    pub image: String,
    /// Ready reflectors accepting shards.
    pub ready: u32,
    /// Starting reflectors.
    pub starting: u32,
    /// Draining reflectors (including those drained by this plan).
    pub draining: u32,
    /// Reflectors accepting shards the region should have.
    pub desired: u32,
    /// Empty reflectors it keeps for its recent growth (0 when `growthBufferSeconds` is off
    /// or the region did not grow).
    pub growth_buffer: u32,
    /// Reflectors to create now.
    pub create: u32,
    /// Shards committed on this region's reflectors, pending ones included.
    pub committed_shards: u64,
    /// Users committed on this region's reflectors, pending ones included.
    pub committed_users: u64,
}

/// Why a shard was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpenReason {
    /// The session has fewer than `minShards` shards.
    MinShards,
    /// Every shard is at or above the scale-up threshold.
    AllShardsAtThreshold,
}

/// Why a shard closes (stops taking users).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Empty for the session's idle period, and the session has more than `minShards`.
    Idle,
    /// Its Session was deleted.
    SessionDeleted,
}

/// Why a shard left the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoveReason {
    /// It was closing and is now empty.
    ClosedEmpty,
    /// Its reflector no longer exists; clients will be routed to a new shard.
    ReflectorGone,
}

/// Why a region grows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleUpReason {
    /// Shards are waiting for a reflector with room.
    PendingShards,
    /// Fewer reflectors than `minReflectors`.
    MinReflectors,
    /// Fewer empty reflectors than `warmBuffer`.
    WarmBuffer,
    /// Fewer empty reflectors than the region's demand grew by over the last
    /// `growthBufferSeconds`.
    Growth,
}

/// Why a shard moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// Its reflector drains (scale-down, image roll-over, region removed): the shard goes to
    /// a reflector that stays instead of waiting for its users to leave.
    ReflectorDraining,
    /// Its reflector is over the pool's `rebalance_above` while another has room.
    Rebalance,
    /// An operator asked for it.
    Requested,
}

/// Why a requested move did not start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoveHeldReason {
    /// The pool's moves are off.
    MovesDisabled,
    /// No such shard, or it is pending, closing or already moving.
    NotMovable,
    /// No ready reflector in the shard's region has room (or the named one has none).
    NoRoom,
    /// The pool has `max_concurrent` moves in flight; it is tried again next time.
    TooManyMoves,
}

/// Why a reflector drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DrainReason {
    /// The region has more empty reflectors than its warm buffer needs.
    Surplus,
    /// It runs an image other than the region's: newer reflectors take its place.
    ImageChanged,
    /// Its pool or region no longer exists.
    RegionRemoved,
}

/// One decision of the planner and its reason. Controllers turn these into actions,
/// Kubernetes Events and metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// A shard opens.
    OpenShard {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// Region.
        region: String,
        /// Reflector, or `None` when it waits for one to start.
        reflector: Option<String>,
        /// Why.
        reason: OpenReason,
        /// Regions tried first and found at their maximum.
        fell_back_from: Vec<String>,
    },
    /// A shard stops taking new users and will be removed once empty.
    CloseShard {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// Why.
        reason: CloseReason,
    },
    /// A shard leaves the plan.
    RemoveShard {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// Why.
        reason: RemoveReason,
    },
    /// A shard starts moving to another reflector of its region (phase `Moving`).
    MoveShard {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// The reflector it leaves.
        from: String,
        /// The reflector it goes to.
        to: String,
        /// Why.
        reason: MoveReason,
    },
    /// A move in flight is given up because its target reflector is gone; the shard stays
    /// where it is.
    MoveAborted {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// The target that disappeared.
        to: String,
    },
    /// A requested move did not start.
    MoveHeld {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// Why.
        reason: MoveHeldReason,
    },
    /// The reflector of a shard disappeared (crash, node loss) and the pool's moves are on:
    /// the shard is placed again, in its region first, and resumes there from storage.
    ReassignShard {
        /// Session key.
        session: String,
        /// Shard name.
        shard: String,
        /// The reflector that is gone.
        from: String,
    },
    /// A region gets more reflectors.
    ScaleUp {
        /// Pool id.
        pool: String,
        /// Region.
        region: String,
        /// Reflectors accepting shards before.
        from: u32,
        /// After.
        to: u32,
        /// Why.
        reason: ScaleUpReason,
        /// Users would otherwise be refused, so the cool-down did not apply.
        urgent: bool,
    },
    /// A region should change size but the cool-down holds it.
    ScaleHeld {
        /// Pool id.
        pool: String,
        /// Region.
        region: String,
        /// The held direction.
        direction: ScaleDirection,
        /// When it may happen.
        until: Seconds,
    },
    /// A reflector starts draining.
    DrainReflector {
        /// Reflector name.
        reflector: String,
        /// Why.
        reason: DrainReason,
        /// Drain deadline.
        deadline: Seconds,
    },
    /// A drained, empty reflector is removed.
    RemoveReflector {
        /// Reflector name.
        reflector: String,
    },
    /// Something only the operator can detect is wrong with a session.
    SessionDegraded {
        /// Session key.
        session: String,
        /// Condition reason.
        reason: Reason,
        /// A sentence for the condition message and the Event.
        message: String,
    },
}

/// What one reflector can carry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Most shards (Croquet sessions) one reflector hosts at once.
    #[schemars(range(min = 1, max = 1000000))]
    pub sessions: u32,

    /// Most users one reflector is committed to. Each shard placed on a reflector commits
    /// its session's `maxUsersPerShard` (the hard cap the reflector enforces), so a reflector
    /// can never be overfilled however its shards grow.
    #[schemars(range(min = 1, max = 10000000))]
    pub users: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            sessions: 100,
            users: 1000,
        }
    }
}

/// How new shards are spread over a region's reflectors.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum PlacementStrategy {
    /// Fill the fullest reflector that still has room (best fit). Fewer pods; empty
    /// reflectors drain away.
    #[default]
    Pack,
    /// Put each new shard on the emptiest reflector. More pods; fewer shards share a fault.
    Spread,
}

/// Lifecycle of a shard.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ShardPhase {
    /// Waiting for a reflector with room (its region is scaling up).
    Pending,
    /// Placed and taking new users (below the threshold).
    Open,
    /// Placed, at or above the threshold: takes returning users only.
    Full,
    /// Idle or its Session was deleted: takes no new users, removed once empty.
    Closing,
    /// Being handed to another reflector of its region: takes no new users; its clients
    /// reconnect through the region's gateway and resume on the new reflector.
    Moving,
}

/// Reasons on `Ready`/`Progressing`/`Degraded` conditions (CamelCase, as Kubernetes expects;
/// also used as Event reasons and as a bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Everything is in place.
    AsExpected,
    /// Reflectors are starting or shards are waiting for one.
    ScalingUp,
    /// The Session's `poolRef` names no ReflectorPool in its namespace.
    PoolNotFound,
    /// The Session lists a region its pool does not have.
    UnknownRegion,
    /// No allowed region has room and every one is at `maxReflectors`.
    CapacityExhausted,
    /// The session reached `maxShards` and every shard is above its threshold.
    MaxShardsReached,
}

impl Reason {
    /// The reason as written into conditions and Events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AsExpected => "AsExpected",
            Reason::ScalingUp => "ScalingUp",
            Reason::PoolNotFound => "PoolNotFound",
            Reason::UnknownRegion => "UnknownRegion",
            Reason::CapacityExhausted => "CapacityExhausted",
            Reason::MaxShardsReached => "MaxShardsReached",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
