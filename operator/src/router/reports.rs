//! The report stream's server side: every reflector keeps one stream open; each report
//! updates the router (users per shard, reservations that became users), and the stream
//! carries the token keys back, then each reported shard's settings (hard cap, persistence)
//! from its Session, again whenever they change, and the hand-offs of moves
//! ([`super::moves`]).
//!
//! **Identity.** A stream speaks for one reflector only. With a report key (the normal
//! case) the reflector proves which one with the credential the operator minted for it
//! ([`refleet_api::report_credential`]), which names its reflector and region; without one
//! (an unauthenticated stream, for development) the stream is bound to the first reflector
//! its reports name, in a region of a published pool. A report about any other reflector or
//! region closes the stream with PERMISSION_DENIED. The URL a report proposes is never used:
//! clients go to the URL the backend assigned.
//!
//! **Loss.** A stream that ends, or sends nothing for the router's `report_grace`, marks its
//! reflector lost: after the grace period it gets no new routes and its reported users no
//! longer count.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use refleet_api::report::reports_server::{Reports, ReportsServer};
use refleet_api::report::{
    Instruction, ReflectorReport, ShardSettings, TokenKey, TokenKeys, instruction::Kind,
};
use refleet_api::report_credential::{ReflectorIdentity, ReportKey};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Router;

