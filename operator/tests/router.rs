//! The router end to end over its real transports (gRPC, gRPC-Web, JSON), fed with a
//! published plan input and real report streams; no cluster needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message as _;
use refleet_api::report::reports_client::ReportsClient;
use refleet_api::report::{
    Capacity as ReportCapacity, HandOffResult, Instruction, ReflectorReport, ShardLoad,
};
use refleet_api::report_credential::ReportKey;
use refleet_api::routing::routing_client::RoutingClient;
use refleet_api::routing::{ListShardsRequest, RouteRequest, RouteResponse};
use refleet_api::token::{Signer, Verifier};
use refleet_core::planner::{
    self, Decision, ObservedReflector, PlanInput, PoolInput, ReflectorAction, ReflectorState,
    RegionInput, ShardPhase, ShardRecord,
};
use refleet_operator::crd::{Capacity, PlacementStrategy, SessionSpec};
use refleet_operator::fleet;
use refleet_operator::router::client::{self, TrustedProxies};
use refleet_operator::router::listen;
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::reports::{self, ReportHub};
use refleet_operator::router::service::{self, Access, Frontend};
use refleet_operator::router::{Caller, FleetView, RouteError, Router, RouterConfig, SessionDef};
use tonic_types::StatusExt;

const POOL: &str = "default/pool";

fn session(name: &str, cap: u32, max_shards: u32) -> SessionDef {
    let mut spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "poolRef": {"name": "pool"}, "appId": "app", "name": name,
        "maxUsersPerShard": cap, "scaleUpThreshold": 0.8, "maxShards": max_shards, "minShards": 0,
    }))
    .unwrap();
    spec.regions = Vec::new();
    SessionDef {
        namespace: "default".into(),
        spec,
        pool: POOL.into(),
        files_url: "http://files.test/files".into(),
    }
}

/// One pool, regions eu and us, one ready reflector per region with room for `shards` shards.
fn fleet_view(sessions: Vec<SessionDef>, shards: u32) -> FleetView {
    let capacity = Capacity {
        sessions: shards,
        users: shards * 100,
    };
    let region = |n: &str| RegionInput {
        name: n.into(),
        image: "img".into(),
        capacity,
        min_reflectors: 1,
        max_reflectors: 1,
        warm_buffer: 0,
        growth_buffer_seconds: 0,
    };
    let reflector = |n: &str, r: &str| ObservedReflector {
        name: n.into(),
        pool: POOL.into(),
        region: r.into(),
        image: "img".into(),
        capacity,
        state: ReflectorState::Ready,
        unreported: false,
    };
    FleetView {
        input: PlanInput {
            pools: vec![PoolInput {
                id: POOL.into(),
                placement: PlacementStrategy::Pack,
                regions: vec![region("eu"), region("us")],
                cooldown: 60,
                drain_grace: 30,
                moves: Default::default(),
            }],
            reflectors: vec![reflector("r-eu", "eu"), reflector("r-us", "us")],
            ..PlanInput::default()
        },
        sessions,
        urls: HashMap::from([
            ("r-eu".into(), "ws://eu.test/".into()),
            ("r-us".into(), "ws://us.test/".into()),
        ]),
        gateways: HashMap::new(),
    }
}

fn router(config: RouterConfig) -> (Arc<Router>, Signer) {
    let signer = Signer::new("k1", &[5; 32]);
    let r = Router::new(
        config,
        Some(signer.clone()),
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    (r, signer)
}

fn req(session: &str, region: &str) -> RouteRequest {
    RouteRequest {
        namespace: "default".into(),
        session: session.into(),
        preferred_region: region.into(),
        user_id: String::new(),
    }
}

async fn serve(frontend: Frontend) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(service::serve(listener, frontend, std::future::pending()));
    format!("http://{addr}")
}

#[tokio::test]
async fn a_burst_fills_shards_to_the_threshold_across_regions_and_tokens_verify() {
    let (r, signer) = router(RouterConfig::default());
    // 3 shards fit on each reflector: eu takes 3, then us.
    r.publish("local", fleet_view(vec![session("lobby", 10, 10)], 3));
    let calls = (0..40).map(|_| {
        let r = r.clone();
        tokio::spawn(async move { r.route(&req("lobby", "eu"), |_| Ok(())).await })
    });
    let mut per_shard: HashMap<String, (u32, String)> = HashMap::new();
    let mut verifier = Verifier::default();
    verifier.insert("k1", &signer.public_key()).unwrap();
    for c in calls {
        let a: RouteResponse = c.await.unwrap().unwrap();
        let claims = verifier.verify(&a.join_token).unwrap();
        assert_eq!(
            (
                claims.app_id.as_str(),
                claims.shard.as_str(),
                claims.max_users
            ),
            ("app", a.shard.as_str(), 10)
        );
        assert!(a.reflector_url.ends_with(&format!("/{}/", a.join_token)));
        assert_eq!(a.files_url, "http://files.test/files");
        let e = per_shard.entry(a.shard).or_insert((0, a.region));
        e.0 += 1;
    }
    // Threshold 8 of 10: five shards of 8, three in the preferred region, then two in us.
    assert_eq!(per_shard.len(), 5, "{per_shard:?}");
    assert!(per_shard.values().all(|(n, _)| *n == 8), "{per_shard:?}");
    assert_eq!(
        per_shard
            .values()
            .filter(|(_, region)| region == "eu")
            .count(),
        3
    );
    let listed = r.list_shards("default", "lobby").unwrap();
    assert!(
        listed
            .iter()
            .all(|s| s.reserved == 8 && s.threshold_users == 8 && s.max_users == 10)
    );
}

#[tokio::test]
async fn a_reset_mid_burst_never_overfills_a_shard() {
    // No reflector reports here: after the reset, shards open once the catch-up (one report
    // grace) has passed.
    let (r, _) = router(RouterConfig {
        report_grace: Duration::from_secs(1),
        ..RouterConfig::default()
    });
    r.publish("local", fleet_view(vec![session("lobby", 10, 20)], 20));
    let mut given: HashMap<String, u32> = HashMap::new();
    for _ in 0..12 {
        *given
            .entry(r.route(&req("lobby", ""), |_| Ok(())).await.unwrap().shard)
            .or_default() += 1;
    }
    // A new leader: state gone, the backend republishes what exists (shards without users yet).
    let mut again = fleet_view(vec![session("lobby", 10, 20)], 20);
    let mut input = again.input.clone();
    r.prepare(&mut input);
    r.reset();
    again.input.shards = r
        .list_shards("default", "lobby")
        .map(|_| input.shards.clone())
        .unwrap_or_default();
    r.publish("local", again);
    // Settings of a published shard come from its Session; another app's shard has none.
    assert_eq!(r.shard_settings("app", "lobby"), Some((10, true)));
    assert_eq!(r.shard_settings("other-app", "lobby"), None);
    for _ in 0..13 {
        let a = r.route(&req("lobby", ""), |_| Ok(())).await.unwrap();
        *given.entry(a.shard).or_default() += 1;
    }
    // Every token handed out before and after may still arrive: no shard may exceed 10.
    assert!(given.values().all(|n| *n <= 10), "{given:?}");
    assert_eq!(given.values().sum::<u32>(), 25, "no client refused");
}

