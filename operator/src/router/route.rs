//! # The Route policy: which shard a client joins, and what it holds there
//!
//! Owns the decisions of one Route, taken under the router's lock against the view of the
//! fleet ([`super::view`]) and the reservations ([`super::ledger`]):
//!
//! 1. resolve the Session and the regions to try, preferred first ([`Target`]);
//! 2. count each routable shard's load: reported users, pending reservations, and after a
//!    failover inherited shards as full during the warm-up and while their reflector has
//!    not reported ([`Inherited`], [`Shards::of_session`]);
//! 3. give a user the place it already holds ([`held_place`]);
//! 4. hold anonymous callers to their limits ([`over_client_cap`], [`share_reached`]);
//! 5. pick the fullest shard below the threshold in the first region that has one
//!    ([`super::pick`]), or wait for a shard that is opening;
//! 6. else open a shard at once with the planner ([`open_shard`]);
//! 7. reserve the place ([`Router::reserve`]).
//!
//! Signing the token and the transports are not here: [`Router::route_as`] turns an
//! [`Attempt`] into the answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashSet as FastSet;
use refleet_api::routing::RouteRequest;

use super::ledger::{Claim, Ledger, Millis};
use super::pick::{Candidate, pick, pick_unreserved, region_order, threshold_load};
use super::view::{FleetState, Published, SessionDef, app_ids};
use super::{Caller, Inner, RouteError, Router, lock};
use crate::crd::{SessionSpec, ShardPhase};
use refleet_core::planner::{
    Decision, Plan, PlanInput, PoolInput, ReflectorState, SessionInput, ShardPolicy, ShardRecord,
    plan, session_key,
};
use refleet_core::shard::parse_shard_name;

/// The outcome of one attempt under the lock.
pub(super) enum Attempt {
    Routed(Box<Routed>),
    /// A shard is opening; wait for its reflector.
    Wait,
}

/// A routed client, before its token is signed.
pub(super) struct Routed {
    pub(super) shard: String,
    pub(super) url: String,
    pub(super) files_url: String,
    pub(super) region: String,
    pub(super) app_id: String,
    pub(super) persistence: bool,
    pub(super) max_users: u32,
    pub(super) reservation: u64,
    /// When the join token expires.
    pub(super) token_expires: Millis,
    /// `(session key, user id)` of a user's reservation: its token is remembered.
    pub(super) user: Option<(String, String)>,
    /// The token already handed out for this reservation (a repeated Route of a user).
    pub(super) token: Option<Arc<str>>,
}

/// A shard to answer with: `(shard, reflector URL, region)`.
type Answer = (String, String, String);

impl Routed {
    /// An answer for `(shard, reflector URL, region)` of the Session `def`.
    fn new(
        def: &SessionDef,
        (shard, url, region): Answer,
        reservation: u64,
        token_expires: Millis,
    ) -> Self {
        Self {
            shard,
            url,
            files_url: def.files_url.clone(),
            region,
            app_id: def.spec.app_id.clone(),
            persistence: def.spec.persistence,
            max_users: def.spec.max_users_per_shard,
            reservation,
            token_expires,
            user: None,
            token: None,
        }
    }
}

impl RouteError {
    pub(super) fn no_session(namespace: &str, name: &str) -> Self {
        Self::NotFound(format!(
            "no Session in namespace {namespace:?} covers {name:?}"
        ))
    }
}

/// The session a Route is for and the regions to try, resolved once per attempt.
struct Target<'v> {
    def: &'v SessionDef,
    /// The planner's session key.
    key: String,
    /// The regions to try, preferred first.
    order: Vec<String>,
}

impl<'v> Target<'v> {
    fn new(view: &Published, def: &'v SessionDef, req: &RouteRequest) -> Result<Self, RouteError> {
        let pool = view.fleet.input.pools.iter().find(|p| p.id == def.pool);
        Ok(Self {
            def,
            key: session_key(&def.namespace, &def.spec.app_id, &req.session),
            order: region_order_for(&def.spec, pool, &req.preferred_region)?,
        })
    }

    fn spec(&self) -> &'v SessionSpec {
        &self.def.spec
    }

    fn app(&self) -> &'v str {
        &self.def.spec.app_id
    }

    fn pick(&self, shards: &Shards<'_>) -> Option<usize> {
        let spec = self.spec();
        pick(
            &shards.candidates,
            &self.order,
            spec.max_users_per_shard,
            spec.scale_up_threshold,
        )
    }

    fn pick_unreserved(&self, shards: &Shards<'_>) -> Option<usize> {
        let spec = self.spec();
        pick_unreserved(
            &shards.candidates,
            &self.order,
            spec.max_users_per_shard,
            spec.scale_up_threshold,
        )
    }
}

