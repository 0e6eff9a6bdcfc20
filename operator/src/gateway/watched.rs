//! The placement table of a gateway in its own process: a copy of the leader's, kept
//! current by the placement watch (`refleet.placement.v1.Placements/Watch`).
//!
//! Each message is a whole table and replaces the copy. When the stream breaks (a leader
//! change, a network fault) the gateway keeps answering from its last table and reconnects
//! with back-off; the first message on the new stream replaces the table again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use refleet_api::placement::placements_client::PlacementsClient;
use refleet_api::placement::{PlacementState, PlacementTable, WatchRequest};
use refleet_api::reconnect::Backoff;
use refleet_api::token::Verifier;

use super::Placements;
use super::metrics::GatewayMetrics;
use crate::router::placement::Resolved;
use crate::router::{Placement, PlacementError};

#[derive(Default)]
struct Table {
    shards: HashMap<(String, String), Resolved>,
    verifier: Option<Arc<Verifier>>,
}

/// A gateway's copy of the placement table.
#[derive(Default)]
pub struct WatchedTable {
    table: RwLock<Table>,
}

impl std::fmt::Debug for WatchedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedTable").finish_non_exhaustive()
    }
}

impl WatchedTable {
    /// Replaces the table with `message`; returns how many shards it holds.
    pub fn replace(&self, message: PlacementTable) -> usize {
        let shards: HashMap<_, _> = message
            .shards
            .into_iter()
            .map(|s| {
                let resolved = match PlacementState::try_from(s.state) {
                    Ok(PlacementState::Ready) => Ok(Placement {
                        reflector: s.reflector,
                        url: s.url,
                        region: s.region,
                    }),
                    Ok(PlacementState::Moving) => Err(PlacementError::Moving),
                    _ => Err(PlacementError::NotReady),
                };
                ((s.app_id, s.shard), resolved)
            })
            .collect();
        let mut verifier = Verifier::default();
        for k in &message.token_keys {
            if let Err(error) = verifier.insert(&k.key_id, &k.public_key) {
                tracing::warn!(%error, "token key from the router ignored");
            }
        }
        let n = shards.len();
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        t.shards = shards;
        t.verifier = (!verifier.is_empty()).then(|| Arc::new(verifier));
        n
    }
}

impl Placements for WatchedTable {
    fn placement(&self, app_id: &str, shard: &str) -> Resolved {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        // Borrowed lookup without building a tuple of Strings would need a custom key type;
        // one small allocation per upgrade is nothing next to the upstream connect.
        t.shards
            .get(&(app_id.to_owned(), shard.to_owned()))
            .cloned()
            .unwrap_or(Err(PlacementError::Unknown))
    }

    fn verifier(&self) -> Option<Arc<Verifier>> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .verifier
            .clone()
    }
}

/// Where and how to watch.
#[derive(Clone, Debug)]
pub struct WatchTarget {
    /// The router's report/placement endpoint (`http://refleet-reports:7071`).
    pub endpoint: String,
    /// The gateway credential (`gateway.<region>.<mac>`); `None` for an open endpoint.
    pub credential: Option<String>,
    /// This gateway's region (for the router's logs).
    pub region: String,
}

/// Keeps `table` current from the watch at `target` until `shutdown`, reconnecting with
/// back-off (0.2 s doubling to 5 s) whenever the stream ends.
pub async fn follow(
    target: WatchTarget,
    table: Arc<WatchedTable>,
    metrics: GatewayMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    loop {
        let ended = tokio::select! {
            () = &mut shutdown => return,
            ended = watch_once(&target, &table, &metrics) => ended,
        };
        metrics.watch_connected.set(0);
        if let Ok(true) = ended {
            backoff.reset();
        }
        let wait = backoff.next_wait(rand::random::<f64>());
        if let Err(error) = ended {
            tracing::warn!(%error, endpoint = %target.endpoint, retry_in = ?wait, "placement watch failed; serving the last table");
        }
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Why a watch stream failed.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("connecting: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the credential is not a valid header value")]
    Credential(#[from] tonic::metadata::errors::InvalidMetadataValue),
}

/// One stream; `Ok(true)` when it delivered at least one table before it ended.
async fn watch_once(
    target: &WatchTarget,
    table: &WatchedTable,
    metrics: &GatewayMetrics,
) -> Result<bool, WatchError> {
    let channel = tonic::transport::Endpoint::from_shared(target.endpoint.clone())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect()
        .await?;
    let mut request = tonic::Request::new(WatchRequest {
        region: target.region.clone(),
    });
    if let Some(c) = &target.credential {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {c}").parse()?);
    }
    let mut stream = PlacementsClient::new(channel)
        .watch(request)
        .await?
        .into_inner();
    let mut delivered = false;
    while let Some(message) = stream.message().await? {
        let n = table.replace(message);
        metrics.placements.set(i64::try_from(n).unwrap_or(i64::MAX));
        if !delivered {
            tracing::info!(shards = n, endpoint = %target.endpoint, "placement watch connected");
        }
        metrics.watch_connected.set(1);
        delivered = true;
    }
    Ok(delivered)
}
