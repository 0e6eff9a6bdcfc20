//! The pure part of one pool's sync at the scale of issue #13: what the leader computes on
//! every reconcile between reading its watch caches and writing to the apiserver.
//!
//! Two fleets, both in 10 regions with every reflector ready and reporting 20 shards:
//! - `pattern`: 5 000 reflectors, 100 000 concrete sessions from one `namePattern` Session
//!   (`room-*`) plus 3 exact-name Sessions;
//! - `named`: 500 reflectors and 10 000 exact-name Session objects, one shard each: the
//!   shape that costs most per Session object (status, problems, gauges and Events are
//!   worked out per object).
//!
//! Each is timed as the sync runs it (observe → planner input → plan → fleet view →
//! Session and pool statuses → per-Session gauges) and against its floor, the planner's
//! `plan` alone on the same input, which no sync can undercut. Run with
//! `cargo bench -p refleet-operator --bench sync`; docs/scale.md reports the ratios.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use kube::api::ObjectMeta;
use refleet_core::planner::{self, PlanInput};
use refleet_core::shard::shard_name;
use refleet_operator::controller::input::{PoolMemory, input_for, observed};
use refleet_operator::controller::observe::{HostedSession, LoadByPod, ReflectorLoad};
use refleet_operator::controller::pod::{pod_name, reflector_pod};
use refleet_operator::controller::status::{pool_status, session_statuses};
use refleet_operator::crd::{ReflectorPool, ReflectorPoolSpec, Session, SessionSpec};
use refleet_operator::fleet;

const NAMESPACE: &str = "games";
const POOL: &str = "pool";
const REGIONS: usize = 10;
const SHARDS_PER_REFLECTOR: usize = 20;
const NOW: u64 = 1_000;

/// One fleet as the sync finds it in its caches, with the memory of the plan before.
struct Fleet {
    pool: ReflectorPool,
    sessions: Vec<Session>,
    pods: Vec<Pod>,
    loads: LoadByPod,
    memory: PoolMemory,
}

fn pool() -> ReflectorPool {
    let regions: Vec<_> = (0..REGIONS)
        .map(|g| serde_json::json!({ "name": format!("region-{g}") }))
        .collect();
    let spec: ReflectorPoolSpec = serde_json::from_value(serde_json::json!({
        "defaults": {
            "image": "refleet-reflector:1",
            "capacity": { "sessions": SHARDS_PER_REFLECTOR, "users": 2000 },
            "maxReflectors": 10000,
        },
        "regions": regions,
        "files": { "publicURL": "https://files.test/" },
        "reflectorURL": { "template": "ws://{pod}.{region}.{namespace}.test/" }
    }))
    .expect("pool spec");
    ReflectorPool {
        metadata: meta(POOL),
        spec,
        status: None,
    }
}