/// The regions a Route tries, in order: the preferred one first, then the Session's own
/// regions, or its pool's when it names none. A preferred region outside them is the
/// caller's mistake, not a reason to fall back silently.
fn region_order_for(
    spec: &SessionSpec,
    pool: Option<&PoolInput>,
    preferred: &str,
) -> Result<Vec<String>, RouteError> {
    let allowed: Vec<String> = if spec.regions.is_empty() {
        pool.map(|p| p.regions.iter().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    } else {
        spec.regions.clone()
    };
    region_order(&allowed, Some(preferred)).map_err(|r| {
        RouteError::invalid(
            "preferred_region",
            format!("{r:?} is not one of the session's regions {allowed:?}"),
        )
    })
}

/// A session's shards that may get new users now, with their load as the router counts it.
/// Strings are borrowed; only the answer clones them.
struct Shards<'a> {
    candidates: Vec<Candidate>,
    /// Each candidate's shard and reflector URL (`Candidate::index` points here).
    routable: Vec<(&'a ShardRecord, &'a str)>,
    /// A shard waits for its reflector (none placed yet, or one starting): a Route may
    /// wait for it instead of opening another.
    opening: bool,
    /// Places below the threshold not taken by users: what anonymous callers may hold a
    /// share of.
    free: u64,
    /// The public gateway URL per region where the pool has one: answered instead of the
    /// reflector's own URL.
    gateways: &'a std::collections::HashMap<String, String>,
}

impl<'a> Shards<'a> {
    /// The shards of `target` that the published `view` holds or this router opened (`opened`).
    /// `warm_up_exempt`: during the warm-up, the shards this router opened itself; every
    /// other shard counts as at its threshold, as the old leader's tokens may still fill it.
    // Takes the router state field by field: the shards it returns borrow `opened` while
    // the caller may still need the ledger mutably.
    #[allow(clippy::too_many_arguments)]
    fn of_session(
        view: &'a Published,
        opened: &'a [ShardRecord],
        fleet: &FleetState,
        ledger: &Ledger,
        target: &Target<'_>,
        inherited: Inherited<'_>,
        now: Millis,
        grace: Millis,
    ) -> Self {
        let key = &target.key;
        let spec = target.spec();
        let shards = shards_not_closing(view, opened, key);
        let mut out = Shards {
            candidates: Vec::with_capacity(shards.len()),
            routable: Vec::with_capacity(shards.len()),
            opening: false,
            free: 0,
            gateways: &view.fleet.gateways,
        };
        // Looked up once per Route, not once per shard: a session's shards mostly share
        // a few reflectors, and all of them its app.
        let reserved = ledger.of_app(target.app());
        let reported = fleet.app_users(target.app());
        let at_threshold = threshold_load(spec.max_users_per_shard, spec.scale_up_threshold);
        let mut last: Option<(&str, Option<&str>)> = None;
        for sh in shards {
            // A pending shard waits for its reflector, a moving one for its hand-off (both
            // take seconds): a Route with no other room waits for them, it is not refused.
            if sh.phase == ShardPhase::Moving {
                out.opening = true;
                continue;
            }
            let Some(r) = sh.reflector.as_deref() else {
                out.opening = true;
                continue;
            };
            let url = match last {
                Some((name, url)) if name == r => url,
                _ => {
                    let url = fleet.routable_url(view, r, now, grace);
                    last = Some((r, url));
                    url
                }
            };
            let Some(url) = url else {
                // A starting reflector is coming; one that reported and went silent is not.
                out.opening |= view
                    .reflector(r)
                    .is_some_and(|o| o.state == ReflectorState::Starting)
                    && !fleet.silent(r, now, grace);
                continue;
            };
            let users = reported.of(&sh.name).unwrap_or(sh.users);
            out.free += at_threshold.saturating_sub(u64::from(users));
            let mut load = u64::from(users) + u64::from(reserved.pending(&sh.name, now));
            if inherited.held_full(fleet, sh) {
                load = load.max(at_threshold);
            }
            out.candidates.push(Candidate {
                index: out.routable.len(),
                number: sh.index,
                region: sh.region.clone(),
                load,
            });
            out.routable.push((sh, url));
        }
        out
    }

    fn answer(&self, i: usize) -> Answer {
        let (sh, url) = self.routable[i];
        let url = self.gateways.get(&sh.region).map_or(url, String::as_str);
        (sh.name.clone(), url.to_owned(), sh.region.clone())
    }
}

/// After a failover, which inherited shards (those this router did not open) count as full:
/// all of them during the warm-up (tokens the previous leader signed may still be used), then
/// those whose reflector has not reported to this router yet (their load is unknown).
#[derive(Clone, Copy)]
pub(super) struct Inherited<'a> {
    mine: &'a FastSet<(String, String)>,
    warm: bool,
    taken_over: bool,
}

impl<'a> Inherited<'a> {
    fn of(inner: &'a Inner, now: Millis) -> Self {
        Self::new(
            &inner.mine,
            now < inner.warm_until,
            inner.taken_over.is_some(),
        )
    }

    fn new(mine: &'a FastSet<(String, String)>, warm: bool, taken_over: bool) -> Self {
        Self {
            mine,
            warm,
            taken_over,
        }
    }

    fn held_full(&self, fleet: &FleetState, sh: &ShardRecord) -> bool {
        let unheard = || {
            sh.reflector
                .as_deref()
                .is_some_and(|r| !fleet.has_reported(r))
        };
        (self.warm || (self.taken_over && unheard()))
            && !self.mine.contains(&(sh.session.clone(), sh.name.clone()))
    }
}

