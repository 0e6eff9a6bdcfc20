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
//!    ([`super::pick`]), or wait for a shard that is opening in the caller's first region;
//! 6. else open a shard at once with the planner, on that session alone ([`super::open`]);
//!    if a shard is opening in a later region, only one that takes users at once in a
//!    region the caller prefers, else wait for that one;
//! 7. reserve the place ([`Router::reserve`]).
//!
//! Signing the token and the transports are not here: [`Router::route_as`] turns an
//! [`Attempt`] into the answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use foldhash::{HashMap as FastMap, HashSet as FastSet};
use refleet_api::routing::RouteRequest;

use super::ledger::{Claim, Ledger, Millis};
use super::opened::Opened;
use super::pick::{Candidate, pick, pick_unreserved, region_order, threshold_load};
use super::view::{FleetState, Published, SessionDef, app_ids};
use super::{Caller, Inner, RouteError, Router, lock};
use crate::crd::{SessionSpec, ShardPhase};
use refleet_core::planner::{PlanInput, PoolInput, ReflectorState, ShardRecord, session_key};

/// The outcome of one attempt under the lock.
pub(super) enum Attempt {
    Routed(Box<Routed>),
    /// A shard is opening; wait for its reflector. `session`: the session's key, whose
    /// changes wake the wait ([`super::waits`]).
    Wait {
        session: String,
    },
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
pub(super) struct Target<'v> {
    pub(super) def: &'v SessionDef,
    /// The planner's session key.
    pub(super) key: String,
    /// The regions to try, preferred first.
    pub(super) order: Vec<String>,
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

    /// The position of `region` in the order to try (past the end for one not in it).
    fn rank(&self, region: &str) -> usize {
        self.order
            .iter()
            .position(|r| r == region)
            .unwrap_or(self.order.len())
    }

    fn spec(&self) -> &'v SessionSpec {
        &self.def.spec
    }

    fn app(&self) -> &'v str {
        &self.def.spec.app_id
    }

    /// Wait for this session's next shard.
    fn wait(&self) -> Attempt {
        Attempt::Wait {
            session: self.key.clone(),
        }
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
    /// A shard waits for its reflector (none placed yet, or one starting) or its hand-off:
    /// a Route may wait for it instead of opening another. The position of its region in
    /// the Route's order (the best of several; past the end for a region not in it).
    opening: Option<usize>,
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
        opened: &'a Opened,
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
            opening: None,
            free: 0,
            gateways: &view.fleet.gateways,
        };
        // Looked up once per Route, not once per shard: a session's shards mostly share
        // a few reflectors, and all of them its app.
        let reserved = ledger.of_app(target.app());
        let reported = fleet.app_users(target.app());
        let at_threshold = threshold_load(spec.max_users_per_shard, spec.scale_up_threshold);
        let margin = warm_margin(spec);
        let mut last: Option<(&str, Option<&str>)> = None;
        for sh in shards {
            // A pending shard waits for its reflector, a moving one for its hand-off (both
            // take seconds): a Route with no other room waits for them, it is not refused.
            if sh.phase == ShardPhase::Moving {
                out.opening_in(target, &sh.region);
                continue;
            }
            let Some(r) = sh.reflector.as_deref() else {
                out.opening_in(target, &sh.region);
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
                // A starting reflector is coming; one that reported and then went silent
                // or lost its stream is not.
                if view
                    .reflector(r)
                    .is_some_and(|o| o.state == ReflectorState::Starting)
                    && !fleet.gone(r, now, grace)
                {
                    out.opening_in(target, &sh.region);
                }
                continue;
            };
            let users = reported.of(&sh.name).unwrap_or(sh.users);
            out.free += at_threshold.saturating_sub(u64::from(users));
            let mut load = u64::from(users) + u64::from(reserved.pending(&sh.name, now));
            if inherited.held_full(fleet, sh, margin) {
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

    /// Notes a shard opening in `region`.
    fn opening_in(&mut self, target: &Target<'_>, region: &str) {
        let rank = target.rank(region);
        self.opening = Some(self.opening.map_or(rank, |r| r.min(rank)));
    }

    fn answer(&self, i: usize) -> Answer {
        let (sh, url) = self.routable[i];
        let url = self.gateways.get(&sh.region).map_or(url, String::as_str);
        (sh.name.clone(), url.to_owned(), sh.region.clone())
    }
}

/// Places each inherited shard gave new users during the warm-up, by `(session key, shard)`.
pub(super) type WarmTaken = FastMap<(String, String), u32>;

/// After a failover, which inherited shards (those this router did not open) count as full.
///
/// Those whose reflector has not reported to this router yet: their load is unknown. During
/// the warm-up (tokens the previous leader signed may still be used), the others too once
/// they have given new users their margin, the places between the threshold and the hard
/// cap. The previous leader reserved at most up to the threshold, so the tokens it may
/// still have out on a shard are at most the threshold less the users its reflector now
/// reports; the margin on top keeps the shard within its cap, and a small session keeps its
/// users together instead of starting a new shard for every newcomer after a failover.
#[derive(Clone, Copy)]
pub(super) struct Inherited<'a> {
    mine: &'a FastSet<(String, String)>,
    warm_taken: Option<&'a WarmTaken>,
    warm: bool,
    taken_over: bool,
}

