//! # Opening a shard at once, for one Session
//!
//! When every routable shard of a session is at its threshold and none is opening, the
//! Route opens the next one itself instead of waiting for the backend's next plan. It runs
//! the same pure planner the backend runs, on an input of that session alone
//! ([`refleet_core::planner::session_input`]): its own shards, marked waiting, and its
//! pool's reflectors in its regions offering only the room the pool's other shards leave
//! them (summed once per published view, [`Published::reflector_at`], and adjusted here
//! for what changed since: the shards this router opened and the closing shards still in
//! use). Reflectors with no room left are counted, not copied in (`Reach`). So a new shard
//! costs the session's shards, an array read for each reflector of its pool and regions, and
//! a stream lookup and a copy for each one with room, not the whole pool: planning the pool
//! was half of a saturated leader's core, and looking at and copying every reflector most
//! of what was left (docs/scale.md).
//!
//! What the Route saw, the plan must see too: reflectors the Route cannot send users to
//! offer no room, a region whose reflectors are lost is down, and shards the Route counts
//! as full (adopted from reports, on blocked reflectors, inherited after a failover) are
//! held at their threshold.

use std::time::Duration;

use foldhash::HashSet as FastSet;

use super::opened::Opened;
use super::pick::threshold_load;
use super::route::{Target, fill_load};
use super::view::{FleetState, Published, SessionDef};
use super::{Inner, RouteError};
use crate::crd::ShardPhase;
use refleet_core::planner::{
    Decision, Held, HeldRoom, PlanInput, PoolInput, ReflectorState, SessionInput, ShardPlan,
    ShardPolicy, ShardRecord, plan_shards, session_input, split_session_key,
};
use refleet_core::shard::parse_shard_name;

use super::ledger::{Ledger, Millis};
use super::route::{Inherited, warm_margin};

/// Records `shard`, planned by [`plan_shard`], as opened by this router.
pub(super) fn record_opened(inner: &mut Inner, shard: ShardRecord) {
    tracing::info!(session = %shard.session, shard = %shard.name, region = %shard.region, reflector = ?shard.reflector, "router opened a shard");
    inner
        .mine
        .insert((shard.session.clone(), shard.name.clone()));
    inner.opened.push(shard);
}

