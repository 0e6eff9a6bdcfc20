//! The cluster side of the rig: kwok nodes across regions, the ReflectorPool and Sessions,
//! and the one watch over reflector pods that both binds new pods to a node of their region
//! (this apiserver runs no kube-scheduler) and starts or stops their simulated reflectors.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use refleet_api::report::Capacity;
use serde_json::{Value, json};

use crate::fleet::{Fleet, lock};

/// The node label the pool's regions select on.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The annotation kwok manages nodes by (`--manage-nodes-with-annotation-selector`).
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";
/// The pool's name.
pub const POOL: &str = "fleet";
/// The appId of the long tail of small sessions (`room-*`).
pub const ROOMS_APP: &str = "sim.rooms";
/// The appId of the few big sessions (`arena-<k>`), which shard automatically.
pub const ARENA_APP: &str = "sim.arena";

/// Name of region `r`.
pub fn region(r: usize) -> String {
    format!("region-{r}")
}

/// The shape of the simulated fleet.
#[derive(Debug, Clone)]
pub struct Shape {
    pub nodes: usize,
    pub regions: usize,
    pub reflector_sessions: u32,
    pub reflector_users: u32,
    pub min_reflectors: u32,
    pub max_reflectors: u32,
    pub warm_buffer: u32,
    pub growth_buffer_seconds: u32,
    pub room_cap: u32,
    pub room_max_shards: u32,
    pub arenas: usize,
    pub arena_cap: u32,
    pub arena_max_shards: u32,
    pub threshold: f64,
}

/// Creates `shape.nodes` kwok nodes, spread evenly over the regions. Each node gets its own
/// loopback /24 as podCIDR, so kwok hands out pod IPs that refuse connections at once (the
/// operator's HTTP load poll then fails fast instead of waiting on unroutable addresses).
pub async fn create_nodes(client: &Client, shape: &Shape) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let created = AtomicUsize::new(0);
    futures_util::stream::iter(0..shape.nodes)
        .map(|i| {
            let nodes = nodes.clone();
            let created = &created;
            let r = i % shape.regions;
            async move {
                let name = format!("kwok-{}-{i}", region(r));
                let node: Node = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {
                            REGION_LABEL: region(r),
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "type": "kwok"
                        }
                    },
                    "spec": {"podCIDR": format!("127.{}.{}.0/24", 64 + i / 256, i % 256)}
                }))?;
                match nodes.create(&PostParams::default(), &node).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(anyhow::Error::from(e).context(format!("node {name}"))),
                }
                created.fetch_add(1, Ordering::Relaxed);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    tracing::info!(nodes = created.load(Ordering::Relaxed), "nodes created");
    Ok(())
}

/// Ready nodes per region, as the pod binder sees them.
pub async fn ready_nodes(client: &Client) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in nodes.list(&Default::default()).await?.items {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if let Some(r) = n.labels().get(REGION_LABEL).filter(|_| ready) {
            out.entry(r.clone()).or_default().push(n.name_any());
        }
    }
    Ok(out)
}

/// The pool: one region per node region (selected by the region label), moves off.
pub fn pool(shape: &Shape) -> Value {
    let regions: Vec<Value> = (0..shape.regions)
        .map(|r| json!({"name": region(r), "nodeSelector": {REGION_LABEL: region(r)}}))
        .collect();
    json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "ReflectorPool",
        "metadata": {"name": POOL},
        "spec": {
            "defaults": {
                "image": "refleet-reflector:sim",
                "capacity": {"sessions": shape.reflector_sessions, "users": shape.reflector_users},
                "minReflectors": shape.min_reflectors,
                "maxReflectors": shape.max_reflectors,
                "warmBuffer": shape.warm_buffer,
                "growthBufferSeconds": shape.growth_buffer_seconds
            },
            "regions": regions,
            "files": {"publicURL": "http://files.sim/"},
            "reflectorURL": {"template": "ws://{pod}.sim/"},
            "drainGracePeriodSeconds": 10,
            "scaleDownCooldownSeconds": 60
        }
    })
}

