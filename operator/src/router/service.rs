//! The router's front doors, one code path behind all three: gRPC (`refleet.routing.v1`,
//! with gRPC health and server reflection), gRPC-Web for browsers, and JSON
//! (`GET /v1/route`, `GET /v1/shards`) with CORS. API keys, allowed origins and a
//! per-client rate limit apply to every transport.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use refleet_api::routing::routing_server::{Routing, RoutingServer};
use refleet_api::routing::{ListShardsRequest, ListShardsResponse, RouteRequest, RouteResponse};
use serde::Deserialize;
use tokio::time::Instant;
use tonic_types::{ErrorDetails, StatusExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{RouteError, Router};

/// Who may call Route, and how often.
#[derive(Debug)]
pub struct Access {
    /// API key → appId it is valid for. Empty: no key needed.
    keys: HashMap<String, String>,
    /// Allowed browser origins; `None`: any.
    origins: Option<Vec<String>>,
    limiter: DefaultKeyedRateLimiter<String>,
}

/// A bad API-keys directory.
#[derive(Debug, thiserror::Error)]
#[error("reading API keys from {path}: {source}")]
pub struct KeysError {
    path: String,
    source: std::io::Error,
}

impl Access {
    /// Access rules: `keys` maps API key → appId; `origins` of `["*"]` or empty allows any;
    /// `rate` calls per second per client (API key, else IP), with a burst of twice that.
    pub fn new(keys: HashMap<String, String>, origins: &[String], rate: u32) -> Self {
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        let origins = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect::<Vec<_>>();
        Self {
            keys,
            origins: (!origins.is_empty() && !origins.iter().any(|o| o == "*")).then_some(origins),
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// Reads API keys from a directory (a mounted Secret): each file is named after an
    /// appId and holds that app's key (one per line; several allow rotation).
    pub fn read_keys(dir: &Path) -> Result<HashMap<String, String>, KeysError> {
        let err = |source| KeysError {
            path: dir.display().to_string(),
            source,
        };
        let mut keys = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Secret volumes hold `..data` links and dot-directories; skip them.
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let text = std::fs::read_to_string(entry.path()).map_err(err)?;
            for key in text.lines().map(str::trim).filter(|k| !k.is_empty()) {
                keys.insert(key.to_owned(), name.clone());
            }
        }
        Ok(keys)
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.origins
            .as_ref()
            .is_none_or(|list| list.iter().any(|o| o == origin))
    }

    /// Checks origin and rate before the Session is known; returns the presented key.
    fn admit(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Option<String>, RouteError> {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
            && !self.origin_allowed(origin)
        {
            return Err(RouteError::PermissionDenied(format!(
                "origin {origin:?} is not allowed"
            )));
        }
        let key = presented_key(headers);
        let client = key
            .clone()
            .or_else(|| peer.map(|p| p.to_string()))
            .unwrap_or_default();
        if let Err(not_until) = self.limiter.check_key(&client) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(RouteError::Exhausted {
                message: "rate limit for this client exceeded".into(),
                retry_after: wait.max(Duration::from_millis(100)),
            });
        }
        Ok(key)
    }

    /// Checks the key against the Session's appId.
    fn authorize(&self, key: Option<&str>, app_id: &str) -> Result<(), RouteError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let Some(key) = key else {
            return Err(RouteError::Unauthenticated(
                "an API key is required (x-api-key header)".into(),
            ));
        };
        match self.keys.get(key) {
            None => Err(RouteError::Unauthenticated("unknown API key".into())),
            Some(app) if app != app_id => Err(RouteError::PermissionDenied(format!(
                "this API key is not valid for appId {app_id:?}"
            ))),
            Some(_) => Ok(()),
        }
    }
}

fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim().to_owned());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| k.trim().to_owned())
}

/// Everything the front doors share.
#[derive(Debug, Clone)]
pub struct Frontend {
    /// The router.
    pub router: Arc<Router>,
    /// Access rules.
    pub access: Arc<Access>,
    /// Whether this replica leads (only the leader routes).
    pub leading: Arc<AtomicBool>,
}

