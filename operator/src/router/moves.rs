//! # Moves in flight: the router carries out the planner's moves
//!
//! ```text
//!  plan: shard.moving_to = B ──► backend persists, publishes ──► track (a move id)
//!  target B ready and reporting ──► HandOff{move id} on A's report stream (again every few s)
//!  A's reports: HandOffResult{move id, stored} ──► landed: the published view points at B
//!                                              └─► failed: the shard stays on A, open again
//!  next plan's input (prepare) and any later view (publish) ──► apply: the outcome is kept
//! ```
//!
//! The planner decides a move; only the router can carry it out, because it holds the
//! reflectors' report streams. Both backends share this one path. A landed move shows in the
//! published view at once (Route, ListShards and the gateways see the target) and in the
//! next plan's input, so the backend persists it; the book keeps the outcome until a
//! published view no longer shows the move, so a view computed before the outcome cannot
//! undo it. A move the view stops showing before it ended was called off by the planner.
//!
//! **Never lost, never split.** The source stores before it closes any client and refuses
//! the shard's JOINs afterwards (the fence); a move counts as landed only on the source's
//! word. An outcome that does not come within [`OUTCOME_TIMEOUT`] of the first ask ends the
//! move as timed out: the shard stays where the plan has it.

use std::collections::HashMap;

use refleet_api::report::{HandOff, HandOffResult};
use refleet_core::planner::{Seconds, ShardPhase, ShardRecord, split_session_key};

use super::ledger::Millis;

/// How long after the first ask a move without an outcome ends as timed out. Longer than a
/// reflector's own hand-off bound (20 s: clients' close, then the store).
pub const OUTCOME_TIMEOUT: Millis = 30_000;
/// How long an asked move waits before it is asked again (a lost instruction: the source's
/// stream reconnected; the source ignores a move id it already has).
const ASK_AGAIN: Millis = 3_000;
/// How long a move whose source never had a stream may wait before it ends as timed out.
const UNASKED_TIMEOUT: Millis = 120_000;

/// How a move ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The source stored the shard and sent its clients on: the target hosts it.
    Landed,
    /// The source could not store it (the text says why): it stays on the source.
    Failed(String),
    /// No outcome in time: it stays where the plan has it.
    TimedOut,
}

impl Outcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Landed => "landed",
            Self::Failed(_) => "failed",
            Self::TimedOut => "timed_out",
        }
    }
}

/// The metric labels of ended moves (`aborted`: the planner called it off).
pub const MOVE_OUTCOMES: &[&str] = &["landed", "failed", "timed_out", "aborted"];

/// One move the router knows.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    /// The router's id of the move, echoed in the source's outcome.
    pub id: u64,
    /// Its pool, app and session key.
    pub pool: String,
    pub app: String,
    pub session: String,
    pub shard: String,
    /// Source and target reflectors.
    pub from: String,
    pub to: String,
    /// When the router first saw it, first asked, last asked.
    pub seen: Millis,
    pub first_asked: Option<Millis>,
    pub asked: Option<Millis>,
    pub outcome: Option<Outcome>,
}

/// A move that just ended, for the caller to apply to the published view and count.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub session: String,
    pub shard: String,
    pub from: String,
    pub to: String,
    pub outcome: Outcome,
}

/// A hand-off to ask for now.
#[derive(Clone, Debug, PartialEq)]
pub struct Due {
    /// The reflector asked to hand the shard off.
    pub source: String,
    /// The reflector that will host it (told to take its JOINs).
    pub target: String,
    pub hand_off: HandOff,
}

/// The moves in flight and recently ended, by (session key, shard).
#[derive(Debug, Default)]
pub struct MoveBook {
    next_id: u64,
    moves: HashMap<(String, String), Move>,
}

impl MoveBook {
    /// A book whose ids start after `first` (a new leader picks a random start, so an old
    /// leader's ids are not reused).
    pub fn starting_at(first: u64) -> Self {
        Self {
            next_id: first,
            moves: HashMap::new(),
        }
    }

