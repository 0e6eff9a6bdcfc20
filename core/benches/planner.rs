//! Planner benchmark: one plan for 100 000 sessions over 10 000 reflectors in 10 regions.
//!
//! Every session already has shard 0 (ten per reflector) and one in nine is at its
//! threshold, so the plan also opens ~11 000 shards. Run with
//! `cargo bench -p refleet-operator --bench planner`; the target is under 100 ms.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use refleet_core::planner::{
    Capacity, ObservedReflector, PlacementStrategy, PlanInput, PoolInput, ReflectorState,
    RegionInput, ScaleHistory, SessionInput, ShardPhase, ShardPolicy, ShardRecord, plan,
};
use refleet_core::shard::shard_name;

const REGIONS: usize = 10;
const REFLECTORS_PER_REGION: usize = 1_000;
const SESSIONS: usize = 100_000;

fn fleet() -> PlanInput {
    let pool = "games/pool";
    let capacity = Capacity {
        sessions: 20,
        users: 2_000,
    };
    let regions: Vec<RegionInput> = (0..REGIONS)
        .map(|g| RegionInput {
            name: format!("region-{g}"),
            image: "refleet-reflector:1".into(),
            capacity,
            min_reflectors: 1,
            max_reflectors: 2_000,
            warm_buffer: 5,
        })
        .collect();
    let reflectors = (0..REGIONS)
        .flat_map(|g| {
            (0..REFLECTORS_PER_REGION).map(move |k| ObservedReflector {
                name: format!("games/pool-region-{g}-{k}"),
                pool: pool.into(),
                region: format!("region-{g}"),
                image: "refleet-reflector:1".into(),
                capacity,
                state: ReflectorState::Ready,
                unreported: false,
            })
        })
        .collect();
    let mut sessions = Vec::with_capacity(SESSIONS);
    let mut shards = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let g = i % REGIONS;
        let k = (i / REGIONS) % REFLECTORS_PER_REGION;
        let name = format!("room-{i}");
        let key = format!("games/app/{name}");
        sessions.push(SessionInput {
            key: key.clone(),
            name: name.clone(),
            pool: pool.into(),
            policy: ShardPolicy {
                regions: vec![
                    format!("region-{g}"),
                    format!("region-{}", (g + 1) % REGIONS),
                ],
                ..ShardPolicy::default()
            },
            deleted: false,
            waiting: false,
        });
        let users = (i % 90) as u32;
        shards.push(ShardRecord {
            session: key,
            name: shard_name(&name, 0),
            index: 0,
            pool: pool.into(),
            region: format!("region-{g}"),
            reflector: Some(format!("games/pool-region-{g}-{k}")),
            committed_users: 100,
            users,
            reserved: 0,
            phase: ShardPhase::Open,
            empty_since: (users == 0).then_some(0),
            moving_to: None,
            moved_at: None,
        });
    }
    PlanInput {
        pools: vec![PoolInput {
            id: pool.into(),
            placement: PlacementStrategy::Pack,
            regions,
            cooldown: 300,
            drain_grace: 300,
            moves: Default::default(),
        }],
        sessions,
        reflectors,
        shards,
        history: ScaleHistory::new(),
        now: 30,
        move_requests: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let input = fleet();
    let p = plan(&input);
    assert_eq!(p.shards.len() - SESSIONS, 11_110, "shards opened");
    let mut group = c.benchmark_group("planner");
    group.sample_size(20);
    group.bench_function("plan_100k_sessions_10k_reflectors_10_regions", |b| {
        b.iter(|| plan(black_box(&input)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
