//! The state the phases of [`plan`](super::plan) share: the input, the capacity ledger, the
//! plan being built and each phase's working data. [`PlanState::new`] is the first phase
//! (index what is observed), [`PlanState::finish`] the last (emit the [`Plan`]).

use rustc_hash::FxHashMap as HashMap;

use super::model::*;
use super::slots::SlotTable;

/// In [`PlanState::owner`]: the shard's session is gone from the input.
pub(super) const NO_SESSION: usize = usize::MAX;

/// Everything the phases read and build. Fields are filled in phase order; a phase may read
/// what an earlier phase wrote, never what a later one will.
pub(super) struct PlanState<'a> {
    pub(super) input: &'a PlanInput,
    /// Capacity left on every reflector, observed or to create, and placement by region.
    pub(super) table: SlotTable<'a>,
    /// Session key → index in `input.sessions`.
    pub(super) session_ids: HashMap<&'a str, usize>,
    /// Reflector name → index in `input.reflectors`, which is also its slot in the ledger.
    pub(super) reflector_ids: HashMap<&'a str, usize>,

    /// The plan's shards: carried ones first, in input order, then the opened ones.
    pub(super) shards: Vec<ShardRecord>,
    /// The session index of each shard in `shards` ([`NO_SESSION`]: its session is gone).
    pub(super) owner: Vec<usize>,
    /// Carried shards without a reflector, by index in `shards`.
    pub(super) pending: Vec<usize>,
    /// Pending shards whose reflector vanished: placed in their own region first.
    pub(super) own_region_first: rustc_hash::FxHashSet<usize>,
    /// The carried shards of each session.
    pub(super) by_session: BySession,
    /// The regions the current session may use, in its order (reused across sessions: the
    /// planner runs over 100 000 of them).
    pub(super) allowed: Vec<usize>,
    /// Region names the current session lists that its pool lacks (reused likewise).
    pub(super) unknown: Vec<&'a str>,

    /// What to do with each observed reflector, in input order.
    pub(super) actions: Vec<ReflectorAction>,
    /// Per region (index in `table.regions`): counts and sizing.
    pub(super) tallies: Vec<RegionTally>,
    /// The scaling history, updated by the regions that scale.
    pub(super) history: ScaleHistory,

    pub(super) decisions: Vec<Decision>,
}

/// Shards grouped by session as one flat array (one allocation, not one per session):
/// session `s` owns `shards[start[s]..start[s + 1]]`.
#[derive(Default)]
pub(super) struct BySession {
    pub(super) start: Vec<usize>,
    pub(super) shards: Vec<usize>,
}

impl BySession {
    /// Groups shard indexes by their session (`owner[i]` is the session of shard `i`).
    pub(super) fn new(owner: &[usize], sessions: usize) -> Self {
        let mut start = vec![0usize; sessions + 1];
        for &s in owner {
            if s != NO_SESSION {
                start[s + 1] += 1;
            }
        }
        for s in 0..sessions {
            start[s + 1] += start[s];
        }
        let mut shards = vec![0usize; start[sessions]];
        let mut fill = start.clone();
        for (i, &s) in owner.iter().enumerate() {
            if s != NO_SESSION {
                shards[fill[s]] = i;
                fill[s] += 1;
            }
        }
        Self { start, shards }
    }

    /// The shards of session `s`; `mut` because closing sorts them.
    pub(super) fn of(&mut self, s: usize) -> &mut [usize] {
        &mut self.shards[self.start[s]..self.start[s + 1]]
    }
}

/// One region's reflectors once every shard is placed, and its sizing.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct RegionTally {
    /// Empty usable observed reflectors (indexes in `input.reflectors`): the only ones a
    /// scale-down may drain, since a reflector hosting a shard is never removed.
    pub(super) empties: Vec<usize>,
    /// Usable reflectors hosting at least one shard.
    pub(super) busy: u32,
    pub(super) ready: u32,
    pub(super) starting: u32,
    pub(super) draining: u32,
    pub(super) committed_shards: u64,
    pub(super) committed_users: u64,
    /// Usable reflectors the region should have.
    pub(super) desired: u32,
    /// Empty reflectors kept for the region's recent growth.
    pub(super) growth_buffer: u32,
    /// Reflectors to create now.
    pub(super) create: u32,
}

