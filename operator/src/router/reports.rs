//! The report stream's server side: every reflector keeps one stream open; each report
//! updates the router (users per shard, reservations that became users), and the stream
//! carries the token keys back, then each reported shard's settings (hard cap, persistence)
//! from its Session, again whenever they change. A stream that ends marks its reflector lost, and the router
//! stops sending users to it after the grace period.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use refleet_api::report::reports_server::{Reports, ReportsServer};
use refleet_api::report::{
    Instruction, ReflectorReport, ShardSettings, TokenKey, TokenKeys, instruction::Kind,
};
use subtle::ConstantTimeEq as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Router;

/// The Reports service.
#[derive(Debug, Clone)]
pub struct ReportHub {
    router: Arc<Router>,
    /// Shared secret reflectors must present (`authorization: Bearer …`); `None`: open.
    secret: Option<Arc<str>>,
    /// Accept streams only while this is true (the leader); `None`: always.
    leading: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl ReportHub {
    /// A hub feeding `router`.
    pub fn new(router: Arc<Router>, secret: Option<String>) -> Self {
        Self {
            router,
            secret: secret.map(Arc::from),
            leading: None,
        }
    }

    /// Accepts streams only while `leading` is true, so reflectors find the leader.
    pub fn only_when(mut self, leading: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.leading = Some(leading);
        self
    }

    /// The tonic service.
    pub fn service(self) -> ReportsServer<Self> {
        ReportsServer::new(self)
    }

    fn check(&self, request: &Request<Streaming<ReflectorReport>>) -> Result<(), Status> {
        let Some(secret) = &self.secret else {
            return Ok(());
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(Status::unauthenticated(
                "report stream needs authorization: Bearer <secret>",
            )),
            // Constant-time comparison: the secret guards every reflector's reports.
            Some(p) if !bool::from(p.as_bytes().ct_eq(secret.as_bytes())) => {
                Err(Status::unauthenticated("wrong report secret"))
            }
            Some(_) => Ok(()),
        }
    }
}

type InstructionStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<Instruction, Status>> + Send>>;

#[tonic::async_trait]
impl Reports for ReportHub {
    type ReportStream = InstructionStream;

    async fn report(
        &self,
        request: Request<Streaming<ReflectorReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        self.check(&request)?;
        if self
            .leading
            .as_ref()
            .is_some_and(|l| !l.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(Status::unavailable(
                "not the leader; reconnect (the Service selects the leader)",
            ));
        }
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<Instruction, Status>>(8);
        if let Some(signer) = self.router.signer() {
            let keys = TokenKeys {
                keys: vec![TokenKey {
                    key_id: signer.key_id().to_owned(),
                    public_key: signer.public_key().to_vec(),
                }],
            };
            let _ = tx
                .send(Ok(Instruction {
                    kind: Some(Kind::TokenKeys(keys)),
                }))
                .await;
        }
        let router = self.router.clone();
        tokio::spawn(async move {
            let mut name: Option<String> = None;
            let mut last_seq = 0u64;
            // Settings sent on this stream, per shard: sent again only when they change.
            let mut sent: HashMap<(String, String), (u32, bool)> = HashMap::new();
            loop {
                match inbound.message().await {
                    Ok(Some(report)) => {
                        if report.reflector.is_empty() {
                            let _ = tx
                                .send(Err(Status::invalid_argument("reflector: required")))
                                .await;
                            break;
                        }
                        if name.is_none() {
                            tracing::info!(reflector = %report.reflector, region = %report.region, url = %report.public_url, ?peer, "report stream open");
                        }
                        if report.sequence <= last_seq {
                            tracing::debug!(reflector = %report.reflector, sequence = report.sequence, "out-of-order report ignored");
                            continue;
                        }
                        last_seq = report.sequence;
                        name = Some(report.reflector.clone());
                        router.observe_report(&report);
                        router.metrics.set_streams(&router.live_streams());
                        for s in report.shards.iter().filter(|s| !s.shard.is_empty()) {
                            let Some(settings) = router.shard_settings(&s.app_id, &s.shard) else {
                                continue;
                            };
                            let id = (s.app_id.clone(), s.shard.clone());
                            if sent.get(&id) == Some(&settings) {
                                continue;
                            }
                            let (max_users, persistence) = settings;
                            let instruction = Instruction {
                                kind: Some(Kind::ShardSettings(ShardSettings {
                                    shard: s.shard.clone(),
                                    max_users,
                                    persistence,
                                })),
                            };
                            if tx.send(Ok(instruction)).await.is_err() {
                                break;
                            }
                            sent.insert(id, settings);
                        }
                        // Shards the reflector no longer hosts are forgotten with it.
                        sent.retain(|(app, shard), _| {
                            report
                                .shards
                                .iter()
                                .any(|s| &s.app_id == app && &s.shard == shard)
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(reflector = ?name, error = %e, "report stream error");
                        break;
                    }
                }
            }
            if let Some(n) = name {
                tracing::warn!(reflector = %n, "report stream lost");
                router.report_lost(&n);
                router.metrics.stream_disconnects.inc();
                router.metrics.set_streams(&router.live_streams());
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the report stream on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: ReportHub,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(hub.service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
