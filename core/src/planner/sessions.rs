//! Each session's shards. Per session, closing runs before opening so that the opening rule
//! sees the shards that stay; sessions go one after another, in input order, because each
//! opening takes room the next session will not find.

use super::at_threshold;
use super::model::*;
use super::slots::Placed;
#[cfg(test)]
use super::state::NO_SESSION;
use super::state::{BySession, PlanState};
use crate::shard::shard_name;

impl PlanState<'_> {
    /// The adopted shards of each session, so that the per-session phases do not scan every
    /// shard.
    pub(super) fn group_by_session(&mut self) {
        self.by_session = BySession::new(&self.owner, self.input.sessions.len());
    }

    /// Fills `allowed` with the regions session `s` may use, and says why the session is
    /// degraded if its pool or some of its regions do not exist. False when there is
    /// nothing to do for it: it is deleted (its shards closed on adoption) or its pool is
    /// missing.
    pub(super) fn session_regions(&mut self, s: usize) -> bool {
        let session = &self.input.sessions[s];
        if session.deleted {
            return false;
        }
        let Some(&pool) = self.table.pool_ids.get(session.pool.as_str()) else {
            self.decisions.push(Decision::SessionDegraded {
                session: session.key.clone(),
                reason: Reason::PoolNotFound,
                message: format!("no ReflectorPool {} in this namespace", session.pool),
            });
            return false;
        };
        self.table
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

    /// Shards of session `s` empty for the idle period close, highest numbers first (so the
    /// low numbers stay and reopen first), while the session keeps `minShards` live ones.
    /// The last live shard below the threshold is kept when the others are all at it:
    /// closing it would only make the opening rule open another one at once.
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
            // A moving shard finishes its move first: closing it would strand the hand-off.
            if shard.phase == ShardPhase::Closing
                || shard.moving_to.is_some()
                || live <= policy.min_shards as usize
            {
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

    /// Session `s` gets shards while it has fewer than `minShards` live, or while every live
    /// one is at its threshold (and it has one, or a client waits), up to `maxShards`. Each
    /// takes the lowest free number and the first allowed region with room.
    pub(super) fn open_shards(&mut self, s: usize) {
        let input = self.input;
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
            let Some(reason) = open_reason(policy, session.waiting, live, below) else {
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
            let Some((r, p, tried)) = self.place_new(policy.max_users_per_shard) else {
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
            self.record_opened(s, index, r, p, reason, tried);
            live += 1;
            // It is empty, so below its threshold: only minShards can ask for another.
            below = true;
        }
    }

    /// Adds shard `index` of session `s`, just placed in region `r`, to the plan, and says
    /// why it opened.
    fn record_opened(
        &mut self,
        s: usize,
        index: u32,
        r: usize,
        placed: Placed,
        reason: OpenReason,
        fell_back_from: Vec<String>,
    ) {
        let session = &self.input.sessions[s];
        let reflector = match placed {
            Placed::Ready(slot) => self.reflector_name(slot),
            Placed::Pending => None,
        };
        let name = shard_name(&session.name, index);
        let region = self.table.regions[r].spec.name.clone();
        self.decisions.push(Decision::OpenShard {
            session: session.key.clone(),
            shard: name.clone(),
            region: region.clone(),
            reflector: reflector.clone(),
            reason,
            fell_back_from,
        });
        self.shards.push(ShardRecord {
            session: session.key.clone(),
            name,
            index,
            pool: session.pool.clone(),
            region,
            reflector,
            committed_users: session.policy.max_users_per_shard,
            users: 0,
            reserved: 0,
            phase: ShardPhase::Open,
            empty_since: Some(self.input.now),
            moving_to: None,
            moved_at: None,
        });
        self.owner.push(s);
    }

    /// Places a new shard committing `claim` users in the first allowed region with room:
    /// the region, where it went, and the regions tried before it (the decision reports the
    /// fallback).
    fn place_new(&mut self, claim: u32) -> Option<(usize, Placed, Vec<String>)> {
        let mut tried = Vec::new();
        for &r in &self.allowed {
            if let Some(p) = self.table.place_in(r, claim) {
                return Some((r, p, tried));
            }
            tried.push(self.table.regions[r].spec.name.clone());
        }
        None
    }

    /// Every shard not closing is pending (no reflector yet), full (at its threshold: the
    /// router sends it no one new) or open. This runs once every shard has its final
    /// placement.
    pub(super) fn set_shard_phases(&mut self) {
        for (shard, &s) in self.shards.iter_mut().zip(&self.owner) {
            if shard.phase == ShardPhase::Closing {
                continue;
            }
            let policy = self.input.sessions.get(s).map(|s| &s.policy);
            shard.phase = match (&shard.reflector, policy) {
                (None, _) => ShardPhase::Pending,
                (Some(_), _) if shard.moving_to.is_some() => ShardPhase::Moving,
                (Some(_), Some(p)) if at_threshold(shard.load(), p) => ShardPhase::Full,
                (Some(_), _) => ShardPhase::Open,
            };
        }
    }
}

/// Why a session with `live` shards, `below` telling whether one of them is below its
/// threshold, should get one more now; `None` when it should not.
fn open_reason(
    policy: &ShardPolicy,
    waiting: bool,
    live: usize,
    below: bool,
) -> Option<OpenReason> {
    if live < policy.min_shards as usize {
        Some(OpenReason::MinShards)
    } else if !below && live < policy.max_shards as usize && (live > 0 || waiting) {
        Some(OpenReason::AllShardsAtThreshold)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::fixture::*;
    use super::*;

    /// A state with the given shards adopted and grouped, ready for the per-session phases.
    fn adopted(input: &PlanInput) -> PlanState<'_> {
        let mut state = PlanState::new(input);
        state.adopt_shards();
        state.group_by_session();
        state
    }

    fn reasons(state: &PlanState<'_>) -> Vec<Reason> {
        state
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::SessionDegraded { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn session_regions_lists_the_known_ones_in_order_and_degrades_for_the_rest() {
        let mut picky = session("a");
        picky.policy.regions = vec!["us".into(), "mars".into(), "eu".into()];
        let mut lost = session("b");
        lost.pool = "ns/other".into();
        let mut deleted = session("c");
        deleted.deleted = true;
        let input = input(vec![], vec![picky, lost, deleted, session("d")], vec![]);
        let mut state = adopted(&input);
        assert!(state.session_regions(0));
        assert_eq!(state.allowed, [1, 0]);
        assert!(!state.session_regions(1));
        assert!(!state.session_regions(2));
        assert!(state.session_regions(3));
        assert_eq!(state.allowed, [0, 1]);
        assert_eq!(
            reasons(&state),
            [Reason::UnknownRegion, Reason::PoolNotFound]
        );
    }

    #[test]
    fn close_idle_closes_the_highest_idle_shards_down_to_min_shards() {
        let idle = |index| {
            let mut s = shard("lobby", index, Some("eu-a"), 0);
            s.empty_since = Some(900);
            s
        };
        let (s0, s1, s2) = (idle(0), idle(1), idle(2));
        let mut recent = idle(3);
        recent.empty_since = Some(990);
        let mut lobby = session("lobby");
        lobby.policy.min_shards = 2;
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![lobby],
            vec![s0, s2, s1, recent],
        );
        let mut state = adopted(&input);
        state.close_idle(0);
        let phases: Vec<_> = state.shards.iter().map(|s| (s.index, s.phase)).collect();
        // 3 has been idle too briefly (10 s < 60 s); of the others, 2 then 1 close and 0
        // stays for minShards.
        assert_eq!(
            phases,
            [
                (0, ShardPhase::Open),
                (2, ShardPhase::Closing),
                (1, ShardPhase::Closing),
                (3, ShardPhase::Open)
            ]
        );
        let closed: Vec<_> = state
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::CloseShard {
                    shard,
                    reason: CloseReason::Idle,
                    ..
                } => Some(shard.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(closed, ["lobby~2", "lobby~1"]);
    }

    #[test]
    fn close_idle_keeps_the_standby_below_the_threshold_when_the_others_are_at_it() {
        let mut standby = shard("lobby", 1, Some("eu-a"), 0);
        standby.empty_since = Some(0);
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![shard("lobby", 0, Some("eu-a"), 90), standby],
        );
        let mut state = adopted(&input);
        state.close_idle(0);
        assert!(state.decisions.is_empty());
        assert_eq!(state.shards[1].phase, ShardPhase::Open);
    }

    #[test]
    fn open_shards_takes_the_lowest_free_number_when_every_shard_is_at_the_threshold() {
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![shard("lobby", 1, Some("eu-a"), 80)],
        );
        let mut state = adopted(&input);
        assert!(state.session_regions(0));
        state.open_shards(0);
        assert_eq!(
            state.decisions,
            [Decision::OpenShard {
                session: "lobby".into(),
                shard: "lobby".into(),
                region: "eu".into(),
                reflector: Some("eu-a".into()),
                reason: OpenReason::AllShardsAtThreshold,
                fell_back_from: vec![],
            }]
        );
        let opened = &state.shards[1];
        assert_eq!((opened.index, opened.empty_since), (0, Some(1000)));
        assert_eq!(state.owner, [0, 0]);
        // Its commitment is charged: 400 - 100 - 100.
        assert_eq!(state.table.slots[0].free_users, 200);
    }

    #[test]
    fn open_shards_opens_min_shards_and_falls_back_to_a_region_with_room() {
        let mut lobby = session("lobby");
        lobby.policy.min_shards = 2;
        let mut input = input(vec![], vec![lobby], vec![]);
        input.pools[0].regions[0].max_reflectors = 0;
        let mut state = adopted(&input);
        assert!(state.session_regions(0));
        state.open_shards(0);
        let opened: Vec<_> = state
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::OpenShard {
                    shard,
                    region,
                    reflector,
                    reason,
                    fell_back_from,
                    ..
                } => Some((
                    shard.as_str(),
                    region.as_str(),
                    reflector.clone(),
                    *reason,
                    fell_back_from.clone(),
                )),
                _ => None,
            })
            .collect();
        // No reflector yet: both wait for the one the region will create.
        let want = |shard| {
            (
                shard,
                "us",
                None,
                OpenReason::MinShards,
                vec!["eu".to_owned()],
            )
        };
        assert_eq!(opened, [want("lobby"), want("lobby~1")]);
        assert_eq!(state.table.regions[1].to_create, 1);
    }

    #[test]
    fn open_shards_says_why_it_stops_at_max_shards_or_without_capacity() {
        let mut capped = session("a");
        capped.policy.max_shards = 1;
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![capped, session("b")],
            vec![shard("a", 0, Some("eu-a"), 100)],
        );
        let mut state = adopted(&input);
        // Both regions at maxReflectors, and no room left on eu-a.
        state.table.regions[0].usable = 10;
        state.table.regions[1].usable = 10;
        state.table.regions[0].ready.clear();
        assert!(state.session_regions(0));
        state.open_shards(0);
        assert!(state.session_regions(1));
        state.open_shards(1);
        assert_eq!(
            reasons(&state),
            [Reason::MaxShardsReached, Reason::CapacityExhausted]
        );
    }

    #[test]
    fn open_reason_follows_min_shards_then_the_threshold_up_to_max_shards() {
        let policy = ShardPolicy {
            min_shards: 1,
            max_shards: 3,
            ..ShardPolicy::default()
        };
        let reason = |waiting, live, below| open_reason(&policy, waiting, live, below);
        assert_eq!(reason(false, 0, false), Some(OpenReason::MinShards));
        assert_eq!(
            reason(false, 2, false),
            Some(OpenReason::AllShardsAtThreshold)
        );
        assert_eq!(reason(false, 2, true), None);
        assert_eq!(reason(false, 3, false), None);
        // With minShards 0, a session without shards opens one only for a waiting client.
        let lazy = ShardPolicy {
            min_shards: 0,
            ..policy
        };
        assert_eq!(open_reason(&lazy, false, 0, false), None);
        assert_eq!(
            open_reason(&lazy, true, 0, false),
            Some(OpenReason::AllShardsAtThreshold)
        );
    }

    #[test]
    fn set_shard_phases_marks_pending_full_and_open_and_leaves_closing_alone() {
        let mut closing = shard("lobby", 3, Some("eu-a"), 90);
        closing.phase = ShardPhase::Closing;
        let input = input(
            vec![reflector("eu-a", "eu")],
            vec![session("lobby")],
            vec![],
        );
        let mut state = PlanState::new(&input);
        state.shards = vec![
            shard("lobby", 0, None, 0),
            shard("lobby", 1, Some("eu-a"), 80),
            shard("lobby", 2, Some("eu-a"), 79),
            closing,
            shard("gone", 0, Some("eu-a"), 100),
        ];
        state.owner = vec![0, 0, 0, 0, NO_SESSION];
        state.set_shard_phases();
        let phases: Vec<_> = state.shards.iter().map(|s| s.phase).collect();
        assert_eq!(
            phases,
            [
                ShardPhase::Pending,
                ShardPhase::Full,
                ShardPhase::Open,
                ShardPhase::Closing,
                ShardPhase::Open
            ]
        );
    }
}