/// The session's shards, published or opened by this router, that are not closing. Pending
/// shards (waiting for a new reflector) and moving ones are among them: a Route waits for
/// those.
fn shards_not_closing<'a>(
    view: &'a Published,
    opened: &'a [ShardRecord],
    key: &str,
) -> Vec<&'a ShardRecord> {
    view.session_shards(key)
        .chain(opened.iter().filter(|s| s.session == key))
        .filter(|s| {
            matches!(
                s.phase,
                ShardPhase::Open | ShardPhase::Full | ShardPhase::Pending | ShardPhase::Moving
            )
        })
        .collect()
}

/// A user who already holds a place on a routable shard gets it back, with the token it was
/// given: a reconnecting client neither takes a second place nor waits for a signature.
fn held_place(
    ledger: &Ledger,
    shards: &Shards<'_>,
    target: &Target<'_>,
    user_id: &str,
    now: Millis,
) -> Option<Routed> {
    if user_id.is_empty() {
        return None;
    }
    let h = ledger
        .find_user(&target.key, user_id, now)
        .filter(|h| h.app == target.app())?;
    let at = shards
        .routable
        .iter()
        .position(|(sh, _)| sh.name == h.shard)?;
    let mut routed = Routed::new(target.def, shards.answer(at), h.id, h.token_expires);
    routed.user = Some((target.key.clone(), user_id.to_owned()));
    routed.token = h.token.clone();
    Some(routed)
}

/// Whether an anonymous caller already holds as many unused reservations in a session as
/// it may (`cap` 0: no limit).
fn over_client_cap(held: u32, cap: u32) -> bool {
    cap > 0 && held >= cap
}

/// The free places anonymous callers take a share of. While the session may still open a
/// shard its places count as free too, so anonymous callers can fill the last shard and
/// open the next one, but not a second one on their own.
fn free_places_for_anonymous(shards: &Shards<'_>, spec: &SessionSpec) -> u64 {
    let shard_count = u32::try_from(shards.routable.len()).unwrap_or(u32::MAX);
    if shard_count < spec.max_shards {
        shards.free + threshold_load(spec.max_users_per_shard, spec.scale_up_threshold)
    } else {
        shards.free
    }
}

/// Whether anonymous callers together hold their `share` (0..=1) of `free` places, so the
/// next one is answered without a reserved place. A share of 1 is no limit.
fn share_reached(share: f64, held_by_anonymous: u64, free: u64) -> bool {
    let places = (share.clamp(0.0, 1.0) * free as f64).ceil() as u64;
    held_by_anonymous >= places && share < 1.0
}

/// How a Route ends when it does not reserve on an existing shard.
enum Choice {
    /// Reserve a place on this shard.
    Shard(Answer),
    /// Decided without a new reservation: a held place, an unreserved answer, or wait.
    Decided(Attempt),
    /// Every routable shard is at its threshold and none is opening: open one.
    NoRoom,
}

impl Router {
    pub(super) fn attempt(
        &self,
        req: &RouteRequest,
        caller: &Caller,
        authorize: &impl Fn(&str) -> Result<(), RouteError>,
    ) -> Result<Attempt, RouteError> {
        let now = self.now();
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        self.expire_reports(&mut inner.fleet, now);
        let Some((view, at)) = inner.fleet.find_session(&req.namespace, &req.session) else {
            // Just after a takeover the Session may only not be loaded yet: retry, not 404.
            let loading = inner
                .taken_over
                .is_some_and(|at| !inner.published_since_takeover || now < at + self.grace());
            return Err(if loading {
                RouteError::Unavailable(
                    "this replica just became the leader and is still loading the fleet; retry"
                        .to_owned(),
                )
            } else {
                RouteError::no_session(&req.namespace, &req.session)
            });
        };
        let def = &view.fleet.sessions[at];
        authorize(&def.spec.app_id)?;
        let target = Target::new(&view, def, req)?;
        let chosen = match self.choose_existing_shard(inner, &view, &target, req, caller, now)? {
            Choice::Shard(answer) => answer,
            Choice::Decided(attempt) => return Ok(attempt),
            Choice::NoRoom => match self.open_shard_now(inner, &view, &target, req, now)? {
                Some(answer) => answer,
                None => return Ok(Attempt::Wait),
            },
        };
        let routed = self.reserve(&mut inner.ledger, &target, chosen, req, caller, now);
        Ok(Attempt::Routed(Box::new(routed)))
    }

    /// Decides among the session's existing shards: a place the user holds, the anonymous
    /// limits, then the pick.
    fn choose_existing_shard(
        &self,
        inner: &mut Inner,
        view: &Published,
        target: &Target<'_>,
        req: &RouteRequest,
        caller: &Caller,
        now: Millis,
    ) -> Result<Choice, RouteError> {
        let shards = Shards::of_session(
            view,
            &inner.opened,
            &inner.fleet,
            &inner.ledger,
            target,
            Inherited::of(inner, now),
            now,
            self.grace(),
        );
        if let Some(routed) = held_place(&inner.ledger, &shards, target, &req.user_id, now) {
            return Ok(Choice::Decided(Attempt::Routed(Box::new(routed))));
        }
        if let Caller::Anonymous(client) = caller
            && let Some(decided) =
                self.limit_anonymous(&mut inner.ledger, &shards, target, *client, req, now)?
        {
            return Ok(Choice::Decided(decided));
        }
        Ok(match target.pick(&shards) {
            Some(i) => Choice::Shard(shards.answer(i)),
            None if shards.opening => Choice::Decided(Attempt::Wait),
            None => Choice::NoRoom,
        })
    }

