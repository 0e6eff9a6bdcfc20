//! Property tests: random fleets driven through random load histories, with the planner's
//! invariants checked after every step.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;

#[derive(Clone, Debug)]
struct Step {
    dt: Seconds,
    /// One number per shard slot; a shard's users are drawn from it.
    load: Vec<u32>,
    /// Toggle the deletion of this session (index modulo the session count).
    toggle_session: Option<usize>,
    /// Kill this reflector (index modulo the reflector count), losing its shards.
    crash: Option<usize>,
    /// Roll every region to a new image.
    new_image: bool,
}

fn region_strategy(name: &'static str) -> impl Strategy<Value = RegionInput> {
    (
        (1u32..6, 100u32..600, 0u32..3, 1u32..6, 0u32..3),
        prop::sample::select(vec![0u32, 0, 5, 60]),
    )
        .prop_map(move |((s, u, min, extra, warm), growth)| RegionInput {
            name: name.into(),
            image: "img:0".into(),
            capacity: Capacity {
                sessions: s,
                users: u,
            },
            min_reflectors: min,
            max_reflectors: min + extra,
            warm_buffer: warm,
            growth_buffer_seconds: growth,
        })
}

fn pool_strategy() -> impl Strategy<Value = PoolInput> {
    (
        prop::collection::vec(region_strategy("r"), 1..4),
        any::<bool>(),
        0u64..400,
        (any::<bool>(), 1u32..4),
    )
        .prop_map(|(mut regions, spread, cooldown, (moves, max_moves))| {
            for (i, r) in regions.iter_mut().enumerate() {
                r.name = format!("r{i}");
            }
            PoolInput {
                id: "ns/pool".into(),
                placement: if spread {
                    PlacementStrategy::Spread
                } else {
                    PlacementStrategy::Pack
                },
                regions,
                cooldown,
                drain_grace: 30,
                moves: MovePolicy {
                    enabled: moves,
                    max_concurrent: max_moves,
                    ..MovePolicy::default()
                },
            }
        })
}

fn session_strategy() -> impl Strategy<Value = ShardPolicy> {
    (
        10u32..250,
        1u32..=10,
        0u32..3,
        1u32..4,
        prop::collection::vec(0usize..3, 0..3),
        0u64..120,
    )
        .prop_map(
            |(max_users, tenths, min, extra, regions, idle)| ShardPolicy {
                max_users_per_shard: max_users,
                scale_up_threshold: f64::from(tenths) / 10.0,
                min_shards: min,
                max_shards: min.max(1) + extra,
                regions: regions.into_iter().map(|r| format!("r{r}")).collect(),
                close_idle_after: idle,
            },
        )
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        1u64..200,
        prop::collection::vec(any::<u32>(), 1..16),
        prop::option::weighted(0.15, 0usize..64),
        prop::option::weighted(0.1, 0usize..64),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(dt, load, toggle_session, crash, new_image)| Step {
            dt,
            load,
            toggle_session,
            crash,
            new_image,
        })
}

/// Applies a step of the world: time, load, deletions, crashes, image roll-outs.
fn world(mut input: PlanInput, step: &Step, image: &mut u32) -> PlanInput {
    if let Some(k) = step.toggle_session
        && !input.sessions.is_empty()
    {
        let n = k % input.sessions.len();
        input.sessions[n].deleted = !input.sessions[n].deleted;
    }
    if let Some(k) = step.crash
        && !input.reflectors.is_empty()
    {
        let n = k % input.reflectors.len();
        input.reflectors.remove(n);
    }
    if step.new_image {
        *image += 1;
        for r in &mut input.pools[0].regions {
            r.image = format!("img:{image}");
        }
    }
    for (i, shard) in input.shards.iter_mut().enumerate() {
        let draw = step.load[i % step.load.len()];
        if shard.reflector.is_none() {
            shard.users = 0;
            shard.reserved = 0;
        } else if shard.phase == ShardPhase::Closing {
            shard.users = shard.users.min(draw % (shard.users + 1));
            shard.reserved = 0;
        } else {
            // The reflector enforces the hard cap; half the time the shard empties.
            shard.users = if draw.is_multiple_of(2) {
                0
            } else {
                (draw / 2) % (shard.committed_users + 1)
            };
            shard.reserved = 0;
        }
    }
    input
}

