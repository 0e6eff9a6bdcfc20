//! # Opening one session's shards without planning its pool
//!
//! The router opens a shard the moment a Route finds every shard of a session at its
//! threshold. Planning the whole pool for that is O(pool) per new shard: every shard and
//! session copied into an input, every phase run, for one answer (at 8 500 shards it was
//! half of a saturated leader's core). The opening of one session only depends on its own
//! shards and on the room left on each reflector of its pool, so:
//!
//! - [`HeldRoom`] sums the room shards hold on reflectors, charged as the adopt phase
//!   charges it (a backend keeps one for its whole published plan and adjusts it);
//! - [`session_input`] builds an input of that session alone, whose reflectors offer only
//!   the room the other shards leave them;
//! - [`plan_shards`] runs only the phases that place shards.
//!
//! The shard it opens is the one [`plan`](super::plan) opens for the session when it comes
//! first in the input and no shard waits for a reflector (a property test holds them
//! equal). Two things the whole plan does first are left out: placing the other sessions'
//! shards that wait for a reflector, and opening other sessions' shards. Neither can
//! overfill a reflector: the next whole plan adopts the shard opened here before it places
//! anything, so those only get the room it leaves.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::model::*;
use super::state::PlanState;

/// Room held on one reflector: users committed and session slots taken. Signed, so that a
/// backend can take a session's own shards back out of a sum over every shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Users committed (each shard its `committed_users`).
    pub users: i64,
    /// Session slots taken (one per shard).
    pub sessions: i64,
}

impl Held {
    /// More than any reflector has: a reflector held so offers no room (one the caller
    /// cannot send users to).
    pub const ALL: Held = Held {
        users: i64::MAX / 4,
        sessions: i64::MAX / 4,
    };
}

impl std::ops::Add for Held {
    type Output = Held;

    fn add(self, other: Held) -> Held {
        Held {
            users: self.users + other.users,
            sessions: self.sessions + other.sessions,
        }
    }
}

/// The room shards hold, by reflector name, as the adopt phase charges it: a shard commits
/// its `committed_users` and one session slot on its reflector and, while it moves, on its
/// target too; a closing shard nobody is on holds nothing (the plan removes it).
#[derive(Clone, Debug, Default)]
pub struct HeldRoom(HashMap<String, Held>);

impl HeldRoom {
    /// Adds the room `shard` holds.
    pub fn charge(&mut self, shard: &ShardRecord) {
        self.apply(shard, 1);
    }

    /// Takes back the room `shard` holds (charged before).
    pub fn release(&mut self, shard: &ShardRecord) {
        self.apply(shard, -1);
    }

    fn apply(&mut self, shard: &ShardRecord, sign: i64) {
        if !holds_room(shard) {
            return;
        }
        let mut charge = |host: &str| {
            let held = match self.0.get_mut(host) {
                Some(held) => held,
                None => self.0.entry(host.to_owned()).or_default(),
            };
            held.users += sign * i64::from(shard.committed_users);
            held.sessions += sign;
        };
        if let Some(host) = &shard.reflector {
            charge(host);
        }
        // A move to the shard's own reflector holds its room once.
        if let Some(to) = shard
            .moving_to
            .as_ref()
            .filter(|&to| shard.reflector.as_ref() != Some(to))
        {
            charge(to);
        }
    }

    /// The room held on `reflector`.
    pub fn of(&self, reflector: &str) -> Held {
        self.0.get(reflector).copied().unwrap_or_default()
    }
}

/// Whether the adopt phase charges `shard`'s room: every shard but a closing one nobody is
/// on (users and reservations, as filled in).
pub fn holds_room(shard: &ShardRecord) -> bool {
    !(shard.phase == ShardPhase::Closing && shard.load() == 0)
}

/// `reflector` with the room `held` by other shards taken off its capacity (none left when
/// they hold more than it has, as the plan would find it).
pub fn with_room_left(reflector: &ObservedReflector, held: Held) -> ObservedReflector {
    ObservedReflector {
        capacity: room_left(reflector.capacity, held),
        ..reflector.clone()
    }
}

/// `capacity` less the room `held` (none left when it holds more).
pub fn room_left(capacity: Capacity, held: Held) -> Capacity {
    let left = |capacity: u32, held: i64| {
        u32::try_from((i64::from(capacity) - held).max(0)).unwrap_or(u32::MAX)
    };
    Capacity {
        users: left(capacity.users, held.users),
        sessions: left(capacity.sessions, held.sessions),
    }
}

