//! # The router's view of the fleet
//!
//! Owns what the router knows about what exists, and nothing about what it decides:
//!
//! - what backends publish after every plan ([`FleetView`]: the plan input, the Session
//!   objects, the reflectors' URLs), one view per publisher, indexed for a Route
//!   ([`Published`]: shards by session and by name, reflectors by name);
//! - what reflectors report on their streams: users per shard, summed over reflectors
//!   ([`Tally`]), and when each reflector last spoke, so that a silent one's load stops
//!   counting after the grace period ([`FleetState::expire_reports`]);
//! - from both, whether a reflector may get new users now ([`FleetState::routable_url`]).
//!
//! Reservations, the warm-up and the choice of a shard are the Route policy's
//! ([`super::route`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

// The Route path does several map lookups per shard of a session; foldhash is several times
// faster than SipHash on short keys and still seeded per process.
use foldhash::{HashMap as FastMap, HashSet as FastSet};

use super::ledger::Millis;
use crate::crd::SessionSpec;
use crate::crd::ShardPhase;
use refleet_core::planner::{
    Held, HeldRoom, ObservedReflector, PlanInput, ReflectorState, SessionInput, ShardRecord,
    room_left, split_session_key,
};
use refleet_core::shard::parse_shard_name;

/// A Session object as the router needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionDef {
    /// Its namespace.
    pub namespace: String,
    /// Its spec (exact `name` or `namePattern`).
    pub spec: SessionSpec,
    /// Id of its pool (`namespace/name`).
    pub pool: String,
    /// The pool's public files URL.
    pub files_url: String,
}

/// What a backend publishes after each plan: its part of the fleet as the router sees it.
/// (Not a Croquet snapshot: those are session state the reflectors store.)
#[derive(Clone, Debug, Default)]
pub struct FleetView {
    /// The plan input with the new plan's shards and history (one or more pools).
    pub input: PlanInput,
    /// The Session objects of those pools.
    pub sessions: Vec<SessionDef>,
    /// Public WebSocket base URL of each reflector that has one.
    pub urls: HashMap<String, String>,
    /// Public base URL of each region's gateway, for pools whose gateway is on: Route
    /// answers it instead of the reflector's URL (the gateway finds the host per connection).
    pub gateways: HashMap<String, String>,
}

/// Users per shard: appId → shard name → count.
pub(super) type ShardUsers = FastMap<String, FastMap<String, u32>>;

/// A published [`FleetView`] with the indexes a Route needs.
pub(super) struct Published {
    pub(super) fleet: FleetView,
    /// Session key → indexes of its shards in `fleet.input.shards`.
    shards_of: FastMap<String, Vec<usize>>,
    /// Shard name → indexes of the shards so named (one per app and session at most).
    named: FastMap<String, Vec<usize>>,
    /// Reflector name → indexes of the shards it hosts or that move to it: the shards whose
    /// waiting Routes a report of that reflector may answer.
    hosted_on: FastMap<String, Vec<usize>>,
    /// Reflector name → index in `fleet.input.reflectors`.
    reflector_at: FastMap<String, usize>,
    /// Session key → index in `fleet.input.sessions`.
    input_session_at: FastMap<String, usize>,
    /// Namespace → name of each exact-name Session → index in `fleet.sessions`.
    exact: FastMap<String, FastMap<String, usize>>,
    /// Indexes in `fleet.sessions` of the `namePattern` Sessions.
    patterns: Vec<usize>,
    /// Indexes in `fleet.input.shards` of the closing shards.
    closing: Vec<usize>,
    /// Pool id → region → indexes in `fleet.input.reflectors` of its reflectors: a Route
    /// that opens a shard visits only its session's pool and regions.
    placed: FastMap<String, FastMap<String, Vec<usize>>>,
    /// What a Route that opens a shard reads of each reflector, by index in
    /// `fleet.input.reflectors`, so that it reads no name or string of a full one.
    at: Vec<ReflectorAt>,
}

/// A published reflector as a Route that opens a shard reads it ([`Published::reflector_at`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct ReflectorAt {
    /// The room every shard of the plan that is not closing holds there (a closing shard's
    /// room depends on whether anyone is still on it, which the Route counts when it opens
    /// a shard: [`Published::closing_shards`]).
    pub(super) held: Held,
    /// Whether the backend gave it a URL.
    pub(super) has_url: bool,
    /// Whether it has no room left for a shard of its own, the plan's shards held.
    pub(super) full: bool,
    /// Its region's index in its pool's `regions` if the plan counts it as usable there
    /// (its region's image, not draining): one of the reflectors its region's
    /// `maxReflectors` bounds.
    pub(super) usable_in: Option<usize>,
}

