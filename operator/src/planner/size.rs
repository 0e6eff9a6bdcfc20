//! Sizing: what each region has once every shard is placed, how many reflectors it should
//! have, and the scale-up. It runs after placement because the demand it sizes for is the
//! placement's result: busy reflectors and the ones the placement asked to create.

use super::fleet::NO_REGION;
use super::model::*;
use super::state::{PlanState, RegionTally};

impl PlanState<'_> {
    /// Counts, per region, its reflectors by state, the busy ones, what is committed on
    /// them, and the empty usable ones a scale-down could drain.
    pub(super) fn tally_regions(&mut self) {
        let input = self.input;
        self.tallies = vec![RegionTally::default(); self.fleet.regions.len()];
        for s in &self.fleet.slots {
            if s.region == NO_REGION {
                continue;
            }
            let cap = s
                .real
                .map(|i| input.reflectors[i].capacity)
                .unwrap_or(self.fleet.regions[s.region].spec.capacity);
            let t = &mut self.tallies[s.region];
            t.committed_shards += u64::from(s.shards);
            t.committed_users += (i64::from(cap.users) - s.free_users).max(0) as u64;
            match s.real {
                Some(i) if s.usable => {
                    if s.shards == 0 {
                        t.empties.push(i);
                    } else {
                        t.busy += 1;
                    }
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
    /// shards, and the warm buffer, within `[minReflectors, maxReflectors]`. Also gives the
    /// region its history entry, scaled or not, so every region is in the next input.
    pub(super) fn size_region(&mut self, r: usize) {
        let region = &self.fleet.regions[r];
        let spec = region.spec;
        history_of(&mut self.history, &self.input.pools[region.pool], spec);
        let wanted = self.tallies[r].busy + region.to_create + spec.warm_buffer;
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
        let region = &self.fleet.regions[r];
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