/// The shard the planner would open for the target now, not recorded yet
/// ([`record_opened`] does); `name` is the session name the client asked for. With
/// `past_opening`, the session's shards still opening (waiting for a placement, a starting
/// reflector or a hand-off) count as full, so the plan opens one beside them.
pub(super) fn plan_shard(
    inner: &mut Inner,
    view: &Published,
    target: &Target<'_>,
    (name, past_opening): (&str, bool),
    now: Millis,
    grace: Millis,
) -> Result<ShardRecord, RouteError> {
    let (def, key) = (target.def, target.key.as_str());
    let refused = |why: String| RouteError::Exhausted {
        message: format!("session {name:?}: {why}"),
        retry_after: Duration::from_secs(2),
    };
    let Some(pool) = view.fleet.input.pools.iter().find(|p| p.id == def.pool) else {
        return Err(refused(format!(
            "no ReflectorPool {} in this namespace",
            def.pool
        )));
    };
    let (session, demanded) =
        waiting_session(view.input_session(key), def, key, name, &target.order);
    if demanded {
        // Kept until a published view holds a shard of it: the next plan must keep it.
        inner.demanded.insert(key.to_owned(), session.clone());
    }
    let mut own: Vec<ShardRecord> = view
        .session_shards(key)
        .chain(inner.opened.of_session(key))
        .cloned()
        .collect();
    let adopted = adopt_reported(&mut own, view, &inner.fleet, def, key, name);
    let others = others_room(
        view,
        &inner.opened,
        &inner.fleet,
        &inner.ledger,
        key,
        &def.pool,
        now,
    );
    let hosts: FastSet<usize> = own
        .iter()
        .flat_map(|s| s.reflector.iter().chain(&s.moving_to))
        .filter_map(|r| view.reflector_index(r))
        .collect();
    let reach = Reach::of(
        inner,
        view,
        pool,
        &session.policy.regions,
        &hosts,
        now,
        grace,
    );
    let reflectors = reach.offered.iter().map(|&(i, no_room)| {
        let r = &view.fleet.input.reflectors[i];
        let held = if no_room {
            Held::ALL
        } else {
            view.reflector_at(i).held + others.of(&r.name)
        };
        (r, held)
    });
    let mut input = session_input(reach.pool, session, own, reflectors, view.fleet.input.now);
    fill_load(&inner.fleet, &inner.ledger, &mut input, now);
    let blocked = reach.blocked;
    // Full for the plan, as for the Route: shards adopted from reports (the Route cannot send
    // users to them before a plan publishes them), shards on blocked reflectors, and
    // inherited shards the Route counts as full.
    let t = threshold_load(def.spec.max_users_per_shard, def.spec.scale_up_threshold);
    let inherited = Inherited::of(inner, now);
    let margin = warm_margin(&def.spec);
    let opening = |sh: &ShardRecord| {
        matches!(sh.phase, ShardPhase::Pending | ShardPhase::Moving)
            || sh.reflector.as_deref().is_none_or(|r| {
                view.reflector(r)
                    .is_some_and(|o| o.state == ReflectorState::Starting)
            })
    };
    hold_full(&mut input, key, t, |sh| {
        adopted.contains(&sh.name)
            || sh.reflector.as_ref().is_some_and(|r| blocked.contains(r))
            || inherited.held_full(&inner.fleet, sh, margin)
            || (past_opening && opening(sh))
    });
    shard_opened_by(&plan_shards(&input), key).map_err(refused)
}

/// The room that changed since `view` was published, besides the session `key`'s own
/// shards: the view's sum holds them (they are the input's, so they come out), it lacks
/// the shards of `pool` this router opened since and the closing shards someone is still
/// on (users reported or places reserved).
fn others_room<'a>(
    view: &Published,
    opened: &'a Opened,
    fleet: &FleetState,
    ledger: &Ledger,
    key: &str,
    pool: &'a str,
    now: Millis,
) -> OthersRoom<'a> {
    let mut room = HeldRoom::default();
    for sh in view.session_shards(key) {
        if sh.phase != ShardPhase::Closing {
            room.release(sh);
        }
    }
    // The pool's opened shards hold their room in `opened` (kept as they come and go);
    // the session's own are in its input, so they come out.
    for sh in opened.of_session(key).filter(|s| s.pool == pool) {
        room.release(sh);
    }
    for sh in view
        .closing_shards()
        .filter(|s| s.pool == pool && s.session != key)
    {
        let Some((_, app, _)) = split_session_key(&sh.session) else {
            continue;
        };
        let mut now_loaded = sh.clone();
        now_loaded.reserved = ledger.pending(app, &sh.name, now);
        if let Some(users) = fleet.users(app, &sh.name) {
            now_loaded.users = users;
        }
        room.charge(&now_loaded);
    }
    OthersRoom { room, opened, pool }
}

/// The room the pool's other shards hold beyond the view's sum, by reflector.
struct OthersRoom<'a> {
    /// The session's own shards taken back, closing shards still in use added.
    room: HeldRoom,
    opened: &'a Opened,
    pool: &'a str,
}

impl OthersRoom<'_> {
    fn of(&self, reflector: &str) -> Held {
        self.room.of(reflector) + self.opened.held_on(self.pool, reflector)
    }
}

