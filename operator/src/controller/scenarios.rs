//! Exact API-call sequences of one sync, against a mocked API server (`tower-test`).
//!
//! Each [`Scenario`] names the sequence it expects; the fake server asserts every request's
//! method, URI and body in order and answers it; a timeout catches calls that never came.
//! A sync reads its pool, Sessions and pods from the watch cache, so the scenario's objects
//! are put in a [`Cache`] and every expected request is a write: a read fails the sequence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use super::Context;
use super::cache::Cache;
use super::fixtures;
use super::observe::NoLoad;
use super::pod::{pod_name, reflector_pod};
use super::reconcile::{sync, sync_coalesced};
use crate::crd::{ReflectorPool, Session};
use crate::metrics::OperatorMetrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NOW: u64 = 1_000_000;

/// The API-call sequences under test.
enum Scenario {
    /// A new pool with one region and nothing else: its first reflector pod is created
    /// with server-side apply, the pool's status says it is scaling up, and an Event says so.
    NewPoolCreatesItsFirstReflector(ReflectorPool),
    /// Two Sessions whose pool does not exist: each gets a `Degraded`/`PoolNotFound` status
    /// and a Warning Event, and the four requests are sent together (each is in flight
    /// before any is answered), not one after another.
    SessionsWithoutPoolAreDegradedTogether(Vec<Session>),
    /// A new pool that needs three reflectors at once: the three pods are applied
    /// together (each request is in flight before any is answered), not one after another.
    NewPodsAreAppliedTogether(ReflectorPool),
    /// A pool with two ready empty reflectors where one is enough, once the operator has
    /// waited [`crate::fleet::REPORT_WAIT`] for their loads: the surplus one is marked
    /// draining, then deleted with the drain grace period.
    SurplusReflectorIsMarkedThenDeletedWithGrace(ReflectorPool, Vec<Pod>),
    /// The same, with the surplus pod already deleted (the pod cache has not seen it go):
    /// the mark finds no pod, nothing is deleted, and the sync goes on to the pool's status
    /// and its Event instead of failing.
    SurplusReflectorAlreadyGoneIsSkipped(ReflectorPool),
    /// The same pool planned for the first time by a new leader whose reflectors have not
    /// reported yet: nothing is marked or deleted, only the pool's status is written.
    UnreportedReflectorsAreKeptByANewLeader(ReflectorPool),
}

struct ApiServerVerifier(Handle);