    /// Holds an anonymous caller to its own limit (an error past it) and anonymous callers
    /// together to their share of the session (past it: an answer without a reserved place,
    /// and never a new shard; the reflector's hard cap still guards the shard). `None`:
    /// within both, route as anyone else.
    fn limit_anonymous(
        &self,
        ledger: &mut Ledger,
        shards: &Shards<'_>,
        target: &Target<'_>,
        client: IpAddr,
        req: &RouteRequest,
        now: Millis,
    ) -> Result<Option<Attempt>, RouteError> {
        let key = target.key.as_str();
        let mine = ledger.anonymous_of(key, client, now);
        let cap = self.config.max_per_client;
        if over_client_cap(mine, cap) {
            return Err(RouteError::Exhausted {
                message: format!(
                    "session {:?}: this client already holds {mine} reservations not yet used (limit per client without an API key: {cap}); join with them, or retry when they are released",
                    req.session
                ),
                retry_after: self.config.claim_window.min(self.config.token_ttl),
            });
        }
        let free = free_places_for_anonymous(shards, target.spec());
        let held_by_anonymous = u64::from(ledger.anonymous_counted(key, now));
        if !share_reached(self.config.anonymous_share, held_by_anonymous, free) {
            return Ok(None);
        }
        let Some(i) = target.pick_unreserved(shards) else {
            if shards.opening {
                return Ok(Some(Attempt::Wait));
            }
            return Err(RouteError::Exhausted {
                message: format!(
                    "session {:?}: callers without an API key hold {held_by_anonymous} of its {free} free places (their share) and every shard is full; retry later or call with an API key",
                    req.session
                ),
                retry_after: Duration::from_secs(2),
            });
        };
        tracing::debug!(session = %key, %client, held_by_anonymous, free, "anonymous share reached: answered without a reserved place");
        let routed = self.unreserved(ledger, target.def, (key, client), shards.answer(i), now);
        Ok(Some(Attempt::Routed(Box::new(routed))))
    }

    /// Whether a router that just took over must wait before it opens a shard of `target`'s
    /// pool: the previous leader may have opened shards that no status records yet, and a
    /// new one must not take the name of one of them. Their reflectors tell on the report
    /// stream, so the router waits until every ready reflector of the pool has reported,
    /// for at most one report grace period after the takeover (a reflector silent that long
    /// is not waited for; its shards count as full).
    fn catching_up(
        &self,
        inner: &Inner,
        view: &Published,
        target: &Target<'_>,
        now: Millis,
    ) -> bool {
        let Some(at) = inner.taken_over else {
            return false;
        };
        now < at + self.grace()
            && view.fleet.input.reflectors.iter().any(|r| {
                r.pool == target.def.pool
                    && r.state == ReflectorState::Ready
                    && !inner.fleet.has_reported(&r.name)
            })
    }

    /// Opens a shard now and answers with it if its reflector already takes users; `None`:
    /// the reflector is starting, or the router is catching up after a takeover: wait.
    fn open_shard_now(
        &self,
        inner: &mut Inner,
        view: &Published,
        target: &Target<'_>,
        req: &RouteRequest,
        now: Millis,
    ) -> Result<Option<Answer>, RouteError> {
        if self.catching_up(inner, view, target, now) {
            return Ok(None);
        }
        let opened = open_shard(inner, view, target, &req.session, now, self.grace())?;
        self.metrics.shard_opened(&opened.region);
        let url = opened
            .reflector
            .as_deref()
            .and_then(|r| inner.fleet.routable_url(view, r, now, self.grace()));
        let url = url.map(|url| {
            view.fleet
                .gateways
                .get(&opened.region)
                .map_or(url, String::as_str)
        });
        Ok(url.map(|url| (opened.name.clone(), url.to_owned(), opened.region.clone())))
    }

    /// Reserves the chosen place for the caller until its claim window ends.
    fn reserve(
        &self,
        ledger: &mut Ledger,
        target: &Target<'_>,
        chosen: Answer,
        req: &RouteRequest,
        caller: &Caller,
        now: Millis,
    ) -> Routed {
        let key = target.key.as_str();
        let expires = now + self.config.claim_ms();
        let token_expires = now + self.config.token_ttl.as_millis() as Millis;
        let user = (!req.user_id.is_empty()).then_some((key, req.user_id.as_str()));
        let claim = Claim {
            user,
            anonymous: match caller {
                Caller::Anonymous(client) => Some((key, *client)),
                _ => None,
            },
            token_expires,
        };
        let reservation = ledger.reserve_for((target.app(), &chosen.0), claim, expires);
        self.metrics.reserved(&chosen.2);
        let mut routed = Routed::new(target.def, chosen, reservation, token_expires);
        routed.user = user.map(|(k, u)| (k.to_owned(), u.to_owned()));
        routed
    }

