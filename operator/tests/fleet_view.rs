//! The fleet view: the operator's status (built from its router) agrees with the local
//! fleet's for the same fleet, and the view's HTTP side — the page, the Server-Sent Events
//! stream, its bound, its end on shutdown and the access gate's refusals — over a real
//! socket.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use refleet_api::report::{ReflectorReport, ShardLoad};
use refleet_operator::crd::ShardPhase;
use refleet_operator::local::config::LocalConfig;
use refleet_operator::local::fleet::{Fleet, PoolRuntime, Status};
use refleet_operator::local::launcher::{LaunchError, Launcher, Observed, StartRequest};
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::{RouteError, Router, RouterConfig};
use refleet_operator::view::http::{self, Gate, MAX_STREAMS, Open};
use refleet_operator::view::status::{ReflectorView, RegionView, ShardView};
use refleet_operator::view::{Hub, status};

/// Reflectors that exist only in memory and are ready at once.
#[derive(Default)]
struct Ready(BTreeMap<String, Observed>);

impl Launcher for Ready {
    fn start(&mut self, req: StartRequest) -> Result<(), LaunchError> {
        let url = format!("http://127.0.0.1/{}/", req.name);
        self.0.insert(
            req.name,
            Observed::Running {
                url,
                sessions: Some(Vec::new()),
            },
        );
        Ok(())
    }
    fn drain(&mut self, _: &str) {}
    fn kill(&mut self, _: &str) {}
    async fn observe(&mut self) -> BTreeMap<String, Observed> {
        self.0.clone()
    }
    fn forget(&mut self, name: &str) {
        self.0.remove(name);
    }
}

const CONFIG: &str = "apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: p}
spec:
  defaults:
    capacity: {sessions: 10, users: 40}
    minReflectors: 1
    maxReflectors: 2
    warmBuffer: 0
  regions: [{name: a}, {name: b}]
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: p}
  appId: io.x
  name: lobby
  maxUsersPerShard: 10
  scaleUpThreshold: 0.8
  minShards: 1
";

fn router() -> Arc<Router> {
    Router::new(
        RouterConfig::default(),
        None,
        RouterMetrics::new(&prometheus::Registry::new()),
    )
}

/// What both statuses must agree on: regions with their reflectors (name, state, shards),
/// and shards with their placement and limits.
type Shape = (
    Vec<(String, Vec<(String, &'static str, Vec<String>)>)>,
    Vec<(String, String, String, Option<String>, u32, u32)>,
);

fn shape(s: &Status) -> Shape {
    (
        s.regions
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.reflectors
                        .iter()
                        .map(|x| (x.name.clone(), x.state, x.shards.clone()))
                        .collect(),
                )
            })
            .collect(),
        s.shards
            .iter()
            .map(|x| {
                (
                    format!("{}/{}/{}", x.namespace, x.app_id, x.session),
                    x.name.clone(),
                    x.region.clone(),
                    x.reflector.clone(),
                    x.max_users,
                    x.threshold_users,
                )
            })
            .collect(),
    )
}

#[tokio::test]
async fn the_operator_status_from_its_router_agrees_with_the_local_fleet() {
    let config = LocalConfig::parse(CONFIG).unwrap();
    let pools = config
        .pools
        .into_iter()
        .map(|pool| PoolRuntime {
            pool,
            storage: "/tmp/unused".into(),
            files_url: "http://127.0.0.1:7080/files".into(),
        })
        .collect();
    let router = router();
    let mut fleet =
        Fleet::new(Ready::default(), pools, config.sessions).with_router(router.clone());
    fleet.tick(0).await;
    fleet.tick(1).await;
    let local = fleet.status();
    assert_eq!(local.regions.len(), 2);
    assert_eq!(local.shards.len(), 1);
    let placed_on = local.shards[0].reflector.clone().unwrap();
    assert_eq!(
        (local.shards[0].max_users, local.shards[0].threshold_users),
        (10, 8)
    );
    let mut changes = router.changes();
    changes.mark_unchanged();
    router.observe_report(&ReflectorReport {
        reflector: placed_on.clone(),
        region: local.shards[0].region.clone(),
        shards: vec![ShardLoad {
            app_id: "io.x".into(),
            shard: "lobby".into(),
            users: 3,
            ..ShardLoad::default()
        }],
        ..ReflectorReport::default()
    });
    assert!(changes.has_changed().unwrap(), "a report is a change");
    let cluster = status::from_router(&router.snapshot());
    assert_eq!(shape(&cluster), shape(&local));
    assert_eq!(cluster.shards[0].users, 3, "users as reported now");
    assert_eq!(
        cluster.shards[0].url.as_deref(),
        Some(format!("http://127.0.0.1/{placed_on}/").as_str())
    );
    let on = cluster
        .regions
        .iter()
        .flat_map(|r| &r.reflectors)
        .find(|r| r.name == placed_on)
        .unwrap();
    assert_eq!(on.users, 3);
    assert_eq!(on.files_url, "http://127.0.0.1:7080/files");
}