impl<'a> PlanState<'a> {
    /// The ledger of observed reflectors by region and the lookups by session key and
    /// reflector name that the later phases resolve names with.
    pub(super) fn new(input: &'a PlanInput) -> Self {
        let session_ids = input
            .sessions
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key.as_str(), i))
            .collect();
        let reflector_ids = input
            .reflectors
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let capacity = input.shards.len() + input.sessions.len();
        Self {
            input,
            table: SlotTable::new(input),
            session_ids,
            reflector_ids,
            shards: Vec::with_capacity(capacity),
            owner: Vec::with_capacity(capacity),
            pending: Vec::new(),
            own_region_first: Default::default(),
            by_session: BySession::default(),
            allowed: Vec::new(),
            unknown: Vec::new(),
            actions: vec![ReflectorAction::Keep; input.reflectors.len()],
            tallies: Vec::new(),
            history: input.history.clone(),
            decisions: Vec::new(),
        }
    }

    /// The name of the observed reflector in `slot`; `None` for one the plan creates.
    pub(super) fn reflector_name(&self, slot: usize) -> Option<String> {
        self.table.slots[slot]
            .real
            .map(|i| self.input.reflectors[i].name.clone())
    }

    /// Emits the plan, with one [`RegionPlan`] per region in pool order.
    pub(super) fn finish(self) -> Plan {
        let input = self.input;
        let regions = self
            .table
            .regions
            .iter()
            .zip(self.tallies)
            .map(|(region, t)| RegionPlan {
                pool: input.pools[region.pool].id.clone(),
                region: region.spec.name.clone(),
                image: region.spec.image.clone(),
                ready: t.ready,
                starting: t.starting,
                draining: t.draining,
                desired: t.desired,
                growth_buffer: t.growth_buffer,
                create: t.create,
                committed_shards: t.committed_shards,
                committed_users: t.committed_users,
            })
            .collect();
        Plan {
            shards: self.shards,
            reflectors: input
                .reflectors
                .iter()
                .zip(self.actions)
                .map(|(r, action)| ReflectorPlan {
                    name: r.name.clone(),
                    action,
                })
                .collect(),
            regions,
            decisions: self.decisions,
            history: self.history,
        }
    }
}

/// Small inputs for the phase tests: pool `ns/pool` with regions `eu` and `us` (capacity 4
/// sessions, 400 users, 1 to 10 reflectors), time 1000.
#[cfg(test)]
pub(super) mod fixture {
    pub(in super::super) use super::super::tests::{input, reflector, session};
    use super::*;
    use crate::shard::shard_name;

    /// Shard `index` of `session` in `eu`, committing 100 users.
    pub(in super::super) fn shard(
        session: &str,
        index: u32,
        reflector: Option<&str>,
        users: u32,
    ) -> ShardRecord {
        ShardRecord {
            session: session.into(),
            name: shard_name(session, index),
            index,
            pool: "ns/pool".into(),
            region: "eu".into(),
            reflector: reflector.map(Into::into),
            committed_users: 100,
            users,
            reserved: 0,
            phase: ShardPhase::Open,
            empty_since: None,
            moving_to: None,
            moved_at: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::*;
    use super::*;
    use crate::planner::slots::NO_REGION;

    #[test]
    fn new_indexes_reflectors_by_region_and_only_current_ones_are_usable() {
        let mut old = reflector("eu-old", "eu");
        old.image = "img:0".into();
        let mut draining = reflector("eu-d", "eu");
        draining.state = ReflectorState::Draining;
        let input = input(
            vec![
                reflector("eu-a", "eu"),
                old,
                draining,
                reflector("us-a", "us"),
                reflector("mars-a", "mars"),
            ],
            vec![session("lobby")],
            vec![],
        );
        let state = PlanState::new(&input);
        let slots = &state.table.slots;
        assert_eq!(
            slots
                .iter()
                .map(|s| (s.region, s.usable))
                .collect::<Vec<_>>(),
            [
                (0, true),
                (0, false),
                (0, false),
                (1, true),
                (NO_REGION, false)
            ]
        );
        assert_eq!(state.table.regions[0].usable, 1);
        assert_eq!(state.reflector_ids["us-a"], 3);
        assert_eq!(state.session_ids["lobby"], 0);
        assert_eq!(state.actions, [ReflectorAction::Keep; 5]);
    }

    #[test]
    fn by_session_groups_shards_and_skips_those_of_gone_sessions() {
        let mut by = BySession::new(&[1, NO_SESSION, 0, 1], 3);
        assert_eq!(by.of(0), [2]);
        assert_eq!(by.of(1), [0, 3]);
        assert!(by.of(2).is_empty());
    }

    #[test]
    fn group_by_session_groups_the_adopted_shards() {
        let input = input(vec![], vec![session("a"), session("b")], vec![]);
        let mut state = PlanState::new(&input);
        state.owner = vec![1, 0, NO_SESSION, 1];
        state.group_by_session();
        assert_eq!(state.by_session.of(0), [1]);
        assert_eq!(state.by_session.of(1), [0, 3]);
    }

    #[test]
    fn finish_emits_one_region_plan_per_region_and_an_action_per_reflector() {
        let input = input(vec![reflector("eu-a", "eu")], vec![], vec![]);
        let mut state = PlanState::new(&input);
        state.tallies = vec![
            RegionTally {
                ready: 1,
                desired: 2,
                create: 1,
                ..RegionTally::default()
            },
            RegionTally::default(),
        ];
        state.actions[0] = ReflectorAction::Drain { deadline: 5 };
        let plan = state.finish();
        assert_eq!(
            plan.reflectors,
            [ReflectorPlan {
                name: "eu-a".into(),
                action: ReflectorAction::Drain { deadline: 5 }
            }]
        );
        assert_eq!(
            plan.regions
                .iter()
                .map(|r| (r.region.as_str(), r.ready, r.desired, r.create))
                .collect::<Vec<_>>(),
            [("eu", 1, 2, 1), ("us", 0, 0, 0)]
        );
    }
}