    /// An answer that reserves no place, noted against its anonymous caller's own limit.
    fn unreserved(
        &self,
        ledger: &mut Ledger,
        def: &SessionDef,
        (key, client): (&str, IpAddr),
        answer: Answer,
        now: Millis,
    ) -> Routed {
        let claim_until = now + self.config.claim_ms();
        let token_expires = now + self.config.token_ttl.as_millis() as Millis;
        let id = ledger.note_unreserved(key, client, claim_until);
        Routed::new(def, answer, id, token_expires)
    }
}

/// Sets every shard's `reserved` from the ledger and, where a reflector reported it, its
/// `users`: the load the planner compares with the threshold.
pub(super) fn fill_load(fleet: &FleetState, ledger: &Ledger, input: &mut PlanInput, now: Millis) {
    let apps = app_ids(&input.sessions);
    for sh in &mut input.shards {
        if let Some(app) = apps.get(sh.session.as_str()) {
            sh.reserved = ledger.pending(app, &sh.name, now);
            if let Some(users) = fleet.users(app, &sh.name) {
                sh.users = users;
            }
        }
    }
}

/// Opens a shard for the target now: the planner on the published input of its pool, with
/// the router's reservations and the session marked waiting, so that the shard is the one
/// the backend's next plan would open too.
fn open_shard(
    inner: &mut Inner,
    view: &Published,
    target: &Target<'_>,
    name: &str,
    now: Millis,
    grace: Millis,
) -> Result<ShardRecord, RouteError> {
    let (def, key) = (target.def, target.key.as_str());
    let mut input = pool_input(&view.fleet.input, &inner.opened, &def.pool);
    if let Some(demanded) = mark_waiting(&mut input, def, key, name, &target.order) {
        // Kept until a published view holds a shard of it: the next plan must keep it.
        inner.demanded.insert(key.to_owned(), demanded);
    }
    let adopted = adopt_reported(&mut input, &inner.fleet, def, key, name);
    fill_load(&inner.fleet, &inner.ledger, &mut input, now);
    // The plan must see what the Route saw: a ready reflector the router cannot send users
    // to (silent or draining on its stream) has no room for a new shard, and the session's
    // shards on it count as full; otherwise the plan would keep counting on room there. It
    // still counts as one of its region's reflectors, as it does for the backend's plan,
    // so the new shard goes where the backend would keep it.
    // So does a reflector that reported and went silent, whatever its pod says now (a lost
    // node makes its pods NotReady: they look like starting ones, but are not coming).
    let lost = |name: &str| inner.fleet.silent(name, now, grace);
    let blocked: FastSet<String> = input
        .reflectors
        .iter()
        .filter(|r| {
            lost(&r.name)
                || (r.state == ReflectorState::Ready
                    && inner
                        .fleet
                        .routable_url(view, &r.name, now, grace)
                        .is_none())
        })
        .map(|r| r.name.clone())
        .collect();
    for r in input
        .reflectors
        .iter_mut()
        .filter(|r| blocked.contains(&r.name))
    {
        r.capacity.sessions = 0;
        r.capacity.users = 0;
    }
    // A region that lost reflectors and has none the router can send users to is down (its
    // nodes are gone): nothing there takes the new shard, no new reflector is planned there
    // either, and the shard goes to the next region the Session allows.
    let mut down: Vec<(String, String)> = Vec::new();
    for pool in &input.pools {
        for region in &pool.regions {
            let here = || {
                input
                    .reflectors
                    .iter()
                    .filter(|r| r.pool == pool.id && r.region == region.name)
            };
            let alive =
                here().any(|r| r.state == ReflectorState::Ready && !blocked.contains(&r.name));
            if !alive && here().any(|r| lost(&r.name)) {
                down.push((pool.id.clone(), region.name.clone()));
            }
        }
    }
    for (pool, region) in &down {
        let count = input
            .reflectors
            .iter_mut()
            .filter(|r| &r.pool == pool && &r.region == region)
            .map(|r| {
                r.capacity.sessions = 0;
                r.capacity.users = 0;
            })
            .count() as u32;
        for spec in input
            .pools
            .iter_mut()
            .filter(|p| &p.id == pool)
            .flat_map(|p| p.regions.iter_mut())
            .filter(|r| &r.name == region)
        {
            spec.max_reflectors = count;
            spec.min_reflectors = spec.min_reflectors.min(count);
        }
    }
    // Full for the plan, as for the Route: shards adopted from reports (the Route cannot send
    // users to them before a plan publishes them), shards on blocked reflectors, and
    // inherited shards the Route counts as full.
    let t = threshold_load(def.spec.max_users_per_shard, def.spec.scale_up_threshold);
    let inherited = Inherited::of(inner, now);
    hold_full(&mut input, key, t, |sh| {
        adopted.contains(&sh.name)
            || sh.reflector.as_ref().is_some_and(|r| blocked.contains(r))
            || inherited.held_full(&inner.fleet, sh)
    });
    let shard = shard_opened_by(&plan(&input), key).map_err(|why| RouteError::Exhausted {
        message: format!("session {name:?}: {why}"),
        retry_after: Duration::from_secs(2),
    })?;
    tracing::info!(session = %key, shard = %shard.name, region = %shard.region, reflector = ?shard.reflector, "router opened a shard");
    inner.mine.insert((key.to_owned(), shard.name.clone()));
    inner.opened.push(shard.clone());
    Ok(shard)
}

