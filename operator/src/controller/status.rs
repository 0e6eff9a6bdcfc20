//! From a [`Plan`] to the status of a ReflectorPool or a Session (pure).
//!
//! Conditions keep their `lastTransitionTime` while their status does not change, so the
//! same plan always yields the same status and the controller writes nothing when nothing
//! changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use super::input::{pool_id, session_key};
use crate::crd::{
    BusySession, CONDITION_DEGRADED, CONDITION_PROGRESSING, CONDITION_READY, CapacityTotals,
    PoolSummary, Reason, ReflectorPool, ReflectorPoolStatus, RegionStatus, Session, SessionStatus,
    ShardPhase, ShardStatus,
};
use crate::fleet::by_session::{self, BySession};
use refleet_core::planner::{Decision, Plan, Seconds, ShardRecord};

/// Whether planner session `key` is one of the concrete sessions of `session`.
pub fn governs(session: &Session, key: &str) -> bool {
    crate::fleet::governs(&session.namespace().unwrap_or_default(), &session.spec, key)
}

/// The first problem with `session` that only the operator can see: its pool is missing,
/// it names regions the pool lacks, or the planner reported one.
pub fn session_problem(
    session: &Session,
    pool: Option<&ReflectorPool>,
    plan: &Plan,
) -> Option<(Reason, String)> {
    problem_of(session, pool, &by_session::degraded(plan))
}

/// What [`session_problem`] finds, with the plan's degraded sessions already grouped.
fn problem_of(
    session: &Session,
    pool: Option<&ReflectorPool>,
    degraded: &BySession<'_, (usize, Reason, &str)>,
) -> Option<(Reason, String)> {
    let Some(pool) = pool else {
        return Some(pool_not_found(session));
    };
    if let Some(unknown) = unknown_regions(session, pool) {
        return Some(unknown);
    }
    let namespace = session.namespace().unwrap_or_default();
    degraded
        .governed(&namespace, &session.spec)
        .map(|(_, d)| *d)
        .min_by_key(|(order, _, _)| *order)
        .map(|(_, reason, message)| (reason, message.to_owned()))
}

fn pool_not_found(session: &Session) -> (Reason, String) {
    (
        Reason::PoolNotFound,
        format!(
            "no ReflectorPool {} in namespace {}",
            session.spec.pool_ref.name,
            session.namespace().unwrap_or_default()
        ),
    )
}

fn unknown_regions(session: &Session, pool: &ReflectorPool) -> Option<(Reason, String)> {
    let unknown: Vec<&str> = session
        .spec
        .regions
        .iter()
        .filter(|r| pool.spec.regions.iter().all(|p| &p.name != *r))
        .map(String::as_str)
        .collect();
    (!unknown.is_empty()).then(|| {
        (
            Reason::UnknownRegion,
            format!(
                "pool {} has no region {}",
                pool.name_any(),
                unknown.join(", ")
            ),
        )
    })
}

/// A condition, keeping the previous transition time when its status is unchanged.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: Reason,
    message: String,
    generation: Option<i64>,
    now: Seconds,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time(now));
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.as_str().to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn time(now: Seconds) -> Time {
    let secs = i64::try_from(now).unwrap_or(i64::MAX);
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default())
}

/// Whether `new` differs from `old` in user counts alone (the Session's, its shards' and
/// the busiest sessions of a pattern): a change that may wait for the next counts write,
/// so that user churn does not turn into one status write per Session per sync.
fn only_counts_changed(old: &SessionStatus, new: &SessionStatus) -> bool {
    let without_counts = |s: &SessionStatus| {
        let mut s = s.clone();
        s.users = 0;
        for shard in &mut s.shards {
            shard.users = 0;
        }
        s.busiest.clear();
        s
    };
    without_counts(old) == without_counts(new)
}

/// Whether a sync at `now` writes `new` over a Session's `old` status, which this operator
/// last wrote at `written`: any change at once, except a change of user counts alone, which
/// waits until `every` has passed since that write (so that user churn costs at most one
/// status write per Session per `every`).
pub fn status_write_due(
    old: Option<&SessionStatus>,
    new: &SessionStatus,
    written: Option<Seconds>,
    now: Seconds,
    every: std::time::Duration,
) -> bool {
    match old {
        Some(old) if old == new => false,
        Some(old) if only_counts_changed(old, new) => {
            written.is_none_or(|at| now.saturating_sub(at) >= every.as_secs())
        }
        _ => true,
    }
}

