//! # The `refleet.dev/v1alpha1` custom resources
//!
//! Platform teams describe their fleet with two namespaced kinds:
//!
//! - [`ReflectorPool`] — *where* sessions run: the reflector pods of each region, their
//!   image, resources, capacity and scaling bounds, how clients reach them, and the storage
//!   behind the pool-wide files URL. Pool-wide defaults live in `spec.defaults`; each entry
//!   of `spec.regions` may override any of them.
//! - [`Session`] — *what* runs: one Croquet session (`name`) or a family of sessions created
//!   on demand (`namePattern`, e.g. `room-*`), with its sharding policy: users per shard,
//!   scale-up threshold, shard limits and the regions it may use, in preference order.
//!
//! ```text
//!   [Session] -> [Shard] -> [Reflector] <- [ReflectorPool/region]
//!      |            |            |                 |
//!   policy:      shard 0 = name  one pod,       image, capacity,
//!   users/shard, shard N =       hosts many     min/max/warm buffer
//!   threshold,   name~N          shards         per region
//!   regions
//! ```
//!
//! A **shard** is an independent Croquet session (same appId, its own name, stream,
//! snapshots and persistent data). Shard 0 keeps the session's plain name and shard `N`
//! is called `<name>~N`, which is why `~` is rejected in session names. Shards are never
//! split across reflectors; a reflector hosts many shards up to its capacity.
//!
//! Rules that only need the object itself (threshold range, `min <= max`, exactly one of
//! `name`/`namePattern`, no `~`) are CEL rules (`x-kubernetes-validations`) enforced by the
//! API server. Rules that need another object (the pool exists, the regions are known to it)
//! are reported by the operator as a `Degraded` condition with a [`Reason`].
//!
//! The YAML in `crds/` is generated from these types (`refleet crds --write crds/`); a test
//! fails when it drifts.

// kube's `printcolumn(name = .., type_ = ..)` repeats the same keys for every column, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use refleet_core::planner::{Capacity, PlacementStrategy, Reason, ShardPhase};
use refleet_core::planner::{Seconds, ShardPolicy};
use refleet_core::shard::SHARD_SEPARATOR;

/// The API group of every Refleet resource.
pub const GROUP: &str = "refleet.dev";
/// The API version of the resources in this module.
pub const VERSION: &str = "v1alpha1";

// === ReflectorPool ===

/// Spec of a ReflectorPool: the reflector pods of every region and how clients reach them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "refleet.dev",
    version = "v1alpha1",
    kind = "ReflectorPool",
    namespaced,
    status = "ReflectorPoolStatus",
    derive = "PartialEq",
    shortname = "rpool",
    shortname = "rp",
    category = "refleet",
    doc = "A pool of Refleet reflectors spread over regions. Sessions in the same namespace refer to it by name.",
    printcolumn(
        name = "Regions",
        type_ = "string",
        description = "Regions of the pool",
        json_path = ".status.summary.regions"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Reflectors ready to take shards",
        json_path = ".status.summary.ready"
    ),
    printcolumn(
        name = "Draining",
        type_ = "integer",
        description = "Reflectors draining before removal",
        json_path = ".status.summary.draining"
    ),
    printcolumn(
        name = "Users",
        type_ = "string",
        description = "Users committed / user capacity of ready reflectors",
        json_path = ".status.summary.users"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        description = "Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "has(self.defaults.image) || self.regions.all(r, has(r.image))"
).message("every region needs a reflector image: set spec.defaults.image or regions[].image"))]
#[x_kube(validation = Rule::new(
    "!has(self.moves) || !self.moves.enabled || (has(self.gateway) && self.gateway.enabled)"
).message("moves need the gateway: a moved shard's clients reconnect to the same URL (set spec.gateway.enabled)"))]
#[serde(rename_all = "camelCase")]
pub struct ReflectorPoolSpec {
    /// Pool-wide reflector settings. Every region uses these unless it overrides a field in
    /// `regions[]`.
    #[serde(default)]
    pub defaults: ReflectorSettings,