/// The reflectors of `reflectors` that belong to pool `pool` and to the `regions` a
/// session may use (all, when it names none): what [`session_input`] takes, picked from a
/// whole input. (The router keeps them indexed by pool and region instead.)
pub fn pool_reflectors<'a>(
    reflectors: &'a [ObservedReflector],
    pool: &'a str,
    regions: &'a [String],
) -> impl Iterator<Item = &'a ObservedReflector> + 'a {
    reflectors
        .iter()
        .filter(move |r| r.pool == pool && (regions.is_empty() || regions.contains(&r.region)))
}

/// The input for opening shards of `session` alone: its `pool`, the session, its own
/// `shards` (with their load filled in), and `reflectors`: the pool's reflectors in the
/// regions the session may use ([`pool_reflectors`]), each with the room the pool's other
/// shards hold on it, which it offers less. For [`plan_shards`]: it carries no scaling
/// history, so sizing on it means nothing.
///
/// A reflector with no room left is left out unless one of `shards` is on it or moving to
/// it: it could take no shard, so copying it in costs the pool's size and changes nothing
/// but one count. That count, how many usable reflectors a region has against its
/// `maxReflectors`, is kept by lowering the region's `max_reflectors` by the usable
/// reflectors left out (at a few shards per reflector most of a pool is full, and this is
/// most of an opening's cost).
pub fn session_input<'a>(
    mut pool: PoolInput,
    session: SessionInput,
    shards: Vec<ShardRecord>,
    reflectors: impl IntoIterator<Item = (&'a ObservedReflector, Held)>,
    now: Seconds,
) -> PlanInput {
    let hosts: HashSet<&str> = shards
        .iter()
        .flat_map(|s| s.reflector.iter().chain(&s.moving_to))
        .map(String::as_str)
        .collect();
    let region_at: HashMap<&str, usize> = pool
        .regions
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), i))
        .collect();
    // Usable reflectors left out, by index in `pool.regions`.
    let mut left_out = vec![0u32; pool.regions.len()];
    let mut kept = Vec::new();
    for (r, held) in reflectors {
        let capacity = room_left(r.capacity, held);
        if (capacity.sessions == 0 || capacity.users == 0) && !hosts.contains(r.name.as_str()) {
            // Usable as the slot table counts it: its region's image, not draining.
            if let Some(&i) = region_at.get(r.region.as_str())
                && r.state != ReflectorState::Draining
                && r.image == pool.regions[i].image
            {
                left_out[i] += 1;
            }
            continue;
        }
        kept.push(ObservedReflector {
            capacity,
            ..r.clone()
        });
    }
    for (region, n) in pool.regions.iter_mut().zip(left_out) {
        region.max_reflectors = region.max_reflectors.saturating_sub(n);
    }
    PlanInput {
        reflectors: kept,
        pools: vec![pool],
        sessions: vec![session],
        shards,
        history: ScaleHistory::default(),
        move_requests: Vec::new(),
        now,
    }
}

/// The shards of a plan and the decisions about them, without the reflector phases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardPlan {
    /// Every shard that should exist, as in [`Plan::shards`] before moves.
    pub shards: Vec<ShardRecord>,
    /// The decisions about shards and sessions, in the order [`plan`](super::plan) takes them.
    pub decisions: Vec<Decision>,
}

