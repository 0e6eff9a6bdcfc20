//! Table tests, one per rule, and property tests over random fleets and load histories.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

mod props;

const POOL: &str = "ns/pool";
pub(super) const CAP: Capacity = Capacity {
    sessions: 4,
    users: 400,
};

pub(super) fn region(name: &str) -> RegionInput {
    RegionInput {
        name: name.into(),
        image: "img:1".into(),
        capacity: CAP,
        min_reflectors: 1,
        max_reflectors: 10,
        warm_buffer: 0,
        growth_buffer_seconds: 0,
    }
}

pub(super) fn pool(regions: Vec<RegionInput>) -> PoolInput {
    PoolInput {
        id: POOL.into(),
        placement: PlacementStrategy::Pack,
        regions,
        cooldown: 300,
        drain_grace: 60,
        moves: Default::default(),
    }
}

pub(super) fn session(name: &str) -> SessionInput {
    SessionInput {
        key: name.into(),
        name: name.into(),
        pool: POOL.into(),
        policy: ShardPolicy::default(),
        deleted: false,
        waiting: false,
    }
}

pub(super) fn reflector(name: &str, region: &str) -> ObservedReflector {
    ObservedReflector {
        name: name.into(),
        pool: POOL.into(),
        region: region.into(),
        image: "img:1".into(),
        capacity: CAP,
        state: ReflectorState::Ready,
        unreported: false,
    }
}

fn shard(session: &str, index: u32, reflector: &str, users: u32) -> ShardRecord {
    ShardRecord {
        session: session.into(),
        name: shard_name(session, index),
        index,
        pool: POOL.into(),
        region: "eu".into(),
        reflector: Some(reflector.into()),
        committed_users: 100,
        users,
        reserved: 0,
        phase: ShardPhase::Open,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

pub(super) fn input(
    reflectors: Vec<ObservedReflector>,
    sessions: Vec<SessionInput>,
    shards: Vec<ShardRecord>,
) -> PlanInput {
    PlanInput {
        pools: vec![pool(vec![region("eu"), region("us")])],
        sessions,
        reflectors,
        shards,
        history: ScaleHistory::new(),
        now: 1000,
        move_requests: Vec::new(),
    }
}

/// Applies a plan as a controller would: shards and history carry over (moves complete),
/// drained reflectors drain, removed ones go, new ones start Ready (named `<region>-<n>`),
/// and time moves on.
pub(super) fn apply(input: &PlanInput, plan: &Plan, dt: Seconds, serial: &mut u32) -> PlanInput {
    let mut reflectors: Vec<ObservedReflector> = input
        .reflectors
        .iter()
        .zip(&plan.reflectors)
        .filter_map(|(r, p)| match p.action {
            ReflectorAction::Keep => Some(r.clone()),
            ReflectorAction::Drain { .. } => Some(ObservedReflector {
                state: ReflectorState::Draining,
                ..r.clone()
            }),
            ReflectorAction::Remove => None,
        })
        .collect();
    for region in &plan.regions {
        for _ in 0..region.create {
            *serial += 1;
            let spec = input
                .pools
                .iter()
                .find(|p| p.id == region.pool)
                .and_then(|p| p.regions.iter().find(|r| r.name == region.region))
                .unwrap();
            reflectors.push(ObservedReflector {
                name: format!("{}-{serial}", region.region),
                pool: region.pool.clone(),
                region: region.region.clone(),
                image: region.image.clone(),
                capacity: spec.capacity,
                state: ReflectorState::Ready,
                unreported: false,
            });
        }
    }
    // A move completes by the next plan: the target hosts the shard.
    let mut shards = plan.shards.clone();
    for shard in &mut shards {
        if let Some(to) = shard.moving_to.take() {
            shard.reflector = Some(to);
            shard.moved_at = Some(input.now);
        }
    }
    PlanInput {
        pools: input.pools.clone(),
        sessions: input.sessions.clone(),
        reflectors,
        shards,
        history: plan.history.clone(),
        now: input.now + dt,
        move_requests: Vec::new(),
    }
}

fn opened(plan: &Plan) -> Vec<(String, String, Option<String>)> {
    plan.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::OpenShard {
                shard,
                region,
                reflector,
                ..
            } => Some((shard.clone(), region.clone(), reflector.clone())),
            _ => None,
        })
        .collect()
}