impl Published {
    pub(super) fn new(fleet: FleetView) -> Self {
        let mut shards_of: FastMap<String, Vec<usize>> = FastMap::default();
        let mut named: FastMap<String, Vec<usize>> = FastMap::default();
        let mut hosted_on: FastMap<String, Vec<usize>> = FastMap::default();
        let mut held = HeldRoom::default();
        let mut closing = Vec::new();
        for (i, sh) in fleet.input.shards.iter().enumerate() {
            shards_of.entry(sh.session.clone()).or_default().push(i);
            named.entry(sh.name.clone()).or_default().push(i);
            for host in sh.hosts() {
                hosted_on.entry(host.to_owned()).or_default().push(i);
            }
            if sh.phase == ShardPhase::Closing {
                closing.push(i);
            } else {
                held.charge(sh);
            }
        }
        let input_session_at = fleet
            .input
            .sessions
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key.clone(), i))
            .collect();
        let mut exact: FastMap<String, FastMap<String, usize>> = FastMap::default();
        let mut patterns = Vec::new();
        for (i, d) in fleet.sessions.iter().enumerate() {
            match &d.spec.name {
                // The first of two Sessions with one name wins, as the scan used to pick it.
                Some(name) => {
                    exact
                        .entry(d.namespace.clone())
                        .or_default()
                        .entry(name.clone())
                        .or_insert(i);
                }
                None => patterns.push(i),
            }
        }
        let reflector_at = fleet
            .input
            .reflectors
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), i))
            .collect();
        let mut placed: FastMap<String, FastMap<String, Vec<usize>>> = FastMap::default();
        for (i, r) in fleet.input.reflectors.iter().enumerate() {
            placed
                .entry(r.pool.clone())
                .or_default()
                .entry(r.region.clone())
                .or_default()
                .push(i);
        }
        let regions: FastMap<(&str, &str), (usize, &str)> = fleet
            .input
            .pools
            .iter()
            .flat_map(|p| {
                p.regions
                    .iter()
                    .enumerate()
                    .map(|(k, g)| ((p.id.as_str(), g.name.as_str()), (k, g.image.as_str())))
            })
            .collect();
        let at = fleet
            .input
            .reflectors
            .iter()
            .map(|r| {
                let held = held.of(&r.name);
                let left = room_left(r.capacity, held);
                let usable_in = regions
                    .get(&(r.pool.as_str(), r.region.as_str()))
                    .filter(|(_, image)| *image == r.image && r.state != ReflectorState::Draining)
                    .map(|&(k, _)| k);
                ReflectorAt {
                    held,
                    has_url: fleet.urls.contains_key(&r.name),
                    full: left.sessions == 0 || left.users == 0,
                    usable_in,
                }
            })
            .collect();
        Self {
            fleet,
            shards_of,
            named,
            hosted_on,
            reflector_at,
            input_session_at,
            exact,
            patterns,
            closing,
            placed,
            at,
        }
    }

    /// The reflectors of pool `pool` in `regions` (every region, when empty), as indexes in
    /// `fleet.input.reflectors`, in input order within each region.
    pub(super) fn reflectors_in<'a>(
        &'a self,
        pool: &str,
        regions: &'a [String],
    ) -> impl Iterator<Item = usize> + Clone + 'a {
        let by_region = self.placed.get(pool);
        let all = regions
            .is_empty()
            .then(|| by_region.into_iter().flat_map(|m| m.values()));
        let named = (!regions.is_empty()).then(|| {
            regions
                .iter()
                .enumerate()
                // A region named twice is visited once.
                .filter(|&(k, g)| !regions[..k].contains(g))
                .filter_map(move |(_, g)| by_region?.get(g.as_str()))
        });
        all.into_iter()
            .flatten()
            .chain(named.into_iter().flatten())
            .flatten()
            .copied()
    }

    /// What a Route that opens a shard reads of the reflector at `i` in
    /// `fleet.input.reflectors`, computed once per published plan.
    pub(super) fn reflector_at(&self, i: usize) -> ReflectorAt {
        self.at[i]
    }

    /// The index in `fleet.input.reflectors` of the reflector named `name`.
    pub(super) fn reflector_index(&self, name: &str) -> Option<usize> {
        self.reflector_at.get(name).copied()
    }

    /// The planner's record of the session with key `key`, if the plan has it.
    pub(super) fn input_session(&self, key: &str) -> Option<&SessionInput> {
        self.input_session_at
            .get(key)
            .map(|&i| &self.fleet.input.sessions[i])
    }

    /// The closing shards of the plan.
    pub(super) fn closing_shards(&self) -> impl Iterator<Item = &ShardRecord> + '_ {
        self.closing.iter().map(|&i| &self.fleet.input.shards[i])
    }

    /// The index in `fleet.sessions` of the Session named exactly `name` in `namespace`.
    fn exact_session(&self, namespace: &str, name: &str) -> Option<usize> {
        self.exact.get(namespace)?.get(name).copied()
    }

    /// The index in `fleet.sessions` of the first `namePattern` Session of `namespace` that
    /// matches `name`.
    fn pattern_session(&self, namespace: &str, name: &str) -> Option<usize> {
        self.patterns.iter().copied().find(|&i| {
            let d = &self.fleet.sessions[i];
            d.namespace == namespace && d.spec.matches(name)
        })
    }

    pub(super) fn reflector(&self, name: &str) -> Option<&ObservedReflector> {
        self.reflector_at
            .get(name)
            .map(|&i| &self.fleet.input.reflectors[i])
    }

    pub(super) fn session_shards<'a>(
        &'a self,
        key: &str,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        self.shards_at(self.shards_of.get(key))
    }

    pub(super) fn shards_named<'a>(
        &'a self,
        name: &str,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        self.shards_at(self.named.get(name))
    }

    /// The shards reflector `reflector` hosts or that move to it.
    pub(super) fn shards_on<'a>(
        &'a self,
        reflector: &str,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        self.shards_at(self.hosted_on.get(reflector))
    }

    /// The shards at indexes `at` of `fleet.input.shards`.
    fn shards_at<'a>(
        &'a self,
        at: Option<&'a Vec<usize>>,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        at.into_iter()
            .flatten()
            .map(|&i| &self.fleet.input.shards[i])
    }
}

