//! One port for everything: WebSocket sessions, files, health and metrics; and the drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, Request, State, WebSocketUpgrade};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::time::Instant;

use refleet_api::token::{KeyListError, Verifier};

use crate::admission::Admission;
use crate::connection;
use crate::metrics::Metrics;
use crate::session::Context;
use crate::session::core::Settings;
use crate::session::registry::Registry;
use refleet_api::reflector::config::{Config, Limits};
use refleet_files::endpoint::{Files, UploadLimits};
use refleet_files::storage::{Storage, StorageError};

/// Per-connection WebSocket read buffer, allocated up front for every connection; small, so
/// that idle connections stay cheap. Client frames are small (a SEND with a 64-byte payload is
/// ~150 bytes), tungstenite reserves room for a longer frame once it has read its header, and
/// a busy client's reads still carry several frames each.
const READ_BUFFER: usize = 1024;
/// Bytes gathered before tungstenite writes to the socket (we also flush once per batch).
const WRITE_BUFFER: usize = 16 * 1024;

/// Why a reflector could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--storage` could not be opened.
    #[error("opening --storage: {0}")]
    Storage(#[from] StorageError),
    /// `--token-keys` is malformed.
    #[error("--token-keys: {0}")]
    TokenKeys(#[from] KeyListError),
    /// `--report-token-file` could not be read.
    #[error("reading --report-token-file: {0}")]
    ReportToken(#[from] std::io::Error),
}

/// A configured reflector, ready to serve a listener.
#[derive(Debug, Clone)]
pub struct Reflector {
    registry: Arc<Registry>,
    files: Files,
    metrics: Metrics,
    limits: Arc<Limits>,
    region: String,
    /// The secret `/sessions` requires (this reflector's report credential), if any.
    sessions_secret: Option<Secret>,
}

/// A secret that stays out of Debug output.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Reflector {
    /// Opens the storage and prepares the shared state. `bound` is the listening address
    /// (used for the default public and files URLs).
    pub fn new(config: &Config, bound: SocketAddr) -> Result<Self, StartError> {
        let storage = Storage::open(&config.storage)?;
        let keys = Verifier::parse_list(&config.token_keys)?;
        let admission = Admission::new(config.require_join_token, keys);
        let limits = Arc::new(Limits::from(config));
        let metrics = Metrics::new(&config.region);
        let settings = Arc::new(Settings {
            reflector_name: config.reflector_name.clone(),
            default_tick: limits.default_tick,
            empty_session_ttl: limits.empty_session_ttl,
            rejoin_grace: limits.rejoin_grace,
            requ_messages: limits.requ_messages,
            max_messages: limits.max_messages,
            files_base: config.files_base(bound),
            max_retained_bytes: limits.max_retained_bytes,
        });
        let ctx = Arc::new(Context {
            storage: storage.clone(),
            metrics: metrics.clone(),
            settings,
            files_base: config.files_base(bound),
            snapshot_retention: limits.snapshot_retention,
            former_views: limits.former_views,
            admission,
            host: format!("{}-{:08x}", config.reflector_name, rand::random::<u32>()),
            checkpoint_interval: Some(limits.checkpoint_interval).filter(|d| !d.is_zero()),
        });
        let registry = Registry::new(ctx);
        let files = Files::new(
            storage,
            registry.clone(),
            metrics.files.clone(),
            UploadLimits {
                max_bytes: limits.max_upload_bytes,
                idle_timeout: limits.upload_idle_timeout,
                max_total: limits.max_uploads,
                max_per_peer: limits.max_uploads_per_peer,
            },
        );
        Ok(Self {
            registry,
            files,
            metrics,
            limits,
            region: config.region.clone(),
            sessions_secret: config.report_secret()?.map(Secret),
        })
    }

    /// The admission policy (join tokens, shard caps).
    pub fn admission(&self) -> &Arc<Admission> {
        &self.registry.context().admission
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The session registry (for tests and embedding).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Serves until `shutdown` completes, then drains: new sessions are refused, live ones
    /// are served until they end or the drain timeout passes, then stored and closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let registry = self.registry.clone();
        let drain_timeout = self.limits.drain_timeout;
        let app = Arc::new(self);
        let router = Router::new().fallback(entry).with_state(app);
        let drain = async move {
            shutdown.await;
            tracing::info!(sessions = registry.session_count(), timeout = ?drain_timeout, "draining");
            registry.begin_drain().await;
            let deadline = Instant::now() + drain_timeout;
            while registry.session_count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            registry.drain_all().await;
            registry.wait_all().await;
            tracing::info!("drained");
        };
        // Frames are small and latency matters more than packet count: without TCP_NODELAY a
        // lone RECV can wait ~40 ms for the peer's delayed ACK. Writers batch on their own.
        let listener =
            axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY not set");
                }
            });
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(drain)
        .await
    }
}

