//! The placement watch's server side (`refleet.placement.v1.Placements/Watch`): each gateway
//! keeps one stream open and gets the whole placement table ([`Router::placements`]) and the
//! token keys at once, then again whenever they change.
//!
//! Served beside the report stream, on its port, with the same key: a gateway presents a
//! credential minted for the name [`GATEWAY_IDENTITY`]. Full tables rather than deltas: a
//! table is a few hundred bytes per thousand shards, and a gateway that reconnects to a new
//! leader needs nothing but the next message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use refleet_api::placement::placements_server::{Placements, PlacementsServer};
use refleet_api::placement::{
    PlacementState, PlacementTable, ShardPlacement, TokenKey, WatchRequest,
};
use refleet_api::report_credential::ReportKey;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::Router;
use super::placement::PlacementError;

/// The name gateway credentials are minted for (`gateway.<region>.<mac>`).
pub const GATEWAY_IDENTITY: &str = "gateway";

/// How often a stream recomputes the table without a change signal: reflectors whose
/// reports expire change placements without anyone publishing.
const RECHECK: Duration = Duration::from_secs(1);

/// The Placements service.
#[derive(Debug, Clone)]
pub struct PlacementWatch {
    router: Arc<Router>,
    key: Option<Arc<ReportKey>>,
    leading: Option<Arc<AtomicBool>>,
    /// Turns true when the server shuts down: every stream ends.
    stopped: Option<tokio::sync::watch::Receiver<bool>>,
}

impl PlacementWatch {
    /// Watches of `router`'s placements; `key` checks the gateways' credentials (`None`:
    /// open), `leading` refuses and ends streams while this replica is not the leader.
    pub fn new(
        router: Arc<Router>,
        key: Option<Arc<ReportKey>>,
        leading: Option<Arc<AtomicBool>>,
    ) -> Self {
        Self {
            router,
            key,
            leading,
            stopped: None,
        }
    }

    /// Ends every stream (UNAVAILABLE, so gateways reconnect) once `stopped` turns true.
    pub fn until(mut self, stopped: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopped = Some(stopped);
        self
    }

    /// The tonic service.
    pub fn service(self) -> PlacementsServer<Self> {
        PlacementsServer::new(self)
    }

    fn leading(&self) -> bool {
        self.leading
            .as_ref()
            .is_none_or(|l| l.load(Ordering::Relaxed))
    }

    fn authenticate(&self, request: &Request<WatchRequest>) -> Result<(), Status> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let credential = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "placement watch needs authorization: Bearer <gateway credential>",
                )
            })?;
        let id = key.verify(credential).map_err(|e| {
            tracing::warn!(peer = ?request.remote_addr(), error = %e, "placement watch refused");
            Status::unauthenticated(e.to_string())
        })?;
        if id.reflector != GATEWAY_IDENTITY {
            return Err(Status::permission_denied(format!(
                "a credential of {:?} is no gateway credential",
                id.reflector
            )));
        }
        Ok(())
    }
}

/// The router's placements and token keys as one message.
pub fn table(router: &Router) -> PlacementTable {
    let shards = router
        .placements()
        .into_iter()
        .map(|((app_id, shard), resolved)| match resolved {
            Ok(p) => ShardPlacement {
                app_id,
                shard,
                state: PlacementState::Ready as i32,
                reflector: p.reflector,
                url: p.url,
                region: p.region,
            },
            Err(e) => ShardPlacement {
                app_id,
                shard,
                state: match e {
                    PlacementError::Moving => PlacementState::Moving,
                    PlacementError::NotReady | PlacementError::Unknown => PlacementState::NotReady,
                } as i32,
                ..ShardPlacement::default()
            },
        })
        .collect();
    let token_keys = router
        .signer()
        .map(|s| TokenKey {
            key_id: s.key_id().to_owned(),
            public_key: s.public_key().to_vec(),
        })
        .into_iter()
        .collect();
    PlacementTable { shards, token_keys }
}

type TableStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<PlacementTable, Status>> + Send>>;

#[tonic::async_trait]
impl Placements for PlacementWatch {
    type WatchStream = TableStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authenticate(&request)?;
        if !self.leading() {
            return Err(Status::unavailable(
                "not the leader; reconnect (the Service selects the leader)",
            ));
        }
        let peer = request.remote_addr();
        let region = request.into_inner().region;
        tracing::info!(%region, ?peer, "placement watch open");
        let (tx, rx) = mpsc::channel::<Result<PlacementTable, Status>>(2);
        let watch = self.clone();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let stopping = async {
                match &mut stopped {
                    Some(rx) => {
                        let _ = rx.wait_for(|s| *s).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(stopping);
            let mut changed = watch.router.placement_changed();
            let mut last: Option<PlacementTable> = None;
            loop {
                changed.mark_unchanged();
                if !watch.leading() {
                    let _ = tx
                        .send(Err(Status::unavailable("no longer the leader; reconnect")))
                        .await;
                    break;
                }
                let next = table(&watch.router);
                if last.as_ref() != Some(&next) {
                    if tx.send(Ok(next.clone())).await.is_err() {
                        break;
                    }
                    last = Some(next);
                }
                tokio::select! {
                    () = &mut stopping => {
                        let _ = tx.send(Err(Status::unavailable("the router is stopping; reconnect"))).await;
                        break;
                    }
                    () = tx.closed() => break,
                    _ = changed.changed() => {}
                    () = tokio::time::sleep(RECHECK) => {}
                }
            }
            tracing::info!(%region, ?peer, "placement watch closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