/// The Sessions: `rooms` (pattern `room-*`, the long tail) and `arena-<k>` (big, sharded).
pub fn sessions(shape: &Shape) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "rooms"},
        "spec": {"poolRef": {"name": POOL}, "appId": ROOMS_APP, "namePattern": "room-*",
                 "maxUsersPerShard": shape.room_cap, "scaleUpThreshold": shape.threshold,
                 "maxShards": shape.room_max_shards, "persistence": false,
                 "closeIdleShardsAfterSeconds": 30}
    })];
    // The Route throughput probe's session (one shard, never full: callers cycle through
    // fewer user ids than its cap and get their pending reservation back).
    out.push(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "lookup"},
        "spec": {"poolRef": {"name": POOL}, "appId": ARENA_APP, "name": "lookup",
                 "maxUsersPerShard": shape.reflector_users, "scaleUpThreshold": 1.0,
                 "maxShards": 1, "persistence": false}
    }));
    for k in 0..shape.arenas {
        out.push(json!({
            "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": format!("arena-{k}")},
            "spec": {"poolRef": {"name": POOL}, "appId": ARENA_APP, "name": format!("arena-{k}"),
                     "maxUsersPerShard": shape.arena_cap, "scaleUpThreshold": shape.threshold,
                     "maxShards": shape.arena_max_shards, "persistence": false,
                     "closeIdleShardsAfterSeconds": 30}
        }));
    }
    out
}

/// The pool's growth buffer now: the sum over its regions of `status.regions[].growthBuffer`
/// (the field is left out when 0). `None` when the pool cannot be read.
pub async fn pool_growth_buffer(client: &Client, ns: &str) -> Option<u64> {
    let ar = refleet_resource("ReflectorPool")?;
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let pool = api.get(POOL).await.ok()?;
    Some(
        pool.data["status"]["regions"]
            .as_array()
            .map_or(0, |regions| {
                regions
                    .iter()
                    .filter_map(|r| r["growthBuffer"].as_u64())
                    .sum()
            }),
    )
}

/// The API resource of a Refleet custom resource kind (`ReflectorPool`, `Session`).
fn refleet_resource(kind: &str) -> Option<kube::api::ApiResource> {
    let plural = match kind {
        "ReflectorPool" => "reflectorpools",
        "Session" => "sessions",
        _ => return None,
    };
    Some(kube::api::ApiResource {
        group: "refleet.dev".into(),
        version: "v1alpha1".into(),
        api_version: "refleet.dev/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    })
}

/// Applies `obj` (a namespaced custom resource) with server-side apply.
pub async fn apply(client: &Client, ns: &str, obj: &Value) -> anyhow::Result<()> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let Some(ar) = refleet_resource(kind) else {
        anyhow::bail!("cannot apply a {kind}");
    };
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    api.patch(
        name,
        &PatchParams::apply("refleet-scale-bench").force(),
        &Patch::Apply(obj),
    )
    .await
    .with_context(|| format!("applying {kind} {name}"))?;
    Ok(())
}

/// The environment variable `name` of a pod's first container.
fn env_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status.and_then(|s| s.pod_ip.as_ref()).is_some()
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Which regions the binder skips (their nodes are NotReady), and round-robin cursors.
#[derive(Default)]
pub struct Binder {
    pub down: Mutex<Vec<String>>,
    nodes: Mutex<BTreeMap<String, Vec<String>>>,
    next: Mutex<HashMap<String, usize>>,
    pub bound: AtomicUsize,
}

impl Binder {
    pub fn set_nodes(&self, nodes: BTreeMap<String, Vec<String>>) {
        *lock(&self.nodes) = nodes;
    }

    fn pick(&self, region: &str) -> Option<String> {
        if lock(&self.down).iter().any(|d| d == region) {
            return None;
        }
        let nodes = lock(&self.nodes);
        let list = nodes.get(region)?;
        let mut next = lock(&self.next);
        let i = next.entry(region.to_owned()).or_default();
        *i = (*i + 1) % list.len().max(1);
        list.get(*i).cloned()
    }
}

/// Watches the reflector pods of `ns`: binds unbound ones to a node of their region, starts
/// a simulated reflector for each Running/Ready one (with the report credential of its pod),
/// drains it when the pod is being deleted and stops it when the pod is gone.
pub async fn watch_pods(
    client: Client,
    ns: String,
    fleet: Arc<Fleet>,
    binder: Arc<Binder>,
    capacity: Capacity,
) {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let config = watcher::Config::default().labels("refleet.dev/pool");
    let mut stream = watcher::watcher(pods.clone(), config).boxed();
    let mut init: Vec<String> = Vec::new();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(%error, "pod watch error (the watcher retries)");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
        };
        match event {
            watcher::Event::Init => init.clear(),
            watcher::Event::InitApply(pod) => {
                init.push(pod.name_any());
                on_pod(&pods, &fleet, &binder, capacity, pod);
            }
            watcher::Event::InitDone => {
                // Pods that vanished while the watch was down.
                for name in fleet.names() {
                    if !init.contains(&name) {
                        fleet.remove(&name);
                    }
                }
            }
            watcher::Event::Apply(pod) => {
                on_pod(&pods, &fleet, &binder, capacity, pod);
            }
            watcher::Event::Delete(pod) => {
                fleet.remove(&pod.name_any());
            }
        }
    }
}

