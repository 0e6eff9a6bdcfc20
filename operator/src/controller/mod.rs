//! # The kube backend: controllers that apply the planner's decisions in a cluster
//!
//! ```text
//!   watch ReflectorPool ──┐                       ┌─> reflector Pods (+ per-pod Services)
//!   watch Session ────────┼─> sync(pool) ─ plan ──┼─> status of the pool and its Sessions
//!   watch owned Pods ─────┘    observe    (pure)  └─> Events, metrics
//! ```
//!
//! Two kube-rs `Controller`s, one per kind, both level-triggered and idempotent. Each
//! reconcile runs the same [`reconcile::sync`] for the pool concerned, under a per-pool
//! lock (one that finds a sync of its pool already waiting leaves the work to it,
//! [`reconcile::sync_coalesced`]): **observe** (the pool, the Sessions that refer to it and
//! its pods, read from the [`cache`] that one watch per kind keeps, and the load each ready reflector reports
//! through a [`observe::LoadSource`]), **plan** with the pure
//! [`refleet_core::planner::plan`], **apply** (create pods with server-side apply, mark and delete
//! draining pods with the drain grace, write statuses with server-side apply on the status
//! subresource, publish Events for decisions). The planner's memory between runs (shards
//! and scaling history) is kept per pool; after a restart or a leadership change it is
//! rebuilt from `Session.status` and what the reflectors host.
//!
//! No finalizers: pods and Services are owned (owner references), so the garbage collector
//! removes them with their pool, and nothing else needs cleanup.
//!
//! - [`cache`]: the watch caches the syncs read and the controllers are triggered by.
//! - [`pod`]: reflector pods and per-pod Services (pure builders).
//! - [`observe`]: pod state and reflector load.
//! - [`input`]: observed objects → the planner's input.
//! - [`status`]: plan → statuses and conditions.
//! - [`reconcile`]: the controllers' reconcile functions and the apply step.
//! - [`leader`]: Lease-based leader election.

pub mod cache;
pub mod input;
pub mod leader;
pub mod observe;
pub mod pod;
pub mod reconcile;
pub mod status;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod scenarios;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use self::input::PoolMemory;
use self::observe::LoadSource;
use crate::metrics::OperatorMetrics;
use refleet_core::planner::Seconds;

/// The field manager of every server-side apply and the reporting controller of Events.
pub const FIELD_MANAGER: &str = "refleet-operator";

/// A failure of one reconciliation (the controller logs it, counts it and retries).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// An object could not be serialised for a patch.
    #[error("serialising a patch failed: {0}")]
    Serialize(#[source] serde_json::Error),
    /// A reflector's report credential could not be minted (its name or region).
    #[error("{0}")]
    Credential(#[source] refleet_api::report_credential::CredentialError),
    /// The watches behind the controllers' caches stopped before their first list (the
    /// controllers are shutting down).
    #[error("the watch caches stopped before their first list")]
    CacheClosed,
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    /// A bounded label for the `error` metric label.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                422 => "invalid",
                429 => "throttled",
                500..=599 => "server_error",
                _ => "api_error",
            },
            Error::Kube(_) => "transport",
            Error::Serialize(_) => "serialize",
            Error::Credential(_) => "credential",
            Error::CacheClosed => "cache_closed",
        }
    }
}

/// A `Result` with the controller's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconciliation shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Where reflector load comes from.
    pub load: Arc<dyn LoadSource>,
    /// The operator's metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// How often a pool is re-synced without any change (reflector load is polled).
    pub resync: Duration,
    /// A Session's status whose only change is its user counts is written at most this
    /// often (any other change is written at once).
    pub status_counts_every: Duration,
    /// The shortest time between the starts of two syncs of one pool that reconciles
    /// trigger, unless a Route waits for the backend (then it syncs at once). A sync's own
    /// status writes trigger reconciles, so without a pace the syncs of a busy pool follow
    /// each other as fast as they run. Zero: no pace.
    pub min_sync_interval: Duration,
    /// The clock (Unix seconds); tests fix it.
    pub clock: fn() -> Seconds,
    /// The router, fed with every plan (`None`: routing off).
    pub router: Option<Arc<crate::router::Router>>,
    /// Extra env of every reflector pod (report stream, token keys).
    pub reflector_env: Vec<k8s_openapi::api::core::v1::EnvVar>,
    /// Mints each new reflector pod's report credential (`REFLEET_REPORT_TOKEN`).
    pub report_key: Option<refleet_api::report_credential::ReportKey>,
    pools: Mutex<HashMap<String, Arc<PoolSlot>>>,
}