#[tokio::test]
async fn every_transport_shares_one_path_and_every_error_code() {
    let (r, _) = router(RouterConfig {
        route_wait: Duration::from_millis(200),
        ..RouterConfig::default()
    });
    r.publish(
        "local",
        fleet_view(vec![session("lobby", 10, 1), session("other", 10, 1)], 1),
    );
    let keys = HashMap::from([
        ("key-app".to_owned(), "app".to_owned()),
        ("key-x".to_owned(), "x".to_owned()),
    ]);
    let leading = service::always_leading();
    let base = serve(Frontend {
        router: r.clone(),
        access: Arc::new(Access::new(keys, &["https://game.test".to_owned()], 1_000)),
        leading: leading.clone(),
    })
    .await;

    // gRPC, with the key in metadata.
    let mut grpc = RoutingClient::connect(base.clone()).await.unwrap();
    fn with_key<T>(k: &str, m: T) -> tonic::Request<T> {
        let mut q = tonic::Request::new(m);
        q.metadata_mut().insert("x-api-key", k.parse().unwrap());
        q
    }
    let ok = grpc
        .route(with_key("key-app", req("lobby", "eu")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((ok.shard.as_str(), ok.region.as_str()), ("lobby", "eu"));
    let code = |e: tonic::Status| e.code();
    assert_eq!(
        code(grpc.route(req("lobby", "eu")).await.unwrap_err()),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(
            grpc.route(with_key("nope", req("lobby", "eu")))
                .await
                .unwrap_err()
        ),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(
            grpc.route(with_key("key-x", req("lobby", "eu")))
                .await
                .unwrap_err()
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            grpc.route(with_key("key-app", req("missing", "eu")))
                .await
                .unwrap_err()
        ),
        tonic::Code::NotFound
    );
    let bad = grpc
        .route(with_key("key-app", req("lob~by", "eu")))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let details = bad.get_error_details();
    assert_eq!(
        details.bad_request().unwrap().field_violations[0].field,
        "session"
    );
    let bad_region = grpc
        .route(with_key("key-app", req("lobby", "mars")))
        .await
        .unwrap_err();
    assert_eq!(
        bad_region
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations[0]
            .field,
        "preferred_region"
    );
    // maxShards 1 and 8 places per shard: the ninth caller gets RESOURCE_EXHAUSTED + RetryInfo.
    for _ in 0..7 {
        grpc.route(with_key("key-app", req("lobby", "eu")))
            .await
            .unwrap();
    }
    let full = grpc
        .route(with_key("key-app", req("lobby", "eu")))
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted);
    assert!(
        full.get_error_details()
            .retry_info()
            .unwrap()
            .retry_delay
            .is_some()
    );
    let listed = grpc
        .list_shards(with_key(
            "key-app",
            ListShardsRequest {
                namespace: "default".into(),
                session: "lobby".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.shards[0].reserved, 8);
    assert_eq!(
        listed.shards[0].url, "ws://eu.test/",
        "the box URL, no token"
    );
    // ListShards is scoped like Route: no key, or another app's key, reads nothing.
    let list = |key: Option<&str>| {
        let mut req = tonic::Request::new(ListShardsRequest {
            namespace: "default".into(),
            session: "lobby".into(),
        });
        if let Some(k) = key {
            req.metadata_mut().insert("x-api-key", k.parse().unwrap());
        }
        let mut grpc = grpc.clone();
        async move { grpc.list_shards(req).await.map(|_| ()).unwrap_err().code() }
    };
    assert_eq!(list(None).await, tonic::Code::Unauthenticated);
    assert_eq!(list(Some("key-x")).await, tonic::Code::PermissionDenied);

    // JSON ListShards: the one shape of `GET /v1/shards` in both backends.
    let shards: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/v1/shards?namespace=default&session=lobby"))
        .header("x-api-key", "key-app")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shards["session"], "lobby");
    let s = &shards["shards"][0];
    assert_eq!(
        s,
        &serde_json::json!({
            "shard": "lobby", "state": "Open", "region": "eu", "reflector": "r-eu",
            "url": "ws://eu.test/", "filesUrl": listed.shards[0].files_url,
            "users": 0, "reserved": 8, "maxUsers": 10, "thresholdUsers": 8,
        })
    );

    // JSON: same answers, no-store, CORS for the allowed origin only, 429 with Retry-After.
    let http = reqwest::Client::new();
    let get = |q: &str, origin: Option<&str>| {
        let mut b = http
            .get(format!("{base}/v1/route?{q}"))
            .header("x-api-key", "key-app");
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.send()
    };
    let res = get(
        "namespace=default&session=other&region=us",
        Some("https://game.test"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://game.test"
    );
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(
        (
            body["shard"].as_str(),
            body["region"].as_str(),
            body["appId"].as_str()
        ),
        (Some("other"), Some("us"), Some("app"))
    );
    assert!(
        body["reflectorUrl"]
            .as_str()
            .unwrap()
            .starts_with("ws://us.test/")
    );
    assert!(body["tokenExpiresAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        get("namespace=default&session=other", Some("https://evil.test"))
            .await
            .unwrap()
            .status(),
        403
    );
    let res = get("namespace=default&session=lobby", None).await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(
        res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let res = get("namespace=Bad_NS&session=lobby", None).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["field"],
        "namespace"
    );
    assert_eq!(
        get("namespace=default&session=nothing", None)
            .await
            .unwrap()
            .status(),
        404
    );
    let res = http
        .get(format!("{base}/v1/route?namespace=default&session=other"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // gRPC-Web over HTTP/1.1: a framed request, a framed answer with grpc-status trailer.
    let msg = req("other", "eu").encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let res = http
        .post(format!("{base}/refleet.routing.v1.Routing/Route"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("x-api-key", "key-app")
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bytes = res.bytes().await.unwrap();
    assert_eq!(bytes[0], 0, "a data frame first");
    let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
    let answer = RouteResponse::decode(&bytes[5..5 + len]).unwrap();
    assert_eq!(answer.shard, "other");
    let trailer = String::from_utf8_lossy(&bytes[5 + len + 5..]);
    assert!(trailer.contains("grpc-status:0"), "{trailer}");

    // Only the leader routes.
    leading.store(false, Ordering::Relaxed);
    assert_eq!(
        code(
            grpc.route(with_key("key-app", req("other", "eu")))
                .await
                .unwrap_err()
        ),
        tonic::Code::Unavailable
    );
    assert_eq!(
        get("namespace=default&session=other", None)
            .await
            .unwrap()
            .status(),
        503
    );
}

#[tokio::test]
async fn reports_turn_reservations_into_users_and_a_lost_stream_stops_routes() {
    let (r, _) = router(RouterConfig {
        report_grace: Duration::from_millis(500),
        route_wait: Duration::from_millis(200),
        ..RouterConfig::default()
    });
    r.publish("local", fleet_view(vec![session("lobby", 10, 1)], 1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let key = ReportKey::new(&[7; 32]).unwrap();
    let credential = key.credential("r-eu", "eu").unwrap();
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(r.clone(), Some(key)),
        std::future::pending(),
    ));
    let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    let claims = {
        let mut v = Verifier::default();
        v.insert("k1", &Signer::new("k1", &[5; 32]).public_key())
            .unwrap();
        v.verify(&a.join_token).unwrap()
    };

    let mut client = ReportsClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    // Without a credential: refused.
    let (tx0, rx0) = tokio::sync::mpsc::channel::<ReflectorReport>(1);
    drop(tx0);
    let refused = client
        .report(tokio_stream::wrappers::ReceiverStream::new(rx0))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let (tx, rx) = tokio::sync::mpsc::channel::<ReflectorReport>(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    let report = |seq: u64, users: u32, admitted: Vec<u64>| ReflectorReport {
        reflector: "r-eu".into(),
        region: "eu".into(),
        public_url: "ws://eu.test/".into(),
        state: 1,
        capacity: Some(ReportCapacity {
            max_sessions: 1,
            max_users: 100,
        }),
        shards: vec![ShardLoad {
            session_id: "sid".into(),
            shard: "lobby".into(),
            app_id: "app".into(),
            users,
            joins: admitted.len() as u32,
            admitted_reservations: admitted,
            ..ShardLoad::default()
        }],
        sequence: seq,
        ..ReflectorReport::default()
    };
    tx.send(report(1, 0, vec![])).await.unwrap();
    let mut inbound = client.report(request).await.unwrap().into_inner();
    let keys = inbound.message().await.unwrap().unwrap();
    assert!(
        matches!(
            keys.kind,
            Some(refleet_api::report::instruction::Kind::TokenKeys(_))
        ),
        "token keys come first"
    );
    tx.send(report(2, 1, vec![claims.reservation_id]))
        .await
        .unwrap();
    // The reported shard's Session settings follow, once.
    let settings = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        settings.kind,
        Some(refleet_api::report::instruction::Kind::ShardSettings(
            refleet_api::report::ShardSettings {
                shard: "lobby".into(),
                max_users: 10,
                persistence: true,
            }
        ))
    );
    let listed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let s = r.list_shards("default", "lobby").unwrap();
            if s[0].users == 1 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(listed[0].reserved, 0, "the reservation became the user");
    assert_eq!(r.live_streams().get("eu"), Some(&1));
    // The stream ends: after the grace period no new routes go to r-eu.
    drop(tx);
    drop(inbound);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(r.live_streams().get("eu"), None);
    let e = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap_err();
    assert_eq!(e.code(), "RESOURCE_EXHAUSTED");
}

#[tokio::test]
async fn a_route_waits_for_a_shard_whose_reflector_is_still_starting() {
    let (r, _) = router(RouterConfig {
        route_wait: Duration::from_secs(5),
        ..RouterConfig::default()
    });
    // Room for one shard per reflector, and the region may grow to two.
    let mut fleet = fleet_view(vec![session("lobby", 10, 5)], 1);
    fleet.input.pools[0].regions[0].max_reflectors = 2;
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.reflectors.truncate(1);
    r.publish("local", fleet.clone());
    for _ in 0..8 {
        assert_eq!(
            r.route(&req("lobby", "eu"), |_| Ok(()))
                .await
                .unwrap()
                .shard,
            "lobby"
        );
    }
    // The ninth needs shard lobby~1 on a reflector that does not exist yet: it waits.
    let waiting = {
        let r = r.clone();
        tokio::spawn(async move { r.route(&req("lobby", "eu"), |_| Ok(())).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the Route waits for the new reflector"
    );
    // The backend starts the reflector and places the shard on it.
    let mut input = fleet.input.clone();
    r.prepare(&mut input);
    let pending = input
        .shards
        .iter()
        .find(|s| s.name == "lobby~1")
        .expect("the router opened lobby~1")
        .clone();
    assert!(pending.reflector.is_none());
    // A plan while the reflector is still starting: the shard is still pending, and the
    // waiting Route must keep waiting for it (not give up or open yet another shard).
    let mut starting = fleet.clone();
    starting.input.shards = input.shards.clone();
    let mut booting = starting.input.reflectors[0].clone();
    booting.name = "r-eu-2".into();
    booting.state = ReflectorState::Starting;
    starting.input.reflectors.push(booting);
    r.publish("local", starting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "still waiting while the reflector starts"
    );
    let mut next = fleet.clone();
    next.input.shards = input.shards.clone();
    for s in &mut next.input.shards {
        if s.name == "lobby~1" {
            s.reflector = Some("r-eu-2".into());
            s.phase = refleet_operator::crd::ShardPhase::Open;
        }
    }
    let mut second = next.input.reflectors[0].clone();
    second.name = "r-eu-2".into();
    next.input.reflectors.push(second);
    next.urls.insert("r-eu-2".into(), "ws://eu2.test/".into());
    r.publish("local", next);
    let a = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(a.shard, "lobby~1");
    assert!(a.reflector_url.starts_with("ws://eu2.test/"));
}

#[tokio::test]
async fn a_report_wakes_the_routes_waiting_on_its_reflector_and_no_others() {
    let (r, signer) = router(RouterConfig {
        route_wait: Duration::from_secs(5),
        ..RouterConfig::default()
    });
    let mut verifier = Verifier::default();
    verifier.insert("k1", &signer.public_key()).unwrap();
    // Room for one shard per reflector; eu may grow to two reflectors.
    let mut fleet = fleet_view(vec![session("lobby", 10, 5), session("hall", 10, 5)], 1);
    fleet.input.pools[0].regions[0].max_reflectors = 2;
    r.publish("local", fleet);
    let admitted = |answers: &[RouteResponse]| -> Vec<u64> {
        answers
            .iter()
            .map(|a| verifier.verify(&a.join_token).unwrap().reservation_id)
            .collect()
    };
    let load = shard_report;
    // hall fills r-us, lobby r-eu to its threshold; both reflectors report their users.
    let hall = vec![r.route(&req("hall", "us"), |_| Ok(())).await.unwrap()];
    let mut lobby = Vec::new();
    for _ in 0..8 {
        lobby.push(r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap());
    }
    assert!(lobby.iter().all(|a| a.shard == "lobby") && hall[0].shard == "hall");
    r.observe_report(&load("r-us", "us", "hall", 1, admitted(&hall)));
    r.observe_report(&load("r-eu", "eu", "lobby", 8, admitted(&lobby)));
    // The ninth lobby Route waits for a reflector that does not exist yet.
    let waiting = {
        let r = r.clone();
        tokio::spawn(async move { r.route(&req("lobby", "eu"), |_| Ok(())).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while r.metrics.waiting_routes() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Route never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let retries = |cause| r.metrics.route_retries(cause);
    // hall's reflector frees room, again and again: no lobby shard is there, nothing wakes.
    for users in [0, 1, 0, 1, 0] {
        r.observe_report(&load("r-us", "us", "hall", users, vec![]));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!((retries("session"), retries("fleet")), (0, 0));
    assert!(!waiting.is_finished());
    // lobby's own reflector frees room: its waiting Route is woken and takes it.
    r.observe_report(&load("r-eu", "eu", "lobby", 2, vec![]));
    let a = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(a.shard, "lobby");
    assert!(retries("session") >= 1, "woken by its session, not by time");
    assert_eq!(retries("fleet"), 0);
    assert_eq!(r.metrics.waiting_routes(), 0, "it left the waiting Routes");
}

#[tokio::test]
async fn a_user_routed_again_gets_the_same_place_and_token_per_session() {
    let (r, _) = router(RouterConfig::default());
    r.publish(
        "local",
        fleet_view(vec![session("lobby", 10, 4), session("hall", 10, 4)], 4),
    );
    let as_user = |s: &str, u: &str| RouteRequest {
        user_id: u.into(),
        ..req(s, "eu")
    };
    let first = r.route(&as_user("lobby", "ann"), |_| Ok(())).await.unwrap();
    let again = r.route(&as_user("lobby", "ann"), |_| Ok(())).await.unwrap();
    assert_eq!(
        again, first,
        "a repeated Route answers with the same place and token"
    );
    // The same user id in another session is another place.
    let hall = r.route(&as_user("hall", "ann"), |_| Ok(())).await.unwrap();
    assert_ne!(hall.join_token, first.join_token);
    let bob = r.route(&as_user("lobby", "bob"), |_| Ok(())).await.unwrap();
    assert_ne!(bob.join_token, first.join_token);
    // A session's total of one ListShards field.
    let total = |s: &str, field: fn(&refleet_api::routing::ShardInfo) -> u32| -> u32 {
        r.list_shards("default", s).unwrap().iter().map(field).sum()
    };
    let reserved = |s: &refleet_api::routing::ShardInfo| s.reserved;
    let users = |s: &refleet_api::routing::ShardInfo| s.users;
    assert_eq!((total("lobby", reserved), total("hall", reserved)), (2, 1));
    // Ann's reservation turns into a user: her next Route is a new reservation and token.
    let claims = {
        let mut v = Verifier::default();
        v.insert("k1", &Signer::new("k1", &[5; 32]).public_key())
            .unwrap();
        v.verify(&first.join_token).unwrap()
    };
    let load =
        |users: u32, admitted: Vec<u64>| shard_report("r-eu", "eu", &first.shard, users, admitted);
    r.observe_report(&load(1, vec![claims.reservation_id]));
    let third = r.route(&as_user("lobby", "ann"), |_| Ok(())).await.unwrap();
    assert_ne!(third.join_token, first.join_token);
    // A later report of the same reflector replaces its counts instead of adding to them.
    r.observe_report(&load(3, vec![]));
    r.observe_report(&load(3, vec![]));
    assert_eq!(total("lobby", users), 3);
    // A second reflector reporting the same shard (a move in progress) adds to it.
    r.observe_report(&ReflectorReport {
        reflector: "r-us".into(),
        region: "us".into(),
        ..load(2, vec![])
    });
    assert_eq!(total("lobby", users), 5);
}

#[tokio::test]
async fn a_report_naming_one_shard_twice_saturates_its_users_instead_of_overflowing() {
    // Found by the `reports` fuzz target (fuzz/tests/reports.rs): the per-report sum of a
    // shard listed twice overflowed u32 (a panic in a debug build, a tiny count in release).
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 10, 10)], 3));
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    let half = ShardLoad {
        shard: routed.shard.clone(),
        app_id: "app".into(),
        users: u32::MAX / 2 + 1,
        ..ShardLoad::default()
    };
    r.observe_report(&ReflectorReport {
        reflector: "r-eu".into(),
        region: "eu".into(),
        shards: vec![half.clone(), half],
        ..ReflectorReport::default()
    });
    let users: Vec<u32> = r
        .list_shards("default", "lobby")
        .unwrap()
        .iter()
        .map(|s| s.users)
        .collect();
    assert_eq!(users, vec![u32::MAX]);
}

/// `GET /v1/route` from a client bound to `from` (any 127.x address is loopback).
async fn json_route_from(
    base: &str,
    from: &str,
    session: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let http = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut b = http.get(format!(
        "{base}/v1/route?namespace=default&session={session}"
    ));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let res = b.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or_default())
}

#[tokio::test]
async fn anonymous_routes_can_neither_lock_a_session_nor_scale_it_up() {
    let (r, _) = router(RouterConfig::default());
    // Keys off (the old chart default); 4 shards of 8 places below the threshold each.
    r.publish(
        "local",
        fleet_view(vec![session("lobby", 10, 4), session("hall", 10, 4)], 4),
    );
    let base = serve(Frontend {
        router: r.clone(),
        access: Arc::new(Access::new(HashMap::new(), &[], 1_000)),
        leading: service::always_leading(),
    })
    .await;

    // One client asks 32 times: it gets a few places, then a 429 that says which limit.
    let mut answered = 0;
    let mut refusal = serde_json::Value::Null;
    for _ in 0..32 {
        match json_route_from(&base, "127.0.0.1", "lobby", &[]).await {
            (200, _) => answered += 1,
            (429, body) => refusal = body,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(answered, 4, "the per-client limit");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("limit per client without an API key: 4"),
        "{refusal}"
    );
    // A new user is routed.
    assert_eq!(
        json_route_from(&base, "127.0.0.2", "lobby", &[]).await.0,
        200
    );

    // 32 clients once each: every one is answered, the session opens no more than two shards
    // for them, and a new user still gets in.
    for i in 0..32 {
        let from = format!("127.0.1.{}", i + 1);
        assert_eq!(json_route_from(&base, &from, "hall", &[]).await.0, 200);
    }
    assert_eq!(
        json_route_from(&base, "127.0.0.3", "hall", &[]).await.0,
        200
    );
    let shards = r.list_shards("default", "hall").unwrap();
    assert!(shards.len() <= 2, "{shards:?}");
    let held: u32 = shards.iter().map(|s| s.reserved).sum();
    assert!(
        held <= 8,
        "anonymous callers hold at most half the free places: {shards:?}"
    );
}

#[tokio::test]
async fn an_unused_reservation_is_released_after_the_claim_window_and_keyed_callers_are_not_capped()
{
    let (r, _) = router(RouterConfig {
        claim_window: Duration::from_millis(300),
        max_per_client: 2,
        ..RouterConfig::default()
    });
    r.publish("local", fleet_view(vec![session("lobby", 10, 4)], 4));
    let anon = Caller::Anonymous("198.51.100.7".parse().unwrap());
    let reserved = || -> u32 {
        r.list_shards("default", "lobby")
            .unwrap()
            .iter()
            .map(|s| s.reserved)
            .sum()
    };
    let first = r
        .route_as(&req("lobby", "eu"), &anon, |_| Ok(()))
        .await
        .unwrap();
    // The token outlives the claim window: a late join is still admitted by the reflector.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(first.token_expires_at.unwrap().seconds >= now + 50);
    r.route_as(&req("lobby", "eu"), &anon, |_| Ok(()))
        .await
        .unwrap();
    let e = r
        .route_as(&req("lobby", "eu"), &anon, |_| Ok(()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "RESOURCE_EXHAUSTED");
    // A user routed again keeps the place it holds, even at the limit.
    let ann = RouteRequest {
        user_id: "ann".into(),
        ..req("lobby", "eu")
    };
    let other = Caller::Anonymous("198.51.100.8".parse().unwrap());
    let a1 = r.route_as(&ann, &other, |_| Ok(())).await.unwrap();
    r.route_as(&req("lobby", "eu"), &other, |_| Ok(()))
        .await
        .unwrap();
    assert_eq!(r.route_as(&ann, &other, |_| Ok(())).await.unwrap(), a1);
    // A caller with a known key is the app's: no per-client limit.
    let keyed = Caller::Keyed("app".into());
    for _ in 0..6 {
        r.route_as(&req("lobby", "eu"), &keyed, |_| Ok(()))
            .await
            .unwrap();
    }
    assert_eq!(reserved(), 10);
    assert_eq!(r.metrics.reservations("eu"), 10);
    // Nobody joins: the places come back after the claim window, and the client may route again.
    tokio::time::timeout(Duration::from_secs(10), async {
        while reserved() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("reservations released");
    // The next plan (any backend's) sets the gauge back to what the ledger holds.
    r.publish("local", fleet_view(vec![session("lobby", 10, 4)], 4));
    assert_eq!(r.metrics.reservations("eu"), 0);
    r.route_as(&req("lobby", "eu"), &anon, |_| Ok(()))
        .await
        .unwrap();
}

/// A per-client quota of 2 calls, refilled once a minute.
fn two_a_minute() -> governor::Quota {
    governor::Quota::with_period(Duration::from_secs(60))
        .unwrap()
        .allow_burst(std::num::NonZeroU32::new(2).unwrap())
}

#[tokio::test]
async fn unknown_api_keys_count_against_their_address_not_a_bucket_of_their_own() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 10, 4)], 4));
    let keys = HashMap::from([("key-app".to_owned(), "app".to_owned())]);
    // Bursts of 2, refilled once a minute: the third call is over the limit however slowly
    // the calls arrive.
    let keyed = serve(Frontend {
        router: r.clone(),
        access: Arc::new(Access::new(keys, &[], 1).limiting(two_a_minute())),
        leading: service::always_leading(),
    })
    .await;
    let statuses = |base: String, from: &'static str| async move {
        let mut out = Vec::new();
        for i in 0..3 {
            let key = format!("random-{i}-{}", rand::random::<u64>());
            out.push(
                json_route_from(&base, from, "lobby", &[("x-api-key", key.as_str())])
                    .await
                    .0,
            );
        }
        out
    };
    assert_eq!(statuses(keyed.clone(), "127.0.0.1").await, [401, 401, 429]);
    // A known key has its own bucket.
    assert_eq!(
        json_route_from(&keyed, "127.0.0.1", "lobby", &[("x-api-key", "key-app")])
            .await
            .0,
        200
    );
    // Keys off: a presented key means nothing, the address is the client.
    let open = serve(Frontend {
        router: r.clone(),
        access: Arc::new(Access::new(HashMap::new(), &[], 1).limiting(two_a_minute())),
        leading: service::always_leading(),
    })
    .await;
    assert_eq!(statuses(open, "127.0.0.2").await, [200, 200, 429]);
}

/// Serves a router whose only limit on Routes is `access` (no reservation limits) and that
/// knows Session `lobby` (cap 10, 4 shards); returns its base URL.
async fn serve_lobby_limited_by(access: Access) -> String {
    let (r, _) = router(RouterConfig {
        max_per_client: 0,
        anonymous_share: 1.0,
        ..RouterConfig::default()
    });
    r.publish("local", fleet_view(vec![session("lobby", 10, 4)], 4));
    serve(Frontend {
        router: r,
        access: Arc::new(access),
        leading: service::always_leading(),
    })
    .await
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() {
    let proxies = TrustedProxies::new(vec![client::parse_proxy("127.0.0.1").unwrap()]);
    let base = serve_lobby_limited_by(
        Access::new(HashMap::new(), &[], 1)
            .limiting(two_a_minute())
            .trusting(proxies),
    )
    .await;
    let via = |from: &'static str, client: &'static str| {
        let base = base.clone();
        async move {
            json_route_from(&base, from, "lobby", &[("x-forwarded-for", client)])
                .await
                .0
        }
    };
    // From the proxy: the forwarded address is the client.
    assert_eq!(via("127.0.0.1", "198.51.100.1").await, 200);
    assert_eq!(via("127.0.0.1", "198.51.100.1").await, 200);
    assert_eq!(via("127.0.0.1", "198.51.100.1").await, 429);
    assert_eq!(via("127.0.0.1", "198.51.100.2").await, 200);
    // A spoofed left-most entry does not make a new client.
    assert_eq!(via("127.0.0.1", "6.6.6.6, 198.51.100.1").await, 429);
    // From anyone else the header is ignored.
    assert_eq!(via("127.0.0.5", "198.51.100.3").await, 200);
    assert_eq!(via("127.0.0.5", "198.51.100.4").await, 200);
    assert_eq!(via("127.0.0.5", "198.51.100.5").await, 429);
}

/// Over gRPC as over JSON, a caller without an API key is limited by its own address: one
/// client spending its limit leaves another's untouched. (The gRPC handlers read the
/// address from tonic's connection info, which a plain axum server never set: every
/// anonymous gRPC caller shared one bucket, and one of them could starve the rest.)
#[tokio::test]
async fn grpc_callers_without_a_key_are_limited_by_their_own_address() {
    let base =
        serve_lobby_limited_by(Access::new(HashMap::new(), &[], 1).limiting(two_a_minute())).await;
    let client_from = |from: &'static str| {
        let base = base.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(base)
                .unwrap()
                .local_address(Some(from.parse().unwrap()))
                .connect()
                .await
                .unwrap();
            RoutingClient::new(channel)
        }
    };
    // Clones share their connection, so each group of three calls comes from one address.
    let (a, b) = (
        client_from("127.0.0.1").await,
        client_from("127.0.0.2").await,
    );
    let mut codes = Vec::new();
    for mut client in [a.clone(), a.clone(), a, b.clone(), b.clone(), b] {
        let code = match client.route(req("lobby", "eu")).await {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        codes.push(code);
    }
    use tonic::Code::{Ok as Answered, ResourceExhausted as Limited};
    assert_eq!(
        codes,
        [Answered, Answered, Limited, Answered, Answered, Limited]
    );
}

// === The router's HTTP/2 server under cancelled calls ===

/// Bytes of an HTTP/2 frame: its 9-byte header and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A gRPC Route call's HEADERS block (HPACK: POST, http, then `:path`, `:authority`,
/// `content-type` and `te` as literals without indexing), so the router takes it for a call.
fn route_headers() -> Vec<u8> {
    let mut block = vec![0x83, 0x86];
    let literal = |block: &mut Vec<u8>, index: u8, value: &str| {
        if index < 15 {
            block.push(index);
        } else {
            block.extend_from_slice(&[0x0f, index - 15]);
        }
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    };
    literal(&mut block, 4, "/refleet.routing.v1.Routing/Route");
    literal(&mut block, 1, "router.test");
    literal(&mut block, 31, "application/grpc");
    block.extend_from_slice(&[0x00, 0x02]);
    block.extend_from_slice(b"te");
    block.push(8);
    block.extend_from_slice(b"trailers");
    block
}

/// Opens an h2c connection to `addr`, sends `cancelled` Route calls each reset in the
/// same write as it opened (so the router reads each reset before it has taken the call up),
/// then one more call; returns what the router answered: `Some(error code)` of a GOAWAY
/// that closed the connection for it, or `None` if the last call got its response headers.
async fn cancel_calls_before_the_router_takes_them(addr: &str, cancelled: u32) -> Option<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[]));
    let headers = route_headers();
    for i in 0..cancelled {
        let stream = 1 + 2 * i;
        out.extend(h2_frame(0x1, 0x4, stream, &headers));
        out.extend(h2_frame(0x3, 0, stream, &8u32.to_be_bytes()));
    }
    let last = 1 + 2 * cancelled;
    out.extend(h2_frame(0x1, 0x4, last, &headers));
    // An empty Route message (5-byte gRPC prefix), ending the call's request.
    out.extend(h2_frame(0x0, 0x1, last, &[0, 0, 0, 0, 0]));
    tcp.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Frames read so far: a GOAWAY ends it, the last call's HEADERS answer it.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = (usize::from(buf[at]) << 16)
                | (usize::from(buf[at + 1]) << 8)
                | usize::from(buf[at + 2]);
            if buf.len() < at + 9 + len {
                break;
            }
            let (kind, payload) = (buf[at + 3], &buf[at + 9..at + 9 + len]);
            let stream = u32::from_be_bytes(buf[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
            if kind == 0x7 {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            if kind == 0x1 && stream == last {
                return None;
            }
            at += 9 + len;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("the router neither answered nor closed the connection")
            .unwrap();
        assert!(n > 0, "closed without a GOAWAY");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client that cancels many calls at once (an app backend whose Routes waited for a new
/// shard, read by a busy router in one go) keeps its connection and its other calls: the
/// router allows [`listen::PENDING_ACCEPT_RESETS`] such resets at a time, where hyper's
/// default of 20 closed the connection with every call on it (docs/scale.md, run G6). A
/// flood past that is still closed with `ENHANCE_YOUR_CALM`.
#[tokio::test]
async fn many_calls_cancelled_at_once_do_not_close_the_connection_but_a_flood_does() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 10, 4)], 4));
    let base = serve(Frontend {
        router: r.clone(),
        access: Arc::new(Access::new(HashMap::new(), &[], 1_000_000)),
        leading: service::always_leading(),
    })
    .await;
    let addr = base.trim_start_matches("http://");
    assert_eq!(
        cancel_calls_before_the_router_takes_them(addr, 150).await,
        None,
        "150 calls reset before they were taken up closed the connection"
    );
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let flood = u32::try_from(listen::PENDING_ACCEPT_RESETS).unwrap() + 1000;
    assert_eq!(
        cancel_calls_before_the_router_takes_them(addr, flood).await,
        Some(ENHANCE_YOUR_CALM)
    );
}

// === The report stream's identity and the expiry of reported load (issue #16, 11 and 12) ===

/// Serves a report hub for `r` on a loopback port.
async fn report_hub(r: &Arc<Router>, key: Option<ReportKey>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(r.clone(), key),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

/// A report of `reflector` in `region` with `users` on `shard` of app `app`, that admitted
/// the reservations `admitted` since its last.
fn shard_report(
    reflector: &str,
    region: &str,
    shard: &str,
    users: u32,
    admitted: Vec<u64>,
) -> ReflectorReport {
    ReflectorReport {
        reflector: reflector.into(),
        region: region.into(),
        public_url: format!("ws://{reflector}.test/"),
        state: 1,
        shards: vec![ShardLoad {
            shard: shard.into(),
            app_id: "app".into(),
            users,
            joins: admitted.len() as u32,
            admitted_reservations: admitted,
            ..ShardLoad::default()
        }],
        ..ReflectorReport::default()
    }
}

/// A report of `reflector` in `region` with `users` on shard `lobby`.
fn lobby_report(reflector: &str, region: &str, seq: u64, users: u32) -> ReflectorReport {
    ReflectorReport {
        reflector: reflector.into(),
        region: region.into(),
        public_url: format!("ws://{reflector}.test/"),
        state: 1,
        shards: vec![ShardLoad {
            session_id: "sid".into(),
            shard: "lobby".into(),
            app_id: "app".into(),
            users,
            ..ShardLoad::default()
        }],
        sequence: seq,
        ..ReflectorReport::default()
    }
}

/// A reflector's side of one report stream, as `refleet-reflector` opens it: the first report
/// goes out with the call.
struct Stream {
    tx: tokio::sync::mpsc::Sender<ReflectorReport>,
    inbound: tonic::Streaming<Instruction>,
}

async fn open(
    url: &str,
    bearer: Option<&str>,
    first: ReflectorReport,
) -> Result<Stream, tonic::Status> {
    let mut client = ReportsClient::connect(url.to_owned()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<ReflectorReport>(4);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(b) = bearer {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {b}").parse().unwrap());
    }
    tx.send(first).await.unwrap();
    let inbound = client.report(request).await?.into_inner();
    Ok(Stream { tx, inbound })
}

impl Stream {
    /// How the operator ends this stream: the status it sends, or `None` when it just closes.
    async fn ended(mut self) -> Option<tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match self.inbound.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the operator ends the stream")
    }
}

/// Waits until `f` holds (polling; the bound only stops a broken test).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn lobby_users(r: &Router) -> u32 {
    r.list_shards("default", "lobby")
        .unwrap()
        .iter()
        .map(|s| s.users)
        .sum()
}

#[tokio::test]
async fn a_report_stream_speaks_for_its_own_reflector_and_clients_go_to_the_assigned_url() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 100, 1)], 1));
    let key = ReportKey::new(&[7; 32]).unwrap();
    let url = report_hub(&r, Some(key.clone())).await;
    let eu = key.credential("r-eu", "eu").unwrap();

    // The old shared secret, another operator's credential, none at all: refused.
    let other = ReportKey::new(&[8; 32])
        .unwrap()
        .credential("r-eu", "eu")
        .unwrap();
    for (bearer, reason) in [
        (Some("s3cret"), "malformed_credential"),
        (Some(other.as_str()), "bad_credential"),
        (None, "missing_credential"),
    ] {
        let refused = open(&url, bearer, lobby_report("r-eu", "eu", 1, 0)).await;
        assert_eq!(
            refused.err().map(|s| s.code()),
            Some(tonic::Code::Unauthenticated),
            "{bearer:?}"
        );
        assert_eq!(r.metrics.report_refusals(reason), 1, "{reason}");
    }

    // r-eu's credential cannot report for r-us, nor put r-eu in another region.
    let s = open(&url, Some(eu.as_str()), lobby_report("r-us", "us", 1, 0))
        .await
        .unwrap();
    assert_eq!(
        s.ended().await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "us", 1, 0))
        .await
        .unwrap();
    assert_eq!(
        s.ended().await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(r.metrics.report_refusals("other_reflector"), 1);
    assert_eq!(r.metrics.report_refusals("wrong_region"), 1);
    // Nor rename itself on a later report.
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 0))
        .await
        .unwrap();
    s.tx.send(lobby_report("r-us", "us", 2, 0)).await.unwrap();
    assert_eq!(
        s.ended().await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(r.live_streams().get("us"), None, "no stream counted for us");

    // r-eu itself proposes an attacker's URL: clients still go where the operator placed it.
    let mut evil = lobby_report("r-eu", "eu", 1, 0);
    evil.public_url = "ws://127.0.0.1:9499/attacker/".into();
    let s = open(&url, Some(eu.as_str()), evil).await.unwrap();
    until("r-eu's stream", || r.live_streams().get("eu") == Some(&1)).await;
    for _ in 0..10 {
        let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
        assert!(
            a.reflector_url.starts_with("ws://eu.test/"),
            "{}",
            a.reflector_url
        );
    }
    drop(s);
}

