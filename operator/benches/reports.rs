//! One report as the leader takes it, at the scale of issue #13: every reflector sends one
//! per second, so at 5 000 reflectors the leader takes 5 000 a second and any cost that
//! grows with the fleet is paid that often.
//!
//! A router with one published pool in 10 regions, every reflector reporting 20 shards of
//! a `room-*` Session, each reflector's reports counted twice already (the steady state:
//! nothing new to send, checked before timing). Each iteration is what one report stream
//! does with one report (`reports::StreamState::take`: the identity and sequence checks,
//! `Router::observe_report`, the shard settings to send), for the reflectors in turn. Its floor is decoding the same report from its protobuf
//! bytes, which tonic does for every report before the stream sees it. Sizes 100 and
//! 5 000 reflectors: per report, the cost should not grow with the fleet.
//!
//! Run with `cargo bench -p refleet-operator --bench reports`; docs/scale.md reports it.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;

use refleet_api::report::{ReflectorReport, ShardLoad};
use refleet_api::report_credential::ReflectorIdentity;
use refleet_core::planner::{
    ObservedReflector, PlanInput, PoolInput, ReflectorState, RegionInput, ShardRecord, session_key,
};
use refleet_core::shard::shard_name;
use refleet_operator::crd::{Capacity, PlacementStrategy, SessionSpec, ShardPhase};
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::reports::{StreamState, Taken};
use refleet_operator::router::{FleetView, Router, RouterConfig, SessionDef};

const POOL: &str = "games/pool";
const REGIONS: usize = 10;
const SHARDS_PER_REFLECTOR: usize = 20;
const USERS_PER_SHARD: u32 = 10;

fn region(r: usize) -> String {
    format!("region-{r}")
}

fn reflector(i: usize) -> String {
    format!("pool-{}-{i}", region(i % REGIONS))
}

fn room(i: usize, j: usize) -> String {
    format!("room-{}", i * SHARDS_PER_REFLECTOR + j)
}

/// The router as a leader holds it after a sync: the pool, its reflectors and its shards.
fn router(reflectors: usize) -> Arc<Router> {
    let capacity = Capacity {
        sessions: SHARDS_PER_REFLECTOR as u32,
        users: 2000,
    };
    let regions = (0..REGIONS)
        .map(|r| RegionInput {
            name: region(r),
            image: "img".into(),
            capacity,
            min_reflectors: 1,
            max_reflectors: 10_000,
            warm_buffer: 0,
            growth_buffer_seconds: 0,
        })
        .collect();
    let observed = (0..reflectors)
        .map(|i| ObservedReflector {
            name: reflector(i),
            pool: POOL.into(),
            region: region(i % REGIONS),
            image: "img".into(),
            capacity,
            state: ReflectorState::Ready,
            unreported: false,
        })
        .collect();
    let shards = (0..reflectors)
        .flat_map(|i| {
            (0..SHARDS_PER_REFLECTOR).map(move |j| {
                let room = room(i, j);
                ShardRecord {
                    session: session_key("games", "app", &room),
                    name: shard_name(&room, 0),
                    index: 0,
                    pool: POOL.into(),
                    region: region(i % REGIONS),
                    reflector: Some(reflector(i)),
                    committed_users: USERS_PER_SHARD,
                    users: USERS_PER_SHARD,
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
                namespace: "games".into(),
                spec,
                pool: POOL.into(),
                files_url: "http://files.test/".into(),
            }],
            urls: (0..reflectors)
                .map(|i| (reflector(i), format!("ws://{}.test/", reflector(i))))
                .collect::<HashMap<_, _>>(),
            gateways: HashMap::new(),
        },
    );
    router
}

fn report(i: usize, sequence: u64) -> ReflectorReport {
    ReflectorReport {
        reflector: reflector(i),
        region: region(i % REGIONS),
        public_url: format!("ws://{}.test/", reflector(i)),
        state: 1,
        capacity: None,
        shards: (0..SHARDS_PER_REFLECTOR)
            .map(|j| {
                let room = room(i, j);
                ShardLoad {
                    session_id: format!("sid-{room}"),
                    shard: shard_name(&room, 0),
                    app_id: "app".into(),
                    users: USERS_PER_SHARD,
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

/// Every reflector's stream, each having counted one report (and been sent its settings).
struct Fleet {
    router: Arc<Router>,
    streams: Vec<StreamState>,
    reports: Vec<ReflectorReport>,
    encoded: Vec<Vec<u8>>,
}

fn fleet(reflectors: usize) -> Fleet {
    let router = router(reflectors);
    let mut streams = Vec::with_capacity(reflectors);
    let mut reports = Vec::with_capacity(reflectors);
    for i in 0..reflectors {
        let mut stream = StreamState::new(Some(ReflectorIdentity {
            reflector: reflector(i),
            region: region(i % REGIONS),
        }));
        let first = report(i, 1);
        match stream.take(&router, &first, |_| {}) {
            Ok(Taken::Counted(settings)) => assert_eq!(settings.len(), SHARDS_PER_REFLECTOR),
            other => panic!("the first report was not counted: {other:?}"),
        }
        // The steady state the benchmark times: counted, nothing new to send.
        let second = report(i, 2);
        match stream.take(&router, &second, |_| {}) {
            Ok(Taken::Counted(settings)) => assert!(settings.is_empty(), "{settings:?}"),
            other => panic!("the second report was not counted: {other:?}"),
        }
        streams.push(stream);
        reports.push(second);
    }
    let encoded = reports.iter().map(Message::encode_to_vec).collect();
    Fleet {
        router,
        streams,
        reports,
        encoded,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("report");
    for reflectors in [100, 5_000] {
        let mut f = fleet(reflectors);
        let mut next = 0usize;
        group.bench_function(format!("{reflectors}_reflectors/decode_alone"), |b| {
            b.iter(|| {
                next = (next + 1) % reflectors;
                ReflectorReport::decode(black_box(f.encoded[next].as_slice())).expect("decodes")
            })
        });
        group.bench_function(format!("{reflectors}_reflectors/take"), |b| {
            b.iter(|| {
                next = (next + 1) % reflectors;
                let Fleet {
                    router,
                    streams,
                    reports,
                    ..
                } = &mut f;
                let report = &mut reports[next];
                report.sequence += 1;
                streams[next].take(router, black_box(report), |_| {})
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
