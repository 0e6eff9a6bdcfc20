//! The load-report stream: this reflector tells the operator what it hosts, and follows
//! the operator's instructions.
//!
//! One gRPC stream (`refleet.report.v1.Reports/Report`) per process, kept open with
//! reconnects and back-off: about once a second, and at once when a session's membership
//! changes, it sends identity, state, capacity and per-shard load; the operator answers
//! with drain requests, shard settings, token keys and hand-offs. A reconnect reaches whichever
//! operator replica leads by then (the Service selects the leader).
//!
//! **Hand-offs** (a planned move of a shard to another reflector) run in a task of their own
//! ([`Registry::hand_off`]); their outcomes ride on every report for [`RESULT_TTL`], so an
//! outcome survives a lost report or a reconnect to another operator replica, which matches
//! them by move id. Asking again for a move id already known does nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refleet_api::report::{
    self, HandOff, HandOffResult, Instruction, ReflectorReport, ReflectorState, ShardLoad,
    instruction::Kind, reports_client::ReportsClient,
};
use refleet_api::token::Verifier;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;

use crate::admission::{Admission, ShardSettings};
use crate::metrics::Metrics;
use refleet_api::reconnect::Backoff;
use refleet_core::shard::join_shard;

use crate::session::registry::Registry;

/// Least time between two reports (coalesces bursts of joins).
const MIN_GAP: Duration = Duration::from_millis(100);
/// How long an ended hand-off's outcome is repeated in the reports.
pub const RESULT_TTL: Duration = Duration::from_secs(60);

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
    /// The hand-offs asked for, running or ended.
    pub hand_offs: Arc<HandOffs>,
}

/// The hand-offs this reflector was asked for, by move id.
#[derive(Debug, Default)]
pub struct HandOffs {
    moves: Mutex<HashMap<u64, HandOffState>>,
}

#[derive(Debug)]
enum HandOffState {
    Running,
    Ended { result: HandOffResult, at: Instant },
}

impl HandOffs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HandOffState>> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new hand-off; false when this move id is already running or ended.
    pub fn begin(&self, move_id: u64) -> bool {
        let mut moves = self.lock();
        if moves.contains_key(&move_id) {
            return false;
        }
        moves.insert(move_id, HandOffState::Running);
        true
    }

    /// Records how a hand-off ended.
    pub fn finish(&self, result: HandOffResult) {
        let at = Instant::now();
        self.lock()
            .insert(result.move_id, HandOffState::Ended { result, at });
    }

    /// The outcomes that ended within [`RESULT_TTL`] (older ones are forgotten).
    pub fn results(&self) -> Vec<HandOffResult> {
        let mut moves = self.lock();
        moves.retain(|_, s| match s {
            HandOffState::Running => true,
            HandOffState::Ended { at, .. } => at.elapsed() < RESULT_TTL,
        });
        let mut out: Vec<HandOffResult> = moves
            .values()
            .filter_map(|s| match s {
                HandOffState::Ended { result, .. } => Some(result.clone()),
                HandOffState::Running => None,
            })
            .collect();
        out.sort_by_key(|r| r.move_id);
        out
    }
}

impl Reporter {
    /// Reports until the process ends.
    pub async fn run(self) {
        let mut backoff = Backoff::new();
        let mut sequence = 0u64;
        loop {
            let started = Instant::now();
            match self.session(&mut sequence).await {
                Ok(()) => tracing::info!(url = %self.url, "report stream closed by the operator"),
                Err(e) => tracing::warn!(url = %self.url, error = %e, "report stream lost"),
            }
            self.metrics.report_stream_connected.set(0);
            if started.elapsed() > Duration::from_secs(10) {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_wait(rand::random::<f64>())).await;
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
            hand_offs: self.hand_offs.results(),
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
            Some(Kind::HandOff(h)) => self.hand_off(h),
            Some(Kind::Accept(a)) => {
                if self.registry.unfence(&a.app_id, &a.shard) {
                    tracing::info!(app = %a.app_id, shard = %a.shard, "shard moves back here: its JOINs are taken again");
                }
            }
            None => tracing::debug!("empty instruction ignored"),
        }
    }

    /// Starts a hand-off in a task of its own; its outcome goes out with the next reports.
    fn hand_off(&self, h: HandOff) {
        if h.app_id.is_empty() || h.shard.is_empty() {
            tracing::warn!(
                move_id = h.move_id,
                "hand-off without appId or shard ignored"
            );
            return;
        }
        if !self.hand_offs.begin(h.move_id) {
            tracing::debug!(move_id = h.move_id, "hand-off already known");
            return;
        }
        tracing::info!(app = %h.app_id, shard = %h.shard, move_id = h.move_id, "handing the shard off");
        let (registry, hand_offs) = (self.registry.clone(), self.hand_offs.clone());
        tokio::spawn(async move {
            let outcome = registry.hand_off(&h.app_id, &h.shard).await;
            let (stored, error) = match outcome {
                Ok(sessions) => {
                    tracing::info!(app = %h.app_id, shard = %h.shard, move_id = h.move_id, sessions, "shard handed off");
                    (true, String::new())
                }
                Err(e) => {
                    tracing::warn!(app = %h.app_id, shard = %h.shard, move_id = h.move_id, error = %e, "hand-off failed; the shard stays here");
                    (false, e)
                }
            };
            hand_offs.finish(HandOffResult {
                move_id: h.move_id,
                app_id: h.app_id,
                shard: h.shard,
                stored,
                error,
            });
            // The operator is waiting for this: report now, not at the next interval.
            registry.poke();
        });
    }
}