#[tokio::test]
async fn a_lost_or_silent_streams_load_expires_after_the_grace_period() {
    let (r, _) = router(RouterConfig {
        report_grace: Duration::from_millis(500),
        route_wait: Duration::from_millis(100),
        ..RouterConfig::default()
    });
    // One shard at most, 500 users at most: 500 reported users make the session full.
    let mut fleet = fleet_view(vec![session("lobby", 500, 1)], 5);
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.reflectors.truncate(1);
    r.publish("local", fleet.clone());
    let key = ReportKey::new(&[7; 32]).unwrap();
    let url = report_hub(&r, Some(key.clone())).await;
    let eu = key.credential("r-eu", "eu").unwrap();
    let planned_users = |r: &Router| {
        let mut input = fleet.input.clone();
        r.prepare(&mut input);
        input.shards.iter().map(|s| s.users).sum::<u32>()
    };
    assert_eq!(
        r.route(&req("lobby", "eu"), |_| Ok(()))
            .await
            .unwrap()
            .shard,
        "lobby"
    );

    // 500 users, then the stream closes: after the grace period they no longer count.
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 500))
        .await
        .unwrap();
    until("500 users", || lobby_users(&r) == 500).await;
    assert_eq!(
        r.route(&req("lobby", "eu"), |_| Ok(()))
            .await
            .unwrap_err()
            .code(),
        "RESOURCE_EXHAUSTED",
        "full"
    );
    drop(s);
    until("the lost stream's users to expire", || lobby_users(&r) == 0).await;
    assert_eq!(
        planned_users(&r),
        0,
        "the planner no longer sees them either"
    );
    // The reflector reconnects with its real load: it gets routes again.
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 3))
        .await
        .unwrap();
    until("3 users", || lobby_users(&r) == 3).await;
    assert_eq!(
        r.route(&req("lobby", "eu"), |_| Ok(()))
            .await
            .unwrap()
            .shard,
        "lobby"
    );

    // A stream that stays open but goes silent is closed, and its load expires too.
    s.tx.send(lobby_report("r-eu", "eu", 2, 500)).await.unwrap();
    until("500 users", || lobby_users(&r) == 500).await;
    // (The reflector's side stays open: it just sends nothing more.)
    let tx = s.tx.clone();
    let status = s.ended().await;
    assert_eq!(status.map(|s| s.code()), Some(tonic::Code::Unavailable));
    assert_eq!(r.metrics.report_refusals("silent"), 1);
    until("the silent stream's users to expire", || {
        lobby_users(&r) == 0
    })
    .await;
    drop(tx);
}