fn degraded(plan: &Plan) -> Vec<Reason> {
    plan.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::SessionDegraded { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn action(plan: &Plan, name: &str) -> ReflectorAction {
    plan.reflectors
        .iter()
        .find(|r| r.name == name)
        .unwrap()
        .action
}

#[test]
fn new_session_opens_shard_zero_on_a_ready_reflector() {
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![],
    ));
    assert_eq!(
        opened(&plan),
        [("lobby".into(), "eu".into(), Some("eu-a".into()))]
    );
    assert_eq!(plan.shards[0].phase, ShardPhase::Open);
    assert_eq!(plan.shards[0].committed_users, 100);
}

#[test]
fn overflowing_session_opens_second_shard() {
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 80)],
    ));
    assert_eq!(
        opened(&plan),
        [("lobby~1".into(), "eu".into(), Some("eu-a".into()))]
    );
    assert_eq!(plan.shards[0].phase, ShardPhase::Full);
    assert_eq!(plan.shards[1].phase, ShardPhase::Open);
}

#[test]
fn session_below_its_threshold_opens_nothing() {
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 79)],
    ));
    assert!(opened(&plan).is_empty());
}

#[test]
fn reservations_count_toward_the_threshold() {
    let mut s = shard("lobby", 0, "eu-a", 70);
    s.reserved = 10;
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![s],
    ));
    assert_eq!(opened(&plan).len(), 1);
}

#[test]
fn lowest_free_shard_number_is_reused() {
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 90), shard("lobby", 2, "eu-a", 90)],
    ));
    assert_eq!(opened(&plan)[0].0, "lobby~1");
}

#[test]
fn session_at_max_shards_opens_no_more_and_says_why() {
    let mut s = session("lobby");
    s.policy.max_shards = 2;
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![s],
        vec![shard("lobby", 0, "eu-a", 90), shard("lobby", 1, "eu-a", 90)],
    ));
    assert!(opened(&plan).is_empty());
    assert_eq!(degraded(&plan), [Reason::MaxShardsReached]);
}

#[test]
fn min_shards_opens_several_shards_at_once() {
    let mut s = session("lobby");
    s.policy.min_shards = 3;
    let plan = plan(&input(vec![reflector("eu-a", "eu")], vec![s], vec![]));
    let names: Vec<_> = opened(&plan).into_iter().map(|o| o.0).collect();
    assert_eq!(names, ["lobby", "lobby~1", "lobby~2"]);
}

#[test]
fn packing_fills_the_fullest_reflector_with_room() {
    let plan = plan(&input(
        vec![
            reflector("eu-a", "eu"),
            reflector("eu-b", "eu"),
            reflector("eu-c", "eu"),
        ],
        vec![session("x"), session("y"), session("new")],
        vec![
            shard("x", 0, "eu-a", 1),
            shard("y", 0, "eu-b", 1),
            shard("y", 1, "eu-b", 1),
        ],
    ));
    assert_eq!(
        opened(&plan),
        [("new".into(), "eu".into(), Some("eu-b".into()))]
    );
}

#[test]
fn spreading_puts_new_shards_on_the_emptiest_reflector() {
    let mut i = input(
        vec![
            reflector("eu-a", "eu"),
            reflector("eu-b", "eu"),
            reflector("eu-c", "eu"),
        ],
        vec![session("x"), session("y"), session("new")],
        vec![shard("x", 0, "eu-a", 1), shard("y", 0, "eu-b", 1)],
    );
    i.pools[0].placement = PlacementStrategy::Spread;
    let plan = plan(&i);
    assert_eq!(
        opened(&plan),
        [("new".into(), "eu".into(), Some("eu-c".into()))]
    );
}

#[test]
fn a_full_reflector_gets_no_shard_and_the_region_grows_instead() {
    let full: Vec<_> = (0..4).map(|n| shard("big", n, "eu-a", 90)).collect();
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("big")],
        full,
    ));
    assert_eq!(opened(&plan), [("big~4".into(), "eu".into(), None)]);
    assert_eq!(plan.shards[4].phase, ShardPhase::Pending);
    let up = plan
        .decisions
        .iter()
        .find(|d| matches!(d, Decision::ScaleUp { .. }))
        .unwrap();
    assert!(matches!(
        up,
        Decision::ScaleUp {
            reason: ScaleUpReason::PendingShards,
            urgent: true,
            from: 1,
            to: 2,
            ..
        }
    ));
    assert_eq!(plan.regions[0].create, 1);
}

