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
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use refleet_reflector::files::{Upload, classify, valid_segments};
use refleet_reflector::storage::{PutOutcome, Storage, StorageError};
use serde::Deserialize;

use super::fleet::Status;
use super::launcher::{ReportedSession, fetch_sessions};

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

/// Everything the server needs.
#[derive(Clone)]
pub struct Server {
    /// Published by the fleet loop.
    pub shared: Shared,
    /// The pool's storage.
    pub storage: Storage,
    /// Largest upload, in bytes.
    pub max_upload_bytes: usize,
    /// For the fresh `/sessions` poll before refusing an upload.
    pub http: reqwest::Client,
}

impl Server {
    /// The axum router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/v1/status", get(status))
            .route("/v1/shards", get(shards))
            .route("/files/{*path}", axum::routing::any(files))
            .route(
                "/",
                get(|| async {
                    "refleet up: GET /v1/status, GET /v1/shards?namespace=&session=, /files/\n"
                }),
            )
            .with_state(self)
    }

    fn read<T>(&self, f: impl FnOnce(&Published) -> T) -> T {
        let guard = self
            .shared
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&guard)
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

fn cors(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    res
}

async fn files(State(server): State<Server>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path()
        .strip_prefix("/files/")
        .unwrap_or_default()
        .to_owned();
    let res = files_inner(&server, &parts.method, &path, &parts.headers, body).await;
    let status = res.status().as_u16();
    if res.status().is_client_error() || res.status().is_server_error() {
        tracing::info!(method = %parts.method, %path, status, "files request refused");
    } else {
        tracing::debug!(method = %parts.method, %path, status, "files request");
    }
    cors(res)
}

async fn files_inner(
    server: &Server,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    if *method == Method::OPTIONS {
        return StatusCode::NO_CONTENT.into_response();
    }
    let segments: Vec<&str> = path.split('/').collect();
    if let Err(why) = valid_segments(&segments) {
        return plain(StatusCode::BAD_REQUEST, why);
    }
    match *method {
        Method::GET | Method::HEAD => download(server, &segments, *method == Method::HEAD).await,
        Method::PUT => upload(server, &segments, headers, body).await,
        _ => plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "files support GET, HEAD, PUT and OPTIONS",
        ),
    }
}

async fn download(server: &Server, segments: &[&str], head_only: bool) -> Response {
    let immutable = matches!(
        classify(segments),
        Some(Upload::Snapshot { .. } | Upload::KeylessSnapshot { .. })
    );
    let (size, body) = if head_only {
        match server.storage.head_file(segments).await {
            Ok(Some(size)) => (size, Body::empty()),
            Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
            Err(e) => return storage_failure(&e),
        }
    } else {
        match server.storage.get_file(segments).await {
            Ok(Some((size, got))) => match got.bytes().await {
                Ok(bytes) => (size, Body::from(bytes)),
                Err(e) => return storage_failure(&e.into()),
            },
            Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
            Err(e) => return storage_failure(&e),
        }
    };
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    res
}

async fn upload(server: &Server, segments: &[&str], headers: &HeaderMap, body: Body) -> Response {
    let Some(kind) = classify(segments) else {
        return plain(
            StatusCode::FORBIDDEN,
            "uploads are accepted only at snapshot and persisted-data paths",
        );
    };
    if !server.upload_allowed(&kind).await {
        return plain(
            StatusCode::FORBIDDEN,
            "no session with a connected client on any reflector of this fleet owns this path",
        );
    }
    let too_large = || plain(StatusCode::PAYLOAD_TOO_LARGE, "upload too large");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > server.max_upload_bytes as u64) {
        return too_large();
    }
    let Ok(bytes): Result<Bytes, _> = axum::body::to_bytes(body, server.max_upload_bytes).await
    else {
        return too_large();
    };
    let write_once = !matches!(kind, Upload::Persisted { .. });
    match server.storage.put_file(segments, bytes, write_once).await {
        Ok(PutOutcome::Created) => plain(StatusCode::CREATED, "stored"),
        Ok(PutOutcome::Replaced) => plain(StatusCode::OK, "replaced"),
        Ok(PutOutcome::Unchanged) => plain(StatusCode::OK, "already stored"),
        Err(StorageError::Conflict(_)) => plain(StatusCode::CONFLICT, "snapshots are write-once"),
        Err(e) => storage_failure(&e),
    }
}

fn storage_failure(e: &StorageError) -> Response {
    tracing::error!(error = %e, "files storage error");
    plain(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
}

/// A client for the fresh `/sessions` poll.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap_or_default()
}