impl Frontend {
    /// The one code path behind every transport.
    pub async fn route(
        &self,
        transport: &str,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        req: RouteRequest,
    ) -> Result<RouteResponse, RouteError> {
        let started = Instant::now();
        let result = self.route_inner(headers, peer, &req).await;
        let code = result.as_ref().map_or_else(RouteError::code, |_| "OK");
        self.router
            .metrics
            .request(transport, code, started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(transport, namespace = %req.namespace, session = %req.session, code, error = %e, "Route refused");
        }
        result
    }

    async fn route_inner(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        req: &RouteRequest,
    ) -> Result<RouteResponse, RouteError> {
        if !self.leading.load(Ordering::Relaxed) {
            return Err(RouteError::Unavailable(
                "not the leader; retry (the Service selects the leader)".into(),
            ));
        }
        let key = self.access.admit(headers, peer)?;
        self.router
            .route(req, |app| self.access.authorize(key.as_deref(), app))
            .await
    }

    fn list(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        ns: &str,
        session: &str,
    ) -> Result<ListShardsResponse, RouteError> {
        if !self.leading.load(Ordering::Relaxed) {
            return Err(RouteError::Unavailable("not the leader".into()));
        }
        self.access.admit(headers, peer)?;
        Ok(ListShardsResponse {
            shards: self.router.list_shards(ns, session)?,
        })
    }
}

/// The gRPC error for a route error (RetryInfo / BadRequest details as google.rpc types).
pub fn status(e: &RouteError) -> tonic::Status {
    use tonic::Code;
    let msg = e.to_string();
    match e {
        RouteError::InvalidArgument { field, message } => tonic::Status::with_error_details(
            Code::InvalidArgument,
            msg,
            ErrorDetails::with_bad_request_violation(*field, message.clone()),
        ),
        RouteError::NotFound(_) => tonic::Status::not_found(msg),
        RouteError::Exhausted { retry_after, .. } => tonic::Status::with_error_details(
            Code::ResourceExhausted,
            msg,
            ErrorDetails::with_retry_info(Some(*retry_after)),
        ),
        RouteError::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
        RouteError::PermissionDenied(_) => tonic::Status::permission_denied(msg),
        RouteError::Unavailable(_) => tonic::Status::unavailable(msg),
    }
}

fn transport_of(headers: &HeaderMap) -> &'static str {
    let grpc_web = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc-web"));
    if grpc_web { "grpc_web" } else { "grpc" }
}

#[tonic::async_trait]
impl Routing for Frontend {
    async fn route(
        &self,
        request: tonic::Request<RouteRequest>,
    ) -> Result<tonic::Response<RouteResponse>, tonic::Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, req) = request.into_parts();
        let headers = metadata.into_headers();
        let transport = transport_of(&headers);
        Frontend::route(self, transport, &headers, peer, req)
            .await
            .map(tonic::Response::new)
            .map_err(|e| status(&e))
    }

    async fn list_shards(
        &self,
        request: tonic::Request<ListShardsRequest>,
    ) -> Result<tonic::Response<ListShardsResponse>, tonic::Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (metadata, _, req) = request.into_parts();
        let headers = metadata.into_headers();
        self.list(&headers, peer, &req.namespace, &req.session)
            .map(tonic::Response::new)
            .map_err(|e| status(&e))
    }
}

/// Query of `GET /v1/route` (proto3 JSON names; `region` is accepted for `preferredRegion`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    session: String,
    #[serde(default, alias = "region")]
    preferred_region: String,
    #[serde(default)]
    user_id: String,
}

