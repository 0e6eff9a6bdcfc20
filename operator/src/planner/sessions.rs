//! Phases 4 to 7: each session's shards. Per session, closing runs before opening so that
//! the opening rule sees the shards that stay; sessions go one after another, in input
//! order, because each opening takes room the next session will not find.

use super::at_threshold;
use super::fleet::Placed;
use super::model::*;
use super::state::{BySession, PlanState};
use crate::crd::shard_name;

impl PlanState<'_> {
    /// Phase 4, group: the adopted shards of each session, so that the per-session phases
    /// do not scan every shard.
    pub(super) fn group_by_session(&mut self) {
        self.by_session = BySession::new(&self.owner, self.input.sessions.len());
    }

    /// Phase 5, regions: fills `allowed` with the regions session `s` may use, and says why
    /// the session is degraded if its pool or some of its regions do not exist. False when
    /// there is nothing to do for it: it is deleted (its shards closed on adoption) or its
    /// pool is missing.
    pub(super) fn session_regions(&mut self, s: usize) -> bool {
        let session = &self.input.sessions[s];
        if session.deleted {
            return false;
        }
        let Some(&pool) = self.fleet.pool_ids.get(session.pool.as_str()) else {
            self.decisions.push(Decision::SessionDegraded {
                session: session.key.clone(),
                reason: Reason::PoolNotFound,
                message: format!("no ReflectorPool {} in this namespace", session.pool),
            });
            return false;
        };
        self.fleet
            .allowed_regions(pool, &session.policy, &mut self.allowed, &mut self.unknown);
        if !self.unknown.is_empty() {
            self.decisions.push(Decision::SessionDegraded {
                session: session.key.clone(),
                reason: Reason::UnknownRegion,
                message: format!(
                    "pool {} has no region {}",
                    session.pool,
                    self.unknown.join(", ")
                ),
            });
        }
        true
    }

    /// Phase 6, close idle: shards of session `s` empty for the idle period close, highest
    /// numbers first (so the low numbers stay and reopen first), while the session keeps
    /// `minShards` live ones. The last live shard below the threshold is kept when the
    /// others are all at it: closing it would only make the opening rule open another one
    /// at once.
    pub(super) fn close_idle(&mut self, s: usize) {
        let session = &self.input.sessions[s];
        let policy = &session.policy;
        let now = self.input.now;
        let shards = &mut self.shards;
        let mine = self.by_session.of(s);
        let mut live = mine
            .iter()
            .filter(|&&i| shards[i].phase != ShardPhase::Closing)
            .count();
        mine.sort_by_key(|&i| std::cmp::Reverse(shards[i].index));
        let mut below_live = mine
            .iter()
            .filter(|&&i| {
                shards[i].phase != ShardPhase::Closing && !at_threshold(shards[i].load(), policy)
            })
            .count();
        for &i in mine.iter() {
            let shard = &mut shards[i];
            if shard.phase == ShardPhase::Closing || live <= policy.min_shards as usize {
                continue;
            }
            let is_below = !at_threshold(shard.load(), policy);
            if is_below && below_live == 1 && live > 1 {
                continue;
            }
            if let Some(since) = shard.empty_since
                && now.saturating_sub(since) >= policy.close_idle_after
            {
                shard.phase = ShardPhase::Closing;
                live -= 1;
                below_live -= usize::from(is_below);
                self.decisions.push(Decision::CloseShard {
                    session: session.key.clone(),
                    shard: shard.name.clone(),
                    reason: CloseReason::Idle,
                });
            }
        }
    }

    /// Phase 7, open: session `s` gets shards while it has fewer than `minShards` live, or
    /// while every live one is at its threshold (and it has one, or a client waits), up to
    /// `maxShards`. Each takes the lowest free number and goes to the first allowed region
    /// with room (see [`Fleet::place_in`](super::fleet::Fleet::place_in)).
    pub(super) fn open_shards(&mut self, s: usize) {
        let input = self.input;
        let now = input.now;
        let session = &input.sessions[s];
        let policy = &session.policy;
        let mine = self.by_session.of(s);
        let shards = &self.shards;
        let mut live = mine
            .iter()
            .filter(|&&i| shards[i].phase != ShardPhase::Closing)
            .count();
        let mut used: Vec<u32> = mine.iter().map(|&i| shards[i].index).collect();
        let mut below = mine.iter().any(|&i| {
            shards[i].phase != ShardPhase::Closing && !at_threshold(shards[i].load(), policy)
        });
        loop {
            let reason = if live < policy.min_shards as usize {
                OpenReason::MinShards
            } else if !below && live < policy.max_shards as usize && (live > 0 || session.waiting) {
                OpenReason::AllShardsAtThreshold
            } else {
                if !below && live > 0 && live >= policy.max_shards as usize {
                    self.decisions.push(Decision::SessionDegraded {
                        session: session.key.clone(),
                        reason: Reason::MaxShardsReached,
                        message: format!(
                            "all {live} shards are at the scale-up threshold and maxShards is {}",
                            policy.max_shards
                        ),
                    });
                }
                break;
            };
            let mut tried = Vec::new();
            let mut placed = None;
            for &r in &self.allowed {
                if let Some(p) = self.fleet.place_in(r, policy.max_users_per_shard) {
                    placed = Some((r, p));
                    break;
                }
                tried.push(self.fleet.regions[r].spec.name.clone());
            }
            let Some((r, p)) = placed else {
                self.decisions.push(Decision::SessionDegraded {
                    session: session.key.clone(),
                    reason: Reason::CapacityExhausted,
                    message: "every allowed region is at maxReflectors with no room for a shard"
                        .to_owned(),
                });
                break;
            };
            let index = (0..).find(|n| !used.contains(n)).unwrap_or(0);
            used.push(index);
            let reflector = match p {
                Placed::Ready(slot) => self.reflector_name(slot),
                Placed::Pending => None,
            };
            let name = shard_name(&session.name, index);
            let region = self.fleet.regions[r].spec.name.clone();
            self.decisions.push(Decision::OpenShard {
                session: session.key.clone(),
                shard: name.clone(),
                region: region.clone(),
                reflector: reflector.clone(),
                reason,
                fell_back_from: tried,
            });
            self.shards.push(ShardRecord {
                session: session.key.clone(),
                name,
                index,
                pool: session.pool.clone(),
                region,
                reflector,
                committed_users: policy.max_users_per_shard,
                users: 0,
                reserved: 0,
                phase: ShardPhase::Open,
                empty_since: Some(now),
            });
            self.owner.push(s);
            live += 1;
            below = true;
        }
    }

    /// Phase 8, shard phases: every shard not closing is pending (no reflector yet), full
    /// (at its threshold: the router sends it no one new) or open. This runs once every
    /// shard has its final placement.
    pub(super) fn set_shard_phases(&mut self) {
        for (shard, &s) in self.shards.iter_mut().zip(&self.owner) {
            if shard.phase == ShardPhase::Closing {
                continue;
            }
            let policy = self.input.sessions.get(s).map(|s| &s.policy);
            shard.phase = match (&shard.reflector, policy) {
                (None, _) => ShardPhase::Pending,
                (Some(_), Some(p)) if at_threshold(shard.load(), p) => ShardPhase::Full,
                (Some(_), _) => ShardPhase::Open,
            };
        }
    }
}
