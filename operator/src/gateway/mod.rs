//! # The gateway: one stable WebSocket address per region
//!
//! ```text
//!  client ── wss://<gateway>/<join token>/<session id> ──► Gateway::handle
//!     │  headers within --header-timeout, at most --max-header-bytes (else 431 / closed)
//!     │  token: signature (the router's public keys) + expiry  ─ bad ─► 401 / 403
//!     │  (app id, shard) from the token ─► Placements::placement ─ unknown ─► 404
//!     │                                               not ready / moving ─► 503 + Retry-After
//!     ▼
//!  reflector ◄── the same upgrade request (HTTP/1.1) ── 101 ──► both sides upgraded,
//!                bytes spliced both ways (no frame parsing), counted per direction
//! ```
//!
//! Stateless: every new connection resolves its shard's host again, so after a shard moves
//! (its published record names another reflector) the next connection goes to the new
//! host, and any replica of the gateway answers the same. `/files/…` is forwarded to the
//! pool's files URL so one address serves a region.
//!
//! The placement table is behind [`Placements`]: in `refleet up` the router itself
//! ([`RouterTable`]); in a cluster a copy kept current from the leader's watch stream.
//!
//! Why the expired-token grace: the reflector admits a view it already knows with an
//! expired token (clients reconnect with the URL they first got), so refusing every
//! expired token at the edge would cut every reconnect after the token's lifetime. The
//! gateway refuses tokens expired longer than the grace; the reflector still decides
//! within it.

pub mod metrics;
pub mod watched;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use refleet_api::token::{TokenError, Verifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use self::metrics::{GatewayMetrics, RegionMetrics};
use crate::router::placement::Resolved;
use crate::router::{PlacementError, Router};

/// Where the gateway learns shard placements and the token keys.
pub trait Placements: Send + Sync + 'static {
    /// Where shard `shard` of app `app_id` is hosted now.
    fn placement(&self, app_id: &str, shard: &str) -> Resolved;
    /// The join-token keys; `None` while they are not known yet (every upgrade gets 503).
    fn verifier(&self) -> Option<Arc<Verifier>>;
}

/// The router of this process as the table (`refleet up`, the leader itself).
pub struct RouterTable {
    router: Arc<Router>,
    verifier: Option<Arc<Verifier>>,
}

impl RouterTable {
    /// The table of `router`, with its signer's public key.
    pub fn new(router: Arc<Router>) -> Self {
        let verifier = router.signer().and_then(|s| {
            let mut v = Verifier::default();
            v.insert(s.key_id(), &s.public_key()).ok()?;
            Some(Arc::new(v))
        });
        Self { router, verifier }
    }
}

impl Placements for RouterTable {
    fn placement(&self, app_id: &str, shard: &str) -> Resolved {
        self.router.placement(app_id, shard)
    }

    fn verifier(&self) -> Option<Arc<Verifier>> {
        self.verifier.clone()
    }
}

/// One reflector for every shard (`refleet gateway --static-reflector`): benchmarks, or a
/// single reflector behind a gateway. Unknown shards do not exist for it.
#[derive(Debug)]
pub struct StaticTable {
    url: String,
    verifier: Arc<Verifier>,
}

impl StaticTable {
    /// Every shard on the reflector at `url`, tokens checked with `verifier`.
    pub fn new(url: String, verifier: Verifier) -> Self {
        Self {
            url,
            verifier: Arc::new(verifier),
        }
    }
}

impl Placements for StaticTable {
    fn placement(&self, _app_id: &str, _shard: &str) -> Resolved {
        Ok(crate::router::Placement {
            reflector: "static".into(),
            url: self.url.clone(),
            region: String::new(),
        })
    }

    fn verifier(&self) -> Option<Arc<Verifier>> {
        Some(self.verifier.clone())
    }
}

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The region it serves (metric label; it proxies to any region's shard).
    pub region: String,
    /// The pool's files base URL (`http://…/files`): `/files/…` is forwarded there.
    pub files_url: Option<String>,
    /// A client must send its request headers within this time, or is closed.
    pub header_timeout: Duration,
    /// Largest request head accepted (431 above it); at least 8192.
    pub max_header_bytes: usize,
    /// Most connections open at once (spliced or not); past it, new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// How long the reflector may take to accept the connection and answer the upgrade.
    pub connect_timeout: Duration,
    /// Tokens expired longer ago than this are refused (403); see the module docs.
    pub expired_token_grace: Duration,
    /// `Retry-After` of a 503.
    pub retry_after: Duration,
    /// Size of each direction's splice buffer: most of an idle connection's memory.
    pub buffer_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            region: String::new(),
            files_url: None,
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections: 20_000,
            connect_timeout: Duration::from_secs(5),
            expired_token_grace: Duration::from_secs(3600),
            retry_after: Duration::from_secs(1),
            buffer_bytes: 4096,
        }
    }
}

/// One region's gateway.
pub struct Gateway {
    config: GatewayConfig,
    table: Arc<dyn Placements>,
    metrics: RegionMetrics,
    slots: Arc<Semaphore>,
    /// Accepted connections not yet closed (the accept loop holds one slot ahead).
    open: Arc<AtomicUsize>,
}

