//! The router's front doors, one code path behind all three: gRPC (`refleet.routing.v1`,
//! with gRPC health and server reflection), gRPC-Web for browsers, and JSON
//! (`GET /v1/route`, `GET /v1/shards`) with CORS. API keys, allowed origins and a
//! per-client rate limit apply to every transport. A client is a known API key, else its
//! address (through `--trusted-proxies`): an unknown key is never a client of its own, or a
//! fresh random key per call would be a fresh rate limit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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

use super::client::{TrustedProxies, limit_key};
use super::{Caller, RouteError, Router};

/// Above this many rate-limit buckets, idle ones are pruned at once; if every one is busy,
/// anonymous clients share one overflow bucket until pruning frees room. Bounds memory
/// against floods of distinct addresses (a bucket is ~100 bytes).
const MAX_CLIENTS: usize = 100_000;

/// How often idle rate-limit buckets are pruned by default.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// What the rate limiter counts calls against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LimitKey {
    /// A presented API key the router knows. Unknown keys never get a bucket of their own.
    Key(String),
    /// A client address (IPv6 by /64), through trusted proxies.
    Addr(IpAddr),
    /// Every anonymous client while the bucket table is full.
    Overflow,
}

/// Who may call Route, and how often.
#[derive(Debug)]
pub struct Access {
    /// API key → appId it is valid for. `None`: keys off (no key needed); an empty map
    /// means keys on and none configured yet, which refuses every Route.
    keys: RwLock<Option<Arc<HashMap<String, String>>>>,
    /// Allowed browser origins; `None`: any.
    origins: Option<Vec<String>>,
    limiter: DefaultKeyedRateLimiter<LimitKey>,
    proxies: TrustedProxies,
    prune_every: Duration,
    last_prune: Mutex<std::time::Instant>,
    calls: AtomicU64,
    overflowing: AtomicBool,
}

/// A bad API-keys directory.
#[derive(Debug, thiserror::Error)]
#[error("reading API keys from {path}: {source}")]
pub struct KeysError {
    path: String,
    source: std::io::Error,
}

impl Access {
    /// Access rules: `keys` maps API key → appId (empty: no key needed); `origins` of
    /// `["*"]` or empty allows any; `rate` calls per second per client (a known API key,
    /// else the client address), with a burst of twice that.
    pub fn new(keys: HashMap<String, String>, origins: &[String], rate: u32) -> Self {
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        let origins = origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect::<Vec<_>>();
        Self {
            keys: RwLock::new((!keys.is_empty()).then(|| Arc::new(keys))),
            origins: (!origins.is_empty() && !origins.iter().any(|o| o == "*")).then_some(origins),
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            proxies: TrustedProxies::default(),
            prune_every: PRUNE_EVERY,
            last_prune: Mutex::new(std::time::Instant::now()),
            calls: AtomicU64::new(0),
            overflowing: AtomicBool::new(false),
        }
    }

    /// Requires API keys even while `keys` is empty (every Route is then refused until keys
    /// arrive through [`Access::set_keys`]): what `--api-keys-dir` means.
    pub fn requiring_keys(self, keys: HashMap<String, String>) -> Self {
        self.set_keys(keys);
        self
    }

    /// Believes forwarded-for headers from these proxies (`--trusted-proxies`).
    pub fn trusting(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// Replaces the per-client quota (tests use one slow enough that no refill can land
    /// between their calls, however loaded the machine).
    pub fn limiting(mut self, quota: Quota) -> Self {
        self.limiter = RateLimiter::keyed(quota);
        self
    }

    /// Prunes idle rate-limit buckets this often (tests use a short period).
    pub fn pruning_every(mut self, every: Duration) -> Self {
        self.prune_every = every;
        self
    }

    /// Replaces the API keys (a reloaded Secret) and turns keys on.
    pub fn set_keys(&self, keys: HashMap<String, String>) {
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(keys));
    }

