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

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
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
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.name)
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
    let leases: Api<Lease> = Api::namespaced(client, &settings.namespace);
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
        let mut fence = std::pin::pin!(taken_from_us(&leases, &settings));
        let mut stopping = false;
        let mut shut_down = false;
        let mut fenced = false;
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
                () = &mut fence, if !stopping => {
                    info!(identity = %settings.identity, "the Lease has another holder or ran out; stopping the controllers");
                    let _ = lost_tx.send(true);
                    stopping = true;
                    fenced = true;
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
        if fenced {
            // The lease manager still thinks it holds the Lease until its next renewal:
            // lead again only once it says so afresh, or the Lease is ours again.
            loop {
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return finish(rx, task).await;
                        }
                        if !*rx.borrow_and_update() {
                            break;
                        }
                    }
                    () = tokio::time::sleep(fence_every(&settings)) => {
                        if holding(&leases, &settings).await == Some(Holding::Ours) {
                            break;
                        }
                    }
                    () = &mut shutdown => return finish(rx, task).await,
                }
            }
        }
    }
}

/// How often a leader reads its Lease: every second, or four times per lease duration.
fn fence_every(settings: &LeaseSettings) -> Duration {
    (settings.duration / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Resolves when the Lease, read every [`fence_every`], names another holder, or has run out
/// and cannot be renewed at once (another instance may take it at any moment). The lease
/// manager finds out only at its next renewal: a leader so busy that it renewed late led on
/// for up to ~14 s beside the one that took the Lease over, and both routed users to the
/// same shards (run G4 in docs/scale.md: 10 shards over their cap). A read that fails
/// proves nothing: with the apiserver unreachable no one else can take the Lease, and
/// routing goes on. A Lease that ran out while still naming this instance (the apiserver
/// was down for longer than its duration) is renewed on the spot, on the condition that
/// nobody wrote it since it was read; only if that fails does the leader stop. Waiting for
/// the lease manager's own renewal instead left the router refusing every Route for up to
/// a renewal period after each outage.
async fn taken_from_us(leases: &Api<Lease>, settings: &LeaseSettings) {
    loop {
        tokio::time::sleep(fence_every(settings)).await;
        match holding(leases, settings).await {
            None | Some(Holding::Ours) => {}
            Some(Holding::RanOut { resource_version }) => {
                if !renew(leases, settings, &resource_version).await {
                    return;
                }
                info!(identity = %settings.identity, lease = %settings.name, "renewed a Lease that ran out while the apiserver could not be reached");
            }
            Some(Holding::NotOurs) => return,
        }
    }
}

/// What a read of the Lease says about this instance's hold on it.
#[derive(Debug, PartialEq)]
enum Holding {
    /// It names this instance and has not run out.
    Ours,
    /// It names this instance but has run out: free for the taking.
    RanOut {
        /// The Lease's version as read, the condition of renewing it.
        resource_version: String,
    },
    /// It names another instance, or none.
    NotOurs,
}

/// Reads the Lease; `None` when it cannot be read.
async fn holding(leases: &Api<Lease>, settings: &LeaseSettings) -> Option<Holding> {
    let lease = leases.get_opt(&settings.name).await.ok()?;
    Some(holding_of(
        lease,
        &settings.identity,
        k8s_openapi::jiff::Timestamp::now(),
    ))
}

/// Renews the Lease as its holder, only if it is still at `resource_version` (the apiserver
/// refuses the patch with a conflict if anyone wrote it since), as the lease manager renews
/// it: `renewTime` under this instance's field manager.
async fn renew(leases: &Api<Lease>, settings: &LeaseSettings, resource_version: &str) -> bool {
    if resource_version.is_empty() {
        return false;
    }
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": resource_version },
        "spec": {
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now()
            ),
        },
    });
    let params = kube::api::PatchParams {
        field_manager: Some(lease_field_manager(&settings.identity)),
        ..Default::default()
    };
    leases
        .patch(&settings.name, &params, &kube::api::Patch::Strategic(patch))
        .await
        .is_ok()
}

/// What `lease` (`None`: there is none) says about `identity`'s hold on it at `now`: it must
/// name `identity` as holder and, when it says when it was renewed and for how long, `now`
/// must be before that runs out.
fn holding_of(lease: Option<Lease>, identity: &str, now: k8s_openapi::jiff::Timestamp) -> Holding {
    let Some((spec, meta)) = lease.and_then(|l| Some((l.spec?, l.metadata))) else {
        return Holding::NotOurs;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Holding::NotOurs;
    }
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs))
            if now >= renewed.0 + k8s_openapi::jiff::SignedDuration::from_secs(i64::from(secs)) =>
        {
            Holding::RanOut {
                resource_version: meta.resource_version.unwrap_or_default(),
            }
        }
        _ => Holding::Ours,
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{Holding, Lease, holding_of, lease_field_manager};
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    #[test]
    fn a_lease_is_ours_while_it_names_us_and_has_not_run_out() {
        let renewed = Timestamp::from_second(1_000_000).unwrap();
        let lease = |spec: LeaseSpec| {
            Some(Lease {
                metadata: ObjectMeta {
                    resource_version: Some("7".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            })
        };
        let spec = |holder: &str| LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let at = |secs: i64| renewed + SignedDuration::from_secs(secs);
        assert_eq!(
            holding_of(lease(spec("op-a")), "op-a", at(14)),
            Holding::Ours
        );
        assert_eq!(
            holding_of(lease(spec("op-a")), "op-a", at(15)),
            Holding::RanOut {
                resource_version: "7".into()
            },
            "ran out"
        );
        assert_eq!(
            holding_of(lease(spec("op-b")), "op-a", at(1)),
            Holding::NotOurs,
            "taken over"
        );
        let unknown = LeaseSpec {
            holder_identity: Some("op-a".into()),
            ..LeaseSpec::default()
        };
        assert_eq!(
            holding_of(lease(unknown), "op-a", at(100)),
            Holding::Ours,
            "no times: only the holder counts"
        );
        assert_eq!(
            holding_of(lease(LeaseSpec::default()), "op-a", at(0)),
            Holding::NotOurs,
            "free"
        );
        assert_eq!(holding_of(None, "op-a", at(0)), Holding::NotOurs, "none");
    }

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
