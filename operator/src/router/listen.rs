//! The router's HTTP server: one accept loop for every listener that serves the router's
//! app (the operator, `refleet routing`, `refleet up`), HTTP/1.1 and h2c on one port, with
//! the peer's address on every request and the HTTP/2 limits that Routes which wait for a
//! new shard need.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

/// HTTP/2 streams of one connection that its client may reset before the router has taken
/// them up, at one time, before the connection is closed as a flood (the guard against
/// "rapid reset", CVE-2023-44487; the `h2` crate's default is 20). A router short of CPU
/// reads a backlog of frames at once, and an app backend whose Routes waited for a new
/// shard (up to 10 s) cancels dozens of them together: with 20, the connection was closed
/// with every call on it, 345 times in one run (docs/scale.md, run G6). The guard stays,
/// at a size a backlog of legitimate calls does not reach; each such stream is a small
/// entry in a queue until the connection's next turn.
pub const PENDING_ACCEPT_RESETS: usize = 1024;

/// Calls one HTTP/2 connection may have open at once (hyper's default, stated here
/// because the limit above is sized against it): a client's calls beyond it wait in the
/// client, not in the router.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 200;

/// How long a client has to send an HTTP/1.1 request's head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` (HTTP/1.1 and h2c) until `shutdown` completes, then lets the
/// open connections finish their calls. Each request carries its peer's address for axum
/// handlers (`ConnectInfo<SocketAddr>`) and for gRPC ones (`Request::remote_addr`): a
/// client without an API key is rate-limited by that address, on every transport.
pub async fn serve_app(
    listener: TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
        .enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of fds, or a connection reset before it was accepted: go on.
                    tracing::warn!(%error, "router accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Route answers are small: without it a client's back-to-back calls wait ~40 ms
        // each for delayed ACKs.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
        let tcp_info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let service = app
            .clone()
            .map_request(move |mut request: axum::http::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request.extensions_mut().insert(tcp_info.clone());
                request
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "router connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