/// What the Route cannot use, for the plan:
///
/// - a ready reflector the router cannot send users to (silent or draining on its stream,
///   or without a URL) is `blocked`: it has no room for a new shard, and the session's
///   shards on it count as full; otherwise the plan would keep counting on room there. It
///   still counts as one of its region's reflectors, as it does for the backend's plan, so
///   the new shard goes where the backend would keep it. So does a lost reflector: one
///   that reported and went silent, whatever its pod says now, or whose stream ended while
///   its pod is not Ready (a lost node makes its pods NotReady: they look like starting
///   ones, but are not coming);
/// - a region that lost reflectors and has none the router can send users to is down (its
///   nodes are gone): nothing there takes the new shard, no new reflector is planned there
///   either (its `max_reflectors` is 0 in `pool`), and the shard goes to the next region
///   the Session allows.
///
/// A reflector that the plan's shards fill and that hosts none of the session's shards is
/// not offered to the plan at all: its region's `max_reflectors` counts it instead, and its
/// stream is looked at only when its region's other reflectors cannot tell whether the
/// region is down. So an opening reads the stream, name and strings of the reflectors with
/// room (and the session's hosts) only: at a few shards per reflector, most of a pool is
/// full.
struct Reach {
    /// The session's pool: each region's `max_reflectors` less its usable reflectors not
    /// offered, and 0 for a region that is down.
    pool: PoolInput,
    /// Reflectors the Route cannot send users to (of those offered).
    blocked: FastSet<String>,
    /// The reflectors offered to the plan, as indexes in the view's reflectors, and whether
    /// each offers no room: blocked, or in a region that is down.
    offered: Vec<(usize, bool)>,
}

/// What one region's reflectors tell about it: one the router can send users to, a lost
/// one.
#[derive(Clone, Copy, Default)]
struct Alive {
    alive: bool,
    lost: bool,
}

impl Reach {
    /// Looks at the reflectors of `pool` in the `allowed` regions (all, when empty);
    /// `hosts` are the view's indexes of the reflectors the session's shards are on or
    /// moving to.
    fn of(
        inner: &Inner,
        view: &Published,
        pool: &PoolInput,
        allowed: &[String],
        hosts: &FastSet<usize>,
        now: Millis,
        grace: Millis,
    ) -> Self {
        let mut planned = pool.clone();
        let regions = pool.regions.len();
        // Per region of the pool: what its reflectors tell, and the full ones not offered.
        let mut told = vec![Alive::default(); regions];
        let mut full: Vec<Vec<usize>> = vec![Vec::new(); regions];
        let mut blocked = FastSet::default();
        let mut offered = Vec::new();
        let look = |i: usize, told: &mut Alive| {
            let r = &view.fleet.input.reflectors[i];
            let stream = inner.fleet.stream_of(&r.name, now, grace);
            let ready = r.state == ReflectorState::Ready;
            // Lost once silent past the grace, or at once when its pod is no longer Ready
            // and its stream has ended: a lost node does both to all its pods, and waiting
            // out the grace there sent a lost region's users to open shards on pods that
            // were not coming (run I1, docs/scale.md).
            let lost = if ready { stream.silent } else { stream.gone() };
            let unreachable =
                lost || (ready && (stream.no_routes || !view.reflector_at(i).has_url));
            told.alive |= ready && !unreachable;
            told.lost |= lost;
            unreachable
        };
        let region_of = |i: usize| {
            let r = &view.fleet.input.reflectors[i];
            pool.regions.iter().position(|g| g.name == r.region)
        };
        for i in view.reflectors_in(&pool.id, allowed) {
            let at = view.reflector_at(i);
            // A reflector the plan counts as usable has its region's index; another one
            // (old image, draining) is looked up by name, as it is rare.
            let host = hosts.contains(&i);
            let Some(k) = at.usable_in.or_else(|| region_of(i)) else {
                // Outside the pool's regions: the plan uses it only for the session's
                // shards on it.
                if host {
                    offered.push((i, false));
                }
                continue;
            };
            if at.full && !host {
                full[k].push(i);
                if at.usable_in.is_some() {
                    let spec = &mut planned.regions[k];
                    spec.max_reflectors = spec.max_reflectors.saturating_sub(1);
                }
                continue;
            }
            let unreachable = look(i, &mut told[k]);
            if unreachable {
                blocked.insert(view.fleet.input.reflectors[i].name.clone());
            }
            offered.push((i, unreachable));
        }
        // A region none of whose offered reflectors can take users may still have a full
        // one that can: then it is not down.
        for (k, told) in told.iter_mut().enumerate() {
            for &i in &full[k] {
                if told.alive {
                    break;
                }
                look(i, told);
            }
        }
        let down: Vec<bool> = told.iter().map(|t| t.lost && !t.alive).collect();
        if down.contains(&true) {
            for (i, no_room) in &mut offered {
                *no_room |= region_of(*i).is_some_and(|k| down[k]);
            }
            for (spec, _) in planned.regions.iter_mut().zip(&down).filter(|(_, d)| **d) {
                spec.max_reflectors = 0;
                spec.min_reflectors = 0;
            }
        }
        Reach {
            pool: planned,
            blocked,
            offered,
        }
    }
}