impl ApiServerVerifier {
    fn run(self, scenario: Scenario) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            match scenario {
                Scenario::NewPoolCreatesItsFirstReflector(pool) => {
                    self.new_pool_creates_its_first_reflector(pool).await
                }
                Scenario::NewPodsAreAppliedTogether(pool) => {
                    self.new_pods_are_applied_together(pool).await
                }
                Scenario::SessionsWithoutPoolAreDegradedTogether(sessions) => {
                    self.sessions_without_pool_are_degraded_together(sessions)
                        .await
                }
                Scenario::SurplusReflectorIsMarkedThenDeletedWithGrace(pool, pods) => {
                    self.surplus_reflector_is_drained(pool, pods).await
                }
                Scenario::SurplusReflectorAlreadyGoneIsSkipped(pool) => {
                    self.surplus_reflector_already_gone(pool).await
                }
                Scenario::UnreportedReflectorsAreKeptByANewLeader(pool) => {
                    self.unreported_reflectors_are_kept(pool).await
                }
            }
        })
    }

    /// Expects one request; asserts method and URI; answers `status` with `body`; returns
    /// the request body.
    async fn expect(&mut self, method: &str, uri: &str, status: u16, body: Value) -> Value {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method().as_str(), method, "method of {uri}");
        assert_eq!(request.uri().to_string(), uri);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        sent
    }

    /// Expects the server-side apply of pool `arena`'s status; returns the body sent.
    async fn expect_pool_status(&mut self, pool: &ReflectorPool) -> Value {
        let ns = "/apis/refleet.dev/v1alpha1/namespaces/games";
        self.expect(
            "PATCH",
            &format!("{ns}/reflectorpools/arena/status?&force=true&fieldManager=refleet-operator"),
            200,
            json!(pool),
        )
        .await
    }

    /// Expects one Event created in namespace `games`; returns the body sent.
    async fn expect_event(&mut self) -> Value {
        self.expect(
            "POST",
            "/apis/events.k8s.io/v1/namespaces/games/events?",
            201,
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null}),
        )
        .await
    }

    async fn new_pool_creates_its_first_reflector(mut self, pool: ReflectorPool) {
        let applied = self
            .expect(
                "PATCH",
                "/api/v1/namespaces/games/pods/arena-eu-0?&force=true&fieldManager=refleet-operator",
                200,
                json!(reflector_pod(&pool, &pool.spec.resolved_region("eu").unwrap(), "arena-eu-0")),
            )
            .await;
        assert_eq!(applied["metadata"]["labels"]["refleet.dev/region"], "eu");
        assert_eq!(applied["metadata"]["ownerReferences"][0]["name"], "arena");
        let status = self.expect_pool_status(&pool).await;
        assert_eq!(status["kind"], "ReflectorPool");
        let conditions = &status["status"]["conditions"];
        assert_eq!(conditions[0]["type"], "Ready");
        assert_eq!(conditions[0]["status"], "False");
        assert_eq!(conditions[1]["type"], "Progressing");
        assert_eq!(conditions[1]["reason"], "ScalingUp");
        assert_eq!(status["status"]["regions"][0]["desired"], 1);
        let event = self.expect_event().await;
        assert_eq!(event["reason"], "ScalingUp");
        assert_eq!(event["regarding"]["kind"], "ReflectorPool");
    }

    async fn new_pods_are_applied_together(mut self, pool: ReflectorPool) {
        let region = pool.spec.resolved_region("eu").unwrap();
        // All three requests arrive while none is answered: a sync that waited for each
        // answer before the next request would never send the second.
        let mut pending = Vec::new();
        for _ in 0..3 {
            let (request, send) = self.0.next_request().await.expect("a pod apply");
            assert_eq!(request.method().as_str(), "PATCH");
            pending.push((request.uri().path().to_owned(), send));
        }
        let mut paths: Vec<&str> = pending.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "/api/v1/namespaces/games/pods/arena-eu-0",
                "/api/v1/namespaces/games/pods/arena-eu-1",
                "/api/v1/namespaces/games/pods/arena-eu-2",
            ]
        );
        for (path, send) in pending {
            let name = path.rsplit('/').next().unwrap().to_owned();
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(
                        serde_json::to_vec(&reflector_pod(&pool, &region, &name)).unwrap(),
                    ))
                    .unwrap(),
            );
        }
        let status = self.expect_pool_status(&pool).await;
        assert_eq!(status["status"]["regions"][0]["desired"], 3);
        self.expect_event().await;
    }

    async fn sessions_without_pool_are_degraded_together(mut self, sessions: Vec<Session>) {
        let ns = "/apis/refleet.dev/v1alpha1/namespaces/games";
        // Every request arrives while none is answered: a sync that waited for each answer
        // before the next request would never send the second.
        let mut pending = Vec::new();
        for _ in 0..2 * sessions.len() {
            let (request, send) = self.0.next_request().await.expect("a status or an Event");
            let method = request.method().as_str().to_owned();
            let uri = request.uri().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            pending.push((method, uri, body, send));
        }
        let mut degraded = Vec::new();
        let mut warned = Vec::new();
        for (method, uri, body, send) in pending {
            let answer = if method == "PATCH" {
                let name = uri
                    .strip_prefix(&format!("{ns}/sessions/"))
                    .and_then(|rest| {
                        rest.strip_suffix("/status?&force=true&fieldManager=refleet-operator")
                    })
                    .unwrap_or_else(|| panic!("a Session status apply, not {uri}"));
                let conditions = &body["status"]["conditions"];
                assert_eq!(conditions[0]["reason"], "PoolNotFound");
                assert_eq!(conditions[2]["type"], "Degraded");
                assert_eq!(conditions[2]["status"], "True");
                assert_eq!(conditions[2]["reason"], "PoolNotFound");
                degraded.push(name.to_owned());
                let session = sessions
                    .iter()
                    .find(|s| s.metadata.name.as_deref() == Some(name));
                (200, json!(session.expect("one of the Sessions")))
            } else {
                assert_eq!(
                    (method.as_str(), uri.as_str()),
                    ("POST", "/apis/events.k8s.io/v1/namespaces/games/events?")
                );
                assert_eq!(body["reason"], "PoolNotFound");
                assert_eq!(body["type"], "Warning");
                warned.push(body["regarding"]["name"].as_str().unwrap().to_owned());
                (
                    201,
                    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null}),
                )
            };
            send.send_response(
                Response::builder()
                    .status(answer.0)
                    .body(Body::from(serde_json::to_vec(&answer.1).unwrap()))
                    .unwrap(),
            );
        }
        degraded.sort_unstable();
        warned.sort_unstable();
        assert_eq!(degraded, ["lobby", "lounge"]);
        assert_eq!(warned, ["lobby", "lounge"]);
    }

    async fn unreported_reflectors_are_kept(mut self, pool: ReflectorPool) {
        let status = self.expect_pool_status(&pool).await;
        let region = &status["status"]["regions"][0];
        assert_eq!(
            (&region["ready"], &region["draining"]),
            (&json!(2), &json!(0))
        );
    }

    async fn surplus_reflector_already_gone(mut self, pool: ReflectorPool) {
        self.expect(
            "PATCH",
            "/api/v1/namespaces/games/pods/arena-eu-1?",
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "pods \"arena-eu-1\" not found", "reason": "NotFound", "code": 404}),
        )
        .await;
        let status = self.expect_pool_status(&pool).await;
        assert_eq!(status["status"]["regions"][0]["ready"], 1);
        let event = self.expect_event().await;
        assert_eq!(event["reason"], "ReflectorDraining");
    }

    async fn surplus_reflector_is_drained(mut self, pool: ReflectorPool, pods: Vec<Pod>) {
        let mark = self
            .expect(
                "PATCH",
                "/api/v1/namespaces/games/pods/arena-eu-1?",
                200,
                json!(pods[1]),
            )
            .await;
        assert_eq!(mark["metadata"]["labels"]["refleet.dev/state"], "draining");
        assert_eq!(
            mark["metadata"]["annotations"]["refleet.dev/drain-deadline"],
            (NOW + 300).to_string()
        );
        let delete = self
            .expect(
                "DELETE",
                "/api/v1/namespaces/games/pods/arena-eu-1?",
                200,
                json!(pods[1]),
            )
            .await;
        assert_eq!(delete["gracePeriodSeconds"], 330);
        let status = self.expect_pool_status(&pool).await;
        assert_eq!(status["status"]["regions"][0]["draining"], 1);
        let event = self.expect_event().await;
        assert_eq!(event["reason"], "ReflectorDraining");
    }
}