    /// The regions of the pool. Each region is a set of reflector pods scheduled with its own
    /// node selector / affinity / tolerations; Sessions list the regions they may use in
    /// preference order. Region names are unique within the pool.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))")
        .message("region names must be unique within the pool"))]
    pub regions: Vec<RegionSpec>,

    /// How shards are spread over the reflectors of a region. `Pack` (the default) fills the
    /// fullest reflector that still has room, so empty reflectors can be drained and removed;
    /// `Spread` puts each new shard on the emptiest reflector, trading pods for isolation.
    #[serde(default)]
    pub placement: PlacementStrategy,

    /// Where reflectors store snapshots and persistent session data. Omit it to use each
    /// reflector's local disk (fine for one region with one reflector; sessions then cannot
    /// resume on another reflector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,

    /// The pool-wide files endpoint every client uses for snapshots and persistent data.
    pub files: FilesSpec,

    /// How each reflector's public WebSocket URL is formed. Clients get this URL from the
    /// router and connect to it directly.
    #[serde(rename = "reflectorURL")]
    pub reflector_url: ReflectorUrlSpec,

    /// The pool's regional gateways: one stable WebSocket address per region that checks
    /// the join token and splices each connection to the reflector hosting its shard now.
    /// With it on, Route answers the gateway's URL and reflectors need no public address.
    /// Off by default (clients connect to each reflector's `reflectorURL`).
    #[serde(default, skip_serializing_if = "GatewaySpec::is_off")]
    pub gateway: GatewaySpec,

    /// Seconds a draining reflector keeps serving its live shards before it stores their
    /// state and exits. Reflector pods get a termination grace period at least this long.
    /// Default 300.
    #[serde(default = "default_drain_grace_period_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub drain_grace_period_seconds: u32,

    /// Seconds that must pass between two changes of scaling direction in one region (a
    /// scale-up followed by a scale-down, or the reverse). Prevents flapping when load
    /// hovers around a boundary. A newly elected operator leader also drains no reflector
    /// as surplus for this long after its first plan of the pool (the previous leader's
    /// scaling history is not kept). Default 300.
    #[serde(default = "default_scale_down_cooldown_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_cooldown_seconds: u32,

    /// Live moves of shards between the pool's reflectors (off by default). A moved shard's
    /// clients reconnect to the same URL, so moves need the regional gateway in front of the
    /// reflectors.
    #[serde(default)]
    pub moves: MovesSpec,
}

/// How a pool moves live shards between its reflectors: the source stores the shard and
/// sends its clients on (WebSocket close 4003), they reconnect through the region's gateway
/// and the target resumes the shard on the same timeline with every message.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "self.rebalanceTargetPercent < self.rebalanceAbovePercent"
).message("rebalanceTargetPercent must be below rebalanceAbovePercent (the gap is the hysteresis)"))]
#[serde(rename_all = "camelCase")]
pub struct MovesSpec {
    /// Turn moves on: a draining reflector (scale-down, image roll-over) hands its shards to
    /// ready reflectors of its region instead of waiting for them to empty, the shards of a
    /// lost reflector are placed again in their region, a reflector over
    /// `rebalanceAbovePercent` sheds shards, and shards can be moved by hand (the
    /// `refleet.dev/move-shard` annotation on the Session). Default false.
    #[serde(default)]
    pub enabled: bool,

    /// Most moves in flight in the pool at once; the rest wait for the next plan. Default 4.
    #[serde(default = "default_max_concurrent_moves")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent: u32,

    /// A reflector whose connected users exceed this percentage of its user capacity sheds
    /// shards to less loaded reflectors of its region, largest first. Above 100 turns
    /// rebalancing off while keeping drain moves. Default 90.
    #[serde(default = "default_rebalance_above_percent")]
    #[schemars(range(min = 1, max = 1000))]
    pub rebalance_above_percent: u32,

