//! Draining: a reflector is never removed while it hosts a shard; it drains first (takes no
//! new shards) and is removed once empty.

use super::model::*;
use super::size::history_of;
use super::slots::NO_REGION;
use super::state::PlanState;

impl PlanState<'_> {
    /// Drains the reflectors that cannot take new shards although they are not draining yet
    /// (an old image, or a pool or region that no longer exists), and removes draining ones
    /// that host no shard and whose load is known. Whether one hosts a shard is known from
    /// adoption alone: no placement uses a reflector that takes no new shards.
    pub(super) fn drain_stale(&mut self) {
        let input = self.input;
        let now = input.now;
        for s in &self.table.slots {
            let Some(i) = s.real else { continue };
            let r = &input.reflectors[i];
            if r.state == ReflectorState::Draining {
                // Unreported, it may host shards the plan does not know: removing it would
                // disconnect their users, so it waits to be heard from.
                if s.shards == 0 && !r.unreported {
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
                    .table
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
        let region = &self.table.regions[r];
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

#[cfg(test)]
mod tests {
    use super::super::state::fixture::*;
    use super::*;

    #[test]
    fn drain_stale_drains_old_images_and_orphans_and_removes_empty_draining_ones() {
        let mut old = reflector("eu-old", "eu");
        old.image = "img:0".into();
        let mut done = reflector("eu-done", "eu");
        done.state = ReflectorState::Draining;
        let mut busy = reflector("eu-busy", "eu");
        busy.state = ReflectorState::Draining;
        let input = input(
            vec![
                reflector("eu-a", "eu"),
                old,
                done,
                busy,
                reflector("mars-a", "mars"),
            ],
            vec![session("lobby")],
            vec![shard("lobby", 0, Some("eu-busy"), 10)],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        state.drain_stale();
        use ReflectorAction::*;
        // The pool's grace is 60 s; an orphan has no pool, so no grace.
        assert_eq!(
            state.actions,
            [
                Keep,
                Drain { deadline: 1060 },
                Remove,
                Keep,
                Drain { deadline: 1000 }
            ]
        );
        assert_eq!(
            state.decisions,
            [
                Decision::DrainReflector {
                    reflector: "eu-old".into(),
                    reason: DrainReason::ImageChanged,
                    deadline: 1060,
                },
                Decision::RemoveReflector {
                    reflector: "eu-done".into()
                },
                Decision::DrainReflector {
                    reflector: "mars-a".into(),
                    reason: DrainReason::RegionRemoved,
                    deadline: 1000,
                },
            ]
        );
    }

    #[test]
    fn a_draining_reflector_whose_load_is_not_known_is_not_removed() {
        let mut silent = reflector("eu-silent", "eu");
        silent.state = ReflectorState::Draining;
        silent.unreported = true;
        let mut heard = reflector("eu-heard", "eu");
        heard.state = ReflectorState::Draining;
        let input = input(vec![silent, heard], vec![], vec![]);
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        state.drain_stale();
        // Neither hosts a shard the plan knows; only the one heard from is known to be empty.
        assert_eq!(
            state.actions,
            [ReflectorAction::Keep, ReflectorAction::Remove]
        );
        assert_eq!(
            state.decisions,
            [Decision::RemoveReflector {
                reflector: "eu-heard".into()
            }]
        );
    }

    /// Region eu with three empty ready reflectors and one starting, wanting one.
    fn surplus(input: &PlanInput) -> PlanState<'_> {
        let mut state = PlanState::new(input);
        state.adopt_shards();
        state.tally_regions();
        state.tallies[0].desired = 1;
        state
    }

    fn surplus_input() -> PlanInput {
        let mut starting = reflector("eu-s", "eu");
        starting.state = ReflectorState::Starting;
        input(
            vec![
                reflector("eu-a", "eu"),
                reflector("eu-c", "eu"),
                starting,
                reflector("eu-b", "eu"),
            ],
            vec![],
            vec![],
        )
    }

    #[test]
    fn scale_down_drains_starting_reflectors_first_then_the_highest_names() {
        let input = surplus_input();
        let mut state = surplus(&input);
        state.scale_down(0);
        let drained: Vec<_> = state
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::DrainReflector {
                    reflector,
                    reason: DrainReason::Surplus,
                    deadline: 1060,
                } => Some(reflector.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(drained, ["eu-s", "eu-c", "eu-b"]);
        assert_eq!(state.actions[0], ReflectorAction::Keep);
        let t = &state.tallies[0];
        assert_eq!((t.ready, t.starting, t.draining), (1, 0, 3));
        let h = &state.history[&("ns/pool".to_owned(), "eu".to_owned())];
        assert_eq!(
            (h.last_direction, h.last_down_at),
            (Some(ScaleDirection::Down), Some(1000))
        );
    }

    #[test]
    fn scale_down_passes_over_reflectors_whose_load_is_not_known_yet() {
        let mut input = surplus_input();
        // eu-c and eu-b have not reported since this operator started planning: they may host
        // shards the plan does not know.
        input.reflectors[1].unreported = true;
        input.reflectors[3].unreported = true;
        let mut state = surplus(&input);
        assert_eq!(state.tallies[0].empties, [0, 2], "eu-a and eu-s only");
        assert_eq!(
            state.tallies[0].busy, 0,
            "not busy either: no scale-up for them"
        );
        state.scale_down(0);
        let drained: Vec<_> = state
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::DrainReflector { reflector, .. } => Some(reflector.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(drained, ["eu-s", "eu-a"]);
        assert_eq!(state.actions[1], ReflectorAction::Keep);
        assert_eq!(state.actions[3], ReflectorAction::Keep);
    }

    #[test]
    fn scale_down_waits_a_cooldown_after_a_scale_up() {
        let mut input = surplus_input();
        input.history.insert(
            ("ns/pool".into(), "eu".into()),
            RegionHistory {
                last_direction: Some(ScaleDirection::Up),
                last_change_at: 800,
                last_up_at: Some(800),
                last_down_at: None,
                demand: Vec::new(),
            },
        );
        let mut state = surplus(&input);
        state.scale_down(0);
        assert_eq!(
            state.decisions,
            [Decision::ScaleHeld {
                pool: "ns/pool".into(),
                region: "eu".into(),
                direction: ScaleDirection::Down,
                until: 1100,
            }]
        );
        assert_eq!(state.actions, [ReflectorAction::Keep; 4]);
    }
}
