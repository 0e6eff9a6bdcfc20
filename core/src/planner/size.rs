//! Sizing: what each region has once every shard is placed, how many reflectors it should
//! have, and the scale-up. It runs after placement because the demand it sizes for is the
//! placement's result: busy reflectors and the ones the placement asked to create.

use super::model::*;
use super::slots::NO_REGION;
use super::state::{PlanState, RegionTally};

impl PlanState<'_> {
    /// Counts, per region, its reflectors by state, the busy ones, what is committed on
    /// them, and the empty usable ones a scale-down could drain.
    pub(super) fn tally_regions(&mut self) {
        let input = self.input;
        self.tallies = vec![RegionTally::default(); self.table.regions.len()];
        for s in &self.table.slots {
            if s.region == NO_REGION {
                continue;
            }
            let cap = s
                .real
                .map(|i| input.reflectors[i].capacity)
                .unwrap_or(self.table.regions[s.region].spec.capacity);
            let t = &mut self.tallies[s.region];
            t.committed_shards += u64::from(s.shards);
            t.committed_users += (i64::from(cap.users) - s.free_users).max(0) as u64;
            match s.real {
                Some(i) if s.usable => {
                    if s.shards > 0 {
                        t.busy += 1;
                    } else if !input.reflectors[i].unreported {
                        t.empties.push(i);
                    }
                    // An empty-looking unreported reflector may host shards the plan does
                    // not know: no scale-down picks it, and it is not counted as busy either,
                    // so the region does not grow for it.
                    if s.ready {
                        t.ready += 1;
                    } else {
                        t.starting += 1;
                    }
                }
                Some(_) => t.draining += 1,
                None => {}
            }
        }
    }

    /// The size region `r` should have: its busy reflectors, the ones to create for pending
    /// shards, and the larger of the warm buffer and the growth buffer, within
    /// `[minReflectors, maxReflectors]`. Also gives the region its history entry, scaled or
    /// not, so every region is in the next input.
    pub(super) fn size_region(&mut self, r: usize) {
        let region = &self.table.regions[r];
        let spec = region.spec;
        let h = history_of(&mut self.history, &self.input.pools[region.pool], spec);
        let demand = self.tallies[r].busy + region.to_create;
        let growth = record_demand(h, self.input.now, demand, spec.growth_buffer_seconds);
        self.tallies[r].growth_buffer = growth;
        let wanted = demand + spec.warm_buffer.max(growth);
        self.tallies[r].desired = wanted.clamp(
            spec.min_reflectors,
            spec.max_reflectors.max(spec.min_reflectors),
        );
    }

    /// Grows region `r` to its desired size, unless it shrank less than a cool-down ago and
    /// nobody would be refused meanwhile: shards waiting for a reflector or a region below
    /// `minReflectors` are urgent and never held.
    pub(super) fn scale_up(&mut self, r: usize) {
        let now = self.input.now;
        let region = &self.table.regions[r];
        let pool = &self.input.pools[region.pool];
        let spec = region.spec;
        let desired = self.tallies[r].desired;
        let usable = region.usable;
        if desired <= usable {
            return;
        }
        let h = history_of(&mut self.history, pool, spec);
        let urgent = region.to_create > 0 || usable < spec.min_reflectors;
        let reason = if region.to_create > 0 {
            ScaleUpReason::PendingShards
        } else if usable < spec.min_reflectors {
            ScaleUpReason::MinReflectors
        } else if self.tallies[r].growth_buffer > spec.warm_buffer {
            ScaleUpReason::Growth
        } else {
            ScaleUpReason::WarmBuffer
        };
        let held_until = h
            .last_down_at
            .map(|t| t + pool.cooldown)
            .filter(|&t| now < t);
        match held_until {
            Some(until) if !urgent => self.decisions.push(Decision::ScaleHeld {
                pool: pool.id.clone(),
                region: spec.name.clone(),
                direction: ScaleDirection::Up,
                until,
            }),
            _ => {
                let create = (desired - usable).max(region.to_create);
                self.tallies[r].create = create;
                self.decisions.push(Decision::ScaleUp {
                    pool: pool.id.clone(),
                    region: spec.name.clone(),
                    from: usable,
                    to: usable + create,
                    reason,
                    urgent,
                });
                if h.last_direction != Some(ScaleDirection::Up) {
                    h.last_change_at = now;
                }
                h.last_direction = Some(ScaleDirection::Up);
                h.last_up_at = Some(now);
            }
        }
    }
}