    /// A rebalancing move only goes to a reflector that stays at or below this percentage of
    /// its user capacity with the shard. Must be below `rebalanceAbovePercent`. Default 70.
    #[serde(default = "default_rebalance_target_percent")]
    #[schemars(range(min = 0, max = 999))]
    pub rebalance_target_percent: u32,

    /// A shard that moved is not moved again to rebalance for this many seconds. Default 300.
    #[serde(default = "default_move_cooldown_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub cooldown_seconds: u32,
}

impl Default for MovesSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            max_concurrent: default_max_concurrent_moves(),
            rebalance_above_percent: default_rebalance_above_percent(),
            rebalance_target_percent: default_rebalance_target_percent(),
            cooldown_seconds: default_move_cooldown_seconds(),
        }
    }
}

impl From<&MovesSpec> for refleet_core::planner::MovePolicy {
    fn from(m: &MovesSpec) -> Self {
        Self {
            enabled: m.enabled,
            max_concurrent: m.max_concurrent,
            rebalance_above: f64::from(m.rebalance_above_percent) / 100.0,
            rebalance_target: f64::from(m.rebalance_target_percent) / 100.0,
            cooldown: u64::from(m.cooldown_seconds),
        }
    }
}

fn default_max_concurrent_moves() -> u32 {
    4
}
fn default_rebalance_above_percent() -> u32 {
    90
}
fn default_rebalance_target_percent() -> u32 {
    70
}
fn default_move_cooldown_seconds() -> u32 {
    300
}

/// Reflector settings: pool-wide in `spec.defaults`, or a region's overrides. Every field is
/// optional; an unset field falls back to the pool default and then to the built-in default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new(
    "!has(self.minReflectors) || !has(self.maxReflectors) || self.minReflectors <= self.maxReflectors"
).message("minReflectors must not exceed maxReflectors"))]
#[serde(rename_all = "camelCase")]
pub struct ReflectorSettings {
    /// Container image of the reflector (`refleet-reflector`). Changing it rolls the region
    /// over without interrupting live sessions: new reflectors take new shards while the old
    /// ones drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// CPU and memory requests and limits of each reflector container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables of the reflector container. A region's entries are added
    /// to the pool's; an entry with the same name replaces the pool's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,

    /// What one reflector can carry. The planner never places shards beyond it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,

    /// Fewest reflectors the region keeps, even when idle. Built-in default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub min_reflectors: Option<u32>,

    /// Most reflectors that accept shards in the region. When a region is at its maximum,
    /// sessions fall back to their next allowed region. Draining reflectors (during a scale-
    /// down or an image roll-over) are not counted. Built-in default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub max_reflectors: Option<u32>,

    /// Empty, ready reflectors kept on top of what the placed shards need, so a burst of new
    /// shards does not wait for pods to start. Built-in default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub warm_buffer: Option<u32>,

    /// Also keeps as many empty, ready reflectors as the region's demand grew by over the
    /// last this-many seconds (demand: reflectors hosting shards, plus those that waiting
    /// shards need); the larger of this and `warmBuffer` applies. A crowd that filled 12
    /// reflectors in the last 30 s then finds 12 more ready instead of waiting for pods to
    /// start, and once the growth is older than the window the surplus drains after the
    /// cool-down. Set it to about how long a reflector pod takes from creation to ready, or
    /// longer. Built-in default 0: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 600))]
    pub growth_buffer_seconds: Option<u32>,

    /// Node labels a reflector pod's node must have (the pod's `nodeSelector`), typically
    /// the region or zone label, e.g. `topology.kubernetes.io/region: eu-west-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Scheduling affinity of the reflector pods (the pod's `affinity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Tolerations of the reflector pods, e.g. for nodes tainted for real-time workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

/// One region of a pool: its name and the settings it overrides.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// Region name, as Sessions and clients' Route requests spell it (e.g. `eu-west`).
    /// Lowercase letters, digits and `-`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Settings of this region that differ from `spec.defaults`.
    #[serde(flatten)]
    pub overrides: ReflectorSettings,
}