    /// Moves in flight (no outcome yet).
    pub fn in_flight(&self) -> usize {
        self.moves.values().filter(|m| m.outcome.is_none()).count()
    }

    /// A move by session key and shard.
    pub fn get(&self, session: &str, shard: &str) -> Option<&Move> {
        self.moves.get(&(session.to_owned(), shard.to_owned()))
    }

    /// Rewrites `shards` by the moves that ended: a landed one is on its target, a failed or
    /// timed-out one on its source, open again; `now` is the plan's clock (for the cool-down).
    /// Returns how many shards changed.
    pub fn apply(&self, shards: &mut [ShardRecord], now: Seconds) -> usize {
        let mut changed = 0;
        for sh in shards.iter_mut() {
            let Some(to) = sh.moving_to.as_deref() else {
                continue;
            };
            let Some(m) = self.moves.get(&(sh.session.clone(), sh.name.clone())) else {
                continue;
            };
            if m.to != to || sh.reflector.as_deref() != Some(m.from.as_str()) {
                continue;
            }
            let Some(outcome) = &m.outcome else {
                continue;
            };
            settle(sh, outcome);
            sh.moved_at = Some(now);
            changed += 1;
        }
        changed
    }

    /// Takes the moves a published view of `pools` shows (before [`MoveBook::apply`]
    /// rewrites it): a new one gets an id; a move of those pools that the view no longer
    /// shows is forgotten (an ended one is in the view by now), and returned when it had not
    /// ended (the planner called it off).
    pub fn track(&mut self, pools: &[&str], shards: &[ShardRecord], now: Millis) -> Vec<Move> {
        let mut shown: Vec<(String, String)> = Vec::new();
        for sh in shards {
            let (Some(from), Some(to)) = (&sh.reflector, &sh.moving_to) else {
                continue;
            };
            let key = (sh.session.clone(), sh.name.clone());
            shown.push(key.clone());
            let known = self
                .moves
                .get(&key)
                .is_some_and(|m| &m.from == from && &m.to == to);
            if known {
                continue;
            }
            let app = split_session_key(&sh.session)
                .map(|(_, app, _)| app.to_owned())
                .unwrap_or_default();
            self.next_id = self.next_id.wrapping_add(1).max(1);
            self.moves.insert(
                key,
                Move {
                    id: self.next_id,
                    pool: sh.pool.clone(),
                    app,
                    session: sh.session.clone(),
                    shard: sh.name.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    seen: now,
                    first_asked: None,
                    asked: None,
                    outcome: None,
                },
            );
        }
        let mut called_off = Vec::new();
        self.moves.retain(|key, m| {
            if !pools.contains(&m.pool.as_str()) || shown.contains(key) {
                return true;
            }
            if m.outcome.is_none() {
                called_off.push(m.clone());
            }
            false
        });
        called_off
    }

    /// The hand-offs to ask for now, with the source to ask and the target (told to accept
    /// the shard): moves without an outcome whose target is `ready` and whose source
    /// `has_stream`, not asked within `ASK_AGAIN`.
    pub fn due(
        &mut self,
        now: Millis,
        ready: impl Fn(&str) -> bool,
        has_stream: impl Fn(&str) -> bool,
    ) -> Vec<Due> {
        let mut out = Vec::new();
        for m in self.moves.values_mut() {
            if m.outcome.is_some()
                || m.asked.is_some_and(|t| now < t + ASK_AGAIN)
                || !ready(&m.to)
                || !has_stream(&m.from)
            {
                continue;
            }
            m.asked = Some(now);
            m.first_asked.get_or_insert(now);
            out.push(Due {
                source: m.from.clone(),
                target: m.to.clone(),
                hand_off: HandOff {
                    app_id: m.app.clone(),
                    shard: m.shard.clone(),
                    move_id: m.id,
                },
            });
        }
        out
    }

    /// Whether a move waits to be asked for (cheap check before [`MoveBook::due`]).
    pub fn has_unanswered(&self) -> bool {
        self.moves.values().any(|m| m.outcome.is_none())
    }

