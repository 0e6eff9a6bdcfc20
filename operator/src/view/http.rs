//! The fleet view's routes: `GET /` (the page), `GET /view/events` (Server-Sent Events)
//! and the page's own script and style sheet, embedded in the binary.
//!
//! Every reader is admitted by a [`Gate`]: `refleet up` lets everyone read (as its
//! `/v1/status`), the operator applies Route's rules ([`Frontend::admit_viewer`]). A stream
//! holds only the latest snapshot (a slow reader skips to the newest, nothing queues up),
//! at most [`MAX_STREAMS`] are open at once, and all end when the [`Hub`] is closed.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{Hub, render};
use crate::router::RouteError;
use crate::router::service::Frontend;

/// Most event streams open at once; more are answered 503.
pub const MAX_STREAMS: usize = 64;

const SCRIPT: &str = include_str!("assets/index.js");
const STYLE: &str = include_str!("assets/style.css");

/// Only the page's own files; the JSON island is data (not run) and needs no exception.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Who may read the view, and which app's shards they see.
pub trait Gate: Send + Sync + 'static {
    /// Admits a reader from `peer`: `Ok(None)` sees every app, `Ok(Some(app))` only `app`.
    fn admit(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Option<String>, RouteError>;
}

/// Everyone reads everything (`refleet up`, which serves `/v1/status` the same way).
#[derive(Clone, Copy, Debug)]
pub struct Open;

impl Gate for Open {
    fn admit(&self, _: &HeaderMap, _: IpAddr) -> Result<Option<String>, RouteError> {
        Ok(None)
    }
}

/// Route's rules: leader only, allowed origins, the per-client rate, and with API keys on,
/// a known key (its app's shards only).
impl Gate for Frontend {
    fn admit(&self, headers: &HeaderMap, peer: IpAddr) -> Result<Option<String>, RouteError> {
        self.admit_viewer(headers, Some(peer))
    }
}

#[derive(Clone)]
struct Viewer {
    hub: Arc<Hub>,
    gate: Arc<dyn Gate>,
}

/// The view's routes for `hub`, readers admitted by `gate`. Serve with connect info
/// (`into_make_service_with_connect_info::<SocketAddr>`).
pub fn app(hub: Arc<Hub>, gate: Arc<dyn Gate>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/view/events", get(events))
        // Browsers ask for one; the router's gRPC fallback would answer 400.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route(
            "/view/index.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/view/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        .with_state(Viewer { hub, gate })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A refused reader: the status JSON `/v1/route` would answer, as plain text.
fn refuse(e: &RouteError) -> Response {
    let status = match e {
        RouteError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        RouteError::NotFound(_) => StatusCode::NOT_FOUND,
        RouteError::Exhausted { .. } => StatusCode::TOO_MANY_REQUESTS,
        RouteError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
        RouteError::PermissionDenied(_) => StatusCode::FORBIDDEN,
        RouteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut res = (status, format!("{e}\n")).into_response();
    if let RouteError::Exhausted { retry_after, .. } = e {
        let secs = retry_after.as_secs().max(1);
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}

async fn page(
    State(v): State<Viewer>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let app = match v.gate.admit(&headers, peer.ip()) {
        Ok(app) => app,
        Err(e) => return refuse(&e),
    };
    let snap = v.hub.latest().visible_to(app.as_deref());
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        render::page(&snap, v.hub.title),
    )
        .into_response()
}

/// Holds one of the [`MAX_STREAMS`] places while its stream is open.
struct Slot(Arc<Hub>);

impl Slot {
    fn take(hub: &Arc<Hub>) -> Option<Self> {
        hub.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(hub.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn events(
    State(v): State<Viewer>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let app = match v.gate.admit(&headers, peer.ip()) {
        Ok(app) => app,
        Err(e) => return refuse(&e),
    };
    if *v.hub.closed.borrow() {
        return refuse(&RouteError::Unavailable("shutting down".into()));
    }
    let Some(slot) = Slot::take(&v.hub) else {
        tracing::warn!(
            streams = MAX_STREAMS,
            "fleet view: too many event streams; refusing one"
        );
        return refuse(&RouteError::Unavailable(format!(
            "{MAX_STREAMS} fleet view streams are open already"
        )));
    };
    let latest = v.hub.latest.subscribe();
    let closed = v.hub.closed.subscribe();
    // The first message is the snapshot now (the page may be older than it), then one per
    // change; `borrow_and_update` reads only the newest, whatever was skipped meanwhile.
    let stream = futures_util::stream::unfold(
        (latest, closed, slot, app, true),
        |(mut latest, mut closed, slot, app, first)| async move {
            if !first {
                tokio::select! {
                    biased;
                    _ = closed.wait_for(|c| *c) => return None,
                    changed = latest.changed() => changed.ok()?,
                }
            }
            let snap = latest.borrow_and_update().clone();
            let data = render::message(&snap.visible_to(app.as_deref()));
            let event = Event::default().event("fleet").data(data);
            Some((
                Ok::<_, Infallible>(event),
                (latest, closed, slot, app, false),
            ))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