fn check(input: &PlanInput, plan: &Plan) -> Result<(), TestCaseError> {
    // Deterministic.
    prop_assert_eq!(&super::super::plan(input), plan);

    let removed: HashSet<&str> = plan
        .reflectors
        .iter()
        .filter(|r| r.action == ReflectorAction::Remove)
        .map(|r| r.name.as_str())
        .collect();
    let observed: HashMap<&str, &ObservedReflector> = input
        .reflectors
        .iter()
        .map(|r| (r.name.as_str(), r))
        .collect();

    // One placement per shard; no shard on a removed or unknown reflector.
    // A moving shard holds room on its source and its target, so both count.
    let mut seen = HashSet::new();
    let mut load: HashMap<&str, (u64, u64)> = HashMap::new();
    for s in &plan.shards {
        prop_assert!(seen.insert((&s.session, s.index)), "shard {} twice", s.name);
        for r in s.hosts() {
            prop_assert!(!removed.contains(r), "{} on removed {r}", s.name);
            prop_assert!(observed.contains_key(r), "{} on unknown {r}", s.name);
            let l = load.entry(r).or_default();
            l.0 += 1;
            l.1 += u64::from(s.committed_users);
        }
    }
    // Never over capacity (the simulated fleet starts empty, so this holds at every step).
    for (name, (sessions, users)) in &load {
        let cap = observed[name].capacity;
        prop_assert!(
            *sessions <= u64::from(cap.sessions),
            "{name}: {sessions} shards"
        );
        prop_assert!(*users <= u64::from(cap.users), "{name}: {users} users");
    }
    // Stable packing: placed shards stay where they were.
    let before: HashMap<(&str, u32), &str> = input
        .shards
        .iter()
        .filter_map(|s| {
            s.reflector
                .as_deref()
                .map(|r| ((s.session.as_str(), s.index), r))
        })
        // A crashed reflector's shards are lost; the session may open a new shard 0.
        .filter(|(_, r)| observed.contains_key(r))
        .collect();
    let dropped: HashSet<(&str, &str)> = plan
        .decisions
        .iter()
        .filter_map(|d| match d {
            Decision::RemoveShard { session, shard, .. } => {
                Some((session.as_str(), shard.as_str()))
            }
            _ => None,
        })
        .collect();
    for s in &plan.shards {
        if dropped.contains(&(s.session.as_str(), s.name.as_str())) {
            continue; // removed and opened again under the same number
        }
        if let Some(&r) = before.get(&(s.session.as_str(), s.index)) {
            prop_assert_eq!(s.reflector.as_deref(), Some(r), "{} moved", &s.name);
        }
    }
    // New shards only go to ready reflectors of the current image that are not draining.
    for d in &plan.decisions {
        if let Decision::OpenShard {
            reflector: Some(r), ..
        } = d
        {
            let r = observed[r.as_str()];
            let image = &input.pools[0]
                .regions
                .iter()
                .find(|x| x.name == r.region)
                .map(|x| &x.image);
            prop_assert_eq!(r.state, ReflectorState::Ready);
            prop_assert_eq!(Some(&r.image), *image);
        }
    }
    // Moves: only when the pool moves shards, within its cap, to a ready reflector of the
    // current image in the source's region, and a moving shard takes no new users.
    let policy = &input.pools[0].moves;
    let moving: Vec<&ShardRecord> = plan
        .shards
        .iter()
        .filter(|s| s.moving_to.is_some())
        .collect();
    prop_assert!(policy.enabled || moving.is_empty());
    prop_assert!(
        moving.len() <= policy.max_concurrent as usize,
        "{} moving",
        moving.len()
    );
    for s in moving {
        prop_assert_eq!(s.phase, ShardPhase::Moving);
        prop_assert!(!s.routable());
        let (from, to) = (
            observed[s.reflector.as_deref().unwrap_or_default()],
            observed[s.moving_to.as_deref().unwrap_or_default()],
        );
        prop_assert_ne!(&from.name, &to.name);
        prop_assert_eq!(&from.region, &to.region);
        prop_assert_eq!(to.state, ReflectorState::Ready);
    }
    // Only drained reflectors are removed.
    for (r, p) in input.reflectors.iter().zip(&plan.reflectors) {
        if p.action == ReflectorAction::Remove {
            prop_assert_eq!(r.state, ReflectorState::Draining);
        }
    }
    Ok(())
}