/// A reflector as its report stream shows it. Its URL is never taken from a report: clients
/// go to the URL the backend assigned ([`FleetView::urls`]).
#[derive(Clone, Debug)]
struct Live {
    region: String,
    draining: bool,
    connected: bool,
    /// When its last report arrived.
    seen: Millis,
    /// No report came within the grace period: `users` no longer count (and are empty), and
    /// the reflector gets no routes until it reports again.
    expired: bool,
    users: ShardUsers,
}

/// The users every live reflector reports, summed per shard, kept up to date report by
/// report so a Route reads a shard's count with one lookup instead of visiting every
/// reflector.
#[derive(Default)]
struct Tally {
    /// appId → shard → (users, how many reflectors report the shard).
    shards: FastMap<String, FastMap<String, (u32, u32)>>,
    /// appId → session name → the shards of it that some reflector reports: a Route that
    /// opens a shard looks for a former leader's shards of its session here, without
    /// visiting the app's other shards. Changed only when a shard appears or goes.
    by_session: FastMap<String, FastMap<String, FastSet<String>>>,
}

impl Tally {
    fn add(&mut self, users: &ShardUsers) {
        for (app, shards) in users {
            let m = self.shards.entry(app.clone()).or_default();
            for (shard, n) in shards {
                let e = m.entry(shard.clone()).or_default();
                e.0 = e.0.saturating_add(*n);
                e.1 += 1;
                if e.1 == 1
                    && let Some((base, _)) = parse_shard_name(shard)
                {
                    self.by_session
                        .entry(app.clone())
                        .or_default()
                        .entry(base.to_owned())
                        .or_default()
                        .insert(shard.clone());
                }
            }
        }
    }

    fn remove(&mut self, users: &ShardUsers) {
        for (app, shards) in users {
            let Some(m) = self.shards.get_mut(app) else {
                continue;
            };
            for (shard, n) in shards {
                if let Some(e) = m.get_mut(shard) {
                    e.0 = e.0.saturating_sub(*n);
                    e.1 = e.1.saturating_sub(1);
                    if e.1 == 0 {
                        m.remove(shard);
                        unindex(&mut self.by_session, app, shard);
                    }
                }
            }
            if m.is_empty() {
                self.shards.remove(app);
            }
        }
    }

    /// The shards of session `name` of app `app` that some reflector reports, with their
    /// users summed over reflectors.
    fn of_session<'a>(&'a self, app: &str, name: &str) -> impl Iterator<Item = (&'a str, u32)> {
        let counts = self.shards.get(app);
        self.by_session
            .get(app)
            .and_then(|m| m.get(name))
            .into_iter()
            .flatten()
            .filter_map(move |shard| Some((shard.as_str(), counts?.get(shard)?.0)))
    }
}

/// Takes `shard` of `app` out of the by-session index, and what that leaves empty.
fn unindex(index: &mut FastMap<String, FastMap<String, FastSet<String>>>, app: &str, shard: &str) {
    let Some((base, _)) = parse_shard_name(shard) else {
        return;
    };
    let Some(sessions) = index.get_mut(app) else {
        return;
    };
    if let Some(set) = sessions.get_mut(base) {
        set.remove(shard);
        if set.is_empty() {
            sessions.remove(base);
        }
    }
    if sessions.is_empty() {
        index.remove(app);
    }
}

/// One app's reported users per shard, looked up once per Route: a session's shards all
/// belong to one app.
#[derive(Clone, Copy)]
pub(super) struct AppUsers<'a>(Option<&'a FastMap<String, (u32, u32)>>);

impl AppUsers<'_> {
    /// Users of a shard, if any live reflector reports it.
    pub(super) fn of(&self, shard: &str) -> Option<u32> {
        self.0?.get(shard).map(|e| e.0)
    }
}

/// What a reflector's report stream says ([`FleetState::stream_of`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct StreamOf {
    /// No report within the grace ([`FleetState::silent`]).
    pub(super) silent: bool,
    /// Silent or draining, whatever the plan says: [`FleetState::routable_url`] answers none.
    pub(super) no_routes: bool,
    /// Its stream has ended (it may reconnect within the grace).
    pub(super) ended: bool,
}

impl StreamOf {
    /// Silent, or its stream ended ([`FleetState::gone`]).
    pub(super) fn gone(self) -> bool {
        self.silent || self.ended
    }
}

/// What one report changed, as far as a waiting Route can tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ReportChange {
    /// The reflector was unknown (first report since the reports were forgotten) or had
    /// expired: it routes again, and a new leader's catch-up may be over.
    pub revived: bool,
    /// The reflector started or stopped draining, or reports fewer users on a shard, a
    /// shard fewer, or a shard new (a shard a new leader counted full until reported).
    pub frees_room: bool,
}

impl ReportChange {
    /// Whether a Route waiting for room or a reflector may now get an answer.
    pub fn wakes_routes(self) -> bool {
        self.revived || self.frees_room
    }
}