fn testcontext() -> (Arc<Context>, ApiServerVerifier) {
    testcontext_with(|_| {})
}

fn testcontext_with(set: impl FnOnce(&mut Context)) -> (Arc<Context>, ApiServerVerifier) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let mut ctx = Context::new(
        client,
        "test",
        Arc::new(NoLoad),
        Arc::new(OperatorMetrics::new()),
    );
    ctx.clock = || NOW;
    set(&mut ctx);
    (Arc::new(ctx), ApiServerVerifier(handle))
}

async fn timeout_after_1s(handle: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded")
}

fn ready_pod(pool: &ReflectorPool, index: u32) -> Pod {
    let region = pool.spec.resolved_region("eu").unwrap();
    let mut pod = reflector_pod(pool, &region, &pod_name("arena", "eu", index));
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        pod_ip: Some("10.0.0.1".into()),
        ..Default::default()
    });
    pod
}

#[tokio::test]
async fn new_pool_creates_its_first_reflector() {
    let (ctx, fakeserver) = testcontext();
    let pool = fixtures::pool("games", "arena", &["eu"]);
    let cache = Cache::of(vec![pool.clone()], vec![], vec![]);
    let mocksrv = fakeserver.run(Scenario::NewPoolCreatesItsFirstReflector(pool));
    let synced = sync(&ctx, &cache, "games", "arena").await.expect("sync");
    assert_eq!(synced.created, ["arena-eu-0"]);
    timeout_after_1s(mocksrv).await;
}

#[tokio::test]
async fn a_pool_that_needs_several_reflectors_applies_their_pods_together() {
    let (ctx, fakeserver) = testcontext();
    let mut pool = fixtures::pool("games", "arena", &["eu"]);
    pool.spec.defaults.min_reflectors = Some(3);
    let cache = Cache::of(vec![pool.clone()], vec![], vec![]);
    let mocksrv = fakeserver.run(Scenario::NewPodsAreAppliedTogether(pool));
    // A sync that sends one apply at a time waits forever for an answer the mock holds back.
    let mut synced =
        tokio::time::timeout(Duration::from_secs(5), sync(&ctx, &cache, "games", "arena"))
            .await
            .expect("the three applies were sent together")
            .expect("sync");
    synced.created.sort_unstable();
    assert_eq!(synced.created, ["arena-eu-0", "arena-eu-1", "arena-eu-2"]);
    timeout_after_1s(mocksrv).await;
}