#[derive(Debug, Deserialize)]
struct ShardsQuery {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    session: String,
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut res = (status, body.to_string()).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn json_error(e: &RouteError) -> Response {
    let status = match e {
        RouteError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        RouteError::NotFound(_) => StatusCode::NOT_FOUND,
        RouteError::Exhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
        RouteError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        RouteError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        RouteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = serde_json::json!({"code": e.code(), "message": e.to_string()});
    if let RouteError::InvalidArgument { field, .. } = e {
        body["field"] = serde_json::json!(field);
    }
    let mut res = json_response(status, body);
    if let RouteError::Exhausted { retry_after, .. } = e {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    res
}

/// Formats a timestamp as RFC 3339 (proto3 JSON form of google.protobuf.Timestamp).
fn rfc3339(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map(|t| {
        let secs = u64::try_from(t.seconds).unwrap_or(0);
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .to_string()
    })
    .unwrap_or_default()
}

async fn json_route(
    State(f): State<Frontend>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return json_error(&RouteError::InvalidArgument {
            field: "query",
            message: "not a valid query string".into(),
        });
    };
    let req = RouteRequest {
        namespace: q.namespace,
        session: q.session,
        preferred_region: q.preferred_region,
        user_id: q.user_id,
    };
    match f.route("json", &headers, Some(peer.ip()), req).await {
        Ok(r) => json_response(
            StatusCode::OK,
            serde_json::json!({
                "shard": r.shard,
                "reflectorUrl": r.reflector_url,
                "filesUrl": r.files_url,
                "region": r.region,
                "joinToken": r.join_token,
                "tokenExpiresAt": rfc3339(r.token_expires_at.as_ref()),
                "appId": r.app_id,
            }),
        ),
        Err(e) => json_error(&e),
    }
}

async fn json_shards(
    State(f): State<Frontend>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<ShardsQuery>,
) -> Response {
    match f.list(&headers, Some(peer.ip()), &q.namespace, &q.session) {
        Ok(r) => json_response(
            StatusCode::OK,
            serde_json::json!({"shards": r.shards.iter().map(|s| serde_json::json!({
                "shard": s.shard, "region": s.region, "reflector": s.reflector, "users": s.users,
                "reserved": s.reserved, "maxUsers": s.max_users, "thresholdUsers": s.threshold_users, "state": s.state,
            })).collect::<Vec<_>>()}),
        ),
        Err(e) => json_error(&e),
    }
}

/// The router's HTTP app: gRPC + gRPC-Web + health + reflection + JSON, with CORS.
pub async fn app(frontend: Frontend) -> axum::Router {
    app_with(frontend, true).await
}

/// [`app`], optionally without `GET /v1/shards` (`refleet up` has its own).
pub async fn app_with(frontend: Frontend, json_shards_route: bool) -> axum::Router {
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<RoutingServer<Frontend>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(refleet_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("embedded descriptor sets are valid");
    let access = frontend.access.clone();
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| access.origin_allowed(o))
        }))
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            "x-api-key".parse().expect("header name"),
            "x-grpc-web".parse().expect("header name"),
            "x-user-agent".parse().expect("header name"),
            "grpc-timeout".parse().expect("header name"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            "grpc-status".parse().expect("header name"),
            "grpc-message".parse().expect("header name"),
            "grpc-status-details-bin".parse().expect("header name"),
        ])
        .max_age(Duration::from_secs(600));
    let grpc = tonic::service::Routes::new(RoutingServer::new(frontend.clone()))
        .add_service(health_svc)
        .add_service(reflection)
        .into_axum_router();
    let mut json = axum::Router::new().route("/v1/route", get(json_route));
    if json_shards_route {
        json = json.route("/v1/shards", get(json_shards));
    }
    let json = json.with_state(frontend);
    // gRPC-Web only in front of the gRPC routes: it refuses plain HTTP/1 requests.
    json.merge(grpc.layer(tonic_web::GrpcWebLayer::new()))
        .layer(cors)
}

/// Serves the router on `listener` (HTTP/1.1 and h2c) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    frontend: Frontend,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(frontend).await;
    axum::serve(
        nodelay(listener),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The flag that says whether this replica leads, always true (local fleet, tests).
pub fn always_leading() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(true))
}

/// The listener with TCP_NODELAY on every accepted socket: Route answers are small, and
/// without it a client's back-to-back calls wait ~40 ms each for delayed ACKs.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn set(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    }
    axum::serve::ListenerExt::tap_io(listener, set as fn(&mut tokio::net::TcpStream))
}