impl<'a> Inherited<'a> {
    pub(super) fn of(inner: &'a Inner, now: Millis) -> Self {
        Self::new(
            &inner.mine,
            now < inner.warm_until,
            inner.taken_over.is_some(),
        )
        .with_warm_taken(&inner.warm_taken)
    }

    pub(super) fn new(mine: &'a FastSet<(String, String)>, warm: bool, taken_over: bool) -> Self {
        Self {
            mine,
            warm_taken: None,
            warm,
            taken_over,
        }
    }

    /// Counts the places given during the warm-up from `taken` (none without it).
    pub(super) fn with_warm_taken(mut self, taken: &'a WarmTaken) -> Self {
        self.warm_taken = Some(taken);
        self
    }

    /// Whether `sh` counts as full; `margin` is its session's hard cap less its threshold.
    // Runs for every shard of every Route: the shard's key is only built (and the sets
    // looked up) once the shard could be held, so a router past its warm-up whose reflectors
    // have reported pays nothing here.
    pub(super) fn held_full(&self, fleet: &FleetState, sh: &ShardRecord, margin: u32) -> bool {
        let heard = sh.reflector.as_deref().map(|r| fleet.has_reported(r));
        let may_hold = match heard {
            // Its load is unknown.
            Some(false) => self.warm || self.taken_over,
            // Reported: only the warm-up's margin is limited. Not placed: no reflector tells
            // its load.
            Some(true) | None => self.warm,
        };
        if !may_hold {
            return false;
        }
        let id = (sh.session.clone(), sh.name.clone());
        if self.mine.contains(&id) {
            return false;
        }
        heard != Some(true) || self.warm_places(&id) >= margin
    }

    fn warm_places(&self, id: &(String, String)) -> u32 {
        self.warm_taken
            .and_then(|t| t.get(id))
            .copied()
            .unwrap_or(0)
    }
}

/// Counts a place reserved on inherited shard `shard` of session `key` during the warm-up
/// against its margin; after the warm-up, forgets the counts.
fn note_warm_place(inner: &mut Inner, key: &str, shard: &str, now: Millis) {
    if now >= inner.warm_until {
        if !inner.warm_taken.is_empty() {
            inner.warm_taken = WarmTaken::default();
        }
        return;
    }
    let id = (key.to_owned(), shard.to_owned());
    if !inner.mine.contains(&id) {
        *inner.warm_taken.entry(id).or_default() += 1;
    }
}

