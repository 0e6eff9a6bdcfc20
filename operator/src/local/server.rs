//! refleet up's own HTTP server: the pool's `/files/` (from the shared storage, so files
//! URLs outlive any one reflector), `GET /v1/status`, `/healthz`, and `POST /v1/moves` (a
//! move by hand, from this machine only; [`moves_app`]). `refleet up` merges the
//! router's app into it, which adds `GET /v1/route` and `GET /v1/shards` (the same JSON as in a
//! cluster), and the fleet view's (`GET /`, [`crate::view`]).
//!
//! Downloads are open (contents are end-to-end encrypted). An upload is accepted only under
//! the path of a session that has an admitted member connected from the uploader's address
//! on some reflector of the fleet: refleet up knows them from the reflectors' `/sessions`,
//! polled every tick, and polls them again before refusing an upload it has not seen (a
//! session may have started since) — at most once per [`REFRESH_GAP`], shared by every
//! upload waiting meanwhile, so refused uploads cannot multiply into polls of the fleet.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use refleet_api::reflector::config::Limits;
use refleet_files::endpoint::{Files, Upload, UploadGate, UploadLimits};
use refleet_files::storage::Storage;
use serde::Deserialize;
use tokio::time::Instant;

use super::fleet::Status;
use super::launcher::{ReportedSession, fetch_sessions, sessions_client};
use super::prometheus::{self as prom, Endpoint};

/// What the fleet loop publishes for the server.
#[derive(Debug, Default)]
pub struct Published {
    /// The status.
    pub status: Status,
    /// Sessions with connected users, on any reflector.
    pub live: Vec<ReportedSession>,
}

/// State shared by the fleet loop (writer) and the server (reader).
pub type Shared = Arc<RwLock<Published>>;

fn read<T>(shared: &Shared, f: impl FnOnce(&Published) -> T) -> T {
    let guard = shared
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f(&guard)
}

/// Everything the server needs.
#[derive(Clone)]
pub struct Server {
    /// Published by the fleet loop.
    pub shared: Shared,
    /// The pool's files endpoint: the reflector's own handler, gated by [`FleetGate`].
    pub files: Files,
    /// `/metrics` and `/v1/prometheus/targets` (404 while `None`).
    pub prometheus: Option<Endpoint>,
}

/// A move asked for by hand: `POST /v1/moves` with this JSON body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MoveBody {
    /// The Session's namespace (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The Session's name (an exact-name Session, or a name a pattern Session covers).
    pub session: String,
    /// The shard to move (`lobby`, `lobby~1`, …).
    pub shard: String,
    /// The reflector to move it to; absent: the planner picks one in the shard's region.
    #[serde(default)]
    pub to: Option<String>,
}

fn default_namespace() -> String {
    "default".to_owned()
}

/// `POST /v1/moves`: asks the planner to move a shard (maintenance). Accepted only from
/// loopback addresses: a move sends a shard's clients to another reflector, which is the
/// operator's call, never a client's. 202 with the session key once queued; 400 when the
/// pool has moves off or the target does not fit; 404 for an unknown session or shard; 403
/// from another machine.
pub fn moves_app(router: Arc<crate::router::Router>) -> Router {
    Router::new()
        .route("/v1/moves", axum::routing::post(move_shard))
        .with_state(router)
}

