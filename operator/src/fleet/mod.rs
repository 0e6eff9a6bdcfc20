//! What both backends share between observing their world and acting on a plan (no kube
//! types): the kube controllers and `refleet up` each translate what they see into one
//! [`Observed`] (pools, Sessions, reflectors and the shards they host), and the planner's
//! [`PlanInput`] is assembled from it here, once.

use std::collections::{BTreeMap, HashMap, HashSet};

use refleet_core::shard::parse_shard_name;

use crate::crd::{ReflectorPoolSpec, SessionSpec, ShardPhase};
use crate::router::{FleetView, Router, SessionDef};
use refleet_core::planner::{
    Decision, ObservedReflector, Plan, PlanInput, PoolInput, ReflectorAction, ReflectorState,
    RegionInput, ScaleHistory, Seconds, SessionInput, ShardPolicy, ShardRecord, session_key,
};

pub mod by_session;
mod decisions;
#[cfg(test)]
mod tests;

pub use decisions::{About, Level, Summary, summarize};

/// How long a backend waits for a reflector it cannot hear from (neither its report stream
/// nor a read of its load tells what it hosts) before it judges that reflector by the plan
/// alone. Counted per reflector, from the first plan that could not hear it, and started
/// again by any report. Reflectors reconnect their report stream within a few seconds
/// (backing off to at most 4 s) after a restart or a new leader, and a live stream reports
/// every second; until one is heard, what it hosts is unknown, and neither a scale-down may
/// pick it as empty nor may a draining one be removed as empty.
pub const REPORT_WAIT: Seconds = 30;

/// One backend's view of its fleet at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// The pools (the kube backend plans one pool per call).
    pub pools: Vec<ObservedPool>,
    /// The Session objects referring to them.
    pub sessions: Vec<ObservedSession>,
    /// The reflectors, with what each hosts.
    pub reflectors: Vec<ObservedHost>,
}

/// A pool.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedPool {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its spec.
    pub spec: ReflectorPoolSpec,
    /// The files base URL its Sessions' clients use.
    pub files_url: String,
}

impl ObservedPool {
    /// Planner id of the pool (`namespace/name`).
    pub fn id(&self) -> String {
        pool_id(&self.namespace, &self.name)
    }
}

/// A Session object.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedSession {
    /// Namespace.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// Its spec.
    pub spec: SessionSpec,
    /// It is being deleted.
    pub deleted: bool,
}

impl ObservedSession {
    /// Planner id of the pool it refers to.
    pub fn pool(&self) -> String {
        pool_id(&self.namespace, &self.spec.pool_ref.name)
    }

    /// Whether planner session `key` is one of its concrete sessions.
    pub fn governs(&self, key: &str) -> bool {
        governs(&self.namespace, &self.spec, key)
    }
}

/// Whether planner session `key` is one of the concrete sessions of the Session object with
/// `spec` in `namespace`: its exact name, or a name its pattern matches.
pub fn governs(namespace: &str, spec: &SessionSpec, key: &str) -> bool {
    let Some(name) = by_session::name_in(key, namespace, &spec.app_id) else {
        return false;
    };
    match &spec.name {
        Some(exact) => name == exact,
        None => spec.matches(name),
    }
}

/// The per-Session gauges of the Session objects of pool `pool` after a plan that left
/// `shards`: `(namespace, name, open shards, users)`, where open shards are those not
/// closing and users count over all of its shards (what `Session.status` says too).
pub fn session_gauges(
    observed: &Observed,
    pool: &str,
    shards: &[ShardRecord],
) -> Vec<(String, String, u32, u64)> {
    let by_key = by_session::shards(shards);
    observed
        .sessions
        .iter()
        .filter(|s| s.pool() == pool)
        .map(|s| {
            let mine = by_key
                .governed(&s.namespace, &s.spec)
                .flat_map(|(_, shards)| shards);
            let (open, users) = mine.fold((0u32, 0u64), |(open, users), sh| {
                (
                    open + u32::from(sh.phase != ShardPhase::Closing),
                    users + u64::from(sh.users),
                )
            });
            (s.namespace.clone(), s.name.clone(), open, users)
        })
        .collect()
}