/// The session as the plan must see it: waiting for a shard, in the Route's region order.
/// A pattern session no plan knows yet (`known` is `None`) is new; `true` says so, so that
/// the router can remember the demand.
fn waiting_session(
    known: Option<&SessionInput>,
    def: &SessionDef,
    key: &str,
    name: &str,
    order: &[String],
) -> (SessionInput, bool) {
    let (mut s, new) = match known {
        Some(s) => (s.clone(), false),
        None => (
            SessionInput {
                key: key.to_owned(),
                name: name.to_owned(),
                pool: def.pool.clone(),
                policy: ShardPolicy::from(&def.spec),
                deleted: false,
                waiting: true,
            },
            true,
        ),
    };
    s.waiting = true;
    s.policy.regions = order.to_vec();
    (s, new)
}

/// Adds to `own` the shards of session `name` (key `key`) that reflectors of its pool
/// report with users but no plan holds (a previous leader opened them and no status
/// records them yet), as open shards of the reflector reporting them, so a new shard never
/// takes one of their names. The Route does not send users to them until a published plan
/// has them. Returns their names.
fn adopt_reported(
    own: &mut Vec<ShardRecord>,
    view: &Published,
    fleet: &FleetState,
    def: &SessionDef,
    key: &str,
    name: &str,
) -> FastSet<String> {
    let mut adopted = FastSet::default();
    let app = def.spec.app_id.as_str();
    for (shard, users) in fleet.reported_of_session(app, name) {
        // An empty one is not adopted (as the backends do): nobody would be split from it.
        if users == 0 || own.iter().any(|s| s.session == key && s.name == shard) {
            continue;
        }
        let Some((_, index)) = parse_shard_name(shard) else {
            continue;
        };
        let Some((reflector, users, observed)) = fleet.hosts_of(app, shard).find_map(|(r, n)| {
            let observed = view.reflector(r).filter(|o| o.pool == def.pool)?;
            Some((r, n, observed))
        }) else {
            continue;
        };
        own.push(ShardRecord {
            session: key.to_owned(),
            name: shard.to_owned(),
            index,
            pool: def.pool.clone(),
            region: observed.region.clone(),
            reflector: Some(reflector.to_owned()),
            committed_users: def.spec.max_users_per_shard,
            users,
            reserved: 0,
            phase: ShardPhase::Open,
            empty_since: None,
            moving_to: None,
            moved_at: None,
        });
        adopted.insert(shard.to_owned());
    }
    adopted
}

/// Raises the load of session `key`'s shards that `held` picks to the threshold load `t`,
/// so the planner sees them at their threshold.
fn hold_full(input: &mut PlanInput, key: &str, t: u64, held: impl Fn(&ShardRecord) -> bool) {
    for sh in input.shards.iter_mut().filter(|s| s.session == key) {
        let load = sh.load();
        if load < t && held(sh) {
            sh.reserved = sh
                .reserved
                .saturating_add(u32::try_from(t - load).unwrap_or(u32::MAX));
        }
    }
}