/// One accepted connection: its slot under the cap, and its place in the open count.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why the reflector could not be reached.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("reflector URL {0:?} is not an http:// or ws:// URL with a host")]
    Url(String),
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Gateway {
    /// A gateway answering from `table`, recording into `metrics`.
    pub fn new(
        config: GatewayConfig,
        table: Arc<dyn Placements>,
        metrics: &GatewayMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            metrics: metrics.region(&config.region),
            slots: Arc::new(Semaphore::new(config.max_connections.max(1))),
            open: Arc::new(AtomicUsize::new(0)),
            config,
            table,
        })
    }

    /// The settings.
    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// This region's metrics.
    pub fn metrics(&self) -> &RegionMetrics {
        &self.metrics
    }

    /// Connections open now (spliced or still in their request).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Serves `listener` until `shutdown` completes; spliced connections go on until either
    /// side closes (or the process exits).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .max_buf_size(self.config.max_header_bytes.max(8192));
        tokio::pin!(shutdown);
        loop {
            let slot = tokio::select! {
                () = &mut shutdown => return,
                slot = self.slots.clone().acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        // Out of fds or a connection reset before accept: keep serving.
                        tracing::warn!(%error, region = %self.config.region, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.open.fetch_add(1, Ordering::Relaxed);
            let slot = Arc::new(Slot {
                _permit: slot,
                open: self.open.clone(),
            });
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY not set");
            }
            let gw = self.clone();
            let conn_slot = slot.clone();
            let service = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                let slot = slot.clone();
                async move { Ok::<_, Infallible>(gw.handle(req, peer, slot).await) }
            });
            let conn = http
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%error, %peer, "gateway connection ended with an error");
                }
                drop(conn_slot);
            });
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        slot: Arc<Slot>,
    ) -> Response<Body> {
        let path = req.uri().path();
        if path == "/healthz" {
            return plain(StatusCode::OK, "ok");
        }
        if path == "/files" || path.starts_with("/files/") {
            return self.files(req, peer).await;
        }
        let (session, token) = {
            let mut it = path.rsplit('/');
            (it.next().unwrap_or(""), it.next().unwrap_or(""))
        };
        if !is_websocket_upgrade(req.headers()) || session.is_empty() {
            self.metrics.upgrade("bad_request");
            return plain(
                StatusCode::BAD_REQUEST,
                "this address takes WebSocket upgrades at /<join token>/<session id>",
            );
        }
        let Some(verifier) = self.table.verifier() else {
            self.metrics.upgrade("not_ready");
            return self.unavailable("the gateway does not know the join-token keys yet");
        };
        let claims = match verifier.verify(token) {
            Ok(c) => c,
            Err(error) => {
                self.metrics.upgrade("bad_token");
                tracing::debug!(%peer, reason = error.reason(), "upgrade refused: bad join token");
                let status = match error {
                    TokenError::Expired => StatusCode::FORBIDDEN,
                    _ => StatusCode::UNAUTHORIZED,
                };
                return plain(status, &error.to_string());
            }
        };
        let expired_for = unix_secs().saturating_sub(claims.expires_at);
        if expired_for > 0 && expired_for as u64 > self.config.expired_token_grace.as_secs() {
            self.metrics.upgrade("bad_token");
            return plain(
                StatusCode::FORBIDDEN,
                "join token expired: Route again for a new one",
            );
        }
        let placement = match self.table.placement(&claims.app_id, &claims.shard) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.upgrade(e.reason());
                return match e {
                    PlacementError::Unknown => plain(StatusCode::NOT_FOUND, "no such shard"),
                    PlacementError::NotReady | PlacementError::Moving => {
                        self.unavailable(&e.to_string())
                    }
                };
            }
        };
        let client_upgrade = hyper::upgrade::on(&mut req);
        let timer = self.metrics.connect.start_timer();
        let upstream = tokio::time::timeout(
            self.config.connect_timeout,
            upgrade_request(&placement.url, req.uri(), req.headers(), peer),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout(self.config.connect_timeout)));
        let mut answer = match upstream {
            Ok(a) => a,
            Err(error) => {
                drop(timer);
                self.metrics.upgrade("upstream_error");
                tracing::warn!(%error, reflector = %placement.reflector, shard = %claims.shard, "upgrade not proxied: reflector unreachable");
                return plain(
                    StatusCode::BAD_GATEWAY,
                    "the shard's reflector is unreachable",
                );
            }
        };
        timer.observe_duration();
        if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The reflector's own refusal (draining, limits): the client sees it as is.
            self.metrics.upgrade("upstream_error");
            let (parts, body) = answer.into_parts();
            return Response::from_parts(parts, Body::new(body));
        }
        self.metrics.upgrade("proxied");
        tracing::debug!(%peer, reflector = %placement.reflector, shard = %claims.shard, "upgrade proxied");
        let upstream_upgrade = hyper::upgrade::on(&mut answer);
        let metrics = self.metrics.clone();
        let buffer = self.config.buffer_bytes.max(512);
        tokio::spawn(async move {
            let (client, reflector) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%error, %peer, "upgrade did not complete");
                    return;
                }
            };
            metrics.connections.inc();
            let mut client = Counted {
                io: TokioIo::new(client),
                read: metrics.to_reflector.clone(),
            };
            let mut reflector = Counted {
                io: TokioIo::new(reflector),
                read: metrics.to_client.clone(),
            };
            let ended = tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut reflector,
                buffer,
                buffer,
            )
            .await;
            metrics.connections.dec();
            if let Err(error) = ended {
                tracing::debug!(%error, %peer, "spliced connection ended");
            }
            drop(slot);
        });
        let (parts, _) = answer.into_parts();
        Response::from_parts(parts, Body::empty())
    }

    /// Forwards `/files/…` to the pool's files URL.
    async fn files(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let Some(base) = &self.config.files_url else {
            return plain(StatusCode::NOT_FOUND, "this gateway serves no files");
        };
        let rest = req
            .uri()
            .path_and_query()
            .map_or("", |p| p.as_str())
            .strip_prefix("/files")
            .unwrap_or("");
        let target = format!("{}{rest}", base.trim_end_matches('/'));
        let forwarded = tokio::time::timeout(self.config.connect_timeout, async {
            let (authority, path) = split_url(&target)?;
            let (parts, body) = req.into_parts();
            let mut headers = parts.headers;
            headers.insert(
                header::HOST,
                HeaderValue::from_str(&authority)
                    .map_err(|_| UpstreamError::Url(target.clone()))?,
            );
            append_forwarded_for(&mut headers, peer);
            let mut out = Request::builder()
                .method(parts.method)
                .uri(path)
                .body(body)
                .map_err(|_| UpstreamError::Url(target.clone()))?;
            *out.headers_mut() = headers;
            send(&authority, out).await
        })
        .await
        .unwrap_or(Err(UpstreamError::Timeout(self.config.connect_timeout)));
        match forwarded {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                Response::from_parts(parts, Body::new(body))
            }
            Err(error) => {
                tracing::warn!(%error, files = %base, "files request not forwarded");
                plain(StatusCode::BAD_GATEWAY, "the files endpoint is unreachable")
            }
        }
    }

    fn unavailable(&self, why: &str) -> Response<Body> {
        let mut res = plain(StatusCode::SERVICE_UNAVAILABLE, why);
        res.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(self.config.retry_after.as_secs().max(1)),
        );
        res
    }
}

fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut res = Response::new(Body::from(format!("{text}\n")));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// `host:port` and the path (with the base URL's path prefix) of `url`.
fn split_url(url: &str) -> Result<(String, String), UpstreamError> {
    let bad = || UpstreamError::Url(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    let port = match uri.scheme_str() {
        Some("http" | "ws") => 80,
        _ => return Err(bad()),
    };
    let host = uri.host().ok_or_else(bad)?;
    let authority = format!("{host}:{}", uri.port_u16().unwrap_or(port));
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((authority, path))
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.append("x-forwarded-for", v);
    }
}

/// Sends `req` on a new connection to `authority` and returns the answer; the connection
/// stays usable for an upgrade.
async fn send<B>(authority: &str, req: Request<B>) -> Result<Response<Incoming>, UpstreamError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(authority).await?;
    // Frames are small and latency matters more than packet count (as on the reflector).
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(error) = conn.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender.send_request(req).await?)
}

/// The client's upgrade request, sent to the reflector at `base` (its path prefix kept).
async fn upgrade_request(
    base: &str,
    uri: &Uri,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Response<Incoming>, UpstreamError> {
    let (authority, prefix) = split_url(base)?;
    let path = format!(
        "{}{}",
        prefix.trim_end_matches('/'),
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut out = Request::builder()
        .method(http::Method::GET)
        .uri(path)
        .body(Body::empty())
        .map_err(|_| UpstreamError::Url(base.to_owned()))?;
    let h = out.headers_mut();
    for (name, value) in headers {
        if name != header::HOST {
            h.append(name, value.clone());
        }
    }
    h.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|_| UpstreamError::Url(base.to_owned()))?,
    );
    append_forwarded_for(h, peer);
    send(&authority, out).await
}

/// An upgraded stream that counts the bytes read from it.
struct Counted<T> {
    io: T,
    read: prometheus::IntCounter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reflector_urls_split_into_authority_and_prefix() {
        let (a, p) = split_url("http://127.0.0.1:4000/").unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("127.0.0.1:4000", "/"));
        let (a, p) = split_url("ws://r1.internal/base/").unwrap();
        assert_eq!((a.as_str(), p.as_str()), ("r1.internal:80", "/base/"));
        assert!(
            split_url("https://r1/").is_err(),
            "TLS upstream is not spoken"
        );
        assert!(split_url("not a url").is_err());
    }

    #[test]
    fn only_websocket_upgrades_count() {
        let mut h = HeaderMap::new();
        assert!(!is_websocket_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_websocket_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!is_websocket_upgrade(&h));
    }
}
