//! The reconcile functions of both controllers and the apply step they share.
//!
//! ```text
//! reconcile(pool | session) ─> sync(namespace, pool):
//!     observe  the cache: pool, its Sessions, pods, Services (no request) ; the report streams,
//!              and GET /sessions of each ready pod whose stream is not live
//!     plan     planner::plan(fleet::plan_input(observed(..)))          (pure)
//!              router: fleet::publish_plan(fleet::fleet_view(..))
//!     apply    drain: PATCH pod (label draining) + DELETE pod (grace) ; remove: DELETE pod
//!              create: PATCH pod (server-side apply) [+ PATCH Service]
//!              PATCH status (server-side apply) of the pool, then of every changed Session
//!              together with the Events for the decisions (POST, or PATCH of a series)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use super::cache::{Cache, Watches};
use super::input::{
    PoolMemory, input_for, observed, parse_move_annotation, pending_move_annotation, pool_id,
};
use super::observe::read_loads;
use super::pod::{
    ANNOTATION_DRAIN_DEADLINE, LABEL_STATE, STATE_DRAINING, TERMINATION_SLACK_SECONDS, pod_name,
    reflector_pod, reflector_service, set_report_credential,
};
use super::status::{pool_status, session_statuses, status_write_due};
use super::{Context, Error, FIELD_MANAGER, Result};
use crate::crd::{CONDITION_DEGRADED, ReflectorPool, Session};
use crate::fleet::{self, by_session};
use crate::metrics::{POOL_CONTROLLER, SESSION_CONTROLLER};
use refleet_core::planner::{self, Plan, ReflectorAction, Seconds};

/// A pod older than this that a sync "creates" was missing from the pod cache (a watch
/// brings a new pod back within a second or two).
const STALE_CACHE_SECONDS: i64 = 30;

/// Reconciles a ReflectorPool: syncs it.
#[instrument(skip(pool, ctx, cache), fields(namespace = %pool.namespace().unwrap_or_default(), pool = %pool.name_any()))]
pub async fn reconcile_pool(
    pool: Arc<ReflectorPool>,
    ctx: Arc<Context>,
    cache: Cache,
) -> Result<Action> {
    let timer = ctx.metrics.reconcile_started(POOL_CONTROLLER);
    let ns = pool.namespace().unwrap_or_default();
    if !sync_coalesced(&ctx, &cache, &ns, &pool.name_any(), POOL_CONTROLLER).await? {
        timer.stop_and_discard();
    }
    Ok(Action::requeue(ctx.resync))
}

/// Reconciles a Session: syncs its pool (which writes the Session's status; a missing pool
/// gives the Session a `PoolNotFound` condition).
#[instrument(skip(session, ctx, cache), fields(namespace = %session.namespace().unwrap_or_default(), session = %session.name_any()))]
pub async fn reconcile_session(
    session: Arc<Session>,
    ctx: Arc<Context>,
    cache: Cache,
) -> Result<Action> {
    let timer = ctx.metrics.reconcile_started(SESSION_CONTROLLER);
    let ns = session.namespace().unwrap_or_default();
    let pool = &session.spec.pool_ref.name;
    if !sync_coalesced(&ctx, &cache, &ns, pool, SESSION_CONTROLLER).await? {
        timer.stop_and_discard();
    }
    Ok(Action::requeue(ctx.resync * 6))
}

