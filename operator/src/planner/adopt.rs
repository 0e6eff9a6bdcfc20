//! Phases 2 and 3: the shards of the previous plan. They come first because existing shards
//! never move: what they commit must be charged to their reflectors before anything new is
//! placed, or a new shard could take room a live one already holds.

use super::fleet::Placed;
use super::model::*;
use super::state::{NO_SESSION, PlanState};

impl PlanState<'_> {
    /// Phase 2, adopt: keeps every shard of the previous plan where it is, charging its
    /// commitment to its reflector, except those that are gone (closed and empty, or on a
    /// reflector that no longer exists). Shards of a deleted session start closing; shards
    /// without a reflector are noted as pending. Ends by indexing the room left, which the
    /// placing phases search.
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
            let slot = match &shard.reflector {
                Some(name) => match self.reflector_ids.get(name.as_str()) {
                    Some(&slot) => Some(slot),
                    None => {
                        self.remove_shard(shard, RemoveReason::ReflectorGone);
                        continue;
                    }
                },
                None => None,
            };
            let mut out = shard.clone();
            out.empty_since = if empty {
                Some(shard.empty_since.unwrap_or(now))
            } else {
                None
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
                Some(slot) => self.fleet.commit(slot, shard.committed_users),
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
        self.fleet.index();
    }

    fn remove_shard(&mut self, shard: &ShardRecord, reason: RemoveReason) {
        self.decisions.push(Decision::RemoveShard {
            session: shard.session.clone(),
            shard: shard.name.clone(),
            reason,
        });
    }

    /// Phase 3, place pending: a shard still waiting for a reflector is placed again, in its
    /// session's regions in order (a region may have room now that it lacked before). It
    /// runs before sessions open shards: these already exist and the opening rule counts
    /// them as live, so they get room ahead of any new one.
    pub(super) fn place_pending(&mut self) {
        let input = self.input;
        for k in 0..self.pending.len() {
            let i = self.pending[k];
            let Some(session) = input.sessions.get(self.owner[i]) else {
                continue;
            };
            let Some(&pool) = self.fleet.pool_ids.get(session.pool.as_str()) else {
                continue;
            };
            self.fleet
                .allowed_regions(pool, &session.policy, &mut self.allowed, &mut self.unknown);
            let claim = session.policy.max_users_per_shard;
            self.shards[i].reflector = None;
            for &r in &self.allowed {
                if let Some(placed) = self.fleet.place_in(r, claim) {
                    let reflector = match placed {
                        Placed::Ready(slot) => self.fleet.slots[slot]
                            .real
                            .map(|x| input.reflectors[x].name.clone()),
                        Placed::Pending => None,
                    };
                    let shard = &mut self.shards[i];
                    shard.region = self.fleet.regions[r].spec.name.clone();
                    shard.committed_users = claim;
                    shard.reflector = reflector;
                    break;
                }
            }
        }
    }
}