#[tokio::test]
async fn sessions_without_pool_are_degraded_and_warned_of_together() {
    let (ctx, fakeserver) = testcontext();
    let sessions = vec![
        fixtures::session("games", "lobby", "missing"),
        fixtures::session("games", "lounge", "missing"),
    ];
    let cache = Cache::of(vec![], sessions.clone(), vec![]);
    let mocksrv = fakeserver.run(Scenario::SessionsWithoutPoolAreDegradedTogether(sessions));
    // A sync that sends one request at a time waits forever for an answer the mock holds
    // back.
    let synced = tokio::time::timeout(
        Duration::from_secs(5),
        sync(&ctx, &cache, "games", "missing"),
    )
    .await
    .expect("the statuses and Events were sent together")
    .expect("sync");
    assert!(synced.created.is_empty());
    timeout_after_1s(mocksrv).await;
}

#[tokio::test]
async fn surplus_reflector_is_marked_draining_then_deleted_with_the_grace() {
    sync_with_a_surplus_reflector(Scenario::SurplusReflectorIsMarkedThenDeletedWithGrace).await;
}

#[tokio::test]
async fn a_surplus_reflector_already_deleted_does_not_fail_the_sync() {
    sync_with_a_surplus_reflector(|pool, _| Scenario::SurplusReflectorAlreadyGoneIsSkipped(pool))
        .await;
}

/// Syncs a pool with two ready empty reflectors where one is enough, the apiserver playing
/// `scenario`; the sync must succeed.
async fn sync_with_a_surplus_reflector(scenario: impl FnOnce(ReflectorPool, Vec<Pod>) -> Scenario) {
    let (ctx, fakeserver) = testcontext();
    // This operator has not heard from either reflector for the whole wait, and has planned
    // the pool for longer than the scale-down cool-down: no load (NoLoad) means the plan
    // alone decides.
    {
        let slot = ctx.pool_slot("games/arena");
        let mut memory = slot.memory.lock().await;
        memory.unheard_since = unheard_for_the_whole_wait();
        memory.initialised = true;
    }
    let pool = fixtures::pool("games", "arena", &["eu"]);
    let pods = vec![ready_pod(&pool, 0), ready_pod(&pool, 1)];
    let cache = Cache::of(vec![pool.clone()], vec![], pods.clone());
    let mocksrv = fakeserver.run(scenario(pool, pods));
    sync(&ctx, &cache, "games", "arena").await.expect("sync");
    timeout_after_1s(mocksrv).await;
}

/// The same surplus reflector, found by a leader's first plan of the pool (its wait for
/// reports over): the previous leader may have grown the region a second ago for shards
/// only it knew, so nothing is drained as surplus until a cool-down has passed.
#[tokio::test]
async fn a_new_leader_drains_no_surplus_reflector_for_a_cool_down() {
    let (ctx, fakeserver) = testcontext();
    ctx.pool_slot("games/arena")
        .memory
        .lock()
        .await
        .unheard_since = unheard_for_the_whole_wait();
    let pool = fixtures::pool("games", "arena", &["eu"]);
    let pods = vec![ready_pod(&pool, 0), ready_pod(&pool, 1)];
    let cache = Cache::of(vec![pool.clone()], vec![], pods);
    let mocksrv = fakeserver.run(Scenario::UnreportedReflectorsAreKeptByANewLeader(pool));
    let synced = sync(&ctx, &cache, "games", "arena").await.expect("sync");
    let held: Vec<_> = synced
        .plan
        .decisions
        .iter()
        .filter_map(|d| match d {
            refleet_core::planner::Decision::ScaleHeld { until, .. } => Some(*until),
            refleet_core::planner::Decision::DrainReflector { reflector, .. } => {
                panic!("{reflector} drained by a new leader")
            }
            _ => None,
        })
        .collect();
    assert_eq!(held, [NOW + 300], "{:?}", synced.plan.decisions);
    timeout_after_1s(mocksrv).await;
}