/// The phases of [`plan`](super::plan) that place shards (index, adopt, place pending, each
/// session's closing and opening, shard phases), without draining, moves or sizing: what
/// a caller needs that only asks which shard opens where.
pub fn plan_shards(input: &PlanInput) -> ShardPlan {
    let mut state = PlanState::new(input);
    state.place_shards();
    ShardPlan {
        shards: state.shards,
        decisions: state.decisions,
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::fixture::*;
    use super::*;

    #[test]
    fn held_room_charges_hosts_as_adoption_does() {
        let mut room = HeldRoom::default();
        let placed = shard("a", 0, Some("r1"), 5);
        let mut moving = shard("a", 1, Some("r1"), 5);
        moving.moving_to = Some("r2".into());
        let mut onto_itself = shard("a", 2, Some("r2"), 0);
        onto_itself.moving_to = Some("r2".into());
        let mut closing_empty = shard("a", 3, Some("r1"), 0);
        closing_empty.phase = ShardPhase::Closing;
        let mut closing_used = shard("a", 4, Some("r1"), 0);
        closing_used.phase = ShardPhase::Closing;
        closing_used.reserved = 1;
        for s in [
            &placed,
            &moving,
            &onto_itself,
            &closing_empty,
            &closing_used,
        ] {
            room.charge(s);
        }
        assert_eq!(
            room.of("r1"),
            Held {
                users: 300,
                sessions: 3
            }
        );
        assert_eq!(
            room.of("r2"),
            Held {
                users: 200,
                sessions: 2
            }
        );
        assert_eq!(room.of("r3"), Held::default());
        room.release(&moving);
        assert_eq!(
            room.of("r1"),
            Held {
                users: 200,
                sessions: 2
            }
        );
        assert_eq!(
            room.of("r2"),
            Held {
                users: 100,
                sessions: 1
            }
        );
    }

    #[test]
    fn room_left_never_goes_below_nothing() {
        let r = reflector("r1", "eu");
        let cap = r.capacity;
        let some = with_room_left(
            &r,
            Held {
                users: 100,
                sessions: 1,
            },
        );
        assert_eq!(some.capacity.users, cap.users - 100);
        assert_eq!(some.capacity.sessions, cap.sessions - 1);
        let over = with_room_left(
            &r,
            Held {
                users: 10_000,
                sessions: 99,
            },
        );
        assert_eq!((over.capacity.users, over.capacity.sessions), (0, 0));
        let back = with_room_left(
            &r,
            Held {
                users: -5,
                sessions: 0,
            },
        );
        assert_eq!(back.capacity.users, cap.users + 5);
    }

    #[test]
    fn a_session_input_keeps_only_its_pool_and_the_room_others_leave() {
        let full = input(
            vec![reflector("eu-a", "eu"), reflector("us-a", "us")],
            vec![session("a"), session("b")],
            vec![shard("b", 0, Some("eu-a"), 10)],
        );
        let mut others = HeldRoom::default();
        others.charge(&full.shards[0]);
        let mut stranger = reflector("x", "eu");
        stranger.pool = "ns/other".into();
        let all: Vec<ObservedReflector> =
            full.reflectors.iter().chain([&stranger]).cloned().collect();
        let picked = |regions: &[String]| {
            pool_reflectors(&all, "ns/pool", regions)
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(picked(&[]), ["eu-a", "us-a"], "its pool only");
        assert_eq!(picked(&["us".into()]), ["us-a"], "the regions it may use");
        let narrow = session_input(
            full.pools[0].clone(),
            full.sessions[0].clone(),
            Vec::new(),
            pool_reflectors(&all, "ns/pool", &[]).map(|r| (r, others.of(&r.name))),
            full.now,
        );
        let names: Vec<&str> = narrow.reflectors.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["eu-a", "us-a"]);
        assert_eq!(
            narrow.reflectors[0].capacity.users,
            full.reflectors[0].capacity.users - 100
        );
        assert_eq!(narrow.reflectors[1].capacity, full.reflectors[1].capacity);
        assert_eq!(narrow.sessions.len(), 1);
    }

    #[test]
    fn a_reflector_without_room_is_left_out_and_still_counts_against_its_region_s_max() {
        let mut draining = reflector("eu-d", "eu");
        draining.state = ReflectorState::Draining;
        let mut full = input(
            vec![
                reflector("eu-a", "eu"),
                reflector("eu-b", "eu"),
                draining,
                reflector("us-a", "us"),
            ],
            vec![session("a")],
            vec![shard("a", 0, Some("eu-b"), 100)],
        );
        full.sessions[0].waiting = true;
        full.sessions[0].policy.regions = vec!["eu".into(), "us".into()];
        // Other shards fill every eu reflector; us-a is empty.
        let no_room_in_eu = |r: &str| {
            if r.starts_with("eu") {
                Held::ALL
            } else {
                Held::default()
            }
        };
        let alone = |max_eu: u32| {
            let mut pool = full.pools[0].clone();
            pool.regions[0].max_reflectors = max_eu;
            session_input(
                pool,
                full.sessions[0].clone(),
                full.shards.clone(),
                full.reflectors.iter().map(|r| (r, no_room_in_eu(&r.name))),
                full.now,
            )
        };
        let narrow = alone(10);
        let names: Vec<&str> = narrow.reflectors.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["eu-b", "us-a"], "eu-b hosts the session's shard");
        assert_eq!(narrow.reflectors[0].capacity.sessions, 0);
        let max: Vec<u32> = narrow.pools[0]
            .regions
            .iter()
            .map(|r| r.max_reflectors)
            .collect();
        assert_eq!(
            max,
            [9, 10],
            "eu-a counted; a draining reflector is not usable"
        );

        // The count decides: with room for one more reflector in eu the shard waits for it
        // there; at eu's max (eu-a and eu-b usable) it goes to us at once.
        let opened = |input: &PlanInput| {
            plan_shards(input)
                .decisions
                .into_iter()
                .find_map(|d| match d {
                    Decision::OpenShard {
                        region, reflector, ..
                    } => Some((region, reflector)),
                    _ => None,
                })
        };
        assert_eq!(opened(&alone(3)), Some(("eu".into(), None)));
        assert_eq!(opened(&alone(2)), Some(("us".into(), Some("us-a".into()))));
    }
}
