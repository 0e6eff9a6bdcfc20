//! A Route that opens a shard, at the fleet sizes of run E and issue #13.
//!
//! Run E (docs/scale.md) gave each reflector 5 shards, so almost every new room needed a
//! new shard, and 72 % of the leader's core went to Routes that open one: each cost grew
//! with the reflectors of the pool and with every shard the app's reflectors reported. This
//! benchmark times such a Route beside its floor, a Route of the same fleet that reserves a
//! place on a shard with room, so the ratio shows what opening adds.
//!
//! The fleet: one pool in 10 regions, every reflector hosting 19 `room-*` shards of one
//! app and reporting them on its stream, with one slot free on each reflector or (the
//! `one_in_ten_with_room` case) on one in ten; every other shard is past its threshold (90
//! of 100 users, a new shard at 80). An opening Route asks for a full room:
//! the router plans the room's Session alone and opens its second shard on a reflector
//! with a free slot, answered at once. A floor Route asks for a room with 10 users. Each
//! Route asks for another room, and every [`CHUNK`] Routes the router is built again
//! (outside the timing), so the shards it opened stay as few as between two syncs of a
//! real leader.
//!
//! Run with `cargo bench -p refleet-operator --bench open`; docs/scale.md reports it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};

use refleet_api::routing::RouteRequest;

mod support;
use support::{NAMESPACE, Shape, report, room, router};

const SHARDS_PER_REFLECTOR: usize = 19;

/// Routes timed per router built: about what a leader opens between two syncs in run E.
const CHUNK: u64 = 50;

/// Every reflector has one slot free.
const SPARE_SLOT_ON_EACH: fn(usize) -> u32 = |_| SHARDS_PER_REFLECTOR as u32 + 1;

/// One reflector in ten has a slot free, the others are full: most of a fleet of small
/// reflectors, as in run E.
const SPARE_SLOT_ON_ONE_IN_TEN: fn(usize) -> u32 =
    |i| SHARDS_PER_REFLECTOR as u32 + u32::from(i.is_multiple_of(10));

/// Users on shard `j` of a reflector: even shards are past the threshold.
fn users(j: usize) -> u32 {
    if j.is_multiple_of(2) { 90 } else { 10 }
}

/// Times `iters` Routes, each to the room `pick(n)` for the n-th Route of its router,
/// building the router again every [`CHUNK`] Routes; `opens` says what each must do.
fn time_routes(
    rt: &tokio::runtime::Runtime,
    shape: &Shape,
    iters: u64,
    pick: impl Fn(u64) -> String,
    opens: bool,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        left -= n;
        let router = router(shape);
        for i in 0..shape.reflectors {
            router.observe_report(&report(shape, i, 1));
        }
        let requests: Vec<RouteRequest> = (0..n)
            .map(|k| RouteRequest {
                namespace: NAMESPACE.into(),
                session: pick(k),
                preferred_region: String::new(),
                user_id: String::new(),
            })
            .collect();
        let start = Instant::now();
        for req in &requests {
            let answer = rt
                .block_on(router.route(black_box(req), |_| Ok(())))
                .expect("routed");
            black_box(&answer);
        }
        total += start.elapsed();
        // Checked outside the timing: each Route did what it was timed for.
        for req in &requests {
            let shards = router.list_shards(NAMESPACE, &req.session).expect("listed");
            assert_eq!(
                shards.iter().any(|s| s.shard.ends_with("~1")),
                opens,
                "{}: a second shard opened is {}: {shards:?}",
                req.session,
                if opens { "wanted" } else { "not wanted" }
            );
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("route");
    group.sample_size(20);
    let shapes = [
        (1_000, "", SPARE_SLOT_ON_EACH as fn(usize) -> u32),
        (5_000, "", SPARE_SLOT_ON_EACH),
        (5_000, "_one_in_ten_with_room", SPARE_SLOT_ON_ONE_IN_TEN),
    ];
    for (reflectors, which, slots) in shapes {
        let shape = Shape {
            reflectors,
            shards_per_reflector: SHARDS_PER_REFLECTOR,
            slots,
            users,
        };
        // The n-th Route of a router asks for a room on the n-th reflector (spread over the
        // regions): shard 0 (full) to open, shard 1 (room left) for the floor.
        let on = |j: usize| move |n: u64| room(&shape, n as usize % reflectors, j);
        group.bench_function(format!("{reflectors}_reflectors{which}/with_room"), |b| {
            b.iter_custom(|iters| time_routes(&rt, &shape, iters, on(1), false))
        });
        group.bench_function(format!("{reflectors}_reflectors{which}/opening"), |b| {
            b.iter_custom(|iters| time_routes(&rt, &shape, iters, on(0), true))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