/// Whether `now` may leave room that `before` did not: a shard with fewer users or gone, or
/// a shard first reported. More users on the same shards never does.
fn may_free_room(before: &ShardUsers, now: &ShardUsers) -> bool {
    let fewer = before.iter().any(|(app, shards)| {
        let now = now.get(app);
        shards
            .iter()
            .any(|(shard, n)| now.and_then(|s| s.get(shard)).is_none_or(|m| m < n))
    });
    fewer
        || now.iter().any(|(app, shards)| {
            let before = before.get(app);
            shards
                .keys()
                .any(|shard| before.is_none_or(|s| !s.contains_key(shard)))
        })
}

/// Everything published and reported: the router's whole view of the fleet.
#[derive(Default)]
pub(super) struct FleetState {
    /// Published views by publisher key (`local`, or a pool id in a cluster).
    published: BTreeMap<String, Arc<Published>>,
    live: FastMap<String, Live>,
    /// The sum of `live`'s users.
    tally: Tally,
    /// Before this time no `live` entry can expire (the earliest `seen + grace`).
    next_expiry: Millis,
}

impl FleetState {
    /// Takes a publisher's view; a later view with the same key replaces it.
    pub(super) fn publish(&mut self, key: &str, fleet: FleetView) {
        self.published
            .insert(key.to_owned(), Arc::new(Published::new(fleet)));
    }