/// Object storage behind the pool's files endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Storage URL, e.g. `s3://bucket/prefix` for S3-compatible object storage or
    /// `file:///data` for a shared volume.
    #[serde(rename = "url")]
    #[schemars(length(min = 1))]
    pub url: String,

    /// Secret (in the pool's namespace) holding the storage credentials, exposed to the
    /// reflectors as environment variables (e.g. `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A reference to a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The pool-wide files endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct FilesSpec {
    /// Stable public base URL of the pool's files endpoint (one Service/Ingress in front of
    /// every reflector's `/files`, e.g. `https://files.example.com/`). Clients bake it into
    /// every snapshot and persistent-data URL they upload, so it must outlive any one
    /// reflector: never a per-pod address.
    #[serde(rename = "publicURL")]
    #[schemars(length(min = 1))]
    pub public_url: String,
}

/// The pool's regional gateways (`spec.gateway`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!self.enabled || has(self.publicURL)")
    .message("gateway.publicURL is required when the gateway is enabled"))]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Run a gateway per region and have Route answer its URL instead of reflector URLs.
    /// Needs join tokens (the gateway reads the shard from the token). Default false.
    #[serde(default)]
    pub enabled: bool,

    /// Gateway pods per region when no autoscaler manages them. Default 2.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: u32,

    /// Public base URL of a region's gateway, with placeholders `{region}` and
    /// `{namespace}`, e.g. `wss://{region}.gateway.example.com/`. Route answers it followed
    /// by the join token and `/`. Required when enabled (`refleet up` serves each region
    /// on a loopback port of its own and ignores it).
    #[serde(default, rename = "publicURL", skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.contains('{region}')")
        .message("gateway.publicURL must contain {region}: every region needs its own gateway address"))]
    pub public_url: Option<String>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            replicas: default_gateway_replicas(),
            public_url: None,
        }
    }
}

fn default_gateway_replicas() -> u32 {
    2
}

impl GatewaySpec {
    fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// The public URL of `region`'s gateway in `namespace`, when the gateway is on.
    pub fn url(&self, region: &str, namespace: &str) -> Option<String> {
        let template = self.public_url.as_deref().filter(|_| self.enabled)?;
        let mut url = template
            .replace("{region}", region)
            .replace("{namespace}", namespace);
        if !url.ends_with('/') {
            url.push('/');
        }
        Some(url)
    }
}

/// How a reflector's public WebSocket URL is formed.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReflectorUrlSpec {
    /// URL template with placeholders `{pod}` (the reflector's pod name), `{region}` and
    /// `{namespace}`, e.g. `wss://{pod}.{region}.reflectors.example.com/`. It must contain
    /// `{pod}`: every reflector needs its own address.
    #[x_kube(validation = Rule::new("self.contains('{pod}')")
        .message("reflectorURL.template must contain {pod}: every reflector needs its own URL"))]
    pub template: String,

    /// Create one Service per reflector pod (named like the pod), for Ingresses or load
    /// balancers that route to a Service rather than a pod. Default false.
    #[serde(default)]
    pub per_pod_service: bool,
}

/// Observed state of a ReflectorPool, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReflectorPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing` and `Degraded` conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// Per-region reflector counts, capacity and use.
    #[serde(default)]
    pub regions: Vec<RegionStatus>,

    /// Totals over all regions, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<PoolSummary>,
}

/// One region's reflectors as the operator last saw them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// Reflectors ready to take shards.
    pub ready: u32,
    /// Reflectors started but not ready yet.
    #[serde(default)]
    pub starting: u32,
    /// Reflectors draining: no new shards, removed once their shards have emptied.
    pub draining: u32,
    /// Reflectors the planner wants in the region (not counting draining ones).
    #[serde(default)]
    pub desired: u32,
    /// Empty reflectors kept for the region's growth over the last `growthBufferSeconds`
    /// (0 when that buffer is off or the region did not grow).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub growth_buffer: u32,
    /// Total capacity of the ready reflectors.
    pub capacity: CapacityTotals,
    /// Capacity committed to placed shards (shards, and their users' hard caps).
    pub used: CapacityTotals,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Shard and user totals.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct CapacityTotals {
    /// Shards (Croquet sessions).
    pub sessions: u64,
    /// Users.
    pub users: u64,
}

