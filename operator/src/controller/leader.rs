//! Lease-based leader election (`coordination.k8s.io/v1` Lease) with `kube-lease-manager`.
//!
//! Every instance runs [`lead`]: it waits until it holds the Lease, runs the controllers
//! while it does, stops them when it loses the Lease (and waits to lead again), and releases
//! the Lease on shutdown so another instance takes over at once instead of after the lease
//! duration. The crate renews the Lease `grace` seconds before it expires and takes a free one
//! with a server-side apply under a field manager of this instance's own, so of two instances
//! taking it at once one gets a conflict: they cannot both hold it.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tracing::info;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This instance's identity (the Lease's holder while it leads).
    pub identity: String,
    /// How long a Lease stays valid after its last renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews it.
    pub grace: Duration,
}

/// Runs `work` whenever this instance holds the Lease, until `shutdown` resolves.
///
/// `work` gets a future that resolves when leadership is lost (or on shutdown) and must
/// return soon after it does. `leading` is told every change of leadership.
pub async fn lead<W, F>(
    client: Client,
    settings: LeaseSettings,
    shutdown: impl Future<Output = ()>,
    leading: impl Fn(bool),
    mut work: W,
) -> Result<(), LeaseManagerError>
where
    W: FnMut(std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>) -> F,
    F: Future<Output = ()>,
{
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration.as_secs().max(2))
        .with_grace(
            settings
                .grace
                .as_secs()
                .clamp(1, settings.duration.as_secs().max(2) - 1),
        )
        // One field manager per instance, as kube-lease-manager expects: taking a free Lease is
        // a server-side apply without force, so when two instances take it at once the second
        // gets a conflict on `holderIdentity`. A manager shared by all instances let both
        // applies succeed and both instances lead until the next renewal.
        .with_field_manager(lease_field_manager(&settings.identity))
        .build()
        .await?;
    let (mut rx, task) = manager.watch().await;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Wait for leadership (or shutdown).
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return finish(rx, task).await },
                () = &mut shutdown => return finish(rx, task).await,
            }
        }
        info!(identity = %settings.identity, lease = %settings.name, "leading");
        leading(true);
        let (lost_tx, lost_rx) = watch::channel(false);
        let lost: std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>> =
            Box::pin(wait_true(lost_rx));
        let mut running = std::pin::pin!(work(lost));
        let mut stopping = false;
        let mut shut_down = false;
        loop {
            tokio::select! {
                () = &mut running => break,
                changed = rx.changed(), if !stopping => {
                    if changed.is_err() || !*rx.borrow_and_update() {
                        info!(identity = %settings.identity, "lost the lease; stopping the controllers");
                        let _ = lost_tx.send(true);
                        stopping = true;
                    }
                }
                () = &mut shutdown, if !stopping => {
                    let _ = lost_tx.send(true);
                    stopping = true;
                    shut_down = true;
                }
            }
        }
        leading(false);
        if shut_down || !stopping {
            // Shutdown, or the work ended by itself: give up the Lease.
            return finish(rx, task).await;
        }
    }
}

/// The Lease's field manager of instance `identity` (field manager names are at most 128
/// bytes).
fn lease_field_manager(identity: &str) -> String {
    let mut name = format!("{}-lease-{identity}", super::FIELD_MANAGER);
    name.truncate(name.floor_char_boundary(128));
    name
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Drops the channel (the manager then releases the Lease) and waits for it.
async fn finish(
    rx: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
) -> Result<(), LeaseManagerError> {
    drop(rx);
    match task.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::lease_field_manager;

    #[test]
    fn each_instance_has_its_own_bounded_field_manager() {
        assert_eq!(lease_field_manager("op-a"), "refleet-operator-lease-op-a");
        assert_ne!(lease_field_manager("op-a"), lease_field_manager("op-b"));
        let long = "é".repeat(100);
        let name = lease_field_manager(&long);
        assert!(name.len() <= 128, "{}", name.len());
        assert!(name.starts_with("refleet-operator-lease-é"));
    }
}