    /// The published views, shared: a caller may keep them after the lock is released.
    pub(super) fn published_shared(&self) -> impl Iterator<Item = Arc<Published>> + '_ {
        self.published.values().cloned()
    }

    pub(super) fn published(&self) -> impl Iterator<Item = &Published> + '_ {
        self.published.values().map(|p| &**p)
    }

    /// The view holding the Session that covers `name` and its index there: an exact `name`
    /// wins over a `namePattern`. The view is shared so a Route can keep it while the fleet
    /// changes under it.
    pub(super) fn find_session(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<(Arc<Published>, usize)> {
        // An exact name in any view wins over a pattern in an earlier one.
        let found = |f: fn(&Published, &str, &str) -> Option<usize>| {
            self.published
                .values()
                .find_map(|v| f(v, namespace, name).map(|i| (v.clone(), i)))
        };
        found(Published::exact_session).or_else(|| found(Published::pattern_session))
    }

    /// Published shards named `name` (of any app and session).
    pub(super) fn shards_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        self.published
            .values()
            .flat_map(move |v| v.shards_named(name))
    }

    /// Published shards that reflector `reflector` hosts or that move to it.
    pub(super) fn shards_on<'a>(
        &'a self,
        reflector: &'a str,
    ) -> impl Iterator<Item = &'a ShardRecord> + 'a {
        self.published
            .values()
            .flat_map(move |v| v.shards_on(reflector))
    }

    /// Rewrites the published record of shard `shard` of session `session` with `f` (a
    /// move that ended shows in the view at once); false when no view has it.
    pub(super) fn rewrite_shard(
        &mut self,
        session: &str,
        shard: &str,
        f: impl FnOnce(&mut ShardRecord),
    ) -> bool {
        for view in self.published.values_mut() {
            let Some(i) = view
                .named
                .get(shard)
                .into_iter()
                .flatten()
                .copied()
                .find(|&i| view.fleet.input.shards[i].session == session)
            else {
                continue;
            };
            // Views are shared with Routes in progress: rewrite a copy (moves are rare).
            let mut fleet = view.fleet.clone();
            f(&mut fleet.input.shards[i]);
            *view = Arc::new(Published::new(fleet));
            return true;
        }
        false
    }

    /// Whether reflector `name` may take a shard moved to it now: ready in a published plan,
    /// and reporting (its stream open, not silent, not draining).
    pub(super) fn can_take_move(&self, name: &str) -> bool {
        let planned = self.published.values().any(|v| {
            v.reflector(name)
                .is_some_and(|r| r.state == ReflectorState::Ready)
        });
        planned
            && self
                .live
                .get(name)
                .is_some_and(|l| l.connected && !l.expired && !l.draining)
    }

    /// Whether a published pool has region `region`.
    pub(super) fn knows_region(&self, region: &str) -> bool {
        self.published.values().any(|v| {
            v.fleet
                .input
                .pools
                .iter()
                .any(|p| p.regions.iter().any(|r| r.name == region))
        })
    }

    /// Takes one report of `reflector`: its users replace what it reported before. Says
    /// whether the reflector was unknown or expired before (its shards' placement changed)
    /// and whether the report may have freed room.
    pub(super) fn observe(
        &mut self,
        reflector: &str,
        region: &str,
        draining: bool,
        users: ShardUsers,
        now: Millis,
        grace: Millis,
    ) -> ReportChange {
        self.tally.add(&users);
        let live = Live {
            region: region.to_owned(),
            draining,
            connected: true,
            seen: now,
            expired: false,
            users,
        };
        // One lookup, and the name copied only for a reflector not seen before.
        let change = match self.live.get_mut(reflector) {
            Some(l) => {
                let previous = std::mem::replace(l, live);
                self.tally.remove(&previous.users);
                ReportChange {
                    revived: previous.expired || now.saturating_sub(previous.seen) > grace,
                    frees_room: !previous.expired
                        && (previous.draining != draining
                            || may_free_room(&previous.users, &l.users)),
                }
            }
            None => {
                self.live.insert(reflector.to_owned(), live);
                ReportChange {
                    revived: true,
                    frees_room: false,
                }
            }
        };
        self.next_expiry = self.next_expiry.min(now + grace);
        change
    }

    /// A reflector's stream ended; its load still counts until the grace period is over
    /// (it may reconnect to this or another replica).
    pub(super) fn report_lost(&mut self, reflector: &str) {
        if let Some(l) = self.live.get_mut(reflector) {
            l.connected = false;
        }
    }

    /// Whether `reflector` reported and then went silent past the grace or saw its stream
    /// end. For a reflector whose pod is not Ready, that means it is not coming back soon:
    /// a lost node makes its pods NotReady and cuts their streams, while a reflector that
    /// restarts opens its stream again before its pod is Ready.
    pub(super) fn gone(&self, reflector: &str, now: Millis, grace: Millis) -> bool {
        self.stream_of(reflector, now, grace).gone()
    }

    /// Forgets every report (a new leader hears them again within one report interval).
    pub(super) fn forget_reports(&mut self) {
        self.live.clear();
        self.tally = Tally::default();
        self.next_expiry = 0;
    }

    /// Drops the load of every reflector with no report within `grace` (a lost or silent
    /// stream), so a crashed reflector's users stop holding its shards full. Cheap when
    /// nothing can have expired yet: one comparison. True when a reflector expired now.
    pub(super) fn expire_reports(&mut self, now: Millis, grace: Millis) -> bool {
        if now < self.next_expiry {
            return false;
        }
        let mut expired_now = false;
        let FleetState {
            live,
            tally,
            published,
            ..
        } = self;
        let mut next = Millis::MAX;
        live.retain(|name, l| {
            if l.expired {
                // Kept so that it gets no routes; forgotten once no plan knows the name.
                return published.values().any(|v| v.reflector(name).is_some());
            }
            if now.saturating_sub(l.seen) > grace {
                tally.remove(&l.users);
                l.users.clear();
                l.expired = true;
                expired_now = true;
                tracing::warn!(reflector = %name, connected = l.connected, "no report within the grace period: its load no longer counts and it gets no routes");
                return true;
            }
            next = next.min(l.seen + grace + 1);
            true
        });
        self.next_expiry = next;
        expired_now
    }

    /// Whether `reflector` went silent on its report stream: no report within `grace`
    /// (expired, or past it before the next expiry pass). Never reported: not silent.
    pub(super) fn silent(&self, reflector: &str, now: Millis, grace: Millis) -> bool {
        self.stream_of(reflector, now, grace).silent
    }

    /// What `reflector`'s stream says, with one lookup. Never reported: nothing.
    pub(super) fn stream_of(&self, reflector: &str, now: Millis, grace: Millis) -> StreamOf {
        self.live.get(reflector).map_or(StreamOf::default(), |l| {
            let silent = l.expired || now.saturating_sub(l.seen) > grace;
            StreamOf {
                silent,
                no_routes: silent || l.draining,
                ended: !l.connected,
            }
        })
    }

    /// Users of a shard, if any live reflector reports it.
    pub(super) fn users(&self, app: &str, shard: &str) -> Option<u32> {
        self.app_users(app).of(shard)
    }

    pub(super) fn app_users(&self, app: &str) -> AppUsers<'_> {
        AppUsers(self.tally.shards.get(app))
    }

    /// The URL of a reflector of `view` that may get new users now: ready in the plan, and
    /// neither draining nor silent on its stream. A reflector that has not reported yet
    /// counts as routable: a new reflector's first report may come after its first users.
    pub(super) fn routable_url<'v>(
        &self,
        view: &'v Published,
        name: &str,
        now: Millis,
        grace: Millis,
    ) -> Option<&'v str> {
        let observed = view.reflector(name)?;
        if observed.state != ReflectorState::Ready {
            return None;
        }
        if self.stream_of(name, now, grace).no_routes {
            return None;
        }
        // The URL the backend assigned (pool template, launcher), never a reported one.
        view.fleet.urls.get(name).map(String::as_str)
    }

    /// Whether `reflector` has reported since the reports were last forgotten (its load may
    /// have expired since).
    pub(super) fn has_reported(&self, reflector: &str) -> bool {
        self.live.contains_key(reflector)
    }

    /// Each reflector whose reports count (not expired): its name, users and whether it
    /// reports draining.
    pub(super) fn reported(&self) -> impl Iterator<Item = (&str, u32, bool)> + '_ {
        self.live
            .iter()
            .filter(|(_, l)| !l.expired)
            .map(|(name, l)| {
                let users = l
                    .users
                    .values()
                    .flat_map(|shards| shards.values())
                    .fold(0u32, |a, n| a.saturating_add(*n));
                (name.as_str(), users, l.draining)
            })
    }

    /// What each reflector whose reports count (not expired) hosts: `(appId, shard, users)`.
    pub(super) fn hosted(&self) -> impl Iterator<Item = (&str, Vec<(&str, &str, u32)>)> + '_ {
        self.live
            .iter()
            .filter(|(_, l)| !l.expired)
            .map(|(name, l)| {
                let shards = l
                    .users
                    .iter()
                    .flat_map(|(app, shards)| {
                        shards
                            .iter()
                            .map(move |(shard, n)| (app.as_str(), shard.as_str(), *n))
                    })
                    .collect();
                (name.as_str(), shards)
            })
    }

    /// The shards of session `name` of app `app` that reflectors whose reports count (not
    /// expired) host: `(shard, users summed over them)`. Costs the session's shards, not
    /// the app's.
    pub(super) fn reported_of_session<'a>(
        &'a self,
        app: &str,
        name: &str,
    ) -> impl Iterator<Item = (&'a str, u32)> {
        self.tally.of_session(app, name)
    }

    /// The reflectors whose reports count (not expired) that report users on shard `shard`
    /// of app `app`, with their users. Visits every reflector: for the rare shard no plan
    /// holds.
    pub(super) fn hosts_of<'a>(
        &'a self,
        app: &'a str,
        shard: &'a str,
    ) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        self.live
            .iter()
            .filter(|(_, l)| !l.expired)
            .filter_map(move |(name, l)| Some((name.as_str(), *l.users.get(app)?.get(shard)?)))
            .filter(|&(_, users)| users > 0)
    }

    /// Reflectors whose report stream is open and not silent, per region (as of the last
    /// [`FleetState::expire_reports`]).
    pub(super) fn live_streams(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for l in self.live.values().filter(|l| l.connected && !l.expired) {
            *out.entry(l.region.clone()).or_insert(0) += 1;
        }
        out
    }
}

