//! Planner benchmark: one plan for 100 000 sessions over 10 000 reflectors in 10 regions.
//!
//! Every session already has shard 0 (ten per reflector) and one in nine is at its
//! threshold, so the plan also opens ~11 000 shards. Run with
//! `cargo bench -p refleet-core --bench planner`; the target is under 100 ms.
//!
//! Group `open_one_shard`: what a Route that finds a session full pays to open its next
//! shard on the same fleet, the way the router did it before (copy the pool's input, mark
//! the session waiting, plan the whole pool) against the way it does now (the session alone
//! on its pool's reflectors with the room the other shards hold taken off, `plan_shards`).
//! The room held is summed once per published plan, so it is built outside the timing.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use refleet_core::planner::{
    Capacity, HeldRoom, ObservedReflector, PlacementStrategy, PlanInput, PoolInput, ReflectorState,
    RegionInput, ScaleHistory, SessionInput, ShardPhase, ShardPolicy, ShardRecord, plan,
    plan_shards, pool_reflectors, session_input,
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
            growth_buffer_seconds: 0,
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

/// The first decision that opens a shard for `key`: `(shard, reflector)`.
fn opened(
    decisions: &[refleet_core::planner::Decision],
    key: &str,
) -> Option<(String, Option<String>)> {
    decisions.iter().find_map(|d| match d {
        refleet_core::planner::Decision::OpenShard {
            session,
            shard,
            reflector,
            ..
        } if session == key => Some((shard.clone(), reflector.clone())),
        _ => None,
    })
}

fn open_one_shard(c: &mut Criterion) {
    let input = fleet();
    // room-85: 85 users of 100, past the 0.8 threshold.
    let s = 85;
    let key = input.sessions[s].key.clone();
    let whole = |input: &PlanInput| {
        let mut copy = input.clone();
        copy.sessions[s].waiting = true;
        opened(&plan(&copy).decisions, &key)
    };
    let mut others = HeldRoom::default();
    for sh in input.shards.iter().filter(|sh| sh.session != key) {
        others.charge(sh);
    }
    // The router finds a session's shards by an index too.
    let own_shards: Vec<ShardRecord> = input
        .shards
        .iter()
        .filter(|sh| sh.session == key)
        .cloned()
        .collect();
    let alone = |input: &PlanInput| {
        let own = own_shards.clone();
        let mut session = input.sessions[s].clone();
        session.waiting = true;
        let reflectors = pool_reflectors(
            &input.reflectors,
            &input.pools[0].id,
            &session.policy.regions,
        )
        .map(|r| (r, others.of(&r.name)));
        let narrow = session_input(
            input.pools[0].clone(),
            session.clone(),
            own,
            reflectors,
            input.now,
        );
        opened(&plan_shards(&narrow).decisions, &key)
    };
    assert!(whole(&input).is_some(), "the whole plan opens a shard");
    assert_eq!(alone(&input), whole(&input), "both open the same shard");
    let mut group = c.benchmark_group("open_one_shard");
    group.sample_size(10);
    group.bench_function("whole_pool_100k_sessions_10k_reflectors", |b| {
        b.iter(|| whole(black_box(&input)))
    });
    group.bench_function("session_alone_100k_sessions_10k_reflectors", |b| {
        b.iter(|| alone(black_box(&input)))
    });
    group.finish();
}

criterion_group!(benches, bench, open_one_shard);
criterion_main!(benches);
