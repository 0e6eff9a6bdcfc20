//! The fleet the router benchmarks share: one published pool in 10 regions, each reflector
//! hosting a row of `room-*` shards of one app, as a leader holds it after a sync, and the
//! report each reflector sends about them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use refleet_api::report::{ReflectorReport, ShardLoad};
use refleet_core::planner::{
    ObservedReflector, PlanInput, PoolInput, ReflectorState, RegionInput, ShardRecord, session_key,
};
use refleet_core::shard::shard_name;
use refleet_operator::crd::{Capacity, PlacementStrategy, SessionSpec, ShardPhase};
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::{FleetView, Router, RouterConfig, SessionDef};

pub const POOL: &str = "games/pool";
pub const NAMESPACE: &str = "games";
pub const REGIONS: usize = 10;

/// The fleet's shape: how many reflectors, how many shards each hosts and how many it may.
#[derive(Clone, Copy)]
pub struct Shape {
    pub reflectors: usize,
    /// Shards each reflector hosts (one `room-*` Session each).
    pub shards_per_reflector: usize,
    /// Shards reflector `i` may host (its `capacity.sessions`).
    pub slots: fn(usize) -> u32,
    /// Users on shard `j` of a reflector.
    pub users: fn(usize) -> u32,
}

pub fn region(r: usize) -> String {
    format!("region-{r}")
}

pub fn reflector(i: usize) -> String {
    format!("pool-{}-{i}", region(i % REGIONS))
}

/// The room hosted as shard `j` of reflector `i`.
pub fn room(shape: &Shape, i: usize, j: usize) -> String {
    format!("room-{}", i * shape.shards_per_reflector + j)
}

/// The router as a leader holds it after a sync: the pool, its reflectors and its shards
/// (the `room-*` Session: 100 users per shard, a new shard at 80).
pub fn router(shape: &Shape) -> Arc<Router> {
    let capacity = |slots: u32| Capacity {
        sessions: slots,
        users: 100 * slots,
    };
    let regions = (0..REGIONS)
        .map(|r| RegionInput {
            name: region(r),
            image: "img".into(),
            capacity: capacity((shape.slots)(0)),
            min_reflectors: 1,
            max_reflectors: 10_000,
            warm_buffer: 0,
            growth_buffer_seconds: 0,
        })
        .collect();
    let observed = (0..shape.reflectors)
        .map(|i| ObservedReflector {
            name: reflector(i),
            pool: POOL.into(),
            region: region(i % REGIONS),
            image: "img".into(),
            capacity: capacity((shape.slots)(i)),
            state: ReflectorState::Ready,
            unreported: false,
        })
        .collect();
    let shards = (0..shape.reflectors)
        .flat_map(|i| {
            (0..shape.shards_per_reflector).map(move |j| {
                let room = room(shape, i, j);
                ShardRecord {
                    session: session_key(NAMESPACE, "app", &room),
                    name: shard_name(&room, 0),
                    index: 0,
                    pool: POOL.into(),
                    region: region(i % REGIONS),
                    reflector: Some(reflector(i)),
                    committed_users: 100,
                    users: (shape.users)(j),
                    reserved: 0,
                    phase: ShardPhase::Open,
                    empty_since: None,
                    moving_to: None,
                    moved_at: None,
                }
            })
        })
        .collect();
    let spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "poolRef": {"name": "pool"}, "appId": "app", "namePattern": "room-*",
        "maxUsersPerShard": 100, "scaleUpThreshold": 0.8,
    }))
    .expect("session spec");
    let config = RouterConfig {
        // Criterion pauses between samples; no reflector may expire meanwhile.
        report_grace: Duration::from_secs(3600),
        ..RouterConfig::default()
    };
    let router = Router::new(
        config,
        None,
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    router.publish(
        POOL,
        FleetView {
            input: PlanInput {
                pools: vec![PoolInput {
                    id: POOL.into(),
                    placement: PlacementStrategy::Pack,
                    regions,
                    cooldown: 60,
                    drain_grace: 30,
                    moves: Default::default(),
                }],
                reflectors: observed,
                shards,
                ..PlanInput::default()
            },
            sessions: vec![SessionDef {
                namespace: NAMESPACE.into(),
                spec,
                pool: POOL.into(),
                files_url: "http://files.test/".into(),
            }],
            urls: (0..shape.reflectors)
                .map(|i| (reflector(i), format!("ws://{}.test/", reflector(i))))
                .collect::<HashMap<_, _>>(),
            gateways: HashMap::new(),
        },
    );
    router
}

/// Reflector `i`'s report with sequence number `sequence`: its shards and their users.
pub fn report(shape: &Shape, i: usize, sequence: u64) -> ReflectorReport {
    ReflectorReport {
        reflector: reflector(i),
        region: region(i % REGIONS),
        public_url: format!("ws://{}.test/", reflector(i)),
        state: 1,
        capacity: None,
        shards: (0..shape.shards_per_reflector)
            .map(|j| {
                let room = room(shape, i, j);
                ShardLoad {
                    session_id: format!("sid-{room}"),
                    shard: shard_name(&room, 0),
                    app_id: "app".into(),
                    users: (shape.users)(j),
                    joins: 40,
                    leaves: 30,
                    peak_users: 12,
                    messages_per_second: 55.0,
                    bytes_per_second: 4400.0,
                    admitted_reservations: Vec::new(),
                    max_users: 100,
                }
            })
            .collect(),
        sequence,
        version: "0.1.0".into(),
        pool: POOL.into(),
        hand_offs: Vec::new(),
    }
}