/// Session key → appId of each session.
pub(super) fn app_ids(sessions: &[SessionInput]) -> HashMap<&str, &str> {
    sessions
        .iter()
        .filter_map(|s| Some((s.key.as_str(), split_session_key(&s.key)?.1)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use super::*;
    use crate::crd::{Capacity, PlacementStrategy, ShardPhase};
    use refleet_core::planner::{PoolInput, RegionInput};

    pub(in crate::router) fn session(name: Option<&str>, pattern: Option<&str>) -> SessionDef {
        let mut spec: SessionSpec = serde_json::from_value(serde_json::json!({
            "poolRef": {"name": "pool"}, "appId": "app",
            "maxUsersPerShard": 10, "scaleUpThreshold": 0.8, "maxShards": 3, "minShards": 0,
        }))
        .unwrap();
        spec.name = name.map(str::to_owned);
        spec.name_pattern = pattern.map(str::to_owned);
        SessionDef {
            namespace: "ns".into(),
            spec,
            pool: "ns/pool".into(),
            files_url: String::new(),
        }
    }

    pub(in crate::router) fn regions(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    pub(in crate::router) fn shard(session: &str, index: u32, reflector: &str) -> ShardRecord {
        ShardRecord {
            session: format!("ns/app/{session}"),
            name: if index == 0 {
                session.to_owned()
            } else {
                format!("{session}~{index}")
            },
            index,
            pool: "ns/pool".into(),
            region: "eu".into(),
            reflector: Some(reflector.to_owned()),
            committed_users: 0,
            users: 0,
            reserved: 0,
            phase: ShardPhase::Open,
            empty_since: None,
            moving_to: None,
            moved_at: None,
        }
    }

    pub(in crate::router) fn reflector(name: &str, state: ReflectorState) -> ObservedReflector {
        ObservedReflector {
            name: name.into(),
            pool: "ns/pool".into(),
            region: "eu".into(),
            image: "img".into(),
            capacity: Capacity::default(),
            state,
            unreported: false,
        }
    }

    fn view(sessions: Vec<SessionDef>, shards: Vec<ShardRecord>) -> FleetView {
        FleetView {
            input: PlanInput {
                shards,
                reflectors: vec![
                    reflector("r1", ReflectorState::Ready),
                    reflector("r2", ReflectorState::Starting),
                ],
                ..PlanInput::default()
            },
            sessions,
            urls: HashMap::from([
                ("r1".into(), "ws://r1/".into()),
                ("r2".into(), "ws://r2/".into()),
            ]),
            gateways: HashMap::new(),
        }
    }

    fn users(app: &str, shard: &str, n: u32) -> ShardUsers {
        let mut u = ShardUsers::default();
        u.entry(app.into()).or_default().insert(shard.into(), n);
        u
    }

    #[test]
    fn published_indexes_shards_by_session_and_name() {
        let p = Published::new(view(
            vec![],
            vec![
                shard("a", 0, "r1"),
                shard("b", 0, "r1"),
                shard("a", 1, "r2"),
            ],
        ));
        let names = |it: &mut dyn Iterator<Item = &ShardRecord>| {
            it.map(|s| s.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&mut p.session_shards("ns/app/a")), ["a", "a~1"]);
        assert_eq!(names(&mut p.shards_named("b")), ["b"]);
        assert!(p.session_shards("ns/app/c").next().is_none());
        assert_eq!(p.reflector("r2").unwrap().state, ReflectorState::Starting);
        assert!(p.reflector("r3").is_none());
    }

    #[test]
    fn published_finds_a_pool_s_reflectors_by_region_with_their_room() {
        let mut a = shard("a", 0, "r1");
        a.committed_users = 7;
        let mut closing = shard("b", 0, "r1");
        closing.committed_users = 5;
        closing.phase = ShardPhase::Closing;
        let mut fleet = view(vec![], vec![a, closing]);
        fleet.input.reflectors[1].region = "us".into();
        let region = |name: &str, image: &str| RegionInput {
            name: name.into(),
            image: image.into(),
            capacity: Capacity::default(),
            min_reflectors: 0,
            max_reflectors: 10,
            warm_buffer: 0,
            growth_buffer_seconds: 0,
        };
        fleet.input.pools = vec![PoolInput {
            id: "ns/pool".into(),
            placement: PlacementStrategy::Pack,
            regions: vec![region("eu", "img"), region("us", "img:2")],
            cooldown: 0,
            drain_grace: 0,
            moves: Default::default(),
        }];
        // The open shard takes r1's one slot; r2 has room but an old image.
        fleet.input.reflectors[0].capacity = Capacity {
            sessions: 1,
            users: 14,
        };
        fleet.input.reflectors[1].capacity = Capacity {
            sessions: 1,
            users: 100,
        };
        let mut stranger = reflector("x", ReflectorState::Ready);
        stranger.pool = "ns/other".into();
        fleet.input.reflectors.push(stranger);
        let p = Published::new(fleet);
        let names = |pool: &str, regions: &[String]| {
            let mut v: Vec<&str> = p
                .reflectors_in(pool, regions)
                .map(|i| p.fleet.input.reflectors[i].name.as_str())
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(names("ns/pool", &[]), ["r1", "r2"]);
        assert_eq!(names("ns/pool", &regions(&["us"])), ["r2"]);
        assert_eq!(
            names("ns/pool", &regions(&["us", "eu", "us"])),
            ["r1", "r2"]
        );
        assert!(names("ns/pool", &regions(&["ap"])).is_empty());
        assert_eq!(names("ns/other", &[]), ["x"]);
        let r1 = p.reflector_at(0);
        assert_eq!(
            r1.held,
            Held {
                users: 7,
                sessions: 1
            },
            "the open shard holds its room, the closing one is counted per Route"
        );
        assert!(r1.has_url);
        assert_eq!((r1.full, r1.usable_in), (true, Some(0)));
        let r2 = p.reflector_at(1);
        assert_eq!(
            (r2.full, r2.usable_in),
            (false, None),
            "not its region's image"
        );
        let x = p.reflector_at(2);
        assert_eq!(
            (x.has_url, x.full, x.usable_in),
            (false, false, None),
            "no URL, and its pool is not in the view"
        );
        assert_eq!(p.reflector_index("r2"), Some(1));
        assert_eq!(p.reflector_index("nobody"), None);
    }

    #[test]
    fn an_exact_session_wins_over_a_pattern_in_any_view() {
        let mut f = FleetState::default();
        f.publish("p1", view(vec![session(None, Some("room-*"))], vec![]));
        f.publish("p2", view(vec![session(Some("room-1"), None)], vec![]));
        let (v, at) = f.find_session("ns", "room-1").unwrap();
        assert_eq!(v.fleet.sessions[at].spec.name.as_deref(), Some("room-1"));
        let (v, at) = f.find_session("ns", "room-2").unwrap();
        assert_eq!(
            v.fleet.sessions[at].spec.name_pattern.as_deref(),
            Some("room-*")
        );
        assert!(f.find_session("other", "room-1").is_none());
        assert!(f.find_session("ns", "hall").is_none());
    }

    #[test]
    fn reports_sum_per_shard_and_a_new_report_replaces_the_old() {
        let mut f = FleetState::default();
        f.observe("r1", "eu", false, users("app", "a", 3), 0, 1000);
        f.observe("r2", "eu", false, users("app", "a", 4), 0, 1000);
        assert_eq!(f.users("app", "a"), Some(7));
        f.observe("r1", "eu", false, users("app", "a", 1), 10, 1000);
        assert_eq!(f.users("app", "a"), Some(5));
        f.observe("r2", "eu", false, ShardUsers::default(), 10, 1000);
        f.observe("r1", "eu", false, ShardUsers::default(), 10, 1000);
        assert_eq!(
            f.users("app", "a"),
            None,
            "no reflector reports it any more"
        );
        assert_eq!(f.live_streams(), BTreeMap::from([("eu".into(), 2)]));
    }

    #[test]
    fn a_report_wakes_waiting_routes_only_when_it_may_free_room_or_a_reflector() {
        let mut f = FleetState::default();
        // (revived, frees room) of r1's report at `at` ms (grace 1 s), draining or not, with
        // `a` users on app's shard a and `b` on other's shard b (none: not reported).
        let mut report = |at, draining, a: u32, b: Option<u32>| {
            let mut u = users("app", "a", a);
            u.extend(b.map(|b| users("other", "b", b)).unwrap_or_default());
            let change = f.observe("r1", "eu", draining, u, at, 1000);
            assert_eq!(change.wakes_routes(), change.revived || change.frees_room);
            (change.revived, change.frees_room)
        };
        assert_eq!(
            report(0, false, 3, Some(1)),
            (true, false),
            "a new reflector"
        );
        // More users, or the same: no waiting Route can be answered by it.
        assert_eq!(report(10, false, 4, Some(1)), (false, false));
        assert_eq!(report(20, false, 4, Some(1)), (false, false));
        // Fewer users on a shard, a shard gone, a shard first reported, draining changed.
        assert_eq!(report(30, false, 4, Some(0)), (false, true));
        assert_eq!(report(40, false, 4, None), (false, true));
        assert_eq!(report(50, false, 4, Some(0)), (false, true));
        assert_eq!(report(60, true, 4, Some(0)), (false, true));
        assert_eq!(report(70, true, 5, Some(0)), (false, false));
        // Silent past the grace, then back.
        assert_eq!(report(2000, true, 5, Some(0)), (true, false));
        assert_eq!(report(2010, true, 5, Some(0)), (false, false));
    }

    #[test]
    fn a_session_s_reported_shards_are_found_without_visiting_the_app_s_others() {
        let mut f = FleetState::default();
        let mut r1 = users("app", "a", 3);
        r1.get_mut("app")
            .unwrap()
            .extend([("a~2".into(), 0), ("b".into(), 5), ("ab~1".into(), 1)]);
        f.observe("r1", "eu", false, r1, 0, 1000);
        f.observe("r2", "eu", false, users("app", "a~2", 4), 0, 1000);
        f.observe("r3", "eu", false, users("other", "a", 9), 500, 1000);
        let of = |f: &FleetState, app: &str, name: &str| {
            let mut v: Vec<(String, u32)> = f
                .reported_of_session(app, name)
                .map(|(s, n)| (s.to_owned(), n))
                .collect();
            v.sort();
            v
        };
        let pair = |s: &str, n: u32| (s.to_owned(), n);
        assert_eq!(of(&f, "app", "a"), [pair("a", 3), pair("a~2", 4)]);
        assert_eq!(of(&f, "app", "ab"), [pair("ab~1", 1)]);
        assert_eq!(of(&f, "other", "a"), [pair("a", 9)], "apps apart");
        let hosts: Vec<_> = f.hosts_of("app", "a~2").collect();
        assert_eq!(hosts, [("r2", 4)], "r1 reports no user on it");
        // A shard no reflector reports any more leaves the index; one still reported stays.
        f.observe("r1", "eu", false, users("app", "b", 5), 10, 1000);
        assert_eq!(of(&f, "app", "a"), [pair("a~2", 4)]);
        assert!(of(&f, "app", "ab").is_empty());
        // So does every shard of a reflector whose load expired.
        f.expire_reports(1011, 1000);
        assert!(of(&f, "app", "a").is_empty());
        assert_eq!(
            f.tally.by_session.len(),
            1,
            "only the other app's reflector is left"
        );
        f.forget_reports();
        assert!(f.tally.by_session.is_empty());
    }

    #[test]
    fn a_silent_reflector_loses_its_load_and_routes_after_the_grace_period() {
        let mut f = FleetState::default();
        f.publish("local", view(vec![], vec![shard("a", 0, "r1")]));
        f.observe("r1", "eu", false, users("app", "a", 3), 0, 1000);
        f.report_lost("r1");
        f.expire_reports(1000, 1000);
        let p = f.only_view();
        assert_eq!(
            f.users("app", "a"),
            Some(3),
            "still within the grace period"
        );
        assert_eq!(f.routable_url(&p, "r1", 1000, 1000), Some("ws://r1/"));
        assert!(f.live_streams().is_empty(), "its stream is closed");
        f.expire_reports(1001, 1000);
        assert_eq!(f.users("app", "a"), None);
        assert_eq!(f.routable_url(&p, "r1", 1001, 1000), None);
        // Kept (no routes) while a plan knows it; forgotten at the next expiry pass once
        // none does (passes run only when some live reflector can expire).
        f.publish("local", FleetView::default());
        f.observe("r2", "eu", false, ShardUsers::default(), 1002, 1000);
        f.expire_reports(2003, 1000);
        assert!(!f.live.contains_key("r1"));
        // Reporting again makes it routable and counted again.
        f.observe("r1", "eu", false, users("app", "a", 2), 1003, 1000);
        assert_eq!(f.users("app", "a"), Some(2));
    }

    #[test]
    fn only_ready_reflectors_that_are_not_draining_are_routable() {
        let mut f = FleetState::default();
        f.publish("local", view(vec![], vec![]));
        let p = f.only_view();
        assert_eq!(
            f.routable_url(&p, "r1", 0, 1000),
            Some("ws://r1/"),
            "not reported yet: routable"
        );
        assert_eq!(f.routable_url(&p, "r2", 0, 1000), None, "starting");
        assert_eq!(f.routable_url(&p, "r3", 0, 1000), None, "unknown");
        f.observe("r1", "eu", true, ShardUsers::default(), 0, 1000);
        assert_eq!(f.routable_url(&p, "r1", 0, 1000), None, "draining");
        f.observe("r1", "eu", false, ShardUsers::default(), 0, 1000);
        assert_eq!(
            f.routable_url(&p, "r1", 1001, 1000),
            None,
            "silent past the grace period even before expire_reports ran"
        );
    }

    #[test]
    fn forgetting_reports_keeps_what_was_published() {
        let mut f = FleetState::default();
        f.publish("local", view(vec![session(Some("a"), None)], vec![]));
        f.observe("r1", "eu", false, users("app", "a", 3), 0, 1000);
        f.forget_reports();
        assert_eq!(f.users("app", "a"), None);
        assert!(f.live_streams().is_empty());
        assert!(f.find_session("ns", "a").is_some());
    }

    impl FleetState {
        fn only_view(&self) -> Arc<Published> {
            self.published.values().next().unwrap().clone()
        }
    }

    #[test]
    fn app_ids_come_from_session_keys() {
        let s = |key: &str| SessionInput {
            key: key.into(),
            name: String::new(),
            pool: String::new(),
            policy: refleet_core::planner::ShardPolicy::from(&session(Some("a"), None).spec),
            deleted: false,
            waiting: false,
        };
        let sessions = [s("ns/app/a"), s("bad")];
        assert_eq!(app_ids(&sessions), HashMap::from([("ns/app/a", "app")]));
    }
}