impl Observed {
    /// Fills in what a reflector hosts from its report stream (`reports`, by reflector name:
    /// `(appId, shard, users)`, as [`crate::router::Router::reported_hosts`] gives it) for
    /// every reflector the backend could not read itself.
    pub fn take_reports(&mut self, mut reports: HashMap<String, Vec<(String, String, u32)>>) {
        for r in &mut self.reflectors {
            if r.hosted.is_some() {
                continue;
            }
            if let Some(shards) = reports.remove(&r.name) {
                r.hosted = Some(
                    shards
                        .into_iter()
                        .map(|(app_id, name, users)| HostedShard {
                            app_id,
                            name,
                            users,
                        })
                        .collect(),
                );
            }
        }
    }
}

/// A reflector (a pod, or a process of `refleet up`).
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedHost {
    /// Its name.
    pub name: String,
    /// Planner id of its pool.
    pub pool: String,
    /// Its region, when known.
    pub region: Option<String>,
    /// Its image.
    pub image: String,
    /// Its state (`None`: finished, not a reflector the planner counts).
    pub state: Option<ReflectorState>,
    /// The box URL clients join, once known.
    pub url: Option<String>,
    /// The shards it hosts (`None`: it did not report this time).
    pub hosted: Option<Vec<HostedShard>>,
}

/// One shard a reflector hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostedShard {
    /// Croquet appId.
    pub app_id: String,
    /// Shard name (the JOIN's name without its `<appId>/` prefix).
    pub name: String,
    /// Connected users.
    pub users: u32,
}

/// Planner id of pool `name` in `namespace`.
pub fn pool_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// One concrete session: the index of its Session object in [`Observed::sessions`] and its
/// Croquet session name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concrete {
    /// Index into [`Observed::sessions`].
    pub session: usize,
    /// The Croquet session name.
    pub name: String,
}

/// Every concrete session by planner key: the exact names, and for a `namePattern` the
/// matching names that hold a shard in `shards` or that a reflector hosts with users. A key
/// two Session objects both govern goes to the first.
pub fn concrete_sessions(
    observed: &Observed,
    shards: &[ShardRecord],
) -> BTreeMap<String, Concrete> {
    let mut out = BTreeMap::new();
    for (i, s) in observed.sessions.iter().enumerate() {
        let spec = &s.spec;
        let mut names: Vec<String> = Vec::new();
        if let Some(name) = &spec.name {
            names.push(name.clone());
        } else {
            let prefix = format!("{}/{}/", s.namespace, spec.app_id);
            names.extend(
                shards
                    .iter()
                    .filter_map(|sh| sh.session.strip_prefix(&prefix))
                    .filter(|n| spec.matches(n))
                    .map(str::to_owned),
            );
            for hosted in observed
                .reflectors
                .iter()
                .flat_map(|r| r.hosted.iter().flatten())
            {
                if hosted.app_id != spec.app_id || hosted.users == 0 {
                    continue;
                }
                if let Some((base, _)) = parse_shard_name(&hosted.name)
                    && spec.matches(base)
                {
                    names.push(base.to_owned());
                }
            }
        }
        for name in names {
            out.entry(session_key(&s.namespace, &spec.app_id, &name))
                .or_insert(Concrete { session: i, name });
        }
    }
    out
}