// === HTTP ===

async fn serve(hub: Arc<Hub>, gate: Arc<dyn Gate>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = http::app(hub, gate);
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    format!("http://{addr}/")
}

fn status_with(users: u32) -> Status {
    Status {
        regions: vec![RegionView {
            pool: "default/p".into(),
            name: "a".into(),
            desired: 1,
            reflectors: vec![ReflectorView {
                name: "a-1".into(),
                state: "Ready",
                pid: None,
                cpu_percent: None,
                rss_bytes: None,
                url: None,
                files_url: String::new(),
                users,
                shards: vec![],
            }],
        }],
        ..Status::default()
    }
}

/// The next SSE chunk(s) until a whole `fleet` event has arrived; `None` when the stream ended.
async fn next_event(res: &mut reqwest::Response) -> Option<String> {
    let mut text = String::new();
    loop {
        let chunk = tokio::time::timeout(Duration::from_secs(10), res.chunk())
            .await
            .expect("an event or the end within 10 s")
            .unwrap()?;
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        if text.contains("event: fleet") && text.ends_with("\n\n") {
            return Some(text);
        }
    }
}

#[tokio::test]
async fn the_page_and_its_event_stream_follow_the_hub_and_end_when_it_closes() {
    let hub = Hub::new("test");
    hub.update(status_with(1), 0);
    let base = serve(hub.clone(), Arc::new(Open)).await;
    let http = reqwest::Client::new();
    let page = http.get(&base).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("data-region=\"a\""), "{html}");
    assert!(html.contains("1 user"), "{html}");
    for asset in ["view/index.js", "view/style.css"] {
        let res = http.get(format!("{base}{asset}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{asset}");
    }

    let mut events = http.get(format!("{base}view/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let first = next_event(&mut events).await.unwrap();
    assert!(first.contains("1 user"), "{first}");
    assert_eq!(hub.streams(), 1);
    hub.update(status_with(7), 0);
    let second = next_event(&mut events).await.unwrap();
    assert!(second.contains("7 users"), "{second}");

    hub.close();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("the stream ends on close")
            .unwrap(),
        None
    );
    drop(events);
    // Its place is given back, and no new stream opens after close.
    tokio::time::timeout(Duration::from_secs(5), async {
        while hub.streams() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let late = http.get(format!("{base}view/events")).send().await.unwrap();
    assert_eq!(late.status(), 503);
}

#[tokio::test]
async fn event_streams_are_bounded_and_a_freed_place_is_reused() {
    let hub = Hub::new("test");
    hub.update(status_with(1), 0);
    let base = serve(hub.clone(), Arc::new(Open)).await;
    let url = format!("{base}view/events");
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS {
        // One client per stream: each holds its own connection.
        let mut res = reqwest::Client::new().get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        next_event(&mut res).await.unwrap();
        open.push(res);
    }
    let refused = reqwest::get(&url).await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.text().await.unwrap().contains("streams are open"));
    open.pop();
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let res = reqwest::get(&url).await.unwrap();
            if res.status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a place frees once a reader leaves");
}

/// Refuses as Route would.
struct Refusing(RouteError);

impl Gate for Refusing {
    fn admit(&self, _: &HeaderMap, _: IpAddr) -> Result<Option<String>, RouteError> {
        Err(self.0.clone())
    }
}

#[tokio::test]
async fn refused_readers_get_routes_http_statuses() {
    let cases = [
        (
            RouteError::Unauthenticated("an API key is required".into()),
            401,
        ),
        (RouteError::PermissionDenied("origin".into()), 403),
        (
            RouteError::Exhausted {
                message: "rate".into(),
                retry_after: Duration::from_millis(1500),
            },
            429,
        ),
        (RouteError::Unavailable("not the leader".into()), 503),
    ];
    for (error, code) in cases {
        let base = serve(Hub::new("test"), Arc::new(Refusing(error.clone()))).await;
        for path in ["", "view/events"] {
            let res = reqwest::get(format!("{base}{path}")).await.unwrap();
            assert_eq!(res.status().as_u16(), code, "{error:?} at /{path}");
            if code == 429 {
                assert_eq!(res.headers()["retry-after"], "1");
            }
            assert!(!res.text().await.unwrap().contains("<table"), "no data");
        }
    }
}

/// The operator's gate: with API keys on, a reader sees only the shards of its key's app.
#[tokio::test]
async fn with_api_keys_a_reader_sees_only_its_apps_shards() {
    use refleet_operator::router::service::{Access, Frontend, always_leading};
    let router = router();
    let frontend = Frontend {
        router: router.clone(),
        access: Arc::new(
            Access::new(Default::default(), &[], 1000)
                .requiring_keys([("k-x".to_owned(), "io.x".to_owned())].into()),
        ),
        leading: always_leading(),
    };
    let hub = Hub::new("test");
    let mut s = status_with(2);
    let shard = |app: &str, name: &str| ShardView {
        namespace: "default".into(),
        session: name.into(),
        app_id: app.into(),
        session_name: name.into(),
        name: name.into(),
        index: 0,
        region: "a".into(),
        reflector: Some("a-1".into()),
        url: None,
        files_url: None,
        users: 1,
        max_users: 10,
        threshold_users: 8,
        phase: ShardPhase::Open,
    };
    s.shards = vec![shard("io.x", "mine"), shard("io.other", "theirs")];
    hub.update(s, 0);
    let base = serve(hub, Arc::new(frontend)).await;
    let http = reqwest::Client::new();
    assert_eq!(http.get(&base).send().await.unwrap().status(), 401);
    let unknown = http.get(&base).header("x-api-key", "nope").send().await;
    assert_eq!(unknown.unwrap().status(), 401);
    let html = http
        .get(&base)
        .header("x-api-key", "k-x")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("data-shard=\"mine\""), "{html}");
    assert!(!html.contains("theirs"), "{html}");
}

/// `refleet operator`'s router port, as `Routing::start` serves it: the view answers only on
/// the leader, follows what is published to the router, and its streams end at shutdown.
/// (No apiserver: without join tokens, a report secret or a pod name, routing never calls it.)
#[tokio::test]
async fn the_operators_router_port_serves_the_view_on_the_leader_and_ends_it_at_shutdown() {
    use refleet_operator::cli::routing::{Routing, RoutingArgs};
    refleet_operator::controller::install_crypto_provider();
    let nowhere = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(nowhere).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let routing = Routing::start(
        client,
        RoutingArgs::loopback(),
        "default",
        &prometheus::Registry::new(),
        async {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    let base = format!("http://{}/", routing.router_addr);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(&base).send().await.unwrap().status(),
        503,
        "a standby answers 503, as for Route"
    );
    routing.set_leading(true).await;
    let page = http.get(&base).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("refleet operator"));

    let mut events = http.get(format!("{base}view/events")).send().await.unwrap();
    assert_eq!(events.status(), 200);
    next_event(&mut events).await.unwrap();
    // A plan published to the router shows up on the open stream.
    let config = LocalConfig::parse(CONFIG).unwrap();
    let pools = config
        .pools
        .into_iter()
        .map(|pool| PoolRuntime {
            pool,
            storage: "/tmp/unused".into(),
            files_url: "http://127.0.0.1:7080/files".into(),
        })
        .collect();
    let mut fleet =
        Fleet::new(Ready::default(), pools, config.sessions).with_router(routing.router.clone());
    fleet.tick(0).await;
    fleet.tick(1).await;
    loop {
        let event = next_event(&mut events).await.unwrap();
        if event.contains(r#"data-region=\"b\""#) && event.contains(r#"data-shard=\"lobby\""#) {
            break;
        }
    }

    stop.send(()).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.chunk().await.unwrap() {
                    Some(_) => continue,
                    None => return None::<()>,
                }
            }
        })
        .await
        .expect("the stream ends at shutdown"),
        None
    );
}