/// Pool totals shown by `kubectl get reflectorpools`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolSummary {
    /// Region names, comma-separated.
    pub regions: String,
    /// Ready reflectors in all regions.
    pub ready: u32,
    /// Draining reflectors in all regions.
    pub draining: u32,
    /// Committed users / user capacity, e.g. `340/2000`.
    pub users: String,
}

// === Session ===

/// Spec of a Session: one Croquet session, or a family of them, and its sharding policy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "refleet.dev",
    version = "v1alpha1",
    kind = "Session",
    namespaced,
    status = "SessionStatus",
    derive = "PartialEq",
    shortname = "rsess",
    category = "refleet",
    doc = "A Croquet session (or a family of sessions created on demand) served by a ReflectorPool, with its sharding policy.",
    printcolumn(
        name = "Pool",
        type_ = "string",
        description = "ReflectorPool serving the session",
        json_path = ".spec.poolRef.name"
    ),
    printcolumn(
        name = "App",
        type_ = "string",
        description = "Croquet appId",
        json_path = ".spec.appId"
    ),
    printcolumn(
        name = "Name",
        type_ = "string",
        description = "Session name or name pattern",
        json_path = ".status.displayName"
    ),
    printcolumn(
        name = "Shards",
        type_ = "integer",
        description = "Open shards",
        json_path = ".status.shardCount"
    ),
    printcolumn(
        name = "Users",
        type_ = "integer",
        description = "Connected users over all shards",
        json_path = ".status.users"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        description = "Ready condition",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.name) != has(self.namePattern)")
    .message("set exactly one of name or namePattern"))]
#[x_kube(validation = Rule::new("self.minShards <= self.maxShards")
    .message("minShards must not exceed maxShards"))]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// The ReflectorPool (in this namespace) that serves the session.
    pub pool_ref: PoolRef,

    /// The Croquet appId clients join with (e.g. `com.example.chess`).
    #[schemars(length(min = 1, max = 128))]
    pub app_id: String,

    /// Exact session name. Shard 0 keeps this name; shard N is `<name>~N`.
    /// Set exactly one of `name` and `namePattern`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("!self.contains('~')")
        .message("name must not contain '~': it separates a session's name from its shard number (room~2)"))]
    pub name: Option<String>,

    /// Name pattern with `*` wildcards (e.g. `room-*`): any session whose name matches is
    /// created on demand when a client is first routed to it, and follows this policy. Such
    /// sessions are held in the operator's memory and summarised in status, not created as
    /// objects. Set exactly one of `name` and `namePattern`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("!self.contains('~')")
        .message("namePattern must not contain '~': it separates a session's name from its shard number (room~2)"))]
    #[x_kube(validation = Rule::new("self.contains('*')")
        .message("namePattern needs a '*' wildcard; use name for a single session"))]
    pub name_pattern: Option<String>,

    /// Users routed to one shard before it counts as full (the hard cap the reflector
    /// enforces, and what each shard commits on its reflector). Default 100.
    #[serde(default = "default_max_users_per_shard")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_users_per_shard: u32,

    /// Fraction of `maxUsersPerShard` at which a shard stops taking new users: they go to
    /// another shard, and the headroom above it is kept for returning users. A new shard opens
    /// when no shard of the session is below it. Greater than 0, at most 1. Default 0.8.
    #[serde(default = "default_scale_up_threshold")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0")
        .message("scaleUpThreshold must be greater than 0 and at most 1"))]
    pub scale_up_threshold: f64,

    /// Shards kept open even when empty (per session name, for a pattern). Default 1.
    #[serde(default = "default_min_shards")]
    #[schemars(range(max = 10000))]
    pub min_shards: u32,

    /// Most shards the session may have; once reached, routing fills the existing shards up
    /// to `maxUsersPerShard` and then refuses. Default 10.
    #[serde(default = "default_max_shards")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_shards: u32,

    /// Regions of the pool the session may use, in preference order. New shards open in the
    /// first region with room (or the client's region, when it asks for one it may use).
    /// Empty means every region of the pool, in the pool's order.
    #[serde(default)]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub regions: Vec<String>,

    /// Keep the session's persistent data (Croquet `persistSession`) in the pool's storage.
    /// Each shard has its own persistent data; nothing crosses shards. Default true.
    #[serde(default = "default_true")]
    pub persistence: bool,

    /// Seconds a shard must have been empty (no users, no pending reservations) before it
    /// closes. A closing shard takes no new users and is removed once empty. The session
    /// keeps `minShards`, and keeps its last shard below the threshold while its other shards
    /// are all at it (a new user would only make it open again). Default 60.
    #[serde(default = "default_idle_shard_seconds")]
    #[schemars(range(max = 86400))]
    pub close_idle_shards_after_seconds: u32,

    /// Extra labels on this Session's metrics (e.g. `team: games`). Keep them few and
    /// bounded: they are copied onto every per-Session series.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 8))]
    pub metric_labels: BTreeMap<String, String>,
}