#[test]
fn pending_shard_lands_on_the_new_reflector_once_it_is_ready() {
    let full: Vec<_> = (0..4).map(|n| shard("big", n, "eu-a", 90)).collect();
    let first = input(vec![reflector("eu-a", "eu")], vec![session("big")], full);
    let p1 = plan(&first);
    let mut serial = 0;
    let p2 = plan(&apply(&first, &p1, 5, &mut serial));
    let s = p2.shards.iter().find(|s| s.name == "big~4").unwrap();
    assert_eq!(s.reflector.as_deref(), Some("eu-1"));
    assert_eq!(s.phase, ShardPhase::Open);
    assert!(opened(&p2).is_empty());
}

#[test]
fn full_region_at_max_falls_back_to_next_allowed_region() {
    let mut i = input(
        vec![reflector("eu-a", "eu"), reflector("us-a", "us")],
        vec![session("big")],
        (0..4).map(|n| shard("big", n, "eu-a", 90)).collect(),
    );
    i.pools[0].regions[0].max_reflectors = 1;
    let plan = plan(&i);
    let Some(Decision::OpenShard {
        region,
        reflector,
        fell_back_from,
        ..
    }) = plan
        .decisions
        .iter()
        .find(|d| matches!(d, Decision::OpenShard { .. }))
    else {
        panic!("no shard opened: {:?}", plan.decisions);
    };
    assert_eq!(
        (region.as_str(), reflector.as_deref()),
        ("us", Some("us-a"))
    );
    assert_eq!(fell_back_from, &["eu".to_owned()]);
}

#[test]
fn every_region_at_max_reports_capacity_exhausted() {
    let mut i = input(
        vec![reflector("eu-a", "eu")],
        vec![session("big")],
        (0..4).map(|n| shard("big", n, "eu-a", 90)).collect(),
    );
    i.pools[0].regions[0].max_reflectors = 1;
    i.sessions[0].policy.regions = vec!["eu".into()];
    let plan = plan(&i);
    assert!(opened(&plan).is_empty());
    assert_eq!(degraded(&plan), [Reason::CapacityExhausted]);
}

#[test]
fn idle_shard_closes_after_its_idle_period_and_is_removed_once_empty() {
    let mut idle = shard("lobby", 1, "eu-a", 0);
    idle.empty_since = Some(1000 - 60);
    let first = input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 10), idle],
    );
    let p1 = plan(&first);
    assert_eq!(p1.shards[1].phase, ShardPhase::Closing);
    assert!(!p1.shards[1].routable());
    assert!(p1.decisions.contains(&Decision::CloseShard {
        session: "lobby".into(),
        shard: "lobby~1".into(),
        reason: CloseReason::Idle
    }));
    let p2 = plan(&apply(&first, &p1, 5, &mut 0));
    assert_eq!(p2.shards.len(), 1);
    assert!(p2.decisions.contains(&Decision::RemoveShard {
        session: "lobby".into(),
        shard: "lobby~1".into(),
        reason: RemoveReason::ClosedEmpty
    }));
}

#[test]
fn the_last_idle_shard_below_the_threshold_stays_as_the_standby() {
    // Shard 0 is at its threshold (80 of 100 by default): closing the idle shard 1 would only
    // make the opening rule open another one. Once shard 0 drops below, shard 1 closes.
    let mut idle = shard("lobby", 1, "eu-a", 0);
    idle.empty_since = Some(0);
    let busy = input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 80), idle.clone()],
    );
    let p = plan(&busy);
    assert_eq!(p.shards[1].phase, ShardPhase::Open, "{:?}", p.decisions);
    assert!(
        !p.decisions
            .iter()
            .any(|d| matches!(d, Decision::CloseShard { .. } | Decision::OpenShard { .. })),
        "no churn: {:?}",
        p.decisions
    );
    let quiet = input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 79), idle],
    );
    assert_eq!(plan(&quiet).shards[1].phase, ShardPhase::Closing);
}

#[test]
fn shard_empty_for_less_than_its_idle_period_stays_open() {
    let mut idle = shard("lobby", 1, "eu-a", 0);
    idle.empty_since = Some(1000 - 59);
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 10), idle],
    ));
    assert_eq!(plan.shards[1].phase, ShardPhase::Open);
}

#[test]
fn min_shards_keeps_an_idle_shard_open() {
    let mut idle = shard("lobby", 0, "eu-a", 0);
    idle.empty_since = Some(0);
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![idle],
    ));
    assert_eq!(plan.shards[0].phase, ShardPhase::Open);
}

