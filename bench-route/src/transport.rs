//! The generator's HTTP/2 connection: tonic's generated client over one hyper HTTP/2
//! connection, without tonic's `Channel`.
//!
//! `Channel` puts a tower `Buffer` in front of the connection: every call goes through an
//! mpsc queue to a worker task and back through a oneshot, two more task wake-ups per call on
//! the same two cores the router runs on. The load generator should cost as little as it
//! can, so its callers drive hyper's `SendRequest` (which is already a cheap, clonable
//! handle onto the connection task) directly.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One HTTP/2 (h2c) connection, usable as tonic's transport.
#[derive(Clone)]
pub struct Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl Connection {
    /// Opens an h2c connection to `authority` (`host:port`), with TCP_NODELAY.
    pub async fn open(authority: &str) -> anyhow::Result<Self> {
        let tcp = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(authority),
        )
        .await
        .with_context(|| format!("connecting to {authority}: timed out"))?
        .with_context(|| format!("connecting to {authority}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP/2 handshake with {authority}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("refleet-route-bench: connection closed: {e}");
            }
        });
        Ok(Self(send))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}