/// The part of the published input that belongs to `pool`, with the shards this router
/// opened since: the planner is scoped to one pool per call.
fn pool_input(published: &PlanInput, opened: &[ShardRecord], pool: &str) -> PlanInput {
    PlanInput {
        pools: published
            .pools
            .iter()
            .filter(|p| p.id == pool)
            .cloned()
            .collect(),
        sessions: published
            .sessions
            .iter()
            .filter(|s| s.pool == pool)
            .cloned()
            .collect(),
        reflectors: published
            .reflectors
            .iter()
            .filter(|r| r.pool == pool)
            .cloned()
            .collect(),
        shards: published
            .shards
            .iter()
            .chain(opened.iter())
            .filter(|s| s.pool == pool)
            .cloned()
            .collect(),
        history: published.history.clone(),
        now: published.now,
        move_requests: Vec::new(),
    }
}

/// Marks the session waiting, with the Route's region order, so the planner opens a shard
/// for it where the client wants one. A pattern session no plan knows yet is added; it is
/// returned so the router can remember the demand.
fn mark_waiting(
    input: &mut PlanInput,
    def: &SessionDef,
    key: &str,
    name: &str,
    order: &[String],
) -> Option<SessionInput> {
    if let Some(s) = input.sessions.iter_mut().find(|s| s.key == key) {
        s.waiting = true;
        s.policy.regions = order.to_vec();
        return None;
    }
    let s = SessionInput {
        key: key.to_owned(),
        name: name.to_owned(),
        pool: def.pool.clone(),
        policy: ShardPolicy {
            regions: order.to_vec(),
            ..ShardPolicy::from(&def.spec)
        },
        deleted: false,
        waiting: true,
    };
    input.sessions.push(s.clone());
    Some(s)
}