fn text(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

async fn entry(
    State(app): State<Arc<Reflector>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    req: Request,
) -> Response {
    let path = req.uri().path().to_string();
    if let Ok(ws) = ws {
        return upgrade(&app, ws, &path, peer);
    }
    match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if app.registry.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else {
                text(StatusCode::OK, "ready\n".into())
            }
        }
        "/sessions" if !may_read_sessions(&app, &req, peer) => text(
            StatusCode::FORBIDDEN,
            "/sessions needs `authorization: Bearer <report token>` or a loopback client\n".into(),
        ),
        "/sessions" => {
            // Per-session figures for the operator (and debugging); bounded by the sessions
            // in memory, and kept out of Prometheus labels on purpose.
            let body = crate::session::registry::SessionsReport {
                region: app.region.clone(),
                draining: app.registry.is_draining(),
                sessions: app.registry.summaries(),
            };
            let body = serde_json::to_string(&body).unwrap_or_default();
            let mut res = (StatusCode::OK, body).into_response();
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        "/metrics" => {
            let mut res = text(StatusCode::OK, app.metrics.render());
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            res
        }
        "/" => text(
            StatusCode::OK,
            "Refleet reflector. Join with box: \"<this URL>\"; files under /files/; /healthz, /readyz, /metrics.\n".into(),
        ),
        p => match p.strip_prefix("/files/") {
            Some(rest) => {
                let (parts, body) = req.into_parts();
                let body: Body = body;
                app.files.handle(&parts.method, rest, &parts.headers, body, peer.ip()).await
            }
            None => text(StatusCode::NOT_FOUND, "not found\n".into()),
        },
    }
}

/// `/sessions` names every session, its users and their addresses, so it is not for the
/// public: it needs this reflector's report credential, which the operator can mint, or a client on a
/// loopback address (the same machine or pod).
fn may_read_sessions(app: &Reflector, req: &Request, peer: SocketAddr) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let Some(secret) = &app.sessions_secret else {
        return false;
    };
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), secret.0.as_bytes()))
}

/// Compares without an early exit, so the time taken does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn upgrade(app: &Arc<Reflector>, ws: WebSocketUpgrade, path: &str, peer: SocketAddr) -> Response {
    let session_id: Arc<str> = Arc::from(connection::session_id_from_path(path));
    if app.registry.is_draining() && !app.registry.contains(&session_id) {
        // The client sees a failed connection and retries later, as for upstream's refusal.
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "reflector draining\n".into(),
        );
    }
    if app.metrics.connections.get() as usize >= app.limits.max_connections {
        tracing::warn!(peer = %peer, "connection limit reached, upgrade refused");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached\n".into(),
        );
    }
    // Frames a little over the limit are read whole and refused with a clean 1009; far larger
    // ones are cut off by the WebSocket layer itself.
    let hard_limit = app.limits.max_frame_bytes.saturating_mul(2).max(64 * 1024);
    let token = app.registry.context().admission.check_path(path);
    let (registry, limits) = (app.registry.clone(), app.limits.clone());
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| {
            connection::serve(socket, session_id, token, peer, registry, limits)
        })
}
