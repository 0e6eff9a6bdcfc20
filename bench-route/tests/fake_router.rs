//! The load generator against a tiny Routing server written here: it must count every error
//! by code, and a burst check must catch a wrong shard total.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use refleet_api::routing::routing_server::{Routing, RoutingServer};
use refleet_api::routing::{
    ListShardsRequest, ListShardsResponse, RouteRequest, RouteResponse, ShardInfo,
};
use refleet_route_bench::load::{self, Arrivals, Expect, RateOptions, Target};

/// Fills shards of `per_shard` one after another; every `fail_every`-th call (if set) is
/// refused with RESOURCE_EXHAUSTED; `lie` adds one reservation to the first shard in
/// ListShards.
#[derive(Clone, Default)]
struct Fake {
    calls: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    per_shard: u64,
    fail_every: u64,
    lie: bool,
}

#[tonic::async_trait]
impl Routing for Fake {
    async fn route(
        &self,
        request: tonic::Request<RouteRequest>,
    ) -> Result<tonic::Response<RouteResponse>, tonic::Status> {
        let req = request.into_inner();
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(tonic::Status::resource_exhausted("no room"));
        }
        let ok = n - self.refused.load(Ordering::SeqCst);
        let index = (ok - 1) / self.per_shard.max(1);
        Ok(tonic::Response::new(RouteResponse {
            shard: shard_name(&req.session, index),
            ..RouteResponse::default()
        }))
    }

    async fn list_shards(
        &self,
        request: tonic::Request<ListShardsRequest>,
    ) -> Result<tonic::Response<ListShardsResponse>, tonic::Status> {
        let req = request.into_inner();
        let ok = self.calls.load(Ordering::SeqCst) - self.refused.load(Ordering::SeqCst);
        let per = self.per_shard.max(1);
        let shards = (0..ok.div_ceil(per))
            .map(|i| {
                let reserved = per.min(ok - i * per) + u64::from(self.lie && i == 0);
                ShardInfo {
                    shard: shard_name(&req.session, i),
                    reserved: reserved as u32,
                    max_users: 100,
                    threshold_users: 80,
                    state: "Open".into(),
                    ..ShardInfo::default()
                }
            })
            .collect();
        Ok(tonic::Response::new(ListShardsResponse { shards }))
    }
}

fn shard_name(session: &str, i: u64) -> String {
    if i == 0 {
        session.to_owned()
    } else {
        format!("{session}~{i}")
    }
}

async fn serve(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RoutingServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}/")
}

fn target(session: &str) -> Target {
    Target {
        namespace: "default".into(),
        session: session.into(),
        region: String::new(),
    }
}

#[tokio::test]
async fn a_rate_run_counts_every_refusal_by_code() {
    for arrivals in [Arrivals::Callers, Arrivals::Even, Arrivals::Poisson] {
        let fake = Fake {
            per_shard: 1_000_000,
            fail_every: 7,
            ..Fake::default()
        };
        let url = serve(fake.clone()).await;
        let clients = load::connect(&url, 2).await.unwrap();
        let o = RateOptions {
            rate: 500.0,
            duration: Duration::from_millis(600),
            warmup: Duration::ZERO,
            concurrency: 8,
            users: 10,
            arrivals,
            seed: 7,
        };
        let r = load::rate(&clients, &target("lookup"), &o).await;
        let refused = fake.refused.load(Ordering::SeqCst);
        assert!(refused > 0, "{arrivals:?}");
        assert_eq!(r.calls, fake.calls.load(Ordering::SeqCst), "{arrivals:?}");
        assert_eq!(r.errors.total(), refused);
        assert_eq!(r.errors.by_code.get("RESOURCE_EXHAUSTED"), Some(&refused));
        assert_eq!(r.ok + refused, r.calls);
        assert_eq!(r.shards.get("lookup"), Some(&r.ok));
        assert!(r.achieved_per_s > 300.0, "{arrivals:?}: {r:?}");
        if arrivals == Arrivals::Even {
            // 600 ms at 500/s, 2 ms apart: exactly 300 slots.
            assert_eq!(r.calls, 300);
        }
    }
}

#[tokio::test]
async fn a_paced_run_does_not_measure_its_warmup() {
    let fake = Fake {
        per_shard: 1_000_000,
        ..Fake::default()
    };
    let url = serve(fake.clone()).await;
    let clients = load::connect(&url, 1).await.unwrap();
    let o = RateOptions {
        rate: 1000.0,
        duration: Duration::from_millis(200),
        warmup: Duration::from_millis(100),
        concurrency: 4,
        users: 0,
        arrivals: Arrivals::Even,
        seed: 1,
    };
    let r = load::rate(&clients, &target("lookup"), &o).await;
    assert_eq!(fake.calls.load(Ordering::SeqCst), 300);
    assert_eq!((r.calls, r.ok), (200, 200));
}

/// 800 Route calls at once against `fake` over 4 connections, checked against `expect`.
async fn burst_of_800(fake: Fake, expect: Expect) -> load::BurstReport {
    let url = serve(fake).await;
    let clients = load::connect(&url, 4).await.unwrap();
    load::burst(&clients, &target("burst"), 800, expect)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_burst_checks_the_shard_totals() {
    // Right: 800 calls, 80 per shard → 10 shards of 80.
    let right = Fake {
        per_shard: 80,
        ..Fake::default()
    };
    let expect = Expect {
        shards: Some(10),
        per_shard: Some(80),
    };
    let r = burst_of_800(right, expect).await;
    assert_eq!((r.ok, r.listed.len()), (800, 10));
    assert!(r.problems.is_empty(), "{:?}", r.problems);

    // Wrong total in ListShards: caught.
    let lying = Fake {
        per_shard: 80,
        lie: true,
        ..Fake::default()
    };
    let r = burst_of_800(lying, expect).await;
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("81 reserved, expected 80")),
        "{:?}",
        r.problems
    );

    // A wrong shard count (the router made 11 shards of ~73): caught.
    let small = Fake {
        per_shard: 73,
        ..Fake::default()
    };
    let r = burst_of_800(small, expect).await;
    assert!(
        r.problems
            .contains(&"11 shards hold clients, expected 10".to_owned()),
        "{:?}",
        r.problems
    );

    // Refused calls are failures of the burst.
    let refusing = Fake {
        per_shard: 80,
        fail_every: 100,
        ..Fake::default()
    };
    let r = burst_of_800(refusing, Expect::default()).await;
    assert_eq!(r.errors.by_code.get("RESOURCE_EXHAUSTED"), Some(&8));
    assert!(
        r.problems.iter().any(|p| p.contains("8 calls failed")),
        "{:?}",
        r.problems
    );
}

#[tokio::test]
async fn nothing_listening_is_an_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    assert!(load::connect(&format!("http://{addr}/"), 1).await.is_err());
}
