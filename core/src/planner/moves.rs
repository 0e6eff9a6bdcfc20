//! Moves: handing live shards from one reflector to another of the same region, for pools
//! whose moves are on ([`MovePolicy`]). Three kinds, in this order: the ones an operator
//! asked for, the shards of draining reflectors, and rebalancing of reflectors over their
//! target. A move starts here (the shard's phase becomes `Moving`, its target holds room);
//! the controllers carry it out and swap `reflector` and `moving_to` once the target hosts
//! it, or clear `moving_to` if the source could not store it (the shard then stays).
//!
//! The phase runs after the per-session phases and `drain_stale`, so it sees every shard
//! and every reflector that drains in this plan, and before sizing, so the room a move holds
//! on its target (or on a reflector to create, when a draining one's shards have nowhere to
//! go yet) is part of the demand the regions are sized for.

use super::model::*;
use super::slots::{NO_REGION, Placed};
use super::state::PlanState;

impl PlanState<'_> {
    /// Starts the moves of this plan, at most `max_concurrent` in flight per pool.
    pub(super) fn plan_moves(&mut self) {
        let input = self.input;
        if input.move_requests.is_empty() && !input.pools.iter().any(|p| p.moves.enabled) {
            return;
        }
        let mut in_flight = vec![0u32; input.pools.len()];
        for shard in &self.shards {
            if shard.moving_to.is_some()
                && let Some(&p) = self.table.pool_ids.get(shard.pool.as_str())
            {
                in_flight[p] += 1;
            }
        }
        self.requested_moves(&mut in_flight);
        self.drain_moves(&mut in_flight);
        self.rebalance(&mut in_flight);
    }

    /// The slot of shard `i`'s reflector, if the shard is placed, live and not moving yet.
    fn movable(&self, i: usize) -> Option<usize> {
        let shard = &self.shards[i];
        if shard.moving_to.is_some() || !matches!(shard.phase, ShardPhase::Open | ShardPhase::Full)
        {
            return None;
        }
        let slot = *self.reflector_ids.get(shard.reflector.as_deref()?)?;
        (self.table.slots[slot].region != NO_REGION).then_some(slot)
    }

    /// Whether pool `p` may start one more move.
    fn below_cap(&self, in_flight: &[u32], p: usize) -> bool {
        in_flight[p] < self.input.pools[p].moves.max_concurrent
    }

    /// Marks shard `i` moving to `target` (room already taken there).
    fn start_move(&mut self, i: usize, target: usize, reason: MoveReason, in_flight: &mut [u32]) {
        let to = self.reflector_name(target).unwrap_or_default();
        let shard = &mut self.shards[i];
        shard.moving_to = Some(to.clone());
        shard.phase = ShardPhase::Moving;
        if let Some(&p) = self.table.pool_ids.get(shard.pool.as_str()) {
            in_flight[p] += 1;
        }
        self.decisions.push(Decision::MoveShard {
            session: shard.session.clone(),
            shard: shard.name.clone(),
            from: shard.reflector.clone().unwrap_or_default(),
            to,
            reason,
        });
    }

    fn requested_moves(&mut self, in_flight: &mut [u32]) {
        let input = self.input;
        for request in &input.move_requests {
            let found = self
                .shards
                .iter()
                .position(|s| s.session == request.session && s.name == request.shard);
            let held = |reason| Decision::MoveHeld {
                session: request.session.clone(),
                shard: request.shard.clone(),
                reason,
            };
            let Some(i) = found else {
                self.decisions.push(held(MoveHeldReason::NotMovable));
                continue;
            };
            let Some(&p) = self.table.pool_ids.get(self.shards[i].pool.as_str()) else {
                self.decisions.push(held(MoveHeldReason::NotMovable));
                continue;
            };
            if !input.pools[p].moves.enabled {
                self.decisions.push(held(MoveHeldReason::MovesDisabled));
                continue;
            }
            let Some(source) = self.movable(i) else {
                self.decisions.push(held(MoveHeldReason::NotMovable));
                continue;
            };
            if !self.below_cap(in_flight, p) {
                self.decisions.push(held(MoveHeldReason::TooManyMoves));
                continue;
            }
            let claim = self.shards[i].committed_users;
            let region = self.table.slots[source].region;
            let target = match &request.to {
                Some(name) => self.reflector_ids.get(name.as_str()).copied().filter(|&t| {
                    t != source
                        && self.table.slots[t].region == region
                        && self.table.has_room(t, claim)
                }),
                None => self
                    .table
                    .ready_candidates(region, claim)
                    .into_iter()
                    .find(|&t| t != source),
            };
            let Some(target) = target else {
                self.decisions.push(held(MoveHeldReason::NoRoom));
                continue;
            };
            self.table.take(target, claim);
            self.start_move(i, target, MoveReason::Requested, in_flight);
        }
    }

    /// The live shards of draining reflectors go to ready reflectors of their region with
    /// room. Where none has room, the room is taken on a reflector that is starting or to
    /// be created (so the region grows for it) and the move starts in a later plan.
    fn drain_moves(&mut self, in_flight: &mut [u32]) {
        let input = self.input;
        for i in 0..self.shards.len() {
            let Some(source) = self.movable(i) else {
                continue;
            };
            let draining = self.table.slots[source].real.is_some_and(|k| {
                input.reflectors[k].state == ReflectorState::Draining
                    || matches!(self.actions[k], ReflectorAction::Drain { .. })
            });
            let Some(&p) = self.table.pool_ids.get(self.shards[i].pool.as_str()) else {
                continue;
            };
            if !draining || !input.pools[p].moves.enabled || !self.below_cap(in_flight, p) {
                continue;
            }
            let region = self.table.slots[source].region;
            match self.table.place_in(region, self.shards[i].committed_users) {
                Some(Placed::Ready(target)) => {
                    self.start_move(i, target, MoveReason::ReflectorDraining, in_flight);
                }
                Some(Placed::Pending) | None => {}
            }
        }
    }

    /// A ready reflector with more connected users than `rebalance_above` of its capacity
    /// sheds its largest shards that have not moved within the cool-down, each to the least
    /// loaded ready reflector of its region that stays at or below `rebalance_target` with
    /// it, until it is back under `rebalance_above` or nothing fits.
    fn rebalance(&mut self, in_flight: &mut [u32]) {
        let input = self.input;
        let now = input.now;
        // Connected users per slot, a moving shard counted on its target.
        let mut users = vec![0u64; self.table.slots.len()];
        for shard in &self.shards {
            let host = shard.moving_to.as_ref().or(shard.reflector.as_ref());
            if let Some(&slot) = host.and_then(|h| self.reflector_ids.get(h.as_str())) {
                users[slot] += u64::from(shard.users);
            }
        }
        let capacity: Vec<f64> = (0..self.table.slots.len())
            .map(|slot| {
                self.table.slots[slot]
                    .real
                    .map_or(0.0, |k| f64::from(input.reflectors[k].capacity.users))
            })
            .collect();
        for source in 0..input.reflectors.len() {
            let s = &self.table.slots[source];
            if !s.usable || !s.ready || s.region == NO_REGION {
                continue;
            }
            let region = s.region;
            let p = self.table.regions[region].pool;
            let policy = &input.pools[p].moves;
            let limit = policy.rebalance_above * capacity[source];
            if !policy.enabled || users[source] as f64 <= limit {
                continue;
            }
            let mut candidates: Vec<usize> = (0..self.shards.len())
                .filter(|&i| {
                    self.movable(i) == Some(source)
                        && self.shards[i]
                            .moved_at
                            .is_none_or(|t| now.saturating_sub(t) >= policy.cooldown)
                })
                .collect();
            candidates.sort_by_key(|&i| (std::cmp::Reverse(self.shards[i].users), i));
            for i in candidates {
                if users[source] as f64 <= limit || !self.below_cap(in_flight, p) {
                    break;
                }
                let (claim, load) = (
                    self.shards[i].committed_users,
                    u64::from(self.shards[i].users),
                );
                let target = self
                    .table
                    .ready_candidates(region, claim)
                    .into_iter()
                    .filter(|&t| {
                        t != source
                            && (users[t] + load) as f64 <= policy.rebalance_target * capacity[t]
                    })
                    .min_by_key(|&t| (users[t], t));
                if let Some(target) = target {
                    self.table.take(target, claim);
                    users[source] -= load;
                    users[target] += load;
                    self.start_move(i, target, MoveReason::Rebalance, in_flight);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::plan;
    use super::super::state::fixture::*;
    use super::*;

    fn moves_on(mut input: PlanInput) -> PlanInput {
        input.pools[0].moves.enabled = true;
        input
    }

    fn draining(name: &str) -> ObservedReflector {
        let mut r = reflector(name, "eu");
        r.state = ReflectorState::Draining;
        r
    }

    /// `(shard, from, to, reason)` of every move the plan starts.
    fn moves(plan: &Plan) -> Vec<(&str, &str, &str, MoveReason)> {
        plan.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::MoveShard {
                    shard,
                    from,
                    to,
                    reason,
                    ..
                } => Some((shard.as_str(), from.as_str(), to.as_str(), *reason)),
                _ => None,
            })
            .collect()
    }

    fn held(plan: &Plan) -> Vec<MoveHeldReason> {
        plan.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::MoveHeld { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    fn on_old_reflector() -> PlanInput {
        input(
            vec![draining("eu-old"), reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![
                shard("lobby", 0, Some("eu-old"), 30),
                shard("lobby", 1, Some("eu-old"), 20),
            ],
        )
    }

    #[test]
    fn with_moves_off_a_draining_reflectors_shards_stay_until_they_empty() {
        let plan = plan(&on_old_reflector());
        assert!(moves(&plan).is_empty());
        assert!(plan.shards.iter().all(|s| s.moving_to.is_none()));
        assert_eq!(plan.reflectors[0].action, ReflectorAction::Keep);
    }

    #[test]
    fn a_draining_reflectors_shards_move_to_a_ready_reflector_of_their_region() {
        let plan = plan(&moves_on(on_old_reflector()));
        use MoveReason::ReflectorDraining;
        assert_eq!(
            moves(&plan),
            [
                ("lobby", "eu-old", "eu-a", ReflectorDraining),
                ("lobby~1", "eu-old", "eu-a", ReflectorDraining)
            ]
        );
        for s in &plan.shards {
            assert_eq!(s.phase, ShardPhase::Moving);
            assert_eq!(
                s.reflector.as_deref(),
                Some("eu-old"),
                "the source hosts it until the swap"
            );
            assert_eq!(s.moving_to.as_deref(), Some("eu-a"));
            assert!(!s.routable());
        }
        // The source still hosts both shards, so it is not removed yet.
        assert_eq!(plan.reflectors[0].action, ReflectorAction::Keep);
    }

    #[test]
    fn moves_in_flight_are_capped_per_pool() {
        let mut input = moves_on(on_old_reflector());
        input.pools[0].moves.max_concurrent = 1;
        let plan = plan(&input);
        assert_eq!(moves(&plan).len(), 1);
        // The one in flight counts in the next plan too: nothing more starts.
        let mut next = input.clone();
        next.shards = plan.shards.clone();
        assert!(moves(&super::super::plan(&next)).is_empty());
    }

    #[test]
    fn a_draining_reflector_with_nowhere_to_send_its_shards_grows_its_region() {
        let input = moves_on(input(
            vec![draining("eu-old")],
            vec![session("lobby")],
            vec![shard("lobby", 0, Some("eu-old"), 30)],
        ));
        let plan = plan(&input);
        assert!(moves(&plan).is_empty(), "no ready reflector to go to yet");
        assert_eq!(plan.shards[0].phase, ShardPhase::Open);
        let eu = plan.regions.iter().find(|r| r.region == "eu").unwrap();
        assert_eq!(
            eu.create, 1,
            "a reflector is created for the shard to move to"
        );
    }

    #[test]
    fn a_move_in_flight_holds_room_on_its_source_and_its_target() {
        let mut moving = shard("lobby", 0, Some("eu-a"), 30);
        moving.moving_to = Some("eu-b".into());
        let input = moves_on(input(
            vec![reflector("eu-a", "eu"), reflector("eu-b", "eu")],
            vec![session("lobby")],
            vec![moving],
        ));
        let plan = plan(&input);
        assert_eq!(plan.shards[0].phase, ShardPhase::Moving);
        assert_eq!(plan.shards[0].moving_to.as_deref(), Some("eu-b"));
        let eu = plan.regions.iter().find(|r| r.region == "eu").unwrap();
        assert_eq!((eu.committed_shards, eu.committed_users), (2, 200));
    }

    #[test]
    fn a_move_whose_target_vanished_is_given_up_and_the_shard_stays() {
        let mut moving = shard("lobby", 0, Some("eu-a"), 30);
        moving.moving_to = Some("eu-gone".into());
        let input = moves_on(input(
            vec![reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![moving],
        ));
        let plan = plan(&input);
        let s = &plan.shards[0];
        assert_eq!(
            (s.reflector.as_deref(), s.moving_to.as_deref()),
            (Some("eu-a"), None)
        );
        assert_eq!(s.phase, ShardPhase::Open);
        assert!(plan.decisions.contains(&Decision::MoveAborted {
            session: "lobby".into(),
            shard: "lobby".into(),
            to: "eu-gone".into(),
        }));
    }

    #[test]
    fn a_shard_whose_source_vanished_mid_move_lands_on_its_target() {
        let mut moving = shard("lobby", 0, Some("eu-gone"), 30);
        moving.moving_to = Some("eu-b".into());
        let input = moves_on(input(
            vec![reflector("eu-b", "eu")],
            vec![session("lobby")],
            vec![moving],
        ));
        let plan = plan(&input);
        let s = &plan.shards[0];
        assert_eq!(
            (s.reflector.as_deref(), s.moving_to.as_deref()),
            (Some("eu-b"), None)
        );
        assert_eq!((s.phase, s.moved_at), (ShardPhase::Open, Some(1000)));
    }

    #[test]
    fn a_lost_reflectors_shards_are_placed_again_in_their_own_region_first() {
        let mut lost = shard("lobby", 0, Some("us-gone"), 30);
        lost.region = "us".into();
        let reflectors = vec![reflector("eu-a", "eu"), reflector("us-a", "us")];
        // Moves off: the shard is lost (its clients are routed to a new one).
        let off = input(
            reflectors.clone(),
            vec![session("lobby")],
            vec![lost.clone()],
        );
        let plan_off = plan(&off);
        assert!(plan_off.decisions.contains(&Decision::RemoveShard {
            session: "lobby".into(),
            shard: "lobby".into(),
            reason: RemoveReason::ReflectorGone,
        }));
        // Moves on: it is reassigned, to us-a although eu comes first in the session's order.
        let on = moves_on(input(reflectors, vec![session("lobby")], vec![lost]));
        let plan_on = plan(&on);
        assert!(plan_on.decisions.contains(&Decision::ReassignShard {
            session: "lobby".into(),
            shard: "lobby".into(),
            from: "us-gone".into(),
        }));
        let s = &plan_on.shards[0];
        assert_eq!(
            (s.name.as_str(), s.reflector.as_deref()),
            ("lobby", Some("us-a"))
        );
        assert_eq!(s.region, "us");
    }

    /// eu-a holds 150 + 130 + 100 = 380 users (over 90 % of 400), eu-b 50, eu-c none.
    fn crowded() -> PlanInput {
        moves_on(input(
            vec![
                reflector("eu-a", "eu"),
                reflector("eu-b", "eu"),
                reflector("eu-c", "eu"),
            ],
            vec![session("s1"), session("s2"), session("s3"), session("s4")],
            vec![
                shard("s1", 0, Some("eu-a"), 75),
                shard("s2", 0, Some("eu-a"), 65),
                shard("s3", 0, Some("eu-a"), 50),
                shard("s4", 0, Some("eu-b"), 25),
            ],
        ))
    }

    /// The users of `crowded` doubled: the fixture's 100-user commitments keep the shards
    /// below their own threshold while the reflector's users pass 90 % of its capacity.
    fn doubled(mut input: PlanInput) -> PlanInput {
        for s in &mut input.shards {
            s.users *= 2;
            s.committed_users = 100;
        }
        for r in &mut input.reflectors {
            r.capacity.users = 400;
        }
        for s in &mut input.sessions {
            s.policy.max_users_per_shard = 200;
            s.policy.min_shards = 1;
        }
        input
    }

    #[test]
    fn an_overloaded_reflector_sheds_its_largest_shard_to_the_least_loaded_one() {
        let plan = plan(&doubled(crowded()));
        assert_eq!(
            moves(&plan),
            [("s1", "eu-a", "eu-c", MoveReason::Rebalance)],
            "150 users leave eu-a (380 -> 230, under 360); eu-c (0) is emptier than eu-b (50)"
        );
    }

    #[test]
    fn a_shard_that_moved_lately_is_not_moved_again_to_rebalance() {
        let mut input = doubled(crowded());
        input.shards[0].moved_at = Some(900); // 100 s ago, cool-down 300 s
        let plan = plan(&input);
        assert_eq!(
            moves(&plan),
            [("s2", "eu-a", "eu-c", MoveReason::Rebalance)]
        );
    }

    #[test]
    fn rebalancing_never_pushes_a_target_past_its_target_fraction() {
        let mut input = doubled(crowded());
        // eu-b and eu-c hold 155 users each: the 150- and 130-user shards would take either
        // past 70 % (280), so only the 100-user one may go.
        input.shards[3].users = 155;
        input.shards.push(shard("s4", 1, Some("eu-c"), 155));
        let plan = plan(&input);
        assert_eq!(
            moves(&plan),
            [("s3", "eu-a", "eu-b", MoveReason::Rebalance)]
        );
        // Within the hysteresis band (330 users, under 90 %), nothing moves at all.
        let mut calm = doubled(crowded());
        calm.shards[0].users = 100;
        assert!(moves(&super::super::plan(&calm)).is_empty());
    }

    #[test]
    fn a_requested_move_goes_where_asked_or_is_held_with_its_reason() {
        let base = || {
            input(
                vec![
                    reflector("eu-a", "eu"),
                    reflector("eu-b", "eu"),
                    reflector("us-a", "us"),
                ],
                vec![session("lobby")],
                vec![shard("lobby", 0, Some("eu-a"), 30)],
            )
        };
        let request = |to: Option<&str>, shard: &str| MoveRequest {
            session: "lobby".into(),
            shard: shard.into(),
            to: to.map(Into::into),
        };
        let mut on = moves_on(base());
        on.move_requests = vec![request(Some("eu-b"), "lobby")];
        assert_eq!(
            moves(&plan(&on)),
            [("lobby", "eu-a", "eu-b", MoveReason::Requested)]
        );
        on.move_requests = vec![request(None, "lobby")];
        assert_eq!(
            moves(&plan(&on)),
            [("lobby", "eu-a", "eu-b", MoveReason::Requested)]
        );
        on.move_requests = vec![
            request(Some("us-a"), "lobby"),
            request(Some("eu-a"), "lobby"),
            request(None, "lobby~7"),
        ];
        let p = plan(&on);
        assert!(moves(&p).is_empty());
        use MoveHeldReason::*;
        assert_eq!(held(&p), [NoRoom, NoRoom, NotMovable]);
        let mut off = base();
        off.move_requests = vec![request(None, "lobby")];
        assert_eq!(held(&plan(&off)), [MovesDisabled]);
        on.move_requests = vec![request(None, "lobby")];
        on.pools[0].moves.max_concurrent = 0;
        assert_eq!(held(&plan(&on)), [TooManyMoves]);
    }
}