/// Syncs the pool, unless another reconcile already waits to sync it: that one reads the
/// caches only once it holds the pool's lock, so after whatever triggered this call, and a
/// second sync behind it would repeat its work. Every Session of a pool and the pool itself
/// trigger the same sync; at ~10 000 shards a sync costs ~100 ms of a core (docs/scale.md),
/// so a status write that triggers its Session's reconcile while the pool's reconcile waits
/// costs nothing more.
///
/// The sync that waits also keeps the pace ([`Context::min_sync_interval`] after the start
/// of the last one), which bounds what a busy pool's syncs cost however often its objects
/// change; a Route waiting for the backend ends the wait at once. Returns whether this
/// call synced (a reconcile that did not is left out of the reconcile duration histogram).
pub async fn sync_coalesced(
    ctx: &Context,
    cache: &Cache,
    namespace: &str,
    pool_name: &str,
    controller: &'static str,
) -> Result<bool> {
    let slot = ctx.pool_slot(&pool_id(namespace, pool_name));
    if slot.queued.swap(true, Ordering::AcqRel) {
        ctx.metrics.sync_coalesced(controller);
        return Ok(false);
    }
    if let Some((next, urgent_floor)) = slot.next_starts(ctx.min_sync_interval)
        && next > tokio::time::Instant::now()
    {
        let urgent = async {
            match &ctx.router {
                Some(router) => router.backend_urgent().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = urgent => tokio::time::sleep_until(urgent_floor).await,
        }
    }
    drop(slot);
    sync(ctx, cache, namespace, pool_name).await.map(|_| true)
}

/// Logs a failed reconciliation, counts it and retries soon.
pub fn pool_error_policy(_pool: Arc<ReflectorPool>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconciling a ReflectorPool failed");
    ctx.metrics
        .reconcile_failed(POOL_CONTROLLER, error.metric_label());
    Action::requeue(Duration::from_secs(5))
}

/// Logs a failed reconciliation, counts it and retries soon.
pub fn session_error_policy(_session: Arc<Session>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconciling a Session failed");
    ctx.metrics
        .reconcile_failed(SESSION_CONTROLLER, error.metric_label());
    Action::requeue(Duration::from_secs(5))
}

/// What one sync observed and decided (returned for tests and logs).
#[derive(Debug)]
pub struct Synced {
    /// The plan that was applied.
    pub plan: Plan,
    /// Pods created.
    pub created: Vec<String>,
}

/// Observe (from `cache`, without a request) → plan → apply for pool `pool_name` in
/// `namespace`.
pub async fn sync(
    ctx: &Context,
    cache: &Cache,
    namespace: &str,
    pool_name: &str,
) -> Result<Synced> {
    let id = pool_id(namespace, pool_name);
    let slot = ctx.pool_slot(&id);
    let mut memory = slot.memory.lock().await;
    // From here on this sync reads the caches: a trigger arriving now needs a sync after it.
    // (First, so that no way out of this function leaves the flag set.)
    slot.queued.store(false, Ordering::Release);
    let _timing = slot.started();
    cache.ready().await?;

    // Observe. Read under the pool's lock, so a sync sees what the one before it wrote as
    // soon as the watch has brought it back.
    let pools: Api<ReflectorPool> = Api::namespaced(ctx.client.clone(), namespace);
    let pool = cache.pool(namespace, pool_name);
    let sessions = cache.sessions_of(namespace, pool_name);
    let pods = match &pool {
        Some(_) => cache.pods_of(namespace, pool_name),
        None => Vec::new(),
    };
    // A pod whose report stream is live tells its load there; only the others are read over
    // HTTP (`GET /sessions`), which at ~2 000 reflectors was 2 000 requests per sync and 7 %
    // of the leader's samples (docs/scale.md, "Ramps").
    let reported = ctx
        .router
        .as_ref()
        .map(|router| router.reported_hosts())
        .unwrap_or_default();
    let unreported: Vec<&Pod> = pods
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| !reported.contains_key(p.metadata.name.as_deref().unwrap_or_default()))
        .collect();
    let loads = read_loads(&*ctx.load, unreported, ctx.report_key.as_ref()).await;
    let now = (ctx.clock)();

    // Plan.
    let mut observed = observed(
        namespace,
        pool_name,
        pool.as_ref(),
        &sessions,
        &pods,
        &loads,
    );
    // The pods that report, and those whose /sessions could not be read but whose stream
    // came back since: what their report streams say.
    observed.take_reports(reported);
    let mut input = input_for(&observed, namespace, pool_name, &sessions, &memory, now);
    fleet::settle_unreported(&mut input, &mut memory.unheard_since);
    if let Some(router) = &ctx.router {
        router.prepare(&mut input);
    }
    // Events are published with the statuses, after the plan is applied.
    let mut events = Vec::new();
    for session in &sessions {
        let Some(value) = pending_move_annotation(session) else {
            continue;
        };
        match parse_move_annotation(namespace, session, value) {
            Ok(request) => {
                info!(session = %session.name_any(), shard = %request.shard, to = ?request.to, "move asked for by annotation");
                input.move_requests.push(request);
            }
            Err(message) => {
                warn!(session = %session.name_any(), %message, "move annotation ignored");
                events.push(PendingEvent {
                    regarding: session.object_ref(&()),
                    type_: EventType::Warning,
                    reason: "BadMoveRequest".to_owned(),
                    action: "Move",
                    note: message,
                });
            }
        }
    }
    let mut plan = planner::plan(&input);
    if let Some(router) = &ctx.router {
        let view = fleet::fleet_view(&observed, input.clone(), &plan);
        fleet::publish_plan(router, &id, view, &mut plan);
    }

    // Apply.
    let mut created = Vec::new();
    if let Some(pool) = &pool {
        let services = cache.services_of(namespace, pool_name);
        apply_reflectors(ctx, pool, &pods, &services, &plan, &mut created).await?;
        let status = pool_status(pool, &plan, now);
        if pool.status.as_ref() != Some(&status) {
            patch_status(
                &pools,
                pool_name,
                ReflectorPool::api_version(&()),
                "ReflectorPool",
                &status,
            )
            .await?;
        }
    }
    // The Session statuses due and the Events are independent requests: sent together, up
    // to `REQUESTS_IN_FLIGHT` at a time, not one round trip after another. The pool's next
    // sync (the one that publishes a started pod as ready to the Routes waiting for it)
    // waits for this one: with thirty statuses due at ~100 ms each, in a row, that was 3 s
    // (docs/scale.md, run E8).
    let sessions_api: Api<Session> = Api::namespaced(ctx.client.clone(), namespace);
    let statuses = session_statuses(&sessions, pool.as_ref(), &plan, now);
    let mut writes = Vec::new();
    for (session, (status, problem)) in sessions.iter().zip(statuses) {
        let was_degraded = session
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == CONDITION_DEGRADED && c.status == "True")
            .map(|c| c.reason.as_str());
        let name = session.name_any();
        let written = memory.status_written.get(&name).copied();
        if let Some((reason, message)) = problem
            && was_degraded != Some(reason.as_str())
        {
            warn!(session = %name, %reason, %message, "session degraded");
            events.push(PendingEvent {
                regarding: session.object_ref(&()),
                type_: EventType::Warning,
                reason: reason.as_str().to_owned(),
                action: "Degraded",
                note: message,
            });
        }
        if status_write_due(
            session.status.as_ref(),
            &status,
            written,
            now,
            ctx.status_counts_every,
        ) {
            writes.push((name, status));
        }
    }
    events.extend(decision_events(pool.as_ref(), &sessions, &plan));
    let api = &sessions_api;
    let statuses_written = futures_util::stream::iter(writes)
        .map(|(name, status)| async move {
            let api_version = Session::api_version(&());
            patch_status(api, &name, api_version, "Session", &status)
                .await
                .map(|()| name)
        })
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .collect::<Vec<_>>();
    let events_published = futures_util::stream::iter(same_series(events).into_iter().map(bounded))
        .map(|series| async move {
            for event in series {
                publish(ctx, event).await;
            }
        })
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .collect::<Vec<()>>();
    let (statuses_written, _) =
        futures_util::future::join(statuses_written, events_published).await;
    let mut first_error = None;
    for result in statuses_written {
        match result {
            Ok(name) => {
                memory.status_written.insert(name, now);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if pool.is_some() {
        ctx.metrics.record_plan(namespace, pool_name, &plan);
    }
    ctx.metrics
        .record_sessions(&id, &fleet::session_gauges(&observed, &id, &plan.shards));

    let unheard_since = std::mem::take(&mut memory.unheard_since);
    let mut status_written = std::mem::take(&mut memory.status_written);
    let live: std::collections::HashSet<String> = sessions.iter().map(|s| s.name_any()).collect();
    status_written.retain(|name, _| live.contains(name));
    *memory = PoolMemory {
        shards: plan.shards.clone(),
        history: plan.history.clone(),
        initialised: true,
        unheard_since,
        status_written,
    };
    Ok(Synced { plan, created })
}

/// Requests one sync keeps in flight (pods; then Session statuses and Events). A sync that
/// grows a pool by a hundred pods would otherwise wait for a hundred apiserver round trips
/// in a row, ~100 ms each on a loaded apiserver: 10 s, as long as a Route waits for its new
/// shard (docs/scale.md, run E2). Each pod's own requests stay in order (mark, then
/// delete; pod, then its Service).
pub const REQUESTS_IN_FLIGHT: usize = 16;

/// Drains, removes and creates reflector pods (and per-pod Services) as the plan says, up to
/// [`REQUESTS_IN_FLIGHT`] pods at a time. Every request is tried; the first error is
/// returned after the others finished (pods created before it are still in `created`).
async fn apply_reflectors(
    ctx: &Context,
    pool: &ReflectorPool,
    pods: &[Arc<Pod>],
    services: &[Service],
    plan: &Plan,
    created: &mut Vec<String>,
) -> Result<()> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let grace = i64::from(pool.spec.drain_grace_period_seconds) + TERMINATION_SLACK_SECONDS;
    let delete = DeleteParams {
        grace_period_seconds: u32::try_from(grace).ok(),
        ..DeleteParams::default()
    };
    let by_name: HashMap<String, &Pod> = pods.iter().map(|p| (p.name_any(), &**p)).collect();
    // `Some(deadline)`: drain (mark first so no new shard goes there, then SIGTERM with the
    // grace); `None`: remove.
    let removals: Vec<(String, Option<Seconds>)> = plan
        .reflectors
        .iter()
        .filter_map(|rp| {
            let pod = by_name.get(&rp.name)?;
            if pod.metadata.deletion_timestamp.is_some() {
                return None;
            }
            match rp.action {
                ReflectorAction::Keep => None,
                ReflectorAction::Drain { deadline } => Some((rp.name.clone(), Some(deadline))),
                ReflectorAction::Remove => Some((rp.name.clone(), None)),
            }
        })
        .collect();
    let (api_ref, delete_ref) = (&api, &delete);
    let removed: Vec<Result<()>> = futures_util::stream::iter(removals)
        .map(move |(name, drain)| remove_pod(api_ref, name, drain, delete_ref))
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .collect()
        .await;
    let mut first_error = removed.into_iter().find_map(Result::err);

    let per_pod_service = pool.spec.reflector_url.per_pod_service;
    let mut taken: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    let pool_name = pool.name_any();
    // Names and specs first (each new pod takes the lowest free name), then the requests.
    let mut new_pods: Vec<(String, String, Pod)> = Vec::new();
    for region_plan in plan.regions.iter().filter(|r| r.create > 0) {
        let Some(region) = pool.spec.resolved_region(&region_plan.region) else {
            continue;
        };
        for _ in 0..region_plan.create {
            let Some(name) = (0..)
                .map(|i| pod_name(&pool_name, &region.name, i))
                .find(|n| !taken.contains(n))
            else {
                break;
            };
            taken.insert(name.clone());
            let mut pod = reflector_pod(pool, &region, &name);
            // Routing settings (report stream, join-token keys) the operator was started with.
            if let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) {
                c.env
                    .get_or_insert_with(Vec::new)
                    .extend(ctx.reflector_env.iter().cloned());
            }
            // The pod's own identity on the report stream: derived from the name and region,
            // so a retried apply sets the same value.
            if let Some(key) = &ctx.report_key {
                let credential = key
                    .credential(&name, &region.name)
                    .map_err(super::Error::Credential)?;
                set_report_credential(&mut pod, credential);
            }
            new_pods.push((name, region.name.clone(), pod));
        }
    }
    let applied: Vec<Result<Option<String>>> = futures_util::stream::iter(new_pods)
        .map(move |(name, region, pod)| {
            create_pod(ctx, api_ref, name, region, pod, per_pod_service)
        })
        .buffer_unordered(REQUESTS_IN_FLIGHT)
        .collect()
        .await;
    for result in applied {
        match result {
            Ok(Some(name)) => created.push(name),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if per_pod_service {
        let existing: BTreeSet<String> = services.iter().map(ResourceExt::name_any).collect();
        // By index: a closure taking `&Pod` would make the future's lifetime higher-ranked,
        // which the controller's spawned (`Send`) future cannot prove.
        let missing = (0..pods.len()).filter(|&i| {
            pods[i].metadata.deletion_timestamp.is_none() && !existing.contains(&pods[i].name_any())
        });
        let applied: Vec<Result<()>> = futures_util::stream::iter(missing)
            .map(move |i| apply_service(ctx, &pods[i]))
            .buffer_unordered(REQUESTS_IN_FLIGHT)
            .collect()
            .await;
        applied.into_iter().collect::<Result<()>>()?;
    }
    Ok(())
}

/// Drains pod `name` (with `Some(deadline)`: marks it first so no new shard goes there, then
/// SIGTERM with the grace) or removes it.
async fn remove_pod(
    api: &Api<Pod>,
    name: String,
    drain: Option<Seconds>,
    delete: &DeleteParams,
) -> Result<()> {
    if let Some(deadline) = drain {
        let mark = json!({
            "metadata": {
                "labels": { LABEL_STATE: STATE_DRAINING },
                "annotations": { ANNOTATION_DRAIN_DEADLINE: deadline.to_string() },
            }
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&mark))
            .await
        {
            Ok(_) => {}
            // Gone already (the pod cache lags behind its deletion): nothing left to drain.
            // An error here failed the whole sync, so a new leader behind a lagging watch
            // created no pod for minutes (run G4, docs/scale.md).
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    delete_pod(api, &name, delete).await
}

/// Applies the new reflector pod `name` (then its Service, with `per_pod_service`); its name
/// when it is new, `None` when the apply found it existing (the cache missed it).
async fn create_pod(
    ctx: &Context,
    api: &Api<Pod>,
    name: String,
    region: String,
    pod: Pod,
    per_pod_service: bool,
) -> Result<Option<String>> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let pod = api.patch(&name, &params, &Patch::Apply(&pod)).await?;
    let age = pod.metadata.creation_timestamp.as_ref().map_or(0, |t| {
        i64::try_from((ctx.clock)()).unwrap_or(i64::MAX) - t.0.as_second()
    });
    let missed = age > STALE_CACHE_SECONDS;
    if missed {
        // The apply found a pod the cache never showed: harmless (nothing changed), but the
        // pod watch lags far behind, and every sync would repeat it.
        warn!(pod = %name, age_s = age, "the pod cache missed an existing reflector pod");
    } else {
        info!(pod = %name, %region, "created reflector pod");
    }
    if per_pod_service {
        apply_service(ctx, &pod).await?;
    }
    Ok((!missed).then_some(name))
}

async fn apply_service(ctx: &Context, pod: &Pod) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut svc = reflector_service(pod);
    svc.metadata.managed_fields = None;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&pod.name_any(), &params, &Patch::Apply(&svc))
        .await?;
    Ok(())
}

async fn delete_pod(api: &Api<Pod>, name: &str, params: &DeleteParams) -> Result<()> {
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side applies `status` to the status subresource of `name`.
async fn patch_status<K, S>(
    api: &Api<K>,
    name: &str,
    api_version: std::borrow::Cow<'_, str>,
    kind: &str,
    status: &S,
) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let patch = json!({
        "apiVersion": api_version,
        "kind": kind,
        "status": serde_json::to_value(status).map_err(Error::Serialize)?,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// An Event a sync publishes once its plan is applied.
#[derive(Clone)]
struct PendingEvent {
    regarding: ObjectReference,
    type_: EventType,
    reason: String,
    action: &'static str,
    note: String,
}

/// What makes Events one series for the recorder: type, reason, action and the object
/// (kind, namespace, name).
type SeriesKey = (EventType, String, &'static str, [Option<String>; 3]);

/// `events` grouped by series, each group in its order: a group is published one Event
/// after the other, so its second Event counts in the first one's series instead of being
/// created beside it.
fn same_series(events: Vec<PendingEvent>) -> Vec<Vec<PendingEvent>> {
    let mut groups: Vec<Vec<PendingEvent>> = Vec::new();
    let mut index: HashMap<SeriesKey, usize> = HashMap::new();
    for event in events {
        let r = &event.regarding;
        let key = (
            event.type_,
            event.reason.clone(),
            event.action,
            [r.kind.clone(), r.namespace.clone(), r.name.clone()],
        );
        match index.get(&key) {
            Some(&i) => groups[i].push(event),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![event]);
            }
        }
    }
    groups
}

/// Publishes an Event; a failure is logged, never fatal (Events are best effort).
async fn publish(ctx: &Context, pending: PendingEvent) {
    let event = Event {
        type_: pending.type_,
        reason: pending.reason,
        note: Some(pending.note),
        action: pending.action.to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &pending.regarding).await {
        warn!(%error, reason = %event.reason, "publishing an Event failed");
    }
}

/// Events one series publishes per sync at most; the rest are told in the last one.
const EVENTS_PER_SERIES: usize = 5;

/// An Event's note at most (the API's limit is 1 KiB).
const NOTE_BYTES: usize = 1024;

/// `series` with at most [`EVENTS_PER_SERIES`] Events: past that, the last one says how
/// many more there were and gives the last of their notes. A series is published one
/// Event after the other (~50 ms each on a loaded apiserver), and a ramp through a pattern
/// Session opens thousands of shards per sync, each an Event on that Session: the sync
/// spent minutes on them while no pod was created (run G4, docs/scale.md).
fn bounded(mut series: Vec<PendingEvent>) -> Vec<PendingEvent> {
    if series.len() <= EVENTS_PER_SERIES {
        return series;
    }
    let more = series.split_off(EVENTS_PER_SERIES - 1);
    let n = more.len();
    if let Some(last) = more.into_iter().last() {
        let mut note = format!("{n} more in this sync, the last: {}", last.note);
        if note.len() > NOTE_BYTES {
            let mut end = NOTE_BYTES;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
        }
        series.push(PendingEvent { note, ..last });
    }
    series
}

/// The Events for the plan's decisions (CamelCase reasons), on the Session or the pool.
fn decision_events(
    pool: Option<&ReflectorPool>,
    sessions: &[Session],
    plan: &Plan,
) -> Vec<PendingEvent> {
    let namespaces: Vec<String> = sessions
        .iter()
        .map(|s| s.namespace().unwrap_or_default())
        .collect();
    let owners = by_session::Owners::new(
        namespaces
            .iter()
            .zip(sessions)
            .map(|(namespace, s)| (namespace.as_str(), &s.spec)),
    );
    let session_ref = |key: &str| {
        owners
            .of(key, |i| &sessions[i].spec)
            .map(|i| sessions[i].object_ref(&()))
    };
    let pool_ref = pool.map(|p| p.object_ref(&()));
    plan.decisions
        .iter()
        .flat_map(fleet::summarize)
        .filter(|summary| summary.event)
        .filter_map(|summary| {
            let regarding = match &summary.about {
                fleet::About::Session(key) => session_ref(key),
                fleet::About::Pool(_) | fleet::About::Reflector(_) => pool_ref.clone(),
            }?;
            let type_ = match summary.level {
                fleet::Level::Warning => EventType::Warning,
                fleet::Level::Normal | fleet::Level::Routine => EventType::Normal,
            };
            Some(PendingEvent {
                regarding,
                type_,
                reason: summary.reason.to_owned(),
                action: summary.action,
                note: summary.note,
            })
        })
        .collect()
}

/// Runs both controllers over `namespace` (all namespaces when `None`) until `stop`
/// resolves; returns when both have stopped (and with them the watches behind the cache).
pub async fn run_controllers(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (pools, sessions, pods, services) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let (cache, watches) = Cache::watch(pools, sessions, pods, services);
    let Watches {
        pools,
        sessions,
        pods,
        pool_store,
        session_store,
        drivers,
    } = watches;
    let stop = futures_util::FutureExt::shared(Box::pin(stop));
    // A Route waiting for a shard whose reflector must be created: sync every pool now.
    let wanted = ctx.router.clone().map(|router| {
        futures_util::stream::unfold(router, |router| async move {
            router.backend_wanted().await;
            Some(((), router))
        })
    });
    let pool_cache = cache.clone();
    let pool_controller = Controller::for_shared_stream(pools, pool_store)
        .owns_shared_stream(pods)
        .reconcile_all_on(futures_util::stream::iter(wanted).flatten())
        .graceful_shutdown_on(stop.clone())
        .run(
            move |pool, ctx| reconcile_pool(pool, ctx, pool_cache.clone()),
            pool_error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures_util::future::ready(()));
    let session_controller = Controller::for_shared_stream(sessions, session_store)
        .graceful_shutdown_on(stop)
        .run(
            move |session, ctx| reconcile_session(session, ctx, cache.clone()),
            session_error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures_util::future::ready(()));
    futures_util::future::join(pool_controller, session_controller).await;
    drop(drivers);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str, reason: &str, note: &str) -> PendingEvent {
        PendingEvent {
            regarding: ObjectReference {
                kind: Some(kind.to_owned()),
                namespace: Some("games".to_owned()),
                name: Some(name.to_owned()),
                ..ObjectReference::default()
            },
            type_: EventType::Normal,
            reason: reason.to_owned(),
            action: "Scale",
            note: note.to_owned(),
        }
    }

    #[test]
    fn events_of_one_series_are_grouped_in_their_order_and_others_apart() {
        let groups = same_series(vec![
            event("ReflectorPool", "arena", "ScalingUp", "1"),
            event("Session", "arena", "ScalingUp", "2"),
            event("ReflectorPool", "arena", "ScalingUp", "3"),
            event("ReflectorPool", "arena", "ScalingDown", "4"),
            event("ReflectorPool", "lobby", "ScalingUp", "5"),
        ]);
        let notes: Vec<Vec<&str>> = groups
            .iter()
            .map(|g| g.iter().map(|e| e.note.as_str()).collect())
            .collect();
        assert_eq!(notes, [vec!["1", "3"], vec!["2"], vec!["4"], vec!["5"]]);
    }

    #[test]
    fn a_series_publishes_a_few_events_per_sync_and_counts_the_rest_in_its_last() {
        let series = |n: usize| -> Vec<PendingEvent> {
            (0..n)
                .map(|i| event("Session", "rooms", "ShardOpened", &format!("room-{i}")))
                .collect()
        };
        let notes = |events: Vec<PendingEvent>| -> Vec<String> {
            events.into_iter().map(|e| e.note).collect()
        };
        assert_eq!(
            notes(bounded(series(5))).len(),
            5,
            "five go out as they are"
        );
        assert_eq!(
            notes(bounded(series(2000))),
            [
                "room-0",
                "room-1",
                "room-2",
                "room-3",
                "1996 more in this sync, the last: room-1999"
            ]
        );
        let long = vec![event("Session", "rooms", "ShardOpened", "x"); 6]
            .into_iter()
            .chain([event("Session", "rooms", "ShardOpened", &"é".repeat(1000))])
            .collect();
        let last = bounded(long).pop().unwrap();
        assert!(last.note.len() <= NOTE_BYTES && last.note.starts_with("3 more"));
        assert_eq!(
            (last.reason.as_str(), last.action),
            ("ShardOpened", "Scale")
        );
    }
}