async fn move_shard(
    State(router): State<Arc<crate::router::Router>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    body: Result<axum::Json<MoveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !peer.ip().is_loopback() {
        return plain(
            StatusCode::FORBIDDEN,
            "moves are accepted from this machine only\n",
        );
    }
    let axum::Json(b) = match body {
        Ok(b) => b,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    use crate::router::RouteError;
    match router.request_move(&b.namespace, &b.session, &b.shard, b.to.clone()) {
        Ok(key) => {
            tracing::info!(session = %key, shard = %b.shard, to = ?b.to, "move asked for by hand");
            (
                StatusCode::ACCEPTED,
                json(&serde_json::json!({"session": key, "shard": b.shard, "to": b.to})),
            )
                .into_response()
        }
        Err(e @ RouteError::NotFound(_)) => plain(StatusCode::NOT_FOUND, &format!("{e}\n")),
        Err(e) => plain(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    }
}

/// The shortest time between two fresh `/sessions` polls for uploads not seen in the
/// published list.
pub const REFRESH_GAP: Duration = Duration::from_millis(500);

/// Accepts an upload when a session owning its path has an admitted member connected from
/// the uploader's address, on any reflector of the fleet.
#[derive(Debug)]
pub struct FleetGate {
    /// Published by the fleet loop.
    pub shared: Shared,
    /// For the fresh `/sessions` poll before refusing an upload.
    pub http: reqwest::Client,
    /// The shortest time between two fresh polls ([`REFRESH_GAP`]).
    pub refresh_gap: Duration,
    /// The last fresh poll: when it ended and what it found. Held while polling, so
    /// concurrent refusals wait for one poll instead of starting their own.
    fresh: tokio::sync::Mutex<Option<(Instant, Vec<ReportedSession>)>>,
}

impl Server {
    /// A server for the fleet's shared state, serving `/files/` from `storage`; `http`
    /// polls the reflectors' `/sessions` (see [`sessions_client`]).
    pub fn new(
        shared: Shared,
        storage: Storage,
        max_upload_bytes: usize,
        http: reqwest::Client,
    ) -> Self {
        let gate = FleetGate::new(shared.clone(), http);
        // The reflector's own defaults for the rest (idle timeout, concurrency caps).
        let defaults = Limits::default();
        let files = Files::new(
            storage,
            Arc::new(gate),
            refleet_files::metrics::FilesMetrics::unexported(),
            UploadLimits {
                max_bytes: max_upload_bytes,
                idle_timeout: defaults.upload_idle_timeout,
                max_total: defaults.max_uploads,
                max_per_peer: defaults.max_uploads_per_peer,
            },
        );
        Self {
            shared,
            files,
            prometheus: None,
        }
    }
}

impl Server {
    /// The axum router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/v1/status", get(status))
            .route("/files/{*path}", axum::routing::any(files))
            .route("/metrics", get(metrics))
            .route(prom::TARGETS_PATH, get(prometheus_targets))
            .with_state(self)
    }

    fn read<T>(&self, f: impl FnOnce(&Published) -> T) -> T {
        read(&self.shared, f)
    }
}

impl FleetGate {
    /// A gate reading `shared`, polling with `http`.
    pub fn new(shared: Shared, http: reqwest::Client) -> Self {
        Self {
            shared,
            http,
            refresh_gap: REFRESH_GAP,
            fresh: tokio::sync::Mutex::new(None),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Published) -> T) -> T {
        read(&self.shared, f)
    }

    /// Whether some reflector has a session owning this upload path with a member
    /// connected from `peer`.
    fn owns(live: &[ReportedSession], kind: &Upload<'_>, peer: IpAddr) -> bool {
        live.iter().any(|s| {
            let path_ok = match kind {
                Upload::Snapshot {
                    app_id,
                    persistent_id,
                    session_id,
                } => {
                    s.app_id.as_deref() == Some(app_id)
                        && s.persistent_id.as_deref() == Some(persistent_id)
                        && s.session_id == *session_id
                }
                Upload::Persisted {
                    app_id,
                    persistent_id,
                } => {
                    s.app_id.as_deref() == Some(app_id)
                        && s.persistent_id.as_deref() == Some(persistent_id)
                }
                Upload::KeylessSnapshot { session_id } => s.session_id == *session_id,
            };
            path_ok && s.peers.contains(&peer)
        })
    }

    async fn upload_allowed(&self, kind: &Upload<'_>, peer: IpAddr) -> bool {
        if self.read(|p| Self::owns(&p.live, kind, peer)) {
            return true;
        }
        let asked_at = Instant::now();
        let mut fresh = self.fresh.lock().await;
        // A poll that ended after this upload arrived (it waited for it), or one within the
        // gap, answers it too.
        if let Some((ended, live)) = fresh.as_ref()
            && (*ended >= asked_at || ended.elapsed() < self.refresh_gap)
        {
            return Self::owns(live, kind, peer);
        }
        let live = self.poll_fleet().await;
        let allowed = Self::owns(&live, kind, peer);
        *fresh = Some((Instant::now(), live));
        allowed
    }

    /// Every reflector's sessions with users, asked now (all reflectors at once).
    async fn poll_fleet(&self) -> Vec<ReportedSession> {
        let urls: Vec<String> = self.read(|p| {
            p.status
                .regions
                .iter()
                .flat_map(|r| r.reflectors.iter())
                .filter_map(|r| r.url.clone())
                .collect()
        });
        let http = &self.http;
        futures_util::future::join_all(urls.iter().map(|url| fetch_sessions(http, url, None)))
            .await
            .into_iter()
            .flatten()
            .flatten()
            .filter(|s| s.users > 0)
            .collect()
    }
}

impl UploadGate for FleetGate {
    fn allows<'a>(&'a self, upload: &'a Upload<'a>, peer: IpAddr) -> BoxFuture<'a, bool> {
        Box::pin(self.upload_allowed(upload, peer))
    }
}

fn json(value: &impl serde::Serialize) -> Response {
    let mut res = axum::Json(value).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn status(State(server): State<Server>) -> Response {
    server.read(|p| json(&p.status))
}

fn plain(status: StatusCode, text: &str) -> Response {
    let mut res = (status, format!("{text}\n")).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

async fn metrics(State(server): State<Server>) -> Response {
    let Some(endpoint) = &server.prometheus else {
        return plain(StatusCode::NOT_FOUND, "no metrics");
    };
    let mut res = endpoint.exporter.render().into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prom::CONTENT_TYPE),
    );
    res
}

/// Query of `GET /v1/prometheus/targets`.
#[derive(Debug, Deserialize)]
struct TargetsQuery {
    /// Only this job's targets (`refleet-operator` or `refleet-reflector`).
    job: Option<String>,
}

