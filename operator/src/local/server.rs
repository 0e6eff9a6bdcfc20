//! refleet up's own HTTP server: the pool's `/files/` (from the shared storage, so files
//! URLs outlive any one reflector), `GET /v1/status`, `GET /v1/shards` and `/healthz`.
//!
//! Downloads are open (contents are end-to-end encrypted). An upload is accepted only under
//! the path of a session with connected users on some reflector of the fleet: refleet up
//! knows them from the reflectors' `/sessions`, polled every tick, and polls them again at
//! once before refusing an upload it has not seen (a session may have started since).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::BoxFuture;
use refleet_reflector::files::{Files, Upload, UploadGate};
use refleet_reflector::storage::Storage;
use serde::Deserialize;

use super::fleet::Status;
use super::launcher::{ReportedSession, fetch_sessions};
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

/// Accepts an upload when a session with connected users on any reflector of the fleet owns
/// its path.
#[derive(Debug, Clone)]
pub struct FleetGate {
    /// Published by the fleet loop.
    pub shared: Shared,
    /// For the fresh `/sessions` poll before refusing an upload.
    pub http: reqwest::Client,
}

impl Server {
    /// A server for the fleet's shared state, serving `/files/` from `storage`.
    pub fn new(shared: Shared, storage: Storage, max_upload_bytes: usize) -> Self {
        let gate = FleetGate {
            shared: shared.clone(),
            http: http_client(),
        };
        let files = Files {
            storage,
            gate: Arc::new(gate),
            metrics: refleet_reflector::metrics::Metrics::new("local"),
            max_upload_bytes,
        };
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
            .route("/v1/shards", get(shards))
            .route("/files/{*path}", axum::routing::any(files))
            .route("/metrics", get(metrics))
            .route(prom::TARGETS_PATH, get(prometheus_targets))
            .route(
                "/",
                get(|| async {
                    "refleet up: GET /v1/status, GET /v1/shards?namespace=&session=, /files/\n"
                }),
            )
            .with_state(self)
    }

    fn read<T>(&self, f: impl FnOnce(&Published) -> T) -> T {
        read(&self.shared, f)
    }
}

impl FleetGate {
    fn read<T>(&self, f: impl FnOnce(&Published) -> T) -> T {
        read(&self.shared, f)
    }

    /// Whether some reflector has a session with users owning this upload path.
    fn owns(live: &[ReportedSession], kind: &Upload<'_>) -> bool {
        live.iter().any(|s| match kind {
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
        })
    }

    async fn upload_allowed(&self, kind: &Upload<'_>) -> bool {
        if self.read(|p| Self::owns(&p.live, kind)) {
            return true;
        }
        let urls: Vec<String> = self.read(|p| {
            p.status
                .regions
                .iter()
                .flat_map(|r| r.reflectors.iter())
                .filter_map(|r| r.url.clone())
                .collect()
        });
        for url in urls {
            if let Some(sessions) = fetch_sessions(&self.http, &url).await {
                let live: Vec<ReportedSession> =
                    sessions.into_iter().filter(|s| s.users > 0).collect();
                if Self::owns(&live, kind) {
                    return true;
                }
            }
        }
        false
    }
}

impl UploadGate for FleetGate {
    fn allows<'a>(&'a self, upload: &'a Upload<'a>) -> BoxFuture<'a, bool> {
        Box::pin(self.upload_allowed(upload))
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

/// Query of `GET /v1/shards`.
#[derive(Debug, Deserialize)]
struct ShardsQuery {
    /// Namespace of the Session (default `default`).
    namespace: Option<String>,
    /// Name of the Session object.
    session: Option<String>,
}

async fn shards(State(server): State<Server>, Query(q): Query<ShardsQuery>) -> Response {
    let Some(session) = q.session else {
        return plain(
            StatusCode::BAD_REQUEST,
            "the session query parameter is required",
        );
    };
    let namespace = q.namespace.unwrap_or_else(|| "default".to_owned());
    let shards: Vec<_> = server.read(|p| {
        p.status
            .shards
            .iter()
            .filter(|s| s.session == session && s.namespace == namespace)
            .cloned()
            .collect()
    });
    json(&serde_json::json!({
        "namespace": namespace,
        "session": session,
        "shards": shards,
    }))
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

async fn files(State(server): State<Server>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path()
        .strip_prefix("/files/")
        .unwrap_or_default()
        .to_owned();
    server
        .files
        .handle(&parts.method, &path, &parts.headers, body)
        .await
}

/// A client for the fresh `/sessions` poll.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_with(live: Vec<ReportedSession>) -> FleetGate {
        let shared: Shared = Arc::new(RwLock::new(Published {
            status: Status::default(),
            live,
        }));
        FleetGate {
            shared,
            http: http_client(),
        }
    }

    fn session(id: &str, app: &str, pid: &str) -> ReportedSession {
        ReportedSession {
            session_id: id.into(),
            name: Some(format!("{app}/lobby")),
            app_id: Some(app.into()),
            persistent_id: Some(pid.into()),
            users: 2,
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
        assert!(gate.allows(&snapshot).await);
        assert!(gate.allows(&persisted).await);
        assert!(gate.allows(&keyless).await);
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
        assert!(!gate.allows(&other_session).await);
        assert!(!gate.allows(&other_app).await);
        assert!(!gate.allows(&other_pid).await);
        assert!(!gate_with(vec![]).allows(&persisted).await);
    }
}