#[tokio::test]
async fn an_unauthenticated_stream_is_pinned_to_its_first_reflector_and_a_known_region() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 100, 1)], 1));
    let url = report_hub(&r, None).await;
    assert_eq!(
        r.route(&req("lobby", "eu"), |_| Ok(()))
            .await
            .unwrap()
            .shard,
        "lobby"
    );
    // A region no pool has is refused (the region label stays bounded).
    let s = open(&url, None, lobby_report("r-x", "mars", 1, 0))
        .await
        .unwrap();
    assert_eq!(
        s.ended().await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(r.metrics.report_refusals("unknown_region"), 1);
    assert!(!r.live_streams().contains_key("mars"));
    // The first report binds the stream: a later one about another reflector closes it.
    let s = open(&url, None, lobby_report("r-eu", "eu", 1, 7))
        .await
        .unwrap();
    until("7 users", || lobby_users(&r) == 7).await;
    s.tx.send(lobby_report("r-us", "us", 2, 0)).await.unwrap();
    assert_eq!(
        s.ended().await.map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(r.metrics.report_refusals("other_reflector"), 1);
    assert_eq!(r.live_streams().get("us"), None);
}

#[tokio::test]
async fn a_report_stream_cut_and_restored_counts_its_load_once() {
    let grace = Duration::from_millis(600);
    let (r, _) = router(RouterConfig {
        report_grace: grace,
        ..RouterConfig::default()
    });
    let mut fleet = fleet_view(vec![session("lobby", 500, 1)], 5);
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.reflectors.truncate(1);
    r.publish("local", fleet);
    let key = ReportKey::new(&[7; 32]).unwrap();
    let url = report_hub(&r, Some(key.clone())).await;
    let eu = key.credential("r-eu", "eu").unwrap();
    // The first Route opens shard `lobby` on `r-eu`.
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(routed.shard, "lobby");
    // Reports every 100 ms on `s`, as a reflector does, from sequence `from` on.
    let keep_reporting = |s: &Stream, from: u64, users: u32| {
        let tx = s.tx.clone();
        tokio::spawn(async move {
            for seq in from.. {
                if tx
                    .send(lobby_report("r-eu", "eu", seq, users))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Holds for three grace periods that the load is exactly `users`, never doubled or lost.
    let holds = |users: u32| {
        let r = r.clone();
        async move {
            let end = tokio::time::Instant::now() + grace * 3;
            while tokio::time::Instant::now() < end {
                assert_eq!(lobby_users(&r), users, "the reflector's load counts once");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    let first = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 40))
        .await
        .unwrap();
    let reporting = keep_reporting(&first, 2, 40);
    until("40 users", || lobby_users(&r) == 40).await;

    // The connection is cut and the reflector reconnects at once, within the grace period.
    reporting.abort();
    drop(first);
    let second = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 100, 40))
        .await
        .unwrap();
    let reporting = keep_reporting(&second, 101, 40);
    holds(40).await;
    assert_eq!(r.live_streams().values().sum::<u32>(), 1, "one live stream");

    // A reflector that reconnects before the operator has seen its old stream end (both open
    // at once, the old one ending later) is still counted once, and stays counted.
    let third = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 500, 41))
        .await
        .unwrap();
    let reporting_third = keep_reporting(&third, 501, 41);
    reporting.abort();
    until("41 users", || lobby_users(&r) == 41).await;
    drop(second);
    holds(41).await;
    assert_eq!(r.live_streams().values().sum::<u32>(), 1, "one live stream");
    // What a backend takes for a reflector it cannot read itself: its hosted shards, once.
    assert_eq!(
        r.reported_hosts(),
        HashMap::from([("r-eu".to_owned(), vec![("app".into(), "lobby".into(), 41)])])
    );
    reporting_third.abort();
}

// === Moves: the router carries out the planner's moves over the report streams (#12) ===

/// A view with `lobby` placed on `r-eu`, moving to `r-eu-2` (both ready in region eu).
fn moving_view() -> FleetView {
    let mut fleet = fleet_view(vec![session("lobby", 100, 1)], 5);
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.pools[0].regions[0].max_reflectors = 2;
    fleet.input.reflectors.truncate(1);
    let mut second = fleet.input.reflectors[0].clone();
    second.name = "r-eu-2".into();
    fleet.input.reflectors.push(second);
    fleet.urls.insert("r-eu-2".into(), "ws://eu2.test/".into());
    fleet.input.shards = vec![ShardRecord {
        session: "default/app/lobby".into(),
        name: "lobby".into(),
        index: 0,
        pool: POOL.into(),
        region: "eu".into(),
        reflector: Some("r-eu".into()),
        committed_users: 100,
        users: 0,
        reserved: 0,
        phase: ShardPhase::Moving,
        empty_since: None,
        moving_to: Some("r-eu-2".into()),
        moved_at: None,
    }];
    fleet.input.now = 1_000;
    fleet
}

impl Stream {
    /// The first instruction on this stream that `pick` takes (others are skipped).
    async fn next_instruction<T>(
        &mut self,
        what: &str,
        pick: impl Fn(refleet_api::report::instruction::Kind) -> Option<T>,
    ) -> T {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let i = self.inbound.message().await.unwrap().expect("stream open");
                if let Some(t) = i.kind.and_then(&pick) {
                    return t;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {what} on the stream"))
    }

    /// The next HandOff instruction on this stream.
    async fn hand_off(&mut self) -> refleet_api::report::HandOff {
        self.next_instruction("hand-off", |k| match k {
            refleet_api::report::instruction::Kind::HandOff(h) => Some(h),
            _ => None,
        })
        .await
    }
}

fn lobby_shard(r: &Router) -> refleet_api::routing::ShardInfo {
    r.list_shards("default", "lobby").unwrap().remove(0)
}

#[tokio::test]
async fn a_move_is_asked_of_its_source_and_lands_on_the_target_at_once() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", moving_view());
    let url = report_hub(&r, None).await;
    assert_eq!(lobby_shard(&r).state, "Moving");
    assert_eq!(
        r.placement("app", "lobby"),
        Err(refleet_operator::router::PlacementError::Moving),
        "gateways hold new connections (503) while it moves"
    );
    // The source reports first: the target is not reporting yet, so nothing is asked.
    let mut source = open(&url, None, lobby_report("r-eu", "eu", 1, 7))
        .await
        .unwrap();
    until("the move is tracked", || {
        r.move_of("default/app/lobby", "lobby").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        r.move_of("default/app/lobby", "lobby")
            .unwrap()
            .asked
            .is_none(),
        "not asked before the target reports"
    );
    let mut idle = lobby_report("r-eu-2", "eu", 1, 0);
    idle.shards.clear();
    let target = open(&url, None, idle).await.unwrap();
    let h = source.hand_off().await;
    assert_eq!((h.app_id.as_str(), h.shard.as_str()), ("app", "lobby"));
    // The target is told to take the shard (it may have handed it off itself earlier).
    let mut target = target;
    let accepted = target
        .next_instruction("Accept", |k| match k {
            refleet_api::report::instruction::Kind::Accept(a) => Some(a),
            _ => None,
        })
        .await;
    assert_eq!(
        (accepted.app_id.as_str(), accepted.shard.as_str()),
        ("app", "lobby")
    );
    // Only the source's word lands the move: the target claiming it does nothing.
    let mut claim = lobby_report("r-eu-2", "eu", 2, 0);
    claim.shards.clear();
    claim.hand_offs = vec![HandOffResult {
        move_id: h.move_id,
        app_id: "app".into(),
        shard: "lobby".into(),
        stored: true,
        error: String::new(),
    }];
    target.tx.send(claim).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lobby_shard(&r).reflector, "r-eu");
    // The source stored it: the published view points at the target at once.
    let mut done = lobby_report("r-eu", "eu", 2, 0);
    done.shards.clear();
    done.hand_offs = vec![HandOffResult {
        move_id: h.move_id,
        app_id: "app".into(),
        shard: "lobby".into(),
        stored: true,
        error: String::new(),
    }];
    source.tx.send(done).await.unwrap();
    until("the shard is on r-eu-2", || {
        lobby_shard(&r).reflector == "r-eu-2"
    })
    .await;
    // The gateways' placement follows at once.
    assert_eq!(r.placement("app", "lobby").unwrap().reflector, "r-eu-2");
    let s = lobby_shard(&r);
    assert_eq!(
        (s.state.as_str(), s.url.as_str()),
        ("Open", "ws://eu2.test/")
    );
    assert_eq!(r.metrics.moves_ended("landed"), 1);
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert!(routed.reflector_url.starts_with("ws://eu2.test/"));
    // The next plan's input carries it, and a view computed before the outcome cannot undo it.
    let mut input = moving_view().input;
    r.prepare(&mut input);
    let sh = &input.shards[0];
    assert_eq!(sh.reflector.as_deref(), Some("r-eu-2"));
    assert_eq!((sh.moving_to.as_ref(), sh.moved_at), (None, Some(1_000)));
    r.publish("local", moving_view());
    assert_eq!(lobby_shard(&r).reflector, "r-eu-2");
    // Once a view shows the landed state the move is forgotten; no second hand-off.
    let mut landed = moving_view();
    landed.input.shards = input.shards.clone();
    r.publish("local", landed);
    assert!(r.move_of("default/app/lobby", "lobby").is_none());
    assert_eq!(r.metrics.moves_ended("aborted"), 0);
    drop(target);
}

#[tokio::test]
async fn a_move_the_source_cannot_store_leaves_the_shard_open_on_the_source() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", moving_view());
    let url = report_hub(&r, None).await;
    let mut idle = lobby_report("r-eu-2", "eu", 1, 0);
    idle.shards.clear();
    let _target = open(&url, None, idle).await.unwrap();
    until("the target reports", || {
        r.live_streams().get("eu") == Some(&1)
    })
    .await;
    let mut source = open(&url, None, lobby_report("r-eu", "eu", 1, 7))
        .await
        .unwrap();
    let h = source.hand_off().await;
    let mut failed = lobby_report("r-eu", "eu", 2, 7);
    failed.hand_offs = vec![HandOffResult {
        move_id: h.move_id,
        app_id: "app".into(),
        shard: "lobby".into(),
        stored: false,
        error: "storage unavailable".into(),
    }];
    source.tx.send(failed).await.unwrap();
    until("the shard is open again", || {
        lobby_shard(&r).state == "Open"
    })
    .await;
    assert_eq!(lobby_shard(&r).reflector, "r-eu");
    assert_eq!(r.metrics.moves_ended("failed"), 1);
    let mut input = moving_view().input;
    r.prepare(&mut input);
    let sh = &input.shards[0];
    assert_eq!(sh.reflector.as_deref(), Some("r-eu"));
    assert_eq!(sh.moving_to, None);
    assert_eq!(sh.moved_at, Some(1_000), "the cool-down starts");
}

#[tokio::test]
async fn a_move_asked_for_by_hand_is_checked_and_offered_to_the_next_plans() {
    let (r, _) = router(RouterConfig::default());
    let mut view = moving_view();
    view.input.shards[0].moving_to = None;
    view.input.shards[0].phase = ShardPhase::Open;
    r.publish("local", view.clone());
    let err = r
        .request_move("default", "lobby", "lobby", None)
        .unwrap_err();
    assert_eq!(err.code(), "INVALID_ARGUMENT", "moves are off: {err}");
    view.input.pools[0].moves.enabled = true;
    r.publish("local", view.clone());
    assert_eq!(
        r.request_move("default", "nope", "lobby", None)
            .unwrap_err()
            .code(),
        "NOT_FOUND"
    );
    assert_eq!(
        r.request_move("default", "lobby", "lobby~3", None)
            .unwrap_err()
            .code(),
        "NOT_FOUND"
    );
    assert_eq!(
        r.request_move("default", "lobby", "lobby", Some("r-us".into()))
            .unwrap_err()
            .code(),
        "INVALID_ARGUMENT",
        "a reflector of another region"
    );
    let key = r
        .request_move("default", "lobby", "lobby", Some("r-eu-2".into()))
        .unwrap();
    assert_eq!(key, "default/app/lobby");
    let mut input = view.input.clone();
    r.prepare(&mut input);
    assert_eq!(input.move_requests.len(), 1);
    assert_eq!(input.move_requests[0].to.as_deref(), Some("r-eu-2"));
    // Offered again until a plan starts the move.
    let mut again = view.input.clone();
    r.prepare(&mut again);
    assert_eq!(again.move_requests.len(), 1);
    r.publish("local", moving_view());
    let mut after = view.input.clone();
    r.prepare(&mut after);
    assert!(after.move_requests.is_empty(), "taken by a plan");
}

#[tokio::test]
async fn with_a_gateway_route_answers_the_region_s_gateway_and_the_placement_its_reflector() {
    let (r, _) = router(RouterConfig::default());
    let mut view = fleet_view(vec![session("lobby", 10, 10)], 3);
    view.gateways = HashMap::from([("eu".into(), "wss://eu.gateway.test/".into())]);
    r.publish("local", view);
    let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(
        a.reflector_url,
        format!("wss://eu.gateway.test/{}/", a.join_token)
    );
    // The gateway finds the host through the placement: the reflector's own URL.
    let p = r.placement("app", &a.shard).unwrap();
    assert_eq!(
        (p.reflector.as_str(), p.url.as_str()),
        ("r-eu", "ws://eu.test/")
    );
}

/// A router with `config` whose Session `lobby` got its first shard on `r-eu`, where 3 users
/// joined (as r-eu's report stream says), and whose stream was then cut: the start of the
/// tests of a reflector that goes silent.
async fn lobby_on_eu_then_its_stream_cut(config: RouterConfig) -> Arc<Router> {
    let (r, _) = router(config);
    r.publish("local", fleet_view(vec![session("lobby", 100, 10)], 5));
    let key = ReportKey::new(&[7; 32]).unwrap();
    let url = report_hub(&r, Some(key.clone())).await;
    let eu = key.credential("r-eu", "eu").unwrap();
    let first = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(
        (first.shard.as_str(), first.region.as_str()),
        ("lobby", "eu")
    );
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 3))
        .await
        .unwrap();
    until("3 users", || lobby_users(&r) == 3).await;
    drop(s);
    r
}