#[tokio::test]
async fn a_new_leader_keeps_ready_reflectors_it_has_not_heard_from() {
    let (ctx, fakeserver) = testcontext();
    let pool = fixtures::pool("games", "arena", &["eu"]);
    let pods = vec![ready_pod(&pool, 0), ready_pod(&pool, 1)];
    let cache = Cache::of(vec![pool.clone()], vec![], pods);
    let mocksrv = fakeserver.run(Scenario::UnreportedReflectorsAreKeptByANewLeader(pool));
    let synced = sync(&ctx, &cache, "games", "arena").await.expect("sync");
    assert!(
        synced.plan.decisions.is_empty(),
        "{:?}",
        synced.plan.decisions
    );
    timeout_after_1s(mocksrv).await;
    // Each reflector's wait starts now.
    let slot = ctx.pool_slot("games/arena");
    let unheard = slot.memory.lock().await.unheard_since.clone();
    assert_eq!(
        unheard,
        HashMap::from([
            ("arena-eu-0".to_owned(), NOW),
            ("arena-eu-1".to_owned(), NOW)
        ])
    );
}

/// Both ready reflectors of the surplus scenarios, unheard since one report wait ago.
fn unheard_for_the_whole_wait() -> HashMap<String, u64> {
    let since = NOW - crate::fleet::REPORT_WAIT;
    HashMap::from([
        ("arena-eu-0".to_owned(), since),
        ("arena-eu-1".to_owned(), since),
    ])
}

/// A ready pod whose report stream is live is not read over HTTP: its load comes from the
/// stream. The other is read as before.
#[tokio::test]
async fn a_pod_that_reports_on_its_stream_is_not_read_over_http() {
    let source = Arc::new(fixtures::Recording::default());
    let router = a_router();
    router.observe_report(&refleet_api::report::ReflectorReport {
        reflector: "arena-eu-0".into(),
        region: "eu".into(),
        state: 1,
        ..Default::default()
    });
    let (ctx, fakeserver) = testcontext_with(|ctx| {
        ctx.load = source.clone();
        ctx.router = Some(router);
    });
    let pool = fixtures::pool("games", "arena", &["eu"]);
    let pods = vec![ready_pod(&pool, 0), ready_pod(&pool, 1)];
    let cache = Cache::of(vec![pool.clone()], vec![], pods);
    let mocksrv = fakeserver.run(Scenario::UnreportedReflectorsAreKeptByANewLeader(pool));
    sync(&ctx, &cache, "games", "arena").await.expect("sync");
    timeout_after_1s(mocksrv).await;
    let read: Vec<String> = source
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(pod, _)| pod.clone())
        .collect();
    assert_eq!(read, ["arena-eu-1"]);
}

#[tokio::test]
async fn a_sync_on_caches_that_never_listed_fails_without_calling_the_api() {
    let (ctx, mut fakeserver) = testcontext();
    let error = sync(&ctx, &Cache::closed(), "games", "arena")
        .await
        .expect_err("a cache that never listed cannot be planned from");
    assert!(matches!(error, super::Error::CacheClosed), "{error:?}");
    assert_eq!(error.metric_label(), "cache_closed");
    let request = tokio::time::timeout(Duration::from_millis(200), fakeserver.0.next_request());
    assert!(request.await.is_err(), "no request may be sent");
}