    /// An outcome reported by `reflector`: ends the move it answers (only its source may).
    pub fn observe(&mut self, reflector: &str, result: &HandOffResult) -> Option<Ended> {
        let m = self
            .moves
            .values_mut()
            .find(|m| m.id == result.move_id && m.from == reflector && m.outcome.is_none())?;
        if m.app != result.app_id || m.shard != result.shard {
            return None;
        }
        let outcome = if result.stored {
            Outcome::Landed
        } else {
            Outcome::Failed(result.error.clone())
        };
        m.outcome = Some(outcome.clone());
        Some(ended(m, outcome))
    }

    /// Ends the moves whose outcome is overdue.
    pub fn expire(&mut self, now: Millis) -> Vec<Ended> {
        let mut out = Vec::new();
        for m in self.moves.values_mut().filter(|m| m.outcome.is_none()) {
            let overdue = match m.first_asked {
                Some(t) => now >= t + OUTCOME_TIMEOUT,
                None => now >= m.seen + UNASKED_TIMEOUT,
            };
            if overdue {
                m.outcome = Some(Outcome::TimedOut);
                out.push(ended(m, Outcome::TimedOut));
            }
        }
        out
    }
}

/// Ends a shard record's move: on its target when it landed, else on its source, open again
/// either way.
pub fn settle(sh: &mut ShardRecord, outcome: &Outcome) {
    let Some(to) = sh.moving_to.take() else {
        return;
    };
    if *outcome == Outcome::Landed {
        sh.reflector = Some(to);
    }
    if sh.phase == ShardPhase::Moving {
        sh.phase = ShardPhase::Open;
    }
}