/// The shard the plan opens for session `key`, or why it opens none.
fn shard_opened_by(plan: &ShardPlan, key: &str) -> Result<ShardRecord, String> {
    let opened = plan.decisions.iter().find_map(|d| match d {
        Decision::OpenShard { session, shard, .. } if session == key => Some(shard.as_str()),
        _ => None,
    });
    opened
        .and_then(|n| {
            plan.shards
                .iter()
                .find(|s| s.session == key && s.name == n)
                .cloned()
        })
        .ok_or_else(|| {
            plan.decisions
                .iter()
                .find_map(|d| match d {
                    Decision::SessionDegraded {
                        session, message, ..
                    } if session == key => Some(message.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| {
                    "every shard is at its threshold and no new shard can open".to_owned()
                })
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::router::view::tests::{regions, session, shard};
    use refleet_core::planner::{OpenReason, Reason};

    const KEY: &str = "ns/app/a";

    #[test]
    fn the_session_waits_in_the_route_s_region_order_and_a_new_one_is_demanded() {
        let def = session(None, Some("a*"));
        let order = regions(&["us", "eu"]);
        let (new, demanded) = waiting_session(None, &def, KEY, "a", &order);
        assert!(demanded);
        assert!(new.waiting);
        assert_eq!((new.key.as_str(), new.name.as_str()), (KEY, "a"));
        assert_eq!(new.policy.regions, order);

        let mut known = new.clone();
        known.waiting = false;
        known.policy.regions = regions(&["eu"]);
        let (s, demanded) = waiting_session(Some(&known), &def, KEY, "a", &order);
        assert!(!demanded, "the plan knows it already");
        assert!(s.waiting);
        assert_eq!(s.policy.regions, order);
    }

    #[test]
    fn the_plan_names_the_new_shard_or_why_there_is_none() {
        let mut opened = shard("a", 1, "r1");
        opened.session = KEY.into();
        let plan = ShardPlan {
            shards: vec![shard("a", 0, "r1"), opened.clone()],
            decisions: vec![Decision::OpenShard {
                session: KEY.into(),
                shard: "a~1".into(),
                region: "eu".into(),
                reflector: Some("r1".into()),
                reason: OpenReason::AllShardsAtThreshold,
                fell_back_from: Vec::new(),
            }],
        };
        assert_eq!(shard_opened_by(&plan, KEY).unwrap(), opened);
        let degraded = ShardPlan {
            shards: Vec::new(),
            decisions: vec![Decision::SessionDegraded {
                session: KEY.into(),
                reason: Reason::CapacityExhausted,
                message: "no room".into(),
            }],
        };
        assert_eq!(shard_opened_by(&degraded, KEY).unwrap_err(), "no room");
        assert_eq!(
            shard_opened_by(&ShardPlan::default(), KEY).unwrap_err(),
            "every shard is at its threshold and no new shard can open"
        );
    }

    #[test]
    fn hold_full_raises_the_picked_shards_of_one_session_to_the_threshold_for_the_planner() {
        let mut input = PlanInput {
            shards: vec![
                shard("a", 0, "r1"),
                shard("a", 1, "r1"),
                shard("b", 0, "r1"),
            ],
            ..PlanInput::default()
        };
        input.shards[0].users = 3;
        let mine = FastSet::from_iter([(KEY.to_owned(), "a~1".to_owned())]);
        let inherited = Inherited::new(&mine, true, true);
        let fleet = FleetState::default();
        hold_full(&mut input, KEY, 8, |sh| inherited.held_full(&fleet, sh, 2));
        let loads: Vec<u64> = input.shards.iter().map(ShardRecord::load).collect();
        assert_eq!(
            loads,
            [8, 0, 0],
            "the router's own shard and other sessions untouched"
        );
    }
}