/// A Route that finds no shard it can send users to (the session's only shard sits on a
/// reflector whose stream went silent) opens a new shard on a reflector that can take it,
/// instead of refusing: the shard it skipped counts as full when the router plans, as it
/// does for the Route itself.
#[tokio::test]
async fn a_shard_on_a_silent_reflector_counts_as_full_and_the_next_route_opens_another() {
    let r = lobby_on_eu_then_its_stream_cut(RouterConfig {
        report_grace: Duration::from_millis(300),
        ..RouterConfig::default()
    })
    .await;
    // Past the grace r-eu gets no routes.
    until("r-eu's load to expire", || lobby_users(&r) == 0).await;
    let next = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    // eu's one reflector is the silent one: the new shard opens in us.
    assert_eq!(
        (next.shard.as_str(), next.region.as_str()),
        ("lobby~1", "us")
    );
}

/// A Route to a session whose only shard is moving waits for the move (it takes seconds)
/// instead of being refused, and answers with the shard on its new reflector.
#[tokio::test]
async fn a_route_during_a_move_waits_for_it_and_answers_the_new_host() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", moving_view());
    let routing = tokio::spawn({
        let r = r.clone();
        async move { r.route(&req("lobby", "eu"), |_| Ok(())).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!routing.is_finished(), "it waits while the shard moves");
    // The backend's next view has the shard landed on r-eu-2.
    let mut landed = moving_view();
    let shard = &mut landed.input.shards[0];
    shard.phase = ShardPhase::Open;
    shard.reflector = Some("r-eu-2".into());
    shard.moving_to = None;
    r.publish("local", landed);
    let routed = tokio::time::timeout(Duration::from_secs(5), routing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(routed.shard, "lobby");
    assert!(routed.reflector_url.starts_with("ws://eu2.test/"));
}

/// A Route does not wait for a shard opening on a pod that starts in another region when a
/// reflector with room is up in the caller's own: it opens a shard there at once. A caller
/// who prefers the starting pod's region waits for that shard instead of opening another.
#[tokio::test]
async fn a_crowd_from_one_region_does_not_wait_for_a_pod_starting_in_another() {
    let (r, _) = router(RouterConfig {
        route_wait: Duration::from_millis(300),
        ..RouterConfig::default()
    });
    let mut fleet = fleet_view(vec![session("lobby", 10, 10)], 5);
    fleet.input.reflectors[1].state = ReflectorState::Starting;
    let on = |index, reflector, region, users| placed("lobby", index, reflector, region, users);
    // lobby is at its threshold (8 of 10) in eu; lobby~1 waits for r-us to start.
    fleet.input.shards = vec![on(0, "r-eu", "eu", 8), on(1, "r-us", "us", 0)];
    r.publish("local", fleet);

    let from_us = r.route(&req("lobby", "us"), |_| Ok(())).await.unwrap_err();
    assert!(
        matches!(from_us, RouteError::Exhausted { ref message, .. } if message.contains("starting")),
        "a caller from us waits for lobby~1, then is told it is still starting: {from_us:?}"
    );
    let from_eu = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(
        (from_eu.shard.as_str(), from_eu.region.as_str()),
        ("lobby~2", "eu"),
        "a caller from eu gets a new shard on r-eu at once"
    );
    let again = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(again.shard, "lobby~2", "and the next one joins it");

    // With no room on a ready reflector (one shard each), a new shard would wait too: the
    // caller from eu waits for lobby~1 instead of opening another beside it.
    let mut full = fleet_view(vec![session("lobby", 10, 10)], 1);
    full.input.reflectors[1].state = ReflectorState::Starting;
    full.input.shards = vec![on(0, "r-eu", "eu", 8), on(1, "r-us", "us", 0)];
    let (r, _) = router(RouterConfig {
        route_wait: Duration::from_millis(300),
        ..RouterConfig::default()
    });
    r.publish("local", full.clone());
    let waited = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap_err();
    assert!(
        matches!(waited, RouteError::Exhausted { ref message, .. } if message.contains("starting")),
        "{waited:?}"
    );
    full.input.reflectors[1].state = ReflectorState::Ready;
    r.publish("local", full);
    let joined = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(joined.shard, "lobby~1", "no shard opened meanwhile");
}

/// One region, one reflector (`r-eu`) and Session `lobby` (cap `cap`) with one shard there
/// that the published view says has `users`: what a new leader inherits.
fn lobby_alone_on_r_eu(cap: u32, users: u32) -> FleetView {
    let mut fleet = fleet_view(vec![session("lobby", cap, 10)], 5);
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.reflectors.truncate(1);
    let mut lobby = placed("lobby", 0, "r-eu", "eu", users);
    lobby.committed_users = cap;
    fleet.input.shards = vec![lobby];
    fleet
}

/// After a takeover, an inherited shard whose reflector has not reported to this router yet
/// counts as full even past the warm-up: the users the published view gives it may be stale,
/// so routing more to it could pass its cap. Once its reflector reports, its real load counts.
#[tokio::test]
async fn after_a_takeover_a_shard_counts_as_full_until_its_reflector_reports() {
    let (r, _) = router(RouterConfig {
        warm_up: true,
        token_ttl: Duration::from_millis(200),
        report_grace: Duration::from_secs(1),
        ..RouterConfig::default()
    });
    // The previous leader's last status: lobby on r-eu with 10 users.
    r.publish("local", lobby_alone_on_r_eu(100, 10));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The warm-up is over, but r-eu has not reported: after the catch-up (one report grace)
    // a new shard takes the user.
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(routed.shard, "lobby~1");
    let url = report_hub(&r, None).await;
    let _s = open(&url, None, lobby_report("r-eu", "eu", 1, 5))
        .await
        .unwrap();
    until("r-eu's 5 users", || lobby_users(&r) == 5).await;
    // Now lobby's load is known (5, the fullest below the threshold): it gets the next user.
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(routed.shard, "lobby");
}

/// During the warm-up after a takeover, an inherited shard whose reflector has reported takes
/// new users up to its margin (hard cap less threshold) before a new shard opens, so a small
/// session keeps its users together. Even if every token the previous leader may still have
/// out on it arrives (at most the threshold less the users reported), it stays within its cap.
#[tokio::test]
async fn during_the_warm_up_a_reported_inherited_shard_gives_its_margin_then_a_new_shard_opens() {
    let (r, _) = router(RouterConfig {
        warm_up: true,
        token_ttl: Duration::from_secs(60),
        ..RouterConfig::default()
    });
    r.publish("local", lobby_alone_on_r_eu(10, 3));
    let url = report_hub(&r, None).await;
    let _s = open(&url, None, lobby_report("r-eu", "eu", 1, 3))
        .await
        .unwrap();
    until("r-eu's 3 users", || lobby_users(&r) == 3).await;
    let mut given: HashMap<String, u32> = HashMap::new();
    for _ in 0..5 {
        let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
        *given.entry(a.shard).or_default() += 1;
    }
    assert_eq!(
        given,
        HashMap::from([("lobby".to_owned(), 2), ("lobby~1".to_owned(), 3)]),
        "lobby gives its margin of 2 (cap 10, threshold 8), then lobby~1 opens"
    );
    let threshold = 8;
    let old_tokens_at_most = threshold - 3;
    assert!(3 + old_tokens_at_most + given["lobby"] <= 10);
}

/// After a takeover, a shard the previous leader opened that no plan holds yet (its status
/// not written) but its reflector reports is never opened a second time under its name: the
/// next shard takes a free number, and none opens before the reflectors have reported.
#[tokio::test]
async fn after_a_takeover_a_new_shard_never_takes_the_name_of_one_a_reflector_reports() {
    let (r, _) = router(RouterConfig {
        warm_up: true,
        token_ttl: Duration::from_millis(100),
        ..RouterConfig::default()
    });
    let mut fleet = fleet_view(vec![session("lobby", 100, 10)], 5);
    fleet.input.pools[0].regions.truncate(1);
    fleet.input.reflectors.truncate(1);
    r.publish("local", fleet);
    let url = report_hub(&r, None).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A Route now waits: r-eu has not reported since the takeover.
    let routing = tokio::spawn({
        let r = r.clone();
        async move { r.route(&req("lobby", "eu"), |_| Ok(())).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!routing.is_finished(), "no shard opens before r-eu reports");
    // r-eu reports lobby (40 users) and lobby~1 (30 users), which the previous leader opened.
    let mut report = lobby_report("r-eu", "eu", 1, 40);
    let mut second = report.shards[0].clone();
    second.shard = "lobby~1".into();
    second.users = 30;
    report.shards.push(second);
    let _s = open(&url, None, report).await.unwrap();
    let routed = tokio::time::timeout(Duration::from_secs(5), routing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Neither is in a published plan yet, so the Route cannot use them: a new shard, under a
    // name nobody hosts.
    assert_eq!(routed.shard, "lobby~2");
}

/// eu's node is lost: the backend's next plan shows r-eu's pod NotReady (as starting), with
/// the shards the router holds.
fn publish_eu_not_ready(r: &Router) {
    let mut lost = fleet_view(vec![session("lobby", 100, 10)], 5);
    lost.input.reflectors[0].state = ReflectorState::Starting;
    let mut input = lost.input.clone();
    r.prepare(&mut input);
    lost.input.shards = input.shards;
    r.publish("local", lost);
}

/// eu is down: lobby's next Route from eu opens lobby~1 in us at once.
async fn next_lobby_route_from_eu_opens_in_us(r: &Router) {
    let next = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(
        (next.shard.as_str(), next.region.as_str()),
        ("lobby~1", "us")
    );
}

/// A region whose reflectors reported and then went silent while their pods turned NotReady
/// (its nodes were lost) is down: a Route preferring it opens the shard in the next region
/// at once, instead of waiting for reflectors that are not coming.
#[tokio::test]
async fn a_lost_region_s_users_get_a_shard_in_the_next_region() {
    let r = lobby_on_eu_then_its_stream_cut(RouterConfig {
        report_grace: Duration::from_millis(300),
        route_wait: Duration::from_secs(2),
        ..RouterConfig::default()
    })
    .await;
    publish_eu_not_ready(&r);
    // Past the report grace: r-eu is silent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    next_lobby_route_from_eu_opens_in_us(&r).await;
}

/// The same region lost, long before its reflectors' reports expire: a reflector whose
/// stream ended while its pod turned NotReady is lost at once, so the Route opens its shard
/// in the next region instead of on a pod that is not coming.
#[tokio::test]
async fn a_lost_region_is_down_as_soon_as_its_streams_end_and_its_pods_are_not_ready() {
    let r = lobby_on_eu_then_its_stream_cut(RouterConfig {
        report_grace: Duration::from_secs(60),
        route_wait: Duration::from_secs(2),
        ..RouterConfig::default()
    })
    .await;
    until("r-eu's stream to end", || {
        !r.live_streams().contains_key("eu")
    })
    .await;
    publish_eu_not_ready(&r);
    // Well within the grace: r-eu's 3 users still count, its stream is gone.
    assert_eq!(lobby_users(&r), 3);
    next_lobby_route_from_eu_opens_in_us(&r).await;
}

/// A replica that loses the Lease keeps its open connections (a Service steers only new
/// ones): it ends each open report stream at the next report, with UNAVAILABLE, so the
/// reflector reconnects and reports where Routes are answered; a new stream is refused until
/// it leads again.
#[tokio::test]
async fn a_replica_that_stops_leading_ends_its_open_report_streams() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 100, 1)], 1));
    let key = ReportKey::new(&[7; 32]).unwrap();
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(r.clone(), Some(key.clone())).only_when(leading.clone()),
        std::future::pending(),
    ));
    let eu = key.credential("r-eu", "eu").unwrap();
    let s = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 1, 0))
        .await
        .unwrap();
    until("r-eu's stream", || r.live_streams().get("eu") == Some(&1)).await;

    leading.store(false, Ordering::Relaxed);
    s.tx.send(lobby_report("r-eu", "eu", 2, 1)).await.unwrap();
    let ended = s.ended().await.expect("ended with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("no longer the leader"),
        "{ended:?}"
    );
    until("no stream counted", || !r.live_streams().contains_key("eu")).await;
    let refused = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 3, 1)).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::Unavailable)
    );
    assert_eq!(r.metrics.report_refusals("silent"), 0);

    leading.store(true, Ordering::Relaxed);
    let _back = open(&url, Some(eu.as_str()), lobby_report("r-eu", "eu", 4, 1))
        .await
        .unwrap();
    until("r-eu back", || r.live_streams().get("eu") == Some(&1)).await;
}