/// Adds to `input` the shards of session `name` (key `key`) that reflectors report with users but no
/// plan holds (a previous leader opened them and no status records them yet), as open shards
/// of the reflector reporting them, so a new shard never takes one of their names. The
/// Route does not send users to them until a published plan has them. Returns their names.
fn adopt_reported(
    input: &mut PlanInput,
    fleet: &FleetState,
    def: &SessionDef,
    key: &str,
    name: &str,
) -> FastSet<String> {
    let mut adopted = FastSet::default();
    for (reflector, shards) in fleet.hosted() {
        let Some(region) = input
            .reflectors
            .iter()
            .find(|r| r.name == reflector)
            .map(|r| r.region.clone())
        else {
            continue;
        };
        for (app, shard, users) in shards {
            let Some((base, index)) = parse_shard_name(shard) else {
                continue;
            };
            // An empty one is not adopted (as the backends do): nobody would be split from it.
            if app != def.spec.app_id
                || users == 0
                || base != name
                || input
                    .shards
                    .iter()
                    .any(|s| s.session == key && s.name == shard)
            {
                continue;
            }
            input.shards.push(ShardRecord {
                session: key.to_owned(),
                name: shard.to_owned(),
                index,
                pool: def.pool.clone(),
                region: region.clone(),
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
fn shard_opened_by(plan: &Plan, key: &str) -> Result<ShardRecord, String> {
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

/// Checks a Route's fields before anything is looked up.
pub(super) fn validate(req: &RouteRequest) -> Result<(), RouteError> {
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if req.namespace.is_empty() {
        return Err(RouteError::invalid("namespace", "required"));
    }
    if !dns_label(&req.namespace) {
        return Err(RouteError::invalid(
            "namespace",
            "must be a Kubernetes namespace name",
        ));
    }
    if req.session.is_empty() {
        return Err(RouteError::invalid("session", "required"));
    }
    if req.session.len() > 200
        || req.session.contains('~')
        || req.session.contains('/')
        || req.session.chars().any(char::is_control)
    {
        return Err(RouteError::invalid(
            "session",
            "at most 200 characters, without '~' (reserved for shard numbers), '/' or control characters",
        ));
    }
    if req.preferred_region.len() > 63 {
        return Err(RouteError::invalid(
            "preferred_region",
            "at most 63 characters",
        ));
    }
    if req.user_id.len() > 256 {
        return Err(RouteError::invalid("user_id", "at most 256 characters"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::crd::{Capacity, PlacementStrategy};
    use crate::router::view::tests::{reflector, session, shard};
    use crate::router::view::{FleetView, ShardUsers};
    use refleet_core::planner::{ObservedReflector, RegionInput};

    const KEY: &str = "ns/app/a";

    fn regions(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    fn pool(id: &str, names: &[&str]) -> PoolInput {
        PoolInput {
            id: id.into(),
            placement: PlacementStrategy::Pack,
            regions: names
                .iter()
                .map(|n| RegionInput {
                    name: (*n).into(),
                    image: "img".into(),
                    capacity: Capacity {
                        sessions: 10,
                        users: 1000,
                    },
                    min_reflectors: 1,
                    max_reflectors: 1,
                    warm_buffer: 0,
                })
                .collect(),
            cooldown: 60,
            drain_grace: 30,
            moves: Default::default(),
        }
    }

    fn ready(name: &str) -> ObservedReflector {
        ObservedReflector {
            capacity: Capacity {
                sessions: 10,
                users: 1000,
            },
            ..reflector(name, ReflectorState::Ready)
        }
    }

    /// Session `a` (10 users per shard, threshold 0.8, at most 3 shards) and its shards.
    fn published(shards: Vec<ShardRecord>) -> Published {
        Published::new(FleetView {
            input: PlanInput {
                pools: vec![pool("ns/pool", &["eu", "us"])],
                reflectors: vec![ready("r1"), reflector("r2", ReflectorState::Starting)],
                shards,
                ..PlanInput::default()
            },
            sessions: vec![session(Some("a"), None)],
            urls: HashMap::from([("r1".into(), "ws://r1/".into())]),
            gateways: HashMap::new(),
        })
    }

    fn req(preferred: &str, user: &str) -> RouteRequest {
        RouteRequest {
            namespace: "ns".into(),
            session: "a".into(),
            preferred_region: preferred.into(),
            user_id: user.into(),
        }
    }

    #[test]
    fn regions_come_from_the_session_else_its_pool_preferred_first() {
        let mut spec = session(Some("a"), None).spec;
        let p = pool("ns/pool", &["eu", "us", "ap"]);
        assert_eq!(
            region_order_for(&spec, Some(&p), "us").unwrap(),
            regions(&["us", "eu", "ap"])
        );
        assert_eq!(region_order_for(&spec, None, "").unwrap(), regions(&[]));
        spec.regions = regions(&["ap", "eu"]);
        assert_eq!(
            region_order_for(&spec, Some(&p), "").unwrap(),
            regions(&["ap", "eu"])
        );
        let err = region_order_for(&spec, Some(&p), "us").unwrap_err();
        assert!(
            matches!(
                err,
                RouteError::InvalidArgument {
                    field: "preferred_region",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn shard_load_counts_reports_reservations_and_the_warm_up() {
        let mut pending = shard("a", 2, "r1");
        pending.reflector = None;
        pending.phase = ShardPhase::Pending;
        let mut closing = shard("a", 3, "r1");
        closing.phase = ShardPhase::Closing;
        let mut recorded = shard("a", 4, "r1");
        recorded.users = 2;
        let view = published(vec![
            shard("a", 0, "r1"),
            shard("a", 1, "r2"),
            pending,
            closing,
            recorded,
        ]);
        let def = &view.fleet.sessions[0];
        let target = Target::new(&view, def, &req("", "")).unwrap();
        let mut fleet = FleetState::default();
        let mut users = ShardUsers::default();
        users.entry("app".into()).or_default().insert("a".into(), 5);
        fleet.observe("r1", "eu", false, users, 0, 1000);
        let mut ledger = Ledger::new(1);
        ledger.reserve(("app", "a"), None, 100);

        let none = FastSet::default();
        let normal = Inherited::new(&none, false, false);
        let shards = Shards::of_session(&view, &[], &fleet, &ledger, &target, normal, 0, 1000);
        // `a~1` waits for its starting reflector, `a~2` for a placement; `a~3` is closing.
        assert!(shards.opening);
        let loads: Vec<(String, u64)> = shards
            .routable
            .iter()
            .zip(&shards.candidates)
            .map(|((sh, _), c)| (sh.name.clone(), c.load))
            .collect();
        assert_eq!(loads, [("a".into(), 6), ("a~4".into(), 2)]);
        // Free places below the threshold (8) count users only, not reservations.
        assert_eq!(shards.free, 3 + 6);

        // During the warm-up every shard but the router's own counts as at its threshold.
        let mine = FastSet::from_iter([(KEY.to_owned(), "a~4".to_owned())]);
        let during = Inherited::new(&mine, true, true);
        let warm = Shards::of_session(&view, &[], &fleet, &ledger, &target, during, 0, 1000);
        let loads: Vec<u64> = warm.candidates.iter().map(|c| c.load).collect();
        assert_eq!(loads, [8, 2]);
        // After it, only while their reflector has not reported: r1 has.
        let after = Inherited::new(&none, false, true);
        let taken = Shards::of_session(&view, &[], &fleet, &ledger, &target, after, 0, 1000);
        let loads: Vec<u64> = taken.candidates.iter().map(|c| c.load).collect();
        assert_eq!(loads, [6, 2]);
        let unheard = FleetState::default();
        let taken = Shards::of_session(&view, &[], &unheard, &ledger, &target, after, 0, 1000);
        let loads: Vec<u64> = taken.candidates.iter().map(|c| c.load).collect();
        assert_eq!(
            loads,
            [8, 8],
            "r1 has not reported: its shards count as full"
        );

        // Shards this router opened count as the session's too.
        let opened = [shard("a", 5, "r1")];
        let more = Shards::of_session(&view, &opened, &fleet, &ledger, &target, normal, 0, 1000);
        assert_eq!(more.routable.len(), 3);
    }

    #[test]
    fn a_user_gets_back_the_place_it_holds_on_a_routable_shard() {
        let view = published(vec![shard("a", 0, "r1"), shard("a", 1, "r2")]);
        let def = &view.fleet.sessions[0];
        let target = Target::new(&view, def, &req("", "u1")).unwrap();
        let fleet = FleetState::default();
        let mut ledger = Ledger::new(1);
        let id = ledger.reserve(("app", "a"), Some((KEY, "u1")), 100);
        ledger.reserve(("app", "a~1"), Some((KEY, "u2")), 100);
        let none = FastSet::default();
        let normal = Inherited::new(&none, false, false);
        let shards = Shards::of_session(&view, &[], &fleet, &ledger, &target, normal, 0, 1000);

        let held = held_place(&ledger, &shards, &target, "u1", 0).unwrap();
        assert_eq!((held.shard.as_str(), held.reservation), ("a", id));
        assert_eq!(held.user, Some((KEY.to_owned(), "u1".to_owned())));
        assert!(held_place(&ledger, &shards, &target, "", 0).is_none());
        assert!(
            held_place(&ledger, &shards, &target, "u2", 0).is_none(),
            "its shard's reflector is starting"
        );
        assert!(held_place(&ledger, &shards, &target, "u3", 0).is_none());
    }

    #[test]
    fn anonymous_limits() {
        assert!(!over_client_cap(10, 0), "0: no limit");
        assert!(!over_client_cap(3, 4));
        assert!(over_client_cap(4, 4));

        assert!(!share_reached(1.0, 100, 10), "a share of 1 is no limit");
        assert!(!share_reached(0.5, 4, 9), "4 of ceil(4.5) = 5");
        assert!(share_reached(0.5, 5, 9));
        assert!(share_reached(0.5, 0, 0), "no free place: nothing to share");
        assert!(share_reached(-1.0, 0, 10), "clamped to 0");

        let view = published(vec![shard("a", 0, "r1")]);
        let def = &view.fleet.sessions[0];
        let target = Target::new(&view, def, &req("", "")).unwrap();
        let ledger = Ledger::new(1);
        let shards = Shards::of_session(
            &view,
            &[],
            &FleetState::default(),
            &ledger,
            &target,
            Inherited::new(&FastSet::default(), false, false),
            0,
            1000,
        );
        // One shard of at most 3: the next shard's 8 places count as free too.
        assert_eq!(free_places_for_anonymous(&shards, target.spec()), 8 + 8);
        let mut spec = target.spec().clone();
        spec.max_shards = 1;
        assert_eq!(free_places_for_anonymous(&shards, &spec), 8);
    }

    #[test]
    fn a_new_shard_is_planned_on_the_pool_input_with_the_session_waiting() {
        let mut other = shard("b", 0, "r9");
        other.pool = "ns/other".into();
        let view = published(vec![other]);
        let def = &view.fleet.sessions[0];
        let opened = [shard("a", 1, "r1")];
        let mut input = pool_input(&view.fleet.input, &opened, "ns/pool");
        assert_eq!(input.pools.len(), 1);
        let names: Vec<&str> = input.shards.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["a~1"],
            "other pools' shards left out, the router's own in"
        );

        let order = regions(&["us", "eu"]);
        let demanded = mark_waiting(&mut input, def, KEY, "a", &order).unwrap();
        assert!(demanded.waiting);
        assert_eq!(demanded.policy.regions, order);
        assert_eq!(input.sessions, [demanded]);
        // Known already: marked, not added again.
        assert!(mark_waiting(&mut input, def, KEY, "a", &regions(&["eu"])).is_none());
        assert_eq!(input.sessions.len(), 1);
        assert_eq!(input.sessions[0].policy.regions, regions(&["eu"]));
    }

    #[test]
    fn the_plan_names_the_new_shard_or_why_there_is_none() {
        let view = published(vec![]);
        let def = &view.fleet.sessions[0];
        let mut input = pool_input(&view.fleet.input, &[], "ns/pool");
        mark_waiting(&mut input, def, KEY, "a", &regions(&["eu"]));
        let shard = shard_opened_by(&plan(&input), KEY).unwrap();
        assert_eq!((shard.name.as_str(), shard.region.as_str()), ("a", "eu"));
        assert_eq!(shard.reflector.as_deref(), Some("r1"));

        let mut no_pool = pool_input(&view.fleet.input, &[], "ns/missing");
        mark_waiting(&mut no_pool, def, KEY, "a", &regions(&["eu"]));
        no_pool.sessions[0].pool = "ns/missing".into();
        let why = shard_opened_by(&plan(&no_pool), KEY).unwrap_err();
        assert!(why.contains("no ReflectorPool"), "{why}");
        assert_eq!(
            shard_opened_by(&Plan::default(), KEY).unwrap_err(),
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
        hold_full(&mut input, KEY, 8, |sh| inherited.held_full(&fleet, sh));
        let loads: Vec<u64> = input.shards.iter().map(ShardRecord::load).collect();
        assert_eq!(
            loads,
            [8, 0, 0],
            "the router's own shard and other sessions untouched"
        );
    }
}