    fn keys(&self) -> Option<Arc<HashMap<String, String>>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Clients with a rate-limit bucket now.
    pub fn clients(&self) -> usize {
        self.limiter.len()
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

    /// Drops buckets that are full again (idle clients) every `prune_every`, and at once
    /// when the table is at its bound.
    fn maybe_prune(&self) {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let Ok(mut last) = self.last_prune.try_lock() else {
            return; // another call is pruning
        };
        let crowded = n.is_multiple_of(256) && self.limiter.len() >= MAX_CLIENTS;
        if crowded || last.elapsed() >= self.prune_every {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            *last = std::time::Instant::now();
            let full = self.limiter.len() >= MAX_CLIENTS;
            if full != self.overflowing.swap(full, Ordering::Relaxed) {
                tracing::warn!(
                    clients = self.limiter.len(),
                    overflowing = full,
                    "Route rate limiter: bucket table at its bound; anonymous clients share one bucket while it is"
                );
            }
        }
    }

    /// Checks origin and rate before the Session is known; returns the presented key and
    /// who the caller is (the key's app when the key is known, else the client address).
    fn admit(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<(Option<String>, Caller), RouteError> {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
            && !self.origin_allowed(origin)
        {
            return Err(RouteError::PermissionDenied(format!(
                "origin {origin:?} is not allowed"
            )));
        }
        let key = presented_key(headers);
        let app = self
            .keys()
            .zip(key.as_deref())
            .and_then(|(keys, k)| keys.get(k).cloned());
        // No socket address only happens in-process; such callers share one bucket.
        let ip = peer.map_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), |p| {
            self.proxies.client_ip(p, headers)
        });
        self.maybe_prune();
        let (caller, bucket) = match (app, &key) {
            (Some(app), Some(k)) => (Caller::Keyed(app.into()), LimitKey::Key(k.clone())),
            _ => {
                let addr = limit_key(ip);
                let bucket = if self.overflowing.load(Ordering::Relaxed) {
                    LimitKey::Overflow
                } else {
                    LimitKey::Addr(addr)
                };
                (Caller::Anonymous(addr), bucket)
            }
        };
        if let Err(not_until) = self.limiter.check_key(&bucket) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            return Err(RouteError::Exhausted {
                message: "rate limit for this client exceeded".into(),
                retry_after: wait.max(Duration::from_millis(100)),
            });
        }
        Ok((key, caller))
    }

    /// Checks the key against the Session's appId.
    fn authorize(&self, key: Option<&str>, app_id: &str) -> Result<(), RouteError> {
        let Some(keys) = self.keys() else {
            return Ok(());
        };
        let Some(key) = key else {
            return Err(RouteError::Unauthenticated(
                "an API key is required (x-api-key header)".into(),
            ));
        };
        match keys.get(key) {
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
        let (key, caller) = self.access.admit(headers, peer)?;
        self.router
            .route_as(req, &caller, |app| {
                self.access.authorize(key.as_deref(), app)
            })
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
        let (key, _) = self.access.admit(headers, peer)?;
        let shards = self.router.list_shards_as(ns, session, |app| {
            self.access.authorize(key.as_deref(), app)
        })?;
        Ok(ListShardsResponse { shards })
    }

    /// Admits a reader of the fleet view under Route's rules: only the leader answers, the
    /// origin must be allowed and the client within its rate. With API keys on, a known key
    /// is required and the answer is the one app the reader may see; `None`: every app.
    pub fn admit_viewer(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Option<String>, RouteError> {
        if !self.leading.load(Ordering::Relaxed) {
            return Err(RouteError::Unavailable(
                "not the leader; retry (the Service selects the leader)".into(),
            ));
        }
        let (key, caller) = self.access.admit(headers, peer)?;
        if self.access.keys().is_none() {
            return Ok(None);
        }
        match caller {
            Caller::Keyed(app) => Ok(Some(app.to_string())),
            _ if key.is_some() => Err(RouteError::Unauthenticated("unknown API key".into())),
            _ => Err(RouteError::Unauthenticated(
                "an API key is required (x-api-key header)".into(),
            )),
        }
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
        Ok(r) => json_response(StatusCode::OK, shards_json(&q.namespace, &q.session, &r)),
        Err(e) => json_error(&e),
    }
}

/// The JSON of `GET /v1/shards`: ListShards' answer with its fields in camelCase, under the
/// namespace and session asked for. The one shape both backends serve (e2e and the README
/// read it).
pub fn shards_json(namespace: &str, session: &str, r: &ListShardsResponse) -> serde_json::Value {
    let shards: Vec<_> = r
        .shards
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard": s.shard,
                "state": s.state,
                "region": s.region,
                "reflector": s.reflector,
                "url": s.url,
                "filesUrl": s.files_url,
                "users": s.users,
                "reserved": s.reserved,
                "maxUsers": s.max_users,
                "thresholdUsers": s.threshold_users,
            })
        })
        .collect();
    serde_json::json!({"namespace": namespace, "session": session, "shards": shards})
}

