//! The gateway against real `refleet-reflector` children, answering from a real router: an
//! upgrade with a valid token is spliced to the shard's reflector (a JOIN goes in, its SYNC
//! comes back), every bad request gets its HTTP status before any upgrade, slow and idle
//! clients are closed after the header timeout with the connection count bounded, and after
//! a shard's placement flips the next connection reaches the other reflector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use refleet_api::reflector::launch::LaunchSpec;
use refleet_api::token::{JoinClaims, Signer, Verifier};
use refleet_core::planner::{ObservedReflector, PlanInput, ReflectorState, ShardRecord};
use refleet_operator::crd::{Capacity, ShardPhase};
use refleet_operator::gateway::metrics::GatewayMetrics;
use refleet_operator::gateway::{Gateway, GatewayConfig, RouterTable};
use refleet_operator::local::config::ChildLogs;
use refleet_operator::local::launcher::{
    Launcher, Observed, ProcessLauncher, ProcessSettings, StartRequest,
};
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::{FleetView, Router, RouterConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

mod support;
use support::reflector_binary;

const APP: &str = "io.refleet.test";
/// Bound on every wait, so a broken gateway fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

struct Fixture {
    router: Arc<Router>,
    gateway: Arc<Gateway>,
    addr: std::net::SocketAddr,
    signer: Signer,
    urls: HashMap<String, String>,
    launcher: ProcessLauncher,
    dir: std::path::PathBuf,
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher as _, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(signer: &Signer, shard: &str, expires_at: i64) -> String {
    signer.sign(JoinClaims {
        app_id: APP.into(),
        shard: shard.into(),
        persistence: false,
        expires_at,
        key_id: String::new(),
        max_users: 10,
        reservation_id: 0,
    })
}

fn shard(name: &str, reflector: Option<&str>, phase: ShardPhase) -> ShardRecord {
    ShardRecord {
        session: format!("ns/{APP}/{name}"),
        name: name.into(),
        index: 0,
        pool: "ns/pool".into(),
        region: "local-a".into(),
        reflector: reflector.map(str::to_owned),
        committed_users: 10,
        users: 0,
        reserved: 0,
        phase,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

impl Fixture {
    /// Two reflectors r1, r2 and shard `lobby` on `lobby_on`; `moving` moves from r1 to r2;
    /// `waiting` has no reflector yet.
    fn publish(&self, lobby_on: &str) {
        let reflector = |name: &str| ObservedReflector {
            name: name.into(),
            pool: "ns/pool".into(),
            region: "local-a".into(),
            image: "img".into(),
            capacity: Capacity::default(),
            state: ReflectorState::Ready,
            unreported: false,
        };
        let mut moving = shard("moving", Some("r1"), ShardPhase::Moving);
        moving.moving_to = Some("r2".into());
        self.router.publish(
            "local",
            FleetView {
                input: PlanInput {
                    reflectors: vec![reflector("r1"), reflector("r2")],
                    shards: vec![
                        shard("lobby", Some(lobby_on), ShardPhase::Open),
                        moving,
                        shard("waiting", None, ShardPhase::Pending),
                    ],
                    ..PlanInput::default()
                },
                sessions: vec![],
                urls: self.urls.clone(),
                gateways: HashMap::new(),
            },
        );
    }

    fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Connections the reflector `name` has accepted so far.
    async fn accepted(&self, name: &str) -> u64 {
        let text = reqwest::get(format!("{}metrics", self.urls[name]))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("refleet_reflector_connections_total "))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for name in ["r1", "r2"] {
            self.launcher.kill(name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fixture(config: GatewayConfig) -> Fixture {
    let signer = Signer::new("k1", &[7; 32]);
    let router = Router::new(
        RouterConfig::default(),
        Some(signer.clone()),
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    let dir = std::env::temp_dir().join(format!(
        "refleet-gateway-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut launcher = ProcessLauncher::new(ProcessSettings {
        binary: reflector_binary(),
        host: "127.0.0.1".into(),
        launch: LaunchSpec {
            require_join_token: true,
            token_keys: Some(Verifier::format_key("k1", &signer.public_key())),
            ..LaunchSpec::default()
        },
        logs: ChildLogs::Files,
        log_dir: dir.join("logs"),
        report_key: None,
        sessions_http: refleet_operator::local::launcher::sessions_client(),
    });
    for name in ["r1", "r2"] {
        launcher
            .start(StartRequest {
                name: name.into(),
                region: "local-a".into(),
                storage: dir.join("storage").display().to_string(),
                files_url: "http://127.0.0.1:1/files".into(),
                drain_timeout: Duration::from_secs(1),
            })
            .unwrap();
    }
    let urls = tokio::time::timeout(WAIT, async {
        loop {
            let urls: HashMap<String, String> = launcher
                .observe()
                .await
                .into_iter()
                .filter_map(|(n, o)| match o {
                    Observed::Running { url, .. } => Some((n, url)),
                    _ => None,
                })
                .collect();
            if urls.len() == 2 {
                return urls;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both reflectors start");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = Gateway::new(
        GatewayConfig {
            region: "local-a".into(),
            ..config
        },
        Arc::new(RouterTable::new(router.clone())),
        &GatewayMetrics::new(&prometheus::Registry::new()),
    );
    tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
    let f = Fixture {
        router,
        gateway,
        addr,
        signer,
        urls,
        launcher,
        dir,
    };
    f.publish("r1");
    f
}

fn join_args(shard: &str) -> Value {
    json!({
        "name": format!("{APP}/{shard}"), "apiKey": "none", "appId": APP,
        "persistentId": "pid-1", "developerId": "unknown_dev_id", "version": 1, "user": "u1",
        "ticks": {"tick": 1000, "delay": 0}, "tove": "TOVE", "codeHash": "code1", "sdk": "1.1.0"
    })
}

/// The HTTP status the gateway answers an upgrade to `path` with (101 when upgraded).
async fn upgrade_status(f: &Fixture, path: &str) -> (u16, Option<String>) {
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(f.ws_url(path)))
        .await
        .expect("an answer")
    {
        Ok((_, res)) => (res.status().as_u16(), None),
        Err(tungstenite::Error::Http(res)) => (
            res.status().as_u16(),
            res.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
        ),
        Err(e) => panic!("{path}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_is_spliced_to_the_shard_s_reflector_and_frames_flow_both_ways() {
    let f = fixture(GatewayConfig::default()).await;
    let t = token(&f.signer, "lobby", unix_now() + 60);
    let before = f.accepted("r1").await;
    let (mut ws, res) = tokio_tungstenite::connect_async(f.ws_url(&format!("/{t}/s1")))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 101);
    ws.send(Message::text(
        json!({"id": "s1", "action": "JOIN", "args": join_args("lobby")}).to_string(),
    ))
    .await
    .unwrap();
    let sync = tokio::time::timeout(WAIT, async {
        while let Some(m) = ws.next().await {
            if let Message::Text(t) = m.unwrap() {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["action"] == "SYNC" {
                    return v;
                }
            }
        }
        panic!("closed before SYNC")
    })
    .await
    .expect("SYNC through the gateway");
    assert_eq!(sync["action"], "SYNC");
    assert_eq!(f.accepted("r1").await, before + 1, "r1 took the connection");
    let m = f.gateway.metrics();
    assert_eq!(m.upgrades("proxied"), 1);
    assert_eq!(m.connections.get(), 1);
    assert!(m.to_reflector.get() > 0 && m.to_client.get() > 0);
    ws.close(None).await.unwrap();
    drop(ws);
    tokio::time::timeout(WAIT, async {
        while m.connections.get() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the closed connection is no longer counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_before_any_upgrade() {
    let f = fixture(GatewayConfig::default()).await;
    let now = unix_now();
    let forged = Signer::new("k1", &[8; 32]).sign(JoinClaims {
        app_id: APP.into(),
        shard: "lobby".into(),
        expires_at: now + 60,
        ..JoinClaims::default()
    });
    let cases = [
        ("no token", "/s1".to_owned(), 401),
        ("not a token", "/not-a-token/s1".to_owned(), 401),
        ("forged", format!("/{forged}/s1"), 401),
        (
            "long expired",
            format!("/{}/s1", token(&f.signer, "lobby", now - 7200)),
            403,
        ),
        (
            "unknown shard",
            format!("/{}/s1", token(&f.signer, "nowhere", now + 60)),
            404,
        ),
        (
            "moving",
            format!("/{}/s1", token(&f.signer, "moving", now + 60)),
            503,
        ),
        (
            "no reflector yet",
            format!("/{}/s1", token(&f.signer, "waiting", now + 60)),
            503,
        ),
        (
            "no session id",
            format!("/{}/", token(&f.signer, "lobby", now + 60)),
            400,
        ),
    ];
    let before = f.accepted("r1").await + f.accepted("r2").await;
    for (what, path, status) in &cases {
        let (got, retry) = upgrade_status(&f, path).await;
        assert_eq!(got, *status, "{what}");
        if *status == 503 {
            assert_eq!(retry.as_deref(), Some("1"), "{what}: Retry-After");
        }
    }
    assert_eq!(
        f.accepted("r1").await + f.accepted("r2").await,
        before,
        "no bad request reached a reflector"
    );
    let m = f.gateway.metrics();
    assert_eq!(m.upgrades("bad_token"), 4);
    assert_eq!(m.upgrades("not_found"), 1);
    assert_eq!(m.upgrades("moving"), 1);
    assert_eq!(m.upgrades("not_ready"), 1);
    assert_eq!(m.upgrades("bad_request"), 1);
    assert_eq!(m.upgrades("proxied"), 0);

    // A plain GET is no upgrade.
    let res = reqwest::get(format!("http://{}/abc/def", f.addr))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
}

/// Sends `head` on a new connection and returns everything the gateway answers until it
/// closes the connection.
async fn raw(addr: std::net::SocketAddr, head: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431_and_slow_or_idle_clients_are_closed() {
    let f = fixture(GatewayConfig {
        header_timeout: Duration::from_millis(500),
        max_connections: 16,
        ..GatewayConfig::default()
    })
    .await;
    let big = format!(
        "GET /t/s HTTP/1.1\r\nHost: gw\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw(f.addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");

    // Slowloris: a head that never ends is cut at the header timeout.
    let answer = raw(f.addr, b"GET /t/s HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\n").await;
    assert!(!answer.contains("101"), "{answer:?}");

    // Many idle connections: never more open than the cap, and every one is closed.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(f.addr).await.unwrap());
    }
    let fds_before = count_fds();
    let watcher = {
        let gw = f.gateway.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..200 {
                peak = peak.max(gw.open_connections());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        })
    };
    for mut c in idle {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .expect("every idle connection is closed");
        assert!(matches!(n, Ok(0) | Err(_)), "nothing but a close: {n:?}");
    }
    let peak = watcher.await.unwrap();
    assert!(
        (1..=16).contains(&peak),
        "open connections peaked at {peak}"
    );
    assert!(
        count_fds() <= fds_before,
        "the gateway holds no socket of the closed clients"
    );
    // The slot is given back just after the close the client saw.
    tokio::time::timeout(WAIT, async {
        while f.gateway.open_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every slot is given back");
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_placement_flip_the_next_connection_reaches_the_other_reflector() {
    let f = fixture(GatewayConfig::default()).await;
    let t = token(&f.signer, "lobby", unix_now() + 60);
    let path = format!("/{t}/s1");
    let (r1, r2) = (f.accepted("r1").await, f.accepted("r2").await);
    let (first, _) = tokio_tungstenite::connect_async(f.ws_url(&path))
        .await
        .unwrap();
    assert_eq!(
        (f.accepted("r1").await, f.accepted("r2").await),
        (r1 + 1, r2)
    );
    let mut changed = f.router.placement_changed();
    changed.mark_unchanged();
    f.publish("r2");
    assert!(changed.has_changed().unwrap(), "the flip ticks the signal");
    let (second, _) = tokio_tungstenite::connect_async(f.ws_url(&path))
        .await
        .unwrap();
    assert_eq!(
        (f.accepted("r1").await, f.accepted("r2").await),
        (r1 + 1, r2 + 1),
        "the same URL now reaches r2"
    );
    drop((first, second));
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_table_follows_the_leader_s_watch_and_keeps_its_last_table_between_leaders() {
    use refleet_api::report_credential::ReportKey;
    use refleet_operator::gateway::Placements as _;
    use refleet_operator::gateway::watched::{WatchTarget, WatchedTable, follow};
    use refleet_operator::router::placement_watch::GATEWAY_IDENTITY;
    use refleet_operator::router::reports::{self, ReportHub};
    use std::sync::atomic::{AtomicBool, Ordering};

    let signer = Signer::new("k1", &[7; 32]);
    let router = Router::new(
        RouterConfig::default(),
        Some(signer.clone()),
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    let reflector = |name: &str| ObservedReflector {
        name: name.into(),
        pool: "ns/pool".into(),
        region: "local-a".into(),
        image: "img".into(),
        capacity: Capacity::default(),
        state: ReflectorState::Ready,
        unreported: false,
    };
    let publish = |on: &str| {
        router.publish(
            "local",
            FleetView {
                input: PlanInput {
                    reflectors: vec![reflector("r1"), reflector("r2")],
                    shards: vec![shard("lobby", Some(on), ShardPhase::Open)],
                    ..PlanInput::default()
                },
                urls: HashMap::from([
                    ("r1".into(), "http://r1.test/".into()),
                    ("r2".into(), "http://r2.test/".into()),
                ]),
                ..FleetView::default()
            },
        )
    };
    publish("r1");
    let key = ReportKey::new(&[3; 32]).unwrap();
    let leading = Arc::new(AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(router.clone(), Some(key.clone())).only_when(leading.clone()),
        std::future::pending(),
    ));
    let follower = |credential: String| {
        let table = Arc::new(WatchedTable::default());
        let metrics = GatewayMetrics::new(&prometheus::Registry::new());
        tokio::spawn(follow(
            WatchTarget {
                endpoint: endpoint.clone(),
                credential: Some(credential),
                region: "local-a".into(),
            },
            table.clone(),
            metrics.clone(),
            std::future::pending(),
        ));
        (table, metrics)
    };
    let (table, metrics) = follower(key.credential(GATEWAY_IDENTITY, "local-a").unwrap());
    // A reflector's credential is no gateway credential; nor is another key's.
    let (as_reflector, _) = follower(key.credential("r1", "local-a").unwrap());
    let (forged, _) = follower(
        ReportKey::new(&[4; 32])
            .unwrap()
            .credential(GATEWAY_IDENTITY, "local-a")
            .unwrap(),
    );

    until("the first table", || {
        table
            .placement(APP, "lobby")
            .is_ok_and(|p| p.reflector == "r1")
    })
    .await;
    assert!(table.verifier().is_some(), "the token keys came with it");
    assert_eq!(metrics.watch_connected.get(), 1);
    assert_eq!(metrics.placements.get(), 1);

    // Leadership lost: the stream ends, the last table keeps answering.
    leading.store(false, Ordering::Relaxed);
    publish("r2");
    until("the stream to end", || metrics.watch_connected.get() == 0).await;
    assert_eq!(table.placement(APP, "lobby").unwrap().reflector, "r1");

    // Leader again (or a new one): the gateway reconnects and resyncs the whole table.
    leading.store(true, Ordering::Relaxed);
    until("the resync after reconnecting", || {
        table
            .placement(APP, "lobby")
            .is_ok_and(|p| p.reflector == "r2")
    })
    .await;
    // A change on the open stream arrives without reconnecting.
    publish("r1");
    until("the flip back", || {
        table
            .placement(APP, "lobby")
            .is_ok_and(|p| p.reflector == "r1")
    })
    .await;
    assert!(as_reflector.verifier().is_none() && forged.verifier().is_none());
    assert_eq!(
        as_reflector.placement(APP, "lobby"),
        Err(refleet_operator::router::PlacementError::Unknown)
    );
}
