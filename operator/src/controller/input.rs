//! From observed Kubernetes objects and reflector load to a [`PlanInput`] (pure).
//!
//! The planner is scoped to one pool per call: its pool, the Sessions that refer to it, its
//! pods and the shards the previous plan of that pool left (kept in memory by the
//! controller). After a restart or a leadership change the memory is rebuilt from what is
//! observable: `Session.status.shards` and the sessions the reflectors say they host.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::observe::{LoadByPod, pod_image, pod_region, pod_state};
use refleet_core::shard::parse_shard_name;

use crate::crd::{ReflectorPool, Session, ShardPhase};
use crate::fleet;
use refleet_core::planner::{PlanInput, ScaleHistory, Seconds, ShardRecord};
// Defined with the planner's SessionInput, whose key they build, so the router can use them
// without depending on the controller.
pub use refleet_core::planner::{session_key, split_session_key};

/// What the controller remembers about one pool between plans.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolMemory {
    /// The shards of the last plan.
    pub shards: Vec<ShardRecord>,
    /// The scaling history of the last plan.
    pub history: ScaleHistory,
    /// Whether `shards` came from a plan (false: rebuild them from Session statuses).
    pub initialised: bool,
}

pub use crate::fleet::pool_id;

/// The public WebSocket base URL a reflector pod was given (`REFLEET_PUBLIC_URL`).
fn pod_public_url(pod: &Pod) -> Option<String> {
    let env = pod.spec.as_ref()?.containers.first()?.env.as_ref()?;
    env.iter()
        .find(|e| e.name == "REFLEET_PUBLIC_URL")?
        .value
        .clone()
}

/// The in-cluster address of a reflector pod (its IP and port), once it has an IP: what the
/// gateway connects to when the pool's gateway is on (clients never see it).
fn pod_internal_url(pod: &Pod) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(format!("http://{host}:{}/", super::pod::REFLECTOR_PORT))
}

/// What the kube backend observed for one pool, as the shared [`fleet::Observed`].
pub fn observed(
    namespace: &str,
    pool_name: &str,
    pool: Option<&ReflectorPool>,
    sessions: &[Session],
    pods: &[Pod],
    loads: &LoadByPod,
) -> fleet::Observed {
    let id = pool_id(namespace, pool_name);
    // With the gateway on, Route answers the gateway's URL and the gateway reaches each
    // reflector at its pod address; without it, clients get the public URL.
    let gateway = pool.is_some_and(|p| p.spec.gateway.enabled);
    fleet::Observed {
        pools: pool
            .map(|p| fleet::ObservedPool {
                namespace: namespace.to_owned(),
                name: pool_name.to_owned(),
                spec: p.spec.clone(),
                files_url: p.spec.files.public_url.clone(),
            })
            .into_iter()
            .collect(),
        sessions: sessions
            .iter()
            .map(|s| fleet::ObservedSession {
                namespace: namespace.to_owned(),
                name: s.name_any(),
                spec: s.spec.clone(),
                deleted: s.metadata.deletion_timestamp.is_some(),
            })
            .collect(),
        reflectors: pods
            .iter()
            .map(|p| {
                let name = p.name_any();
                fleet::ObservedHost {
                    pool: id.clone(),
                    region: pod_region(p).map(str::to_owned),
                    image: pod_image(p),
                    state: pod_state(p),
                    url: if gateway {
                        pod_internal_url(p)
                    } else {
                        pod_public_url(p)
                    },
                    hosted: loads.get(&name).map(|l| {
                        l.sessions
                            .iter()
                            .map(|h| fleet::HostedShard {
                                app_id: h.app_id.clone(),
                                name: h.name.clone(),
                                users: h.users,
                            })
                            .collect()
                    }),
                    name,
                }
            })
            .collect(),
    }
}

/// Builds the planner's input for pool `pool_name` in `namespace` (`pool` is `None` when it
/// does not exist: its sessions then come out `PoolNotFound`), with [`fleet::plan_input`];
/// before the first plan the shards are recovered from the Sessions' status.
#[allow(clippy::too_many_arguments)]
pub fn build_input(
    namespace: &str,
    pool_name: &str,
    pool: Option<&ReflectorPool>,
    sessions: &[Session],
    pods: &[Pod],
    loads: &LoadByPod,
    memory: &PoolMemory,
    now: Seconds,
) -> PlanInput {
    let observed = observed(namespace, pool_name, pool, sessions, pods, loads);
    input_for(&observed, namespace, pool_name, sessions, memory, now)
}

/// The planner's input from what [`observed`] returned for pool `pool_name` in `namespace`.
pub fn input_for(
    observed: &fleet::Observed,
    namespace: &str,
    pool_name: &str,
    sessions: &[Session],
    memory: &PoolMemory,
    now: Seconds,
) -> PlanInput {
    let mut shards = memory.shards.clone();
    if !memory.initialised {
        shards.extend(recover_from_status(
            namespace,
            &pool_id(namespace, pool_name),
            sessions,
        ));
    }
    fleet::plan_input(observed, &shards, &memory.history, now)
}

/// Shards recorded in exact-name Sessions' status (placed ones; pending ones are reopened).
fn recover_from_status(namespace: &str, pool: &str, sessions: &[Session]) -> Vec<ShardRecord> {
    let mut out = Vec::new();
    for session in sessions {
        let spec = &session.spec;
        let Some(name) = &spec.name else { continue };
        let key = session_key(namespace, &spec.app_id, name);
        for s in session.status.iter().flat_map(|st| &st.shards) {
            let Some((base, index)) = parse_shard_name(&s.name) else {
                continue;
            };
            if base != name || s.reflector.is_empty() || s.state == ShardPhase::Pending {
                continue;
            }
            out.push(ShardRecord {
                session: key.clone(),
                name: s.name.clone(),
                index,
                pool: pool.to_owned(),
                region: s.region.clone(),
                reflector: Some(s.reflector.clone()),
                committed_users: spec.max_users_per_shard,
                users: s.users,
                reserved: 0,
                phase: s.state,
                empty_since: None,
                moving_to: None,
                moved_at: None,
            });
        }
    }
    out
}