/// The status of `session` after `plan`.
pub fn session_status(
    session: &Session,
    pool: Option<&ReflectorPool>,
    plan: &Plan,
    now: Seconds,
) -> SessionStatus {
    let mine: Vec<_> = plan
        .shards
        .iter()
        .filter(|s| governs(session, &s.session))
        .collect();
    status_of(session, &mine, session_problem(session, pool, plan), now)
}

/// Every Session's status after `plan` and its problem ([`session_status`],
/// [`session_problem`]), in `sessions`' order, with the plan's shards and degraded
/// sessions grouped once: each Session costs the shards it governs, not a scan of the plan.
pub fn session_statuses(
    sessions: &[Session],
    pool: Option<&ReflectorPool>,
    plan: &Plan,
    now: Seconds,
) -> Vec<(SessionStatus, Option<(Reason, String)>)> {
    let shards = by_session::shards(&plan.shards);
    let degraded = by_session::degraded(plan);
    sessions
        .iter()
        .map(|session| {
            let namespace = session.namespace().unwrap_or_default();
            let mine: Vec<&ShardRecord> = shards
                .governed(&namespace, &session.spec)
                .flat_map(|(_, of_key)| of_key.iter().copied())
                .collect();
            let problem = problem_of(session, pool, &degraded);
            (status_of(session, &mine, problem.clone(), now), problem)
        })
        .collect()
}

/// The status of `session`, which governs the shards `mine`, with its `problem`.
fn status_of(
    session: &Session,
    mine: &[&ShardRecord],
    problem: Option<(Reason, String)>,
    now: Seconds,
) -> SessionStatus {
    let spec = &session.spec;
    let generation = session.metadata.generation;
    let previous = session
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let pending = mine.iter().any(|s| s.phase == ShardPhase::Pending);
    let open = mine
        .iter()
        .filter(|s| s.phase != ShardPhase::Closing)
        .count();
    let users: u64 = mine.iter().map(|s| u64::from(s.users)).sum();
    let blocking = problem.as_ref().filter(|(r, _)| {
        matches!(
            r,
            Reason::PoolNotFound | Reason::UnknownRegion | Reason::CapacityExhausted
        )
    });
    let ready = blocking.is_none() && !pending;
    let (ready_reason, ready_message) = match (&blocking, pending) {
        (Some((r, m)), _) => (*r, m.clone()),
        (None, true) => (
            Reason::ScalingUp,
            "shards wait for a reflector to start".to_owned(),
        ),
        (None, false) => (Reason::AsExpected, format!("{open} shards open")),
    };
    let conditions = vec![
        condition(
            previous,
            CONDITION_READY,
            ready,
            ready_reason,
            ready_message,
            generation,
            now,
        ),
        condition(
            previous,
            CONDITION_PROGRESSING,
            pending,
            if pending {
                Reason::ScalingUp
            } else {
                Reason::AsExpected
            },
            if pending {
                "shards wait for a reflector to start".to_owned()
            } else {
                "nothing to do".to_owned()
            },
            generation,
            now,
        ),
        match &problem {
            Some((r, m)) => condition(
                previous,
                CONDITION_DEGRADED,
                true,
                *r,
                m.clone(),
                generation,
                now,
            ),
            None => condition(
                previous,
                CONDITION_DEGRADED,
                false,
                Reason::AsExpected,
                "no problem found".to_owned(),
                generation,
                now,
            ),
        },
    ];
    let mut status = SessionStatus {
        observed_generation: generation,
        conditions,
        display_name: spec.name.clone().or_else(|| spec.name_pattern.clone()),
        shard_count: u32::try_from(open).unwrap_or(u32::MAX),
        users,
        // Whatever the annotation says now was offered to this plan.
        handled_move_request: session
            .annotations()
            .get(super::input::ANNOTATION_MOVE_SHARD)
            .cloned(),
        ..Default::default()
    };
    if spec.name.is_some() {
        status.shards = mine
            .iter()
            .map(|s| ShardStatus {
                name: s.name.clone(),
                region: s.region.clone(),
                reflector: s.reflector.clone().unwrap_or_default(),
                users: s.users,
                state: s.phase,
                moving_to: s.moving_to.clone(),
            })
            .collect();
        status.shards.sort_by(|a, b| a.name.cmp(&b.name));
    } else {
        let mut by_name: std::collections::BTreeMap<&str, BusySession> = Default::default();
        let prefix = session_key(&session.namespace().unwrap_or_default(), &spec.app_id, "");
        for s in mine {
            let name = s.session.strip_prefix(&prefix).unwrap_or(&s.session);
            let e = by_name.entry(name).or_insert_with(|| BusySession {
                name: name.to_owned(),
                shards: 0,
                users: 0,
            });
            e.shards += 1;
            e.users += u64::from(s.users);
        }
        status.active_sessions = Some(u32::try_from(by_name.len()).unwrap_or(u32::MAX));
        let mut busiest: Vec<BusySession> = by_name.into_values().collect();
        busiest.sort_by(|a, b| b.users.cmp(&a.users).then(a.name.cmp(&b.name)));
        busiest.truncate(10);
        status.busiest = busiest;
    }
    status
}