#[tokio::test]
async fn a_reconcile_leaves_its_sync_to_one_already_waiting_for_the_pool() {
    use std::sync::atomic::Ordering;
    let (ctx, _fakeserver) = testcontext_with(|ctx| ctx.min_sync_interval = Duration::ZERO);
    let coalesced = |ctx: &Context| {
        let text = ctx.metrics.render();
        text.lines()
            .find(|l| {
                l.starts_with(r#"refleet_operator_syncs_coalesced_total{controller="session"}"#)
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    let slot = ctx.pool_slot("games/arena");
    let running = slot.memory.lock().await;
    let waiting = tokio::spawn({
        let ctx = ctx.clone();
        async move { sync_coalesced(&ctx, &Cache::closed(), "games", "arena", "reflectorpool").await }
    });
    while !slot.queued.load(Ordering::Acquire) {
        tokio::task::yield_now().await;
    }
    // Behind the waiting one: nothing to do, at once.
    let closed = Cache::closed();
    let behind = sync_coalesced(&ctx, &closed, "games", "arena", "session");
    let synced = tokio::time::timeout(Duration::from_secs(1), behind)
        .await
        .expect("returns without waiting for the pool's lock")
        .expect("left to the waiting sync");
    assert!(!synced, "it did not sync");
    assert_eq!(coalesced(&ctx).as_deref(), Some("1"));
    drop(running);
    let error = waiting.await.unwrap().expect_err("the waiting one syncs");
    assert!(matches!(error, super::Error::CacheClosed), "{error:?}");
    // Its sync failed, yet the flag is clear: the next reconcile syncs again.
    assert!(!slot.queued.load(Ordering::Acquire));
    let again = sync_coalesced(&ctx, &Cache::closed(), "games", "arena", "session").await;
    assert!(matches!(again, Err(super::Error::CacheClosed)), "{again:?}");
    assert_eq!(coalesced(&ctx).as_deref(), Some("1"));
}

#[tokio::test(start_paused = true)]
async fn a_pool_is_synced_at_most_once_a_second_unless_a_route_waits() {
    use tokio::time::Instant;
    let (router, ctx, _fakeserver) = paced_with_a_router();
    // A sync that fails still counts as started: the cache is read under the pace too.
    let closed = Cache::closed();
    let sync_now = || sync_coalesced(&ctx, &closed, "games", "arena", "reflectorpool");
    let start = Instant::now();
    assert!(matches!(sync_now().await, Err(super::Error::CacheClosed)));
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "the first sync is not paced"
    );
    assert!(matches!(sync_now().await, Err(super::Error::CacheClosed)));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "the next one waits for its turn"
    );

    let (waited, result) = sync_while_a_route_waits(&ctx, &router).await;
    assert!(
        matches!(result, Err(super::Error::CacheClosed)),
        "{result:?}"
    );
    assert_eq!(
        waited,
        Duration::ZERO,
        "a Route waiting for the backend ends the pace"
    );
}

/// A router, as the operator has one.
fn a_router() -> Arc<crate::router::Router> {
    use crate::router::{Router, RouterConfig, metrics::RouterMetrics};
    Router::new(
        RouterConfig::default(),
        None,
        RouterMetrics::new(&prometheus::Registry::new()),
    )
}

/// A context whose syncs keep a pace of one a second, with a router whose waiting Routes
/// may end it.
fn paced_with_a_router() -> (Arc<crate::router::Router>, Arc<Context>, ApiServerVerifier) {
    let router = a_router();
    let (ctx, fakeserver) = testcontext_with(|ctx| {
        ctx.min_sync_interval = Duration::from_secs(1);
        ctx.router = Some(router.clone());
    });
    (router, ctx, fakeserver)
}

/// Starts a sync of pool `games/arena` (on a closed cache), lets it wait for its pace,
/// has a Route wait for the backend, and returns how long the sync waited and its result.
async fn sync_while_a_route_waits(
    ctx: &Arc<Context>,
    router: &crate::router::Router,
) -> (Duration, super::Result<bool>) {
    let waiting = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            let closed = Cache::closed();
            let begun = tokio::time::Instant::now();
            let result = sync_coalesced(&ctx, &closed, "games", "arena", "session").await;
            (begun.elapsed(), result)
        }
    });
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    router.want_backend();
    waiting.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_route_that_waits_gets_a_sync_no_sooner_than_the_last_one_took_again() {
    use tokio::time::Instant;
    let (router, ctx, _fakeserver) = paced_with_a_router();
    // The last sync of the pool started now and took 300 ms (a big pool's plan).
    let slot = ctx.pool_slot(&crate::fleet::pool_id("games", "arena"));
    drop(slot.started());
    slot.times.lock().unwrap().took = Duration::from_millis(300);
    let (waited, result) = sync_while_a_route_waits(&ctx, &router).await;
    assert!(
        matches!(result, Err(super::Error::CacheClosed)),
        "{result:?}"
    );
    assert_eq!(
        waited,
        Duration::from_millis(600),
        "twice the last sync's duration after its start: syncs at most half the time"
    );

    // Without a Route waiting, the pace holds.
    let closed = Cache::closed();
    let before = Instant::now();
    slot.times.lock().unwrap().took = Duration::from_millis(300);
    let _ = sync_coalesced(&ctx, &closed, "games", "arena", "pool").await;
    assert_eq!(before.elapsed(), Duration::from_secs(1));
}

#[test]
fn error_labels_are_bounded() {
    use super::Error;
    let forbidden = Error::Kube(kube::Error::Api(
        kube::core::Status::failure("no", "Forbidden")
            .with_code(403)
            .boxed(),
    ));
    assert_eq!(forbidden.metric_label(), "forbidden");
    let ser = Error::Serialize(serde_json::from_str::<Value>("{").unwrap_err());
    assert_eq!(ser.metric_label(), "serialize");
}