/// A reference to a ReflectorPool in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PoolRef {
    /// Name of the ReflectorPool.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a Session, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `Progressing` and `Degraded` conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    /// `spec.name` or `spec.namePattern`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,

    /// Open shards (all session names, for a pattern).
    #[serde(default)]
    pub shard_count: u32,

    /// Connected users over all shards. When only user counts change, they are written at
    /// most once per the operator's `--status-counts-every` (10 s by default).
    #[serde(default)]
    pub users: u64,

    /// Every shard of an exact-name Session (empty for a pattern: see `activeSessions` and
    /// `busiest`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,

    /// For a pattern: how many session names currently have at least one shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<u32>,

    /// For a pattern: the sessions with the most users (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub busiest: Vec<BusySession>,

    /// The value of the `refleet.dev/move-shard` annotation the operator last acted on: a
    /// move is asked for once per value (append ` #<anything>` to ask for the same move
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_move_request: Option<String>,
}

/// One shard of a Session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard name: the session name for shard 0, `<name>~N` for shard N.
    pub name: String,
    /// Region of the reflector hosting the shard.
    pub region: String,
    /// Pod name of the reflector hosting the shard (empty while pending).
    #[serde(default)]
    pub reflector: String,
    /// Connected users.
    pub users: u32,
    /// Lifecycle state.
    pub state: ShardPhase,
    /// While the shard moves (state `Moving`): the reflector it is being handed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<String>,
}

/// A busy session of a pattern Session.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BusySession {
    /// Session name (a match of `namePattern`).
    pub name: String,
    /// Its shards.
    pub shards: u32,
    /// Its connected users.
    pub users: u64,
}

// === Conditions ===

/// Condition type: everything the spec asks for is in place.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the operator is still converging (pods starting, shards pending).
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: something only the operator can detect is wrong; see the reason.
pub const CONDITION_DEGRADED: &str = "Degraded";

// === Defaults and resolution ===

fn default_drain_grace_period_seconds() -> u32 {
    300
}
fn default_scale_down_cooldown_seconds() -> u32 {
    300
}
fn default_max_users_per_shard() -> u32 {
    100
}
fn default_scale_up_threshold() -> f64 {
    0.8
}
fn default_min_shards() -> u32 {
    1
}
fn default_max_shards() -> u32 {
    10
}
fn default_true() -> bool {
    true
}
fn default_idle_shard_seconds() -> u32 {
    60
}

/// Built-in `minReflectors` when neither the region nor the pool sets it.
pub const DEFAULT_MIN_REFLECTORS: u32 = 1;
/// Built-in `maxReflectors` when neither the region nor the pool sets it.
pub const DEFAULT_MAX_REFLECTORS: u32 = 10;
/// Built-in `warmBuffer` when neither the region nor the pool sets it.
pub const DEFAULT_WARM_BUFFER: u32 = 1;
/// Built-in `growthBufferSeconds` when neither the region nor the pool sets it: off.
pub const DEFAULT_GROWTH_BUFFER_SECONDS: u32 = 0;