/// The router's HTTP app: gRPC + gRPC-Web + health + reflection + JSON, with CORS.
pub async fn app(frontend: Frontend) -> axum::Router {
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
    let json = axum::Router::new()
        .route("/v1/route", get(json_route))
        .route("/v1/shards", get(json_shards))
        .with_state(frontend);
    // gRPC-Web only in front of the gRPC routes: it refuses plain HTTP/1 requests.
    json.merge(grpc.layer(tonic_web::GrpcWebLayer::new()))
        .layer(cors)
}

/// Serves the router on `listener` (HTTP/1.1 and h2c) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    frontend: Frontend,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    super::listen::serve_app(listener, app(frontend).await, shutdown).await;
}

/// The flag that says whether this replica leads, always true (local fleet, tests).
pub fn always_leading() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(true))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn with_key(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", key.parse().unwrap());
        h
    }

    #[test]
    fn unknown_keys_never_get_a_bucket_and_known_ones_are_the_caller() {
        let keys = HashMap::from([("k-app".to_owned(), "app".to_owned())]);
        let access = Access::new(keys, &[], 1_000);
        let peer = Some("203.0.113.5".parse().unwrap());
        for i in 0..100 {
            let (_, caller) = access.admit(&with_key(&format!("junk-{i}")), peer).unwrap();
            assert_eq!(caller, Caller::Anonymous("203.0.113.5".parse().unwrap()));
        }
        assert_eq!(access.clients(), 1, "one bucket: the address");
        let (_, caller) = access.admit(&with_key("k-app"), peer).unwrap();
        assert_eq!(caller, Caller::Keyed("app".into()));
        assert_eq!(access.clients(), 2);
        // Keys on with none configured: every Route is refused, not let through.
        let none = Access::new(HashMap::new(), &[], 1_000).requiring_keys(HashMap::new());
        assert!(matches!(
            none.authorize(Some("anything"), "app"),
            Err(RouteError::Unauthenticated(_))
        ));
        assert!(
            Access::new(HashMap::new(), &[], 1_000)
                .authorize(None, "app")
                .is_ok()
        );
    }

    #[test]
    fn idle_buckets_are_pruned() {
        // At 10 calls/s a bucket is full again (idle) 100 ms after its call: long enough for
        // the 50 calls below on a loaded machine (at 1 000/s, 1 ms, some were pruned while
        // the others were made, and the count below failed under a concurrent build).
        let access = Access::new(HashMap::new(), &[], 10).pruning_every(Duration::ZERO);
        for i in 0..50u8 {
            let peer = Some(IpAddr::from([198, 51, 100, i]));
            access.admit(&HeaderMap::new(), peer).unwrap();
        }
        assert!(access.clients() >= 40, "{}", access.clients());
        let pruned = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let _ = access.admit(&HeaderMap::new(), Some(IpAddr::from([192, 0, 2, 1])));
            access.clients() <= 2
        });
        assert!(pruned, "{} buckets left", access.clients());
    }
}