/// Records the region's `demand` at `now` in its history and returns by how much it grew
/// over the last `window` seconds: the demand now less the lowest demand sampled in that
/// time. The history keeps at most one sample per second and none older than the window,
/// so it stays within `window + 1` entries; a window of 0 keeps none and returns 0.
///
/// Why the lowest sample and not the oldest: a region whose demand dipped and came back
/// within the window grew by the rise from the dip, and that rise is what the next
/// `window` seconds are likely to bring again.
pub(super) fn record_demand(h: &mut RegionHistory, now: Seconds, demand: u32, window: u32) -> u32 {
    if window == 0 {
        h.demand.clear();
        return 0;
    }
    let since = now.saturating_sub(Seconds::from(window));
    h.demand.retain(|&(at, _)| at >= since && at <= now);
    match h.demand.last_mut() {
        Some(last) if last.0 == now => last.1 = demand,
        _ => h.demand.push((now, demand)),
    }
    let lowest = h.demand.iter().map(|&(_, d)| d).min().unwrap_or(demand);
    demand.saturating_sub(lowest)
}

/// The history of one region, created empty if it has none.
pub(super) fn history_of<'h>(
    history: &'h mut ScaleHistory,
    pool: &PoolInput,
    spec: &RegionInput,
) -> &'h mut RegionHistory {
    history
        .entry((pool.id.clone(), spec.name.clone()))
        .or_default()
}

#[cfg(test)]
mod tests {
    use super::super::state::fixture::*;
    use super::*;

