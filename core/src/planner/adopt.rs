//! The shards of the previous plan. They are handled first because existing shards never
//! move: what they commit must be charged to their reflectors before anything new is
//! placed, or a new shard could take room a live one already holds.

use super::model::*;
use super::slots::Placed;
use super::state::{NO_SESSION, PlanState};

impl PlanState<'_> {
    /// Keeps every shard of the previous plan where it is, charging its commitment to its
    /// reflector, except those that are gone (closed and empty, or on a reflector that no
    /// longer exists). Shards of a deleted session start closing; shards without a
    /// reflector are noted as pending. Ends by indexing the room left, which the placing
    /// phases search.
    pub(super) fn adopt_shards(&mut self) {
        let input = self.input;
        let now = input.now;
        for shard in &input.shards {
            let sid = self
                .session_ids
                .get(shard.session.as_str())
                .copied()
                .unwrap_or(NO_SESSION);
            let session = input.sessions.get(sid).filter(|s| !s.deleted);
            let empty = shard.load() == 0;
            if shard.phase == ShardPhase::Closing && empty {
                self.remove_shard(shard, RemoveReason::ClosedEmpty);
                continue;
            }
            let mut out = shard.clone();
            out.empty_since = if empty {
                Some(shard.empty_since.unwrap_or(now))
            } else {
                None
            };
            // A move whose target is gone is given up: the shard stays on its source.
            let target = match &shard.moving_to {
                Some(to) => match self.reflector_ids.get(to.as_str()) {
                    Some(&t) => Some(t),
                    None => {
                        out.moving_to = None;
                        self.decisions.push(Decision::MoveAborted {
                            session: shard.session.clone(),
                            shard: shard.name.clone(),
                            to: to.clone(),
                        });
                        None
                    }
                },
                None => None,
            };
            let slot = match &shard.reflector {
                Some(name) => match self.reflector_ids.get(name.as_str()) {
                    Some(&slot) => Some(slot),
                    // The source vanished mid-move: the target takes the shard over and
                    // resumes it from what the source last stored.
                    None if target.is_some() => {
                        out.reflector = out.moving_to.take();
                        out.moved_at = Some(now);
                        self.decisions.push(Decision::ReassignShard {
                            session: shard.session.clone(),
                            shard: shard.name.clone(),
                            from: name.clone(),
                        });
                        target
                    }
                    None if self.moves_enabled(&shard.pool)
                        && shard.phase != ShardPhase::Closing =>
                    {
                        self.decisions.push(Decision::ReassignShard {
                            session: shard.session.clone(),
                            shard: shard.name.clone(),
                            from: name.clone(),
                        });
                        out.reflector = None;
                        self.own_region_first.insert(self.shards.len());
                        None
                    }
                    None => {
                        self.remove_shard(shard, RemoveReason::ReflectorGone);
                        continue;
                    }
                },
                None => None,
            };
            if session.is_none() && out.phase != ShardPhase::Closing {
                out.phase = ShardPhase::Closing;
                self.decisions.push(Decision::CloseShard {
                    session: shard.session.clone(),
                    shard: shard.name.clone(),
                    reason: CloseReason::SessionDeleted,
                });
            }
            match slot {
                Some(slot) => {
                    self.table.commit(slot, shard.committed_users);
                    // A moving shard holds room on its target too, until the swap.
                    if let Some(t) = target.filter(|&t| t != slot) {
                        self.table.commit(t, shard.committed_users);
                    }
                }
                None if out.phase == ShardPhase::Closing => {
                    // A closing shard that never got a reflector has nobody on it.
                    self.remove_shard(shard, RemoveReason::ClosedEmpty);
                    continue;
                }
                None => self.pending.push(self.shards.len()),
            }
            self.shards.push(out);
            self.owner.push(sid);
        }
        self.table.index();
    }

    /// Whether pool `id` moves shards (unknown pools do not).
    pub(super) fn moves_enabled(&self, id: &str) -> bool {
        self.table
            .pool_ids
            .get(id)
            .is_some_and(|&p| self.input.pools[p].moves.enabled)
    }

    fn remove_shard(&mut self, shard: &ShardRecord, reason: RemoveReason) {
        self.decisions.push(Decision::RemoveShard {
            session: shard.session.clone(),
            shard: shard.name.clone(),
            reason,
        });
    }

    /// A shard still waiting for a reflector is placed again, in its session's regions in
    /// order (a region may have room now that it lacked before). It runs before sessions
    /// open shards: these already exist and the opening rule counts them as live, so they
    /// get room ahead of any new one.
    pub(super) fn place_pending(&mut self) {
        let input = self.input;
        for k in 0..self.pending.len() {
            let i = self.pending[k];
            let Some(session) = input.sessions.get(self.owner[i]) else {
                continue;
            };
            let Some(&pool) = self.table.pool_ids.get(session.pool.as_str()) else {
                continue;
            };
            self.table
                .allowed_regions(pool, &session.policy, &mut self.allowed, &mut self.unknown);
            let claim = session.policy.max_users_per_shard;
            self.shards[i].reflector = None;
            // A reassigned shard resumes in its own region when it may and can: its clients
            // reconnect to that region's gateway.
            if self.own_region_first.contains(&i)
                && let Some(own) = self
                    .table
                    .region_index(&session.pool, &self.shards[i].region)
                && let Some(at) = self.allowed.iter().position(|&r| r == own)
            {
                self.allowed[..=at].rotate_right(1);
            }
            for &r in &self.allowed {
                if let Some(placed) = self.table.place_in(r, claim) {
                    let reflector = match placed {
                        Placed::Ready(slot) => self.reflector_name(slot),
                        Placed::Pending => None,
                    };
                    let shard = &mut self.shards[i];
                    shard.region = self.table.regions[r].spec.name.clone();
                    shard.committed_users = claim;
                    shard.reflector = reflector;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::fixture::*;
    use super::*;

    #[test]
    fn adopt_keeps_shards_in_place_and_drops_the_gone_ones() {
        let mut closed = shard("lobby", 1, Some("eu-a"), 0);
        closed.phase = ShardPhase::Closing;
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![
                shard("lobby", 0, Some("eu-a"), 30),
                closed,
                shard("lobby", 2, Some("eu-gone"), 10),
                shard("lobby", 3, None, 0),
            ],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        let kept: Vec<_> = state.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(kept, ["lobby", "lobby~3"]);
        assert_eq!(state.owner, [0, 0]);
        assert_eq!(state.pending, [1]);
        assert_eq!(
            state.decisions,
            [
                Decision::RemoveShard {
                    session: "lobby".into(),
                    shard: "lobby~1".into(),
                    reason: RemoveReason::ClosedEmpty,
                },
                Decision::RemoveShard {
                    session: "lobby".into(),
                    shard: "lobby~2".into(),
                    reason: RemoveReason::ReflectorGone,
                },
            ]
        );
        // The kept shard's commitment is charged and the room left indexed.
        let slot = &state.table.slots[0];
        assert_eq!(
            (slot.free_users, slot.free_sessions, slot.shards),
            (300, 3, 1)
        );
        assert_eq!(
            state.table.regions[0].ready.iter().collect::<Vec<_>>(),
            [&(300, 0)]
        );
        // An empty shard starts its idle clock now; a busy one has none.
        assert_eq!(state.shards[0].empty_since, None);
        assert_eq!(state.shards[1].empty_since, Some(1000));
    }

    #[test]
    fn adopt_closes_the_shards_of_a_deleted_session() {
        let mut gone = session("lobby");
        gone.deleted = true;
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![gone],
            vec![
                shard("lobby", 0, Some("eu-a"), 5),
                shard("lobby", 1, None, 0),
                shard("other", 0, Some("eu-a"), 5),
            ],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        // The unplaced one has nobody on it: removed at once.
        assert_eq!(state.shards.len(), 2);
        assert!(state.shards.iter().all(|s| s.phase == ShardPhase::Closing));
        assert_eq!(state.owner, [0, NO_SESSION]);
        assert!(state.pending.is_empty());
        let said: Vec<_> = state
            .decisions
            .iter()
            .map(|d| match d {
                Decision::CloseShard { shard, reason, .. } => {
                    (shard.as_str(), format!("{reason:?}"))
                }
                Decision::RemoveShard { shard, reason, .. } => {
                    (shard.as_str(), format!("{reason:?}"))
                }
                _ => ("", String::new()),
            })
            .collect();
        assert_eq!(
            said,
            [
                ("lobby", "SessionDeleted".into()),
                ("lobby~1", "SessionDeleted".into()),
                ("lobby~1", "ClosedEmpty".into()),
                ("other", "SessionDeleted".into()),
            ]
        );
    }

    #[test]
    fn place_pending_puts_a_waiting_shard_on_a_reflector_with_room_in_its_regions() {
        let mut lobby = session("lobby");
        lobby.policy.regions = vec!["us".into()];
        let mut waiting = shard("lobby", 0, None, 0);
        waiting.committed_users = 0;
        let input = input(
            vec![reflector("eu-a", "eu"), reflector("us-a", "us")],
            vec![lobby],
            vec![waiting],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        state.place_pending();
        let placed = &state.shards[0];
        assert_eq!(placed.region, "us");
        assert_eq!(placed.reflector.as_deref(), Some("us-a"));
        assert_eq!(placed.committed_users, 100);
        assert_eq!(state.table.slots[1].free_users, 300);
        // Placing is not opening: no decision.
        assert!(state.decisions.is_empty());
    }

    #[test]
    fn place_pending_without_a_ready_reflector_leaves_the_shard_waiting_for_a_new_one() {
        let input = input(
            vec![],
            vec![session("lobby")],
            vec![shard("lobby", 0, None, 0)],
        );
        let mut state = PlanState::new(&input);
        state.adopt_shards();
        state.place_pending();
        assert_eq!(state.shards[0].reflector, None);
        assert_eq!(state.table.regions[0].to_create, 1);
    }
}