/// The Reports service.
#[derive(Debug, Clone)]
pub struct ReportHub {
    router: Arc<Router>,
    /// Checks the credential reflectors present (`authorization: Bearer …`); `None`: open.
    key: Option<Arc<ReportKey>>,
    /// Accept streams only while this is true (the leader); `None`: always.
    leading: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl ReportHub {
    /// A hub feeding `router`; `key` checks the reflectors' credentials (`None`: any stream
    /// is accepted, bound to the first reflector it names).
    pub fn new(router: Arc<Router>, key: Option<ReportKey>) -> Self {
        Self {
            router,
            key: key.map(Arc::new),
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

    /// The reflector the stream's credential proves (`None` without a report key).
    fn authenticate(
        &self,
        request: &Request<Streaming<ReflectorReport>>,
    ) -> Result<Option<ReflectorIdentity>, Status> {
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(credential) = presented else {
            self.router.metrics.report_refused("missing_credential");
            return Err(Status::unauthenticated(
                "report stream needs authorization: Bearer <credential> (the reflector's REFLEET_REPORT_TOKEN)",
            ));
        };
        key.verify(credential).map(Some).map_err(|e| {
            self.router.metrics.report_refused(e.reason());
            tracing::warn!(peer = ?request.remote_addr(), error = %e, "report stream refused");
            Status::unauthenticated(e.to_string())
        })
    }
}

/// Checks one report against the stream's identity (binding an unauthenticated stream to
/// its first report); `Err` carries the refusal reason and status. Public for the fuzz
/// target (`fuzz/tests/reports.rs`), which feeds it decoded reports as a stream would.
pub fn admit(
    router: &Router,
    bound: &mut Option<ReflectorIdentity>,
    report: &ReflectorReport,
) -> Result<(), (&'static str, Status)> {
    if report.reflector.is_empty() {
        return Err((
            "other_reflector",
            Status::invalid_argument("reflector: required"),
        ));
    }
    match bound {
        Some(id) if report.reflector != id.reflector => Err((
            "other_reflector",
            Status::permission_denied(format!(
                "this stream reports for reflector {:?} only, not {:?}",
                id.reflector, report.reflector
            )),
        )),
        Some(id) if report.region != id.region => Err((
            "wrong_region",
            Status::permission_denied(format!(
                "reflector {:?} is in region {:?}, not {:?}",
                id.reflector, id.region, report.region
            )),
        )),
        Some(_) => Ok(()),
        None if !router.knows_region(&report.region) => Err((
            "unknown_region",
            Status::permission_denied(format!(
                "region {:?} is not a region of any pool",
                report.region
            )),
        )),
        None => {
            *bound = Some(ReflectorIdentity {
                reflector: report.reflector.clone(),
                region: report.region.clone(),
            });
            Ok(())
        }
    }
}

/// What a report stream remembers between its reports: who it speaks for, the last
/// sequence number counted, and the shard settings it has sent.
#[derive(Debug, Default)]
pub struct StreamState {
    /// The identity its credential proves, or the first reflector an open stream named.
    pub bound: Option<ReflectorIdentity>,
    /// The reflector whose reports counted (set by the first one).
    name: Option<String>,
    last_seq: u64,
    /// Settings sent on this stream, per `(appId, shard)`: sent again only when they change.
    sent: HashMap<(String, String), (u32, bool)>,
}

/// What became of one admitted report.
#[derive(Debug, PartialEq)]
pub enum Taken {
    /// Its sequence number was not above the last counted one: ignored.
    Stale,
    /// Counted; the settings of its shards that the reflector has not been sent yet.
    Counted(Vec<ShardSettings>),
}

impl StreamState {
    /// A stream whose credential proved `identity` (`None`: an open stream, bound to the
    /// first reflector it reports for).
    pub fn new(identity: Option<ReflectorIdentity>) -> Self {
        Self {
            bound: identity,
            ..Self::default()
        }
    }

    /// The reflector this stream has counted reports for, if any yet.
    pub fn reflector(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Handles one report as the hub does: [`admit`], the sequence check, then
    /// [`Router::observe_report`]. `attach` runs once, before the first report counts, with
    /// the reflector's name. `Err` closes the stream with its status. Public for the fuzz
    /// target and the report benchmark, which take reports exactly as a stream does.
    pub fn take(
        &mut self,
        router: &Router,
        report: &ReflectorReport,
        attach: impl FnOnce(&str),
    ) -> Result<Taken, (&'static str, Status)> {
        admit(router, &mut self.bound, report)?;
        if report.sequence <= self.last_seq {
            tracing::debug!(reflector = %report.reflector, sequence = report.sequence, "out-of-order report ignored");
            return Ok(Taken::Stale);
        }
        self.last_seq = report.sequence;
        if self.name.is_none() {
            attach(&report.reflector);
            self.name = Some(report.reflector.clone());
        }
        router.observe_report(report);
        let mut settings = Vec::new();
        let named: Vec<_> = report
            .shards
            .iter()
            .filter(|s| !s.shard.is_empty())
            .collect();
        let current =
            router.shard_settings_of(named.iter().map(|s| (s.app_id.as_str(), s.shard.as_str())));
        for (s, now) in named.into_iter().zip(current) {
            let Some(now) = now else {
                continue;
            };
            let id = (s.app_id.clone(), s.shard.clone());
            if self.sent.get(&id) == Some(&now) {
                continue;
            }
            let (max_users, persistence) = now;
            settings.push(ShardSettings {
                shard: s.shard.clone(),
                max_users,
                persistence,
            });
            self.sent.insert(id, now);
        }
        // Shards the reflector no longer hosts are forgotten with it.
        let hosted: std::collections::HashSet<(&str, &str)> = report
            .shards
            .iter()
            .map(|s| (s.app_id.as_str(), s.shard.as_str()))
            .collect();
        self.sent
            .retain(|(app, shard), _| hosted.contains(&(app.as_str(), shard.as_str())));
        Ok(Taken::Counted(settings))
    }
}

type InstructionStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<Instruction, Status>> + Send>>;

/// Whether this replica may take reports: it leads, or it was not told to follow the Lease.
fn leading(flag: Option<&Arc<std::sync::atomic::AtomicBool>>) -> bool {
    flag.is_none_or(|l| l.load(std::sync::atomic::Ordering::Relaxed))
}

#[tonic::async_trait]
impl Reports for ReportHub {
    type ReportStream = InstructionStream;

    async fn report(
        &self,
        request: Request<Streaming<ReflectorReport>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let identity = self.authenticate(&request)?;
        if !leading(self.leading.as_ref()) {
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
        let grace = router.config().report_grace;
        let still_leading = self.leading.clone();
        tokio::spawn(async move {
            let mut stream = StreamState::new(identity);
            // This stream's registration for instructions (hand-offs), once it has a name.
            let mut attached: Option<u64> = None;
            'reports: loop {
                let Ok(next) = tokio::time::timeout(grace, inbound.message()).await else {
                    // Its load stops counting anyway; closing lets the reflector reconnect.
                    tracing::warn!(reflector = ?stream.reflector(), ?grace, "no report within the grace period; closing the report stream");
                    router.metrics.report_refused("silent");
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "no report within {grace:?}; reconnect"
                        ))))
                        .await;
                    break;
                };
                // A replica that lost the Lease keeps its open connections (a Service only
                // steers new ones): end the stream, so the reflector reconnects to the leader
                // and its load is counted where Routes are answered.
                if !leading(still_leading.as_ref()) {
                    tracing::info!(reflector = ?stream.reflector(), "no longer the leader; closing the report stream");
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "no longer the leader; reconnect (the Service selects the leader)",
                        )))
                        .await;
                    break;
                }
                match next {
                    Ok(Some(report)) => {
                        // Attached before its first report counts: moves driven by that
                        // report can reach this stream (a target is told to accept).
                        let opening = attached.is_none();
                        let attach = |reflector: &str| {
                            tracing::info!(reflector, region = %report.region, ?peer, "report stream open");
                            attached = Some(router.attach_stream(reflector, tx.clone()));
                        };
                        let settings = match stream.take(&router, &report, attach) {
                            Ok(Taken::Counted(settings)) => settings,
                            Ok(Taken::Stale) => continue,
                            Err((reason, status)) => {
                                tracing::warn!(reflector = %report.reflector, region = %report.region, bound = ?stream.bound, ?peer, reason, "report refused; closing the report stream");
                                router.metrics.report_refused(reason);
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                        };
                        // The gauge counts every live stream (O(reflectors)): set when one
                        // opens (its first report counted) or ends, not on each of the
                        // fleet's reports per second.
                        if opening {
                            router.metrics.set_streams(&router.live_streams());
                        }
                        for s in settings {
                            let instruction = Instruction {
                                kind: Some(Kind::ShardSettings(s)),
                            };
                            if tx.send(Ok(instruction)).await.is_err() {
                                break 'reports;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(reflector = ?stream.reflector(), error = %e, "report stream error");
                        break;
                    }
                }
            }
            if let Some(n) = stream.name {
                if let Some(id) = attached {
                    router.detach_stream(&n, id);
                }
                tracing::warn!(reflector = %n, "report stream lost");
                router.report_lost(&n);
                router.metrics.stream_disconnects.inc();
                router.metrics.set_streams(&router.live_streams());
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves the report stream, and beside it the gateways' placement watch (same key, same
/// leader check: [`super::placement_watch`]), on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: ReportHub,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Placement watches never end on their own (unlike report streams, whose reflectors
    // drain away): they are ended when the server shuts down, or it would wait for them.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let watch = super::placement_watch::PlacementWatch::new(
        hub.router.clone(),
        hub.key.clone(),
        hub.leading.clone(),
    )
    .until(stopped);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_service(hub.service())
        .add_service(watch.service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