/// A region's settings after applying its overrides to the pool defaults and the built-in
/// defaults: what the controllers use to build pods and the planner to scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRegion {
    /// Region name.
    pub name: String,
    /// Reflector image (`None` only for a pool the API server would have rejected).
    pub image: Option<String>,
    /// Container resources.
    pub resources: Option<ResourceRequirements>,
    /// Environment: the pool's entries, then the region's (same name replaces).
    pub env: Vec<EnvVar>,
    /// Capacity of one reflector.
    pub capacity: Capacity,
    /// Fewest reflectors.
    pub min_reflectors: u32,
    /// Most reflectors that accept shards.
    pub max_reflectors: u32,
    /// Empty ready reflectors kept on top of demand.
    pub warm_buffer: u32,
    /// Window over which the region's growth sets a second, adaptive buffer (0: off).
    pub growth_buffer_seconds: u32,
    /// Pod node selector.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Pod affinity.
    pub affinity: Option<Affinity>,
    /// Pod tolerations.
    pub tolerations: Option<Vec<Toleration>>,
}

impl ReflectorPoolSpec {
    /// The effective settings of every region, in the pool's order.
    pub fn resolved_regions(&self) -> Vec<ResolvedRegion> {
        self.regions.iter().map(|r| self.resolve(r)).collect()
    }

    /// The effective settings of the region called `name`, if the pool has it.
    pub fn resolved_region(&self, name: &str) -> Option<ResolvedRegion> {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .map(|r| self.resolve(r))
    }

    fn resolve(&self, region: &RegionSpec) -> ResolvedRegion {
        let d = &self.defaults;
        let o = &region.overrides;
        let mut env: Vec<EnvVar> = d.env.clone().unwrap_or_default();
        for var in o.env.iter().flatten() {
            match env.iter_mut().find(|e| e.name == var.name) {
                Some(existing) => *existing = var.clone(),
                None => env.push(var.clone()),
            }
        }
        ResolvedRegion {
            name: region.name.clone(),
            image: o.image.clone().or_else(|| d.image.clone()),
            resources: o.resources.clone().or_else(|| d.resources.clone()),
            env,
            capacity: o.capacity.or(d.capacity).unwrap_or_default(),
            min_reflectors: o
                .min_reflectors
                .or(d.min_reflectors)
                .unwrap_or(DEFAULT_MIN_REFLECTORS),
            max_reflectors: o
                .max_reflectors
                .or(d.max_reflectors)
                .unwrap_or(DEFAULT_MAX_REFLECTORS),
            warm_buffer: o
                .warm_buffer
                .or(d.warm_buffer)
                .unwrap_or(DEFAULT_WARM_BUFFER),
            growth_buffer_seconds: o
                .growth_buffer_seconds
                .or(d.growth_buffer_seconds)
                .unwrap_or(DEFAULT_GROWTH_BUFFER_SECONDS),
            node_selector: o.node_selector.clone().or_else(|| d.node_selector.clone()),
            affinity: o.affinity.clone().or_else(|| d.affinity.clone()),
            tolerations: o.tolerations.clone().or_else(|| d.tolerations.clone()),
        }
    }
}

impl ReflectorUrlSpec {
    /// The public WebSocket URL of reflector pod `pod` in `region` of `namespace`.
    pub fn render(&self, pod: &str, region: &str, namespace: &str) -> String {
        self.template
            .replace("{pod}", pod)
            .replace("{region}", region)
            .replace("{namespace}", namespace)
    }
}

