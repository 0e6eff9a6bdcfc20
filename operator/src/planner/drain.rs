//! Draining: a reflector is never removed while it hosts a shard; it drains first (takes no
//! new shards) and is removed once empty.

use super::fleet::NO_REGION;
use super::model::*;
use super::size::history_of;
use super::state::PlanState;

impl PlanState<'_> {
    /// Drains the reflectors that cannot take new shards although they are not draining yet
    /// (an old image, or a pool or region that no longer exists), and removes draining ones
    /// that host no shard. It runs after placement, since only then is it known which
    /// reflectors keep a shard.
    pub(super) fn drain_stale(&mut self) {
        let input = self.input;
        let now = input.now;
        for s in &self.fleet.slots {
            let Some(i) = s.real else { continue };
            let r = &input.reflectors[i];
            if r.state == ReflectorState::Draining {
                if s.shards == 0 {
                    self.actions[i] = ReflectorAction::Remove;
                    self.decisions.push(Decision::RemoveReflector {
                        reflector: r.name.clone(),
                    });
                }
            } else if !s.usable {
                let reason = if s.region == NO_REGION {
                    DrainReason::RegionRemoved
                } else {
                    DrainReason::ImageChanged
                };
                let grace = self
                    .fleet
                    .regions
                    .get(s.region)
                    .map(|region| input.pools[region.pool].drain_grace)
                    .unwrap_or(0);
                let deadline = now + grace;
                self.actions[i] = ReflectorAction::Drain { deadline };
                self.decisions.push(Decision::DrainReflector {
                    reflector: r.name.clone(),
                    reason,
                    deadline,
                });
            }
        }
    }

    /// Shrinks region `r` to its desired size by draining empty reflectors, starting ones
    /// first (nobody uses them yet), then the highest names — unless it grew less than a
    /// cool-down ago. Only empty reflectors are candidates, so it may stop above the size.
    pub(super) fn scale_down(&mut self, r: usize) {
        let input = self.input;
        let now = input.now;
        let region = &self.fleet.regions[r];
        let pool = &input.pools[region.pool];
        let spec = region.spec;
        let usable = region.usable;
        let tally = &mut self.tallies[r];
        let desired = tally.desired;
        if desired >= usable || tally.empties.is_empty() {
            return;
        }
        let h = history_of(&mut self.history, pool, spec);
        let held_until = h.last_up_at.map(|t| t + pool.cooldown).filter(|&t| now < t);
        if let Some(until) = held_until {
            self.decisions.push(Decision::ScaleHeld {
                pool: pool.id.clone(),
                region: spec.name.clone(),
                direction: ScaleDirection::Down,
                until,
            });
            return;
        }
        let candidates = &mut tally.empties;
        candidates.sort_by(|&a, &b| {
            let (a, b) = (&input.reflectors[a], &input.reflectors[b]);
            (a.state != ReflectorState::Starting, &b.name)
                .cmp(&(b.state != ReflectorState::Starting, &a.name))
        });
        let n = (usable - desired).min(candidates.len() as u32);
        let deadline = now + pool.drain_grace;
        for &i in candidates.iter().take(n as usize) {
            self.actions[i] = ReflectorAction::Drain { deadline };
            self.decisions.push(Decision::DrainReflector {
                reflector: input.reflectors[i].name.clone(),
                reason: DrainReason::Surplus,
                deadline,
            });
            if input.reflectors[i].state == ReflectorState::Ready {
                tally.ready -= 1;
            } else {
                tally.starting -= 1;
            }
            tally.draining += 1;
        }
        if h.last_direction != Some(ScaleDirection::Down) {
            h.last_change_at = now;
        }
        h.last_direction = Some(ScaleDirection::Down);
        h.last_down_at = Some(now);
    }
}