    #[test]
    fn tally_counts_reflectors_by_state_and_what_they_commit() {
        let mut starting = reflector("eu-s", "eu");
        starting.state = ReflectorState::Starting;
        let mut draining = reflector("eu-d", "eu");
        draining.state = ReflectorState::Draining;
        let input = input(
            vec![
                reflector("eu-a", "eu"),
                reflector("eu-b", "eu"),
                starting,
                draining,
                reflector("mars-a", "mars"),
            ],
            vec![session("lobby")],
            vec![
                shard("lobby", 0, Some("eu-a"), 10),
                shard("lobby", 1, Some("eu-d"), 10),
                shard("lobby", 2, None, 0),
            ],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        state.place_pending();
        state.tally_regions();
        // The pending shard packs onto eu-a, the fullest: eu-b and eu-s stay empty.
        assert_eq!(
            state.tallies[0],
            RegionTally {
                empties: vec![1, 2],
                busy: 1,
                ready: 2,
                starting: 1,
                draining: 1,
                committed_shards: 3,
                committed_users: 300,
                ..RegionTally::default()
            }
        );
        assert_eq!(state.tallies[1], RegionTally::default());
    }

    #[test]
    fn size_region_wants_busy_plus_to_create_plus_warm_buffer_within_the_bounds() {
        let mut input = input(vec![], vec![], vec![]);
        input.pools[0].regions[0].warm_buffer = 2;
        input.pools[0].regions[1].min_reflectors = 3;
        let mut state = PlanState::new(&input);
        state.tally_regions();
        state.tallies[0].busy = 9;
        state.table.regions[0].to_create = 1;
        for r in 0..2 {
            state.size_region(r);
        }
        // eu: 9 + 1 + 2 = 12, capped at maxReflectors 10; us: nothing, raised to 3.
        assert_eq!(
            (state.tallies[0].desired, state.tallies[1].desired),
            (10, 3)
        );
        assert_eq!(state.history.len(), 2);
        assert!(state.decisions.is_empty());
    }

    #[test]
    fn record_demand_gives_the_rise_from_the_lowest_sample_of_the_window() {
        let mut h = RegionHistory::default();
        assert_eq!(record_demand(&mut h, 100, 4, 10), 0, "first sample");
        assert_eq!(record_demand(&mut h, 103, 9, 10), 5);
        // A second sample in the same second replaces the first.
        assert_eq!(record_demand(&mut h, 103, 10, 10), 6);
        assert_eq!(h.demand, [(100, 4), (103, 10)]);
        // A dip and a rise: the rise is measured from the dip.
        assert_eq!(record_demand(&mut h, 105, 7, 10), 3);
        assert_eq!(record_demand(&mut h, 108, 12, 10), 8);
        // 100 and 103 fall out of the window [104, 114]: the lowest left is 7.
        assert_eq!(record_demand(&mut h, 114, 12, 10), 5);
        assert_eq!(h.demand, [(105, 7), (108, 12), (114, 12)]);
        // Flat for a whole window: no growth, and the history stays small.
        for t in 115..=200 {
            record_demand(&mut h, t, 12, 10);
        }
        assert_eq!(record_demand(&mut h, 201, 12, 10), 0);
        assert_eq!(h.demand.len(), 11);
        // Shrinking is not growth.
        assert_eq!(record_demand(&mut h, 202, 3, 10), 0);
        // A clock that went back drops the samples from the "future".
        assert_eq!(record_demand(&mut h, 150, 5, 10), 0);
        assert_eq!(h.demand, [(150, 5)]);
        // Off: nothing kept.
        assert_eq!(record_demand(&mut h, 151, 50, 0), 0);
        assert!(h.demand.is_empty());
    }

    #[test]
    fn size_region_keeps_the_larger_of_the_warm_buffer_and_the_recent_growth() {
        let mut input = input(vec![], vec![], vec![]);
        input.pools[0].regions[0].warm_buffer = 2;
        input.pools[0].regions[0].max_reflectors = 100;
        input.pools[0].regions[0].growth_buffer_seconds = 30;
        input.history.insert(
            ("ns/pool".into(), "eu".into()),
            RegionHistory {
                demand: vec![(975, 3), (990, 6)],
                ..RegionHistory::default()
            },
        );
        let mut state = PlanState::new(&input);
        state.tally_regions();
        state.tallies[0].busy = 9;
        state.table.regions[0].to_create = 1;
        state.size_region(0);
        // Demand 10 now, 3 at the window's lowest: it grew by 7 in 30 s, so 7 empty
        // reflectors are kept instead of 2.
        assert_eq!(
            (state.tallies[0].growth_buffer, state.tallies[0].desired),
            (7, 17)
        );
        state.scale_up(0);
        assert!(matches!(
            state.decisions[..],
            [Decision::ScaleUp {
                reason: ScaleUpReason::PendingShards,
                to: 17,
                ..
            }]
        ));

        // Once the growth is older than the window, the warm buffer applies again.
        let mut later = input.clone();
        later.now += 31;
        later.history = state.history.clone();
        let mut state = PlanState::new(&later);
        state.tally_regions();
        state.tallies[0].busy = 10;
        state.size_region(0);
        assert_eq!(
            (state.tallies[0].growth_buffer, state.tallies[0].desired),
            (0, 12)
        );

        // A region that grows with nothing pending scales up for its growth.
        let mut growing = input.clone();
        growing.pools[0].regions[0].min_reflectors = 0;
        let mut state = PlanState::new(&growing);
        state.tally_regions();
        state.tallies[0].busy = 10;
        state.size_region(0);
        state.scale_up(0);
        assert!(matches!(
            state.decisions[..],
            [Decision::ScaleUp {
                reason: ScaleUpReason::Growth,
                from: 0,
                to: 17,
                ..
            }]
        ));
    }

    #[test]
    fn scale_up_creates_the_missing_reflectors_and_records_it() {
        let input = input(vec![reflector("eu-a", "eu")], vec![], vec![]);
        let mut state = PlanState::new(&input);
        state.tally_regions();
        state.tallies[0].desired = 3;
        state.scale_up(0);
        assert_eq!(state.tallies[0].create, 2);
        assert_eq!(
            state.decisions,
            [Decision::ScaleUp {
                pool: "ns/pool".into(),
                region: "eu".into(),
                from: 1,
                to: 3,
                reason: ScaleUpReason::WarmBuffer,
                urgent: false,
            }]
        );
        let h = &state.history[&("ns/pool".to_owned(), "eu".to_owned())];
        assert_eq!(
            (h.last_direction, h.last_change_at, h.last_up_at),
            (Some(ScaleDirection::Up), 1000, Some(1000))
        );
    }

    #[test]
    fn scale_up_waits_a_cooldown_after_a_scale_down_unless_shards_are_pending() {
        let mut input = input(vec![reflector("eu-a", "eu")], vec![], vec![]);
        input.history.insert(
            ("ns/pool".into(), "eu".into()),
            RegionHistory {
                last_direction: Some(ScaleDirection::Down),
                last_change_at: 900,
                last_up_at: None,
                last_down_at: Some(900),
                demand: Vec::new(),
            },
        );
        let mut state = PlanState::new(&input);
        state.tally_regions();
        state.tallies[0].desired = 2;
        state.scale_up(0);
        assert_eq!(
            state.decisions,
            [Decision::ScaleHeld {
                pool: "ns/pool".into(),
                region: "eu".into(),
                direction: ScaleDirection::Up,
                until: 1200,
            }]
        );
        assert_eq!(state.tallies[0].create, 0);

        state.decisions.clear();
        state.table.regions[0].to_create = 1;
        state.scale_up(0);
        assert!(matches!(
            state.decisions[..],
            [Decision::ScaleUp {
                reason: ScaleUpReason::PendingShards,
                urgent: true,
                to: 2,
                ..
            }]
        ));
    }

    #[test]
    fn scale_up_does_nothing_at_or_above_the_desired_size() {
        let input = input(vec![reflector("eu-a", "eu")], vec![], vec![]);
        let mut state = PlanState::new(&input);
        state.tally_regions();
        state.tallies[0].desired = 1;
        state.scale_up(0);
        assert!(state.decisions.is_empty());
        assert!(state.history.is_empty());
    }
}