/// A scaling event of one region: time, direction, urgent.
type ScaleEvent = (Seconds, ScaleDirection, bool);

fn scale_events(plan: &Plan, input: &PlanInput, now: Seconds) -> Vec<(String, ScaleEvent)> {
    let region_of: HashMap<&str, &str> = input
        .reflectors
        .iter()
        .map(|r| (r.name.as_str(), r.region.as_str()))
        .collect();
    let mut out = Vec::new();
    let mut down = HashSet::new();
    for d in &plan.decisions {
        match d {
            Decision::ScaleUp { region, urgent, .. } => {
                out.push((region.clone(), (now, ScaleDirection::Up, *urgent)));
            }
            Decision::DrainReflector {
                reflector,
                reason: DrainReason::Surplus,
                ..
            } => {
                let region = region_of[reflector.as_str()].to_owned();
                if down.insert(region.clone()) {
                    out.push((region, (now, ScaleDirection::Down, false)));
                }
            }
            _ => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn planner_invariants_hold_over_random_fleets_and_load_histories(
        pool in pool_strategy(),
        policies in prop::collection::vec(session_strategy(), 1..10),
        steps in prop::collection::vec(step_strategy(), 1..40),
    ) {
        let cooldown = pool.cooldown;
        let mut input = input_for(pool, policies);
        let mut serial = 0;
        let mut image = 0;
        let mut changes: HashMap<String, Vec<ScaleEvent>> = HashMap::new();
        let mut last: HashMap<String, ScaleDirection> = HashMap::new();
        for step in &steps {
            let plan = super::super::plan(&input);
            check(&input, &plan)?;
            for (region, event) in scale_events(&plan, &input, input.now) {
                if last.get(&region) != Some(&event.1) {
                    if last.contains_key(&region) {
                        changes.entry(region.clone()).or_default().push(event);
                    }
                    last.insert(region, event.1);
                }
            }
            let next = apply(&input, &plan, step.dt, &mut serial);
            input = world(next, step, &mut image);
        }
        // No flapping: two changes of direction in a region are a cool-down apart, unless
        // the later one is an urgent scale-up (users would otherwise be refused).
        for (region, events) in &changes {
            for pair in events.windows(2) {
                let ((t0, _, _), (t1, dir, urgent)) = (pair[0], pair[1]);
                prop_assert!(
                    t1 - t0 >= cooldown || (dir == ScaleDirection::Up && urgent),
                    "{region}: direction changed at {t0} and again at {t1} (cool-down {cooldown})"
                );
            }
        }
    }

    #[test]
    fn a_settled_plan_is_a_fixpoint(
        pool in pool_strategy(),
        policies in prop::collection::vec(session_strategy(), 1..10),
    ) {
        // With the load frozen, re-planning converges and then changes nothing.
        let mut input = input_for(pool, policies);
        let mut serial = 0;
        let mut plans = Vec::new();
        for _ in 0..12 {
            let plan = super::super::plan(&input);
            input = apply(&input, &plan, 100, &mut serial);
            plans.push(plan);
        }
        let last = plans.last().unwrap();
        let prev = &plans[plans.len() - 2];
        prop_assert_eq!(&last.shards, &prev.shards);
        let changes: Vec<_> = last
            .decisions
            .iter()
            .filter(|d| !matches!(d, Decision::SessionDegraded { .. } | Decision::ScaleHeld { .. }))
            .collect();
        prop_assert!(changes.is_empty(), "{:?}", changes);
    }
}

/// One pool and a session `s<i>` per policy, nothing observed yet.
fn input_for(pool: PoolInput, policies: Vec<ShardPolicy>) -> PlanInput {
    PlanInput {
        pools: vec![pool],
        sessions: policies
            .into_iter()
            .enumerate()
            .map(|(i, policy)| SessionInput {
                key: format!("ns/app/s{i}"),
                name: format!("s{i}"),
                pool: "ns/pool".into(),
                policy,
                deleted: false,
                waiting: false,
            })
            .collect(),
        ..PlanInput::default()
    }
}

/// Whether the whole plan of `input` places a shard that waits for a reflector before any
/// session opens one: a shard without a reflector, or (with moves on) one whose reflector
/// is gone, of a live session.
fn places_waiting_shards(input: &PlanInput) -> bool {
    let moves = input.pools.iter().any(|p| p.moves.enabled);
    input.shards.iter().any(|s| {
        let live = input
            .sessions
            .iter()
            .any(|x| x.key == s.session && !x.deleted);
        let gone = s
            .reflector
            .as_ref()
            .is_some_and(|r| !input.reflectors.iter().any(|x| &x.name == r));
        live && (s.reflector.is_none() || (gone && moves && s.phase != ShardPhase::Closing))
    })
}

/// The shard a plan opens for `key` (name, region, reflector), or the reasons it is degraded.
fn opening_of(
    decisions: &[Decision],
    key: &str,
) -> Result<(String, String, Option<String>), Vec<Reason>> {
    decisions
        .iter()
        .find_map(|d| match d {
            Decision::OpenShard {
                session,
                shard,
                region,
                reflector,
                ..
            } if session == key => Some((shard.clone(), region.clone(), reflector.clone())),
            _ => None,
        })
        .ok_or_else(|| {
            decisions
                .iter()
                .filter_map(|d| match d {
                    Decision::SessionDegraded {
                        session, reason, ..
                    } if session == key => Some(*reason),
                    _ => None,
                })
                .collect()
        })
}

/// For every live session of `input` with a client waiting, planning it alone
/// ([`session_input`], [`plan_shards`]) opens the shard the whole plan opens when it comes
/// first. Returns `(sessions compared, of which a shard opened)`.
fn alone_matches_whole(input: &PlanInput) -> Result<(usize, usize), TestCaseError> {
    if places_waiting_shards(input) {
        return Ok((0, 0));
    }
    let (mut compared, mut opened) = (0, 0);
    for (s, session) in input.sessions.iter().enumerate() {
        if session.deleted {
            continue;
        }
        let mut waiting = session.clone();
        waiting.waiting = true;
        let mut whole = input.clone();
        whole.sessions.remove(s);
        whole.sessions.insert(0, waiting.clone());
        let expected = opening_of(&super::super::plan(&whole).decisions, &session.key);

        let mut others = HeldRoom::default();
        let mut own = Vec::new();
        for shard in &input.shards {
            if shard.session == session.key {
                own.push(shard.clone());
            } else {
                others.charge(shard);
            }
        }
        let reflectors = pool_reflectors(
            &input.reflectors,
            &input.pools[0].id,
            &waiting.policy.regions,
        );
        let alone = session_input(
            input.pools[0].clone(),
            waiting.clone(),
            own,
            reflectors.map(|r| (r, others.of(&r.name))),
            input.now,
        );
        let got = opening_of(&plan_shards(&alone).decisions, &session.key);
        prop_assert_eq!(&got, &expected, "session {}", &session.key);
        compared += 1;
        opened += usize::from(got.is_ok());
    }
    Ok((compared, opened))
}

#[test]
fn one_session_planned_alone_opens_the_shard_the_whole_plan_opens() {
    use std::cell::Cell;
    let (compared, opened) = (Cell::new(0), Cell::new(0));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    });
    let strategy = (
        pool_strategy(),
        prop::collection::vec(session_strategy(), 1..10),
        prop::collection::vec(step_strategy(), 1..30),
    );
    runner
        .run(&strategy, |(pool, policies, steps)| {
            let mut input = input_for(pool, policies);
            let (mut serial, mut image) = (0, 0);
            for step in &steps {
                let (c, o) = alone_matches_whole(&input)?;
                compared.set(compared.get() + c);
                opened.set(opened.get() + o);
                let plan = super::super::plan(&input);
                let next = apply(&input, &plan, step.dt, &mut serial);
                input = world(next, step, &mut image);
            }
            Ok(())
        })
        .unwrap();
    // The comparison must have run, on openings as well as refusals.
    assert!(compared.get() > 500, "{} sessions compared", compared.get());
    assert!(opened.get() > 200, "{} openings compared", opened.get());
}