/// The streams gauge follows streams opening and ending (it is set then, not on each of
/// the fleet's reports, which would cost O(reflectors) per report).
#[tokio::test]
async fn the_stream_gauge_counts_streams_as_they_open_and_end() {
    let (r, _) = router(RouterConfig::default());
    r.publish("local", fleet_view(vec![session("lobby", 100, 1)], 1));
    let key = ReportKey::new(&[7; 32]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(r.clone(), Some(key.clone())),
        std::future::pending(),
    ));
    let gauge = |region: &str| r.metrics.report_streams(region);
    let a = key.credential("r-eu", "eu").unwrap();
    let b = key.credential("r-eu-2", "eu").unwrap();
    let first = open(&url, Some(a.as_str()), lobby_report("r-eu", "eu", 1, 0))
        .await
        .unwrap();
    until("one stream counted", || gauge("eu") == 1).await;
    let second = open(&url, Some(b.as_str()), lobby_report("r-eu-2", "eu", 1, 0))
        .await
        .unwrap();
    until("two streams counted", || gauge("eu") == 2).await;
    for seq in 2..5 {
        first
            .tx
            .send(lobby_report("r-eu", "eu", seq, 1))
            .await
            .unwrap();
    }
    until("r-eu's reports counted", || {
        r.snapshot().reported.get("r-eu").map(|x| x.users) == Some(1)
    })
    .await;
    assert_eq!(gauge("eu"), 2, "reports on open streams add no stream");
    drop(second);
    until("the ended stream no longer counted", || gauge("eu") == 1).await;
    assert_eq!(r.live_streams().get("eu"), Some(&1));
    drop(first);
    until("no stream counted", || gauge("eu") == 0).await;
}