fn session(name: &str, spec: serde_json::Value) -> Session {
    let mut spec_json =
        serde_json::json!({ "poolRef": { "name": POOL }, "appId": "app", "maxUsersPerShard": 100 });
    if let (Some(out), Some(extra)) = (spec_json.as_object_mut(), spec.as_object()) {
        out.extend(extra.clone());
    }
    let spec: SessionSpec = serde_json::from_value(spec_json).expect("session spec");
    Session {
        metadata: meta(name),
        spec,
        status: None,
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(NAMESPACE.to_owned()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        ..Default::default()
    }
}

/// `reflectors` ready pods, each reporting 20 shards named by `shard(i)` for its i-th slot
/// across the fleet.
fn fleet(reflectors: usize, sessions: Vec<Session>, shard: impl Fn(usize) -> String) -> Fleet {
    let pool = pool();
    let mut pods = Vec::with_capacity(reflectors);
    let mut loads = LoadByPod::new();
    for k in 0..reflectors {
        let g = k % REGIONS;
        let region = pool
            .spec
            .resolved_region(&format!("region-{g}"))
            .expect("region");
        let name = pod_name(POOL, &region.name, (k / REGIONS) as u32);
        let mut pod = reflector_pod(&pool, &region, &name);
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(format!("10.{}.{}.{}", k >> 16, (k >> 8) & 255, k & 255)),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let hosted = (0..SHARDS_PER_REFLECTOR)
            .map(|j| HostedSession {
                app_id: "app".into(),
                name: shard(k * SHARDS_PER_REFLECTOR + j),
                users: 1 + (j as u32 * 5) % 15,
            })
            .collect();
        loads.insert(
            name,
            ReflectorLoad {
                draining: false,
                sessions: hosted,
            },
        );
        pods.push(pod);
    }
    let mut fleet = Fleet {
        pool,
        sessions,
        pods,
        loads,
        memory: PoolMemory::default(),
    };
    // The steady state: the plan before adopted what the reflectors host.
    let (_, plan) = sync(&fleet);
    fleet.memory = PoolMemory {
        shards: plan.shards,
        history: plan.history,
        initialised: true,
        unheard_since: Default::default(),
        status_written: Default::default(),
    };
    fleet
}

fn input(f: &Fleet) -> (fleet::Observed, PlanInput) {
    let observed = observed(
        NAMESPACE,
        POOL,
        Some(&f.pool),
        &f.sessions,
        &f.pods,
        &f.loads,
    );
    let mut input = input_for(&observed, NAMESPACE, POOL, &f.sessions, &f.memory, NOW);
    // Every pod's load is read here: nobody is unheard, and the map stays empty.
    fleet::settle_unreported(&mut input, &mut f.memory.unheard_since.clone());
    (observed, input)
}

/// The pure steps of `controller::reconcile::sync`, in its order.
fn sync(f: &Fleet) -> (usize, planner::Plan) {
    let (observed, input) = input(f);
    let plan = planner::plan(&input);
    let view = fleet::fleet_view(&observed, input, &plan);
    let statuses = session_statuses(&f.sessions, Some(&f.pool), &plan, NOW);
    let id = fleet::pool_id(NAMESPACE, POOL);
    let gauges = fleet::session_gauges(&observed, &id, &plan.shards);
    let pool = pool_status(&f.pool, &plan, NOW);
    black_box((view, &statuses, gauges, pool));
    (statuses.len(), plan)
}

fn bench(c: &mut Criterion) {
    let arenas = (0..3).map(|a| {
        session(
            &format!("arena-{a}"),
            serde_json::json!({ "name": format!("arena-{a}") }),
        )
    });
    let mut sessions = vec![session(
        "rooms",
        serde_json::json!({ "namePattern": "room-*", "maxUsersPerShard": 20 }),
    )];
    sessions.extend(arenas);
    let pattern = fleet(5_000, sessions, |i| match i % 1_000 {
        0..=2 => shard_name(&format!("arena-{}", i % 1_000), (i / 1_000) as u32),
        _ => format!("room-{i}"),
    });
    let named_sessions = (0..10_000)
        .map(|i| {
            let name = format!("s-{i}");
            session(&name, serde_json::json!({ "name": name }))
        })
        .collect();
    let named = fleet(500, named_sessions, |i| format!("s-{i}"));

    let mut group = c.benchmark_group("sync");
    group.sample_size(10);
    for (label, f) in [
        ("pattern_100k_sessions_5k_reflectors", &pattern),
        ("named_10k_sessions_500_reflectors", &named),
    ] {
        let (_, input) = input(f);
        assert_eq!(
            input.shards.len(),
            f.pods.len() * SHARDS_PER_REFLECTOR,
            "{label}: every hosted shard adopted, none opened"
        );
        group.bench_function(format!("{label}/plan_alone"), |b| {
            b.iter(|| planner::plan(black_box(&input)))
        });
        group.bench_function(format!("{label}/sync"), |b| b.iter(|| sync(black_box(f))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