#[test]
fn closing_shard_with_returning_users_stays_closing_until_empty() {
    let mut s = shard("lobby", 1, "eu-a", 3);
    s.phase = ShardPhase::Closing;
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 10), s],
    ));
    assert_eq!(plan.shards[1].phase, ShardPhase::Closing);
}

#[test]
fn deleted_session_stops_routing_and_lets_its_shards_empty() {
    let mut s = session("lobby");
    s.deleted = true;
    let first = input(
        vec![reflector("eu-a", "eu")],
        vec![s],
        vec![shard("lobby", 0, "eu-a", 10), shard("lobby", 1, "eu-a", 0)],
    );
    let p1 = plan(&first);
    assert!(opened(&p1).is_empty());
    assert!(p1.shards.iter().all(|s| s.phase == ShardPhase::Closing));
    let p2 = plan(&apply(&first, &p1, 5, &mut 0));
    let names: Vec<_> = p2.shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["lobby"],
        "the shard with users stays until it empties"
    );
}

#[test]
fn changed_image_drains_old_reflectors_while_new_ones_take_new_shards() {
    let mut first = input(
        vec![reflector("eu-a", "eu")],
        vec![session("old"), session("new")],
        vec![shard("old", 0, "eu-a", 10)],
    );
    first.pools[0].regions[0].image = "img:2".into();
    first.sessions[1].policy.regions = vec!["eu".into()];
    let p1 = plan(&first);
    assert!(matches!(
        action(&p1, "eu-a"),
        ReflectorAction::Drain { deadline: 1060 }
    ));
    assert_eq!(opened(&p1), [("new".into(), "eu".into(), None)]);
    assert_eq!(p1.regions[0].create, 1);
    let mut serial = 0;
    let second = apply(&first, &p1, 5, &mut serial);
    let p2 = plan(&second);
    let new = p2.shards.iter().find(|s| s.name == "new").unwrap();
    assert_eq!(new.reflector.as_deref(), Some("eu-1"));
    assert_eq!(
        action(&p2, "eu-a"),
        ReflectorAction::Keep,
        "still hosts `old`"
    );
    let old = p2.shards.iter().find(|s| s.name == "old").unwrap();
    assert_eq!(
        old.reflector.as_deref(),
        Some("eu-a"),
        "live shards are not moved"
    );
}

#[test]
fn draining_reflector_is_removed_only_when_empty() {
    let mut r = reflector("eu-a", "eu");
    r.state = ReflectorState::Draining;
    let busy = plan(&input(
        vec![r.clone(), reflector("eu-b", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 1)],
    ));
    assert_eq!(action(&busy, "eu-a"), ReflectorAction::Keep);
    let empty = plan(&input(vec![r, reflector("eu-b", "eu")], vec![], vec![]));
    assert_eq!(action(&empty, "eu-a"), ReflectorAction::Remove);
}

#[test]
fn surplus_empty_reflectors_drain_then_are_removed() {
    let first = input(
        vec![
            reflector("eu-a", "eu"),
            reflector("eu-b", "eu"),
            reflector("eu-c", "eu"),
        ],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 10)],
    );
    let p1 = plan(&first);
    assert_eq!(action(&p1, "eu-a"), ReflectorAction::Keep);
    assert!(matches!(action(&p1, "eu-b"), ReflectorAction::Drain { .. }));
    assert!(matches!(action(&p1, "eu-c"), ReflectorAction::Drain { .. }));
    let p2 = plan(&apply(&first, &p1, 5, &mut 0));
    assert_eq!(action(&p2, "eu-b"), ReflectorAction::Remove);
    assert_eq!(action(&p2, "eu-c"), ReflectorAction::Remove);
}

#[test]
fn warm_buffer_keeps_empty_ready_reflectors() {
    let mut i = input(
        vec![reflector("eu-a", "eu")],
        vec![session("lobby")],
        vec![],
    );
    i.pools[0].regions[0].warm_buffer = 2;
    let plan = plan(&i);
    assert_eq!(plan.regions[0].desired, 3);
    assert_eq!(plan.regions[0].create, 2);
    assert!(plan.decisions.iter().any(|d| matches!(
        d,
        Decision::ScaleUp {
            reason: ScaleUpReason::WarmBuffer,
            urgent: false,
            ..
        }
    )));
}