/// The status of `pool` after `plan`.
pub fn pool_status(pool: &ReflectorPool, plan: &Plan, now: Seconds) -> ReflectorPoolStatus {
    let id = pool_id(&pool.namespace().unwrap_or_default(), &pool.name_any());
    let generation = pool.metadata.generation;
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut regions = Vec::new();
    for r in plan.regions.iter().filter(|r| r.pool == id) {
        let cap = pool
            .spec
            .resolved_region(&r.region)
            .map(|r| r.capacity)
            .unwrap_or_default();
        regions.push(RegionStatus {
            name: r.region.clone(),
            ready: r.ready,
            starting: r.starting,
            draining: r.draining,
            desired: r.desired,
            growth_buffer: r.growth_buffer,
            capacity: CapacityTotals {
                sessions: u64::from(r.ready) * u64::from(cap.sessions),
                users: u64::from(r.ready) * u64::from(cap.users),
            },
            used: CapacityTotals {
                sessions: r.committed_shards,
                users: r.committed_users,
            },
        });
    }
    let scaling = plan
        .regions
        .iter()
        .filter(|r| r.pool == id)
        .any(|r| r.ready < r.desired || r.starting > 0 || r.create > 0);
    let exhausted = plan.decisions.iter().any(|d| {
        matches!(d, Decision::SessionDegraded { reason: Reason::CapacityExhausted, session, .. }
            if session.starts_with(&format!("{}/", pool.namespace().unwrap_or_default())))
    });
    let conditions = vec![
        condition(
            previous,
            CONDITION_READY,
            !scaling,
            if scaling {
                Reason::ScalingUp
            } else {
                Reason::AsExpected
            },
            if scaling {
                "reflectors are starting".to_owned()
            } else {
                "every region has its reflectors".to_owned()
            },
            generation,
            now,
        ),
        condition(
            previous,
            CONDITION_PROGRESSING,
            scaling,
            if scaling {
                Reason::ScalingUp
            } else {
                Reason::AsExpected
            },
            if scaling {
                "reflectors are starting".to_owned()
            } else {
                "nothing to do".to_owned()
            },
            generation,
            now,
        ),
        if exhausted {
            condition(
                previous,
                CONDITION_DEGRADED,
                true,
                Reason::CapacityExhausted,
                "a session found no region with room and every allowed region is at maxReflectors"
                    .to_owned(),
                generation,
                now,
            )
        } else {
            condition(
                previous,
                CONDITION_DEGRADED,
                false,
                Reason::AsExpected,
                "no problem found".to_owned(),
                generation,
                now,
            )
        },
    ];
    let ready: u32 = regions.iter().map(|r| r.ready).sum();
    let draining: u32 = regions.iter().map(|r| r.draining).sum();
    let used: u64 = regions.iter().map(|r| r.used.users).sum();
    let cap: u64 = regions.iter().map(|r| r.capacity.users).sum();
    let summary = PoolSummary {
        regions: pool
            .spec
            .regions
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        ready,
        draining,
        users: format!("{used}/{cap}"),
    };
    ReflectorPoolStatus {
        observed_generation: generation,
        conditions,
        regions,
        summary: Some(summary),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crd::{BusySession, ShardStatus};

    fn status(users: u32, state: ShardPhase) -> SessionStatus {
        SessionStatus {
            shard_count: 1,
            users: u64::from(users),
            shards: vec![ShardStatus {
                name: "lobby".into(),
                region: "eu".into(),
                reflector: "arena-eu-0".into(),
                users,
                state,
                moving_to: None,
            }],
            busiest: vec![BusySession {
                name: "lobby".into(),
                shards: 1,
                users: u64::from(users),
            }],
            ..SessionStatus::default()
        }
    }

    #[test]
    fn a_change_of_counts_alone_waits_for_the_period_and_any_other_is_written_at_once() {
        let every = Duration::from_secs(10);
        let old = status(3, ShardPhase::Open);
        let due = |new: &SessionStatus, written, now| {
            status_write_due(Some(&old), new, written, now, every)
        };
        assert!(!due(&old.clone(), Some(0), 100), "unchanged: never");
        let more = status(4, ShardPhase::Open);
        assert!(due(&more, None, 100), "not written by this operator yet");
        assert!(
            !due(&more, Some(95), 100),
            "written 5 s ago: the count waits"
        );
        assert!(due(&more, Some(90), 100), "10 s ago: written");
        let full = status(4, ShardPhase::Full);
        assert!(due(&full, Some(99), 100), "a phase change goes at once");
        assert!(
            status_write_due(None, &more, Some(99), 100, every),
            "no status yet"
        );
        assert!(
            status_write_due(Some(&old), &more, Some(99), 100, Duration::ZERO),
            "0s: every change"
        );
    }

    #[test]
    fn statuses_worked_out_together_are_those_worked_out_one_by_one() {
        use crate::controller::fixtures;
        use refleet_core::planner::Decision;
        let pool = fixtures::pool("ns", "pool", &["eu", "us"]);
        let mut rooms = fixtures::session("ns", "rooms", "pool");
        rooms.spec.name = None;
        rooms.spec.name_pattern = Some("room-*".into());
        let mut elsewhere = fixtures::session("ns", "lost", "pool");
        elsewhere.spec.regions = vec!["mars".into()];
        let sessions = [
            fixtures::session("ns", "lobby", "pool"),
            rooms,
            fixtures::session("ns", "room-a", "pool"),
            fixtures::session("ns", "quiet", "pool"),
            elsewhere,
        ];
        let shard = |key: &str, name: &str, users: u32, phase: ShardPhase| {
            fixtures::shard(key, name, ("ns/pool", "eu"), users, phase)
        };
        let plan = Plan {
            shards: vec![
                shard("ns/app/lobby", "lobby~1", 4, ShardPhase::Open),
                shard("ns/app/lobby", "lobby", 7, ShardPhase::Open),
                shard("ns/app/room-a", "room-a", 3, ShardPhase::Pending),
                shard("ns/app/room-b", "room-b", 9, ShardPhase::Open),
                shard("ns/app/room-b", "room-b~1", 1, ShardPhase::Closing),
                shard("ns/app/lobbyist", "lobbyist", 5, ShardPhase::Open),
            ],
            decisions: vec![Decision::SessionDegraded {
                session: "ns/app/room-b".into(),
                reason: Reason::CapacityExhausted,
                message: "no room for room-b".into(),
            }],
            ..Plan::default()
        };
        let together = session_statuses(&sessions, Some(&pool), &plan, 100);
        let one_by_one: Vec<_> = sessions
            .iter()
            .map(|s| {
                (
                    session_status(s, Some(&pool), &plan, 100),
                    session_problem(s, Some(&pool), &plan),
                )
            })
            .collect();
        assert_eq!(together, one_by_one);
        // And what they say is right, so that two equal wrong answers fail too.
        let summary: Vec<(u32, u64, Option<Reason>)> = together
            .iter()
            .map(|(st, problem)| (st.shard_count, st.users, problem.as_ref().map(|p| p.0)))
            .collect();
        assert_eq!(
            summary,
            [
                (2, 11, None),
                (2, 13, Some(Reason::CapacityExhausted)),
                (1, 3, None),
                (0, 0, None),
                (0, 0, Some(Reason::UnknownRegion)),
            ]
        );
        assert_eq!(together[0].0.shards.len(), 2);
        assert_eq!(together[1].0.active_sessions, Some(2));
        assert_eq!(
            session_statuses(&sessions, None, &plan, 100)[0]
                .1
                .as_ref()
                .map(|p| p.0),
            Some(Reason::PoolNotFound)
        );
    }
}