/// One pool's memory between syncs, behind the lock that makes its syncs run one at a time.
#[derive(Debug, Default)]
pub(crate) struct PoolSlot {
    /// The planner's memory; its lock is held for a whole sync.
    pub(crate) memory: tokio::sync::Mutex<PoolMemory>,
    /// A reconcile waits for `memory` and has not read the caches yet: any later trigger is
    /// covered by it (see `reconcile::sync_coalesced`).
    pub(crate) queued: std::sync::atomic::AtomicBool,
    /// When the last sync started (it held the lock), and how long the last one that
    /// ended took.
    pub(crate) times: Mutex<SyncTimes>,
}

/// When a pool's last sync started and how long the last finished one took.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SyncTimes {
    pub(crate) started: Option<tokio::time::Instant>,
    pub(crate) took: Duration,
}

impl SyncTimes {
    /// When the next sync may start, `interval` after the last one, and when it may start if
    /// a Route waits for it: at once for a quick sync, but never before the last one's
    /// duration has passed again after it, so syncs that Routes keep asking for take at most
    /// half the time (at ~100 000 shards a sync takes most of a second; back to back, the
    /// leader had no core left for the Routes and reports that wait on it).
    pub(crate) fn next_starts(
        &self,
        interval: Duration,
    ) -> Option<(tokio::time::Instant, tokio::time::Instant)> {
        self.started
            .map(|t| (t + interval, t + interval.min(self.took * 2)))
    }
}

impl PoolSlot {
    fn times(&self) -> std::sync::MutexGuard<'_, SyncTimes> {
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes that a sync starts now; the returned guard notes how long it took when dropped
    /// (whichever way the sync ends).
    pub(crate) fn started(&self) -> SyncTiming<'_> {
        let now = tokio::time::Instant::now();
        self.times().started = Some(now);
        SyncTiming {
            slot: self,
            begun: now,
        }
    }

    /// See [`SyncTimes::next_starts`].
    pub(crate) fn next_starts(
        &self,
        interval: Duration,
    ) -> Option<(tokio::time::Instant, tokio::time::Instant)> {
        self.times().next_starts(interval)
    }
}

/// Records a sync's duration in its pool's slot when dropped.
pub(crate) struct SyncTiming<'a> {
    slot: &'a PoolSlot,
    begun: tokio::time::Instant,
}

impl Drop for SyncTiming<'_> {
    fn drop(&mut self) {
        self.slot.times().took = self.begun.elapsed();
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

/// Selects rustls' `ring` crypto provider for the process (the dependency graph enables more
/// than one, so rustls cannot pick by itself). Call before creating a [`Client`]; repeated
/// calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Unix time in seconds.
pub fn unix_now() -> Seconds {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Context {
    /// A context publishing Events as `refleet-operator` (instance `identity`).
    pub fn new(
        client: Client,
        identity: &str,
        load: Arc<dyn LoadSource>,
        metrics: Arc<OperatorMetrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            load,
            metrics,
            resync: Duration::from_secs(10),
            status_counts_every: Duration::from_secs(10),
            min_sync_interval: Duration::from_secs(1),
            clock: unix_now,
            router: None,
            reflector_env: Vec::new(),
            report_key: None,
            pools: Mutex::default(),
        }
    }

    /// The memory (and lock) of pool `id`.
    pub(crate) fn pool_slot(&self, id: &str) -> Arc<PoolSlot> {
        let mut pools = match self.pools.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools.entry(id.to_owned()).or_default().clone()
    }

    /// Forgets every pool's memory (on losing leadership: the next leader's view wins).
    pub fn forget(&self) {
        match self.pools.lock() {
            Ok(mut g) => g.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}