impl From<&SessionSpec> for ShardPolicy {
    /// A Session's policy as its spec states it.
    fn from(spec: &SessionSpec) -> Self {
        Self {
            max_users_per_shard: spec.max_users_per_shard,
            scale_up_threshold: spec.scale_up_threshold,
            min_shards: spec.min_shards,
            max_shards: spec.max_shards,
            regions: spec.regions.clone(),
            close_idle_after: Seconds::from(spec.close_idle_shards_after_seconds),
        }
    }
}

impl SessionSpec {
    /// Whether session `name` is governed by this spec: equal to `spec.name`, or matching
    /// `spec.namePattern` (`*` matches any run of characters, including none). Names with
    /// `~` never match: that character is reserved for shard numbers.
    pub fn matches(&self, name: &str) -> bool {
        if name.contains(SHARD_SEPARATOR) {
            return false;
        }
        match (&self.name, &self.name_pattern) {
            (Some(exact), _) => exact == name,
            (None, Some(pattern)) => wildcard_match(pattern, name),
            (None, None) => false,
        }
    }
}

/// `*`-only glob match, iterative with single backtracking point (linear in practice).
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Every CRD of this module, in a stable order, with the file name it is written to.
pub fn all_crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    vec![
        ("reflectorpools.yaml", ReflectorPool::crd()),
        ("sessions.yaml", Session::crd()),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn name_pattern_matches_with_wildcards_and_never_matches_shard_names() {
        let spec: SessionSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "p"}, "appId": "a", "namePattern": "room-*-x*"
        }))
        .unwrap();
        assert!(spec.matches("room-1-x"));
        assert!(spec.matches("room--x42"));
        assert!(!spec.matches("room-1"));
        assert!(!spec.matches("room-1-x~2"));
        let exact = SessionSpec {
            name: Some("lobby".into()),
            name_pattern: None,
            ..spec
        };
        assert!(exact.matches("lobby"));
        assert!(!exact.matches("lobby2"));
    }

    #[test]
    fn session_defaults_follow_the_issue() {
        let spec: SessionSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "p"}, "appId": "a", "name": "lobby"
        }))
        .unwrap();
        assert_eq!(spec.max_users_per_shard, 100);
        assert!((spec.scale_up_threshold - 0.8).abs() < f64::EPSILON);
        assert_eq!((spec.min_shards, spec.max_shards), (1, 10));
        assert!(spec.persistence);
    }

    #[test]
    fn region_overrides_replace_pool_defaults_and_merge_env_by_name() {
        let spec: ReflectorPoolSpec = serde_json::from_value(serde_json::json!({
            "defaults": {
                "image": "refleet-reflector:1",
                "capacity": {"sessions": 50, "users": 500},
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "maxReflectors": 4,
                "growthBufferSeconds": 30
            },
            "regions": [
                {"name": "eu", "image": "refleet-reflector:2", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
                {"name": "us", "warmBuffer": 0, "growthBufferSeconds": 0}
            ],
            "files": {"publicURL": "https://files.example.com/"},
            "reflectorURL": {"template": "wss://{pod}.{region}.example.com/"}
        }))
        .unwrap();
        let eu = spec.resolved_region("eu").unwrap();
        assert_eq!(eu.image.as_deref(), Some("refleet-reflector:2"));
        assert_eq!(
            eu.capacity,
            Capacity {
                sessions: 50,
                users: 500
            }
        );
        let env: Vec<_> = eu
            .env
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
            .collect();
        assert_eq!(env, [("A", "1"), ("B", "3"), ("C", "4")]);
        assert_eq!(
            (
                eu.min_reflectors,
                eu.max_reflectors,
                eu.warm_buffer,
                eu.growth_buffer_seconds
            ),
            (1, 4, 1, 30)
        );
        let us = spec.resolved_region("us").unwrap();
        assert_eq!(us.image.as_deref(), Some("refleet-reflector:1"));
        assert_eq!((us.warm_buffer, us.growth_buffer_seconds), (0, 0));
        assert!(spec.resolved_region("ap").is_none());
        assert_eq!(
            spec.reflector_url.render("pool-eu-0", "eu", "games"),
            "wss://pool-eu-0.eu.example.com/"
        );
    }
}
