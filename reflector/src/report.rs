//! The load-report stream: this reflector tells the operator what it hosts, and follows
//! the operator's instructions.
//!
//! One gRPC stream (`refleet.report.v1.Reports/Report`) per process, kept open with
//! reconnects and back-off: about once a second, and at once when a session's membership
//! changes, it sends identity, state, capacity and per-shard load; the operator answers
//! with drain requests, shard settings and token keys. A reconnect reaches whichever
//! operator replica leads by then (the Service selects the leader).

use std::sync::Arc;
use std::time::Duration;

use refleet_api::report::{
    self, Instruction, ReflectorReport, ReflectorState, ShardLoad, instruction::Kind,
    reports_client::ReportsClient,
};
use refleet_api::token::Verifier;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;

use crate::admission::{Admission, ShardSettings};
use crate::metrics::Metrics;
use refleet_core::shard::join_shard;

use crate::session::registry::Registry;

/// Least time between two reports (coalesces bursts of joins).
const MIN_GAP: Duration = Duration::from_millis(100);
/// Back-off bounds between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Who this reflector is, for its reports.
#[derive(Debug, Clone)]
pub struct Identity {
    pub reflector: String,
    pub region: String,
    pub public_url: String,
    pub pool: String,
    pub max_sessions: u32,
    pub max_users: u32,
}

/// Everything the reporter needs.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub url: String,
    /// This reflector's report credential, for `authorization: Bearer`.
    pub token: Option<String>,
    pub interval: Duration,
    pub identity: Identity,
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub metrics: Metrics,
    /// Notified when the operator asks this reflector to drain.
    pub drain: Arc<Notify>,
}

impl Reporter {
    /// Reports until the process ends.
    pub async fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut sequence = 0u64;
        loop {
            let started = Instant::now();
            match self.session(&mut sequence).await {
                Ok(()) => tracing::info!(url = %self.url, "report stream closed by the operator"),
                Err(e) => tracing::warn!(url = %self.url, error = %e, "report stream lost"),
            }
            self.metrics.report_stream_connected.set(0);
            if started.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&self, sequence: &mut u64) -> Result<(), tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel::<ReflectorReport>(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if let Some(token) = &self.token {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().map_err(|_| {
                tonic::Status::invalid_argument("report token is not valid header text")
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        // The first report goes out before the call so the operator learns who we are at once.
        *sequence += 1;
        tx.send(self.report(*sequence))
            .await
            .map_err(|_| tonic::Status::unavailable("report stream closed"))?;
        let mut inbound = ReportsClient::new(channel)
            .report(request)
            .await?
            .into_inner();
        self.metrics.report_stream_connected.set(1);
        tracing::info!(url = %self.url, "report stream open");
        let mut last = Instant::now();
        loop {
            let next = last + self.interval;
            tokio::select! {
                msg = inbound.message() => match msg? {
                    Some(i) => self.apply(i),
                    None => return Ok(()),
                },
                () = tokio::time::sleep_until(next) => {}
                () = self.registry.changed() => {
                    tokio::time::sleep_until(last + MIN_GAP).await;
                }
            }
            *sequence += 1;
            if tx.send(self.report(*sequence)).await.is_err() {
                return Err(tonic::Status::unavailable("report stream closed"));
            }
            last = Instant::now();
        }
    }

    fn report(&self, sequence: u64) -> ReflectorReport {
        let id = &self.identity;
        let activity = self.registry.take_activity();
        let secs = self.interval.as_secs_f64().max(0.001);
        let shards = self
            .registry
            .summaries()
            .into_iter()
            .map(|s| {
                let a = activity
                    .get(s.session_id.as_str())
                    .cloned()
                    .unwrap_or_default();
                let app = s.app_id.clone().unwrap_or_default();
                let shard = s
                    .name
                    .as_deref()
                    .and_then(|n| join_shard(n, &app))
                    .unwrap_or_default()
                    .to_owned();
                let users = s.users;
                let max_users = if a.max_users > 0 {
                    a.max_users
                } else {
                    self.admission.shard(&shard).map_or(0, |s| s.max_users)
                };
                ShardLoad {
                    session_id: s.session_id,
                    shard,
                    app_id: app,
                    users,
                    joins: a.joins,
                    leaves: a.leaves,
                    peak_users: a.peak_users.max(users),
                    messages_per_second: a.reflected as f64 / secs,
                    bytes_per_second: a.bytes as f64 / secs,
                    admitted_reservations: a.admitted,
                    max_users,
                }
            })
            .collect();
        ReflectorReport {
            reflector: id.reflector.clone(),
            region: id.region.clone(),
            public_url: id.public_url.clone(),
            state: if self.registry.is_draining() {
                ReflectorState::Draining
            } else {
                ReflectorState::Ready
            } as i32,
            capacity: Some(report::Capacity {
                max_sessions: id.max_sessions,
                max_users: id.max_users,
            }),
            shards,
            sequence,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pool: id.pool.clone(),
        }
    }

    fn apply(&self, instruction: Instruction) {
        match instruction.kind {
            Some(Kind::Drain(d)) => {
                tracing::info!(
                    deadline_seconds = d.deadline_seconds,
                    "operator asked to drain"
                );
                self.drain.notify_one();
            }
            Some(Kind::ShardSettings(s)) => self.admission.set_shard(
                &s.shard,
                ShardSettings {
                    max_users: s.max_users,
                    persistence: s.persistence,
                },
            ),
            Some(Kind::TokenKeys(k)) => {
                let mut v = Verifier::default();
                for key in &k.keys {
                    if let Err(e) = v.insert(&key.key_id, &key.public_key) {
                        tracing::warn!(error = %e, "operator sent a bad token key; ignored");
                    }
                }
                tracing::info!(keys = k.keys.len(), "token keys updated by the operator");
                self.admission.set_keys(v);
            }
            None => tracing::debug!("empty instruction ignored"),
        }
    }
}
