//! A Routing server that does no routing: every Route gets the same canned answer (a token
//! of the real size) and ListShards an empty list. Run the load generator against it to see
//! what tonic + HTTP/2 + loopback cost on this machine with no router behind them, the floor
//! under `refleet`'s figures:
//!
//! ```text
//! cargo run --release -p refleet-route-bench --example null_router -- 127.0.0.1:50099 &
//! target/release/refleet-route-bench --url http://127.0.0.1:50099 --server-pid $! \
//!     --connections 2 rate --session lookup --rate 20000 --duration 10s --warmup 2s \
//!     --concurrency 64 --users 2000
//! ```

use std::net::SocketAddr;

use refleet_api::routing::routing_server::{Routing, RoutingServer};
use refleet_api::routing::{ListShardsRequest, ListShardsResponse, RouteRequest, RouteResponse};

#[derive(Clone)]
struct Null(RouteResponse);

#[tonic::async_trait]
impl Routing for Null {
    async fn route(
        &self,
        request: tonic::Request<RouteRequest>,
    ) -> Result<tonic::Response<RouteResponse>, tonic::Status> {
        let _ = request.into_inner();
        Ok(tonic::Response::new(self.0.clone()))
    }

    async fn list_shards(
        &self,
        _request: tonic::Request<ListShardsRequest>,
    ) -> Result<tonic::Response<ListShardsResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListShardsResponse::default()))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50099".into())
        .parse()?;
    // The same size as a real answer: a ~190-character token in the URL and on its own.
    let token = "t".repeat(190);
    let answer = RouteResponse {
        shard: "lookup".into(),
        reflector_url: format!("ws://127.0.0.1:40000/reflector/{token}/"),
        files_url: "http://127.0.0.1:40001/files".into(),
        region: "local-a".into(),
        join_token: token,
        token_expires_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        app_id: "bench".into(),
    };
    eprintln!("null router on {addr}");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(RoutingServer::new(Null(answer)))
        .serve(addr)
        .await?;
    Ok(())
}