/// Builds the planner's input from what a backend observed, the shards the previous plan
/// left (`shards`, with any the backend recovered) and its scaling history.
///
/// - A region without an image plans with an empty one.
/// - A shard a reflector hosts with users, of a known session, that `shards` does not know
///   (after a restart) is adopted as open on that reflector.
/// - A placed shard whose reflector reported takes its users from that report (0 when absent
///   from it); one whose reflector did not report keeps the users it had.
pub fn plan_input(
    observed: &Observed,
    shards: &[ShardRecord],
    history: &ScaleHistory,
    now: Seconds,
) -> PlanInput {
    let pools = observed
        .pools
        .iter()
        .map(|p| PoolInput {
            id: p.id(),
            placement: p.spec.placement,
            regions: p
                .spec
                .resolved_regions()
                .into_iter()
                .map(|r| RegionInput {
                    image: r.image.clone().unwrap_or_default(),
                    capacity: r.capacity,
                    min_reflectors: r.min_reflectors,
                    max_reflectors: r.max_reflectors,
                    warm_buffer: r.warm_buffer,
                    growth_buffer_seconds: r.growth_buffer_seconds,
                    name: r.name,
                })
                .collect(),
            cooldown: Seconds::from(p.spec.scale_down_cooldown_seconds),
            drain_grace: Seconds::from(p.spec.drain_grace_period_seconds),
            moves: (&p.spec.moves).into(),
        })
        .collect();

    let concrete = concrete_sessions(observed, shards);
    let sessions = concrete
        .iter()
        .map(|(key, c)| {
            let s = &observed.sessions[c.session];
            SessionInput {
                key: key.clone(),
                name: c.name.clone(),
                pool: s.pool(),
                policy: ShardPolicy::from(&s.spec),
                deleted: s.deleted,
                waiting: false,
            }
        })
        .collect();
    let app_of = |key: &str| {
        concrete
            .get(key)
            .map(|c| &observed.sessions[c.session].spec)
    };

    let reflectors = observed
        .reflectors
        .iter()
        .filter_map(|r| {
            let state = r.state?;
            let region = r.region.clone()?;
            let capacity = observed
                .pools
                .iter()
                .find(|p| p.id() == r.pool)
                .and_then(|p| p.spec.resolved_region(&region))
                .map(|reg| reg.capacity)
                .unwrap_or_default();
            Some(ObservedReflector {
                name: r.name.clone(),
                pool: r.pool.clone(),
                region,
                image: r.image.clone(),
                capacity,
                state,
                // Ready and draining reflectors may host shards; starting ones cannot yet.
                unreported: matches!(state, ReflectorState::Ready | ReflectorState::Draining)
                    && r.hosted.is_none(),
            })
        })
        .collect();

    // Looked up once per reported shard: a scan of every shard for each one was the largest
    // cost of a sync at 10 000 shards (docs/scale.md).
    let known: HashSet<(&str, &str)> = shards
        .iter()
        .map(|s| (s.session.as_str(), s.name.as_str()))
        .collect();
    let mut adopted: Vec<ShardRecord> = Vec::new();
    let mut adopted_keys: HashSet<(String, String)> = HashSet::new();
    // The namespaces of each appId's Session objects, each once, in their order: where a
    // reported shard's session may live (one per appId and namespace, not one per object).
    let mut namespaces: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in &observed.sessions {
        let of_app = namespaces.entry(s.spec.app_id.as_str()).or_default();
        if !of_app.contains(&s.namespace.as_str()) {
            of_app.push(&s.namespace);
        }
    }
    // Shards a reflector hosts with users but the plan does not know (after a restart).
    for r in &observed.reflectors {
        for hosted in r.hosted.iter().flatten().filter(|h| h.users > 0) {
            let Some((base, index)) = parse_shard_name(&hosted.name) else {
                continue;
            };
            let Some((key, c)) = namespaces
                .get(hosted.app_id.as_str())
                .into_iter()
                .flatten()
                .map(|namespace| session_key(namespace, &hosted.app_id, base))
                .find_map(|key| concrete.get(&key).map(|c| (key, c)))
            else {
                continue;
            };
            if known.contains(&(key.as_str(), hosted.name.as_str()))
                || !adopted_keys.insert((key.clone(), hosted.name.clone()))
            {
                continue;
            }
            let session = &observed.sessions[c.session];
            adopted.push(ShardRecord {
                session: key,
                name: hosted.name.clone(),
                index,
                pool: session.pool(),
                region: r.region.clone().unwrap_or_default(),
                reflector: Some(r.name.clone()),
                committed_users: session.spec.max_users_per_shard,
                users: hosted.users,
                reserved: 0,
                phase: ShardPhase::Open,
                empty_since: None,
                moving_to: None,
                moved_at: None,
            });
        }
    }
    let mut shards = [shards, &adopted].concat();
    // Fresh load for every placed shard whose reflector reported.
    let reports: HashMap<&str, &Vec<HostedShard>> = observed
        .reflectors
        .iter()
        .filter_map(|r| Some((r.name.as_str(), r.hosted.as_ref()?)))
        .collect();
    for shard in &mut shards {
        let (Some(reflector), Some(spec)) = (&shard.reflector, app_of(&shard.session)) else {
            continue;
        };
        if let Some(hosted) = reports.get(reflector.as_str()) {
            shard.users = hosted
                .iter()
                .find(|h| h.app_id == spec.app_id && h.name == shard.name)
                .map_or(0, |h| h.users);
        }
    }

    PlanInput {
        pools,
        sessions,
        reflectors,
        shards,
        history: history.clone(),
        now,
        move_requests: Vec::new(),
    }
}