/// A published shard of session `session` on `reflector`, committing 10 users.
fn placed(session: &str, index: u32, reflector: &str, region: &str, users: u32) -> ShardRecord {
    ShardRecord {
        session: format!("default/app/{session}"),
        name: if index == 0 {
            session.to_owned()
        } else {
            format!("{session}~{index}")
        },
        index,
        pool: POOL.into(),
        region: region.into(),
        reflector: Some(reflector.into()),
        committed_users: 10,
        users,
        reserved: 0,
        phase: ShardPhase::Open,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

/// Where the Route puts session `lobby`'s next shard, with `shards` published (two shards
/// fit on each reflector, one reflector per region) and the sessions `lobby`, `b` and
/// `old`; `first` is routed before it.
async fn next_lobby_shard(shards: Vec<ShardRecord>, first: Option<&str>) -> (String, String) {
    let (r, _) = router(RouterConfig::default());
    let sessions = ["lobby", "b", "old"].map(|s| session(s, 10, 5)).to_vec();
    let mut view = fleet_view(sessions, 2);
    view.input.shards = shards;
    r.publish("local", view);
    if let Some(s) = first {
        r.route(&req(s, "eu"), |_| Ok(())).await.unwrap();
    }
    let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    (a.shard, a.region)
}

#[tokio::test]
async fn a_new_shard_takes_only_the_room_the_rest_of_the_pool_leaves() {
    let eu = |s: &str, i, users| placed(s, i, "r-eu", "eu", users);
    let mut closing = eu("old", 0, 0);
    closing.phase = ShardPhase::Closing;
    let mut closing_in_use = closing.clone();
    closing_in_use.users = 3;

    // Room left on r-eu for one shard: the new one goes there.
    let found = next_lobby_shard(vec![eu("b", 0, 0)], None).await;
    assert_eq!(found, ("lobby".into(), "eu".into()));
    // A closing shard nobody is on holds no room; one still in use does.
    let found = next_lobby_shard(vec![eu("b", 0, 0), closing], None).await;
    assert_eq!(found, ("lobby".into(), "eu".into()));
    let found = next_lobby_shard(vec![eu("b", 0, 0), closing_in_use], None).await;
    assert_eq!(found, ("lobby".into(), "us".into()), "r-eu is full");
    // A shard this router opened for another session since the plan takes room too.
    let found = next_lobby_shard(vec![eu("old", 0, 9)], Some("b")).await;
    assert_eq!(
        found,
        ("lobby".into(), "us".into()),
        "b took r-eu's last slot"
    );
    // The session's own shard is counted once: lobby~1 joins it on r-eu.
    let found = next_lobby_shard(vec![eu("lobby", 0, 9)], None).await;
    assert_eq!(found, ("lobby~1".into(), "eu".into()));
}

#[tokio::test]
async fn a_session_whose_pool_is_not_published_is_refused_with_the_reason() {
    let (r, _) = router(RouterConfig::default());
    let mut stray = session("stray", 10, 5);
    stray.pool = "default/missing".into();
    r.publish("local", fleet_view(vec![stray], 2));
    let err = r.route(&req("stray", ""), |_| Ok(())).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("no ReflectorPool default/missing"),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_snapshot_holds_the_shards_the_router_opened_once() {
    let (r, _) = router(RouterConfig::default());
    let view = fleet_view(vec![session("lobby", 10, 5)], 2);
    r.publish("local", view.clone());
    let a = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    let names =
        |r: &Router| -> Vec<String> { r.snapshot().shards.into_iter().map(|s| s.name).collect() };
    assert_eq!(names(&r), [a.shard], "opened, not yet planned");
    let mut planned = view;
    planned.input.shards = vec![placed("lobby", 0, "r-eu", "eu", 0)];
    planned.input.shards.push(placed("b", 0, "r-eu", "eu", 4));
    r.publish("local", planned);
    assert_eq!(names(&r), ["lobby", "b"], "planned now: listed once");
    let snap = r.snapshot();
    assert_eq!(
        snap.shards[1].users, 4,
        "the plan's count while nobody reports"
    );
}

#[tokio::test]
async fn a_full_reflector_is_not_offered_to_the_plan_but_counts_against_its_region_s_max() {
    // eu's one reflector is full of another session's shard; us has room. The Route opens
    // lobby's first shard, eu preferred: the plan may start a reflector in eu only if eu's
    // maxReflectors leaves room for one beside the full one.
    for (max_eu, expected) in [(1, Some("us")), (2, None)] {
        let (r, _) = router(RouterConfig {
            route_wait: Duration::from_millis(300),
            ..RouterConfig::default()
        });
        let mut view = fleet_view(vec![session("lobby", 10, 10), session("busy", 10, 10)], 1);
        view.input.pools[0].regions[0].max_reflectors = max_eu;
        view.input.shards = vec![placed("busy", 0, "r-eu", "eu", 0)];
        r.publish("local", view);
        let answer = r.route(&req("lobby", "eu"), |_| Ok(())).await;
        expect_lobby_opened(answer, expected);
    }
}

#[tokio::test]
async fn a_region_whose_only_live_reflector_is_full_is_not_down() {
    // eu: r-eu full of another session's shard, r-eu2 empty; us has room. r-eu2 goes
    // silent. While full r-eu still reports, eu is not down (only short of room): the plan
    // starts a reflector there and the Route waits for it. Once r-eu is silent too, eu is
    // down and the shard opens in us at once.
    for (eu_reports, expected) in [(true, None), (false, Some("us"))] {
        let (r, _) = router(RouterConfig {
            report_grace: Duration::from_millis(300),
            route_wait: Duration::from_millis(300),
            ..RouterConfig::default()
        });
        let mut view = fleet_view(vec![session("lobby", 10, 10), session("busy", 10, 10)], 1);
        view.input.pools[0].regions[0].max_reflectors = 3;
        let mut second = view.input.reflectors[0].clone();
        second.name = "r-eu2".into();
        view.input.reflectors.push(second);
        view.urls.insert("r-eu2".into(), "ws://eu2.test/".into());
        view.input.shards = vec![placed("busy", 0, "r-eu", "eu", 0)];
        r.publish("local", view);
        let report = |name: &str| ReflectorReport {
            reflector: name.into(),
            region: "eu".into(),
            ..ReflectorReport::default()
        };
        r.observe_report(&report("r-eu"));
        r.observe_report(&report("r-eu2"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        if eu_reports {
            r.observe_report(&report("r-eu"));
        }
        let answer = r.route(&req("lobby", "eu"), |_| Ok(())).await;
        expect_lobby_opened(answer, expected);
    }
}

/// Checks how a Route for `lobby`'s first shard ended: opened in region `expected` at once,
/// or (`None`) refused while the shard waits for a reflector still to start.
fn expect_lobby_opened(answer: Result<RouteResponse, RouteError>, expected: Option<&str>) {
    match expected {
        Some(region) => {
            let answer = answer.unwrap();
            assert_eq!(
                (answer.shard.as_str(), answer.region.as_str()),
                ("lobby", region)
            );
        }
        None => assert!(
            matches!(answer, Err(RouteError::Exhausted { ref message, .. }) if message.contains("starting")),
            "{answer:?}"
        ),
    }
}

/// A plan made while a Route opens a shard on an empty reflector drains that reflector: its
/// input did not have the shard. Its published view offers no reflector it drains to a new
/// shard, and the backend, asking the router after publishing it, keeps the reflector the
/// Route used (so its users are not on a pod being deleted) and drains the other.
#[tokio::test]
async fn a_reflector_a_route_opened_a_shard_on_while_the_plan_was_made_is_not_drained() {
    let (r, _) = router(RouterConfig {
        route_wait: Duration::from_millis(300),
        ..RouterConfig::default()
    });
    let mut view = fleet_view(vec![session("lobby", 10, 10), session("hall", 10, 10)], 3);
    // Nothing keeps an empty reflector: the plan drains both.
    for region in &mut view.input.pools[0].regions {
        region.min_reflectors = 0;
    }
    r.publish("local", view.clone());
    let mut input = view.input.clone();
    r.prepare(&mut input);
    let plan_input = input.clone();
    // While the plan is made, a Route opens lobby on r-eu.
    let routed = r.route(&req("lobby", "eu"), |_| Ok(())).await.unwrap();
    assert_eq!(
        (routed.shard.as_str(), routed.region.as_str()),
        ("lobby", "eu")
    );
    let mut plan = planner::plan(&plan_input);
    let drained = |plan: &planner::Plan, name: &str| {
        plan.reflectors
            .iter()
            .any(|p| p.name == name && matches!(p.action, ReflectorAction::Drain { .. }))
    };
    assert!(
        drained(&plan, "r-eu") && drained(&plan, "r-us"),
        "{plan:#?}"
    );
    let mut published = fleet::fleet_view(&fleet::Observed::default(), input, &plan);
    published.sessions.clone_from(&view.sessions);
    published.urls.clone_from(&view.urls);
    fleet::publish_plan(&r, "local", published, &mut plan);
    assert!(!drained(&plan, "r-eu"), "r-eu hosts lobby");
    assert!(drained(&plan, "r-us"));
    let drain_decided = |name: &str| {
        plan.decisions
            .iter()
            .any(|d| matches!(d, Decision::DrainReflector { reflector, .. } if reflector == name))
    };
    assert!(!drain_decided("r-eu") && drain_decided("r-us"));
    // Until the next plan, neither is offered to a new shard.
    let refused = r.route(&req("hall", "eu"), |_| Ok(())).await;
    assert!(refused.is_err(), "{refused:?}");
}