#[test]
fn min_reflectors_is_restored_at_once() {
    let plan = plan(&input(vec![], vec![], vec![]));
    assert_eq!(plan.regions[0].create, 1);
    assert_eq!(plan.regions[1].create, 1);
}

#[test]
fn scale_down_waits_a_cooldown_after_a_scale_up() {
    let mut i = input(
        vec![reflector("eu-a", "eu"), reflector("eu-b", "eu")],
        vec![],
        vec![],
    );
    i.history.insert(
        (POOL.into(), "eu".into()),
        RegionHistory {
            last_direction: Some(ScaleDirection::Up),
            last_change_at: 800,
            last_up_at: Some(900),
            last_down_at: None,
            demand: Vec::new(),
        },
    );
    let held = plan(&i);
    assert_eq!(action(&held, "eu-b"), ReflectorAction::Keep);
    assert!(held.decisions.contains(&Decision::ScaleHeld {
        pool: POOL.into(),
        region: "eu".into(),
        direction: ScaleDirection::Down,
        until: 1200
    }));
    i.now = 1200;
    let later = plan(&i);
    assert!(matches!(
        action(&later, "eu-b"),
        ReflectorAction::Drain { .. }
    ));
    let h = &later.history[&(POOL.to_owned(), "eu".to_owned())];
    assert_eq!(
        (h.last_direction, h.last_change_at),
        (Some(ScaleDirection::Down), 1200)
    );
}

#[test]
fn warm_buffer_refill_waits_a_cooldown_after_a_scale_down_but_pending_shards_do_not() {
    let mut i = input(vec![reflector("eu-a", "eu")], vec![], vec![]);
    i.pools[0].regions[0].warm_buffer = 1;
    i.history.insert(
        (POOL.into(), "eu".into()),
        RegionHistory {
            last_direction: Some(ScaleDirection::Down),
            last_change_at: 900,
            last_up_at: None,
            last_down_at: Some(900),
            demand: Vec::new(),
        },
    );
    let held = plan(&i);
    assert_eq!(held.regions[0].create, 0);
    // A shard with nowhere to go overrides the hold.
    i.sessions = vec![session("big")];
    i.shards = (0..4).map(|n| shard("big", n, "eu-a", 90)).collect();
    i.sessions[0].policy.regions = vec!["eu".into()];
    let urgent = plan(&i);
    assert_eq!(urgent.regions[0].create, 2);
}

#[test]
fn shards_on_a_vanished_reflector_are_dropped() {
    let plan = plan(&input(
        vec![reflector("eu-b", "eu")],
        vec![session("lobby")],
        vec![shard("lobby", 0, "eu-a", 10)],
    ));
    assert!(plan.decisions.contains(&Decision::RemoveShard {
        session: "lobby".into(),
        shard: "lobby".into(),
        reason: RemoveReason::ReflectorGone
    }));
    assert_eq!(
        opened(&plan),
        [("lobby".into(), "eu".into(), Some("eu-b".into()))]
    );
}

#[test]
fn unknown_region_and_missing_pool_degrade_the_session() {
    let mut bad_region = session("a");
    bad_region.policy.regions = vec!["mars".into(), "eu".into()];
    let mut no_pool = session("b");
    no_pool.pool = "ns/other".into();
    let plan = plan(&input(
        vec![reflector("eu-a", "eu")],
        vec![bad_region, no_pool],
        vec![],
    ));
    assert_eq!(
        degraded(&plan),
        [Reason::UnknownRegion, Reason::PoolNotFound]
    );
    assert_eq!(
        opened(&plan),
        [("a".into(), "eu".into(), Some("eu-a".into()))]
    );
}

#[test]
fn reflectors_of_a_removed_region_drain() {
    let plan = plan(&input(vec![reflector("ap-a", "ap")], vec![], vec![]));
    assert!(plan.decisions.iter().any(|d| matches!(
        d,
        Decision::DrainReflector {
            reason: DrainReason::RegionRemoved,
            ..
        }
    )));
}

#[test]
fn replanning_an_applied_plan_changes_nothing() {
    let first = input(
        vec![reflector("eu-a", "eu"), reflector("us-a", "us")],
        vec![session("a"), session("b"), session("c")],
        vec![],
    );
    let p1 = plan(&first);
    let second = apply(&first, &p1, 1, &mut 0);
    let p2 = plan(&second);
    assert!(p2.decisions.is_empty(), "{:?}", p2.decisions);
    assert_eq!(p2.shards, p1.shards);
}