/// Prometheus HTTP service discovery: refleet up itself and every live reflector.
async fn prometheus_targets(
    State(server): State<Server>,
    Query(q): Query<TargetsQuery>,
) -> Response {
    let Some(endpoint) = &server.prometheus else {
        return plain(StatusCode::NOT_FOUND, "no metrics");
    };
    server.read(|p| {
        json(&prom::targets(
            &endpoint.address,
            &p.status,
            q.job.as_deref(),
        ))
    })
}

async fn files(
    State(server): State<Server>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path()
        .strip_prefix("/files/")
        .unwrap_or_default()
        .to_owned();
    server
        .files
        .handle(&parts.method, &path, &parts.headers, body, peer.ip())
        .await
}

/// A client for the fresh `/sessions` poll, without the report secret (for tests).
pub fn http_client() -> reqwest::Client {
    sessions_client()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::local::fleet::{ReflectorView, RegionView};

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const ELSEWHERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 8, 7));

    fn gate_with(live: Vec<ReportedSession>) -> FleetGate {
        let shared: Shared = Arc::new(RwLock::new(Published {
            status: Status::default(),
            live,
        }));
        FleetGate::new(shared, http_client())
    }

    fn session(id: &str, app: &str, pid: &str) -> ReportedSession {
        ReportedSession {
            session_id: id.into(),
            name: Some(format!("{app}/lobby")),
            app_id: Some(app.into()),
            persistent_id: Some(pid.into()),
            users: 2,
            peers: vec![HERE],
        }
    }

    #[tokio::test]
    async fn uploads_are_allowed_only_for_sessions_live_somewhere_in_the_fleet() {
        let gate = gate_with(vec![session("sid", "io.app", "pid")]);
        let snapshot = Upload::Snapshot {
            app_id: "io.app",
            persistent_id: "pid",
            session_id: "sid",
        };
        let persisted = Upload::Persisted {
            app_id: "io.app",
            persistent_id: "pid",
        };
        let keyless = Upload::KeylessSnapshot { session_id: "sid" };
        assert!(gate.allows(&snapshot, HERE).await);
        assert!(gate.allows(&persisted, HERE).await);
        assert!(gate.allows(&keyless, HERE).await);
        // The right path, but no member of the session connected from that address.
        assert!(!gate.allows(&snapshot, ELSEWHERE).await);
        assert!(!gate.allows(&persisted, ELSEWHERE).await);
        // Another session, app or persistentId: refused (no reflector to ask again here).
        let other_session = Upload::Snapshot {
            app_id: "io.app",
            persistent_id: "pid",
            session_id: "other",
        };
        let other_app = Upload::Persisted {
            app_id: "io.other",
            persistent_id: "pid",
        };
        let other_pid = Upload::Persisted {
            app_id: "io.app",
            persistent_id: "pid2",
        };
        assert!(!gate.allows(&other_session, HERE).await);
        assert!(!gate.allows(&other_app, HERE).await);
        assert!(!gate.allows(&other_pid, HERE).await);
        assert!(!gate_with(vec![]).allows(&persisted, HERE).await);
    }

    /// A stand-in reflector whose `/sessions` counts its callers and lists nothing.
    async fn counting_reflector(hits: Arc<AtomicUsize>) -> String {
        let app = Router::new().route(
            "/sessions",
            get(move || {
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    axum::Json(serde_json::json!({"sessions": []}))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn refused_uploads_share_one_fresh_poll_of_the_fleet() {
        let hits = Arc::new(AtomicUsize::new(0));
        let mut reflectors = Vec::new();
        for i in 0..3 {
            reflectors.push(ReflectorView {
                name: format!("r{i}"),
                pid: None,
                cpu_percent: None,
                rss_bytes: None,
                state: "Ready",
                url: Some(counting_reflector(hits.clone()).await),
                files_url: String::new(),
                users: 0,
                shards: vec![],
            });
        }
        let shared: Shared = Arc::new(RwLock::new(Published {
            status: Status {
                regions: vec![RegionView {
                    pool: "default/p".into(),
                    name: "local".into(),
                    desired: 3,
                    reflectors,
                }],
                ..Status::default()
            },
            live: vec![],
        }));
        let mut gate = FleetGate::new(shared, http_client());
        // Long enough that no second refresh falls within this test, however slow the machine.
        gate.refresh_gap = Duration::from_secs(3600);
        let foreign = Upload::Persisted {
            app_id: "com.victim",
            persistent_id: "pid",
        };
        // Fifty refused uploads at once, then fifty more in a row: one poll of each reflector,
        // not one per refusal.
        let refusals = (0..50).map(|_| gate.allows(&foreign, ELSEWHERE));
        assert!(
            futures_util::future::join_all(refusals)
                .await
                .iter()
                .all(|allowed| !allowed)
        );
        for _ in 0..50 {
            assert!(!gate.allows(&foreign, ELSEWHERE).await);
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            3,
            "/sessions requests for 100 refused uploads"
        );
    }
}