/// The places between a session's threshold and its hard cap: what an inherited shard may
/// give new users during the warm-up ([`Inherited`]).
pub(super) fn warm_margin(spec: &SessionSpec) -> u32 {
    let t = threshold_load(spec.max_users_per_shard, spec.scale_up_threshold);
    u32::try_from(u64::from(spec.max_users_per_shard).saturating_sub(t)).unwrap_or(0)
}

/// The session's shards, published or opened by this router, that are not closing. Pending
/// shards (waiting for a new reflector) and moving ones are among them: a Route waits for
/// those.
fn shards_not_closing<'a>(
    view: &'a Published,
    opened: &'a Opened,
    key: &str,
) -> Vec<&'a ShardRecord> {
    view.session_shards(key)
        .chain(opened.of_session(key))
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
    /// Every routable shard is at its threshold: open one. `opening`: a shard is opening in
    /// the region at that position of the Route's order (not its first), so open another
    /// only if it takes users at once in a region the caller prefers; else wait for that one.
    NoRoom { opening: Option<usize> },
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
            Choice::NoRoom { opening } => {
                match self.open_shard_now(inner, &view, &target, req, now, opening)? {
                    Some(answer) => answer,
                    None => return Ok(target.wait()),
                }
            }
        };
        let routed = self.reserve(&mut inner.ledger, &target, chosen, req, caller, now);
        note_warm_place(inner, &target.key, &routed.shard, now);
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
            // Opening in the caller's first region: no new shard could do better.
            None if shards.opening == Some(0) => Choice::Decided(target.wait()),
            None => Choice::NoRoom {
                opening: shards.opening,
            },
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
            if shards.opening.is_some() {
                return Ok(Some(target.wait()));
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
    ///
    /// With a shard already `opening` in a later region of the caller's order, the new one
    /// is kept only if it takes users at once in a region the caller prefers: a crowd from
    /// one region does not wait seconds for a pod starting in another while a reflector
    /// with room is up in its own, and a new shard that would itself wait does not open
    /// beside the one already waited for.
    fn open_shard_now(
        &self,
        inner: &mut Inner,
        view: &Published,
        target: &Target<'_>,
        req: &RouteRequest,
        now: Millis,
        opening: Option<usize>,
    ) -> Result<Option<Answer>, RouteError> {
        if self.catching_up(inner, view, target, now) {
            return Ok(None);
        }
        let planned = super::open::plan_shard(
            inner,
            view,
            target,
            (&req.session, opening.is_some()),
            now,
            self.grace(),
        );
        let planned = match (planned, opening) {
            (Ok(shard), _) => shard,
            (Err(_), Some(_)) => return Ok(None),
            (Err(e), None) => return Err(e),
        };
        let url = planned
            .reflector
            .as_deref()
            .and_then(|r| inner.fleet.routable_url(view, r, now, self.grace()));
        if let Some(rank) = opening
            && (url.is_none() || target.rank(&planned.region) >= rank)
        {
            return Ok(None);
        }
        self.metrics.shard_opened(&planned.region);
        let answer = url.map(|url| {
            let url = view
                .fleet
                .gateways
                .get(&planned.region)
                .map_or(url, String::as_str);
            (planned.name.clone(), url.to_owned(), planned.region.clone())
        });
        super::open::record_opened(inner, planned);
        Ok(answer)
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
    use crate::router::view::tests::{reflector, regions, session, shard};
    use crate::router::view::{FleetView, ShardUsers};
    use refleet_core::planner::{ObservedReflector, RegionInput};

    const KEY: &str = "ns/app/a";

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
                    growth_buffer_seconds: 0,
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
        let none_opened = Opened::default();
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
        let shards = Shards::of_session(
            &view,
            &none_opened,
            &fleet,
            &ledger,
            &target,
            normal,
            0,
            1000,
        );
        // `a~1` waits for its starting reflector, `a~2` for a placement (both in eu, the
        // first region); `a~3` is closing.
        assert_eq!(shards.opening, Some(0));
        let loads: Vec<(String, u64)> = shards
            .routable
            .iter()
            .zip(&shards.candidates)
            .map(|((sh, _), c)| (sh.name.clone(), c.load))
            .collect();
        assert_eq!(loads, [("a".into(), 6), ("a~4".into(), 2)]);
        // Free places below the threshold (8) count users only, not reservations.
        assert_eq!(shards.free, 3 + 6);

        // During the warm-up an inherited shard whose reflector reported (r1) keeps its load
        // until it gave its margin (cap 10 less threshold 8) to new users, then counts as at
        // its threshold; the router's own shard is never held.
        let mine = FastSet::from_iter([(KEY.to_owned(), "a~4".to_owned())]);
        let during = Inherited::new(&mine, true, true);
        // The candidates' loads with `fleet`'s reports and the `inherited` rule.
        let loads = |fleet: &FleetState, inherited: Inherited<'_>| -> Vec<u64> {
            let shards = Shards::of_session(
                &view,
                &none_opened,
                fleet,
                &ledger,
                &target,
                inherited,
                0,
                1000,
            );
            shards.candidates.iter().map(|c| c.load).collect()
        };
        assert_eq!(
            loads(&fleet, during),
            [6, 2],
            "no place of the margin given yet"
        );
        let mut taken = WarmTaken::default();
        taken.insert((KEY.to_owned(), "a".to_owned()), 1);
        assert_eq!(
            loads(&fleet, during.with_warm_taken(&taken)),
            [6, 2],
            "one of two given"
        );
        taken.insert((KEY.to_owned(), "a".to_owned()), 2);
        taken.insert((KEY.to_owned(), "a~4".to_owned()), 9);
        assert_eq!(
            loads(&fleet, during.with_warm_taken(&taken)),
            [8, 2],
            "a gave its margin; a~4 is the router's own"
        );
        let unheard = FleetState::default();
        assert_eq!(
            loads(&unheard, during),
            [8, 2],
            "r1 has not reported: a counts as full"
        );
        // After it, only while their reflector has not reported: r1 has.
        let after = Inherited::new(&none, false, true);
        assert_eq!(loads(&fleet, after), [6, 2]);
        assert_eq!(
            loads(&unheard, after),
            [8, 8],
            "r1 has not reported: its shards count as full"
        );

        // Shards this router opened count as the session's too.
        let mut opened = Opened::default();
        opened.push(shard("a", 5, "r1"));
        let more = Shards::of_session(&view, &opened, &fleet, &ledger, &target, normal, 0, 1000);
        assert_eq!(more.routable.len(), 3);
    }

    #[test]
    fn the_warm_up_margin_is_the_places_between_the_threshold_and_the_cap() {
        let view = published(vec![shard("a", 0, "r1")]);
        let mut spec = view.fleet.sessions[0].spec.clone();
        assert_eq!(
            (spec.max_users_per_shard, spec.scale_up_threshold),
            (10, 0.8)
        );
        assert_eq!(warm_margin(&spec), 2);
        spec.max_users_per_shard = 25;
        assert_eq!(warm_margin(&spec), 5, "threshold 20 rounds up from 20.0");
        spec.scale_up_threshold = 0.83;
        assert_eq!(warm_margin(&spec), 4, "threshold 21 (20.75 rounded up)");
        spec.scale_up_threshold = 1.0;
        assert_eq!(
            warm_margin(&spec),
            0,
            "no margin: inherited shards stay full"
        );
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
        let none_opened = Opened::default();
        let shards = Shards::of_session(
            &view,
            &none_opened,
            &fleet,
            &ledger,
            &target,
            normal,
            0,
            1000,
        );

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
        let none_opened = Opened::default();
        let shards = Shards::of_session(
            &view,
            &none_opened,
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
}