/// Ends the wait for reports ([`REPORT_WAIT`]) of each reflector that has been unheard
/// for that long in a row: from then on it is judged by the plan alone, so one whose
/// reports never come can still be scaled down or removed. `unheard_since` is the backend's
/// memory between plans (reflector name → the first plan that could not hear it); a
/// reflector heard from again is forgotten, so its next silence waits in full.
///
/// Per reflector, not since the backend started planning: a leader that has planned for
/// minutes can still lose a reflector's reports for a while (a stream that lags or
/// reconnects), and the shards the plan does not know on it are just as unknown then
/// (docs/scale.md, run G4: a new leader whose reflectors reported late deleted pods with
/// 180 653 users on them).
pub fn settle_unreported(input: &mut PlanInput, unheard_since: &mut HashMap<String, Seconds>) {
    let now = input.now;
    let mut unheard = HashSet::new();
    for r in input.reflectors.iter_mut().filter(|r| r.unreported) {
        let since = *unheard_since.entry(r.name.clone()).or_insert(now);
        unheard.insert(r.name.clone());
        if now >= since.saturating_add(REPORT_WAIT) {
            r.unreported = false;
        }
    }
    unheard_since.retain(|name, _| unheard.contains(name));
}

/// What a backend publishes to the router after a plan: the plan's `input` with the plan's
/// shards and history, every Session object with its pool's files URL, and the URL of each
/// reflector that has one. A backend hands it to the router with [`publish_plan`].
pub fn fleet_view(observed: &Observed, mut input: PlanInput, plan: &Plan) -> FleetView {
    input.shards.clone_from(&plan.shards);
    input.history.clone_from(&plan.history);
    let sessions = observed
        .sessions
        .iter()
        .map(|s| {
            let pool = s.pool();
            let files_url = observed
                .pools
                .iter()
                .find(|p| p.id() == pool)
                .map(|p| p.files_url.clone())
                .unwrap_or_default();
            SessionDef {
                namespace: s.namespace.clone(),
                spec: s.spec.clone(),
                pool,
                files_url,
            }
        })
        .collect();
    let urls = observed
        .reflectors
        .iter()
        .filter_map(|r| Some((r.name.clone(), r.url.clone()?)))
        .collect();
    FleetView {
        input,
        sessions,
        urls,
        gateways: gateway_urls(&observed.pools),
    }
}

/// The reflectors `plan` drains or removes.
fn retiring(plan: &Plan) -> HashSet<&str> {
    plan.reflectors
        .iter()
        .filter(|r| r.action != ReflectorAction::Keep)
        .map(|r| r.name.as_str())
        .collect()
}

/// Publishes `view`, the view after `plan`, to `router` before the backend acts on the plan,
/// and keeps each reflector the plan would drain or remove on which the router opened a
/// shard that no plan holds yet.
///
/// A reflector the plan drains or removes is published as draining: the backend marks its
/// pod only after this, and until the next plan sees the mark, a Route would otherwise open
/// shards on it (empty, it is the roomiest reflector there is). A Route may also have opened
/// one on it from the view before, while the plan was being made without that shard: asked
/// after the publish, the router names every such reflector (none can get a shard after
/// it), and the plan keeps them. The next plan counts the shard and keeps the reflector.
pub fn publish_plan(router: &Router, key: &str, mut view: FleetView, plan: &mut Plan) {
    let kept = {
        let retiring = retiring(plan);
        for r in &mut view.input.reflectors {
            if retiring.contains(r.name.as_str()) {
                r.state = ReflectorState::Draining;
            }
        }
        router.publish(key, view);
        if retiring.is_empty() {
            return;
        }
        router.hosting_unplanned(&retiring)
    };
    if kept.is_empty() {
        return;
    }
    for name in &kept {
        tracing::info!(reflector = %name, "drain called off: a Route opened a shard on it while the plan was made");
    }
    for r in plan
        .reflectors
        .iter_mut()
        .filter(|r| kept.contains(&r.name))
    {
        r.action = ReflectorAction::Keep;
    }
    plan.decisions.retain(|d| match d {
        Decision::DrainReflector { reflector, .. } | Decision::RemoveReflector { reflector } => {
            !kept.contains(reflector)
        }
        _ => true,
    });
}

/// Region → public URL of its gateway, for every pool whose gateway is on.
pub fn gateway_urls(pools: &[ObservedPool]) -> HashMap<String, String> {
    pools
        .iter()
        .flat_map(|p| {
            p.spec
                .regions
                .iter()
                .filter_map(|r| Some((r.name.clone(), p.spec.gateway.url(&r.name, &p.namespace)?)))
        })
        .collect()
}