fn on_pod(pods: &Api<Pod>, fleet: &Arc<Fleet>, binder: &Arc<Binder>, capacity: Capacity, pod: Pod) {
    let name = pod.name_any();
    if pod.metadata.deletion_timestamp.is_some() {
        fleet.drain(&name);
        return;
    }
    let region = pod
        .labels()
        .get("refleet.dev/region")
        .cloned()
        .unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if node.is_none() {
        let Some(target) = binder.pick(&region) else {
            return;
        };
        // Bound in a task of its own: awaited here, one round trip per new pod held up
        // every later event of the watch, and during a ramp the simulator saw pods Ready
        // seconds after the operator had routed users to them (joins to lost reflectors).
        let (pods, binder) = (pods.clone(), binder.clone());
        tokio::spawn(async move {
            let binding = json!({
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": target}
            });
            match pods
                .create_subresource::<Value, Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => {
                    binder.bound.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => tracing::debug!(pod = %name, %error, "binding failed"),
            }
        });
        return;
    }
    if is_ready(&pod) && !fleet.has(&name) {
        let Some(token) = env_of(&pod, "REFLEET_REPORT_TOKEN") else {
            tracing::warn!(pod = %name, "reflector pod without REFLEET_REPORT_TOKEN");
            return;
        };
        fleet.start(&name, &region, token, capacity);
    }
}

/// Takes the nodes of `region` away from kwok and marks them NotReady, and marks their
/// pods not Ready (what the node lifecycle controller would do; none runs here).
pub async fn region_down(client: &Client, ns: &str, region: &str) -> anyhow::Result<usize> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes
        .list(&kube::api::ListParams::default().labels(&format!("{REGION_LABEL}={region}")))
        .await?;
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    for n in &list.items {
        let name = n.name_any();
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {KWOK_ANNOTATION: null}}})),
            )
            .await?;
        nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                    "message": "refleet-scale-bench: region outage", "lastHeartbeatTime": now,
                    "lastTransitionTime": now
                }]}})),
            )
            .await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let in_region = pods
        .list(&kube::api::ListParams::default().labels(&format!("refleet.dev/region={region}")))
        .await?;
    for p in &in_region.items {
        let _ = pods
            .patch_status(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": "Ready", "status": "False", "reason": "NodeNotReady",
                    "lastTransitionTime": now
                }]}})),
            )
            .await;
    }
    Ok(list.items.len())
}