fn ended(m: &Move, outcome: Outcome) -> Ended {
    Ended {
        session: m.session.clone(),
        shard: m.shard.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        outcome,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn moving(from: &str, to: &str) -> ShardRecord {
        ShardRecord {
            session: "ns/app/lobby".into(),
            name: "lobby".into(),
            index: 0,
            pool: "ns/pool".into(),
            region: "eu".into(),
            reflector: Some(from.into()),
            committed_users: 10,
            users: 5,
            reserved: 0,
            phase: ShardPhase::Moving,
            empty_since: None,
            moving_to: Some(to.into()),
            moved_at: None,
        }
    }

    fn result(id: u64, stored: bool) -> HandOffResult {
        HandOffResult {
            move_id: id,
            app_id: "app".into(),
            shard: "lobby".into(),
            stored,
            error: if stored {
                String::new()
            } else {
                "disk full".into()
            },
        }
    }

    const POOLS: &[&str] = &["ns/pool"];

    #[test]
    fn a_move_is_asked_of_its_source_once_the_target_is_ready() {
        let mut book = MoveBook::default();
        assert!(book.track(POOLS, &[moving("a", "b")], 0).is_empty());
        assert!(
            book.due(0, |_| false, |_| true).is_empty(),
            "target not ready"
        );
        assert!(
            book.due(0, |_| true, |_| false).is_empty(),
            "source has no stream"
        );
        let asked = book.due(10, |_| true, |_| true);
        assert_eq!(asked.len(), 1);
        let Due {
            source,
            target,
            hand_off: h,
        } = &asked[0];
        assert_eq!((source.as_str(), target.as_str()), ("a", "b"));
        assert_eq!((h.app_id.as_str(), h.shard.as_str()), ("app", "lobby"));
        assert!(book.due(20, |_| true, |_| true).is_empty(), "asked once");
        assert_eq!(
            book.due(10 + ASK_AGAIN, |_| true, |_| true).len(),
            1,
            "asked again later"
        );
        // Tracking the same view again keeps the id.
        book.track(POOLS, &[moving("a", "b")], 30);
        assert_eq!(book.get("ns/app/lobby", "lobby").unwrap().id, h.move_id);
    }

    #[test]
    fn only_the_source_can_land_a_move_and_the_outcome_is_applied() {
        let mut book = MoveBook::default();
        book.track(POOLS, &[moving("a", "b")], 0);
        let id = book.due(0, |_| true, |_| true)[0].hand_off.move_id;
        assert_eq!(book.observe("b", &result(id, true)), None, "not the source");
        assert_eq!(
            book.observe("a", &result(id + 1, true)),
            None,
            "another move"
        );
        let mut wrong = result(id, true);
        wrong.shard = "other".into();
        assert_eq!(book.observe("a", &wrong), None, "another shard");
        let ended = book.observe("a", &result(id, true)).unwrap();
        assert_eq!(ended.outcome, Outcome::Landed);
        assert_eq!(
            book.observe("a", &result(id, true)),
            None,
            "repeated outcome"
        );
        assert_eq!(book.in_flight(), 0);
        let mut shards = vec![moving("a", "b")];
        assert_eq!(book.apply(&mut shards, 100), 1);
        let s = &shards[0];
        assert_eq!(s.reflector.as_deref(), Some("b"));
        assert_eq!(
            (s.moving_to.as_ref(), s.moved_at, s.phase),
            (None, Some(100), ShardPhase::Open)
        );
        // A view that shows the landed state lets the book forget the move.
        assert!(book.track(POOLS, &shards, 200).is_empty());
        assert!(book.get("ns/app/lobby", "lobby").is_none());
    }

    #[test]
    fn a_failed_move_leaves_the_shard_on_its_source() {
        let mut book = MoveBook::default();
        book.track(POOLS, &[moving("a", "b")], 0);
        let id = book.due(0, |_| true, |_| true)[0].hand_off.move_id;
        let ended = book.observe("a", &result(id, false)).unwrap();
        assert_eq!(ended.outcome, Outcome::Failed("disk full".into()));
        let mut shards = vec![moving("a", "b")];
        book.apply(&mut shards, 5);
        assert_eq!(shards[0].reflector.as_deref(), Some("a"));
        assert_eq!(shards[0].moving_to, None);
        assert_eq!(shards[0].moved_at, Some(5), "the cool-down starts");
    }

    #[test]
    fn an_unanswered_move_times_out() {
        let mut book = MoveBook::default();
        book.track(POOLS, &[moving("a", "b")], 0);
        book.due(1_000, |_| true, |_| true);
        assert!(book.expire(1_000 + OUTCOME_TIMEOUT - 1).is_empty());
        let ended = book.expire(1_000 + OUTCOME_TIMEOUT);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].outcome, Outcome::TimedOut);
        // Never asked (the source never had a stream): a longer bound.
        let mut book = MoveBook::default();
        book.track(POOLS, &[moving("a", "b")], 0);
        assert!(book.expire(UNASKED_TIMEOUT - 1).is_empty());
        assert_eq!(book.expire(UNASKED_TIMEOUT).len(), 1);
    }

    #[test]
    fn a_move_the_planner_calls_off_is_forgotten_and_reported() {
        let mut book = MoveBook::default();
        book.track(POOLS, &[moving("a", "b")], 0);
        let mut still = moving("a", "b");
        still.moving_to = None;
        let off = book.track(POOLS, &[still.clone()], 10);
        assert_eq!(off.len(), 1);
        assert_eq!(book.in_flight(), 0);
        // Another pool's view does not touch this pool's moves.
        book.track(POOLS, &[moving("a", "b")], 20);
        assert!(book.track(&["ns/other"], &[], 30).is_empty());
        assert_eq!(book.in_flight(), 1);
        // A view computed before the outcome does not undo it: apply rewrites it again.
        let id = book.due(40, |_| true, |_| true)[0].hand_off.move_id;
        book.observe("a", &result(id, true));
        let mut stale = vec![moving("a", "b")];
        book.apply(&mut stale, 50);
        assert_eq!(stale[0].reflector.as_deref(), Some("b"));
        // A new move of the same shard (to another target) gets a new id.
        book.track(POOLS, &[moving("a", "c")], 60);
        assert_ne!(book.get("ns/app/lobby", "lobby").unwrap().id, id);
    }
}
