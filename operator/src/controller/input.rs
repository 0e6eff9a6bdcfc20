//! From observed Kubernetes objects and reflector load to a [`PlanInput`] (pure).
//!
//! The planner is scoped to one pool per call: its pool, the Sessions that refer to it, its
//! pods and the shards the previous plan of that pool left (kept in memory by the
//! controller). After a restart or a leadership change the memory is rebuilt from what is
//! observable: `Session.status.shards` and the sessions the reflectors say they host.

use std::collections::{BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::observe::{LoadByPod, pod_image, pod_region, pod_state};
use crate::crd::{ReflectorPool, Session, ShardPhase, parse_shard_name};
use crate::planner::{
    ObservedReflector, PlanInput, PoolInput, RegionInput, ScaleHistory, Seconds, SessionInput,
    ShardPolicy, ShardRecord,
};
// Defined with the planner's SessionInput, whose key they build, so the router can use them
// without depending on the controller.
pub use crate::planner::{session_key, split_session_key};

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

/// Planner id of pool `name` in `namespace`.
pub fn pool_id(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The concrete session names a Session governs now: its `name`, or for a pattern the
/// matching names that have shards or that a reflector hosts.
pub fn concrete_names(
    session: &Session,
    memory: &PoolMemory,
    loads: &LoadByPod,
) -> BTreeSet<String> {
    let ns = session.namespace().unwrap_or_default();
    let spec = &session.spec;
    if let Some(name) = &spec.name {
        return BTreeSet::from([name.clone()]);
    }
    let prefix = format!("{ns}/{}/", spec.app_id);
    let mut names: BTreeSet<String> = memory
        .shards
        .iter()
        .filter_map(|s| s.session.strip_prefix(&prefix))
        .filter(|n| spec.matches(n))
        .map(str::to_owned)
        .collect();
    for load in loads.values() {
        for hosted in &load.sessions {
            if hosted.app_id != spec.app_id || hosted.users == 0 {
                continue;
            }
            if let Some((base, _)) = parse_shard_name(&hosted.name)
                && spec.matches(base)
            {
                names.insert(base.to_owned());
            }
        }
    }
    names
}

/// Builds the planner's input for pool `pool_name` in `namespace` (`pool` is `None` when it
/// does not exist: its sessions then come out `PoolNotFound`).
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
    let id = pool_id(namespace, pool_name);
    let pools: Vec<PoolInput> = pool
        .map(|p| PoolInput {
            id: id.clone(),
            placement: p.spec.placement,
            regions: p
                .spec
                .resolved_regions()
                .into_iter()
                .map(|r| RegionInput {
                    image: r.image.clone().unwrap_or_default(),
                    capacity: r.capacity,
                    min_reflectors: r.min_reflectors,
                    max_reflectors: r.max_reflectors,
                    warm_buffer: r.warm_buffer,
                    name: r.name,
                })
                .collect(),
            cooldown: u64::from(p.spec.scale_down_cooldown_seconds),
            drain_grace: u64::from(p.spec.drain_grace_period_seconds),
        })
        .into_iter()
        .collect();

    // Sessions, and each concrete session's appId and cap for matching load and recovery.
    let mut inputs = Vec::new();
    let mut apps: HashMap<String, (String, u32)> = HashMap::new();
    for session in sessions {
        let spec = &session.spec;
        let policy = ShardPolicy::from(spec);
        for name in concrete_names(session, memory, loads) {
            let key = session_key(namespace, &spec.app_id, &name);
            apps.insert(key.clone(), (spec.app_id.clone(), spec.max_users_per_shard));
            inputs.push(SessionInput {
                key,
                name,
                pool: id.clone(),
                policy: policy.clone(),
                deleted: session.metadata.deletion_timestamp.is_some(),
                waiting: false,
            });
        }
    }

    let reflectors: Vec<ObservedReflector> = pods
        .iter()
        .filter_map(|p| {
            let state = pod_state(p)?;
            let region = pod_region(p)?.to_owned();
            let capacity = pool
                .and_then(|pool| pool.spec.resolved_region(&region))
                .map(|r| r.capacity)
                .unwrap_or_default();
            Some(ObservedReflector {
                name: p.name_any(),
                pool: id.clone(),
                region,
                image: pod_image(p),
                capacity,
                state,
            })
        })
        .collect();
    let region_of: HashMap<&str, &str> = reflectors
        .iter()
        .map(|r| (r.name.as_str(), r.region.as_str()))
        .collect();

    let mut shards = memory.shards.clone();
    if !memory.initialised {
        shards.extend(recover_from_status(namespace, &id, sessions));
    }
    // Shards a reflector hosts with users but the plan does not know (after a restart).
    for (pod, load) in loads {
        for hosted in &load.sessions {
            let Some((base, index)) = parse_shard_name(&hosted.name) else {
                continue;
            };
            let key = session_key(namespace, &hosted.app_id, base);
            let Some(&(_, cap)) = apps.get(&key) else {
                continue;
            };
            if hosted.users == 0
                || shards
                    .iter()
                    .any(|s| s.session == key && s.name == hosted.name)
            {
                continue;
            }
            shards.push(ShardRecord {
                session: key,
                name: hosted.name.clone(),
                index,
                pool: id.clone(),
                region: region_of
                    .get(pod.as_str())
                    .copied()
                    .unwrap_or_default()
                    .to_owned(),
                reflector: Some(pod.clone()),
                committed_users: cap,
                users: hosted.users,
                reserved: 0,
                phase: ShardPhase::Open,
                empty_since: None,
            });
        }
    }
    // Fresh load for every placed shard whose reflector reported.
    for shard in &mut shards {
        let (Some(reflector), Some((app, _))) = (&shard.reflector, apps.get(&shard.session)) else {
            continue;
        };
        if let Some(load) = loads.get(reflector) {
            shard.users = load
                .sessions
                .iter()
                .find(|h| h.app_id == *app && h.name == shard.name)
                .map_or(0, |h| h.users);
        }
    }

    PlanInput {
        pools,
        sessions: inputs,
        reflectors,
        shards,
        history: memory.history.clone(),
        now,
    }
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
            });
        }
    }
    out
}
